"""Variant routes: the layout of route-selected mirroring (pure).

Wherever a rule with mirrors is written for Envoy (routes by ``envoy-config``
and ``convert envoy``, HTTPRoute rules by ``convert envoy-gateway``,
VirtualService routes by ``convert istio``), it becomes one *variant* route
per non-empty set of its mirror targets, largest sets first, then the *plain*
route. A variant matches the rule's own matches plus, for each of its
targets, that target's slot header with the target's token as exact value,
and mirrors to exactly those targets, always (the sampler already decided).
The sampler sets the slot headers of the targets it sampled and makes Envoy
match again, so the request lands on the variant of exactly that set; with no
target sampled it stays on the plain route, which mirrors nothing.

Largest sets first: the {0, 1} variant's matches include the {0} variant's,
so where routes are tried in order (Envoy, Istio) it must come first; Envoy
Gateway sorts rules with more header matches first by itself. Where the
format can say so (Envoy's ``present_match: false``), a variant also
requires the rule's other slot headers to be absent (``absent``).

This module decides the layout; the writers (``envoy.render.rule_routes``,
``convert.envoy_routes``, ``convert.envoy_gateway``, ``convert.istio_rewrite``)
only spell each ``Variant`` in their own format.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .slots import SlotHeaders

T = TypeVar("T")


@dataclass(frozen=True)
class Variant(Generic[T]):
    """One route of a rule's layout; the plain route has no targets."""

    slots: tuple[int, ...]  # the slots it selects, ascending (slot i: the rule's i-th mirror target)
    targets: tuple[T, ...]  # the mirror targets it carries, one per slot
    matches: tuple[tuple[str, str], ...]  # (slot header, token): exact matches it adds to the rule's own
    absent: tuple[str, ...]  # the rule's other slot headers: absent on the requests it takes

    @property
    def is_plain(self) -> bool:
        return not self.targets

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(token for _, token in self.matches)


def rule_layout(targets: Sequence[T], token: Callable[[T], str], slot_headers: SlotHeaders) -> list[Variant[T]]:
    """The routes of a rule whose i-th mirror target, in slot i, is
    ``targets[i]``, in order: its variants, then its plain route. ``token``:
    the slot header value the sampler sets for a target (its backend name)."""
    if len(targets) > slot_headers.count:
        raise ValueError(f"{len(targets)} mirror targets but only {slot_headers.count} slot headers")
    names = slot_headers.names
    layout: list[Variant[T]] = []
    for size in range(len(targets), 0, -1):
        for chosen in itertools.combinations(range(len(targets)), size):
            layout.append(
                Variant(
                    slots=chosen,
                    targets=tuple(targets[i] for i in chosen),
                    matches=tuple((names[i], token(targets[i])) for i in chosen),
                    absent=tuple(names[i] for i in range(len(targets)) if i not in chosen),
                )
            )
    layout.append(Variant((), (), (), ()))
    return layout
