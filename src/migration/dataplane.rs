//! The data plane: which streams carry the pages, chosen right after the handshake.
//!
//! TCP data streams always exist (the transport opened them with the control channel). RDMA
//! is negotiated on the control channel, so it rides on the same handshake (and, later, the
//! same authentication) as everything else:
//!
//! ```text
//!  source                                     destination
//!    | -- UseTcp -------------------------------> |  pages on the TCP streams
//!  or
//!    | -- RdmaOffer(source QPs) ----------------> |  open the RDMA device of the address the
//!    |                                            |  migration arrived on, register guest RAM
//!    | <- RdmaAnswer(dest QPs, guest RAM keys) -- |  pages on RDMA: raw pages as RDMA WRITEs
//!    | <- RdmaDecline(why) ---------------------- |  or TCP after all
//! ```
//!
//! With `--transport auto`, a source without a usable RDMA device, or a destination that
//! declines, falls back to TCP and says why in one line; with `--transport rdma` either is an
//! error. Remote keys are only ever for guest memory and only cross after `Accept`.

use std::net::{IpAddr, UdpSocket};

use godwit_transport::Channel;
use serde::{Deserialize, Serialize};

use super::MigrationError;

/// Which data plane to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TransportMode {
    /// RDMA when both hosts have a usable device, else TCP (saying why).
    Auto,
    /// TCP only.
    Tcp,
    /// RDMA or fail.
    Rdma,
}

/// The address this host uses to reach `peer` (`HOST:PORT`): the interface whose RDMA device
/// (if any) should carry the migration. No packet is sent.
pub fn local_ip_towards(peer: &str) -> Option<IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect(peer).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// The streams pages travel on, as the source sees them.
pub struct SourcePlane {
    /// `tcp` or `rdma`.
    pub name: &'static str,
    /// Why RDMA was not used, when it was wanted.
    pub fallback: Option<String>,
    /// How long registering (pinning) this host's guest memory took, on RDMA: before the
    /// first round, never inside the pause.
    pub registration: Option<std::time::Duration>,
    /// One channel per data stream (the source sends on them).
    pub channels: Vec<Channel>,
    /// Guest memory placement, on RDMA.
    #[cfg(feature = "rdma")]
    pub placement: Option<rdma::Placement>,
}

impl std::fmt::Debug for SourcePlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourcePlane")
            .field("name", &self.name)
            .field("streams", &self.channels.len())
            .finish()
    }
}

/// The streams pages arrive on, as the destination sees them.
pub struct DestinationPlane {
    /// `tcp` or `rdma`.
    pub name: &'static str,
    /// One channel per data stream (the destination receives on them).
    pub channels: Vec<Channel>,
    /// Keeps the destination's RDMA registration alive while pages may land.
    #[cfg(feature = "rdma")]
    pub _rdma: Option<rdma::DestinationRdma>,
}

impl std::fmt::Debug for DestinationPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationPlane")
            .field("name", &self.name)
            .field("streams", &self.channels.len())
            .finish()
    }
}

/// What the source's side of the negotiation needs from the engine.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) struct SourceSide<'a> {
    /// The mode the operator chose.
    pub mode: TransportMode,
    /// The destination, `HOST:PORT`.
    pub destination: &'a str,
    /// Guest RAM to register, as `(guest physical address, host pointer, length)`.
    pub memory: Vec<(u64, *mut u8, usize)>,
    /// Sends a control message.
    pub send: &'a mut dyn FnMut(&super::protocol::Message) -> Result<(), MigrationError>,
    /// Waits for the destination's answer.
    pub wait: &'a mut dyn FnMut() -> Result<super::protocol::Message, MigrationError>,
}

/// Chooses the source's data plane (see the module docs).
pub(crate) fn source_plane(
    side: SourceSide<'_>,
    tcp: Vec<Channel>,
) -> Result<SourcePlane, MigrationError> {
    use super::protocol::Message;
    let tcp_plane = |tcp, fallback| SourcePlane {
        name: "tcp",
        fallback,
        registration: None,
        channels: tcp,
        #[cfg(feature = "rdma")]
        placement: None,
    };
    if side.mode == TransportMode::Tcp {
        (side.send)(&Message::UseTcp)?;
        return Ok(tcp_plane(tcp, None));
    }
    #[cfg(feature = "rdma")]
    {
        let mode = side.mode;
        match rdma::source(side, tcp.len())? {
            Ok(plane) => Ok(plane),
            Err(why) if mode == TransportMode::Auto => Ok(tcp_plane(tcp, Some(why))),
            Err(why) => Err(MigrationError::Refused(format!(
                "RDMA was required (--transport rdma) but {why}; use --transport auto or tcp"
            ))),
        }
    }
    #[cfg(not(feature = "rdma"))]
    {
        let why = "this build of Godwit has no RDMA support".to_string();
        if side.mode == TransportMode::Rdma {
            return Err(MigrationError::Refused(format!(
                "{why}; use --transport tcp"
            )));
        }
        (side.send)(&Message::UseTcp)?;
        Ok(tcp_plane(tcp, Some(why)))
    }
}

