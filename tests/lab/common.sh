# Shared by the lab's migration scripts and benches/rdma_lab_inner.sh (sourced; runs inside
# the lab VM, whose /bin/sh is dash). $GODWIT names another godwit binary.
# shellcheck shell=dash
G=${GODWIT:-$(pwd)/target/release/godwit}
W=$(mktemp -d)
# shellcheck disable=SC2034 # used by the scripts that source this file
A=10.99.0.1
# shellcheck disable=SC2034
B=10.99.0.2
pids=""
KEY=$W/key
"$G" key new "$KEY" >/dev/null
# Processes to end on exit: $pids, and those whose PID a script wrote to $W/NAME.pid.
cleanup() {
    for f in "$W"/*.pid; do
        if [ -s "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; fi
    done
    for p in $pids; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
# fail WHY: the logs, where each godwit thread waits (a vCPU stuck in KVM_RUN and a stuck
# socket look different), and the lab kernel's last words, so a rare failure can be read.
fail() {
    echo "FAIL: $*"
    for f in "$W"/*.log "$W"/*.err; do [ -f "$f" ] && { echo "--- $f"; tail -5 "$f"; }; done
    for p in $pids; do
        [ -d "/proc/$p" ] || continue
        echo "--- threads of $(tr '\0' ' ' <"/proc/$p/cmdline" | cut -c1-60)"
        for t in /proc/"$p"/task/*; do
            echo "$(cat "$t/comm") $(cut -d' ' -f3 "$t/stat") $(cat "$t/wchan" 2>/dev/null)"
        done
    done
    echo "--- dmesg"
    dmesg | tail -15
    exit 1
}

# wait_for FILE PATTERN SECONDS
wait_for() {
    local tenths=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        tenths=$((tenths + 1))
        [ "$tenths" -le $(($3 * 10)) ] || fail "timed out waiting for '$2' in $1"
        sleep 0.1
    done
}

# wait_file FILE SECONDS: until FILE exists and is not empty.
wait_file() {
    local tenths=0
    while [ ! -s "$1" ]; do
        tenths=$((tenths + 1))
        [ "$tenths" -le $(($2 * 10)) ] || fail "timed out waiting for $1"
        sleep 0.1
    done
}

# boot_guest: the memory checker on this host as vm0, once it has checked every page twice.
# Soft-RoCE under TCG moves tens of MB/s: a small guest, a modest dirty rate.
boot_guest() {
    "$G" run --guest memcheck --memory 64M --cmdline "hb_ms=200 wss_mb=8 rate_mbps=1" \
        --api "$W/vm0.sock" --serial "$W/serial0.log" 2>"$W/run0.err" &
    pids="$pids $!"
    wait_for "$W/serial0.log" "pass=2" 60
}

# move N FROM_SOCK TO_IP PLANE EXTRA...: receive on TO_IP, send, check that the report says
# completed on PLANE (tcp, rdma, or any).
move() {
    n=$1 from=$2 to=$3 plane=$4
    shift 4
    "$G" receive --listen "$to:7000" --api "$W/vm$n.sock" --serial "$W/serial$n.log" \
        --key "$KEY" --id "m$n" 2>"$W/recv$n.err" &
    pids="$pids $!"
    wait_for "$W/recv$n.err" "waiting for a VM" 30
    "$G" send --api "$from" --to "$to:7000" --json --max-downtime 500ms --key "$KEY" --id "m$n" "$@" \
        >"$W/report$n.json" 2>"$W/send$n.err" ||
        fail "move $n: $(cat "$W/report$n.json")"
    grep -q '"outcome":"completed"' "$W/report$n.json" || fail "move $n did not complete"
    [ "$plane" = any ] || grep -q "\"transport\":\"$plane\"" "$W/report$n.json" ||
        fail "move $n did not use $plane: $(cat "$W/report$n.json")"
    echo "move $n: $(sed 's/"round_details".*//' "$W/report$n.json")"
}

