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
import tempfile
import time as _time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, ClassVar

from quiesce.backup.targets.base import (
    KILL_GRACE,
    STOP_SIGNAL,
    BackupError,
    BackupResult,
    CheckResult,
    ProgressFn,
    ProgressUpdate,
    Target,
    TargetSnapshot,
    require,
)
from quiesce.backup.targets.borg import TIME_FORMAT, archive_name
from quiesce.errors import UsageError
from quiesce.host import proc
from quiesce.host.kernel import fsync_dir as _fsync_dir
from quiesce.host.trust import make_private_dirs
from quiesce.state.retention import as_datetime

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
        require(COMPRESSORS[self.compression][0][0], self.compression)
        names = list(paths) if paths else ["."]
        when = as_datetime(time or datetime.now(UTC))
        file_name = label or self._free_stem(archive_name(self.archive, self.job, when))
        file_name += self.suffix
        total_bytes, total_files = tree_totals(source_dir, names)
        tar_argv = [*TAR_CREATE, f"--directory={source_dir}"]
        tar_argv += [f"--exclude={p}" for p in self.exclude] + self.extra_args + ["--", *names]
        tally = _Tally()
        t0 = _time.monotonic()

        def tick() -> None:
            assert progress is not None
            done = tally.tar_bytes
            progress(
                ProgressUpdate(
                    bytes_done=min(done, total_bytes),
                    total_bytes=total_bytes,
                    total_files=total_files,
                    eta_s=_eta(t0, done, total_bytes),
                )
            )

        on_tick = tick if progress is not None else None
        part, tar_rc = self._write(tar_argv, file_name, tally, on_tick, timeout)
        hexdigest = tally.digest.hexdigest()
        location = self._finish(part, file_name, hexdigest)
        return BackupResult(
            target=self.name,
            snapshot_id=file_name,
            bytes=total_bytes,
            files=total_files,
            duration_s=_time.monotonic() - t0,
            bytes_added=tally.out_bytes,
            files_new=total_files,
            files_changed=0,
            files_unmodified=0,
            location=location,
            extra={
                "sha256": hexdigest,
                "stream_bytes": tally.tar_bytes,
                "tar_warning": tar_rc == 1,
            },
        )

    def _write(
        self,
        tar_argv: list[str],
        file_name: str,
        tally: _Tally,
        on_tick: Callable[[], None] | None,
        timeout: float | None,
    ) -> tuple[Path | None, int]:
        """The stream into ``.NAME.part`` (renamed by the caller) or into the command;
        nothing is left behind on failure. Returns (the part file, tar's exit code)."""
        part: Path | None = None
        sink: IO[bytes] | None = None
        try:
            if self.directory is not None:
                make_private_dirs(self.directory)  # 0700; 0600 files: backups are private
                fd, tmp_name = tempfile.mkstemp(
                    prefix=f".{file_name}.", suffix=".part", dir=self.directory
                )  # O_EXCL, 0600, a name nobody can guess
                part = Path(tmp_name)
                sink = os.fdopen(fd, "wb")
            res = self._pipeline(tar_argv, file_name, tally, sink, on_tick, timeout)
            if sink is not None:
                sink.flush()
                os.fsync(sink.fileno())
                sink.close()
            if res.timed_out:
                raise BackupError(
                    f"tar did not finish within {timeout:g}s and was killed",
                    "raise [backup] timeout",
                )
            if res.failures:
                raise BackupError(f"tar backup failed: {'; '.join(res.failures)}")
        except BaseException:
            if sink is not None:
                with contextlib.suppress(OSError):
                    sink.close()
            if part is not None:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
            raise
        return part, res.stages[0].returncode

    def _pipeline(
        self,
        tar_argv: list[str],
        file_name: str,
        tally: _Tally,
        sink: IO[bytes] | None,
        on_tick: Callable[[], None] | None,
        timeout: float | None,
    ) -> proc.PipelineResult:
        """tar | (count) | compressor | (hash) | the file, or the command's stdin."""
        stages = [
            proc.Stage(tar_argv, ok=(0, 1), tap=tally.count),  # 1: some file changed as read
            proc.Stage(COMPRESSORS[self.compression][0], tap=tally.hash),
        ]
        if self.command is not None:
            stages.append(proc.Stage([a.replace("{name}", file_name) for a in self.command]))
        try:
            return proc.run_pipeline(
                stages, sink=sink, timeout=timeout, on_tick=on_tick, cwd=None,
                grace=KILL_GRACE, pdeathsig=STOP_SIGNAL,
            )  # fmt: skip
        except FileNotFoundError as e:
            if self.command is not None and e.filename == stages[-1].argv[0]:
                raise UsageError(f"the tar command {e.filename} was not found") from None
            raise

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
                out.append(
                    TargetSnapshot(id=p.name, time=t, paths=[str(p)], source=m.group("time"))
                )
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
        p = proc.run_bounded([*test, str(path)], timeout=None, cwd=None, pdeathsig=STOP_SIGNAL)
        if p.returncode != 0:
            err = p.stderr.decode(errors="replace").strip()[-200:]
            return False, f"{file_name}: {test[0]} -t failed: {err}"
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
        extract = [
            "tar", "--extract", "--file=-", f"--directory={dest}", "--numeric-owner",
            "--no-same-owner" if os.geteuid() else "--same-owner", "--", *members,
        ]  # fmt: skip
        with open(path, "rb") as src:
            res = proc.run_pipeline(
                [proc.Stage(decompress), proc.Stage(extract)], source=src, cwd=None,
                grace=KILL_GRACE, pdeathsig=STOP_SIGNAL,
                limit=1 << 20,  # tar's stderr is read below, line by line: keep it all
            )  # fmt: skip
        dec, tar = res.stages
        tar_err = tar.stderr.decode(errors="replace")
        # Like restic and borg, a requested path that the backup lacks is not an error
        # here: the caller compares and reports it as missing.
        other = [
            ln for ln in tar_err.splitlines()
            if "Not found in archive" not in ln and "previous errors" not in ln
        ]  # fmt: skip
        if (tar.returncode != 0 and (other or not members)) or dec.returncode != 0:
            dec_err = dec.stderr.decode(errors="replace")
            raise BackupError(
                f"restoring {snapshot_id} failed: {tar_err.strip()[-300:]} {dec_err[-200:]}"
            )
        return dest

    def source_key(self, snapshot_id: str, when: datetime) -> str:
        """A tar file carries no tags: the snapshot's time (its name's ``{time}``, which
        is the manifest's creation time) says which snapshot it holds."""
        return as_datetime(when).astimezone(UTC).strftime(TIME_FORMAT)

    @property
    def lists_backups(self) -> bool:
        return self.directory is not None

    def remove(self, backup_ids: Sequence[str]) -> str:
        directory = self._require_directory("pruned")
        for name in backup_ids:
            for p in (directory / name, (self.sha256_dir or directory) / f"{name}.sha256"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return ""


class _Tally:
    """What went through the pipeline: tar's bytes (progress), and the compressed stream's
    bytes and sha256 (written beside it)."""

    def __init__(self) -> None:
        self.tar_bytes = 0
        self.out_bytes = 0
        self.digest = hashlib.sha256()

    def count(self, chunk: bytes) -> None:
        self.tar_bytes += len(chunk)

    def hash(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.out_bytes += len(chunk)


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
