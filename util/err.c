/* err.c — error messages with context (see err.h). */
#include "util/err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int twn_err_set(twn_err *err, const char *fmt, ...) {
    if (!err) return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    return -1;
}

int twn_err_wrap(twn_err *err, const char *fmt, ...) {
    if (!err) return -1;
    char prefix[TWN_ERR_MAX / 2], old[TWN_ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof old);
    /* Long chains are truncated at the end; the innermost detail is lost before the context. */
    int n = snprintf(err->msg, sizeof err->msg, "%s: ", prefix);
    if (n > 0 && (size_t)n < sizeof err->msg)
        memcpy(err->msg + n, old, strnlen(old, sizeof err->msg - (size_t)n - 1) + 1),
            err->msg[sizeof err->msg - 1] = 0;
    return -1;
}

int twn_err_errno(twn_err *err, const char *fmt, ...) {
    int e = errno;
    if (!err) return -1;
    char what[TWN_ERR_MAX / 2];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    snprintf(err->msg, sizeof err->msg, "%s: %s", what, strerror(e));
    return -1;
}
