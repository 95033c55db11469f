"""A writer that hops across the fleet, and the checker that judges a cut of it.

Record n (1, 2, 3, ...) goes to host ``n mod N``, appended to a file on that host's data
filesystem and fsync'd there, and record n+1 is sent only after record n was acknowledged:
the records form one causal chain across hosts. So in any cut taken at one instant on
every host, the union of the hosts' files is a prefix 1..k of the sequence; a cut in which
some record is present while an earlier one is missing was not taken at one instant (a
snapshot of host A from before, of host B from after, a write both depend on).

Each host has one long-lived *agent* (this file run as a script, stdlib only) inside its
namespace that holds the file open: the driver sends "n" on its stdin, the agent writes,
fsyncs and answers "ack n". Reaching the agent through ``nsenter`` costs a pipe round trip
per record on top of the fsync; through ``ssh`` it adds TCP, encryption and sshd's relay
on every record (``transport="ssh"`` keeps that path to measure it). Both keep one process
per host for the whole run: spawning per record (nsenter or ssh) would cost more than the
fsync itself and vary with the machine's load.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Host = Any  # quiesce_testing.ground.Host (not imported: ground imports this module)

AGENT = os.path.abspath(__file__)


def agent(path: str) -> None:
    """Run on a host: append each number read on stdin to ``path``, fsync, ack it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        n = int(line)
        os.write(fd, b"%d\n" % n)
        os.fsync(fd)
        out.write(b"ack %d\n" % n)
        out.flush()
    os.close(fd)


class HoppingWriter:
    """Drives one agent per host from a thread; stop() waits for the record in flight."""

    def __init__(
        self,
        hosts: Sequence[Host],
        name: str = "records.log",
        *,
        transport: str = "nsenter",
        ssh_key: str | os.PathLike[str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.hosts = list(hosts)
        self.name = name
        self.acked = 0
        self.ack_times: list[float] = []  # ack_times[n-1]: monotonic time record n was acked
        self.latencies: list[float] = []  # send -> ack, per record
        self.error: BaseException | None = None
        self._stop = threading.Event()
        from quiesce.host import proc  # here: this file also runs as the stdlib-only agent

        self.agents: list[subprocess.Popen[bytes]] = []
        for h in self.hosts:
            cmd = [python, "-I", "-S", AGENT, "agent", self.path(h)]
            if transport == "nsenter":
                argv, fds = h.nsenter(*cmd), h.fds
            elif transport == "ssh":
                argv, fds = ssh_argv(h, str(ssh_key), *cmd), ()
            else:
                raise ValueError(f"unknown transport {transport!r}")
            p = proc.spawn(argv, stdin=subprocess.PIPE, stderr=None, pass_fds=fds)
            self.agents.append(p)
            assert p.stdout is not None
            line = p.stdout.readline()
            if line != b"ready\n":
                self.stop()
                raise RuntimeError(f"{h.name}: writer agent did not start: {line!r}")
        self._thread = threading.Thread(target=self._run, name="hopping-writer", daemon=True)
        self._thread.start()

    def path(self, host: Host) -> str:
        return f"{host.data.mountpoint}/{self.name}"

    def _run(self) -> None:
        n_hosts = len(self.agents)
        try:
            while not self._stop.is_set():
                n = self.acked + 1
                p = self.agents[n % n_hosts]
                assert p.stdin is not None and p.stdout is not None
                t0 = time.monotonic()
                p.stdin.write(b"%d\n" % n)
                p.stdin.flush()
                reply = p.stdout.readline()
                if reply != b"ack %d\n" % n:
                    raise RuntimeError(f"record {n}: agent answered {reply!r}")
                now = time.monotonic()
                self.latencies.append(now - t0)
                self.ack_times.append(now)
                self.acked = n
        except BaseException as e:  # reported by stop() / check()
            self.error = e

    def wait_for(self, records: int, timeout: float = 10) -> None:
        """Block until at least ``records`` more records are acknowledged."""
        target = self.acked + records
        deadline = time.monotonic() + timeout
        while self.acked < target:
            if self.error or time.monotonic() > deadline:
                raise RuntimeError(f"writer stalled at {self.acked}: {self.error}")
            time.sleep(0.001)

    def acked_before(self, t: float) -> int:
        """The highest record acknowledged before monotonic time ``t``."""
        return sum(1 for at in list(self.ack_times) if at < t)

    def stats(self) -> dict[str, float]:
        """Per-record latency (s): median, p99, max; records acked."""
        lat = sorted(self.latencies) or [0.0]
        return {
            "records": float(self.acked),
            "median_s": statistics.median(lat),
            "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "max_s": lat[-1],
        }

    def stop(self) -> dict[str, float]:
        """Stop after the record in flight (its host must be thawed), end the agents."""
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join(timeout=30)
        for p in self.agents:
            if p.stdin:
                p.stdin.close()
        for p in self.agents:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            if p.stdout:
                p.stdout.close()
        if self.error:
            raise RuntimeError(f"hopping writer failed: {self.error!r}")
        return self.stats()


def ssh_argv(host: Host, key: str, *cmd: str) -> list[str]:
    """ssh to a fleet host as root with the run's key (no known_hosts, no prompts)."""
    return [
        "ssh", "-i", key, "-p", str(host.port), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR", f"root@{host.address}", *cmd,
    ]  # fmt: skip


@dataclass
class Cut:
    """The records found in one copy per host, and what is wrong with them as a cut."""

    per_host: list[list[int]]
    records: set[int] = field(default_factory=set)
    highest: int = 0
    missing: list[int] = field(default_factory=list)  # absent, yet a later one is present

    @property
    def consistent(self) -> bool:
        return not self.missing

    @property
    def prefix(self) -> int:
        """k such that 1..k are all present."""
        return (min(self.missing) - 1) if self.missing else self.highest


def check_cut(copies: Sequence[bytes]) -> Cut:
    """Judge a cut: ``copies[i]`` is host i's file as captured.

    A trailing line without its newline is a record not (fully) written: ignored. A record
    on the wrong host, duplicated or out of order means a broken writer: ValueError.
    """
    n_hosts = len(copies)
    per_host: list[list[int]] = []
    for i, data in enumerate(copies):
        complete = data[: data.rfind(b"\n") + 1]
        seqs = [int(x) for x in complete.split()]
        if any(n % n_hosts != i for n in seqs) or seqs != sorted(set(seqs)):
            raise ValueError(f"host {i}: records misplaced or out of order: {seqs[:20]}...")
        per_host.append(seqs)
    records = {n for seqs in per_host for n in seqs}
    highest = max(records, default=0)
    missing = [n for n in range(1, highest) if n not in records]
    return Cut(per_host, records, highest, missing)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "agent":
        sys.exit("usage: ground_writer.py agent PATH")
    agent(sys.argv[2])
