//! The live-migration engine.
//!
//! A migration is a conversation between a source (which runs the VM) and a destination (which
//! will), over one transport connection: a control channel and N data streams.
//!
//! ```text
//!  source                                   destination
//!    | -- Hello (version, layout, vCPUs, CPUID, TSC) --> |  judge: can this host run it?
//!    | <------------- Accept | Refuse(reason) --------- |  build an empty, paused VM
//!    | == round 1: every page (data streams) =========> |  write pages (validated)
//!    | == round n: pages dirtied during round n-1 ====> |
//!    |    ... until the rest fits the downtime budget   |
//!  pause                                                |
//!    | == final round: the last dirty pages ==========> |
//!    | -- Switchover (vCPU, irqchip, clock, devices) --> |  load the state
//!    | <------------------ Restored -------------------- |
//!    | -- Commit ---------------------------------------> |  point of no return
//!    | <------------------ Resumed --------------------- |  the VM runs here
//!  release
//! ```
//!
//! Until the source sends `Commit`, any failure, timeout or cancel resumes the VM on the source
//! and the destination discards its copy, which never ran. See [`phase`] for the state machines.
//!
//! When pre-copy cannot converge and the user allows it, the final round carries no pages and
//! the VM runs on the destination before all of its memory is there: [`postcopy`].

pub mod batch;
pub mod dataplane;
pub mod destination;
pub mod eta;
pub mod faults;
pub mod forecast;
pub mod phase;
pub mod pipeline;
pub mod policy;
pub mod postcopy;
pub mod protocol;
pub mod report;
pub mod source;

use godwit_transport::TransportError;

use crate::vmm::VmmError;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The peer did not authenticate, or this side could not.
    #[error(transparent)]
    Auth(#[from] godwit_transport::secure::AuthError),
    /// A control message was bad.
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    /// A page batch was bad.
    #[error("refused a malformed page batch: {0}")]
    Batch(#[from] batch::BatchError),
    /// The VMM failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The destination refused the VM.
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// The peer gave up.
    #[error("the peer abandoned the migration: {0}")]
    PeerAborted(String),
    /// The peer closed the connection.
    #[error("the peer closed the connection during {0}")]
    PeerVanished(&'static str),
    /// The peer sent a message out of turn.
    #[error("protocol violation: expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol called for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The peer did not answer in time.
    #[error("no answer from the peer within {secs} s while waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        secs: u64,
    },
    /// The pipeline made no progress.
    #[error("no progress for {secs} s while {what}; the link or the peer is stalled")]
    Stalled {
        /// What made no progress.
        what: &'static str,
        /// For how long.
        secs: u64,
    },
    /// The operator cancelled.
    #[error("cancelled by the operator")]
    Cancelled,
    /// Pre-copy did not converge.
    #[error("{0}")]
    NotConverged(String),
    /// Guest memory could not be read or written.
    #[error("guest memory access failed: {0}")]
    Memory(String),
    /// The page pipeline is gone.
    #[error("the page pipeline stopped")]
    PipelineClosed,
    /// A stream carried a batch of the wrong round.
    #[error("stream {stream} carried a batch of round {got} during round {expected}")]
    StreamOrder {
        /// Stream index.
        stream: usize,
        /// The round in progress.
        expected: u32,
        /// The batch's round.
        got: u32,
    },
    /// A round ended with batches missing.
    #[error(
        "stream {stream} ended round {round} announcing {announced} batches but {received} arrived"
    )]
    RoundIncomplete {
        /// Stream index.
        stream: usize,
        /// The round.
        round: u32,
        /// Batches the source sent.
        announced: u64,
        /// Batches that arrived.
        received: u64,
    },
    /// Post-copy failed on the destination: the VM there cannot go on.
    #[error(
        "post-copy failed: {0}; the guest's newest memory was split between the hosts, so its \
         copy here is stopped and lost; the source keeps its paused copy, the guest as of the \
         switchover: `godwit resume` it there (what the guest did here since is lost) or \
         `godwit stop` it"
    )]
    PostCopyLost(String),
    /// A data stream failed on the destination.
    #[error("data stream {stream} failed: {error}")]
    Stream {
        /// Stream index.
        stream: usize,
        /// What happened.
        error: String,
    },
}
