"""Step 1: check a Tunnel's claims against Kubernetes before anything is routed (invariant 1).

The only fact in a Tunnel the reconciler trusts is ``spec.user`` (the forwarder wrote it from
authentication). Everything else came from the agent: the pod it claims to be, its private IP.
A claim is accepted only when the pod

* exists under that namespace/name **with that UID** (a replaced pod is a different pod);
* belongs to the authenticated user, by the configured rules (all configured rules must hold):
  its namespace is the user's namespace (``JOBTUNNEL_USER_NAMESPACE`` with ``{user}`` replaced by
  the user name escaped the way KubeSpawner escapes it), and/or a pod label / annotation names
  the user;
* is bound to the InterLink virtual node (by node name and/or node labels);
* is a Dask scheduler pod: it carries ``dask.org/cluster-name`` (which cluster to route) and
  ``dask.org/component=scheduler`` (so a worker pod cannot steal its cluster's Service);
* (``require_owner_chain``, on by default) is the pod the Dask operator made for that cluster:
  see :func:`verify_owner_chain`.

Why the owner chain: labels are whatever the pod's creator wrote. In a namespace shared by
several users (Zero-to-JupyterHub's default), anyone allowed to create pods could create one on
the virtual node carrying *another* cluster's ``dask.org/cluster-name`` and their own user
label, claim it, and have the victim's Service routed to their own job. The pod the operator
made is instead controlled (``ownerReferences``, ``controller: true``) by a ReplicaSet, which is
controlled by the Deployment ``<cluster>-scheduler``, which the operator creates with
``kopf.adopt`` and so is controlled by the DaskCluster ``<cluster>`` (kind ``DaskCluster``,
``kubernetes.dask.org/v1``): every link is checked by name *and* UID against the live objects.
The user rule is then also applied to the objects a pod creator cannot write: the Deployment's
pod template (the operator copies the DaskCluster's labels and annotations into it) must name
the user, and so must the DaskCluster itself when it carries the label/annotation.

Limit (documented): ``ownerReferences`` are not authenticated by Kubernetes; a pod creator can
write a reference to someone else's ReplicaSet. Such a pod still fails the user check against
the victim's Deployment template / DaskCluster, which only the operator (and whoever may patch
DaskClusters or Deployments) writes, so the check holds as long as users cannot patch each
other's DaskClusters or Deployments.

User name escaping (documented choice): KubeSpawner >= 7 defaults to the "safe" slug scheme:
a name that is already a valid DNS label (lowercase letters, digits, '-', starts with a letter,
at most 63 characters, no '--') is used as is; anything else becomes
``<stripped name>---<first 8 hex of sha256(name)>``. The legacy scheme (KubeSpawner < 7,
``slug_scheme="escape"``) escapes every character outside ``[a-z0-9]`` as ``-XX`` (hex of each
UTF-8 byte) and lower-cases the result. ``JOBTUNNEL_USER_SLUG_SCHEME`` picks one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from daemons.reconciler.kube import (
    CLUSTER_LABEL,
    COMPONENT_LABEL,
    DASK_GROUP,
    DASK_VERSION,
    Obj,
    annotations_of,
    labels_of,
)

_VALID_OBJECT = re.compile(r"[a-z][a-z0-9-]{0,62}")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def _extract_safe_name(name: str, max_length: int) -> str:
    safe = _NON_ALNUM.sub("-", name.lower())
    safe = safe.lstrip("-")[:max_length].rstrip("-")
    if safe and not safe[0].isalpha():
        safe = "x-" + safe[: max_length - 2]
    return safe or "x"


def safe_slug(name: str, max_length: int = 32) -> str:
    """KubeSpawner's ``safe_slug`` (slugs.py): valid names unchanged, others stripped + hashed."""
    if "--" not in name and _VALID_OBJECT.fullmatch(name) and name[-1].isalnum():
        return name
    digest = hashlib.sha256(name.encode("utf8")).hexdigest()[:8]
    return f"{_extract_safe_name(name, max_length - 11)}---{digest}"


def escape_slug(name: str) -> str:
    """KubeSpawner's legacy ``escapism.escape(name, safe=[a-z0-9], escape_char='-').lower()``."""
    out = []
    for char in name:
        if char in "abcdefghijklmnopqrstuvwxyz0123456789":
            out.append(char)
        else:
            out.extend(f"-{byte:02X}" for byte in char.encode("utf8"))
    return "".join(out).lower()


def user_slug(user: str, scheme: str) -> str:
    return escape_slug(user) if scheme == "escape" else safe_slug(user)


@dataclass(frozen=True)
class UserRules:
    namespace_pattern: str = "jupyter-{user}"
    label: str = ""
    annotation: str = ""
    slug_scheme: str = "safe"

    def label_names(self, value: object, user: str) -> bool:
        """Label values can't hold every hub name ('a@b.org'): KubeSpawner writes the slug."""
        return value in (user, user_slug(user, self.slug_scheme))

    def expected_namespace(self, user: str) -> str | None:
        if not self.namespace_pattern:
            return None
        return self.namespace_pattern.replace("{user}", user_slug(user, self.slug_scheme))

    def owns(self, pod: Obj, user: str) -> bool:
        """Whether every configured rule names ``user`` as ``pod``'s owner (as :func:`verify`)."""
        expected_ns = self.expected_namespace(user)
        if expected_ns is not None and (pod.get("metadata") or {}).get("namespace") != expected_ns:
            return False
        if self.label and not self.label_names(labels_of(pod).get(self.label), user):
            return False
        return not self.annotation or annotations_of(pod).get(self.annotation) == user


