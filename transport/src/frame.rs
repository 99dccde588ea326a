//! Framing over a byte stream: `u32` little-endian length, then the bytes.
//!
//! Sending uses vectored writes so the length prefix and every part go out in
//! (usually) one system call without being copied into one buffer. Receiving
//! checks the announced length against the limit *before* allocating, since
//! the peer is untrusted.

use std::io::{self, IoSlice, Read, Write};

use crate::error::{is_timeout, TransportError};
use crate::{FrameSink, FrameSource};

/// Bytes of the length prefix.
const LEN_PREFIX: usize = 4;

/// Parts per frame sent on the stack; more spill to the heap.
const INLINE_PARTS: usize = 8;

/// Writes length-prefixed frames to a byte stream.
#[derive(Debug)]
pub(crate) struct StreamSink<W> {
    inner: W,
    peer: String,
    max: usize,
}

impl<W: Write> StreamSink<W> {
    pub(crate) fn new(inner: W, peer: String, max: usize) -> Self {
        StreamSink { inner, peer, max }
    }
}

/// Writes every byte of `slices`, coping with partial and interrupted writes.
fn write_all_vectored<W: Write>(w: &mut W, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    // Skip leading empty slices so a frame of only empty parts terminates.
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the stream accepted no more bytes",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl<W: Write + Send> FrameSink for StreamSink<W> {
    fn send(&mut self, parts: &[&[u8]]) -> Result<(), TransportError> {
        let len = parts
            .iter()
            .try_fold(0usize, |acc, p| acc.checked_add(p.len()))
            .unwrap_or(usize::MAX);
        if len > self.max {
            return Err(TransportError::SendTooLarge { len, max: self.max });
        }
        let prefix = u32::try_from(len)
            .map_err(|_| TransportError::SendTooLarge { len, max: self.max })?
            .to_le_bytes();
        let result = if parts.len() < INLINE_PARTS {
            let mut slices = [IoSlice::new(&[]); INLINE_PARTS];
            slices[0] = IoSlice::new(&prefix);
            for (slot, part) in slices[1..].iter_mut().zip(parts) {
                *slot = IoSlice::new(part);
            }
            write_all_vectored(&mut self.inner, &mut slices[..=parts.len()])
        } else {
            let mut slices = Vec::with_capacity(parts.len() + 1);
            slices.push(IoSlice::new(&prefix));
            slices.extend(parts.iter().map(|p| IoSlice::new(p)));
            write_all_vectored(&mut self.inner, &mut slices)
        };
        result.map_err(|e| TransportError::io("sending a frame", &self.peer, e))
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        self.inner
            .flush()
            .map_err(|e| TransportError::io("flushing frames", &self.peer, e))
    }
}

/// Outcome of filling a buffer from the stream.
enum Fill {
    /// The buffer was filled.
    Full,
    /// End of stream after `got` bytes (`got < buf.len()`).
    Eof { got: usize },
}

/// Reads until `buf` is full or the stream ends.
fn fill<R: Read>(r: &mut R, buf: &mut [u8], got: &mut usize) -> io::Result<Fill> {
    while *got < buf.len() {
        match r.read(&mut buf[*got..]) {
            Ok(0) => return Ok(Fill::Eof { got: *got }),
            Ok(n) => *got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Fill::Full)
}

/// Reads length-prefixed frames from a byte stream.
#[derive(Debug)]
pub(crate) struct StreamSource<R> {
    inner: R,
    peer: String,
    max: usize,
    /// Set when a receive failed mid-frame: frame boundaries are lost.
    desynced: bool,
    /// Set after a clean end of stream, so later calls keep returning false.
    eof: bool,
}

impl<R: Read> StreamSource<R> {
    pub(crate) fn new(inner: R, peer: String, max: usize) -> Self {
        StreamSource {
            inner,
            peer,
            max,
            desynced: false,
            eof: false,
        }
    }

    /// Maps a read error; any error after the first byte of a frame loses sync.
    fn read_error(&mut self, e: io::Error, mid_frame: bool) -> TransportError {
        if mid_frame {
            self.desynced = true;
        }
        if is_timeout(&e) {
            TransportError::ReadTimeout {
                peer: self.peer.clone(),
                mid_frame,
            }
        } else {
            TransportError::io("receiving a frame", &self.peer, e)
        }
    }
}

impl<R: Read + Send> FrameSource for StreamSource<R> {
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, TransportError> {
        if self.desynced {
            return Err(TransportError::Desynchronized {
                peer: self.peer.clone(),
            });
        }
        if self.eof {
            buf.clear();
            return Ok(false);
        }
        let mut prefix = [0u8; LEN_PREFIX];
        let mut got = 0;
        match fill(&mut self.inner, &mut prefix, &mut got) {
            Ok(Fill::Full) => {}
            Ok(Fill::Eof { got: 0 }) => {
                self.eof = true;
                buf.clear();
                return Ok(false);
            }
            Ok(Fill::Eof { got }) => {
                self.desynced = true;
                return Err(TransportError::Truncated {
                    peer: self.peer.clone(),
                    got,
                    expected: LEN_PREFIX,
                });
            }
            Err(e) => return Err(self.read_error(e, got > 0)),
        }
        let announced = u32::from_le_bytes(prefix);
        let len = match usize::try_from(announced) {
            Ok(len) if len <= self.max => len,
            _ => {
                self.desynced = true;
                return Err(TransportError::FrameTooLarge {
                    peer: self.peer.clone(),
                    len: u64::from(announced),
                    max: self.max,
                });
            }
        };
        buf.resize(len, 0);
        let mut got = 0;
        match fill(&mut self.inner, buf, &mut got) {
            Ok(Fill::Full) => Ok(true),
            Ok(Fill::Eof { got }) => {
                self.desynced = true;
                Err(TransportError::Truncated {
                    peer: self.peer.clone(),
                    got,
                    expected: len,
                })
            }
            Err(e) => Err(self.read_error(e, true)),
        }
    }
}
