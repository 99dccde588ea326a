//! What a migration will take, said before anything moves (`godwit forecast`).
//!
//! The forecast measures the three things a migration's length depends on, then runs the
//! same switchover and escalation rules as the real migration ([`Estimates::decide`]) on a
//! model of them, round by round:
//!
//! - the guest: for a short sample, dirty logging counts the pages it writes every 100 ms
//!   (its dirty rate) and all of them together (its working set); a census finds the pages
//!   that are not zero (what round 1 sends) and lz4 compresses a spread of them (ratio and
//!   speed, for `--compress`);
//! - the link and the pipeline together: real page batches of this guest (up to
//!   [`BURST_BYTES`] of its non-zero pages), read, zero-checked, compressed as round 1 would
//!   and sealed by the migration's own pipeline, with its `--max-bandwidth`, sent on every data
//!   stream of an authenticated connection to the waiting `godwit receive`, which discards
//!   them, says when it has drained them, and goes on waiting for the VM;
//! - the user's budgets and the steps they allow.
//!
//! In the model a round of `t` seconds leaves `min(dirty rate x t, working set)` bytes dirty,
//! a throttle of `p`% scales the dirty rate by `1 - p/100`, and each round costs a round
//! trip besides its pages. It predicts pre-copy alone and, when `--allow-throttle` or
//! `--allow-postcopy` is given, with those steps (post-copy: the pause carries the state alone
//! and the stale pages follow at the link's rate); the migration's own report then shows what
//! happened.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use godwit_transport::secure::{self, AuthOptions};
use godwit_transport::Transport;
use lz4_flex::block::{compress_into, get_maximum_output_size};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::batch::{is_zero_page, Compression};
use super::pipeline::{Interrupt, RateLimiter, SendPipeline};
use super::policy::{CompressMode, Decision, Estimates, Limits, Standing};
use super::protocol::{self, Message};
use super::source::{connect, Inbox, SendOptions};
use super::MigrationError;
use crate::vmm::memory::{DirtyBitmap, GuestMemory, PAGE_SIZE};
use crate::vmm::Vm;
use godwit_transport::probe::END_OF_BURST;

/// How long the guest is watched by default.
pub const DEFAULT_SAMPLE: Duration = Duration::from_secs(2);
/// One dirty-rate measurement.
const SLICE: Duration = Duration::from_millis(100);
/// What a round costs besides its pages: the destination's `RoundApplied` round trip.
const ROUND_OVERHEAD: Duration = Duration::from_millis(1);
/// Fresh memory touched to time first-touch page faults.
const TOUCH_SAMPLE_BYTES: usize = 16 << 20;
/// Page bytes the forecast's burst sends at most.
pub const BURST_BYTES: u64 = 32 << 20;
/// Pages lz4 compresses to measure ratio and speed.
const COMPRESS_SAMPLE_PAGES: u64 = 512;
/// Rounds simulated at most (a guest that dirties almost nothing converges in a handful).
const MAX_SIMULATED_ROUNDS: u32 = 100_000;

/// What the guest showed during the sample.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct GuestSample {
    /// How long it was watched.
    pub sample_ms: f64,
    /// Guest RAM.
    pub memory_bytes: u64,
    /// Bytes of pages that are not all zero: what round 1 sends.
    pub nonzero_bytes: u64,
    /// Bytes of guest memory one thread reads and zero-checks per second (round 1 does it
    /// to all of memory).
    pub scan_bytes_per_sec: f64,
    /// Bytes written per second (distinct pages per 100 ms, averaged).
    pub dirty_bytes_per_sec: f64,
    /// Distinct pages written over the whole sample.
    pub working_set_bytes: u64,
    /// Raw / compressed bytes of a spread of non-zero pages under lz4.
    pub compression_ratio: f64,
    /// Bytes of pages one thread compresses per second.
    pub compress_bytes_per_sec: f64,
}

/// One predicted migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prediction {
    /// Whether it switches over before its deadline.
    pub converges: bool,
    /// From connecting to the destination running the VM (or to giving up).
    pub total_ms: f64,
    /// The pause, when it converges.
    pub downtime_ms: f64,
    /// Pre-copy rounds, the final one included.
    pub rounds: u32,
    /// The highest throttle it needs.
    pub throttle_percent: u32,
    /// Why it gives up, when it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
    /// When it ends in post-copy: how long the VM runs on the destination while the last
    /// stale pages arrive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_ms: Option<f64>,
}

