/* fuzz_curve_keys.c — arbitrary bytes as a CURVE key file and as an allow-list (common/curve.h).
 *
 * Invariants: a parse either succeeds or fails with a message that starts with the file name and
 * never quotes the text (a secret key pasted in the wrong file must not reach a log); an accepted
 * key is 40 Z85 characters that decode; an allow-list holds at most one key per line.  Seeds:
 * key files as `twn keygen` writes them, allow-lists with comments, names, CRLF and duplicates,
 * and near misses (39/41 characters, a bad character, two keys). */
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "common/curve.h"

#define NAME "fuzz/keys"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* No line of the input of 12+ characters appears in the message. */
static void check_not_quoted(const char *text, size_t n, const char *msg) {
    if (strncmp(msg, NAME ": ", sizeof NAME + 1)) abort();
    for (size_t i = 0; i < n;) {
        size_t e = i;
        while (e < n && text[e] != '\n') e++;
        if (e - i >= 12 && !memchr(text + i, 0, e - i)) {
            char line[64];
            memcpy(line, text + i, 12); /* any 12-byte prefix is enough to catch a quote */
            line[12] = 0;
            if (strstr(msg + sizeof NAME + 1, line)) abort();
        }
        i = e + 1;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *text = (const char *)data;
    twn_err err;
    char key[TWN_CURVE_Z85_LEN + 1];
    for (int secret = 0; secret < 2; secret++) {
        if (twn_curve_key_parse(text, size, NAME, secret, key, &err) == 0) {
            uint8_t raw[32];
            if (strlen(key) != TWN_CURVE_Z85_LEN || !zmq_z85_decode(raw, key)) abort();
        } else {
            check_not_quoted(text, size, err.msg);
        }
    }
    twn_curve_allow *a = NULL;
    if (twn_curve_allow_parse(text, size, NAME, &a, &err) == 0) {
        size_t lines = 1;
        for (size_t i = 0; i < size; i++) lines += data[i] == '\n';
        if (twn_curve_allow_count(a) > lines) abort();
        twn_curve_allow_free(a);
    } else {
        if (a) abort();
        check_not_quoted(text, size, err.msg);
    }
    return 0;
}
