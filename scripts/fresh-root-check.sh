#!/usr/bin/env bash
# Does the README's promise hold on a fresh Debian 12 machine? Run by hand, as root (not in CI).
#
#   bash scripts/fresh-root-check.sh [--tests all|host|none|demo|package] [--dist DIR] [--keep] [--base-cache FILE]
#
# 1. debootstraps a fresh Debian 12 root (the default variant: what a minimal install has) from
#    the Debian mirror this machine's apt already uses, in /var/tmp/quiesce-fresh-root.XXXXXX/root;
# 2. copies the committed HEAD of this repo in (git archive with the modes a clone gets under
#    umask 022: the hook trust checks refuse group-writable files; no uncommitted files);
# 3. in a private mount namespace, bind-mounts /dev (loop devices appear there on demand) and
#    mounts proc, sysfs, devpts and tmpfs /run, /dev/shm; a policy-rc.d (exit 101) keeps apt
#    from starting services (postgresql, mariadb) in the root;
# 4. chroots and runs the README's two commands exactly as written there, each split at `&&`
#    into its install part and its run part, timed: install + demo, then install --test +
#    pytest (--tests host: PYTEST_ADDOPTS='-m "not vm"'; --tests none: the install only;
#    --tests demo: the first command only, a quick check in about three minutes);
#    --tests package: instead of the README's commands, the packages a user installs: builds
#    the wheel, the sdist and the .deb on this machine (scripts/build-deb.sh; --dist DIR: take
#    them from DIR instead), then in the root `apt-get install ./quiesce_*.deb` and
#    `quiesce demo --simple`, then a venv of Debian's python3 with `pip install` of the wheel
#    and its `quiesce demo --simple`, each timed;
# 5. always tears down, also on failure or Ctrl-C: kills the processes whose root is the chroot
#    (only those: they are ours), thaws and unmounts what is mounted under it (thaw only for
#    loop devices backed by a file inside it), detaches its loop devices, then checks that no
#    mount and no loop device under it is left (losetup -a, /proc/self/mountinfo), and removes
#    the root (kept with --keep). Logs and the summary stay in the work dir.
#
# The root shares this machine's kernel: the test fixtures' loop devices and mounts are real.
# What the root takes from this machine besides the mirror: /etc/resolv.conf, and the network's
# trust settings where present (CA certificates in /usr/local/share/ca-certificates, apt's
# Acquire::*::Proxy and Check-Valid-Until, PIP_CERT) - nothing that installs quiesce's tools.
# Chroot artifact, handled: a process that the tests start in a mount namespace of its own
# (`unshare -m`, the fleet tier's sshd) shows /proc/PID/exe as the host's path of the chroot
# (/var/tmp/.../root/usr/sbin/sshd); the fleet ground therefore compares sshd by inode.
# --base-cache FILE: reuse a tarball of a freshly debootstrapped root (made on the first run
# with that FILE), to save the debootstrap minutes when iterating.
set -Eeuo pipefail

