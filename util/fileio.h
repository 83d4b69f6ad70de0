/* fileio.h — whole-file reads, atomic writes, paths.
 *
 * twn_write_file_atomic writes to "<path>.tmp.<pid>", fsyncs, renames over path and fsyncs the
 * directory, so a reader sees the old file or the new one, never half of one. */
#ifndef TWN_UTIL_FILEIO_H
#define TWN_UTIL_FILEIO_H

#include <stddef.h>

#include "util/err.h"

/* Reads a whole file (up to max_bytes; larger is an error naming the file and both sizes).
 * The buffer is NUL-terminated after *len bytes.  Free with twn_free. */
int twn_read_file(const char *path, size_t max_bytes, char **data, size_t *len, twn_err *err);
int twn_write_file_atomic(const char *path, const void *data, size_t len, twn_err *err);
/* mkdir -p. */
int twn_mkdirs(const char *path, twn_err *err);
/* Joins dir and name with one '/', into a new string (twn_free it).  An absolute name wins. */
char *twn_path_join(const char *dir, const char *name);
/* Directory part of a path ("." when there is none), new string. */
char *twn_path_dirname(const char *path);
int twn_path_exists(const char *path);

#endif