/// The forecast (also `godwit forecast --json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Forecast {
    /// The guest.
    pub guest: GuestSample,
    /// Bytes of non-zero pages per second the pipeline moved in the burst (with
    /// `--max-bandwidth`).
    pub page_bytes_per_sec: f64,
    /// Connecting and authenticating, which a migration pays too.
    pub setup_ms: f64,
    /// Bytes per second of fresh memory this host faults in on first touch, taken as the
    /// destination's: round 1 lands every non-zero page in memory the destination never
    /// touched.
    pub first_touch_bytes_per_sec: f64,
    /// The downtime budget.
    pub max_downtime_ms: f64,
    /// The deadline.
    pub deadline_ms: f64,
    /// Pre-copy alone.
    pub precopy: Prediction,
    /// With throttling, when `--allow-throttle` is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub with_throttle: Option<Prediction>,
    /// With post-copy (and throttling, if allowed), when `--allow-postcopy` is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub with_postcopy: Option<Prediction>,
}

/// Measures the guest and the link, then predicts. The guest keeps running throughout.
pub fn forecast(
    vm: &mut Vm,
    transport: &dyn Transport,
    opts: &SendOptions,
    sample: Duration,
    cancel: &AtomicBool,
) -> Result<Forecast, MigrationError> {
    let (guest, nonzero) = sample_guest(vm, sample, cancel)?;
    let (rate, setup) = measure_pipeline(vm, &nonzero, &guest, transport, opts, cancel)?;
    let deadline = opts.limits.deadline_for(guest.memory_bytes);
    let touch = first_touch_rate();
    let model = Model {
        guest,
        page_bytes_per_sec: rate,
        first_touch_bytes_per_sec: touch,
        setup,
        threads: opts.threads.get(),
    };
    let precopy_limits = Limits {
        allow_throttle: false,
        allow_postcopy: false,
        ..opts.limits
    };
    let throttle_limits = Limits {
        allow_postcopy: false,
        ..opts.limits
    };
    Ok(Forecast {
        guest,
        page_bytes_per_sec: rate,
        setup_ms: setup.as_secs_f64() * 1e3,
        first_touch_bytes_per_sec: touch,
        max_downtime_ms: opts.limits.max_downtime.as_secs_f64() * 1e3,
        deadline_ms: deadline.as_secs_f64() * 1e3,
        precopy: predict(&model, &precopy_limits, deadline),
        with_throttle: opts
            .limits
            .allow_throttle
            .then(|| predict(&model, &throttle_limits, deadline)),
        with_postcopy: opts
            .limits
            .allow_postcopy
            .then(|| predict(&model, &opts.limits, deadline)),
    })
}

/// Watches the guest's writes for `sample` with dirty logging, then counts its non-zero
/// pages (returned too) and compresses a spread of them.
fn sample_guest(
    vm: &mut Vm,
    sample: Duration,
    cancel: &AtomicBool,
) -> Result<(GuestSample, Vec<u64>), MigrationError> {
    vm.set_dirty_logging(true)?;
    let watched = watch(vm, sample, cancel);
    // Off with the vCPUs out of the guest, as after a failed migration.
    let off = vm
        .pause()
        .and_then(|()| vm.set_dirty_logging(false))
        .and(vm.resume());
    let (dirty_bytes_per_sec, working_set_bytes, took) = watched?;
    off?;

    // The census: every page read and zero-checked, as round 1 will (timed: its cost).
    let layout = vm.layout().clone();
    let memory = vm.memory();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut nonzero = Vec::new();
    let started = Instant::now();
    for gpa in DirtyBitmap::all(&layout).pages(&layout) {
        memory
            .read_slice(&mut page, GuestAddress(gpa))
            .map_err(|e| MigrationError::Memory(e.to_string()))?;
        if !is_zero_page(&page) {
            nonzero.push(gpa);
        }
    }
    let scan = started.elapsed().as_secs_f64().max(1e-6);
    let step = (nonzero.len() as u64 / COMPRESS_SAMPLE_PAGES).max(1) as usize;
    let (compression_ratio, compress_bytes_per_sec) =
        compression_sample(memory, nonzero.iter().step_by(step).copied())?.unwrap_or((1.0, 0.0));
    let sample = GuestSample {
        sample_ms: took.as_secs_f64() * 1e3,
        memory_bytes: layout.total_bytes(),
        nonzero_bytes: nonzero.len() as u64 * PAGE_SIZE,
        scan_bytes_per_sec: layout.total_bytes() as f64 / scan,
        dirty_bytes_per_sec,
        working_set_bytes,
        compression_ratio,
        compress_bytes_per_sec,
    };
    Ok((sample, nonzero))
}

