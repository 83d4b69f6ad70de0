/* s3.c — the S3 client: one request engine (URL, headers, SigV4 through curl, the response
 * sinks, retries) under the operations of s3.h.  XML (listings, errors, multipart) goes through
 * libxml2. */
#include "common/s3.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <curl/curl.h>
#include <libxml/parser.h>
#include <libxml/tree.h>
#include <openssl/evp.h>

#include "util/clock.h"
#include "util/mem.h"
#include "util/vec.h"

#define MIN_PART_SIZE   (5u << 20)
#define ERR_BODY_MAX    (64u << 10)
#define EMPTY_SHA256    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#define S3_ETAG_MAX     128
#define S3_REQID_MAX    128
#define S3_LIST_MAX_XML (64u << 20)
/* curl's receive buffer: the 16 KiB default halves large-object throughput (one write callback
 * and one recv per 16 KiB); the curl tool itself uses 100 KiB. */
#define S3_RECV_BUFFER (256L << 10)

twn_s3_config twn_s3_config_default(void) {
    twn_s3_config c = {
        .path_style = -1,
        .max_retries = 5,
        .backoff_base_s = 0.1,
        .backoff_max_s = 10,
        .retry_after_max_s = 30,
        .connect_timeout_ms = 5000,
        .request_timeout_ms = 0,
        .stall_timeout_s = 30,
        .list_page_keys = 0,
        .part_size = 8u << 20,
    };
    return c;
}

struct twn_s3 {
    CURL *curl;
    char *scheme;   /* "http" | "https" */
    char *hostport; /* "127.0.0.1:4568" */
    char *region, *access_key, *secret_key, *token;
    int path_style;
    twn_s3_config cfg; /* numbers only; the strings above are the resolved copies */
    char sigv4[160];
    twn_s3_stats st;
    uint64_t rng;
    char errbuf[CURL_ERROR_SIZE];
};

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static void global_init(void) {
    curl_global_init(CURL_GLOBAL_DEFAULT);
    xmlInitParser();
}

// ------------------------------------------------------------------------------------------------
// Small helpers

static const char *env_or(const char *v, const char *name) {
    if (v) return v;
    const char *e = getenv(name);
    return e && e[0] ? e : NULL;
}

static void sha256_hex(const void *p, size_t n, char out[65]) {
    unsigned char md[32];
    unsigned len = 0;
    EVP_Digest(p, n, md, &len, EVP_sha256(), NULL);
    for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", md[i]);
}

/* RFC 3986 percent-encoding: unreserved characters stay, '/' stays when keep_slash. */
static void enc(twn_str *s, const char *p, int keep_slash) {
    static const char hex[] = "0123456789ABCDEF";
    for (; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' ||
            (keep_slash && c == '/')) {
            twn_str_append(s, (const char *)&c, 1);
        } else {
            char e[3] = {'%', hex[c >> 4], hex[c & 15]};
            twn_str_append(s, e, 3);
        }
    }
}

/* Appends "&name=value" (no '&' first) with both encoded; callers add parameters in name order. */
static void qparam(twn_str *q, const char *name, const char *value) {
    if (q->n) twn_str_append(q, "&", 1);
    enc(q, name, 0);
    twn_str_append(q, "=", 1);
    enc(q, value, 0);
}

static double rnd01(twn_s3 *s) {
    s->rng ^= s->rng << 13;
    s->rng ^= s->rng >> 7;
    s->rng ^= s->rng << 17;
    return (double)(s->rng >> 11) / 9007199254740992.0;
}

static void sleep_s(double t) {
    if (t <= 0) return;
    struct timespec ts = {(time_t)t, (long)((t - (double)(time_t)t) * 1e9)};
    while (nanosleep(&ts, &ts) && errno == EINTR) {
    }
}

int twn_s3_is_uri(const char *s) {
    return s && !strncmp(s, "s3://", 5);
}

// ------------------------------------------------------------------------------------------------
// Open / close

static int valid_bucket(const char *b, size_t n) {
    if (n < 3 || n > 63) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = b[i];
        if (!(islower((unsigned char)c) || isdigit((unsigned char)c) || c == '.' || c == '-'))
            return 0;
    }
    return isalnum((unsigned char)b[0]) && isalnum((unsigned char)b[n - 1]);
}

int twn_s3_uri_parse(const char *uri, twn_s3_uri *out, twn_err *err) {
    memset(out, 0, sizeof *out);
    if (!twn_s3_is_uri(uri))
        return twn_err_set(err, "'%s' is not an S3 URI; expected s3://bucket[/prefix]", uri);
    const char *b = uri + 5, *slash = strchr(b, '/');
    size_t bn = slash ? (size_t)(slash - b) : strlen(b);
    if (!valid_bucket(b, bn))
        return twn_err_set(err,
                           "'%s': bucket '%.*s' is not a valid S3 bucket name; expected 3..63 "
                           "characters of a-z 0-9 . - starting and ending with a letter or digit",
                           uri, (int)(bn > 80 ? 80 : bn), b);
    out->bucket = twn_strndup(b, bn);
    out->key = twn_strdup(slash ? slash + 1 : "");
    return 0;
}

void twn_s3_uri_free(twn_s3_uri *u) {
    twn_free(u->bucket);
    twn_free(u->key);
    memset(u, 0, sizeof *u);
}

