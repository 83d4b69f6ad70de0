/* wal.c — write-ahead log: segment format, recovery scan, group commit (see wal.h).
 *
 * Two locks: `mu` guards the pending buffer and the sequence counter (held for microseconds by
 * appends); `io_mu` guards the segment file and is held across write + fsync.  A commit takes
 * io_mu, swaps the pending buffer out under mu, and then writes and fsyncs without mu, so
 * producers keep appending into a fresh buffer while the disk works: that is the group commit.
 * Lock order is always io_mu before mu.  With defer_writes an append never takes io_mu (until
 * TWN_WAL_DEFER_MAX is pending), so a committer thread holding it across the fsync never stalls
 * the appender.  With on_durable, written buffers are kept (ub) until a commit's fsync covers
 * them, then read back record by record for the hook and recycled. */
#include "index/wal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include "util/crc32c.h"
#include "util/clock.h"
#include "util/fileio.h"
#include "util/mem.h"

static const unsigned char SEG_MAGIC[8] = {'T', 'W', 'N', 'W', 'A', 'L', 0, 1};
static const unsigned char BLK_MAGIC[4] = {'T', 'W', 'B', 'K'};
#define WAL_VERSION 1
#define REC_PUT     1
#define FLAG_ZSTD   1u

// ------------------------------------------------------------------------------------------------
// Little-endian helpers

static uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t rd64(const unsigned char *p) {
    return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
}
static void wr32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void wr64(unsigned char *p, uint64_t v) {
    wr32(p, (uint32_t)v);
    wr32(p + 4, (uint32_t)(v >> 32));
}

void twn_wal_encode_header(unsigned char hdr[TWN_WAL_HEADER], uint32_t dim, uint64_t first_seq) {
    memset(hdr, 0, TWN_WAL_HEADER);
    memcpy(hdr, SEG_MAGIC, 8);
    wr32(hdr + 8, WAL_VERSION);
    wr32(hdr + 12, dim);
    wr64(hdr + 16, first_seq);
    wr32(hdr + 28, twn_crc32c(0, hdr, 28));
}

// ------------------------------------------------------------------------------------------------
// Scanning (recovery and fuzzing)

/* snprintf into a reason buffer; truncation is fine (vsnprintf keeps gcc's truncation check
 * quiet, which cannot know these messages are short in practice). */
__attribute__((format(printf, 3, 4))) static void why_set(char *why, size_t cap, const char *fmt,
                                                          ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, cap, fmt, ap);
    va_end(ap);
}

typedef struct {
    uint32_t flags, stored, raw, nrec;
    uint64_t first_seq;
} blk_hdr;

/* Header sanity + CRC of the block at off; fills *h.  Returns 0 or -1 with reason. */
static int check_block_frame(const unsigned char *d, size_t n, size_t off, blk_hdr *h, char *why,
                             size_t whycap) {
    if (n - off < TWN_WAL_BLOCK_HEADER) {
        why_set(why, whycap, "block header at offset %zu is cut short (%zu of %d bytes)", off,
                n - off, TWN_WAL_BLOCK_HEADER);
        return -1;
    }
    const unsigned char *p = d + off;
    if (memcmp(p, BLK_MAGIC, 4) != 0) {
        why_set(why, whycap, "no block magic at offset %zu", off);
        return -1;
    }
    h->flags = rd32(p + 4);
    h->stored = rd32(p + 8);
    h->raw = rd32(p + 12);
    h->first_seq = rd64(p + 16);
    h->nrec = rd32(p + 24);
    if (h->flags & ~FLAG_ZSTD || h->stored > TWN_WAL_MAX_BLOCK || h->raw > TWN_WAL_MAX_BLOCK ||
        h->nrec == 0 || h->raw == 0) {
        why_set(why, whycap,
                "block header at offset %zu is invalid (flags %u, stored %u, raw %u, records %u)",
                off, h->flags, h->stored, h->raw, h->nrec);
        return -1;
    }
    if (n - off - TWN_WAL_BLOCK_HEADER < h->stored) {
        why_set(why, whycap, "block at offset %zu needs %u payload bytes, only %zu remain", off,
                h->stored, n - off - TWN_WAL_BLOCK_HEADER);
        return -1;
    }
    uint32_t crc = twn_crc32c(0, p, 28);
    crc = twn_crc32c(crc, p + TWN_WAL_BLOCK_HEADER, h->stored);
    if (crc != rd32(p + 28)) {
        why_set(why, whycap, "block at offset %zu fails its CRC (stored %08x, computed %08x)", off,
                rd32(p + 28), crc);
        return -1;
    }
    return 0;
}

