//! The TCP transport.
//!
//! One [`Connection`] is N+1 TCP sockets: a control socket (`TCP_NODELAY`, so
//! small control messages are not held back by Nagle's algorithm) and N data
//! sockets with large send/receive buffers (so each stream keeps enough bytes
//! in flight to fill the link). The sockets are tied together by the
//! preamble described in `preamble.rs`; frames are length-prefixed
//! (`frame.rs`).
//!
//! `accept` polls a non-blocking listening socket so that it can honour its
//! timeout without `unsafe` system calls; the few milliseconds of polling
//! delay are paid once per migration.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::error::{is_timeout, PreambleReason, TransportError};
use crate::frame::{StreamSink, StreamSource};
use crate::preamble::{decode_ack, encode_ack, new_token, Preamble, Role, ACK_LEN, PREAMBLE_LEN};
use crate::{
    Channel, ChannelControl, ConnectOptions, Connection, Transport, TransportListener,
    DEFAULT_DATA_SOCKET_BUFFER, MAX_FRAME_LEN, MAX_STREAMS,
};

/// How long a half-arrived connection is kept waiting for its other sockets.
const PENDING_TTL: Duration = Duration::from_secs(60);
/// At most this many half-arrived connections are kept (oldest dropped first).
const MAX_PENDING: usize = 16;
/// Longest a single accepted socket may take to send its preamble.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Sleep between polls of the non-blocking listening socket.
const ACCEPT_POLL: Duration = Duration::from_millis(2);
/// Backlog of the listening socket: room for every stream of a connection.
const BACKLOG: i32 = 128;

/// Moves frames over TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpTransport;

/// Whole-channel operations on one TCP socket.
#[derive(Debug)]
struct TcpControl {
    stream: TcpStream,
    peer: String,
}

