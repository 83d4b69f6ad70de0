/* test_backend.c — the backend seam (engine/backend.h) on any machine: the cpu backend gives
 * exactly twn_lm_forward's results (bit for bit) for a mixed ragged batch, argmax and pooled
 * reduce them like the scheduler does, `auto` falls back to cpu with the same reason the probe
 * gives, and an explicit module that is missing or is not a twn module is refused by name.
 * The scheduler on the seam: twn_embed_items (engine/twn.c, which runs every step through the
 * model's backend and takes the backend's argmax and pooled reductions) gives bit for bit what
 * the same passes give when built by hand on twn_lm_forward — gate passes of a batch in one
 * step, and a whole hard item (gate, greedy CoT, embedding pass).  The commands: `--backend cuda`
 * on a machine without a usable GPU exits 1 with one line naming what is missing, before the
 * model is read; `auto` runs on the CPU and says why; a bad kind is a usage error (2).
 * The GPU side of the seam is tests/unit/test_cuda.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backend.h"
#include "engine/cpu/ops.h"
#include "engine/twn.h"
#include "tests/testutil.h"
#include "tests/unit/random_lm.h"
#include "util/mem.h"

/* CUDA and AddressSanitizer do not mix (the driver's address-space reservations collide with
 * ASan's shadow memory, and LSan reports the driver's allocations), so under ASan no CUDA context
 * is created: the GPU checks run in the release build. */
#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif

static const rl_dims dims = {.H = 48,
                             .I = 80,
                             .nh = 6,
                             .nkv = 2,
                             .D = 16,
                             .V = 97,
                             .L = 3,
                             .R = 4,
                             .tied = false,
                             .section = {4, 2, 2}};

typedef struct {
    twn_lm *lm;
    twn_adapter *a0, *a1;
} fixture;

static int setup(void **st) {
    fixture *f = twn_calloc(1, sizeof *f);
    f->lm = rl_make_lm(&dims, 11);
    f->a0 = rl_make_adapter(&dims, "embedding", 12, 4, true, -1);
    f->a1 = rl_make_adapter(&dims, "reasoning", 13, 8, false, TWN_DOWN);
    int idx;
    twn_err e;
    if (twn_lm_attach_adapter(f->lm, f->a0, &idx, &e) || idx != 0 ||
        twn_lm_attach_adapter(f->lm, f->a1, &idx, &e) || idx != 1)
        return -1;
    *st = f;
    return 0;
}

static int teardown(void **st) {
    fixture *f = *st;
    twn_lm_free(f->lm);
    rl_free_adapter(f->a0);
    rl_free_adapter(f->a1);
    twn_free(f);
    return 0;
}

static void test_kind_parse(void **st) {
    (void)st;
    twn_backend_kind k;
    twn_err e;
    assert_int_equal(twn_backend_kind_parse("cpu", &k, &e), 0);
    assert_int_equal(k, TWN_BACKEND_CPU);
    assert_int_equal(twn_backend_kind_parse("cuda", &k, &e), 0);
    assert_int_equal(k, TWN_BACKEND_CUDA);
    assert_int_equal(twn_backend_kind_parse("auto", &k, &e), 0);
    assert_int_equal(k, TWN_BACKEND_AUTO);
    assert_int_equal(twn_backend_kind_parse("gpu", &k, &e), -1);
    assert_string_equal(e.msg, "backend 'gpu': expected cpu, cuda or auto");
    assert_string_equal(twn_backend_kind_name(TWN_BACKEND_CUDA), "cuda");
}

/* The step's inputs: A (adapter 0) 7 rows, the last two given as vectors (query tokens); B
 * (adapter 1) 4 tokens; C (no adapter) 3 rows with 3-stream positions and DeepStack. */
static const int32_t ids_a[7] = {5, 17, 42, 8, 91, TWN_TOKEN_EMBED, TWN_TOKEN_EMBED};
static const int32_t ids_b[4] = {3, 3, 60, 96};
static const int32_t ids_c[3] = {1, 2, 4};
static const int32_t pos_c[9] = {0, 1, 1, 0, 1, 2, 0, 2, 7}; /* [3][3] stream-major */
static const int32_t ds_rows_c[2] = {0, 2};

static float *vec(size_t n, uint64_t seed) {
    twn_rng g;
    twn_rng_seed(&g, seed);
    float *p = twn_malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = (float)twn_rng_normal(&g);
    return p;
}

