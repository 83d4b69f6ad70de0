/* metrics.h — a process-wide metrics registry and its Prometheus text exposition (format 0.0.4).
 *
 * The roles of `twn run` are threads of one process, so one registry per process
 * (twn_metrics_default) is shared by all of them; series that must stay apart carry a label
 * (role="gate", shard="3").  Handles are looked up once (get-or-create under a mutex) and then
 * updated lock-free with atomics, so instrumenting a hot loop costs an atomic add.  Every update
 * function accepts a NULL handle and does nothing: code that runs without metrics passes NULL.
 *
 * Rendering takes a consistent-enough snapshot without stopping writers: a histogram's _count is
 * the sum of the bucket counts read in the same pass, so `+Inf` bucket == _count always holds.
 * Families are printed sorted by name and series by their label string, so output is stable.
 *
 * The metrics twn exports (all names start with twn_; labels in braces).  A deploy helper builds
 * the Grafana dashboard from this list: keep it in sync with the code.
 *
 *   coordinator (coordinator/service.c)
 *   twn_items_total{route}               counter  items finished, by route: easy | hard | rejected
 *                                                 (rejected == dead-lettered; durable acks only)
 *   twn_job_items                        gauge    items in the planned units of the job
 *   twn_job_units{state}                 gauge    units of the job: state = total | done
 *   twn_job_start_time_seconds           gauge    unix time the coordinator started the job
 *   twn_job_end_time_seconds             gauge    unix time every unit was done (0 while running)
 *   twn_items_per_second                 gauge    finished items per second over the last ~5 s
 *   twn_think_tokens_total               counter  CoT tokens generated for the finished hard items
 *   twn_think_tokens_saved               gauge    estimated CoT tokens saved vs always-think:
 *                                                 mean think tokens of the hard items so far
 *                                                 times the easy items (what always-think would
 *                                                 have spent on them); 0 until a hard item is done
 *   twn_lease_expiries_total{lease}      counter  leases that expired: lease = unit | hard
 *   twn_leases_active{lease}             gauge    leases currently held: lease = unit | hard
 *   twn_queue_depth{queue}               gauge    work waiting for a lease: queue = units (units
 *                                                 not yet leased) | hard (hard items waiting for
 *                                                 a reasoning worker)
 *   twn_shard_acked_items_total{shard}   counter  items acked durably by each index shard
 *   twn_dead_letters_total{stage}        counter  dead-lettered items by stage: read | gate |
 *                                                 reason | index (leases that expired too often
 *                                                 count under gate / reason)
 *
 *   gate service and reasoning worker (gate_service/gate.c, worker/worker.c)
 *   twn_batch_size{role}                 histogram items per engine call: role = gate | worker
 *   twn_stage_seconds{stage}             histogram seconds per batch in a stage: stage = read
 *                                                 (items read from the source), gate (gate
 *                                                 pass), reason (CoT + embedding pass), send
 *                                                 (outputs flushed to shards / coordinator)
 *   twn_p_think                          histogram gate probabilities of the items the gate saw
 *   twn_gate_routed_total{route}         counter  the gate's routing decisions: easy | hard |
 *                                                 rejected
 *   twn_gate_batches_total               counter  gate passes (filled across held unit leases)
 *   twn_gate_batch_items_total           counter  items in them (/ passes: the batch fill)
 *
 *   indexer (index/service.c)
 *   twn_wal_fsync_seconds{shard}         histogram seconds per group commit (WAL write + fsync)
 *   twn_index_vectors_added_total{shard} counter  vectors appended to the shard
 *   twn_index_pending_acks{shard}        gauge    vectors added but not yet durable + acked
 *   twn_index_rejected_items_total{shard} counter items of batches the shard refused
 */
#ifndef TWN_COMMON_METRICS_H
#define TWN_COMMON_METRICS_H

#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

#include "util/err.h"
#include "util/vec.h"

typedef struct twn_metrics twn_metrics;
typedef struct twn_counter twn_counter;
typedef struct twn_gauge twn_gauge;
typedef struct twn_histogram twn_histogram;

