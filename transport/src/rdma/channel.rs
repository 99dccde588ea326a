//! RDMA data channels: the crate's [`FrameSink`]/[`FrameSource`] over RC
//! queue pairs, plus zero-copy page placement with RDMA WRITE.
//!
//! # Setting up
//! Each side opens an [`RdmaEndpoint`] on the address of its RoCE interface
//! ([`RdmaEndpoint::open`]), sends [`RdmaEndpoint::local_info`] (encoded with
//! [`EndpointInfo::to_bytes`]) to the other over the TCP control channel, and
//! calls [`RdmaEndpoint::connect`] with the peer's: stream `i` of one side is
//! connected to stream `i` of the other, and each becomes a [`Channel`].
//!
//! # Frames
//! A frame is one SEND: the sink copies its parts into a registered send
//! buffer (one of [`RdmaOptions::send_slots`]) and posts it; the receiver
//! keeps a ring of [`RdmaOptions::recv_slots`] receive buffers of
//! [`MAX_RDMA_FRAME`] bytes posted and copies each arriving frame out.
//! End of stream is a SEND with immediate [`EOS_IMM`] and no data, posted
//! when the sink is dropped (best effort) and by [`ChannelControl::shutdown`];
//! zero-length frames stay ordinary frames.
//!
//! # Flow control
//! There is no credit scheme: the queue pairs use `rnr_retry = 7`, so a SEND
//! that finds no receive posted is retried by the hardware until the
//! receiver reposts a buffer (it copies a frame out and reposts at once).
//! A receiver that stops reading therefore stalls the sender in the
//! hardware; the sender notices only through its bounded wait for a free
//! send buffer ([`RdmaOptions::send_timeout`]), which then fails.
//!
//! # Zero-copy pages
//! The destination registers guest memory once ([`RdmaEndpoint::register_memory`])
//! and sends [`RegisteredMemory::descriptor`] to the source, which decodes it
//! ([`RemoteMemory::from_bytes`]) and calls [`RdmaSink::write_pages`] (reached
//! through [`FrameSink::as_rdma`]) to RDMA WRITE pages from its own
//! registered guest memory straight into the destination's. A frame sent on
//! the same channel afterwards tells the destination the pages are there:
//! on a Reliable Connected QP, operations are executed in order at the
//! responder, so when the receive completion of a SEND is seen, every RDMA
//! WRITE posted before it on the same QP has been placed in memory.
//!
//! # Pinned memory
//! Per stream, `recv_slots + send_slots` buffers of [`MAX_RDMA_FRAME`] bytes
//! are registered (21 MiB with the defaults), plus the guest memory.

use std::collections::VecDeque;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::cq::WorkCompletion;
use super::device::{Context, Device, Gid};
use super::error::{RdmaError, Result};
use super::mr::{Access, MemoryRegion, ProtectionDomain};
use super::qp::{QpConfig, QpInfo, QueuePair, SendOp, SendRequest};
use crate::{Channel, ChannelControl, FrameSink, FrameSource, TransportError, MAX_STREAMS};

/// Largest frame an RDMA channel carries: 1 MiB + 64 KiB (the engine's
/// largest page batch is 256 pages of 4 KiB plus a 16-byte header and 2 KiB
/// of addresses). Also the size of every receive buffer.
pub const MAX_RDMA_FRAME: usize = (1 << 20) + (64 << 10);

/// The immediate value of the end-of-stream SEND (no data). Frames are sent
/// without an immediate, so no frame can be mistaken for it.
pub const EOS_IMM: u32 = 0x474f_4545; // "GOEE"

/// Version byte of [`EndpointInfo`] and [`RemoteMemory`] encodings.
const WIRE_VERSION: u8 = 1;

/// Most memory areas a [`RegisteredMemory`] descriptor may list.
pub const MAX_MEMORY_AREAS: usize = 1024;

/// Send queue depth of each QP.
const SQ_DEPTH: u32 = 128;
/// Work requests in flight at most (below the SQ depth: room for the EOS).
const WINDOW: usize = 64;
/// RDMA WRITEs share one signalled completion at most this many at a time.
const SIGNAL_EVERY: usize = 16;
/// Largest single RDMA WRITE that adjacent pages are coalesced into.
const MAX_WRITE: usize = 1 << 20;
/// How long dropping a sink waits for its sends (and the EOS) to complete.
const DROP_WAIT: Duration = Duration::from_secs(2);

/// Tunables of an endpoint.
#[derive(Debug, Clone)]
pub struct RdmaOptions {
    /// Receive buffers of [`MAX_RDMA_FRAME`] bytes per stream.
    pub recv_slots: usize,
    /// Send buffers of [`MAX_RDMA_FRAME`] bytes per stream (frames in flight).
    pub send_slots: usize,
    /// Bound on each wait of a sender: for a free send buffer, for room in
    /// the send queue, for [`FrameSink::flush`].
    pub send_timeout: Duration,
}

impl Default for RdmaOptions {
    fn default() -> Self {
        RdmaOptions {
            recv_slots: 16,
            send_slots: 4,
            send_timeout: Duration::from_secs(60),
        }
    }
}

