/* source_check.h — the invariants fuzz_jsonl and fuzz_tar hold a source to, whatever its bytes.
 *
 * The input is planned (over a memory blob) and every unit is read; then every item is read again
 * by its ref.  Planning and reading must never fail on bytes that do not change; units must tile
 * the plan (contiguous, sequential ids, dense item indices, at most `per` items); each unit must
 * yield exactly its count; every item must lie inside its unit; a bad item's message must name the
 * file; a good item must have a valid UTF-8 id within the limit; and the ref read must give the
 * identical item, message included. */
#ifndef TWN_TESTS_FUZZ_SOURCE_CHECK_H
#define TWN_TESTS_FUZZ_SOURCE_CHECK_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/source.h"
#include "common/source_internal.h"
#include "util/mem.h"

typedef struct {
    twn_src_unit *v;
    size_t n;
} fz_units;

static int fz_collect(const twn_src_unit *u, void *user, twn_err *err) {
    (void)err;
    fz_units *l = user;
    l->v = twn_realloc(l->v, (l->n + 1) * sizeof *l->v);
    l->v[l->n] = *u;
    l->v[l->n].path = twn_strdup(u->path);
    l->n++;
    return 0;
}

static int fz_str_eq(const char *a, const char *b) {
    return !a == !b && (!a || !strcmp(a, b));
}

static void fz_same(const twn_src_item *a, const twn_src_item *b) {
    if (a->index != b->index || a->offset != b->offset || a->length != b->length ||
        a->line != b->line || a->fault != b->fault || strcmp(a->err.msg, b->err.msg) ||
        !fz_str_eq(a->id, b->id) || !fz_str_eq(a->text, b->text) ||
        !fz_str_eq(a->instruction, b->instruction) || !fz_str_eq(a->key, b->key) ||
        a->n_images != b->n_images)
        abort();
    for (size_t i = 0; i < a->n_images; i++) {
        const twn_src_image *x = &a->images[i], *y = &b->images[i];
        if (!fz_str_eq(x->path, y->path) || !fz_str_eq(x->member, y->member) || x->size != y->size)
            abort();
        if (x->size && memcmp(x->data, y->data, x->size)) abort();
    }
}

static void fz_check_item(const twn_src_item *it, const char *name, const twn_src_opts *o) {
    size_t nl = strlen(name);
    if (it->fault) {
        if (strncmp(it->err.msg, name, nl) || strncmp(it->err.msg + nl, ": ", 2)) abort();
        return;
    }
    if (!it->id || !it->id[0] || strlen(it->id) > o->max_id_bytes ||
        twn_src_utf8_invalid_at((const uint8_t *)it->id, strlen(it->id)) >= 0)
        abort();
    if (it->text && twn_src_utf8_invalid_at((const uint8_t *)it->text, strlen(it->text)) >= 0)
        abort();
    if ((!it->text || !it->text[0]) && !it->n_images) abort();
    for (size_t i = 0; i < it->n_images; i++) {
        const twn_src_image *im = &it->images[i];
        if (!im->path == !im->data) abort(); /* a path (JSONL) or bytes (tar) */
        volatile uint8_t sink = 0;
        for (size_t k = 0; k < im->size; k++) sink ^= im->data[k];
        (void)sink;
    }
}

static void fz_source_check(const uint8_t *data, size_t size, const char *name, twn_src_format fmt,
                            uint64_t per, const twn_src_opts *o) {
    twn_blob *b = twn_blob_mem(data, size, name);
    twn_err err = {{0}};
    fz_units l = {0};
    uint64_t next = 0;
    if (twn_src_plan_blob(b, name, fmt, per, &next, fz_collect, &l, &err)) abort();
    if (next != l.n) abort();
    uint64_t index = 0;
    for (size_t u = 0; u < l.n; u++) {
        const twn_src_unit *un = &l.v[u];
        if (un->id != u || un->first_index != index || !un->count || un->count > per ||
            un->end < un->start || un->end > size)
            abort();
        if (u + 1 < l.n && (un->end != l.v[u + 1].start || un->count != per)) abort();
        twn_src_reader *r;
        if (twn_src_reader_open(b, un, o, &r, &err)) abort();
        twn_src_item it = {0}, again = {0};
        int rc;
        uint64_t got = 0;
        while ((rc = twn_src_reader_next(r, &it, &err)) == 1) {
            if (it.index != index || it.offset < un->start || it.offset + it.length > un->end)
                abort();
            index++;
            got++;
            fz_check_item(&it, name, o);
            twn_src_ref ref = twn_src_ref_of(un, &it);
            if (twn_src_read_ref(b, &ref, o, &again, &err)) abort();
            fz_same(&it, &again);
            twn_src_item_clear(&again);
        }
        if (rc != 0 || got != un->count) abort();
        twn_src_item_clear(&it);
        twn_src_reader_close(r);
    }
    for (size_t u = 0; u < l.n; u++) twn_free(l.v[u].path);
    twn_free(l.v);
    twn_blob_close(b);
}

#endif