/* Parses record i of a validated raw payload starting at *pos. */
static int parse_record(const unsigned char *raw, size_t rawn, size_t *pos, uint32_t dim,
                        twn_wal_rec *r, float *vecbuf, char *why, size_t whycap) {
    size_t p = *pos;
    if (rawn - p < TWN_WAL_REC_HEADER) {
        why_set(why, whycap, "record header cut short (%zu of %d bytes)", rawn - p,
                TWN_WAL_REC_HEADER);
        return -1;
    }
    const unsigned char *h = raw + p;
    uint32_t id_len = (uint32_t)h[2] | (uint32_t)h[3] << 8, rdim = rd32(h + 12);
    if (h[0] != REC_PUT) {
        why_set(why, whycap, "record type %u, expected %d (put)", h[0], REC_PUT);
        return -1;
    }
    if (rdim != dim) {
        why_set(why, whycap, "record dim %u, expected %u", rdim, dim);
        return -1;
    }
    if (id_len == 0 || id_len > TWN_ITEM_ID_MAX) {
        why_set(why, whycap, "record id length %u, expected 1..%d", id_len, TWN_ITEM_ID_MAX);
        return -1;
    }
    size_t need = TWN_WAL_REC_HEADER + (size_t)id_len + 4 * (size_t)dim;
    if (rawn - p < need) {
        why_set(why, whycap, "record needs %zu bytes, %zu remain", need, rawn - p);
        return -1;
    }
    memset(r, 0, sizeof *r);
    r->item.route = h[1];
    r->item.think_tokens = rd32(h + 4);
    uint32_t pt = rd32(h + 8);
    memcpy(&r->item.p_think, &pt, 4);
    r->faiss_id = (int64_t)rd64(h + 16);
    r->item.id = (const char *)h + TWN_WAL_REC_HEADER;
    r->item.id_len = id_len;
    memcpy(vecbuf, h + TWN_WAL_REC_HEADER + id_len, 4 * (size_t)dim); /* payload is unaligned */
    r->item.vec = vecbuf;
    twn_err e;
    if (twn_item_check(&r->item, (int)dim, &e) != 0) {
        why_set(why, whycap, "%s", e.msg);
        return -1;
    }
    *pos = p + need;
    return 0;
}

typedef struct {
    unsigned char *buf; /* decompression buffer */
    size_t cap;
    float *vec;
} scan_scratch;

/* Full validation of the block at off (frame, sequence, payload, every record).  On success
 * raw and rawn point at the decoded payload. */
static int check_block(const unsigned char *d, size_t n, size_t off, uint32_t dim,
                       uint64_t want_seq, blk_hdr *h, scan_scratch *s, const unsigned char **raw,
                       size_t *rawn, char *why, size_t whycap) {
    if (check_block_frame(d, n, off, h, why, whycap)) return -1;
    if (h->first_seq != want_seq) {
        why_set(why, whycap, "block at offset %zu starts at seq %" PRIu64 ", expected %" PRIu64,
                off, h->first_seq, want_seq);
        return -1;
    }
    const unsigned char *payload = d + off + TWN_WAL_BLOCK_HEADER;
    if (h->flags & FLAG_ZSTD) {
        unsigned long long fcs = ZSTD_getFrameContentSize(payload, h->stored);
        if (fcs != h->raw) {
            why_set(why, whycap, "block at offset %zu: zstd frame holds %lld bytes, header says %u",
                    off, fcs >= ZSTD_CONTENTSIZE_ERROR ? -1LL : (long long)fcs, h->raw);
            return -1;
        }
        if (s->cap < h->raw) {
            twn_free(s->buf);
            s->buf = twn_try_alloc(h->raw);
            s->cap = s->buf ? h->raw : 0;
            if (!s->buf) {
                why_set(why, whycap, "block at offset %zu: cannot allocate %u bytes", off, h->raw);
                return -1;
            }
        }
        size_t got = ZSTD_decompress(s->buf, h->raw, payload, h->stored);
        if (ZSTD_isError(got) || got != h->raw) {
            why_set(why, whycap, "block at offset %zu: zstd: %s", off,
                    ZSTD_isError(got) ? ZSTD_getErrorName(got) : "short frame");
            return -1;
        }
        *raw = s->buf;
    } else {
        if (h->stored != h->raw) {
            why_set(why, whycap, "block at offset %zu: uncompressed, but stored %u != raw %u", off,
                    h->stored, h->raw);
            return -1;
        }
        *raw = payload;
    }
    *rawn = h->raw;
    if ((uint64_t)h->nrec * (TWN_WAL_REC_HEADER + 1 + 4 * (uint64_t)dim) > h->raw) {
        why_set(why, whycap, "block at offset %zu: %u records cannot fit in %u bytes", off, h->nrec,
                h->raw);
        return -1;
    }
    size_t pos = 0;
    twn_wal_rec r;
    char rwhy[160];
    for (uint32_t i = 0; i < h->nrec; i++) {
        if (parse_record(*raw, *rawn, &pos, dim, &r, s->vec, rwhy, sizeof rwhy)) {
            why_set(why, whycap, "block at offset %zu, record %u (seq %" PRIu64 "): %s", off, i,
                    h->first_seq + i, rwhy);
            return -1;
        }
    }
    if (pos != *rawn) {
        why_set(why, whycap, "block at offset %zu: %zu bytes left after its %u records", off,
                *rawn - pos, h->nrec);
        return -1;
    }
    return 0;
}

/* First offset >= from holding a block with a valid frame and CRC, or 0 when there is none. */
static size_t find_valid_block(const unsigned char *d, size_t n, size_t from) {
    for (size_t p = from; p + TWN_WAL_BLOCK_HEADER <= n; p++) {
        const unsigned char *m = memchr(d + p, 'T', n - p);
        if (!m) return 0;
        p = (size_t)(m - d);
        if (p + TWN_WAL_BLOCK_HEADER > n) return 0;
        if (memcmp(d + p, BLK_MAGIC, 4) != 0) continue;
        blk_hdr h;
        char why[8];
        if (check_block_frame(d, n, p, &h, why, sizeof why) == 0) return p;
    }
    return 0;
}

