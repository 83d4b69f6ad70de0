/* test_store.c — the shard item store and its §4 output directory: float16 conversion goldens,
 * the FAISS id rule with forced hash collisions, the int64 map, the id / FAISS id row indexes at
 * 200k items (lookups and heap bytes per item), exact top-k, and an output
 * directory round trip checked byte for byte (items.jsonl golden) and by numpy itself, plus the
 * messages for each way a directory can disagree with its manifest. */
#include <malloc.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "index/build.h"
#include "index/search.h"
#include "index/outdir.h"
#include "index/store.h"
#include "tests/testutil.h"
#include "util/hash.h"

static void expect_contains(const char *msg, const char *want) {
    if (!strstr(msg, want)) fail_msg("message\n  %s\ndoes not contain\n  %s", msg, want);
}

static void test_half(void **state) {
    (void)state;
    const struct {
        float f;
        uint16_t h;
    } g[] = {
        {0.0f, 0x0000},           {-0.0f, 0x8000},          {1.0f, 0x3c00},      {-2.0f, 0xc000},
        {0.5f, 0x3800},           {65504.0f, 0x7bff},       {65520.0f, 0x7c00},  {1e-8f, 0x0000},
        {6e-8f, 0x0001},          {6.1035156e-05f, 0x0400}, /* smallest normal */
        {1.00048828125f, 0x3c00},                           /* 1 + 2^-11: tie -> even */
        {1.00146484375f, 0x3c02},                           /* 1 + 3*2^-11: tie -> even */
        {0.333333333f, 0x3555},   {INFINITY, 0x7c00},       {-INFINITY, 0xfc00},
    };
    for (size_t i = 0; i < sizeof g / sizeof *g; i++)
        if (twn_half_from_float(g[i].f) != g[i].h)
            fail_msg("%g -> %04x, expected %04x", (double)g[i].f, twn_half_from_float(g[i].f),
                     g[i].h);
    assert_int_equal(twn_half_from_float(NAN) & 0x7e00, 0x7e00);
    /* Every non-NaN half survives the round trip through float. */
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;
        assert_int_equal(twn_half_from_float(twn_half_to_float((uint16_t)h)), h);
    }
    assert_true(twn_half_to_float(0x0001) == ldexpf(1.0f, -24));
    /* The bulk (F16C) and portable paths agree bit for bit on finite values of every magnitude. */
    enum { M = 70000 };
    float *f = malloc(M * sizeof *f), *b1 = malloc(M * sizeof *b1), *b2 = malloc(M * sizeof *b2);
    uint16_t *h1 = malloc(M * sizeof *h1), *h2 = malloc(M * sizeof *h2);
    uint32_t x = 12345;
    for (int i = 0; i < M; i++) {
        x = x * 1664525u + 1013904223u;
        f[i] =
            ldexpf((float)(x >> 8) / (float)(1 << 24) - 0.5f, (int)(x % 48) - 30); /* 2^-31..2^17 */
    }
    f[0] = 65519.0f; /* just below the overflow boundary */
    f[1] = 65520.0f;
    f[2] = -1e-30f;
    twn_half_from_float_n(f, h1, M - 3, 0);
    twn_half_from_float_n(f, h2, M - 3, 1);
    assert_memory_equal(h1, h2, (M - 3) * sizeof *h1);
    twn_half_to_float_n(h1, b1, M - 3, 0);
    twn_half_to_float_n(h1, b2, M - 3, 1);
    assert_memory_equal(b1, b2, (M - 3) * sizeof *b1);
    free(f);
    free(b1);
    free(b2);
    free(h1);
    free(h2);
}

static void test_i64map(void **state) {
    (void)state;
    twn_i64map m = {0};
    assert_int_equal(twn_i64map_get(&m, 5), -1);
    for (int64_t i = 0; i < 10000; i++) twn_i64map_put(&m, i * 0x9e3779b97f4a7c15ll, i);
    twn_i64map_put(&m, INT64_MIN, 77);
    twn_i64map_put(&m, -1, 78);
    twn_i64map_put(&m, 0, 79); /* overwrite */
    assert_int_equal(m.n, 10002);
    for (int64_t i = 1; i < 10000; i++)
        assert_int_equal(twn_i64map_get(&m, i * 0x9e3779b97f4a7c15ll), i);
    assert_int_equal(twn_i64map_get(&m, 0), 79);
    assert_int_equal(twn_i64map_get(&m, INT64_MIN), 77);
    assert_int_equal(twn_i64map_get(&m, -1), 78);
    assert_int_equal(twn_i64map_get(&m, 12345), -1);
    twn_i64map_clear(&m);
    assert_int_equal(twn_i64map_get(&m, -1), -1);
    assert_int_equal(m.n, 0);
    twn_i64map_free(&m);
}

