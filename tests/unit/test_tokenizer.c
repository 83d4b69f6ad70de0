/* test_tokenizer.c — engine/tokenizer against Hugging Face, id by id.
 *
 * The main check encodes a ~2.5 MB corpus of real text Debian ships (licenses, copyright files,
 * changelogs, gettext translations in ~100 languages, glibc locale data) plus hand-written hard
 * cases, split into ~2000 documents, and compares every id with the reference ids that
 * tests/tools/tok_reference.mjs computes (HF tokenizers when installed, else the JS port with its
 * known regex deviations patched).  The corpus and ids are cached under the build directory and
 * rebuilt when missing or older than the script.
 *
 * Literal ids: the spec's reference encodings (qwen3vl-spec.md §3.1) and the places where HF
 * differs from what the C libraries or the JS port would do on their own (Oniguruma's \s, HF's
 * old NFC tables, Unicode 16 letters), taken from HF tokenizers 0.23.2. */
#include "tests/testutil.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "engine/tokenizer.h"
#include "util/mem.h"

static twn_tokenizer *tok;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int setup(void **state) {
    (void)state;
    twn_err err;
    double t0 = now();
    if (twn_tok_load(TWN_TOKENIZER_JSON, &tok, &err)) {
        fprintf(stderr, "cannot load %s: %s\n", TWN_TOKENIZER_JSON, err.msg);
        return -1;
    }
    printf("# loaded %s in %.0f ms\n", TWN_TOKENIZER_JSON, 1e3 * (now() - t0));
    return 0;
}

static int teardown(void **state) {
    (void)state;
    twn_tok_free(tok);
    return 0;
}

static void print_ids(const char *label, const int32_t *v, size_t n) {
    fprintf(stderr, "  %s (%zu):", label, n);
    for (size_t i = 0; i < n && i < 64; i++) fprintf(stderr, " %d", v[i]);
    fprintf(stderr, n > 64 ? " ...\n" : "\n");
}

static void expect_ids(const char *what, const char *text, size_t len, const int32_t *want,
                       size_t n) {
    twn_ivec ids = {0};
    twn_err err;
    if (twn_tok_encode(tok, text, len, &ids, &err)) fail_msg("%s: %s", what, err.msg);
    if (ids.n != n || memcmp(ids.v, want, n * sizeof *want)) {
        fprintf(stderr, "%s: ids differ\n", what);
        print_ids("want", want, n);
        print_ids("got ", ids.v, ids.n);
        fail();
    }
    twn_ivec_free(&ids);
}

// ---------------------------------------------------------------------------------------------

