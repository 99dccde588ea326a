//! The stream preamble and the listener's acknowledgement (TCP).
//!
//! TCP gives no way to know that N sockets belong together, so every socket
//! opened by [`crate::Transport::connect`] starts with a fixed 28-byte
//! preamble carrying a random per-connection token; the listener groups
//! sockets by token. When the whole group has arrived, the listener answers
//! on the control socket with a 12-byte acknowledgement, so `connect` returns
//! only once the receiver really holds every channel (and learns why not,
//! e.g. a version mismatch, instead of a bare reset).
//!
//! Preamble (little-endian):
//!
//! | offset | size | field                                   |
//! |--------|------|-----------------------------------------|
//! | 0      | 4    | magic `GDWT`                            |
//! | 4      | 2    | preamble version ([`PREAMBLE_VERSION`]) |
//! | 6      | 1    | role: 0 control, 1 data                 |
//! | 7      | 1    | reserved, 0                             |
//! | 8      | 2    | stream index (0 for control)            |
//! | 10     | 2    | data stream count                       |
//! | 12     | 16   | connection token                        |
//!
//! Acknowledgement: magic `GDWA`, version u16, status u8 (0 accepted,
//! 1 refused), reason code u8, then 4 bytes of reason arguments.
//!
//! The token only tells concurrent connections apart; it is not a credential.

use std::io::Read;

use crate::error::PreambleReason;
use crate::MAX_STREAMS;

/// Version of the preamble and acknowledgement layout.
pub(crate) const PREAMBLE_VERSION: u16 = 1;
/// Bytes of a preamble.
pub(crate) const PREAMBLE_LEN: usize = 28;
/// Bytes of an acknowledgement.
pub(crate) const ACK_LEN: usize = 12;

const MAGIC: [u8; 4] = *b"GDWT";
const ACK_MAGIC: [u8; 4] = *b"GDWA";

/// What a socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Control,
    Data,
}

/// A parsed, validated preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Preamble {
    pub role: Role,
    pub index: u16,
    pub count: u16,
    pub token: [u8; 16],
}

impl Preamble {
    pub(crate) fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&PREAMBLE_VERSION.to_le_bytes());
        b[6] = match self.role {
            Role::Control => 0,
            Role::Data => 1,
        };
        b[8..10].copy_from_slice(&self.index.to_le_bytes());
        b[10..12].copy_from_slice(&self.count.to_le_bytes());
        b[12..28].copy_from_slice(&self.token);
        b
    }

    /// Parses and checks everything that does not need the listener's state.
    pub(crate) fn decode(b: &[u8; PREAMBLE_LEN]) -> Result<Self, PreambleReason> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(PreambleReason::BadMagic { got: magic });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PREAMBLE_VERSION {
            return Err(PreambleReason::UnsupportedVersion {
                got: version,
                supported: PREAMBLE_VERSION,
            });
        }
        let role = match b[6] {
            0 => Role::Control,
            1 => Role::Data,
            other => return Err(PreambleReason::BadRole(other)),
        };
        if b[7] != 0 {
            return Err(PreambleReason::ReservedNonZero(b[7]));
        }
        let index = u16::from_le_bytes([b[8], b[9]]);
        let count = u16::from_le_bytes([b[10], b[11]]);
        if count == 0 || count > MAX_STREAMS {
            return Err(PreambleReason::BadStreamCount {
                count,
                max: MAX_STREAMS,
            });
        }
        match role {
            Role::Control if index != 0 => return Err(PreambleReason::BadControlIndex(index)),
            Role::Data if index >= count => {
                return Err(PreambleReason::IndexOutOfRange { index, count })
            }
            _ => {}
        }
        let mut token = [0u8; 16];
        token.copy_from_slice(&b[12..28]);
        Ok(Preamble {
            role,
            index,
            count,
            token,
        })
    }
}

/// Wire form of a refusal: reason code and 4 argument bytes.
fn reason_to_wire(r: &PreambleReason) -> (u8, [u8; 4]) {
    let two = |a: u16, b: u16| {
        let (a, b) = (a.to_le_bytes(), b.to_le_bytes());
        [a[0], a[1], b[0], b[1]]
    };
    match *r {
        PreambleReason::BadMagic { got } => (1, got),
        PreambleReason::UnsupportedVersion { got, supported } => (2, two(got, supported)),
        PreambleReason::BadRole(x) => (3, [x, 0, 0, 0]),
        PreambleReason::ReservedNonZero(x) => (4, [x, 0, 0, 0]),
        PreambleReason::BadStreamCount { count, max } => (5, two(count, max)),
        PreambleReason::BadControlIndex(i) => (6, two(i, 0)),
        PreambleReason::IndexOutOfRange { index, count } => (7, two(index, count)),
        PreambleReason::UnknownToken => (8, [0; 4]),
        PreambleReason::DuplicateToken => (9, [0; 4]),
        PreambleReason::CountMismatch { got, expected } => (10, two(got, expected)),
        PreambleReason::DuplicateIndex(i) => (11, two(i, 0)),
        PreambleReason::BadAck => (12, [0; 4]),
        PreambleReason::Unknown(c) => (13, [c, 0, 0, 0]),
    }
}