static int64_t probe_fid(const char *id, uint64_t k) {
    char buf[64];
    size_t n = strlen(id);
    memcpy(buf, id, n);
    buf[n] = 0;
    for (int b = 0; b < 8; b++) buf[n + 1 + b] = (char)(k >> (8 * b));
    return (int64_t)twn_hash64(buf, n + 9);
}

static void test_fid_rule_and_collisions(void **state) {
    (void)state;
    twn_store *s = twn_store_new(4);
    twn_err err = {{0}};
    float v[4] = {1, 0, 0, 0};
    int64_t ha = (int64_t)twn_hash64("a", 1);
    assert_int_equal(twn_store_new_fid(s, "a", 1), ha);
    /* Another item already owns a's natural id (a hash collision): a gets the first probe. */
    twn_index_item x = {.id = "x", .vec = v};
    assert_int_equal(twn_store_append(s, &x, ha, &err), 0);
    assert_int_equal(twn_store_new_fid(s, "a", 1), probe_fid("a", 1));
    twn_index_item y = {.id = "y", .vec = v};
    assert_int_equal(twn_store_append(s, &y, probe_fid("a", 1), &err), 1);
    assert_int_equal(twn_store_new_fid(s, "a", 1), probe_fid("a", 2));
    /* The store refuses duplicates and the reserved -1. */
    twn_index_item a = {.id = "a", .vec = v};
    assert_int_equal(twn_store_append(s, &a, ha, &err), -1);
    char want[256];
    snprintf(want, sizeof want, "store: item \"a\": FAISS id %lld is already owned by another item",
             (long long)ha);
    assert_string_equal(err.msg, want);
    twn_index_item x2 = {.id = "x", .vec = v};
    assert_int_equal(twn_store_append(s, &x2, 5, &err), -1);
    assert_string_equal(err.msg, "store: item \"x\" is already present");
    assert_int_equal(twn_store_append(s, &a, -1, &err), -1);
    assert_string_equal(err.msg, "store: item \"a\": FAISS id -1 is reserved (-1)");
    assert_int_equal(twn_store_count(s), 2);
    assert_int_equal(twn_store_find_fid(s, ha), 0);
    assert_int_equal(twn_store_find_id(s, "y", 1), 1);
    assert_int_equal(twn_store_find_id(s, "a", 1), -1);
    twn_store_free(s);
}

/* The store's id and FAISS id indexes at scale: every one of 200,000 items is found by id and by
 * FAISS id, near misses are not, and the heap the store holds stays near what it must (columns +
 * 8-byte row-index slots): 122 bytes per item at D = 8 here, where the twn_strmap + twn_i64map it
 * used had 238 (a 4 x 2.5 M-item run's shards held ~190 bytes per item more; BENCHMARKS.md). */
static void test_row_indexes_at_scale(void **state) {
    (void)state;
    enum { N = 200000, D = 8 };
    struct mallinfo2 m0 = mallinfo2();
    twn_store *s = twn_store_new(D);
    twn_err err = {{0}};
    float v[D] = {0};
    char id[32];
    for (int i = 0; i < N; i++) {
        v[0] = (float)i;
        int n = snprintf(id, sizeof id, "n%09d", i);
        twn_index_item it = {.id = id, .id_len = (size_t)n, .vec = v};
        int64_t fid = twn_store_new_fid(s, id, (size_t)n);
        if (twn_store_append(s, &it, fid, &err) != i) fail_msg("append %d: %s", i, err.msg);
    }
    struct mallinfo2 m1 = mallinfo2();
    assert_int_equal(twn_store_count(s), N);
    for (int i = 0; i < N; i++) {
        int n = snprintf(id, sizeof id, "n%09d", i);
        if (twn_store_find_id(s, id, (size_t)n) != i) fail_msg("find_id(%s) != %d", id, i);
        if (twn_store_find_fid(s, (int64_t)twn_hash64(id, (size_t)n)) != i)
            fail_msg("find_fid(hash of %s) != %d", id, i);
        twn_store_row r;
        twn_store_get(s, i, &r);
        assert_int_equal(r.id_len, (size_t)n);
        assert_memory_equal(r.id, id, (size_t)n);
    }
    assert_int_equal(twn_store_find_id(s, "n00000000", 9), -1);    /* a prefix of n000000000 */
    assert_int_equal(twn_store_find_id(s, "n0000000000", 11), -1); /* one byte longer */
    assert_int_equal(twn_store_find_id(s, "n000200000", 10), -1);
    assert_int_equal(twn_store_find_fid(s, -1), -1);
    assert_int_equal(twn_store_find_fid(s, (int64_t)twn_hash64("n000200000", 10)), -1);
    /* Heap in use (arena + mmapped chunks; allocated capacity counts even where untouched).  A
     * sanitizer's allocator bypasses glibc's counters: then there is nothing to compare. */
    double used = (double)(m1.uordblks + m1.hblkhd) - (double)(m0.uordblks + m0.hblkhd);
    if (used > (double)N * D * 2) {
        double per_item = used / N;
        printf("store heap: %.1f bytes per item at D = %d (%d items)\n", per_item, D, N);
        if (per_item > 150)
            fail_msg("the store holds %.1f bytes per item; expected <= 150", per_item);
    }
    twn_store_free(s);
}