impl ChannelControl for TcpControl {
    fn shutdown(&self) -> Result<(), TransportError> {
        match self.stream.shutdown(Shutdown::Both) {
            // Already shut down or reset by the peer: the goal is reached.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r.map_err(|e| TransportError::io("shutting the channel down", &self.peer, e)),
        }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError> {
        // A zero timeout is refused by the OS; the shortest real wait is meant.
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        self.stream
            .set_read_timeout(timeout)
            .map_err(|e| TransportError::io("setting the read timeout", &self.peer, e))
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError> {
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        self.stream
            .set_write_timeout(timeout)
            .map_err(|e| TransportError::io("setting the write timeout", &self.peer, e))
    }

    fn peer(&self) -> &str {
        &self.peer
    }
}

/// Wraps a connected socket into a framed [`Channel`].
pub(crate) fn tcp_channel(stream: TcpStream, peer: String) -> Result<Channel, TransportError> {
    let clone = |s: &TcpStream| {
        s.try_clone()
            .map_err(|e| TransportError::io("duplicating the socket", &peer, e))
    };
    let sink = StreamSink::new(clone(&stream)?, peer.clone(), MAX_FRAME_LEN);
    let source = StreamSource::new(clone(&stream)?, peer.clone(), MAX_FRAME_LEN);
    Ok(Channel::new(
        Box::new(sink),
        Box::new(source),
        Arc::new(TcpControl { stream, peer }),
    ))
}

fn resolve(addr: &str) -> Result<Vec<SocketAddr>, TransportError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| TransportError::Resolve {
            addr: addr.to_owned(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(TransportError::Resolve {
            addr: addr.to_owned(),
            source: io::Error::new(io::ErrorKind::NotFound, "no address found"),
        });
    }
    Ok(addrs)
}

/// Connects one socket, trying each resolved address in turn.
fn connect_socket(
    addr: &str,
    addrs: &[SocketAddr],
    timeout: Duration,
    buffer: Option<usize>,
) -> Result<TcpStream, TransportError> {
    let mut last = None;
    for a in addrs {
        let attempt = (|| {
            let socket = Socket::new(Domain::for_address(*a), Type::STREAM, Some(Protocol::TCP))?;
            if let Some(size) = buffer {
                // Before connecting, so the window scale negotiated in the
                // handshake can make use of the whole buffer.
                socket.set_send_buffer_size(size)?;
                socket.set_recv_buffer_size(size)?;
            }
            socket.connect_timeout(&SockAddr::from(*a), timeout.max(Duration::from_millis(1)))?;
            socket.set_tcp_nodelay(true)?;
            Ok::<TcpStream, io::Error>(socket.into())
        })();
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(TransportError::Connect {
        addr: addr.to_owned(),
        source: last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")),
    })
}

fn send_preamble(stream: &mut TcpStream, pre: &Preamble, addr: &str) -> Result<(), TransportError> {
    stream
        .write_all(&pre.encode())
        .map_err(|e| TransportError::io("sending the stream preamble", addr, e))
}

/// Waits for the listener's acknowledgement on the control socket.
fn await_ack(stream: &mut TcpStream, addr: &str, timeout: Duration) -> Result<(), TransportError> {
    const WHAT: &str = "waiting for the receiver to accept the connection";
    let io_err = |e| TransportError::io("setting the handshake timeout", addr, e);
    stream
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(io_err)?;
    let mut ack = [0u8; ACK_LEN];
    stream.read_exact(&mut ack).map_err(|e| {
        if is_timeout(&e) {
            TransportError::Timeout {
                what: WHAT,
                after: timeout,
            }
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            TransportError::PeerClosed {
                peer: addr.to_owned(),
                what: WHAT,
            }
        } else {
            TransportError::io(WHAT, addr, e)
        }
    })?;
    decode_ack(&ack).map_err(|reason| TransportError::BadPreamble {
        peer: addr.to_owned(),
        reason,
    })?;
    stream.set_read_timeout(None).map_err(io_err)
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn connect(
        &self,
        addr: &str,
        streams: NonZeroUsize,
        opts: &ConnectOptions,
    ) -> Result<Connection, TransportError> {
        let count = u16::try_from(streams.get())
            .ok()
            .filter(|c| *c <= MAX_STREAMS)
            .ok_or(TransportError::TooManyStreams {
                requested: streams.get(),
                max: MAX_STREAMS,
            })?;
        let addrs = resolve(addr)?;
        let token = new_token();

        let mut control = connect_socket(addr, &addrs, opts.connect_timeout, None)?;
        let pre = Preamble {
            role: Role::Control,
            index: 0,
            count,
            token,
        };
        send_preamble(&mut control, &pre, addr)?;

        let mut data = Vec::with_capacity(streams.get());
        for index in 0..count {
            let mut s =
                connect_socket(addr, &addrs, opts.connect_timeout, opts.data_socket_buffer)?;
            let pre = Preamble {
                role: Role::Data,
                index,
                count,
                token,
            };
            send_preamble(&mut s, &pre, addr)?;
            data.push(s);
        }

        await_ack(&mut control, addr, opts.handshake_timeout)?;
        Ok(Connection {
            control: tcp_channel(control, addr.to_owned())?,
            data: data
                .into_iter()
                .map(|s| tcp_channel(s, addr.to_owned()))
                .collect::<Result<_, _>>()?,
        })
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn TransportListener>, TransportError> {
        Ok(Box::new(TcpListener::bind(addr)?))
    }
}

/// A connection whose control socket arrived but not every data socket yet.
#[derive(Debug)]
struct Pending {
    token: [u8; 16],
    control: (TcpStream, SocketAddr),
    data: Vec<Option<(TcpStream, SocketAddr)>>,
    arrived: usize,
    since: Instant,
}

/// Listens for TCP migration connections and groups their sockets.
#[derive(Debug)]
pub struct TcpListener {
    listener: std::net::TcpListener,
    local: SocketAddr,
    pending: Vec<Pending>,
}

impl TcpListener {
    /// Listens on `addr` (`HOST:PORT`, port 0 for any).
    pub fn bind(addr: &str) -> Result<Self, TransportError> {
        let bind_err = |source| TransportError::Bind {
            addr: addr.to_owned(),
            source,
        };
        let sa = resolve(addr)?[0];
        let socket = Socket::new(Domain::for_address(sa), Type::STREAM, Some(Protocol::TCP))
            .map_err(bind_err)?;
        socket.set_reuse_address(true).map_err(bind_err)?;
        // Accepted sockets inherit these; set here, they apply from the
        // handshake on (window scaling).
        socket
            .set_send_buffer_size(DEFAULT_DATA_SOCKET_BUFFER)
            .map_err(bind_err)?;
        socket
            .set_recv_buffer_size(DEFAULT_DATA_SOCKET_BUFFER)
            .map_err(bind_err)?;
        socket.bind(&SockAddr::from(sa)).map_err(bind_err)?;
        socket.listen(BACKLOG).map_err(bind_err)?;
        let listener: std::net::TcpListener = socket.into();
        listener.set_nonblocking(true).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        Ok(TcpListener {
            listener,
            local,
            pending: Vec::new(),
        })
    }

    /// Reads and checks the preamble of a freshly accepted socket.
    fn read_preamble(
        stream: &mut TcpStream,
        peer: &str,
        wait: Duration,
    ) -> Result<Preamble, TransportError> {
        const WHAT: &str = "reading a stream preamble";
        let setup = |s: &TcpStream| {
            s.set_nonblocking(false)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(wait.max(Duration::from_millis(1))))
        };
        setup(stream).map_err(|e| TransportError::io("preparing an accepted socket", peer, e))?;
        let mut raw = [0u8; PREAMBLE_LEN];
        stream.read_exact(&mut raw).map_err(|e| {
            if is_timeout(&e) {
                TransportError::Timeout {
                    what: WHAT,
                    after: wait,
                }
            } else if e.kind() == io::ErrorKind::UnexpectedEof {
                TransportError::PeerClosed {
                    peer: peer.to_owned(),
                    what: "sending its stream preamble",
                }
            } else {
                TransportError::io(WHAT, peer, e)
            }
        })?;
        Preamble::decode(&raw).map_err(|reason| refuse(stream, peer, reason))
    }

    /// Adds an accepted socket to its group; returns the connection when the
    /// group is complete.
    fn admit(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        pre: Preamble,
    ) -> Result<Option<Connection>, TransportError> {
        let mut stream = stream;
        let peer_s = peer.to_string();
        let pos = self.pending.iter().position(|p| p.token == pre.token);
        match pre.role {
            Role::Control => {
                if pos.is_some() {
                    return Err(refuse(&mut stream, &peer_s, PreambleReason::DuplicateToken));
                }
                if self.pending.len() >= MAX_PENDING {
                    // Oldest first: it is the most likely to be abandoned.
                    self.pending.remove(0);
                }
                self.pending.push(Pending {
                    token: pre.token,
                    control: (stream, peer),
                    data: (0..pre.count).map(|_| None).collect(),
                    arrived: 0,
                    since: Instant::now(),
                });
                Ok(None)
            }
            Role::Data => {
                let Some(pos) = pos else {
                    return Err(refuse(&mut stream, &peer_s, PreambleReason::UnknownToken));
                };
                let group = &mut self.pending[pos];
                let expected = u16::try_from(group.data.len()).unwrap_or(u16::MAX);
                let reason = if pre.count != expected {
                    Some(PreambleReason::CountMismatch {
                        got: pre.count,
                        expected,
                    })
                } else if group.data[usize::from(pre.index)].is_some() {
                    Some(PreambleReason::DuplicateIndex(pre.index))
                } else {
                    None
                };
                if let Some(reason) = reason {
                    // The whole connection is broken: tell its sender why.
                    let mut group = self.pending.remove(pos);
                    let control_peer = group.control.1.to_string();
                    refuse(&mut group.control.0, &control_peer, reason.clone());
                    return Err(refuse(&mut stream, &peer_s, reason));
                }
                group.data[usize::from(pre.index)] = Some((stream, peer));
                group.arrived += 1;
                if group.arrived < group.data.len() {
                    return Ok(None);
                }
                let group = self.pending.remove(pos);
                finish(group).map(Some)
            }
        }
    }
}

/// Best effort: tells the peer why its socket is refused, and returns the
/// error for the local caller.
fn refuse(stream: &mut TcpStream, peer: &str, reason: PreambleReason) -> TransportError {
    // The socket is dropped right after; a failed write changes nothing.
    let _ = stream.write_all(&encode_ack(Some(&reason)));
    let _ = stream.shutdown(Shutdown::Both);
    TransportError::BadPreamble {
        peer: peer.to_owned(),
        reason,
    }
}

/// Acknowledges a complete group and turns it into a [`Connection`].
fn finish(group: Pending) -> Result<Connection, TransportError> {
    let (mut control, control_peer) = group.control;
    let control_peer = control_peer.to_string();
    let mut data = Vec::with_capacity(group.data.len());
    for (stream, peer) in group.data.into_iter().flatten() {
        let peer = peer.to_string();
        stream
            .set_read_timeout(None)
            .map_err(|e| TransportError::io("clearing the preamble timeout", &peer, e))?;
        data.push(tcp_channel(stream, peer)?);
    }
    control
        .set_read_timeout(None)
        .map_err(|e| TransportError::io("clearing the preamble timeout", &control_peer, e))?;
    control
        .write_all(&encode_ack(None))
        .map_err(|e| TransportError::io("acknowledging the connection", &control_peer, e))?;
    Ok(Connection {
        control: tcp_channel(control, control_peer)?,
        data,
    })
}

impl TransportListener for TcpListener {
    fn accept(&mut self, timeout: Duration) -> Result<Connection, TransportError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.pending.retain(|p| p.since.elapsed() < PENDING_TTL);
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    let peer_s = peer.to_string();
                    let wait = remaining.clamp(Duration::from_millis(1), PREAMBLE_TIMEOUT);
                    let pre = Self::read_preamble(&mut stream, &peer_s, wait)?;
                    if let Some(conn) = self.admit(stream, peer, pre)? {
                        return Ok(conn);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if remaining.is_zero() {
                        return Err(TransportError::Timeout {
                            what: "waiting for a migration connection",
                            after: timeout,
                        });
                    }
                    std::thread::sleep(remaining.min(ACCEPT_POLL));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(TransportError::io(
                        "accepting a connection",
                        &self.local.to_string(),
                        e,
                    ))
                }
            }
        }
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }
}
