/* log.h — leveled logging to stderr, plain or JSON lines.
 *
 * Only the top of a program (cli/, service main loops) decides what to print; libraries return
 * errors instead.  Logging is for progress and diagnostics an operator wants to see. */
#ifndef TWN_UTIL_LOG_H
#define TWN_UTIL_LOG_H

typedef enum { TWN_LOG_DEBUG, TWN_LOG_INFO, TWN_LOG_WARN, TWN_LOG_ERROR } twn_log_level;

void twn_log_set_level(twn_log_level level);
void twn_log_set_json(int json);
twn_log_level twn_log_get_level(void);
void twn_log(twn_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define twn_debug(...) twn_log(TWN_LOG_DEBUG, __VA_ARGS__)
#define twn_info(...)  twn_log(TWN_LOG_INFO, __VA_ARGS__)
#define twn_warn(...)  twn_log(TWN_LOG_WARN, __VA_ARGS__)
#define twn_error(...) twn_log(TWN_LOG_ERROR, __VA_ARGS__)

#endif
