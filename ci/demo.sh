#!/usr/bin/env bash
# Godwit demo: live-migrates a running VM from host A to host B and back, and shows from the
# guest's own serial output that it never stopped for long, never rebooted and lost no memory.
#
#   sudo ci/demo.sh
#
# Runs ci/setup.sh and `cargo build --release`, creates a two-host network lab (ci/lab.sh),
# boots the memory-checking test guest on A, moves it A -> B and B -> A with `godwit send`,
# prints `godwit heartbeat` over both hosts' serial logs, stops the VM and removes the lab.
# Every step is checked; the first failure stops the demo (exit 1) and shows the logs' tails.
# The work directory with all logs is kept and printed at the end.
#
# Environment: DEMO_LAB (lab name, default gwdemo), DEMO_MEMORY (default 1G),
# DEMO_CMDLINE (default "hb_ms=20 wss_mb=256"), DEMO_PORT (default 7777).
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB=${DEMO_LAB:-gwdemo}
MEMORY=${DEMO_MEMORY:-1G}
CMDLINE=${DEMO_CMDLINE:-hb_ms=20 wss_mb=256}
PORT=${DEMO_PORT:-7777}
WAIT_S=10 # bound of each wait for a socket, a listener or a process exit

if [[ -t 1 ]]; then
    BOLD=$'\e[1m' GREEN=$'\e[32m' RED=$'\e[31m' RESET=$'\e[0m'
else
    BOLD='' GREEN='' RED='' RESET=''
fi

section() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$RESET"; }
ok() { printf '%s ok%s  %s\n' "$GREEN" "$RESET" "$*"; }
quote() { # ARGS...: the words, single-quoted where needed
    local w out=()
    for w in "$@"; do
        if [[ $w =~ ^[A-Za-z0-9_./:=,@+-]+$ ]]; then
            out+=("$w")
        else
            out+=("'${w//\'/\'\\\'\'}'")
        fi
    done
    echo "${out[*]}"
}
show() { printf '%s$ %s%s\n' "$BOLD" "$*" "$RESET"; }
fail() {
    printf '\n%sFAILED:%s %s\n' "$RED" "$RESET" "$*" >&2
    exit 1
}

[[ $EUID -eq 0 ]] || fail "the demo needs root (network namespaces, /dev/kvm): run  sudo $0"

# --- state for the cleanup -------------------------------------------------------------------
WORK=''
LAB_UP=0
PIDS=() # godwit processes this script started and has not reaped yet

forget_pid() {
    local p keep=()
    for p in "${PIDS[@]}"; do
        [[ $p == "$1" ]] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
}

