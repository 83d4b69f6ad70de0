/* journal.c — the coordinator journal (see journal.h for the format and the durability rules). */
#include "coordinator/journal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/crc32c.h"
#include "util/fileio.h"
#include "util/mem.h"
#include "util/vec.h"

#define REC_HEADER 8 /* u32 len + u32 crc */

typedef struct bytes {
    uint8_t *v;
    size_t n, cap;
} bytes;

struct twn_journal {
    char *path;
    int fd;
    twn_journal_cfg cfg;
    bytes buf;
    uint64_t appended, durable, commits;
    uint64_t file_bytes; /* in the file (the buffer not included) */
    uint32_t epoch;      /* this run's (RESUME), written again by compaction */
    size_t buffered_records;
    double last_commit;
    int poisoned;
    twn_err poison;
};

void twn_journal_cfg_default(twn_journal_cfg *cfg) {
    cfg->group_commit_s = 0.005;
    cfg->group_commit_bytes = 1u << 20;
    cfg->fsync = 1;
}

const char *twn_stage_name(twn_stage s) {
    switch (s) {
    case TWN_STAGE_READ:
        return "read";
    case TWN_STAGE_GATE:
        return "gate";
    case TWN_STAGE_REASON:
        return "reason";
    case TWN_STAGE_INDEX:
        return "index";
    }
    return "?";
}

static const char *type_name(unsigned t) {
    static const char *names[] = {"?",           "JOB_START",   "RESUME",      "UNIT_DONE",
                                  "DEAD_LETTER", "HARD_ROUTED", "JOB_FINISHED"};
    return t < sizeof names / sizeof *names ? names[t] : "?";
}

// ------------------------------------------------------------------------------------------------
// ------------------------------------------------------------------------------------------------
// Encoding

static void b_reserve(bytes *b, size_t more) {
    if (b->n + more <= b->cap) return;
    size_t nc = b->cap ? b->cap : 4096;
    while (nc < b->n + more) nc *= 2;
    b->v = twn_realloc(b->v, nc);
    b->cap = nc;
}

static void put_u8(bytes *b, uint8_t x) {
    b_reserve(b, 1);
    b->v[b->n++] = x;
}

static void put_le(bytes *b, uint64_t x, int nbytes) {
    b_reserve(b, (size_t)nbytes);
    for (int i = 0; i < nbytes; i++) b->v[b->n++] = (uint8_t)(x >> (8 * i));
}

static void put_raw(bytes *b, const void *p, size_t n) {
    b_reserve(b, n);
    if (n) memcpy(b->v + b->n, p, n);
    b->n += n;
}

/* LEB128; a zigzag delta between two u32 needs at most 34 bits, so 5 bytes always do. */
static void put_varint(bytes *b, uint64_t x) {
    do {
        put_u8(b, (uint8_t)((x & 0x7f) | (x > 0x7f ? 0x80 : 0)));
        x >>= 7;
    } while (x);
}

static uint64_t get_le(const uint8_t *p, int nbytes) {
    uint64_t x = 0;
    for (int i = nbytes - 1; i >= 0; i--) x = x << 8 | p[i];
    return x;
}

/* Starts a record: reserves the 8-byte record header and writes the type.  Returns its offset. */
static size_t rec_begin(bytes *b, twn_jrec_type t) {
    size_t at = b->n;
    put_le(b, 0, 8);
    put_u8(b, (uint8_t)t);
    return at;
}

static void rec_end(bytes *b, size_t at) {
    uint32_t len = (uint32_t)(b->n - at - REC_HEADER);
    uint32_t crc = twn_crc32c(0, b->v + at + REC_HEADER, len);
    for (int i = 0; i < 4; i++) {
        b->v[at + i] = (uint8_t)(len >> (8 * i));
        b->v[at + 4 + i] = (uint8_t)(crc >> (8 * i));
    }
}

