#!/usr/bin/env bash
# Install the backup tools the backup targets and their tests use: restic, borgbackup,
# zstd (tar target), sfdisk (fdisk). Debian 12, as root. Idempotent: a second run only checks.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
SETUP_NAME=backup-setup.sh
. scripts/setup-lib.sh

# fdisk: sfdisk, which the guest-backup tests use to make a disk with a partition table
step "restic, borgbackup, zstd, gzip, tar, fdisk"
apt_install restic borgbackup zstd gzip tar fdisk
for bin in restic borg zstd sfdisk; do
  command -v "$bin" >/dev/null || setup_die "$bin missing after the install"
done
step "check"
setup_log "ready (restic $(restic version | awk '{print $2}'), $(borg --version))"
