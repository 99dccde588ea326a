//! When to stop copying and switch over, when to slow the guest down, when to give up, and
//! whether compressing pages pays.
//!
//! The switchover rule is QEMU's, made explicit: switch when the bytes still dirty, moved at
//! the rate the link has shown, fit in the downtime budget. Unlike QEMU, the budget includes
//! a measured allowance for what else happens during the pause (saving and loading state,
//! the confirmation round trip), so the pause the guest sees is the one the user asked for.
//! The budget is a ceiling, not a target: while the dirty set still shrinks fast, one more
//! round that at least halves the pause is taken before switching.
//!
//! A migration has a deadline as well as a downtime budget; it gives up only at the deadline,
//! never because of a round count while it still makes progress. Before that, the escalation
//! ladder climbs one rung only when the measurements call for it: compression when it moves
//! pages faster ([`Estimates::compression_pays`]), then, if the user allows it, throttling the
//! guest's vCPUs in proportion to how far its dirty rate outruns the link.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::vmm::throttle::MAX_PERCENT as MAX_THROTTLE;

/// Default downtime budget.
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(50);
/// Default deadline for the whole migration per GiB of guest RAM (KubeVirt's default
/// completion timeout per GiB)...
pub const DEFAULT_DEADLINE_PER_GIB: Duration = Duration::from_secs(150);
/// ...and never less than this.
pub const DEFAULT_MIN_DEADLINE: Duration = Duration::from_secs(60);
/// Pre-copy is helped (throttled) when the guest dirties more than this share of what the
/// link moves in the same time (QEMU's auto-converge trigger is the same half).
const DIRTY_SHARE_NEEDING_HELP: f64 = 0.5;
/// A throttle aims to bring the dirty rate down to this share of the link rate, so that each
/// round leaves well under half of the previous one dirty.
const THROTTLE_TARGET_SHARE: f64 = 0.4;
/// Each throttle step raises the level by at least this much, in case the guest's writes do
/// not slow in proportion to its CPU time.
const MIN_THROTTLE_STEP: u32 = 10;
/// Below this much of the pause going to pages, another round is not worth it.
const MIN_PAGES_PAUSE_WORTH_A_ROUND: Duration = Duration::from_millis(2);
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

/// The user's limits for one migration, and the escalation steps allowed.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest acceptable pause of the guest.
    pub max_downtime: Duration,
    /// Most pre-copy rounds before giving up, if limited.
    pub max_rounds: Option<u32>,
    /// Longest the whole migration may take; `None` for the default of the guest's size.
    pub deadline: Option<Duration>,
    /// Whether the guest's vCPUs may be throttled to make pre-copy converge.
    pub allow_throttle: bool,
    /// Whether the VM may move to the destination before all of its memory (post-copy),
    /// when pre-copy (throttled, if allowed) cannot converge in time.
    pub allow_postcopy: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_downtime: DEFAULT_MAX_DOWNTIME,
            max_rounds: None,
            deadline: None,
            allow_throttle: false,
            allow_postcopy: false,
        }
    }
}

impl Limits {
    /// The deadline for a guest of `guest_bytes`.
    pub fn deadline_for(&self, guest_bytes: u64) -> Duration {
        self.deadline.unwrap_or_else(|| {
            DEFAULT_DEADLINE_PER_GIB
                .mul_f64(guest_bytes as f64 / (1u64 << 30) as f64)
                .max(DEFAULT_MIN_DEADLINE)
        })
    }
}

/// Where a migration stands after a pre-copy round.
#[derive(Clone, Copy, Debug)]
pub struct Standing {
    /// The round just finished.
    pub round: u32,
    /// Bytes of pages dirty now.
    pub remaining: u64,
    /// Bytes of pages the round just finished had to send.
    pub sent: u64,
    /// Time since the migration started.
    pub elapsed: Duration,
    /// The migration's deadline.
    pub deadline: Duration,
    /// The guest's throttle now, in percent.
    pub throttle: u32,
}

