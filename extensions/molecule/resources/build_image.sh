#!/usr/bin/env bash
# Build (once) the Debian 12 guest image the Molecule scenarios boot under QEMU, and cache it.
#
# Output, under $ONPREM_MESH_CACHE (default ~/.cache/onprem-mesh)/images/<key>/:
#   base.qcow2   ext4 root file system (no partition table, no boot loader: QEMU boots the kernel directly)
#   vmlinuz      the guest kernel (linux-image-amd64)
#   initrd.img   its initramfs
#   build.log    debootstrap output and the build time
# <key> is a hash of this script, so a change to the package list or the set-up builds a new image.
# Prints the image directory on its last line. Needs root (debootstrap), no loop devices (mkfs -d).
set -euo pipefail

SUITE=bookworm
SIZE=3G
# Everything the roles use inside the guests: the guests reach nothing but the host's loopback.
PACKAGES=(
  systemd systemd-sysv udev dbus kmod procps iproute2 util-linux e2fsprogs
  linux-image-amd64 initramfs-tools
  openssh-server python3 python3-apt
  xfsprogs parted gdisk fio systemd-timesyncd
)

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${ONPREM_MESH_CACHE:-$HOME/.cache/onprem-mesh}
key=$(sha256sum "$script_dir/build_image.sh" | cut -c1-16)
out=$cache/images/$key
if [ -f "$out/base.qcow2" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
  echo "cached image: $out" >&2
  echo "$out"
  exit 0
fi

# The mirror the host's apt already uses (deb822 sources or a one-line sources.list).
mirror=${ONPREM_MESH_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -m1 -E '/debian/?$' || true)
fi
if [ -z "$mirror" ]; then
  mirror=$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '{print $2}' | grep -m1 -E '/debian/?$' || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

mkdir -p "$cache/images"
exec 9>"$cache/images/.build.lock"
flock -w 3600 9
if [ -f "$out/base.qcow2" ]; then echo "cached image: $out" >&2; echo "$out"; exit 0; fi   # built by a concurrent run

start=$(date +%s)
work=$(mktemp -d "$cache/images/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
log=$work/build.log
echo "building guest image $key from $mirror (log: $log)" >&2
include=$(IFS=,; echo "${PACKAGES[*]}")
debootstrap --variant=minbase --include="$include" "$SUITE" "$root" "$mirror" >"$log" 2>&1 \
  || { tail -40 "$log" >&2; exit 1; }

# Guest configuration: root file system, static address on QEMU's user network, SSH key from the kernel
# command line (one key per run, no image rebuild), no timers or waits that slow a TCG boot.
cat >"$root/etc/fstab" <<'EOF'
/dev/vda / ext4 rw,errors=remount-ro 0 1
EOF
echo "onprem-guest" >"$root/etc/hostname"
printf '127.0.0.1 localhost\n' >"$root/etc/hosts"
mkdir -p "$root/etc/systemd/network"
cat >"$root/etc/systemd/network/10-user.network" <<'EOF'
[Match]
MACAddress=52:54:00:12:34:56
[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
LinkLocalAddressing=no
IPv6AcceptRA=no
EOF
cat >"$root/usr/local/sbin/onprem-ssh-key" <<'EOF'
#!/bin/sh
# Install the SSH public key passed as onprem.sshkey=<base64> on the kernel command line.
for word in $(cat /proc/cmdline); do
  case "$word" in
    onprem.sshkey=*)
      install -d -m 0700 /root/.ssh
      echo "${word#onprem.sshkey=}" | base64 -d >/root/.ssh/authorized_keys
      chmod 0600 /root/.ssh/authorized_keys ;;
  esac
done
EOF
chmod 0755 "$root/usr/local/sbin/onprem-ssh-key"
cat >"$root/etc/systemd/system/onprem-ssh-key.service" <<'EOF'
[Unit]
Description=Install the SSH key from the kernel command line
Before=ssh.service
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/onprem-ssh-key
[Install]
WantedBy=multi-user.target
EOF
# The guests' private network (guest.sh: a platform's `lan` address): onprem.lan=ADDRESS/PREFIX and
# onprem.lanmac=MAC on the kernel command line configure the second NIC before systemd-networkd starts.
cat >"$root/usr/local/sbin/onprem-lan" <<'EOF'
#!/bin/sh
lan="" mac=""
for word in $(cat /proc/cmdline); do
  case "$word" in
    onprem.lan=*) lan=${word#onprem.lan=} ;;
    onprem.lanmac=*) mac=${word#onprem.lanmac=} ;;
  esac
done
[ -n "$lan" ] && [ -n "$mac" ] || exit 0
mkdir -p /run/systemd/network
printf '[Match]\nMACAddress=%s\n[Network]\nAddress=%s\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' "$mac" "$lan" \
  >/run/systemd/network/05-lan.network
EOF
chmod 0755 "$root/usr/local/sbin/onprem-lan"
cat >"$root/etc/systemd/system/onprem-lan.service" <<'EOF'
[Unit]
Description=Configure the guests' private network from the kernel command line
DefaultDependencies=no
Before=systemd-networkd.service
After=local-fs.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/onprem-lan
[Install]
WantedBy=multi-user.target
EOF
cat >"$root/etc/ssh/sshd_config.d/onprem.conf" <<'EOF'
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
EOF
{
  chroot "$root" systemctl enable onprem-ssh-key.service onprem-lan.service systemd-networkd.service ssh.service
  chroot "$root" systemctl mask systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer fstrim.timer
  chroot "$root" systemctl set-default multi-user.target
} >>"$log" 2>&1
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*_Packages

mkdir -p "$work/out"
cp "$root"/boot/vmlinuz-* "$work/out/vmlinuz"
cp "$root"/boot/initrd.img-* "$work/out/initrd.img"
mkfs.ext4 -q -L onprem-root -d "$root" "$work/root.raw" "$SIZE" >>"$log" 2>&1
qemu-img convert -O qcow2 "$work/root.raw" "$work/out/base.qcow2"
echo "build seconds: $(( $(date +%s) - start ))" >>"$log"
cp "$log" "$work/out/build.log"
rm -rf "$out"
mv "$work/out" "$out"
echo "built guest image $key in $(( $(date +%s) - start )) s" >&2
echo "$out"
