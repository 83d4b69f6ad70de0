/* source_tar.c — WebDataset tar shards: one item per run of members sharing a key.
 *
 * Parsed by hand rather than with libarchive because items must be addressable by (offset,
 * length): a worker re-reads one item with one ranged read and parses only those bytes, and the
 * planner walks headers without reading member data.  Three layers:
 *
 *   entry   one member: optional GNU long-name / pax headers, the ustar header, padded data.
 *           A header that fails its checksum cannot be sized; the entry then spans up to the
 *           next block that is a valid header, an empty block, or the end (E_BAD).
 *   group   consecutive entries with the same key (plus directories and other non-file entries
 *           in between): one item.  Planner, unit reader and ref reader all use next_group(),
 *           so they agree on every boundary.
 *   item    a group turned into a twn_src_item: sizes checked before any data is loaded, then the
 *           .txt/.json/image members read and validated.
 *
 * The scanner never starts an entry at or beyond `limit` (the unit end, or the ref end), and
 * empty blocks (archive end markers, padding of concatenated archives) are skipped wherever they
 * appear, so a shard written by `cat a.tar b.tar` reads as one. */
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "common/source_internal.h"
#include "util/mem.h"

#define BLOCK         512u
#define META_MAX      (64u << 10) /* GNU long-name / pax header payloads */
#define NAME_MAX_LEN  4096u       /* member names longer than this make their item bad */
#define GROUP_MAX_ENT 4096u       /* members per item */
#define MSG_MAX       600

typedef enum { E_END, E_FILE, E_SKIP, E_BAD } entry_kind;

typedef struct {
    entry_kind kind;
    uint64_t start, end;     /* first (prefix) header .. end of padded data */
    uint64_t data_off, size; /* E_FILE */
    char *name;              /* E_FILE / E_SKIP; owned */
    size_t name_len;
    int truncated;       /* data runs past the end of the blob */
    twn_src_fault fault; /* E_BAD always; E_FILE when its headers have a problem */
    char msg[MSG_MAX];
} tar_entry;

typedef struct {
    twn_blob *b;
    twn_src_cursor *c;
    uint64_t pos, limit;
    tar_entry la; /* lookahead: the entry that ended the previous group */
    int has_la;
    int keep; /* keep the group's file entries (readers); the planner only needs boundaries */
} tar_scan;

typedef struct {
    uint64_t start, end;
    tar_entry *e; /* E_FILE entries (when keep) */
    size_t n, cap;
    char *key; /* NULL for a bad span */
    size_t key_len;
    size_t members;
    twn_src_fault fault; /* a bad span (E_BAD) */
    char msg[MSG_MAX];
} tar_group;

struct twn_src_tar_state {
    tar_scan s;
    tar_group g;
};

static void entry_free(tar_entry *e) {
    twn_free(e->name);
    e->name = NULL;
}

static void group_reset(tar_group *g) {
    for (size_t i = 0; i < g->n; i++) entry_free(&g->e[i]);
    g->n = 0;
    twn_free(g->key);
    g->key = NULL;
    g->key_len = 0;
    g->members = 0;
    g->fault = TWN_SRC_OK;
    g->msg[0] = 0;
    g->start = g->end = 0;
}

static void group_free(tar_group *g) {
    group_reset(g);
    twn_free(g->e);
    g->e = NULL;
    g->cap = 0;
}

static void scan_free(tar_scan *s) {
    if (s->has_la) entry_free(&s->la);
    s->has_la = 0;
}

// ------------------------------------------------------------------------------------------------
// Header fields

