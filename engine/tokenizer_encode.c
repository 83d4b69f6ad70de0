/* tokenizer_encode.c — text to ids, in HF tokenizers' order.
 *
 *   raw text --added tokens (normalized:false)--> spans --NFC--> --added tokens (normalized:true)
 *   --> spans --Split regex, Isolated--> words --bytes--> BPE --> ids
 *
 * Added tokens are found with a first-byte index (leftmost-longest, like HF's Aho-Corasick).
 * Isolated means every regex match is a word and so is every gap between matches.
 *
 * BPE follows tokenizers' Word::merge_all: repeatedly merge the adjacent pair with the lowest
 * merge rank, the leftmost one on ties.  Words are short (a word is at most one run of letters),
 * so they are merged in a flat array with a linear scan for the best pair; long words (a long
 * run of CJK letters, a base64 blob) switch to a binary heap over a linked list, which is what
 * tokenizers does for every word.  Both give the same merges.
 *
 * Nothing here writes to the tokenizer: scratch space lives in a per-call `enc` on the stack. */
#include <string.h>

#include "engine/tokenizer_internal.h"
#include "util/mem.h"

/* Words up to this many symbols use the flat O(n^2) merge; longer ones the heap. */
#define TOK_FLAT_MAX 64

typedef struct {
    const twn_tokenizer *t;
    twn_ivec *out;
    pcre2_match_data *md;
    twn_str nfc, word;
    twn_err *err;
    /* BPE scratch */
    int32_t *id, *rank, *prev, *next;
    uint64_t *heap;
    size_t cap, heapcap;
} enc;

// ---------------------------------------------------------------------------------------------
// Added-token matcher

void tok_matcher_build(tok_matcher *m, const tok_added *added, size_t nadded, bool normalized) {
    memset(m, 0, sizeof *m);
    uint32_t count[256] = {0};
    for (size_t i = 0; i < nadded; i++)
        if (added[i].normalized == normalized) count[(unsigned char)added[i].text[0]]++;
    for (int b = 0; b < 256; b++) m->start[b + 1] = m->start[b] + count[b];
    m->n = m->start[256];
    m->order = twn_malloc((m->n ? m->n : 1) * sizeof *m->order);
    uint32_t fill[256];
    memcpy(fill, m->start, sizeof fill);
    for (size_t i = 0; i < nadded; i++) {
        if (added[i].normalized != normalized) continue;
        unsigned b = (unsigned char)added[i].text[0];
        /* insertion sort into the bucket: longest first, then file order */
        uint32_t j = fill[b]++;
        while (j > m->start[b] && added[m->order[j - 1]].len < added[i].len) {
            m->order[j] = m->order[j - 1];
            j--;
        }
        m->order[j] = (uint32_t)i;
    }
}

void tok_matcher_free(tok_matcher *m) {
    twn_free(m->order);
    m->order = NULL;
}

/* Finds the leftmost-longest added token in s[from, n): returns its index in t->added and sets
 * *at, or returns -1. */
static long match_added(const twn_tokenizer *t, const tok_matcher *m, const char *s, size_t n,
                        size_t from, size_t *at) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = from; i < n; i++) {
        unsigned b = u[i];
        for (uint32_t k = m->start[b]; k < m->start[b + 1]; k++) {
            const tok_added *a = &t->added[m->order[k]];
            if (a->len <= n - i && memcmp(s + i, a->text, a->len) == 0) {
                *at = i;
                return (long)m->order[k];
            }
        }
    }
    return -1;
}

// ---------------------------------------------------------------------------------------------
// BPE

static inline uint64_t merge_key(int32_t a, int32_t b) {
    return ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
}

/* Rank and merged id of the pair (a, b); rank INT32_MAX when there is no such merge. */
static inline int32_t merge_get(const twn_tokenizer *t, int32_t a, int32_t b, int32_t *id) {
    uint64_t key = merge_key(a, b);
    size_t mask = t->mcap - 1;
    for (size_t i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 20) & mask;; i = (i + 1) & mask) {
        const tok_merge *m = &t->merges[i];
        if (m->key == key) return *id = m->id, m->rank;
        if (!m->key) return INT32_MAX;
    }
}