/// How fast this host faults in fresh anonymous memory, one write a page.
fn first_touch_rate() -> f64 {
    let started = Instant::now();
    let mut fresh = vec![0u8; TOUCH_SAMPLE_BYTES];
    for i in (0..fresh.len()).step_by(PAGE_SIZE as usize) {
        fresh[i] = 1;
    }
    std::hint::black_box(&mut fresh);
    TOUCH_SAMPLE_BYTES as f64 / started.elapsed().as_secs_f64().max(1e-6)
}

/// Compresses the non-zero pages among `pages` with lz4 as a batch would: the ratio and the
/// bytes one thread compresses per second, or `None` when all of them were zero.
pub(crate) fn compression_sample(
    memory: &GuestMemory,
    pages: impl Iterator<Item = u64>,
) -> Result<Option<(f64, f64)>, MigrationError> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut raw = Vec::new();
    for gpa in pages {
        memory
            .read_slice(&mut page, GuestAddress(gpa))
            .map_err(|e| MigrationError::Memory(e.to_string()))?;
        if !is_zero_page(&page) {
            raw.extend_from_slice(&page);
        }
    }
    if raw.is_empty() {
        return Ok(None);
    }
    let mut out = vec![0u8; get_maximum_output_size(raw.len())];
    let started = Instant::now();
    let compressed = compress_into(&raw, &mut out).unwrap_or(raw.len()).max(1);
    let cpu = started.elapsed().as_secs_f64().max(1e-6);
    Ok(Some((
        raw.len() as f64 / compressed as f64,
        raw.len() as f64 / cpu,
    )))
}

/// The dirty rate (bytes per second) and working set (bytes) over `sample`, and how long
/// the watch took.
fn watch(
    vm: &Vm,
    sample: Duration,
    cancel: &AtomicBool,
) -> Result<(f64, u64, Duration), MigrationError> {
    vm.take_dirty()?;
    let started = Instant::now();
    let mut union = DirtyBitmap::default();
    let mut pages = 0u64;
    let slices = (sample.as_millis() / SLICE.as_millis()).max(1);
    for _ in 0..slices {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(MigrationError::Cancelled);
        }
        std::thread::sleep(SLICE);
        let d = vm.take_dirty()?;
        pages += d.count();
        if union.regions.is_empty() {
            union = d;
        } else {
            union.merge(&d);
        }
    }
    let took = started.elapsed();
    Ok((
        (pages * PAGE_SIZE) as f64 / took.as_secs_f64().max(1e-6),
        union.count() * PAGE_SIZE,
        took,
    ))
}

