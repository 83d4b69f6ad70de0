/* progress_view.h — the progress display of a running job (DESIGN.md §5): a bar with rate and
 * ETA when stderr is a terminal, plain periodic log lines otherwise (so CI logs and journald get
 * one line every few seconds, never a wall of carriage returns).
 *
 * It only reads the metrics registry (the coordinator's twn_items_total, twn_job_items,
 * twn_job_units, twn_items_per_second), so it works wherever a coordinator runs in the process.
 * Lines go through util/log.h, so `log.format: json` makes them JSON lines too. */
#ifndef TWN_COMMON_PROGRESS_VIEW_H
#define TWN_COMMON_PROGRESS_VIEW_H

#include <stdio.h>

#include "common/metrics.h"
#include "util/err.h"
#include "util/vec.h"

typedef enum { TWN_PVIEW_OFF, TWN_PVIEW_BAR, TWN_PVIEW_LINES } twn_pview_mode;

/* "auto" (bar when `tty`, else lines), "bar", "lines" or "off"; fails naming the value. */
int twn_pview_mode_parse(const char *s, int tty, twn_pview_mode *out, twn_err *err);

typedef struct twn_pview_snap {
    double items_done, items_total, units_done, units_total;
    double easy, hard, rejected;
    double rate;      /* items/s */
    double elapsed_s; /* since the display started */
} twn_pview_snap;

void twn_pview_snap_get(twn_metrics *m, double elapsed_s, twn_pview_snap *s);
/* Appends one line (no newline): the bar form when bar != 0, else the plain form. */
void twn_pview_format(const twn_pview_snap *s, int bar, twn_str *out);
/* "1h02m03s", "4m05s", "7s"; "?" when not finite or negative. */
void twn_pview_duration(double s, char buf[32]);

typedef struct twn_pview twn_pview;

/* Starts a thread that shows the progress of m every interval_s (bar: redrawn in place on f;
 * lines: twn_info).  NULL for TWN_PVIEW_OFF. */
twn_pview *twn_pview_start(twn_metrics *m, twn_pview_mode mode, double interval_s, FILE *f);
/* Shows the final state once more (the bar then ends its line) and stops; NULL is fine. */
void twn_pview_stop(twn_pview *p);

#endif
