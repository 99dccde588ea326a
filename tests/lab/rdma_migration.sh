#!/bin/sh
# End-to-end live migration over RDMA verbs, run INSIDE the soft-RoCE lab VM (ci/rdmalab):
# Godwit's VMM runs the memory-checking guest under KVM, a second Godwit process receives it
# over rxe (raw pages as RDMA WRITEs), then it moves back with compressed batches (RDMA SEND),
# then once more with `--transport auto`, which must probe both planes and keep the faster;
# the guest's own checks must pass. Soft-RoCE under TCG moves tens of MB/s, so the guest is
# small, its dirty rate modest and the downtime budget generous.
#
#   ci/rdmalab/run.sh -- tests/lab/rdma_migration.sh
set -eu

. "$(dirname "$0")/common.sh"

boot_guest

move 1 "$W/vm0.sock" "$B" rdma --transport rdma --compress off
wait_for "$W/serial1.log" "hb seq" 30
move 2 "$W/vm1.sock" "$A" rdma --transport rdma --compress on
wait_for "$W/serial2.log" "hb seq" 30

# auto: both planes probed before round 1, the faster one (RDMA on a near tie) carries pages.
move 3 "$W/vm2.sock" "$B" any --transport auto
probe=$(grep -o '"plane_probe":{[^}]*}' "$W/report3.json") ||
    fail "move 3: auto did not probe both planes: $(cat "$W/report3.json")"
rate() { echo "$probe" | sed "s/.*\"$1_bytes_per_sec\":\([0-9.e+]*\).*/\1/"; }
want=$(awk -v t="$(rate tcp)" -v r="$(rate rdma)" 'BEGIN { print (t > 0 && r > 0) ? (r >= 0.9 * t ? "rdma" : "tcp") : "none" }')
[ "$want" != none ] || fail "move 3: a plane measured nothing: $probe"
grep -q "\"transport\":\"$want\"" "$W/report3.json" ||
    fail "move 3: the probe favoured $want, the pages took another plane: $(cat "$W/report3.json")"
echo "move 3 (auto): $want, probe $probe"
wait_for "$W/serial3.log" "pass=" 30
last=$(grep -o 'pass=[0-9]*' "$W/serial3.log" | tail -1 | cut -d= -f2)
wait_for "$W/serial3.log" "pass=$((last + 2)) " 60

"$G" heartbeat "$W"/serial*.log || fail "the guest is not healthy"
echo "rdma migration: 3 passed, 0 failed"
