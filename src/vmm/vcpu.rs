//! vCPU threads. Each vCPU is owned by one thread that runs `KVM_RUN` and serves requests
//! (pause, resume, save, restore, exit) sent to it over a channel, so no vCPU file descriptor is
//! ever shared. A request to a running vCPU is followed by a signal that makes `KVM_RUN` return:
//! the signal handler sets `immediate_exit` in the vCPU's `kvm_run` page, which also covers a
//! signal that arrives while the thread is outside `KVM_RUN` handling an exit.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::devices::{Serial, DEBUG_EXIT_PORT};
use super::state::{self, VcpuState};
use super::throttle::Level;
use super::{VmEvent, VmmError};

/// How long a vCPU may take to answer a request before the VM is declared stuck.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The devices that vCPU threads reach through port I/O.
#[derive(Debug)]
pub struct IoBus {
    /// COM1.
    pub serial: Mutex<Serial>,
}

enum Request {
    Run,
    Pause,
    Save,
    Restore(Box<VcpuState>),
    Exit,
}

enum Reply {
    Done,
    Saved(Box<VcpuState>),
}

type Requests = Receiver<(Request, Sender<Result<Reply, VmmError>>)>;

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's mapped `kvm_run` page, set by the vCPU thread
            // before it first enters KVM_RUN and valid until the thread ends; a byte store is
            // async-signal-safe, and KVM reads the flag on its next entry.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VmmError> {
    static INSTALLED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(VmmError::Signal)
}

