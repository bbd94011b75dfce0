/* The mirror decision in C (see decision.h): the hash, the rate cap, the key sources,
 * the decision. Its configuration is read by config.c. */
#include "decision.h"

#include <stdlib.h>
#include <string.h>

const char *const ms_outcome_names[MS_OUTCOMES] = {"mirrored", "skipped", "no_key", "method", "capped", "disabled"};

/* ------------------------------ MurmurHash3_x64_128, h1 ------------------------------ */

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  return k ^ (k >> 33);
}

static inline uint64_t load_le64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

uint64_t ms_murmur3_h1(const uint8_t *data, size_t len) {
  const uint64_t c1 = 0x87c37b91114253d5ULL, c2 = 0x4cf5ad432745937fULL;
  uint64_t h1 = 0, h2 = 0, k1, k2;
  size_t nblocks = len / 16;
  for (size_t i = 0; i < nblocks; i++) {
    k1 = load_le64(data + i * 16);
    k2 = load_le64(data + i * 16 + 8);
    k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1;
    h1 = rotl64(h1, 27); h1 += h2; h1 = h1 * 5 + 0x52dce729;
    k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2;
    h2 = rotl64(h2, 31); h2 += h1; h2 = h2 * 5 + 0x38495ab5;
  }
  const uint8_t *tail = data + nblocks * 16;
  size_t rest = len & 15;
  k1 = 0;
  k2 = 0;
  for (size_t i = rest; i > 8; i--) k2 = (k2 << 8) | tail[i - 1];
  if (rest > 8) { k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2; }
  for (size_t i = rest < 8 ? rest : 8; i > 0; i--) k1 = (k1 << 8) | tail[i - 1];
  if (rest > 0) { k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1; }
  h1 ^= (uint64_t)len;
  h2 ^= (uint64_t)len;
  h1 += h2;
  h2 += h1;
  h1 = fmix64(h1);
  h2 = fmix64(h2);
  return h1 + h2;
}

uint64_t ms_key_hash(const ms_bytes *prefix, const char *key, size_t key_len) {
  uint8_t stack[512], *buf = stack;
  if (key_len > SIZE_MAX - prefix->len) return UINT64_MAX;
  size_t n = prefix->len + key_len;
  /* Out of memory: the largest u, which only a 100% target samples. */
  if (n > sizeof stack && !(buf = malloc(n))) return UINT64_MAX;
  memcpy(buf, prefix->ptr, prefix->len);
  if (key_len) memcpy(buf + prefix->len, key, key_len);
  uint64_t u = ms_murmur3_h1(buf, n);
  if (buf != stack) free(buf);
  return u;
}

/* ----------------------------------- rate cap ----------------------------------- */

bool ms_bucket_take(ms_bucket *bucket, double rate, uint64_t now_ns) {
  double interval = 1e9 / rate;
  double capacity = rate > 1.0 ? rate : 1.0;
  /* A take is allowed while the bucket still holds a token: its "full again" time is at
   * most capacity - 1 intervals ahead of now. */
  uint64_t tolerance = (uint64_t)((capacity - 1.0) * interval);
  uint64_t step = interval >= 1.0 ? (uint64_t)interval : 1;
  uint64_t seen = atomic_load_explicit(&bucket->full_at_ns, memory_order_relaxed);
  for (;;) {
    uint64_t from = seen > now_ns ? seen : now_ns;
    if (from - now_ns > tolerance) return false;
    if (atomic_compare_exchange_weak_explicit(&bucket->full_at_ns, &seen, from + step, memory_order_relaxed, memory_order_relaxed))
      return true;
  }
}

/* ------------------------------------- keys ------------------------------------- */

/* Python's bytes.strip(): ASCII whitespace. */
static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

static void strip(const char **p, size_t *n) {
  while (*n && is_space((*p)[0])) { (*p)++; (*n)--; }
  while (*n && is_space((*p)[*n - 1])) (*n)--;
}

