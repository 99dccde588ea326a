//! Soak: the memory checker moves back and forth between two hosts while it dirties memory,
//! and after every move the guest's own checks must have passed. CI runs a short version;
//! the long one is
//!
//! ```sh
//! GODWIT_SOAK_MOVES=200 cargo test --release --test soak -- --nocapture
//! ```

mod common;

use std::time::{Duration, Instant};

use common::{guest, wait_checked, wait_listening, Lab, SERIAL};

#[test]
fn the_dirtying_memory_checker_survives_many_moves() {
    if !common::can_run() {
        return;
    }
    let moves: usize = std::env::var("GODWIT_SOAK_MOVES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("gwsoak", 46);
    // 20 MB/s of page writes over 64 MiB, and the per-page counter check on all of it.
    let (mut current, serial0) =
        lab.boot(0, "dirtier", "256M", "hb_ms=20 wss_mb=64 rate_mbps=20", &[]);
    let mut logs = vec![serial0];
    wait_checked(&logs, 1);
    let started = Instant::now();
    let (mut downtimes, mut totals, mut bytes) = (Vec::new(), Vec::new(), 0u64);
    for n in 1..=moves {
        let to = if current.host == 'a' { 'b' } else { 'a' };
        let (mut next, serial) = lab.receiver(to, n, &[], &[]);
        logs.push(serial);
        wait_listening(&logs[n]);
        let r = lab.send(&current, to, n, &[]);
        assert_eq!(r["outcome"], "completed", "move {n}: {r}");
        assert!(
            current
                .wait_exit(Duration::from_secs(10))
                .is_some_and(|s| s.success()),
            "move {n}: the source did not release the VM"
        );
        next.wait_api();
        wait_checked(&logs, 1);
        let s = guest(&logs);
        assert!(s.healthy(), "move {n}: the guest reports {s:?}");
        assert_eq!(s.boots, 1, "move {n}: {s:?}");
        downtimes.push(r["downtime_ms"].as_f64().unwrap_or(f64::NAN));
        totals.push(r["total_ms"].as_f64().unwrap_or(f64::NAN));
        bytes += r["bytes_sent"].as_u64().unwrap_or(0);
        current = next;
    }
    let s = guest(&logs);
    downtimes.sort_by(f64::total_cmp);
    totals.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    eprintln!(
        "soak: {moves} moves in {:.0} s, all guest-verified; downtime ms min {:.1} median {:.1} \
         p95 {:.1} max {:.1}; total ms median {:.0} max {:.0}; {:.1} GiB sent; {} heartbeats, \
         1 boot, 0 errors, largest stall the guest saw {:.1} ms",
        started.elapsed().as_secs_f64(),
        downtimes[0],
        pct(&downtimes, 0.5),
        pct(&downtimes, 0.95),
        downtimes[downtimes.len() - 1],
        pct(&totals, 0.5),
        totals[totals.len() - 1],
        bytes as f64 / (1u64 << 30) as f64,
        s.heartbeats,
        s.max_stall_us as f64 / 1e3
    );
}
