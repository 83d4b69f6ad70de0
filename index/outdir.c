/* outdir.c — writing and reading the §4 index output directory (see outdir.h).
 *
 * Reading streams items.jsonl, embeddings.npy and faiss_ids.npy in lockstep, row by row, so a
 * shard is loaded with one copy of its vectors in memory (the store's), not two. */
#include "index/outdir.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util/fileio.h"
#include "util/mem.h"
#include "util/npy.h"
#include "util/vec.h"

#define F_MANIFEST   "manifest.json"
#define F_INDEX      "index.faiss"
#define F_EMBEDDINGS "embeddings.npy"
#define F_FIDS       "faiss_ids.npy"
#define F_ITEMS      "items.jsonl"

int twn_fsync_dir(const char *dir, twn_err *err) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return twn_err_errno(err, "cannot open directory %s", dir);
    int rc = fsync(fd);
    close(fd);
    return rc ? twn_err_errno(err, "cannot fsync directory %s", dir) : 0;
}

static int fsync_path(const char *path, twn_err *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return twn_err_errno(err, "cannot open %s", path);
    int rc = fsync(fd);
    close(fd);
    return rc ? twn_err_errno(err, "cannot fsync %s", path) : 0;
}

int twn_outdir_remove(const char *dir, twn_err *err) {
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : twn_err_errno(err, "cannot open directory %s", dir);
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *p = twn_path_join(dir, e->d_name);
        if (unlink(p) != 0 && errno != ENOENT) rc = twn_err_errno(err, "cannot delete %s", p);
        twn_free(p);
    }
    closedir(d);
    if (!rc && rmdir(dir) != 0 && errno != ENOENT) rc = twn_err_errno(err, "cannot remove %s", dir);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Writing

static json_t *item_json(const twn_store_row *r) {
    json_t *o = json_object();
    json_object_set_new(o, "id", json_stringn(r->id, r->id_len));
    json_object_set_new(o, "faiss_id", json_integer((json_int_t)r->faiss_id));
    json_object_set_new(o, "route", json_string(twn_route_name(r->route)));
    json_object_set_new(o, "p_think", isnan(r->p_think) ? json_null() : json_real(r->p_think));
    json_object_set_new(o, "think_tokens", json_integer((json_int_t)r->think_tokens));
    return o;
}

static int write_items(const char *path, const twn_store *st, twn_err *err) {
    FILE *f = fopen(path, "wb");
    if (!f) return twn_err_errno(err, "cannot create %s", path);
    int64_t n = twn_store_count(st);
    for (int64_t i = 0; i < n; i++) {
        twn_store_row r;
        twn_store_get(st, i, &r);
        json_t *o = item_json(&r);
        char *line = json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(9));
        json_decref(o);
        int bad = !line || fputs(line, f) < 0 || fputc('\n', f) == EOF;
        free(line);
        if (bad) {
            fclose(f);
            return twn_err_errno(err, "cannot write %s", path);
        }
    }
    if (fflush(f) || fsync(fileno(f))) {
        fclose(f);
        return twn_err_errno(err, "cannot sync %s", path);
    }
    return fclose(f) ? twn_err_errno(err, "cannot close %s", path) : 0;
}

static int write_npys(const char *dir, const twn_store *st, twn_err *err) {
    int64_t n = twn_store_count(st);
    int dim = twn_store_dim(st);
    char *pe = twn_path_join(dir, F_EMBEDDINGS), *pf = twn_path_join(dir, F_FIDS);
    twn_npy w;
    int rc = twn_npy_open(&w, pe, "<f2", 2, dim, err);
    if (!rc && n) rc = twn_npy_append(&w, twn_store_vectors(st), n, err);
    if (twn_npy_close(&w, rc ? NULL : err)) rc = -1;
    if (!rc) {
        int64_t *fids = twn_malloc((size_t)(n ? n : 1) * sizeof *fids);
        for (int64_t i = 0; i < n; i++) {
            twn_store_row r;
            twn_store_get(st, i, &r);
            fids[i] = r.faiss_id;
        }
        rc = twn_npy_open(&w, pf, "<i8", 8, 1, err);
        if (!rc && n) rc = twn_npy_append(&w, fids, n, err);
        if (twn_npy_close(&w, rc ? NULL : err)) rc = -1;
        twn_free(fids);
    }
    twn_free(pe);
    twn_free(pf);
    return rc;
}

