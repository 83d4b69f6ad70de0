/* s3_front.h — starts and stops tests/tools/s3_front.mjs (s3rver behind a SigV4-verifying,
 * fault-injecting front) for test_s3 and bench_s3, and talks to its /__twn/ control paths.
 *
 * The server is `node` itself (not npx), so the pid we kill is the server; it also exits on its
 * own when this process is gone or after max_seconds.  Listens on 127.0.0.1 only, on an
 * ephemeral port it writes to <dir>/port. */
#ifndef TWN_TESTS_S3_FRONT_H
#define TWN_TESTS_S3_FRONT_H

#include <curl/curl.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "util/vec.h"

typedef struct s3_front {
    pid_t pid;
    int port;
    char endpoint[64]; /* http://127.0.0.1:PORT */
    char log[1100];
} s3_front;

static inline void s3_front_nap(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

/* Starts the front with data under dir (created).  0, or -1 with a reason in why. */
static inline int s3_front_start(s3_front *f, const char *source_dir, const char *dir,
                                 const char *key, const char *secret, int max_seconds, char *why,
                                 size_t why_cap) {
    memset(f, 0, sizeof *f);
    char script[1024], data[1100], port_file[1100], node_mod[1100], ppid[32], maxs[32];
    snprintf(script, sizeof script, "%s/tests/tools/s3_front.mjs", source_dir);
    snprintf(node_mod, sizeof node_mod, "%s/tools/node/node_modules/s3rver/package.json",
             source_dir);
    if (access(node_mod, R_OK)) {
        snprintf(why, why_cap, "%s is missing: run scripts/setup.sh (npm ci in tools/node)",
                 node_mod);
        return -1;
    }
    snprintf(data, sizeof data, "%s/data", dir);
    snprintf(port_file, sizeof port_file, "%s/port", dir);
    snprintf(f->log, sizeof f->log, "%s/front.log", dir);
    mkdir(dir, 0755);
    unlink(port_file);
    snprintf(ppid, sizeof ppid, "%d", (int)getpid());
    snprintf(maxs, sizeof maxs, "%d", max_seconds);
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(why, why_cap, "fork failed");
        return -1;
    }
    if (pid == 0) {
        int fd = open(f->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execlp("node", "node", "--openssl-legacy-provider", script, "--dir", data, "--port-file",
               port_file, "--key", key, "--secret", secret, "--parent-pid", ppid, "--max-seconds",
               maxs, (char *)NULL);
        _exit(127);
    }
    f->pid = pid;
    for (int i = 0; i < 400; i++) { /* 20 s */
        FILE *pf = fopen(port_file, "r");
        if (pf) {
            int ok = fscanf(pf, "%d", &f->port) == 1;
            fclose(pf);
            if (ok && f->port > 0) {
                snprintf(f->endpoint, sizeof f->endpoint, "http://127.0.0.1:%d", f->port);
                return 0;
            }
        }
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            f->pid = 0;
            snprintf(why, why_cap, "s3_front exited early (status %d); see %s", st, f->log);
            return -1;
        }
        s3_front_nap(0.05);
    }
    snprintf(why, why_cap, "s3_front did not start within 20 s; see %s", f->log);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    f->pid = 0;
    return -1;
}

static inline void s3_front_stop(s3_front *f) {
    if (f->pid <= 0) return;
    kill(f->pid, SIGTERM);
    for (int i = 0; i < 100; i++) { /* 5 s, then SIGKILL */
        if (waitpid(f->pid, NULL, WNOHANG) == f->pid) {
            f->pid = 0;
            return;
        }
        s3_front_nap(0.05);
    }
    kill(f->pid, SIGKILL);
    waitpid(f->pid, NULL, 0);
    f->pid = 0;
}

static inline size_t s3_front_sink(char *p, size_t size, size_t nmemb, void *user) {
    twn_str_append((twn_str *)user, p, size * nmemb);
    return size * nmemb;
}

/* GET (json NULL) or POST json to a control path; the reply body in *reply (twn_str_free).
 * Returns the HTTP status, or -1. */
static inline long s3_front_control(const s3_front *f, const char *path, const char *json,
                                    twn_str *reply) {
    CURL *c = curl_easy_init();
    if (!c) return -1;
    char url[256];
    snprintf(url, sizeof url, "%s%s", f->endpoint, path);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 10000L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, s3_front_sink);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, reply);
    if (json) curl_easy_setopt(c, CURLOPT_POSTFIELDS, json);
    long status = -1;
    if (curl_easy_perform(c) == CURLE_OK) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(c);
    return status;
}

#endif
