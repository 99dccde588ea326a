//! End-to-end live migration on real KVM between two hosts (network namespaces), checked by
//! the guest itself: its memory checker, its register checks and its heartbeat counter.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{
    guest, report, run_bounded, wait_checked, wait_for, wait_listening, Lab, VmProcess,
    MOVE_TIMEOUT, SERIAL,
};
use godwit_transport::{ConnectOptions, TcpTransport, Transport};

#[test]
fn the_memory_checker_moves_ten_times_and_stays_intact() {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("gwten", 41);
    let (mut current, serial0) = lab.boot(0, "memcheck", "256M", "hb_ms=20 wss_mb=64", &[]);
    let mut logs = vec![serial0];
    wait_checked(&logs, 2);

    for n in 1..=10 {
        let to = if current.host == 'a' { 'b' } else { 'a' };
        let (mut next, serial) = lab.receiver(to, n, &[], &[]);
        logs.push(serial);
        wait_listening(&logs[n]);
        let seq_before = guest(&logs).last_seq;
        let r = lab.send(&current, to, n, &[]);
        assert_eq!(r["outcome"], "completed", "move {n}: {r}");
        // This host has no RDMA device: `auto` falls back to TCP and says why.
        assert_eq!(r["transport"], "tcp", "move {n}: {r}");
        let why = r["transport_fallback"].as_str().unwrap_or_default();
        assert!(
            why.contains("no RDMA device"),
            "move {n}: fallback reason {why:?}"
        );
        // The pause is measured on the source from pausing the vCPUs to the destination's
        // confirmation; the budget is 50 ms, and anything near a second means the switchover
        // logic is broken, whatever the load on the host.
        let downtime = r["downtime_ms"].as_f64().unwrap();
        assert!(
            downtime > 0.0 && downtime < 1000.0,
            "move {n}: downtime {downtime} ms: {r}"
        );

        // Exactly one host runs the VM: the source released it and exited cleanly, the
        // destination serves it.
        let st = current.wait_exit(Duration::from_secs(10));
        assert!(
            st.is_some_and(|s| s.success()),
            "move {n}: the source did not release the VM: {st:?}"
        );
        assert!(
            next.is_running(),
            "move {n}: the destination is not running"
        );
        next.wait_api();

        wait_checked(&logs, 2);
        let s = guest(&logs);
        assert!(s.healthy(), "move {n}: the guest reports {s:?}");
        assert!(s.last_seq > seq_before, "move {n}: the heartbeat stopped");
        current = next;
    }
    let s = guest(&logs);
    // The guest's own clock agrees: it never stood still for long.
    assert!(
        s.max_stall_us < 1_000_000,
        "the guest stalled for {} us",
        s.max_stall_us
    );
    eprintln!(
        "10 moves: {} heartbeats, longest gap {:.1} ms (period {:.1} ms), largest stall the guest saw {:.1} ms",
        s.heartbeats,
        s.longest_gap_ms,
        s.median_gap_ms,
        s.max_stall_us as f64 / 1e3
    );
}

#[test]
fn a_guest_dirtying_twice_the_link_rate_fails_at_its_deadline_and_keeps_running() {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("gwfast", 42);
    let (mut source, mut dest, logs) = lab.pair("dirtier", "256M", TWICE_THE_LINK, 1);

    // Neither throttling nor post-copy allowed: pre-copy alone cannot converge.
    let r = lab.send(
        &source,
        'b',
        1,
        &["--max-bandwidth", LINK, "--deadline", "15s"],
    );
    assert_eq!(r["outcome"], "failed", "{r}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("did not converge by its deadline of 15 s"),
        "{error}"
    );
    assert!(error.contains("--allow-throttle"), "{error}");
    assert!(error.contains("keeps running on the source"), "{error}");
    assert_eq!(r["vm_on_source"], true);
    // It gave up at its deadline, not before (a migration still trying is not cut short).
    let total = r["total_ms"].as_f64().unwrap();
    assert!(total >= 15_000.0, "gave up after {total} ms: {r}");
    assert_eq!(r["escalations"].as_array().map(Vec::len), Some(0), "{r}");

    // The source still runs the guest, intact and unthrottled; the destination discarded
    // its copy.
    assert!(source.is_running());
    let st = dest.wait_exit(Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| !s.success()),
        "the destination should have given up: {st:?}"
    );
    wait_checked(&logs, 2);
    let s = guest(&logs);
    assert!(s.healthy(), "{s:?}");
}

