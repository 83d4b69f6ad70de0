/* tokenizer.c — reading tokenizer.json into the tables of tokenizer_internal.h, and decoding.
 *
 * Loading checks every field that changes what ids come out and refuses anything this
 * implementation would get wrong silently (another model type, byte fallback, a prefix space,
 * a post-processor that adds tokens...), naming the field.  Fields that cannot change ids
 * (offsets trimming, unk fusing without an unk token) are ignored.
 *
 * Decoding mirrors HF's ByteLevel decoder token by token: a token whose every character is in
 * the bytes_to_unicode image becomes those bytes, any other token (an added token with a space,
 * say) its own UTF-8 bytes; the concatenation is then read as UTF-8 with U+FFFD replacement.
 * Those bytes are precomputed per id at load, so decoding is a copy. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer_internal.h"
#include "util/fileio.h"
#include "util/mem.h"

/* tokenizer.json files are ~10 MB; refuse absurd ones before reading them whole. */
#define TOK_MAX_FILE_BYTES ((size_t)1 << 30)

/* The pattern ByteLevel(use_regex=true) applies (GPT-2's), as tokenizers spells it. */
static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// ---------------------------------------------------------------------------------------------
// bytes_to_unicode (GPT-2): printable Latin-1 bytes map to themselves, the other 68 bytes to
// U+0100 + n in byte order.

static void byte_unicode_maps(uint32_t b2u[256], int16_t u2b[324]) {
    for (int i = 0; i < 324; i++) u2b[i] = -1;
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        b2u[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
        u2b[b2u[b]] = (int16_t)b;
    }
}

