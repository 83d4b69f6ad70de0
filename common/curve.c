/* curve.c — key files, the allow-list, the ZAP handler and CURVE socket setup (see curve.h).
 *
 * Secret material is handled with two habits: it is decoded into stack buffers that are wiped
 * (explicit_bzero) before returning, and no message built here ever formats a byte of it; the
 * messages name the file and the problem (mode, line, length), which is what an operator needs. */
#define _GNU_SOURCE
#include "common/curve.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "common/metrics.h"
#include "util/fileio.h"
#include "util/log.h"
#include "util/mem.h"

#define KEY_BYTES        32
#define KEY_FILE_MAX     4096 /* a key file is one line and maybe a comment */
#define ALLOW_FILE_MAX   (16u << 20)
#define ALLOW_MAX        65536
#define ZAP_ENDPOINT     "inproc://zeromq.zap.01"
#define ZAP_POLL_MS      50 /* how often the handler looks at its stop flag */
#define TWN_ENDPOINT_LEN 256

int twn_curve_available(void) {
    return zmq_has("curve") != 0;
}

static int need_curve(twn_err *err) {
    if (!twn_curve_available())
        return twn_err_set(err, "curve: this libzmq was built without CURVE (zmq_has(\"curve\") "
                                "is 0); install a libzmq built with libsodium");
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Key text

static int is_blank(char c) {
    return c == ' ' || c == '\t' || c == '\r';
}

/* 1 when `s` (n chars) is a valid 40-character Z85 key; decodes it into raw when not NULL. */
static int z85_key(const char *s, size_t n, uint8_t raw[KEY_BYTES]) {
    if (n != TWN_CURVE_Z85_LEN || memchr(s, 0, n)) return 0;
    char z[TWN_CURVE_Z85_LEN + 1];
    uint8_t tmp[KEY_BYTES];
    memcpy(z, s, n);
    z[n] = 0;
    int ok = zmq_z85_decode(raw ? raw : tmp, z) != NULL;
    explicit_bzero(z, sizeof z);
    explicit_bzero(tmp, sizeof tmp);
    return ok;
}

/* Finds the single key line of a key file (comments and blank lines skipped) in buf[0..n).
 * `what` is "secret key" or "public key"; messages never include the text. */
static int parse_key_text(const char *path, const char *what, const char *buf, size_t n,
                          char out[TWN_CURVE_Z85_LEN + 1], twn_err *err);

int twn_curve_key_parse(const char *text, size_t n, const char *name, int secret,
                        char out[TWN_CURVE_Z85_LEN + 1], twn_err *err) {
    return parse_key_text(name, secret ? "secret key" : "public key", text, n, out, err);
}

static int parse_key_text(const char *path, const char *what, const char *buf, size_t n,
                          char out[TWN_CURVE_Z85_LEN + 1], twn_err *err) {
    size_t line = 0, found = 0;
    for (size_t i = 0; i < n;) {
        size_t e = i;
        while (e < n && buf[e] != '\n') e++;
        line++;
        size_t a = i, b = e;
        while (a < b && is_blank(buf[a])) a++;
        while (b > a && is_blank(buf[b - 1])) b--;
        if (a < b && buf[a] != '#') {
            if (found)
                return twn_err_set(err, "%s: line %zu: a second key; a %s file holds exactly one",
                                   path, line, what);
            if (!z85_key(buf + a, b - a, NULL))
                return twn_err_set(err,
                                   "%s: line %zu: expected a %d-character Z85 %s, found %zu "
                                   "characters that do not decode",
                                   path, line, TWN_CURVE_Z85_LEN, what, b - a);
            memcpy(out, buf + a, TWN_CURVE_Z85_LEN);
            out[TWN_CURVE_Z85_LEN] = 0;
            found = 1;
        }
        i = e + 1;
    }
    if (!found)
        return twn_err_set(err, "%s: no %s in the file (expected one Z85 line)", path, what);
    return 0;
}

/* Reads a small key file through one descriptor (the mode is checked on what is read). */
static int read_key_file(const char *path, int secret, char out[TWN_CURVE_Z85_LEN + 1],
                         twn_err *err) {
    const char *what = secret ? "secret key" : "public key";
    if (!path || !*path) return twn_err_set(err, "curve: no %s file given", what);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return twn_err_errno(err, "%s: cannot open %s file", path, what);
    struct stat st;
    if (fstat(fd, &st)) {
        close(fd);
        return twn_err_errno(err, "%s: cannot stat %s file", path, what);
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return twn_err_set(err, "%s: the %s file is not a regular file", path, what);
    }
    if (secret && (st.st_mode & 077)) {
        close(fd);
        return twn_err_set(err,
                           "%s: secret key file has mode %04o; it must not be accessible by group "
                           "or others (chmod 600; in Kubernetes, copy it out of the Secret volume "
                           "as deploy/k8s does)",
                           path, (unsigned)(st.st_mode & 07777));
    }
    if (st.st_size > KEY_FILE_MAX) {
        close(fd);
        return twn_err_set(err, "%s: the %s file is %lld bytes; a key file is at most %d", path,
                           what, (long long)st.st_size, KEY_FILE_MAX);
    }
    char buf[KEY_FILE_MAX + 1];
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof buf - 1 - n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            explicit_bzero(buf, sizeof buf);
            errno = e;
            return twn_err_errno(err, "%s: cannot read %s file", path, what);
        }
        if (r == 0 || n + (size_t)r >= sizeof buf - 1) {
            n += (size_t)r;
            break;
        }
        n += (size_t)r;
    }
    close(fd);
    int rc = parse_key_text(path, what, buf, n, out, err);
    explicit_bzero(buf, sizeof buf);
    return rc;
}

