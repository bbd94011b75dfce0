"""`mirror-sampler convert`: turn the random mirroring users already run
(Envoy's ``runtime_fraction``, Envoy Gateway's HTTPRoute ``percent`` /
``fraction``, Istio's ``mirrorPercentage``) into consistent sampling.

Each source has its own module (``envoy``, ``envoy_gateway``, ``istio``);
each returns a ``Conversion``: the files to write and what the user must know
(a ``runtime_key`` no longer in effect, a mirror left as it was and why).
Converting is pure: text in, text out; the CLI writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.errors import ConfigError


@dataclass
class Conversion:
    # File name (relative to --output) -> its text.
    files: dict[str, str] = field(default_factory=dict)
    # One line each, for the user: what changed meaning, what was left alone and why.
    notes: list[str] = field(default_factory=list)


class ConvertError(ConfigError):
    """Input that cannot be converted; every problem names its file and field path.
    A ConfigError, so that the CLI reports both alike (exit code 2)."""
