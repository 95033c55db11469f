"""`quiesce demo --vm`: both sides of a hypervisor on a throwaway guest, checked.

Boots a guest (cli/demo/vmhost.py) whose qemu-guest-agent runs quiesce as its fsfreeze
hook, with a writer hopping records between two data disks; snapshots it from the host
with the ``qemu`` provider (freeze through the agent, reflink clones, thaw) and checks
that the clones hold every acknowledged record at one instant; then freezes it again and
plays a host that never thaws: the guest's watchdog thaws it by its deadline. Removes all.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from quiesce.errors import QuiesceError

DEADLINE, LEASE = 30.0, 2.0  # a late thaw hook (slow start-up) is still recorded


def run_vm_demo(console: Console | None) -> dict[str, Any]:
    from quiesce.cli.demo import vmhost
    from quiesce.providers.qemu import GuestGroup, QemuProvider
    from quiesce.providers.qga import GuestAgent

    def say(text: str) -> None:
        if console is not None:
            console.print(text)

    t0 = time.monotonic()
    say("booting a throwaway guest (qemu-guest-agent + quiesce's fsfreeze hook) ...")
    g = vmhost.boot(deadline=DEADLINE, lease=LEASE, timeout=600)
    try:
        with GuestAgent(str(g.agent), timeout=300) as a:
            a.status()
        g.wait_acks(3)
        say(f"guest up in {g.boot_s:.0f}s; its writer hops records between two disks")
        p = QemuProvider(g.options(agent_timeout=300))
        p.prepare([], "demo")
        acked = g.acks()
        snaps = p.snapshot([])
        ok, why = vmhost.check_cut(g.records([Path(s.location) for s in snaps]), acked)
        extra = snaps[0].extra
        say(
            f"snapshot: guest window {extra['guest_window_s']:.3f}s (guest-measured), "
            f"at least {extra['host_window_s']:.3f}s (host-measured: freeze answered to "
            f"thaw sent; {extra['host_wait_s']:.2f}s with the guest's hooks); "
            f"{'[green]consistent[/]' if ok else '[red]NOT consistent[/]'}: {why}"
        )
        for s in snaps:
            Path(s.location).unlink()
        say(f"freezing again and never thawing: the guest's deadline is {DEADLINE:g}s ...")
        grp = GuestGroup(g.options(agent_timeout=300))
        grp.connect()
        try:
            grp.freeze()
            before, t_freeze = g.acks(), time.monotonic()
            g.wait_for(lambda: g.acks() > before, DEADLINE + 600, "the guest's own thaw")
            writable_after = time.monotonic() - t_freeze
            grp.thaw()  # the agent still believes it froze; resets it
        finally:
            grp.close()
        abandoned = grp.guests[0].record.get("thawed_by", "")
        say(f"abandoned freeze: thawed by {abandoned} after {writable_after:.1f}s")
        return {
            "guests": 1,
            "consistent": ok,
            "guest_window_s": extra["guest_window_s"],
            "host_window_s": extra["host_window_s"],
            "host_wait_s": extra["host_wait_s"],
            "thawed_by": extra["thawed_by"],
            "abandoned_freeze": {"thawed_by": abandoned, "writable_after_s": writable_after},
            "detail": why,
            "seconds": round(time.monotonic() - t0, 1),
        }
    except (TimeoutError, RuntimeError, OSError) as e:
        raise QuiesceError(f"the VM demo failed: {e}") from None
    finally:
        g.close()


__all__ = ["run_vm_demo"]
