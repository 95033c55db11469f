"""The guardian: a watchdog process that performs every freeze and guarantees its thaw.

``protocol`` (wire format, socket names), ``daemon`` (the guardian process itself),
``handle`` (the controller's side: start and drive its own guardian) and ``client``
(find and ask other guardians). Callers import the public names from here; the daemon's
and the handle's are loaded on first use (``quiesce status`` and ``thaw`` need neither).
"""

from typing import TYPE_CHECKING

from quiesce.freezing.guardian.client import (
    Survey,
    ask,
    holder_of,
    list_guardians,
    survey,
    thaw,
)
from quiesce.freezing.guardian.protocol import (
    DEFAULT_LEASE,
    DEFAULT_TIMEOUT,
    MAX_SECONDS,
    RUN_DIR,
    RUN_DIR_ENV,
    SOCKET_PREFIX,
    check_seconds,
    socket_path,
)
from quiesce.util.lazy import lazy_exports

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TIMEOUT",
    "LINGER_AFTER_EXPIRY",
    "MAX_SECONDS",
    "RUN_DIR",
    "RUN_DIR_ENV",
    "SOCKET_PREFIX",
    "GuardedVolume",
    "GuardianHandle",
    "Survey",
    "ask",
    "check_seconds",
    "holder_of",
    "list_guardians",
    "socket_path",
    "survey",
    "thaw",
]


if TYPE_CHECKING:
    from quiesce.freezing.guardian.daemon import LINGER_AFTER_EXPIRY, GuardedVolume
    from quiesce.freezing.guardian.handle import GuardianHandle

__getattr__ = lazy_exports(
    __name__,
    {
        "LINGER_AFTER_EXPIRY": ".daemon:LINGER_AFTER_EXPIRY",
        "GuardedVolume": ".daemon:GuardedVolume",
        "GuardianHandle": ".handle:GuardianHandle",
    },
)
