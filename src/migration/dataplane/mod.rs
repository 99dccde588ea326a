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
//!    | <- RdmaDecline(why) ---------------------- |  TCP after all
//!    | <- RdmaAnswer(dest QPs, guest RAM keys) -- |  both planes are ready; with auto, a
//!    |    (ProbePlanes ... ProbeDrained x2)       |  short burst on each (see `probe`)
//!    | -- UseRdma or UseTcp --------------------> |  the plane the pages take
//! ```
//!
//! With `--transport auto`, a source without a usable RDMA device, a destination that
//! declines, or a probe in which TCP was clearly faster, means TCP, and the source says why
//! in one line; with `--transport rdma` RDMA is used without a probe, and its absence is an
//! error. Remote keys are only ever for guest memory (and the probe's scratch) and only
//! cross after `Accept`.

use std::net::{IpAddr, UdpSocket};

use godwit_transport::Channel;
use serde::{Deserialize, Serialize};

use super::protocol::Message;
use super::report::PlaneProbe;
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
    /// What the plane probe measured, when `--transport auto` had both planes to pick from.
    pub probe: Option<PlaneProbe>,
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
    pub send: &'a mut dyn FnMut(&Message) -> Result<(), MigrationError>,
    /// Waits for the destination's next control message.
    pub wait: &'a mut dyn FnMut() -> Result<Message, MigrationError>,
}

fn tcp_source(
    channels: Vec<Channel>,
    fallback: Option<String>,
    probe: Option<PlaneProbe>,
) -> SourcePlane {
    SourcePlane {
        name: "tcp",
        fallback,
        probe,
        registration: None,
        channels,
        #[cfg(feature = "rdma")]
        placement: None,
    }
}

fn tcp_destination(channels: Vec<Channel>) -> DestinationPlane {
    DestinationPlane {
        name: "tcp",
        channels,
        #[cfg(feature = "rdma")]
        _rdma: None,
    }
}

/// Chooses the source's data plane (see the module docs).
pub(crate) fn source_plane(
    #[cfg_attr(not(feature = "rdma"), allow(unused_mut))] mut side: SourceSide<'_>,
    #[cfg_attr(not(feature = "rdma"), allow(unused_mut))] mut tcp: Vec<Channel>,
) -> Result<SourcePlane, MigrationError> {
    if side.mode == TransportMode::Tcp {
        (side.send)(&Message::UseTcp)?;
        return Ok(tcp_source(tcp, None, None));
    }
    #[cfg(feature = "rdma")]
    {
        let mut setup = match rdma::source(&mut side, tcp.len())? {
            Ok(setup) => setup,
            Err(why) if side.mode == TransportMode::Auto => {
                return Ok(tcp_source(tcp, Some(why), None))
            }
            Err(why) => {
                return Err(MigrationError::Refused(format!(
                    "RDMA was required (--transport rdma) but {why}; use --transport auto or tcp"
                )))
            }
        };
        let probe = if side.mode == TransportMode::Auto {
            Some(probe::source(
                &mut tcp,
                &mut setup.channels,
                &setup.placement,
                side.send,
                side.wait,
            )?)
        } else {
            None
        };
        if let Some(p) = probe.filter(|p| !probe::rdma_wins(p)) {
            (side.send)(&Message::UseTcp)?;
            let why = format!(
                "it moved {:.0} MB/s in a {:.0} ms probe, RDMA {:.0} MB/s",
                p.tcp_bytes_per_sec / 1e6,
                p.burst_ms,
                p.rdma_bytes_per_sec / 1e6
            );
            return Ok(tcp_source(tcp, Some(why), probe));
        }
        (side.send)(&Message::UseRdma)?;
        Ok(SourcePlane {
            name: "rdma",
            fallback: None,
            probe,
            registration: Some(setup.registration),
            channels: setup.channels,
            placement: Some(setup.placement),
        })
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
        Ok(tcp_source(tcp, Some(why), None))
    }
}

/// Answers the source's choice on the destination (see the module docs): `first` is the
/// control message that followed `Accept`, `recv` reads the next ones.
pub(crate) fn destination_plane(
    first: Message,
    peer: &str,
    memory: Vec<(u64, *mut u8, usize)>,
    send: &mut dyn FnMut(&Message) -> Result<(), MigrationError>,
    #[cfg_attr(not(feature = "rdma"), allow(unused_variables))] recv: &mut dyn FnMut() -> Result<
        Message,
        MigrationError,
    >,
    #[cfg_attr(not(feature = "rdma"), allow(unused_mut))] mut tcp: Vec<Channel>,
) -> Result<DestinationPlane, MigrationError> {
    let offer = match first {
        Message::UseTcp => return Ok(tcp_destination(tcp)),
        Message::RdmaOffer(offer) => offer,
        m => {
            return Err(MigrationError::Unexpected {
                expected: "UseTcp or RdmaOffer",
                got: m.name(),
            })
        }
    };
    #[cfg(feature = "rdma")]
    {
        let (mut channels, keep, answer) = match rdma::destination(&offer, peer, memory, tcp.len())
        {
            Ok(set_up) => set_up,
            Err(why) => {
                send(&Message::RdmaDecline(why))?;
                return Ok(tcp_destination(tcp));
            }
        };
        send(&answer)?;
        // At most one probe, then the choice.
        let mut next = recv()?;
        if matches!(next, Message::ProbePlanes) {
            probe::destination(&mut tcp, &mut channels, send)?;
            next = recv()?;
        }
        match next {
            Message::UseRdma => Ok(DestinationPlane {
                name: "rdma",
                channels,
                _rdma: Some(keep),
            }),
            Message::UseTcp => Ok(tcp_destination(tcp)),
            m => Err(MigrationError::Unexpected {
                expected: "UseRdma or UseTcp",
                got: m.name(),
            }),
        }
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = (offer, peer, memory);
        send(&Message::RdmaDecline(
            "this build of Godwit has no RDMA support".into(),
        ))?;
        Ok(tcp_destination(tcp))
    }
}

/// How long the destination waits for one plane's burst to end.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Drains one plane's burst and says so (a forecast's link probe, on TCP; the plane probe,
/// on each plane).
pub(crate) fn drain(
    plane: &mut [Channel],
    send: &mut dyn FnMut(&Message) -> Result<(), MigrationError>,
) -> Result<(), MigrationError> {
    for c in plane.iter() {
        c.set_read_timeout(Some(DRAIN_LIMIT))?;
    }
    let sources = plane
        .iter_mut()
        .map(|c| &mut *c.source as &mut dyn godwit_transport::FrameSource)
        .collect();
    godwit_transport::probe::drain(sources, DRAIN_LIMIT)?;
    send(&Message::ProbeDrained)
}

#[cfg(feature = "rdma")]
pub(crate) mod probe;
#[cfg(feature = "rdma")]
pub(crate) mod rdma;