/// What one side sends the other to connect ([`EndpointInfo::to_bytes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The largest frame this side can receive.
    pub max_frame: u32,
    /// One QP per stream, in stream order.
    pub qps: Vec<QpInfo>,
}

impl EndpointInfo {
    /// Encoding: version (1), stream count (u8), max_frame (u32 BE), then
    /// each [`QpInfo::to_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.qps.len() * QpInfo::ENCODED_LEN);
        b.push(WIRE_VERSION);
        b.push(u8::try_from(self.qps.len()).unwrap_or(u8::MAX));
        b.extend_from_slice(&self.max_frame.to_be_bytes());
        for q in &self.qps {
            b.extend_from_slice(&q.to_bytes());
        }
        b
    }

    /// Decodes [`EndpointInfo::to_bytes`], validating every field (the peer
    /// is not trusted).
    pub fn from_bytes(b: &[u8]) -> Result<EndpointInfo> {
        let bad = |what: String| RdmaError::InvalidArgument(format!("peer's RDMA info: {what}"));
        if b.len() < 6 {
            return Err(bad(format!("{} bytes, too short", b.len())));
        }
        if b[0] != WIRE_VERSION {
            return Err(bad(format!(
                "version {} (this side speaks {WIRE_VERSION}); run the same godwit on both hosts",
                b[0]
            )));
        }
        let n = usize::from(b[1]);
        if n == 0 || n > usize::from(MAX_STREAMS) {
            return Err(bad(format!("{n} streams, expected 1..={MAX_STREAMS}")));
        }
        let max_frame = u32::from_be_bytes([b[2], b[3], b[4], b[5]]);
        if max_frame == 0 {
            return Err(bad("maximum frame size 0".into()));
        }
        let rest = &b[6..];
        if rest.len() != n * QpInfo::ENCODED_LEN {
            return Err(bad(format!(
                "{} bytes of QP info for {n} streams, expected {}",
                rest.len(),
                n * QpInfo::ENCODED_LEN
            )));
        }
        let qps = rest
            .chunks_exact(QpInfo::ENCODED_LEN)
            .map(QpInfo::from_bytes)
            .collect::<Result<Vec<_>>>()?;
        Ok(EndpointInfo { max_frame, qps })
    }
}

struct Stream {
    qp: QueuePair,
    send_mr: MemoryRegion,
    recv_mr: MemoryRegion,
}

/// One side's RDMA resources before (and, for memory registration, after)
/// it is connected: a device, a protection domain, and per stream a QP with
/// its own CQs and staging buffers.
pub struct RdmaEndpoint {
    pd: ProtectionDomain,
    local_ip: IpAddr,
    opts: RdmaOptions,
    streams: Vec<Stream>,
    info: EndpointInfo,
}

impl fmt::Debug for RdmaEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaEndpoint")
            .field("device", &self.pd.context().name())
            .field("local_ip", &self.local_ip)
            .field("streams", &self.info.qps.len())
            .field("connected", &self.streams.is_empty())
            .finish()
    }
}

