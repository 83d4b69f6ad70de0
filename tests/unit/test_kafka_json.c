/* test_kafka_json.c — Kafka JSON records through simdjson (common/json_fast.cpp, used by
 * common/source_kafka.c): which records it reads by itself and which it leaves to jansson, the
 * values it decodes (escapes, surrogate pairs, integer ids at the edges of long long), and that
 * both ways give the same item and the same message, byte for byte, for valid and malformed
 * records.  One parser serves every case, as a reader's serves its messages. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/kafka_internal.h"
#include "tests/testutil.h"

static twn_json_fast *fast;

/* Parses v both ways, asserts they agree, and returns the simdjson path's item in *it. */
static int parse_both(const char *v, size_t n, const char *key, twn_src_item *it) {
    twn_src_item j = {0};
    twn_src_opts o = twn_src_opts_default();
    size_t kn = key ? strlen(key) : 0;
    int rs = twn_kafka_parse_ex(v, n, key, kn, TWN_KAFKA_JSON, "t", 1, 9, &o, 64, fast, it);
    int rj = twn_kafka_parse_ex(v, n, key, kn, TWN_KAFKA_JSON, "t", 1, 9, &o, 64, NULL, &j);
    assert_int_equal(rs, rj);
    assert_int_equal(it->fault, j.fault);
    assert_string_equal(it->err.msg, j.err.msg);
    if (it->id || j.id) assert_string_equal(it->id, j.id);
    if (it->text || j.text) assert_string_equal(it->text, j.text);
    if (it->instruction || j.instruction) assert_string_equal(it->instruction, j.instruction);
    assert_int_equal(it->n_images, j.n_images);
    for (size_t i = 0; i < it->n_images; i++) {
        if (it->images[i].path || j.images[i].path)
            assert_string_equal(it->images[i].path, j.images[i].path);
        assert_int_equal(it->images[i].size, j.images[i].size);
    }
    twn_src_item_clear(&j);
    return rs;
}

/* v (its strlen) goes to simdjson's path or not (`fast`), and both ways read it as the item
 * `id`: parse_both's item, which the caller checks further and clears. */
static void read_ok(const char *v, int fast_path, const char *id, twn_src_item *it) {
    assert_int_equal(twn_kafka_json_fast(v, strlen(v)), fast_path);
    assert_int_equal(parse_both(v, strlen(v), NULL, it), 0);
    assert_string_equal(it->id, id);
}

/* Case i's message starts with want; else both are shown and the test fails. */
static void expect_prefix(size_t i, const char *msg, const char *want) {
    if (strncmp(msg, want, strlen(want))) {
        fprintf(stderr, "case %zu: got  %s\n        want %s...\n", i, msg, want);
        fail();
    }
}

