//! Completion queues: polling with deadlines, typed completion errors.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_sys as sys;

use super::device::Context;
use super::error::{RdmaError, Result};

pub(crate) struct CqInner {
    cq: NonNull<sys::ibv_cq>,
    depth: u32,
    ctx: Context,
}

// SAFETY: ibv_poll_cq and ibv_destroy_cq are thread-safe verbs (providers
// lock the CQ); the pointer is destroyed only in Drop.
unsafe impl Send for CqInner {}
// SAFETY: see Send.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_cq, destroyed once; every QP using it
        // holds an Arc to this value, so none is alive. The context is a
        // field, released after this.
        let rc = unsafe { sys::ibv_destroy_cq(self.cq.as_ptr()) };
        if rc != 0 {
            eprintln!(
                "godwit rdma: ibv_destroy_cq on {} failed: {rc}",
                self.ctx.name()
            );
        }
    }
}

/// A completion queue. Cheap to clone.
#[derive(Clone)]
pub struct CompletionQueue {
    pub(crate) inner: Arc<CqInner>,
}

impl fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("device", &self.inner.ctx.name())
            .field("depth", &self.inner.depth)
            .finish()
    }
}

/// A work completion's status: the code and libibverbs' string for it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WcStatus(pub u32);

impl WcStatus {
    /// Success.
    pub const SUCCESS: WcStatus = WcStatus(sys::ibv_wc_status::IBV_WC_SUCCESS);
    /// Local length error (e.g. a message larger than the posted receive).
    pub const LOC_LEN_ERR: WcStatus = WcStatus(sys::ibv_wc_status::IBV_WC_LOC_LEN_ERR);
    /// Local protection error (a bad lkey or range).
    pub const LOC_PROT_ERR: WcStatus = WcStatus(sys::ibv_wc_status::IBV_WC_LOC_PROT_ERR);
    /// Flushed: the QP was already in the error state.
    pub const WR_FLUSH_ERR: WcStatus = WcStatus(sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR);
    /// The peer refused the access (wrong rkey, range or rights).
    pub const REM_ACCESS_ERR: WcStatus = WcStatus(sys::ibv_wc_status::IBV_WC_REM_ACCESS_ERR);
    /// The peer failed the operation.
    pub const REM_OP_ERR: WcStatus = WcStatus(sys::ibv_wc_status::IBV_WC_REM_OP_ERR);
    /// Transport retries exhausted: the peer does not answer.
    pub const RETRY_EXC_ERR: WcStatus = WcStatus(sys::ibv_wc_status::IBV_WC_RETRY_EXC_ERR);
    /// Receiver-not-ready retries exhausted.
    pub const RNR_RETRY_EXC_ERR: WcStatus = WcStatus(sys::ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR);

    /// libibverbs' description (`ibv_wc_status_str`).
    pub fn as_str(self) -> String {
        // SAFETY: ibv_wc_status_str accepts any value and returns a static
        // NUL-terminated string.
        unsafe {
            let p = sys::ibv_wc_status_str(self.0);
            if p.is_null() {
                format!("status {}", self.0)
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }

    /// Whether the peer is gone or unreachable.
    pub fn is_peer_failure(self) -> bool {
        self == Self::RETRY_EXC_ERR || self == Self::RNR_RETRY_EXC_ERR
    }

    /// What the operator should do about it.
    pub fn hint(self) -> &'static str {
        match self {
            Self::REM_ACCESS_ERR => {
                "the peer refused the access: wrong rkey or address, a range outside the \
                 peer's region, or a region without REMOTE_WRITE; the connection is now broken"
            }
            Self::RETRY_EXC_ERR => {
                "the peer stopped answering (process died, queue pair destroyed, or link \
                 down); reconnect or fall back to --transport tcp"
            }
            Self::RNR_RETRY_EXC_ERR => {
                "the peer posted no receive buffer in time; the receiver must keep receives \
                 posted (or use rnr_retry 7)"
            }
            Self::WR_FLUSH_ERR => {
                "the queue pair had already failed and this request was flushed: look for the \
                 first completion error; create a new queue pair"
            }
            Self::LOC_LEN_ERR => {
                "a message was longer than the receive buffer posted for it (or than the \
                 port's max message size)"
            }
            Self::LOC_PROT_ERR => {
                "a scatter/gather entry is outside a memory region of this protection domain \
                 (a bug in the caller)"
            }
            Self::REM_OP_ERR => {
                "the peer could not carry out the request (e.g. its receive buffer was too small)"
            }
            _ => "the queue pair is now in the error state; create a new one and reconnect",
        }
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.as_str(), self.0)
    }
}