/// Answers the source's choice on the destination (see the module docs): `first` is the
/// control message that followed `Accept`.
pub(crate) fn destination_plane(
    first: super::protocol::Message,
    peer: &str,
    memory: Vec<(u64, *mut u8, usize)>,
    send: &mut dyn FnMut(&super::protocol::Message) -> Result<(), MigrationError>,
    tcp: Vec<Channel>,
) -> Result<DestinationPlane, MigrationError> {
    use super::protocol::Message;
    let tcp_plane = |tcp| DestinationPlane {
        name: "tcp",
        channels: tcp,
        #[cfg(feature = "rdma")]
        _rdma: None,
    };
    match first {
        Message::UseTcp => Ok(tcp_plane(tcp)),
        Message::RdmaOffer(offer) => {
            #[cfg(feature = "rdma")]
            let answer = rdma::destination(&offer, peer, memory, tcp.len());
            #[cfg(not(feature = "rdma"))]
            let answer: Result<(DestinationPlane, Message), String> = {
                let _ = (offer, peer, memory);
                Err("this build of Godwit has no RDMA support".into())
            };
            match answer {
                Ok((plane, msg)) => {
                    send(&msg)?;
                    Ok(plane)
                }
                Err(why) => {
                    send(&Message::RdmaDecline(why))?;
                    Ok(tcp_plane(tcp))
                }
            }
        }
        m => Err(MigrationError::Unexpected {
            expected: "UseTcp or RdmaOffer",
            got: m.name(),
        }),
    }
}

#[cfg(feature = "rdma")]
pub(crate) mod rdma {
    //! The RDMA half of the negotiation.

    use godwit_transport::rdma::{
        EndpointInfo, MemoryArea, RdmaEndpoint, RegisteredMemory, RemoteMemory,
    };

    use super::{local_ip_towards, DestinationPlane, SourcePlane, SourceSide};
    use crate::migration::protocol::Message;
    use crate::migration::MigrationError;

    /// Where the source's raw pages go: its own registered guest memory, written into the
    /// destination's.
    #[derive(Debug)]
    pub struct Placement {
        /// The source's guest memory, registered.
        pub local: RegisteredMemory,
        /// The destination's guest memory, as its keys describe it.
        pub remote: RemoteMemory,
    }

    /// Keeps the destination's registration (and so its remote keys) valid while it receives.
    #[derive(Debug)]
    pub struct DestinationRdma {
        _memory: RegisteredMemory,
    }

    fn areas(memory: &[(u64, *mut u8, usize)]) -> Vec<MemoryArea> {
        memory
            .iter()
            .map(|&(key, ptr, len)| MemoryArea { key, ptr, len })
            .collect()
    }

    /// Why no endpoint could be opened, in one line: short when the host has no RDMA at all.
    fn no_device(who: &str, ip: std::net::IpAddr, e: &godwit_transport::rdma::RdmaError) -> String {
        match godwit_transport::rdma::Device::list() {
            Ok(devices) if devices.is_empty() => format!("{who} has no RDMA device"),
            _ => format!("no RDMA device of {who} carries {ip}: {e}"),
        }
    }

    /// The source's side. The outer error is fatal; the inner one is a reason to fall back.
    pub fn source(
        side: SourceSide<'_>,
        streams: usize,
    ) -> Result<Result<SourcePlane, String>, MigrationError> {
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
        let started = std::time::Instant::now();
        // SAFETY: the areas are the VM's guest RAM mappings, which live as long as the VM;
        // the engine holds `&mut Vm` for the whole migration and drops the plane (and so this
        // registration) before returning it.
        let local = match unsafe { endpoint.register_memory(&areas(&side.memory)) } {
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
        let bad = |e: godwit_transport::rdma::RdmaError| {
            MigrationError::PeerAborted(format!("RDMA set-up failed: {e}"))
        };
        let remote_info = EndpointInfo::from_bytes(&theirs).map_err(bad)?;
        let remote = RemoteMemory::from_bytes(&memory).map_err(bad)?;
        let channels = endpoint.connect(&remote_info).map_err(bad)?;
        Ok(Ok(SourcePlane {
            name: "rdma",
            fallback: None,
            registration: Some(registration),
            channels,
            placement: Some(Placement { local, remote }),
        }))
    }

    /// The destination's side: `Ok` with the answer to send, or the reason to decline.
    pub fn destination(
        offer: &[u8],
        peer: &str,
        memory: Vec<(u64, *mut u8, usize)>,
        streams: usize,
    ) -> Result<(DestinationPlane, Message), String> {
        let theirs = EndpointInfo::from_bytes(offer)
            .map_err(|e| format!("the source's RDMA offer is invalid: {e}"))?;
        let ip =
            local_ip_towards(peer).ok_or_else(|| format!("no local address reaches {peer}"))?;
        let mut endpoint =
            RdmaEndpoint::open(ip, streams).map_err(|e| no_device("the destination", ip, &e))?;
        // SAFETY: the areas are the incoming VM's guest RAM mappings, which live as long as
        // the VM; the plane holding this registration is dropped before the VM can be.
        let registered = unsafe { endpoint.register_memory(&areas(&memory)) }.map_err(|e| {
            format!("registering guest memory for RDMA failed on the destination ({e})")
        })?;
        let info = endpoint.local_info().to_bytes();
        let channels = endpoint
            .connect(&theirs)
            .map_err(|e| format!("RDMA connect failed: {e}"))?;
        let answer = Message::RdmaAnswer {
            endpoint: info,
            memory: registered.descriptor(),
        };
        Ok((
            DestinationPlane {
                name: "rdma",
                channels,
                _rdma: Some(DestinationRdma {
                    _memory: registered,
                }),
            },
            answer,
        ))
    }
}
