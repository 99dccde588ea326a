//! Tests of the verbs layer. Without an RDMA device (this host's kernel has
//! none) the device tests print `SKIPPED: no RDMA device` and pass; in the
//! soft-RoCE lab (`ci/rdmalab/run.sh`) they use rxe0 for one side and rxe1
//! for the other, both in this one process.

use super::test_support::{mb_per_s, Mapping, Rng};
use std::time::{Duration, Instant};

use super::*;

/// Bound on every wait: generous, soft-RoCE under TCG is slow.
const T: Duration = Duration::from_secs(60);
const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// The two devices to use, or None (after printing SKIPPED) without any.
fn devices() -> Option<(String, String)> {
    let list = match Device::list() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED: no RDMA device ({e})");
            return None;
        }
    };
    if list.is_empty() {
        eprintln!("SKIPPED: no RDMA device");
        return None;
    }
    let has = |n: &str| list.iter().any(|d| d == n);
    let pick = if has("rxe0") && has("rxe1") {
        ("rxe0".to_owned(), "rxe1".to_owned())
    } else if list.len() >= 2 {
        (list[0].clone(), list[1].clone())
    } else {
        (list[0].clone(), list[0].clone())
    };
    // Registration pins memory; as root this lifts the limit.
    let _ = raise_memlock_limit();
    Some(pick)
}

/// One side: a context, a PD, and separate send and receive CQs.
struct Side {
    pd: ProtectionDomain,
    scq: CompletionQueue,
    rcq: CompletionQueue,
}

impl Side {
    fn open(name: &str) -> Side {
        let ctx = Context::open(name).expect("open device");
        let pd = ctx.alloc_pd().expect("alloc pd");
        let scq = ctx.create_cq(256).expect("send cq");
        let rcq = ctx.create_cq(256).expect("recv cq");
        Side { pd, scq, rcq }
    }

    fn qp(&self, cfg: &QpConfig) -> QueuePair {
        QueuePair::new_rc(&self.pd, &self.scq, &self.rcq, cfg).expect("create qp")
    }
}

/// Two QPs, one per side, connected to each other through their encoded
/// `local_info()` (as they would be over TCP).
fn connected(a: &Side, b: &Side, cfg: &QpConfig) -> (QueuePair, QueuePair) {
    let qa = a.qp(cfg);
    let qb = b.qp(cfg);
    let ia = QpInfo::from_bytes(&qa.local_info().to_bytes()).expect("decode a");
    let ib = QpInfo::from_bytes(&qb.local_info().to_bytes()).expect("decode b");
    qa.connect(&ib).expect("connect a");
    qb.connect(&ia).expect("connect b");
    assert_eq!(qa.state().expect("state"), QpState::Rts);
    assert_eq!(qb.state().expect("state"), QpState::Rts);
    (qa, qb)
}

fn two_sides() -> Option<(Side, Side)> {
    let (a, b) = devices()?;
    Some((Side::open(&a), Side::open(&b)))
}

// ---------------------------------------------------------------- host tests

#[test]
fn qp_info_round_trips_and_rejects_garbage() {
    let info = QpInfo {
        qp_num: 0x11,
        psn: 0xabcdef,
        gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 99, 0, 1],
        mtu: Mtu::B4096,
    };
    assert_eq!(QpInfo::from_bytes(&info.to_bytes()).expect("decode"), info);
    assert!(QpInfo::from_bytes(&[0; 5]).is_err());
    let mut bad = info.to_bytes();
    bad[25] = 1; // MTU 4097
    assert!(QpInfo::from_bytes(&bad).is_err());
    let mut bad = info.to_bytes();
    bad[0] = 0xff; // qp_num beyond 24 bits
    assert!(QpInfo::from_bytes(&bad).is_err());
    assert_eq!(
        device::Gid(info.gid).ipv4(),
        Some(std::net::Ipv4Addr::new(10, 99, 0, 1))
    );
}

#[test]
fn remote_region_round_trips_and_checks_bounds() {
    let r = RemoteRegion {
        addr: 0x7f00_0000_1000,
        rkey: 0x1234,
        len: 8192,
    };
    assert_eq!(RemoteRegion::from_bytes(&r.to_bytes()).expect("decode"), r);
    assert_eq!(r.at(4096, 4096).expect("in bounds"), 0x7f00_0000_2000);
    assert!(matches!(
        r.at(4097, 4096),
        Err(RdmaError::OutOfBounds { .. })
    ));
    assert!(r.at(u64::MAX, 2).is_err());
}