static void put_job_start(bytes *b, const twn_plan_fp *fp) {
    size_t at = rec_begin(b, TWN_JREC_JOB_START);
    size_t ns = strlen(fp->sources), nm = strlen(fp->model_hash);
    put_le(b, fp->unit_size, 8);
    put_le(b, ns, 4);
    put_raw(b, fp->sources, ns);
    put_le(b, nm, 4);
    put_raw(b, fp->model_hash, nm);
    rec_end(b, at);
}

// ------------------------------------------------------------------------------------------------
// Replay

typedef struct reader {
    const uint8_t *p;
    size_t n, at;
} reader;

static int rd(reader *r, size_t k, const uint8_t **out) {
    if (r->n - r->at < k) return -1;
    *out = r->p + r->at;
    r->at += k;
    return 0;
}

static int rd_le(reader *r, int k, uint64_t *x) {
    const uint8_t *p;
    if (rd(r, (size_t)k, &p) != 0) return -1;
    *x = get_le(p, k);
    return 0;
}

static int rd_varint(reader *r, uint64_t *x) {
    uint64_t v = 0;
    for (int k = 0; k < 5; k++) {
        const uint8_t *p;
        if (rd(r, 1, &p) != 0) return -1;
        v |= (uint64_t)(*p & 0x7f) << (7 * k);
        if (!(*p & 0x80)) {
            *x = v;
            return 0;
        }
    }
    return -1;
}

/* Shows a string for an error message on one line: quoted, control bytes escaped (the sources
 * are newline-separated), cut to 100 bytes with its full length. */
static void show(twn_str *s, const char *p, size_t n) {
    size_t m = n <= 100 ? n : 100;
    twn_str_puts(s, "\"");
    for (size_t i = 0; i < m; i++) {
        unsigned char ch = (unsigned char)p[i];
        if (ch == '\n')
            twn_str_puts(s, "\\n");
        else if (ch == '"' || ch == '\\')
            twn_str_printf(s, "\\%c", ch);
        else if (ch < 0x20 || ch == 0x7f)
            twn_str_printf(s, "\\x%02x", ch);
        else
            twn_str_printf(s, "%c", ch);
    }
    if (n > 100)
        twn_str_printf(s, "...\" (%zu bytes)", n);
    else
        twn_str_puts(s, "\"");
}

static int check_fp(const char *name, const twn_plan_fp *have, const twn_plan_fp *want,
                    twn_err *err) {
    twn_str s = {0};
    int bad = 0;
    if (strcmp(have->sources, want->sources) != 0) {
        twn_str_puts(&s, "sources: journal has ");
        show(&s, have->sources, strlen(have->sources));
        twn_str_puts(&s, ", this run has ");
        show(&s, want->sources, strlen(want->sources));
        bad++;
    }
    if (have->unit_size != want->unit_size) {
        twn_str_printf(&s, "%sunit size: journal has %" PRIu64 ", this run has %" PRIu64,
                       bad ? "; " : "", have->unit_size, want->unit_size);
        bad++;
    }
    if (strcmp(have->model_hash, want->model_hash) != 0) {
        twn_str_printf(&s, "%smodel manifest hash: journal has ", bad ? "; " : "");
        show(&s, have->model_hash, strlen(have->model_hash));
        twn_str_puts(&s, ", this run has ");
        show(&s, want->model_hash, strlen(want->model_hash));
        bad++;
    }
    if (!bad) return 0;
    twn_err_set(err,
                "%s: journal was written for a different plan (%s); restart with the original "
                "plan or use a new journal",
                name, s.v);
    twn_str_free(&s);
    return -1;
}

typedef struct scratch {
    char *s1, *s2;
    uint32_t *items;
    size_t cap_items;
} scratch;