static int all_zero(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

/* An octal field: leading spaces, at least one digit, then NULs/spaces to the end. */
static int parse_octal(const uint8_t *f, size_t n, uint64_t *v) {
    size_t i = 0;
    uint64_t x = 0;
    while (i < n && f[i] == ' ') i++;
    size_t d0 = i;
    for (; i < n && f[i] >= '0' && f[i] <= '7'; i++) {
        if (x >> 61) return -1;
        x = x << 3 | (uint64_t)(f[i] - '0');
    }
    if (i == d0) return -1;
    for (; i < n; i++)
        if (f[i] != ' ' && f[i] != 0) return -1;
    *v = x;
    return 0;
}

/* The 12-byte size field: octal, or GNU base-256 when the high bit is set. */
static int parse_size(const uint8_t *f, uint64_t *v) {
    if (f[0] & 0x80) {
        if (f[0] != 0x80) return -1; /* negative or too large */
        uint64_t x = 0;
        for (int i = 1; i < 12; i++) {
            if (x >> 55) return -1;
            x = x << 8 | f[i];
        }
        *v = x;
        return 0;
    }
    if (all_zero(f, 12)) {
        *v = 0;
        return 0;
    }
    return parse_octal(f, 12, v);
}

static void header_sums(const uint8_t *h, uint64_t *u, int64_t *s) {
    uint64_t su = 0;
    int64_t ss = 0;
    for (size_t i = 0; i < BLOCK; i++) {
        uint8_t c = (i >= 148 && i < 156) ? ' ' : h[i];
        su += c;
        ss += (signed char)c;
    }
    *u = su;
    *s = ss;
}

static int header_ok(const uint8_t *h) {
    uint64_t stored, u;
    int64_t s;
    if (parse_octal(h + 148, 8, &stored)) return 0;
    header_sums(h, &u, &s);
    return stored == u || (int64_t)stored == s;
}

static uint64_t pad_block(uint64_t n) {
    return (n + BLOCK - 1) / BLOCK * BLOCK;
}

/* The first block at or after `p` that is a valid header or empty, or the limit / end; `what`
 * names what is there, judged from the bytes alone so every reader words it the same way. */
static int resync(tar_scan *s, uint64_t p, uint64_t *stop, const char **what, twn_err *err) {
    for (;; p += BLOCK) {
        const uint8_t *h = NULL;
        size_t got = 0;
        if (p < s->b->size && twn_src_cursor_get(s->c, p, BLOCK, &h, &got, err)) return -1;
        if (got < BLOCK)
            *what = "the end of the file";
        else if (all_zero(h, BLOCK))
            *what = "an empty block";
        else if (header_ok(h))
            *what = "the next valid header";
        else if (p < s->limit)
            continue;
        else
            *what = "the end of the item";
        *stop = p < s->limit ? p : s->limit;
        if (got < BLOCK && p < s->limit) *stop = p + got;
        return 0;
    }
}

static void set_name(tar_entry *e, const char *p, size_t n) {
    twn_free(e->name);
    if (n > NAME_MAX_LEN) {
        if (!e->fault) {
            e->fault = TWN_SRC_BAD_TAR;
            snprintf(e->msg, sizeof e->msg, "member name is %zu bytes; the limit is %u", n,
                     NAME_MAX_LEN);
        }
        n = NAME_MAX_LEN;
    }
    e->name = twn_strndup(p, n);
    e->name_len = strlen(e->name);
}

/* pax records "LEN key=value\n"; takes path and size. */
static int parse_pax(const uint8_t *p, size_t n, char **path, size_t *path_len, int64_t *size,
                     char *msg) {
    size_t i = 0;
    while (i < n) {
        size_t len = 0, j = i;
        while (j < n && p[j] >= '0' && p[j] <= '9' && len < n) len = len * 10 + (p[j++] - '0');
        if (j == i || j >= n || p[j] != ' ' || len < (j - i) + 3 || len > n - i ||
            p[i + len - 1] != '\n') {
            snprintf(msg, MSG_MAX, "malformed pax record at offset %zu of the pax header", i);
            return -1;
        }
        const uint8_t *kv = p + j + 1, *end = p + i + len - 1;
        const uint8_t *eq = memchr(kv, '=', (size_t)(end - kv));
        if (!eq) {
            snprintf(msg, MSG_MAX, "pax record at offset %zu has no '='", i);
            return -1;
        }
        size_t kl = (size_t)(eq - kv), vl = (size_t)(end - eq - 1);
        if (kl == 4 && !memcmp(kv, "path", 4)) {
            if (memchr(eq + 1, 0, vl)) {
                snprintf(msg, MSG_MAX, "pax path contains a NUL byte");
                return -1;
            }
            twn_free(*path);
            *path = twn_strndup((const char *)eq + 1, vl);
            *path_len = vl;
        } else if (kl == 4 && !memcmp(kv, "size", 4)) {
            uint64_t v = 0;
            if (!vl || vl > 18) {
                snprintf(msg, MSG_MAX, "pax size has %zu digits; expected 1..18", vl);
                return -1;
            }
            for (size_t k = 0; k < vl; k++) {
                if (eq[1 + k] < '0' || eq[1 + k] > '9') {
                    snprintf(msg, MSG_MAX, "pax size is not a decimal number");
                    return -1;
                }
                v = v * 10 + (uint64_t)(eq[1 + k] - '0');
            }
            *size = (int64_t)v;
        }
        i += len;
    }
    return 0;
}

static void bad(tar_entry *e, twn_src_fault f, uint64_t start, uint64_t end, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void bad(tar_entry *e, twn_src_fault f, uint64_t start, uint64_t end, const char *fmt, ...) {
    entry_free(e);
    e->kind = E_BAD;
    e->fault = f;
    e->start = start;
    e->end = end;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
}

static int is_regular(uint8_t t) {
    return t == '0' || t == 0 || t == '7';
}
static int has_no_data(uint8_t t) {
    return t >= '1' && t <= '6';
}

/* Parses the entry at `off` into *e.  -1 only on I/O errors. */
static int parse_entry(tar_scan *s, uint64_t off, tar_entry *e, twn_err *err) {
    memset(e, 0, sizeof *e);
    const uint64_t bsize = s->b->size;
    char *longname = NULL, *paxpath = NULL;
    size_t longname_len = 0, paxpath_len = 0;
    int64_t paxsize = -1;
    int prefixed = 0, rc = 0;
    uint64_t pos = off;
    e->start = off;
    for (;;) {
        if (pos >= s->limit) {
            if (prefixed)
                bad(e, TWN_SRC_BAD_TAR, e->start, pos,
                    "the long-name/pax header at byte %llu is not followed by a member",
                    (unsigned long long)e->start);
            else
                e->kind = E_END, e->start = e->end = pos;
            goto out;
        }
        const uint8_t *h;
        size_t got;
        if ((rc = twn_src_cursor_get(s->c, pos, BLOCK, &h, &got, err))) goto out;
        if (got < BLOCK) {
            if (all_zero(h, got) && !prefixed) {
                e->kind = E_END;
                e->start = e->end = pos + got;
            } else {
                bad(e, TWN_SRC_TRUNCATED, e->start, pos + got,
                    "the file ends inside the tar header at byte %llu (%zu of 512 bytes)",
                    (unsigned long long)pos, got);
            }
            goto out;
        }
        if (all_zero(h, BLOCK)) {
            if (prefixed) {
                bad(e, TWN_SRC_BAD_TAR, e->start, pos + BLOCK,
                    "the long-name/pax header at byte %llu is followed by an empty block",
                    (unsigned long long)e->start);
                goto out;
            }
            pos += BLOCK;
            e->start = pos;
            continue;
        }
        uint64_t stored, usum, size, stop;
        int64_t ssum;
        const char *what = "";
        if (parse_octal(h + 148, 8, &stored)) {
            char q[64];
            twn_src_quote(h + 148, 8, q, sizeof q);
            if ((rc = resync(s, pos + BLOCK, &stop, &what, err))) goto out;
            bad(e, TWN_SRC_BAD_TAR, e->start, stop,
                "bad tar header at byte %llu: the checksum field \"%s\" is not octal; skipped "
                "%llu bytes to %s",
                (unsigned long long)pos, q, (unsigned long long)(stop - e->start), what);
            goto out;
        }
        header_sums(h, &usum, &ssum);
        if (stored != usum && (int64_t)stored != ssum) {
            if ((rc = resync(s, pos + BLOCK, &stop, &what, err))) goto out;
            bad(e, TWN_SRC_BAD_TAR, e->start, stop,
                "bad tar header checksum at byte %llu: the field says 0%llo, the header sums to "
                "0%llo (octal); skipped %llu bytes to %s",
                (unsigned long long)pos, (unsigned long long)stored, (unsigned long long)usum,
                (unsigned long long)(stop - e->start), what);
            goto out;
        }
        if (parse_size(h + 124, &size)) {
            char q[64];
            twn_src_quote(h + 124, 12, q, sizeof q);
            if ((rc = resync(s, pos + BLOCK, &stop, &what, err))) goto out;
            bad(e, TWN_SRC_BAD_TAR, e->start, stop,
                "bad tar header at byte %llu: the size field \"%s\" is not a number; skipped "
                "%llu bytes to %s",
                (unsigned long long)pos, q, (unsigned long long)(stop - e->start), what);
            goto out;
        }
        uint8_t type = h[156];
        uint64_t data_off = pos + BLOCK;
        int fits = data_off <= bsize && size <= bsize - data_off;
        if (type == 'L' || type == 'K' || type == 'x') {
            if (!fits) {
                bad(e, TWN_SRC_TRUNCATED, e->start, bsize,
                    "the file ends inside the '%c' header data at byte %llu (%llu bytes declared)",
                    type, (unsigned long long)data_off, (unsigned long long)size);
                goto out;
            }
            uint64_t next = data_off + pad_block(size);
            if (next > bsize) next = bsize;
            if (size > META_MAX) {
                bad(e, TWN_SRC_BAD_TAR, e->start, next,
                    "the '%c' header at byte %llu carries %llu bytes; the limit is %u", type,
                    (unsigned long long)pos, (unsigned long long)size, META_MAX);
                goto out;
            }
            if (type != 'K') {
                uint8_t *meta = twn_malloc(size ? (size_t)size : 1);
                if ((rc = twn_blob_read_exact(s->b, data_off, meta, (size_t)size, err))) {
                    twn_free(meta);
                    goto out;
                }
                if (type == 'L') {
                    twn_free(longname);
                    longname_len = strnlen((char *)meta, (size_t)size);
                    longname = twn_strndup((char *)meta, longname_len);
                } else if (parse_pax(meta, (size_t)size, &paxpath, &paxpath_len, &paxsize,
                                     e->msg)) {
                    e->fault = TWN_SRC_BAD_TAR;
                }
                twn_free(meta);
            }
            prefixed = 1;
            pos = next;
            continue;
        }
        /* The member itself. */
        if (paxsize >= 0) size = (uint64_t)paxsize;
        if (paxpath)
            set_name(e, paxpath, paxpath_len);
        else if (longname)
            set_name(e, longname, longname_len);
        else {
            char nb[256 + 2];
            size_t nl = strnlen((const char *)h, 100), w = 0;
            if (!memcmp(h + 257, "ustar\0", 6) && h[345]) {
                size_t pl = strnlen((const char *)h + 345, 155);
                memcpy(nb, h + 345, pl);
                nb[pl] = '/';
                w = pl + 1;
            }
            memcpy(nb + w, h, nl);
            set_name(e, nb, w + nl);
        }
        uint64_t dsize = has_no_data(type) ? 0 : size;
        fits = data_off <= bsize && dsize <= bsize - data_off;
        e->data_off = data_off;
        e->size = dsize;
        if (!fits) {
            e->truncated = 1;
            e->end = bsize;
            e->fault = TWN_SRC_TRUNCATED;
            snprintf(e->msg, sizeof e->msg,
                     "member '%.200s' at byte %llu declares %llu bytes but the file ends after "
                     "%llu",
                     e->name, (unsigned long long)pos, (unsigned long long)dsize,
                     (unsigned long long)(bsize > data_off ? bsize - data_off : 0));
        } else {
            e->end = data_off + pad_block(dsize);
            if (e->end > bsize) e->end = bsize; /* final padding missing: the data is whole */
        }
        size_t nl = e->name_len;
        e->kind = is_regular(type) && nl && e->name[nl - 1] != '/' ? E_FILE : E_SKIP;
        if (e->kind == E_SKIP && e->truncated) {
            bad(e, TWN_SRC_TRUNCATED, e->start, bsize,
                "the file ends inside the data of entry at byte %llu", (unsigned long long)pos);
        }
        goto out;
    }
out:
    twn_free(longname);
    twn_free(paxpath);
    return rc;
}

/* WebDataset key: the name up to the first '.' of its base name; 0 when there is none. */
static int wds_key(const char *name, size_t n, size_t *key_len, const char **ext) {
    const char *base = name;
    for (size_t i = 0; i < n; i++)
        if (name[i] == '/') base = name + i + 1;
    const char *dot = memchr(base, '.', (size_t)(name + n - base));
    if (!dot || dot == base) return 0;
    *key_len = (size_t)(dot - name);
    *ext = dot + 1;
    return 1;
}

// ------------------------------------------------------------------------------------------------
// Groups

static void group_add(tar_group *g, tar_entry *e, int keep) {
    g->members++;
    if (!keep || g->n >= GROUP_MAX_ENT) {
        entry_free(e);
        return;
    }
    if (g->n == g->cap) {
        g->cap = g->cap ? 2 * g->cap : 8;
        g->e = twn_realloc(g->e, g->cap * sizeof *g->e);
    }
    g->e[g->n++] = *e;
}

/* 1: a group in *g; 0: no more; -1: I/O. */
static int next_group(tar_scan *s, tar_group *g, twn_err *err) {
    group_reset(g);
    int open = 0;
    uint64_t prefix = UINT64_MAX;
    for (;;) {
        tar_entry e;
        if (s->has_la) {
            e = s->la;
            s->has_la = 0;
        } else if (parse_entry(s, s->pos, &e, err)) {
            entry_free(&e);
            return -1;
        }
        size_t kl = 0;
        const char *ext = NULL;
        int keyed = e.kind == E_FILE && wds_key(e.name, e.name_len, &kl, &ext);
        if (e.kind == E_END) {
            s->pos = e.end;
            return open;
        }
        if (e.kind == E_BAD) {
            if (open) {
                s->la = e;
                s->has_la = 1;
                return 1;
            }
            g->start = prefix != UINT64_MAX ? prefix : e.start;
            g->end = e.end;
            g->fault = e.fault;
            memcpy(g->msg, e.msg, sizeof g->msg);
            s->pos = e.end;
            entry_free(&e);
            return 1;
        }
        if (!keyed) { /* directories, links, files without a key: carried along */
            if (!open && prefix == UINT64_MAX) prefix = e.start;
            if (open) g->end = e.end;
            s->pos = e.end;
            entry_free(&e);
            continue;
        }
        if (open && (kl != g->key_len || memcmp(e.name, g->key, kl))) {
            s->la = e;
            s->has_la = 1;
            return 1;
        }
        if (!open) {
            open = 1;
            g->start = prefix != UINT64_MAX ? prefix : e.start;
            g->key = twn_strndup(e.name, kl);
            g->key_len = kl;
        }
        g->end = e.end;
        s->pos = e.end;
        int trunc = e.truncated;
        group_add(g, &e, s->keep);
        if (trunc) return 1; /* nothing can follow */
    }
}

// ------------------------------------------------------------------------------------------------
// Group -> item

static const char *ext_of(const tar_entry *e) {
    size_t kl;
    const char *ext = "";
    wds_key(e->name, e->name_len, &kl, &ext);
    return ext;
}

static int is_image_ext(const char *ext) {
    const char *last = strrchr(ext, '.');
    last = last ? last + 1 : ext;
    return !strcasecmp(last, "jpg") || !strcasecmp(last, "jpeg") || !strcasecmp(last, "png") ||
           !strcasecmp(last, "webp");
}

static uint8_t *load(twn_blob *b, const tar_entry *e, twn_err *err) {
    uint8_t *d = twn_malloc(e->size + 1);
    if (twn_blob_read_exact(b, e->data_off, d, (size_t)e->size, err)) {
        twn_free(d);
        return NULL;
    }
    d[e->size] = 0;
    return d;
}

static int check_id(twn_src_item *it, const char *path, const char *what, const char *s, size_t n,
                    const twn_src_opts *o) {
    char q[96];
    if (!n)
        return twn_src_bad(it, TWN_SRC_BAD_ID, path, "%s is empty; expected 1..%zu bytes", what,
                           o->max_id_bytes);
    if (n > o->max_id_bytes) {
        twn_src_quote(s, n, q, 40);
        return twn_src_bad(it, TWN_SRC_BAD_ID, path, "%s \"%s\" is %zu bytes; the limit is %zu",
                           what, q, n, o->max_id_bytes);
    }
    return 0;
}

/* Fills `it` (index/offset/length/key set here) from a group.  -1 only on I/O. */
static int group_to_item(twn_blob *b, const char *path, const tar_group *g, const twn_src_opts *o,
                         twn_src_item *it, twn_err *err) {
    it->offset = g->start;
    it->length = g->end - g->start;
    it->line = 0;
    if (!g->key) {
        twn_src_bad(it, g->fault, path, "%s", g->msg);
        return 0;
    }
    long bad_at = twn_src_utf8_invalid_at((const uint8_t *)g->key, g->key_len);
    if (bad_at >= 0) {
        char q[96];
        twn_src_quote(g->key, g->key_len, q, sizeof q);
        twn_src_bad(it, TWN_SRC_BAD_UTF8, path,
                    "the key \"%s\" is not valid UTF-8 at byte %ld; expected UTF-8 names", q,
                    bad_at);
        return 0;
    }
    it->key = twn_strndup(g->key, g->key_len);
    for (size_t i = 0; i < g->n; i++)
        if (g->e[i].fault) {
            twn_src_bad(it, g->e[i].fault, path, "%s", g->e[i].msg);
            return 0;
        }
    if (g->members > GROUP_MAX_ENT) {
        twn_src_bad(it, TWN_SRC_TOO_BIG, path, "the item has %zu members; the limit is %u",
                    g->members, GROUP_MAX_ENT);
        return 0;
    }
    if (it->length > o->max_item_bytes) {
        twn_src_bad(it, TWN_SRC_TOO_BIG, path, "the item is %llu bytes; the limit is %zu",
                    (unsigned long long)it->length, o->max_item_bytes);
        return 0;
    }
    const tar_entry *txt = NULL, *js = NULL;
    size_t n_img = 0;
    for (size_t i = 0; i < g->n; i++) {
        const tar_entry *e = &g->e[i];
        const char *ext = ext_of(e);
        const tar_entry **slot = !strcasecmp(ext, "txt")    ? &txt
                                 : !strcasecmp(ext, "json") ? &js
                                                            : NULL;
        if (slot) {
            if (*slot) {
                twn_src_bad(it, TWN_SRC_BAD_FIELD, path,
                            "member '%s' appears twice; expected one .%s per item", e->name, ext);
                return 0;
            }
            *slot = e;
        }
        for (size_t j = 0; j < i; j++)
            if (!strcmp(g->e[j].name, e->name)) {
                twn_src_bad(it, TWN_SRC_BAD_FIELD, path,
                            "member '%s' appears twice; expected unique member names", e->name);
                return 0;
            }
        if (is_image_ext(ext)) n_img++;
    }
    if (txt) {
        uint8_t *d = load(b, txt, err);
        if (!d) return -1;
        long at = twn_src_utf8_invalid_at(d, (size_t)txt->size);
        const uint8_t *nul = memchr(d, 0, (size_t)txt->size);
        if (at >= 0 || nul) {
            twn_src_bad(it, TWN_SRC_BAD_UTF8, path,
                        at >= 0 ? "member '%s' is not valid UTF-8 at byte %ld (0x%02x); expected "
                                  "UTF-8 text"
                                : "member '%s' contains a NUL byte at byte %ld (0x%02x); expected "
                                  "text",
                        txt->name, at >= 0 ? at : (long)(nul - d), at >= 0 ? d[at] : 0);
            twn_free(d);
            return 0;
        }
        it->text = (char *)d;
    }
    const char *id = it->key;
    size_t id_len = g->key_len;
    const char *id_what = "the key";
    char num[32];
    json_t *obj = NULL;
    if (js) {
        uint8_t *d = load(b, js, err);
        if (!d) return -1;
        json_error_t je;
        obj = json_loadb((const char *)d, (size_t)js->size, JSON_REJECT_DUPLICATES, &je);
        twn_free(d);
        if (!obj) {
            twn_src_bad(it, TWN_SRC_BAD_JSON, path,
                        "member '%s': invalid JSON at line %d column %d: %s", js->name, je.line,
                        je.column, je.text);
            return 0;
        }
        if (!json_is_object(obj)) {
            twn_src_bad(it, TWN_SRC_BAD_JSON, path, "member '%s' is %s; expected a JSON object",
                        js->name, twn_src_json_kind(obj));
            goto out;
        }
        json_t *v = json_object_get(obj, "id");
        if (v && !json_is_null(v)) {
            id_what = "\"id\"";
            if (json_is_string(v)) {
                id = json_string_value(v);
                id_len = json_string_length(v);
                if (memchr(id, 0, id_len)) {
                    twn_src_bad(it, TWN_SRC_BAD_ID, path, "member '%s': \"id\" contains a NUL",
                                js->name);
                    goto out;
                }
            } else if (json_is_integer(v)) {
                id_len =
                    (size_t)snprintf(num, sizeof num, "%lld", (long long)json_integer_value(v));
                id = num;
            } else {
                twn_src_bad(it, TWN_SRC_BAD_ID, path,
                            "member '%s': \"id\" is %s; expected a string or an integer", js->name,
                            twn_src_json_kind(v));
                goto out;
            }
        }
        const char *fields[2] = {"instruction", "text"};
        for (int f = 0; f < 2; f++) {
            json_t *s = json_object_get(obj, fields[f]);
            if (!s || json_is_null(s)) continue;
            if (!json_is_string(s)) {
                twn_src_bad(it, TWN_SRC_BAD_FIELD, path,
                            "member '%s': \"%s\" is %s; expected a string or null", js->name,
                            fields[f], twn_src_json_kind(s));
                goto out;
            }
            if (f == 0)
                it->instruction = twn_strndup(json_string_value(s), json_string_length(s));
            else if (!it->text)
                it->text = twn_strndup(json_string_value(s), json_string_length(s));
        }
    }
    if (check_id(it, path, id_what, id, id_len, o)) goto out;
    it->id = twn_strndup(id, id_len);
    if (n_img) it->images = twn_calloc(n_img, sizeof *it->images);
    for (size_t i = 0; i < g->n; i++) {
        const tar_entry *e = &g->e[i];
        if (!is_image_ext(ext_of(e))) continue;
        uint8_t *d = load(b, e, err);
        if (!d) {
            json_decref(obj);
            return -1;
        }
        twn_src_image *im = &it->images[it->n_images++];
        im->member = twn_strdup(e->name);
        im->data = d;
        im->size = (size_t)e->size;
    }
    if ((!it->text || !it->text[0]) && !it->n_images)
        twn_src_bad(it, TWN_SRC_EMPTY, path,
                    "the item has no text (.txt) and no image (.jpg/.png/.webp); expected at "
                    "least one");
out:
    json_decref(obj);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Planner

int twn_src_tar_plan(twn_blob *b, const char *path, uint64_t per_unit, uint64_t *next_id,
                     twn_src_unit_fn fn, void *user, twn_err *err) {
    twn_src_cursor c;
    twn_src_cursor_init(&c, b, b->size);
    tar_scan s = {.b = b, .c = &c, .pos = 0, .limit = b->size, .keep = 0};
    tar_group g = {0};
    twn_src_unit u = {.format = TWN_SRC_TAR, .path = (char *)path};
    int open = 0, rc;
    uint64_t index = 0, last_end = 0;
    while ((rc = next_group(&s, &g, err)) == 1) {
        if (open && u.count == per_unit) {
            u.end = g.start;
            if ((rc = fn(&u, user, err))) goto out;
            open = 0;
        }
        if (!open) {
            u.id = (*next_id)++;
            u.start = g.start;
            u.first_index = index;
            u.count = 0;
            open = 1;
        }
        u.count++;
        index++;
        last_end = g.end;
    }
    if (rc == 0 && open) {
        u.end = last_end;
        rc = fn(&u, user, err);
    }
out:
    scan_free(&s);
    group_free(&g);
    twn_src_cursor_free(&c);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Readers

int twn_src_tar_open(twn_src_reader *r, twn_err *err) {
    (void)err;
    r->tar = twn_calloc(1, sizeof *r->tar);
    r->tar->s = (tar_scan){.b = r->b, .c = &r->cur, .pos = r->pos, .limit = r->limit, .keep = 1};
    return 0;
}

void twn_src_tar_close(twn_src_reader *r) {
    if (!r->tar) return;
    scan_free(&r->tar->s);
    group_free(&r->tar->g);
    twn_free(r->tar);
    r->tar = NULL;
}

int twn_src_tar_next(twn_src_reader *r, twn_src_item *it, twn_err *err) {
    tar_group *g = &r->tar->g;
    int rc = next_group(&r->tar->s, g, err);
    if (rc < 0) return -1;
    if (rc == 0) {
        if (r->produced != r->u.count)
            return twn_err_set(err,
                               "%s: unit %llu has %llu of its %llu items in bytes [%llu, %llu) "
                               "(the file is %llu bytes); the file changed since planning",
                               r->u.path, (unsigned long long)r->u.id,
                               (unsigned long long)r->produced, (unsigned long long)r->u.count,
                               (unsigned long long)r->u.start, (unsigned long long)r->u.end,
                               (unsigned long long)r->b->size);
        return 0;
    }
    if (r->produced == r->u.count || g->end > r->limit)
        return twn_err_set(err,
                           "%s: unit %llu: an item at bytes [%llu, %llu) does not fit its %llu "
                           "items in [%llu, %llu); the file changed since planning",
                           r->u.path, (unsigned long long)r->u.id, (unsigned long long)g->start,
                           (unsigned long long)g->end, (unsigned long long)r->u.count,
                           (unsigned long long)r->u.start, (unsigned long long)r->u.end);
    r->produced++;
    it->index = r->index++;
    return group_to_item(r->b, r->u.path, g, &r->o, it, err) ? -1 : 1;
}

int twn_src_tar_read_ref(twn_blob *b, const twn_src_ref *ref, const twn_src_opts *o,
                         twn_src_item *it, twn_err *err) {
    it->index = ref->index;
    it->offset = ref->offset;
    it->length = ref->length;
    if (ref->offset > b->size || ref->length > b->size - ref->offset || !ref->length) {
        twn_src_bad(it, TWN_SRC_STALE_REF, ref->path,
                    "the ref [%llu, +%llu) is not inside the file (%llu bytes)",
                    (unsigned long long)ref->offset, (unsigned long long)ref->length,
                    (unsigned long long)b->size);
        return 0;
    }
    twn_src_cursor c;
    twn_src_cursor_init(&c, b, ref->length + 1024);
    tar_scan s = {
        .b = b, .c = &c, .pos = ref->offset, .limit = ref->offset + ref->length, .keep = 1};
    tar_group g = {0};
    int rc = next_group(&s, &g, err);
    if (rc == 1 && (g.start != ref->offset || g.end != ref->offset + ref->length)) {
        twn_src_bad(it, TWN_SRC_STALE_REF, ref->path,
                    "the ref [%llu, +%llu) does not match the item there (bytes [%llu, %llu)); "
                    "the file changed since planning",
                    (unsigned long long)ref->offset, (unsigned long long)ref->length,
                    (unsigned long long)g.start, (unsigned long long)g.end);
    } else if (rc == 0) {
        twn_src_bad(it, TWN_SRC_STALE_REF, ref->path,
                    "the ref [%llu, +%llu) holds no item; the file changed since planning",
                    (unsigned long long)ref->offset, (unsigned long long)ref->length);
    } else if (rc == 1) {
        rc = group_to_item(b, ref->path, &g, o, it, err);
    }
    scan_free(&s);
    group_free(&g);
    twn_src_cursor_free(&c);
    return rc < 0 ? -1 : 0;
}
