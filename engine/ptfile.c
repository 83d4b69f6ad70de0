/* ptfile.c — PyTorch .pt files: a zip of raw storages plus a pickle saying how tensors view them.
 *
 * Why it is shaped this way:
 *  - A pickle is a program, so it is executed by a small stack machine rather than parsed.  The
 *    machine's values are a closed tagged union (None, bools, ints, floats, strings, tuples,
 *    lists, dicts, sets, whitelisted callables, storages, tensor descriptors).  GLOBAL resolves
 *    only names in the whitelist table below; anything else (os.system, builtins.eval, ...) stops
 *    the load with its module.name.  There is no path by which a name becomes a call.
 *  - Every value lives in one arena freed at the end, so memo sharing and even cycles (a list
 *    appended to itself) cost nothing, and nothing recurses over the object graph.
 *  - Hostile input is bounded: the limits below cap data.pkl, objects, container slots, stack
 *    depth, MARK nesting and memo indices; every length is checked against the bytes left
 *    before anything is allocated; a deflated record's buffer grows with the bytes actually
 *    inflated (its declared size is not trusted); and bytes copied to materialize strided views
 *    are capped relative to the storage bytes they come from (a stride-0 view could otherwise
 *    turn four bytes into gigabytes).
 *  - Tensors stay descriptors (storage, offset, size, stride) until the pickle has finished;
 *    only those that reach the top-level dict are materialized.  A contiguous view — the normal
 *    case — aliases its storage record, which the file then owns: no copy, and tensors sharing a
 *    storage share bytes as they do in torch.  Other views are copied out contiguous; their
 *    highest element index is bounds-checked against the storage when _rebuild_tensor_v2 runs,
 *    and the storage size against the record when it is read.
 *  - The writer emits the opcodes CPython's pickler produces for torch.save of an OrderedDict of
 *    tensors at protocol 2, memo numbers included (tests/data/pt/writer_ref.pt is the golden),
 *    and lays the zip out like caffe2's PyTorchStreamWriter: stored records, each padded with a
 *    local "FB" extra field so its data starts on a 64-byte boundary. */
#include "engine/ptfile.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <zip.h>

#include "engine/ptfile_internal.h"
#include "util/hash.h"
#include "util/mem.h"
#include "util/vec.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ptfile.c aliases little-endian storage bytes in place; port the byte order first"
#endif

/* Limits against hostile files.  A real checkpoint is far below each: a 1000-tensor state dict
 * has a ~100 KB data.pkl and ~20k pickle values. */
#define PT_MAX_PICKLE_BYTES ((size_t)256 << 20) /* data.pkl after inflation */
#define PT_MAX_OBJECTS      ((size_t)1 << 22)   /* values the VM creates */
#define PT_MAX_SLOTS        ((size_t)1 << 24)   /* container elements, over all containers */
#define PT_MAX_STACK        ((size_t)1 << 20)   /* pickle stack depth */
#define PT_MAX_MARKS        ((size_t)1 << 12)   /* MARKs open at once */
#define PT_MAX_MEMO         ((size_t)1 << 22)   /* highest memo index */
#define PT_MAX_SMALL_RECORD 64                  /* byteorder */
#define PT_COPY_FACTOR      16                  /* copied view bytes <= 16 x storage bytes ... */
#define PT_COPY_SLACK       ((size_t)1 << 20)   /* ... + 1 MiB */
#define PT_INFLATE_CHUNK    ((size_t)1 << 20)   /* first buffer for a deflated record */
#define PT_ALIGN            64                  /* caffe2 kFieldAlignment */
#define PT_PAD_ID           0x4246              /* "FB": caffe2's padding extra field */
#define PT_ZIP_LOCAL_HDR    30                  /* fixed part of a zip local file header */

/* ------------------------------------------------------------------------------------------ */
/* The whitelist: the only names GLOBAL / STACK_GLOBAL resolve.  The writer uses the storage
 * rows to name a dtype's storage class. */

typedef enum { G_ODICT, G_REBUILD_V2, G_REBUILD_PARAM, G_SIZE, G_STORAGE } gkind;

static const struct {
    const char *module, *name;
    gkind kind;
    twn_dtype dtype; /* G_STORAGE only */
} globals[] = {
    {"collections", "OrderedDict", G_ODICT, 0},
    {"torch._utils", "_rebuild_tensor_v2", G_REBUILD_V2, 0},
    {"torch._utils", "_rebuild_parameter", G_REBUILD_PARAM, 0},
    {"torch._utils", "_rebuild_parameter_with_state", G_REBUILD_PARAM, 0},
    {"torch", "Size", G_SIZE, 0},
    {"torch", "FloatStorage", G_STORAGE, TWN_DT_F32},
    {"torch", "HalfStorage", G_STORAGE, TWN_DT_F16},
    {"torch", "BFloat16Storage", G_STORAGE, TWN_DT_BF16},
    {"torch", "DoubleStorage", G_STORAGE, TWN_DT_F64},
    {"torch", "LongStorage", G_STORAGE, TWN_DT_I64},
    {"torch", "IntStorage", G_STORAGE, TWN_DT_I32},
    {"torch", "ShortStorage", G_STORAGE, TWN_DT_I16},
    {"torch", "CharStorage", G_STORAGE, TWN_DT_I8},
    {"torch", "ByteStorage", G_STORAGE, TWN_DT_U8},
    {"torch", "BoolStorage", G_STORAGE, TWN_DT_BOOL},
};
#define N_GLOBALS (sizeof globals / sizeof globals[0])

/* ------------------------------------------------------------------------------------------ */
/* Pickle values */

typedef enum {
    V_NONE,
    V_BOOL,
    V_INT,
    V_BIGINT, /* an int wider than 64 bits: kept so the file parses, unusable as a number */
    V_FLOAT,
    V_STR,
    V_BYTES,
    V_TUPLE,
    V_LIST,
    V_DICT, /* keys and values interleaved, in insertion order */
    V_SET,
    V_GLOBAL,
    V_STORAGE,
    V_TENSOR,
} vkind;

static const char *const vkind_names[] = {
    "None",  "bool", "int",  "int", "float",  "str",     "bytes",
    "tuple", "list", "dict", "set", "global", "storage", "tensor",
};

typedef struct {
    twn_dtype dtype;
    char *key;           /* "0", "1", ...: the record is <prefix>/data/<key> */
    int64_t numel;       /* elements of dtype, as the pickle declares */
    zip_uint64_t record; /* zip entry index */
} pt_storage;

typedef struct {
    pt_storage *st;
    int64_t offset; /* in elements */
    int ndim;
    int64_t size[TWN_MAX_DIMS], stride[TWN_MAX_DIMS]; /* stride in elements */
    int64_t numel;
    /* filled by materialize() */
    bool done;
    const void *data;
    size_t nbytes;
} pt_view;

typedef struct pv pv;
struct pv {
    vkind kind;
    union {
        int64_t i; /* V_BOOL, V_INT */
        double f;
        struct {
            char *s; /* NUL-terminated copy */
            size_t n;
        } str; /* V_STR, V_BYTES */
        struct {
            pv **v;
            size_t n, cap;
        } seq;    /* V_TUPLE, V_LIST, V_SET, V_DICT */
        size_t g; /* V_GLOBAL: index into globals[] */
        pt_storage *st;
        pt_view *t;
    } u;
};

/* ------------------------------------------------------------------------------------------ */
/* The archive being read */

typedef struct {
    const char *name; /* for messages: the path, or the caller's name for memory */
    zip_t *za;
    char *prefix; /* "<stem>" of "<stem>/data.pkl" */
    size_t archive_bytes;
} pt_zip;

/* Copies at most `cap - 4` bytes of untrusted text, '?' for anything unprintable, "..." if cut. */
static const char *printable(const char *s, size_t n, char *buf, size_t cap) {
    size_t k = 0;
    for (size_t i = 0; i < n && k + 4 < cap; i++)
        buf[k++] = (s[i] >= 0x20 && s[i] < 0x7f) ? s[i] : '?';
    if (k < n && k + 4 <= cap) memcpy(buf + k, "...", 3), k += 3;
    buf[k] = 0;
    return buf;
}

static char *record_name(const pt_zip *z, const char *rel) {
    twn_str s = {0};
    twn_str_printf(&s, "%s/%s", z->prefix, rel);
    return s.v;
}

/* Reads a whole record into a 64-byte aligned buffer (twn_free).  Only stored and deflated
 * records; a stored one may not claim more bytes than the archive has, and a deflated one's
 * buffer grows with the bytes inflated.  Reads one byte past the end so libzip checks the CRC. */
