//! RDMA verbs: a small safe layer over `rdma-sys` (libibverbs).
//!
//! Every unsafe call to libibverbs is made once, in this module's files, with
//! the reason it is sound next to it; the rest of Godwit uses only the safe
//! types here.
//!
//! # Ownership
//! Resources hold their parents: a [`QueuePair`] holds its
//! [`ProtectionDomain`] and [`CompletionQueue`]s, a [`MemoryRegion`] its PD,
//! and PDs and CQs their [`Context`]. So a child can never outlive its
//! parent, and freeing happens in the order verbs require: QP before CQ
//! before PD before context, MR before PD.
//!
//! # Addressing
//! Queue pairs are set up for RoCE: `is_global = 1` with a source GID index
//! (1 on soft-RoCE: the IPv4-mapped RoCEv2 GID) and the peer's GID; LID-only
//! addressing does not work on rxe. Each side sends its [`QpInfo`] to the
//! other (over the TCP control connection) and calls [`QueuePair::connect`].
//!
//! # Memory registration
//! Registering memory pins it, which costs time (measured by the tests) and
//! counts against RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK
//! ([`raise_memlock_limit`]).
//!
//! # Channels
//! [`RdmaEndpoint`] turns queue pairs into the crate's frame channels and
//! writes guest pages straight into the peer's registered memory
//! ([`RdmaSink::write_pages`]); see the `channel` module's documentation.
//!
//! # Waiting
//! Every wait for a completion is bounded ([`CompletionQueue::wait`]) and
//! ends in [`RdmaError::Timeout`] rather than a hang.

mod channel;
#[cfg(test)]
mod channel_tests;
mod cq;
mod device;
mod error;
mod mr;
mod qp;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

pub use channel::{
    EndpointInfo, Exposure, MemoryArea, RdmaEndpoint, RdmaOptions, RdmaSink, RdmaSource,
    RegisteredMemory, RemoteArea, RemoteMemory, EOS_IMM, MAX_MEMORY_AREAS, MAX_RDMA_FRAME,
};
pub use cq::{CompletionQueue, WcOpcode, WcStatus, WorkCompletion};
pub use device::{Context, Device, Gid, Mtu, PortInfo};
pub use error::{MemlockDisplay, RdmaError, Result};
pub use mr::{
    memlock_limit, raise_memlock_limit, Access, MemoryRegion, ProtectionDomain, RemoteRegion, Sge,
};
pub use qp::{QpCaps, QpConfig, QpInfo, QpState, QueuePair, SendOp, SendRequest, SendWindow};
