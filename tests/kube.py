"""A real, throw-away Kubernetes control plane for tests: etcd, API server, controller-manager.

Why not a fake: the reconciler's correctness depends on what the API server really does
(RBAC, merge patches, status subresources, custom resources, resourceVersion conflicts) and on
controllers we lean on or must live beside: the garbage collector (a Tunnel is owned by the
forwarder pod that holds the session, the reconciler's EndpointSlice by its Service) and the
endpoints and EndpointSlice controllers (they keep selecting a routed Service's scheduler pod).
Nothing runs pods here: tests write pod status themselves, or ``tests/fakes/virtual_kubelet.py``
does, as InterLink's virtual kubelet would.

The binaries are built from Debian's Kubernetes 1.20.2 source by ``scripts/setup-kube`` into
``~/.cache/jobtunnel/kube-1.20.2/bin``; etcd is Debian's ``etcd-server``. Usage::

    from tests.kube import KubeAPIServer, kube_api  # noqa: F401  (session fixture)

    async def test_x(kube_api: KubeAPIServer) -> None:
        configuration = kubernetes_asyncio.client.Configuration()
        await kubernetes_asyncio.config.load_kube_config(
            config_file=str(kube_api.kubeconfig), client_configuration=configuration
        )
        async with kubernetes_asyncio.client.ApiClient(configuration) as api: ...

Other identities: ``kube_api.kubeconfig_for(UNPRIVILEGED_USER)`` (static token, no RBAC grant),
``kube_api.service_account_token(namespace, name)`` + ``write_kubeconfig`` (a real service
account, as the daemons run in a cluster), or tokens given to ``KubeAPIServer(tokens=...)``.

The fixture fails (never skips) when the binaries are missing, unless
``JOBTUNNEL_ALLOW_SKIP_KUBE=1``: CI must not pass by silently running nothing.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

KUBE_VERSION = "1.20.2"
#: Where scripts/setup-kube puts the binaries (same JOBTUNNEL_KUBE_CACHE override as the script).
KUBE_BIN_DIR = (
    Path(os.environ.get("JOBTUNNEL_KUBE_CACHE", Path.home() / ".cache" / "jobtunnel"))
    / f"kube-{KUBE_VERSION}"
    / "bin"
)
ADMIN_USER = "admin"
#: A user with no RBAC grant at all, registered by the ``kube_api`` fixture, for 403 tests.
UNPRIVILEGED_USER = "jobtunnel-test-nobody"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
#: Controllers of kube-controller-manager, ``*`` being its defaults. No kubelet runs here, so:
#: nodelifecycle would mark every pod NotReady ~40 s after its (fake) node stopped "reporting",
#: and podgc would delete pods bound to a node that has no Node object. The endpoint and
#: EndpointSlice controllers run (1.20 writes discovery.k8s.io/v1beta1): the reconciler's own
#: slice must live beside theirs, untouched by them.
CONTROLLERS = ("*", "-nodelifecycle", "-podgc")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
APISERVER_GRACE = 2.0


class KubeStartError(RuntimeError):
    """A control-plane process exited or did not become ready; the message has its log tail."""


@dataclass(frozen=True)
class Token:
    """A static bearer token the API server authenticates as ``user`` in ``groups``."""

    user: str
    token: str
    groups: tuple[str, ...] = ()


def free_port() -> int:
    """A loopback port free right now (bound then released; the race is harmless for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_etcd() -> Path | None:
    """Debian installs etcd in /usr/bin; PATH is honoured first so a developer can override."""
    found = shutil.which("etcd")
    return Path(found) if found else None


def missing_binaries(bin_dir: Path = KUBE_BIN_DIR) -> list[str]:
    """Names of the control-plane binaries that are not installed (empty when all are)."""
    missing = [
        name
        for name in ("kube-apiserver", "kube-controller-manager")
        if not os.access(bin_dir / name, os.X_OK)
    ]
    if find_etcd() is None:
        missing.append("etcd")
    return missing


def _die_with_parent() -> None:
    """Run in the child before exec: SIGKILL it if the test process dies (even by SIGKILL).

    Without this a crashed or killed pytest would leave etcd and the API server running.
    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so children are forked by
    ``_SPAWNER``, whose one thread lives as long as the interpreter; a restart from a short-lived
    worker thread (``anyio.to_thread``) would otherwise kill the new API server moments later.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# Resolved in the parent: the child between fork and exec should do as little as possible.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kube-spawn")


def _write_pem(path: Path, data: bytes, *, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def _private_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a serving certificate for 127.0.0.1/localhost signed by it.

    A separate CA (rather than one self-signed leaf) keeps strict TLS verifiers happy: OpenSSL 3
    and Python's ``VERIFY_X509_STRICT`` want a proper CA with key usage as trust anchor.
    Returns (ca.crt, server.crt, server.key).
    """
    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_to = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jobtunnel-test-ca")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (
        _write_pem(directory / "ca.crt", ca_cert.public_bytes(pem)),
        _write_pem(directory / "server.crt", cert.public_bytes(pem)),
        _write_pem(directory / "server.key", _private_pem(key), private=True),
    )


