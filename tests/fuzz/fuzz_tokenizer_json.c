/* fuzz_tokenizer_json.c — arbitrary bytes as a tokenizer.json (twn_tok_load_mem).
 *
 * Seeds are small synthetic tokenizers (both merge spellings, added tokens, NFC, Split regexes,
 * ignore_merges, unk tokens).  A load must either fail with a message or give a tokenizer that
 * encodes and decodes a few fixed texts without crashing, and whose decode never produces
 * invalid UTF-8. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer.h"
#include "engine/tokenizer_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    twn_tokenizer *t = NULL;
    twn_err err;
    err.msg[0] = 0;
    if (twn_tok_load_mem((const char *)data, size, "fuzz.json", &t, &err)) {
        if (!err.msg[0] || t) abort();
        return 0;
    }
    static const char *const texts[] = {
        "abc ab<s>x ca",
        "Hello world, it's 2024!\n\n",
        "e\xCC\x81t\xC3\xA9 \xE4\xB8\xAD\xE6\x96\x87",
        "<|im_start|>user\n<think></think>",
        "   \t\r\n\xC2\xA0 ",
        "",
    };
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        twn_ivec ids = {0};
        if (twn_tok_encode(t, texts[i], strlen(texts[i]), &ids, &err) == 0) {
            twn_str s = {0};
            size_t bad;
            if (twn_tok_decode(t, ids.v, ids.n, i % 2, &s, &err)) abort(); /* ids are in range */
            if (!tok_utf8_valid(s.v ? s.v : "", s.n, &bad)) abort();
            twn_str_free(&s);
        }
        twn_ivec_free(&ids);
    }
    for (int32_t id = -1; id <= twn_tok_size(t); id++) {
        const char *s = twn_tok_token(t, id);
        if (s && twn_tok_id(t, s) < 0) abort();
        (void)twn_tok_is_special(t, id);
    }
    twn_tok_free(t);
    return 0;
}
