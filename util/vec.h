/* vec.h — growable arrays of ints, floats and bytes (strings).
 *
 * Plain structs with a pointer, a length and a capacity; append functions grow by doubling and
 * abort only on real out-of-memory (see mem.h).  Used for token id lists and text buffers. */
#ifndef TWN_UTIL_VEC_H
#define TWN_UTIL_VEC_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int32_t *v;
    size_t n, cap;
} twn_ivec;

typedef struct {
    float *v;
    size_t n, cap;
} twn_fvec;

/* A byte string, always NUL-terminated after its n bytes (when v != NULL). */
typedef struct {
    char *v;
    size_t n, cap;
} twn_str;

void twn_ivec_push(twn_ivec *a, int32_t x);
void twn_ivec_append(twn_ivec *a, const int32_t *x, size_t n);
void twn_ivec_free(twn_ivec *a);

void twn_fvec_push(twn_fvec *a, float x);
void twn_fvec_free(twn_fvec *a);

void twn_str_append(twn_str *s, const char *p, size_t n);
void twn_str_puts(twn_str *s, const char *p);
void twn_str_printf(twn_str *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void twn_str_free(twn_str *s);
static inline void twn_str_reset(twn_str *s) {
    s->n = 0;
    if (s->v) s->v[0] = 0;
}

#endif
