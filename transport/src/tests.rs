//! Tests over real sockets on 127.0.0.1. Every test runs under a deadline
//! and every blocking socket has a timeout, so none can hang.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::num::NonZeroUsize;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::preamble::{decode_ack, Preamble, Role, ACK_LEN};
use crate::tcp::tcp_channel;
use crate::*;

const DEADLINE: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `f` on a thread and fails the test if it does not end in time.
pub(crate) fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test exceeded {DEADLINE:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => panic!("test thread ended without a result"),
        },
    }
}

fn listen() -> (Box<dyn TransportListener>, String) {
    let l = TcpTransport.listen("127.0.0.1:0").expect("listen");
    let addr = l.local_addr().to_string();
    (l, addr)
}

/// Connects `streams` data streams; returns (sender side, receiver side).
pub(crate) fn pair(streams: usize) -> (Connection, Connection) {
    let (mut l, addr) = listen();
    let n = NonZeroUsize::new(streams).expect("non-zero");
    let client = thread::spawn(move || {
        TcpTransport
            .connect(&addr, n, &ConnectOptions::default())
            .expect("connect")
    });
    let server = l.accept(IO_TIMEOUT).expect("accept");
    let client = client.join().expect("client thread");
    for ch in std::iter::once(&server.control)
        .chain(&server.data)
        .chain(std::iter::once(&client.control))
        .chain(&client.data)
    {
        ch.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    }
    (client, server)
}

/// A raw socket pair wrapped as channels, for feeding hand-made bytes.
fn raw_pair() -> (TcpStream, Channel) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, peer) = l.accept().expect("accept");
    let ch = tcp_channel(b, peer.to_string()).expect("channel");
    ch.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    (a, ch)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn frames_of_many_sizes_round_trip_then_clean_eof() {
    bounded(|| {
        let (client, server) = pair(1);
        let sizes = [
            0,
            1,
            3,
            4,
            5,
            4095,
            4096,
            4097,
            65536,
            1 << 20,
            MAX_FRAME_LEN - 1,
            MAX_FRAME_LEN,
        ];
        let Connection { data, .. } = client;
        let sender = thread::spawn(move || {
            let mut sink = data.into_iter().next().expect("stream").sink;
            for (i, &n) in sizes.iter().enumerate() {
                sink.send(&[&pattern(i as u64, n)]).expect("send");
            }
            sink.flush().expect("flush");
            // Dropping the last handles closes the socket: clean EOF.
        });
        let mut ch = server.data.into_iter().next().expect("stream");
        let mut buf = vec![0xAA; 7];
        for (i, &n) in sizes.iter().enumerate() {
            assert!(ch.source.recv(&mut buf).expect("recv"), "frame {i}");
            assert_eq!(buf.len(), n);
            assert!(
                buf == pattern(i as u64, n),
                "frame {i} of {n} bytes differs"
            );
        }
        sender.join().expect("sender");
        drop(client.control);
        assert!(!ch.source.recv(&mut buf).expect("eof"));
        assert!(!ch.source.recv(&mut buf).expect("eof again"));
    });
}

#[test]
fn vectored_parts_arrive_concatenated() {
    bounded(|| {
        let (client, server) = pair(1);
        let big = pattern(1, 3 << 20);
        // Cases: empty parts, one byte parts, more parts than IOV_MAX (1024),
        // and a big payload that needs several partial writes.
        let cases: Vec<Vec<Vec<u8>>> = vec![
            vec![],
            vec![vec![], vec![], vec![]],
            vec![vec![1, 2, 3], vec![], vec![4], big[..100].to_vec()],
            (0..2000).map(|i| vec![i as u8; i % 3]).collect(),
            vec![big[..16].to_vec(), big.clone(), vec![9; 5]],
            (0..9).map(|i| pattern(i, 4096)).collect(),
        ];
        let expected: Vec<Vec<u8>> = cases.iter().map(|c| c.concat()).collect();
        let mut sink = client.control.sink;
        let sender = thread::spawn(move || {
            for parts in &cases {
                let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                sink.send(&refs).expect("send");
            }
        });
        let mut source = server.control.source;
        let mut buf = Vec::new();
        for (i, want) in expected.iter().enumerate() {
            assert!(source.recv(&mut buf).expect("recv"));
            assert!(&buf == want, "case {i} differs");
        }
        sender.join().expect("sender");
    });
}

