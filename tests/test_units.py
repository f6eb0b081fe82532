"""The systemd units pass systemd's own verifier and its hardening review."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
VENV_BIN = Path(sys.executable).parent

# systemd-analyze security: 0.0 (locked down) .. 10.0 (exposed); --threshold takes x10.
EXPOSURE = {"jobtunnel-forwarder.service": 2.0, "jobtunnel-agent@demo.service": 4.0}


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with the install prefix pointed at this venv, so ExecStart resolves."""
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: scripts/setup installs it"
    for unit in UNITS.glob("*.service"):
        text = unit.read_text().replace("/opt/jobtunnel/bin/", f"{VENV_BIN}/")
        (tmp_path / unit.name).write_text(text)
    (tmp_path / "jobtunnel-agent@demo.service").write_text(
        (tmp_path / "jobtunnel-agent@.service").read_text()
    )
    return tmp_path


@pytest.mark.parametrize("unit", sorted(EXPOSURE))
def test_unit_verifies_and_is_hardened(unit_dir: Path, unit: str) -> None:
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", unit],
        cwd=unit_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            f"--threshold={int(EXPOSURE[unit] * 10)}",
            unit,
        ],
        cwd=unit_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr


def test_units_never_put_a_token_on_a_command_line() -> None:
    for unit in UNITS.glob("*.service"):
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart"):
                assert "TOKEN" not in line.upper(), f"{unit.name}: {line}"
