"""The compiled policy: what the sampler decides with (pure).

``config`` builds a Policy from environment or HTTPRoute manifests; the
service, ``explain``, ``envoyconf`` and the inline renderer all read the same
object, so the decision, Envoy's routes and the generated code cannot drift.
A Policy is immutable: reload swaps the whole object, and each ext_proc stream
keeps the snapshot it started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .keys import Headers, KeySource, extract_key
from .matching import Entry, Match, Repeated, RequestView, RouteTable
from .sampling import Fraction, key_hash


class Outcome(str, Enum):
    MIRRORED = "mirrored"
    SKIPPED = "skipped"
    NO_KEY = "no_key"
    METHOD = "method"  # the rule mirrors only other methods
    CAPPED = "capped"  # sampled, but over the target's rate cap (service only)
    DISABLED = "disabled"  # the kill switch is on


@dataclass(frozen=True, slots=True)
class MirrorTarget:
    backend: str  # backendRef name, which is also the Envoy cluster name
    fraction: Fraction
    slot: int  # position among the rule's mirrors: slot header x-...-<slot>
    port: int | None = None  # backendRef port, for generated Envoy clusters
    threshold: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", self.fraction.threshold)


@dataclass(frozen=True, slots=True)
class BackendRef:
    name: str
    port: int | None = None
    weight: int = 1


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    id: str  # namespace/name/index: metrics label, marker header value
    matches: tuple[Match, ...]
    mirrors: tuple[MirrorTarget, ...]
    backends: tuple[BackendRef, ...] = ()
    header_modifier: HeaderModifier | None = None
    # Mirror only requests with these methods; empty: every method.
    methods: frozenset[str] = frozenset()
    # Per target and sampler process; applied by the service (it needs a clock).
    max_mirrors_per_second: float | None = None


@dataclass(frozen=True, slots=True)
class Route:
    namespace: str
    name: str
    hostnames: tuple[str, ...]
    rules: tuple[Rule, ...]
    creation_timestamp: str = ""
    source: str = ""

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class TargetDecision:
    target: MirrorTarget
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Decision:
    rule: Rule | None
    source: KeySource | None = None
    key: bytes | None = None
    u: int | None = None
    targets: tuple[TargetDecision, ...] = ()

    @property
    def sampled(self) -> tuple[MirrorTarget, ...]:
        return tuple(t.target for t in self.targets if t.outcome is Outcome.MIRRORED)


@dataclass(frozen=True)
class Policy:
    routes: tuple[Route, ...]
    key_chain: tuple[KeySource, ...]
    salt: bytes = b""
    slot_prefix: str = "x-mirror-cluster-"
    slots: int = 2
    marker_header: str = "x-mirror-rule"
    # The kill switch: False stops all mirroring (Envoy's routes stay as they are).
    enabled: bool = True
    table: RouteTable[Rule] = field(init=False, repr=False, compare=False)
    rules_by_id: dict[str, Rule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_host: dict[str, list[Entry[Rule]]] = {}
        for route in self.routes:
            for host in route.hostnames or ("",):
                bucket = by_host.setdefault(host, [])
                for ri, rule in enumerate(route.rules):
                    for mi, match in enumerate(rule.matches):
                        bucket.append(Entry(match, rule, route.creation_timestamp, route.id, ri, mi))
        object.__setattr__(self, "table", RouteTable(by_host))
        object.__setattr__(self, "rules_by_id", {rule.id: rule for route in self.routes for rule in route.rules})

    def envoy_shape(self) -> tuple[object, ...]:
        """Everything Envoy's generated routes depend on in ext_proc mode:
        all but the fractions, the key chain and the salt."""
        return (
            self.slot_prefix,
            self.slots,
            self.marker_header,
            tuple(
                (
                    r.namespace, r.name, r.hostnames, r.creation_timestamp,
                    tuple(
                        (rule.id, rule.matches, tuple((m.backend, m.slot, m.port) for m in rule.mirrors), rule.backends, rule.header_modifier)
                        for rule in r.rules
                    ),
                )
                for r in self.routes
            ),
        )

    @property
    def slot_names(self) -> tuple[str, ...]:
        return tuple(f"{self.slot_prefix}{i}" for i in range(self.slots))

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(rule for route in self.routes for rule in route.rules)

    def match(self, headers: Headers, repeated: Repeated | None = None) -> Rule | None:
        entry = self.table.lookup(RequestView(headers, repeated))
        return None if entry is None else entry.rule

    def decide(self, headers: Headers, repeated: Repeated | None = None, rule_id: str | None = None) -> Decision:
        """``rule_id``: the rule Envoy already matched (sent with the stream);
        without it, or if it names no rule of this policy, match here."""
        rule = self.rules_by_id.get(rule_id) if rule_id else None
        if rule is None:
            rule = self.match(headers, repeated)
        return self.decide_rule(rule, headers)

    def decide_rule(self, rule: Rule | None, headers: Headers) -> Decision:
        if rule is None or not rule.mirrors:
            return Decision(rule)
        if not self.enabled:
            return Decision(rule, targets=tuple(TargetDecision(t, Outcome.DISABLED) for t in rule.mirrors))
        if rule.methods and headers.get(":method", b"GET").decode("latin-1") not in rule.methods:
            return Decision(rule, targets=tuple(TargetDecision(t, Outcome.METHOD) for t in rule.mirrors))
        found = extract_key(self.key_chain, headers)
        if found is None:
            return Decision(rule, targets=tuple(TargetDecision(t, Outcome.NO_KEY) for t in rule.mirrors))
        source, key = found
        # One salt per policy: targets share u, so their samples nest.
        u = key_hash(self.salt, key)
        return Decision(
            rule,
            source,
            key,
            u,
            tuple(TargetDecision(t, Outcome.MIRRORED if u < t.threshold else Outcome.SKIPPED) for t in rule.mirrors),
        )