static void test_same_update_topk(void **state) {
    (void)state;
    twn_store *s = twn_store_new(3);
    twn_err err = {{0}};
    float a[3] = {1, 0, 0}, b[3] = {0, 1, 0}, c[3] = {0.6f, 0.8f, 0};
    twn_index_item ia = {.id = "a", .vec = a, .p_think = NAN},
                   ib = {.id = "b", .vec = b, .route = 1},
                   ic = {.id = "c", .vec = c, .think_tokens = 5};
    assert_int_equal(twn_store_append(s, &ia, 1, &err), 0);
    assert_int_equal(twn_store_append(s, &ib, 2, &err), 1);
    assert_int_equal(twn_store_append(s, &ic, 3, &err), 2);
    assert_true(twn_store_same(s, 0, &ia)); /* NaN p_think equals NaN */
    float a2[3] = {1.0001f, 0, 0};          /* rounds to the same float16 */
    twn_index_item ia2 = ia;
    ia2.vec = a2;
    assert_true(twn_store_same(s, 0, &ia2));
    a2[0] = 1.001f;
    assert_false(twn_store_same(s, 0, &ia2));
    twn_index_item ib2 = ib;
    ib2.route = 0;
    assert_false(twn_store_same(s, 1, &ib2));
    float q[3] = {0.8f, 0.6f, 0};
    float sc[4];
    int64_t rows[4];
    twn_store_topk(s, q, 4, sc, rows);
    assert_int_equal(rows[0], 2); /* 0.96 */
    assert_int_equal(rows[1], 0); /* 0.8 */
    assert_int_equal(rows[2], 1); /* 0.6 */
    assert_int_equal(rows[3], -1);
    assert_true(isinf(sc[3]) && sc[3] < 0);
    assert_true(fabsf(sc[0] - 0.96f) < 1e-3f);
    twn_store_update(s, 1, &(twn_index_item){.id = "b", .vec = c, .think_tokens = 9});
    twn_store_topk(s, q, 2, sc, rows);
    assert_int_equal(rows[0], 1); /* tie with row 2: lower row first */
    assert_int_equal(rows[1], 2);
    twn_store_row r;
    twn_store_get(s, 1, &r);
    assert_int_equal(r.think_tokens, 9);
    assert_int_equal(r.faiss_id, 2);
    assert_string_equal(r.id, "b");
    twn_store_free(s);
}

/* A 3-item output directory with a Flat index (fixed creation time). */
static void write_dir(const char *dir, twn_store **out) {
    twn_store *s = twn_store_new(4);
    twn_err err = {{0}};
    float v[3][4] = {{1, 0, 0, 0}, {0, 0.5f, -0.25f, 0.125f}, {0, 0, 0, 1}};
    twn_index_item it[3] = {
        {.id = "a\"b", .vec = v[0], .route = 1, .p_think = 0.25f, .think_tokens = 7},
        {.id = "caf\xc3\xa9", .vec = v[1], .p_think = NAN},
        {.id = "z", .vec = v[2], .p_think = 0.1f}};
    for (int i = 0; i < 3; i++)
        assert_int_equal(twn_store_append(s, &it[i], (int64_t)i * -1000 - 5, &err), i);
    FaissIndex *ix;
    char desc[TWN_INDEX_DESC_MAX];
    assert_int_equal(twn_build_new(4, "Flat", &ix, desc, &err), 0);
    assert_int_equal(twn_build_add_rows(ix, s, NULL, 3, &err), 0);
    twn_outdir_meta m = {.model = "TWN-4B",
                         .model_hash = "deadbeef",
                         .factory = "Flat",
                         .wal_seq = 42,
                         .shard = 1,
                         .n_shards = 4,
                         .created_unix = 1700000000};
    snprintf(m.index_description, sizeof m.index_description, "%s", desc);
    assert_int_equal(twn_outdir_write(dir, s, ix, &m, &err), 0);
    faiss_Index_free(ix);
    *out = s;
}

