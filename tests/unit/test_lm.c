/* test_lm.c — self-consistency of the CPU decoder (engine/lm.c) on an in-memory random model:
 * KV-cache decode == full recompute, chunked prefill == one prefill, a ragged batch == its
 * sequences alone, per-row LoRA in a mixed batch == each adapter alone == merged weights, and a
 * step's rows never see another sequence.  No files: the model is built here from a seed. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/lm.h"
#include "tests/testutil.h"
#include "util/mem.h"
#include "util/rng.h"

enum { H = 48, I = 80, NH = 6, NKV = 2, D = 16, V = 97, L = 3, R = 4 };

static float *randn(twn_rng *g, size_t n, float std, float mean) {
    float *p = twn_malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = mean + std * (float)twn_rng_normal(g);
    return p;
}

static twn_lm *make_lm(uint64_t seed) {
    twn_rng g;
    twn_rng_seed(&g, seed);
    twn_lm *lm = twn_calloc(1, sizeof *lm);
    lm->H = H, lm->I = I, lm->nh = NH, lm->nkv = NKV, lm->D = D, lm->V = V, lm->L = L;
    lm->cfg.rms_norm_eps = 1e-6;
    lm->cfg.rope_theta = 5e6;
    lm->embed = randn(&g, (size_t)V * H, 1.0f, 0);
    lm->lm_head = randn(&g, (size_t)V * H, 0.2f, 0);
    lm->final_norm = randn(&g, H, 0.1f, 1);
    lm->layers = twn_calloc(L, sizeof *lm->layers);
    const int sh[TWN_NPROJ][2] = {{NH * D, H}, {NKV * D, H}, {NKV * D, H}, {H, NH * D},
                                  {I, H},      {I, H},       {H, I}};
    for (int l = 0; l < L; l++) {
        twn_lm_layer *ly = &lm->layers[l];
        ly->in_norm = randn(&g, H, 0.1f, 1);
        ly->post_norm = randn(&g, H, 0.1f, 1);
        ly->q_norm = randn(&g, D, 0.1f, 1);
        ly->k_norm = randn(&g, D, 0.1f, 1);
        for (int j = 0; j < TWN_NPROJ; j++)
            ly->w[j] = randn(&g, (size_t)sh[j][0] * sh[j][1], 1.0f / sqrtf((float)sh[j][1]), 0);
    }
    lm->inv_freq = twn_malloc(sizeof(float) * D / 2);
    lm->rope_stream = twn_malloc(D / 2);
    int sec[3] = {4, 2, 2};
    for (int j = 0; j < D / 2; j++) {
        lm->inv_freq[j] = 1.0f / powf(5e6f, (float)(2 * j) / D);
        lm->rope_stream[j] = (j % 3 == 1 && j < 3 * sec[1])   ? 1
                             : (j % 3 == 2 && j < 3 * sec[2]) ? 2
                                                              : 0;
    }
    return lm;
}

static const char *const projn[TWN_NPROJ] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};

static twn_adapter *make_adapter(const char *name, uint64_t seed) {
    twn_rng g;
    twn_rng_seed(&g, seed);
    twn_adapter *a = twn_calloc(1, sizeof *a);
    a->name = twn_strdup(name);
    a->dir = twn_strdup("(memory)");
    a->r = R;
    a->n_loras = L * TWN_NPROJ;
    a->loras = twn_calloc((size_t)a->n_loras, sizeof *a->loras);
    const int in[TWN_NPROJ] = {H, H, H, NH * D, H, H, I};
    const int out[TWN_NPROJ] = {NH * D, NKV * D, NKV * D, H, I, I, H};
    for (int l = 0; l < L; l++)
        for (int j = 0; j < TWN_NPROJ; j++) {
            twn_lora *lo = &a->loras[l * TWN_NPROJ + j];
            char m[128];
            snprintf(m, sizeof m, "model.language_model.layers.%d.%s", l, projn[j]);
            lo->module = twn_strdup(m);
            lo->r = R;
            lo->in_features = in[j];
            lo->out_features = out[j];
            lo->scaling = 2.0f;
            lo->A = randn(&g, (size_t)R * in[j], 0.3f / sqrtf((float)in[j]), 0);
            lo->B = randn(&g, (size_t)out[j] * R, 0.3f, 0);
        }
    return a;
}

static void free_adapter(twn_adapter *a) {
    for (int i = 0; i < a->n_loras; i++) {
        twn_free(a->loras[i].module);
        twn_free(a->loras[i].A);
        twn_free(a->loras[i].B);
    }
    twn_free(a->loras);
    twn_free(a->name);
    twn_free(a->dir);
    twn_free(a);
}

static void free_lm(twn_lm *lm) {
    twn_lm_free(lm);
}

/* Runs one sequence alone in one prefill; returns final hidden rows [n,H] and last logits. */
static void run_single(const twn_lm *lm, const int32_t *ids, int n, int adapter, float *hid,
                       float *logits) {
    twn_kv kv;
    twn_kv_init(&kv, lm);
    twn_lm_seq s = {
        .kv = &kv, .n = n, .ids = ids, .adapter = adapter, .hidden = hid, .logits = logits};
    twn_err e;
    if (twn_lm_forward(lm, &s, 1, NULL, NULL, &e)) fail_msg("%s", e.msg);
    twn_kv_free(&kv);
}

