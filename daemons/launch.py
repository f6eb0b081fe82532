"""The console scripts' entry points: hold dependency warnings, then start the daemon.

The daemon modules import asyncssh, kubernetes_asyncio and htcondor at their top,
and some releases of those (or of what they import) warn while being imported. This
module imports only :mod:`shared.warnlog` and :mod:`daemons.agent.secrecy` (standard
library both), so the hold is in place before any of that runs;
``shared.daemon.load_settings`` releases the warnings into the log.
"""

from __future__ import annotations

from daemons.agent import secrecy
from shared import warnlog


def agent() -> None:
    # Before the token is read: nothing of the job's uid may read this process (see secrecy).
    secrecy.make_undumpable()
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
