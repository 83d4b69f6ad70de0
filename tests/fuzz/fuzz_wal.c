/* fuzz_wal.c — arbitrary bytes as a WAL segment through the recovery scanner.
 *
 * What recovery relies on, checked on every input: the scan never reads outside the input
 * (ASan), every record it hands out is a valid item with contiguous sequence numbers starting at
 * the header's, the good prefix ends inside the input, a clean scan covers all of it, and the
 * good prefix on its own scans clean with the same records (truncating to it is what recovery
 * does, so it must be a fixed point).  A message is given whenever the scan is not clean. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "index/wal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct {
    uint64_t first, next, n;
    uint32_t dim;
    volatile float sink;
} check;

static int on_record(void *ctx, const twn_wal_rec *r, twn_err *err) {
    (void)err;
    check *c = ctx;
    if (c->n == 0 && r->seq != c->first) abort();
    if (c->n && r->seq != c->next) abort();
    c->next = r->seq + 1;
    c->n++;
    twn_err e;
    if (twn_item_check(&r->item, (int)c->dim, &e) != 0) abort(); /* never replay a bad record */
    for (uint32_t j = 0; j < c->dim; j++) c->sink += r->item.vec[j];
    for (size_t j = 0; j < r->item.id_len; j++) c->sink += (float)r->item.id[j];
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    check c = {0};
    if (size >= TWN_WAL_HEADER) {
        memcpy(&c.dim, data + 12, 4);
        memcpy(&c.first, data + 16, 8);
    }
    twn_wal_scan r;
    twn_err err;
    if (twn_wal_scan_segment(data, size, 0, on_record, &c, &r, &err) != 0) abort();
    if (r.records != c.n || r.good_end > size) abort();
    if ((r.status == TWN_WAL_SCAN_CLEAN) != (r.reason[0] == 0)) abort();
    if (r.status == TWN_WAL_SCAN_BAD_HEADER || r.status == TWN_WAL_SCAN_WRONG_DIM) {
        if (r.records) abort();
        return 0;
    }
    if (r.status == TWN_WAL_SCAN_CLEAN && r.good_end != size) abort();
    if (r.status == TWN_WAL_SCAN_CORRUPT &&
        (r.resume_offset <= r.bad_offset || r.resume_offset >= size))
        abort();
    if (r.next_seq != r.first_seq + r.records) abort();
    /* The good prefix is a fixed point of recovery. */
    twn_wal_scan again;
    if (twn_wal_scan_segment(data, r.good_end, c.dim, NULL, NULL, &again, &err) != 0) abort();
    if (again.status != TWN_WAL_SCAN_CLEAN || again.records != r.records ||
        again.next_seq != r.next_seq)
        abort();
    return 0;
}
