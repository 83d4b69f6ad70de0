/* err.h — how every fallible twn function reports failure.
 *
 * A function that can fail returns int (0 on success, -1 on failure) and takes a `twn_err *` as
 * its last argument.  On failure it fills the message with what went wrong, naming the file, item
 * or key and the offending value, so the caller can print it unchanged.  Nothing deep inside a
 * library prints and exits.  A NULL `twn_err *` is allowed: the message is then dropped. */
#ifndef TWN_UTIL_ERR_H
#define TWN_UTIL_ERR_H

#include <stddef.h>

#define TWN_ERR_MAX 1024

typedef struct twn_err {
    char msg[TWN_ERR_MAX];
} twn_err;

/* Sets the message (printf-style) and returns -1, so `return twn_err_set(err, ...)` reads well. */
int twn_err_set(twn_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefixes context to an existing message: "loading base/config.json: " + old message.  Returns -1.
 */
int twn_err_wrap(twn_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Sets the message from errno: "<what>: <strerror(errno)>".  Returns -1. */
int twn_err_errno(twn_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static inline void twn_err_clear(twn_err *err) {
    if (err) err->msg[0] = 0;
}

#endif
