/* bench_s3.c — S3 read throughput of the client and the S3 blob against the `curl` command on
 * the same objects in the same run.
 *
 * The server is the test one: s3rver behind tests/tools/s3_front.mjs (SigV4 checked on every
 * request) on 127.0.0.1, so the numbers compare clients, not stores: both sides pay the same node
 * front and file-system store.  Three readings of the same objects:
 *   client   each of R threads (own twn_s3 client, so own kept-alive connection) reads whole
 *            objects with one ranged GET each;
 *   blob     the same through the S3 blob in 256 KiB read_at calls (what the source readers'
 *            cursor does);
 *   curl     one `curl -Z --parallel-max R` process fetching every object (SigV4 by curl itself,
 *            connection reuse within the process) to /dev/null.
 * Run for large objects (MB/s) and for many small ones (objects/s).
 *
 * Each reading is the best of --reps runs (3), the three readers interleaved.
 *
 *   bench_s3 [--large N SIZE_MIB] [--small N SIZE_KIB] [--readers R[,R...]] [--reps K] */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/s3.h"
#include "common/source_s3.h"
#include "tests/tools/s3_front.h"
#include "util/clock.h"
#include "util/mem.h"

#define AK     "BENCHKEY"
#define SECRET "bench-secret/0123456789"
#define BUCKET "bench"

static s3_front g_front;

typedef struct job {
    const char *prefix;
    int n_objects;
    size_t size;
    int mode; /* 0: one GET per object, 1: blob 256 KiB reads */
    int reader, readers;
    uint64_t bytes;
    int objects;
    int failed;
    char err[TWN_ERR_MAX];
} job;

