"""A real JupyterHub, started by the test suite.

The hub runs with the ``null`` authenticator (users exist only through the REST API) and a
do-nothing proxy: JupyterHub asks its proxy for routes before it opens its own port, so without
one it never becomes ready. With the no-op proxy the REST API is served directly by the hub at
``http://127.0.0.1:<hub_port>/hub/api``.

A service with an API token and a role holding ``admin:users`` and ``tokens`` (and ``"admin":
True``, so that it may create admin users) is used to create users and tokens.

Usage::

    with JupyterHub() as hub:
        hub.create_user("alice")
        token, token_id = hub.create_token("alice")
        ...

or the session-scoped pytest fixture ``jupyterhub`` (import it explicitly in a test module:
``from tests.jupyterhub import jupyterhub  # noqa: F401``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

SERVICE_NAME = "jobtunnel-test"
#: The hub configuration sites load (the custom scope and its roles).
SITE_CONFIG = (
    Path(__file__).resolve().parent.parent / "configs" / "jupyterhub" / "jupyterhub_config.py"
)
#: What jobtunnel.dask mints for a job, and the forwarder requires by default.
TUNNEL_SCOPES = ("custom:jobtunnel:connect!user",)

_PROXY_MODULE = '''\
"""A proxy that does nothing: the hub's API is reached directly on the hub port."""

from jupyterhub.proxy import Proxy


class NoopProxy(Proxy):
    should_start = False

    async def add_route(self, routespec, target, data):
        return None

    async def delete_route(self, routespec):
        return None

    async def get_all_routes(self):
        return {}
'''

_CONFIG = """\
c = get_config()  # noqa: F821
c.JupyterHub.authenticator_class = "null"
c.JupyterHub.proxy_class = "jobtunnel_noop_proxy.NoopProxy"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {public_port}
c.JupyterHub.db_url = {db_url!r}
c.JupyterHub.cookie_secret_file = {cookie_secret_file!r}
c.JupyterHub.pid_file = {pid_file!r}
c.JupyterHub.cleanup_servers = False
c.JupyterHub.services = [
    {{"name": {service!r}, "api_token": {service_token!r}, "admin": True}},
]
c.JupyterHub.load_roles = [
    {{"name": "jobtunnel-test-admin", "scopes": ["admin:users", "tokens"],
      "services": [{service!r}]}},
]
# What sites load: the tunnel-only scope and the roles that mint it.
load_subconfig({site_config!r})  # noqa: F821
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class HubError(RuntimeError):
    """The hub failed to start or answered a management request unexpectedly."""


class JupyterHub:
    """A JupyterHub subprocess in a private temporary directory (context manager)."""

    def __init__(self, *, start_timeout: float = 120.0) -> None:
        self.start_timeout = start_timeout
        self.service_name = SERVICE_NAME
        self.service_token = secrets.token_hex(32)
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._paused = False
        self.hub_port = 0
        self.start_seconds = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}"

    @property
    def api_url(self) -> str:
        """The REST API root, e.g. ``http://127.0.0.1:PORT/hub/api`` (no trailing slash)."""
        return f"{self.base_url}/hub/api"

    @property
    def log_path(self) -> Path:
        assert self._dir is not None
        return self._dir / "jupyterhub.log"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> JupyterHub:
        """Start the hub and wait until its API answers; retries once on a port clash."""
        self._dir = Path(tempfile.mkdtemp(prefix="jobtunnel-hub-"))
        try:
            attempts = 3
            for attempt in range(attempts):
                try:
                    self._start_once()
                    return self
                except HubError:
                    self._kill()
                    tail = self.log_tail()
                    if attempt + 1 < attempts and "Address already in use" in tail:
                        continue
                    raise
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_once(self) -> None:
        assert self._dir is not None
        d = self._dir
        (d / "jobtunnel_noop_proxy.py").write_text(_PROXY_MODULE)
        self.hub_port = _free_port()
        config = _CONFIG.format(
            hub_port=self.hub_port,
            public_port=_free_port(),
            db_url=f"sqlite:///{d / 'jupyterhub.sqlite'}",
            cookie_secret_file=str(d / "jupyterhub_cookie_secret"),
            pid_file=str(d / "jupyterhub.pid"),
            service=self.service_name,
            service_token=self.service_token,
            site_config=str(SITE_CONFIG),
        )
        config_file = d / "jupyterhub_config.py"
        config_file.write_text(config)
        for stale in ("jupyterhub.sqlite", "jupyterhub_cookie_secret"):
            (d / stale).unlink(missing_ok=True)

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(d), *filter(None, [env.get("PYTHONPATH")])])
        # Never let a developer's environment leak configuration into the test hub.
        for var in ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_CRYPT_KEY", "CONFIGPROXY_AUTH_TOKEN"):
            env.pop(var, None)

        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config_file)],
            cwd=d,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = started + self.start_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise HubError(
                    f"jupyterhub exited with status {code} during start; log tail:\n"
                    + self.log_tail()
                )
            if self._api_answers():
                break
            if time.monotonic() > deadline:
                raise HubError(
                    f"jupyterhub did not answer within {self.start_timeout:.0f}s; log tail:\n"
                    + self.log_tail()
                )
            time.sleep(0.05)  # polling interval, not synchronisation
        self.start_seconds = time.monotonic() - started

    def _api_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/", timeout=2) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _kill(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
                if self._paused:
                    proc.send_signal(signal.SIGCONT)
            self._paused = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=timeout)
        self._proc = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a deadline; always removes the temporary directory."""
        try:
            self._kill()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def pause(self) -> None:
        """Freeze the hub (SIGSTOP): connections are accepted by the kernel but never answered."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def __enter__(self) -> JupyterHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- management API (as the admin service) ----------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> Any:
        """Call the hub API as the test service (or with ``token``); returns the decoded JSON."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 - our own http://127.0.0.1 URL
            f"{self.api_url}{path}", data=data, method=method
        )
        req.add_header("Authorization", f"token {token or self.service_token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, payload = err.code, err.read()
        if status not in expect:
            raise HubError(
                f"{method} {path}: hub answered {status}, expected {expect}: "
                + payload.decode(errors="replace")[:500]
            )
        return json.loads(payload) if payload else None

    def create_user(self, name: str, admin: bool = False) -> dict[str, Any]:
        body = {"admin": True} if admin else None
        model: dict[str, Any] = self.request("POST", f"/users/{name}", body, expect=(201,))
        return model

    def create_token(
        self,
        user: str,
        note: str = "jobtunnel test",
        expires_in: int | None = None,
        scopes: list[str] | None = None,
    ) -> tuple[str, str]:
        """Create an API token for ``user``; returns (token, token id)."""
        body: dict[str, Any] = {"note": note}
        if expires_in is not None:
            body["expires_in"] = expires_in
        if scopes is not None:
            body["scopes"] = scopes
        model = self.request("POST", f"/users/{user}/tokens", body, expect=(201,))
        return str(model["token"]), str(model["id"])

    def create_tunnel_token(self, user: str, **kwargs: Any) -> tuple[str, str]:
        """A token as a job carries it: the tunnel-only scope and nothing more."""
        return self.create_token(user, scopes=list(TUNNEL_SCOPES), **kwargs)

    def revoke_token(self, user: str, token_id: str) -> None:
        self.request("DELETE", f"/users/{user}/tokens/{token_id}", expect=(204,))


@pytest.fixture(scope="session")
def jupyterhub() -> Iterator[JupyterHub]:
    """A started JupyterHub shared by the whole test session."""
    hub = JupyterHub()
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