static const char *in(const char *dir, const char *name) {
    static char buf[4][4096];
    static int k;
    char *p = buf[k++ % 4];
    snprintf(p, 4096, "%s/%s", dir, name);
    return p;
}

static void test_outdir_round_trip(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("outdir_round_trip");
    twn_store *s;
    write_dir(dir, &s);
    char *items = tu_read(in(dir, "items.jsonl"), NULL);
    assert_string_equal(
        items, "{\"id\":\"a\\\"b\",\"faiss_id\":-5,\"route\":\"hard\",\"p_think\":0.25,"
               "\"think_tokens\":7}\n"
               "{\"id\":\"caf\xc3\xa9\",\"faiss_id\":-1005,\"route\":\"easy\",\"p_think\":null,"
               "\"think_tokens\":0}\n"
               "{\"id\":\"z\",\"faiss_id\":-2005,\"route\":\"easy\",\"p_think\":0.100000001,"
               "\"think_tokens\":0}\n");
    free(items);
    char *man = tu_read(in(dir, "manifest.json"), NULL);
    expect_contains(man, "\"created\": \"2023-11-14T22:13:20Z\"");
    expect_contains(man, "\"index_description\": \"IDMap,Flat\"");
    expect_contains(man, "\"metric\": \"inner_product\"");
    expect_contains(man, "\"trained\": true");
    free(man);

    /* numpy reads the arrays: float16 embeddings and the int64 id map. */
    char cmd[4096], *out = NULL;
    snprintf(cmd, sizeof cmd,
             "/usr/bin/python3 -c \"import numpy as n; e=n.load('%s'); f=n.load('%s'); "
             "print(e.dtype, e.shape, f.dtype, f.shape, e[1].tolist(), f.ravel().tolist())\"",
             in(dir, "embeddings.npy"), in(dir, "faiss_ids.npy"));
    int rc = tu_run(cmd, &out);
    if (rc != 0) fail_msg("%s\n%s", cmd, out);
    assert_string_equal(
        out, "float16 (3, 4) int64 (3, 1) [0.0, 0.5, -0.25, 0.125] [-5, -1005, -2005]\n");
    free(out);

    twn_store *r;
    FaissIndex *ix;
    twn_outdir_meta m;
    twn_err err = {{0}};
    assert_int_equal(twn_outdir_read(dir, &r, &ix, &m, &err), 0);
    assert_string_equal(m.model, "TWN-4B");
    assert_string_equal(m.model_hash, "deadbeef");
    assert_int_equal(m.wal_seq, 42);
    assert_int_equal(m.shard, 1);
    assert_int_equal(m.n_shards, 4);
    assert_int_equal(m.count, 3);
    assert_int_equal(m.dim, 4);
    assert_int_equal(m.created_unix, 1700000000);
    assert_int_equal(twn_store_count(r), 3);
    for (int i = 0; i < 3; i++) {
        twn_store_row x, y;
        twn_store_get(s, i, &x);
        twn_store_get(r, i, &y);
        assert_string_equal(x.id, y.id);
        assert_int_equal(x.faiss_id, y.faiss_id);
        assert_int_equal(x.route, y.route);
        assert_int_equal(x.think_tokens, y.think_tokens);
        assert_true(x.p_think == y.p_think || (isnan(x.p_think) && isnan(y.p_think)));
        assert_memory_equal(x.vec, y.vec, 4 * sizeof *x.vec);
    }
    float q[4] = {0, 0, 0, 1};
    twn_part_hit h[2];
    assert_int_equal(twn_part_search(r, ix, NULL, q, 1, 2, h, &err), 0);
    assert_int_equal(h[0].row, 2);
    assert_int_equal(h[0].faiss_id, -2005);
    assert_true(h[0].score == 1.0f);
    twn_store_free(r);
    faiss_Index_free(ix);
    twn_store_free(s);
}