static int read_record(const pt_zip *z, zip_uint64_t idx, size_t max, uint8_t **out,
                       size_t *out_len, twn_err *err) {
    const char *rname = zip_get_name(z->za, idx, ZIP_FL_ENC_RAW);
    char pn[128];
    printable(rname ? rname : "?", rname ? strlen(rname) : 1, pn, sizeof pn);
    zip_stat_t st;
    zip_stat_init(&st);
    if (zip_stat_index(z->za, idx, 0, &st) != 0)
        return twn_err_set(err, "%s: cannot stat record %s: %s", z->name, pn, zip_strerror(z->za));
    if ((st.valid & (ZIP_STAT_SIZE | ZIP_STAT_COMP_METHOD)) !=
        (ZIP_STAT_SIZE | ZIP_STAT_COMP_METHOD))
        return twn_err_set(err, "%s: record %s has no size or compression method", z->name, pn);
    if (st.comp_method != ZIP_CM_STORE && st.comp_method != ZIP_CM_DEFLATE)
        return twn_err_set(err,
                           "%s: record %s uses zip compression method %u; only stored and "
                           "deflated records are supported",
                           z->name, pn, (unsigned)st.comp_method);
    if (st.size > max)
        return twn_err_set(err, "%s: record %s is %llu bytes, more than the %zu allowed", z->name,
                           pn, (unsigned long long)st.size, max);
    size_t want = (size_t)st.size, cap = want;
    if (st.comp_method == ZIP_CM_STORE && want > z->archive_bytes)
        return twn_err_set(err, "%s: record %s claims %zu bytes in a %zu-byte archive", z->name, pn,
                           want, z->archive_bytes);
    if (st.comp_method != ZIP_CM_STORE && cap > PT_INFLATE_CHUNK) cap = PT_INFLATE_CHUNK;

    uint8_t *buf = twn_try_alloc(cap);
    if (!buf)
        return twn_err_set(err, "%s: cannot allocate %zu bytes for record %s", z->name, cap, pn);
    zip_file_t *zf = zip_fopen_index(z->za, idx, 0);
    if (!zf) {
        twn_free(buf);
        return twn_err_set(err, "%s: cannot open record %s: %s", z->name, pn, zip_strerror(z->za));
    }
    size_t got = 0;
    while (got < want) {
        if (got == cap) {
            size_t ncap = cap > want / 2 ? want : cap * 2;
            uint8_t *nb = twn_try_alloc(ncap);
            if (!nb) {
                twn_err_set(err, "%s: cannot allocate %zu bytes for record %s", z->name, ncap, pn);
                goto fail;
            }
            memcpy(nb, buf, got);
            twn_free(buf);
            buf = nb;
            cap = ncap;
        }
        zip_int64_t r = zip_fread(zf, buf + got, cap - got);
        if (r < 0) {
            twn_err_set(err, "%s: cannot read record %s: %s", z->name, pn, zip_file_strerror(zf));
            goto fail;
        }
        if (r == 0) {
            twn_err_set(err, "%s: record %s ends after %zu of its %zu bytes", z->name, pn, got,
                        want);
            goto fail;
        }
        got += (size_t)r;
    }
    uint8_t extra;
    zip_int64_t r = zip_fread(zf, &extra, 1);
    if (r != 0) {
        if (r < 0)
            twn_err_set(err, "%s: cannot read record %s: %s", z->name, pn, zip_file_strerror(zf));
        else
            twn_err_set(err, "%s: record %s is longer than its declared %zu bytes", z->name, pn,
                        want);
        goto fail;
    }
    zip_fclose(zf);
    *out = buf;
    *out_len = got;
    return 0;
fail:
    zip_fclose(zf);
    twn_free(buf);
    return -1;
}

/* Finds "<prefix>/data.pkl" (the first entry with that suffix) and sets z->prefix. */
static int find_data_pkl(pt_zip *z, zip_uint64_t *idx, twn_err *err) {
    zip_int64_t n = zip_get_num_entries(z->za, 0);
    static const char suffix[] = "/data.pkl";
    const size_t sl = sizeof suffix - 1;
    for (zip_int64_t i = 0; i < n; i++) {
        const char *nm = zip_get_name(z->za, (zip_uint64_t)i, ZIP_FL_ENC_RAW);
        if (!nm) continue;
        size_t len = strlen(nm);
        if (len > sl && !memcmp(nm + len - sl, suffix, sl)) {
            z->prefix = twn_strndup(nm, len - sl);
            *idx = (zip_uint64_t)i;
            return 0;
        }
    }
    return twn_err_set(err,
                       "%s: no <prefix>/data.pkl record among its %lld zip entries (not a "
                       "torch.save file?)",
                       z->name, (long long)n);
}

