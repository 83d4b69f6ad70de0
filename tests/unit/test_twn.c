/* test_twn.c — TWN inference (engine/twn.c) on the tiny checkpoint from `twn mkmodel`:
 * routes and modes, budget selection, continuous batching == items run alone, determinism,
 * never-mode == the gate pass's pooled state, per-item failures, and `twn embed` end to end with
 * malformed input dead-lettered. */
#define _GNU_SOURCE /* memmem */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/twn.h"
#include "tests/testutil.h"
#include "util/mem.h"

static twn_model *M;

static const char *texts[] = {
    "A red bicycle leaning against a brick wall.",
    "Quarterly revenue grew 12% while operating costs fell.",
    "量子コンピュータは重ね合わせを利用する。",
    "def add(a, b):\n    return a + b",
    "🚲🧱 on a sunny day",
    "Which of these animals can fly: penguin, ostrich, sparrow?",
    "The mitochondria is the powerhouse of the cell.",
    "Explain why the sky is blue at noon and red at sunset.",
};
#define N_TEXTS ((int)(sizeof texts / sizeof *texts))

static void items_of(twn_item *it) {
    static char ids[N_TEXTS][16];
    for (int i = 0; i < N_TEXTS; i++) {
        snprintf(ids[i], sizeof ids[i], "item-%d", i);
        it[i] = (twn_item){.id = ids[i], .text = texts[i]};
    }
}

static int setup(void **st) {
    twn_err e;
    if (twn_model_load(tu_tiny_model(), &M, &e)) fail_msg("%s", e.msg);
    return 0;
}
static int teardown(void **st) {
    twn_model_free(M);
    return 0;
}

static void run(const twn_item *it, int n, const char *mode, twn_result *res) {
    twn_opts o;
    twn_opts_default(&o);
    twn_err e;
    assert_int_equal(twn_mode_parse(mode, &o, &e), 0);
    if (twn_embed_items(M, it, n, &o, res, &e)) fail_msg("%s", e.msg);
}

static void test_modes(void **st) {
    twn_item it[N_TEXTS];
    items_of(it);
    twn_result never[N_TEXTS], ad[N_TEXTS], al[N_TEXTS];
    run(it, N_TEXTS, "never", never);
    run(it, N_TEXTS, "adaptive", ad);
    run(it, N_TEXTS, "always", al);
    int hard = 0, dim = twn_model_dim(M);
    for (int i = 0; i < N_TEXTS; i++) {
        assert_null(never[i].error);
        assert_null(ad[i].error);
        assert_false(never[i].hard);
        assert_true(isnan(never[i].p_think));
        assert_true(al[i].hard);
        assert_true(ad[i].p_think > 0 && ad[i].p_think < 1);
        assert_true(fabsf(ad[i].p_think - al[i].p_think) < 1e-6); /* always still reports it */
        assert_int_equal(ad[i].hard, ad[i].p_think >= M->man.threshold);
        double norm = 0;
        for (int k = 0; k < dim; k++) norm += (double)ad[i].embedding[k] * ad[i].embedding[k];
        assert_true(fabs(norm - 1.0) < 1e-5);
        /* an easy item's embedding IS the gate pass's pooled state: equal to mode never */
        if (!ad[i].hard) {
            assert_true(tu_max_abs(ad[i].embedding, never[i].embedding, (size_t)dim) < 1e-6);
            assert_int_equal(ad[i].think_tokens, 0);
        } else {
            hard++;
            assert_true(tu_max_abs(ad[i].embedding, al[i].embedding, (size_t)dim) < 1e-6);
        }
        /* thinking changes the embedding and is bounded by max_think_tokens */
        assert_true(tu_max_abs(al[i].embedding, never[i].embedding, (size_t)dim) > 1e-3);
        assert_true(al[i].think_tokens >= 1 && al[i].think_tokens <= M->man.max_think_tokens);
        assert_true(al[i].n_cot <= al[i].think_tokens);
        assert_non_null(al[i].cot);
    }
    printf("adaptive: %d of %d items hard\n", hard, N_TEXTS);
    for (int i = 0; i < N_TEXTS; i++) {
        twn_result_free(&never[i]);
        twn_result_free(&ad[i]);
        twn_result_free(&al[i]);
    }
}

/* Continuous batching mixes gate prefills, CoT decodes and embedding passes of different items
 * in one step; each item's result must equal running it alone. */
