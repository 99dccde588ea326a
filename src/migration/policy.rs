//! When to stop copying and switch over, and whether compressing pages pays.
//!
//! The switchover rule is QEMU's, made explicit: switch when the bytes still dirty, moved at
//! the rate the link has shown, fit in the downtime budget. Unlike QEMU, the budget includes
//! a measured allowance for what else happens during the pause (saving and loading state,
//! the confirmation round trip), so the pause the guest sees is the one the user asked for.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default downtime budget.
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(50);
/// Default limit on pre-copy rounds.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// Rate assumed before any round measured one: a 10 Gb/s link. The first round moves all of
/// memory, so it measures the real rate before any switchover decision depends on it.
const DEFAULT_LINK_BYTES_PER_SEC: f64 = 1.25e9;
/// A round must move at least this much for its rate to count as a measurement.
const MIN_MEASURED_BYTES: u64 = 4 << 20;
/// Time the pause costs besides pages: state save, transfer, load, the commit round trip
/// (0.5-5 ms measured here).
const DEFAULT_FIXED_PAUSE: Duration = Duration::from_millis(3);
/// lz4 compression speed per worker assumed before any batch was measured (bytes of pages
/// per second; 0.7-1.0 GB/s measured on these machines).
const DEFAULT_COMPRESS_BYTES_PER_SEC: f64 = 700e6;
/// Compressed/raw ratio assumed before any batch was measured.
const DEFAULT_COMPRESSION_RATIO: f64 = 2.0;

/// Whether page batches are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CompressMode {
    /// Compress when the measured link and compression rates say it moves pages faster.
    Auto,
    /// Always compress (batches that do not shrink still go raw).
    On,
    /// Never compress.
    Off,
}

/// The user's limits for one migration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest acceptable pause of the guest.
    pub max_downtime: Duration,
    /// Most pre-copy rounds before giving up.
    pub max_rounds: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_downtime: DEFAULT_MAX_DOWNTIME,
            max_rounds: DEFAULT_MAX_ROUNDS,
        }
    }
}

/// What to do after a round.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Copy the dirty pages in another round while the guest runs.
    Continue,
    /// Pause the guest and send the rest.
    Switchover {
        /// The predicted pause.
        expected: Duration,
    },
    /// Pre-copy will not fit the budget; give up and keep the VM on the source.
    GiveUp(String),
}

/// Rates measured so far in this migration.
#[derive(Clone, Debug)]
pub struct Estimates {
    /// Bytes of pages per second the pipeline moved end to end in the last measured round,
    /// whatever the mode: what predicts the pause.
    pub page_bytes_per_sec: f64,
    /// Bytes per second the link carried in the last measured uncompressed round: what
    /// compression competes with.
    pub link_bytes_per_sec: f64,
    /// Bytes per second the guest dirtied in the last round.
    pub dirty_bytes_per_sec: f64,
    /// Bytes of pages one worker compresses per second.
    pub compress_bytes_per_sec: f64,
    /// Raw bytes / compressed bytes of what was compressed.
    pub compression_ratio: f64,
    /// The pause's cost besides pages.
    pub fixed_pause: Duration,
}

impl Default for Estimates {
    fn default() -> Self {
        Self {
            page_bytes_per_sec: DEFAULT_LINK_BYTES_PER_SEC,
            link_bytes_per_sec: DEFAULT_LINK_BYTES_PER_SEC,
            dirty_bytes_per_sec: 0.0,
            compress_bytes_per_sec: DEFAULT_COMPRESS_BYTES_PER_SEC,
            compression_ratio: DEFAULT_COMPRESSION_RATIO,
            fixed_pause: DEFAULT_FIXED_PAUSE,
        }
    }
}

impl Estimates {
    /// Takes in one round: `moved` page bytes (non-zero pages, raw size) in `took`, of which
    /// `raw_wire` bytes went on the wire if the round was uncompressed, and the bytes the guest
    /// dirtied meanwhile.
    pub fn record_round(
        &mut self,
        moved: u64,
        raw_wire: Option<u64>,
        took: Duration,
        dirtied: u64,
    ) {
        let secs = took.as_secs_f64().max(1e-6);
        if moved >= MIN_MEASURED_BYTES {
            self.page_bytes_per_sec = moved as f64 / secs;
            if let Some(wire) = raw_wire {
                self.link_bytes_per_sec = wire as f64 / secs;
            }
        }
        self.dirty_bytes_per_sec = dirtied as f64 / secs;
    }

