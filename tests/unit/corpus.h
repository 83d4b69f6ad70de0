/* corpus.h — the test corpora and test data the pipeline tests build: JSONL files of numbered
 * items (with bad lines among them), WebDataset tars (written in C, or by Python's tarfile like a
 * user's tool would), items routed easy or hard by the null engine, random unit vectors, fresh
 * paths under the test tmp dir, and a file-size limit (a full disk on demand).
 *
 * Header-only (static inline) so a test includes it without a CMake change.  Prefix tc_.
 * Corpora are deterministic: the same arguments give the same bytes (vectors: the same seed). */
#ifndef TWN_TESTS_UNIT_CORPUS_H
#define TWN_TESTS_UNIT_CORPUS_H

#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "gate_service/null_engine.h"
#include "tests/testutil.h"
#include "util/rng.h"
#include "util/vec.h"

/* DIR/name under a fresh tu_tmpdir(tag); one of 8 static buffers, reused round robin. */
static inline const char *tc_tmp_path(const char *tag, const char *name) {
    static char buf[8][1024];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, sizeof buf[0], "%s/%s", tu_tmpdir(tag), name);
    return p;
}

/* Fails the test unless msg contains want, showing both. */
static inline void tc_expect_contains(const char *msg, const char *want) {
    if (!strstr(msg, want)) fail_msg("message\n  %s\ndoes not contain\n  %s", msg, want);
}

/* Caps the size this process may grow a file to at `bytes` (RLIMIT_FSIZE; SIGXFSZ ignored, so a
 * write past it fails with EFBIG: a full disk, deterministically); returns the old limit for
 * tc_fsize_limit_end. */
static inline struct rlimit tc_fsize_limit(rlim_t bytes) {
    struct rlimit old, lim;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    lim = old;
    lim.rlim_cur = bytes;
    signal(SIGXFSZ, SIG_IGN);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    return old;
}

/* Restores the limit tc_fsize_limit replaced, and SIGXFSZ. */
static inline void tc_fsize_limit_end(struct rlimit old) {
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, SIG_DFL);
}

// ------------------------------------------------------------------------------------------------
// JSONL

/* Writes n items {"id": "n%05d", "text": "item %d"} to path; when bad_every > 0, after every
 * bad_every good lines two bad ones: not JSON ({"id": "bad<i>", "text": oops}) and one without
 * an id ({"text": "no id after <i>"}). */
static inline void tc_numbered_jsonl(const char *path, int n, int bad_every) {
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    for (int i = 0; i < n; i++) {
        fprintf(f, "{\"id\": \"n%05d\", \"text\": \"item %d\"}\n", i, i);
        if (bad_every > 0 && i % bad_every == bad_every - 1) {
            fprintf(f, "{\"id\": \"bad%d\", \"text\": oops}\n", i);
            fprintf(f, "{\"text\": \"no id after %d\"}\n", i);
        }
    }
    fclose(f);
}

/* Writes n items {"id": "<prefix><k>", "text": "item <j>"} (k: %04d) to path, only ids the null
 * engine routes hard (want_hard 1) or only easy ones (0). */
static inline void tc_routed_jsonl(const char *path, const char *prefix, int n, int want_hard) {
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    char id[64];
    for (int k = 0, got = 0; got < n; k++) {
        snprintf(id, sizeof id, "%s%04d", prefix, k);
        if (twn_null_hard(id) != want_hard) continue;
        fprintf(f, "{\"id\": \"%s\", \"text\": \"item %d\"}\n", id, got++);
    }
    fclose(f);
}

// ------------------------------------------------------------------------------------------------
// Tar (WebDataset)

/* Appends a ustar member (mode 0644, mtime 1700000000) holding n bytes of data to t. */
static inline void tc_tar_member(twn_str *t, const char *name, const void *data, size_t n) {
    char h[512];
    memset(h, 0, sizeof h);
    size_t name_len = strlen(name);
    assert_true(name_len < 100); /* ustar's name field */
    memcpy(h, name, name_len);
    snprintf(h + 100, 8, "%07o", 0644);
    snprintf(h + 108, 8, "%07o", 0);
    snprintf(h + 116, 8, "%07o", 0);
    snprintf(h + 124, 12, "%011o", (unsigned)n);
    snprintf(h + 136, 12, "%011o", 1700000000u);
    h[156] = '0';
    memcpy(h + 257, "ustar", 6);
    memcpy(h + 263, "00", 2);
    memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (int i = 0; i < 512; i++) sum += (unsigned char)h[i];
    snprintf(h + 148, 8, "%06o", sum);
    twn_str_append(t, h, 512);
    twn_str_append(t, data, n);
    static const char zero[512];
    if (n % 512) twn_str_append(t, zero, 512 - n % 512);
}

