"""command: run any storage CLI (array snapshot, replica split, cloud CLI) in the window.

The command is an argv list (no shell unless you write ``["sh", "-c", "..."]``; a string
option is split with shlex). It is started just before the freeze and held before its
exec (:class:`quiesce.host.proc.Gated`) until the volumes are frozen, so the window holds
the command's own run, not the start of a process; it runs in its own process group,
with a hard timeout: on timeout the whole group is killed and the window closes anyway.
Its binary lives off the group (refused otherwise). It learns the volumes from

* environment: ``QUIESCE_VOLUMES``, ``QUIESCE_DEVICES``, ``QUIESCE_FSTYPES`` (one entry
  per line, in the same order) and ``QUIESCE_SNAPSHOT_NAME``;
* stdin: JSON ``{"name": ..., "volumes": [{"mount_point", "paths", "device", "fstype",
  "dev"}]}``.

Its stdout and stderr go to pipes (memory), never to a file. The **first line of its
stdout is the snapshot id** that ``delete`` gets later (if it prints nothing, the
snapshot name is used). Options:

* ``create``: argv of the snapshot command (required); ``{name}`` is replaced by the
  snapshot name;
* ``delete``: argv run by ``quiesce snapshot delete``; ``{id}`` is replaced by the
  snapshot id (also in ``QUIESCE_SNAPSHOT_ID``);
* ``list``: argv that prints the storage's snapshot ids, one per line;
* ``timeout``: seconds the create command may take inside the window (default 10).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from quiesce.errors import QuiesceError, ToolFailed, UnsafePlan, UsageError
from quiesce.freezing.plan import GroupMember
from quiesce.host import proc
from quiesce.host.mounts import MountTable
from quiesce.providers.base import FreezeMode, Provider, Snapshot, volume_slug
from quiesce.providers.options import CommandOptions

KEEP_OUTPUT = 4096  # bytes of stdout/stderr kept in the manifest


def _text(data: bytes | None) -> str:
    return (data or b"")[-KEEP_OUTPUT:].decode(errors="replace")


def _last_line(data: bytes | None) -> str:
    lines = [ln for ln in _text(data).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def run_bounded(
    argv: list[str], *, stdin: bytes, env: dict[str, str], timeout: float, limit: int = 1 << 20
) -> tuple[int, bytes, bytes, bool]:
    """(returncode, stdout, stderr, timed_out) of ``argv``, its group killed on timeout."""
    try:
        done = proc.run_bounded(argv, timeout=timeout, env=env, input=stdin, limit=limit)
    except OSError as e:
        raise QuiesceError(f"cannot run {argv[0]}: {e.strerror}") from None
    return done.returncode, done.stdout, done.stderr, done.timed_out


class CommandProvider(Provider):
    """Options (:class:`CommandOptions`): ``create`` (required), ``delete``, ``list``,
    ``timeout``."""

    name: ClassVar[str] = "command"
    Options: ClassVar[type[CommandOptions]] = CommandOptions
    config: CommandOptions

    def __init__(
        self, options: CommandOptions | Mapping[str, Any] | None = None, /, **kwargs: Any
    ) -> None:
        super().__init__(options, **kwargs)
        self._argv: list[str] = []
        self._env: dict[str, str] = {}
        self._stdin = b""
        self._snaps: list[Snapshot] = []
        self._deleted: set[str] = set()
        self._gated: proc.Gated | None = None

    @property
    def timeout(self) -> float:
        return self.config.timeout

    def freeze_mode(self, members: Sequence[GroupMember]) -> FreezeMode:
        return FreezeMode.FIFREEZE

    def _resolve(self, argv: list[str], members: Sequence[GroupMember]) -> list[str]:
        exe = shutil.which(argv[0])
        if exe is None:
            raise UsageError(
                f"{argv[0]}: command not found", "give the full path of the tool", option="create"
            )
        exe = os.path.realpath(exe)
        vol = MountTable.read().volume_of_path(exe)
        for m in members:
            if vol is not None and vol.dev == m.volume.dev:
                raise UnsafePlan(
                    f"the snapshot command {exe} lives on {m.name}, a volume of the group",
                    "install the tool on a filesystem that is not frozen",
                    option="create",
                )
        return [exe, *argv[1:]]

    def check(self, members: Sequence[GroupMember]) -> None:
        self._resolve(self.config.create, members)

    def prepare(self, members: Sequence[GroupMember], name: str) -> None:
        argv = self.config.create
        self._argv = [a.replace("{name}", name) for a in self._resolve(argv, members)]
        vols: list[dict[str, Any]] = [
            {
                "mount_point": m.name,
                "paths": m.paths,
                "device": m.volume.source,
                "fstype": m.volume.fstype,
                "dev": m.volume.dev,
            }
            for m in members
        ]
        # the user's command: our environment (its cloud CLI's credentials) but no secret
        # quiesce read (a writer's password): proc.child_env with every prefix
        self._env = proc.child_env(inherit=("",)) | {
            "QUIESCE_VOLUMES": "\n".join(v["mount_point"] for v in vols),
            "QUIESCE_DEVICES": "\n".join(v["device"] for v in vols),
            "QUIESCE_FSTYPES": "\n".join(v["fstype"] for v in vols),
            "QUIESCE_SNAPSHOT_NAME": name,
        }
        self._stdin = json.dumps({"name": name, "volumes": vols}).encode()
        self._snaps = [
            Snapshot(
                id=f"{name}/{volume_slug(m.name)}",
                provider=self.name,
                volume=m.name,
                dev=m.volume.dev,
                fstype=m.volume.fstype,
                created=0.0,
                location=name,
                extra={"command": self._argv},
            )
            for m in members
        ]

    def before_freeze(self, members: Sequence[GroupMember]) -> None:
        """Start the command, held before its exec until :meth:`snapshot` releases it."""
        try:
            self._gated = proc.Gated(self._argv, env=self._env, input=self._stdin, limit=1 << 20)
        except OSError as e:
            raise QuiesceError(f"cannot run {self._argv[0]}: {e.strerror}") from None

    def snapshot(self, members: Sequence[GroupMember]) -> list[Snapshot]:
        t0 = time.monotonic()
        gated, self._gated = self._gated, None
        if gated is None:  # not started before the freeze (a caller without before_freeze)
            rc, out, err, timed_out = run_bounded(
                self._argv, stdin=self._stdin, env=self._env, timeout=self.timeout
            )
        else:
            gated.release()
            done = gated.wait(self.timeout)
            rc, out, err, timed_out = done.returncode, done.stdout, done.stderr, done.timed_out
        took = time.monotonic() - t0
        if timed_out:
            raise ToolFailed(
                f"the snapshot command {self._argv[0]} did not finish within "
                f"{self.timeout:g}s: its process group was killed",
                "the storage may hold a half-made snapshot: check it; raise --option timeout",
                stdout=_text(out),
                stderr=_text(err),
            )
        if rc != 0:
            raise ToolFailed(
                f"the snapshot command {self._argv[0]} exited with {rc}"
                + (f": {_last_line(err)}" if _last_line(err) else ""),
                "run it by hand to see why",
                stdout=_text(out),
                stderr=_text(err),
            )
        first = next((ln.strip() for ln in _text(out).splitlines() if ln.strip()), "")
        now = time.time()
        for s in self._snaps:
            s.created = now
            if first:
                s.location = first
            s.extra |= {"stdout": _text(out), "stderr": _text(err), "duration_s": took}
        return self._snaps

    def abort(self) -> None:
        if self._gated is not None:  # never released: the command does not run
            self._gated.cancel()
            self._gated = None

    def _run_aux(self, what: str, argv: list[str], snap_id: str | None = None) -> bytes:
        if snap_id is not None:
            argv = [a.replace("{id}", snap_id) for a in argv]
        env = proc.child_env({"QUIESCE_SNAPSHOT_ID": snap_id} if snap_id else {}, inherit=("",))
        rc, out, err, timed_out = run_bounded(
            argv, stdin=b"", env=env, timeout=max(self.timeout, 60.0), limit=64 << 20
        )
        if timed_out or rc != 0:
            why = "timed out" if timed_out else f"exited with {rc}"
            raise QuiesceError(f"the {what} command {argv[0]} {why}: {_last_line(err)}")
        return out

    def delete(self, snap: Snapshot) -> None:
        if snap.location in self._deleted:
            return  # one storage snapshot serves every volume of the group
        if self.config.delete is None:
            raise UsageError(
                f"the command provider has no delete command for {snap.location}",
                "create with --option delete='mytool delete {id}', or drop only the record "
                "with `quiesce snapshot delete --forget ID`",
            )
        self._run_aux("delete", self.config.delete, snap.location)
        self._deleted.add(snap.location)

    def list_snapshots(self) -> list[str]:
        """The storage's snapshot ids, from the ``list`` command (one per line)."""
        if self.config.list is None:
            raise UsageError("the command provider has no list command", "--option list=...")
        out = self._run_aux("list", self.config.list)
        return [ln.strip() for ln in out.decode().splitlines() if ln.strip()]
