/* cmd_mkmodel.c — `twn mkmodel`: write a deterministic random TWN checkpoint (engine/mkmodel.h). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/commands.h"
#include "engine/mkmodel.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: twn mkmodel --out DIR [--seed N] [--preset NAME] [--dtype bf16|f32]\n"
            "                   [--tokenizer FILE]\n\n"
            "Writes a random TWN checkpoint in the real formats (Qwen3-VL base directory, two\n"
            "PEFT LoRA adapters, gate_mlp.pt, queries.pt, twn.json).  The same seed gives\n"
            "byte-identical files.\n\n"
            "  --out DIR         output directory (created; existing files are replaced)\n"
            "  --seed N          random seed (default 0)\n"
            "  --preset NAME     model shape (default %s)\n"
            "  --dtype T         base weights: bf16 (default) or f32; adapters are float32\n"
            "  --tokenizer FILE  tokenizer.json to copy (default: the build's Qwen3 tokenizer)\n\n"
            "presets:\n",
            twn_mkmodel_preset_at(0)->name);
    for (size_t i = 0; i < twn_mkmodel_preset_count(); i++) {
        const twn_mkmodel_preset *p = twn_mkmodel_preset_at(i);
        fprintf(f, "  %-12s %s\n", p->name, p->desc);
    }
}

/* "1234567" -> "1.23M" */
static const char *human(double v, char *buf, size_t n) {
    const char *unit = "";
    if (v >= 1e9)
        v /= 1e9, unit = "G";
    else if (v >= 1e6)
        v /= 1e6, unit = "M";
    else if (v >= 1e3)
        v /= 1e3, unit = "K";
    snprintf(buf, n, *unit ? "%.2f%s" : "%.0f%s", v, unit);
    return buf;
}

int twn_cmd_mkmodel(int argc, char **argv) {
    const char *out = NULL, *preset = NULL, *tokenizer = NULL, *dtype_s = "bf16";
    uint64_t seed = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        static const char *const opts[] = {"--out", "--seed", "--preset", "--dtype", "--tokenizer"};
        size_t k = 0, nopt = sizeof opts / sizeof *opts;
        for (; k < nopt; k++) {
            size_t n = strlen(opts[k]);
            if (!strncmp(a, opts[k], n) && (a[n] == 0 || a[n] == '=')) break;
        }
        if (k == nopt) {
            fprintf(stderr, "twn mkmodel: unknown option '%s'\n\n", a);
            usage(stderr);
            return 2;
        }
        const char *eq = strchr(a, '=');
        if (eq)
            v = eq + 1;
        else if (i + 1 < argc)
            v = argv[++i];
        else {
            fprintf(stderr, "twn mkmodel: %s needs a value\n", opts[k]);
            return 2;
        }
        switch (k) {
        case 0:
            out = v;
            break;
        case 1: {
            char *end;
            errno = 0;
            unsigned long long s = strtoull(v, &end, 0);
            if (errno || !*v || *end || *v == '-') {
                fprintf(stderr, "twn mkmodel: --seed must be a non-negative integer, not '%s'\n",
                        v);
                return 2;
            }
            seed = s;
            break;
        }
        case 2:
            preset = v;
            break;
        case 3:
            dtype_s = v;
            break;
        case 4:
            tokenizer = v;
            break;
        }
    }
    if (!out || !*out) {
        fprintf(stderr, "twn mkmodel: --out DIR is required\n\n");
        usage(stderr);
        return 2;
    }
    twn_dtype dtype;
    if (!strcmp(dtype_s, "bf16"))
        dtype = TWN_DT_BF16;
    else if (!strcmp(dtype_s, "f32"))
        dtype = TWN_DT_F32;
    else {
        fprintf(stderr, "twn mkmodel: --dtype must be bf16 or f32, not '%s'\n", dtype_s);
        return 2;
    }
    twn_err err = {{0}};
    twn_mkmodel_stats st;
    if (twn_mkmodel_plan(preset, dtype, &st, &err) != 0) {
        fprintf(stderr, "twn mkmodel: %s\n", err.msg);
        return 2;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (twn_mkmodel_write(out, preset, seed, dtype, tokenizer, &err) != 0) {
        fprintf(stderr, "twn mkmodel: %s\n", err.msg);
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    char a[32], b[32], c[32], d[32], e[32];
    printf("twn mkmodel: %s (seed %llu, %s): %s base params (%s vision), %s LoRA params in 2 "
           "adapters, %s gate+query params; %sB of tensors, %.2fs -> %s\n",
           preset ? preset : twn_mkmodel_preset_at(0)->name, (unsigned long long)seed, dtype_s,
           human((double)st.base_params, a, sizeof a), human((double)st.vision_params, b, sizeof b),
           human((double)st.adapter_params, c, sizeof c),
           human((double)(st.gate_params + st.query_params), d, sizeof d),
           human((double)st.tensor_bytes, e, sizeof e), secs, out);
    return 0;
}
