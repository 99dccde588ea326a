//! Fuzzing of everything a receiver decodes from an untrusted peer, as a bounded property
//! test: mutated valid inputs and random bytes go into each decoder, which must refuse or
//! accept them without panicking, hanging, or letting a page address escape guest memory.
//!
//! CI runs a short pass; for a long run, give the seconds per target and (to reproduce a
//! finding) a seed:
//!
//! ```sh
//! GODWIT_FUZZ_SECS=360 GODWIT_FUZZ_SEED=42 cargo test --release --test fuzz -- --nocapture --test-threads 1
//! ```

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use godwit::migration::batch::{
    decode, encode_end_of_round, BatchEncoder, Compression, Decoded, MemoryLimits, PAGE_SIZE,
};
use godwit::migration::protocol::{self, Hello, Message, PostCopyFigures, UrgentPage};
use godwit::vmm::memory::MemoryLayout;
use godwit_transport::secure::{self, AuthOptions, Credentials, Psk, SealedSink, SealedSource};
use godwit_transport::{
    Channel, ChannelControl, Connection, FrameSink, FrameSource, TransportError,
};
use rand::{Rng, SeedableRng};

/// The longest any one decode may take: a hang shows up as a failure, not a stuck CI job.
const SLOW: Duration = Duration::from_millis(200);

