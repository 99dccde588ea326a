#!/bin/sh
# End-to-end live migration over RDMA verbs, run INSIDE the soft-RoCE lab VM (ci/rdmalab):
# Godwit's VMM runs the memory-checking guest under KVM, a second Godwit process receives it
# over rxe (raw pages as RDMA WRITEs), then it moves back with compressed batches (RDMA SEND),
# and the guest's own checks must pass. Soft-RoCE under TCG moves tens of MB/s, so the guest is
# small, its dirty rate modest and the downtime budget generous.
#
#   ci/rdmalab/run.sh -- tests/lab/rdma_migration.sh
set -eu

G=$(pwd)/target/release/godwit
W=$(mktemp -d)
A=10.99.0.1
B=10.99.0.2
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; for f in "$W"/*.log "$W"/*.err; do echo "--- $f"; tail -5 "$f"; done; exit 1; }

# wait_for FILE PATTERN SECONDS
wait_for() {
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -le $(($3 * 10)) ] || fail "timed out waiting for '$2' in $1"
        sleep 0.1
    done
}

# move N FROM_SOCK TO_IP EXTRA...: receive on TO_IP, send, check the report.
move() {
    n=$1 from=$2 to=$3
    shift 3
    "$G" receive --listen "$to:7000" --api "$W/vm$n.sock" --serial "$W/serial$n.log" 2>"$W/recv$n.err" &
    pids="$pids $!"
    wait_for "$W/recv$n.err" "waiting for a VM" 30
    "$G" send --api "$from" --to "$to:7000" --json --max-downtime 500ms "$@" >"$W/report$n.json" 2>"$W/send$n.err" ||
        fail "move $n: $(cat "$W/report$n.json")"
    grep -q '"outcome":"completed"' "$W/report$n.json" || fail "move $n did not complete"
    grep -q '"transport":"rdma"' "$W/report$n.json" || fail "move $n did not use RDMA: $(cat "$W/report$n.json")"
    echo "move $n: $(sed 's/"round_details".*//' "$W/report$n.json")"
}

"$G" run --guest memcheck --memory 64M --cmdline "hb_ms=200 wss_mb=8 rate_mbps=1" \
    --api "$W/vm0.sock" --serial "$W/serial0.log" 2>"$W/run0.err" &
pids="$pids $!"
wait_for "$W/serial0.log" "pass=2" 60

move 1 "$W/vm0.sock" "$B" --transport rdma --compress off
wait_for "$W/serial1.log" "hb seq" 30
move 2 "$W/vm1.sock" "$A" --transport rdma --compress on
wait_for "$W/serial2.log" "pass=" 30
last=$(grep -o 'pass=[0-9]*' "$W/serial2.log" | tail -1 | cut -d= -f2)
wait_for "$W/serial2.log" "pass=$((last + 2)) " 60

# A receiver killed in the middle of an RDMA migration: the source keeps the VM, intact.
"$G" receive --listen "$B:7000" --api "$W/vm3.sock" --serial "$W/serial3.log" 2>"$W/recv3.err" &
victim=$!
pids="$pids $victim"
wait_for "$W/recv3.err" "waiting for a VM" 30
"$G" send --api "$W/vm2.sock" --to "$B:7000" --json --transport rdma --compress off \
    --max-bandwidth 1M >"$W/report3.json" 2>"$W/send3.err" &
sender=$!
# At 1 MiB/s the first round alone takes over 8 s; kill the receiver inside it.
sleep 3
kill -0 "$sender" 2>/dev/null || fail "move 3 ended before the receiver was killed: $(cat "$W/report3.json")"
kill -9 "$victim"
rc=0
wait "$sender" || rc=$?
[ "$rc" = 1 ] || fail "move 3 should have failed (exit $rc): $(cat "$W/report3.json")"
grep -q '"vm_on_source":true' "$W/report3.json" || fail "move 3: the VM left the source"
"$G" status --api "$W/vm2.sock" | grep -q '"running"' || fail "move 3: the source VM is not running"
echo "move 3 (receiver killed): $(grep -o '"error":"[^"]*"' "$W/report3.json")"
last=$(grep -o 'pass=[0-9]*' "$W/serial2.log" | tail -1 | cut -d= -f2)
wait_for "$W/serial2.log" "pass=$((last + 2)) " 60

"$G" heartbeat "$W"/serial*.log || fail "the guest is not healthy"
echo "rdma migration: 3 passed, 0 failed"
