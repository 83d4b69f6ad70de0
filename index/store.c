/* store.c — a shard's items in memory (see store.h).
 *
 * Column arrays (ids in one byte arena, metadata, one contiguous float16 matrix) rather than a
 * struct per row: the matrix is what the .npy writer and index rebuilds stream, and it is by far
 * the largest part, so it grows with realloc and reports failure instead of aborting. */
#include "index/store.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif
#include <string.h>

#include "util/hash.h"
#include "util/mem.h"

// ------------------------------------------------------------------------------------------------
// float16

float twn_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0)
            u = sign;
        else { /* subnormal: man * 2^-24 */
            float f = ldexpf((float)man, -24);
            memcpy(&u, &f, 4);
            u |= sign;
        }
    } else if (exp == 31)
        u = sign | 0x7f800000u | (man << 13);
    else
        u = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t twn_half_from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow -> inf (RNE boundary) */
    if (a < 0x38800000u) {                                   /* subnormal or zero */
        float af;
        memcpy(&af, &a, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(af * 16777216.0f)); /* 2^24, RNE */
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u; /* rebias 127 -> 15, RNE */
    return (uint16_t)(sign | (r >> 13));
}

/* Bulk conversions: F16C (vcvtps2ph with round-to-nearest-even, vcvtph2ps) where the CPU has
 * it, the scalar functions otherwise.  For finite inputs both give identical bits (RNE, IEEE
 * subnormals, overflow to inf), which twn_store_same relies on; tests compare them. */
static int have_f16c;
static pthread_once_t f16c_once = PTHREAD_ONCE_INIT;

static void probe_f16c(void) {
#if defined(__x86_64__)
    /* clang 14's __builtin_cpu_supports does not know "f16c": ask cpuid (leaf 1, ecx bit 29);
       "avx" also covers the OS saving the ymm state. */
    unsigned a, b, c, d;
    have_f16c = __get_cpuid(1, &a, &b, &c, &d) && (c >> 29 & 1) && __builtin_cpu_supports("avx");
#endif
}

#if defined(__x86_64__)
__attribute__((target("avx,f16c"))) static void to_half_f16c(const float *src, uint16_t *dst,
                                                             size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = twn_half_from_float(src[i]);
}

__attribute__((target("avx,f16c"))) static void to_float_f16c(const uint16_t *src, float *dst,
                                                              size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = twn_half_to_float(src[i]);
}
#endif

