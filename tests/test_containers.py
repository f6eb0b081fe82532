"""What can be checked of the container files without a container engine (none runs here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "containers").glob("*Containerfile"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_final_stage_runs_as_non_root(path: Path) -> None:
    stages = re.split(r"(?m)^FROM ", path.read_text())
    users = re.findall(r"(?m)^USER\s+(\S+)", stages[-1])
    assert users, f"{path.name}: the final stage sets no USER (it would run as root)"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"{path.name}: runs as {users[-1]}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_copied_sources_exist(path: Path) -> None:
    for line in re.findall(r"(?m)^COPY (?!--from)(.+)$", path.read_text()):
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such path"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_images_install_from_the_lock(path: Path) -> None:
    text = path.read_text()
    installs = re.findall(r"pip install[^\n]*", text)
    assert installs, f"{path.name}: installs nothing?"
    assert re.search(r"(?m)^COPY .*\brequirements\.lock\b", text), f"{path.name}: no lock copied"
    # Constraints set before the first install reach every install after it.
    constraint = re.search(r"PIP_CONSTRAINT=\S*requirements\.lock", text)
    assert constraint, f"{path.name}: pip does not install from requirements.lock"
    assert constraint.start() < text.index(installs[0]), f"{path.name}: lock set too late"
