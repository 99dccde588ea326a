//! Throughput of the three ways a page batch can move from A to B, side by
//! side in one run so their ratios mean something:
//!
//! - `write`: RDMA WRITE of the batch's pages straight from A's registered
//!   memory into B's ([`RdmaSink::write_pages`], the zero-copy path),
//! - `send`: the same bytes as one RDMA SEND frame ([`FrameSink::send`] on A,
//!   [`FrameSource::recv`] in a receiver thread on B),
//! - `tcp`: the same frame over a TCP data stream ([`TcpTransport`]).
//!
//! Each measurement moves `iters` batches back to back, then sends a 1-byte
//! marker frame on the same channel and waits for B's 1-byte answer, so the
//! time covers the data being in B's memory (RC places a QP's WRITEs before a
//! later SEND's receive completes) and B having seen it.
//!
//! It needs the soft-RoCE lab (rxe0 on 10.99.0.1 = A, rxe1 on 10.99.0.2 = B);
//! without an RDMA device it prints `SKIPPED` and succeeds:
//!
//! ```sh
//! cargo bench -p godwit-transport --features rdma --no-run   # prints target/release/deps/rdma-HASH
//! ci/rdmalab/run.sh -- target/release/deps/rdma-HASH --bench
//! ```
//!
//! Sizes are small: soft-RoCE under TCG moves 10-60 MB/s. Figures are
//! printed, never asserted; `benches/rdma_lab.sh` runs this next to perftest
//! and end-to-end migrations.

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use godwit_transport::rdma::{
    raise_memlock_limit, Device, EndpointInfo, Exposure, MemoryArea, RdmaEndpoint, RdmaError,
    RdmaOptions, RegisteredMemory, RemoteMemory,
};
use godwit_transport::{
    AbortHandle, Channel, ConnectOptions, FrameSink, FrameSource, TcpTransport, Transport,
};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
/// Registered area on each side; batches rotate through it.
const AREA: usize = 4 * MIB;
/// Page batches measured: 128 pages (the send pipeline's batch) and 256.
const BATCHES: [usize; 2] = [128, 256];
const IP_A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1));
const IP_B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2));
/// Bound on every wait for B's answer.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on B's receiver thread idling between measurements.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// xorshift64*: deterministic, incompressible bytes.
fn fill(buf: &mut [u8], mut s: u64) {
    for chunk in buf.chunks_mut(8) {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        let v = s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A's half of one channel: its sink and the source of B's answers.
struct Sender {
    sink: Box<dyn FrameSink>,
    acks: Box<dyn FrameSource>,
    ack_buf: Vec<u8>,
    abort: AbortHandle,
}

impl Sender {
    /// Ends a measurement: a marker frame, then B's answer.
    fn sync(&mut self) {
        self.sink.send(&[&[1u8]]).expect("marker frame");
        self.sink.flush().expect("flush");
        let more = self.acks.recv(&mut self.ack_buf).expect("B's answer");
        assert!(more && self.ack_buf.len() == 1, "B closed the channel");
    }
}

/// Starts B's receiver thread on `b` (frames are received into a buffer and
/// dropped; a 1-byte frame is answered) and returns A's half of `a`.
fn pair<'s>(a: Channel, b: Channel, scope: &'s std::thread::Scope<'s, '_>) -> Sender {
    a.set_read_timeout(Some(ACK_TIMEOUT))
        .expect("A read timeout");
    b.set_read_timeout(Some(IDLE_TIMEOUT))
        .expect("B read timeout");
    let (sink, acks, abort) = a.into_parts();
    let (mut answer, mut source, _) = b.into_parts();
    scope.spawn(move || {
        let mut buf = Vec::new();
        loop {
            match source.recv(&mut buf) {
                Ok(true) => {
                    if buf.len() == 1 {
                        answer.send(&[&[2u8]]).expect("answer");
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    eprintln!("receiver on B: {e}");
                    break;
                }
            }
        }
    });
    Sender {
        sink,
        acks,
        ack_buf: Vec::new(),
        abort,
    }
}

/// Page keys of batch `k` (contiguous pages, rotating through the area, as
/// a sorted dirty batch of a busy region would be).
fn batch_pages(pages: usize, k: usize) -> Vec<(u64, usize)> {
    let slots = AREA / (pages * PAGE);
    let first = (k % slots) * pages;
    (first..first + pages)
        .map(|p| ((p * PAGE) as u64, PAGE))
        .collect()
}

/// What the bench measured itself (criterion prints its own statistics; this
/// is one plain figure per case for scripts: all bytes / all time).
#[derive(Default)]
struct Tally(Vec<(String, u64, Duration)>);

impl Tally {
    fn add(&mut self, name: &str, bytes: u64, d: Duration) {
        match self.0.iter_mut().find(|t| t.0 == name) {
            Some(t) => {
                t.1 += bytes;
                t.2 += d;
            }
            None => self.0.push((name.to_owned(), bytes, d)),
        }
    }

    fn print(&self) {
        for (name, bytes, d) in &self.0 {
            eprintln!(
                "FIGURE rdma_bench {name}: {:.1} MB/s ({:.1} MiB in {:.2} s)",
                *bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9),
                *bytes as f64 / MIB as f64,
                d.as_secs_f64()
            );
        }
    }
}

fn main() {
    let devices = Device::list().unwrap_or_default();
    if devices.is_empty() {
        eprintln!(
            "SKIPPED: no RDMA device (run it in the lab: ci/rdmalab/run.sh -- BENCH --bench)"
        );
        return;
    }
    let _ = raise_memlock_limit();
    let opts = RdmaOptions {
        send_timeout: Duration::from_secs(30),
        ..RdmaOptions::default()
    };
    let mut a = match RdmaEndpoint::open_with(IP_A, 1, opts.clone()) {
        Ok(a) => a,
        Err(e @ (RdmaError::NoDeviceForIp { .. } | RdmaError::NoDevice)) => {
            eprintln!("SKIPPED: no RDMA device for {IP_A} ({e}); this bench needs the lab");
            return;
        }
        Err(e) => panic!("open A: {e}"),
    };
    let mut b = RdmaEndpoint::open_with(IP_B, 1, opts).expect("open B");
    eprintln!(
        "endpoint A on {} ({IP_A}), B on {} ({IP_B})",
        a.device(),
        b.device()
    );

    // Guest memory stand-ins, written before use; declared before the
    // registrations, so they outlive them.
    let mut mem_a = vec![0u8; AREA];
    fill(&mut mem_a, 0x1234_5678);
    let mut mem_b = vec![0u8; AREA];
    fill(&mut mem_b, 0x8765_4321);
    // SAFETY: `mem_a` outlives the registration (declared before it, dropped
    // after it) and is neither moved nor read/written while WRITEs run.
    let reg_a: RegisteredMemory = unsafe {
        a.register_memory(
            &[MemoryArea {
                key: 0,
                ptr: mem_a.as_mut_ptr(),
                len: AREA,
            }],
            Exposure::Local,
        )
    }
    .expect("register A");
    // SAFETY: as above, for `mem_b` (written only by A's WRITEs, never read).
    let reg_b: RegisteredMemory = unsafe {
        b.register_memory(
            &[MemoryArea {
                key: 0,
                ptr: mem_b.as_mut_ptr(),
                len: AREA,
            }],
            Exposure::RemoteWrite,
        )
    }
    .expect("register B");
    let remote = RemoteMemory::from_bytes(&reg_b.descriptor()).expect("B's descriptor");

    let ia = EndpointInfo::from_bytes(&a.local_info().to_bytes()).expect("A's info");
    let ib = EndpointInfo::from_bytes(&b.local_info().to_bytes()).expect("B's info");
    let ca = a.connect(&ib).expect("connect A").remove(0);
    let cb = b.connect(&ia).expect("connect B").remove(0);

    // TCP over the same two addresses: A (10.99.0.1) -> B (10.99.0.2).
    let mut listener = TcpTransport
        .listen(&format!("{IP_B}:0"))
        .expect("listen on B");
    let at = listener.local_addr().to_string();
    let (tcp_a, tcp_b) = std::thread::scope(|s| {
        let acc = s.spawn(move || listener.accept(Duration::from_secs(20)));
        let c = TcpTransport
            .connect(&at, NonZeroUsize::MIN, &ConnectOptions::default())
            .expect("TCP connect");
        let l = acc.join().expect("accept thread").expect("TCP accept");
        (c, l)
    });
    // The control channels stay open until the end.
    let (tcp_ctl_a, tcp_ctl_b) = (tcp_a.control, tcp_b.control);
    let (tcp_a, tcp_b) = (
        tcp_a.data.into_iter().next().expect("TCP stream A"),
        tcp_b.data.into_iter().next().expect("TCP stream B"),
    );

    let mut frame = vec![0u8; BATCHES.iter().max().copied().unwrap_or(0) * PAGE];
    fill(&mut frame, 0x5151_5151);

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .nresamples(2000)
        .without_plots()
        .configure_from_args();
    let mut tally = Tally::default();

    std::thread::scope(|s| {
        let mut rdma = pair(ca, cb, s);
        let mut tcp = pair(tcp_a, tcp_b, s);
        for &pages in &BATCHES {
            let bytes = pages * PAGE;
            let mut g = c.benchmark_group(format!("batch_{}k", bytes / 1024));
            g.throughput(Throughput::Bytes(bytes as u64));
            let batches: Vec<Vec<(u64, usize)>> =
                (0..AREA / bytes).map(|k| batch_pages(pages, k)).collect();
            g.bench_function(BenchmarkId::new("write", pages), |bch| {
                bch.iter_custom(|iters| {
                    let t = Instant::now();
                    {
                        let sink = rdma.sink.as_rdma().expect("an RDMA sink");
                        for k in 0..iters as usize {
                            sink.write_pages(&reg_a, &remote, &batches[k % batches.len()])
                                .expect("write_pages");
                        }
                    }
                    rdma.sync();
                    let d = t.elapsed();
                    tally.add(&format!("write {}k", bytes / 1024), iters * bytes as u64, d);
                    d
                })
            });
            g.bench_function(BenchmarkId::new("send", pages), |bch| {
                bch.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        rdma.sink.send(&[&frame[..bytes]]).expect("send");
                    }
                    rdma.sync();
                    let d = t.elapsed();
                    tally.add(&format!("send {}k", bytes / 1024), iters * bytes as u64, d);
                    d
                })
            });
            g.bench_function(BenchmarkId::new("tcp", pages), |bch| {
                bch.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        tcp.sink.send(&[&frame[..bytes]]).expect("tcp send");
                    }
                    tcp.sync();
                    let d = t.elapsed();
                    tally.add(&format!("tcp {}k", bytes / 1024), iters * bytes as u64, d);
                    d
                })
            });
            g.finish();
        }
        // Every WRITE is placed (sync waited for it) before `reg_a` goes.
        // Dropping the RDMA sink sends end of stream; the TCP stream is shut
        // down: both end B's receiver threads.
        rdma.sink.flush().expect("flush");
        drop(rdma);
        let _ = tcp.abort.shutdown();
        drop(tcp);
    });
    drop((tcp_ctl_a, tcp_ctl_b));
    tally.print();
    c.final_summary();
    drop(reg_b);
    drop(reg_a);
    drop((mem_a, mem_b));
}
