/* fuzz_proto.c — arbitrary bytes through frame decode + envelope unpack (what every socket does
 * with what a peer sends).
 *
 * Two ways in, chosen by the first byte: 'T' feeds the bytes as a frame (header checks, zstd);
 * anything else wraps the rest as the payload of a valid frame (compressed when the second bit
 * is set), so mutations reach protobuf-c's parser and the envelope checks directly.  A message
 * that unpacks must keep the promises role code relies on without checking: version and body
 * set, the sub-messages twn_msg_unpack checks present, an EmbeddingBatch's vectors exactly
 * n_items * dim * 4 bytes (all of them are read); it must re-pack and unpack to the same bytes.
 * A refusal must leave no envelope.  Seeds: frames of every message kind written by twn_msg_pack
 * (raw and zstd), plus a few bare payloads. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/transport.h"
#include "util/mem.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void touch_ref(const Twn__ItemRef *r) {
    if (!r || !r->source || !r->source->path || !r->item_id) abort();
}

static void check(const Twn__Envelope *e) {
    if (e->version != TWN_PROTO_VERSION) abort();
    switch (e->body_case) {
    case TWN__ENVELOPE__BODY_HELLO:
        if (!e->hello->id[0] || strlen(e->hello->id) > 255) abort();
        break;
    case TWN__ENVELOPE__BODY_UNIT_LEASE:
        if (!e->unit_lease->source || !e->unit_lease->source->path) abort();
        break;
    case TWN__ENVELOPE__BODY_HARD_ITEMS:
        for (size_t i = 0; i < e->hard_items->n_items; i++) touch_ref(e->hard_items->items[i]->ref);
        break;
    case TWN__ENVELOPE__BODY_REASON_LEASE:
        for (size_t i = 0; i < e->reason_lease->n_items; i++)
            touch_ref(e->reason_lease->items[i]->ref);
        break;
    case TWN__ENVELOPE__BODY_REJECTS:
        for (size_t i = 0; i < e->rejects->n_items; i++) touch_ref(e->rejects->items[i]->ref);
        break;
    case TWN__ENVELOPE__BODY_EMBEDDING_BATCH: {
        const Twn__EmbeddingBatch *b = e->embedding_batch;
        if (b->vectors.len != (uint64_t)b->n_items * b->dim * 4) abort();
        float *v = malloc(b->vectors.len + 4);
        twn_err err = {{0}};
        if (twn_batch_get_vectors(b, v, &err)) abort();
        volatile float sink = 0;
        for (size_t i = 0; i < b->n_items * b->dim; i++) sink += v[i];
        (void)sink;
        for (size_t i = 0; i < b->n_items; i++)
            if (!b->items[i]->id) abort();
        free(v);
        break;
    }
    case TWN__ENVELOPE__BODY__NOT_SET:
        abort();
    default:
        break;
    }
}

/* protobuf-c keeps unknown fields and packs them back, including ones it should not have accepted
 * (field number 0 with a non-minimal tag), which then fail to unpack.  Peers never produce those,
 * so the round-trip check runs on the known fields only. */
static void strip_unknown(ProtobufCMessage *m) {
    for (unsigned i = 0; i < m->n_unknown_fields; i++) free(m->unknown_fields[i].data);
    free(m->unknown_fields);
    m->unknown_fields = NULL;
    m->n_unknown_fields = 0;
    const ProtobufCMessageDescriptor *d = m->descriptor;
    for (unsigned f = 0; f < d->n_fields; f++) {
        const ProtobufCFieldDescriptor *fd = &d->fields[f];
        if (fd->type != PROTOBUF_C_TYPE_MESSAGE) continue;
        char *base = (char *)m;
        if (fd->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(size_t *)(base + fd->quantifier_offset);
            ProtobufCMessage **v = *(ProtobufCMessage ***)(base + fd->offset);
            for (size_t k = 0; k < n; k++) strip_unknown(v[k]);
            continue;
        }
        if ((fd->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
            *(uint32_t *)(base + fd->quantifier_offset) != fd->id)
            continue;
        ProtobufCMessage *sub = *(ProtobufCMessage **)(base + fd->offset);
        if (sub) strip_unknown(sub);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    twn_frame_opts fo = twn_frame_opts_default();
    fo.max_size = 1 << 20;
    twn_err err = {{0}};
    uint8_t *frame = NULL;
    size_t n = size;
    const uint8_t *in = data;
    if (size && data[0] != 'T') {
        twn_frame_opts wrap = fo;
        wrap.zstd_threshold = data[0] & 2 ? 1 : 0;
        if (twn_frame_encode(data + 1, size - 1, &wrap, &frame, &n, &err)) abort();
        in = frame;
    }
    Twn__Envelope *e = (Twn__Envelope *)1;
    if (twn_msg_unpack(in, n, &fo, &e, &err)) {
        if (e || !err.msg[0]) abort();
        twn_free(frame);
        return 0;
    }
    check(e);
    (void)twn_msg_name(e);
    /* Re-pack, unpack, re-pack: the bytes are stable. */
    strip_unknown(&e->base);
    uint8_t *f1, *f2;
    size_t n1, n2;
    if (twn_msg_pack(e, &fo, &f1, &n1, &err)) abort();
    Twn__Envelope *e2;
    if (twn_msg_unpack(f1, n1, &fo, &e2, &err)) abort();
    if (twn_msg_pack(e2, &fo, &f2, &n2, &err)) abort();
    if (n1 != n2 || memcmp(f1, f2, n1)) abort();
    twn_free(f1);
    twn_free(f2);
    twn_msg_free(e2);
    twn_msg_free(e);
    twn_free(frame);
    return 0;
}