impl fmt::Debug for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WcStatus({self})")
    }
}

/// What kind of work request completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    /// A SEND (with or without immediate).
    Send,
    /// An RDMA WRITE (with or without immediate), at the sender.
    RdmaWrite,
    /// An RDMA READ.
    RdmaRead,
    /// A receive consumed by a SEND.
    Recv,
    /// A receive consumed by an RDMA WRITE with immediate.
    RecvRdmaWithImm,
    /// A failed request: verbs do not report the opcode of a completion
    /// with an error status (the raw, meaningless value is kept).
    NotReported(u32),
    /// Anything else (raw `ibv_wc_opcode`).
    Other(u32),
}

impl WcOpcode {
    fn from_raw(v: sys::ibv_wc_opcode::Type) -> WcOpcode {
        use sys::ibv_wc_opcode::*;
        match v {
            IBV_WC_SEND => WcOpcode::Send,
            IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
            IBV_WC_RDMA_READ => WcOpcode::RdmaRead,
            IBV_WC_RECV => WcOpcode::Recv,
            IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
            other => WcOpcode::Other(other),
        }
    }
}

impl fmt::Display for WcOpcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WcOpcode::Send => f.write_str("SEND"),
            WcOpcode::RdmaWrite => f.write_str("RDMA WRITE"),
            WcOpcode::RdmaRead => f.write_str("RDMA READ"),
            WcOpcode::Recv => f.write_str("RECV"),
            WcOpcode::RecvRdmaWithImm => f.write_str("RECV (RDMA WRITE with immediate)"),
            WcOpcode::NotReported(_) => f.write_str("opcode not reported for failed requests"),
            WcOpcode::Other(v) => write!(f, "opcode {v}"),
        }
    }
}

/// One work completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkCompletion {
    /// The id given when the request was posted.
    pub wr_id: u64,
    /// Success or the error.
    pub status: WcStatus,
    /// The kind of request (meaningful only on success).
    pub opcode: WcOpcode,
    /// For receives: bytes received (for WRITE with immediate, bytes written).
    pub byte_len: u32,
    /// The immediate value, in host byte order, when one came with it.
    pub imm: Option<u32>,
    /// The local QP number.
    pub qp_num: u32,
    /// Provider-specific error detail.
    pub vendor_err: u32,
}

impl WorkCompletion {
    /// Whether it succeeded.
    pub fn is_ok(&self) -> bool {
        self.status == WcStatus::SUCCESS
    }

    /// `Ok(self)` on success, else [`RdmaError::Completion`].
    pub fn into_result(self) -> Result<WorkCompletion> {
        if self.is_ok() {
            Ok(self)
        } else {
            Err(RdmaError::Completion {
                status: self.status,
                opcode: self.opcode,
                wr_id: self.wr_id,
                vendor_err: self.vendor_err,
            })
        }
    }

    fn from_raw(wc: &sys::ibv_wc) -> WorkCompletion {
        let with_imm = wc.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
        let imm = with_imm.then(|| {
            // SAFETY: with IBV_WC_WITH_IMM set the union holds imm_data; any
            // bit pattern is a valid u32 anyway.
            u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })
        });
        WorkCompletion {
            wr_id: wc.wr_id,
            status: WcStatus(wc.status),
            opcode: if wc.status == sys::ibv_wc_status::IBV_WC_SUCCESS {
                WcOpcode::from_raw(wc.opcode)
            } else {
                WcOpcode::NotReported(wc.opcode)
            },
            byte_len: wc.byte_len,
            imm,
            qp_num: wc.qp_num,
            vendor_err: wc.vendor_err,
        }
    }
}

/// Entries fetched per `ibv_poll_cq` call.
const POLL_BATCH: usize = 16;

