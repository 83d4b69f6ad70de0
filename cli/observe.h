/* observe.h — what a twn process shows about itself while it runs (DESIGN.md §5): the metrics
 * HTTP server (metrics.listen; on the coordinator also the status page and /status.json) and,
 * where a coordinator runs, the progress display on stderr (log.progress).  Used by `twn run` and
 * the role commands. */
#ifndef TWN_CLI_OBSERVE_H
#define TWN_CLI_OBSERVE_H

#include "common/http.h"
#include "common/progress_view.h"

typedef struct twn_cli_observe {
    twn_http *http;
    twn_pview *view;
} twn_cli_observe;

/* listen "" or NULL: no server.  coordinator: serve the status page too, and show progress
 * (progress = auto|bar|lines|off; auto = a bar when stderr is a terminal).  Logs the URL
 * ("PROG: metrics at http://127.0.0.1:PORT/metrics").  Returns 0, or 2 (bad progress value) / 1
 * (cannot bind) after printing "PROG: message" to stderr. */
int twn_cli_observe_start(twn_cli_observe *o, const char *prog, const char *listen, int coordinator,
                          const char *progress);
/* The job is over: the progress display shows the final numbers and ends. */
void twn_cli_observe_job_done(twn_cli_observe *o);
/* Keeps the server up linger_s more seconds (so a last scrape sees the final numbers; cut short
 * when *stop becomes non-zero), then stops it. */
void twn_cli_observe_stop(twn_cli_observe *o, double linger_s, volatile int *stop);

#endif