static void test_batch_equals_alone(void **st) {
    twn_item it[N_TEXTS];
    items_of(it);
    twn_result all[N_TEXTS], one;
    run(it, N_TEXTS, "always", all);
    for (int i = 0; i < N_TEXTS; i++) {
        run(&it[i], 1, "always", &one);
        assert_int_equal(one.n_cot, all[i].n_cot);
        assert_memory_equal(one.cot_ids, all[i].cot_ids, sizeof(int32_t) * (size_t)one.n_cot);
        double d = tu_max_abs(one.embedding, all[i].embedding, (size_t)one.dim);
        assert_true(d < 1e-5);
        twn_result_free(&one);
        twn_result_free(&all[i]);
    }
}

static void test_budget(void **st) {
    twn_item it[N_TEXTS];
    items_of(it);
    twn_result r[N_TEXTS];
    run(it, N_TEXTS, "budget=0.25", r);
    int hard = 0;
    float min_hard = 2, max_easy = -1;
    for (int i = 0; i < N_TEXTS; i++) {
        hard += r[i].hard;
        if (r[i].hard && r[i].p_think < min_hard) min_hard = r[i].p_think;
        if (!r[i].hard && r[i].p_think > max_easy) max_easy = r[i].p_think;
    }
    assert_int_equal(hard, 2); /* ceil(0.25 * 8) */
    assert_true(min_hard >= max_easy);
    for (int i = 0; i < N_TEXTS; i++) twn_result_free(&r[i]);
    twn_opts o;
    twn_err e;
    assert_int_equal(twn_mode_parse("budget=1.5", &o, &e), -1);
    assert_non_null(strstr(e.msg, "budget must be a fraction in [0, 1]"));
    assert_int_equal(twn_mode_parse("sometimes", &o, &e), -1);
    assert_non_null(strstr(e.msg, "expected adaptive, never, always or budget=F"));
}

/* The stop rule (engine/manifest.h, scripts/reference StopScanner): stop strings are found in the
 * raw bytes of the generated tokens; the earliest-starting occurrence wins; the CoT is the tokens
 * before the one holding the stop's first byte; think_tokens counts through the completing token.
 * Stop strings are cut out of a first, stop-free greedy run, so the test knows where they occur. */
static void test_stop_rule(void **st) {
    twn_item it = {.id = "s", .text = texts[7]};
    char *saved[TWN_MAX_STOPS];
    int n_saved = M->man.n_stop, max_saved = M->man.max_think_tokens;
    memcpy(saved, M->man.stop, sizeof saved);
    M->man.n_stop = 0;
    M->man.max_think_tokens = 24;
    twn_result g;
    run(&it, 1, "always", &g);
    assert_int_equal(g.think_tokens, 24);
    assert_int_equal(g.n_cot, 24);
    /* bytes and token starts of the stop-free generation */
    char buf[24 * 256];
    size_t start[25], n = 0;
    for (int i = 0; i < 24; i++) {
        size_t nb;
        const char *b = twn_tok_bytes(M->tok, g.cot_ids[i], &nb);
        start[i] = n;
        memcpy(buf + n, b, nb);
        n += nb;
    }
    start[24] = n;
    /* token k and k+1 non-empty, no NUL; stop1 = last byte of k + first byte of k+1 (straddles),
     * stop2 = all of token k+1 (starts later, completes at the same token); neither earlier. */
    int k = -1;
    char s1[3] = {0}, s2[256] = {0};
    for (int c = 2; c < 20 && k < 0; c++) {
        size_t l1 = start[c + 1] - start[c], l2 = start[c + 2] - start[c + 1];
        if (!l1 || !l2 || memchr(buf, 0, start[c + 2])) continue;
        s1[0] = buf[start[c + 1] - 1], s1[1] = buf[start[c + 1]];
        memcpy(s2, buf + start[c + 1], l2);
        s2[l2] = 0;
        if (memmem(buf, start[c + 1] + 1, s1, 2) != buf + start[c + 1] - 1) continue;
        if (memmem(buf, start[c + 2], s2, l2) != buf + start[c + 1]) continue;
        k = c;
    }
    assert_true(k >= 2);
    M->man.stop[0] = s2;
    M->man.stop[1] = s1;
    M->man.n_stop = 2;
    twn_result r;
    run(&it, 1, "always", &r);
    assert_int_equal(r.think_tokens, k + 2);
    assert_int_equal(r.n_cot, k); /* stop1 starts inside token k: token k goes too */
    assert_memory_equal(r.cot_ids, g.cot_ids, sizeof(int32_t) * (size_t)k);
    twn_result_free(&r);
    M->man.n_stop = 1; /* stop2 alone: the CoT keeps token k */
    run(&it, 1, "always", &r);
    assert_int_equal(r.think_tokens, k + 2);
    assert_int_equal(r.n_cot, k + 1);
    twn_result_free(&r);
    twn_result_free(&g);
    memcpy(M->man.stop, saved, sizeof saved);
    M->man.n_stop = n_saved;
    M->man.max_think_tokens = max_saved;
}

