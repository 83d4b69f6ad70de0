/* store.h — a shard's items in memory: ids, FAISS ids, gate metadata and float16 vectors.
 *
 * The store is the source of truth the FAISS index is built from: it holds every live item once
 * (row order = order of first arrival), so the .npy/.jsonl outputs, exact search before an IVF
 * index is trained, rebuilding an index that cannot delete, and merging shards all read it.
 * Vectors are kept as IEEE float16 (what DESIGN §4 outputs), i.e. N·D·2 bytes beside the index.
 *
 * FAISS ids.  An item's FAISS id is fixed when the item is first seen and never changes:
 *   fid_0 = (int64) twn_hash64(id)
 *   fid_k = (int64) twn_hash64(id ‖ 0x00 ‖ u64le(k))   for k = 1, 2, ...
 * taking the first that is not -1 (FAISS' "no result") and not already owned by another item id.
 * twn_hash64 collisions are rare (~N²/2^65) but real at 10^9 items, so they are probed, never
 * merged; the chosen id is written to the WAL so replay reproduces it without probing. */
#ifndef TWN_INDEX_STORE_H
#define TWN_INDEX_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "index/item.h"
#include "util/err.h"

// ------------------------------------------------------------------------------------------------
// float16 (IEEE binary16, round to nearest even; same results as engine/tensor.c's converters)

uint16_t twn_half_from_float(float f);
float twn_half_to_float(uint16_t h);
/* n values at once (F16C when available; portable != 0 forces the scalar code, for tests). */
void twn_half_from_float_n(const float *src, uint16_t *dst, size_t n, int portable);
void twn_half_to_float_n(const uint16_t *src, float *dst, size_t n, int portable);

// ------------------------------------------------------------------------------------------------
// int64 -> int64 hash map (values >= 0), used for FAISS id -> row and id sets

typedef struct {
    int64_t *keys, *vals; /* vals[i] < 0: empty slot */
    size_t cap, n;
} twn_i64map;

void twn_i64map_put(twn_i64map *m, int64_t key, int64_t val);
int64_t twn_i64map_get(const twn_i64map *m, int64_t key); /* -1 when absent */
void twn_i64map_clear(twn_i64map *m);
void twn_i64map_free(twn_i64map *m);

// ------------------------------------------------------------------------------------------------
// The store

typedef struct twn_store twn_store;

typedef struct {
    const char *id; /* NUL-terminated; valid until the store changes */
    size_t id_len;
    int64_t faiss_id;
    uint8_t route;
    float p_think;
    uint32_t think_tokens;
    const uint16_t *vec; /* dim float16 values */
} twn_store_row;

twn_store *twn_store_new(int dim);
void twn_store_free(twn_store *s);
int twn_store_dim(const twn_store *s);
int64_t twn_store_count(const twn_store *s);

int64_t twn_store_find_id(const twn_store *s, const char *id, size_t len); /* row or -1 */
int64_t twn_store_find_fid(const twn_store *s, int64_t fid);               /* row or -1 */
/* The FAISS id a new item id would get (the rule above). */
int64_t twn_store_new_fid(const twn_store *s, const char *id, size_t len);

/* Appends a new item with FAISS id fid (neither may be present; checked).  Returns the row, or
 * -1 with err set (duplicate, or out of memory for the vector array). */
int64_t twn_store_append(twn_store *s, const twn_index_item *it, int64_t fid, twn_err *err);
/* Same, from float16 data (loading a snapshot). */
int64_t twn_store_append_f16(twn_store *s, const char *id, size_t len, int64_t fid, uint8_t route,
                             float p_think, uint32_t think_tokens, const uint16_t *vec,
                             twn_err *err);
/* Overwrites row's vector and metadata. */
void twn_store_update(twn_store *s, int64_t row, const twn_index_item *it);
/* 1 when row already holds exactly this content (vector compared after float16 rounding, NaN
 * p_think equal to NaN). */
int twn_store_same(const twn_store *s, int64_t row, const twn_index_item *it);

void twn_store_get(const twn_store *s, int64_t row, twn_store_row *out);
/* Rows [row0, row0+n) as float32, n*dim values. */
void twn_store_get_f32(const twn_store *s, int64_t row0, int64_t n, float *out);
/* The contiguous n*dim float16 array (row-major). */
const uint16_t *twn_store_vectors(const twn_store *s);

/* Exact inner-product top-k over all rows: scores descending, ties by row; unused slots get
 * row -1 and score -INFINITY. */
void twn_store_topk(const twn_store *s, const float *q, int k, float *scores, int64_t *rows);

#endif
