//! Protection domains, memory regions and RLIMIT_MEMLOCK.

use std::alloc::{self, Layout};
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::ops::BitOr;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys as sys;

use super::device::Context;
use super::error::{MemlockDisplay, RdmaError, Result};

pub(crate) struct PdInner {
    pd: NonNull<sys::ibv_pd>,
    ctx: Context,
}

// SAFETY: a PD is only passed to thread-safe verbs (reg_mr, create_qp,
// dealloc_pd) and freed in Drop when no other reference exists.
unsafe impl Send for PdInner {}
// SAFETY: see Send.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: the PD was allocated by ibv_alloc_pd and is freed once; every
        // MR and QP made in it holds an Arc to this value, so none is alive.
        // The context (a field) is released after this, so it outlives the PD.
        let rc = unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
        if rc != 0 {
            eprintln!(
                "godwit rdma: ibv_dealloc_pd on {} failed: {rc}",
                self.ctx.name()
            );
        }
    }
}

/// A protection domain: memory regions and queue pairs made in the same PD
/// may be used together. Cheap to clone.
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(crate) inner: Arc<PdInner>,
}

impl fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.inner.ctx.name())
            .finish()
    }
}

/// Access rights of a memory region (or of a queue pair's responder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access(u32);

impl Access {
    /// Only the local device reads the memory (sources of SEND and WRITE).
    pub const LOCAL_READ: Access = Access(0);
    /// The local device may write (receive buffers).
    pub const LOCAL_WRITE: Access = Access(sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0);
    /// The peer may RDMA WRITE into it (implies LOCAL_WRITE).
    pub const REMOTE_WRITE: Access = Access(
        sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            | sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
    );
    /// The peer may RDMA READ from it.
    pub const REMOTE_READ: Access = Access(sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0);

    /// The raw `ibv_access_flags` bits.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

impl Context {
    /// Allocates a protection domain.
    pub fn alloc_pd(&self) -> Result<ProtectionDomain> {
        // SAFETY: the context is open; the PD is freed in PdInner::drop.
        let pd = unsafe { sys::ibv_alloc_pd(self.as_ptr()) };
        let pd = NonNull::new(pd).ok_or_else(|| {
            RdmaError::verbs(
                "ibv_alloc_pd",
                io::Error::last_os_error(),
                "the device may be out of resources or removed",
            )
        })?;
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                pd,
                ctx: self.clone(),
            }),
        })
    }
}

/// A page-aligned, zeroed heap allocation.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

const PAGE: usize = 4096;

impl AlignedBuf {
    fn zeroed(len: usize) -> Result<AlignedBuf> {
        let layout = Layout::from_size_align(len, PAGE)
            .map_err(|e| RdmaError::InvalidArgument(format!("buffer of {len} bytes: {e}")))?;
        // SAFETY: `layout` has a non-zero size (callers reject len 0).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| RdmaError::Register {
            len,
            source: io::Error::from_raw_os_error(libc::ENOMEM),
            memlock: MemlockDisplay(memlock_limit().0),
        })?;
        Ok(AlignedBuf { ptr, layout })
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by alloc_zeroed with this very layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

enum Backing {
    /// Memory the MR owns and frees after deregistration.
    Aligned(AlignedBuf),
    /// A Vec the MR owns (its heap block does not move when the Vec does).
    Vec(Vec<u8>),
    /// Memory owned elsewhere (guest RAM), see `register_raw`.
    Borrowed,
}

/// A registered (pinned) memory region.
///
/// Its memory is either owned by the region (registered with
/// [`ProtectionDomain::alloc_mr`] or [`ProtectionDomain::register_vec`]) or
/// memory that already exists ([`ProtectionDomain::register_raw`]).
/// Dropping it deregisters the memory first, then frees owned memory, then
/// releases its PD.
///
/// # Concurrency with the device
/// The device reads and writes the memory by DMA, outside Rust's view: data
/// in a send buffer must not change until its send completes, and data that
/// a peer writes or a receive fills is meaningful only after the completion
/// (or a message from the peer) says it has arrived.
pub struct MemoryRegion {
    mr: NonNull<sys::ibv_mr>,
    addr: u64,
    len: usize,
    lkey: u32,
    rkey: u32,
    access: Access,
    // Dropped after `mr` is deregistered (see Drop), in field order.
    backing: Backing,
    pd: ProtectionDomain,
}

// SAFETY: the ibv_mr pointer is only read at construction and passed to
// ibv_dereg_mr in Drop; the owned memory is a plain heap block.
unsafe impl Send for MemoryRegion {}
// SAFETY: shared access only reads the cached keys/addresses or the owned
// memory through `&self` (as_slice), which is the same as sharing a `&[u8]`.
unsafe impl Sync for MemoryRegion {}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: the MR was registered by ibv_reg_mr and is deregistered
        // exactly once; its PD is still alive (held in `self.pd`).
        let rc = unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
        if rc != 0 {
            eprintln!(
                "godwit rdma: ibv_dereg_mr({} bytes) failed: {}; leaking its memory, \
                 which the device may still access",
                self.len,
                io::Error::from_raw_os_error(rc.abs())
            );
            // The device may still write there: never give it back.
            std::mem::forget(std::mem::replace(&mut self.backing, Backing::Borrowed));
        }
    }
}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("lkey", &format_args!("{:#x}", self.lkey))
            .field("rkey", &format_args!("{:#x}", self.rkey))
            .field("owned", &self.is_owned())
            .finish()
    }
}

