"""Shared pieces for the snapshot tests: an image on a reflink-capable host, quiescers."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ImageOnHost:
    """An inner filesystem whose loop image lives on an outer reflink-capable filesystem."""

    outer: Any  # conftest.LoopFS
    inner: Any


def image_on_reflink_host(loopfs: Any, inner: str = "ext4", outer: str = "xfs") -> ImageOnHost:
    """outer = XFS (reflink=1) or btrfs; inner = a loop filesystem whose image is on it."""
    size = 400 if inner == "xfs" else None
    # btrfs: room for the clones and the reflink provider's base beside the image
    host = loopfs(outer, size_mb=size or (256 if outer == "btrfs" else None))
    return ImageOnHost(host, loopfs(inner, image_dir=host.mountpoint))


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, text=True, capture_output=True, timeout=120)


@dataclass
class Recorder:
    """A Quiescer that records its calls in a shared list (order matters)."""

    name: str
    log: list[str]
    fail_before: bool = False
    fail_after: bool = False
    calls: list[Any] = field(default_factory=list)

    def before_freeze(self) -> None:
        self.log.append(f"{self.name}.before_freeze")
        if self.fail_before:
            raise RuntimeError(f"{self.name} could not quiesce")

    def after_thaw(self, ok: bool) -> None:
        self.log.append(f"{self.name}.after_thaw({ok})")
        if self.fail_after:
            raise RuntimeError(f"{self.name} could not resume")


def read_records(path: Path) -> list[int]:
    """The writer's records file: complete lines only (a torn last line is ignored)."""
    text = path.read_text()
    lines = text.split("\n")[:-1]  # the part after the last newline is not a record yet
    return [int(x) for x in lines if x]
