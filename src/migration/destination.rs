//! The destination side: judges the incoming VM, builds an empty one, writes pages as they
//! arrive, loads the state, and runs the VM only after the source's commit. Until then, any
//! failure discards the VM here (it never ran) and the source keeps running its copy.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{select, unbounded, Receiver};
use godwit_transport::secure::{self, AuthOptions};
use godwit_transport::{Connection, FrameSink, FrameSource, TransportListener};

use super::batch::MemoryLimits;
use super::dataplane;
use super::faults;
use super::phase::{DestinationPhase, PhaseLog};
use super::pipeline::{spawn_receivers, StreamEvent};
use super::postcopy::{self, Landing};
use super::protocol::{self, Hello, Message};
use super::MigrationError;
use crate::vmm::devices::SerialSink;
use crate::vmm::memory::DirtyBitmap;
use crate::vmm::state::missing_cpu_features;
use crate::vmm::{self, Vm, VmConfig};

/// How to receive a VM.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// How long to wait for a source to connect.
    pub accept_timeout: Duration,
    /// How long the source may stay silent on every channel before the migration is
    /// abandoned (pre-copy rounds keep data flowing; the control channel waits longer).
    pub idle_timeout: Duration,
    /// How a source must authenticate.
    pub auth: AuthOptions,
    /// The one migration this receiver takes.
    pub migration_id: String,
    /// The most guest RAM this host takes, if the operator set a cap (memory kept for
    /// other VMs).
    pub max_memory: Option<u64>,
}

/// Connections that fail to authenticate before the receiver gives up.
const MAX_REFUSED: usize = 32;

/// What the destination saw.
#[derive(Clone, Debug)]
pub struct Received {
    /// Guest RAM received.
    pub guest_memory_bytes: u64,
    /// Rounds received.
    pub rounds: u32,
    /// The data plane the pages came on (`tcp` or `rdma`).
    pub transport: &'static str,
    /// From the connection to running the VM.
    pub total: Duration,
}

/// Link probes (`godwit forecast`) a receiver answers while it waits for its VM.
const MAX_LINK_PROBES: usize = 32;

