/* wal.h — the per-shard write-ahead log: CRC'd, zstd-compressed, group-committed.
 *
 * The indexer appends every received item here before it touches the FAISS index, and acks the
 * coordinator only for sequence numbers the log reports durable.  Appends are cheap (they
 * serialise into a memory buffer); twn_wal_commit compresses what is pending into one block,
 * writes it and fsyncs once, so a batch of thousands of items costs one fsync (group commit).
 * Sequence numbers start at 1 and are contiguous; seq 0 means "nothing".
 *
 * On disk, DIR holds segments named "%020llu.wal" after the sequence of their first record:
 *
 *   segment header (32 bytes): "TWNWAL\0\1" | u32 version=1 | u32 dim | u64 first_seq |
 *                              u32 0 | u32 crc32c(bytes 0..27)
 *   block header   (32 bytes): "TWBK" | u32 flags (bit 0: zstd) | u32 stored_len | u32 raw_len |
 *                              u64 first_seq | u32 nrec | u32 crc32c(header bytes 0..27 + payload)
 *   block payload: stored_len bytes; once decompressed, raw_len bytes = nrec records:
 *   record         (24 bytes + id + 4*dim): u8 type=1 (put) | u8 route | u16 id_len |
 *                              u32 think_tokens | f32 p_think | u32 dim | i64 faiss_id |
 *                              id bytes | f32 vector[dim]
 *
 * All integers little-endian.  A segment grows until it reaches segment_bytes, then the next
 * block starts a new one (the old one is fsynced first, so only the newest segment can have a
 * torn tail).
 *
 * Recovery (twn_wal_open): every segment is scanned; a block is replayed only when its CRC, its
 * sequence numbers and every record in it check out, so a corrupt record is never applied.  A
 * damaged tail of the newest segment (a crash mid-write, or a flipped bit with no valid block
 * after it) is truncated away and reported as dropped bytes.  Damage followed by valid blocks,
 * or anywhere in an older segment, means acknowledged data was lost: open fails with a message
 * naming the file, offset and sequence numbers, unless opts.repair asks to drop everything from
 * the damage on.
 *
 * Thread safety: append, commit, rotate, trim and the getters may be called from any threads.
 * Commit holds only the I/O lock while it writes and fsyncs, so appends continue meanwhile (with
 * opts.defer_writes they never wait for the disk: index/committer.h). */
#ifndef TWN_INDEX_WAL_H
#define TWN_INDEX_WAL_H

#include <stddef.h>
#include <stdint.h>

#include "index/item.h"
#include "util/err.h"

#define TWN_WAL_SEGMENT_BYTES (64u << 20) /* default rotation size */
#define TWN_WAL_BLOCK_BYTES   (1u << 20)  /* default raw bytes buffered before a block is written */
#define TWN_WAL_MAX_BLOCK     (64u << 20) /* largest stored or raw block a reader accepts */
#define TWN_WAL_MAX_DIM       65536
#define TWN_WAL_HEADER        32
#define TWN_WAL_BLOCK_HEADER  32
#define TWN_WAL_REC_HEADER    24
#define TWN_WAL_DEFER_MAX     (32u << 20) /* pending bytes that make a deferred append write */

typedef struct twn_wal twn_wal;

struct twn_wal_rec;
/* Told about each record once it is durable (twn_wal_opts.on_durable). */
typedef void (*twn_wal_durable_fn)(void *ctx, const struct twn_wal_rec *rec);

typedef struct {
    uint32_t dim;           /* vector length; every segment and record must match */
    uint64_t segment_bytes; /* 0 = TWN_WAL_SEGMENT_BYTES */
    uint32_t block_bytes;   /* 0 = TWN_WAL_BLOCK_BYTES; also flushed by every commit */
    int zstd_level;         /* 0 = 1 (fast; float vectors compress little whatever the level) */
    uint64_t after_seq;     /* replay only seq > after_seq (what a snapshot already holds); the
                               next append gets at least after_seq + 1 */
    int repair;             /* drop mid-log damage (and everything after it) instead of failing */
    /* Appends do no I/O: every write happens in twn_wal_commit, which cuts what is pending into
     * blocks of about block_bytes (for a writer thread that commits while others append).  An
     * append writes inline only once TWN_WAL_DEFER_MAX (or 2 x block_bytes) is pending, which
     * bounds the buffer when commits fall behind. */
    int defer_writes;
    /* Called for every record once it is on stable storage, in seq order: by twn_wal_commit
     * (and close) after the fsync that made it durable, before returning, on the committing
     * thread with the I/O lock held (so it may wait: appends go on); and by twn_wal_open for each
     * replayed record (seq > after_seq), each segment being fsynced before it is read.  NULL:
     * none. */
    twn_wal_durable_fn on_durable;
    void *on_durable_ctx;
} twn_wal_opts;

