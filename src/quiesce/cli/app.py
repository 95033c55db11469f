"""The command line. The only module that prints for humans or picks exit codes."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from quiesce import __version__
from quiesce.cli import holds
from quiesce.cli.backup import backup_cmd, restore_cmd, verify_cmd
from quiesce.cli.cleanup import cleanup_cmd
from quiesce.cli.common import (
    JobStateOpt,
    JsonOpt,
    StateDirOpt,
    chosen_state_dir,
    console,
    emit_json,
    err,
    fail,
    out,
)
from quiesce.cli.job import check_cmd, run_cmd
from quiesce.cli.snapshot import snapshot_app
from quiesce.cli.systemd import systemd_cmd
from quiesce.errors import (
    ExitCode,
    FreezeExpired,
    Interrupted,
    NotFrozen,
    QuiesceError,
    UsageError,
)
from quiesce.freezing.blockwatch import ending_blockers
from quiesce.freezing.freezer import Freezer, Window
from quiesce.freezing.guardian import DEFAULT_LEASE, DEFAULT_TIMEOUT, check_seconds
from quiesce.freezing.plan import Plan, make_plan
from quiesce.host import proc
from quiesce.host.mounts import MountTable
from quiesce.util.units import human_duration

sys.dont_write_bytecode = True  # quiesce may run from a venv on a volume it freezes

app = typer.Typer(
    name="quiesce",
    help="Consistent snapshots of mounted Linux filesystems: freeze, snapshot, thaw, back up.",
    no_args_is_help=True,
    rich_markup_mode="markdown",  # docstrings wrap; [backup] and `x` read as written
    epilog=(
        "Exit codes: 0 ok, 1 internal error, 2 bad input, 3 not root, 4 cannot be frozen, "
        "5 busy (frozen by someone else, or the job is running), 6 unsafe plan, "
        "7 not frozen, 8 thaw failed, 9 the guardian thawed first, 10 guardian error, "
        "11 hook or writer failed, 12 backup or verification failed, "
        "13 someone else thawed quiesce's freeze, 14 restore drill failed. "
        "Docs: README.md, docs/jobs.md, docs/operations.md."
    ),
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(snapshot_app, name="snapshot")


def _print_version(value: bool) -> None:
    if value:
        out.print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Consistent snapshots of mounted Linux filesystems: freeze, snapshot, thaw, back up."""


def _say(to: Console, label: str, style: str, text: str) -> None:
    to.print(Text.assemble((label, style), " ", text))


Paths = Annotated[list[str], typer.Argument(help="Mount points (each the root of a mount).")]
AllowSelf = Annotated[
    bool,
    typer.Option(
        "--allow-self",
        help="Allow freezing a volume quiesce itself lives on (its Python, cwd, output) or /.",
    ),
]
TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout", "-t", help="Deadline in seconds (0.1 to 86400): the guardian thaws then."
    ),
]
LeaseOpt = Annotated[
    float,
    typer.Option(
        "--lease",
        help="Lease in seconds (0: none): a controller silent this long loses the freeze.",
    ),
]
NoSyncfs = Annotated[
    bool, typer.Option("--no-syncfs", help="Skip the syncfs() that shortens the freeze window.")
]
NoExpedite = Annotated[
    bool,
    typer.Option(
        "--no-expedite",
        help="Do not expedite RCU grace periods while freezing (machine-wide "
        "/sys/kernel/rcu_expedited, set only until the last FIFREEZE returns).",
    ),
]
EndBlockersOpt = Annotated[
    float | None,
    typer.Option(
        "--end-blockers-after",
        metavar="SECONDS",
        help="End unprivileged processes (uid != 0) whose writes keep a FIFREEZE waiting "
        "longer than this (off by default; logged). Root's processes are never ended.",
    ),
]