/// What one authenticated connection was for.
enum Served {
    /// The migration: the VM runs here, after this many rounds over this plane.
    Vm(Box<Vm>, u32, &'static str),
    /// A forecast's link probe; the receiver goes on waiting.
    LinkProbe,
}

/// Waits for one migration on `listener` and returns the VM, running. A forecast's link
/// probe on the way is answered, and the wait goes on.
pub fn receive(
    listener: &mut dyn TransportListener,
    opts: &ReceiveOptions,
    serial: SerialSink,
) -> Result<(Vm, Received), MigrationError> {
    let deadline = Instant::now() + opts.accept_timeout;
    let mut serial = Some(serial);
    for _ in 0..MAX_LINK_PROBES {
        let conn = admit(listener, opts, deadline)?;
        let peer = conn.control.peer().to_string();
        let started = Instant::now();
        let aborts: Vec<_> = std::iter::once(&conn.control)
            .chain(&conn.data)
            .map(|c| c.abort_handle())
            .collect();
        let result = Session::new().run(conn, opts, &mut serial);
        if !matches!(result, Ok(Served::Vm(..))) {
            for a in &aborts {
                let _ = a.shutdown();
            }
        }
        match result? {
            Served::Vm(vm, rounds, transport) => {
                let received = Received {
                    transport,
                    guest_memory_bytes: vm.layout().total_bytes(),
                    rounds,
                    total: started.elapsed(),
                };
                return Ok((*vm, received));
            }
            Served::LinkProbe => eprintln!(
                "godwit: answered a link probe from {peer} (godwit forecast); still waiting for the VM"
            ),
        }
    }
    Err(MigrationError::Refused(format!(
        "{MAX_LINK_PROBES} link probes and no migration; restart the receiver"
    )))
}

/// Accepts connections until one authenticates, before `deadline`. A stranger, or a host
/// with another key, is refused (it learns only that) and the receiver keeps waiting for
/// its migration.
fn admit(
    listener: &mut dyn TransportListener,
    opts: &ReceiveOptions,
    deadline: Instant,
) -> Result<Connection, MigrationError> {
    for _ in 0..MAX_REFUSED {
        let conn = listener.accept(deadline.saturating_duration_since(Instant::now()))?;
        let peer = conn.control.peer().to_string();
        match secure::server(conn, &opts.auth) {
            Ok(conn) => return Ok(conn),
            Err(e) => eprintln!("godwit: refused a connection from {peer}: {e}"),
        }
    }
    Err(MigrationError::Refused(format!(
        "{MAX_REFUSED} connections failed to authenticate; restart the receiver once the \
         source has the right key"
    )))
}

struct Session {
    phase: PhaseLog<DestinationPhase>,
}

fn recv_message(
    source: &mut dyn FrameSource,
    buf: &mut Vec<u8>,
) -> Result<Message, MigrationError> {
    if !source.recv(buf)? {
        return Err(MigrationError::PeerVanished("the handshake"));
    }
    Ok(protocol::decode(buf)?)
}

fn send_message(sink: &mut dyn FrameSink, msg: &Message) -> Result<(), MigrationError> {
    sink.send(&[&protocol::encode(msg)])?;
    sink.flush()?;
    Ok(())
}

/// The refusal of a source that names another migration.
fn wrong_id(opts: &ReceiveOptions, theirs: &str) -> String {
    format!(
        "this receiver waits for migration {:?}, not {theirs:?}; give `godwit send --id` the id \
         `godwit receive` printed",
        opts.migration_id
    )
}

/// Whether this host can take the VM the source describes; the refusal says what to fix.
fn judge(hello: &Hello, data_streams: usize, max_memory: Option<u64>) -> Result<(), String> {
    hello
        .layout
        .validate()
        .map_err(|e| format!("the source's memory layout is invalid: {e}"))?;
    if hello.vcpus == 0 || hello.vcpus > vmm::MAX_VCPUS {
        return Err(format!(
            "the VM has {} vCPUs; this host runs 1 to {}",
            hello.vcpus,
            vmm::MAX_VCPUS
        ));
    }
    if usize::from(hello.streams) != data_streams {
        return Err(format!(
            "the source announced {} data streams but {} connected",
            hello.streams, data_streams
        ));
    }
    let need = hello.layout.total_bytes();
    if let Some(max) = max_memory.filter(|&m| need > m) {
        return Err(format!(
            "the VM needs {} MiB of RAM but this receiver takes at most {} MiB (--max-memory); \
             raise it or choose another destination",
            need >> 20,
            max >> 20
        ));
    }
    if let Some(avail) = vmm::host_available_memory() {
        if need > avail {
            return Err(format!(
                "the VM needs {} MiB of RAM but this host has {} MiB available; free memory here or choose another destination",
                need >> 20,
                avail >> 20
            ));
        }
    }
    let host = vmm::host_supported_cpuid().map_err(|e| e.to_string())?;
    let missing = missing_cpu_features(&hello.cpuid, &host);
    if !missing.is_empty() {
        return Err(format!(
            "this host's CPU lacks features the guest uses ({}); migrate to a host with the same or a newer CPU, \
             or start the VM with a CPU model both hosts support",
            missing.join(", ")
        ));
    }
    Ok(())
}

impl Session {
    fn new() -> Self {
        Self {
            phase: PhaseLog::new(DestinationPhase::Handshake),
        }
    }

    fn go(&mut self, next: DestinationPhase) {
        self.phase.go(next, DestinationPhase::can_go_to);
    }

    fn run(
        &mut self,
        conn: Connection,
        opts: &ReceiveOptions,
        serial: &mut Option<SerialSink>,
    ) -> Result<Served, MigrationError> {
        let result = self.steps(conn, opts, serial);
        if result.is_err() {
            self.go(DestinationPhase::Failed);
        }
        result
    }

