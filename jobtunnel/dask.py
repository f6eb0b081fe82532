"""Dask clusters whose scheduler runs in an HTCondor job, from a notebook.

Three things, all for the user's side (a JupyterLab single-user server with dask-kubernetes):

* :func:`offloaded_cluster_spec` returns the ``DaskCluster`` that
  ``KubeCluster(custom_cluster_spec=...)`` takes. It starts from dask-kubernetes' own
  ``make_cluster_spec`` (what a plain ``KubeCluster(...)`` would send) and changes only what an
  offloaded scheduler needs: the scheduler (and by default the workers) on the InterLink virtual
  node, the scheduler's command wrapped by ``jobtunnel-agent --`` with the operator's arguments
  kept, the agent's settings as environment variables, the pod identity from the downward API,
  and the user's JupyterHub token as a file from a Secret volume (mode 0400; never in the spec,
  never in the environment: InterLink's HTCondor plugin writes a container's environment into a
  world-readable file).
* :func:`ensure_token_secret` keeps a tunnel-only token in that Secret: minted through the hub's
  token API with the notebook's own token (which stays in the notebook), renewed before it
  expires (kr8s, with the notebook pod's own credentials).
* ``OffloadedKubeCluster``: a ``KubeCluster`` that builds the spec from its keyword arguments and
  the ``jobtunnel.*`` keys of the Dask configuration, so that dask-labextension's factory (which
  calls the class with no arguments) makes offloaded clusters.

Nothing here imports the daemons, and Dask, dask-kubernetes and kr8s are imported only when
used: ``import jobtunnel.dask`` works anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import copy
import datetime
import getpass
import os
import re
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: ``OffloadedKubeCluster`` too, made on first access (see ``__getattr__`` at the end).
__all__ = [
    "DEFAULT_NODE_SELECTOR",
    "DEFAULT_TOLERATIONS",
    "async_ensure_token_secret",
    "ensure_token_secret",
    "offloaded_cluster_spec",
    "spec_from_config",
]

#: Node labels of InterLink's virtual node, as InterLink's virtual kubelet registers it. A site
#: with several virtual nodes (pools) selects one, e.g. ``{"kubernetes.io/hostname": "<node>"}``.
DEFAULT_NODE_SELECTOR: Mapping[str, str] = {"virtual-node.interlink/type": "virtual-kubelet"}
#: The taint InterLink puts on its virtual node.
DEFAULT_TOLERATIONS: Sequence[Mapping[str, str]] = (
    {"key": "virtual-node.interlink/no-schedule", "operator": "Exists", "effect": "NoSchedule"},
)
DEFAULT_SERVICES = "scheduler=8786,dashboard=8787"
DEFAULT_TOKEN_SECRET = "jobtunnel-token"  # noqa: S105  (names, not secrets)
#: The Secret key holding the token, and where the Secret volume is mounted.
TOKEN_KEY = "token"  # noqa: S105  (names, not secrets)
#: The hub scopes of a job's token: open this user's tunnels, nothing else.
TUNNEL_SCOPES = ("custom:jobtunnel:connect!user",)
#: A minted token's lifetime, and how much of it a new cluster's job gets at least.
TOKEN_LIFETIME = 7 * 24 * 3600.0
TOKEN_RENEW_BEFORE = 24 * 3600.0
#: Annotations on the Secret: which hub token it holds, and until when (Unix seconds).
TOKEN_ID_KEY = "jobtunnel.io/token-id"  # noqa: S105  (names, not secrets)
TOKEN_EXPIRES_KEY = "jobtunnel.io/token-expires-at"  # noqa: S105  (names, not secrets)
TOKEN_MOUNT_PATH = "/var/run/jobtunnel"  # noqa: S105  (names, not secrets)
TOKEN_VOLUME = "jobtunnel-token"  # noqa: S105  (names, not secrets)
#: Where KubeSpawner and the reconciler look for the hub user name.
USER_KEY = "hub.jupyter.org/username"

#: Read-only for the file's owner: in the HTCondor job, the job's user.
TOKEN_FILE_MODE = 0o400
#: A pod's own namespace, as Kubernetes mounts it with the service account token.
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

#: Variables that would carry a token in the container environment: refused (see module doc).
_TOKEN_VARIABLES = frozenset({"JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "JOBTUNNEL_TOKEN"})
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}=?")
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_POD_FIELDS = (
    ("JOBTUNNEL_POD_NAMESPACE", "metadata.namespace"),
    ("JOBTUNNEL_POD_NAME", "metadata.name"),
    ("JOBTUNNEL_POD_UID", "metadata.uid"),
)


# -- the spec -----------------------------------------------------------------------------------


def offloaded_cluster_spec(
    name: str,
    *,
    image: str,
    forwarder: str,
    host_key_fingerprint: str,
    n_workers: int = 1,
    resources: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | Sequence[Mapping[str, Any]] | None = None,
    user: str | None = None,
    token_secret: str = DEFAULT_TOKEN_SECRET,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] | None = None,
    workers_on_virtual_node: bool = True,
    scheduler_services: str = DEFAULT_SERVICES,
    agent_command: str = "jobtunnel-agent",
    worker_command: str | Sequence[str] = "dask-worker",
    idle_timeout: int | None = 0,
    scheduler_service_type: str = "ClusterIP",
    jupyter: bool = False,
) -> dict[str, Any]:
    """A ``DaskCluster`` whose scheduler runs under ``jobtunnel-agent`` on InterLink.

    ``image`` must contain ``jobtunnel-agent`` and the same Dask version as the notebook.
    ``forwarder`` is the forwarder's ``host:port`` (its NodePort), ``host_key_fingerprint`` its
    SSH host key (``SHA256:...``), both from your platform's documentation. ``user`` defaults to
    ``$JUPYTERHUB_USER``; ``token_secret`` names a Secret in the cluster's namespace whose key
    ``token`` holds your JupyterHub API token (see :func:`ensure_token_secret`).
    ``node_selector``/``tolerations`` default to :data:`DEFAULT_NODE_SELECTOR` /
    :data:`DEFAULT_TOLERATIONS`. The remaining arguments are ``make_cluster_spec``'s.
    """
    from dask_kubernetes.operator import make_cluster_spec

    user = _user(user)
    _check_forwarder(forwarder)
    _check_fingerprint(host_key_fingerprint)
    _check_services(scheduler_services)
    if not agent_command:
        raise ValueError("agent_command: must not be empty")
    if not token_secret:
        raise ValueError("token_secret: must name a Secret")
    selector = dict(DEFAULT_NODE_SELECTOR if node_selector is None else node_selector)
    tols = [dict(t) for t in (DEFAULT_TOLERATIONS if tolerations is None else tolerations)]
    if not workers_on_virtual_node:
        warnings.warn(
            "workers_on_virtual_node=False: the jobtunnel reconciler points every worker of the "
            "cluster at the scheduler's private IP in the HTCondor pool, which in-cluster "
            "workers cannot reach",
            stacklevel=2,
        )

    spec: dict[str, Any] = make_cluster_spec(
        name=name,
        image=image,
        n_workers=n_workers,
        resources=dict(resources) if resources is not None else None,
        env=_env_arg(env),
        worker_command=(
            worker_command if isinstance(worker_command, str) else list(worker_command)
        ),
        scheduler_service_type=scheduler_service_type,
        idle_timeout=idle_timeout,
        jupyter=jupyter,
    )
    # The operator copies the DaskCluster's labels and annotations onto its pods: the
    # reconciler checks them (and the scheduler Deployment's template) against the
    # authenticated user. Label values can't hold every hub name; annotations can.
    metadata = spec.setdefault("metadata", {})
    metadata.setdefault("annotations", {})[USER_KEY] = user
    if re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", user):
        metadata.setdefault("labels", {})[USER_KEY] = user
    for part in ("scheduler", "worker"):
        for container in spec["spec"][part]["spec"]["containers"]:
            for item in container.get("env") or []:
                if item.get("name") in _TOKEN_VARIABLES:
                    raise ValueError(
                        f"env: {item['name']} must not be set: InterLink writes the container "
                        "environment to a world-readable file; the token travels as a Secret "
                        "volume (token_secret)"
                    )

    scheduler_pod = spec["spec"]["scheduler"]["spec"]
    _place(scheduler_pod, selector, tols)
    container = _scheduler_container(scheduler_pod)
    original_command = list(container.get("command") or [])
    if original_command[:2] != [agent_command, "--"]:
        # Kubernetes runs ``command + args`` (``command`` replacing the image's ENTRYPOINT):
        # ``jobtunnel-agent -- dask-scheduler --host 0.0.0.0 ...`` with the operator's args.
        container["command"] = [agent_command, "--", *original_command]
    token_file = f"{TOKEN_MOUNT_PATH}/{TOKEN_KEY}"
    ours: list[dict[str, Any]] = [
        {"name": "JOBTUNNEL_FORWARDER", "value": forwarder},
        {"name": "JOBTUNNEL_USER", "value": user},
        {"name": "JOBTUNNEL_HOST_KEY_FINGERPRINT", "value": host_key_fingerprint},
        {"name": "JOBTUNNEL_SERVICES", "value": scheduler_services},
        {"name": "JOBTUNNEL_TOKEN_FILE", "value": token_file},
        *(
            {"name": var, "valueFrom": {"fieldRef": {"fieldPath": path}}}
            for var, path in _POD_FIELDS
        ),
    ]
    names = {item["name"] for item in ours}
    container["env"] = [
        item for item in container.get("env") or [] if item.get("name") not in names
    ] + ours
    container["volumeMounts"] = [
        *(m for m in container.get("volumeMounts") or [] if m.get("name") != TOKEN_VOLUME),
        {"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT_PATH, "readOnly": True},
    ]
    scheduler_pod["volumes"] = [
        *(v for v in scheduler_pod.get("volumes") or [] if v.get("name") != TOKEN_VOLUME),
        {
            "name": TOKEN_VOLUME,
            "secret": {"secretName": token_secret, "defaultMode": TOKEN_FILE_MODE},
        },
    ]
    if workers_on_virtual_node:
        _place(spec["spec"]["worker"]["spec"], selector, tols)
    return spec


def _env_arg(
    env: Mapping[str, str] | Sequence[Mapping[str, Any]] | None,
) -> dict[str, str] | list[dict[str, Any]] | None:
    if env is None:
        return None
    if isinstance(env, Mapping):
        return {str(k): str(v) for k, v in env.items()}
    return [dict(item) for item in env]


def _place(pod_spec: dict[str, Any], selector: dict[str, str], tols: list[dict[str, Any]]) -> None:
    pod_spec["nodeSelector"] = {**(pod_spec.get("nodeSelector") or {}), **selector}
    existing = list(pod_spec.get("tolerations") or [])
    pod_spec["tolerations"] = existing + [copy.deepcopy(t) for t in tols if t not in existing]


def _scheduler_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec["containers"]
    for container in containers:
        if container.get("name") == "scheduler":
            return container
    return containers[0]


def _user(user: str | None) -> str:
    user = user or os.environ.get("JUPYTERHUB_USER")
    if not user:
        raise ValueError(
            "user: not given and $JUPYTERHUB_USER is not set (the JupyterHub user whose token "
            "the scheduler job presents)"
        )
    return user


def _check_forwarder(forwarder: str) -> None:
    host, sep, port = forwarder.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"forwarder: expected host:port, e.g. forwarder.example.org:31022, got {forwarder!r}"
        )


def _check_fingerprint(fingerprint: str) -> None:
    if not _FINGERPRINT.fullmatch(fingerprint or ""):
        raise ValueError(
            "host_key_fingerprint: expected an OpenSSH fingerprint 'SHA256:<43 base64 chars>', "
            f"got {fingerprint!r}"
        )


def _check_services(services: str) -> None:
    items = [i.strip() for i in services.split(",") if i.strip()]
    for item in items:
        name, sep, port = item.partition("=")
        if not sep or not _SERVICE.fullmatch(name.strip()) or not port.strip().isdigit():
            raise ValueError(
                f"scheduler_services: expected NAME=PORT items, e.g. {DEFAULT_SERVICES}, "
                f"got {services!r}"
            )
    if not items:
        raise ValueError(f"scheduler_services: empty, e.g. {DEFAULT_SERVICES}")


# -- the Dask configuration ---------------------------------------------------------------------


def _config(key: str, value: Any = None, default: Any = None) -> Any:
    """``value`` if given, else the Dask config key, else ``default``."""
    if value is not None:
        return value
    import dask.config

    found = dask.config.get(key, default=None)
    return default if found is None else found


def spec_from_config(
    *,
    name: str | None = None,
    image: str | None = None,
    n_workers: int | None = None,
    resources: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | Sequence[Mapping[str, Any]] | None = None,
    forwarder: str | None = None,
    host_key_fingerprint: str | None = None,
    user: str | None = None,
    token_secret: str | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] | None = None,
    workers_on_virtual_node: bool | None = None,
    scheduler_services: str | None = None,
    agent_command: str | None = None,
    worker_command: str | Sequence[str] | None = None,
    idle_timeout: int | None = None,
    scheduler_service_type: str | None = None,
    jupyter: bool | None = None,
) -> dict[str, Any]:
    """:func:`offloaded_cluster_spec` with every argument not given read from the Dask config.

    ``jobtunnel.*`` keys for jobtunnel's own settings (``jobtunnel.forwarder``,
    ``jobtunnel.host-key-fingerprint``, ``jobtunnel.image``, ``jobtunnel.user``,
    ``jobtunnel.token-secret``, ``jobtunnel.node-selector``, ``jobtunnel.tolerations``,
    ``jobtunnel.workers-on-virtual-node``, ``jobtunnel.services``, ``jobtunnel.agent-command``),
    and dask-kubernetes' own ``kubernetes.*`` keys for the rest, as ``KubeCluster`` reads them
    (``kubernetes.name``, ``kubernetes.image`` when ``jobtunnel.image`` is unset,
    ``kubernetes.count.start``, ``kubernetes.resources``, ``kubernetes.env``, ...). The name is
    formatted the way ``KubeCluster`` formats it (``{user}``, ``{uuid}``, environment variables).
    """
    import dask_kubernetes  # noqa: F401  (registers the kubernetes.* config defaults)
    from dask_kubernetes.operator.validation import validate_cluster_name

    forwarder = _config("jobtunnel.forwarder", forwarder)
    fingerprint = _config("jobtunnel.host-key-fingerprint", host_key_fingerprint)
    for key, found in (("forwarder", forwarder), ("host-key-fingerprint", fingerprint)):
        if not found:
            env_name = "DASK_JOBTUNNEL__" + key.upper().replace("-", "_")
            raise ValueError(
                f"jobtunnel.{key} is not set: give it as an argument, in the Dask config "
                f"(/etc/dask/jobtunnel.yaml) or as ${env_name}"
            )
    cluster_name = str(_config("kubernetes.name", name, "dask-{user}-{uuid}"))
    cluster_name = cluster_name.format(
        user=getpass.getuser(), uuid=str(uuid.uuid4())[:10], **os.environ
    )
    validate_cluster_name(cluster_name)
    return offloaded_cluster_spec(
        cluster_name,
        image=str(_config("jobtunnel.image", image) or _config("kubernetes.image", None, "")),
        forwarder=str(forwarder),
        host_key_fingerprint=str(fingerprint),
        n_workers=int(_config("kubernetes.count.start", n_workers, 0)),
        resources=_config("kubernetes.resources", resources) or None,
        env=_config("kubernetes.env", env) or None,
        user=_config("jobtunnel.user", user),
        token_secret=str(_config("jobtunnel.token-secret", token_secret, DEFAULT_TOKEN_SECRET)),
        node_selector=_config("jobtunnel.node-selector", node_selector),
        tolerations=_config("jobtunnel.tolerations", tolerations),
        workers_on_virtual_node=bool(
            _config("jobtunnel.workers-on-virtual-node", workers_on_virtual_node, True)
        ),
        scheduler_services=str(_config("jobtunnel.services", scheduler_services, DEFAULT_SERVICES)),
        agent_command=str(_config("jobtunnel.agent-command", agent_command, "jobtunnel-agent")),
        worker_command=_config("kubernetes.worker-command", worker_command, "dask-worker"),
        idle_timeout=_config("kubernetes.idle-timeout", idle_timeout, 0),
        scheduler_service_type=str(
            _config("kubernetes.scheduler-service-type", scheduler_service_type, "ClusterIP")
        ),
        jupyter=bool(_config("kubernetes.scheduler-jupyter", jupyter, False)),
    )


# -- the token Secret ---------------------------------------------------------------------------


def own_namespace() -> str | None:
    """The namespace of the pod this runs in (None outside a pod)."""
    try:
        return NAMESPACE_FILE.read_text().strip() or None
    except OSError:
        return None


async def async_ensure_token_secret(
    namespace: str | None = None,
    name: str = DEFAULT_TOKEN_SECRET,
    *,
    token: str | None = None,
    api: Any = None,
    hub_api_url: str | None = None,
    user: str | None = None,
    lifetime: float = TOKEN_LIFETIME,
    renew_before: float = TOKEN_RENEW_BEFORE,
    now: float | None = None,
) -> str:
    """Keep a tunnel-only token for your jobs in Secret ``name`` (key ``token``).

    A job's token is exposed to everything that runs in the job, so it is worth almost
    nothing: a token with only the hub scope ``custom:jobtunnel:connect!user`` (what the
    forwarder requires by default), minted here with the notebook's own
    ``$JUPYTERHUB_API_TOKEN`` through the hub's token API and valid for ``lifetime``
    seconds. The Secret's token is kept while it has more than ``renew_before`` seconds
    left (its expiry and hub id ride on the Secret as annotations); otherwise a new one is
    minted, stored, and the previous one revoked. Run at every cluster start
    (``OffloadedKubeCluster`` does), so a new cluster's job gets at least ``renew_before``.

    ``token`` stores a token of the site's own making instead, as it is. ``hub_api_url`` and
    ``user`` default to ``$JUPYTERHUB_API_URL`` and ``$JUPYTERHUB_USER``; ``namespace`` to
    this pod's own, else the kr8s API's; ``api`` to ``kr8s.asyncio.api()``. RBAC: see
    ``configs/jupyterhub/rbac.yaml``; the hub's roles: ``configs/jupyterhub/jupyterhub_config.py``.
    Returns the namespace used. No token is ever logged, returned or put in an exception.
    """
    import kr8s
    import kr8s.asyncio
    from kr8s.asyncio.objects import Secret

    if api is None:
        api = await kr8s.asyncio.api()
    namespace = namespace or own_namespace() or str(api.namespace)
    now = time.time() if now is None else now
    annotations: dict[str, str | None] = {TOKEN_ID_KEY: None, TOKEN_EXPIRES_KEY: None}
    previous_id: str | None = None
    hub: _Hub | None = None
    if token is None:
        hub = _Hub.from_environment(hub_api_url, user)
        current = await _read_secret(Secret, api, namespace, name)
        if _still_valid(current, now + renew_before):
            return namespace
        previous_id = (current or {}).get(TOKEN_ID_KEY)
        token, token_id, expires_at = await hub.mint(lifetime)
        annotations = {TOKEN_ID_KEY: token_id, TOKEN_EXPIRES_KEY: str(int(expires_at))}
    data = {TOKEN_KEY: base64.b64encode(token.encode()).decode()}
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "jobtunnel"},
            "annotations": {k: v for k, v in annotations.items() if v is not None},
        },
        "type": "Opaque",
        "data": data,
    }
    secret = await Secret(body, namespace=namespace, api=api)
    try:
        await secret.create()
    except kr8s.ServerError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status != 409:
            raise _secret_error(exc, status, namespace, name, "create") from None
        try:
            # A merge patch: None removes an annotation a minted token left behind.
            await secret.patch({"data": data, "metadata": {"annotations": annotations}})
        except kr8s.ServerError as patch_exc:
            status = patch_exc.response.status_code if patch_exc.response is not None else None
            raise _secret_error(patch_exc, status, namespace, name, "patch") from None
    if hub is not None and previous_id and previous_id != annotations[TOKEN_ID_KEY]:
        await hub.revoke(previous_id)
    return namespace


async def _read_secret(
    secret_cls: Any, api: Any, namespace: str, name: str
) -> dict[str, str] | None:
    """The Secret's jobtunnel annotations, or None when it does not exist yet."""
    import kr8s

    # A GET by name (refresh), which RBAC can grant for this one Secret; kr8s' get() lists.
    secret = await secret_cls({"metadata": {"name": name}}, namespace=namespace, api=api)
    try:
        await secret.refresh()
    except kr8s.NotFoundError:
        return None
    except kr8s.ServerError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 404:
            return None
        raise _secret_error(exc, status, namespace, name, "read") from None
    meta = secret.raw.get("metadata", {})
    has_token = bool(secret.raw.get("data", {}).get(TOKEN_KEY))
    found = {
        k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("jobtunnel.io/")
    }
    return found if has_token else {}


