//! Post-copy: the last rung of the escalation ladder, for a guest that dirties memory faster
//! than any pre-copy round can move it (`--allow-postcopy`).
//!
//! ```text
//!  source (paused)                                      destination
//!    | == final round: no pages ===========================> |
//!    | -- StalePages (bitmap of pages dirtied since sent) --> |  drop them (MADV_DONTNEED),
//!    | -- Switchover { postcopy } -------------------------> |  register userfaultfd, load state
//!    | <-------------- Restored / Commit / Resumed --------> |  the VM runs here: downtime ends
//!    | == background round: every stale page (streams) ===> |  UFFDIO_COPY (EEXIST: already there)
//!    | <------------- PageRequest(gpa...) ------------------ |  a vCPU touched a missing page
//!    | -- UrgentPages (control channel) --------------------> |  UFFDIO_COPY wakes the vCPU
//!    | <------------- PostCopyDone(figures) ---------------- |  every page here: unregister
//!  release
//! ```
//!
//! Urgent pages overtake the background push: they travel on the control channel, which
//! carries nothing else in this phase and is not rate-limited. The source's memory is frozen
//! (paused), so a page sent twice is the same page; the destination keeps whichever came
//! first, because the guest may have written it since. Pages the source already sent on
//! demand are skipped by the background push.
//!
//! The risk, said plainly: from the commit until `PostCopyDone`, the guest's newest state is
//! split between the hosts. If either side or the link fails then, the running copy on the
//! destination cannot continue, and the source's paused copy is the guest as of the
//! switchover. Godwit keeps that copy (paused, never resumed on its own) until the destination
//! has every page, and the operator chooses: resume it there (losing what the guest did on
//! the destination) or stop it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Receiver};
use godwit_transport::FrameSink;
use vm_memory::{Bytes, GuestAddress};

use super::batch;
use super::pipeline::StreamEvent;
use super::protocol::{
    self, Message, PostCopyFigures, UrgentPage, MAX_PAGE_REQUEST, MAX_STALE_WORDS, MAX_URGENT_PAGES,
};
use super::MigrationError;
use crate::vmm::memory::{DirtyBitmap, GuestMemory, MemoryLayout, PAGE_SIZE};
use crate::vmm::userfault::{Placed, Userfault};
use crate::vmm::Vm;

/// How often the fault thread looks up from the userfaultfd to see whether it should stop.
const FAULT_POLL: Duration = Duration::from_millis(50);
/// How often the destination checks that no page asked for is overdue.
const ASK_CHECK: Duration = Duration::from_millis(500);
/// How often the source's request server looks up to see whether the push ended.
const SERVE_POLL: Duration = Duration::from_millis(100);

/// Where incoming pages land on the destination: in plain memory during pre-copy, through
/// the userfaultfd once post-copy is armed (a plain write would itself fault on a dropped page).
#[derive(Debug, Default)]
pub struct Landing(OnceLock<Arc<PostCopyMemory>>);

impl Landing {
    /// Writes one page (`None`: a zero page) into guest memory.
    pub fn place(
        &self,
        memory: &GuestMemory,
        gpa: u64,
        data: Option<&[u8]>,
        probe: &mut [u8],
    ) -> Result<(), MigrationError> {
        if let Some(pc) = self.0.get() {
            return pc.place(gpa, data).map(drop);
        }
        let mem = |e: vm_memory::GuestMemoryError| MigrationError::Memory(e.to_string());
        match data {
            Some(d) => memory.write_slice(d, GuestAddress(gpa)).map_err(mem),
            None => {
                // Memory here starts zeroed; reading an untouched page does not allocate it.
                memory.read_slice(probe, GuestAddress(gpa)).map_err(mem)?;
                if probe.iter().any(|&x| x != 0) {
                    probe.fill(0);
                    memory.write_slice(probe, GuestAddress(gpa)).map_err(mem)?;
                }
                Ok(())
            }
        }
    }

    /// From now on pages land through `pc`.
    fn arm(&self, pc: Arc<PostCopyMemory>) {
        let _ = self.0.set(pc);
    }
}

/// The destination's guest memory in post-copy: stale pages dropped, faults on them caught.
#[derive(Debug)]
pub struct PostCopyMemory {
    uffd: Userfault,
    layout: MemoryLayout,
    /// `(guest physical address, host address, length)` of each RAM region.
    areas: Vec<(u64, usize, usize)>,
    stale: DirtyBitmap,
}

