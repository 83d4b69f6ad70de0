/* twn.c — TWN inference: model loading and the continuous-batching scheduler (see twn.h and the
 * semantics in manifest.h, which scripts/reference/twn_reference.py mirrors step for step). */
#define _GNU_SOURCE /* memmem */
#include "engine/twn.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cpu/ops.h"
#include "engine/mrope.h"
#include "engine/ptfile.h"
#include "util/fileio.h"
#include "util/mem.h"
#include "util/vec.h"

/* ------------------------------------------------------------------------------------------ */
/* Loading */

static float *pt_to_f32(const twn_tensor *t, twn_err *err) {
    float *buf = twn_try_alloc((size_t)twn_tensor_numel(t) * sizeof(float) + 1);
    if (!buf) {
        twn_err_set(err, "cannot allocate %s", t->name);
        return NULL;
    }
    if (twn_tensor_to_f32(t, buf, err)) {
        twn_free(buf);
        return NULL;
    }
    return buf;
}

/* Gate MLP: Linear layers "<prefix><i>.weight"/"<prefix><i>.bias" applied in index order. */
static int load_gate(twn_model *m, twn_err *err) {
    const char *path = m->man.gate_path;
    twn_pt_file *pt = NULL;
    if (twn_pt_load(path, &pt, err)) return -1;
    int idx[TWN_MAX_GATE_LAYERS];
    const twn_tensor *w[TWN_MAX_GATE_LAYERS] = {0}, *b[TWN_MAX_GATE_LAYERS] = {0};
    int n = 0, rc = -1;
    for (size_t i = 0; i < twn_pt_count(pt); i++) {
        const twn_tensor *t = twn_pt_at(pt, i);
        const char *nm = t->name, *dot = strrchr(nm, '.');
        if (!dot || (strcmp(dot, ".weight") && strcmp(dot, ".bias"))) {
            twn_err_set(err,
                        "%s: unexpected key \"%s\"; the gate must be Linear layers "
                        "\"<i>.weight\" / \"<i>.bias\"",
                        path, nm);
            goto out;
        }
        const char *p = dot;
        while (p > nm && p[-1] >= '0' && p[-1] <= '9') p--;
        if (p == dot) {
            twn_err_set(err, "%s: key \"%s\" has no layer index before .weight/.bias", path, nm);
            goto out;
        }
        int li = atoi(p), slot = -1;
        for (int j = 0; j < n; j++)
            if (idx[j] == li) slot = j;
        if (slot < 0) {
            if (n == TWN_MAX_GATE_LAYERS) {
                twn_err_set(err, "%s: more than %d gate layers", path, TWN_MAX_GATE_LAYERS);
                goto out;
            }
            slot = n++;
            idx[slot] = li;
        }
        if (!strcmp(dot, ".weight"))
            w[slot] = t;
        else
            b[slot] = t;
    }
    if (!n) {
        twn_err_set(err, "%s: no gate layers found", path);
        goto out;
    }
    for (int i = 0; i < n; i++) /* sort by layer index */
        for (int j = i + 1; j < n; j++)
            if (idx[j] < idx[i]) {
                int ti = idx[i];
                idx[i] = idx[j];
                idx[j] = ti;
                const twn_tensor *tw = w[i], *tb = b[i];
                w[i] = w[j], b[i] = b[j], w[j] = tw, b[j] = tb;
            }
    int in = m->lm->H;
    for (int i = 0; i < n; i++) {
        if (!w[i] || w[i]->ndim != 2 || w[i]->shape[1] != in) {
            twn_err_set(err, "%s: gate layer %d weight must be [out, %d]", path, idx[i], in);
            goto out;
        }
        int out_f = (int)w[i]->shape[0];
        if (b[i] && (b[i]->ndim != 1 || b[i]->shape[0] != out_f)) {
            twn_err_set(err, "%s: gate layer %d bias must be [%d]", path, idx[i], out_f);
            goto out;
        }
        m->gate[i].in = in;
        m->gate[i].out = out_f;
        if (!(m->gate[i].w = pt_to_f32(w[i], err))) goto out;
        m->gate[i].b = twn_calloc((size_t)out_f, sizeof(float));
        if (b[i] && twn_tensor_to_f32(b[i], m->gate[i].b, err)) goto out;
        m->gate_params += (int64_t)out_f * in + (b[i] ? out_f : 0);
        in = out_f;
        m->n_gate = i + 1;
    }
    if (in != 1) {
        twn_err_set(err, "%s: the last gate layer has %d outputs; expected 1 (a logit)", path, in);
        goto out;
    }
    rc = 0;
out:
    if (rc) twn_err_wrap(err, "loading the gate");
    twn_pt_free(pt);
    return rc;
}

static int load_queries(twn_model *m, twn_err *err) {
    const char *path = m->man.queries_path;
    twn_pt_file *pt = NULL;
    if (twn_pt_load(path, &pt, err)) return -1;
    int rc = -1;
    if (twn_pt_count(pt) != 1) {
        twn_err_set(err, "%s: expected one tensor [K, %d], found %zu entries", path, m->lm->H,
                    twn_pt_count(pt));
        goto out;
    }
    const twn_tensor *t = twn_pt_at(pt, 0);
    if (t->ndim != 2 || t->shape[1] != m->lm->H || t->shape[0] < 0 || t->shape[0] > 4096) {
        char s[64];
        twn_err_set(err, "%s: queries have shape %s; expected [K, %d] with K <= 4096", path,
                    twn_shape_str(t, s, sizeof s), m->lm->H);
        goto out;
    }
    m->K = (int)t->shape[0];
    if (!(m->queries = pt_to_f32(t, err))) goto out;
    rc = 0;
out:
    twn_pt_free(pt);
    return rc;
}

