/* cmd_search.c — `twn search`: embed a query with the same model and merge top-k over shards.
 *
 *   twn search --model DIR --index OUT (--text T | --image FILE) [-k 10] [--mode M] [--params P]
 *
 * OUT is what `twn run --out` wrote: every OUT/shard-NNNNN directory (its current snapshot) is
 * searched, or a single output directory (one shard, or a merged index).  The query goes through
 * the same TWN steps as the corpus (gate, CoT when hard, embedding pass; --mode as for `twn
 * embed`), so query and items live in one space.  Prints one line per hit: rank, score, id, route,
 * p_think, think tokens, shard. */
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/backend_opt.h"
#include "cli/commands.h"
#include "engine/twn.h"
#include "index/search.h"
#include "index/shard.h"
#include "util/mem.h"

static int usage(void) {
    fprintf(stderr, "usage: twn search --model DIR --index OUT (--text T | --image FILE) [-k 10] "
                    "[--mode adaptive|never|always] [--params nprobe=16] [--backend cpu|cuda|auto] "
                    "[--device N]\n");
    return 2;
}

int twn_cmd_search(int argc, char **argv) {
    const char *model_dir = NULL, *index = NULL, *text = NULL, *image = NULL, *mode = NULL,
               *params = NULL, *backend = "cpu";
    int k = 10, device = 0;
    for (int i = 1; i < argc; i += 2) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) return usage();
        if (!strcmp(a, "--model"))
            model_dir = v;
        else if (!strcmp(a, "--index"))
            index = v;
        else if (!strcmp(a, "--text"))
            text = v;
        else if (!strcmp(a, "--image"))
            image = v;
        else if (!strcmp(a, "--mode"))
            mode = v;
        else if (!strcmp(a, "--params"))
            params = v;
        else if (!strcmp(a, "-k") || !strcmp(a, "--k"))
            k = atoi(v);
        else if (!strcmp(a, "--backend"))
            backend = v;
        else if (!strcmp(a, "--device"))
            device = atoi(v);
        else
            return usage();
    }
    if (!model_dir || !index || (!text && !image) || k < 1 || k > 10000) return usage();
    twn_backend_opts bo;
    int brc = twn_cli_backend_check("twn search", backend, device, &bo);
    if (brc) return brc;

    /* the shard output directories */
    char pat[4096];
    snprintf(pat, sizeof pat, "%s/shard-*", index);
    glob_t g = {0};
    int n_dirs = 0;
    char **dirs = NULL;
    twn_err err;
    if (glob(pat, 0, NULL, &g) == 0 && g.gl_pathc > 0) {
        dirs = twn_calloc(g.gl_pathc, sizeof *dirs);
        for (size_t i = 0; i < g.gl_pathc; i++)
            if (twn_shard_resolve_dir(g.gl_pathv[i], &dirs[n_dirs], &err) == 0)
                n_dirs++;
            else {
                fprintf(stderr, "twn search: %s\n", err.msg);
                globfree(&g);
                return 1;
            }
    } else {
        dirs = twn_calloc(1, sizeof *dirs);
        if (twn_shard_resolve_dir(index, &dirs[0], &err)) {
            fprintf(stderr, "twn search: %s (and no shard directories under %s)\n", err.msg, index);
            globfree(&g);
            twn_free(dirs);
            return 1;
        }
        n_dirs = 1;
    }
    globfree(&g);

    int rc = 1;
    twn_model *m = NULL;
    twn_index *ix = NULL;
    twn_result r = {0};
    twn_index_hit *hits = NULL;
    if (twn_index_open((const char *const *)dirs, n_dirs, params, &ix, &err)) goto fail;
    if (twn_model_load(model_dir, &m, &err)) goto fail;
    if (bo.kind != TWN_BACKEND_CPU) {
        if (twn_model_set_backend(m, &bo, &err)) goto fail;
        fprintf(stderr, "twn search: backend: %s\n", twn_backend_describe(m->backend));
    }
    if (twn_model_dim(m) != twn_index_dim(ix)) {
        twn_err_set(&err, "the model embeds %d dimensions but the index holds %d", twn_model_dim(m),
                    twn_index_dim(ix));
        goto fail;
    }
    twn_opts o;
    twn_opts_default(&o);
    if (mode && twn_mode_parse(mode, &o, &err)) goto fail;
    const char *imgs[1] = {image};
    twn_item q = {.id = "query", .text = text, .images = image ? imgs : NULL, .n_images = !!image};
    if (twn_embed_items(m, &q, 1, &o, &r, &err)) goto fail;
    if (r.error) {
        twn_err_set(&err, "the query cannot be embedded: %s", r.error);
        goto fail;
    }
    hits = twn_calloc((size_t)k, sizeof *hits);
    int nh = 0;
    if (twn_index_search(ix, r.embedding, k, hits, &nh, &err)) goto fail;
    printf("query: %s route, p_think %.3f, %d think tokens; %lld items in %d shard(s)\n",
           r.hard ? "hard" : "easy", r.p_think, r.think_tokens, (long long)twn_index_count(ix),
           n_dirs);
    for (int i = 0; i < nh; i++)
        printf("%3d  %.4f  %.*s  %s  p_think %.3f  think %u  shard %d\n", i + 1, hits[i].score,
               (int)hits[i].id_len, hits[i].id, hits[i].route ? "hard" : "easy", hits[i].p_think,
               hits[i].think_tokens, hits[i].shard);
    rc = 0;
fail:
    if (rc) fprintf(stderr, "twn search: %s\n", err.msg);
    twn_free(hits);
    twn_result_free(&r);
    if (m) twn_model_free(m);
    if (ix) twn_index_close(ix);
    for (int i = 0; i < n_dirs; i++) twn_free(dirs[i]);
    twn_free(dirs);
    return rc;
}
