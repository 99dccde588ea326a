#!/usr/bin/env bash
# The RDMA tests, on real verbs: builds the soft-RoCE lab (cached) and the release binaries on
# the host, then runs inside ONE boot of the lab VM (a boot costs 7-10 s), where rxe0
# (10.99.0.1) and rxe1 (10.99.0.2) exist: the transport's verbs and channel tests, then a live
# migration of a running KVM guest over rxe (tests/lab/rdma_migration.sh), and one whose
# receiver is killed mid-way (tests/lab/rdma_receiver_killed.sh). Exits non-zero when the lab could
# not boot or any test failed. Called by ci/test.sh; needs root.
#
#   ci/rdmalab/test.sh
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

ci/rdmalab/build.sh

# The transport crate's test binary, built against the host's libibverbs (the lab has the same).
bin=$(cargo test -p godwit-transport --features rdma --release --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | grep 'godwit_transport-' | head -n 1)
[[ -x $bin ]] || {
    echo "rdmalab/test.sh: could not build the transport test binary" >&2
    exit 1
}
bin=${bin#"$ROOT"/}

# The godwit binary, for the end-to-end migration over rxe.
cargo build --release --bin godwit

echo "rdmalab/test.sh: running the RDMA tests inside the lab VM" >&2
rc=0
ci/rdmalab/run.sh --timeout 600 -- sh -c \
    "$bin rdma:: --test-threads=1 && tests/lab/rdma_migration.sh && tests/lab/rdma_receiver_killed.sh" || rc=$?
if ((rc == 125)); then
    echo "rdmalab/test.sh: THE LAB VM DID NOT BOOT, so the RDMA tests did not run (see above)" >&2
fi
exit "$rc"