static int write_manifest(const char *path, const twn_outdir_meta *m, const twn_store *st,
                          const FaissIndex *index, twn_err *err) {
    int64_t t = m->created_unix ? m->created_unix : (int64_t)time(NULL);
    struct tm tm;
    time_t tt = (time_t)t;
    gmtime_r(&tt, &tm);
    char iso[32];
    strftime(iso, sizeof iso, "%Y-%m-%dT%H:%M:%SZ", &tm);
    json_t *o = json_object();
    json_object_set_new(o, "format", json_string(TWN_OUTDIR_FORMAT));
    json_object_set_new(o, "format_version", json_integer(1));
    json_object_set_new(o, "model", json_string(m->model));
    json_object_set_new(o, "model_manifest_sha256", json_string(m->model_hash));
    json_object_set_new(o, "factory", json_string(m->factory));
    json_object_set_new(o, "index_description", json_string(m->index_description));
    json_object_set_new(o, "metric", json_string("inner_product"));
    json_object_set_new(o, "dim", json_integer(twn_store_dim(st)));
    json_object_set_new(o, "count", json_integer((json_int_t)twn_store_count(st)));
    json_object_set_new(o, "index_ntotal", json_integer((json_int_t)faiss_Index_ntotal(index)));
    json_object_set_new(o, "trained", json_boolean(faiss_Index_is_trained(index)));
    json_object_set_new(o, "wal_seq", json_integer((json_int_t)m->wal_seq));
    json_object_set_new(o, "shard", json_integer(m->shard));
    json_object_set_new(o, "n_shards", json_integer(m->n_shards));
    json_object_set_new(o, "created_unix", json_integer((json_int_t)t));
    json_object_set_new(o, "created", json_string(iso));
    json_object_set_new(o, "embeddings_dtype", json_string("float16"));
    json_t *files = json_object();
    json_object_set_new(files, "index", json_string(F_INDEX));
    json_object_set_new(files, "embeddings", json_string(F_EMBEDDINGS));
    json_object_set_new(files, "faiss_ids", json_string(F_FIDS));
    json_object_set_new(files, "items", json_string(F_ITEMS));
    json_object_set_new(o, "files", files);
    char *text = json_dumps(o, JSON_INDENT(2));
    json_decref(o);
    if (!text)
        return twn_err_set(err, "cannot encode %s (invalid UTF-8 in model or factory?)", path);
    size_t n = strlen(text);
    twn_str buf = {0};
    twn_str_append(&buf, text, n);
    twn_str_puts(&buf, "\n");
    free(text);
    int rc = twn_write_file_atomic(path, buf.v, buf.n, err);
    twn_str_free(&buf);
    return rc;
}

int twn_outdir_write(const char *dir, const twn_store *st, const FaissIndex *index,
                     const twn_outdir_meta *meta, twn_err *err) {
    if (twn_mkdirs(dir, err)) return -1;
    char *pi = twn_path_join(dir, F_INDEX), *pj = twn_path_join(dir, F_ITEMS),
         *pm = twn_path_join(dir, F_MANIFEST);
    int rc = write_npys(dir, st, err);
    if (!rc) rc = write_items(pj, st, err);
    if (!rc && faiss_write_index_fname(index, pi) != 0)
        rc = twn_err_set(err, "cannot write %s: %s", pi, faiss_get_last_error());
    if (!rc) rc = fsync_path(pi, err);
    if (!rc) rc = write_manifest(pm, meta, st, index, err); /* last: it describes the others */
    if (!rc) rc = twn_fsync_dir(dir, err);
    twn_free(pi);
    twn_free(pj);
    twn_free(pm);
    return rc;
}

