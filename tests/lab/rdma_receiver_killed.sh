#!/bin/sh
# A receiver killed in the middle of a migration over RDMA verbs, run INSIDE the soft-RoCE lab
# VM: the migration must fail cleanly and the VM keep running, intact, on the source.
#
#   ci/rdmalab/run.sh -- tests/lab/rdma_receiver_killed.sh
#
# (A guest nested in the lab has now and then crashed on its own, in TCP runs too, never on
# the host's own KVM: ci/rdmalab/README.md says what the lab does about it.)
set -eu

. "$(dirname "$0")/common.sh"

boot_guest

move 1 "$W/vm0.sock" "$B" rdma --transport rdma --compress on
wait_for "$W/serial1.log" "hb seq" 30

# A receiver killed in the middle of an RDMA migration: the source keeps the VM, intact.
"$G" receive --listen "$A:7000" --api "$W/vm3.sock" --serial "$W/serial3.log" --key "$KEY" --id m3 \
    2>"$W/recv3.err" &
victim=$!
pids="$pids $victim"
wait_for "$W/recv3.err" "waiting for a VM" 30
"$G" send --api "$W/vm1.sock" --to "$A:7000" --json --key "$KEY" --id m3 --transport rdma --compress off \
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
"$G" status --api "$W/vm1.sock" | grep -q '"running"' || fail "move 3: the source VM is not running"
echo "move 3 (receiver killed): $(grep -o '"error":"[^"]*"' "$W/report3.json")"
last=$(grep -o 'pass=[0-9]*' "$W/serial1.log" | tail -1 | cut -d= -f2)
wait_for "$W/serial1.log" "pass=$((last + 2)) " 60

"$G" heartbeat "$W"/serial*.log || fail "the guest is not healthy"
echo "rdma receiver killed: 2 passed, 0 failed"
