//! What a person sees: the live progress bar, the final report, the heartbeat summary.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use godwit::heartbeat::Summary;
use godwit::migration::forecast::{Forecast, Prediction};
use godwit::migration::report::{Outcome, Progress, Report};

fn mib(b: f64) -> f64 {
    b / (1u64 << 20) as f64
}

/// A one-line progress display on a terminal; on a pipe, a line a second.
pub struct ProgressBar {
    enabled: bool,
    tty: bool,
    last_line: Option<Instant>,
    drawn: bool,
}

impl ProgressBar {
    /// A bar that draws only when `enabled` (not under --json).
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            tty: std::io::stderr().is_terminal(),
            last_line: None,
            drawn: false,
        }
    }

    /// Shows `p`.
    pub fn update(&mut self, p: &Progress) {
        if !self.enabled {
            return;
        }
        let total = p.transferred_bytes as f64 + p.remaining_bytes as f64;
        let done = if total > 0.0 {
            p.transferred_bytes as f64 / total
        } else {
            1.0
        };
        let width = 24;
        let filled = ((done * width as f64) as usize).min(width);
        let throttle = if p.throttle_percent > 0 {
            format!("  throttled {}%", p.throttle_percent)
        } else {
            String::new()
        };
        let line = format!(
            "round {:>2} [{}{}] sent {:>8.1} MiB  left {:>7.1} MiB  {:>7.1} MiB/s  dirty {:>6.1} MiB/s{throttle}  ETA {:>5.1} s",
            p.round,
            "#".repeat(filled),
            ".".repeat(width - filled),
            mib(p.transferred_bytes as f64),
            mib(p.remaining_bytes as f64),
            mib(p.rate_bytes_per_sec),
            mib(p.dirty_bytes_per_sec),
            p.eta_secs,
        );
        let mut err = std::io::stderr().lock();
        if let Some(why) = &p.eta_rose_because {
            // Its own line, so it stays on screen after the bar moves on.
            if self.drawn {
                let _ = writeln!(err);
            }
            let _ = writeln!(err, "ETA up to {:.1} s: {why}", p.eta_secs);
        }
        if self.tty {
            let _ = write!(err, "\r{line}\x1b[K");
            self.drawn = true;
        } else if self
            .last_line
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            let _ = writeln!(err, "{line}");
            self.last_line = Some(Instant::now());
        }
        let _ = err.flush();
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// Prints the final report for a person.
pub fn print_report(r: &Report) {
    let outcome = match r.outcome {
        Outcome::Completed => "completed",
        Outcome::Failed => "FAILED",
        Outcome::Cancelled => "cancelled",
    };
    println!(
        "migration {outcome} over {} ({} streams, {} threads)",
        r.transport, r.streams, r.threads
    );
    if let Some(ms) = r.rdma_registration_ms {
        println!("  rdma:         guest memory registered in {ms:.1} ms before the first round");
    }
    if let Some(why) = &r.transport_fallback {
        println!("  transport:    TCP, because {why}");
    }
    if let Some(p) = &r.plane_probe {
        println!(
            "  plane probe:  TCP {:.0} MB/s, RDMA {:.0} MB/s ({:.0} ms each, before the first round)",
            p.tcp_bytes_per_sec / 1e6,
            p.rdma_bytes_per_sec / 1e6,
            p.burst_ms
        );
    }
    if let Some(e) = &r.error {
        println!("  error:        {e}");
    }
    println!("  total time:   {:.1} ms", r.total_ms);
    println!(
        "  downtime:     {:.2} ms (predicted {:.2} ms)",
        r.downtime_ms, r.predicted_downtime_ms
    );
    let p = &r.pause_steps;
    if r.downtime_ms > 0.0 {
        println!(
            "  pause steps:  last pages {:.2} ms, save state {:.2} ms, destination loads {:.2} ms, commit {:.2} ms",
            p.last_pages_ms, p.save_state_ms, p.restore_ms, p.commit_ms
        );
    }
    println!(
        "  sent:         {:.1} MiB of {:.0} MiB guest RAM; {} zero pages; compression ratio {:.2}",
        mib(r.bytes_sent as f64),
        mib(r.guest_memory_bytes as f64),
        r.zero_pages,
        r.compression_ratio
    );
    println!(
        "  rounds:       {} (deadline {:.0} s)",
        r.rounds,
        r.deadline_ms / 1e3
    );
    for d in &r.round_details {
        let lz4 = if d.compressed {
            format!(", lz4 x{:.2}", d.compression_ratio)
        } else {
            String::new()
        };
        let throttle = if d.throttle_percent > 0 {
            format!(", guest throttled {}%", d.throttle_percent)
        } else {
            String::new()
        };
        println!(
            "    round {:>2}: {:>8} pages ({:>8} zero) {:>9.1} MiB on the wire in {:>8.1} ms ({:.1} MiB/s of pages{lz4}); \
             guest dirtied {} pages ({:.1} MiB/s){throttle}",
            d.round,
            d.pages,
            d.zero_pages,
            mib(d.wire_bytes as f64),
            d.ms,
            mib(d.page_bytes_per_sec),
            d.dirtied_pages,
            mib(d.dirty_bytes_per_sec),
        );
    }
    for e in &r.escalations {
        println!("  after round {}: {} {}", e.round, e.step, e.detail);
    }
    println!(
        "  the VM runs on the {}",
        if r.vm_on_source {
            "source"
        } else if r.outcome == Outcome::Completed {
            "destination"
        } else {
            "destination or nowhere (in doubt): check both hosts"
        }
    );
}

