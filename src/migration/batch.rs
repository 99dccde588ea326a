//! The page-batch wire codec: how guest pages travel on a data stream.
//!
//! # Why batches
//!
//! Sending pages one by one costs a frame header and a system call per 4 KiB;
//! batching up to [`MAX_BATCH_PAGES`] pages amortises both and gives LZ4 a
//! large enough block to find redundancy across pages. Zero pages (very common
//! in a fresh or idle guest) are sent as an address only.
//!
//! # Why the decoder is so strict
//!
//! The receiver writes what it decodes into guest memory, and the sender is
//! untrusted (a compromised or buggy source host must not be able to write
//! outside the destination guest's RAM, or half a batch). So [`decode`]
//! checks every field, every address against the guest's [`MemoryLimits`],
//! and decompresses the whole payload into a scratch buffer, *before* it
//! returns anything: the caller writes to guest memory only after `Ok`, and
//! then only at addresses already proven to lie inside guest RAM.
//!
//! # Wire layout
//!
//! One frame (see `godwit_transport::FrameSink`) holds one message. All
//! integers are little-endian; the layout version is fixed by the stream's
//! handshake.
//!
//! Page batch (`kind = 1`), 16-byte header:
//!
//! | offset | size          | field                                    |
//! |--------|---------------|------------------------------------------|
//! | 0      | 1             | kind = 1                                 |
//! | 1      | 1             | encoding: 0 raw, 1 LZ4 block             |
//! | 2      | 2             | `n_zero`: zero pages                     |
//! | 4      | 2             | `n_data`: pages with data                |
//! | 6      | 2             | reserved, must be 0                      |
//! | 8      | 4             | round                                    |
//! | 12     | 4             | `payload_len`                            |
//! | 16     | 8 × `n_zero`  | zero page guest physical addresses       |
//! | …      | 8 × `n_data`  | data page guest physical addresses       |
//! | …      | `payload_len` | `n_data` × 4096 bytes, raw or LZ4 block  |
//!
//! `1 <= n_zero + n_data <= MAX_BATCH_PAGES`; the payload's pages are in the
//! order of the data addresses; the frame ends exactly after the payload.
//!
//! End of round (`kind = 2`), 13 bytes: kind u8, round u32, batches u64 (how
//! many batches this stream carried in that round, so the receiver can tell
//! that none was lost).

use lz4_flex::block::{compress_into, decompress_into, get_maximum_output_size, DecompressError};

/// Size of a guest page, in bytes.
pub const PAGE_SIZE: usize = crate::vmm::memory::PAGE_SIZE as usize;
/// Most pages one batch may carry.
pub const MAX_BATCH_PAGES: usize = 256;
/// Bytes of a page batch header (before the address lists).
pub const BATCH_HEADER_LEN: usize = 16;
/// Bytes of an end-of-round message.
pub const END_OF_ROUND_LEN: usize = 13;
/// `kind` of a page batch.
pub const KIND_BATCH: u8 = 1;
/// `kind` of an end-of-round message.
pub const KIND_END_OF_ROUND: u8 = 2;

const ENCODING_RAW: u8 = 0;
const ENCODING_LZ4: u8 = 1;
const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;
const ADDR_LEN: usize = 8;

/// Whether the encoder may compress page data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Send page data as is (fastest on a fast link).
    #[default]
    None,
    /// Compress with LZ4 (block format) when it saves at least 1/8.
    Lz4,
}

