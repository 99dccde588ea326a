//! The owner of one running VM: the only code that touches the [`Vm`] after it starts. It
//! serves the API socket and the VM's own events one at a time, so a migration, a stop and a
//! guest exit can never race. Only `cancel` and `status` are answered beside it, from shared
//! flags, so they work while a migration runs.

use std::num::NonZeroUsize;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{select, unbounded, Sender};
use godwit_transport::Transport;

use crate::api::{Connection, Event, MigrateRequest, Request, Status};
use crate::migration::forecast;
use crate::migration::policy::Limits;
use crate::migration::report::{Outcome, Report};
use crate::migration::source::{self, SendOptions};
use crate::vmm::{Vm, VmEvent};

/// Why the agent stopped.
#[derive(Debug)]
pub enum AgentExit {
    /// The guest wrote this status to the debug-exit port.
    GuestExit(u8),
    /// The guest or a vCPU failed.
    Crashed(String),
    /// The VM moved to another host and was released here.
    Migrated(Box<Report>),
    /// An operator stopped the VM.
    Stopped,
}

/// Why the API socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket could not be created.
    #[error("cannot listen on the API socket {0}: {1}; check the directory exists and no other VM uses the path")]
    Bind(PathBuf, std::io::Error),
}

/// Removes the socket file when the agent ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves `vm` until it exits, is stopped, or migrates away.
pub fn serve(
    vm: Vm,
    api: Option<&Path>,
    transport: &dyn Transport,
) -> Result<AgentExit, AgentError> {
    let cancel = Arc::new(AtomicBool::new(false));
    let status = Arc::new(Mutex::new(Status {
        state: "running".into(),
        memory_bytes: vm.layout().total_bytes(),
        vcpus: vm.vcpu_count(),
        pid: std::process::id(),
    }));
    let (requests_tx, requests) = unbounded::<(Request, Connection)>();
    let _socket = match api {
        Some(path) => {
            // A socket left by a VM process that died is stale; a live one refuses connections
            // only if nobody listens, so removing a path in use is prevented by the check.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(AgentError::Bind(
                    path.to_path_buf(),
                    std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another VM process answers there",
                    ),
                ));
            }
            let _ = std::fs::remove_file(path);
            let listener =
                UnixListener::bind(path).map_err(|e| AgentError::Bind(path.to_path_buf(), e))?;
            let (cancel, status) = (cancel.clone(), status.clone());
            std::thread::spawn(move || accept_loop(listener, requests_tx, cancel, status));
            Some(SocketFile(path.to_path_buf()))
        }
        None => None,
    };
    let mut vm = vm;
    loop {
        select! {
            recv(vm.events()) -> e => match e {
                Ok(VmEvent::DebugExit(code)) => return Ok(AgentExit::GuestExit(code)),
                Ok(VmEvent::Crashed(why)) => return Ok(AgentExit::Crashed(why)),
                Err(_) => return Ok(AgentExit::Crashed("the vCPU threads are gone".into())),
            },
            recv(requests) -> r => {
                let Ok((req, mut conn)) = r else { continue };
                match req {
                    Request::Migrate(_) if state(&status) == "paused" => {
                        conn.send(&Event::Error { message: IN_DOUBT.into() });
                    }
                    Request::Migrate(m) => {
                        set_state(&status, "migrating");
                        cancel.store(false, Ordering::Relaxed);
                        let report = migrate(&mut vm, transport, &m, &cancel, &mut conn);
                        conn.send(&Event::Report(Box::new(report.clone())));
                        match (report.outcome, report.vm_on_source) {
                            (Outcome::Completed, _) => return Ok(AgentExit::Migrated(Box::new(report))),
                            (_, true) => set_state(&status, "running"),
                            (_, false) => set_state(&status, "paused"),
                        }
                    }
                    Request::Forecast { .. } if state(&status) == "paused" => {
                        conn.send(&Event::Error { message: IN_DOUBT.into() });
                    }
                    Request::Forecast { migrate, sample_ms } => {
                        cancel.store(false, Ordering::Relaxed);
                        let opts = send_options(&migrate);
                        let sample = Duration::from_millis(sample_ms.max(100));
                        conn.send(&match forecast::forecast(&mut vm, transport, &opts, sample, &cancel) {
                            Ok(f) => Event::Forecast(Box::new(f)),
                            Err(e) => Event::Error {
                                message: format!("the forecast failed: {e}; nothing moved, the VM runs here"),
                            },
                        });
                    }
                    Request::Stop => {
                        conn.send(&Event::Ok);
                        return Ok(AgentExit::Stopped);
                    }
                    Request::Resume => {
                        if state(&status) != "paused" {
                            conn.send(&Event::Error {
                                message: format!(
                                    "the VM is {}, not paused in doubt; nothing to resume",
                                    state(&status)
                                ),
                            });
                            continue;
                        }
                        match vm.set_dirty_logging(false).and_then(|()| vm.resume()) {
                            Ok(()) => {
                                set_state(&status, "running");
                                conn.send(&Event::Ok);
                            }
                            Err(e) => {
                                conn.send(&Event::Error {
                                    message: format!("resuming the VM failed: {e}"),
                                });
                            }
                        }
                    }
                    Request::Status | Request::Cancel => {}
                }
            }
        }
    }
}

