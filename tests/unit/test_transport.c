/* test_transport.c — frames (raw, zstd, oversized, corrupt), envelopes, and real ZeroMQ sockets
 * over inproc, ipc and tcp loopback: ROUTER_MANDATORY errors, credit flow, heartbeat expiry and an
 * exact PUSH/PULL vector batch.  Every socket has ZMQ_LINGER 0 and every wait has a deadline. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "common/transport.h"
#include "tests/testutil.h"
#include "util/clock.h"
#include "util/mem.h"

static void expect_msg(const twn_err *err, const char *want) {
    if (strcmp(err->msg, want)) fail_msg("error\n  %s\nis not\n  %s", err->msg, want);
}

static void expect_prefix(const twn_err *err, const char *want) {
    if (strncmp(err->msg, want, strlen(want)))
        fail_msg("error\n  %s\ndoes not start with\n  %s", err->msg, want);
}

static twn_sock_opts test_sock_opts(void) {
    twn_sock_opts o = twn_sock_opts_default();
    o.linger_ms = 0;
    o.sndtimeo_ms = 2000;
    return o;
}

// ------------------------------------------------------------------------------------------------
// Frames

static void test_frame_raw(void **state) {
    (void)state;
    twn_frame_opts fo = twn_frame_opts_default();
    uint8_t payload[100];
    for (int i = 0; i < 100; i++) payload[i] = (uint8_t)(i * 7);
    uint8_t *f;
    size_t n;
    twn_err err = {{0}};
    assert_int_equal(twn_frame_encode(payload, sizeof payload, &fo, &f, &n, &err), 0);
    assert_int_equal(n, 112);
    const uint8_t hdr[12] = {'T', 'W', 'N', 1, 0, 0, 0, 0, 100, 0, 0, 0};
    assert_memory_equal(f, hdr, 12);
    twn_payload p;
    assert_int_equal(twn_frame_decode(f, n, &fo, &p, &err), 0);
    assert_int_equal(p.len, 100);
    assert_ptr_equal(p.data, f + 12); /* no copy for raw frames */
    assert_null(p.owned);
    assert_memory_equal(p.data, payload, 100);
    twn_payload_free(&p);
    twn_free(f);

    /* Empty payload. */
    assert_int_equal(twn_frame_encode(NULL, 0, &fo, &f, &n, &err), 0);
    assert_int_equal(n, 12);
    assert_int_equal(twn_frame_decode(f, n, &fo, &p, &err), 0);
    assert_int_equal(p.len, 0);
    twn_free(f);
}

static void test_frame_zstd(void **state) {
    (void)state;
    twn_frame_opts fo = twn_frame_opts_default();
    size_t len = 100000;
    uint8_t *payload = malloc(len);
    for (size_t i = 0; i < len; i++) payload[i] = (uint8_t)("embedding "[i % 10]);
    uint8_t *f;
    size_t n;
    twn_err err = {{0}};
    assert_int_equal(twn_frame_encode(payload, len, &fo, &f, &n, &err), 0);
    assert_int_equal(f[4], TWN_FRAME_ZSTD);
    assert_int_equal(f[8] | f[9] << 8 | f[10] << 16 | f[11] << 24, 100000);
    assert_true(n < 1000); /* 100 kB of a repeated word */
    twn_payload p;
    assert_int_equal(twn_frame_decode(f, n, &fo, &p, &err), 0);
    assert_int_equal(p.len, len);
    assert_non_null(p.owned);
    assert_memory_equal(p.data, payload, len);
    twn_payload_free(&p);

    /* Declared size edited: refused before decompressing. */
    f[8] = 0x9f; /* 99999 = 0x1869f */
    assert_int_equal(twn_frame_decode(f, n, &fo, &p, &err), -1);
    expect_msg(&err, "zstd payload holds 100000 bytes but the frame declares 99999");
    f[8] = 0xa0;
    /* Corrupt compressed bytes. */
    uint8_t *g = malloc(n);
    memcpy(g, f, n);
    for (size_t i = 20; i < n; i++) g[i] ^= 0x5a;
    assert_int_equal(twn_frame_decode(g, n, &fo, &p, &err), -1);
    expect_prefix(&err, "zstd payload");
    /* Truncated compressed stream. */
    assert_int_equal(twn_frame_decode(f, n - 5, &fo, &p, &err), -1);
    expect_prefix(&err, "zstd payload (");
    /* Trailing bytes after the zstd frame. */
    uint8_t *h = malloc(n + 3);
    memcpy(h, f, n);
    memset(h + n, 0, 3);
    assert_int_equal(twn_frame_decode(h, n + 3, &fo, &p, &err), -1);
    char want[128];
    snprintf(want, sizeof want, "zstd payload is %zu bytes followed by 3 stray bytes", n - 12);
    expect_msg(&err, want);
    free(h);
    free(g);
    twn_free(f);

    /* Incompressible payload above the threshold goes raw. */
    for (size_t i = 0; i < len; i++) payload[i] = (uint8_t)(rand() >> 7);
    assert_int_equal(twn_frame_encode(payload, len, &fo, &f, &n, &err), 0);
    assert_int_equal(f[4], 0);
    assert_int_equal(n, len + 12);
    twn_free(f);
    /* Compression off. */
    fo.zstd_threshold = 0;
    for (size_t i = 0; i < len; i++) payload[i] = 'x';
    assert_int_equal(twn_frame_encode(payload, len, &fo, &f, &n, &err), 0);
    assert_int_equal(f[4], 0);
    twn_free(f);
    free(payload);
}

