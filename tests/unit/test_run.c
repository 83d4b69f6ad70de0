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

#include "tests/testutil.h"
#include "tests/unit/shard_out.h"
#include "util/mem.h"

enum { N_TINY = 1000 }; /* good items in the tiny-model corpus (see above) */

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

    tp_shards s = tp_shards_read(out, 3);
    char p[1200];
    snprintf(p, sizeof p, "%s/embeddings.npy", emb);
    tp_mat ref = tp_npy_read(p);
    snprintf(p, sizeof p, "%s/items.jsonl", emb);
    json_t *ref_items = tp_jsonl_read(p);
    assert_int_equal((int)json_array_size(ref_items), N_TINY);
    assert_int_equal(s.all.rows, N_TINY); /* every good item once, nothing else */
    size_t i;
    json_t *r;
    int hard = 0;
    json_array_foreach(ref_items, i, r) {
        const char *id = json_string_value(json_object_get(r, "id"));
        json_t *got = json_object_get(s.items, id);
        if (!got) fail_msg("%s is missing from the index", id);
        int grow = (int)tp_jint(got, "row");
        int rrow = (int)tp_jint(r, "row");
        for (int k = 0; k < ref.dim; k++) {
            float a = s.all.v[(size_t)grow * ref.dim + k], b = ref.v[(size_t)rrow * ref.dim + k];
            if (fabsf(a - b) > 1e-3f * fmaxf(1.f, fabsf(b)))
                fail_msg("%s[%d]: index %g, twn embed %g", id, k, a, b);
        }
        assert_string_equal(json_string_value(json_object_get(got, "route")),
                            json_string_value(json_object_get(r, "route")));
        assert_int_equal(tp_jint(got, "think_tokens"), tp_jint(r, "think_tokens"));
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
    json_t *dl = tp_jsonl_read(p);
    assert_int_equal((int)json_array_size(dl), 3);
    char *all = json_dumps(dl, 0);
    assert_non_null(strstr(all, "ghost"));
    assert_non_null(strstr(all, "none.png"));
    free(all);
    json_decref(dl);
    json_decref(ref_items);
    twn_free(ref.v);
    tp_shards_free(&s);
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
        tp_shards s = tp_shards_read(out, 4);
        assert_int_equal(s.all.rows, 20000);
        assert_int_equal((int)json_object_size(s.items), 20000);
        assert_non_null(json_object_get(s.items, "n00000"));
        assert_non_null(json_object_get(s.items, "n19999"));
        tp_shards_free(&s);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_model_end_to_end),
        cmocka_unit_test(test_null_engine_20k_items),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
