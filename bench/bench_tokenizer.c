/* bench_tokenizer.c — how fast engine/tokenizer loads, encodes and decodes.
 *
 * usage: bench_tokenizer TOKENIZER_JSON CORPUS [SECONDS]
 *   CORPUS: the test corpus (BUILD/tok-corpus/corpus.bin, written by test_tokenizer) or any
 *   UTF-8 text file, which is split at blank lines into documents.
 * Encodes every document in turn, single-threaded, for about SECONDS (default 3), and reports
 * MB/s and tokens/s; then the same for decoding.  Not a test: it only reports. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/tokenizer.h"
#include "util/fileio.h"
#include "util/mem.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    const char *p;
    size_t n;
} doc;

static uint32_t rd32(const char *p) {
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] | (uint32_t)u[1] << 8 | (uint32_t)u[2] << 16 | (uint32_t)u[3] << 24;
}

/* corpus.bin (u32 count, then u32 length + bytes per document), else plain text. */
static doc *split_docs(const char *data, size_t len, const char *path, size_t *ndocs) {
    size_t cap = 1024, n = 0;
    doc *d = twn_malloc(cap * sizeof *d);
    size_t plen = strlen(path);
    if (plen > 4 && !strcmp(path + plen - 4, ".bin") && len >= 4) {
        size_t count = rd32(data), off = 4;
        for (size_t i = 0; i < count && off + 4 <= len; i++) {
            size_t l = rd32(data + off);
            if (off + 4 + l > len) break;
            if (n == cap) d = twn_realloc(d, (cap *= 2) * sizeof *d);
            d[n++] = (doc){data + off + 4, l};
            off += 4 + l;
        }
    } else {
        const char *p = data, *end = data + len;
        while (p < end) {
            const char *q = strstr(p, "\n\n");
            q = q ? q + 2 : end;
            if (n == cap) d = twn_realloc(d, (cap *= 2) * sizeof *d);
            d[n++] = (doc){p, (size_t)(q - p)};
            p = q;
        }
    }
    *ndocs = n;
    return d;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s TOKENIZER_JSON CORPUS [SECONDS]\n", argv[0]);
        return 2;
    }
    double secs = argc > 3 ? atof(argv[3]) : 3.0;
    twn_err err;
    twn_tokenizer *tok;
    double t0 = now();
    if (twn_tok_load(argv[1], &tok, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    double load = now() - t0;
    char *data;
    size_t len, ndocs, bytes = 0;
    if (twn_read_file(argv[2], (size_t)1 << 31, &data, &len, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    doc *docs = split_docs(data, len, argv[2], &ndocs);
    for (size_t i = 0; i < ndocs; i++) bytes += docs[i].n;
    printf("tokenizer: %s loaded in %.0f ms (%d ids)\n", argv[1], 1e3 * load, twn_tok_size(tok));
    printf("corpus:    %s, %zu documents, %.2f MB\n", argv[2], ndocs, bytes / 1e6);

    twn_ivec ids = {0}, all = {0};
    size_t passes = 0, nb = 0, nt = 0, bad = 0;
    t0 = now();
    do {
        for (size_t i = 0; i < ndocs; i++) {
            ids.n = 0;
            if (twn_tok_encode(tok, docs[i].p, docs[i].n, &ids, &err)) bad++;
            nb += docs[i].n;
            nt += ids.n;
            if (!passes) twn_ivec_append(&all, ids.v, ids.n);
        }
        passes++;
    } while (now() - t0 < secs);
    double dt = now() - t0;
    printf("encode:    %.1f MB/s, %.2f M tokens/s, %.0f documents/s (%zu passes, 1 thread, "
           "%.2f bytes/token)%s\n",
           nb / dt / 1e6, nt / dt / 1e6, passes * ndocs / dt, passes, (double)nb / (double)nt,
           bad ? " — some documents failed to encode" : "");

    twn_str out = {0};
    size_t dpass = 0, dbytes = 0;
    t0 = now();
    do {
        out.n = 0;
        twn_tok_decode(tok, all.v, all.n, false, &out, &err);
        dbytes += out.n;
        dpass++;
    } while (now() - t0 < secs / 3);
    dt = now() - t0;
    printf("decode:    %.1f MB/s, %.1f M tokens/s\n", dbytes / dt / 1e6,
           (double)(all.n * dpass) / dt / 1e6);
    twn_str_free(&out);
    twn_ivec_free(&ids);
    twn_ivec_free(&all);
    twn_free(docs);
    twn_free(data);
    twn_tok_free(tok);
    return bad ? 1 : 0;
}