/* The vision tower and the image processor settings, when the base has a vision_config.  The
 * processor's patch geometry must be the tower's (patch_dim and the merge both depend on it). */
static int load_vision(twn_model *m, twn_err *err) {
    twn_config cfg;
    char *cfg_path = twn_path_join(m->man.base_dir, "config.json");
    int rc = twn_config_load(cfg_path, &cfg, err);
    twn_free(cfg_path);
    if (rc) return -1;
    m->image_token_id = cfg.image_token_id;
    twn_image_config_default(&m->image_cfg);
    if (!cfg.has_vision) return 0;
    char *pp = twn_path_join(m->man.base_dir, "preprocessor_config.json");
    rc = twn_path_exists(pp) ? twn_image_config_load(&m->image_cfg, pp, err) : 0;
    const twn_image_config *ic = &m->image_cfg;
    const twn_vision_config *vc = &cfg.vision;
    if (!rc &&
        (ic->patch_size != vc->patch_size || ic->temporal_patch_size != vc->temporal_patch_size ||
         ic->merge_size != vc->spatial_merge_size))
        rc = twn_err_set(err,
                         "%s: patch_size %d, temporal_patch_size %d, merge_size %d differ from "
                         "config.json vision_config (%d, %d, %d)",
                         pp, ic->patch_size, ic->temporal_patch_size, ic->merge_size,
                         vc->patch_size, vc->temporal_patch_size, vc->spatial_merge_size);
    twn_free(pp);
    if (rc || twn_vision_load(m->man.base_dir, &m->vision, err)) return -1;
    m->has_vision_weights = true;
    return 0;
}

int twn_model_load(const char *manifest_path, twn_model **out, twn_err *err) {
    twn_model *m = twn_calloc(1, sizeof *m);
    if (twn_manifest_load(manifest_path, &m->man, err)) {
        twn_free(m);
        return -1;
    }
    char *tokp = twn_path_join(m->man.base_dir, "tokenizer.json");
    int rc = twn_tok_load(tokp, &m->tok, err);
    twn_free(tokp);
    if (rc || twn_lm_load(m->man.base_dir, &m->lm, err) ||
        twn_adapter_load(m->man.embedding_dir, "embedding", &m->embedding, err) ||
        twn_adapter_load(m->man.reasoning_dir, "reasoning", &m->reasoning, err) ||
        twn_lm_attach_adapter(m->lm, m->embedding, &m->emb_idx, err) ||
        twn_lm_attach_adapter(m->lm, m->reasoning, &m->rsn_idx, err) || load_gate(m, err) ||
        load_queries(m, err) || load_vision(m, err))
        goto fail;
    if (m->man.pooling == TWN_POOL_QUERY_MEAN && m->K == 0) {
        twn_err_set(err, "%s: pooling query_mean needs at least one query in %s", m->man.path,
                    m->man.queries_path);
        goto fail;
    }
    m->pool_token_id = -1;
    if (m->man.pooling == TWN_POOL_TOKEN) {
        m->pool_token_id = twn_tok_id(m->tok, m->man.pool_token);
        if (m->pool_token_id < 0) {
            twn_err_set(err, "%s: pooling token \"%s\" is not a single token of the tokenizer",
                        m->man.path, m->man.pool_token);
            goto fail;
        }
    }
    twn_backend_opts bo;
    twn_backend_opts_default(&bo);
    bo.kind = TWN_BACKEND_CPU;
    if (twn_backend_open(m->lm, &bo, &m->backend, err)) goto fail;
    *out = m;
    return 0;
fail:
    twn_err_wrap(err, "loading TWN model %s", manifest_path);
    twn_model_free(m);
    return -1;
}

void twn_model_free(twn_model *m) {
    if (!m) return;
    twn_backend_close(m->backend); /* before the lm it runs on */
    twn_lm_free(m->lm);
    twn_vision_free(m->vision);
    twn_adapter_free(m->embedding);
    twn_adapter_free(m->reasoning);
    twn_tok_free(m->tok);
    twn_free(m->queries);
    for (int i = 0; i < m->n_gate; i++) {
        twn_free(m->gate[i].w);
        twn_free(m->gate[i].b);
    }
    twn_manifest_free(&m->man);
    twn_free(m);
}

int twn_model_set_backend(twn_model *m, const twn_backend_opts *o, twn_err *err) {
    twn_backend *b = NULL;
    if (twn_backend_open(m->lm, o, &b, err)) return -1;
    twn_backend_close(m->backend);
    m->backend = b;
    return 0;
}

int twn_model_dim(const twn_model *m) {
    return m->lm->H;
}

void twn_opts_default(twn_opts *o) {
    o->mode = TWN_MODE_ADAPTIVE;
    o->budget = 1.0;
    o->max_step_rows = 2048;
    o->max_active = 64;
    o->max_prompt_tokens = 32768;
    o->max_vision_patches = 16384; /* 20 images of 448 x 448; ~0.7 GB of activations at 2B */
}

