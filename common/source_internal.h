/* source_internal.h — what source.c, source_jsonl.c and source_tar.c share: a buffered cursor
 * over a blob, the UTF-8 check, the bad-record helper and the per-format hooks. */
#ifndef TWN_COMMON_SOURCE_INTERNAL_H
#define TWN_COMMON_SOURCE_INTERNAL_H

#include <jansson.h>

#include "common/source.h"

#define TWN_SRC_CURSOR_BYTES (256u << 10)

/* A read-through window over a blob: most reads (lines, tar headers) are small and sequential,
 * so they are served from one buffer refilled with large reads. */
typedef struct twn_src_cursor {
    twn_blob *b;
    uint8_t *buf;
    size_t cap;
    uint64_t off; /* blob offset of buf[0] */
    size_t len;   /* valid bytes in buf */
} twn_src_cursor;

/* The window is about `span` bytes (the range the caller will walk), clamped to 4 KiB..256 KiB,
 * so reading one small item does not cost a 256 KiB buffer. */
void twn_src_cursor_init(twn_src_cursor *c, twn_blob *b, uint64_t span);
void twn_src_cursor_free(twn_src_cursor *c);
/* Makes [off, off+n) available at *p (n <= c->cap); *got < n only at the end of the blob. */
int twn_src_cursor_get(twn_src_cursor *c, uint64_t off, size_t n, const uint8_t **p, size_t *got,
                       twn_err *err);
/* Whatever is buffered from `off` on (at most n bytes, at least 1 unless off is at the end),
 * refilling only when off is outside the window: for scans that take bytes as they come. */
int twn_src_cursor_peek(twn_src_cursor *c, uint64_t off, size_t n, const uint8_t **p, size_t *got,
                        twn_err *err);
/* Reads exactly n bytes at off into buf; fewer is an error naming the blob. */
int twn_blob_read_exact(twn_blob *b, uint64_t off, void *buf, size_t n, twn_err *err);

/* Index of the first byte that is not part of valid UTF-8 (no overlongs, surrogates or code
 * points above U+10FFFF), or -1 when all of s[0..n) is valid. */
long twn_src_utf8_invalid_at(const uint8_t *s, size_t n);

/* Marks the item bad: fault + "<prefix>: <message>", where the prefix names the file and the
 * line (JSONL) or item/byte (tar).  Returns -1. */
int twn_src_bad(twn_src_item *it, twn_src_fault fault, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* "a JSON object", "a JSON string", ... for messages. */
const char *twn_src_json_kind(const json_t *v);

/* A copy of s[0..n) with a printable, shortened rendering for messages ("ab\xff..."). */
void twn_src_quote(const void *s, size_t n, char *out, size_t cap);

/* Per-format reader state behind twn_src_reader. */
typedef struct twn_src_tar_state twn_src_tar_state;

struct twn_src_reader {
    twn_blob *b;
    twn_src_unit u; /* u.path owned */
    twn_src_opts o;
    twn_src_cursor cur;
    uint64_t pos;      /* next byte to look at */
    uint64_t limit;    /* min(unit end, blob size) */
    uint64_t index;    /* index of the next item */
    uint64_t line;     /* JSONL: number of the line at pos */
    uint64_t produced; /* items returned */
    twn_src_tar_state *tar;
};

int twn_src_jsonl_plan(twn_blob *b, const char *path, uint64_t per_unit, uint64_t *next_id,
                       twn_src_unit_fn fn, void *user, twn_err *err);
int twn_src_jsonl_next(twn_src_reader *r, twn_src_item *it, twn_err *err);
int twn_src_jsonl_read_ref(twn_blob *b, const twn_src_ref *ref, const twn_src_opts *o,
                           twn_src_item *it, twn_err *err);

int twn_src_tar_plan(twn_blob *b, const char *path, uint64_t per_unit, uint64_t *next_id,
                     twn_src_unit_fn fn, void *user, twn_err *err);
int twn_src_tar_open(twn_src_reader *r, twn_err *err);
int twn_src_tar_next(twn_src_reader *r, twn_src_item *it, twn_err *err);
void twn_src_tar_close(twn_src_reader *r);
int twn_src_tar_read_ref(twn_blob *b, const twn_src_ref *ref, const twn_src_opts *o,
                         twn_src_item *it, twn_err *err);

#endif
