//! Godwit's migration transports.
//!
//! # Why frames and not byte streams
//!
//! The migration engine speaks in self-contained messages (a control message,
//! a batch of guest pages, an end-of-round marker). TCP carries bytes, but the
//! RDMA verbs transport that comes next carries *messages*: a send work
//! request delivers exactly one buffer to one posted receive. Making the
//! abstraction a frame ([`FrameSink::send`] / [`FrameSource::recv`]) lets both
//! transports implement it natively; TCP adds a length prefix, RDMA needs none.
//!
//! A frame is sent as a list of parts (`&[&[u8]]`) so that a small header and
//! a large page payload that live in different buffers travel without being
//! copied into one: TCP uses vectored writes, RDMA a scatter/gather list.
//!
//! # Why a control channel and N data channels
//!
//! One TCP stream does not fill a fast link, and one stream makes a small
//! control message wait behind megabytes of pages. A [`Connection`] therefore
//! holds one latency-sensitive control [`Channel`] and N bulk data channels
//! that the engine drives from N threads.
//!
//! # Trust
//!
//! The receiver treats the sender as untrusted: every length is checked before
//! memory is allocated for it ([`MAX_FRAME_LEN`]), and preambles are validated
//! before a socket joins a connection.

#![warn(missing_docs)]

mod error;
mod frame;
mod preamble;
pub mod probe;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod secure;
mod tcp;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

pub use error::{PreambleReason, TransportError};
pub use tcp::{TcpListener, TcpTransport};

/// Largest frame a receiver accepts, in bytes (4 MiB).
///
/// A page batch of 256 pages is 1 MiB of payload plus 4 KiB of addresses,
/// so this leaves ample room while bounding what an untrusted peer can make
/// the receiver allocate per channel.
pub const MAX_FRAME_LEN: usize = 4 << 20;

/// Largest number of data streams one connection may have.
pub const MAX_STREAMS: u16 = 64;

/// Sends frames on one channel.
pub trait FrameSink: Send {
    /// Sends one frame whose content is the concatenation of `parts`.
    ///
    /// The frame is either sent whole or an error is returned; after an error
    /// the channel must not be used any more.
    fn send(&mut self, parts: &[&[u8]]) -> Result<(), TransportError>;

    /// Pushes out frames that the transport may have queued.
    fn flush(&mut self) -> Result<(), TransportError>;

    /// The RDMA sink behind this trait object, for the operations only RDMA
    /// has ([`rdma::RdmaSink::write_pages`]: pages written straight into the
    /// receiver's registered guest memory). `None` for other transports.
    #[cfg(feature = "rdma")]
    fn as_rdma(&mut self) -> Option<&mut rdma::RdmaSink> {
        None
    }
}

/// Receives frames from one channel.
pub trait FrameSource: Send {
    /// Receives the next frame into `buf`, resized to the frame's length.
    ///
    /// Returns `Ok(false)` on a clean end of stream at a frame boundary. A
    /// stream that ends inside a frame is [`TransportError::Truncated`]; a
    /// frame longer than the limit is [`TransportError::FrameTooLarge`].
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, TransportError>;
}

/// Transport-specific operations on a whole channel, shared by the halves.
pub trait ChannelControl: Send + Sync {
    /// Shuts the channel down in both directions: a reader on either side is
    /// woken with end of stream or an error. Used to abort a migration.
    fn shutdown(&self) -> Result<(), TransportError>;

    /// Sets how long [`FrameSource::recv`] may block (`None`: forever).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError>;

    /// Sets how long one write of [`FrameSink::send`] (or a flush) may block on a peer that
    /// takes nothing (`None`: forever).
    fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError>;

    /// The peer's address, for messages.
    fn peer(&self) -> &str;
}

/// A cloneable handle that can abort a channel from any thread.
#[derive(Clone)]
pub struct AbortHandle(Arc<dyn ChannelControl>);

impl AbortHandle {
    /// Shuts the channel down (see [`ChannelControl::shutdown`]).
    pub fn shutdown(&self) -> Result<(), TransportError> {
        self.0.shutdown()
    }
}

