/* A small strict JSON reader (RFC 8259) into a tree: only what the module's
 * configuration needs (config.c). Depth-limited; every failure is a message. */
#ifndef MIRROR_SAMPLER_JSON_H
#define MIRROR_SAMPLER_JSON_H

#include <stdbool.h>
#include <stddef.h>

typedef enum { J_NULL, J_BOOL, J_NUMBER, J_STRING, J_ARRAY, J_OBJECT } jtype;

typedef struct jnode {
  jtype type;
  bool boolean;
  char *text; /* string contents (decoded, NUL-terminated) or number literal */
  size_t len;
  struct jnode *items; /* array items or object values */
  char **keys;         /* object keys, NUL-terminated */
  size_t count;
} jnode;

/* false and a message in err for anything but one JSON value (and whitespace). */
bool jparse(const char *text, size_t len, jnode *root, char *err, size_t err_len);
void jfree(jnode *n);

/* printf into err, as one line (control characters become '?'). */
void ms_fail(char *err, size_t err_len, const char *fmt, ...);
/* A hex digit's value, or -1. */
int ms_hexval(char c);

#endif
