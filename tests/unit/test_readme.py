"""The README's configuration table covers every setting, with its default."""

from __future__ import annotations

import re

import yaml

from extproc.config.build import build_policy
from extproc.config.settings import OPTIONS, Settings
from extproc.envoy.render import Topology, render
from tests.support.paths import REPO


def test_every_setting_is_in_the_readme_table_with_its_flag_and_default() -> None:
    readme = (REPO / "README.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(MIRROR_[A-Z_]+)` \|.*$", readme, re.M)}
    assert set(rows) == {o.env for o in OPTIONS}
    for opt in OPTIONS:
        assert f"`{opt.flag}`" in rows[opt.env], opt.env
        if opt.default:
            assert f"`{opt.default}`" in rows[opt.env], opt.env


def test_first_screen_shows_make_up_and_a_curl() -> None:
    first_screen = "\n".join((REPO / "README.md").read_text().splitlines()[:25])
    assert "make up" in first_screen and "curl -H 'Host: backends.example'" in first_screen


def test_the_readme_snippet_example_is_what_envoy_config_prints() -> None:
    """The routes the README shows for `--snippet` are regenerated, not remembered."""
    readme = (REPO / "README.md").read_text()
    marker = "<!-- snippet-routes: MIRROR_BACKEND=backend-2 mirror-sampler envoy-config --snippet -->\n```yaml\n"
    shown = readme.split(marker, 1)[1].split("```", 1)[0]
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "backend-2"}))
    snippet = yaml.safe_load(render(policy, Topology(), snippet_only=True))
    assert yaml.safe_load(shown) == {"routes": snippet["virtual_hosts"][0]["routes"]}