int twn_wal_scan_segment(const void *data, size_t n, uint32_t dim, twn_wal_apply_fn fn, void *ctx,
                         twn_wal_scan *res, twn_err *err) {
    const unsigned char *d = data;
    memset(res, 0, sizeof *res);
    if (n < TWN_WAL_HEADER) {
        res->status = TWN_WAL_SCAN_BAD_HEADER;
        why_set(res->reason, sizeof res->reason,
                "segment is %zu bytes, shorter than its %d-byte header", n, TWN_WAL_HEADER);
        return 0;
    }
    uint32_t hdim = rd32(d + 12);
    uint64_t first = rd64(d + 16);
    if (memcmp(d, SEG_MAGIC, 8) != 0 || rd32(d + 8) != WAL_VERSION ||
        rd32(d + 28) != twn_crc32c(0, d, 28) || hdim == 0 || hdim > TWN_WAL_MAX_DIM || first == 0) {
        res->status = TWN_WAL_SCAN_BAD_HEADER;
        why_set(res->reason, sizeof res->reason,
                "segment header is not a valid twn WAL v%d header (bad magic, version, CRC, "
                "dim %u or first seq %" PRIu64 ")",
                WAL_VERSION, hdim, first);
        return 0;
    }
    res->dim = hdim;
    res->first_seq = res->next_seq = first;
    if (dim && hdim != dim) {
        res->status = TWN_WAL_SCAN_WRONG_DIM;
        why_set(res->reason, sizeof res->reason, "segment holds dim %u vectors, expected %u", hdim,
                dim);
        return 0;
    }
    scan_scratch s = {0};
    s.vec = twn_malloc(4 * (size_t)hdim);
    size_t off = TWN_WAL_HEADER;
    int rc = 0;
    while (off < n) {
        blk_hdr h;
        const unsigned char *raw;
        size_t rawn;
        if (check_block(d, n, off, hdim, res->next_seq, &h, &s, &raw, &rawn, res->reason,
                        sizeof res->reason)) {
            res->bad_offset = off;
            size_t next = find_valid_block(d, n, off + 1);
            res->status = next ? TWN_WAL_SCAN_CORRUPT : TWN_WAL_SCAN_TORN;
            res->resume_offset = next;
            break;
        }
        if (fn) {
            size_t pos = 0;
            twn_wal_rec r;
            char why[8];
            for (uint32_t i = 0; i < h.nrec; i++) {
                parse_record(raw, rawn, &pos, hdim, &r, s.vec, why, sizeof why); /* validated */
                r.seq = h.first_seq + i;
                if (fn(ctx, &r, err) != 0) {
                    rc = -1;
                    break;
                }
            }
            if (rc) break;
        }
        off += TWN_WAL_BLOCK_HEADER + h.stored;
        res->next_seq += h.nrec;
        res->records += h.nrec;
        res->blocks++;
    }
    res->good_end = off;
    if (res->status == TWN_WAL_SCAN_CLEAN) res->bad_offset = off;
    twn_free(s.buf);
    twn_free(s.vec);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// The log

struct twn_wal {
    char *dir;
    twn_wal_opts o;
    pthread_mutex_t mu, io_mu;

    /* guarded by mu */
    unsigned char *pend, *spare; /* spare: an emptied buffer kept for reuse (no page faults) */
    size_t pend_n, pend_cap, spare_cap;
    uint64_t pend_first; /* seq of the first pending record */
    uint32_t pend_count;
    uint64_t next_seq;
    size_t pend_max; /* pending bytes that make an append write (block_bytes, or deferred) */
    int failed;
    char fail_msg[TWN_ERR_MAX];

    /* guarded by io_mu */
    int fd;            /* active segment, -1 when none is open */
    uint64_t seg_next; /* seq the active segment's next block must start with */
    uint64_t seg_size; /* bytes in the active segment */
    int unsynced;      /* active segment written since its last fsync */
    int rotate_next;
    uint64_t *segs; /* first seq of each segment file, ascending */
    size_t nsegs, segcap;
    uint64_t written_seq;
    ZSTD_CCtx *cctx;
    unsigned char *zbuf;
    size_t zcap;
    uint32_t raw_streak; /* blocks left to store raw after one that zstd could not shrink */
    /* on_durable: buffers written but not yet fsynced, told once a commit has synced them */
    struct unsynced_buf {
        unsigned char *buf;
        size_t n, cap;
        uint64_t first;
        uint32_t count;
    } * ub;
    size_t nub, ubcap;
    float *dvec; /* a durable record's vector, aligned */
    twn_wal_stats st;

    uint64_t durable; /* atomic */
};

static char *seg_path(const twn_wal *w, uint64_t first) {
    char name[40];
    snprintf(name, sizeof name, "%020" PRIu64 ".wal", first);
    return twn_path_join(w->dir, name);
}

static int fsync_dir(const char *dir, twn_err *err) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return twn_err_errno(err, "cannot open directory %s", dir);
    int rc = fsync(fd);
    close(fd);
    return rc ? twn_err_errno(err, "cannot fsync directory %s", dir) : 0;
}

static int write_all(int fd, const void *buf, size_t n, uint64_t off) {
    const char *p = buf;
    while (n) {
        ssize_t k = pwrite(fd, p, n, (off_t)off);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return -1;
        p += k;
        n -= (size_t)k;
        off += (uint64_t)k;
    }
    return 0;
}