static void test_cpu_matches_lm_forward(void **st) {
    fixture *f = *st;
    const int H = dims.H, V = dims.V;
    float *emb_a = vec((size_t)7 * H, 1), *feat = vec((size_t)2 * 2 * H, 2);
    twn_lm_deepstack ds = {.n_layers = 2, .n_rows = 2, .rows = ds_rows_c, .feat = feat};
    twn_err e;

    /* reference: twn_lm_forward on plain twn_kv caches */
    twn_kv kv[3];
    float ref_hid_a[7 * 48], ref_hid_c[3 * 48], ref_log_b[97], ref_log_a[97], ref_log_b2[97];
    for (int i = 0; i < 3; i++) twn_kv_init(&kv[i], f->lm);
    twn_lm_seq ls[3] = {
        {.kv = &kv[0], .n = 7, .ids = ids_a, .embeds = emb_a, .adapter = 0, .hidden = ref_hid_a},
        {.kv = &kv[1], .n = 4, .ids = ids_b, .adapter = 1, .logits = ref_log_b},
        {.kv = &kv[2],
         .n = 3,
         .ids = ids_c,
         .pos = pos_c,
         .adapter = TWN_NO_ADAPTER,
         .hidden = ref_hid_c,
         .deepstack = &ds}};
    assert_int_equal(twn_lm_forward(f->lm, ls, 3, NULL, NULL, &e), 0);
    int32_t next_b = 7, next_a = 9;
    twn_lm_seq ls2[2] = {{.kv = &kv[1], .n = 1, .ids = &next_b, .adapter = 1, .logits = ref_log_b2},
                         {.kv = &kv[0], .n = 1, .ids = &next_a, .adapter = 0, .logits = ref_log_a}};
    assert_int_equal(twn_lm_forward(f->lm, ls2, 2, NULL, NULL, &e), 0);

    /* the same through the seam */
    twn_backend_opts o;
    twn_backend_opts_default(&o);
    o.kind = TWN_BACKEND_CPU;
    twn_backend *b;
    assert_int_equal(twn_backend_open(f->lm, &o, &b, &e), 0);
    assert_int_equal(twn_backend_which(b), TWN_BACKEND_CPU);
    assert_string_equal(twn_backend_describe(b), "cpu (OpenBLAS, fp32)");
    assert_true(twn_backend_kv_rows_free(b) == INT64_MAX);
    twn_bkv *bk[3];
    for (int i = 0; i < 3; i++) assert_int_equal(twn_backend_kv_open(b, 16, &bk[i], &e), 0);
    float hid_a[7 * 48], hid_c[3 * 48], log_b[97], log_a[97], pooled[48];
    int32_t am_b = -1, am_b2 = -1;
    twn_bseq bs[3] = {
        {.kv = bk[0],
         .n = 7,
         .ids = ids_a,
         .embeds = emb_a,
         .adapter = 0,
         .hidden = hid_a,
         .pool_rows = 2,
         .pooled = pooled},
        {.kv = bk[1], .n = 4, .ids = ids_b, .adapter = 1, .logits = log_b, .argmax = &am_b},
        {.kv = bk[2],
         .n = 3,
         .ids = ids_c,
         .pos = pos_c,
         .adapter = TWN_NO_ADAPTER,
         .hidden = hid_c,
         .deepstack = &ds}};
    assert_int_equal(twn_backend_forward(b, bs, 3, &e), 0);
    twn_bseq bs2[2] = {{.kv = bk[1], .n = 1, .ids = &next_b, .adapter = 1, .argmax = &am_b2},
                       {.kv = bk[0], .n = 1, .ids = &next_a, .adapter = 0, .logits = log_a}};
    assert_int_equal(twn_backend_forward(b, bs2, 2, &e), 0);

    assert_memory_equal(hid_a, ref_hid_a, sizeof hid_a);
    assert_memory_equal(hid_c, ref_hid_c, sizeof hid_c);
    assert_memory_equal(log_b, ref_log_b, sizeof log_b);
    assert_memory_equal(log_a, ref_log_a, sizeof log_a);
    int best = 0, best2 = 0;
    for (int i = 1; i < V; i++) {
        if (ref_log_b[i] > ref_log_b[best]) best = i;
        if (ref_log_b2[i] > ref_log_b2[best2]) best2 = i;
    }
    assert_int_equal(am_b, best);
    assert_int_equal(am_b2, best2);
    for (int i = 0; i < H; i++) {
        float m = (ref_hid_a[5 * H + i] + ref_hid_a[6 * H + i]) / 2.0f;
        assert_true(pooled[i] == m);
    }
    assert_int_equal(twn_backend_kv_len(b, bk[0]), 8);
    assert_int_equal(twn_backend_kv_len(b, bk[1]), 5);
    assert_int_equal(twn_backend_kv_len(b, bk[2]), 3);
    assert_int_equal(kv[2].next_pos, 8); /* max position 7 + 1 */
    twn_backend_kv_truncate(b, bk[0], 3);
    assert_int_equal(twn_backend_kv_len(b, bk[0]), 3);
    for (int i = 0; i < 3; i++) {
        twn_backend_kv_close(b, bk[i]);
        twn_kv_free(&kv[i]);
    }
    twn_backend_close(b);
    twn_free(emb_a);
    twn_free(feat);
}