/* "little" or absent (torch then assumes native, and this host is little-endian). */
static int check_byteorder(const pt_zip *z, twn_err *err) {
    char *nm = record_name(z, "byteorder");
    zip_int64_t idx = zip_name_locate(z->za, nm, ZIP_FL_ENC_RAW);
    twn_free(nm);
    if (idx < 0) return 0;
    uint8_t *buf;
    size_t len;
    if (read_record(z, (zip_uint64_t)idx, PT_MAX_SMALL_RECORD, &buf, &len, err) < 0) return -1;
    int rc = 0;
    if (len == 3 && !memcmp(buf, "big", 3))
        rc = twn_err_set(err,
                         "%s: %s/byteorder is \"big\": big-endian .pt files are not supported "
                         "(re-save the checkpoint on a little-endian machine)",
                         z->name, z->prefix);
    else if (!(len == 6 && !memcmp(buf, "little", 6))) {
        char pb[80];
        rc = twn_err_set(err, "%s: %s/byteorder is \"%s\", expected \"little\"", z->name, z->prefix,
                         printable((const char *)buf, len, pb, sizeof pb));
    }
    twn_free(buf);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* The pickle VM */

typedef struct {
    const pt_zip *z;
    twn_err *err;
    const uint8_t *p;
    size_t n, pos, op_pos; /* op_pos: where the current opcode started, for messages */
    pv **objs;
    size_t nobjs, capobjs, slots;
    pv **stack;
    size_t sp, capstack;
    size_t *marks;
    size_t nmarks, capmarks;
    pv **memo;
    size_t capmemo, nmemo; /* nmemo: entries set, the index MEMOIZE uses next */
    pv *none, *yes, *no;
} vm;

static int vm_fail(vm *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int vm_fail(vm *m, const char *fmt, ...) {
    char msg[640];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return twn_err_set(m->err, "%s: %s/data.pkl at byte %zu: %s", m->z->name, m->z->prefix,
                       m->op_pos, msg);
}

static const char *kname(const pv *v) {
    return vkind_names[v->kind];
}

static pv *vm_new(vm *m, vkind k) {
    if (m->nobjs >= PT_MAX_OBJECTS) {
        vm_fail(m, "more than %zu pickle values", PT_MAX_OBJECTS);
        return NULL;
    }
    if (m->nobjs == m->capobjs) {
        m->capobjs = m->capobjs ? m->capobjs * 2 : 256;
        m->objs = twn_realloc(m->objs, m->capobjs * sizeof *m->objs);
    }
    pv *v = twn_calloc(1, sizeof *v);
    v->kind = k;
    m->objs[m->nobjs++] = v;
    return v;
}

static void pv_free(pv *v) {
    switch (v->kind) {
    case V_STR:
    case V_BYTES:
        twn_free(v->u.str.s);
        break;
    case V_TUPLE:
    case V_LIST:
    case V_SET:
    case V_DICT:
        twn_free(v->u.seq.v);
        break;
    case V_STORAGE:
        if (v->u.st) twn_free(v->u.st->key);
        twn_free(v->u.st);
        break;
    case V_TENSOR:
        twn_free(v->u.t);
        break;
    default:
        break;
    }
    twn_free(v);
}

static void vm_free(vm *m) {
    for (size_t i = 0; i < m->nobjs; i++) pv_free(m->objs[i]);
    twn_free(m->objs);
    twn_free(m->stack);
    twn_free(m->marks);
    twn_free(m->memo);
}

static int seq_push(vm *m, pv *c, pv *x) {
    if (m->slots >= PT_MAX_SLOTS)
        return vm_fail(m, "more than %zu container elements", PT_MAX_SLOTS);
    if (c->u.seq.n == c->u.seq.cap) {
        c->u.seq.cap = c->u.seq.cap ? c->u.seq.cap * 2 : 4;
        c->u.seq.v = twn_realloc(c->u.seq.v, c->u.seq.cap * sizeof *c->u.seq.v);
    }
    c->u.seq.v[c->u.seq.n++] = x;
    m->slots++;
    return 0;
}

static int push(vm *m, pv *v) {
    if (!v) return -1;
    if (m->sp >= PT_MAX_STACK) return vm_fail(m, "pickle stack deeper than %zu", PT_MAX_STACK);
    if (m->sp == m->capstack) {
        m->capstack = m->capstack ? m->capstack * 2 : 64;
        m->stack = twn_realloc(m->stack, m->capstack * sizeof *m->stack);
    }
    m->stack[m->sp++] = v;
    return 0;
}

/* Items above the innermost MARK are the only ones an opcode may pop (as in CPython). */
static size_t fence(const vm *m) {
    return m->nmarks ? m->marks[m->nmarks - 1] : 0;
}

static pv *pop(vm *m) {
    if (m->sp <= fence(m)) {
        vm_fail(m, "stack underflow");
        return NULL;
    }
    return m->stack[--m->sp];
}

static pv *top(vm *m) {
    if (m->sp <= fence(m)) {
        vm_fail(m, "stack underflow");
        return NULL;
    }
    return m->stack[m->sp - 1];
}

/* Pops the innermost MARK; the items it covered are stack[*base .. m->sp). */
static int pop_mark(vm *m, size_t *base) {
    if (!m->nmarks) return vm_fail(m, "no MARK on the stack");
    *base = m->marks[--m->nmarks];
    return 0;
}

static int need(vm *m, size_t k) {
    if (m->n - m->pos < k)
        return vm_fail(m, "truncated pickle: opcode 0x%02x needs %zu bytes, %zu left",
                       m->p[m->op_pos], k, m->n - m->pos);
    return 0;
}

static uint64_t rd_le(vm *m, int k) {
    uint64_t v = 0;
    for (int i = 0; i < k; i++) v |= (uint64_t)m->p[m->pos + (size_t)i] << (8 * i);
    m->pos += (size_t)k;
    return v;
}

static int push_int(vm *m, int64_t x) {
    pv *v = vm_new(m, V_INT);
    if (!v) return -1;
    v->u.i = x;
    return push(m, v);
}

/* LONG1/LONG4 payload: little-endian two's complement of `len` bytes. */
static int push_long(vm *m, size_t len) {
    if (need(m, len) < 0) return -1;
    if (len > 8) {
        m->pos += len;
        return push(m, vm_new(m, V_BIGINT));
    }
    uint64_t u = len ? rd_le(m, (int)len) : 0;
    if (len && len < 8 && (m->p[m->pos - 1] & 0x80)) u |= ~(uint64_t)0 << (8 * len);
    int64_t x;
    memcpy(&x, &u, sizeof x);
    return push_int(m, x);
}

static int push_str(vm *m, vkind k, size_t len) {
    if (need(m, len) < 0) return -1;
    pv *v = vm_new(m, k);
    if (!v) return -1;
    v->u.str.s = twn_strndup((const char *)m->p + m->pos, len);
    v->u.str.n = len;
    m->pos += len;
    return push(m, v);
}

static int resolve_global(vm *m, const char *mod, size_t ml, const char *name, size_t nl) {
    for (size_t i = 0; i < N_GLOBALS; i++)
        if (strlen(globals[i].module) == ml && !memcmp(globals[i].module, mod, ml) &&
            strlen(globals[i].name) == nl && !memcmp(globals[i].name, name, nl)) {
            pv *v = vm_new(m, V_GLOBAL);
            if (!v) return -1;
            v->u.g = i;
            return push(m, v);
        }
    char a[100], b[100];
    return vm_fail(m,
                   "refusing global %s.%s: only collections.OrderedDict, "
                   "torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, torch.Size "
                   "and torch.<Type>Storage may be loaded",
                   printable(mod, ml, a, sizeof a), printable(name, nl, b, sizeof b));
}

/* GLOBAL: "module\nname\n". */
static int op_global(vm *m) {
    const char *s[2];
    size_t l[2];
    for (int k = 0; k < 2; k++) {
        const uint8_t *nl = memchr(m->p + m->pos, '\n', m->n - m->pos);
        if (!nl) return vm_fail(m, "truncated pickle: GLOBAL without a newline");
        s[k] = (const char *)m->p + m->pos;
        l[k] = (size_t)(nl - (m->p + m->pos));
        m->pos += l[k] + 1;
    }
    return resolve_global(m, s[0], l[0], s[1], l[1]);
}

/* Reads a size or stride tuple of non-negative ints. */
static int int_tuple(vm *m, const pv *v, const char *what, int64_t *out, int *nd) {
    if (v->kind != V_TUPLE && v->kind != V_LIST)
        return vm_fail(m, "_rebuild_tensor_v2: %s is a %s, expected a tuple", what, kname(v));
    if (v->u.seq.n > TWN_MAX_DIMS)
        return vm_fail(m, "_rebuild_tensor_v2: %s has %zu dimensions, at most %d are supported",
                       what, v->u.seq.n, TWN_MAX_DIMS);
    for (size_t i = 0; i < v->u.seq.n; i++) {
        const pv *e = v->u.seq.v[i];
        if (e->kind != V_INT || e->u.i < 0)
            return vm_fail(m, "_rebuild_tensor_v2: %s[%zu] is not a non-negative int", what, i);
        out[i] = e->u.i;
    }
    *nd = (int)v->u.seq.n;
    return 0;
}

/* _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, metadata]). */
static int rebuild_tensor(vm *m, pv **a, size_t na) {
    if (na != 6 && na != 7)
        return vm_fail(m, "_rebuild_tensor_v2 takes 6 or 7 arguments, got %zu", na);
    if (a[0]->kind != V_STORAGE)
        return vm_fail(m, "_rebuild_tensor_v2: argument 1 is a %s, expected a storage",
                       kname(a[0]));
    if (a[1]->kind != V_INT || a[1]->u.i < 0)
        return vm_fail(m, "_rebuild_tensor_v2: storage_offset is not a non-negative int");
    pt_view t = {.st = a[0]->u.st, .offset = a[1]->u.i};
    int nd_stride;
    if (int_tuple(m, a[2], "size", t.size, &t.ndim) < 0 ||
        int_tuple(m, a[3], "stride", t.stride, &nd_stride) < 0)
        return -1;
    if (nd_stride != t.ndim)
        return vm_fail(m, "_rebuild_tensor_v2: %d sizes but %d strides", t.ndim, nd_stride);
    size_t es = twn_dtype_size(t.st->dtype);
    int64_t numel = 1, last = t.offset;
    bool ovf = false;
    for (int d = 0; d < t.ndim; d++) ovf |= __builtin_mul_overflow(numel, t.size[d], &numel);
    int64_t bytes;
    if (ovf || __builtin_mul_overflow(numel, (int64_t)es, &bytes))
        return vm_fail(m, "_rebuild_tensor_v2: tensor size overflows");
    if (numel > 0) {
        for (int d = 0; d < t.ndim; d++) {
            int64_t step;
            ovf |= __builtin_mul_overflow(t.size[d] - 1, t.stride[d], &step);
            ovf |= __builtin_add_overflow(last, step, &last);
        }
        if (ovf || last >= t.st->numel) {
            char pk[80];
            return vm_fail(
                m,
                "_rebuild_tensor_v2: view out of bounds: storage_offset %lld and "
                "strides reach element %s%lld, but storage '%s' has %lld elements",
                (long long)t.offset, ovf ? "> " : "", (long long)(ovf ? INT64_MAX : last),
                printable(t.st->key, strlen(t.st->key), pk, sizeof pk), (long long)t.st->numel);
        }
    }
    t.numel = numel;
    pv *v = vm_new(m, V_TENSOR);
    if (!v) return -1;
    v->u.t = twn_malloc(sizeof t);
    *v->u.t = t;
    return push(m, v);
}

/* REDUCE / NEWOBJ: fn(*args) for the whitelisted callables. */
static int call(vm *m, pv *fn, pv *args) {
    if (fn->kind != V_GLOBAL)
        return vm_fail(m, "call of a %s; only whitelisted globals may be called", kname(fn));
    const char *mod = globals[fn->u.g].module, *name = globals[fn->u.g].name;
    if (args->kind != V_TUPLE)
        return vm_fail(m, "arguments of %s.%s are a %s, not a tuple", mod, name, kname(args));
    pv **a = args->u.seq.v;
    size_t na = args->u.seq.n;
    switch (globals[fn->u.g].kind) {
    case G_ODICT:
        if (na)
            return vm_fail(m,
                           "collections.OrderedDict called with %zu arguments; only "
                           "OrderedDict() is supported",
                           na);
        return push(m, vm_new(m, V_DICT));
    case G_REBUILD_V2:
        return rebuild_tensor(m, a, na);
    case G_REBUILD_PARAM:
        if (na < 1 || a[0]->kind != V_TENSOR)
            return vm_fail(m, "%s.%s expects a tensor as its first argument", mod, name);
        return push(m, a[0]);
    case G_SIZE: {
        pv *t = vm_new(m, V_TUPLE);
        if (!t) return -1;
        if (na == 1 && (a[0]->kind == V_TUPLE || a[0]->kind == V_LIST)) {
            for (size_t i = 0; i < a[0]->u.seq.n; i++)
                if (seq_push(m, t, a[0]->u.seq.v[i]) < 0) return -1;
        } else if (na != 0)
            return vm_fail(m, "torch.Size expects one tuple argument");
        return push(m, t);
    }
    case G_STORAGE:
        return vm_fail(m,
                       "torch.%s cannot be called; it only names a storage type in a "
                       "persistent id",
                       name);
    }
    return vm_fail(m, "internal: unknown global kind");
}

/* BINPERSID: ('storage', torch.<Type>Storage, key, location, numel). */
static int persistent_load(vm *m, pv *pid) {
    pv **a = pid->u.seq.v;
    if (pid->kind != V_TUPLE || pid->u.seq.n != 5 || a[0]->kind != V_STR ||
        strcmp(a[0]->u.str.s, "storage") != 0 || a[1]->kind != V_GLOBAL ||
        globals[a[1]->u.g].kind != G_STORAGE || a[2]->kind != V_STR || a[3]->kind != V_STR ||
        a[4]->kind != V_INT)
        return vm_fail(m, "persistent id is not ('storage', torch.<Type>Storage, key, location, "
                          "numel)");
    const char *key = a[2]->u.str.s;
    size_t kl = a[2]->u.str.n;
    twn_dtype dt = globals[a[1]->u.g].dtype;
    char pk[80];
    printable(key, kl, pk, sizeof pk);
    int64_t numel = a[4]->u.i, bytes;
    if (numel < 0 || __builtin_mul_overflow(numel, (int64_t)twn_dtype_size(dt), &bytes))
        return vm_fail(m, "storage '%s' has an invalid element count %lld", pk, (long long)numel);
    zip_int64_t idx = -1;
    if (!memchr(key, 0, kl)) {
        twn_str nm = {0};
        twn_str_printf(&nm, "%s/data/%s", m->z->prefix, key);
        idx = zip_name_locate(m->z->za, nm.v, ZIP_FL_ENC_RAW);
        twn_str_free(&nm);
    }
    if (idx < 0)
        return vm_fail(m, "storage key '%s' has no record %s/data/%s in the archive", pk,
                       m->z->prefix, pk);
    pv *v = vm_new(m, V_STORAGE);
    if (!v) return -1;
    v->u.st = twn_calloc(1, sizeof *v->u.st);
    v->u.st->dtype = dt;
    v->u.st->key = twn_strndup(key, kl);
    v->u.st->numel = numel;
    v->u.st->record = (zip_uint64_t)idx;
    return push(m, v);
}

/* MARK ... TUPLE / LIST / DICT. */
static int collect(vm *m, vkind k) {
    size_t base = 0;
    if (pop_mark(m, &base) < 0) return -1;
    if (k == V_DICT && (m->sp - base) % 2) return vm_fail(m, "DICT with an odd number of items");
    pv *c = vm_new(m, k);
    if (!c) return -1;
    for (size_t i = base; i < m->sp; i++)
        if (seq_push(m, c, m->stack[i]) < 0) return -1;
    m->sp = base;
    return push(m, c);
}

/* APPENDS / SETITEMS / ADDITEMS: moves the items above the MARK into the container below it. */
static int extend(vm *m, vkind k, const char *op) {
    size_t base = 0;
    if (pop_mark(m, &base) < 0) return -1;
    if (base <= fence(m)) return vm_fail(m, "%s with no container below its MARK", op);
    pv *c = m->stack[base - 1];
    if (c->kind != k) return vm_fail(m, "%s on a %s, expected a %s", op, kname(c), vkind_names[k]);
    if (k == V_DICT && (m->sp - base) % 2) return vm_fail(m, "%s with an odd number of items", op);
    for (size_t i = base; i < m->sp; i++)
        if (seq_push(m, c, m->stack[i]) < 0) return -1;
    m->sp = base;
    return 0;
}

static int memo_put(vm *m, uint64_t idx) {
    pv *t = top(m);
    if (!t) return -1;
    if (idx >= PT_MAX_MEMO)
        return vm_fail(m, "memo index %llu is beyond the limit of %zu", (unsigned long long)idx,
                       PT_MAX_MEMO);
    if (idx >= m->capmemo) {
        size_t ncap = m->capmemo ? m->capmemo : 64;
        while (ncap <= idx) ncap *= 2;
        m->memo = twn_realloc(m->memo, ncap * sizeof *m->memo);
        memset(m->memo + m->capmemo, 0, (ncap - m->capmemo) * sizeof *m->memo);
        m->capmemo = ncap;
    }
    if (!m->memo[idx]) m->nmemo++;
    m->memo[idx] = t;
    return 0;
}

static int memo_get(vm *m, uint64_t idx) {
    if (idx >= m->capmemo || !m->memo[idx])
        return vm_fail(m, "memo entry %llu is not defined", (unsigned long long)idx);
    return push(m, m->memo[idx]);
}

/* Opcodes, named as in CPython's Lib/pickle.py. */
enum {
    OP_MARK = '(',
    OP_STOP = '.',
    OP_POP = '0',
    OP_POP_MARK = '1',
    OP_DUP = '2',
    OP_BINBYTES = 'B',
    OP_SHORT_BINBYTES = 'C',
    OP_BINFLOAT = 'G',
    OP_BININT = 'J',
    OP_BININT1 = 'K',
    OP_BININT2 = 'M',
    OP_NONE = 'N',
    OP_BINPERSID = 'Q',
    OP_REDUCE = 'R',
    OP_BINSTRING = 'T',
    OP_SHORT_BINSTRING = 'U',
    OP_BINUNICODE = 'X',
    OP_APPEND = 'a',
    OP_BUILD = 'b',
    OP_GLOBAL = 'c',
    OP_DICT = 'd',
    OP_EMPTY_DICT = '}',
    OP_APPENDS = 'e',
    OP_BINGET = 'h',
    OP_LONG_BINGET = 'j',
    OP_LIST = 'l',
    OP_EMPTY_LIST = ']',
    OP_BINPUT = 'q',
    OP_LONG_BINPUT = 'r',
    OP_SETITEM = 's',
    OP_TUPLE = 't',
    OP_EMPTY_TUPLE = ')',
    OP_SETITEMS = 'u',
    OP_PROTO = 0x80,
    OP_NEWOBJ = 0x81,
    OP_TUPLE1 = 0x85,
    OP_TUPLE2 = 0x86,
    OP_TUPLE3 = 0x87,
    OP_NEWTRUE = 0x88,
    OP_NEWFALSE = 0x89,
    OP_LONG1 = 0x8a,
    OP_LONG4 = 0x8b,
    OP_SHORT_BINUNICODE = 0x8c,
    OP_BINUNICODE8 = 0x8d,
    OP_BINBYTES8 = 0x8e,
    OP_EMPTY_SET = 0x8f,
    OP_ADDITEMS = 0x90,
    OP_STACK_GLOBAL = 0x93,
    OP_MEMOIZE = 0x94,
    OP_FRAME = 0x95,
};

/* Reads a k-byte little-endian argument into *v. */
static int arg(vm *m, int k, uint64_t *v) {
    if (need(m, (size_t)k) < 0) return -1;
    *v = rd_le(m, k);
    return 0;
}

/* A string or bytes opcode whose length is a k-byte argument (signed when `sign`). */
static int op_str(vm *m, vkind kind, int k, bool sign) {
    uint64_t len;
    if (arg(m, k, &len) < 0) return -1;
    if (sign && (len & 0x80000000u)) return vm_fail(m, "string with a negative length");
    return push_str(m, kind, (size_t)len);
}

static int op_mark(vm *m) {
    if (m->nmarks >= PT_MAX_MARKS) return vm_fail(m, "more than %zu nested MARKs", PT_MAX_MARKS);
    if (m->nmarks == m->capmarks) {
        m->capmarks = m->capmarks ? m->capmarks * 2 : 16;
        m->marks = twn_realloc(m->marks, m->capmarks * sizeof *m->marks);
    }
    m->marks[m->nmarks++] = m->sp;
    return 0;
}

static int op_tuple_n(vm *m, size_t k) {
    if (m->sp - fence(m) < k) return vm_fail(m, "stack underflow");
    pv *t = vm_new(m, V_TUPLE);
    if (!t) return -1;
    for (size_t i = m->sp - k; i < m->sp; i++)
        if (seq_push(m, t, m->stack[i]) < 0) return -1;
    m->sp -= k;
    return push(m, t);
}

static int op_append(vm *m) {
    pv *v = pop(m), *l = v ? top(m) : NULL;
    if (!l) return -1;
    if (l->kind != V_LIST) return vm_fail(m, "APPEND on a %s, expected a list", kname(l));
    return seq_push(m, l, v);
}

static int op_setitem(vm *m) {
    pv *v = pop(m), *k = v ? pop(m) : NULL, *d = k ? top(m) : NULL;
    if (!d) return -1;
    if (d->kind != V_DICT) return vm_fail(m, "SETITEM on a %s, expected a dict", kname(d));
    return seq_push(m, d, k) < 0 ? -1 : seq_push(m, d, v);
}

/* POP drops an item, or the MARK when no item is above it (as CPython does). */
static int op_pop(vm *m) {
    if (m->sp > fence(m))
        m->sp--;
    else if (m->nmarks)
        m->nmarks--;
    else
        return vm_fail(m, "POP on an empty stack");
    return 0;
}

static int op_pop_mark(vm *m) {
    size_t base = 0;
    if (pop_mark(m, &base) < 0) return -1;
    m->sp = base;
    return 0;
}

static int op_stack_global(vm *m) {
    pv *name = pop(m), *mod = name ? pop(m) : NULL;
    if (!mod) return -1;
    if (mod->kind != V_STR || name->kind != V_STR)
        return vm_fail(m, "STACK_GLOBAL needs two strings, got a %s and a %s", kname(mod),
                       kname(name));
    return resolve_global(m, mod->u.str.s, mod->u.str.n, name->u.str.s, name->u.str.n);
}

static int op_reduce(vm *m) {
    pv *args = pop(m), *fn = args ? pop(m) : NULL;
    return fn ? call(m, fn, args) : -1;
}

static int op_binfloat(vm *m) { /* the one big-endian argument in the format */
    if (need(m, 8) < 0) return -1;
    uint64_t u = 0;
    for (int i = 0; i < 8; i++) u = (u << 8) | m->p[m->pos++];
    pv *v = vm_new(m, V_FLOAT);
    if (!v) return -1;
    memcpy(&v->u.f, &u, 8);
    return push(m, v);
}

/* Executes one opcode; sets *stop and *result at STOP. */
static int vm_step(vm *m, bool *stop, pv **result) {
    m->op_pos = m->pos;
    if (m->pos >= m->n) return vm_fail(m, "truncated pickle: no STOP opcode");
    uint8_t op = m->p[m->pos++];
    uint64_t a;
    switch (op) {
    case OP_PROTO:
        if (arg(m, 1, &a) < 0) return -1;
        return a <= 5 ? 0 : vm_fail(m, "unsupported pickle protocol %u", (unsigned)a);
    case OP_FRAME: /* a length hint; the framed opcodes follow inline */
        return arg(m, 8, &a);
    case OP_STOP:
        *result = pop(m);
        *stop = *result != NULL;
        return *stop ? 0 : -1;

    case OP_NONE:
        return push(m, m->none);
    case OP_NEWTRUE:
        return push(m, m->yes);
    case OP_NEWFALSE:
        return push(m, m->no);
    case OP_BININT: {
        if (arg(m, 4, &a) < 0) return -1;
        uint32_t u = (uint32_t)a;
        int32_t x;
        memcpy(&x, &u, 4);
        return push_int(m, x);
    }
    case OP_BININT1:
        return arg(m, 1, &a) < 0 ? -1 : push_int(m, (int64_t)a);
    case OP_BININT2:
        return arg(m, 2, &a) < 0 ? -1 : push_int(m, (int64_t)a);
    case OP_LONG1:
        return arg(m, 1, &a) < 0 ? -1 : push_long(m, (size_t)a);
    case OP_LONG4:
        if (arg(m, 4, &a) < 0) return -1;
        return a & 0x80000000u ? vm_fail(m, "LONG4 with a negative length")
                               : push_long(m, (size_t)a);
    case OP_BINFLOAT:
        return op_binfloat(m);
    case OP_BINUNICODE:
        return op_str(m, V_STR, 4, false);
    case OP_SHORT_BINUNICODE:
        return op_str(m, V_STR, 1, false);
    case OP_BINUNICODE8:
        return op_str(m, V_STR, 8, false);
    case OP_SHORT_BINSTRING:
        return op_str(m, V_STR, 1, false);
    case OP_BINSTRING:
        return op_str(m, V_STR, 4, true);
    case OP_BINBYTES:
        return op_str(m, V_BYTES, 4, false);
    case OP_SHORT_BINBYTES:
        return op_str(m, V_BYTES, 1, false);
    case OP_BINBYTES8:
        return op_str(m, V_BYTES, 8, false);

    case OP_EMPTY_TUPLE:
        return push(m, vm_new(m, V_TUPLE));
    case OP_EMPTY_LIST:
        return push(m, vm_new(m, V_LIST));
    case OP_EMPTY_DICT:
        return push(m, vm_new(m, V_DICT));
    case OP_EMPTY_SET:
        return push(m, vm_new(m, V_SET));
    case OP_MARK:
        return op_mark(m);
    case OP_TUPLE:
        return collect(m, V_TUPLE);
    case OP_LIST:
        return collect(m, V_LIST);
    case OP_DICT:
        return collect(m, V_DICT);
    case OP_TUPLE1:
        return op_tuple_n(m, 1);
    case OP_TUPLE2:
        return op_tuple_n(m, 2);
    case OP_TUPLE3:
        return op_tuple_n(m, 3);
    case OP_APPEND:
        return op_append(m);
    case OP_APPENDS:
        return extend(m, V_LIST, "APPENDS");
    case OP_SETITEM:
        return op_setitem(m);
    case OP_SETITEMS:
        return extend(m, V_DICT, "SETITEMS");
    case OP_ADDITEMS:
        return extend(m, V_SET, "ADDITEMS");
    case OP_POP:
        return op_pop(m);
    case OP_POP_MARK:
        return op_pop_mark(m);
    case OP_DUP: {
        pv *t = top(m);
        return t ? push(m, t) : -1;
    }

    case OP_BINPUT:
        return arg(m, 1, &a) < 0 ? -1 : memo_put(m, a);
    case OP_LONG_BINPUT:
        return arg(m, 4, &a) < 0 ? -1 : memo_put(m, a);
    case OP_MEMOIZE:
        return memo_put(m, m->nmemo);
    case OP_BINGET:
        return arg(m, 1, &a) < 0 ? -1 : memo_get(m, a);
    case OP_LONG_BINGET:
        return arg(m, 4, &a) < 0 ? -1 : memo_get(m, a);

    case OP_GLOBAL:
        return op_global(m);
    case OP_STACK_GLOBAL:
        return op_stack_global(m);
    case OP_REDUCE:
    case OP_NEWOBJ:
        return op_reduce(m);
    case OP_BUILD: {
        /* State for the object below it: the state dict's `_metadata`, a parameter's
         * attributes.  Nothing this reader uses, so it is dropped. */
        pv *state = pop(m);
        return state && top(m) ? 0 : -1;
    }
    case OP_BINPERSID: {
        pv *pid = pop(m);
        return pid ? persistent_load(m, pid) : -1;
    }
    default:
        return vm_fail(m, "unknown or unsupported pickle opcode 0x%02x", op);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* From the unpickled object to tensors */

struct twn_pt_file {
    bool bare;
    twn_tensor *t;
    size_t n, cap;
    pt_view **views; /* while loading: the descriptor behind t[i] */
    void **bufs;     /* owned storage records and copies */
    size_t nbufs, capbufs;
    twn_strmap *index; /* name -> i */
};

typedef struct {
    uint8_t *buf;
    size_t len;
    bool kept; /* aliased by a tensor: owned by the file now */
} pt_rec;

typedef struct {
    const pt_zip *z;
    twn_pt_file *f;
    pt_rec *recs; /* indexed by zip entry; loaded on first use */
    size_t nrecs;
    size_t loaded_bytes, copied_bytes;
} pt_build;

static void file_own(twn_pt_file *f, void *buf) {
    if (f->nbufs == f->capbufs) {
        f->capbufs = f->capbufs ? f->capbufs * 2 : 16;
        f->bufs = twn_realloc(f->bufs, f->capbufs * sizeof *f->bufs);
    }
    f->bufs[f->nbufs++] = buf;
}

/* A later SETITEM with the same key replaces the value in place, as in a Python dict. */
static void file_add(twn_pt_file *f, const char *name, size_t nl, pt_view *v) {
    int64_t at;
    if (twn_strmap_get(f->index, name, nl, &at)) {
        f->views[at] = v;
        return;
    }
    if (f->n == f->cap) {
        f->cap = f->cap ? f->cap * 2 : 16;
        f->t = twn_realloc(f->t, f->cap * sizeof *f->t);
        f->views = twn_realloc(f->views, f->cap * sizeof *f->views);
    }
    memset(&f->t[f->n], 0, sizeof f->t[f->n]);
    f->t[f->n].name = twn_strndup(name, nl);
    f->views[f->n] = v;
    twn_strmap_put(f->index, name, nl, (int64_t)f->n);
    f->n++;
}

static bool is_contiguous(const pt_view *t) {
    int64_t want = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->size[d] != 1 && t->stride[d] != want) return false;
        want *= t->size[d];
    }
    return true;
}

/* Copies a strided view out in C order; every index was bounds-checked by rebuild_tensor. */
static void copy_strided(uint8_t *dst, const uint8_t *base, size_t es, const pt_view *t) {
    if (t->ndim == 0) {
        memcpy(dst, base, es);
        return;
    }
    int nd = t->ndim;
    int64_t idx[TWN_MAX_DIMS] = {0};
    int64_t inner = t->size[nd - 1], istride = t->stride[nd - 1];
    int64_t rows = t->numel / inner;
    for (int64_t r = 0; r < rows; r++) {
        int64_t off = 0;
        for (int d = 0; d < nd - 1; d++) off += idx[d] * t->stride[d];
        const uint8_t *s = base + (size_t)off * es;
        if (istride == 1) {
            memcpy(dst, s, (size_t)inner * es);
            dst += (size_t)inner * es;
        } else {
            for (int64_t j = 0; j < inner; j++, dst += es)
                memcpy(dst, s + (size_t)(j * istride) * es, es);
        }
        for (int d = nd - 2; d >= 0; d--) {
            if (++idx[d] < t->size[d]) break;
            idx[d] = 0;
        }
    }
}

static int materialize(pt_build *b, pt_view *t, const char *tname, twn_err *err) {
    if (t->done) return 0;
    const pt_zip *z = b->z;
    pt_storage *st = t->st;
    size_t es = twn_dtype_size(st->dtype);
    char pn[80], pk[80];
    if (tname[0])
        printable(tname, strlen(tname), pn, sizeof pn);
    else
        snprintf(pn, sizeof pn, "(bare tensor)");
    printable(st->key, strlen(st->key), pk, sizeof pk);
    pt_rec *rec = &b->recs[st->record];
    if (!rec->buf) {
        if (read_record(z, st->record, SIZE_MAX, &rec->buf, &rec->len, err) < 0)
            return twn_err_wrap(err, "tensor '%s'", pn);
        b->loaded_bytes += rec->len;
    }
    size_t st_bytes = (size_t)st->numel * es; /* fits: checked in persistent_load */
    if (rec->len < st_bytes)
        return twn_err_set(err,
                           "%s: tensor '%s': storage '%s' (%s/data/%s) has %zu bytes, but the "
                           "pickle declares %lld %s elements = %zu bytes",
                           z->name, pn, pk, z->prefix, pk, rec->len, (long long)st->numel,
                           twn_dtype_name(st->dtype), st_bytes);
    size_t nbytes = (size_t)t->numel * es;
    /* numel > 0 below: offset + the farthest stride step < st->numel, so base is in bounds */
    const uint8_t *base = t->numel ? rec->buf + (size_t)t->offset * es : rec->buf;
    if (t->numel == 0) {
        static const uint64_t empty = 0;
        t->data = &empty;
    } else if (is_contiguous(t)) {
        t->data = base;
        rec->kept = true;
    } else {
        size_t cap = b->loaded_bytes > (SIZE_MAX - PT_COPY_SLACK) / PT_COPY_FACTOR
                         ? SIZE_MAX
                         : b->loaded_bytes * PT_COPY_FACTOR + PT_COPY_SLACK;
        if (nbytes > cap - b->copied_bytes)
            return twn_err_set(err,
                               "%s: tensor '%s' is a strided view of %zu bytes; with the views "
                               "before it that exceeds %dx the %zu storage bytes read (+1 MiB), "
                               "the limit on stride-0/overlapping views",
                               z->name, pn, nbytes, PT_COPY_FACTOR, b->loaded_bytes);
        uint8_t *dst = twn_try_alloc(nbytes);
        if (!dst)
            return twn_err_set(err, "%s: cannot allocate %zu bytes for tensor '%s'", z->name,
                               nbytes, pn);
        copy_strided(dst, base, es, t);
        file_own(b->f, dst);
        b->copied_bytes += nbytes;
        t->data = dst;
    }
    t->nbytes = nbytes;
    t->done = true;
    return 0;
}

static int build_file(const pt_zip *z, pv *root, twn_pt_file *f, twn_err *err) {
    if (root->kind == V_TENSOR) {
        f->bare = true;
        file_add(f, "", 0, root->u.t);
    } else if (root->kind == V_DICT) {
        for (size_t i = 0; i + 1 < root->u.seq.n; i += 2) {
            const pv *k = root->u.seq.v[i], *v = root->u.seq.v[i + 1];
            if (v->kind != V_TENSOR) continue; /* ints, strings, nested containers: skipped */
            if (k->kind != V_STR)
                return twn_err_set(err, "%s: state dict key #%zu is a %s, expected a string",
                                   z->name, i / 2, kname(k));
            if (memchr(k->u.str.s, 0, k->u.str.n))
                return twn_err_set(err, "%s: state dict key #%zu contains a NUL byte", z->name,
                                   i / 2);
            file_add(f, k->u.str.s, k->u.str.n, v->u.t);
        }
    } else {
        return twn_err_set(err,
                           "%s: the pickle's top-level object is a %s; expected a state dict "
                           "(dict or OrderedDict of tensors) or a tensor",
                           z->name, kname(root));
    }

    zip_int64_t nent = zip_get_num_entries(z->za, 0);
    pt_build b = {.z = z, .f = f, .nrecs = nent > 0 ? (size_t)nent : 0};
    b.recs = twn_calloc(b.nrecs ? b.nrecs : 1, sizeof *b.recs);
    int rc = 0;
    for (size_t i = 0; i < f->n && rc == 0; i++) {
        pt_view *v = f->views[i];
        rc = materialize(&b, v, f->t[i].name, err);
        if (rc < 0) break;
        twn_tensor *t = &f->t[i];
        t->dtype = v->st->dtype;
        t->ndim = v->ndim;
        memcpy(t->shape, v->size, sizeof v->size);
        t->data = v->data;
        t->nbytes = v->nbytes;
    }
    for (size_t i = 0; i < b.nrecs; i++) {
        if (b.recs[i].kept)
            file_own(f, b.recs[i].buf);
        else
            twn_free(b.recs[i].buf);
    }
    twn_free(b.recs);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Reader entry points */

void twn_pt_free(twn_pt_file *f) {
    if (!f) return;
    for (size_t i = 0; i < f->n; i++) twn_free((char *)f->t[i].name);
    for (size_t i = 0; i < f->nbufs; i++) twn_free(f->bufs[i]);
    twn_free(f->t);
    twn_free(f->views);
    twn_free(f->bufs);
    if (f->index) twn_strmap_free(f->index);
    twn_free(f);
}

/* Runs data.pkl (or `pkl`) and materializes the tensors; z->za is open, z->prefix unset. */
static int load_archive(pt_zip *z, const void *pkl, size_t pkl_len, twn_pt_file **out,
                        twn_err *err) {
    zip_uint64_t pkl_idx = 0;
    if (find_data_pkl(z, &pkl_idx, err) < 0 || check_byteorder(z, err) < 0) return -1;
    uint8_t *own = NULL;
    if (!pkl) {
        if (read_record(z, pkl_idx, PT_MAX_PICKLE_BYTES, &own, &pkl_len, err) < 0) return -1;
        pkl = own;
    }
    vm m = {.z = z, .err = err, .p = pkl, .n = pkl_len};
    twn_pt_file *f = NULL;
    pv *root = NULL;
    bool stop = false;
    int rc = -1;
    if (!(m.none = vm_new(&m, V_NONE)) || !(m.yes = vm_new(&m, V_BOOL)) ||
        !(m.no = vm_new(&m, V_BOOL)))
        goto done;
    m.yes->u.i = 1;
    while (!stop)
        if (vm_step(&m, &stop, &root) < 0) goto done;
    f = twn_calloc(1, sizeof *f);
    f->index = twn_strmap_new(16);
    if (build_file(z, root, f, err) < 0) goto done;
    twn_free(f->views);
    f->views = NULL;
    *out = f;
    f = NULL;
    rc = 0;
done:
    twn_pt_free(f);
    vm_free(&m);
    twn_free(own);
    return rc;
}

static int check_magic(const void *head, size_t n, const char *name, twn_err *err) {
    if (n >= 4 && !memcmp(head, "PK\x03\x04", 4)) return 0;
    if (n >= 2 && ((const uint8_t *)head)[0] == 0x80)
        return twn_err_set(err,
                           "%s: not a zip archive but a raw pickle: the legacy (torch < 1.6) "
                           "torch.save format is not supported; re-save it with a newer torch",
                           name);
    return twn_err_set(err, "%s: not a zip archive (no PK\\3\\4 signature at offset 0)", name);
}

static int open_mem(const void *data, size_t len, const char *name, zip_t **za, twn_err *err) {
    if (check_magic(data, len, name, err) < 0) return -1;
    zip_error_t ze;
    zip_error_init(&ze);
    zip_source_t *src = zip_source_buffer_create(data, len, 0, &ze);
    if (src && !(*za = zip_open_from_source(src, ZIP_RDONLY, &ze))) zip_source_free(src);
    int rc = src && *za ? 0
                        : twn_err_set(err, "%s: not a readable zip archive: %s", name,
                                      zip_error_strerror(&ze));
    zip_error_fini(&ze);
    return rc;
}

int twn_pt_load_mem_pickle(const void *zip, size_t zip_len, const void *pkl, size_t pkl_len,
                           const char *name, twn_pt_file **out, twn_err *err) {
    *out = NULL;
    pt_zip z = {.name = name, .archive_bytes = zip_len};
    if (open_mem(zip, zip_len, name, &z.za, err) < 0) return -1;
    int rc = load_archive(&z, pkl ? pkl : "", pkl ? pkl_len : 0, out, err);
    zip_discard(z.za);
    twn_free(z.prefix);
    return rc;
}

int twn_pt_load_mem(const void *data, size_t len, const char *name, twn_pt_file **out,
                    twn_err *err) {
    *out = NULL;
    pt_zip z = {.name = name, .archive_bytes = len};
    if (open_mem(data, len, name, &z.za, err) < 0) return -1;
    int rc = load_archive(&z, NULL, 0, out, err);
    zip_discard(z.za);
    twn_free(z.prefix);
    return rc;
}

int twn_pt_load(const char *path, twn_pt_file **out, twn_err *err) {
    *out = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp) return twn_err_errno(err, "cannot open %s", path);
    uint8_t head[4];
    size_t got = fread(head, 1, sizeof head, fp);
    struct stat sb;
    int st_ok = fstat(fileno(fp), &sb) == 0;
    fclose(fp);
    if (check_magic(head, got, path, err) < 0) return -1;
    if (!st_ok) return twn_err_errno(err, "cannot stat %s", path);
    int zerr = 0;
    pt_zip z = {.name = path, .archive_bytes = (size_t)sb.st_size};
    if (!(z.za = zip_open(path, ZIP_RDONLY, &zerr))) {
        zip_error_t ze;
        zip_error_init_with_code(&ze, zerr);
        twn_err_set(err, "%s: not a readable zip archive: %s", path, zip_error_strerror(&ze));
        zip_error_fini(&ze);
        return -1;
    }
    int rc = load_archive(&z, NULL, 0, out, err);
    zip_discard(z.za);
    twn_free(z.prefix);
    return rc;
}

size_t twn_pt_count(const twn_pt_file *f) {
    return f->n;
}

const twn_tensor *twn_pt_at(const twn_pt_file *f, size_t i) {
    return i < f->n ? &f->t[i] : NULL;
}

const twn_tensor *twn_pt_find(const twn_pt_file *f, const char *name) {
    int64_t i;
    return twn_strmap_get(f->index, name, strlen(name), &i) ? &f->t[i] : NULL;
}

bool twn_pt_is_bare(const twn_pt_file *f) {
    return f->bare;
}

/* ------------------------------------------------------------------------------------------ */
/* Writer: the pickle.  Mirrors CPython's Pickler at protocol 2 on torch.save's objects: every
 * memoizable object (strings, globals, non-empty tuples, reduced objects) gets the next BINPUT
 * index, and a second save of the same object — the OrderedDict and _rebuild_tensor_v2 globals,
 * the 'storage' and 'cpu' constants, a storage class — is a BINGET. */

typedef struct {
    twn_str s;
    uint32_t memo;
    long g_odict, g_rebuild, s_storage, s_cpu; /* memo indices, -1 until first saved */
    long g_class[N_GLOBALS];
} pkw;

static void pk_bytes(pkw *w, const void *p, size_t n) {
    twn_str_append(&w->s, p, n);
}

static void pk_op(pkw *w, uint8_t op) {
    pk_bytes(w, &op, 1);
}

static void pk_u32(pkw *w, uint32_t v) {
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    pk_bytes(w, b, 4);
}

static long pk_put(pkw *w) {
    uint32_t i = w->memo++;
    if (i < 256) {
        uint8_t b[2] = {OP_BINPUT, (uint8_t)i};
        pk_bytes(w, b, 2);
    } else {
        pk_op(w, OP_LONG_BINPUT);
        pk_u32(w, i);
    }
    return (long)i;
}

static void pk_get(pkw *w, long i) {
    if (i < 256) {
        uint8_t b[2] = {OP_BINGET, (uint8_t)i};
        pk_bytes(w, b, 2);
    } else {
        pk_op(w, OP_LONG_BINGET);
        pk_u32(w, (uint32_t)i);
    }
}

/* pickle.py save_long: BININT1 / BININT2 / BININT, else LONG1 with the shortest two's
 * complement encoding. */
static void pk_int(pkw *w, int64_t v) {
    if (v >= 0 && v <= 0xff) {
        uint8_t b[2] = {OP_BININT1, (uint8_t)v};
        pk_bytes(w, b, 2);
    } else if (v >= 0 && v <= 0xffff) {
        uint8_t b[3] = {OP_BININT2, (uint8_t)v, (uint8_t)(v >> 8)};
        pk_bytes(w, b, 3);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
        pk_op(w, OP_BININT);
        pk_u32(w, (uint32_t)(int32_t)v);
    } else {
        uint64_t u;
        memcpy(&u, &v, 8);
        uint8_t b[8];
        int n = 8;
        for (int i = 0; i < 8; i++) b[i] = (uint8_t)(u >> (8 * i));
        /* drop redundant sign bytes */
        while (n > 1 &&
               ((b[n - 1] == 0 && !(b[n - 2] & 0x80)) || (b[n - 1] == 0xff && (b[n - 2] & 0x80))))
            n--;
        uint8_t hdr[2] = {OP_LONG1, (uint8_t)n};
        pk_bytes(w, hdr, 2);
        pk_bytes(w, b, (size_t)n);
    }
}

static long pk_str(pkw *w, const char *s) {
    size_t n = strlen(s);
    pk_op(w, OP_BINUNICODE);
    pk_u32(w, (uint32_t)n);
    pk_bytes(w, s, n);
    return pk_put(w);
}

static long pk_global(pkw *w, const char *mod, const char *name) {
    pk_op(w, OP_GLOBAL);
    twn_str_printf(&w->s, "%s\n%s\n", mod, name);
    return pk_put(w);
}

static void pk_saved_global(pkw *w, long *memo, const char *mod, const char *name) {
    if (*memo >= 0)
        pk_get(w, *memo);
    else
        *memo = pk_global(w, mod, name);
}

static void pk_int_tuple(pkw *w, const int64_t *v, int n) {
    static const uint8_t tuple_n[4] = {OP_EMPTY_TUPLE, OP_TUPLE1, OP_TUPLE2, OP_TUPLE3};
    if (n == 0) {
        pk_op(w, OP_EMPTY_TUPLE); /* the empty tuple is never memoized */
        return;
    }
    if (n > 3) pk_op(w, OP_MARK);
    for (int i = 0; i < n; i++) pk_int(w, v[i]);
    pk_op(w, n > 3 ? OP_TUPLE : tuple_n[n]);
    pk_put(w);
}

static size_t storage_class(twn_dtype dt) {
    for (size_t i = 0; i < N_GLOBALS; i++)
        if (globals[i].kind == G_STORAGE && globals[i].dtype == dt) return i;
    return N_GLOBALS;
}

/* _rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict()) with the storage as
 * BINPERSID ('storage', torch.<Type>Storage, key, 'cpu', numel). */
static void pk_tensor(pkw *w, const twn_tensor *t, size_t key) {
    int64_t stride[TWN_MAX_DIMS], acc = 1, numel = twn_tensor_numel(t);
    for (int d = t->ndim - 1; d >= 0; d--) { /* torch's contiguous strides: size 0 counts as 1 */
        stride[d] = acc;
        acc *= t->shape[d] > 1 ? t->shape[d] : 1;
    }
    size_t cls = storage_class(t->dtype);
    char keybuf[32];
    snprintf(keybuf, sizeof keybuf, "%zu", key);

    pk_saved_global(w, &w->g_rebuild, "torch._utils", "_rebuild_tensor_v2");
    pk_op(w, OP_MARK);
    pk_op(w, OP_MARK);
    if (w->s_storage >= 0)
        pk_get(w, w->s_storage);
    else
        w->s_storage = pk_str(w, "storage");
    pk_saved_global(w, &w->g_class[cls], "torch", globals[cls].name);
    pk_str(w, keybuf);
    if (w->s_cpu >= 0)
        pk_get(w, w->s_cpu);
    else
        w->s_cpu = pk_str(w, "cpu");
    pk_int(w, numel);
    pk_op(w, OP_TUPLE);
    pk_put(w);
    pk_op(w, OP_BINPERSID);
    pk_int(w, 0);
    pk_int_tuple(w, t->shape, t->ndim);
    pk_int_tuple(w, stride, t->ndim);
    pk_op(w, OP_NEWFALSE);
    pk_saved_global(w, &w->g_odict, "collections", "OrderedDict");
    pk_op(w, OP_EMPTY_TUPLE);
    pk_op(w, OP_REDUCE);
    pk_put(w);
    pk_op(w, OP_TUPLE);
    pk_put(w);
    pk_op(w, OP_REDUCE);
    pk_put(w);
}

static void pk_file(pkw *w, const twn_tensor *ts, size_t n, bool bare) {
    w->g_odict = w->g_rebuild = w->s_storage = w->s_cpu = -1;
    for (size_t i = 0; i < N_GLOBALS; i++) w->g_class[i] = -1;
    pk_op(w, OP_PROTO);
    pk_op(w, 2);
    if (bare) {
        pk_tensor(w, &ts[0], 0);
    } else {
        w->g_odict = pk_global(w, "collections", "OrderedDict");
        pk_op(w, OP_EMPTY_TUPLE);
        pk_op(w, OP_REDUCE);
        pk_put(w);
        /* pickle.py _batch_setitems: batches of 1000, MARK..SETITEMS, or SETITEM for one */
        for (size_t b = 0; b < n; b += 1000) {
            size_t e = n - b < 1000 ? n : b + 1000;
            if (e - b > 1) pk_op(w, OP_MARK);
            for (size_t i = b; i < e; i++) {
                pk_str(w, ts[i].name);
                pk_tensor(w, &ts[i], i);
            }
            pk_op(w, e - b > 1 ? OP_SETITEMS : OP_SETITEM);
        }
    }
    pk_op(w, OP_STOP);
}

/* ------------------------------------------------------------------------------------------ */
/* Writer: the zip */

static int check_tensors(const char *what, const twn_tensor *ts, size_t n, bool bare,
                         twn_err *err) {
    if (bare && n != 1)
        return twn_err_set(err, "%s: a bare-tensor .pt holds exactly one tensor, got %zu", what, n);
    for (size_t i = 0; i < n; i++) {
        const twn_tensor *t = &ts[i];
        const char *nm = t->name ? t->name : "?";
        if (!bare && !t->name) return twn_err_set(err, "%s: tensor #%zu has no name", what, i);
        if (storage_class(t->dtype) == N_GLOBALS)
            return twn_err_set(err,
                               "%s: tensor '%s' has dtype %s, which has no torch storage class",
                               what, nm, twn_dtype_name(t->dtype));
        if (t->ndim < 0 || t->ndim > TWN_MAX_DIMS)
            return twn_err_set(err, "%s: tensor '%s' has %d dimensions", what, nm, t->ndim);
        int64_t numel = 1;
        bool ovf = false;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0)
                return twn_err_set(err, "%s: tensor '%s' has a negative dimension", what, nm);
            ovf |= __builtin_mul_overflow(numel, t->shape[d], &numel);
        }
        size_t bytes;
        if (ovf || twn_mul_size((size_t)numel, twn_dtype_size(t->dtype), &bytes) < 0 ||
            bytes != t->nbytes)
            return twn_err_set(err, "%s: tensor '%s' has %zu bytes, expected numel x %zu", what, nm,
                               t->nbytes, twn_dtype_size(t->dtype));
        if (bytes && !t->data) return twn_err_set(err, "%s: tensor '%s' has no data", what, nm);
    }
    return 0;
}

