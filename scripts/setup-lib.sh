# shellcheck shell=bash
# Sourced by the setup scripts (install.sh, backup-setup.sh, db-setup.sh, vm-setup.sh).
# Debian 12, as root. Gives them:
#   step "what"            names the step that runs next; a failure names it, the command
#                          and its exit code, and stops the script
#   apt_install PKG...     installs the missing ones (serialised: waits for apt's locks),
#                          apt-get update first, once per install.sh run
#   need_python            python3 >= 3.11 with pip (Debian's python3-pip if python3 is
#                          Debian's /usr/bin/python3, else ensurepip)
#   pip_install ARG...     pip install into the interpreter `python3` names (see below)
#
# Where quiesce goes: into the interpreter that `python3` names, so that the README's
# `python3 -m quiesce` and `python3 -m pytest` work as typed. On Debian's /usr/bin/python3
# (PEP 668, "externally managed") that takes PIP_BREAK_SYSTEM_PACKAGES=1: Debian's pip
# then installs into /usr/local/lib/python3.11/dist-packages and /usr/local/bin and never
# removes or changes a file of an apt package. On another python3 (pyenv, a venv) the
# variable changes nothing.
set -Eeuo pipefail
export DEBIAN_FRONTEND=noninteractive
SETUP_NAME=${SETUP_NAME:-$(basename "$0")}
SETUP_STEP="starting"
SETUP_T0=$SECONDS

setup_log() { echo "$SETUP_NAME [$((SECONDS - SETUP_T0))s]: $*"; }
setup_die() {
  echo "$SETUP_NAME: FAILED in step '$SETUP_STEP': $*" >&2
  exit 1
}
step() {
  SETUP_STEP=$*
  setup_log "$SETUP_STEP"
}
_setup_on_err() {
  local rc=$? line=$1 cmd=$2
  echo "$SETUP_NAME: FAILED in step '$SETUP_STEP' (line $line): \`$cmd\` exited $rc" >&2
  exit "$rc"
}
trap '_setup_on_err "$LINENO" "$BASH_COMMAND"' ERR

[ "$(id -u)" = 0 ] || setup_die "run as root"

# apt, one at a time: wait up to 15 minutes for another apt/dpkg to let go of its locks
APT=(apt-get -o DPkg::Lock::Timeout=900 -o Dpkg::Use-Pty=0)

apt_missing() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
      echo "$p"
  done
}

apt_update() {
  setup_log "apt-get update"
  "${APT[@]}" update -qq
  export QUIESCE_APT_UPDATED=1 # the scripts install.sh calls need not update again
}

# apt_install PKG...: install the ones not installed yet, quietly; on failure show the
# end of apt's output. Env INITRD etc. pass through.
apt_install() {
  local missing out rc=0
  mapfile -t missing < <(apt_missing "$@")
  [ ${#missing[@]} -gt 0 ] || return 0
  [ "${QUIESCE_APT_UPDATED:-}" = 1 ] || apt_update
  setup_log "apt-get install ${missing[*]}"
  out=$(mktemp)
  "${APT[@]}" install -y -q --no-install-recommends "${missing[@]}" >"$out" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    tail -n 60 "$out" >&2
    rm -f "$out"
    setup_die "apt-get install ${missing[*]} exited $rc (its output above)"
  fi
  rm -f "$out"
}

# need_cmd CMD PKG: apt-install PKG unless CMD is found (PATH, /sbin, /usr/sbin)
need_cmd() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] ||
    apt_install "$2"
}

need_python() {
  command -v python3 >/dev/null 2>&1 || apt_install python3
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    setup_die "quiesce needs Python >= 3.11; python3 is $(python3 -V 2>&1)"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    if [ "$(python3 -c 'import sys; print(sys.base_prefix)')" = /usr ]; then
      apt_install python3-pip ca-certificates # Debian's python3: its pip comes from apt
    else
      setup_log "python3 -m ensurepip"
      python3 -m ensurepip -q
    fi
  fi
}

pip_install() {
  setup_log "pip install $*"
  PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    python3 -m pip install -q "$@"
}