impl PostCopyMemory {
    /// Drops the stale pages of the paused `vm` and catches faults on missing pages.
    fn arm(vm: &Vm, stale: DirtyBitmap) -> Result<Self, MigrationError> {
        let cannot = |what: &str, e: std::io::Error| {
            MigrationError::Memory(format!(
                "cannot {what} for post-copy: {e} (userfaultfd needs root or CAP_SYS_PTRACE)"
            ))
        };
        let mut uffd = Userfault::new().map_err(|e| cannot("open a userfaultfd", e))?;
        let areas: Vec<(u64, usize, usize)> = vm
            .ram_areas()
            .into_iter()
            .map(|(gpa, host, len)| (gpa, host as usize, len))
            .collect();
        for &(_, host, len) in &areas {
            uffd.register(host as *mut u8, len)
                .map_err(|e| cannot("register guest memory", e))?;
        }
        let layout = vm.layout().clone();
        // Registered first, dropped second: no vCPU runs and no receiver writes meanwhile, and
        // from here a touch of a dropped page waits for its fresh copy.
        for (words, &(_, host, _)) in stale.regions.iter().zip(&areas) {
            for (first, pages) in runs(words) {
                let at = host + (first * PAGE_SIZE) as usize;
                let len = (pages * PAGE_SIZE) as usize;
                // SAFETY: `[at, at + len)` lies inside this region's mapping (the bitmap was
                // checked against the layout), which the VM owns and keeps mapped; dropping
                // pages only discards contents that are stale by the source's word, and the
                // next touch of one waits on the userfaultfd for the fresh copy.
                let r = unsafe { libc::madvise(at as *mut libc::c_void, len, libc::MADV_DONTNEED) };
                if r != 0 {
                    return Err(cannot("drop stale pages", std::io::Error::last_os_error()));
                }
            }
        }
        Ok(Self {
            uffd,
            layout,
            areas,
            stale,
        })
    }

    fn host(&self, gpa: u64) -> Option<usize> {
        self.areas
            .iter()
            .find(|&&(g, _, len)| gpa >= g && gpa < g + len as u64)
            .map(|&(g, h, _)| h + (gpa - g) as usize)
    }

    fn gpa(&self, host: usize) -> Option<u64> {
        self.areas
            .iter()
            .find(|&&(_, h, len)| host >= h && host < h + len)
            .map(|&(g, h, _)| g + (host - h) as u64)
    }

    /// Places a page (`None`: zero) if it is still missing.
    fn place(&self, gpa: u64, data: Option<&[u8]>) -> Result<Placed, MigrationError> {
        let host = self
            .host(gpa)
            .ok_or_else(|| MigrationError::Memory(format!("page {gpa:#x} is not guest RAM")))?;
        let r = match data {
            Some(d) => self.uffd.copy_page(host, d),
            None => self.uffd.zero_page(host),
        };
        r.map_err(|e| MigrationError::Memory(format!("cannot place page {gpa:#x}: {e}")))
    }

    /// Ends fault catching: memory behaves as plain memory again.
    pub(crate) fn disarm(&self) {
        let _ = self.uffd.unregister_all();
    }
}

/// Runs of marked bits in `words`: `(first page, pages)`.
fn runs(words: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (wi, &w) in words.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let bit = u64::from(w.trailing_zeros());
            let page = wi as u64 * 64 + bit;
            match out.last_mut() {
                Some((first, n)) if *first + *n == page => *n += 1,
                _ => out.push((page, 1)),
            }
            w &= w - 1;
        }
    }
    out
}

/// The `StalePages` messages that announce `stale`.
pub(crate) fn stale_messages(stale: &DirtyBitmap) -> Vec<Message> {
    let mut out = Vec::new();
    for (region, words) in stale.regions.iter().enumerate() {
        for (chunk, part) in words.chunks(MAX_STALE_WORDS).enumerate() {
            if part.iter().any(|&w| w != 0) {
                out.push(Message::StalePages {
                    region: region as u32,
                    first_word: (chunk * MAX_STALE_WORDS) as u32,
                    words: part.to_vec(),
                });
            }
        }
    }
    out
}

