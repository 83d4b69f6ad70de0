/* http.h — a small HTTP server for /metrics and the coordinator's status page (libmicrohttpd).
 *
 * GET only, a fixed table of exact-path routes, one internal polling thread; a route's handler
 * fills a body and returns the status code.  Anything else is 404 (unknown path) or 405 (other
 * method).  Handlers run on the server's thread, concurrently with the roles, so they may only
 * read thread-safe state (the metrics registry).
 *
 * The listen string is "HOST:PORT", "[IPV6]:PORT", ":PORT" or "PORT"; a missing host means
 * 127.0.0.1, so nothing is reachable from other machines unless configured; port 0 picks a free
 * port (twn_http_port tells which).  HOST must be a numeric address or "localhost". */
#ifndef TWN_COMMON_HTTP_H
#define TWN_COMMON_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "common/metrics.h"
#include "util/err.h"
#include "util/vec.h"

/* Appends the response body to *body; returns the HTTP status (200, 404, ...).  *content_type
 * starts as the route's and may be changed to a string that outlives the call. */
typedef int (*twn_http_handler)(void *ctx, const char *path, twn_str *body,
                                const char **content_type);

typedef struct twn_http_route {
    const char *path; /* exact, e.g. "/metrics" */
    const char *content_type;
    twn_http_handler handler;
    void *ctx;
} twn_http_route;

typedef struct twn_http twn_http;

/* Binds and starts serving; the routes are copied (their ctx must outlive the server). */
int twn_http_start(const char *listen, const twn_http_route *routes, size_t n_routes,
                   twn_http **out, twn_err *err);
/* The bound port (the real one when 0 was asked for). */
uint16_t twn_http_port(const twn_http *h);
/* "http://HOST:PORT" of the bound address (IPv6 in brackets; 0.0.0.0 shown as given). */
const char *twn_http_url(const twn_http *h);
/* Stops (waits for running handlers) and frees; NULL is fine. */
void twn_http_stop(twn_http *h);

/* Parses a listen string as above: host (without brackets) into host[hostsz], *port.  Fails
 * naming the string and what is expected. */
int twn_http_parse_listen(const char *listen, char *host, size_t hostsz, uint16_t *port,
                          twn_err *err);

/* The /metrics route of registry m (Prometheus text, TWN_METRICS_CONTENT_TYPE). */
twn_http_route twn_metrics_route(twn_metrics *m);
/* A server with /metrics of m plus the extra routes (may be NULL / 0): what every twn process
 * runs when metrics.listen is set.  The coordinator adds its status page (coordinator/status.h). */
int twn_metrics_http_start(const char *listen, twn_metrics *m, const twn_http_route *extra,
                           size_t n_extra, twn_http **out, twn_err *err);

#endif
