"""The command line: check-config, explain, envoy-config, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.cli import main
from extproc.core.sampling import Fraction, decide, key_hash
from tests.support.paths import CONFORMANCE


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args], env={**environ, **(env or {})}, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MIRROR_"):
            monkeypatch.delenv(name)


def test_check_config_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(CONFORMANCE)]) == 0
    out = capsys.readouterr().out
    assert "3 rule(s), 4 mirror target(s)" in out
    # The summary: each rule with its matches and mirrors, and what was not acted on.
    assert "rule gateway-conformance-infra/request-percentage-mirror/1\n    match: path PathPrefix /percent-mirror-fraction\n" in out
    assert "mirror infra-backend-v2: 25/50 (50%), slot header x-mirror-cluster-0" in out
    assert "spec.parentRefs: not used by the sampler" in out


def test_check_config_lists_every_problem_and_exits_non_zero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFORMANCE.read_text().replace("percent: 20", "percent: 200").replace("denominator: 50", "denominator: 0"))
    out = run_cli("check-config", "--config", str(bad))
    assert out.returncode == 2
    assert "2 problems" in out.stderr
    assert (
        f"{bad} (document 1): HTTPRoute gateway-conformance-infra/request-percentage-mirror: spec.rules[0].filters[0].requestMirror.percent"
        in out.stderr
    )
    assert "spec.rules[1].filters[0].requestMirror.fraction.denominator: must be an integer >= 1" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_config_names_environment_variables() -> None:
    out = run_cli("check-config", env={"MIRROR_BACKEND": "b", "MIRROR_FRACTION": "3/2", "MIRROR_KEY": "header:", "MIRROR_LISTEN": "nope"})
    assert out.returncode == 2
    for name in ("MIRROR_FRACTION", "MIRROR_KEY", "MIRROR_LISTEN"):
        assert name in out.stderr
    assert "3 problems" in out.stderr


def test_check_config_missing_file() -> None:
    out = run_cli("check-config", "--config", "/nonexistent/routes.yaml")
    assert out.returncode == 2
    assert "MIRROR_CONFIG: cannot read /nonexistent/routes.yaml" in out.stderr


def test_explain_json_matches_the_decision(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "explain",
            "--config",
            str(CONFORMANCE),
            "--path",
            "/percent-multi-mirror-and-modify-headers/x?a=1",
            "--header",
            "X-Request-Id=alice",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    u = key_hash(b"", b"alice")
    assert result["rule"] == "gateway-conformance-infra/request-percentage-mirror/2"
    assert result["key_source"] == "header:x-request-id" and result["key"] == "alice" and result["u"] == u
    targets = {t["backend"]: t for t in result["targets"]}
    assert targets["infra-backend-v2"]["threshold"] == Fraction(35).threshold
    assert targets["infra-backend-v2"]["decision"] == ("mirrored" if decide(b"", b"alice", Fraction(35)) else "skipped")
    assert targets["infra-backend-v3"]["slot"] == "x-mirror-cluster-1"


def test_explain_text_with_cookie_key_and_salt(capsys: pytest.CaptureFixture[str]) -> None:
    env = ["--backend", "shadow", "--percent", "42", "--key", "cookie:session,header:x-request-id", "--salt", "v2"]
    assert main(["explain", *env, "--cookie", "session=alice", "--header", "x-request-id=bob"]) == 0
    out = capsys.readouterr().out
    assert "key source: cookie:session" in out
    assert f"u: {key_hash(b'v2', b'alice')}" in out
    assert "shadow (x-mirror-cluster-0) fraction 42/100" in out
    assert ": mirrored" in out  # docs/DESIGN.md vector: ("v2", "alice") is in at 42/100


def test_explain_no_rule_and_no_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--config", str(CONFORMANCE), "--path", "/elsewhere"]) == 0
    assert "no rule matches" in capsys.readouterr().out
    assert main(["explain", "--config", str(CONFORMANCE), "--path", "/percent-mirror"]) == 0
    assert "not mirrored (no_key)" in capsys.readouterr().out


def test_explain_with_the_rule_envoy_names(capsys: pytest.CaptureFixture[str]) -> None:
    rule_0 = "gateway-conformance-infra/request-percentage-mirror/0"
    request = ["--config", str(CONFORMANCE), "--path", "/percent-mirror-fraction", "--header", "x-request-id=alice"]
    assert main(["explain", *request, "--rule-id", rule_0]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rule: {rule_0} (named by Envoy)\n")
    assert f"fraction 20/100 threshold {Fraction(20).threshold}" in out
    assert main(["explain", *request, "--rule-id", "no/such/rule", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["rule"], result["named_by_envoy"]) == ("gateway-conformance-infra/request-percentage-mirror/1", False)


def test_explain_bad_header_argument() -> None:
    out = run_cli("explain", "--backend", "b", "--header", "novalue")
    assert out.returncode == 2 and "--header: must be NAME=VALUE" in out.stderr


def test_envoy_config_to_file(tmp_path: Path) -> None:
    target = tmp_path / "envoy.yaml"
    assert main(["envoy-config", "--backend", "shadow", "-o", str(target), "--sampler", "127.0.0.1:6000", "--listener-port", "18080"]) == 0
    text = target.read_text()
    assert text.startswith("# Generated by `mirror-sampler envoy-config`")
    assert "portValue: 6000" in text and "portValue: 18080" in text


def test_version_and_module_entry_point() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("mirror-sampler ")


def test_explain_bulk_from_a_file_equals_the_decision_function(tmp_path: Path) -> None:
    """10,000 keys through the command as a user runs it: one line out per
    key, each decision the decision function's (rule 2 has two targets)."""
    keys = [f"req-{i:06d}" for i in range(10_000)]
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "extproc", "explain", "--config", str(CONFORMANCE), "--path", "/percent-multi-mirror-and-modify-headers",
         "--bulk", str(tmp_path / "keys.txt")],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    lines = out.stdout.splitlines()
    assert len(lines) == len(keys)
    for key, line in zip(keys, lines, strict=True):
        got_key, rule, targets = line.split("\t")
        assert got_key == key and rule == "gateway-conformance-infra/request-percentage-mirror/2"
        want = {
            "infra-backend-v2": "mirrored" if decide(b"", key.encode(), Fraction(35)) else "skipped",
            "infra-backend-v3": "mirrored" if decide(b"", key.encode(), Fraction(50)) else "skipped",
        }
        assert dict(t.split("=") for t in targets.split(",")) == want


