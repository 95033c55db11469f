"""`quiesce demo --fleet`: one group snapshot across simulated hosts, checked.

Builds N hosts on this machine (quiesce_testing.ground: sshd per host in its own mount
namespace, its own loop filesystem), runs the quiesce.fleet group playbook with Ansible
over real SSH while a writer hops records across the hosts, checks that the hosts'
snapshots hold a prefix of the records (one instant), and removes everything.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

import quiesce
from quiesce.errors import QuiesceError, UsageError

SETUP = "run scripts/fleet-setup.sh (apt-get install openssh-server; pip install ansible-core)"


def collection_root() -> Path:
    """The directory holding ansible_collections/quiesce/fleet (a source checkout)."""
    root = Path(quiesce.__file__).resolve().parents[2]
    if not (root / "ansible_collections" / "quiesce" / "fleet" / "playbooks").is_dir():
        raise UsageError(
            "the quiesce.fleet collection is not next to this quiesce",
            "run the demo from a source checkout of quiesce",
        )
    return root


def check_tools() -> None:
    missing = [t for t in ("/usr/sbin/sshd",) if not Path(t).exists()]
    missing += [t for t in ("nsenter", "ssh", "ssh-keygen", "losetup") if not shutil.which(t)]
    if importlib.util.find_spec("ansible") is None:
        missing.append("ansible-core")
    if missing:
        raise UsageError(f"the fleet demo needs {', '.join(missing)}", SETUP)


def _copy_provider(snaps: Path, volume: str) -> dict[str, Any]:
    """Each host's own provider here: `command`, copying its volume into the run's dir."""
    create = (
        f'd={snaps}/"$QUIESCE_SNAPSHOT_NAME"; mkdir -p "$d" && cp -a {volume}/. "$d"/ && echo "$d"'
    )
    return {"type": "command", "options": {"create": ["sh", "-c", create],
                                           "delete": ["rm", "-rf", "{id}"]}}  # fmt: skip


def run_fleet_demo(console: Console | None, as_json: bool, hosts: int = 3) -> dict[str, Any]:
    from quiesce_testing.ground import Fleet
    from quiesce_testing.ground_writer import check_cut

    if hosts < 2:
        raise UsageError("--hosts must be at least 2", "a group spans several hosts: --hosts 3")
    check_tools()
    root = collection_root()
    playbook = root / "ansible_collections" / "quiesce" / "fleet" / "playbooks" / "group.yml"

    def say(text: str) -> None:
        if console is not None:
            console.print(text)

    say(f"building {hosts} hosts (sshd + own mount namespace + own loop filesystem)...")
    with Fleet(hosts) as f:
        hv = f.base / "ansible" / "host_vars"
        hv.mkdir()
        for h in f.hosts:
            (h.dir / "snaps").mkdir()
            prov = _copy_provider(h.dir / "snaps", h.data.mountpoint)
            (hv / f"{h.name}.yml").write_text(json.dumps({"quiesce_provider": prov}))
        w = f.start_writer("demo.log")
        w.wait_for(20)
        say(f"writer hopping across the hosts: {w.acked} records so far")
        report = f.base / "report.json"
        extra = {"quiesce_name": "demo", "quiesce_report": str(report)}
        t0 = time.monotonic()
        p, _ = f.playbook(playbook, "-e", json.dumps(extra), ANSIBLE_COLLECTIONS_PATH=str(root))
        took = time.monotonic() - t0
        w.wait_for(5)
        stats = w.stop()
        rep = json.loads(report.read_text()) if report.exists() else {}
        if p.returncode != 0 or not rep.get("consistent"):
            why = "; ".join(rep.get("reasons", [])) or (p.stdout + p.stderr).strip()[-400:]
            raise QuiesceError(f"the fleet group was not consistent: {why}")
        copies = [(h.dir / "snaps" / f"demo-{h.name}" / "demo.log").read_bytes() for h in f.hosts]
        cut = check_cut(copies)
    result = {
        "hosts": hosts,
        "consistent": cut.consistent,
        "window_s": rep["window_s"],
        "skew_s": rep["skew_s"],
        "overlap_s": rep["overlap_s"],
        "max_host_window_s": rep["max_host_window_s"],
        "records_in_cut": cut.prefix,
        "records_written": int(stats["records"]),
        "play_s": took,
    }
    say(
        f"play {took:.1f} s; group window {rep['window_s'] * 1e3:.1f} ms "
        f"(one host's at most {rep['max_host_window_s'] * 1e3:.1f} ms), skew "
        f"{rep['skew_s'] * 1e3:.1f} ms, proven overlap {rep['overlap_s'] * 1e3:.1f} ms"
    )
    say(
        f"cut: records 1..{cut.prefix} on {hosts} hosts, "
        + (
            "[green]consistent[/green]"
            if cut.consistent
            else f"[red]missing {cut.missing[:5]}[/red]"
        )
    )
    if not cut.consistent:
        raise QuiesceError(f"the snapshots' cut is not consistent: missing {cut.missing[:10]}")
    return result