/// A guest that dirties memory as it computes, at twice the link rate.
const TWICE_THE_LINK: &str = "hb_ms=20 wss_mb=128 rate_mbps=80 catchup=0";
/// The link, capped (MiB/s).
const LINK: &str = "40M";

/// `send`'s arguments for that guest on that link with one escalation step allowed.
fn escalating(step: &'static str) -> [&'static str; 7] {
    [
        "--max-bandwidth",
        LINK,
        step,
        "--max-downtime",
        "50ms",
        "--deadline",
        "60s",
    ]
}

#[test]
fn a_guest_dirtying_twice_the_link_rate_converges_when_throttling_is_allowed() {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("gwthrottle", 49);
    let (mut source, mut dest, logs) = lab.pair("dirtier", "256M", TWICE_THE_LINK, 1);

    let args = escalating("--allow-throttle");
    // Said beforehand: pre-copy alone would not make it, throttled it would.
    let f = lab.forecast(&source, 'b', 1, &args);
    assert_eq!(f["precopy"]["converges"], false, "{f}");
    assert_eq!(f["with_throttle"]["converges"], true, "{f}");
    let r = lab.send(&source, 'b', 1, &args);
    assert_eq!(r["outcome"], "completed", "{r}");
    // It switched over only when the rest fitted the budget; the measured pause is the
    // report's (a loaded host may stretch it, never to a second).
    let predicted = r["predicted_downtime_ms"].as_f64().unwrap();
    assert!(predicted <= 50.0, "{r}");
    let downtime = r["downtime_ms"].as_f64().unwrap();
    assert!(downtime < 1000.0, "downtime {downtime} ms: {r}");
    // Throttling ran, and the report says why.
    let steps = r["escalations"].as_array().cloned().unwrap_or_default();
    let throttle = steps
        .iter()
        .find(|e| e["step"] == "throttle")
        .unwrap_or_else(|| panic!("no throttle step: {r}"));
    assert!(
        throttle["detail"]
            .as_str()
            .is_some_and(|d| d.contains("of the link rate")),
        "{throttle}"
    );
    let rounds = r["round_details"].as_array().unwrap();
    assert!(
        rounds
            .iter()
            .any(|d| d["throttle_percent"].as_u64() > Some(0)),
        "{r}"
    );
    for d in rounds {
        eprintln!(
            "round {}: {} pages in {:.0} ms, dirtied {:.1} MiB/s at throttle {}%",
            d["round"],
            d["pages"],
            d["ms"].as_f64().unwrap_or_default(),
            d["dirty_bytes_per_sec"].as_f64().unwrap_or_default() / 1048576.0,
            d["throttle_percent"]
        );
    }
    eprintln!(
        "throttled migration: total {:.0} ms, downtime {:.1} ms (predicted {:.1} ms)",
        r["total_ms"].as_f64().unwrap_or_default(),
        downtime,
        predicted
    );

    common::assert_moved(&mut source, &mut dest, &logs);
}

