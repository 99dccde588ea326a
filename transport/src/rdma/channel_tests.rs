//! Tests of the RDMA channels. Without an RDMA device the lab tests print
//! `SKIPPED` and pass; in the soft-RoCE lab (`ci/rdmalab/run.sh`) endpoint A
//! is on 10.99.0.1 (rxe0) and endpoint B on 10.99.0.2 (rxe1), in one process.

use super::test_support::{mb_per_s, Mapping, Rng};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use super::*;
use crate::{Channel, FrameSink, TransportError};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const PAGE: usize = 4096;
const IP_A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1));
const IP_B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2));

/// Endpoints A (10.99.0.1) and B (10.99.0.2), or None (after printing
/// SKIPPED) without the lab's devices.
fn endpoints(streams: usize, opts: RdmaOptions) -> Option<(RdmaEndpoint, RdmaEndpoint)> {
    let _ = raise_memlock_limit();
    let a = match RdmaEndpoint::open_with(IP_A, streams, opts.clone()) {
        Ok(a) => a,
        Err(e @ (RdmaError::NoDeviceForIp { .. } | RdmaError::NoDevice)) => {
            eprintln!("SKIPPED: no RDMA device for {IP_A} ({e})");
            return None;
        }
        Err(e) => panic!("open A: {e}"),
    };
    let b = RdmaEndpoint::open_with(IP_B, streams, opts).expect("open B");
    eprintln!("endpoint A on {}, B on {}", a.device(), b.device());
    Some((a, b))
}

/// Connects both through their encoded infos, as over the control channel.
fn connect(a: &mut RdmaEndpoint, b: &mut RdmaEndpoint) -> (Vec<Channel>, Vec<Channel>) {
    let ia = EndpointInfo::from_bytes(&a.local_info().to_bytes()).expect("decode A");
    let ib = EndpointInfo::from_bytes(&b.local_info().to_bytes()).expect("decode B");
    let ca = a.connect(&ib).expect("connect A");
    let cb = b.connect(&ia).expect("connect B");
    (ca, cb)
}

fn small() -> RdmaOptions {
    RdmaOptions {
        recv_slots: 4,
        send_slots: 2,
        send_timeout: Duration::from_secs(30),
    }
}

// ---------------------------------------------------------------- host tests

#[test]
fn endpoint_info_round_trips_and_rejects_garbage() {
    let q = QpInfo {
        qp_num: 0x11,
        psn: 0x1234,
        gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 99, 0, 1],
        mtu: Mtu::B4096,
    };
    let info = EndpointInfo {
        max_frame: MAX_RDMA_FRAME as u32,
        qps: vec![q, QpInfo { qp_num: 0x12, ..q }],
    };
    let b = info.to_bytes();
    assert_eq!(EndpointInfo::from_bytes(&b).expect("decode"), info);
    assert!(EndpointInfo::from_bytes(&b[..b.len() - 1]).is_err());
    assert!(EndpointInfo::from_bytes(&[]).is_err());
    let mut v = b.clone();
    v[0] = 2;
    assert!(EndpointInfo::from_bytes(&v).is_err(), "version");
    let mut v = b.clone();
    v[1] = 3;
    assert!(EndpointInfo::from_bytes(&v).is_err(), "count vs length");
    let mut v = b.clone();
    v[1] = 0;
    assert!(EndpointInfo::from_bytes(&v[..6]).is_err(), "zero streams");
    let many = EndpointInfo {
        max_frame: 1,
        qps: vec![q; 65],
    };
    assert!(
        EndpointInfo::from_bytes(&many.to_bytes()).is_err(),
        "65 streams"
    );
    let mut v = b;
    v[6 + 24] = 0xff; // MTU of the first QP
    assert!(EndpointInfo::from_bytes(&v).is_err(), "QP info validated");
}

