"""Benchmark the tunnel's data path against baselines measured side by side.

``.venv/bin/python bench/tunnel.py [--quick] [--tuning] [--profile DIR]``

Everything runs on loopback, as real processes:

- a target service (this file with ``--role service``): a byte-counting sink for
  bulk transfers and an echo for round trips, ``TCP_NODELAY`` on every socket;
- **direct**: client -> service;
- **openssh**: a private ``sshd -D -e -f <own config>`` plus ``ssh -N -R``;
- **jobtunnel**: real ``jobtunnel-forwarder`` and ``jobtunnel-agent`` processes
  (token-file auth, pinned host key), the client dials the address in ``/tunnels``;
- **asyncssh pairs**: two small processes (``--role pair-server`` / ``pair-client``)
  mirroring the daemons' data path (server ``forward_local_port`` <-> client
  ``create_server`` + ``forward_connection``) with a chosen cipher, window, packet
  size or event loop, since the daemons themselves have no such settings.

Runs are interleaved (every repetition visits every path, in a rotated order) so
that machine noise hits all paths alike. Every process started is stopped at the
end, on success, failure or Ctrl-C. Needs ``sshd``: see ``bench/setup``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
SSHD = Path("/usr/sbin/sshd")
LOOPBACK = "127.0.0.1"
CHUNK = 64 * 1024
MSG = 64
STARTUP_TIMEOUT = 60.0
IO_TIMEOUT = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
OPENSSH_CIPHER = "chacha20-poly1305@openssh.com"  # asyncssh's (so jobtunnel's) first choice
BARS = {"bulk": 0.75, "rtt": 1.2}


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


# --------------------------------------------------------------------------------------
# The target service: "S" + 8-byte length -> sink, answers the count; "E" -> echo.


class _ServiceHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(IO_TIMEOUT)
        try:
            mode = sock.recv(1)
            if mode == b"S":
                want = int.from_bytes(recv_exact(sock, 8), "big")
                buf = bytearray(1 << 20)
                view = memoryview(buf)
                got = 0
                while got < want:
                    n = sock.recv_into(view, min(len(buf), want - got))
                    if not n:
                        break
                    got += n
                sock.sendall(got.to_bytes(8, "big"))
            elif mode == b"E":
                while data := sock.recv(65536):
                    sock.sendall(data)
        except OSError:
            pass  # readiness probes connect and leave; a client may give up


class _Service(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def run_service(port_file: Path) -> None:
    with _Service((LOOPBACK, 0), _ServiceHandler) as server:
        announce(port_file, str(server.server_address[1]))
        server.serve_forever()


# --------------------------------------------------------------------------------------
# The asyncssh pair: the daemons' data path with knobs the daemons don't have.


def announce(port_file: Path, text: str) -> None:
    """Tell the parent where we listen (written whole: the parent polls the file)."""
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(port_file)


def _pair_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"compression_algs": ["none"]}
    if args.enc:
        options["encryption_algs"] = [args.enc]
    if args.mac:
        options["mac_algs"] = [args.mac]
    return options


def _channel_options(args: argparse.Namespace) -> dict[str, int]:
    options = {}
    if args.window:
        options["window"] = args.window
    if args.pktsize:
        options["max_pktsize"] = args.pktsize
    return options


async def _pair_server(args: argparse.Namespace) -> None:
    import asyncssh
    from asyncssh.listener import create_tcp_forward_listener

    token = os.environ["BENCH_PAIR_TOKEN"]
    chan_opts = {} if args.client_only else _channel_options(args)

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            self.conn = conn

        def begin_auth(self, username: str) -> bool:
            return True

        def password_auth_supported(self) -> bool:
            return True

        def validate_password(self, username: str, password: str) -> bool:
            return secrets.compare_digest(password, token)

        async def server_requested(self, listen_host: str, listen_port: int) -> Any:
            # As daemons/forwarder/server.py `_bind`: a port of our choosing, the
            # channel names the service and the port the client asked for.
            port = free_port()
            dest_port = listen_port or port
            if not chan_opts:
                return await self.conn.forward_local_port(LOOPBACK, port, listen_host, dest_port)
            conn = self.conn

            async def tunnel(factory: Any, orig_host: str, orig_port: int) -> Any:
                return await conn.create_connection(
                    factory, listen_host, dest_port, orig_host, orig_port, **chan_opts
                )

            return await create_tcp_forward_listener(
                conn, asyncio.get_running_loop(), tunnel, LOOPBACK, port
            )

    server = await asyncssh.create_server(
        Server,
        LOOPBACK,
        0,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        encoding=None,
        **_pair_options(args),
    )
    port = server.sockets[0].getsockname()[1]
    announce(args.port_file, str(port))
    await asyncio.Event().wait()


async def _pair_client(args: argparse.Namespace) -> None:
    import asyncssh

    async with asyncssh.connect(
        LOOPBACK,
        args.ssh_port,
        username="bench",
        password=os.environ["BENCH_PAIR_TOKEN"],
        known_hosts=None,  # bench only: loopback, a key generated a second ago
        client_keys=None,
        agent_path=None,
        config=[],
        preferred_auth="password",
        encoding=None,
        **_pair_options(args),
    ) as conn:
        service_port = args.service_port

        def factory(orig_host: str, orig_port: int) -> Any:
            # As daemons/agent/session.py `_forward`.
            return conn.forward_connection(LOOPBACK, service_port)

        listener = await conn.create_server(factory, "scheduler", 0, **_channel_options(args))
        info = {k: conn.get_extra_info(k) for k in ("send_cipher", "send_mac", "send_compression")}
        info["port"] = listener.get_port()
        info["loop"] = type(asyncio.get_running_loop()).__module__.split(".")[0]
        announce(args.port_file, json.dumps(info))
        await conn.wait_closed()


def run_pair(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    main = _pair_server(args) if args.role == "pair-server" else _pair_client(args)
    if args.uvloop:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


# --------------------------------------------------------------------------------------
# Process management.


class Procs:
    """Started processes, each in its own process group; all stopped by :meth:`stop_all`."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[Any] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        log = (self.logs / f"{name}.log").open("wb")
        self._files.append(log)
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc.pid

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{tail}")

    def wait_for(self, what: str, predicate: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            self.check()
            with contextlib.suppress(OSError, ValueError):
                result = predicate()
                if result:
                    return result
            time.sleep(0.05)
        raise RuntimeError(f"timed out after {STARTUP_TIMEOUT:.0f}s waiting for {what}")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        below = descendants(proc.pid)[1:]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # Leftovers: the group, and children that left it (sshd's per-connection ones).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in below:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)
        for f in self._files:
            f.close()


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far, user + system, all threads)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        table[int(stat.parent.name)] = (int(fields[1]), cpu)
    return table


