#!/usr/bin/env bash
# Install the backup tools the backup targets and their tests use: restic, borgbackup,
# zstd (tar target). Debian 12, as root. Idempotent: a second run only checks.
set -euo pipefail

need_apt=()
for pkg in restic borgbackup zstd gzip tar; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "backup-setup.sh: apt-get install ${need_apt[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${need_apt[@]}" >/dev/null
fi
for bin in restic borg zstd; do
  command -v "$bin" >/dev/null || { echo "backup-setup.sh: $bin missing after install" >&2; exit 1; }
done
echo "backup-setup.sh: ready (restic $(restic version | awk '{print $2}'), $(borg --version))"