static void reserve(enc *e, size_t n) {
    if (n <= e->cap) return;
    size_t c = e->cap ? e->cap : 64;
    while (c < n) c *= 2;
    e->id = twn_realloc(e->id, c * sizeof *e->id);
    e->rank = twn_realloc(e->rank, c * sizeof *e->rank);
    e->prev = twn_realloc(e->prev, c * sizeof *e->prev);
    e->next = twn_realloc(e->next, c * sizeof *e->next);
    e->cap = c;
}

static void merge_flat(enc *e, size_t n) {
    const twn_tokenizer *t = e->t;
    int32_t *id = e->id, *rank = e->rank, nid = 0;
    for (size_t i = 0; i + 1 < n; i++) rank[i] = merge_get(t, id[i], id[i + 1], &nid);
    while (n > 1) {
        size_t best = 0;
        for (size_t i = 1; i + 1 < n; i++)
            if (rank[i] < rank[best]) best = i;
        if (rank[best] == INT32_MAX) break;
        merge_get(t, id[best], id[best + 1], &id[best]);
        memmove(id + best + 1, id + best + 2, (n - best - 2) * sizeof *id);
        memmove(rank + best + 1, rank + best + 2, (n - best - 2) * sizeof *rank);
        n--;
        if (best + 1 < n)
            rank[best] = merge_get(t, id[best], id[best + 1], &nid);
        else
            rank[best] = INT32_MAX;
        if (best > 0) rank[best - 1] = merge_get(t, id[best - 1], id[best], &nid);
    }
    twn_ivec_append(e->out, id, n);
}

/* Heap entries are (rank << 32 | position): the minimum is the lowest rank, leftmost. */
static void heap_push(enc *e, size_t *hn, uint64_t v) {
    if (*hn == e->heapcap) {
        e->heapcap = e->heapcap ? e->heapcap * 2 : 256;
        e->heap = twn_realloc(e->heap, e->heapcap * sizeof *e->heap);
    }
    size_t i = (*hn)++;
    while (i > 0 && e->heap[(i - 1) / 2] > v) {
        e->heap[i] = e->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    e->heap[i] = v;
}

static uint64_t heap_pop(enc *e, size_t *hn) {
    uint64_t top = e->heap[0], v = e->heap[--*hn];
    size_t i = 0, n = *hn;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && e->heap[c + 1] < e->heap[c]) c++;
        if (e->heap[c] >= v) break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n) e->heap[i] = v;
    return top;
}

static void merge_heap(enc *e, size_t n) {
    const twn_tokenizer *t = e->t;
    int32_t *id = e->id, *prev = e->prev, *next = e->next, nid = 0;
    size_t hn = 0;
    for (size_t i = 0; i < n; i++) {
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
        e->rank[i] = 0; /* 0 = alive */
    }
    for (size_t i = 0; i + 1 < n; i++) {
        int32_t r = merge_get(t, id[i], id[i + 1], &nid);
        if (r != INT32_MAX) heap_push(e, &hn, (uint64_t)r << 32 | i);
    }
    while (hn) {
        uint64_t top = heap_pop(e, &hn);
        int32_t r = (int32_t)(top >> 32);
        size_t i = (size_t)(top & 0xffffffffu);
        /* stale entry: the symbol died, or its pair changed since the entry was pushed */
        if (e->rank[i] || next[i] < 0) continue;
        size_t j = (size_t)next[i];
        if (merge_get(t, id[i], id[j], &nid) != r) continue;
        id[i] = nid;
        e->rank[j] = 1;
        next[i] = next[j];
        if (next[j] >= 0) prev[next[j]] = (int32_t)i;
        if (prev[i] >= 0) {
            size_t p = (size_t)prev[i];
            int32_t rp = merge_get(t, id[p], id[i], &nid);
            if (rp != INT32_MAX) heap_push(e, &hn, (uint64_t)rp << 32 | p);
        }
        if (next[i] >= 0) {
            int32_t rn = merge_get(t, id[i], id[next[i]], &nid);
            if (rn != INT32_MAX) heap_push(e, &hn, (uint64_t)rn << 32 | i);
        }
    }
    for (int32_t i = 0; i >= 0; i = next[i]) twn_ivec_push(e->out, id[i]);
}

