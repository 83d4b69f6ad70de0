/* test_run.c — `twn run` end to end: coordinator, gate, reasoning worker and indexers as threads
 * over inproc://, on real files, real ZeroMQ sockets and real FAISS shards.
 *
 *  - The tiny TWN model over the Debian-built sample corpus (image+text, image-only, text-only)
 *    plus malformed lines and a missing image: every good id is in exactly one shard, with the
 *    vector `twn embed` computes for it (within float16 storage rounding), the same route and
 *    think tokens; every bad line is dead-lettered with a reason.
 *  - The null engine over 20,000 items through 4 shards: exactly once, counts add up.
 *  - A re-run into the same output directory changes nothing.
 *
 * Size of the tiny-model corpus: N_TINY = 1000 items.  Measured on the 2-vCPU dev box
 * (load ~1.5): the tiny model costs ~23 ms per item in `twn embed` (43 items/s, 59% of the
 * sample corpus routes hard and thinks ~16 tokens) and ~17 ms per item in `twn run` (gate and
 * worker overlap), so 1000 items take ~45 s of test time here; 2000 would take ~80 s. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tensor.h"
#include "tests/testutil.h"
#include "util/mem.h"

enum { N_TINY = 1000 }; /* good items in the tiny-model corpus (see above) */

/* A float16 or float32 .npy matrix [rows, dim] (what index/outdir.c and util/npy.h write). */
typedef struct {
    float *v;
    int rows, dim;
} mat;

