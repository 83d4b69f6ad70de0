/* fuzz_config.c — arbitrary bytes through config.json parsing.
 *
 * A config that parses must satisfy the invariants the engine relies on without re-checking
 * (even head_dim, whole GQA groups, mrope_section summing to head_dim / 2, deepstack indexes
 * inside the vision tower); one that fails must say why, naming the file. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/config.h"

#define NAME "fuzz/config.json"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    twn_config cfg;
    twn_err err = {{0}};
    if (twn_config_parse((const char *)data, size, NAME, &cfg, &err) != 0) {
        if (strncmp(err.msg, NAME ": ", sizeof NAME + 1) != 0) abort();
        return 0;
    }
    const twn_text_config *t = &cfg.text;
    if (strcmp(cfg.model_type, "qwen3_vl")) abort();
    if (t->head_dim <= 0 || t->head_dim % 2) abort();
    if (t->num_key_value_heads <= 0 || t->num_attention_heads % t->num_key_value_heads) abort();
    if (t->mrope_section[0] + t->mrope_section[1] + t->mrope_section[2] != t->head_dim / 2) abort();
    if (!(t->rope_theta > 0) || !(t->rms_norm_eps > 0) || t->attention_bias) abort();
    if (cfg.has_vision) {
        const twn_vision_config *v = &cfg.vision;
        if (v->n_deepstack < 0 || v->n_deepstack > TWN_MAX_DEEPSTACK) abort();
        for (int i = 0; i < v->n_deepstack; i++)
            if (v->deepstack_visual_indexes[i] < 0 || v->deepstack_visual_indexes[i] >= v->depth)
                abort();
        if (v->num_heads <= 0 || v->hidden_size % v->num_heads) abort();
        if (v->out_hidden_size != t->hidden_size) abort();
    }
    return 0;
}
