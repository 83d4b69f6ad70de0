/* source_s3.h — S3 objects as item sources: a twn_blob over ranged GETs, and the planner over an
 * s3:// prefix.
 *
 * Inside units and refs an S3 object is named by its URI, "s3://bucket/key", in the `path` field
 * of twn_src_unit / twn_src_ref; the JSONL and tar planners and readers of source.h then work
 * unchanged through the blob (relative image paths in a JSONL object resolve to s3:// URIs next
 * to it).  On the wire (twn.proto) the same unit is store STORE_S3, bucket, path = the key; the
 * *_proto helpers here convert.
 *
 * The blob reads exactly the bytes asked for (one ranged GET per read_at, resumed on a broken
 * transfer), so a worker re-reading one item by its ref fetches that item's bytes, not the
 * object.  It remembers the object's ETag from the listing (or a HEAD) and fails a read when the
 * object has changed since, naming the old and the new ETag.
 *
 * The blob borrows its client (twn_s3): one client per thread, shared by that thread's blobs so
 * they share its kept-alive connection. */
#ifndef TWN_COMMON_SOURCE_S3_H
#define TWN_COMMON_SOURCE_S3_H

#include "common/s3.h"
#include "common/source.h"

/* An S3 object as a blob.  size/etag from a listing avoid a HEAD: pass etag NULL to HEAD it (then
 * size is ignored).  The blob's name is "s3://bucket/key". */
int twn_blob_open_s3(twn_s3 *s, const char *bucket, const char *key, uint64_t size,
                     const char *etag, twn_blob **out, twn_err *err);
/* Same from a URI ("s3://bucket/key"), with a HEAD. */
int twn_blob_open_s3_uri(twn_s3 *s, const char *uri, twn_blob **out, twn_err *err);

/* Opens a local file or, for "s3://..." paths, an S3 object (s may be NULL for local paths). */
int twn_blob_open_path(twn_s3 *s, const char *path, twn_blob **out, twn_err *err);

/* Plans every object under an s3:// prefix, in key order (objects whose key ends in '/' — the
 * folder markers consoles create — and empty objects are skipped).  fmt TWN_SRC_AUTO picks the
 * format per key (".tar" -> tar, else JSONL).  Unit paths are "s3://bucket/key".  Unit ids start
 * at *next_id, which is advanced; *n_objects (may be NULL) receives the number of objects
 * planned. */
int twn_src_plan_s3(twn_s3 *s, const char *uri, twn_src_format fmt, uint64_t items_per_unit,
                    uint64_t *next_id, twn_src_unit_fn fn, void *user, size_t *n_objects,
                    twn_err *err);

/* Same, collecting the units (appended to *out). */
int twn_src_plan_s3_units(twn_s3 *s, const char *uri, twn_src_format fmt, uint64_t items_per_unit,
                          twn_src_units *out, twn_err *err);

// ------------------------------------------------------------------------------------------------
// twn.proto: STORE_S3 source refs

/* Bucket names are at most 63 bytes: the proto view of a unit keeps its bucket here. */
typedef struct twn_s3_proto_buf {
    char bucket[64];
} twn_s3_proto_buf;

/* Fills `s` for a unit whose path is "s3://bucket/key": STORE_S3, bucket (in *buf), path = the key
 * (pointing into u->path). */
int twn_src_s3_unit_to_proto(const twn_src_unit *u, Twn__SourceRef *s, twn_s3_proto_buf *buf,
                             twn_err *err);
/* A STORE_S3 SourceRef as a unit with path "s3://bucket/key" (free u->path with twn_free). */
int twn_src_s3_unit_from_proto(uint64_t unit_id, const Twn__SourceRef *s, twn_src_unit *u,
                               twn_err *err);
/* Fills `r` and `s` for an item of an S3 unit. */
int twn_src_s3_ref_to_proto(const twn_src_unit *u, const twn_src_item *it, Twn__ItemRef *r,
                            Twn__SourceRef *s, twn_s3_proto_buf *buf, twn_err *err);
/* A ref view of a received STORE_S3 ItemRef; out->path = *path_out = "s3://bucket/key"
 * (twn_free it). */
int twn_src_s3_ref_from_proto(const Twn__ItemRef *r, twn_src_ref *out, char **path_out,
                              twn_err *err);

#endif
