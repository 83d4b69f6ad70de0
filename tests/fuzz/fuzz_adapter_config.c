/* fuzz_adapter_config.c — bytes as adapter_config.json through twn_adapter_config_parse, then
 * every rule the loader applies to a module (selection, rank_pattern, alpha_pattern, scaling,
 * target_desc) over a fixed list of real Qwen3-VL module names, so hostile regexes are matched
 * too, not only compiled.  The same bytes also go through twn_adapter_targets as a bare
 * target_modules value.  Invariants: a failure always leaves a message and no config. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "engine/adapter.h"
#include "engine/adapter_internal.h"
#include "util/mem.h"

static const char *const modules[] = {
    "model.language_model.layers.0.self_attn.q_proj",
    "model.language_model.layers.27.self_attn.o_proj",
    "model.language_model.layers.3.mlp.down_proj",
    "model.language_model.embed_tokens",
    "model.visual.blocks.0.attn.qkv",
    "model.visual.blocks.11.attn.proj",
    "model.visual.merger.linear_fc1",
    "model.visual.deepstack_merger_list.1.linear_fc2",
    "lm_head",
    "q_proj",
    "",
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    twn_err err = {{0}};
    twn_adapter_config *c = (twn_adapter_config *)(uintptr_t)1;
    if (twn_adapter_config_parse((const char *)data, size, "fuzz.json", &c, &err) == 0) {
        for (size_t i = 0; i < sizeof modules / sizeof modules[0]; i++) {
            const char *m = modules[i];
            bool linear = !strstr(m, "embed_tokens"), output = !strcmp(m, "lm_head"), sel, ex;
            int r = 0;
            double alpha = 0;
            const char *key;
            if (twn_adapter_config_selects(c, m, linear, output, &sel, &ex, &err) && !err.msg[0])
                __builtin_trap();
            if (twn_adapter_config_rank(c, m, &r, &key, &err) == 0 && r <= 0) __builtin_trap();
            if (twn_adapter_config_alpha(c, m, &alpha, &key, &err) == 0 && r > 0)
                (void)twn_lora_scaling(alpha, r, c->use_rslora);
        }
        char *desc = twn_adapter_config_desc(c);
        if (!desc || !desc[0]) __builtin_trap();
        twn_free(desc);
        twn_adapter_config_free(c);
    } else if (c != NULL || !err.msg[0]) {
        __builtin_trap();
    }

    /* The same bytes as a target_modules value (twn_adapter_targets wants a C string). */
    char *spec = twn_malloc(size + 1);
    memcpy(spec, data, size);
    spec[size] = 0;
    bool sel;
    for (size_t i = 0; i < 3; i++) {
        err.msg[0] = 0;
        if (twn_adapter_targets(spec, modules[i * 4], true, false, &sel, &err) && !err.msg[0])
            __builtin_trap();
    }
    twn_free(spec);
    return 0;
}
