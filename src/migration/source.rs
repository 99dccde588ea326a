//! The source side: runs the phases from handshake to release, and guarantees that on any
//! failure before the commit the VM runs on the source again.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use godwit_transport::secure::{self, AuthOptions};
use godwit_transport::{
    AbortHandle, ConnectOptions, Connection, FrameSink, FrameSource, Transport,
};

use super::batch::Compression;
use super::dataplane::{self, SourceSide, TransportMode};
use super::eta::{Basis, Eta};
use super::faults;
use super::forecast;
use super::phase::{PhaseLog, SourcePhase};
use super::pipeline::{Interrupt, RateLimiter, SendPipeline};
use super::policy::{CompressMode, Decision, Estimates, Limits, Standing};
use super::postcopy::{self, SentPages};
use super::protocol::{self, Hello, Message};
use super::report::{
    Escalation, Outcome, PauseSteps, PhaseTime, PlaneProbe, PostCopyReport, Progress, Report,
    RoundReport,
};
use super::MigrationError;
use crate::vmm::memory::{DirtyBitmap, PAGE_SIZE};
use crate::vmm::Vm;

/// Pages sampled before round 1 to see how well the guest's memory compresses.
const COMPRESSION_SAMPLE_PAGES: u64 = 1024;

/// How often live progress is reported.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// How to send a VM.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// `HOST:PORT` of a `godwit receive`.
    pub destination: String,
    /// Data streams.
    pub streams: NonZeroUsize,
    /// Worker threads that read, zero-check and compress pages.
    pub threads: NonZeroUsize,
    /// Compression.
    pub compress: CompressMode,
    /// Downtime budget, deadline, and the escalation steps allowed.
    pub limits: Limits,
    /// Which data plane (TCP, RDMA, or RDMA when possible).
    pub transport: TransportMode,
    /// Cap on page bytes per second on the wire, if any.
    pub max_bandwidth: Option<u64>,
    /// How long to wait for each answer of the destination.
    pub reply_timeout: Duration,
    /// What this host authenticates with (the files are read when the migration starts).
    pub auth: crate::api::AuthFiles,
    /// Whether TCP data streams are encrypted (the control channel always is).
    pub encrypt_data: bool,
    /// The id the destination was started for.
    pub migration_id: String,
}

/// Control messages from the destination, read by a thread so the driver can wait with a
/// timeout and notice an abort between rounds.
pub(crate) struct Inbox(Receiver<Result<Message, MigrationError>>);

impl Inbox {
    pub(crate) fn spawn(source: Box<dyn FrameSource>) -> Self {
        Self(protocol::spawn_inbox(source))
    }

    /// Waits for the next message, `RoundApplied` included.
    fn next(&self, what: &'static str, timeout: Duration) -> Result<Message, MigrationError> {
        match self.0.recv_timeout(timeout) {
            Ok(Ok(Message::Abort(why))) => Err(MigrationError::PeerAborted(why)),
            Ok(r) => r,
            Err(_) => Err(MigrationError::Timeout {
                what,
                secs: timeout.as_secs_f64().round() as u64,
            }),
        }
    }

    /// Waits for the next message that is not a (late) `RoundApplied`: the destination may
    /// report the final round applied before it reads the switchover.
    pub(crate) fn wait(
        &self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Message, MigrationError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(what, left)? {
                Message::RoundApplied(_) => {}
                m => return Ok(m),
            }
        }
    }

    /// Waits for the destination's `Accept`; a `Refuse` fails with the destination's reason.
    pub(crate) fn wait_accept(
        &self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<(), MigrationError> {
        match self.wait(what, timeout)? {
            Message::Accept => Ok(()),
            Message::Refuse(why) => Err(MigrationError::Refused(why)),
            m => Err(MigrationError::Unexpected {
                expected: "Accept",
                got: m.name(),
            }),
        }
    }

    /// Waits until the destination has applied round `round`.
    fn wait_applied(&self, round: u32, timeout: Duration) -> Result<(), MigrationError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next("the destination to apply a round of pages", left)? {
                Message::RoundApplied(r) if r >= round => return Ok(()),
                Message::RoundApplied(_) => {}
                m => {
                    return Err(MigrationError::Unexpected {
                        expected: "RoundApplied",
                        got: m.name(),
                    })
                }
            }
        }
    }
}

