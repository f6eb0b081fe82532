"""SSH host keys: the forwarder's own key, and the agent's check of it.

A job must never talk to an unverified server: the token it sends is the
user's hub credential. So the agent pins either a fingerprint or a
known_hosts file, and only an explicit insecure setting turns that off.
"""

from __future__ import annotations

import os
import secrets
import stat
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


class HostKeyError(Exception):
    """The host key file exists but must not be used (e.g. readable by others)."""


def _load(path: Path) -> asyncssh.SSHKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise HostKeyError(
            f"host key {path} has mode {mode:04o}: it must be readable by its owner only "
            f"(chmod 600 {path}), or anyone on this machine can impersonate the forwarder"
        )
    return asyncssh.read_private_key(str(path))


def load_or_generate(path: Path) -> asyncssh.SSHKey:
    """Load the host key, creating an ed25519 key (mode 0600) on first start.

    Written to an exclusively created temporary file, then linked into place: ``link``
    fails if the path exists, so of two forwarders starting together on a new path exactly
    one key lands on disk and both serve it (a ``rename`` would let the loser serve a key
    nobody can pin). A crash never leaves half a key. An existing key readable by group or
    others is refused (:class:`HostKeyError`), as sshd does.
    """
    if path.exists():
        return _load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="jobtunnel-forwarder")
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.export_private_key())
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _load(path)  # another forwarder won the race: serve its key
    finally:
        tmp.unlink(missing_ok=True)
    pub = path.parent / f".{path.name}.{secrets.token_hex(8)}.pub.tmp"
    key.write_public_key(str(pub))
    os.replace(pub, str(path) + ".pub")
    return key


def normalise_fingerprint(value: str) -> str:
    return value.strip().rstrip("=")


def matches(key: asyncssh.SSHKey, pinned: str) -> bool:
    return normalise_fingerprint(fingerprint(key)) == normalise_fingerprint(pinned)
