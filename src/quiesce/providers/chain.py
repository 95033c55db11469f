"""A guest image's backing chain: the files a clone of a qcow2 overlay needs.

A qcow2 image with a backing file holds only what the guest wrote since the backing file
was made; a clone of it alone depends on the live chain below it (which ``qemu-img
commit`` or a deletion may change). The ``qemu`` provider clones every file of the chain
inside the window and, after the thaw, points each clone at the clone below it
(:func:`rebase`: ``qemu-img rebase -u`` rewrites the clone's header only, no data is read
or copied). The chain is read with ``qemu-img info -U`` (shared: the running guest's
qemu holds the image's lock) before the freeze; a raw image is its own chain and needs
no qemu-img.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass

from quiesce.errors import ToolFailed, UsageError
from quiesce.host import proc
from quiesce.host.images import is_qcow2


@dataclass(frozen=True)
class ChainFile:
    """One file of a chain, top first: its real path and its format (qcow2, raw, ...)."""

    path: str
    format: str


def _qemu_img() -> str:
    found = shutil.which("qemu-img")
    if found is None:
        raise UsageError(
            "a guest image is qcow2, and reading its backing chain needs qemu-img",
            "install qemu-img (Debian: apt-get install qemu-utils)",
        )
    return found


def _why(p: subprocess.CompletedProcess[str]) -> str:
    """qemu-img's own last word on a failure."""
    return (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]


def backing_chain(image: str) -> list[ChainFile]:
    """``image`` and every file below it, top first. A raw image (or any non-qcow2 file):
    itself alone, as the provider always cloned it."""
    real = os.path.realpath(image)
    if not is_qcow2(real):
        return [ChainFile(real, "raw")]
    argv = (_qemu_img(), "info", "-U", "--backing-chain", "--output=json", real)
    p = proc.run_tool(*argv, timeout=60)
    if p.returncode != 0:
        raise UsageError(
            f"cannot read the backing chain of {image}: {_why(p)}",
            "every file of the chain must exist and be readable on this host",
        )
    out = []
    for layer in json.loads(p.stdout):
        path = layer["filename"]
        if not os.path.isabs(path):  # the top is named as given; the others in full
            path = os.path.join(os.path.dirname(real), path)
        out.append(ChainFile(os.path.realpath(path), str(layer.get("format", "raw"))))
    return out


def rebase(clone: str, backing_clone: str, backing_format: str) -> None:
    """Point the qcow2 ``clone`` at ``backing_clone`` (named relative to the clone's
    directory: the snapshot's files keep working if that directory moves), header only."""
    rel = os.path.relpath(backing_clone, os.path.dirname(clone))
    argv = (_qemu_img(), "rebase", "-u", "-f", "qcow2", "-F", backing_format, "-b", rel, clone)
    p = proc.run_tool(*argv, timeout=60)
    if p.returncode != 0:
        raise ToolFailed(
            f"cannot rebase the clone {clone} onto {backing_clone}: {_why(p)}",
            "the half-made snapshot was removed; check the clone directory and retry",
            stderr=p.stderr,
        )


__all__ = ["ChainFile", "backing_chain", "rebase"]