def test_explain_bulk_json_lines_from_stdin_and_a_bad_line() -> None:
    lines = '{"key": "alice", "path": "/percent-mirror"}\n{"headers": {"x-request-id": "bob"}, "path": "/percent-mirror-fraction/x"}\n'
    out = subprocess.run(
        [sys.executable, "-m", "extproc", "explain", "--config", str(CONFORMANCE), "--bulk", "-", "--json"],
        input=lines, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    first, second = (json.loads(x) for x in out.stdout.splitlines())
    assert first["rule"].endswith("/0") and first["key"] == "alice"
    assert first["targets"][0]["decision"] == ("mirrored" if decide(b"", b"alice", Fraction(20)) else "skipped")
    assert second["rule"].endswith("/1") and second["targets"][0]["decision"] == (
        "mirrored" if decide(b"", b"bob", Fraction(25, 50)) else "skipped"
    )
    bad = subprocess.run(
        [sys.executable, "-m", "extproc", "explain", "--config", str(CONFORMANCE), "--bulk", "-"],
        input='alice\n{"key": \n', capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "explain --bulk -: line 2" in bad.stderr


def test_convert_writes_every_file_and_says_what_the_user_must_know(tmp_path: Path) -> None:
    out = run_cli("convert", "envoy-gateway", str(CONFORMANCE), "--output", str(tmp_path / "eg"), "--namespace", "mirroring")
    assert out.returncode == 0, out.stderr
    names = {"httproutes.yaml", "envoy-extension-policy.yaml", "client-traffic-policy.yaml", "sampler.yaml"}
    assert {p.name for p in (tmp_path / "eg").iterdir()} == names
    assert all(f"wrote {tmp_path / 'eg' / n}" in out.stdout for n in names)
    assert "note: Envoy Gateway would also mirror at random" in out.stdout


def test_convert_refuses_bad_input_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "routes.yaml"
    bad.write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n"
        "spec: {rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: s}, percnt: 10}}]}]}\n"
    )
    out = run_cli("convert", "envoy-gateway", str(bad), "--output", str(tmp_path / "out"))
    assert out.returncode == 2
    assert str(bad) in out.stderr and "percnt" in out.stderr
    assert not (tmp_path / "out").exists()
    assert run_cli("convert", "istio", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "out")).returncode == 2