def descendants(root: int, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """``root`` and every process below it (sshd's per-connection children call setsid)."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_cpu(roots: list[int]) -> dict[int, float]:
    """CPU seconds used so far by the live processes of each root's tree."""
    table = _proc_table()
    return {root: sum(table[pid][1] for pid in descendants(root, table)) for root in roots}


# --------------------------------------------------------------------------------------
# The paths and the measurements.


@dataclass
class Path_:
    name: str
    cipher: str
    port: int = 0
    groups: list[int] = field(default_factory=list)  # listener side, client side
    bulk: list[float] = field(default_factory=list)  # MB/s per run
    cpu: list[list[float]] = field(default_factory=list)  # CPU s of each tree per bulk run
    rtt_runs: list[list[float]] = field(default_factory=list)  # microseconds


def bulk_once(port: int, total: int) -> float:
    payload = memoryview(os.urandom(CHUNK))
    with socket.create_connection((LOOPBACK, port), timeout=IO_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        s.sendall(b"S" + total.to_bytes(8, "big"))
        for _ in range(total // CHUNK):
            s.sendall(payload)
        got = int.from_bytes(recv_exact(s, 8), "big")
        elapsed = time.perf_counter() - t0
    if got != total:
        raise RuntimeError(f"sink counted {got} bytes, sent {total}")
    return total / elapsed / 1e6


def rtt_once(port: int, count: int, warmup: int = 100) -> list[float]:
    msg = os.urandom(MSG)
    samples = []
    with socket.create_connection((LOOPBACK, port), timeout=IO_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"E")
        for i in range(warmup + count):
            t0 = time.perf_counter_ns()
            s.sendall(msg)
            if recv_exact(s, MSG) != msg:
                raise RuntimeError("echo mismatch")
            if i >= warmup:
                samples.append((time.perf_counter_ns() - t0) / 1000)
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def accepts(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=2):
        return True


# --------------------------------------------------------------------------------------
# Setting up each path.


def start_service(procs: Procs, work: Path) -> int:
    port_file = work / "service.port"
    me = [sys.executable, str(Path(__file__).resolve())]
    procs.start("service", [*me, "--role", "service", "--port-file", str(port_file)])
    return int(procs.wait_for("the service", lambda: port_file.read_text().strip()))


def _ssh_client_argv(work: Path, port: int, *extra: str) -> list[str]:
    return [
        "ssh", "-F", "/dev/null", "-p", str(port), "-i", str(work / "client_key"),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={work / 'known_hosts'}",
        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
        "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30",
        *extra, f"root@{LOOPBACK}",
    ]  # fmt: skip


def start_sshd(procs: Procs, work: Path) -> int:
    if not SSHD.exists():
        raise SystemExit(
            "bench: no /usr/sbin/sshd: run bench/setup first (installs openssh-server)"
        )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    for key in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key)], check=True
        )
    shutil.copy(work / "client_key.pub", work / "authorized_keys")
    port = free_port()
    (work / "sshd_config").write_text(
        f"""ListenAddress {LOOPBACK}:{port}
AddressFamily inet
HostKey {work / "host_key"}
PidFile none
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile {work / "authorized_keys"}
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding remote
GatewayPorts no
X11Forwarding no
AllowAgentForwarding no
PermitTTY no
PrintMotd no
LogLevel INFO
"""
    )
    pub = (work / "host_key.pub").read_text().split()
    (work / "known_hosts").write_text(f"[{LOOPBACK}]:{port} {pub[0]} {pub[1]}\n")
    procs.start("sshd", [str(SSHD), "-D", "-e", "-f", str(work / "sshd_config")])
    procs.wait_for("sshd", lambda: accepts(port))
    return port


