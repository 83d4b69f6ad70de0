/* cmd_embed.c — `twn embed`: embed a JSONL file of items with a TWN checkpoint.
 *
 * Reads items ({"id", "text", "instruction", "image"}; "image" is a path relative to the JSONL
 * file, or a list of them, for image and image+text items), runs them through the TWN engine in
 * windows of --batch items (one continuous-batching loop per window) and writes:
 *   OUT/embeddings.npy     float32 [N, dim], row k = the k-th item in items.jsonl
 *   OUT/items.jsonl        per item: id, row, route, p_think, think_tokens, cot
 *   OUT/dead_letter.jsonl  per rejected line/item: file, line, id, stage, reason
 * A bad line or item never stops the job: it is dead-lettered and counted. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/backend_opt.h"
#include "cli/commands.h"
#include "engine/twn.h"
#include "util/clock.h"
#include "util/fileio.h"
#include "util/mem.h"
#include "util/npy.h"

#define MAX_LINE_BYTES (16u << 20) /* an item line larger than this is dead-lettered */

static void usage(FILE *f) {
    fprintf(f, "usage: twn embed --model DIR --input ITEMS.jsonl --out DIR [options]\n"
               "  --mode M         adaptive (default) | never | always | budget=F\n"
               "  --batch N        items per scheduling window (default 64)\n"
               "  --max-active N   sequences decoding CoT at once (default 64)\n"
               "  --max-vision-patches N  image patches per vision-tower call (default 16384)\n"
               "  --backend B      cpu (default) | cuda | auto (cuda when a GPU answers)\n"
               "  --device N       CUDA device ordinal (default 0)\n"
               "  --quiet          no progress lines\n");
}

typedef struct {
    FILE *dead;
    const char *input;
    long n;
} dead_letter;

static void dead(dead_letter *d, long line, const char *id, const char *stage, const char *reason) {
    json_t *o = json_pack("{s:s, s:i, s:s?, s:s, s:s}", "file", d->input, "line", (json_int_t)line,
                          "id", id, "stage", stage, "reason", reason);
    char *s = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
    fprintf(d->dead, "%s\n", s);
    free(s);
    json_decref(o);
    d->n++;
}

typedef struct {
    char *id, *text, *instruction;
    char **images;
    int n_images;
    long line;
} owned_item;

static void item_free(owned_item *it) {
    twn_free(it->id);
    twn_free(it->text);
    twn_free(it->instruction);
    for (int i = 0; i < it->n_images; i++) twn_free(it->images[i]);
    twn_free(it->images);
    memset(it, 0, sizeof *it);
}

/* Parses one JSONL line; on failure fills reason and returns -1. */
static int parse_item(const char *line, size_t len, const char *base_dir, owned_item *it,
                      char *reason, size_t rn) {
    json_error_t je;
    json_t *o = json_loadb(line, len, 0, &je);
    if (!o) {
        snprintf(reason, rn, "invalid JSON at column %d: %s", je.column, je.text);
        return -1;
    }
    int rc = -1;
    json_t *id = json_object_get(o, "id"), *text = json_object_get(o, "text");
    json_t *ins = json_object_get(o, "instruction"), *img = json_object_get(o, "image");
    if (!json_is_object(o)) {
        snprintf(reason, rn, "line is a JSON %s, expected an object",
                 json_is_array(o) ? "array" : "value");
        goto out;
    }
    if (json_is_string(id))
        it->id = twn_strdup(json_string_value(id));
    else if (json_is_integer(id)) {
        char b[32];
        snprintf(b, sizeof b, "%lld", (long long)json_integer_value(id));
        it->id = twn_strdup(b);
    } else {
        snprintf(reason, rn, "\"id\" is %s; expected a string or an integer",
                 id ? "not a string or integer" : "missing");
        goto out;
    }
    if (text && !json_is_string(text)) {
        snprintf(reason, rn, "\"text\" must be a string");
        goto out;
    }
    if (ins && !json_is_null(ins) && !json_is_string(ins)) {
        snprintf(reason, rn, "\"instruction\" must be a string");
        goto out;
    }
    if (text) it->text = twn_strdup(json_string_value(text));
    if (json_is_string(ins)) it->instruction = twn_strdup(json_string_value(ins));
    if (img && !json_is_null(img)) {
        size_t n = json_is_array(img) ? json_array_size(img) : 1;
        it->images = twn_calloc(n, sizeof(char *));
        for (size_t i = 0; i < n; i++) {
            json_t *p = json_is_array(img) ? json_array_get(img, i) : img;
            if (!json_is_string(p)) {
                snprintf(reason, rn, "\"image\" must be a path or a list of paths");
                goto out;
            }
            it->images[it->n_images++] = twn_path_join(base_dir, json_string_value(p));
        }
    }
    if (!it->text && !it->n_images) {
        snprintf(reason, rn, "item has neither \"text\" nor \"image\"");
        goto out;
    }
    rc = 0;
out:
    json_decref(o);
    return rc;
}

