"""The fault campaign (issue 18): random faults against quiesce's CLI on real loop
filesystems under load, with invariants checked against the kernel after every step.

Used by tests/test_fault_campaign.py (bounded, one family of faults per test) and by
bench/fault_campaign.py (30+ minutes, every family mixed).

Faults: SIGKILL of the controller (``quiesce exec``) at a random instant; SIGKILL of the
guardian (found through ``quiesce status --json``) holding a ``quiesce freeze``; a third
party's ``fsfreeze -u`` then ``fsfreeze -f`` inside quiesce's freeze; a third party's
freeze before quiesce's; concurrent runs on overlapping volumes. Load: an fsstress-like
process per volume (create, write, rename, truncate, unlink, fsync) and an fsync'ing
sequence writer (tests/helpers/writer.py) whose acknowledged records must all survive.

Invariants, after every step once its processes have ended and its deadlines passed:
- ``frozen``: no volume is frozen (FIFREEZE probe: EBUSY; a probe that froze it thaws at
  once) unless a third party holds it; a volume frozen otherwise is a violation, thawed
  by the campaign so that it can go on;
- ``foreign``: a third party's freeze is still there (quiesce never thawed it);
- ``knob``: after ``quiesce cleanup``, rcu_expedited is back to 0 unless a live run holds
  it. The campaign's runs get a knob and a run directory of their own (a stand-in
  ``rcu_expedited`` file, ``QUIESCE_RUN_DIR``): the real knob is machine-wide and other
  users' runs flip it, so only the campaign's own record and value are checked;
- ``cleanup``: after ``quiesce cleanup``, nothing is mounted below the work directory
  but the volumes, no loop device is attached to a file there but theirs;
- ``writes`` (at the end): every acknowledged record is on disk, in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import is_frozen as probe  # the one FIFREEZE probe of the tests

HELPERS = Path(__file__).parent
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
BOUND_S = 3.0  # what "promptly" may take on a busy 2-core machine
FREEZE_S = 8.0  # deadline of a held freeze: longer than the CLI's start on a loaded machine

STRESS = r"""
import os, random, sys, time
d = sys.argv[1]; os.makedirs(d, exist_ok=True); rng = random.Random(os.getpid())
while True:
    name = os.path.join(d, "f%d" % rng.randrange(64))
    op = rng.randrange(6)
    try:
        if op < 2:
            with open(name, "ab") as f:
                f.write(os.urandom(rng.randrange(1, 65536)))
                if rng.random() < 0.2: f.flush(); os.fsync(f.fileno())
        elif op == 2: os.rename(name, name + "r")
        elif op == 3: os.truncate(name, rng.randrange(0, 4096))
        elif op == 4: os.unlink(name)
        else: os.listdir(d)
    except OSError:
        pass
    time.sleep(rng.random() * 0.01)
