/* transport.c — frames, envelopes, ZeroMQ socket helpers, credits and the peer table.
 *
 * Why the checks sit where they do: everything a peer sends is untrusted until twn_msg_unpack has
 * returned, so the frame header is validated (and its declared size bounded) before a byte is
 * decompressed, and the envelope is checked for the sub-messages role code dereferences without
 * looking (UnitLease.source, HardItem.ref, ...) before it is handed out. */
#include "common/transport.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <zmq.h>
#include <zstd.h>

#include "common/curve.h"
#include "util/mem.h"

#define MAGIC0 'T'
#define MAGIC1 'W'
#define MAGIC2 'N'

// ------------------------------------------------------------------------------------------------
// Frames

twn_frame_opts twn_frame_opts_default(void) {
    twn_frame_opts o = {.max_size = 64u << 20, .zstd_threshold = 4096, .zstd_level = 3};
    return o;
}

twn_frame_opts twn_frame_opts_for(const char *endpoint, const char *compress) {
    twn_frame_opts o = twn_frame_opts_default();
    if (compress && !strcmp(compress, "always")) return o;
    if ((compress && !strcmp(compress, "never")) || !endpoint || strncmp(endpoint, "tcp://", 6))
        o.zstd_threshold = 0;
    return o;
}

void twn_payload_free(twn_payload *p) {
    if (!p) return;
    twn_free(p->owned);
    memset(p, 0, sizeof *p);
}

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_header(uint8_t *h, uint8_t flags, size_t size) {
    h[0] = MAGIC0, h[1] = MAGIC1, h[2] = MAGIC2, h[3] = (uint8_t)TWN_FRAME_VERSION;
    h[4] = flags;
    h[5] = h[6] = h[7] = 0;
    put_u32(h + 8, (uint32_t)size);
}

static size_t frame_limit(const twn_frame_opts *o) {
    /* The size field is a u32: whatever the option says, nothing larger fits a frame. */
    return o->max_size < UINT32_MAX ? o->max_size : UINT32_MAX;
}

/* `buf` holds the payload at buf + TWN_FRAME_HEADER (n bytes, capacity header + n).  Writes the
 * header in place, or compresses into a new buffer when that pays; either way *frame owns the
 * result and `buf` is consumed. */
static int finish_frame(uint8_t *buf, size_t n, const twn_frame_opts *o, uint8_t **frame,
                        size_t *frame_len, twn_err *err) {
    if (o->zstd_threshold && n >= o->zstd_threshold) {
        size_t bound = ZSTD_compressBound(n);
        uint8_t *z = twn_try_alloc(TWN_FRAME_HEADER + bound);
        if (!z) {
            twn_free(buf);
            return twn_err_set(err, "cannot allocate %zu bytes to compress a frame",
                               TWN_FRAME_HEADER + bound);
        }
        size_t c =
            ZSTD_compress(z + TWN_FRAME_HEADER, bound, buf + TWN_FRAME_HEADER, n, o->zstd_level);
        if (!ZSTD_isError(c) && c < n) {
            twn_free(buf);
            put_header(z, TWN_FRAME_ZSTD, n);
            *frame = z;
            *frame_len = TWN_FRAME_HEADER + c;
            return 0;
        }
        twn_free(z); /* incompressible: send it raw */
    }
    put_header(buf, 0, n);
    *frame = buf;
    *frame_len = TWN_FRAME_HEADER + n;
    return 0;
}

int twn_frame_encode(const void *payload, size_t n, const twn_frame_opts *o, uint8_t **frame,
                     size_t *frame_len, twn_err *err) {
    *frame = NULL;
    *frame_len = 0;
    if (n > frame_limit(o))
        return twn_err_set(err, "frame payload is %zu bytes; the limit is %zu bytes", n,
                           frame_limit(o));
    uint8_t *buf = twn_try_alloc(TWN_FRAME_HEADER + n);
    if (!buf) return twn_err_set(err, "cannot allocate %zu bytes for a frame", n);
    if (n) memcpy(buf + TWN_FRAME_HEADER, payload, n);
    return finish_frame(buf, n, o, frame, frame_len, err);
}

