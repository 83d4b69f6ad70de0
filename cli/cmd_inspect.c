/* cmd_inspect.c — `twn inspect DIR`: what a TWN checkpoint holds, or why it is broken.
 *
 * Loads everything the engine would load (manifest, base config and weights, both adapters, gate,
 * queries, tokenizer) so a checkpoint that inspects cleanly is one `twn embed` can run; any
 * failure prints one message naming the file and the problem and exits 1. */
#include <stdio.h>
#include <string.h>

#include "cli/commands.h"
#include "engine/twn.h"

static const char *act_name[] = {"gelu", "gelu_tanh", "relu", "silu", "tanh"};
static const char *pool_name[] = {"query_mean", "last_token", "token"};

int twn_cmd_inspect(int argc, char **argv) {
    if (argc != 2 || !strcmp(argv[1], "--help")) {
        fprintf(argc == 2 ? stdout : stderr, "usage: twn inspect DIR   (a TWN checkpoint: "
                                             "DIR/twn.json, or a path to a twn.json)\n");
        return argc == 2 ? 0 : 2;
    }
    twn_model *m = NULL;
    twn_err err;
    if (twn_model_load(argv[1], &m, &err)) {
        fprintf(stderr, "twn inspect: %s\n", err.msg);
        return 1;
    }
    const twn_lm *lm = m->lm;
    const twn_text_config *c = &lm->cfg;
    int64_t backbone = lm->n_params;
    printf("manifest   %s (sha256 %.16s…)\n", m->man.path, m->man.sha256);
    printf("base       %s\n", m->man.base_dir);
    printf("  text     %d layers, hidden %d, ffn %d, heads %d/%d (GQA %d), head_dim %d, vocab %d\n",
           lm->L, lm->H, lm->I, lm->nh, lm->nkv, lm->nh / lm->nkv, lm->D, lm->V);
    printf("  rope     theta %g, mrope_section [%d,%d,%d] interleaved, %s encoding\n",
           c->rope_theta, c->mrope_section[0], c->mrope_section[1], c->mrope_section[2],
           "config.json");
    printf("  head     %s\n", lm->lm_head == lm->embed ? "tied to embed_tokens" : "untied lm_head");
    printf("  params   %.3f M text (fp32 in memory: %.1f MiB)\n", backbone / 1e6,
           lm->weight_bytes / 1048576.0);
    const twn_adapter *ad[2] = {m->embedding, m->reasoning};
    int64_t extra = 0;
    for (int i = 0; i < 2; i++) {
        const twn_adapter *a = ad[i];
        printf("adapter    %-9s %s\n", a->name, a->dir);
        printf("  lora     r=%d alpha=%g scaling=%s, %d modules, %.3f M params (%.2f%% of the "
               "text backbone)\n",
               a->r, a->lora_alpha, a->use_rslora ? "alpha/sqrt(r) (rsLoRA)" : "alpha/r",
               a->n_loras, a->n_params / 1e6, 100.0 * (double)a->n_params / (double)backbone);
        printf("  targets  %s\n", a->target_desc ? a->target_desc : "?");
        extra += a->n_params;
    }
    printf("gate       %s: ", m->man.gate_path);
    for (int i = 0; i < m->n_gate; i++)
        printf("%sLinear(%d→%d)", i ? " → " : "", m->gate[i].in, m->gate[i].out);
    printf(" → sigmoid, activation %s, input %s, threshold %g\n", act_name[m->man.gate_activation],
           m->man.gate_input_normalized ? "pooled_normalized" : "pooled", m->man.threshold);
    printf("queries    %s: K=%d × %d\n", m->man.queries_path, m->K, lm->H);
    extra += m->gate_params + (int64_t)m->K * lm->H;
    printf("overhead   %.3f M params = %.2f%% of the text backbone (adapters + gate + queries)\n",
           extra / 1e6, 100.0 * (double)extra / (double)backbone);
    printf("pooling    %s%s%s, normalize %s, embedding dim %d\n", pool_name[m->man.pooling],
           m->man.pool_token ? ":" : "", m->man.pool_token ? m->man.pool_token : "",
           m->man.normalize ? "L2" : "none", lm->H);
    printf("thinking   max %d tokens, stop", m->man.max_think_tokens);
    for (int i = 0; i < m->man.n_stop; i++) printf(" \"%s\"", m->man.stop[i]);
    printf(", %s\n", m->man.temperature > 0 ? "sampled" : "greedy");
    printf("tokenizer  %d tokens\n", twn_tok_size(m->tok));
    twn_model_free(m);
    return 0;
}