/* Adds one stored record whose data will start on a PT_ALIGN boundary, given `*cursor`, the
 * offset at which libzip will write its local header (records are written in index order,
 * local header = 30 bytes + name + extra fields, no data descriptor; libzip 1.7's
 * _zip_dirent_write adds a 20-byte ZIP64 extra of its own to the local header of a record over
 * 4 GiB, which the prediction includes).  Checked by test_ptfile for small files; for records
 * over 4 GiB it rests on that reading of libzip, and a miss only costs alignment (torch.load
 * needs it only for mmap=True). */
static int add_record(zip_t *za, const char *what, const char *name, const void *data, size_t len,
                      uint64_t *cursor, twn_err *err) {
    uint8_t pad[PT_ALIGN];
    memset(pad, 'Z', sizeof pad); /* caffe2 fills its padding with 'Z' */
    uint64_t start = *cursor + PT_ZIP_LOCAL_HDR + strlen(name) + 4 /* our extra's header */;
    if (len > 0xffffffffu) start += 20; /* libzip's local ZIP64 extra: id, len, 2 x u64 */
    uint16_t npad = (uint16_t)((PT_ALIGN - start % PT_ALIGN) % PT_ALIGN);
    zip_source_t *src = zip_source_buffer(za, data, len, 0);
    zip_int64_t idx = src ? zip_file_add(za, name, src, ZIP_FL_ENC_UTF_8) : -1;
    if (idx < 0) {
        if (src) zip_source_free(src);
        return twn_err_set(err, "%s: cannot add record %s: %s", what, name, zip_strerror(za));
    }
    if (zip_set_file_compression(za, (zip_uint64_t)idx, ZIP_CM_STORE, 0) < 0 ||
        zip_file_extra_field_set(za, (zip_uint64_t)idx, PT_PAD_ID, ZIP_EXTRA_FIELD_NEW, pad, npad,
                                 ZIP_FL_LOCAL) < 0 ||
        zip_file_set_mtime(za, (zip_uint64_t)idx, (time_t)946684800 /* 2000-01-01 */, 0) < 0)
        return twn_err_set(err, "%s: cannot set up record %s: %s", what, name, zip_strerror(za));
    *cursor = start + npad + len;
    return 0;
}

