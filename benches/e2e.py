#!/usr/bin/env python3
"""End-to-end migration benchmark: a 1 GiB test guest moved between two lab hosts.

For each workload (idle, and the dirtier at a few rates) one VM is booted and populated, then
moved back and forth with 1 and 4 TCP streams, compression off and on. Before the moves, the
raw bandwidth of the same number of streams is measured with `godwit linktest` in the same run,
so the figures that matter are ratios:

    efficiency = total time / (bytes sent / raw bandwidth)     (1.0 = as fast as the link)

with the raw bandwidth measured twice: on the idle host, and while the workload's guest runs
(its vCPU takes a core of a small host, as it would during the migration).

and the pause, both as Godwit measured it (source pause to destination running) and as the
guest saw it (its own largest stall, and the longest heartbeat gap less one period).

Usage (root, after `cargo build --release`):  python3 benches/e2e.py [--quick]
"""

import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GODWIT = os.path.join(REPO, "target", "release", "godwit")
LAB = "gwbench"
SUBNET = "60"
HB_MS = 20

WORKLOADS = [
    ("idle", "mode=dirty fill=1 rate_mbps=1"),
    ("dirty 64 MiB/s", "mode=dirty fill=1 rate_mbps=64"),
    ("dirty 256 MiB/s", "mode=dirty fill=1 rate_mbps=256"),
]
SETTINGS = [(1, "off"), (1, "on"), (4, "off"), (4, "on")]


def lab(*args):
    env = dict(os.environ, LAB_SUBNET=SUBNET)
    return subprocess.run(["bash", os.path.join(REPO, "ci", "lab.sh"), *args], env=env,
                          check=True, capture_output=True, text=True)


def addr(h):
    return f"10.77.{SUBNET}.{1 if h == 'a' else 2}"


def on(h, *args):
    return ["ip", "netns", "exec", f"{LAB}-{h}", GODWIT, *args]


def wait(cond, timeout, what):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def hb_lines(logs):
    out = []
    for p in logs:
        try:
            text = open(p).read()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            if "] hb " not in line:
                continue
            t = float(line[1:line.index("]")])
            fields = dict(w.split("=", 1) for w in line.split("] hb ")[1].split() if "=" in w)
            out.append((t, int(fields["seq"]), int(fields["pass"]), int(fields["stall_us"])))
    return sorted(out)


