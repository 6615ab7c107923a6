"""Dependencies are pinned: every requirement of the project (service and test extra) has an exact
version in constraints.txt that satisfies pyproject.toml, so a fresh install is reproducible."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_requirement_is_pinned_and_consistent():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    pins = _pins()
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (text, pins[name])


def test_the_documented_installs_use_the_constraints():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("-c constraints.txt") >= 2
    assert "-c constraints.txt" in (ROOT / "k8s" / "Dockerfile").read_text()