int twn_s3_open(const twn_s3_config *cfg_in, twn_s3 **out, twn_err *err) {
    *out = NULL;
    pthread_once(&g_once, global_init);
    twn_s3_config cfg = cfg_in ? *cfg_in : twn_s3_config_default();
    const char *ak = env_or(cfg.access_key, "AWS_ACCESS_KEY_ID");
    const char *sk = env_or(cfg.secret_key, "AWS_SECRET_ACCESS_KEY");
    const char *tok = env_or(cfg.session_token, "AWS_SESSION_TOKEN");
    const char *region = env_or(cfg.region, "AWS_REGION");
    if (!region) region = env_or(NULL, "AWS_DEFAULT_REGION");
    if (!region) region = "us-east-1";
    const char *endpoint = env_or(cfg.endpoint, "AWS_ENDPOINT_URL");
    if (!ak || !sk)
        return twn_err_set(err, "s3: no credentials: set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY (or the client config)");
    for (const char *p = region; *p; p++)
        if (!(isalnum((unsigned char)*p) || *p == '-'))
            return twn_err_set(err, "s3: region '%s' is not a region name (letters, digits, -)",
                               region);
    if (cfg.part_size < MIN_PART_SIZE)
        return twn_err_set(err, "s3: part_size %zu is below S3's minimum part size %u",
                           cfg.part_size, MIN_PART_SIZE);
    twn_s3 *s = twn_calloc(1, sizeof *s);
    if (endpoint) {
        const char *hp;
        if (!strncmp(endpoint, "http://", 7))
            s->scheme = twn_strdup("http"), hp = endpoint + 7;
        else if (!strncmp(endpoint, "https://", 8))
            s->scheme = twn_strdup("https"), hp = endpoint + 8;
        else {
            twn_free(s);
            return twn_err_set(err, "s3: endpoint '%s' must start with http:// or https://",
                               endpoint);
        }
        size_t n = strcspn(hp, "/");
        if (!n || memchr(hp, '@', n) || (hp[n] && strcmp(hp + n, "/"))) {
            twn_free(s->scheme);
            twn_free(s);
            /* never echo a userinfo part: it may hold a secret */
            return twn_err_set(err, "s3: endpoint must be scheme://host[:port] with no user or "
                                    "path part");
        }
        s->hostport = twn_strndup(hp, n);
    } else {
        s->scheme = twn_strdup("https");
        char h[128];
        snprintf(h, sizeof h, "s3.%s.amazonaws.com", region);
        s->hostport = twn_strdup(h);
    }
    s->path_style = cfg.path_style >= 0 ? cfg.path_style : endpoint != NULL;
    s->region = twn_strdup(region);
    s->access_key = twn_strdup(ak);
    s->secret_key = twn_strdup(sk);
    s->token = tok ? twn_strdup(tok) : NULL;
    s->cfg = cfg;
    s->cfg.endpoint = s->cfg.region = s->cfg.access_key = s->cfg.secret_key = NULL;
    s->cfg.session_token = NULL;
    snprintf(s->sigv4, sizeof s->sigv4, "aws:amz:%s:s3", region);
    s->rng = (uint64_t)(uintptr_t)s ^ (uint64_t)(twn_now() * 1e9) ^ 0x9e3779b97f4a7c15ull;
    if (!s->rng) s->rng = 1;
    s->curl = curl_easy_init();
    if (!s->curl) {
        twn_s3_close(s);
        return twn_err_set(err, "s3: curl_easy_init failed");
    }
    *out = s;
    return 0;
}

static void wipe_free(char *p) {
    if (!p) return;
    volatile char *v = p;
    while (*v) *v++ = 0;
    twn_free(p);
}

void twn_s3_close(twn_s3 *s) {
    if (!s) return;
    if (s->curl) curl_easy_cleanup(s->curl);
    twn_free(s->scheme);
    twn_free(s->hostport);
    twn_free(s->region);
    twn_free(s->access_key);
    wipe_free(s->secret_key);
    wipe_free(s->token);
    twn_free(s);
}

twn_s3_stats twn_s3_get_stats(const twn_s3 *s) {
    return s->st;
}

// ------------------------------------------------------------------------------------------------
// The request engine

typedef struct s3_req {
    const char *method; /* GET PUT POST HEAD DELETE */
    const char *bucket;
    const char *key;   /* NULL or "" for a bucket request */
    const char *query; /* canonical (sorted, encoded), without '?'; NULL for none */
    const char *shown; /* what messages call the request ("list s3://b/p"); NULL: method + uri */
    const void *body;
    size_t body_len;
    const char *content_type;
    int ranged;
    uint64_t off;
    size_t len;
    uint8_t *fixed; /* ranged: bytes land here */
    twn_str *grow;  /* else: the 2xx body lands here (up to grow_max) */
    size_t grow_max;
    const char *want_etag;      /* the object must still have this ETag */
    int ok_404, ok_409, ok_416; /* statuses the caller handles itself */
    /* grow: called once, when a 2xx response's headers are in and before its body is read, with
     * the bytes it will hold (Content-Length, else grow_max); it may wait (twn_s3_get_admit) */
    void (*admit)(void *user, uint64_t bytes);
    void *admit_user;
    int admitted;
    /* results */
    long status;
    size_t got; /* ranged: bytes in fixed */
    char etag[S3_ETAG_MAX];
    char request_id[S3_REQID_MAX];
    uint64_t content_length;
    int have_length;
} s3_req;