typedef enum { TWN_METRIC_COUNTER, TWN_METRIC_GAUGE, TWN_METRIC_HISTOGRAM } twn_metric_type;

twn_metrics *twn_metrics_new(void);
void twn_metrics_free(twn_metrics *m);
/* The process's registry (created on first use, never freed). */
twn_metrics *twn_metrics_default(void);

/* Get-or-create the series `name{labels}`.  labels is "" / NULL or "key=value,key=value" (values
 * may hold any byte but ',' ; they are escaped on output).  help is used when the family is
 * created.  NULL with err on a bad name or label, or when the family exists with another type
 * (or, for histograms, other buckets).  bounds: n_bounds strictly increasing finite upper bounds;
 * the +Inf bucket is implicit. */
twn_counter *twn_metrics_counter(twn_metrics *m, const char *name, const char *help,
                                 const char *labels, twn_err *err);
twn_gauge *twn_metrics_gauge(twn_metrics *m, const char *name, const char *help, const char *labels,
                             twn_err *err);
twn_histogram *twn_metrics_histogram(twn_metrics *m, const char *name, const char *help,
                                     const char *labels, const double *bounds, size_t n_bounds,
                                     twn_err *err);

/* Bucket sets used by twn's histograms. */
extern const double twn_buckets_seconds[14]; /* 0.0005 s .. 60 s */
extern const double twn_buckets_batch[11];   /* 1, 2, 4, .. 1024 items */
extern const double twn_buckets_p[10];       /* 0.1, 0.2, .. 1.0 */
#define TWN_BUCKETS(b) (b), (sizeof(b) / sizeof *(b))

/* Updates; all accept NULL and are safe from any thread. */
void twn_counter_add(twn_counter *c, uint64_t n);
static inline void twn_counter_inc(twn_counter *c) {
    twn_counter_add(c, 1);
}
void twn_gauge_set(twn_gauge *g, double v);
void twn_gauge_add(twn_gauge *g, double d);
void twn_histogram_observe(twn_histogram *h, double v);

uint64_t twn_counter_value(const twn_counter *c);
double twn_gauge_value(const twn_gauge *g);

/* The value of one series: a counter or gauge's value, a histogram's count.  0 when found, -1
 * when there is no such series (v untouched). */
int twn_metrics_get(twn_metrics *m, const char *name, const char *labels, double *v);
/* The sum of every series of a family (0 for an unknown family). */
double twn_metrics_sum(twn_metrics *m, const char *name);

/* Calls visit(ctx, labels, value) for each series of the family `name` (value as in
 * twn_metrics_get), in label-string order.  Runs under the registry's lock: visit must not call
 * back into the registry. */
typedef void (*twn_metrics_visit)(void *ctx, const char *labels, double value);
void twn_metrics_foreach(twn_metrics *m, const char *name, twn_metrics_visit visit, void *ctx);

/* Appends the Prometheus text exposition (version 0.0.4) of every family to out. */
void twn_metrics_render(twn_metrics *m, twn_str *out);
/* Appends a JSON array of families:
 *   [{"name":..,"type":"counter|gauge|histogram","help":..,"series":[
 *       {"labels":{"k":"v"},"value":N} | {"labels":{..},"le":[..],"buckets":[cumulative..],
 *        "sum":S,"count":C}]}] */
void twn_metrics_render_json(twn_metrics *m, twn_str *out);
/* The same array as a jansson value (the caller owns it). */
json_t *twn_metrics_json(twn_metrics *m);

/* A JSON number for v: an integer when v is integral (and below 1e15), null when not finite. */
json_t *twn_json_number(double v);
/* Compact, keys in insertion order, reals with 15 significant digits (0.1 stays "0.1"). */
#define TWN_JSON_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(15))
/* Appends json_dumps(j, TWN_JSON_FLAGS) to out and releases j. */
void twn_json_append(twn_str *out, json_t *j);

/* The Content-Type of twn_metrics_render's output. */
#define TWN_METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

#endif
