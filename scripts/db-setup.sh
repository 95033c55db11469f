#!/usr/bin/env bash
# Install the database servers that the writer tests (tests/test_writers_*.py) run.
#
# Debian 12, as root. Idempotent: a second run only checks. It installs Debian's
# `postgresql` and `mariadb-server` packages and the Python client libraries, and makes
# sure their binaries are on PATH. It does NOT start the system services: every test
# starts its own throwaway server on a loop filesystem (initdb/pg_ctl as the postgres
# user; mariadb-install-db + mariadbd with --datadir/--socket in temp dirs).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
SETUP_NAME=db-setup.sh
. scripts/setup-lib.sh

step "postgresql, mariadb-server, mariadb-client"
if [ -n "$(apt_missing postgresql mariadb-server mariadb-client)" ]; then
  # Keep the packages from starting their system services during the install (the
  # tests never use them). Only if the machine has no policy of its own.
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt_install postgresql mariadb-server mariadb-client
  if [ -n "$made_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
fi

# Debian puts the PostgreSQL server binaries in a versioned directory that is not on
# PATH; link the newest one's into /usr/local/bin (the tests also look there).
step "PostgreSQL binaries on PATH"
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$pg_bin" ] || setup_die "no PostgreSQL server binaries under /usr/lib/postgresql"
for tool in initdb pg_ctl postgres; do
  [ "$(readlink -f "/usr/local/bin/$tool" 2>/dev/null)" = "$pg_bin/$tool" ] ||
    ln -sf "$pg_bin/$tool" "/usr/local/bin/$tool"
done

for tool in mariadbd mariadb-install-db mariadb; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] ||
    setup_die "$tool missing after the install"
done

step "Python client libraries (pip)"
need_python
pip_install -e '.[test,writers]'

step "check"
setup_log "ready ($("$pg_bin/postgres" --version); $(/usr/sbin/mariadbd --version | cut -d' ' -f2-4))"