/* Decodes one CRC-valid payload into r.  -1 with a message for a malformed body. */
static int decode(const char *name, uint64_t off, const uint8_t *p, size_t n, twn_jrec *rec,
                  scratch *sc, twn_err *err) {
    reader r = {p, n, 1};
    unsigned t = p[0];
    memset(rec, 0, sizeof *rec);
    rec->type = (twn_jrec_type)t;
    rec->offset = off;
    uint64_t a, b, c, d, e, f;
    const uint8_t *s;
    switch (t) {
    case TWN_JREC_JOB_START: {
        uint64_t us, ns, nm;
        const uint8_t *ps, *pm;
        if (rd_le(&r, 8, &us) || rd_le(&r, 4, &ns) || ns > TWN_JOURNAL_MAX_STRING ||
            rd(&r, ns, &ps) || rd_le(&r, 4, &nm) || nm > TWN_JOURNAL_MAX_STRING || rd(&r, nm, &pm))
            goto short_body;
        twn_free(sc->s1);
        twn_free(sc->s2);
        sc->s1 = twn_strndup((const char *)ps, ns);
        sc->s2 = twn_strndup((const char *)pm, nm);
        rec->fp = (twn_plan_fp){sc->s1, us, sc->s2};
        break;
    }
    case TWN_JREC_RESUME:
        if (rd_le(&r, 4, &a)) goto short_body;
        rec->epoch = (uint32_t)a;
        break;
    case TWN_JREC_UNIT_DONE:
        if (rd_le(&r, 8, &a) || rd_le(&r, 4, &b) || rd_le(&r, 4, &c) || rd_le(&r, 4, &d) ||
            rd_le(&r, 4, &e) || rd_le(&r, 8, &f))
            goto short_body;
        if (c + d + e != b)
            return twn_err_set(err,
                               "%s: UNIT_DONE record at offset %" PRIu64 " for unit %016" PRIx64
                               ": easy %" PRIu64 " + hard %" PRIu64 " + dead %" PRIu64
                               " != %" PRIu64 " items",
                               name, off, a, c, d, e, b);
        rec->unit = a;
        rec->counts = (twn_unit_counts){(uint32_t)b, (uint32_t)c, (uint32_t)d, (uint32_t)e, f};
        break;
    case TWN_JREC_DEAD_LETTER:
        if (rd_le(&r, 8, &a) || rd_le(&r, 4, &b) || rd_le(&r, 1, &c) || rd_le(&r, 2, &d) ||
            rd(&r, d, &s))
            goto short_body;
        if (c < 1 || c > TWN_STAGE_MAX)
            return twn_err_set(err,
                               "%s: DEAD_LETTER record at offset %" PRIu64 ": stage %" PRIu64
                               ", expected 1..%d",
                               name, off, c, TWN_STAGE_MAX);
        twn_free(sc->s1);
        sc->s1 = twn_strndup((const char *)s, d);
        rec->unit = a;
        rec->item = (uint32_t)b;
        rec->stage = (twn_stage)c;
        rec->reason = sc->s1;
        break;
    case TWN_JREC_HARD_ROUTED:
        if (rd_le(&r, 8, &a) || rd_le(&r, 4, &b) || b > TWN_JOURNAL_MAX_HARD) goto short_body;
        if (sc->cap_items < b) {
            sc->cap_items = b;
            sc->items = twn_realloc(sc->items, b * sizeof *sc->items);
        }
        for (uint64_t i = 0, prev = 0; i < b; i++) {
            uint64_t z, item;
            if (rd_varint(&r, &z)) goto short_body;
            item = prev + (uint64_t)((int64_t)(z >> 1) ^ -(int64_t)(z & 1));
            if (item > UINT32_MAX)
                return twn_err_set(err,
                                   "%s: HARD_ROUTED record at offset %" PRIu64 ": item %" PRIu64
                                   " decodes out of range",
                                   name, off, i);
            sc->items[i] = (uint32_t)item;
            prev = item;
        }
        rec->unit = a;
        rec->items = sc->items;
        rec->n_items = (size_t)b;
        break;
    case TWN_JREC_JOB_FINISHED:
        if (rd_le(&r, 8, &a) || rd_le(&r, 8, &b) || rd_le(&r, 8, &c) || rd_le(&r, 8, &d) ||
            rd_le(&r, 8, &e) || rd_le(&r, 8, &f))
            goto short_body;
        rec->job = (twn_job_counts){a, b, c, d, e, f};
        break;
    default:
        return twn_err_set(err,
                           "%s: record at offset %" PRIu64 " has unknown type %u (written by a "
                           "newer twn?)",
                           name, off, t);
    }
    if (r.at != n)
        return twn_err_set(err, "%s: %s record at offset %" PRIu64 " has %zu bytes, expected %zu",
                           name, type_name(t), off, n, r.at);
    return 0;
short_body:
    return twn_err_set(err, "%s: %s record at offset %" PRIu64 " is malformed (%zu bytes)", name,
                       type_name(t), off, n);
}