struct Run<'a> {
    vm: &'a mut Vm,
    opts: &'a SendOptions,
    transport_name: &'static str,
    fallback: Option<String>,
    plane_probe: Option<PlaneProbe>,
    registration: Option<Duration>,
    phase: PhaseLog<SourcePhase>,
    estimates: Estimates,
    rounds: Vec<RoundReport>,
    bytes_sent: u64,
    paused_at: Option<Instant>,
    downtime: Duration,
    pause_steps: PauseSteps,
    predicted: Duration,
    aborts: Vec<AbortHandle>,
    started: Instant,
    deadline: Duration,
    escalations: Vec<Escalation>,
    eta: Eta,
    postcopy: Option<PostCopyReport>,
}

/// Shuts every channel down when dropped.
struct ShutdownOnDrop(Vec<AbortHandle>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        for a in &self.0 {
            let _ = a.shutdown();
        }
    }
}

/// Connects the control channel and the data streams to the destination (not yet
/// authenticated), each write bounded by the reply timeout: a write into a dead link fails in
/// bounded time instead of hanging the migration.
pub(crate) fn connect(
    transport: &dyn Transport,
    opts: &SendOptions,
) -> Result<Connection, MigrationError> {
    let conn = transport.connect(
        &opts.destination,
        opts.streams,
        &ConnectOptions {
            connect_timeout: opts.reply_timeout,
            handshake_timeout: opts.reply_timeout,
            ..ConnectOptions::default()
        },
    )?;
    for c in std::iter::once(&conn.control).chain(&conn.data) {
        c.set_write_timeout(Some(opts.reply_timeout))?;
    }
    Ok(conn)
}

