/* test_curve.c — CURVE over real tcp://127.0.0.1 sockets, the ZAP allow-list, key files and
 * `twn keygen`.
 *
 * Server and client live in separate ZeroMQ contexts, as in separate processes.  "Refused" is
 * shown three ways: no message reaches the server within a timeout, the client's or server's
 * monitor reports the failed handshake (ZAP 400 / mechanism mismatch / bad crypto), and the ZAP
 * handler's counters say what it decided. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "common/curve.h"
#include "common/metrics.h"
#include "common/transport.h"
#include "coordinator/service.h"
#include "gate_service/gate.h"
#include "index/service.h"
#include "worker/worker.h"
#include "tests/testutil.h"
#include "tests/unit/pipeline_harness.h"
#include "tests/unit/shard_out.h"
#include "util/mem.h"

#define Z TWN_CURVE_Z85_LEN + 1

typedef struct {
    char pub[Z], sec[Z];
} keypair;

static keypair newkeys(void) {
    keypair k;
    twn_err err;
    assert_int_equal(twn_curve_keypair(k.pub, k.sec, &err), 0);
    assert_int_equal((int)strlen(k.pub), 40);
    return k;
}

static twn_curve_cfg server_cfg(const keypair *server, const char *const *allowed, size_t n) {
    twn_curve_cfg c = {0};
    c.enabled = 1;
    memcpy(c.server_public, server->pub, Z);
    memcpy(c.server_secret, server->sec, Z);
    twn_err err;
    assert_int_equal(twn_curve_allow_new(allowed, n, &c.allow, &err), 0);
    return c;
}

static twn_curve_cfg client_cfg(const char *server_pub, const keypair *client) {
    twn_curve_cfg c = {0};
    c.enabled = 1;
    memcpy(c.server_public, server_pub, Z);
    if (client) {
        memcpy(c.client_public, client->pub, Z);
        memcpy(c.client_secret, client->sec, Z);
    }
    return c;
}

/* A server (ROUTER or PULL) bound on an ephemeral loopback port with CURVE. */
typedef struct {
    void *ctx, *sock, *mon;
    twn_zap *zap;
    char ep[TWN_ENDPOINT_MAX];
} server;

static void *monitor(void *ctx, void *sock, const char *name) {
    char ep[64];
    snprintf(ep, sizeof ep, "inproc://mon-%s", name);
    assert_int_equal(zmq_socket_monitor(sock, ep,
                                        ZMQ_EVENT_HANDSHAKE_SUCCEEDED |
                                            ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                                            ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                                            ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL),
                     0);
    void *m = zmq_socket(ctx, ZMQ_PAIR);
    int zero = 0;
    zmq_setsockopt(m, ZMQ_LINGER, &zero, sizeof zero);
    assert_int_equal(zmq_connect(m, ep), 0);
    return m;
}

/* The next monitor event within timeout_ms: its id (0 on timeout) and value. */
static int next_event(void *mon, int timeout_ms, uint32_t *value) {
    zmq_setsockopt(mon, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms);
    uint8_t b[6];
    int n = zmq_recv(mon, b, sizeof b, 0);
    if (n < 0) return 0;
    assert_int_equal(n, 6);
    char addr[256];
    zmq_recv(mon, addr, sizeof addr, 0);
    uint16_t ev;
    memcpy(&ev, b, 2);
    memcpy(value, b + 2, 4);
    return ev;
}

/* Skips other events until `want` (returns 1, its value in *value) or the timeout (0).  Fails
 * the test when a handshake succeeds on the way, unless that is what it waits for. */
static int wait_event(void *mon, int want, int timeout_ms, uint32_t *value) {
    for (int waited = 0; waited < timeout_ms; waited += 100) {
        int ev = next_event(mon, 100, value);
        if (ev == want) return 1;
        if (ev == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) fail_msg("a handshake succeeded");
    }
    return 0;
}

/* The first failed-handshake event (its id), 0 on timeout; fails on a successful handshake. */
static int wait_failure(void *mon, int timeout_ms, uint32_t *value) {
    for (int waited = 0; waited < timeout_ms; waited += 100) {
        int ev = next_event(mon, 100, value);
        if (ev == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) fail_msg("a handshake succeeded");
        if (ev) return ev;
    }
    return 0;
}

static server server_start(int type, const twn_curve_cfg *cfg, const char *name) {
    server s = {0};
    twn_err err;
    s.ctx = zmq_ctx_new();
    twn_sock_opts o = twn_sock_opts_default();
    o.linger_ms = 0;
    s.sock = twn_sock_new(s.ctx, type, &o, &err);
    assert_non_null(s.sock);
    s.mon = monitor(s.ctx, s.sock, name);
    if (twn_curve_server(s.ctx, s.sock, "tcp://127.0.0.1:*", cfg, &s.zap, &err))
        fail_msg("%s", err.msg);
    assert_non_null(s.zap);
    if (twn_sock_bind(s.sock, "tcp://127.0.0.1:*", s.ep, sizeof s.ep, &err))
        fail_msg("%s", err.msg);
    return s;
}

static void server_stop(server *s) {
    zmq_close(s->mon);
    twn_sock_close(s->sock);
    twn_zap_release(s->zap); /* after the socket: see curve.h */
    zmq_ctx_term(s->ctx);
}

typedef struct {
    void *ctx, *sock, *mon;
} client;

