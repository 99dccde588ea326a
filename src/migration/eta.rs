//! The ETA shown while a migration runs: it counts down, and it goes up only with a reason.
//!
//! The estimate itself is the policy's model (the rest of this round at the rate it moves,
//! then the pre-copy rounds the measured dirty and link rates still need, then the pause). A
//! model re-evaluated every 100 ms jitters; a progress bar whose ETA jumps up and down, or
//! runs backwards without a word, is what users of other engines complain of. So the shown
//! ETA only counts down while the estimate stays within [`SLACK`] of it; when the estimate
//! rises beyond that, the ETA jumps up and says which measurement moved.

use std::time::Instant;

/// How far above the counted-down ETA the estimate may go before the ETA is raised.
const SLACK: f64 = 1.1;
/// A rate counts as changed when it moved by this factor.
const CHANGED: f64 = 1.2;

/// What the estimate was built from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Basis {
    /// Bytes per second the guest dirties.
    pub dirty_bytes_per_sec: f64,
    /// Bytes of pages per second the link moves.
    pub page_bytes_per_sec: f64,
}

/// The ETA as shown, and why it last went up.
#[derive(Debug, Default)]
pub struct Eta {
    shown: Option<(f64, Instant, Basis)>,
}

impl Eta {
    /// The ETA to show at `now` for a fresh `estimate` (seconds) made from `basis`, and the
    /// reason when it went up.
    pub fn update(&mut self, now: Instant, estimate: f64, basis: Basis) -> (f64, Option<String>) {
        let Some((shown, at, was)) = self.shown else {
            self.shown = Some((estimate, now, basis));
            return (estimate, None);
        };
        let counted = (shown - now.duration_since(at).as_secs_f64()).max(0.0);
        if estimate <= counted * SLACK + 0.5 {
            // Within the slack (or half a second, for the last moments): keep counting down,
            // or drop to a lower estimate.
            let eta = estimate.min(counted);
            self.shown = Some((eta, now, if eta < counted { basis } else { was }));
            return (eta, None);
        }
        self.shown = Some((estimate, now, basis));
        let mib = |b: f64| b / (1 << 20) as f64;
        let why = if basis.dirty_bytes_per_sec > was.dirty_bytes_per_sec * CHANGED {
            format!(
                "the guest's dirty rate rose from {:.0} to {:.0} MiB/s",
                mib(was.dirty_bytes_per_sec),
                mib(basis.dirty_bytes_per_sec)
            )
        } else if basis.page_bytes_per_sec * CHANGED < was.page_bytes_per_sec {
            format!(
                "the link slowed from {:.0} to {:.0} MiB/s",
                mib(was.page_bytes_per_sec),
                mib(basis.page_bytes_per_sec)
            )
        } else {
            "the last round left more pages dirty than the rates predicted".into()
        };
        (estimate, Some(why))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MIB: f64 = 1048576.0;

    fn basis(dirty: f64, link: f64) -> Basis {
        Basis {
            dirty_bytes_per_sec: dirty * MIB,
            page_bytes_per_sec: link * MIB,
        }
    }

    #[test]
    fn counts_down_through_jitter_and_rises_only_with_a_reason() {
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut eta = Eta::default();
        assert_eq!(eta.update(at(0.0), 10.0, basis(10.0, 100.0)), (10.0, None));
        // A second later the estimate jitters up a little: the ETA still counts down.
        assert_eq!(eta.update(at(1.0), 9.5, basis(11.0, 100.0)), (9.0, None));
        // A lower estimate is taken at once.
        assert_eq!(eta.update(at(2.0), 6.0, basis(10.0, 100.0)), (6.0, None));
        // The guest writes four times as fast: up, and saying so.
        let (shown, why) = eta.update(at(3.0), 20.0, basis(40.0, 100.0));
        assert_eq!(shown, 20.0);
        assert_eq!(
            why.as_deref(),
            Some("the guest's dirty rate rose from 10 to 40 MiB/s")
        );
        // The link halves.
        let (_, why) = eta.update(at(4.0), 60.0, basis(40.0, 50.0));
        assert_eq!(why.as_deref(), Some("the link slowed from 100 to 50 MiB/s"));
    }
}