/// Moves `vm` to the destination. On `Completed` the caller must release the VM (it is paused
/// and the destination runs it); on any other outcome the report says whether it runs here.
pub fn migrate(
    vm: &mut Vm,
    transport: &dyn Transport,
    opts: &SendOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Report {
    let started = Instant::now();
    let deadline = opts.limits.deadline_for(vm.layout().total_bytes());
    let mut run = Run {
        vm,
        opts,
        transport_name: transport.name(),
        fallback: None,
        plane_probe: None,
        registration: None,
        phase: PhaseLog::new(SourcePhase::Handshake),
        estimates: Estimates::default(),
        rounds: Vec::new(),
        bytes_sent: 0,
        paused_at: None,
        downtime: Duration::ZERO,
        pause_steps: PauseSteps::default(),
        predicted: Duration::ZERO,
        aborts: Vec::new(),
        started,
        deadline,
        escalations: Vec::new(),
        eta: Eta::default(),
        postcopy: None,
    };
    let result = run.drive(transport, cancel, progress);
    for a in &run.aborts {
        let _ = a.shutdown();
    }
    let (outcome, error, on_source) = match result {
        Ok(()) => {
            run.phase.go(SourcePhase::Completed, SourcePhase::can_go_to);
            (Outcome::Completed, None, false)
        }
        Err(e) if run.phase.current().resumes_on_failure() => {
            let cancelled = matches!(e, MigrationError::Cancelled);
            let next = if cancelled {
                SourcePhase::Cancelled
            } else {
                SourcePhase::Failed
            };
            run.phase.go(next, SourcePhase::can_go_to);
            // The log goes off with the vCPUs out of the guest (a pause of well under a
            // millisecond when the failure came in pre-copy), and the guest runs again, at
            // full speed, even if that fails.
            let logging_off = run
                .vm
                .pause()
                .and_then(|()| run.vm.set_throttle(0).map(|_| ()))
                .and_then(|()| run.vm.set_dirty_logging(false));
            let resumed = run.vm.resume().and(logging_off);
            let error = match resumed {
                Ok(()) => format!("{e}; the VM keeps running on the source"),
                Err(r) => format!("{e}; resuming the VM on the source also failed: {r}"),
            };
            let outcome = if cancelled {
                Outcome::Cancelled
            } else {
                Outcome::Failed
            };
            (outcome, Some(error), true)
        }
        Err(e) if run.phase.current() == SourcePhase::PostCopy => {
            run.phase.go(SourcePhase::Failed, SourcePhase::can_go_to);
            let error = format!(
                "{e} in post-copy: the VM ran on the destination without all of its memory, so \
                 its copy there cannot go on; this paused copy is the guest as of the \
                 switchover: `godwit resume` it (what the guest did on the destination since is \
                 lost) or `godwit stop` it"
            );
            (Outcome::Failed, Some(error), false)
        }
        Err(e) => {
            run.phase.go(SourcePhase::Failed, SourcePhase::can_go_to);
            let error = format!(
                "{e} after the commit: the destination may be running the VM, so it stays paused here; \
                 check the destination (`godwit status`): if it runs the VM, `godwit stop` this copy, \
                 if not, `godwit resume` it"
            );
            (Outcome::Failed, Some(error), false)
        }
    };
    let (mut raw, mut wire, mut zero) = (0u64, 0u64, 0u64);
    for r in &run.rounds {
        raw += (r.pages - r.zero_pages) * PAGE_SIZE;
        wire += r.wire_bytes;
        zero += r.zero_pages;
    }
    Report {
        outcome,
        error,
        vm_on_source: on_source,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        downtime_ms: run.downtime.as_secs_f64() * 1e3,
        pause_steps: run.pause_steps,
        predicted_downtime_ms: run.predicted.as_secs_f64() * 1e3,
        bytes_sent: run.bytes_sent,
        guest_memory_bytes: run.vm.layout().total_bytes(),
        rounds: run.rounds.len() as u32,
        zero_pages: zero,
        compression_ratio: if wire > 0 {
            raw as f64 / wire as f64
        } else {
            1.0
        },
        transport: run.transport_name.to_string(),
        transport_fallback: run.fallback.clone(),
        plane_probe: run.plane_probe,
        rdma_registration_ms: run.registration.map(|d| d.as_secs_f64() * 1e3),
        streams: opts.streams.get(),
        threads: opts.threads.get(),
        round_details: run.rounds,
        deadline_ms: run.deadline.as_secs_f64() * 1e3,
        escalations: run.escalations,
        postcopy: run.postcopy,
        phases: run
            .phase
            .history()
            .iter()
            .map(|(p, d)| PhaseTime {
                phase: p.name().into(),
                round: match p {
                    SourcePhase::PreCopy(r) => Some(*r),
                    _ => None,
                },
                ms: d.as_secs_f64() * 1e3,
            })
            .collect(),
    }
}

impl Run<'_> {
    fn go(&mut self, next: SourcePhase) {
        self.phase.go(next, SourcePhase::can_go_to);
    }

    fn drive(
        &mut self,
        transport: &dyn Transport,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), MigrationError> {
        // Handshake: connect, authenticate, then describe the VM.
        let auth = AuthOptions {
            credentials: self.opts.auth.load()?,
            encrypt_data: self.opts.encrypt_data,
        };
        let conn = connect(transport, self.opts)?;
        self.aborts = std::iter::once(&conn.control)
            .chain(&conn.data)
            .map(|c| c.abort_handle())
            .collect();
        faults::hold("source-handshake");
        let conn = secure::client(conn, &auth)?;
        let (mut control, ctl_source, _) = conn.control.into_parts();
        let inbox = Inbox::spawn(ctl_source);
        let hello = Hello {
            layout: self.vm.layout().clone(),
            vcpus: self.vm.vcpu_count(),
            cpuid: self.vm.cpuid().to_vec(),
            tsc_khz: self.vm.tsc_khz(),
            streams: self.opts.streams.get() as u16,
            migration_id: self.opts.migration_id.clone(),
        };
        self.send(&mut *control, &Message::Hello(Box::new(hello)))?;
        inbox.wait_accept(
            "the destination's answer to the handshake",
            self.opts.reply_timeout,
        )?;
        let plane = {
            let timeout = self.opts.reply_timeout;
            let mut sent = 0u64;
            let mut send = |m: &Message| -> Result<(), MigrationError> {
                let frame = protocol::encode(m);
                control.send(&[&frame])?;
                control.flush()?;
                sent += frame.len() as u64;
                Ok(())
            };
            let mut wait = || inbox.wait("the destination's side of the data plane", timeout);
            let side = SourceSide {
                mode: self.opts.transport,
                destination: &self.opts.destination,
                memory: self.vm.ram_areas(),
                send: &mut send,
                wait: &mut wait,
            };
            let plane = dataplane::source_plane(side, conn.data)?;
            self.bytes_sent += sent;
            plane
        };
        self.transport_name = plane.name;
        self.registration = plane.registration;
        self.plane_probe = plane.probe;
        if let Some(why) = &plane.fallback {
            eprintln!("godwit: using TCP: {why}");
            self.fallback = Some(why.clone());
        } else if let Some(p) = &plane.probe {
            eprintln!(
                "godwit: using RDMA: it moved {:.0} MB/s in a {:.0} ms probe, TCP {:.0} MB/s \
                 (RDMA data is authenticated at set-up, not encrypted)",
                p.rdma_bytes_per_sec / 1e6,
                p.burst_ms,
                p.tcp_bytes_per_sec / 1e6
            );
        }
        self.aborts
            .extend(plane.channels.iter().map(|c| c.abort_handle()));
        // RDMA streams too: a send or flush waits at most as long as any answer.
        for c in &plane.channels {
            c.set_write_timeout(Some(self.opts.reply_timeout))?;
        }
        #[cfg(feature = "rdma")]
        let placement = plane.placement.map(std::sync::Arc::new);
        #[cfg(not(feature = "rdma"))]
        let placement = None;
        let sinks: Vec<Box<dyn FrameSink>> = plane
            .channels
            .into_iter()
            .map(|c| c.into_parts().0)
            .collect();
        let limiter = self.opts.max_bandwidth.map(RateLimiter::new);
        let mut pipeline = SendPipeline::new(
            self.vm.memory().clone(),
            sinks,
            self.opts.threads.get(),
            limiter,
            placement,
            self.opts.reply_timeout,
        );
        // Dropped before the pipeline: on any early return, a page worker blocked on a dead
        // link is woken before the pipeline waits for it.
        let _shutdown = ShutdownOnDrop(self.aborts.clone());

        let mut limits = self.opts.limits;
        if limits.allow_postcopy && self.transport_name != "tcp" {
            // RDMA places pages straight into pinned guest memory, which post-copy's
            // userfaultfd cannot see; the TCP plane is the one post-copy runs on.
            eprintln!(
                "godwit: post-copy runs on the TCP data plane only; it is off for this migration"
            );
            limits.allow_postcopy = false;
        }
        let mut postcopy = false;

        // Pre-copy.
        self.vm.set_dirty_logging(true)?;
        let layout = self.vm.layout().clone();
        if self.opts.compress == CompressMode::Auto {
            // How well this guest's pages compress, from a spread of them (a few ms), so round
            // 1 does not compress on an assumed ratio.
            let step = (layout.total_pages() / COMPRESSION_SAMPLE_PAGES).max(1) as usize;
            let all = DirtyBitmap::all(&layout);
            let spread = all.pages(&layout).step_by(step);
            if let Some((ratio, speed)) = forecast::compression_sample(self.vm.memory(), spread)? {
                self.estimates.compression_ratio = ratio;
                self.estimates.compress_bytes_per_sec = speed;
            }
        }
        let mut dirty = DirtyBitmap::all(&layout);
        let mut round = 1;
        self.go(SourcePhase::PreCopy(1));
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(MigrationError::Cancelled);
            }
            let compression = self.compression(round);
            let started = Instant::now();
            let pages = dirty.count();
            let interrupt = Interrupt {
                cancel,
                deadline: Some((self.started + self.deadline, self.deadline)),
                round,
            };
            let stats = self.send_round(
                &mut pipeline,
                &dirty,
                None,
                compression,
                &interrupt,
                progress,
            )?;
            match round {
                1 => faults::hold("source-round-1"),
                2 => faults::hold("source-round-2"),
                _ => {}
            }
            inbox.wait_applied(round, self.opts.reply_timeout)?;
            let took = started.elapsed();
            dirty = self.vm.take_dirty()?;
            let dirtied = dirty.count();
            self.estimates.record_round(
                stats.raw_bytes,
                (compression == Compression::None).then_some(stats.wire_bytes),
                took,
                dirtied * PAGE_SIZE,
            );
            self.estimates.record_compression(
                stats.compressed_raw,
                stats.compressed_wire,
                stats.compress_time,
            );
            self.record(round, pages, &stats, took, compression, dirtied);
            let standing = Standing {
                round,
                remaining: dirtied * PAGE_SIZE,
                sent: pages * PAGE_SIZE,
                elapsed: self.started.elapsed(),
                deadline: self.deadline,
                throttle: self.vm.throttle(),
            };
            match self.estimates.decide(&limits, &standing) {
                Decision::Continue => {
                    round += 1;
                    self.go(SourcePhase::PreCopy(round));
                }
                Decision::Throttle { percent, why } => {
                    let set = self.vm.set_throttle(percent)?;
                    eprintln!("godwit: throttling the guest to {set}% after round {round}: {why}");
                    self.escalations.push(Escalation {
                        round,
                        step: "throttle".into(),
                        detail: format!("to {set}%: {why}"),
                    });
                    round += 1;
                    self.go(SourcePhase::PreCopy(round));
                }
                Decision::Switchover { expected } => {
                    self.predicted = expected;
                    break;
                }
                Decision::PostCopy { why } => {
                    eprintln!("godwit: switching to post-copy after round {round}: {why}");
                    self.escalations.push(Escalation {
                        round,
                        step: "postcopy".into(),
                        detail: why,
                    });
                    self.predicted = self.estimates.fixed_pause;
                    postcopy = true;
                    break;
                }
                Decision::GiveUp(why) => return Err(MigrationError::NotConverged(why)),
            }
        }

        // Stop and copy: from here the guest is paused until it resumes somewhere.
        self.go(SourcePhase::StopAndCopy);
        let paused_at_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let pause = Instant::now();
        self.paused_at = Some(pause);
        self.vm.pause()?;
        // Paused, the guest needs no throttle; should the migration fail from here, it runs
        // on at full speed.
        self.vm.set_throttle(0)?;
        faults::hold("source-paused");
        // What the last pre-copy round left dirty, and what the guest wrote since.
        dirty.merge(&self.vm.take_dirty()?);
        let final_round = round + 1;
        // In post-copy the final round is empty: the stale pages follow once the VM runs on
        // the destination, which learns here which of its pages are stale.
        let (last, stale) = if postcopy {
            (DirtyBitmap::empty(&layout), std::mem::take(&mut dirty))
        } else {
            (std::mem::take(&mut dirty), DirtyBitmap::default())
        };
        let pages = last.count();
        let compression = self.compression(final_round);
        let interrupt = Interrupt {
            cancel,
            deadline: None,
            round: final_round,
        };
        let stats = self.send_round(
            &mut pipeline,
            &last,
            None,
            compression,
            &interrupt,
            &mut |_| {},
        )?;
        self.record(final_round, pages, &stats, pause.elapsed(), compression, 0);
        if postcopy {
            for m in postcopy::stale_messages(&stale) {
                self.send(&mut *control, &m)?;
            }
        }
        let t_pages = pause.elapsed();
        let state = self.vm.save()?;
        let t_save = pause.elapsed();
        self.send(
            &mut *control,
            &Message::Switchover {
                final_round,
                paused_at_unix_ns,
                state: Box::new(state),
                postcopy,
            },
        )?;
        self.go(SourcePhase::AwaitRestored);
        match inbox.wait("the destination to load the VM", self.opts.reply_timeout)? {
            Message::Restored => {}
            m => {
                return Err(MigrationError::Unexpected {
                    expected: "Restored",
                    got: m.name(),
                })
            }
        }
        let t_restored = pause.elapsed();

        // The point of no return.
        self.go(SourcePhase::Committed);
        self.send(&mut *control, &Message::Commit)?;
        faults::hold("source-committed");
        match inbox.wait("the destination to resume the VM", self.opts.reply_timeout)? {
            Message::Resumed => {}
            m => {
                return Err(MigrationError::Unexpected {
                    expected: "Resumed",
                    got: m.name(),
                })
            }
        }
        self.downtime = pause.elapsed();
        self.pause_steps = PauseSteps {
            last_pages_ms: t_pages.as_secs_f64() * 1e3,
            save_state_ms: (t_save - t_pages).as_secs_f64() * 1e3,
            restore_ms: (t_restored - t_save).as_secs_f64() * 1e3,
            commit_ms: (self.downtime - t_restored).as_secs_f64() * 1e3,
        };
        if postcopy {
            self.go(SourcePhase::PostCopy);
            self.postcopy(
                &mut pipeline,
                &mut *control,
                &inbox,
                (&stale, final_round + 1),
                progress,
            )?;
        }
        Ok(())
    }

    /// Post-copy: pushes every stale page in one background round while answering the
    /// destination's page requests, until it reports every page arrived. The guest stays
    /// paused here, so a page read now is the page the destination needs.
    fn postcopy(
        &mut self,
        pipeline: &mut SendPipeline,
        control: &mut dyn FrameSink,
        inbox: &Inbox,
        (stale, round): (&DirtyBitmap, u32),
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), MigrationError> {
        // Paused here, the guest dirties nothing: the ETA is the push alone.
        self.estimates.dirty_bytes_per_sec = 0.0;
        let started = Instant::now();
        let layout = self.vm.layout().clone();
        let memory = self.vm.memory().clone();
        let sent = SentPages::new(&layout);
        let push_ended = AtomicBool::new(false);
        let timeout = self.opts.reply_timeout;
        let aborts = self.aborts.clone();
        let compression = self.compression(round);
        faults::hold("source-postcopy");
        let (pushed, served) = std::thread::scope(|s| {
            let server = s.spawn(|| {
                postcopy::serve_requests(
                    control,
                    &inbox.0,
                    &memory,
                    (stale, &layout),
                    &sent,
                    &push_ended,
                    timeout,
                )
            });
            // After the commit nothing cancels: finishing is the only way forward.
            let never = AtomicBool::new(false);
            let interrupt = Interrupt {
                cancel: &never,
                deadline: None,
                round,
            };
            let pushed = self.send_round(
                pipeline,
                stale,
                Some(&sent),
                compression,
                &interrupt,
                progress,
            );
            push_ended.store(true, Ordering::Relaxed);
            if pushed.is_err() {
                // The server would wait for an answer that cannot come.
                for a in &aborts {
                    let _ = a.shutdown();
                }
            }
            let served = server.join().unwrap_or(Err(MigrationError::PipelineClosed));
            (pushed, served)
        });
        let stats = pushed?;
        let served = served?;
        let took = started.elapsed();
        self.record(round, stats.pages, &stats, took, compression, 0);
        let f = served.figures;
        self.postcopy = Some(PostCopyReport {
            stale_pages: stale.count(),
            urgent_pages: served.urgent_pages,
            ms: took.as_secs_f64() * 1e3,
            faults: f.faults,
            fetched: f.fetched,
            mean_wait_us: f.mean_wait_us,
            max_wait_us: f.max_wait_us,
        });
        Ok(())
    }

    fn send(&mut self, sink: &mut dyn FrameSink, msg: &Message) -> Result<(), MigrationError> {
        let frame = protocol::encode(msg);
        sink.send(&[&frame])?;
        sink.flush()?;
        self.bytes_sent += frame.len() as u64;
        Ok(())
    }

    /// Whether round `round` compresses; in `auto`, a change is an escalation step (or a
    /// step back) and goes in the report with the rates that decided it.
    fn compression(&mut self, round: u32) -> Compression {
        let on = match self.opts.compress {
            CompressMode::On => true,
            CompressMode::Off => false,
            CompressMode::Auto => {
                let on = self.estimates.compression_pays(self.opts.threads.get());
                let was = self.rounds.last().is_some_and(|r| r.compressed);
                if on != was && round > 1 {
                    let e = &self.estimates;
                    self.escalations.push(Escalation {
                        round,
                        step: if on { "compress" } else { "stop compressing" }.into(),
                        detail: format!(
                            "link {:.0} MB/s raw; lz4 {:.0} MB/s per thread at ratio {:.2}",
                            e.link_bytes_per_sec / 1e6,
                            e.compress_bytes_per_sec / 1e6,
                            e.compression_ratio
                        ),
                    });
                }
                on
            }
        };
        if on {
            Compression::Lz4
        } else {
            Compression::None
        }
    }

    /// Sends the pages marked in `dirty`, except those in `skip`, as one round.
    fn send_round(
        &mut self,
        pipeline: &mut SendPipeline,
        dirty: &DirtyBitmap,
        skip: Option<&SentPages>,
        compression: Compression,
        interrupt: &Interrupt<'_>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<super::pipeline::BatchStats, MigrationError> {
        let round = interrupt.round;
        let layout = self.vm.layout().clone();
        let total_pages = dirty.count();
        let started = Instant::now();
        let mut last_report = started;
        let sent_before = self.bytes_sent;
        let dirty_rate = self.estimates.dirty_bytes_per_sec;
        let throttle = self.vm.throttle();
        let estimates = self.estimates.clone();
        let max_downtime = self.opts.limits.max_downtime;
        let deadline_at = self.started + self.deadline;
        let eta = &mut self.eta;
        let pages = dirty
            .pages(&layout)
            .filter(|&gpa| !skip.is_some_and(|s| s.contains(gpa)));
        let stats = pipeline.send_round(round, pages, compression, interrupt, |s| {
            let now = Instant::now();
            if now.duration_since(last_report) < PROGRESS_INTERVAL {
                return;
            }
            last_report = now;
            let secs = now.duration_since(started).as_secs_f64().max(1e-6);
            let rate = (s.pages * PAGE_SIZE) as f64 / secs;
            let remaining = total_pages.saturating_sub(s.pages) * PAGE_SIZE;
            // The rest of this round, the rounds the rates still call for, the pause; or,
            // if pre-copy does not converge at these rates, the deadline.
            let round_left = remaining as f64 / rate.max(1.0);
            let dirty_then = (dirty_rate * (secs + round_left)) as u64;
            let estimate = match estimates.precopy_time(dirty_then, max_downtime) {
                Some(t) => round_left + (t + max_downtime).as_secs_f64(),
                None => deadline_at.saturating_duration_since(now).as_secs_f64(),
            };
            let basis = Basis {
                dirty_bytes_per_sec: dirty_rate,
                page_bytes_per_sec: rate,
            };
            let (eta_secs, eta_rose_because) = eta.update(now, estimate, basis);
            progress(&Progress {
                round,
                transferred_bytes: sent_before + s.wire_bytes,
                remaining_bytes: remaining,
                rate_bytes_per_sec: rate,
                dirty_bytes_per_sec: dirty_rate,
                eta_secs,
                eta_rose_because,
                throttle_percent: throttle,
            });
        })?;
        self.bytes_sent += stats.wire_bytes;
        Ok(stats)
    }

    fn record(
        &mut self,
        round: u32,
        pages: u64,
        stats: &super::pipeline::BatchStats,
        took: Duration,
        compression: Compression,
        dirtied: u64,
    ) {
        let secs = took.as_secs_f64().max(1e-6);
        self.rounds.push(RoundReport {
            round,
            pages,
            zero_pages: stats.zero_pages,
            wire_bytes: stats.wire_bytes,
            ms: took.as_secs_f64() * 1e3,
            compressed: compression == Compression::Lz4,
            compression_ratio: if stats.compressed_wire > 0 {
                stats.compressed_raw as f64 / stats.compressed_wire as f64
            } else {
                1.0
            },
            page_bytes_per_sec: stats.raw_bytes as f64 / secs,
            dirtied_pages: dirtied,
            dirty_bytes_per_sec: (dirtied * PAGE_SIZE) as f64 / secs,
            throttle_percent: self.vm.throttle(),
        });
    }
}
