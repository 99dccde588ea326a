//! Reliable Connected queue pairs.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::ptr::NonNull;
use std::sync::Mutex;

use rdma_sys as sys;

use super::cq::CompletionQueue;
use super::device::Mtu;
use super::error::{RdmaError, Result};
use super::mr::{Access, ProtectionDomain, Sge};

/// Settings of a queue pair.
#[derive(Debug, Clone)]
pub struct QpConfig {
    /// Port number (from 1).
    pub port: u8,
    /// Source GID index: 1 is the RoCEv2 IPv4-mapped GID on soft-RoCE.
    pub gid_index: u8,
    /// Send queue depth (outstanding send work requests).
    pub max_send_wr: u32,
    /// Receive queue depth.
    pub max_recv_wr: u32,
    /// Scatter/gather entries per send.
    pub max_send_sge: u32,
    /// Scatter/gather entries per receive.
    pub max_recv_sge: u32,
    /// What the peer may do to this side's memory regions (the regions'
    /// own access flags must allow it too).
    pub remote_access: Access,
    /// Local ACK timeout: 4.096 us * 2^timeout (14: about 67 ms).
    pub timeout: u8,
    /// Transport retries before a send fails with RETRY_EXC_ERR (0-7).
    /// The default is 6: soft-RoCE (rxe) treats 7 as "retry forever" (the
    /// spec does so only for `rnr_retry`), so with 7 a dead peer would be
    /// noticed only by a wait's deadline. With `timeout` 14 a dead peer is
    /// reported after about (6 + 1) * 67 ms.
    pub retry_cnt: u8,
    /// Receiver-not-ready retries (7: forever, the sender waits for the
    /// receiver to post a buffer).
    pub rnr_retry: u8,
    /// Minimal RNR NAK timer (12: 0.64 ms).
    pub min_rnr_timer: u8,
}

impl Default for QpConfig {
    fn default() -> Self {
        QpConfig {
            port: 1,
            gid_index: 1,
            max_send_wr: 128,
            max_recv_wr: 128,
            max_send_sge: 4,
            max_recv_sge: 4,
            remote_access: Access::REMOTE_WRITE,
            timeout: 14,
            retry_cnt: 6,
            rnr_retry: 7,
            min_rnr_timer: 12,
        }
    }
}

/// What one side tells the other to connect: plain data, exchanged over TCP
/// ([`QpInfo::to_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    /// Queue pair number.
    pub qp_num: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// The GID the QP sends from.
    pub gid: [u8; 16],
    /// The port's active MTU.
    pub mtu: Mtu,
}

impl QpInfo {
    /// Encoded length in bytes.
    pub const ENCODED_LEN: usize = 26;

    /// Big-endian encoding: qp_num, psn, gid, mtu in bytes (u16).
    pub fn to_bytes(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0; Self::ENCODED_LEN];
        b[..4].copy_from_slice(&self.qp_num.to_be_bytes());
        b[4..8].copy_from_slice(&self.psn.to_be_bytes());
        b[8..24].copy_from_slice(&self.gid);
        b[24..].copy_from_slice(&self.mtu.bytes().to_be_bytes());
        b
    }

    /// Decodes [`QpInfo::to_bytes`], validating every field (the peer is
    /// not trusted).
    pub fn from_bytes(b: &[u8]) -> Result<QpInfo> {
        let bad = |what: String| RdmaError::InvalidArgument(format!("peer's QP info: {what}"));
        let b: &[u8; Self::ENCODED_LEN] = b
            .try_into()
            .map_err(|_| bad(format!("{} bytes, expected {}", b.len(), Self::ENCODED_LEN)))?;
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let qp_num = u32_at(0);
        let psn = u32_at(4);
        if qp_num > 0xff_ffff || psn > 0xff_ffff {
            return Err(bad(format!(
                "qp_num {qp_num:#x} / psn {psn:#x} exceed 24 bits"
            )));
        }
        let mut gid = [0; 16];
        gid.copy_from_slice(&b[8..24]);
        let mtu_b = u16::from_be_bytes([b[24], b[25]]);
        let mtu = Mtu::from_bytes(mtu_b).ok_or_else(|| bad(format!("MTU {mtu_b}")))?;
        Ok(QpInfo {
            qp_num,
            psn,
            gid,
            mtu,
        })
    }
}

