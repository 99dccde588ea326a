//! Control messages, versioned and bounded.
//!
//! Every control frame is `b"GDWM"`, the protocol version (u16, little-endian), then one
//! [`Message`] in bincode with a size limit. A peer speaking another version gets a refusal
//! that names both versions, never a misparse.

use bincode::Options;
use crossbeam_channel::{unbounded, Receiver};
use godwit_transport::FrameSource;
use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use super::MigrationError;
use crate::vmm::memory::MemoryLayout;
use crate::vmm::state::VmState;

/// The control protocol's magic.
const MAGIC: &[u8; 4] = b"GDWM";
/// The version this build speaks. Bump it on any change to [`Message`] or the batch format.
pub const PROTOCOL_VERSION: u16 = 4;
/// The largest control message accepted (a VM state is about 10 KiB a vCPU).
const MAX_MESSAGE: u64 = 2 << 20;

/// Most pages in one `PageRequest`.
pub const MAX_PAGE_REQUEST: usize = 256;
/// Most pages in one `UrgentPages`.
pub const MAX_URGENT_PAGES: usize = 64;
/// Most bitmap words in one `StalePages` (1 MiB).
pub const MAX_STALE_WORDS: usize = 1 << 17;

/// What the source says first: everything the destination needs to judge and build the VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Guest RAM.
    pub layout: MemoryLayout,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The CPUID the guest runs with; the destination must offer every feature in it.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest's TSC frequency.
    pub tsc_khz: u32,
    /// Number of data streams that follow the control channel.
    pub streams: u16,
    /// The migration this is: the destination accepts only the one it was started for.
    pub migration_id: String,
}

/// A page the destination asked for in post-copy: its data, or empty for a zero page.
#[derive(Debug, Serialize, Deserialize)]
pub struct UrgentPage {
    /// Guest physical address.
    pub gpa: u64,
    /// The page (4 KiB), or empty when it is all zero.
    pub data: Vec<u8>,
}

/// What post-copy cost the guest, measured on the destination.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PostCopyFigures {
    /// Pages the guest (or KVM for it) waited for.
    pub faults: u64,
    /// Of those, pages fetched from the source on demand (the rest arrived meanwhile).
    pub fetched: u64,
    /// The longest wait for a fetched page, in microseconds.
    pub max_wait_us: u64,
    /// The mean wait for a fetched page, in microseconds.
    pub mean_wait_us: u64,
}

/// One control message.
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// Source to destination: the handshake.
    Hello(Box<Hello>),
    /// Source to destination, instead of `Hello`: `godwit forecast` times a burst on the
    /// data streams (each ending with the transport's end-of-burst frame) and goes; the
    /// destination answers `Accept` or `Refuse`, then `ProbeDrained`, and waits on for the VM.
    ProbeLink {
        /// The migration the forecast is for: only its receiver answers.
        migration_id: String,
        /// Data streams that follow the control channel.
        streams: u16,
    },
    /// Destination to source: the VM is built and memory may flow (or, after `ProbeLink`,
    /// the burst may come).
    Accept,
    /// Destination to source: the migration is refused, and why (what to fix).
    Refuse(String),
    /// Source to destination, right after `Accept` or after `RdmaAnswer`: page data comes on
    /// the TCP data streams (the RDMA set-up, if any, is dropped).
    UseTcp,
    /// Source to destination, after `RdmaAnswer`: page data comes on the RDMA streams.
    UseRdma,
    /// Source to destination, after `RdmaAnswer`: a short burst on each plane follows, TCP
    /// first, each stream ending with the transport's end-of-burst frame.
    ProbePlanes,
    /// Destination to source: one plane's burst has arrived in full.
    ProbeDrained,
    /// Source to destination, right after `Accept`: the source offers RDMA data streams; its
    /// queue pairs (an opaque, versioned `EndpointInfo` of the transport).
    RdmaOffer(Vec<u8>),
    /// Destination to source: RDMA accepted: its queue pairs and its guest memory, registered
    /// for RDMA WRITE (remote keys cross only here, after the handshake).
    RdmaAnswer {
        /// The destination's `EndpointInfo`.
        endpoint: Vec<u8>,
        /// The destination's registered guest memory (`RemoteMemory`).
        memory: Vec<u8>,
    },
    /// Destination to source: RDMA is not possible here, and why; pages go over TCP.
    RdmaDecline(String),
    /// Destination to source: every page of this pre-copy round is in guest memory. The source
    /// waits for it before the next round, so its rates are end to end and no backlog of
    /// pages sits in buffers when the guest pauses.
    RoundApplied(u32),
    /// Source to destination: the VM is paused, the final round was sent; here is the rest.
    Switchover {
        /// The last round number; each data stream ends it with an end-of-round marker.
        final_round: u32,
        /// When the source paused the guest (ns since the Unix epoch), so the destination
        /// can advance the guest's clocks by the pause.
        paused_at_unix_ns: u64,
        /// vCPU, interrupt controller, clock and device state.
        state: Box<VmState>,
        /// Post-copy: the final round carried no pages; the stale ones (announced in
        /// `StalePages`) follow while the VM runs on the destination.
        postcopy: bool,
    },
    /// Source to destination, in post-copy, before `Switchover`: part of the bitmap of pages
    /// whose copy on the destination is stale (bit i of word w is page 64w+i of the region).
    StalePages {
        /// The RAM region.
        region: u32,
        /// The first word of the region these words start at.
        first_word: u32,
        /// The words.
        words: Vec<u64>,
    },
    /// Destination to source, in post-copy: the guest waits for these pages (at most
    /// [`MAX_PAGE_REQUEST`]).
    PageRequest(Vec<u64>),
    /// Source to destination, in post-copy: pages asked for, on the control channel, which
    /// carries nothing else then, so they overtake the background push (at most
    /// [`MAX_URGENT_PAGES`]).
    UrgentPages(Vec<UrgentPage>),
    /// Destination to source, in post-copy: every stale page has arrived; the source may
    /// release its copy.
    PostCopyDone(PostCopyFigures),
    /// Destination to source: all memory and state are loaded; waiting for the commit.
    Restored,
    /// Source to destination: the point of no return. The source will not run the VM again.
    Commit,
    /// Destination to source: the VM runs here now; the source may release it.
    Resumed,
    /// Either side: the migration is abandoned, and why.
    Abort(String),
}