/* Puts the log into its failed state (sticky) with err's message. */
static int set_failed(twn_wal *w, twn_err *err) {
    pthread_mutex_lock(&w->mu);
    if (!w->failed) {
        w->failed = 1;
        snprintf(w->fail_msg, sizeof w->fail_msg, "%s", err ? err->msg : "WAL I/O error");
    }
    pthread_mutex_unlock(&w->mu);
    return -1;
}

static int sync_active(twn_wal *w, twn_err *err) {
    if (w->fd < 0 || !w->unsynced) return 0;
    double t0 = twn_now();
    if (fdatasync(w->fd) != 0) {
        char *p = seg_path(w, w->segs[w->nsegs - 1]);
        twn_err_errno(err, "cannot fsync WAL segment %s", p);
        twn_free(p);
        return -1;
    }
    double dt = twn_now() - t0;
    w->st.fsyncs++;
    w->st.fsync_seconds += dt;
    if (dt > w->st.fsync_max_seconds) w->st.fsync_max_seconds = dt;
    w->unsynced = 0;
    return 0;
}

static int close_active(twn_wal *w, twn_err *err) {
    if (w->fd < 0) return 0;
    int rc = sync_active(w, err);
    close(w->fd);
    w->fd = -1;
    return rc;
}

static int new_segment(twn_wal *w, uint64_t first, twn_err *err) {
    if (close_active(w, err)) return -1;
    char *path = seg_path(w, first);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        twn_err_errno(err, "cannot create WAL segment %s", path);
        twn_free(path);
        return -1;
    }
    unsigned char hdr[TWN_WAL_HEADER];
    twn_wal_encode_header(hdr, w->o.dim, first);
    if (write_all(fd, hdr, sizeof hdr, 0) || fdatasync(fd)) {
        twn_err_errno(err, "cannot write WAL segment header %s", path);
        close(fd);
        twn_free(path);
        return -1;
    }
    twn_free(path);
    if (fsync_dir(w->dir, err)) {
        close(fd);
        return -1;
    }
    w->fd = fd;
    w->seg_size = TWN_WAL_HEADER;
    w->seg_next = first;
    w->unsynced = 0;
    w->rotate_next = 0;
    if (w->nsegs == w->segcap) {
        w->segcap = w->segcap ? 2 * w->segcap : 16;
        w->segs = twn_realloc(w->segs, w->segcap * sizeof *w->segs);
    }
    w->segs[w->nsegs++] = first;
    w->st.segments = (int)w->nsegs;
    return 0;
}

/* Writes buf (count records from first) as one block; io_mu held. */
static int write_block(twn_wal *w, const unsigned char *buf, size_t n, uint64_t first,
                       uint32_t count, twn_err *err) {
    if (w->fd < 0 || w->rotate_next || w->seg_size >= w->o.segment_bytes || w->seg_next != first)
        if (new_segment(w, first, err)) return -1;
    size_t bound = ZSTD_compressBound(n);
    if (w->zcap < TWN_WAL_BLOCK_HEADER + bound) {
        twn_free(w->zbuf);
        w->zcap = TWN_WAL_BLOCK_HEADER + bound;
        w->zbuf = twn_malloc(w->zcap);
    }
    unsigned char *out = w->zbuf;
    /* float32 vectors are close to random bytes: zstd saves ~7% of them for ~20% of the shard's
     * CPU (bench_index, D = 2048).  After a block it cannot shrink by 1/8, the next 63 blocks
     * are stored raw without trying; then it tries again (ids and metadata still compress). */
    size_t stored = n;
    uint32_t flags = 0;
    if (w->raw_streak) {
        w->raw_streak--;
    } else {
        stored =
            ZSTD_compressCCtx(w->cctx, out + TWN_WAL_BLOCK_HEADER, bound, buf, n, w->o.zstd_level);
        flags = FLAG_ZSTD;
        if (ZSTD_isError(stored) || stored >= n - n / 8) w->raw_streak = 63;
        if (ZSTD_isError(stored) || stored >= n) { /* incompressible: store raw */
            stored = n;
            flags = 0;
        }
    }
    const unsigned char *payload = flags ? out + TWN_WAL_BLOCK_HEADER : buf;
    memcpy(out, BLK_MAGIC, 4);
    wr32(out + 4, flags);
    wr32(out + 8, (uint32_t)stored);
    wr32(out + 12, (uint32_t)n);
    wr64(out + 16, first);
    wr32(out + 24, count);
    uint32_t crc = twn_crc32c(0, out, 28);
    wr32(out + 28, twn_crc32c(crc, payload, stored));
    size_t total = TWN_WAL_BLOCK_HEADER + stored;
    /* A raw payload is written from the record buffer itself (no copy into zbuf). */
    if ((flags && write_all(w->fd, out, total, w->seg_size)) ||
        (!flags && (write_all(w->fd, out, TWN_WAL_BLOCK_HEADER, w->seg_size) ||
                    write_all(w->fd, buf, n, w->seg_size + TWN_WAL_BLOCK_HEADER)))) {
        char *p = seg_path(w, w->segs[w->nsegs - 1]);
        twn_err_errno(err, "cannot write %zu bytes to WAL segment %s", total, p);
        twn_free(p);
        return -1;
    }
    w->seg_size += total;
    w->seg_next = first + count;
    w->written_seq = first + count - 1;
    w->unsynced = 1;
    w->st.blocks++;
    w->st.raw_bytes += n;
    w->st.written_bytes += total;
    return 0;
}

