//! The RDMA half of the negotiation: endpoints, guest memory registered once (before round
//! 1), and the scratch area the plane probe writes into.

use std::time::{Duration, Instant};

use godwit_transport::rdma::{
    EndpointInfo, Exposure, MemoryArea, RdmaEndpoint, RdmaError, RegisteredMemory, RemoteMemory,
};
use godwit_transport::Channel;

use super::{local_ip_towards, SourceSide};
use crate::migration::protocol::Message;
use crate::migration::MigrationError;

/// Where the plane probe's RDMA WRITEs land, on both sides: a scratch area registered beside
/// guest memory at an engine address far above any guest memory, so a probe never touches
/// the guest (a layout reaching it fails registration and so falls back to TCP).
pub const PROBE_KEY: u64 = 1 << 62;
/// The scratch area's size: one full RDMA WRITE.
pub const PROBE_LEN: usize = 1 << 20;

/// Where the source's raw pages go: its own registered guest memory, written into the
/// destination's.
#[derive(Debug)]
pub struct Placement {
    /// The source's guest memory (and probe scratch), registered.
    pub local: RegisteredMemory,
    /// The destination's guest memory (and probe scratch), as its keys describe it.
    pub remote: RemoteMemory,
    /// Backs the local probe area; declared after `local`, so it is freed only after the
    /// registration is gone.
    _scratch: Box<[u8]>,
}

/// Keeps the destination's registration (and so its remote keys) valid while it receives.
#[derive(Debug)]
pub struct DestinationRdma {
    _memory: RegisteredMemory,
    /// Declared after the registration, which must go first (see [`Placement`]).
    _scratch: Box<[u8]>,
}

/// RDMA as the source set it up: connected, memory registered on both sides.
#[derive(Debug)]
pub struct SourceRdma {
    /// One channel per data stream.
    pub channels: Vec<Channel>,
    /// Where raw pages go.
    pub placement: Placement,
    /// How long registering this host's guest memory took.
    pub registration: Duration,
}

/// Registers guest `memory` and `scratch` (at [`PROBE_KEY`]) with `endpoint`, writable by the
/// peer only where pages land (`exposure`).
///
/// # Safety
/// Every area of `memory` must stay mapped until the returned registration is dropped, and
/// so must `scratch` (the caller keeps both in one struct, the registration first).
unsafe fn register(
    endpoint: &mut RdmaEndpoint,
    memory: &[(u64, *mut u8, usize)],
    scratch: &mut [u8],
    exposure: Exposure,
) -> Result<RegisteredMemory, RdmaError> {
    let mut areas: Vec<MemoryArea> = memory
        .iter()
        .map(|&(key, ptr, len)| MemoryArea { key, ptr, len })
        .collect();
    areas.push(MemoryArea {
        key: PROBE_KEY,
        ptr: scratch.as_mut_ptr(),
        len: scratch.len(),
    });
    // SAFETY: the caller guarantees that every area outlives the registration.
    unsafe { endpoint.register_memory(&areas, exposure) }
}

/// Why no endpoint could be opened, in one line: short when the host has no RDMA at all.
fn no_device(who: &str, ip: std::net::IpAddr, e: &RdmaError) -> String {
    match godwit_transport::rdma::Device::list() {
        Ok(devices) if devices.is_empty() => format!("{who} has no RDMA device"),
        _ => format!("no RDMA device of {who} carries {ip}: {e}"),
    }
}

/// The source's side, up to connected queue pairs. The outer error is fatal; the inner one
/// is a reason to fall back (the destination was already told `UseTcp`, or declined).
pub fn source(
    side: &mut SourceSide<'_>,
    streams: usize,
) -> Result<Result<SourceRdma, String>, MigrationError> {
    let Some(ip) = local_ip_towards(side.destination) else {
        (side.send)(&Message::UseTcp)?;
        return Ok(Err(format!(
            "no local address reaches {}",
            side.destination
        )));
    };
    let mut endpoint = match RdmaEndpoint::open(ip, streams) {
        Ok(e) => e,
        Err(e) => {
            (side.send)(&Message::UseTcp)?;
            return Ok(Err(no_device("this host", ip, &e)));
        }
    };
    let started = Instant::now();
    let mut scratch = vec![0u8; PROBE_LEN].into_boxed_slice();
    // SAFETY: the areas are the VM's guest RAM mappings, which live as long as the VM (the
    // engine holds `&mut Vm` for the whole migration and drops the plane before returning
    // it), and the scratch, which moves into the `Placement` that owns the registration.
    let local =
        match unsafe { register(&mut endpoint, &side.memory, &mut scratch, Exposure::Local) } {
            Ok(m) => m,
            Err(e) => {
                (side.send)(&Message::UseTcp)?;
                return Ok(Err(format!(
                    "registering guest memory for RDMA failed ({e})"
                )));
            }
        };
    let registration = started.elapsed();
    (side.send)(&Message::RdmaOffer(endpoint.local_info().to_bytes()))?;
    let (theirs, memory) = match (side.wait)()? {
        Message::RdmaAnswer { endpoint, memory } => (endpoint, memory),
        Message::RdmaDecline(why) => {
            return Ok(Err(format!("the destination declined RDMA: {why}")))
        }
        m => {
            return Err(MigrationError::Unexpected {
                expected: "RdmaAnswer or RdmaDecline",
                got: m.name(),
            })
        }
    };
    let bad = |e: RdmaError| MigrationError::PeerAborted(format!("RDMA set-up failed: {e}"));
    let remote_info = EndpointInfo::from_bytes(&theirs).map_err(bad)?;
    let remote = RemoteMemory::from_bytes(&memory).map_err(bad)?;
    let channels = endpoint.connect(&remote_info).map_err(bad)?;
    Ok(Ok(SourceRdma {
        channels,
        placement: Placement {
            local,
            remote,
            _scratch: scratch,
        },
        registration,
    }))
}

/// The destination's side: connected channels, the registration to keep while pages may
/// land, and the answer to send; or the reason to decline.
pub fn destination(
    offer: &[u8],
    peer: &str,
    memory: Vec<(u64, *mut u8, usize)>,
    streams: usize,
) -> Result<(Vec<Channel>, DestinationRdma, Message), String> {
    let theirs = EndpointInfo::from_bytes(offer)
        .map_err(|e| format!("the source's RDMA offer is invalid: {e}"))?;
    let ip = local_ip_towards(peer).ok_or_else(|| format!("no local address reaches {peer}"))?;
    let mut endpoint =
        RdmaEndpoint::open(ip, streams).map_err(|e| no_device("the destination", ip, &e))?;
    let mut scratch = vec![0u8; PROBE_LEN].into_boxed_slice();
    // SAFETY: the areas are the incoming VM's guest RAM mappings, which live as long as the
    // VM (the plane holding this registration is dropped before the VM can be), and the
    // scratch, which moves into the `DestinationRdma` that owns the registration.
    let registered =
        unsafe { register(&mut endpoint, &memory, &mut scratch, Exposure::RemoteWrite) }.map_err(
            |e| format!("registering guest memory for RDMA failed on the destination ({e})"),
        )?;
    let info = endpoint.local_info().to_bytes();
    let channels = endpoint
        .connect(&theirs)
        .map_err(|e| format!("RDMA connect failed: {e}"))?;
    let answer = Message::RdmaAnswer {
        endpoint: info,
        memory: registered.descriptor(),
    };
    Ok((
        channels,
        DestinationRdma {
            _memory: registered,
            _scratch: scratch,
        },
        answer,
    ))
}
