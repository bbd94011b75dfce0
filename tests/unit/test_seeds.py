"""The manifests in tests/data/seeds/ (Envoy Gateway's mirroring guide, GEP-3171)
and the Gateway API percentage-mirror conformance route load unchanged
(docs/DESIGN.md "Configuration"), with the rules, mirrors and fractions they say."""

from __future__ import annotations

import math

import pytest
import yaml

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.core.matching import PathType
from extproc.core.plan import Plan
from extproc.core.policy import BackendRef, Outcome, Policy
from extproc.core.sampling import Fraction, key_hash
from tests.support.manifests import routes_and_problems
from tests.support.paths import CONFORMANCE, EG_SEED, GEP_SEED, SEEDS
from tests.support.seeds import httproute_manifests, seed_text, yaml_blocks


def load(text: str, source: str = "seed.yaml", **env: str) -> Policy:
    return build_policy(Settings.load({"MIRROR_CONFIG": source, **env}), text)


def req(host: str, path: str, request_id: str | None = None) -> dict[str, bytes]:
    h = {":authority": host.encode(), ":path": path.encode(), ":method": b"GET"}
    if request_id is not None:
        h["x-request-id"] = request_id.encode()
    return h


def mirrors_of(pol: Policy, rule_index: int = 0) -> list[tuple[str, Fraction, int]]:
    return [(t.backend, t.fraction, t.slot) for t in pol.rules[rule_index].mirrors]


def share(pol: Policy, host: str, path: str, n: int) -> list[float]:
    """Fraction of n request ids mirrored, per target of the matched rule."""
    counts: list[int] | None = None
    for i in range(n):
        d = Plan(pol).trace(req(host, path, f"req-{i}"))
        if counts is None:
            counts = [0] * len(d.targets)
        for j, t in enumerate(d.targets):
            counts[j] += t.outcome is Outcome.MIRRORED
    assert counts is not None
    return [c / n for c in counts]


def within_5_sd(observed: float, p: float, n: int) -> bool:
    return abs(observed - p) * n <= 5 * math.sqrt(n * p * (1 - p))


# --------------------------------------------------------------------------
# The extractor itself.


def test_seeds_directory_exists() -> None:
    assert SEEDS.is_dir(), f"seeds directory missing: {SEEDS}"
    assert (SEEDS / EG_SEED).is_file() and (SEEDS / GEP_SEED).is_file()


@pytest.mark.parametrize(("name", "count"), [(EG_SEED, 3), (GEP_SEED, 2)])
def test_number_of_manifests_extracted(name: str, count: int) -> None:
    manifests = httproute_manifests(seed_text(name))
    assert len(manifests) == count
    for text in manifests:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        assert [d["kind"] for d in docs] == ["HTTPRoute"]
        assert "EOF" not in text and "kubectl" not in text and "```" not in text


def test_extractor_handles_both_heredoc_forms_and_plain_blocks() -> None:
    md = (
        "x\n```shell\nkubectl apply -f - <<EOF\nkind: HTTPRoute\na: 1\nEOF\n```\n"
        "```shell\ncat <<'EOF' | kubectl apply -f -\nkind: HTTPRoute\nb: 2\nEOF\n```\n"
        "```\nkind: HTTPRoute\nc: 3\n```\n"
        "```console\n$ kubectl get httproute\nkind: Service\n```\n"
    )
    assert httproute_manifests(md) == ["kind: HTTPRoute\na: 1\n", "kind: HTTPRoute\nb: 2\n", "kind: HTTPRoute\nc: 3\n"]


# --------------------------------------------------------------------------
# Envoy Gateway's HTTPRoute Request Mirroring guide (v1beta1).


def eg_manifests() -> list[str]:
    return httproute_manifests(seed_text(EG_SEED))


def check_eg_common(pol: Policy) -> None:
    (route,) = pol.routes
    assert route.id == "default/http-mirror"
    assert route.hostnames == ("backends.example",)
    (rule,) = route.rules
    assert rule.id == "default/http-mirror/0"
    (match,) = rule.matches
    assert (match.path.type, match.path.value) == (PathType.PREFIX, "/")
    assert match.headers == () and match.query_params == () and match.method is None
    assert pol.match(req("other.example", "/get")) is None
    r = pol.match(req("backends.example", "/get"))
    assert r is not None and r.id == "default/http-mirror/0"