@dataclass(frozen=True)
class NodeRules:
    name: str | None = None
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Verdict:
    """The outcome of verification; ``reason`` is a CamelCase condition reason."""

    ok: bool
    reason: str
    message: str
    cluster: str | None = None

    @classmethod
    def refuse(cls, reason: str, message: str, cluster: str | None = None) -> Verdict:
        return cls(False, reason, message, cluster)


def claimed_pod(tunnel: Obj) -> tuple[str, str, str] | None:
    pod = (tunnel.get("spec") or {}).get("pod") or {}
    ns, name, uid = pod.get("namespace"), pod.get("name"), pod.get("uid")
    if not (isinstance(ns, str) and isinstance(name, str) and isinstance(uid, str)):
        return None
    if not (ns and name and uid):
        return None
    return ns, name, uid


def verify(
    tunnel: Obj, pod: Obj | None, node: Obj | None, users: UserRules, nodes: NodeRules
) -> Verdict:
    """Judge the claims of ``tunnel`` given the live pod (None: absent) and its node.

    Pure: the caller reads the objects; this only decides, so every rule is unit-testable.
    """
    spec = tunnel.get("spec") or {}
    user = spec.get("user")
    if not isinstance(user, str) or not user:
        return Verdict.refuse("NoUser", "the Tunnel names no authenticated user")
    claim = claimed_pod(tunnel)
    if claim is None:
        return Verdict.refuse(
            "NoPodClaim",
            "the session claims no pod (namespace, name and uid): nothing can be verified",
        )
    ns, name, uid = claim
    if pod is None:
        return Verdict.refuse("PodNotFound", f"pod {ns}/{name} does not exist")
    meta = pod.get("metadata") or {}
    pod_labels = labels_of(pod)
    cluster = pod_labels.get(CLUSTER_LABEL) or None
    if meta.get("uid") != uid:
        return Verdict.refuse(
            "UIDMismatch",
            f"pod {ns}/{name} has uid {meta.get('uid')}, the session claims {uid}",
            cluster,
        )
    if meta.get("deletionTimestamp"):
        return Verdict.refuse("PodTerminating", f"pod {ns}/{name} is being deleted", cluster)
    expected_ns = users.expected_namespace(user)
    if expected_ns is not None and ns != expected_ns:
        return Verdict.refuse(
            "WrongUser",
            f"pod {ns}/{name} is not in user {user}'s namespace {expected_ns}",
            cluster,
        )
    if users.label and not users.label_names(pod_labels.get(users.label), user):
        return Verdict.refuse(
            "WrongUser",
            f"pod {ns}/{name} label {users.label}={pod_labels.get(users.label)!r} "
            f"does not name user {user}",
            cluster,
        )
    if users.annotation and annotations_of(pod).get(users.annotation) != user:
        return Verdict.refuse(
            "WrongUser",
            f"pod {ns}/{name} annotation {users.annotation} does not name user {user}",
            cluster,
        )
    node_name = (pod.get("spec") or {}).get("nodeName")
    if nodes.name is not None and node_name != nodes.name:
        return Verdict.refuse(
            "NotOnVirtualNode",
            f"pod {ns}/{name} runs on node {node_name or '(none)'}, not on {nodes.name}",
            cluster,
        )
    if nodes.labels:
        node_labels = labels_of(node) if node is not None else {}
        missing = [f"{k}={v}" for k, v in nodes.labels if node_labels.get(k) != v]
        if not node_name or missing:
            return Verdict.refuse(
                "NotOnVirtualNode",
                f"pod {ns}/{name} runs on node {node_name or '(none)'}, which lacks "
                f"{', '.join(missing) or 'the virtual node labels'}",
                cluster,
            )
    if cluster is None:
        return Verdict.refuse("NotDaskScheduler", f"pod {ns}/{name} has no {CLUSTER_LABEL} label")
    if pod_labels.get(COMPONENT_LABEL) != "scheduler":
        return Verdict.refuse(
            "NotDaskScheduler",
            f"pod {ns}/{name} is not a Dask scheduler ({COMPONENT_LABEL}="
            f"{pod_labels.get(COMPONENT_LABEL)!r})",
            cluster,
        )
    return Verdict(True, "ClaimsVerified", f"pod {ns}/{name} (uid {uid}) of user {user}", cluster)


# -- the owner chain: pod <- ReplicaSet <- Deployment <cluster>-scheduler <- DaskCluster --------


@dataclass(frozen=True)
class OwnerChain:
    """The live objects the claimed pod's owner references lead to (None: absent/not read)."""

    replica_set: Obj | None
    deployment: Obj | None
    cluster: Obj | None


