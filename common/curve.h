/* curve.h — CURVE encryption and client authentication for the tcp:// sockets between processes.
 *
 * Who holds which key (DESIGN.md §3: coordinator ROUTER, indexer PULLs; gates, workers and
 * indexers connect to them):
 *   - The servers (the coordinator and every indexer) share ONE server keypair (a k8s Secret):
 *     clients need only its public key, and an indexer restarted elsewhere keeps the same key.
 *   - Every client process (gate, worker, indexer as a DEALER of the coordinator) has its own
 *     client keypair.  A server accepts a client only when its public key is on the allow-list
 *     file (one Z85 public key a line), or is the server public key itself: whoever holds the
 *     server secret can impersonate a server anyway, so an indexer may use the server keypair as
 *     its client identity instead of a key of its own.
 *   - Authentication is a ZAP handler (RFC 27): a thread with a REP socket on
 *     inproc://zeromq.zap.01, one per ZeroMQ context, started by the first server socket of that
 *     context (twn_curve_server) and stopped when the last one releases it.  It answers 200 for a
 *     listed key and 400 for anything else; refusals are logged with the peer address and the
 *     (public) key, and counted in twn_curve_handshakes_total{result="allowed"|"refused"} (the
 *     process's metrics registry; no key ever appears in a label).
 *   - Only tcp:// endpoints get CURVE.  inproc:// (threads of one process) and ipc:// (one host,
 *     guarded by the socket file's permissions) stay plain; so does everything when the config is
 *     NULL or disabled.
 *
 * Key files are Z85 text (40 characters for 32 bytes) on one line; lines starting with '#' and
 * blank lines are ignored.  A secret key file must not be accessible by group or others (0600 or
 * 0400), else it is refused, as ssh does.  In k8s a Secret volume is group-readable under
 * fsGroup, so deploy/k8s copies the keys out with mode 0400 in an init container.  Secret keys are
 * never printed, logged or put in an error message: errors name the file and what is wrong with
 * it, never its contents.  twn_curve_free wipes them from memory.
 *
 * Why the handler must be up before the first handshake: libzmq 4.3 without the draft API has no
 * ZMQ_ZAP_ENFORCE_DOMAIN, and a CURVE server whose context has no ZAP handler accepts every client
 * that knows the server public key.  twn_curve_server therefore starts the handler before it sets
 * ZMQ_CURVE_SERVER, and callers release it only after closing the socket. */
#ifndef TWN_COMMON_CURVE_H
#define TWN_COMMON_CURVE_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

#define TWN_CURVE_Z85_LEN    40 /* Z85 text of a 32-byte key, without the NUL */
#define TWN_CURVE_ZAP_DOMAIN "twn"

typedef struct twn_curve_allow twn_curve_allow; /* a loaded allow-list of client public keys */

typedef struct twn_curve_cfg {
    int enabled;                               /* 0: every socket plain, as with a NULL cfg */
    char server_public[TWN_CURVE_Z85_LEN + 1]; /* everyone */
    char server_secret[TWN_CURVE_Z85_LEN + 1]; /* servers only; "" elsewhere */
    char client_public[TWN_CURVE_Z85_LEN + 1]; /* clients; "" = use the server keypair */
    char client_secret[TWN_CURVE_Z85_LEN + 1];
    twn_curve_allow *allow; /* servers: the allowed client keys (owned; twn_curve_free) */
} twn_curve_cfg;

/* The files behind a twn_curve_cfg (the security.* config keys); NULL or "" = not given. */
typedef struct twn_curve_files {
    const char *server_secret_key_file; /* servers: the shared server secret (0600) */
    const char *server_public_key_file; /* clients: the server public key; servers: cross-check */
    const char *client_secret_key_file; /* clients: own secret (0600) */
    const char *client_public_key_file; /* optional cross-check of the derived client public key */
    const char *allowed_clients_file;   /* servers: one Z85 public key a line */
} twn_curve_files;

/* 1 when this libzmq was built with CURVE (zmq_has("curve")). */
int twn_curve_available(void);

// ------------------------------------------------------------------------------------------------
// Keys and key files

/* A fresh keypair (Z85, NUL-terminated). */
int twn_curve_keypair(char pub[TWN_CURVE_Z85_LEN + 1], char sec[TWN_CURVE_Z85_LEN + 1],
                      twn_err *err);

/* Writes PREFIX.key (the secret, mode 0600) and PREFIX.pub; refuses to overwrite either file.
 * `pub` (may be NULL) receives the public key. */
