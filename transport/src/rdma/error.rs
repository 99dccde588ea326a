//! [`RdmaError`]: every failure of the verbs layer, each message telling the
//! operator what to do about it.

use std::fmt;
use std::io;
use std::time::Duration;

use super::cq::{WcOpcode, WcStatus};
use super::qp::QpState;

/// An error of the RDMA verbs layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    /// `ibv_get_device_list` found no device.
    #[error(
        "no RDMA device found: load rdma_rxe and add a device with \
         `rdma link add rxe0 type rxe netdev eth0`, or use --transport tcp"
    )]
    NoDevice,

    /// No RDMA device has the local address asked for.
    #[error(
        "no RDMA device has the address {ip} (looked for it as GID index 1 of port 1; \
         devices: {devices}): give the address of an interface with RoCE (`rdma link show`, \
         `ibv_devinfo -v` lists the GIDs), or use --transport tcp"
    )]
    NoDeviceForIp {
        /// The local address asked for.
        ip: std::net::IpAddr,
        /// The devices present with their GID index 1, or "none".
        devices: String,
    },

    /// The named device does not exist.
    #[error(
        "RDMA device {name:?} not found (devices present: {available}): \
         check `rdma link show` and pass one of those names"
    )]
    DeviceNotFound {
        /// The name asked for.
        name: String,
        /// The names that exist, comma-separated.
        available: String,
    },

    /// A verbs call failed with an errno.
    #[error("{op} failed: {source}; {hint}")]
    Verbs {
        /// The verb that failed, e.g. `"ibv_alloc_pd"`.
        op: &'static str,
        /// The OS error it reported.
        #[source]
        source: io::Error,
        /// What to check.
        hint: &'static str,
    },

    /// The port is not ACTIVE.
    #[error(
        "port {port} of {device} is {state}, not ACTIVE: bring its network interface up \
         (`ip link set DEV up`) and check `rdma link show`"
    )]
    PortNotActive {
        /// Device name.
        device: String,
        /// Port number.
        port: u8,
        /// The port state as libibverbs names it.
        state: String,
    },

    /// The GID table entry is empty (all zeros).
    #[error(
        "GID index {index} of {device} port {port} is empty: on soft-RoCE index 1 is the \
         IPv4-mapped RoCEv2 GID, which exists only once the netdev has an IPv4 address \
         (`ip addr add 10.99.0.1/24 dev eth0`); list GIDs with `ibv_devinfo -v`"
    )]
    NoGid {
        /// Device name.
        device: String,
        /// Port number.
        port: u8,
        /// GID index.
        index: u8,
    },

    /// Memory registration (pinning) failed.
    #[error(
        "registering {len} bytes of memory failed: {source}; registration pins memory and is \
         limited by RLIMIT_MEMLOCK (now {memlock}) unless the process has CAP_IPC_LOCK: raise \
         it (`ulimit -l unlimited`, systemd `LimitMEMLOCK=infinity`) or run as root"
    )]
    Register {
        /// Bytes asked for.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
        /// The soft RLIMIT_MEMLOCK at the time, for the message.
        memlock: MemlockDisplay,
    },

    /// A scatter/gather entry or remote range outside its memory region.
    #[error(
        "range {offset}+{len} is outside the {size}-byte memory region: \
         this is a bug in the caller"
    )]
    OutOfBounds {
        /// Offset asked for.
        offset: usize,
        /// Length asked for.
        len: usize,
        /// The region's size.
        size: usize,
    },

    /// A work request completed with an error status.
    #[error(
        "work request {wr_id} ({opcode}) completed with error: {status} (vendor error \
         {vendor_err:#x}); {hint}",
        hint = .status.hint()
    )]
    Completion {
        /// Status, with the string from `ibv_wc_status_str`.
        status: WcStatus,
        /// What kind of work request it was.
        opcode: WcOpcode,
        /// The work request's id.
        wr_id: u64,
        /// The provider's error detail.
        vendor_err: u32,
    },

    /// A poll loop reached its deadline.
    #[error(
        "timed out after {waited:?} waiting for {what} ({got} of {wanted} completions): the \
         peer may be dead, stalled or slow (soft-RoCE under emulation moves only tens of MB/s); \
         check the peer process and the link, or raise the timeout"
    )]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long it waited.
        waited: Duration,
        /// Completions that arrived.
        got: usize,
        /// Completions expected.
        wanted: usize,
    },

    /// The queue pair is not in a state that allows the operation.
    #[error(
        "queue pair {qp_num} is in state {state}, cannot {op}: a QP that had a completion \
         error is in the ERROR state for good; create a new QP and reconnect (or fall back to \
         --transport tcp)"
    )]
    QpState {
        /// The QP number.
        qp_num: u32,
        /// Its state.
        state: QpState,
        /// What was attempted.
        op: &'static str,
    },

    /// `ibv_post_send`/`ibv_post_recv` refused a work request.
    #[error("{op} on queue pair {qp_num} failed: {source}; {hint}")]
    Post {
        /// `"ibv_post_send"` or `"ibv_post_recv"`.
        op: &'static str,
        /// The QP number.
        qp_num: u32,
        /// The errno.
        #[source]
        source: io::Error,
        /// What to check.
        hint: &'static str,
    },

    /// A bad argument (a bug in the caller, or a malformed peer message).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// The soft RLIMIT_MEMLOCK, printed as bytes or "unlimited".
#[derive(Debug, Clone, Copy)]
pub struct MemlockDisplay(pub Option<u64>);

impl fmt::Display for MemlockDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("unlimited"),
            Some(b) => write!(f, "{b} bytes"),
        }
    }
}

impl RdmaError {
    pub(crate) fn verbs(op: &'static str, source: io::Error, hint: &'static str) -> Self {
        RdmaError::Verbs { op, source, hint }
    }

    /// Whether this error means the peer is gone or unreachable (a retry
    /// count exceeded, or a wait that timed out).
    pub fn is_peer_failure(&self) -> bool {
        match self {
            RdmaError::Completion { status, .. } => status.is_peer_failure(),
            RdmaError::Timeout { .. } => true,
            _ => false,
        }
    }
}

/// Shorthand for this module's results.
pub type Result<T, E = RdmaError> = std::result::Result<T, E>;