/* Moves the pending buffer out and writes it as a block; io_mu held. */
static int flush_pending(twn_wal *w, twn_err *err) {
    pthread_mutex_lock(&w->mu);
    if (w->failed) {
        int rc = twn_err_set(err, "%s", w->fail_msg);
        pthread_mutex_unlock(&w->mu);
        return rc;
    }
    unsigned char *buf = w->pend;
    size_t n = w->pend_n, cap = w->pend_cap;
    uint64_t first = w->pend_first, first0 = first;
    uint32_t count = w->pend_count, count0 = count;
    w->pend = NULL;
    w->pend_n = w->pend_cap = 0;
    w->pend_count = 0;
    w->pend_first = w->next_seq;
    pthread_mutex_unlock(&w->mu);
    int rc = 0;
    /* Blocks of about block_bytes (each closed by the record that reaches it, the rule an
     * inline-writing append follows): a deferred commit may have gathered many of them. */
    size_t start = 0, pos = 0, rec = TWN_WAL_REC_HEADER + 4 * (size_t)w->o.dim;
    uint32_t k = 0;
    while (!rc && pos < n) {
        pos += rec + ((size_t)buf[pos + 2] | (size_t)buf[pos + 3] << 8); /* + the id */
        k++;
        if (pos - start >= w->o.block_bytes || pos >= n) {
            rc = write_block(w, buf + start, pos - start, first, k, err);
            first += k;
            count -= k;
            start = pos;
            k = 0;
        }
    }
    if (!rc && count)
        rc = twn_err_set(err, "WAL %s: %u pending records not accounted for in %zu bytes", w->dir,
                         count, n);
    if (!rc && w->o.on_durable && n) { /* kept until a commit's fsync covers it */
        if (w->nub == w->ubcap) {
            w->ubcap = w->ubcap ? 2 * w->ubcap : 8;
            w->ub = twn_realloc(w->ub, w->ubcap * sizeof *w->ub);
        }
        w->ub[w->nub++] = (struct unsynced_buf){buf, n, cap, first0, count0};
        return 0;
    }
    pthread_mutex_lock(&w->mu);
    if (!w->spare && buf) {
        w->spare = buf;
        w->spare_cap = cap;
        buf = NULL;
    }
    pthread_mutex_unlock(&w->mu);
    twn_free(buf);
    return rc ? set_failed(w, err) : 0;
}

int twn_wal_append(twn_wal *w, int64_t faiss_id, const twn_index_item *it, uint64_t *seq,
                   twn_err *err) {
    if (twn_item_check(it, (int)w->o.dim, err)) return -1;
    return twn_wal_append_valid(w, faiss_id, it, seq, err);
}

int twn_wal_append_valid(twn_wal *w, int64_t faiss_id, const twn_index_item *it, uint64_t *seq,
                         twn_err *err) {
    size_t id_len = it->id_len ? it->id_len : strlen(it->id);
    size_t need = TWN_WAL_REC_HEADER + id_len + 4 * (size_t)w->o.dim;
    pthread_mutex_lock(&w->mu);
    if (w->failed) {
        int rc = twn_err_set(err, "%s", w->fail_msg);
        pthread_mutex_unlock(&w->mu);
        return rc;
    }
    if (!w->pend && w->spare) {
        w->pend = w->spare;
        w->pend_cap = w->spare_cap;
        w->spare = NULL;
        w->spare_cap = 0;
    }
    if (w->pend_n + need > w->pend_cap) {
        size_t cap = w->pend_cap ? w->pend_cap : 4096;
        while (cap < w->pend_n + need) cap *= 2;
        w->pend = twn_realloc(w->pend, cap);
        w->pend_cap = cap;
    }
    unsigned char *h = w->pend + w->pend_n;
    h[0] = REC_PUT;
    h[1] = it->route;
    h[2] = (unsigned char)id_len;
    h[3] = (unsigned char)(id_len >> 8);
    wr32(h + 4, it->think_tokens);
    uint32_t pt;
    memcpy(&pt, &it->p_think, 4);
    wr32(h + 8, pt);
    wr32(h + 12, w->o.dim);
    wr64(h + 16, (uint64_t)faiss_id);
    memcpy(h + TWN_WAL_REC_HEADER, it->id, id_len);
    memcpy(h + TWN_WAL_REC_HEADER + id_len, it->vec, 4 * (size_t)w->o.dim);
    w->pend_n += need;
    if (w->pend_count++ == 0) w->pend_first = w->next_seq;
    uint64_t s = w->next_seq++;
    w->st.appended++;
    int full = w->pend_n >= w->pend_max;
    pthread_mutex_unlock(&w->mu);
    if (seq) *seq = s;
    if (full) {
        pthread_mutex_lock(&w->io_mu);
        int rc = flush_pending(w, err);
        pthread_mutex_unlock(&w->io_mu);
        if (rc) return -1;
    }
    return 0;
}

/* Tells on_durable about every record of the buffers the last fsync covered, then recycles
 * them; io_mu held. */
