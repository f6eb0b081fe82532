"""List-then-watch caches ("informers") over kubernetes_asyncio's ``watch.Watch``.

Why a cache at all when every reconcile reads the API directly: the watches are the triggers
(a pod replaced, a Service reverted, a Tunnel deleted), and the caches answer the questions a
trigger needs answered cheaply, e.g. "which Tunnels claim this cluster?" or "which Services still
carry a routing annotation?". The reconcile itself never trusts the cache for what it writes.

The protocol is client-go's: list (remember the list's resourceVersion), emit synthetic events
for the difference with the cache, watch from that version with bookmarks, keep the version of
every event; on ``410 Gone`` (the version fell out of etcd's window) list again; on a broken
connection (an API server restart) back off and resume the watch from the last version.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from kubernetes_asyncio import watch
from kubernetes_asyncio.client.exceptions import ApiException

from daemons.reconciler.kube import Obj, call_json, key_of

log = structlog.get_logger(__name__)

# (event type ADDED/MODIFIED/DELETED, the object) -> None; must not block.
Handler = Callable[[str, Obj], None]
ListFunc = Callable[..., Awaitable[Any]]

BACKOFF_MIN = 0.2
BACKOFF_MAX = 10.0


class Informer:
    """Keeps ``cache`` equal to the API server's view of one resource and reports changes."""

    def __init__(
        self,
        kind: str,
        list_func: ListFunc,
        handler: Handler,
        *,
        label_selector: str | None = None,
        watch_timeout: float = 290.0,
        request_timeout: float = 30.0,
        on_error: Callable[[str], None] | None = None,
        transform: Callable[[Obj], Obj] | None = None,
    ) -> None:
        self.kind = kind
        # client-go's SetTransform: what the cache keeps of each object (memory on big lists).
        self._transform = transform or (lambda obj: obj)
        self._list = list_func
        self._handler = handler
        self._selector = label_selector
        self._watch_timeout = int(max(1, watch_timeout))
        self._request_timeout = request_timeout
        self._on_error = on_error or (lambda _kind: None)
        self.cache: dict[str, Obj] = {}
        self.synced = False
        self.resource_version: str | None = None

    def _kwargs(self) -> dict[str, Any]:
        return {"label_selector": self._selector} if self._selector else {}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """List and watch forever; ``task_status.started()`` after the first successful list."""
        backoff = BACKOFF_MIN
        started = False
        while True:
            try:
                if self.resource_version is None:
                    await self._relist()
                    if not started:
                        started = True
                        task_status.started()
                await self._watch_once()
                backoff = BACKOFF_MIN
            except ApiException as exc:
                if exc.status == 410:
                    log.info("watch expired, relisting", kind=self.kind)
                    self.resource_version = None
                    continue
                self._on_error("watch")
                log.warning("watch failed", kind=self.kind, status=exc.status, error=exc.reason)
            except (OSError, anyio.EndOfStream, TimeoutError, ValueError) as exc:
                self._on_error("watch")
                log.info("watch interrupted", kind=self.kind, error=f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # aiohttp's ClientError family and friends
                self._on_error("watch")
                log.warning("watch error", kind=self.kind, error=f"{type(exc).__name__}: {exc}")
            # Jitter keeps many informers from hammering a restarting API server in lockstep.
            await anyio.sleep(backoff * (0.5 + random.random()))  # noqa: S311
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _relist(self) -> None:
        body = await call_json(self._list, _request_timeout=self._request_timeout, **self._kwargs())
        # Items of a list carry no kind; fill it in so handlers can tell objects apart.
        for item in body.get("items") or []:
            item.setdefault("kind", self.kind)
        fresh = {key_of(item): self._transform(item) for item in body.get("items") or []}
        gone = [key for key in self.cache if key not in fresh]
        old = self.cache
        self.cache = fresh
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        self.synced = True
        for key in gone:
            self._emit("DELETED", old[key])
        for key, item in fresh.items():
            previous = old.get(key)
            if previous is None:
                self._emit("ADDED", item)
            elif _rv(previous) != _rv(item):
                self._emit("MODIFIED", item)

    async def _watch_once(self) -> None:
        """One watch request, until the server's timeout ends it or an error breaks it."""
        async with watch.Watch() as stream:
            events = stream.stream(
                functools.partial(self._list, **self._kwargs()),
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self._watch_timeout,
                # The client-side limit only guards against a silently dead connection.
                _request_timeout=self._watch_timeout + 30,
            )
            async for event in events:
                kind = str(event.get("type", "")).upper()
                obj = event.get("raw_object")
                # Watch tracks the version of every event, bookmarks included.
                version: Any = getattr(stream, "resource_version", None)
                if version:
                    self.resource_version = str(version)
                if kind == "BOOKMARK" or not isinstance(obj, dict):
                    continue
                obj.setdefault("kind", self.kind)
                obj = self._transform(obj)
                key = key_of(obj)
                if kind == "DELETED":
                    self.cache.pop(key, None)
                else:
                    self.cache[key] = obj
                self._emit(kind, obj)

    def _emit(self, kind: str, obj: Obj) -> None:
        try:
            self._handler(kind, obj)
        except Exception:
            log.exception("informer handler failed", kind=self.kind, key=key_of(obj))


def _rv(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")