int twn_mode_parse(const char *s, twn_opts *o, twn_err *err) {
    if (!strcmp(s, "adaptive"))
        o->mode = TWN_MODE_ADAPTIVE;
    else if (!strcmp(s, "never"))
        o->mode = TWN_MODE_NEVER;
    else if (!strcmp(s, "always"))
        o->mode = TWN_MODE_ALWAYS;
    else if (!strncmp(s, "budget=", 7)) {
        char *end;
        double f = strtod(s + 7, &end);
        if (end == s + 7 || *end || !(f >= 0 && f <= 1))
            return twn_err_set(err,
                               "mode \"%s\": the budget must be a fraction in [0, 1], "
                               "e.g. budget=0.3",
                               s);
        o->mode = TWN_MODE_BUDGET;
        o->budget = f;
    } else
        return twn_err_set(err, "mode \"%s\": expected adaptive, never, always or budget=F", s);
    return 0;
}

void twn_result_free(twn_result *r) {
    twn_free(r->embedding);
    twn_free(r->cot_ids);
    twn_free(r->cot);
    twn_free(r->error);
    memset(r, 0, sizeof *r);
}

/* ------------------------------------------------------------------------------------------ */
/* Prompts */

static void render(const twn_model *m, const char *tpl, const twn_item *it, twn_str *out) {
    const char *instr = it->instruction ? it->instruction : m->man.default_instruction;
    for (const char *p = tpl; *p;) {
        if (!strncmp(p, "{instruction}", 13)) {
            twn_str_puts(out, instr ? instr : "");
            p += 13;
        } else if (!strncmp(p, "{images}", 8)) {
            for (int i = 0; i < it->n_images; i++) twn_str_puts(out, m->man.tpl_image);
            p += 8;
        } else if (!strncmp(p, "{text}", 6)) {
            twn_str_puts(out, it->text ? it->text : "");
            p += 6;
        } else {
            twn_str_append(out, p, 1);
            p++;
        }
    }
}

int twn_render_ids(const twn_model *m, const char *tpl, const twn_item *it, twn_ivec *out,
                   twn_err *err) {
    twn_str s = {0};
    render(m, tpl, it, &s);
    int rc = twn_tok_encode(m->tok, s.v ? s.v : "", s.n, out, err);
    twn_str_free(&s);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* The scheduler */

typedef enum { ST_GATE, ST_GATED, ST_REASON, ST_DECODE, ST_EMBED_COT, ST_DONE } state;

typedef struct {
    state st;
    twn_bkv *kv;       /* the backend's KV cache while a pass runs; NULL between passes */
    twn_ivec ids;      /* the rows this task feeds in its next prefill (queries excluded) */
    int n_queries;     /* query rows appended after ids in that prefill */
    int32_t next;      /* decode: the token to feed */
    twn_ivec cot;      /* generated ids (cut to the CoT when a stop string ends it) */
    twn_ivec starts;   /* byte offset in gen_bytes where each generated token starts */
    twn_str gen_bytes; /* raw bytes of the generated tokens, for the stop-string scan */
    float p;           /* p_think */
    bool hard;
    float *hidden;  /* [rows, H] of the last prefill (pooling token:<t> only) */
    float *pooled;  /* [H] the backend's pooled rows of the last prefill (query_mean, last_token) */
    float *logits;  /* [V] (sampling only; greedy decoding takes the backend's argmax) */
    int32_t argmax; /* the last step's greedy token */
    /* images: kept from the vision tower until the item is done (every prefill uses them) */
    int n_img;
    twn_image_patches *patches; /* [n_img], freed once the tower has run */
    twn_grid *grids;            /* [n_img] */
    int64_t *img_tokens;        /* [n_img] <|image_pad|> copies per image */
    int64_t n_img_tokens;       /* their sum */
    float *img_embeds;          /* [n_img_tokens, H] */
    float *img_ds;              /* [n_ds][n_img_tokens][H] DeepStack features */
    int n_ds;
    int32_t *pos;      /* [3][ids.n + n_queries] positions of the next prefill (images only) */
    int32_t *img_rows; /* [n_img_tokens] rows of the image tokens in ids */
} task;

static void kv_drop(twn_backend *be, task *t) {
    twn_backend_kv_close(be, t->kv); /* NULL: nothing open */
    t->kv = NULL;
}

static void task_drop_vision(task *t) {
    for (int j = 0; t->patches && j < t->n_img; j++) twn_image_patches_free(&t->patches[j]);
    twn_free(t->patches);
    twn_free(t->grids);
    twn_free(t->img_tokens);
    twn_free(t->img_embeds);
    twn_free(t->img_ds);
    twn_free(t->pos);
    twn_free(t->img_rows);
    t->patches = NULL, t->grids = NULL, t->img_tokens = NULL, t->img_embeds = NULL;
    t->img_ds = NULL, t->pos = NULL, t->img_rows = NULL;
}

static double act(twn_activation a, double x) {
    switch (a) {
    case TWN_ACT_GELU:
        return 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
    case TWN_ACT_GELU_TANH:
        return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    case TWN_ACT_RELU:
        return x > 0 ? x : 0;
    case TWN_ACT_SILU:
        return x / (1.0 + exp(-x));
    case TWN_ACT_TANH:
        return tanh(x);
    }
    return x;
}

static float gate_prob(const twn_model *m, const float *e0) {
    int H = m->lm->H;
    float *cur = twn_malloc(sizeof(float) * (size_t)H), *nxt = NULL;
    memcpy(cur, e0, sizeof(float) * (size_t)H);
    if (m->man.gate_input_normalized) twn_cpu_l2_normalize(cur, H, 1e-12f);
    for (int l = 0; l < m->n_gate; l++) {
        int in = m->gate[l].in, out = m->gate[l].out;
        nxt = twn_malloc(sizeof(float) * (size_t)out);
        for (int o = 0; o < out; o++) {
            float s = 0.f;
            const float *w = m->gate[l].w + (size_t)o * in;
            for (int i = 0; i < in; i++) s += w[i] * cur[i];
            s += m->gate[l].b[o];
            nxt[o] = l + 1 < m->n_gate ? (float)act(m->man.gate_activation, s) : s;
        }
        twn_free(cur);
        cur = nxt;
    }
    float p = 1.0f / (1.0f + expf(-cur[0]));
    twn_free(cur);
    return p;
}

/* Pools the final-norm hidden rows of a prefill (manifest "pooling") into out[H].  token:<t>
 * pools the last occurrence of <t> among the pass's ids (queries excluded); an item whose ids do
 * not hold it fails (scripts/reference refuses it too) rather than pooling some other row. */
static int pool(const twn_model *m, const task *t, float *out, twn_err *e) {
    int H = m->lm->H;
    const float *h = t->hidden;
    if (m->man.pooling != TWN_POOL_TOKEN) { /* the backend pooled them (pool_rows of the step) */
        memcpy(out, t->pooled, sizeof(float) * (size_t)H);
        return 0;
    }
    int row = -1;
    for (int r = (int)t->ids.n - 1; r >= 0 && row < 0; r--)
        if (t->ids.v[r] == m->pool_token_id) row = r;
    if (row < 0)
        return twn_err_set(e,
                           "pooling token:%s: the token (id %d) does not occur in the %zu prompt "
                           "ids",
                           m->man.pool_token, m->pool_token_id, t->ids.n);
    memcpy(out, h + (size_t)row * H, sizeof(float) * (size_t)H);
    return 0;
}

typedef struct {
    float l;
    int i;
} cand;

static int cand_desc(const void *a, const void *b) {
    float x = ((const cand *)a)->l, y = ((const cand *)b)->l;
    int i = ((const cand *)a)->i, j = ((const cand *)b)->i;
    return x < y ? 1 : x > y ? -1 : (i > j) - (i < j);
}

/* Argmax (first maximum, as torch.argmax) or seeded sampling per the manifest. */
static int32_t pick(const twn_model *m, const float *logits, int V, uint64_t *rng) {
    if (m->man.temperature <= 0) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (logits[i] > logits[best]) best = i;
        return best;
    }
    /* temperature + top-k + top-p over a sorted copy; xorshift for the draw. */
    cand *c = twn_malloc(sizeof(cand) * (size_t)V);
    for (int i = 0; i < V; i++) c[i] = (cand){logits[i] / (float)m->man.temperature, i};
    int n = V;
    qsort(c, (size_t)V, sizeof(cand), cand_desc);
    if (m->man.top_k > 0 && m->man.top_k < n) n = m->man.top_k;
    double sum = 0, mx = c[0].l;
    for (int i = 0; i < n; i++) sum += exp(c[i].l - mx);
    double acc = 0;
    int keep = n;
    for (int i = 0; i < n; i++) {
        acc += exp(c[i].l - mx) / sum;
        if (acc >= m->man.top_p) {
            keep = i + 1;
            break;
        }
    }
    double z = 0;
    for (int i = 0; i < keep; i++) z += exp(c[i].l - mx);
    *rng ^= *rng << 13, *rng ^= *rng >> 7, *rng ^= *rng << 17;
    double u = (double)(*rng >> 11) * 0x1.0p-53 * z, a = 0;
    int chosen = c[keep - 1].i;
    for (int i = 0; i < keep; i++) {
        a += exp(c[i].l - mx);
        if (u < a) {
            chosen = c[i].i;
            break;
        }
    }
    twn_free(c);
    return chosen;
}