/// Returns true if every byte of `page` is zero.
///
/// Works on 128-byte blocks OR-ed together as `u128` words, which compiles
/// to wide vector loads and stops at the first non-zero block.
pub fn is_zero_page(page: &[u8]) -> bool {
    const WORD: usize = 16;
    const BLOCK: usize = 8 * WORD;
    let mut blocks = page.chunks_exact(BLOCK);
    for block in &mut blocks {
        let mut acc = 0u128;
        for word in block.chunks_exact(WORD) {
            let mut w = [0u8; WORD];
            w.copy_from_slice(word);
            acc |= u128::from_ne_bytes(w);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Errors of the encoder: the caller passed pages that cannot be sent. These
/// are bugs in the sending side, never caused by the network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The batch has no page or too many.
    #[error("a batch must hold 1..={max} pages, got {got}; this is a bug in the sender, please report it")]
    BadPageCount {
        /// Pages passed.
        got: usize,
        /// Limit.
        max: usize,
    },
    /// A page slice is not 4096 bytes long.
    #[error("page at {addr:#x} is {len} bytes, not {PAGE_SIZE}; this is a bug in the sender, please report it")]
    BadPageLength {
        /// The page's address.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// An address is not page aligned.
    #[error("page address {addr:#x} is not {PAGE_SIZE}-byte aligned; this is a bug in the sender, please report it")]
    Unaligned {
        /// The address.
        addr: u64,
    },
    /// An address appears twice in the batch.
    #[error("page address {addr:#x} appears twice in one batch; this is a bug in the sender, please report it")]
    Duplicate {
        /// The address.
        addr: u64,
    },
}

/// Why [`BatchEncoder::encode_with`] failed.
#[derive(Debug)]
pub enum EncodeWithError<E> {
    /// The batch itself is invalid (a sender bug).
    Encode(EncodeError),
    /// Reading a page failed.
    Read(E),
}

/// What one encoded batch contains, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchStats {
    /// Zero pages (sent as addresses only).
    pub zero_pages: usize,
    /// Pages sent with data.
    pub data_pages: usize,
    /// Bytes of page data before compression (`data_pages * PAGE_SIZE`).
    pub raw_bytes: usize,
    /// Bytes on the wire: header, addresses and payload.
    pub wire_bytes: usize,
    /// Whether the payload was sent compressed.
    pub compressed: bool,
}

/// An encoded batch, borrowing the encoder's buffers.
///
/// Send it as two parts, `[header, payload]`, so the payload is not copied.
#[derive(Debug, Clone, Copy)]
pub struct EncodedBatch<'a> {
    /// Header and address lists.
    pub header: &'a [u8],
    /// Page data, raw or compressed.
    pub payload: &'a [u8],
    /// What the batch contains.
    pub stats: BatchStats,
}

impl<'a> EncodedBatch<'a> {
    /// The frame's parts, in order.
    pub fn parts(&self) -> [&'a [u8]; 2] {
        [self.header, self.payload]
    }
}

/// Encodes page batches, reusing its buffers from one batch to the next.
#[derive(Debug, Default)]
pub struct BatchEncoder {
    header: Vec<u8>,
    raw: Vec<u8>,
    compressed: Vec<u8>,
    data_addrs: Vec<u64>,
}

impl BatchEncoder {
    /// A new encoder with buffers sized for a full batch.
    pub fn new() -> Self {
        BatchEncoder {
            header: Vec::with_capacity(BATCH_HEADER_LEN + ADDR_LEN * MAX_BATCH_PAGES),
            raw: Vec::with_capacity(PAGE_SIZE * MAX_BATCH_PAGES),
            compressed: Vec::new(),
            data_addrs: Vec::with_capacity(MAX_BATCH_PAGES),
        }
    }

    /// Encodes one batch of `(guest physical address, 4096-byte page)` pairs
    /// sent in `round`.
    pub fn encode(
        &mut self,
        round: u32,
        pages: &[(u64, &[u8])],
        compress: Compression,
    ) -> Result<EncodedBatch<'_>, EncodeError> {
        if pages.is_empty() || pages.len() > MAX_BATCH_PAGES {
            return Err(EncodeError::BadPageCount {
                got: pages.len(),
                max: MAX_BATCH_PAGES,
            });
        }
        if let Some(&(addr, page)) = pages.iter().find(|(_, p)| p.len() != PAGE_SIZE) {
            return Err(EncodeError::BadPageLength {
                addr,
                len: page.len(),
            });
        }
        let mut addrs = [0u64; MAX_BATCH_PAGES];
        for (slot, &(addr, _)) in addrs.iter_mut().zip(pages) {
            *slot = addr;
        }
        let mut next = pages.iter().map(|&(_, page)| page);
        self.encode_with(round, &addrs[..pages.len()], compress, |_, out| {
            if let Some(page) = next.next() {
                out.copy_from_slice(page);
            }
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(|e| match e {
            EncodeWithError::Encode(e) => e,
            EncodeWithError::Read(never) => match never {},
        })
    }

    /// Encodes one batch of the pages at `addrs` sent in `round`, asking
    /// `read_page(addr, slot)` to fill each page's 4096 bytes straight into
    /// the encoder's buffer: the only copy of a raw page before the socket.
    pub fn encode_with<E>(
        &mut self,
        round: u32,
        addrs: &[u64],
        compress: Compression,
        mut read_page: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
    ) -> Result<EncodedBatch<'_>, EncodeWithError<E>> {
        if addrs.is_empty() || addrs.len() > MAX_BATCH_PAGES {
            return Err(EncodeWithError::Encode(EncodeError::BadPageCount {
                got: addrs.len(),
                max: MAX_BATCH_PAGES,
            }));
        }
        let mut sorted = [0u64; MAX_BATCH_PAGES];
        for (slot, &addr) in sorted.iter_mut().zip(addrs) {
            if addr % PAGE_SIZE_U64 != 0 {
                return Err(EncodeWithError::Encode(EncodeError::Unaligned { addr }));
            }
            *slot = addr;
        }
        if let Some(addr) = first_duplicate(&mut sorted[..addrs.len()]) {
            return Err(EncodeWithError::Encode(EncodeError::Duplicate { addr }));
        }

        self.header.clear();
        self.header.resize(BATCH_HEADER_LEN, 0);
        self.raw.clear();
        self.data_addrs.clear();
        let mut n_zero = 0usize;
        for &addr in addrs {
            let at = self.raw.len();
            self.raw.resize(at + PAGE_SIZE, 0);
            read_page(addr, &mut self.raw[at..]).map_err(EncodeWithError::Read)?;
            if is_zero_page(&self.raw[at..]) {
                self.raw.truncate(at);
                self.header.extend_from_slice(&addr.to_le_bytes());
                n_zero += 1;
            } else {
                self.data_addrs.push(addr);
            }
        }
        for addr in &self.data_addrs {
            self.header.extend_from_slice(&addr.to_le_bytes());
        }
        let n_data = self.data_addrs.len();

        let mut encoding = ENCODING_RAW;
        if compress == Compression::Lz4 && !self.raw.is_empty() {
            self.compressed
                .resize(get_maximum_output_size(self.raw.len()), 0);
            // An error cannot happen with a buffer of the maximum size; if it
            // did, sending raw is still correct.
            if let Ok(len) = compress_into(&self.raw, &mut self.compressed) {
                if len < self.raw.len() / 8 * 7 {
                    self.compressed.truncate(len);
                    encoding = ENCODING_LZ4;
                }
            }
        }
        let payload: &[u8] = if encoding == ENCODING_LZ4 {
            &self.compressed
        } else {
            &self.raw
        };

        // Counts are at most MAX_BATCH_PAGES and the payload at most
        // MAX_BATCH_PAGES pages (or its LZ4 bound), so these conversions hold.
        let h = &mut self.header;
        h[0] = KIND_BATCH;
        h[1] = encoding;
        h[2..4].copy_from_slice(&to_u16(n_zero).to_le_bytes());
        h[4..6].copy_from_slice(&to_u16(n_data).to_le_bytes());
        h[8..12].copy_from_slice(&round.to_le_bytes());
        h[12..16].copy_from_slice(&to_u32(payload.len()).to_le_bytes());

        Ok(EncodedBatch {
            header: &self.header,
            payload,
            stats: BatchStats {
                zero_pages: n_zero,
                data_pages: n_data,
                raw_bytes: n_data * PAGE_SIZE,
                wire_bytes: self.header.len() + payload.len(),
                compressed: encoding == ENCODING_LZ4,
            },
        })
    }
}

fn to_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Encodes an end-of-round message: this stream carried `batches` batches in
/// `round`.
pub fn encode_end_of_round(round: u32, batches: u64) -> [u8; END_OF_ROUND_LEN] {
    let mut b = [0u8; END_OF_ROUND_LEN];
    b[0] = KIND_END_OF_ROUND;
    b[1..5].copy_from_slice(&round.to_le_bytes());
    b[5..13].copy_from_slice(&batches.to_le_bytes());
    b
}

/// Sorts `addrs` and returns an address that appears twice, if any.
fn first_duplicate(addrs: &mut [u64]) -> Option<u64> {
    addrs.sort_unstable();
    addrs.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

/// A misconfigured guest RAM layout given to [`MemoryLimits::new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// A range ends past the end of the address space.
    #[error("guest RAM range {start:#x} + {len:#x} overflows the address space; check the VM's memory layout")]
    Overflow {
        /// Start of the range.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// Two ranges overlap.
    #[error(
        "guest RAM ranges starting at {a:#x} and {b:#x} overlap; check the VM's memory layout"
    )]
    Overlap {
        /// Start of the first range.
        a: u64,
        /// Start of the second range.
        b: u64,
    },
}