/// The GID that RoCEv2 uses for `ip` (IPv4-mapped for IPv4).
fn gid_of(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Opens the device whose port 1 GID index 1 is `ip`'s GID.
fn open_device_for(ip: IpAddr) -> Result<Context> {
    let want = gid_of(ip);
    let mut seen = Vec::new();
    for name in Device::list()? {
        let ctx = match Context::open(&name) {
            Ok(c) => c,
            Err(e) => {
                seen.push(format!("{name} (cannot open: {e})"));
                continue;
            }
        };
        match ctx.query_gid(1, 1) {
            Ok(g) if g.0 == want => return Ok(ctx),
            Ok(g) => seen.push(format!("{name}={}", show_gid(g))),
            Err(_) => seen.push(format!("{name}=(no GID 1)")),
        }
    }
    Err(RdmaError::NoDeviceForIp {
        ip,
        devices: if seen.is_empty() {
            "none".into()
        } else {
            seen.join(", ")
        },
    })
}

fn show_gid(g: Gid) -> String {
    match g.ipv4() {
        Some(v4) => v4.to_string(),
        None => g.to_string(),
    }
}

impl RdmaEndpoint {
    /// Opens an endpoint with `streams` streams on the RDMA device that has
    /// `local_ip` (its port 1 GID index 1 is `local_ip`'s RoCEv2 GID), with
    /// the default [`RdmaOptions`]. Fails with [`RdmaError::NoDeviceForIp`]
    /// (or [`RdmaError::NoDevice`]-like errors) when there is none: fall back
    /// to TCP then.
    pub fn open(local_ip: IpAddr, streams: usize) -> Result<RdmaEndpoint> {
        Self::open_with(local_ip, streams, RdmaOptions::default())
    }

    /// [`RdmaEndpoint::open`] with explicit options.
    pub fn open_with(local_ip: IpAddr, streams: usize, opts: RdmaOptions) -> Result<RdmaEndpoint> {
        if streams == 0 || streams > usize::from(MAX_STREAMS) {
            return Err(RdmaError::InvalidArgument(format!(
                "{streams} streams, expected 1..={MAX_STREAMS}"
            )));
        }
        if opts.recv_slots == 0 || opts.send_slots == 0 || opts.recv_slots > 1024 {
            return Err(RdmaError::InvalidArgument(format!(
                "recv_slots {} / send_slots {}: both must be at least 1 (recv at most 1024)",
                opts.recv_slots, opts.send_slots
            )));
        }
        let ctx = open_device_for(local_ip)?;
        let pd = ctx.alloc_pd()?;
        let cfg = QpConfig {
            max_send_wr: SQ_DEPTH,
            max_recv_wr: opts.recv_slots as u32,
            max_send_sge: 1,
            max_recv_sge: 1,
            ..QpConfig::default()
        };
        let mut list = Vec::with_capacity(streams);
        for _ in 0..streams {
            let scq = ctx.create_cq(SQ_DEPTH)?;
            let rcq = ctx.create_cq(opts.recv_slots as u32)?;
            let qp = QueuePair::new_rc(&pd, &scq, &rcq, &cfg)?;
            if (qp.caps().max_recv_wr as usize) < opts.recv_slots {
                return Err(RdmaError::InvalidArgument(format!(
                    "the device granted {} receives per QP, {} asked for; lower recv_slots",
                    qp.caps().max_recv_wr,
                    opts.recv_slots
                )));
            }
            let send_mr = pd.alloc_mr(opts.send_slots * MAX_RDMA_FRAME, Access::LOCAL_READ)?;
            let recv_mr = pd.alloc_mr(opts.recv_slots * MAX_RDMA_FRAME, Access::LOCAL_WRITE)?;
            list.push(Stream {
                qp,
                send_mr,
                recv_mr,
            });
        }
        let info = EndpointInfo {
            max_frame: MAX_RDMA_FRAME as u32,
            qps: list.iter().map(|s| s.qp.local_info()).collect(),
        };
        Ok(RdmaEndpoint {
            pd,
            local_ip,
            opts,
            streams: list,
            info,
        })
    }

    /// The device's name (e.g. `rxe0`).
    pub fn device(&self) -> &str {
        self.pd.context().name()
    }

    /// What the peer needs to connect: send it [`EndpointInfo::to_bytes`].
    pub fn local_info(&self) -> EndpointInfo {
        self.info.clone()
    }

    /// Connects stream `i` to the peer's stream `i`, posts every receive
    /// buffer and returns one [`Channel`] per stream, in stream order. Can be
    /// called once; the endpoint stays usable for
    /// [`RdmaEndpoint::register_memory`].
    pub fn connect(&mut self, remote: &EndpointInfo) -> Result<Vec<Channel>> {
        if self.streams.is_empty() {
            return Err(RdmaError::InvalidArgument(
                "the endpoint is already connected".into(),
            ));
        }
        if remote.qps.len() != self.streams.len() {
            return Err(RdmaError::InvalidArgument(format!(
                "the peer has {} RDMA streams, this side {}; both must use the same --streams",
                remote.qps.len(),
                self.streams.len()
            )));
        }
        for (s, r) in self.streams.iter().zip(&remote.qps) {
            s.qp.connect(r)?;
        }
        let max_frame = MAX_RDMA_FRAME.min(remote.max_frame as usize);
        let mut channels = Vec::with_capacity(self.streams.len());
        for (i, (s, r)) in self.streams.drain(..).zip(&remote.qps).enumerate() {
            for slot in 0..self.opts.recv_slots {
                s.qp.post_recv(
                    slot as u64,
                    &[s.recv_mr.sge(slot * MAX_RDMA_FRAME, MAX_RDMA_FRAME)?],
                )?;
            }
            let peer = format!("{} (RDMA stream {i})", show_gid(Gid(r.gid)));
            let shared = Arc::new(Shared {
                qp: s.qp,
                peer,
                closed: AtomicBool::new(false),
                read_timeout_ns: AtomicU64::new(NO_TIMEOUT),
                send: Mutex::new(SendState {
                    free: (0..self.opts.send_slots).collect(),
                    inflight: VecDeque::new(),
                    next_wr: 0,
                    since_signal: 0,
                    failed: None,
                    eos_posted: false,
                }),
                send_timeout_ns: AtomicU64::new(timeout_ns(Some(self.opts.send_timeout))),
            });
            let sink = RdmaSink {
                shared: Arc::clone(&shared),
                send_mr: s.send_mr,
                max_frame,
            };
            let source = RdmaSource {
                shared: Arc::clone(&shared),
                recv_mr: s.recv_mr,
                slots: self.opts.recv_slots,
                eos: false,
                failed: None,
            };
            channels.push(Channel::new(Box::new(sink), Box::new(source), shared));
        }
        Ok(channels)
    }

    /// Registers guest memory for RDMA WRITE, in this endpoint's protection
    /// domain (so it can be used with every channel of this endpoint). Each
    /// area is named by its `key` (the engine's guest physical address);
    /// areas must not overlap in key space.
    ///
    /// `exposure` says whether the peer may write the regions: only where
    /// pages land. Either way they are registered writable by this host (see
    /// [`Exposure::Local`]).
    ///
    /// # Safety
    /// Each `ptr..ptr+len` must be readable and writable memory that stays
    /// mapped (same address, not remapped) until the returned
    /// [`RegisteredMemory`] is dropped; the device may read and, on the
    /// destination, the peer may write it at any time while it is registered
    /// (see [`ProtectionDomain::register_raw`]).
    pub unsafe fn register_memory(
        &self,
        areas: &[MemoryArea],
        exposure: Exposure,
    ) -> Result<RegisteredMemory> {
        if areas.is_empty() || areas.len() > MAX_MEMORY_AREAS {
            return Err(RdmaError::InvalidArgument(format!(
                "{} memory areas, expected 1..={MAX_MEMORY_AREAS}",
                areas.len()
            )));
        }
        let mut sorted: Vec<&MemoryArea> = areas.iter().collect();
        sorted.sort_by_key(|a| a.key);
        check_areas(sorted.iter().map(|a| (a.key, a.len as u64)))?;
        let mut out = Vec::with_capacity(sorted.len());
        for a in sorted {
            // SAFETY: forwarded from this function's contract: the area stays
            // mapped until the RegisteredMemory (which owns the region) is
            // dropped.
            let mr = unsafe { self.pd.register_raw(a.ptr, a.len, exposure.access()) }?;
            out.push(LocalArea {
                key: a.key,
                len: a.len,
                mr,
            });
        }
        Ok(RegisteredMemory { areas: out })
    }
}

/// Who may write memory registered with [`RdmaEndpoint::register_memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// Only this host: the source, whose pages leave as RDMA WRITEs and
    /// which never hands out a key to them. Still registered for local
    /// write: a read-only registration pins each page as it is now (an
    /// untouched page is the shared zero page), and a page the guest writes
    /// afterwards is copied away from the pinned one, so the device would
    /// send stale data. Write access makes the kernel give every page its
    /// own frame before pinning it.
    Local,
    /// The peer may write it with RDMA WRITEs: the destination, where
    /// pages land.
    RemoteWrite,
}