int twn_journal_replay_mem(const void *data, size_t n, const char *name, const twn_plan_fp *fp,
                           twn_jrec_fn fn, void *ctx, twn_journal_info *info, twn_err *err) {
    const uint8_t *p = data;
    twn_journal_info inf = {0};
    scratch sc = {0};
    int rc = -1;
    if (n < TWN_JOURNAL_HEADER) {
        twn_err_set(err, "%s: %zu bytes, shorter than the %d-byte journal header", name, n,
                    TWN_JOURNAL_HEADER);
        goto out;
    }
    if (memcmp(p, TWN_JOURNAL_MAGIC, TWN_JOURNAL_HEADER) != 0) {
        twn_err_set(err, "%s: not a twn journal (starts with %02x %02x %02x %02x, expected \"%s\")",
                    name, p[0], p[1], p[2], p[3], TWN_JOURNAL_MAGIC);
        goto out;
    }
    size_t at = TWN_JOURNAL_HEADER;
    inf.epoch = 1;
    uint32_t max_epoch = 1;
    while (at < n) {
        size_t left = n - at;
        if (left < REC_HEADER) {
            snprintf(inf.torn_reason, sizeof inf.torn_reason,
                     "record at offset %zu: %zu of its 8 header bytes", at, left);
            break;
        }
        uint32_t len = (uint32_t)get_le(p + at, 4), crc = (uint32_t)get_le(p + at + 4, 4);
        if (len == 0 || len > TWN_JOURNAL_MAX_RECORD) {
            snprintf(inf.torn_reason, sizeof inf.torn_reason,
                     "record at offset %zu: length %" PRIu32 " out of range 1..%u", at, len,
                     TWN_JOURNAL_MAX_RECORD);
            break;
        }
        if (left - REC_HEADER < len) {
            snprintf(inf.torn_reason, sizeof inf.torn_reason,
                     "record at offset %zu: %zu of its %" PRIu32 " bytes", at, left - REC_HEADER,
                     len);
            break;
        }
        const uint8_t *pl = p + at + REC_HEADER;
        if (twn_crc32c(0, pl, len) != crc) {
            snprintf(inf.torn_reason, sizeof inf.torn_reason, "record at offset %zu: CRC mismatch",
                     at);
            break;
        }
        twn_jrec rec;
        if (decode(name, at, pl, len, &rec, &sc, err) != 0) goto out;
        if ((inf.records == 0) != (rec.type == TWN_JREC_JOB_START)) {
            if (inf.records == 0)
                twn_err_set(err, "%s: first record (offset %zu) is %s, expected JOB_START", name,
                            at, type_name(rec.type));
            else
                twn_err_set(err, "%s: second JOB_START record at offset %zu", name, at);
            goto out;
        }
        if (rec.type == TWN_JREC_JOB_START && fp && check_fp(name, &rec.fp, fp, err) != 0) goto out;
        if (rec.type == TWN_JREC_RESUME && rec.epoch > max_epoch) max_epoch = rec.epoch;
        if (rec.type == TWN_JREC_JOB_FINISHED) inf.finished = 1;
        if (fn && fn(ctx, &rec, err) != 0) goto out;
        inf.records++;
        at += REC_HEADER + len;
    }
    if (inf.records == 0) {
        twn_err_set(err, "%s: no valid JOB_START record after the header (%s)", name,
                    inf.torn_reason[0] ? inf.torn_reason : "no records");
        goto out;
    }
    if (max_epoch >= TWN_JOURNAL_MAX_EPOCH) {
        twn_err_set(err, "%s: opened %" PRIu32 " times, the most a journal supports", name,
                    max_epoch);
        goto out;
    }
    inf.epoch = max_epoch + 1;
    inf.valid_bytes = at;
    inf.torn_bytes = n - at;
    rc = 0;
out:
    twn_free(sc.s1);
    twn_free(sc.s2);
    twn_free(sc.items);
    if (info) *info = inf;
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Files

static int write_all(int fd, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int fsync_dir(const char *path, twn_err *err) {
    char *dir = twn_path_dirname(path);
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int rc = 0;
    if (dfd < 0 || fsync(dfd) != 0) rc = twn_err_errno(err, "cannot fsync directory %s", dir);
    if (dfd >= 0) close(dfd);
    twn_free(dir);
    return rc;
}

/* header + JOB_START into "<path>.tmp", fsync, rename, fsync the directory. */
static int create_journal(const char *path, const twn_plan_fp *fp, twn_err *err) {
    bytes b = {0};
    put_raw(&b, TWN_JOURNAL_MAGIC, TWN_JOURNAL_HEADER);
    put_job_start(&b, fp);
    size_t tl = strlen(path) + 8;
    char *tmp = twn_malloc(tl);
    snprintf(tmp, tl, "%s.tmp", path);
    int rc = -1;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        twn_err_errno(err, "cannot create journal %s", tmp);
        goto out;
    }
    if (write_all(fd, b.v, b.n) != 0 || fsync(fd) != 0) {
        twn_err_errno(err, "cannot write journal %s", tmp);
        close(fd);
        unlink(tmp);
        goto out;
    }
    close(fd);
    if (rename(tmp, path) != 0) {
        twn_err_errno(err, "cannot rename %s to %s", tmp, path);
        unlink(tmp);
        goto out;
    }
    rc = fsync_dir(path, err);
out:
    twn_free(tmp);
    twn_free(b.v);
    return rc;
}

/* Maps the file read-only for replay (no heap copy of a large journal).  *len 0: nothing mapped. */
static int map_fd(int fd, const char *path, const uint8_t **data, size_t *len, twn_err *err) {
    struct stat st;
    *data = NULL;
    *len = 0;
    if (fstat(fd, &st) != 0) return twn_err_errno(err, "cannot stat journal %s", path);
    if (!S_ISREG(st.st_mode)) return twn_err_set(err, "%s: journal is not a regular file", path);
    if (st.st_size == 0) return 0;
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) return twn_err_errno(err, "cannot map journal %s", path);
    *data = p;
    *len = (size_t)st.st_size;
    return 0;
}

