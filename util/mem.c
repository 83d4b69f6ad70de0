/* mem.c — allocation wrapper (see mem.h). */
#include "util/mem.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void oom(size_t n) {
    fprintf(stderr, "twn: out of memory allocating %zu bytes\n", n);
    abort();
}

void *twn_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) oom(n);
    return p;
}

void *twn_calloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) oom(count * size);
    return p;
}

void *twn_realloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) oom(n);
    return q;
}

char *twn_strdup(const char *s) {
    return twn_strndup(s, strlen(s));
}

char *twn_strndup(const char *s, size_t n) {
    char *d = twn_malloc(n + 1);
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

void twn_free(void *p) {
    free(p);
}

void *twn_try_alloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) return NULL;
    return p;
}

void *twn_try_calloc(size_t count, size_t size) {
    size_t n;
    if (twn_mul_size(count, size, &n) != 0) return NULL;
    void *p = twn_try_alloc(n);
    if (p) memset(p, 0, n);
    return p;
}

int twn_mul_size(size_t count, size_t size, size_t *out) {
    if (size && count > SIZE_MAX / size) return -1;
    *out = count * size;
    return 0;
}