static void test_fast_records(void **state) {
    (void)state;
    twn_src_item it = {0};
    const char *v = "{\"id\": \"rec-1\", \"text\": \"a caption\", \"instruction\": \"describe\", "
                    "\"image\": [\"s3://b/x.jpg\", \"y.png\"], \"meta\": {\"w\": 640, \"h\": "
                    "4.8e2, \"tags\": [true, false, null, {}], \"note\": \"\"}}";
    read_ok(v, 1, "rec-1", &it);
    assert_string_equal(it.text, "a caption");
    assert_string_equal(it.instruction, "describe");
    assert_int_equal(it.n_images, 2);
    assert_string_equal(it.images[0].path, "s3://b/x.jpg");
    assert_string_equal(it.images[1].path, "y.png");
    twn_src_item_clear(&it);

    /* escapes: every short form, \\u in BMP, a surrogate pair, upper-case hex */
    v = "{\"id\": \"q\\\"\\\\\\/\", \"text\": \"a\\nb\\tc\\r\\b\\f \\u00e9\\u4E2D\\ud83d\\ude00\"}";
    read_ok(v, 1, "q\"\\/", &it);
    assert_string_equal(it.text, "a\nb\tc\r\b\f \xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80");
    twn_src_item_clear(&it);

    /* integer ids at the edges of long long, and jansson's integer -0 (simdjson: int64 0) */
    static const char *const ints[][2] = {
        {"{\"id\": -999999999999999999, \"text\": \"x\"}", "-999999999999999999"},
        {"{\"id\": 9223372036854775807, \"text\": \"x\"}", "9223372036854775807"},
        {"{\"id\": -9223372036854775808, \"text\": \"x\"}", "-9223372036854775808"},
        {"{\"id\": -0, \"text\": \"x\"}", "0"},
    };
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++) {
        read_ok(ints[i][0], 1, ints[i][1], &it);
        twn_src_item_clear(&it);
    }

    /* a key with an escape (compared decoded, as jansson does), a number near the double range,
     * "\\u0000" (a backslash, then text: no NUL) */
    v = "{\"\\u0069d\": \"esc-key\", \"text\": \"a\\\\u0000\", \"n\": 1.7976931348623157e308, "
        "\"s\": 1e-400}";
    read_ok(v, 1, "esc-key", &it);
    assert_string_equal(it.text, "a\\u0000");
    twn_src_item_clear(&it);

    /* whitespace of every kind around everything */
    v = " \t\r\n{ \"id\" :\t\"w\" ,\n\"text\"\r: \"x\" } \n";
    read_ok(v, 1, "w", &it);
    twn_src_item_clear(&it);

    /* the message key stands in for a missing id */
    v = "{\"text\": \"keyed\"}";
    assert_int_equal(parse_both(v, strlen(v), "k-7", &it), 0);
    assert_string_equal(it.id, "k-7");
    twn_src_item_clear(&it);
}

/* Nesting of 70 levels and 70 keys in one object (simdjson's path), and records past the kept
 * parser's 1 MiB (a parser of their own), each followed by a small one on the same parser. */
static void test_fast_sizes(void **state) {
    (void)state;
    twn_src_item it = {0};
    char big[2048];
    int n = snprintf(big, sizeof big, "{\"id\": \"d\", \"text\": \"x\", \"deep\": ");
    for (int i = 0; i < 70; i++) big[n++] = '[';
    for (int i = 0; i < 70; i++) big[n++] = ']';
    big[n++] = '}';
    assert_int_equal(twn_kafka_json_fast(big, (size_t)n), 1);
    assert_int_equal(parse_both(big, (size_t)n, NULL, &it), 0);
    assert_string_equal(it.id, "d");
    twn_src_item_clear(&it);
    n = snprintf(big, sizeof big, "{\"id\": \"m\", \"text\": \"x\"");
    for (int i = 0; i < 70; i++)
        n += snprintf(big + n, sizeof big - (size_t)n, ", \"k%d\": %d", i, i);
    big[n++] = '}';
    assert_int_equal(twn_kafka_json_fast(big, (size_t)n), 1);
    assert_int_equal(parse_both(big, (size_t)n, NULL, &it), 0);
    assert_string_equal(it.id, "m");
    twn_src_item_clear(&it);

    size_t text_n = (3u << 20) / 2; /* 1.5 MiB of text */
    char *huge = malloc(text_n + 64);
    int h = snprintf(huge, 64, "{\"id\": \"huge\", \"text\": \"");
    memset(huge + h, 'a', text_n);
    memcpy(huge + h + text_n, "\"}", 2);
    size_t huge_n = (size_t)h + text_n + 2;
    twn_src_opts o = twn_src_opts_default();
    o.max_item_bytes = 4u << 20;
    for (int round = 0; round < 2; round++) {
        assert_int_equal(twn_kafka_json_fast(huge, huge_n), 1);
        assert_int_equal(
            twn_kafka_parse_ex(huge, huge_n, NULL, 0, TWN_KAFKA_JSON, "t", 1, 9, &o, 64, fast, &it),
            0);
        assert_string_equal(it.id, "huge");
        assert_int_equal(strlen(it.text), text_n);
        assert_int_equal(it.text[text_n - 1], 'a');
        twn_src_item_clear(&it);
        const char *v = "{\"id\": \"small\", \"text\": \"after\"}";
        assert_int_equal(parse_both(v, strlen(v), NULL, &it), 0);
        assert_string_equal(it.id, "small");
        assert_string_equal(it.text, "after");
        twn_src_item_clear(&it);
    }
    free(huge);
}

