"""Verify a backup: the target's own check, or a restore compared byte for byte.

``verify`` is one of:
- ``none``: nothing;
- ``repository``: the target's check (``restic check``, ``borg check``, sha256 + decode
  of the tar files);
- ``sample``: restore N randomly chosen regular files into a temporary directory and
  compare each, byte for byte, with the snapshot (still mounted);
- ``full``: restore everything and compare the whole tree (types, symlink targets,
  permission bits, file contents), in both directions.

The temporary directory is journaled, so a crash in the middle leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quiesce.backup.targets.base import BackupResult, ProgressFn, ProgressUpdate, Target
from quiesce.host.trust import make_private_dirs
from quiesce.state.journal import Journal

MODES = ("none", "repository", "sample", "full")
CHUNK = 1 << 20
MAX_REPORTED = 20


@dataclass
class VerifyResult:
    mode: str
    ok: bool
    duration_s: float = 0.0
    files_checked: int = 0
    bytes_compared: int = 0
    mismatches: list[str] = field(default_factory=list)
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


def regular_files(root: Path, names: Sequence[str]) -> Iterator[str]:
    """Paths (relative to ``root``) of the regular files under ``root/<name>``."""
    for name in names:
        for dirpath, _dirs, files in os.walk(root / name):
            rel_dir = os.path.relpath(dirpath, root)
            for f in files:
                with contextlib.suppress(OSError):
                    if stat.S_ISREG(os.lstat(os.path.join(dirpath, f)).st_mode):
                        yield os.path.join(rel_dir, f)


def sample(items: Iterator[str], k: int, rng: random.Random) -> list[str]:
    """Reservoir sampling: k items uniformly, in one pass, without holding the whole tree."""
    chosen: list[str] = []
    for n, item in enumerate(items):
        if n < k:
            chosen.append(item)
        else:
            j = rng.randint(0, n)
            if j < k:
                chosen[j] = item
    return sorted(chosen)


def compare_file(src: Path, restored: Path) -> str | None:
    """None if equal, else what differs."""
    try:
        st_r = os.lstat(restored)
    except FileNotFoundError:
        return "missing from the restore"
    st_s = os.lstat(src)
    if stat.S_IFMT(st_s.st_mode) != stat.S_IFMT(st_r.st_mode):
        return "type differs"
    if stat.S_ISLNK(st_s.st_mode):
        return None if os.readlink(src) == os.readlink(restored) else "symlink target differs"
    if stat.S_IMODE(st_s.st_mode) != stat.S_IMODE(st_r.st_mode):
        return f"mode {oct(stat.S_IMODE(st_s.st_mode))} != {oct(stat.S_IMODE(st_r.st_mode))}"
    if stat.S_ISREG(st_s.st_mode):
        if st_s.st_size != st_r.st_size:
            return f"size {st_s.st_size} != {st_r.st_size}"
        if not same_bytes(src, restored):
            return "content differs"
    return None


def compare_trees(
    src_root: Path,
    dst_root: Path,
    names: Sequence[str],
    progress: ProgressFn | None = None,
    total_bytes: int | None = None,
) -> tuple[int, int, list[str]]:
    """Walk both trees; (entries checked, bytes compared, mismatches). ``progress`` hears
    the bytes compared so far, at most every 0.2 s."""
    last = 0.0
    checked = compared = 0
    bad: list[str] = []
    seen: set[str] = set()
    for name in names:
        for dirpath, dirs, files in os.walk(src_root / name):
            rel_dir = os.path.relpath(dirpath, src_root)
            for entry in [*dirs, *files]:
                rel = os.path.join(rel_dir, entry)
                seen.add(rel)
                checked += 1
                why = compare_file(src_root / rel, dst_root / rel)
                if why:
                    bad.append(f"{rel}: {why}")
                elif entry in files and os.path.isfile(src_root / rel):
                    compared += os.lstat(src_root / rel).st_size
                if progress is not None and time.monotonic() - last >= 0.2:
                    last = time.monotonic()
                    progress(ProgressUpdate(compared, total_bytes, checked))
        for dirpath, dirs, files in os.walk(dst_root / name):
            rel_dir = os.path.relpath(dirpath, dst_root)
            for entry in [*dirs, *files]:
                rel = os.path.join(rel_dir, entry)
                if rel not in seen:
                    bad.append(f"{rel}: in the restore but not in the snapshot")
    return checked, compared, bad


@contextlib.contextmanager
def _scratch(temp_root: str | Path, journal: Journal | None) -> Iterator[Path]:
    root = Path(temp_root)
    make_private_dirs(root)  # 0700 each: the restored copy may hold root-only files
    path = Path(tempfile.mkdtemp(prefix="quiesce-verify-", dir=root))
    eid = journal.intent("dir", path=str(path), recursive=True) if journal else None
    try:
        yield path
    finally:
        if journal is not None and eid is not None:
            journal.undo(eid)
        else:
            shutil.rmtree(path, ignore_errors=True)


def verify(
    target: Target,
    backup: BackupResult,
    source_dir: Path,
    names: Sequence[str],
    mode: str,
    *,
    sample_files: int = 20,
    temp_root: str | Path = "/var/tmp",
    journal: Journal | None = None,
    rng: random.Random | None = None,
    progress: ProgressFn | None = None,
) -> VerifyResult:
    """Verify ``backup`` of ``source_dir/<names>`` (the snapshot, still mounted).
    ``progress`` hears the bytes compared (against the backup's size)."""
    if mode not in MODES:
        raise ValueError(f"verify must be one of {MODES}")
    t0 = time.monotonic()
    if mode == "none":
        return VerifyResult("none", True, 0.0, detail="not verified")
    if mode == "repository":
        check = target.check()
        return VerifyResult(
            "repository", check.ok, time.monotonic() - t0, detail=check.output[-1000:]
        )
    with _scratch(temp_root, journal) as scratch:
        if mode == "sample":
            chosen = sample(regular_files(source_dir, names), sample_files, rng or random.Random())
            if chosen:
                target.restore(backup.snapshot_id, scratch, chosen)
            bad, compared = [], 0
            for rel in chosen:
                why = compare_file(source_dir / rel, scratch / rel)
                if why:
                    bad.append(f"{rel}: {why}")
                else:
                    compared += os.lstat(source_dir / rel).st_size
            return VerifyResult(
                "sample",
                not bad,
                time.monotonic() - t0,
                files_checked=len(chosen),
                bytes_compared=compared,
                mismatches=bad[:MAX_REPORTED],
                detail=f"{len(chosen)} random file(s) restored and compared",
            )
        target.restore(backup.snapshot_id, scratch, list(names))
        checked, compared, bad = compare_trees(
            source_dir, scratch, names, progress, backup.bytes or None
        )
        if progress is not None:
            progress(ProgressUpdate(compared, backup.bytes or None, checked))
        return VerifyResult(
            "full",
            not bad,
            time.monotonic() - t0,
            files_checked=checked,
            bytes_compared=compared,
            mismatches=bad[:MAX_REPORTED],
            detail=f"full restore: {checked} entries compared"
            + (f", {len(bad)} differ" if bad else ""),
        )


__all__ = ["MODES", "VerifyResult", "compare_trees", "regular_files", "sample", "verify"]