int twn_cmd_embed(int argc, char **argv) {
    const char *model = NULL, *input = NULL, *out = NULL, *mode = "adaptive", *backend = "cpu";
    int batch = 64, quiet = 0, device = 0;
    twn_opts opts;
    twn_opts_default(&opts);
    static const struct option lo[] = {
        {"model", 1, 0, 'm'},   {"input", 1, 0, 'i'},  {"out", 1, 0, 'o'},
        {"mode", 1, 0, 'M'},    {"batch", 1, 0, 'b'},  {"max-active", 1, 0, 'a'},
        {"quiet", 0, 0, 'q'},   {"help", 0, 0, 'h'},   {"max-vision-patches", 1, 0, 'V'},
        {"backend", 1, 0, 'B'}, {"device", 1, 0, 'D'}, {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 'i':
            input = optarg;
            break;
        case 'o':
            out = optarg;
            break;
        case 'M':
            mode = optarg;
            break;
        case 'b':
            batch = atoi(optarg);
            break;
        case 'a':
            opts.max_active = atoi(optarg);
            break;
        case 'q':
            quiet = 1;
            break;
        case 'V':
            opts.max_vision_patches = atoi(optarg);
            break;
        case 'B':
            backend = optarg;
            break;
        case 'D':
            device = atoi(optarg);
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!model || !input || !out || batch < 1 || opts.max_active < 1 ||
        opts.max_vision_patches < 1) {
        usage(stderr);
        return 2;
    }
    twn_err err;
    if (twn_mode_parse(mode, &opts, &err)) {
        fprintf(stderr, "twn embed: %s\n", err.msg);
        return 2;
    }
    twn_backend_opts bo;
    int brc = twn_cli_backend_check("twn embed", backend, device, &bo);
    if (brc) return brc;
    FILE *in = fopen(input, "r");
    if (!in) {
        fprintf(stderr, "twn embed: cannot open %s\n", input);
        return 1;
    }
    twn_model *m = NULL;
    double t0 = twn_now();
    if (twn_model_load(model, &m, &err)) {
        fprintf(stderr, "twn embed: %s\n", err.msg);
        fclose(in);
        return 1;
    }
    if (twn_cli_backend_apply("twn embed", m, &bo, quiet)) {
        twn_model_free(m);
        fclose(in);
        return 1;
    }
    double t_load = twn_now() - t0;
    if (twn_mkdirs(out, &err)) {
        fprintf(stderr, "twn embed: %s\n", err.msg);
        twn_model_free(m);
        fclose(in);
        return 1;
    }
    char *p_npy = twn_path_join(out, "embeddings.npy"),
         *p_items = twn_path_join(out, "items.jsonl");
    char *p_dead = twn_path_join(out, "dead_letter.jsonl");
    char *base = twn_path_dirname(input);
    twn_npy npy;
    err.msg[0] = 0;
    FILE *fi = fopen(p_items, "w");
    dead_letter dl = {fopen(p_dead, "w"), input, 0};
    int rc = 1;
    if (!fi || !dl.dead || twn_npy_open(&npy, p_npy, "<f4", 4, twn_model_dim(m), &err)) {
        fprintf(stderr, "twn embed: cannot create outputs in %s: %s\n", out,
                err.msg[0] ? err.msg : strerror(errno));
        goto done;
    }

    owned_item *items = twn_calloc((size_t)batch, sizeof *items);
    twn_item *view = twn_calloc((size_t)batch, sizeof *view);
    twn_result *res = twn_calloc((size_t)batch, sizeof *res);
    long line_no = 0, n_ok = 0, n_hard = 0, think = 0;
    char *line = NULL;
    size_t cap = 0;
    double t1 = twn_now(), last_print = t1;
    int eof = 0;
    while (!eof) {
        int nb = 0;
        while (nb < batch) {
            ssize_t len = getline(&line, &cap, in);
            if (len < 0) {
                eof = 1;
                break;
            }
            line_no++;
            while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
            if (!len) continue;
            char reason[512];
            if ((size_t)len > MAX_LINE_BYTES) {
                snprintf(reason, sizeof reason, "line is %zd bytes; the limit is %u", len,
                         MAX_LINE_BYTES);
                dead(&dl, line_no, NULL, "parse", reason);
                continue;
            }
            if (parse_item(line, (size_t)len, base, &items[nb], reason, sizeof reason)) {
                dead(&dl, line_no, items[nb].id, "parse", reason);
                item_free(&items[nb]);
                continue;
            }
            items[nb].line = line_no;
            view[nb] = (twn_item){.id = items[nb].id,
                                  .text = items[nb].text,
                                  .instruction = items[nb].instruction,
                                  .images = (const char *const *)items[nb].images,
                                  .n_images = items[nb].n_images};
            nb++;
        }
        if (!nb) continue;
        if (twn_embed_items(m, view, nb, &opts, res, &err)) {
            fprintf(stderr, "twn embed: %s\n", err.msg);
            goto done_batch;
        }
        for (int i = 0; i < nb; i++) {
            if (res[i].error) {
                dead(&dl, items[i].line, items[i].id, "embed", res[i].error);
            } else {
                if (twn_npy_append(&npy, res[i].embedding, 1, &err)) {
                    fprintf(stderr, "twn embed: %s\n", err.msg);
                    goto done_batch;
                }
                json_t *o =
                    json_pack("{s:s, s:i, s:s, s:o, s:i, s:s?}", "id", items[i].id, "row",
                              (json_int_t)n_ok, "route", res[i].hard ? "hard" : "easy", "p_think",
                              isnan(res[i].p_think) ? json_null() : json_real(res[i].p_think),
                              "think_tokens", (json_int_t)res[i].think_tokens, "cot", res[i].cot);
                char *s = json_dumps(o, JSON_COMPACT);
                fprintf(fi, "%s\n", s);
                free(s);
                json_decref(o);
                n_ok++;
                n_hard += res[i].hard;
                think += res[i].think_tokens;
            }
            twn_result_free(&res[i]);
            item_free(&items[i]);
        }
        double now = twn_now();
        if (!quiet && now - last_print > 2.0) {
            fprintf(stderr, "twn embed: %ld items (%ld hard, %ld rejected), %.1f items/s\n", n_ok,
                    n_hard, dl.n, (double)n_ok / (now - t1));
            last_print = now;
        }
    }
    rc = 0;
    double el = twn_now() - t1;
    if (!quiet)
        fprintf(stderr,
                "twn embed: %ld items embedded (%ld easy, %ld hard, %ld think tokens), %ld "
                "dead-lettered; model load %.2f s, embed %.2f s (%.1f items/s); outputs in %s\n",
                n_ok, n_ok - n_hard, n_hard, think, dl.n, t_load, el, el > 0 ? n_ok / el : 0.0,
                out);
done_batch:
    for (int i = 0; i < batch; i++) {
        twn_result_free(&res[i]);
        item_free(&items[i]);
    }
    free(line);
    twn_free(items);
    twn_free(view);
    twn_free(res);
    if (twn_npy_close(&npy, &err) && !rc) {
        fprintf(stderr, "twn embed: %s\n", err.msg);
        rc = 1;
    }
done:
    if (fi) fclose(fi);
    if (dl.dead) fclose(dl.dead);
    fclose(in);
    twn_free(p_npy);
    twn_free(p_items);
    twn_free(p_dead);
    twn_free(base);
    twn_model_free(m);
    return rc;
}