def openssh_default_cipher(work: Path, sshd_port: int) -> str:
    """What OpenSSH's client and server agree on with no -c (from ``ssh -v``)."""
    out = subprocess.run(
        _ssh_client_argv(work, sshd_port, "-v", "-T"),
        input=b"",
        capture_output=True,
        timeout=30,
        check=False,
    ).stderr.decode(errors="replace")
    match = re.search(r"kex: client->server cipher: (\S+) MAC: (\S+) compression: (\S+)", out)
    if not match:
        return "unknown"
    cipher, mac, comp = match.groups()
    return cipher + ("" if mac == "<implicit>" else f"+{mac}") + f", compression {comp}"


def start_openssh(
    procs: Procs, work: Path, sshd_port: int, service_port: int, cipher: str, name: str
) -> Path_:
    port = free_port()
    procs.start(
        name,
        _ssh_client_argv(
            work, sshd_port, "-N", "-v", "-c", cipher,
            "-R", f"{LOOPBACK}:{port}:{LOOPBACK}:{service_port}",
        ),
    )  # fmt: skip
    procs.wait_for(f"{name} -R listener", lambda: accepts(port))
    log = (work / "logs" / f"{name}.log").read_text(errors="replace")
    match = re.search(r"kex: client->server cipher: (\S+)", log)
    negotiated = match.group(1) if match else cipher
    return Path_(name, negotiated, port, [procs.procs["sshd"].pid, procs.procs[name].pid])


