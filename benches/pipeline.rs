//! Throughput of the page pipeline's hot paths, each measured next to a
//! `memcpy` of the same number of bytes so the two rates print side by side.
//!
//! Run with `cargo bench --bench pipeline` (add a filter such as
//! `-- lz4_compress` to run one group). Figures are printed, never asserted.
//!
//! Page data is synthetic but shaped like a guest's RAM: 30% all-zero pages,
//! 40% text-like pages (words and small integers, which LZ4 compresses) and
//! 30% random pages (which it cannot), interleaved. Every buffer is written
//! before it is measured, so no benchmark reads the kernel's shared zero page.

use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use godwit::migration::batch::{
    decode, is_zero_page, BatchEncoder, Compression, Decoded, MemoryLimits, PAGE_SIZE,
};
use godwit::vmm::memory::{DirtyBitmap, MemoryLayout};
use godwit_transport::secure::{SealedSink, SealedSource};
use godwit_transport::{FrameSink, FrameSource, TransportError};

/// Pages per batch, as the send pipeline uses.
const BATCH_PAGES: usize = 128;
/// Pages of the small (cache-sized) zero-detection buffer: 1 MiB.
const SMALL_PAGES: usize = 256;
/// Pages of the large set used for scanning and for the worker pipeline: 64 MiB.
const SET_PAGES: usize = (64 << 20) / PAGE_SIZE;
/// Guest size of the dirty-bitmap benchmarks.
const BITMAP_GUEST_BYTES: u64 = 1 << 30;

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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Zero,
    Text,
    Random,
}

const WORDS: &[&str] = &[
    "the",
    "page",
    "dirty",
    "guest",
    "memory",
    "round",
    "kernel",
    "migration",
    "buffer",
    "stream",
    "batch",
    "zero",
    "vcpu",
    "device",
    "socket",
    "send",
    "receive",
    "copy",
    "host",
    "log",
    "error",
    "warn",
    "info",
    "debug",
    "cache",
    "inode",
    "file",
    "user",
    "time",
    "value",
    "state",
    "queue",
];

/// Fills `page` with log-like text: words, small integers, spaces, newlines.
fn text_page(rng: &mut Rng, page: &mut [u8], line: &mut String) {
    let mut at = 0;
    while at < page.len() {
        line.clear();
        for _ in 0..4 + rng.below(8) {
            let r = rng.next();
            if r % 4 == 0 {
                let _ = write!(line, "{} ", (r >> 8) % 1000);
            } else {
                line.push_str(WORDS[(r >> 8) as usize % WORDS.len()]);
                line.push(' ');
            }
        }
        line.push('\n');
        let n = line.len().min(page.len() - at);
        page[at..at + n].copy_from_slice(&line.as_bytes()[..n]);
        at += n;
    }
}

fn random_page(rng: &mut Rng, page: &mut [u8]) {
    for word in page.chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next().to_le_bytes());
    }
}

/// A buffer of `kinds.len()` pages filled according to `kinds`.
fn build_pages(kinds: &[Kind], seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut line = String::new();
    // Not `vec![0; ..]`: calloc'd memory reads as the shared zero page until
    // written, which would make every read look cache-hot.
    let mut buf = vec![0x55u8; kinds.len() * PAGE_SIZE];
    for (page, kind) in buf.chunks_exact_mut(PAGE_SIZE).zip(kinds) {
        match kind {
            Kind::Zero => page.fill(0),
            Kind::Text => text_page(&mut rng, page, &mut line),
            Kind::Random => random_page(&mut rng, page),
        }
    }
    buf
}

/// Exactly 3 zero, 4 text and 3 random pages in every 10, shuffled within
/// each group of 10 so the kinds interleave.
fn mixed_kinds(pages: usize, seed: u64) -> Vec<Kind> {
    const GROUP: [Kind; 10] = [
        Kind::Zero,
        Kind::Zero,
        Kind::Zero,
        Kind::Text,
        Kind::Text,
        Kind::Text,
        Kind::Text,
        Kind::Random,
        Kind::Random,
        Kind::Random,
    ];
    let mut rng = Rng::new(seed);
    let mut kinds = Vec::with_capacity(pages);
    while kinds.len() < pages {
        let mut g = GROUP;
        for i in (1..g.len()).rev() {
            g.swap(i, rng.below(i + 1));
        }
        kinds.extend_from_slice(&g[..g.len().min(pages - kinds.len())]);
    }
    kinds
}

