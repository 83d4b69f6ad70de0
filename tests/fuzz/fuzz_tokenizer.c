/* fuzz_tokenizer.c — arbitrary bytes through the real Qwen3 tokenizer.
 *
 * Loads TWN_TOKENIZER_JSON once.  Invalid UTF-8 must be refused with a message; valid UTF-8
 * must encode, and decode(encode(s)) must give back NFC(s) exactly, where NFC(s) is computed the
 * simple way (utf8proc on pieces cut at the code points HF's NFC leaves alone) rather than by the
 * tokenizer's fast path — so a wrong shortcut in the tokenizer's NFC shows up here too. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "engine/tokenizer.h"
#include "engine/tokenizer_internal.h"

static twn_tokenizer *tok;

/* Reference NFC: utf8proc on the pieces between inert code points, no fast path. */
/* Appends NFC(piece) to out and empties piece. */
static void compose_into(twn_str *piece, twn_str *out) {
    utf8proc_uint8_t *r = NULL;
    utf8proc_ssize_t m =
        utf8proc_map((const utf8proc_uint8_t *)piece->v, (utf8proc_ssize_t)piece->n, &r,
                     UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (m < 0) abort();
    twn_str_append(out, (const char *)r, (size_t)m);
    free(r);
    twn_str_reset(piece);
}

static void nfc_reference(const char *s, size_t n, twn_str *out) {
    twn_str piece = {0};
    twn_str_append(out, "", 0);
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        int k = tok_utf8_next((const unsigned char *)s + i, &cp);
        int is_inert = tok_nfc_inert(cp);
        if (is_inert) {
            if (piece.n) {
                compose_into(&piece, out);
            }
            twn_str_append(out, s + i, (size_t)k);
        } else {
            twn_str_append(&piece, s + i, (size_t)k);
        }
        i += (size_t)k;
    }
    if (piece.n) {
        compose_into(&piece, out);
    }
    twn_str_free(&piece);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!tok) {
        twn_err err;
        if (twn_tok_load(TWN_TOKENIZER_JSON, &tok, &err)) {
            fprintf(stderr, "fuzz_tokenizer: %s\n", err.msg);
            abort();
        }
    }
    const char *s = (const char *)data;
    twn_ivec ids = {0};
    twn_err err;
    size_t bad;
    int valid = tok_utf8_valid(s, size, &bad);
    int rc = twn_tok_encode(tok, s, size, &ids, &err);
    if (rc != (valid ? 0 : -1)) abort();
    if (rc) {
        if (!strstr(err.msg, "byte offset")) abort();
        twn_ivec_free(&ids);
        return 0;
    }
    twn_str dec = {0}, want = {0};
    if (twn_tok_decode(tok, ids.v, ids.n, false, &dec, &err)) abort();
    nfc_reference(s, size, &want);
    if (dec.n != want.n || (dec.n && memcmp(dec.v, want.v, dec.n))) {
        fprintf(stderr, "fuzz_tokenizer: decode(encode(s)) != NFC(s) for %zu input bytes\n", size);
        abort();
    }
    twn_str_free(&dec);
    twn_str_free(&want);
    twn_ivec_free(&ids);
    return 0;
}
