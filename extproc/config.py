"""Configuration: settings from flags and environment, HTTPRoute manifests,
validation with field paths, and the Policy they compile to (pure).

Nothing here reads files or the process environment: callers pass the
environment mapping and the manifest text, so the same code serves start-up,
reload, ``check-config`` and the tests.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Mapping

import yaml

from .keys import DEFAULT_KEY_CHAIN, KeyKind, KeySource, is_header_name, parse_key_chain
import re2

from .matching import Match, PathMatch, PathType, ValueMatch, ValueType, compile_regex
from .policy import BackendRef, HeaderModifier, MirrorTarget, Policy, Route, Rule
from .sampling import Fraction


class ConfigError(Exception):
    """Every problem found, each naming the variable or the manifest field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --------------------------------------------------------------------------
# Settings: one table drives the CLI flags, the environment and the README.


def split_address(value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) as (host, port); ValueError says what is wrong."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT with a port 0..65535, got {value!r}")
    return host.strip("[]"), int(port)


def _listen(value: str) -> str:
    split_address(value)
    return value


def _optional_listen(value: str) -> str:
    return "" if value.strip().lower() in ("", "off", "none") else _listen(value)


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value.strip())
        except ValueError:
            raise ValueError(f"must be an integer {lo}..{hi}, got {value!r}") from None
        if not lo <= n <= hi:
            raise ValueError(f"must be an integer {lo}..{hi}, got {n}")
        return n

    return parse


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {value!r}") from None
    if not 0 <= s <= 3600:
        raise ValueError(f"must be 0..3600 seconds, got {value!r}")
    return s


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        v = value.strip().lower()
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return v

    return parse


def _header_name(value: str) -> str:
    v = value.strip().lower()
    if not is_header_name(v) or v.startswith(("x-envoy-", ":")) or v in ("host", "cookie"):
        raise ValueError(f"must be a header name Envoy lets ext_proc set (not x-envoy-*, host or a :pseudo-header), got {value!r}")
    return v


def parse_fraction_text(value: str) -> Fraction:
    """``N/D`` as in ``MIRROR_FRACTION=5/1000``."""
    num, sep, den = value.strip().partition("/")
    try:
        n, d = int(num), int(den)
    except ValueError:
        raise ValueError(f"must be NUMERATOR/DENOMINATOR, e.g. 5/1000, got {value!r}") from None
    if not sep:
        raise ValueError(f"must be NUMERATOR/DENOMINATOR, e.g. 5/1000, got {value!r}")
    return _fraction(n, d)


def _fraction(n: int, d: int) -> Fraction:
    if d < 1:
        raise ValueError(f"denominator must be >= 1, got {d}")
    if n < 0:
        raise ValueError(f"numerator must be >= 0, got {n}")
    if n > d:
        raise ValueError(f"numerator must be <= denominator, got {n}/{d}")
    return Fraction(n, d)


def _text(value: str) -> str:
    return value