def start_jobtunnel(procs: Procs, work: Path, service_port: int) -> Path_:
    sys.path.insert(0, str(ROOT))
    from shared import hostkeys

    token = secrets.token_urlsafe(32)
    (work / "tokens").write_text(f"bench {token}\n")
    (work / "tokens").chmod(0o600)
    (work / "agent_token").write_text(token + "\n")
    (work / "agent_token").chmod(0o600)
    host_key = hostkeys.load_or_generate(work / "jt_host_key")
    ssh_port, http_port, listen_port = free_port(), free_port(), free_port()
    admin_port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JOBTUNNEL_", "JUPYTERHUB_"))}
    procs.start(
        "forwarder",
        [str(BIN / "jobtunnel-forwarder")],
        base
        | {
            "JOBTUNNEL_LISTEN": f"{LOOPBACK}:{ssh_port}",
            "JOBTUNNEL_HTTP": f"{LOOPBACK}:{http_port}",
            "JOBTUNNEL_ADMIN_HTTP": f"{LOOPBACK}:{admin_port}",
            "JOBTUNNEL_HOST_KEY": str(work / "jt_host_key"),
            "JOBTUNNEL_AUTH": "token-file",
            "JOBTUNNEL_TOKEN_FILE": str(work / "tokens"),
            "JOBTUNNEL_PORT_RANGE": f"{listen_port}-{listen_port}",
            "JOBTUNNEL_SERVICE_HOST": LOOPBACK,
        },
    )
    url = f"http://{LOOPBACK}:{admin_port}/tunnels"

    def tunnels() -> Any:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.load(resp)

    procs.wait_for("the forwarder", lambda: tunnels() == [])
    procs.start(
        "agent",
        [str(BIN / "jobtunnel-agent")],
        base
        | {
            "JOBTUNNEL_FORWARDER": f"{LOOPBACK}:{ssh_port}",
            "JOBTUNNEL_USER": "bench",
            "JOBTUNNEL_TOKEN_FILE": str(work / "agent_token"),
            "JOBTUNNEL_HOST_KEY_FINGERPRINT": hostkeys.fingerprint(host_key),
            "JOBTUNNEL_SERVICES": f"scheduler={service_port}",
            "JOBTUNNEL_PRIVATE_IP": LOOPBACK,
        },
    )
    listed = procs.wait_for("the tunnel in /tunnels", tunnels)
    host, _, port = listed[0]["services"]["scheduler"].rpartition(":")
    assert host == LOOPBACK, host
    procs.wait_for("the tunnel listener", lambda: accepts(int(port)))
    # The agent (the SSH client, whose order decides) prefers shared.hostkeys.CIPHERS.
    return Path_(
        "jobtunnel",
        hostkeys.CIPHERS[0],
        int(port),
        [procs.procs[n].pid for n in ("forwarder", "agent")],
    )


@dataclass(frozen=True)
class PairVariant:
    name: str
    enc: str = ""
    mac: str = ""
    window: int = 0
    pktsize: int = 0
    uvloop: bool = False
    client_only: bool = False  # window/pktsize only where the agent can set them today

    def flags(self) -> list[str]:
        out = ["--enc", self.enc, "--mac", self.mac]
        out += ["--window", str(self.window), "--pktsize", str(self.pktsize)]
        out += ["--client-only"] if self.client_only else []
        return out + (["--uvloop"] if self.uvloop else [])