/// `(guest physical address, page)` pairs of `buf`, page `i` at `i * 4096`.
fn page_refs(buf: &[u8]) -> Vec<(u64, &[u8])> {
    buf.chunks_exact(PAGE_SIZE)
        .enumerate()
        .map(|(i, p)| ((i * PAGE_SIZE) as u64, p))
        .collect()
}

/// Where a `memcpy` baseline copies its source to. The copy lands half a
/// page away from the source modulo 4096: with both at the same offset in a
/// page, 4K aliasing made a 32 KiB copy 20x slower on the AMD EPYC this was
/// written on, a baseline that would flatter everything measured beside it.
struct CopyTarget<T> {
    buf: Vec<T>,
    at: usize,
}

impl<T: Copy> CopyTarget<T> {
    /// A target for copies of `src` (the same slice must be passed to `copy`).
    fn new(src: &[T], fill: T) -> Self {
        let size = std::mem::size_of::<T>();
        let buf = vec![fill; src.len() + PAGE_SIZE / size];
        let gap =
            (src.as_ptr() as usize + PAGE_SIZE / 2).wrapping_sub(buf.as_ptr() as usize) % PAGE_SIZE;
        Self {
            buf,
            at: gap / size,
        }
    }

    fn copy(&mut self, src: &[T]) {
        self.buf[self.at..self.at + src.len()].copy_from_slice(black_box(src));
        black_box(&mut self.buf);
    }
}

fn count_zero_pages(buf: &[u8]) -> usize {
    black_box(buf)
        .chunks_exact(PAGE_SIZE)
        .filter(|p| is_zero_page(p))
        .count()
}

fn zero_page_detection(c: &mut Criterion, mixed: &[u8]) {
    let mut g = c.benchmark_group("zero_page_detection");
    let small_zero = build_pages(&[Kind::Zero; SMALL_PAGES], 1);
    let large_zero = build_pages(&vec![Kind::Zero; SET_PAGES], 1);
    let small_mixed = &mixed[..SMALL_PAGES * PAGE_SIZE];
    for (size, zero, mixed) in [
        ("1MiB", &small_zero[..], small_mixed),
        ("64MiB", &large_zero[..], mixed),
    ] {
        g.throughput(Throughput::Bytes(zero.len() as u64));
        g.bench_function(BenchmarkId::new("is_zero_page_all_zero", size), |b| {
            b.iter(|| count_zero_pages(zero))
        });
        g.bench_function(BenchmarkId::new("is_zero_page_mixed", size), |b| {
            b.iter(|| count_zero_pages(mixed))
        });
        let mut dst = CopyTarget::new(zero, 1);
        g.bench_function(BenchmarkId::new("memcpy", size), |b| {
            b.iter(|| dst.copy(zero))
        });
    }
    g.finish();
}

/// One encoded batch as a frame, as the receiver gets it.
fn frame(pages: &[(u64, &[u8])], name: &str) -> Vec<u8> {
    let mut enc = BatchEncoder::new();
    let e = enc
        .encode(1, pages, Compression::Lz4)
        .expect("a valid batch");
    let raw = pages.len() * PAGE_SIZE;
    let s = e.stats;
    eprintln!(
        "{name} batch: {} pages ({} zero), {raw} bytes -> {} on the wire ({:.2}x smaller), lz4 kept: {}",
        pages.len(),
        s.zero_pages,
        s.wire_bytes,
        raw as f64 / s.wire_bytes as f64,
        s.compressed,
    );
    e.parts().concat()
}