fn reason_from_wire(code: u8, a: [u8; 4]) -> PreambleReason {
    let lo = u16::from_le_bytes([a[0], a[1]]);
    let hi = u16::from_le_bytes([a[2], a[3]]);
    match code {
        1 => PreambleReason::BadMagic { got: a },
        2 => PreambleReason::UnsupportedVersion {
            got: lo,
            supported: hi,
        },
        3 => PreambleReason::BadRole(a[0]),
        4 => PreambleReason::ReservedNonZero(a[0]),
        5 => PreambleReason::BadStreamCount { count: lo, max: hi },
        6 => PreambleReason::BadControlIndex(lo),
        7 => PreambleReason::IndexOutOfRange {
            index: lo,
            count: hi,
        },
        8 => PreambleReason::UnknownToken,
        9 => PreambleReason::DuplicateToken,
        10 => PreambleReason::CountMismatch {
            got: lo,
            expected: hi,
        },
        11 => PreambleReason::DuplicateIndex(lo),
        12 => PreambleReason::BadAck,
        13 => PreambleReason::Unknown(a[0]),
        other => PreambleReason::Unknown(other),
    }
}

/// Encodes an acknowledgement: `None` accepts, `Some(reason)` refuses.
pub(crate) fn encode_ack(refusal: Option<&PreambleReason>) -> [u8; ACK_LEN] {
    let mut b = [0u8; ACK_LEN];
    b[0..4].copy_from_slice(&ACK_MAGIC);
    b[4..6].copy_from_slice(&PREAMBLE_VERSION.to_le_bytes());
    if let Some(r) = refusal {
        let (code, args) = reason_to_wire(r);
        b[6] = 1;
        b[7] = code;
        b[8..12].copy_from_slice(&args);
    }
    b
}

/// Decodes an acknowledgement: `Ok(())` accepted, `Err(reason)` refused or
/// malformed.
pub(crate) fn decode_ack(b: &[u8; ACK_LEN]) -> Result<(), PreambleReason> {
    if b[0..4] != ACK_MAGIC {
        return Err(PreambleReason::BadAck);
    }
    match b[6] {
        0 => Ok(()),
        1 => Err(reason_from_wire(b[7], [b[8], b[9], b[10], b[11]])),
        _ => Err(PreambleReason::BadAck),
    }
}

/// A fresh connection token: 16 bytes from the OS's random source, or, if it
/// is unavailable, from the standard library's randomly keyed hasher mixed
/// with the time, the process id and a counter (unique is what matters).
pub(crate) fn new_token() -> [u8; 16] {
    let mut token = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut token))
        .is_ok();
    if !from_os {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, chunk) in token.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(nanos);
            h.write_u32(std::process::id());
            h.write_u64(n);
            h.write_usize(i);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trips_and_checks() {
        let p = Preamble {
            role: Role::Data,
            index: 3,
            count: 4,
            token: [7; 16],
        };
        assert_eq!(Preamble::decode(&p.encode()), Ok(p));
        let mut bad = p.encode();
        bad[7] = 1;
        assert_eq!(
            Preamble::decode(&bad),
            Err(PreambleReason::ReservedNonZero(1))
        );
        let mut bad = p.encode();
        bad[6] = 9;
        assert_eq!(Preamble::decode(&bad), Err(PreambleReason::BadRole(9)));
        let mut bad = p.encode();
        bad[10..12].copy_from_slice(&0u16.to_le_bytes());
        assert!(matches!(
            Preamble::decode(&bad),
            Err(PreambleReason::BadStreamCount { count: 0, .. })
        ));
        let mut bad = p.encode();
        bad[8..10].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(
            Preamble::decode(&bad),
            Err(PreambleReason::IndexOutOfRange { index: 4, count: 4 })
        );
    }

    #[test]
    fn every_refusal_survives_the_ack() {
        let reasons = [
            PreambleReason::BadMagic { got: *b"HTTP" },
            PreambleReason::UnsupportedVersion {
                got: 9,
                supported: 1,
            },
            PreambleReason::BadRole(5),
            PreambleReason::ReservedNonZero(2),
            PreambleReason::BadStreamCount { count: 0, max: 64 },
            PreambleReason::BadControlIndex(3),
            PreambleReason::IndexOutOfRange { index: 5, count: 2 },
            PreambleReason::UnknownToken,
            PreambleReason::DuplicateToken,
            PreambleReason::CountMismatch {
                got: 3,
                expected: 2,
            },
            PreambleReason::DuplicateIndex(1),
            PreambleReason::BadAck,
            PreambleReason::Unknown(200),
        ];
        for r in reasons {
            assert_eq!(decode_ack(&encode_ack(Some(&r))), Err(r));
        }
        assert_eq!(decode_ack(&encode_ack(None)), Ok(()));
        let mut bad = encode_ack(None);
        bad[0] = b'X';
        assert_eq!(decode_ack(&bad), Err(PreambleReason::BadAck));
    }

    /// Every byte of a valid preamble and acknowledgement, flipped in every bit pattern one
    /// byte at a time: decoding never panics, and what decodes re-encodes to the same bytes.
    #[test]
    fn every_one_byte_corruption_is_refused_or_exact() {
        let p = Preamble {
            role: Role::Data,
            index: 1,
            count: 2,
            token: [3; 16],
        }
        .encode();
        for i in 0..PREAMBLE_LEN {
            for v in 0..=255u8 {
                let mut b = p;
                b[i] = v;
                if let Ok(d) = Preamble::decode(&b) {
                    assert_eq!(d.encode(), b);
                }
            }
        }
        let a = encode_ack(Some(&PreambleReason::IndexOutOfRange {
            index: 5,
            count: 2,
        }));
        for i in 0..ACK_LEN {
            for v in 0..=255u8 {
                let mut b = a;
                b[i] = v;
                let _ = decode_ack(&b);
            }
        }
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(new_token(), new_token());
    }
}