static void test_bad_input(void **st) {
    fixture *f = *st;
    twn_backend *b;
    twn_err e;
    twn_backend_opts o;
    twn_backend_opts_default(&o);
    o.kind = TWN_BACKEND_CPU;
    assert_int_equal(twn_backend_open(f->lm, &o, &b, &e), 0);
    twn_bkv *kv;
    assert_int_equal(twn_backend_kv_open(b, 0, &kv, &e), 0);
    float pooled[48];
    twn_bseq s = {.kv = kv, .n = 2, .ids = ids_b, .adapter = 0, .pool_rows = 3, .pooled = pooled};
    assert_int_equal(twn_backend_forward(b, &s, 1, &e), -1);
    assert_string_equal(e.msg, "sequence 0: pooling 3 row(s) of a step of 2");
    twn_bseq nokv = {.n = 1, .ids = ids_b, .adapter = 0};
    assert_int_equal(twn_backend_forward(b, &nokv, 1, &e), -1);
    assert_string_equal(e.msg, "sequence 0: no KV cache");
    const int32_t bad[2] = {4, 97};
    twn_bseq s2 = {.kv = kv, .n = 2, .ids = bad, .adapter = 0};
    assert_int_equal(twn_backend_forward(b, &s2, 1, &e), -1);
    assert_string_equal(e.msg, "sequence 0 row 1: token id 97 is outside the vocabulary [0, 97)");
    twn_backend_kv_close(b, kv);
    twn_backend_close(b);
}

/* A KV budget on cpu hands out rows like the cuda pool hands out pages: reserved at open, grown
 * by a step, returned at close, with the pool's kind of message when they run out. */
static void test_cpu_kv_budget(void **st) {
    fixture *f = *st;
    twn_backend_opts o;
    twn_backend_opts_default(&o);
    o.kind = TWN_BACKEND_CPU;
    o.kv_budget_bytes = 100; /* a row is 2 (K, V) x 4 bytes x 3 layers x 32 = 768 bytes */
    twn_backend *b = NULL;
    twn_err e;
    assert_int_equal(twn_backend_open(f->lm, &o, &b, &e), -1);
    assert_string_equal(e.msg, "KV budget of 100 bytes holds no row (768 bytes of fp32 K and V "
                               "per row over 3 layers)");
    o.kv_budget_bytes = 10 * 768 + 500;
    assert_int_equal(twn_backend_open(f->lm, &o, &b, &e), 0);
    assert_string_equal(twn_backend_describe(b), "cpu (OpenBLAS, fp32; KV budget 10 rows)");
    assert_true(twn_backend_kv_rows_free(b) == 10);
    twn_bkv *x, *y = NULL;
    assert_int_equal(twn_backend_kv_open(b, 8, &x, &e), 0);
    assert_true(twn_backend_kv_rows_free(b) == 2);
    assert_int_equal(twn_backend_kv_open(b, 3, &y, &e), -1);
    assert_string_equal(e.msg, "KV budget exhausted: a sequence needs 3 more row(s) (3 in all), 2 "
                               "of 10 rows are free; raise the KV budget or lower max_active");
    assert_null(y);
    int32_t ids[8] = {1, 2, 3, 4, 5, 6, 7, 8}, am;
    twn_bseq s = {.kv = x, .n = 8, .ids = ids, .adapter = 0, .argmax = &am};
    assert_int_equal(twn_backend_forward(b, &s, 1, &e), 0); /* within its reservation */
    assert_true(twn_backend_kv_rows_free(b) == 2);
    s.n = 3; /* 11 rows: 3 past the reservation, 2 free */
    assert_int_equal(twn_backend_forward(b, &s, 1, &e), -1);
    assert_string_equal(e.msg, "KV budget exhausted: a sequence needs 3 more row(s) (11 in all), "
                               "2 of 10 rows are free; raise the KV budget or lower max_active");
    assert_int_equal(twn_backend_kv_len(b, x), 8);
    s.n = 2; /* 10 rows: takes the last 2 */
    assert_int_equal(twn_backend_forward(b, &s, 1, &e), 0);
    assert_true(twn_backend_kv_rows_free(b) == 0);
    twn_backend_kv_close(b, x);
    assert_true(twn_backend_kv_rows_free(b) == 10);
    twn_backend_close(b);
}

