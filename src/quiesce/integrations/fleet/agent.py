"""The per-host agent: started over SSH by the controller, the Freezer's controller here.

Its stdin is the SSH channel. It thaws at once, by itself, when

* the channel ends (EOF: the controller or ansible-playbook died, ssh was killed),
* the controller's lease lapses (no message for ``lease_s``: the network broke, the
  controller is stopped), or
* the group's deadline passes (the guardian's own deadline, counted from the freeze);

and when the agent itself dies or stops, its guardian thaws (controller death, lease).
So a host never depends on the controller to thaw: the controller can only make it
thaw *sooner*.

Times are this host's ``CLOCK_MONOTONIC`` in ns; the controller maps them onto its own
clock with the offsets it measures with ``ping`` (see ``clock``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from typing import Any

from quiesce.errors import QuiesceError
from quiesce.integrations.fleet.wire import LineReader, write

IDLE_LEASE_S = 30.0  # before prepare: a controller that says nothing is gone


def _now() -> int:
    return time.monotonic_ns()


def _error(e: BaseException) -> dict[str, Any]:
    if isinstance(e, QuiesceError):
        return {"error": e.message, "hint": e.hint, "kind": type(e).__name__}
    return {"error": f"{type(e).__name__}: {e}", "kind": type(e).__name__}


WRITER_KINDS = {  # a spec's "type" -> the built-in writer's name in quiesce.apps.writers
    "sqlite": "SqliteWriter",
    "postgresql": "PostgresWriter",
    "mysql": "MysqlWriter",
}
NO_PASSWORD = (
    "keep passwords out of the inventory: a ~/.pgpass (or PGPASSFILE) for postgresql, "
    "defaults_file for mysql, on the host"
)


def check_writers(specs: list[dict[str, Any]], where: str) -> list[Any]:
    """Each spec as its writer's config model (the one a job's ``[[writers.<type>]]``
    table is), refusing what cannot work or must not travel, before anything starts:
    an unknown type or key, a bad value, or a password (in the spec or a DSN), which
    Ansible would show in its output."""
    from pydantic import ValidationError

    configs = []
    for i, spec in enumerate(specs):
        key = f"{where}[{i}]"
        if not isinstance(spec, dict) or spec.get("type") not in WRITER_KINDS:
            kind = spec.get("type") if isinstance(spec, dict) else spec
            raise QuiesceError(f"{key}: unknown writer type {kind!r}",
                               f"use one of: {', '.join(sorted(WRITER_KINDS))}")  # fmt: skip
        if "password" in spec:
            raise QuiesceError(f"{key}: a password in the writer's settings", NO_PASSWORD)
        model = _writer_class(spec["type"]).Config
        try:
            configs.append(model.model_validate({k: v for k, v in spec.items() if k != "type"}))
        except ValidationError as e:
            raise _spec_error(key, spec["type"], model, e) from None
    return configs


def _spec_error(key: str, kind: str, model: Any, e: Any) -> QuiesceError:
    """The first thing wrong with a writer spec, at its key, with what to write."""
    err = e.errors()[0]
    at = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return QuiesceError(f"{key}: unknown key {at!r} for a {kind} writer",
                            f"use: {', '.join(sorted(model.model_fields))}")  # fmt: skip
    if err["type"] == "job_problem":
        hint = str(err["ctx"]["hint"])
        if "password" in err["msg"]:
            hint = NO_PASSWORD
        return QuiesceError(f"{key}: {err['msg']}", hint)
    return QuiesceError(f"{key}: {at}: {err['msg']}", "see docs/fleet.md for the writers' keys")


def _writer_class(kind: str) -> Any:
    from quiesce.apps import writers  # its lazy exports import only the one asked for

    return getattr(writers, WRITER_KINDS[kind])


def _build_writers(specs: list[dict[str, Any]]) -> list[Any]:
    """Built-in writers from their specs ({"type": "sqlite", "databases": [...]}, ...),
    each given its config model; a ``password_env`` is read on this host."""
    from quiesce.job.build import writer_password

    out = []
    for i, (spec, config) in enumerate(zip(specs, check_writers(specs, "writers"), strict=True)):
        cls = _writer_class(spec["type"])
        password_env = getattr(config, "password_env", None)
        if password_env is None:
            out.append(cls(config))
        else:
            out.append(cls(config, password=writer_password(password_env, f"writers[{i}]")))
    return out


class Agent:
    def __init__(self, rfd: int = 0, wfd: int = 1) -> None:
        self.rx = LineReader(rfd)
        self.wfd = wfd
        self.lease_s = IDLE_LEASE_S
        self.plan: Any = None
        self.provider: Any = None
        self.writers: list[Any] = []
        self.quiesced: list[Any] = []
        self.freezer: Any = None
        self.deadline_s = 30.0
        self.name = "fleet"
        self.snaps: list[Any] = []
        self.record: dict[str, Any] = {}
        self.done = False
        self.last_heard = _now()
        self.ready = False  # writers quiesced and guardian armed for the next instant

    def send(self, msg: dict[str, Any]) -> None:
        if not write(self.wfd, msg):
            self.done = True  # the channel is gone: whatever is frozen thaws below

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        self.send({"op": "hello", "pid": os.getpid(), "t": _now()})
        try:
            while not self.done:
                msg = self.rx.read(self.lease_s)
                if msg is None:
                    self.record["thaw_reason"] = "eof" if self.rx.eof else "controller-lease"
                    break
                self.last_heard = _now()
                self.handle(msg)
        finally:
            self.unwind()

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        try:
            if op == "ping":
                self.send({"op": "pong", "t": _now()})
            elif op == "renew":
                pass
            elif op == "prepare":
                self.prepare(msg)
            elif op == "freeze":
                if not self.ready:  # a controller that did not send "quiesce" first
                    self.quiesce_writers()
                self.ready = False
                self.freeze()
                self.send({"op": "frozen", "ok": True, **self.record})
                self.frozen_sent()
            elif op == "quiesce":
                self.ready_to_freeze()
            elif op == "arm":
                self.armed(int(msg["freeze_at"]), int(msg["thaw_at"]))
            elif op in ("thaw", "abort"):
                self.thaw(op)
            elif op == "delete":
                self.delete()
            elif op == "bye":
                self.done = True
            else:
                self.send({"op": "error", "error": f"unknown op {op!r}"})
        except Exception as e:
            self.fail(op, e)

    def frozen_sent(self) -> None:
        """After "frozen" went out (mode command): nothing to do here; an agent with a
        fault (quiesce_testing.faults) thaws unasked at this point."""

    def fail(self, op: Any, e: BaseException) -> None:
        """Any failure: thaw first (the Freezer rolled back its own group already)."""
        self.record.update(_error(e), failed_at=op)
        if os.environ.get("QUIESCE_FLEET_DEBUG"):
            self.record["traceback"] = traceback.format_exc()
        self.thaw_now("failed")
        self.send({"op": "failed", "ok": False, **self.record})

    # -- steps ------------------------------------------------------------------------
    def prepare(self, msg: dict[str, Any]) -> None:
        """Resolve the plan, check and prepare the provider, syncfs: nothing frozen."""
        from quiesce.freezing.plan import make_plan
        from quiesce.host import kernel

        self.name = str(msg.get("name") or "fleet")
        self.deadline_s = float(msg.get("deadline_s", 30.0))
        self.lease_s = float(msg.get("lease_s", 5.0))
        self.plan = make_plan(list(msg["volumes"]))
        self.plan.check()
        members = [m for m in self.plan.members if not m.skip]
        spec = msg.get("provider")
        if spec:
            from quiesce.providers.registry import get_provider

            spec = dict(spec)
            self.provider = get_provider(spec.pop("type"))(spec.get("options") or {})
            self.provider.check(members)
            self.provider.prepare(members, f"{self.name}-{msg.get('host', 'host')}")
        self.writers = _build_writers(list(msg.get("writers") or []))
        t0 = _now()
        for m in members:
            with contextlib.suppress(OSError):
                kernel.syncfs(m.fd)
        self.send(
            {
                "op": "prepared",
                "ok": True,
                "syncfs_s": (_now() - t0) / 1e9,
                "volumes": [
                    {"mount_point": m.name, "dev": m.volume.dev, "fstype": m.volume.fstype}
                    for m in members
                ],
            }
        )

    def quiesce_writers(self) -> None:
        """Each writer's lock (or checkpoint) before the freeze; the report says which
        writers quiesced, how long that took and what they learned (``info``)."""
        for w in self.writers:
            t0 = _now()
            w.before_freeze()
            self.quiesced.append(w)
            done = _now()
            self.record.setdefault("writers", []).append(
                {"kind": w.kind, "name": w.name, "quiesce_s": (done - t0) / 1e9, "done_ns": done}
            )

    def release_writers(self, ok: bool) -> None:
        accounts = self.record.get("writers", [])
        while self.quiesced:
            w = self.quiesced.pop()
            try:
                w.after_thaw(ok)
            except Exception as e:
                self.record.setdefault("warnings", []).append(f"{w.name}: {e}")
            if len(self.quiesced) < len(accounts):  # the account made when it quiesced
                accounts[len(self.quiesced)]["info"] = dict(w.info)

    def arm(self) -> None:
        """Start this host's guardian ahead of the freeze (Freezer.arm), so that the
        freeze at the agreed instant is only the ioctls."""
        from quiesce.freezing.freezer import Freezer

        if self.plan is None:
            raise QuiesceError("freeze before prepare", "send prepare first")
        if self.freezer is None:
            self.freezer = Freezer(
                self.plan, timeout=self.deadline_s, lease=min(self.lease_s, 5.0), syncfs=False
            )
            self.freezer.arm()
            if self.provider is not None:
                self.provider.before_freeze([m for m in self.plan.members if not m.skip])

    def freeze(self) -> None:
        self.arm()
        self.record["freeze_called"] = _now()
        window = self.freezer.freeze()
        self.record["frozen_at"] = _now()  # every volume of this host is frozen from here
        self.record["start_ns"] = window.start_ns
        self.record["guardian_pid"] = window.guardian_pid

    def snapshot(self) -> None:
        if self.provider is None:
            return
        members = [m for m in self.plan.members if not m.skip]
        t0 = _now()
        self.snaps = self.provider.snapshot(members)
        self.record["snapshot_s"] = (_now() - t0) / 1e9
        self.record["snapshots"] = [s.to_dict() for s in self.snaps]

    def ready_to_freeze(self) -> None:
        """Before the freeze (mode a: before the instant is picked): quiesce the writers and
        start the guardian (a new attempt), then say so. Every host is ready before any
        freezes, so a slow writer (a long CHECKPOINT) neither makes its host freeze late
        nor keeps the other hosts frozen while it works."""
        self.record = {}
        t0 = _now()
        self.quiesce_writers()
        self.arm()
        self.ready = True
        self.send({"op": "quiesced", "ok": True, "ready_s": (_now() - t0) / 1e9})

    def armed(self, freeze_at: int, thaw_at: int) -> None:
        """Mode (a): freeze at an agreed instant, snapshot, hold, thaw; no round trip.

        Only a message from the controller ("abort") or its silence (EOF, lease) can cut
        the hold short; nothing is waited for from it."""
        if not self.ready:  # a controller that did not send "quiesce" first
            self.record = {}
            self.quiesce_writers()
            self.arm()
        self.ready = False
        self.record["freeze_at"] = freeze_at
        self.send({"op": "armed", "t": _now()})
        if not self._wait_until(freeze_at):
            self.thaw_now(self.record.get("thaw_reason", "abort"))
            self.send({"op": "thawed", "ok": False, **self.record})
            return
        self.freeze()
        self.record["late_s"] = (self.record["frozen_at"] - freeze_at) / 1e9
        self.send({"op": "frozen", "ok": True, "frozen_at": self.record["frozen_at"]})
        self.snapshot()
        why = "hold" if self._wait_until(thaw_at) else self.record.get("thaw_reason", "abort")
        self.thaw_now(why)
        self.send({"op": "thawed", "ok": True, **self.record})

    def _wait_until(self, t: int) -> bool:
        """Sleep until monotonic ``t`` (ns); False if the controller aborted or vanished."""
        while True:
            left = (t - _now()) / 1e9
            if left <= 0:
                return True
            silent = (_now() - self.last_heard) / 1e9
            if silent >= self.lease_s:
                self.record["thaw_reason"] = "controller-lease"
                self.done = True
                return False
            msg = self.rx.read(min(left, self.lease_s - silent))
            if msg is None:
                if self.rx.eof:
                    self.record["thaw_reason"] = "eof"
                    self.done = True
                    return False
                continue
            self.last_heard = _now()
            if msg.get("op") == "abort":
                self.record["thaw_reason"] = "abort"
                return False
            if msg.get("op") == "ping":
                self.send({"op": "pong", "t": _now()})

    def thaw(self, why: str) -> None:
        self.thaw_now(why)
        self.send({"op": "thawed", "ok": True, **self.record})

    def thaw_now(self, why: str) -> None:
        """Thaw what this host froze (idempotent); record when and how, release writers."""
        f, self.freezer = self.freezer, None
        self.ready = False
        if f is not None:
            self.record["thaw_from"] = _now()  # nothing frozen by us is thawed before this
            self.record["thaw_reason"] = why
            try:
                window = f.thaw(raise_errors=True)
            except QuiesceError as e:
                window = f.window
                self.record["thaw_error"] = e.message
            self.record["end_ns"] = window.end_ns
            self.record["thawed_by"] = window.thawed_by
            self.record["expired_reason"] = window.expired_reason
            self.record["window"] = window.to_dict()
        self.release_writers(ok="thaw_error" not in self.record)

    def delete(self) -> None:
        """Remove this host's snapshots (the group is not kept)."""
        deleted, errors = [], []
        for s in self.snaps:
            try:
                self.provider.delete(s)
                deleted.append(s.id)
            except Exception as e:
                errors.append(f"{s.id}: {e}")
        self.snaps = []
        self.send({"op": "deleted", "ok": not errors, "deleted": deleted, "errors": errors})

    def unwind(self) -> None:
        """Leaving, for whatever reason: nothing stays frozen or locked."""
        self.thaw_now(self.record.get("thaw_reason") or "exit")
        if self.provider is not None:
            with contextlib.suppress(Exception):
                self.provider.abort()
        if self.plan is not None:
            with contextlib.suppress(Exception):
                self.plan.close()


def main(agent: type[Agent] = Agent) -> None:
    sys.dont_write_bytecode = True  # nothing may land on a frozen volume
    os.chdir("/")
    agent().run()


if __name__ == "__main__":
    main()
