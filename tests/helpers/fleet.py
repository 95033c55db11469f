"""The fleet test ground: now quiesce.cli.demo.ground (the demo builds it too)."""

from quiesce.cli.demo.ground import *  # noqa: F403
from quiesce.cli.demo.ground import _HOLDER, _IOCTL, _detach, _losetup  # noqa: F401