static void poison_journal(twn_journal *j, const twn_err *e) {
    j->poisoned = 1;
    j->poison = *e;
}

int twn_journal_commit(twn_journal *j, twn_err *err) {
    if (j->poisoned) {
        if (err) *err = j->poison;
        return -1;
    }
    if (!j->buf.n) return 0;
    twn_err e = {{0}};
    if (write_all(j->fd, j->buf.v, j->buf.n) != 0) {
        twn_err_errno(&e, "cannot write journal %s", j->path);
        poison_journal(j, &e);
    } else if (j->cfg.fsync && fdatasync(j->fd) != 0) {
        twn_err_errno(&e, "cannot fsync journal %s", j->path);
        poison_journal(j, &e);
    }
    if (j->poisoned) {
        if (err) *err = j->poison;
        return -1;
    }
    j->file_bytes += j->buf.n;
    j->buf.n = 0;
    j->buffered_records = 0;
    j->durable = j->appended;
    j->commits++;
    return 0;
}

int twn_journal_open(const char *path, const twn_plan_fp *fp, const twn_journal_cfg *cfg,
                     twn_jrec_fn fn, void *ctx, twn_journal **out, twn_journal_info *info,
                     twn_err *err) {
    *out = NULL;
    twn_journal_info inf = {0};
    if (info) *info = inf;
    if (!fp || !fp->sources || !fp->model_hash)
        return twn_err_set(err, "journal %s: plan fingerprint needs sources and model_hash", path);
    if (strlen(fp->sources) > TWN_JOURNAL_MAX_STRING ||
        strlen(fp->model_hash) > TWN_JOURNAL_MAX_STRING)
        return twn_err_set(err,
                           "journal %s: sources (%zu bytes) or model hash (%zu bytes) longer "
                           "than %u bytes",
                           path, strlen(fp->sources), strlen(fp->model_hash),
                           TWN_JOURNAL_MAX_STRING);
    struct stat st;
    int exists = stat(path, &st) == 0;
    if (!exists && errno != ENOENT) return twn_err_errno(err, "cannot stat journal %s", path);
    if (!exists || (S_ISREG(st.st_mode) && st.st_size == 0)) {
        if (create_journal(path, fp, err) != 0) return -1;
        inf.created = 1;
    }
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return twn_err_errno(err, "cannot open journal %s", path);
    const uint8_t *data = NULL;
    size_t n = 0;
    int created = inf.created;
    if (map_fd(fd, path, &data, &n, err) != 0) {
        close(fd);
        return -1;
    }
    int rc = twn_journal_replay_mem(data, n, path, fp, fn, ctx, &inf, err);
    if (data) munmap((void *)data, n);
    if (rc != 0) {
        close(fd);
        return -1;
    }
    inf.created = created;
    if (inf.torn_bytes) {
        if (ftruncate(fd, (off_t)inf.valid_bytes) != 0 || fdatasync(fd) != 0) {
            twn_err_errno(err, "cannot truncate the torn tail of journal %s", path);
            close(fd);
            return -1;
        }
    }
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < 0) {
        twn_err_errno(err, "cannot seek in journal %s", path);
        close(fd);
        return -1;
    }
    twn_journal *j = twn_calloc(1, sizeof *j);
    j->path = twn_strdup(path);
    j->fd = fd;
    j->cfg = *cfg;
    j->file_bytes = (uint64_t)end;
    if (created) {
        inf.epoch = 1;
        j->epoch = 1;
    } else {
        j->epoch = inf.epoch;
        size_t at = rec_begin(&j->buf, TWN_JREC_RESUME);
        put_le(&j->buf, inf.epoch, 4);
        rec_end(&j->buf, at);
        j->appended++;
        /* The epoch must be durable before any lease id of this run is handed out. */
        if (twn_journal_commit(j, err) != 0) {
            twn_journal_abandon(j);
            return -1;
        }
    }
    if (info) *info = inf;
    *out = j;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Appends