static client client_start(int type, const char *ep, const twn_curve_cfg *cfg, const char *id,
                           const char *name, int watch) {
    client c = {0};
    twn_err err;
    c.ctx = zmq_ctx_new();
    twn_sock_opts o = twn_sock_opts_default();
    o.linger_ms = 0;
    o.routing_id = id;
    o.sndtimeo_ms = 0;
    c.sock = twn_sock_new(c.ctx, type, &o, &err);
    assert_non_null(c.sock);
    c.mon = monitor(c.ctx, c.sock, name);
    if (twn_curve_client(c.sock, ep, cfg, &err)) fail_msg("%s", err.msg);
    if (watch && twn_curve_watch(c.ctx, c.sock, ep, cfg, &err)) fail_msg("%s", err.msg);
    if (twn_sock_connect(c.sock, ep, &err)) fail_msg("%s", err.msg);
    return c;
}

static void client_stop(client *c) {
    zmq_close(c->mon);
    twn_sock_close(c->sock);
    zmq_ctx_term(c->ctx);
}

static int send_beat(void *sock, uint64_t seq) {
    Twn__Heartbeat hb = TWN__HEARTBEAT__INIT;
    hb.seq = seq;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    twn_frame_opts fo = twn_frame_opts_default();
    twn_err err;
    return twn_send_msg(sock, NULL, &env, &fo, &err);
}

/* Waits for a Heartbeat; returns its seq, or 0 when nothing arrives within timeout_ms. */
static uint64_t recv_beat(void *sock, int timeout_ms, twn_peer_id *from) {
    twn_frame_opts fo = twn_frame_opts_default();
    Twn__Envelope *m = NULL;
    twn_err err;
    twn_recv_status s = twn_recv_msg(sock, timeout_ms, &fo, from, &m, &err);
    if (s == TWN_RECV_TIMEOUT) return 0;
    if (s != TWN_RECV_MSG) fail_msg("recv: %d %s", (int)s, err.msg);
    assert_int_equal(m->body_case, TWN__ENVELOPE__BODY_HEARTBEAT);
    uint64_t seq = m->heartbeat->seq;
    twn_msg_free(m);
    return seq;
}

static int getopt_int(void *sock, int opt) {
    int v = -1;
    size_t n = sizeof v;
    assert_int_equal(zmq_getsockopt(sock, opt, &v, &n), 0);
    return v;
}

// ------------------------------------------------------------------------------------------------
// Sockets

static void test_available(void **st) {
    (void)st;
    assert_int_equal(twn_curve_available(), 1);
}

static void test_listed_client_round_trip(void **st) {
    (void)st;
    keypair sk = newkeys(), ck = newkeys(), other = newkeys();
    const char *allowed[] = {other.pub, ck.pub};
    twn_curve_cfg scfg = server_cfg(&sk, allowed, 2), ccfg = client_cfg(sk.pub, &ck);
    server s = server_start(ZMQ_ROUTER, &scfg, "rt-s");
    assert_int_equal(getopt_int(s.sock, ZMQ_MECHANISM), ZMQ_CURVE);
    assert_int_equal(getopt_int(s.sock, ZMQ_CURVE_SERVER), 1);
    client c = client_start(ZMQ_DEALER, s.ep, &ccfg, "gate-1", "rt-c", 0);
    uint32_t v;
    assert_int_equal(next_event(c.mon, 5000, &v), ZMQ_EVENT_HANDSHAKE_SUCCEEDED);
    assert_int_equal(send_beat(c.sock, 42), 0);
    twn_peer_id from;
    assert_int_equal(recv_beat(s.sock, 5000, &from), 42);
    char buf[TWN_PEER_ID_STR_MAX];
    assert_string_equal(twn_peer_id_str(&from, buf, sizeof buf), "gate-1");
    /* and back */
    Twn__Heartbeat hb = TWN__HEARTBEAT__INIT;
    hb.seq = 43;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    twn_frame_opts fo = twn_frame_opts_default();
    twn_err err;
    if (twn_send_msg(s.sock, &from, &env, &fo, &err)) fail_msg("%s", err.msg);
    assert_int_equal(recv_beat(c.sock, 5000, NULL), 43);
    twn_zap_stats zs = twn_zap_stats_of(s.zap);
    assert_int_equal(zs.allowed, 1);
    assert_int_equal(zs.refused, 0);
    client_stop(&c);
    server_stop(&s);
    twn_curve_free(&scfg);
    twn_curve_free(&ccfg);
}

