//! The one error type of the transport boundary.
//!
//! Every message names what was being done and with whom, and ends with what
//! the operator can do about it: these errors end up verbatim in the output of
//! `godwit send` / `godwit receive`.

use std::io;
use std::time::Duration;

/// Why a stream preamble (the first bytes of every TCP connection) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleReason {
    /// The magic bytes were not `GDWT`.
    #[error("wrong magic {got:02x?} (expected \"GDWT\"); the peer is not godwit, check the port")]
    BadMagic {
        /// The four bytes received instead.
        got: [u8; 4],
    },
    /// The preamble version is not one this build speaks.
    #[error(
        "preamble version {got} is not supported (this side speaks {supported}); \
         run the same godwit version on both hosts"
    )]
    UnsupportedVersion {
        /// Version sent by the peer.
        got: u16,
        /// Version this build speaks.
        supported: u16,
    },
    /// The role byte is neither control nor data.
    #[error("unknown stream role {0}; the peer is not a compatible godwit")]
    BadRole(u8),
    /// A reserved byte was not zero.
    #[error("reserved preamble byte is {0}, not 0; the peer is not a compatible godwit")]
    ReservedNonZero(u8),
    /// The stream count is 0 or above the limit.
    #[error("stream count {count} is outside 1..={max}; lower --streams on the sender")]
    BadStreamCount {
        /// Count announced by the peer.
        count: u16,
        /// Largest count accepted.
        max: u16,
    },
    /// A control connection announced an index other than 0.
    #[error(
        "control connection announced index {0} (must be 0); the peer is not a compatible godwit"
    )]
    BadControlIndex(u16),
    /// A data connection's index is not below the stream count.
    #[error("data stream index {index} is not below the stream count {count}")]
    IndexOutOfRange {
        /// Index announced.
        index: u16,
        /// Count announced.
        count: u16,
    },
    /// A data connection carried a token no pending control connection has.
    #[error(
        "data stream carries an unknown connection token; its control connection never \
         arrived or timed out, retry the migration"
    )]
    UnknownToken,
    /// A control connection reused the token of a pending one.
    #[error("a control connection with the same token is already pending; retry the migration")]
    DuplicateToken,
    /// A data connection's count disagrees with its control connection's.
    #[error("data stream announces {got} streams but its control connection announced {expected}")]
    CountMismatch {
        /// Count announced by the data connection.
        got: u16,
        /// Count announced by the control connection.
        expected: u16,
    },
    /// Two data connections of one group announced the same index.
    #[error("data stream index {0} arrived twice for one connection; retry the migration")]
    DuplicateIndex(u16),
    /// The acknowledgement sent back by the listener was malformed.
    #[error(
        "malformed acknowledgement from the receiver; run the same godwit version on both hosts"
    )]
    BadAck,
    /// The listener refused with a reason code this build does not know.
    #[error(
        "refused by the receiver (reason code {0}); run the same godwit version on both hosts"
    )]
    Unknown(u8),
}

/// Errors of the transport layer (connecting, listening, moving frames).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The address could not be parsed or resolved.
    #[error("cannot resolve address {addr:?}: {source}; give it as HOST:PORT, e.g. 10.0.0.2:7000")]
    Resolve {
        /// Address as given by the operator.
        addr: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Connecting to the receiver failed.
    #[error(
        "cannot connect to {addr}: {source}; is `godwit receive` running there, \
         and is the port open in the firewall?"
    )]
    Connect {
        /// Address connected to.
        addr: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Binding or listening failed.
    #[error(
        "cannot listen on {addr}: {source}; is another process using that port? \
         pick another address or stop it"
    )]
    Bind {
        /// Address listened on.
        addr: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Any other I/O failure, with what was being done and with whom.
    #[error("{op} ({peer}) failed: {source}; check the network between the two hosts and retry")]
    Io {
        /// What was being done, e.g. "sending a frame".
        op: &'static str,
        /// The peer or local address involved.
        peer: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The peer announced a frame longer than the limit.
    #[error(
        "peer {peer} announced a frame of {len} bytes, more than the {max} allowed; \
         the peer is not a compatible godwit or the stream is corrupt"
    )]
    FrameTooLarge {
        /// The peer.
        peer: String,
        /// Announced length.
        len: u64,
        /// Limit.
        max: usize,
    },
    /// This side was asked to send a frame longer than the limit.
    #[error("refusing to send a frame of {len} bytes, more than the {max} allowed; this is a bug in the sender, please report it")]
    SendTooLarge {
        /// Frame length asked for.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error(
        "connection with {peer} ended in the middle of a frame ({got} of {expected} bytes); \
         the peer crashed or the network failed, retry the migration"
    )]
    Truncated {
        /// The peer.
        peer: String,
        /// Bytes received of the frame (or of its length prefix).
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A connection's preamble was refused (by this side, or by the receiver).
    #[error("connection with {peer} refused: {reason}")]
    BadPreamble {
        /// The peer.
        peer: String,
        /// Which check failed.
        reason: PreambleReason,
    },
    /// More data streams were asked for than a connection may have.
    #[error("{requested} data streams requested, at most {max} are supported; lower --streams")]
    TooManyStreams {
        /// Streams asked for.
        requested: usize,
        /// Limit.
        max: u16,
    },
    /// An operation did not complete in time.
    #[error(
        "timed out after {:.1} s {what}; check that the peer is alive, or raise the timeout",
        .after.as_secs_f64()
    )]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// How long was waited.
        after: Duration,
    },
    /// No frame arrived within the channel's read timeout.
    #[error(
        "no data from {peer} within the read timeout{}; check that the peer is alive, \
         or raise the timeout",
        if *mid_frame { " (in the middle of a frame: the channel is now unusable)" } else { "" }
    )]
    ReadTimeout {
        /// The peer.
        peer: String,
        /// True when the timeout hit inside a frame: the channel lost frame
        /// sync and further receives fail with [`TransportError::Desynchronized`].
        mid_frame: bool,
    },
    /// The peer closed the connection where a message was required.
    #[error("peer {peer} closed the connection while {what}; see the peer's log for why")]
    PeerClosed {
        /// The peer.
        peer: String,
        /// What was being done.
        what: &'static str,
    },
    /// An RDMA data channel failed (a completion error, a queue pair in the
    /// error state, a malformed message), or refused a request before
    /// posting anything (`broken` false: the channel is still usable).
    #[error(
        "RDMA channel with {peer}: {detail}{}",
        if *broken {
            "; this connection cannot be used any more: abort and retry the migration, \
             or use --transport tcp"
        } else {
            " (refused before anything was sent; the channel is still usable)"
        }
    )]
    Rdma {
        /// The peer.
        peer: String,
        /// What failed, with the verbs layer's own hint.
        detail: String,
        /// Whether the channel is unusable from now on.
        broken: bool,
    },
    /// A sealed frame did not open, or a data stream did not prove its session.
    #[error("channel security: {0}; abort and retry the migration, and check the network path")]
    Sealing(String),
    /// A previous receive timed out mid-frame, so frame boundaries are lost.
    #[error(
        "channel with {peer} lost frame sync after a receive timed out mid-frame; \
         it cannot be used any more, abort and retry the migration"
    )]
    Desynchronized {
        /// The peer.
        peer: String,
    },
}

impl TransportError {
    /// Wraps an I/O error with context.
    pub(crate) fn io(op: &'static str, peer: &str, source: io::Error) -> Self {
        TransportError::Io {
            op,
            peer: peer.to_owned(),
            source,
        }
    }
}

/// True for the error kinds a socket read/write timeout produces.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
