"""The hopping writer and check_cut: now quiesce.cli.demo.ground_writer."""

from quiesce.cli.demo.ground import snapshot_one_by_one, snapshot_overlapping  # noqa: F401
from quiesce.cli.demo.ground_writer import *  # noqa: F403