/* token:<t> pooling: the last occurrence among the prompt ids; an item without it fails. */
static void test_token_pooling(void **st) {
    twn_pooling saved = M->man.pooling;
    char *saved_tok = M->man.pool_token;
    int32_t saved_id = M->pool_token_id;
    M->man.pooling = TWN_POOL_TOKEN;
    M->man.pool_token = "Hello";
    M->pool_token_id = twn_tok_id(M->tok, "Hello");
    assert_int_equal(M->pool_token_id, 9707);
    twn_item it[2] = {{.id = "has", .text = "Hello there, Hello again"},
                      {.id = "lacks", .text = "nothing to see"}};
    twn_result r[2];
    run(it, 2, "never", r);
    assert_null(r[0].error);
    assert_non_null(r[1].error);
    assert_non_null(strstr(r[1].error, "pooling token:Hello: the token (id 9707) does not occur"));
    /* the pooled row is not the last one: differs from last_token pooling */
    M->man.pooling = TWN_POOL_LAST_TOKEN;
    twn_result last;
    run(it, 1, "never", &last);
    assert_true(tu_max_abs(last.embedding, r[0].embedding, (size_t)last.dim) > 1e-3);
    twn_result_free(&last);
    for (int i = 0; i < 2; i++) twn_result_free(&r[i]);
    M->man.pooling = saved;
    M->man.pool_token = saved_tok;
    M->pool_token_id = saved_id;
}

/* The pipeline's split: gate pass (hard items deferred) then reasoning pass on the hard ones
 * gives exactly the one-call result, item by item. */
static void test_split_passes(void **st) {
    twn_item it[N_TEXTS];
    items_of(it);
    twn_result all[N_TEXTS], gate[N_TEXTS];
    twn_opts o;
    twn_err e;
    twn_opts_default(&o);
    assert_int_equal(twn_mode_parse("always", &o, &e), 0); /* every item hard: all paths run */
    o.mode = TWN_MODE_BUDGET;
    o.budget = 0.5;
    if (twn_embed_items(M, it, N_TEXTS, &o, all, &e)) fail_msg("%s", e.msg);
    o.pass = TWN_PASS_GATE;
    if (twn_embed_items(M, it, N_TEXTS, &o, gate, &e)) fail_msg("%s", e.msg);
    twn_item hard[N_TEXTS];
    int idx[N_TEXTS], nh = 0;
    for (int i = 0; i < N_TEXTS; i++) {
        assert_null(gate[i].error);
        assert_int_equal(gate[i].hard, all[i].hard);
        assert_true(gate[i].p_think == all[i].p_think);
        if (!gate[i].hard) {
            assert_false(gate[i].deferred);
            assert_memory_equal(gate[i].embedding, all[i].embedding, sizeof(float) * gate[i].dim);
            continue;
        }
        assert_true(gate[i].deferred);
        assert_null(gate[i].embedding);
        assert_int_equal(gate[i].think_tokens, 0);
        hard[nh] = it[i];
        hard[nh].p_think = gate[i].p_think;
        idx[nh++] = i;
    }
    assert_int_equal(nh, 4); /* budget 0.5 of 8 */
    twn_result rs[N_TEXTS];
    o.pass = TWN_PASS_REASON;
    if (twn_embed_items(M, hard, nh, &o, rs, &e)) fail_msg("%s", e.msg);
    for (int k = 0; k < nh; k++) {
        const twn_result *a = &all[idx[k]];
        assert_null(rs[k].error);
        assert_true(rs[k].hard);
        assert_true(rs[k].p_think == a->p_think);
        assert_int_equal(rs[k].think_tokens, a->think_tokens);
        assert_int_equal(rs[k].n_cot, a->n_cot);
        assert_true(tu_max_abs(rs[k].embedding, a->embedding, (size_t)a->dim) < 1e-6);
        twn_result_free(&rs[k]);
    }
    for (int i = 0; i < N_TEXTS; i++) {
        twn_result_free(&all[i]);
        twn_result_free(&gate[i]);
    }
}

