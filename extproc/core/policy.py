"""The compiled policy: what the sampler decides with (pure).

``extproc.config`` builds a Policy from environment or HTTPRoute manifests;
the servicer's hot-path ``Plan``, ``explain``, the Envoy configuration and the
inline Lua all read the same object, so the decision, Envoy's routes and the
generated code cannot drift. The decision itself (docs/DESIGN.md) is here:
``gate``, ``target_salt`` and ``in_sample``; ``Plan`` compiles the same steps.
A Policy is immutable: reload swaps the whole object, and each ext_proc stream
keeps the snapshot it started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .headers import Headers, Repeated
from .keys import KeySource, extract_key
from .matching import Entry, Match, RequestView, RouteTable
from .sampling import Fraction, key_hash
from .slots import DEFAULT_SLOT_HEADERS, SlotHeaders

# Envoy's name for the sampler's cluster (and the generated route
# configuration); no backendRef may take it.
SAMPLER_CLUSTER = "mirror-sampler"


class Outcome(StrEnum):
    """What happened to one mirror target of a matched rule; a metrics label."""

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
    # A salt of this target's own (route annotation mirror-sampler.io/target-salts):
    # its sample is then independent of the rule's other targets. None: the
    # policy's salt, shared by all targets, so their samples nest. See target_salt.
    salt: bytes | None = None
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
    # ``methods`` as the raw bytes of :method, derived once for the hot path.
    raw_methods: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw_methods", frozenset(m.encode() for m in self.methods))


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
    # This target's u: the key hashed with target_salt(); None when no key was
    # hashed (no key, or the rule was blocked before hashing).
    u: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    rule: Rule | None
    source: KeySource | None = None
    key: bytes | None = None
    # The key hashed with the policy's salt (None: no key hashed). It is every
    # target's u unless a target has a salt of its own: read TargetDecision.u.
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
    slot_headers: SlotHeaders = DEFAULT_SLOT_HEADERS
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

    @property
    def slot_names(self) -> tuple[str, ...]:
        return self.slot_headers.names

    def envoy_shape(self) -> tuple[object, ...]:
        """Everything Envoy's generated routes depend on in ext_proc mode:
        all but the fractions, the key chain and the salt."""
        return (
            self.slot_headers,
            tuple(
                (
                    r.namespace,
                    r.name,
                    r.hostnames,
                    r.creation_timestamp,
                    tuple(
                        (
                            rule.id,
                            rule.matches,
                            tuple((m.backend, m.slot, m.port) for m in rule.mirrors),
                            rule.backends,
                            rule.header_modifier,
                        )
                        for rule in r.rules
                    ),
                )
                for r in self.routes
            ),
        )

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
        blocked = gate(rule, self.enabled, headers)
        if blocked is not None:
            return Decision(rule, targets=tuple(TargetDecision(t, blocked) for t in rule.mirrors))
        found = extract_key(self.key_chain, headers)
        if found is None:
            return Decision(rule, targets=tuple(TargetDecision(t, Outcome.NO_KEY) for t in rule.mirrors))
        source, key = found
        # One hash per distinct salt: targets that share a salt share u.
        hashes = {self.salt: key_hash(self.salt, key)}
        decisions = []
        for t in rule.mirrors:
            salt = target_salt(self.salt, t)
            u = hashes.get(salt)
            if u is None:
                u = hashes[salt] = key_hash(salt, key)
            decisions.append(TargetDecision(t, Outcome.MIRRORED if in_sample(u, t) else Outcome.SKIPPED, u))
        return Decision(rule, source, key, hashes[self.salt], tuple(decisions))


def gate(rule: Rule, enabled: bool, headers: Headers) -> Outcome | None:
    """Why none of a rule's targets is mirrored whatever the key, or None:
    the kill switch first, then the rule's method filter."""
    if not enabled:
        return Outcome.DISABLED
    if rule.raw_methods and headers.get(":method", b"GET") not in rule.raw_methods:
        return Outcome.METHOD
    return None


def target_salt(policy_salt: bytes, target: MirrorTarget) -> bytes:
    """The salt a target's u is hashed with: its own, else the policy's.

    Targets hashed with the same salt share u, so their samples nest: at 5%
    and 10%, the 5% set lies inside the 10% set. A target with a salt of its
    own (``MirrorTarget.salt``) gets its own u, so its sample is independent
    of the other targets' (no nesting between them: at 50% and 50% they share
    about a quarter of the keys, not half). Within that target nothing
    changes: the same key always gets the same decision, and raising its
    fraction only adds keys. Every place that decides (``Policy.decide_rule``,
    ``Plan``, the inline Lua, ``explain``) takes the salt from here.
    """
    return policy_salt if target.salt is None else target.salt


def in_sample(u: int, target: MirrorTarget) -> bool:
    """The decision for one target: ``u * d < n * 2**64``, as one comparison
    with the target's precomputed threshold (``Fraction.threshold``)."""
    return u < target.threshold
