"""Where the tests find the repository and their data: each path once."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
# The Gateway API percentage-mirror conformance route (HTTPRouteRequestPercentageMirror).
CONFORMANCE = DATA / "conformance-percentage-mirror.yaml"
# Envoy Gateway's mirroring guide and GEP-3171, as published: their manifests must load unchanged.
SEEDS = DATA / "seeds"
EG_SEED = "envoy-gateway-http-request-mirroring.md"
GEP_SEED = "gep-3171-percentage-request-mirroring.md"