static int appended(twn_journal *j, twn_err *err) {
    j->appended++;
    j->buffered_records++;
    if (j->buf.n >= j->cfg.group_commit_bytes) return twn_journal_commit(j, err);
    return 0;
}

static int check_live(twn_journal *j, twn_err *err) {
    if (!j->poisoned) return 0;
    if (err) *err = j->poison;
    return -1;
}

int twn_journal_unit_done(twn_journal *j, uint64_t unit, const twn_unit_counts *c, twn_err *err) {
    if (check_live(j, err)) return -1;
    size_t at = rec_begin(&j->buf, TWN_JREC_UNIT_DONE);
    put_le(&j->buf, unit, 8);
    put_le(&j->buf, c->n_items, 4);
    put_le(&j->buf, c->easy, 4);
    put_le(&j->buf, c->hard, 4);
    put_le(&j->buf, c->dead, 4);
    put_le(&j->buf, c->think_tokens, 8);
    rec_end(&j->buf, at);
    return appended(j, err);
}

int twn_journal_dead_letter(twn_journal *j, uint64_t unit, uint32_t item, twn_stage stage,
                            const char *reason, twn_err *err) {
    if (check_live(j, err)) return -1;
    if (stage < 1 || stage > TWN_STAGE_MAX)
        return twn_err_set(err,
                           "journal %s: dead letter for unit %016" PRIx64 " item %" PRIu32
                           ": stage %d, expected 1..%d",
                           j->path, unit, item, (int)stage, TWN_STAGE_MAX);
    size_t rl = reason ? strnlen(reason, TWN_JOURNAL_MAX_REASON) : 0;
    size_t at = rec_begin(&j->buf, TWN_JREC_DEAD_LETTER);
    put_le(&j->buf, unit, 8);
    put_le(&j->buf, item, 4);
    put_u8(&j->buf, (uint8_t)stage);
    put_le(&j->buf, rl, 2);
    put_raw(&j->buf, reason, rl);
    rec_end(&j->buf, at);
    return appended(j, err);
}