static size_t put_utf8(char *o, uint32_t cp) {
    if (cp < 0x80) return o[0] = (char)cp, 1;
    o[0] = (char)(0xC0 | cp >> 6); /* cp < 0x800 here: the map tops out at U+0143 */
    o[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

/* Bytes HF's ByteLevel decoder gives for one token string (see the file comment). */
static void token_bytes(const char *tok, size_t len, const int16_t u2b[324], twn_str *out) {
    size_t start = out->n;
    const unsigned char *s = (const unsigned char *)tok;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        i += (size_t)tok_utf8_next(s + i, &cp);
        if (cp >= 324 || u2b[cp] < 0) {
            out->n = start;
            twn_str_append(out, tok, len);
            return;
        }
        char b = (char)u2b[cp];
        twn_str_append(out, &b, 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Small JSON helpers: each returns -1 with a message naming the field.

typedef struct {
    const char *name;
    twn_err *err;
} ctx;

static bool is_null(const json_t *v) {
    return !v || json_is_null(v);
}

static const char *type_of(const json_t *obj) {
    const json_t *t = json_object_get(obj, "type");
    return json_is_string(t) ? json_string_value(t) : NULL;
}

/* A boolean field that must be absent/null or equal to want (dflt when absent). */
static int want_bool(ctx *c, const json_t *obj, const char *field, const char *path, bool dflt,
                     bool want) {
    const json_t *v = json_object_get(obj, field);
    bool got = dflt;
    if (!is_null(v)) {
        if (!json_is_boolean(v))
            return twn_err_set(c->err, "%s: %s.%s is not a boolean", c->name, path, field);
        got = json_is_true(v);
    }
    if (got != want)
        return twn_err_set(c->err, "%s: %s.%s is %s (only %s is implemented)", c->name, path, field,
                           got ? "true" : "false", want ? "true" : "false");
    return 0;
}

/* A string field that must be absent, null or "". */
static int want_empty(ctx *c, const json_t *obj, const char *field, const char *path) {
    const json_t *v = json_object_get(obj, field);
    if (is_null(v) || (json_is_string(v) && json_string_length(v) == 0)) return 0;
    return twn_err_set(c->err, "%s: %s.%s is set (not implemented)", c->name, path, field);
}

static int want_type(ctx *c, const json_t *obj, const char *path, const char *const *ok) {
    if (!json_is_object(obj)) return twn_err_set(c->err, "%s: %s is not an object", c->name, path);
    const char *t = type_of(obj);
    for (; *ok; ok++)
        if (t && !strcmp(t, *ok)) return 0;
    return twn_err_set(c->err, "%s: %s.type %s%s%s is not implemented", c->name, path,
                       t ? "\"" : "", t ? t : "(missing)", t ? "\"" : "");
}

// ---------------------------------------------------------------------------------------------
// Sections

static int load_normalizer(twn_tokenizer *t, ctx *c, const json_t *n) {
    if (is_null(n)) return 0;
    static const char *const ok[] = {"NFC", NULL};
    if (want_type(c, n, "normalizer", ok)) return -1;
    t->nfc = true;
    return 0;
}

static int compile_pattern(twn_tokenizer *t, ctx *c, const char *pat, size_t len, bool literal,
                           const char *path) {
    char *tr = literal ? twn_strndup(pat, len) : tok_regex_translate(pat, len);
    int code;
    PCRE2_SIZE off;
    t->re = pcre2_compile((PCRE2_SPTR)tr, literal ? len : PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP), &code, &off, NULL);
    twn_free(tr);
    if (!t->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return twn_err_set(c->err, "%s: %s does not compile: %s (at pattern offset %zu)", c->name,
                           path, (const char *)msg, (size_t)off);
    }
    t->re_jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
    return 0;
}

static int load_split(twn_tokenizer *t, ctx *c, const json_t *s, const char *path) {
    char where[96];
    const json_t *beh = json_object_get(s, "behavior");
    if (!json_is_string(beh) || strcmp(json_string_value(beh), "Isolated"))
        return twn_err_set(c->err, "%s: %s.behavior %s is not implemented (only Isolated)", c->name,
                           path, json_is_string(beh) ? json_string_value(beh) : "(missing)");
    if (want_bool(c, s, "invert", path, false, false)) return -1;
    const json_t *pat = json_object_get(s, "pattern");
    const json_t *re = json_object_get(pat, "Regex"), *str = json_object_get(pat, "String");
    if (json_is_string(re)) {
        snprintf(where, sizeof where, "%s.pattern.Regex", path);
        return compile_pattern(t, c, json_string_value(re), json_string_length(re), false, where);
    }
    if (json_is_string(str)) {
        snprintf(where, sizeof where, "%s.pattern.String", path);
        if (!json_string_length(str)) return twn_err_set(c->err, "%s: %s is empty", c->name, where);
        return compile_pattern(t, c, json_string_value(str), json_string_length(str), true, where);
    }
    return twn_err_set(c->err, "%s: %s.pattern has neither a Regex nor a String", c->name, path);
}

/* ByteLevel as a pre-tokenizer: bytes -> unicode always (that is what BPE here runs on);
 * use_regex (default true) adds GPT-2's split, which we allow only when no Split is given. */
static int load_bytelevel(twn_tokenizer *t, ctx *c, const json_t *b, const char *path) {
    if (want_bool(c, b, "add_prefix_space", path, true, false)) return -1;
    const json_t *ur = json_object_get(b, "use_regex");
    bool use_regex = is_null(ur) ? true : json_is_true(ur);
    if (!use_regex) return 0;
    if (t->re)
        return twn_err_set(c->err, "%s: %s.use_regex is true after a Split (not implemented)",
                           c->name, path);
    return compile_pattern(t, c, gpt2_pattern, sizeof gpt2_pattern - 1, false, path);
}

static int load_pre_tokenizer(twn_tokenizer *t, ctx *c, const json_t *p) {
    static const char *const ok[] = {"Sequence", "Split", "ByteLevel", NULL};
    if (is_null(p))
        return twn_err_set(c->err, "%s: pre_tokenizer is null (only byte-level BPE is implemented)",
                           c->name);
    if (want_type(c, p, "pre_tokenizer", ok)) return -1;
    const char *type = type_of(p);
    if (!strcmp(type, "ByteLevel")) return load_bytelevel(t, c, p, "pre_tokenizer");
    if (!strcmp(type, "Split"))
        return twn_err_set(c->err,
                           "%s: pre_tokenizer is a Split without ByteLevel (only "
                           "byte-level BPE is implemented)",
                           c->name);
    const json_t *seq = json_object_get(p, "pretokenizers");
    size_t n = json_array_size(seq);
    if (!json_is_array(seq) || n == 0)
        return twn_err_set(c->err, "%s: pre_tokenizer.pretokenizers is not a non-empty array",
                           c->name);
    /* Accepted: [Split], ByteLevel — at most one Split, then ByteLevel last. */
    for (size_t i = 0; i < n; i++) {
        char path[64];
        snprintf(path, sizeof path, "pre_tokenizer.pretokenizers[%zu]", i);
        const json_t *e = json_array_get(seq, i);
        static const char *const ok2[] = {"Split", "ByteLevel", NULL};
        if (want_type(c, e, path, ok2)) return -1;
        bool last = i + 1 == n, split = !strcmp(type_of(e), "Split");
        if (split && (t->re || last))
            return twn_err_set(c->err,
                               "%s: %s: only one Split followed by ByteLevel is "
                               "implemented",
                               c->name, path);
        if (!split && !last)
            return twn_err_set(c->err, "%s: %s: ByteLevel must be the last pre-tokenizer", c->name,
                               path);
        if (split ? load_split(t, c, e, path) : load_bytelevel(t, c, e, path)) return -1;
    }
    return 0;
}

static int check_bytelevel_or_null(ctx *c, const json_t *v, const char *path) {
    static const char *const ok[] = {"ByteLevel", NULL};
    if (is_null(v)) return 0;
    return want_type(c, v, path, ok);
}

/* Grows the id-indexed tables to hold id. */
static void ensure_id(twn_tokenizer *t, int32_t id) {
    if (id < t->size) return;
    int32_t old = t->size, n = old ? old : 1024;
    while (n <= id) n *= 2;
    if (n > TOK_MAX_ID) n = TOK_MAX_ID;
    t->flags = twn_realloc(t->flags, (size_t)n);
    t->str = twn_realloc(t->str, (size_t)n * sizeof *t->str);
    memset(t->flags + old, 0, (size_t)(n - old));
    memset(t->str + old, 0, (size_t)(n - old) * sizeof *t->str);
    t->size = n;
}

static int get_id(ctx *c, const json_t *v, const char *what, const char *tok, int32_t *id) {
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= TOK_MAX_ID)
        return twn_err_set(c->err, "%s: %s \"%.64s\" has id %s outside [0, %d)", c->name, what, tok,
                           json_is_integer(v) ? "" : "(not an integer)", TOK_MAX_ID);
    *id = (int32_t)json_integer_value(v);
    return 0;
}

static void merge_put(twn_tokenizer *t, int32_t a, int32_t b, int32_t rank, int32_t id) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t mask = t->mcap - 1;
    for (size_t i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 20) & mask;; i = (i + 1) & mask) {
        tok_merge *m = &t->merges[i];
        if (m->key == 0 || m->key == key) {
            if (!m->key) t->nmerges++;
            m->key = key; /* a repeated pair keeps the later rank, like HF's HashMap */
            m->rank = rank;
            m->id = id;
            return;
        }
    }
}

