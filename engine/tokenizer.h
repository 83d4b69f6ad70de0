/* tokenizer.h — Hugging Face tokenizer.json, byte-level BPE as Qwen2/Qwen3 use it.
 *
 * Pipeline (tokenizers' order): added tokens are matched on the raw text first (longest match,
 * special and non-special alike, since split_special_tokens is false); each remaining span is NFC
 * normalized (utf8proc), split by the pre-tokenizer regex (PCRE2 with UTF+UCP, "Isolated"
 * behaviour), mapped bytes->unicode (GPT-2 bytes_to_unicode) and merged by BPE (lowest merge rank
 * first).  Merges are read in both spellings ("a b" strings and ["a","b"] pairs).
 *
 * Only the model/normalizer/pre-tokenizer combination that Qwen tokenizers use is accepted
 * (BPE + NFC + Split(regex, Isolated) + ByteLevel); other types are refused by name.
 * Encoding is thread-safe (the tokenizer is read-only after load).  Input must be valid UTF-8;
 * invalid bytes are an error naming the byte offset. */
#ifndef TWN_ENGINE_TOKENIZER_H
#define TWN_ENGINE_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/err.h"
#include "util/vec.h"

typedef struct twn_tokenizer twn_tokenizer;

int twn_tok_load(const char *path, twn_tokenizer **out, twn_err *err);
int twn_tok_load_mem(const char *json, size_t len, const char *name, twn_tokenizer **out,
                     twn_err *err);
void twn_tok_free(twn_tokenizer *t);

/* Appends the ids of text to out (no BOS/EOS added: Qwen adds none). */
int twn_tok_encode(const twn_tokenizer *t, const char *text, size_t len, twn_ivec *out,
                   twn_err *err);
/* Appends the decoded UTF-8 of ids to out; invalid UTF-8 sequences become U+FFFD (like
 * errors="replace"); skip_special drops added tokens marked special.  Ids that have no token
 * (the padded embedding rows past the vocabulary, 151669..151935 in Qwen3, which a model can
 * still generate) decode to nothing, as tokenizers' decode skips them; a negative id is an error.
 */
int twn_tok_decode(const twn_tokenizer *t, const int32_t *ids, size_t n, bool skip_special,
                   twn_str *out, twn_err *err);

/* The raw bytes a token stands for (byte-level BPE mapped back through bytes_to_unicode, or an
 * added token's UTF-8 content); *len = 0 and "" for an id with no token.  Stop strings are matched
 * against these bytes. */
const char *twn_tok_bytes(const twn_tokenizer *t, int32_t id, size_t *len);

/* Id of a token string (vocab or added token), or -1. */
int32_t twn_tok_id(const twn_tokenizer *t, const char *token);
/* Token string of an id (byte-level unicode form for vocab entries), or NULL. */
const char *twn_tok_token(const twn_tokenizer *t, int32_t id);
/* One past the largest id (vocab + added tokens). */
int32_t twn_tok_size(const twn_tokenizer *t);
bool twn_tok_is_special(const twn_tokenizer *t, int32_t id);

#endif