def test_eg_single_mirror() -> None:
    text = eg_manifests()[0]
    assert "gateway.networking.k8s.io/v1beta1" in text
    pol = load(text, EG_SEED)
    check_eg_common(pol)
    assert mirrors_of(pol) == [("backend-2", Fraction(100, 100), 0)]
    assert pol.rules[0].backends == (BackendRef("backend", 3000, 1),)
    d = Plan(pol).trace(req("backends.example", "/get", "any-id"))
    assert [(t.target.backend, t.outcome) for t in d.targets] == [("backend-2", Outcome.MIRRORED)]


def test_eg_multiple_backend_refs() -> None:
    pol = load(eg_manifests()[1], EG_SEED)
    check_eg_common(pol)
    assert mirrors_of(pol) == [("backend-2", Fraction(100, 100), 0)]
    assert pol.rules[0].backends == (BackendRef("backend", 3000, 1), BackendRef("backend-3", 3000, 1))


def test_eg_two_request_mirrors_accepted() -> None:
    """Envoy Gateway's webhook rejects this; the sampler accepts different backends in one rule."""
    pol = load(eg_manifests()[2], EG_SEED)
    check_eg_common(pol)
    assert mirrors_of(pol) == [("backend-2", Fraction(100, 100), 0), ("backend-3", Fraction(100, 100), 1)]
    assert pol.rules[0].backends == (BackendRef("backend", 3000, 1),)
    d = Plan(pol).trace(req("backends.example", "/get", "abc"))
    assert [t.outcome for t in d.targets] == [Outcome.MIRRORED, Outcome.MIRRORED]
    assert [t.slot for t in d.sampled] == [0, 1]


def test_eg_mirror_backend_manifests_alongside_the_route() -> None:
    """The guide's ServiceAccount/Service/Deployment block in the same file is skipped."""
    blocks = yaml_blocks(seed_text(EG_SEED))
    backend_block = next(b for b in blocks if "kind: Deployment" in b)
    assert backend_block not in httproute_manifests(seed_text(EG_SEED))
    routes, problems = routes_and_problems(backend_block, EG_SEED)
    assert routes == [] and len(problems) == 1 and "no HTTPRoute" in problems[0]
    pol = load(backend_block + "\n---\n" + eg_manifests()[0], EG_SEED)
    check_eg_common(pol)


def test_eg_variants_in_one_file_are_duplicates() -> None:
    routes, problems = routes_and_problems("\n---\n".join(eg_manifests()), EG_SEED)
    assert len(routes) == 1
    assert len(problems) == 2 and all("default/http-mirror is already defined" in p for p in problems)


# --------------------------------------------------------------------------
# GEP-3171 examples (v1).


def gep_manifests() -> list[str]:
    return httproute_manifests(seed_text(GEP_SEED))


def check_gep_common(pol: Policy) -> None:
    (route,) = pol.routes
    assert route.id == "default/http-filter-mirror"
    assert route.hostnames == ("mirror.example",)
    (rule,) = route.rules
    (match,) = rule.matches  # no matches: PathPrefix /
    assert (match.path.type, match.path.value) == (PathType.PREFIX, "/")
    assert rule.backends == (BackendRef("foo-v1", 8080, 1),)
    assert pol.match(req("mirror.example", "/anything/at/all")) is not None
    assert pol.match(req("other.example", "/")) is None


def test_gep_percent_42() -> None:
    text = gep_manifests()[0]
    assert "percent: 42" in text
    pol = load(text, GEP_SEED)
    check_gep_common(pol)
    assert mirrors_of(pol) == [("foo-v2", Fraction(42, 100), 0)]
    # docs/DESIGN.md's vectors at 42/100.
    assert Plan(pol).trace(req("mirror.example", "/", "user-123")).targets[0].outcome is Outcome.SKIPPED
    assert Plan(pol).trace(req("mirror.example", "/", "alice")).targets[0].outcome is Outcome.MIRRORED
    d = Plan(pol).trace(req("mirror.example", "/", "alice"))
    assert d.u == 3287336622105459802
    observed = share(pol, "mirror.example", "/", 5000)[0]
    assert within_5_sd(observed, 0.42, 5000)


