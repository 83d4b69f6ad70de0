/* transport.h — frames, protobuf envelopes and ZeroMQ sockets: the thin layer every role talks
 * through.  No role logic lives here: what to send when is the coordinator's / gate's / worker's /
 * indexer's business; this file makes each send and receive safe and each failure readable.
 *
 * Frame (every ZeroMQ payload part), 12-byte header then payload, integers little-endian:
 *
 *     0  'T' 'W' 'N' <version>   magic + frame version (TWN_FRAME_VERSION)
 *     4  u8  flags               TWN_FRAME_ZSTD: the payload is one zstd frame
 *     5  u8[3] reserved          must be 0
 *     8  u32 size                UNcompressed payload size in bytes
 *    12  payload                 a packed twn.Envelope (proto/twn.proto)
 *
 * The declared size is checked against twn_frame_opts.max_size BEFORE anything is decompressed or
 * unpacked, so a hostile or broken peer cannot make a receiver allocate more than the limit.
 * Payloads of at least zstd_threshold bytes are compressed when that makes them smaller.
 *
 * Sockets (ZeroMQ, draft API off):
 *   control: coordinator ROUTER <-> DEALERs whose routing id is their Hello.id.  The ROUTER has
 *            ZMQ_ROUTER_MANDATORY (a send to an unknown peer is an error, not a silent drop),
 *            ZMQ_ROUTER_HANDOVER (a restarted process with the same id takes over its identity),
 *            and its sends never block (a full queue is reported as EAGAIN, never waited on).
 *   data:    PUSH -> PULL carrying EmbeddingBatch frames; a full PUSH queue blocks up to
 *            sndtimeo_ms (that is the back-pressure), then fails with EAGAIN.
 * Endpoints are inproc://name, ipc://path (path < 107 bytes) or tcp://host:port
 * ("tcp://127.0.0.1:*" binds an ephemeral port; twn_sock_bind returns the real endpoint). A ZeroMQ
 * socket belongs to one thread; use inproc:// between the threads of `twn run`.
 *
 * Security (common/curve.h): every tcp:// socket between processes can be CURVE-encrypted and
 * authenticated.  The servers (coordinator ROUTER, indexer PULLs) share one server keypair; each
 * client process (gates, workers, indexers as DEALERs) has its own keypair, and a server accepts
 * only clients whose public key is on its allow-list (a ZAP handler thread per context).  A role
 * calls twn_curve_server before binding and twn_curve_client before connecting; both do nothing
 * for inproc:// and ipc://, which stay plain.  Size limits: the frame limit (max_size, checked
 * on the declared size before decompressing) and ZMQ_MAXMSGSIZE (twn_wire_limit: libzmq refuses
 * a larger message part before allocating it and drops that connection) come from one number,
 * limits.max_message_bytes.
 *
 * Liveness and flow control are bookkeeping only (no I/O): twn_peers is the table a ROUTER owner
 * keeps (last seen, dead after `missed_beats` silent intervals, credits); twn_credits is the
 * counter behind "never send without credit"; twn_beat says when a DEALER's next Heartbeat is due.
 *
 * Typical use (a DEALER sending a heartbeat):
 *
 *     Twn__Heartbeat hb = TWN__HEARTBEAT__INIT;
 *     hb.seq = ++seq;
 *     Twn__Envelope env = TWN__ENVELOPE__INIT;
 *     env.body_case = TWN__ENVELOPE__BODY_HEARTBEAT;
 *     env.heartbeat = &hb;
 *     if (twn_send_msg(dealer, NULL, &env, &fo, &err)) ...
 *
 * and a ROUTER receiving:
 *
 *     twn_peer_id from;
 *     Twn__Envelope *m;
 *     switch (twn_recv_msg(router, 100, &fo, &from, &m, &err)) {
 *     case TWN_RECV_MSG: ... switch (m->body_case) ... twn_msg_free(m); break;
 *     case TWN_RECV_BAD: log err.msg (names the peer), go on;  // message consumed, socket fine
 *     case TWN_RECV_TIMEOUT: break;
 *     case TWN_RECV_FAIL: stop;  // the socket or context is gone
 *     } */
#ifndef TWN_COMMON_TRANSPORT_H
#define TWN_COMMON_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