def linktest(streams, work, key=None):
    """Bytes per second of `streams` TCP streams; sealed as a migration's are when `key` is given."""
    sealed = ["--key", key] if key else []
    rx = subprocess.Popen(on("b", "linktest", "--listen", f"{addr('b')}:7100", "--json", *sealed),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(0.3)
    tx = subprocess.run(on("a", "linktest", "--to", f"{addr('b')}:7100", "--streams", str(streams),
                           "--duration", "2s", "--json", *sealed), capture_output=True, text=True, timeout=30)
    out = json.loads(rx.communicate(timeout=30)[0])
    if tx.returncode != 0:
        raise SystemExit(f"linktest failed: {tx.stderr}")
    return out["bytes_per_sec"]


def main():
    quick = "--quick" in sys.argv
    workloads = WORKLOADS[:1] if quick else WORKLOADS
    settings = SETTINGS[:2] if quick else SETTINGS
    lab("up", LAB)
    procs = []
    try:
        work = tempfile.mkdtemp(prefix="godwit-bench-")
        key = os.path.join(work, "key")
        subprocess.run([GODWIT, "key", "new", key], check=True, stdout=subprocess.DEVNULL)
        # Migrations seal their TCP streams (AES-256-GCM), so the baseline they are held to is
        # the same streams sealed; the plaintext figure shows what encryption costs.
        plain = {s: linktest(s, work) for s in sorted({s for s, _ in settings})}
        raw = {s: linktest(s, work, key) for s in plain}
        for s in plain:
            print(f"TCP bandwidth, {s} stream(s): {plain[s] * 8 / 1e9:.2f} Gb/s plaintext, "
                  f"{raw[s] * 8 / 1e9:.2f} Gb/s sealed ({raw[s] / plain[s]:.2f}x)", flush=True)
        rows = []
        n = 0
        for name, cmdline in workloads:
            n += 1
            api = os.path.join(work, f"vm{n}-0.sock")
            logs = [os.path.join(work, f"serial{n}-0.log")]
            vm = subprocess.Popen(on("a", "run", "--guest", "dirtier", "--memory", "1G", "--cmdline",
                                     f"{cmdline} hb_ms={HB_MS}", "--api", api, "--serial", logs[0]),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(vm)
            print(f"\n{name}: booting a 1 GiB guest and populating its memory ...", flush=True)
            wait(lambda: any(p >= 2 for _, _, p, _ in hb_lines(logs)), 120, "the guest to fill its memory")
            # The same streams, measured while this guest runs: on a small host the guest's
            # vCPU competes with the migration for CPU, and the baseline should see that too.
            loaded = {s: linktest(s, work, key) for s in raw}
            for s, bw in loaded.items():
                print(f"  sealed TCP bandwidth with this guest running, {s} stream(s): {bw * 8 / 1e9:.2f} Gb/s", flush=True)
            host = "a"
            for i, (streams, compress) in enumerate(settings):
                to = "b" if host == "a" else "a"
                next_api = os.path.join(work, f"vm{n}-{i + 1}.sock")
                logs.append(os.path.join(work, f"serial{n}-{i + 1}.log"))
                rx = subprocess.Popen(on(to, "receive", "--listen", f"{addr(to)}:7000", "--api", next_api,
                                         "--serial", logs[-1], "--key", key, "--id", f"b{n}-{i}"),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(rx)
                time.sleep(0.3)
                t0 = time.time()
                out = subprocess.run(on(host, "send", "--api", api, "--to", f"{addr(to)}:7000", "--json",
                                        "--key", key, "--id", f"b{n}-{i}",
                                        "--streams", str(streams), "--threads", "2", "--compress", compress),
                                     capture_output=True, text=True, timeout=300)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if r["outcome"] != "completed":
                    raise SystemExit(f"{name}: migration failed: {r.get('error')}")
                wait(lambda: os.path.exists(next_api), 10, "the destination's API")
                time.sleep(0.5)
                after = [x for x in hb_lines(logs) if x[0] >= t0]
                gaps = [b[0] - a[0] for a, b in zip(after, after[1:])]
                stall_ms = max((x[3] for x in after), default=0) / 1e3
                gap_ms = (max(gaps, default=0) * 1e3) - HB_MS
                secs = r["total_ms"] / 1e3
                rows.append((name, streams, compress, r["total_ms"], r["downtime_ms"], stall_ms, gap_ms,
                             r["bytes_sent"] / 2**20, r["rounds"], r["compression_ratio"],
                             secs / (r["bytes_sent"] / raw[streams]),
                             secs / (r["bytes_sent"] / loaded[streams])))
                api, host = next_api, to
                print("  moved with %d stream(s), compression %s: %.0f ms total, %.2f ms downtime" %
                      (streams, compress, r["total_ms"], r["downtime_ms"]), flush=True)
            subprocess.run(on(host, "stop", "--api", api), capture_output=True, timeout=30)
            health = subprocess.run([GODWIT, "heartbeat", *logs], capture_output=True, text=True)
            print("  guest after all moves:", "healthy" if health.returncode == 0 else "NOT HEALTHY\n" + health.stdout)
        print("\n| workload | streams | lz4 | total ms | downtime ms | guest stall ms | hb gap-period ms "
              "| MiB sent | rounds | lz4 ratio | total / (bytes / sealed bw, idle host) "
              "| total / (bytes / sealed bw, guest running) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            print("| %s | %d | %s | %.0f | %.2f | %.2f | %.1f | %.1f | %d | %.2f | %.2f | %.2f |" % row)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        lab("down", LAB)


if __name__ == "__main__":
    main()