/// Post-copy, the last rung: the same guest, throttling forbidden. The VM moves with its state
/// alone, runs on the destination at once, and fetches the pages it still misses while the
/// rest streams in; the guest checks every page of its memory.
#[test]
fn a_guest_dirtying_twice_the_link_rate_moves_in_post_copy_when_it_is_allowed() {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("gwpostcopy", 57);
    let (mut source, mut dest, logs) = lab.pair("dirtier", "256M", TWICE_THE_LINK, 1);

    let args = escalating("--allow-postcopy");
    let f = lab.forecast(&source, 'b', 1, &args);
    assert_eq!(f["precopy"]["converges"], false, "{f}");
    assert_eq!(f["with_postcopy"]["converges"], true, "{f}");
    assert!(
        f["with_postcopy"]["postcopy_ms"].as_f64() > Some(0.0),
        "{f}"
    );
    let r = lab.send(&source, 'b', 1, &args);
    assert_eq!(r["outcome"], "completed", "{r}");
    let steps = r["escalations"].as_array().cloned().unwrap_or_default();
    let step = steps
        .iter()
        .find(|e| e["step"] == "postcopy")
        .unwrap_or_else(|| panic!("no post-copy step: {r}"));
    assert!(
        step["detail"]
            .as_str()
            .is_some_and(|d| d.contains("does not converge")),
        "{step}"
    );
    // The pause carried no pages: it is the state's alone (a loaded host may stretch it,
    // never to a second).
    assert!(r["predicted_downtime_ms"].as_f64() <= Some(50.0), "{r}");
    let downtime = r["downtime_ms"].as_f64().unwrap();
    assert!(downtime < 1000.0, "downtime {downtime} ms: {r}");
    let pc = &r["postcopy"];
    let stale = pc["stale_pages"].as_u64().unwrap_or_default();
    assert!(stale > 0, "{r}");
    // The guest ran on the destination while pages were missing, and waited for some.
    assert!(pc["faults"].as_u64() > Some(0), "{r}");
    eprintln!(
        "post-copy: total {:.0} ms, downtime {downtime:.1} ms; {stale} stale pages moved in \
         {:.0} ms, the guest waited for {} ({} fetched on demand, mean {} µs, longest {} µs)",
        r["total_ms"].as_f64().unwrap_or_default(),
        pc["ms"].as_f64().unwrap_or_default(),
        pc["faults"],
        pc["fetched"],
        pc["mean_wait_us"],
        pc["max_wait_us"]
    );

    common::assert_moved(&mut source, &mut dest, &logs);
}

