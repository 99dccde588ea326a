//! Raw link measurement: how fast N streams of a transport move frames when nothing else
//! happens. It is the baseline that migration throughput is compared with (a migration can
//! at best match it), and what a forecast of a migration's duration starts from.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{Connection, TransportError};

/// Frame size used by the probe: the size of a full page batch.
pub const PROBE_FRAME: usize = 512 << 10;

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

/// Sends frames on every data stream of `conn` for `duration`, then closes the streams and
/// waits for the receiver's byte count on the control channel (so the figure is what arrived,
/// not what sat in socket buffers).
pub fn send(conn: Connection, duration: Duration) -> Result<ProbeResult, TransportError> {
    let Connection { control, data } = conn;
    let streams = data.len();
    let (_, mut ctl_source, _) = control.into_parts();
    let stop = AtomicBool::new(false);
    let frame = vec![0x5au8; PROBE_FRAME];
    let started = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = data
            .into_iter()
            .map(|ch| {
                let (stop, frame) = (&stop, &frame);
                s.spawn(move || -> Result<(), TransportError> {
                    let (mut sink, _, _) = ch.into_parts();
                    while !stop.load(Ordering::Relaxed) {
                        sink.send(&[frame])?;
                    }
                    sink.flush()
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        workers.into_iter().try_for_each(|w| {
            w.join().unwrap_or(Err(TransportError::PeerClosed {
                peer: "probe".into(),
                what: "the link probe",
            }))
        })
    })?;
    let mut buf = Vec::new();
    if !ctl_source.recv(&mut buf)? || buf.len() != 8 {
        return Err(TransportError::PeerClosed {
            peer: "probe".into(),
            what: "the link probe",
        });
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf);
    Ok(ProbeResult {
        streams,
        bytes: u64::from_le_bytes(b),
        elapsed: started.elapsed(),
    })
}

/// Receives and discards frames on every data stream until the sender closes them, then
/// reports the byte count to the sender.
pub fn receive(conn: Connection) -> Result<ProbeResult, TransportError> {
    let Connection { control, data } = conn;
    let streams = data.len();
    let (mut ctl_sink, _, _) = control.into_parts();
    let started = Instant::now();
    let bytes = std::thread::scope(|s| {
        let workers: Vec<_> = data
            .into_iter()
            .map(|ch| {
                s.spawn(move || -> Result<u64, TransportError> {
                    let (_, mut source, _) = ch.into_parts();
                    let (mut buf, mut n) = (Vec::new(), 0u64);
                    while source.recv(&mut buf)? {
                        n += buf.len() as u64;
                    }
                    Ok(n)
                })
            })
            .collect();
        workers.into_iter().try_fold(0u64, |acc, w| {
            Ok::<u64, TransportError>(acc + w.join().unwrap_or(Ok(0))?)
        })
    })?;
    ctl_sink.send(&[&bytes.to_le_bytes()])?;
    ctl_sink.flush()?;
    Ok(ProbeResult {
        streams,
        bytes,
        elapsed: started.elapsed(),
    })
}