/// Prints a forecast.
pub fn print_forecast(f: &Forecast) {
    let g = &f.guest;
    println!(
        "forecast: {:.0} MiB guest RAM, {:.0} MiB of it not zero (what round 1 sends)",
        mib(g.memory_bytes as f64),
        mib(g.nonzero_bytes as f64)
    );
    println!(
        "  guest:        dirties {:.1} MiB/s, working set {:.1} MiB (watched {:.1} s); lz4 ratio {:.2}",
        mib(g.dirty_bytes_per_sec),
        mib(g.working_set_bytes as f64),
        g.sample_ms / 1e3,
        g.compression_ratio
    );
    println!(
        "  link:         {:.1} MiB/s of pages through the pipeline; connecting and authenticating {:.0} ms",
        mib(f.page_bytes_per_sec),
        f.setup_ms
    );
    println!(
        "  budgets:      downtime {:.0} ms, deadline {:.0} s",
        f.max_downtime_ms,
        f.deadline_ms / 1e3
    );
    let line = |what: &str, p: &Prediction| {
        if p.converges {
            let throttle = if p.throttle_percent > 0 {
                format!(", throttled up to {}%", p.throttle_percent)
            } else {
                String::new()
            };
            let postcopy = p
                .postcopy_ms
                .map(|ms| format!(", then post-copy for {:.1} s", ms / 1e3))
                .unwrap_or_default();
            println!(
                "  {what}converges: total {:.1} s, downtime {:.1} ms, {} rounds{throttle}{postcopy}",
                p.total_ms / 1e3,
                p.downtime_ms,
                p.rounds
            );
        } else {
            println!(
                "  {what}does NOT converge: {}",
                p.why_not.as_deref().unwrap_or("")
            );
        }
    };
    line("pre-copy alone ", &f.precopy);
    if let Some(p) = &f.with_throttle {
        line("with throttling ", p);
    }
    if let Some(p) = &f.with_postcopy {
        line("with post-copy  ", p);
    }
}

/// Prints what the guest's serial logs show.
pub fn print_heartbeat(s: &Summary) {
    println!(
        "guest heartbeat: {} beats, last seq {}, {} boot(s), {} counter break(s), {} guest-reported error(s)",
        s.heartbeats,
        s.last_seq,
        s.boots,
        s.seq_breaks.len(),
        s.errors.len()
    );
    println!(
        "  longest gap between heartbeats: {:.1} ms (period {:.1} ms) -> pause seen from outside {:.1} ms; largest stall the guest measured itself: {:.2} ms",
        s.longest_gap_ms,
        s.median_gap_ms,
        s.pause_seen_ms(),
        s.max_stall_us as f64 / 1e3
    );
    for b in &s.seq_breaks {
        println!("  counter break: {b}");
    }
    for e in s.errors.iter().take(10) {
        println!("  guest error: {e}");
    }
    println!(
        "  verdict: {}",
        if s.healthy() {
            "one uninterrupted life, memory and registers intact"
        } else {
            "NOT HEALTHY"
        }
    );
}
