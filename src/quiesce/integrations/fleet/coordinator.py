"""The controller's side of a fleet group: one agent per host over SSH, one verdict.

Steps: connect (every agent up, or nothing happens anywhere) -> clocks -> prepare (plan,
provider, syncfs on each host; nothing frozen) -> quiesce (every host's writers and
guardian ready; still nothing frozen) -> the window -> clocks again -> verdict -> keep
the snapshots, or delete them everywhere -> bye.

The window, mode ``hosts`` (a): every host is armed to freeze at one instant of the
controller's clock (translated into its own), snapshot with its own provider, hold until
``hold_s`` after that instant and thaw by itself; no round trip to the controller inside.
Mode ``command`` (b): the controller asks every host to freeze, runs one ``command`` (a
storage array's or cloud's multi-volume snapshot) once all are frozen, and thaws them.

Any failure (a host that cannot freeze, a lost channel, the command failing) sends
"abort" to every host at once; every agent also thaws by itself on EOF, a lapsed
lease, or the deadline. The ssh clients die with this process (PDEATHSIG), and it
exits when one of ``watch_pids`` (ansible-playbook and its worker) dies, so a SIGKILLed
ansible-playbook closes every channel: every agent sees EOF and thaws.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from quiesce.errors import ControllerGone, QuiesceError
from quiesce.freezing.instant import FrozenSpan, Offset, Verdict, judge
from quiesce.host import pids, proc
from quiesce.integrations.fleet.agent import check_writers
from quiesce.integrations.fleet.wire import LineReader, write

PINGS = 8


@dataclass
class Member:
    """One host of the group, as the inventory describes it."""

    name: str
    ssh: list[str]  # argv up to and including the destination (user@host)
    volumes: list[str]
    python: str = "python3"
    pythonpath: str | None = None
    provider: dict[str, Any] | None = None
    writers: list[dict[str, Any]] = field(default_factory=list)
    # How ``python`` runs the host's agent: quiesce's, or one that speaks its protocol
    # (a negative control brings an agent with a fault: quiesce_testing.faults).
    agent: tuple[str, ...] = ("-m", "quiesce.integrations.fleet.agent")

    def argv(self) -> list[str]:
        remote = [self.python, *self.agent]
        if self.pythonpath:
            remote = ["env", f"PYTHONPATH={self.pythonpath}", *remote]
        return [*self.ssh, *remote]


@dataclass
class Link:
    """The controller's end of one agent: its ssh process and channel."""

    member: Member
    p: subprocess.Popen[bytes]
    rx: LineReader
    before: Offset | None = None
    after: Offset | None = None
    last: dict[str, Any] = field(default_factory=dict)  # its last message per op
    closed: bool = False

    @property
    def name(self) -> str:
        return self.member.name

    def send(self, msg: dict[str, Any]) -> bool:
        assert self.p.stdin is not None
        ok = not self.closed and write(self.p.stdin.fileno(), msg)
        if not ok:
            self.closed = True
        return ok


