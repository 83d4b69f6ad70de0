/* test_backend.c — the backend seam (engine/backend.h) on any machine: the cpu backend gives
 * exactly twn_lm_forward's results (bit for bit) for a mixed ragged batch, argmax and pooled
 * reduce them like the scheduler does, `auto` falls back to cpu with the same reason the probe
 * gives, and an explicit module that is missing or is not a twn module is refused by name.
 * The GPU side of the seam is tests/unit/test_cuda.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backend.h"
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

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kind_parse),     cmocka_unit_test(test_cpu_matches_lm_forward),
        cmocka_unit_test(test_bad_input),      cmocka_unit_test(test_auto_falls_back_with_reason),
        cmocka_unit_test(test_missing_module), cmocka_unit_test(test_not_a_module),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