static int32_t toks[40];

static int setup(void **st) {
    for (int i = 0; i < 40; i++) toks[i] = (int32_t)((i * 37 + 11) % V);
    *st = make_lm(7);
    return 0;
}
static int teardown(void **st) {
    free_lm(*st);
    return 0;
}

static void test_kv_decode_equals_recompute(void **st) {
    twn_lm *lm = *st;
    int n = 20;
    float *full = twn_malloc(sizeof(float) * n * H), logit_full[V];
    run_single(lm, toks, n, TWN_NO_ADAPTER, full, logit_full);
    /* prefill 12, then 8 single-token decode steps */
    twn_kv kv;
    twn_kv_init(&kv, lm);
    float *step = twn_malloc(sizeof(float) * n * H), logit[V];
    twn_err e;
    twn_lm_seq s = {.kv = &kv, .n = 12, .ids = toks, .adapter = TWN_NO_ADAPTER, .hidden = step};
    assert_int_equal(twn_lm_forward(lm, &s, 1, NULL, NULL, &e), 0);
    for (int t = 12; t < n; t++) {
        twn_lm_seq d = {.kv = &kv,
                        .n = 1,
                        .ids = &toks[t],
                        .adapter = TWN_NO_ADAPTER,
                        .hidden = step + (size_t)t * H,
                        .logits = logit};
        assert_int_equal(twn_lm_forward(lm, &d, 1, NULL, NULL, &e), 0);
    }
    assert_int_equal(kv.len, n);
    assert_int_equal(kv.next_pos, n);
    double rel = tu_max_rel(step, full, (size_t)n * H, 1.0);
    printf("kv decode vs recompute: max rel %.3g\n", rel);
    assert_true(rel < 1e-4);
    assert_true(tu_max_rel(logit, logit_full, V, 1.0) < 1e-5);
    twn_kv_free(&kv);
    twn_free(full);
    twn_free(step);
}

static void test_ragged_batch_equals_singles(void **st) {
    twn_lm *lm = *st;
    const int lens[4] = {7, 1, 19, 12}, offs[4] = {0, 7, 8, 27};
    float *single[4], *batch[4], ls[4][V], lb[4][V];
    twn_kv kv[4];
    twn_lm_seq s[4];
    for (int i = 0; i < 4; i++) {
        single[i] = twn_malloc(sizeof(float) * lens[i] * H);
        batch[i] = twn_malloc(sizeof(float) * lens[i] * H);
        run_single(lm, toks + offs[i], lens[i], TWN_NO_ADAPTER, single[i], ls[i]);
        twn_kv_init(&kv[i], lm);
        s[i] = (twn_lm_seq){.kv = &kv[i],
                            .n = lens[i],
                            .ids = toks + offs[i],
                            .adapter = TWN_NO_ADAPTER,
                            .hidden = batch[i],
                            .logits = lb[i]};
    }
    twn_err e;
    assert_int_equal(twn_lm_forward(lm, s, 4, NULL, NULL, &e), 0);
    for (int i = 0; i < 4; i++) {
        double rel = tu_max_rel(batch[i], single[i], (size_t)lens[i] * H, 1.0);
        printf("seq %d (len %d): batch vs single max rel %.3g\n", i, lens[i], rel);
        assert_true(rel < 1e-5);
        assert_true(tu_max_rel(lb[i], ls[i], V, 1.0) < 1e-5);
        twn_kv_free(&kv[i]);
        twn_free(single[i]);
        twn_free(batch[i]);
    }
}

