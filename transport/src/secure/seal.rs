//! Sealed frames: each frame of a channel encrypted and authenticated with AES-256-GCM under
//! a key of its own (one per channel and direction, see [`super::Session`]), with the frame's
//! sequence number as the nonce. So a frame cannot be read, altered, replayed, reordered,
//! dropped (the next one fails to open) or moved to another stream or direction.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

use crate::{FrameSink, FrameSource, TransportError};

/// Bytes a sealed frame carries on top of its plaintext (the GCM tag).
pub const SEAL_OVERHEAD: usize = 16;

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    // AES-256 takes any 32-byte key: this cannot fail.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("a 32-byte AES-256 key"))
}

/// The nonce of frame `seq`: 4 zero bytes, then the sequence number. Each key seals at most
/// 2^64 frames, and every key is used by one direction of one channel of one session.
fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals every frame before the inner sink sends it.
pub struct SealedSink {
    inner: Box<dyn FrameSink>,
    key: LessSafeKey,
    seq: u64,
    buf: Vec<u8>,
}

impl std::fmt::Debug for SealedSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSink")
            .field("seq", &self.seq)
            .finish()
    }
}

impl SealedSink {
    /// Wraps `inner`, sealing with `key`.
    pub fn new(inner: Box<dyn FrameSink>, key_bytes: &[u8; 32]) -> Self {
        SealedSink {
            inner,
            key: key(key_bytes),
            seq: 0,
            buf: Vec::new(),
        }
    }
}

impl FrameSink for SealedSink {
    fn send(&mut self, parts: &[&[u8]]) -> Result<(), TransportError> {
        // One copy into the buffer that is encrypted in place: GCM needs the frame whole.
        self.buf.clear();
        for p in parts {
            self.buf.extend_from_slice(p);
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.seq), Aad::empty(), &mut self.buf)
            .map_err(|_| TransportError::Sealing("sealing a frame failed".into()))?;
        self.seq += 1;
        self.inner.send(&[&self.buf, tag.as_ref()])
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        self.inner.flush()
    }
}

/// Opens every frame the inner source receives; a frame that does not open is an error, and
/// the channel is unusable after it.
pub struct SealedSource {
    inner: Box<dyn FrameSource>,
    key: LessSafeKey,
    seq: u64,
    broken: bool,
}

impl std::fmt::Debug for SealedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSource")
            .field("seq", &self.seq)
            .finish()
    }
}

impl SealedSource {
    /// Wraps `inner`, opening with `key`.
    pub fn new(inner: Box<dyn FrameSource>, key_bytes: &[u8; 32]) -> Self {
        SealedSource {
            inner,
            key: key(key_bytes),
            seq: 0,
            broken: false,
        }
    }
}

impl FrameSource for SealedSource {
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, TransportError> {
        if self.broken {
            return Err(TransportError::Sealing(
                "an earlier frame failed authentication".into(),
            ));
        }
        if !self.inner.recv(buf)? {
            return Ok(false);
        }
        let len = self
            .key
            .open_in_place(nonce(self.seq), Aad::empty(), buf)
            .map(|plain| plain.len())
            .map_err(|_| {
                self.broken = true;
                TransportError::Sealing(format!(
                    "frame {} failed authentication: it was altered, replayed or injected \
                     on the way, or the peer's session keys differ",
                    self.seq
                ))
            })?;
        buf.truncate(len);
        self.seq += 1;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Receiver, Sender};

    use super::*;

    struct MemSink(Sender<Vec<u8>>);
    impl FrameSink for MemSink {
        fn send(&mut self, parts: &[&[u8]]) -> Result<(), TransportError> {
            self.0.send(parts.concat()).unwrap();
            Ok(())
        }
        fn flush(&mut self) -> Result<(), TransportError> {
            Ok(())
        }
    }
    struct MemSource(Receiver<Vec<u8>>);
    impl FrameSource for MemSource {
        fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, TransportError> {
            Ok(self.0.try_recv().map(|f| *buf = f).is_ok())
        }
    }

    #[test]
    fn frames_round_trip_and_tampering_is_caught() {
        let k = [7u8; 32];
        let (tx, rx) = channel();
        let mut s = SealedSink::new(Box::new(MemSink(tx.clone())), &k);
        let mut r = SealedSource::new(Box::new(MemSource(rx)), &k);
        let mut buf = Vec::new();
        for i in 0..3u8 {
            s.send(&[b"head", &[i; 100]]).unwrap();
            assert!(r.recv(&mut buf).unwrap());
            assert_eq!(&buf[..4], b"head");
            assert_eq!(&buf[4..], &[i; 100][..]);
        }
        // The ciphertext is not the plaintext.
        let mut plain = MemSink(tx.clone());
        let (tx2, rx2) = channel();
        SealedSink::new(Box::new(MemSink(tx2)), &k)
            .send(&[&[0u8; 64]])
            .unwrap();
        let sealed = rx2.recv().unwrap();
        assert_eq!(sealed.len(), 64 + SEAL_OVERHEAD);
        assert_ne!(&sealed[..64], &[0u8; 64][..]);
        // A replayed frame (sealed for sequence 0) does not open at sequence 3.
        plain.send(&[&sealed]).unwrap();
        assert!(matches!(r.recv(&mut buf), Err(TransportError::Sealing(_))));
        // Nor does anything after it: the channel stays broken.
        s.send(&[b"later"]).unwrap();
        assert!(r.recv(&mut buf).is_err());
    }

    #[test]
    fn a_frame_under_another_key_or_altered_does_not_open() {
        let (tx, rx) = channel();
        let mut r = SealedSource::new(Box::new(MemSource(rx)), &[1u8; 32]);
        let mut buf = Vec::new();
        SealedSink::new(Box::new(MemSink(tx.clone())), &[2u8; 32])
            .send(&[b"hello"])
            .unwrap();
        assert!(r.recv(&mut buf).is_err());

        let (tx, rx) = channel();
        let mut r = SealedSource::new(Box::new(MemSource(rx)), &[1u8; 32]);
        let (tx2, rx2) = channel();
        SealedSink::new(Box::new(MemSink(tx2)), &[1u8; 32])
            .send(&[b"hello"])
            .unwrap();
        let mut f = rx2.recv().unwrap();
        f[2] ^= 1;
        tx.send(f).unwrap();
        assert!(r.recv(&mut buf).is_err());
    }
}
