"""Token verification for the forwarder: a local token file or a JupyterHub.

The SSH user name is a hub user name and the SSH password is that user's JupyterHub API token.
A login is accepted only when the authority's answer for the token names *exactly* the SSH user:
a valid token of somebody else (an admin's, say) is rejected.

Secrets: a token never appears in a log line, an exception message, a metric label, a ``repr``
or a cache key. Caches and single-flight slots are keyed by ``sha256(user + "\\0" + token)``; the
token file verifier keeps only sha256 digests in memory.

Pieces:

- :class:`AuthDecision` / :class:`Outcome`: the answer, with a short human ``reason`` and a
  bounded machine ``code`` (used as a metric label).
- :class:`TokenVerifier`: the protocol; :class:`TokenFileVerifier` and :class:`HubVerifier`
  implement it.
- :class:`FailureLimiter`: failure limiting per (user, source) and per source, never per user
  alone (ten wrong guesses for carol from one address must not lock carol out everywhere).
- :class:`Authenticator`: the forwarder's front door (limiter + verifier + metrics + log lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import json
import os
import ssl
import stat
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.sources import source_group
from shared.summary import LogSummary

log = structlog.get_logger(__name__)

__all__ = [
    "REASON_CODES",
    "AuthDecision",
    "Authenticator",
    "FailureLimiter",
    "HubVerifier",
    "Outcome",
    "TokenFileVerifier",
    "TokenVerifier",
    "broader_scopes",
    "scope_satisfied",
    "token_fingerprint",
]

# Machine-readable reason codes: the only values the ``reason`` label of the metrics can take.
REASON_CODES: frozenset[str] = frozenset(
    {
        "ok",
        "bad_request",  # empty/oversized user name, empty or malformed token (no lookup made)
        "bad_token",  # unknown, revoked or expired token
        "no_such_user",  # token file: the user has no line at all
        "user_mismatch",  # the token belongs to another user
        "service_token",  # the token belongs to a hub service, not a user
        "missing_scope",
        "broad_token",  # the token can do more than open tunnels (refused by default)
        "rate_limited",
        "hub_unavailable",
        "token_file_invalid",
        "verifier_error",  # a verifier raised (a bug): treated as UNAVAILABLE
        "other",  # a third-party verifier's code outside this set
    }
)

#: The scope a job's token needs by default: defined by the hub's configuration
#: (configs/jupyterhub/jupyterhub_config.py), held only by the user it is filtered to.
CONNECT_SCOPE = "custom:jobtunnel:connect!user={user}"
#: What a token minted with only :data:`CONNECT_SCOPE` also shows: the hub adds the
#: identity scopes to every token. Anything else makes a token broader than its job.
IDENTITY_SCOPES: tuple[str, ...] = ("read:users:name", "read:users:groups")

_MAX_TOKEN_LEN = 4096
_MAX_USER_LEN = 256
_MAX_KNOWN_USERS = 10_000


class Outcome(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class AuthDecision:
    """The answer for one (user, token) pair. Never holds the token.

    ``reason`` is short and human ("ok", "token belongs to 'bob'", "hub unavailable: timeout");
    ``code`` is one of :data:`REASON_CODES` and is what metrics use as a label. If ``code`` is
    left empty it defaults from the outcome ("ok", "bad_token", "hub_unavailable").
    """

    outcome: Outcome
    user: str
    reason: str
    scopes: frozenset[str] = frozenset()
    code: str = ""

    def __post_init__(self) -> None:
        if not self.code:
            default = {
                Outcome.ACCEPT: "ok",
                Outcome.REJECT: "bad_token",
                Outcome.UNAVAILABLE: "hub_unavailable",
            }[self.outcome]
            object.__setattr__(self, "code", default)

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.ACCEPT

    @property
    def for_the_client(self) -> bool:
        """A refusal of a valid token the user can act on (mint the right one): say why.

        The caller holds a token the hub accepted, so the reason reveals nothing new.
        """
        return self.code in ("missing_scope", "broad_token")

    @classmethod
    def accept(cls, user: str, scopes: frozenset[str] = frozenset()) -> AuthDecision:
        return cls(Outcome.ACCEPT, user, "ok", scopes, "ok")

    @classmethod
    def reject(cls, user: str, reason: str, code: str = "bad_token") -> AuthDecision:
        return cls(Outcome.REJECT, user, reason, frozenset(), code)

    @classmethod
    def unavailable(cls, user: str, reason: str, code: str = "hub_unavailable") -> AuthDecision:
        return cls(Outcome.UNAVAILABLE, user, reason, frozenset(), code)


@runtime_checkable
class TokenVerifier(Protocol):
    async def verify(self, user: str, token: str) -> AuthDecision:
        """Check a login; may answer from a cache."""
        ...

    async def revalidate(self, user: str, token: str) -> AuthDecision:
        """Re-check a token of a live session; must reflect revocation promptly.

        UNAVAILABLE means "don't know": the caller keeps the session.
        """
        ...

    @property
    def available(self) -> bool:
        """False while the backing authority is failing (feeds ``/readyz``)."""
        ...


def token_fingerprint(user: str, token: str) -> str:
    """The cache key of a (user, token) pair: ``sha256(user + "\\0" + token)`` in hex."""
    return hashlib.sha256(f"{user}\0{token}".encode()).hexdigest()


def _precheck(user: str, token: str) -> AuthDecision | None:
    """Refuse obviously bad input before any lookup (also keeps control characters out of
    HTTP headers)."""
    if not user or len(user) > _MAX_USER_LEN:
        return AuthDecision.reject(user[:_MAX_USER_LEN], "invalid user name", "bad_request")
    if (
        not token
        or len(token) > _MAX_TOKEN_LEN
        or not token.isascii()
        or not token.isprintable()
        or " " in token
    ):
        return AuthDecision.reject(user, "malformed token", "bad_request")
    return None


def scope_satisfied(required: str, granted: frozenset[str] | set[str], user: str = "") -> bool:
    """Whether a required scope is among the hub's (expanded) scopes of a token.

    Rule:

    - ``{user}`` in a required scope is replaced by the SSH user name, so
      ``"access:servers!user={user}"`` requires access to the user's *own* servers.
    - An unfiltered requirement ``"S"`` is satisfied by ``"S"`` itself or by any filtered form
      ``"S!<filter>"`` (the hub returns e.g. ``"access:servers!user=alice"`` for a user's own
      token; a required ``"access:servers"`` means "some access:servers permission").
    - A filtered requirement ``"S!F"`` is satisfied by exactly ``"S!F"`` or by the unfiltered
      ``"S"`` (which covers every filter).

    The hub already expands roles and parent scopes (``read:users`` implies
    ``read:users:name``), so no scope hierarchy is needed here.
    """
    req = required.replace("{user}", user)
    if req in granted:
        return True
    base, sep, _ = req.partition("!")
    if sep:
        return base in granted
    prefix = base + "!"
    return any(g.startswith(prefix) for g in granted)


def broader_scopes(
    granted: frozenset[str] | set[str], allowed: Sequence[str], user: str = ""
) -> list[str]:
    """The granted scopes no ``allowed`` entry covers: what a stolen token could do beyond tunnels.

    An allowed scope covers a granted one of the same base (the part before ``!``) whose filter
    is the allowed one's (``{user}`` substituted) or any filter when the allowed one has none.
    A token asked for with ``inherit``, ``access:servers`` or ``tokens`` shows those expanded
    by the hub (``access:servers!user=alice``, ``tokens!user=alice``...), so an allow-list
    catches every broad token, including scopes this code has never heard of.
    """
    broader = []
    for scope in sorted(granted):
        base, _, filt = scope.partition("!")
        for entry in allowed:
            a_base, a_sep, a_filt = entry.replace("{user}", user).partition("!")
            if a_base == base and (not a_sep or a_filt == filt):
                break
        else:
            broader.append(scope)
    return broader


# --------------------------------------------------------------------------------------------
# Token file


class TokenFileVerifier:
    """Tokens from a local file (for running without a hub).

    Format, one entry per line::

        # comment
        alice 3f9c...            (the token itself)
        alice sha256:1a2b...     (hex sha256 of the token; preferred)

    Blank lines and ``#`` comments are ignored; a user may have several lines (several tokens).
    The file is re-read when its mtime, size or inode changes (checked with one ``stat`` per
    call). A malformed file raises ``ValueError`` at construction naming the file and line (never
    the token). If the file later becomes unreadable or malformed, verification fails closed
    (UNAVAILABLE, ``available`` False; live sessions are kept) until it is fixed. Comparison is
    constant-time on sha256 digests; plain tokens are hashed at load and not kept.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tokens: dict[str, list[bytes]] = {}
        self._signature: tuple[int, int, int] | None = None
        self._error: str | None = None
        self._load(raise_errors=True)

    @property
    def available(self) -> bool:
        return self._error is None

    def _stat_signature(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, *, raise_errors: bool) -> None:
        try:
            signature = self._stat_signature()
            text = self.path.read_text(encoding="utf-8")
            tokens, plain = self._parse(text)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, ValueError) and not isinstance(exc, UnicodeDecodeError):
                message = str(exc)  # ours: names file and line, never the token
            else:
                message = f"{self.path}: cannot read token file: {type(exc).__name__}"
            if raise_errors:
                raise ValueError(message) from None
            if self._error != message:
                log.error("token_file_invalid", path=str(self.path), error=message)
            self._error = message
            self._signature = None
            return
        self._tokens = tokens
        self._signature = signature
        if self._error is not None:
            log.info("token_file_valid_again", path=str(self.path))
        self._error = None
        if plain and os.name == "posix":
            with contextlib.suppress(OSError):
                mode = self.path.stat().st_mode
                if mode & (stat.S_IRGRP | stat.S_IROTH):
                    log.warning(
                        "token_file_readable_by_others",
                        path=str(self.path),
                        mode=oct(stat.S_IMODE(mode)),
                    )
        log.info(
            "token_file_loaded",
            path=str(self.path),
            users=len(tokens),
            tokens=sum(len(v) for v in tokens.values()),
        )

    def _parse(self, text: str) -> tuple[dict[str, list[bytes]], bool]:
        tokens: dict[str, list[bytes]] = {}
        plain = False
        expected = "expected '<user> <token>' or '<user> sha256:<64 hex digits>'"
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 2:
                # never echo the line: its first field may be a token
                raise ValueError(f"{self.path}:{lineno}: malformed token line ({expected})")
            user, secret = fields
            if secret.lower().startswith("sha256:"):
                hexpart = secret[len("sha256:") :]
                try:
                    digest = bytes.fromhex(hexpart)
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise ValueError(
                        f"{self.path}:{lineno}: malformed sha256 digest for user {user!r} "
                        f"({expected})"
                    )
            else:
                plain = True
                digest = hashlib.sha256(secret.encode()).digest()
            tokens.setdefault(user, []).append(digest)
        return tokens, plain

    def _maybe_reload(self) -> None:
        try:
            signature = self._stat_signature()
        except OSError:
            signature = None
        if signature is None or signature != self._signature:
            self._load(raise_errors=False)

    async def verify(self, user: str, token: str) -> AuthDecision:
        bad = _precheck(user, token)
        if bad is not None:
            return bad
        self._maybe_reload()
        if self._error is not None:
            return AuthDecision.unavailable(user, "token file invalid", "token_file_invalid")
        stored = self._tokens.get(user)
        if not stored:
            return AuthDecision.reject(user, "no such user", "no_such_user")
        candidate = hashlib.sha256(token.encode()).digest()
        match = False
        for digest in stored:  # no early exit: time depends only on the number of lines
            match |= hmac.compare_digest(candidate, digest)
        if match:
            return AuthDecision.accept(user)
        return AuthDecision.reject(user, "unknown token", "bad_token")

    def knows_user(self, user: str) -> bool:
        """Whether ``user`` has a line in the file (so its name is safe to log)."""
        return user in self._tokens

    async def revalidate(self, user: str, token: str) -> AuthDecision:
        """Same as :meth:`verify`: there is no cache, and the file is re-checked each call."""
        return await self.verify(user, token)