def _check_durations(timeout: float, lease: float, as_json: bool) -> None:
    """--timeout inf or nan would pass a plain float option: refuse it here, naming the flag."""
    try:
        check_seconds("--timeout", timeout)
        check_seconds("--lease", lease, zero_ok=True)
    except QuiesceError as e:
        raise fail(e, as_json) from None


def _print_window(window: Window, title: str) -> None:
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for col in ("volume", "fstype", "state", "syncfs", "freeze", "frozen", "thaw"):
        table.add_column(col)
    for v in window.volumes:
        state = v.state + (f" ({v.thawed_by})" if v.thawed_by else "")
        table.add_row(
            v.mount_point, v.fstype, state, human_duration(v.syncfs_s), human_duration(v.freeze_s),
            human_duration(v.frozen_for_s), human_duration(v.thaw_s),
        )  # fmt: skip
    out.print(table)
    if window.duration is not None:
        out.print(f"freeze window: {human_duration(window.duration)}")
    for w in window.warnings:
        _say(err, "warning:", "yellow", w)


def _print_plan(plan: Plan) -> None:
    table = Table(title="freeze order", title_justify="left", box=None, pad_edge=False)
    for col in ("#", "mount point", "fstype", "source", "dev", "action"):
        table.add_column(col)
    for i, m in enumerate(plan.members, 1):
        table.add_row(
            str(i), m.name, m.volume.fstype, m.volume.source, m.volume.dev,
            "skip" if m.skip else "freeze",
        )  # fmt: skip
    out.print(table)
    out.print("thaw order: " + ", ".join(m.name for m in reversed(plan.members) if not m.skip))
    for h in plan.hazards:
        refused = h.refuse and not plan.allow_self
        tag = "refused" if refused else "allowed"
        _say(out, f"hazard ({h.kind}, {tag}):", "red" if refused else "yellow", h.message)
    for w in plan.warnings:
        _say(out, "warning:", "yellow", w)


@app.command("plan")
def plan_cmd(paths: Paths, allow_self: AllowSelf = False, as_json: JsonOpt = False) -> None:
    """Show the volumes, their freeze order and hazards. Changes nothing."""
    try:
        with make_plan(paths, allow_self=allow_self) as plan:
            if as_json:
                emit_json(plan.to_dict())
            else:
                _print_plan(plan)
            plan.check()
    except QuiesceError as e:
        raise fail(e, False) from None


