#!/usr/bin/env bash
# Install the database servers that the writer tests (tests/test_writers_*.py) run.
#
# Debian 12, as root. Idempotent: a second run only checks. It installs Debian's
# `postgresql` and `mariadb-server` packages and the Python client libraries, and makes
# sure their binaries are on PATH. It does NOT start the system services: every test
# starts its own throwaway server on a loop filesystem (initdb/pg_ctl as the postgres
# user; mariadb-install-db + mariadbd with --datadir/--socket in temp dirs).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in postgresql mariadb-server mariadb-client; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "db-setup.sh: apt-get install ${need_apt[*]}"
  # Keep the packages from starting their system services during the install (the
  # tests never use them). Only if the machine has no policy of its own.
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  cleanup() { [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d; return 0; }
  trap cleanup EXIT
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${need_apt[@]}" >/dev/null
fi

# Debian puts the PostgreSQL server binaries in a versioned directory that is not on
# PATH; link the newest one's into /usr/local/bin (the tests also look there).
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$pg_bin" ]; then
  echo "db-setup.sh: no PostgreSQL server binaries under /usr/lib/postgresql" >&2
  exit 1
fi
for tool in initdb pg_ctl postgres; do
  [ "$(readlink -f "/usr/local/bin/$tool" 2>/dev/null)" = "$pg_bin/$tool" ] ||
    ln -sf "$pg_bin/$tool" "/usr/local/bin/$tool"
done

for tool in mariadbd mariadb-install-db mariadb; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || {
    echo "db-setup.sh: $tool missing after the install" >&2
    exit 1
  }
done

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  -e '.[test,writers]'

echo "db-setup.sh: ready ($("$pg_bin/postgres" --version); $(/usr/sbin/mariadbd --version | cut -d' ' -f2-4))"
