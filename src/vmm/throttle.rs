//! Slowing a guest down in small time slices, so that pre-copy can catch up with a guest that
//! dirties memory faster than the link moves it (QEMU's auto-converge works the same way).
//!
//! While the throttle is above zero, a ticker thread kicks every vCPU out of `KVM_RUN` once per
//! [`PERIOD`]; each vCPU thread then stays out of the guest for that share of the period
//! before it runs again (still answering pause, save and exit requests meanwhile). A guest
//! throttled to 60% therefore runs 4 ms of every 10 ms: short enough that it sees many small
//! stalls rather than one long one.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::VmmError;

/// One throttling time slice: kick, sit out the throttled share, run the rest.
pub const PERIOD: Duration = Duration::from_millis(10);
/// The most a guest is throttled: it always keeps a sliver of CPU (as QEMU's 99% cap).
pub const MAX_PERCENT: u32 = 99;

/// The throttle level the vCPU threads read after each kick.
#[derive(Debug, Default)]
pub struct Level(AtomicU32);

impl Level {
    /// Percent of each period the guest is kept out of its vCPUs.
    pub fn percent(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the level to `percent` (capped at [`MAX_PERCENT`]); returns the level set.
    pub fn set(&self, percent: u32) -> u32 {
        let p = percent.min(MAX_PERCENT);
        self.0.store(p, Ordering::Relaxed);
        p
    }

    /// How long a kicked vCPU stays out of the guest.
    pub fn sit_out(&self) -> Duration {
        PERIOD * self.percent() / 100
    }
}

/// The ticker of a throttled VM; stopping it (or dropping it) joins its thread, so no kick
/// reaches a vCPU thread after the VM let it go.
#[derive(Debug)]
pub struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts kicking `kick` every [`PERIOD`].
    pub fn start(kick: impl Fn() + Send + 'static) -> Result<Self, VmmError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(PERIOD);
                    kick();
                }
            })
            .map_err(VmmError::Thread)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_is_a_share_of_each_period_and_never_all_of_it() {
        let l = Level::default();
        assert_eq!(l.sit_out(), Duration::ZERO);
        assert_eq!(l.set(60), 60);
        assert_eq!(l.sit_out(), Duration::from_millis(6));
        assert_eq!(l.set(150), MAX_PERCENT);
    }

    #[test]
    fn a_stopped_ticker_kicks_no_more() {
        let n = Arc::new(AtomicU32::new(0));
        let c = n.clone();
        let t = Ticker::start(move || {
            c.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        std::thread::sleep(PERIOD * 5);
        drop(t);
        let after = n.load(Ordering::Relaxed);
        assert!(after >= 1, "the ticker never kicked");
        std::thread::sleep(PERIOD * 3);
        assert_eq!(n.load(Ordering::Relaxed), after);
    }
}