static void test_chunked_prefill(void **st) {
    twn_lm *lm = *st;
    int n = 30;
    float *full = twn_malloc(sizeof(float) * n * H), *chunk = twn_malloc(sizeof(float) * n * H);
    run_single(lm, toks, n, TWN_NO_ADAPTER, full, NULL);
    twn_kv kv;
    twn_kv_init(&kv, lm);
    twn_err e;
    for (int a = 0; a < n;) {
        int m = a == 0 ? 9 : 11 < n - a ? 11 : n - a;
        twn_lm_seq s = {.kv = &kv,
                        .n = m,
                        .ids = toks + a,
                        .adapter = TWN_NO_ADAPTER,
                        .hidden = chunk + (size_t)a * H};
        assert_int_equal(twn_lm_forward(lm, &s, 1, NULL, NULL, &e), 0);
        a += m;
    }
    assert_true(tu_max_rel(chunk, full, (size_t)n * H, 1.0) < 1e-5);
    twn_kv_free(&kv);
    twn_free(full);
    twn_free(chunk);
}

/* W' = W + s * B A for every projection: the merged model without adapters. */
static twn_lm *merged(const twn_adapter *a) {
    twn_lm *m = make_lm(7);
    for (int l = 0; l < L; l++)
        for (int j = 0; j < TWN_NPROJ; j++) {
            const twn_lora *lo = &a->loras[l * TWN_NPROJ + j];
            float *w = m->layers[l].w[j];
            for (int o = 0; o < lo->out_features; o++)
                for (int i = 0; i < lo->in_features; i++) {
                    double d = 0;
                    for (int r = 0; r < lo->r; r++)
                        d += (double)lo->B[o * lo->r + r] * lo->A[r * lo->in_features + i];
                    w[(size_t)o * lo->in_features + i] += (float)(lo->scaling * d);
                }
        }
    return m;
}

static void test_per_row_lora(void **st) {
    (void)st;
    twn_lm *lm = make_lm(7);
    twn_adapter *ea = make_adapter("embedding", 100), *ra = make_adapter("reasoning", 200);
    int ie, ir;
    twn_err e;
    assert_int_equal(twn_lm_attach_adapter(lm, ea, &ie, &e), 0);
    assert_int_equal(twn_lm_attach_adapter(lm, ra, &ir, &e), 0);
    /* a mixed step: embedding prefill, reasoning prefill, base-only prefill, embedding again */
    const int lens[4] = {9, 14, 6, 5}, offs[4] = {0, 9, 23, 29};
    const int ad[4] = {ie, ir, TWN_NO_ADAPTER, ie};
    float *mixed[4], *alone[4], *merge[4];
    twn_kv kv[4];
    twn_lm_seq s[4];
    for (int i = 0; i < 4; i++) {
        mixed[i] = twn_malloc(sizeof(float) * lens[i] * H);
        alone[i] = twn_malloc(sizeof(float) * lens[i] * H);
        merge[i] = twn_malloc(sizeof(float) * lens[i] * H);
        twn_kv_init(&kv[i], lm);
        s[i] = (twn_lm_seq){.kv = &kv[i],
                            .n = lens[i],
                            .ids = toks + offs[i],
                            .adapter = ad[i],
                            .hidden = mixed[i]};
        run_single(lm, toks + offs[i], lens[i], ad[i], alone[i], NULL);
        twn_lm *mm = ad[i] == TWN_NO_ADAPTER ? make_lm(7) : merged(ad[i] == ie ? ea : ra);
        run_single(mm, toks + offs[i], lens[i], TWN_NO_ADAPTER, merge[i], NULL);
        free_lm(mm);
    }
    assert_int_equal(twn_lm_forward(lm, s, 4, NULL, NULL, &e), 0);
    for (int i = 0; i < 4; i++) {
        double r1 = tu_max_rel(mixed[i], alone[i], (size_t)lens[i] * H, 1.0);
        double r2 = tu_max_rel(mixed[i], merge[i], (size_t)lens[i] * H, 1.0);
        printf("seq %d adapter %d: mixed vs alone %.3g, vs merged weights %.3g\n", i, ad[i], r1,
               r2);
        assert_true(r1 < 1e-5);
        assert_true(r2 < 1e-4); /* merging rounds W + sBA in fp32: not bit-exact by design */
        twn_kv_free(&kv[i]);
        twn_free(mixed[i]);
        twn_free(alone[i]);
        twn_free(merge[i]);
    }
    /* the adapters must actually change the output, or the test above proves nothing */
    float *base = twn_malloc(sizeof(float) * 9 * H);
    run_single(lm, toks, 9, TWN_NO_ADAPTER, base, NULL);
    float *emb = twn_malloc(sizeof(float) * 9 * H);
    run_single(lm, toks, 9, ie, emb, NULL);
    double delta = tu_max_rel(emb, base, 9 * H, 1e-3);
    printf("embedding adapter vs base: max rel %.3g\n", delta);
    assert_true(delta > 1e-2);
    twn_free(base);
    twn_free(emb);
    free_lm(lm);
    free_adapter(ea);
    free_adapter(ra);
}