# Bytes that are not UTF-8 in an argument or variable reach Python as lone
# surrogates (surrogateescape): "\udcff" is the byte 0xff.


@pytest.mark.parametrize("key", ["cookie:\udcff", "cookie:\udcff,header:x-request-id", "header:x-request-id,query:u\udcff"])
@pytest.mark.parametrize("command", [["check-config"], ["envoy-config", "--inline", "lua"], ["envoy-config", "--inline", "module"]])
def test_a_key_source_name_no_engine_can_carry_is_refused_at_start_up(command: list[str], key: str) -> None:
    """Not accepted and then failing on every request that carries a cookie
    (counted as a decision error, never mirrored, even when a later source had the key)."""
    flag = run_cli(*command, "--backend", "b", "--key", key)
    variable = run_cli(*command, "--backend", "b", env={"MIRROR_KEY": key})
    for out, name in ((flag, "--key"), (variable, "MIRROR_KEY")):
        assert out.returncode == 2, out.stderr
        assert f"  - {name}: key source " in out.stderr
        assert "Traceback" not in out.stderr


def test_explain_refuses_a_cookie_key_source_that_is_not_utf8(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["explain", "--backend", "b", "--key", "cookie:\udcff,header:x-request-id", "--cookie", "\udcff=alice"]
    assert main(args) == 2
    assert "--key: key source 'cookie:\\udcff': name '\\udcff' holds bytes that are not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["check-config"], ["envoy-config", "--inline", "lua"], ["explain"], ["serve", "--listen", "127.0.0.1:0"]]
)
def test_a_salt_that_is_not_utf8_is_refused_naming_the_variable(command: list[str]) -> None:
    for out in (
        run_cli(*command, "--backend", "b", "--salt", "v\udcff"),
        run_cli(*command, "--backend", "b", env={"MIRROR_SALT": "v\udcff"}),
        run_cli(*command, "--config", str(CONFORMANCE), env={"MIRROR_SALT": "\udcff"}),
    ):
        assert out.returncode == 2, out.stderr
        assert "MIRROR_SALT (--salt): the salt holds bytes that are not UTF-8" in out.stderr
        assert "Traceback" not in out.stderr


def test_explain_takes_path_host_and_method_bytes_as_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    request = ["--path", "/\udcff?uid=alice", "--host", "h\udcff", "--method", "g\udcff"]
    assert main(["explain", "--backend", "b", "--key", "query:uid", "--json", *request]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["rule"], result["key"], result["u"]) == ("simple", "alice", key_hash(b"", b"alice"))
    # Matching reads the same bytes: a method that is not GET is not mirrored by a GET-only rule.
    assert main(["explain", "--backend", "b", "--methods", "GET", "--header", "x-request-id=a", "--json", *request]) == 0
    assert [t["decision"] for t in json.loads(capsys.readouterr().out)["targets"]] == ["method"]


def test_explain_bulk_refuses_json_nested_too_deeply_naming_the_line(tmp_path: Path) -> None:
    lines = tmp_path / "lines.jsonl"
    lines.write_text('alice\n{"key": ' + "[" * 3000 + "\n")
    out = run_cli("explain", "--backend", "b", "--bulk", str(lines))
    assert out.returncode == 2
    assert f"explain --bulk {lines}: line 2: invalid JSON: nested too deeply" in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout.startswith("alice\t")
