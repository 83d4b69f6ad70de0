/* journal.h — the coordinator's append-only, fsync'd journal of state transitions.
 *
 * DESIGN.md §3 principle 5: the coordinator restarts from durable state only.  Per-item acks are
 * NOT journaled: the index shard's WAL is their durable home, and a unit that was not journaled
 * done is simply processed again after a restart (the index is idempotent).  What must survive:
 *
 *   JOB_START     the plan fingerprint: sources, unit size, model manifest hash (first record)
 *   RESUME        each later open, with its epoch (lease ids stay unique across restarts)
 *   UNIT_DONE     a unit whose every item is durably acked or dead-lettered, with its counts
 *   DEAD_LETTER   (unit, item, stage, reason): a poison item is not retried forever
 *   HARD_ROUTED   (unit, items) sent to reasoning: resumed after a restart without a gate pass
 *   JOB_FINISHED  the final counts
 *
 * File format, little-endian:
 *   header  8 bytes "TWNJRNL1"
 *   record  u32 len | u32 crc32c(payload) | payload (len bytes) = u8 type | body
 *   bodies  JOB_START    u64 unit_size | u32 n | sources[n] | u32 m | model_hash[m]
 *           RESUME       u32 epoch
 *           UNIT_DONE    u64 unit | u32 n_items | u32 easy | u32 hard | u32 dead | u64 think
 *           DEAD_LETTER  u64 unit | u32 item | u8 stage | u16 n | reason[n]
 *           HARD_ROUTED  u64 unit | u32 n | n items as zigzag LEB128 deltas (first from 0)
 *           JOB_FINISHED u64 units | items | easy | hard | rejected | think_tokens
 * A new journal (header + JOB_START) is written to a temporary file, fsync'd and renamed into
 * place, so a journal file always starts complete.  Records are buffered and written with one
 * write + fdatasync per group (group commit); nothing is durable before twn_journal_commit
 * returns.  Replay stops at the first record that is incomplete, has an impossible length or a bad
 * CRC: a torn tail (a crash mid-write), which open truncates and reports.  A record whose CRC is
 * right but whose body cannot be decoded is corruption (or a newer format) and is refused.
 *
 * A failed write or fsync poisons the journal: after it every call fails with the first error
 * (retrying an fsync after EIO can report success for lost data).
 *
 * Size: 41 bytes per unit, ~1-2 bytes per hard item, ~30 bytes + reason per dead letter; replay
 * maps the file rather than reading it into memory.  A stream (kafka.streaming) would grow it
 * forever, so it compacts it (twn_journal_compact): the records of units whose offsets are
 * committed are dropped; JOB_START, one RESUME with the current epoch and the kept records are
 * written to a temporary file, fsync'd and renamed over the journal (the same path as creation),
 * so a crash at any point leaves either the old or the new journal, both complete. */
#ifndef TWN_COORDINATOR_JOURNAL_H
#define TWN_COORDINATOR_JOURNAL_H

#include <stddef.h>
#include <stdint.h>

#include "coordinator/units.h"
#include "util/err.h"

#define TWN_JOURNAL_MAGIC      "TWNJRNL1"
#define TWN_JOURNAL_HEADER     8
#define TWN_JOURNAL_MAX_RECORD (1u << 20)   /* payload bytes; longer lengths are a torn tail */
#define TWN_JOURNAL_MAX_STRING (256u << 10) /* sources / model hash in JOB_START */
#define TWN_JOURNAL_MAX_REASON 1024u        /* dead-letter reasons are cut to this */
#define TWN_JOURNAL_MAX_HARD   65536u       /* items per HARD_ROUTED record (more: split) */
#define TWN_JOURNAL_MAX_EPOCH  0x7fffu      /* opens of one journal (lease ids hold 15 bits) */

/* The plan a journal belongs to.  A restart with a different fingerprint is refused. */
typedef struct twn_plan_fp {
    const char *sources;    /* canonical source list, e.g. newline-separated paths / URIs */
    uint64_t unit_size;     /* items (or bytes) per unit, as the planner used it */
    const char *model_hash; /* hash of the model manifest */
} twn_plan_fp;

/* Where an item failed. */
typedef enum {
    TWN_STAGE_READ = 1,   /* reading / parsing the item from its source */
    TWN_STAGE_GATE = 2,   /* gate pass (includes unit leases that expired too often) */
    TWN_STAGE_REASON = 3, /* CoT + embedding pass (includes hard batches that expired too often) */
    TWN_STAGE_INDEX = 4   /* the index shard refused it */
} twn_stage;
#define TWN_STAGE_MAX 4
/* "read", "gate", "reason", "index"; "?" otherwise. */
const char *twn_stage_name(twn_stage s);

typedef enum {
    TWN_JREC_JOB_START = 1,
    TWN_JREC_RESUME = 2,
    TWN_JREC_UNIT_DONE = 3,
    TWN_JREC_DEAD_LETTER = 4,
    TWN_JREC_HARD_ROUTED = 5,
    TWN_JREC_JOB_FINISHED = 6
} twn_jrec_type;

/* Final counts of a job. */
typedef struct twn_job_counts {
    uint64_t units, items, easy, hard, rejected, think_tokens;
} twn_job_counts;

