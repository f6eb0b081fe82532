"""The reconciler's settings: every option a TOML key and an environment variable.

The names the interface fixes (``KUBECONFIG``, ``JOBTUNNEL_HTTP``, ``JOBTUNNEL_NAMESPACE``,
``JOBTUNNEL_VIRTUAL_NODE``, ``JOBTUNNEL_USER_NAMESPACE``) are read exactly so; the rest follow
the ``JOBTUNNEL_<KEY>`` rule of :mod:`shared.config`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shared import config as c


def _namespace_pattern(raw: object) -> str:
    """A namespace template with at most one ``{user}`` field (empty: no namespace rule)."""
    text = c.string(raw)
    if not text:
        return ""
    fields = re.findall(r"{([^{}]*)}", text)
    if any(f != "user" for f in fields):
        raise ValueError(
            f"expected a pattern using only {{user}}, e.g. jupyter-{{user}}, got {text!r}"
        )
    if not re.fullmatch(r"[a-z0-9-]*({user})?[a-z0-9-]*", text):
        raise ValueError(f"expected lowercase letters, digits, '-' and one {{user}}, got {text!r}")
    return text


def _label_selector(raw: object) -> dict[str, str]:
    """``key=value,key2=value2`` (or a TOML table) -> a dict of required node labels."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    result: dict[str, str] = {}
    for item in c.string(raw).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE items, got {item!r}")
        result[key.strip()] = value.strip()
    return result


def _optional_name(raw: object) -> str | None:
    return c.optional_string(raw)


@dataclass(frozen=True, slots=True)
class ReconcilerSettings:
    #: Path of a kubeconfig; unset means the in-cluster service account.
    kubeconfig: Path | None = c.option(c.optional_path, None, env="KUBECONFIG")
    http: c.HostPort = c.option(c.listen_address, c.HostPort("0.0.0.0", 8080))
    #: Where the Tunnels (and the forwarder pods) live, and the leader Lease.
    namespace: str = c.option(c.string, "jobtunnel")
    #: Node name the claimed scheduler pod must be bound to (InterLink's virtual node).
    virtual_node: str | None = c.option(_optional_name, None)
    #: Alternatively (or also): labels the pod's node must carry, e.g. type=virtual-kubelet.
    virtual_node_selector: dict[str, str] = c.option(_label_selector, {})
    #: Which namespace a user's pods live in ("" disables the namespace rule).
    user_namespace: str = c.option(_namespace_pattern, "jupyter-{user}")
    #: A pod label and/or annotation naming the owning hub user ("" disables each rule).
    user_label: str = c.option(c.string, "")
    user_annotation: str = c.option(c.string, "")
    #: How {user} is escaped: KubeSpawner >= 7 "safe" slugs, or the legacy "escape" scheme.
    user_slug_scheme: str = c.option(c.choice("safe", "escape"), "safe")
    #: Accept only a pod the Dask operator made for its cluster: pod -> ReplicaSet -> Deployment
    #: ``<cluster>-scheduler`` -> DaskCluster ``<cluster>`` (controller owner references, UIDs
    #: checked), and the user rule applied to the Deployment's pod template and the DaskCluster.
    #: Needs ``get`` on replicasets. Turn off only where users cannot create pods.
    require_owner_chain: bool = c.option(c.boolean, True)
    #: Pods that may reach every tunnel besides the owner's own: the Dask operator talks to
    #: schedulers to scale them. Its labels *in its namespace* (labels alone anyone can copy);
    #: an empty namespace or selector admits none.
    operator_pod_selector: dict[str, str] = c.option(
        _label_selector, {"app.kubernetes.io/name": "dask-kubernetes-operator"}
    )
    operator_namespace: str = c.option(c.string, "dask-operator")
    #: CIDRs that may reach every tunnel (e.g. a monitoring network); none by default.
    extra_allowed_sources: tuple[str, ...] = c.option(c.cidr_list, ())
    #: One NetworkPolicy per Tunnel in ``namespace`` (:mod:`.policy`), the allow-list again at
    #: the network layer where the CNI enforces it. Needs networkpolicies rights there.
    network_policies: bool = c.option(c.boolean, True)
    #: Full re-enqueue of every Tunnel plus the orphan sweep, in seconds.
    resync_interval: float = c.option(c.positive_float, 300.0)
    #: Server-side timeout of one watch request; the watch resumes from its resourceVersion.
    watch_timeout: float = c.option(c.positive_float, 290.0)
    #: Reconciles run concurrently (never two of one Tunnel).
    workers: int = c.option(c.positive_int, 8)
    lease_name: str = c.option(c.string, "jobtunnel-reconciler")
    lease_duration: float = c.option(c.positive_float, 15.0)
    lease_renew_deadline: float = c.option(c.positive_float, 10.0)
    lease_retry_period: float = c.option(c.positive_float, 2.0)
    #: Identity in the Lease; defaults to the pod name (HOSTNAME) plus a random suffix.
    identity: str | None = c.option(_optional_name, None)
    htcondor_collector: str | None = c.option(c.optional_string, None)
    htcondor_token_file: Path | None = c.option(c.optional_path, None)
    htcondor_scitoken_file: Path | None = c.option(c.optional_path, None)
    job_poll_interval: float = c.option(c.positive_float, 30.0)
    job_query_timeout: float = c.option(c.positive_float, 30.0)
    #: Time allowed for each Kubernetes API request.
    request_timeout: float = c.option(c.positive_float, 30.0)
    log_level: str = c.option(c.choice("debug", "info", "warning", "error"), "info")

    def check(self) -> None:
        """Cross-field rules, reported with the same one-line errors as single values."""
        if not self.user_namespace and not self.user_label and not self.user_annotation:
            raise c.ConfigError(
                "JOBTUNNEL_USER_NAMESPACE (user_namespace): no user rule left; set it, "
                "JOBTUNNEL_USER_LABEL or JOBTUNNEL_USER_ANNOTATION"
            )
        if self.virtual_node is None and not self.virtual_node_selector:
            raise c.ConfigError(
                "JOBTUNNEL_VIRTUAL_NODE (virtual_node) is required unless "
                "JOBTUNNEL_VIRTUAL_NODE_SELECTOR is set"
            )
        if not self.lease_retry_period < self.lease_renew_deadline < self.lease_duration:
            raise c.ConfigError(
                "JOBTUNNEL_LEASE_RENEW_DEADLINE (lease_renew_deadline): expected "
                "lease_retry_period < lease_renew_deadline < lease_duration"
            )
        if self.htcondor_collector is None and (
            self.htcondor_token_file is not None or self.htcondor_scitoken_file is not None
        ):
            raise c.ConfigError(
                "JOBTUNNEL_HTCONDOR_COLLECTOR (htcondor_collector) is required when a "
                "token file is given"
            )
