/* npy.h — streaming writer of NumPy .npy files (format 1.0), 2-D little-endian arrays.
 *
 * Rows are appended as they are produced; the header is written with room for any row count and
 * rewritten with the final shape on close, so numpy.load reads the file and a crash leaves a file
 * whose header still says 0 rows rather than a wrong count. */
#ifndef TWN_UTIL_NPY_H
#define TWN_UTIL_NPY_H

#include <stdint.h>
#include <stdio.h>

#include "util/err.h"

typedef struct {
    FILE *f;
    char *path;
    const char *descr; /* "<f4", "<f2", "<i8" ... */
    int64_t rows, cols;
    size_t item;
} twn_npy;

int twn_npy_open(twn_npy *w, const char *path, const char *descr, size_t item_size, int64_t cols,
                 twn_err *err);
int twn_npy_append(twn_npy *w, const void *rows, int64_t n, twn_err *err);
int twn_npy_close(twn_npy *w, twn_err *err);

#endif