#[test]
fn errors_tell_the_operator_what_to_do() {
    let msg = RdmaError::NoDevice.to_string();
    assert!(
        msg.contains("rdma link add rxe0 type rxe netdev eth0"),
        "{msg}"
    );
    assert!(msg.contains("--transport tcp"), "{msg}");
    let e = RdmaError::Completion {
        status: WcStatus::REM_ACCESS_ERR,
        opcode: WcOpcode::RdmaWrite,
        wr_id: 7,
        vendor_err: 0,
    };
    let msg = e.to_string();
    // The status string comes from libibverbs' ibv_wc_status_str.
    assert!(msg.contains("remote access error"), "{msg}");
    assert!(msg.contains("rkey"), "{msg}");
    assert!(!e.is_peer_failure());
    let e = RdmaError::Completion {
        status: WcStatus::RETRY_EXC_ERR,
        opcode: WcOpcode::Send,
        wr_id: 1,
        vendor_err: 0,
    };
    assert!(e.is_peer_failure());
    assert!(
        e.to_string().contains("transport retry counter exceeded"),
        "{e}"
    );
}

#[test]
fn device_list_works_without_rdma() {
    // On a host without RDMA this must be an empty list, not an error.
    let list = Device::list().expect("device list");
    eprintln!("RDMA devices: {list:?}");
    if list.is_empty() {
        assert!(matches!(Context::open("rxe0"), Err(RdmaError::NoDevice)));
    } else {
        assert!(matches!(
            Context::open("no-such-device"),
            Err(RdmaError::DeviceNotFound { .. })
        ));
    }
    let (soft, hard) = memlock_limit();
    eprintln!(
        "RLIMIT_MEMLOCK soft {} hard {}",
        MemlockDisplay(soft),
        MemlockDisplay(hard)
    );
}

// --------------------------------------------------------------- lab tests

#[test]
fn ports_and_gids() {
    let Some((a, b)) = devices() else { return };
    for name in [a, b] {
        let ctx = Context::open(&name).expect("open");
        let port = ctx.query_port(1).expect("query port");
        let gid = ctx.query_gid(1, 1).expect("query gid");
        eprintln!(
            "{name}: port 1 {} active MTU {} max MTU {} link layer {} GID[1] {gid} ({:?})",
            port.state_str,
            port.active_mtu.bytes(),
            port.max_mtu.bytes(),
            port.link_layer,
            gid.ipv4()
        );
        assert!(port.is_active(), "{name} port 1 is {}", port.state_str);
        assert!(
            gid.ipv4().is_some(),
            "GID index 1 of {name} is not IPv4-mapped: {gid}"
        );
    }
}

#[test]
fn bounds_and_sge_limits_are_checked() {
    let Some((a, b)) = two_sides() else { return };
    let mr = a.pd.alloc_mr(64 * KIB, Access::LOCAL_WRITE).expect("mr");
    assert!(mr.sge(0, 64 * KIB).is_ok());
    assert!(matches!(
        mr.sge(64 * KIB - 1, 2),
        Err(RdmaError::OutOfBounds { .. })
    ));
    assert!(mr.sge(usize::MAX, 2).is_err());
    let (qa, _qb) = connected(&a, &b, &QpConfig::default());
    let s = mr.sge(0, 1).expect("sge");
    let many = vec![s; qa.caps().max_send_sge as usize + 1];
    let r = qa.post_send(&SendRequest {
        wr_id: 1,
        op: SendOp::Send,
        sges: &many,
        signaled: true,
    });
    assert!(matches!(r, Err(RdmaError::InvalidArgument(_))), "{r:?}");
    assert!(matches!(
        a.pd.alloc_mr(0, Access::LOCAL_WRITE),
        Err(RdmaError::InvalidArgument(_))
    ));
}

/// Writes `len` bytes from `src` (at `offset`) to the same offset of the
/// remote region in `chunk`-sized RDMA WRITEs, each split into two SGEs,
/// signalling every 8th with at most 32 in flight.
fn write_range(
    qp: &QueuePair,
    src: &MemoryRegion,
    dst: RemoteRegion,
    offset: usize,
    len: usize,
    chunk: usize,
) -> Duration {
    let window = (qp.caps().max_send_wr as usize).min(32);
    let mut win = SendWindow::new(8, window, T);
    let start = Instant::now();
    let mut off = offset;
    let end = offset + len;
    let mut id = 0u64;
    while off < end {
        let n = chunk.min(end - off);
        let half = n / 2;
        let sges = [
            src.sge(off, half).expect("sge"),
            src.sge(off + half, n - half).expect("sge"),
        ];
        let remote_addr = dst.at(off as u64, n as u64).expect("remote range");
        let last = off + n >= end;
        let make = |signaled| SendRequest {
            wr_id: id,
            op: SendOp::Write {
                remote_addr,
                rkey: dst.rkey,
            },
            sges: &sges,
            signaled,
        };
        if last {
            win.post_last(qp, make).expect("post write");
        } else {
            win.post(qp, make).expect("post write");
        }
        id += 1;
        off += n;
    }
    win.drain(qp).expect("write completions");
    start.elapsed()
}