static void test_outdir_disagreements(void **state) {
    (void)state;
    twn_err err = {{0}};
    twn_store *s, *r;
    FaissIndex *ix;
    twn_outdir_meta m;
    char want[2400];
    const char *dir = tu_tmpdir("outdir_bad");

    /* A missing line. */
    write_dir(dir, &s);
    twn_store_free(s);
    const char *one =
        "{\"id\":\"a\",\"faiss_id\":-5,\"route\":\"hard\",\"p_think\":0.25,\"think_tokens\":7}\n";
    tu_write(in(dir, "items.jsonl"), one, strlen(one));
    assert_int_equal(twn_outdir_read(dir, &r, &ix, &m, &err), -1);
    snprintf(want, sizeof want, "%s: 1 lines, expected 3 as %s says", in(dir, "items.jsonl"),
             in(dir, "manifest.json"));
    assert_string_equal(err.msg, want);
    assert_null(r);
    assert_null(ix);

    /* The id map disagrees with items.jsonl. */
    write_dir(dir, &s);
    twn_store_free(s);
    char *items = tu_read(in(dir, "items.jsonl"), NULL);
    char *p = strstr(items, "-1005");
    p[4] = '6';
    tu_write(in(dir, "items.jsonl"), items, strlen(items));
    free(items);
    assert_int_equal(twn_outdir_read(dir, &r, &ix, &m, &err), -1);
    snprintf(want, sizeof want, "%s:2: faiss_id -1006, but %s row 1 says -1005",
             in(dir, "items.jsonl"), in(dir, "faiss_ids.npy"));
    assert_string_equal(err.msg, want);

    /* A bad route and a bad line. */
    write_dir(dir, &s);
    twn_store_free(s);
    items = tu_read(in(dir, "items.jsonl"), NULL);
    p = strstr(items, "\"hard\"");
    memcpy(p, "\"hxrd\"", 6);
    tu_write(in(dir, "items.jsonl"), items, strlen(items));
    free(items);
    assert_int_equal(twn_outdir_read(dir, &r, &ix, &m, &err), -1);
    snprintf(want, sizeof want, "%s:1: route \"hxrd\", expected \"easy\" or \"hard\"",
             in(dir, "items.jsonl"));
    assert_string_equal(err.msg, want);

    /* Embeddings of another shape. */
    write_dir(dir, &s);
    twn_store_free(s);
    twn_store *s2 = twn_store_new(4);
    float v[4] = {1, 0, 0, 0};
    twn_index_item it = {.id = "q", .vec = v};
    twn_store_append(s2, &it, 1, &err);
    char other[1100];
    snprintf(other, sizeof other, "%s.other", dir);
    FaissIndex *fl;
    char desc[TWN_INDEX_DESC_MAX];
    twn_build_new(4, "Flat", &fl, desc, &err);
    twn_outdir_meta m2 = {.factory = "Flat"};
    assert_int_equal(twn_outdir_write(other, s2, fl, &m2, &err), 0);
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "cp '%s' '%s'", in(other, "embeddings.npy"),
             in(dir, "embeddings.npy"));
    assert_int_equal(tu_run(cmd, NULL), 0);
    assert_int_equal(twn_outdir_read(dir, &r, &ix, &m, &err), -1);
    snprintf(want, sizeof want, "%s: dtype <f2 shape (1, 4), expected <f2 (3, 4) as %s says",
             in(dir, "embeddings.npy"), in(dir, "manifest.json"));
    assert_string_equal(err.msg, want);
    /* An index file with fewer vectors than the manifest. */
    write_dir(dir, &s);
    snprintf(cmd, sizeof cmd, "cp '%s' '%s'", in(other, "index.faiss"), in(dir, "index.faiss"));
    assert_int_equal(tu_run(cmd, NULL), 0);
    assert_int_equal(twn_outdir_read(dir, &r, &ix, &m, &err), -1);
    expect_contains(err.msg,
                    "index.faiss: d 4, ntotal 0, trained 1, metric 0; expected d 4, ntotal 3");
    /* Not a manifest we know. */
    const char *man = "{\"format\": \"other\", \"format_version\": 1}";
    tu_write(in(dir, "manifest.json"), man, strlen(man));
    assert_int_equal(twn_outdir_read(dir, &r, &ix, &m, &err), -1);
    snprintf(want, sizeof want, "%s: format \"other\" version 1, expected \"twn-index\" version 1",
             in(dir, "manifest.json"));
    assert_string_equal(err.msg, want);
    faiss_Index_free(fl);
    twn_store_free(s2);
    twn_store_free(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_half),
        cmocka_unit_test(test_i64map),
        cmocka_unit_test(test_fid_rule_and_collisions),
        cmocka_unit_test(test_row_indexes_at_scale),
        cmocka_unit_test(test_same_update_topk),
        cmocka_unit_test(test_outdir_round_trip),
        cmocka_unit_test(test_outdir_disagreements),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
