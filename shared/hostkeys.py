"""SSH host keys: the forwarder's own key, and the agent's check of it.

A job must never talk to an unverified server: the token it sends is the
user's hub credential. So the agent pins either a fingerprint or a
known_hosts file, and only an explicit insecure setting turns that off.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import asyncssh

# asyncssh does AES-GCM in one `cryptography` call per packet but chacha20 in
# several: measured here (docs/benchmarks.md) AES-GCM moves 1.35-1.6x the bytes
# per CPU second. The client's order decides, so both daemons list it first.
CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)
# Bigger than asyncssh's 2 MiB default: fewer window adjustments on bulk transfers.
FORWARD_WINDOW = 8 << 20


def fingerprint(key: asyncssh.SSHKey) -> str:
    """OpenSSH's ``SHA256:...`` form, as ``ssh-keygen -lf`` prints it."""
    return str(key.get_fingerprint("sha256"))


def load_or_generate(path: Path) -> asyncssh.SSHKey:
    """Load the host key, creating an ed25519 key (mode 0600) on first start.

    Written to a temporary file and renamed, so a crash never leaves half a key
    that would change the fingerprint every agent has pinned.
    """
    if path.exists():
        return asyncssh.read_private_key(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="jobtunnel-forwarder")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hostkey-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.export_private_key())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    key.write_public_key(str(path) + ".pub")
    return key


def normalise_fingerprint(value: str) -> str:
    return value.strip().rstrip("=")


def matches(key: asyncssh.SSHKey, pinned: str) -> bool:
    return normalise_fingerprint(fingerprint(key)) == normalise_fingerprint(pinned)
