/* vec.c — growable arrays (see vec.h). */
#include "util/vec.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "util/mem.h"

static size_t grow(size_t cap, size_t need) {
    size_t c = cap ? cap : 16;
    while (c < need) c *= 2;
    return c;
}

void twn_ivec_push(twn_ivec *a, int32_t x) {
    twn_ivec_append(a, &x, 1);
}

void twn_ivec_append(twn_ivec *a, const int32_t *x, size_t n) {
    if (a->n + n > a->cap) {
        a->cap = grow(a->cap, a->n + n);
        a->v = twn_realloc(a->v, a->cap * sizeof *a->v);
    }
    if (n) memcpy(a->v + a->n, x, n * sizeof *x);
    a->n += n;
}

void twn_ivec_free(twn_ivec *a) {
    twn_free(a->v);
    a->v = NULL;
    a->n = a->cap = 0;
}

void twn_fvec_push(twn_fvec *a, float x) {
    if (a->n + 1 > a->cap) {
        a->cap = grow(a->cap, a->n + 1);
        a->v = twn_realloc(a->v, a->cap * sizeof *a->v);
    }
    a->v[a->n++] = x;
}

void twn_fvec_free(twn_fvec *a) {
    twn_free(a->v);
    a->v = NULL;
    a->n = a->cap = 0;
}

void twn_str_append(twn_str *s, const char *p, size_t n) {
    if (s->n + n + 1 > s->cap) {
        s->cap = grow(s->cap, s->n + n + 1);
        s->v = twn_realloc(s->v, s->cap);
    }
    if (n) memcpy(s->v + s->n, p, n);
    s->n += n;
    s->v[s->n] = 0;
}

void twn_str_puts(twn_str *s, const char *p) {
    twn_str_append(s, p, strlen(p));
}

void twn_str_printf(twn_str *s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0) return;
    if (s->n + (size_t)n + 1 > s->cap) {
        s->cap = grow(s->cap, s->n + (size_t)n + 1);
        s->v = twn_realloc(s->v, s->cap);
    }
    va_start(ap, fmt);
    vsnprintf(s->v + s->n, (size_t)n + 1, fmt, ap);
    va_end(ap);
    s->n += (size_t)n;
}

void twn_str_free(twn_str *s) {
    twn_free(s->v);
    s->v = NULL;
    s->n = s->cap = 0;
}