#[test]
fn four_streams_in_parallel_verified_byte_for_byte() {
    bounded(|| {
        let (client, server) = pair(4);
        assert_eq!(client.data.len(), 4);
        assert_eq!(server.data.len(), 4);
        const FRAMES: u64 = 64;
        let senders: Vec<_> = client
            .data
            .into_iter()
            .enumerate()
            .map(|(s, ch)| {
                thread::spawn(move || {
                    let mut sink = ch.sink;
                    for f in 0..FRAMES {
                        let seed = (s as u64) << 32 | f;
                        let len = (f as usize * 7919) % (256 << 10);
                        let header = seed.to_le_bytes();
                        sink.send(&[&header, &pattern(seed, len)]).expect("send");
                    }
                })
            })
            .collect();
        let receivers: Vec<_> = server
            .data
            .into_iter()
            .enumerate()
            .map(|(s, ch)| {
                thread::spawn(move || {
                    let mut source = ch.source;
                    let mut buf = Vec::new();
                    for f in 0..FRAMES {
                        assert!(source.recv(&mut buf).expect("recv"));
                        let seed = (s as u64) << 32 | f;
                        let len = (f as usize * 7919) % (256 << 10);
                        assert_eq!(buf[..8], seed.to_le_bytes(), "stream {s} frame {f}");
                        assert!(buf[8..] == pattern(seed, len)[..], "stream {s} frame {f}");
                    }
                    assert!(!source.recv(&mut buf).expect("eof"), "stream {s}");
                })
            })
            .collect();
        for t in senders {
            t.join().expect("sender");
        }
        for t in receivers {
            t.join().expect("receiver");
        }
        // The control channel works both ways too.
        let (mut cc, mut sc) = (client.control, server.control);
        cc.sink.send(&[b"hello"]).expect("send");
        let mut buf = Vec::new();
        assert!(sc.source.recv(&mut buf).expect("recv"));
        assert_eq!(buf, b"hello");
        sc.sink.send(&[b"ok"]).expect("send");
        assert!(cc.source.recv(&mut buf).expect("recv"));
        assert_eq!(buf, b"ok");
    });
}

#[test]
fn oversized_length_prefix_is_refused() {
    bounded(|| {
        for len in [MAX_FRAME_LEN as u32 + 1, u32::MAX] {
            let (mut raw, mut ch) = raw_pair();
            raw.write_all(&len.to_le_bytes()).expect("write");
            let err = ch.source.recv(&mut Vec::new()).expect_err("must refuse");
            assert!(
                matches!(err, TransportError::FrameTooLarge { len: l, max, .. }
                    if l == u64::from(len) && max == MAX_FRAME_LEN),
                "{err}"
            );
            // The stream is unusable afterwards.
            let err = ch.source.recv(&mut Vec::new()).expect_err("desynced");
            assert!(
                matches!(err, TransportError::Desynchronized { .. }),
                "{err}"
            );
        }
    });
}

#[test]
fn sending_an_oversized_frame_is_refused() {
    bounded(|| {
        let (_raw, mut ch) = raw_pair();
        let half = vec![0u8; MAX_FRAME_LEN / 2 + 1];
        let err = ch.sink.send(&[&half, &half]).expect_err("must refuse");
        assert!(matches!(err, TransportError::SendTooLarge { .. }), "{err}");
    });
}

#[test]
fn truncated_frames_are_refused() {
    bounded(|| {
        // EOF inside the body.
        let (mut raw, mut ch) = raw_pair();
        raw.write_all(&100u32.to_le_bytes()).expect("write");
        raw.write_all(&[7; 50]).expect("write");
        drop(raw);
        let err = ch.source.recv(&mut Vec::new()).expect_err("must refuse");
        assert!(
            matches!(
                err,
                TransportError::Truncated {
                    got: 50,
                    expected: 100,
                    ..
                }
            ),
            "{err}"
        );
        // EOF inside the length prefix.
        let (mut raw, mut ch) = raw_pair();
        raw.write_all(&[1, 0]).expect("write");
        drop(raw);
        let err = ch.source.recv(&mut Vec::new()).expect_err("must refuse");
        assert!(
            matches!(
                err,
                TransportError::Truncated {
                    got: 2,
                    expected: 4,
                    ..
                }
            ),
            "{err}"
        );
    });
}

#[test]
fn read_timeout_is_reported() {
    bounded(|| {
        let (_raw, mut ch) = raw_pair();
        ch.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let err = ch.source.recv(&mut Vec::new()).expect_err("must time out");
        assert!(
            matches!(
                err,
                TransportError::ReadTimeout {
                    mid_frame: false,
                    ..
                }
            ),
            "{err}"
        );
    });
}

#[test]
fn shutdown_unblocks_the_other_side() {
    bounded(|| {
        let (client, server) = pair(1);
        let mut source = server.control.source;
        let reader = thread::spawn(move || source.recv(&mut Vec::new()));
        thread::sleep(Duration::from_millis(50));
        client.control.shutdown().expect("shutdown");
        let got = reader.join().expect("reader");
        assert!(matches!(got, Ok(false)), "{got:?}");
    });
}

#[test]
fn accept_times_out() {
    bounded(|| {
        let (mut l, _) = listen();
        let start = Instant::now();
        let err = l
            .accept(Duration::from_millis(200))
            .expect_err("must time out");
        assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(5),
            "{took:?}"
        );
    });
}