/* Appends the end of a tar archive (two zero blocks) to t. */
static inline void tc_tar_end(twn_str *t) {
    static const char end[1024];
    twn_str_append(t, end, sizeof end);
}

/* Python's tarfile (USTAR, mtime 0) writing n items as <k>.txt ("tar item <i>") + <k>.json
 * ({"id": "t%05d"}); when every > 0, after every `every` items a bad one (a .json that is not
 * JSON). */
static const char *const TC_MAKE_TAR_PY =
    "import io, json, sys, tarfile\n"
    "def add(t, name, data):\n"
    "    ti = tarfile.TarInfo(name); ti.size = len(data); ti.mtime = 0\n"
    "    t.addfile(ti, io.BytesIO(data))\n"
    "n, every = int(sys.argv[2]), int(sys.argv[3])\n"
    "with tarfile.open(sys.argv[1], 'w', format=tarfile.USTAR_FORMAT) as t:\n"
    "    k = 0\n"
    "    for i in range(n):\n"
    "        add(t, '%06d.txt' % k, ('tar item %d' % i).encode())\n"
    "        add(t, '%06d.json' % k, json.dumps({'id': 't%05d' % i}).encode())\n"
    "        k += 1\n"
    "        if every and i % every == every - 1:\n"
    "            add(t, '%06d.txt' % k, b'bad item')\n"
    "            add(t, '%06d.json' % k, b'{\"id\": broken')\n"
    "            k += 1\n";

/* Writes the tar of TC_MAKE_TAR_PY to path with /usr/bin/python3 (the script lands next to
 * it); fails the test with Python's output when that fails. */
static inline void tc_python_tar(const char *path, int n, int every) {
    char script[4096], cmd[8400];
    if (snprintf(script, sizeof script, "%s.py", path) >= (int)sizeof script)
        fail_msg("the path %s is too long", path);
    tu_write(script, TC_MAKE_TAR_PY, strlen(TC_MAKE_TAR_PY));
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s %s %d %d 2>&1", script, path, n, every);
    char *log = NULL;
    if (tu_run(cmd, &log)) fail_msg("making the tar %s: %s", path, log);
    free(log);
}

/* The numbered corpus under a fresh tu_tmpdir(tag), into dir: DIR/items.jsonl (tc_numbered_jsonl
 * of n_jsonl, bad lines every jsonl_bad_every) and DIR/items.tar (tc_python_tar of n_tar, a bad
 * item every tar_bad_every).  The good ids are n00000.. and t00000... */
static inline void tc_numbered_inputs(const char *tag, int n_jsonl, int jsonl_bad_every, int n_tar,
                                      int tar_bad_every, char *dir, size_t cap) {
    snprintf(dir, cap, "%s", tu_tmpdir(tag));
    char p[1200];
    snprintf(p, sizeof p, "%s/items.jsonl", dir);
    tc_numbered_jsonl(p, n_jsonl, jsonl_bad_every);
    snprintf(p, sizeof p, "%s/items.tar", dir);
    tc_python_tar(p, n_tar, tar_bad_every);
}

// ------------------------------------------------------------------------------------------------
// Vectors

/* n random unit vectors of dim (normal, then normalized) from seed; free() them. */
static inline float *tc_unit_vectors(int n, int dim, uint64_t seed) {
    twn_rng r;
    twn_rng_seed(&r, seed);
    float *x = malloc((size_t)n * (size_t)dim * sizeof *x);
    for (int i = 0; i < n; i++) {
        double norm = 0;
        for (int j = 0; j < dim; j++) {
            x[i * dim + j] = (float)twn_rng_normal(&r);
            norm += (double)x[i * dim + j] * x[i * dim + j];
        }
        for (int j = 0; j < dim; j++) x[i * dim + j] /= (float)sqrt(norm);
    }
    return x;
}

#endif