impl fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AbortHandle").field(&self.0.peer()).finish()
    }
}

/// One connection: a frame sink and a frame source, plus control of the whole.
pub struct Channel {
    /// Sending half.
    pub sink: Box<dyn FrameSink>,
    /// Receiving half.
    pub source: Box<dyn FrameSource>,
    control: Arc<dyn ChannelControl>,
}

impl Channel {
    /// Assembles a channel from a transport's halves.
    pub fn new(
        sink: Box<dyn FrameSink>,
        source: Box<dyn FrameSource>,
        control: Arc<dyn ChannelControl>,
    ) -> Self {
        Channel {
            sink,
            source,
            control,
        }
    }

    /// Shuts the channel down in both directions, waking a blocked reader on
    /// either side.
    pub fn shutdown(&self) -> Result<(), TransportError> {
        self.control.shutdown()
    }

    /// Sets how long a receive may block (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.control.set_read_timeout(timeout)
    }

    /// Sets how long one write may block (`None`: forever).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.control.set_write_timeout(timeout)
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        self.control.peer()
    }

    /// A handle that can abort this channel after the halves moved elsewhere.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle(Arc::clone(&self.control))
    }

    /// The same channel with its halves wrapped (say, sealed).
    pub fn map(
        self,
        sink: impl FnOnce(Box<dyn FrameSink>) -> Box<dyn FrameSink>,
        source: impl FnOnce(Box<dyn FrameSource>) -> Box<dyn FrameSource>,
    ) -> Channel {
        Channel {
            sink: sink(self.sink),
            source: source(self.source),
            control: self.control,
        }
    }

    /// Splits the channel so the halves can go to different threads.
    pub fn into_parts(self) -> (Box<dyn FrameSink>, Box<dyn FrameSource>, AbortHandle) {
        (self.sink, self.source, AbortHandle(self.control))
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.control.peer())
            .finish_non_exhaustive()
    }
}

/// One migration connection: a control channel and N data channels.
#[derive(Debug)]
pub struct Connection {
    /// Low-latency channel for control messages.
    pub control: Channel,
    /// Bulk channels for page batches, in stream-index order.
    pub data: Vec<Channel>,
}

/// Options for [`Transport::connect`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// How long each connection attempt may take.
    pub connect_timeout: Duration,
    /// How long to wait for the receiver to accept the whole connection.
    pub handshake_timeout: Duration,
    /// Send/receive socket buffer size for data streams (`None`: OS default).
    pub data_socket_buffer: Option<usize>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            data_socket_buffer: Some(DEFAULT_DATA_SOCKET_BUFFER),
        }
    }
}

/// Default socket buffer size for data streams (4 MiB): enough in flight to
/// fill a 10-25 Gbit/s link at data-center round-trip times.
pub const DEFAULT_DATA_SOCKET_BUFFER: usize = 4 << 20;

/// A way of moving frames between the two hosts (TCP now, RDMA next).
pub trait Transport: Send + Sync {
    /// Short name for logs and the command line, e.g. `"tcp"`.
    fn name(&self) -> &'static str;

    /// Opens a connection with one control channel and `streams` data
    /// channels to a listener at `addr` (`HOST:PORT`). Returns once the
    /// receiver has accepted every channel.
    fn connect(
        &self,
        addr: &str,
        streams: NonZeroUsize,
        opts: &ConnectOptions,
    ) -> Result<Connection, TransportError>;

    /// Listens on `addr` (`HOST:PORT`, port 0 for any).
    fn listen(&self, addr: &str) -> Result<Box<dyn TransportListener>, TransportError>;
}

/// Accepts connections made by [`Transport::connect`].
pub trait TransportListener: Send {
    /// Waits up to `timeout` for one whole connection (control and every data
    /// channel). A refused socket makes this return an error; the listener
    /// stays usable and keeps partially arrived connections, so the caller
    /// may call `accept` again.
    fn accept(&mut self, timeout: Duration) -> Result<Connection, TransportError>;

    /// The address actually listened on (useful with port 0).
    fn local_addr(&self) -> SocketAddr;
}
