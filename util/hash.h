/* hash.h — a stable 64-bit hash and a string-keyed hash map.
 *
 * twn_hash64 is part of the on-disk contract (shard = twn_hash64(id) mod S), so it must never
 * change: it is 64-bit FNV-1a followed by the splitmix64 finalizer for avalanche.
 *
 * twn_strmap maps byte strings to int64 values with open addressing; keys are copied.  It is
 * what the tokenizer uses for its 150k-entry vocabulary and merge tables, so lookups take a
 * (pointer, length) pair and never need a NUL-terminated copy. */
#ifndef TWN_UTIL_HASH_H
#define TWN_UTIL_HASH_H

#include <stddef.h>
#include <stdint.h>

uint64_t twn_hash64(const void *data, size_t n);

typedef struct twn_strmap twn_strmap;

twn_strmap *twn_strmap_new(size_t expected);
void twn_strmap_free(twn_strmap *m);
/* Inserts or overwrites. */
void twn_strmap_put(twn_strmap *m, const char *key, size_t klen, int64_t value);
/* Returns 1 and sets *value when found, 0 otherwise. */
int twn_strmap_get(const twn_strmap *m, const char *key, size_t klen, int64_t *value);
size_t twn_strmap_count(const twn_strmap *m);

#endif
