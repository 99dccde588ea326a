#!/usr/bin/env bash
# Soft-RoCE benchmarks of Godwit's transports, in the rdmalab VM (ci/rdmalab, QEMU TCG with
# rxe0 on 10.99.0.1 and rxe1 on 10.99.0.2):
#
#   sudo benches/rdma_lab.sh
#
# Builds godwit (release) and the criterion bench transport/benches/rdma.rs, boots the lab
# once and runs benches/rdma_lab_inner.sh in it, which measures in that one boot:
#   1. the raw verbs baseline (perftest ib_write_bw / ib_send_bw, 512 KiB messages),
#   2. page batches moved as RDMA WRITE vs RDMA SEND vs TCP (criterion, same process),
#   3. end-to-end migrations of a 64 MiB test guest over rdma (compress off / on) and tcp,
#      with their downtime and CPU seconds per GiB moved on each side,
# and prints one table. The log is also kept in ci/out/rdmalab/bench-rdma.log.
#
# Under TCG, soft-RoCE moves 10-60 MB/s while TCP over the veth moves far more: these figures
# compare the code paths' costs (and catch regressions), not RDMA against TCP on real NICs.
# Needs root for the lab (ci/rdmalab/build.sh once); whole run: about 2-3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release
# --bench rdma: only this bench target (the lib's own test harness is not needed).
out=$(cargo bench -p godwit-transport --features rdma --bench rdma --no-run 2>&1) || {
    echo "$out"
    exit 1
}
bench=$(sed -n 's/.*Executable benches\/rdma\.rs (\(.*\))$/\1/p' <<<"$out" | tail -1)
[[ -x $bench ]] || { echo "$out"; echo "rdma_lab.sh: no bench binary found"; exit 1; }
echo "bench binary: $bench"

# Private copies: a cargo build running meanwhile (another checkout user, an editor) must not
# replace the binaries under the VM while it reads them through the share.
bin=ci/out/rdmalab/bench-bin
mkdir -p "$bin"
cp target/release/godwit "$bin/godwit"
cp "$bench" "$bin/rdma-bench"
ci/rdmalab/run.sh --timeout 290 -- benches/rdma_lab_inner.sh "$bin/rdma-bench" "$PWD/$bin/godwit" 2>&1 |
    tee ci/out/rdmalab/bench-rdma.log