fn budget() -> Duration {
    let secs = std::env::var("GODWIT_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

fn rng(target: &str) -> rand::rngs::StdRng {
    let seed = std::env::var("GODWIT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("fuzz {target}: seed {seed} (GODWIT_FUZZ_SEED={seed} reproduces it)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// A mutation of `base`: bit flips, byte overwrites with edge values, truncation, extension,
/// splices of another seed, or plain random bytes.
fn mutate(rng: &mut impl Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut f = seeds[rng.random_range(0..seeds.len())].clone();
    if rng.random_ratio(1, 16) {
        let mut r = vec![0u8; rng.random_range(0..256)];
        rng.fill_bytes(&mut r);
        return r;
    }
    for _ in 0..rng.random_range(1..6) {
        if f.is_empty() {
            f.push(0);
        }
        let i = rng.random_range(0..f.len());
        match rng.random_range(0..6) {
            0 => f[i] ^= 1 << rng.random_range(0..8),
            1 => f[i] = [0, 1, 0x7f, 0x80, 0xff][rng.random_range(0..5)],
            2 => {
                // A length or count field set to something huge.
                let end = (i + 8).min(f.len());
                f[i..end].fill(0xff);
            }
            3 => f.truncate(i),
            4 => {
                let mut r = vec![0u8; rng.random_range(1..64)];
                rng.fill_bytes(&mut r);
                f.extend_from_slice(&r);
            }
            _ => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                if !other.is_empty() {
                    let j = rng.random_range(0..other.len());
                    f.truncate(i);
                    f.extend_from_slice(&other[j..]);
                }
            }
        }
    }
    f
}

/// Runs `one` on mutated inputs until the budget is spent; returns how many ran.
fn fuzz(target: &str, seeds: &[Vec<u8>], mut one: impl FnMut(&[u8])) -> u64 {
    let mut rng = rng(target);
    let (started, budget) = (Instant::now(), budget());
    let mut n = 0u64;
    while started.elapsed() < budget {
        let input = mutate(&mut rng, seeds);
        let t = Instant::now();
        one(&input);
        let took = t.elapsed();
        assert!(
            took < SLOW,
            "{target}: one input took {took:?}: {input:02x?}"
        );
        n += 1;
    }
    println!(
        "fuzz {target}: {n} inputs in {:.1} s ({:.0}/s)",
        started.elapsed().as_secs_f64(),
        n as f64 / started.elapsed().as_secs_f64()
    );
    assert!(n > 0);
    n
}

const GIB: u64 = 1 << 30;

#[test]
fn page_batches_never_escape_guest_memory() {
    // Guest memory with a hole, as a real layout has below 4 GiB.
    let limits = MemoryLimits::new([(0, 2 * GIB), (4 * GIB, GIB)]).expect("limits");
    let mut seeds = Vec::new();
    let mut enc = BatchEncoder::new();
    let text: Vec<u8> = (0..PAGE_SIZE).map(|i| b"godwit "[i % 7]).collect();
    let zero = vec![0u8; PAGE_SIZE];
    for compression in [Compression::None, Compression::Lz4] {
        let pages: Vec<(u64, &[u8])> = vec![
            (0, &text),
            (4096, &zero),
            (2 * GIB - 4096, &text),
            (4 * GIB, &text),
        ];
        let b = enc.encode(3, &pages, compression).expect("encode");
        seeds.push(b.parts().concat());
    }
    seeds.push(encode_end_of_round(7, 3).to_vec());
    let mut scratch = Vec::new();
    let (mut accepted, mut pages) = (0u64, 0u64);
    fuzz("page batches", &seeds, |f| {
        match decode(f, &limits, &mut scratch) {
            Err(_) | Ok(Decoded::EndOfRound { .. }) => {}
            Ok(Decoded::Batch(b)) => {
                accepted += 1;
                for a in b.zero_pages() {
                    assert!(
                        limits.contains_page(a),
                        "zero page {a:#x} outside guest memory"
                    );
                    pages += 1;
                }
                for (a, d) in b.data_pages() {
                    assert!(limits.contains_page(a), "page {a:#x} outside guest memory");
                    assert_eq!(d.len(), PAGE_SIZE);
                    pages += 1;
                }
            }
        }
    });
    println!("fuzz page batches: {accepted} accepted, {pages} pages checked in bounds");
}

#[test]
fn control_messages_decode_or_refuse() {
    let layout = MemoryLayout::for_size(256 << 20).expect("layout");
    let hello = Hello {
        layout,
        vcpus: 2,
        cpuid: Vec::new(),
        tsc_khz: 2_000_000,
        streams: 4,
        migration_id: "m1".into(),
    };
    let seeds: Vec<Vec<u8>> = [
        Message::Hello(Box::new(hello)),
        Message::Accept,
        Message::Refuse("no room".into()),
        Message::UseTcp,
        Message::UseRdma,
        Message::ProbePlanes,
        Message::ProbeDrained,
        Message::RdmaOffer(vec![1; 40]),
        Message::RdmaAnswer {
            endpoint: vec![2; 40],
            memory: vec![3; 60],
        },
        Message::RdmaDecline("no device".into()),
        Message::RoundApplied(9),
        Message::ProbeLink {
            migration_id: "m1".into(),
            streams: 2,
        },
        Message::StalePages {
            region: 0,
            first_word: 3,
            words: vec![u64::MAX, 5],
        },
        Message::PageRequest(vec![0x1000, 0x7000]),
        Message::UrgentPages(vec![
            UrgentPage {
                gpa: 0x2000,
                data: vec![7; PAGE_SIZE],
            },
            UrgentPage {
                gpa: 0x3000,
                data: Vec::new(),
            },
        ]),
        Message::PostCopyDone(PostCopyFigures {
            faults: 9,
            fetched: 4,
            max_wait_us: 800,
            mean_wait_us: 150,
        }),
        Message::Restored,
        Message::Commit,
        Message::Resumed,
        Message::Abort("cancelled".into()),
    ]
    .iter()
    .map(protocol::encode)
    .collect();
    let mut ok = 0u64;
    fuzz("control messages", &seeds, |f| {
        if let Ok(m) = protocol::decode(f) {
            ok += 1;
            // What decodes must be a message the engine can name and re-encode.
            let _ = m.name();
            let _ = protocol::encode(&m);
        }
    });
    println!("fuzz control messages: {ok} decoded");
}

#[cfg(feature = "rdma")]
#[test]
fn rdma_descriptors_decode_or_refuse() {
    use godwit_transport::rdma::{EndpointInfo, RemoteMemory};
    // Valid descriptors are made by live endpoints; without a device, the seeds are the
    // layouts written out by hand: version 1, counts, fields.
    let mut memory = vec![1u8, 0, 2];
    for (key, addr, rkey, len) in [
        (0u64, 0x7f00_0000_0000u64, 7u32, GIB),
        (4 * GIB, 0x7f80_0000_0000, 8, GIB),
    ] {
        memory.extend_from_slice(&key.to_be_bytes());
        memory.extend_from_slice(&addr.to_be_bytes());
        memory.extend_from_slice(&rkey.to_be_bytes());
        memory.extend_from_slice(&len.to_be_bytes());
    }
    let seeds = vec![memory, vec![1u8; 64], vec![1u8, 0, 1, 0, 0, 0, 1]];
    fuzz("rdma descriptors", &seeds, |f| {
        if let Ok(m) = RemoteMemory::from_bytes(f) {
            for a in m.areas() {
                assert!(a.len > 0 && a.key.checked_add(a.len).is_some(), "{a:?}");
            }
        }
        let _ = EndpointInfo::from_bytes(f);
    });
}

#[test]
fn sealed_frames_from_a_stranger_never_open() {
    let key = [9u8; 32];
    let (tx, rx) = mpsc::channel();
    let mut honest = SealedSink::new(Box::new(MemSink(tx.clone())), &key);
    honest.send(&[b"a real frame"]).expect("seal");
    let real = rx.recv().expect("frame");
    let seeds = vec![real.clone(), vec![0u8; 48]];
    let mut opened = 0u64;
    fuzz("sealed frames", &seeds, |f| {
        let (tx, rx) = mpsc::channel();
        tx.send(f.to_vec()).expect("queue");
        let mut src = SealedSource::new(Box::new(MemSource(rx)), &key);
        let mut buf = Vec::new();
        if let Ok(true) = src.recv(&mut buf) {
            assert_eq!(f, &real[..], "a frame that is not the real one opened");
            opened += 1;
        }
    });
    // Only an unmodified copy of the real frame opens (mutations may leave one intact).
    println!("fuzz sealed frames: {opened} opened (unmodified copies of the real frame)");
}

#[test]
fn the_key_handshake_refuses_what_it_cannot_verify() {
    let key = Psk::generate().expect("key");
    let opts = AuthOptions {
        credentials: Credentials::Key(key.clone()),
        encrypt_data: true,
    };
    // A real first message (from a real client) seeds the mutations.
    let seeds = {
        let (client, server) = mem_connection_pair();
        let client_opts = opts.clone();
        let t = std::thread::spawn(move || secure::client(client, &client_opts).map(|_| ()));
        let mut server = server;
        let mut m1 = Vec::new();
        assert!(server.control.source.recv(&mut m1).expect("m1"));
        drop(server);
        let _ = t.join();
        vec![m1.clone(), m1[..6].to_vec()]
    };
    let mut accepted = 0u64;
    fuzz("key handshake", &seeds, |f| {
        // The server reads this as the client's first message, then whatever follows is
        // the end of the stream: it must refuse, never accept and never hang.
        let (client, server) = mem_connection_pair();
        let mut client = client;
        client.control.sink.send(&[f]).expect("queue");
        drop(client);
        if secure::server(server, &opts).is_ok() {
            accepted += 1;
        }
    });
    assert_eq!(accepted, 0, "a handshake without the key was accepted");
}

// In-memory channels, so the handshake can be fuzzed without sockets.

struct MemSink(mpsc::Sender<Vec<u8>>);

impl FrameSink for MemSink {
    fn send(&mut self, parts: &[&[u8]]) -> Result<(), TransportError> {
        // A peer that went away just drops what is sent, as a socket buffer would.
        let _ = self.0.send(parts.concat());
        Ok(())
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
}

struct MemSource(mpsc::Receiver<Vec<u8>>);

impl FrameSource for MemSource {
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, TransportError> {
        match self.0.recv_timeout(Duration::from_secs(5)) {
            Ok(f) => {
                *buf = f;
                Ok(true)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Ok(false),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(TransportError::ReadTimeout {
                peer: "memory".into(),
                mid_frame: false,
            }),
        }
    }
}

#[derive(Debug)]
struct MemControl;

impl ChannelControl for MemControl {
    fn shutdown(&self) -> Result<(), TransportError> {
        Ok(())
    }

    fn set_read_timeout(&self, _: Option<Duration>) -> Result<(), TransportError> {
        Ok(())
    }

    fn set_write_timeout(&self, _: Option<Duration>) -> Result<(), TransportError> {
        Ok(())
    }

    fn peer(&self) -> &str {
        "memory"
    }
}

fn mem_channel_pair() -> (Channel, Channel) {
    let (atx, arx) = mpsc::channel();
    let (btx, brx) = mpsc::channel();
    (
        Channel::new(
            Box::new(MemSink(atx)),
            Box::new(MemSource(brx)),
            Arc::new(MemControl),
        ),
        Channel::new(
            Box::new(MemSink(btx)),
            Box::new(MemSource(arx)),
            Arc::new(MemControl),
        ),
    )
}

fn mem_connection_pair() -> (Connection, Connection) {
    let (a, b) = mem_channel_pair();
    (
        Connection {
            control: a,
            data: Vec::new(),
        },
        Connection {
            control: b,
            data: Vec::new(),
        },
    )
}