@app.command("freeze")
def freeze_cmd(
    paths: Paths,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,  # one default deadline everywhere (jobs too)
    lease: LeaseOpt = DEFAULT_LEASE,
    allow_self: AllowSelf = False,
    no_syncfs: NoSyncfs = False,
    no_expedite: NoExpedite = False,
    end_blockers_after: EndBlockersOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Freeze and return, leaving the guardian holding the freeze until `quiesce thaw`
    or the deadline (like `fsfreeze -f`, but it can never stay frozen forever)."""
    _check_durations(timeout, lease, as_json)
    try:
        with make_plan(paths, allow_self=allow_self) as plan:
            # With --allow-self our own output may go to a volume that stays frozen after
            # we return: printing there would hang this process. Stay silent then.
            silent = _stream_is_on(plan, 1) or _stream_is_on(plan, 2)
            freezer = Freezer(
                plan,
                timeout=timeout,
                lease=lease,
                syncfs=not no_syncfs,
                expedite=not no_expedite,
            )
            window, ended = _freeze_ending_blockers(freezer, plan, end_blockers_after)
            freezer.hold()
    except QuiesceError as e:
        raise fail(e, as_json) from None
    if silent:
        return
    if as_json:
        emit_json(window.to_dict() | {"deadline_s": timeout})
        return
    for w in window.warnings + ended:
        _say(err, "warning:", "yellow", w)
    names = ", ".join(v.mount_point for v in window.volumes if v.state == "frozen")
    if not names:
        out.print("nothing to freeze")
        return
    out.print(
        f"frozen: {names}; guardian pid {window.guardian_pid} thaws in {timeout:g}s "
        "unless you run `quiesce thaw` first"
    )


@app.command("thaw")
def thaw_cmd(paths: Paths, as_json: JsonOpt = False) -> None:
    """Thaw filesystems (like `fsfreeze -u`): through the guardian holding them, else FITHAW."""
    code = holds.thaw(paths, as_json)  # also served without typer: cli/entry.py
    if code:
        raise typer.Exit(code)


@app.command("status")
def status_cmd(
    state_dir_opt: StateDirOpt = None, job_file: JobStateOpt = None, as_json: JsonOpt = False
) -> None:
    """List what quiesce holds frozen (volumes, holder, since when, deadline and lease),
    what its guardians thawed on their own lately, and the jobs running now (of the
    state directory: --state-dir, --job JOB.toml's state_dir, or the default)."""
    try:
        state = chosen_state_dir(state_dir_opt, job_file)
    except QuiesceError as e:
        raise fail(e, as_json) from None
    code = holds.status(as_json, state=state)  # also served without typer: cli/entry.py
    if code:
        raise typer.Exit(code)


def _freeze_ending_blockers(
    freezer: Freezer,
    plan: Plan,
    after: float | None,
    gate_fd: int | None = None,
    exit_fd: int | None = None,
) -> tuple[Window, list[str]]:
    """``freezer.freeze()``, with the opt-in blocker policy (--end-blockers-after) from
    the first FIFREEZE on: what it ended, one line each, to print after the window."""
    if after is not None and not after > 0:
        raise UsageError(
            f"--end-blockers-after must be a number of seconds above 0 (got {after:g})",
            "for example --end-blockers-after 10",
        )
    freezer.arm()  # guardian and pre-flush first: the bound counts from the first FIFREEZE
    devs = [m.volume.dev for m in plan.members if not m.skip]
    with ending_blockers(devs, after) as watch:
        window = freezer.freeze(gate_fd=gate_fd, exit_fd=exit_fd)
    return window, watch.ended


def _stream_is_on(plan: Plan, fd: int) -> bool:
    table = MountTable.read()
    vol = table.volume_of_path(f"/proc/self/fd/{fd}")
    return vol is not None and any(m.volume.dev == vol.dev for m in plan.members)


_EXEC_CMD: list[str] = []  # what followed `--` on the command line (see main)


@app.command("exec")
def exec_cmd(
    paths: Paths,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
    lease: LeaseOpt = DEFAULT_LEASE,
    allow_self: AllowSelf = False,
    no_syncfs: NoSyncfs = False,
    no_expedite: NoExpedite = False,
    end_blockers_after: EndBlockersOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Freeze PATHS, run `-- CMD ARGS` (the snapshot), thaw, and exit with CMD's status.

    CMD is started before the freeze and held before its exec until the volumes are
    frozen, so the window is the ioctls and CMD's own run. Its stdin is empty. CMD is
    killed if it outlives the deadline. If quiesce's own output goes to a file on a
    frozen volume, CMD's output is held in memory and written after the thaw."""
    cmd = list(_EXEC_CMD)
    _check_durations(timeout, lease, as_json)
    if not cmd:
        raise fail(
            UsageError("no command given", "usage: quiesce exec PATH... -- CMD ARGS"), as_json
        )
    exe = shutil.which(cmd[0])
    if exe is None:  # before anything is frozen
        raise fail(
            UsageError(
                f"cannot run {cmd[0]}: not found, or not an executable file",
                "give the command's path, or a name on $PATH, after `--`; nothing was frozen",
            ),
            as_json,
        )
    try:
        with make_plan(paths, allow_self=allow_self) as plan:
            buffer_out = as_json or _stream_is_on(plan, 1)
            buffer_err = _stream_is_on(plan, 2)
            env = os.environ | {
                "QUIESCE_VOLUMES": "\n".join(m.name for m in plan.members if not m.skip)
            }
            freezer = Freezer(
                plan,
                timeout=timeout,
                lease=lease,
                syncfs=not no_syncfs,
                expedite=not no_expedite,
            )
            gated = _start_gated(exe, cmd, env, buffer_out, buffer_err)  # before the freeze
            try:
                window, ended = _freeze_ending_blockers(
                    freezer, plan, end_blockers_after, gate_fd=gated.gate, exit_fd=gated.pidfd
                )
            except BaseException:
                gated.cancel()
                raise
            try:
                # The command runs now: the window holds its run alone. The guardian
                # released it as the last FIFREEZE returned and thaws as it exits (no hop
                # through us; our thaw below gets that thaw's answer), or we do both.
                gated.released_by(freezer.gate_released_ns)
                done = gated.wait(timeout - (window.duration or 0))
                rc, killed = done.returncode, done.timed_out
                cmd_out, cmd_err = done.stdout or None, done.stderr or None
            except BaseException:  # Ctrl-C: the command is dead, thaw before anything else
                gated.cancel()
                freezer.thaw(raise_errors=False)
                raise
            try:
                window = freezer.thaw()
            finally:
                for line in ended:  # held in memory through the window
                    _say(err, "warning:", "yellow", line)
                if cmd_out:
                    sys.stdout.buffer.write(cmd_out) if not as_json else None
                if cmd_err:
                    sys.stderr.buffer.write(cmd_err)
    except QuiesceError as e:
        raise fail(e, as_json) from None
    if killed:
        raise fail(
            FreezeExpired(f"{cmd[0]} did not finish before the {timeout:g}s deadline: killed"),
            as_json,
        )
    if as_json:
        emit_json(
            window.to_dict()
            | {
                "command": cmd,
                "returncode": rc,
                "stdout": (cmd_out or b"").decode(errors="replace"),
            }
        )
    else:
        for w in window.warnings:  # a lost guardian, a skipped volume: not only in --json
            err.print(f"quiesce: warning: {w}", markup=False)
        err.print(f"quiesce: freeze window {human_duration(window.duration)}; {cmd[0]} exited {rc}")
    raise typer.Exit(rc if rc >= 0 else 128 - rc)


def _start_gated(
    exe: str, cmd: list[str], env: dict[str, str], buffer_out: bool, buffer_err: bool
) -> proc.Gated:
    """The snapshot command, started before the freeze and held before its exec until the
    freeze returns (its binary path resolved now: no PATH search in the window). A
    stream that would land on a frozen volume is held in memory (64 MiB at most)."""
    try:
        return proc.Gated(
            [exe, *cmd[1:]],
            env=env,
            capture_stdout=buffer_out,
            capture_stderr=buffer_err,
            limit=64 << 20,
            cwd=os.getcwd(),
        )
    except OSError as e:
        raise UsageError(
            f"cannot start {cmd[0]}: {e.strerror}", "nothing was frozen; check the command"
        ) from None


@app.command("demo")
def demo_cmd(
    simple: Annotated[
        bool, typer.Option("--simple", help="Only freeze a filesystem under a live writer.")
    ] = False,
    fstype: Annotated[str, typer.Option(help="With --simple: ext4, xfs or btrfs")] = "ext4",
    fleet: Annotated[
        bool,
        typer.Option(
            "--fleet",
            help="One group snapshot across simulated hosts (sshd + own mount namespace "
            "each), driven by Ansible under a writer that hops between them.",
        ),
    ] = False,
    hosts: Annotated[int, typer.Option("--hosts", help="With --fleet: how many hosts")] = 3,
    vm: Annotated[
        bool,
        typer.Option(
            "--vm",
            help="Snapshot a running guest through its agent (quiesce is its fsfreeze hook), "
            "then leave a freeze unthawed: the guest thaws itself.",
        ),
    ] = False,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Build the throwaway filesystems here (default: $TMPDIR, else /var/tmp)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole job on a throwaway filesystem: an SQLite writer, freeze, reflink snapshot,
    thaw, restic backup, verify, retention, restore and check. Removes all it made."""
    try:
        if vm:
            from quiesce.cli.demo.vm import run_vm_demo

            result = run_vm_demo(console(markup=True) if not as_json else None)
            if as_json:
                emit_json(result)
            if not result["consistent"]:
                raise typer.Exit(1)
        elif fleet:
            from quiesce.cli.demo.fleet import run_fleet_demo

            result = run_fleet_demo(console(markup=True) if not as_json else None, as_json, hosts)
            if as_json:
                emit_json(result)
        elif simple:
            from quiesce.cli.demo.simple import run_demo

            run_demo(fstype, out if not as_json else None, as_json, directory)
        else:
            from quiesce.cli.demo.full import run_full_demo

            # The demo's own lines carry rich markup (and only paths it made itself).
            styled = console(markup=True)
            run_full_demo(styled if not as_json else None, as_json, directory)
    except QuiesceError as e:
        raise fail(e, as_json) from None


@app.command("install-qga-hook")
def install_qga_hook_cmd(
    job: Annotated[
        str, typer.Option("--job", help="The guest job (written with defaults if missing)")
    ] = "/etc/quiesce/qga.toml",
    root: Annotated[str, typer.Option("--root", help="Install under this root")] = "/",
    systemd: Annotated[
        bool, typer.Option(help="Write the qemu-guest-agent.service drop-in")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Make quiesce qemu-guest-agent's fsfreeze hook on this guest (docs/vm.md).

    The stock hook's scripts (/etc/qemu/fsfreeze-hook.d) keep running, in order, each
    with a deadline; a watchdog thaws the agent's freeze if the thaw never comes. Then:
    systemctl daemon-reload && systemctl restart qemu-guest-agent."""
    from pathlib import Path

    from quiesce.integrations.qga.install import install

    try:
        done = install(root, job=Path(job), systemd=systemd)
    except OSError as e:
        raise fail(QuiesceError(f"cannot install the hook: {e}"), as_json) from None
    if as_json:
        emit_json({"written": [str(p) for p in done.written], "kept": [str(p) for p in done.kept]})
        return
    for path in done.written:
        out.print(f"wrote {path}")
    for path in done.kept:
        out.print(f"kept {path}")
    if systemd:
        out.print("now: systemctl daemon-reload && systemctl restart qemu-guest-agent")


@app.command("version")
def version_cmd(as_json: JsonOpt = False) -> None:
    """Print the version."""
    if as_json:
        emit_json({"version": __version__})
        return
    out.print(__version__)


app.command("run")(run_cmd)
app.command("check")(check_cmd)
app.command("backup")(backup_cmd)
app.command("verify")(verify_cmd)
app.command("restore")(restore_cmd)
app.command("cleanup")(cleanup_cmd)
app.command("systemd")(systemd_cmd)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # click drops `--` before we could split PATHS from CMD: split here.
    if "exec" in args and "--" in args and args.index("exec") < args.index("--"):
        i = args.index("--")
        _EXEC_CMD[:] = args[i + 1 :]
        args = args[:i]
    signal.signal(signal.SIGINT, _interrupted)
    try:
        app(args=args, prog_name="quiesce")
    except QuiesceError as e:  # raised outside a command's own handler
        _say(err, "quiesce:", "bold red", e.message)
        if e.hint:
            _say(err, "hint:", "dim", e.hint)
        sys.exit(e.exit_code)


def _interrupted(_sig: int, _frame: object) -> None:
    # A QuiesceError, not KeyboardInterrupt: click would swallow that one silently. The
    # freezer defers signals between ioctls, so this never lands half-way through a group.
    raise Interrupted("interrupted")


__all__ = ["ExitCode", "NotFrozen", "app", "main"]
