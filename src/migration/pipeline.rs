//! The page pipeline.
//!
//! ```text
//!  source:  dirty bitmap --scan--> batches (per stream) --> workers: copy, zero-check, lz4 --> stream sinks
//!  dest:    stream sources --> one thread per stream: decode (validated), write into guest memory
//! ```
//!
//! Pages are assigned to streams by address (256 KiB chunks, round-robin), so a page always
//! travels on the same stream and TCP's in-order delivery keeps a newer copy of a page behind an
//! older one. Within a round each page is sent once, and a round ends only after every batch
//! of it was sent, so workers may finish batches in any order. Each stream closes a round with
//! a marker carrying its batch count; the destination checks the count, so a lost batch is an
//! error, never a silently stale page.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, SendTimeoutError, Sender};
use godwit_transport::{FrameSink, FrameSource};
use vm_memory::{Bytes, GuestAddress};

use super::batch::{
    self, BatchEncoder, Compression, Decoded, EncodeWithError, MemoryLimits, MAX_BATCH_PAGES,
    PAGE_SIZE,
};
use super::postcopy::Landing;
use super::MigrationError;
use crate::vmm::memory::GuestMemory;

/// What ends a round early: the operator's cancel and the migration's deadline. The
/// deadline does not apply once the guest is paused: finishing is then the quickest way out.
#[derive(Debug)]
pub struct Interrupt<'a> {
    /// Set by `godwit cancel`.
    pub cancel: &'a AtomicBool,
    /// When the migration must have converged, and the deadline's length for the message.
    pub deadline: Option<(Instant, Duration)>,
    /// The round in progress, for the message.
    pub round: u32,
}

