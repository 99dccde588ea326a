#!/bin/sh
# End-to-end live migration over RDMA verbs, run INSIDE the soft-RoCE lab VM (ci/rdmalab):
# Godwit's VMM runs the memory-checking guest under KVM, a second Godwit process receives it
# over rxe (raw pages as RDMA WRITEs), then it moves back with compressed batches (RDMA SEND),
# and the guest's own checks must pass. Soft-RoCE under TCG moves tens of MB/s, so the guest is
# small, its dirty rate modest and the downtime budget generous.
#
#   ci/rdmalab/run.sh -- tests/lab/rdma_migration.sh
set -eu

. "$(dirname "$0")/common.sh"

boot_guest

move 1 "$W/vm0.sock" "$B" --transport rdma --compress off
wait_for "$W/serial1.log" "hb seq" 30
move 2 "$W/vm1.sock" "$A" --transport rdma --compress on
wait_for "$W/serial2.log" "pass=" 30
last=$(grep -o 'pass=[0-9]*' "$W/serial2.log" | tail -1 | cut -d= -f2)
wait_for "$W/serial2.log" "pass=$((last + 2)) " 60

"$G" heartbeat "$W"/serial*.log || fail "the guest is not healthy"
echo "rdma migration: 2 passed, 0 failed"
