//! Faults at every phase of a migration over TCP, on real KVM between two hosts (network
//! namespaces): the receiver killed, the source's VM process killed, the link cut (veth
//! down) and the link stalled (a firewall rule that drops every TCP packet), each while the
//! migration holds in the handshake, pre-copy round 1, round 2, the stop-and-copy pause, or
//! the confirmation (the destination has the commit but has not resumed the guest).
//!
//! Every case must end as the README's fault table says: the VM runs on exactly one host
//! with its memory intact by the guest's own check (or, where the source's own process
//! died before the commit, nowhere, since a VM dies with its process), the error says what
//! happened, and a retry succeeds. The holds come from `GODWIT_HOLD` (see
//! `src/migration/faults.rs`), so each fault lands inside its phase.
//!
//! The same matrix runs over RDMA inside the soft-RoCE lab VM (`ci/rdmalab/test.sh`; see
//! `tests/common/mod.rs`), where the link is the VM's veth under rxe0.

mod common;

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{
    guest, run_bounded, scaled, wait_checked, wait_for, wait_listening, Lab, VmProcess, Wire,
    SERIAL,
};

/// How long the hold lasts; the fault lands about a second into it.
const HOLD_MS: u64 = 4000;
/// The source's wait for each answer, and the receiver's for the source (before
/// [`scaled`]): short, so a cut link is noticed in seconds, but longer than a hold, so only
/// the fault fails a migration.
const TIMEOUT: Duration = Duration::from_secs(6);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    KillReceiver,
    KillSource,
    Cut,
    Stall,
    /// Not a fault but the operator: `godwit cancel`.
    Cancel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Handshake,
    Round1,
    Round2,
    Paused,
    Confirm,
}

const PHASES: [Phase; 5] = [
    Phase::Handshake,
    Phase::Round1,
    Phase::Round2,
    Phase::Paused,
    Phase::Confirm,
];

impl Phase {
    /// The hold point and whether the destination holds there (else the source).
    fn hold(self) -> (&'static str, bool) {
        match self {
            Phase::Handshake => ("source-handshake", false),
            Phase::Round1 => ("source-round-1", false),
            Phase::Round2 => ("source-round-2", false),
            Phase::Paused => ("source-paused", false),
            Phase::Confirm => ("destination-commit", true),
        }
    }
}

/// Where the VM ended up.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The migration failed and the VM runs on the source.
    Source,
    /// The destination runs it; the source is paused in doubt and must be stopped.
    DestinationSourceInDoubt,
    /// Nobody runs it, the source is paused in doubt and must be resumed.
    SourceInDoubt,
    /// The destination runs it (the source's process died after the commit).
    Destination,
    /// The VM died with its source process before the commit; the destination never ran it.
    Lost,
}

/// What the README's fault table promises for `fault` in `phase`.
fn expected(fault: Fault, phase: Phase) -> Outcome {
    match (fault, phase) {
        (Fault::KillSource | Fault::Cancel, Phase::Confirm) => Outcome::Destination,
        (Fault::KillSource, _) => Outcome::Lost,
        (Fault::KillReceiver, Phase::Confirm) => Outcome::SourceInDoubt,
        (Fault::Cut | Fault::Stall, Phase::Confirm) => Outcome::DestinationSourceInDoubt,
        _ => Outcome::Source,
    }
}

/// The network between the two hosts, broken and mended.
fn break_link(lab: &Lab, fault: Fault) {
    match fault {
        Fault::Cut => lab.set_link(false),
        Fault::Stall => lab.set_stall(true),
        _ => {}
    }
}

fn mend_link(lab: &Lab, fault: Fault) {
    match fault {
        Fault::Cut => lab.set_link(true),
        Fault::Stall => lab.set_stall(false),
        _ => {}
    }
}

/// `godwit status` of the VM behind `api` on host `h`, or None when nothing answers.
fn state(lab: &Lab, h: char, api: &str) -> Option<String> {
    let out = run_bounded(
        lab.godwit(h, &["status", "--api", api]),
        Duration::from_secs(10),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v["state"].as_str()?.to_string())
}

/// A running `godwit send`, its JSON report going to a file.
struct Send {
    child: Child,
    out: String,
}