impl Interrupt<'_> {
    /// Fails when the round must stop.
    pub fn check(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled);
        }
        match self.deadline {
            Some((at, length)) if Instant::now() >= at => {
                Err(MigrationError::NotConverged(format!(
                    "did not converge by its deadline of {} s, which passed during round {}; \
                     raise --deadline, allow throttling (--allow-throttle), or raise the bandwidth",
                    length.as_secs(),
                    self.round
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Pages of one stream's address chunk (256 KiB).
const CHUNK_PAGES: u64 = 64;
/// Pages per batch (512 KiB raw): large enough to amortise a frame, small enough to spread
/// over workers.
const BATCH_PAGES: usize = 128;
const _: () = assert!(BATCH_PAGES <= MAX_BATCH_PAGES);

/// How far behind its schedule a rate-limited sender may catch up at full speed.
const MAX_CATCH_UP: Duration = Duration::from_millis(20);

/// Limits the rate of page data on the wire (like QEMU's max-bandwidth).
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: f64,
    next: Mutex<Instant>,
}

impl RateLimiter {
    /// A limiter at `bytes_per_sec`.
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits until `bytes` may go.
    fn acquire(&self, bytes: usize) {
        let wait = {
            let Ok(mut next) = self.next.lock() else {
                return;
            };
            let now = Instant::now();
            // A sender that fell behind its schedule (a late wake-up, a slow batch) may catch
            // up by a short burst, so the long-run rate is the cap and not the cap less every
            // delay (it held 59 MiB/s under a 64 MiB/s cap before).
            let earliest = now.checked_sub(MAX_CATCH_UP).unwrap_or(now);
            let start = (*next).max(earliest);
            *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
            start.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// What one batch cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchStats {
    /// Pages in the batch.
    pub pages: u64,
    /// Of those, all-zero pages.
    pub zero_pages: u64,
    /// Raw bytes of the non-zero pages.
    pub raw_bytes: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Raw bytes lz4 was tried on, and what they became (raw size for a batch that did not
    /// shrink and went raw).
    pub compressed_raw: u64,
    /// Size on the wire of `compressed_raw`.
    pub compressed_wire: u64,
    /// Time spent compressing.
    pub compress_time: Duration,
}

impl BatchStats {
    fn add(&mut self, o: &BatchStats) {
        self.pages += o.pages;
        self.zero_pages += o.zero_pages;
        self.raw_bytes += o.raw_bytes;
        self.wire_bytes += o.wire_bytes;
        self.compressed_raw += o.compressed_raw;
        self.compressed_wire += o.compressed_wire;
        self.compress_time += o.compress_time;
    }
}

struct Job {
    round: u32,
    stream: usize,
    pages: Vec<u64>,
    compression: Compression,
}

struct Stream {
    sink: Box<dyn FrameSink>,
    batches: u64,
}

/// Where raw pages go when the data plane can write them straight into the destination's
/// guest memory (RDMA); `None` sends them in frames.
#[cfg(feature = "rdma")]
pub type Placement = Option<Arc<super::dataplane::rdma::Placement>>;
/// Without RDMA support, pages always travel in frames.
#[cfg(not(feature = "rdma"))]
pub type Placement = Option<std::convert::Infallible>;

/// The source half: worker threads that turn batches of page addresses into frames.
pub struct SendPipeline {
    jobs: Option<Sender<Job>>,
    results: Receiver<Result<BatchStats, MigrationError>>,
    streams: Arc<Vec<Mutex<Stream>>>,
    workers: Vec<JoinHandle<()>>,
    /// How long a round may make no progress before it fails.
    stall: Duration,
}

impl std::fmt::Debug for SendPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendPipeline")
            .field("streams", &self.streams.len())
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl SendPipeline {
    /// Starts `workers` threads that read `memory` and send on `sinks`; a round that makes
    /// no progress for `stall` fails.
    pub fn new(
        memory: GuestMemory,
        sinks: Vec<Box<dyn FrameSink>>,
        workers: usize,
        limiter: Option<RateLimiter>,
        placement: Placement,
        stall: Duration,
    ) -> Self {
        let streams: Arc<Vec<Mutex<Stream>>> = Arc::new(
            sinks
                .into_iter()
                .map(|sink| Mutex::new(Stream { sink, batches: 0 }))
                .collect(),
        );
        let limiter = limiter.map(Arc::new);
        let (jobs_tx, jobs_rx) = bounded::<Job>(workers * 4);
        let (results_tx, results_rx) = unbounded();
        let workers = (0..workers.max(1))
            .map(|i| {
                let (jobs, results) = (jobs_rx.clone(), results_tx.clone());
                let (memory, streams, limiter) = (memory.clone(), streams.clone(), limiter.clone());
                // Without RDMA the placement is an always-`None` `Copy` type.
                #[cfg_attr(not(feature = "rdma"), allow(clippy::clone_on_copy))]
                let placement = placement.clone();
                std::thread::Builder::new()
                    .name(format!("page-worker{i}"))
                    .spawn(move || worker(memory, jobs, results, streams, limiter, placement))
                    .expect("spawning a page worker")
            })
            .collect();
        Self {
            jobs: Some(jobs_tx),
            results: results_rx,
            streams,
            workers,
            stall,
        }
    }

    /// Sends every page in `pages` (guest physical addresses) as round `round`, then closes
    /// the round on every stream. `progress` is called as batches complete with the page
    /// count done so far. Returns when all of the round is on the wire.
    pub fn send_round(
        &mut self,
        round: u32,
        pages: impl Iterator<Item = u64>,
        compression: Compression,
        interrupt: &Interrupt<'_>,
        mut progress: impl FnMut(&BatchStats),
    ) -> Result<BatchStats, MigrationError> {
        let jobs = self.jobs.as_ref().ok_or(MigrationError::PipelineClosed)?;
        let n = self.streams.len() as u64;
        let mut pending: Vec<Vec<u64>> = vec![Vec::with_capacity(BATCH_PAGES); n as usize];
        let mut outstanding = 0usize;
        let mut total = BatchStats::default();
        let mut collect = |block: bool,
                           outstanding: &mut usize,
                           total: &mut BatchStats|
         -> Result<(), MigrationError> {
            loop {
                let r = if block {
                    match self.results.recv_timeout(self.stall) {
                        Ok(r) => r,
                        Err(_) => {
                            return Err(MigrationError::Stalled {
                                what: "sending pages",
                                secs: self.stall.as_secs(),
                            })
                        }
                    }
                } else {
                    match self.results.try_recv() {
                        Ok(r) => r,
                        Err(_) => return Ok(()),
                    }
                };
                let stats = r?;
                *outstanding -= 1;
                total.add(&stats);
                progress(total);
                if block {
                    return Ok(());
                }
            }
        };
        // Checked before every batch, the tail batches of a short round included: a round
        // of the paused guest's last few pages fills no batch, and a cancel while paused
        // must still resume the guest here.
        let dispatch = |stream: usize,
                        batch: Vec<u64>,
                        outstanding: &mut usize|
         -> Result<(), MigrationError> {
            interrupt.check()?;
            let job = Job {
                round,
                stream,
                pages: batch,
                compression,
            };
            // Workers stuck on a dead link stop taking jobs: fail rather than wait forever.
            jobs.send_timeout(job, self.stall).map_err(|e| match e {
                SendTimeoutError::Timeout(_) => MigrationError::Stalled {
                    what: "sending pages",
                    secs: self.stall.as_secs(),
                },
                SendTimeoutError::Disconnected(_) => MigrationError::PipelineClosed,
            })?;
            *outstanding += 1;
            Ok(())
        };
        // A round with no pages dispatches nothing, yet is interrupted all the same.
        interrupt.check()?;
        for gpa in pages {
            let s = ((gpa / PAGE_SIZE as u64 / CHUNK_PAGES) % n) as usize;
            pending[s].push(gpa);
            if pending[s].len() == BATCH_PAGES {
                let batch = std::mem::replace(&mut pending[s], Vec::with_capacity(BATCH_PAGES));
                dispatch(s, batch, &mut outstanding)?;
                collect(false, &mut outstanding, &mut total)?;
            }
        }
        for (s, batch) in pending.into_iter().enumerate() {
            if !batch.is_empty() {
                dispatch(s, batch, &mut outstanding)?;
            }
        }
        while outstanding > 0 {
            collect(true, &mut outstanding, &mut total)?;
        }
        for stream in self.streams.iter() {
            let mut st = stream.lock().map_err(|_| MigrationError::PipelineClosed)?;
            let frame = batch::encode_end_of_round(round, st.batches);
            st.batches = 0;
            st.sink.send(&[&frame[..]])?;
            st.sink.flush()?;
            total.wire_bytes += frame.len() as u64;
        }
        Ok(total)
    }
}

impl SendPipeline {
    /// Sends `frame` on every stream: how a forecast's burst of real page batches ends, with
    /// the transport's end-of-burst frame.
    pub fn send_on_every_stream(&mut self, frame: &[u8]) -> Result<(), MigrationError> {
        for stream in self.streams.iter() {
            let mut st = stream.lock().map_err(|_| MigrationError::PipelineClosed)?;
            st.sink.send(&[frame])?;
            st.sink.flush()?;
        }
        Ok(())
    }
}

impl Drop for SendPipeline {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(
    memory: GuestMemory,
    jobs: Receiver<Job>,
    results: Sender<Result<BatchStats, MigrationError>>,
    streams: Arc<Vec<Mutex<Stream>>>,
    limiter: Option<Arc<RateLimiter>>,
    placement: Placement,
) {
    let mut encoder = BatchEncoder::new();
    for job in jobs {
        let r = match (&placement, job.compression) {
            #[cfg(feature = "rdma")]
            (Some(p), Compression::None) => {
                place_batch(&memory, &job, p, &mut encoder, &streams, limiter.as_deref())
            }
            _ => send_batch(&memory, &job, &mut encoder, &streams, limiter.as_deref()),
        };
        if results.send(r).is_err() {
            break;
        }
    }
}

/// Sends a batch's non-zero pages as RDMA WRITEs straight from this guest's memory into the
/// destination's (no copy on either host), and its zero pages as a frame of addresses. A frame
/// sent later on the same queue pair (the batch's own, or the round's end) is delivered only
/// after the writes landed, so the destination's round accounting still holds.
#[cfg(feature = "rdma")]
fn place_batch(
    memory: &GuestMemory,
    job: &Job,
    placement: &super::dataplane::rdma::Placement,
    encoder: &mut BatchEncoder,
    streams: &[Mutex<Stream>],
    limiter: Option<&RateLimiter>,
) -> Result<BatchStats, MigrationError> {
    let mut probe = [0u8; PAGE_SIZE];
    let (mut zero, mut data) = (Vec::new(), Vec::new());
    for &gpa in &job.pages {
        memory
            .read_slice(&mut probe, GuestAddress(gpa))
            .map_err(|e| MigrationError::Memory(e.to_string()))?;
        if batch::is_zero_page(&probe) {
            zero.push(gpa);
        } else {
            data.push((gpa, PAGE_SIZE));
        }
    }
    let mut stats = BatchStats {
        pages: job.pages.len() as u64,
        zero_pages: zero.len() as u64,
        raw_bytes: (data.len() * PAGE_SIZE) as u64,
        wire_bytes: (data.len() * PAGE_SIZE) as u64,
        ..BatchStats::default()
    };
    if let Some(l) = limiter {
        l.acquire(data.len() * PAGE_SIZE);
    }
    let mut st = streams[job.stream]
        .lock()
        .map_err(|_| MigrationError::PipelineClosed)?;
    if !data.is_empty() {
        st.sink
            .as_rdma()
            .ok_or(MigrationError::PipelineClosed)?
            .write_pages(&placement.local, &placement.remote, &data)?;
    }
    if !zero.is_empty() {
        let encoded = encoder
            .encode_with(job.round, &zero, Compression::None, |_, slot| {
                slot.fill(0);
                Ok::<(), std::convert::Infallible>(())
            })
            .map_err(|e| match e {
                EncodeWithError::Read(never) => match never {},
                EncodeWithError::Encode(e) => {
                    MigrationError::Memory(format!("cannot encode a batch: {e}"))
                }
            })?;
        st.sink.send(&[encoded.header, encoded.payload])?;
        st.batches += 1;
        stats.wire_bytes += encoded.header.len() as u64;
    }
    Ok(stats)
}

fn send_batch(
    memory: &GuestMemory,
    job: &Job,
    encoder: &mut BatchEncoder,
    streams: &[Mutex<Stream>],
    limiter: Option<&RateLimiter>,
) -> Result<BatchStats, MigrationError> {
    let started = Instant::now();
    let encoded = encoder
        .encode_with(job.round, &job.pages, job.compression, |gpa, slot| {
            memory.read_slice(slot, GuestAddress(gpa))
        })
        .map_err(|e| match e {
            EncodeWithError::Read(e) => MigrationError::Memory(e.to_string()),
            EncodeWithError::Encode(e) => {
                MigrationError::Memory(format!("cannot encode a batch: {e}"))
            }
        })?;
    let took = started.elapsed();
    let (header, payload) = (encoded.header, encoded.payload);
    let wire = (header.len() + payload.len()) as u64;
    let es = encoded.stats;
    let stats = BatchStats {
        pages: job.pages.len() as u64,
        zero_pages: es.zero_pages as u64,
        raw_bytes: es.raw_bytes as u64,
        wire_bytes: wire,
        // Every batch lz4 was tried on counts, also one that did not shrink and went raw:
        // otherwise incompressible pages would never show a ratio of 1 and `auto` would
        // keep compressing at the ratio it assumed.
        compressed_raw: if job.compression == Compression::Lz4 {
            es.raw_bytes as u64
        } else {
            0
        },
        compressed_wire: if job.compression == Compression::Lz4 {
            payload.len() as u64
        } else {
            0
        },
        compress_time: if job.compression == Compression::Lz4 {
            took
        } else {
            Duration::ZERO
        },
    };
    if let Some(l) = limiter {
        l.acquire(wire as usize);
    }
    let mut st = streams[job.stream]
        .lock()
        .map_err(|_| MigrationError::PipelineClosed)?;
    st.sink.send(&[header, payload])?;
    st.batches += 1;
    Ok(stats)
}

/// What a destination stream thread reports.
#[derive(Debug)]
pub enum StreamEvent {
    /// Stream `stream` received every batch of `round`.
    RoundEnd {
        /// Stream index.
        stream: usize,
        /// The round.
        round: u32,
    },
    /// Stream `stream` failed; the migration must be abandoned.
    Failed {
        /// Stream index.
        stream: usize,
        /// What went wrong.
        error: String,
    },
}

/// Starts one thread per data stream that writes incoming pages into `memory`, as `landing`
/// says (directly, or through post-copy's userfaultfd).
pub fn spawn_receivers(
    memory: GuestMemory,
    sources: Vec<Box<dyn FrameSource>>,
    limits: Arc<MemoryLimits>,
    landing: Arc<Landing>,
    events: Sender<StreamEvent>,
) -> Vec<JoinHandle<()>> {
    sources
        .into_iter()
        .enumerate()
        .map(|(stream, source)| {
            let (memory, limits, events) = (memory.clone(), limits.clone(), events.clone());
            let landing = landing.clone();
            std::thread::Builder::new()
                .name(format!("page-receiver{stream}"))
                .spawn(move || {
                    if let Err(e) =
                        receive_stream(&memory, source, &limits, &landing, stream, &events)
                    {
                        let _ = events.send(StreamEvent::Failed {
                            stream,
                            error: e.to_string(),
                        });
                    }
                })
                .expect("spawning a page receiver")
        })
        .collect()
}

fn receive_stream(
    memory: &GuestMemory,
    mut source: Box<dyn FrameSource>,
    limits: &MemoryLimits,
    landing: &Landing,
    stream: usize,
    events: &Sender<StreamEvent>,
) -> Result<(), MigrationError> {
    let mut frame = Vec::new();
    let mut scratch = Vec::new();
    let mut probe = vec![0u8; PAGE_SIZE];
    let mut round = 1u32;
    let mut batches = 0u64;
    while source.recv(&mut frame)? {
        match batch::decode(&frame, limits, &mut scratch)? {
            Decoded::Batch(b) => {
                if b.round != round {
                    return Err(MigrationError::StreamOrder {
                        stream,
                        expected: round,
                        got: b.round,
                    });
                }
                for gpa in b.zero_pages() {
                    landing.place(memory, gpa, None, &mut probe)?;
                }
                for (gpa, data) in b.data_pages() {
                    landing.place(memory, gpa, Some(data), &mut probe)?;
                }
                batches += 1;
            }
            Decoded::EndOfRound {
                round: r,
                batches: n,
            } => {
                if r != round || n != batches {
                    return Err(MigrationError::RoundIncomplete {
                        stream,
                        round: r,
                        announced: n,
                        received: batches,
                    });
                }
                let _ = events.send(StreamEvent::RoundEnd { stream, round });
                round += 1;
                batches = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the frames it is given; the pipeline's logic needs no real channel.
    struct CountingSink(Arc<AtomicUsize>);

    impl FrameSink for CountingSink {
        fn send(&mut self, _: &[&[u8]]) -> Result<(), godwit_transport::TransportError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }

        fn flush(&mut self) -> Result<(), godwit_transport::TransportError> {
            Ok(())
        }
    }

    /// A cancel stops a round however few pages it has: the paused guest's last round is
    /// often smaller than one batch, and a cancel then must still leave the VM on its source.
    #[test]
    fn a_cancel_stops_a_round_smaller_than_a_batch() {
        let layout = crate::vmm::memory::MemoryLayout::for_size(16 << 20).unwrap();
        let memory = layout.allocate().unwrap();
        let frames = Arc::new(AtomicUsize::new(0));
        let sinks: Vec<Box<dyn FrameSink>> = vec![Box::new(CountingSink(frames.clone()))];
        let mut pipeline = SendPipeline::new(memory, sinks, 1, None, None, Duration::from_secs(5));
        let cancel = AtomicBool::new(false);
        let interrupt = Interrupt {
            cancel: &cancel,
            deadline: None,
            round: 3,
        };
        let few = || (0..3u64).map(|i| i * PAGE_SIZE as u64);
        pipeline
            .send_round(3, few(), Compression::None, &interrupt, |_| {})
            .unwrap();
        let sent = frames.load(Ordering::Relaxed);
        assert!(sent > 0, "an uncancelled round sends its pages");

        cancel.store(true, Ordering::Relaxed);
        for pages in [few().collect::<Vec<_>>(), Vec::new()] {
            let r =
                pipeline.send_round(3, pages.into_iter(), Compression::None, &interrupt, |_| {});
            assert!(matches!(r, Err(MigrationError::Cancelled)), "{r:?}");
        }
        assert_eq!(
            frames.load(Ordering::Relaxed),
            sent,
            "a cancelled round sent frames"
        );
    }

    /// Catching up never lets a sender beat the cap by more than the catch-up burst.
    #[test]
    fn the_limiter_never_beats_its_cap_by_more_than_a_burst() {
        let limiter = RateLimiter::new(64 << 20);
        let started = Instant::now();
        // A sender that falls behind now and then still ends on the cap's schedule.
        for i in 0..64 {
            limiter.acquire(64 << 10);
            if i % 16 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // 4 MiB at 64 MiB/s: 62.5 ms, less the burst a late start may take back.
        let floor = Duration::from_secs_f64(4.0 / 64.0) - MAX_CATCH_UP;
        assert!(started.elapsed() >= floor, "{:?}", started.elapsed());
    }
}
