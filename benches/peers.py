#!/usr/bin/env python3
"""Peer comparison: the same test guest migrated by QEMU's own live migration and by Godwit.

One run boots the same PVH test guest (`godwit export-guest`) at the same memory size under
QEMU and under Godwit and migrates it over loopback, both engines capped at the same bandwidth
(the "link"), for three workloads of the guest's dirtier: near idle, a moderate rate below the
link, and a rate twice the link. QEMU runs with its defaults, with multifd (4 channels), and
with multifd plus auto-converge; in the tuned rows QEMU's downtime-limit equals Godwit's
--max-downtime. Each migration gets the same deadline, after which it is cancelled and
reported as "did not converge".

For each (engine/setting, workload) the script prints total time, the engine's downtime, the
pause the guest saw (its heartbeat gap, stamped with host time), bytes sent, the guest's
achieved dirty rate, and the guest's own verdict on its memory after the move; then Godwit's
ratios to each QEMU setting. Every setting, and what differs between the engines (QEMU runs
under TCG here, Godwit on KVM), is printed with the table.

QEMU is Debian's qemu-system-x86 (apt-get install -y qemu-system-x86). Usage, as root, after
`cargo build --release` (GODWIT=path, or CARGO_TARGET_DIR, finds the binary):

    nice -n 10 python3 benches/peers.py            # ~8 minutes: 256 MiB guest, 60 s deadline
    nice -n 10 python3 benches/peers.py --quick    # ~3 minutes: 128 MiB guest, 15 s deadline
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
GODWIT = os.environ.get("GODWIT", os.path.join(TARGET, "release", "godwit"))
QEMU = "qemu-system-x86_64"

MIB = 1 << 20
HB_MS = 20                 # the guest's heartbeat period
LINK_MIB = 64              # bandwidth cap on both engines, MiB/s
MAX_DOWNTIME_MS = 50       # Godwit's --max-downtime, and QEMU's downtime-limit when tuned
MULTIFD_CHANNELS = 4

# (name, the guest's rate_mbps): the guest rewrites whole pages of its working set at this rate.
WORKLOADS = [
    ("idle", 4),
    ("moderate", LINK_MIB // 4),
    ("faster than link", LINK_MIB * 2),
]
SIZES = {
    # guest RAM, working set, per-migration deadline
    "full": {"mem_mib": 256, "wss_mb": 128, "deadline": 60.0},
    "quick": {"mem_mib": 128, "wss_mb": 32, "deadline": 15.0},
}

# QEMU settings: (label, capabilities to turn on, parameters). max-bandwidth is added to all.
QEMU_SETTINGS = [
    ("QEMU defaults", {}, {}),
    ("QEMU multifd", {"multifd": True},
     {"multifd-channels": MULTIFD_CHANNELS, "downtime-limit": MAX_DOWNTIME_MS}),
    ("QEMU multifd+auto-converge", {"multifd": True, "auto-converge": True},
     {"multifd-channels": MULTIFD_CHANNELS, "downtime-limit": MAX_DOWNTIME_MS}),
]
GODWIT_LABEL = "Godwit"
# Godwit settings: (label, extra `godwit send` arguments); pre-copy alone, with throttling
# allowed (the counterpart of QEMU's auto-converge), and with post-copy allowed.
GODWIT_SETTINGS = [
    (GODWIT_LABEL, []),
    (f"{GODWIT_LABEL} --allow-throttle", ["--allow-throttle"]),
    (f"{GODWIT_LABEL} --allow-postcopy", ["--allow-postcopy"]),
]
# --deadline is set per size (the same deadline QEMU gets).
GODWIT_SEND_ARGS = ["--no-encrypt", "--transport", "tcp", "--max-bandwidth", f"{LINK_MIB}M",
                    "--max-downtime", f"{MAX_DOWNTIME_MS}ms"]

PROCS = []                 # every process this script started, killed by PID at the end


class RunError(Exception):
    """An engine misbehaved in one migration (crashed, timed out): reported in its row."""


def spawn(args, **kw):
    p = subprocess.Popen(args, **kw)
    PROCS.append(p)
    return p


def end(p, grace=5.0):
    """Ends one process this script started: it may already be on its way out."""
    if p.poll() is None:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def kill_all():
    for p in PROCS:
        if p.poll() is None:
            p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"warning: process {p.pid} did not die", file=sys.stderr)


def wait_for(cond, timeout, what, step=0.05):
    deadline = time.time() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.time() > deadline:
            raise RunError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def godwit(*args, timeout=30):
    return subprocess.run([GODWIT, *args], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# The guest's serial logs: "[host secs] text" lines, as Godwit's --serial writes them.

def read_log(path):
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = re.match(r"\[(\d+\.\d+)\] (.*)", line)
                if m:
                    out.append((float(m.group(1)), m.group(2)))
    except FileNotFoundError:
        pass
    return out


def heartbeats(paths):
    """(time, seq, pass, stall_us) of every heartbeat in these logs, in time order."""
    out = []
    for p in paths:
        for t, text in read_log(p):
            if text.startswith("hb "):
                f = dict(w.split("=", 1) for w in text.split() if "=" in w)
                try:
                    out.append((t, int(f["seq"]), int(f["pass"]), int(f["stall_us"])))
                except (KeyError, ValueError):
                    pass
    return sorted(out)


def pass_starts(hbs):
    """(pass, time of its first heartbeat) for each pass the heartbeats show starting."""
    out = []
    for t, _, p, _ in hbs:
        if not out or p > out[-1][0]:
            out.append((p, t))
    return out


def achieved_rate(hbs, wss_mb, t_from, t_to, last=False):
    """MiB/s the guest dirtied in [t_from, t_to], from the passes that started in it (pass 1,
    the unpaced fill, excluded), or in the last whole pass of it; None under one whole pass."""
    starts = [(p, t) for p, t in pass_starts(hbs) if p >= 2 and t_from <= t <= t_to]
    if len(starts) < 2:
        return None
    (p0, t0), (p1, t1) = starts[-2 if last else 0], starts[-1]
    return wss_mb * (p1 - p0) / (t1 - t0)


class SerialTap(threading.Thread):
    """Stamps each line of a QEMU's serial output (its stdout) with host time, as Godwit's
    --serial log does, so that the same analysis (and `godwit heartbeat`) reads both engines'
    logs. A line the source QEMU left unfinished when it stopped is completed by the
    destination's first output, as one console would show it."""

    def __init__(self, stream, path, before=None):
        super().__init__(daemon=True)
        self.stream, self.path, self.before = stream, path, before
        self.lock = threading.Lock()
        self.tail = b""

    def take_tail(self):
        with self.lock:
            t, self.tail = self.tail, b""
            return t

    def run(self):
        fd = self.stream.fileno()
        first = True
        with open(self.path, "w") as out:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                now = time.time()
                if first and self.before is not None:
                    chunk = self.before.take_tail() + chunk
                first = False
                with self.lock:
                    buf = self.tail + chunk
                    *lines, self.tail = buf.split(b"\n")
                for line in lines:
                    out.write(f"[{now:.6f}] {line.decode(errors='replace').rstrip()}\n")
                out.flush()