/* One replayed record.  Pointers are valid only during the callback. */
typedef struct twn_jrec {
    twn_jrec_type type;
    uint64_t offset;        /* of the record in the file */
    twn_plan_fp fp;         /* JOB_START (NUL-terminated copies) */
    uint32_t epoch;         /* RESUME */
    uint64_t unit;          /* UNIT_DONE, DEAD_LETTER, HARD_ROUTED: unit key */
    twn_unit_counts counts; /* UNIT_DONE */
    uint32_t item;          /* DEAD_LETTER */
    twn_stage stage;        /* DEAD_LETTER */
    const char *reason;     /* DEAD_LETTER, NUL-terminated */
    const uint32_t *items;  /* HARD_ROUTED */
    size_t n_items;         /* HARD_ROUTED */
    twn_job_counts job;     /* JOB_FINISHED */
} twn_jrec;

/* Called for each record in file order; returning -1 (with err set) stops the replay. */
typedef int (*twn_jrec_fn)(void *ctx, const twn_jrec *r, twn_err *err);

typedef struct twn_journal_cfg {
    double group_commit_s;     /* 0.005: longest a record waits in the buffer (see maybe_commit) */
    size_t group_commit_bytes; /* 1 MiB: a buffer this full is committed at once */
    int fsync;                 /* 1: fdatasync each commit (0 only for benchmarks of the rest) */
} twn_journal_cfg;

void twn_journal_cfg_default(twn_journal_cfg *cfg);

/* What open / replay found. */
typedef struct twn_journal_info {
    int created;           /* the file did not exist (or was empty) and was created */
    uint64_t records;      /* valid records replayed, JOB_START included */
    uint32_t epoch;        /* this run's epoch: 1 for a new journal, then one more per open
                              (at most TWN_JOURNAL_MAX_EPOCH) */
    int finished;          /* a JOB_FINISHED record was replayed */
    uint64_t valid_bytes;  /* header + valid records */
    uint64_t torn_bytes;   /* bytes after them that were dropped (0: clean tail) */
    char torn_reason[160]; /* why the tail was dropped, e.g. "record at offset 120: CRC mismatch" */
} twn_journal_info;

typedef struct twn_journal twn_journal;

/* Opens the journal at path for this plan, creating it when missing (or empty).  An existing
 * journal is replayed through fn (may be NULL), its fingerprint compared with fp (a mismatch
 * fails naming the field and both values), a torn tail truncated (reported in info), and a
 * RESUME record written and fsync'd before returning. */
int twn_journal_open(const char *path, const twn_plan_fp *fp, const twn_journal_cfg *cfg,
                     twn_jrec_fn fn, void *ctx, twn_journal **out, twn_journal_info *info,
                     twn_err *err);

/* Replays bytes as a journal named `name` (in messages) without touching any file: the records
 * go to fn; fp (may be NULL) is checked against JOB_START.  A torn tail is not an error (info says
 * where the valid part ends).  Used by open, tests and the fuzzer. */
int twn_journal_replay_mem(const void *data, size_t n, const char *name, const twn_plan_fp *fp,
                           twn_jrec_fn fn, void *ctx, twn_journal_info *info, twn_err *err);

/* Appends (buffered; durable after the next commit).  Fail only on a poisoned journal. */
int twn_journal_unit_done(twn_journal *j, uint64_t unit, const twn_unit_counts *c, twn_err *err);
int twn_journal_dead_letter(twn_journal *j, uint64_t unit, uint32_t item, twn_stage stage,
                            const char *reason, twn_err *err);
int twn_journal_hard_routed(twn_journal *j, uint64_t unit, const uint32_t *items, size_t n,
                            twn_err *err);
int twn_journal_job_finished(twn_journal *j, const twn_job_counts *c, twn_err *err);

/* Writes and fsyncs everything buffered (a no-op when nothing is). */
int twn_journal_commit(twn_journal *j, twn_err *err);
/* Commits when records have been buffered for group_commit_s, as seen by successive calls (the
 * caller's poll loop calls this every millisecond or so).  Appends themselves commit once the
 * buffer holds group_commit_bytes.  *committed (may be NULL) says whether it did. */
int twn_journal_maybe_commit(twn_journal *j, double now, int *committed, twn_err *err);
/* Records appended so far / made durable so far (monotonic sequence numbers, from 1). */
uint64_t twn_journal_appended(const twn_journal *j);
uint64_t twn_journal_durable(const twn_journal *j);
size_t twn_journal_buffered_bytes(const twn_journal *j);
uint64_t twn_journal_commits(const twn_journal *j);
const char *twn_journal_path(const twn_journal *j);

/* Decides which records compaction keeps (UNIT_DONE, DEAD_LETTER, HARD_ROUTED, JOB_FINISHED):
 * 1 keeps r.  JOB_START is always kept and RESUME records are replaced by one. */
typedef int (*twn_jkeep_fn)(void *ctx, const twn_jrec *r);
/* Commits, then rewrites the journal with JOB_START, RESUME(this run's epoch) and the records
 * keep() accepts, in their order ("<path>.tmp", fsync, rename, fsync of the directory); appends
 * go to the new file afterwards.  A failure before the rename leaves the old journal in use
 * (-1, not poisoned); one after it poisons the journal.  *kept (may be NULL): records kept. */
int twn_journal_compact(twn_journal *j, twn_jkeep_fn keep, void *ctx, uint64_t *kept, twn_err *err);
/* Bytes of the journal: the file's plus what is buffered. */
uint64_t twn_journal_bytes(const twn_journal *j);

/* Commits, closes and frees.  Returns the commit's status; j is freed either way. */
int twn_journal_close(twn_journal *j, twn_err *err);
/* Closes WITHOUT committing the buffer, as a kill -9 would leave the file (tests). */
void twn_journal_abandon(twn_journal *j);

#endif
