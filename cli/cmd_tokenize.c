/* cmd_tokenize.c — `twn tokenize`: the token ids of a text, for checking the C tokenizer by
 * hand against HF (`tokenizer.encode(text).ids`) and for round-tripping with --decode. */
#include <stdio.h>
#include <string.h>

#include "cli/commands.h"
#include "engine/tokenizer.h"
#include "util/fileio.h"
#include "util/mem.h"

/* Largest --file accepted (the whole file is tokenized in memory). */
#define TOKENIZE_MAX_FILE ((size_t)1 << 30)

static void usage(FILE *f) {
    fprintf(f,
            "usage: twn tokenize [--tokenizer FILE] (--text T | --file F) [--decode]\n\n"
            "Prints the token ids of the text, space-separated, on one line (no BOS/EOS).\n\n"
            "  --tokenizer FILE  tokenizer.json (default %s)\n"
            "  --text T          the text (UTF-8)\n"
            "  --file F          read the text from a file ('-' for stdin)\n"
            "  --decode          print the ids, then the decoded text on a second line\n",
            TWN_TOKENIZER_JSON);
}

static int read_stdin(char **data, size_t *len) {
    twn_str s = {0};
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) twn_str_append(&s, buf, n);
    if (ferror(stdin)) {
        twn_str_free(&s);
        return -1;
    }
    twn_str_append(&s, "", 0);
    *data = s.v;
    *len = s.n;
    return 0;
}

int twn_cmd_tokenize(int argc, char **argv) {
    const char *tok_path = TWN_TOKENIZER_JSON, *text = NULL, *file = NULL;
    bool decode = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--decode")) {
            decode = true;
            continue;
        }
        const char **dst = !strcmp(a, "--tokenizer") ? &tok_path
                           : !strcmp(a, "--text")    ? &text
                           : !strcmp(a, "--file")    ? &file
                                                     : NULL;
        if (!dst) {
            fprintf(stderr, "twn tokenize: unknown option '%s'\n\n", a);
            usage(stderr);
            return 2;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "twn tokenize: %s needs a value\n", a);
            return 2;
        }
        *dst = argv[++i];
    }
    if (!text == !file) {
        fprintf(stderr, "twn tokenize: give exactly one of --text and --file\n\n");
        usage(stderr);
        return 2;
    }

    twn_err err;
    char *data = NULL;
    size_t len = 0;
    if (file && !strcmp(file, "-")) {
        if (read_stdin(&data, &len)) {
            fprintf(stderr, "twn tokenize: cannot read stdin\n");
            return 1;
        }
    } else if (file) {
        if (twn_read_file(file, TOKENIZE_MAX_FILE, &data, &len, &err)) {
            fprintf(stderr, "twn tokenize: %s\n", err.msg);
            return 1;
        }
    }
    if (text) len = strlen(text);

    twn_tokenizer *tok;
    if (twn_tok_load(tok_path, &tok, &err)) {
        fprintf(stderr, "twn tokenize: %s\n", err.msg);
        twn_free(data);
        return 1;
    }
    twn_ivec ids = {0};
    int rc = 0;
    if (twn_tok_encode(tok, text ? text : data, len, &ids, &err)) {
        fprintf(stderr, "twn tokenize: %s\n", err.msg);
        rc = 1;
    } else {
        for (size_t i = 0; i < ids.n; i++) printf(i ? " %d" : "%d", ids.v[i]);
        printf("\n");
        if (decode) {
            twn_str out = {0};
            if (twn_tok_decode(tok, ids.v, ids.n, false, &out, &err)) {
                fprintf(stderr, "twn tokenize: %s\n", err.msg);
                rc = 1;
            } else {
                fwrite(out.v ? out.v : "", 1, out.n, stdout);
                printf("\n");
            }
            twn_str_free(&out);
        }
    }
    twn_ivec_free(&ids);
    twn_tok_free(tok);
    twn_free(data);
    return rc;
}
