#!/bin/sh
# The inside of benches/rdma_lab.sh: runs IN the soft-RoCE lab VM (ci/rdmalab; POSIX sh, the
# lab's /bin/sh is dash; busybox awk/sed/grep, no jq, no bash). In one boot:
#   1. the raw verbs baseline: ib_write_bw and ib_send_bw, rxe0 (10.99.0.1) -> rxe1 (10.99.0.2),
#      512 KiB messages (one page batch);
#   2. the criterion bench transport/benches/rdma.rs (WRITE vs SEND vs TCP page batches);
#   3. three end-to-end migrations of one 64 MiB test guest, ping-ponging between the two
#      addresses: rdma/compress off, rdma/compress on, tcp/compress off, recording the report's
#      total_ms, downtime_ms, bytes_sent and the CPU time of the sending and receiving godwit
#      processes during each move;
# then prints one table. Usage (from the repo root, as rdma_lab.sh does):
#
#   ci/rdmalab/run.sh --timeout 290 -- benches/rdma_lab_inner.sh target/release/deps/rdma-HASH \
#       [target/release/godwit]
#
# CPU time is utime+stime of the whole process (/proc/PID/stat, clock ticks), so the source's
# figure includes its vCPU thread (the guest runs during pre-copy) as well as the migration.
# The source process exits once the VM has left; its final figure comes from the shell's
# `times` (children's user+sys) after it was waited for.
set -eu

BENCH=${1:?usage: rdma_lab_inner.sh BENCH_BINARY [GODWIT_BINARY]}
# shellcheck disable=SC2034 # read by common.sh
GODWIT=${2:-}
# G, W, A, B, KEY, pids, cleanup, fail, wait_for, wait_file (its `move` is replaced below).
. "$(dirname "$0")/../tests/lab/common.sh"
PERF_N=${PERF_N:-64}          # 64 x 512 KiB = 32 MiB per perftest run
PERF_SIZE=524288
TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)

