#!/usr/bin/env bash
# Start or stop one QEMU guest for the Molecule scenarios (used by playbooks/create.yml and destroy.yml).
#
#   guest.sh start DIR NAME IMAGE_DIR PUBKEY MEMORY_MB CPUS SERIAL:SIZE [SERIAL:SIZE...]
#       Boots NAME from a qcow2 overlay of IMAGE_DIR/base.qcow2 (the cached base stays clean) with one
#       emulated NVMe controller per SERIAL:SIZE, SSH forwarded to a free loopback port, the kernel booted
#       directly, software emulation (TCG). Waits for SSH (bounded by ONPREM_MESH_BOOT_TIMEOUT, default
#       600 s) and prints {"port": P, "boot_seconds": S}. Console log: DIR/NAME/console.log.
#       With ONPREM_MESH_GUEST_MIRROR=MIRROR_DIR set, the guest also reaches http://10.0.2.100/ (and nothing else):
#       QEMU runs stdio_http.py MIRROR_DIR for each connection to it, the air-gapped site's artifact mirror.
#       With ONPREM_MESH_GUEST_LAN=ADDRESS/PREFIX, a second NIC joins the guests' private network (a QEMU socket
#       network on 127.0.0.1: the first such guest of DIR listens, the others connect) with that address: how
#       the guests reach each other (a node joining the control plane). With ONPREM_MESH_GUEST_FORWARDS="6443 ...",
#       each of those guest ports is forwarded from a free loopback port; the JSON then has "forwards":
#       {"6443": P, ...}. ONPREM_MESH_GUEST_TB_SIZE: the MiB of TCG's translated-code cache (default 256); when
#       it is full, QEMU throws all of it away and translates again (`info jit` on the guest's monitor,
#       DIR/NAME/monitor.sock, counts those flushes).
#   guest.sh reboot DIR NAME [reverse]
#       Powers the guest off from inside (sync, poweroff; killed after 120 s) and boots it again on the same
#       disks and port; with `reverse`, the NVMe controllers are attached in the opposite order, so the
#       guest's device names (nvme0n1, nvme1n1) swap while the serials stay. Prints the same JSON as start.
#   guest.sh stop DIR NAME
#       Stops the guest by its PID file (only if that PID is this guest's QEMU) and removes DIR/NAME.
set -euo pipefail

action=$1 dir=$2 name=$3
gdir=$dir/$name
pidfile=$gdir/qemu.pid

ours() {  # the PID in the PID file is alive and is this guest's QEMU
  [ -f "$pidfile" ] || return 1
  local pid; pid=$(cat "$pidfile")
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "-name $name " 
}