static void test_frame_oversized(void **state) {
    (void)state;
    twn_frame_opts fo = twn_frame_opts_default();
    twn_err err = {{0}};
    twn_payload p;
    /* A header claiming 100 MiB, with no payload behind it: refused on the header alone. */
    uint8_t hdr[12] = {'T', 'W', 'N', 1, 1, 0, 0, 0, 0, 0, 0x40, 0x06};
    assert_int_equal(twn_frame_decode(hdr, 12, &fo, &p, &err), -1);
    expect_msg(&err, "frame declares a 104857600-byte payload; the limit is 67108864 bytes");

    /* A zstd bomb: 1 MiB of zeros compresses to a few dozen bytes; a receiver limited to 64 KiB
     * refuses it from the header without decompressing. */
    size_t len = 1 << 20;
    uint8_t *zeros = calloc(1, len);
    uint8_t *f;
    size_t n;
    assert_int_equal(twn_frame_encode(zeros, len, &fo, &f, &n, &err), 0);
    assert_true(n < 200);
    twn_frame_opts small = fo;
    small.max_size = 65536;
    assert_int_equal(twn_frame_decode(f, n, &small, &p, &err), -1);
    expect_msg(&err, "frame declares a 1048576-byte payload; the limit is 65536 bytes");
    twn_free(f);
    /* The sender refuses too. */
    assert_int_equal(twn_frame_encode(zeros, 65537, &small, &f, &n, &err), -1);
    expect_msg(&err, "frame payload is 65537 bytes; the limit is 65536 bytes");
    assert_null(f);
    free(zeros);

    /* A message that packs larger than the limit. */
    Twn__EmbeddingBatch b = TWN__EMBEDDING_BATCH__INIT;
    uint8_t blob[70000] = {0};
    b.vectors.data = blob;
    b.vectors.len = sizeof blob;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_EMBEDDING_BATCH;
    env.embedding_batch = &b;
    assert_int_equal(twn_msg_pack(&env, &small, &f, &n, &err), -1);
    /* version (2) + body tag (2) + length (3) + [vectors tag (1) + length (3) + 70000] */
    expect_msg(&err, "EmbeddingBatch message packs to 70011 bytes; the limit is 65536 bytes");
}

static void test_frame_corrupt(void **state) {
    (void)state;
    twn_frame_opts fo = twn_frame_opts_default();
    twn_err err = {{0}};
    twn_payload p;
    uint8_t f[112] = {'T', 'W', 'N', 1, 0, 0, 0, 0, 100, 0, 0, 0};
    assert_int_equal(twn_frame_decode(f, 7, &fo, &p, &err), -1);
    expect_msg(&err, "frame is 7 bytes; expected at least the 12-byte header");
    assert_int_equal(twn_frame_decode(f, 102, &fo, &p, &err), -1);
    expect_msg(&err, "frame declares 100 payload bytes but carries 90");
    f[0] = 'X';
    assert_int_equal(twn_frame_decode(f, 112, &fo, &p, &err), -1);
    expect_msg(&err, "frame magic is 58 57 4e; expected 54 57 4e (\"TWN\")");
    f[0] = 'T', f[3] = 2;
    assert_int_equal(twn_frame_decode(f, 112, &fo, &p, &err), -1);
    expect_msg(&err, "frame version is 2; this build speaks frame version 1");
    f[3] = 1, f[4] = 0x82;
    assert_int_equal(twn_frame_decode(f, 112, &fo, &p, &err), -1);
    expect_msg(&err, "frame flags are 0x82; expected 0x00 or 0x01 (zstd)");
    f[4] = 0, f[6] = 1;
    assert_int_equal(twn_frame_decode(f, 112, &fo, &p, &err), -1);
    expect_msg(&err, "frame reserved bytes are 00 01 00; expected 00 00 00");
    f[6] = 0;
    assert_int_equal(twn_frame_decode(f, 112, &fo, &p, &err), 0);
    /* zstd flag on a payload that is not zstd. */
    f[4] = 1;
    assert_int_equal(twn_frame_decode(f, 112, &fo, &p, &err), -1);
    expect_prefix(&err, "zstd payload (100 bytes) is corrupt: ");
}

// ------------------------------------------------------------------------------------------------
// Envelopes

static Twn__Envelope *round_trip(Twn__Envelope *env) {
    twn_frame_opts fo = twn_frame_opts_default();
    twn_err err = {{0}};
    uint8_t *f;
    size_t n;
    assert_int_equal(twn_msg_pack(env, &fo, &f, &n, &err), 0);
    Twn__Envelope *out;
    if (twn_msg_unpack(f, n, &fo, &out, &err)) fail_msg("%s", err.msg);
    twn_free(f);
    return out;
}

static void test_msg_round_trip(void **state) {
    (void)state;
    Twn__SourceRef src = TWN__SOURCE_REF__INIT;
    src.store = TWN__STORE__STORE_FILE;
    src.format = TWN__FORMAT__FORMAT_TAR;
    src.path = "shards/00001.tar";
    src.start = 10240;
    src.end = 20480;
    src.first_index = 100;
    src.count = 7;
    Twn__UnitLease ul = TWN__UNIT_LEASE__INIT;
    ul.unit_id = 42;
    ul.source = &src;
    ul.deadline_unix_ms = 1700000000123ull;
    ul.attempt = 3;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_UNIT_LEASE;
    env.unit_lease = &ul;
    env.seq = 9;
    Twn__Envelope *m = round_trip(&env);
    assert_int_equal(m->version, TWN_PROTO_VERSION);
    assert_int_equal(m->seq, 9);
    assert_string_equal(twn_msg_name(m), "UnitLease");
    assert_int_equal(m->unit_lease->unit_id, 42);
    assert_int_equal(m->unit_lease->attempt, 3);
    assert_int_equal(m->unit_lease->deadline_unix_ms, 1700000000123ull);
    assert_string_equal(m->unit_lease->source->path, "shards/00001.tar");
    assert_int_equal(m->unit_lease->source->format, TWN__FORMAT__FORMAT_TAR);
    assert_int_equal(m->unit_lease->source->start, 10240);
    assert_int_equal(m->unit_lease->source->end, 20480);
    assert_int_equal(m->unit_lease->source->first_index, 100);
    assert_int_equal(m->unit_lease->source->count, 7);
    twn_msg_free(m);

    /* Ack with ranges. */
    Twn__AckRange r1 = TWN__ACK_RANGE__INIT, r2 = TWN__ACK_RANGE__INIT;
    r1.unit_id = 1, r1.first_index = 0, r1.count = 50;
    r2.unit_id = 2, r2.first_index = 50, r2.count = 3;
    Twn__AckRange *rs[2] = {&r1, &r2};
    Twn__Ack ack = TWN__ACK__INIT;
    ack.shard = 5;
    ack.wal_seq = 77;
    ack.n_ranges = 2;
    ack.ranges = rs;
    env.body_case = TWN__ENVELOPE__BODY_ACK;
    env.ack = &ack;
    m = round_trip(&env);
    assert_int_equal(m->ack->shard, 5);
    assert_int_equal(m->ack->n_ranges, 2);
    assert_int_equal(m->ack->ranges[1]->unit_id, 2);
    assert_int_equal(m->ack->ranges[1]->first_index, 50);
    assert_int_equal(m->ack->ranges[1]->count, 3);
    twn_msg_free(m);
}

