/* hash.c — FNV-1a + splitmix64 finalizer, and an open-addressing string map (see hash.h). */
#include "util/hash.h"

#include <string.h>

#include "util/mem.h"

uint64_t twn_hash64(const void *data, size_t n) {
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    h ^= h >> 31;
    return h;
}

typedef struct {
    char *key; /* NULL = empty slot */
    size_t klen;
    uint64_t hash;
    int64_t value;
} slot;

struct twn_strmap {
    slot *slots;
    size_t cap, count; /* cap is a power of two; load factor kept <= 1/2 */
};

twn_strmap *twn_strmap_new(size_t expected) {
    twn_strmap *m = twn_calloc(1, sizeof *m);
    m->cap = 16;
    while (m->cap < expected * 2) m->cap *= 2;
    m->slots = twn_calloc(m->cap, sizeof *m->slots);
    return m;
}

void twn_strmap_free(twn_strmap *m) {
    if (!m) return;
    for (size_t i = 0; i < m->cap; i++) twn_free(m->slots[i].key);
    twn_free(m->slots);
    twn_free(m);
}

static slot *find(const twn_strmap *m, const char *key, size_t klen, uint64_t h) {
    size_t mask = m->cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        slot *s = &m->slots[i];
        if (!s->key) return s;
        if (s->hash == h && s->klen == klen && memcmp(s->key, key, klen) == 0) return s;
    }
}

static void grow(twn_strmap *m) {
    slot *old = m->slots;
    size_t oldcap = m->cap;
    m->cap *= 2;
    m->slots = twn_calloc(m->cap, sizeof *m->slots);
    for (size_t i = 0; i < oldcap; i++) {
        if (!old[i].key) continue;
        *find(m, old[i].key, old[i].klen, old[i].hash) = old[i];
    }
    twn_free(old);
}

void twn_strmap_put(twn_strmap *m, const char *key, size_t klen, int64_t value) {
    if ((m->count + 1) * 2 > m->cap) grow(m);
    uint64_t h = twn_hash64(key, klen);
    slot *s = find(m, key, klen, h);
    if (!s->key) {
        s->key = twn_strndup(key, klen);
        s->klen = klen;
        s->hash = h;
        m->count++;
    }
    s->value = value;
}

int twn_strmap_get(const twn_strmap *m, const char *key, size_t klen, int64_t *value) {
    slot *s = find(m, key, klen, twn_hash64(key, klen));
    if (!s->key) return 0;
    if (value) *value = s->value;
    return 1;
}

size_t twn_strmap_count(const twn_strmap *m) {
    return m->count;
}