boot() {  # launch QEMU from DIR/NAME/params and DIR/NAME/disks, wait for SSH, print the JSON line
  local image pubkey memory cpus port start deadline
  read -r image pubkey memory cpus port <"$gdir/params"
  local disks=()
  while read -r i serial; do
    disks+=(-drive "file=$gdir/nvme$i.qcow2,if=none,id=nvme$i,format=qcow2,cache=unsafe"
            -device "nvme,serial=$serial,drive=nvme$i")
  done <"$gdir/disks"
  local net="user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:$port-:22"
  if [ -s "$gdir/mirror" ]; then
    net="$net,guestfwd=tcp:10.0.2.100:80-cmd:python3 $(dirname "$(readlink -f "$0")")/stdio_http.py $(cat "$gdir/mirror")"
  fi
  local forwards="" hostport guestport
  while read -r hostport guestport; do
    net="$net,hostfwd=tcp:127.0.0.1:$hostport-:$guestport"
    forwards="$forwards${forwards:+, }\"$guestport\": $hostport"
  done <"$gdir/forwards"
  local lan=() append=""
  if [ -s "$gdir/lan" ]; then
    local address mac mode
    read -r address mac mode <"$gdir/lan"
    lan=(-netdev "socket,id=lan0,$mode" -device "virtio-net-pci,netdev=lan0,mac=$mac")
    append=" onprem.lan=$address onprem.lanmac=$mac"
  fi
  start=$(date +%s.%N)
  qemu-system-x86_64 -name "$name" -machine q35 -accel "tcg,thread=multi,tb-size=$(cat "$gdir/tb_size")" -cpu max \
    -smp "$cpus" -m "$memory" -display none -monitor "unix:$gdir/monitor.sock,server=on,wait=off" \
    -serial "file:$gdir/console.log" \
    -daemonize -pidfile "$pidfile" \
    -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 quiet systemd.hostname=$name onprem.sshkey=$(base64 -w0 "$pubkey")$append" \
    -drive "file=$gdir/root.qcow2,if=virtio,format=qcow2,cache=unsafe" \
    "${disks[@]}" \
    -netdev "$net" -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56 "${lan[@]}" \
    -device virtio-rng-pci
  deadline=$((SECONDS + ${ONPREM_MESH_BOOT_TIMEOUT:-600}))
  until guest_ssh true 2>/dev/null; do
    if ! ours; then echo "guest $name: QEMU exited; console:" >&2; tail -30 "$gdir/console.log" >&2; exit 1; fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "guest $name: no SSH on port $port after ${ONPREM_MESH_BOOT_TIMEOUT:-600} s; console:" >&2
      tail -30 "$gdir/console.log" >&2
      exit 1
    fi
    sleep 2
  done
  awk -v port="$port" -v start="$start" -v now="$(date +%s.%N)" -v forwards="$forwards" \
    'BEGIN { printf "{\"port\": %d, \"boot_seconds\": %.1f, \"forwards\": {%s}}\n", port, now - start, forwards }'
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

guest_ssh() {
  local pubkey port
  read -r _ pubkey _ _ port <"$gdir/params"
  ssh -q -o BatchMode=yes -o ConnectTimeout=10 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o IdentitiesOnly=yes -i "${pubkey%.pub}" -p "$port" root@127.0.0.1 "$@"
}

case $action in
start)
  image=$4 pubkey=$5 memory=$6 cpus=$7
  shift 7
  if ours; then echo "guest $name is already running" >&2; exit 1; fi
  case ${ONPREM_MESH_GUEST_TB_SIZE:-256} in
    *[!0-9]*) echo "ONPREM_MESH_GUEST_TB_SIZE (platform key tb_size) is MiB as a whole number, e.g. 1024, not $ONPREM_MESH_GUEST_TB_SIZE" >&2
              exit 2 ;;
  esac
  rm -rf "$gdir"; mkdir -p "$gdir"
  qemu-img create -q -f qcow2 -b "$image/base.qcow2" -F qcow2 "$gdir/root.qcow2"
  : >"$gdir/disks"
  i=0
  for spec in "$@"; do
    qemu-img create -q -f qcow2 "$gdir/nvme$i.qcow2" "${spec#*:}"
    echo "$i ${spec%%:*}" >>"$gdir/disks"
    i=$((i + 1))
  done
  port=$(free_port)
  echo "$port" >"$gdir/port"
  : >"$gdir/forwards"
  for guestport in ${ONPREM_MESH_GUEST_FORWARDS:-}; do echo "$(free_port) $guestport" >>"$gdir/forwards"; done
  if [ -n "${ONPREM_MESH_GUEST_LAN:-}" ]; then
    # a MAC of the guest's own address on the private network (52:54:00 is QEMU's prefix)
    mac=$(echo "${ONPREM_MESH_GUEST_LAN%/*}" | awk -F. '{ printf "52:54:00:%02x:%02x:%02x", $2, $3, $4 }')
    if [ -s "$dir/lan.port" ]; then mode="connect=127.0.0.1:$(cat "$dir/lan.port")"
    else free_port >"$dir/lan.port"; mode="listen=127.0.0.1:$(cat "$dir/lan.port")"; fi
    echo "$ONPREM_MESH_GUEST_LAN $mac $mode" >"$gdir/lan"
  fi
  echo "$image $pubkey $memory $cpus $port" >"$gdir/params"
  echo "${ONPREM_MESH_GUEST_TB_SIZE:-256}" >"$gdir/tb_size"
  if [ -n "${ONPREM_MESH_GUEST_MIRROR:-}" ]; then
    case $ONPREM_MESH_GUEST_MIRROR in *[,\ ]*) echo "ONPREM_MESH_GUEST_MIRROR must not contain a comma or a space" >&2; exit 2 ;; esac
    mkdir -p "$ONPREM_MESH_GUEST_MIRROR"
    readlink -f "$ONPREM_MESH_GUEST_MIRROR" >"$gdir/mirror"
  fi
  boot
  ;;
reboot)
  ours || { echo "guest $name is not running" >&2; exit 1; }
  pid=$(cat "$pidfile")
  guest_ssh 'sync; systemctl poweroff' || true
  for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then kill "$pid"; sleep 2; fi
  if [ "${4:-}" = reverse ]; then tac "$gdir/disks" >"$gdir/disks.new" && mv "$gdir/disks.new" "$gdir/disks"; fi
  boot
  ;;
stop)
  if ours; then
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    echo "stopped guest $name (pid $pid)" >&2
  fi
  # the private network's port goes with the guest that listened on it: the next start listens anew
  if [ -s "$gdir/lan" ] && grep -q " listen=" "$gdir/lan"; then rm -f "$dir/lan.port"; fi
  rm -rf "$gdir"
  ;;
*)
  echo "usage: $0 start|stop DIR NAME ..." >&2; exit 2 ;;
esac