typedef struct xfer {
    s3_req *r;
    long status;
    int ranged_ok; /* the response is the 206 of our range */
    int overflow, ignored_range, too_big;
    size_t base; /* resumed: bytes of fixed filled by earlier attempts */
    size_t got;  /* this attempt's body bytes */
    size_t sent; /* upload position */
    twn_str errbody;
    char etag[S3_ETAG_MAX], reqid[S3_REQID_MAX];
    uint64_t clen;
    int have_clen;
} xfer;

static void trim_copy(char *dst, size_t cap, const char *v, size_t n) {
    while (n && isspace((unsigned char)*v)) v++, n--;
    while (n && isspace((unsigned char)v[n - 1])) n--;
    if (n >= cap) n = cap - 1;
    memcpy(dst, v, n);
    dst[n] = 0;
}

static size_t on_header(char *p, size_t size, size_t nmemb, void *user) {
    xfer *x = user;
    size_t n = size * nmemb;
    if (n >= 5 && !memcmp(p, "HTTP/", 5)) {
        /* a new response (also after 100 Continue): forget the previous one's headers */
        const char *sp = memchr(p, ' ', n);
        x->status = sp ? strtol(sp + 1, NULL, 10) : 0;
        x->etag[0] = x->reqid[0] = 0;
        x->have_clen = 0;
        return n;
    }
    if ((n == 2 && p[0] == '\r' && p[1] == '\n') || (n == 1 && p[0] == '\n')) {
        /* the end of a response's headers */
        s3_req *r = x->r;
        if (r->grow && x->status >= 200 && x->status <= 299) {
            if (x->have_clen && x->clen > r->grow_max) {
                x->too_big = 1; /* announced: fail before reading any of the body */
                return 0;
            }
            if (r->admit && !r->admitted) {
                r->admitted = 1;
                r->admit(r->admit_user, x->have_clen ? x->clen : r->grow_max);
            }
        }
        return n;
    }
    const char *colon = memchr(p, ':', n);
    if (!colon) return n;
    size_t kn = (size_t)(colon - p), vn = n - kn - 1;
    const char *v = colon + 1;
    if (kn == 16 && !strncasecmp(p, "x-amz-request-id", kn))
        trim_copy(x->reqid, sizeof x->reqid, v, vn);
    else if (kn == 4 && !strncasecmp(p, "etag", kn))
        trim_copy(x->etag, sizeof x->etag, v, vn);
    else if (kn == 14 && !strncasecmp(p, "content-length", kn)) {
        char t[32];
        trim_copy(t, sizeof t, v, vn);
        x->clen = strtoull(t, NULL, 10);
        x->have_clen = 1;
    }
    return n;
}

static size_t on_body(char *p, size_t size, size_t nmemb, void *user) {
    xfer *x = user;
    s3_req *r = x->r;
    size_t n = size * nmemb;
    if (x->status < 200 || x->status > 299) {
        if (x->errbody.n < ERR_BODY_MAX)
            twn_str_append(&x->errbody, p,
                           n < ERR_BODY_MAX - x->errbody.n ? n : ERR_BODY_MAX - x->errbody.n);
        return n;
    }
    if (r->fixed) {
        if (x->status == 200 && r->off + x->base != 0) {
            x->ignored_range = 1; /* a whole object where a range was asked for */
            return 0;
        }
        size_t at = x->base + x->got;
        if (n > r->len - at) {
            /* a 200 for a range starting at 0: the object's first bytes are what we want */
            if (x->status == 200) {
                memcpy(r->fixed + at, p, r->len - at);
                x->got += r->len - at;
            }
            x->overflow = 1;
            return 0;
        }
        memcpy(r->fixed + at, p, n);
        x->got += n;
        return n;
    }
    if (r->grow) {
        if (r->grow->n + n > r->grow_max) {
            x->too_big = 1;
            return 0;
        }
        twn_str_append(r->grow, p, n);
    }
    x->got += n;
    return n;
}

static size_t on_read(char *buf, size_t size, size_t nitems, void *user) {
    xfer *x = user;
    size_t room = size * nitems, left = x->r->body_len - x->sent;
    size_t k = left < room ? left : room;
    if (k) memcpy(buf, (const char *)x->r->body + x->sent, k);
    x->sent += k;
    return k;
}

static int on_seek(void *user, curl_off_t off, int origin) {
    xfer *x = user;
    if (origin != SEEK_SET || off < 0 || (uint64_t)off > x->r->body_len) return CURL_SEEKFUNC_FAIL;
    x->sent = (size_t)off;
    return CURL_SEEKFUNC_OK;
}

/* "s3://bucket/key" (+ " bytes a-b") for messages. */
static void describe(const s3_req *r, char *out, size_t cap) {
    if (r->shown) {
        snprintf(out, cap, "%s", r->shown);
        return;
    }
    int k = snprintf(out, cap, "%s s3://%s/%s", r->method, r->bucket, r->key ? r->key : "");
    if (r->ranged && k > 0 && (size_t)k < cap)
        snprintf(out + k, cap - (size_t)k, " (bytes %" PRIu64 "-%" PRIu64 ")", r->off,
                 r->off + (r->len ? r->len - 1 : 0));
}

