// json_fast.cpp — simdjson's DOM parser behind common/json_fast.h: the fields of a Kafka JSON
// record, or 0 for every record jansson would read differently (see the header for the list).
//
// simdjson validates the whole value (grammar, UTF-8, escapes, surrogate pairs, numbers, depth,
// trailing bytes) as it builds its tape; one walk over the tape then checks what jansson refuses
// and simdjson does not (duplicate keys, integers above INT64_MAX) and keeps the five fields.
// Strings point into the parser's own buffer, valid until the next parse.  Nothing here throws
// out of the C entry points or prints.
#include "common/json_fast.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <string_view>
#include <vector>

#include <simdjson.h>

namespace {

using simdjson::dom::element;
using simdjson::dom::element_type;

// Records up to this size are parsed by the kept parser (simdjson needs ~14 bytes of buffers per
// byte of input); larger ones get a parser of their own, dropped at the next call.
constexpr size_t KEEP_BYTES = 1u << 20;

} // namespace

struct twn_json_fast {
    simdjson::dom::parser parser{KEEP_BYTES};
    std::unique_ptr<simdjson::dom::parser> big;
    std::unique_ptr<char[]> buf; // the record with SIMDJSON_PADDING readable bytes after it
    size_t buf_cap = 0;
    std::vector<twn_json_val> elems;
    std::vector<std::string_view> keys; // the keys of the objects being walked, as a stack
};