# --------------------------------------------------------------------------------------------
# JupyterHub


class _TTLCache:
    """A small bounded cache of decisions with per-entry expiry (insertion-ordered)."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, float, AuthDecision]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, max_age: float | None = None) -> AuthDecision | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        stored_at, expires, decision = entry
        now = self._clock()
        if now >= expires:
            del self._data[key]
            return None
        if max_age is not None and now - stored_at > max_age:
            return None
        return decision

    def put(self, key: str, decision: AuthDecision) -> None:
        if self.ttl <= 0:
            return
        now = self._clock()
        self._data[key] = (now, now + self.ttl, decision)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
        # entries share one TTL, so the oldest are at the front: drop the expired ones
        while self._data:
            first = next(iter(self._data.values()))
            if first[1] > now:
                break
            self._data.popitem(last=False)

    def pop(self, key: str) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()


class _HubError(Exception):
    """A failure to get a definitive answer from the hub (the message is a short cause)."""


class HubVerifier:
    """Verify tokens with JupyterHub's ``GET {api_url}/user``.

    - 200 with ``name == user`` (and ``kind == "user"`` when the hub reports a kind) and every
      required scope present (see :func:`scope_satisfied`) -> ACCEPT.
    - 200 for another name, a service token, or a missing scope -> REJECT with that reason.
    - 200 for a token holding any scope beyond the required ones and the hub's identity scopes
      (``access:servers``, ``tokens``, ``inherit``...) -> REJECT ``broad_token``, unless
      ``allow_broad_tokens``: a job's token is exposed to everything that runs in the job,
      so it must be worth almost nothing (open this user's tunnels) when stolen.
    - 401/403 (and a JSON 404) -> REJECT "unknown, revoked or expired token"; a non-JSON 404
      (a wrong ``api_url``) -> UNAVAILABLE.
    - anything else (other statuses, redirects, timeouts, connection errors, unparsable
      answers) -> UNAVAILABLE "hub unavailable: <short cause>".

    Caches: ACCEPTs for ``cache_ttl`` seconds, REJECTs for ``negative_cache_ttl`` seconds
    (UNAVAILABLE is never cached), keyed by :func:`token_fingerprint`, each bounded to
    ``max_cache_entries``. Concurrent :meth:`verify` calls for the same key share one hub
    request (single-flight). Every request is bounded by ``timeout`` seconds in total.

    :meth:`revalidate` ignores the negative cache and uses the positive cache only if the entry
    is younger than ``revalidate_max_age`` (default 0: always ask the hub). It never joins an
    in-flight :meth:`verify` request (those may predate a revocation); concurrent revalidations
    of the same key share one request among themselves (and a :meth:`verify` may join them).
    Its answer refreshes the caches: a REJECT evicts the positive entry, so new logins with a
    revoked token fail at once too.

    ``available`` turns False on a hub failure and True again on the next definitive answer.

    Metrics (on ``registry``, or a private registry if None; pass the same registry to the
    :class:`Authenticator`): ``jobtunnel_auth_hub_request_seconds``,
    ``jobtunnel_auth_cache_hits_total{result}``, ``jobtunnel_auth_coalesced_total``,
    ``jobtunnel_auth_hub_up``.
    """

    def __init__(
        self,
        api_url: str,
        *,
        ca_bundle: Path | None = None,
        verify_tls: bool = True,
        timeout: float = 5.0,
        cache_ttl: float = 60.0,
        negative_cache_ttl: float = 10.0,
        required_scopes: Sequence[str] = (CONNECT_SCOPE,),
        allow_broad_tokens: bool = False,
        narrow_scopes: Sequence[str] = IDENTITY_SCOPES,
        registry: CollectorRegistry | None = None,
        revalidate_max_age: float = 0.0,
        max_cache_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if isinstance(required_scopes, str):
            raise TypeError("required_scopes must be a sequence of scope names, not a string")
        self.api_url = api_url.rstrip("/")
        self._user_url = f"{self.api_url}/user"
        self.timeout = timeout
        self.required_scopes: tuple[str, ...] = tuple(required_scopes)
        self.allow_broad_tokens = allow_broad_tokens
        # A token may hold its required scopes and the hub's identity scopes, nothing more.
        self.narrow_scopes: tuple[str, ...] = (*self.required_scopes, *narrow_scopes)
        self.revalidate_max_age = revalidate_max_age
        self._ssl: ssl.SSLContext | bool
        if not verify_tls:
            self._ssl = False
        elif ca_bundle is not None:
            self._ssl = ssl.create_default_context(cafile=str(ca_bundle))
        else:
            self._ssl = True
        self._positive = _TTLCache(cache_ttl, max_cache_entries, clock)
        self._negative = _TTLCache(negative_cache_ttl, max_cache_entries, clock)
        self._inflight: dict[str, asyncio.Task[AuthDecision]] = {}
        self._inflight_reval: dict[str, asyncio.Task[AuthDecision]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._available = True
        self._hub_requests = 0

        self.registry = registry if registry is not None else CollectorRegistry()
        self._m_seconds = Histogram(
            "jobtunnel_auth_hub_request_seconds",
            "Duration of token checks against the JupyterHub API",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self._m_cache = Counter(
            "jobtunnel_auth_cache_hits_total",
            "Token checks answered from the cache",
            ["result"],
            registry=self.registry,
        )
        self._m_coalesced = Counter(
            "jobtunnel_auth_coalesced_total",
            "Token checks that joined an identical in-flight hub request",
            registry=self.registry,
        )
        self._m_up = Gauge(
            "jobtunnel_auth_hub_up",
            "1 if the last JupyterHub request got a definitive answer, else 0",
            registry=self.registry,
        )
        self._m_up.set(1)
        for result in ("positive", "negative"):
            self._m_cache.labels(result=result)

    # -- public API -----------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._available

    @property
    def hub_requests(self) -> int:
        """How many requests were sent to the hub (for tests and debugging)."""
        return self._hub_requests

    async def verify(self, user: str, token: str) -> AuthDecision:
        bad = _precheck(user, token)
        if bad is not None:
            return bad
        key = token_fingerprint(user, token)
        cached = self._positive.get(key)
        if cached is not None:
            self._m_cache.labels(result="positive").inc()
            return cached
        cached = self._negative.get(key)
        if cached is not None:
            self._m_cache.labels(result="negative").inc()
            return cached
        fresher = self._inflight_reval.get(key)  # a revalidation in flight is as good
        if fresher is not None:
            self._m_coalesced.inc()
            return await asyncio.shield(fresher)
        return await self._single_flight(self._inflight, key, user, token)

    async def revalidate(self, user: str, token: str) -> AuthDecision:
        bad = _precheck(user, token)
        if bad is not None:
            return bad
        key = token_fingerprint(user, token)
        if self.revalidate_max_age > 0:
            cached = self._positive.get(key, max_age=self.revalidate_max_age)
            if cached is not None:
                self._m_cache.labels(result="positive").inc()
                return cached
        return await self._single_flight(self._inflight_reval, key, user, token)

    async def aclose(self) -> None:
        """Close the HTTP session. In-flight checks end as UNAVAILABLE (those still running
        after a short grace period are cancelled). The verifier may be used again afterwards
        (a new session is created on demand)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        tasks = [*self._inflight.values(), *self._inflight_reval.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    def clear_cache(self) -> None:
        self._positive.clear()
        self._negative.clear()

    # -- internals --------------------------------------------------------------------------

    async def _single_flight(
        self,
        slots: dict[str, asyncio.Task[AuthDecision]],
        key: str,
        user: str,
        token: str,
    ) -> AuthDecision:
        task = slots.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._check_and_cache(key, user, token))
            slots[key] = task

            def _release(done: asyncio.Task[AuthDecision], key: str = key) -> None:
                if slots.get(key) is done:
                    del slots[key]
                if not done.cancelled():
                    done.exception()  # mark retrieved; _check_and_cache does not raise

            task.add_done_callback(_release)
        else:
            self._m_coalesced.inc()
        # shield: a cancelled caller (client gone) must not cancel the shared request
        return await asyncio.shield(task)

    async def _check_and_cache(self, key: str, user: str, token: str) -> AuthDecision:
        decision = await self._ask_hub(user, token)
        if decision.outcome is Outcome.ACCEPT:
            self._negative.pop(key)
            self._positive.put(key, decision)
        elif decision.outcome is Outcome.REJECT:
            self._positive.pop(key)
            self._negative.put(key, decision)
        return decision

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": "jobtunnel", "Accept": "application/json"},
            )
        return self._session

    async def _ask_hub(self, user: str, token: str) -> AuthDecision:
        self._hub_requests += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                status, content_type, body = await self._get_user(token)
        except TimeoutError:
            return self._hub_failed(user, "timeout")
        except _HubError as exc:
            return self._hub_failed(user, str(exc))
        except aiohttp.ClientConnectorError:
            return self._hub_failed(user, "cannot connect")
        except aiohttp.ClientError as exc:
            return self._hub_failed(user, type(exc).__name__)
        except Exception as exc:  # anything else: still "don't know", never a crash
            return self._hub_failed(user, type(exc).__name__)
        finally:
            self._m_seconds.observe(time.perf_counter() - started)

        if status == 404 and "json" not in content_type:
            # not the hub API's answer (the hub's API errors are JSON): a wrong api_url must
            # not look like "every token is bad"
            return self._hub_failed(user, "HTTP 404 from a non-API page; check the hub API URL")
        if status in (401, 403, 404):
            self._hub_ok()
            return AuthDecision.reject(user, "unknown, revoked or expired token", "bad_token")
        if status != 200:
            return self._hub_failed(user, f"HTTP {status}")
        try:
            model = json.loads(body)
        except ValueError:
            model = None
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            return self._hub_failed(user, "unexpected answer")
        self._hub_ok()
        return self._decide(user, model)

    async def _get_user(self, token: str) -> tuple[int, str, bytes]:
        session = self._get_session()
        headers = {"Authorization": f"token {token}"}
        for attempt in (1, 2):
            try:
                async with session.get(
                    self._user_url, headers=headers, allow_redirects=False
                ) as resp:
                    if 300 <= resp.status < 400:
                        # e.g. a wrong api_url redirected to a login page: never follow
                        # (the Authorization header must not travel elsewhere)
                        raise _HubError(f"HTTP {resp.status} redirect; check the hub API URL")
                    return resp.status, resp.content_type, await resp.read()
            except aiohttp.ServerDisconnectedError:
                # a pooled keep-alive connection closed by the hub: retry once, same deadline
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _decide(self, user: str, model: dict[str, Any]) -> AuthDecision:
        name: str = model["name"]
        kind = model.get("kind")
        if kind is not None and kind != "user":
            return AuthDecision.reject(
                user, f"token belongs to {kind} {name!r}, not a user", "service_token"
            )
        if name != user:
            return AuthDecision.reject(user, f"token belongs to {name!r}", "user_mismatch")
        raw_scopes = model.get("scopes")
        scopes = (
            frozenset(s for s in raw_scopes if isinstance(s, str))
            if isinstance(raw_scopes, list)
            else frozenset()
        )
        if not self.allow_broad_tokens and (
            broader := broader_scopes(scopes, self.narrow_scopes, user)
        ):
            shown = ", ".join(broader[:4]) + (
                f" and {len(broader) - 4} more" if len(broader) > 4 else ""
            )
            wanted = ", ".join(r.replace("{user}", user) for r in self.required_scopes)
            return AuthDecision.reject(
                user,
                f"token can do more than open tunnels ({shown}): a job must carry a token "
                f"with only {wanted or 'the identity scopes'} (jobtunnel.dask.ensure_token_secret "
                "mints one)",
                "broad_token",
            )
        for required in self.required_scopes:
            if not scope_satisfied(required, scopes, user):
                return AuthDecision.reject(
                    user,
                    f"missing scope {required.replace('{user}', user)!r}: a job's token needs it "
                    "(jobtunnel.dask.ensure_token_secret mints one)",
                    "missing_scope",
                )
        return AuthDecision.accept(user, scopes)

    def _hub_ok(self) -> None:
        if not self._available:
            log.info("hub_available", api_url=self.api_url)
        self._available = True
        self._m_up.set(1)

    def _hub_failed(self, user: str, cause: str) -> AuthDecision:
        if self._available:
            log.warning("hub_unavailable", api_url=self.api_url, cause=cause)
        else:
            log.debug("hub_still_unavailable", api_url=self.api_url, cause=cause)
        self._available = False
        self._m_up.set(0)
        return AuthDecision.unavailable(user, f"hub unavailable: {cause}")