/// Takes in one `StalePages` message from the (authenticated, still untrusted) source.
pub(crate) fn take_stale(
    stale: &mut Option<DirtyBitmap>,
    layout: &MemoryLayout,
    region: u32,
    first_word: u32,
    words: &[u64],
) -> Result<(), MigrationError> {
    let bitmap = stale.get_or_insert_with(|| DirtyBitmap::empty(layout));
    bitmap
        .mark_words(layout, region as usize, first_word as usize, words)
        .map_err(|e| MigrationError::Memory(format!("refused a bad stale-page bitmap: {e}")))
}

/// The destination, once the VM runs: catches its faults on stale pages, asks the source for
/// them, places them as they come (asked for or pushed), and returns when every stale page is
/// here and the background round `round` has ended on every stream. `idle` bounds the wait
/// for a page asked for; the streams' own read timeouts bound a silent push.
pub(crate) struct DestinationPostCopy<'a> {
    pub pc: Arc<PostCopyMemory>,
    pub inbox: &'a Receiver<Result<Message, MigrationError>>,
    pub events: &'a Receiver<StreamEvent>,
    pub rounds_done: &'a [u32],
    pub round: u32,
    pub control: &'a mut dyn FrameSink,
    pub idle: Duration,
}

/// Arms post-copy on the paused `vm`: drops `stale` pages and lands later pages through the
/// userfaultfd.
pub(crate) fn arm(
    vm: &Vm,
    stale: DirtyBitmap,
    landing: &Landing,
) -> Result<Arc<PostCopyMemory>, MigrationError> {
    let pc = Arc::new(PostCopyMemory::arm(vm, stale)?);
    landing.arm(pc.clone());
    Ok(pc)
}

impl DestinationPostCopy<'_> {
    /// Runs post-copy to its end; on failure the caller must stop the VM before dropping it.
    pub fn run(mut self) -> Result<PostCopyFigures, MigrationError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (faults_tx, faults) = unbounded::<u64>();
        let fault_count = Arc::new(AtomicU64::new(0));
        let handler = {
            let (pc, stop, count) = (self.pc.clone(), stop.clone(), fault_count.clone());
            std::thread::Builder::new()
                .name("postcopy-faults".into())
                .spawn(move || -> Result<(), MigrationError> {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(host) = pc.uffd.next_fault(FAULT_POLL).map_err(|e| {
                            MigrationError::Memory(format!("reading guest page faults: {e}"))
                        })?
                        else {
                            continue;
                        };
                        count.fetch_add(1, Ordering::Relaxed);
                        let Some(gpa) = pc.gpa(host) else { continue };
                        if pc.stale.contains(&pc.layout, gpa) {
                            if faults_tx.send(gpa).is_err() {
                                break;
                            }
                        } else if pc.place(gpa, None)? == Placed::Already {
                            // Not stale: a page that was never written, so zero.
                            let _ = pc.uffd.wake(host);
                        }
                    }
                    Ok(())
                })
                .map_err(|e| {
                    MigrationError::Memory(format!("cannot start the fault thread: {e}"))
                })?
        };
        let result = self.serve(&faults, &fault_count);
        stop.store(true, Ordering::Relaxed);
        let handled = handler
            .join()
            .unwrap_or(Err(MigrationError::PipelineClosed));
        let figures = result?;
        handled?;
        self.pc.disarm();
        Ok(figures)
    }

    fn serve(
        &mut self,
        faults: &Receiver<u64>,
        fault_count: &AtomicU64,
    ) -> Result<PostCopyFigures, MigrationError> {
        let mut asked: HashMap<u64, Instant> = HashMap::new();
        let mut figures = PostCopyFigures::default();
        let mut total_wait = Duration::ZERO;
        let mut rounds_done = self.rounds_done.to_vec();
        let mut control = ControlSink(&mut *self.control);
        loop {
            if rounds_done.iter().all(|&r| r >= self.round) && asked.is_empty() {
                break;
            }
            select! {
                recv(faults) -> gpa => {
                    let Ok(gpa) = gpa else { return Err(MigrationError::PipelineClosed) };
                    let mut batch = Vec::new();
                    for gpa in std::iter::once(gpa).chain(faults.try_iter()) {
                        if batch.len() < MAX_PAGE_REQUEST && !asked.contains_key(&gpa) {
                            asked.insert(gpa, Instant::now());
                            batch.push(gpa);
                        }
                    }
                    if !batch.is_empty() {
                        control.send(&Message::PageRequest(batch))?;
                    }
                }
                recv(self.inbox) -> m => match m.map_err(|_| MigrationError::PeerVanished("post-copy"))?? {
                    Message::UrgentPages(pages) => {
                        if pages.len() > MAX_URGENT_PAGES {
                            return Err(MigrationError::Memory(format!("refused {} urgent pages in one message", pages.len())));
                        }
                        for p in pages {
                            place_urgent(&self.pc, &p)?;
                            if let Some(at) = asked.remove(&p.gpa) {
                                let waited = at.elapsed();
                                figures.fetched += 1;
                                figures.max_wait_us = figures.max_wait_us.max(waited.as_micros() as u64);
                                total_wait += waited;
                            }
                        }
                    }
                    Message::Abort(why) => return Err(MigrationError::PeerAborted(why)),
                    m => return Err(MigrationError::Unexpected { expected: "UrgentPages", got: m.name() }),
                },
                recv(self.events) -> e => match e {
                    Ok(StreamEvent::RoundEnd { stream, round }) => rounds_done[stream] = round,
                    Ok(StreamEvent::Failed { stream, error }) => return Err(MigrationError::Stream { stream, error }),
                    Err(_) => return Err(MigrationError::PeerVanished("post-copy")),
                },
                // The background push may outlast any one timeout; a silent source shows as
                // a stream's read timeout (its `Failed` event), or as a page asked for and
                // not sent.
                default(ASK_CHECK) => {
                    if asked.values().any(|at| at.elapsed() >= self.idle) {
                        return Err(MigrationError::Timeout {
                            what: "a page the guest waits for, asked of the source",
                            secs: self.idle.as_secs(),
                        });
                    }
                }
            }
        }
        figures.faults = fault_count.load(Ordering::Relaxed);
        if figures.fetched > 0 {
            figures.mean_wait_us = (total_wait / figures.fetched as u32).as_micros() as u64;
        }
        control.send(&Message::PostCopyDone(figures))?;
        Ok(figures)
    }
}