int twn_curve_keypair(char pub[TWN_CURVE_Z85_LEN + 1], char sec[TWN_CURVE_Z85_LEN + 1],
                      twn_err *err) {
    if (need_curve(err)) return -1;
    if (zmq_curve_keypair(pub, sec))
        return twn_err_set(err, "curve: zmq_curve_keypair: %s", zmq_strerror(zmq_errno()));
    return 0;
}

static int write_new(const char *path, int mode, const char *text, const char *what, twn_err *err) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0) {
        if (errno == EEXIST)
            return twn_err_set(err, "%s: the %s file already exists; not overwriting it", path,
                               what);
        return twn_err_errno(err, "%s: cannot create %s file", path, what);
    }
    size_t n = strlen(text), off = 0;
    int rc = fchmod(fd, (mode_t)mode);
    while (!rc && off < n) {
        ssize_t w = write(fd, text + off, n - off);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0)
            rc = -1;
        else
            off += (size_t)w;
    }
    if (!rc) rc = fsync(fd);
    if (close(fd)) rc = -1;
    if (rc) {
        twn_err_errno(err, "%s: cannot write %s file", path, what);
        unlink(path);
        return -1;
    }
    return 0;
}

int twn_curve_write_keys(const char *prefix, char pub_out[TWN_CURVE_Z85_LEN + 1], twn_err *err) {
    if (!prefix || !*prefix) return twn_err_set(err, "curve: the key file prefix is empty");
    char pub[TWN_CURVE_Z85_LEN + 1], sec[TWN_CURVE_Z85_LEN + 1];
    if (twn_curve_keypair(pub, sec, err)) return -1;
    size_t pl = strlen(prefix) + 5;
    char *kpath = twn_malloc(pl), *ppath = twn_malloc(pl);
    snprintf(kpath, pl, "%s.key", prefix);
    snprintf(ppath, pl, "%s.pub", prefix);
    char text[160];
    int rc = -1;
    struct stat st;
    if (!lstat(kpath, &st) || !lstat(ppath, &st)) {
        twn_err_set(err, "%s: key files already exist; not overwriting them (remove %s and %s)",
                    prefix, kpath, ppath);
        goto out;
    }
    snprintf(text, sizeof text, "# twn CURVE secret key: keep it private (mode 0600)\n%s\n", sec);
    if (write_new(kpath, 0600, text, "secret key", err)) goto out;
    snprintf(text, sizeof text, "%s\n", pub);
    if (write_new(ppath, 0644, text, "public key", err)) {
        unlink(kpath);
        goto out;
    }
    if (pub_out) memcpy(pub_out, pub, sizeof pub);
    rc = 0;
out:
    explicit_bzero(text, sizeof text);
    explicit_bzero(sec, sizeof sec);
    twn_free(kpath);
    twn_free(ppath);
    return rc;
}