/* Applies one generated token; returns true when the CoT is finished.
 *
 * The stop rule is scripts/reference's (twn_ref_common.StopScanner), byte for byte: every stop
 * string (single-token ones included) is searched in the concatenated raw BYTES of the generated
 * tokens, after each token, for an occurrence that ends in the bytes just added; the earliest-
 * starting occurrence wins, and the CoT is the generated tokens before the one holding the stop's
 * first byte.  Tokens with no bytes (padded vocabulary rows) add nothing.  think_tokens counts
 * every generated token, the stop tokens included. */
static bool cot_step(const twn_model *m, task *t, int32_t tok, twn_result *r) {
    r->think_tokens++;
    size_t prev = t->gen_bytes.n, nb;
    const char *b = twn_tok_bytes(m->tok, tok, &nb);
    twn_ivec_push(&t->cot, tok);
    twn_ivec_push(&t->starts, (int32_t)prev);
    twn_str_append(&t->gen_bytes, b, nb);
    const char *buf = t->gen_bytes.v ? t->gen_bytes.v : "";
    size_t n = t->gen_bytes.n;
    long best = -1;
    for (int i = 0; i < m->man.n_stop; i++) {
        size_t sl = strlen(m->man.stop[i]);
        size_t from = prev + 1 > sl ? prev + 1 - sl : 0;
        const char *hit = from < n ? memmem(buf + from, n - from, m->man.stop[i], sl) : NULL;
        if (hit && (best < 0 || hit - buf < best)) best = hit - buf;
    }
    if (best >= 0) {
        size_t keep =
            0; /* tokens whose first byte is at or before the stop's first byte, minus 1 */
        while (keep < t->starts.n && t->starts.v[keep] <= best) keep++;
        t->cot.n = keep - 1;
        return true;
    }
    return (int)r->think_tokens >= m->man.max_think_tokens;
}

