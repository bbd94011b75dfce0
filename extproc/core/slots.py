"""The slot headers: how a sampled decision reaches Envoy (pure).

The sampler sets ``<prefix><i>`` (value: the target's backend name) for
each sampled target of the matched rule, target i in slot i; a mirrored copy
carries the marker header naming the rule that sampled it. Both are the
sampler's alone: every route removes them before a backend sees them, and a
client's are stripped. The sampler, Envoy's generated routes, the inline Lua,
explain, check-config and every converter read the names from one
``SlotHeaders``, which the settings build (``Settings.slot_headers``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .keys import is_header_name

DEFAULT_PREFIX = "x-mirror-cluster-"
DEFAULT_COUNT = 2
DEFAULT_MARKER = "x-mirror-rule"
# A rule with n mirrors has 2**n - 1 variant routes per match (core.variants):
# 8 slots, 255 variants, is already more than most route tables should carry.
MIN_COUNT = 1
MAX_COUNT = 8


class SlotHeadersError(ValueError):
    """Slot headers that cannot work; ``field`` names the one at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def slot_header_name(value: str) -> str:
    """``value`` as a slot prefix or marker header: lower case, and a name
    Envoy lets ext_proc set."""
    v = value.strip().lower()
    if not is_header_name(v) or v.startswith(("x-envoy-", ":")) or v in ("host", "cookie"):
        raise ValueError(f"must be a header name Envoy lets ext_proc set (not x-envoy-*, host or a :pseudo-header), got {value!r}")
    return v


@dataclass(frozen=True, slots=True)
class SlotHeaders:
    prefix: str = DEFAULT_PREFIX
    count: int = DEFAULT_COUNT
    marker: str = DEFAULT_MARKER
    # <prefix>0, <prefix>1, ...: derived once, read per request.
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not MIN_COUNT <= self.count <= MAX_COUNT:
            raise SlotHeadersError("count", f"must be an integer {MIN_COUNT}..{MAX_COUNT}, got {self.count!r}")
        for name in ("prefix", "marker"):
            value = getattr(self, name)
            try:
                valid = slot_header_name(value) == value
            except ValueError as e:
                raise SlotHeadersError(name, str(e)) from None
            if not valid:
                raise SlotHeadersError(name, f"must be lower case, got {value!r}")
        names = tuple(f"{self.prefix}{i}" for i in range(self.count))
        if self.marker in names:
            raise SlotHeadersError("marker", f"{self.marker!r} is also a slot header")
        object.__setattr__(self, "names", names)

    @property
    def reserved(self) -> tuple[str, ...]:
        """Every header the sampler owns: the slot headers, then the marker."""
        return (*self.names, self.marker)


DEFAULT_SLOT_HEADERS = SlotHeaders()