/* Text of the first element named `name` under the root (the caller xmlFree()s), or NULL. */
static xmlChar *child_text(xmlNode *parent, const char *name) {
    for (xmlNode *c = parent ? parent->children : NULL; c; c = c->next)
        if (c->type == XML_ELEMENT_NODE && !xmlStrcmp(c->name, (const xmlChar *)name))
            return xmlNodeGetContent(c);
    return NULL;
}

static xmlDoc *parse_xml(const char *p, size_t n, const char *name) {
    if (!n || n > INT32_MAX) return NULL;
    return xmlReadMemory(p, (int)n, name, NULL,
                         XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
}

/* "HTTP 403 SignatureDoesNotMatch: <message>" from an S3 error body (or the bare status). */
static void http_reason(long status, const twn_str *body, char *reqid, size_t reqid_cap, char *out,
                        size_t cap) {
    xmlDoc *d = body->n ? parse_xml(body->v, body->n, "error.xml") : NULL;
    xmlNode *root = d ? xmlDocGetRootElement(d) : NULL;
    if (root && !xmlStrcmp(root->name, (const xmlChar *)"Error")) {
        xmlChar *code = child_text(root, "Code"), *msg = child_text(root, "Message");
        xmlChar *rid = child_text(root, "RequestId");
        snprintf(out, cap, "HTTP %ld %s: %s", status, code ? (char *)code : "(no code)",
                 msg ? (char *)msg : "(no message)");
        if (!reqid[0] && rid) snprintf(reqid, reqid_cap, "%s", (char *)rid);
        xmlFree(code);
        xmlFree(msg);
        xmlFree(rid);
    } else if (status == 404) {
        snprintf(out, cap, "HTTP 404 Not Found (no such bucket or key)");
    } else if (status == 403) {
        snprintf(out, cap, "HTTP 403 Forbidden (access denied or a bad signature)");
    } else {
        snprintf(out, cap, "HTTP %ld", status);
    }
    if (d) xmlFreeDoc(d);
}

static int retryable_curl(CURLcode c) {
    switch (c) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
        return 1;
    default:
        return 0;
    }
}

static int retryable_status(long st) {
    return st == 429 || (st >= 500 && st <= 599);
}

static void build_url(twn_s3 *s, const s3_req *r, twn_str *url) {
    twn_str_reset(url);
    /* a bucket name with dots cannot be a TLS host label under *.s3.amazonaws.com's wildcard
     * certificate: such buckets always go path style */
    if (s->path_style || !r->bucket || strchr(r->bucket, '.')) {
        twn_str_printf(url, "%s://%s/", s->scheme, s->hostport);
        if (r->bucket) {
            enc(url, r->bucket, 0);
            if (r->key && r->key[0]) twn_str_append(url, "/", 1);
        }
    } else {
        twn_str_printf(url, "%s://%s.%s/", s->scheme, r->bucket, s->hostport);
    }
    if (r->key) enc(url, r->key, 1);
    if (r->query && r->query[0]) {
        twn_str_append(url, "?", 1);
        twn_str_puts(url, r->query);
    }
}

/* One attempt's curl setup.  The handle is reset (its connection cache survives the reset). */
static struct curl_slist *setup(twn_s3 *s, s3_req *r, xfer *x, const char *url, const char *sha) {
    CURL *c = s->curl;
    curl_easy_reset(c);
    char h[320];
    struct curl_slist *hl = NULL;
    snprintf(h, sizeof h, "x-amz-content-sha256: %s", sha);
    hl = curl_slist_append(hl, h);
    if (s->token) {
        twn_str t = {0};
        twn_str_printf(&t, "x-amz-security-token: %s", s->token);
        hl = curl_slist_append(hl, t.v);
        memset(t.v, 0, t.n);
        twn_str_free(&t);
    }
    if (r->content_type) {
        snprintf(h, sizeof h, "Content-Type: %s", r->content_type);
        hl = curl_slist_append(hl, h);
    }
    /* No "Expect:" to turn 100-continue off: curl 7.88 would put the removed header into
     * SignedHeaders and every server would then refuse the signature. */
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
    curl_easy_setopt(c, CURLOPT_AWS_SIGV4, s->sigv4);
    curl_easy_setopt(c, CURLOPT_USERNAME, s->access_key);
    curl_easy_setopt(c, CURLOPT_PASSWORD, s->secret_key);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, s->cfg.connect_timeout_ms);
    if (s->cfg.request_timeout_ms > 0)
        curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, s->cfg.request_timeout_ms);
    if (s->cfg.stall_timeout_s > 0) {
        curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
        curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, s->cfg.stall_timeout_s);
    }
    curl_easy_setopt(c, CURLOPT_BUFFERSIZE, S3_RECV_BUFFER);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, s->errbuf);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, x);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, x);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_SUPPRESS_CONNECT_HEADERS, 1L);
    if (!strcmp(r->method, "HEAD")) {
        curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
    } else if (!strcmp(r->method, "PUT")) {
        curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(c, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(c, CURLOPT_READDATA, x);
        curl_easy_setopt(c, CURLOPT_SEEKFUNCTION, on_seek);
        curl_easy_setopt(c, CURLOPT_SEEKDATA, x);
        curl_easy_setopt(c, CURLOPT_INFILESIZE_LARGE, (curl_off_t)r->body_len);
    } else if (!strcmp(r->method, "POST")) {
        curl_easy_setopt(c, CURLOPT_POST, 1L);
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, r->body ? (const char *)r->body : "");
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body_len);
    } else if (strcmp(r->method, "GET")) {
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, r->method);
    }
    if (r->ranged) {
        char range[64];
        uint64_t a = r->off + x->base, b = r->off + r->len - 1;
        snprintf(range, sizeof range, "%" PRIu64 "-%" PRIu64, a, b);
        curl_easy_setopt(c, CURLOPT_RANGE, range);
    }
    return hl;
}