static void test_unlisted_client_refused(void **st) {
    (void)st;
    keypair sk = newkeys(), listed = newkeys(), stranger = newkeys();
    const char *allowed[] = {listed.pub};
    twn_curve_cfg scfg = server_cfg(&sk, allowed, 1), ccfg = client_cfg(sk.pub, &stranger);
    server s = server_start(ZMQ_ROUTER, &scfg, "ul-s");
    client c = client_start(ZMQ_DEALER, s.ep, &ccfg, "intruder", "ul-c", 1);
    uint32_t v = 0;
    double before = 0;
    twn_metrics_get(twn_metrics_default(), "twn_curve_handshakes_total", "result=refused", &before);
    /* The client's side, as a role sees it while it waits for its Welcome (gate.c,
     * index/service.c): the ZAP status relayed by the server.  (The watch is the socket's one
     * monitor, so the test's own client monitor is silent here.) */
    twn_err err;
    int refused = 0;
    for (int i = 0; i < 500 && !refused; i++)
        if (!(refused = twn_curve_refused(c.sock, &err))) usleep(10000);
    assert_int_equal(refused, -1);
    char want[512];
    snprintf(want, sizeof want,
             "curve: the server at %s refused this process's key (ZAP status 400): is its public "
             "key on the server's allowed_clients_file?",
             s.ep);
    assert_string_equal(err.msg, want);
    assert_true(wait_event(s.mon, ZMQ_EVENT_HANDSHAKE_FAILED_AUTH, 5000, &v));
    assert_int_equal(v, 400);
    send_beat(c.sock, 7); /* queued at best; never delivered */
    assert_int_equal(recv_beat(s.sock, 500, NULL), 0);
    twn_zap_stats zs = twn_zap_stats_of(s.zap);
    assert_int_equal(zs.allowed, 0);
    assert_true(zs.refused >= 1);
    double after = 0;
    assert_int_equal(twn_metrics_get(twn_metrics_default(), "twn_curve_handshakes_total",
                                     "result=refused", &after),
                     0);
    assert_int_equal((uint64_t)(after - before), zs.refused);
    /* metrics carry counts only: no key, public or secret, in the exposition */
    twn_str text = {0};
    twn_metrics_render(twn_metrics_default(), &text);
    twn_str_append(&text, "", 1);
    assert_non_null(strstr(text.v, "twn_curve_handshakes_total{result=\"refused\"}"));
    const char *keys[] = {sk.pub, sk.sec, listed.pub, stranger.pub, stranger.sec};
    for (int i = 0; i < 5; i++) assert_null(strstr(text.v, keys[i]));
    twn_str_free(&text);
    client_stop(&c);
    server_stop(&s);
    twn_curve_free(&scfg);
    twn_curve_free(&ccfg);
}

static void test_plain_client_refused(void **st) {
    (void)st;
    keypair sk = newkeys(), listed = newkeys();
    const char *allowed[] = {listed.pub};
    twn_curve_cfg scfg = server_cfg(&sk, allowed, 1);
    server s = server_start(ZMQ_ROUTER, &scfg, "pl-s");
    client c = client_start(ZMQ_DEALER, s.ep, NULL, "plain", "pl-c", 0);
    assert_int_equal(getopt_int(c.sock, ZMQ_MECHANISM), ZMQ_NULL);
    uint32_t v = 0;
    /* Both ends see the mismatch; when the client hangs up first the server reports no detail. */
    int ev = wait_failure(s.mon, 5000, &v);
    if (ev == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL)
        assert_int_equal(v, ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH);
    else
        assert_int_equal(ev, ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL);
    send_beat(c.sock, 7);
    assert_int_equal(recv_beat(s.sock, 500, NULL), 0);
    twn_zap_stats zs = twn_zap_stats_of(s.zap);
    assert_int_equal(zs.allowed, 0); /* refused before ZAP is asked */
    client_stop(&c);
    server_stop(&s);
    twn_curve_free(&scfg);
}

static void test_wrong_server_key_fails(void **st) {
    (void)st;
    keypair sk = newkeys(), ck = newkeys(), fake = newkeys();
    const char *allowed[] = {ck.pub};
    twn_curve_cfg scfg = server_cfg(&sk, allowed, 1), ccfg = client_cfg(fake.pub, &ck);
    server s = server_start(ZMQ_ROUTER, &scfg, "wk-s");
    client c = client_start(ZMQ_DEALER, s.ep, &ccfg, "confused", "wk-c", 0);
    uint32_t v = 0;
    assert_true(wait_event(s.mon, ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL, 5000, &v));
    assert_int_equal(v, ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC);
    send_beat(c.sock, 7);
    assert_int_equal(recv_beat(s.sock, 500, NULL), 0);
    assert_int_equal(twn_zap_stats_of(s.zap).allowed, 0);
    client_stop(&c);
    server_stop(&s);
    twn_curve_free(&scfg);
    twn_curve_free(&ccfg);
}

/* The data path (gate PUSH -> indexer PULL), and an indexer-style client that uses the server
 * keypair as its identity (accepted without being on the list). */
static void test_push_pull_and_server_key_client(void **st) {
    (void)st;
    keypair sk = newkeys(), ck = newkeys();
    const char *allowed[] = {ck.pub};
    twn_curve_cfg scfg = server_cfg(&sk, allowed, 1), gcfg = client_cfg(sk.pub, &ck);
    twn_curve_cfg icfg = server_cfg(&sk, allowed, 1); /* no client keypair: uses the server's */
    server s = server_start(ZMQ_PULL, &scfg, "pp-s");
    client g = client_start(ZMQ_PUSH, s.ep, &gcfg, NULL, "pp-g", 0);
    client i = client_start(ZMQ_PUSH, s.ep, &icfg, NULL, "pp-i", 0);
    uint32_t v;
    assert_int_equal(next_event(g.mon, 5000, &v), ZMQ_EVENT_HANDSHAKE_SUCCEEDED);
    assert_int_equal(next_event(i.mon, 5000, &v), ZMQ_EVENT_HANDSHAKE_SUCCEEDED);
    assert_int_equal(send_beat(g.sock, 1), 0);
    assert_int_equal(send_beat(i.sock, 2), 0);
    uint64_t a = recv_beat(s.sock, 5000, NULL), b = recv_beat(s.sock, 5000, NULL);
    assert_int_equal(a + b, 3);
    assert_int_equal(twn_zap_stats_of(s.zap).allowed, 2);
    client_stop(&g);
    client_stop(&i);
    server_stop(&s);
    twn_curve_free(&scfg);
    twn_curve_free(&gcfg);
    twn_curve_free(&icfg);
}