impl Context {
    /// Creates a completion queue with room for at least `depth` entries.
    pub fn create_cq(&self, depth: u32) -> Result<CompletionQueue> {
        let cqe = libc::c_int::try_from(depth)
            .map_err(|_| RdmaError::InvalidArgument(format!("CQ depth {depth}")))?;
        // SAFETY: the context is open; no completion channel; the CQ is
        // destroyed in CqInner::drop.
        let cq = unsafe {
            sys::ibv_create_cq(
                self.as_ptr(),
                cqe,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        let cq = NonNull::new(cq).ok_or_else(|| {
            RdmaError::verbs(
                "ibv_create_cq",
                io::Error::last_os_error(),
                "the depth may exceed the device's max_cqe (`ibv_devinfo -v`)",
            )
        })?;
        // SAFETY: a valid CQ; `cqe` is a plain field set by the provider.
        let actual = unsafe { (*cq.as_ptr()).cqe };
        Ok(CompletionQueue {
            inner: Arc::new(CqInner {
                cq,
                depth: u32::try_from(actual).unwrap_or(depth),
                ctx: self.clone(),
            }),
        })
    }
}

impl CompletionQueue {
    /// The number of entries it holds.
    pub fn depth(&self) -> u32 {
        self.inner.depth
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_cq {
        self.inner.cq.as_ptr()
    }

    /// Polls without waiting: appends up to `max` completions (successful or
    /// not) to `out` and returns how many.
    pub fn poll(&self, out: &mut Vec<WorkCompletion>, max: usize) -> Result<usize> {
        let mut total = 0;
        while total < max {
            // SAFETY: ibv_wc is a plain C struct (with a union of integers)
            // for which all-zero bytes are valid.
            let mut wcs: [sys::ibv_wc; POLL_BATCH] = unsafe { std::mem::zeroed() };
            let want = (max - total).min(POLL_BATCH) as libc::c_int;
            // SAFETY: the CQ is alive (we hold it) and `wcs` has room for
            // `want` entries.
            let n = unsafe { sys::ibv_poll_cq(self.as_ptr(), want, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(RdmaError::verbs(
                    "ibv_poll_cq",
                    io::Error::from_raw_os_error(n.abs()),
                    "the completion queue overran or the device failed; the connection must be rebuilt",
                ));
            }
            let n = n as usize;
            out.extend(wcs[..n].iter().map(WorkCompletion::from_raw));
            total += n;
            if n < want as usize {
                break;
            }
        }
        Ok(total)
    }

    /// Waits until `wanted` successful completions arrived, or returns the
    /// first failed one as [`RdmaError::Completion`], or
    /// [`RdmaError::Timeout`] after `timeout`. Never waits longer.
    ///
    /// Busy-polls at first, then yields, then sleeps briefly between polls,
    /// so that a long wait does not burn a CPU that (on soft-RoCE) the
    /// kernel needs to move the data.
    pub fn wait(
        &self,
        wanted: usize,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Vec<WorkCompletion>> {
        let mut out = Vec::with_capacity(wanted);
        self.wait_into(&mut out, wanted, timeout, what)?;
        Ok(out)
    }

    /// Like [`CompletionQueue::wait`], appending to `out`; on error `out`
    /// keeps the successful completions that came before the failed one.
    pub fn wait_into(
        &self,
        out: &mut Vec<WorkCompletion>,
        wanted: usize,
        timeout: Duration,
        what: &'static str,
    ) -> Result<()> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut got = 0usize;
        let mut idle: u32 = 0;
        let mut batch = Vec::with_capacity(POLL_BATCH);
        while got < wanted {
            batch.clear();
            let n = self.poll(&mut batch, wanted - got)?;
            for wc in batch.drain(..) {
                let wc = wc.into_result()?;
                out.push(wc);
                got += 1;
            }
            if n > 0 {
                idle = 0;
                continue;
            }
            if Instant::now() >= deadline {
                return Err(RdmaError::Timeout {
                    what,
                    waited: start.elapsed(),
                    got,
                    wanted,
                });
            }
            idle = idle.saturating_add(1);
            if idle < 64 {
                std::hint::spin_loop();
            } else if idle < 512 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        Ok(())
    }
}
