/* source.h — local item sources: JSONL files and WebDataset tar shards (DESIGN.md §4).
 *
 * The roles do not call this directly for their units: common/source_io.h plans and reads any
 * store (local files, S3 objects through source_s3.h's blob, Kafka partitions through kafka.h)
 * and converts units and refs to and from twn.proto for all of them.
 *
 * Three pieces, all deterministic functions of the bytes so a restarted coordinator re-plans
 * exactly the same units and a worker re-reads exactly the item a ref names:
 *
 *   blob     random-access bytes with a name (a local file here; an S3 object through ranged GETs
 *            can implement the same two callbacks).
 *   planner  cuts a source object into units of about N items: a unit is a byte range [start, end)
 *            that starts and ends on item boundaries, plus the index of its first item and its item
 *            count.  Every item of the object is in exactly one unit.
 *   reader   iterates the items of a unit, or reads the single item an item ref names
 *            (offset, length): both give identical items, byte for byte and message for message.
 *
 * Items and their indices (dense, 0-based per source object, bad records included):
 *
 *   JSONL  one item per non-blank line; a line of only spaces/tabs/CR is not an item and has no
 *          index.  offset/length cover the line without its '\n'; `line` is its 1-based number.
 *          {"id": "a1", "text": "...", "instruction": "...", "image": "img/a.jpg" | ["a", "b"]}
 *          id: a string or an integer (written in decimal); text, instruction: strings or null;
 *          image: a path (relative paths are relative to the JSONL file's directory) or a list of
 *          paths; other keys are ignored.  An item needs text or at least one image.
 *          Missing id: a bad record, unless opts.derive_missing_id, which names the item
 *          "<path>:<line>" (path as planned; "<path>@<byte>" for a ref without a line) — stable
 *          across runs as long as the file is.
 *   tar    one item per run of consecutive members sharing a WebDataset key (the member path up to
 *          the first '.' of its base name: "shard/00017.jpg" -> key "shard/00017", ext "jpg").
 *          ext jpg|jpeg|png|webp (case-insensitive, last dotted part): an image, kept in memory;
 *          ext txt: the text (UTF-8); ext json: an object whose "id" (string or integer) replaces
 *          the key as the item id and whose "instruction"/"text" are used (the .txt wins for
 *          text); other members are carried along but not read.  offset/length cover the item's
 *          headers and padded data.  Directories, links and key-less files belong to the item
 *          before them (to the next one at the start of the archive or after a bad span).  Empty
 *          blocks are skipped anywhere, so concatenated archives read as one.  A member whose
 * header checksum is bad cannot be sized, so the reader looks for the next valid header (512-byte
 * steps) and the skipped span becomes one bad item. Formats: ustar, GNU (long names 'L'), pax ('x'
 * path/size), base-256 sizes.
 *
 * Bad records never stop iteration: the item comes back with fault != TWN_SRC_OK and a message
 * naming the file, the line or byte offset, the offending value and what was expected; the caller
 * dead-letters it (ItemRef + Stage PARSE) and asks for the next one.
 *
 * Nothing here is thread-safe per object; use one reader (and one blob) per thread.
 *
 * Typical use (a gate reading a leased unit, a worker re-reading a hard item):
 *
 *     twn_src_unit u;                        // from UnitLease.source
 *     twn_src_unit_from_proto(lease->unit_id, lease->source, &u, &err);
 *     twn_blob *b;
 *     twn_blob_open_file(u.path, &b, &err);  // -1: dead-letter the whole unit (STAGE_READ)
 *     twn_src_reader *r;
 *     twn_src_reader_open(b, &u, &opts, &r, &err);
 *     twn_src_item it = {0};
 *     while ((rc = twn_src_reader_next(r, &it, &err)) == 1) {
 *         if (it.fault) { reject(twn_src_ref_of(&u, &it), STAGE_PARSE, it.err.msg); continue; }
 *         ... gate it.id / it.text / it.images ...
 *     }
 *     twn_src_item_clear(&it); twn_src_reader_close(r); twn_blob_close(b);
 *
 *     twn_src_ref ref;                       // worker: from HardItem.ref
 *     twn_src_ref_from_proto(hard->ref, &ref, &err);
 *     twn_src_read_ref(b, &ref, &opts, &it, &err); */
#ifndef TWN_COMMON_SOURCE_H
#define TWN_COMMON_SOURCE_H