int twn_curve_write_keys(const char *prefix, char pub[TWN_CURVE_Z85_LEN + 1], twn_err *err);

/* Reads a secret key file (refused when group/other have any access, or when it does not hold
 * exactly one Z85 key) and derives its public key. */
int twn_curve_read_secret(const char *path, char sec[TWN_CURVE_Z85_LEN + 1],
                          char pub[TWN_CURVE_Z85_LEN + 1], twn_err *err);
int twn_curve_read_public(const char *path, char pub[TWN_CURVE_Z85_LEN + 1], twn_err *err);

/* Loads an allow-list file: one Z85 public key a line ('#' comments and blank lines ignored;
 * text after the key and a space is a name used in logs).  At most 65536 keys. */
int twn_curve_allow_load(const char *path, twn_curve_allow **out, twn_err *err);
/* The parsers behind the two loaders, on text in memory (`name` is used in messages as the file
 * name; the messages never quote the text). */
int twn_curve_allow_parse(const char *text, size_t n, const char *name, twn_curve_allow **out,
                          twn_err *err);
int twn_curve_key_parse(const char *text, size_t n, const char *name, int secret,
                        char out[TWN_CURVE_Z85_LEN + 1], twn_err *err);
/* An allow-list from keys in memory (tests, config). */
int twn_curve_allow_new(const char *const *keys_z85, size_t n, twn_curve_allow **out, twn_err *err);
size_t twn_curve_allow_count(const twn_curve_allow *a);
void twn_curve_allow_free(twn_curve_allow *a);

/* Fills *c from files (enabled = 1): server secret -> server keypair (checked against the server
 * public file when both are given), client secret -> client keypair, allow-list.  What a role
 * needs is checked when a socket is set up, so one loader serves every role. */
int twn_curve_load(twn_curve_cfg *c, const twn_curve_files *f, twn_err *err);
/* Wipes the secret keys and frees the allow-list. */
void twn_curve_free(twn_curve_cfg *c);

// ------------------------------------------------------------------------------------------------
// Sockets

typedef struct twn_zap twn_zap; /* a reference to the ZAP handler of one context */

/* Call before binding `sock` on `endpoint` (a server: ROUTER, PULL).  When cfg is enabled and the
 * endpoint is tcp://: takes a reference on the context's ZAP handler (starting it with
 * cfg->allow), then sets ZMQ_CURVE_SERVER, the server secret and ZAP domain "twn".  *zap receives
 * the reference (NULL when nothing was done); release it AFTER closing the socket.  Fails when
 * the server secret or the allow-list is missing. */
int twn_curve_server(void *zctx, void *sock, const char *endpoint, const twn_curve_cfg *cfg,
                     twn_zap **zap, twn_err *err);

/* Call before connecting `sock` to `endpoint` (a client: DEALER, PUSH).  When cfg is enabled and
 * the endpoint is tcp://: sets the server public key and the client keypair (the server keypair
 * when no client keypair was loaded).  Fails when neither is available. */
int twn_curve_client(void *sock, const char *endpoint, const twn_curve_cfg *cfg, twn_err *err);

/* Watches a client socket's handshakes (a ZeroMQ monitor) so that a refusal by the server can be
 * reported instead of waited out: twn_curve_refused is -1 with "the server at ... refused this
 * process's key (ZAP status 400) ..." once the server's ZAP handler has said no.  Nothing is
 * watched unless cfg is enabled and the endpoint is tcp://.  It takes the socket's one monitor
 * slot (zmq_socket_monitor).  twn_curve_unwatch (also done by twn_sock_close) ends it; call all
 * three from the socket's thread. */
int twn_curve_watch(void *zctx, void *sock, const char *endpoint, const twn_curve_cfg *cfg,
                    twn_err *err);
int twn_curve_refused(void *sock, twn_err *err);
void twn_curve_unwatch(void *sock);

/* Drops a reference; the last one stops the handler thread (within ~50 ms).  NULL is fine. */
void twn_zap_release(twn_zap *z);

typedef struct twn_zap_stats {
    uint64_t allowed; /* ZAP 200 */
    uint64_t refused; /* ZAP 400: unknown key, wrong mechanism or domain */
} twn_zap_stats;

/* Counters of the handler behind `z` (zeros for NULL). */
twn_zap_stats twn_zap_stats_of(const twn_zap *z);

#endif
