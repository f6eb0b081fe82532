"""Keeping the job's token from everything else that runs in the job.

The agent holds a hub token for the job's whole life, and its child (``dask scheduler``, and
whatever code the scheduler runs for whoever reaches it) runs under the same uid. Same uid
means, by default, that the child may read the agent's ``/proc/<pid>/environ`` (where
``JUPYTERHUB_API_TOKEN`` stays for good: unsetting a variable does not erase it there) and its
memory. What the agent does about it:

- it makes itself non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``, Linux): processes of its uid
  can no longer read its environ, memory or file descriptors under ``/proc``, ptrace it, or get
  a core dump of it. The child is dumpable again (exec resets it), which is what it needs;
- the child's environment has neither ``JUPYTERHUB_API_TOKEN`` nor ``JOBTUNNEL_TOKEN_FILE``,
  and the child inherits no file descriptor beyond 0, 1 and 2.

What it cannot do: a token *file* stays readable by the uid (the job wrapper mounts it so; a
process that finds the path can read it), and root on the execute node reads everything. That
is why a job carries a token that can only open its user's tunnels (the hub scope
``custom:jobtunnel:connect``, which the forwarder requires, refusing broader tokens): stolen,
it is worth almost nothing. Standard library only: it runs before anything else is imported.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping

#: What the child never sees of the agent's environment.
HIDDEN_FROM_CHILD = ("JUPYTERHUB_API_TOKEN", "JOBTUNNEL_TOKEN_FILE")

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


def make_undumpable() -> bool:
    """Mark this process non-dumpable; False where the platform has no such thing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def is_undumpable() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: ours, minus the token and the way to it."""
    return {k: v for k, v in environ.items() if k not in HIDDEN_FROM_CHILD}