/// Why a VM left paused in doubt does not migrate again.
const IN_DOUBT: &str = "the VM is paused after a migration that ended in doubt: check with \
    `godwit status` whether the destination runs it; if it does, `godwit stop` this copy, if \
    not, `godwit resume` it";

fn state(status: &Mutex<Status>) -> String {
    status.lock().map(|s| s.state.clone()).unwrap_or_default()
}

fn set_state(status: &Mutex<Status>, state: &str) {
    if let Ok(mut s) = status.lock() {
        s.state = state.into();
    }
}

fn migrate(
    vm: &mut Vm,
    transport: &dyn Transport,
    m: &MigrateRequest,
    cancel: &AtomicBool,
    conn: &mut Connection,
) -> Report {
    let opts = send_options(m);
    // A client that goes away does not stop the migration; it just sees no more progress.
    source::migrate(vm, transport, &opts, cancel, &mut |p| {
        conn.send(&Event::Progress(p.clone()));
    })
}

fn send_options(m: &MigrateRequest) -> SendOptions {
    SendOptions {
        destination: m.to.clone(),
        streams: NonZeroUsize::new(m.streams).unwrap_or(NonZeroUsize::MIN),
        threads: NonZeroUsize::new(m.threads).unwrap_or(NonZeroUsize::MIN),
        compress: m.compress,
        limits: Limits {
            max_downtime: Duration::from_millis(m.max_downtime_ms),
            max_rounds: m.max_rounds.map(|r| r.max(1)),
            deadline: m.deadline_ms.map(Duration::from_millis),
            allow_throttle: m.allow_throttle,
            allow_postcopy: m.allow_postcopy,
        },
        max_bandwidth: m.max_bandwidth,
        transport: m.transport,
        reply_timeout: Duration::from_millis(m.reply_timeout_ms.max(1)),
        auth: m.auth.clone(),
        encrypt_data: m.encrypt_data,
        migration_id: m.migration_id.clone(),
    }
}

fn accept_loop(
    listener: UnixListener,
    owner: Sender<(Request, Connection)>,
    cancel: Arc<AtomicBool>,
    status: Arc<Mutex<Status>>,
) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let Ok(mut conn) = Connection::new(stream) else {
            continue;
        };
        match conn.request() {
            Ok(Request::Cancel) => {
                let migrating = status
                    .lock()
                    .map(|s| s.state == "migrating")
                    .unwrap_or(false);
                if migrating {
                    cancel.store(true, Ordering::Relaxed);
                    conn.send(&Event::Ok);
                } else {
                    conn.send(&Event::Error {
                        message: "no migration is in progress".into(),
                    });
                }
            }
            Ok(Request::Status) => {
                let s = status.lock().map(|s| s.clone());
                if let Ok(s) = s {
                    conn.send(&Event::Status(s));
                }
            }
            Ok(req) => {
                if owner.send((req, conn)).is_err() {
                    break;
                }
            }
            Err(message) => {
                conn.send(&Event::Error { message });
            }
        }
    }
}
