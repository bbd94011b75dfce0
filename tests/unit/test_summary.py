"""check-config's summary: per route what the sampler matches and mirrors,
and what it skipped and why."""

from __future__ import annotations

import textwrap

from extproc.config.build import build_policy
from extproc.config.manifests import parse_manifests
from extproc.config.settings import Settings
from extproc.config.summary import summarize
from tests.support.paths import CONFORMANCE

CONF = "gateway-conformance-infra/request-percentage-mirror"


def summary_of(text: str, source: str = "routes.yaml", **env: str) -> str:
    settings = Settings.load({"MIRROR_CONFIG": source, **env})
    policy = build_policy(settings, text)
    return summarize(policy, parse_manifests(text, source, settings.slots).skipped)


def test_conformance_manifest_summary() -> None:
    source = "conformance.yaml"
    assert summary_of(CONFORMANCE.read_text(encoding="utf-8"), source) == textwrap.dedent(f"""\
        mirroring: enabled
        key: header:x-request-id; salt: ''
        route {CONF} ({source} (document 1))
          hostnames: any host
          rule {CONF}/0
            match: path PathPrefix /percent-mirror
            mirror infra-backend-v2: 20/100 (20%), slot header x-mirror-cluster-0
            backends: infra-backend-v1:8080 (weight 1) (for envoy-config)
          rule {CONF}/1
            match: path PathPrefix /percent-mirror-fraction
            mirror infra-backend-v2: 25/50 (50%), slot header x-mirror-cluster-0
            backends: infra-backend-v1:8080 (weight 1) (for envoy-config)
          rule {CONF}/2
            match: path PathPrefix /percent-multi-mirror-and-modify-headers
            mirror infra-backend-v2: 35/100 (35%), slot header x-mirror-cluster-0
            mirror infra-backend-v3: 50/100 (50%), slot header x-mirror-cluster-1
            backends: infra-backend-v1:8080 (weight 1) (for envoy-config)
            request headers: set X-Header-Set; add X-Header-Add, X-Header-Add-Append; remove X-Header-Remove (for envoy-config)
          not acted on:
            spec.parentRefs: not used by the sampler (it decides for whatever Envoy asks about)
        """)


ROUTES = """\
apiVersion: v1
kind: Service
metadata: {name: shadow}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
  namespace: team-a
  annotations:
    mirror-sampler.io/target-salts: "shadow-b=v2"
    mirror-sampler.io/methods: "GET,HEAD"
    mirror-sampler.io/max-mirrors-per-second: "50"
spec:
  hostnames: [web.example, "*.web.example"]
  rules:
  - matches:
    - path: {type: Exact, value: /a}
      headers: [{name: X-Env, value: canary}, {name: x-user, type: RegularExpression, value: "^u[0-9]+$"}]
      queryParams: [{name: q, value: "1"}]
      method: GET
    - path: {type: RegularExpression, value: "/b/.*"}
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow-a}, fraction: {numerator: 5, denominator: 1000}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow-b}, percent: 10}
    - type: RequestRedirect
      requestRedirect: {scheme: https}
    backendRefs: [{name: web}]
    timeouts: {request: 5s}
---
apiVersion: mirror-sampler.io/v1alpha1
kind: MirrorSampler
spec: {mirroring: Disabled}
"""


def test_summary_shows_matches_salts_annotations_and_what_was_skipped() -> None:
    text = summary_of(ROUTES)
    assert text == textwrap.dedent("""\
        mirroring: DISABLED (kill switch): no request is mirrored
        key: header:x-request-id; salt: ''
        route team-a/web (routes.yaml (document 2))
          hostnames: web.example, *.web.example
          rule team-a/web/0
            match: path Exact /a, header x-env Exact 'canary', header x-user RegularExpression '^u[0-9]+$', query q Exact '1', method GET
            match: path RegularExpression /b/.*
            mirrors only methods: GET, HEAD
            at most 50 mirrors per second per target
            mirror shadow-a: 5/1000 (0.5%), slot header x-mirror-cluster-0
            mirror shadow-b: 10/100 (10%), slot header x-mirror-cluster-1, own salt 'v2' (sampled independently of the rule's other targets)
            backends: web (weight 1) (for envoy-config)
          not acted on:
            spec.rules[0].filters[2].requestRedirect: RequestRedirect filter: not used by the sampler
            spec.rules[0].timeouts: not used by the sampler
        skipped documents:
          routes.yaml (document 1): Service shadow: not an HTTPRoute: the sampler reads HTTPRoute and MirrorSampler documents
        """)


def test_summary_uses_the_configured_slot_prefix() -> None:
    text = summary_of(ROUTES, MIRROR_SLOT_PREFIX="x-shadow-", MIRROR_SLOTS="3")
    assert "slot header x-shadow-0" in text and "slot header x-shadow-1" in text


def test_simple_mode_summary() -> None:
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_FRACTION": "5/1000"}))
    text = summarize(policy)
    assert "route simple (simple mode: every request)\n" in text
    assert "    mirror shadow: 5/1000 (0.5%), slot header x-mirror-cluster-0\n" in text
    assert "hostnames: any host" in text and "skipped documents" not in text


def test_a_rule_without_mirrors_says_so() -> None:
    text = summary_of(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {rules: [{backendRefs: [{name: web}]}]}\n"
    )
    assert "  rule default/r/0\n    match: path PathPrefix /\n    no mirrors\n" in text
