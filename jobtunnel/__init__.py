"""jobtunnel for users: Dask clusters whose scheduler runs in an HTCondor job (via InterLink).

This package is what a user's notebook environment imports; it never imports the daemons
(``daemons``, ``shared``), and it imports Dask, dask-kubernetes and kr8s only when a function
that needs them is called. See :mod:`jobtunnel.dask` and ``docs/users.md``.
"""

from __future__ import annotations

__all__: list[str] = []
