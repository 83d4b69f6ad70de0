/* committer.h — a shard's group commits on a thread of their own, so that receiving and adding
 * go on while the WAL is written and fsynced.
 *
 * The indexer thread adds batches (twn_shard_add) and calls twn_committer_kick after each.  The
 * committer thread commits (twn_shard_commit: the WAL's write + one fsync) once something was
 * added and commit_ms have passed since its previous commit started, publishes the durable seq
 * and makes twn_committer_fd readable.  The indexer acks only items whose seq <= the durable seq
 * twn_committer_poll returns, i.e. never before their fsync (the exactly-once contract).  Open
 * the shard with wal_defer_writes so that appends never wait for the disk: the WAL then does
 * every write in the commit, on this thread.
 *
 * A failed commit is sticky: the thread stops and twn_committer_poll / twn_committer_stop return
 * its error (the shard must be reopened, which replays the WAL). */
#ifndef TWN_INDEX_COMMITTER_H
#define TWN_INDEX_COMMITTER_H

#include <stdint.h>

#include "common/metrics.h"
#include "index/shard.h"
#include "util/err.h"

typedef struct twn_committer twn_committer;

typedef struct {
    uint64_t commits;      /* commits that found something to do */
    double commit_seconds; /* their time (write + fsync) on the committer thread */
    double max_seconds;    /* the longest one */
} twn_committer_stats;

/* Starts the thread.  fsync_hist (may be NULL) observes each commit's seconds. */
int twn_committer_start(twn_shard *s, double commit_ms, twn_histogram *fsync_hist,
                        twn_committer **out, twn_err *err);

/* Something was added: commit it within commit_ms. */
void twn_committer_kick(twn_committer *c);

/* Readable (an eventfd) after each commit, for poll/zmq_poll; twn_committer_poll clears it. */
int twn_committer_fd(const twn_committer *c);

/* *durable = the highest seq on stable storage.  Returns 1 when a commit completed since the
 * last call (items added before it whose ack seq <= *durable can be acked), 0 when none did,
 * -1 with the error once a commit failed. */
int twn_committer_poll(twn_committer *c, uint64_t *durable, twn_err *err);

void twn_committer_get_stats(twn_committer *c, twn_committer_stats *st);

/* Stops the thread (a commit in progress completes; nothing new starts) and frees c.  Returns
 * -1 with the error when a commit had failed.  NULL is a no-op. */
int twn_committer_stop(twn_committer *c, twn_err *err);

#endif