static bool equal(const char *a, size_t na, const ms_bytes *b) { return na == b->len && (na == 0 || memcmp(a, b->ptr, na) == 0); }

static size_t header(const ms_headers *h, const char *name, size_t index, const char **v, size_t *n) {
  *v = NULL;
  *n = 0;
  size_t count = h->get(h->ctx, name, strlen(name), index, v, n);
  if (index >= count || *v == NULL) { *v = ""; *n = 0; }
  return count;
}

/* keys.cookie_value on one Cookie header: the first pair named `name` decides. */
static bool cookie_in(const char *p, size_t n, const ms_bytes *name, const char **v, size_t *vn, bool *decided) {
  while (1) {
    const char *semi = memchr(p, ';', n);
    size_t len = semi ? (size_t)(semi - p) : n;
    const char *pair = p;
    size_t plen = len;
    strip(&pair, &plen);
    const char *eq = memchr(pair, '=', plen);
    if (eq && equal(pair, (size_t)(eq - pair), name)) {
      *v = eq + 1;
      *vn = plen - (size_t)(eq - pair) - 1;
      strip(v, vn);
      *decided = true;
      return *vn > 0;
    }
    if (!semi) return false;
    p = semi + 1;
    n -= len + 1;
  }
}

static bool query_in(const char *path, size_t n, const ms_bytes *name, const char **v, size_t *vn) {
  const char *q = memchr(path, '?', n);
  if (!q) return false;
  const char *p = q + 1;
  size_t rest = n - (size_t)(p - path);
  const char *hash = memchr(p, '#', rest);
  if (hash) rest = (size_t)(hash - p);
  while (1) {
    const char *amp = memchr(p, '&', rest);
    size_t len = amp ? (size_t)(amp - p) : rest;
    const char *eq = memchr(p, '=', len);
    size_t klen = eq ? (size_t)(eq - p) : len;
    if (equal(p, klen, name)) {
      *v = eq ? eq + 1 : p + len;
      *vn = eq ? len - klen - 1 : 0;
      return *vn > 0;
    }
    if (!amp) return false;
    p = amp + 1;
    rest -= len + 1;
  }
}

static bool lowhex(const char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f'))) return false;
  return true;
}

static bool all_zero(const char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != '0') return false;
  return true;
}

/* keys.traceparent_id: the trace id of a valid W3C traceparent. */
static bool traceparent_in(const char *s, size_t n, const char **v, size_t *vn) {
  strip(&s, &n);
  if (n < 55 || s[2] != '-' || s[35] != '-' || s[52] != '-') return false;
  if (!lowhex(s, 2) || !lowhex(s + 3, 32) || !lowhex(s + 36, 16) || !lowhex(s + 53, 2)) return false;
  if ((s[0] == 'f' && s[1] == 'f') || all_zero(s + 3, 32) || all_zero(s + 36, 16)) return false;
  if (n > 55 && (s[55] != '-' || (s[0] == '0' && s[1] == '0'))) return false;
  *v = s + 3;
  *vn = 32;
  return true;
}

/* header:cookie reads every Cookie header joined with "; ", as the sampler joins them. */
static bool joined_cookies(const ms_headers *h, size_t count, ms_bytes *scratch, const char **v, size_t *vn) {
  size_t total = 0;
  for (size_t i = 0; i < count; i++) {
    size_t n;
    header(h, "cookie", i, v, &n);
    total += n + (i ? 2 : 0);
  }
  char *buf = malloc(total ? total : 1);
  if (!buf) return false;
  size_t at = 0;
  for (size_t i = 0; i < count; i++) {
    size_t n;
    header(h, "cookie", i, v, &n);
    if (i) { memcpy(buf + at, "; ", 2); at += 2; }
    if (n) memcpy(buf + at, *v, n);
    at += n;
  }
  free(scratch->ptr);
  scratch->ptr = buf;
  scratch->len = total;
  *v = buf;
  *vn = total;
  return total > 0;
}