int twn_outdir_publish(const char *dir, const twn_store *st, const FaissIndex *index,
                       const twn_outdir_meta *meta, twn_err *err) {
    char tmp[4200], old[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", dir, (int)getpid());
    snprintf(old, sizeof old, "%s.old.%d", dir, (int)getpid());
    if (twn_outdir_remove(tmp, err) || twn_outdir_write(tmp, st, index, meta, err)) return -1;
    int moved = 0;
    if (twn_path_exists(dir)) {
        if (rename(dir, old) != 0)
            return twn_err_errno(err, "cannot move %s aside to %s", dir, old);
        moved = 1;
    }
    if (rename(tmp, dir) != 0) {
        twn_err_errno(err, "cannot rename %s to %s", tmp, dir);
        if (moved) rename(old, dir);
        return -1;
    }
    char *parent = twn_path_dirname(dir);
    int rc = twn_fsync_dir(parent, err);
    twn_free(parent);
    if (!rc && moved) rc = twn_outdir_remove(old, err);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Reading

/* Parses a .npy header from f: descr, fortran order, shape (1-D or 2-D).  Leaves f at the data. */
static int npy_header(FILE *f, const char *path, char descr[16], int64_t shape[2], int *ndim,
                      twn_err *err) {
    unsigned char pre[12];
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0)
        return twn_err_set(err, "%s: not a .npy file (bad magic)", path);
    size_t hlen;
    if (pre[6] == 1)
        hlen = (size_t)pre[8] | (size_t)pre[9] << 8;
    else if (pre[6] == 2 || pre[6] == 3) {
        if (fread(pre + 10, 1, 2, f) != 2) return twn_err_set(err, "%s: truncated header", path);
        hlen = (size_t)pre[8] | (size_t)pre[9] << 8 | (size_t)pre[10] << 16 | (size_t)pre[11] << 24;
    } else
        return twn_err_set(err, "%s: .npy version %u, expected 1, 2 or 3", path, pre[6]);
    if (hlen > 65536) return twn_err_set(err, "%s: .npy header of %zu bytes", path, hlen);
    char *h = twn_malloc(hlen + 1);
    if (fread(h, 1, hlen, f) != hlen) {
        twn_free(h);
        return twn_err_set(err, "%s: truncated .npy header", path);
    }
    h[hlen] = 0;
    int rc = 0;
    const char *d = strstr(h, "'descr':"), *fo = strstr(h, "'fortran_order':"),
               *sh = strstr(h, "'shape':");
    descr[0] = 0;
    if (d) sscanf(d + 8, " '%15[^']'", descr);
    if (!d || !descr[0] || !fo || !sh)
        rc = twn_err_set(err, "%s: cannot parse .npy header %s", path, h);
    else if (strncmp(fo + 16 + strspn(fo + 16, " "), "False", 5) != 0)
        rc = twn_err_set(err, "%s: fortran_order arrays are not supported", path);
    else {
        const char *p = strchr(sh, '(');
        *ndim = 0;
        while (p && *ndim < 3) {
            p++;
            while (*p == ' ') p++;
            if (*p == ')') break;
            char *end;
            long long v = strtoll(p, &end, 10);
            if (end == p || v < 0) break;
            if (*ndim < 2) shape[*ndim] = v;
            (*ndim)++;
            p = end;
            while (*p == ' ') p++;
            if (*p != ',') break;
        }
        if (*ndim < 1 || *ndim > 2)
            rc = twn_err_set(err, "%s: shape in %s is not 1-D or 2-D", path, h);
        if (*ndim == 1) shape[1] = 1;
    }
    twn_free(h);
    return rc;
}

static int get_str(json_t *o, const char *key, char *dst, size_t cap, const char *path,
                   twn_err *err) {
    json_t *v = json_object_get(o, key);
    if (!json_is_string(v))
        return twn_err_set(err, "%s: \"%s\" is missing or not a string", path, key);
    snprintf(dst, cap, "%s", json_string_value(v));
    return 0;
}

static int get_int(json_t *o, const char *key, int64_t *dst, const char *path, twn_err *err) {
    json_t *v = json_object_get(o, key);
    if (!json_is_integer(v))
        return twn_err_set(err, "%s: \"%s\" is missing or not an integer", path, key);
    *dst = (int64_t)json_integer_value(v);
    return 0;
}

static int read_manifest(const char *path, twn_outdir_meta *m, twn_err *err) {
    json_error_t je;
    json_t *o = json_load_file(path, 0, &je);
    if (!o) return twn_err_set(err, "%s:%d: %s", path, je.line, je.text);
    memset(m, 0, sizeof *m);
    char fmt[64] = "";
    int64_t ver = 0, dim = 0, shard = 0, nsh = 0, wal = 0, created = 0;
    int rc = 0;
    if (get_str(o, "format", fmt, sizeof fmt, path, err) ||
        get_int(o, "format_version", &ver, path, err))
        rc = -1;
    else if (strcmp(fmt, TWN_OUTDIR_FORMAT) != 0 || ver != 1)
        rc = twn_err_set(err, "%s: format \"%s\" version %lld, expected \"%s\" version 1", path,
                         fmt, (long long)ver, TWN_OUTDIR_FORMAT);
    else if (get_str(o, "model", m->model, sizeof m->model, path, err) ||
             get_str(o, "model_manifest_sha256", m->model_hash, sizeof m->model_hash, path, err) ||
             get_str(o, "factory", m->factory, sizeof m->factory, path, err) ||
             get_str(o, "index_description", m->index_description, sizeof m->index_description,
                     path, err) ||
             get_int(o, "dim", &dim, path, err) || get_int(o, "count", &m->count, path, err) ||
             get_int(o, "index_ntotal", &m->index_ntotal, path, err) ||
             get_int(o, "wal_seq", &wal, path, err) || get_int(o, "shard", &shard, path, err) ||
             get_int(o, "n_shards", &nsh, path, err) ||
             get_int(o, "created_unix", &created, path, err))
        rc = -1;
    else if (!json_is_boolean(json_object_get(o, "trained")))
        rc = twn_err_set(err, "%s: \"trained\" is missing or not a boolean", path);
    else if (dim < 1 || dim > 65536 || m->count < 0 || wal < 0)
        rc = twn_err_set(err, "%s: dim %lld, count %lld, wal_seq %lld out of range", path,
                         (long long)dim, (long long)m->count, (long long)wal);
    if (!rc) {
        m->trained = json_is_true(json_object_get(o, "trained"));
        m->dim = (int)dim;
        m->wal_seq = (uint64_t)wal;
        m->shard = (int)shard;
        m->n_shards = (int)nsh;
        m->created_unix = created;
    }
    json_decref(o);
    return rc;
}

/* Parses one items.jsonl line into the fields of a store row. */
static int parse_item(const char *line, size_t len, const char *where, char **id, size_t *id_len,
                      int64_t *fid, uint8_t *route, float *p_think, uint32_t *think, twn_err *err) {
    json_error_t je;
    json_t *o = json_loadb(line, len, 0, &je);
    if (!o) return twn_err_set(err, "%s: %s", where, je.text);
    int rc = 0;
    json_t *jid = json_object_get(o, "id"), *jf = json_object_get(o, "faiss_id"),
           *jr = json_object_get(o, "route"), *jp = json_object_get(o, "p_think"),
           *jt = json_object_get(o, "think_tokens");
    if (!json_is_object(o) || !json_is_string(jid) || !json_is_integer(jf) || !json_is_string(jr) ||
        !(json_is_number(jp) || json_is_null(jp)) || !json_is_integer(jt))
        rc = twn_err_set(err,
                         "%s: expected {\"id\": string, \"faiss_id\": integer, \"route\": string, "
                         "\"p_think\": number or null, \"think_tokens\": integer}",
                         where);
    else {
        const char *r = json_string_value(jr);
        json_int_t t = json_integer_value(jt);
        *route = !strcmp(r, "easy") ? TWN_ROUTE_EASY : !strcmp(r, "hard") ? TWN_ROUTE_HARD : 255;
        *p_think = json_is_null(jp) ? NAN : (float)json_number_value(jp);
        *fid = (int64_t)json_integer_value(jf);
        *id_len = json_string_length(jid);
        if (t < 0 || t > (json_int_t)UINT32_MAX)
            rc = twn_err_set(err, "%s: think_tokens %lld out of range", where, (long long)t);
        *think = (uint32_t)t;
        float dummy = 0;
        twn_index_item it = {.id = json_string_value(jid),
                             .id_len = *id_len,
                             .vec = &dummy,
                             .route = *route,
                             .p_think = *p_think};
        if (!rc && *route == 255)
            rc = twn_err_set(err, "%s: route \"%s\", expected \"easy\" or \"hard\"", where, r);
        if (!rc && twn_item_check(&it, 0, err)) rc = twn_err_wrap(err, "%s", where);
        if (!rc) *id = twn_strndup(json_string_value(jid), *id_len);
    }
    json_decref(o);
    return rc;
}

int twn_outdir_read(const char *dir, twn_store **out_st, FaissIndex **out_index,
                    twn_outdir_meta *meta, twn_err *err) {
    *out_st = NULL;
    *out_index = NULL;
    char *pm = twn_path_join(dir, F_MANIFEST), *pe = twn_path_join(dir, F_EMBEDDINGS),
         *pf = twn_path_join(dir, F_FIDS), *pj = twn_path_join(dir, F_ITEMS),
         *pi = twn_path_join(dir, F_INDEX);
    FILE *fe = NULL, *ff = NULL, *fj = NULL;
    twn_store *st = NULL;
    FaissIndex *index = NULL;
    char *line = NULL;
    size_t cap = 0;
    uint16_t *row = NULL;
    int rc = read_manifest(pm, meta, err);
    if (rc) goto done;
    char de[16], df[16];
    int nde, ndf;
    int64_t se[2], sf[2];
    if (!(fe = fopen(pe, "rb")))
        rc = twn_err_errno(err, "cannot open %s", pe);
    else if (!(ff = fopen(pf, "rb")))
        rc = twn_err_errno(err, "cannot open %s", pf);
    else if (!(fj = fopen(pj, "rb")))
        rc = twn_err_errno(err, "cannot open %s", pj);
    if (rc || npy_header(fe, pe, de, se, &nde, err) || npy_header(ff, pf, df, sf, &ndf, err)) {
        rc = -1;
        goto done;
    }
    if (strcmp(de, "<f2") || nde != 2 || se[0] != meta->count || se[1] != meta->dim) {
        rc = twn_err_set(err, "%s: dtype %s shape (%lld, %lld), expected <f2 (%lld, %d) as %s says",
                         pe, de, (long long)se[0], (long long)se[1], (long long)meta->count,
                         meta->dim, pm);
        goto done;
    }
    if (strcmp(df, "<i8") || sf[0] != meta->count || sf[1] != 1) {
        rc = twn_err_set(err, "%s: dtype %s shape (%lld, %lld), expected <i8 (%lld, 1) as %s says",
                         pf, df, (long long)sf[0], (long long)sf[1], (long long)meta->count, pm);
        goto done;
    }
    st = twn_store_new(meta->dim);
    row = twn_malloc((size_t)meta->dim * 2);
    for (int64_t i = 0; i < meta->count; i++) {
        ssize_t len = getline(&line, &cap, fj);
        if (len <= 0) {
            rc = twn_err_set(err, "%s: %lld lines, expected %lld as %s says", pj, (long long)i,
                             (long long)meta->count, pm);
            goto done;
        }
        char where[1200];
        snprintf(where, sizeof where, "%s:%lld", pj, (long long)i + 1);
        char *id = NULL;
        size_t id_len = 0;
        int64_t fid = 0, fid_npy = 0;
        uint8_t route = 0;
        float p = 0;
        uint32_t think = 0;
        if (parse_item(line, (size_t)len, where, &id, &id_len, &fid, &route, &p, &think, err)) {
            rc = -1;
            goto done;
        }
        if (fread(row, 2, (size_t)meta->dim, fe) != (size_t)meta->dim ||
            fread(&fid_npy, 8, 1, ff) != 1) {
            twn_free(id);
            rc = twn_err_set(err, "%s or %s: truncated at row %lld", pe, pf, (long long)i);
            goto done;
        }
        if (fid_npy != fid) {
            twn_free(id);
            rc = twn_err_set(err, "%s: faiss_id %lld, but %s row %lld says %lld", where,
                             (long long)fid, pf, (long long)i, (long long)fid_npy);
            goto done;
        }
        int64_t r = twn_store_append_f16(st, id, id_len, fid, route, p, think, row, err);
        twn_free(id);
        if (r < 0) {
            rc = twn_err_wrap(err, "%s", where);
            goto done;
        }
    }
    if (getline(&line, &cap, fj) > 0) {
        rc = twn_err_set(err, "%s: more than the %lld lines %s says", pj, (long long)meta->count,
                         pm);
        goto done;
    }
    if (faiss_read_index_fname(pi, 0, &index) != 0) {
        rc = twn_err_set(err, "cannot read %s: %s", pi, faiss_get_last_error());
        goto done;
    }
    int64_t want = meta->trained ? meta->count : 0;
    if (faiss_Index_d(index) != meta->dim || faiss_Index_ntotal(index) != want ||
        faiss_Index_is_trained(index) != meta->trained ||
        faiss_Index_metric_type(index) != METRIC_INNER_PRODUCT) {
        rc =
            twn_err_set(err,
                        "%s: d %d, ntotal %lld, trained %d, metric %d; expected d %d, ntotal %lld, "
                        "trained %d, inner product (%d) as %s says",
                        pi, faiss_Index_d(index), (long long)faiss_Index_ntotal(index),
                        faiss_Index_is_trained(index), (int)faiss_Index_metric_type(index),
                        meta->dim, (long long)want, meta->trained, (int)METRIC_INNER_PRODUCT, pm);
        goto done;
    }
done:
    if (fe) fclose(fe);
    if (ff) fclose(ff);
    if (fj) fclose(fj);
    free(line);
    twn_free(row);
    twn_free(pm);
    twn_free(pe);
    twn_free(pf);
    twn_free(pj);
    twn_free(pi);
    if (rc) {
        twn_store_free(st);
        if (index) faiss_Index_free(index);
        return -1;
    }
    *out_st = st;
    *out_index = index;
    return 0;
}
