//! Raw link measurement: how fast N streams of a transport move data when nothing else
//! happens. It is the baseline that migration throughput is compared with (a migration can
//! at best match it), and how the engine picks the faster data plane before round 1.
//!
//! A probe is a *burst* on every stream at once, for a set time, each stream ended by an
//! [`END_OF_BURST`] frame; the receiver *drains* every stream up to that frame and says so on
//! the control channel. The sender counts from its first byte to that word, so the figure is
//! what arrived, not what sat in socket buffers. The streams stay usable afterwards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{Connection, FrameSink, FrameSource, TransportError};

/// Frame size used by the probe: the size of a full page batch.
pub const PROBE_FRAME: usize = 512 << 10;

/// The frame that ends a burst on one stream. Bursts of frames never send a frame this short.
pub const END_OF_BURST: &[u8] = b"GDWP-END";

/// What a probe measured.
#[derive(Debug, Clone, Copy)]
pub struct ProbeResult {
    /// Data streams used.
    pub streams: usize,
    /// Bytes moved by all streams together.
    pub bytes: u64,
    /// How long it took.
    pub elapsed: Duration,
}

impl ProbeResult {
    /// Bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn vanished(what: &'static str) -> TransportError {
    TransportError::PeerClosed {
        peer: "probe".into(),
        what,
    }
}

/// Runs a burst: on every sink, on a thread of its own, calls `step` (which moves some bytes
/// and returns how many) until `duration` has passed, then sends [`END_OF_BURST`] and flushes.
/// Returns the bytes all steps moved.
pub fn burst<F>(
    sinks: Vec<&mut dyn FrameSink>,
    duration: Duration,
    step: F,
) -> Result<u64, TransportError>
where
    F: Fn(&mut dyn FrameSink) -> Result<u64, TransportError> + Sync,
{
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let workers: Vec<_> = sinks
            .into_iter()
            .map(|sink| {
                let (stop, step) = (&stop, &step);
                s.spawn(move || -> Result<u64, TransportError> {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n += step(&mut *sink)?;
                    }
                    sink.send(&[END_OF_BURST])?;
                    sink.flush()?;
                    Ok(n)
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        workers.into_iter().try_fold(0u64, |acc, w| {
            Ok(acc + w.join().unwrap_or(Err(vanished("the link probe")))?)
        })
    })
}

/// One step of a burst of plain frames: sends one [`PROBE_FRAME`].
pub fn frame_step(
    frame: &[u8],
) -> impl Fn(&mut dyn FrameSink) -> Result<u64, TransportError> + Sync + '_ {
    move |sink| {
        sink.send(&[frame])?;
        Ok(frame.len() as u64)
    }
}

/// Drains a burst: reads every source (each on a thread of its own) up to its
/// [`END_OF_BURST`], discarding the rest. Returns the bytes of frame data seen, which is 0
/// for data that arrived by RDMA WRITE. Fails once `limit` has passed, so a stalled or
/// endless sender cannot hold the receiver.
pub fn drain(sources: Vec<&mut dyn FrameSource>, limit: Duration) -> Result<u64, TransportError> {
    let deadline = Instant::now() + limit;
    std::thread::scope(|s| {
        let workers: Vec<_> = sources
            .into_iter()
            .map(|source| {
                s.spawn(move || -> Result<u64, TransportError> {
                    let (mut buf, mut n) = (Vec::new(), 0u64);
                    loop {
                        if !source.recv(&mut buf)? {
                            return Err(vanished("the link probe"));
                        }
                        if buf == END_OF_BURST {
                            return Ok(n);
                        }
                        n += buf.len() as u64;
                        if Instant::now() > deadline {
                            return Err(TransportError::Timeout {
                                what: "waiting for the link probe to end",
                                after: limit,
                            });
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().try_fold(0u64, |acc, w| {
            Ok(acc + w.join().unwrap_or(Err(vanished("the link probe")))?)
        })
    })
}

/// `godwit linktest`'s sender: a burst of frames on every data stream of `conn` for
/// `duration`, timed until the receiver's word on the control channel.
pub fn send(conn: Connection, duration: Duration) -> Result<ProbeResult, TransportError> {
    let Connection {
        mut control,
        mut data,
    } = conn;
    let frame = vec![0x5au8; PROBE_FRAME];
    let started = Instant::now();
    let bytes = burst(
        data.iter_mut()
            .map(|c| &mut *c.sink as &mut dyn FrameSink)
            .collect(),
        duration,
        frame_step(&frame),
    )?;
    let mut buf = Vec::new();
    if !control.source.recv(&mut buf)? || buf != END_OF_BURST {
        return Err(vanished("the link probe"));
    }
    Ok(ProbeResult {
        streams: data.len(),
        bytes,
        elapsed: started.elapsed(),
    })
}

/// `godwit linktest`'s receiver: drains one burst and tells the sender it arrived.
pub fn receive(conn: Connection, limit: Duration) -> Result<ProbeResult, TransportError> {
    let Connection {
        mut control,
        mut data,
    } = conn;
    let started = Instant::now();
    let bytes = drain(
        data.iter_mut()
            .map(|c| &mut *c.source as &mut dyn FrameSource)
            .collect(),
        limit,
    )?;
    control.sink.send(&[END_OF_BURST])?;
    control.sink.flush()?;
    Ok(ProbeResult {
        streams: data.len(),
        bytes,
        elapsed: started.elapsed(),
    })
}