static int vocab_lookup(ctx *c, const twn_tokenizer *t, const char *s, size_t n, size_t rank,
                        int32_t *id) {
    int64_t v;
    if (twn_strmap_get(t->vocab, s, n, &v)) return *id = (int32_t)v, 0;
    return twn_err_set(c->err, "%s: model.merges[%zu]: \"%.*s\" is not in the vocab", c->name, rank,
                       (int)(n > 64 ? 64 : n), s);
}

static int load_model(twn_tokenizer *t, ctx *c, const json_t *m) {
    static const char *const ok[] = {"BPE", NULL};
    if (want_type(c, m, "model", ok)) return -1;
    const json_t *dropout = json_object_get(m, "dropout");
    if (!is_null(dropout) && !(json_is_number(dropout) && json_number_value(dropout) == 0))
        return twn_err_set(c->err, "%s: model.dropout is set (not implemented)", c->name);
    if (want_empty(c, m, "continuing_subword_prefix", "model") ||
        want_empty(c, m, "end_of_word_suffix", "model") ||
        want_bool(c, m, "byte_fallback", "model", false, false))
        return -1;
    const json_t *im = json_object_get(m, "ignore_merges");
    t->ignore_merges = json_is_true(im);

    const json_t *vocab = json_object_get(m, "vocab");
    if (!json_is_object(vocab))
        return twn_err_set(c->err, "%s: model.vocab is not an object", c->name);
    const json_t *merges = json_object_get(m, "merges");
    if (!is_null(merges) && !json_is_array(merges))
        return twn_err_set(c->err, "%s: model.merges is not an array", c->name);
    size_t nm = json_array_size(merges);
    t->vocab = twn_strmap_new(json_object_size(vocab) + 64);
    for (void *it = json_object_iter((json_t *)vocab); it;
         it = json_object_iter_next((json_t *)vocab, it)) {
        const char *k = json_object_iter_key(it);
        size_t klen = json_object_iter_key_len(it);
        int32_t id;
        if (get_id(c, json_object_iter_value(it), "vocab entry", k, &id)) return -1;
        ensure_id(t, id);
        if (t->flags[id] & TOK_VALID)
            return twn_err_set(c->err,
                               "%s: model.vocab: id %d is used by both \"%.64s\" and "
                               "\"%.64s\"",
                               c->name, id, t->str[id], k);
        t->flags[id] = TOK_VALID;
        t->str[id] = twn_strndup(k, klen);
        twn_strmap_put(t->vocab, k, klen, id);
    }

    const json_t *unk = json_object_get(m, "unk_token");
    t->unk_id = -1;
    if (json_is_string(unk)) {
        int64_t v;
        if (!twn_strmap_get(t->vocab, json_string_value(unk), json_string_length(unk), &v))
            return twn_err_set(c->err, "%s: model.unk_token \"%.64s\" is not in the vocab", c->name,
                               json_string_value(unk));
        t->unk_id = (int32_t)v;
    } else if (!is_null(unk)) {
        return twn_err_set(c->err, "%s: model.unk_token is not a string", c->name);
    }

    t->mcap = 16;
    while (t->mcap < nm * 2) t->mcap *= 2;
    t->merges = twn_calloc(t->mcap, sizeof *t->merges);
    twn_str both = {0};
    for (size_t i = 0; i < nm; i++) {
        const json_t *e = json_array_get(merges, i);
        const char *a, *b;
        size_t alen, blen;
        if (json_is_string(e)) { /* "a b" */
            a = json_string_value(e);
            const char *sp = memchr(a, ' ', json_string_length(e));
            if (!sp || sp == a || !sp[1]) {
                twn_str_free(&both);
                return twn_err_set(c->err, "%s: model.merges[%zu] \"%.64s\" is not \"a b\"",
                                   c->name, i, a);
            }
            alen = (size_t)(sp - a);
            b = sp + 1;
            blen = json_string_length(e) - alen - 1;
        } else if (json_is_array(e) && json_array_size(e) == 2 &&
                   json_is_string(json_array_get(e, 0)) && json_is_string(json_array_get(e, 1))) {
            a = json_string_value(json_array_get(e, 0));
            alen = json_string_length(json_array_get(e, 0));
            b = json_string_value(json_array_get(e, 1));
            blen = json_string_length(json_array_get(e, 1));
        } else {
            twn_str_free(&both);
            return twn_err_set(
                c->err, "%s: model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", c->name, i);
        }
        int32_t ia = 0, ib = 0, inew = 0;
        twn_str_reset(&both);
        twn_str_append(&both, a, alen);
        twn_str_append(&both, b, blen);
        if (vocab_lookup(c, t, a, alen, i, &ia) || vocab_lookup(c, t, b, blen, i, &ib) ||
            vocab_lookup(c, t, both.v, both.n, i, &inew)) {
            twn_str_free(&both);
            return -1;
        }
        merge_put(t, ia, ib, (int32_t)i, inew);
    }
    twn_str_free(&both);
    return 0;
}

