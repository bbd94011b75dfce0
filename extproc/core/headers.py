"""A request's headers as the decision reads them (pure).

One place builds the mapping, whatever the headers came from: an ext_proc
``HttpHeaders`` message in the servicer, command-line pairs in ``explain``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

# Lower-cased name -> raw bytes of its first value (pseudo-headers included,
# as Envoy sends them over ext_proc).
Headers = Mapping[str, bytes]
# Every value of the names that came more than once; matching reads any of them.
Repeated = Mapping[str, Sequence[bytes]]


def header_map(pairs: Iterable[tuple[str, bytes]]) -> tuple[dict[str, bytes], dict[str, list[bytes]] | None]:
    """The first value of each lower-cased name (repeated ``cookie`` headers
    joined with ``; ``, as one Cookie header would carry them, for keys), and
    every value of the names that came more than once (None when there are
    none, the usual case)."""
    out: dict[str, bytes] = {}
    repeated: dict[str, list[bytes]] | None = None
    for key, value in pairs:
        name = key.lower()
        if name not in out:
            out[name] = value
            continue
        if repeated is None:
            repeated = {}
        values = repeated.get(name)
        if values is None:
            values = repeated[name] = [out[name]]
        values.append(value)
        if name == "cookie":
            out[name] += b"; " + value
    return out, repeated
