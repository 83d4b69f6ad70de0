/* http.c — the HTTP server of http.h over libmicrohttpd.
 *
 * The listening socket is created and bound here, not by libmicrohttpd, so a bind failure comes
 * back as "cannot bind 127.0.0.1:9100: Address already in use" and the real port of ":0" is
 * known from getsockname; the daemon then takes the socket over (MHD_OPTION_LISTEN_SOCKET) and
 * closes it when stopped. */
#include "common/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "util/mem.h"

struct twn_http {
    struct MHD_Daemon *d;
    twn_http_route *routes;
    size_t n_routes;
    uint16_t port;
    char url[96];
};

int twn_http_parse_listen(const char *listen, char *host, size_t hostsz, uint16_t *port,
                          twn_err *err) {
    const char *s = listen ? listen : "";
    const char *ps;
    size_t hl;
    if (*s == '[') {
        const char *rb = strchr(s, ']');
        if (!rb || rb[1] != ':') goto bad;
        s++;
        hl = (size_t)(rb - s);
        ps = rb + 2;
    } else {
        const char *colon = strrchr(s, ':');
        if (colon && memchr(s, ':', (size_t)(colon - s))) goto bad; /* bare IPv6 needs [] */
        hl = colon ? (size_t)(colon - s) : 0;
        ps = colon ? colon + 1 : s;
    }
    if (!*ps || strspn(ps, "0123456789") != strlen(ps) || strlen(ps) > 5 || atol(ps) > 65535)
        goto bad;
    if (hl == 0) {
        snprintf(host, hostsz, "127.0.0.1");
    } else {
        if (hl >= hostsz) goto bad;
        memcpy(host, s, hl);
        host[hl] = 0;
        if (!strcmp(host, "localhost")) snprintf(host, hostsz, "127.0.0.1");
    }
    *port = (uint16_t)atol(ps);
    return 0;
bad:
    return twn_err_set(err,
                       "http listen address \"%s\": expected HOST:PORT, [IPV6]:PORT, :PORT or "
                       "PORT (port 0..65535, 0 = any free port)",
                       listen ? listen : "(null)");
}

// ------------------------------------------------------------------------------------------------
// Requests

static enum MHD_Result respond(struct MHD_Connection *conn, int status, const char *type,
                               const char *body, size_t n) {
    struct MHD_Response *r =
        MHD_create_response_from_buffer(n, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    enum MHD_Result ok = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return ok;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls) {
    twn_http *h = cls;
    static const char text[] = "text/plain; charset=utf-8";
    if (strcmp(method, MHD_HTTP_METHOD_GET) && strcmp(method, MHD_HTTP_METHOD_HEAD)) {
        static const char msg[] = "method not allowed\n";
        return respond(conn, MHD_HTTP_METHOD_NOT_ALLOWED, text, msg, sizeof msg - 1);
    }
    for (size_t i = 0; i < h->n_routes; i++) {
        const twn_http_route *r = &h->routes[i];
        if (strcmp(r->path, url)) continue;
        twn_str body = {0};
        twn_str_append(&body, "", 0);
        const char *type = r->content_type ? r->content_type : text;
        int status = r->handler(r->ctx, url, &body, &type);
        enum MHD_Result ok = respond(conn, status, type, body.v, body.n);
        twn_str_free(&body);
        return ok;
    }
    char msg[256];
    int n = snprintf(msg, sizeof msg, "not found: %.200s\n", url);
    return respond(conn, MHD_HTTP_NOT_FOUND, text, msg, (size_t)n);
}

// ------------------------------------------------------------------------------------------------
// Server

int twn_http_start(const char *listen_addr, const twn_http_route *routes, size_t n_routes,
                   twn_http **out, twn_err *err) {
    *out = NULL;
    char host[64];
    uint16_t port;
    if (twn_http_parse_listen(listen_addr, host, sizeof host, &port, err)) return -1;
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t sl;
    int v6 = strchr(host, ':') != NULL;
    if (v6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1) goto badhost;
        sl = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1) goto badhost;
        sl = sizeof *a;
    }
    int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return twn_err_errno(err, "http %s: socket", listen_addr);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, sl) || listen(fd, 64)) {
        twn_err_errno(err, "cannot bind http server to %s", listen_addr);
        close(fd);
        return -1;
    }
    struct sockaddr_storage bound;
    socklen_t bl = sizeof bound;
    getsockname(fd, (struct sockaddr *)&bound, &bl);
    twn_http *h = twn_calloc(1, sizeof *h);
    h->port = ntohs(v6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                       : ((struct sockaddr_in *)&bound)->sin_port);
    snprintf(h->url, sizeof h->url, v6 ? "http://[%s]:%u" : "http://%s:%u", host,
             (unsigned)h->port);
    h->routes = twn_calloc(n_routes + 1, sizeof *h->routes);
    if (n_routes) memcpy(h->routes, routes, n_routes * sizeof *routes);
    h->n_routes = n_routes;
    h->d =
        MHD_start_daemon(MHD_USE_AUTO_INTERNAL_THREAD | (v6 ? MHD_USE_IPv6 : 0), 0, NULL, NULL,
                         on_request, h, MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_CONNECTION_TIMEOUT,
                         (unsigned)10, MHD_OPTION_CONNECTION_LIMIT, (unsigned)64, MHD_OPTION_END);
    if (!h->d) {
        twn_err_set(err, "http %s: libmicrohttpd could not start a server on the bound socket",
                    listen_addr);
        close(fd);
        twn_free(h->routes);
        twn_free(h);
        return -1;
    }
    *out = h;
    return 0;
badhost:
    return twn_err_set(err,
                       "http listen address \"%s\": host \"%s\" is not a numeric IPv4/IPv6 "
                       "address or localhost",
                       listen_addr, host);
}

uint16_t twn_http_port(const twn_http *h) {
    return h ? h->port : 0;
}
const char *twn_http_url(const twn_http *h) {
    return h ? h->url : "";
}

void twn_http_stop(twn_http *h) {
    if (!h) return;
    MHD_stop_daemon(h->d);
    twn_free(h->routes);
    twn_free(h);
}

// ------------------------------------------------------------------------------------------------
// /metrics

static int metrics_handler(void *ctx, const char *path, twn_str *body, const char **type) {
    twn_metrics_render(ctx, body);
    return 200;
}

twn_http_route twn_metrics_route(twn_metrics *m) {
    return (twn_http_route){"/metrics", TWN_METRICS_CONTENT_TYPE, metrics_handler, m};
}

int twn_metrics_http_start(const char *listen_addr, twn_metrics *m, const twn_http_route *extra,
                           size_t n_extra, twn_http **out, twn_err *err) {
    twn_http_route *r = twn_calloc(n_extra + 1, sizeof *r);
    r[0] = twn_metrics_route(m);
    if (n_extra) memcpy(r + 1, extra, n_extra * sizeof *extra);
    int rc = twn_http_start(listen_addr, r, n_extra + 1, out, err);
    twn_free(r);
    return rc;
}
