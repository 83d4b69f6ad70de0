/* s3.h — a small S3 client on libcurl (SigV4 through CURLOPT_AWS_SIGV4) for the S3 source and for
 * outputs: ListObjectsV2, HEAD, ranged GET, PUT, multipart upload.
 *
 * What curl 7.88 leaves to the caller, done here:
 *   * the x-amz-content-sha256 header (sha256 of the body; S3 and s3rver require it, curl then
 *     signs with it as the payload hash);
 *   * a canonical URL: the key percent-encoded per RFC 3986 segment by segment ('/' kept), the
 *     query sorted by name with names and values encoded ("?continuation-token=..&list-type=2&
 *     max-keys=..&prefix=.."), and every parameter given a value ("?uploads=") — curl signs the
 *     path and query exactly as they appear in the URL;
 *   * x-amz-security-token for temporary credentials (curl signs every header we add).
 *
 * Credentials and places come from the standard variables unless the config sets them:
 * AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION (then
 * AWS_DEFAULT_REGION, then us-east-1) and AWS_ENDPOINT_URL (else
 * https://s3.<region>.amazonaws.com). The secret and the session token never appear in a message:
 * errors name the operation, the s3://bucket/key, the HTTP status, S3's error code and message and
 * the x-amz-request-id.
 *
 * Retries: 5xx, 429, timeouts (connect, stalled transfer, total), refused / reset / truncated
 * connections are retried up to max_retries times with exponential backoff and full jitter
 * (a random delay in [0, min(backoff_max, backoff_base * 2^attempt)]), never sooner than a
 * Retry-After the server sent (capped at retry_after_max_s).  A ranged GET that broke part-way
 * resumes from the first byte it does not have.  4xx other than 429 fail at once.
 *
 * A client owns one CURL easy handle, so consecutive requests reuse its connection (keep-alive).
 * Not thread-safe: use one client per thread. */
#ifndef TWN_COMMON_S3_H
#define TWN_COMMON_S3_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

typedef struct twn_s3_config {
    const char *endpoint;      /* "http://127.0.0.1:4568"; NULL: $AWS_ENDPOINT_URL or AWS */
    const char *region;        /* NULL: $AWS_REGION, $AWS_DEFAULT_REGION, "us-east-1" */
    const char *access_key;    /* NULL: $AWS_ACCESS_KEY_ID */
    const char *secret_key;    /* NULL: $AWS_SECRET_ACCESS_KEY */
    const char *session_token; /* NULL: $AWS_SESSION_TOKEN (unset: none) */
    int path_style;            /* 1 http://host/bucket/key, 0 http://bucket.host/key,
                                  -1 (default): path style when an endpoint is given */
    int max_retries;           /* retries after the first attempt (default 5) */
    double backoff_base_s;     /* first backoff ceiling (default 0.1 s) */
    double backoff_max_s;      /* backoff ceiling (default 10 s) */
    double retry_after_max_s;  /* longest Retry-After honored (default 30 s) */
    long connect_timeout_ms;   /* default 5000 */
    long request_timeout_ms;   /* whole request, 0 = none (default 0: objects can be large) */
    long stall_timeout_s;      /* fail a transfer that moves < 1 byte/s for this long (30) */
    unsigned list_page_keys;   /* ListObjectsV2 max-keys, 0 = the server's default (1000) */
    size_t part_size;          /* multipart part size, >= 5 MiB (default 8 MiB) */
} twn_s3_config;

/* The defaults above, endpoint/credentials NULL (taken from the environment at open). */
twn_s3_config twn_s3_config_default(void);

typedef struct twn_s3 twn_s3;

/* Resolves the config against the environment and creates the client.  Fails without an access
 * key and a secret, or with an endpoint that is not http(s)://host[:port]. */
int twn_s3_open(const twn_s3_config *cfg, twn_s3 **out, twn_err *err);
void twn_s3_close(twn_s3 *s);

/* Counters since open (for tests and benchmarks). */
typedef struct twn_s3_stats {
    uint64_t requests;  /* HTTP attempts, retries included */
    uint64_t retries;   /* attempts after a retryable failure */
    uint64_t connects;  /* new TCP connections opened */
    uint64_t bytes_in;  /* response body bytes received */
    uint64_t bytes_out; /* request body bytes sent */
    double slept_s;     /* time spent in backoff */
} twn_s3_stats;
twn_s3_stats twn_s3_get_stats(const twn_s3 *s);

