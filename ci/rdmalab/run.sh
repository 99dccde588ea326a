#!/usr/bin/env bash
# Runs a command inside the soft-RoCE lab VM (see README.md beside this file):
#
#   ci/rdmalab/run.sh [OPTIONS] -- CMD [ARGS...]
#
#   --timeout S     bound on CMD inside the VM, seconds (default 600); the whole run is bounded
#                   by S + the boot allowance + 30 s, then QEMU is killed
#   --boot-timeout S  the boot allowance (default 90): no command start by then = boot failure
#   --mem SIZE      guest RAM (default 3G)          --smp N   vCPUs (default 2)
#   --env K=V       export K=V for CMD (repeatable)
#   --bin PATH      also put PATH's library closure (and PATH, when outside the repo) into the
#                   VM (repeatable); done by itself for every ELF file named in CMD
#   --keep          keep the run folder (output, console log, status log) and print its path
#
# CMD runs under /bin/sh (dash) in the repo root, which is shared at its own absolute path,
# with rxe0 (veth0, 10.99.0.1) and rxe1 (veth1, 10.99.0.2) up and /dev/kvm present. Its output
# is streamed to stdout; the exit status is CMD's (124 when it timed out inside the VM), 125
# when the VM could not boot or died without reporting one. Timings go to stderr.
# Environment: RDMALAB_CACHE (build output, default ci/out/rdmalab), RDMALAB_CPU (QEMU -cpu),
# RDMALAB_APPEND (extra kernel arguments, e.g. loglevel=7).
# Builds the lab first (ci/rdmalab/build.sh) when it is not built yet.
set -euo pipefail
shopt -s inherit_errexit

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${RDMALAB_CACHE:-$ROOT/ci/out/rdmalab}
RUNS=$ROOT/ci/out/rdmalab/runs # must be inside the share: the guest writes the output there

say() { echo "run.sh: $*" >&2; }
die() {
    echo "run.sh: $*" >&2
    exit 125
}
usage() {
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-125}"
}

TIMEOUT=600 BOOT_TIMEOUT=90 MEM=3G SMP=2 KEEP=0
ENVS=() BINS=()
while (($#)); do
    case $1 in
    --timeout) TIMEOUT=${2:?}; shift 2 ;;
    --boot-timeout) BOOT_TIMEOUT=${2:?}; shift 2 ;;
    --mem) MEM=${2:?}; shift 2 ;;
    --smp) SMP=${2:?}; shift 2 ;;
    --env) ENVS+=("${2:?}"); shift 2 ;;
    --bin) BINS+=("${2:?}"); shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) say "unknown option '$1'"; usage ;;
    esac
