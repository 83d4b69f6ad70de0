/* fileio.c — whole-file reads, atomic writes, paths (see fileio.h). */
#include "util/fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/mem.h"

int twn_read_file(const char *path, size_t max_bytes, char **data, size_t *len, twn_err *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return twn_err_errno(err, "cannot open %s", path);
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return twn_err_errno(err, "cannot stat %s", path);
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return twn_err_set(err, "%s: not a regular file", path);
    }
    if ((size_t)st.st_size > max_bytes) {
        close(fd);
        return twn_err_set(err, "%s: file is %lld bytes, more than the %zu allowed", path,
                           (long long)st.st_size, max_bytes);
    }
    size_t n = (size_t)st.st_size;
    char *buf = twn_try_alloc(n + 1);
    if (!buf) {
        close(fd);
        return twn_err_set(err, "%s: cannot allocate %zu bytes", path, n + 1);
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            close(fd);
            twn_free(buf);
            return r < 0 ? twn_err_errno(err, "cannot read %s", path)
                         : twn_err_set(err, "%s: file shrank while reading", path);
        }
        got += (size_t)r;
    }
    close(fd);
    buf[n] = 0;
    *data = buf;
    *len = n;
    return 0;
}

int twn_write_file_atomic(const char *path, const void *data, size_t len, twn_err *err) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return twn_err_errno(err, "cannot create %s", tmp);
    const char *p = data;
    size_t left = len;
    while (left) {
        ssize_t w = write(fd, p, left);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) {
            close(fd);
            unlink(tmp);
            return twn_err_errno(err, "cannot write %s", tmp);
        }
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        unlink(tmp);
        return twn_err_errno(err, "cannot fsync %s", tmp);
    }
    if (rename(tmp, path) != 0) {
        unlink(tmp);
        return twn_err_errno(err, "cannot rename %s to %s", tmp, path);
    }
    char *dir = twn_path_dirname(path);
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    twn_free(dir);
    return 0;
}

int twn_mkdirs(const char *path, twn_err *err) {
    char buf[4096];
    size_t n = strlen(path);
    if (n >= sizeof buf) return twn_err_set(err, "path too long: %s", path);
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return twn_err_errno(err, "cannot create %s", buf);
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST)
        return twn_err_errno(err, "cannot create %s", buf);
    return 0;
}

char *twn_path_join(const char *dir, const char *name) {
    if (name[0] == '/' || !dir || !dir[0]) return twn_strdup(name);
    size_t a = strlen(dir), b = strlen(name);
    char *s = twn_malloc(a + b + 2);
    memcpy(s, dir, a);
    size_t k = a;
    if (a && dir[a - 1] != '/') s[k++] = '/';
    memcpy(s + k, name, b + 1);
    return s;
}

char *twn_path_dirname(const char *path) {
    char *copy = twn_strdup(path);
    char *d = twn_strdup(dirname(copy));
    twn_free(copy);
    return d;
}

int twn_path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}
