/* item.h — one embedded item as the index role receives it: id, vector and the gate's metadata.
 *
 * The same struct feeds the WAL (wal.h), the shard store (store.h) and the shard (shard.h).
 * Routes are the gate's decision: easy items were embedded in one pass, hard ones after a CoT. */
#ifndef TWN_INDEX_ITEM_H
#define TWN_INDEX_ITEM_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

/* Longest item id in bytes.  Ids are refs like "s3://bucket/shard-00017.tar#000123"; anything
 * longer is almost certainly a payload sent by mistake. */
#define TWN_ITEM_ID_MAX 4096

enum { TWN_ROUTE_EASY = 0, TWN_ROUTE_HARD = 1, TWN_ROUTE_COUNT };

typedef struct {
    const char *id;        /* UTF-8, no NUL bytes */
    size_t id_len;         /* bytes; 0 means strlen(id) */
    const float *vec;      /* dim floats, finite (L2-normalized in practice; not enforced) */
    uint8_t route;         /* TWN_ROUTE_* */
    float p_think;         /* gate probability in [0, 1], or NaN when no gate ran (mode never) */
    uint32_t think_tokens; /* CoT tokens generated (0 for easy items) */
} twn_index_item;

static inline const char *twn_route_name(int route) {
    return route == TWN_ROUTE_EASY ? "easy" : route == TWN_ROUTE_HARD ? "hard" : "?";
}

/* Validates an item for a dim-D index: id length 1..TWN_ITEM_ID_MAX, valid UTF-8 without NUL,
 * known route, p_think in [0,1] or NaN, every vector component finite.  The message names the
 * item id (escaped) and the offending value. */
int twn_item_check(const twn_index_item *it, int dim, twn_err *err);

/* Writes a printable, truncated rendering of an id (for error messages) into buf. */
const char *twn_item_id_repr(const char *id, size_t len, char *buf, size_t cap);

#endif