static mat npy_read(const char *path) {
    size_t n;
    char *b = tu_read(path, &n);
    assert_true(n > 10 && !memcmp(b, "\x93NUMPY", 6));
    size_t hl = (size_t)(unsigned char)b[8] | (size_t)(unsigned char)b[9] << 8, off = 10 + hl;
    char *hdr = b + 10;
    int f16 = strstr(hdr, "'<f2'") != NULL;
    assert_true(f16 || strstr(hdr, "'<f4'"));
    const char *sh = strstr(hdr, "'shape': (");
    assert_non_null(sh);
    mat m = {0};
    sscanf(sh + 10, "%d, %d", &m.rows, &m.dim);
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

/* Lines of a JSONL file as parsed objects. */
static json_t *jsonl_read(const char *path) {
    size_t n;
    char *b = tu_read(path, &n);
    json_t *arr = json_array();
    char *save = NULL;
    for (char *l = strtok_r(b, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        json_error_t je;
        json_t *o = json_loads(l, 0, &je);
        /* u64 keys (faiss ids, unit keys) above INT64_MAX are beyond jansson's integers */
        if (!o) o = json_loads(l, JSON_DECODE_INT_AS_REAL, &je);
        if (!o) fail_msg("%s: %s: %s", path, je.text, l);
        json_array_append_new(arr, o);
    }
    free(b);
    return arr;
}

/* An integer field that may have been read as a real (see jsonl_read). */
static long long jint(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_integer(v) ? (long long)json_integer_value(v) : (long long)json_real_value(v);
}

/* Every shard's current output: ids -> (vector, item metadata). */
typedef struct {
    json_t *items; /* id -> {"row": global row, ...} */
    mat all;
} shards;

static shards shards_read(const char *out, int n_shards) {
    shards s = {json_object(), {0}};
    size_t cap = 0;
    for (int k = 0; k < n_shards; k++) {
        char cur[1024], snap[1024], p[1200];
        snprintf(cur, sizeof cur, "%s/shard-%05d/CURRENT", out, k);
        size_t n;
        char *name = tu_read(cur, &n);
        while (n && (name[n - 1] == '\n' || name[n - 1] == ' ')) name[--n] = 0;
        snprintf(snap, sizeof snap, "%s/shard-%05d/%s", out, k, name);
        free(name);
        snprintf(p, sizeof p, "%s/embeddings.npy", snap);
        mat m = npy_read(p);
        snprintf(p, sizeof p, "%s/items.jsonl", snap);
        json_t *items = jsonl_read(p);
        assert_int_equal((int)json_array_size(items), m.rows);
        if (!s.all.dim) s.all.dim = m.dim;
        assert_int_equal(m.dim, s.all.dim);
        s.all.v = twn_realloc(s.all.v, sizeof(float) * (cap + (size_t)m.rows) * m.dim);
        memcpy(s.all.v + cap * m.dim, m.v, sizeof(float) * (size_t)m.rows * m.dim);
        size_t i;
        json_t *it;
        json_array_foreach(items, i, it) {
            const char *id = json_string_value(json_object_get(it, "id"));
            assert_non_null(id);
            if (json_object_get(s.items, id)) fail_msg("id %s is in the index twice", id);
            json_object_set_new(it, "row", json_integer((json_int_t)(cap + i)));
            json_object_set(s.items, id, it);
        }
        cap += (size_t)m.rows;
        s.all.rows = (int)cap;
        json_decref(items);
        twn_free(m.v);
    }
    return s;
}

static void shards_free(shards *s) {
    json_decref(s->items);
    twn_free(s->all.v);
}

static void test_tiny_model_end_to_end(void **st) {
    const char *dir = tu_tmpdir("run-tiny");
    char cmd[4096], in[1024], out[1024], emb[1024];
    snprintf(in, sizeof in, "%s/corpus/items.jsonl", dir);
    snprintf(out, sizeof out, "%s/run", dir);
    snprintf(emb, sizeof emb, "%s/embed", dir);
    snprintf(cmd, sizeof cmd,
             "/usr/bin/python3 %s/scripts/make_sample_corpus.py %s/corpus --items %d >/dev/null",
             TWN_SOURCE_DIR, dir, N_TINY);
    assert_int_equal(tu_run(cmd, NULL), 0);
    /* bad lines: malformed JSON, no id, a missing image */
    FILE *f = fopen(in, "a");
    fputs("{\"id\": \"broken\", \"text\": \n", f);
    fputs("{\"text\": \"no id here\"}\n", f);
    fputs("{\"id\": \"ghost\", \"text\": \"a ghost\", \"image\": \"images/none.png\"}\n", f);
    fclose(f);

    char *log = NULL;
    snprintf(cmd, sizeof cmd,
             "%s run --model %s --input %s --out %s --shards 3 --unit-items 40 2>&1", TWN_BIN,
             tu_tiny_model(), in, out);
    int rc = tu_run(cmd, &log);
    if (rc) fail_msg("twn run failed (%d): %s", rc, log);
    char want[64];
    snprintf(want, sizeof want, "items %d ", N_TINY + 3);
    assert_non_null(strstr(log, want));
    assert_non_null(strstr(log, "rejected 3 "));
    free(log);
    snprintf(cmd, sizeof cmd, "%s embed --model %s --input %s --out %s 2>&1", TWN_BIN,
             tu_tiny_model(), in, emb);
    assert_int_equal(tu_run(cmd, NULL), 0);

    shards s = shards_read(out, 3);
    char p[1200];
    snprintf(p, sizeof p, "%s/embeddings.npy", emb);
    mat ref = npy_read(p);
    snprintf(p, sizeof p, "%s/items.jsonl", emb);
    json_t *ref_items = jsonl_read(p);
    assert_int_equal((int)json_array_size(ref_items), N_TINY);
    assert_int_equal(s.all.rows, N_TINY); /* every good item once, nothing else */
    size_t i;
    json_t *r;
    int hard = 0;
    json_array_foreach(ref_items, i, r) {
        const char *id = json_string_value(json_object_get(r, "id"));
        json_t *got = json_object_get(s.items, id);
        if (!got) fail_msg("%s is missing from the index", id);
        int grow = (int)jint(got, "row");
        int rrow = (int)jint(r, "row");
        for (int k = 0; k < ref.dim; k++) {
            float a = s.all.v[(size_t)grow * ref.dim + k], b = ref.v[(size_t)rrow * ref.dim + k];
            if (fabsf(a - b) > 1e-3f * fmaxf(1.f, fabsf(b)))
                fail_msg("%s[%d]: index %g, twn embed %g", id, k, a, b);
        }
        assert_string_equal(json_string_value(json_object_get(got, "route")),
                            json_string_value(json_object_get(r, "route")));
        assert_int_equal(jint(got, "think_tokens"), jint(r, "think_tokens"));
        hard += !strcmp(json_string_value(json_object_get(r, "route")), "hard");
    }
    assert_true(hard > 0 && hard < N_TINY); /* both paths ran */

    /* twn search: an image-only item's own image as the query (same prompt, same model) finds
     * that item first with score 1 (float16 storage aside), merged over the 3 shards. */
    json_t *q =
        json_array_get(ref_items, 3); /* make_sample_corpus: every 5th from 3 is image-only */
    const char *qid = json_string_value(json_object_get(q, "id"));
    assert_non_null(strstr(qid, "emoji-"));
    char *res = NULL;
    snprintf(cmd, sizeof cmd,
             "%s search --model %s --index %s --image %s/corpus/images/%s.png -k 3 2>&1", TWN_BIN,
             tu_tiny_model(), out, dir, qid + 6);
    if (tu_run(cmd, &res)) fail_msg("twn search failed: %s", res);
    char first[256];
    float score = 0;
    const char *l1 = strstr(res, "\n  1  ");
    assert_non_null(l1);
    assert_int_equal(sscanf(l1, " 1 %f %255s", &score, first), 2);
    assert_string_equal(first, qid);
    assert_true(fabsf(score - 1.f) < 2e-3f);
    snprintf(want, sizeof want, "%d items in 3 shard(s)", N_TINY);
    assert_non_null(strstr(res, want));
    free(res);
    snprintf(p, sizeof p, "%s/dead_letter.jsonl", out);
    json_t *dl = jsonl_read(p);
    assert_int_equal((int)json_array_size(dl), 3);
    char *all = json_dumps(dl, 0);
    assert_non_null(strstr(all, "ghost"));
    assert_non_null(strstr(all, "none.png"));
    free(all);
    json_decref(dl);
    json_decref(ref_items);
    twn_free(ref.v);
    shards_free(&s);
}

static void test_null_engine_20k_items(void **st) {
    const char *dir = tu_tmpdir("run-null");
    char in[1024], out[1024], cmd[4096];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    snprintf(out, sizeof out, "%s/run", dir);
    FILE *f = fopen(in, "w");
    for (int i = 0; i < 20000; i++)
        fprintf(f, "{\"id\": \"n%05d\", \"text\": \"item %d\"}\n", i, i);
    fclose(f);
    for (int pass = 0; pass < 2; pass++) { /* the second run over the same output changes nothing */
        char *log = NULL;
        snprintf(cmd, sizeof cmd,
                 "%s run --engine null --dim 32 --input %s --out %s --shards 4 --gates 2 "
                 "--workers 2 --unit-items 500 2>&1",
                 TWN_BIN, in, out);
        int rc = tu_run(cmd, &log);
        if (rc) fail_msg("twn run failed (%d): %s", rc, log);
        free(log);
        shards s = shards_read(out, 4);
        assert_int_equal(s.all.rows, 20000);
        assert_int_equal((int)json_object_size(s.items), 20000);
        assert_non_null(json_object_get(s.items, "n00000"));
        assert_non_null(json_object_get(s.items, "n19999"));
        shards_free(&s);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_model_end_to_end),
        cmocka_unit_test(test_null_engine_20k_items),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