int twn_journal_hard_routed(twn_journal *j, uint64_t unit, const uint32_t *items, size_t n,
                            twn_err *err) {
    if (check_live(j, err)) return -1;
    while (n) {
        size_t k = n < TWN_JOURNAL_MAX_HARD ? n : TWN_JOURNAL_MAX_HARD;
        size_t at = rec_begin(&j->buf, TWN_JREC_HARD_ROUTED);
        put_le(&j->buf, unit, 8);
        put_le(&j->buf, k, 4);
        b_reserve(&j->buf, 5 * k);
        int64_t prev = 0;
        for (size_t i = 0; i < k; i++) {
            int64_t d = (int64_t)items[i] - prev;
            put_varint(&j->buf, (uint64_t)(d * 2) ^ (uint64_t)(d >> 63)); /* zigzag */
            prev = items[i];
        }
        rec_end(&j->buf, at);
        if (appended(j, err) != 0) return -1;
        items += k;
        n -= k;
    }
    return 0;
}

int twn_journal_job_finished(twn_journal *j, const twn_job_counts *c, twn_err *err) {
    if (check_live(j, err)) return -1;
    size_t at = rec_begin(&j->buf, TWN_JREC_JOB_FINISHED);
    put_le(&j->buf, c->units, 8);
    put_le(&j->buf, c->items, 8);
    put_le(&j->buf, c->easy, 8);
    put_le(&j->buf, c->hard, 8);
    put_le(&j->buf, c->rejected, 8);
    put_le(&j->buf, c->think_tokens, 8);
    rec_end(&j->buf, at);
    return appended(j, err);
}