#include "proto/twn.pb-c.h"
#include "util/err.h"

#define TWN_PROTO_VERSION 1u /* Envelope.version; bump on incompatible twn.proto changes */
#define TWN_FRAME_VERSION 1u /* header byte 3; bump on incompatible frame changes */
#define TWN_FRAME_HEADER  12u
#define TWN_FRAME_ZSTD    0x01u
#define TWN_ENDPOINT_MAX  256u /* longest endpoint string accepted, NUL included */
#define TWN_IPC_PATH_MAX  106u /* ipc:// path bytes (sun_path is 108 with the NUL; keep margin) */

// ------------------------------------------------------------------------------------------------
// Frames

typedef struct twn_frame_opts {
    size_t max_size;       /* largest uncompressed payload sent or accepted, bytes */
    size_t zstd_threshold; /* compress payloads of at least this many bytes; 0 = never compress */
    int zstd_level;        /* zstd compression level (1..19) */
} twn_frame_opts;

/* max_size 64 MiB, zstd_threshold 4 KiB, zstd_level 3. */
twn_frame_opts twn_frame_opts_default(void);

/* The defaults for frames sent to `endpoint` under limits.compress = `compress`: "auto" (or NULL)
 * compresses only over tcp:// (on inproc:// and ipc:// zstd costs CPU and saves no wire),
 * "always" everywhere, "never" nowhere.  Receivers accept both forms whatever their own
 * options say. */
twn_frame_opts twn_frame_opts_for(const char *endpoint, const char *compress);

/* A decoded payload: `data` points into the frame (uncompressed) or into `owned` (decompressed). */
typedef struct twn_payload {
    const uint8_t *data;
    size_t len;
    uint8_t *owned;
} twn_payload;

void twn_payload_free(twn_payload *p);

/* Wraps `n` payload bytes into a new frame (twn_free it).  Fails when n > max_size. */
int twn_frame_encode(const void *payload, size_t n, const twn_frame_opts *o, uint8_t **frame,
                     size_t *frame_len, twn_err *err);

/* Validates the header (magic, version, flags, reserved bytes, declared size <= max_size) and
 * only then decompresses; the result must be exactly the declared size. */
int twn_frame_decode(const void *frame, size_t n, const twn_frame_opts *o, twn_payload *out,
                     twn_err *err);

// ------------------------------------------------------------------------------------------------
// Envelopes (a packed twn.Envelope in a frame)

/* Sets env->version = TWN_PROTO_VERSION, packs and frames it into a new buffer (twn_free it).
 * Fails when the body is not set or the packed size exceeds max_size. */
int twn_msg_pack(Twn__Envelope *env, const twn_frame_opts *o, uint8_t **frame, size_t *frame_len,
                 twn_err *err);

/* Decodes the frame, unpacks the envelope, and refuses a different protocol version or an
 * envelope without a body.  Free the result with twn_msg_free. */
int twn_msg_unpack(const void *frame, size_t n, const twn_frame_opts *o, Twn__Envelope **env,
                   twn_err *err);

void twn_msg_free(Twn__Envelope *env);

/* "Hello", "EmbeddingBatch", ... for the envelope's body ("(none)" when unset, "(unknown)"). */
const char *twn_msg_name(const Twn__Envelope *env);

// ------------------------------------------------------------------------------------------------
// Vectors in EmbeddingBatch: one raw little-endian f32 array [n][dim]

/* Points batch->vectors at `v` (n = batch->n_items rows of batch->dim floats) without copying on
 * little-endian hosts; `v` must outlive the pack. */
void twn_batch_set_vectors(Twn__EmbeddingBatch *batch, const float *v);

/* Checks dim > 0 and vectors.len == n_items * dim * 4, naming the batch and sender when not. */
int twn_batch_check(const Twn__EmbeddingBatch *batch, twn_err *err);

/* Copies row-major vectors into out[n_items * dim] (after twn_batch_check). */
int twn_batch_get_vectors(const Twn__EmbeddingBatch *batch, float *out, twn_err *err);

// ------------------------------------------------------------------------------------------------
// Peer ids (ZeroMQ routing ids: 1..255 bytes)

