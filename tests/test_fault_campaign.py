"""The fault campaign, bounded (about 2 minutes): random faults against the CLI on three
ext4 loop filesystems under an fsstress-like load with an fsync'ing sequence writer, and
the kernel's word after every step (tests/helpers/campaign.py says what is checked).
bench/fault_campaign.py runs the same for 30 minutes and more, every family mixed.

Two families prove the ownership rules (issue 18): a third party's thaw and refreeze is
never thawed by quiesce, and a SIGKILLed guardian's freeze is thawed by its second line.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

import pytest
from conftest import thaw_quietly
from helpers.campaign import Campaign

BUDGET_S = float(os.environ.get("QUIESCE_CAMPAIGN_S", "35"))  # per family


@pytest.fixture
def campaign(loopfs, tmp_path) -> Iterator[Campaign]:
    vols = [loopfs("ext4", size_mb=96).path for _ in range(3)]
    seed = int(os.environ.get("QUIESCE_CAMPAIGN_SEED", random.randrange(1 << 30)))
    print(f"campaign seed {seed}")
    c = Campaign(vols, tmp_path, random.Random(seed), log=print)
    c.isolate()  # its own run directory and stand-in knob
    try:
        c.start_load()
        yield c
    finally:
        for v in vols:  # whatever a failed step left: the load must be able to stop
            thaw_quietly(v)
        c.stop_load()
        c.restore_env()
        print(c.summary())


def _run(c: Campaign, kinds: tuple[str, ...]) -> None:
    end = time.monotonic() + BUDGET_S
    while time.monotonic() < end:
        c.step(c.rng.choice(kinds))
    c.stop_load()
    c.check_writes()
    assert sum(c.effective[k] for k in kinds) > 0, "no fault took place: " + c.summary()
    assert not c.violations, c.summary() + "\n" + "\n".join(map(str, c.violations))


def test_controller_kills_concurrent_runs_and_foreign_freezes(campaign: Campaign) -> None:
    _run(campaign, ("controller_kill", "concurrent", "outside_freeze"))


def test_a_killed_guardians_freeze_is_thawed_by_its_second_line(campaign: Campaign) -> None:
    _run(campaign, ("guardian_kill",))


def test_a_freeze_thawed_and_refrozen_by_others_is_never_thawed(campaign: Campaign) -> None:
    _run(campaign, ("outside_thaw",))