impl Send {
    fn start(lab: &Lab, from: &VmProcess, to: char, n: usize, extra: &[&str]) -> Send {
        let out = lab.path(&format!("send-{n}.json"));
        let child = lab
            .send_command(from, to, n, extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("godwit send");
        Send { child, out }
    }

    /// Waits for the report; `Null` when the VM's process died before it could write one.
    fn report(mut self) -> serde_json::Value {
        let deadline = Instant::now() + scaled(common::MOVE_TIMEOUT);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "godwit send did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&self.out).unwrap();
        serde_json::from_str(text.lines().last().unwrap_or_default())
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Send {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One case of the matrix, on a fresh VM; returns the row for the table.
fn case(lab: &Lab, k: usize, fault: Fault, phase: Phase) -> String {
    let (point, on_destination) = phase.hold();
    let hold = format!("{point}:{HOLD_MS}");
    let env = [(godwit::migration::faults::HOLD_VAR, hold.as_str())];
    let (n_src, n_dst) = (10 * k, 10 * k + 1);
    // Soft-RoCE under TCG moves tens of MB/s: there, a smaller guest.
    let (memory, load) = match lab.wire {
        Wire::Namespaces => ("128M", "hb_ms=20 wss_mb=32"),
        Wire::Rxe => ("64M", "hb_ms=500 wss_mb=8 rate_mbps=1"),
    };
    let (mut source, serial0) = lab.boot(
        n_src,
        "memcheck",
        memory,
        load,
        if on_destination { &[] } else { &env },
    );
    let timeout = format!("{}s", scaled(TIMEOUT).as_secs());
    let idle = ["--idle-timeout", timeout.as_str()];
    let (mut dest, serial1) =
        lab.receiver('b', n_dst, &idle, if on_destination { &env } else { &[] });
    let mut logs = vec![serial0.clone(), serial1.clone()];
    wait_checked(&logs, 1);
    wait_listening(&serial1);

    // Round 2 comes only if round 1 does not end the pre-copy: ask for a pause no round
    // can fit, with room for a third round.
    let mut extra = vec!["--reply-timeout", timeout.as_str()];
    if phase == Phase::Round2 {
        extra.extend(["--max-downtime", "1us", "--max-rounds", "3"]);
    }
    let send = Send::start(lab, &source, 'b', n_dst, &extra);
    let holder = if on_destination { &serial1 } else { &serial0 };
    wait_for(Duration::from_secs(30), "the hold", || {
        std::fs::read_to_string(format!("{holder}.stderr"))
            .is_ok_and(|s| s.contains(&format!("holding at {point}")))
    });
    std::thread::sleep(Duration::from_millis(1000));
    match fault {
        Fault::KillReceiver => dest.child.kill().unwrap(),
        Fault::KillSource => source.child.kill().unwrap(),
        Fault::Cancel => {
            let out = run_bounded(
                lab.godwit('a', &["cancel", "--api", &source.api]),
                Duration::from_secs(10),
            );
            assert!(out.status.success(), "cancel: {out:?}");
        }
        Fault::Cut | Fault::Stall => break_link(lab, fault),
    }
    let r = send.report();
    if fault != Fault::KillSource {
        assert!(r.is_object(), "{fault:?} in {phase:?}: no report");
    }
    let error = match r["error"].as_str() {
        Some(e) => e.to_string(),
        None if fault == Fault::KillSource => "(the VM's process died: no report)".into(),
        None => String::new(),
    };
    // Long enough for the receiver to notice a silent source and give up.
    std::thread::sleep(scaled(TIMEOUT) + Duration::from_secs(1));
    mend_link(lab, fault);

    let want = expected(fault, phase);
    let case = format!("{fault:?} in {phase:?}");
    let dest_runs = dest.is_running() && Path::new(&dest.api).exists();
    let got = if !source.is_running() {
        if dest_runs {
            Outcome::Destination
        } else {
            Outcome::Lost
        }
    } else {
        match state(lab, 'a', &source.api).as_deref() {
            Some("running") => Outcome::Source,
            Some("paused") if dest_runs => Outcome::DestinationSourceInDoubt,
            Some("paused") => Outcome::SourceInDoubt,
            s => panic!("{case}: the source's state is {s:?}; report {r}"),
        }
    };
    assert_eq!(got, want, "{case}: report {r}");
    // Never two copies: a running source means the destination has no VM.
    if got == Outcome::Source {
        assert!(!dest_runs, "{case}: both hosts run the VM");
        let outcome = if fault == Fault::Cancel {
            "cancelled"
        } else {
            "failed"
        };
        assert_eq!(r["outcome"], outcome, "{case}: {r}");
        assert_eq!(r["vm_on_source"], true, "{case}: {r}");
        assert!(
            error.contains("keeps running on the source"),
            "{case}: {error}"
        );
    }

    // Recovery, as the operator would do it, then a migration that succeeds.
    let recovery = match got {
        Outcome::Lost => {
            // A source that died takes its VM along: the destination must not have run it.
            assert!(
                !dest_runs,
                "{case}: the destination ran a VM it never got whole"
            );
            "none (the VM died with its process)"
        }
        Outcome::Destination => "none (the destination runs it)",
        Outcome::DestinationSourceInDoubt => {
            run_bounded(
                lab.godwit('a', &["stop", "--api", &source.api]),
                Duration::from_secs(10),
            );
            assert!(source.wait_exit(Duration::from_secs(10)).is_some());
            "`godwit stop` the paused source"
        }
        Outcome::SourceInDoubt | Outcome::Source => {
            if got == Outcome::SourceInDoubt {
                let out = run_bounded(
                    lab.godwit('a', &["resume", "--api", &source.api]),
                    Duration::from_secs(10),
                );
                assert!(out.status.success(), "{case}: resume failed: {out:?}");
            }
            wait_checked(&logs, 1);
            // A receiver that kept waiting (the fault hit its handshake) takes the retry.
            let n_retry = if dest.is_running() {
                n_dst
            } else {
                let (retry, serial2) = lab.receiver('b', n_dst + 1, &[], &[]);
                logs.push(serial2.clone());
                wait_listening(&serial2);
                dest = retry;
                n_dst + 1
            };
            let r = lab.send(&source, 'b', n_retry, &[]);
            assert_eq!(r["outcome"], "completed", "{case}: retry: {r}");
            assert!(source.wait_exit(Duration::from_secs(10)).is_some());
            dest.wait_api();
            if got == Outcome::SourceInDoubt {
                "`godwit resume` the paused source, retry"
            } else {
                "retry"
            }
        }
    };
    if got != Outcome::Lost {
        wait_checked(&logs, 1);
        let s = guest(&logs);
        assert!(s.healthy(), "{case}: the guest reports {s:?}");
        assert_eq!(s.boots, 1, "{case}: {s:?}");
    }
    let error = error.split(';').next().unwrap_or_default().to_string();
    format!("| {fault:?} | {phase:?} | {got:?} | {recovery} | {error} |")
}

/// The crash report of a guest of case `k` (its source, destination, or retry's), if one
/// triple-faulted.
fn crashed_guest(lab: &Lab, k: usize) -> Option<String> {
    (0..3).find_map(|j| {
        let log = lab.path(&format!("serial-{}.log.stderr", 10 * k + j));
        std::fs::read_to_string(log)
            .ok()?
            .lines()
            .find(|l| l.contains("triple-faulted"))
            .map(str::to_string)
    })
}

fn matrix(name: &str, subnet: u8, fault: Fault) {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up(name, subnet);
    let rows: Vec<String> = PHASES
        .iter()
        .enumerate()
        .map(|(k, &phase)| {
            if lab.wire == Wire::Namespaces {
                return case(&lab, k + 1, fault, phase);
            }
            // A KVM guest nested under the soft-RoCE lab's emulated CPU (TCG) now and then
            // triple-faults on its own, migration or not (ci/rdmalab/README.md). A case that
            // fails with one of its guests crashed says so and runs once more on new guests;
            // a second crash, any other failure, and any crash on real hardware (the same
            // matrix over TCP) fail the test.
            let first = std::panic::catch_unwind(AssertUnwindSafe(|| case(&lab, k + 1, fault, phase)));
            first.unwrap_or_else(|panic| match crashed_guest(&lab, k + 1) {
                Some(crash) => {
                    eprintln!("{fault:?} in {phase:?}: the lab's nested guest crashed ({crash}); the case runs once more");
                    lab.mend_wire();
                    case(&lab, k + 11, fault, phase)
                }
                None => std::panic::resume_unwind(panic),
            })
        })
        .collect();
    eprintln!("| fault | phase | VM ends | recovery | error (first clause) |");
    for r in rows {
        eprintln!("{r}");
    }
}

#[test]
fn receiver_killed_in_every_phase() {
    matrix("gwfkr", 51, Fault::KillReceiver);
}

#[test]
fn source_killed_in_every_phase() {
    matrix("gwfks", 52, Fault::KillSource);
}

#[test]
fn link_cut_in_every_phase() {
    matrix("gwfcut", 53, Fault::Cut);
}

#[test]
fn link_stalled_in_every_phase() {
    matrix("gwfstall", 54, Fault::Stall);
}

/// `godwit cancel` in every phase: before the commit the VM stays on the source; after it,
/// cancelling is too late and the migration completes.
#[test]
fn cancel_in_every_phase() {
    matrix("gwfcancel", 56, Fault::Cancel);
}

#[test]
fn killing_the_send_command_does_not_stop_the_migration() {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("gwfclient", 55);
    let hold = format!("source-round-1:{HOLD_MS}");
    let env = [(godwit::migration::faults::HOLD_VAR, hold.as_str())];
    let (mut source, serial0) = lab.boot(0, "memcheck", "128M", "hb_ms=20 wss_mb=32", &env);
    let (mut dest, serial1) = lab.receiver('b', 1, &[], &[]);
    let logs = vec![serial0.clone(), serial1.clone()];
    wait_checked(&logs, 1);
    wait_listening(&serial1);
    let mut send = Send::start(&lab, &source, 'b', 1, &[]);
    wait_for(Duration::from_secs(30), "the hold", || {
        std::fs::read_to_string(format!("{serial0}.stderr"))
            .is_ok_and(|s| s.contains("holding at source-round-1"))
    });
    // `godwit send` only watches: the VM's own process runs the migration.
    send.child.kill().unwrap();
    let st = source.wait_exit(common::MOVE_TIMEOUT);
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    dest.wait_api();
    wait_checked(&logs, 1);
    let s = guest(&logs);
    assert!(s.healthy() && s.boots == 1, "{s:?}");
}