# cpu_ticks PID: utime+stime (clock ticks) of the whole process.
cpu_ticks() {
    sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

# json FILE FIELD: a top-level number of a migration report.
json() {
    sed 's/"round_details".*//' "$1" | sed -n "s/.*\"$2\":\([-0-9.eE+]*\).*/\1/p"
}

# perf TOOL: runs TOOL's server on rxe1 in the background, its client on rxe0; prints decimal
# MB/s (perftest's "MB/sec" is MiB/s). Under TCG perftest's cycle-counter calibration
# sometimes fails ("Correlation coefficient r^2 < 0.9 / Can't produce a report"): -F, and up
# to 3 attempts.
perf() {
    for attempt in 1 2 3; do
        timeout 60 "$1" -F -d rxe1 -x 1 -n "$PERF_N" -s "$PERF_SIZE" >"$W/$1.server" 2>&1 &
        srv=$!
        sleep 1
        timeout 60 "$1" -F -d rxe0 -x 1 -n "$PERF_N" -s "$PERF_SIZE" "$B" >"$W/$1.client" 2>&1 ||
            echo "$1 client failed (attempt $attempt)" >&2
        wait "$srv" || true
        r=$(awk -v s="$PERF_SIZE" '$1 == s && NF >= 4 { printf "%.1f\n", $4 * 1.048576 }' "$W/$1.client")
        [ -n "$r" ] && break
        cat "$W/$1.client" >&2
    done
    grep -A1 '#bytes' "$W/$1.client" >&2 || true
    echo "${r:-n/a}"
}

# spawn NAME CMD...: runs CMD in the background, stderr to $W/NAME.err; its PID goes to
# $W/NAME.pid and, once it exits, its user+sys seconds (dash's `times`, second line: the
# subshell's waited-for children) to $W/NAME.times.
spawn() {
    name=$1
    shift
    (
        sh -c 'echo $$ >"$0"; exec "$@"' "$W/$name.pid" "$@" 2>"$W/$name.err" || true
        times >"$W/$name.times.raw"
        # The same from /proc: this subshell's cutime + cstime (ticks).
        me=$(sh -c 'echo $PPID')
        sed 's/.*) //' "/proc/$me/stat" | awk '{ print $14 + $15 }' >"$W/$name.cticks"
        sed -n 2p "$W/$name.times.raw" |
            awk '{ gsub(/[ms]/, " "); split($0, f, " "); print f[1] * 60 + f[2] + f[3] * 60 + f[4] }' >"$W/$name.times"
    ) &
    pids="$pids $!"
    wait_file "$W/$name.pid" 10
}

echo "== 1. raw verbs baseline: ${PERF_N} x ${PERF_SIZE} B, rxe0 -> rxe1"
WBW=$(perf ib_write_bw)
SBW=$(perf ib_send_bw)
echo "ib_write_bw: $WBW MB/s; ib_send_bw: $SBW MB/s"

echo "== 2. criterion: page batches A -> B as RDMA WRITE, RDMA SEND, TCP"
timeout 150 "$BENCH" --bench 2>&1 | tee "$W/bench.out" || echo "bench exited with an error"

echo "== 3. end-to-end migrations of a 64 MiB guest"
spawn vm0 "$G" run --guest memcheck --memory 64M --cmdline "hb_ms=200 wss_mb=32 rate_mbps=1" \
    --api "$W/vm0.sock" --serial "$W/serial0.log"
wait_for "$W/serial0.log" "pass=2" 90

# move N FROM TO_IP LABEL ARGS...: the VM served by process FROM (vmFROM.sock) moves to a fresh
# receiver (vmN) on TO_IP; records the report and both processes' CPU seconds during the move.
move() {
    n=$1 from=$2 to=$3 label=$4
    shift 4
    spawn "vm$n" "$G" receive --listen "$to:7000" --api "$W/vm$n.sock" --serial "$W/serial$n.log" \
        --key "$KEY" --id "m$n"
    wait_for "$W/vm$n.err" "waiting for a VM" 30
    rpid=$(cat "$W/vm$n.pid") spid=$(cat "$W/vm$from.pid")
    r0=$(cpu_ticks "$rpid") s0=$(cpu_ticks "$spid")
    timeout 120 "$G" send --api "$W/vm$from.sock" --to "$to:7000" --json --max-downtime 500ms \
        --key "$KEY" --id "m$n" "$@" \
        >"$W/report$n.json" 2>"$W/send$n.err" || fail "move $n ($label): $(cat "$W/report$n.json")"
    r1=$(cpu_ticks "$rpid")
    grep -q '"outcome":"completed"' "$W/report$n.json" || fail "move $n did not complete"
    wait_file "$W/vm$from.times" 30 # the source exits once the VM has left
    s1=$(cat "$W/vm$from.times")
    echo "cpu: source pid $spid ticks before $s0, at exit: times '$(tr '\n' ' ' <"$W/vm$from.times.raw")' = $s1 s, /proc cutime+cstime $(cat "$W/vm$from.cticks") ticks; receiver pid $rpid ticks $r0 -> $r1"
    echo "move $n ($label): $(sed 's/"round_details".*//' "$W/report$n.json")"
    total=$(json "$W/report$n.json" total_ms)
    down=$(json "$W/report$n.json" downtime_ms)
    bytes=$(json "$W/report$n.json" bytes_sent)
    guest=$(json "$W/report$n.json" guest_memory_bytes)
    echo "$label $total $down $bytes $s0 $s1 $r0 $r1 $guest" >>"$W/moves"
    wait_for "$W/serial$n.log" "hb seq" 30
    sleep 2
}

move 1 0 "$B" rdma-raw --transport rdma --compress off
move 2 1 "$A" rdma-lz4 --transport rdma --compress on
move 3 2 "$B" tcp-raw --transport tcp --compress off
move 4 3 "$A" tcp-lz4 --transport tcp --compress on
# auto: probes both planes before round 1 and keeps the faster; compare with the lines above.
move 5 4 "$B" auto --transport auto --compress auto
"$G" heartbeat "$W"/serial*.log || echo "WARNING: the guest's heartbeat check failed"

echo
echo "== results (MB = 10^6 B; MB/s of a migration = bytes_sent / total time, guestMB/s = guest RAM"
echo "   / total time; ratio = MB/s / ib_write_bw MB/s; cpu_s/GiB = utime+stime of the sending (_s)"
echo "   and receiving (_d) godwit process during the move per GiB of bytes_sent, whole process"
echo "   including the vCPU thread; CLK_TCK=$TCK)"
{
    echo "ib_write_bw $WBW"
    echo "ib_send_bw $SBW"
    sed -n 's/^FIGURE rdma_bench \([a-z]*\) \([0-9]*k\): \([0-9.]*\) MB\/s.*/bench-\1-\2 \3/p' "$W/bench.out"
} >"$W/raw"
awk -v w="$WBW" -v tck="$TCK" '
    BEGIN { printf "%-18s %9s %7s %11s %11s %11s %10s\n", "path", "MB/s", "ratio", "downtime_ms", "cpu_s/GiB_s", "cpu_s/GiB_d", "guestMB/s" }
    FILENAME ~ /raw$/ { r = (w + 0 > 0 && $2 + 0 > 0) ? sprintf("%.2f", $2 / w) : "-"
        printf "%-18s %9s %7s %11s %11s %11s %10s\n", $1, $2, r, "-", "-", "-", "-"; next }
    {
        # label total_ms downtime_ms bytes s0(ticks) s1(s) r0(ticks) r1(ticks) guest_bytes
        mbs = $4 / 1e6 / ($2 / 1e3); gib = $4 / 1073741824
        cs = ($6 - $5 / tck) / gib; cd = (($8 - $7) / tck) / gib
        r = (w + 0 > 0) ? sprintf("%.2f", mbs / w) : "-"
        printf "%-18s %9.1f %7s %11.1f %11.2f %11.2f %10.1f\n", "migrate-" $1, mbs, r, $3, cs, cd, $9 / 1e6 / ($2 / 1e3)
    }' "$W/raw" "$W/moves"