def _make_service_account_keys(directory: Path) -> tuple[Path, Path]:
    """The key pair that signs service-account tokens (TokenRequest and the tokens controller)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return (
        _write_pem(directory / "sa.key", _private_pem(key), private=True),
        _write_pem(directory / "sa.pub", public),
    )


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class _Process:
    """One control-plane process and the log file it writes to."""

    name: str
    argv: list[str]
    log_path: Path
    #: Seconds between SIGTERM and SIGKILL.
    grace: float = STOP_TIMEOUT
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self._log.write(f"\n=== {' '.join(self.argv)}\n".encode())
        self._log.flush()
        log = self._log
        self.popen = _SPAWNER.submit(
            lambda: subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the terminal reaches pytest, which then stops us
                # cleanly, instead of killing etcd under a still-running API server.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        ).result()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise KubeStartError(
                f"{self.name} exited with {self.popen.returncode}; "
                f"end of {self.log_path.name}:\n{_log_tail(self.log_path)}"
            )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``self.grace`` seconds."""
        popen, self.popen = self.popen, None
        if popen is not None and popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(self.grace)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _poll(
    what: str,
    check: Callable[[], bool],
    deadline: float,
    processes: Sequence[_Process],
    log_path: Path,
) -> float:
    """Poll ``check`` until true; fail fast if a process died, else at the monotonic deadline.

    Returns the time it took. The poll interval grows from 20 ms so a fast start is seen fast.
    """
    started = time.monotonic()
    interval = 0.02
    while True:
        for proc in processes:
            proc.check_alive()
        if check():
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            raise KubeStartError(
                f"{what} not ready after {time.monotonic() - started:.1f}s; "
                f"end of {log_path.name}:\n{_log_tail(log_path)}"
            )
        time.sleep(interval)  # polling a subprocess's readiness: nothing to await on
        interval = min(interval * 1.5, 0.25)


