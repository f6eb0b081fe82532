"""Token verification: token file, a real JupyterHub, failure limiting, the front door."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from shared.auth import (
    REASON_CODES,
    AuthDecision,
    Authenticator,
    FailureLimiter,
    HubVerifier,
    Outcome,
    TokenFileVerifier,
    TokenVerifier,
    broader_scopes,
    scope_satisfied,
    token_fingerprint,
)
from tests.jupyterhub import (
    TUNNEL_SCOPES,
    JupyterHub,
    _free_port,
    jupyterhub,  # noqa: F401
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def is_available(verifier: TokenVerifier) -> bool:
    """(a call, so that mypy does not keep an earlier ``assert not v.available`` narrowing)"""
    return verifier.available


def label_values(registry: CollectorRegistry, metric: str, label: str) -> set[str]:
    values = set()
    for family in registry.collect():
        for s in family.samples:
            if s.name == metric and label in s.labels:
                values.add(s.labels[label])
    return values


# --------------------------------------------------------------------------------------------
# The real hub


@dataclass
class HubUsers:
    hub: JupyterHub
    alice: str
    bob: str
    root: str
    alice_token: str  # tunnel-only tokens, as jobs carry them
    bob_token: str
    root_token: str
    alice_full_token: str  # what the hub gives by default: everything alice may do

    def new_token(
        self, user: str, scopes: Sequence[str] | None = TUNNEL_SCOPES, **kwargs: Any
    ) -> tuple[str, str]:
        """A token; tunnel-only unless ``scopes`` says otherwise (None: the hub's full default)."""
        return self.hub.create_token(
            user, scopes=None if scopes is None else list(scopes), **kwargs
        )


@pytest.fixture(scope="module")
def users(jupyterhub: JupyterHub) -> HubUsers:  # noqa: F811
    suffix = uuid.uuid4().hex[:8]
    alice, bob, root = f"alice-{suffix}", f"bob-{suffix}", f"root-{suffix}"
    jupyterhub.create_user(alice)
    jupyterhub.create_user(bob)
    jupyterhub.create_user(root, admin=True)
    return HubUsers(
        hub=jupyterhub,
        alice=alice,
        bob=bob,
        root=root,
        alice_token=jupyterhub.create_tunnel_token(alice)[0],
        bob_token=jupyterhub.create_tunnel_token(bob)[0],
        root_token=jupyterhub.create_tunnel_token(root)[0],
        alice_full_token=jupyterhub.create_token(alice)[0],
    )


@asynccontextmanager
async def hub_verifier(api_url: str, **kwargs: Any) -> AsyncIterator[HubVerifier]:
    verifier = HubVerifier(api_url, **kwargs)
    try:
        yield verifier
    finally:
        await verifier.aclose()


pytestmark = pytest.mark.anyio


@pytest.mark.slow
async def test_hub_accepts_own_token_with_scopes(users: HubUsers) -> None:
    async with hub_verifier(users.hub.api_url) as v:
        assert isinstance(v, TokenVerifier)
        d = await v.verify(users.alice, users.alice_token)
        assert d.outcome is Outcome.ACCEPT
        assert d.ok
        assert (d.user, d.reason, d.code) == (users.alice, "ok", "ok")
        assert d.scopes == {
            f"custom:jobtunnel:connect!user={users.alice}",
            f"read:users:name!user={users.alice}",
            f"read:users:groups!user={users.alice}",
        }
        assert v.available
        assert users.alice_token not in repr(d)


@pytest.mark.slow
async def test_hub_rejects_token_of_another_user(users: HubUsers) -> None:
    async with hub_verifier(users.hub.api_url) as v:
        d = await v.verify(users.bob, users.alice_token)
        assert d.outcome is Outcome.REJECT
        assert not d.ok
        assert d.code == "user_mismatch"
        assert d.reason == f"token belongs to {users.alice!r}"
        assert d.scopes == frozenset()


@pytest.mark.slow
async def test_hub_rejects_admin_token_for_another_user(users: HubUsers) -> None:
    async with hub_verifier(users.hub.api_url) as v:
        d = await v.verify(users.alice, users.root_token)
        assert d.outcome is Outcome.REJECT
        assert d.code == "user_mismatch"
        assert users.root in d.reason
        # ... while the admin may log in as themselves
        assert (await v.verify(users.root, users.root_token)).ok


@pytest.mark.slow
async def test_hub_rejects_garbage_and_malformed_tokens(users: HubUsers) -> None:
    async with hub_verifier(users.hub.api_url) as v:
        d = await v.verify(users.alice, "0" * 32)
        assert d.outcome is Outcome.REJECT
        assert (d.code, d.reason) == ("bad_token", "unknown, revoked or expired token")
        assert v.hub_requests == 1
        # malformed input never reaches the hub
        for token in ("", "has space", "new\nline", "x" * 5000, "ünïcode"):
            d = await v.verify(users.alice, token)
            assert (d.outcome, d.code) == (Outcome.REJECT, "bad_request")
        assert (await v.verify("", users.alice_token)).code == "bad_request"
        assert v.hub_requests == 1


@pytest.mark.slow
async def test_hub_rejects_service_token(users: HubUsers) -> None:
    hub = users.hub
    async with hub_verifier(hub.api_url) as v:
        d = await v.verify(hub.service_name, hub.service_token)
        assert d.outcome is Outcome.REJECT
        assert d.code == "service_token"
        assert "service" in d.reason


@pytest.mark.slow
async def test_revalidate_sees_revocation_despite_positive_cache(users: HubUsers) -> None:
    token, token_id = users.new_token(users.alice, note="revocation test")
    async with hub_verifier(users.hub.api_url, cache_ttl=3600) as v:
        assert (await v.verify(users.alice, token)).ok
        assert (await v.revalidate(users.alice, token)).ok
        assert v.hub_requests == 2  # revalidate asked the hub, did not use the cache

        users.hub.revoke_token(users.alice, token_id)
        # verify() may still answer from its positive cache (documented) ...
        assert (await v.verify(users.alice, token)).ok
        assert sample(v.registry, "jobtunnel_auth_cache_hits_total", result="positive") == 1
        # ... but revalidate() asks the hub
        d = await v.revalidate(users.alice, token)
        assert d.outcome is Outcome.REJECT
        assert d.code == "bad_token"
        # and its answer evicted the stale positive entry: new logins fail at once
        requests = v.hub_requests
        assert (await v.verify(users.alice, token)).outcome is Outcome.REJECT
        assert v.hub_requests == requests  # answered from the negative cache
        assert sample(v.registry, "jobtunnel_auth_cache_hits_total", result="negative") == 1


@pytest.mark.slow
async def test_required_scopes(users: HubUsers) -> None:
    hub, full = users.hub, users.alice_full_token
    narrow, _ = users.new_token(users.alice, scopes=[f"read:users:name!user={users.alice}"])
    d = await _verify_once(hub.api_url, users.alice, narrow)  # the default: the tunnel scope
    assert (d.outcome, d.code) == (Outcome.REJECT, "missing_scope")
    assert f"custom:jobtunnel:connect!user={users.alice}" in d.reason
    assert "ensure_token_secret" in d.reason
    assert d.for_the_client
    broad_ok = {"allow_broad_tokens": True}
    async with hub_verifier(hub.api_url, required_scopes=["access:servers"], **broad_ok) as v:
        # the hub answers "access:servers!user=alice": a filtered form satisfies the requirement
        assert (await v.verify(users.alice, full)).ok
        d = await v.verify(users.alice, narrow)
        assert d.outcome is Outcome.REJECT
        assert d.code == "missing_scope"
        assert d.reason.startswith("missing scope 'access:servers'")
    async with hub_verifier(
        hub.api_url, required_scopes=["access:servers!user={user}"], **broad_ok
    ) as v:
        assert (await v.verify(users.alice, full)).ok
    async with hub_verifier(hub.api_url, required_scopes=["admin:users"], **broad_ok) as v:
        assert (await v.verify(users.alice, full)).code == "missing_scope"
        root_full, _ = users.new_token(users.root, scopes=None)
        assert (await v.verify(users.root, root_full)).ok


async def _verify_once(api_url: str, user: str, token: str, **kwargs: Any) -> AuthDecision:
    async with hub_verifier(api_url, **kwargs) as v:
        return await v.verify(user, token)


@pytest.mark.slow
@pytest.mark.parametrize(
    "scopes",
    [
        None,  # the hub's default: inherit, everything alice may do
        ["inherit"],
        ["access:servers!user"],
        ["tokens!user", "custom:jobtunnel:connect!user"],
        ["custom:jobtunnel:connect!user", "read:users!user"],
    ],
)
async def test_tokens_that_can_do_more_are_refused_by_default(
    users: HubUsers, scopes: list[str] | None
) -> None:
    token, _ = users.new_token(users.alice, scopes=scopes)
    d = await _verify_once(users.hub.api_url, users.alice, token)
    assert (d.outcome, d.code) == (Outcome.REJECT, "broad_token"), d
    assert d.reason.startswith("token can do more than open tunnels ("), d.reason
    # It says how to get the right one, and never shows the token.
    assert f"only custom:jobtunnel:connect!user={users.alice}" in d.reason
    assert "ensure_token_secret" in d.reason
    assert token not in d.reason
    assert d.for_the_client
    # The simple-site opt-out: accepted when it holds the required scope.
    if scopes is None or "custom:jobtunnel:connect!user" in scopes or scopes == ["inherit"]:
        loose = await _verify_once(users.hub.api_url, users.alice, token, allow_broad_tokens=True)
        assert loose.ok, loose


@pytest.mark.slow
async def test_an_admins_full_token_is_refused_and_names_what_it_can_do(users: HubUsers) -> None:
    token, _ = users.new_token(users.root, scopes=None)
    d = await _verify_once(users.hub.api_url, users.root, token)
    assert d.code == "broad_token"
    assert "admin:" in d.reason or "access:servers" in d.reason, d.reason


def test_scope_rule() -> None:
    granted = {"access:servers!user=alice", "read:users:name!user=alice", "tokens"}
    assert scope_satisfied("access:servers", granted)
    assert scope_satisfied("access:servers!user=alice", granted)
    assert scope_satisfied("access:servers!user={user}", granted, "alice")
    assert not scope_satisfied("access:servers!user={user}", granted, "bob")
    assert not scope_satisfied("access:servers!user=bob", granted)
    assert not scope_satisfied("access:server", granted)  # no prefix matching
    assert not scope_satisfied("read:users", granted)
    assert scope_satisfied("tokens!user=bob", granted)  # unfiltered covers every filter
    assert not scope_satisfied("admin:users", granted)


@pytest.mark.slow
async def test_paused_hub_is_unavailable_then_recovers(users: HubUsers) -> None:
    hub = users.hub
    timeout = 1.0
    async with hub_verifier(hub.api_url, timeout=timeout) as v:
        with hub.paused():
            started = time.monotonic()
            d = await v.verify(users.alice, users.alice_token)
            elapsed = time.monotonic() - started
            assert d.outcome is Outcome.UNAVAILABLE
            assert (d.code, d.reason) == ("hub_unavailable", "hub unavailable: timeout")
            assert timeout * 0.9 <= elapsed < timeout + 4.0
            assert not v.available
            assert sample(v.registry, "jobtunnel_auth_hub_up") == 0
            # a live session's revalidation says "don't know"
            assert (await v.revalidate(users.alice, users.alice_token)).outcome is (
                Outcome.UNAVAILABLE
            )
        # UNAVAILABLE was not cached: the next call asks the (resumed) hub. Right after
        # SIGCONT a loaded machine may need a moment: poll with a deadline.
        deadline = time.monotonic() + 30
        while True:
            d = await v.verify(users.alice, users.alice_token)
            if d.outcome is not Outcome.UNAVAILABLE or time.monotonic() > deadline:
                break
        assert d.ok
        assert is_available(v)
        assert sample(v.registry, "jobtunnel_auth_hub_up") == 1


@pytest.mark.slow
async def test_aclose_ends_inflight_checks(users: HubUsers) -> None:
    hub = users.hub
    v = HubVerifier(hub.api_url, timeout=30)
    with hub.paused():
        pending = asyncio.ensure_future(v.verify(users.alice, users.alice_token))
        for _ in range(100):  # yield to the loop until the request has been started
            if v.hub_requests:
                break
            await asyncio.sleep(0)
        assert v.hub_requests == 1
        started = time.monotonic()
        await v.aclose()
        d = await pending
        assert d.outcome is Outcome.UNAVAILABLE
        assert time.monotonic() - started < 10


async def test_unreachable_hub_is_unavailable() -> None:
    async with hub_verifier(f"http://127.0.0.1:{_free_port()}/hub/api", timeout=5) as v:
        d = await v.verify("alice", "a" * 32)
        assert d.outcome is Outcome.UNAVAILABLE
        assert d.reason == "hub unavailable: cannot connect"
        assert not v.available
        # never cached
        await v.verify("alice", "a" * 32)
        assert v.hub_requests == 2


@pytest.mark.slow
async def test_wrong_api_url_is_unavailable_not_bad_token(users: HubUsers) -> None:
    hub = users.hub
    for url in (f"{hub.base_url}/hub", hub.base_url):  # a 404 page, a redirect
        async with hub_verifier(url) as v:
            d = await v.verify(users.alice, users.alice_token)
            assert d.outcome is Outcome.UNAVAILABLE, d
            assert "check the hub API URL" in d.reason


@pytest.mark.slow
async def test_single_flight(users: HubUsers) -> None:
    token, _ = users.new_token(users.alice, note="single flight")
    async with hub_verifier(users.hub.api_url) as v:
        results = await asyncio.gather(*(v.verify(users.alice, token) for _ in range(50)))
        assert all(d.ok for d in results)
        assert v.hub_requests == 1
        assert sample(v.registry, "jobtunnel_auth_hub_request_seconds_count") == 1
        assert sample(v.registry, "jobtunnel_auth_coalesced_total") == 49
        # later calls are cache hits
        assert (await v.verify(users.alice, token)).ok
        assert sample(v.registry, "jobtunnel_auth_cache_hits_total", result="positive") == 1
        assert v.hub_requests == 1


@pytest.mark.slow
async def test_single_flight_survives_cancelled_caller(users: HubUsers) -> None:
    token, _ = users.new_token(users.alice, note="cancel")
    async with hub_verifier(users.hub.api_url) as v:
        first = asyncio.ensure_future(v.verify(users.alice, token))
        await asyncio.sleep(0)  # let it start the shared request
        second = asyncio.ensure_future(v.verify(users.alice, token))
        first.cancel()
        assert (await second).ok
        assert v.hub_requests == 1


@pytest.mark.slow
async def test_cache_ttls_with_fake_clock(users: HubUsers) -> None:
    clock = FakeClock()
    async with hub_verifier(
        users.hub.api_url, cache_ttl=60, negative_cache_ttl=10, clock=clock
    ) as v:
        assert (await v.verify(users.alice, users.alice_token)).ok
        assert (await v.verify(users.alice, "f" * 32)).outcome is Outcome.REJECT
        assert v.hub_requests == 2
        clock.advance(9)
        assert (await v.verify(users.alice, users.alice_token)).ok
        assert (await v.verify(users.alice, "f" * 32)).outcome is Outcome.REJECT
        assert v.hub_requests == 2
        assert sample(v.registry, "jobtunnel_auth_cache_hits_total", result="negative") == 1
        clock.advance(2)  # negative entry expired, positive not
        assert (await v.verify(users.alice, "f" * 32)).outcome is Outcome.REJECT
        assert (await v.verify(users.alice, users.alice_token)).ok
        assert v.hub_requests == 3
        clock.advance(60)  # positive entry expired
        assert (await v.verify(users.alice, users.alice_token)).ok
        assert v.hub_requests == 4
        # the cache key is per (user, token): the same token under another name is asked anew
        assert (await v.verify(users.bob, users.alice_token)).code == "user_mismatch"
        assert v.hub_requests == 5


@pytest.mark.slow
async def test_revalidate_max_age(users: HubUsers) -> None:
    clock = FakeClock()
    async with hub_verifier(users.hub.api_url, revalidate_max_age=5, clock=clock) as v:
        assert (await v.verify(users.alice, users.alice_token)).ok
        assert (await v.revalidate(users.alice, users.alice_token)).ok
        assert v.hub_requests == 1
        clock.advance(6)
        assert (await v.revalidate(users.alice, users.alice_token)).ok
        assert v.hub_requests == 2


def test_token_fingerprint_hides_token() -> None:
    fp = token_fingerprint("alice", "secret-token")
    assert fp == hashlib.sha256(b"alice\0secret-token").hexdigest()
    assert "secret" not in fp


# --------------------------------------------------------------------------------------------
# Token file


def write(path: Path, text: str) -> None:
    path.write_text(text)
    # make the change visible even on a filesystem with coarse timestamps
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


async def test_token_file_plain_and_sha256(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"bob-token-2").hexdigest()
    path = tmp_path / "tokens"
    write(
        path,
        "# users and their tokens\n"
        "\n"
        "alice alice-token-1\n"
        "   # indented comment\n"
        f"bob sha256:{digest.upper()}\n"
        "bob bob-token-1\n",
    )
    v = TokenFileVerifier(path)
    assert isinstance(v, TokenVerifier)
    assert v.available
    assert (await v.verify("alice", "alice-token-1")).ok
    assert (await v.verify("bob", "bob-token-1")).ok
    assert (await v.verify("bob", "bob-token-2")).ok
    assert (await v.revalidate("bob", "bob-token-2")).ok
    d = await v.verify("bob", "alice-token-1")
    assert (d.outcome, d.code, d.reason) == (Outcome.REJECT, "bad_token", "unknown token")
    d = await v.verify("carol", "alice-token-1")
    assert (d.outcome, d.code) == (Outcome.REJECT, "no_such_user")
    assert (await v.verify("alice", f"sha256:{digest}")).outcome is Outcome.REJECT
    assert (await v.verify("alice", "")).code == "bad_request"


async def test_token_file_reload(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    write(path, "alice old-token\n")
    v = TokenFileVerifier(path)
    assert (await v.verify("alice", "old-token")).ok
    write(path, "alice new-token-longer\n")
    assert (await v.revalidate("alice", "old-token")).outcome is Outcome.REJECT
    assert (await v.verify("alice", "new-token-longer")).ok
    # broken later: fail closed, "don't know", until fixed
    write(path, "alice new-token-longer\nstray-secret-token\n")
    with capture_logs() as logs:
        d = await v.verify("alice", "new-token-longer")
    assert (d.outcome, d.code) == (Outcome.UNAVAILABLE, "token_file_invalid")
    assert not v.available
    assert "stray-secret-token" not in repr(logs)
    write(path, "alice new-token-longer\n")
    assert (await v.verify("alice", "new-token-longer")).ok
    assert is_available(v)
    path.unlink()
    assert (await v.verify("alice", "new-token-longer")).outcome is Outcome.UNAVAILABLE


@pytest.mark.parametrize(
    ("text", "lineno"),
    [
        ("alice ok-token\n\nstray-secret-token\n", 3),
        ("# c\nalice stray-secret-token extra\n", 2),
        ("alice sha256:stray-secret-token\n", 1),
        ("alice sha256:abcd\n", 1),
    ],
)
def test_token_file_malformed_line(tmp_path: Path, text: str, lineno: int) -> None:
    path = tmp_path / "tokens"
    write(path, text)
    with pytest.raises(ValueError, match="malformed") as err:
        TokenFileVerifier(path)
    message = str(err.value)
    assert f"{path}:{lineno}:" in message
    assert "stray-secret-token" not in message
    assert "abcd" not in message
    assert err.value.__cause__ is None
    assert err.value.__suppress_context__


def test_token_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read token file"):
        TokenFileVerifier(tmp_path / "absent")


# --------------------------------------------------------------------------------------------
# Failure limiter


def test_limiter_by_source() -> None:
    clock = FakeClock()
    lim = FailureLimiter(max_failures=3, window=60, clock=clock, max_source_failures=4)
    for i in range(4):
        assert lim.check("10.0.0.1", f"user{i}") is None
        lim.record_failure("10.0.0.1", f"user{i}")
    assert lim.check("10.0.0.1", "anyone") == "too many failures from 10.0.0.1"
    assert lim.check("10.0.0.2", "anyone") is None
    assert lim.check_kind("10.0.0.1", "anyone") == ("source", "too many failures from 10.0.0.1")
    assert FailureLimiter(max_failures=3).max_source_failures == 15


def test_limiter_by_user_and_source_never_user_alone() -> None:
    clock = FakeClock()
    lim = FailureLimiter(max_failures=3, window=60, clock=clock)
    for i in range(3):
        lim.record_failure(f"10.0.0.{i}", "bob")
    assert lim.check("10.9.9.9", "bob") is None  # three sources, one failure each
    for _ in range(3):
        lim.record_failure("10.0.0.7", "bob")
    assert lim.check_kind("10.0.0.7", "bob") == (
        "user-source",
        "too many failures for this user from 10.0.0.7",
    )
    assert lim.check("10.9.9.9", "bob") is None
    assert lim.check("10.0.0.7", "alice") is None


def test_limiter_window_slides() -> None:
    clock = FakeClock()
    lim = FailureLimiter(max_failures=3, window=30, clock=clock)
    for _ in range(3):
        lim.record_failure("10.0.0.1", "bob")
        clock.advance(10)
    # failures at t=0, 10, 20; now t=30: the first is exactly one window old
    assert lim.check("10.0.0.1", "bob") is None
    lim.record_failure("10.0.0.1", "bob")  # t=30: failures at 10, 20, 30
    assert lim.check("10.0.0.1", "bob") is not None
    clock.advance(9.9)
    assert lim.check("10.0.0.1", "bob") is not None
    clock.advance(0.2)
    assert lim.check("10.0.0.1", "bob") is None


def test_limiter_success_clears_user_not_source() -> None:
    lim = FailureLimiter(max_failures=2, window=60, clock=FakeClock(), max_source_failures=3)
    lim.record_failure("10.0.0.1", "bob")
    lim.record_failure("10.0.0.1", "bob")
    assert lim.check("10.0.0.1", "bob") is not None
    lim.record_success("10.0.0.1", "bob")
    assert lim.check("10.0.0.1", "bob") is None
    lim.record_failure("10.0.0.1", "carol")
    assert lim.check("10.0.0.1", "alice") is not None  # the source's 3 failures stay


def test_limiter_memory_is_bounded() -> None:
    clock = FakeClock()
    lim = FailureLimiter(max_failures=5, window=60, clock=clock, max_keys=1000)
    for i in range(20_000):
        lim.record_failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"spray-{i}")
    assert len(lim) <= 1000
    for _ in range(50):  # each key keeps at most max_failures timestamps
        lim.record_failure("10.0.0.1", "x" * 10_000)
    assert len(lim) <= 1000
    assert lim.check("10.0.0.1", "x" * 10_000) is not None
    # stale keys are swept once the window has passed
    clock.advance(61)
    lim.record_failure("10.0.0.9", "last")
    assert len(lim) == 2


# --------------------------------------------------------------------------------------------
# Authenticator


class StubVerifier:
    """A counting test double of our TokenVerifier interface."""

    def __init__(self, decision: AuthDecision | None = None, *, raises: bool = False) -> None:
        self.decision = decision
        self.raises = raises
        self.calls: list[str] = []
        self.available = True

    async def verify(self, user: str, token: str) -> AuthDecision:
        self.calls.append(user)
        if self.raises:
            raise RuntimeError(f"boom with {token}")
        assert self.decision is not None
        return self.decision

    async def revalidate(self, user: str, token: str) -> AuthDecision:
        return await self.verify(user, token)


SECRET = "s3cr3t-token-value-0123456789"


async def test_authenticator_limited_source_skips_verifier() -> None:
    stub = StubVerifier(AuthDecision.reject("bob", "unknown token"))
    reg = CollectorRegistry()
    limiter = FailureLimiter(max_failures=2, clock=FakeClock(), max_source_failures=3)
    auth = Authenticator(stub, limiter, registry=reg)
    with capture_logs() as logs:
        for _ in range(2):
            assert (await auth.login("bob", SECRET, "10.0.0.1")).code == "bad_token"
        d = await auth.login("bob", SECRET, "10.0.0.1")
    assert len(stub.calls) == 2
    assert (d.outcome, d.code) == (Outcome.REJECT, "rate_limited")
    assert d.reason == "rate limited: too many failures for this user from 10.0.0.1"
    assert sample(reg, "jobtunnel_auth_attempts_total", outcome="reject", reason="bad_token") == 2
    assert (
        sample(reg, "jobtunnel_auth_attempts_total", outcome="reject", reason="rate_limited") == 1
    )
    assert sample(reg, "jobtunnel_auth_rate_limited_total", key="user-source") == 1
    # bob from elsewhere: asked, not limited.
    d = await auth.login("bob", SECRET, "10.0.0.2")
    assert d.code == "bad_token"
    assert len(stub.calls) == 3
    # The source as a whole (three failures), whatever the user.
    await auth.login("carol", SECRET, "10.0.0.1")
    d = await auth.login("dave", SECRET, "10.0.0.1")
    assert d.reason == "rate limited: too many failures from 10.0.0.1"
    assert sample(reg, "jobtunnel_auth_rate_limited_total", key="source") == 1

    auth_lines = [e for e in logs if e["event"] == "auth"]
    assert len(auth_lines) == 3
    # bob never authenticated here and the stub knows no users: his name is only a digest.
    assert dict(auth_lines[0]) | {"log_level": "x"} == {
        "event": "auth",
        "user": auth.loggable_user("bob"),
        "peer": "10.0.0.1",
        "outcome": "reject",
        "reason": "unknown token",
        "code": "bad_token",
        "log_level": "x",
    }
    assert auth.loggable_user("bob").startswith("unknown:")
    assert SECRET not in repr(logs)


async def test_authenticator_unavailable_is_not_a_failure() -> None:
    stub = StubVerifier(AuthDecision.unavailable("bob", "hub unavailable: timeout"))
    auth = Authenticator(stub, FailureLimiter(max_failures=2, clock=FakeClock()))
    for _ in range(5):
        d = await auth.login("bob", SECRET, "10.0.0.1")
        assert d.outcome is Outcome.UNAVAILABLE
    assert len(stub.calls) == 5
    stub.available = False
    assert not auth.available


async def test_authenticator_success_clears_user_failures() -> None:
    limiter = FailureLimiter(max_failures=2, clock=FakeClock())
    stub = StubVerifier(AuthDecision.reject("bob", "unknown token"))
    auth = Authenticator(stub, limiter)
    await auth.login("bob", SECRET, "10.0.0.1")
    stub.decision = AuthDecision.accept("bob")
    assert (await auth.login("bob", SECRET, "10.0.0.2")).ok
    stub.decision = AuthDecision.reject("bob", "unknown token")
    await auth.login("bob", SECRET, "10.0.0.3")
    assert limiter.check("10.0.0.4", "bob") is None  # one failure since the success


async def test_authenticator_labels_are_bounded_and_errors_contained() -> None:
    reg = CollectorRegistry()
    stub = StubVerifier(
        AuthDecision(Outcome.REJECT, "bob", f"free text {SECRET}", code=f"free text {SECRET}")
    )
    auth = Authenticator(stub, FailureLimiter(clock=FakeClock()), registry=reg)
    await auth.login("bob", SECRET, "10.0.0.1")
    stub.raises = True
    with capture_logs() as logs:
        d = await auth.login("bob", SECRET, "10.0.0.1")
        r = await auth.revalidate("bob", SECRET)
    assert (d.outcome, d.code) == (Outcome.UNAVAILABLE, "verifier_error")
    assert r.outcome is Outcome.UNAVAILABLE
    assert SECRET not in repr(logs)
    assert SECRET not in d.reason
    reasons = label_values(reg, "jobtunnel_auth_attempts_total", "reason")
    reasons |= label_values(reg, "jobtunnel_auth_revalidations_total", "reason")
    assert reasons == {"other", "verifier_error"}
    assert reasons <= REASON_CODES


def test_decision_default_codes() -> None:
    assert AuthDecision(Outcome.ACCEPT, "a", "ok").code == "ok"
    assert AuthDecision(Outcome.REJECT, "a", "no").code == "bad_token"
    assert AuthDecision(Outcome.UNAVAILABLE, "a", "?").code == "hub_unavailable"


@pytest.mark.slow
async def test_authenticator_with_hub_never_logs_token(users: HubUsers) -> None:
    reg = CollectorRegistry()
    async with hub_verifier(users.hub.api_url, registry=reg) as v:
        auth = Authenticator(v, FailureLimiter(max_failures=3), registry=reg)
        with capture_logs() as logs:
            assert (await auth.login(users.alice, users.alice_token, "10.1.0.1")).ok
            d = await auth.login(users.bob, users.alice_token, "10.1.0.2")
            assert d.code == "user_mismatch"
            garbage = "deadbeef" * 4
            assert (await auth.login(users.alice, garbage, "10.1.0.3")).code == "bad_token"
            assert (await auth.revalidate(users.alice, users.alice_token)).ok
        text = repr(logs)
        assert users.alice_token not in text
        assert garbage not in text
        assert [e["outcome"] for e in logs if e["event"] == "auth"] == [
            "accept",
            "reject",
            "reject",
        ]
        assert auth.available
        assert sample(reg, "jobtunnel_auth_attempts_total", outcome="accept", reason="ok") == 1
        assert sample(reg, "jobtunnel_auth_hub_up") == 1
        for family in reg.collect():
            for s in family.samples:
                assert users.alice_token not in repr(s)
                assert garbage not in repr(s)


def test_broader_scopes_rule() -> None:
    allowed = ["custom:jobtunnel:connect!user={user}", "read:users:name", "read:users:groups"]
    narrow = {"custom:jobtunnel:connect!user=alice", "read:users:name!user=alice"}
    assert broader_scopes(narrow, allowed, "alice") == []
    # The same scope filtered to someone else, or unfiltered, is broader than alice's own.
    assert broader_scopes({"custom:jobtunnel:connect!user=bob"}, allowed, "alice") == [
        "custom:jobtunnel:connect!user=bob"
    ]
    assert broader_scopes({"custom:jobtunnel:connect"}, allowed, "alice") == [
        "custom:jobtunnel:connect"
    ]
    # Unknown scopes are broader: an allow-list, not a list of known dangers.
    assert broader_scopes({"read:users:name", "custom:other:thing"}, allowed) == [
        "custom:other:thing"
    ]
