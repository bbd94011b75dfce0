"""Why a request is (not) mirrored: the engine's trace spelled out (pure).

``explain`` answers for one request; ``explain_bulk`` for many (one key or
one JSON object a line), with the matching done once per distinct request
shape rather than once per line. Both render ``Plan.trace`` (what serving
decides, step by step) as the same dict, and ``render_text`` /
``render_line`` turn it into text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .headers import header_map
from .keys import KeyKind, KeySource
from .plan import Plan, RulePlan
from .policy import MirrorTarget, Policy
from .trace import CapState, TargetTrace, Trace

# What a JSON line may hold; anything else is refused (a typo such as
# "header" would otherwise be silently ignored).
JSON_FIELDS = ("key", "headers", "cookies", "path", "host", "method")
# Bound the bulk matching cache: a file of distinct paths must not grow it forever.
_CACHE_LIMIT = 4096


def request_headers(
    headers: Sequence[tuple[str, str]] = (),
    cookies: Sequence[tuple[str, str]] = (),
    path: str = "/",
    host: str = "",
    method: str = "GET",
) -> dict[str, bytes]:
    """The header mapping Envoy would send for these request attributes.
    Text that came from bytes which are not UTF-8 (arguments decoded with
    surrogateescape) goes back to those bytes."""
    pairs = [(":method", _bytes(method.upper())), (":path", _bytes(path))]
    if host:
        pairs.append((":authority", _bytes(host)))
    pairs += [(name, _bytes(value)) for name, value in headers]
    if cookies:
        pairs.append(("cookie", _bytes("; ".join(f"{k}={v}" for k, v in cookies))))
    return header_map(pairs)[0]


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def _cap(state: CapState | None) -> dict[str, float] | None:
    return None if state is None else {"per_second": state.per_second, "tokens": state.tokens}


class _Explainer:
    """The parts of an explanation that depend on the plan only, built once."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.key_chain = [str(s) for s in plan.policy.key_chain]
        self.salt = _text(plan.policy.salt)
        self._targets: dict[int, tuple[MirrorTarget, dict[str, Any]]] = {}

    def _static(self, t: TargetTrace) -> dict[str, Any]:
        # Keyed by identity, and the target kept alive with it so the id
        # cannot be reused: targets are frozen parts of the policy.
        found = self._targets.get(id(t.target))
        if found is None:
            target = t.target
            fields = {
                "backend": target.backend,
                "slot": self.plan.slot_names[target.slot],
                "fraction": str(target.fraction),
                "threshold": target.threshold,
                # The salt this target's u is hashed with, so u can be
                # reproduced from the target's entry alone.
                "salt": _text(t.salt),
                "own_salt": target.salt is not None,
            }
            found = self._targets[id(target)] = (target, fields)
        return found[1]

    def result(self, trace: Trace) -> dict[str, Any]:
        return {
            "rule": None if trace.rule is None else trace.rule.id,
            "named_by_envoy": trace.named_by_envoy,
            "key_chain": list(self.key_chain),
            "salt": self.salt,
            "key_source": None if trace.source is None else str(trace.source),
            "key": None if trace.key is None else _text(trace.key),
            "u": trace.u,
            "targets": [{**self._static(t), "u": t.u, "cap": _cap(t.cap), "decision": t.outcome.value} for t in trace.targets],
        }


def explain(policy: Policy | Plan, headers: dict[str, bytes], rule_id: str | None = None, now: float | None = None) -> dict[str, Any]:
    """The decision for one request, as a JSON-ready dict: the plan's trace.
    ``u`` is the key hashed with the policy's salt; each target has its own
    ``u`` and ``salt`` (they differ from the top-level ones only for a target
    with a salt of its own, ``own_salt``). ``rule_id``: the rule Envoy names
    (gRPC metadata), as serving takes it. ``cap``: a capped target's rate and
    the tokens its bucket holds at ``now`` (the plan's clock by default); a
    policy given here is compiled afresh, so its buckets are full."""
    plan = policy if isinstance(policy, Plan) else Plan(policy)
    return _Explainer(plan).result(plan.trace(headers, rule_id=rule_id, now=now))


