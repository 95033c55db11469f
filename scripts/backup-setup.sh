#!/usr/bin/env bash
# Install the backup tools the backup targets and their tests use: restic, borgbackup,
# zstd (tar target). Debian 12, as root. Idempotent: a second run only checks.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
SETUP_NAME=backup-setup.sh
. scripts/setup-lib.sh

step "restic, borgbackup, zstd, gzip, tar"
apt_install restic borgbackup zstd gzip tar
for bin in restic borg zstd; do
  command -v "$bin" >/dev/null || setup_die "$bin missing after the install"
done
step "check"
setup_log "ready (restic $(restic version | awk '{print $2}'), $(borg --version))"
