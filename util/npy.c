/* npy.c — streaming .npy writer (see npy.h). */
#include "util/npy.h"

#include <string.h>
#include <unistd.h>

#include "util/mem.h"

#define NPY_HEADER 128 /* total header bytes incl. magic; a multiple of 64 */

static int write_header(twn_npy *w, twn_err *err) {
    char dict[NPY_HEADER];
    int n = snprintf(dict, sizeof dict,
                     "{'descr': '%s', 'fortran_order': False, 'shape': (%lld, %lld), }", w->descr,
                     (long long)w->rows, (long long)w->cols);
    int body = NPY_HEADER - 10;
    if (n < 0 || n >= body) return twn_err_set(err, "%s: npy header too long", w->path);
    memset(dict + n, ' ', (size_t)(body - n));
    dict[body - 1] = '\n';
    unsigned char pre[10] = {0x93,
                             'N',
                             'U',
                             'M',
                             'P',
                             'Y',
                             1,
                             0,
                             (unsigned char)(body & 0xff),
                             (unsigned char)(body >> 8)};
    if (fseek(w->f, 0, SEEK_SET) || fwrite(pre, 1, 10, w->f) != 10 ||
        fwrite(dict, 1, (size_t)body, w->f) != (size_t)body)
        return twn_err_errno(err, "cannot write %s", w->path);
    return fseek(w->f, 0, SEEK_END) ? twn_err_errno(err, "cannot seek %s", w->path) : 0;
}

int twn_npy_open(twn_npy *w, const char *path, const char *descr, size_t item_size, int64_t cols,
                 twn_err *err) {
    memset(w, 0, sizeof *w);
    w->f = fopen(path, "wb+");
    if (!w->f) return twn_err_errno(err, "cannot create %s", path);
    w->path = twn_strdup(path);
    w->descr = descr;
    w->item = item_size;
    w->cols = cols;
    return write_header(w, err);
}

int twn_npy_append(twn_npy *w, const void *rows, int64_t n, twn_err *err) {
    size_t bytes = (size_t)n * (size_t)w->cols * w->item;
    if (fwrite(rows, 1, bytes, w->f) != bytes)
        return twn_err_errno(err, "cannot write %s", w->path);
    w->rows += n;
    return 0;
}

int twn_npy_close(twn_npy *w, twn_err *err) {
    int rc = 0;
    if (w->f) {
        rc = write_header(w, err);
        if (fflush(w->f) || fsync(fileno(w->f))) rc = twn_err_errno(err, "cannot sync %s", w->path);
        if (fclose(w->f)) rc = twn_err_errno(err, "cannot close %s", w->path);
    }
    twn_free(w->path);
    memset(w, 0, sizeof *w);
    return rc;
}
