//! Missing-page faults of guest RAM delivered to a thread of the VMM (Linux userfaultfd), what
//! post-copy migration is built on: the destination runs the guest before all of its memory
//! has arrived, and a guest (or KVM on its behalf) touching a page that is not there yet waits
//! until the VMM places it.
//!
//! Only the few ioctls post-copy needs are wrapped (`UFFDIO_API`, `REGISTER`, `UNREGISTER`,
//! `COPY`, `ZEROPAGE`, `WAKE`; Documentation/admin-guide/mm/userfaultfd.rst). Faults taken in
//! the kernel count too (KVM reads guest memory with `get_user_pages`), so the descriptor is
//! not opened "user mode only", which takes root (or `CAP_SYS_PTRACE`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

use super::memory::PAGE_SIZE;

/// The API version the kernel must speak.
const UFFD_API: u64 = 0xaa;
/// The ioctl type of userfaultfd.
const UFFDIO: u32 = 0xaa;
/// Register a range for faults on pages that are not present.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// The event of a page fault.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);

/// What placing a page did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// The page was missing and now holds the data; threads waiting on it run again.
    Now,
    /// The page was already there (placed earlier): nothing was written.
    Already,
}

/// A userfaultfd over ranges of this process's memory.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    /// The registered ranges (host address, length): a page is placed only inside them.
    ranges: Vec<(usize, usize)>,
}

fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here takes a pointer to exactly the `repr(C)` struct `T` it
    // is declared with above, which outlives the call; the kernel reads and writes only it.
    let r = unsafe { ioctl_with_mut_ref(fd, request, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Userfault {
    /// Opens a userfaultfd (non-blocking: faults are read with [`Userfault::next_fault`]).
    pub fn new() -> io::Result<Self> {
        // SAFETY: a plain system call with flags only; it returns a new descriptor or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor this process just got and nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..UffdioApi::default()
        };
        ioctl(&fd, UFFDIO_API(), &mut api)?;
        Ok(Self {
            fd,
            ranges: Vec::new(),
        })
    }

    /// Delivers faults on pages of `[start, start + len)` that are not present. The range must
    /// be private anonymous memory that this process keeps mapped while registered.
    pub fn register(&mut self, start: *mut u8, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(&self.fd, UFFDIO_REGISTER(), &mut reg)?;
        self.ranges.push((start as usize, len));
        Ok(())
    }

    /// Ends fault delivery everywhere: missing pages fault in normally again (as zeros), and
    /// threads waiting on one retry. Placing pages is refused from then on only by the kernel.
    pub fn unregister_all(&self) -> io::Result<()> {
        for &(start, len) in &self.ranges {
            let mut range = UffdioRange {
                start: start as u64,
                len: len as u64,
            };
            ioctl(&self.fd, UFFDIO_UNREGISTER(), &mut range)?;
        }
        Ok(())
    }

    /// Whether the page at `addr` lies in a registered range.
    fn covers(&self, addr: usize) -> bool {
        addr % PAGE_SIZE as usize == 0
            && self
                .ranges
                .iter()
                .any(|&(s, l)| addr >= s && addr + PAGE_SIZE as usize <= s + l)
    }

    /// Waits up to `timeout` for a fault; returns the faulting page's host address.
    pub fn next_fault(&self, timeout: Duration) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is one valid pollfd that outlives the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(None);
        }
        // A `struct uffd_msg`: the event in byte 0; for a page fault, the address at 16.
        let mut msg = [0u8; 32];
        // SAFETY: reads at most `msg.len()` bytes into `msg`, which outlives the call.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if r as usize != msg.len() || msg[0] != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        let addr = u64::from_le_bytes(msg[16..24].try_into().unwrap_or_default()) as usize;
        Ok(Some(addr & !(PAGE_SIZE as usize - 1)))
    }

    /// Places `data` (one page) at `addr` if the page is missing there, and wakes whoever
    /// waits on it.
    pub fn copy_page(&self, addr: usize, data: &[u8]) -> io::Result<Placed> {
        if data.len() != PAGE_SIZE as usize || !self.covers(addr) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut copy = UffdioCopy {
            dst: addr as u64,
            src: data.as_ptr() as u64,
            len: PAGE_SIZE,
            ..UffdioCopy::default()
        };
        placed(ioctl(&self.fd, UFFDIO_COPY(), &mut copy))
    }

    /// Places a zero page at `addr` if the page is missing there, and wakes its waiters.
    pub fn zero_page(&self, addr: usize) -> io::Result<Placed> {
        if !self.covers(addr) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut zero = UffdioZeropage {
            range: UffdioRange {
                start: addr as u64,
                len: PAGE_SIZE,
            },
            ..UffdioZeropage::default()
        };
        placed(ioctl(&self.fd, UFFDIO_ZEROPAGE(), &mut zero))
    }

    /// Wakes threads waiting on the page at `addr` (one that was placed meanwhile).
    pub fn wake(&self, addr: usize) -> io::Result<()> {
        let mut range = UffdioRange {
            start: addr as u64,
            len: PAGE_SIZE,
        };
        ioctl(&self.fd, UFFDIO_WAKE(), &mut range)
    }
}

/// A page that is already present is not an error: both copies came from the same paused
/// source, and the one there may have been written by the guest since.
fn placed(r: io::Result<()>) -> io::Result<Placed> {
    match r {
        Ok(()) => Ok(Placed::Now),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Placed::Already),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    /// A thread reading a missing page waits until the fault is served; a page served twice
    /// keeps the first copy.
    #[test]
    fn a_reader_waits_for_its_page_and_a_second_copy_changes_nothing() {
        let Ok(mut uffd) = Userfault::new() else {
            eprintln!("skipped: userfaultfd needs root");
            return;
        };
        let len = 4 * PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping; unmapped at the end of the test.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base as usize;
        uffd.register(base as *mut u8, len).unwrap();
        let page1 = base + PAGE_SIZE as usize;
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the mapping, which outlives the thread (joined below).
            let b = unsafe { &*((page1 + 7) as *const AtomicU8) };
            b.load(Ordering::Relaxed)
        });
        let fault = (0..50)
            .find_map(|_| uffd.next_fault(Duration::from_millis(100)).unwrap())
            .expect("the reader's fault");
        assert_eq!(fault, page1);
        let data = vec![0x5au8; PAGE_SIZE as usize];
        assert_eq!(uffd.copy_page(page1, &data).unwrap(), Placed::Now);
        assert_eq!(reader.join().unwrap(), 0x5a);
        let other = vec![1u8; PAGE_SIZE as usize];
        assert_eq!(uffd.copy_page(page1, &other).unwrap(), Placed::Already);
        assert_eq!(uffd.zero_page(base).unwrap(), Placed::Now);
        assert_eq!(uffd.zero_page(base).unwrap(), Placed::Already);
        // Outside the registered range, or unaligned: refused before any ioctl.
        assert!(uffd.copy_page(base + len, &data).is_err());
        assert!(uffd.zero_page(base + 1).is_err());
        uffd.unregister_all().unwrap();
        // SAFETY: the mapping made above, no longer used.
        unsafe {
            libc::munmap(base as *mut libc::c_void, len);
        }
    }
}
