#!/usr/bin/env bash
# The RDMA tests, on real verbs: builds the soft-RoCE lab (cached) and the release binaries on
# the host, then runs them inside the lab VM (a boot costs 7-10 s), where rxe0
# (10.99.0.1) and rxe1 (10.99.0.2) exist: the transport's verbs and channel tests, then a live
# migration of a running KVM guest over rxe (tests/lab/rdma_migration.sh), and one whose
# receiver is killed mid-way (tests/lab/rdma_receiver_killed.sh); then, in a second boot, the
# fault matrix of tests/faults.rs over RDMA. Exits non-zero when the lab could not boot or any
# test failed. Called by ci/test.sh; needs root.
#
#   ci/rdmalab/test.sh
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

ci/rdmalab/build.sh

# test_binary NAME CARGO-ARGS...: builds a test binary on the host (against the host's
# libibverbs; the lab has the same) and prints its path relative to the repository.
test_binary() {
    local name=$1 bin
    shift
    bin=$(cargo test --release --no-run --message-format=json "$@" 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | grep "/$name-" | head -n 1)
    [[ -x $bin ]] || {
        echo "rdmalab/test.sh: could not build the test binary $name" >&2
        exit 1
    }
    echo "${bin#"$ROOT"/}"
}
bin=$(test_binary godwit_transport -p godwit-transport --features rdma)
# The fault matrix of tests/faults.rs, which runs over RDMA when GODWIT_RXE_LAB is set.
faults=$(test_binary faults --test faults)

# The godwit binary, for the end-to-end migration over rxe.
cargo build --release --bin godwit

echo "rdmalab/test.sh: running the RDMA tests inside the lab VM" >&2
# lab TIMEOUT COMMAND: one boot of the lab running COMMAND. When the lab itself fails (the VM
# does not boot, its kernel dies and reports no exit status: 125, or it stops making progress
# and runs out of time: 124), it boots once more and says so; a test that fails is never run
# again.
lab() {
    local rc attempt
    for attempt in 1 2; do
        rc=0
        ci/rdmalab/run.sh --timeout "$1" -- sh -c "$2" || rc=$?
        ((rc == 125 || rc == 124)) || return "$rc"
        echo "rdmalab/test.sh: THE LAB VM FAILED (attempt $attempt, exit $rc: it did not boot, its kernel died, or it hung; see above)" >&2
    done
    return "$rc"
}
lab 600 "$bin rdma:: --test-threads=1 && tests/lab/rdma_migration.sh && tests/lab/rdma_receiver_killed.sh"
# The faults at every phase, over RDMA, one boot per fault so a lab failure costs one of them
# (cancelling is the same code on either plane: TCP only). They do not gate CI yet: the nested
# KVM of this emulated lab crashes or hangs a test guest now and then on its own
# (ci/rdmalab/README.md), so a red case here is printed as a WARNING with its output above,
# while the same matrix over TCP on the host's real KVM (tests/faults.rs) gates every run.
not_passed=()
for fault in receiver_killed source_killed link_cut link_stalled; do
    rc=0
    lab 600 "GODWIT_RXE_LAB=1 $faults --test-threads=1 --nocapture $fault" || rc=$?
    ((rc == 0)) || not_passed+=("$fault (exit $rc)")
done
if ((${#not_passed[@]})); then
    echo "rdmalab/test.sh: WARNING: these RDMA fault tests did not pass in the lab (see above): ${not_passed[*]}" >&2
else
    echo "rdmalab/test.sh: the RDMA fault matrix passed in the lab" >&2
fi