/* Packs an envelope by hand (bypassing twn_msg_pack's checks) into a frame. */
static uint8_t *raw_frame(Twn__Envelope *env, size_t *n) {
    twn_frame_opts fo = twn_frame_opts_default();
    size_t len = twn__envelope__get_packed_size(env);
    uint8_t *buf = malloc(len + 1);
    twn__envelope__pack(env, buf);
    uint8_t *f;
    twn_err err = {{0}};
    assert_int_equal(twn_frame_encode(buf, len, &fo, &f, n, &err), 0);
    free(buf);
    return f;
}

static void test_msg_refused(void **state) {
    (void)state;
    twn_frame_opts fo = twn_frame_opts_default();
    twn_err err = {{0}};
    Twn__Envelope *m = (Twn__Envelope *)1;
    uint8_t *f;
    size_t n;

    Twn__Envelope env = TWN__ENVELOPE__INIT;
    assert_int_equal(twn_msg_pack(&env, &fo, &f, &n, &err), -1);
    expect_msg(&err, "cannot send an envelope without a body");
    f = raw_frame(&env, &n);
    assert_int_equal(twn_msg_unpack(f, n, &fo, &m, &err), -1);
    expect_msg(&err, "message has protocol version 0; this build speaks version 1");
    assert_null(m);
    twn_free(f);
    env.version = 1;
    f = raw_frame(&env, &n);
    assert_int_equal(twn_msg_unpack(f, n, &fo, &m, &err), -1);
    expect_msg(&err, "envelope carries no message this build knows (body unset or newer)");
    twn_free(f);

    Twn__Heartbeat hb = TWN__HEARTBEAT__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    env.version = 7;
    f = raw_frame(&env, &n);
    assert_int_equal(twn_msg_unpack(f, n, &fo, &m, &err), -1);
    expect_msg(&err, "message has protocol version 7; this build speaks version 1");
    twn_free(f);

    /* Not protobuf at all: field 15, wire type 7 does not exist. */
    const uint8_t junk[4] = {0x7f, 0xff, 0xff, 0xff};
    assert_int_equal(twn_frame_encode(junk, 4, &fo, &f, &n, &err), 0);
    assert_int_equal(twn_msg_unpack(f, n, &fo, &m, &err), -1);
    expect_msg(&err, "payload (4 bytes) is not a valid twn.Envelope");
    twn_free(f);

    /* Sub-messages role code relies on. */
    env.version = 1;
    Twn__UnitLease ul = TWN__UNIT_LEASE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_UNIT_LEASE;
    env.unit_lease = &ul;
    f = raw_frame(&env, &n);
    assert_int_equal(twn_msg_unpack(f, n, &fo, &m, &err), -1);
    expect_msg(&err, "UnitLease has no source");
    twn_free(f);

    Twn__HardItem hi = TWN__HARD_ITEM__INIT;
    Twn__ItemRef ref = TWN__ITEM_REF__INIT;
    Twn__HardItem *his[2] = {&hi, &hi};
    Twn__HardItems hard = TWN__HARD_ITEMS__INIT;
    hard.n_items = 2;
    hard.items = his;
    hi.ref = &ref;
    env.body_case = TWN__ENVELOPE__BODY_HARD_ITEMS;
    env.hard_items = &hard;
    f = raw_frame(&env, &n);
    assert_int_equal(twn_msg_unpack(f, n, &fo, &m, &err), -1);
    expect_msg(&err, "HardItems item 0 ref has no source");
    twn_free(f);

    Twn__Hello hello = TWN__HELLO__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HELLO;
    env.hello = &hello;
    f = raw_frame(&env, &n);
    assert_int_equal(twn_msg_unpack(f, n, &fo, &m, &err), -1);
    expect_msg(&err, "Hello has an empty id");
    twn_free(f);

    Twn__EmbeddingItem it = TWN__EMBEDDING_ITEM__INIT;
    Twn__EmbeddingItem *its[3] = {&it, &it, &it};
    Twn__EmbeddingBatch b = TWN__EMBEDDING_BATCH__INIT;
    float v[8] = {0};
    b.batch_id = 12;
    b.sender = "gate-1";
    b.dim = 3;
    b.n_items = 3;
    b.items = its;
    b.vectors.data = (uint8_t *)v;
    b.vectors.len = sizeof v;
    env.body_case = TWN__ENVELOPE__BODY_EMBEDDING_BATCH;
    env.embedding_batch = &b;
    f = raw_frame(&env, &n);
    assert_int_equal(twn_msg_unpack(f, n, &fo, &m, &err), -1);
    expect_msg(&err, "EmbeddingBatch 12 from 'gate-1': vectors are 32 bytes; expected 3 items x 3 "
                     "dims x 4 = 36");
    twn_free(f);
}

