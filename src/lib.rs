//! Godwit: live migration of KVM virtual machines.
//!
//! - [`vmm`]: a small KVM VMM (memory slots with dirty logging, vCPU threads, PVH boot,
//!   serial and debug-exit devices, state capture and restore).
//! - [`migration`]: the engine (wire format, phases, the page pipeline, switchover policy).
//! - [`agent`] and [`api`]: the process that owns one VM, and the socket API it serves.
//! - [`heartbeat`]: reads test guests' serial logs: reboots, lost pages, the pause seen.

pub mod agent;
pub mod api;
pub mod heartbeat;
pub mod migration;
pub mod vmm;