#[test]
fn rdma_write_large_region_verified() {
    let Some((a, b)) = two_sides() else { return };
    let (qa, _qb) = connected(&a, &b, &QpConfig::default());
    const LEN: usize = 32 * MIB;

    let mut src = a.pd.alloc_mr(LEN, Access::LOCAL_READ).expect("src mr");
    Rng(0x9e37_79b9_7f4a_7c15).fill(src.as_mut_slice().expect("owned"));

    // The destination is "guest RAM": existing memory registered raw.
    let guest = Mapping::new(LEN);
    // SAFETY: `guest` is a LEN-byte read/write mapping declared before the
    // region, so it stays mapped until the region is dropped; nothing in this
    // test holds a reference into it while the device writes.
    let dst = unsafe { b.pd.register_raw(guest.ptr, LEN, Access::REMOTE_WRITE) }.expect("dst mr");
    assert!(!dst.is_owned());

    let d64k = write_range(&qa, &src, dst.remote(), 0, LEN / 2, 64 * KIB);
    let d1m = write_range(&qa, &src, dst.remote(), LEN / 2, LEN / 2, MIB);
    eprintln!(
        "FIGURE rdma write: {} MiB in 64 KiB chunks {:.1} MB/s; {} MiB in 1 MiB chunks {:.1} MB/s \
         ({} -> {}, signal every 8th, <= 32 in flight)",
        LEN / 2 / MIB,
        mb_per_s(LEN / 2, d64k),
        LEN / 2 / MIB,
        mb_per_s(LEN / 2, d1m),
        a.pd.context().name(),
        b.pd.context().name(),
    );
    let got = guest.to_vec();
    let want = src.as_slice().expect("owned");
    if let Some(i) = got.iter().zip(want).position(|(x, y)| x != y) {
        panic!("destination differs from source at byte {i} of {LEN}");
    }
    drop(dst);
}