static void tell_durable(twn_wal *w) {
    for (size_t b = 0; b < w->nub; b++) {
        struct unsynced_buf *u = &w->ub[b];
        size_t pos = 0;
        for (uint32_t i = 0; i < u->count && pos < u->n; i++) {
            const unsigned char *h = u->buf + pos;
            size_t id_len = (size_t)h[2] | (size_t)h[3] << 8;
            twn_wal_rec r = {.seq = u->first + i, .faiss_id = (int64_t)rd64(h + 16)};
            r.item.id = (const char *)h + TWN_WAL_REC_HEADER;
            r.item.id_len = id_len;
            r.item.route = h[1];
            r.item.think_tokens = rd32(h + 4);
            uint32_t pt = rd32(h + 8);
            memcpy(&r.item.p_think, &pt, 4);
            memcpy(w->dvec, h + TWN_WAL_REC_HEADER + id_len, 4 * (size_t)w->o.dim); /* unaligned */
            r.item.vec = w->dvec;
            w->o.on_durable(w->o.on_durable_ctx, &r);
            pos += TWN_WAL_REC_HEADER + id_len + 4 * (size_t)w->o.dim;
        }
        pthread_mutex_lock(&w->mu);
        if (!w->spare) {
            w->spare = u->buf;
            w->spare_cap = u->cap;
            u->buf = NULL;
        }
        pthread_mutex_unlock(&w->mu);
        twn_free(u->buf);
    }
    w->nub = 0;
}

int twn_wal_commit(twn_wal *w, uint64_t *durable, twn_err *err) {
    pthread_mutex_lock(&w->io_mu);
    int rc = flush_pending(w, err);
    if (!rc && sync_active(w, err)) rc = set_failed(w, err);
    if (!rc) {
        w->st.commits++;
        __atomic_store_n(&w->durable, w->written_seq, __ATOMIC_RELEASE);
        if (w->nub) tell_durable(w);
    }
    pthread_mutex_unlock(&w->io_mu);
    if (durable) *durable = twn_wal_durable_seq(w);
    return rc;
}

uint64_t twn_wal_durable_seq(twn_wal *w) {
    return __atomic_load_n(&w->durable, __ATOMIC_ACQUIRE);
}

uint64_t twn_wal_last_seq(twn_wal *w) {
    pthread_mutex_lock(&w->mu);
    uint64_t s = w->next_seq - 1;
    pthread_mutex_unlock(&w->mu);
    return s;
}

void twn_wal_get_stats(twn_wal *w, twn_wal_stats *st) {
    pthread_mutex_lock(&w->io_mu);
    pthread_mutex_lock(&w->mu);
    *st = w->st;
    st->last_seq = w->next_seq - 1;
    pthread_mutex_unlock(&w->mu);
    pthread_mutex_unlock(&w->io_mu);
    st->durable_seq = twn_wal_durable_seq(w);
}

int twn_wal_rotate(twn_wal *w, twn_err *err) {
    if (twn_wal_commit(w, NULL, err)) return -1;
    pthread_mutex_lock(&w->io_mu);
    int rc = close_active(w, err);
    w->rotate_next = 1;
    pthread_mutex_unlock(&w->io_mu);
    return rc;
}

int twn_wal_trim(twn_wal *w, uint64_t upto, twn_err *err) {
    pthread_mutex_lock(&w->io_mu);
    int rc = 0, removed = 0;
    size_t keep = 0;
    /* Segment i holds seqs [segs[i], segs[i+1]); the last one is (or will be) the active one. */
    while (keep + 1 < w->nsegs && w->segs[keep + 1] - 1 <= upto) keep++;
    for (size_t i = 0; i < keep; i++) {
        char *p = seg_path(w, w->segs[i]);
        if (unlink(p) != 0 && errno != ENOENT)
            rc = twn_err_errno(err, "cannot delete WAL segment %s", p);
        twn_free(p);
        removed++;
    }
    if (keep) {
        memmove(w->segs, w->segs + keep, (w->nsegs - keep) * sizeof *w->segs);
        w->nsegs -= keep;
        w->st.segments = (int)w->nsegs;
    }
    if (!rc && removed) rc = fsync_dir(w->dir, err);
    pthread_mutex_unlock(&w->io_mu);
    return rc;
}

static void wal_free(twn_wal *w) {
    if (!w) return;
    if (w->fd >= 0) close(w->fd);
    ZSTD_freeCCtx(w->cctx);
    pthread_mutex_destroy(&w->mu);
    pthread_mutex_destroy(&w->io_mu);
    twn_free(w->zbuf);
    for (size_t b = 0; b < w->nub; b++) twn_free(w->ub[b].buf);
    twn_free(w->ub);
    twn_free(w->dvec);
    twn_free(w->pend);
    twn_free(w->spare);
    twn_free(w->segs);
    twn_free(w->dir);
    twn_free(w);
}

