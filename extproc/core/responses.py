"""The sampler's answers, serialised once per policy (pure).

An answer is an ext_proc ``ProcessingResponse`` to a request's headers: the
slot headers of the sampled targets set, every other slot header and the
marker header removed, and ``clear_route_cache`` when Envoy must re-match.
There are few distinct answers per policy, so each is built once and the
hot path hands out the cached bytes.
"""

from __future__ import annotations

from ..wire import (
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    HeaderValue,
    HeaderValueOption,
    ProcessingResponse,
    TrailersResponse,
)
from .policy import Policy

Sampled = tuple[tuple[int, str], ...]  # (slot, backend) of each sampled target

# For message kinds the sampler has no business with (a user's processing mode
# may send them anyway): the matching empty CONTINUE, serialised once.
CONTINUE: dict[str, bytes] = {
    "response_headers": ProcessingResponse(response_headers=HeadersResponse()).SerializeToString(),
    "request_body": ProcessingResponse(request_body=BodyResponse()).SerializeToString(),
    "response_body": ProcessingResponse(response_body=BodyResponse()).SerializeToString(),
    "request_trailers": ProcessingResponse(request_trailers=TrailersResponse()).SerializeToString(),
    "response_trailers": ProcessingResponse(response_trailers=TrailersResponse()).SerializeToString(),
}


class Responder:
    """Serialised header responses for one policy, built once per sampled set."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.slot_names = policy.slot_names
        self._cache: dict[tuple[Sampled, bool], bytes] = {}

    def response(self, sampled: Sampled, rematch: bool = False) -> bytes:
        """``rematch``: the request arrived carrying a slot header, so the route
        Envoy picked may be a mirror variant selected by a forged value."""
        key = (sampled, rematch or bool(sampled))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._build(*key)
        return cached

    def _build(self, sampled: Sampled, clear_route_cache: bool) -> bytes:
        policy = self.policy
        set_slots = {slot for slot, _ in sampled}
        mutation = HeaderMutation(
            set_headers=[
                # append unset means overwrite: a forged value is replaced, not joined.
                HeaderValueOption(header=HeaderValue(key=policy.slot_names[slot], raw_value=cluster.encode()))
                for slot, cluster in sampled
            ],
            # Every slot header the sampler did not set goes, whoever sent it;
            # so does a client-supplied marker header.
            remove_headers=[n for i, n in enumerate(policy.slot_names) if i not in set_slots] + [policy.slot_headers.marker],
        )
        # Envoy re-matches only when told to: after setting a slot header (to
        # select the mirror variant) and after removing one a client sent (to
        # leave the variant it selected).
        common = CommonResponse(header_mutation=mutation, clear_route_cache=clear_route_cache)
        return ProcessingResponse(request_headers=HeadersResponse(response=common)).SerializeToString()