    /// Takes in compression measurements: `raw` bytes became `compressed` in `cpu` time.
    pub fn record_compression(&mut self, raw: u64, compressed: u64, cpu: Duration) {
        if raw >= MIN_MEASURED_BYTES && compressed > 0 {
            self.compression_ratio = raw as f64 / compressed as f64;
            self.compress_bytes_per_sec = raw as f64 / cpu.as_secs_f64().max(1e-6);
        }
    }

    /// Whether compressing moves pages faster than sending them raw, with `workers` threads.
    pub fn compression_pays(&self, workers: usize) -> bool {
        let raw = self.link_bytes_per_sec;
        let compressed = (self.compress_bytes_per_sec * workers as f64)
            .min(self.link_bytes_per_sec * self.compression_ratio);
        compressed > raw * 1.1
    }

    /// The pause predicted for sending `remaining` bytes of dirty pages.
    pub fn predicted_pause(&self, remaining: u64) -> Duration {
        Duration::from_secs_f64(remaining as f64 / self.page_bytes_per_sec) + self.fixed_pause
    }

    /// The decision after round `round`, with `remaining` bytes dirty.
    pub fn decide(&self, limits: &Limits, round: u32, remaining: u64) -> Decision {
        let expected = self.predicted_pause(remaining);
        if expected <= limits.max_downtime {
            return Decision::Switchover { expected };
        }
        if round >= limits.max_rounds {
            let mib = |b: f64| b / (1 << 20) as f64;
            return Decision::GiveUp(format!(
                "did not converge in {round} rounds: the guest dirties {:.0} MiB/s, the link moves {:.0} MiB/s, \
                 and the {:.1} MiB still dirty would pause the guest for {} ms against a budget of {} ms; \
                 raise --max-downtime or --max-rounds, raise the bandwidth, or reduce the guest's write load",
                mib(self.dirty_bytes_per_sec),
                mib(self.page_bytes_per_sec),
                mib(remaining as f64),
                expected.as_millis(),
                limits.max_downtime.as_millis(),
            ));
        }
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_over_when_the_rest_fits_the_budget() {
        let mut e = Estimates::default();
        e.record_round(1 << 30, Some(1 << 30), Duration::from_secs(1), 0);
        let limits = Limits::default();
        // 1 GiB/s: 40 MiB takes ~39 ms + 3 ms fixed, within 50 ms.
        assert!(matches!(
            e.decide(&limits, 1, 40 << 20),
            Decision::Switchover { .. }
        ));
        assert_eq!(e.decide(&limits, 1, 60 << 20), Decision::Continue);
        assert!(
            matches!(e.decide(&limits, 30, 60 << 20), Decision::GiveUp(m) if m.contains("did not converge"))
        );
    }

    #[test]
    fn small_rounds_do_not_count_as_rate_measurements() {
        let mut e = Estimates::default();
        e.record_round(4096, Some(4096), Duration::from_secs(1), 4096);
        assert_eq!(e.link_bytes_per_sec, DEFAULT_LINK_BYTES_PER_SEC);
        assert_eq!(e.page_bytes_per_sec, DEFAULT_LINK_BYTES_PER_SEC);
        assert_eq!(e.dirty_bytes_per_sec, 4096.0);
    }

    #[test]
    fn compression_pays_on_slow_links_only() {
        let mut e = Estimates::default();
        e.record_compression(100 << 20, 25 << 20, Duration::from_millis(100));
        e.record_round(100 << 20, Some(100 << 20), Duration::from_secs(1), 0);
        assert!(
            e.compression_pays(2),
            "100 MB/s link, 1 GB/s compressor, ratio 4"
        );
        e.record_round(3 << 30, Some(3 << 30), Duration::from_secs(1), 0);
        assert!(
            !e.compression_pays(1),
            "3 GiB/s link beats a 1 GB/s compressor"
        );
    }
}
