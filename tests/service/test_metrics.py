"""What /metrics shows before anything happens: every series known in advance,
HELP texts that list every label value, the process and build information."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from extproc import __version__
from extproc.core.policy import Outcome
from extproc.server.metrics import ErrorKind, ReloadResult
from tests.support.paths import CONFORMANCE
from tests.support.procs import Sampler


def families(port: int) -> dict[str, Metric]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f for f in text_string_to_metric_families(body)}


def test_metrics_before_the_first_request(transport: str, tmp_path: Path) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text(CONFORMANCE.read_text())
    s = Sampler({"MIRROR_TRANSPORT": transport, "MIRROR_CONFIG": str(config)})
    try:
        assert s.metrics_port is not None
        found = families(s.metrics_port)
        decisions = found["mirror_sampler_decisions"]
        for outcome in Outcome:
            assert outcome.value in decisions.documentation
        # Every target of every rule, every outcome, at 0.
        samples = [x for x in decisions.samples if x.name.endswith("_total")]
        series = {(x.labels["rule"], x.labels["target"], x.labels["outcome"]): x.value for x in samples}
        rules = {
            "gateway-conformance-infra/request-percentage-mirror/0": ["infra-backend-v2"],
            "gateway-conformance-infra/request-percentage-mirror/1": ["infra-backend-v2"],
            "gateway-conformance-infra/request-percentage-mirror/2": ["infra-backend-v2", "infra-backend-v3"],
        }
        want = {(r, t, o.value): 0.0 for r, targets in rules.items() for t in targets for o in Outcome}
        assert series == want

        errors = found["mirror_sampler_errors"]
        assert {x.labels["kind"]: x.value for x in errors.samples if x.name.endswith("_total")} == {k.value: 0.0 for k in ErrorKind}
        for kind in ErrorKind:
            assert kind.value in errors.documentation
        reloads = found["mirror_sampler_reloads"]
        assert {x.labels["result"] for x in reloads.samples if x.name.endswith("_total")} == {r.value for r in ReloadResult}
        for result in ReloadResult:
            assert result.value in reloads.documentation

        (build,) = found["mirror_sampler_build_info"].samples
        assert build.value == 1
        assert build.labels["version"] == __version__ and build.labels["transport"] == transport and build.labels["mode"] == "routes"
        assert "process_resident_memory_bytes" in found and "process_open_fds" in found
        assert "python_info" in found
    finally:
        s.stop()