#include <stddef.h>
#include <stdint.h>

#include "proto/twn.pb-c.h"
#include "util/err.h"

/* Values match twn.Format in proto/twn.proto. */
typedef enum twn_src_format {
    TWN_SRC_AUTO = 0, /* by file name: *.tar -> TAR, anything else -> JSONL */
    TWN_SRC_JSONL = 1,
    TWN_SRC_TAR = 2,
    TWN_SRC_KAFKA_JSON = 3, /* Kafka units (common/source_io.h; read by kafka.h, not here) */
    TWN_SRC_KAFKA_PROTO = 4,
} twn_src_format;

typedef struct twn_src_opts {
    size_t max_item_bytes; /* a larger JSONL line / tar item is a bad record, never loaded */
    size_t max_id_bytes;   /* a longer id (or tar key used as id) is a bad record */
    int derive_missing_id; /* JSONL: id = "<path>:<line>" when the record has none */
} twn_src_opts;

/* max_item_bytes 64 MiB, max_id_bytes 256, derive_missing_id 0. */
twn_src_opts twn_src_opts_default(void);

/* By file name ending: ".tar" -> TWN_SRC_TAR, otherwise TWN_SRC_JSONL. */
twn_src_format twn_src_format_of(const char *path);
const char *twn_src_format_name(twn_src_format f);

// ------------------------------------------------------------------------------------------------
// Blobs

typedef struct twn_blob twn_blob;
struct twn_blob {
    const char *name; /* used in every message */
    uint64_t size;
    /* Reads up to n bytes at off into buf; *got < n only at the end of the blob. */
    int (*read_at)(twn_blob *b, uint64_t off, void *buf, size_t n, size_t *got, twn_err *err);
    void (*close)(twn_blob *b);
    /* Optional (NULL: none): the caller is about to read [off, off+n) front to back.  A remote
     * blob fetches that range in a few large requests instead of one per read_at. */
    void (*will_read)(twn_blob *b, uint64_t off, uint64_t n);
};

int twn_blob_open_file(const char *path, twn_blob **out, twn_err *err);
/* Wraps memory without copying; `data` and `name` must outlive the blob. */
twn_blob *twn_blob_mem(const void *data, size_t n, const char *name);
void twn_blob_close(twn_blob *b);

// ------------------------------------------------------------------------------------------------
// Units and the planner

typedef struct twn_src_unit {
    uint64_t id; /* sequential in planning order */
    twn_src_format format;
    char *path;     /* owned */
    uint64_t start; /* first byte of the first item */
    uint64_t end;   /* the next unit's start; for the last unit, just past its last item */
    uint64_t first_index;
    uint64_t count;      /* items in [start, end) */
    uint64_t first_line; /* JSONL: line number of the first item; tar: 0 */
} twn_src_unit;

typedef struct twn_src_units {
    twn_src_unit *v;
    size_t n, cap;
} twn_src_units;

void twn_src_units_free(twn_src_units *l);

/* Called once per unit, in order; the unit (and its path) is only valid during the call.  A
 * non-zero return stops planning and is returned. */
typedef int (*twn_src_unit_fn)(const twn_src_unit *u, void *user, twn_err *err);

/* Plans one object: units of items_per_unit items (the last may have fewer).  Unit ids start at
 * *next_id, which is advanced.  Streams: memory does not grow with the object. */
int twn_src_plan_blob(twn_blob *b, const char *path, twn_src_format fmt, uint64_t items_per_unit,
                      uint64_t *next_id, twn_src_unit_fn fn, void *user, twn_err *err);

/* Plans local files in the order given (pass them sorted for a stable plan), appending to *out.
 * An object with no items yields no unit.  A file that cannot be opened fails the whole plan. */
int twn_src_plan_files(const char *const *paths, size_t n, twn_src_format fmt,
                       uint64_t items_per_unit, twn_src_units *out, twn_err *err);

// ------------------------------------------------------------------------------------------------
// Items

typedef enum twn_src_fault {
    TWN_SRC_OK = 0,
    TWN_SRC_BAD_JSON,  /* malformed JSON, or not an object */
    TWN_SRC_BAD_ID,    /* missing, empty, wrong type, too long */
    TWN_SRC_BAD_UTF8,  /* invalid UTF-8 or a NUL in text / key */
    TWN_SRC_BAD_FIELD, /* a known field of the wrong type; duplicate tar member */
    TWN_SRC_EMPTY,     /* neither text nor image */
    TWN_SRC_TOO_BIG,   /* larger than max_item_bytes */
    TWN_SRC_BAD_TAR,   /* bad header checksum / fields: the span up to the next valid header */
    TWN_SRC_TRUNCATED, /* the object ends inside the item */
    TWN_SRC_STALE_REF, /* the ref does not match the object (it changed since planning) */
} twn_src_fault;