static void test_endpoints(void **state) {
    (void)state;
    twn_err err = {{0}};
    assert_int_equal(twn_endpoint_check("inproc://coord", &err), 0);
    assert_int_equal(twn_endpoint_check("ipc:///tmp/x.sock", &err), 0);
    assert_int_equal(twn_endpoint_check("tcp://127.0.0.1:*", &err), 0);
    assert_int_equal(twn_endpoint_check("tcp://[::1]:5555", &err), 0);
    assert_int_equal(twn_endpoint_check("udp://1.2.3.4:5", &err), -1);
    expect_msg(&err, "endpoint 'udp://1.2.3.4:5': expected inproc://, ipc:// or tcp://");
    assert_int_equal(twn_endpoint_check("tcp://127.0.0.1:99999", &err), -1);
    expect_msg(&err, "endpoint 'tcp://127.0.0.1:99999': port 99999 is outside 1..65535");
    assert_int_equal(twn_endpoint_check("tcp://127.0.0.1:http", &err), -1);
    expect_msg(&err, "endpoint 'tcp://127.0.0.1:http': port 'http' is not a number 1..65535 or *");
    assert_int_equal(twn_endpoint_check("tcp://localhost", &err), -1);
    expect_msg(&err, "endpoint 'tcp://localhost': expected tcp://host:port");
    char ep[200] = "ipc://";
    memset(ep + 6, 'a', 107);
    ep[113] = 0;
    assert_int_equal(twn_endpoint_check(ep, &err), -1);
    assert_non_null(strstr(err.msg, "ipc path is 107 bytes; the limit is 106"));
    assert_int_equal(twn_endpoint_check("inproc://", &err), -1);
    expect_msg(&err, "endpoint 'inproc://': inproc:// needs a name");
}

// ------------------------------------------------------------------------------------------------
// Sockets

typedef struct {
    void *ctx, *router, *dealer;
    char endpoint[TWN_ENDPOINT_MAX];
} pair;

/* ROUTER bound on `ep`, DEALER "id" connected to it. */
static void pair_open(pair *p, const char *ep, const char *id) {
    twn_err err = {{0}};
    twn_sock_opts so = test_sock_opts();
    p->ctx = zmq_ctx_new();
    p->router = twn_sock_new(p->ctx, ZMQ_ROUTER, &so, &err);
    assert_non_null(p->router);
    if (twn_sock_bind(p->router, ep, p->endpoint, sizeof p->endpoint, &err))
        fail_msg("%s", err.msg);
    so.routing_id = id;
    p->dealer = twn_sock_new(p->ctx, ZMQ_DEALER, &so, &err);
    assert_non_null(p->dealer);
    if (twn_sock_connect(p->dealer, p->endpoint, &err)) fail_msg("%s", err.msg);
}

static void pair_close(pair *p) {
    twn_sock_close(p->router);
    twn_sock_close(p->dealer);
    assert_int_equal(zmq_ctx_term(p->ctx), 0);
}

static void hello_welcome(const char *ep) {
    pair p;
    pair_open(&p, ep, "gate-1");
    twn_frame_opts fo = twn_frame_opts_default();
    twn_err err = {{0}};
    Twn__Hello h = TWN__HELLO__INIT;
    h.role = TWN__ROLE__ROLE_GATE;
    h.id = "gate-1";
    h.credits = 4;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    assert_int_equal(twn_send_msg(p.dealer, NULL, &env, &fo, &err), 0);
    twn_peer_id from;
    Twn__Envelope *m;
    assert_int_equal(twn_recv_msg(p.router, 3000, &fo, &from, &m, &err), TWN_RECV_MSG);
    twn_peer_id want = twn_peer_id_of("gate-1");
    assert_true(twn_peer_id_eq(&from, &want));
    assert_int_equal(m->body_case, TWN__ENVELOPE__BODY_HELLO);
    assert_string_equal(m->hello->id, "gate-1");
    assert_int_equal(m->hello->credits, 4);
    assert_int_equal(m->hello->role, TWN__ROLE__ROLE_GATE);
    twn_msg_free(m);

    Twn__Welcome w = TWN__WELCOME__INIT;
    w.accepted = 1;
    w.heartbeat_ms = 250;
    w.job_id = "job-7";
    env.body_case = TWN__ENVELOPE__BODY_WELCOME;
    env.welcome = &w;
    assert_int_equal(twn_send_msg(p.router, &from, &env, &fo, &err), 0);
    assert_int_equal(twn_recv_msg(p.dealer, 3000, &fo, NULL, &m, &err), TWN_RECV_MSG);
    assert_int_equal(m->welcome->accepted, 1);
    assert_int_equal(m->welcome->heartbeat_ms, 250);
    assert_string_equal(m->welcome->job_id, "job-7");
    twn_msg_free(m);

    /* Nothing more: a receive times out. */
    double t0 = twn_now();
    assert_int_equal(twn_recv_msg(p.dealer, 30, &fo, NULL, &m, &err), TWN_RECV_TIMEOUT);
    assert_true(twn_now() - t0 >= 0.025);

    /* A raw frame that is not a frame is BAD, names the peer, and the socket still works. */
    assert_int_equal(twn_sock_send(p.dealer, "hello", 5, &err), 0);
    assert_int_equal(twn_recv_msg(p.router, 3000, &fo, &from, &m, &err), TWN_RECV_BAD);
    expect_msg(&err, "message from peer 'gate-1': frame is 5 bytes; expected at least the 12-byte "
                     "header");
    /* A 3-part message is BAD too. */
    zmq_send(p.dealer, "a", 1, ZMQ_SNDMORE);
    zmq_send(p.dealer, "b", 1, 0);
    assert_int_equal(twn_recv_msg(p.router, 3000, &fo, &from, &m, &err), TWN_RECV_BAD);
    expect_msg(&err, "message from peer 'gate-1' has more than one payload part");
    env.body_case = TWN__ENVELOPE__BODY_HELLO;
    env.hello = &h; /* the body is a union: welcome replaced it */
    assert_int_equal(twn_send_msg(p.dealer, NULL, &env, &fo, &err), 0);
    assert_int_equal(twn_recv_msg(p.router, 3000, &fo, &from, &m, &err), TWN_RECV_MSG);
    twn_msg_free(m);
    pair_close(&p);
}

