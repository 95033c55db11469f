"""``qemu``: snapshot running guests from the host, frozen by their own guest agent.

For each guest of the group: ``guest-fsfreeze-freeze`` through its agent (which runs the
guest's fsfreeze hook: quiesce's, integrations/qga, quiesces the guest's applications and
arms the guest's own watchdog), then a reflink clone (FICLONE) of every disk image of every
guest, then ``guest-fsfreeze-thaw``. Two independent deadlines guard the window:

- the host's (``timeout``): past it the host thaws and fails the run; every agent call
  has ``agent_timeout``, so a hung or stopped agent fails the run cleanly;
- the guest's (``[guest] deadline`` of the guest job): if the host dies or never sends
  the thaw, the guest's watchdog thaws itself.

A snapshot is consistent only if every guest's thaw thawed as many filesystems as its
freeze froze: a smaller count means something thawed them before the host's thaw (the
guest's watchdog, an operator), maybe before the clone. Several guests form one group
with one proven instant (:mod:`quiesce.freezing.instant`, the fleet's verdict), from causal
bounds on the host's own clock: every guest's freeze had returned before the first clone
began, and no thaw was sent before the last clone ended. The guest's own record (its
measured window, who thawed) is read back through the agent after the thaw.

The host's filesystem holding the images is not frozen (``FreezeMode.NONE``): the
guest's filesystems are. With libvirt, ``virsh domfsfreeze``/``domfsthaw`` send the same
commands (docs/vm.md); this provider talks to the agent's socket itself.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from quiesce.errors import GuestRefused, GuestWindowBroken, MountError, UsageError
from quiesce.freezing.instant import FrozenSpan, Offset, Verdict, judge
from quiesce.freezing.plan import GroupMember
from quiesce.host import images, kernel
from quiesce.providers import chain
from quiesce.providers.base import (
    FreezeMode,
    Provider,
    Snapshot,
    block_copy_mount_options,
    volume_slug,
)
from quiesce.providers.options import QemuGuest, QemuOptions
from quiesce.providers.qga import AgentError, GuestAgent

GUEST_RECORD = "/run/quiesce/qga/last.json"  # the guest watchdog's record (integrations/qga)


@dataclass
class GuestState:
    """One guest's side of one freeze."""

    guest: QemuGuest
    agent: GuestAgent
    frozen: int | None = None  # filesystems the agent froze
    thawed: int | None = None  # filesystems the agent's thaw found frozen
    record: dict[str, Any] = field(default_factory=dict)  # the guest watchdog's record
    error: str = ""
    # the host's monotonic clock (ns): freeze sent, freeze answered, thaw sent, thaw answered
    freeze_sent_ns: int | None = None
    frozen_ns: int | None = None
    thaw_sent_ns: int | None = None
    thawed_ns: int | None = None


def guest_record(agent: GuestAgent) -> dict[str, Any]:
    """The guest watchdog's last record, read through the agent ({} if there is none)."""
    with contextlib.suppress(AgentError, ValueError):
        data = agent.read_file(GUEST_RECORD)
        if data:
            return dict(json.loads(data))
    return {}