def _methods(value: str) -> frozenset[str]:
    methods = frozenset(m.strip().upper() for m in value.split(",") if m.strip())
    unknown = sorted(methods - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; allowed: {', '.join(METHODS)}")
    return methods


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        rate = -1.0
    if not 0 < rate <= 1_000_000:
        raise ValueError(f"must be a number of mirrors per second, 0 < rate <= 1000000, got {value!r}")
    return rate


def _switch(value: str) -> bool:
    v = value.strip().lower()
    if v not in ("on", "off", "true", "false", "1", "0"):
        raise ValueError(f"must be on or off, got {value!r}")
    return v in ("on", "true", "1")


@dataclass(frozen=True)
class Option:
    name: str  # Settings field
    env: str
    flag: str | None
    default: str
    parse: Callable[[str], Any]
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("listen", "MIRROR_LISTEN", "--listen", "0.0.0.0:50051", _listen, "ext_proc gRPC address (health service on the same port)"),
    Option("config", "MIRROR_CONFIG", "--config", "", _text, "file of Gateway API HTTPRoute manifests (route mode); watched for changes"),
    Option("backend", "MIRROR_BACKEND", "--backend", "", _text, "simple mode: the mirror backend (Envoy cluster) for all requests"),
    Option("percent", "MIRROR_PERCENT", "--percent", "", _int_range(0, 100), "simple mode: percentage mirrored, 0..100 (default 100)"),
    Option("fraction", "MIRROR_FRACTION", "--fraction", "", parse_fraction_text, "simple mode: fraction mirrored, N/D; wins over MIRROR_PERCENT"),
    Option("primary", "MIRROR_PRIMARY", "--primary", "backend", _text, "simple mode: the primary backend, used by envoy-config and up"),
    Option("key", "MIRROR_KEY", "--key", "header:x-request-id", parse_key_chain, "key sources tried in order, comma-separated: header:NAME, cookie:NAME, query:NAME, traceparent"),
    Option("salt", "MIRROR_SALT", "--salt", "", _text, "salt hashed before the key; change it to draw an independent sample"),
    Option("slot_prefix", "MIRROR_SLOT_PREFIX", "--slot-prefix", "x-mirror-cluster-", _header_name, "slot header prefix; slots are <prefix>0, <prefix>1, ..."),
    Option("slots", "MIRROR_SLOTS", "--slots", "2", _int_range(1, 8), "slot headers per rule, the most mirrors one rule may have"),
    Option("marker_header", "MIRROR_MARKER_HEADER", "--marker-header", "x-mirror-rule", _header_name, "header on mirrored copies naming the rule that sampled them"),
    Option("metrics_listen", "MIRROR_METRICS_LISTEN", "--metrics-listen", "0.0.0.0:9464", _optional_listen, "Prometheus /metrics address; 'off' disables"),
    Option("log_level", "MIRROR_LOG_LEVEL", "--log-level", "info", _choice("debug", "info", "warning", "error"), "log level"),
    Option("log_format", "MIRROR_LOG_FORMAT", "--log-format", "auto", _choice("auto", "json", "console"), "auto: console on a terminal, JSON lines otherwise"),
    Option("tls_cert", "MIRROR_TLS_CERT", "--tls-cert", "", _text, "PEM certificate chain: serve ext_proc and health over TLS"),
    Option("tls_key", "MIRROR_TLS_KEY", "--tls-key", "", _text, "PEM private key of MIRROR_TLS_CERT"),
    Option("tls_client_ca", "MIRROR_TLS_CLIENT_CA", "--tls-client-ca", "", _text, "PEM CA bundle: require client certificates it signed (mutual TLS)"),
    Option("drain_delay", "MIRROR_DRAIN_DELAY", "--drain-delay", "0", _seconds, "seconds after SIGTERM that the server reports NOT_SERVING but still takes new streams, so health-checking Envoys move away first"),
    Option("shutdown_grace", "MIRROR_SHUTDOWN_GRACE", "--shutdown-grace", "10", _seconds, "seconds open streams get to finish after new streams are refused"),
    Option("workers", "MIRROR_WORKERS", "--workers", "1", _int_range(1, 64), "sampler processes sharing the listen port (SO_REUSEPORT), under one supervisor"),
    Option("methods", "MIRROR_METHODS", "--methods", "", _methods, "simple mode: mirror only these methods, comma-separated (e.g. GET,HEAD); empty: all"),
    Option("max_mirrors_per_second", "MIRROR_MAX_MIRRORS_PER_SECOND", "--max-mirrors-per-second", "", _rate, "cap on mirrored requests per second to each target, per sampler process (routes may set their own)"),
    Option("kill_switch", "MIRROR_KILL_SWITCH", "--kill-switch", "off", _switch, "on: mirror nothing at all (also a MirrorSampler document in the route file)"),
)