static void test_item_failures(void **st) {
    const char *imgs[] = {"cat.jpg"};
    twn_item it[3] = {{.id = "ok", .text = "fine"},
                      {.id = "img", .text = "x", .images = imgs, .n_images = 1},
                      {.id = "empty", .text = ""}};
    twn_result r[3];
    run(it, 3, "adaptive", r);
    assert_null(r[0].error);
    assert_non_null(r[1].error);
    assert_non_null(strstr(r[1].error, "image"));
    assert_null(r[1].embedding);
    assert_null(r[2].error); /* an empty text is still a prompt (template + queries) */
    for (int i = 0; i < 3; i++) twn_result_free(&r[i]);
}

static void test_embed_cli(void **st) {
    const char *dir = tu_tmpdir("embed-cli");
    char in[1024], out[1024], cmd[4096];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    const char *jsonl = "{\"id\": \"a\", \"text\": \"hello world\"}\n"
                        "{\"id\": \"b\", \"text\": \n"
                        "[1, 2]\n"
                        "{\"text\": \"no id\"}\n"
                        "{\"id\": 7, \"text\": \"numeric id\", \"instruction\": \"Find: \"}\n"
                        "{\"id\": \"c\"}\n"
                        "{\"id\": \"d\", \"text\": \"x\", \"image\": \"missing.png\"}\n";
    tu_write(in, jsonl, strlen(jsonl));
    snprintf(cmd, sizeof cmd, "'%s' embed --model '%s' --input '%s' --out '%s' --quiet", TWN_BIN,
             tu_tiny_model(), in, out);
    char *log = NULL;
    int rc = tu_run(cmd, &log);
    if (rc) fail_msg("twn embed failed (%d): %s", rc, log);
    free(log);
    char p[1200];
    snprintf(p, sizeof p, "%s/dead_letter.jsonl", out);
    char *dl = tu_read(p, NULL);
    assert_non_null(strstr(dl, "\"line\": 2") ?: strstr(dl, "\"line\":2"));
    assert_non_null(strstr(dl, "invalid JSON"));
    assert_non_null(strstr(dl, "expected an object"));
    assert_non_null(strstr(dl, "\\\"id\\\" is missing"));
    assert_non_null(strstr(dl, "neither \\\"text\\\" nor \\\"image\\\""));
    assert_non_null(strstr(dl, "\"id\":\"d\""));
    int lines = 0;
    for (char *c = dl; *c; c++) lines += *c == '\n';
    assert_int_equal(lines, 5);
    free(dl);
    snprintf(p, sizeof p, "%s/items.jsonl", out);
    char *items = tu_read(p, NULL);
    assert_non_null(strstr(items, "\"id\":\"a\",\"row\":0"));
    assert_non_null(strstr(items, "\"id\":\"7\",\"row\":1"));
    free(items);
    snprintf(p, sizeof p, "%s/embeddings.npy", out);
    size_t n;
    char *npy = tu_read(p, &n);
    int dim = twn_model_dim(M);
    assert_int_equal(n, 128 + 2 * (size_t)dim * 4);
    assert_memory_equal(npy, "\x93NUMPY", 6);
    char shape[64];
    snprintf(shape, sizeof shape, "'shape': (2, %d)", dim);
    assert_non_null(strstr(npy + 10, shape));
    /* row 0 equals the library's embedding of the same item */
    twn_item it = {.id = "a", .text = "hello world"};
    twn_result r;
    run(&it, 1, "adaptive", &r);
    assert_true(tu_max_abs((const float *)(npy + 128), r.embedding, (size_t)dim) < 1e-6);
    twn_result_free(&r);
    free(npy);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_modes),         cmocka_unit_test(test_batch_equals_alone),
        cmocka_unit_test(test_budget),        cmocka_unit_test(test_item_failures),
        cmocka_unit_test(test_embed_cli),     cmocka_unit_test(test_stop_rule),
        cmocka_unit_test(test_token_pooling), cmocka_unit_test(test_split_passes),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
