/* random_lm.h — an in-memory random Qwen3-VL text decoder with LoRA adapters, for the backend
 * tests (test_backend.c, test_cuda.c).  No files: the model is built from a seed.
 *
 * Every weight is rounded to a bf16 value (the checkpoints are bf16), so a backend that keeps
 * bf16 weights on the device computes with exactly the weights the fp32 CPU reference uses, and
 * a comparison measures activation rounding only. */
#ifndef TWN_TESTS_RANDOM_LM_H
#define TWN_TESTS_RANDOM_LM_H

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "engine/adapter.h"
#include "engine/lm.h"
#include "util/mem.h"
#include "util/rng.h"

typedef struct {
    int H, I, nh, nkv, D, V, L, R;
    bool tied;
    int section[3]; /* mrope_section */
} rl_dims;

static inline float rl_bf16(float f) {
    union {
        float f;
        uint32_t u;
    } v = {f};
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    v.u &= 0xffff0000u;
    return v.f;
}

static inline float *rl_randn(twn_rng *g, size_t n, float std, float mean) {
    float *p = twn_malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = rl_bf16(mean + std * (float)twn_rng_normal(g));
    return p;
}

static inline twn_lm *rl_make_lm(const rl_dims *d, uint64_t seed) {
    twn_rng g;
    twn_rng_seed(&g, seed);
    twn_lm *lm = twn_calloc(1, sizeof *lm);
    lm->H = d->H, lm->I = d->I, lm->nh = d->nh, lm->nkv = d->nkv, lm->D = d->D, lm->V = d->V;
    lm->L = d->L;
    lm->cfg.rms_norm_eps = 1e-6;
    lm->cfg.rope_theta = 5e6;
    lm->embed = rl_randn(&g, (size_t)d->V * d->H, 1.0f, 0);
    lm->lm_head = d->tied ? lm->embed : rl_randn(&g, (size_t)d->V * d->H, 0.2f, 0);
    lm->final_norm = rl_randn(&g, (size_t)d->H, 0.1f, 1);
    lm->layers = twn_calloc((size_t)d->L, sizeof *lm->layers);
    const int qd = d->nh * d->D, kd = d->nkv * d->D;
    const int sh[TWN_NPROJ][2] = {{qd, d->H},   {kd, d->H},   {kd, d->H},  {d->H, qd},
                                  {d->I, d->H}, {d->I, d->H}, {d->H, d->I}};
    for (int l = 0; l < d->L; l++) {
        twn_lm_layer *ly = &lm->layers[l];
        ly->in_norm = rl_randn(&g, (size_t)d->H, 0.1f, 1);
        ly->post_norm = rl_randn(&g, (size_t)d->H, 0.1f, 1);
        ly->q_norm = rl_randn(&g, (size_t)d->D, 0.1f, 1);
        ly->k_norm = rl_randn(&g, (size_t)d->D, 0.1f, 1);
        for (int j = 0; j < TWN_NPROJ; j++)
            ly->w[j] = rl_randn(&g, (size_t)sh[j][0] * sh[j][1], 1.0f / sqrtf((float)sh[j][1]), 0);
    }
    lm->inv_freq = twn_malloc(sizeof(float) * (size_t)d->D / 2);
    lm->rope_stream = twn_malloc((size_t)d->D / 2);
    for (int j = 0; j < d->D / 2; j++) {
        lm->inv_freq[j] = 1.0f / powf(5e6f, (float)(2 * j) / (float)d->D);
        lm->rope_stream[j] = (j % 3 == 1 && j < 3 * d->section[1])   ? 1
                             : (j % 3 == 2 && j < 3 * d->section[2]) ? 2
                                                                     : 0;
    }
    return lm;
}

/* An adapter with a LoRA on every projection of every layer except `skip_slot` (-1: none), and
 * on embed_tokens when embed is set. */
static inline twn_adapter *rl_make_adapter(const rl_dims *d, const char *name, uint64_t seed,
                                           int rank, bool embed, int skip_slot) {
    static const char *const projn[TWN_NPROJ] = {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
    twn_rng g;
    twn_rng_seed(&g, seed);
    twn_adapter *a = twn_calloc(1, sizeof *a);
    a->name = twn_strdup(name);
    a->dir = twn_strdup("(memory)");
    a->r = rank;
    a->loras = twn_calloc((size_t)d->L * TWN_NPROJ + 1, sizeof *a->loras);
    const int qd = d->nh * d->D, kd = d->nkv * d->D;
    const int in[TWN_NPROJ] = {d->H, d->H, d->H, qd, d->H, d->H, d->I};
    const int out[TWN_NPROJ] = {qd, kd, kd, d->H, d->I, d->I, d->H};
    for (int l = 0; l < d->L; l++)
        for (int j = 0; j < TWN_NPROJ; j++) {
            if (j == skip_slot) continue;
            twn_lora *lo = &a->loras[a->n_loras++];
            char m[128];
            snprintf(m, sizeof m, "model.language_model.layers.%d.%s", l, projn[j]);
            lo->module = twn_strdup(m);
            lo->r = rank;
            lo->in_features = in[j];
            lo->out_features = out[j];
            lo->scaling = 2.0f;
            lo->A = rl_randn(&g, (size_t)rank * in[j], 0.3f / sqrtf((float)in[j]), 0);
            lo->B = rl_randn(&g, (size_t)out[j] * rank, 0.3f, 0);
        }
    if (embed) {
        twn_lora *lo = &a->loras[a->n_loras++];
        lo->module = twn_strdup("model.language_model.embed_tokens");
        lo->r = rank;
        lo->embedding = true;
        lo->in_features = d->V;
        lo->out_features = d->H;
        lo->scaling = 0.5f;
        lo->A = rl_randn(&g, (size_t)rank * d->V, 0.5f, 0);
        lo->B = rl_randn(&g, (size_t)d->H * rank, 0.5f, 0);
    }
    return a;
}

static inline void rl_free_adapter(twn_adapter *a) {
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

#endif