CIPHER_VARIANTS = [
    PairVariant("asyncssh default"),
    PairVariant("asyncssh aes128-gcm", enc="aes128-gcm@openssh.com"),
    PairVariant("asyncssh aes256-gcm", enc="aes256-gcm@openssh.com"),
    PairVariant("asyncssh chacha20", enc="chacha20-poly1305@openssh.com"),
    PairVariant("asyncssh aes128-ctr+etm", enc="aes128-ctr", mac="hmac-sha2-256-etm@openssh.com"),
]
GCM = "aes128-gcm@openssh.com"
TUNING_VARIANTS = [
    PairVariant("aes128-gcm win 8M", enc=GCM, window=8 << 20),
    PairVariant("aes128-gcm win 8M agent only", enc=GCM, window=8 << 20, client_only=True),
    PairVariant("aes128-gcm pkt 128K", enc=GCM, pktsize=128 << 10),
    PairVariant("aes128-gcm win 8M pkt 128K", enc=GCM, window=8 << 20, pktsize=128 << 10),
    PairVariant("aes128-gcm uvloop", enc=GCM, uvloop=True),
    PairVariant("aes128-gcm win 8M uvloop", enc=GCM, window=8 << 20, uvloop=True),
    PairVariant("chacha20 uvloop", enc="chacha20-poly1305@openssh.com", uvloop=True),
]


def start_pair(procs: Procs, work: Path, service_port: int, v: PairVariant, idx: int) -> Path_:
    me = [sys.executable, str(Path(__file__).resolve())]
    env = os.environ | {"BENCH_PAIR_TOKEN": secrets.token_urlsafe(16)}
    sfile, cfile = work / f"pair{idx}.server", work / f"pair{idx}.client"
    procs.start(
        f"pair{idx}-server",
        [*me, "--role", "pair-server", "--port-file", str(sfile), *v.flags()],
        env,
    )
    ssh_port = int(procs.wait_for(f"{v.name} server", lambda: sfile.read_text().strip()))
    procs.start(
        f"pair{idx}-client",
        [*me, "--role", "pair-client", "--port-file", str(cfile), "--ssh-port", str(ssh_port),
         "--service-port", str(service_port), *v.flags()],
        env,
    )  # fmt: skip
    info = json.loads(procs.wait_for(f"{v.name} client", lambda: cfile.read_text().strip()))
    procs.wait_for(f"{v.name} listener", lambda: accepts(info["port"]))
    mac = (
        ""
        if info["send_mac"] in ("", "none", "chacha20-poly1305@openssh.com")
        else info["send_mac"]
    )
    if "gcm" in info["send_cipher"]:
        mac = ""
    cipher = info["send_cipher"] + (f"+{mac}" if mac else "")
    if info["send_compression"] != "none":
        cipher += f" (compression {info['send_compression']}!)"
    pids = [procs.procs[f"pair{idx}-{side}"].pid for side in ("server", "client")]
    return Path_(v.name, cipher, info["port"], pids)


# --------------------------------------------------------------------------------------
# Profiling: py-spy on the real daemons during one bulk transfer.


def profile_jobtunnel(path: Path_, outdir: Path, total: int) -> None:
    spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if spy is None:
        say("py-spy not found (.venv/bin/pip install py-spy): skipping --profile")
        return
    outdir.mkdir(parents=True, exist_ok=True)
    spies = []
    for role, pid in zip(("forwarder", "agent"), path.groups, strict=True):
        out = outdir / f"{role}.txt"
        spies.append(
            (role, out, subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
                 "--nonblocking", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            ))
        )  # fmt: skip
    try:
        time.sleep(1.0)
        mbps = bulk_once(path.port, total)
        say(f"profiled bulk run: {mbps:.0f} MB/s (py-spy attached)")
    finally:
        for _, _, proc in spies:
            proc.send_signal(signal.SIGINT)
        for _, _, proc in spies:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    for role, out, _ in spies:
        if out.exists():
            print(f"\nprofile of the {role} under bulk load (py-spy, {out}):")
            print(summarize_profile(out))