void twn_half_from_float_n(const float *src, uint16_t *dst, size_t n, int portable) {
    pthread_once(&f16c_once, probe_f16c);
#if defined(__x86_64__)
    if (have_f16c && !portable) {
        to_half_f16c(src, dst, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; i++) dst[i] = twn_half_from_float(src[i]);
}

void twn_half_to_float_n(const uint16_t *src, float *dst, size_t n, int portable) {
    pthread_once(&f16c_once, probe_f16c);
#if defined(__x86_64__)
    if (have_f16c && !portable) {
        to_float_f16c(src, dst, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; i++) dst[i] = twn_half_to_float(src[i]);
}

// ------------------------------------------------------------------------------------------------
// int64 map

static size_t slot_of(int64_t key, size_t cap) {
    uint64_t x = (uint64_t)key;
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return (size_t)(x & (cap - 1));
}

static void i64map_grow(twn_i64map *m) {
    size_t ncap = m->cap ? 2 * m->cap : 64;
    int64_t *nk = twn_malloc(ncap * sizeof *nk), *nv = twn_malloc(ncap * sizeof *nv);
    for (size_t i = 0; i < ncap; i++) nv[i] = -1;
    for (size_t i = 0; i < m->cap; i++) {
        if (m->vals[i] < 0) continue;
        size_t j = slot_of(m->keys[i], ncap);
        while (nv[j] >= 0) j = (j + 1) & (ncap - 1);
        nk[j] = m->keys[i];
        nv[j] = m->vals[i];
    }
    twn_free(m->keys);
    twn_free(m->vals);
    m->keys = nk;
    m->vals = nv;
    m->cap = ncap;
}

void twn_i64map_put(twn_i64map *m, int64_t key, int64_t val) {
    if (2 * (m->n + 1) > m->cap) i64map_grow(m);
    size_t j = slot_of(key, m->cap);
    while (m->vals[j] >= 0 && m->keys[j] != key) j = (j + 1) & (m->cap - 1);
    if (m->vals[j] < 0) m->n++;
    m->keys[j] = key;
    m->vals[j] = val;
}

int64_t twn_i64map_get(const twn_i64map *m, int64_t key) {
    if (!m->cap) return -1;
    size_t j = slot_of(key, m->cap);
    while (m->vals[j] >= 0) {
        if (m->keys[j] == key) return m->vals[j];
        j = (j + 1) & (m->cap - 1);
    }
    return -1;
}

void twn_i64map_clear(twn_i64map *m) {
    for (size_t i = 0; i < m->cap; i++) m->vals[i] = -1;
    m->n = 0;
}

void twn_i64map_free(twn_i64map *m) {
    twn_free(m->keys);
    twn_free(m->vals);
    memset(m, 0, sizeof *m);
}

// ------------------------------------------------------------------------------------------------
// The store

/* A row index: open addressing (linear probing, load <= 3/4) whose 8-byte slots hold
 * (tag << ROW_BITS) | (row + 1), 0 = empty, tag = the top 24 bits of the key's hash.  The key
 * itself is read from the row (the id in the arena, the FAISS id in fid[]), so it is not stored a
 * second time, and the tag settles almost every mismatch without touching the row.  The id index
 * used to be a twn_strmap (32-byte slots at load <= 1/2 plus a heap copy of every id) and the FAISS
 * id index a twn_i64map (16-byte slots at load <= 1/2): ~190 bytes per item between them, against
 * 11-21 here (BENCHMARKS.md, "Control plane at scale"). */
#define ROW_BITS 40
#define ROW_MAX  ((int64_t)((1ull << ROW_BITS) - 2))

typedef struct {
    uint64_t *slots;
    size_t cap, n; /* cap: 0 or a power of two */
} rowidx;

struct twn_store {
    int dim;
    int64_t n, cap;
    char *arena; /* ids, each NUL-terminated */
    size_t arena_n, arena_cap;
    size_t *id_off;
    uint32_t *id_len;
    int64_t *fid;
    uint8_t *route;
    float *p_think;
    uint32_t *think;
    uint16_t *vec;
    rowidx by_id;  /* hash: twn_hash64(id) */
    rowidx by_fid; /* hash: fid_hash(fid) */
};

static uint64_t fid_hash(int64_t fid) {
    uint64_t x = (uint64_t)fid;
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

static uint64_t row_hash_id(const twn_store *s, int64_t row) {
    return twn_hash64(s->arena + s->id_off[row], s->id_len[row]);
}

static uint64_t row_hash_fid(const twn_store *s, int64_t row) {
    return fid_hash(s->fid[row]);
}

/* Inserts row (not present; the caller checked) under hash h. */
static void rowidx_put(const twn_store *s, rowidx *x, uint64_t h, int64_t row,
                       uint64_t (*rehash)(const twn_store *, int64_t)) {
    if (4 * (x->n + 1) > 3 * x->cap) {
        size_t ncap = x->cap ? 2 * x->cap : 1024;
        uint64_t *ns = twn_calloc(ncap, sizeof *ns);
        for (size_t i = 0; i < x->cap; i++) {
            uint64_t v = x->slots[i];
            if (!v) continue;
            size_t j = (size_t)rehash(s, (int64_t)(v & ((1ull << ROW_BITS) - 1)) - 1) & (ncap - 1);
            while (ns[j]) j = (j + 1) & (ncap - 1);
            ns[j] = v;
        }
        twn_free(x->slots);
        x->slots = ns;
        x->cap = ncap;
    }
    size_t j = (size_t)h & (x->cap - 1);
    while (x->slots[j]) j = (j + 1) & (x->cap - 1);
    x->slots[j] = (h >> ROW_BITS << ROW_BITS) | (uint64_t)(row + 1);
    x->n++;
}

twn_store *twn_store_new(int dim) {
    twn_store *s = twn_calloc(1, sizeof *s);
    s->dim = dim;
    return s;
}

void twn_store_free(twn_store *s) {
    if (!s) return;
    twn_free(s->arena);
    twn_free(s->id_off);
    twn_free(s->id_len);
    twn_free(s->fid);
    twn_free(s->route);
    twn_free(s->p_think);
    twn_free(s->think);
    free(s->vec);
    twn_free(s->by_id.slots);
    twn_free(s->by_fid.slots);
    twn_free(s);
}

int twn_store_dim(const twn_store *s) {
    return s->dim;
}
int64_t twn_store_count(const twn_store *s) {
    return s->n;
}
const uint16_t *twn_store_vectors(const twn_store *s) {
    return s->vec;
}

int64_t twn_store_find_id(const twn_store *s, const char *id, size_t len) {
    const rowidx *x = &s->by_id;
    if (!x->cap) return -1;
    uint64_t h = twn_hash64(id, len), tag = h >> ROW_BITS;
    for (size_t j = (size_t)h & (x->cap - 1); x->slots[j]; j = (j + 1) & (x->cap - 1)) {
        uint64_t v = x->slots[j];
        if (v >> ROW_BITS != tag) continue;
        int64_t row = (int64_t)(v & ((1ull << ROW_BITS) - 1)) - 1;
        if (s->id_len[row] == len && !memcmp(s->arena + s->id_off[row], id, len)) return row;
    }
    return -1;
}

int64_t twn_store_find_fid(const twn_store *s, int64_t fid) {
    const rowidx *x = &s->by_fid;
    if (!x->cap) return -1;
    uint64_t h = fid_hash(fid), tag = h >> ROW_BITS;
    for (size_t j = (size_t)h & (x->cap - 1); x->slots[j]; j = (j + 1) & (x->cap - 1)) {
        uint64_t v = x->slots[j];
        if (v >> ROW_BITS != tag) continue;
        int64_t row = (int64_t)(v & ((1ull << ROW_BITS) - 1)) - 1;
        if (s->fid[row] == fid) return row;
    }
    return -1;
}

int64_t twn_store_new_fid(const twn_store *s, const char *id, size_t len) {
    int64_t fid = (int64_t)twn_hash64(id, len);
    if (fid != -1 && twn_store_find_fid(s, fid) < 0) return fid;
    char *buf = twn_malloc(len + 9);
    memcpy(buf, id, len);
    buf[len] = 0;
    for (uint64_t k = 1;; k++) {
        for (int b = 0; b < 8; b++) buf[len + 1 + b] = (char)(k >> (8 * b));
        fid = (int64_t)twn_hash64(buf, len + 9);
        if (fid != -1 && twn_store_find_fid(s, fid) < 0) break;
    }
    twn_free(buf);
    return fid;
}

static int grow(twn_store *s, twn_err *err) {
    if (s->n < s->cap) return 0;
    int64_t ncap = s->cap ? 2 * s->cap : 1024;
    if (s->n > ROW_MAX)
        return twn_err_set(err, "store: more than %lld rows in one shard", (long long)ROW_MAX + 1);
    if (ncap > ROW_MAX + 1) ncap = ROW_MAX + 1;
    size_t bytes;
    if (twn_mul_size((size_t)ncap, (size_t)s->dim * 2, &bytes))
        return twn_err_set(err, "store: %lld rows of dim %d overflow", (long long)ncap, s->dim);
    uint16_t *v = realloc(s->vec, bytes);
    if (!v)
        return twn_err_set(err,
                           "store: cannot allocate %zu bytes for %lld float16 vectors of dim %d",
                           bytes, (long long)ncap, s->dim);
    s->vec = v;
    s->id_off = twn_realloc(s->id_off, (size_t)ncap * sizeof *s->id_off);
    s->id_len = twn_realloc(s->id_len, (size_t)ncap * sizeof *s->id_len);
    s->fid = twn_realloc(s->fid, (size_t)ncap * sizeof *s->fid);
    s->route = twn_realloc(s->route, (size_t)ncap * sizeof *s->route);
    s->p_think = twn_realloc(s->p_think, (size_t)ncap * sizeof *s->p_think);
    s->think = twn_realloc(s->think, (size_t)ncap * sizeof *s->think);
    s->cap = ncap;
    return 0;
}

static int64_t append_common(twn_store *s, const char *id, size_t len, int64_t fid, twn_err *err) {
    char repr[96];
    if (twn_store_find_id(s, id, len) >= 0)
        return twn_err_set(err, "store: item \"%s\" is already present",
                           twn_item_id_repr(id, len, repr, sizeof repr));
    int64_t other = twn_store_find_fid(s, fid);
    if (other >= 0 || fid == -1)
        return twn_err_set(err, "store: item \"%s\": FAISS id %lld is %s",
                           twn_item_id_repr(id, len, repr, sizeof repr), (long long)fid,
                           fid == -1 ? "reserved (-1)" : "already owned by another item");
    if (grow(s, err)) return -1;
    if (s->arena_n + len + 1 > s->arena_cap) {
        size_t cap = s->arena_cap ? s->arena_cap : 65536;
        while (cap < s->arena_n + len + 1) cap *= 2;
        s->arena = twn_realloc(s->arena, cap);
        s->arena_cap = cap;
    }
    int64_t row = s->n++;
    s->id_off[row] = s->arena_n;
    s->id_len[row] = (uint32_t)len;
    memcpy(s->arena + s->arena_n, id, len);
    s->arena[s->arena_n + len] = 0;
    s->arena_n += len + 1;
    s->fid[row] = fid;
    rowidx_put(s, &s->by_id, twn_hash64(id, len), row, row_hash_id);
    rowidx_put(s, &s->by_fid, fid_hash(fid), row, row_hash_fid);
    return row;
}

int64_t twn_store_append(twn_store *s, const twn_index_item *it, int64_t fid, twn_err *err) {
    size_t len = it->id_len ? it->id_len : strlen(it->id);
    int64_t row = append_common(s, it->id, len, fid, err);
    if (row >= 0) twn_store_update(s, row, it);
    return row;
}

int64_t twn_store_append_f16(twn_store *s, const char *id, size_t len, int64_t fid, uint8_t route,
                             float p_think, uint32_t think_tokens, const uint16_t *vec,
                             twn_err *err) {
    int64_t row = append_common(s, id, len, fid, err);
    if (row < 0) return -1;
    s->route[row] = route;
    s->p_think[row] = p_think;
    s->think[row] = think_tokens;
    memcpy(s->vec + (size_t)row * (size_t)s->dim, vec, (size_t)s->dim * 2);
    return row;
}

void twn_store_update(twn_store *s, int64_t row, const twn_index_item *it) {
    s->route[row] = it->route;
    s->p_think[row] = it->p_think;
    s->think[row] = it->think_tokens;
    twn_half_from_float_n(it->vec, s->vec + (size_t)row * (size_t)s->dim, (size_t)s->dim, 0);
}

int twn_store_same(const twn_store *s, int64_t row, const twn_index_item *it) {
    if (s->route[row] != it->route || s->think[row] != it->think_tokens) return 0;
    float a = s->p_think[row], b = it->p_think;
    if (!(a == b || (isnan(a) && isnan(b)))) return 0;
    const uint16_t *v = s->vec + (size_t)row * (size_t)s->dim;
    uint16_t h[256];
    for (int j = 0; j < s->dim; j += 256) {
        size_t m = s->dim - j < 256 ? (size_t)(s->dim - j) : 256;
        twn_half_from_float_n(it->vec + j, h, m, 0);
        if (memcmp(h, v + j, m * sizeof *h) != 0) return 0;
    }
    return 1;
}

void twn_store_get(const twn_store *s, int64_t row, twn_store_row *out) {
    out->id = s->arena + s->id_off[row];
    out->id_len = s->id_len[row];
    out->faiss_id = s->fid[row];
    out->route = s->route[row];
    out->p_think = s->p_think[row];
    out->think_tokens = s->think[row];
    out->vec = s->vec + (size_t)row * (size_t)s->dim;
}

void twn_store_get_f32(const twn_store *s, int64_t row0, int64_t n, float *out) {
    twn_half_to_float_n(s->vec + (size_t)row0 * (size_t)s->dim, out, (size_t)n * (size_t)s->dim, 0);
}

void twn_store_topk(const twn_store *s, const float *q, int k, float *scores, int64_t *rows) {
    for (int i = 0; i < k; i++) {
        scores[i] = -INFINITY;
        rows[i] = -1;
    }
    if (k <= 0) return;
    float *buf = twn_malloc((size_t)s->dim * sizeof *buf);
    for (int64_t r = 0; r < s->n; r++) {
        twn_store_get_f32(s, r, 1, buf);
        float dot = 0;
        for (int j = 0; j < s->dim; j++) dot += q[j] * buf[j];
        /* insertion into the sorted list (ties keep the lower row first) */
        if (rows[k - 1] >= 0 && !(dot > scores[k - 1])) continue;
        int i = k - 1;
        while (i > 0 && (rows[i - 1] < 0 || dot > scores[i - 1])) {
            scores[i] = scores[i - 1];
            rows[i] = rows[i - 1];
            i--;
        }
        scores[i] = dot;
        rows[i] = r;
    }
    twn_free(buf);
}