/* Valid records the shim leaves to jansson: still read, the same way. */
static void test_left_to_jansson(void **state) {
    (void)state;
    twn_src_item it = {0};
    /* not an object: jansson names what it is */
    const char *v = "[{\"id\": \"r\", \"text\": \"x\"}]";
    assert_int_equal(twn_kafka_json_fast(v, strlen(v)), 0);
    assert_int_equal(parse_both(v, strlen(v), NULL, &it), -1);
    assert_string_equal(it.err.msg, "kafka t[1]@9: the value is a JSON array; expected a "
                                    "JSON object; value: '[{\"id\": \"r\", \"text\": \"x\"}]'");
    twn_src_item_clear(&it);
    /* nesting deeper than simdjson's 1024 levels, within jansson's 2048 */
    char *deep = malloc(4096);
    int n = snprintf(deep, 64, "{\"id\": \"d\", \"text\": \"x\", \"deep\": ");
    for (int i = 0; i < 1100; i++) deep[n++] = '[';
    for (int i = 0; i < 1100; i++) deep[n++] = ']';
    deep[n++] = '}';
    assert_int_equal(twn_kafka_json_fast(deep, (size_t)n), 0);
    assert_int_equal(parse_both(deep, (size_t)n, NULL, &it), 0);
    assert_string_equal(it.id, "d");
    twn_src_item_clear(&it);
    free(deep);
}

/* Malformed records: never read by simdjson's path, jansson's message as before. */
static void test_malformed(void **state) {
    (void)state;
    twn_src_item it = {0};
    static const struct {
        const char *v, *msg;
        twn_src_fault fault;
    } cases[] = {
        {"{\"id\": \"a\", \"text\": \"x\", \"m\": {\"k\": 1, \"k\": 2}}",
         "invalid JSON at column 42: duplicate object key near '\"k\"'", TWN_SRC_BAD_JSON},
        {"{\"id\": \"a\", \"text\": \"x\\u0000y\"}",
         "invalid JSON at column 30: \\u0000 is not allowed without JSON_ALLOW_NUL near "
         "'\"x\\u0000y\"'",
         TWN_SRC_BAD_JSON},
        {"{\"id\": \"a\", \"text\": \"\\ud800x\"}",
         "invalid JSON at column 29: invalid Unicode '\\uD800' near '\"\\ud800x\"'",
         TWN_SRC_BAD_JSON},
        {"{\"id\": \"a\", \"text\": \"tab\there\"}",
         "invalid JSON at column 24: control character 0x9 near '\"tab'", TWN_SRC_BAD_JSON},
        {"{\"id\": 9223372036854775808, \"text\": \"x\"}",
         "invalid JSON at column 26: too big integer near '9223372036854775808'", TWN_SRC_BAD_JSON},
        {"{\"id\": \"a\", \"text\": \"x\", \"m\": [{\"n\": 18446744073709551615}]}",
         "invalid JSON at column 57: too big integer near '18446744073709551615'",
         TWN_SRC_BAD_JSON},
        {"{\"id\": \"a\", \"text\": \"x\", \"n\": 18446744073709551616}",
         "invalid JSON at column 50: too big integer near '18446744073709551616'",
         TWN_SRC_BAD_JSON},
        {"{\"\\u0041\": 1, \"A\": 2, \"id\": \"a\", \"text\": \"x\"}",
         "invalid JSON at column 17: duplicate object key near '\"A\"'", TWN_SRC_BAD_JSON},
        {"{\"id\": \"a\", \"text\": \"x\", \"k0\": 0, \"k1\": 1, \"k2\": 2, \"k3\": 3, \"k4\": 4, "
         "\"k5\": 5, \"k6\": 6, \"k7\": 7, \"k8\": 8, \"k9\": 9, \"ka\": 10, \"kb\": 11, \"kc\": "
         "12, "
         "\"kd\": 13, \"ke\": 14, \"kf\": 15, \"k3\": 16}",
         "invalid JSON at column 179: duplicate object key near '\"k3\"'", TWN_SRC_BAD_JSON},
        {"{\"id\": \"a\", \"text\": \"\\udc00\"}",
         "invalid JSON at column 28: invalid Unicode '\\uDC00' near '\"\\udc00\"'",
         TWN_SRC_BAD_JSON},
        {"{\"id\": \"a\", \"text\": \"x\", \"n\": 1e309}",
         "invalid JSON at column 35: real number overflow near '1e309'", TWN_SRC_BAD_JSON},
        {"{\"id\": \"a\", \"text\": \"x\", \"l\": truex}",
         "invalid JSON at column 35: invalid token near 'truex'", TWN_SRC_BAD_JSON},
        {"{\"id\": 01, \"text\": \"x\"}", "invalid JSON at column 8: invalid token near '0'",
         TWN_SRC_BAD_JSON},
        {"{\"id\": \"a\", \"text\": \"x\",}",
         "invalid JSON at column 25: string or '}' expected near '}'", TWN_SRC_BAD_JSON},
        {"{\"id\": \"a\", \"text\": \"x\"} x",
         "invalid JSON at column 26: end of file expected near 'x'", TWN_SRC_BAD_JSON},
        {"{\"id\": \"a\", \"text\": \"caf\xe9\"}",
         "invalid UTF-8 at byte 24 (0xe9); expected a UTF-8 JSON object", TWN_SRC_BAD_UTF8},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *v = cases[i].v;
        assert_int_equal(twn_kafka_json_fast(v, strlen(v)), 0);
        assert_int_equal(parse_both(v, strlen(v), NULL, &it), -1);
        assert_int_equal(it.fault, cases[i].fault);
        char want[1024];
        snprintf(want, sizeof want, "kafka t[1]@9: %s", cases[i].msg);
        expect_prefix(i, it.err.msg, want);
        twn_src_item_clear(&it);
    }
}