    fn steps(
        &mut self,
        conn: Connection,
        opts: &ReceiveOptions,
        serial: &mut Option<SerialSink>,
    ) -> Result<Served, MigrationError> {
        let data_streams = conn.data.len();
        let mut data = conn.data;
        let peer = conn.control.peer().to_string();
        let (mut control, mut ctl_source, _) = conn.control.into_parts();
        let mut buf = Vec::new();

        // Handshake: judge, build, accept.
        let hello = match recv_message(&mut *ctl_source, &mut buf) {
            Ok(Message::Hello(h)) => h,
            Ok(Message::ProbeLink {
                migration_id,
                streams,
            }) => {
                let mut refuse = |why: String| {
                    let _ = send_message(&mut *control, &Message::Refuse(why.clone()));
                    Err(MigrationError::Refused(why))
                };
                if migration_id != opts.migration_id {
                    return refuse(wrong_id(opts, &migration_id));
                }
                if usize::from(streams) != data_streams {
                    return refuse(format!(
                        "the forecast announced {streams} data streams but {data_streams} connected"
                    ));
                }
                send_message(&mut *control, &Message::Accept)?;
                dataplane::drain(&mut data, &mut |m| send_message(&mut *control, m))?;
                return Ok(Served::LinkProbe);
            }
            // Say why, in this side's version: a source of another release reads that as
            // "the peer speaks version N", which names the fix.
            Err(e @ MigrationError::Protocol(_)) => {
                let _ = send_message(&mut *control, &Message::Refuse(e.to_string()));
                return Err(e);
            }
            Err(e) => return Err(e),
            Ok(m) => {
                return Err(MigrationError::Unexpected {
                    expected: "Hello",
                    got: m.name(),
                })
            }
        };
        if hello.migration_id != opts.migration_id {
            let why = wrong_id(opts, &hello.migration_id);
            let _ = send_message(&mut *control, &Message::Refuse(why.clone()));
            return Err(MigrationError::Refused(why));
        }
        if let Err(why) = judge(&hello, data_streams, opts.max_memory) {
            let _ = send_message(&mut *control, &Message::Refuse(why.clone()));
            return Err(MigrationError::Refused(why));
        }
        let config = VmConfig {
            vcpus: hello.vcpus,
            layout: hello.layout.clone(),
            tsc_khz: Some(hello.tsc_khz),
        };
        let serial = serial
            .take()
            .ok_or_else(|| MigrationError::Refused("this receiver already took a VM".into()))?;
        let vm = match Vm::incoming(&config, &hello.cpuid, serial) {
            Ok(vm) => vm,
            Err(e) => {
                let why = format!("this host cannot build the VM: {e}");
                let _ = send_message(&mut *control, &Message::Refuse(why.clone()));
                return Err(MigrationError::Refused(why));
            }
        };
        let limits = MemoryLimits::new(hello.layout.regions.iter().map(|r| (r.start, r.size)))
            .map_err(|e| {
                MigrationError::Refused(format!("the source's memory layout is invalid: {e}"))
            })?;
        send_message(&mut *control, &Message::Accept)?;
        let first = recv_message(&mut *ctl_source, &mut buf)?;
        let plane = dataplane::destination_plane(
            first,
            &peer,
            vm.ram_areas(),
            &mut |m| send_message(&mut *control, m),
            &mut || recv_message(&mut *ctl_source, &mut buf),
            data,
        )?;
        let (events_tx, events) = unbounded();
        let mut sources = Vec::with_capacity(data_streams);
        for ch in plane.channels {
            ch.set_read_timeout(Some(opts.idle_timeout))?;
            sources.push(ch.into_parts().1);
        }
        self.go(DestinationPhase::Receiving);
        let landing = Arc::new(Landing::default());
        // The threads end on their own when the source closes the streams.
        drop(spawn_receivers(
            vm.memory().clone(),
            sources,
            Arc::new(limits),
            landing.clone(),
            events_tx,
        ));

        // Pages flow until the source switches over.
        let inbox = protocol::spawn_inbox(ctl_source);
        let mut rounds_done = vec![0u32; data_streams];
        let mut stale = None;
        let (final_round, paused_at, state, postcopy) = loop {
            select! {
                recv(inbox) -> m => match m.map_err(|_| MigrationError::PeerVanished("pre-copy"))?? {
                    Message::Switchover { final_round, paused_at_unix_ns, state, postcopy } => break (final_round, paused_at_unix_ns, state, postcopy),
                    Message::StalePages { region, first_word, words } => postcopy::take_stale(&mut stale, &hello.layout, region, first_word, &words)?,
                    Message::Abort(why) => return Err(MigrationError::PeerAborted(why)),
                    m => return Err(MigrationError::Unexpected { expected: "Switchover", got: m.name() }),
                },
                recv(events) -> e => {
                    let before = rounds_done.iter().min().copied().unwrap_or(0);
                    stream_event(e.ok(), &mut rounds_done)?;
                    let after = rounds_done.iter().min().copied().unwrap_or(0);
                    if after > before {
                        send_message(&mut *control, &Message::RoundApplied(after))?;
                    }
                }
            }
        };
        let deadline = Instant::now() + opts.idle_timeout;
        while rounds_done.iter().any(|&r| r < final_round) {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = events
                .recv_timeout(left)
                .map_err(|_| MigrationError::Timeout {
                    what: "the last pages of the final round",
                    secs: opts.idle_timeout.as_secs(),
                })?;
            stream_event(Some(e), &mut rounds_done)?;
        }

        // Post-copy: the stale pages go, and a touch of one will wait for its fresh copy.
        // (A source whose guest dirtied nothing since round 1 sends no stale pages; post-copy
        // then ends as soon as the background round, empty, has.)
        let postcopy = if postcopy {
            let stale = stale.unwrap_or_else(|| DirtyBitmap::empty(&hello.layout));
            Some(postcopy::arm(&vm, stale, &landing)?)
        } else {
            None
        };

        // Load the state; run only after the commit.
        self.go(DestinationPhase::Restoring);
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let paused_for = Duration::from_nanos(now_ns.saturating_sub(paused_at));
        if let Err(e) = vm.restore(*state, paused_for) {
            let _ = send_message(
                &mut *control,
                &Message::Abort(format!("the destination cannot load the VM state: {e}")),
            );
            return Err(e.into());
        }
        send_message(&mut *control, &Message::Restored)?;
        self.go(DestinationPhase::AwaitCommit);
        match wait_inbox(&inbox, opts.idle_timeout, "the source's commit")? {
            Message::Commit => {}
            Message::Abort(why) => return Err(MigrationError::PeerAborted(why)),
            m => {
                return Err(MigrationError::Unexpected {
                    expected: "Commit",
                    got: m.name(),
                })
            }
        }
        faults::hold("destination-commit");
        vm.resume()?;
        let Some(pc) = postcopy else {
            self.go(DestinationPhase::Running);
            // The VM runs here now whatever happens to this message; the source releases on it.
            let _ = send_message(&mut *control, &Message::Resumed);
            return Ok(Served::Vm(Box::new(vm), final_round, plane.name));
        };
        self.go(DestinationPhase::PostCopy);
        send_message(&mut *control, &Message::Resumed)?;
        eprintln!("godwit: the VM runs here; post-copy: fetching the pages it still misses");
        let run = postcopy::DestinationPostCopy {
            pc: pc.clone(),
            inbox: &inbox,
            events: &events,
            rounds_done: &rounds_done,
            round: final_round + 1,
            control: &mut *control,
            idle: opts.idle_timeout,
        };
        match run.run() {
            Ok(f) => eprintln!(
                "godwit: post-copy done: the guest waited for {} pages, {} fetched on demand \
                 (mean {} µs, longest {} µs)",
                f.faults, f.fetched, f.mean_wait_us, f.max_wait_us
            ),
            Err(e) => {
                // The guest's newest memory is split between the hosts: stop this copy before
                // it can run on pages that never came.
                let _ = vm.pause();
                pc.disarm();
                return Err(MigrationError::PostCopyLost(e.to_string()));
            }
        }
        self.go(DestinationPhase::Running);
        Ok(Served::Vm(Box::new(vm), final_round + 1, plane.name))
    }
}

fn stream_event(e: Option<StreamEvent>, rounds_done: &mut [u32]) -> Result<(), MigrationError> {
    match e {
        Some(StreamEvent::RoundEnd { stream, round }) => {
            rounds_done[stream] = round;
            Ok(())
        }
        Some(StreamEvent::Failed { stream, error }) => {
            Err(MigrationError::Stream { stream, error })
        }
        None => Err(MigrationError::PeerVanished("pre-copy")),
    }
}

fn wait_inbox(
    inbox: &Receiver<Result<Message, MigrationError>>,
    timeout: Duration,
    what: &'static str,
) -> Result<Message, MigrationError> {
    inbox
        .recv_timeout(timeout)
        .map_err(|_| MigrationError::Timeout {
            what,
            secs: timeout.as_secs(),
        })?
}
