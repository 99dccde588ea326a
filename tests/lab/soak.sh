#!/bin/sh
# Moves one running guest back and forth between the lab's two addresses N times over PLANE
# (rdma or tcp), run INSIDE the soft-RoCE lab VM; after each move the guest must keep beating
# on its new host for two seconds. It measures how often the lab's nested KVM loses a guest,
# to tell a fault of the RDMA path from one of the emulated lab (ci/rdmalab/README.md).
#
#   ci/rdmalab/run.sh -- tests/lab/soak.sh N PLANE [SEND-ARGS...]
set -eu

. "$(dirname "$0")/common.sh"

n_moves=$1 plane=$2
shift 2
boot_guest

from=0
i=1
while [ "$i" -le "$n_moves" ]; do
    if [ $((i % 2)) = 1 ]; then to=$B; else to=$A; fi
    move "$i" "$W/vm$from.sock" "$to" "$plane" --transport "$plane" "$@"
    beats=$(grep -c "hb seq" "$W/serial$i.log" || true)
    wait_for "$W/serial$i.log" "hb seq" 30
    sleep 2
    "$G" status --api "$W/vm$i.sock" | grep -q '"running"' ||
        fail "after move $i: the guest is not running: $(tail -2 "$W/recv$i.err")"
    [ "$(grep -c "hb seq" "$W/serial$i.log")" -gt "$((beats + 5))" ] ||
        fail "after move $i: the guest stopped beating"
    from=$i
    i=$((i + 1))
done

"$G" heartbeat "$W"/serial*.log || fail "the guest is not healthy"
echo "soak: $n_moves moves over $plane passed"
