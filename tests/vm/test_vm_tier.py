"""The VM tier: LVM and ZFS providers on real Debian kernels under qemu (``pytest -m vm``).

This host's kernel has no device-mapper and cannot load ZFS, so each kernel is booted
once with virtme-ng (software emulation, the host root read-only over 9p) and runs the
scenario scripts beside this file; each test asserts one scenario's exit code and shows
its output on failure. Missing tooling skips with a reason naming scripts/vm-setup.sh.
The VMs start when the session's collection ends (tests/conftest.py), one after
another, while the rest of the suite runs; a test waits for its kernel's run.
"""

from __future__ import annotations

import pytest
import vmrun

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

# kernel series -> scenarios that boot together, with what each needs besides the kernel
SCENARIOS = {
    "6.1": {
        "scenario_lvm_61.py": {"modules": ("dm-snapshot",), "tools": ("lvcreate",)},
        "scenario_zfs_61.py": {"modules": ("zfs",), "tools": ("zfs", "zpool")},
    },
    "6.12": {
        "scenario_lvm_612.py": {
            "modules": ("dm-snapshot", "dm-thin-pool"),
            "tools": ("lvcreate", "thin_check"),
        },
    },
}
_runs: dict[str, dict[str, vmrun.VmResult]] = {}


def _why_not(series: str, script: str) -> str | None:
    need = SCENARIOS[series][script]
    return vmrun.missing(series, modules=need["modules"], tools=need["tools"])


def runnable(series: str) -> list[str]:
    return [s for s in SCENARIOS[series] if _why_not(series, s) is None]


def start_in_background() -> None:
    """Boot every series with its runnable scenarios, in turn, beside the suite."""
    for series in SCENARIOS:
        vmrun.background.start(series, runnable(series))


def _scenario(series: str, script: str) -> vmrun.VmResult:
    """Boot ``series`` once (on first use) with every runnable scenario, return ``script``'s."""
    why = _why_not(series, script)
    if why:
        pytest.skip(why)
    if series not in _runs:
        started = vmrun.background.result(series)
        _runs[series] = started or vmrun.run_scenarios(series, runnable(series))
    res = _runs[series][script]
    print(res.output)
    print(f"VM run with {len(_runs[series])} scenario(s): {res.boot_seconds:.0f}s; {res.results}")
    return res


def test_lvm_on_6_1_one_lv_without_fifreeze_and_group_refused() -> None:
    """One LV: PROVIDER mode, clean snapshot with every acked record. Two LVs: refused
    before anything changes, naming the kernel. FIFREEZE + lvcreate -s: EBUSY, and the
    half-made LV is removed."""
    res = _scenario("6.1", "scenario_lvm_61.py")
    assert res.returncode == 0, res.explain()
    assert "SCENARIO OK" in res.output
    assert float(res.results["lvm61_lvcreate_under_fifreeze_s"]) > 0


def test_zfs_on_6_1_one_command_one_instant() -> None:
    """Two datasets in one ``zfs snapshot`` command, no freeze, list and delete work,
    FIFREEZE on ZFS is EOPNOTSUPP."""
    res = _scenario("6.1", "scenario_zfs_61.py")
    assert res.returncode == 0, res.explain()
    n1, n2 = (int(x) for x in res.results["zfs_records"].split(","))
    assert 0 <= n1 - n2 <= 1


def test_lvm_on_6_12_group_of_two_under_one_fifreeze() -> None:
    """A thick ext4 LV and a thin XFS LV: FIFREEZE held across both lvcreate -s (nests on
    >= 6.8); both snapshots clean and at one instant."""
    res = _scenario("6.12", "scenario_lvm_612.py")
    assert res.returncode == 0, res.explain()
    na, nx = (int(x) for x in res.results["lvm612_records"].split(","))
    assert 0 <= na - nx <= 1