#[test]
fn send_recv_many_messages_of_varied_sizes() {
    let Some((a, b)) = two_sides() else { return };
    let (qa, qb) = connected(&a, &b, &QpConfig::default());
    const SLOTS: usize = 64;
    const SLOT: usize = 64 * KIB;
    const HDR: usize = 16;
    const N: usize = 500;

    // Message i: size, optional immediate, content from Rng(i).
    let size_of = |i: usize| {
        let mut r = Rng(i as u64 * 7919 + 1);
        match i % 4 {
            0 => 1 + (r.next() as usize % 64),
            1 => 1 + (r.next() as usize % (4 * KIB)),
            _ => HDR + (r.next() as usize % (SLOT - HDR)),
        }
    };
    let imm_of = |i: usize| (i % 3 == 0).then_some(0xabc0_0000 | i as u32);
    let content = |i: usize, buf: &mut [u8]| Rng(i as u64 + 0x5151).fill(buf);

    let rbuf =
        b.pd.alloc_mr(SLOTS * SLOT, Access::LOCAL_WRITE)
            .expect("recv mr");
    let mut sbuf =
        a.pd.alloc_mr(SLOTS * SLOT, Access::LOCAL_READ)
            .expect("send mr");
    for s in 0..SLOTS.min(qb.caps().max_recv_wr as usize) {
        qb.post_recv(s as u64, &[rbuf.sge(s * SLOT, SLOT).expect("sge")])
            .expect("post recv");
    }
    let posted = SLOTS.min(qb.caps().max_recv_wr as usize);
    assert_eq!(posted, SLOTS, "receive queue smaller than {SLOTS}");

    let start = Instant::now();
    let total: usize = (0..N).map(size_of).sum();
    std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut expect = vec![0u8; SLOT];
            let deadline = Instant::now() + T;
            for i in 0..N {
                let left = deadline.saturating_duration_since(Instant::now());
                let wc = qb.recv_cq().wait(1, left, "a receive").expect("receive")[0].clone();
                assert_eq!(wc.opcode, WcOpcode::Recv);
                let slot = wc.wr_id as usize;
                let n = size_of(i);
                assert_eq!(wc.byte_len as usize, n, "message {i} length");
                assert_eq!(wc.imm, imm_of(i), "message {i} immediate");
                content(i, &mut expect[..n]);
                let got = &rbuf.as_slice().expect("owned")[slot * SLOT..slot * SLOT + n];
                assert!(got == &expect[..n], "message {i} content differs");
                qb.post_recv(slot as u64, &[rbuf.sge(slot * SLOT, SLOT).expect("sge")])
                    .expect("repost recv");
            }
        });

        // The sender reuses slot i % SLOTS; with at most 32 sends in flight
        // a slot is never rewritten while its earlier send is pending.
        let mut win = SendWindow::new(8, 32, T);
        for i in 0..N {
            let n = size_of(i);
            let slot = i % SLOTS;
            content(
                i,
                &mut sbuf.as_mut_slice().expect("owned")[slot * SLOT..slot * SLOT + n],
            );
            // Bigger messages go as a header SGE plus a payload SGE.
            let split = if n > HDR { HDR } else { n };
            let sg2;
            let sg1;
            let sges: &[Sge<'_>] = if split < n {
                sg2 = [
                    sbuf.sge(slot * SLOT, split).expect("sge"),
                    sbuf.sge(slot * SLOT + split, n - split).expect("sge"),
                ];
                &sg2
            } else {
                sg1 = [sbuf.sge(slot * SLOT, n).expect("sge")];
                &sg1
            };
            let op = match imm_of(i) {
                Some(imm) => SendOp::SendWithImm(imm),
                None => SendOp::Send,
            };
            let make = |signaled| SendRequest {
                wr_id: i as u64,
                op,
                sges,
                signaled,
            };
            if i + 1 == N {
                win.post_last(&qa, make).expect("post send");
            } else {
                win.post(&qa, make).expect("post send");
            }
        }
        win.drain(&qa).expect("send completions");
        receiver.join().expect("receiver thread");
    });
    let d = start.elapsed();
    eprintln!(
        "FIGURE send/recv: {N} messages, {:.1} MiB in {:.2} s: {:.1} MB/s, {:.0} messages/s",
        total as f64 / MIB as f64,
        d.as_secs_f64(),
        mb_per_s(total, d),
        N as f64 / d.as_secs_f64()
    );
}

#[test]
fn rdma_write_with_imm_reaches_the_receiver() {
    let Some((a, b)) = two_sides() else { return };
    let (qa, qb) = connected(&a, &b, &QpConfig::default());
    const LEN: usize = MIB;
    let mut src = a.pd.alloc_mr(LEN, Access::LOCAL_READ).expect("src");
    Rng(42).fill(src.as_mut_slice().expect("owned"));
    let dst = b.pd.alloc_mr(LEN, Access::REMOTE_WRITE).expect("dst");
    // A WRITE with immediate consumes a receive; it needs no buffer.
    qb.post_recv(77, &[]).expect("post recv");
    let imm = 0xc0ff_ee01;
    qa.post_send(&SendRequest {
        wr_id: 5,
        op: SendOp::WriteWithImm {
            remote_addr: dst.addr(),
            rkey: dst.rkey(),
            imm,
        },
        sges: &[src.sge(0, LEN).expect("sge")],
        signaled: true,
    })
    .expect("post");
    let wc = qb.recv_cq().wait(1, T, "the immediate").expect("recv")[0].clone();
    assert_eq!(wc.wr_id, 77);
    assert_eq!(wc.opcode, WcOpcode::RecvRdmaWithImm);
    assert_eq!(wc.imm, Some(imm));
    assert_eq!(wc.byte_len as usize, LEN);
    let wc = qa.send_cq().wait(1, T, "the write").expect("send")[0].clone();
    assert_eq!((wc.wr_id, wc.opcode), (5, WcOpcode::RdmaWrite));
    assert!(dst.as_slice() == src.as_slice(), "written data differs");
}

