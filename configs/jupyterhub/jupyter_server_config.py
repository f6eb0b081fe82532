# jupyter-server-proxy: let the single-user server proxy the Dask dashboards of this user's
# clusters (and nothing else but localhost). Append to the image's jupyter_server_config.py, e.g.
# /etc/jupyter/jupyter_server_config.py, or ship it with Zero to JupyterHub's
# singleuser.extraFiles (see z2jh-values.yaml). Option: ServerProxy.host_allowlist, a list of
# exact host names or a callable (handler, host) -> bool (jupyter-server-proxy's config.py; the
# default is ["localhost", "127.0.0.1"]).
#
# KubeCluster's dashboard host is "<cluster>-scheduler.<namespace>" (dask-kubernetes
# operator/networking.py); the browser reaches it as
# {JUPYTERHUB_SERVICE_PREFIX}proxy/<cluster>-scheduler.<namespace>:8787/status.
import os
import re

c = get_config()  # type: ignore[name-defined]  # noqa: F821


def _jobtunnel_namespace() -> str | None:
    namespace = os.environ.get("JOBTUNNEL_USER_NAMESPACE")
    if namespace:
        return namespace
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


_JOBTUNNEL_NAMESPACE = _jobtunnel_namespace()
_JOBTUNNEL_DASHBOARD = (
    re.compile(
        r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?-scheduler\."
        + re.escape(_JOBTUNNEL_NAMESPACE)
        + r"(\.svc(\.cluster\.local)?)?"
    )
    if _JOBTUNNEL_NAMESPACE
    else None
)


def jobtunnel_host_allowlist(handler: object, host: str) -> bool:
    """localhost, and the scheduler Services of the user's own namespace."""
    if host in ("localhost", "127.0.0.1"):
        return True
    return _JOBTUNNEL_DASHBOARD is not None and _JOBTUNNEL_DASHBOARD.fullmatch(host) is not None


c.ServerProxy.host_allowlist = jobtunnel_host_allowlist
