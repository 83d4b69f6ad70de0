/* prefetch.h — reading S3 units ahead (the job config's s3.readers): a process-wide pool of
 * reader threads, each with its own kept-alive S3 client (twn_s3), that fetch the byte range of
 * a leased unit into memory while the role's own thread works on the unit before it.
 *
 * A gate holding several unit leases (gate.credits) hands the ones queued behind the current
 * unit to the pool (twn_prefetch_start); when it gets to such a unit it takes the fetched bytes
 * as a blob (twn_prefetch_take) and reads its items from memory.  With N readers, N units are
 * fetched at once: a job over high-latency storage reads at about N times the rate of one
 * synchronous reader.
 *
 * Memory is bounded: every job reserves the bytes of its window (the unit's range plus what the
 * reader looks at past its end — as much again, 4 KiB..256 KiB — cut to what is left of
 * max_bytes) before it is queued; nothing is queued when less than 64 KiB is left.
 * The reservation is returned when the blob is closed or the job dropped.  A window cut short
 * (a unit larger than what is left) is not an error: the blob reads the rest of the unit from S3
 * itself, through the taking thread's client.
 *
 * Only S3 units are fetched ahead (local files are read where they are, Kafka units by their
 * consumer).  A fetch that fails (an object gone, a changed ETag, S3 down) is not reported here:
 * twn_prefetch_take returns NULL and the caller reads the unit the ordinary way, which names the
 * failure exactly as it would without the pool.
 *
 * Thread-safe: any thread may start, take and drop jobs. */
#ifndef TWN_COMMON_PREFETCH_H
#define TWN_COMMON_PREFETCH_H

#include <stddef.h>
#include <stdint.h>

#include "common/s3.h"
#include "common/source.h"
#include "util/err.h"

/* The default bound on the bytes held by a pool (fetched or being fetched, not yet consumed). */
#define TWN_PREFETCH_MAX_BYTES ((size_t)256 << 20)

typedef struct twn_prefetch twn_prefetch;
typedef struct twn_prefetch_job twn_prefetch_job;

/* Up to readers threads (1..256), each opening its client from cfg (copied; its strings are
 * borrowed and must outlive the pool) on its first job; a thread is started when a job waits and
 * no reader is idle, so an unused pool has none.  At most max_bytes held (0: the default). */
int twn_prefetch_open(const twn_s3_config *cfg, int readers, size_t max_bytes, twn_prefetch **out,
                      twn_err *err);
/* Stops the threads (a fetch under way is finished first).  Every job must have been taken or
 * dropped and every blob closed. */
void twn_prefetch_close(twn_prefetch *p);

/* Queues the fetch of unit u's bytes (u is copied).  NULL when u is not an S3 unit, its range is
 * empty, or the pool's byte bound leaves no room. */
twn_prefetch_job *twn_prefetch_start(twn_prefetch *p, const twn_src_unit *u);

/* Waits up to `seconds` for the job to be fetched (or to fail): 1 when it is, else 0.  Lets the
 * caller do other things meanwhile (a gate queues the leases that arrived while it waited). */
int twn_prefetch_wait(twn_prefetch_job *j, double seconds);

/* Waits for the job and consumes it.  The blob is the unit's object (name "s3://bucket/key", its
 * size and ETag from the fetch) with the window served from memory; reads outside it go to S3
 * through s (the caller's client, which must outlive the blob).  NULL when the fetch failed. */
twn_blob *twn_prefetch_take(twn_prefetch_job *j, twn_s3 *s);

/* Abandons a job of either kind (queued: never fetched; under way: freed when done). */
void twn_prefetch_drop(twn_prefetch_job *j);

// ------------------------------------------------------------------------------------------------
// Whole objects (images named by reference: source_io.h's twn_srcio_fetch_images_n)
//
// An object GET is queued ahead of the unit windows (its caller is waiting for it now, a window
// is for later) and runs on the same readers and clients.  Its bytes count against max_bytes
// while they are being received: a reader reserves the object's Content-Length when the response
// headers come in (twn_s3_get_admit) and waits there while that does not fit, unless no other
// object GET holds a reservation (so one always goes ahead: a caller never waits on room its own
// windows hold).  The reservation ends with the GET; the bytes then belong to the caller.

/* Queues the GET of s3://bucket/key (copied), at most max_bytes (a larger object fails, before
 * its body is read when it announces its size). */
twn_prefetch_job *twn_prefetch_get(twn_prefetch *p, const char *bucket, const char *key,
                                   size_t max_bytes);

/* Waits for a GET and consumes it: 0 with *data (twn_free; *n bytes plus a NUL), or -1 with err
 * exactly as twn_s3_get gives it (or as twn_s3_open does, when the reader has no client). */
int twn_prefetch_take_object(twn_prefetch_job *j, uint8_t **data, size_t *n, twn_err *err);

typedef struct twn_prefetch_stats {
    uint64_t started, fetched, failed, refused; /* jobs */
    uint64_t bytes;                             /* fetched into memory */
    size_t held, held_max;                      /* bytes reserved now / at most so far */
    int busy_max;                               /* most fetches under way at once */
    uint64_t gets, gets_failed, get_bytes;      /* object GETs done / failed / bytes received */
    size_t get_held_max;                        /* most bytes reserved by object GETs at once */
    uint64_t get_waits;                         /* object GETs that waited for room */
    int threads;                                /* reader threads started so far */
} twn_prefetch_stats;
twn_prefetch_stats twn_prefetch_get_stats(twn_prefetch *p);

#endif