/// A queue pair's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpState {
    /// Just created.
    Reset,
    /// Initialised (receives may be posted).
    Init,
    /// Ready to receive.
    Rtr,
    /// Ready to send: connected.
    Rts,
    /// Send queue drained.
    Sqd,
    /// Send queue error.
    Sqe,
    /// Error: the QP is unusable for good.
    Error,
    /// A value this code does not know.
    Unknown(u32),
}

impl QpState {
    fn from_raw(v: sys::ibv_qp_state::Type) -> QpState {
        use sys::ibv_qp_state::*;
        match v {
            IBV_QPS_RESET => QpState::Reset,
            IBV_QPS_INIT => QpState::Init,
            IBV_QPS_RTR => QpState::Rtr,
            IBV_QPS_RTS => QpState::Rts,
            IBV_QPS_SQD => QpState::Sqd,
            IBV_QPS_SQE => QpState::Sqe,
            IBV_QPS_ERR => QpState::Error,
            other => QpState::Unknown(other),
        }
    }
}

impl fmt::Display for QpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QpState::Reset => f.write_str("RESET"),
            QpState::Init => f.write_str("INIT"),
            QpState::Rtr => f.write_str("RTR"),
            QpState::Rts => f.write_str("RTS"),
            QpState::Sqd => f.write_str("SQD"),
            QpState::Sqe => f.write_str("SQE"),
            QpState::Error => f.write_str("ERROR"),
            QpState::Unknown(v) => write!(f, "unknown state {v}"),
        }
    }
}

/// The operation of a send work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// SEND: consumes one receive posted by the peer.
    Send,
    /// SEND with a 32-bit immediate value, delivered in the peer's receive
    /// completion.
    SendWithImm(u32),
    /// RDMA WRITE into the peer's region at `remote_addr`.
    Write {
        /// Target address in the peer's region.
        remote_addr: u64,
        /// The peer region's rkey.
        rkey: u32,
    },
    /// RDMA WRITE that also consumes a peer's receive, delivering `imm`.
    WriteWithImm {
        /// Target address in the peer's region.
        remote_addr: u64,
        /// The peer region's rkey.
        rkey: u32,
        /// The immediate value.
        imm: u32,
    },
}

/// One send work request.
#[derive(Debug, Clone, Copy)]
pub struct SendRequest<'a> {
    /// Id returned in the completion.
    pub wr_id: u64,
    /// What to do.
    pub op: SendOp,
    /// The local data, gathered in order (may be empty).
    pub sges: &'a [Sge<'a>],
    /// Whether it produces a completion on success (errors always do).
    /// Unsignalled requests free their send-queue slot only when a later
    /// signalled one completes: signal at least every Nth, N below the
    /// send queue depth.
    pub signaled: bool,
}

/// The capacities the provider actually granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Send queue depth.
    pub max_send_wr: u32,
    /// Receive queue depth.
    pub max_recv_wr: u32,
    /// Scatter/gather entries per send.
    pub max_send_sge: u32,
    /// Scatter/gather entries per receive.
    pub max_recv_sge: u32,
}

/// A Reliable Connected queue pair. It keeps its PD and CQs alive; dropping
/// it destroys the QP first.
pub struct QueuePair {
    qp: NonNull<sys::ibv_qp>,
    qp_num: u32,
    cfg: QpConfig,
    caps: QpCaps,
    local: QpInfo,
    remote: Mutex<Option<QpInfo>>,
    // Released after the QP is destroyed (Drop), in field order.
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    pd: ProtectionDomain,
}

// SAFETY: ibv_post_send, ibv_post_recv, ibv_modify_qp and ibv_query_qp are
// thread-safe verbs (providers lock the queues); the pointer is destroyed
// only in Drop.
unsafe impl Send for QueuePair {}
// SAFETY: see Send.
unsafe impl Sync for QueuePair {}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp and destroyed once; its PD and CQs
        // are fields, released only after this.
        let rc = unsafe { sys::ibv_destroy_qp(self.qp.as_ptr()) };
        if rc != 0 {
            eprintln!("godwit rdma: ibv_destroy_qp({}) failed: {rc}", self.qp_num);
        }
    }
}