# ---------------------------------------------------------------------------------------------
# QEMU

class Qmp:
    """A minimal QMP client on a Unix socket; every read is bounded."""

    def __init__(self, path, timeout=15.0):
        def connect():
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                return s
            except OSError:
                s.close()
                return None
        self.sock = wait_for(connect, timeout, f"QMP socket {path}")
        self.sock.settimeout(15)
        self.f = self.sock.makefile("rwb")
        self._read()                                  # the greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line:
            raise RunError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        for _ in range(1000):                          # skip asynchronous events
            r = self._read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RunError(f"QMP {name}: {r['error'].get('desc')}")
        raise RunError(f"QMP {name}: no answer among 1000 events")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def qemu_mem_kib(mem_mib):
    # QEMU 7.2 under TCG loses dirty pages when RAM is a multiple of 256 KiB (fixed upstream
    # in Feb 2024): 8 KiB more keeps it off that multiple.
    return mem_mib * 1024 + 8


def qemu_args(elf, cmdline, mem_mib, qmp_path, accel="tcg", cpu="qemu64"):
    return [QEMU, "-nodefaults", "-accel", accel, "-cpu", cpu, "-m", f"{qemu_mem_kib(mem_mib)}K",
            "-display", "none", "-no-reboot", "-kernel", elf, "-append", cmdline,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-serial", "stdio",
            "-monitor", "none", "-net", "none", "-qmp", f"unix:{qmp_path},server=on,wait=off"]


