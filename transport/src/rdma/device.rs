//! Devices, opened contexts, ports and GIDs.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys as sys;

use super::error::{RdmaError, Result};

/// The RDMA devices of this host.
#[derive(Debug)]
pub struct Device;

/// Calls `ibv_get_device_list`, hands the (non-empty) list to `f`, frees it.
fn with_device_list<R>(f: impl FnOnce(&[*mut sys::ibv_device]) -> R) -> Result<R> {
    let mut n: libc::c_int = 0;
    // SAFETY: `n` is a valid out-pointer; the returned list is freed below
    // and no pointer from it escapes `f` except through `ibv_open_device`,
    // whose context stays valid after the list is freed.
    let list = unsafe { sys::ibv_get_device_list(&mut n) };
    if list.is_null() {
        let err = io::Error::last_os_error();
        // Without kernel support (no /sys/class/infiniband) libibverbs
        // reports ENOSYS: that is simply "no device".
        return match err.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::ENODEV) | Some(libc::ENOENT) | Some(0) | None => {
                Ok(f(&[]))
            }
            _ => Err(RdmaError::verbs(
                "ibv_get_device_list",
                err,
                "check that /sys/class/infiniband exists and the uverbs module (ib_uverbs) is loaded",
            )),
        };
    }
    let n = usize::try_from(n).unwrap_or(0);
    // SAFETY: libibverbs returned an array of `n` device pointers (plus a
    // terminating NULL) that stays valid until ibv_free_device_list.
    let devices = unsafe { std::slice::from_raw_parts(list, n) };
    let r = f(devices);
    // SAFETY: `list` came from ibv_get_device_list and is freed exactly once;
    // `devices` is not used after this.
    unsafe { sys::ibv_free_device_list(list) };
    Ok(r)
}

fn device_name(dev: *mut sys::ibv_device) -> String {
    // SAFETY: `dev` is an element of a live device list (see
    // with_device_list); ibv_get_device_name returns a NUL-terminated string
    // owned by the device, copied here before the list is freed.
    unsafe {
        let p = sys::ibv_get_device_name(dev);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

impl Device {
    /// The names of the RDMA devices present (e.g. `["rxe0", "rxe1"]`).
    /// Empty when the kernel has no RDMA support or no device was added.
    pub fn list() -> Result<Vec<String>> {
        with_device_list(|devs| devs.iter().map(|&d| device_name(d)).collect())
    }
}

pub(crate) struct ContextInner {
    ctx: NonNull<sys::ibv_context>,
    name: String,
}

// SAFETY: an ibv_context may be used from any thread: libibverbs verbs are
// thread-safe (rdma-core documents every verb as callable concurrently), and
// the pointer is only closed in Drop, when no other reference exists.
unsafe impl Send for ContextInner {}
// SAFETY: see Send; shared use goes only through thread-safe verbs.
unsafe impl Sync for ContextInner {}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: the context was opened by ibv_open_device and is closed once;
        // every child (PD, CQ, and through them MR and QP) holds an Arc to
        // this inner value, so none is alive any more.
        let rc = unsafe { sys::ibv_close_device(self.ctx.as_ptr()) };
        if rc != 0 {
            eprintln!("godwit rdma: ibv_close_device({}) failed: {rc}", self.name);
        }
    }
}

/// An opened RDMA device. Cheap to clone; the device is closed when the last
/// clone and every resource created from it are dropped.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<ContextInner>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.inner.name)
            .finish()
    }
}

/// The state of a port, as `ibv_query_port` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Port state code (`IBV_PORT_*`; 4 = ACTIVE).
    pub state: u32,
    /// The state as a string from `ibv_port_state_str` (e.g. `"PORT_ACTIVE"`).
    pub state_str: String,
    /// The active MTU.
    pub active_mtu: Mtu,
    /// The largest MTU the port supports.
    pub max_mtu: Mtu,
    /// Number of GID table entries.
    pub gid_table_len: u32,
    /// Link layer: 1 = InfiniBand, 2 = Ethernet (RoCE).
    pub link_layer: u8,
    /// Largest message size.
    pub max_msg_size: u32,
}

impl PortInfo {
    /// Whether the port can carry traffic.
    pub fn is_active(&self) -> bool {
        self.state == sys::ibv_port_state::IBV_PORT_ACTIVE
    }
}

/// An IB/RoCE path MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mtu {
    /// 256 bytes.
    B256,
    /// 512 bytes.
    B512,
    /// 1024 bytes.
    B1024,
    /// 2048 bytes.
    B2048,
    /// 4096 bytes.
    B4096,
}

impl Mtu {
    /// The MTU in bytes.
    pub fn bytes(self) -> u16 {
        match self {
            Mtu::B256 => 256,
            Mtu::B512 => 512,
            Mtu::B1024 => 1024,
            Mtu::B2048 => 2048,
            Mtu::B4096 => 4096,
        }
    }

    /// The MTU of that many bytes, if it is one of the five.
    pub fn from_bytes(b: u16) -> Option<Mtu> {
        Some(match b {
            256 => Mtu::B256,
            512 => Mtu::B512,
            1024 => Mtu::B1024,
            2048 => Mtu::B2048,
            4096 => Mtu::B4096,
            _ => return None,
        })
    }