int twn_journal_maybe_commit(twn_journal *j, double now, int *committed, twn_err *err) {
    if (committed) *committed = 0;
    if (check_live(j, err)) return -1;
    if (!j->buf.n) {
        j->last_commit = now;
        return 0;
    }
    if (now - j->last_commit < j->cfg.group_commit_s && j->buf.n < j->cfg.group_commit_bytes)
        return 0;
    if (twn_journal_commit(j, err) != 0) return -1;
    j->last_commit = now;
    if (committed) *committed = 1;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Compaction

typedef struct compact_st {
    const uint8_t *data;
    bytes *out;
    twn_jkeep_fn keep;
    void *ctx;
    uint32_t epoch;
    uint64_t kept;
} compact_st;

/* Copies a kept record's bytes as they are (its CRC stays valid); JOB_START is followed by one
 * RESUME with this run's epoch, so the next open still counts epochs up from it. */
static int compact_rec(void *ctx, const twn_jrec *r, twn_err *err) {
    (void)err;
    compact_st *st = ctx;
    if (r->type == TWN_JREC_RESUME) return 0;
    if (r->type != TWN_JREC_JOB_START && !st->keep(st->ctx, r)) return 0;
    put_raw(st->out, st->data + r->offset, REC_HEADER + (size_t)get_le(st->data + r->offset, 4));
    if (r->type == TWN_JREC_JOB_START) {
        size_t at = rec_begin(st->out, TWN_JREC_RESUME);
        put_le(st->out, st->epoch, 4);
        rec_end(st->out, at);
    } else {
        st->kept++;
    }
    return 0;
}

int twn_journal_compact(twn_journal *j, twn_jkeep_fn keep, void *ctx, uint64_t *kept,
                        twn_err *err) {
    if (kept) *kept = 0;
    if (twn_journal_commit(j, err) != 0) return -1;
    const uint8_t *data;
    size_t n;
    if (map_fd(j->fd, j->path, &data, &n, err) != 0) return -1;
    bytes out = {0};
    put_raw(&out, TWN_JOURNAL_MAGIC, TWN_JOURNAL_HEADER);
    compact_st st = {data, &out, keep, ctx, j->epoch, 0};
    int rc = twn_journal_replay_mem(data, n, j->path, NULL, compact_rec, &st, NULL, err);
    if (data) munmap((void *)data, n);
    if (rc != 0) {
        twn_free(out.v);
        return -1;
    }
    size_t tl = strlen(j->path) + 8;
    char *tmp = twn_malloc(tl);
    snprintf(tmp, tl, "%s.tmp", j->path);
    rc = -1;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644), nfd = -1;
    if (fd < 0) {
        twn_err_errno(err, "cannot create %s to compact the journal", tmp);
        goto out;
    }
    if (write_all(fd, out.v, out.n) != 0 || fsync(fd) != 0) {
        twn_err_errno(err, "cannot write %s to compact the journal", tmp);
        close(fd);
        unlink(tmp);
        goto out;
    }
    close(fd);
    if (rename(tmp, j->path) != 0) {
        twn_err_errno(err, "cannot rename %s to %s", tmp, j->path);
        unlink(tmp);
        goto out;
    }
    /* From here the old file is gone: a failure poisons the journal. */
    twn_err e = {{0}};
    if (fsync_dir(j->path, &e) == 0 && (nfd = open(j->path, O_RDWR | O_APPEND | O_CLOEXEC)) < 0)
        twn_err_errno(&e, "cannot open compacted journal %s", j->path);
    if (nfd < 0) {
        poison_journal(j, &e);
        if (err) *err = e;
        goto out;
    }
    close(j->fd);
    j->fd = nfd;
    j->file_bytes = out.n;
    if (kept) *kept = st.kept;
    rc = 0;
out:
    twn_free(tmp);
    twn_free(out.v);
    return rc;
}

uint64_t twn_journal_bytes(const twn_journal *j) {
    return j->file_bytes + j->buf.n;
}

uint64_t twn_journal_appended(const twn_journal *j) {
    return j->appended;
}
uint64_t twn_journal_durable(const twn_journal *j) {
    return j->durable;
}
size_t twn_journal_buffered_bytes(const twn_journal *j) {
    return j->buf.n;
}
uint64_t twn_journal_commits(const twn_journal *j) {
    return j->commits;
}
const char *twn_journal_path(const twn_journal *j) {
    return j->path;
}

int twn_journal_close(twn_journal *j, twn_err *err) {
    if (!j) return 0;
    int rc = twn_journal_commit(j, err);
    if (close(j->fd) != 0 && rc == 0) rc = twn_err_errno(err, "cannot close journal %s", j->path);
    twn_free(j->buf.v);
    twn_free(j->path);
    twn_free(j);
    return rc;
}

void twn_journal_abandon(twn_journal *j) {
    if (!j) return;
    close(j->fd);
    twn_free(j->buf.v);
    twn_free(j->path);
    twn_free(j);
}