fn lz4(c: &mut Criterion, mixed: &[u8]) {
    let text = build_pages(&[Kind::Text; BATCH_PAGES], 2);
    let text = page_refs(&text);
    let mixed = page_refs(&mixed[..BATCH_PAGES * PAGE_SIZE]);
    let batches = [("text", &text), ("mixed", &mixed)];
    let bytes = (BATCH_PAGES * PAGE_SIZE) as u64;
    let src = vec![7u8; BATCH_PAGES * PAGE_SIZE];
    let mut dst = CopyTarget::new(&src, 1);

    let mut g = c.benchmark_group("lz4_compress");
    g.throughput(Throughput::Bytes(bytes));
    let mut enc = BatchEncoder::new();
    for (name, pages) in batches {
        g.bench_function(BenchmarkId::new("encode_lz4", name), |b| {
            b.iter(|| {
                let e = enc.encode(1, black_box(pages), Compression::Lz4);
                black_box(e.map(|e| e.stats.wire_bytes).expect("a valid batch"))
            })
        });
    }
    g.bench_function(BenchmarkId::new("encode_raw", "mixed"), |b| {
        b.iter(|| {
            let e = enc.encode(1, black_box(&mixed), Compression::None);
            black_box(e.map(|e| e.stats.wire_bytes).expect("a valid batch"))
        })
    });
    g.bench_function("memcpy", |b| b.iter(|| dst.copy(&src)));
    g.finish();

    let limits = MemoryLimits::new([(0, (SET_PAGES * PAGE_SIZE) as u64)]).expect("valid limits");
    let frames = batches.map(|(name, pages)| (name, frame(pages, name)));
    let mut g = c.benchmark_group("lz4_decompress");
    g.throughput(Throughput::Bytes(bytes));
    let mut scratch = Vec::new();
    for (name, f) in &frames {
        g.bench_function(BenchmarkId::new("decode_lz4", name), |b| {
            b.iter(|| match decode(black_box(f), &limits, &mut scratch) {
                Ok(Decoded::Batch(d)) => black_box(d.data_pages().len()),
                _ => panic!("the frame must decode to a batch"),
            })
        });
    }
    g.bench_function("memcpy", |b| b.iter(|| dst.copy(&src)));
    g.finish();
}

/// A bitmap over `layout` with each page dirty with probability `per_mille`/1000.
fn random_bitmap(layout: &MemoryLayout, per_mille: u64, seed: u64) -> DirtyBitmap {
    let mut rng = Rng::new(seed);
    let mut bm = DirtyBitmap::all(layout);
    for word in bm.regions.iter_mut().flatten() {
        let mut w = 0u64;
        for bit in 0..64 {
            if rng.next() % 1000 < per_mille {
                w |= 1 << bit;
            }
        }
        *word &= w;
    }
    bm
}

fn bitmap_scan(c: &mut Criterion) {
    let layout = MemoryLayout::for_size(BITMAP_GUEST_BYTES).expect("valid layout");
    let pages = layout.total_pages();
    let words: usize = DirtyBitmap::all(&layout).regions.iter().map(Vec::len).sum();
    let bytes = (words * 8) as u64;
    let mut g = c.benchmark_group("bitmap_scan");
    // Elements are the guest's pages (dirty or not): the rate at which the
    // bitmap of a guest is walked, comparable with copying that bitmap.
    g.throughput(Throughput::ElementsAndBytes {
        elements: pages,
        bytes,
    });
    for (name, per_mille) in [("1pct", 10), ("10pct", 100), ("100pct", 1000)] {
        let bm = random_bitmap(&layout, per_mille, 3);
        eprintln!(
            "bitmap {name}: {} of {pages} pages dirty, {bytes} bytes of bitmap",
            bm.count()
        );
        g.bench_function(BenchmarkId::new("pages", name), |b| {
            b.iter(|| {
                let (mut n, mut x) = (0u64, 0u64);
                // Use every address, as the pipeline does, so the
                // iteration cannot shrink to a popcount.
                for gpa in black_box(&bm).pages(&layout) {
                    n += 1;
                    x ^= gpa;
                }
                black_box((n, x))
            })
        });
    }
    let src = DirtyBitmap::all(&layout).regions.concat();
    let mut dst = CopyTarget::new(&src, 1);
    g.bench_function("memcpy", |b| b.iter(|| dst.copy(&src)));
    g.finish();
}

/// Encodes every batch with one thread per encoder, the threads taking
/// batches from a shared index like the pipeline's workers; returns the
/// bytes that would go on the wire.
fn encode_all(
    batches: &[Vec<(u64, &[u8])>],
    encoders: &mut [BatchEncoder],
    c: Compression,
) -> usize {
    let next = AtomicUsize::new(0);
    let total = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for enc in encoders.iter_mut() {
            let (next, total) = (&next, &total);
            s.spawn(move || {
                let mut wire = 0;
                while let Some(batch) = batches.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let e = enc.encode(1, batch, c).expect("a valid batch");
                    wire += e.stats.wire_bytes;
                }
                total.fetch_add(wire, Ordering::Relaxed);
            });
        }
    });
    total.into_inner()
}