PROFILE_BUCKETS = (
    # (bucket, predicate on the innermost Python frame: py-spy charges a C call,
    # such as the send()/recv() system call, to the Python function making it)
    (
        "socket send/recv syscalls",
        ("_SelectorSocketTransport.write ", "_read_ready__data_received"),
    ),
    ("waiting in epoll", ("EpollSelector.select",)),
    ("crypto", ("asyncssh/crypto/", "cryptography/", "asyncssh/encryption.py", "asyncssh/mac.py")),
    ("asyncssh packets/channels", ("asyncssh/",)),
)


def summarize_profile(raw: Path, top: int = 10) -> str:
    """Self time by function, and by bucket, from py-spy's collapsed stacks."""
    self_time: dict[str, int] = {}
    buckets = dict.fromkeys([b for b, _ in PROFILE_BUCKETS] + ["other Python"], 0)
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        leaf = stack.split(";")[-1]
        name = re.sub(r":\d+\)$", ")", leaf)
        self_time[name] = self_time.get(name, 0) + count
        for bucket, needles in PROFILE_BUCKETS:
            if any(n in leaf for n in needles):
                buckets[bucket] += count
                break
        else:
            buckets["other Python"] += count
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; self time by bucket:"]
    lines += [f"  {100 * c / total:5.1f}%  {b}" for b, c in buckets.items()]
    lines.append("  top functions (self time):")
    for name, count in sorted(self_time.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}%  {name}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The run.


def measure(paths: list[Path_], reps: int, total: int, rtt_count: int) -> None:
    for rep in range(reps):
        order = paths[rep % len(paths) :] + paths[: rep % len(paths)]
        for path in order:
            before = tree_cpu(path.groups)
            path.bulk.append(bulk_once(path.port, total))
            after = tree_cpu(path.groups)
            path.cpu.append([after[g] - before[g] for g in path.groups])
        for path in reversed(order):
            path.rtt_runs.append(rtt_once(path.port, rtt_count))
        say(
            f"repetition {rep + 1}/{reps}: "
            + ", ".join(f"{p.name} {p.bulk[-1]:.0f} MB/s" for p in paths)
        )