def controller_ref(obj: Obj | None) -> Obj | None:
    """The owner reference with ``controller: true`` (there is at most one), else None."""
    for ref in ((obj or {}).get("metadata") or {}).get("ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("controller") is True:
            return ref
    return None


def scheduler_deployment_name(cluster: str) -> str:
    return f"{cluster}-scheduler"


def replica_set_name(pod: Obj) -> str | None:
    """The name of the ReplicaSet controlling ``pod`` (what to read), else None."""
    ref = controller_ref(pod)
    if ref is None or ref.get("kind") != "ReplicaSet" or ref.get("apiVersion") != "apps/v1":
        return None
    name = ref.get("name")
    return name if isinstance(name, str) and name else None


def _describe(ref: Obj | None) -> str:
    if ref is None:
        return "no controller"
    return f"controller {ref.get('kind')} {ref.get('name')!r} ({ref.get('apiVersion')})"


def _links_to(ref: Obj | None, kind: str, api_version: str, name: str, obj: Obj | None) -> bool:
    """``ref`` names ``kind``/``name`` and ``obj`` is that object, with the referenced UID."""
    if ref is None or obj is None:
        return False
    meta = obj.get("metadata") or {}
    return bool(
        ref.get("kind") == kind
        and ref.get("apiVersion") == api_version
        and ref.get("name") == name
        and meta.get("name") == name
        and ref.get("uid")
        and meta.get("uid") == ref.get("uid")
    )


def verify_owner_chain(tunnel: Obj, pod: Obj, chain: OwnerChain, users: UserRules) -> Verdict:
    """Judge that ``pod`` (already verified by :func:`verify`) is its cluster's scheduler pod.

    Pure like :func:`verify`: the caller reads the ReplicaSet named by the pod's controller
    reference, the Deployment ``<cluster>-scheduler`` and the DaskCluster ``<cluster>``.
    """
    user = str((tunnel.get("spec") or {}).get("user"))
    meta = pod.get("metadata") or {}
    ns, name = meta.get("namespace"), meta.get("name")
    cluster = labels_of(pod).get(CLUSTER_LABEL) or ""
    deployment_name = scheduler_deployment_name(cluster)

    def refuse(message: str) -> Verdict:
        return Verdict.refuse("NotOwnedByCluster", message, cluster)

    pod_ref = controller_ref(pod)
    rs_name = replica_set_name(pod)
    if rs_name is None or not _links_to(
        pod_ref, "ReplicaSet", "apps/v1", rs_name, chain.replica_set
    ):
        return refuse(
            f"pod {ns}/{name} is not controlled by a live ReplicaSet of Deployment "
            f"{deployment_name} ({_describe(pod_ref)})"
        )
    rs_ref = controller_ref(chain.replica_set)
    if not _links_to(rs_ref, "Deployment", "apps/v1", deployment_name, chain.deployment):
        return refuse(
            f"pod {ns}/{name}: ReplicaSet {rs_name} is not controlled by Deployment "
            f"{deployment_name} ({_describe(rs_ref)})"
        )
    assert chain.deployment is not None
    dep_ref = controller_ref(chain.deployment)
    dask_api = f"{DASK_GROUP}/{DASK_VERSION}"
    if not _links_to(dep_ref, "DaskCluster", dask_api, cluster, chain.cluster):
        return refuse(
            f"pod {ns}/{name}: Deployment {deployment_name} is not controlled by DaskCluster "
            f"{cluster} ({_describe(dep_ref)})"
        )
    dep_labels = labels_of(chain.deployment)
    if dep_labels.get(CLUSTER_LABEL) != cluster or dep_labels.get(COMPONENT_LABEL) != "scheduler":
        return refuse(
            f"pod {ns}/{name}: Deployment {deployment_name} is not the scheduler Deployment of "
            f"cluster {cluster}"
        )
    assert chain.cluster is not None
    template = ((chain.deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}
    rules = (
        ("label", users.label, template.get("labels"), labels_of(chain.cluster)),
        (
            "annotation",
            users.annotation,
            template.get("annotations"),
            annotations_of(chain.cluster),
        ),
    )
    for kind, key, on_template, on_cluster in rules:
        if not key:
            continue
        named = (on_template or {}).get(key)
        matches = users.label_names if kind == "label" else (lambda v, u: v == u)
        if not matches(named, user):
            return Verdict.refuse(
                "WrongUser",
                f"pod {ns}/{name}: the pod template of Deployment {deployment_name} has "
                f"{kind} {key}={named!r}, not user {user}",
                cluster,
            )
        if key in on_cluster and not matches(on_cluster[key], user):
            return Verdict.refuse(
                "WrongUser",
                f"pod {ns}/{name}: DaskCluster {cluster} has {kind} {key}="
                f"{on_cluster[key]!r}, not user {user}",
                cluster,
            )
    return Verdict(
        True,
        "ClaimsVerified",
        f"pod {ns}/{name} (uid {meta.get('uid')}) of user {user}, "
        f"made by DaskCluster {cluster} through Deployment {deployment_name}",
        cluster,
    )