/// What to do after a round.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Copy the dirty pages in another round while the guest runs.
    Continue,
    /// Throttle the guest to `percent`, then copy another round.
    Throttle {
        /// The new level.
        percent: u32,
        /// The measurements that called for it.
        why: String,
    },
    /// Pause the guest, hand it over with the state alone, and send the rest while it runs
    /// on the destination.
    PostCopy {
        /// The measurements that called for it.
        why: String,
    },
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

    /// How long pre-copy still needs at the measured rates until what is dirty fits the
    /// downtime budget: each round sends what the last one left dirty, while the guest
    /// dirties more. `None` when it never gets there.
    pub fn precopy_time(&self, remaining: u64, max_downtime: Duration) -> Option<Duration> {
        let link = self.page_bytes_per_sec.max(1.0);
        let ratio = self.dirty_bytes_per_sec / link;
        let fits = max_downtime.saturating_sub(self.fixed_pause).as_secs_f64() * link;
        let mut dirty = remaining as f64;
        let mut secs = 0.0;
        for _ in 0..1000 {
            if dirty <= fits {
                return Some(Duration::from_secs_f64(secs));
            }
            if ratio >= 1.0 {
                return None;
            }
            secs += dirty / link;
            dirty *= ratio;
        }
        None
    }

    /// The decision after a pre-copy round.
    pub fn decide(&self, limits: &Limits, now: &Standing) -> Decision {
        let expected = self.predicted_pause(now.remaining);
        if expected <= limits.max_downtime {
            if now.elapsed < now.deadline && self.another_round_halves_the_pause(now) {
                return Decision::Continue;
            }
            return Decision::Switchover { expected };
        }
        let mib = |b: f64| b / (1 << 20) as f64;
        let rates = format!(
            "the guest dirties {:.0} MiB/s, the link moves {:.0} MiB/s, and the {:.1} MiB still dirty \
             would pause the guest for {} ms against a budget of {} ms",
            mib(self.dirty_bytes_per_sec),
            mib(self.page_bytes_per_sec),
            mib(now.remaining as f64),
            expected.as_millis(),
            limits.max_downtime.as_millis(),
        );
        let out_of_time = now.elapsed >= now.deadline;
        let out_of_rounds = limits.max_rounds.is_some_and(|m| now.round >= m);
        if limits.allow_postcopy {
            if let Some(why) = self.postcopy_needed(limits, now, out_of_time || out_of_rounds) {
                return Decision::PostCopy {
                    why: format!("{why}: {rates}"),
                };
            }
        }
        if out_of_time || out_of_rounds {
            let by = if out_of_time {
                format!("by its deadline of {} s", now.deadline.as_secs())
            } else {
                format!("in {} rounds", now.round)
            };
            let throttle = if limits.allow_throttle {
                format!(" (throttled to {}%)", now.throttle)
            } else {
                String::new()
            };
            // With post-copy allowed, it would have been chosen instead of giving up.
            let allow = if limits.allow_throttle {
                "allow post-copy (--allow-postcopy), "
            } else {
                "allow throttling (--allow-throttle) or post-copy (--allow-postcopy), "
            };
            return Decision::GiveUp(format!(
                "did not converge {by}{throttle}: {rates}; {allow}raise --max-downtime or \
                 --deadline, raise the bandwidth, or reduce the guest's write load"
            ));
        }
        if limits.allow_throttle {
            if let Some((percent, why)) = self.throttle_needed(limits, now) {
                return Decision::Throttle {
                    percent,
                    why: format!("{why}: {rates}"),
                };
            }
        }
        Decision::Continue
    }

    /// Whether one more round while the guest runs would at least halve the pause that
    /// switching now costs in pages: the dirty set still shrinks fast (the round just done left
    /// at most half of what it sent), and what the guest dirties while the next round sends
    /// the rest is at most half of it. Each such round at least halves what is left, so there
    /// are few, and each is shorter than the pause it saves the guest is long.
    fn another_round_halves_the_pause(&self, now: &Standing) -> bool {
        let pages = self
            .predicted_pause(now.remaining)
            .saturating_sub(self.fixed_pause);
        if pages < MIN_PAGES_PAUSE_WORTH_A_ROUND || now.remaining.saturating_mul(2) > now.sent {
            return false;
        }
        let next_round = now.remaining as f64 / self.page_bytes_per_sec.max(1.0);
        let next = self.dirty_bytes_per_sec * next_round;
        next * 2.0 <= now.remaining as f64
    }

    /// Why pre-copy should end in post-copy, if it should: it is out of time or rounds, or it
    /// cannot converge before the deadline and throttling cannot help (forbidden, or at its
    /// ceiling).
    fn postcopy_needed(&self, limits: &Limits, now: &Standing, out: bool) -> Option<String> {
        if out {
            return Some("pre-copy ran out of time".into());
        }
        if limits.allow_throttle && now.throttle < MAX_THROTTLE {
            return None;
        }
        let left = now.deadline.saturating_sub(now.elapsed);
        let throttled = if now.throttle > 0 {
            format!(" throttled to {}%", now.throttle)
        } else {
            String::new()
        };
        match self.precopy_time(now.remaining, limits.max_downtime) {
            Some(t) if t <= left => None,
            Some(t) => Some(format!(
                "pre-copy{throttled} needs {:.0} s more and {:.0} s are left before the deadline",
                t.as_secs_f64(),
                left.as_secs_f64()
            )),
            None => Some(format!(
                "pre-copy{throttled} does not converge at these rates"
            )),
        }
    }

    /// A higher throttle level and why, when pre-copy will not converge in time without one.
    fn throttle_needed(&self, limits: &Limits, now: &Standing) -> Option<(u32, String)> {
        if now.throttle >= MAX_THROTTLE {
            return None;
        }
        let link = self.page_bytes_per_sec.max(1.0);
        let share = self.dirty_bytes_per_sec / link;
        let left = now.deadline.saturating_sub(now.elapsed);
        let why = if share > DIRTY_SHARE_NEEDING_HELP {
            format!("dirtying at {:.0}% of the link rate", share * 100.0)
        } else {
            match self.precopy_time(now.remaining, limits.max_downtime) {
                Some(t) if t <= left => return None,
                Some(t) => format!(
                    "pre-copy needs {:.0} s more and {:.0} s are left before the deadline",
                    t.as_secs_f64(),
                    left.as_secs_f64()
                ),
                None => "pre-copy does not converge at these rates".to_string(),
            }
        };
        // The guest's rate unthrottled, assuming its writes scale with the CPU it gets.
        let running = 1.0 - f64::from(now.throttle) / 100.0;
        let unthrottled = self.dirty_bytes_per_sec / running.max(0.01);
        let wanted = 1.0 - THROTTLE_TARGET_SHARE * link / unthrottled.max(1.0);
        let percent = ((wanted * 100.0).ceil().max(0.0) as u32)
            .max(now.throttle + MIN_THROTTLE_STEP)
            .min(MAX_THROTTLE);
        Some((percent, why))
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
            e.decide(&limits, &standing(1, 40 << 20, 1)),
            Decision::Switchover { .. }
        ));
        assert_eq!(
            e.decide(&limits, &standing(1, 60 << 20, 1)),
            Decision::Continue
        );
    }

    #[test]
    fn the_budget_is_a_ceiling_while_the_dirty_set_still_halves() {
        // 1 GiB/s link, the guest dirties 100 MiB/s: 40 MiB fit the budget (~42 ms), but the
        // round just done sent 1 GiB and one more round of 40 ms leaves ~4 MiB (~7 ms).
        let mut e = Estimates::default();
        e.record_round(1 << 30, Some(1 << 30), Duration::from_secs(1), 100 << 20);
        let limits = Limits::default();
        let after_round_1 = Standing {
            sent: 1 << 30,
            ..standing(1, 40 << 20, 1)
        };
        assert_eq!(e.decide(&limits, &after_round_1), Decision::Continue);
        // The dirty set stopped halving (the round sent 5 MiB and left 4): switch.
        let stuck = Standing {
            sent: 5 << 20,
            ..standing(3, 4 << 20, 2)
        };
        assert!(matches!(
            e.decide(&limits, &stuck),
            Decision::Switchover { .. }
        ));
        // Little left in pages: switch.
        let small = Standing {
            sent: 1 << 30,
            ..standing(2, 1 << 20, 2)
        };
        assert!(matches!(
            e.decide(&limits, &small),
            Decision::Switchover { .. }
        ));
        // A guest dirtying fast enough that another round would not halve it: switch.
        let mut busy = Estimates::default();
        busy.record_round(1 << 30, Some(1 << 30), Duration::from_secs(1), 600 << 20);
        assert!(matches!(
            busy.decide(&limits, &after_round_1),
            Decision::Switchover { .. }
        ));
    }

    fn standing(round: u32, remaining: u64, elapsed_secs: u64) -> Standing {
        Standing {
            round,
            remaining,
            sent: remaining,
            elapsed: Duration::from_secs(elapsed_secs),
            deadline: Duration::from_secs(60),
            throttle: 0,
        }
    }

    /// A guest dirtying at twice the link rate: 100 MiB/s against 50.
    fn outrun() -> Estimates {
        let mut e = Estimates::default();
        e.record_round(50 << 20, Some(50 << 20), Duration::from_secs(1), 100 << 20);
        e
    }

    #[test]
    fn gives_up_at_the_deadline_not_after_a_round_count() {
        let e = outrun();
        let limits = Limits::default();
        assert_eq!(
            e.decide(&limits, &standing(500, 64 << 20, 59)),
            Decision::Continue
        );
        let Decision::GiveUp(why) = e.decide(&limits, &standing(3, 64 << 20, 60)) else {
            panic!("should give up at the deadline");
        };
        assert!(
            why.contains("did not converge by its deadline of 60 s"),
            "{why}"
        );
        assert!(why.contains("--allow-throttle"), "{why}");
        let rounds = Limits {
            max_rounds: Some(4),
            ..limits
        };
        assert!(matches!(
            e.decide(&rounds, &standing(4, 64 << 20, 1)),
            Decision::GiveUp(_)
        ));
    }

    #[test]
    fn throttles_in_proportion_to_how_far_the_guest_outruns_the_link() {
        let e = outrun();
        let limits = Limits {
            allow_throttle: true,
            ..Limits::default()
        };
        // To 40% of 50 MiB/s from 100 MiB/s: run 20% of the time.
        let Decision::Throttle { percent, why } = e.decide(&limits, &standing(1, 64 << 20, 1))
        else {
            panic!("should throttle");
        };
        assert_eq!(percent, 80);
        assert!(why.contains("dirtying at 200% of the link rate"), "{why}");
        // Already at 80% and still outrunning: at least one more step.
        let at = Standing {
            throttle: 80,
            ..standing(2, 64 << 20, 2)
        };
        let Decision::Throttle { percent, .. } = e.decide(&limits, &at) else {
            panic!("should throttle more");
        };
        assert!(percent >= 90, "{percent}");
        // A guest that dirties little is left alone.
        let mut calm = Estimates::default();
        calm.record_round(50 << 20, Some(50 << 20), Duration::from_secs(1), 5 << 20);
        assert_eq!(
            calm.decide(&limits, &standing(1, 64 << 20, 1)),
            Decision::Continue
        );
    }

    #[test]
    fn post_copy_comes_after_throttling_and_instead_of_giving_up() {
        let e = outrun();
        let postcopy = Limits {
            allow_postcopy: true,
            ..Limits::default()
        };
        // Pre-copy alone never converges: post-copy at once, saying why.
        let Decision::PostCopy { why } = e.decide(&postcopy, &standing(1, 64 << 20, 1)) else {
            panic!("should go post-copy");
        };
        assert!(why.contains("does not converge"), "{why}");
        // Both allowed: the throttle first, post-copy once it is at its ceiling.
        let both = Limits {
            allow_throttle: true,
            ..postcopy
        };
        assert!(matches!(
            e.decide(&both, &standing(1, 64 << 20, 1)),
            Decision::Throttle { .. }
        ));
        let at_max = Standing {
            throttle: MAX_THROTTLE,
            ..standing(5, 64 << 20, 5)
        };
        assert!(matches!(
            e.decide(&both, &at_max),
            Decision::PostCopy { .. }
        ));
        // A guest pre-copy handles is never handed over early, and at the deadline post-copy
        // replaces giving up.
        let mut calm = Estimates::default();
        calm.record_round(50 << 20, Some(50 << 20), Duration::from_secs(1), 5 << 20);
        assert_eq!(
            calm.decide(&postcopy, &standing(1, 64 << 20, 1)),
            Decision::Continue
        );
        assert!(matches!(
            calm.decide(&postcopy, &standing(9, 64 << 20, 60)),
            Decision::PostCopy { .. }
        ));
    }

    #[test]
    fn incompressible_pages_turn_compression_off_even_on_a_slow_link() {
        let mut e = Estimates::default();
        e.record_round(64 << 20, Some(64 << 20), Duration::from_secs(1), 0);
        // Before any measurement the assumed ratio of 2 makes lz4 worth trying at 64 MiB/s...
        assert!(e.compression_pays(2));
        // ...and a round of pages that did not shrink ends that.
        e.record_compression(64 << 20, 64 << 20, Duration::from_millis(50));
        assert!(!e.compression_pays(2));
    }

    #[test]
    fn predicts_the_precopy_time_only_when_it_converges() {
        let mut e = Estimates::default();
        e.record_round(100 << 20, Some(100 << 20), Duration::from_secs(1), 50 << 20);
        // 100 MiB at 100 MiB/s, then 50, 25, ...: under 2 s.
        let t = e
            .precopy_time(100 << 20, Duration::from_millis(50))
            .unwrap();
        assert!(
            t > Duration::from_secs(1) && t < Duration::from_secs(2),
            "{t:?}"
        );
        assert_eq!(
            outrun().precopy_time(100 << 20, Duration::from_millis(50)),
            None
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
