"""What is compared and how (pure); parsed from the MirrorSampler document's
``compare`` section (docs/compare.md)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config.errors import ConfigError, Problems
from ..config.schema import did_you_mean
from ..core.policy import Route
from .differ import DEFAULT_IGNORED_HEADERS, DiffRules
from .noise import DEFAULT_MARGIN
from .paths import Pattern, PatternError

DEFAULT_BODY_LIMIT = 64 * 1024
# A captured body travels base64 in one access log entry, which the observer
# takes in one gRPC message of at most 4 MiB.
MAX_BODY_LIMIT = 1024 * 1024
DEFAULT_SHADOW_TIMEOUT_S = 15.0  # Envoy's default route timeout
DEFAULT_JOIN_TIMEOUT_S = 30.0
DEFAULT_MAX_PENDING = 10_000
DEFAULT_MAX_COMPARISONS = 100_000
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
# Past these a count overflows SQLite's integers in the sweep's arithmetic, a
# duration protobuf's (Envoy's) and Python's datetime; below a millisecond a
# shadow timeout renders as Envoy's 0, which means no timeout at all.
MAX_COUNT = 10**12
MIN_DURATION_S = 0.001
MAX_DURATION_S = 3650 * 86400.0


@dataclass(frozen=True, slots=True)
class RuleCompare:
    """One compared rule: its targets compared with the primary, and the
    secondary (one of them) whose differences are noise."""

    targets: tuple[str, ...]
    secondary: str | None = None
    diff_rules: DiffRules = field(default_factory=DiffRules)
    margin: float = DEFAULT_MARGIN


@dataclass(frozen=True, slots=True)
class Retention:
    max_comparisons: int = DEFAULT_MAX_COMPARISONS
    max_age_s: float = DEFAULT_MAX_AGE_S
    # Captures waiting for their other side: at most this many, this long.
    max_pending: int = DEFAULT_MAX_PENDING
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class CompareConfig:
    rules: Mapping[str, RuleCompare] = field(default_factory=dict)
    body_limit: int = DEFAULT_BODY_LIMIT
    # Envoy answers 504 for a compared shadow silent this long (shadow_error).
    shadow_timeout_s: float = DEFAULT_SHADOW_TIMEOUT_S
    # Keep the differing values (parts of bodies) of differing pairs; off: paths only.
    store_values: bool = False
    # Response headers never stored (beyond set-cookie and the credentials).
    private_headers: frozenset[str] = frozenset()
    retention: Retention = Retention()
    # Settings from a file (spec.compare): a rule it does not list is not
    # compared, its captures dropped and counted (`unlisted_rule`). Without a
    # file, every rule Envoy captures is compared with the defaults.
    only_listed: bool = False

    def rule(self, rule_id: str) -> RuleCompare:
        return self.rules.get(rule_id) or RuleCompare(targets=())

    def compared(self) -> dict[str, tuple[str, ...]]:
        """Each compared rule's compared targets: what ``envoy.add_capture`` needs."""
        return {rule_id: rule.targets for rule_id, rule in self.rules.items()}


# ---------------------------------------------------------------------------
# Parsing: the ``compare`` mapping (in a MirrorSampler document's spec, or a file of its own)

_TOP = ("rules", "bodyLimit", "shadowTimeout", "storeValues", "privateHeaders", "retention")
_RULE = ("rule", "targets", "secondary", "ignore", "ignoreHeaders", "tolerance", "margin")
_RETENTION = ("maxComparisons", "maxAge", "maxPending", "joinTimeout")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _unknown(p: Problems, path: str, data: Mapping[str, Any], known: tuple[str, ...]) -> None:
    for key in data:
        if key not in known:
            guess = did_you_mean(str(key), known)
            hint = f"did you mean {guess}?" if guess else f"known: {', '.join(known)}"
            p.add(f"{path}{key}", f"unknown field; {hint}")