impl Exposure {
    fn access(self) -> Access {
        match self {
            Exposure::Local => Access::LOCAL_WRITE,
            Exposure::RemoteWrite => Access::REMOTE_WRITE,
        }
    }
}

/// Checks (key, len) pairs sorted by key: non-empty, no overflow, no overlap.
fn check_areas(areas: impl Iterator<Item = (u64, u64)>) -> Result<()> {
    let mut prev_end: Option<u64> = None;
    for (key, len) in areas {
        let end = key.checked_add(len).filter(|_| len > 0).ok_or_else(|| {
            RdmaError::InvalidArgument(format!("memory area {key:#x}+{len:#x} is empty or wraps"))
        })?;
        if prev_end.is_some_and(|p| key < p) {
            return Err(RdmaError::InvalidArgument(format!(
                "memory area at {key:#x} overlaps the one before it"
            )));
        }
        prev_end = Some(end);
    }
    Ok(())
}

/// One area of memory to register: guest RAM as the VMM mapped it.
#[derive(Debug, Clone, Copy)]
pub struct MemoryArea {
    /// The engine's address of its first byte (guest physical address).
    pub key: u64,
    /// Where it is mapped in this process.
    pub ptr: *mut u8,
    /// Its length in bytes.
    pub len: usize,
}

struct LocalArea {
    key: u64,
    len: usize,
    mr: MemoryRegion,
}

/// Guest memory registered with [`RdmaEndpoint::register_memory`]; dropping
/// it deregisters the memory (after which the device no longer touches it).
pub struct RegisteredMemory {
    /// Sorted by key, non-overlapping.
    areas: Vec<LocalArea>,
}

impl fmt::Debug for RegisteredMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.areas.iter().map(|a| (a.key, a.len)))
            .finish()
    }
}

/// Encoded size of one area in a descriptor: key, addr, rkey, len.
const AREA_LEN: usize = 8 + 8 + 4 + 8;

impl RegisteredMemory {
    /// What the peer needs to RDMA WRITE into this memory; decode with
    /// [`RemoteMemory::from_bytes`]. Encoding: version (1), area count (u16
    /// BE), then per area key (u64), addr (u64), rkey (u32), len (u64), all
    /// big-endian.
    pub fn descriptor(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(3 + self.areas.len() * AREA_LEN);
        b.push(WIRE_VERSION);
        b.extend_from_slice(&(self.areas.len() as u16).to_be_bytes());
        for a in &self.areas {
            b.extend_from_slice(&a.key.to_be_bytes());
            b.extend_from_slice(&a.mr.addr().to_be_bytes());
            b.extend_from_slice(&a.mr.rkey().to_be_bytes());
            b.extend_from_slice(&(a.len as u64).to_be_bytes());
        }
        b
    }