static void fail_item(twn_result *r, task *t, const char *what, const twn_err *e) {
    char buf[TWN_ERR_MAX + 64];
    snprintf(buf, sizeof buf, "%s: %s", what, e->msg);
    r->error = twn_strdup(buf);
    t->st = ST_DONE;
}

/* Renders tpl for the item and expands each <|image_pad|> to its image's token count (n_img
 * images; 0 for a text item or for a template part that must hold none), appending to out. */
static int render_expand(const twn_model *m, const char *tpl, const twn_item *it, const task *t,
                         int n_img, twn_ivec *out, twn_err *e) {
    twn_ivec raw = {0};
    int rc = twn_render_ids(m, tpl, it, &raw, e);
    if (!rc) rc = twn_mrope_expand(raw.v, raw.n, m->image_token_id, t->img_tokens, n_img, out, e);
    twn_ivec_free(&raw);
    return rc;
}

/* For a prompt with images: the 3-stream positions of ids followed by the n_queries query rows
 * (get_rope_index; the queries continue as text), and the rows of the image tokens. */
static int prepare_rows(const twn_model *m, task *t, twn_err *e) {
    twn_free(t->pos);
    twn_free(t->img_rows);
    t->pos = NULL;
    t->img_rows = NULL;
    if (!t->n_img) return 0;
    const size_t n = t->ids.n, need = n + (size_t)t->n_queries;
    int32_t *p = twn_malloc(sizeof(int32_t) * 3 * (n ? n : 1)), next;
    if (twn_mrope_positions(t->ids.v, n, m->image_token_id, t->grids, t->n_img, m->vision->merge, 0,
                            p, &next, e)) {
        twn_free(p);
        return -1;
    }
    t->pos = twn_malloc(sizeof(int32_t) * 3 * need);
    for (int s = 0; s < 3; s++) {
        memcpy(t->pos + s * need, p + s * n, sizeof(int32_t) * n);
        for (int q = 0; q < t->n_queries; q++) t->pos[s * need + n + (size_t)q] = next + q;
    }
    twn_free(p);
    t->img_rows = twn_malloc(sizeof(int32_t) * (size_t)(t->n_img_tokens ? t->n_img_tokens : 1));
    int64_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (t->ids.v[i] == m->image_token_id) t->img_rows[k++] = (int32_t)i;
    return 0; /* k == n_img_tokens: twn_mrope_positions matched every image's run */
}

/* embed_cot = prefix (with the images) + the CoT ids as generated + suffix (no images), as
 * scripts/reference builds it. */
static int prepare_embed_cot(const twn_model *m, const twn_item *it, task *t, twn_err *e) {
    const char *tpl = m->man.tpl_embed_cot, *at = strstr(tpl, "{cot}");
    char *pre = twn_strndup(tpl, (size_t)(at - tpl));
    t->ids.n = 0;
    int rc = render_expand(m, pre, it, t, t->n_img, &t->ids, e);
    twn_free(pre);
    if (rc) return -1;
    twn_ivec_append(&t->ids, t->cot.v, t->cot.n);
    return render_expand(m, at + 5, it, t, 0, &t->ids, e);
}

/* ------------------------------------------------------------------------------------------ */
/* Images */

/* Decodes and preprocesses an item's images; fills grids and token counts. */
static int prepare_images(const twn_model *m, const twn_item *it, task *t, twn_err *e) {
    if (!m->vision)
        return twn_err_set(e, "item has %d image(s) but the base model %s has no vision tower",
                           it->n_images, m->man.base_dir);
    t->n_img = it->n_images;
    t->patches = twn_calloc((size_t)t->n_img, sizeof *t->patches);
    t->grids = twn_calloc((size_t)t->n_img, sizeof *t->grids);
    t->img_tokens = twn_calloc((size_t)t->n_img, sizeof *t->img_tokens);
    for (int j = 0; j < t->n_img; j++) {
        twn_image_patches *p = &t->patches[j];
        const char *name = it->images && it->images[j] ? it->images[j] : "image";
        if (it->image_data && it->image_data[j]) {
            if (twn_image_prepare_mem(it->image_data[j], it->image_size[j], name, &m->image_cfg, p,
                                      e))
                return -1;
        } else if (twn_image_prepare_file(it->images[j], &m->image_cfg, p, e))
            return -1;
        if (p->patch_dim != m->vision->patch_dim)
            return twn_err_set(e, "%s: %d values per patch, the vision tower takes %d", name,
                               p->patch_dim, m->vision->patch_dim);
        t->grids[j] = (twn_grid){p->grid_t, p->grid_h, p->grid_w};
        t->img_tokens[j] = twn_vision_tokens(m->vision, p->grid_t, p->grid_h, p->grid_w);
        t->n_img_tokens += t->img_tokens[j];
    }
    return 0;
}

/* Runs the vision tower over the images of every item still alive, whole items per call and at
 * most o->max_vision_patches patches per call (an item larger than that runs alone), and gives
 * each item its embeddings and DeepStack features.  A failing call fails the items in it.  Frees
 * the patches. */