/* inproc:// and ipc:// stay plain; a disabled or NULL config changes nothing. */
static void test_only_tcp_gets_curve(void **st) {
    (void)st;
    keypair sk = newkeys();
    const char *allowed[] = {sk.pub};
    twn_curve_cfg scfg = server_cfg(&sk, allowed, 1);
    void *ctx = zmq_ctx_new();
    twn_err err;
    void *r = twn_sock_new(ctx, ZMQ_ROUTER, NULL, &err);
    twn_zap *zap = (twn_zap *)1;
    assert_int_equal(twn_curve_server(ctx, r, "inproc://plain", &scfg, &zap, &err), 0);
    assert_null(zap);
    assert_int_equal(twn_curve_server(ctx, r, "ipc:///tmp/x", &scfg, &zap, &err), 0);
    assert_null(zap);
    assert_int_equal(twn_curve_server(ctx, r, "tcp://127.0.0.1:*", NULL, &zap, &err), 0);
    assert_null(zap);
    assert_int_equal(twn_curve_client(r, "inproc://plain", &scfg, &err), 0);
    assert_int_equal(getopt_int(r, ZMQ_MECHANISM), ZMQ_NULL);
    /* What a server or client lacks is named with its config key. */
    twn_curve_cfg nosec = client_cfg(sk.pub, NULL);
    assert_int_equal(twn_curve_server(ctx, r, "tcp://127.0.0.1:*", &nosec, &zap, &err), -1);
    assert_string_equal(err.msg, "curve: tcp://127.0.0.1:*: a CURVE server needs the server "
                                 "secret key (security.server_secret_key_file)");
    assert_int_equal(twn_curve_client(r, "tcp://127.0.0.1:5", &nosec, &err), -1);
    assert_string_equal(err.msg, "curve: tcp://127.0.0.1:5: a CURVE client needs its own keypair "
                                 "(security.client_secret_key_file) or the server's");
    twn_curve_cfg noallow = scfg;
    noallow.allow = NULL;
    assert_int_equal(twn_curve_server(ctx, r, "tcp://127.0.0.1:*", &noallow, &zap, &err), -1);
    assert_string_equal(err.msg, "curve: tcp://127.0.0.1:*: a CURVE server needs the allow-list "
                                 "of client keys (security.allowed_clients_file)");
    /* One handler per context, shared; a different list in the same context is refused. */
    twn_zap *z1 = NULL, *z2 = NULL, *z3 = NULL;
    void *r2 = twn_sock_new(ctx, ZMQ_PULL, NULL, &err),
         *r3 = twn_sock_new(ctx, ZMQ_PULL, NULL, &err);
    assert_int_equal(twn_curve_server(ctx, r, "tcp://127.0.0.1:*", &scfg, &z1, &err), 0);
    assert_int_equal(twn_curve_server(ctx, r2, "tcp://127.0.0.1:*", &scfg, &z2, &err), 0);
    assert_ptr_equal(z1, z2);
    twn_curve_cfg other = server_cfg(&sk, NULL, 0);
    assert_int_equal(twn_curve_server(ctx, r3, "tcp://127.0.0.1:*", &other, &z3, &err), -1);
    assert_null(z3);
    assert_string_equal(err.msg, "curve: this ZeroMQ context already has a ZAP handler with a "
                                 "different allow-list or server key; give each server "
                                 "configuration its own context");
    twn_sock_close(r);
    twn_sock_close(r2);
    twn_sock_close(r3);
    twn_zap_release(z1);
    twn_zap_release(z2);
    zmq_ctx_term(ctx);
    twn_curve_free(&scfg);
    twn_curve_free(&other);
}

/* limits.max_message_bytes on the wire: ZMQ_MAXMSGSIZE makes libzmq drop a larger message (and
 * that connection) before allocating it; the peer reconnects and smaller messages go on. */
