//! The phases of a migration on each side, and which transitions are legal.
//!
//! ```text
//!  source:       Handshake -> PreCopy(1) -> PreCopy(n) -> StopAndCopy -> AwaitRestored -> Committed -> Completed
//!                    \_____________\______________\______________\______________/             \
//!                                   any failure here: resume the VM on the source               in doubt: stay paused
//!  destination:  Handshake -> Receiving -> Restoring -> AwaitCommit -> Running
//!                    \____________\____________\_____________/
//!                          any failure here: discard the VM
//! ```
//!
//! Post-copy (`--allow-postcopy`) adds one phase on each side after the commit, `PostCopy`:
//! the VM runs on the destination while the pages still stale there arrive. A failure of
//! either side in it loses the guest's newest state (see the README); the source keeps its
//! paused copy, as of the switchover, until the destination has every page.
//!
//! `Committed` is the point of no return: once the source has sent `Commit` it never runs the
//! guest again on its own, because the destination may already be running it. Before that,
//! any failure, cancel or timeout leaves the VM running on the source.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Where the source is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourcePhase {
    /// Connecting and agreeing on the VM's shape.
    Handshake,
    /// Copying memory while the guest runs; the round number.
    PreCopy(u32),
    /// The guest is paused; the last dirty pages and the state are crossing.
    StopAndCopy,
    /// Waiting for the destination to load everything.
    AwaitRestored,
    /// `Commit` sent: the point of no return.
    Committed,
    /// The VM runs on the destination, which fetches the pages still here (post-copy).
    PostCopy,
    /// The destination confirmed it runs the VM; the source released it.
    Completed,
    /// Given up before the point of no return; the VM runs on the source.
    Failed,
    /// Cancelled by the operator before the point of no return; the VM runs on the source.
    Cancelled,
}

impl SourcePhase {
    /// Whether `self -> next` is a legal step.
    pub fn can_go_to(self, next: Self) -> bool {
        use SourcePhase::*;
        match (self, next) {
            (Handshake, PreCopy(1)) => true,
            (PreCopy(a), PreCopy(b)) => b == a + 1,
            (PreCopy(_), StopAndCopy) => true,
            (StopAndCopy, AwaitRestored) => true,
            (AwaitRestored, Committed) => true,
            (Committed, Completed | PostCopy) => true,
            (PostCopy, Completed | Failed) => true,
            (Handshake | PreCopy(_) | StopAndCopy | AwaitRestored, Failed | Cancelled) => true,
            // After the commit the source cannot take the VM back; a failure there is "in doubt"
            // and reported as failed with the VM left paused.
            (Committed, Failed) => true,
            _ => false,
        }
    }

    /// The phase's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::PreCopy(_) => "pre_copy",
            Self::StopAndCopy => "stop_and_copy",
            Self::AwaitRestored => "await_restored",
            Self::Committed => "committed",
            Self::PostCopy => "post_copy",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether a failure in this phase must resume the VM on the source.
    pub fn resumes_on_failure(self) -> bool {
        !matches!(self, Self::Committed | Self::PostCopy | Self::Completed)
    }
}

/// Where the destination is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationPhase {
    /// Judging the source's VM and building an empty one.
    Handshake,
    /// Writing incoming pages.
    Receiving,
    /// Loading vCPU and device state.
    Restoring,
    /// Loaded; waiting for the source's commit.
    AwaitCommit,
    /// The VM runs here while the pages still stale here arrive (post-copy).
    PostCopy,
    /// The VM runs here.
    Running,
    /// Given up; the VM here is discarded and never ran.
    Failed,
}

impl DestinationPhase {
    /// Whether `self -> next` is a legal step.
    pub fn can_go_to(self, next: Self) -> bool {
        use DestinationPhase::*;
        matches!(
            (self, next),
            (Handshake, Receiving)
                | (Receiving, Restoring)
                | (Restoring, AwaitCommit)
                | (AwaitCommit, Running | PostCopy)
                | (PostCopy, Running)
                | (
                    Handshake | Receiving | Restoring | AwaitCommit | PostCopy,
                    Failed
                )
        )
    }
}

/// A phase and its history, so that a report can say how long each phase took and an illegal
/// step is caught where it happens.
#[derive(Debug)]
pub struct PhaseLog<P> {
    current: P,
    since: Instant,
    history: Vec<(P, Duration)>,
}

impl<P: Copy + PartialEq + std::fmt::Debug> PhaseLog<P> {
    /// Starts in `first`.
    pub fn new(first: P) -> Self {
        Self {
            current: first,
            since: Instant::now(),
            history: Vec::new(),
        }
    }

    /// The current phase.
    pub fn current(&self) -> P {
        self.current
    }

    /// Moves to `next` if `legal(current, next)`; an illegal step is a bug in the driver.
    pub fn go(&mut self, next: P, legal: impl Fn(P, P) -> bool) {
        debug_assert!(
            legal(self.current, next),
            "illegal phase step {:?} -> {next:?}",
            self.current
        );
        let now = Instant::now();
        self.history.push((self.current, now - self.since));
        self.current = next;
        self.since = now;
    }

    /// Each phase left so far with its duration.
    pub fn history(&self) -> &[(P, Duration)] {
        &self.history
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_cannot_skip_or_go_back() {
        use SourcePhase::*;
        assert!(Handshake.can_go_to(PreCopy(1)));
        assert!(!Handshake.can_go_to(StopAndCopy));
        assert!(!PreCopy(2).can_go_to(PreCopy(2)));
        assert!(!Committed.can_go_to(Cancelled));
        assert!(!Completed.can_go_to(Failed));
        assert!(!Failed.can_go_to(PreCopy(1)));
        assert!(AwaitRestored.resumes_on_failure());
        assert!(!Committed.resumes_on_failure());
    }

    #[test]
    fn the_destination_runs_only_after_commit() {
        use DestinationPhase::*;
        assert!(!Receiving.can_go_to(Running));
        assert!(!Restoring.can_go_to(Running));
        assert!(AwaitCommit.can_go_to(Running));
        assert!(!Running.can_go_to(Failed));
    }

    #[test]
    fn the_log_keeps_history() {
        let mut log = PhaseLog::new(SourcePhase::Handshake);
        log.go(SourcePhase::PreCopy(1), SourcePhase::can_go_to);
        assert_eq!(log.current(), SourcePhase::PreCopy(1));
        assert_eq!(log.history().len(), 1);
    }
}