static void test_auto_falls_back_with_reason(void **st) {
    fixture *f = *st;
    char why[TWN_ERR_MAX] = "";
    twn_backend_opts o;
    twn_backend_opts_default(&o);
    int avail = twn_backend_cuda_available(&o, why, sizeof why);
    printf("CUDA %s%s\n", avail ? "available" : "unavailable: ", avail ? "" : why);
#ifdef UNDER_ASAN
    if (avail) return; /* opening it would create a CUDA context under ASan */
#endif
    twn_backend *b;
    twn_err e;
    assert_int_equal(twn_backend_open(f->lm, &o, &b, &e), 0);
    if (avail) {
        assert_int_equal(twn_backend_which(b), TWN_BACKEND_CUDA);
        assert_true(!strncmp(twn_backend_describe(b), "cuda: ", 6));
    } else {
        char want[TWN_ERR_MAX + 64];
        snprintf(want, sizeof want, "cpu (OpenBLAS, fp32; CUDA unavailable: %s)", why);
        assert_int_equal(twn_backend_which(b), TWN_BACKEND_CPU);
        assert_string_equal(twn_backend_describe(b), want);
        assert_true(strlen(why) > 10);
        /* and `cuda` refuses with the same reason */
        twn_backend *c = NULL;
        o.kind = TWN_BACKEND_CUDA;
        assert_int_equal(twn_backend_open(f->lm, &o, &c, &e), -1);
        snprintf(want, sizeof want, "backend cuda: %s", why);
        assert_string_equal(e.msg, want);
        assert_null(c);
    }
    twn_backend_close(b);
}

static void test_missing_module(void **st) {
    fixture *f = *st;
    twn_backend_opts o;
    twn_backend_opts_default(&o);
    o.kind = TWN_BACKEND_CUDA;
    o.cuda_module = "/nonexistent/libtwn_cuda.so";
    twn_backend *b = NULL;
    twn_err e;
    assert_int_equal(twn_backend_open(f->lm, &o, &b, &e), -1);
    assert_string_equal(e.msg, "backend cuda: cannot load the CUDA module "
                               "/nonexistent/libtwn_cuda.so: /nonexistent/libtwn_cuda.so: cannot "
                               "open shared object file: No such file or directory");
    o.kind = TWN_BACKEND_AUTO;
    assert_int_equal(twn_backend_open(f->lm, &o, &b, &e), 0);
    assert_int_equal(twn_backend_which(b), TWN_BACKEND_CPU);
    assert_non_null(strstr(twn_backend_describe(b), "CUDA unavailable: cannot load the CUDA "
                                                    "module /nonexistent/libtwn_cuda.so"));
    twn_backend_close(b);
}

static void test_not_a_module(void **st) {
    fixture *f = *st;
    twn_backend_opts o;
    twn_backend_opts_default(&o);
    o.kind = TWN_BACKEND_CUDA;
    o.cuda_module = "libm.so.6"; /* loads, but has no twn_cuda_module_get */
    twn_backend *b = NULL;
    twn_err e;
    assert_int_equal(twn_backend_open(f->lm, &o, &b, &e), -1);
    assert_string_equal(e.msg, "backend cuda: libm.so.6 is not a twn CUDA module (no symbol "
                               "twn_cuda_module_get)");
}

// ------------------------------------------------------------------------------------------------
// twn_embed_items through the seam, on the tiny checkpoint

