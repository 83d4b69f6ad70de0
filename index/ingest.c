/* ingest.c — see ingest.h. */
#include "index/ingest.h"

#include <stdint.h>

#include "util/mem.h"

int twn_indexer_batch_items(const Twn__EmbeddingBatch *b, twn_index_item *it, float **scratch,
                            twn_err *err) {
    *scratch = NULL;
    if (twn_batch_check(b, err)) return -1;
    const float *v = NULL;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (((uintptr_t)b->vectors.data & (_Alignof(float) - 1)) == 0)
        v = (const float *)b->vectors.data;
#endif
    if (!v && b->n_items) {
        *scratch = twn_malloc(b->vectors.len);
        if (twn_batch_get_vectors(b, *scratch, err)) {
            twn_free(*scratch);
            *scratch = NULL;
            return -1;
        }
        v = *scratch;
    }
    for (size_t i = 0; i < b->n_items; i++) {
        const Twn__EmbeddingItem *ei = b->items[i];
        it[i].id = ei->id;
        it[i].id_len = 0;
        it[i].vec = v + i * b->dim;
        it[i].route = ei->route == TWN__ROUTE__ROUTE_HARD ? TWN_ROUTE_HARD : TWN_ROUTE_EASY;
        it[i].p_think = ei->p_think;
        it[i].think_tokens = ei->think_tokens;
    }
    return 0;
}
