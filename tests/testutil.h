/* testutil.h — helpers shared by the unit tests (cmocka). */
#ifndef TWN_TESTS_TESTUTIL_H
#define TWN_TESTS_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

/* A fresh empty directory under $TWN_TEST_TMP (or /tmp) named after `tag`; returned string is
 * static storage owned by the helper until the next call with the same tag. */
const char *tu_tmpdir(const char *tag);
/* Writes bytes to a file (asserts on failure). */
void tu_write(const char *path, const void *data, size_t n);
/* Reads a whole file (asserts on failure); free with free(). */
char *tu_read(const char *path, size_t *n);
/* Runs a shell command, returns its exit status; stdout+stderr captured into *out (free()) if
 * out != NULL. */
int tu_run(const char *cmd, char **out);
/* Max |a-b| / max(|b|, floor) over n elements. */
double tu_max_rel(const float *a, const float *b, size_t n, double floor);
double tu_max_abs(const float *a, const float *b, size_t n);
/* Builds (once per process) the tiny test checkpoint with `twn mkmodel` and returns its directory.
 */
const char *tu_tiny_model(void);

#endif