/// The destination guest's RAM: where incoming pages may be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Non-empty `(start, end)` ranges, sorted and disjoint; `end` exclusive.
    ranges: Vec<(u64, u64)>,
}

impl MemoryLimits {
    /// Builds the limits from `(start guest physical address, length)`
    /// ranges, in any order. Empty ranges are ignored.
    pub fn new(ranges: impl IntoIterator<Item = (u64, u64)>) -> Result<Self, LimitsError> {
        let mut out = Vec::new();
        for (start, len) in ranges {
            let end = start
                .checked_add(len)
                .ok_or(LimitsError::Overflow { start, len })?;
            if len > 0 {
                out.push((start, end));
            }
        }
        out.sort_unstable();
        if let Some(w) = out.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(LimitsError::Overlap {
                a: w[0].0,
                b: w[1].0,
            });
        }
        Ok(MemoryLimits { ranges: out })
    }

    /// True if the whole page at `addr` lies inside one RAM range.
    pub fn contains_page(&self, addr: u64) -> bool {
        let Some(end) = addr.checked_add(PAGE_SIZE_U64) else {
            return false;
        };
        // The last range starting at or before `addr` is the only candidate.
        let i = self.ranges.partition_point(|&(start, _)| start <= addr);
        i > 0 && end <= self.ranges[i - 1].1
    }
}