static void test_bad_token_id(void **st) {
    twn_lm *lm = *st;
    twn_kv kv;
    twn_kv_init(&kv, lm);
    int32_t bad[2] = {3, V + 5};
    twn_lm_seq s = {.kv = &kv, .n = 2, .ids = bad, .adapter = TWN_NO_ADAPTER};
    twn_err e;
    assert_int_equal(twn_lm_forward(lm, &s, 1, NULL, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "token id 102 is outside the vocabulary [0, 97)"));
    assert_int_equal(kv.len, 0); /* nothing appended on failure */
    s.adapter = 3;
    bad[1] = 4;
    assert_int_equal(twn_lm_forward(lm, &s, 1, NULL, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "adapter index 3 is not attached"));
    twn_kv_free(&kv);
}

/* Explicit 3-stream positions equal on all streams == default sequential positions (text-only
 * M-RoPE reduces to 1-D RoPE), and distinct streams change the result. */
static void test_mrope_positions(void **st) {
    twn_lm *lm = *st;
    int n = 10;
    int32_t pos[30];
    for (int i = 0; i < n; i++) pos[i] = pos[n + i] = pos[2 * n + i] = i;
    float *a = twn_malloc(sizeof(float) * n * H), *b = twn_malloc(sizeof(float) * n * H);
    run_single(lm, toks, n, TWN_NO_ADAPTER, a, NULL);
    twn_kv kv;
    twn_kv_init(&kv, lm);
    twn_lm_seq s = {
        .kv = &kv, .n = n, .ids = toks, .pos = pos, .adapter = TWN_NO_ADAPTER, .hidden = b};
    twn_err e;
    assert_int_equal(twn_lm_forward(lm, &s, 1, NULL, NULL, &e), 0);
    assert_true(tu_max_rel(a, b, (size_t)n * H, 1e-3) < 1e-6);
    assert_int_equal(kv.next_pos, n);
    twn_kv_free(&kv);
    for (int i = 0; i < n; i++) pos[n + i] = i / 2, pos[2 * n + i] = i % 3; /* H, W streams */
    twn_kv_init(&kv, lm);
    s.kv = &kv;
    assert_int_equal(twn_lm_forward(lm, &s, 1, NULL, NULL, &e), 0);
    assert_true(tu_max_rel(a, b, (size_t)n * H, 1e-3) > 1e-3);
    assert_int_equal(kv.next_pos, n); /* max over all streams + 1 */
    twn_kv_free(&kv);
    twn_free(a);
    twn_free(b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kv_decode_equals_recompute),
        cmocka_unit_test(test_ragged_batch_equals_singles),
        cmocka_unit_test(test_chunked_prefill),
        cmocka_unit_test(test_per_row_lora),
        cmocka_unit_test(test_bad_token_id),
        cmocka_unit_test(test_mrope_positions),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