static const char *texts[] = {
    "A red bicycle leaning against a brick wall.",
    "Quarterly revenue grew 12% while operating costs fell.",
    "量子コンピュータは重ね合わせを利用する。",
    "Explain why the sky is blue at noon and red at sunset.",
};
#define N_TEXTS ((int)(sizeof texts / sizeof *texts))

/* One prefill as the scheduler builds it: ids then the K query rows (TWN_TOKEN_EMBED, the
 * queries as their embeddings), with hidden rows out. */
typedef struct {
    int32_t *ids;
    float *emb, *hidden;
    int n;
    twn_kv kv;
} prefill;

static void prefill_make(const twn_model *m, const twn_ivec *ids, prefill *p) {
    const int H = m->lm->H, n = (int)ids->n + m->K;
    p->n = n;
    p->ids = twn_malloc(sizeof(int32_t) * (size_t)n);
    memcpy(p->ids, ids->v, sizeof(int32_t) * ids->n);
    for (int q = 0; q < m->K; q++) p->ids[ids->n + (size_t)q] = TWN_TOKEN_EMBED;
    p->emb = twn_calloc((size_t)n * H, sizeof(float));
    memcpy(p->emb + ids->n * (size_t)H, m->queries, sizeof(float) * (size_t)m->K * H);
    p->hidden = twn_malloc(sizeof(float) * (size_t)n * H);
    twn_kv_init(&p->kv, m->lm);
    twn_kv_reserve(&p->kv, n);
}

/* query_mean over the last K rows (rows summed in order, then / K), then the L2 norm. */
static void prefill_pool(const twn_model *m, const prefill *p, float *out) {
    const int H = m->lm->H;
    memset(out, 0, sizeof(float) * (size_t)H);
    for (int r = p->n - m->K; r < p->n; r++)
        for (int i = 0; i < H; i++) out[i] += p->hidden[(size_t)r * H + i];
    for (int i = 0; i < H; i++) out[i] /= (float)m->K;
    twn_cpu_l2_normalize(out, H, 1e-12f);
}

static void prefill_free(prefill *p) {
    twn_free(p->ids);
    twn_free(p->emb);
    twn_free(p->hidden);
    twn_kv_free(&p->kv);
}

static twn_model *tiny(void) {
    twn_model *m = NULL;
    twn_err e;
    if (twn_model_load(tu_tiny_model(), &m, &e)) fail_msg("%s", e.msg);
    assert_int_equal(twn_backend_which(m->backend), TWN_BACKEND_CPU);
    assert_string_equal(twn_backend_describe(m->backend), "cpu (OpenBLAS, fp32)");
    /* the references below pool and decode the way this manifest says */
    assert_int_equal(m->man.pooling, TWN_POOL_QUERY_MEAN);
    assert_true(m->man.normalize);
    assert_true(m->man.temperature <= 0);
    return m;
}

static void embed(const twn_model *m, const twn_item *it, int n, const char *mode,
                  twn_result *res) {
    twn_opts o;
    twn_opts_default(&o);
    twn_err e;
    assert_int_equal(twn_mode_parse(mode, &o, &e), 0);
    if (twn_embed_items(m, it, n, &o, res, &e)) fail_msg("%s", e.msg);
}

/* Mode never: every item's gate prefill goes into one step (ids + queries, embedding adapter);
 * the same step on twn_lm_forward pooled by hand gives the same bits. */
static void test_embed_items_never_bitwise(void **st) {
    (void)st;
    twn_model *m = tiny();
    const int H = m->lm->H;
    twn_item it[N_TEXTS];
    twn_result res[N_TEXTS];
    for (int i = 0; i < N_TEXTS; i++) it[i] = (twn_item){.id = "x", .text = texts[i]};
    embed(m, it, N_TEXTS, "never", res);

    prefill p[N_TEXTS];
    twn_lm_seq seqs[N_TEXTS];
    twn_err e;
    for (int i = 0; i < N_TEXTS; i++) {
        twn_ivec ids = {0};
        assert_int_equal(twn_render_ids(m, m->man.tpl_embed, &it[i], &ids, &e), 0);
        prefill_make(m, &ids, &p[i]);
        twn_ivec_free(&ids);
        seqs[i] = (twn_lm_seq){.kv = &p[i].kv,
                               .n = p[i].n,
                               .ids = p[i].ids,
                               .embeds = p[i].emb,
                               .adapter = m->emb_idx,
                               .hidden = p[i].hidden};
    }
    if (twn_lm_forward(m->lm, seqs, N_TEXTS, NULL, NULL, &e)) fail_msg("%s", e.msg);
    float *want = twn_malloc(sizeof(float) * (size_t)H);
    for (int i = 0; i < N_TEXTS; i++) {
        prefill_pool(m, &p[i], want);
        assert_null(res[i].error);
        assert_false(res[i].hard);
        assert_int_equal(res[i].dim, H);
        assert_memory_equal(res[i].embedding, want, sizeof(float) * (size_t)H);
        prefill_free(&p[i]);
        twn_result_free(&res[i]);
    }
    twn_free(want);
    twn_model_free(m);
}