impl ProtectionDomain {
    /// The context the PD belongs to.
    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_pd {
        self.inner.pd.as_ptr()
    }

    /// Allocates `len` zeroed, page-aligned bytes and registers them.
    pub fn alloc_mr(&self, len: usize, access: Access) -> Result<MemoryRegion> {
        if len == 0 {
            return Err(RdmaError::InvalidArgument("cannot register 0 bytes".into()));
        }
        let buf = AlignedBuf::zeroed(len)?;
        let ptr = buf.ptr.as_ptr();
        // SAFETY: `buf` is a live allocation of `len` bytes that the MR owns
        // and frees only after deregistering it (MemoryRegion's Drop).
        unsafe { self.reg(ptr, len, access, Backing::Aligned(buf)) }
    }

    /// Registers a vector's memory; the region owns the vector from now on.
    pub fn register_vec(&self, buf: Vec<u8>, access: Access) -> Result<MemoryRegion> {
        let mut buf = buf;
        if buf.is_empty() {
            return Err(RdmaError::InvalidArgument("cannot register 0 bytes".into()));
        }
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        // SAFETY: the Vec's heap block (`len` initialised bytes) is owned by
        // the MR, never reallocated (no &mut Vec is handed out) and freed
        // only after deregistration.
        unsafe { self.reg(ptr, len, access, Backing::Vec(buf)) }
    }

    /// Registers memory that already exists, e.g. guest RAM mapped by the
    /// VMM.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be one mapping of readable (and, for any write
    /// access, writable) memory that stays mapped, at the same address and
    /// not remapped, until the returned region is dropped. The device may
    /// read it (local sends, REMOTE_READ) and write it (receives,
    /// REMOTE_WRITE) at any time while it is registered, concurrently with
    /// the program: the caller must not rely on its content being stable
    /// then, and must not hold Rust references whose aliasing guarantees
    /// such writes would break.
    pub unsafe fn register_raw(
        &self,
        ptr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<MemoryRegion> {
        if len == 0 || ptr.is_null() {
            return Err(RdmaError::InvalidArgument(
                "cannot register a null pointer or 0 bytes".into(),
            ));
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { self.reg(ptr, len, access, Backing::Borrowed) }
    }

    /// # Safety
    /// `ptr..ptr+len` stays valid until the region is dropped (owned through
    /// `backing`, or by the caller's contract).
    unsafe fn reg(
        &self,
        ptr: *mut u8,
        len: usize,
        access: Access,
        backing: Backing,
    ) -> Result<MemoryRegion> {
        let flags = libc::c_int::try_from(access.bits())
            .map_err(|_| RdmaError::InvalidArgument(format!("access flags {access:?}")))?;
        // SAFETY: the PD is alive; the memory range is valid for the region's
        // lifetime per this function's contract; the kernel pins it.
        let mr = unsafe { sys::ibv_reg_mr(self.as_ptr(), ptr.cast(), len, flags) };
        let Some(mr) = NonNull::new(mr) else {
            let source = io::Error::last_os_error();
            // `backing` (possibly owned memory) is dropped here: it was
            // never registered.
            drop(backing);
            return Err(RdmaError::Register {
                len,
                source,
                memlock: MemlockDisplay(memlock_limit().0),
            });
        };
        // SAFETY: ibv_reg_mr returned a valid ibv_mr whose plain fields we
        // read once.
        let (lkey, rkey) = unsafe { ((*mr.as_ptr()).lkey, (*mr.as_ptr()).rkey) };
        Ok(MemoryRegion {
            mr,
            addr: ptr as u64,
            len,
            lkey,
            rkey,
            access,
            backing,
            pd: self.clone(),
        })
    }
}

/// A remote memory region, as the peer needs it to RDMA WRITE into it.
/// Plain data: send it to the peer with [`RemoteRegion::to_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Virtual address of its first byte.
    pub addr: u64,
    /// Its remote key.
    pub rkey: u32,
    /// Its length in bytes.
    pub len: u64,
}

impl RemoteRegion {
    /// Encoded length in bytes.
    pub const ENCODED_LEN: usize = 20;

