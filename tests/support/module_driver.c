/* Test driver for the module's core (extproc/module: decision.c, config.c, json.c):
 * its parsers and decision, driven line by line from stdin (built with AddressSanitizer and UBSan by
 * tests/support/module_harness.py). Fields are hex ("-": empty), so any byte can travel.
 *
 *   F <json>               filter config (current) -> "ok" | "error <message>"
 *   L                      the counted index of each target of the current rule in the
 *                          current filter config -> "<index or -1> ..."
 *   R <json>               rule config (current) -> "ok" | "error <message>"
 *   D <now_ns> <headers>   decide; headers = (length, name, length, value)... -> "key:<hex>|none <outcome,...>"
 *   H <prefix> <key>       u of prefix + key     -> decimal u
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decision.h"

typedef struct {
  const char **names, **values;
  size_t *name_lens, *value_lens;
  size_t count;
} header_list;

static size_t get(void *ctx, const char *name, size_t name_len, size_t index, const char **value, size_t *value_len) {
  const header_list *h = ctx;
  size_t seen = 0;
  for (size_t i = 0; i < h->count; i++) {
    if (h->name_lens[i] != name_len || memcmp(h->names[i], name, name_len)) continue;
    if (seen == index) {
      *value = h->values[i];
      *value_len = h->value_lens[i];
    }
    seen++;
  }
  return seen;
}

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

/* Decodes a hex field in place; its length in *n. */
static char *unhex(char *s, size_t *n) {
  if (!strcmp(s, "-")) { s[0] = 0; *n = 0; return s; } /* an empty field */
  size_t len = strlen(s);
  if (len % 2) return NULL;
  for (size_t i = 0; i < len / 2; i++) {
    int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return NULL;
    s[i] = (char)(hi * 16 + lo);
  }
  *n = len / 2;
  return s;
}

static void print_hex(const char *p, size_t n) {
  for (size_t i = 0; i < n; i++) printf("%02x", (unsigned char)p[i]);
}

static void decide(const ms_rule *rule, unsigned long long now, char *blob, size_t n) {
  header_list h = {0};
  size_t cap = n / 2 + 1;
  h.names = calloc(cap, sizeof *h.names);
  h.values = calloc(cap, sizeof *h.values);
  h.name_lens = calloc(cap, sizeof *h.name_lens);
  h.value_lens = calloc(cap, sizeof *h.value_lens);
  /* Each name and value: a 4-byte big-endian length, then the bytes. */
  for (size_t at = 0; at + 4 <= n;) {
    const char *field[2];
    size_t flen[2];
    int got = 0;
    for (; got < 2 && at + 4 <= n; got++) {
      const unsigned char *p = (const unsigned char *)blob + at;
      size_t len = (size_t)p[0] << 24 | (size_t)p[1] << 16 | (size_t)p[2] << 8 | p[3];
      if (len > n - at - 4) break;
      field[got] = blob + at + 4;
      flen[got] = len;
      at += 4 + len;
    }
    if (got < 2) break;
    h.names[h.count] = field[0];
    h.name_lens[h.count] = flen[0];
    h.values[h.count] = field[1];
    h.value_lens[h.count] = flen[1];
    h.count++;
  }
  ms_headers headers = {get, &h};
  ms_bytes scratch = {NULL, 0};
  const char *key;
  size_t key_len;
  if (ms_extract_key(rule, &headers, &scratch, &key, &key_len)) {
    printf("key:");
    print_hex(key, key_len);
  } else {
    printf("none");
  }
  free(scratch.ptr);
  ms_outcome out[MS_MAX_TARGETS];
  ms_decide(rule, &headers, now, out);
  printf(" ");
  for (int i = 0; i < rule->ntargets; i++) printf("%s%s", i ? "," : "", ms_outcome_names[out[i]]);
  printf("\n");
  free(h.names);
  free(h.values);
  free(h.name_lens);
  free(h.value_lens);
}

int main(void) {
  size_t cap = 1 << 16;
  char *line = malloc(cap), err[256];
  ms_rule *rule = NULL;
  ms_filter *filter = NULL;
  size_t len = 0;
  int c;
  while (1) {
    len = 0;
    while ((c = getchar()) != EOF && c != '\n') {
      if (len + 1 >= cap) line = realloc(line, cap *= 2);
      line[len++] = (char)c;
    }
    if (c == EOF && len == 0) break;
    line[len] = 0;
    char *fields[3] = {NULL, NULL, NULL};
    int nf = 0;
    for (char *tok = strtok(line, " "); tok && nf < 3; tok = strtok(NULL, " ")) fields[nf++] = tok;
    size_t n1 = 0, n2 = 0;
    err[0] = 0;
    if (nf == 2 && !strcmp(fields[0], "F") && unhex(fields[1], &n1)) {
      ms_filter_free(filter);
      filter = ms_filter_parse(fields[1], n1, NULL, err, sizeof err);
      if (filter) printf("ok\n");
      else printf("error %s\n", err);
    } else if (nf == 1 && !strcmp(fields[0], "L") && rule && filter) {
      for (int i = 0; i < rule->ntargets; i++) printf(i ? " %ld" : "%ld", ms_counted_find(filter, &rule->id, &rule->targets[i]));
      printf("\n");
    } else if (nf == 2 && !strcmp(fields[0], "R") && unhex(fields[1], &n1)) {
      ms_rule_free(rule);
      rule = ms_rule_parse(fields[1], n1, NULL, err, sizeof err);
      if (rule) printf("ok\n");
      else printf("error %s\n", err);
    } else if ((nf == 2 || nf == 3) && !strcmp(fields[0], "D") && rule) {
      char empty[1] = "";
      char *blob = nf == 3 ? unhex(fields[2], &n2) : empty;
      if (!blob) { printf("bad line\n"); fflush(stdout); continue; }
      decide(rule, strtoull(fields[1], NULL, 10), blob, n2);
    } else if (nf >= 2 && !strcmp(fields[0], "H")) {
      char empty[1] = "";
      char *prefix = unhex(fields[1], &n1), *key = nf == 3 ? unhex(fields[2], &n2) : empty;
      if (!prefix || !key) { printf("bad line\n"); fflush(stdout); continue; }
      ms_bytes p = {prefix, n1};
      printf("%llu\n", (unsigned long long)ms_key_hash(&p, key, n2));
    } else {
      printf("bad line\n");
    }
    fflush(stdout);
  }
  ms_rule_free(rule);
  ms_filter_free(filter);
  free(line);
  return 0;
}
