#!/usr/bin/env bash
# Builds the soft-RoCE lab VM's kernel and initramfs (see README.md beside this file):
#
#   ci/rdmalab/build.sh
#
# 1. installs the host packages it needs (only the missing ones; runs apt-get update first then)
# 2. downloads Debian's standard linux-image-6.1.*-amd64 (resolved from linux-image-amd64),
#    unpacks it and turns its bzImage into an ELF vmlinux (the xz payload) for PVH boot
# 3. builds an uncompressed cpio initramfs: busybox + dash as /bin/sh, iproute2, nft, ibverbs-utils,
#    perftest, rdmacm-utils, iperf3, the rxe provider, their ldd closures, the kernel modules in
#    dependency order and ci/rdmalab/init as /init
#
# Idempotent: everything lands in $RDMALAB_CACHE (default ci/out/rdmalab, gitignored) and each
# step is skipped when its output is there and up to date. Prints the paths on stdout as
# VMLINUX=... and INITRAMFS=...; messages go to stderr.
# RDMALAB_EXTRA_BINS: space-separated host binaries whose library closures are added too.
set -euo pipefail
shopt -s inherit_errexit

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${RDMALAB_CACHE:-$ROOT/ci/out/rdmalab}
T0=$SECONDS

trap 'echo "build.sh: failed (line $LINENO: $BASH_COMMAND)" >&2' ERR
say() { echo "build.sh: $*" >&2; }
die() {
    echo "build.sh: $*" >&2
    exit 1
}

[[ $EUID -eq 0 ]] || die "needs root (apt-get): run it with sudo"
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock -w 900 9 || die "another build.sh holds $CACHE/.build.lock for more than 15 min"

# ---------------------------------------------------------------- 1. host packages
PACKAGES=(qemu-system-x86 busybox-static dash iproute2 nftables ibverbs-providers ibverbs-utils perftest
    rdmacm-utils iperf3 libibverbs-dev librdmacm-dev libnl-3-dev libnl-route-3-dev pkg-config
    libclang-dev cmake python3 cpio xz-utils kmod apt-utils)