int twn_curve_read_secret(const char *path, char sec[TWN_CURVE_Z85_LEN + 1],
                          char pub[TWN_CURVE_Z85_LEN + 1], twn_err *err) {
    if (need_curve(err)) return -1;
    if (read_key_file(path, 1, sec, err)) return -1;
    if (zmq_curve_public(pub, sec)) {
        explicit_bzero(sec, TWN_CURVE_Z85_LEN + 1);
        return twn_err_set(err, "%s: cannot derive the public key: %s", path,
                           zmq_strerror(zmq_errno()));
    }
    return 0;
}

int twn_curve_read_public(const char *path, char pub[TWN_CURVE_Z85_LEN + 1], twn_err *err) {
    return read_key_file(path, 0, pub, err);
}

// ------------------------------------------------------------------------------------------------
// Allow-list: sorted raw keys, names kept for logs

typedef struct allow_entry {
    uint8_t key[KEY_BYTES];
    char *name; /* from the file, or NULL */
} allow_entry;

struct twn_curve_allow {
    allow_entry *v;
    size_t n;
};

static int entry_cmp(const void *a, const void *b) {
    return memcmp(((const allow_entry *)a)->key, ((const allow_entry *)b)->key, KEY_BYTES);
}

static void allow_finish(twn_curve_allow *a) {
    if (!a->n) return;
    qsort(a->v, a->n, sizeof *a->v, entry_cmp);
    size_t w = 1;
    for (size_t i = 1; i < a->n; i++) {
        if (!memcmp(a->v[i].key, a->v[w - 1].key, KEY_BYTES)) {
            twn_free(a->v[i].name);
            continue;
        }
        a->v[w++] = a->v[i];
    }
    a->n = w;
}

static const allow_entry *allow_find(const twn_curve_allow *a, const uint8_t key[KEY_BYTES]) {
    if (!a || !a->n) return NULL;
    allow_entry k;
    memcpy(k.key, key, KEY_BYTES);
    return bsearch(&k, a->v, a->n, sizeof *a->v, entry_cmp);
}

size_t twn_curve_allow_count(const twn_curve_allow *a) {
    return a ? a->n : 0;
}

void twn_curve_allow_free(twn_curve_allow *a) {
    if (!a) return;
    for (size_t i = 0; i < a->n; i++) twn_free(a->v[i].name);
    twn_free(a->v);
    twn_free(a);
}

int twn_curve_allow_new(const char *const *keys, size_t n, twn_curve_allow **out, twn_err *err) {
    *out = NULL;
    if (n > ALLOW_MAX)
        return twn_err_set(err, "curve: %zu allowed keys; the limit is %d", n, ALLOW_MAX);
    twn_curve_allow *a = twn_calloc(1, sizeof *a);
    a->v = twn_calloc(n ? n : 1, sizeof *a->v);
    for (size_t i = 0; i < n; i++) {
        size_t len = keys[i] ? strlen(keys[i]) : 0;
        if (!z85_key(keys[i], len, a->v[a->n].key)) {
            twn_curve_allow_free(a);
            return twn_err_set(err,
                               "curve: allowed key %zu: expected a %d-character Z85 public key, "
                               "found %zu characters that do not decode",
                               i, TWN_CURVE_Z85_LEN, len);
        }
        a->n++;
    }
    allow_finish(a);
    *out = a;
    return 0;
}

int twn_curve_allow_load(const char *path, twn_curve_allow **out, twn_err *err) {
    *out = NULL;
    if (!path || !*path) return twn_err_set(err, "curve: no allowed-clients file given");
    char *buf = NULL;
    size_t n = 0;
    if (twn_read_file(path, ALLOW_FILE_MAX, &buf, &n, err)) return -1;
    int rc = twn_curve_allow_parse(buf, n, path, out, err);
    twn_free(buf);
    return rc;
}