static void run_vision(const twn_model *m, task *tasks, int n, const twn_opts *o, twn_result *res,
                       int *done) {
    const twn_vision *v = m->vision;
    const int H = m->lm->H;
    int *members = twn_malloc(sizeof(int) * (size_t)(n ? n : 1));
    twn_vision_image *im = NULL;
    int i = 0;
    while (v && i < n) {
        /* gather whole items up to the patch budget */
        int nm = 0, nimg = 0;
        int64_t patches = 0;
        for (; i < n; i++) {
            task *t = &tasks[i];
            if (t->st == ST_DONE || !t->n_img) continue;
            int64_t p = 0;
            for (int j = 0; j < t->n_img; j++) p += t->patches[j].n_patches;
            if (nm && patches + p > o->max_vision_patches) break;
            members[nm++] = i;
            nimg += t->n_img;
            patches += p;
        }
        if (!nm) break;
        im = twn_realloc(im, sizeof *im * (size_t)nimg);
        for (int a = 0, k = 0; a < nm; a++) {
            const task *t = &tasks[members[a]];
            for (int j = 0; j < t->n_img; j++, k++)
                im[k] = (twn_vision_image){t->patches[j].pixels, t->patches[j].grid_t,
                                           t->patches[j].grid_h, t->patches[j].grid_w};
        }
        twn_vision_out out;
        twn_err e;
        int frc = twn_vision_forward(v, im, nimg, NULL, NULL, &out, &e);
        for (int a = 0, k = 0; a < nm; a++) {
            task *t = &tasks[members[a]];
            const size_t nt = (size_t)t->n_img_tokens;
            twn_err ie = e;
            int irc = frc;
            if (!irc) {
                t->n_ds = out.n_features;
                t->img_embeds = twn_try_alloc(sizeof(float) * nt * (size_t)H + 1);
                t->img_ds = twn_try_alloc(sizeof(float) * (size_t)out.n_features * nt * H + 1);
                if (!t->img_embeds || !t->img_ds)
                    irc = twn_err_set(&ie,
                                      "cannot allocate the vision features of %zu image "
                                      "tokens",
                                      nt);
            }
            if (irc) { /* the call failed, or this item's buffers could not be had */
                k += t->n_img;
                fail_item(&res[members[a]], t, "vision tower", &ie);
                ++*done;
                continue;
            }
            int64_t tok = 0;
            for (int j = 0; j < t->n_img; j++, k++) {
                const int64_t o0 = out.offsets[k], cnt = out.offsets[k + 1] - o0;
                memcpy(t->img_embeds + (size_t)tok * H, out.embeds + (size_t)o0 * H,
                       sizeof(float) * (size_t)cnt * H);
                for (int f = 0; f < out.n_features; f++)
                    memcpy(t->img_ds + ((size_t)f * nt + (size_t)tok) * H,
                           out.deepstack + ((size_t)f * out.n_tokens + (size_t)o0) * H,
                           sizeof(float) * (size_t)cnt * H);
                tok += cnt;
            }
        }
        twn_vision_out_free(&out);
        for (int a = 0; a < nm; a++) {
            task *t = &tasks[members[a]];
            for (int j = 0; j < t->n_img; j++) twn_image_patches_free(&t->patches[j]);
        }
    }
    twn_free(im);
    twn_free(members);
}