/// Post-copy's risk, shown: the receiver dies while the guest runs there without all of its
/// memory. The source cannot take the VM back on its own (the guest ran on elsewhere): it
/// stays paused and says so, and `godwit resume` runs the guest as of the switchover, its
/// memory intact by its own check.
#[test]
fn a_receiver_lost_in_post_copy_leaves_the_guest_paused_on_the_source_as_of_the_switchover() {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("gwpclost", 58);
    let hold = [(godwit::migration::faults::HOLD_VAR, "source-postcopy:4000")];
    let (source, serial0) = lab.boot(0, "dirtier", "256M", TWICE_THE_LINK, &hold);
    let (mut dest, serial1) = lab.receiver('b', 1, &[], &[]);
    let logs = [serial0.clone(), serial1.clone()];
    wait_checked(&logs, 1);
    wait_listening(&serial1);

    let args = [
        "--max-bandwidth",
        LINK,
        "--allow-postcopy",
        "--deadline",
        "60s",
        "--reply-timeout",
        "5s",
    ];
    let mut send = lab
        .send_command(&source, 'b', 1, &args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("godwit send");
    wait_for(
        Duration::from_secs(30),
        "the VM to run on the destination in post-copy",
        || {
            std::fs::read_to_string(format!("{serial0}.stderr"))
                .is_ok_and(|s| s.contains("holding at source-postcopy"))
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    dest.child.kill().unwrap();
    wait_for(Duration::from_secs(30), "godwit send to end", || {
        send.try_wait().unwrap().is_some()
    });
    let mut out = String::new();
    std::io::Read::read_to_string(send.stdout.as_mut().unwrap(), &mut out).unwrap();
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no report ({e}): {out}"));
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(r["vm_on_source"], false, "{r}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(error.contains("in post-copy"), "{error}");
    assert!(error.contains("`godwit resume`"), "{error}");
    let status = run_bounded(
        lab.godwit('a', &["status", "--api", &source.api]),
        Duration::from_secs(10),
    );
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st["state"], "paused", "{st}");

    // The operator's choice: run the guest as of the switchover here.
    let resumed = run_bounded(
        lab.godwit('a', &["resume", "--api", &source.api]),
        Duration::from_secs(10),
    );
    assert!(resumed.status.success(), "{resumed:?}");
    let here = [serial0];
    wait_checked(&here, 1);
    let s = guest(&here);
    assert!(s.healthy() && s.boots == 1, "the guest reports {s:?}");
}

/// `godwit forecast` measures the guest and the link to the waiting receiver, predicts, and
/// moves nothing: the receiver goes on waiting and takes the VM afterwards.
#[test]
fn a_forecast_comes_before_anything_moves_and_the_receiver_keeps_waiting() {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("gwforecast", 50);
    // The working set written once at full speed, then rewritten at 8 MiB/s.
    let (mut source, mut dest, logs) = lab.pair(
        "dirtier",
        "256M",
        "hb_ms=20 wss_mb=64 rate_mbps=8 fill=1",
        2,
    );

    let f = lab.forecast(&source, 'b', 1, &["--sample", "1s"]);
    assert_eq!(f["precopy"]["converges"], true, "{f}");
    let sample = &f["guest"];
    let nonzero = sample["nonzero_bytes"].as_f64().unwrap_or_default();
    assert!(
        (64.0 * 1048576.0..256.0 * 1048576.0).contains(&nonzero),
        "{f}"
    );
    let dirty = sample["dirty_bytes_per_sec"].as_f64().unwrap_or_default() / 1048576.0;
    assert!(
        dirty > 2.0 && dirty < 32.0,
        "the guest dirties 8 MiB/s, the forecast saw {dirty}: {f}"
    );
    assert!(f["page_bytes_per_sec"].as_f64() > Some(0.0), "{f}");
    assert!(dest.is_running(), "the receiver stopped after the probe");
    assert!(source.is_running());
    let said = std::fs::read_to_string(format!("{}.stderr", logs[1])).unwrap_or_default();
    assert!(said.contains("answered a link probe"), "{said}");

    let r = lab.send(&source, 'b', 1, &[]);
    assert_eq!(r["outcome"], "completed", "{r}");
    eprintln!(
        "forecast: total {:.0} ms, downtime {:.1} ms; measured: total {:.0} ms, downtime {:.1} ms",
        f["precopy"]["total_ms"].as_f64().unwrap_or_default(),
        f["precopy"]["downtime_ms"].as_f64().unwrap_or_default(),
        r["total_ms"].as_f64().unwrap_or_default(),
        r["downtime_ms"].as_f64().unwrap_or_default()
    );
    common::assert_moved(&mut source, &mut dest, &logs);
}

#[test]
fn killing_the_receiver_mid_migration_leaves_the_vm_on_the_source() {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("gwkill", 43);
    let (mut source, serial0) = lab.boot(
        0,
        "dirtier",
        "512M",
        "hb_ms=20 wss_mb=256 rate_mbps=50",
        &[],
    );
    let (mut dest, serial1) = lab.receiver('b', 1, &[], &[]);
    let logs = vec![serial0, serial1];
    wait_checked(&logs, 1);

    // A slow link keeps the first round going for seconds; kill the receiver inside it.
    let mut sender = VmProcess::spawn(
        lab.send_command(&source, 'b', 1, &["--max-bandwidth", "40M"]),
        String::new(),
        'a',
        &lab.path("send"),
    );
    wait_listening(&logs[1]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        sender.is_running(),
        "the migration ended before the receiver was killed"
    );
    dest.child.kill().unwrap();
    let st = sender.wait_exit(MOVE_TIMEOUT);
    assert!(
        st.is_some_and(|s| s.code() == Some(1)),
        "send should report a failure: {st:?}"
    );
    assert!(source.is_running(), "the source must keep the VM");

    let before = guest(&logs).last_seq;
    wait_checked(&logs, 2);
    let s = guest(&logs);
    assert!(s.healthy(), "{s:?}");
    assert!(s.last_seq > before);
}

#[test]
fn requiring_rdma_without_a_device_fails_cleanly_and_keeps_the_vm() {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("gwnordma", 44);
    let (mut source, mut dest, logs) = lab.pair("memcheck", "128M", "hb_ms=20 wss_mb=32", 1);

    let r = lab.send(&source, 'b', 1, &["--transport", "rdma"]);
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(r["vm_on_source"], true, "{r}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("RDMA was required") && error.contains("--transport auto or tcp"),
        "{error}"
    );
    assert!(source.is_running());
    let st = dest.wait_exit(Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| !s.success()),
        "the destination should have given up: {st:?}"
    );
    wait_checked(&logs, 1);
    assert!(guest(&logs).healthy());
}

#[test]
fn a_wrong_key_or_migration_id_is_refused_and_the_vm_stays_put() {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("gwauth", 45);
    let (mut source, mut dest, mut logs) = lab.pair("memcheck", "128M", "hb_ms=20 wss_mb=32", 1);

    // A source with another key: refused in the handshake, before anything about the VM
    // crosses; the receiver keeps waiting for its migration.
    let other = lab.new_key("other-key");
    let out = run_bounded(
        lab.send_command_with(&source, 'b', 1, &["--key".into(), other], &[]),
        MOVE_TIMEOUT,
    );
    let r = report(&out);
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(r["vm_on_source"], true, "{r}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(error.contains("same --key file"), "{error}");
    assert!(source.is_running() && dest.is_running());

    // The right key gets in.
    let r = lab.send(&source, 'b', 1, &[]);
    assert_eq!(r["outcome"], "completed", "{r}");
    assert!(source.wait_exit(Duration::from_secs(10)).is_some());
    dest.wait_api();

    // A receiver started for another migration refuses this one; the VM stays where it is.
    let (mut third, serial2) = lab.receiver('a', 2, &[], &[]);
    wait_listening(&serial2);
    logs.push(serial2);
    let r = lab.send(&dest, 'a', 9, &[]);
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(r["vm_on_source"], true, "{r}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(error.contains("waits for migration \"m2\""), "{error}");
    let st = third.wait_exit(Duration::from_secs(10));
    assert!(st.is_some_and(|s| !s.success()), "{st:?}");
    assert!(dest.is_running());
    wait_checked(&logs, 2);
    let s = guest(&logs);
    assert!(s.healthy(), "{s:?}");
    assert_eq!(s.boots, 1, "{s:?}");
}

#[test]
fn certificates_from_the_operator_ca_move_a_vm_and_a_stranger_ca_is_refused() {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::up("gwtls", 47);
    lab.use_certificates();
    let (mut source, mut dest, logs) = lab.pair("memcheck", "128M", "hb_ms=20 wss_mb=32", 1);

    // A certificate from another CA (say, another cluster's) gets nothing.
    let other = lab.path("other-ca");
    let out = lab.path("stranger");
    for args in [
        vec!["ca", "new", other.as_str()],
        vec![
            "ca",
            "issue",
            "--ca-dir",
            &other,
            "--ip",
            "10.77.47.1",
            "--out",
            &out,
        ],
    ] {
        assert!(run_bounded(lab.godwit('a', &args), MOVE_TIMEOUT)
            .status
            .success());
    }
    let stranger = [
        "--cert".to_string(),
        format!("{out}.pem"),
        "--cert-key".into(),
        format!("{out}.key"),
        "--ca".into(),
        format!("{other}/ca.pem"),
    ];
    let r = report(&run_bounded(
        lab.send_command_with(&source, 'b', 1, &stranger, &[]),
        MOVE_TIMEOUT,
    ));
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(r["vm_on_source"], true, "{r}");
    assert!(
        r["error"].as_str().unwrap_or_default().contains("TLS"),
        "{r}"
    );
    assert!(source.is_running() && dest.is_running());

    // The host's own certificate gets in, over sealed streams.
    let r = lab.send(&source, 'b', 1, &[]);
    assert_eq!(r["outcome"], "completed", "{r}");
    assert!(source.wait_exit(Duration::from_secs(10)).is_some());
    dest.wait_api();
    wait_checked(&logs, 1);
    let s = guest(&logs);
    assert!(s.healthy() && s.boots == 1, "{s:?}");
}

#[test]
fn bad_input_is_refused_with_what_to_fix_and_changes_nothing() {
    if !common::can_run() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("gwbad", 48);

    // At the command line: each mistake names the fix.
    let cli = |args: &[&str]| {
        let out = run_bounded(lab.godwit('a', args), MOVE_TIMEOUT);
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = cli(&[
        "send",
        "--api",
        "/nonexistent",
        "--to",
        "10.0.0.1:7000",
        "--id",
        "m1",
    ]);
    assert!(e.contains("--key") && e.contains("--cert"), "{e}");
    let e = cli(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--key",
        &lab.key(),
        "--id",
        "no spaces",
    ]);
    assert!(e.contains("letters, digits"), "{e}");
    let loose = lab.path("loose-key");
    std::fs::copy(lab.key(), &loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let e = cli(&["receive", "--listen", "127.0.0.1:0", "--key", &loose]);
    assert!(e.contains("chmod 600"), "{e}");

    // A destination that will not take that much memory refuses in the handshake; the VM
    // keeps running where it was, and the destination built nothing.
    let (mut source, serial0) = lab.boot(0, "memcheck", "128M", "hb_ms=20 wss_mb=32", &[]);
    let (mut dest, serial1) = lab.receiver('b', 1, &["--max-memory", "64M"], &[]);
    let logs = vec![serial0, serial1];
    wait_checked(&logs, 1);
    wait_listening(&logs[1]);
    let r = lab.send(&source, 'b', 1, &[]);
    assert_eq!(r["outcome"], "failed", "{r}");
    assert_eq!(r["vm_on_source"], true, "{r}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("--max-memory") && error.contains("128 MiB"),
        "{error}"
    );
    let st = dest.wait_exit(Duration::from_secs(10));
    assert!(st.is_some_and(|s| !s.success()), "{st:?}");
    assert!(!std::path::Path::new(&dest.api).exists());
    assert!(source.is_running());

    // A peer of another release, on the wire: a receiver (here on loopback) answers in its
    // own version, names both in its log, and keeps waiting for its source.
    let serial = lab.path("serial-3.log");
    let api = lab.path("vm-3.sock");
    let addr = "127.0.0.1:17048";
    let mut cmd = std::process::Command::new(common::godwit());
    cmd.args([
        "receive",
        "--listen",
        addr,
        "--api",
        &api,
        "--serial",
        &serial,
        "--key",
        &lab.key(),
        "--id",
        "m3",
    ]);
    let mut dest = VmProcess::spawn(cmd, api, 'b', &serial);
    wait_listening(&serial);
    let mut conn = TcpTransport
        .connect(
            addr,
            std::num::NonZeroUsize::MIN,
            &ConnectOptions::default(),
        )
        .expect("connect");
    let mut hello = b"GDWS".to_vec();
    hello.extend_from_slice(&99u16.to_le_bytes());
    hello.extend_from_slice(&[1, 0]);
    conn.control.sink.send(&[&hello]).unwrap();
    conn.control.sink.flush().unwrap();
    let mut answer = Vec::new();
    assert!(conn.control.source.recv(&mut answer).unwrap());
    assert_eq!(&answer[..4], b"GDWS");
    assert_ne!(&answer[4..6], &99u16.to_le_bytes());
    wait_for(
        Duration::from_secs(10),
        "the receiver to name both versions",
        || {
            std::fs::read_to_string(format!("{serial}.stderr")).is_ok_and(|s| {
                s.contains("handshake version 99") && s.contains("same Godwit release")
            })
        },
    );
    assert!(dest.is_running() && !std::path::Path::new(&dest.api).exists());

    wait_checked(&logs, 1);
    let s = guest(&logs);
    assert!(s.healthy() && s.boots == 1, "{s:?}");
}

/// `godwit status | grep -q running` and the like: a command that only prints ends quietly
/// when its reader goes away, instead of panicking on the broken pipe.
#[test]
fn a_printing_command_ends_quietly_when_its_reader_goes_away() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    let log = std::env::temp_dir().join(format!("godwit-epipe-{}.log", std::process::id()));
    std::fs::write(&log, "[0.000] hb seq=1 boot=1 pass=0\n").unwrap();
    let mut child = Command::new(common::godwit())
        .arg("heartbeat")
        .arg(&log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("godwit heartbeat");
    // The reader is gone before the command prints.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&log);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}
