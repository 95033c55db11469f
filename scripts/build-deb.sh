#!/usr/bin/env bash
# Build quiesce's wheel, sdist and a Debian package from this tree, with Debian's tools.
#
#   bash scripts/build-deb.sh [OUTDIR]        (default OUTDIR: dist/)
#
# Makes OUTDIR/quiesce-V-py3-none-any.whl and OUTDIR/quiesce-V.tar.gz (`python3 -m build`),
# then OUTDIR/quiesce_V-1_ARCH.deb with dpkg-deb:
#
#   /usr/lib/quiesce/       a virtual environment of Debian's /usr/bin/python3 holding the
#                           wheel and its dependencies (typer, rich, pydantic ...);
#   /usr/bin/quiesce        -> /usr/lib/quiesce/bin/quiesce
#   /usr/share/man/man1/quiesce.1.gz, bash and zsh completion (generated, cli/data)
#
# Why a private environment and not python3-* packages: quiesce needs pydantic 2, and
# Debian 12 ships pydantic 1 (python3-pydantic 1.10); a venv under /usr/lib/quiesce keeps
# its dependencies away from every other Python program (nothing lands in dist-packages),
# and apt still owns, upgrades and removes every file. This is what dh-virtualenv does;
# done here with dpkg-deb alone: the environment is built in a staging directory with the
# interpreter the package will use (/usr/bin/python3: the same minor version, so the
# compiled pydantic-core matches), its staging paths are rewritten to /usr/lib/quiesce,
# and it is byte-compiled at build time (a freeze window never writes bytecode).
# The package is architecture-specific (pydantic-core is compiled) and depends on
# python3 of the same minor version.
#
# Needs: python3 with the `build` module (install.sh --test installs it), /usr/bin/python3
# with venv (apt-get install python3-venv), dpkg-deb; network access to PyPI (or a mirror
# pip is configured for) for the dependencies.
set -Eeuo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-$REPO/dist}")
PY=/usr/bin/python3
PREFIX=/usr/lib/quiesce
mkdir -p "$OUT"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n 1)
pyminor=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
arch=$(dpkg --print-architecture)
[ -n "$version" ] || { echo "build-deb.sh: no version in pyproject.toml" >&2; exit 1; }

t0=$SECONDS
echo "== wheel and sdist (python3 -m build)"
python3 -m build --outdir "$OUT" "$REPO" >"$OUT/build.log" 2>&1 ||
  { tail -n 30 "$OUT/build.log" >&2; exit 1; }
wheel=$OUT/quiesce-$version-py3-none-any.whl
[ -s "$wheel" ] || { echo "build-deb.sh: $wheel was not made" >&2; exit 1; }
echo "   $(basename "$wheel"), quiesce-$version.tar.gz ($((SECONDS - t0)) s)"

t1=$SECONDS
STAGE=$(mktemp -d /var/tmp/quiesce-deb.XXXXXX)
trap 'rm -rf --one-file-system "$STAGE"' EXIT
ROOT=$STAGE/root
VENV=$ROOT$PREFIX
echo "== environment $PREFIX ($PY $pyminor)"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --no-compile --disable-pip-version-check "$wheel"
# pip is not needed at run time; apt is what changes this environment
"$VENV/bin/python" -m pip uninstall -q -y pip
rm -f "$VENV"/bin/activate* "$VENV"/bin/Activate.ps1
# staging paths -> the installed path (scripts' shebangs, RECORD files)
grep -rlI --null "$STAGE" "$ROOT" | xargs -0 -r sed -i "s#$ROOT##g"
if grep -rqI "$STAGE" "$ROOT"; then
  echo "build-deb.sh: staging paths left in:" >&2
  grep -rlI "$STAGE" "$ROOT" >&2
  exit 1
fi
"$PY" -m compileall -q -j 0 -d "$PREFIX/lib" "$VENV/lib" >/dev/null

mkdir -p "$ROOT/usr/bin"
ln -s "../lib/quiesce/bin/quiesce" "$ROOT/usr/bin/quiesce"
data=$("$VENV/bin/python" -c 'import quiesce.cli.gendocs as g; print(g.DATA)')
install -Dm644 "$data/quiesce.1" "$ROOT/usr/share/man/man1/quiesce.1"
gzip -9n "$ROOT/usr/share/man/man1/quiesce.1"
install -Dm644 "$data/quiesce.bash" "$ROOT/usr/share/bash-completion/completions/quiesce"
install -Dm644 "$data/_quiesce" "$ROOT/usr/share/zsh/vendor-completions/_quiesce"
install -Dm644 "$REPO/README.md" "$ROOT/usr/share/doc/quiesce/README.md"
cp -r "$REPO/docs" "$ROOT/usr/share/doc/quiesce/docs"

size=$(du -sk "$ROOT" | cut -f1)
mkdir -p "$ROOT/DEBIAN"
cat >"$ROOT/DEBIAN/control" <<EOF
Package: quiesce
Version: $version-1
Architecture: $arch
Maintainer: quiesce developers <quiesce@localhost>
Installed-Size: $size
Depends: python3 (>= $pyminor), python3 (<< ${pyminor%.*}.$((${pyminor#*.} + 1))), util-linux, mount
Recommends: e2fsprogs, xfsprogs, restic, borgbackup, zstd
Suggests: btrfs-progs, lvm2, zfsutils-linux, openssh-server, ansible-core
Section: admin
Priority: optional
Homepage: https://github.com/quiesce/quiesce
Description: consistent snapshots of mounted Linux filesystems
 quiesce freezes one or several filesystems (FIFREEZE), lets a storage
 snapshot happen and thaws them at once, with a guardian process that thaws
 by itself on a deadline, a lapsed lease or the death of its controller.
 Built-in providers (reflink, btrfs, LVM, ZFS, EBS, a command), application
 writers (SQLite, PostgreSQL, MySQL) and backup targets (restic, borg, tar).
EOF
# root-owned files, modes a package has (no group/other write: quiesce's own trust checks)
chmod -R u+rwX,go+rX,go-w "$ROOT"
deb=$OUT/quiesce_${version}-1_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$deb" >/dev/null
echo "   $(basename "$deb"): $(du -h "$deb" | cut -f1) ($((SECONDS - t1)) s)"
dpkg-deb --info "$deb" | sed -n 's/^ \(Package\|Version\|Architecture\|Depends\):/   \1:/p'
echo "== built in $((SECONDS - t0)) s: $OUT"