class GuestGroup:
    """Freeze, clone and thaw a group of guests, step by step (the provider runs all three;
    tests and the demo stop between them to play a host that dies or never thaws)."""

    def __init__(self, options: QemuOptions) -> None:
        self.options = options
        self.guests = [
            GuestState(g, GuestAgent(str(g.agent), timeout=options.agent_timeout, name=g.name))
            for g in options.guests
        ]
        self.t_frozen: float | None = None

    def connect(self) -> None:
        for g in self.guests:
            g.agent.connect()

    def close(self) -> None:
        for g in self.guests:
            g.agent.close()

    def freeze(self) -> None:
        """Freeze every guest; on any failure thaw those frozen and raise."""
        for g in self.guests:
            try:
                g.freeze_sent_ns = time.monotonic_ns()
                g.frozen = g.agent.freeze(list(g.guest.mountpoints) or None)
                g.frozen_ns = time.monotonic_ns()
            except AgentError as e:
                g.error = e.message
                self.thaw(quiet=True)
                rec = guest_record(g.agent) if "hook" in e.message else {}
                if rec.get("event") == "failed":
                    why = rec.get("error", "")
                    named = "; ".join(rec.get("not_ok", []))
                    raise GuestRefused(
                        f"guest {g.guest.name} refused the freeze: {why}"
                        + (f" ({named})" if named else "")
                        + "; no guest was left frozen, nothing was snapshotted"
                    ) from None
                raise AgentError(
                    f"guest {g.guest.name}: freeze failed: {e.message}; the other guests "
                    "were thawed, nothing was snapshotted"
                ) from None
        self.t_frozen = time.monotonic()

    def thaw(self, *, quiet: bool = False) -> None:
        """Thaw every guest the group froze (each agent call bounded)."""
        errors = []
        for g in self.guests:
            if g.frozen is None or g.thawed is not None:
                continue
            try:
                g.thaw_sent_ns = time.monotonic_ns()
                g.thawed = g.agent.thaw()
                g.thawed_ns = time.monotonic_ns()
            except AgentError as e:
                errors.append(e.message)
        for g in self.guests:
            if g.frozen is not None and g.thawed is not None:
                g.record = guest_record(g.agent)
        if errors and not quiet:
            raise AgentError(
                "; ".join(errors) + "; the guest's own watchdog thaws it at its deadline"
            )

    @property
    def host_window_s(self) -> float | None:
        """How long the host saw every guest frozen: from the last freeze's answer to the
        first thaw sent (the guests' real window is longer; the clones lie inside it)."""
        return _span([g.frozen_ns for g in self.guests], [g.thaw_sent_ns for g in self.guests])

    @property
    def host_wait_s(self) -> float | None:
        """The first freeze sent to the last thaw answered: the window and the guests'
        fsfreeze hooks on both sides of it (the agent answers after its hook ran)."""
        return _span(
            [g.freeze_sent_ns for g in self.guests], [g.thawed_ns for g in self.guests], outer=True
        )

    def verdict(self, made: tuple[int, int] | None = None) -> Verdict:
        """One instant for the whole group, or why not: each guest frozen from its freeze's
        answer to its thaw's sending (the host's clock, no mapping), none thawed early (its
        thaw found all it froze still frozen), and ``made`` (the clones' first start and
        last end, host ns) inside the instant's neighbourhood."""
        spans = []
        for g in self.guests:
            if g.frozen is None or g.frozen_ns is None or g.thaw_sent_ns is None:
                continue
            early = None
            if (g.thawed or 0) < g.frozen:
                early = f"froze {g.frozen}, the host's thaw found {g.thawed} frozen"
            spans.append(
                FrozenSpan(
                    host=g.guest.name,
                    frozen_at=g.frozen_ns,
                    thaw_from=g.thaw_sent_ns,
                    start_ns=g.freeze_sent_ns or g.frozen_ns,
                    end_ns=g.thawed_ns or g.thaw_sent_ns,
                    offset=Offset(0, 0),
                    thawed_early=early,
                    frozen_seen=g.frozen_ns,
                    thaw_sent=g.thaw_sent_ns,
                )
            )
        v = judge(spans, [g.guest.name for g in self.guests])
        if made is not None and v.overlap_ctrl_ns is not None:
            all_frozen, first_thaw = v.overlap_ctrl_ns
            if made[0] < all_frozen or made[1] > first_thaw:
                v.consistent = False
                v.reasons.append(
                    "the clones were not made inside the instant every guest was frozen"
                )
        return v

    def broken(self) -> list[str]:
        """Guests whose freeze ended before the host's thaw."""
        return [
            f"{g.guest.name} (froze {g.frozen}, the host's thaw found {g.thawed} frozen)"
            for g in self.guests
            if g.frozen is not None and (g.thawed or 0) < g.frozen
        ]


def _span(starts: list[int | None], ends: list[int | None], outer: bool = False) -> float | None:
    """Seconds from the last start to the first end (``outer``: the first start to the last
    end), host ns; None unless every guest has both."""
    if not starts or None in starts or None in ends:
        return None
    s = [t for t in starts if t is not None]
    e = [t for t in ends if t is not None]
    return ((max(e) - min(s)) if outer else (min(e) - max(s))) / 1e9