static void test_sockets_inproc(void **state) {
    (void)state;
    hello_welcome("inproc://coordinator");
}

static void test_sockets_ipc(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("tp_ipc");
    char ep[512];
    snprintf(ep, sizeof ep, "ipc://%s/c.sock", dir);
    if (strlen(ep) - 6 > TWN_IPC_PATH_MAX)
        snprintf(ep, sizeof ep, "ipc:///tmp/twn-tp-%d.sock", (int)getpid());
    hello_welcome(ep);
}

static void test_sockets_tcp(void **state) {
    (void)state;
    pair p;
    pair_open(&p, "tcp://127.0.0.1:*", "probe");
    assert_int_equal(strncmp(p.endpoint, "tcp://127.0.0.1:", 16), 0);
    int port = atoi(p.endpoint + 16);
    assert_true(port > 0 && port < 65536);
    pair_close(&p);
    hello_welcome("tcp://127.0.0.1:*");
}

static void test_router_mandatory(void **state) {
    (void)state;
    twn_err err = {{0}};
    twn_frame_opts fo = twn_frame_opts_default();
    twn_sock_opts so = test_sock_opts();
    void *ctx = zmq_ctx_new();
    so.sndhwm = 1;
    void *router = twn_sock_new(ctx, ZMQ_ROUTER, &so, &err);
    assert_int_equal(twn_sock_bind(router, "inproc://mandatory", NULL, 0, &err), 0);
    so.routing_id = "slow";
    so.rcvhwm = 1;
    void *dealer = twn_sock_new(ctx, ZMQ_DEALER, &so, &err);
    assert_int_equal(twn_sock_connect(dealer, "inproc://mandatory", &err), 0);

    Twn__Heartbeat hb = TWN__HEARTBEAT__INIT;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    twn_peer_id nobody = twn_peer_id_of("nobody");
    errno = 0;
    assert_int_equal(twn_send_msg(router, &nobody, &env, &fo, &err), -1);
    assert_int_equal(errno, EHOSTUNREACH);
    expect_msg(&err, "peer 'nobody' is not connected (EHOSTUNREACH)");
    assert_int_equal(twn_router_send(router, &nobody, "x", 1, &err), -1);
    expect_msg(&err, "peer 'nobody' is not connected (EHOSTUNREACH)");

    /* The DEALER announces itself, then never reads: the ROUTER's queue to it fills and the send
     * reports EAGAIN instead of blocking or dropping. */
    assert_int_equal(twn_send_msg(dealer, NULL, &env, &fo, &err), 0);
    twn_peer_id from;
    Twn__Envelope *m;
    assert_int_equal(twn_recv_msg(router, 3000, &fo, &from, &m, &err), TWN_RECV_MSG);
    twn_msg_free(m);
    int sent = 0, rc = 0;
    double t0 = twn_now();
    while (sent < 10000 && (rc = twn_send_msg(router, &from, &env, &fo, &err)) == 0) sent++;
    assert_int_equal(rc, -1);
    assert_int_equal(errno, EAGAIN);
    expect_msg(&err, "send queue to peer 'slow' is full (EAGAIN)");
    assert_true(sent >= 1 && sent <= 16);
    assert_true(twn_now() - t0 < 1.0); /* never blocked */
    /* Everything sent arrives. */
    int got = 0;
    while (twn_recv_msg(dealer, 100, &fo, NULL, &m, &err) == TWN_RECV_MSG) {
        twn_msg_free(m);
        got++;
    }
    assert_int_equal(got, sent);

    twn_sock_close(router);
    twn_sock_close(dealer);
    assert_int_equal(zmq_ctx_term(ctx), 0);
}

static Twn__Envelope lease_env(Twn__UnitLease *ul, Twn__SourceRef *src, uint64_t id) {
    twn__source_ref__init(src);
    src->store = TWN__STORE__STORE_FILE;
    src->format = TWN__FORMAT__FORMAT_JSONL;
    src->path = "a.jsonl";
    twn__unit_lease__init(ul);
    ul->unit_id = id;
    ul->source = src;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_UNIT_LEASE;
    env.unit_lease = ul;
    return env;
}