#[test]
fn connect_to_nothing_says_what_to_check() {
    bounded(|| {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let err = TcpTransport
            .connect(&addr, NonZeroUsize::MIN, &ConnectOptions::default())
            .expect_err("nothing listens");
        assert!(matches!(err, TransportError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("godwit receive"), "{err}");
    });
}

fn raw_preamble(addr: &str, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.write_all(bytes).expect("write");
    s
}

fn read_ack(s: &mut TcpStream) -> Result<(), PreambleReason> {
    let mut ack = [0u8; ACK_LEN];
    s.read_exact(&mut ack).expect("ack");
    decode_ack(&ack)
}

#[test]
fn wrong_magic_and_version_are_refused() {
    bounded(|| {
        let (mut l, addr) = listen();
        let good = Preamble {
            role: Role::Control,
            index: 0,
            count: 1,
            token: [1; 16],
        }
        .encode();

        let mut bad = good;
        bad[..4].copy_from_slice(b"HTTP");
        let mut s = raw_preamble(&addr, &bad);
        let err = l.accept(IO_TIMEOUT).expect_err("bad magic");
        assert!(
            matches!(
                err,
                TransportError::BadPreamble {
                    reason: PreambleReason::BadMagic { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            read_ack(&mut s),
            Err(PreambleReason::BadMagic { .. })
        ));

        let mut bad = good;
        bad[4..6].copy_from_slice(&9u16.to_le_bytes());
        let mut s = raw_preamble(&addr, &bad);
        let err = l.accept(IO_TIMEOUT).expect_err("bad version");
        let want = PreambleReason::UnsupportedVersion {
            got: 9,
            supported: 1,
        };
        assert!(
            matches!(&err, TransportError::BadPreamble { reason, .. } if *reason == want),
            "{err}"
        );
        // The sender learns why, with the values.
        assert_eq!(read_ack(&mut s), Err(want));
    });
}

#[test]
fn unknown_token_and_duplicate_index_are_refused() {
    bounded(|| {
        let (mut l, addr) = listen();
        let pre = |role, index, token| {
            Preamble {
                role,
                index,
                count: 2,
                token,
            }
            .encode()
        };
        let _d = raw_preamble(&addr, &pre(Role::Data, 0, [5; 16]));
        let err = l.accept(IO_TIMEOUT).expect_err("unknown token");
        assert!(
            matches!(
                err,
                TransportError::BadPreamble {
                    reason: PreambleReason::UnknownToken,
                    ..
                }
            ),
            "{err}"
        );

        let mut control = raw_preamble(&addr, &pre(Role::Control, 0, [6; 16]));
        let _d0 = raw_preamble(&addr, &pre(Role::Data, 0, [6; 16]));
        let _d0bis = raw_preamble(&addr, &pre(Role::Data, 0, [6; 16]));
        let err = l.accept(IO_TIMEOUT).expect_err("duplicate index");
        assert!(
            matches!(
                err,
                TransportError::BadPreamble {
                    reason: PreambleReason::DuplicateIndex(0),
                    ..
                }
            ),
            "{err}"
        );
        // The whole connection is refused, and its sender told why.
        assert_eq!(
            read_ack(&mut control),
            Err(PreambleReason::DuplicateIndex(0))
        );

        // The listener is still usable afterwards.
        let n = NonZeroUsize::new(2).expect("non-zero");
        let client =
            thread::spawn(move || TcpTransport.connect(&addr, n, &ConnectOptions::default()));
        let conn = l.accept(IO_TIMEOUT).expect("accept after refusals");
        assert_eq!(conn.data.len(), 2);
        client.join().expect("client").expect("connect");
    });
}

#[test]
fn refused_connect_reports_the_reason() {
    bounded(|| {
        let (mut l, addr) = listen();
        let local: SocketAddr = l.local_addr();
        assert_eq!(local.to_string(), addr);
        // Only control arrives, then a data stream with a wrong count: the
        // connecting side must be told.
        let mut control = raw_preamble(
            &addr,
            &Preamble {
                role: Role::Control,
                index: 0,
                count: 2,
                token: [8; 16],
            }
            .encode(),
        );
        let _d = raw_preamble(
            &addr,
            &Preamble {
                role: Role::Data,
                index: 0,
                count: 3,
                token: [8; 16],
            }
            .encode(),
        );
        let err = l.accept(IO_TIMEOUT).expect_err("count mismatch");
        assert!(matches!(err, TransportError::BadPreamble { .. }), "{err}");
        assert_eq!(
            read_ack(&mut control),
            Err(PreambleReason::CountMismatch {
                got: 3,
                expected: 2
            })
        );
    });
}

#[test]
fn too_many_streams_is_refused_before_connecting() {
    let n = NonZeroUsize::new(usize::from(MAX_STREAMS) + 1).expect("non-zero");
    let err = TcpTransport
        .connect("127.0.0.1:1", n, &ConnectOptions::default())
        .expect_err("too many");
    assert!(
        matches!(err, TransportError::TooManyStreams { .. }),
        "{err}"
    );
}