@dataclass
class _Clone:
    guest: str
    image: str
    dest: str
    created: bool = False
    # a guest image (top of its chain): the clones of the files below it, top first, and
    # their formats; empty for a raw image. None: a backing file's clone, not a snapshot.
    backing: list[tuple[str, str]] | None = field(default_factory=list)


class QemuProvider(Provider):
    name: ClassVar[str] = "qemu"
    Options = QemuOptions
    config: QemuOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clones: list[_Clone] = []
        self._name = "qemu"
        self.group: GuestGroup | None = None

    def freeze_mode(self, members: Sequence[GroupMember]) -> FreezeMode:
        return FreezeMode.NONE  # the guests freeze; the host's filesystem must not

    def check(self, members: Sequence[GroupMember]) -> None:
        for g in self.config.guests:
            if not Path(g.agent).exists():
                raise UsageError(
                    f"guest {g.name}: no agent socket at {g.agent}",
                    "give the host end of the guest's org.qemu.guest_agent.0 channel",
                )
            for img in g.images:
                if not Path(img).is_file():
                    raise UsageError(f"guest {g.name}: no image file {img}", "fix guests.images")
                self._check_chain(g.name, str(img))

    def _dest_dir(self, image: str) -> str:
        return str(self.config.dest) if self.config.dest else os.path.dirname(image)

    def _check_chain(self, guest: str, image: str) -> None:
        """Every file of a qcow2 image's backing chain must be reflink-clonable into the
        clone directory: on its filesystem."""
        links = chain.backing_chain(image)[1:]
        where = self._dest_dir(image)
        dev = os.stat(where).st_dev if links else None
        for f in links:
            if os.stat(f.path).st_dev != dev:
                raise UsageError(
                    f"guest {guest}: {image}'s backing file {f.path} is not on the filesystem "
                    f"of the clone directory {where}: a reflink clone cannot reach it",
                    "keep the whole backing chain on the filesystem of the images' clones",
                    option="guests.images",
                )

    def prepare(self, members: Sequence[GroupMember], name: str) -> None:
        """Name every clone: each image's, and each file of its backing chain once (two
        images over one base share its clone). The chains are read here, outside the
        window."""
        self._clones, self._name = [], name
        below: dict[str, str] = {}  # a backing file's real path -> its clone
        used: set[str] = set()
        for g in self.config.guests:
            for img in g.images:
                d, slug = self._dest_dir(str(img)), volume_slug(g.name)
                dest = os.path.join(d, f"{name}--{slug}--{Path(img).name}")
                top = _Clone(g.name, str(img), dest)
                used.add(dest)
                self._clones.append(top)
                assert top.backing is not None
                for f in chain.backing_chain(str(img))[1:]:
                    if f.path not in below:
                        bdest = os.path.join(d, f"{name}--{slug}--{Path(f.path).name}")
                        n = 1
                        while bdest in used:
                            n += 1
                            bdest = os.path.join(d, f"{name}--{slug}--{n}-{Path(f.path).name}")
                        used.add(bdest)
                        below[f.path] = bdest
                        self._clones.append(_Clone(g.name, f.path, bdest, backing=None))
                    top.backing.append((below[f.path], f.format))
        self.group = GuestGroup(self.config)

    def _clone_all(self) -> list[Snapshot]:
        out = []
        for c in self._clones:
            if self.journal is not None:
                self.journal.intent("file", path=c.dest)
            src = os.open(c.image, os.O_RDONLY | os.O_CLOEXEC)
            try:
                dst = os.open(c.dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                c.created = True
                try:
                    kernel.ficlone(dst, src)
                    os.fsync(dst)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
            if c.backing is None:
                continue  # a backing file's clone: part of an image's snapshot
            st = os.stat(c.image)
            out.append(
                Snapshot(
                    id=f"{self._name}/{volume_slug(c.guest)}-{Path(c.image).name}",
                    provider=self.name,
                    volume=c.image,
                    dev=f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}",
                    fstype="image",
                    created=time.time(),
                    location=c.dest,
                    extra={"guest": c.guest, "image": c.image}
                    | ({"backing": [b for b, _ in c.backing]} if c.backing else {}),
                )
            )
        return out

    def snapshot(self, members: Sequence[GroupMember]) -> list[Snapshot]:
        assert self.group is not None, "prepare() first"
        group = self.group
        snaps: list[Snapshot] = []
        try:
            group.connect()
            if self.config.freeze:
                group.freeze()
            made0 = time.monotonic_ns()
            snaps = self._clone_all()
            made = (made0, time.monotonic_ns())
            if self.config.freeze and group.t_frozen is not None:
                took = time.monotonic() - group.t_frozen
                if took > self.config.timeout:
                    raise GuestWindowBroken(
                        f"the clones took {took:.1f}s, past the host's deadline "
                        f"({self.config.timeout:g}s)"
                    )
        finally:
            try:
                group.thaw()
            finally:
                group.close()
        broken = group.broken()
        if broken:
            raise GuestWindowBroken(
                "the freeze ended before the host's thaw, the clones are not consistent: "
                + ", ".join(broken)
            )
        instant = group.verdict(made) if self.config.freeze else None
        if instant is not None and not instant.consistent:
            raise GuestWindowBroken(
                "no proven instant across the guests: " + "; ".join(instant.reasons)
            )
        for s in snaps:
            st = next(g for g in group.guests if g.guest.name == s.extra["guest"])
            s.extra |= {
                "frozen": bool(self.config.freeze),
                "host_window_s": group.host_window_s,
                "host_wait_s": group.host_wait_s,
                "guest_window_s": st.record.get("guest_window_s"),
                # the host's thaw found every filesystem still frozen: the agent thawed
                "thawed_by": "agent" if self.config.freeze else "",
                "guest_event": st.record.get("event", ""),
                "guest_quiescers": [q.get("name") for q in st.record.get("quiescers", [])],
            }
        return snaps

    def abort(self) -> None:
        for c in self._clones:
            if c.created:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(c.dest)
        self._clones = []

    def after_thaw(self, snaps: list[Snapshot]) -> None:
        """Point each clone of a backing chain at the clone below it (header only), so the
        snapshot depends on no live file."""
        done: set[str] = set()
        for c in self._clones:
            if not c.backing:
                continue
            files = [(c.dest, "qcow2"), *c.backing]
            for (upper, _), (lower, fmt) in itertools.pairwise(files):
                if upper not in done:
                    chain.rebase(upper, lower, fmt)
                    done.add(upper)

    def delete(self, snap: Snapshot) -> None:
        for path in [snap.location, *snap.extra.get("backing", [])]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def mount_view(self, snap: Snapshot) -> Snapshot:
        """A disk clone that holds one bare filesystem is mounted like any clone (its
        ``fstype`` found in its superblock); anything else is refused, before any mount:
        the backup is file by file (docs/vm.md, "Backing up guest snapshots")."""
        if snap.fstype != "image":
            return snap
        found = images.contents(snap.location)
        if found.fstype is None:
            guest, image = snap.extra.get("guest", "?"), snap.extra.get("image", snap.volume)
            raise MountError(
                f"guest {guest}: the clone of {image} holds {found.what}, not a filesystem "
                "the host can mount read-only, so it cannot be backed up file by file",
                "back up disks that hold one filesystem each (mkfs on the whole raw disk: "
                "no partition table, LVM, LUKS or qcow2), or back this disk up from inside "
                "the guest; the snapshot was kept",
                option="guests.images",
            )
        return replace(snap, fstype=found.fstype)

    def mount_options(self, snap: Snapshot) -> list[str]:
        # An unfrozen clone (freeze = false) gets readonly.py's no-replay retry, with a warning.
        return block_copy_mount_options(snap.fstype)


__all__ = ["GuestGroup", "GuestRefused", "GuestWindowBroken", "QemuProvider", "guest_record"]