typedef struct twn_peer_id {
    size_t len;
    uint8_t b[255];
} twn_peer_id;

/* From a C string (truncated at 255 bytes). */
twn_peer_id twn_peer_id_of(const char *s);
int twn_peer_id_eq(const twn_peer_id *a, const twn_peer_id *b);
/* Printable form for messages: the bytes when printable ASCII, else 0x-hex.  Returns buf. */
const char *twn_peer_id_str(const twn_peer_id *id, char *buf, size_t cap);
#define TWN_PEER_ID_STR_MAX 520

// ------------------------------------------------------------------------------------------------
// Sockets

typedef struct twn_sock_opts {
    int linger_ms;          /* ZMQ_LINGER; tests use 0 so zmq_ctx_term never hangs; default 1000 */
    int sndhwm, rcvhwm;     /* high-water marks in messages; 0 = libzmq default (1000) */
    int sndtimeo_ms;        /* blocking sends (DEALER/PUSH) give up after this; -1 = forever */
    const char *routing_id; /* DEALER: its identity (Hello.id); NULL = none */
    int heartbeat_ivl_ms;   /* ZMTP connection heartbeats (ZMQ_HEARTBEAT_IVL/TIMEOUT); 0 = off */
    int64_t max_msg_bytes;  /* ZMQ_MAXMSGSIZE: libzmq drops the connection of a peer sending a
                               larger message part before allocating it; 0 = none.  Set it
                               with twn_wire_limit(frame opts) so it matches the frame limit. */
} twn_sock_opts;

/* Room over a frame's payload limit for the frame header and CURVE's per-message box. */
#define TWN_WIRE_OVERHEAD 256u

/* The ZeroMQ message limit that goes with frame options: max_size + header + overhead. */
int64_t twn_wire_limit(const twn_frame_opts *fo);

/* linger 1000 ms, libzmq HWMs, sndtimeo 5000 ms, no routing id, no ZMTP heartbeats,
 * max_msg_bytes = twn_wire_limit(twn_frame_opts_default()) (64 MiB + 268). */
twn_sock_opts twn_sock_opts_default(void);

/* Checks "inproc://name", "ipc://path" (path 1..TWN_IPC_PATH_MAX bytes) or "tcp://host:port"
 * (port a number or "*"). */
int twn_endpoint_check(const char *endpoint, twn_err *err);

/* zmq_socket(type) with the options applied (see the top of this file for ROUTER's).  Returns the
 * socket or NULL with err set.  Close with twn_sock_close. */
void *twn_sock_new(void *zctx, int type, const twn_sock_opts *o, twn_err *err);
void twn_sock_close(void *sock);

/* Binds; when `actual` is not NULL it receives the bound endpoint (ZMQ_LAST_ENDPOINT), e.g.
 * "tcp://127.0.0.1:41234" for "tcp://127.0.0.1:*". */
int twn_sock_bind(void *sock, const char *endpoint, char *actual, size_t actual_cap, twn_err *err);
int twn_sock_connect(void *sock, const char *endpoint, twn_err *err);

/* ROUTER: one message [to][frame], never blocking.  -1 with errno EHOSTUNREACH ("peer 'x' is not
 * connected") or EAGAIN ("send queue to peer 'x' is full") instead of a silent drop. */
int twn_router_send(void *router, const twn_peer_id *to, const void *frame, size_t n, twn_err *err);

/* DEALER / PUSH: one message [frame]; blocks up to sndtimeo_ms, then -1 with errno EAGAIN. */
int twn_sock_send(void *sock, const void *frame, size_t n, twn_err *err);

typedef enum twn_recv_status {
    TWN_RECV_FAIL = -1,   /* socket error (ETERM, ENOTSOCK...): stop using it */
    TWN_RECV_TIMEOUT = 0, /* nothing within timeout_ms */
    TWN_RECV_MSG = 1,     /* a message */
    TWN_RECV_BAD = 2,     /* a message arrived but was malformed; consumed; err names the peer */
} twn_recv_status;

/* Waits up to timeout_ms (-1 forever, 0 poll) for one message.  On a ROUTER the first part is the
 * sender's id (into *from, which may be NULL elsewhere); the rest must be exactly one frame.
 * The frame is returned as a new buffer (twn_free it). */