/* Semantic errors found after simdjson read the record: the same messages as through jansson. */
static void test_fast_errors(void **state) {
    (void)state;
    twn_src_item it = {0};
    static const struct {
        const char *v, *msg;
    } cases[] = {
        {"{\"id\": 1.5, \"text\": \"x\"}",
         "\"id\" is a JSON number; expected a string or an integer"},
        {"{\"id\": [], \"text\": \"x\"}",
         "\"id\" is a JSON array; expected a string or an integer"},
        {"{\"id\": \"a\", \"text\": {}}", "\"text\" is a JSON object; expected a string or null"},
        {"{\"id\": \"a\", \"image\": true}",
         "\"image\" is a JSON boolean; expected a path/URI or a list of them"},
        {"{\"id\": \"a\", \"image\": [\"x\", 3]}",
         "\"image\"[1] is a JSON integer; expected a path, an s3:// URI or a data: URI"},
        {"{\"id\": \"a\", \"image_base64\": [\"QUJD\", null]}",
         "\"image_base64\"[1] is null; expected a base64 string"},
        {"{\"id\": \"a\", \"image\": \"data:image/png;base64,QUJ\"}",
         "\"image\" is 3 characters of base64; expected standard base64 with padding (a "
         "multiple of 4, not empty)"},
        {"{\"id\": \"\", \"text\": \"x\"}", "\"id\" is empty; expected 1..256 bytes"},
        {"{\"id\": \"a\", \"text\": \"\"}",
         "the item has neither \"text\" nor an image; expected at least one"},
        {"{\"text\": \"x\"}", "no \"id\" and no message key; expected a string or an integer id"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *v = cases[i].v;
        assert_int_equal(twn_kafka_json_fast(v, strlen(v)), 1);
        assert_int_equal(parse_both(v, strlen(v), NULL, &it), -1);
        char want[1024];
        snprintf(want, sizeof want, "kafka t[1]@9: %s; value: '", cases[i].msg);
        expect_prefix(i, it.err.msg, want);
        twn_src_item_clear(&it);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fast_records),    cmocka_unit_test(test_fast_sizes),
        cmocka_unit_test(test_left_to_jansson), cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_fast_errors),
    };
    fast = twn_json_fast_new();
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    twn_json_fast_free(fast);
    return rc;
}