/// Connects and authenticates as a migration would, then times a burst of this guest's
/// pages through the migration's own pipeline until the destination has drained it. Returns
/// bytes of non-zero pages per second, and the set-up time.
fn measure_pipeline(
    vm: &Vm,
    nonzero: &[u64],
    guest: &GuestSample,
    transport: &dyn Transport,
    opts: &SendOptions,
    cancel: &AtomicBool,
) -> Result<(f64, Duration), MigrationError> {
    let started = Instant::now();
    let auth = AuthOptions {
        credentials: opts.auth.load()?,
        encrypt_data: opts.encrypt_data,
    };
    let conn = secure::client(connect(transport, opts)?, &auth)?;
    let aborts: Vec<_> = std::iter::once(&conn.control)
        .chain(&conn.data)
        .map(|c| c.abort_handle())
        .collect();
    let (mut control, ctl_source, _) = conn.control.into_parts();
    let inbox = Inbox::spawn(ctl_source);
    let probe_link = Message::ProbeLink {
        migration_id: opts.migration_id.clone(),
        streams: opts.streams.get() as u16,
    };
    control.send(&[&protocol::encode(&probe_link)])?;
    control.flush()?;
    inbox.wait_accept(
        "the destination's answer to the link probe",
        opts.reply_timeout,
    )?;
    let setup = started.elapsed();

    // Round 1's compression choice: on, off, or (auto) what the sampled ratio says.
    let e = Estimates {
        compression_ratio: guest.compression_ratio,
        compress_bytes_per_sec: guest.compress_bytes_per_sec,
        ..Estimates::default()
    };
    let compression = match opts.compress {
        CompressMode::On => Compression::Lz4,
        CompressMode::Auto if e.compression_pays(opts.threads.get()) => Compression::Lz4,
        _ => Compression::None,
    };
    let sinks = conn.data.into_iter().map(|c| c.into_parts().0).collect();
    let mut pipeline = SendPipeline::new(
        vm.memory().clone(),
        sinks,
        opts.threads.get(),
        opts.max_bandwidth.map(RateLimiter::new),
        None,
        opts.reply_timeout,
    );
    let burst = nonzero.len().min((BURST_BYTES / PAGE_SIZE) as usize);
    let interrupt = Interrupt {
        cancel,
        deadline: None,
        round: 0,
    };
    let sent = Instant::now();
    let result = pipeline
        .send_round(
            0,
            nonzero[..burst].iter().copied(),
            compression,
            &interrupt,
            |_| {},
        )
        .and_then(|stats| {
            pipeline.send_on_every_stream(END_OF_BURST)?;
            match inbox.wait(
                "the destination to drain the link probe",
                opts.reply_timeout,
            )? {
                Message::ProbeDrained => Ok(stats),
                m => Err(MigrationError::Unexpected {
                    expected: "ProbeDrained",
                    got: m.name(),
                }),
            }
        });
    for a in &aborts {
        let _ = a.shutdown();
    }
    let stats = result?;
    Ok((
        stats.raw_bytes as f64 / sent.elapsed().as_secs_f64().max(1e-6),
        setup,
    ))
}

/// What the prediction runs on.
#[derive(Clone, Copy, Debug)]
struct Model {
    guest: GuestSample,
    /// Non-zero page bytes per second through the pipeline, compression included.
    page_bytes_per_sec: f64,
    /// The destination's first-touch rate.
    first_touch_bytes_per_sec: f64,
    setup: Duration,
    threads: usize,
}