def report(paths: list[Path_], total: int, reps: int, rtt_count: int) -> None:
    print(
        f"\nbulk: {total >> 20} MiB one way in {CHUNK >> 10} KiB writes, {reps} runs per path; "
        f"round trip: {rtt_count} x {MSG} B sequential per run (pooled over runs)\n"
    )
    header = (
        f"| {'path':<28} | {'cipher negotiated':<34} | {'bulk MB/s median':>16} | "
        f"{'min-max':>11} | {'CPU µs/MB listen+client':>23} | {'RTT µs median':>13} | "
        f"{'p99':>7} | {'p90':>7} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for p in paths:
        samples = [x for run in p.rtt_runs for x in run]
        mb = total / 1e6
        cpu = (
            "+".join(
                f"{1e6 * statistics.median(c[i] for c in p.cpu) / mb:.0f}"
                for i in range(len(p.groups))
            )
            if p.groups
            else "-"
        )
        print(
            f"| {p.name:<28} | {p.cipher:<34} | {statistics.median(p.bulk):>16.0f} | "
            f"{f'{min(p.bulk):.0f}-{max(p.bulk):.0f}':>11} | {cpu:>23} | "
            f"{statistics.median(samples):>13.0f} | {percentile(samples, 0.99):>7.0f} | "
            f"{percentile(samples, 0.90):>7.0f} |"
        )
    by_name = {p.name: p for p in paths}
    ssh = by_name["openssh"]
    ssh_bulk = statistics.median(ssh.bulk)
    ssh_rtt = statistics.median([x for run in ssh.rtt_runs for x in run])
    print("\nratios against openssh (same run, same cipher family):")
    for p in paths:
        if p.name in ("direct", "openssh") or p.name.startswith("openssh "):
            continue
        bulk = statistics.median(p.bulk) / ssh_bulk
        rtt = statistics.median([x for run in p.rtt_runs for x in run]) / ssh_rtt
        ok_b = "meets" if bulk >= BARS["bulk"] else "MISSES"
        ok_r = "meets" if rtt <= BARS["rtt"] else "MISSES"
        print(
            f"  {p.name:<28} bulk {bulk:5.2f}x ({ok_b} >= {BARS['bulk']}x)   "
            f"RTT {rtt:5.2f}x ({ok_r} <= {BARS['rtt']}x)"
        )
    jt = by_name["jobtunnel"]
    bulk = statistics.median(jt.bulk) / ssh_bulk
    rtt = statistics.median([x for run in jt.rtt_runs for x in run]) / ssh_rtt
    verdict = "MET" if bulk >= BARS["bulk"] and rtt <= BARS["rtt"] else "NOT MET"
    print(f"\njobtunnel bars: bulk {bulk:.2f}x, RTT {rtt:.2f}x -> {verdict}")


def environment() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import asyncssh
    import cryptography

    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False).stderr.strip()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; nproc {os.cpu_count()}; CPU {cpu}; "
        f"kernel {os.uname().release}; Python {sys.version.split()[0]}; "
        f"asyncssh {asyncssh.__version__}; cryptography {cryptography.__version__}; {ssh}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run: 64 MiB, 3 reps")
    parser.add_argument("--tuning", action="store_true", help="also window/packet/uvloop pairs")
    parser.add_argument("--reps", type=int, help="repetitions per path (default 5, quick 3)")
    parser.add_argument("--bulk-mib", type=int, help="MiB per bulk run (default 256, quick 64)")
    parser.add_argument("--rtt-count", type=int, help="round trips per run (default 2000)")
    parser.add_argument("--profile", type=Path, help="py-spy the daemons under bulk load here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    # Internal roles (child processes of this script).
    parser.add_argument("--role", choices=["service", "pair-server", "pair-client"])
    parser.add_argument("--port-file", type=Path)
    parser.add_argument("--ssh-port", type=int)
    parser.add_argument("--service-port", type=int)
    parser.add_argument("--enc", default="")
    parser.add_argument("--mac", default="")
    parser.add_argument("--window", type=int, default=0)
    parser.add_argument("--pktsize", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--client-only", action="store_true")
    args = parser.parse_args(argv)

    if args.role == "service":
        run_service(args.port_file)
        return 0
    if args.role in ("pair-server", "pair-client"):
        run_pair(args)
        return 0

    reps = args.reps or (3 if args.quick else 5)
    total = (args.bulk_mib or (64 if args.quick else 256)) << 20
    total -= total % CHUNK
    rtt_count = args.rtt_count or (500 if args.quick else 2000)

    # SIGTERM/SIGHUP end the run like Ctrl-C does: through the finally below.
    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    work = Path(tempfile.mkdtemp(prefix="jobtunnel-bench-"))
    (work / "logs").mkdir()
    procs = Procs(work / "logs")
    env_line = environment()
    say(env_line)
    try:
        service = start_service(procs, work)
        sshd_port = start_sshd(procs, work)
        default_cipher = openssh_default_cipher(work, sshd_port)
        paths = [Path_("direct", "-", service)]
        paths.append(start_openssh(procs, work, sshd_port, service, OPENSSH_CIPHER, "openssh"))
        paths.append(start_jobtunnel(procs, work, service))
        variants = CIPHER_VARIANTS + (TUNING_VARIANTS if args.tuning else [])
        for i, variant in enumerate(variants):
            paths.append(start_pair(procs, work, service, variant, i))
        if args.tuning:
            paths.append(start_openssh(procs, work, sshd_port, service, GCM, "openssh aes128-gcm"))
        say(f"all paths up; openssh's default negotiation: {default_cipher}")
        measure(paths, reps, total, rtt_count)
        procs.check()
        print(f"machine: {env_line}")
        print(f"openssh default negotiation (no -c): {default_cipher}")
        report(paths, total, reps, rtt_count)
        if args.profile:
            profile_jobtunnel(paths[2], args.profile, total)
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