/* One replayed (or durable) record; pointers are valid only during the callback. */
typedef struct twn_wal_rec {
    uint64_t seq;
    int64_t faiss_id;
    twn_index_item item;
} twn_wal_rec;

/* Replay callback: return 0, or -1 with err set to abort the open. */
typedef int (*twn_wal_apply_fn)(void *ctx, const twn_wal_rec *rec, twn_err *err);

typedef struct {
    uint64_t replayed;        /* records passed to the callback (seq > after_seq) */
    uint64_t first_seq;       /* first seq present in the log (0 when empty) */
    uint64_t last_seq;        /* last good seq in the log (0 when empty) */
    uint64_t dropped_bytes;   /* torn / corrupt tail (or repaired damage) removed */
    int segments;             /* segment files kept */
    char dropped_reason[256]; /* why bytes were dropped ("" when none) */
} twn_wal_replay_info;

typedef struct {
    uint64_t appended, blocks, commits, fsyncs, raw_bytes, written_bytes;
    double fsync_seconds, fsync_max_seconds;
    uint64_t last_seq, durable_seq;
    int segments;
} twn_wal_stats;

/* Opens (creating DIR if needed) and replays the log into fn (which may be NULL). */
int twn_wal_open(const char *dir, const twn_wal_opts *opts, twn_wal_apply_fn fn, void *ctx,
                 twn_wal **out, twn_wal_replay_info *info, twn_err *err);

/* Buffers one record (validated with twn_item_check) and returns its sequence number in *seq.
 * Not durable until a commit covers it. */
int twn_wal_append(twn_wal *w, int64_t faiss_id, const twn_index_item *it, uint64_t *seq,
                   twn_err *err);

/* Same, for callers that already validated the item with twn_item_check (the shard checks whole
 * batches before logging any of them). */
int twn_wal_append_valid(twn_wal *w, int64_t faiss_id, const twn_index_item *it, uint64_t *seq,
                         twn_err *err);

/* Writes what is pending as one block and fsyncs; *durable (may be NULL) = the highest seq now
 * on stable storage.  After an I/O error the log refuses further appends and commits with the
 * original message (reopen to recover). */
int twn_wal_commit(twn_wal *w, uint64_t *durable, twn_err *err);

uint64_t twn_wal_durable_seq(twn_wal *w);
uint64_t twn_wal_last_seq(twn_wal *w); /* last appended */
void twn_wal_get_stats(twn_wal *w, twn_wal_stats *st);

/* Commits, then makes the next block start a new segment (used before a snapshot trims). */
int twn_wal_rotate(twn_wal *w, twn_err *err);

/* Deletes segments whose every record has seq <= upto (never the active one). */
int twn_wal_trim(twn_wal *w, uint64_t upto, twn_err *err);

/* Commits what is pending and closes.  Frees w even on error. */
int twn_wal_close(twn_wal *w, twn_err *err);

// ------------------------------------------------------------------------------------------------
// Segment parsing (exposed for the fuzz target and the tests)

enum {
    TWN_WAL_SCAN_CLEAN = 0,  /* every byte belongs to a good block */
    TWN_WAL_SCAN_TORN,       /* bad bytes at the end, no valid block after them */
    TWN_WAL_SCAN_CORRUPT,    /* a bad block followed by a valid one */
    TWN_WAL_SCAN_BAD_HEADER, /* short or corrupt segment header */
    TWN_WAL_SCAN_WRONG_DIM   /* a good header whose dim is not the expected one */
};

typedef struct {
    int status;
    uint32_t dim;
    uint64_t first_seq, next_seq; /* header's first seq; seq after the last good record */
    uint64_t records, blocks;
    size_t good_end;      /* [0, good_end) = header + good blocks */
    size_t bad_offset;    /* where the first problem starts (== good_end) */
    size_t resume_offset; /* CORRUPT: offset of the next valid block */
    char reason[200];     /* the first problem, "" when clean */
} twn_wal_scan;

/* Scans one segment held in memory.  dim 0 accepts the header's dim.  Good records are passed
 * to fn (if not NULL) block by block, each block only after all of it validated.  Returns 0 with
 * the outcome in *res, or -1 when fn failed (err set by fn). */
int twn_wal_scan_segment(const void *data, size_t n, uint32_t dim, twn_wal_apply_fn fn, void *ctx,
                         twn_wal_scan *res, twn_err *err);

/* Writes a segment header for first_seq into hdr (for tests that craft segments). */
void twn_wal_encode_header(unsigned char hdr[TWN_WAL_HEADER], uint32_t dim, uint64_t first_seq);

#endif