int twn_curve_allow_parse(const char *buf, size_t n, const char *path, twn_curve_allow **out,
                          twn_err *err) {
    *out = NULL;
    twn_curve_allow *a = twn_calloc(1, sizeof *a);
    size_t cap = 0, line = 0;
    for (size_t i = 0; i < n;) {
        size_t e = i;
        while (e < n && buf[e] != '\n') e++;
        line++;
        size_t s = i, b = e;
        while (s < b && is_blank(buf[s])) s++;
        while (b > s && is_blank(buf[b - 1])) b--;
        i = e + 1;
        if (s == b || buf[s] == '#') continue;
        size_t k = s;
        while (k < b && !is_blank(buf[k])) k++;
        if (a->n == ALLOW_MAX) {
            twn_err_set(err, "%s: line %zu: more than %d keys", path, line, ALLOW_MAX);
            goto fail;
        }
        if (a->n == cap) {
            cap = cap ? 2 * cap : 16;
            a->v = twn_realloc(a->v, cap * sizeof *a->v);
        }
        allow_entry *en = &a->v[a->n];
        if (!z85_key(buf + s, k - s, en->key)) {
            /* The text is not echoed: a secret key pasted here by mistake must not reach a log. */
            twn_err_set(err,
                        "%s: line %zu: expected a %d-character Z85 public key, found %zu "
                        "characters that do not decode",
                        path, line, TWN_CURVE_Z85_LEN, k - s);
            goto fail;
        }
        while (k < b && is_blank(buf[k])) k++;
        en->name = k < b ? twn_strndup(buf + k, b - k) : NULL;
        a->n++;
    }
    allow_finish(a);
    *out = a;
    return 0;
fail:
    twn_curve_allow_free(a);
    return -1;
}

static int allow_equal(const twn_curve_allow *a, const twn_curve_allow *b) {
    if (a->n != b->n) return 0;
    for (size_t i = 0; i < a->n; i++)
        if (memcmp(a->v[i].key, b->v[i].key, KEY_BYTES)) return 0;
    return 1;
}

static twn_curve_allow *allow_copy(const twn_curve_allow *a) {
    twn_curve_allow *c = twn_calloc(1, sizeof *c);
    c->v = twn_calloc(a->n ? a->n : 1, sizeof *c->v);
    for (size_t i = 0; i < a->n; i++) {
        memcpy(c->v[i].key, a->v[i].key, KEY_BYTES);
        c->v[i].name = a->v[i].name ? twn_strdup(a->v[i].name) : NULL;
    }
    c->n = a->n;
    return c;
}

// ------------------------------------------------------------------------------------------------
// Config

int twn_curve_load(twn_curve_cfg *c, const twn_curve_files *f, twn_err *err) {
    memset(c, 0, sizeof *c);
    c->enabled = 1;
    if (need_curve(err)) return -1;
#define GIVEN(p) ((p) && *(p))
    if (!GIVEN(f->server_secret_key_file) && !GIVEN(f->server_public_key_file))
        return twn_err_set(err, "curve: security.curve is on but neither "
                                "security.server_secret_key_file nor "
                                "security.server_public_key_file is set");
    char pub[TWN_CURVE_Z85_LEN + 1];
    if (GIVEN(f->server_secret_key_file) &&
        twn_curve_read_secret(f->server_secret_key_file, c->server_secret, c->server_public, err))
        goto fail;
    if (GIVEN(f->server_public_key_file)) {
        if (twn_curve_read_public(f->server_public_key_file, pub, err)) goto fail;
        if (c->server_public[0] && strcmp(pub, c->server_public)) {
            twn_err_set(err, "%s: the server public key does not match the secret key in %s",
                        f->server_public_key_file, f->server_secret_key_file);
            goto fail;
        }
        memcpy(c->server_public, pub, sizeof pub);
    }
    if (GIVEN(f->client_secret_key_file) &&
        twn_curve_read_secret(f->client_secret_key_file, c->client_secret, c->client_public, err))
        goto fail;
    if (GIVEN(f->client_public_key_file)) {
        if (!c->client_secret[0]) {
            twn_err_set(err, "%s: a client public key without security.client_secret_key_file",
                        f->client_public_key_file);
            goto fail;
        }
        if (twn_curve_read_public(f->client_public_key_file, pub, err)) goto fail;
        if (strcmp(pub, c->client_public)) {
            twn_err_set(err, "%s: the client public key does not match the secret key in %s",
                        f->client_public_key_file, f->client_secret_key_file);
            goto fail;
        }
    }
    if (GIVEN(f->allowed_clients_file) &&
        twn_curve_allow_load(f->allowed_clients_file, &c->allow, err))
        goto fail;
#undef GIVEN
    return 0;
fail:
    twn_curve_free(c);
    c->enabled = 1;
    return -1;
}

