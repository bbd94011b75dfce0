"""Settings: one option table drives the CLI flags, the environment variables
and the README's configuration table (pure).

Nothing here reads files or the process environment: callers pass the
environment mapping, so the same code serves start-up, ``check-config`` and
the tests.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..core.keys import KeyKind, KeySource, parse_key_chain
from ..core.policy import SAMPLER_CLUSTER
from ..core.sampling import Fraction
from ..core.slots import (
    DEFAULT_COUNT,
    DEFAULT_MARKER,
    DEFAULT_PREFIX,
    DEFAULT_SLOT_HEADERS,
    MAX_COUNT,
    MIN_COUNT,
    SlotHeaders,
    SlotHeadersError,
    slot_header_name,
)
from .addresses import split_address
from .errors import ConfigError


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


def parse_fraction_text(value: str) -> Fraction:
    """``N/D`` as in ``MIRROR_FRACTION=5/1000``."""
    num, sep, den = value.strip().partition("/")
    try:
        n, d = int(num), int(den)
    except ValueError:
        raise ValueError(f"must be NUMERATOR/DENOMINATOR, e.g. 5/1000, got {value!r}") from None
    if not sep:
        raise ValueError(f"must be NUMERATOR/DENOMINATOR, e.g. 5/1000, got {value!r}")
    return Fraction(n, d)  # FractionError is a ValueError naming the part


def _text(value: str) -> str:
    return value


def parse_methods(value: str) -> frozenset[str]:
    methods = frozenset(m.strip().upper() for m in value.split(",") if m.strip())
    unknown = sorted(methods - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; allowed: {', '.join(METHODS)}")
    return methods


MIN_RATE, MAX_RATE = 0.000001, 1_000_000


def parse_rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        rate = -1.0
    # The floor (one mirror in 11.6 days) keeps the dynamic module's bucket interval, 1e9 / rate
    # nanoseconds, inside its uint64_t (extproc/module/config.c checks the same).
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"must be a number of mirrors per second, 0.000001 <= rate <= 1000000, got {value!r}")
    return rate


_ON = ("on", "true", "yes", "1")
_OFF = ("off", "false", "no", "0")


def parse_switch(value: str) -> bool:
    """The one spelling of booleans, for every switch: on/off (true/false, yes/no, 1/0)."""
    v = value.strip().lower()
    if v not in _ON + _OFF:
        raise ValueError(f"must be on or off, got {value!r}")
    return v in _ON


# The in-process engines (MIRROR_INLINE): "on" is the default one, Lua, which any
# Envoy with Lua runs and needs no compiler; the dynamic module (C) adds Envoy stats
# and rate caps but needs Envoy 1.39 or 1.40 and a C compiler (docs/module.md).
INLINE_ENGINES = ("lua", "module")
DEFAULT_INLINE = "lua"


def parse_inline(value: str, default: str = DEFAULT_INLINE) -> str:
    """ "" (off: the ext_proc sampler decides), "lua" or "module"; on means ``default``
    (Lua, except where it is not offered: `convert envoy-gateway` and `convert istio`)."""
    v = value.strip().lower()
    if v in INLINE_ENGINES:
        return v
    try:
        return default if parse_switch(v) else ""
    except ValueError:
        raise ValueError(f"must be off, on (= {default}), {' or '.join(INLINE_ENGINES)}; got {value!r}") from None


SAMPLER = "sampler"  # serve, check-config, explain, envoy-config, up
ENVOY = "envoy"  # envoy-config and up: the Envoy they configure or run


@dataclass(frozen=True)
class Option:
    name: str  # the field of Settings (scope SAMPLER) or EnvoySettings (scope ENVOY)
    env: str
    flag: str | None
    default: str
    parse: Callable[[str], Any]
    help: str
    scope: str = SAMPLER

    @property
    def is_switch(self) -> bool:
        """A flag without a value: given means on."""
        return self.parse is parse_switch

    @property
    def value_optional(self) -> bool:
        """A flag whose value may be left out (``--inline`` or ``--inline module``): alone, it means on."""
        return self.parse is parse_inline


OPTIONS: tuple[Option, ...] = (
    Option("listen", "MIRROR_LISTEN", "--listen", "0.0.0.0:50051", _listen, "ext_proc gRPC address (health service on the same port)"),
    Option("config", "MIRROR_CONFIG", "--config", "", _text, "file of Gateway API HTTPRoute manifests (route mode); watched for changes"),
    Option("backend", "MIRROR_BACKEND", "--backend", "", _text, "simple mode: the mirror backend (Envoy cluster) for all requests"),
    Option("percent", "MIRROR_PERCENT", "--percent", "", _int_range(0, 100), "simple mode: percentage mirrored, 0..100 (default 100)"),
    Option(
        "fraction",
        "MIRROR_FRACTION",
        "--fraction",
        "",
        parse_fraction_text,
        "simple mode: fraction mirrored, N/D; wins over MIRROR_PERCENT",
    ),
    Option("primary", "MIRROR_PRIMARY", "--primary", "backend", _text, "simple mode: the primary backend, used by envoy-config and up"),
    Option(
        "key",
        "MIRROR_KEY",
        "--key",
        "header:x-request-id",
        parse_key_chain,
        "key sources tried in order, comma-separated: header:NAME, cookie:NAME, query:NAME, traceparent",
    ),
    Option("salt", "MIRROR_SALT", "--salt", "", _text, "salt hashed before the key; change it to draw an independent sample"),
    Option(
        "slot_prefix",
        "MIRROR_SLOT_PREFIX",
        "--slot-prefix",
        DEFAULT_PREFIX,
        slot_header_name,
        "slot header prefix; slots are <prefix>0, <prefix>1, ...",
    ),
    Option(
        "slots",
        "MIRROR_SLOTS",
        "--slots",
        str(DEFAULT_COUNT),
        _int_range(MIN_COUNT, MAX_COUNT),
        "slot headers per rule, the most mirrors one rule may have",
    ),
    Option(
        "marker_header",
        "MIRROR_MARKER_HEADER",
        "--marker-header",
        DEFAULT_MARKER,
        slot_header_name,
        "header on mirrored copies naming the rule that sampled them",
    ),
    Option(
        "metrics_listen",
        "MIRROR_METRICS_LISTEN",
        "--metrics-listen",
        "0.0.0.0:9464",
        _optional_listen,
        "Prometheus /metrics address; 'off' disables",
    ),
    Option("log_level", "MIRROR_LOG_LEVEL", "--log-level", "info", _choice("debug", "info", "warning", "error"), "log level"),
    Option(
        "log_format",
        "MIRROR_LOG_FORMAT",
        "--log-format",
        "auto",
        _choice("auto", "json", "console"),
        "auto: console on a terminal, JSON lines otherwise",
    ),
    Option("tls_cert", "MIRROR_TLS_CERT", "--tls-cert", "", _text, "PEM certificate chain: serve ext_proc and health over TLS"),
    Option("tls_key", "MIRROR_TLS_KEY", "--tls-key", "", _text, "PEM private key of MIRROR_TLS_CERT"),
    Option(
        "tls_client_ca",
        "MIRROR_TLS_CLIENT_CA",
        "--tls-client-ca",
        "",
        _text,
        "PEM CA bundle: require client certificates it signed (mutual TLS)",
    ),
    Option(
        "drain_delay",
        "MIRROR_DRAIN_DELAY",
        "--drain-delay",
        "0",
        _seconds,
        "seconds after SIGTERM that the server reports NOT_SERVING but still takes new streams, so health-checking Envoys move away first",
    ),
    Option(
        "shutdown_grace",
        "MIRROR_SHUTDOWN_GRACE",
        "--shutdown-grace",
        "10",
        _seconds,
        "seconds open streams get to finish after new streams are refused",
    ),
    Option(
        "transport",
        "MIRROR_TRANSPORT",
        "--transport",
        "http2",
        _choice("http2", "grpcio"),
        "ext_proc server: http2 (flat memory, least CPU) or grpcio (grpc.aio, the reference)",
    ),
    Option(
        "workers",
        "MIRROR_WORKERS",
        "--workers",
        "1",
        _int_range(1, 64),
        "sampler processes sharing the listen port (SO_REUSEPORT), under one supervisor",
    ),
    Option(
        "methods",
        "MIRROR_METHODS",
        "--methods",
        "",
        parse_methods,
        "simple mode: mirror only these methods, comma-separated (e.g. GET,HEAD); empty: all",
    ),
    Option(
        "max_mirrors_per_second",
        "MIRROR_MAX_MIRRORS_PER_SECOND",
        "--max-mirrors-per-second",
        "",
        parse_rate,
        "cap on mirrored requests per second to each target, per sampler process (routes may set their own)",
    ),
    Option(
        "kill_switch",
        "MIRROR_KILL_SWITCH",
        "--kill-switch",
        "off",
        parse_switch,
        "on: mirror nothing at all (also a MirrorSampler document in the route file)",
    ),
    # The Envoy that envoy-config renders for and up runs.
    Option(
        "listener_port",
        "MIRROR_LISTENER_PORT",
        "--listener-port",
        "10000",
        _int_range(0, 65535),
        "Envoy's listener port (0 picks one)",
        ENVOY,
    ),
    Option("admin_port", "MIRROR_ADMIN_PORT", "--admin-port", "9901", _int_range(0, 65535), "Envoy's admin port (0 picks one)", ENVOY),
    Option(
        "message_timeout_ms",
        "MIRROR_MESSAGE_TIMEOUT_MS",
        "--message-timeout-ms",
        "200",
        _int_range(1, 600_000),
        "ext_proc message_timeout: a slower sampler answer means no mirror",
        ENVOY,
    ),
    Option(
        "inline",
        "MIRROR_INLINE",
        "--inline",
        "off",
        parse_inline,
        "Envoy decides itself, no sampler process: lua (generated Lua per route; what on means) or module (the C dynamic module)",
        ENVOY,
    ),
    Option(
        "sampler_ca",
        "MIRROR_SAMPLER_CA",
        "--sampler-ca",
        "",
        _text,
        "PEM CA Envoy trusts for the sampler's TLS certificate (enables TLS to the sampler)",
        ENVOY,
    ),
    Option(
        "sampler_client_cert",
        "MIRROR_SAMPLER_CLIENT_CERT",
        "--sampler-client-cert",
        "",
        _text,
        "PEM certificate Envoy presents to the sampler (mutual TLS)",
        ENVOY,
    ),
    Option("sampler_client_key", "MIRROR_SAMPLER_CLIENT_KEY", "--sampler-client-key", "", _text, "PEM key of --sampler-client-cert", ENVOY),
)


def _load(
    scope: str, environ: Mapping[str, str], overrides: Mapping[str, str | None], only: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Flags (``overrides``, by field name) over environment over defaults,
    for the options of one scope (``only``: of these names); ConfigError lists
    every problem."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for opt in OPTIONS:
        if opt.scope != scope or (only is not None and opt.name not in only):
            continue
        raw = overrides.get(opt.name)
        origin = f"{opt.flag}" if raw is not None else opt.env
        if raw is None:
            raw = environ.get(opt.env)
        if raw is None or (raw == "" and opt.default == ""):
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
    return values


# The options behind each field of SlotHeaders.
_SLOT_OPTIONS = {"count": "slots", "prefix": "slot_prefix", "marker": "marker_header"}


def _option(name: str) -> Option:
    return next(o for o in OPTIONS if o.name == name)


def _slot_headers(values: Mapping[str, Any]) -> SlotHeaders:
    """The SlotHeaders of parsed option values; ConfigError names the variable at fault."""
    try:
        return SlotHeaders(**{f: values[name] for f, name in _SLOT_OPTIONS.items()})
    except SlotHeadersError as e:
        others = ", ".join(_option(n).env for f, n in _SLOT_OPTIONS.items() if f != e.field)
        raise ConfigError([f"{_option(_SLOT_OPTIONS[e.field]).env}: {e} ({others})"]) from None


def load_slot_headers(environ: Mapping[str, str], overrides: Mapping[str, str | None] | None = None) -> SlotHeaders:
    """The slot headers alone (``convert`` needs no mirror configured): flags
    (``overrides``, by option name) over environment over defaults."""
    return _slot_headers(_load(SAMPLER, environ, overrides or {}, tuple(_SLOT_OPTIONS.values())))


def slot_environment(slot_headers: SlotHeaders) -> dict[str, str]:
    """The variables a sampler must be given to use ``slot_headers``: those
    that differ from the defaults."""
    default = DEFAULT_SLOT_HEADERS
    return {
        _option(name).env: str(getattr(slot_headers, f))
        for f, name in _SLOT_OPTIONS.items()
        if getattr(slot_headers, f) != getattr(default, f)
    }


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
    transport: str = "http2"
    workers: int = 1
    methods: frozenset[str] = frozenset()
    max_mirrors_per_second: float | None = None
    kill_switch: bool = False

    @staticmethod
    def load(environ: Mapping[str, str], overrides: Mapping[str, str | None] | None = None) -> Settings:
        """Flags (``overrides``, by field name) over environment over defaults."""
        settings = Settings(**_load(SAMPLER, environ, overrides or {}))
        settings._check_mode()
        return settings

    def _check_mode(self) -> None:
        simple = [
            o.env
            for o in OPTIONS
            if o.name in ("backend", "percent", "fraction", "methods") and getattr(self, o.name) not in ("", None, frozenset())
        ]
        if self.config and self.backend:
            raise ConfigError(
                ["MIRROR_BACKEND and MIRROR_CONFIG are both set: choose simple mode (MIRROR_BACKEND) or route mode (MIRROR_CONFIG)"]
            )
        if self.config and simple:
            raise ConfigError(
                [f"{', '.join(simple)} only apply in simple mode, but MIRROR_CONFIG is set; put percent/fraction in the HTTPRoute instead"]
            )
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
        # Worker i serves its metrics on the port + i (server.workers); the listen port is shared.
        metrics_port = split_address(self.metrics_listen)[1] if self.metrics_listen and self.workers > 1 else 0
        if metrics_port + self.workers - 1 > 65535:
            problems.append(
                f"MIRROR_METRICS_LISTEN: worker i serves metrics on port {metrics_port} + i, so with MIRROR_WORKERS={self.workers}"
                f" the port must be at most {65536 - self.workers}, got {self.metrics_listen!r}"
            )
        for opt_env, value in (("MIRROR_BACKEND", self.backend), ("MIRROR_PRIMARY", self.primary)):
            if value and (not NAME.match(value) or value == SAMPLER_CLUSTER):
                problems.append(f"{opt_env}: must be a lower-case DNS-1123 name other than {SAMPLER_CLUSTER!r}, got {value!r}")
        try:
            reserved = self.slot_headers.reserved
        except ConfigError as e:
            problems += e.problems
            reserved = ()
        for source in self.key:
            if source.kind is KeyKind.HEADER and source.name in reserved:
                problems.append(
                    f"MIRROR_KEY: {source} is a header the sampler and Envoy strip from every request, so it would never be present"
                )
        if self.marker_header in ("x-request-id", "traceparent"):
            problems.append(
                f"MIRROR_MARKER_HEADER: {self.marker_header!r} is stripped from every client request; choose a header of its own"
            )
        if problems:
            raise ConfigError(problems)

    @property
    def slot_headers(self) -> SlotHeaders:
        return _slot_headers({name: getattr(self, name) for name in _SLOT_OPTIONS.values()})

    def to_environ(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env: dict[str, str] = {}
        for opt in OPTIONS:
            if opt.scope != SAMPLER:
                continue
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


@dataclass(frozen=True)
class EnvoySettings:
    """The Envoy that ``envoy-config`` renders for and ``up`` runs."""

    listener_port: int
    admin_port: int
    message_timeout_ms: int
    inline: str  # "" (the ext_proc sampler decides), or the engine: lua or module
    sampler_ca: str
    sampler_client_cert: str
    sampler_client_key: str

    @staticmethod
    def load(environ: Mapping[str, str], overrides: Mapping[str, str | None] | None = None) -> EnvoySettings:
        settings = EnvoySettings(**_load(ENVOY, environ, overrides or {}))
        problems = []
        if bool(settings.sampler_client_cert) != bool(settings.sampler_client_key):
            problems.append("--sampler-client-cert and --sampler-client-key (MIRROR_SAMPLER_CLIENT_CERT/KEY): set both, or neither")
        if settings.sampler_client_cert and not settings.sampler_ca:
            problems.append("--sampler-client-cert (MIRROR_SAMPLER_CLIENT_CERT): needs --sampler-ca (MIRROR_SAMPLER_CA) too")
        if problems:
            raise ConfigError(problems)
        return settings


METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
NAME = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
HOSTNAME = re.compile(rf"^(\*\.)?{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