class KubeAPIServer:
    """etcd + kube-apiserver + kube-controller-manager on loopback ports, in a temp dir.

    Authentication is by static tokens (an ``admin`` in ``system:masters`` plus any given
    before :meth:`start`) and service-account tokens; authorization is RBAC only, so tests see
    the same 403s a real cluster gives. The controller-manager runs the garbage collector and the
    endpoints controller, among others (see ``CONTROLLERS`` for what is off, and why).
    """

    def __init__(
        self,
        *,
        tokens: Mapping[str, tuple[str, Sequence[str]]] | None = None,
        bin_dir: Path = KUBE_BIN_DIR,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.bin_dir = bin_dir
        self.start_timeout = start_timeout
        self._tokens: dict[str, Token] = {
            ADMIN_USER: Token(ADMIN_USER, secrets.token_urlsafe(24), ("system:masters",))
        }
        self._dir: Path | None = None
        for user, (token, groups) in (tokens or {}).items():
            self.add_token(user, token, groups)
        self._etcd: _Process | None = None
        self._apiserver: _Process | None = None
        self._controller_manager: _Process | None = None
        self.etcd_port = 0
        self.port = 0
        self.controller_manager_port = 0
        #: Seconds the last (re)start of the API server took to become ready.
        self.apiserver_ready_seconds = 0.0

    # -- configuration -------------------------------------------------------------------------

    def add_token(self, user: str, token: str | None = None, groups: Sequence[str] = ()) -> str:
        """Register a static token for ``user`` (before :meth:`start`); returns the token.

        The 1.20 API server reads its token file once, so tokens cannot be added while running.
        For identities created mid-test use :meth:`service_account_token` instead.
        """
        if self._dir is not None:
            raise RuntimeError("add_token() must be called before start()")
        if "," in user or any("," in g or '"' in g for g in groups):
            raise ValueError("user and group names may not contain ',' or '\"'")
        token = token or secrets.token_urlsafe(24)
        self._tokens[user] = Token(user, token, tuple(groups))
        return token

    def token(self, user: str) -> str:
        """The static token registered for ``user``."""
        return self._tokens[user].token

    @property
    def admin_token(self) -> str:
        return self.token(ADMIN_USER)

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise RuntimeError("not started")
        return self._dir

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (``system:masters``: RBAC lets it do anything)."""
        return self.directory / "admin.kubeconfig"

    def write_kubeconfig(
        self, path: Path, token: str, *, user: str = "user", namespace: str | None = None
    ) -> Path:
        """Write a kubeconfig that authenticates with ``token``; returns ``path``.

        JSON is valid YAML, so every kubeconfig loader (kubectl, kubernetes_asyncio) reads it.
        """
        context: dict[str, str] = {"cluster": "jobtunnel-test", "user": user}
        if namespace is not None:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "jobtunnel-test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "jobtunnel-test", "context": context}],
            "current-context": "jobtunnel-test",
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def kubeconfig_for(self, user: str, *, namespace: str | None = None) -> Path:
        """A kubeconfig (in the temp dir) for a user registered with a static token."""
        return self.write_kubeconfig(
            self.directory / f"{user}.kubeconfig", self.token(user), user=user, namespace=namespace
        )

    # -- synchronous API access, for setup outside the event loop ----------------------------

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        """One API call with the admin token (or ``token``): (HTTP status, decoded JSON body).

        For fixtures that must prepare objects without an event loop; tests use a real client.
        """
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(  # noqa: S310  (https URL we built ourselves)
            self.url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {token or self.admin_token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as resp:  # noqa: S310
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def service_account_token(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600
    ) -> str:
        """A TokenRequest token for ``system:serviceaccount:<namespace>:<name>``.

        Creates the namespace and service account if needed. This is the identity the
        daemons have in a real cluster, so RBAC rules can be tested against it.
        """
        for path, obj in (
            ("/api/v1/namespaces", {"metadata": {"name": namespace}}),
            (f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": name}}),
        ):
            status, body = self.request("POST", path, obj)
            if status not in (201, 409):
                raise RuntimeError(f"POST {path}: {status} {body}")
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
        status, body = self.request(
            "POST",
            path,
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            },
        )
        if status != 201:
            raise RuntimeError(f"POST {path}: {status} {body}")
        return str(body["status"]["token"])

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start etcd, the API server and the controller-manager; return once all are ready.

        On any failure everything already started is stopped and the temp dir removed, and
        :class:`KubeStartError` carries the tail of the failing process's log.
        """
        if self._dir is not None:
            raise RuntimeError("already started")
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise FileNotFoundError(
                f"missing {', '.join(missing)} (looked in {self.bin_dir} and PATH): "
                "run scripts/setup-kube"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="jobtunnel-kube-"))
        try:
            self._prepare_files()
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
        except BaseException:
            self.stop()
            raise

    def _prepare_files(self) -> None:
        d = self.directory
        _make_tls(d)
        _make_service_account_keys(d)
        # Static token file format: token,user,uid,"group1,group2"
        lines = [
            f'{t.token},{t.user},{t.user},"{",".join(t.groups)}"' for t in self._tokens.values()
        ]
        _write_pem(d / "tokens.csv", ("\n".join(lines) + "\n").encode(), private=True)
        self.etcd_port = free_port()
        self.port = free_port()
        self.controller_manager_port = free_port()
        self.write_kubeconfig(self.kubeconfig, self.admin_token, user=ADMIN_USER)

    def _start_etcd(self) -> None:
        etcd = find_etcd()
        assert etcd is not None
        peer_port = free_port()
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self._etcd = _Process(
            "etcd",
            [
                str(etcd),
                "--name=test",
                f"--data-dir={self.directory / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
                "--unsafe-no-fsync",  # tests throw the data away; fsync only costs time
                "--logger=zap",
                "--log-level=warn",
            ],
            self.directory / "etcd.log",
        )
        self._etcd.start()

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as resp:  # noqa: S310
                    return bool(json.load(resp).get("health") == "true")
            except (OSError, ValueError):
                return False

        _poll(
            "etcd",
            healthy,
            time.monotonic() + self.start_timeout,
            [self._etcd],
            self._etcd.log_path,
        )

    def _apiserver_argv(self) -> list[str]:
        d = self.directory
        return [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.port}",
            "--insecure-port=0",  # 1.20 still opens an unauthenticated :8080 by default
            "--advertise-address=127.0.0.1",
            # The `kubernetes` Service's endpoints would be 127.0.0.1, which Endpoints
            # validation rejects; nothing here needs that Service.
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={d / 'server.crt'}",
            f"--tls-private-key-file={d / 'server.key'}",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            # With it, a pod created right after its namespace is refused until the
            # controller-manager has made the `default` account; pods never run here anyway.
            "--disable-admission-plugins=ServiceAccount",
            f"--cert-dir={d / 'apiserver-certs'}",
            "--profiling=false",
            "--v=1",
        ]

    def _start_apiserver(self) -> None:
        assert self._etcd is not None
        self._apiserver = _Process(
            "kube-apiserver",
            self._apiserver_argv(),
            self.directory / "kube-apiserver.log",
            # On SIGTERM it stops listening at once, then waits (up to 60 s, not configurable in
            # 1.20) for connections carrying watches, e.g. the controller-manager's, to close.
            # Everything is already in etcd, so cutting that wait short loses nothing.
            grace=APISERVER_GRACE,
        )
        self._apiserver.start()
        context = self.ssl_context()
        headers = {"Authorization": f"Bearer {self.admin_token}"}

        def ready() -> bool:
            req = urllib.request.Request(f"{self.url}/readyz", headers=headers)  # noqa: S310
            try:
                with urllib.request.urlopen(req, timeout=2, context=context) as resp:  # noqa: S310
                    return bool(resp.status == 200)
            except (OSError, ValueError):
                return False

        self.apiserver_ready_seconds = _poll(
            "kube-apiserver",
            ready,
            time.monotonic() + self.start_timeout,
            [self._etcd, self._apiserver],
            self._apiserver.log_path,
        )

    def _start_controller_manager(self) -> None:
        assert self._etcd is not None
        assert self._apiserver is not None
        d = self.directory
        kubeconfig = str(self.kubeconfig)
        self._controller_manager = _Process(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.controller_manager_port}",
                "--port=0",  # no insecure :10252, which would collide between test runs
                f"--cert-dir={d / 'controller-manager-certs'}",
                "--leader-elect=false",  # alone: skip the lease dance, start at once
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={d / 'sa.key'}",
                f"--root-ca-file={d / 'ca.crt'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                f"--controllers={','.join(CONTROLLERS)}",
                "--profiling=false",
                "--v=1",
            ],
            d / "kube-controller-manager.log",
        )
        self._controller_manager.start()

        def healthy() -> bool:
            # Its own self-signed serving cert: readiness only, so no verification needed.
            context = ssl._create_unverified_context()  # noqa: S323
            url = f"https://127.0.0.1:{self.controller_manager_port}/healthz"
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                    return bool(resp.status == 200)
            except (OSError, ValueError):
                return False

        _poll(
            "kube-controller-manager",
            healthy,
            time.monotonic() + self.start_timeout,
            [self._etcd, self._apiserver, self._controller_manager],
            self._controller_manager.log_path,
        )

    def restart_apiserver(self) -> None:
        """Stop the API server and start it again on the same port; return once ready.

        etcd and the controller-manager keep running (the latter reconnects by itself), the
        way an API server rollout looks to clients: watches break, state survives.
        """
        if self._apiserver is None:
            raise RuntimeError("not started")
        self._apiserver.stop()
        self._start_apiserver()

    def stop(self) -> None:
        """Stop all processes (SIGTERM, SIGKILL after a deadline) and remove the temp dir."""
        for attr in ("_controller_manager", "_apiserver", "_etcd"):
            proc: _Process | None = getattr(self, attr)
            if proc is not None:
                proc.stop()
                setattr(self, attr, None)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def kube_api() -> Iterator[KubeAPIServer]:
    """A control plane shared by the whole session (starting one takes seconds).

    Tests isolate themselves by namespace. ``UNPRIVILEGED_USER`` has a static token and no
    RBAC grant. Missing binaries fail the test unless ``JOBTUNNEL_ALLOW_SKIP_KUBE=1``.
    """
    missing = missing_binaries()
    if missing:
        message = f"{', '.join(missing)} not installed (in {KUBE_BIN_DIR}): run scripts/setup-kube"
        if os.environ.get("JOBTUNNEL_ALLOW_SKIP_KUBE") == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    server = KubeAPIServer(tokens={UNPRIVILEGED_USER: (secrets.token_urlsafe(24), [])})
    with server:
        yield server