def test_gep_fraction_5_in_1000() -> None:
    text = gep_manifests()[1]
    assert "denominator: 1000" in text
    pol = load(text, GEP_SEED)
    check_gep_common(pol)
    assert mirrors_of(pol) == [("foo-v2", Fraction(5, 1000), 0)]
    for i in range(200):
        rid = f"id-{i}"
        want = key_hash(b"", rid.encode()) * 1000 < 5 * 2**64
        got = Plan(pol).trace(req("mirror.example", "/", rid)).targets[0].outcome
        assert got is (Outcome.MIRRORED if want else Outcome.SKIPPED)


def test_gep_fraction_sample_is_inside_percent_sample() -> None:
    """Same key, same salt: the 0.5% set is inside the 42% set."""
    p42, p05 = (load(t, GEP_SEED) for t in gep_manifests())
    for i in range(3000):
        h = req("mirror.example", "/", f"k{i}")
        if Plan(p05).trace(h).targets[0].outcome is Outcome.MIRRORED:
            assert Plan(p42).trace(h).targets[0].outcome is Outcome.MIRRORED


# --------------------------------------------------------------------------
# Gateway API conformance: httproute-request-percentage-mirror.

CONF_ID = "gateway-conformance-infra/request-percentage-mirror"


def conformance() -> Policy:
    assert CONFORMANCE.is_file()
    return load(CONFORMANCE.read_text(encoding="utf-8"), str(CONFORMANCE))


def test_conformance_loads_with_expected_rules() -> None:
    pol = conformance()
    (route,) = pol.routes
    assert route.id == CONF_ID and route.hostnames == ()
    assert [r.id for r in route.rules] == [f"{CONF_ID}/0", f"{CONF_ID}/1", f"{CONF_ID}/2"]
    assert [(m.path.type, m.path.value) for r in route.rules for m in r.matches] == [
        (PathType.PREFIX, "/percent-mirror"),
        (PathType.PREFIX, "/percent-mirror-fraction"),
        (PathType.PREFIX, "/percent-multi-mirror-and-modify-headers"),
    ]
    assert mirrors_of(pol, 0) == [("infra-backend-v2", Fraction(20, 100), 0)]
    assert mirrors_of(pol, 1) == [("infra-backend-v2", Fraction(25, 50), 0)]
    assert mirrors_of(pol, 2) == [("infra-backend-v2", Fraction(35, 100), 0), ("infra-backend-v3", Fraction(50, 100), 1)]
    for r in route.rules:
        assert r.backends == (BackendRef("infra-backend-v1", 8080, 1),)
    hm = route.rules[2].header_modifier
    assert hm is not None
    assert hm.set == (("X-Header-Set", "set-overwrites-values"),)
    assert hm.add == (("X-Header-Add", "header-val-1"), ("X-Header-Add-Append", "header-val-2"))
    assert hm.remove == ("X-Header-Remove",)
    assert route.rules[0].header_modifier is None


@pytest.mark.parametrize(
    ("path", "rule_index"),
    [
        ("/percent-mirror", 0),
        ("/percent-mirror/x", 0),
        ("/percent-mirror-fraction", 1),
        ("/percent-mirror-fraction?x=1", 1),
        ("/percent-multi-mirror-and-modify-headers", 2),
        ("/percent-multi-mirror-and-modify-headers/a", 2),
        ("/percent-mirrorx", None),
        ("/", None),
    ],
)
def test_conformance_request_routing(path: str, rule_index: int | None) -> None:
    pol = conformance()
    r = pol.match(req("any.host.example", path))
    assert (None if r is None else r.id) == (None if rule_index is None else f"{CONF_ID}/{rule_index}")


@pytest.mark.parametrize(
    ("path", "fractions"),
    [("/percent-mirror", [0.20]), ("/percent-mirror-fraction", [0.5]), ("/percent-multi-mirror-and-modify-headers", [0.35, 0.5])],
)
def test_conformance_shares(path: str, fractions: list[float]) -> None:
    n = 4000
    observed = share(conformance(), "gateway.example", path, n)
    assert len(observed) == len(fractions)
    for o, p in zip(observed, fractions, strict=True):
        assert within_5_sd(o, p, n), (path, o, p)


def test_conformance_multi_mirror_targets_nested() -> None:
    pol = conformance()
    for i in range(2000):
        d = Plan(pol).trace(req("gateway.example", "/percent-multi-mirror-and-modify-headers", f"r{i}"))
        v2, v3 = (t.outcome for t in d.targets)
        if v2 is Outcome.MIRRORED:
            assert v3 is Outcome.MIRRORED