int twn_frame_decode(const void *frame, size_t n, const twn_frame_opts *o, twn_payload *out,
                     twn_err *err) {
    memset(out, 0, sizeof *out);
    const uint8_t *f = frame;
    if (n < TWN_FRAME_HEADER)
        return twn_err_set(err, "frame is %zu bytes; expected at least the %u-byte header", n,
                           TWN_FRAME_HEADER);
    if (f[0] != MAGIC0 || f[1] != MAGIC1 || f[2] != MAGIC2)
        return twn_err_set(err, "frame magic is %02x %02x %02x; expected 54 57 4e (\"TWN\")", f[0],
                           f[1], f[2]);
    if (f[3] != TWN_FRAME_VERSION)
        return twn_err_set(err, "frame version is %u; this build speaks frame version %u", f[3],
                           TWN_FRAME_VERSION);
    if (f[4] & ~TWN_FRAME_ZSTD)
        return twn_err_set(err, "frame flags are 0x%02x; expected 0x00 or 0x01 (zstd)", f[4]);
    if (f[5] | f[6] | f[7])
        return twn_err_set(err, "frame reserved bytes are %02x %02x %02x; expected 00 00 00", f[5],
                           f[6], f[7]);
    size_t size = get_u32(f + 8), body = n - TWN_FRAME_HEADER;
    if (size > frame_limit(o))
        return twn_err_set(err, "frame declares a %zu-byte payload; the limit is %zu bytes", size,
                           frame_limit(o));
    const uint8_t *p = f + TWN_FRAME_HEADER;
    if (!(f[4] & TWN_FRAME_ZSTD)) {
        if (body != size)
            return twn_err_set(err, "frame declares %zu payload bytes but carries %zu", size, body);
        out->data = p;
        out->len = size;
        return 0;
    }
    size_t zlen = ZSTD_findFrameCompressedSize(p, body);
    if (ZSTD_isError(zlen))
        return twn_err_set(err, "zstd payload (%zu bytes) is corrupt: %s", body,
                           ZSTD_getErrorName(zlen));
    if (zlen != body)
        return twn_err_set(err, "zstd payload is %zu bytes followed by %zu stray bytes", zlen,
                           body - zlen);
    unsigned long long cs = ZSTD_getFrameContentSize(p, body);
    if (cs == ZSTD_CONTENTSIZE_ERROR || cs == ZSTD_CONTENTSIZE_UNKNOWN)
        return twn_err_set(err, "zstd payload does not record its size; expected %zu bytes", size);
    if (cs != size)
        return twn_err_set(err, "zstd payload holds %llu bytes but the frame declares %zu", cs,
                           size);
    uint8_t *dst = twn_try_alloc(size ? size : 1);
    if (!dst) return twn_err_set(err, "cannot allocate %zu bytes to decompress a frame", size);
    size_t got = ZSTD_decompress(dst, size, p, body);
    if (ZSTD_isError(got) || got != size) {
        twn_free(dst);
        if (ZSTD_isError(got))
            return twn_err_set(err, "zstd payload is corrupt: %s", ZSTD_getErrorName(got));
        return twn_err_set(err, "zstd payload decompressed to %zu bytes; expected %zu", got, size);
    }
    out->data = out->owned = dst;
    out->len = size;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Envelopes

const char *twn_msg_name(const Twn__Envelope *env) {
    switch (env->body_case) {
    case TWN__ENVELOPE__BODY__NOT_SET:
        return "(none)";
    case TWN__ENVELOPE__BODY_HELLO:
        return "Hello";
    case TWN__ENVELOPE__BODY_WELCOME:
        return "Welcome";
    case TWN__ENVELOPE__BODY_HEARTBEAT:
        return "Heartbeat";
    case TWN__ENVELOPE__BODY_WORK_REQUEST:
        return "WorkRequest";
    case TWN__ENVELOPE__BODY_CREDIT_GRANT:
        return "CreditGrant";
    case TWN__ENVELOPE__BODY_UNIT_LEASE:
        return "UnitLease";
    case TWN__ENVELOPE__BODY_HARD_ITEMS:
        return "HardItems";
    case TWN__ENVELOPE__BODY_REASON_LEASE:
        return "ReasonLease";
    case TWN__ENVELOPE__BODY_REJECTS:
        return "Rejects";
    case TWN__ENVELOPE__BODY_EMBEDDING_BATCH:
        return "EmbeddingBatch";
    case TWN__ENVELOPE__BODY_ACK:
        return "Ack";
    case TWN__ENVELOPE__BODY_UNIT_DONE:
        return "UnitDone";
    case TWN__ENVELOPE__BODY_PROGRESS:
        return "Progress";
    case TWN__ENVELOPE__BODY_SHUTDOWN:
        return "Shutdown";
    case TWN__ENVELOPE__BODY_FINISHED:
        return "Finished";
    default:
        return "(unknown)";
    }
}

int twn_msg_pack(Twn__Envelope *env, const twn_frame_opts *o, uint8_t **frame, size_t *frame_len,
                 twn_err *err) {
    *frame = NULL;
    *frame_len = 0;
    if (env->body_case == TWN__ENVELOPE__BODY__NOT_SET)
        return twn_err_set(err, "cannot send an envelope without a body");
    env->version = TWN_PROTO_VERSION;
    size_t n = twn__envelope__get_packed_size(env);
    if (n > frame_limit(o))
        return twn_err_set(err, "%s message packs to %zu bytes; the limit is %zu bytes",
                           twn_msg_name(env), n, frame_limit(o));
    uint8_t *buf = twn_try_alloc(TWN_FRAME_HEADER + n);
    if (!buf)
        return twn_err_set(err, "cannot allocate %zu bytes for a %s message", n, twn_msg_name(env));
    size_t w = twn__envelope__pack(env, buf + TWN_FRAME_HEADER);
    if (w != n) {
        twn_free(buf);
        return twn_err_set(err, "%s message packed to %zu bytes; expected %zu", twn_msg_name(env),
                           w, n);
    }
    return finish_frame(buf, n, o, frame, frame_len, err);
}

static int check_source(const Twn__SourceRef *s, const char *what, twn_err *err) {
    if (!s) return twn_err_set(err, "%s has no source", what);
    return 0;
}

static int check_item_ref(const Twn__ItemRef *r, const char *what, size_t k, twn_err *err) {
    if (!r) return twn_err_set(err, "%s item %zu has no ref", what, k);
    if (!r->source) return twn_err_set(err, "%s item %zu ref has no source", what, k);
    return 0;
}

static int check_hard(Twn__HardItem *const *items, size_t n, const char *what, twn_err *err) {
    for (size_t k = 0; k < n; k++)
        if (check_item_ref(items[k]->ref, what, k, err)) return -1;
    return 0;
}

/* The sub-messages role code may dereference without checking are present; sizes agree. */
static int check_envelope(const Twn__Envelope *e, twn_err *err) {
    switch (e->body_case) {
    case TWN__ENVELOPE__BODY_HELLO:
        if (!e->hello->id[0]) return twn_err_set(err, "Hello has an empty id");
        if (strlen(e->hello->id) > 255)
            return twn_err_set(err, "Hello id is %zu bytes; the limit is 255",
                               strlen(e->hello->id));
        return 0;
    case TWN__ENVELOPE__BODY_UNIT_LEASE:
        return check_source(e->unit_lease->source, "UnitLease", err);
    case TWN__ENVELOPE__BODY_HARD_ITEMS:
        return check_hard(e->hard_items->items, e->hard_items->n_items, "HardItems", err);
    case TWN__ENVELOPE__BODY_REASON_LEASE:
        return check_hard(e->reason_lease->items, e->reason_lease->n_items, "ReasonLease", err);
    case TWN__ENVELOPE__BODY_REJECTS:
        for (size_t k = 0; k < e->rejects->n_items; k++)
            if (check_item_ref(e->rejects->items[k]->ref, "Rejects", k, err)) return -1;
        return 0;
    case TWN__ENVELOPE__BODY_EMBEDDING_BATCH:
        return twn_batch_check(e->embedding_batch, err);
    default:
        return 0;
    }
}

int twn_msg_unpack(const void *frame, size_t n, const twn_frame_opts *o, Twn__Envelope **env,
                   twn_err *err) {
    *env = NULL;
    twn_payload p;
    if (twn_frame_decode(frame, n, o, &p, err)) return -1;
    size_t len = p.len;
    Twn__Envelope *e = twn__envelope__unpack(NULL, len, p.data);
    twn_payload_free(&p);
    if (!e) return twn_err_set(err, "payload (%zu bytes) is not a valid twn.Envelope", len);
    if (e->version != TWN_PROTO_VERSION) {
        twn_err_set(err, "message has protocol version %u; this build speaks version %u",
                    e->version, TWN_PROTO_VERSION);
        goto fail;
    }
    if (e->body_case == TWN__ENVELOPE__BODY__NOT_SET) {
        twn_err_set(err, "envelope carries no message this build knows (body unset or newer)");
        goto fail;
    }
    if (check_envelope(e, err)) goto fail;
    *env = e;
    return 0;
fail:
    twn__envelope__free_unpacked(e, NULL);
    return -1;
}

void twn_msg_free(Twn__Envelope *env) {
    if (env) twn__envelope__free_unpacked(env, NULL);
}

// ------------------------------------------------------------------------------------------------
// Vectors

static int host_is_le(void) {
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

void twn_batch_set_vectors(Twn__EmbeddingBatch *batch, const float *v) {
    /* All supported hosts are little-endian (x86-64, aarch64); a big-endian port would need a
     * byte-swapped copy here and in twn_batch_get_vectors. */
    batch->vectors.data = (uint8_t *)v;
    batch->vectors.len = batch->n_items * batch->dim * sizeof(float);
}

int twn_batch_check(const Twn__EmbeddingBatch *b, twn_err *err) {
    if (b->dim == 0 && b->n_items)
        return twn_err_set(err, "EmbeddingBatch %llu from '%s' has dim 0 and %zu items",
                           (unsigned long long)b->batch_id, b->sender, b->n_items);
    /* n_items and dim are bounded by the frame size, so the product cannot overflow 64 bits. */
    uint64_t want = (uint64_t)b->n_items * b->dim * sizeof(float);
    if (b->vectors.len != want)
        return twn_err_set(err,
                           "EmbeddingBatch %llu from '%s': vectors are %zu bytes; expected %zu "
                           "items x %u dims x 4 = %llu",
                           (unsigned long long)b->batch_id, b->sender, b->vectors.len, b->n_items,
                           b->dim, (unsigned long long)want);
    return 0;
}

int twn_batch_get_vectors(const Twn__EmbeddingBatch *b, float *out, twn_err *err) {
    if (twn_batch_check(b, err)) return -1;
    if (!host_is_le()) return twn_err_set(err, "big-endian hosts are not supported");
    if (b->vectors.len) memcpy(out, b->vectors.data, b->vectors.len);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Peer ids

twn_peer_id twn_peer_id_of(const char *s) {
    twn_peer_id id;
    id.len = strnlen(s, sizeof id.b);
    memcpy(id.b, s, id.len);
    return id;
}

int twn_peer_id_eq(const twn_peer_id *a, const twn_peer_id *b) {
    return a->len == b->len && memcmp(a->b, b->b, a->len) == 0;
}

const char *twn_peer_id_str(const twn_peer_id *id, char *buf, size_t cap) {
    int printable = id->len > 0;
    for (size_t i = 0; i < id->len; i++)
        if (id->b[i] < 0x20 || id->b[i] > 0x7e || id->b[i] == '\'') printable = 0;
    size_t w = 0;
    if (!cap) return buf;
    if (printable) {
        w = id->len < cap - 1 ? id->len : cap - 1;
        memcpy(buf, id->b, w);
    } else {
        w = (size_t)snprintf(buf, cap, "0x");
        for (size_t i = 0; i < id->len && w + 3 <= cap; i++)
            w += (size_t)snprintf(buf + w, cap - w, "%02x", id->b[i]);
        if (w >= cap) w = cap - 1;
    }
    buf[w] = 0;
    return buf;
}

// ------------------------------------------------------------------------------------------------
// Sockets

int64_t twn_wire_limit(const twn_frame_opts *fo) {
    return (int64_t)frame_limit(fo) + TWN_FRAME_HEADER + TWN_WIRE_OVERHEAD;
}

twn_sock_opts twn_sock_opts_default(void) {
    twn_frame_opts fo = twn_frame_opts_default();
    twn_sock_opts o = {
        .linger_ms = 1000, .sndtimeo_ms = 5000, .max_msg_bytes = twn_wire_limit(&fo)};
    return o;
}

static const char *sock_type_name(int type) {
    switch (type) {
    case ZMQ_ROUTER:
        return "ROUTER";
    case ZMQ_DEALER:
        return "DEALER";
    case ZMQ_PUSH:
        return "PUSH";
    case ZMQ_PULL:
        return "PULL";
    case ZMQ_PAIR:
        return "PAIR";
    case ZMQ_PUB:
        return "PUB";
    case ZMQ_SUB:
        return "SUB";
    default:
        return "socket";
    }
}

int twn_endpoint_check(const char *ep, twn_err *err) {
    if (!ep) return twn_err_set(err, "endpoint is missing");
    size_t n = strlen(ep);
    if (n >= TWN_ENDPOINT_MAX)
        return twn_err_set(err, "endpoint is %zu bytes; the limit is %u", n, TWN_ENDPOINT_MAX - 1);
    if (!strncmp(ep, "inproc://", 9)) {
        if (!ep[9]) return twn_err_set(err, "endpoint '%s': inproc:// needs a name", ep);
        return 0;
    }
    if (!strncmp(ep, "ipc://", 6)) {
        size_t pl = n - 6;
        if (!pl) return twn_err_set(err, "endpoint '%s': ipc:// needs a path", ep);
        if (pl > TWN_IPC_PATH_MAX)
            return twn_err_set(err,
                               "endpoint '%s': ipc path is %zu bytes; the limit is %u (unix "
                               "socket paths); use a shorter directory",
                               ep, pl, TWN_IPC_PATH_MAX);
        return 0;
    }
    if (!strncmp(ep, "tcp://", 6)) {
        const char *hp = ep + 6, *colon = strrchr(hp, ':');
        if (!colon || colon == hp)
            return twn_err_set(err, "endpoint '%s': expected tcp://host:port", ep);
        const char *port = colon + 1;
        if (!strcmp(port, "*")) return 0;
        if (!*port) return twn_err_set(err, "endpoint '%s': the port is empty", ep);
        long v = 0;
        for (const char *c = port; *c; c++) {
            if (*c < '0' || *c > '9' || v > 65535)
                return twn_err_set(err, "endpoint '%s': port '%s' is not a number 1..65535 or *",
                                   ep, port);
            v = v * 10 + (*c - '0');
        }
        if (v < 1 || v > 65535)
            return twn_err_set(err, "endpoint '%s': port %ld is outside 1..65535", ep, v);
        return 0;
    }
    return twn_err_set(err, "endpoint '%s': expected inproc://, ipc:// or tcp://", ep);
}

static int setopt_int(void *s, int opt, int v, const char *name, int type, twn_err *err) {
    if (zmq_setsockopt(s, opt, &v, sizeof v))
        return twn_err_set(err, "%s: setting %s to %d: %s", sock_type_name(type), name, v,
                           zmq_strerror(zmq_errno()));
    return 0;
}

void *twn_sock_new(void *zctx, int type, const twn_sock_opts *o, twn_err *err) {
    twn_sock_opts d = twn_sock_opts_default();
    if (!o) o = &d;
    void *s = zmq_socket(zctx, type);
    if (!s) {
        twn_err_set(err, "zmq_socket(%s): %s", sock_type_name(type), zmq_strerror(zmq_errno()));
        return NULL;
    }
    if (setopt_int(s, ZMQ_LINGER, o->linger_ms, "ZMQ_LINGER", type, err)) goto fail;
    if (o->sndhwm > 0 && setopt_int(s, ZMQ_SNDHWM, o->sndhwm, "ZMQ_SNDHWM", type, err)) goto fail;
    if (o->rcvhwm > 0 && setopt_int(s, ZMQ_RCVHWM, o->rcvhwm, "ZMQ_RCVHWM", type, err)) goto fail;
    if (type != ZMQ_ROUTER &&
        setopt_int(s, ZMQ_SNDTIMEO, o->sndtimeo_ms, "ZMQ_SNDTIMEO", type, err))
        goto fail;
    if (type == ZMQ_ROUTER) {
        if (setopt_int(s, ZMQ_ROUTER_MANDATORY, 1, "ZMQ_ROUTER_MANDATORY", type, err)) goto fail;
        if (setopt_int(s, ZMQ_ROUTER_HANDOVER, 1, "ZMQ_ROUTER_HANDOVER", type, err)) goto fail;
    }
    if (o->routing_id) {
        size_t n = strlen(o->routing_id);
        if (n == 0 || n > 255 || (unsigned char)o->routing_id[0] == 0) {
            twn_err_set(err, "%s routing id '%s' is %zu bytes; expected 1..255",
                        sock_type_name(type), o->routing_id, n);
            goto fail;
        }
        if (zmq_setsockopt(s, ZMQ_ROUTING_ID, o->routing_id, n)) {
            twn_err_set(err, "%s: setting routing id '%s': %s", sock_type_name(type), o->routing_id,
                        zmq_strerror(zmq_errno()));
            goto fail;
        }
    }
    if (o->max_msg_bytes &&
        zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &o->max_msg_bytes, sizeof o->max_msg_bytes)) {
        twn_err_set(err, "%s: setting ZMQ_MAXMSGSIZE to %lld: %s", sock_type_name(type),
                    (long long)o->max_msg_bytes, zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (o->heartbeat_ivl_ms > 0) {
        if (setopt_int(s, ZMQ_HEARTBEAT_IVL, o->heartbeat_ivl_ms, "ZMQ_HEARTBEAT_IVL", type, err) ||
            setopt_int(s, ZMQ_HEARTBEAT_TIMEOUT, 3 * o->heartbeat_ivl_ms, "ZMQ_HEARTBEAT_TIMEOUT",
                       type, err))
            goto fail;
    }
    return s;
fail:
    zmq_close(s);
    return NULL;
}

void twn_sock_close(void *sock) {
    if (!sock) return;
    twn_curve_unwatch(sock); /* a handshake monitor, if one was started (common/curve.h) */
    zmq_close(sock);
}

static int sock_type(void *s) {
    int t = -1;
    size_t n = sizeof t;
    if (zmq_getsockopt(s, ZMQ_TYPE, &t, &n)) return -1;
    return t;
}

int twn_sock_bind(void *sock, const char *endpoint, char *actual, size_t actual_cap, twn_err *err) {
    if (twn_endpoint_check(endpoint, err)) return -1;
    if (zmq_bind(sock, endpoint))
        return twn_err_set(err, "%s: cannot bind '%s': %s", sock_type_name(sock_type(sock)),
                           endpoint, zmq_strerror(zmq_errno()));
    if (actual && actual_cap) {
        size_t n = actual_cap;
        if (zmq_getsockopt(sock, ZMQ_LAST_ENDPOINT, actual, &n))
            return twn_err_set(err, "%s: bound '%s' but cannot read ZMQ_LAST_ENDPOINT: %s",
                               sock_type_name(sock_type(sock)), endpoint,
                               zmq_strerror(zmq_errno()));
        actual[actual_cap - 1] = 0;
    }
    return 0;
}

int twn_sock_connect(void *sock, const char *endpoint, twn_err *err) {
    if (twn_endpoint_check(endpoint, err)) return -1;
    if (zmq_connect(sock, endpoint))
        return twn_err_set(err, "%s: cannot connect to '%s': %s", sock_type_name(sock_type(sock)),
                           endpoint, zmq_strerror(zmq_errno()));
    return 0;
}

static void zfree(void *data, void *hint) {
    (void)hint;
    twn_free(data);
}

/* Sends [to][msg] on a ROUTER without blocking; consumes `m` in every case. */
static int router_send_msg(void *router, const twn_peer_id *to, zmq_msg_t *m, twn_err *err) {
    char idb[TWN_PEER_ID_STR_MAX];
    if (!to->len) {
        zmq_msg_close(m);
        errno = EINVAL;
        return twn_err_set(err, "ROUTER send: the peer id is empty");
    }
    if (zmq_send(router, to->b, to->len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
        int e = zmq_errno();
        zmq_msg_close(m);
        twn_peer_id_str(to, idb, sizeof idb);
        if (e == EHOSTUNREACH)
            twn_err_set(err, "peer '%s' is not connected (EHOSTUNREACH)", idb);
        else if (e == EAGAIN)
            twn_err_set(err, "send queue to peer '%s' is full (EAGAIN)", idb);
        else
            twn_err_set(err, "ROUTER send to peer '%s': %s", idb, zmq_strerror(e));
        errno = e;
        return -1;
    }
    /* Once the first part is accepted the rest of a multipart message is too. */
    if (zmq_msg_send(m, router, ZMQ_DONTWAIT) < 0) {
        int e = zmq_errno();
        zmq_msg_close(m);
        twn_err_set(err, "ROUTER send to peer '%s': %s", twn_peer_id_str(to, idb, sizeof idb),
                    zmq_strerror(e));
        errno = e;
        return -1;
    }
    return 0;
}

static int plain_send_msg(void *sock, zmq_msg_t *m, twn_err *err) {
    if (zmq_msg_send(m, sock, 0) < 0) {
        int e = zmq_errno();
        zmq_msg_close(m);
        int t = sock_type(sock);
        if (e == EAGAIN)
            twn_err_set(err, "%s send timed out: no peer took the message (EAGAIN)",
                        sock_type_name(t));
        else
            twn_err_set(err, "%s send: %s", sock_type_name(t), zmq_strerror(e));
        errno = e;
        return -1;
    }
    return 0;
}

int twn_router_send(void *router, const twn_peer_id *to, const void *frame, size_t n,
                    twn_err *err) {
    zmq_msg_t m;
    if (zmq_msg_init_size(&m, n)) return twn_err_set(err, "cannot allocate a %zu-byte message", n);
    if (n) memcpy(zmq_msg_data(&m), frame, n);
    return router_send_msg(router, to, &m, err);
}

int twn_sock_send(void *sock, const void *frame, size_t n, twn_err *err) {
    zmq_msg_t m;
    if (zmq_msg_init_size(&m, n)) return twn_err_set(err, "cannot allocate a %zu-byte message", n);
    if (n) memcpy(zmq_msg_data(&m), frame, n);
    return plain_send_msg(sock, &m, err);
}

int twn_send_msg(void *sock, const twn_peer_id *to, Twn__Envelope *env, const twn_frame_opts *o,
                 twn_err *err) {
    uint8_t *frame;
    size_t n;
    if (twn_msg_pack(env, o, &frame, &n, err)) return -1;
    zmq_msg_t m; /* zero copy: ZeroMQ frees the frame when it is on the wire */
    if (zmq_msg_init_data(&m, frame, n, zfree, NULL)) {
        twn_free(frame);
        return twn_err_set(err, "cannot wrap a %zu-byte message", n);
    }
    return to ? router_send_msg(sock, to, &m, err) : plain_send_msg(sock, &m, err);
}

static void drain(void *sock) {
    int more = 1;
    size_t ml = sizeof more;
    while (zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &ml) == 0 && more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        zmq_msg_recv(&m, sock, ZMQ_DONTWAIT);
        zmq_msg_close(&m);
        ml = sizeof more;
    }
}

static int rcvmore(void *sock) {
    int more = 0;
    size_t ml = sizeof more;
    zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &ml);
    return more;
}

/* Receives one message into `m` (the frame part), the sender id into *from on a ROUTER. */
static twn_recv_status recv_parts(void *sock, int timeout_ms, twn_peer_id *from, zmq_msg_t *m,
                                  twn_err *err) {
    int type = sock_type(sock);
    if (type < 0) {
        twn_err_set(err, "receive: not a socket: %s", zmq_strerror(zmq_errno()));
        return TWN_RECV_FAIL;
    }
    zmq_pollitem_t pi = {.socket = sock, .events = ZMQ_POLLIN};
    int r = zmq_poll(&pi, 1, timeout_ms);
    if (r < 0) {
        if (zmq_errno() == EINTR) return TWN_RECV_TIMEOUT;
        twn_err_set(err, "%s poll: %s", sock_type_name(type), zmq_strerror(zmq_errno()));
        return TWN_RECV_FAIL;
    }
    if (r == 0) return TWN_RECV_TIMEOUT;
    twn_peer_id who = {0};
    char idb[TWN_PEER_ID_STR_MAX];
    if (type == ZMQ_ROUTER) {
        zmq_msg_t idm;
        zmq_msg_init(&idm);
        if (zmq_msg_recv(&idm, sock, ZMQ_DONTWAIT) < 0) {
            int e = zmq_errno();
            zmq_msg_close(&idm);
            if (e == EAGAIN || e == EINTR) return TWN_RECV_TIMEOUT;
            twn_err_set(err, "ROUTER receive: %s", zmq_strerror(e));
            return TWN_RECV_FAIL;
        }
        who.len = zmq_msg_size(&idm) < sizeof who.b ? zmq_msg_size(&idm) : sizeof who.b;
        memcpy(who.b, zmq_msg_data(&idm), who.len);
        zmq_msg_close(&idm);
        if (from) *from = who;
        if (!rcvmore(sock)) {
            twn_err_set(err, "message from peer '%s' has no payload part",
                        twn_peer_id_str(&who, idb, sizeof idb));
            return TWN_RECV_BAD;
        }
    }
    zmq_msg_init(m);
    if (zmq_msg_recv(m, sock, ZMQ_DONTWAIT) < 0) {
        int e = zmq_errno();
        zmq_msg_close(m);
        if (type != ZMQ_ROUTER && (e == EAGAIN || e == EINTR)) return TWN_RECV_TIMEOUT;
        twn_err_set(err, "%s receive: %s", sock_type_name(type), zmq_strerror(e));
        return TWN_RECV_FAIL;
    }
    if (rcvmore(sock)) {
        drain(sock);
        zmq_msg_close(m);
        if (type == ZMQ_ROUTER)
            twn_err_set(err, "message from peer '%s' has more than one payload part",
                        twn_peer_id_str(&who, idb, sizeof idb));
        else
            twn_err_set(err, "%s message has more than one part", sock_type_name(type));
        return TWN_RECV_BAD;
    }
    return TWN_RECV_MSG;
}

twn_recv_status twn_sock_recv(void *sock, int timeout_ms, twn_peer_id *from, uint8_t **frame,
                              size_t *n, twn_err *err) {
    *frame = NULL;
    *n = 0;
    zmq_msg_t m;
    twn_recv_status st = recv_parts(sock, timeout_ms, from, &m, err);
    if (st != TWN_RECV_MSG) return st;
    size_t len = zmq_msg_size(&m);
    uint8_t *buf = twn_try_alloc(len ? len : 1);
    if (!buf) {
        zmq_msg_close(&m);
        twn_err_set(err, "cannot allocate %zu bytes for a received message", len);
        return TWN_RECV_BAD;
    }
    if (len) memcpy(buf, zmq_msg_data(&m), len);
    zmq_msg_close(&m);
    *frame = buf;
    *n = len;
    return TWN_RECV_MSG;
}

twn_recv_status twn_recv_msg(void *sock, int timeout_ms, const twn_frame_opts *o, twn_peer_id *from,
                             Twn__Envelope **env, twn_err *err) {
    *env = NULL;
    twn_peer_id who = {0};
    zmq_msg_t m;
    twn_recv_status st = recv_parts(sock, timeout_ms, &who, &m, err);
    if (from) *from = who;
    if (st != TWN_RECV_MSG) return st;
    int rc = twn_msg_unpack(zmq_msg_data(&m), zmq_msg_size(&m), o, env, err);
    zmq_msg_close(&m);
    if (rc) {
        char idb[TWN_PEER_ID_STR_MAX];
        if (who.len)
            twn_err_wrap(err, "message from peer '%s'", twn_peer_id_str(&who, idb, sizeof idb));
        else
            twn_err_wrap(err, "%s message", sock_type_name(sock_type(sock)));
        return TWN_RECV_BAD;
    }
    return TWN_RECV_MSG;
}

// ------------------------------------------------------------------------------------------------
// Credits

void twn_credits_grant(twn_credits *c, uint32_t n) {
    c->avail += n;
    c->granted += n;
}

int twn_credits_take(twn_credits *c) {
    if (c->avail <= 0) return -1;
    c->avail--;
    c->used++;
    return 0;
}

void twn_credits_refund(twn_credits *c) {
    c->avail++;
    c->used--;
}

// ------------------------------------------------------------------------------------------------
// Peer table.  Peers are few (one per process of the fleet) and touched once per message, so a
// linear scan over an array of stable pointers is the whole data structure.

struct twn_peers {
    double interval_s;
    int missed;
    twn_peer **v;
    size_t n, cap;
};

twn_peers *twn_peers_new(double interval_s, int missed_beats) {
    twn_peers *t = twn_calloc(1, sizeof *t);
    t->interval_s = interval_s;
    t->missed = missed_beats > 0 ? missed_beats : 1;
    return t;
}

void twn_peers_free(twn_peers *t) {
    if (!t) return;
    for (size_t i = 0; i < t->n; i++) twn_free(t->v[i]);
    twn_free(t->v);
    twn_free(t);
}

twn_peer *twn_peers_find(const twn_peers *t, const twn_peer_id *id) {
    for (size_t i = 0; i < t->n; i++)
        if (twn_peer_id_eq(&t->v[i]->id, id)) return t->v[i];
    return NULL;
}

twn_peer *twn_peers_add(twn_peers *t, const twn_peer_id *id, double now) {
    twn_peer *p = twn_peers_find(t, id);
    if (!p) {
        if (t->n == t->cap) {
            t->cap = t->cap ? 2 * t->cap : 16;
            t->v = twn_realloc(t->v, t->cap * sizeof *t->v);
        }
        p = twn_calloc(1, sizeof *p);
        p->id = *id;
        t->v[t->n++] = p;
    }
    void *user = p->user;
    memset(p, 0, sizeof *p);
    p->id = *id;
    p->user = user;
    p->alive = 1;
    p->last_seen = now;
    return p;
}

twn_peer *twn_peers_touch(twn_peers *t, const twn_peer_id *id, double now) {
    twn_peer *p = twn_peers_find(t, id);
    if (p && p->alive) {
        if (now > p->last_seen) p->last_seen = now;
        p->messages++;
    }
    return p;
}

double twn_peers_deadline(const twn_peers *t, const twn_peer *p) {
    return p->last_seen + t->interval_s * t->missed;
}

size_t twn_peers_expire(twn_peers *t, double now, twn_peer **dead, size_t cap) {
    size_t k = 0;
    for (size_t i = 0; i < t->n; i++) {
        twn_peer *p = t->v[i];
        if (p->alive && now > twn_peers_deadline(t, p)) {
            p->alive = 0;
            if (k < cap) dead[k] = p;
            k++;
        }
    }
    return k;
}

void *twn_peers_remove(twn_peers *t, const twn_peer_id *id) {
    for (size_t i = 0; i < t->n; i++)
        if (twn_peer_id_eq(&t->v[i]->id, id)) {
            void *user = t->v[i]->user;
            twn_free(t->v[i]);
            memmove(t->v + i, t->v + i + 1, (t->n - i - 1) * sizeof *t->v);
            t->n--;
            return user;
        }
    return NULL;
}

size_t twn_peers_count(const twn_peers *t) {
    return t->n;
}

twn_peer *twn_peers_at(const twn_peers *t, size_t i) {
    return i < t->n ? t->v[i] : NULL;
}

int twn_send_credited(void *router, twn_peer *p, Twn__Envelope *env, const twn_frame_opts *o,
                      twn_err *err) {
    char idb[TWN_PEER_ID_STR_MAX];
    if (!p->alive)
        return twn_err_set(err, "peer '%s' is dead; not sending %s",
                           twn_peer_id_str(&p->id, idb, sizeof idb), twn_msg_name(env));
    if (twn_credits_take(&p->credits))
        return twn_err_set(err, "peer '%s' has no credit; not sending %s",
                           twn_peer_id_str(&p->id, idb, sizeof idb), twn_msg_name(env));
    if (twn_send_msg(router, &p->id, env, o, err)) {
        int e = errno;
        twn_credits_refund(&p->credits);
        errno = e;
        return -1;
    }
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Heartbeat schedule

void twn_beat_init(twn_beat *b, double interval_s, double now) {
    b->interval_s = interval_s;
    b->next = now; /* the first beat is due at once */
}

int twn_beat_due(twn_beat *b, double now) {
    if (now < b->next) return 0;
    b->next += b->interval_s;
    if (b->next <= now) b->next = now + b->interval_s; /* after a stall, do not burst */
    return 1;
}