static void test_wire_limit(void **st) {
    (void)st;
    keypair sk = newkeys(), ck = newkeys();
    const char *allowed[] = {ck.pub};
    twn_curve_cfg scfg = server_cfg(&sk, allowed, 1), ccfg = client_cfg(sk.pub, &ck);
    twn_frame_opts small = twn_frame_opts_default();
    small.max_size = 1024;
    assert_int_equal(twn_wire_limit(&small), 1024 + 12 + 256);
    twn_sock_opts so = twn_sock_opts_default();
    assert_int_equal(so.max_msg_bytes, (64 << 20) + 12 + 256);
    so.linger_ms = 0;
    so.max_msg_bytes = twn_wire_limit(&small);
    server s = {0};
    twn_err err;
    s.ctx = zmq_ctx_new();
    s.sock = twn_sock_new(s.ctx, ZMQ_PULL, &so, &err);
    assert_non_null(s.sock);
    int64_t got = 0;
    size_t gl = sizeof got;
    zmq_getsockopt(s.sock, ZMQ_MAXMSGSIZE, &got, &gl);
    assert_int_equal(got, 1292);
    s.mon = monitor(s.ctx, s.sock, "wl-s");
    assert_int_equal(twn_curve_server(s.ctx, s.sock, "tcp://127.0.0.1:*", &scfg, &s.zap, &err), 0);
    assert_int_equal(twn_sock_bind(s.sock, "tcp://127.0.0.1:*", s.ep, sizeof s.ep, &err), 0);
    client c = client_start(ZMQ_PUSH, s.ep, &ccfg, NULL, "wl-c", 0);
    uint32_t v;
    assert_int_equal(next_event(c.mon, 5000, &v), ZMQ_EVENT_HANDSHAKE_SUCCEEDED);
    static uint8_t big[5000];
    assert_int_equal(twn_sock_send(c.sock, big, sizeof big, &err), 0);
    /* Messages in flight on a dropped connection are lost: send once the client is back. */
    assert_true(wait_event(c.mon, ZMQ_EVENT_HANDSHAKE_SUCCEEDED, 5000, &v));
    assert_int_equal(send_beat(c.sock, 2), 0);
    /* The big one never arrives (twn_recv_msg would report it as bad); the beat does. */
    assert_int_equal(recv_beat(s.sock, 5000, NULL), 2);
    assert_int_equal(recv_beat(s.sock, 200, NULL), 0);
    assert_int_equal(twn_zap_stats_of(s.zap).allowed, 2); /* it had to handshake again */
    client_stop(&c);
    server_stop(&s);
    twn_curve_free(&scfg);
    twn_curve_free(&ccfg);
}

// ------------------------------------------------------------------------------------------------
// Key files

static char *path_in(const char *dir, const char *name) {
    char *p = twn_malloc(strlen(dir) + strlen(name) + 2);
    sprintf(p, "%s/%s", dir, name);
    return p;
}

static void trim(char *s) {
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == ' ')) s[--n] = 0;
}

