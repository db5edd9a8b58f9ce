#!/bin/sh
# Build the Blixard test guest offline from Debian packages.
#
# Usage: images/test-guest/build.sh OUTDIR
#
# Needs: linux-image-cloud-amd64, busybox-static, e2fsprogs (mkfs.ext4), cpio, gzip,
# and at run time qemu-system-x86 (+ socat for the runners' microvm-shutdown).
# Environment: KERNEL_VERSION (default: newest /boot/vmlinuz-*-cloud-amd64),
#              ACCEL (tcg|kvm, baked into the runners; default: kvm unless the host
#              lacks /dev/kvm or is kvm-pvm, which cannot boot stock kernels).
#
# Produces in OUTDIR:
#   bundle/kernel bundle/initrd.cpio.gz bundle/disk.img bundle/cmdline
#       a kernel/initrd/root-disk bundle for the qemu backend
#   runner/            microvm.nix runner layout (bin/microvm-run, bin/microvm-shutdown,
#                      share/microvm/tap-interfaces empty): no network
#   runner-stubborn/   same, but the guest ignores the ACPI power button
#   runner-net/        same as runner/, with one tap interface (blxtg0) in tap-interfaces
#   VERSION            a stamp of the inputs; the build is skipped when it matches
#
# The guest prints BLIXARD-GUEST-READY on the serial console, serves HTTP on port 8080
# (busybox httpd), prints BLIXARD-TICK n every second, and powers off on the ACPI power
# button. It has no users, passwords or keys.
set -eu

OUT=${1:?usage: build.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)