/// Why a received frame was refused. The frame came from the network and is
/// untrusted: any of these means the sender is buggy, incompatible or
/// hostile, and the migration must be aborted (nothing was written).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The frame is empty.
    #[error(
        "empty frame on a data stream; the sender is not a compatible godwit, abort the migration"
    )]
    Empty,
    /// The first byte is not a known message kind.
    #[error("unknown message kind {0} on a data stream; the sender is not a compatible godwit")]
    UnknownKind(u8),
    /// The frame is shorter than its fixed part.
    #[error("frame too short for its {what}: {got} bytes, need {need}; the stream is corrupt")]
    Truncated {
        /// Which part is cut.
        what: &'static str,
        /// Bytes needed up to the end of that part.
        need: usize,
        /// Frame length.
        got: usize,
    },
    /// An end-of-round message has extra bytes.
    #[error("end-of-round message is {got} bytes, not {END_OF_ROUND_LEN}; the stream is corrupt")]
    BadEndOfRoundLength {
        /// Frame length.
        got: usize,
    },
    /// The encoding byte is not known.
    #[error("unknown page encoding {0}; the sender is not a compatible godwit")]
    UnknownEncoding(u8),
    /// The reserved header field is not zero.
    #[error("reserved header field is {0:#x}, not 0; the sender is not a compatible godwit")]
    ReservedNonZero(u16),
    /// The page counts are out of range.
    #[error("batch holds {n_zero} zero and {n_data} data pages; the total must be 1..={max}")]
    BadPageCount {
        /// Zero pages announced.
        n_zero: u16,
        /// Data pages announced.
        n_data: u16,
        /// Limit.
        max: usize,
    },
    /// `payload_len` disagrees with what follows the address lists.
    #[error("payload_len is {payload_len} but {remaining} bytes follow the addresses; the stream is corrupt")]
    PayloadLengthMismatch {
        /// Announced.
        payload_len: u32,
        /// Present.
        remaining: usize,
    },
    /// A page address is not page aligned.
    #[error("page address {addr:#x} is not {PAGE_SIZE}-byte aligned; the stream is corrupt")]
    Unaligned {
        /// The address.
        addr: u64,
    },
    /// A page is not entirely inside the destination guest's RAM.
    #[error(
        "page {addr:#x}..+{PAGE_SIZE:#x} is not inside the destination guest's RAM; \
         the two VMs' memory sizes differ (start the receiver with the same memory) or the stream is corrupt"
    )]
    OutsideRam {
        /// The address.
        addr: u64,
    },
    /// A page address appears twice.
    #[error("page address {addr:#x} appears twice in one batch; the stream is corrupt")]
    Duplicate {
        /// The address.
        addr: u64,
    },
    /// A raw payload is not exactly `n_data` pages.
    #[error("raw payload is {got} bytes, expected {expected} ({PAGE_SIZE} per data page); the stream is corrupt")]
    RawLengthMismatch {
        /// Payload bytes.
        got: usize,
        /// `n_data * PAGE_SIZE`.
        expected: usize,
    },
    /// An LZ4 payload is invalid or decompresses to more than `n_data` pages.
    #[error(
        "LZ4 payload does not decompress to {expected} bytes: {source}; the stream is corrupt"
    )]
    Lz4Corrupt {
        /// `n_data * PAGE_SIZE`.
        expected: usize,
        /// What the decompressor found.
        #[source]
        source: DecompressError,
    },
    /// An LZ4 payload decompresses to fewer bytes than `n_data` pages.
    #[error("LZ4 payload decompresses to {got} bytes, expected {expected}; the stream is corrupt")]
    Lz4ShortOutput {
        /// Bytes produced.
        got: usize,
        /// `n_data * PAGE_SIZE`.
        expected: usize,
    },
}

/// A decoded, fully validated page batch.
///
/// Every address in it is page aligned, unique in the batch, and its whole
/// page lies inside the [`MemoryLimits`] given to [`decode`].
#[derive(Debug, Clone, Copy)]
pub struct DecodedBatch<'a> {
    /// Round the pages belong to.
    pub round: u32,
    /// Whether the payload was LZ4 compressed.
    pub compressed: bool,
    zero_addrs: &'a [u8],
    data_addrs: &'a [u8],
    data: &'a [u8],
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; ADDR_LEN];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

impl<'a> DecodedBatch<'a> {
    /// Number of zero pages.
    pub fn zero_count(&self) -> usize {
        self.zero_addrs.len() / ADDR_LEN
    }

    /// Number of data pages.
    pub fn data_count(&self) -> usize {
        self.data_addrs.len() / ADDR_LEN
    }

    /// Addresses of the pages to fill with zeros.
    pub fn zero_pages(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.zero_addrs.chunks_exact(ADDR_LEN).map(le_u64)
    }

    /// `(address, 4096 bytes)` of the pages to copy.
    pub fn data_pages(&self) -> impl ExactSizeIterator<Item = (u64, &'a [u8])> + 'a {
        self.data_addrs
            .chunks_exact(ADDR_LEN)
            .map(le_u64)
            .zip(self.data.chunks_exact(PAGE_SIZE))
    }
}

/// A decoded message of a data stream.
#[derive(Debug, Clone, Copy)]
pub enum Decoded<'a> {
    /// Pages to write to guest memory.
    Batch(DecodedBatch<'a>),
    /// The stream's sender finished `round` after `batches` batches.
    EndOfRound {
        /// The round.
        round: u32,
        /// Batches this stream carried in that round.
        batches: u64,
    },
}

/// Validates and decodes one frame of a data stream.
///
/// Nothing is returned unless every check passed; LZ4 payloads are
/// decompressed into `scratch` (resized to exactly the expected size), raw
/// payloads are borrowed from `frame` without copying.
pub fn decode<'a>(
    frame: &'a [u8],
    limits: &MemoryLimits,
    scratch: &'a mut Vec<u8>,
) -> Result<Decoded<'a>, BatchError> {
    let kind = *frame.first().ok_or(BatchError::Empty)?;
    match kind {
        KIND_BATCH => decode_batch(frame, limits, scratch).map(Decoded::Batch),
        KIND_END_OF_ROUND => {
            if frame.len() != END_OF_ROUND_LEN {
                return Err(BatchError::BadEndOfRoundLength { got: frame.len() });
            }
            let mut round = [0u8; 4];
            round.copy_from_slice(&frame[1..5]);
            Ok(Decoded::EndOfRound {
                round: u32::from_le_bytes(round),
                batches: le_u64(&frame[5..13]),
            })
        }
        other => Err(BatchError::UnknownKind(other)),
    }
}

