/* manifest.c — loads and validates twn.json (see manifest.h for the schema and semantics).
 *
 * Every key is checked against the schema: a typo ("treshold") is an error naming the key rather
 * than a silent fallback to the default, because a silently wrong threshold changes every route. */
#include "engine/manifest.h"

#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>

#include "util/fileio.h"
#include "util/mem.h"
#include "util/vec.h"

#define DEFAULT_EMBED                                                                              \
    "<|im_start|>user\n{instruction}{images}{text}<|im_end|>\n<|im_start|>assistant\n"
#define DEFAULT_REASON                                                                             \
    "<|im_start|>user\n{instruction}{images}{text}<|im_end|>\n<|im_start|>assistant\n<think>\n"
#define DEFAULT_EMBED_COT                                                                          \
    "<|im_start|>user\n{instruction}{images}{text}<|im_end|>\n<|im_start|>assistant\n<think>\n"    \
    "{cot}</think>\n\n"
#define DEFAULT_IMAGE "<|vision_start|><|image_pad|><|vision_end|>"

static int check_keys(json_t *obj, const char *where, const char *const *allowed, const char *file,
                      twn_err *err) {
    const char *k;
    json_t *v;
    json_object_foreach(obj, k, v) {
        int ok = 0;
        for (const char *const *a = allowed; *a; a++) ok |= !strcmp(*a, k);
        if (!ok) {
            twn_str list = {0};
            for (const char *const *a = allowed; *a; a++)
                twn_str_printf(&list, "%s%s", a == allowed ? "" : ", ", *a);
            twn_err_set(err, "%s: unknown key \"%s%s\"; allowed here: %s", file, where, k, list.v);
            twn_str_free(&list);
            return -1;
        }
    }
    return 0;
}

static int get_str(json_t *obj, const char *key, const char *def, char **out, const char *file,
                   twn_err *err) {
    json_t *v = json_object_get(obj, key);
    if (!v) {
        *out = def ? twn_strdup(def) : NULL;
        return 0;
    }
    if (!json_is_string(v)) return twn_err_set(err, "%s: \"%s\" must be a string", file, key);
    *out = twn_strdup(json_string_value(v));
    return 0;
}

static int get_num(json_t *obj, const char *key, double def, double lo, double hi, double *out,
                   const char *file, twn_err *err) {
    json_t *v = json_object_get(obj, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_number(v)) return twn_err_set(err, "%s: \"%s\" must be a number", file, key);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi))
        return twn_err_set(err, "%s: \"%s\" is %g; expected a value in [%g, %g]", file, key, x, lo,
                           hi);
    *out = x;
    return 0;
}