const char *twn_src_fault_name(twn_src_fault f);

typedef struct twn_src_image {
    char *path;    /* JSONL: the resolved path; tar: NULL */
    char *member;  /* tar: the member name; JSONL: NULL */
    uint8_t *data; /* tar: the encoded bytes; JSONL: NULL */
    size_t size;
} twn_src_image;

typedef struct twn_src_item {
    uint64_t index;  /* item index in the source object */
    uint64_t offset; /* first byte */
    uint64_t length; /* bytes */
    uint64_t line;   /* JSONL 1-based line (0 when a ref did not carry it); tar: 0 */
    twn_src_fault fault;
    twn_err err;       /* the message when fault != TWN_SRC_OK */
    char *id;          /* NULL when bad before the id was known */
    char *text;        /* NULL when absent */
    char *instruction; /* NULL when absent */
    char *key;         /* tar: the WebDataset key; JSONL: NULL */
    size_t n_images;
    twn_src_image *images;
} twn_src_item;

/* Frees everything the item owns and zeroes it (safe on a zeroed item). */
void twn_src_item_clear(twn_src_item *it);

/* Parses one JSONL record (the line without '\n') into `it`.  Set it->index/offset/length/line
 * first: messages quote them.  `path` names the file and anchors relative image paths.  Returns
 * 0, or -1 with it->fault and it->err set.  The readers use it; exposed for the fuzzer. */
int twn_src_jsonl_parse(const char *line, size_t len, const char *path, const twn_src_opts *o,
                        twn_src_item *it);

// ------------------------------------------------------------------------------------------------
// Readers

typedef struct twn_src_reader twn_src_reader;

/* Reads the items of `u` from `b` (borrowed; must outlive the reader). */
int twn_src_reader_open(twn_blob *b, const twn_src_unit *u, const twn_src_opts *o,
                        twn_src_reader **out, twn_err *err);
/* 1: an item in *it (cleared first; check it->fault); 0: the unit is done; -1: the object could
 * not be read, or it no longer holds u->count items in [start, end) (err says which) — the items
 * not yet returned cannot be read from this object. */
int twn_src_reader_next(twn_src_reader *r, twn_src_item *it, twn_err *err);
void twn_src_reader_close(twn_src_reader *r);

/* What a worker needs to re-read one item (the control plane's ItemRef). */
typedef struct twn_src_ref {
    twn_src_format format;
    const char *path;
    uint64_t offset, length;
    uint64_t index;
    uint64_t line; /* JSONL; 0 when unknown */
} twn_src_ref;

/* The ref of an item read from a unit (points into u->path). */
twn_src_ref twn_src_ref_of(const twn_src_unit *u, const twn_src_item *it);

/* Reads exactly the item `ref` names.  0: *it holds it (check it->fault; TWN_SRC_STALE_REF when
 * the bytes there are not one whole item); -1: the object could not be read. */
int twn_src_read_ref(twn_blob *b, const twn_src_ref *ref, const twn_src_opts *o, twn_src_item *it,
                     twn_err *err);

// ------------------------------------------------------------------------------------------------
// To and from twn.proto (STORE_FILE sources)

/* Fills `s` from `u`; s->path points into u->path. */
void twn_src_unit_to_proto(const twn_src_unit *u, Twn__SourceRef *s);
/* Copies a STORE_FILE JSONL/TAR SourceRef into a unit (free u->path with twn_free). */
int twn_src_unit_from_proto(uint64_t unit_id, const Twn__SourceRef *s, twn_src_unit *u,
                            twn_err *err);
/* Fills `r` and `s` (r->source = s) for an item of unit `u`; strings point into u and it. */
void twn_src_ref_to_proto(const twn_src_unit *u, const twn_src_item *it, Twn__ItemRef *r,
                          Twn__SourceRef *s);
/* A ref view of a received ItemRef (strings point into `r`). */
int twn_src_ref_from_proto(const Twn__ItemRef *r, twn_src_ref *out, twn_err *err);

#endif