fn decode_batch<'a>(
    frame: &'a [u8],
    limits: &MemoryLimits,
    scratch: &'a mut Vec<u8>,
) -> Result<DecodedBatch<'a>, BatchError> {
    if frame.len() < BATCH_HEADER_LEN {
        return Err(BatchError::Truncated {
            what: "batch header",
            need: BATCH_HEADER_LEN,
            got: frame.len(),
        });
    }
    let u16_at = |i: usize| u16::from_le_bytes([frame[i], frame[i + 1]]);
    let u32_at =
        |i: usize| u32::from_le_bytes([frame[i], frame[i + 1], frame[i + 2], frame[i + 3]]);
    let encoding = frame[1];
    let (n_zero, n_data, reserved) = (u16_at(2), u16_at(4), u16_at(6));
    let (round, payload_len) = (u32_at(8), u32_at(12));

    if encoding != ENCODING_RAW && encoding != ENCODING_LZ4 {
        return Err(BatchError::UnknownEncoding(encoding));
    }
    if reserved != 0 {
        return Err(BatchError::ReservedNonZero(reserved));
    }
    let (zero_n, data_n) = (usize::from(n_zero), usize::from(n_data));
    let total = zero_n + data_n;
    if total == 0 || total > MAX_BATCH_PAGES {
        return Err(BatchError::BadPageCount {
            n_zero,
            n_data,
            max: MAX_BATCH_PAGES,
        });
    }
    let addrs_end = BATCH_HEADER_LEN + ADDR_LEN * total;
    if frame.len() < addrs_end {
        return Err(BatchError::Truncated {
            what: "address lists",
            need: addrs_end,
            got: frame.len(),
        });
    }
    let payload = &frame[addrs_end..];
    if usize::try_from(payload_len).ok() != Some(payload.len()) {
        return Err(BatchError::PayloadLengthMismatch {
            payload_len,
            remaining: payload.len(),
        });
    }

    let addr_bytes = &frame[BATCH_HEADER_LEN..addrs_end];
    let mut sorted = [0u64; MAX_BATCH_PAGES];
    for (slot, chunk) in sorted.iter_mut().zip(addr_bytes.chunks_exact(ADDR_LEN)) {
        let addr = le_u64(chunk);
        if addr % PAGE_SIZE_U64 != 0 {
            return Err(BatchError::Unaligned { addr });
        }
        if !limits.contains_page(addr) {
            return Err(BatchError::OutsideRam { addr });
        }
        *slot = addr;
    }
    if let Some(addr) = first_duplicate(&mut sorted[..total]) {
        return Err(BatchError::Duplicate { addr });
    }

    let expected = data_n * PAGE_SIZE;
    let data: &'a [u8] = if encoding == ENCODING_RAW {
        if payload.len() != expected {
            return Err(BatchError::RawLengthMismatch {
                got: payload.len(),
                expected,
            });
        }
        payload
    } else {
        scratch.clear();
        scratch.resize(expected, 0);
        let got = decompress_into(payload, scratch)
            .map_err(|source| BatchError::Lz4Corrupt { expected, source })?;
        if got != expected {
            return Err(BatchError::Lz4ShortOutput { got, expected });
        }
        scratch
    };

    let (zero_addrs, data_addrs) = addr_bytes.split_at(ADDR_LEN * zero_n);
    Ok(DecodedBatch {
        round,
        compressed: encoding == ENCODING_LZ4,
        zero_addrs,
        data_addrs,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// Two ranges like an x86 guest: below the PCI hole and above 4 GiB.
    fn limits() -> MemoryLimits {
        MemoryLimits::new([(0, 3 * GIB), (4 * GIB, 2 * GIB)]).expect("valid layout")
    }

    /// A fixed-seed generator, so every run sees the same data and failures reproduce.
    struct Rng(rand::rngs::StdRng);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(rand::SeedableRng::seed_from_u64(seed))
        }

        fn next(&mut self) -> u64 {
            rand::Rng::random(&mut self.0)
        }

        fn below(&mut self, n: usize) -> usize {
            rand::Rng::random_range(&mut self.0, 0..n)
        }
    }

    fn random_page(rng: &mut Rng) -> Vec<u8> {
        (0..PAGE_SIZE).map(|_| rng.next() as u8).collect()
    }

    fn compressible_page(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| seed.wrapping_add((i / 64) as u8))
            .collect()
    }

    fn lz4(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0; get_maximum_output_size(data.len())];
        let n = compress_into(data, &mut out).expect("compress");
        out.truncate(n);
        out
    }

    fn frame_of(e: &EncodedBatch<'_>) -> Vec<u8> {
        e.parts().concat()
    }

    /// Decodes and checks the batch carries exactly `pages`.
    fn assert_round_trip(pages: &[(u64, Vec<u8>)], compress: Compression) -> BatchStats {
        let refs: Vec<(u64, &[u8])> = pages.iter().map(|(a, p)| (*a, p.as_slice())).collect();
        let mut enc = BatchEncoder::new();
        let encoded = enc.encode(7, &refs, compress).expect("encode");
        let stats = encoded.stats;
        let frame = frame_of(&encoded);
        assert_eq!(stats.wire_bytes, frame.len());
        let mut scratch = Vec::new();
        let Decoded::Batch(b) = decode(&frame, &limits(), &mut scratch).expect("decode") else {
            panic!("expected a batch");
        };
        assert_eq!(b.round, 7);
        assert_eq!(b.compressed, stats.compressed);
        assert_eq!(b.zero_count(), stats.zero_pages);
        assert_eq!(b.data_count(), stats.data_pages);
        let mut got: Vec<(u64, Vec<u8>)> = b
            .zero_pages()
            .map(|a| (a, vec![0; PAGE_SIZE]))
            .chain(b.data_pages().map(|(a, d)| (a, d.to_vec())))
            .collect();
        got.sort();
        let mut want = pages.to_vec();
        want.sort();
        assert!(got == want, "decoded pages differ");
        stats
    }

    #[test]
    fn zero_check() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&p));
        for i in [0, 1, 15, 16, 127, 128, 2048, PAGE_SIZE - 1] {
            p[i] = 1;
            assert!(!is_zero_page(&p), "byte {i}");
            p[i] = 0;
        }
        assert!(is_zero_page(&[]));
        assert!(is_zero_page(&[0; 130]));
        assert!(!is_zero_page(&[0, 0, 0, 1]));
        let mut odd = vec![0u8; 130];
        odd[129] = 3;
        assert!(!is_zero_page(&odd));
    }

    #[test]
    fn round_trips() {
        let mut rng = Rng::new(1);
        let random: Vec<(u64, Vec<u8>)> = (0..8)
            .map(|i| (i * PAGE_SIZE_U64, random_page(&mut rng)))
            .collect();
        for c in [Compression::None, Compression::Lz4] {
            let s = assert_round_trip(&random, c);
            assert!(!s.compressed, "random data must not be kept compressed");
            assert_eq!(s.raw_bytes, 8 * PAGE_SIZE);
        }

        let compressible: Vec<(u64, Vec<u8>)> = (0..MAX_BATCH_PAGES as u64)
            .map(|i| (4 * GIB + i * PAGE_SIZE_U64, compressible_page(i as u8)))
            .collect();
        let s = assert_round_trip(&compressible, Compression::Lz4);
        assert!(s.compressed && s.wire_bytes < s.raw_bytes / 4, "{s:?}");
        let s = assert_round_trip(&compressible, Compression::None);
        assert!(!s.compressed);

        // Mixed, unordered, across both ranges.
        let mut mixed = Vec::new();
        for i in 0..40u64 {
            let addr = if i % 2 == 0 { 4 * GIB } else { 0 } + (100 - i) * PAGE_SIZE_U64;
            let page = match i % 3 {
                0 => vec![0; PAGE_SIZE],
                1 => compressible_page(i as u8),
                _ => random_page(&mut rng),
            };
            mixed.push((addr, page));
        }
        for c in [Compression::None, Compression::Lz4] {
            let s = assert_round_trip(&mixed, c);
            assert_eq!(s.zero_pages, 14);
        }

        // Only zero pages: no payload at all.
        let zeros: Vec<(u64, Vec<u8>)> = (0..3)
            .map(|i| (i * PAGE_SIZE_U64, vec![0; PAGE_SIZE]))
            .collect();
        let s = assert_round_trip(&zeros, Compression::Lz4);
        assert_eq!((s.data_pages, s.wire_bytes), (0, BATCH_HEADER_LEN + 3 * 8));

        // Last page of each range.
        let edges = vec![
            (3 * GIB - PAGE_SIZE_U64, random_page(&mut rng)),
            (6 * GIB - PAGE_SIZE_U64, compressible_page(3)),
        ];
        assert_round_trip(&edges, Compression::Lz4);
    }

    #[test]
    fn encoder_refuses_bad_input() {
        let page = vec![1u8; PAGE_SIZE];
        let mut enc = BatchEncoder::new();
        assert!(matches!(
            enc.encode(0, &[], Compression::None),
            Err(EncodeError::BadPageCount { got: 0, .. })
        ));
        let many: Vec<(u64, &[u8])> = (0..=MAX_BATCH_PAGES as u64)
            .map(|i| (i * PAGE_SIZE_U64, page.as_slice()))
            .collect();
        assert!(matches!(
            enc.encode(0, &many, Compression::None),
            Err(EncodeError::BadPageCount { got: 257, .. })
        ));
        assert_eq!(
            enc.encode(0, &[(0, &page[..100])], Compression::None).err(),
            Some(EncodeError::BadPageLength { addr: 0, len: 100 })
        );
        assert_eq!(
            enc.encode(0, &[(12, &page)], Compression::None).err(),
            Some(EncodeError::Unaligned { addr: 12 })
        );
        assert_eq!(
            enc.encode(0, &[(4096, &page), (4096, &page)], Compression::None)
                .err(),
            Some(EncodeError::Duplicate { addr: 4096 })
        );
    }

    #[test]
    fn end_of_round_round_trips_and_is_strict() {
        let f = encode_end_of_round(3, 12345);
        let mut scratch = Vec::new();
        assert!(matches!(
            decode(&f, &limits(), &mut scratch),
            Ok(Decoded::EndOfRound {
                round: 3,
                batches: 12345
            })
        ));
        let mut long = f.to_vec();
        long.push(0);
        assert!(matches!(
            decode(&long, &limits(), &mut scratch),
            Err(BatchError::BadEndOfRoundLength { got: 14 })
        ));
        for len in 0..END_OF_ROUND_LEN {
            assert!(
                decode(&f[..len], &limits(), &mut scratch).is_err(),
                "prefix {len}"
            );
        }
    }

    /// A valid frame with pages at `addrs` (data pages unless zero).
    fn valid_frame(addrs: &[u64], compress: Compression) -> Vec<u8> {
        let pages: Vec<(u64, Vec<u8>)> = addrs
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                (
                    a,
                    if i == 0 {
                        vec![0; PAGE_SIZE]
                    } else {
                        compressible_page(i as u8)
                    },
                )
            })
            .collect();
        let refs: Vec<(u64, &[u8])> = pages.iter().map(|(a, p)| (*a, p.as_slice())).collect();
        frame_of(
            &BatchEncoder::new()
                .encode(1, &refs, compress)
                .expect("encode"),
        )
    }

    /// Builds a raw-encoded frame by hand, fields unchecked.
    fn raw_frame(enc: u8, reserved: u16, zero: &[u64], data: &[u64], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![KIND_BATCH, enc];
        f.extend_from_slice(&(zero.len() as u16).to_le_bytes());
        f.extend_from_slice(&(data.len() as u16).to_le_bytes());
        f.extend_from_slice(&reserved.to_le_bytes());
        f.extend_from_slice(&9u32.to_le_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        for a in zero.iter().chain(data) {
            f.extend_from_slice(&a.to_le_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    fn refuse(frame: &[u8]) -> BatchError {
        let mut scratch = Vec::new();
        match decode(frame, &limits(), &mut scratch) {
            Ok(d) => panic!("malformed frame accepted: {d:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        for c in [Compression::None, Compression::Lz4] {
            let f = valid_frame(&[0, 4096, 8192, 4 * GIB], c);
            let mut scratch = Vec::new();
            assert!(decode(&f, &limits(), &mut scratch).is_ok());
            for len in 0..f.len() {
                refuse(&f[..len]);
            }
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        let page = vec![5u8; PAGE_SIZE];
        assert!(matches!(refuse(&[]), BatchError::Empty));
        assert!(matches!(refuse(&[3, 0, 0]), BatchError::UnknownKind(3)));
        assert!(matches!(refuse(&[0]), BatchError::UnknownKind(0)));
        assert!(matches!(
            refuse(&raw_frame(2 + 5, 0, &[0], &[], &[])),
            BatchError::UnknownEncoding(7)
        ));
        assert!(matches!(
            refuse(&raw_frame(0, 1, &[0], &[], &[])),
            BatchError::ReservedNonZero(1)
        ));
        assert!(matches!(
            refuse(&raw_frame(0, 0, &[], &[], &[])),
            BatchError::BadPageCount {
                n_zero: 0,
                n_data: 0,
                ..
            }
        ));
        let too_many: Vec<u64> = (0..=MAX_BATCH_PAGES as u64).map(|i| i * 4096).collect();
        assert!(matches!(
            refuse(&raw_frame(0, 0, &too_many, &[], &[])),
            BatchError::BadPageCount { n_zero: 257, .. }
        ));
        // Counts whose sum overflows u16 must not wrap into range.
        let mut f = raw_frame(0, 0, &[0], &[], &[]);
        f[2..4].copy_from_slice(&u16::MAX.to_le_bytes());
        f[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert!(matches!(refuse(&f), BatchError::BadPageCount { .. }));
        // Trailing bytes after the payload.
        let mut f = raw_frame(0, 0, &[], &[0], &page);
        f.push(0);
        assert!(matches!(
            refuse(&f),
            BatchError::PayloadLengthMismatch {
                payload_len: 4096,
                remaining: 4097
            }
        ));
        // payload_len smaller than what follows, and larger.
        let mut f = raw_frame(0, 0, &[], &[0], &page);
        f[12..16].copy_from_slice(&4000u32.to_le_bytes());
        assert!(matches!(
            refuse(&f),
            BatchError::PayloadLengthMismatch { .. }
        ));
        f[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            refuse(&f),
            BatchError::PayloadLengthMismatch { .. }
        ));
    }

    #[test]
    fn bad_addresses_are_refused() {
        let page = vec![5u8; PAGE_SIZE];
        let one = |a: u64| refuse(&raw_frame(0, 0, &[], &[a], &page));
        assert!(matches!(one(4097), BatchError::Unaligned { addr: 4097 }));
        assert!(matches!(one(1), BatchError::Unaligned { addr: 1 }));
        // In the hole between the ranges, past the end, and straddling ends.
        assert!(matches!(one(3 * GIB), BatchError::OutsideRam { .. }));
        assert!(matches!(one(6 * GIB), BatchError::OutsideRam { .. }));
        assert!(matches!(one(100 * GIB), BatchError::OutsideRam { .. }));
        let straddling = MemoryLimits::new([(0, 3 * GIB + 2048)]).expect("layout");
        assert!(!straddling.contains_page(3 * GIB));
        assert!(straddling.contains_page(3 * GIB - 4096));
        // Near u64::MAX, where addr + 4096 overflows.
        let top = u64::MAX - (PAGE_SIZE_U64 - 1);
        assert!(matches!(one(top), BatchError::OutsideRam { addr } if addr == top));
        let full = MemoryLimits::new([(0, u64::MAX)]).expect("layout");
        assert!(!full.contains_page(top));
        assert!(full.contains_page(top - PAGE_SIZE_U64));
        // Zero page addresses are checked as well.
        assert!(matches!(
            refuse(&raw_frame(0, 0, &[3 * GIB], &[], &[])),
            BatchError::OutsideRam { .. }
        ));
        // Duplicates, within and across the two lists.
        assert!(matches!(
            refuse(&raw_frame(0, 0, &[8192, 8192], &[], &[])),
            BatchError::Duplicate { addr: 8192 }
        ));
        assert!(matches!(
            refuse(&raw_frame(0, 0, &[8192], &[8192], &page)),
            BatchError::Duplicate { addr: 8192 }
        ));
    }

    #[test]
    fn bad_payloads_are_refused() {
        let page = vec![5u8; PAGE_SIZE];
        // Raw: one page announced, half a page sent (and two pages sent).
        assert!(matches!(
            refuse(&raw_frame(0, 0, &[], &[0], &page[..2048])),
            BatchError::RawLengthMismatch {
                got: 2048,
                expected: 4096
            }
        ));
        assert!(matches!(
            refuse(&raw_frame(
                0,
                0,
                &[],
                &[0],
                &[page.clone(), page.clone()].concat()
            )),
            BatchError::RawLengthMismatch { got: 8192, .. }
        ));
        // LZ4 garbage.
        assert!(matches!(
            refuse(&raw_frame(1, 0, &[], &[0], &[0xFF; 64])),
            BatchError::Lz4Corrupt { .. }
        ));
        // Valid LZ4 that decompresses short (half a page) and long (two pages).
        let short = lz4(&page[..2048]);
        assert!(matches!(
            refuse(&raw_frame(1, 0, &[], &[0], &short)),
            BatchError::Lz4ShortOutput {
                got: 2048,
                expected: 4096
            }
        ));
        let long = lz4(&[page.clone(), page.clone()].concat());
        assert!(matches!(
            refuse(&raw_frame(1, 0, &[], &[0], &long)),
            BatchError::Lz4Corrupt { expected: 4096, .. }
        ));
        // The right size is accepted (control for the two cases above).
        let exact = lz4(&page);
        let f = raw_frame(1, 0, &[], &[0], &exact);
        let mut scratch = vec![9; 3];
        assert!(decode(&f, &limits(), &mut scratch).is_ok());
        // LZ4 with no payload for a data page.
        assert!(matches!(
            refuse(&raw_frame(1, 0, &[], &[0], &[])),
            BatchError::Lz4Corrupt { .. }
        ));
    }

    #[test]
    fn limits_are_validated() {
        assert_eq!(
            MemoryLimits::new([(u64::MAX, 2)]),
            Err(LimitsError::Overflow {
                start: u64::MAX,
                len: 2
            })
        );
        assert_eq!(
            MemoryLimits::new([(4096, 8192), (0, 8192)]),
            Err(LimitsError::Overlap { a: 0, b: 4096 })
        );
        let l = MemoryLimits::new([(8192, 0), (0, 4096)]).expect("layout");
        assert!(l.contains_page(0));
        assert!(!l.contains_page(8192));
    }

    /// Random corruption never panics and never yields an address outside
    /// the limits; most corrupted frames are refused.
    #[test]
    fn corrupted_frames_never_escape_the_limits() {
        let mut rng = Rng::new(0x5EED_1234_ABCD_0001);
        let lim = limits();
        let bases = [
            valid_frame(&[0, 4096, 4 * GIB, 4 * GIB + 8192], Compression::None),
            valid_frame(&[12 * 4096, 4096, 4 * GIB], Compression::Lz4),
            encode_end_of_round(5, 9).to_vec(),
        ];
        let mut scratch = Vec::new();
        let (mut refused, mut accepted) = (0u32, 0u32);
        for _ in 0..4000 {
            let mut f = bases[rng.below(bases.len())].clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(f.len());
                // Bias towards the header and addresses, where checks live.
                let i = if rng.below(2) == 0 {
                    i.min(16 + rng.below(32))
                } else {
                    i
                };
                let last = f.len() - 1;
                f[i.min(last)] ^= 1 << rng.below(8);
            }
            if rng.below(8) == 0 {
                f.truncate(rng.below(f.len() + 1));
            }
            match decode(&f, &lim, &mut scratch) {
                Err(_) => refused += 1,
                Ok(Decoded::EndOfRound { .. }) => accepted += 1,
                Ok(Decoded::Batch(b)) => {
                    accepted += 1;
                    let n = b.zero_count() + b.data_count();
                    assert!((1..=MAX_BATCH_PAGES).contains(&n));
                    let mut all: Vec<u64> = b.zero_pages().collect();
                    for (a, d) in b.data_pages() {
                        assert_eq!(d.len(), PAGE_SIZE);
                        all.push(a);
                    }
                    assert_eq!(all.len(), n);
                    for a in &all {
                        assert!(lim.contains_page(*a) && a % PAGE_SIZE_U64 == 0, "{a:#x}");
                    }
                    all.sort_unstable();
                    all.dedup();
                    assert_eq!(all.len(), n, "duplicate address accepted");
                }
            }
        }
        // Flipped bits in payloads (raw data, round numbers) are legitimately
        // accepted; but most corruptions must be caught.
        assert!(
            refused > 2000,
            "only {refused} of 4000 refused ({accepted} accepted)"
        );
    }
}
