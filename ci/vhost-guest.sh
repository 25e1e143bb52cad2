# vhost-guest.sh — shared by vhost-test.sh and bench-export.sh (source it).
#
# Installs what the Linux-guest tests need (apt-get), fetches Debian's cloud
# kernel (the package behind linux-image-cloud-amd64) into $CACHE, and builds
# initramfs images (busybox-static + the virtio modules + fio and its
# libraries + a caller-provided /init and extra files), cached by content.
#
# Expects: CACHE, log(), die(). Defines: KVER, VMLINUZ, BUSYBOX,
# build_initramfs, wait_socket, ensure_export_cmd, proc_cpu_ticks.

# ---------------------------------------------------------------- dependencies
need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
command -v qemu-storage-daemon >/dev/null || need_pkgs+=(qemu-system-common qemu-utils)
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || need_pkgs+=(busybox-static)
command -v fio >/dev/null || need_pkgs+=(fio)
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v xz >/dev/null || need_pkgs+=(xz-utils)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}" >/dev/null
fi
BUSYBOX=/bin/busybox
! ldd "$BUSYBOX" >/dev/null 2>&1 || die "$BUSYBOX is not static (busybox-static)"

# ---------------------------------------------------------------- kernel
mkdir -p "$CACHE"
ABI_PKG=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$ABI_PKG" ] || die "cannot resolve linux-image-cloud-amd64"
KVER=${ABI_PKG#linux-image-}
KDIR=$CACHE/$KVER
if [ ! -f "$KDIR/.extracted" ]; then
    log "downloading $ABI_PKG"
    rm -rf "$KDIR" && mkdir -p "$KDIR"
    (cd "$KDIR" && apt-get download "$ABI_PKG" 2>/dev/null && dpkg -x ./*.deb root && rm -f ./*.deb)
    touch "$KDIR/.extracted"
fi
VMLINUZ=$KDIR/root/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || die "no kernel at $VMLINUZ"

# ---------------------------------------------------------------- initramfs
# build_initramfs INIT EXTRA_DIR NAME -> prints the path of the (cached) cpio.
# EXTRA_DIR's files are copied to /pat in the image.
build_initramfs() {
    local INIT=$1 EXTRA=$2 NAME=$3 INIT_SUM INITRD STAGE FIO ko m
    INIT_SUM=$( (cat "$INIT"; echo "$KVER"; sha256sum "$EXTRA"/* 2>/dev/null; command -v fio) | sha256sum | cut -c1-16)
    INITRD=$CACHE/initramfs-$NAME-$KVER-$INIT_SUM.cpio
    if [ ! -f "$INITRD" ]; then
        log "building initramfs $INITRD"
        STAGE=$(mktemp -d)
        mkdir -p "$STAGE"/{bin,sbin,usr/bin,proc,sys,dev,tmp,lib/modules,pat,etc}
        cp "$BUSYBOX" "$STAGE/bin/busybox"
        install -m 755 "$INIT" "$STAGE/init"
        for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
            ko=$(find "$KDIR/root/lib/modules/$KVER" -name "$m.ko*" | head -n1)
            [ -n "$ko" ] || die "module $m not found"
            case "$ko" in
                *.ko.xz) xz -dc "$ko" >"$STAGE/lib/modules/$m.ko" ;;
                *.ko.zst) zstd -dc "$ko" >"$STAGE/lib/modules/$m.ko" ;;
                *.ko.gz) gzip -dc "$ko" >"$STAGE/lib/modules/$m.ko" ;;
                *) cp "$ko" "$STAGE/lib/modules/$m.ko" ;;
            esac
        done
        cp "$EXTRA"/* "$STAGE/pat/" 2>/dev/null || true
        # fio and its shared libraries (copied to the same paths).
        FIO=$(command -v fio)
        cp "$FIO" "$STAGE/usr/bin/fio"
        ldd "$FIO" | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
            [ -f "$lib" ] || continue
            mkdir -p "$STAGE$(dirname "$lib")"
            cp -L "$lib" "$STAGE$lib"
        done
        # ld.so at its canonical path too (lib64).
        mkdir -p "$STAGE/lib64"
        cp -L /lib64/ld-linux-x86-64.so.2 "$STAGE/lib64/"
        # Uncompressed newc: the kernel copies it quickly even under TCG.
        (cd "$STAGE" && find . -print0 | cpio --null -o -H newc --quiet) >"$INITRD.tmp"
        mv "$INITRD.tmp" "$INITRD"
        rm -rf "$STAGE"
    fi
    echo "$INITRD"
}


# wait_socket PATH PID LOG: waits until the back-end listens.
wait_socket() {
    local i=0
    while [ ! -S "$1" ]; do
        kill -0 "$2" 2>/dev/null || { cat "$3" >&2; die "back-end exited before listening"; }
        i=$((i + 1)); [ $i -gt 600 ] && die "no socket $1 after 60 s"
        sleep 0.1
    done
}

# ensure_export_cmd [--release]: sets EXPORT_CMD (default: `vmm-ref export`,
# built here with cargo).
ensure_export_cmd() {
    if [ -z "${EXPORT_CMD:-}" ]; then
        local profile=debug flag=
        [ "${1:-}" = --release ] && { profile=release; flag=--release; }
        log "building vmm-ref ($profile)"
        (cd "$HERE/.." && cargo build -j 2 $flag -p vmm-ref >&2)
        EXPORT_CMD="${CARGO_TARGET_DIR:-$HERE/../target}/$profile/vmm-ref export"
    fi
}

# proc_cpu_ticks PID: utime + stime of the whole process, in clock ticks.
proc_cpu_ticks() {
    # Field 2 (comm) may contain spaces: cut after the closing parenthesis.
    sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}
