/* shard_out.h — test readers of what the index writes (index/outdir.c's layout): the shards'
 * current snapshots (CURRENT -> embeddings.npy + items.jsonl), .npy matrices, JSONL files.
 *
 * Header-only (static inline) so any test includes it without a CMake change; shared by the
 * tests that run roles as threads (test_run, test_run_sources, test_stream) and as processes
 * (procs.h includes it).  Prefix tp_ ("test pipeline"), as procs.h. */
#ifndef TWN_TESTS_UNIT_SHARD_OUT_H
#define TWN_TESTS_UNIT_SHARD_OUT_H

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tensor.h"
#include "tests/testutil.h"
#include "util/mem.h"

/* A float16 or float32 .npy matrix [rows, dim]. */
typedef struct tp_mat {
    float *v;
    int rows, dim;
} tp_mat;

static inline tp_mat tp_npy_read(const char *path) {
    size_t n;
    char *b = tu_read(path, &n);
    assert_true(n > 10 && !memcmp(b, "\x93NUMPY", 6));
    size_t hl = (size_t)(unsigned char)b[8] | (size_t)(unsigned char)b[9] << 8, off = 10 + hl;
    char *hdr = b + 10;
    int f16 = strstr(hdr, "'<f2'") != NULL;
    assert_true(f16 || strstr(hdr, "'<f4'"));
    const char *sh = strstr(hdr, "'shape': (");
    assert_non_null(sh);
    tp_mat m = {0};
    assert_int_equal(sscanf(sh + 10, "%d, %d", &m.rows, &m.dim), 2);
    m.v = twn_malloc(sizeof(float) * (size_t)(m.rows ? m.rows : 1) * (m.dim ? m.dim : 1));
    for (size_t i = 0; i < (size_t)m.rows * m.dim; i++) {
        if (f16) {
            uint16_t h;
            memcpy(&h, b + off + 2 * i, 2);
            m.v[i] = twn_f16_to_f32(h);
        } else
            memcpy(&m.v[i], b + off + 4 * i, 4);
    }
    free(b);
    return m;
}

/* The lines of a JSONL file as parsed objects (a JSON array). */
static inline json_t *tp_jsonl_read(const char *path) {
    size_t n;
    char *b = tu_read(path, &n);
    json_t *arr = json_array();
    char *save = NULL;
    for (char *l = strtok_r(b, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        json_error_t je;
        json_t *o = json_loads(l, 0, &je);
        if (!o) o = json_loads(l, JSON_DECODE_INT_AS_REAL, &je); /* u64 above INT64_MAX */
        if (!o) fail_msg("%s: %s: %s", path, je.text, l);
        json_array_append_new(arr, o);
    }
    free(b);
    return arr;
}

/* The directory of a shard's current snapshot: shard_dir/<the name in shard_dir/CURRENT>. */
static inline void tp_snapshot_dir(const char *shard_dir, char *out, size_t cap) {
    char cur[4200];
    snprintf(cur, sizeof cur, "%s/CURRENT", shard_dir);
    size_t n;
    char *name = tu_read(cur, &n);
    name[strcspn(name, "\r\n ")] = 0;
    snprintf(out, cap, "%s/%s", shard_dir, name);
    free(name);
}

/* Every shard's current output, merged: `items` maps id -> its items.jsonl object plus "row"
 * (its row in `all`) and "shard".  Reading fails the test when an id is in the index twice. */
typedef struct tp_shards {
    json_t *items;
    tp_mat all;
    int per_shard[256]; /* rows in shard k (k < 256) */
} tp_shards;

static inline tp_shards tp_shards_read(const char *out, int n_shards) {
    tp_shards s;
    memset(&s, 0, sizeof s);
    s.items = json_object();
    size_t cap = 0;
    for (int k = 0; k < n_shards; k++) {
        char cur[4200], snap[4400], p[4600];
        snprintf(cur, sizeof cur, "%s/shard-%05d/CURRENT", out, k);
        size_t n;
        char *name = tu_read(cur, &n);
        while (n && (name[n - 1] == '\n' || name[n - 1] == ' ')) name[--n] = 0;
        snprintf(snap, sizeof snap, "%s/shard-%05d/%s", out, k, name);
        free(name);
        snprintf(p, sizeof p, "%s/embeddings.npy", snap);
        tp_mat m = tp_npy_read(p);
        snprintf(p, sizeof p, "%s/items.jsonl", snap);
        json_t *items = tp_jsonl_read(p);
        assert_int_equal((int)json_array_size(items), m.rows);
        if (!s.all.dim) s.all.dim = m.dim;
        assert_int_equal(m.dim, s.all.dim);
        s.all.v = twn_realloc(s.all.v, sizeof(float) * (cap + (size_t)m.rows) * (size_t)m.dim);
        memcpy(s.all.v + cap * (size_t)m.dim, m.v, sizeof(float) * (size_t)m.rows * m.dim);
        if (k < 256) s.per_shard[k] = m.rows;
        size_t i;
        json_t *it;
        json_array_foreach(items, i, it) {
            const char *id = json_string_value(json_object_get(it, "id"));
            assert_non_null(id);
            if (json_object_get(s.items, id)) fail_msg("id %s is in the index twice", id);
            json_object_set_new(it, "row", json_integer((json_int_t)(cap + i)));
            json_object_set_new(it, "shard", json_integer(k));
            json_object_set(s.items, id, it);
        }
        cap += (size_t)m.rows;
        s.all.rows = (int)cap;
        json_decref(items);
        twn_free(m.v);
    }
    return s;
}

static inline void tp_shards_free(tp_shards *s) {
    json_decref(s->items);
    twn_free(s->all.v);
    memset(s, 0, sizeof *s);
}

/* The shards' current snapshots hold exactly the ids that are keys of `want` (a JSON object),
 * each once: fails the test naming an id indexed twice, one never sent or one missing. */
static inline void tp_index_exact(const char *out, int n_shards, json_t *want) {
    tp_shards s = tp_shards_read(out, n_shards); /* fails on an id seen twice */
    const char *id;
    json_t *v;
    json_object_foreach(s.items, id, v) {
        if (!json_object_get(want, id)) fail_msg("id %s is in the index but was never sent", id);
    }
    json_object_foreach(want, id, v) {
        if (!json_object_get(s.items, id)) fail_msg("%s is missing from the index", id);
    }
    assert_int_equal(json_object_size(s.items), json_object_size(want));
    tp_shards_free(&s);
}

/* The dead letters in a dead_letter.jsonl by the item they name: "PATH#INDEX" (ref.path,
 * ref.index) -> how many lines name it; json_decref it. */
static inline json_t *tp_dead_letter_refs(const char *path) {
    json_t *lines = tp_jsonl_read(path), *refs = json_object(), *l;
    size_t i;
    json_array_foreach(lines, i, l) {
        json_t *ref = json_object_get(l, "ref");
        const char *p = json_string_value(json_object_get(ref, "path"));
        char key[4400];
        snprintf(key, sizeof key, "%s#%.0f", p ? p : "(none)",
                 json_number_value(json_object_get(ref, "index")));
        json_int_t seen = json_integer_value(json_object_get(refs, key));
        json_object_set_new(refs, key, json_integer(seen + 1));
    }
    json_decref(lines);
    return refs;
}

/* An integer field that may have been read as a real (u64 ids above INT64_MAX, see
 * tp_jsonl_read). */
static inline long long tp_jint(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_integer(v) ? (long long)json_integer_value(v) : (long long)json_real_value(v);
}

#endif
