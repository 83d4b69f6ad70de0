/* tokenizer_internal.h — the loaded tokenizer's tables, shared by the three tokenizer files.
 *
 * tokenizer.c reads tokenizer.json into these tables, tokenizer_encode.c runs the pipeline over
 * them, tokenizer_unicode.c holds the Unicode pieces (UTF-8, NFC, regex translation) that must
 * agree with Hugging Face `tokenizers` rather than with whatever Unicode version the C libraries
 * ship.  Everything here is read-only after load, which is what makes encoding thread-safe.
 *
 * BPE runs on token ids, not strings: every vocab entry is also kept as its raw bytes (the
 * byte-level unicode form mapped back through bytes_to_unicode), a word starts as one id per
 * byte, and a merge is a lookup of the id pair (left, right) in an open-addressing table that
 * gives (rank, merged id). */
#ifndef TWN_ENGINE_TOKENIZER_INTERNAL_H
#define TWN_ENGINE_TOKENIZER_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/tokenizer.h"
#include "util/hash.h"

/* Largest token id accepted from a tokenizer.json (ids size the id-indexed tables; real
 * vocabularies stay below 300k). */
#define TOK_MAX_ID (1 << 21)

/* Per-id flags. */
enum { TOK_VALID = 1, TOK_ADDED = 2, TOK_SPECIAL = 4 };

/* Added tokens that are matched on the same text (raw text, or text after normalization),
 * indexed by first byte; within one first byte, longest first, so the first hit at a position
 * is the leftmost-longest match that HF's Aho-Corasick (MatchKind::LeftmostLongest) finds. */
typedef struct {
    uint32_t *order;     /* indices into twn_tokenizer.added, grouped by first byte */
    uint32_t start[257]; /* order[start[b] .. start[b+1]) begin with byte b */
    uint32_t n;
} tok_matcher;

typedef struct {
    char *text; /* content, NUL-terminated */
    size_t len;
    int32_t id;
    bool special, normalized;
} tok_added;

typedef struct {
    uint64_t key; /* ((uint64_t)left << 32 | right) + 1; 0 = empty slot */
    int32_t rank;
    int32_t id;
} tok_merge;

struct twn_tokenizer {
    char *name;     /* file name, for messages */
    int32_t size;   /* one past the largest id */
    uint8_t *flags; /* [size] TOK_* */
    char **str;     /* [size] token string as in the JSON (byte-level form), or NULL */
    /* Decoded bytes of each id (what HF's ByteLevel decoder emits for that token alone). */
    uint32_t *dec_off; /* [size + 1] into dec */
    char *dec;
    twn_strmap *vocab;     /* model vocab: token string -> id (what BPE produces) */
    twn_strmap *added_map; /* added token content -> id (looked up first by twn_tok_id) */
    int32_t byte_id[256];  /* id of the one-byte token for byte b, or -1 */

    tok_merge *merges; /* open addressing, mcap a power of two, load <= 1/2 */
    size_t mcap, nmerges;

    bool ignore_merges; /* a word that is itself a vocab entry is emitted whole */
    int32_t unk_id;     /* id for bytes without a token, or -1 (they are then dropped, like HF) */
    bool nfc;           /* normalizer NFC (else none) */

    pcre2_code *re; /* Split pattern (translated, see tokenizer_unicode.c); NULL = no split */
    bool re_jit;

    tok_added *added;
    size_t nadded;
    tok_matcher raw_match;  /* normalized:false tokens, matched on the raw text */
    tok_matcher norm_match; /* normalized:true tokens, matched after NFC */
};

/* ---- tokenizer_unicode.c ---- */

/* Checks strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF).  Returns 1 when
 * valid, else 0 with *bad = offset of the first byte of the first invalid sequence. */
int tok_utf8_valid(const char *s, size_t n, size_t *bad);
/* Decodes one code point from valid UTF-8; returns its length in bytes. */
int tok_utf8_next(const unsigned char *s, uint32_t *cp);
/* Appends s (arbitrary bytes) to out as UTF-8, each maximal ill-formed subpart replaced by
 * U+FFFD (Python errors="replace", Rust from_utf8_lossy). */
void tok_utf8_lossy(const char *s, size_t n, twn_str *out);
/* NFC as HF's normalizer computes it.  Returns 0 and leaves out untouched when s (valid UTF-8)
 * is already normalized; otherwise 1 with out set to the normalized text.  -1 on failure. */
int tok_nfc(const char *s, size_t n, twn_str *out, twn_err *err);
/* True for the code points HF's NFC leaves alone although utf8proc would not (see the table). */
bool tok_nfc_inert(uint32_t cp);
/* Translates an Oniguruma pattern from tokenizer.json into one PCRE2 (UTF+UCP) matches the
 * same way: \s, \S, \p{L}, \p{N} become explicit classes with HF's Unicode data.  New string. */
char *tok_regex_translate(const char *pattern, size_t len);

/* ---- tokenizer_encode.c ---- */

/* Builds a matcher over the added tokens whose `normalized` flag equals normalized. */
void tok_matcher_build(tok_matcher *m, const tok_added *added, size_t nadded, bool normalized);
void tok_matcher_free(tok_matcher *m);

#endif