impl fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuePair")
            .field("qp_num", &self.qp_num)
            .field("device", &self.pd.context().name())
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

fn random_psn() -> u32 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    (h.finish() & 0xff_ffff) as u32
}

/// Work requests posted in one `ibv_post_send` call at most.
const MAX_CHAIN: usize = 64;

impl QueuePair {
    /// Creates an RC queue pair in `pd` whose completions go to `send_cq`
    /// and `recv_cq` (which may be the same queue). Checks that the port is
    /// ACTIVE and that the GID at `cfg.gid_index` exists.
    pub fn new_rc(
        pd: &ProtectionDomain,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
        cfg: &QpConfig,
    ) -> Result<QueuePair> {
        let ctx = pd.context();
        let port = ctx.query_port(cfg.port)?;
        if !port.is_active() {
            return Err(RdmaError::PortNotActive {
                device: ctx.name().to_owned(),
                port: cfg.port,
                state: port.state_str,
            });
        }
        let gid = ctx.query_gid(cfg.port, cfg.gid_index)?;
        if gid.is_zero() {
            return Err(RdmaError::NoGid {
                device: ctx.name().to_owned(),
                port: cfg.port,
                index: cfg.gid_index,
            });
        }
        // SAFETY: all-zero is a valid ibv_qp_init_attr (null pointers, zeros).
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = send_cq.as_ptr();
        init.recv_cq = recv_cq.as_ptr();
        init.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap = sys::ibv_qp_cap {
            max_send_wr: cfg.max_send_wr,
            max_recv_wr: cfg.max_recv_wr,
            max_send_sge: cfg.max_send_sge,
            max_recv_sge: cfg.max_recv_sge,
            max_inline_data: 0,
        };
        // SAFETY: the PD and both CQs are alive and are kept alive by the
        // QueuePair (fields); `init` is valid and receives the granted caps.
        let qp = unsafe { sys::ibv_create_qp(pd.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| {
            RdmaError::verbs(
                "ibv_create_qp",
                io::Error::last_os_error(),
                "the queue depths or SGE counts may exceed the device's limits \
                 (`ibv_devinfo -v`: max_qp_wr, max_sge)",
            )
        })?;
        // SAFETY: a valid QP; qp_num is a plain field.
        let qp_num = unsafe { (*qp.as_ptr()).qp_num };
        let c = init.cap;
        Ok(QueuePair {
            qp,
            qp_num,
            cfg: cfg.clone(),
            caps: QpCaps {
                max_send_wr: c.max_send_wr,
                max_recv_wr: c.max_recv_wr,
                max_send_sge: c.max_send_sge,
                max_recv_sge: c.max_recv_sge,
            },
            local: QpInfo {
                qp_num,
                psn: random_psn(),
                gid: gid.0,
                mtu: port.active_mtu,
            },
            remote: Mutex::new(None),
            send_cq: send_cq.clone(),
            recv_cq: recv_cq.clone(),
            pd: pd.clone(),
        })
    }

    /// The QP number.
    pub fn qp_num(&self) -> u32 {
        self.qp_num
    }

    /// What the peer needs to connect to this QP.
    pub fn local_info(&self) -> QpInfo {
        self.local
    }

    /// The peer's info once connected.
    pub fn remote_info(&self) -> Option<QpInfo> {
        *self.remote.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The capacities granted.
    pub fn caps(&self) -> QpCaps {
        self.caps
    }

    /// The send completion queue.
    pub fn send_cq(&self) -> &CompletionQueue {
        &self.send_cq
    }

    /// The receive completion queue.
    pub fn recv_cq(&self) -> &CompletionQueue {
        &self.recv_cq
    }

    /// The protection domain.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.pd
    }

    fn modify(&self, attr: &mut sys::ibv_qp_attr, mask: u32, step: &'static str) -> Result<()> {
        // SAFETY: the QP is alive; `attr` is a fully initialised attribute
        // struct whose fields named in `mask` were set by the caller.
        let rc = unsafe { sys::ibv_modify_qp(self.qp.as_ptr(), attr, mask as libc::c_int) };
        if rc != 0 {
            return Err(RdmaError::verbs(
                step,
                io::Error::from_raw_os_error(rc.abs()),
                "check both sides' GID index (1 on soft-RoCE), that the peer's GID is \
                 reachable, and that the QP was not connected already",
            ));
        }
        Ok(())
    }

    /// Connects to the peer: INIT -> RTR -> RTS. The path MTU is the
    /// smaller of both sides' active MTUs. Receives may be posted before.
    pub fn connect(&self, remote: &QpInfo) -> Result<()> {
        use sys::ibv_qp_attr_mask as m;
        let mtu = self.local.mtu.min(remote.mtu);

        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = self.cfg.port;
        a.qp_access_flags = self.cfg.remote_access.bits();
        let mask = m::IBV_QP_STATE.0
            | m::IBV_QP_PKEY_INDEX.0
            | m::IBV_QP_PORT.0
            | m::IBV_QP_ACCESS_FLAGS.0;
        self.modify(&mut a, mask, "ibv_modify_qp(INIT)")?;

        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = mtu.to_raw();
        a.dest_qp_num = remote.qp_num;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = self.cfg.min_rnr_timer;
        a.ah_attr.is_global = 1;
        a.ah_attr.grh.dgid = sys::ibv_gid { raw: remote.gid };
        a.ah_attr.grh.sgid_index = self.cfg.gid_index;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.dlid = 0;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = self.cfg.port;
        let mask = m::IBV_QP_STATE.0
            | m::IBV_QP_AV.0
            | m::IBV_QP_PATH_MTU.0
            | m::IBV_QP_DEST_QPN.0
            | m::IBV_QP_RQ_PSN.0
            | m::IBV_QP_MAX_DEST_RD_ATOMIC.0
            | m::IBV_QP_MIN_RNR_TIMER.0;
        self.modify(&mut a, mask, "ibv_modify_qp(RTR)")?;

        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTS;
        a.timeout = self.cfg.timeout;
        a.retry_cnt = self.cfg.retry_cnt;
        a.rnr_retry = self.cfg.rnr_retry;
        a.sq_psn = self.local.psn;
        a.max_rd_atomic = 1;
        let mask = m::IBV_QP_STATE.0
            | m::IBV_QP_TIMEOUT.0
            | m::IBV_QP_RETRY_CNT.0
            | m::IBV_QP_RNR_RETRY.0
            | m::IBV_QP_SQ_PSN.0
            | m::IBV_QP_MAX_QP_RD_ATOMIC.0;
        self.modify(&mut a, mask, "ibv_modify_qp(RTS)")?;
        *self.remote.lock().unwrap_or_else(|e| e.into_inner()) = Some(*remote);
        Ok(())
    }

    /// The QP's current state, from the device.
    pub fn state(&self) -> Result<QpState> {
        // SAFETY: all-zero is valid for both attribute structs.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the QP is alive; both out-parameters are valid.
        let rc = unsafe {
            sys::ibv_query_qp(
                self.qp.as_ptr(),
                &mut attr,
                sys::ibv_qp_attr_mask::IBV_QP_STATE.0 as libc::c_int,
                &mut init,
            )
        };
        if rc != 0 {
            return Err(RdmaError::verbs(
                "ibv_query_qp",
                io::Error::from_raw_os_error(rc.abs()),
                "the device may have been removed",
            ));
        }
        Ok(QpState::from_raw(attr.qp_state))
    }

    /// Fails with [`RdmaError::QpState`] unless the QP is ready to send.
    pub fn check_ready(&self, op: &'static str) -> Result<()> {
        match self.state()? {
            QpState::Rts => Ok(()),
            state => Err(RdmaError::QpState {
                qp_num: self.qp_num,
                state,
                op,
            }),
        }
    }

    fn post_error(&self, op: &'static str, rc: libc::c_int) -> RdmaError {
        let source = io::Error::from_raw_os_error(rc.abs());
        if let Ok(state) = self.state() {
            if !matches!(state, QpState::Rts | QpState::Rtr | QpState::Init) {
                return RdmaError::QpState {
                    qp_num: self.qp_num,
                    state,
                    op,
                };
            }
        }
        let hint = if rc.abs() == libc::ENOMEM {
            "the queue is full: poll completions before posting more (signal at least every \
             Nth send, N below the send queue depth)"
        } else {
            "check the scatter/gather count against the QP's caps and that the QP is connected"
        };
        RdmaError::Post {
            op,
            qp_num: self.qp_num,
            source,
            hint,
        }
    }

    /// Posts one send work request.
    pub fn post_send(&self, wr: &SendRequest<'_>) -> Result<()> {
        self.post_send_list(std::slice::from_ref(wr))
    }

    /// Posts several send work requests, in order, chained in as few
    /// `ibv_post_send` calls as possible. On an error, the requests before
    /// the failing one may have been posted: treat the QP as broken.
    pub fn post_send_list(&self, wrs: &[SendRequest<'_>]) -> Result<()> {
        for chunk in wrs.chunks(MAX_CHAIN) {
            self.post_send_chain(chunk)?;
        }
        Ok(())
    }

    fn post_send_chain(&self, wrs: &[SendRequest<'_>]) -> Result<()> {
        if wrs.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<Vec<sys::ibv_sge>> = Vec::with_capacity(wrs.len());
        for wr in wrs {
            if wr.sges.len() > self.caps.max_send_sge as usize {
                return Err(RdmaError::InvalidArgument(format!(
                    "{} scatter/gather entries, the QP allows {}",
                    wr.sges.len(),
                    self.caps.max_send_sge
                )));
            }
            sges.push(wr.sges.iter().map(Sge::raw).collect());
        }
        let mut raw: Vec<sys::ibv_send_wr> = Vec::with_capacity(wrs.len());
        for (wr, sg) in wrs.iter().zip(sges.iter_mut()) {
            // SAFETY: all-zero is a valid ibv_send_wr (null pointers, zero
            // integers in every union member).
            let mut w: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
            w.wr_id = wr.wr_id;
            w.sg_list = if sg.is_empty() {
                std::ptr::null_mut()
            } else {
                sg.as_mut_ptr()
            };
            w.num_sge = sg.len() as libc::c_int;
            w.send_flags = if wr.signaled {
                sys::ibv_send_flags::IBV_SEND_SIGNALED.0
            } else {
                0
            };
            match wr.op {
                SendOp::Send => w.opcode = sys::ibv_wr_opcode::IBV_WR_SEND,
                SendOp::SendWithImm(imm) => {
                    w.opcode = sys::ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
                    w.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                }
                SendOp::Write { remote_addr, rkey } => {
                    w.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                    w.wr.rdma = sys::rdma_t { remote_addr, rkey };
                }
                SendOp::WriteWithImm {
                    remote_addr,
                    rkey,
                    imm,
                } => {
                    w.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                    w.wr.rdma = sys::rdma_t { remote_addr, rkey };
                    w.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                }
            }
            raw.push(w);
        }
        // Chain them; `raw` is not resized from here on, so the pointers hold.
        let n = raw.len();
        let base = raw.as_mut_ptr();
        for (i, w) in raw.iter_mut().enumerate().take(n - 1) {
            // Pointer arithmetic within the vector, no dereference here.
            w.next = base.wrapping_add(i + 1);
        }
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is alive; `raw` is a NULL-terminated chain of valid
        // work requests whose sg_lists point into `sges`, all alive for the
        // call (the provider copies them). The memory named by the SGEs is
        // registered memory, which the device accesses under the lkey's
        // protection, and which stays registered at least as long as the
        // borrowed MemoryRegions (`Sge<'a>`).
        let rc = unsafe { sys::ibv_post_send(self.qp.as_ptr(), base, &mut bad) };
        if rc != 0 {
            return Err(self.post_error("ibv_post_send", rc));
        }
        Ok(())
    }

    /// Posts one receive work request (its buffers may be empty, e.g. for
    /// WRITE with immediate, which delivers only the immediate value).
    pub fn post_recv(&self, wr_id: u64, sges: &[Sge<'_>]) -> Result<()> {
        if sges.len() > self.caps.max_recv_sge as usize {
            return Err(RdmaError::InvalidArgument(format!(
                "{} scatter/gather entries, the QP allows {} per receive",
                sges.len(),
                self.caps.max_recv_sge
            )));
        }
        let mut sg: Vec<sys::ibv_sge> = sges.iter().map(Sge::raw).collect();
        let mut w = sys::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: if sg.is_empty() {
                std::ptr::null_mut()
            } else {
                sg.as_mut_ptr()
            },
            num_sge: sg.len() as libc::c_int,
        };
        let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: the QP is alive; `w` and `sg` are valid for the call (the
        // provider copies them); the SGEs name registered memory (see
        // post_send_chain).
        let rc = unsafe { sys::ibv_post_recv(self.qp.as_ptr(), &mut w, &mut bad) };
        if rc != 0 {
            return Err(self.post_error("ibv_post_recv", rc));
        }
        Ok(())
    }
}

/// Helper for a stream of RDMA WRITEs or SENDs on one QP: signals every
/// `every`-th request and keeps at most `window` requests outstanding,
/// reaping send completions as needed. The QP's send CQ must carry only this
/// QP's send completions (give receives their own CQ).
#[derive(Debug)]
pub struct SendWindow {
    every: usize,
    window: usize,
    unsignaled: usize,
    outstanding: usize,
    // Requests covered by each signalled completion in flight, oldest first.
    groups: std::collections::VecDeque<usize>,
    timeout: std::time::Duration,
}

impl SendWindow {
    /// `every` requests share one signalled completion; at most `window`
    /// (at most the QP's send queue depth) are in flight; each wait for a
    /// completion is bounded by `timeout`.
    pub fn new(every: usize, window: usize, timeout: std::time::Duration) -> SendWindow {
        let every = every.max(1);
        SendWindow {
            every,
            window: window.max(every),
            unsignaled: 0,
            outstanding: 0,
            groups: Default::default(),
            timeout,
        }
    }

    /// Posts one request built by `make(signaled)`, first waiting for room.
    pub fn post<'a>(
        &mut self,
        qp: &QueuePair,
        make: impl FnOnce(bool) -> SendRequest<'a>,
    ) -> Result<()> {
        self.post_inner(qp, false, make)
    }

    /// Posts a request that is always signalled: use it for the last one, so
    /// that [`SendWindow::drain`] covers every request.
    pub fn post_last<'a>(
        &mut self,
        qp: &QueuePair,
        make: impl FnOnce(bool) -> SendRequest<'a>,
    ) -> Result<()> {
        self.post_inner(qp, true, make)
    }

    fn post_inner<'a>(
        &mut self,
        qp: &QueuePair,
        force: bool,
        make: impl FnOnce(bool) -> SendRequest<'a>,
    ) -> Result<()> {
        while self.outstanding >= self.window {
            self.reap_one(qp)?;
        }
        let signaled = force || self.unsignaled + 1 >= self.every;
        let req = make(signaled);
        qp.post_send(&SendRequest { signaled, ..req })?;
        self.outstanding += 1;
        if signaled {
            self.groups.push_back(self.unsignaled + 1);
            self.unsignaled = 0;
        } else {
            self.unsignaled += 1;
        }
        Ok(())
    }

    fn reap_one(&mut self, qp: &QueuePair) -> Result<()> {
        let Some(g) = self.groups.pop_front() else {
            return Err(RdmaError::InvalidArgument(
                "send window full of unsignalled requests".into(),
            ));
        };
        qp.send_cq().wait(1, self.timeout, "a send completion")?;
        self.outstanding -= g;
        Ok(())
    }

    /// Waits until every request posted has completed.
    pub fn drain(&mut self, qp: &QueuePair) -> Result<()> {
        while !self.groups.is_empty() {
            self.reap_one(qp)?;
        }
        if self.unsignaled > 0 {
            return Err(RdmaError::InvalidArgument(
                "unsignalled requests left at the end: post the last one with post_last".into(),
            ));
        }
        Ok(())
    }

    /// Requests posted and not yet known complete.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }
}