impl Message {
    /// Short name for errors ("expected Accept, got Refuse").
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "Hello",
            Self::ProbeLink { .. } => "ProbeLink",
            Self::Accept => "Accept",
            Self::Refuse(_) => "Refuse",
            Self::UseTcp => "UseTcp",
            Self::UseRdma => "UseRdma",
            Self::ProbePlanes => "ProbePlanes",
            Self::ProbeDrained => "ProbeDrained",
            Self::RdmaOffer(_) => "RdmaOffer",
            Self::RdmaAnswer { .. } => "RdmaAnswer",
            Self::RdmaDecline(_) => "RdmaDecline",
            Self::RoundApplied(_) => "RoundApplied",
            Self::Switchover { .. } => "Switchover",
            Self::StalePages { .. } => "StalePages",
            Self::PageRequest(_) => "PageRequest",
            Self::UrgentPages(_) => "UrgentPages",
            Self::PostCopyDone(_) => "PostCopyDone",
            Self::Restored => "Restored",
            Self::Commit => "Commit",
            Self::Resumed => "Resumed",
            Self::Abort(_) => "Abort",
        }
    }
}

/// Why a control frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Not a Godwit control frame.
    #[error("the peer is not speaking Godwit's migration protocol (bad magic)")]
    BadMagic,
    /// Another protocol version.
    #[error("the peer speaks migration protocol version {theirs}, this host speaks {ours}; run the same Godwit release on both hosts")]
    Version {
        /// The peer's version.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// The body did not decode.
    #[error("malformed control message: {0}")]
    Malformed(String),
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(MAX_MESSAGE)
        .with_fixint_encoding()
        .reject_trailing_bytes()
}

/// Encodes `msg` as one control frame.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    // Serializing our own in-memory types cannot fail; a state over the limit would be a bug.
    codec()
        .serialize_into(&mut out, msg)
        .expect("control message within the size limit");
    out
}

/// Decodes one control frame from an untrusted peer.
pub fn decode(frame: &[u8]) -> Result<Message, ProtocolError> {
    if frame.len() < 6 || &frame[..4] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let theirs = u16::from_le_bytes([frame[4], frame[5]]);
    if theirs != PROTOCOL_VERSION {
        return Err(ProtocolError::Version {
            theirs,
            ours: PROTOCOL_VERSION,
        });
    }
    codec()
        .deserialize(&frame[6..])
        .map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Reads control messages on a thread of their own, so a driver can wait with a timeout and
/// notice an abort while it is busy with pages. The channel ends after the first error.
pub(crate) fn spawn_inbox(
    mut source: Box<dyn FrameSource>,
) -> Receiver<Result<Message, MigrationError>> {
    let (tx, rx) = unbounded();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        loop {
            let m = match source.recv(&mut buf) {
                Ok(true) => decode(&buf).map_err(MigrationError::from),
                Ok(false) => Err(MigrationError::PeerVanished("the migration")),
                Err(e) => Err(e.into()),
            };
            let stop = m.is_err();
            if tx.send(m).is_err() || stop {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = encode(&Message::Refuse("no".into()));
        assert!(matches!(decode(&f), Ok(Message::Refuse(r)) if r == "no"));
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let mut f = encode(&Message::Commit);
        f[4] = 9;
        assert!(matches!(
            decode(&f),
            Err(ProtocolError::Version { theirs: 9, .. })
        ));
        assert!(matches!(decode(b"HTTP/1.1"), Err(ProtocolError::BadMagic)));
        let mut f = encode(&Message::Commit);
        f.push(0);
        assert!(matches!(decode(&f), Err(ProtocolError::Malformed(_))));
        let f = encode(&Message::Refuse("a long reason".into()));
        for cut in 6..f.len() {
            assert!(decode(&f[..cut]).is_err(), "cut at {cut}");
        }
        // A length prefix claiming gigabytes must not allocate them.
        let mut f = encode(&Message::Refuse(String::new()));
        let n = f.len();
        f[n - 8..].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&f).is_err());
    }
}