static void test_credit_flow(void **state) {
    (void)state;
    pair p;
    pair_open(&p, "inproc://credits", "gate-7");
    twn_frame_opts fo = twn_frame_opts_default();
    twn_err err = {{0}};
    twn_peers *peers = twn_peers_new(1.0, 3);
    twn_peer_id gid = twn_peer_id_of("gate-7");
    twn_peer *g = twn_peers_add(peers, &gid, twn_now());
    Twn__UnitLease ul;
    Twn__SourceRef src;
    Twn__Envelope env = lease_env(&ul, &src, 1);
    Twn__Envelope *m;

    /* No credit: nothing is sent. */
    assert_int_equal(twn_send_credited(p.router, g, &env, &fo, &err), -1);
    expect_msg(&err, "peer 'gate-7' has no credit; not sending UnitLease");
    assert_int_equal(twn_recv_msg(p.dealer, 50, &fo, NULL, &m, &err), TWN_RECV_TIMEOUT);

    /* The gate asks for 3 units; the coordinator sends until the credit runs out. */
    Twn__WorkRequest wr = TWN__WORK_REQUEST__INIT;
    wr.credits = 3;
    Twn__Envelope req = TWN__ENVELOPE__INIT;
    req.body_case = TWN__ENVELOPE__BODY_WORK_REQUEST;
    req.work_request = &wr;
    assert_int_equal(twn_send_msg(p.dealer, NULL, &req, &fo, &err), 0);
    twn_peer_id from;
    assert_int_equal(twn_recv_msg(p.router, 3000, &fo, &from, &m, &err), TWN_RECV_MSG);
    twn_peer *q = twn_peers_touch(peers, &from, twn_now());
    assert_ptr_equal(q, g);
    twn_credits_grant(&q->credits, m->work_request->credits);
    twn_msg_free(m);
    int sent = 0;
    for (uint64_t u = 1; u <= 10; u++) {
        env = lease_env(&ul, &src, u);
        if (twn_send_credited(p.router, q, &env, &fo, &err) == 0) sent++;
    }
    assert_int_equal(sent, 3);
    expect_msg(&err, "peer 'gate-7' has no credit; not sending UnitLease");
    assert_int_equal(q->credits.avail, 0);
    assert_int_equal(q->credits.granted, 3);
    assert_int_equal(q->credits.used, 3);
    for (uint64_t u = 1; u <= 3; u++) {
        assert_int_equal(twn_recv_msg(p.dealer, 3000, &fo, NULL, &m, &err), TWN_RECV_MSG);
        assert_int_equal(m->unit_lease->unit_id, u);
        twn_msg_free(m);
    }
    assert_int_equal(twn_recv_msg(p.dealer, 50, &fo, NULL, &m, &err), TWN_RECV_TIMEOUT);

    /* A failed send gives the credit back. */
    twn_peer_id ghost_id = twn_peer_id_of("ghost");
    twn_peer *ghost = twn_peers_add(peers, &ghost_id, twn_now());
    twn_credits_grant(&ghost->credits, 1);
    assert_int_equal(twn_send_credited(p.router, ghost, &env, &fo, &err), -1);
    expect_msg(&err, "peer 'ghost' is not connected (EHOSTUNREACH)");
    assert_int_equal(ghost->credits.avail, 1);
    assert_int_equal(ghost->credits.used, 0);
    /* A dead peer gets nothing even with credit. */
    ghost->alive = 0;
    assert_int_equal(twn_send_credited(p.router, ghost, &env, &fo, &err), -1);
    expect_msg(&err, "peer 'ghost' is dead; not sending UnitLease");

    twn_peers_free(peers);
    pair_close(&p);
}

static void test_peer_table(void **state) {
    (void)state;
    twn_peers *t = twn_peers_new(0.5, 3); /* dead after 1.5 s of silence */
    twn_peer_id a = twn_peer_id_of("a"), b = twn_peer_id_of("b"), c = twn_peer_id_of("c");
    twn_peer *pa = twn_peers_add(t, &a, 10.0);
    twn_peer *pb = twn_peers_add(t, &b, 10.0);
    pa->user = (void *)0x1234;
    assert_int_equal(twn_peers_count(t), 2);
    assert_null(twn_peers_touch(t, &c, 10.0));
    assert_ptr_equal(twn_peers_touch(t, &a, 11.0), pa);
    assert_true(twn_peers_deadline(t, pa) == 12.5);
    twn_peer *dead[4];
    assert_int_equal(twn_peers_expire(t, 11.5, dead, 4), 0);
    assert_int_equal(twn_peers_expire(t, 11.51, dead, 4), 1); /* b: silent since 10.0 */
    assert_ptr_equal(dead[0], pb);
    assert_int_equal(pb->alive, 0);
    assert_int_equal(twn_peers_expire(t, 11.6, dead, 4), 0); /* declared once */
    /* A dead peer stays dead when it speaks; it must Hello again. */
    assert_ptr_equal(twn_peers_touch(t, &b, 11.7), pb);
    assert_int_equal(pb->alive, 0);
    twn_credits_grant(&pb->credits, 5);
    assert_ptr_equal(twn_peers_add(t, &b, 11.8), pb);
    assert_int_equal(pb->alive, 1);
    assert_int_equal(pb->credits.avail, 0);
    assert_int_equal(twn_peers_expire(t, 12.6, dead, 4), 1);
    assert_ptr_equal(dead[0], pa);
    assert_ptr_equal(twn_peers_remove(t, &a), (void *)0x1234);
    assert_int_equal(twn_peers_count(t), 1);
    assert_ptr_equal(twn_peers_at(t, 0), pb);
    assert_null(twn_peers_remove(t, &a));
    twn_peers_free(t);

    twn_beat hb;
    twn_beat_init(&hb, 1.0, 100.0);
    assert_int_equal(twn_beat_due(&hb, 100.0), 1);
    assert_int_equal(twn_beat_due(&hb, 100.5), 0);
    assert_int_equal(twn_beat_due(&hb, 101.0), 1);
    assert_int_equal(twn_beat_due(&hb, 105.2), 1); /* after a stall: one beat, not four */
    assert_int_equal(twn_beat_due(&hb, 105.3), 0);
    assert_true(hb.next == 106.2);

    twn_peer_id bin = {.len = 3, .b = {0, 0xff, 'a'}};
    char buf[TWN_PEER_ID_STR_MAX];
    assert_string_equal(twn_peer_id_str(&bin, buf, sizeof buf), "0x00ff61");
}

/* A DEALER beats every 200 ms for 2 s, then falls silent; the ROUTER side declares it dead
 * 3 intervals (600 ms) after the last beat it saw, and not before.  The intervals are long enough
 * that a loaded CI machine (ASan builds, parallel tests) does not stall past 3 of them. */
