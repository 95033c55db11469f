#!/usr/bin/env bash
# README command 2's tests on a busy machine: does any test depend on an idle machine?
# As root, from a checkout where `bash scripts/install.sh --test` has run.
#
#   bash scripts/test-under-load.sh [--beside] [--cpu N] [-- PYTEST_ARGS...]
#
# Runs `python3 -m pytest PYTEST_ARGS` (this checkout's src first on PYTHONPATH) while
# `stress-ng --cpu N` (default: nproc, every core busy) runs beside it. With --beside, also
# next to a second quiesce user on the same kernel: a loop of `quiesce exec` on an ext4 loop
# filesystem of its own (made here in a temporary directory), which takes the real
# /run/quiesce and the machine-wide /sys/kernel/rcu_expedited as any other run would.
# stress-ng is installed from apt if missing. Whatever happens (failure, Ctrl-C, SIGTERM),
# it stops what it started (by pid), thaws, unmounts and detaches its own filesystem and
# removes its directory. Prints the pytest summary, the time taken, the load average and
# (--beside) how many `quiesce exec` runs the loop made and how many failed; exits with
# pytest's exit code.
set -Euo pipefail

usage() { sed -n '5p' "$0" | sed 's/^# *//' >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "test-under-load.sh: run as root" >&2; exit 1; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
CPU=$(nproc)
BESIDE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --beside) BESIDE=1 ;;
    --cpu) [ $# -ge 2 ] || usage; CPU=$2; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "test-under-load.sh: unknown option $1 (pytest arguments go after --)" >&2; usage ;;
  esac
  shift
done
case "$CPU" in ''|*[!0-9]*) echo "test-under-load.sh: --cpu takes a number" >&2; exit 2 ;; esac

if ! command -v stress-ng >/dev/null 2>&1; then
  (SETUP_NAME=test-under-load.sh; source "$REPO/scripts/setup-lib.sh"; apt_install stress-ng) ||
    { echo "test-under-load.sh: could not install stress-ng" >&2; exit 1; }
fi

WORK=$(mktemp -d /var/tmp/quiesce-load.XXXXXX)
STRESS_PID="" LOOP_PID="" DEV="" MNT="$WORK/mnt"
log() { echo "test-under-load.sh: $*" >&2; }

cleanup() {
  trap - EXIT INT TERM HUP
  if [ -n "$LOOP_PID" ]; then
    touch "$WORK/stop"  # the loop ends after its current run: nothing is left frozen
    for _ in $(seq 600); do kill -0 "$LOOP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -TERM "$LOOP_PID" 2>/dev/null && wait "$LOOP_PID" 2>/dev/null
  fi
  if [ -n "$STRESS_PID" ]; then
    kill -TERM "$STRESS_PID" 2>/dev/null  # stress-ng stops its own workers
    wait "$STRESS_PID" 2>/dev/null
  fi
  if mountpoint -q "$MNT" 2>/dev/null; then
    fsfreeze -u "$MNT" 2>/dev/null  # ours; "not frozen" is the usual answer
    for _ in $(seq 50); do umount "$MNT" 2>/dev/null && break; sleep 0.1; done
    mountpoint -q "$MNT" && umount -l "$MNT"
  fi
  [ -n "$DEV" ] && losetup -d "$DEV" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
PYTEST_PID="" STOP=""
stop_pytest() {  # Ctrl-C, SIGTERM, SIGHUP: pytest stops as on Ctrl-C (its teardown runs)
  STOP=${STOP:-$1}
  [ -n "$PYTEST_PID" ] && kill -INT "$PYTEST_PID" 2>/dev/null
}

cd "$REPO" || exit 1
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "$BESIDE" = 1 ]; then
  truncate -s 64M "$WORK/beside.img" && mkfs.ext4 -q -F "$WORK/beside.img" &&
    DEV=$(losetup -f --show "$WORK/beside.img") && mkdir "$MNT" && mount "$DEV" "$MNT" ||
    { log "could not make the beside loop's filesystem"; exit 1; }
  (
    # Not a test: no PYTEST_CURRENT_TEST, the machine's own run dir and knob.
    unset PYTEST_CURRENT_TEST QUIESCE_RUN_DIR QUIESCE_TEST_RCU_DIR QUIESCE_FAULT
    n=0 failed=0
    while [ ! -e "$WORK/stop" ]; do
      n=$((n + 1))
      if ! python3 -m quiesce exec --timeout 30 "$MNT" -- \
          sh -c 'echo x >/dev/null' >>"$WORK/beside.log" 2>&1; then
        failed=$((failed + 1))
        echo "run $n failed" >>"$WORK/beside.log"
      fi
      echo "$n $failed" >"$WORK/beside.count"
    done
  ) &
  LOOP_PID=$!
  log "beside: a loop of \`quiesce exec $MNT\` (pid $LOOP_PID)"
fi

stress-ng --cpu "$CPU" --quiet &
STRESS_PID=$!
log "load: stress-ng --cpu $CPU (pid $STRESS_PID); python3 -m pytest $*"
T0=$SECONDS
# In its own session (a Ctrl-C reaches it once, from stop_pytest) with SIGINT at its
# default (a background job's is ignored): the script's traps run while pytest runs.
trap 'stop_pytest 130' INT
trap 'stop_pytest 143' TERM HUP
setsid env --default-signal=INT python3 -m pytest "$@" &
PYTEST_PID=$!
while kill -0 "$PYTEST_PID" 2>/dev/null; do
  wait "$PYTEST_PID"  # returns > 128 when a trap interrupted it: then wait again
done
wait "$PYTEST_PID"  # pytest's own exit code (bash keeps it for a reaped job)
RC=$?
trap 'exit 130' INT
trap 'exit 143' TERM HUP
[ -z "$STOP" ] || { log "stopped by a signal; pytest exited $RC"; exit "$STOP"; }
log "pytest exited $RC after $((SECONDS - T0)) s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$BESIDE" = 1 ]; then
  read -r runs bad <"$WORK/beside.count" 2>/dev/null || runs=0 bad=0
  log "beside: $runs quiesce exec runs, $bad failed"
  [ "${bad:-0}" = 0 ] || tail -n 20 "$WORK/beside.log" >&2
fi
exit "$RC"