/* Mode always, one item: the greedy CoT (reasoning adapter, argmax on the backend) is the argmax
 * chain of twn_lm_forward's logits, and the embedding pass over prompt + CoT + queries pools to
 * the same bits. */
static void test_embed_items_always_bitwise(void **st) {
    (void)st;
    twn_model *m = tiny();
    const twn_lm *lm = m->lm;
    const int H = lm->H, V = lm->V;
    twn_err e;
    for (int k = 0; k < N_TEXTS; k++) {
        twn_item it = {.id = "x", .text = texts[k]};
        twn_result r;
        embed(m, &it, 1, "always", &r);
        assert_null(r.error);
        assert_true(r.hard);
        assert_true(r.think_tokens >= 1 && r.think_tokens <= m->man.max_think_tokens);
        assert_true(r.n_cot <= r.think_tokens);

        /* the CoT: prefill the reasoning prompt, then feed back the argmax */
        twn_ivec ids = {0};
        assert_int_equal(twn_render_ids(m, m->man.tpl_reason, &it, &ids, &e), 0);
        twn_kv kv;
        twn_kv_init(&kv, lm);
        twn_kv_reserve(&kv, (int)ids.n + m->man.max_think_tokens);
        float *logits = twn_malloc(sizeof(float) * (size_t)V);
        int32_t gen[64];
        assert_true(r.think_tokens <= 64);
        twn_lm_seq s = {
            .kv = &kv, .n = (int)ids.n, .ids = ids.v, .adapter = m->rsn_idx, .logits = logits};
        for (int t = 0; t < r.think_tokens; t++) {
            if (twn_lm_forward(lm, &s, 1, NULL, NULL, &e)) fail_msg("%s", e.msg);
            int best = 0;
            for (int i = 1; i < V; i++)
                if (logits[i] > logits[best]) best = i;
            gen[t] = best;
            s = (twn_lm_seq){
                .kv = &kv, .n = 1, .ids = &gen[t], .adapter = m->rsn_idx, .logits = logits};
        }
        assert_memory_equal(r.cot_ids, gen, sizeof(int32_t) * (size_t)r.n_cot);
        twn_kv_free(&kv);
        twn_free(logits);

        /* the embedding pass: embed_cot's prefix, the CoT ids, its suffix, the queries */
        const char *tpl = m->man.tpl_embed_cot, *at = strstr(tpl, "{cot}");
        assert_non_null(at);
        char *pre = twn_strndup(tpl, (size_t)(at - tpl));
        twn_ivec all = {0}, tail = {0};
        assert_int_equal(twn_render_ids(m, pre, &it, &all, &e), 0);
        twn_ivec_append(&all, r.cot_ids, (size_t)r.n_cot);
        assert_int_equal(twn_render_ids(m, at + 5, &it, &tail, &e), 0);
        twn_ivec_append(&all, tail.v, tail.n);
        prefill p;
        prefill_make(m, &all, &p);
        twn_lm_seq es = {.kv = &p.kv,
                         .n = p.n,
                         .ids = p.ids,
                         .embeds = p.emb,
                         .adapter = m->emb_idx,
                         .hidden = p.hidden};
        if (twn_lm_forward(lm, &es, 1, NULL, NULL, &e)) fail_msg("%s", e.msg);
        float *want = twn_malloc(sizeof(float) * (size_t)H);
        prefill_pool(m, &p, want);
        assert_memory_equal(r.embedding, want, sizeof(float) * (size_t)H);
        printf("item %d: %d think tokens, CoT of %d, embedding bit-identical\n", k, r.think_tokens,
               r.n_cot);
        twn_free(want);
        prefill_free(&p);
        twn_free(pre);
        twn_ivec_free(&all);
        twn_ivec_free(&tail);
        twn_ivec_free(&ids);
        twn_result_free(&r);
    }
    twn_model_free(m);
}