/* Runs r with retries.  0: a 2xx (or a status the caller accepted via ok_*) with r->status set. */
static int perform(twn_s3 *s, s3_req *r, twn_err *err) {
    char what[600], sha[65];
    describe(r, what, sizeof what);
    if (r->body_len)
        sha256_hex(r->body, r->body_len, sha);
    else
        memcpy(sha, EMPTY_SHA256, 65);
    twn_str url = {0};
    build_url(s, r, &url);
    char reason[900] = "";
    char first_etag[S3_ETAG_MAX] = "";
    size_t base = 0;
    int rc = -1;
    int attempts = s->cfg.max_retries < 0 ? 1 : s->cfg.max_retries + 1;
    for (int attempt = 0; attempt < attempts; attempt++) {
        if (attempt) s->st.retries++;
        xfer x = {.r = r, .base = base};
        if (r->grow) twn_str_reset(r->grow);
        struct curl_slist *hl = setup(s, r, &x, url.v, sha);
        s->errbuf[0] = 0;
        s->st.requests++;
        CURLcode cc = curl_easy_perform(s->curl);
        curl_slist_free_all(hl);
        long conns = 0;
        curl_easy_getinfo(s->curl, CURLINFO_NUM_CONNECTS, &conns);
        s->st.connects += (uint64_t)conns;
        s->st.bytes_in += x.got;
        s->st.bytes_out += x.sent;
        curl_off_t retry_after = 0;
        curl_easy_getinfo(s->curl, CURLINFO_RETRY_AFTER, &retry_after);
        r->status = x.status;
        snprintf(r->request_id, sizeof r->request_id, "%s", x.reqid);
        int retry = 0;
        /* the ETag must not change under a read, across attempts or against the caller's */
        if (x.etag[0] && x.status >= 200 && x.status <= 299 && !strcmp(r->method, "GET")) {
            const char *want = r->want_etag ? r->want_etag : first_etag[0] ? first_etag : NULL;
            if (want && strcmp(want, x.etag)) {
                twn_err_set(err,
                            "s3: %s: the object changed: its ETag is now %s, expected %s "
                            "(x-amz-request-id %s)",
                            what, x.etag, want, x.reqid[0] ? x.reqid : "none");
                twn_str_free(&x.errbody);
                goto out;
            }
            snprintf(first_etag, sizeof first_etag, "%s", x.etag);
        }
        if (cc == CURLE_OK || (cc == CURLE_WRITE_ERROR && x.overflow && x.status == 200)) {
            if (x.status >= 200 && x.status <= 299) {
                r->got = x.base + x.got;
                snprintf(r->etag, sizeof r->etag, "%s", x.etag);
                r->content_length = x.clen;
                r->have_length = x.have_clen;
                twn_str_free(&x.errbody);
                rc = 0;
                goto out;
            }
            if ((x.status == 404 && r->ok_404) || (x.status == 409 && r->ok_409) ||
                (x.status == 416 && r->ok_416)) {
                twn_str_free(&x.errbody);
                rc = 0;
                goto out;
            }
            char rid[S3_REQID_MAX];
            snprintf(rid, sizeof rid, "%s", x.reqid);
            http_reason(x.status, &x.errbody, rid, sizeof rid, reason, sizeof reason);
            snprintf(r->request_id, sizeof r->request_id, "%s", rid);
            twn_str_free(&x.errbody);
            if (!retryable_status(x.status)) {
                twn_err_set(err, "s3: %s: %s (x-amz-request-id %s)", what, reason,
                            rid[0] ? rid : "none");
                goto out;
            }
            size_t k = strlen(reason);
            snprintf(reason + k, sizeof reason - k, " (x-amz-request-id %s)",
                     rid[0] ? rid : "none");
            retry = 1;
        } else {
            twn_str_free(&x.errbody);
            if (x.overflow) {
                twn_err_set(err, "s3: %s: the server sent more bytes than the range holds", what);
                goto out;
            }
            if (x.ignored_range) {
                twn_err_set(err, "s3: %s: the server ignored the Range header (HTTP 200)", what);
                goto out;
            }
            if (x.too_big) {
                twn_err_set(err, "s3: %s: the object is larger than the %zu-byte limit", what,
                            r->grow_max);
                goto out;
            }
            snprintf(reason, sizeof reason, "curl error %d (%s)%s%s", (int)cc,
                     curl_easy_strerror(cc), s->errbuf[0] ? ": " : "", s->errbuf);
            size_t k = strlen(reason);
            while (k && reason[k - 1] == '\n') reason[--k] = 0;
            if (!retryable_curl(cc)) {
                twn_err_set(err, "s3: %s: %s", what, reason);
                goto out;
            }
            retry = 1;
        }
        /* a ranged GET keeps what arrived intact (206 of our range) and asks for the rest */
        if (r->ranged && x.status == 206) base += x.got;
        if (retry && attempt + 1 < attempts) {
            double cap = s->cfg.backoff_base_s * (double)(1ull << (attempt < 30 ? attempt : 30));
            if (cap > s->cfg.backoff_max_s) cap = s->cfg.backoff_max_s;
            double d = cap * rnd01(s);
            double ra = (double)retry_after;
            if (ra > s->cfg.retry_after_max_s) ra = s->cfg.retry_after_max_s;
            if (ra > d) d = ra;
            s->st.slept_s += d;
            sleep_s(d);
        }
    }
    twn_err_set(err, "s3: %s: gave up after %d attempts; last: %s", what, attempts, reason);
out:
    twn_str_free(&url);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Operations

void twn_s3_objects_free(twn_s3_objects *l) {
    for (size_t i = 0; i < l->n; i++) {
        twn_free(l->v[i].key);
        twn_free(l->v[i].etag);
    }
    twn_free(l->v);
    memset(l, 0, sizeof *l);
}

/* Parses one ListObjectsV2 page: appends its objects; *token = the next continuation token or
 * NULL when the listing is complete. */
static int parse_list_page(const twn_str *body, const char *what, twn_s3_objects *out, char **token,
                           twn_err *err) {
    *token = NULL;
    xmlDoc *d = parse_xml(body->v, body->n, "ListBucketResult.xml");
    xmlNode *root = d ? xmlDocGetRootElement(d) : NULL;
    if (!root || xmlStrcmp(root->name, (const xmlChar *)"ListBucketResult")) {
        if (d) xmlFreeDoc(d);
        return twn_err_set(err,
                           "s3: %s: the response is not a ListBucketResult XML document (%zu "
                           "bytes)",
                           what, body->n);
    }
    int rc = 0;
    for (xmlNode *c = root->children; c && !rc; c = c->next) {
        if (c->type != XML_ELEMENT_NODE || xmlStrcmp(c->name, (const xmlChar *)"Contents"))
            continue;
        xmlChar *key = child_text(c, "Key"), *size = child_text(c, "Size");
        xmlChar *etag = child_text(c, "ETag");
        char *end = NULL;
        unsigned long long sz = size ? strtoull((char *)size, &end, 10) : 0;
        if (!key || !size || !end || *end || end == (char *)size) {
            rc = twn_err_set(err, "s3: %s: a <Contents> entry has no <Key> or a bad <Size> '%s'",
                             what, size ? (char *)size : "(missing)");
        } else {
            if (out->n == out->cap) {
                out->cap = out->cap ? 2 * out->cap : 64;
                out->v = twn_realloc(out->v, out->cap * sizeof *out->v);
            }
            twn_s3_object *o = &out->v[out->n++];
            o->key = twn_strdup((char *)key);
            o->size = sz;
            o->etag = twn_strdup(etag ? (char *)etag : "");
        }
        xmlFree(key);
        xmlFree(size);
        xmlFree(etag);
    }
    xmlChar *trunc = child_text(root, "IsTruncated");
    if (!rc && trunc && !xmlStrcmp(trunc, (const xmlChar *)"true")) {
        xmlChar *next = child_text(root, "NextContinuationToken");
        if (!next || !next[0])
            rc = twn_err_set(err,
                             "s3: %s: IsTruncated is true but there is no "
                             "NextContinuationToken",
                             what);
        else
            *token = twn_strdup((char *)next);
        xmlFree(next);
    }
    xmlFree(trunc);
    xmlFreeDoc(d);
    return rc;
}

int twn_s3_list(twn_s3 *s, const char *bucket, const char *prefix, twn_s3_objects *out,
                twn_err *err) {
    char what[600];
    snprintf(what, sizeof what, "list s3://%s/%s", bucket, prefix ? prefix : "");
    char *token = NULL;
    twn_str body = {0}, q = {0};
    int rc = 0;
    do {
        twn_str_reset(&q);
        if (token) qparam(&q, "continuation-token", token);
        qparam(&q, "list-type", "2");
        if (s->cfg.list_page_keys) {
            char mk[16];
            snprintf(mk, sizeof mk, "%u", s->cfg.list_page_keys);
            qparam(&q, "max-keys", mk);
        }
        if (prefix && prefix[0]) qparam(&q, "prefix", prefix);
        s3_req r = {.method = "GET",
                    .bucket = bucket,
                    .query = q.v,
                    .shown = what,
                    .grow = &body,
                    .grow_max = S3_LIST_MAX_XML};
        twn_free(token);
        token = NULL;
        if ((rc = perform(s, &r, err))) break;
        if ((rc = parse_list_page(&body, what, out, &token, err))) break;
    } while (token);
    twn_free(token);
    twn_str_free(&body);
    twn_str_free(&q);
    return rc;
}

int twn_s3_head(twn_s3 *s, const char *bucket, const char *key, uint64_t *size, char *etag,
                size_t etag_cap, twn_err *err) {
    s3_req r = {.method = "HEAD", .bucket = bucket, .key = key};
    if (perform(s, &r, err)) return -1;
    if (!r.have_length)
        return twn_err_set(err, "s3: HEAD s3://%s/%s: the response has no Content-Length", bucket,
                           key);
    *size = r.content_length;
    if (etag && etag_cap) snprintf(etag, etag_cap, "%s", r.etag);
    return 0;
}

int twn_s3_get_range(twn_s3 *s, const char *bucket, const char *key, const char *etag, uint64_t off,
                     size_t n, void *buf, size_t *got, twn_err *err) {
    *got = 0;
    if (!n) return 0;
    s3_req r = {.method = "GET",
                .bucket = bucket,
                .key = key,
                .ranged = 1,
                .off = off,
                .len = n,
                .fixed = buf,
                .want_etag = etag && etag[0] ? etag : NULL,
                .ok_416 = 1};
    if (perform(s, &r, err)) return -1;
    *got = r.status == 416 ? 0 : r.got;
    return 0;
}

int twn_s3_get(twn_s3 *s, const char *bucket, const char *key, size_t max_bytes, uint8_t **data,
               size_t *n, twn_err *err) {
    return twn_s3_get_admit(s, bucket, key, max_bytes, NULL, NULL, data, n, err);
}

int twn_s3_get_admit(twn_s3 *s, const char *bucket, const char *key, size_t max_bytes,
                     void (*admit)(void *user, uint64_t bytes), void *user, uint8_t **data,
                     size_t *n, twn_err *err) {
    *data = NULL;
    *n = 0;
    twn_str body = {0};
    s3_req r = {.method = "GET",
                .bucket = bucket,
                .key = key,
                .grow = &body,
                .grow_max = max_bytes,
                .admit = admit,
                .admit_user = user};
    if (perform(s, &r, err)) {
        twn_str_free(&body);
        return -1;
    }
    if (!body.v) twn_str_append(&body, "", 0);
    *data = (uint8_t *)body.v;
    *n = body.n;
    return 0;
}

int twn_s3_put(twn_s3 *s, const char *bucket, const char *key, const void *data, size_t n,
               twn_err *err) {
    s3_req r = {.method = "PUT", .bucket = bucket, .key = key, .body = data, .body_len = n};
    return perform(s, &r, err);
}

int twn_s3_delete(twn_s3 *s, const char *bucket, const char *key, twn_err *err) {
    s3_req r = {.method = "DELETE", .bucket = bucket, .key = key, .ok_404 = 1};
    return perform(s, &r, err);
}

int twn_s3_create_bucket(twn_s3 *s, const char *bucket, twn_err *err) {
    if (!valid_bucket(bucket, strlen(bucket)))
        return twn_err_set(err, "s3: '%s' is not a valid S3 bucket name", bucket);
    char what[128];
    snprintf(what, sizeof what, "create bucket s3://%s", bucket);
    s3_req r = {.method = "PUT", .bucket = bucket, .shown = what, .ok_409 = 1};
    return perform(s, &r, err);
}

// ------------------------------------------------------------------------------------------------
// Uploads

struct twn_s3_upload {
    twn_s3 *s;
    char *bucket, *key;
    char *upload_id; /* NULL until the first part is sent */
    uint8_t *buf;
    size_t n;
    char **etags;
    unsigned parts;
};

int twn_s3_upload_begin(twn_s3 *s, const char *bucket, const char *key, twn_s3_upload **out,
                        twn_err *err) {
    *out = NULL;
    if (!key || !key[0]) return twn_err_set(err, "s3: upload to s3://%s/ needs a key", bucket);
    twn_s3_upload *u = twn_calloc(1, sizeof *u);
    u->buf = twn_try_alloc(s->cfg.part_size);
    if (!u->buf) {
        twn_free(u);
        return twn_err_set(err, "s3: cannot allocate a %zu-byte part buffer for s3://%s/%s",
                           s->cfg.part_size, bucket, key);
    }
    u->s = s;
    u->bucket = twn_strdup(bucket);
    u->key = twn_strdup(key);
    *out = u;
    return 0;
}

unsigned twn_s3_upload_parts(const twn_s3_upload *u) {
    return u->parts;
}

static int upload_initiate(twn_s3_upload *u, twn_err *err) {
    char what[600];
    snprintf(what, sizeof what, "start multipart upload s3://%s/%s", u->bucket, u->key);
    twn_str body = {0};
    s3_req r = {.method = "POST",
                .bucket = u->bucket,
                .key = u->key,
                .query = "uploads=",
                .shown = what,
                .grow = &body,
                .grow_max = 1u << 20};
    int rc = perform(u->s, &r, err);
    if (!rc) {
        xmlDoc *d = parse_xml(body.v, body.n, "InitiateMultipartUploadResult.xml");
        xmlNode *root = d ? xmlDocGetRootElement(d) : NULL;
        xmlChar *id = root ? child_text(root, "UploadId") : NULL;
        if (!id || !id[0])
            rc = twn_err_set(err, "s3: %s: the response has no <UploadId>", what);
        else
            u->upload_id = twn_strdup((char *)id);
        xmlFree(id);
        if (d) xmlFreeDoc(d);
    }
    twn_str_free(&body);
    return rc;
}

static int upload_part(twn_s3_upload *u, twn_err *err) {
    if (!u->upload_id && upload_initiate(u, err)) return -1;
    char what[700], num[16];
    unsigned part = u->parts + 1;
    snprintf(what, sizeof what, "upload part %u of s3://%s/%s", part, u->bucket, u->key);
    snprintf(num, sizeof num, "%u", part);
    twn_str q = {0};
    qparam(&q, "partNumber", num);
    qparam(&q, "uploadId", u->upload_id);
    s3_req r = {.method = "PUT",
                .bucket = u->bucket,
                .key = u->key,
                .query = q.v,
                .shown = what,
                .body = u->buf,
                .body_len = u->n};
    int rc = perform(u->s, &r, err);
    twn_str_free(&q);
    if (rc) return -1;
    if (!r.etag[0]) return twn_err_set(err, "s3: %s: the response has no ETag", what);
    u->etags = twn_realloc(u->etags, part * sizeof *u->etags);
    u->etags[u->parts++] = twn_strdup(r.etag);
    u->n = 0;
    return 0;
}

int twn_s3_upload_write(twn_s3_upload *u, const void *data, size_t n, twn_err *err) {
    const uint8_t *p = data;
    size_t cap = u->s->cfg.part_size;
    while (n) {
        size_t k = cap - u->n < n ? cap - u->n : n;
        memcpy(u->buf + u->n, p, k);
        u->n += k;
        p += k;
        n -= k;
        /* a full part is sent only once more data arrives, so the last part is never empty */
        if (u->n == cap && n && upload_part(u, err)) return -1;
    }
    return 0;
}

static void upload_free(twn_s3_upload *u) {
    for (unsigned i = 0; i < u->parts; i++) twn_free(u->etags[i]);
    twn_free(u->etags);
    twn_free(u->buf);
    twn_free(u->bucket);
    twn_free(u->key);
    twn_free(u->upload_id);
    twn_free(u);
}

void twn_s3_upload_abort(twn_s3_upload *u) {
    if (!u) return;
    if (u->upload_id) {
        twn_str q = {0};
        qparam(&q, "uploadId", u->upload_id);
        s3_req r = {
            .method = "DELETE", .bucket = u->bucket, .key = u->key, .query = q.v, .ok_404 = 1};
        twn_err ignored;
        perform(u->s, &r, &ignored);
        twn_str_free(&q);
    }
    upload_free(u);
}

int twn_s3_upload_finish(twn_s3_upload *u, twn_err *err) {
    if (!u->upload_id) {
        int rc = twn_s3_put(u->s, u->bucket, u->key, u->buf, u->n, err);
        upload_free(u);
        return rc;
    }
    if (u->n && upload_part(u, err)) {
        twn_s3_upload_abort(u);
        return -1;
    }
    xmlDoc *d = xmlNewDoc((const xmlChar *)"1.0");
    xmlNode *root = xmlNewNode(NULL, (const xmlChar *)"CompleteMultipartUpload");
    xmlDocSetRootElement(d, root);
    for (unsigned i = 0; i < u->parts; i++) {
        char num[16];
        snprintf(num, sizeof num, "%u", i + 1);
        xmlNode *p = xmlNewChild(root, NULL, (const xmlChar *)"Part", NULL);
        xmlNewTextChild(p, NULL, (const xmlChar *)"PartNumber", (const xmlChar *)num);
        xmlNewTextChild(p, NULL, (const xmlChar *)"ETag", (const xmlChar *)u->etags[i]);
    }
    xmlChar *xml = NULL;
    int xml_len = 0;
    xmlDocDumpMemory(d, &xml, &xml_len);
    xmlFreeDoc(d);
    char what[600];
    snprintf(what, sizeof what, "complete multipart upload s3://%s/%s (%u parts)", u->bucket,
             u->key, u->parts);
    twn_str q = {0}, body = {0};
    qparam(&q, "uploadId", u->upload_id);
    s3_req r = {.method = "POST",
                .bucket = u->bucket,
                .key = u->key,
                .query = q.v,
                .shown = what,
                .body = xml,
                .body_len = (size_t)xml_len,
                .content_type = "application/xml",
                .grow = &body,
                .grow_max = 1u << 20};
    int rc = perform(u->s, &r, err);
    xmlFree(xml);
    twn_str_free(&q);
    if (!rc) {
        /* S3 can answer 200 with an <Error> body when completion fails late */
        xmlDoc *rd = parse_xml(body.v, body.n, "CompleteMultipartUploadResult.xml");
        xmlNode *rr = rd ? xmlDocGetRootElement(rd) : NULL;
        if (rr && !xmlStrcmp(rr->name, (const xmlChar *)"Error")) {
            char reason[700], rid[S3_REQID_MAX];
            snprintf(rid, sizeof rid, "%s", r.request_id);
            http_reason(r.status, &body, rid, sizeof rid, reason, sizeof reason);
            rc = twn_err_set(err, "s3: %s: %s (x-amz-request-id %s)", what, reason,
                             rid[0] ? rid : "none");
        }
        if (rd) xmlFreeDoc(rd);
    }
    twn_str_free(&body);
    if (rc)
        twn_s3_upload_abort(u);
    else
        upload_free(u);
    return rc;
}