static void test_heartbeat_expiry(void **state) {
    (void)state;
    pair p;
    pair_open(&p, "tcp://127.0.0.1:*", "worker-3");
    twn_frame_opts fo = twn_frame_opts_default();
    twn_err err = {{0}};
    const double ivl = 0.2, beating = 2.0;
    twn_peers *peers = twn_peers_new(ivl, 3);
    twn_peer_id wid = twn_peer_id_of("worker-3");
    twn_beat beat;
    double t0 = twn_now(), last_beat_seen = 0, dead_at = 0;
    twn_beat_init(&beat, ivl, t0);
    uint64_t seq = 0, beats_seen = 0;
    while (!dead_at && twn_now() - t0 < 10.0) {
        double now = twn_now();
        if (now - t0 < beating && twn_beat_due(&beat, now)) {
            Twn__Heartbeat hb = TWN__HEARTBEAT__INIT;
            hb.seq = ++seq;
            Twn__Envelope env = TWN__ENVELOPE__INIT;
            env.body_case = TWN__ENVELOPE__BODY_HEARTBEAT;
            env.heartbeat = &hb;
            assert_int_equal(twn_send_msg(p.dealer, NULL, &env, &fo, &err), 0);
        }
        twn_peer_id from;
        Twn__Envelope *m;
        twn_recv_status st = twn_recv_msg(p.router, 5, &fo, &from, &m, &err);
        now = twn_now();
        if (st == TWN_RECV_MSG) {
            assert_int_equal(m->body_case, TWN__ENVELOPE__BODY_HEARTBEAT);
            if (!twn_peers_find(peers, &from)) twn_peers_add(peers, &from, now);
            assert_non_null(twn_peers_touch(peers, &from, now));
            last_beat_seen = now;
            beats_seen++;
            twn_msg_free(m);
        }
        twn_peer *dead[2];
        if (twn_peers_expire(peers, now, dead, 2)) {
            assert_true(twn_peer_id_eq(&dead[0]->id, &wid));
            dead_at = now;
        }
    }
    assert_true(dead_at > 0);
    assert_true(beats_seen >= 8);         /* ~10 beats: it was alive while it beat */
    assert_true(dead_at - t0 >= beating); /* never declared dead while beating */
    double silence = dead_at - last_beat_seen;
    assert_true(silence > 3 * ivl);
    assert_true(silence < 3 * ivl + 1.0); /* generous: CI machines stall */
    twn_peers_free(peers);
    pair_close(&p);
}

/* EmbeddingBatch over PUSH/PULL: every vector byte arrives exactly, compressed or not. */
static void push_pull_batch(const char *ep, size_t n, uint32_t dim, size_t zstd_threshold) {
    twn_err err = {{0}};
    twn_frame_opts fo = twn_frame_opts_default();
    fo.zstd_threshold = zstd_threshold;
    twn_sock_opts so = test_sock_opts();
    void *ctx = zmq_ctx_new();
    void *pull = twn_sock_new(ctx, ZMQ_PULL, &so, &err);
    char actual[TWN_ENDPOINT_MAX];
    if (twn_sock_bind(pull, ep, actual, sizeof actual, &err)) fail_msg("%s", err.msg);
    void *push = twn_sock_new(ctx, ZMQ_PUSH, &so, &err);
    if (twn_sock_connect(push, actual, &err)) fail_msg("%s", err.msg);

    float *v = malloc((n * dim + 1) * sizeof *v);
    for (size_t i = 0; i < n * dim; i++) v[i] = sinf((float)i * 0.37f) * 3.0f;
    if (n * dim >= 3) {
        v[0] = -0.0f;
        v[1] = 1e-42f; /* subnormal */
        v[2] = INFINITY;
    }
    Twn__EmbeddingItem *items = calloc(n, sizeof *items);
    Twn__EmbeddingItem **ptrs = calloc(n, sizeof *ptrs);
    char(*ids)[32] = calloc(n, 32);
    for (size_t i = 0; i < n; i++) {
        twn__embedding_item__init(&items[i]);
        snprintf(ids[i], 32, "item-%zu", i);
        items[i].id = ids[i];
        items[i].faiss_id = 1000 + i;
        items[i].route = i % 3 ? TWN__ROUTE__ROUTE_EASY : TWN__ROUTE__ROUTE_HARD;
        items[i].p_think = (float)i / (float)n;
        items[i].think_tokens = (uint32_t)(i % 3 ? 0 : 17 + i);
        items[i].cot = i % 3 ? "" : "because";
        items[i].unit_id = 5;
        items[i].item_index = 200 + i;
        ptrs[i] = &items[i];
    }
    Twn__EmbeddingBatch b = TWN__EMBEDDING_BATCH__INIT;
    b.batch_id = 77;
    b.sender = "gate-2";
    b.shard = 3;
    b.dim = dim;
    b.n_items = n;
    b.items = ptrs;
    twn_batch_set_vectors(&b, v);
    assert_int_equal(b.vectors.len, n * dim * 4);
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_EMBEDDING_BATCH;
    env.embedding_batch = &b;
    assert_int_equal(twn_send_msg(push, NULL, &env, &fo, &err), 0);

    Twn__Envelope *m;
    assert_int_equal(twn_recv_msg(pull, 3000, &fo, NULL, &m, &err), TWN_RECV_MSG);
    Twn__EmbeddingBatch *r = m->embedding_batch;
    assert_int_equal(r->batch_id, 77);
    assert_string_equal(r->sender, "gate-2");
    assert_int_equal(r->shard, 3);
    assert_int_equal(r->dim, dim);
    assert_int_equal(r->n_items, n);
    assert_int_equal(r->vectors.len, n * dim * 4);
    assert_memory_equal(r->vectors.data, v, n * dim * 4);
    float *back = malloc((n * dim + 1) * sizeof *back);
    assert_int_equal(twn_batch_get_vectors(r, back, &err), 0);
    assert_memory_equal(back, v, n * dim * 4);
    for (size_t i = 0; i < n; i++) {
        assert_string_equal(r->items[i]->id, ids[i]);
        assert_int_equal(r->items[i]->faiss_id, 1000 + i);
        assert_int_equal(r->items[i]->route, items[i].route);
        assert_true(r->items[i]->p_think == items[i].p_think);
        assert_int_equal(r->items[i]->think_tokens, items[i].think_tokens);
        assert_string_equal(r->items[i]->cot, items[i].cot);
        assert_int_equal(r->items[i]->item_index, 200 + i);
    }
    twn_msg_free(m);
    free(back);
    free(v);
    free(items);
    free(ptrs);
    free(ids);
    twn_sock_close(push);
    twn_sock_close(pull);
    assert_int_equal(zmq_ctx_term(ctx), 0);
}