    /// The area containing `key..key+len`: its index and the offset in it.
    fn locate(&self, key: u64, len: usize) -> Option<(usize, usize)> {
        let i = self
            .areas
            .partition_point(|a| a.key <= key)
            .checked_sub(1)?;
        let a = &self.areas[i];
        let off = usize::try_from(key - a.key).ok()?;
        (off.checked_add(len)? <= a.len).then_some((i, off))
    }
}

/// One area of the peer's registered memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteArea {
    /// The engine's address of its first byte.
    pub key: u64,
    /// Its virtual address in the peer.
    pub addr: u64,
    /// Its rkey.
    pub rkey: u32,
    /// Its length.
    pub len: u64,
}

/// The peer's registered memory, decoded from its
/// [`RegisteredMemory::descriptor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMemory {
    areas: Vec<RemoteArea>,
}

impl RemoteMemory {
    /// Decodes [`RegisteredMemory::descriptor`], validating it: version,
    /// 1..=[`MAX_MEMORY_AREAS`] areas, exact length, no empty, wrapping or
    /// overlapping area.
    pub fn from_bytes(b: &[u8]) -> Result<RemoteMemory> {
        let bad =
            |what: String| RdmaError::InvalidArgument(format!("peer's memory descriptor: {what}"));
        if b.len() < 3 {
            return Err(bad(format!("{} bytes, too short", b.len())));
        }
        if b[0] != WIRE_VERSION {
            return Err(bad(format!(
                "version {} (this side speaks {WIRE_VERSION})",
                b[0]
            )));
        }
        let n = usize::from(u16::from_be_bytes([b[1], b[2]]));
        if n == 0 || n > MAX_MEMORY_AREAS {
            return Err(bad(format!("{n} areas, expected 1..={MAX_MEMORY_AREAS}")));
        }
        let rest = &b[3..];
        if rest.len() != n * AREA_LEN {
            return Err(bad(format!(
                "{} bytes for {n} areas, expected {}",
                rest.len(),
                n * AREA_LEN
            )));
        }
        let u64_at = |c: &[u8], i: usize| {
            let mut x = [0; 8];
            x.copy_from_slice(&c[i..i + 8]);
            u64::from_be_bytes(x)
        };
        let mut areas: Vec<RemoteArea> = rest
            .chunks_exact(AREA_LEN)
            .map(|c| RemoteArea {
                key: u64_at(c, 0),
                addr: u64_at(c, 8),
                rkey: u32::from_be_bytes([c[16], c[17], c[18], c[19]]),
                len: u64_at(c, 20),
            })
            .collect();
        areas.sort_by_key(|a| a.key);
        for a in &areas {
            if a.addr.checked_add(a.len).is_none() {
                return Err(bad(format!("area {:#x} wraps the address space", a.key)));
            }
        }
        check_areas(areas.iter().map(|a| (a.key, a.len))).map_err(|e| bad(e.to_string()))?;
        Ok(RemoteMemory { areas })
    }

    /// The areas, sorted by key.
    pub fn areas(&self) -> &[RemoteArea] {
        &self.areas
    }

    /// The area containing `key..key+len`: its index and the remote address.
    fn locate(&self, key: u64, len: usize) -> Option<(usize, u64)> {
        let i = self
            .areas
            .partition_point(|a| a.key <= key)
            .checked_sub(1)?;
        let a = &self.areas[i];
        let off = key - a.key;
        (off.checked_add(len as u64)? <= a.len).then_some((i, a.addr + off))
    }
}

// ------------------------------------------------------------ the channel

const NO_TIMEOUT: u64 = u64::MAX;

/// A posted send work request not yet known complete.
struct Inflight {
    wr_id: u64,
    /// The send buffer it reads, freed when it completes.
    slot: Option<usize>,
}

struct SendState {
    free: Vec<usize>,
    /// Oldest first; send completions arrive in posting order.
    inflight: VecDeque<Inflight>,
    next_wr: u64,
    /// Unsignalled requests posted since the last signalled one.
    since_signal: usize,
    /// The first failure: the QP is unusable after it.
    failed: Option<String>,
    eos_posted: bool,
}

/// A timeout as stored in the channel: nanoseconds, [`NO_TIMEOUT`] for none.
fn timeout_ns(timeout: Option<Duration>) -> u64 {
    match timeout {
        None => NO_TIMEOUT,
        Some(t) => u64::try_from(t.as_nanos())
            .unwrap_or(NO_TIMEOUT - 1)
            .min(NO_TIMEOUT - 1),
    }
}

/// What both halves and the control share.
struct Shared {
    qp: QueuePair,
    peer: String,
    /// Set by shutdown: the local reader sees end of stream, the sink fails.
    closed: AtomicBool,
    read_timeout_ns: AtomicU64,
    send: Mutex<SendState>,
    /// How long a send or flush waits for room or completions; [`NO_TIMEOUT`]: forever.
    send_timeout_ns: AtomicU64,
}

/// Busy-polls briefly, then yields, then sleeps 50-200 µs between polls.
struct Backoff(u32);

