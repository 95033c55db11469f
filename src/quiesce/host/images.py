"""What a disk image file holds: one filesystem the host can mount, or something else.

A guest's disk image (the ``qemu`` provider's clone) is backed up file by file only if it
holds one bare filesystem (``mkfs`` on the whole ``/dev/vdX``): that one is mounted
read-only on a read-only loop device like any clone. A partition table, an LVM physical
volume, LUKS or a qcow2 container needs more than a loop device (partition scanning,
device-mapper activation, a key, qemu-nbd), each of which attaches or activates storage
on the host; quiesce refuses those instead of backing up something it cannot mount, and
names what it found (:func:`contents`).
"""

from __future__ import annotations

from dataclasses import dataclass

from quiesce.host import proc

# Filesystems the read-only snapshot mount knows the options of (snapshot/readonly.py).
MOUNTABLE = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs"})

QCOW2_MAGIC = b"QFI\xfb"

# Container formats blkid does not report, by their first bytes.
_MAGIC = {
    QCOW2_MAGIC: "a qcow2 image",
    b"KDMV": "a VMDK image",
    b"conectix": "a VHD image",
    b"vhdxfile": "a VHDX image",
}
_MAGIC_LEN = max(len(m) for m in _MAGIC)

_TYPES = {
    "LVM2_member": "an LVM physical volume",
    "crypto_LUKS": "a LUKS encrypted volume",
    "linux_raid_member": "an md RAID member",
    "swap": "swap space",
}


@dataclass(frozen=True)
class ImageContents:
    """What :func:`contents` found: ``fstype`` set iff the host can mount it read-only."""

    fstype: str | None  # ext4, xfs, btrfs, ...: mountable as is
    what: str  # for a message: "an ext4 filesystem", "a partition table (gpt)", ...


def is_qcow2(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(QCOW2_MAGIC)) == QCOW2_MAGIC


def contents(path: str) -> ImageContents:
    """Classify the image at ``path`` from its first bytes and blkid's low-level probe
    (``blkid -p``: the superblock itself, not the cache)."""
    with open(path, "rb") as f:
        head = f.read(_MAGIC_LEN)
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return ImageContents(None, what)
    p = proc.run_tool("blkid", "-p", "-o", "export", path)
    tags = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    fstype, usage, pttype = tags.get("TYPE", ""), tags.get("USAGE", ""), tags.get("PTTYPE", "")
    if fstype in MOUNTABLE:
        return ImageContents(fstype, f"a filesystem ({fstype})")
    if fstype in _TYPES:
        return ImageContents(None, _TYPES[fstype])
    if pttype:
        return ImageContents(None, f"a partition table ({pttype})")
    if fstype:
        kind = "filesystem" if usage == "filesystem" else (usage or "signature")
        return ImageContents(None, f"a {fstype} {kind}, which quiesce does not mount")
    return ImageContents(None, "no filesystem or partition table blkid knows")


__all__ = ["MOUNTABLE", "QCOW2_MAGIC", "ImageContents", "contents", "is_qcow2"]