cleanup() {
    local rc=$? pid i f
    trap - EXIT INT TERM
    if ((${#PIDS[@]})); then
        for pid in "${PIDS[@]}"; do
            kill -TERM "$pid" 2>/dev/null || true
        done
        for pid in "${PIDS[@]}"; do
            for ((i = 0; i < 30; i++)); do # at most 3 s, then SIGKILL
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        done
    fi
    if ((LAB_UP)); then
        "$ROOT/ci/lab.sh" down "$LAB" 2>/dev/null || echo "demo.sh: could not remove lab $LAB" >&2
    fi
    if ((rc != 0)) && [[ -n $WORK && -d $WORK ]]; then
        for f in "$WORK"/*.log; do
            [[ -s $f ]] || continue
            printf '\n--- last lines of %s\n' "$f" >&2
            tail -n 8 "$f" >&2
        done
    fi
    if [[ -n $WORK ]]; then
        printf '\nlogs: %s\n' "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers ---------------------------------------------------------------------------------
# wait_for DESC PID CMD...: polls CMD every 0.1 s for at most WAIT_S s; fails early if PID
# (the process that should make CMD true; "-" for none) exits.
wait_for() {
    local desc=$1 pid=$2 i
    shift 2
    for ((i = 0; i < WAIT_S * 10; i++)); do
        if "$@"; then
            return 0
        fi
        if [[ $pid != - ]] && ! kill -0 "$pid" 2>/dev/null; then
            fail "$desc: the process (pid $pid) exited"
        fi
        sleep 0.1
    done
    fail "$desc: not within $WAIT_S s"
}

# wait_exit PID DESC: waits at most WAIT_S s for PID to exit and asserts it exited with 0.
wait_exit() {
    local pid=$1 desc=$2 i rc=0
    for ((i = 0; i < WAIT_S * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        fail "$desc (pid $pid) still running after $WAIT_S s"
    fi
    wait "$pid" || rc=$?
    forget_pid "$pid"
    ((rc == 0)) || fail "$desc (pid $pid) exited with $rc"
    ok "$desc (pid $pid) exited with 0"
}

listening() { # NS ADDR PORT
    [[ -n $(ip netns exec "$1" ss -Hltn "src $2 and sport = :$3" 2>/dev/null) ]]
}

has_pass2() { # LOG: the guest finished one pass over its working set and checked it once
    grep -Eq '^\[[0-9.]+\] hb seq=[0-9]+ pass=([2-9]|[1-9][0-9]+) ' "$1" 2>/dev/null
}

new_heartbeat() { # LOG SEQ: a heartbeat after SEQ is in LOG
    [[ $(last_seq "$1") -gt $2 ]]
}

last_seq() {
    local s
    s=$(grep -Eo 'hb seq=[0-9]+' "$1" 2>/dev/null | tail -n 1 | cut -d= -f2)
    echo "${s:-0}"
}

last_hb() { grep -E '\] hb seq=' "$1" | tail -n 1; }

running() { # SOCK: godwit status says the VM runs
    local out
    out=$("$GODWIT" status --api "$1" 2>/dev/null) || return 1
    [[ $out =~ \"state\":\ *\"running\" ]]
}

# start_godwit NAME HOST ARGS...: starts godwit in the lab host's namespace, output to
# $WORK/NAME.log; sets STARTED to its PID (ip netns exec execs godwit, so it is godwit's).
start_godwit() {
    local name=$1 host=$2
    shift 2
    show "ip netns exec $LAB-$host godwit $(quote "$@") > $WORK/$name.log"
    ip netns exec "$LAB-$host" "$GODWIT" "$@" >"$WORK/$name.log" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
}

# move FROM TO FROM_PID FROM_SOCK TO_SOCK TO_SERIAL TO_ADDR REPORT: receive on TO, send from
# FROM, assert; sets TO_PID.
move() {
    local from=$1 to=$2 from_pid=$3 from_sock=$4 to_sock=$5 to_serial=$6 to_addr=$7 report=$8
    local rc=0 upper_from upper_to
    upper_from=${from^^}
    upper_to=${to^^}
    section "moving $upper_from -> $upper_to"
    MOVES=$((MOVES + 1))
    start_godwit "receive-$to" "$to" receive --listen "$to_addr:$PORT" \
        --api "$to_sock" --serial "$to_serial" --key "$KEY" --id "demo-$MOVES"
    TO_PID=$STARTED
    wait_for "godwit receive listening on $to_addr:$PORT" "$TO_PID" \
        listening "$LAB-$to" "$to_addr" "$PORT"
    ok "host $upper_to waits for the VM on $to_addr:$PORT"
    show "ip netns exec $LAB-$from godwit send --api $from_sock --to $to_addr:$PORT --key $KEY --id demo-$MOVES"
    ip netns exec "$LAB-$from" "$GODWIT" send --api "$from_sock" --to "$to_addr:$PORT" \
        --key "$KEY" --id "demo-$MOVES" |
        tee "$report" || rc=$?
    ((rc == 0)) || fail "godwit send $upper_from -> $upper_to exited with $rc"
    ok "godwit send exited with 0 (report saved in $report)"
    wait_exit "$from_pid" "the VM process on $upper_from"
    wait_for "the VM's API socket on $upper_to ($to_sock)" "$TO_PID" test -S "$to_sock"
    wait_for "the VM on $upper_to answering 'running'" "$TO_PID" running "$to_sock"
    local seq
    seq=$(last_seq "$to_serial")
    wait_for "a new heartbeat on $upper_to" "$TO_PID" new_heartbeat "$to_serial" "$seq"
    ok "the VM runs on $upper_to: $(last_hb "$to_serial")"
}

# --- the demo --------------------------------------------------------------------------------
START=$SECONDS
cd "$ROOT"

section "setup and build"
show "ci/setup.sh"
ci/setup.sh || fail "ci/setup.sh"
show "cargo build --release"
cargo build --release || fail "cargo build --release"
GODWIT=${CARGO_TARGET_DIR:-$ROOT/target}/release/godwit
[[ -x $GODWIT ]] || fail "no binary at $GODWIT after the build"
ok "$GODWIT"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/godwit-demo.XXXXXX")
A_SERIAL=$WORK/serial-a.log # the guest's console on host A (both stays there append to it)
B_SERIAL=$WORK/serial-b.log
# Both hosts share one pre-shared key (on real hosts: copy the file over).
KEY=$WORK/key
MOVES=0
show "godwit key new $KEY"
"$GODWIT" key new "$KEY" >/dev/null || fail "godwit key new"

show "ci/lab.sh up $LAB"
LAB_UP=1
ci/lab.sh up "$LAB" >/dev/null || fail "ci/lab.sh up $LAB"
A_ADDR=$(ci/lab.sh addr "$LAB" a)
B_ADDR=$(ci/lab.sh addr "$LAB" b)
ok "host A = namespace $LAB-a ($A_ADDR), host B = namespace $LAB-b ($B_ADDR)"

section "VM running on A"
start_godwit run-a a run --guest memcheck --memory "$MEMORY" --cmdline "$CMDLINE" \
    --api "$WORK/a1.sock" --serial "$A_SERIAL"
A1_PID=$STARTED
wait_for "the VM's API socket on A" "$A1_PID" test -S "$WORK/a1.sock"
wait_for "the VM on A answering 'running'" "$A1_PID" running "$WORK/a1.sock"
# The first pass writes the working set; from the second on, every page is also checked.
WAIT_S=20 wait_for "the guest's first full pass over its memory" "$A1_PID" has_pass2 "$A_SERIAL"
ok "guest booted: $(grep -m 1 'godwit-guest boot' "$A_SERIAL")"
ok "guest checks its memory continuously: $(last_hb "$A_SERIAL")"

move a b "$A1_PID" "$WORK/a1.sock" "$WORK/b.sock" "$B_SERIAL" "$B_ADDR" "$WORK/report-a-to-b.txt"
B_PID=$TO_PID
sleep 1 # let it run on B for a moment

move b a "$B_PID" "$WORK/b.sock" "$WORK/a2.sock" "$A_SERIAL" "$A_ADDR" "$WORK/report-b-to-a.txt"
A2_PID=$TO_PID
sleep 0.5

section "heartbeat summary (the guest's serial output from both hosts, merged)"
show "godwit heartbeat $A_SERIAL $B_SERIAL"
rc=0
"$GODWIT" heartbeat "$A_SERIAL" "$B_SERIAL" || rc=$?
((rc == 0)) || fail "godwit heartbeat says the guest was not healthy (exit $rc)"
ok "heartbeat verdict: healthy"

section "stopping the VM and removing the lab"
show "godwit stop --api $WORK/a2.sock"
"$GODWIT" stop --api "$WORK/a2.sock" || fail "godwit stop"
wait_exit "$A2_PID" "the VM process on A"
ci/lab.sh down "$LAB" 2>/dev/null || fail "ci/lab.sh down $LAB"
LAB_UP=0
ok "lab $LAB removed"

printf '\n%sdemo passed%s in %d s: the VM went A -> B -> A without a reboot or a lost page.\n' \
    "$GREEN$BOLD" "$RESET" "$((SECONDS - START))"