class BulkInputError(ValueError):
    """A line of bulk input that is not a request; ``line`` counts from 1."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


def _put_key(headers: dict[str, bytes], source: KeySource, key: bytes) -> str | None:
    """Place ``key`` on the request where ``source`` reads it; why it cannot be, or None."""
    kind = source.kind
    if kind is KeyKind.HEADER:
        # ext_proc carries Host as :authority, and that is where the key source reads it.
        headers[":authority" if source.name == "host" else source.name] = key
    elif kind is KeyKind.COOKIE:
        if b";" in key or key != key.strip():
            return f"key {_text(key)!r} cannot travel in cookie {source.name} (';' or surrounding whitespace)"
        cookie = source.name.encode() + b"=" + key
        old = headers.get("cookie")
        # First in the header: an earlier cookie of the same name would win.
        headers["cookie"] = cookie if old is None else cookie + b"; " + old
    elif kind is KeyKind.QUERY:
        if b"&" in key or b"#" in key:
            return f"key {_text(key)!r} cannot travel in query parameter {source.name} ('&' or '#')"
        path, sep, query = headers.get(":path", b"/").partition(b"?")
        param = source.name.encode() + b"=" + key
        # First in the query: an earlier parameter of the same name would win.
        headers[":path"] = path + b"?" + param + (b"&" + query if sep and query else b"")
    else:
        if len(key) != 32 or not all(c in b"0123456789abcdef" for c in key) or key == b"0" * 32:
            return f"key {_text(key)!r} is not a trace id (32 lower-case hex digits, not all zero), which traceparent needs"
        # Any parent id but zeros, which would make the traceparent invalid.
        headers["traceparent"] = b"00-" + key + b"-0000000000000001-01"
    return None


def _string_map(value: object, what: str) -> list[tuple[str, str]]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{what} must be an object of strings")
    return list(value.items())


def _json_request(
    text: str,
    source: KeySource,
    defaults: tuple[list[tuple[str, str]], list[tuple[str, str]], str, str, str],
) -> dict[str, bytes]:
    """The headers of one JSON line; ValueError (with the reason) if it is not a request.
    ``defaults``: headers, cookies, path, host and method for what the line leaves out."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError("a JSON line must be an object")
    unknown = sorted(set(obj) - set(JSON_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {', '.join(map(repr, unknown))}; allowed: {', '.join(JSON_FIELDS)}")
    for name in ("key", "path", "host", "method"):
        if name in obj and not isinstance(obj[name], str):
            raise ValueError(f"{name} must be a string")
    headers = _string_map(obj.get("headers", {}), "headers")
    for name, _ in headers:
        if name.startswith(":"):
            raise ValueError(f"header {name!r}: give path, host and method as fields of their own")
    cookies = _string_map(obj.get("cookies", {}), "cookies")
    base_headers, base_cookies, path, host, method = defaults
    # The line's own first: the first value of a header, and the first cookie of a name, is the one read.
    out = request_headers(
        headers + base_headers, cookies + base_cookies, obj.get("path", path), obj.get("host", host), obj.get("method", method)
    )
    if "key" in obj:
        problem = _put_key(out, source, _bytes(obj["key"]))
        if problem is not None:
            raise ValueError(problem)
    return out


def _match_inputs(policy: Policy) -> tuple[str, ...]:
    """The headers, besides host, path and method, that any match of the
    policy reads: a request's rule depends on these values and no others."""
    names = {":authority" if h.name == "host" else h.name for rule in policy.rules for m in rule.matches for h in m.headers}
    return tuple(sorted(names - {":authority"}))


def explain_bulk(
    policy: Policy | Plan,
    lines: Iterable[str | bytes],
    *,
    headers: Sequence[tuple[str, str]] = (),
    cookies: Sequence[tuple[str, str]] = (),
    path: str = "/",
    host: str = "",
    method: str = "GET",
    rule_id: str | None = None,
) -> Iterator[dict[str, Any]]:
    """One ``explain`` result per request, in input order.

    A line is a request in one of two forms. A line starting with ``{`` is a
    JSON object with any of the fields ``key``, ``headers`` (name to value),
    ``cookies`` (name to value), ``path`` (query string included), ``host``
    and ``method``. Any other line is a key, verbatim. A key (a line's, or a
    JSON line's ``key``, which then wins over its ``headers`` and
    ``cookies``) goes where the first source of the policy's key chain reads
    it: a header, a cookie, a query parameter, or the trace id of a
    traceparent header. The arguments ``headers`` and ``cookies`` are added to
    every request (a line's own header or cookie of the same name wins);
    ``path``, ``host`` and ``method`` apply where a line gives none;
    ``rule_id``, the rule Envoy names, applies to every line. Line
    terminators are dropped; empty lines are skipped (they are not requests).
    Lines may be ``str`` or ``bytes`` (non-UTF-8 bytes kept as they are).

    Raises ``BulkInputError`` (naming the line, counted from 1) at the first
    line that is not a request: invalid JSON, an unknown field, a wrong type,
    or a key the first key source cannot carry (e.g. ``;`` in a cookie).
    Results before it have been yielded already.

    The rule each request matches is cached by what matching reads (host,
    path, method and the headers the policy's matches name), so a run of
    keys against one path matches once; the rest is the plan's trace per
    request, exactly as ``explain`` makes it (caps read, never taken).
    """
    plan = policy if isinstance(policy, Plan) else Plan(policy)
    explainer = _Explainer(plan)
    source = plan.policy.key_chain[0]
    defaults = (list(headers), list(cookies), path, host, method)
    base = request_headers(headers, cookies, path, host, method)
    inputs = _match_inputs(plan.policy)
    rules: dict[tuple[bytes | None, ...], RulePlan | None] = {}
    # As serving takes it: a rule of this policy wins over matching; any other id is ignored.
    named = plan.by_id.get(rule_id) if rule_id is not None else None
    for number, raw in enumerate(lines, 1):
        line = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line:
            continue
        if line.startswith("{"):
            try:
                request = _json_request(line, source, defaults)
            except ValueError as e:
                raise BulkInputError(number, str(e)) from None
        else:
            request = dict(base)
            problem = _put_key(request, source, _bytes(line))
            if problem is not None:
                raise BulkInputError(number, problem)
        if named is not None:
            yield explainer.result(plan.trace_rule(named, request, named_by_envoy=True))
            continue
        shape = (
            request.get(":authority"),
            request.get("host"),
            request.get(":path"),
            request.get(":method"),
            *[request.get(name) for name in inputs],
        )
        if shape in rules:
            rule = rules[shape]
        else:
            if len(rules) >= _CACHE_LIMIT:
                rules.clear()
            rule = rules[shape] = plan.rule_plan(request)
        yield explainer.result(plan.trace_rule(rule, request))


def _one_line(text: str) -> str:
    """``text`` with tabs, line breaks and other control characters escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def render_line(result: dict[str, Any]) -> str:
    """One line for a bulk result: ``KEY<TAB>RULE<TAB>backend=decision,...``;
    ``-`` for no key, no rule or no targets."""
    key = "-" if result["key"] is None else _one_line(result["key"])
    rule = "-" if result["rule"] is None else result["rule"]
    targets = ",".join(f"{t['backend']}={t['decision']}" for t in result["targets"]) or "-"
    return f"{key}\t{rule}\t{targets}"


def render_text(result: dict[str, Any]) -> str:
    if result["rule"] is None:
        return "no rule matches this request: not mirrored"
    lines = [f"rule: {result['rule']}" + (" (named by Envoy)" if result["named_by_envoy"] else "")]
    if not result["targets"]:
        return "\n".join([*lines, "  no RequestMirror filter: not mirrored"])
    own = any(t["own_salt"] for t in result["targets"])
    if result["key_source"] is None:
        lines.append(f"key: none of {', '.join(result['key_chain'])} is present: not mirrored (no_key)")
    else:
        lines.append(f"key source: {result['key_source']}")
        lines.append(f"key: {result['key']!r}")
        if result["u"] is not None:
            lines.append(f"u: {result['u']}" + (" (policy salt)" if own else ""))
    for t in result["targets"]:
        salt = f"salt {t['salt']!r}" if t["own_salt"] else "(policy salt)"
        u = "" if t["u"] is None else f", u {t['u']}"
        cap = "" if t["cap"] is None else f", cap {t['cap']['per_second']:g}/s ({t['cap']['tokens']:g} tokens now)"
        lines.append(f"  {t['backend']} ({t['slot']}) fraction {t['fraction']} threshold {t['threshold']}, {salt}{u}{cap}: {t['decision']}")
    return "\n".join(lines)