def _still_valid(annotations: Mapping[str, str] | None, needed_until: float) -> bool:
    try:
        return float((annotations or {})[TOKEN_EXPIRES_KEY]) > needed_until
    except (KeyError, ValueError):
        return False


class _Hub:
    """The hub's token API, with the notebook's own token (which never leaves the notebook)."""

    def __init__(self, api_url: str, user: str, token: str) -> None:
        self.api_url = api_url.rstrip("/")
        self.user = user
        self._token = token

    @classmethod
    def from_environment(cls, api_url: str | None, user: str | None) -> _Hub:
        api_url = api_url or os.environ.get("JUPYTERHUB_API_URL")
        user = user or os.environ.get("JUPYTERHUB_USER")
        token = os.environ.get("JUPYTERHUB_API_TOKEN")
        if not api_url or not user or not token:
            missing = [
                what
                for what, value in (
                    ("$JUPYTERHUB_API_URL (hub_api_url)", api_url),
                    ("$JUPYTERHUB_USER (user)", user),
                    ("$JUPYTERHUB_API_TOKEN", token),
                )
                if not value
            ]
            raise ValueError(
                f"cannot mint a token for your jobs: {', '.join(missing)} not set "
                "(run this in a JupyterHub single-user server, or pass token=)"
            )
        return cls(api_url, user, token)

    async def mint(self, lifetime: float) -> tuple[str, str, float]:
        """A new tunnel-only token: (token, its hub id, expiry as a Unix time)."""
        body = {
            "scopes": list(TUNNEL_SCOPES),
            "expires_in": int(lifetime),
            "note": "jobtunnel: offloaded Dask schedulers (tunnels only)",
        }
        status, answer = await asyncio.to_thread(
            self._request, "POST", f"/users/{self.user}/tokens", body
        )
        if status != 201 or not isinstance(answer, dict) or "token" not in answer:
            raise PermissionError(
                f"the hub refused to mint a tunnel token for {self.user!r} (HTTP {status}): "
                "the hub must define custom:jobtunnel:connect, give it to users, and let "
                "single-user servers create tokens (configs/jupyterhub/jupyterhub_config.py)"
            )
        expires = answer.get("expires_at")
        expires_at = (
            datetime.datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp()
            if isinstance(expires, str)
            else time.time() + lifetime
        )
        return str(answer["token"]), str(answer["id"]), expires_at

    async def revoke(self, token_id: str) -> None:
        """Best effort: the old token dies by its expiry anyway."""
        status, _ = await asyncio.to_thread(
            self._request, "DELETE", f"/users/{self.user}/tokens/{token_id}", None
        )
        if status not in (204, 404):
            warnings.warn(
                f"jobtunnel: could not revoke the previous job token {token_id} "
                f"(HTTP {status}); it expires by itself",
                RuntimeWarning,
                stacklevel=2,
            )

    def _request(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        import json
        import urllib.error
        import urllib.request

        request = urllib.request.Request(  # noqa: S310 - the hub's own API URL
            self.api_url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"token {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
                raw = resp.read()
                return int(resp.status), json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return int(exc.code), None
        except (OSError, ValueError) as exc:
            raise ConnectionError(f"JupyterHub API {self.api_url} unreachable: {exc}") from None


def _secret_error(
    exc: Exception, status: int | None, namespace: str, name: str, verb: str
) -> Exception:
    if status == 403:
        return PermissionError(
            f"not allowed to {verb} Secret {namespace}/{name}: the notebook's service account "
            "needs the Role in configs/jupyterhub/rbac.yaml (create on secrets, get and patch "
            f"on {name}), or your administrator creates the Secret for you"
        )
    return RuntimeError(f"could not {verb} Secret {namespace}/{name}: HTTP {status}: {exc}")


def ensure_token_secret(
    namespace: str | None = None,
    name: str = DEFAULT_TOKEN_SECRET,
    *,
    token: str | None = None,
    kubeconfig: str | None = None,
    **kwargs: Any,
) -> str:
    """Blocking :func:`async_ensure_token_secret`; works in a notebook (whose loop is running).

    ``kubeconfig`` is for use outside a pod; ``kwargs`` go to :func:`async_ensure_token_secret`
    (``hub_api_url``, ``user``, ``lifetime``, ``renew_before``). Returns the namespace used.
    """

    async def run() -> str:
        api = None
        if kubeconfig is not None:
            import kr8s.asyncio

            api = await kr8s.asyncio.api(kubeconfig=kubeconfig)
        return await async_ensure_token_secret(namespace, name, token=token, api=api, **kwargs)

    # A fresh thread and loop: a notebook's own loop is already running in this thread.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jobtunnel") as pool:
        return pool.submit(asyncio.run, run()).result()


# -- the KubeCluster ----------------------------------------------------------------------------

#: Keyword arguments of OffloadedKubeCluster that go to the spec (the rest go to KubeCluster).
_SPEC_ARGUMENTS = frozenset(
    {
        "name",
        "image",
        "n_workers",
        "resources",
        "env",
        "forwarder",
        "host_key_fingerprint",
        "user",
        "token_secret",
        "node_selector",
        "tolerations",
        "workers_on_virtual_node",
        "scheduler_services",
        "agent_command",
        "worker_command",
        "idle_timeout",
        "scheduler_service_type",
        "jupyter",
    }
)

_cluster_class: type | None = None


def _make_cluster_class() -> type:
    from dask_kubernetes.operator import KubeCluster

    class OffloadedKubeCluster(KubeCluster):  # type: ignore[misc]
        """``KubeCluster`` with the scheduler offloaded through jobtunnel.

        Takes :func:`spec_from_config`'s keyword arguments (missing ones come from the Dask
        config, so it works with no arguments at all, as dask-labextension calls it) and
        ``KubeCluster``'s others (``namespace``, ``shutdown_on_close``, ``asynchronous``...).
        With ``create_token_secret`` (default: ``jobtunnel.create-token-secret``, true) it runs
        :func:`async_ensure_token_secret` before creating the cluster.
        """

        def __init__(self, *, create_token_secret: bool | None = None, **kwargs: Any) -> None:
            if kwargs.get("custom_cluster_spec") is not None:
                raise TypeError("OffloadedKubeCluster builds its own spec: use KubeCluster")
            spec_args = {k: kwargs.pop(k) for k in list(kwargs) if k in _SPEC_ARGUMENTS}
            self.offloaded_spec = spec_from_config(**spec_args)
            self.token_secret = self.offloaded_spec["spec"]["scheduler"]["spec"]["volumes"][-1][
                "secret"
            ]["secretName"]
            self.create_token_secret = bool(
                _config("jobtunnel.create-token-secret", create_token_secret, True)
            )
            if kwargs.get("namespace") is None:
                kwargs["namespace"] = _config("kubernetes.namespace") or own_namespace()
            super().__init__(custom_cluster_spec=self.offloaded_spec, **kwargs)

        async def _start(self) -> None:
            if self.create_token_secret:
                import kr8s.asyncio

                namespace: str | None = getattr(self, "namespace", None)
                if not namespace:  # what KubeCluster._start would pick, picked first
                    namespace = self.namespace = (await kr8s.asyncio.api()).namespace
                await async_ensure_token_secret(namespace, self.token_secret)
            await super()._start()

    OffloadedKubeCluster.__module__ = __name__
    return OffloadedKubeCluster


def __getattr__(name: str) -> Any:
    # PEP 562: the class exists once asked for (dask-labextension does getattr(module, class)),
    # so importing this module does not import dask-kubernetes.
    global _cluster_class
    if name == "OffloadedKubeCluster":
        if _cluster_class is None:
            _cluster_class = _make_cluster_class()
        return _cluster_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
