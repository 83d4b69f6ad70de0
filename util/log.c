/* log.c — leveled stderr logging (see log.h).  One fprintf per line so concurrent lines do not
 * interleave mid-line. */
#include "util/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <time.h>

#include "util/vec.h"

static twn_log_level g_level = TWN_LOG_INFO;
static int g_json = 0;

void twn_log_set_level(twn_log_level level) {
    g_level = level;
}
void twn_log_set_json(int json) {
    g_json = json;
}
twn_log_level twn_log_get_level(void) {
    return g_level;
}

static const char *names[] = {"debug", "info", "warn", "error"};

void twn_log(twn_log_level level, const char *fmt, ...) {
    if (level < g_level) return;
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[32];
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    if (!g_json) {
        fprintf(stderr, "%s.%03ldZ %-5s %s\n", when, ts.tv_nsec / 1000000, names[level], msg);
        return;
    }
    twn_str line = {0};
    twn_str_printf(&line, "{\"ts\":\"%s.%03ldZ\",\"level\":\"%s\",\"msg\":\"", when,
                   ts.tv_nsec / 1000000, names[level]);
    for (const char *p = msg; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"' || c == '\\')
            twn_str_printf(&line, "\\%c", c);
        else if (c < 0x20)
            twn_str_printf(&line, "\\u%04x", c);
        else
            twn_str_append(&line, p, 1);
    }
    twn_str_puts(&line, "\"}\n");
    fputs(line.v, stderr);
    twn_str_free(&line);
}
