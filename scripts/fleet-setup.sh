#!/usr/bin/env bash
# Install what the fleet tests and `quiesce demo --fleet` need: Debian's sshd and
# ansible-core. Debian 12, as root. Idempotent: a second run only checks.
#
# The tests start their own sshd per simulated host (own config, keys, 127.0.0.N), so the
# system sshd is never needed: if it was not running before, it is not left running (and
# the install is kept from starting it at all when the machine has no policy-rc.d).
# ansible-core goes into the interpreter the tests use (python3 -m pip), so that
# `python3 -m ansible ...` and the ansible-* scripts beside it are the ones the tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

need_apt=()
for pkg in openssh-server openssh-client util-linux e2fsprogs xfsprogs; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "fleet-setup.sh: apt-get install ${need_apt[*]}"
  sshd_was_running=""
  pgrep -x sshd >/dev/null 2>&1 && sshd_was_running=1
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  cleanup() { [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d; return 0; }
  trap cleanup EXIT
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${need_apt[@]}" >/dev/null
  if [ -z "$sshd_was_running" ]; then
    # A system with systemd may still have started it (socket activation): undo that.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
    fi
    [ -f /run/sshd.pid ] && kill "$(cat /run/sshd.pid)" 2>/dev/null || true
  fi
fi
[ -x /usr/sbin/sshd ] || { echo "fleet-setup.sh: /usr/sbin/sshd missing" >&2; exit 1; }

# ansible-core 2.17+ runs its controller on Python >= 3.10, the project is 3.11.
if ! python3 -c 'import ansible.release' >/dev/null 2>&1; then
  echo "fleet-setup.sh: pip install ansible-core"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
    'ansible-core>=2.17,<2.22'
fi

echo "fleet-setup.sh: ready ($(/usr/sbin/sshd -V 2>&1 | head -n 1);" \
  "ansible-core $(python3 -c 'import ansible.release as r; print(r.__version__)'))"