def _mapping(p: Problems, path: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        p.add(path, f"must be a mapping, got {type(value).__name__}")
        return {}
    return value


def _strings(p: Problems, path: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        p.add(path, "must be a list of non-empty strings")
        return ()
    return tuple(value)


def _number(p: Problems, path: str, value: Any, default: float, *, minimum: float = 0.0, maximum: float | None = None) -> float:
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)  # NaN passes every comparison below, and would make every difference noise
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f"between {minimum:g} and {maximum:g}" if maximum is not None else f"a number >= {minimum:g}"
        p.add(path, f"must be {bound}, got {value!r}")
        return default
    return float(value)


def _count(p: Problems, path: str, value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        p.add(path, f"must be a whole number from 1 to {MAX_COUNT}, got {value!r}")
        return default
    return value


def _body_limit(p: Problems, path: str, value: Any) -> int:
    limit = _count(p, path, value, DEFAULT_BODY_LIMIT)
    if limit > MAX_BODY_LIMIT:
        p.add(path, f"at most {MAX_BODY_LIMIT} bytes (a body travels base64 in one access log entry), got {limit}")
        return DEFAULT_BODY_LIMIT
    return limit


def _duration(p: Problems, path: str, value: Any, default: float) -> float:
    if value is None:
        return default
    text = str(value)
    number, unit = text[:-1], text[-1:]
    # isascii: str.isdigit is true of "²", which float() refuses.
    if unit not in _UNITS or not number.isascii() or not number.replace(".", "", 1).isdigit() or float(number) <= 0:
        p.add(path, f"must be a duration such as 30s, 10m, 12h or 7d, got {value!r}")
        return default
    seconds = float(number) * _UNITS[unit]
    if not MIN_DURATION_S <= seconds <= MAX_DURATION_S:
        p.add(path, f"must be from 1ms (0.001s) to 3650d, got {value!r}")
        return default
    return seconds


def _rule(
    p: Problems, path: str, data: Mapping[str, Any], mirrors: Mapping[str, tuple[str, ...]] | None, reading: bool
) -> tuple[str, RuleCompare] | None:
    _unknown(p, path, data, _RULE)
    rule_id = data.get("rule")
    if not isinstance(rule_id, str) or not rule_id:
        p.add(f"{path}rule", "required: the rule id namespace/route/index (check-config lists them)")
        return None
    known_targets = mirrors.get(rule_id) if mirrors is not None else None
    if mirrors is not None and known_targets is None:
        guess = did_you_mean(rule_id, list(mirrors))
        p.add(f"{path}rule", f"no rule {rule_id!r} mirrors anything" + (f"; did you mean {guess}?" if guess else ""))
    targets = _strings(p, f"{path}targets", data.get("targets")) or (known_targets or ())
    for target in targets:
        if known_targets is not None and target not in known_targets:
            guess = did_you_mean(target, known_targets)
            p.add(f"{path}targets", f"{target!r} is not a mirror target of {rule_id}" + (f"; did you mean {guess}?" if guess else ""))
    if not targets and mirrors is None and not reading:  # with the mirrors known, an unknown rule is reported above
        p.add(f"{path}targets", "required when the rule's mirrors are not known")
    secondary = data.get("secondary")
    if secondary is not None and secondary not in targets and (targets or not reading):
        guess = did_you_mean(str(secondary), targets)
        p.add(f"{path}secondary", f"{secondary!r} is not one of the compared targets" + (f"; did you mean {guess}?" if guess else ""))
    patterns = []
    for i, text in enumerate(_strings(p, f"{path}ignore", data.get("ignore"))):
        try:
            patterns.append(Pattern.of(text))
        except PatternError as e:
            p.add(f"{path}ignore[{i}]", str(e))
    headers = frozenset(h.lower() for h in _strings(p, f"{path}ignoreHeaders", data.get("ignoreHeaders")))
    rules = DiffRules(
        ignored_headers=DEFAULT_IGNORED_HEADERS | headers,
        ignored=tuple(patterns),
        tolerance=_number(p, f"{path}tolerance", data.get("tolerance"), 0.0),
    )
    margin = _number(p, f"{path}margin", data.get("margin"), DEFAULT_MARGIN, maximum=1.0)
    return rule_id, RuleCompare(targets, secondary, rules, margin)


def mirror_targets(routes: Iterable[Route]) -> dict[str, tuple[str, ...]]:
    """Each mirroring rule's id and targets: what ``parse_compare`` checks rules and targets against."""
    return {rule.id: tuple(m.backend for m in rule.mirrors) for route in routes for rule in route.rules if rule.mirrors}


def parse_compare(
    data: Any, where: str, mirrors: Mapping[str, tuple[str, ...]] | None = None, at: str = "compare", reading: bool = False
) -> CompareConfig:
    """The ``compare`` mapping, strictly: every problem named by its field
    (``at``: the mapping's own path, ``spec.compare`` in a MirrorSampler
    document). ``mirrors``: each rule id's mirror targets, when the routes are known.
    ``reading``: for what reads the store (the report, whose targets are stored), so
    targets left to routes that are not known are no problem."""
    p = Problems(where)
    top = _mapping(p, at, data)
    _unknown(p, f"{at}.", top, _TOP)
    rules: dict[str, RuleCompare] = {}
    raw_rules = top.get("rules") or []
    if not isinstance(raw_rules, list):
        p.add(f"{at}.rules", "must be a list")
        raw_rules = []
    for i, entry in enumerate(raw_rules):
        path = f"{at}.rules[{i}]."
        parsed = _rule(p, path, _mapping(p, path.rstrip("."), entry), mirrors, reading)
        if parsed is not None:
            if parsed[0] in rules:
                p.add(f"{path}rule", f"{parsed[0]!r} is listed twice")
            rules[parsed[0]] = parsed[1]
    retention_data = _mapping(p, f"{at}.retention", top.get("retention"))
    _unknown(p, f"{at}.retention.", retention_data, _RETENTION)
    retention = Retention(
        max_comparisons=_count(p, f"{at}.retention.maxComparisons", retention_data.get("maxComparisons"), DEFAULT_MAX_COMPARISONS),
        max_age_s=_duration(p, f"{at}.retention.maxAge", retention_data.get("maxAge"), DEFAULT_MAX_AGE_S),
        max_pending=_count(p, f"{at}.retention.maxPending", retention_data.get("maxPending"), DEFAULT_MAX_PENDING),
        join_timeout_s=_duration(p, f"{at}.retention.joinTimeout", retention_data.get("joinTimeout"), DEFAULT_JOIN_TIMEOUT_S),
    )
    store_values = top.get("storeValues", False)
    if not isinstance(store_values, bool):
        p.add(f"{at}.storeValues", f"must be true or false, got {store_values!r}")
        store_values = False
    config = CompareConfig(
        rules=rules,
        body_limit=_body_limit(p, f"{at}.bodyLimit", top.get("bodyLimit")),
        shadow_timeout_s=_duration(p, f"{at}.shadowTimeout", top.get("shadowTimeout"), DEFAULT_SHADOW_TIMEOUT_S),
        store_values=store_values,
        private_headers=frozenset(h.lower() for h in _strings(p, f"{at}.privateHeaders", top.get("privateHeaders"))),
        retention=retention,
        only_listed=True,
    )
    if config.retention.join_timeout_s <= config.shadow_timeout_s:
        p.add(
            f"{at}.retention.joinTimeout",
            f"must be longer than shadowTimeout ({config.shadow_timeout_s:g}s): a silent shadow's 504 must arrive before the join gives up",
        )
    if p.items:
        raise ConfigError(p.items)
    return config