void twn_curve_free(twn_curve_cfg *c) {
    if (!c) return;
    twn_curve_allow_free(c->allow);
    explicit_bzero(c, sizeof *c);
}

// ------------------------------------------------------------------------------------------------
// ZAP handler: one thread per context, shared by reference count

struct twn_zap {
    void *zctx;
    int refs;
    void *rep; /* bound on ZAP_ENDPOINT; used only by the thread once started */
    pthread_t th;
    atomic_int stop;
    atomic_uint_least64_t allowed, refused;
    twn_counter *m_allowed, *m_refused; /* twn_curve_handshakes_total{result}: no key in labels */
    twn_curve_allow *allow;
    uint8_t server_key[KEY_BYTES];
    twn_zap *next;
};

static pthread_mutex_t zap_lock = PTHREAD_MUTEX_INITIALIZER;
static twn_zap *zap_list;

/* Receives one multipart message into parts[] (at most cap; extra parts dropped).  0, or the
 * zmq_errno() of the failure (nothing kept). */
static int recv_request(void *rep, zmq_msg_t *parts, int cap, int *n) {
    *n = 0;
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, rep, 0) < 0) {
            int e = zmq_errno();
            zmq_msg_close(&m);
            for (int i = 0; i < *n; i++) zmq_msg_close(&parts[i]);
            *n = 0;
            return e ? e : EIO;
        }
        int more = zmq_msg_more(&m);
        if (*n < cap)
            parts[(*n)++] = m;
        else
            zmq_msg_close(&m);
        if (!more) return 0;
    }
}

static int part_is(zmq_msg_t *m, const char *s) {
    size_t n = strlen(s);
    return zmq_msg_size(m) == n && !memcmp(zmq_msg_data(m), s, n);
}

static void send_str(void *rep, const char *s, size_t n, int more) {
    zmq_send(rep, s, n, more ? ZMQ_SNDMORE : 0);
}

/* Decides one ZAP request; fills user (the key's name or Z85) and returns 200 or 400. */
static int zap_decide(twn_zap *z, zmq_msg_t *p, int n, char *user, size_t ucap) {
    /* [version, request id, domain, address, routing id, mechanism, credentials...] */
    user[0] = 0;
    char addr[64] = "?";
    if (n >= 4) {
        size_t al = zmq_msg_size(&p[3]);
        if (al >= sizeof addr) al = sizeof addr - 1;
        memcpy(addr, zmq_msg_data(&p[3]), al);
        addr[al] = 0;
        for (size_t i = 0; i < al; i++)
            if ((unsigned char)addr[i] < 32 || (unsigned char)addr[i] > 126) addr[i] = '?';
    }
    if (n < 6 || !part_is(&p[0], "1.0")) return 400;
    int ours = part_is(&p[2], TWN_CURVE_ZAP_DOMAIN);
    /* Plain (NULL) sockets of other domains sharing the context are not ours to judge. */
    if (part_is(&p[5], "NULL") && !ours) return 200;
    if (!part_is(&p[5], "CURVE") || !ours || n != 7 || zmq_msg_size(&p[6]) != KEY_BYTES) {
        uint64_t k = atomic_fetch_add(&z->refused, 1) + 1;
        twn_counter_inc(z->m_refused);
        if (!(k & (k - 1)))
            twn_warn("curve: refused a connection from %s: not a CURVE client of domain \"%s\" "
                     "(%llu refused so far)",
                     addr, TWN_CURVE_ZAP_DOMAIN, (unsigned long long)k);
        return 400;
    }
    const uint8_t *key = zmq_msg_data(&p[6]);
    char z85[TWN_CURVE_Z85_LEN + 1];
    zmq_z85_encode(z85, key, KEY_BYTES);
    const allow_entry *e = allow_find(z->allow, key);
    if (e || !memcmp(key, z->server_key, KEY_BYTES)) {
        snprintf(user, ucap, "%s", e && e->name ? e->name : z85);
        atomic_fetch_add(&z->allowed, 1);
        twn_counter_inc(z->m_allowed);
        return 200;
    }
    /* Logged at refusals 1, 2, 4, 8...: a misconfigured client reconnects every ~100 ms. */
    uint64_t k = atomic_fetch_add(&z->refused, 1) + 1;
    twn_counter_inc(z->m_refused);
    if (!(k & (k - 1)))
        twn_warn("curve: refused a client from %s: public key %s is not on the allow-list "
                 "(%llu refused so far)",
                 addr, z85, (unsigned long long)k);
    return 400;
}