/* A KV budget of 60 rows (two gate prompts, one CoT at a time): sequences wait for rows, with
 * the results of no budget (same CoTs; embeddings to float rounding, as any other batching), a
 * prompt that can never fit fails alone with the budget's message, and every row comes back. */
static void test_embed_items_kv_wait(void **st) {
    (void)st;
    twn_model *m = tiny();
    const int H = m->lm->H;
    const size_t row = 2 * sizeof(float) * (size_t)m->lm->L * (size_t)(m->lm->nkv * m->lm->D);
    char *longtxt = twn_calloc(2000, 1);
    for (int i = 0; i < 150; i++) strcat(longtxt, "word ");
    twn_item it[N_TEXTS + 1];
    for (int i = 0; i < N_TEXTS; i++) it[i] = (twn_item){.id = "x", .text = texts[i]};
    it[N_TEXTS] = (twn_item){.id = "long", .text = longtxt};
    const char *modes[] = {"never", "always"};
    for (int k = 0; k < 2; k++) {
        twn_result free_[N_TEXTS + 1], tight[N_TEXTS + 1];
        twn_backend_opts o;
        twn_backend_opts_default(&o);
        o.kind = TWN_BACKEND_CPU;
        twn_err e;
        assert_int_equal(twn_model_set_backend(m, &o, &e), 0);
        embed(m, it, N_TEXTS + 1, modes[k], free_);
        o.kv_budget_bytes = 60 * row;
        assert_int_equal(twn_model_set_backend(m, &o, &e), 0);
        assert_true(twn_backend_kv_rows_free(m->backend) == 60);
        embed(m, it, N_TEXTS + 1, modes[k], tight);
        for (int i = 0; i < N_TEXTS; i++) {
            assert_null(tight[i].error);
            assert_int_equal(tight[i].hard, free_[i].hard);
            assert_int_equal(tight[i].n_cot, free_[i].n_cot);
            if (tight[i].n_cot)
                assert_memory_equal(tight[i].cot_ids, free_[i].cot_ids,
                                    sizeof(int32_t) * (size_t)tight[i].n_cot);
            assert_true(tu_max_abs(tight[i].embedding, free_[i].embedding, (size_t)H) < 1e-5);
        }
        assert_null(free_[N_TEXTS].error);
        assert_non_null(tight[N_TEXTS].error);
        assert_null(tight[N_TEXTS].embedding);
        printf("%s: %s\n", modes[k], tight[N_TEXTS].error);
        assert_true(
            !strncmp(tight[N_TEXTS].error, "KV cache: KV budget exhausted: a sequence needs ", 48));
        assert_non_null(strstr(tight[N_TEXTS].error, " of 60 rows are free"));
        assert_true(twn_backend_kv_rows_free(m->backend) == 60);
        for (int i = 0; i <= N_TEXTS; i++) {
            twn_result_free(&free_[i]);
            twn_result_free(&tight[i]);
        }
    }
    twn_free(longtxt);
    twn_model_free(m);
}

/* twn_model_set_backend: cuda where none can run fails with the reason and keeps the cpu
 * backend; auto falls back and the model still embeds. */
static void test_model_set_backend(void **st) {
    (void)st;
    char why[TWN_ERR_MAX] = "";
    twn_backend_opts o;
    twn_backend_opts_default(&o);
    if (twn_backend_cuda_available(&o, why, sizeof why)) {
        printf("CUDA available: the cuda side is tests/unit/test_cuda.c\n");
        return;
    }
    twn_model *m = tiny();
    twn_backend *before = m->backend;
    twn_err e;
    o.kind = TWN_BACKEND_CUDA;
    assert_int_equal(twn_model_set_backend(m, &o, &e), -1);
    char want[TWN_ERR_MAX + 64];
    snprintf(want, sizeof want, "backend cuda: %s", why);
    assert_string_equal(e.msg, want);
    assert_ptr_equal(m->backend, before);
    o.kind = TWN_BACKEND_AUTO;
    assert_int_equal(twn_model_set_backend(m, &o, &e), 0);
    assert_int_equal(twn_backend_which(m->backend), TWN_BACKEND_CPU);
    snprintf(want, sizeof want, "cpu (OpenBLAS, fp32; CUDA unavailable: %s)", why);
    assert_string_equal(twn_backend_describe(m->backend), want);
    twn_item it = {.id = "x", .text = texts[0]};
    twn_result r;
    embed(m, &it, 1, "adaptive", &r);
    assert_null(r.error);
    twn_result_free(&r);
    twn_model_free(m);
}

