/* mem.h — the one allocation wrapper.
 *
 * Small bookkeeping allocations abort on failure (there is nothing sensible to do when a 100-byte
 * malloc fails).  Large buffers whose size comes from input (tensors, images, KV caches) use
 * twn_try_alloc so the caller can report "cannot allocate 12 GiB for <what>" as an ordinary error.
 */
#ifndef TWN_UTIL_MEM_H
#define TWN_UTIL_MEM_H

#include <stddef.h>

void *twn_malloc(size_t n);
void *twn_calloc(size_t count, size_t size);
void *twn_realloc(void *p, size_t n);
char *twn_strdup(const char *s);
char *twn_strndup(const char *s, size_t n);
void twn_free(void *p);

/* 64-byte aligned, NULL on failure (no abort).  Free with twn_free. */
void *twn_try_alloc(size_t n);
void *twn_try_calloc(size_t count, size_t size);

/* count*size with overflow check: returns 0 and sets *out, or -1 on overflow. */
int twn_mul_size(size_t count, size_t size, size_t *out);

#endif