/// Runs the migration's own rules on the model, round by round.
fn predict(model: &Model, limits: &Limits, deadline: Duration) -> Prediction {
    let g = &model.guest;
    let mut e = Estimates {
        page_bytes_per_sec: model.page_bytes_per_sec.max(1.0),
        link_bytes_per_sec: model.page_bytes_per_sec.max(1.0),
        ..Estimates::default()
    };
    // Round 1 also reads and zero-checks all of memory, spread over the worker threads, and
    // the destination faults in a fresh page for every non-zero one.
    let scan = g.memory_bytes as f64 / (g.scan_bytes_per_sec * model.threads as f64).max(1.0)
        + g.nonzero_bytes as f64 / model.first_touch_bytes_per_sec.max(1.0);
    let mut elapsed = model.setup;
    let mut bytes = g.nonzero_bytes;
    let mut throttle = 0u32;
    let mut highest = 0u32;
    for round in 1..=MAX_SIMULATED_ROUNDS {
        let scanning = if round == 1 { scan } else { 0.0 };
        let took = Duration::from_secs_f64(bytes as f64 / e.page_bytes_per_sec + scanning)
            + ROUND_OVERHEAD;
        if elapsed + took > deadline {
            return gave_up(
                deadline,
                round,
                highest,
                format!(
                    "the deadline of {} s passes during round {round}",
                    deadline.as_secs()
                ),
            );
        }
        elapsed += took;
        let rate = g.dirty_bytes_per_sec * (1.0 - f64::from(throttle) / 100.0);
        let dirtied = (rate * took.as_secs_f64()).min(g.working_set_bytes as f64) as u64;
        e.dirty_bytes_per_sec = dirtied as f64 / took.as_secs_f64();
        let now = Standing {
            round,
            remaining: dirtied,
            sent: bytes,
            elapsed,
            deadline,
            throttle,
        };
        match e.decide(limits, &now) {
            Decision::Switchover { expected } => {
                return Prediction {
                    converges: true,
                    total_ms: (elapsed + expected).as_secs_f64() * 1e3,
                    downtime_ms: expected.as_secs_f64() * 1e3,
                    rounds: round + 1,
                    throttle_percent: highest,
                    why_not: None,
                    postcopy_ms: None,
                }
            }
            Decision::PostCopy { .. } => {
                // The pause carries the state alone; the stale pages follow at the link's rate.
                let push = Duration::from_secs_f64(dirtied as f64 / e.page_bytes_per_sec);
                return Prediction {
                    converges: true,
                    total_ms: (elapsed + e.fixed_pause + push).as_secs_f64() * 1e3,
                    downtime_ms: e.fixed_pause.as_secs_f64() * 1e3,
                    rounds: round + 1,
                    throttle_percent: highest,
                    why_not: None,
                    postcopy_ms: Some(push.as_secs_f64() * 1e3),
                };
            }
            Decision::GiveUp(why) => return gave_up(elapsed, round, highest, why),
            Decision::Throttle { percent, .. } => {
                throttle = percent;
                highest = highest.max(percent);
            }
            Decision::Continue => {}
        }
        bytes = dirtied;
    }
    gave_up(
        elapsed,
        MAX_SIMULATED_ROUNDS,
        highest,
        "pre-copy does not converge".into(),
    )
}

fn gave_up(at: Duration, rounds: u32, throttle: u32, why: String) -> Prediction {
    Prediction {
        converges: false,
        total_ms: at.as_secs_f64() * 1e3,
        downtime_ms: 0.0,
        rounds,
        throttle_percent: throttle,
        why_not: Some(why),
        postcopy_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn model(dirty_mib_s: f64, wss_mib: u64) -> Model {
        Model {
            guest: GuestSample {
                sample_ms: 2000.0,
                memory_bytes: 256 * MIB,
                nonzero_bytes: 128 * MIB,
                scan_bytes_per_sec: f64::INFINITY,
                dirty_bytes_per_sec: dirty_mib_s * MIB as f64,
                working_set_bytes: wss_mib * MIB,
                compression_ratio: 1.0,
                compress_bytes_per_sec: 700e6,
            },
            page_bytes_per_sec: 40.0 * MIB as f64,
            first_touch_bytes_per_sec: f64::INFINITY,
            setup: Duration::from_millis(5),
            threads: 2,
        }
    }

    #[test]
    fn an_idle_guest_takes_one_pass_over_its_memory() {
        let p = predict(&model(0.0, 0), &Limits::default(), Duration::from_secs(60));
        assert!(p.converges, "{p:?}");
        // 128 MiB at 40 MiB/s, then nothing left: 3.2 s and a pause of the fixed cost.
        assert!((p.total_ms - 3209.0).abs() < 5.0, "{p:?}");
        assert!(p.downtime_ms < 5.0, "{p:?}");
        assert_eq!(p.rounds, 2);
    }

    #[test]
    fn a_guest_at_twice_the_link_converges_only_with_throttling() {
        let m = model(80.0, 128);
        let alone = predict(&m, &Limits::default(), Duration::from_secs(60));
        assert!(!alone.converges, "{alone:?}");
        assert!(
            alone
                .why_not
                .as_deref()
                .is_some_and(|w| w.contains("deadline")),
            "{alone:?}"
        );
        let limits = Limits {
            allow_throttle: true,
            ..Limits::default()
        };
        let throttled = predict(&m, &limits, Duration::from_secs(60));
        assert!(throttled.converges, "{throttled:?}");
        assert!(throttled.throttle_percent >= 50, "{throttled:?}");
        assert!(throttled.downtime_ms <= 50.0, "{throttled:?}");
    }
}
