//! Which data plane is faster, measured before round 1 when `--transport auto` finds RDMA on
//! both hosts.
//!
//! Having an RDMA device does not make RDMA the faster path: soft-RoCE, for one, is a CPU
//! loop that TCP on the same link outruns several times. So the source sends a short burst
//! on each plane, the way the pages would go (TCP: frames of a full batch; RDMA: WRITEs
//! from registered memory into the peer's registered scratch, no copy on either side), and
//! keeps the faster. Compression does not change the choice: compressed batches move at
//! `min(threads x compression rate, link x ratio)`, which grows with the link rate, so the
//! faster link is faster either way.
//!
//! ```text
//!  source                                     destination
//!    | -- ProbePlanes --------------------------> |
//!    | == frames on every TCP stream, END ======> |  drains each TCP stream to its END
//!    | <- ProbeDrained -------------------------- |
//!    | == WRITEs into the scratch, END (SEND) ==> |  waits for each RDMA stream's END
//!    | <- ProbeDrained -------------------------- |
//!    | -- UseRdma or UseTcp --------------------> |
//! ```

use std::time::{Duration, Instant};

use godwit_transport::probe::{self, frame_step, PROBE_FRAME};
use godwit_transport::{Channel, FrameSink, TransportError};

use super::rdma::{Placement, PROBE_KEY, PROBE_LEN};
use crate::migration::protocol::Message;
use crate::migration::report::PlaneProbe;
use crate::migration::MigrationError;

/// How long each plane's burst lasts: long enough to fill the pipes of a fast link, short
/// next to any migration worth probing.
pub const BURST: Duration = Duration::from_millis(200);

/// RDMA is kept unless TCP beats it by more than this factor: on a near tie, zero copy
/// leaves both hosts' CPUs to the guest and the compressor.
const RDMA_MARGIN: f64 = 0.9;

/// Whether RDMA should carry the pages, given what the probe measured.
pub fn rdma_wins(p: &PlaneProbe) -> bool {
    p.rdma_bytes_per_sec >= RDMA_MARGIN * p.tcp_bytes_per_sec
}

/// The source's half: a burst on each plane, each timed until the destination has drained
/// it. `send` and `wait` talk on the control channel.
pub(crate) fn source(
    tcp: &mut [Channel],
    rdma: &mut [Channel],
    placement: &Placement,
    send: &mut dyn FnMut(&Message) -> Result<(), MigrationError>,
    wait: &mut dyn FnMut() -> Result<Message, MigrationError>,
) -> Result<PlaneProbe, MigrationError> {
    send(&Message::ProbePlanes)?;
    let frame = vec![0x5au8; PROBE_FRAME];
    let tcp_rate = timed(tcp, wait, frame_step(&frame))?;
    let rdma_rate = timed(rdma, wait, |sink: &mut dyn FrameSink| {
        let Some(sink) = sink.as_rdma() else {
            return Err(TransportError::Rdma {
                peer: "the probe".into(),
                detail: "an RDMA WRITE probe on a channel that is not RDMA (a bug)".into(),
                broken: false,
            });
        };
        sink.write_pages(
            &placement.local,
            &placement.remote,
            &[(PROBE_KEY, PROBE_LEN)],
        )?;
        Ok(PROBE_LEN as u64)
    })?;
    Ok(PlaneProbe {
        tcp_bytes_per_sec: tcp_rate,
        rdma_bytes_per_sec: rdma_rate,
        burst_ms: BURST.as_secs_f64() * 1e3,
    })
}

/// One plane's burst, in bytes per second from its start to the destination's word.
fn timed<F>(
    channels: &mut [Channel],
    wait: &mut dyn FnMut() -> Result<Message, MigrationError>,
    step: F,
) -> Result<f64, MigrationError>
where
    F: Fn(&mut dyn FrameSink) -> Result<u64, TransportError> + Sync,
{
    let started = Instant::now();
    let sinks = channels
        .iter_mut()
        .map(|c| &mut *c.sink as &mut dyn FrameSink)
        .collect();
    let bytes = probe::burst(sinks, BURST, step)?;
    match wait()? {
        Message::ProbeDrained => {}
        m => {
            return Err(MigrationError::Unexpected {
                expected: "ProbeDrained",
                got: m.name(),
            })
        }
    }
    Ok(bytes as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// The destination's half: drains the TCP burst, then the RDMA one, saying so after each.
pub(crate) fn destination(
    tcp: &mut [Channel],
    rdma: &mut [Channel],
    send: &mut dyn FnMut(&Message) -> Result<(), MigrationError>,
) -> Result<(), MigrationError> {
    for plane in [tcp, rdma] {
        super::drain(plane, send)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(tcp: f64, rdma: f64) -> PlaneProbe {
        PlaneProbe {
            tcp_bytes_per_sec: tcp,
            rdma_bytes_per_sec: rdma,
            burst_ms: 200.0,
        }
    }

    #[test]
    fn the_faster_plane_wins_and_rdma_keeps_a_near_tie() {
        // Soft-RoCE under TCG, as measured in the lab: TCP several times faster.
        assert!(!rdma_wins(&probe(240e6, 40e6)));
        // A RoCE NIC against kernel TCP on the same 25 Gb/s port.
        assert!(rdma_wins(&probe(1.9e9, 2.9e9)));
        assert!(rdma_wins(&probe(1.0e9, 0.95e9)));
        assert!(!rdma_wins(&probe(1.0e9, 0.85e9)));
    }
}