    /// Big-endian encoding: addr, rkey, len.
    pub fn to_bytes(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0; Self::ENCODED_LEN];
        b[..8].copy_from_slice(&self.addr.to_be_bytes());
        b[8..12].copy_from_slice(&self.rkey.to_be_bytes());
        b[12..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes [`RemoteRegion::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<RemoteRegion> {
        let b: &[u8; Self::ENCODED_LEN] = b.try_into().map_err(|_| {
            RdmaError::InvalidArgument(format!(
                "remote region is {} bytes, expected {}",
                b.len(),
                Self::ENCODED_LEN
            ))
        })?;
        let (a, r, l) = (&b[..8], &b[8..12], &b[12..]);
        Ok(RemoteRegion {
            addr: u64::from_be_bytes(a.try_into().unwrap_or_default()),
            rkey: u32::from_be_bytes(r.try_into().unwrap_or_default()),
            len: u64::from_be_bytes(l.try_into().unwrap_or_default()),
        })
    }

    /// The address `offset` bytes in, checking that `len` bytes fit.
    pub fn at(&self, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.addr + offset),
            _ => Err(RdmaError::OutOfBounds {
                offset: offset as usize,
                len: len as usize,
                size: self.len as usize,
            }),
        }
    }
}

/// One scatter/gather entry: a range of a live memory region.
#[derive(Debug, Clone, Copy)]
pub struct Sge<'a> {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) lkey: u32,
    _mr: PhantomData<&'a MemoryRegion>,
}

impl Sge<'_> {
    /// Its length in bytes.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn raw(&self) -> sys::ibv_sge {
        sys::ibv_sge {
            addr: self.addr,
            length: self.len,
            lkey: self.lkey,
        }
    }
}

impl MemoryRegion {
    /// Local key (for scatter/gather entries).
    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    /// Remote key (for the peer's RDMA WRITE/READ).
    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// Virtual address of the first byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never: 0-byte regions are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The access rights it was registered with.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The protection domain it belongs to.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.pd
    }

    /// Whether the region owns its memory (not [`ProtectionDomain::register_raw`]).
    pub fn is_owned(&self) -> bool {
        !matches!(self.backing, Backing::Borrowed)
    }

    /// What the peer needs to write into this region.
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.addr,
            rkey: self.rkey,
            len: self.len as u64,
        }
    }

    /// A scatter/gather entry for `len` bytes at `offset`.
    pub fn sge(&self, offset: usize, len: usize) -> Result<Sge<'_>> {
        let oob = || RdmaError::OutOfBounds {
            offset,
            len,
            size: self.len,
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => return Err(oob()),
        }
        let len32 = u32::try_from(len).map_err(|_| oob())?;
        Ok(Sge {
            addr: self.addr + offset as u64,
            len: len32,
            lkey: self.lkey,
            _mr: PhantomData,
        })
    }

    /// The owned memory (None for [`ProtectionDomain::register_raw`]
    /// regions, whose memory the caller reaches through its own pointer).
    /// See the type's note on concurrency with the device.
    pub fn as_slice(&self) -> Option<&[u8]> {
        match &self.backing {
            Backing::Aligned(b) => {
                // SAFETY: the allocation is `len` initialised (zeroed) bytes
                // owned by `self`, borrowed immutably for the life of `&self`.
                Some(unsafe { std::slice::from_raw_parts(b.ptr.as_ptr(), self.len) })
            }
            Backing::Vec(v) => Some(v),
            Backing::Borrowed => None,
        }
    }

    /// The owned memory, mutably (None for raw regions).
    pub fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        let len = self.len;
        match &mut self.backing {
            Backing::Aligned(b) => {
                // SAFETY: as in as_slice; `&mut self` makes the borrow unique
                // on the program's side.
                Some(unsafe { std::slice::from_raw_parts_mut(b.ptr.as_ptr(), len) })
            }
            Backing::Vec(v) => Some(v),
            Backing::Borrowed => None,
        }
    }
}

/// The RLIMIT_MEMLOCK (soft, hard) in bytes; `None` is unlimited.
pub fn memlock_limit() -> (Option<u64>, Option<u64>) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid out-parameter.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) };
    if rc != 0 {
        return (None, None);
    }
    let conv = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    (conv(rl.rlim_cur), conv(rl.rlim_max))
}

/// Raises RLIMIT_MEMLOCK as far as allowed: to unlimited when the process
/// may (root / CAP_SYS_RESOURCE), else the soft limit to the hard one.
/// Returns the new soft limit (`None`: unlimited). Memory registration pins
/// pages and counts against this limit unless the process has CAP_IPC_LOCK.
pub fn raise_memlock_limit() -> Result<Option<u64>> {
    let set = |cur, max| {
        let rl = libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        };
        // SAFETY: `rl` is a valid, initialised rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) == 0 }
    };
    if !set(libc::RLIM_INFINITY, libc::RLIM_INFINITY) {
        let (_, hard) = memlock_limit();
        let hard = hard.unwrap_or(libc::RLIM_INFINITY);
        if !set(hard, hard) {
            return Err(RdmaError::verbs(
                "setrlimit(RLIMIT_MEMLOCK)",
                io::Error::last_os_error(),
                "run as root or set the limit before starting (`ulimit -l unlimited`)",
            ));
        }
    }
    Ok(memlock_limit().0)
}