static void test_key_files(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("curve-keys");
    char *prefix = path_in(dir, "server"), *kpath = path_in(dir, "server.key"),
         *ppath = path_in(dir, "server.pub");
    char pub[Z], sec[Z], pub2[Z], pubf[Z];
    twn_err err;
    assert_int_equal(twn_curve_write_keys(prefix, pub, &err), 0);
    struct stat sb;
    assert_int_equal(stat(kpath, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    assert_int_equal(twn_curve_read_secret(kpath, sec, pub2, &err), 0);
    assert_string_equal(pub2, pub);
    assert_int_equal(twn_curve_read_public(ppath, pubf, &err), 0);
    assert_string_equal(pubf, pub);
    size_t n;
    char *text = tu_read(ppath, &n);
    assert_int_equal((int)n, 41); /* exactly the key and a newline: cat *.pub >> allowed */
    free(text);

    /* never overwritten */
    assert_int_equal(twn_curve_write_keys(prefix, NULL, &err), -1);
    char want[2048];
    snprintf(want, sizeof want,
             "%s: key files already exist; not overwriting them (remove %s and %s)", prefix, kpath,
             ppath);
    assert_string_equal(err.msg, want);

    /* group/other access refused, naming the file, never the key */
    assert_int_equal(chmod(kpath, 0644), 0);
    assert_int_equal(twn_curve_read_secret(kpath, sec, pub2, &err), -1);
    snprintf(want, sizeof want,
             "%s: secret key file has mode 0644; it must not be accessible by group or others "
             "(chmod 600; in Kubernetes, copy it out of the Secret volume as deploy/k8s does)",
             kpath);
    assert_string_equal(err.msg, want);
    assert_null(strstr(err.msg, sec));
    assert_int_equal(chmod(kpath, 0400), 0);
    assert_int_equal(twn_curve_read_secret(kpath, sec, pub2, &err), 0);

    /* malformed: the message names file, line and length, not the text */
    char *bad = path_in(dir, "bad.key");
    const char *btext = "# comment\n\nnot-a-key-but-secret-text\n";
    tu_write(bad, btext, strlen(btext));
    chmod(bad, 0600);
    assert_int_equal(twn_curve_read_secret(bad, sec, pub2, &err), -1);
    snprintf(want, sizeof want,
             "%s: line 3: expected a 40-character Z85 secret key, found 25 characters that do "
             "not decode",
             bad);
    assert_string_equal(err.msg, want);
    char two[128];
    snprintf(two, sizeof two, "%s\n%s\n", pub, pub);
    tu_write(bad, two, strlen(two));
    assert_int_equal(twn_curve_read_secret(bad, sec, pub2, &err), -1);
    snprintf(want, sizeof want, "%s: line 2: a second key; a secret key file holds exactly one",
             bad);
    assert_string_equal(err.msg, want);
    tu_write(bad, "# only a comment\n", 17);
    assert_int_equal(twn_curve_read_public(bad, pub2, &err), -1);
    snprintf(want, sizeof want, "%s: no public key in the file (expected one Z85 line)", bad);
    assert_string_equal(err.msg, want);
    char *missing = path_in(dir, "missing.key");
    assert_int_equal(twn_curve_read_secret(missing, sec, pub2, &err), -1);
    snprintf(want, sizeof want, "%s: cannot open secret key file: No such file or directory",
             missing);
    assert_string_equal(err.msg, want);

    /* twn_curve_load: a public key file that does not match the secret */
    char *cprefix = path_in(dir, "client"), *ckey = path_in(dir, "client.key"),
         *cpub = path_in(dir, "client.pub");
    char cpubv[Z];
    assert_int_equal(twn_curve_write_keys(cprefix, cpubv, &err), 0);
    twn_curve_cfg c;
    twn_curve_files f = {.server_secret_key_file = kpath, .server_public_key_file = cpub};
    assert_int_equal(twn_curve_load(&c, &f, &err), -1);
    snprintf(want, sizeof want, "%s: the server public key does not match the secret key in %s",
             cpub, kpath);
    assert_string_equal(err.msg, want);
    twn_curve_files ok = {.server_public_key_file = ppath,
                          .client_secret_key_file = ckey,
                          .client_public_key_file = cpub};
    assert_int_equal(twn_curve_load(&c, &ok, &err), 0);
    assert_string_equal(c.server_public, pub);
    assert_string_equal(c.server_secret, "");
    assert_string_equal(c.client_public, cpubv);
    twn_curve_free(&c);
    assert_int_equal(c.client_secret[0], 0); /* wiped */
    twn_curve_files none = {0};
    assert_int_equal(twn_curve_load(&c, &none, &err), -1);
    assert_string_equal(err.msg, "curve: security.curve is on but neither "
                                 "security.server_secret_key_file nor "
                                 "security.server_public_key_file is set");
    free(prefix), free(kpath), free(ppath), free(bad), free(missing);
    free(cprefix), free(ckey), free(cpub);
}

static void test_allow_list_file(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("curve-allow");
    keypair a = newkeys(), b = newkeys();
    char text[512];
    snprintf(text, sizeof text, "# gates\n%s gate-1\n\n  %s\tworker-7  \n%s duplicate\n", a.pub,
             b.pub, a.pub);
    char *p = path_in(dir, "allowed");
    tu_write(p, text, strlen(text));
    twn_curve_allow *al = NULL;
    twn_err err;
    assert_int_equal(twn_curve_allow_load(p, &al, &err), 0);
    assert_int_equal(twn_curve_allow_count(al), 2);
    twn_curve_allow_free(al);
    snprintf(text, sizeof text, "%s\n%.39s\n", a.pub, b.sec);
    tu_write(p, text, strlen(text));
    assert_int_equal(twn_curve_allow_load(p, &al, &err), -1);
    char want[1024];
    snprintf(want, sizeof want,
             "%s: line 2: expected a 40-character Z85 public key, found 39 characters that do "
             "not decode",
             p);
    assert_string_equal(err.msg, want);
    assert_null(al);
    free(p);
}

static void test_keygen_command(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("curve-cli");
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "(%s keygen --out %s/gate-1 2>/dev/null)", TWN_BIN, dir);
    assert_int_equal(tu_run(cmd, &out), 0);
    trim(out);
    char *kpath = path_in(dir, "gate-1.key");
    char sec[Z], pub[Z];
    twn_err err;
    assert_int_equal(twn_curve_read_secret(kpath, sec, pub, &err), 0);
    assert_string_equal(out, pub); /* stdout is exactly the public key */
    assert_null(strstr(out, sec));
    free(out);
    snprintf(cmd, sizeof cmd, "%s keygen --out %s/gate-1 2>&1", TWN_BIN, dir);
    assert_int_equal(tu_run(cmd, &out), 1);
    assert_non_null(strstr(out, "key files already exist; not overwriting them"));
    assert_null(strstr(out, sec));
    free(out);
    /* A role refuses a readable secret key at start-up, naming the file, not the key. */
    assert_int_equal(chmod(kpath, 0644), 0);
    snprintf(cmd, sizeof cmd,
             "%s gate --engine null --dim 16 --security.curve true "
             "--security.server_public_key_file %s/gate-1.pub --security.client_secret_key_file "
             "%s",
             TWN_BIN, dir, kpath);
    assert_int_equal(tu_run(cmd, &out), 1);
    char want[2048];
    snprintf(
        want, sizeof want,
        "twn gate: %s: secret key file has mode 0644; it must not be accessible by group or "
        "others (chmod 600; in Kubernetes, copy it out of the Secret volume as deploy/k8s does)\n",
        kpath);
    assert_string_equal(out, want);
    free(out);
    free(kpath);
}

// ------------------------------------------------------------------------------------------------
// The roles over tcp:// with CURVE, each in its own context as in its own process

/* A loopback port nothing listens on right now (bound, read, released). */
static void free_endpoint(char *ep, size_t cap) {
    void *ctx = zmq_ctx_new();
    twn_err err;
    void *s = twn_sock_new(ctx, ZMQ_PULL, NULL, &err);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    assert_int_equal(twn_sock_bind(s, "tcp://127.0.0.1:*", ep, cap, &err), 0);
    twn_sock_close(s);
    zmq_ctx_term(ctx);
}

static size_t count_lines(const char *path) {
    size_t n, lines = 0;
    char *b = tu_read(path, &n);
    for (size_t i = 0; i < n; i++) lines += b[i] == '\n';
    free(b);
    return lines;
}

/* Coordinator + indexer + gate + worker over tcp:// with CURVE and the null engine: every item
 * indexed once, the oversized line dead-lettered naming its size and the limit, and a gate whose
 * key is not on the list never gets a Welcome. */
static void test_roles_over_curve(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("curve-roles");
    char in[1024], journal[1024], dead[1024], shard_dir[1024], line[4096];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    snprintf(journal, sizeof journal, "%s/journal", dir);
    snprintf(dead, sizeof dead, "%s/dead_letter.jsonl", dir);
    snprintf(shard_dir, sizeof shard_dir, "%s/shard-00000", dir);
    FILE *f = fopen(in, "w");
    for (int i = 0; i < 40; i++) fprintf(f, "{\"id\": \"item-%d\", \"text\": \"text %d\"}\n", i, i);
    memset(line, 'x', 2000);
    line[2000] = 0;
    long big_at = ftell(f);
    fprintf(f, "{\"id\": \"big-1\", \"text\": \"%s\"}\n", line); /* line 41: 2027 bytes */
    fclose(f);

    keypair sk = newkeys(), gk = newkeys(), wk = newkeys(), uk = newkeys();
    const char *allowed[] = {gk.pub, wk.pub}; /* the indexer uses the server keypair */
    twn_curve_cfg server = server_cfg(&sk, allowed, 2);
    twn_curve_cfg gate = client_cfg(sk.pub, &gk), worker = client_cfg(sk.pub, &wk),
                  intruder = client_cfg(sk.pub, &uk);
    char control[TWN_ENDPOINT_MAX], shard_ep[TWN_ENDPOINT_MAX];
    free_endpoint(control, sizeof control);
    free_endpoint(shard_ep, sizeof shard_ep);
    const char *inputs[] = {in};
    const char *eps[] = {shard_ep};

    ph_role jobs[5];
    memset(jobs, 0, sizeof jobs);
    void *ctx[5];
    for (int i = 0; i < 5; i++) ctx[i] = zmq_ctx_new();
    ph_role *c = &jobs[0], *ix = &jobs[1];
    c->kind = PH_COORDINATOR;
    twn_coord_cfg_default(&c->cc);
    c->cc.zctx = ctx[0];
    c->cc.endpoint = control;
    c->cc.inputs = inputs;
    c->cc.n_inputs = 1;
    c->cc.unit_items = 16;
    c->cc.journal_path = journal;
    c->cc.dead_letter_path = dead;
    c->cc.model_hash = "null";
    c->cc.shards = 1;
    c->cc.shard_endpoints = eps;
    c->cc.curve = &server;
    ix->kind = PH_INDEXER;
    twn_indexer_cfg_default(&ix->ic);
    ix->ic.zctx = ctx[1];
    ix->ic.control = control;
    ix->ic.id = "indexer-0";
    ix->ic.endpoint = shard_ep;
    ix->ic.dir = shard_dir;
    ix->ic.shard = 0;
    ix->ic.n_shards = 1;
    ix->ic.dim = 16;
    ix->ic.model = "null";
    ix->ic.model_hash = "null";
    ix->ic.curve = &server;
    const twn_curve_cfg *keys[3] = {&gate, &worker, &intruder};
    const char *ids[3] = {"gate-0", "worker-0", "gate-intruder"};
    for (int k = 0; k < 3; k++) {
        ph_role *j = &jobs[2 + k];
        j->kind = k == 1 ? PH_WORKER : PH_GATE;
        twn_role_cfg_default(&j->rc);
        j->rc.zctx = ctx[2 + k];
        j->rc.control = control;
        j->rc.id = ids[k];
        j->rc.null_dim = 16;
        j->rc.src.max_item_bytes = 1024; /* limits.max_item_bytes */
        j->rc.curve = keys[k];
    }
    jobs[4].rc.connect_timeout_s = 30; /* a bound only: the refusal ends it at once */

    ph_role_start(&jobs[1]);
    ph_role_start(&jobs[0]);
    /* The intruder first, while no gate can finish the job (and close the ROUTER) under it. */
    ph_role_start(&jobs[4]);
    ph_role_join(&jobs[4], 120);
    for (int i = 2; i < 4; i++) ph_role_start(&jobs[i]);
    for (int i = 0; i < 4; i++) ph_role_join(&jobs[i], 120);
    for (int i = 0; i < 4; i++)
        if (jobs[i].status) fail_msg("role %d: %s", i, jobs[i].err.msg);
    for (int i = 0; i < 5; i++) zmq_ctx_term(ctx[i]);

    assert_int_equal(c->sum.items, 41);
    assert_int_equal(c->sum.rejected, 1);
    assert_int_equal(c->sum.easy + c->sum.hard, 40);
    assert_true(c->sum.hard > 0); /* the worker took part */
    /* the intruder: refused by the ZAP handler, and told so (no waiting out the timeout) */
    assert_int_equal(jobs[4].status, -1);
    snprintf(line, sizeof line,
             "gate-intruder: curve: the server at %s refused this process's key (ZAP status "
             "400): is its public key on the server's allowed_clients_file?",
             control);
    assert_string_equal(jobs[4].err.msg, line);

    /* the oversized item is dead-lettered, not dropped: its line, size and the limit */
    assert_int_equal(count_lines(dead), 1);
    size_t n;
    char *dl = tu_read(dead, &n);
    json_error_t je;
    json_t *o = json_loads(dl, JSON_DECODE_INT_AS_REAL, &je); /* unit keys are u64 */
    assert_non_null(o);
    json_t *ref = json_object_get(o, "ref");
    assert_int_equal((long)json_number_value(json_object_get(ref, "line")), 41);
    assert_int_equal((long)json_number_value(json_object_get(ref, "length")), 2027);
    assert_int_equal((long)json_number_value(json_object_get(ref, "offset")), big_at);
    snprintf(line, sizeof line, "%s: line 41 (byte %ld): the line is 2027 bytes; the limit is 1024",
             in, big_at);
    assert_string_equal(json_string_value(json_object_get(o, "reason")), line);
    json_decref(o);
    free(dl);

    /* every good item is in the shard once */
    char snap[1200], items[1300];
    tp_snapshot_dir(shard_dir, snap, sizeof snap);
    snprintf(items, sizeof items, "%s/items.jsonl", snap);
    assert_int_equal(count_lines(items), 40);

    twn_curve_free(&server);
    twn_curve_free(&gate);
    twn_curve_free(&worker);
    twn_curve_free(&intruder);
}

/* The role commands as separate processes over tcp:// with CURVE from one config file: the job
 * completes, a gate with an unlisted key never gets in (the coordinator logs the refusal with
 * its public key), and no secret key text appears in any output. */
static void test_processes_over_curve(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("curve-procs");
    char path[1200], control[TWN_ENDPOINT_MAX], shard_ep[TWN_ENDPOINT_MAX];
    free_endpoint(control, sizeof control);
    free_endpoint(shard_ep, sizeof shard_ep);
    snprintf(path, sizeof path, "%s/items.jsonl", dir);
    FILE *f = fopen(path, "w");
    for (int i = 0; i < 100; i++) fprintf(f, "{\"id\": \"p%d\", \"text\": \"text %d\"}\n", i, i);
    fclose(f);
    snprintf(path, sizeof path, "%s/job.yaml", dir);
    f = fopen(path, "w");
    fprintf(f,
            "job: {inputs: [items.jsonl], out: out, engine: null, dim: 16, shards: 1, "
            "unit_items: 20}\n"
            "coordinator: {listen: \"%s\"}\n"
            "indexer: {endpoints: [\"%s\"]}\n"
            "metrics: {listen: \"\"}\n"
            "security:\n  curve: true\n  server_secret_key_file: server.key\n"
            "  server_public_key_file: server.pub\n  allowed_clients_file: allowed\n",
            control, shard_ep);
    fclose(f);
    char cmd[4096], *out = NULL;
    snprintf(cmd, sizeof cmd,
             "cd %s || exit 9; T=%s; for k in server gate worker intruder; do $T keygen --out $k "
             "2>/dev/null >/dev/null || exit 9; done; cat gate.pub worker.pub > allowed; "
             "mkdir -p out; "
             "(timeout 60 $T indexer --config job.yaml --indexer.shard 0 >ix.log 2>&1; echo $? "
             ">ix.rc) & "
             "(timeout 60 $T coordinator --config job.yaml >co.log 2>&1; echo $? >co.rc) & "
             /* the intruder first, while no gate can finish the job under it */
             "timeout 60 $T gate --config job.yaml --security.client_secret_key_file "
             "intruder.key >x.log 2>&1; echo $? >x.rc; "
             "(timeout 60 $T gate --config job.yaml --security.client_secret_key_file gate.key "
             ">g.log 2>&1; echo $? >g.rc) & "
             "(timeout 60 $T worker --config job.yaml --security.client_secret_key_file "
             "worker.key >w.log 2>&1; echo $? >w.rc) & "
             "wait; cat co.rc ix.rc g.rc w.rc x.rc | tr '\\n' ' '",
             dir, TWN_BIN);
    assert_int_equal(tu_run(cmd, &out), 0);
    assert_string_equal(out, "0 0 0 0 1 "); /* the intruder fails */
    free(out);
    size_t n;
    char *co = NULL, *logs[5], want[512];
    const char *names[5] = {"co.log", "ix.log", "g.log", "w.log", "x.log"};
    for (int i = 0; i < 5; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        logs[i] = tu_read(path, &n);
    }
    co = logs[0];
    snprintf(want, sizeof want,
             "curve: the server at %s refused this process's key (ZAP status 400): is its public "
             "key on the server's allowed_clients_file?\n",
             control);
    assert_non_null(strstr(logs[4], want));
    assert_non_null(strstr(co, "items 100 "));
    char sec[Z], pub[Z];
    twn_err err;
    snprintf(path, sizeof path, "%s/intruder.key", dir);
    assert_int_equal(twn_curve_read_secret(path, sec, pub, &err), 0);
    snprintf(want, sizeof want, "public key %s is not on the allow-list", pub);
    assert_non_null(strstr(co, want));
    const char *keys[4] = {"server", "gate", "worker", "intruder"};
    for (int k = 0; k < 4; k++) {
        snprintf(path, sizeof path, "%s/%s.key", dir, keys[k]);
        assert_int_equal(twn_curve_read_secret(path, sec, pub, &err), 0);
        for (int i = 0; i < 5; i++)
            if (strstr(logs[i], sec)) fail_msg("%s's secret key is in %s", keys[k], names[i]);
    }
    for (int i = 0; i < 5; i++) free(logs[i]);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_available),
        cmocka_unit_test(test_listed_client_round_trip),
        cmocka_unit_test(test_unlisted_client_refused),
        cmocka_unit_test(test_plain_client_refused),
        cmocka_unit_test(test_wrong_server_key_fails),
        cmocka_unit_test(test_push_pull_and_server_key_client),
        cmocka_unit_test(test_only_tcp_gets_curve),
        cmocka_unit_test(test_wire_limit),
        cmocka_unit_test(test_key_files),
        cmocka_unit_test(test_allow_list_file),
        cmocka_unit_test(test_keygen_command),
        cmocka_unit_test(test_roles_over_curve),
        cmocka_unit_test(test_processes_over_curve),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