@dataclass(frozen=True)
class Settings:
    listen: str
    config: str
    backend: str
    percent: int | None
    fraction: Fraction | None
    primary: str
    key: tuple[KeySource, ...]
    salt: str
    slot_prefix: str
    slots: int
    marker_header: str
    metrics_listen: str
    log_level: str
    log_format: str
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    drain_delay: float
    shutdown_grace: float
    workers: int = 1
    methods: frozenset[str] = frozenset()
    max_mirrors_per_second: float | None = None
    kill_switch: bool = False

    @staticmethod
    def load(environ: Mapping[str, str], overrides: Mapping[str, str | None] | None = None) -> Settings:
        """Flags (``overrides``, by field name) over environment over defaults."""
        overrides = overrides or {}
        values: dict[str, Any] = {}
        problems: list[str] = []
        for opt in OPTIONS:
            raw = overrides.get(opt.name)
            origin = f"{opt.flag}" if raw is not None else opt.env
            if raw is None:
                raw = environ.get(opt.env)
            if raw is None or raw == "" and opt.default == "":
                raw = opt.default
                origin = f"{opt.env} (default)"
            if raw == "" and opt.name in ("percent", "fraction", "max_mirrors_per_second"):
                values[opt.name] = None
                continue
            try:
                values[opt.name] = opt.parse(raw)
            except ValueError as e:
                problems.append(f"{origin}: {e}")
        if problems:
            raise ConfigError(problems)
        settings = Settings(**values)
        settings._check_mode()
        return settings

    def _check_mode(self) -> None:
        simple = [o.env for o in OPTIONS if o.name in ("backend", "percent", "fraction", "methods") and getattr(self, o.name) not in ("", None, frozenset())]
        if self.config and self.backend:
            raise ConfigError(["MIRROR_BACKEND and MIRROR_CONFIG are both set: choose simple mode (MIRROR_BACKEND) or route mode (MIRROR_CONFIG)"])
        if self.config and simple:
            raise ConfigError([f"{', '.join(simple)} only apply in simple mode, but MIRROR_CONFIG is set; put percent/fraction in the HTTPRoute instead"])
        if not self.config and not self.backend:
            if simple:
                raise ConfigError([f"{', '.join(simple)} set without MIRROR_BACKEND: name the mirror backend"])
            raise ConfigError(["nothing to mirror: set MIRROR_BACKEND (simple mode) or MIRROR_CONFIG/--config (route mode)"])
        if self.backend and self.backend == self.primary:
            raise ConfigError([f"MIRROR_BACKEND: mirror backend {self.backend!r} is the same as MIRROR_PRIMARY"])
        problems = []
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("MIRROR_TLS_CERT and MIRROR_TLS_KEY: set both, or neither")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("MIRROR_TLS_CLIENT_CA: mutual TLS needs MIRROR_TLS_CERT and MIRROR_TLS_KEY too")
        for opt_env, value in (("MIRROR_BACKEND", self.backend), ("MIRROR_PRIMARY", self.primary)):
            if value and (not _NAME.match(value) or value == RESERVED_CLUSTER):
                problems.append(f"{opt_env}: must be a lower-case DNS-1123 name other than {RESERVED_CLUSTER!r}, got {value!r}")
        slots = {f"{self.slot_prefix}{i}" for i in range(self.slots)}
        if self.marker_header in slots:
            problems.append(f"MIRROR_MARKER_HEADER: {self.marker_header!r} is also a slot header (MIRROR_SLOT_PREFIX, MIRROR_SLOTS)")
        for source in self.key:
            if source.kind is KeyKind.HEADER and (source.name in slots or source.name == self.marker_header):
                problems.append(f"MIRROR_KEY: {source} is a header the sampler and Envoy strip from every request, so it would never be present")
        if self.marker_header in ("x-request-id", "traceparent"):
            problems.append(f"MIRROR_MARKER_HEADER: {self.marker_header!r} is stripped from every client request; choose a header of its own")
        if problems:
            raise ConfigError(problems)

    def to_environ(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env: dict[str, str] = {}
        for opt in OPTIONS:
            v = getattr(self, opt.name)
            if v is None:
                continue
            if opt.name == "key":
                v = ",".join(map(str, v))
            elif isinstance(v, frozenset):
                v = ",".join(sorted(v))
            elif isinstance(v, bool):
                v = "on" if v else "off"
            elif isinstance(v, float):
                v = repr(v)
            env[opt.env] = str(v) if v != "" else ("off" if opt.name == "metrics_listen" else "")
        return env

    def effective(self) -> dict[str, object]:
        """What the start-up log line shows."""
        out: dict[str, object] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "key":
                v = ",".join(map(str, v))
            elif f.name == "salt":
                # A known salt lets a client pick keys that land in the sample.
                v = "(set)" if v else ""
            elif isinstance(v, Fraction):
                v = str(v)
            elif isinstance(v, frozenset):
                v = ",".join(sorted(v))
            out[f.name] = v
        return out


# --------------------------------------------------------------------------
# HTTPRoute manifests.

API_VERSIONS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_HOSTNAME = re.compile(rf"^(\*\.)?{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_NAME = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
# Characters no header value may carry (and no path Envoy accepts).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_IGNORED_FILTERS = ("RequestRedirect", "URLRewrite", "ResponseHeaderModifier", "ExtensionRef", "CORS", "ExternalAuth")


class _Problems:
    """Collects errors with a location prefix so that every one names its field."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{self.where}: {path}: {message}" if path else f"{self.where}: {message}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _mapping(p: _Problems, path: str, value: object, required: bool = False) -> dict[str, Any]:
    if value is None:
        if required:
            p.add(path, "is required")
        return {}
    if not isinstance(value, dict):
        p.add(path, f"must be a mapping, got {type(value).__name__}")
        return {}
    return value


def _list(p: _Problems, path: str, value: object) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        p.add(path, f"must be a list, got {type(value).__name__}")
        return []
    return value


def _string(p: _Problems, path: str, value: object, required: bool = True) -> str | None:
    if value is None:
        if required:
            p.add(path, "is required")
        return None
    if not isinstance(value, str) or (required and not value):
        p.add(path, f"must be a non-empty string, got {value!r}")
        return None
    return value


def _parse_fraction_field(p: _Problems, path: str, mirror: dict[str, Any]) -> Fraction | None:
    """GEP-3171: fraction wins over percent; neither means 100%."""
    percent = mirror.get("percent")
    fraction = mirror.get("fraction")
    percent_ok = percent is None or (_is_int(percent) and 0 <= percent <= 100)
    if not percent_ok:
        # Reported even when fraction wins: it is still invalid input.
        p.add(f"{path}.percent", f"must be an integer 0..100, got {percent!r}")
    if fraction is not None:
        f = _mapping(p, f"{path}.fraction", fraction)
        if not f and fraction != {}:
            return None
        num, den = f.get("numerator", 100), f.get("denominator", 100)
        ok = True
        if not _is_int(num) or num < 0:
            p.add(f"{path}.fraction.numerator", f"must be an integer >= 0, got {num!r}")
            ok = False
        if not _is_int(den) or den < 1:
            p.add(f"{path}.fraction.denominator", f"must be an integer >= 1, got {den!r}")
            ok = False
        if ok and num > den:
            p.add(f"{path}.fraction", f"numerator must be <= denominator, got {num}/{den}")
            ok = False
        for extra in set(f) - {"numerator", "denominator"}:
            p.add(f"{path}.fraction.{extra}", "unknown field; allowed: numerator, denominator")
            ok = False
        return Fraction(num, den) if ok and percent_ok else None
    if not percent_ok:
        return None
    return Fraction(100 if percent is None else percent, 100)


def _regex_problem(pattern: str) -> str | None:
    """Compiled with RE2 under Envoy's program-size limit: what Envoy refuses,
    check-config refuses."""
    try:
        compile_regex(pattern)
    except re2.error as e:
        message = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        return f"not a regular expression Envoy (RE2) accepts: {pattern!r}: {message}"
    return None


def _parse_value_matches(p: _Problems, path: str, items: object, header: bool) -> tuple[ValueMatch, ...]:
    out: list[ValueMatch] = []
    seen: set[str] = set()
    for i, raw in enumerate(_list(p, path, items)):
        where = f"{path}[{i}]"
        item = _mapping(p, where, raw, required=True)
        if not item:
            continue
        name = _string(p, f"{where}.name", item.get("name"))
        value = item.get("value")
        if not isinstance(value, str) or (_CONTROL.search(value) and item.get("type", "Exact") == "Exact"):
            p.add(f"{where}.value", f"must be a string without control characters, got {value!r}")
            continue
        kind = item.get("type", "Exact")
        if kind not in ("Exact", "RegularExpression"):
            p.add(f"{where}.type", f"must be Exact or RegularExpression, got {kind!r}")
            continue
        if name is None:
            continue
        if header:
            if not is_header_name(name):
                p.add(f"{where}.name", f"{name!r} is not a valid header name")
                continue
            name = name.lower()
        # Gateway API: later entries with an equivalent name are ignored.
        if name in seen:
            continue
        seen.add(name)
        problem = _regex_problem(value) if kind == "RegularExpression" else None
        if problem:
            p.add(f"{where}.value", problem)
        else:
            out.append(ValueMatch(name, value, ValueType(kind)))
    return tuple(out)


def _parse_match(p: _Problems, path: str, raw: object) -> Match | None:
    m = _mapping(p, path, raw)
    n_before = len(p.items)
    path_spec = _mapping(p, f"{path}.path", m.get("path"))
    ptype = path_spec.get("type", "PathPrefix")
    pvalue = path_spec.get("value", "/")
    path_match = PathMatch()
    if ptype not in ("Exact", "PathPrefix", "RegularExpression"):
        p.add(f"{path}.path.type", f"must be Exact, PathPrefix or RegularExpression, got {ptype!r}")
    elif not isinstance(pvalue, str) or (ptype != "RegularExpression" and not pvalue.startswith("/")):
        p.add(f"{path}.path.value", f"must be a string starting with '/', got {pvalue!r}")
    elif ptype != "RegularExpression" and any(c in pvalue for c in "?#") or _CONTROL.search(pvalue):
        p.add(f"{path}.path.value", f"must not contain '?', '#' or control characters (the query is not part of the path), got {pvalue!r}")
    else:
        problem = _regex_problem(pvalue) if ptype == "RegularExpression" else None
        if problem:
            p.add(f"{path}.path.value", problem)
        else:
            path_match = PathMatch(PathType(ptype), pvalue)
    headers = _parse_value_matches(p, f"{path}.headers", m.get("headers"), header=True)
    query = _parse_value_matches(p, f"{path}.queryParams", m.get("queryParams"), header=False)
    method = m.get("method")
    if method is not None and method not in METHODS:
        p.add(f"{path}.method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    if len(p.items) > n_before:
        return None
    return Match(path_match, headers, query, method)


def _parse_header_modifier(p: _Problems, path: str, raw: object) -> HeaderModifier:
    spec = _mapping(p, path, raw, required=True)
    pairs: dict[str, tuple[tuple[str, str], ...]] = {}
    for op in ("set", "add"):
        items = []
        for i, item in enumerate(_list(p, f"{path}.{op}", spec.get(op))):
            item = _mapping(p, f"{path}.{op}[{i}]", item, required=True)
            name = _string(p, f"{path}.{op}[{i}].name", item.get("name"))
            value = item.get("value")
            if not isinstance(value, str) or _CONTROL.search(value):
                p.add(f"{path}.{op}[{i}].value", f"must be a string without control characters, got {value!r}")
            elif name is not None and _modifiable(p, f"{path}.{op}[{i}].name", name, allow_host=op == "set"):
                items.append((name, value))
        pairs[op] = tuple(items)
    remove = []
    for i, name in enumerate(_list(p, f"{path}.remove", spec.get("remove"))):
        if not isinstance(name, str):
            p.add(f"{path}.remove[{i}]", f"must be a header name, got {name!r}")
        elif _modifiable(p, f"{path}.remove[{i}]", name, allow_host=False):
            remove.append(name)
    return HeaderModifier(pairs["set"], pairs["add"], tuple(remove))


def _modifiable(p: _Problems, path: str, name: str, allow_host: bool) -> bool:
    """Envoy may not add or remove Host or pseudo-headers; setting Host is a host rewrite."""
    if not is_header_name(name):
        p.add(path, f"{name!r} is not a valid header name")
        return False
    if name.lower() == "host" and not allow_host:
        p.add(path, "Host can only be set (a host rewrite), not added or removed")
        return False
    return True


def _parse_rule(p: _Problems, path: str, raw: object, rule_id: str, slots: int) -> Rule | None:
    r = _mapping(p, path, raw)
    n_before = len(p.items)
    raw_matches = _list(p, f"{path}.matches", r.get("matches"))
    # A rule with no matches matches PathPrefix "/".
    matches = tuple(_parse_match(p, f"{path}.matches[{i}]", m) for i, m in enumerate(raw_matches)) or (Match(),)
    mirrors: list[MirrorTarget] = []
    modifier: HeaderModifier | None = None
    for i, raw_filter in enumerate(_list(p, f"{path}.filters", r.get("filters"))):
        fpath = f"{path}.filters[{i}]"
        flt = _mapping(p, fpath, raw_filter, required=True)
        ftype = flt.get("type")
        if ftype == "RequestMirror":
            mirror = _mapping(p, f"{fpath}.requestMirror", flt.get("requestMirror"), required=True)
            ref = _mapping(p, f"{fpath}.requestMirror.backendRef", mirror.get("backendRef"), required=True)
            name = _backend_name(p, f"{fpath}.requestMirror.backendRef.name", ref.get("name")) if ref else None
            fraction = _parse_fraction_field(p, f"{fpath}.requestMirror", mirror)
            port = ref.get("port") if ref else None
            if port is not None and (not _is_int(port) or not 1 <= port <= 65535):
                p.add(f"{fpath}.requestMirror.backendRef.port", f"must be an integer 1..65535, got {port!r}")
                continue
            if name is None or fraction is None:
                continue
            if any(m.backend == name for m in mirrors):
                p.add(fpath, f"rule {rule_id} mirrors backend {name!r} twice; each RequestMirror in a rule must name a different backend")
                continue
            mirrors.append(MirrorTarget(name, fraction, len(mirrors), port))
        elif ftype == "RequestHeaderModifier":
            modifier = _parse_header_modifier(p, f"{fpath}.requestHeaderModifier", flt.get("requestHeaderModifier"))
        elif ftype not in _IGNORED_FILTERS:
            allowed = ", ".join(("RequestMirror", "RequestHeaderModifier") + _IGNORED_FILTERS)
            p.add(f"{fpath}.type", f"unknown filter type {ftype!r}; allowed: {allowed}")
    if len(mirrors) > slots:
        p.add(f"{path}.filters", f"rule {rule_id} has {len(mirrors)} mirrors but only {slots} slot headers (raise MIRROR_SLOTS)")
    backends: list[BackendRef] = []
    for i, raw_ref in enumerate(_list(p, f"{path}.backendRefs", r.get("backendRefs"))):
        bpath = f"{path}.backendRefs[{i}]"
        ref = _mapping(p, bpath, raw_ref, required=True)
        name = _backend_name(p, f"{bpath}.name", ref.get("name"))
        weight, port = ref.get("weight", 1), ref.get("port")
        if not _is_int(weight) or not 0 <= weight <= 1_000_000:
            p.add(f"{bpath}.weight", f"must be an integer 0..1000000, got {weight!r}")
        elif port is not None and (not _is_int(port) or not 1 <= port <= 65535):
            p.add(f"{bpath}.port", f"must be an integer 1..65535, got {port!r}")
        elif name is not None:
            if any(m.backend == name for m in mirrors):
                p.add(bpath, f"rule {rule_id} mirrors to its own primary backend {name!r}")
            backends.append(BackendRef(name, port, weight))
    if len(p.items) > n_before or any(m is None for m in matches):
        return None
    if not any(b.weight > 0 for b in backends):
        # Gateway API answers such a rule with a 500, and Envoy cannot mirror
        # a direct response: its mirrors are never sent, so never decided.
        mirrors = []
    return Rule(rule_id, tuple(m for m in matches if m is not None), tuple(mirrors), tuple(backends), modifier)


def _backend_name(p: _Problems, path: str, value: object) -> str | None:
    name = _string(p, path, value)
    if name is None:
        return None
    if not _NAME.match(name) or len(name) > 253:
        p.add(path, f"must be a lower-case DNS-1123 name (a Service name), got {name!r}")
        return None
    if name == RESERVED_CLUSTER:
        p.add(path, f"{name!r} is the sampler's own Envoy cluster; name the backend differently")
        return None
    return name


def _parse_route(doc: dict[str, Any], where: str, slots: int) -> tuple[Route | None, list[str]]:
    meta = doc.get("metadata")
    p = _Problems(where)
    meta = _mapping(p, "metadata", meta, required=True)
    name = _string(p, "metadata.name", meta.get("name"))
    if name is not None and (not _NAME.match(name) or len(name) > 253):
        p.add("metadata.name", f"must be a lower-case DNS-1123 name, got {name!r}")
        name = None
    namespace = meta.get("namespace", "default")
    if not isinstance(namespace, str) or not _NAME.match(namespace):
        p.add("metadata.namespace", f"must be a DNS-1123 name, got {namespace!r}")
        namespace = "default"
    if name is not None:
        p.where = f"{where}: HTTPRoute {namespace}/{name}"
    created = _timestamp(p, meta.get("creationTimestamp"))
    spec = _mapping(p, "spec", doc.get("spec"), required=True)
    hostnames: list[str] = []
    for i, h in enumerate(_list(p, "spec.hostnames", spec.get("hostnames"))):
        if not isinstance(h, str) or not _HOSTNAME.match(h) or len(h) > 253:
            p.add(f"spec.hostnames[{i}]", f"must be a lower-case DNS name, optionally starting with '*.', got {h!r}")
        else:
            hostnames.append(h)
    raw_rules = _list(p, "spec.rules", spec.get("rules")) or [{}]
    rules = [
        _parse_rule(p, f"spec.rules[{i}]", raw, f"{namespace}/{name}/{i}", slots) for i, raw in enumerate(raw_rules)
    ]
    if p.items or name is None:
        return None, p.items
    annotations = _mapping(p, "metadata.annotations", meta.get("annotations"))
    methods = _route_methods(p, annotations)
    cap = _route_cap(p, annotations)
    if p.items:
        return None, p.items
    kept = tuple(dataclasses.replace(r, methods=methods, max_mirrors_per_second=cap) for r in rules if r is not None)
    return Route(namespace, name, tuple(dict.fromkeys(hostnames)), kept, created, where), []


METHODS_ANNOTATION = "mirror-sampler.io/methods"


CAP_ANNOTATION = "mirror-sampler.io/max-mirrors-per-second"


def _route_cap(p: _Problems, annotations: dict[str, Any]) -> float | None:
    value = annotations.get(CAP_ANNOTATION)
    if value is None:
        return None
    try:
        return _rate(str(value))
    except ValueError as e:
        p.add(f"metadata.annotations.{CAP_ANNOTATION}", str(e))
        return None


def _route_methods(p: _Problems, annotations: dict[str, Any]) -> frozenset[str]:
    """mirror-sampler.io/methods: mirror only these methods (mirrored writes
    have side effects); Gateway API itself mirrors every method."""
    value = annotations.get(METHODS_ANNOTATION)
    if value is None:
        return frozenset()
    if not isinstance(value, str):
        p.add(f"metadata.annotations.{METHODS_ANNOTATION}", f"must be a comma-separated string of methods, got {value!r}")
        return frozenset()
    try:
        return _methods(value)
    except ValueError as e:
        p.add(f"metadata.annotations.{METHODS_ANNOTATION}", str(e))
        return frozenset()


def _timestamp(p: _Problems, value: object) -> str:
    """creationTimestamp as a sortable UTC string ("" when absent)."""
    if value is None:
        return ""
    try:
        when = value if isinstance(value, datetime.datetime) else datetime.datetime.fromisoformat(str(value))
    except ValueError:
        p.add("metadata.creationTimestamp", f"must be an RFC 3339 time like 2024-06-01T05:00:00Z, got {value!r}")
        return ""
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    try:
        utc = when.astimezone(datetime.timezone.utc)
    except OverflowError:  # an offset that pushes year 1 or 9999 out of range
        p.add("metadata.creationTimestamp", f"is out of range, got {value!r}")
        return ""
    # Fixed width, so that text order is time order (fractions of a second included).
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Loader(yaml.SafeLoader):
    """SafeLoader that leaves timestamps as text (PyYAML raises a bare
    ValueError on impossible dates; _timestamp reports them by field) and
    refuses aliases, which make recursive or exponentially large documents."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not supported in route files", event.start_mark)
        return super().compose_node(parent, index)


_Loader.yaml_implicit_resolvers = {
    k: [(tag, regexp) for tag, regexp in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _unencodable(value: object, path: str = "") -> Iterator[str]:
    """Paths of strings that are not valid Unicode text (YAML "\\ud800" escapes)."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            yield path or "(document)"
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _unencodable(k, path)
            yield from _unencodable(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _unencodable(v, f"{path}[{i}]")


def parse_routes(text: str, source: str, slots: int = 2) -> tuple[list[Route], list[str]]:
    """HTTPRoutes from multi-document YAML; other kinds are skipped."""
    routes, _, problems = parse_manifests(text, source, slots)
    return routes, problems


SWITCH_API = "mirror-sampler.io/v1alpha1"
SWITCH_KIND = "MirrorSampler"


def _mirroring(doc: dict[str, Any], where: str) -> tuple[bool | None, list[str]]:
    """A MirrorSampler document: spec.mirroring Enabled or Disabled (the kill switch)."""
    p = _Problems(where)
    if doc.get("apiVersion") != SWITCH_API:
        p.add("apiVersion", f"must be {SWITCH_API} for a {SWITCH_KIND}, got {doc.get('apiVersion')!r}")
        return None, p.items
    value = _mapping(p, "spec", doc.get("spec"), required=True).get("mirroring")
    if value not in ("Enabled", "Disabled"):
        p.add("spec.mirroring", f"must be Enabled or Disabled, got {value!r}")
        return None, p.items
    return value == "Enabled", []


def parse_manifests(text: str, source: str, slots: int = 2) -> tuple[list[Route], bool, list[str]]:
    """HTTPRoutes, and whether mirroring is enabled (a MirrorSampler document
    may switch it off), from multi-document YAML; other kinds are skipped."""
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))
    except RecursionError:
        return [], True, [f"{source}: not valid YAML: nested too deeply"]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return [], True, [f"{source}: not valid YAML{at}: {getattr(e, 'problem', None) or e}"]
    routes: list[Route] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    enabled = True
    for i, doc in enumerate(docs):
        where = f"{source} (document {i + 1})"
        if doc is None:
            continue
        if not isinstance(doc, dict):
            problems.append(f"{where}: must be a mapping with apiVersion and kind, got {type(doc).__name__}")
            continue
        bad_text = list(_unencodable(doc))
        if bad_text:
            problems.extend(f"{where}: {path}: must be valid Unicode text (lone surrogate escape)" for path in bad_text)
            continue
        if doc.get("kind") == SWITCH_KIND:
            switch, errors = _mirroring(doc, where)
            problems.extend(errors)
            enabled = enabled and switch is not False
            continue
        if doc.get("kind") != "HTTPRoute":
            # Services, Deployments, Gateways... may share the file.
            continue
        if doc.get("apiVersion") not in API_VERSIONS:
            problems.append(f"{where}: apiVersion: must be one of {', '.join(API_VERSIONS)} for an HTTPRoute, got {doc.get('apiVersion')!r}")
            continue
        route, errors = _parse_route(doc, where, slots)
        problems.extend(errors)
        if route is not None:
            if route.id in seen:
                problems.append(f"{where}: HTTPRoute {route.id} is already defined in {seen[route.id]}")
            else:
                seen[route.id] = where
                routes.append(route)
    if not routes and not problems:
        problems.append(f"{source}: no HTTPRoute ({', '.join(API_VERSIONS)}) found")
    return routes, enabled, problems


SIMPLE_RULE_ID = "simple"
RESERVED_CLUSTER = "mirror-sampler"


def _reserved_headers(settings: Settings) -> set[str]:
    return {f"{settings.slot_prefix}{i}" for i in range(settings.slots)} | {settings.marker_header}


def _cross_route_problems(routes: list[Route], settings: Settings) -> list[str]:
    """What no single rule shows: one backend at two ports; a header modifier
    that would put a slot or marker header on a backend's request."""
    problems: list[str] = []
    ports: dict[str, tuple[int, str]] = {}
    reserved = _reserved_headers(settings)
    for route in routes:
        for rule in route.rules:
            refs = [(b.name, b.port) for b in rule.backends] + [(m.backend, m.port) for m in rule.mirrors]
            for name, port in refs:
                if port is None:
                    continue
                first = ports.setdefault(name, (port, rule.id))
                if first[0] != port:
                    problems.append(
                        f"{route.source}: rule {rule.id}: backend {name!r} at port {port}, but rule {first[1]} has it at port {first[0]}; "
                        "one Envoy cluster per backend name needs one port"
                    )
            mod = rule.header_modifier
            names = [n for n, _ in (mod.set + mod.add)] + list(mod.remove) if mod else []
            for n in names:
                if n.lower() in reserved:
                    problems.append(f"{route.source}: rule {rule.id}: RequestHeaderModifier names {n!r}, which the sampler owns (a slot or the marker header)")
    return problems


def build_policy(settings: Settings, manifest_text: str | None = None) -> Policy:
    """The Policy the server runs; ``manifest_text`` is the MIRROR_CONFIG file."""
    if settings.config:
        if manifest_text is None:
            raise ConfigError([f"MIRROR_CONFIG: {settings.config}: no manifest text given"])
        routes, enabled, problems = parse_manifests(manifest_text, settings.config, settings.slots)
        problems += _cross_route_problems(routes, settings)
        if settings.max_mirrors_per_second is not None:
            routes = [
                dataclasses.replace(r, rules=tuple(
                    rule if rule.max_mirrors_per_second is not None else dataclasses.replace(rule, max_mirrors_per_second=settings.max_mirrors_per_second)
                    for rule in r.rules
                ))
                for r in routes
            ]
        if problems:
            raise ConfigError(problems)
    else:
        fraction = settings.fraction or Fraction(100 if settings.percent is None else settings.percent)
        rule = Rule(SIMPLE_RULE_ID, (Match(),), (MirrorTarget(settings.backend, fraction, 0),), (BackendRef(settings.primary),), methods=settings.methods, max_mirrors_per_second=settings.max_mirrors_per_second)
        routes = [Route("", SIMPLE_RULE_ID, (), (rule,))]
        enabled = True
    return Policy(
        routes=tuple(routes),
        key_chain=settings.key or DEFAULT_KEY_CHAIN,
        salt=settings.salt.encode(),
        slot_prefix=settings.slot_prefix,
        slots=settings.slots,
        marker_header=settings.marker_header,
        enabled=enabled and not settings.kill_switch,
    )