impl Backoff {
    fn wait(&mut self) {
        self.0 = self.0.saturating_add(1);
        if self.0 < 64 {
            std::hint::spin_loop();
        } else if self.0 < 256 {
            std::thread::yield_now();
        } else if self.0 < 2048 {
            std::thread::sleep(Duration::from_micros(50));
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Shared {
    fn err(&self, detail: impl Into<String>) -> TransportError {
        TransportError::Rdma {
            peer: self.peer.clone(),
            detail: detail.into(),
            broken: true,
        }
    }

    /// A request refused before anything was posted: the channel stays usable.
    fn refuse(&self, detail: impl Into<String>) -> TransportError {
        TransportError::Rdma {
            peer: self.peer.clone(),
            detail: detail.into(),
            broken: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SendState> {
        self.send.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reaps send completions (without waiting), freeing buffers.
    fn reap(&self, st: &mut SendState) -> Result<(), TransportError> {
        if let Some(f) = &st.failed {
            return Err(self.err(f.clone()));
        }
        let mut wcs: Vec<WorkCompletion> = Vec::with_capacity(16);
        if let Err(e) = self.qp.send_cq().poll(&mut wcs, 16) {
            st.failed = Some(e.to_string());
            return Err(self.err(e.to_string()));
        }
        for wc in wcs {
            let wr_id = wc.wr_id;
            if let Err(e) = wc.into_result() {
                let msg = format!("sending: {e}");
                st.failed = Some(msg.clone());
                return Err(self.err(msg));
            }
            // Completions come in posting order: everything up to this one
            // (unsignalled requests included) is done.
            if !st.inflight.iter().any(|w| w.wr_id == wr_id) {
                let msg = format!("send completion for unknown work request {wr_id}");
                st.failed = Some(msg.clone());
                return Err(self.err(msg));
            }
            while let Some(w) = st.inflight.pop_front() {
                if let Some(s) = w.slot {
                    st.free.push(s);
                }
                if w.wr_id == wr_id {
                    break;
                }
            }
        }
        Ok(())
    }

    /// How long a send or flush may wait.
    fn send_timeout(&self) -> Duration {
        Duration::from_nanos(self.send_timeout_ns.load(Ordering::Relaxed))
    }

    /// Waits (bounded by `timeout`) until `ready` holds, reaping completions.
    fn wait_send(
        &self,
        timeout: Duration,
        what: &'static str,
        abort_on_close: bool,
        ready: impl Fn(&SendState) -> bool,
    ) -> Result<MutexGuard<'_, SendState>, TransportError> {
        let start = Instant::now();
        let mut backoff = Backoff(0);
        loop {
            if abort_on_close && self.closed.load(Ordering::Acquire) {
                return Err(self.err("the channel was shut down on this side"));
            }
            let mut st = self.lock();
            self.reap(&mut st)?;
            if ready(&st) {
                return Ok(st);
            }
            drop(st);
            if start.elapsed() >= timeout {
                return Err(TransportError::Timeout {
                    what,
                    after: start.elapsed(),
                });
            }
            backoff.wait();
        }
    }

    /// Posts one send request with the window bookkeeping; `st` has room.
    fn post(
        &self,
        st: &mut SendState,
        op: SendOp,
        sges: &[super::mr::Sge<'_>],
        slot: Option<usize>,
        force_signal: bool,
    ) -> Result<(), TransportError> {
        let signaled = force_signal || st.since_signal + 1 >= SIGNAL_EVERY;
        let wr_id = st.next_wr;
        let r = self.qp.post_send(&SendRequest {
            wr_id,
            op,
            sges,
            signaled,
        });
        if let Err(e) = r {
            let msg = e.to_string();
            st.failed = Some(msg.clone());
            return Err(self.err(msg));
        }
        st.next_wr += 1;
        st.since_signal = if signaled { 0 } else { st.since_signal + 1 };
        st.inflight.push_back(Inflight { wr_id, slot });
        Ok(())
    }

    /// Posts the end-of-stream marker once and waits (up to `wait`) for
    /// everything posted to complete.
    fn send_eos(&self, wait: Duration) -> Result<(), TransportError> {
        {
            let mut st = self.wait_send(
                wait,
                "waiting for room to post end of stream",
                false,
                |st| st.inflight.len() < WINDOW,
            )?;
            if st.eos_posted {
                return Ok(());
            }
            self.post(&mut st, SendOp::SendWithImm(EOS_IMM), &[], None, true)?;
            st.eos_posted = true;
        }
        drop(self.wait_send(
            wait,
            "waiting for the end of stream to be sent",
            false,
            |st| st.inflight.is_empty(),
        )?);
        Ok(())
    }
}

impl ChannelControl for Shared {
    /// Posts end of stream to the peer (its reader sees `Ok(false)`), makes
    /// the local reader see end of stream and the local sink fail.
    /// Best effort towards the peer: a dead peer is not an error here.
    fn shutdown(&self) -> Result<(), TransportError> {
        self.closed.store(true, Ordering::Release);
        let _ = self.send_eos(DROP_WAIT);
        Ok(())
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.read_timeout_ns
            .store(timeout_ns(timeout), Ordering::Relaxed);
        Ok(())
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.send_timeout_ns
            .store(timeout_ns(timeout), Ordering::Relaxed);
        Ok(())
    }

    fn peer(&self) -> &str {
        &self.peer
    }
}

/// The sending half of an RDMA channel (reach it from a `Box<dyn
/// FrameSink>` with [`FrameSink::as_rdma`]).
pub struct RdmaSink {
    shared: Arc<Shared>,
    send_mr: MemoryRegion,
    /// The peer's receive buffer size (and ours).
    max_frame: usize,
}

impl fmt::Debug for RdmaSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaSink")
            .field("peer", &self.shared.peer)
            .finish_non_exhaustive()
    }
}

impl RdmaSink {
    /// The largest frame this sink sends.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// RDMA WRITEs each page `(key, len)` from the area of `local` that
    /// contains it to the area of `remote` that contains the same key range.
    ///
    /// Every page is checked against both sides' areas, and `local` against
    /// this channel's protection domain, before anything is posted: a bad
    /// page fails the call and leaves the channel usable. Adjacent pages
    /// (in the order given) are coalesced into one WRITE of up to 1 MiB.
    ///
    /// Returns once every WRITE is posted, not placed: send a frame on this
    /// same channel afterwards, and the receiver sees that frame only after
    /// the pages are in its memory (RC executes a QP's requests in order, so
    /// a SEND's receive completion implies every earlier WRITE on that QP
    /// was placed). Call [`FrameSink::flush`] before dropping `local`, or
    /// the WRITEs still in flight fail (harmlessly for memory: deregistration
    /// fences the device).
    pub fn write_pages(
        &mut self,
        local: &RegisteredMemory,
        remote: &RemoteMemory,
        pages: &[(u64, usize)],
    ) -> Result<(), TransportError> {
        let sh = &self.shared;
        // Plan: (local area, offset, remote address, rkey, len), validated.
        let mut plan: Vec<(usize, usize, u64, u32, usize)> = Vec::new();
        let mut last_remote_area = usize::MAX;
        for &(key, len) in pages {
            if len == 0 {
                continue;
            }
            let (li, off) = local.locate(key, len).ok_or_else(|| {
                sh.refuse(format!(
                    "page {key:#x}+{len:#x} is outside this side's registered memory \
                     (a bug in the sender)"
                ))
            })?;
            let (ri, raddr) = remote.locate(key, len).ok_or_else(|| {
                sh.refuse(format!(
                    "page {key:#x}+{len:#x} is outside the peer's registered memory \
                     (the two sides' guest memory layouts differ)"
                ))
            })?;
            if let Some(p) = plan.last_mut() {
                if p.0 == li
                    && last_remote_area == ri
                    && p.1 + p.4 == off
                    && p.2 + p.4 as u64 == raddr
                    && p.4 + len <= MAX_WRITE
                {
                    p.4 += len;
                    continue;
                }
            }
            if len > MAX_WRITE {
                return Err(sh.refuse(format!(
                    "page {key:#x} of {len} bytes is larger than one RDMA WRITE may be \
                     ({MAX_WRITE}); split it"
                )));
            }
            last_remote_area = ri;
            plan.push((li, off, raddr, remote.areas[ri].rkey, len));
        }
        if let Some(a) = local.areas.first() {
            if !Arc::ptr_eq(&a.mr.pd().inner, &sh.qp.pd().inner) {
                return Err(sh.refuse(
                    "the local memory was registered with another endpoint than this \
                     channel's (a bug in the caller)",
                ));
            }
        }
        if sh.closed.load(Ordering::Acquire) {
            return Err(sh.err("the channel was shut down on this side"));
        }
        let n = plan.len();
        for (k, &(li, off, remote_addr, rkey, len)) in plan.iter().enumerate() {
            let mut st = sh.wait_send(
                sh.send_timeout(),
                "waiting for room in the RDMA send queue for page writes",
                true,
                |st| st.inflight.len() < WINDOW,
            )?;
            let sge = local.areas[li]
                .mr
                .sge(off, len)
                .map_err(|e| sh.err(e.to_string()))?;
            sh.post(
                &mut st,
                SendOp::Write { remote_addr, rkey },
                &[sge],
                None,
                k + 1 == n,
            )?;
        }
        Ok(())
    }
}

impl FrameSink for RdmaSink {
    fn send(&mut self, parts: &[&[u8]]) -> Result<(), TransportError> {
        let len = parts
            .iter()
            .try_fold(0usize, |acc, p| acc.checked_add(p.len()))
            .unwrap_or(usize::MAX);
        if len > self.max_frame {
            return Err(TransportError::SendTooLarge {
                len,
                max: self.max_frame,
            });
        }
        let sh = Arc::clone(&self.shared);
        let slot = {
            let mut st = sh.wait_send(
                sh.send_timeout(),
                "waiting for a free RDMA send buffer (the receiver is not taking frames)",
                true,
                |st| st.inflight.len() < WINDOW && (len == 0 || !st.free.is_empty()),
            )?;
            if len == 0 {
                None
            } else {
                st.free.pop()
            }
        };
        if let Some(s) = slot {
            let mem = self
                .send_mr
                .as_mut_slice()
                .ok_or_else(|| sh.err("send buffer is not owned memory (a bug)"))?;
            let mut dst = &mut mem[s * MAX_RDMA_FRAME..s * MAX_RDMA_FRAME + len];
            for p in parts {
                let (head, tail) = dst.split_at_mut(p.len());
                head.copy_from_slice(p);
                dst = tail;
            }
        }
        let sge;
        let sges: &[super::mr::Sge<'_>] = match slot {
            Some(s) => {
                sge = [self
                    .send_mr
                    .sge(s * MAX_RDMA_FRAME, len)
                    .map_err(|e| sh.err(e.to_string()))?];
                &sge
            }
            None => &[],
        };
        let mut st = sh.lock();
        if st.eos_posted {
            if let Some(s) = slot {
                st.free.push(s);
            }
            return Err(sh.err("end of stream was already sent on this channel"));
        }
        // Signal every frame: its completion frees its buffer.
        sh.post(&mut st, SendOp::Send, sges, slot, true)
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        let sh = &self.shared;
        // Like a send, a flush gives up once the channel is shut down here: the pipeline's
        // workers must not outwait a migration that already failed.
        drop(sh.wait_send(
            sh.send_timeout(),
            "waiting for RDMA sends to complete",
            true,
            |st| st.inflight.is_empty(),
        )?);
        Ok(())
    }

    fn as_rdma(&mut self) -> Option<&mut RdmaSink> {
        Some(self)
    }
}

impl Drop for RdmaSink {
    /// Sends end of stream (best effort) and waits briefly for the frames
    /// in flight, which read this sink's buffers.
    fn drop(&mut self) {
        let _ = self.shared.send_eos(DROP_WAIT);
    }
}

/// The receiving half of an RDMA channel.
pub struct RdmaSource {
    shared: Arc<Shared>,
    recv_mr: MemoryRegion,
    slots: usize,
    eos: bool,
    failed: Option<String>,
}

impl fmt::Debug for RdmaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaSource")
            .field("peer", &self.shared.peer)
            .finish_non_exhaustive()
    }
}

impl RdmaSource {
    fn fail(&mut self, msg: String) -> TransportError {
        self.failed = Some(msg.clone());
        self.shared.err(msg)
    }
}

impl FrameSource for RdmaSource {
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, TransportError> {
        if self.eos {
            return Ok(false);
        }
        if let Some(f) = &self.failed {
            return Err(self.shared.err(f.clone()));
        }
        let sh = Arc::clone(&self.shared);
        let ns = sh.read_timeout_ns.load(Ordering::Relaxed);
        let deadline = (ns != NO_TIMEOUT).then(|| Instant::now() + Duration::from_nanos(ns));
        let mut wcs = Vec::with_capacity(1);
        let mut backoff = Backoff(0);
        let wc = loop {
            if let Err(e) = sh.qp.recv_cq().poll(&mut wcs, 1) {
                return Err(self.fail(e.to_string()));
            }
            if let Some(wc) = wcs.pop() {
                break wc;
            }
            if sh.closed.load(Ordering::Acquire) {
                self.eos = true;
                return Ok(false);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(TransportError::ReadTimeout {
                    peer: sh.peer.clone(),
                    mid_frame: false,
                });
            }
            backoff.wait();
        };
        let wc = match wc.into_result() {
            Ok(wc) => wc,
            Err(_) if sh.closed.load(Ordering::Acquire) => {
                self.eos = true;
                return Ok(false);
            }
            Err(e) => return Err(self.fail(format!("receiving: {e}"))),
        };
        match wc.imm {
            Some(EOS_IMM) => {
                self.eos = true;
                return Ok(false);
            }
            Some(other) => {
                return Err(self.fail(format!(
                    "unexpected immediate value {other:#x} (the peer is not a compatible godwit)"
                )))
            }
            None => {}
        }
        let slot = wc.wr_id as usize;
        let len = wc.byte_len as usize;
        if slot >= self.slots || len > MAX_RDMA_FRAME {
            return Err(self.fail(format!(
                "receive completion for buffer {slot} with {len} bytes is impossible (a bug)"
            )));
        }
        let start = slot * MAX_RDMA_FRAME;
        let Some(mem) = self.recv_mr.as_slice() else {
            return Err(self.fail("receive buffer is not owned memory (a bug)".into()));
        };
        // The completion handed this buffer back: the device does not write
        // it until it is posted again below.
        buf.clear();
        buf.extend_from_slice(&mem[start..start + len]);
        let sge = self
            .recv_mr
            .sge(start, MAX_RDMA_FRAME)
            .map_err(|e| sh.err(e.to_string()))?;
        if let Err(e) = sh.qp.post_recv(slot as u64, &[sge]) {
            return Err(self.fail(format!("reposting a receive buffer: {e}")));
        }
        Ok(true)
    }
}