/* One pre-tokenized word (raw bytes) -> ids. */
static void bpe_word(enc *e, const char *w, size_t len) {
    const twn_tokenizer *t = e->t;
    if (t->ignore_merges) { /* tokenizers: a word that is a vocab entry is taken whole */
        twn_str_reset(&e->word);
        size_t i = 0;
        for (; i < len; i++) {
            int32_t b = t->byte_id[(unsigned char)w[i]];
            if (b < 0 || !t->str[b]) break;
            twn_str_puts(&e->word, t->str[b]);
        }
        int64_t v;
        if (i == len && twn_strmap_get(t->vocab, e->word.v, e->word.n, &v)) {
            twn_ivec_push(e->out, (int32_t)v);
            return;
        }
    }
    reserve(e, len);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        int32_t b = t->byte_id[(unsigned char)w[i]];
        if (b < 0) b = t->unk_id; /* no unk token: the byte is dropped, as tokenizers does */
        if (b >= 0) e->id[n++] = b;
    }
    if (n == 0) return;
    if (n == 1)
        twn_ivec_push(e->out, e->id[0]);
    else if (n <= TOK_FLAT_MAX)
        merge_flat(e, n);
    else
        merge_heap(e, n);
}

// ---------------------------------------------------------------------------------------------
// Pipeline

/* Split regex (Isolated) over one normalized span. */
static int pre_tokenize(enc *e, const char *s, size_t n) {
    const twn_tokenizer *t = e->t;
    if (!t->re) {
        bpe_word(e, s, n);
        return 0;
    }
    size_t off = 0, prev = 0;
    while (off <= n) {
        int rc = pcre2_match(t->re, (PCRE2_SPTR)s, n, off, PCRE2_NO_UTF_CHECK, e->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return twn_err_set(e->err,
                               "%s: pre-tokenizer regex failed at byte %zu of a %zu-byte "
                               "span: %s",
                               t->name, off, n, (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t ms = ov[0], me = ov[1];
        if (ms > prev) bpe_word(e, s + prev, ms - prev);
        if (me > ms) bpe_word(e, s + ms, me - ms);
        if (me > prev) prev = me;
        if (me > ms) {
            off = me;
        } else { /* empty match: move on by one character */
            if (ms >= n) break;
            uint32_t cp;
            off = ms + (size_t)tok_utf8_next((const unsigned char *)s + ms, &cp);
        }
    }
    if (prev < n) bpe_word(e, s + prev, n - prev);
    return 0;
}

/* A span between raw added tokens: NFC, then normalized added tokens, then the regex. */
static int encode_span(enc *e, const char *s, size_t n) {
    const twn_tokenizer *t = e->t;
    if (!n) return 0;
    if (t->nfc) {
        int rc = tok_nfc(s, n, &e->nfc, e->err);
        if (rc < 0) return -1;
        if (rc == 1) s = e->nfc.v, n = e->nfc.n;
    }
    if (!t->norm_match.n) return pre_tokenize(e, s, n);
    size_t pos = 0, at;
    long k;
    while ((k = match_added(t, &t->norm_match, s, n, pos, &at)) >= 0) {
        if (at > pos && pre_tokenize(e, s + pos, at - pos)) return -1;
        twn_ivec_push(e->out, t->added[k].id);
        pos = at + t->added[k].len;
    }
    return pos < n ? pre_tokenize(e, s + pos, n - pos) : 0;
}

int twn_tok_encode(const twn_tokenizer *t, const char *text, size_t len, twn_ivec *out,
                   twn_err *err) {
    size_t bad;
    if (!tok_utf8_valid(text, len, &bad))
        return twn_err_set(err, "%s: input is not valid UTF-8: byte 0x%02x at byte offset %zu",
                           t->name, (unsigned char)text[bad], bad);
    enc e = {.t = t, .out = out, .err = err};
    if (t->re) e.md = pcre2_match_data_create_from_pattern(t->re, NULL);
    if (t->re && !e.md) return twn_err_set(err, "%s: out of memory for regex match data", t->name);
    size_t pos = 0, at, start = out->n;
    long k;
    int rc = 0;
    while (!rc && (k = match_added(t, &t->raw_match, text, len, pos, &at)) >= 0) {
        rc = encode_span(&e, text + pos, at - pos);
        twn_ivec_push(out, t->added[k].id);
        pos = at + t->added[k].len;
    }
    if (!rc && pos < len) rc = encode_span(&e, text + pos, len - pos);
    if (rc) out->n = start;
    pcre2_match_data_free(e.md);
    twn_str_free(&e.nfc);
    twn_str_free(&e.word);
    twn_free(e.id);
    twn_free(e.rank);
    twn_free(e.prev);
    twn_free(e.next);
    twn_free(e.heap);
    return rc;
}
