/* status.h — the coordinator's HTTP face: /metrics, the live status page at / and the numbers it
 * polls at /status.json (DESIGN.md §5).
 *
 * Everything is read from the metrics registry the coordinator loop (and, in `twn run`, the other
 * role threads) update, so the page, /status.json, /metrics and `twn status` always agree.  The
 * page itself (status_page.html) is compiled into the binary (coordinator/CMakeLists.txt).
 * In the fleet shape every process exports only its own metrics, so the coordinator's page has
 * the job's numbers (items, units, shards, queues, leases, tokens) and fills the p_think and
 * stage-latency charts only where gates / workers / indexers run in its process (`twn run`);
 * scrape each process's /metrics (Grafana) for those.
 *
 * /status.json:
 *   {"version":1, "time":UNIX_S, "start_time":UNIX_S, "elapsed_s":S (frozen once done),
 *    "done":BOOL,
 *    "units":{"done":N,"total":N},
 *    "items":{"total":N,"done":N,"easy":N,"hard":N,"rejected":N},
 *    "rate":ITEMS_PER_S, "eta_s":S|null, "think_tokens":N, "tokens_saved":N, "dead_letters":N,
 *    "queues":{"units":N,"hard":N},
 *    "leases":{"active_unit":N,"active_hard":N,"expired_unit":N,"expired_hard":N},
 *    "shards":[{"shard":S,"acked":N},...],          (by shard number)
 *    "metrics":[...]}                                (twn_metrics_render_json: every family) */
#ifndef TWN_COORDINATOR_STATUS_H
#define TWN_COORDINATOR_STATUS_H

#include <stddef.h>

#include "common/http.h"
#include "common/metrics.h"
#include "util/err.h"
#include "util/vec.h"

/* The embedded status page (NUL-terminated; _len without the NUL). */
extern const unsigned char twn_status_page_html[];
extern const size_t twn_status_page_html_len;

/* Appends /status.json's document for registry m. */
void twn_status_json(twn_metrics *m, twn_str *out);

/* /metrics, / (and /index.html) and /status.json of registry m on `listen` (http.h). */
int twn_status_http_start(const char *listen, twn_metrics *m, twn_http **out, twn_err *err);

#endif