static int load_added(twn_tokenizer *t, ctx *c, const json_t *added) {
    if (is_null(added)) return 0;
    if (!json_is_array(added))
        return twn_err_set(c->err, "%s: added_tokens is not an array", c->name);
    size_t n = json_array_size(added);
    t->added = twn_calloc(n ? n : 1, sizeof *t->added);
    t->added_map = twn_strmap_new(n);
    int32_t next_id = (int32_t)twn_strmap_count(t->vocab);
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(added, i);
        char path[48];
        snprintf(path, sizeof path, "added_tokens[%zu]", i);
        const json_t *content = json_object_get(e, "content");
        if (!json_is_string(content) || !json_string_length(content))
            return twn_err_set(c->err, "%s: %s.content is not a non-empty string", c->name, path);
        const char *s = json_string_value(content);
        int32_t id;
        if (get_id(c, json_object_get(e, "id"), "added token", s, &id) ||
            want_bool(c, e, "single_word", path, false, false) ||
            want_bool(c, e, "lstrip", path, false, false) ||
            want_bool(c, e, "rstrip", path, false, false))
            return -1;
        bool special = json_is_true(json_object_get(e, "special"));
        const json_t *norm = json_object_get(e, "normalized");
        /* tokenizers ignores the id in the file: a content already in the model vocab keeps
         * its vocab id, any other gets the next id after the vocab (or the last added one).
         * Refuse a file whose ids would not survive that, rather than disagree with HF. */
        int64_t vid;
        int32_t hf_id = next_id;
        if (twn_strmap_get(t->vocab, s, json_string_length(content), &vid))
            hf_id = (int32_t)vid;
        else
            next_id++;
        if (id != hf_id)
            return twn_err_set(c->err,
                               "%s: %s.id is %d but tokenizers would give \"%.64s\" id "
                               "%d (vocab entries are numbered 0..n-1, added tokens next)",
                               c->name, path, id, s, hf_id);
        tok_added *a = &t->added[t->nadded++];
        a->text = twn_strndup(s, json_string_length(content));
        a->len = json_string_length(content);
        a->id = id;
        a->special = special;
        a->normalized = is_null(norm) ? !special : json_is_true(norm);
        ensure_id(t, id);
        twn_free(t->str[id]);
        t->str[id] = twn_strndup(a->text, a->len);
        t->flags[id] = TOK_VALID | TOK_ADDED | (special ? TOK_SPECIAL : 0);
        twn_strmap_put(t->added_map, a->text, a->len, id);
    }
    tok_matcher_build(&t->raw_match, t->added, t->nadded, false);
    tok_matcher_build(&t->norm_match, t->added, t->nadded, true);
    return 0;
}

