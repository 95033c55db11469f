"""The guardian: a watchdog process that performs every freeze and guarantees its thaw.

``protocol`` (wire format, socket names), ``daemon`` (the guardian process itself),
``handle`` (the controller's side: start and drive its own guardian) and ``client``
(find and ask other guardians). Callers import the public names from here.
"""

from quiesce.freezing.guardian.client import Survey, ask, holder_of, list_guardians, survey
from quiesce.freezing.guardian.daemon import LINGER_AFTER_EXPIRY, GuardedVolume
from quiesce.freezing.guardian.handle import GuardianHandle
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
]
