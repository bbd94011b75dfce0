"""Building the module, the Envoy version guard with a fake `envoy --version`, and
`envoy-config --inline module` accepted by Envoy's own validation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.config.errors import ConfigError
from extproc.config.settings import Settings
from extproc.module import build
from extproc.module.support import module_for, module_for_installed_envoy
from extproc.stack import envoy as envoy_stack
from extproc.stack.envoy import EnvoyError, validate
from extproc.stack.up import LocalStack
from tests.support.module_elf import symbols
from tests.support.paths import CONFORMANCE

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

HOOKS = [
    "envoy_dynamic_module_on_program_init",
    "envoy_dynamic_module_on_http_filter_config_new",
    "envoy_dynamic_module_on_http_filter_per_route_config_new",
    "envoy_dynamic_module_on_http_filter_new",
    "envoy_dynamic_module_on_http_filter_request_headers",
    "envoy_dynamic_module_on_http_filter_destroy",
]
# Every Envoy callback the module imports: the fewer, the less ABI churn can break it.
CALLBACKS = {
    "envoy_dynamic_module_callback_http_get_header",
    "envoy_dynamic_module_callback_http_set_header",
    "envoy_dynamic_module_callback_http_clear_route_cache",
    "envoy_dynamic_module_callback_http_filter_config_define_counter",
    "envoy_dynamic_module_callback_http_filter_increment_counter",
    "envoy_dynamic_module_callback_get_most_specific_route_config",
}


@needs_cc
def test_build_exports_the_hooks_imports_few_callbacks_and_is_cached(tmp_path: Path) -> None:
    so = build.build_module(tmp_path)
    assert set(HOOKS) <= symbols(so, "--defined-only")
    assert {s for s in symbols(so, "--undefined-only") if s.startswith("envoy_")} == CALLBACKS
    # Only the hooks are exported: the decision's own functions stay hidden.
    assert all(s.startswith("envoy_dynamic_module_on_") for s in symbols(so, "--defined-only") if not s.startswith("_"))
    mtime = so.stat().st_mtime_ns
    assert build.build_module(tmp_path) == so and so.stat().st_mtime_ns == mtime


@needs_cc
def test_the_build_entry_point_needs_only_the_module_sources(tmp_path: Path) -> None:
    """`python -m extproc.module.build OUTPUT` where the Dockerfile's module stage runs it:
    the package's __init__ and module/ only, no site-packages. The library is readable by
    every user: the envoyproxy/envoy image runs Envoy as uid 101."""
    package = tmp_path / "src" / "extproc"
    shutil.copytree(build.SOURCE_DIR, package / "module", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(build.SOURCE_DIR.parent / "__init__.py", package)
    out = tmp_path / "out" / "libmirror_sampler.so"
    entry = [sys.executable, "-S", "-m", "extproc.module.build", str(out)]
    done = subprocess.run(entry, cwd=package.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(HOOKS) <= symbols(out, "--defined-only")
    assert out.stat().st_mode & 0o777 == 0o755
    refused = subprocess.run(entry, cwd=package.parent, env={**os.environ, "CC": "no-such-cc"}, capture_output=True, text=True)
    assert refused.returncode == 1 and "mirror-sampler module: CC='no-such-cc'" in refused.stderr


def test_no_compiler_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(build.ModuleBuildError, match=r"no C compiler found.*--inline lua.*ext_proc"):
        build.build_module(tmp_path / "cache")
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(build.ModuleBuildError, match="CC='no-such-cc'"):
        build.build_module(tmp_path / "cache")


def fake_envoy(tmp_path: Path, version: str) -> str:
    script = tmp_path / "envoy"
    script.write_text(f"#!/bin/sh\necho 'envoy  version: 0123abcd/{version}/Clean/RELEASE/BoringSSL'\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("version", ["1.38.3", "1.41.0"])
def test_unsupported_envoy_is_refused_before_anything_is_built(tmp_path: Path, version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRROR_MODULE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as e:
        module_for(fake_envoy(tmp_path, version))
    (problem,) = e.value.problems
    assert problem.startswith("--inline module") and version in problem and "--inline lua" in problem and "ext_proc" in problem
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def inline_module_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`envoy-config --inline module` as a user runs it, with a module cache of
    its own (so the module is built): the configuration and the cache. Once
    for the two tests below: building the module is most of the time."""
    tmp = tmp_path_factory.mktemp("inline-module")
    out, cache = tmp / "envoy.yaml", tmp / "cache"
    env = {**os.environ, "MIRROR_CONFIG": str(CONFORMANCE), "MIRROR_MODULE_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-m", "extproc", "envoy-config", "--inline", "module", "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return out, cache


@needs_cc
def test_envoy_config_inline_module_passes_envoy_validation(inline_module_config: tuple[Path, Path]) -> None:
    out, cache = inline_module_config
    text = out.read_text()
    assert "envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter" in text and str(cache) in text
    checked = validate(out)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_cc
def test_a_malformed_module_config_is_refused_by_envoy_with_a_message(inline_module_config: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    out.write_text(inline_module_config[0].read_text().replace('"threshold":"', '"threshold":"-', 1))
    checked = validate(out)
    assert checked.returncode != 0
    assert "mirror-sampler module: route config refused: rule.targets[0].threshold" in checked.stdout + checked.stderr


def test_no_envoy_to_check_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> str:
        raise EnvoyError("envoy: binary not found")

    monkeypatch.setattr(envoy_stack, "envoy_binary", missing)
    with pytest.raises(ConfigError, match="cannot check which Envoy will load the module: envoy: binary not found"):
        module_for_installed_envoy()


def test_up_refuses_an_unsupported_envoy_before_starting_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envoy_stack, "envoy_binary", lambda: fake_envoy(tmp_path, "1.38.3"))
    settings = Settings.load({"MIRROR_CONFIG": str(CONFORMANCE)})
    with pytest.raises(ConfigError, match=r"Envoy 1\.38\.3 is not supported"):
        LocalStack(settings, listener_port=0, admin_port=0, log_dir=tmp_path / "logs", inline=True, engine="module")
    assert not (tmp_path / "logs").exists()