/* Adds torch.save's records to `za` and closes it (discarding it on failure). */
static int write_archive(zip_t *za, const char *what, const char *stem, const twn_tensor *ts,
                         size_t n, bool bare, twn_err *err) {
    pkw w = {0};
    pk_file(&w, ts, n, bare);
    uint64_t cursor = 0;
    twn_str nm = {0};
    int rc = 0;
#define ADD(rel, data, len)                                                                        \
    do {                                                                                           \
        twn_str_reset(&nm);                                                                        \
        twn_str_printf(&nm, "%s/%s", stem, rel);                                                   \
        if (rc == 0) rc = add_record(za, what, nm.v, data, len, &cursor, err);                     \
    } while (0)
    ADD("data.pkl", w.s.v, w.s.n);
    ADD(".format_version", "1", 1);
    ADD(".storage_alignment", "64", 2);
    ADD("byteorder", "little", 6);
    for (size_t i = 0; i < n && rc == 0; i++) {
        char rel[40];
        snprintf(rel, sizeof rel, "data/%zu", i);
        ADD(rel, ts[i].data, ts[i].nbytes);
    }
    ADD("version", "3\n", 2);
#undef ADD
    if (rc == 0 && zip_close(za) < 0)
        rc = twn_err_set(err, "%s: cannot write the zip archive: %s", what, zip_strerror(za));
    else if (rc == 0)
        za = NULL;
    if (za) zip_discard(za);
    twn_str_free(&nm);
    twn_str_free(&w.s);
    return rc;
}

