"""`quiesce snapshot ...`: create, list, mount, umount and delete snapshots.

Registered in cli/app.py with ``app.add_typer(snapshot_app, name="snapshot")``; the
console and the error printer come from cli/common.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from quiesce import snapshot as snapshots
from quiesce.cli.common import (
    JobStateOpt,
    JsonOpt,
    StateDirOpt,
    chosen_state_dir,
    emit_json,
    err,
    fail,
    out,
)
from quiesce.errors import QuiesceError, UsageError
from quiesce.util.units import human_duration

if TYPE_CHECKING:
    from quiesce.providers.options import ProviderOptions

snapshot_app = typer.Typer(
    name="snapshot",
    help="Take a consistent snapshot with a provider, and manage the snapshots it made.",
    no_args_is_help=True,
    rich_markup_mode="markdown",  # docstrings wrap; [backup] and `x` read as written
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

StateDir = StateDirOpt


def _say(text: str) -> None:
    out.print(text, markup=False)


def _warn(text: str) -> None:
    from rich.text import Text

    err.print(Text.assemble(("warning:", "yellow"), " ", text))  # paths may hold "[...]"


def parse_options(items: list[str]) -> dict[str, Any]:
    """``k=v`` pairs; a value that is a JSON list or object is parsed (argv lists). Other
    values stay strings: the provider's option model coerces them (``"5"`` -> 5.0)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"bad option {item!r}", "write --option key=value")
        parsed: Any = value
        if value[:1] in "[{":
            try:
                parsed = json.loads(value)
            except ValueError:
                raise UsageError(f"option {key}: {value!r} is not valid JSON") from None
        options[key] = parsed
    return options


def provider_options(provider: str, items: list[str]) -> ProviderOptions:
    """``--option`` flags validated against the provider's option model, before anything
    runs; an unknown key or a bad value is told in flag syntax (``--option dset: ...``)."""
    from quiesce.providers.options import ProviderOptionsError
    from quiesce.providers.registry import get_options

    model = get_options(provider)
    try:
        return model.parse(parse_options(items))
    except ProviderOptionsError as e:
        raise e.for_flags() from None


@snapshot_app.command("create")
def create_cmd(
    paths: Annotated[list[str], typer.Argument(help="Mount points of the group.")],
    provider: Annotated[
        str, typer.Option("--provider", "-p", help="reflink, btrfs, command, lvm, zfs or ebs.")
    ],
    job: Annotated[str, typer.Option("--job", "-j", help="Job name: the snapshot id prefix.")] = (
        "adhoc"
    ),
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="Provider option key=value (repeatable)."),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", "-t", min=0.1, help="Freeze deadline in seconds.")
    ] = 30.0,
    lease: Annotated[float, typer.Option("--lease", min=0.0, help="Controller lease (s).")] = 5.0,
    no_syncfs: Annotated[bool, typer.Option("--no-syncfs", help="Skip the pre-freeze syncfs.")] = (
        False
    ),
    no_expedite: Annotated[
        bool,
        typer.Option(
            "--no-expedite",
            help="Do not expedite RCU grace periods while freezing (machine-wide, "
            "set only until the last FIFREEZE returns).",
        ),
    ] = False,
    allow_self: Annotated[
        bool, typer.Option("--allow-self", help="Allow a volume quiesce itself needs.")
    ] = False,
    state_dir: StateDir = None,
    as_json: JsonOpt = False,
) -> None:
    """Freeze the group (if the provider needs it), snapshot it, thaw, write a manifest."""
    try:
        man = snapshots.create(
            paths,
            provider,
            job=job,
            options=provider_options(provider, option or []),
            timeout=timeout,
            lease=lease,
            syncfs=not no_syncfs,
            expedite=not no_expedite,
            allow_self=allow_self,
            state_dir=state_dir,
        )
    except QuiesceError as e:
        raise fail(e, as_json) from None
    if as_json:
        emit_json(man.to_dict())
        return
    _say(f"snapshot {man.id} ({man.provider}, consistency: {man.consistency})")
    for s in man.snapshots:
        _say(f"  {s.volume}: {s.location}")
    if man.window is not None:
        _say(f"freeze window: {human_duration(man.window_s)}")
    _say(f"consistency: {man.consistency_reason}")
    for w in man.warnings:
        _warn(w)