static void test_spec_reference_encodings(void **state) {
    (void)state;
    static const struct {
        const char *text;
        int32_t ids[16];
        size_t n;
    } cases[] = {
        {"Hello world", {9707, 1879}, 2},
        {" Hello world", {21927, 1879}, 2},
        {"Describe this image.", {74785, 419, 2168, 13}, 4},
        {"<think>\n\n</think>\n\n", {151667, 271, 151668, 271}, 4},
        {"<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Describe "
         "this image.<|im_end|>\n<|im_start|>assistant\n",
         {151644, 872, 198, 151652, 151655, 151655, 151653, 74785, 419, 2168, 13, 151645, 198,
          151644, 77091, 198},
         16},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        expect_ids(cases[i].text, cases[i].text, strlen(cases[i].text), cases[i].ids, cases[i].n);
}

static void test_hf_semantics(void **state) {
    (void)state;
    static const struct {
        const char *why, *text;
        size_t len;
        int32_t ids[8];
        size_t n;
    } cases[] = {
        {"U+0085 is \\s for Oniguruma (not for JS)", " \xC2\x85x", 4, {220, 126, 227, 87}, 4},
        {"U+FEFF is not \\s (JS says it is)", "x \xEF\xBB\xBF y", 7, {87, 75780, 379}, 3},
        {"U+180E is not \\s (PCRE2 says it is)", " \xE1\xA0\x8Ex", 5, {86089, 254, 236, 87}, 4},
        {"(?i:'s) matches 's with long s", "it'\xC5\xBFt", 6, {275, 6, 144815, 83}, 4},
        {"U+07FD: a mark HF's NFC does not reorder",
         "a\xCC\x96\xDF\xBD\xCC\x81",
         7,
         {64, 136, 244, 155, 121, 53839},
         6},
        {"U+11935 U+11930: a composition HF's NFC does not make",
         "\xF0\x91\xA4\xB5\xF0\x91\xA4\xB0",
         8,
         {128240, 97, 113, 128240, 97, 108},
         6},
        {"<LV, U+11A7> does not compose (utf8proc 2.8 composes it)",
         "\xEA\xB0\x80\xE1\x86\xA7",
         6,
         {19969, 124137, 100},
         3},
        {"U+1C89 (Unicode 16) is a letter", "\xE1\xB2\x89's", 5, {128233, 231, 594}, 3},
        {"U+10D40 (Unicode 16) is a number", "\xF0\x90\xB5\x80's", 6, {123934, 113, 222, 594}, 4},
        {"NFC composes", "e\xCC\x81t\xC3\xA9", 6, {38783}, 1},
        {"NUL is an ordinary character", "a\0b", 3, {64, 188, 65}, 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        expect_ids(cases[i].why, cases[i].text, cases[i].len, cases[i].ids, cases[i].n);
}

static void test_invalid_utf8_and_empty(void **state) {
    (void)state;
    twn_ivec ids = {0};
    twn_err err;
    twn_ivec_push(&ids, 7);
    assert_int_equal(twn_tok_encode(tok, "", 0, &ids, &err), 0);
    assert_int_equal(ids.n, 1); /* appends nothing */
    assert_int_equal(twn_tok_encode(tok, "ok \xC3\x28 x", 7, &ids, &err), -1);
    assert_non_null(strstr(err.msg, "byte offset 3"));
    assert_non_null(strstr(err.msg, "0xc3"));
    assert_int_equal(ids.n, 1); /* untouched on error */
    static const char *const bad[] = {"\xED\xA0\x80", "\xC0\xAF", "\xF4\x90\x80\x80", "\xE4\xB8",
                                      "\x80"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(twn_tok_encode(tok, bad[i], strlen(bad[i]), &ids, &err), -1);
    twn_str s = {0};
    assert_int_equal(twn_tok_decode(tok, NULL, 0, false, &s, &err), 0);
    assert_int_equal(s.n, 0);
    twn_str_free(&s);
    twn_ivec_free(&ids);
}

static void test_decode(void **state) {
    (void)state;
    twn_err err;
    twn_str s = {0};
    /* "中" is 3 bytes; its first byte alone is one token: decoding it alone is U+FFFD */
    twn_ivec ids = {0};
    assert_int_equal(twn_tok_encode(tok, "\xE4\xB8\xAD", 3, &ids, &err), 0);
    int32_t b0 = twn_tok_id(tok, "\xC3\xA4"); /* byte 0xE4 -> U+00E4 */
    assert_true(b0 >= 0);
    assert_int_equal(twn_tok_decode(tok, &b0, 1, false, &s, &err), 0);
    assert_string_equal(s.v, "\xEF\xBF\xBD");
    twn_str_reset(&s);
    int32_t two[2] = {b0, twn_tok_id(tok, "a")};
    assert_int_equal(twn_tok_decode(tok, two, 2, false, &s, &err), 0);
    assert_string_equal(s.v, "\xEF\xBF\xBD"
                             "a");
    twn_str_reset(&s);
    /* skip_special drops special added tokens only; <think> is not special */
    const char *chat = "<|im_start|>user\nhi<think>x</think><|im_end|>";
    twn_ivec_free(&ids);
    assert_int_equal(twn_tok_encode(tok, chat, strlen(chat), &ids, &err), 0);
    assert_int_equal(twn_tok_decode(tok, ids.v, ids.n, true, &s, &err), 0);
    assert_string_equal(s.v, "user\nhi<think>x</think>");
    twn_str_reset(&s);
    assert_int_equal(twn_tok_decode(tok, ids.v, ids.n, false, &s, &err), 0);
    assert_string_equal(s.v, chat);
    /* Ids with no token (the padded embedding rows a model can still generate) decode to no
     * bytes, as tokenizers' decode skips them; a negative id is an error. */
    twn_str_reset(&s);
    int32_t pad[3] = {151669, 9707, 151935}; /* 9707 = "Hello" */
    assert_int_equal(twn_tok_decode(tok, pad, 3, false, &s, &err), 0);
    assert_string_equal(s.v, "Hello");
    size_t nb = 99;
    assert_string_equal(twn_tok_bytes(tok, 151700, &nb), "");
    assert_int_equal(nb, 0);
    assert_memory_equal(twn_tok_bytes(tok, 9707, &nb), "Hello", 5);
    assert_int_equal(nb, 5);
    int32_t bad = -3;
    assert_int_equal(twn_tok_decode(tok, &bad, 1, false, &s, &err), -1);
    assert_non_null(strstr(err.msg, "token id -3 at position 0 is negative"));
    twn_str_free(&s);
    twn_ivec_free(&ids);
}

static void test_lookups(void **state) {
    (void)state;
    assert_int_equal(twn_tok_size(tok), 151669);
    assert_int_equal(twn_tok_id(tok, "<|im_end|>"), 151645);
    assert_int_equal(twn_tok_id(tok, "\xC4\xA0\xC4\xA0"), 256); /* "ĠĠ": the first merge */
    assert_int_equal(twn_tok_id(tok, "no such token at all"), -1);
    assert_string_equal(twn_tok_token(tok, 9707), "Hello");
    assert_string_equal(twn_tok_token(tok, 151667), "<think>");
    assert_null(twn_tok_token(tok, 151669));
    assert_true(twn_tok_is_special(tok, 151643));
    assert_false(twn_tok_is_special(tok, 151667)); /* <think> is special:false */
    assert_false(twn_tok_is_special(tok, 9707));
}

// ---------------------------------------------------------------------------------------------
// Small synthetic tokenizers: what is accepted, what is refused and how the message reads.

#define MINI_HEAD                                                                                  \
    "{\"version\":\"1.0\",\"truncation\":null,\"padding\":null,"                                   \
    "\"added_tokens\":[{\"id\":7,\"content\":\"<s>\",\"single_word\":false,\"lstrip\":false,"      \
    "\"rstrip\":false,\"normalized\":false,\"special\":true}],"
#define MINI_PRE                                                                                   \
    "\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\","             \
    "\"pattern\":{\"Regex\":\" ?\\\\p{L}+|\\\\s+\"},\"behavior\":\"Isolated\",\"invert\":false},"  \
    "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":false,"                   \
    "\"use_regex\":false}]},"
#define MINI_VOCAB                                                                                 \
    "\"vocab\":{\"a\":0,\"b\":1,\"c\":2,\"\xC4\xA0\":3,\"ab\":4,\"abc\":5,\"\xC4\xA0"              \
    "a\":6}"

static twn_tokenizer *mini(const char *json, twn_err *err) {
    twn_tokenizer *t = NULL;
    twn_tok_load_mem(json, strlen(json), "mini.json", &t, err);
    return t;
}

static void test_synthetic(void **state) {
    (void)state;
    twn_err err;
    const char *pairs =
        MINI_HEAD "\"normalizer\":{\"type\":\"NFC\"}," MINI_PRE
                  "\"post_processor\":null,\"decoder\":{\"type\":\"ByteLevel\"},"
                  "\"model\":{\"type\":\"BPE\",\"dropout\":null,\"unk_token\":null,"
                  "\"byte_fallback\":false," MINI_VOCAB ",\"merges\":[[\"a\",\"b\"],[\"ab\",\"c\"],"
                  "[\"\xC4\xA0\",\"a\"]]}}";
    const char *strs = MINI_HEAD "\"normalizer\":{\"type\":\"NFC\"}," MINI_PRE
                                 "\"post_processor\":null,\"decoder\":{\"type\":\"ByteLevel\"},"
                                 "\"model\":{\"type\":\"BPE\",\"dropout\":null,\"unk_token\":null,"
                                 "\"byte_fallback\":false," MINI_VOCAB
                                 ",\"merges\":[\"a b\",\"ab c\",\"\xC4\xA0 a\"]}}";
    for (int k = 0; k < 2; k++) {
        twn_tokenizer *t = mini(k ? strs : pairs, &err);
        if (!t) fail_msg("%s", err.msg);
        twn_ivec ids = {0};
        /* "x" has no token and there is no unk: dropped, like tokenizers */
        assert_int_equal(twn_tok_encode(t, "abc ab<s>x ca", 13, &ids, &err), 0);
        int32_t want[] = {5, 3, 4, 7, 3, 2, 0};
        assert_int_equal(ids.n, 7);
        assert_memory_equal(ids.v, want, sizeof want);
        assert_int_equal(twn_tok_size(t), 8);
        twn_ivec_free(&ids);
        twn_tok_free(t);
    }
    static const struct {
        const char *json, *msg;
    } refused[] = {
        {"{\"model\":{\"type\":\"WordPiece\"},\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_"
         "prefix_space\":false}}",
         "model.type \"WordPiece\" is not implemented"},
        {"{\"model\":{\"type\":\"BPE\",\"byte_fallback\":true,\"vocab\":{}},"
         "\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false}}",
         "model.byte_fallback is true"},
        {"{\"normalizer\":{\"type\":\"NFKC\"},\"model\":{\"type\":\"BPE\",\"vocab\":{}}}",
         "normalizer.type \"NFKC\" is not implemented"},
        {"{\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\","
         "\"pattern\":{\"Regex\":\"a\"},\"behavior\":\"Removed\"},{\"type\":\"ByteLevel\",\"add_"
         "prefix_space\":false}]},"
         "\"model\":{\"type\":\"BPE\",\"vocab\":{}}}",
         "pre_tokenizer.pretokenizers[0].behavior Removed is not implemented"},
        {"{\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":true},"
         "\"model\":{\"type\":\"BPE\",\"vocab\":{}}}",
         "pre_tokenizer.add_prefix_space is true"},
        {"{\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"use_regex\":false,\"add_prefix_space\":"
         "false},"
         "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[\"a b\"]}}",
         "model.merges[0]: \"b\" is not in the vocab"},
        {"{\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"use_regex\":false,\"add_prefix_space\":"
         "false},"
         "\"post_processor\":{\"type\":\"TemplateProcessing\"},\"model\":{\"type\":\"BPE\"}}",
         "post_processor.type \"TemplateProcessing\" is not implemented"},
        {"{\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\","
         "\"pattern\":{\"Regex\":\"(\"},\"behavior\":\"Isolated\"},{\"type\":\"ByteLevel\",\"add_"
         "prefix_space\":false}]},"
         "\"model\":{\"type\":\"BPE\",\"vocab\":{}}}",
         "pre_tokenizer.pretokenizers[0].pattern.Regex does not compile"},
        {"{\"added_tokens\":[{\"id\":5,\"content\":\"<s>\"}],\"pre_tokenizer\":{\"type\":"
         "\"ByteLevel\",\"add_prefix_space\":false},\"model\":{\"type\":\"BPE\",\"vocab\":"
         "{\"a\":0}}}",
         "added_tokens[0].id is 5 but tokenizers would give \"<s>\" id 1"},
        {"{\"model\":", "invalid JSON at line 1"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
        twn_tokenizer *t = mini(refused[i].json, &err);
        assert_null(t);
        if (!strstr(err.msg, refused[i].msg) || strncmp(err.msg, "mini.json: ", 11))
            fail_msg("refusal %zu: got \"%s\", want \"%s\"", i, err.msg, refused[i].msg);
    }
}

// ---------------------------------------------------------------------------------------------
// The corpus

typedef struct {
    char *buf;
    size_t n;
    const char **text;
    uint32_t *len;
} strings;

static uint32_t rd32(const char *p) {
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] | (uint32_t)u[1] << 8 | (uint32_t)u[2] << 16 | (uint32_t)u[3] << 24;
}

static void read_strings(const char *path, strings *s) {
    size_t len;
    s->buf = tu_read(path, &len);
    assert_true(len >= 4);
    s->n = rd32(s->buf);
    s->text = malloc(s->n * sizeof *s->text);
    s->len = malloc(s->n * sizeof *s->len);
    size_t off = 4;
    for (size_t i = 0; i < s->n; i++) {
        assert_true(off + 4 <= len);
        s->len[i] = rd32(s->buf + off);
        s->text[i] = s->buf + off + 4;
        off += 4 + s->len[i];
        assert_true(off <= len);
    }
}

static void free_strings(strings *s) {
    free(s->buf);
    free(s->text);
    free(s->len);
}

static double mtime(const char *p) {
    struct stat st;
    return stat(p, &st) ? -1 : (double)st.st_mtim.tv_sec + 1e-9 * (double)st.st_mtim.tv_nsec;
}

/* The corpus directory, (re)built by the node script when missing or stale. */
static const char *corpus_dir(void) {
    static char dir[1024];
    char meta[1100], script[1100], cmd[4096];
    snprintf(dir, sizeof dir, "%s/tok-corpus", TWN_BUILD_DIR);
    snprintf(meta, sizeof meta, "%s/meta.json", dir);
    snprintf(script, sizeof script, "%s/tests/tools/tok_reference.mjs", TWN_SOURCE_DIR);
    if (mtime(meta) < 0 || mtime(meta) < mtime(script)) {
        snprintf(cmd, sizeof cmd, "node '%s' '%s' '%s' '%s'", script, dir, TWN_NODE_DIR,
                 TWN_TOKENIZER_JSON);
        char *out = NULL;
        double t0 = now();
        int rc = tu_run(cmd, &out);
        if (rc) fail_msg("%s failed (%d):\n%s", cmd, rc, out);
        printf("# %s(%.1f s)\n", out, now() - t0);
        free(out);
    }
    char *m = tu_read(meta, NULL);
    printf("# corpus: %s", m);
    free(m);
    return dir;
}

typedef struct {
    const strings *docs;
    size_t from, to;
    twn_ivec *ids; /* one per document */
    int failed;
} job;

static void *encode_range(void *arg) {
    job *j = arg;
    twn_err err;
    for (size_t i = j->from; i < j->to; i++)
        if (twn_tok_encode(tok, j->docs->text[i], j->docs->len[i], &j->ids[i], &err)) {
            fprintf(stderr, "doc %zu: %s\n", i, err.msg);
            j->failed = 1;
        }
    return NULL;
}

static void test_corpus_matches_reference(void **state) {
    (void)state;
    const char *dir = corpus_dir();
    char p[1200];
    strings docs, nfc;
    snprintf(p, sizeof p, "%s/corpus.bin", dir);
    read_strings(p, &docs);
    snprintf(p, sizeof p, "%s/nfc.bin", dir);
    read_strings(p, &nfc);
    assert_int_equal(nfc.n, docs.n);
    size_t idlen;
    snprintf(p, sizeof p, "%s/ids.bin", dir);
    char *ref = tu_read(p, &idlen);
    assert_int_equal(rd32(ref), docs.n);

    /* Encode on two threads at once: the tokenizer is shared read-only. */
    twn_ivec *ids = calloc(docs.n, sizeof *ids);
    job jobs[2] = {{&docs, 0, docs.n / 2, ids, 0}, {&docs, docs.n / 2, docs.n, ids, 0}};
    pthread_t th;
    double t0 = now();
    assert_int_equal(pthread_create(&th, NULL, encode_range, &jobs[1]), 0);
    encode_range(&jobs[0]);
    pthread_join(th, NULL);
    double dt = now() - t0;
    assert_false(jobs[0].failed || jobs[1].failed);

    size_t off = 4, total_ids = 0, total_bytes = 0;
    twn_str dec = {0};
    twn_err err;
    for (size_t i = 0; i < docs.n; i++) {
        uint32_t n = rd32(ref + off);
        assert_true(off + 4 + 4 * (size_t)n <= idlen);
        int32_t *want = malloc((n ? n : 1) * sizeof *want);
        for (uint32_t k = 0; k < n; k++) want[k] = (int32_t)rd32(ref + off + 4 + 4 * k);
        off += 4 + 4 * (size_t)n;
        if (ids[i].n != n || memcmp(ids[i].v, want, n * sizeof *want)) {
            size_t k = 0;
            while (k < n && k < ids[i].n && ids[i].v[k] == want[k]) k++;
            fprintf(stderr, "doc %zu (%u bytes) differs from the reference at id %zu: \"%.300s\"\n",
                    i, docs.len[i], k, docs.text[i]);
            print_ids("reference", want, n);
            print_ids("twn      ", ids[i].v, ids[i].n);
            fail();
        }
        free(want);
        total_ids += n;
        total_bytes += docs.len[i];
        /* round trip: decode(encode(x)) == NFC(x) */
        twn_str_reset(&dec);
        assert_int_equal(twn_tok_decode(tok, ids[i].v, ids[i].n, false, &dec, &err), 0);
        if (dec.n != nfc.len[i] || (dec.n && memcmp(dec.v, nfc.text[i], dec.n))) {
            fprintf(stderr, "doc %zu: decode(encode(x)) != NFC(x): \"%.300s\"\n", i, docs.text[i]);
            fail();
        }
        twn_ivec_free(&ids[i]);
    }
    assert_int_equal(off, idlen);
    printf("# %zu documents, %zu bytes, %zu ids: all equal to the reference; round trips ok\n"
           "# encode: %.1f MB/s on 2 threads\n",
           docs.n, total_bytes, total_ids, total_bytes / dt / 1e6);
    assert_true(total_bytes >= 1000000);
    twn_str_free(&dec);
    free(ids);
    free(ref);
    free_strings(&docs);
    free_strings(&nfc);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spec_reference_encodings),
        cmocka_unit_test(test_hf_semantics),
        cmocka_unit_test(test_invalid_utf8_and_empty),
        cmocka_unit_test(test_decode),
        cmocka_unit_test(test_lookups),
        cmocka_unit_test(test_synthetic),
        cmocka_unit_test(test_corpus_matches_reference),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