twn_recv_status twn_sock_recv(void *sock, int timeout_ms, twn_peer_id *from, uint8_t **frame,
                              size_t *n, twn_err *err);

/* twn_msg_pack + twn_router_send (when `to` is not NULL) or twn_sock_send. */
int twn_send_msg(void *sock, const twn_peer_id *to, Twn__Envelope *env, const twn_frame_opts *o,
                 twn_err *err);

/* twn_sock_recv + twn_msg_unpack, decoding straight from the received message.  A frame that does
 * not decode is TWN_RECV_BAD with err naming the peer (ROUTER) and the problem. */
twn_recv_status twn_recv_msg(void *sock, int timeout_ms, const twn_frame_opts *o, twn_peer_id *from,
                             Twn__Envelope **env, twn_err *err);

// ------------------------------------------------------------------------------------------------
// Credits: "never send without credit"

typedef struct twn_credits {
    int64_t avail;    /* sends allowed now */
    uint64_t granted; /* total ever granted */
    uint64_t used;    /* total ever consumed */
} twn_credits;

void twn_credits_grant(twn_credits *c, uint32_t n);
/* Consumes one credit; -1 (nothing changed) when none is left. */
int twn_credits_take(twn_credits *c);
/* Gives back a credit taken for a send that then failed. */
void twn_credits_refund(twn_credits *c);

// ------------------------------------------------------------------------------------------------
// Peer table: liveness + credits per DEALER seen by a ROUTER

typedef struct twn_peer {
    twn_peer_id id;
    int role;          /* Twn__Role from Hello */
    int alive;         /* 0 once declared dead; it must Hello again (twn_peers_add) */
    double last_seen;  /* twn_now() seconds of the last message */
    uint64_t messages; /* messages seen since the last add */
    twn_credits credits;
    void *user; /* the role's own per-peer state; never touched here */
} twn_peer;

typedef struct twn_peers twn_peers;

/* A peer is declared dead when silent for more than interval_s * missed_beats seconds. */
twn_peers *twn_peers_new(double interval_s, int missed_beats);
void twn_peers_free(twn_peers *t);

/* Registers (Hello) or re-registers a peer: alive, last_seen = now, credits 0, messages 0; `user`
 * is kept on re-registration.  The pointer stays valid until twn_peers_remove / twn_peers_free. */
twn_peer *twn_peers_add(twn_peers *t, const twn_peer_id *id, double now);
twn_peer *twn_peers_find(const twn_peers *t, const twn_peer_id *id);
/* Any message from `id`: refreshes last_seen of a live peer.  Returns NULL for an unknown peer; a
 * dead peer is returned with alive == 0 and stays dead. */
twn_peer *twn_peers_touch(twn_peers *t, const twn_peer_id *id, double now);
/* Declares dead every live peer silent past its deadline; fills dead[0..cap) with them and
 * returns how many were newly declared dead (possibly more than cap). */
size_t twn_peers_expire(twn_peers *t, double now, twn_peer **dead, size_t cap);
/* The time at which `p` will be declared dead if it stays silent. */
double twn_peers_deadline(const twn_peers *t, const twn_peer *p);
/* Forgets a peer (returns its `user` pointer so the caller can free it; NULL when unknown). */
void *twn_peers_remove(twn_peers *t, const twn_peer_id *id);
size_t twn_peers_count(const twn_peers *t);
twn_peer *twn_peers_at(const twn_peers *t, size_t i);

/* twn_send_msg to a live peer only when it has credit: takes one, refunds it if the send fails.
 * -1 with "peer 'x' has no credit" / "peer 'x' is dead" without sending. */
int twn_send_credited(void *router, twn_peer *p, Twn__Envelope *env, const twn_frame_opts *o,
                      twn_err *err);

/* Heartbeat schedule for the sending side. */
typedef struct twn_beat {
    double interval_s;
    double next; /* twn_now() seconds when the next beat is due */
} twn_beat;

void twn_beat_init(twn_beat *b, double interval_s, double now);
/* 1 when a beat is due at `now` (and schedules the next one), else 0. */
int twn_beat_due(twn_beat *b, double now);

#endif
