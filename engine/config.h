/* config.h — the Hugging Face config.json of a Qwen3-VL checkpoint.
 *
 * Only model_type "qwen3_vl" (nested text_config / vision_config) is accepted; anything else is
 * refused by name.  Both RoPE encodings are read: transformers 4.57's
 * text_config.{rope_theta, rope_scaling{mrope_section, mrope_interleaved, rope_type}} and v5's
 * text_config.rope_parameters{rope_theta, rope_type, mrope_section, mrope_interleaved}.
 * rope_type must be "default".  Missing mrope_section falls back to [24,20,20] (4.57 behaviour);
 * sum(mrope_section) must equal head_dim/2.  tie_word_embeddings is read at the top level, then
 * text_config (top level wins when both are present).  Values the engine depends on are
 * range-checked (positive dims, heads dividing evenly, head_dim even) and errors name the key and
 * value. */
#ifndef TWN_ENGINE_CONFIG_H
#define TWN_ENGINE_CONFIG_H

#include <stdbool.h>

#include "util/err.h"

#define TWN_MAX_DEEPSTACK 8

typedef struct {
    int vocab_size;
    int hidden_size;
    int intermediate_size;
    int num_hidden_layers;
    int num_attention_heads;
    int num_key_value_heads;
    int head_dim;
    double rope_theta;
    double rms_norm_eps;
    int mrope_section[3];
    bool mrope_interleaved;
    int max_position_embeddings;
    bool attention_bias; /* must be false (Qwen3-VL); refused otherwise */
    char hidden_act[32]; /* "silu" */
    int bos_token_id;    /* -1 when absent */
    int eos_token_id;    /* first one when a list; -1 when absent */
} twn_text_config;

typedef struct {
    int depth;
    int hidden_size;
    int intermediate_size;
    int num_heads;
    int in_channels;
    int patch_size;
    int temporal_patch_size;
    int spatial_merge_size;
    int out_hidden_size;
    int num_position_embeddings;
    int deepstack_visual_indexes[TWN_MAX_DEEPSTACK];
    int n_deepstack;
    char hidden_act[32]; /* "gelu_pytorch_tanh" */
} twn_vision_config;

typedef struct {
    char model_type[32]; /* "qwen3_vl" */
    twn_text_config text;
    twn_vision_config vision;
    bool has_vision;
    bool tie_word_embeddings;
    int image_token_id;        /* default 151655 */
    int video_token_id;        /* default 151656 */
    int vision_start_token_id; /* default 151652 */
    int vision_end_token_id;   /* default 151653 */
    char dtype[16]; /* "bfloat16", "float32", ... from dtype / torch_dtype; "" if absent */
    bool rope_v5;   /* true when read from rope_parameters */
} twn_config;

/* Parses config.json at path.  Errors name the file and the key. */
int twn_config_load(const char *path, twn_config *cfg, twn_err *err);
/* Same, from a JSON string in memory (name used in messages). */
int twn_config_parse(const char *json, size_t len, const char *name, twn_config *cfg, twn_err *err);

#endif