missing=()
for p in "${PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    log=$CACHE/apt.log
    export DEBIAN_FRONTEND=noninteractive
    if ! { timeout 600 apt-get update -q &&
        timeout 900 apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "apt-get failed (full log: $log)"
    fi
fi

# ---------------------------------------------------------------- 2. kernel
# The package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64.
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ && !x { print $2; x = 1 }') || true
if [[ -z $KPKG ]]; then
    # No package lists (offline, not updated): reuse what an earlier run unpacked.
    KPKG=$(cat "$CACHE/kernel.pkg" 2>/dev/null) ||
        { timeout 600 apt-get update -q >/dev/null 2>&1 || true; KPKG=$(apt-cache depends linux-image-amd64 |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ && !x { print $2; x = 1 }'); }
    [[ -n $KPKG ]] || die "cannot resolve linux-image-amd64's kernel package"
fi
KDIR=$CACHE/kernel/$KPKG
if [[ ! -e $KDIR/.unpacked ]]; then
    say "downloading and unpacking $KPKG"
    rm -rf "$KDIR" "$CACHE/deb"
    mkdir -p "$CACHE/deb" "$KDIR"
    (cd "$CACHE/deb" && timeout 900 apt-get download -q "$KPKG" >"$CACHE/download.log" 2>&1) ||
        { tail -n 20 "$CACHE/download.log" >&2; die "apt-get download $KPKG failed"; }
    dpkg -x "$CACHE"/deb/"$KPKG"_*.deb "$KDIR"
    rm -rf "$CACHE/deb" # about 70 MB, no longer needed
    touch "$KDIR/.unpacked"
fi
echo "$KPKG" >"$CACHE/kernel.pkg"
KVER=${KPKG#linux-image-}
MODDIR=$KDIR/lib/modules/$KVER
[[ -d $MODDIR ]] || die "no $MODDIR in $KPKG"

VMLINUX=$CACHE/vmlinux-$KVER
if [[ ! -s $VMLINUX ]]; then
    bz=$KDIR/boot/vmlinuz-$KVER
    [[ -f $bz ]] || die "no $bz in $KPKG"
    # Boot protocol header: setup_sects at 0x1f1, payload_offset/payload_length at 0x248/0x24c;
    # the payload starts payload_offset bytes into the protected-mode code, which follows the
    # (setup_sects + 1) 512-byte sectors of the real-mode part.
    u8() { od -An -tu1 -j "$1" -N1 "$bz" | tr -d ' '; }
    u32() { od -An -tu4 -j "$1" -N4 "$bz" | tr -d ' '; }
    [[ $(od -An -c -j $((0x202)) -N4 "$bz" | tr -d ' ') == HdrS ]] || die "$bz is not a bzImage"
    sects=$(u8 $((0x1f1)))
    ((sects)) || sects=4
    off=$(((sects + 1) * 512 + $(u32 $((0x248)))))
    len=$(u32 $((0x24c)))
    [[ $(od -An -tx1 -j "$off" -N6 "$bz" | tr -d ' ') == fd377a585a00 ]] ||
        die "$bz's payload is not xz (magic $(od -An -tx1 -j "$off" -N6 "$bz"))"
    dd if="$bz" iflag=skip_bytes,count_bytes skip="$off" count="$len" status=none | xz -dc --single-stream >"$VMLINUX.tmp"
    [[ $(head -c 4 "$VMLINUX.tmp" | od -An -tx1 | tr -d ' ') == 7f454c46 ]] ||
        die "the payload of $bz is not an ELF file"
    # PVH boot needs the Xen PHYS32_ENTRY note.
    readelf -n "$VMLINUX.tmp" 2>/dev/null | grep -q Xen ||
        say "warning: no Xen ELF notes in vmlinux, PVH boot may not work"
    mv "$VMLINUX.tmp" "$VMLINUX"
    say "vmlinux: $(du -h --apparent-size "$VMLINUX" | cut -f1)"
fi

# ---------------------------------------------------------------- 3. initramfs
is_elf() { [[ $(head -c 4 "$1" | od -An -tx1 | tr -d ' ') == 7f454c46 ]]; }
# Userspace: commands found on the host (ELF executables only: no bash in the image).
COMMANDS=(ip rdma nft dash timeout iperf3)
for pkg in ibverbs-utils perftest rdmacm-utils; do
    while read -r f; do
        [[ -f $f && -x $f && $f == */bin/* ]] && is_elf "$f" && COMMANDS+=("$f")
    done < <(dpkg -L "$pkg")
done
# Libraries anything may need (test binaries built on the host) beyond the commands' closures.
EXTRA_LIBS=(libgcc_s.so.1 libstdc++.so.6 libm.so.6 libz.so.1 libnl-3.so.200 libnl-route-3.so.200
    libibverbs.so.1 librdmacm.so.1 libibumad.so.3 libmlx5.so.1)
# Kernel modules wanted (their dependencies come along); NAME or "NAME PARAMS".
MODULES=(crc32c_generic nfnetlink nf_tables crc32_generic ib_core ib_uverbs udp_tunnel ip6_udp_tunnel rdma_rxe iw_cm ib_cm rdma_cm
    rdma_ucm configfs veth virtio virtio_ring virtio_pci 9pnet 9pnet_virtio 9p qemu_fw_cfg
    irqbypass kvm ccp "kvm_amd nrips=0 npt=0")

# Everything the image depends on, to know when to rebuild it.
inputs() {
    cat "$HERE/build.sh" "$HERE/init"
    echo "$KPKG ${RDMALAB_EXTRA_BINS:-}"
    dpkg-query -W "${PACKAGES[@]}" libc6 libgcc-s1 libstdc++6 2>/dev/null
    for b in ${RDMALAB_EXTRA_BINS:-}; do stat -c '%n %s %Y' "$b"; done
}
KEY=$(inputs | sha256sum | cut -c1-16)
INITRAMFS=$CACHE/initramfs.cpio
if [[ -s $INITRAMFS && $(cat "$CACHE/initramfs.key" 2>/dev/null) == "$KEY" ]]; then
    say "up to date ($((SECONDS - T0)) s)"
    echo "VMLINUX=$VMLINUX"
    echo "INITRAMFS=$INITRAMFS"
    echo "MODULES=$CACHE/initramfs.list"
    exit 0
fi

say "building the initramfs"
STAGE=$CACHE/stage
rm -rf "$STAGE"
mkdir -p "$STAGE"/{usr/bin,usr/sbin,usr/lib64,usr/lib/x86_64-linux-gnu,etc,proc,sys,dev,tmp,root,run,mnt}
# Merged /usr, like the host, so ldd's paths (/lib/..., /lib64/...) are valid inside too.
ln -s usr/bin "$STAGE/bin"
ln -s usr/sbin "$STAGE/sbin"
ln -s usr/lib "$STAGE/lib"
ln -s usr/lib64 "$STAGE/lib64"

# put SRC [DEST]: copies a host file (following symlinks) to the same path in the image.
put() {
    local src=$1 dst=${2:-$1}
    mkdir -p "$(dirname "$STAGE$dst")"
    cp -L --preserve=mode "$src" "$STAGE$dst"
}
# closure FILE...: the libraries FILEs load (ldd, transitive), one path a line.
closure() {
    local f
    for f; do
        { ldd "$f" 2>/dev/null || true; } | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
    done | sort -u
}

bins=()
for c in "${COMMANDS[@]}"; do
    p=$(command -v "$c") || die "command $c not found on the host"
    p=$(readlink -f "$p")
    put "$p" "/usr/bin/$(basename "$c")"
    bins+=("$p")
done
for b in ${RDMALAB_EXTRA_BINS:-}; do
    [[ -f $b ]] || die "RDMALAB_EXTRA_BINS: no file $b"
    bins+=("$b")
done
ln -s dash "$STAGE/usr/bin/sh"

# The rxe provider, found through libibverbs' driver files.
[[ -f /etc/libibverbs.d/rxe.driver ]] || die "no /etc/libibverbs.d/rxe.driver (ibverbs-providers)"
put /etc/libibverbs.d/rxe.driver
provider=$(compgen -G '/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so' | sort | tail -n1) || true
[[ -n $provider ]] || die "no librxe-rdmav*.so (ibverbs-providers)"
put "$provider"
bins+=("$provider")

libs=()
for l in "${EXTRA_LIBS[@]}"; do
    p=$(ldconfig -p | awk -v n="$l" '$1 == n && /x86-64/ && !x { print $NF; x = 1 }')
    if [[ -n $p ]]; then libs+=("$p"); else say "note: $l not on the host, left out"; fi
done
while read -r l; do put "$l"; done < <(closure "${bins[@]}" "${libs[@]}"; printf '%s\n' "${libs[@]}")
put /etc/ld.so.conf
[[ -d /etc/ld.so.conf.d ]] && cp -a /etc/ld.so.conf.d "$STAGE/etc/"
ldconfig -r "$STAGE" 2>/dev/null || die "ldconfig -r failed"

# busybox, and its applets wherever no real command is.
put "$(readlink -f "$(command -v busybox)")" /usr/bin/busybox
while read -r a; do
    [[ $a == bin/sh || $a == linuxrc ]] && continue
    n=${a##*/}
    [[ -e $STAGE/usr/bin/$n || -e $STAGE/usr/sbin/$n || -L $STAGE/$a ]] ||
        ln -s /usr/bin/busybox "$STAGE/$a"
done < <("$STAGE/usr/bin/busybox" --list-full)

# Kernel modules, in dependency order (from each .ko's depends=), decompressed.
declare -A KO=() SEEN=()
while read -r f; do
    n=$(basename "$f")
    n=${n%%.ko*}
    KO[${n//-/_}]=$f
done < <(find "$MODDIR" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
builtin() { grep -q "/$1.ko\$\|/${1//_/-}.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; }
ORDER=()
kobytes() {
    case $1 in
    *.xz) xz -dc "$1" ;;
    *.zst) zstd -dc "$1" ;;
    *.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
    esac
}
visit() { # visit NAME [PARAMS...]
    local n=${1//-/_} params=${*:2} f deps d
    [[ -n ${SEEN[$n]:-} ]] && return
    SEEN[$n]=1
    f=${KO[$n]:-}
    if [[ -z $f ]]; then
        builtin "$n" && return
        die "kernel module $n neither in $KPKG nor built in"
    fi
    mkdir -p "$STAGE/lib/modules/$KVER"
    kobytes "$f" >"$STAGE/lib/modules/$KVER/$n.ko"
    deps=$(tr '\0' '\n' <"$STAGE/lib/modules/$KVER/$n.ko" | awk '/^depends=/ && !x { sub(/^depends=/, ""); print; x = 1 }')
    for d in ${deps//,/ }; do visit "$d"; done
    ORDER+=("/lib/modules/$KVER/$n.ko${params:+ $params}")
}
for m in "${MODULES[@]}"; do
    # shellcheck disable=SC2086
    visit $m
done
mkdir -p "$STAGE/etc/rdmalab"
printf '%s\n' "${ORDER[@]}" >"$STAGE/etc/rdmalab/modules"

install -m 0755 "$HERE/init" "$STAGE/init"
echo "$KVER" >"$STAGE/etc/rdmalab/kernel"
echo root:x:0:0:root:/root:/bin/sh >"$STAGE/etc/passwd"
echo root:x:0: >"$STAGE/etc/group"
printf '127.0.0.1 localhost\n10.99.0.1 lab-a\n10.99.0.2 lab-b\n' >"$STAGE/etc/hosts"

(cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$INITRAMFS.tmp"
mv "$INITRAMFS.tmp" "$INITRAMFS"
(cd "$STAGE" && find . -mindepth 1 \( -type f -o -type l \) | sed 's/^\.//' | LC_ALL=C sort) >"$CACHE/initramfs.list"
echo "$KEY" >"$CACHE/initramfs.key"
rm -rf "$STAGE"
say "initramfs: $(du -h --apparent-size "$INITRAMFS" | cut -f1), modules: $(printf '%s ' "${ORDER[@]##*/}")"
say "done in $((SECONDS - T0)) s"
echo "VMLINUX=$VMLINUX"
echo "INITRAMFS=$INITRAMFS"
echo "MODULES=$CACHE/initramfs.list"
