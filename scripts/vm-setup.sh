#!/usr/bin/env bash
# Install what the VM test tier (pytest -m vm) needs on a fresh Debian 12 machine (run as root):
#   qemu (software emulation), Debian's 6.1 kernel (installed) and 6.12 kernel (extracted into a
#   cache dir, not installed), LVM tools, ZFS built by DKMS for the 6.1 kernel, and virtme-ng in a
#   venv. Idempotent: a second run only checks (well under a second).
# The VM tier finds everything under $QUIESCE_VM_DIR (default /opt/quiesce-vm):
#   venv/bin/vng               virtme-ng
#   kernel-6.12/boot/vmlinuz-* the extracted 6.12 kernel, modules in kernel-6.12/lib/modules/
set -euo pipefail

VM_DIR=${QUIESCE_VM_DIR:-/opt/quiesce-vm}
[ "$(id -u)" = 0 ] || { echo "vm-setup.sh: run as root" >&2; exit 1; }
. /etc/os-release
SUITE=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
export DEBIAN_FRONTEND=noninteractive
t0=$SECONDS
log() { echo "vm-setup.sh [$((SECONDS - t0))s]: $*"; }

pkgs=(qemu-system-x86 busybox-static file linux-image-amd64 linux-headers-amd64 lvm2
  thin-provisioning-tools zfs-dkms zfsutils-linux)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
done
have_612() { ls "$VM_DIR"/kernel-6.12/boot/vmlinuz-6.12.* >/dev/null 2>&1; }

# 1. Debian's contrib component (zfs-dkms lives there), as a separate sources file; then fresh
#    package lists if anything has to come from apt.
contrib=/etc/apt/sources.list.d/quiesce-contrib.sources
if [ ! -e "$contrib" ]; then
  log "adding the contrib component ($contrib)"
  cat >"$contrib" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE $SUITE-updates
Components: contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
if [ ${#missing[@]} -gt 0 ] || ! have_612 || ! compgen -G "/var/lib/apt/lists/*_contrib_binary-*_Packages*" >/dev/null; then
  log "apt-get update"
  apt-get update -qq -o DPkg::Lock::Timeout=900
fi

# 2. In the background while apt works: Debian's 6.12 kernel, extracted (not installed: the
#    host keeps its own kernel), and virtme-ng in a venv (the VM helper puts its bin on PATH).
side() {
  if ! have_612; then
    local pkg tmp
    pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$' |
      awk '{print $1}' | sort -V | tail -1)
    [ -n "$pkg" ] || { echo "vm-setup.sh: no linux-image-6.12 package found" >&2; return 1; }
    log "extracting $pkg into $VM_DIR/kernel-6.12"
    tmp=$(mktemp -d)
    chown _apt "$tmp" 2>/dev/null || true # apt-get download drops root to _apt
    (cd "$tmp" && apt-get download -qq "$pkg")
    rm -rf "$VM_DIR/kernel-6.12.new"
    mkdir -p "$VM_DIR/kernel-6.12.new"
    dpkg-deb -x "$tmp"/*.deb "$VM_DIR/kernel-6.12.new"
    depmod -b "$VM_DIR/kernel-6.12.new" "$(ls "$VM_DIR/kernel-6.12.new/lib/modules")"
    rm -rf "$tmp" "$VM_DIR/kernel-6.12"
    mv "$VM_DIR/kernel-6.12.new" "$VM_DIR/kernel-6.12"
    log "6.12 kernel ready"
  fi
  if [ ! -x "$VM_DIR/venv/bin/vng" ]; then
    log "pip install virtme-ng into $VM_DIR/venv"
    rm -rf "$VM_DIR/venv"
    /usr/bin/python3 -m venv "$VM_DIR/venv"
    "$VM_DIR/venv/bin/pip" install -q --disable-pip-version-check virtme-ng
    log "virtme-ng ready"
  fi
}
# the venv needs ensurepip (Debian's python3-venv): install it first, it is small
if [ ! -x "$VM_DIR/venv/bin/vng" ] && ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then
  apt-get install -y -qq -o DPkg::Lock::Timeout=900 --no-install-recommends python3-venv >/dev/null
fi
mkdir -p "$VM_DIR"
side &
side_pid=$!

# 3. apt packages. INITRD=No: the kernel is only booted by virtme-ng, which builds its own
#    initramfs, so the kernel's postinst skips update-initramfs. zfs-dkms builds the module for
#    the 6.1 kernel in its postinst (the long part: minutes).
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  INITRD=No apt-get install -y -qq -o DPkg::Lock::Timeout=900 --no-install-recommends \
    "${missing[@]}" >/dev/null
  log "apt packages installed"
fi

# 4. The ZFS module must exist for the installed 6.1 kernel (DKMS builds only for kernels
#    whose headers are installed, so check rather than trust the postinst).
for kver in $(ls /lib/modules); do
  case "$kver" in 6.1.*) ;; *) continue ;; esac
  if ! find "/lib/modules/$kver" -name 'zfs.ko*' | grep -q .; then
    log "dkms autoinstall for $kver"
    dkms autoinstall -k "$kver"
  fi
done

wait "$side_pid" || { echo "vm-setup.sh: 6.12 kernel or virtme-ng setup failed" >&2; exit 1; }
log "ready: $(ls /boot/vmlinuz-6.1.* | tail -1), $(ls "$VM_DIR"/kernel-6.12/boot/vmlinuz-*)," \
  "zfs $(modinfo -k "$(ls /lib/modules | grep '^6\.1\.' | tail -1)" -F version zfs 2>/dev/null)," \
  "$("$VM_DIR/venv/bin/vng" --version 2>/dev/null)"