/// Places a page the source sent on demand; only stale pages are taken.
fn place_urgent(pc: &PostCopyMemory, p: &UrgentPage) -> Result<(), MigrationError> {
    if !pc.stale.contains(&pc.layout, p.gpa) {
        return Err(MigrationError::Memory(format!(
            "refused urgent page {:#x}: not a stale page",
            p.gpa
        )));
    }
    let data = match p.data.len() {
        0 => None,
        n if n == PAGE_SIZE as usize => Some(&p.data[..]),
        n => {
            return Err(MigrationError::Memory(format!(
                "refused urgent page {:#x} of {n} bytes",
                p.gpa
            )))
        }
    };
    if pc.place(p.gpa, data)? == Placed::Already {
        if let Some(host) = pc.host(p.gpa) {
            let _ = pc.uffd.wake(host);
        }
    }
    Ok(())
}

struct ControlSink<'a>(&'a mut dyn FrameSink);

impl ControlSink<'_> {
    fn send(&mut self, m: &Message) -> Result<(), MigrationError> {
        self.0.send(&[&protocol::encode(m)])?;
        self.0.flush()?;
        Ok(())
    }
}

/// Pages the source sent on demand, so the background push skips them.
#[derive(Debug)]
pub(crate) struct SentPages {
    layout: MemoryLayout,
    words: Vec<Vec<AtomicU64>>,
}

impl SentPages {
    pub(crate) fn new(layout: &MemoryLayout) -> Self {
        let words = DirtyBitmap::empty(layout)
            .regions
            .into_iter()
            .map(|r| r.into_iter().map(AtomicU64::new).collect())
            .collect();
        Self {
            layout: layout.clone(),
            words,
        }
    }