int twn_embed_items(const twn_model *m, const twn_item *items, int n, const twn_opts *o,
                    twn_result *res, twn_err *err) {
    const twn_lm *lm = m->lm;
    twn_backend *be = m->backend;
    const int H = lm->H;
    const bool greedy = m->man.temperature <= 0;
    task *tasks = twn_calloc((size_t)(n ? n : 1), sizeof *tasks);
    twn_bseq *seqs = twn_calloc((size_t)(n ? n : 1), sizeof *seqs);
    twn_lm_deepstack *dss = twn_calloc((size_t)(n ? n : 1), sizeof *dss);
    int *who = twn_calloc((size_t)(n ? n : 1), sizeof *who);
    int rc = -1, done = 0;
    twn_err e;

    for (int i = 0; i < n; i++) {
        memset(&res[i], 0, sizeof res[i]);
        res[i].dim = H;
        res[i].p_think = NAN;
        task *t = &tasks[i];
        t->n_queries = m->K;
        if (items[i].n_images > 0 && prepare_images(m, &items[i], t, &e))
            fail_item(&res[i], t, "image", &e);
        else if (render_expand(m, m->man.tpl_embed, &items[i], t, t->n_img, &t->ids, &e))
            fail_item(&res[i], t, "tokenizing the prompt", &e);
        else if ((int)t->ids.n + m->K > o->max_prompt_tokens) {
            twn_err_set(&e, "prompt is %zu tokens; the limit is %d", t->ids.n + (size_t)m->K,
                        o->max_prompt_tokens);
            fail_item(&res[i], t, "prompt", &e);
        } else if (prepare_rows(m, t, &e))
            fail_item(&res[i], t, "image positions", &e);
        else if (o->pass == TWN_PASS_REASON) {
            /* known hard: straight to the reasoning prompt (the gate ran elsewhere) */
            res[i].hard = t->hard = true;
            res[i].p_think = t->p = items[i].p_think;
            res[i].embedding = twn_malloc(sizeof(float) * (size_t)H);
            t->ids.n = 0;
            t->n_queries = 0;
            if (render_expand(m, m->man.tpl_reason, &items[i], t, t->n_img, &t->ids, &e) ||
                prepare_rows(m, t, &e))
                fail_item(&res[i], t, "tokenizing the reasoning prompt", &e);
            else
                t->st = ST_REASON;
        } else
            t->st = ST_GATE;
        if (t->st == ST_DONE) done++;
    }
    /* the vision tower over every live item's images at once (in bounded calls) */
    run_vision(m, tasks, n, o, res, &done);

    while (done < n) {
        /* Budget mode decides once every item of the window has its p_think. */
        int waiting = 0, gating = 0;
        for (int i = 0; i < n; i++) {
            waiting += tasks[i].st == ST_GATED;
            gating += tasks[i].st == ST_GATE;
        }
        if (waiting && (o->mode != TWN_MODE_BUDGET || !gating)) {
            int quota = 0;
            if (o->mode == TWN_MODE_BUDGET) {
                int scored = 0;
                for (int i = 0; i < n; i++) scored += !res[i].error;
                /* ceil(F*n) with a 1e-9 allowance, so budget=0.28 of 25 items is 7, not the 8
                 * that 0.28*25 = 7.000000000000001 would give (scripts/reference: the same). */
                quota = (int)ceil(o->budget * scored - 1e-9);
            }
            for (int i = 0; i < n; i++) {
                task *t = &tasks[i];
                if (t->st != ST_GATED) continue;
                bool hard = o->mode == TWN_MODE_ALWAYS ||
                            (o->mode == TWN_MODE_ADAPTIVE && t->p >= m->man.threshold);
                if (o->mode == TWN_MODE_BUDGET) { /* rank: higher p first, then item order */
                    int better = 0;
                    for (int j = 0; j < n; j++)
                        if (!res[j].error && j != i &&
                            (tasks[j].p > t->p || (tasks[j].p == t->p && j < i)))
                            better++;
                    hard = better < quota;
                }
                res[i].hard = t->hard = hard;
                if (!hard || o->pass == TWN_PASS_GATE) {
                    if (hard) { /* a reasoning worker takes it from here */
                        res[i].deferred = true;
                        twn_free(res[i].embedding);
                        res[i].embedding = NULL;
                    }
                    t->st = ST_DONE;
                    done++;
                    continue;
                }
                t->ids.n = 0;
                t->n_queries = 0;
                if (render_expand(m, m->man.tpl_reason, &items[i], t, t->n_img, &t->ids, &e) ||
                    prepare_rows(m, t, &e)) {
                    fail_item(&res[i], t, "tokenizing the reasoning prompt", &e);
                    twn_free(res[i].embedding);
                    res[i].embedding = NULL;
                    done++;
                    continue;
                }
                t->st = ST_REASON;
            }
            continue;
        }

        /* Build one step: decodes first (they are one row each and hold KV), then prefills. */
        int ns = 0, rows = 0, active = 0, kv_wait = -1;
        twn_err kv_err, kv_e; /* kv_err: why the first deferred sequence (kv_wait) waits */
        for (int i = 0; i < n; i++) active += tasks[i].st == ST_DECODE;
        for (int pass = 0; pass < 2; pass++)
            for (int i = 0; i < n; i++) {
                task *t = &tasks[i];
                bool dec = t->st == ST_DECODE;
                bool pre = t->st == ST_GATE || t->st == ST_REASON || t->st == ST_EMBED_COT;
                if ((pass == 0 && !dec) || (pass == 1 && !pre)) continue;
                int need = dec ? 1 : (int)t->ids.n + t->n_queries;
                if (pre && t->st == ST_REASON && active >= o->max_active) continue;
                if (rows && rows + need > o->max_step_rows) continue;
                /* a CoT grows one row per step: reserve its whole length up front.  A pool
                 * that cannot supply it now (cuda) defers the sequence to a later step. */
                if (!t->kv && twn_backend_kv_open(
                                  be, need + (t->st == ST_REASON ? m->man.max_think_tokens : 0),
                                  &t->kv, &kv_e)) {
                    t->kv = NULL;
                    if (kv_wait < 0) kv_wait = i, kv_err = kv_e;
                    continue;
                }
                if (pre && t->st == ST_REASON) active++;
                twn_bseq *s = &seqs[ns];
                memset(s, 0, sizeof *s);
                s->kv = t->kv;
                if (dec) {
                    s->n = 1;
                    s->ids = &t->next;
                    s->adapter = m->rsn_idx;
                    if (greedy)
                        s->argmax = &t->argmax;
                    else {
                        if (!t->logits) t->logits = twn_malloc(sizeof(float) * (size_t)lm->V);
                        s->logits = t->logits;
                    }
                } else {
                    s->n = need;
                    /* ids followed by K query rows (TWN_TOKEN_EMBED); image rows are also
                     * TWN_TOKEN_EMBED, with the tower's embeddings in order */
                    int32_t *ids = twn_malloc(sizeof(int32_t) * (size_t)need);
                    memcpy(ids, t->ids.v, sizeof(int32_t) * t->ids.n);
                    for (int q = 0; q < t->n_queries; q++) ids[t->ids.n + q] = TWN_TOKEN_EMBED;
                    s->ids = ids;
                    if (t->n_queries || t->n_img) {
                        float *emb = twn_calloc((size_t)need * H, sizeof(float));
                        memcpy(emb + t->ids.n * (size_t)H, m->queries,
                               sizeof(float) * (size_t)t->n_queries * H);
                        for (int64_t k = 0; k < (t->n_img ? t->n_img_tokens : 0); k++) {
                            ids[t->img_rows[k]] = TWN_TOKEN_EMBED;
                            memcpy(emb + (size_t)t->img_rows[k] * H, t->img_embeds + (size_t)k * H,
                                   sizeof(float) * (size_t)H);
                        }
                        s->embeds = emb;
                    }
                    if (t->n_img) { /* M-RoPE positions; DeepStack at the image rows */
                        s->pos = t->pos;
                        dss[ns] = (twn_lm_deepstack){t->n_ds, (int)t->n_img_tokens, t->img_rows,
                                                     t->img_ds};
                        s->deepstack = &dss[ns];
                    }
                    s->adapter = t->st == ST_REASON ? m->rsn_idx : m->emb_idx;
                    if (t->st == ST_REASON && greedy)
                        s->argmax = &t->argmax;
                    else if (t->st == ST_REASON) {
                        if (!t->logits) t->logits = twn_malloc(sizeof(float) * (size_t)lm->V);
                        s->logits = t->logits;
                    } else if (m->man.pooling == TWN_POOL_TOKEN) {
                        twn_free(t->hidden);
                        t->hidden = twn_malloc(sizeof(float) * (size_t)need * H);
                        s->hidden = t->hidden;
                    } else { /* query_mean: the K query rows; last_token: the last row */
                        if (!t->pooled) t->pooled = twn_malloc(sizeof(float) * (size_t)H);
                        s->pooled = t->pooled;
                        s->pool_rows = m->man.pooling == TWN_POOL_QUERY_MEAN ? m->K : 1;
                    }
                }
                who[ns++] = i;
                rows += need;
            }
        if (!ns && kv_wait >= 0) {
            /* nothing of this call holds KV rows (decodes always run), so waiting cannot help:
             * this sequence does not fit the pool (or other callers hold it) */
            fail_item(&res[kv_wait], &tasks[kv_wait], "KV cache", &kv_err);
            done++;
            continue;
        }
        if (!ns) {
            twn_err_set(err, "scheduler made no progress (%d of %d items done)", done, n);
            goto out;
        }
        int frc = twn_backend_forward(be, seqs, ns, &e);
        for (int s = 0; s < ns; s++) {
            task *t = &tasks[who[s]];
            if (t->st != ST_DECODE) {
                twn_free((void *)seqs[s].ids);
                twn_free((void *)seqs[s].embeds);
            }
        }
        if (frc) {
            *err = e;
            goto out;
        }

        for (int s = 0; s < ns; s++) {
            int i = who[s];
            task *t = &tasks[i];
            twn_result *r = &res[i];
            uint64_t rng = m->man.seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(i + 1)) ^
                           (uint64_t)r->think_tokens;
            switch (t->st) {
            case ST_GATE: {
                r->embedding = twn_malloc(sizeof(float) * (size_t)H);
                kv_drop(be, t);
                if (pool(m, t, r->embedding, &e)) {
                    fail_item(r, t, "pooling the gate pass", &e);
                    done++;
                    break;
                }
                if (o->mode != TWN_MODE_NEVER) t->p = r->p_think = gate_prob(m, r->embedding);
                if (m->man.normalize) twn_cpu_l2_normalize(r->embedding, H, 1e-12f);
                if (o->mode == TWN_MODE_NEVER) {
                    t->st = ST_DONE;
                    done++;
                } else
                    t->st = ST_GATED;
                break;
            }
            case ST_REASON:
            case ST_DECODE: {
                int32_t tok = greedy ? t->argmax : pick(m, t->logits, lm->V, &rng);
                if (m->man.max_think_tokens == 0 || cot_step(m, t, tok, r)) {
                    kv_drop(be, t);
                    t->n_queries = m->K;
                    if (prepare_embed_cot(m, &items[i], t, &e) || prepare_rows(m, t, &e)) {
                        fail_item(r, t, "tokenizing the embedding prompt", &e);
                        done++;
                        break;
                    }
                    t->st = ST_EMBED_COT;
                } else {
                    t->next = tok;
                    t->st = ST_DECODE;
                }
                break;
            }
            case ST_EMBED_COT: {
                kv_drop(be, t);
                if (pool(m, t, r->embedding, &e)) {
                    fail_item(r, t, "pooling the embedding pass", &e);
                    done++;
                    break;
                }
                if (m->man.normalize) twn_cpu_l2_normalize(r->embedding, H, 1e-12f);
                r->n_cot = (int)t->cot.n;
                r->cot_ids = twn_malloc(sizeof(int32_t) * (t->cot.n + 1));
                memcpy(r->cot_ids, t->cot.v, sizeof(int32_t) * t->cot.n);
                twn_str s2 = {0};
                twn_tok_decode(m->tok, t->cot.v, t->cot.n, false, &s2, NULL);
                r->cot = s2.v ? s2.v : twn_strdup("");
                t->st = ST_DONE;
                done++;
                break;
            }
            default:
                break;
            }
        }
        for (int i = 0; i < n; i++) /* finished items (easy, hard or failed) need no images */
            if (tasks[i].st == ST_DONE && tasks[i].n_img) task_drop_vision(&tasks[i]);
    }
    rc = 0;
out:
    for (int i = 0; i < n; i++) {
        task *t = &tasks[i];
        kv_drop(be, t);
        twn_ivec_free(&t->ids);
        twn_ivec_free(&t->cot);
        twn_ivec_free(&t->starts);
        twn_str_free(&t->gen_bytes);
        twn_free(t->hidden);
        twn_free(t->pooled);
        twn_free(t->logits);
        task_drop_vision(t);
        if (rc == 0 && res[i].error) {
            twn_free(res[i].embedding);
            res[i].embedding = NULL;
        }
    }
    twn_free(tasks);
    twn_free(seqs);
    twn_free(dss);
    twn_free(who);
    return rc;
}