/* Fills byte_id, the decoded bytes of every id, and trims size to one past the largest id. */
static int finish(twn_tokenizer *t, ctx *c) {
    uint32_t b2u[256];
    int16_t u2b[324];
    byte_unicode_maps(b2u, u2b);
    for (int b = 0; b < 256; b++) { /* BPE symbols: the model's own vocab, not added tokens */
        char s[4];
        size_t n = put_utf8(s, b2u[b]);
        int64_t v;
        t->byte_id[b] = twn_strmap_get(t->vocab, s, n, &v) ? (int32_t)v : -1;
    }
    int32_t size = 0;
    for (int32_t i = 0; i < t->size; i++)
        if (t->flags[i] & TOK_VALID) size = i + 1;
    t->size = size;
    if (!size) return twn_err_set(c->err, "%s: the vocabulary is empty", c->name);
    t->dec_off = twn_malloc(((size_t)size + 1) * sizeof *t->dec_off);
    twn_str dec = {0};
    twn_str_append(&dec, "", 0);
    for (int32_t i = 0; i < size; i++) {
        t->dec_off[i] = (uint32_t)dec.n;
        if (t->str[i]) token_bytes(t->str[i], strlen(t->str[i]), u2b, &dec);
    }
    t->dec_off[size] = (uint32_t)dec.n;
    t->dec = dec.v;
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Public API

int twn_tok_load_mem(const char *json, size_t len, const char *name, twn_tokenizer **out,
                     twn_err *err) {
    *out = NULL;
    ctx c = {name ? name : "tokenizer.json", err};
    json_error_t jerr;
    json_t *root = json_loadb(json, len, JSON_ALLOW_NUL, &jerr);
    if (!root)
        return twn_err_set(err, "%s: invalid JSON at line %d column %d: %s", c.name, jerr.line,
                           jerr.column, jerr.text);
    twn_tokenizer *t = twn_calloc(1, sizeof *t);
    t->name = twn_strdup(c.name);
    t->unk_id = -1;
    if (!json_is_object(root)) {
        twn_err_set(err, "%s: the top level is not an object", c.name);
        goto fail;
    }
    if (!is_null(json_object_get(root, "truncation")) ||
        !is_null(json_object_get(root, "padding"))) {
        twn_err_set(err, "%s: truncation/padding are set (not implemented)", c.name);
        goto fail;
    }
    if (load_normalizer(t, &c, json_object_get(root, "normalizer")) ||
        load_pre_tokenizer(t, &c, json_object_get(root, "pre_tokenizer")) ||
        check_bytelevel_or_null(&c, json_object_get(root, "post_processor"), "post_processor") ||
        check_bytelevel_or_null(&c, json_object_get(root, "decoder"), "decoder") ||
        load_model(t, &c, json_object_get(root, "model")) ||
        load_added(t, &c, json_object_get(root, "added_tokens")) || finish(t, &c))
        goto fail;
    json_decref(root);
    *out = t;
    return 0;
fail:
    json_decref(root);
    twn_tok_free(t);
    return -1;
}

int twn_tok_load(const char *path, twn_tokenizer **out, twn_err *err) {
    char *data;
    size_t len;
    *out = NULL;
    if (twn_read_file(path, TOK_MAX_FILE_BYTES, &data, &len, err)) return -1;
    int rc = twn_tok_load_mem(data, len, path, out, err);
    twn_free(data);
    return rc;
}

void twn_tok_free(twn_tokenizer *t) {
    if (!t) return;
    if (t->str)
        for (int32_t i = 0; i < t->size; i++) twn_free(t->str[i]);
    twn_free(t->str);
    twn_free(t->flags);
    twn_free(t->dec_off);
    twn_free(t->dec);
    twn_strmap_free(t->vocab);
    twn_strmap_free(t->added_map);
    twn_free(t->merges);
    pcre2_code_free(t->re);
    for (size_t i = 0; i < t->nadded; i++) twn_free(t->added[i].text);
    twn_free(t->added);
    tok_matcher_free(&t->raw_match);
    tok_matcher_free(&t->norm_match);
    twn_free(t->name);
    twn_free(t);
}

int twn_tok_decode(const twn_tokenizer *t, const int32_t *ids, size_t n, bool skip_special,
                   twn_str *out, twn_err *err) {
    twn_str raw = {0};
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0) {
            twn_str_free(&raw);
            return twn_err_set(err, "%s: token id %d at position %zu is negative", t->name, id, i);
        }
        if (id >= t->size || !(t->flags[id] & TOK_VALID)) continue; /* no token: no bytes */
        if (skip_special && (t->flags[id] & TOK_SPECIAL)) continue;
        twn_str_append(&raw, t->dec + t->dec_off[id], t->dec_off[id + 1] - t->dec_off[id]);
    }
    tok_utf8_lossy(raw.v ? raw.v : "", raw.n, out);
    twn_str_free(&raw);
    return 0;
}

const char *twn_tok_bytes(const twn_tokenizer *t, int32_t id, size_t *len) {
    if (id < 0 || id >= t->size || !(t->flags[id] & TOK_VALID)) {
        *len = 0;
        return "";
    }
    *len = t->dec_off[id + 1] - t->dec_off[id];
    return t->dec + t->dec_off[id];
}

int32_t twn_tok_id(const twn_tokenizer *t, const char *token) {
    int64_t v;
    size_t n = strlen(token);
    if (t->added_map && twn_strmap_get(t->added_map, token, n, &v)) return (int32_t)v;
    return twn_strmap_get(t->vocab, token, n, &v) ? (int32_t)v : -1;
}

const char *twn_tok_token(const twn_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->size ? t->str[id] : NULL;
}

int32_t twn_tok_size(const twn_tokenizer *t) {
    return t->size;
}

bool twn_tok_is_special(const twn_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->size && (t->flags[id] & TOK_SPECIAL);
}