static twn_s3 *client(void) {
    twn_s3_config c = twn_s3_config_default();
    c.endpoint = g_front.endpoint;
    c.region = "us-east-1";
    c.access_key = AK;
    c.secret_key = SECRET;
    twn_s3 *s;
    twn_err err;
    if (twn_s3_open(&c, &s, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        exit(1);
    }
    return s;
}

static void *reader_main(void *arg) {
    job *j = arg;
    twn_s3 *s = client();
    uint8_t *buf = twn_malloc(j->size);
    twn_err err;
    for (int i = j->reader; i < j->n_objects && !j->failed; i += j->readers) {
        char key[128];
        snprintf(key, sizeof key, "%s/obj-%05d.bin", j->prefix, i);
        size_t got = 0;
        if (j->mode == 0) {
            if (twn_s3_get_range(s, BUCKET, key, NULL, 0, j->size, buf, &got, &err)) {
                j->failed = 1;
                snprintf(j->err, sizeof j->err, "%s", err.msg);
                break;
            }
        } else {
            twn_blob *b;
            if (twn_blob_open_s3(s, BUCKET, key, j->size, "", &b, &err)) {
                j->failed = 1;
                snprintf(j->err, sizeof j->err, "%s", err.msg);
                break;
            }
            b->will_read(b, 0, j->size); /* as a unit reader announces its range */
            for (uint64_t off = 0; off < j->size; off += 256u << 10) {
                size_t k = j->size - off < (256u << 10) ? j->size - off : (256u << 10), g;
                if (b->read_at(b, off, buf + off, k, &g, &err)) {
                    j->failed = 1;
                    snprintf(j->err, sizeof j->err, "%s", err.msg);
                    break;
                }
                got += g;
            }
            twn_blob_close(b);
        }
        j->bytes += got;
        j->objects++;
    }
    twn_free(buf);
    twn_s3_close(s);
    return NULL;
}

static double run_client(const char *prefix, int n, size_t size, int mode, int readers,
                         uint64_t *bytes) {
    pthread_t th[64];
    job jobs[64];
    double t0 = twn_now();
    for (int r = 0; r < readers; r++) {
        jobs[r] = (job){.prefix = prefix,
                        .n_objects = n,
                        .size = size,
                        .mode = mode,
                        .reader = r,
                        .readers = readers};
        pthread_create(&th[r], NULL, reader_main, &jobs[r]);
    }
    *bytes = 0;
    for (int r = 0; r < readers; r++) {
        pthread_join(th[r], NULL);
        if (jobs[r].failed) {
            fprintf(stderr, "reader %d: %s\n", r, jobs[r].err);
            exit(1);
        }
        *bytes += jobs[r].bytes;
    }
    return twn_now() - t0;
}

/* The curl command on the same objects: one process, -Z with R parallel transfers. */
static double run_curl(const char *dir, const char *prefix, int n, int readers, uint64_t *bytes) {
    char cfg[1200], cmd[4096];
    snprintf(cfg, sizeof cfg, "%s/curl-%s.cfg", dir, prefix);
    FILE *f = fopen(cfg, "w");
    for (int i = 0; i < n; i++)
        fprintf(f, "url = \"%s/%s/%s/obj-%05d.bin\"\noutput = \"/dev/null\"\n", g_front.endpoint,
                BUCKET, prefix, i);
    fclose(f);
    snprintf(cmd, sizeof cmd,
             "curl -s --no-progress-meter -f -Z --parallel-max %d --aws-sigv4 aws:amz:us-east-1:s3 "
             "--user '%s:%s' "
             "-H 'x-amz-content-sha256: "
             "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855' "
             "-w '%%{size_download}\\n' -K '%s' 2>/dev/null",
             readers, AK, SECRET, cfg);
    double t0 = twn_now();
    FILE *p = popen(cmd, "r");
    *bytes = 0;
    unsigned long long sz;
    while (fscanf(p, "%llu", &sz) == 1) *bytes += sz;
    int st = pclose(p);
    double dt = twn_now() - t0;
    if (st) {
        fprintf(stderr, "curl failed (status %d)\n", st);
        exit(1);
    }
    return dt;
}

static void put_objects(const char *prefix, int n, size_t size) {
    twn_s3 *s = client();
    uint8_t *data = twn_malloc(size);
    uint32_t x = 1;
    for (size_t i = 0; i < size; i++) {
        x = x * 1664525u + 1013904223u;
        data[i] = (uint8_t)(x >> 24);
    }
    twn_err err;
    if (twn_s3_create_bucket(s, BUCKET, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        exit(1);
    }
    for (int i = 0; i < n; i++) {
        char key[128];
        snprintf(key, sizeof key, "%s/obj-%05d.bin", prefix, i);
        data[0] = (uint8_t)i;
        if (twn_s3_put(s, BUCKET, key, data, size, &err)) {
            fprintf(stderr, "%s\n", err.msg);
            exit(1);
        }
    }
    twn_free(data);
    twn_s3_close(s);
}

static int g_reps = 3; /* --reps */

static void bench_set(const char *dir, const char *prefix, int n, size_t size, const int *readers,
                      int nr) {
    printf("\n%s: %d objects x %zu bytes (%.1f MiB)\n", prefix, n, size,
           (double)n * (double)size / 1048576.0);
    printf("  %-8s %7s %10s %10s %12s\n", "reader", "threads", "seconds", "MB/s", "objects/s");
    for (int k = 0; k < nr; k++) {
        int r = readers[k];
        uint64_t bytes;
        double t;
        const char *names[3] = {"client", "blob", "curl"};
        double mbs[3], best[3] = {1e30, 1e30, 1e30};
        /* the machine is shared: each reading is the best of g_reps, the three interleaved */
        for (int rep = 0; rep < g_reps; rep++) {
            for (int m = 0; m < 3; m++) {
                t = m < 2 ? run_client(prefix, n, size, m, r, &bytes)
                          : run_curl(dir, prefix, n, r, &bytes);
                if (bytes != (uint64_t)n * size) {
                    fprintf(stderr, "%s read %llu bytes, expected %llu\n", names[m],
                            (unsigned long long)bytes, (unsigned long long)n * size);
                    exit(1);
                }
                if (t < best[m]) best[m] = t;
            }
        }
        for (int m = 0; m < 3; m++) {
            t = best[m];
            mbs[m] = (double)n * (double)size / t / 1e6;
            printf("  %-8s %7d %10.3f %10.1f %12.1f\n", names[m], r, t, mbs[m], n / t);
        }
        printf("  ratio client/curl %.2f, blob/curl %.2f\n", mbs[0] / mbs[2], mbs[1] / mbs[2]);
    }
}

int main(int argc, char **argv) {
    int n_large = 32, n_small = 400;
    size_t large_mib = 2, small_kib = 8;
    int readers[8] = {1, 2, 4}, nr = 3;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--large") && i + 2 < argc) {
            n_large = atoi(argv[++i]);
            large_mib = (size_t)atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--small") && i + 2 < argc) {
            n_small = atoi(argv[++i]);
            small_kib = (size_t)atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            g_reps = atoi(argv[++i]);
            if (g_reps < 1) g_reps = 1;
        } else if (!strcmp(argv[i], "--readers") && i + 1 < argc) {
            nr = 0;
            for (char *p = strtok(argv[++i], ","); p && nr < 8; p = strtok(NULL, ","))
                readers[nr++] = atoi(p);
        } else {
            fprintf(stderr, "usage: bench_s3 [--large N SIZE_MIB] [--small N SIZE_KIB] "
                            "[--readers R[,R...]] [--reps K]\n");
            return 2;
        }
    }
    char dir[512];
    snprintf(dir, sizeof dir, "/tmp/twn-bench-s3-%d", (int)getpid());
    char why[1400];
    if (s3_front_start(&g_front, TWN_SOURCE_DIR, dir, AK, SECRET, 900, why, sizeof why)) {
        fprintf(stderr, "bench_s3: %s\n", why);
        return 1;
    }
    printf("bench_s3: s3rver + SigV4-verifying front at %s (node, loopback); curl %s\n",
           g_front.endpoint, curl_version_info(CURLVERSION_NOW)->version);
    put_objects("large", n_large, large_mib << 20);
    put_objects("small", n_small, small_kib << 10);
    bench_set(dir, "large", n_large, large_mib << 20, readers, nr);
    bench_set(dir, "small", n_small, small_kib << 10, readers, nr);
    s3_front_stop(&g_front);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd)) return 1;
    return 0;
}
