/* The hooks Envoy 1.39 and 1.40 require at load (they resolve them with dlsym) that the
 * module has no use for: pass-through. Apart so that bench/empty_module.c, the floor of
 * any dynamic-module filter, loads with exactly the same ones. */
#include "abi.h"

#define EXPORT __attribute__((visibility("default")))

EXPORT int envoy_dynamic_module_on_http_filter_request_body(void *f, const void *m, bool e) { (void)f; (void)m; (void)e; return MS_CONTINUE; }
EXPORT int envoy_dynamic_module_on_http_filter_request_trailers(void *f, const void *m) { (void)f; (void)m; return MS_CONTINUE; }
EXPORT int envoy_dynamic_module_on_http_filter_response_headers(void *f, const void *m, bool e) { (void)f; (void)m; (void)e; return MS_CONTINUE; }
EXPORT int envoy_dynamic_module_on_http_filter_response_body(void *f, const void *m, bool e) { (void)f; (void)m; (void)e; return MS_CONTINUE; }
EXPORT int envoy_dynamic_module_on_http_filter_response_trailers(void *f, const void *m) { (void)f; (void)m; return MS_CONTINUE; }
EXPORT void envoy_dynamic_module_on_http_filter_stream_complete(void *f, const void *m) { (void)f; (void)m; }
/* Never called: this filter starts no callouts, streams or scheduled work. */
EXPORT void envoy_dynamic_module_on_http_filter_http_callout_done(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_headers(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_data(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_trailers(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_complete(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_http_stream_reset(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_scheduled(void) {}
EXPORT void envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(void *f, const void *m) { (void)f; (void)m; }
EXPORT void envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(void *f, const void *m) { (void)f; (void)m; }