# --------------------------------------------------------------------------------------------
# Failure limiting


KeyKind = Literal["source", "user-source"]


class FailureLimiter:
    """Per (user, source) and per source: after too many rejected attempts within ``window``
    seconds, further attempts from that key are refused immediately (no hub call) until the
    window slides.

    Never per user alone: then anyone could lock a victim out from everywhere by guessing
    wrong for her name. A (user, source) key allows ``max_failures``; a source (an IPv4
    address or an IPv6 /64, :func:`shared.sources.source_group`) allows ``max_source_failures``
    (default five times as many: a NAT'd pool shares it), whatever the user names. What
    remains: a guesser behind the same NAT as the victim can exhaust their shared source key.

    Memory-bounded: each key keeps at most its limit of timestamps, stale keys are pruned
    (a full sweep at most once per ``window``), and at most ``max_keys`` keys are tracked; past
    that the least recently failed keys are forgotten first. Very long user names are tracked by
    their sha256.
    """

    def __init__(
        self,
        *,
        max_failures: int = 10,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
        max_source_failures: int | None = None,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        if window <= 0:
            raise ValueError("window must be positive")
        if max_keys < 2:
            raise ValueError("max_keys must be at least 2")
        self.max_failures = max_failures
        self.max_source_failures = (
            max_source_failures if max_source_failures is not None else 5 * max_failures
        )
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._failures: OrderedDict[tuple[KeyKind, str], deque[float]] = OrderedDict()
        self._last_sweep = clock()

    def __len__(self) -> int:
        """Number of keys currently tracked."""
        return len(self._failures)

    @staticmethod
    def _user_key(user: str) -> str:
        if len(user) <= 128:
            return user
        return "sha256:" + hashlib.sha256(user.encode(errors="surrogatepass")).hexdigest()

    def _keys(self, peer_host: str, user: str) -> tuple[tuple[KeyKind, str], tuple[KeyKind, str]]:
        group = source_group(peer_host)
        return ("source", group), ("user-source", f"{self._user_key(user)}\0{group}")

    def _limit(self, key: tuple[KeyKind, str]) -> int:
        return self.max_source_failures if key[0] == "source" else self.max_failures

    def _recent(self, key: tuple[KeyKind, str], now: float) -> int:
        stamps = self._failures.get(key)
        if stamps is None:
            return 0
        horizon = now - self.window
        while stamps and stamps[0] <= horizon:
            stamps.popleft()
        if not stamps:
            del self._failures[key]
            return 0
        return len(stamps)

    def check_kind(self, peer_host: str, user: str) -> tuple[KeyKind, str] | None:
        """Like :meth:`check`, but also says which key is limited."""
        now = self._clock()
        source_key, user_key = self._keys(peer_host, user)
        if self._recent(source_key, now) >= self.max_source_failures:
            return "source", f"too many failures from {source_key[1]}"
        if self._recent(user_key, now) >= self.max_failures:
            return "user-source", f"too many failures for this user from {source_key[1]}"
        return None

    def check(self, peer_host: str, user: str) -> str | None:
        """None if the attempt may proceed, else the reason it is refused."""
        hit = self.check_kind(peer_host, user)
        return None if hit is None else hit[1]

    def record_failure(self, peer_host: str, user: str) -> None:
        now = self._clock()
        self._maybe_sweep(now)
        for key in self._keys(peer_host, user):
            stamps = self._failures.get(key)
            if stamps is None:
                stamps = deque(maxlen=self._limit(key))
                self._failures[key] = stamps
            else:
                self._failures.move_to_end(key)
            stamps.append(now)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def record_success(self, peer_host: str, user: str) -> None:
        """A successful login clears the user's failures from there (not the source's)."""
        _, user_key = self._keys(peer_host, user)
        self._failures.pop(user_key, None)

    def _maybe_sweep(self, now: float) -> None:
        if now - self._last_sweep < self.window:
            return
        self._last_sweep = now
        horizon = now - self.window
        stale = [k for k, stamps in self._failures.items() if not stamps or stamps[-1] <= horizon]
        for key in stale:
            del self._failures[key]


# --------------------------------------------------------------------------------------------
# Front door


class Authenticator:
    """The forwarder's front door: limiter + verifier + metrics + log lines.

    One instance per forwarder. Metrics (on ``registry``, or a private registry if None):
    ``jobtunnel_auth_attempts_total{outcome,reason}``,
    ``jobtunnel_auth_revalidations_total{outcome,reason}`` and
    ``jobtunnel_auth_rate_limited_total{key}``; ``reason`` is always one of
    :data:`REASON_CODES`.
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        limiter: FailureLimiter,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.verifier = verifier
        self.limiter = limiter
        self.registry = registry if registry is not None else CollectorRegistry()
        self._m_attempts = Counter(
            "jobtunnel_auth_attempts_total",
            "Login attempts by outcome and reason code",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self._m_revalidations = Counter(
            "jobtunnel_auth_revalidations_total",
            "Token re-checks of live sessions by outcome and reason code",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self._m_limited = Counter(
            "jobtunnel_auth_rate_limited_total",
            "Login attempts refused by the failure limiter, by limited key",
            ["key"],
            registry=self.registry,
        )
        for key in ("source", "user-source"):
            self._m_limited.labels(key=key)
        # Set by the forwarder: failed attempts then log one line per source and code per
        # interval (the summary's owner logs the counts), so a guesser cannot flood the log.
        self.log_summary: LogSummary | None = None
        # Names that authenticated once: only these are logged verbatim before a login.
        self._known_users: OrderedDict[str, None] = OrderedDict()

    def loggable_user(self, user: str) -> str:
        """``user`` if it is a known user name, else a short digest of it.

        A failed login's user name may be a token typed into the wrong field: it is logged
        verbatim only once it has authenticated on this forwarder (or is in the token file).
        """
        knows = getattr(self.verifier, "knows_user", None)
        if user in self._known_users or (callable(knows) and knows(user)):
            return user
        digest = hashlib.sha256(user.encode(errors="surrogatepass")).hexdigest()[:12]
        return f"unknown:{digest}"

    @property
    def available(self) -> bool:
        return self.verifier.available

    async def login(self, user: str, token: str, peer_host: str) -> AuthDecision:
        hit = self.limiter.check_kind(peer_host, user)
        if hit is not None:
            kind, why = hit
            self._m_limited.labels(key=kind).inc()
            decision = AuthDecision.reject(user, f"rate limited: {why}", "rate_limited")
        else:
            decision = await self._call(self.verifier.verify, user, token)
            if decision.outcome is Outcome.REJECT:
                self.limiter.record_failure(peer_host, user)
            elif decision.outcome is Outcome.ACCEPT:
                self.limiter.record_success(peer_host, user)
            # A token the hub says is this user's (even one refused for its scopes) proves the
            # name is a user name, not a token typed into the wrong field.
            if decision.ok or decision.for_the_client:
                self._known_users[user] = None
                self._known_users.move_to_end(user)
                while len(self._known_users) > _MAX_KNOWN_USERS:
                    self._known_users.popitem(last=False)
        code = self._code(decision)
        self._m_attempts.labels(outcome=decision.outcome.value, reason=code).inc()
        summary = self.log_summary
        if not decision.ok and summary and not summary.should_log((source_group(peer_host), code)):
            return decision
        level = log.info if decision.ok else log.warning
        level(
            "auth",
            user=self.loggable_user(user),
            peer=peer_host,
            outcome=decision.outcome.value,
            reason=decision.reason,
            code=code,
        )
        return decision

    async def revalidate(self, user: str, token: str) -> AuthDecision:
        decision = await self._call(self.verifier.revalidate, user, token)
        code = self._code(decision)
        self._m_revalidations.labels(outcome=decision.outcome.value, reason=code).inc()
        if not decision.ok:
            log.warning(
                "auth_revalidate",
                user=user,
                outcome=decision.outcome.value,
                reason=decision.reason,
                code=code,
            )
        return decision

    @staticmethod
    def _code(decision: AuthDecision) -> str:
        return decision.code if decision.code in REASON_CODES else "other"

    @staticmethod
    async def _call(
        method: Callable[[str, str], Awaitable[Any]],
        user: str,
        token: str,
    ) -> AuthDecision:
        try:
            decision = await method(user, token)
        except Exception as exc:
            # A verifier bug: never log the exception text (it could quote its arguments).
            log.error("auth_verifier_error", user=user, error_type=type(exc).__name__)
            return AuthDecision.unavailable(
                user, f"verifier error: {type(exc).__name__}", "verifier_error"
            )
        if not isinstance(decision, AuthDecision):
            log.error("auth_verifier_error", user=user, error_type=type(decision).__name__)
            return AuthDecision.unavailable(user, "verifier error: bad result", "verifier_error")
        return decision