#[test]
fn wrong_rkey_is_a_completion_error_and_breaks_the_qp() {
    let Some((a, b)) = two_sides() else { return };
    let (qa, _qb) = connected(&a, &b, &QpConfig::default());
    let src = a.pd.alloc_mr(4 * KIB, Access::LOCAL_READ).expect("src");
    let dst = b.pd.alloc_mr(4 * KIB, Access::REMOTE_WRITE).expect("dst");
    let sges = [src.sge(0, 4 * KIB).expect("sge")];
    qa.post_send(&SendRequest {
        wr_id: 9,
        op: SendOp::Write {
            remote_addr: dst.addr(),
            rkey: dst.rkey() ^ 0x00ff_ff00,
        },
        sges: &sges,
        signaled: true,
    })
    .expect("post");
    let err = qa
        .send_cq()
        .wait(1, T, "the bad write")
        .expect_err("must fail");
    eprintln!("wrong rkey: {err}");
    match &err {
        RdmaError::Completion { status, wr_id, .. } => {
            assert_eq!(*status, WcStatus::REM_ACCESS_ERR);
            assert_eq!(*wr_id, 9);
        }
        other => panic!("expected a completion error, got {other:?}"),
    }
    // The QP goes to ERROR (the provider may take a moment after the CQE).
    let deadline = Instant::now() + Duration::from_secs(10);
    let state = loop {
        let s = qa.state().expect("state");
        if s == QpState::Error || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(state, QpState::Error);
    assert!(matches!(
        qa.check_ready("send"),
        Err(RdmaError::QpState {
            state: QpState::Error,
            ..
        })
    ));
    // Anything posted now fails: refused, or flushed with an error.
    let r = qa.post_send(&SendRequest {
        wr_id: 10,
        op: SendOp::Write {
            remote_addr: dst.addr(),
            rkey: dst.rkey(),
        },
        sges: &sges,
        signaled: true,
    });
    match r {
        Err(e) => eprintln!("post on the failed QP: {e}"),
        Ok(()) => {
            let e = qa
                .send_cq()
                .wait(1, T, "the flushed write")
                .expect_err("must fail");
            eprintln!("post on the failed QP completes with: {e}");
            assert!(matches!(
                e,
                RdmaError::Completion {
                    status: WcStatus::WR_FLUSH_ERR,
                    ..
                }
            ));
        }
    }
    // A new QP pair on the same devices works.
    let (qa2, _qb2) = connected(&a, &b, &QpConfig::default());
    let mut src2 = a.pd.alloc_mr(4 * KIB, Access::LOCAL_READ).expect("src");
    src2.as_mut_slice().expect("owned").fill(0x5a);
    qa2.post_send(&SendRequest {
        wr_id: 11,
        op: SendOp::Write {
            remote_addr: dst.addr(),
            rkey: dst.rkey(),
        },
        sges: &[src2.sge(0, 4 * KIB).expect("sge")],
        signaled: true,
    })
    .expect("post");
    qa2.send_cq()
        .wait(1, T, "the good write")
        .expect("write on a new QP");
    assert!(dst.as_slice().expect("owned").iter().all(|&x| x == 0x5a));
}

#[test]
fn peer_death_fails_a_send_in_bounded_time() {
    let Some((a, b)) = two_sides() else { return };
    let cfg = QpConfig::default();
    let (qa, qb) = connected(&a, &b, &cfg);
    let src = a.pd.alloc_mr(4 * KIB, Access::LOCAL_READ).expect("src");
    let dst = b.pd.alloc_mr(4 * KIB, Access::REMOTE_WRITE).expect("dst");
    let write = |id| SendRequest {
        wr_id: id,
        op: SendOp::Write {
            remote_addr: dst.addr(),
            rkey: dst.rkey(),
        },
        sges: &[],
        signaled: true,
    };
    let sges = [src.sge(0, 4 * KIB).expect("sge")];
    qa.post_send(&SendRequest {
        sges: &sges,
        ..write(1)
    })
    .expect("post");
    qa.send_cq()
        .wait(1, T, "a write to a live peer")
        .expect("live peer");

    drop(qb); // the peer's QP is destroyed: nothing answers any more
    let start = Instant::now();
    qa.post_send(&SendRequest {
        sges: &sges,
        ..write(2)
    })
    .expect("post");
    // retry_cnt 6, timeout 14: about 0.5 s nominally; bounded by 30 s.
    let bound = Duration::from_secs(30);
    let err = qa
        .send_cq()
        .wait(1, bound, "a write to a dead peer")
        .expect_err("must fail");
    let took = start.elapsed();
    eprintln!("FIGURE peer death detected after {took:?}: {err}");
    assert!(err.is_peer_failure(), "{err:?}");
    assert!(took < bound + Duration::from_secs(1));
    assert!(matches!(
        err,
        RdmaError::Completion {
            status: WcStatus::RETRY_EXC_ERR,
            ..
        }
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while qa.state().expect("state") != QpState::Error && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(qa.state().expect("state"), QpState::Error);
}

#[test]
fn registration_cost() {
    let Some((a, _b)) = devices() else { return };
    let ctx = Context::open(&a).expect("open");
    let pd = ctx.alloc_pd().expect("pd");
    const LEN: usize = 64 * MIB;
    let per_gib = |d: Duration| d.as_secs_f64() * (1 << 30) as f64 / LEN as f64;

    // Fresh memory: registration also faults every page in.
    let t = Instant::now();
    let mr = pd.alloc_mr(LEN, Access::REMOTE_WRITE).expect("alloc_mr");
    let fresh = t.elapsed();
    let t = Instant::now();
    drop(mr);
    let dereg_fresh = t.elapsed();

    // Memory already touched (like populated guest RAM), with transparent
    // huge pages allowed and then with 4 KiB pages only.
    let mut populated = Vec::new();
    for huge in [true, false] {
        let guest = Mapping::with_pages(LEN, huge);
        let t = Instant::now();
        // SAFETY: `guest` is a LEN-byte mapping that outlives the region
        // (declared before it, dropped after it).
        let mr =
            unsafe { pd.register_raw(guest.ptr, LEN, Access::REMOTE_WRITE) }.expect("register");
        let reg = t.elapsed();
        let t = Instant::now();
        drop(mr);
        populated.push((reg, t.elapsed()));
    }
    eprintln!(
        "FIGURE registration of {} MiB, seconds per GiB: fresh allocation {:.3} (dereg {:.3}); \
         populated with THP {:.3} (dereg {:.3}); populated 4 KiB pages {:.3} (dereg {:.3}); \
         RLIMIT_MEMLOCK {}",
        LEN / MIB,
        per_gib(fresh),
        per_gib(dereg_fresh),
        per_gib(populated[0].0),
        per_gib(populated[0].1),
        per_gib(populated[1].0),
        per_gib(populated[1].1),
        MemlockDisplay(memlock_limit().0),
    );
}

#[test]
fn children_keep_their_parents_alive_and_chains_post() {
    let Some((a, b)) = devices() else { return };
    // Build everything, then drop every parent handle: the QP and the MRs
    // must keep their PD, CQs and context alive.
    let (qa, src) = {
        let ctx = Context::open(&a).expect("open");
        let pd = ctx.alloc_pd().expect("pd");
        let cq = ctx.create_cq(64).expect("cq");
        let qp = QueuePair::new_rc(&pd, &cq, &cq, &QpConfig::default()).expect("qp");
        let mut src = pd.alloc_mr(64 * KIB, Access::LOCAL_READ).expect("src");
        Rng(7).fill(src.as_mut_slice().expect("owned"));
        (qp, src)
    };
    let (qb, dst) = {
        let ctx = Context::open(&b).expect("open");
        let pd = ctx.alloc_pd().expect("pd");
        let cq = ctx.create_cq(64).expect("cq");
        let qp = QueuePair::new_rc(&pd, &cq, &cq, &QpConfig::default()).expect("qp");
        // An owned Vec registered as is.
        let dst = pd
            .register_vec(vec![0u8; 64 * KIB], Access::REMOTE_WRITE)
            .expect("dst");
        (qp, dst)
    };
    qa.connect(&qb.local_info()).expect("connect a");
    qb.connect(&qa.local_info()).expect("connect b");

    // Sixteen 4 KiB WRITEs in one ibv_post_send chain, only the last signalled.
    let sges: Vec<[Sge<'_>; 1]> = (0..16)
        .map(|i| [src.sge(i * 4 * KIB, 4 * KIB).expect("sge")])
        .collect();
    let remote = dst.remote();
    let wrs: Vec<SendRequest<'_>> = sges
        .iter()
        .enumerate()
        .map(|(i, sg)| SendRequest {
            wr_id: i as u64,
            op: SendOp::Write {
                remote_addr: remote.at((i * 4 * KIB) as u64, 4096).expect("range"),
                rkey: remote.rkey,
            },
            sges: sg,
            signaled: i == 15,
        })
        .collect();
    qa.post_send_list(&wrs).expect("post chain");
    let wc = qa.send_cq().wait(1, T, "the chain").expect("chain")[0].clone();
    assert_eq!(wc.wr_id, 15);
    assert!(dst.as_slice() == src.as_slice(), "chained writes differ");
    // Children dropped last-handle-first: QP, then MRs; their parents follow.
    drop(qa);
    drop(qb);
    drop(src);
    drop(dst);
}