int twn_pt_write(const char *path, const twn_tensor *tensors, size_t n, bool bare, twn_err *err) {
    if (check_tensors(path, tensors, n, bare, err) < 0) return -1;
    /* archive name = file stem, as PyTorchStreamWriter does */
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    const char *dot = strrchr(base, '.');
    size_t sl = dot && dot != base ? (size_t)(dot - base) : strlen(base);
    char *stem = sl ? twn_strndup(base, sl) : twn_strdup("archive");
    int zerr = 0;
    zip_t *za = zip_open(path, ZIP_CREATE | ZIP_TRUNCATE, &zerr);
    int rc;
    if (!za) {
        zip_error_t ze;
        zip_error_init_with_code(&ze, zerr);
        rc = twn_err_set(err, "cannot create %s: %s", path, zip_error_strerror(&ze));
        zip_error_fini(&ze);
    } else {
        rc = write_archive(za, path, stem, tensors, n, bare, err);
    }
    twn_free(stem);
    return rc;
}

int twn_pt_write_mem(const twn_tensor *tensors, size_t n, bool bare, void **data, size_t *len,
                     twn_err *err) {
    const char *what = "<memory .pt>";
    if (check_tensors(what, tensors, n, bare, err) < 0) return -1;
    zip_error_t ze;
    zip_error_init(&ze);
    zip_source_t *src = zip_source_buffer_create(NULL, 0, 0, &ze);
    zip_t *za = NULL;
    if (src) {
        zip_source_keep(src);
        if (!(za = zip_open_from_source(src, ZIP_TRUNCATE, &ze))) zip_source_free(src);
    }
    if (!za) {
        twn_err_set(err, "%s: cannot create a zip in memory: %s", what, zip_error_strerror(&ze));
        zip_error_fini(&ze);
        if (src) zip_source_free(src);
        return -1;
    }
    zip_error_fini(&ze);
    if (write_archive(za, what, "archive", tensors, n, bare, err) < 0) {
        zip_source_free(src);
        return -1;
    }
    int rc = -1;
    zip_int64_t size = -1;
    if (zip_source_open(src) == 0) {
        if (zip_source_seek(src, 0, SEEK_END) == 0 && (size = zip_source_tell(src)) >= 0 &&
            zip_source_seek(src, 0, SEEK_SET) == 0) {
            uint8_t *buf = twn_malloc((size_t)size + 1);
            if (zip_source_read(src, buf, (zip_uint64_t)size) == size) {
                *data = buf;
                *len = (size_t)size;
                rc = 0;
            } else {
                twn_free(buf);
            }
        }
        zip_source_close(src);
    }
    if (rc < 0) twn_err_set(err, "%s: cannot read back the zip written in memory", what);
    zip_source_free(src);
    return rc;
}