/* The commands' --backend: cuda without a usable GPU is one line and exit 1 (before the model is
 * read: the model path does not exist here); auto says why it runs on the CPU and succeeds; a
 * bad kind is a usage error. */
static void test_cli_backend(void **st) {
    (void)st;
    char why[TWN_ERR_MAX] = "";
    twn_backend_opts o;
    twn_backend_opts_default(&o);
    if (twn_backend_cuda_available(&o, why, sizeof why)) {
        printf("CUDA available: skipping the no-GPU command checks\n");
        return;
    }
    const char *dir = tu_tmpdir("backend_cli");
    char cmd[16384], want[TWN_ERR_MAX + 128], in[4096], out[4096];
    char *log = NULL;
    /* cuda: the missing piece, named (the module search paths differ between this binary and
     * `twn`, so only the driver/device reasons are compared whole) */
    const char *cmds[][2] = {
        {"embed", "--model /nonexistent/model --input /nonexistent/in.jsonl --out /nonexistent/o"},
        {"search", "--model /nonexistent/model --index /nonexistent/ix --text hello"},
        {"run", "--model /nonexistent/model --input /nonexistent/in.jsonl --out /nonexistent/o"},
    };
    for (size_t c = 0; c < sizeof cmds / sizeof *cmds; c++) {
        snprintf(cmd, sizeof cmd, "'%s' %s %s --backend cuda 2>&1", TWN_BIN, cmds[c][0],
                 cmds[c][1]);
        assert_int_equal(tu_run(cmd, &log), 1);
        snprintf(want, sizeof want, "twn %s: backend cuda: ", cmds[c][0]);
        assert_true(!strncmp(log, want, strlen(want)));
        assert_non_null(strchr(log, '\n'));
        assert_int_equal(strchr(log, '\n')[1], 0); /* one line */
        if (strncmp(why, "CUDA module", 11)) {
            snprintf(want, sizeof want, "twn %s: backend cuda: %s\n", cmds[c][0], why);
            assert_string_equal(log, want);
        }
        printf("%s", log);
        free(log);
    }
    /* a bad kind */
    snprintf(cmd, sizeof cmd, "'%s' embed --model /x --input /y --out /z --backend gpu 2>&1",
             TWN_BIN);
    assert_int_equal(tu_run(cmd, &log), 2);
    assert_string_equal(log, "twn embed: backend 'gpu': expected cpu, cuda or auto\n");
    free(log);
    /* auto: falls back, says why, embeds */
    snprintf(in, sizeof in, "%s/in.jsonl", dir);
    const char *items = "{\"id\": \"a\", \"text\": \"A red bicycle.\"}\n";
    tu_write(in, items, strlen(items));
    snprintf(out, sizeof out, "%s/out", dir);
    snprintf(cmd, sizeof cmd, "'%s' embed --model '%s' --input '%s' --out '%s' --backend auto 2>&1",
             TWN_BIN, tu_tiny_model(), in, out);
    assert_int_equal(tu_run(cmd, &log), 0);
    snprintf(want, sizeof want, "twn embed: backend: cpu (OpenBLAS, fp32; CUDA unavailable: ");
    char *line = strstr(log, want);
    assert_non_null(line);
    printf("%.*s\n", (int)(strchr(line, '\n') - line), line);
    assert_non_null(strstr(log, "twn embed: 1 items embedded"));
    free(log);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kind_parse),
        cmocka_unit_test(test_cpu_matches_lm_forward),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_cpu_kv_budget),
        cmocka_unit_test(test_auto_falls_back_with_reason),
        cmocka_unit_test(test_missing_module),
        cmocka_unit_test(test_not_a_module),
        cmocka_unit_test(test_embed_items_never_bitwise),
        cmocka_unit_test(test_embed_items_always_bitwise),
        cmocka_unit_test(test_embed_items_kv_wait),
        cmocka_unit_test(test_model_set_backend),
        cmocka_unit_test(test_cli_backend),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
