#!/usr/bin/env bash
# Install what the fleet tests and `quiesce demo --fleet` need: Debian's sshd and
# ansible-core. Debian 12, as root. Idempotent: a second run only checks.
#
# The tests start their own sshd per simulated host (own config, keys, 127.0.0.N), so the
# system sshd is never needed: if it was not running before, it is not left running (and
# the install is kept from starting it at all when the machine has no policy-rc.d).
# ansible-core goes into the interpreter the tests use (python3 -m pip, see setup-lib.sh),
# so that `python3 -m ansible ...` and the ansible-* scripts beside it are the ones the
# tests run.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
SETUP_NAME=fleet-setup.sh
. scripts/setup-lib.sh

step "openssh-server, openssh-client"
if [ -n "$(apt_missing openssh-server openssh-client util-linux e2fsprogs xfsprogs procps)" ]; then
  sshd_was_running=""
  if command -v pgrep >/dev/null && pgrep -x sshd >/dev/null 2>&1; then sshd_was_running=1; fi
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt_install openssh-server openssh-client util-linux e2fsprogs xfsprogs procps
  if [ -n "$made_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  if [ -z "$sshd_was_running" ]; then
    # A system with systemd may still have started it (socket activation): undo that.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
    fi
    if [ -f /run/sshd.pid ]; then kill "$(cat /run/sshd.pid)" 2>/dev/null || true; fi
  fi
fi
[ -x /usr/sbin/sshd ] || setup_die "/usr/sbin/sshd missing after the install"

# ansible-core 2.17+ runs its controller on Python >= 3.10, the project is 3.11.
step "ansible-core (pip)"
need_python
python3 -c 'import ansible.release' >/dev/null 2>&1 || pip_install 'ansible-core>=2.17,<2.22'

step "check"
setup_log "ready ($(/usr/sbin/sshd -V 2>&1 | head -n 1);" \
  "ansible-core $(python3 -c 'import ansible.release as r; print(r.__version__)'))"
