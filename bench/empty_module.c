/* The floor of any dynamic-module HTTP filter, for bench/module_instructions.py's
 * `empty-module` row: the hooks Envoy 1.39 and 1.40 require, each doing nothing.
 * What Envoy spends on a request through this filter is what its per-stream
 * wrapper costs before a module does any work of its own. Never loaded outside
 * that benchmark. Built with extproc/module/passthrough.c, the module's other hooks. */
#include "abi.h"

#define EXPORT __attribute__((visibility("default")))

static const char config_token = 0; /* non-NULL: a NULL config makes Envoy refuse it */

EXPORT const char *envoy_dynamic_module_on_program_init(void) { return MS_ABI_VERSION; }
EXPORT const void *envoy_dynamic_module_on_http_filter_config_new(void *c, envoy_dynamic_module_type_envoy_buffer n,
                                                                  envoy_dynamic_module_type_envoy_buffer j) {
  (void)c; (void)n; (void)j;
  return &config_token;
}
EXPORT void envoy_dynamic_module_on_http_filter_config_destroy(const void *c) { (void)c; }
EXPORT const void *envoy_dynamic_module_on_http_filter_per_route_config_new(envoy_dynamic_module_type_envoy_buffer n,
                                                                            envoy_dynamic_module_type_envoy_buffer j) {
  (void)n; (void)j;
  return &config_token;
}
EXPORT void envoy_dynamic_module_on_http_filter_per_route_config_destroy(const void *c) { (void)c; }
EXPORT const void *envoy_dynamic_module_on_http_filter_new(const void *c, void *f) { (void)f; return c; }
EXPORT int envoy_dynamic_module_on_http_filter_request_headers(void *f, const void *m, bool e) { (void)f; (void)m; (void)e; return MS_CONTINUE; }
EXPORT void envoy_dynamic_module_on_http_filter_destroy(const void *m) { (void)m; }
