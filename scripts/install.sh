#!/usr/bin/env bash
# Install quiesce on a fresh Debian 12 machine (run as root). Idempotent.
#   bash scripts/install.sh          the tool, its filesystem tools and backup targets (demo),
#                                    and fleet-setup.sh (sshd, ansible-core: demo --fleet)
#   bash scripts/install.sh --test   also everything the whole test suite needs:
#       the test tools (pytest & co. from PyPI; systemd-analyze, kmod, procps from apt)
#       db-setup.sh    postgresql, mariadb-server   (database writer tests)
#       vm-setup.sh    qemu, Debian kernels, lvm2, zfs (the VM tier: LVM and ZFS)
# Every step says what it does; a failure names the step and the command, and stops.
# quiesce is installed (editable, from this checkout) into the interpreter `python3`
# names: see scripts/setup-lib.sh for why and how on Debian's PEP 668 python3.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
SETUP_NAME=install.sh
. scripts/setup-lib.sh
tests=0
case "${1:-}" in
  --test) tests=1 ;;
  "") ;;
  *) setup_die "unknown argument '$1' (usage: install.sh [--test])" ;;
esac

step "system packages: python3, filesystem tools"
# mount: losetup/mount; util-linux: fsfreeze, findmnt, blkid; kmod: modprobe
apt_install python3 python3-pip ca-certificates e2fsprogs xfsprogs btrfs-progs util-linux \
  mount kmod sqlite3
need_python

step "backup tools (scripts/backup-setup.sh)"
bash scripts/backup-setup.sh

# --- fleet: `quiesce demo --fleet` and the fleet tests need Debian's sshd (one per simulated
# host; the system sshd is not left running) and ansible-core ---------------------------------
step "fleet: sshd, ansible-core (scripts/fleet-setup.sh)"
bash scripts/fleet-setup.sh

if [ "$tests" = 1 ]; then
  step "test tools: systemd-analyze, procps, zsh (the completion test)"
  apt_install systemd procps zsh
  step "quiesce with its test extras (pip)"
  pip_install -e '.[test,writers,ebs]'
  step "database servers (scripts/db-setup.sh)"
  bash scripts/db-setup.sh
  step "VM tier (scripts/vm-setup.sh)"
  bash scripts/vm-setup.sh
else
  step "quiesce (pip)"
  pip_install -e .
fi

step "man page and shell completion (generated from the CLI, in quiesce/cli/data)"
data=$(python3 -c 'import quiesce.cli.gendocs as g; print(g.DATA)')
install -Dm644 "$data/quiesce.1" /usr/local/share/man/man1/quiesce.1
install -Dm644 "$data/quiesce.bash" /usr/local/share/bash-completion/completions/quiesce
install -Dm644 "$data/_quiesce" /usr/local/share/zsh/site-functions/_quiesce

step "check"
version=$(python3 -m quiesce version) || setup_die "python3 -m quiesce does not run"
setup_log "ready: $version ($(command -v python3) -> $(python3 -c 'import sys; print(sys.executable)'))"
