"""The console scripts' entry points: hold dependency warnings, then start the daemon.

The daemon modules import asyncssh, kubernetes_asyncio and htcondor at their top,
and some releases of those (or of what they import) warn while being imported. This
module imports nothing but :mod:`shared.warnlog`, so the hold is in place before any
of that runs; ``shared.daemon.load_settings`` releases the warnings into the log.
"""

from __future__ import annotations

from shared import warnlog


def agent() -> None:
    warnlog.hold()
    from daemons.agent.__main__ import main

    main()


def forwarder() -> None:
    warnlog.hold()
    from daemons.forwarder.__main__ import main

    main()


def reconciler() -> None:
    warnlog.hold()
    from daemons.reconciler.__main__ import main

    main()