fn descriptor(areas: &[(u64, u64, u32, u64)]) -> Vec<u8> {
    let mut b = vec![1];
    b.extend_from_slice(&(areas.len() as u16).to_be_bytes());
    for &(key, addr, rkey, len) in areas {
        b.extend_from_slice(&key.to_be_bytes());
        b.extend_from_slice(&addr.to_be_bytes());
        b.extend_from_slice(&rkey.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
    }
    b
}

#[test]
fn remote_memory_decodes_and_rejects_garbage() {
    let good = descriptor(&[
        (1 << 32, 0x7f00_0000_0000, 7, 4 * MIB as u64),
        (0, 0x7e00_0000_0000, 5, 12 * MIB as u64),
    ]);
    let m = RemoteMemory::from_bytes(&good).expect("decode");
    assert_eq!(m.areas().len(), 2);
    assert_eq!(m.areas()[0].key, 0, "sorted by key");
    assert_eq!(m.areas()[1].rkey, 7);
    assert!(RemoteMemory::from_bytes(&good[..good.len() - 1]).is_err());
    let mut v = good.clone();
    v[0] = 9;
    assert!(RemoteMemory::from_bytes(&v).is_err(), "version");
    let overlap = descriptor(&[(0, 0x1000, 1, 8192), (4096, 0x9000, 2, 4096)]);
    assert!(RemoteMemory::from_bytes(&overlap).is_err(), "overlap");
    let empty = descriptor(&[(0, 0x1000, 1, 0)]);
    assert!(RemoteMemory::from_bytes(&empty).is_err(), "empty area");
    let wraps = descriptor(&[(u64::MAX - 10, 0x1000, 1, 4096)]);
    assert!(RemoteMemory::from_bytes(&wraps).is_err(), "key wraps");
    let wraps = descriptor(&[(0, u64::MAX - 10, 1, 4096)]);
    assert!(RemoteMemory::from_bytes(&wraps).is_err(), "addr wraps");
    assert!(RemoteMemory::from_bytes(&descriptor(&[])).is_err(), "none");
    let mut v = descriptor(&[(0, 0x1000, 1, 4096)]);
    v[1..3].copy_from_slice(&2000u16.to_be_bytes());
    assert!(RemoteMemory::from_bytes(&v).is_err(), "count too big");
}

#[test]
fn open_without_a_device_for_the_address_names_it() {
    // 192.0.2.1 (TEST-NET-1) is on no RDMA device, here or in the lab.
    let ip: IpAddr = "192.0.2.1".parse().expect("ip");
    match RdmaEndpoint::open(ip, 1) {
        Err(e @ RdmaError::NoDeviceForIp { .. }) => {
            let msg = e.to_string();
            eprintln!("{msg}");
            assert!(msg.contains("192.0.2.1"), "{msg}");
            assert!(msg.contains("--transport tcp"), "{msg}");
        }
        other => panic!("expected NoDeviceForIp, got {other:?}"),
    }
    assert!(matches!(
        RdmaEndpoint::open(ip, 0),
        Err(RdmaError::InvalidArgument(_))
    ));
}

// --------------------------------------------------------------- lab tests

/// Frame `i` of stream `s`: its length.
fn frame_len(s: usize, i: usize) -> usize {
    let mut r = Rng((s as u64 + 1) * 1_000_003 + i as u64);
    r.next();
    if i % 250 == 7 {
        return MAX_RDMA_FRAME;
    }
    if i % 100 == 3 {
        return r.next() as usize % (MAX_RDMA_FRAME + 1);
    }
    match i % 4 {
        0 => r.next() as usize % 65, // 0 included
        1 => r.next() as usize % (4 * KIB + 1),
        2 => r.next() as usize % (64 * KIB + 1),
        _ => 16 + r.next() as usize % (64 * KIB),
    }
}

fn frame_fill(s: usize, i: usize, buf: &mut [u8]) {
    Rng(((s as u64) << 32) ^ (i as u64) ^ 0x5151_5151).fill(buf);
}

#[test]
fn frames_of_varied_sizes_over_two_streams_then_end_of_stream() {
    const N: usize = 1500;
    let Some((mut a, mut b)) = endpoints(2, RdmaOptions::default()) else {
        return;
    };
    let (ca, cb) = connect(&mut a, &mut b);
    assert_eq!((ca.len(), cb.len()), (2, 2));
    let total: usize = (0..2)
        .flat_map(|s| (0..N).map(move |i| frame_len(s, i)))
        .sum();
    let start = Instant::now();
    std::thread::scope(|scope| {
        let mut joins = Vec::new();
        for (s, (ca, cb)) in ca.into_iter().zip(cb).enumerate() {
            let (mut sink, _src_a, _ha) = ca.into_parts();
            let (_sink_b, mut source, _hb) = cb.into_parts();
            joins.push(scope.spawn(move || {
                // Too large: refused before anything is posted.
                let big = vec![0u8; MAX_RDMA_FRAME + 1];
                assert!(matches!(
                    sink.send(&[&big]),
                    Err(TransportError::SendTooLarge { .. })
                ));
                let mut buf = vec![0u8; MAX_RDMA_FRAME];
                for i in 0..N {
                    let n = frame_len(s, i);
                    frame_fill(s, i, &mut buf[..n]);
                    // One, two or three parts.
                    let (x, y) = (n / 3, n / 2);
                    let r = match i % 3 {
                        0 => sink.send(&[&buf[..n]]),
                        1 => sink.send(&[&buf[..x], &buf[x..n]]),
                        _ => sink.send(&[&buf[..x], &buf[x..y], &buf[y..n]]),
                    };
                    r.unwrap_or_else(|e| panic!("stream {s} frame {i}: {e}"));
                }
                sink.flush().expect("flush");
                drop(sink); // end of stream
            }));
            joins.push(scope.spawn(move || {
                let mut got = Vec::new();
                let mut want = vec![0u8; MAX_RDMA_FRAME];
                for i in 0..N {
                    let more = source
                        .recv(&mut got)
                        .unwrap_or_else(|e| panic!("stream {s} frame {i}: {e}"));
                    assert!(more, "stream {s}: end of stream before frame {i}");
                    let n = frame_len(s, i);
                    assert_eq!(got.len(), n, "stream {s} frame {i} length");
                    frame_fill(s, i, &mut want[..n]);
                    assert!(got == want[..n], "stream {s} frame {i} content differs");
                }
                assert!(!source.recv(&mut got).expect("end of stream"), "EOS");
                assert!(!source.recv(&mut got).expect("still EOS"), "EOS again");
            }));
        }
        for j in joins {
            j.join().expect("thread");
        }
    });
    let d = start.elapsed();
    eprintln!(
        "FIGURE rdma channel SEND frames: 2 streams x {N} frames (0 B..{} B), {:.1} MiB in \
         {:.2} s: {:.1} MB/s, {:.0} frames/s",
        MAX_RDMA_FRAME,
        total as f64 / MIB as f64,
        d.as_secs_f64(),
        mb_per_s(total, d),
        (2 * N) as f64 / d.as_secs_f64()
    );
}

/// Guest-like layout: 12 MiB at 0 and 4 MiB at 4 GiB.
const LOW: usize = 12 * MIB;
const HIGH: usize = 4 * MIB;
const HIGH_KEY: u64 = 1 << 32;

fn page_key(p: usize) -> u64 {
    let off = p * PAGE;
    if off < LOW {
        off as u64
    } else {
        HIGH_KEY + (off - LOW) as u64
    }
}

fn read_page<'m>(low: &'m Mapping, high: &'m Mapping, p: usize) -> &'m [u8] {
    let off = p * PAGE;
    if off < LOW {
        low.read(off, PAGE)
    } else {
        high.read(off - LOW, PAGE)
    }
}

#[test]
fn write_pages_places_pages_in_the_peers_memory() {
    let Some((mut a, mut b)) = endpoints(2, RdmaOptions::default()) else {
        return;
    };
    let mut rng = Rng(0x1234_5678);
    let (mut a_low, mut a_high) = (Mapping::new(LOW), Mapping::new(HIGH));
    a_low.fill(&mut rng);
    a_high.fill(&mut rng);
    let (b_low, b_high) = (Mapping::new(LOW), Mapping::new(HIGH));
    // SAFETY: the mappings are declared before the registrations and so
    // outlive them; nothing holds a reference into them while transfers run
    // (reads happen only after the frame that follows the pages arrived).
    let ma = unsafe { a.register_memory(&[a_low.area(0), a_high.area(HIGH_KEY)], Exposure::Local) }
        .expect("reg A");
    // SAFETY: as above.
    let mb = unsafe {
        b.register_memory(
            &[b_high.area(HIGH_KEY), b_low.area(0)],
            Exposure::RemoteWrite,
        )
    }
    .expect("reg B");
    let remote = RemoteMemory::from_bytes(&mb.descriptor()).expect("descriptor");
    let (mut ca, mut cb) = connect(&mut a, &mut b);
    let pages_total = (LOW + HIGH) / PAGE;

    // 1. Random pages (sorted, so runs coalesce) in batches of up to 256,
    //    each batch followed by a frame naming it, over stream 1.
    let mut chosen: Vec<usize> = (0..1500)
        .map(|_| rng.next() as usize % pages_total)
        .collect();
    chosen.sort_unstable();
    chosen.dedup();
    let batches: Vec<&[usize]> = chosen.chunks(256).collect();
    {
        let (ch_a, ch_b) = (&mut ca[1], &mut cb[1]);
        let sink = ch_a.sink.as_rdma().expect("an RDMA sink");
        for (k, batch) in batches.iter().enumerate() {
            let pages: Vec<(u64, usize)> = batch.iter().map(|&p| (page_key(p), PAGE)).collect();
            sink.write_pages(&ma, &remote, &pages).expect("write_pages");
            sink.send(&[&(k as u32).to_le_bytes()]).expect("send");
        }
        let mut buf = Vec::new();
        for (k, batch) in batches.iter().enumerate() {
            assert!(ch_b.source.recv(&mut buf).expect("recv"));
            assert_eq!(buf, (k as u32).to_le_bytes(), "batch frame {k}");
            for &p in *batch {
                assert!(
                    read_page(&b_low, &b_high, p) == read_page(&a_low, &a_high, p),
                    "page {p} (key {:#x}) differs after its batch frame",
                    page_key(p)
                );
            }
        }
        ch_a.sink.flush().expect("flush");
    }
    eprintln!(
        "write_pages: {} random pages in {} batches verified",
        chosen.len(),
        batches.len()
    );

    // 2. Throughput: all 16 MiB as 256-page batches, in address order
    //    (coalesced into 1 MiB WRITEs) on stream 0, then in shuffled order
    //    (one 4 KiB WRITE each) on stream 1; each batch followed by a frame.
    let mut order: Vec<usize> = (0..pages_total).collect();
    let mut figures = Vec::new();
    for (label, stream, shuffle) in [("in order", 0, false), ("shuffled", 1, true)] {
        if shuffle {
            for i in (1..order.len()).rev() {
                order.swap(i, rng.next() as usize % (i + 1));
            }
        }
        let start = Instant::now();
        let (ch_a, ch_b) = (&mut ca[stream], &mut cb[stream]);
        std::thread::scope(|s| {
            let source = &mut ch_b.source;
            let n = order.len().div_ceil(256);
            let r = s.spawn(move || {
                let mut buf = Vec::new();
                for _ in 0..n {
                    assert!(source.recv(&mut buf).expect("recv"));
                }
            });
            let sink = ch_a.sink.as_rdma().expect("an RDMA sink");
            for batch in order.chunks(256) {
                let pages: Vec<(u64, usize)> = batch.iter().map(|&p| (page_key(p), PAGE)).collect();
                sink.write_pages(&ma, &remote, &pages).expect("write_pages");
                sink.send(&[b"batch"]).expect("send");
            }
            sink.flush().expect("flush");
            r.join().expect("receiver");
        });
        figures.push(format!(
            "{label} {:.1} MB/s",
            mb_per_s(LOW + HIGH, start.elapsed())
        ));
    }
    assert!(b_low.read(0, LOW) == a_low.read(0, LOW), "low area differs");
    assert!(
        b_high.read(0, HIGH) == a_high.read(0, HIGH),
        "high area differs"
    );
    eprintln!(
        "FIGURE rdma write_pages: 16 MiB as 256-page batches + a frame each: {}",
        figures.join(", ")
    );
    drop(ca);
    drop(cb);
    drop(ma);
    drop(mb);
}

#[test]
fn the_sources_memory_refuses_the_peers_writes() {
    let Some((mut a, mut b)) = endpoints(1, small()) else {
        return;
    };
    let a_mem = Mapping::new(MIB);
    let mut b_mem = Mapping::new(MIB);
    b_mem.fill(&mut Rng(7));
    // SAFETY: the mappings outlive the registrations (declared before them).
    let ma = unsafe { a.register_memory(&[a_mem.area(0)], Exposure::Local) }.expect("reg A");
    // SAFETY: as above.
    let mb = unsafe { b.register_memory(&[b_mem.area(0)], Exposure::RemoteWrite) }.expect("reg B");
    // Even a peer that learned the source's keys (the source never sends them) cannot write.
    let a_keys = RemoteMemory::from_bytes(&ma.descriptor()).expect("descriptor");
    let (ca, mut cb) = connect(&mut a, &mut b);
    let sink = cb[0].sink.as_rdma().expect("an RDMA sink");
    let e = sink
        .write_pages(&mb, &a_keys, &[(0, PAGE)])
        .and_then(|()| sink.flush())
        .expect_err("a WRITE into memory registered as Exposure::Local must fail");
    eprintln!("refused: {e}");
    assert!(
        matches!(&e, TransportError::Rdma { broken: true, detail, .. } if detail.contains("access")),
        "{e:?}"
    );
    assert!(
        a_mem.read(0, PAGE).iter().all(|&x| x == 0),
        "the source's page was written"
    );
    drop(ca);
    drop(cb);
    drop(ma);
    drop(mb);
}

#[test]
fn write_pages_outside_the_areas_is_refused_before_posting() {
    let Some((mut a, mut b)) = endpoints(1, small()) else {
        return;
    };
    let mut a_mem = Mapping::new(2 * MIB);
    a_mem.fill(&mut Rng(99));
    let b_mem = Mapping::new(MIB);
    // SAFETY: the mappings outlive the registrations (declared before them).
    let ma = unsafe { a.register_memory(&[a_mem.area(0)], Exposure::Local) }.expect("reg A");
    // SAFETY: as above.
    let mb = unsafe { b.register_memory(&[b_mem.area(0)], Exposure::RemoteWrite) }.expect("reg B");
    let remote = RemoteMemory::from_bytes(&mb.descriptor()).expect("descriptor");
    let (mut ca, mut cb) = connect(&mut a, &mut b);
    let (ch_a, ch_b) = (&mut ca[0], &mut cb[0]);
    let sink = ch_a.sink.as_rdma().expect("an RDMA sink");
    let cases: [&[(u64, usize)]; 4] = [
        &[(0, PAGE), (MIB as u64, PAGE)],          // beyond B's area
        &[(0, PAGE), ((MIB - 2048) as u64, PAGE)], // straddles its end
        &[(0, PAGE), (8 * MIB as u64, PAGE)],      // beyond A's area
        &[(0, PAGE), (u64::MAX - 100, PAGE)],      // wraps
    ];
    for pages in cases {
        let e = sink
            .write_pages(&ma, &remote, pages)
            .expect_err("must be refused");
        eprintln!("refused: {e}");
        assert!(
            matches!(e, TransportError::Rdma { broken: false, .. }),
            "{e:?}"
        );
    }
    // Nothing was posted: the channel works, and page 0 (first in every
    // refused list) was not written, though a frame sent after it arrived.
    sink.send(&[b"after"]).expect("send");
    let mut buf = Vec::new();
    assert!(ch_b.source.recv(&mut buf).expect("recv"));
    assert_eq!(buf, b"after");
    assert!(
        b_mem.read(0, PAGE).iter().all(|&x| x == 0),
        "page 0 written"
    );
    // A valid write still works.
    sink.write_pages(&ma, &remote, &[(0, PAGE), ((MIB - PAGE) as u64, PAGE)])
        .expect("valid write");
    sink.send(&[b"done"]).expect("send");
    assert!(ch_b.source.recv(&mut buf).expect("recv"));
    assert!(b_mem.read(0, PAGE) == a_mem.read(0, PAGE));
    assert!(b_mem.read(MIB - PAGE, PAGE) == a_mem.read(MIB - PAGE, PAGE));

    // Read timeout: an idle channel times out and stays usable.
    ch_b.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let t = Instant::now();
    match ch_b.source.recv(&mut buf) {
        Err(TransportError::ReadTimeout {
            mid_frame: false, ..
        }) => {}
        other => panic!("expected a read timeout, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    ch_b.set_read_timeout(None).expect("timeout");

    // Shutdown on A: B's reader sees end of stream, A's own reader too,
    // and A's sink refuses to send.
    ch_a.shutdown().expect("shutdown");
    assert!(!ch_b.source.recv(&mut buf).expect("EOS at B"));
    assert!(!ch_a.source.recv(&mut buf).expect("EOS at A"));
    assert!(ch_a.sink.send(&[b"late"]).is_err());
    drop(ca);
    drop(cb);
    drop(ma);
    drop(mb);
}

#[test]
fn peer_death_fails_the_sender_in_bounded_time() {
    let Some((mut a, mut b)) = endpoints(1, small()) else {
        return;
    };
    let a_mem = Mapping::new(MIB);
    let b_mem = Mapping::new(MIB);
    // SAFETY: the mappings outlive the registrations (declared before them).
    let ma = unsafe { a.register_memory(&[a_mem.area(0)], Exposure::Local) }.expect("reg A");
    // SAFETY: as above.
    let mb = unsafe { b.register_memory(&[b_mem.area(0)], Exposure::RemoteWrite) }.expect("reg B");
    let remote = RemoteMemory::from_bytes(&mb.descriptor()).expect("descriptor");
    let (mut ca, mut cb) = connect(&mut a, &mut b);
    let mut buf = Vec::new();
    ca[0].sink.send(&[b"hello"]).expect("send");
    assert!(cb[0].source.recv(&mut buf).expect("recv"));

    // B dies: its channels (QPs), memory and endpoint go away.
    drop(cb);
    drop(mb);
    drop(b);
    let start = Instant::now();
    let bound = Duration::from_secs(30);
    let frame = vec![7u8; 64 * KIB];
    let err = loop {
        let r = ca[0].sink.send(&[&frame]).and_then(|()| ca[0].sink.flush());
        if let Err(e) = r {
            break e;
        }
        assert!(start.elapsed() < bound, "no failure after {bound:?}");
    };
    let took = start.elapsed();
    eprintln!("FIGURE rdma channel: peer death detected by the sender after {took:?}: {err}");
    assert!(
        matches!(err, TransportError::Rdma { broken: true, .. }),
        "{err:?}"
    );
    // Everything fails from now on, quickly.
    let t = Instant::now();
    let sink = ca[0].sink.as_rdma().expect("an RDMA sink");
    assert!(sink.write_pages(&ma, &remote, &[(0, PAGE)]).is_err());
    assert!(ca[0].sink.send(&[b"x"]).is_err());
    // A's reader: B's sink sent end of stream as it was dropped, or the
    // flushed receives report the failure; either way no hang.
    ca[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let r = ca[0].source.recv(&mut buf);
    eprintln!("A's reader after the peer died: {r:?}");
    assert!(!matches!(r, Ok(true)));
    assert!(t.elapsed() < Duration::from_secs(10));
    drop(ca);
    drop(ma);
}
