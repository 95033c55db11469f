"""The tar target: a zstd- or gzip-compressed tar stream to a file or to a command.

GNU tar writes the stream; quiesce sits between tar, the compressor and the
destination, counting the bytes (progress) and hashing the compressed stream: its
sha256 is written beside the file (``NAME.sha256``, the format ``sha256sum -c`` reads).
A file is written under a temporary name and renamed only once it is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import subprocess
import tempfile
import threading
import time as _time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, ClassVar

from quiesce.backup.targets.base import (
    BackupError,
    BackupResult,
    CheckResult,
    ProgressFn,
    ProgressUpdate,
    PruneResult,
    Target,
    TargetSnapshot,
    kill_group,
    require,
    signals_deferred,
)
from quiesce.backup.targets.borg import TIME_FORMAT, archive_name
from quiesce.errors import UsageError
from quiesce.state.retention import RetentionPolicy, as_datetime, decide
from quiesce.sys.kernel import fsync_dir as _fsync_dir
from quiesce.sys.trust import make_private_dirs

CHUNK = 1 << 20
COMPRESSORS = {
    "zstd": (["zstd", "-q", "-c", "-T0"], ["zstd", "-q", "-d", "-c"], ["zstd", "-q", "-t"], "zst"),
    "gzip": (["gzip", "-c"], ["gzip", "-d", "-c"], ["gzip", "-t"], "gz"),
}
TAR_CREATE = ["tar", "--create", "--file=-", "--numeric-owner", "--sparse", "--xattrs", "--acls"]


def tree_totals(root: Path, names: Sequence[str]) -> tuple[int, int]:
    """(bytes, regular files) under ``root/names``: metadata only, for progress and ETA."""
    total = files = 0
    for name in names:
        for dirpath, _dirs, fnames in os.walk(root / name):
            for f in fnames:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(dirpath, f))
                    if stat.S_ISREG(st.st_mode):
                        total += st.st_size
                        files += 1
    return total, files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class TarTarget(Target):
    name: ClassVar[str] = "tar"

    def __init__(
        self,
        *,
        directory: str | Path | None = None,
        command: Sequence[str] | None = None,
        sha256_dir: str | Path | None = None,
        job: str = "adhoc",
        compression: str | None = None,
        archive: str = "{job}-{time}",
        exclude: Sequence[str] = (),
        extra_args: Sequence[str] = (),
    ) -> None:
        if bool(directory) == bool(command):
            raise UsageError("the tar target needs exactly one of `directory` or `command`")
        self.directory = Path(directory) if directory else None
        self.command = list(command) if command else None
        self.sha256_dir = Path(sha256_dir) if sha256_dir else self.directory
        if self.command and self.sha256_dir is None:
            raise UsageError("the tar target with `command` needs `sha256_dir`")
        self.job = job
        self.compression = compression or "zstd"
        if self.compression not in COMPRESSORS:
            raise UsageError(f"unknown tar compression {self.compression!r}", "zstd or gzip")
        self.suffix = ".tar." + COMPRESSORS[self.compression][3]
        self.archive = archive
        self.exclude = list(exclude)
        self.extra_args = list(extra_args)
        stem = re.escape(archive).replace(re.escape("{job}"), re.escape(job))
        stem = stem.replace(re.escape("{time}"), r"(?P<time>\d{8}T\d{6}Z)(?:-\d+)?")
        self._name_re = re.compile(stem + re.escape(self.suffix))

    # -- backup ------------------------------------------------------------------------
    def backup(
        self,
        source_dir: Path,
        *,
        paths: Sequence[str] | None = None,
        tags: Sequence[str] = (),
        host: str | None = None,
        time: datetime | None = None,
        label: str | None = None,
        progress: ProgressFn | None = None,
        timeout: float | None = None,
    ) -> BackupResult:
        require("tar", "tar")
        compress = COMPRESSORS[self.compression][0]
        require(compress[0], self.compression)
        names = list(paths) if paths else ["."]
        when = as_datetime(time or datetime.now(UTC))
        file_name = label or self._free_stem(archive_name(self.archive, self.job, when))
        file_name += self.suffix
        total_bytes, total_files = tree_totals(source_dir, names)
        tar_argv = [*TAR_CREATE, f"--directory={source_dir}"]
        tar_argv += [f"--exclude={p}" for p in self.exclude] + self.extra_args + ["--", *names]

        part: Path | None = None
        sink: IO[bytes] | None = None
        sink_proc: subprocess.Popen[bytes] | None = None
        procs: list[subprocess.Popen[bytes]] = []
        sink_err_file = tempfile.TemporaryFile()  # noqa: SIM115 (closed in finally)
        counted = [0]
        digest = hashlib.sha256()
        written = [0]
        failures: list[str] = []
        errs: dict[str, list[bytes]] = {"tar": [], "comp": []}
        t0 = _time.monotonic()
        try:
            # A SIGTERM while a child starts would orphan it: held until ``procs`` has it.
            with signals_deferred():
                if self.directory is not None:
                    make_private_dirs(self.directory)  # 0700; 0600 files: backups are private
                    fd, tmp_name = tempfile.mkstemp(
                        prefix=f".{file_name}.", suffix=".part", dir=self.directory
                    )  # O_EXCL, 0600, a name nobody can guess
                    part = Path(tmp_name)
                    sink = os.fdopen(fd, "wb")
                else:
                    assert self.command is not None
                    argv = [a.replace("{name}", file_name) for a in self.command]
                    try:
                        sink_proc = subprocess.Popen(
                            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=sink_err_file, start_new_session=True,
                        )  # fmt: skip
                    except FileNotFoundError:
                        raise UsageError(f"the tar command {argv[0]} was not found") from None
                    procs.append(sink_proc)
                    assert sink_proc.stdin is not None
                    sink = sink_proc.stdin
                tar = subprocess.Popen(
                    tar_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    start_new_session=True,
                )  # fmt: skip
                procs.append(tar)
                comp = subprocess.Popen(
                    compress, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, start_new_session=True,
                )  # fmt: skip
                procs.append(comp)
            out = sink

            def feed() -> None:  # tar -> (count) -> compressor
                assert tar.stdout is not None and comp.stdin is not None
                try:
                    while chunk := tar.stdout.read(CHUNK):
                        counted[0] += len(chunk)
                        comp.stdin.write(chunk)
                except (BrokenPipeError, ValueError, OSError) as e:
                    failures.append(f"feeding the compressor: {e}")
                finally:
                    with contextlib.suppress(OSError, BrokenPipeError):
                        comp.stdin.close()

            def drain() -> None:  # compressor -> (hash) -> file or command
                assert comp.stdout is not None
                try:
                    while chunk := comp.stdout.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        written[0] += len(chunk)
                except (BrokenPipeError, OSError) as e:
                    failures.append(f"writing the stream: {e}")

            def collect(stream: IO[bytes] | None, into: list[bytes]) -> None:
                if stream is not None:
                    into.extend(stream)

            threads = [
                threading.Thread(target=feed, daemon=True),
                threading.Thread(target=collect, args=(tar.stderr, errs["tar"]), daemon=True),
                threading.Thread(target=collect, args=(comp.stderr, errs["comp"]), daemon=True),
            ]
            drainer = threading.Thread(target=drain, daemon=True)
            for th in [*threads, drainer]:
                th.start()
            deadline = None if timeout is None else t0 + timeout
            while drainer.is_alive():
                drainer.join(0.5)
                if progress is not None:
                    progress(
                        ProgressUpdate(
                            bytes_done=min(counted[0], total_bytes),
                            total_bytes=total_bytes,
                            total_files=total_files,
                            eta_s=_eta(t0, counted[0], total_bytes),
                        )
                    )
                if deadline is not None and _time.monotonic() > deadline:
                    raise BackupError(
                        f"tar did not finish within {timeout:g}s and was killed",
                        "raise [backup] timeout",
                    )
            if failures:  # the destination went away: nothing will read the rest
                for p in (tar, comp):
                    kill_group(p)
            tar_rc, comp_rc = tar.wait(), comp.wait()
            for th in threads:
                th.join(timeout=30)
            tar_err = b"".join(errs["tar"]).decode(errors="replace")
            comp_err = b"".join(errs["comp"]).decode(errors="replace")
            if self.directory is not None:
                out.flush()
                os.fsync(out.fileno())
            out.close()
            sink_rc = 0
            sink_err = ""
            if sink_proc is not None:
                sink_rc = sink_proc.wait(timeout=600)
                sink_err_file.seek(0)
                sink_err = sink_err_file.read().decode(errors="replace")
            if tar_rc not in (0, 1) or comp_rc != 0 or sink_rc != 0 or failures:
                detail = "; ".join(
                    [f"tar exit {tar_rc}: {tar_err.strip()[-300:]}"] * (tar_rc not in (0, 1))
                    + [f"{compress[0]} exit {comp_rc}: {comp_err.strip()[-300:]}"] * (comp_rc != 0)
                    + [f"{self.command and self.command[0]} exit {sink_rc}: {sink_err[-300:]}"]
                    * (sink_rc != 0)
                    + failures
                )
                raise BackupError(f"tar backup failed: {detail}")
        except BaseException:
            for p in procs:
                if p.poll() is None:
                    kill_group(p)
            if sink is not None:
                with contextlib.suppress(OSError):
                    sink.close()
            if part is not None:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
            raise
        finally:
            sink_err_file.close()
        hexdigest = digest.hexdigest()
        location = self._finish(part, file_name, hexdigest)
        return BackupResult(
            target=self.name,
            snapshot_id=file_name,
            bytes=total_bytes,
            files=total_files,
            duration_s=_time.monotonic() - t0,
            bytes_added=written[0],
            files_new=total_files,
            files_changed=0,
            files_unmodified=0,
            location=location,
            extra={"sha256": hexdigest, "stream_bytes": counted[0], "tar_warning": tar_rc == 1},
        )

    def _finish(self, part: Path | None, file_name: str, hexdigest: str) -> str:
        assert self.sha256_dir is not None
        make_private_dirs(self.sha256_dir)
        sums = self.sha256_dir / f"{file_name}.sha256"
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{file_name}.sha256.", suffix=".part", dir=self.sha256_dir
        )  # O_EXCL, 0600
        tmp = Path(tmp_name)
        with os.fdopen(fd, "w") as f:
            f.write(f"{hexdigest}  {file_name}\n")
            f.flush()
            os.fsync(f.fileno())
        if part is not None:
            assert self.directory is not None
            final = self.directory / file_name
            os.replace(part, final)
            os.replace(tmp, sums)
            _fsync_dir(self.directory)
            return str(final)
        os.replace(tmp, sums)
        _fsync_dir(self.sha256_dir)
        return " ".join(self.command or [])

    def _free_stem(self, stem: str) -> str:
        taken = {s.id for s in self.snapshots()} if self.directory else set()
        candidate, n = stem, 1
        while candidate + self.suffix in taken:
            n += 1
            candidate = f"{stem}-{n}"
        return candidate

    # -- the rest ----------------------------------------------------------------------
    def _require_directory(self, what: str) -> Path:
        if self.directory is None:
            raise UsageError(f"a tar stream sent to a command cannot be {what}")
        return self.directory

    def snapshots(self) -> list[TargetSnapshot]:
        directory = self._require_directory("listed")
        out = []
        for p in sorted(directory.glob("*" + self.suffix)) if directory.is_dir() else []:
            m = self._name_re.fullmatch(p.name)
            if m:
                t = datetime.strptime(m.group("time"), TIME_FORMAT).replace(tzinfo=UTC)
                out.append(TargetSnapshot(id=p.name, time=t, paths=[str(p)]))
        return out

    def verify_file(self, file_name: str) -> tuple[bool, str]:
        """The sha256 beside the file matches, and the stream decompresses."""
        directory = self._require_directory("checked")
        path = directory / file_name
        sums = (self.sha256_dir or directory) / f"{file_name}.sha256"
        try:
            want = sums.read_text().split()[0]
        except (OSError, IndexError):
            return False, f"{file_name}: no sha256 file"
        got = sha256_file(path)
        if got != want:
            return False, f"{file_name}: sha256 {got} != {want}"
        test = COMPRESSORS[self.compression][2]
        p = subprocess.run([*test, str(path)], capture_output=True, text=True)
        if p.returncode != 0:
            return False, f"{file_name}: {test[0]} -t failed: {p.stderr.strip()[-200:]}"
        return True, f"{file_name}: ok"

    def check(self) -> CheckResult:
        t0 = _time.monotonic()
        lines, ok = [], True
        for s in self.snapshots():
            good, line = self.verify_file(s.id)
            ok &= good
            lines.append(line)
        return CheckResult(ok, _time.monotonic() - t0, "\n".join(lines))

    def restore(self, snapshot_id: str, dest: Path, paths: Sequence[str] | None = None) -> Path:
        directory = self._require_directory("restored")
        dest.mkdir(parents=True, exist_ok=True)
        path = directory / snapshot_id
        if not path.is_file():
            raise UsageError(f"no tar backup {snapshot_id} in {directory}")
        decompress = COMPRESSORS[self.compression][1]
        members = [p.strip("/") for p in paths or ()]
        with open(path, "rb") as src:
            dec = subprocess.Popen(
                decompress, stdin=src, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            assert dec.stdout is not None
            tar = subprocess.run(
                ["tar", "--extract", "--file=-", f"--directory={dest}", "--numeric-owner",
                 "--no-same-owner" if os.geteuid() else "--same-owner", "--", *members],
                stdin=dec.stdout, capture_output=True, text=True,
            )  # fmt: skip
            dec.stdout.close()
            dec_err = dec.stderr.read().decode(errors="replace") if dec.stderr else ""
            dec.wait()
        # Like restic and borg, a requested path that the backup lacks is not an error
        # here: the caller compares and reports it as missing.
        other = [
            ln for ln in tar.stderr.splitlines()
            if "Not found in archive" not in ln and "previous errors" not in ln
        ]  # fmt: skip
        if (tar.returncode != 0 and (other or not members)) or dec.returncode != 0:
            raise BackupError(
                f"restoring {snapshot_id} failed: {tar.stderr.strip()[-300:]} {dec_err[-200:]}"
            )
        return dest

    def forget_prune(self, policy: RetentionPolicy) -> PruneResult:
        t0 = _time.monotonic()
        snaps = {s.id: s.time for s in self.snapshots()}
        decision = decide(snaps, policy)
        directory = self._require_directory("pruned")
        for name in decision.delete:
            for p in (directory / name, (self.sha256_dir or directory) / f"{name}.sha256"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return PruneResult(list(decision.keep), decision.delete, _time.monotonic() - t0)


def _eta(t0: float, done: int, total: int) -> float | None:
    elapsed = _time.monotonic() - t0
    if done <= 0 or total <= 0 or elapsed <= 0:
        return None
    return max(total - done, 0) / (done / elapsed)


def from_config(cfg: Any, job: str) -> TarTarget:
    return TarTarget(
        directory=cfg.directory,
        command=cfg.command,
        sha256_dir=cfg.sha256_dir,
        job=job,
        compression=cfg.compression,
        archive=cfg.archive,
        exclude=cfg.exclude,
        extra_args=cfg.extra_args,
    )


__all__ = ["TarTarget", "from_config", "sha256_file", "tree_totals"]
