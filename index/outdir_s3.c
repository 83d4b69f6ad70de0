/* outdir_s3.c — output directories to S3, the manifest last (outdir_s3.h). */
#include "index/outdir_s3.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/mem.h"

/* Upload order: the files the manifest describes, then the manifest. */
static const char *const FILES[] = {"index.faiss", "embeddings.npy", "faiss_ids.npy", "items.jsonl",
                                    "manifest.json"};
#define N_FILES  (sizeof FILES / sizeof *FILES)
#define CHUNK    (1u << 20)
#define MAX_PATH 4096

/* Streams one local file to bucket/key. */
static int upload_file(twn_s3 *s, const char *path, const char *bucket, const char *key,
                       unsigned long long *bytes, twn_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return twn_err_errno(err, "%s: cannot open for upload", path);
    twn_s3_upload *u;
    if (twn_s3_upload_begin(s, bucket, key, &u, err)) {
        fclose(f);
        return -1;
    }
    char *buf = twn_malloc(CHUNK);
    int rc = 0;
    size_t n;
    while ((n = fread(buf, 1, CHUNK, f)) > 0) {
        if (twn_s3_upload_write(u, buf, n, err)) {
            rc = -1;
            break;
        }
        if (bytes) *bytes += n;
    }
    if (!rc && ferror(f)) rc = twn_err_errno(err, "%s: read error during upload", path);
    twn_free(buf);
    fclose(f);
    if (rc) {
        twn_s3_upload_abort(u);
        return -1;
    }
    return twn_s3_upload_finish(u, err);
}

/* "<prefix>/<name>" without doubling the '/'. */
static void join_key(char *out, size_t cap, const char *prefix, const char *name) {
    size_t n = strlen(prefix);
    snprintf(out, cap, "%s%s%s", prefix, n && prefix[n - 1] != '/' ? "/" : "", name);
}

static int upload_dir(const char *dir, twn_s3 *s, const twn_s3_uri *u, unsigned long long *bytes,
                      twn_err *err) {
    char path[MAX_PATH], key[MAX_PATH];
    for (size_t i = 0; i < N_FILES; i++) { /* all there before anything is sent */
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, FILES[i]);
        if (stat(path, &st) || !S_ISREG(st.st_mode))
            return twn_err_set(err, "%s: missing; an output directory has %s, %s, %s, %s and %s",
                               path, FILES[0], FILES[1], FILES[2], FILES[3], FILES[4]);
    }
    for (size_t i = 0; i < N_FILES; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, FILES[i]);
        join_key(key, sizeof key, u->key, FILES[i]);
        if (upload_file(s, path, u->bucket, key, bytes, err)) return -1;
    }
    return 0;
}

int twn_outdir_upload(const char *dir, twn_s3 *s, const char *uri, twn_err *err) {
    twn_s3_uri u;
    if (twn_s3_uri_parse(uri, &u, err)) return -1;
    int rc = upload_dir(dir, s, &u, NULL, err);
    twn_s3_uri_free(&u);
    return rc;
}

int twn_outdir_upload_file(const char *path, twn_s3 *s, const char *uri, unsigned long long *bytes,
                           twn_err *err) {
    twn_s3_uri u;
    if (twn_s3_uri_parse(uri, &u, err)) return -1;
    int rc = u.key[0] ? upload_file(s, path, u.bucket, u.key, bytes, err)
                      : twn_err_set(err,
                                    "'%s' names a bucket, not an object; expected "
                                    "s3://bucket/key",
                                    uri);
    twn_s3_uri_free(&u);
    return rc;
}

/* The snapshot CURRENT names in shard_dir, to <u>/shard-NNNNN/. */
static int upload_shard(const char *shard_dir, int shard, twn_s3 *s, const twn_s3_uri *u,
                        unsigned long long *bytes, twn_err *err) {
    char path[MAX_PATH], snap[MAX_PATH], key[MAX_PATH];
    snprintf(path, sizeof path, "%s/CURRENT", shard_dir);
    FILE *f = fopen(path, "r");
    if (!f) return twn_err_errno(err, "%s: cannot open (the shard has no snapshot)", path);
    char name[256] = "";
    if (!fgets(name, sizeof name, f)) name[0] = 0;
    fclose(f);
    name[strcspn(name, "\r\n ")] = 0;
    if (!name[0] || strchr(name, '/'))
        return twn_err_set(err, "%s: '%s' is not a snapshot name", path, name);
    snprintf(snap, sizeof snap, "%s/%s", shard_dir, name);
    char sub[64];
    snprintf(sub, sizeof sub, "shard-%05d/", shard);
    join_key(key, sizeof key, u->key, sub);
    twn_s3_uri su = {.bucket = u->bucket, .key = key};
    return upload_dir(snap, s, &su, bytes, err);
}

int twn_outdir_upload_shard(const char *shard_dir, int shard, twn_s3 *s, const char *uri,
                            unsigned long long *bytes, twn_err *err) {
    twn_s3_uri u;
    if (twn_s3_uri_parse(uri, &u, err)) return -1;
    int rc = upload_shard(shard_dir, shard, s, &u, bytes, err);
    twn_s3_uri_free(&u);
    return rc;
}

int twn_outdir_upload_job(const char *out, int n_shards, twn_s3 *s, const char *uri,
                          unsigned long long *bytes, twn_err *err) {
    if (bytes) *bytes = 0;
    twn_s3_uri u;
    if (twn_s3_uri_parse(uri, &u, err)) return -1;
    int rc = 0;
    char path[MAX_PATH], key[MAX_PATH];
    for (int k = 0; k < n_shards && !rc; k++) {
        snprintf(path, sizeof path, "%s/shard-%05d", out, k);
        rc = upload_shard(path, k, s, &u, bytes, err);
    }
    snprintf(path, sizeof path, "%s/dead_letter.jsonl", out);
    if (!rc && access(path, R_OK) == 0) {
        join_key(key, sizeof key, u.key, "dead_letter.jsonl");
        rc = upload_file(s, path, u.bucket, key, bytes, err);
    }
    twn_s3_uri_free(&u);
    return rc;
}