namespace {

// What jansson would make of a value simdjson read (the kinds the item's messages name).
void val_of(element e, element_type t, twn_json_val *v) {
    *v = twn_json_val{};
    switch (t) {
    case element_type::OBJECT:
        v->kind = TWN_JSON_OBJECT;
        break;
    case element_type::ARRAY:
        v->kind = TWN_JSON_ARRAY;
        break;
    case element_type::STRING: {
        std::string_view s = e.get_string().value_unsafe();
        v->kind = TWN_JSON_STRING;
        v->s = s.data();
        v->n = s.size();
        break;
    }
    case element_type::INT64:
        v->kind = TWN_JSON_INTEGER;
        v->i = e.get_int64().value_unsafe();
        break;
    case element_type::UINT64: // never kept: walk() gives up on them first
    case element_type::DOUBLE:
        v->kind = TWN_JSON_REAL;
        break;
    case element_type::BOOL:
        v->kind = TWN_JSON_BOOL;
        break;
    case element_type::NULL_VALUE:
        v->kind = TWN_JSON_NULL;
        break;
    }
}

// The field of the top-level object a key names, or NULL.
twn_json_val *field_of(twn_json_fields *out, std::string_view k) {
    switch (k.size()) {
    case 2:
        return k == "id" ? &out->id : nullptr;
    case 4:
        return k == "text" ? &out->text : nullptr;
    case 5:
        return k == "image" ? &out->image : nullptr;
    case 11:
        return k == "instruction" ? &out->instruction : nullptr;
    case 12:
        return k == "image_base64" ? &out->image_base64 : nullptr;
    }
    return nullptr;
}

// True when keys[base, end) holds a key twice (jansson's JSON_REJECT_DUPLICATES).
bool has_duplicate(std::vector<std::string_view> &keys, size_t base) {
    size_t n = keys.size() - base;
    std::string_view *k = keys.data() + base;
    if (n <= 16) {
        for (size_t i = 1; i < n; i++)
            for (size_t j = 0; j < i; j++)
                if (k[i] == k[j]) return true;
        return false;
    }
    std::sort(k, k + n);
    return std::adjacent_find(k, k + n) != k + n;
}

bool walk(twn_json_fast *f, element e, element_type t);

// A value inside the record: only arrays and objects need a look (and integers above INT64_MAX,
// which jansson refuses: "too big integer").
inline bool value_ok(twn_json_fast *f, element e, element_type t) {
    return t == element_type::ARRAY || t == element_type::OBJECT ? walk(f, e, t)
                                                                 : t != element_type::UINT64;
}

// The keys of an object are pushed on f->keys while its values are walked (theirs are popped
// again), then checked for duplicates.  Recursion is bounded by simdjson's depth limit (1024).
bool walk(twn_json_fast *f, element e, element_type t) {
    if (t == element_type::ARRAY) {
        simdjson::dom::array a = e.get_array().value_unsafe(); // a copy: the result is a temporary
        for (element x : a)
            if (!value_ok(f, x, x.type())) return false;
        return true;
    }
    size_t base = f->keys.size();
    simdjson::dom::object o = e.get_object().value_unsafe();
    for (auto it = o.begin(), end = o.end(); it != end; ++it) {
        f->keys.emplace_back(it.key_c_str(), it.key_length());
        element v = it.value();
        if (!value_ok(f, v, v.type())) return false;
    }
    bool dup = has_duplicate(f->keys, base);
    f->keys.resize(base);
    return !dup;
}

// The record: walk() for its values and keys, and the five fields.
bool walk_record(twn_json_fast *f, simdjson::dom::object o, twn_json_fields *out) {
    for (auto it = o.begin(), end = o.end(); it != end; ++it) {
        std::string_view k(it.key_c_str(), it.key_length());
        f->keys.push_back(k);
        element e = it.value();
        element_type t = e.type();
        if (!value_ok(f, e, t)) return false;
        twn_json_val *v = field_of(out, k);
        if (!v) continue;
        val_of(e, t, v);
        if (t != element_type::ARRAY || (v != &out->image && v != &out->image_base64)) continue;
        v->first = f->elems.size();
        simdjson::dom::array a = e.get_array().value_unsafe();
        for (element x : a) {
            val_of(x, x.type(), &f->elems.emplace_back());
            v->count++;
        }
    }
    return !has_duplicate(f->keys, 0);
}

// "\u0000" in a string.  Escapes are taken two bytes at a time from the left, as a JSON reader
// does, so "\\u0000" (a backslash, then "u0000") is not one; outside strings a backslash is
// invalid.
bool has_nul_escape(const char *p, size_t n) {
    const char *end = p + n;
    for (const char *q = p; (q = (const char *)memchr(q, '\\', (size_t)(end - q)));) {
        if (end - q >= 6 && !memcmp(q + 1, "u0000", 5)) return true;
        q += 1 + (q + 1 < end); // skip the escaped character ("\\\\" is one escape)
    }
    return false;
}

int fields(twn_json_fast *f, const char *p, size_t n, twn_json_fields *out) {
    f->big.reset();
    if (has_nul_escape(p, n)) return 0;
    element root;
    if (n <= KEEP_BYTES) {
        if (n > f->buf_cap) {
            size_t cap = std::min(std::max(n, 2 * f->buf_cap), KEEP_BYTES);
            f->buf.reset(new char[cap + simdjson::SIMDJSON_PADDING]());
            f->buf_cap = cap;
        }
        memcpy(f->buf.get(), p, n);
        if (n > f->parser.capacity() &&
            f->parser.allocate(
                std::min(std::max({n, 2 * f->parser.capacity(), size_t(4096)}), KEEP_BYTES)))
            return 0;
        if (f->parser.parse(f->buf.get(), n, false).get(root)) return 0;
    } else {
        f->big.reset(new simdjson::dom::parser());
        if (f->big->parse(p, n, true).get(root)) return 0; // simdjson copies it, padded
    }
    if (root.type() != element_type::OBJECT) return 0; // jansson names what it is
    *out = twn_json_fields{};
    f->elems.clear();
    f->keys.clear();
    if (!walk_record(f, root.get_object().value_unsafe(), out)) return 0;
    out->elems = f->elems.data();
    out->n_elems = f->elems.size();
    return 1;
}

} // namespace

extern "C" twn_json_fast *twn_json_fast_new(void) {
    return new (std::nothrow) twn_json_fast();
}

extern "C" void twn_json_fast_free(twn_json_fast *f) {
    delete f;
}

extern "C" int twn_json_fast_fields(twn_json_fast *f, const char *p, size_t n,
                                    twn_json_fields *out) {
    if (!f || !p) return 0;
    try {
        return fields(f, p, n, out);
    } catch (...) { // std::bad_alloc from the vectors: jansson reports what it can
        return 0;
    }
}