static bool source_value(const ms_key_source *src, const ms_headers *h, ms_bytes *scratch, const char **v, size_t *vn) {
  size_t count;
  switch (src->kind) {
  case MS_KEY_HEADER:
    if (equal("host", 4, &src->name)) {
      /* Envoy keeps Host as :authority, as ext_proc sends it. */
      if (header(h, ":authority", 0, v, vn) && *vn) return true;
      return header(h, "host", 0, v, vn) && *vn;
    }
    count = header(h, src->name.ptr, 0, v, vn);
    if (count > 1 && equal("cookie", 6, &src->name)) return joined_cookies(h, count, scratch, v, vn);
    return count && *vn;
  case MS_KEY_COOKIE: {
    count = h->get(h->ctx, "cookie", 6, 0, v, vn);
    bool decided = false;
    for (size_t i = 0; i < count && !decided; i++) {
      const char *raw;
      size_t n;
      header(h, "cookie", i, &raw, &n);
      if (cookie_in(raw, n, &src->name, v, vn, &decided)) return true;
    }
    return false;
  }
  case MS_KEY_QUERY: {
    const char *path;
    size_t n;
    return header(h, ":path", 0, &path, &n) && query_in(path, n, &src->name, v, vn);
  }
  case MS_KEY_TRACEPARENT: {
    const char *raw;
    size_t n;
    return header(h, "traceparent", 0, &raw, &n) && traceparent_in(raw, n, v, vn);
  }
  }
  return false;
}

bool ms_extract_key(const ms_rule *rule, const ms_headers *headers, ms_bytes *scratch, const char **key, size_t *key_len) {
  for (int i = 0; i < rule->nchain; i++) {
    const char *v = NULL;
    size_t n = 0;
    if (source_value(&rule->chain[i], headers, scratch, &v, &n) && n > 0) {
      *key = v;
      *key_len = n;
      return true;
    }
  }
  return false;
}

/* ----------------------------------- decision ----------------------------------- */

static ms_outcome gate(const ms_rule *rule, const ms_headers *headers) {
  if (!rule->enabled) return MS_DISABLED;
  if (rule->nmethods) {
    const char *m;
    size_t n;
    if (!header(headers, ":method", 0, &m, &n)) { m = "GET"; n = 3; }
    for (int i = 0; i < rule->nmethods; i++)
      if (equal(m, n, &rule->methods[i])) return MS_OUTCOMES;
    return MS_METHOD;
  }
  return MS_OUTCOMES;
}

void ms_decide(const ms_rule *rule, const ms_headers *headers, uint64_t now_ns, ms_outcome out[MS_MAX_TARGETS]) {
  ms_outcome blocked = gate(rule, headers);
  const char *key = NULL;
  size_t key_len = 0;
  ms_bytes scratch = {NULL, 0};
  if (blocked == MS_OUTCOMES && !ms_extract_key(rule, headers, &scratch, &key, &key_len)) blocked = MS_NO_KEY;
  if (blocked != MS_OUTCOMES) {
    for (int i = 0; i < rule->ntargets; i++) out[i] = blocked;
    free(scratch.ptr);
    return;
  }
  uint64_t u[MS_MAX_TARGETS];
  for (int i = 0; i < rule->ntargets; i++) {
    const ms_target *t = &rule->targets[i];
    u[i] = t->hash_of == i ? ms_key_hash(&t->prefix, key, key_len) : u[t->hash_of];
    if (!t->always && u[i] >= t->threshold)
      out[i] = MS_SKIPPED;
    else if (t->bucket && !ms_bucket_take(t->bucket, rule->max_per_second, now_ns))
      out[i] = MS_CAPPED;
    else
      out[i] = MS_MIRRORED;
  }
  free(scratch.ptr);
}