def qemu_kvm_probe(work, elf):
    """Whether QEMU runs the guest on KVM here, and what it said."""
    try:
        r = subprocess.run([*qemu_args(elf, "wss_mb=16 passes=1 hb_ms=1000", 64,
                                       os.path.join(work, "probe.qmp"), accel="kvm", cpu="host")],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "did not finish within 20 s"
    if r.returncode == 1:
        return "works (the guest passed)"
    first = (r.stderr.strip().splitlines() or ["(no message)"])[0]
    return f"fails: {first}"


def host_tsc_khz():
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        log = ""
    for pat in (r"Refined TSC clocksource calibration: (\d+\.\d+) MHz",
                r"tsc: Detected (\d+\.\d+) MHz processor"):
        m = re.findall(pat, log)
        if m:
            return round(float(m[-1]) * 1000), "dmesg"
    with open("/proc/cpuinfo") as f:
        m = re.search(r"cpu MHz\s*:\s*(\d+\.\d+)", f.read())
    return round(float(m.group(1)) * 1000), "/proc/cpuinfo"


class QemuVm:
    def __init__(self, work, tag, elf, cmdline, mem_mib, incoming=False, tap_before=None):
        self.qmp_path = os.path.join(work, f"{tag}.qmp")
        self.log = os.path.join(work, f"{tag}.serial.log")
        self.err = open(os.path.join(work, f"{tag}.stderr"), "w")
        args = qemu_args(elf, cmdline, mem_mib, self.qmp_path)
        if incoming:
            args += ["-incoming", "defer"]
        self.proc = spawn(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.err)
        self.tap = SerialTap(self.proc.stdout, self.log, tap_before)
        self.tap.start()
        self.qmp = Qmp(self.qmp_path)

    def configure(self, caps, params):
        if caps:
            self.qmp.cmd("migrate-set-capabilities", capabilities=[
                {"capability": c, "state": v} for c, v in caps.items()])
        if params:
            self.qmp.cmd("migrate-set-parameters", **params)

    def settings(self):
        caps = [c["capability"] for c in self.qmp.cmd("query-migrate-capabilities") if c["state"]]
        return caps, self.qmp.cmd("query-migrate-parameters")

    def stop(self):
        try:
            self.qmp.cmd("quit")
        except (RunError, OSError, ValueError):
            pass
        self.qmp.close()
        end(self.proc)
        self.tap.join(timeout=5)
        self.err.close()


# ---------------------------------------------------------------------------------------------
# One migration, either engine

def guest_cmdline(wss_mb, rate, tsc_khz=None):
    # catchup=0: the guest dirties memory as it computes, so throttling its vCPUs (QEMU's
    # auto-converge, Godwit's --allow-throttle) slows its writes on either engine.
    c = f"mode=dirty fill=1 catchup=0 wss_mb={wss_mb} rate_mbps={rate} hb_ms={HB_MS}"
    return c + (f" tsc_khz={tsc_khz}" if tsc_khz else "")


def settle(src_log, wss_mb, rate):
    """Waits until the guest filled its working set, then long enough to measure its dirty
    rate (one paced pass, when that takes at most 12 s); returns the fill time, the boot line
    and the rate to expect (the measured one where lower than the target)."""
    boot = wait_for(lambda: next((x for _, x in read_log(src_log)
                                  if x.startswith(("godwit-guest boot", "ERR", "EXC"))), None),
                    60, "the guest to boot")
    if not boot.startswith("godwit-guest boot"):
        raise RunError(f"the guest did not start: {boot}")
    t_fill = wait_for(lambda: next((t for t, _, p, _ in heartbeats([src_log]) if p >= 2), None),
                      120, "the guest to fill its working set")
    pass_s = wss_mb / rate
    window = max(3.0, 1.1 * pass_s + 0.3) if pass_s <= 12 else 3.0
    time.sleep(max(0.0, t_fill + window - time.time()))
    measured = achieved_rate(heartbeats([src_log]), wss_mb, t_fill, time.time())
    return t_fill, boot, min(rate, measured or rate)


def verify(dst_log, logs, t_from, wss_mb, rate):
    """Waits until the guest has rewritten (and so checked) its whole working set after
    t_from, bounded; returns (fraction of the working set re-checked, heartbeat summary)."""
    pass_s = wss_mb / rate
    first = wait_for(lambda: next((h for h in heartbeats([dst_log]) if h[0] >= t_from), None),
                     15, "the guest's first heartbeat after the move")
    t1, r = first[0], first[2]

    def checked():
        hb = [h for h in heartbeats([dst_log]) if h[0] >= t1]
        top = max((h[2] for h in hb), default=r)
        elapsed = time.time() - t1
        return top >= r + 2 or (top >= r + 1 and elapsed >= 1.15 * pass_s + 2 * HB_MS / 1e3)

    deadline = time.time() + 2.2 * pass_s + 5
    while not checked() and time.time() < deadline:
        time.sleep(0.1)
    frac = 1.0 if checked() else min(1.0, (time.time() - t1) / pass_s)
    hb = godwit("heartbeat", "--json", *logs)
    try:
        summary = json.loads(hb.stdout)
    except ValueError:
        raise RunError(f"godwit heartbeat failed: {hb.stderr.strip()}")
    return frac, summary


def guest_view(src_log, dst_log, wss_mb, t_fill, t0, t_end, completed):
    """What the guest's heartbeats show before and during the move."""
    src, dst = heartbeats([src_log]), heartbeats([dst_log])
    both = sorted(src + dst)

    def worst_gap_ms(hb):
        gaps = [b[0] - a[0] for a, b in zip(hb, hb[1:])]
        return max(gaps) * 1e3 - HB_MS if gaps else None

    before = [h for h in src if t_fill <= h[0] < t0]
    during = [h for h in both if t0 <= h[0] <= t_end + 0.5]
    # The switchover pause as the guest lived it, from outside (the silence between its last
    # heartbeat on the source and its first on the destination, less one period) and from
    # inside (the stall its own clock saw, reported by that first heartbeat). The guest's
    # heartbeats are timed by its TSC: where the TSC stops with the VM (QEMU under TCG), the
    # silence is the whole pause and the guest's clock sees none of it; where it runs on
    # (KVM), the guest's clock sees the whole pause and the silence may hide up to a period.
    # The larger of the two is the pause, on either engine.
    outside = inside = None
    if completed and dst:
        last_src = [h for h in src if h[0] <= dst[0][0]]
        if last_src:
            outside = max(0.0, (dst[0][0] - last_src[-1][0]) * 1e3 - HB_MS)
            inside = dst[0][3] / 1e3
    return {
        "rate_before": achieved_rate(src, wss_mb, t_fill, t0),
        "rate_during": achieved_rate(src, wss_mb, t0, t_end),
        "rate_last": achieved_rate(src, wss_mb, t0, t_end, last=True),
        "stall_before_ms": max((h[3] for h in before), default=0) / 1e3,
        "stall_during_ms": max((h[3] for h in during), default=0) / 1e3,
        "gap_before_ms": worst_gap_ms(before),
        "gap_during_ms": worst_gap_ms([h for h in both if t0 - 0.2 <= h[0] <= t_end + 0.5]),
        "pause_ms": None if outside is None else max(outside, inside),
        "pause_outside_ms": outside,
        "pause_inside_ms": inside,
    }


def run_qemu(work, n, elf, setting, wss_mb, rate, size, tsc_khz):
    label, caps, params = setting
    params = dict(params, **{"max-bandwidth": LINK_MIB * MIB})
    cmdline = guest_cmdline(wss_mb, rate, tsc_khz)
    src = QemuVm(work, f"m{n}-src", elf, cmdline, size["mem_mib"])
    dst = None
    try:
        src.configure(caps, params)
        shown = src.settings()
        t_fill, boot, pace = settle(src.log, wss_mb, rate)
        dst = QemuVm(work, f"m{n}-dst", elf, cmdline, size["mem_mib"], incoming=True,
                     tap_before=src.tap)
        dst.configure({c: v for c, v in caps.items() if c == "multifd"},
                      {k: v for k, v in params.items() if k == "multifd-channels"})
        port = free_port()
        dst.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        t0 = time.time()
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        last = {}
        outcome = None
        while outcome is None:
            time.sleep(0.1)
            info = src.qmp.cmd("query-migrate")
            last = info if "ram" in info else last
            status = info.get("status")
            if status == "completed":
                outcome, last = "completed", info
            elif status == "failed":
                raise RunError(f"QEMU migration failed: {info.get('error-desc', '?')}")
            elif time.time() - t0 > size["deadline"]:
                src.qmp.cmd("migrate_cancel")
                wait_for(lambda: src.qmp.cmd("query-migrate").get("status") == "cancelled",
                         30, "QEMU to cancel the migration", step=0.1)
                outcome = "did not converge"
        t_end = time.time()
        ram = last.get("ram", {})
        row = {
            "outcome": outcome,
            "total_s": last.get("total-time", (t_end - t0) * 1e3) / 1e3
            if outcome == "completed" else t_end - t0,
            "downtime_ms": last.get("downtime") if outcome == "completed" else None,
            "bytes": ram.get("transferred"),
            "rounds": ram.get("dirty-sync-count"),
            "boot": boot,
            "settings": shown,
        }
        if outcome == "completed":
            st = dst.qmp.cmd("query-status")
            if st.get("status") != "running":
                raise RunError(f"QEMU destination is {st.get('status')}, not running")
            frac, summary = verify(dst.log, [src.log, dst.log], 0, wss_mb, pace)
        else:
            frac, summary = verify(src.log, [src.log, dst.log], t_end, wss_mb, pace)
        row.update(guest_view(src.log, dst.log, wss_mb, t_fill, t0, t_end,
                              outcome == "completed"))
        row.update(checked=frac, summary=summary)
        return row
    finally:
        for vm in (dst, src):
            if vm is not None:
                vm.stop()


def run_godwit(work, n, elf, extra, wss_mb, rate, size, key):
    cmdline = guest_cmdline(wss_mb, rate)
    src_api, dst_api = (os.path.join(work, f"m{n}-{s}.sock") for s in ("src", "dst"))
    src_log, dst_log = (os.path.join(work, f"m{n}-{s}.serial.log") for s in ("src", "dst"))
    files = []

    def out(name):
        f = open(os.path.join(work, f"m{n}-{name}"), "w")
        files.append(f)
        return f

    procs = []
    try:
        procs.append(spawn([GODWIT, "run", "--kernel", elf, "--memory", f"{size['mem_mib']}M",
                            "--cmdline", cmdline, "--api", src_api, "--serial", src_log],
                           stdin=subprocess.DEVNULL, stdout=out("run.out"), stderr=subprocess.STDOUT))
        wait_for(lambda: os.path.exists(src_api), 30, "godwit run's API socket")
        t_fill, boot, pace = settle(src_log, wss_mb, rate)
        port = free_port()
        mid = f"peers-{n}"
        procs.append(spawn([GODWIT, "receive", "--listen", f"127.0.0.1:{port}", "--key", key,
                            "--id", mid, "--no-encrypt", "--api", dst_api, "--serial", dst_log],
                           stdin=subprocess.DEVNULL, stdout=out("receive.out"),
                           stderr=subprocess.STDOUT))
        rx_out = files[-1].name
        wait_for(lambda: "waiting for a VM" in read_text(rx_out), 15, "godwit receive to listen")
        move = ["--api", src_api, "--to", f"127.0.0.1:{port}", "--key", key, "--id", mid,
                "--json", *GODWIT_SEND_ARGS, "--deadline", f"{size['deadline']:.0f}s", *extra]
        # The forecast first, with the same arguments: its accuracy is part of the result.
        fc = godwit("forecast", *move, "--sample", "2s", timeout=60)
        try:
            forecast = json.loads(fc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RunError(f"godwit forecast printed nothing: {fc.stderr.strip()}")
        with open(os.path.join(work, f"m{n}-forecast.json"), "w") as ff:
            ff.write(fc.stdout)
        predicted = (forecast.get("with_postcopy") or forecast.get("with_throttle")
                     or forecast["precopy"])
        report = os.path.join(work, f"m{n}-send.json")
        with open(report, "w") as rf:
            t0 = time.time()
            send = spawn([GODWIT, "send", *move],
                         stdin=subprocess.DEVNULL, stdout=rf, stderr=out("send.err"))
            procs.append(send)
            cancelled = False
            while send.poll() is None:
                time.sleep(0.1)
                if not cancelled and time.time() - t0 > size["deadline"]:
                    c = godwit("cancel", "--api", src_api)
                    if c.returncode != 0:
                        raise RunError(f"godwit cancel failed: {c.stderr.strip()}")
                    cancelled = True
                if time.time() - t0 > size["deadline"] + 30:
                    raise RunError("godwit send did not end 30 s after the deadline")
        t_end = time.time()
        try:
            with open(report) as rf:
                r = json.loads(rf.read().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RunError(f"godwit send printed no report (exit {send.returncode})")
        if r["outcome"] == "completed":
            outcome = "completed"
        elif (r["outcome"] == "cancelled" and cancelled) or (
                r["outcome"] == "failed" and "did not converge" in (r.get("error") or "")):
            outcome = "did not converge"
        else:
            raise RunError(f"godwit send: {r['outcome']}: {r.get('error')}")
        row = {
            "outcome": outcome,
            "total_s": r["total_ms"] / 1e3 if outcome == "completed" else t_end - t0,
            "downtime_ms": r["downtime_ms"] if outcome == "completed" else None,
            "bytes": r["bytes_sent"],
            "rounds": r["rounds"],
            "boot": boot,
            "compression_ratio": r.get("compression_ratio"),
            "throttle": max((d.get("throttle_percent", 0) for d in r.get("round_details", [])),
                            default=0),
            "forecast": predicted,
        }
        if outcome == "completed":
            wait_for(lambda: os.path.exists(dst_api), 10, "the destination's API socket")
            frac, summary = verify(dst_log, [src_log, dst_log], 0, wss_mb, pace)
        else:
            frac, summary = verify(src_log, [src_log, dst_log], t_end, wss_mb, pace)
        row.update(guest_view(src_log, dst_log, wss_mb, t_fill, t0, t_end,
                              outcome == "completed"))
        row.update(checked=frac, summary=summary)
        return row
    finally:
        for api in (dst_api, src_api):
            if os.path.exists(api):
                godwit("stop", "--api", api, timeout=15)
        for p in reversed(procs):
            end(p)
        for f in files:
            f.close()


# ---------------------------------------------------------------------------------------------
# Report

def verdict(row):
    s = row.get("summary")
    if s is None:
        return "-"
    bad = []
    if s["boots"] != 1:
        bad.append(f"{s['boots']} boots")
    if s["seq_breaks"]:
        bad.append(f"{len(s['seq_breaks'])} counter breaks")
    if s["errors"]:
        bad.append(f"{len(s['errors'])} errors: {s['errors'][0]}")
    if bad:
        return "NOT INTACT: " + "; ".join(bad)
    where = "after the move" if row["outcome"] == "completed" else "on the source after the cancel"
    if row["checked"] >= 1.0:
        return f"intact (whole working set re-checked {where})"
    return f"intact so far ({row['checked'] * 100:.0f}% of the working set re-checked {where})"


def fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def pause(r):
    if r.get("pause_ms") is None:
        return "-"
    return f"{r['pause_ms']:.1f} ({r['pause_outside_ms']:.1f} / {r['pause_inside_ms']:.1f})"


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def print_settings(qemu_shown, tsc, probe, size):
    print("\n## Settings\n")
    ver = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    gw = godwit("--version").stdout.strip()
    link = f"{LINK_MIB} MiB/s"
    print(f"- Engines: {ver}; {gw}. Both on loopback (127.0.0.1), one machine, 2 cores.")
    print(f"- QEMU runs the guest under TCG (`-accel tcg -cpu qemu64`): QEMU with KVM on this "
          f"machine {probe}. Godwit runs it on the machine's (nested) KVM.")
    print(f"- Guest: the same ELF (`godwit export-guest`), command line "
          f"`{guest_cmdline(size['wss_mb'], 'R')}` (R per workload; QEMU also gets "
          f"`tsc_khz={tsc[0]}` from {tsc[1]}, Godwit's guest reads CPUID 0x40000010).")
    print(f"- Guest RAM: Godwit {size['mem_mib']} MiB; QEMU `-m {qemu_mem_kib(size['mem_mib'])}K` "
          f"({size['mem_mib']} MiB + 8 KiB): Debian's QEMU 7.2 under TCG loses dirty pages in "
          "migration when RAM is a multiple of 256 KiB (fixed upstream in Feb 2024), so QEMU's "
          f"RAM is kept off that multiple. The working set ({size['wss_mb']} MiB from 16 MiB up) "
          "is the same for both and ends well below QEMU's firmware data at the top of RAM.")
    print("- CPU speed differs: TCG emulates the guest's CPU, KVM runs it natively. The guest "
          "paces its writes to rate_mbps by the TSC, so a slower CPU only matters where it cannot "
          "reach that rate: the table shows the rate each guest achieved.")
    print(f"- The link: both engines capped at {link} (QEMU `max-bandwidth={LINK_MIB * MIB}`, "
          f"Godwit `--max-bandwidth {LINK_MIB}M`). Plaintext on both: QEMU's plain TCP, Godwit "
          "`--no-encrypt` on send and receive (data streams unencrypted, still authenticated; "
          "its small control channel stays sealed).")
    print(f"- Deadline: {size['deadline']:.0f} s per migration, then QEMU `migrate_cancel` / "
          "`godwit cancel`, reported as \"did not converge\" (the VM keeps running on the source).")
    print(f"- Godwit: `godwit send {' '.join(GODWIT_SEND_ARGS)} --deadline "
          f"{size['deadline']:.0f}s` (defaults otherwise: 2 streams, 2 threads, --compress auto), "
          "and the same with --allow-throttle, and with --allow-postcopy (QEMU's post-copy is "
          "not run); each move follows a `godwit forecast` with the "
          "same arguments (2 s sample).")
    for label, (caps, params) in qemu_shown.items():
        keys = ["downtime-limit", "max-bandwidth", "multifd-channels", "cpu-throttle-initial",
                "cpu-throttle-increment", "throttle-trigger-threshold", "max-cpu-throttle",
                "announce-initial"]
        shown = ", ".join(f"{k}={params[k]}" for k in keys[:3] if k in params)
        if "auto-converge" in caps:
            shown += ", " + ", ".join(f"{k}={params[k]}" for k in keys[3:7] if k in params)
        print(f"- {label} (read back from QEMU): capabilities on: {', '.join(caps) or 'none'}; {shown}.")
    print("- Downtime: the engine's own figure (QEMU `downtime`: from stopping the source to the "
          "end of sending, as QEMU's source measures it, without the destination's load and start; "
          "Godwit `downtime_ms`: from pausing on the source until the destination confirmed it "
          "runs), and the switchover pause as the guest lived it, measured alike for both: from "
          "outside, the silence between its last heartbeat on the source and its first on the "
          f"destination (lines stamped with host time as they arrive), less one period ({HB_MS} ms); "
          "from inside, the longest gap its own clock (TSC) saw, as that first heartbeat reports "
          "it. The pause is the larger: under TCG the guest's TSC is QEMU's tick counter, which "
          "stops while the VM is stopped, so the QEMU guest's clock misses the pause and only the "
          "silence shows it; under KVM the TSC runs on, so Godwit's guest clock sees all of it "
          "while the silence may hide up to one period.")
    print("- Worst heartbeat gap (less one period) and the guest's own stall, before and during the "
          "move: the noise floor (TCG, host scheduling on this 2-core machine) and any hiccup "
          "during the move, e.g. when the engine starts dirty tracking or throttles the guest.")
    print("- MiB/s sent: bytes sent over total time (each engine's own rate limiter against the "
          "same cap). Rounds: Godwit's pre-copy rounds including the last; QEMU's dirty-bitmap "
          "syncs (`dirty-sync-count`).")
    print("- Guest dirty rate: from the passes over its working set that started before the move "
          "(\"-\" where one pass takes longer than the window) and during it: their mean, and the "
          "last whole pass before the move ended (where a throttled guest slows down).")
    print("- Memory check: the guest verifies every page it rewrites (lost and torn pages, "
          "registers, TSC); after the move the script waits until it has rewritten its whole "
          "working set (bounded), then reads both hosts' serial logs with `godwit heartbeat` "
          "(QEMU's serial output is stamped with host time by this script in the same format).")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller guest, shorter deadline")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="run only the rows whose 'engine / workload' contains TEXT (repeatable)")
    args = ap.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    if os.geteuid() != 0:
        raise SystemExit("run as root (KVM, and Godwit's guest memory)")
    if not os.path.exists(GODWIT):
        raise SystemExit(f"{GODWIT} not found: cargo build --release (or set GODWIT=)")
    if subprocess.run(["which", QEMU], capture_output=True).returncode != 0:
        raise SystemExit(f"{QEMU} not found: apt-get install -y qemu-system-x86")
    # A TERM ends the run like an interrupt: through the cleanup that kills what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    load_start = os.getloadavg()
    work = tempfile.mkdtemp(prefix="godwit-peers-")
    elf = os.path.join(work, "testguest.elf")
    key = os.path.join(work, "key")
    rows = []
    qemu_shown = {}
    try:
        if godwit("export-guest", elf).returncode != 0:
            raise SystemExit("godwit export-guest failed")
        if godwit("key", "new", key).returncode != 0:
            raise SystemExit("godwit key new failed")
        tsc = host_tsc_khz()
        probe = qemu_kvm_probe(work, elf)
        print(f"QEMU with KVM here: {probe}; QEMU runs under TCG in this benchmark.", flush=True)
        print(f"Guest {size['mem_mib']} MiB, working set {size['wss_mb']} MiB, link cap "
              f"{LINK_MIB} MiB/s, deadline {size['deadline']:.0f} s; logs in {work}", flush=True)
        n = 0
        for wname, rate in WORKLOADS:
            engines = [(s[0], s) for s in QEMU_SETTINGS] + [(g[0], g) for g in GODWIT_SETTINGS]
            for label, setting in engines:
                if args.only and not any(o in f"{label} / {wname}" for o in args.only):
                    continue
                n += 1
                print(f"[{time.time() - started:5.0f} s] {label}, {wname} ({rate} MiB/s) ...",
                      end=" ", flush=True)
                try:
                    if label.startswith(GODWIT_LABEL):
                        row = run_godwit(work, n, elf, setting[1], size["wss_mb"], rate, size, key)
                    else:
                        row = run_qemu(work, n, elf, setting, size["wss_mb"], rate, size, tsc[0])
                        qemu_shown.setdefault(label, row["settings"])
                except RunError as e:
                    row = {"outcome": f"error: {e}"}
                row.update(engine=label, workload=wname, rate=rate)
                rows.append(row)
                print(row["outcome"], fmt(row.get("total_s"), ".1f"), "s", flush=True)
    finally:
        kill_all()

    print_settings(qemu_shown, tsc, probe, size)
    print("\n## Results\n")
    print("| engine / setting | workload (guest's target) | outcome | total s | downtime ms (engine) "
          "| switchover pause ms as the guest saw it (from outside / own clock) "
          "| worst heartbeat gap ms before / during | guest's own stall ms before / during "
          "| MiB sent | MiB/s sent | rounds | guest dirty MiB/s before / during: mean, last pass "
          "| memory check (guest's own) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = None if r.get("bytes") is None else r["bytes"] / MIB
        print(f"| {r['engine']} | {r['workload']} ({r['rate']} MiB/s) | {r['outcome']} "
              f"| {fmt(r.get('total_s'), '.2f')} | {fmt(r.get('downtime_ms'), '.1f')} "
              f"| {pause(r)} "
              f"| {fmt(r.get('gap_before_ms'), '.0f')} / {fmt(r.get('gap_during_ms'), '.0f')} "
              f"| {fmt(r.get('stall_before_ms'), '.1f')} / {fmt(r.get('stall_during_ms'), '.1f')} "
              f"| {fmt(mib, '.1f')} | {fmt(mib and mib / r['total_s'], '.1f')} "
              f"| {fmt(r.get('rounds'), 'd')} | {fmt(r.get('rate_before'), '.0f')} / "
              f"{fmt(r.get('rate_during'), '.0f')}, {fmt(r.get('rate_last'), '.0f')} "
              f"| {verdict(r)} |")

    for engine, label in (("QEMU", "QEMU's guest (TCG)"), (GODWIT_LABEL, "Godwit's guest (KVM)")):
        for key, when in (("rate_before", "before the move"), ("rate_during", "during it")):
            got = [(r[key] / r["rate"], r["workload"]) for r in rows
                   if r["engine"].startswith(engine) and r.get(key) is not None]
            if got:
                lo = min(got)
                print(f"\n{label} reached at least {lo[0] * 100:.0f}% of its target dirty rate "
                      f"{when} (lowest: {lo[1]}), over {len(got)} measured row(s).", end="")
    print()

    print("\n## Godwit / QEMU\n")
    print("Ratios of Godwit's figure to QEMU's (below 1: Godwit smaller), where both completed.\n")
    print("| workload | against | total time | downtime (engine) | guest pause | bytes sent |")
    print("|---|---|---|---|---|---|")
    by = {(r["engine"], r["workload"]): r for r in rows}
    pairs = [(GODWIT_LABEL, label) for label, _, _ in QEMU_SETTINGS[:2]] + [
        (GODWIT_SETTINGS[1][0], QEMU_SETTINGS[2][0])]
    for wname, _ in WORKLOADS:
        for glabel, label in pairs:
            g, q = by.get((glabel, wname)), by.get((label, wname))
            if g is None or q is None:
                continue
            against = f"{glabel} / {label}"
            if g["outcome"] == q["outcome"] == "completed":
                print(f"| {wname} | {against} | {ratio(g['total_s'], q['total_s'])} "
                      f"| {ratio(g['downtime_ms'], q['downtime_ms'])} "
                      f"| {ratio(g['pause_ms'], q['pause_ms'])} | {ratio(g['bytes'], q['bytes'])} |")
            else:
                print(f"| {wname} | {against} | Godwit: {g['outcome']}; QEMU: {q['outcome']} "
                      "| - | - | - |")
    ratios = [f"{r['engine']}, {r['workload']}: {r['compression_ratio']:.2f}" for r in rows
              if r["engine"].startswith(GODWIT_LABEL) and r.get("compression_ratio") is not None]
    if ratios:
        print(f"\nGodwit's lz4 compression ratio (--compress auto): {'; '.join(ratios)}")

    print("\n## Godwit's forecast against what happened\n")
    print("`godwit forecast` ran just before each Godwit move with the same arguments; ratio = "
          "forecast / measured (1.00 = exact).\n")
    print("| setting | workload | forecast | measured | total time (ratio) | downtime ms (ratio) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        f = r.get("forecast")
        if f is None:
            continue
        said = "converges" if f["converges"] else "does not converge"
        total = (f"{f['total_ms'] / 1e3:.2f} s / {r['total_s']:.2f} s "
                 f"({ratio(f['total_ms'] / 1e3, r['total_s'])})")
        down = (f"{f['downtime_ms']:.1f} / {fmt(r.get('downtime_ms'), '.1f')} "
                f"({ratio(f['downtime_ms'], r.get('downtime_ms'))})"
                if f["converges"] and r.get("downtime_ms") else "-")
        print(f"| {r['engine']} | {r['workload']} | {said} | {r['outcome']} | {total} | {down} |")
    load_end = os.getloadavg()
    print(f"\nRun time {time.time() - started:.0f} s; host load average (1/5/15 min) at start "
          f"{'/'.join(f'{x:.1f}' for x in load_start)}, at end {'/'.join(f'{x:.1f}' for x in load_end)} "
          f"(2 cores; other work on the machine slows both engines); logs in {work}")


if __name__ == "__main__":
    main()
