"""Dependencies are pinned: every requirement of the project (service and test extra) has an exact
version in constraints.txt that satisfies pyproject.toml, so a fresh install is reproducible. A
non-editable install (what k8s/Dockerfile does) carries the files `klein serve` and `klein loadtest`
read at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
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


_INSTALLED = """
import sys
from pathlib import Path
import serve, serve.loadtest, serve.run
target = Path(sys.argv[1]).resolve()
assert Path(serve.__file__).resolve().is_relative_to(target), ("serve imported from", serve.__file__)
for path in (serve.run.DEFAULT_CONFIG, *serve.run.CONFIGS.glob("*.yaml"), serve.loadtest.LOCUSTFILE):
    assert path.resolve().is_relative_to(target) and path.is_file(), path
print(" ".join(sorted(p.name for p in serve.run.CONFIGS.glob("*.yaml"))))
"""


def _dockerfile_sources() -> list[str]:
    """What k8s/Dockerfile copies into the image before `pip install .`."""
    sources = []
    for line in (ROOT / "k8s" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *srcs, _dest = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += srcs
    assert "pyproject.toml" in sources and "serve" in sources, sources
    return sources


@pytest.mark.slow
def test_a_non_editable_install_has_the_configs_and_the_locustfile(tmp_path: Path):
    # Built from a copy of what the image gets (no stale build/ of the checkout's, nothing else beside it),
    # installed into a plain folder, imported from outside the repository.
    src = tmp_path / "src"
    for name in _dockerfile_sources():
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    # --no-build-isolation: offline, with this environment's setuptools (torch requires it)
    _run("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src, cwd=tmp_path)
    (wheel,) = wheels.glob("klein_serve-*.whl")
    _run("-m", "pip", "install", "--no-deps", "--target", target, wheel, cwd=tmp_path)
    out = _run("-c", _INSTALLED, target, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)})
    assert out.split() == sorted(p.name for p in (ROOT / "serve" / "configs").glob("*.yaml")), out


def _run(*args, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    what = " ".join(map(str, args[:3])) if args[0] == "-m" else "the check in the installed package"
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout
