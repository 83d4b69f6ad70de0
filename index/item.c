/* item.c — validation of incoming items (see item.h). */
#include "index/item.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

const char *twn_item_id_repr(const char *id, size_t len, char *buf, size_t cap) {
    size_t k = 0;
    for (size_t i = 0; i < len && k + 8 < cap; i++) {
        unsigned char c = (unsigned char)id[i];
        if (c == '"' || c == '\\') {
            buf[k++] = '\\';
            buf[k++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            k += (size_t)snprintf(buf + k, cap - k, "\\x%02x", c);
        } else {
            buf[k++] = (char)c;
        }
        if (k + 8 >= cap && i + 1 < len) {
            memcpy(buf + k, "...", 3);
            k += 3;
            break;
        }
    }
    buf[k] = 0;
    return buf;
}

/* Offset of the first byte that is not well-formed UTF-8 (RFC 3629: no overlongs, no
 * surrogates, nothing above U+10FFFF), or len when all is well. */
static size_t utf8_bad_offset(const unsigned char *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        unsigned char c = s[i];
        size_t n;
        unsigned lo = 0x80, hi = 0xbf;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf)
            n = 1;
        else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            if (c == 0xe0) lo = 0xa0;
            if (c == 0xed) hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            if (c == 0xf0) lo = 0x90;
            if (c == 0xf4) hi = 0x8f;
        } else
            return i;
        if (i + n >= len) return i; /* truncated sequence */
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k <= n; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xbf) return i;
        i += n + 1;
    }
    return len;
}

int twn_item_check(const twn_index_item *it, int dim, twn_err *err) {
    size_t len = it->id ? (it->id_len ? it->id_len : strlen(it->id)) : 0;
    char repr[96];
    if (!it->id || len == 0)
        return twn_err_set(err, "item has an empty id; expected 1..%d bytes", TWN_ITEM_ID_MAX);
    twn_item_id_repr(it->id, len, repr, sizeof repr);
    if (len > TWN_ITEM_ID_MAX)
        return twn_err_set(err, "item \"%s\": id is %zu bytes, more than the %d allowed", repr, len,
                           TWN_ITEM_ID_MAX);
    if (memchr(it->id, 0, len))
        return twn_err_set(err, "item \"%s\": id contains a NUL byte at offset %zu", repr,
                           (size_t)((const char *)memchr(it->id, 0, len) - it->id));
    size_t bad = utf8_bad_offset((const unsigned char *)it->id, len);
    if (bad < len)
        return twn_err_set(err, "item \"%s\": id is not valid UTF-8 (byte 0x%02x at offset %zu)",
                           repr, (unsigned char)it->id[bad], bad);
    if (it->route >= TWN_ROUTE_COUNT)
        return twn_err_set(err, "item \"%s\": route %u is not 0 (easy) or 1 (hard)", repr,
                           (unsigned)it->route);
    if (!isnan(it->p_think) && !(it->p_think >= 0.0f && it->p_think <= 1.0f))
        return twn_err_set(err, "item \"%s\": p_think %g is outside [0, 1]", repr,
                           (double)it->p_think);
    if (!it->vec) return twn_err_set(err, "item \"%s\": no vector", repr);
    for (int i = 0; i < dim; i++)
        if (!isfinite(it->vec[i]))
            return twn_err_set(err,
                               "item \"%s\": vector component %d is %g; expected a finite value",
                               repr, i, (double)it->vec[i]);
    return 0;
}