static void *zap_main(void *arg) {
    twn_zap *z = arg;
    int to = ZAP_POLL_MS;
    zmq_setsockopt(z->rep, ZMQ_RCVTIMEO, &to, sizeof to);
    while (!atomic_load(&z->stop)) {
        zmq_msg_t p[8];
        int n = 0;
        int e = recv_request(z->rep, p, 8, &n);
        if (e) {
            if (e == EAGAIN || e == EINTR) continue;
            break; /* ETERM: the context is going away */
        }
        char user[256];
        int code = zap_decide(z, p, n, user, sizeof user);
        /* [version, request id, status code, status text, user id, metadata] */
        send_str(z->rep, "1.0", 3, 1);
        if (n >= 2)
            zmq_send(z->rep, zmq_msg_data(&p[1]), zmq_msg_size(&p[1]), ZMQ_SNDMORE);
        else
            send_str(z->rep, "", 0, 1);
        send_str(z->rep, code == 200 ? "200" : "400", 3, 1);
        const char *text = code == 200 ? "OK" : "client key not allowed";
        send_str(z->rep, text, strlen(text), 1);
        send_str(z->rep, user, strlen(user), 1);
        send_str(z->rep, "", 0, 0);
        for (int i = 0; i < n; i++) zmq_msg_close(&p[i]);
    }
    zmq_close(z->rep);
    return NULL;
}

static int zap_acquire(void *zctx, const twn_curve_cfg *cfg, twn_zap **out, twn_err *err) {
    uint8_t skey[KEY_BYTES];
    if (!z85_key(cfg->server_public, strlen(cfg->server_public), skey))
        return twn_err_set(err, "curve: the server public key is missing or not Z85");
    pthread_mutex_lock(&zap_lock);
    for (twn_zap *z = zap_list; z; z = z->next) {
        if (z->zctx != zctx) continue;
        if (!allow_equal(z->allow, cfg->allow) || memcmp(z->server_key, skey, KEY_BYTES)) {
            pthread_mutex_unlock(&zap_lock);
            return twn_err_set(err, "curve: this ZeroMQ context already has a ZAP handler with "
                                    "a different allow-list or server key; give each server "
                                    "configuration its own context");
        }
        z->refs++;
        pthread_mutex_unlock(&zap_lock);
        *out = z;
        return 0;
    }
    twn_zap *z = twn_calloc(1, sizeof *z);
    z->zctx = zctx;
    z->refs = 1;
    memcpy(z->server_key, skey, KEY_BYTES);
    z->rep = zmq_socket(zctx, ZMQ_REP);
    int zero = 0;
    if (!z->rep || zmq_setsockopt(z->rep, ZMQ_LINGER, &zero, sizeof zero) ||
        zmq_bind(z->rep, ZAP_ENDPOINT)) {
        int e = zmq_errno();
        if (z->rep) zmq_close(z->rep);
        pthread_mutex_unlock(&zap_lock);
        twn_free(z);
        return twn_err_set(err, "curve: cannot start the ZAP handler on %s: %s%s", ZAP_ENDPOINT,
                           zmq_strerror(e),
                           e == EADDRINUSE ? " (another ZAP handler runs in this context)" : "");
    }
    z->allow = allow_copy(cfg->allow);
    const char *help = "CURVE client handshakes judged by the ZAP handler: result = allowed | "
                       "refused (key not on the allow-list, or not a CURVE client)";
    z->m_allowed = twn_metrics_counter(twn_metrics_default(), "twn_curve_handshakes_total", help,
                                       "result=allowed", NULL);
    z->m_refused = twn_metrics_counter(twn_metrics_default(), "twn_curve_handshakes_total", help,
                                       "result=refused", NULL);
    if (pthread_create(&z->th, NULL, zap_main, z)) {
        zmq_close(z->rep);
        pthread_mutex_unlock(&zap_lock);
        twn_curve_allow_free(z->allow);
        twn_free(z);
        return twn_err_set(err, "curve: cannot start the ZAP handler thread");
    }
    z->next = zap_list;
    zap_list = z;
    pthread_mutex_unlock(&zap_lock);
    *out = z;
    return 0;
}