usage() { sed -n '4p' "$0" | sed 's/^# *//' >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "fresh-root-check.sh: run as root" >&2; exit 1; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
SELF="$REPO/scripts/fresh-root-check.sh"
SUITE=bookworm

# mountpoints under $1 in /proc/self/mountinfo, deepest (latest) first
mounts_under() {
  awk -v r="$1" '{ m = $5; gsub(/\\040/, " ", m); if (m == r || index(m, r "/") == 1) print m }' \
    /proc/self/mountinfo | tac
}
# loop devices whose backing file is under $1
loops_under() {
  losetup -n -l -O NAME,BACK-FILE 2>/dev/null |
    awk -v r="$1/" '{ d = $1; $1 = ""; sub(/^ /, ""); if (index($0, r) == 1) print d }'
}
# processes whose root directory is $1 (started in the chroot: ours)
procs_in() {
  local p r
  for p in /proc/[0-9]*; do
    r=$(readlink "$p/root" 2>/dev/null) || continue
    [ "$r" = "$1" ] && echo "${p#/proc/}"
  done
  return 0
}
kill_procs_in() {
  local pids
  pids=$(procs_in "$1")
  [ -n "$pids" ] || return 0
  echo "teardown: stopping $(echo "$pids" | wc -w) process(es) left in the root: $(echo $pids)"
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 50); do
    sleep 0.2
    [ -n "$(procs_in "$1")" ] || return 0
  done
  pids=$(procs_in "$1")
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  sleep 0.5
}
# thaw a mount only if it is a loop device whose image lies under the root (ours)
thaw_if_ours() {
  local mnt=$1 root=$2 majmin back
  majmin=$(awk -v m="$mnt" '$5 == m { print $3 }' /proc/self/mountinfo | tail -n 1)
  case "$majmin" in 7:*) ;; *) return 0 ;; esac
  back=$(cat "/sys/dev/block/$majmin/loop/backing_file" 2>/dev/null) || return 0
  case "$back" in "$root"/*) timeout 10 fsfreeze -u "$mnt" 2>/dev/null || true ;; esac
}
unmount_under() {
  local root=$1 m pass
  for pass in 1 2 3; do
    [ -n "$(mounts_under "$root")" ] || return 0
    while read -r m; do
      [ -n "$m" ] || continue
      thaw_if_ours "$m" "$root"
      umount "$m" 2>/dev/null || { [ "$pass" -lt 3 ] || umount -l "$m" 2>/dev/null; } || true
    done < <(mounts_under "$root")
  done
}
detach_loops_under() {
  local d
  for d in $(loops_under "$1"); do
    echo "teardown: detaching $d ($(losetup -n -O BACK-FILE "$d" 2>/dev/null))"
    losetup -d "$d" 2>/dev/null || true
  done
}

# ---------------------------------------------------------------------------------------------
# inner: runs in the private mount namespace
if [ "${1:-}" = --inner ]; then
  WORK=$2 TESTS=$3 BASE_CACHE=$4 MIRROR=$5 SECURITY=$6
  ROOT=$WORK/root
  TIMES=$WORK/timings
  t_start=$SECONDS
  current="setup"
  inner_teardown() {
    local rc=$?
    set +e
    trap - ERR
    kill_procs_in "$ROOT"
    unmount_under "$ROOT"
    detach_loops_under "$ROOT"
    exit "$rc"
  }
  trap inner_teardown EXIT
  trap 'echo "fresh-root-check.sh: FAILED during $current: \`$BASH_COMMAND\` exited $?" >&2' ERR
  timed() { # timed NAME CMD...: run, record "NAME seconds rc", return rc
    local name=$1 t0=$SECONDS rc=0
    shift
    current=$name
    echo "=== $name"
    "$@" || rc=$?
    echo "$name $((SECONDS - t0)) $rc" >>"$TIMES"
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    return "$rc"
  }

  if [ -n "$BASE_CACHE" ] && [ -s "$BASE_CACHE" ]; then
    timed "unpack base root ($BASE_CACHE)" tar -x -C "$ROOT" -f "$BASE_CACHE"
  else
    do_debootstrap() {
      debootstrap --components=main "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 30 "$WORK/debootstrap.log" >&2; return 1; }
    }
    timed "debootstrap $SUITE from $MIRROR" do_debootstrap
    if [ -n "$BASE_CACHE" ]; then
      timed "save base root ($BASE_CACHE)" tar -c -C "$ROOT" -f "$BASE_CACHE.tmp" . &&
        mv "$BASE_CACHE.tmp" "$BASE_CACHE"
    fi
  fi
  [ -z "$(mounts_under "$ROOT")" ] || { echo "debootstrap left mounts under $ROOT" >&2; exit 1; }

  current="configuring the root"
  # the apt sources a Debian 12 install has: main, updates, security
  cat >"$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -f "$ROOT/etc/apt/sources.list"
  printf '#!/bin/sh\n# fresh-root-check.sh: no service starts in this chroot\nexit 101\n' \
    >"$ROOT/usr/sbin/policy-rc.d"
  chmod 755 "$ROOT/usr/sbin/policy-rc.d"
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
  grep -q localhost "$ROOT/etc/hosts" 2>/dev/null ||
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
  echo quiesce-fresh-root >"$ROOT/etc/hostname"
  # this network's trust settings (not tools): local CAs, apt proxy / Valid-Until
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$ROOT/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
  fi
  apt-config dump | grep -E '^Acquire::(https?::Proxy|Check-Valid-Until|Check-Date) ' \
    >"$ROOT/etc/apt/apt.conf.d/00fresh-root-check-network" || true

  current="mounting"
  # the root is a mount of its own, as / is on a machine (else the chroot's mountinfo has no
  # entry for / or /tmp: the host's / lies outside the chroot and is not shown)
  mount --bind "$ROOT" "$ROOT"
  mount -t proc proc "$ROOT/proc"
  mount -t sysfs sysfs "$ROOT/sys"
  mount --bind /dev "$ROOT/dev"
  mount --bind /dev/pts "$ROOT/dev/pts"
  mount -t tmpfs -o mode=1777,size=2g tmpfs "$ROOT/dev/shm"
  mount -t tmpfs -o mode=755,size=1g tmpfs "$ROOT/run"
  mkdir -p "$ROOT/run/lock"

  current="copying the repo"
  mkdir -p "$ROOT/root/quiesce"
  tar -x -C "$ROOT/root/quiesce" -f "$WORK/repo.tar"

  # the README's first code block: the two commands, comments stripped
  mapfile -t CMDS < <(awk '/^```/ { if (inblock) exit; if ($0 ~ /^```sh/) { inblock = 1; next } }
    inblock' "$ROOT/root/quiesce/README.md" | sed 's/[[:space:]]*#.*$//' | grep .)
  [ ${#CMDS[@]} -ge 2 ] || { echo "README: no two commands in its first sh block" >&2; exit 1; }
  printf 'README command: %s\n' "${CMDS[@]}"

  env_in=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
    LANG=C.UTF-8 TERM=dumb CI=true ${PIP_CERT:+PIP_CERT=$PIP_CERT})
  in_root() { chroot "$ROOT" "${env_in[@]}" "$@" bash -c "cd /root/quiesce && $CMD_PART" </dev/null; }
  run_cmd() { # run_cmd LABEL COMMAND [env...]: its install part, then its run part
    local label=$1 cmd=$2
    shift 2
    local install=${cmd%% && *} run=${cmd#* && }
    CMD_PART=$install timed "$label: $install" in_root "$@" || return 1
    [ "$run" != "$cmd" ] || return 0
    [ "$TESTS" != none ] || [ "$label" = README-1 ] || return 0
    CMD_PART=$run timed "$label: $run" in_root "$@"
  }
  rc=0
  if [ "$TESTS" = package ]; then
    cp "$WORK"/dist/* "$ROOT/root/"
    deb=$(cd "$ROOT/root" && ls quiesce_*.deb) whl=$(cd "$ROOT/root" && ls quiesce-*.whl)
    pkg() { local label=$1; shift; CMD_PART="$*" timed "$label" in_root; }
    pkg "deb: apt-get install ./$deb" "cd /root && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ./$deb" || rc=1
    pkg "deb: quiesce demo --simple" "cd /tmp && quiesce --version && quiesce demo --simple" || rc=1
    pkg "deb: apt-get remove quiesce" "DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq quiesce && test ! -e /usr/lib/quiesce/bin/quiesce" || rc=1
    pkg "wheel: python3 -m venv + pip install $whl" "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && python3 -m venv /opt/quiesce && /opt/quiesce/bin/pip install -q /root/$whl" || rc=1
    pkg "wheel: quiesce demo --simple" "cd /tmp && /opt/quiesce/bin/quiesce demo --simple" || rc=1
    current="teardown"
    echo "inner total $((SECONDS - t_start)) $rc" >>"$TIMES"
    exit "$rc"
  fi
  run_cmd README-1 "${CMDS[0]}" || rc=1
  if [ "$TESTS" = demo ]; then
    :
  elif [ "$TESTS" = host ]; then
    run_cmd README-2 "${CMDS[1]}" 'PYTEST_ADDOPTS=-m "not vm"' || rc=1
  else
    run_cmd README-2 "${CMDS[1]}" || rc=1
  fi
  current="teardown"
  echo "inner total $((SECONDS - t_start)) $rc" >>"$TIMES"
  exit "$rc"
fi

# ---------------------------------------------------------------------------------------------
# outer: this machine's mount namespace
TESTS=all KEEP=0 BASE_CACHE="" DIST=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) TESTS=${2:?}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --base-cache) BASE_CACHE=$(realpath -m "${2:?}"); shift 2 ;;
    --dist) DIST=$(realpath -m "${2:?}"); shift 2 ;;
    *) usage ;;
  esac
done
case "$TESTS" in all | host | none | demo | package) ;; *) usage ;; esac
t0=$SECONDS

# the Debian mirror this machine's apt uses for $SUITE and $SUITE-security
mirror_for() {
  local suite=$1 f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    uri=$(awk -v s="$suite" '
      /^[[:space:]]*$/ { if (ok && u != "") { print u; exit } ok = 0; u = ""; next }
      /^URIs:/ { u = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) ok = 1 }
      END { if (ok && u != "") print u }' "$f" | head -n 1)
    [ -z "$uri" ] || { echo "$uri"; return; }
  done
  awk -v s="$suite" '$1 == "deb" && $3 == s { print $2; exit }' /etc/apt/sources.list 2>/dev/null
}
MIRROR=$(mirror_for "$SUITE")
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=$(mirror_for "$SUITE-security")
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}

for tool in debootstrap unshare chroot losetup git; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || {
    echo "fresh-root-check.sh: apt-get install debootstrap (for $tool)"
    apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends debootstrap >/dev/null
    break
  }
done

WORK=$(mktemp -d /var/tmp/quiesce-fresh-root.XXXXXX)
ROOT=$WORK/root
mkdir "$ROOT"
LOG=$WORK/run.log
git -C "$REPO" -c tar.umask=0022 archive --format=tar -o "$WORK/repo.tar" HEAD
commit=$(git -C "$REPO" rev-parse --short HEAD)
dirty=""
[ -z "$(git -C "$REPO" status --porcelain --untracked-files=no)" ] ||
  dirty=" (uncommitted changes in $REPO are NOT tested)"
echo "fresh-root-check.sh: commit $commit$dirty; tests=$TESTS; work dir $WORK"
if [ "$TESTS" = package ]; then
  mkdir "$WORK/dist"
  if [ -n "$DIST" ]; then
    cp "$DIST"/quiesce-*.whl "$DIST"/quiesce-*.tar.gz "$DIST"/quiesce_*.deb "$WORK/dist/"
  else
    t_build=$SECONDS
    # from the committed tree, like the rest of the check
    mkdir "$WORK/src" && tar -x -C "$WORK/src" -f "$WORK/repo.tar"
    bash "$WORK/src/scripts/build-deb.sh" "$WORK/dist"
    echo "build (wheel, sdist, deb) $((SECONDS - t_build)) 0" >"$WORK/timings"
  fi
fi

outer_teardown() {
  local rc=$? leftover_m leftover_l
  set +e
  # the namespace is gone with its last process; anything left is found from here
  kill_procs_in "$ROOT"
  unmount_under "$ROOT"
  detach_loops_under "$ROOT"
  leftover_m=$(mounts_under "$ROOT")
  leftover_l=$(loops_under "$ROOT")
  echo
  echo "================ fresh-root-check.sh summary (commit $commit$dirty)"
  [ -s "$WORK/timings" ] && awk '{ rc = $NF; s = $(NF - 1); $NF = ""; $(NF - 1) = "";
      printf "  %6ds  %-7s %s\n", s, (rc == 0 ? "ok" : "FAILED"), $0 }' "$WORK/timings"
  grep -E '^(=+ .*(passed|failed|error).* in [0-9.]+s|FAILED |ERROR |SKIPPED )' "$LOG" 2>/dev/null |
    sed 's/^/  /' | tail -n 60
  echo "  installed:"
  grep -E '^[a-z-]+\.sh \[[0-9]+s\]: (apt-get install|pip install|adding|apt-get download)' \
    "$LOG" 2>/dev/null | sed 's/^/    /' | head -n 30
  if [ -n "$leftover_m$leftover_l" ]; then
    echo "  LEFT BEHIND: mounts: ${leftover_m:-none}; loop devices: ${leftover_l:-none}"
    rc=1
  else
    echo "  teardown: no mount and no loop device under $ROOT left (mountinfo, losetup -a)"
    if [ "$KEEP" = 0 ]; then
      rm -rf --one-file-system "$ROOT"
    else
      echo "  root kept: $ROOT"
    fi
  fi
  echo "  total $((SECONDS - t0))s; exit $rc; log $LOG"
  exit "$rc"
}
trap outer_teardown EXIT
trap 'exit 130' INT TERM

rc=0
unshare --mount --propagation private -- \
  bash "$SELF" --inner "$WORK" "$TESTS" "$BASE_CACHE" "$MIRROR" "$SECURITY" 2>&1 |
  tee "$LOG" || rc=$?
exit "$rc"
