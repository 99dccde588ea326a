#!/usr/bin/env bash
# The RDMA tests, on real verbs: builds the soft-RoCE lab (cached) and the release binaries on
# the host, then runs them inside the lab VM (a boot costs 7-10 s), where rxe0
# (10.99.0.1) and rxe1 (10.99.0.2) exist: the transport's verbs and channel tests, then a live
# migration of a running KVM guest over rxe (tests/lab/rdma_migration.sh), one whose receiver
# is killed mid-way (tests/lab/rdma_receiver_killed.sh) and a short soak (tests/lab/soak.sh);
# then, one boot per fault, the fault matrix of tests/faults.rs over RDMA. Exits non-zero when
# the lab could not boot or any test failed. Called by ci/test.sh; needs root.
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
# lab [--rerun-crash] TIMEOUT COMMAND: one boot of the lab running COMMAND. When the lab itself
# fails (the VM does not boot, its kernel dies and reports no exit status: 125, or it stops
# making progress and runs out of time: 124), it boots once more and says so. With
# --rerun-crash, so does a COMMAND that failed with a guest triple-faulted: a KVM guest nested
# under the lab's emulated CPU now and then does so on its own (ci/rdmalab/README.md); a second
# crash fails. Any other failure is never run again.
lab() {
    local rerun_crash=0 rc attempt out
    [[ $1 == --rerun-crash ]] && rerun_crash=1 && shift
    out=$(mktemp)
    for attempt in 1 2; do
        rc=0
        ci/rdmalab/run.sh --timeout "$1" -- sh -c "$2" | tee "$out" || rc=$?
        if ((rc == 125 || rc == 124)); then
            echo "rdmalab/test.sh: THE LAB VM FAILED (attempt $attempt, exit $rc: it did not boot, its kernel died, or it hung; see above)" >&2
        elif ((rc != 0 && rerun_crash)) && grep -q "triple-faulted" "$out"; then
            echo "rdmalab/test.sh: A GUEST CRASHED IN THE LAB (attempt $attempt: $(grep -m1 -o "vCPU.*triple-faulted.*" "$out")); the lab boots once more" >&2
        else
            break
        fi
    done
    rm -f "$out"
    return "$rc"
}
lab --rerun-crash 900 "$bin rdma:: --test-threads=1 && tests/lab/rdma_migration.sh && tests/lab/rdma_receiver_killed.sh && tests/lab/soak.sh 10 rdma --compress auto"
# The faults at every phase, over RDMA, one boot per fault so a lab failure costs one of them
# (cancelling is the same code on either plane: TCP only). A case whose guest crashed on its
# own runs once more inside tests/faults.rs, so the boot is not re-run for a crash.
failed=()
for fault in receiver_killed source_killed link_cut link_stalled; do
    lab 600 "GODWIT_RXE_LAB=1 $faults --test-threads=1 --nocapture $fault" || failed+=("$fault (exit $?)")
done
if ((${#failed[@]})); then
    echo "rdmalab/test.sh: FAILED: the RDMA fault matrix over soft-RoCE: ${failed[*]} (see above)" >&2
    exit 1
fi
echo "rdmalab/test.sh: the RDMA fault matrix passed in the lab" >&2
