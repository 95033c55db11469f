#!/usr/bin/env bash
# Install quiesce on a fresh Debian 12 machine (run as root). Idempotent.
#   bash scripts/install.sh          the tool, its filesystem tools and backup targets (demo),
#                                    and fleet-setup.sh (sshd, ansible-core: demo --fleet)
#   bash scripts/install.sh --test   also everything the whole test suite needs:
#       db-setup.sh    postgresql, mariadb-server   (database writer tests)
#       vm-setup.sh    qemu, Debian kernels, lvm2, zfs (the VM tier: LVM and ZFS)
#       fleet-setup.sh openssh-server, ansible-core (the fleet tests' hosts and controller)
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
tests=0
[ "${1:-}" = "--test" ] && tests=1

need_apt=()
for pkg in e2fsprogs xfsprogs btrfs-progs util-linux sqlite3; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install.sh: apt-get install ${need_apt[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
bash scripts/backup-setup.sh
# `quiesce demo --fleet` (and the fleet tests) need Debian's sshd and ansible-core; the
# system sshd is not left running (see fleet-setup.sh).
bash scripts/fleet-setup.sh

if [ "$tests" = 1 ]; then
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test,writers,ebs]'
  bash scripts/db-setup.sh
  bash scripts/vm-setup.sh
else
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e .
fi
# the man page and shell completion, generated from the CLI (package data: quiesce/cli/data)
data=$(python3 -c 'import quiesce.cli.gendocs as g; print(g.DATA)')
install -Dm644 "$data/quiesce.1" /usr/local/share/man/man1/quiesce.1
install -Dm644 "$data/quiesce.bash" /usr/local/share/bash-completion/completions/quiesce
install -Dm644 "$data/_quiesce" /usr/local/share/zsh/site-functions/_quiesce
echo "install.sh: ready ($(python3 -m quiesce version))"
