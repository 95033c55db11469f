#!/usr/bin/env bash
# Install what the VM test tier (pytest -m vm) needs on a fresh Debian 12 machine (run as root):
#   qemu (software emulation), Debian's 6.1 kernel (installed) and 6.12 kernel (extracted into a
#   cache dir, not installed), LVM tools, ZFS built by DKMS for the 6.1 kernel, and virtme-ng in a
#   venv. Idempotent: a second run only checks (well under a second).
# The VM tier finds everything under $QUIESCE_VM_DIR (default /opt/quiesce-vm):
#   venv/bin/vng               virtme-ng
#   kernel-6.12/boot/vmlinuz-* the extracted 6.12 kernel, modules in kernel-6.12/lib/modules/
# The steps run one after the other (apt never races another job of this script); each says
# what it does, and a failure names the step.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
SETUP_NAME=vm-setup.sh
. scripts/setup-lib.sh

VM_DIR=${QUIESCE_VM_DIR:-/opt/quiesce-vm}
. /etc/os-release
SUITE=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}

# kmod: depmod/modinfo; python3-venv: the virtme-ng venv; file, busybox-static: virtme-ng;
# qemu-guest-agent: the agent inside the VM tier's guests (the host's root is their root);
# qemu-utils: qemu-img and qemu-io (the qemu provider's qcow2 backing chains and their tests)
pkgs=(kmod python3 python3-venv ca-certificates qemu-system-x86 busybox-static file
  linux-image-amd64 linux-headers-amd64 lvm2 thin-provisioning-tools zfs-dkms zfsutils-linux
  qemu-guest-agent qemu-utils)
have_612() { compgen -G "$VM_DIR/kernel-6.12/boot/vmlinuz-6.12.*" >/dev/null; }
have_vng() { [ -x "$VM_DIR/venv/bin/vng" ]; }

# The Debian mirror this machine already uses for $SUITE (deb822 or one-line sources).
debian_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    uri=$(awk -v s="$SUITE" '
      /^[[:space:]]*$/ { if (ok && u != "") { print u; exit } ok = 0; u = ""; next }
      /^URIs:/ { u = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) ok = 1 }
      END { if (ok && u != "") print u }' "$f" | head -n 1)
    [ -z "$uri" ] || { echo "$uri"; return; }
  done
  uri=$(awk -v s="$SUITE" '$1 == "deb" && $3 == s { print $2; exit }' \
    /etc/apt/sources.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

# 1. Debian's contrib component (zfs-dkms lives there), as a separate sources file, from the
#    mirror the machine already uses.
step "contrib component for zfs-dkms"
contrib=/etc/apt/sources.list.d/quiesce-contrib.sources
if [ ! -e "$contrib" ]; then
  mirror=$(debian_mirror)
  setup_log "adding $contrib ($mirror $SUITE contrib)"
  cat >"$contrib" <<EOF
Types: deb
URIs: $mirror
Suites: $SUITE $SUITE-updates
Components: contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  unset QUIESCE_APT_UPDATED # the new component needs fresh package lists
fi
if [ -n "$(apt_missing "${pkgs[@]}")" ] || ! have_612 ||
  ! compgen -G "/var/lib/apt/lists/*_contrib_binary-*_Packages*" >/dev/null; then
  [ "${QUIESCE_APT_UPDATED:-}" = 1 ] || apt_update
fi

# 2. apt packages. INITRD=No: the kernel is only booted by virtme-ng, which builds its own
#    initramfs, so the kernel's postinst skips update-initramfs. zfs-dkms builds the module for
#    the 6.1 kernel in its postinst (the long part: minutes).
step "apt packages: qemu, 6.1 kernel and headers, lvm2, zfs-dkms (builds ZFS: minutes)"
INITRD=No apt_install "${pkgs[@]}"

# 3. The ZFS module must exist for the installed 6.1 kernel (DKMS builds only for kernels
#    whose headers are installed, so check rather than trust the postinst).
step "ZFS module for the 6.1 kernel"
for kdir in /lib/modules/6.1.*; do
  [ -d "$kdir" ] || continue
  kver=${kdir##*/}
  if ! find "/lib/modules/$kver" -name 'zfs.ko*' | grep -q .; then
    setup_log "dkms autoinstall for $kver"
    dkms autoinstall -k "$kver"
  fi
done

# 4. Debian's 6.12 kernel, extracted (not installed: the host keeps its own kernel).
mkdir -p "$VM_DIR"
if ! have_612; then
  step "6.12 kernel into $VM_DIR/kernel-6.12"
  pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$' |
    awk '{print $1}' | sort -V | tail -n 1)
  [ -n "$pkg" ] || setup_die "no linux-image-6.12.*-amd64-unsigned package in the package lists"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  chown _apt "$tmp" 2>/dev/null || true # apt-get download drops root to _apt
  setup_log "apt-get download $pkg"
  (cd "$tmp" && "${APT[@]}" download -qq "$pkg")
  rm -rf "$VM_DIR/kernel-6.12.new"
  mkdir -p "$VM_DIR/kernel-6.12.new"
  dpkg-deb -x "$tmp"/*.deb "$VM_DIR/kernel-6.12.new"
  depmod -b "$VM_DIR/kernel-6.12.new" "$(ls "$VM_DIR/kernel-6.12.new/lib/modules")"
  rm -rf "$tmp" "$VM_DIR/kernel-6.12"
  trap - EXIT
  mv "$VM_DIR/kernel-6.12.new" "$VM_DIR/kernel-6.12"
fi

# 5. virtme-ng in its own venv on Debian's python3 (the VM helper puts its bin on PATH).
if ! have_vng; then
  step "virtme-ng into $VM_DIR/venv (pip)"
  rm -rf "$VM_DIR/venv"
  /usr/bin/python3 -m venv "$VM_DIR/venv"
  "$VM_DIR/venv/bin/pip" install -q --disable-pip-version-check virtme-ng
fi

step "check"
k61=$(ls /lib/modules | grep '^6\.1\.' | sort -V | tail -n 1) ||
  setup_die "no 6.1 kernel under /lib/modules"
have_612 || setup_die "no 6.12 kernel under $VM_DIR/kernel-6.12"
have_vng || setup_die "no $VM_DIR/venv/bin/vng"
setup_log "ready: $(ls /boot/vmlinuz-6.1.* | sort -V | tail -n 1)," \
  "$(ls "$VM_DIR"/kernel-6.12/boot/vmlinuz-*), zfs $(modinfo -k "$k61" -F version zfs)," \
  "$("$VM_DIR/venv/bin/vng" --version 2>/dev/null)"
