#!/usr/bin/env bash
# Godwit's test command (what CI runs, through .ci/run):
#
#   sudo ci/test.sh [EXTRA CARGO TEST ARGS...]
#
# 1. ci/setup.sh                                      (toolchain, packages, /dev/kvm)
# 2. cargo fmt --all -- --check
# 3. cargo clippy --workspace --all-targets -- -D warnings  (and without the RDMA feature)
# 4. cargo test --workspace --release [EXTRA...]      (the end-to-end tests boot VMs in their
#                                                      own network labs: needs root and /dev/kvm)
# 5. ci/rdmalab/test.sh                               (the RDMA tests on soft-RoCE, in a QEMU VM)
# Steps 2-4 all run even when one fails, so one run shows every problem; a summary at the end
# names the failed steps (and failed tests) and their logs in ci/out/. Exit 0 only when all
# passed. TEST_TIMEOUT (seconds, default 1800) bounds each step.
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/ci/out
TIMEOUT=${TEST_TIMEOUT:-1800}
cd "$ROOT"

if [[ -t 1 ]]; then
    BOLD=$'\e[1m' GREEN=$'\e[32m' RED=$'\e[31m' RESET=$'\e[0m'
else
    BOLD='' GREEN='' RED='' RESET=''
fi

die() {
    printf '\n%sFAILED:%s %s\n' "$RED" "$RESET" "$*" >&2
    exit 1
}

[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "TEST_TIMEOUT must be a number of seconds, got '$TIMEOUT'"
[[ $EUID -eq 0 ]] ||
    die "the end-to-end tests need root (network namespaces, /dev/kvm): run  sudo $0"

printf '%s==> setup%s\n' "$BOLD" "$RESET"
ci/setup.sh || die "ci/setup.sh (see above)"
mkdir -p "$OUT"

RESULTS=()
FAILED=0

# step NAME CMD...: runs CMD (bounded by TIMEOUT), output to the terminal and to ci/out/NAME.log.
step() {
    local name=$1 log=$OUT/$1.log start rc=0
    shift
    printf '\n%s==> %s%s\n' "$BOLD" "$*" "$RESET"
    start=$SECONDS
    timeout -k 30 "$TIMEOUT" "$@" </dev/null 2>&1 | tee "$log" || rc=$?
    if ((rc == 0)); then
        RESULTS+=("${GREEN}PASS${RESET}  $name ($((SECONDS - start)) s)")
    else
        FAILED=1
        local why="exit $rc"
        if ((rc == 124)); then
            why="timed out after $TIMEOUT s"
        fi
        RESULTS+=("${RED}FAIL${RESET}  $name ($why, $((SECONDS - start)) s): $*  -> log $log")
        printf '%s==> FAILED: %s (%s)%s\n' "$RED" "$*" "$why" "$RESET"
    fi
}

step fmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets -- -D warnings
step clippy-no-rdma cargo clippy -p godwit --no-default-features --all-targets -- -D warnings
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
step test cargo test --workspace --release "$@"
# RDMA on real verbs: the soft-RoCE lab VM (this host's kernel has no RDMA).
step rdma-lab bash ci/rdmalab/test.sh

printf '\n%s==> summary%s\n' "$BOLD" "$RESET"
for r in "${RESULTS[@]}"; do
    printf '  %s\n' "$r"
done
if cat "$OUT/test.log" "$OUT/rdma-lab.log" 2>/dev/null | grep -q -E '^test .* FAILED$'; then
    echo "  failed tests:"
    cat "$OUT/test.log" "$OUT/rdma-lab.log" 2>/dev/null | grep -E '^test .* FAILED$' | sed 's/^/    /' | head -n 50
fi
if ((FAILED)); then
    printf '\n%sci/test.sh FAILED%s\n' "$RED$BOLD" "$RESET"
    exit 1
fi
printf '\n%sci/test.sh passed%s\n' "$GREEN$BOLD" "$RESET"