if [ -z "${KERNEL_VERSION:-}" ]; then
    k=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$k" ] || { echo "build.sh: no /boot/vmlinuz-*-cloud-amd64; apt-get install linux-image-cloud-amd64" >&2; exit 2; }
    KERNEL_VERSION=${k#/boot/vmlinuz-}
fi
KERNEL=/boot/vmlinuz-$KERNEL_VERSION
MODDIR=/lib/modules/$KERNEL_VERSION/kernel
BUSYBOX=/bin/busybox
for need in "$KERNEL" "$MODDIR" "$BUSYBOX"; do
    [ -e "$need" ] || { echo "build.sh: missing $need (apt-get install linux-image-cloud-amd64 busybox-static)" >&2; exit 2; }
done
for tool in cpio gzip mkfs.ext4; do
    command -v $tool >/dev/null 2>&1 || PATH=$PATH:/sbin:/usr/sbin
    command -v $tool >/dev/null 2>&1 || { echo "build.sh: missing $tool (apt-get install cpio gzip e2fsprogs)" >&2; exit 2; }
done
if ! file "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' && ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "build.sh: $BUSYBOX is not static (apt-get install busybox-static)" >&2; exit 2
fi

if [ -z "${ACCEL:-}" ]; then
    if [ -c /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ]; then ACCEL=kvm; else ACCEL=tcg; fi
fi

mkdir -p "$OUT"
# Builds into one OUTDIR (tests running in parallel) take turns: the second finds the
# first's result up to date instead of deleting it half-way.
exec 9>"$OUT/.lock"
flock 9

STAMP="test-guest v3 kernel=$KERNEL_VERSION accel=$ACCEL init=$(cksum < "$HERE/init" | cut -d' ' -f1) build=$(cksum < "$0" | cut -d' ' -f1)"
if [ -f "$OUT/VERSION" ] && [ "$(cat "$OUT/VERSION")" = "$STAMP" ]; then
    echo "build.sh: $OUT is up to date"
    exit 0
fi

OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM

# --- initramfs ---------------------------------------------------------------------------
R=$WORK/initrd
mkdir -p "$R/bin" "$R/lib/modules" "$R/dev" "$R/proc" "$R/sys" "$R/mnt" "$R/tmp"
cp "$BUSYBOX" "$R/bin/busybox"
cp "$HERE/init" "$R/init"
chmod 755 "$R/init" "$R/bin/busybox"
for m in drivers/virtio/virtio drivers/virtio/virtio_ring drivers/virtio/virtio_mmio \
         drivers/block/virtio_blk net/core/failover drivers/net/net_failover \
         drivers/net/virtio_net drivers/input/evdev drivers/acpi/button; do
    src=$MODDIR/$m.ko
    if [ -f "$src" ]; then
        cp "$src" "$R/lib/modules/"
    elif [ -f "$src.xz" ]; then
        xz -dc "$src.xz" > "$R/lib/modules/$(basename "$m").ko"
    else
        echo "build.sh: warning: module $m not found (built in?)" >&2
    fi
done
( cd "$R" && find . | cpio -o -H newc --quiet | gzip -9 ) > "$WORK/initrd.cpio.gz"

# --- root disk ---------------------------------------------------------------------------
mkdir -p "$WORK/disk"
echo "blixard-test-disk" > "$WORK/disk/blixard-disk-id"
mkfs.ext4 -q -F -d "$WORK/disk" "$WORK/disk.img" 8M >/dev/null

# --- bundle ------------------------------------------------------------------------------
rm -rf "$OUT/bundle" "$OUT/runner" "$OUT/runner-stubborn" "$OUT/runner-net"
mkdir -p "$OUT/bundle"
cp "$KERNEL" "$OUT/bundle/kernel"
mv "$WORK/initrd.cpio.gz" "$OUT/bundle/initrd.cpio.gz"
mv "$WORK/disk.img" "$OUT/bundle/disk.img"
echo "console=ttyS0 panic=-1 quiet" > "$OUT/bundle/cmdline"

# --- runners (microvm.nix layout) ---------------------------------------------------------
# microvm@NAME.service runs bin/microvm-run with the VM's state dir as working directory;
# the control socket is "${hostName}.sock" there (microvm.nix's `microvm.socket` default).
# Blixard passes BLIXARD_VM_CONTROL_SOCKET (absolute) and, with networking,
# BLIXARD_VM_IP / BLIXARD_VM_GATEWAY / BLIXARD_VM_MAC; this runner honours them.
make_runner() { # DIR EXTRA_APPEND TAPS
    d=$OUT/$1
    mkdir -p "$d/bin" "$d/share/microvm"
    : > "$d/share/microvm/tap-interfaces"
    for t in $3; do echo "$t" >> "$d/share/microvm/tap-interfaces"; done
    echo vnet_hdr > "$d/share/microvm/tap-flags"
    echo qemu > "$d/share/microvm/hypervisor"
    cat > "$d/bin/microvm-run" <<EOF
#!/bin/sh
# microvm-run for the Blixard test guest (generated by images/test-guest/build.sh)
set -eu
SHARE=$d/share/microvm
SOCK=\${BLIXARD_VM_CONTROL_SOCKET:-test-guest.sock}
KHZ=\$(awk -F: '/^cpu MHz/ { printf "%d", \$2 * 1000; exit }' /proc/cpuinfo 2>/dev/null || true)
APPEND="console=ttyS0 panic=-1 quiet$2\${KHZ:+ tsc_early_khz=\$KHZ}\${BLIXARD_VM_IP:+ blixard.ip=\$BLIXARD_VM_IP}\${BLIXARD_VM_GATEWAY:+ blixard.gw=\$BLIXARD_VM_GATEWAY}"
NET=""
i=0
for tap in \$(cat "\$SHARE/tap-interfaces"); do
    NET="\$NET -netdev tap,id=net\$i,ifname=\$tap,script=no,downscript=no -device virtio-net-device,netdev=net\$i\${BLIXARD_VM_MAC:+,mac=\$BLIXARD_VM_MAC}"
    i=\$((i + 1))
done
# shellcheck disable=SC2086
exec qemu-system-x86_64 -name test-guest -M microvm -accel $ACCEL -m 256 -smp 1 \\
    -nodefaults -no-user-config -nographic -no-reboot \\
    -chardev stdio,id=stdio,signal=off -serial chardev:stdio \\
    -kernel $OUT/bundle/kernel -initrd $OUT/bundle/initrd.cpio.gz -append "\$APPEND" \\
    -drive id=root,file=$OUT/bundle/disk.img,format=raw,if=none,readonly=on \\
    -device virtio-blk-device,drive=root \$NET \\
    -qmp "unix:\$SOCK,server,nowait"
EOF
    cat > "$d/bin/microvm-shutdown" <<'EOF'
#!/bin/sh
# microvm-shutdown for the Blixard test guest: ACPI power button over QMP, like
# microvm.nix's qemu runner (needs socat), then wait until qemu is gone.
set -eu
SOCK=${BLIXARD_VM_CONTROL_SOCKET:-test-guest.sock}
[ -S "$SOCK" ] || exit 0
command -v socat >/dev/null 2>&1 || { echo "microvm-shutdown: socat not installed" >&2; exit 1; }
printf '%s\n%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"system_powerdown"}' \
    | socat -t 1 STDIO "UNIX:$SOCK" >/dev/null
while socat -u /dev/null "UNIX:$SOCK" 2>/dev/null; do sleep 0.2; done
EOF
    chmod 755 "$d/bin/microvm-run" "$d/bin/microvm-shutdown"
}
make_runner runner "" ""
make_runner runner-stubborn " blixard.ignore_powerdown=1" ""
make_runner runner-net "" "blxtg0"

echo "$STAMP" > "$OUT/VERSION"
echo "build.sh: built test guest in $OUT (accel baked into runners: $ACCEL)"