done
(($#)) || { say "no command"; usage; }
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a number of seconds, got '$TIMEOUT'"
[[ $BOOT_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--boot-timeout must be a number of seconds"
for e in "${ENVS[@]}"; do [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "bad --env '$e'"; done
command -v qemu-system-x86_64 >/dev/null || die "no qemu-system-x86_64: run ci/rdmalab/build.sh"

if [[ ! -s $CACHE/initramfs.cpio || ! -s $CACHE/kernel.pkg ]]; then
    say "the lab is not built yet: running build.sh"
    "$HERE/build.sh" >/dev/null || die "build.sh failed"
fi
KVER=$(cat "$CACHE/kernel.pkg")
KVER=${KVER#linux-image-}
VMLINUX=$CACHE/vmlinux-$KVER
[[ -s $VMLINUX ]] || die "no $VMLINUX: run ci/rdmalab/build.sh"

mkdir -p "$RUNS"
RUN=$(mktemp -d "$RUNS/run.XXXXXX")
QPID='' TPID='' RC=125
# shellcheck disable=SC2317 # (called by the EXIT trap)
cleanup() {
    if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then
        kill "$QPID" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.3; done
        kill -9 "$QPID" 2>/dev/null || true
    fi
    [[ -z $TPID ]] || kill "$TPID" 2>/dev/null || true
    if ((KEEP)) || ((RC == 125)); then
        say "run folder kept: $RUN"
    else
        rm -rf "$RUN"
    fi
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------ the command, for dash
q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
{
    for e in "${ENVS[@]}"; do printf 'export %s=%s\n' "${e%%=*}" "$(q "${e#*=}")"; done
    printf 'exec'
    for a in "$@"; do printf ' %s' "$(q "$a")"; done
    printf '\n'
} >"$RUN/cmd"
{
    echo "LAB_SHARE=$(q "$ROOT")"
    echo "LAB_CWD=$(q "$ROOT")"
    echo "LAB_OUT=$(q "$RUN/output")"
    echo "LAB_TIMEOUT=$TIMEOUT"
    echo "LAB_TAIL=40"
} >"$RUN/env"

# ------------------------------------------------------------------ extra libraries
# ELF files named in CMD or by --bin whose libraries (or which themselves) are not in the image
# go into a second cpio archive appended to the initramfs.
is_elf() { [[ -f $1 && $(head -c 4 "$1" | od -An -tx1 | tr -d ' ') == 7f454c46 ]]; }
canon() { # the image's path of a host path (merged /usr)
    case $1 in
    /lib/* | /lib64/* | /bin/* | /sbin/*) echo "/usr$1" ;;
    *) echo "$1" ;;
    esac
}
in_image() { grep -qxF "$(canon "$1")" "$CACHE/initramfs.list"; }
extra=()
cands=("${BINS[@]}")
for a in "$@"; do
    [[ $a == */* ]] && cands+=("$a")
done
# A bare command name the image lacks but the host has.
if [[ $1 != */* ]] && ! in_image "/usr/bin/$1" && ! in_image "/usr/sbin/$1"; then
    p=$(command -v "$1" 2>/dev/null) && [[ $p == /* ]] && cands+=("$p")
fi
for c in "${cands[@]}"; do
    [[ $c == /* ]] || c=$ROOT/$c
    is_elf "$c" || { [[ " ${BINS[*]} " == *" $c "* ]] && die "--bin $c: not an ELF file"; continue; }
    [[ $c == "$ROOT"/* ]] || extra+=("$c") # over a busybox applet of that name, too
    while read -r l; do in_image "$l" || extra+=("$l"); done < <(
        { ldd "$c" 2>/dev/null || true; } | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
done
INITRD=$CACHE/initramfs.cpio
if ((${#extra[@]})); then
    mkdir -p "$RUN/extra"
    for f in $(printf '%s\n' "${extra[@]}" | sort -u); do
        d=$(canon "$f")
        mkdir -p "$RUN/extra$(dirname "$d")"
        cp -L "$f" "$RUN/extra$d"
    done
    (cd "$RUN/extra" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$RUN/extra.cpio"
    cat "$CACHE/initramfs.cpio" "$RUN/extra.cpio" >"$RUN/initrd"
    INITRD=$RUN/initrd
    say "added to the image: $(printf '%s ' "${extra[@]}")"
fi

# ------------------------------------------------------------------ boot
# qemu64 (2-3x faster than max under TCG) with AMD SVM + nested paging for /dev/kvm inside.
# +xsave,+xsaveopt: without XSAVE the nested KVM rejects KVM_SET_XCRS (EINVAL), which Godwit's
# VMM calls; +xsave alone hung the kernel's early boot here, with +xsaveopt it boots.
CPU=${RDMALAB_CPU:-qemu64,+svm,+npt,+xsave,+xsaveopt}
APPEND="console=ttyS0 loglevel=4 panic=-1 rdinit=/init mitigations=off 8250.nr_uarts=2 ${RDMALAB_APPEND:-}"
: >"$RUN/status.log"
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
T0=$(now_ms)
# -d cpu_reset: the lab VM has now and then stopped with no word on its console; QEMU then
# logs "Triple fault" here when the emulated CPU reset itself, which tells that from a QEMU
# crash (its exit status) or a kernel panic (the console).
qemu-system-x86_64 -nodefaults -no-user-config -display none -monitor none -no-reboot \
    -d cpu_reset -D "$RUN/reset.log" \
    -machine pc,accel=tcg -cpu "$CPU" -smp "$SMP" -m "$MEM" \
    -kernel "$VMLINUX" -initrd "$INITRD" -append "$APPEND" \
    -serial "file:$RUN/console.log" -serial "file:$RUN/status.log" \
    -fsdev "local,id=share,path=$ROOT,security_model=none" \
    -device virtio-9p-pci,fsdev=share,mount_tag=share \
    -fw_cfg "name=opt/godwit/env,file=$RUN/env" -fw_cfg "name=opt/godwit/cmd,file=$RUN/cmd" \
    </dev/null >"$RUN/qemu.log" 2>&1 &
QPID=$!
tail -n +1 -F --pid="$QPID" "$RUN/output" 2>/dev/null &
TPID=$!

READY=0 WHY=''
BOOT_DEADLINE=$((T0 + BOOT_TIMEOUT * 1000))
DEADLINE=$((T0 + (BOOT_TIMEOUT + TIMEOUT + 30) * 1000))
while kill -0 "$QPID" 2>/dev/null; do
    t=$(now_ms)
    if ((!READY)) && grep -q '^GODWIT-LAB READY' "$RUN/status.log"; then
        READY=$t
    fi
    if ((!READY && t > BOOT_DEADLINE)); then
        WHY="no command start within ${BOOT_TIMEOUT} s"
        break
    fi
    if ((t > DEADLINE)); then
        WHY="still running after $(((t - T0) / 1000)) s"
        break
    fi
    sleep 0.2
done
if [[ -n $WHY ]]; then
    kill "$QPID" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.3; done
    kill -9 "$QPID" 2>/dev/null || true
fi
QRC=0
wait "$QPID" || QRC=$?
QPID=''
T1=$(now_ms)
((READY)) || ! grep -q '^GODWIT-LAB READY' "$RUN/status.log" || READY=$T1
# tail exits by itself once QEMU is gone (after a last read); bound it anyway.
for _ in $(seq 50); do kill -0 "$TPID" 2>/dev/null || break; sleep 0.1; done
kill "$TPID" 2>/dev/null || true
wait "$TPID" 2>/dev/null || true
TPID=''

STATUS=$(tr -d '\r' <"$RUN/status.log")
if [[ ! -e $RUN/output ]] && grep -q '^GODWIT-LAB TAIL ' <<<"$STATUS"; then
    say "no output file in the share; the tail the VM sent:"
    sed -n 's/^GODWIT-LAB TAIL //p' <<<"$STATUS"
fi
secs() { printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100)); }
if ((!READY)); then
    say "THE LAB VM DID NOT BOOT (${WHY:-QEMU exited with status $QRC before the command started})"
    grep '^GODWIT-LAB BOOTFAIL' <<<"$STATUS" | sed 's/^/run.sh:   /' >&2 || true
    [[ -s $RUN/qemu.log ]] && sed 's/^/run.sh:   qemu: /' "$RUN/qemu.log" | tail -n 10 >&2
    say "last console lines:"
    tail -n 25 "$RUN/console.log" 2>/dev/null | tr -d '\r' | sed 's/^/run.sh:   /' >&2 || true
    RC=125
    exit 125
fi
up=$(sed -n 's/^GODWIT-LAB READY uptime=//p' <<<"$STATUS" | head -n 1)
code=$(sed -n 's/^GODWIT-LAB EXIT //p' <<<"$STATUS" | tail -n 1)
if [[ $code =~ ^[0-9]+$ ]]; then
    RC=$code
    what="exit $RC"
    ((RC == 124)) && what="exit 124 (timed out after $TIMEOUT s inside the VM)"
else
    RC=125
    why=${WHY:-the VM stopped without reporting one: QEMU exited with status $QRC}
    grep -q 'Triple fault' "$RUN/reset.log" 2>/dev/null && why="$why after a triple fault of the lab's CPU"
    what="NO EXIT STATUS ($why; last console lines below)"
    tail -n 25 "$RUN/console.log" 2>/dev/null | tr -d '\r' | sed 's/^/run.sh:   /' >&2 || true
fi
say "boot $(secs $((READY - T0))) s (QEMU start to command start; guest uptime ${up:-?} s)," \
    "command $(secs $((T1 - READY))) s, total $(secs $((T1 - T0))) s, $what"
exit "$RC"