// ------------------------------------------------------------------------------------------------
// s3:// URIs

typedef struct twn_s3_uri {
    char *bucket;
    char *key; /* "" when the URI names the bucket only; a prefix or a key */
} twn_s3_uri;

/* "s3://bucket", "s3://bucket/", "s3://bucket/some/prefix".  The bucket must be a valid S3 bucket
 * name (3..63 of [a-z0-9.-], starting and ending with a letter or digit). */
int twn_s3_uri_parse(const char *uri, twn_s3_uri *out, twn_err *err);
void twn_s3_uri_free(twn_s3_uri *u);
int twn_s3_is_uri(const char *s); /* starts with "s3://" */

// ------------------------------------------------------------------------------------------------
// Objects

typedef struct twn_s3_object {
    char *key;
    uint64_t size;
    char *etag; /* as S3 sends it, quotes included */
} twn_s3_object;

typedef struct twn_s3_objects {
    twn_s3_object *v;
    size_t n, cap;
} twn_s3_objects;

void twn_s3_objects_free(twn_s3_objects *l);

/* Every object under `prefix` ("" for all), in S3's order (UTF-8 binary order of keys), following
 * continuation tokens; appended to *out. */
int twn_s3_list(twn_s3 *s, const char *bucket, const char *prefix, twn_s3_objects *out,
                twn_err *err);

/* Size and ETag (quotes included; etag may be NULL, else etag_cap >= 80) of an object. */
int twn_s3_head(twn_s3 *s, const char *bucket, const char *key, uint64_t *size, char *etag,
                size_t etag_cap, twn_err *err);

/* Bytes [off, off+n) into buf; *got < n only when the object ends first.  When etag is not NULL
 * the object must still have it (else: an error saying the object changed). */
int twn_s3_get_range(twn_s3 *s, const char *bucket, const char *key, const char *etag, uint64_t off,
                     size_t n, void *buf, size_t *got, twn_err *err);

/* A whole (small) object: *data (twn_free) holds *n bytes plus a NUL.  Objects larger than
 * max_bytes fail ("the object is larger than the N-byte limit"): before any of the body is read
 * when the response announces its Content-Length, else once max_bytes have arrived. */
int twn_s3_get(twn_s3 *s, const char *bucket, const char *key, size_t max_bytes, uint8_t **data,
               size_t *n, twn_err *err);

/* twn_s3_get, and admit(user, bytes) is called once, when the 2xx response's headers are in and
 * before its body is read, with the bytes it will hold (its Content-Length, or max_bytes when it
 * sends none; never more than max_bytes).  admit may wait: a caller bounding the bytes it
 * receives at once reserves them there, and gives them back after the call, whatever it
 * returned (admit was not called when the GET failed before a 2xx response). */
int twn_s3_get_admit(twn_s3 *s, const char *bucket, const char *key, size_t max_bytes,
                     void (*admit)(void *user, uint64_t bytes), void *user, uint8_t **data,
                     size_t *n, twn_err *err);

/* One PUT (objects up to 5 GiB; use the upload for larger ones). */
int twn_s3_put(twn_s3 *s, const char *bucket, const char *key, const void *data, size_t n,
               twn_err *err);
int twn_s3_delete(twn_s3 *s, const char *bucket, const char *key, twn_err *err);
/* Creates a bucket; one that already exists and is ours is not an error. */
int twn_s3_create_bucket(twn_s3 *s, const char *bucket, twn_err *err);

// ------------------------------------------------------------------------------------------------
// Streaming upload: a single PUT when everything fits in one part, else a multipart upload whose
// parts are part_size bytes.  Nothing is visible under the key before finish succeeds.

typedef struct twn_s3_upload twn_s3_upload;

int twn_s3_upload_begin(twn_s3 *s, const char *bucket, const char *key, twn_s3_upload **out,
                        twn_err *err);
int twn_s3_upload_write(twn_s3_upload *u, const void *data, size_t n, twn_err *err);
/* Sends what is left and completes; frees u whatever happens (on failure the multipart upload
 * is aborted). */
int twn_s3_upload_finish(twn_s3_upload *u, twn_err *err);
/* Abandons the upload (aborting a multipart upload on the server, best effort); frees u. */
void twn_s3_upload_abort(twn_s3_upload *u);
/* Parts sent so far (0 while the data still fits one part). */
unsigned twn_s3_upload_parts(const twn_s3_upload *u);

#endif