void twn_zap_release(twn_zap *z) {
    if (!z) return;
    pthread_mutex_lock(&zap_lock);
    if (--z->refs > 0) {
        pthread_mutex_unlock(&zap_lock);
        return;
    }
    for (twn_zap **p = &zap_list; *p; p = &(*p)->next)
        if (*p == z) {
            *p = z->next;
            break;
        }
    pthread_mutex_unlock(&zap_lock);
    atomic_store(&z->stop, 1);
    pthread_join(z->th, NULL);
    twn_curve_allow_free(z->allow);
    twn_free(z);
}

twn_zap_stats twn_zap_stats_of(const twn_zap *z) {
    twn_zap_stats s = {0, 0};
    if (!z) return s;
    s.allowed = atomic_load(&((twn_zap *)z)->allowed);
    s.refused = atomic_load(&((twn_zap *)z)->refused);
    return s;
}

// ------------------------------------------------------------------------------------------------
// Sockets

static int is_tcp(const char *endpoint) {
    return endpoint && !strncmp(endpoint, "tcp://", 6);
}

static int set_key(void *sock, int opt, const char *z85, const char *what, const char *endpoint,
                   twn_err *err) {
    uint8_t raw[KEY_BYTES];
    if (!z85_key(z85, strlen(z85), raw))
        return twn_err_set(err, "curve: %s: the %s is not a Z85 key", endpoint, what);
    int rc = zmq_setsockopt(sock, opt, raw, KEY_BYTES);
    explicit_bzero(raw, sizeof raw);
    if (rc)
        return twn_err_set(err, "curve: %s: setting the %s: %s", endpoint, what,
                           zmq_strerror(zmq_errno()));
    return 0;
}

