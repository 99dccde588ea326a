//! What a migration reports: live progress while it runs, and the final report.

use serde::{Deserialize, Serialize};

/// How a migration ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The VM runs on the destination; the source released it.
    Completed,
    /// The migration was abandoned; see `error` for where the VM runs.
    Failed,
    /// The operator cancelled it; the VM runs on the source.
    Cancelled,
}

/// One pre-copy (or the final stop-and-copy) round.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundReport {
    /// Round number, from 1.
    pub round: u32,
    /// Pages the round had to send.
    pub pages: u64,
    /// Of those, pages that were all zero (sent as an address only).
    pub zero_pages: u64,
    /// Bytes put on the wire (headers, addresses, page data).
    pub wire_bytes: u64,
    /// How long the round took.
    pub ms: f64,
    /// Whether the round compressed.
    pub compressed: bool,
    /// Raw page bytes / compressed bytes of what the round compressed (1.0 when it did not).
    pub compression_ratio: f64,
    /// Non-zero page bytes moved per second: the link as the pipeline saw it.
    pub page_bytes_per_sec: f64,
    /// Pages the guest dirtied while the round ran: its working set over the round.
    pub dirtied_pages: u64,
    /// The same as a rate.
    pub dirty_bytes_per_sec: f64,
    /// How much the guest was throttled during the round, in percent.
    pub throttle_percent: u32,
}

/// One step up (or back down) the escalation ladder, and the measurements behind it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Escalation {
    /// Taken after this round (before the next).
    pub round: u32,
    /// `compress`, `stop compressing`, `throttle`.
    pub step: String,
    /// The level and why.
    pub detail: String,
}

/// One phase of the source and its duration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PhaseTime {
    /// The phase (`handshake`, `pre_copy`, `stop_and_copy`, ...).
    pub phase: String,
    /// The pre-copy round, for `pre_copy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// How long it took.
    pub ms: f64,
}

/// Where the pause went, step by step (all measured on the source).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PauseSteps {
    /// Pausing the vCPUs and sending the last dirty pages.
    pub last_pages_ms: f64,
    /// Saving vCPU, interrupt controller, clock and device state.
    pub save_state_ms: f64,
    /// Sending the state until the destination reported it loaded (includes the destination
    /// finishing the last pages).
    pub restore_ms: f64,
    /// The commit round trip until the destination runs the VM.
    pub commit_ms: f64,
}

/// What the plane probe measured before round 1 (`--transport auto` with RDMA on both hosts).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct PlaneProbe {
    /// TCP: frames of a full batch on every stream.
    pub tcp_bytes_per_sec: f64,
    /// RDMA: WRITEs from registered memory into registered memory on every stream.
    pub rdma_bytes_per_sec: f64,
    /// How long each plane's burst lasted.
    pub burst_ms: f64,
}

/// Progress while a migration runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// The current round.
    pub round: u32,
    /// Bytes put on the wire so far.
    pub transferred_bytes: u64,
    /// Bytes of dirty pages still to send in this round.
    pub remaining_bytes: u64,
    /// Current transfer rate, page bytes per second.
    pub rate_bytes_per_sec: f64,
    /// Rate at which the guest dirtied memory in the last round.
    pub dirty_bytes_per_sec: f64,
    /// Estimated seconds until the migration ends: it counts down, and rises only with
    /// `eta_rose_because`.
    pub eta_secs: f64,
    /// Why the ETA just went up (which measurement moved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_rose_because: Option<String>,
    /// How much the guest is throttled, in percent.
    pub throttle_percent: u32,
}

/// The final report (also the `--json` output).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// How it ended.
    pub outcome: Outcome,
    /// Why it failed, and where the VM runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the VM still runs on the source.
    pub vm_on_source: bool,
    /// From the start of the handshake to the destination's confirmation.
    pub total_ms: f64,
    /// From pausing the guest on the source to the destination's confirmation that it runs.
    pub downtime_ms: f64,
    /// Where the pause went.
    pub pause_steps: PauseSteps,
    /// The pause predicted at switchover.
    pub predicted_downtime_ms: f64,
    /// Bytes put on the wire.
    pub bytes_sent: u64,
    /// Guest RAM.
    pub guest_memory_bytes: u64,
    /// Rounds, including the final one.
    pub rounds: u32,
    /// Pages found all zero, over all rounds.
    pub zero_pages: u64,
    /// Raw page bytes / bytes of page data on the wire (1.0 when nothing was compressed).
    pub compression_ratio: f64,
    /// Transport name.
    pub transport: String,
    /// Why RDMA was not used when `--transport auto` wanted it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport_fallback: Option<String>,
    /// What the plane probe measured, when `--transport auto` had RDMA and TCP to pick from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plane_probe: Option<PlaneProbe>,
    /// On RDMA: how long pinning this host's guest memory took (before the first round).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdma_registration_ms: Option<f64>,
    /// Data streams used.
    pub streams: usize,
    /// Worker threads used.
    pub threads: usize,
    /// Each round.
    pub round_details: Vec<RoundReport>,
    /// The deadline the migration had.
    pub deadline_ms: f64,
    /// The escalation steps taken, in order.
    pub escalations: Vec<Escalation>,
    /// Each phase the source went through and how long it took.
    pub phases: Vec<PhaseTime>,
    /// The post-copy phase, when the migration ended in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostCopyReport>,
}

/// What post-copy moved and what it cost the guest.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PostCopyReport {
    /// Pages stale on the destination when the VM moved (dirtied since they were sent).
    pub stale_pages: u64,
    /// Of those, pages sent on demand, ahead of the background push.
    pub urgent_pages: u64,
    /// From the VM running on the destination until it had every page.
    pub ms: f64,
    /// Pages the guest waited for on the destination.
    pub faults: u64,
    /// Of those, pages it waited for until the source sent them on demand.
    pub fetched: u64,
    /// Mean wait for such a page, in microseconds.
    pub mean_wait_us: u64,
    /// Longest wait for such a page, in microseconds.
    pub max_wait_us: u64,
}