static void test_push_pull_vectors(void **state) {
    (void)state;
    push_pull_batch("inproc://shard3", 37, 64, 4096);      /* zstd (partly compressible) */
    push_pull_batch("tcp://127.0.0.1:*", 37, 64, 0);       /* raw */
    push_pull_batch("tcp://127.0.0.1:*", 256, 2560, 4096); /* 2.6 MB, TWN-4B dim */
    const char *dir = tu_tmpdir("tp_pp");
    char ep[512];
    snprintf(ep, sizeof ep, "ipc://%s/s.sock", dir);
    if (strlen(ep) - 6 > TWN_IPC_PATH_MAX)
        snprintf(ep, sizeof ep, "ipc:///tmp/twn-tp-pp-%d.sock", (int)getpid());
    push_pull_batch(ep, 1, 8, 4096);
    push_pull_batch("inproc://empty", 0, 8, 4096); /* an empty batch is legal */
}

/* Raw frames (no envelope) through twn_sock_send / twn_router_send / twn_sock_recv. */
static void test_raw_send_recv(void **state) {
    (void)state;
    pair p;
    pair_open(&p, "inproc://raw", "w-9");
    twn_err err = {{0}};
    uint8_t *f;
    size_t n;
    twn_peer_id from;
    assert_int_equal(twn_sock_send(p.dealer, "ping", 4, &err), 0);
    assert_int_equal(twn_sock_recv(p.router, 3000, &from, &f, &n, &err), TWN_RECV_MSG);
    assert_int_equal(n, 4);
    assert_memory_equal(f, "ping", 4);
    char idb[TWN_PEER_ID_STR_MAX];
    assert_string_equal(twn_peer_id_str(&from, idb, sizeof idb), "w-9");
    twn_free(f);
    assert_int_equal(twn_router_send(p.router, &from, "pong!", 5, &err), 0);
    assert_int_equal(twn_sock_recv(p.dealer, 3000, NULL, &f, &n, &err), TWN_RECV_MSG);
    assert_int_equal(n, 5);
    assert_memory_equal(f, "pong!", 5);
    twn_free(f);
    assert_int_equal(twn_sock_recv(p.dealer, 0, NULL, &f, &n, &err), TWN_RECV_TIMEOUT);
    assert_null(f);
    /* An empty id is refused before anything is sent. */
    twn_peer_id none = {0};
    assert_int_equal(twn_router_send(p.router, &none, "x", 1, &err), -1);
    expect_msg(&err, "ROUTER send: the peer id is empty");
    pair_close(&p);
}

/* A PUSH with no PULL connected blocks up to sndtimeo, then reports EAGAIN. */
static void test_push_timeout(void **state) {
    (void)state;
    twn_err err = {{0}};
    twn_sock_opts so = test_sock_opts();
    so.sndtimeo_ms = 50;
    void *ctx = zmq_ctx_new();
    void *push = twn_sock_new(ctx, ZMQ_PUSH, &so, &err);
    double t0 = twn_now();
    assert_int_equal(twn_sock_send(push, "x", 1, &err), -1);
    assert_true(twn_now() - t0 >= 0.04);
    assert_int_equal(errno, EAGAIN);
    expect_msg(&err, "PUSH send timed out: no peer took the message (EAGAIN)");
    twn_sock_close(push);
    assert_int_equal(zmq_ctx_term(ctx), 0);

    so.routing_id = "";
    ctx = zmq_ctx_new();
    assert_null(twn_sock_new(ctx, ZMQ_DEALER, &so, &err));
    expect_msg(&err, "DEALER routing id '' is 0 bytes; expected 1..255");
    assert_int_equal(zmq_ctx_term(ctx), 0);
}

/* limits.compress: auto compresses over tcp:// only; always / never override the transport. */
static void test_frame_opts_for(void **state) {
    (void)state;
    const size_t dflt = twn_frame_opts_default().zstd_threshold;
    assert_int_equal(twn_frame_opts_for("tcp://127.0.0.1:5555", NULL).zstd_threshold, dflt);
    assert_int_equal(twn_frame_opts_for("tcp://127.0.0.1:5555", "auto").zstd_threshold, dflt);
    assert_int_equal(twn_frame_opts_for("ipc:///tmp/x", "auto").zstd_threshold, 0);
    assert_int_equal(twn_frame_opts_for("inproc://x", NULL).zstd_threshold, 0);
    assert_int_equal(twn_frame_opts_for(NULL, NULL).zstd_threshold, 0);
    assert_int_equal(twn_frame_opts_for("ipc:///tmp/x", "always").zstd_threshold, dflt);
    assert_int_equal(twn_frame_opts_for("tcp://127.0.0.1:5555", "never").zstd_threshold, 0);
    assert_int_equal(twn_frame_opts_for("inproc://x", "never").max_size,
                     twn_frame_opts_default().max_size);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_frame_opts_for),   cmocka_unit_test(test_frame_raw),
        cmocka_unit_test(test_frame_zstd),       cmocka_unit_test(test_frame_oversized),
        cmocka_unit_test(test_frame_corrupt),    cmocka_unit_test(test_msg_round_trip),
        cmocka_unit_test(test_msg_refused),      cmocka_unit_test(test_endpoints),
        cmocka_unit_test(test_sockets_inproc),   cmocka_unit_test(test_sockets_ipc),
        cmocka_unit_test(test_sockets_tcp),      cmocka_unit_test(test_router_mandatory),
        cmocka_unit_test(test_credit_flow),      cmocka_unit_test(test_peer_table),
        cmocka_unit_test(test_heartbeat_expiry), cmocka_unit_test(test_push_pull_vectors),
        cmocka_unit_test(test_raw_send_recv),    cmocka_unit_test(test_push_timeout),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