int twn_curve_server(void *zctx, void *sock, const char *endpoint, const twn_curve_cfg *cfg,
                     twn_zap **zap, twn_err *err) {
    *zap = NULL;
    if (!cfg || !cfg->enabled || !is_tcp(endpoint)) return 0;
    if (need_curve(err)) return -1;
    if (!cfg->server_secret[0])
        return twn_err_set(err,
                           "curve: %s: a CURVE server needs the server secret key "
                           "(security.server_secret_key_file)",
                           endpoint);
    if (!cfg->allow)
        return twn_err_set(err,
                           "curve: %s: a CURVE server needs the allow-list of client keys "
                           "(security.allowed_clients_file)",
                           endpoint);
    if (zap_acquire(zctx, cfg, zap, err)) return -1;
    int one = 1;
    if (zmq_setsockopt(sock, ZMQ_ZAP_DOMAIN, TWN_CURVE_ZAP_DOMAIN, strlen(TWN_CURVE_ZAP_DOMAIN)) ||
        zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof one)) {
        twn_err_set(err, "curve: %s: making the socket a CURVE server: %s", endpoint,
                    zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (set_key(sock, ZMQ_CURVE_SECRETKEY, cfg->server_secret, "server secret key", endpoint, err))
        goto fail;
    return 0;
fail:
    twn_zap_release(*zap);
    *zap = NULL;
    return -1;
}

// ------------------------------------------------------------------------------------------------
// Watching a client's handshakes: a monitor per watched socket, found by the socket's address

typedef struct watch {
    void *sock, *mon;
    char endpoint[TWN_ENDPOINT_LEN];
    struct watch *next;
} watch;

static pthread_mutex_t watch_lock = PTHREAD_MUTEX_INITIALIZER;
static watch *watch_list;
static atomic_uint watch_seq;

int twn_curve_watch(void *zctx, void *sock, const char *endpoint, const twn_curve_cfg *cfg,
                    twn_err *err) {
    if (!cfg || !cfg->enabled || !is_tcp(endpoint)) return 0;
    char ep[64];
    snprintf(ep, sizeof ep, "inproc://twn-curve-watch-%u", atomic_fetch_add(&watch_seq, 1));
    if (zmq_socket_monitor(sock, ep,
                           ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | ZMQ_EVENT_HANDSHAKE_SUCCEEDED))
        return twn_err_set(err, "curve: %s: cannot monitor the handshake: %s", endpoint,
                           zmq_strerror(zmq_errno()));
    watch *w = twn_calloc(1, sizeof *w);
    w->sock = sock;
    snprintf(w->endpoint, sizeof w->endpoint, "%s", endpoint);
    int zero = 0;
    if (!(w->mon = zmq_socket(zctx, ZMQ_PAIR)) ||
        zmq_setsockopt(w->mon, ZMQ_LINGER, &zero, sizeof zero) || zmq_connect(w->mon, ep)) {
        int e = zmq_errno();
        if (w->mon) zmq_close(w->mon);
        zmq_socket_monitor(sock, NULL, 0);
        twn_free(w);
        return twn_err_set(err, "curve: %s: cannot monitor the handshake: %s", endpoint,
                           zmq_strerror(e));
    }
    pthread_mutex_lock(&watch_lock);
    w->next = watch_list;
    watch_list = w;
    pthread_mutex_unlock(&watch_lock);
    return 0;
}

static watch *watch_take(void *sock, int unlink) {
    pthread_mutex_lock(&watch_lock);
    watch *found = NULL;
    for (watch **p = &watch_list; *p; p = &(*p)->next)
        if ((*p)->sock == sock) {
            found = *p;
            if (unlink) *p = found->next;
            break;
        }
    pthread_mutex_unlock(&watch_lock);
    return found;
}

void twn_curve_unwatch(void *sock) {
    watch *w = watch_take(sock, 1);
    if (!w) return;
    zmq_socket_monitor(sock, NULL, 0);
    zmq_close(w->mon);
    twn_free(w);
}

int twn_curve_refused(void *sock, twn_err *err) {
    watch *w = watch_take(sock, 0);
    if (!w) return 0;
    for (;;) {
        uint8_t b[6];
        int n = zmq_recv(w->mon, b, sizeof b, ZMQ_DONTWAIT);
        if (n < 0) return 0;
        char addr[256];
        while (zmq_recv(w->mon, addr, sizeof addr, ZMQ_DONTWAIT) >= 0) {
            int more = 0;
            size_t ml = sizeof more;
            zmq_getsockopt(w->mon, ZMQ_RCVMORE, &more, &ml);
            if (!more) break;
        }
        uint16_t ev;
        uint32_t value;
        memcpy(&ev, b, 2);
        memcpy(&value, b + 2, 4);
        if (n == 6 && ev == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)
            return twn_err_set(err,
                               "curve: the server at %s refused this process's key (ZAP status "
                               "%u): is its public key on the server's allowed_clients_file?",
                               w->endpoint, value);
    }
}

int twn_curve_client(void *sock, const char *endpoint, const twn_curve_cfg *cfg, twn_err *err) {
    if (!cfg || !cfg->enabled || !is_tcp(endpoint)) return 0;
    if (need_curve(err)) return -1;
    if (!cfg->server_public[0])
        return twn_err_set(err,
                           "curve: %s: a CURVE client needs the server public key "
                           "(security.server_public_key_file)",
                           endpoint);
    const char *pub = cfg->client_public, *sec = cfg->client_secret;
    if (!sec[0]) pub = cfg->server_public, sec = cfg->server_secret;
    if (!sec[0])
        return twn_err_set(err,
                           "curve: %s: a CURVE client needs its own keypair "
                           "(security.client_secret_key_file) or the server's",
                           endpoint);
    if (set_key(sock, ZMQ_CURVE_SERVERKEY, cfg->server_public, "server public key", endpoint,
                err) ||
        set_key(sock, ZMQ_CURVE_PUBLICKEY, pub, "client public key", endpoint, err) ||
        set_key(sock, ZMQ_CURVE_SECRETKEY, sec, "client secret key", endpoint, err))
        return -1;
    return 0;
}
