/* observe.c — the metrics server and progress display of a twn process (observe.h). */
#include "cli/observe.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "coordinator/status.h"
#include "util/clock.h"
#include "util/log.h"

int twn_cli_observe_start(twn_cli_observe *o, const char *prog, const char *listen, int coordinator,
                          const char *progress) {
    memset(o, 0, sizeof *o);
    twn_err err = {{0}};
    twn_pview_mode mode = TWN_PVIEW_OFF;
    if (coordinator && twn_pview_mode_parse(progress, isatty(2), &mode, &err)) {
        fprintf(stderr, "%s: %s\n", prog, err.msg);
        return 2;
    }
    twn_metrics *m = twn_metrics_default();
    if (listen && *listen) {
        int rc = coordinator ? twn_status_http_start(listen, m, &o->http, &err)
                             : twn_metrics_http_start(listen, m, NULL, 0, &o->http, &err);
        if (rc) {
            fprintf(stderr, "%s: metrics.listen: %s\n", prog, err.msg);
            return 1;
        }
        if (coordinator)
            twn_info("%s: status page at %s/ (metrics at %s/metrics)", prog, twn_http_url(o->http),
                     twn_http_url(o->http));
        else
            twn_info("%s: metrics at %s/metrics", prog, twn_http_url(o->http));
    }
    /* Bar: redrawn 5 times a second; lines: one every 5 s. */
    o->view = twn_pview_start(m, mode, mode == TWN_PVIEW_BAR ? 0.2 : 5.0, stderr);
    return 0;
}

void twn_cli_observe_job_done(twn_cli_observe *o) {
    twn_pview_stop(o->view);
    o->view = NULL;
}

void twn_cli_observe_stop(twn_cli_observe *o, double linger_s, volatile int *stop) {
    twn_cli_observe_job_done(o);
    if (o->http && linger_s > 0) {
        double until = twn_now() + linger_s;
        while (twn_now() < until && !(stop && *stop)) usleep(20000);
    }
    twn_http_stop(o->http);
    o->http = NULL;
}