fn workers_1_vs_2(c: &mut Criterion, mixed: &[u8]) {
    let refs = page_refs(mixed);
    let batches: Vec<Vec<(u64, &[u8])>> = refs.chunks(BATCH_PAGES).map(<[_]>::to_vec).collect();
    let mut g = c.benchmark_group("workers_1_vs_2");
    g.throughput(Throughput::Bytes(mixed.len() as u64));
    for (name, compression) in [("lz4", Compression::Lz4), ("raw", Compression::None)] {
        for threads in [1, 2] {
            let mut encoders: Vec<BatchEncoder> =
                (0..threads).map(|_| BatchEncoder::new()).collect();
            let wire = encode_all(&batches, &mut encoders, compression);
            if threads == 1 {
                eprintln!(
                    "64 MiB mixed set, {name}: {wire} bytes on the wire ({:.2}x smaller)",
                    mixed.len() as f64 / wire as f64
                );
            }
            g.bench_function(BenchmarkId::new(name, format!("{threads}_threads")), |b| {
                b.iter(|| black_box(encode_all(black_box(&batches), &mut encoders, compression)))
            });
        }
    }
    let mut dst = CopyTarget::new(mixed, 1);
    g.bench_function(BenchmarkId::new("memcpy", "1_thread"), |b| {
        b.iter(|| dst.copy(mixed))
    });
    g.finish();
}

/// Keeps the last frame it was given, as a socket would take it.
struct LastFrame(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl FrameSink for LastFrame {
    fn send(&mut self, parts: &[&[u8]]) -> Result<(), TransportError> {
        let mut f = self.0.lock().expect("not poisoned");
        f.clear();
        for p in parts {
            f.extend_from_slice(p);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
}

/// Gives the same frame again and again.
struct SameFrame(Vec<u8>);

impl FrameSource for SameFrame {
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, TransportError> {
        buf.clear();
        buf.extend_from_slice(&self.0);
        Ok(true)
    }
}

/// What encrypting a TCP data stream costs per core: sealing and opening a 1 MiB batch
/// (AES-256-GCM), next to a memcpy and to passing the frame on in the clear (one copy).
fn sealing(c: &mut Criterion, mixed: &[u8]) {
    let mut g = c.benchmark_group("seal");
    let batch = &mixed[..SMALL_PAGES * PAGE_SIZE];
    g.throughput(Throughput::Bytes(batch.len() as u64));
    let key = [0x42u8; 32];
    let wire = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut plain = LastFrame(wire.clone());
    g.bench_function("plaintext_frame", |b| {
        b.iter(|| plain.send(&[black_box(batch)]).expect("send"))
    });
    let mut sealed = SealedSink::new(Box::new(LastFrame(wire.clone())), &key);
    g.bench_function("seal", |b| {
        b.iter(|| sealed.send(&[black_box(batch)]).expect("seal"))
    });
    // Opening needs frames in sequence: a fresh source per frame, each at sequence 0.
    let mut first = SealedSink::new(Box::new(LastFrame(wire.clone())), &key);
    first.send(&[batch]).expect("seal");
    let frame = wire.lock().expect("not poisoned").clone();
    let mut buf = Vec::new();
    g.bench_function("open", |b| {
        b.iter(|| {
            let mut src = SealedSource::new(Box::new(SameFrame(frame.clone())), &key);
            src.recv(&mut buf).expect("opens")
        })
    });
    let mut dst = CopyTarget::new(batch, 1);
    g.bench_function("memcpy", |b| b.iter(|| dst.copy(batch)));
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let mixed = build_pages(&mixed_kinds(SET_PAGES, 4), 5);
    zero_page_detection(&mut c, &mixed);
    lz4(&mut c, &mixed);
    bitmap_scan(&mut c);
    workers_1_vs_2(&mut c, &mixed);
    sealing(&mut c, &mixed);
    c.final_summary();
}