static void sha256_hex(const void *data, size_t n, char out[65]) {
    unsigned char md[32];
    unsigned int len = 0;
    EVP_Digest(data, n, md, &len, EVP_sha256(), NULL);
    for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static int parse(json_t *root, twn_manifest *m, const char *file, twn_err *err) {
    static const char *const top[] = {"format",
                                      "name",
                                      "base",
                                      "adapters",
                                      "gate",
                                      "queries",
                                      "pooling",
                                      "normalize",
                                      "threshold",
                                      "max_think_tokens",
                                      "stop",
                                      "sampling",
                                      "default_instruction",
                                      "templates",
                                      "comment",
                                      NULL};
    if (!json_is_object(root)) return twn_err_set(err, "%s: not a JSON object", file);
    if (check_keys(root, "", top, file, err)) return -1;
    json_t *fmt = json_object_get(root, "format");
    if (!json_is_string(fmt) || strcmp(json_string_value(fmt), "twn/1"))
        return twn_err_set(err, "%s: \"format\" must be \"twn/1\"", file);

    char *s = NULL;
    if (get_str(root, "base", "base", &s, file, err)) return -1;
    m->base_dir = twn_path_join(m->dir, s);
    twn_free(s);

    json_t *ad = json_object_get(root, "adapters");
    if (ad && !json_is_object(ad))
        return twn_err_set(err, "%s: \"adapters\" must be an object", file);
    static const char *const adk[] = {"embedding", "reasoning", NULL};
    if (ad && check_keys(ad, "adapters.", adk, file, err)) return -1;
    json_t *empty = json_object();
    if (get_str(ad ? ad : empty, "embedding", "embedding", &s, file, err)) goto fail;
    m->embedding_dir = twn_path_join(m->dir, s);
    twn_free(s);
    if (get_str(ad ? ad : empty, "reasoning", "reasoning", &s, file, err)) goto fail;
    m->reasoning_dir = twn_path_join(m->dir, s);
    twn_free(s);

    json_t *gate = json_object_get(root, "gate");
    if (gate && !json_is_object(gate)) {
        twn_err_set(err, "%s: \"gate\" must be an object", file);
        goto fail;
    }
    static const char *const gk[] = {"path", "activation", "input", NULL};
    if (gate && check_keys(gate, "gate.", gk, file, err)) goto fail;
    if (get_str(gate ? gate : empty, "path", "gate_mlp.pt", &s, file, err)) goto fail;
    m->gate_path = twn_path_join(m->dir, s);
    twn_free(s);
    if (get_str(gate ? gate : empty, "activation", "gelu", &s, file, err)) goto fail;
    static const char *acts[] = {"gelu", "gelu_tanh", "relu", "silu", "tanh"};
    int act = -1;
    for (int i = 0; i < 5; i++)
        if (!strcmp(s, acts[i])) act = i;
    if (act < 0) {
        twn_err_set(err,
                    "%s: gate.activation is \"%s\"; expected gelu, gelu_tanh, relu, silu or tanh",
                    file, s);
        twn_free(s);
        goto fail;
    }
    twn_free(s);
    m->gate_activation = (twn_activation)act;
    if (get_str(gate ? gate : empty, "input", "pooled", &s, file, err)) goto fail;
    if (strcmp(s, "pooled") && strcmp(s, "pooled_normalized")) {
        twn_err_set(err, "%s: gate.input is \"%s\"; expected pooled or pooled_normalized", file, s);
        twn_free(s);
        goto fail;
    }
    m->gate_input_normalized = !strcmp(s, "pooled_normalized");
    twn_free(s);

    if (get_str(root, "queries", "queries.pt", &s, file, err)) goto fail;
    m->queries_path = twn_path_join(m->dir, s);
    twn_free(s);

    if (get_str(root, "pooling", "query_mean", &s, file, err)) goto fail;
    if (!strcmp(s, "query_mean"))
        m->pooling = TWN_POOL_QUERY_MEAN;
    else if (!strcmp(s, "last_token"))
        m->pooling = TWN_POOL_LAST_TOKEN;
    else if (!strncmp(s, "token:", 6) && s[6]) {
        m->pooling = TWN_POOL_TOKEN;
        m->pool_token = twn_strdup(s + 6);
    } else {
        twn_err_set(err, "%s: pooling is \"%s\"; expected query_mean, last_token or token:<text>",
                    file, s);
        twn_free(s);
        goto fail;
    }
    twn_free(s);

    json_t *norm = json_object_get(root, "normalize");
    if (norm && !json_is_boolean(norm)) {
        twn_err_set(err, "%s: \"normalize\" must be true or false", file);
        goto fail;
    }
    m->normalize = norm ? json_is_true(norm) : true;
    if (get_num(root, "threshold", 0.5, 0.0, 1.0, &m->threshold, file, err)) goto fail;
    double mt;
    if (get_num(root, "max_think_tokens", 256, 0, 1 << 20, &mt, file, err)) goto fail;
    m->max_think_tokens = (int)mt;

    json_t *stop = json_object_get(root, "stop");
    if (!stop) {
        m->stop[m->n_stop++] = twn_strdup("</think>");
        m->stop[m->n_stop++] = twn_strdup("<|im_end|>");
    } else {
        if (!json_is_array(stop) || json_array_size(stop) > TWN_MAX_STOPS) {
            twn_err_set(err, "%s: \"stop\" must be a list of at most %d strings", file,
                        TWN_MAX_STOPS);
            goto fail;
        }
        size_t i;
        json_t *v;
        json_array_foreach(stop, i, v) {
            if (!json_is_string(v) || !json_string_length(v)) {
                twn_err_set(err, "%s: stop[%zu] must be a non-empty string", file, i);
                goto fail;
            }
            m->stop[m->n_stop++] = twn_strdup(json_string_value(v));
        }
    }

    json_t *smp = json_object_get(root, "sampling");
    if (smp && !json_is_object(smp)) {
        twn_err_set(err, "%s: \"sampling\" must be an object", file);
        goto fail;
    }
    static const char *const sk[] = {"temperature", "top_k", "top_p", "seed", NULL};
    if (smp && check_keys(smp, "sampling.", sk, file, err)) goto fail;
    double tk, seed;
    if (get_num(smp ? smp : empty, "temperature", 0, 0, 100, &m->temperature, file, err) ||
        get_num(smp ? smp : empty, "top_k", 0, 0, 1e7, &tk, file, err) ||
        get_num(smp ? smp : empty, "top_p", 1.0, 0.0, 1.0, &m->top_p, file, err) ||
        get_num(smp ? smp : empty, "seed", 0, 0, 9007199254740992.0, &seed, file, err))
        goto fail;
    m->top_k = (int)tk;
    m->seed = (uint64_t)seed;

    if (get_str(root, "default_instruction", "", &m->default_instruction, file, err)) goto fail;

    json_t *tp = json_object_get(root, "templates");
    if (tp && !json_is_object(tp)) {
        twn_err_set(err, "%s: \"templates\" must be an object", file);
        goto fail;
    }
    static const char *const tk2[] = {"embed", "reason", "embed_cot", "image", NULL};
    if (tp && check_keys(tp, "templates.", tk2, file, err)) goto fail;
    if (get_str(tp ? tp : empty, "embed", DEFAULT_EMBED, &m->tpl_embed, file, err) ||
        get_str(tp ? tp : empty, "reason", DEFAULT_REASON, &m->tpl_reason, file, err) ||
        get_str(tp ? tp : empty, "embed_cot", DEFAULT_EMBED_COT, &m->tpl_embed_cot, file, err) ||
        get_str(tp ? tp : empty, "image", DEFAULT_IMAGE, &m->tpl_image, file, err))
        goto fail;
    if (!strstr(m->tpl_embed_cot, "{cot}")) {
        twn_err_set(err, "%s: templates.embed_cot must contain {cot}", file);
        goto fail;
    }
    json_decref(empty);
    return 0;
fail:
    json_decref(empty);
    return -1;
}

int twn_manifest_load(const char *path, twn_manifest *m, twn_err *err) {
    memset(m, 0, sizeof *m);
    char *file = twn_path_exists(path) && !strstr(path, ".json") ? twn_path_join(path, "twn.json")
                                                                 : twn_strdup(path);
    char *data = NULL;
    size_t len = 0;
    if (twn_read_file(file, 1 << 20, &data, &len, err)) {
        twn_free(file);
        return -1;
    }
    m->path = file;
    m->dir = twn_path_dirname(file);
    sha256_hex(data, len, m->sha256);
    json_error_t je;
    json_t *root = json_loadb(data, len, 0, &je);
    twn_free(data);
    if (!root) {
        twn_err_set(err, "%s: invalid JSON at line %d column %d: %s", file, je.line, je.column,
                    je.text);
        twn_manifest_free(m);
        return -1;
    }
    int rc = parse(root, m, file, err);
    json_decref(root);
    if (rc) twn_manifest_free(m);
    return rc;
}

void twn_manifest_free(twn_manifest *m) {
    if (!m) return;
    char **strs[] = {&m->path,          &m->dir,           &m->base_dir,
                     &m->embedding_dir, &m->reasoning_dir, &m->gate_path,
                     &m->queries_path,  &m->pool_token,    &m->default_instruction,
                     &m->tpl_embed,     &m->tpl_reason,    &m->tpl_embed_cot,
                     &m->tpl_image};
    for (size_t i = 0; i < sizeof strs / sizeof *strs; i++) {
        twn_free(*strs[i]);
        *strs[i] = NULL;
    }
    for (int i = 0; i < m->n_stop; i++) twn_free(m->stop[i]);
    m->n_stop = 0;
}

char *twn_manifest_default_json(int max_think_tokens, const char *gate_activation) {
    json_t *root = json_pack(
        "{s:s, s:s, s:{s:s, s:s}, s:{s:s, s:s, s:s}, s:s, s:s, s:b, s:f, s:i, s:[s,s], "
        "s:{s:f, s:i, s:f, s:i}, s:s, s:{s:s, s:s, s:s, s:s}}",
        "format", "twn/1", "base", "base", "adapters", "embedding", "embedding", "reasoning",
        "reasoning", "gate", "path", "gate_mlp.pt", "activation", gate_activation, "input",
        "pooled", "queries", "queries.pt", "pooling", "query_mean", "normalize", 1, "threshold",
        0.5, "max_think_tokens", max_think_tokens, "stop", "</think>", "<|im_end|>", "sampling",
        "temperature", 0.0, "top_k", 0, "top_p", 1.0, "seed", 0, "default_instruction", "",
        "templates", "embed", DEFAULT_EMBED, "reason", DEFAULT_REASON, "embed_cot",
        DEFAULT_EMBED_COT, "image", DEFAULT_IMAGE);
    char *s = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(root);
    char *out = twn_strdup(s);
    free(s);
    return out;
}