    pub(crate) fn from_raw(v: sys::ibv_mtu::Type) -> Option<Mtu> {
        use sys::ibv_mtu::*;
        Some(match v {
            IBV_MTU_256 => Mtu::B256,
            IBV_MTU_512 => Mtu::B512,
            IBV_MTU_1024 => Mtu::B1024,
            IBV_MTU_2048 => Mtu::B2048,
            IBV_MTU_4096 => Mtu::B4096,
            _ => return None,
        })
    }

    pub(crate) fn to_raw(self) -> sys::ibv_mtu::Type {
        use sys::ibv_mtu::*;
        match self {
            Mtu::B256 => IBV_MTU_256,
            Mtu::B512 => IBV_MTU_512,
            Mtu::B1024 => IBV_MTU_1024,
            Mtu::B2048 => IBV_MTU_2048,
            Mtu::B4096 => IBV_MTU_4096,
        }
    }
}

/// A 128-bit GID (for RoCEv2 over IPv4, an IPv4-mapped IPv6 address).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// Whether the entry is empty.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// The IPv4 address, if this is an IPv4-mapped GID (`::ffff:a.b.c.d`).
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        std::net::Ipv6Addr::from(self.0).to_ipv4_mapped()
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&std::net::Ipv6Addr::from(self.0), f)
    }
}

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gid({self})")
    }
}

pub(crate) fn port_state_str(state: u32) -> String {
    // SAFETY: ibv_port_state_str accepts any value and returns a static
    // NUL-terminated string ("unknown" for values it does not know).
    unsafe {
        let p = sys::ibv_port_state_str(state);
        if p.is_null() {
            format!("state {state}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

impl Context {
    /// Opens the device called `name` (as listed by [`Device::list`]).
    pub fn open(name: &str) -> Result<Context> {
        let opened = with_device_list(|devs| {
            if devs.is_empty() {
                return Err(RdmaError::NoDevice);
            }
            let Some(&dev) = devs.iter().find(|&&d| device_name(d) == name) else {
                let names: Vec<String> = devs.iter().map(|&d| device_name(d)).collect();
                return Err(RdmaError::DeviceNotFound {
                    name: name.to_owned(),
                    available: names.join(", "),
                });
            };
            // SAFETY: `dev` belongs to the live device list; the context
            // returned stays valid after the list is freed.
            let ctx = unsafe { sys::ibv_open_device(dev) };
            NonNull::new(ctx).ok_or_else(|| {
                RdmaError::verbs(
                    "ibv_open_device",
                    io::Error::last_os_error(),
                    "check permissions on /dev/infiniband/uverbs* and that ib_uverbs is loaded",
                )
            })
        })??;
        Ok(Context {
            inner: Arc::new(ContextInner {
                ctx: opened,
                name: name.to_owned(),
            }),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_context {
        self.inner.ctx.as_ptr()
    }

    /// Queries port `port` (ports count from 1).
    pub fn query_port(&self, port: u8) -> Result<PortInfo> {
        // SAFETY: ibv_port_attr is a plain C struct for which all-zero bytes
        // are a valid value.
        let mut attr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open (we hold it) and `attr` is a valid,
        // correctly sized out-parameter (___ibv_query_port passes its size).
        let rc = unsafe { sys::___ibv_query_port(self.as_ptr(), port, &mut attr) };
        if rc != 0 {
            return Err(RdmaError::verbs(
                "ibv_query_port",
                io::Error::from_raw_os_error(rc.abs()),
                "check the port number (ports count from 1)",
            ));
        }
        let mtu = |m| Mtu::from_raw(m).unwrap_or(Mtu::B1024);
        Ok(PortInfo {
            state: attr.state,
            state_str: port_state_str(attr.state),
            active_mtu: mtu(attr.active_mtu),
            max_mtu: mtu(attr.max_mtu),
            gid_table_len: u32::try_from(attr.gid_tbl_len).unwrap_or(0),
            link_layer: attr.link_layer,
            max_msg_size: attr.max_msg_sz,
        })
    }

    /// Reads GID `index` of port `port`. On soft-RoCE index 1 is the RoCEv2
    /// IPv4-mapped GID of the netdev's address.
    pub fn query_gid(&self, port: u8, index: u8) -> Result<Gid> {
        let mut gid = sys::ibv_gid { raw: [0; 16] };
        // SAFETY: the context is open and `gid` is a valid out-parameter.
        let rc = unsafe { sys::ibv_query_gid(self.as_ptr(), port, index.into(), &mut gid) };
        if rc != 0 {
            return Err(RdmaError::verbs(
                "ibv_query_gid",
                io::Error::last_os_error(),
                "check the port number and GID index (`ibv_devinfo -v` lists the GID table)",
            ));
        }
        // SAFETY: every bit pattern is a valid [u8; 16]; `raw` covers the
        // whole union.
        Ok(Gid(unsafe { gid.raw }))
    }
}