    fn mark(&self, gpa: u64) {
        if let Some((r, i)) = self.layout.locate(gpa) {
            self.words[r][(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Relaxed);
        }
    }

    /// Whether `gpa` was sent on demand.
    pub(crate) fn contains(&self, gpa: u64) -> bool {
        self.layout.locate(gpa).is_some_and(|(r, i)| {
            self.words[r][(i / 64) as usize].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
        })
    }
}

/// What the source's request server saw.
#[derive(Debug, Default)]
pub(crate) struct Served {
    /// Pages sent on demand.
    pub urgent_pages: u64,
    /// The destination's figures.
    pub figures: PostCopyFigures,
}

/// The source in post-copy: answers the destination's page requests from the paused guest's
/// memory until the destination reports every page arrived. `push_ended` is set once the
/// background push is done (or failed); the destination then has `timeout` to finish.
pub(crate) fn serve_requests(
    control: &mut dyn FrameSink,
    inbox: &Receiver<Result<Message, MigrationError>>,
    memory: &GuestMemory,
    stale: (&DirtyBitmap, &MemoryLayout),
    sent: &SentPages,
    push_ended: &AtomicBool,
    timeout: Duration,
) -> Result<Served, MigrationError> {
    let mut served = Served::default();
    let mut control = ControlSink(control);
    let mut ended_at: Option<Instant> = None;
    loop {
        let m = match inbox.recv_timeout(SERVE_POLL) {
            Ok(m) => m?,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err(MigrationError::PeerVanished("post-copy"))
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if push_ended.load(Ordering::Relaxed) {
                    let at = *ended_at.get_or_insert_with(Instant::now);
                    if at.elapsed() >= timeout {
                        return Err(MigrationError::Timeout {
                            what: "the destination to confirm every page arrived",
                            secs: timeout.as_secs(),
                        });
                    }
                }
                continue;
            }
        };
        match m {
            Message::PageRequest(gpas) => {
                if gpas.len() > MAX_PAGE_REQUEST {
                    return Err(MigrationError::Memory(format!(
                        "the destination asked for {} pages in one request",
                        gpas.len()
                    )));
                }
                for chunk in gpas.chunks(MAX_URGENT_PAGES) {
                    let mut pages = Vec::with_capacity(chunk.len());
                    for &gpa in chunk {
                        if !stale.0.contains(stale.1, gpa) {
                            return Err(MigrationError::Memory(format!(
                                "the destination asked for page {gpa:#x}, which is not stale"
                            )));
                        }
                        let mut data = vec![0u8; PAGE_SIZE as usize];
                        memory
                            .read_slice(&mut data, GuestAddress(gpa))
                            .map_err(|e| MigrationError::Memory(e.to_string()))?;
                        if batch::is_zero_page(&data) {
                            data = Vec::new();
                        }
                        sent.mark(gpa);
                        pages.push(UrgentPage { gpa, data });
                    }
                    served.urgent_pages += pages.len() as u64;
                    control.send(&Message::UrgentPages(pages))?;
                }
            }
            Message::PostCopyDone(figures) => {
                served.figures = figures;
                return Ok(served);
            }
            Message::RoundApplied(_) => {}
            Message::Abort(why) => return Err(MigrationError::PeerAborted(why)),
            m => {
                return Err(MigrationError::Unexpected {
                    expected: "PageRequest or PostCopyDone",
                    got: m.name(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory::RamRegion;

    #[test]
    fn runs_join_neighbouring_pages() {
        assert_eq!(runs(&[0b1110_0110, 0]), vec![(1, 2), (5, 3)]);
        assert_eq!(runs(&[1 << 63, 1]), vec![(63, 2)]);
        assert!(runs(&[0, 0]).is_empty());
    }

    #[test]
    fn a_stale_bitmap_crosses_in_messages_and_bad_ones_are_refused() {
        let layout = MemoryLayout {
            regions: vec![RamRegion {
                start: 0,
                size: 100 * PAGE_SIZE,
            }],
        };
        let mut stale = DirtyBitmap::empty(&layout);
        stale.regions[0][1] = 0b101;
        let mut got = None;
        for m in stale_messages(&stale) {
            let Message::StalePages {
                region,
                first_word,
                words,
            } = m
            else {
                panic!("not StalePages");
            };
            take_stale(&mut got, &layout, region, first_word, &words).unwrap();
        }
        assert_eq!(got.as_ref(), Some(&stale));
        assert!(stale.contains(&layout, 64 * PAGE_SIZE));
        assert!(!stale.contains(&layout, 65 * PAGE_SIZE));
        // Past the region's 100 pages, another region, words beyond the end.
        assert!(take_stale(&mut got, &layout, 0, 1, &[1 << 40]).is_err());
        assert!(take_stale(&mut got, &layout, 1, 0, &[1]).is_err());
        assert!(take_stale(&mut got, &layout, 0, 1, &[1, 1]).is_err());
    }
}
