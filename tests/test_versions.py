"""The versions pyproject.toml promises are the versions CI tests.

`.ci/floors-*.txt` pin the oldest end of each range for `.ci/floors`; the newest
end is what `.ci/run` installs. Pure Python: runs in every flavour.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _floors_in_pyproject() -> dict[str, str]:
    """{package: the version after `>=`} of every requirement in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    floors = {}
    for requirement in requirements:
        found = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+?)(?:\[[^\]]*\])?>=([\w.]+)(,.*)?", requirement)
        if found:
            floors[found.group(1).lower()] = found.group(2)
    return floors


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


@pytest.mark.parametrize("name", ["floors-tensorflow.txt", "floors-jax.txt"])
def test_ci_floors_are_pyprojects_floors(name):
    floors = _floors_in_pyproject()
    pins = _pins(ROOT / ".ci" / name)
    assert pins, name
    for package, version in pins.items():
        if package == "jaxlib":  # pinned with jax, whose floor it is
            assert version == floors["jax"], (package, version)
            continue
        assert package in floors, f"{package} is pinned in {name} but has no floor"
        floor = floors[package]
        # "3.12" promises 3.12.0: the pin is the floor, padded with zeros.
        padded = floor + ".0" * (len(version.split(".")) - len(floor.split(".")))
        assert version == padded, f"{name} pins {package}=={version}; pyproject says >={floor}"


def test_the_frameworks_floors_are_pinned_for_ci():
    pinned = _pins(ROOT / ".ci" / "floors-tensorflow.txt") | _pins(ROOT / ".ci" / "floors-jax.txt")
    assert {"tensorflow", "tf-keras", "keras", "jax"} <= set(pinned)


@pytest.mark.parametrize(
    "jaxlib, flag",
    [
        ("0.5.3", ""),
        ("0.7.2", ""),
        ("0.8.0", "--xla_cpu_collective_call_terminate_timeout_seconds=600"),
    ],
)
def test_the_collective_timeout_flag_only_where_jaxlib_knows_it(monkeypatch, jaxlib, flag):
    """jaxlib before 0.8 aborts the process on an XLA flag it does not know."""
    from importlib import metadata

    from keras_parallel._backend.jax.devices import collective_timeout_flag

    monkeypatch.setattr(metadata, "version", lambda name: jaxlib)
    assert collective_timeout_flag() == flag