"""


def quiesce_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "quiesce", *args]


def fsfreeze(flag: str, path: str) -> int:
    return subprocess.run(["fsfreeze", flag, path], capture_output=True).returncode


@dataclass
class Violation:
    step: int
    kind: str  # the fault family
    invariant: str
    detail: str


@dataclass
class Campaign:
    volumes: list[str]  # mount points of throwaway filesystems
    work: Path  # where the state dir lives (not on a volume)
    rng: random.Random
    log: Callable[[str], None] = lambda _line: None
    violations: list[Violation] = field(default_factory=list)
    steps: Counter[str] = field(default_factory=Counter)
    effective: Counter[str] = field(default_factory=Counter)  # steps whose fault happened
    foreign: set[str] = field(default_factory=set)  # volumes a third party holds frozen
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    writers: list[subprocess.Popen[str]] = field(default_factory=list)
    acks: dict[int, int] = field(default_factory=dict)  # writer index -> last acked
    n: int = 0

    saved_env: dict[str, str | None] = field(default_factory=dict)

    # -- isolation ----------------------------------------------------------------------
    def isolate(self) -> None:
        """The campaign's guardians, sockets and knob apart from every other quiesce user:
        a run directory and a stand-in /sys/kernel (honoured only under pytest, so the
        variable saying so is set for the bench too). Undone by :meth:`restore_env`."""
        run, knob = self.work / "run", self.work / "sys-kernel"
        run.mkdir(mode=0o700, exist_ok=True)
        knob.mkdir(exist_ok=True)
        for name in ("rcu_expedited", "rcu_normal"):
            (knob / name).write_text("0\n")
        env = {
            "QUIESCE_RUN_DIR": str(run),
            "QUIESCE_TEST_RCU_DIR": str(knob),
            "PYTEST_CURRENT_TEST": os.environ.get("PYTEST_CURRENT_TEST") or "fault-campaign",
        }
        for k, v in env.items():
            self.saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v

    def restore_env(self) -> None:
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.saved_env.clear()

    @property
    def knob(self) -> Path:
        return self.work / "sys-kernel" / "rcu_expedited"

    # -- load -------------------------------------------------------------------------
    def start_load(self) -> None:
        for v in self.volumes:
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", STRESS, os.path.join(v, "stress")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for v in self.volumes[::2]:
            w = subprocess.Popen(
                [sys.executable, str(HELPERS / "writer.py"), os.path.join(v, "records"), "0.005"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            assert w.stdout is not None and w.stdout.readline().startswith("ready")
            os.set_blocking(w.stdout.fileno(), False)
            self.writers.append(w)

    def _drain_acks(self) -> None:
        for i, w in enumerate(self.writers):
            assert w.stdout is not None
            with contextlib.suppress(TypeError, OSError):
                for line in w.stdout.read().splitlines():
                    if line.startswith("ack "):
                        self.acks[i] = int(line.split()[1])

    def stop_load(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in self.procs:
            p.wait(timeout=60)
        for w in self.writers:
            w.terminate()
        for w in self.writers:
            w.wait(timeout=60)
        self._drain_acks()

    def check_writes(self) -> None:
        for i in range(len(self.writers)):
            path = Path(self.volumes[::2][i]) / "records"
            lines = path.read_text().split("\n")[:-1]
            got = [int(x) for x in lines if x]
            acked = self.acks.get(i, 0)
            if got[:acked] != list(range(1, acked + 1)):
                self._violate("end", "writes", f"{path}: acknowledged records lost ({acked})")

    # -- faults -----------------------------------------------------------------------
    def _violate(self, kind: str, invariant: str, detail: str) -> None:
        self.violations.append(Violation(self.n, kind, invariant, detail))
        self.log(f"step {self.n} {kind}: VIOLATION {invariant}: {detail}")

    def _check_exit(self, kind: str, p: subprocess.Popen[bytes]) -> int:
        """Wait for a quiesce process; an internal error (exit 1: a traceback, a bug) is a
        violation whatever the fault: every failure quiesce expects has its own code."""
        rc = p.wait(timeout=60)
        if rc == 1:
            tail = (p.stderr.read() if p.stderr else b"").decode(errors="replace").strip()
            self._violate(kind, "internal-error", tail.splitlines()[-1] if tail else "exit 1")
        return rc

    def _subset(self, k: int | None = None) -> list[str]:
        k = k or self.rng.randint(1, len(self.volumes))
        return sorted(self.rng.sample(self.volumes, k))

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            quiesce_argv(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def _guardians_of(self, vols: list[str]) -> tuple[list[int], float]:
        """The guardians holding ``vols`` (``quiesce status --json``) and the latest of
        their deadlines, in seconds from now (FREEZE_S if none answered)."""
        p = subprocess.run(quiesce_argv("status", "--json"), capture_output=True, text=True)
        with contextlib.suppress(ValueError):
            held = [
                g
                for g in json.loads(p.stdout).get("guardians", [])
                if any(v["mount_point"] in vols for v in g["volumes"])
            ]
            left = [g["deadline_remaining_s"] or 0.0 for g in held]
            return [g["pid"] for g in held], max(left, default=FREEZE_S)
        return [], FREEZE_S

    def controller_kill(self) -> float:
        """``quiesce exec`` SIGKILLed at a random instant (or left to finish)."""
        vols = self._subset()
        p = self._spawn("exec", "--timeout", "8", "--lease", "1", *vols, "--", "sleep", "0.5")
        time.sleep(self.rng.uniform(0, 1.5))
        if p.poll() is None:
            self.effective["controller_kill"] += 1
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        self._check_exit("controller_kill", p)
        return 0.0  # the guardian thaws at once when its controller dies

    def guardian_kill(self) -> float:
        """``quiesce freeze`` (the guardian holds it), then SIGKILL of that guardian."""
        vols = self._subset()
        p = self._spawn("freeze", "--timeout", str(FREEZE_S), "--lease", "0", *vols)
        rc = self._check_exit("guardian_kill", p)
        pids, left = self._guardians_of(vols)
        t0 = time.monotonic() - (FREEZE_S - left)  # when the deadline's clock started
        self.log(f"step {self.n} guardian_kill {vols}: freeze exit {rc}, guardians {pids}")
        time.sleep(self.rng.uniform(0, 1.0))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                self.effective["guardian_kill"] += 1
        # at the latest by the deadline (the second line's job)
        return max(0.0, t0 + FREEZE_S - time.monotonic())

    def outside_thaw(self) -> float:
        """A third party thaws quiesce's freeze and freezes again: quiesce must never
        thaw that second freeze (it is not its own)."""
        [vol] = self._subset(1)
        p = self._spawn("freeze", "--timeout", str(FREEZE_S), "--lease", "0", vol)
        if (rc := self._check_exit("outside_thaw", p)) != 0:
            self.log(f"step {self.n} outside_thaw {vol}: freeze exit {rc}")
            return 0.0
        _pids, left = self._guardians_of([vol])
        t0 = time.monotonic() - (FREEZE_S - left)  # when the old guardian's deadline started
        time.sleep(self.rng.uniform(0, 0.5))
        if fsfreeze("-u", vol) == 0 and fsfreeze("-f", vol) == 0:
            self.foreign.add(vol)
            self.effective["outside_thaw"] += 1
        return max(0.0, t0 + FREEZE_S - time.monotonic())  # the old deadline passes

    def outside_freeze(self) -> float:
        """A third party's freeze first: quiesce's run fails and leaves it frozen."""
        [vol] = self._subset(1)
        if fsfreeze("-f", vol) == 0:
            self.foreign.add(vol)
            self.effective["outside_freeze"] += 1
        vols = sorted({vol, *self._subset()})
        p = self._spawn("exec", "--timeout", "3", *vols, "--", "true")
        self._check_exit("outside_freeze", p)
        return 0.0

    def concurrent(self) -> float:
        """Two runs on overlapping volumes at once, one maybe SIGKILLed."""
        a, b = self._subset(), self._subset()
        ps = [self._spawn("exec", "--timeout", "8", *vols, "--", "sleep", "0.3") for vols in (a, b)]
        if set(a) & set(b):
            self.effective["concurrent"] += 1
        time.sleep(self.rng.uniform(0, 0.8))
        if self.rng.random() < 0.5:
            with contextlib.suppress(ProcessLookupError):
                self.rng.choice(ps).kill()
        for p in ps:
            self._check_exit("concurrent", p)
        return 0.0  # both controllers have ended

    FAULTS = ("controller_kill", "guardian_kill", "outside_thaw", "outside_freeze", "concurrent")

    # -- one step ---------------------------------------------------------------------
    def step(self, kind: str) -> None:
        """One fault, then the invariants. A volume must be thawed by the time the fault
        returns (seconds from now) plus BOUND_S: polled with the FIFREEZE probe (no event
        exists for a thaw); a third party's freeze must still be there at that time."""
        self.n += 1
        self.steps[kind] += 1
        limit = getattr(self, kind)()
        end = time.monotonic() + limit + BOUND_S
        while True:
            frozen = [v for v in self.volumes if v not in self.foreign and probe(v)]
            if not frozen or time.monotonic() >= end:
                break
            time.sleep(0.1)
        for v in frozen:
            self._violate(kind, "frozen", f"{v} still frozen {limit + BOUND_S:g}s after the fault")
            fsfreeze("-u", v)  # so that the campaign goes on
        if self.foreign:
            time.sleep(max(0.0, end - time.monotonic()))
        for v in sorted(self.foreign):
            if not probe(v):
                self._violate(kind, "foreign", f"{v}: a third party's freeze was thawed")
            fsfreeze("-u", v)  # the third party ends its own freeze
        self.foreign.clear()
        self._check_cleanup(kind)  # restores a knob a dead holder left, with its record
        if self.knob.read_text().strip() != "0" and not self._rcu_held():
            self._violate(kind, "knob", "rcu_expedited left at 1 after cleanup, no live holder")
            self.knob.write_text("0\n")
        self._drain_acks()

    def _rcu_held(self) -> bool:
        from quiesce.freezing.guardian import expedite

        rec = expedite.holders()
        return bool(rec) and any(h["alive"] for h in rec["holders"])

    def _check_cleanup(self, kind: str) -> None:
        from quiesce.snapshot.cleanup import cleanup  # what `quiesce cleanup` runs

        cleanup(self.work / "state")
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(self.work))
        ]
        extra = [m for m in mounts if m not in self.volumes]
        if extra:
            self._violate(kind, "cleanup", f"left mounted: {extra}")

    def summary(self) -> str:
        steps = ", ".join(
            f"{k} {n} ({self.effective[k]} with the fault)" for k, n in sorted(self.steps.items())
        )
        by = Counter(f"{v.kind}/{v.invariant}" for v in self.violations)
        return f"{self.n} steps ({steps}); violations: {dict(by) or 0}"


__all__ = ["BOUND_S", "Campaign", "Violation", "probe"]
