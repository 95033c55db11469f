"""A small file tree with the shapes a backup gets wrong: odd names, links, modes, holes."""

from __future__ import annotations

import os
import random
from pathlib import Path

ODD_NAMES = ["with space.txt", "glob[1]*?.dat", "ünïcödé.txt", "-leading-dash", "back\\slash"]


def make_tree(root: Path, n_files: int = 40, seed: int = 1, max_size: int = 200_000) -> list[str]:
    """Fill ``root`` (a volume-like directory); returns the regular files' relative paths."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_files):
        d = root / f"d{i % 5}" / f"sub{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"f{i:03d}.bin"
        p.write_bytes(rng.randbytes(rng.choice([0, 1, 4096, rng.randint(1, max_size)])))
        files.append(str(p.relative_to(root)))
    for name in ODD_NAMES:
        (root / name).write_bytes(rng.randbytes(100))
        files.append(name)
    (root / "d0" / "link").symlink_to("sub0/f000.bin")
    (root / "empty-dir").mkdir(exist_ok=True)
    secret = root / "d1" / "private"
    secret.write_bytes(b"mode 600")
    os.chmod(secret, 0o600)
    files.append("d1/private")
    sparse = root / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"middle")
    files.append("sparse.img")
    return files


def change_some(root: Path, rels: list[str], fraction: float, seed: int = 2) -> list[str]:
    """Rewrite a fraction of the files (new content, same names); returns those changed."""
    rng = random.Random(seed)
    n = max(1, int(len(rels) * fraction))
    changed = rng.sample(sorted(rels), n)
    for rel in changed:
        p = root / rel
        p.write_bytes(rng.randbytes(1000) + p.read_bytes()[:500])
    return changed