class Group:
    def __init__(
        self,
        members: list[Member],
        *,
        name: str = "fleet",
        mode: str = "hosts",
        command: list[str] | None = None,
        command_timeout: float = 10.0,
        deadline_s: float = 30.0,
        lease_s: float = 5.0,
        hold_s: float = 0.03,
        lead_s: float = 0.3,
        connect_s: float = 20.0,
        watch_pids: list[int] | None = None,
        attempts: int = 3,
        stagger_s: float = 0.0,
    ) -> None:
        """``stagger_s`` > 0 (a negative control's knob; mode hosts) arms the hosts one at a
        time, each only once the previous one has thawed, to freeze stagger_s + lead_s
        later: frozen spans that cannot overlap, however slow the machine (a clock offset
        of i × stagger_s overlapped under load)."""
        if mode not in ("hosts", "command"):
            raise QuiesceError(f"unknown mode {mode!r}", "use mode: hosts or mode: command")
        for m in members:
            check_writers(m.writers, f"{m.name}: quiesce_writers")
        if mode == "command" and not command:
            raise QuiesceError("mode command needs a command", "set command: [argv...]")
        self.members = members
        self.stagger_s = stagger_s
        self.name, self.mode, self.command = name, mode, command
        self.command_timeout = command_timeout
        self.deadline_s, self.lease_s, self.hold_s, self.lead_s = (
            deadline_s,
            lease_s,
            hold_s,
            lead_s,
        )
        self.connect_s = connect_s
        self.watch_pids = [p for p in (watch_pids or []) if p > 1]
        self.links: list[Link] = []
        self.failures: list[dict[str, str]] = []
        self.events: list[str] = []
        self.last_renew = 0.0
        self.command_span: tuple[int, int] | None = None
        self.command_result: dict[str, Any] | None = None
        self.thaw_sent: int | None = None
        self.attempts = attempts
        self.attempt = 0
        self.retries: list[dict[str, Any]] = []

    # -- plumbing -----------------------------------------------------------------------
    def fail(self, host: str, why: str) -> None:
        self.failures.append({"host": host, "why": why})

    def check_controller(self) -> None:
        for pid in self.watch_pids:
            if not pids.pid_alive(pid):
                raise ControllerGone(f"the controller process {pid} died")

    def renew(self) -> None:
        now = time.monotonic()
        if now - self.last_renew >= self.lease_s / 4:
            self.last_renew = now
            for link in self.links:
                link.send({"op": "renew"})

    def collect(self, links: list[Link], want: set[str], timeout: float) -> dict[str, dict]:
        """Wait for one message with op in ``want`` (or "failed") from each of ``links``,
        renewing leases and watching the controller meanwhile. A link that closes or stays
        silent is recorded as failed. Stops early (returns) at the first failure."""
        got: dict[str, dict[str, Any]] = {}
        end = time.monotonic() + timeout
        while len(got) < len(links):
            self.check_controller()
            self.renew()
            pending = [lk for lk in links if lk.name not in got]
            for lk in pending:
                msg = lk.rx.read(0)
                while msg is not None and msg.get("op") not in want | {"failed"}:
                    lk.last[str(msg.get("op"))] = msg
                    msg = lk.rx.read(0)
                if msg is not None:
                    msg["_rx"] = time.monotonic_ns()
                    lk.last[str(msg.get("op"))] = msg
                    got[lk.name] = msg
                    if msg.get("op") == "failed":
                        self.fail(lk.name, f"{msg.get('failed_at')}: {msg.get('error')}")
                        return got
                elif lk.rx.eof or lk.p.poll() is not None:
                    err = b""
                    if lk.p.stderr is not None:
                        with contextlib.suppress(OSError):
                            os.set_blocking(lk.p.stderr.fileno(), False)
                            err = lk.p.stderr.read() or b""
                    why = err.decode(errors="replace").strip().splitlines()
                    self.fail(lk.name, f"channel closed: {why[-1] if why else 'no output'}")
                    lk.closed = True
                    return got
            if len(got) == len(links):
                break
            if time.monotonic() > end:
                for lk in pending:
                    if lk.name not in got:
                        self.fail(lk.name, f"no answer ({'/'.join(sorted(want))}) in {timeout:g}s")
                return got
            fds = [lk.p.stdout.fileno() for lk in pending if lk.p.stdout and not lk.rx.eof]
            select.select(fds, [], [], 0.02)
        return got

    def broadcast(self, msg: dict[str, Any]) -> None:
        for lk in self.links:
            lk.send(msg)

    # -- steps --------------------------------------------------------------------------
    def connect(self) -> None:
        for m in self.members:
            try:
                # ssh (its agent socket, its config): our environment minus every secret
                # quiesce read
                p = proc.spawn(m.argv(), stdin=subprocess.PIPE, env=proc.child_env(inherit=("",)))
            except OSError as e:
                self.fail(m.name, f"cannot start ssh: {e}")
                continue
            assert p.stdout is not None
            self.links.append(Link(m, p, LineReader(p.stdout.fileno())))
        if not self.failures:
            self.collect(self.links, {"hello"}, self.connect_s)

    def clocks(self, attr: str) -> None:
        for lk in self.links:
            samples = []
            for _ in range(PINGS):
                c0 = time.monotonic_ns()
                lk.send({"op": "ping"})
                got = self.collect([lk], {"pong"}, 5.0)
                c1 = time.monotonic_ns()
                if lk.name not in got:
                    return
                samples.append((c0, int(got[lk.name]["t"]), c1))
            setattr(lk, attr, Offset.from_samples(samples))

    def prepare(self) -> None:
        for lk in self.links:
            m = lk.member
            lk.send({"op": "prepare", "name": self.name, "host": m.name, "volumes": m.volumes,
                     "provider": m.provider if self.mode == "hosts" else None,
                     "writers": m.writers, "deadline_s": self.deadline_s,
                     "lease_s": self.lease_s})  # fmt: skip
        self.collect(self.links, {"prepared"}, 60.0)

    def ready(self) -> bool:
        """Writers quiesced and guardians armed on every host, before anything freezes (a
        CHECKPOINT can take longer than the lead): else abort everywhere, False."""
        self.broadcast({"op": "quiesce"})
        self.collect(self.links, {"quiesced"}, self.deadline_s)
        if self.failures:
            self.abort(exclude=set())
        return not self.failures

    def window_hosts(self) -> None:
        if not self.ready():  # the instant is picked after: no host starts late
            return
        if self.stagger_s > 0:
            self._window_one_after_another()
            return
        t = time.monotonic_ns() + int(self.lead_s * 1e9)
        hold = int(self.hold_s * 1e9)
        self.agreed_ns = t
        for lk in self.links:
            assert lk.before is not None
            lk.send({"op": "arm", "freeze_at": lk.before.to_host(t),
                     "thaw_at": lk.before.to_host(t + hold)})  # fmt: skip
        budget = self.lead_s + self.hold_s + self.deadline_s
        got = self.collect(self.links, {"thawed"}, budget)
        if self.failures:
            self.abort(exclude=set(got))

    def _window_one_after_another(self) -> None:
        """The negative control: host i is armed only after host i-1's "thawed" came
        back, so its freeze begins after that thaw ended (by causality, not by a clock)."""
        hold = int(self.hold_s * 1e9)
        done: set[str] = set()
        for lk in self.links:
            assert lk.before is not None
            at = time.monotonic_ns() + int((self.lead_s + self.stagger_s) * 1e9)
            lk.send({"op": "arm", "freeze_at": lk.before.to_host(at),
                     "thaw_at": lk.before.to_host(at + hold)})  # fmt: skip
            budget = self.lead_s + self.stagger_s + self.hold_s + self.deadline_s
            done |= set(self.collect([lk], {"thawed"}, budget))
            if self.failures:
                self.abort(exclude=done)
                return

    def window_command(self) -> None:
        if not self.ready():  # then every host's freeze is only its ioctls
            return
        self.broadcast({"op": "freeze"})
        got = self.collect(self.links, {"frozen"}, self.deadline_s)
        if self.failures or len(got) < len(self.links):
            self.abort(exclude=set())
            return
        assert self.command is not None
        c0 = time.monotonic_ns()
        p = proc.spawn(self.command, stdin=subprocess.DEVNULL, env=proc.child_env(inherit=("",)))
        try:
            out, err = self._wait_command(p)
        finally:
            c1 = time.monotonic_ns()
            if p.poll() is None:
                proc.kill_group(p)
        self.command_span = (c0, c1)
        self.command_result = {"rc": p.returncode, "stdout": out, "stderr": err,
                               "duration_s": (c1 - c0) / 1e9}  # fmt: skip
        self.thaw_sent = time.monotonic_ns()
        self.broadcast({"op": "thaw"})
        self.collect(self.links, {"thawed"}, 10.0)
        if p.returncode != 0:
            self.fail("controller", f"the group command exited with {p.returncode}: {err[-200:]}")

    def _wait_command(self, p: subprocess.Popen[bytes]) -> tuple[str, str]:
        end = time.monotonic() + self.command_timeout
        while p.poll() is None:
            self.check_controller()
            self.renew()
            if time.monotonic() > end:
                proc.kill_group(p)
                raise QuiesceError(f"the group command did not finish in {self.command_timeout:g}s")
            time.sleep(0.005)
        out = p.stdout.read().decode(errors="replace") if p.stdout else ""
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        return out, err

    def abort(self, exclude: set[str]) -> None:
        """Every host thaws now; wait (briefly) for their accounts."""
        self.events.append("abort")
        self.broadcast({"op": "abort"})
        rest = [lk for lk in self.links if lk.name not in exclude and not lk.closed]
        end = time.monotonic() + 10
        for lk in rest:
            while time.monotonic() < end and "thawed" not in lk.last and "failed" not in lk.last:
                self.renew()
                msg = lk.rx.read(min(max(end - time.monotonic(), 0.0), self.lease_s / 4))
                if msg is None:
                    break
                lk.last[str(msg.get("op"))] = msg

    def spans(self) -> list[FrozenSpan]:
        out = []
        for lk in self.links:
            rec = lk.last.get("thawed") or {}
            if not rec.get("ok") or lk.before is None or rec.get("frozen_at") is None:
                continue
            off = lk.before.combine(lk.after) if lk.after else lk.before
            early = rec.get("expired_reason") if rec.get("thawed_by") == "guardian" else None
            early = early or rec.get("thaw_error")
            seen = (lk.last.get("frozen") or {}).get("_rx")
            # "No thaw before the controller sent thaw" holds only for a host that thawed
            # because it was told to; one that thawed by itself is judged by its record.
            told = self.thaw_sent if rec.get("thaw_reason") == "thaw" else None
            out.append(FrozenSpan(lk.name, int(rec["frozen_at"]), int(rec["thaw_from"]),
                                int(rec["start_ns"]), int(rec["end_ns"]), off, early,
                                seen, told))  # fmt: skip
        return out

    def delete_all(self) -> list[str]:
        have = [lk for lk in self.links if (lk.last.get("thawed") or {}).get("snapshots")]
        for lk in have:
            lk.send({"op": "delete"})
        got = self.collect(have, {"deleted"}, 60.0) if have else {}
        return [i for r in got.values() for i in r.get("deleted", [])]

    def close(self) -> None:
        for lk in self.links:
            lk.send({"op": "bye"})
            if lk.p.stdin:
                with contextlib.suppress(OSError):
                    lk.p.stdin.close()
        for lk in self.links:
            try:
                lk.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill_group(lk.p)
            for f in (lk.p.stdout, lk.p.stderr):
                if f:
                    f.close()

    # -- the run ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        verdict: Verdict | None = None
        deleted: list[str] = []
        try:
            self.connect()
            if not self.failures:
                self.clocks("before")
            if not self.failures:
                self.prepare()
            for attempt in range(1, self.attempts + 1):
                self.attempt = attempt
                verdict = self.one_window()
                if self.failures or verdict.consistent:
                    break
                late = self.lateness()
                if self.mode != "hosts" or late is None or attempt == self.attempts:
                    break
                deleted += self.delete_all()
                # Only the hold was too short for how late the hosts froze: nothing is
                # kept from this attempt; the next one holds long enough for that.
                self.retries.append({"hold_s": self.hold_s, "late_s": late,
                                     "reasons": verdict.reasons})  # fmt: skip
                self.hold_s = max(2 * self.hold_s, 1.5 * late + 0.05)
                for lk in self.links:
                    lk.last.clear()
                self.clocks("before")
            if verdict is not None and (self.failures or not verdict.consistent):
                deleted += self.delete_all()
        finally:
            self.close()
        return self.report(verdict, deleted, time.monotonic() - t0)

    def one_window(self) -> Verdict:
        if not self.failures:
            (self.window_hosts if self.mode == "hosts" else self.window_command)()
            self.clocks("after")
        verdict = judge(self.spans(), [m.name for m in self.members])
        if self.command_span and verdict.overlap_ctrl_ns:
            frozen_by, thaw_from = verdict.overlap_ctrl_ns
            c0, c1 = self.command_span
            if not (frozen_by < c0 and c1 < thaw_from):
                verdict.consistent = False
                verdict.reasons.append("the group command did not run inside the instant")
        return verdict

    def lateness(self) -> float | None:
        """How late the latest host froze after the agreed instant (s), if every host
        froze and thawed on its own: then only the hold was too short."""
        recs = [lk.last.get("thawed") or {} for lk in self.links]
        if not all(r.get("ok") and r.get("late_s") is not None for r in recs):
            return None
        if any(r.get("thaw_reason") != "hold" or r.get("thaw_error") for r in recs):
            return None
        return max(float(r["late_s"]) for r in recs)

    def report(self, v: Verdict | None, deleted: list[str], took: float) -> dict[str, Any]:
        ok = v is not None and v.consistent and not self.failures
        hosts = {}
        for lk in self.links:
            rec = lk.last.get("thawed") or lk.last.get("failed") or {}
            off = lk.before.combine(lk.after) if lk.before and lk.after else lk.before
            hosts[lk.name] = {
                "offset_s": off.offset_ns / 1e9 if off else None,
                "clock_error_s": off.error_ns / 1e9 if off else None,
                "thaw_reason": rec.get("thaw_reason"),
                "thawed_by": rec.get("thawed_by"),
                "error": rec.get("error"),
                "snapshots": [s.get("location") for s in rec.get("snapshots") or []],
                "writers": rec.get("writers") or [],  # done_ns: this host's clock
                "freeze_at_ns": rec.get("freeze_at"),  # the agreed instant, this host's clock
                "late_s": rec.get("late_s"),  # frozen this long after it
                "window_s": (v.host_windows_s.get(lk.name) if v else None),
            }
        for m in self.members:
            hosts.setdefault(m.name, {"error": "not reached"})
        return {
            "name": self.name,
            "mode": self.mode,
            "hosts": len(self.members),
            "consistent": ok,
            "kept": ok,
            "failed": self.failures,
            "reasons": (v.reasons if v else [])
            + [f"{f['host']}: {f['why']}" for f in self.failures],
            "window_s": v.window_s if v else None,
            "skew_s": v.skew_s if v else None,
            "overlap_s": v.overlap_s if v else None,
            "max_host_window_s": max(v.host_windows_s.values(), default=None) if v else None,
            "command": self.command_result,
            "deleted": deleted,
            "per_host": hosts,
            "took_s": took,
            "hold_s": self.hold_s if self.mode == "hosts" else None,
            "attempts": self.attempt,
            "retries": self.retries,
        }


def ancestors(pid: int | None = None) -> list[int]:
    """This process's parents up to (not including) init: the controller's chain."""
    out, pid = [], pid or os.getpid()
    for _ in range(16):
        fields = pids.stat_fields(pid)
        try:
            ppid = int(fields[1]) if fields else 0
        except ValueError:
            break
        if ppid <= 1:
            break
        out.append(ppid)
        pid = ppid
    return out


def run_group(members: list[Member], **kw: Any) -> dict[str, Any]:
    """One group snapshot across ``members``; the report (``consistent`` says all)."""
    return Group(members, **kw).run()