@snapshot_app.command("list")
def list_cmd(
    state_dir: StateDir = None, job_file: JobStateOpt = None, as_json: JsonOpt = False
) -> None:
    """List the snapshots recorded in the state directory."""
    try:
        mans, unreadable = snapshots.scan_manifests(chosen_state_dir(state_dir, job_file))
    except QuiesceError as e:
        raise fail(e, as_json) from None
    if as_json:
        emit_json(
            {"snapshots": [m.to_dict() for m in mans],
             "unreadable": [u.to_dict() for u in unreadable]}
        )  # fmt: skip
        return
    for u in unreadable:  # its snapshot may exist: say so, never hide it
        _warn(f"{u}: its snapshot (if any) is not listed; fix or remove the file")
    if not mans:
        _say("no snapshots")
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    # ids (they carry the UTC time) are what `mount` and `delete` take: never cut them
    for col in ("id", "provider", "window", "consistency"):
        table.add_column(col, no_wrap=True)
    table.add_column("volumes", overflow="fold", min_width=16)
    for m in mans:
        vols = ", ".join(v["mount_point"] for v in m.volumes)
        cells = (m.id, m.provider, human_duration(m.window_s), m.consistency, vols)
        table.add_row(*(Text(c) for c in cells))  # no markup from paths
    out.print(table)


@snapshot_app.command("mount")
def mount_cmd(
    snap_id: Annotated[str, typer.Argument(metavar="ID")],
    directory: Annotated[Path, typer.Argument(metavar="DIR")],
    state_dir: StateDir = None,
    as_json: JsonOpt = False,
    job_file: JobStateOpt = None,
) -> None:
    """Mount a snapshot read-only (nosuid, nodev, noexec) at DIR."""
    try:
        points = snapshots.mount(snap_id, directory, chosen_state_dir(state_dir, job_file))
    except QuiesceError as e:
        raise fail(e, as_json) from None
    if as_json:
        emit_json({"id": snap_id, "mounted": [str(p) for p in points]})
        return
    for p in points:
        _say(f"mounted {snap_id} at {p} (read-only)")


@snapshot_app.command("umount")
def umount_cmd(
    target: Annotated[str, typer.Argument(metavar="DIR|ID")],
    state_dir: StateDir = None,
    as_json: JsonOpt = False,
    job_file: JobStateOpt = None,
) -> None:
    """Unmount a snapshot: the directory it is mounted on, or its id."""
    try:
        points = snapshots.umount(target, chosen_state_dir(state_dir, job_file))
    except QuiesceError as e:
        raise fail(e, as_json) from None
    if as_json:
        emit_json({"target": target, "unmounted": [str(p) for p in points]})
        return
    for p in points:
        _say(f"unmounted {p}")


@snapshot_app.command("delete")
def delete_cmd(
    snap_id: Annotated[str, typer.Argument(metavar="ID")],
    forget: Annotated[
        bool, typer.Option("--forget", help="Drop only the manifest; leave the storage alone.")
    ] = False,
    state_dir: StateDir = None,
    as_json: JsonOpt = False,
    job_file: JobStateOpt = None,
) -> None:
    """Delete a snapshot (storage first, then its manifest). Refused while mounted."""
    try:
        man = snapshots.delete(snap_id, chosen_state_dir(state_dir, job_file), forget=forget)
    except QuiesceError as e:
        raise fail(e, as_json) from None
    if as_json:
        emit_json({"id": man.id, "deleted": not forget, "forgot": forget})
        return
    _say(f"{'forgot' if forget else 'deleted'} {man.id}")