int twn_wal_close(twn_wal *w, twn_err *err) {
    if (!w) return 0;
    int rc = twn_wal_commit(w, NULL, err);
    pthread_mutex_lock(&w->io_mu);
    if (close_active(w, rc ? NULL : err)) rc = -1;
    pthread_mutex_unlock(&w->io_mu);
    wal_free(w);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Open + recovery

typedef struct {
    twn_wal_apply_fn fn;
    void *ctx;
    uint64_t after;
    uint64_t replayed;
    const twn_wal_opts *o; /* on_durable */
} replay_ctx;

static int replay_filter(void *ctx, const twn_wal_rec *r, twn_err *err) {
    replay_ctx *c = ctx;
    if (r->seq <= c->after) return 0;
    c->replayed++;
    if (c->fn && c->fn(c->ctx, r, err)) return -1;
    if (c->o->on_durable) c->o->on_durable(c->o->on_durable_ctx, r);
    return 0;
}

/* What survived a crash may sit only in the page cache: on_durable hears of replayed records,
 * so their segment is made durable before it is read. */
static int fsync_file(const char *path, twn_err *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return twn_err_errno(err, "cannot open WAL segment %s", path);
    int rc = fsync(fd);
    close(fd);
    return rc ? twn_err_errno(err, "cannot fsync WAL segment %s", path) : 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Lists "<20 digits>.wal" files of dir into w->segs (sorted). */
static int list_segments(twn_wal *w, twn_err *err) {
    DIR *d = opendir(w->dir);
    if (!d) return twn_err_errno(err, "cannot open WAL directory %s", w->dir);
    struct dirent *e;
    while ((e = readdir(d))) {
        const char *s = e->d_name;
        if (strlen(s) != 24 || strcmp(s + 20, ".wal") != 0) continue;
        uint64_t v = 0;
        int ok = 1;
        for (int i = 0; i < 20; i++) {
            if (s[i] < '0' || s[i] > '9')
                ok = 0;
            else
                v = v * 10 + (uint64_t)(s[i] - '0');
        }
        if (!ok) continue;
        if (w->nsegs == w->segcap) {
            w->segcap = w->segcap ? 2 * w->segcap : 16;
            w->segs = twn_realloc(w->segs, w->segcap * sizeof *w->segs);
        }
        w->segs[w->nsegs++] = v;
    }
    closedir(d);
    if (w->nsegs > 1) qsort(w->segs, w->nsegs, sizeof *w->segs, cmp_u64);
    return 0;
}

static int truncate_file(const char *path, uint64_t size, twn_err *err) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return twn_err_errno(err, "cannot open %s to truncate it", path);
    if (ftruncate(fd, (off_t)size) != 0 || fsync(fd) != 0) {
        close(fd);
        return twn_err_errno(err, "cannot truncate %s to %" PRIu64 " bytes", path, size);
    }
    close(fd);
    return 0;
}

static int file_size(const char *path, uint64_t *size) {
    struct stat st;
    if (stat(path, &st) != 0) return -1;
    *size = (uint64_t)st.st_size;
    return 0;
}

/* Drops segments [from, nsegs) (repair / torn header); adds their sizes to *dropped. */
static int drop_segments(twn_wal *w, size_t from, uint64_t *dropped, twn_err *err) {
    for (size_t i = from; i < w->nsegs; i++) {
        char *p = seg_path(w, w->segs[i]);
        uint64_t sz = 0;
        if (file_size(p, &sz) == 0) *dropped += sz;
        if (unlink(p) != 0) {
            twn_err_errno(err, "cannot delete WAL segment %s", p);
            twn_free(p);
            return -1;
        }
        twn_free(p);
    }
    w->nsegs = from;
    return fsync_dir(w->dir, err);
}

static int recover(twn_wal *w, twn_wal_apply_fn fn, void *ctx, twn_wal_replay_info *info,
                   twn_err *err) {
    if (list_segments(w, err)) return -1;
    replay_ctx rc = {fn, ctx, w->o.after_seq, 0, &w->o};
    uint64_t expect = 0;    /* next seq the following segment must start with */
    uint64_t log_first = 0; /* first seq of the oldest segment */
    size_t i;
    for (i = 0; i < w->nsegs; i++) {
        char *path = seg_path(w, w->segs[i]);
        char *data = NULL;
        size_t n = 0;
        if ((w->o.on_durable && fsync_file(path, err)) ||
            twn_read_file(path, SIZE_MAX / 2, &data, &n, err)) {
            twn_free(path);
            return -1;
        }
        twn_wal_scan s;
        int last = i + 1 == w->nsegs;
        int r = twn_wal_scan_segment(data, n, w->o.dim, replay_filter, &rc, &s, err);
        twn_free(data);
        if (r) {
            twn_err_wrap(err, "replaying %s", path);
            twn_free(path);
            return -1;
        }
        if (s.status == TWN_WAL_SCAN_WRONG_DIM) {
            twn_err_set(err, "%s: %s (the shard was created with another dimension?)", path,
                        s.reason);
            twn_free(path);
            return -1;
        }
        if (s.status != TWN_WAL_SCAN_BAD_HEADER && s.first_seq != w->segs[i]) {
            twn_err_set(err,
                        "%s: header says the segment starts at seq %" PRIu64
                        ", its name says %" PRIu64,
                        path, s.first_seq, w->segs[i]);
            twn_free(path);
            return -1;
        }
        if (s.status != TWN_WAL_SCAN_BAD_HEADER) {
            /* Every seq after the snapshot must be present exactly once. */
            uint64_t need = i == 0 || expect < w->o.after_seq + 1 ? w->o.after_seq + 1 : expect;
            if (i > 0 && s.first_seq < expect) {
                twn_err_set(err,
                            "%s: segment starts at seq %" PRIu64 " but the previous one already "
                            "holds seqs up to %" PRIu64 " (duplicated segment?)",
                            path, s.first_seq, expect - 1);
                twn_free(path);
                return -1;
            }
            if (s.first_seq > need) {
                twn_err_set(err,
                            "%s: segment starts at seq %" PRIu64 " but the snapshot and earlier "
                            "segments cover only up to seq %" PRIu64 ": records %" PRIu64
                            "..%" PRIu64 " are missing",
                            path, s.first_seq, need - 1, need, s.first_seq - 1);
                twn_free(path);
                return -1;
            }
            if (i == 0) log_first = s.first_seq;
            expect = s.next_seq;
        }
        if (s.status == TWN_WAL_SCAN_CLEAN) {
            twn_free(path);
            continue;
        }
        /* Damage. */
        uint64_t size = 0;
        file_size(path, &size);
        int tail = last && (s.status == TWN_WAL_SCAN_TORN || s.status == TWN_WAL_SCAN_BAD_HEADER);
        if (!tail && !w->o.repair) {
            if (s.status == TWN_WAL_SCAN_CORRUPT)
                twn_err_set(
                    err,
                    "%s: %s, and a valid block follows at offset %zu: records from seq "
                    "%" PRIu64 " on are damaged in the middle of the log (acknowledged data "
                    "may be lost); reopen with repair to drop everything from offset %zu on",
                    path, s.reason, s.resume_offset, s.next_seq, s.bad_offset);
            else
                twn_err_set(err,
                            "%s: %s, in a segment that is not the newest (%zu more follow): the "
                            "log is damaged in the middle; reopen with repair to drop it and "
                            "everything after it",
                            path, s.reason, w->nsegs - i - 1);
            twn_free(path);
            return -1;
        }
        why_set(info->dropped_reason, sizeof info->dropped_reason, "%s: %s", path, s.reason);
        if (s.status == TWN_WAL_SCAN_BAD_HEADER) {
            twn_free(path);
            if (drop_segments(w, i, &info->dropped_bytes, err)) return -1;
        } else {
            info->dropped_bytes += size - s.good_end;
            if (truncate_file(path, s.good_end, err)) {
                twn_free(path);
                return -1;
            }
            twn_free(path);
            if (drop_segments(w, i + 1, &info->dropped_bytes, err)) return -1;
        }
        break;
    }
    info->replayed = rc.replayed;
    info->segments = (int)w->nsegs;
    info->last_seq = expect ? expect - 1 : 0;
    info->first_seq = log_first && info->last_seq >= log_first ? log_first : 0;
    w->next_seq = expect > w->o.after_seq + 1 ? expect : w->o.after_seq + 1;
    w->written_seq = w->next_seq - 1;
    w->durable = w->next_seq - 1;
    /* Continue appending to the newest segment when it ends where the next block starts. */
    if (w->nsegs && expect == w->next_seq) {
        char *path = seg_path(w, w->segs[w->nsegs - 1]);
        uint64_t size = 0;
        w->fd = open(path, O_WRONLY | O_CLOEXEC);
        if (w->fd < 0 || file_size(path, &size)) {
            twn_err_errno(err, "cannot open WAL segment %s for appending", path);
            twn_free(path);
            return -1;
        }
        twn_free(path);
        w->seg_size = size;
        w->seg_next = expect;
        /* What survived a crash may still sit only in the page cache: make it durable before
           reporting it as such. */
        w->unsynced = 1;
        if (sync_active(w, err)) return -1;
    }
    w->st.segments = (int)w->nsegs;
    return 0;
}

int twn_wal_open(const char *dir, const twn_wal_opts *opts, twn_wal_apply_fn fn, void *ctx,
                 twn_wal **out, twn_wal_replay_info *info, twn_err *err) {
    *out = NULL;
    twn_wal_replay_info local;
    if (!info) info = &local;
    memset(info, 0, sizeof *info);
    if (opts->dim == 0 || opts->dim > TWN_WAL_MAX_DIM)
        return twn_err_set(err, "WAL %s: dim %u, expected 1..%d", dir, opts->dim, TWN_WAL_MAX_DIM);
    if (opts->block_bytes > TWN_WAL_MAX_BLOCK / 2)
        return twn_err_set(err, "WAL %s: block_bytes %u, expected at most %u", dir,
                           opts->block_bytes, TWN_WAL_MAX_BLOCK / 2);
    if (twn_mkdirs(dir, err)) return -1;
    twn_wal *w = twn_calloc(1, sizeof *w);
    w->dir = twn_strdup(dir);
    w->o = *opts;
    if (!w->o.segment_bytes) w->o.segment_bytes = TWN_WAL_SEGMENT_BYTES;
    if (!w->o.block_bytes) w->o.block_bytes = TWN_WAL_BLOCK_BYTES;
    /* One record must always fit in a block: the writer flushes once a block passes block_bytes,
       so a block holds at most block_bytes + one record. */
    if (!w->o.zstd_level) w->o.zstd_level = 1;
    w->pend_max = w->o.block_bytes;
    if (w->o.defer_writes)
        w->pend_max = 2 * (size_t)w->o.block_bytes > TWN_WAL_DEFER_MAX
                          ? 2 * (size_t)w->o.block_bytes
                          : TWN_WAL_DEFER_MAX;
    w->fd = -1;
    pthread_mutex_init(&w->mu, NULL);
    pthread_mutex_init(&w->io_mu, NULL);
    w->cctx = ZSTD_createCCtx();
    if (w->o.on_durable) w->dvec = twn_malloc(4 * (size_t)w->o.dim);
    if (recover(w, fn, ctx, info, err)) {
        wal_free(w);
        return -1;
    }
    w->pend_first = w->next_seq;
    *out = w;
    return 0;
}
