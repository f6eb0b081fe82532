"""The lock is what runs: the environment under test is exactly ``requirements.lock``.

``pyproject.toml`` keeps ranges (the user-side helper must not pin users); the lock pins
every package at one version, and ``scripts/setup`` installs from it alone. These tests
fail when the environment drifted from the lock (a package upgraded or added by hand, a
stale venv) or when the lock no longer satisfies ``pyproject.toml`` (a range changed
without ``./scripts/lock``).
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"


def locked() -> dict[str, str]:
    """Name -> version of the pins that apply to this interpreter and platform."""
    pins: dict[str, str] = {}
    env = default_environment()
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"not an exact pin in the lock: {raw!r}"
        if req.marker is None or req.marker.evaluate(env):
            name = canonicalize_name(req.name)
            assert name not in pins, f"two pins apply for {name}"
            pins[name] = spec.version
    return pins


def installed() -> dict[str, str]:
    return {
        canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
    }


def test_environment_is_exactly_the_lock() -> None:
    pins, have = locked(), installed()
    have.pop("jobtunnel")  # the project itself, installed editable from the tree
    wrong = {n: (v, pins[n]) for n, v in have.items() if n in pins and pins[n] != v}
    unlocked = sorted(set(have) - set(pins))
    missing = sorted(set(pins) - set(have))
    assert not wrong, f"installed != locked: {wrong}"
    assert not unlocked, f"installed but not in requirements.lock: {unlocked}"
    assert not missing, f"in requirements.lock but not installed: {missing}"


def test_lock_satisfies_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [
        *project["build-system"]["requires"],
        *project["project"]["dependencies"],
        *project["project"]["optional-dependencies"]["test"],
    ]
    pins = locked()
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} (pyproject.toml) is not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {req.specifier}:"
            " run ./scripts/lock"
        )