/// The VM's handle on one vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    requests: Sender<(Request, Sender<Result<Reply, VmmError>>)>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread that owns `fd`; the vCPU starts paused.
    pub fn spawn(
        id: u8,
        fd: VcpuFd,
        io: Arc<IoBus>,
        msrs: Arc<[u32]>,
        throttle: Arc<Level>,
        events: Sender<VmEvent>,
    ) -> Result<Self, VmmError> {
        let (tx, rx) = bounded(4);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                VcpuThread {
                    id,
                    fd,
                    io,
                    msrs,
                    throttle,
                    events,
                }
                .run(rx)
            })
            .map_err(VmmError::Thread)?;
        Ok(Self {
            id,
            requests: tx,
            thread: Some(thread),
        })
    }

    fn request(&self, req: Request) -> Result<Reply, VmmError> {
        let (reply_tx, reply_rx) = bounded(1);
        self.requests
            .send((req, reply_tx))
            .map_err(|_| VmmError::VcpuGone(self.id))?;
        self.kick();
        reply_rx
            .recv_timeout(REQUEST_TIMEOUT)
            .map_err(|_| VmmError::VcpuGone(self.id))?
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the pthread handle is valid while the JoinHandle exists (the thread is
            // joined only in `exit`), and the kick signal has a handler installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// What kicks this vCPU from another thread: the throttle's ticker, which the VM stops
    /// before it ends any vCPU thread (so the handle never outlives its thread).
    pub fn kicker(&self) -> Option<Kicker> {
        self.thread.as_ref().map(|t| Kicker(t.as_pthread_t()))
    }

    /// Lets the vCPU run.
    pub fn resume(&self) -> Result<(), VmmError> {
        self.request(Request::Run).map(|_| ())
    }

    /// Stops the vCPU; returns once it is outside `KVM_RUN` and will stay there.
    pub fn pause(&self) -> Result<(), VmmError> {
        self.request(Request::Pause).map(|_| ())
    }

    /// Reads the vCPU's state; the vCPU must be paused.
    pub fn save(&self) -> Result<VcpuState, VmmError> {
        match self.request(Request::Save)? {
            Reply::Saved(s) => Ok(*s),
            Reply::Done => Err(VmmError::VcpuGone(self.id)),
        }
    }

    /// Loads a state saved on another host; the vCPU must be paused.
    pub fn restore(&self, state: VcpuState) -> Result<(), VmmError> {
        self.request(Request::Restore(Box::new(state))).map(|_| ())
    }

    /// Ends the thread.
    pub fn exit(&mut self) {
        let _ = self.request(Request::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Kicks one vCPU thread out of `KVM_RUN` (see [`VcpuHandle::kicker`]).
#[derive(Clone, Copy, Debug)]
pub struct Kicker(libc::pthread_t);

impl Kicker {
    pub fn kick(self) {
        // SAFETY: the VM joins the only thread that kicks (the throttle ticker) before it
        // joins any vCPU thread, so the pthread handle is valid; the kick signal has a handler.
        unsafe { libc::pthread_kill(self.0, kick_signal()) };
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.exit();
    }
}

struct VcpuThread {
    id: u8,
    fd: VcpuFd,
    io: Arc<IoBus>,
    /// The MSRs saved with the vCPU state.
    msrs: Arc<[u32]>,
    throttle: Arc<Level>,
    events: Sender<VmEvent>,
}

impl VcpuThread {
    fn run(mut self, requests: Requests) {
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        let mut running = false;
        loop {
            if !running {
                let Ok((req, reply)) = requests.recv() else {
                    break;
                };
                if !self.answer(req, reply, &mut running) {
                    break;
                }
                continue;
            }
            match self.fd.run() {
                Ok(exit) => {
                    if let Some(mut event) = handle_exit(self.id, exit, &self.io) {
                        running = false;
                        if let VmEvent::Crashed(why) = &mut event {
                            why.push_str(&self.where_it_stopped());
                        }
                        let _ = self.events.send(event);
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    if !self.answer_pending(&requests, &mut running) {
                        break;
                    }
                    // Throttled: sit out this period's share, answering requests meanwhile.
                    let sit_out = self.throttle.sit_out();
                    if running && !sit_out.is_zero() {
                        if let Ok((req, reply)) = requests.recv_timeout(sit_out) {
                            if !self.answer(req, reply, &mut running)
                                || !self.answer_pending(&requests, &mut running)
                            {
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    running = false;
                    let _ = self.events.send(VmEvent::Crashed(format!(
                        "vCPU {} KVM_RUN failed: {e}",
                        self.id
                    )));
                }
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Where a crashed vCPU stood, for the crash report: without it a triple fault says nothing
    /// about which instruction, stack or page tables the guest had.
    fn where_it_stopped(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                " at rip {:#x} (cs {:#x}, ring {}), rsp {:#x}, rflags {:#x}, cr0 {:#x}, cr2 {:#x}, \
                 cr3 {:#x}, cr4 {:#x}, efer {:#x}",
                r.rip,
                s.cs.selector,
                s.cs.dpl,
                r.rsp,
                r.rflags,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer
            ),
            (Err(e), _) | (_, Err(e)) => format!(" (its registers could not be read: {e})"),
        }
    }

    /// Serves `req` and replies; false when the thread must end.
    fn answer(
        &mut self,
        req: Request,
        reply: Sender<Result<Reply, VmmError>>,
        running: &mut bool,
    ) -> bool {
        match self.serve(req, running) {
            Some(r) => {
                let _ = reply.send(r);
                true
            }
            None => {
                let _ = reply.send(Ok(Reply::Done));
                false
            }
        }
    }

    /// Serves every request already queued; false when the thread must end.
    fn answer_pending(&mut self, requests: &Requests, running: &mut bool) -> bool {
        while let Ok((req, reply)) = requests.try_recv() {
            if !self.answer(req, reply, running) {
                return false;
            }
        }
        true
    }

    /// Serves one request; `None` means the thread must end.
    fn serve(&mut self, req: Request, running: &mut bool) -> Option<Result<Reply, VmmError>> {
        Some(match req {
            Request::Run => {
                *running = true;
                Ok(Reply::Done)
            }
            Request::Pause => {
                *running = false;
                Ok(Reply::Done)
            }
            Request::Save => {
                state::save_vcpu(&self.fd, self.id, &self.msrs).map(|s| Reply::Saved(Box::new(s)))
            }
            Request::Restore(s) => state::restore_vcpu(&self.fd, &s).map(|()| Reply::Done),
            Request::Exit => return None,
        })
    }
}

/// Handles one exit; returns an event when the VM must stop.
fn handle_exit(id: u8, exit: VcpuExit<'_>, io: &IoBus) -> Option<VmEvent> {
    match exit {
        VcpuExit::IoOut(port, data) if Serial::claims(port) => {
            if let (Ok(mut s), Some(&b)) = (io.serial.lock(), data.first()) {
                s.write(port, b);
            }
            None
        }
        VcpuExit::IoOut(DEBUG_EXIT_PORT, data) => {
            Some(VmEvent::DebugExit(data.first().copied().unwrap_or(0)))
        }
        VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) | VcpuExit::Hlt => None,
        VcpuExit::IoIn(port, data) => {
            let v = if Serial::claims(port) {
                io.serial.lock().map(|s| s.read(port)).unwrap_or(0xff)
            } else {
                0xff
            };
            data.fill(v);
            None
        }
        VcpuExit::MmioRead(_, data) => {
            data.fill(0xff);
            None
        }
        VcpuExit::Shutdown => Some(VmEvent::Crashed(format!(
            "vCPU {id}: the guest triple-faulted (KVM_EXIT_SHUTDOWN)"
        ))),
        other => Some(VmEvent::Crashed(format!(
            "vCPU {id}: unexpected exit {other:?}"
        ))),
    }
}
