"""The compiled policy: what the sampler decides with (pure).

``extproc.config`` builds a Policy from environment or HTTPRoute manifests;
the decision engine (``plan.Plan``, which serves and explains), the Envoy
configuration and the inline Lua all read the same object, so the decision,
Envoy's routes and the generated code cannot drift.
A Policy is immutable: reload swaps the whole object, and each ext_proc stream
keeps the snapshot it started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .headers import Headers, Repeated
from .keys import KeySource
from .matching import Entry, Match, RequestView, RouteTable
from .sampling import Fraction
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
    CAPPED = "capped"  # sampled, but over the target's rate cap (the sampler process only: inline refuses caps)
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


def target_salt(policy_salt: bytes, target: MirrorTarget) -> bytes:
    """The salt a target's u is hashed with: its own, else the policy's.

    Targets hashed with the same salt share u, so their samples nest: at 5%
    and 10%, the 5% set lies inside the 10% set. A target with a salt of its
    own (``MirrorTarget.salt``) gets its own u, so its sample is independent
    of the other targets' (no nesting between them: at 50% and 50% they share
    about a quarter of the keys, not half). Within that target nothing
    changes: the same key always gets the same decision, and raising its
    fraction only adds keys. Both places that decide (``Plan``, which also
    explains, and the inline Lua) take the salt from here.
    """
    return policy_salt if target.salt is None else target.salt
