//! Optimizer-state offload to memory-mapped files (ZeRO-Infinity style, on one machine).
//!
//! [`DiskStore`] keeps every parameter's optimizer buffers (its *slots*: AdamW's two moments,
//! SGD's momentum, Lion's moment) in one file per parameter under `memory.offload_dir`,
//! mapped into memory with `memmap2`. The optimizer walks the parameters in a fixed order,
//! one **unit** at a time (a parameter, or a chunk of [`DiskStoreOptions::chunk_elems`]
//! elements of a large one), and tells the store when it is done with a unit
//! ([`DiskStore::release`]). A background thread then
//!
//! - **writes back and drops** that unit: `madvise(MADV_DONTNEED)` removes its pages from
//!   the process (resident memory falls), and with [`Flush::Eager`] `msync` writes them to
//!   the file first and `posix_fadvise(POSIX_FADV_DONTNEED)` drops them from the page
//!   cache, so the state really leaves memory;
//! - **prefetches** the next units (in the same fixed order, wrapping around to the first
//!   parameter for the next step) up to [`DiskStoreOptions::window`] bytes ahead, with
//!   `madvise(MADV_POPULATE_WRITE)`, so the update finds its pages mapped and does not wait
//!   for the disk.
//!
//! So the process holds a window of the state instead of all of it. The update code sees
//! plain `&mut [f32]` slices and computes exactly what it computes on RAM buffers (the
//! results are bitwise the same; the optimizer's tests check it).
//!
//! Correctness never depends on the background thread: the pages of a shared file mapping
//! live in the page cache, so a unit the thread has not prefetched yet is simply faulted in
//! by the update, and one it drops keeps its contents (the kernel moves the dirty bit to the
//! page). The thread only changes *where* the bytes are and *when* they move.
//!
//! **Crash safety.** The files are scratch: the checkpoint is the durable copy of the
//! optimizer state. They live in `<offload_dir>/eg-optimizer-state-<pid>/`; the store removes
//! its directory when dropped, and a new store removes the directories that processes which
//! no longer run left behind (after a crash), so a restart recreates the files from zero and
//! the trainer fills them from the checkpoint. Space is reserved with `posix_fallocate`
//! before a file is mapped, so a full disk is a typed [`Error::OffloadNoSpace`] at
//! allocation and never a `SIGBUS` in the middle of an update (a failing disk can still
//! raise one: that is the nature of memory-mapped I/O).
//!
//! **Rollback snapshots.** [`DiskStore::save_snapshot`] copies the state files next to
//! themselves (`snapshot/`, in the kernel with `copy_file_range`), so the trainer's
//! in-memory rollback point does not hold the state in RAM either;
//! [`DiskStore::restore_snapshot`] copies them back.
//!
//! GPU → host-RAM offload (`memory.offload = "ram"`) needs a CUDA build:
//! [`host_offload_available`] says why it is not available in this one.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use memmap2::{Advice, MmapOptions, MmapRaw, UncheckedAdvice};

use crate::{Error, Result};

const PAGE: usize = 4096;
const F32: usize = 4;
/// Prefix of the per-process state directory inside `memory.offload_dir`.
pub const DIR_PREFIX: &str = "eg-optimizer-state-";

/// When updated state goes back to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flush {
    /// Drop the pages from the process only; the kernel writes them back on its own
    /// schedule and evicts them from the page cache under memory pressure. The fastest: the
    /// state costs resident memory only for the window, and disk bandwidth only when the
    /// machine needs the memory.
    #[default]
    Lazy,
    /// `msync` every unit after its update and drop it from the page cache too, so the
    /// state is on disk and out of memory after every step. Step time is then bounded by
    /// the disk's bandwidth (two passes over the state per step: one read, one write).
    Eager,
}

/// Tuning of a [`DiskStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskStoreOptions {
    /// Bytes of state prefetched ahead of the update (at least one unit is).
    pub window: u64,
    /// Elements per unit: large tensors are updated and moved in chunks of this many
    /// elements (rounded to whole pages), so the window does not depend on the largest
    /// tensor.
    pub chunk_elems: usize,
    /// When updated state goes back to the file.
    pub flush: Flush,
    /// Free space to leave on the offload file system after allocation (for checkpoints
    /// and everything else on that disk).
    pub keep_free: u64,
}

impl Default for DiskStoreOptions {
    /// 64 MiB window (the planner's `offload_window`), chunks of 1 Mi elements (4 MiB per
    /// slot), lazy flushing, 256 MiB kept free.
    fn default() -> Self {
        Self {
            window: 64 << 20,
            chunk_elems: 1 << 20,
            flush: Flush::Lazy,
            keep_free: 256 << 20,
        }
    }
}

/// Why GPU → host-RAM offload cannot run in this build: without the `cuda` feature it is
/// [`Error::FeatureDisabled`]; with it, [`Error::Unsupported`] (not built yet, issue #8).
pub fn host_offload_available() -> Result<()> {
    if cfg!(feature = "cuda") {
        Err(Error::Unsupported {
            what: "optimizer-state offload from a GPU to host RAM (memory.offload = \"ram\")",
            issue: 8,
        })
    } else {
        Err(Error::FeatureDisabled {
            what: "memory.offload = \"ram\" (optimizer state of a GPU model in host RAM; on a CPU the state is already in RAM: use \"none\")",
            feature: "cuda",
        })
    }
}

/// One parameter's file: `slots` regions of `len` f32, each starting on a page.
#[derive(Debug)]
struct ParamFile {
    path: PathBuf,
    file: Arc<File>,
    map: Arc<MmapRaw>,
    slots: usize,
    len: usize,
    /// Bytes from one slot to the next (page-rounded).
    stride: usize,
}

impl ParamFile {
    fn bytes(&self) -> u64 {
        (self.slots * self.stride) as u64
    }
}

/// A unit of work of the background thread: one chunk of one parameter.
#[derive(Debug, Clone)]
struct Unit {
    path: PathBuf,
    map: Arc<MmapRaw>,
    fd: Arc<File>,
    /// Byte ranges of the chunk, one per slot.
    ranges: Vec<Range<usize>>,
}

enum Job {
    Prefetch(Unit),
    /// The unit, how to flush it, and its bytes (counted in `Worker::releasing`).
    Release(Unit, Flush, u64),
    Barrier(Sender<()>),
}

type Failure = Arc<Mutex<Option<Error>>>;

#[derive(Debug)]
struct Worker {
    tx: Sender<Job>,
    handle: Option<JoinHandle<()>>,
    failure: Failure,
    /// Bytes of updated units queued for release and not released yet (still resident).
    releasing: Arc<AtomicU64>,
}

fn run_worker(rx: Receiver<Job>, failure: Failure, releasing: Arc<AtomicU64>) {
    let fail = |e: Error| {
        if let Ok(mut f) = failure.lock()
            && f.is_none()
        {
            *f = Some(e);
        }
    };
    while let Ok(job) = rx.recv() {
        match job {
            Job::Prefetch(u) => {
                for r in &u.ranges {
                    if r.is_empty() {
                        continue;
                    }
                    // POPULATE_WRITE maps the pages writable (reading them from the file
                    // when they are not cached); older kernels only know WILLNEED.
                    if u.map
                        .advise_range(Advice::PopulateWrite, r.start, r.len())
                        .is_err()
                        && let Err(source) = u.map.advise_range(Advice::WillNeed, r.start, r.len())
                    {
                        fail(Error::Offload {
                            path: u.path.clone(),
                            action: "prefetch",
                            source,
                        });
                    }
                }
            }
            Job::Release(u, flush, bytes) => {
                for r in &u.ranges {
                    if r.is_empty() {
                        continue;
                    }
                    if flush == Flush::Eager
                        && let Err(source) = u.map.flush_range(r.start, r.len())
                    {
                        fail(Error::Offload {
                            path: u.path.clone(),
                            action: "write back (msync)",
                            source,
                        });
                        continue;
                    }
                    // SAFETY: MADV_DONTNEED on a shared file mapping only unmaps the pages;
                    // their contents stay in the page cache (dirty ones are written back
                    // later), so no Rust reference into the mapping sees other data.
                    let dropped = unsafe {
                        u.map
                            .unchecked_advise_range(UncheckedAdvice::DontNeed, r.start, r.len())
                    };
                    if let Err(source) = dropped {
                        fail(Error::Offload {
                            path: u.path.clone(),
                            action: "release (madvise)",
                            source,
                        });
                    }
                    if flush == Flush::Eager {
                        // SAFETY: a plain system call on an open descriptor.
                        let rc = unsafe {
                            libc::posix_fadvise(
                                u.fd.as_raw_fd(),
                                r.start as libc::off_t,
                                r.len() as libc::off_t,
                                libc::POSIX_FADV_DONTNEED,
                            )
                        };
                        if rc != 0 {
                            fail(Error::Offload {
                                path: u.path.clone(),
                                action: "drop from the page cache (fadvise)",
                                source: std::io::Error::from_raw_os_error(rc),
                            });
                        }
                    }
                }
                releasing.fetch_sub(bytes, Ordering::AcqRel);
            }
            Job::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Optimizer state in memory-mapped files with background prefetch and write-back.
///
/// Buffers are addressed by parameter index and slot, like eg-kernel's `StateStore`
/// (eg-kernel implements that trait for this type).
///
/// ```
/// use eg_memory::offload::{DiskStore, DiskStoreOptions};
/// let dir = tempfile::tempdir()?;
/// let mut store = DiskStore::create(dir.path(), DiskStoreOptions::default())?;
/// store.allocate(0, 2, 1000)?;
/// store.slots_mut(0)?[1][7] = 3.5;
/// store.release(0, 0..1000)?;
/// assert_eq!(store.slot(0, 1)?[7], 3.5);
/// drop(store); // removes its files
/// assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct DiskStore {
    root: PathBuf,
    opts: DiskStoreOptions,
    params: Vec<Option<ParamFile>>,
    snapshot: Vec<Option<Arc<File>>>,
    worker: Worker,
    /// Units (parameter, chunk) in update order, rebuilt when allocation changes.
    order: Vec<(usize, usize)>,
    /// Units queued for prefetch and not yet released, oldest first, with their bytes.
    ahead: VecDeque<(usize, u64)>,
    ahead_bytes: u64,
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Offload {
        path: path.to_path_buf(),
        action,
        source,
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Free bytes for unprivileged users on the file system of `dir`.
pub fn free_space(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| Error::Offload {
        path: dir.to_path_buf(),
        action: "inspect (path contains a NUL byte)",
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::Offload {
            path: dir.to_path_buf(),
            action: "measure free space of",
            source: std::io::Error::last_os_error(),
        });
    }
    // The field types differ between targets (u32 on some 32-bit ones).
    #[allow(clippy::useless_conversion)]
    let (avail, frsize) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(avail.saturating_mul(frsize))
}

/// Reserves `len` bytes for `file` on disk (no sparse holes, so writes through the mapping
/// cannot fail for lack of space later).
fn reserve(file: &File, path: &Path, len: u64, dir: &Path, keep_free: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let free = free_space(dir)?;
    if free < len.saturating_add(keep_free) {
        return Err(Error::OffloadNoSpace {
            path: path.to_path_buf(),
            needed: len.saturating_add(keep_free),
            available: free,
        });
    }
    // SAFETY: a plain system call on an open descriptor.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        libc::ENOSPC | libc::EFBIG => Err(Error::OffloadNoSpace {
            path: path.to_path_buf(),
            needed: len,
            available: free_space(dir).unwrap_or(0),
        }),
        // File systems without fallocate (EOPNOTSUPP): fall back to a sized file.
        libc::EOPNOTSUPP | libc::EINVAL => file.set_len(len).map_err(io_err(path, "size")),
        rc => Err(Error::Offload {
            path: path.to_path_buf(),
            action: "reserve space for",
            source: std::io::Error::from_raw_os_error(rc),
        }),
    }
}

impl DiskStore {
    /// A store in `<offload_dir>/eg-optimizer-state-<pid>/`: creates `offload_dir` if needed,
    /// removes state directories left by processes that no longer run, and starts the
    /// background thread. Errors name the directory.
    pub fn create(offload_dir: &Path, opts: DiskStoreOptions) -> Result<Self> {
        if opts.chunk_elems == 0 {
            return Err(Error::Invalid {
                what: "offload options",
                field: "chunk_elems",
                reason: "must be at least 1".into(),
            });
        }
        std::fs::create_dir_all(offload_dir).map_err(io_err(offload_dir, "create directory"))?;
        Self::remove_stale(offload_dir);
        let root = offload_dir.join(format!("{DIR_PREFIX}{}", std::process::id()));
        if root.exists() {
            std::fs::remove_dir_all(&root).map_err(io_err(&root, "remove old state in"))?;
        }
        std::fs::create_dir(&root).map_err(io_err(&root, "create directory"))?;
        let (tx, rx) = channel();
        let failure: Failure = Arc::new(Mutex::new(None));
        let f2 = failure.clone();
        let releasing = Arc::new(AtomicU64::new(0));
        let r2 = releasing.clone();
        let handle = std::thread::Builder::new()
            .name("eg-offload".into())
            .spawn(move || run_worker(rx, f2, r2))
            .map_err(io_err(&root, "start the offload thread for"))?;
        tracing::info!(dir = %root.display(), window = opts.window, flush = ?opts.flush, "optimizer state offloaded to disk");
        Ok(Self {
            root,
            opts,
            params: Vec::new(),
            snapshot: Vec::new(),
            worker: Worker {
                tx,
                handle: Some(handle),
                failure,
                releasing,
            },
            order: Vec::new(),
            ahead: VecDeque::new(),
            ahead_bytes: 0,
        })
    }

    /// Removes `eg-optimizer-state-<pid>` directories of processes that no longer run.
    fn remove_stale(offload_dir: &Path) {
        let Ok(rd) = std::fs::read_dir(offload_dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(DIR_PREFIX))
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            if pid as u32 != std::process::id() && !pid_alive(pid) {
                let p = e.path();
                match std::fs::remove_dir_all(&p) {
                    Ok(()) => {
                        tracing::info!(dir = %p.display(), "removed stale offload state of a finished run")
                    }
                    Err(err) => {
                        tracing::warn!(dir = %p.display(), %err, "cannot remove stale offload state")
                    }
                }
            }
        }
    }

    /// The directory holding this store's files.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The options.
    pub fn options(&self) -> DiskStoreOptions {
        self.opts
    }

    /// Elements per unit, rounded to whole pages.
    pub fn chunk_elems(&self) -> usize {
        self.opts.chunk_elems.div_ceil(PAGE / F32) * (PAGE / F32)
    }

    /// Bytes of state in files (the slots of every parameter, page-rounded).
    pub fn state_bytes(&self) -> u64 {
        self.params.iter().flatten().map(ParamFile::bytes).sum()
    }

    fn check_failure(&self) -> Result<()> {
        if let Ok(mut f) = self.worker.failure.lock()
            && let Some(e) = f.take()
        {
            return Err(e);
        }
        Ok(())
    }

    fn param(&self, param: usize) -> Result<&ParamFile> {
        self.params
            .get(param)
            .and_then(Option::as_ref)
            .ok_or(Error::Invalid {
                what: "offload store",
                field: "param",
                reason: format!("parameter {param} has no allocated state"),
            })
    }

    /// Creates the file of parameter `param`: `slots` zeroed buffers of `len` elements.
    /// Fails with [`Error::OffloadNoSpace`] when the disk cannot hold it (and
    /// [`DiskStoreOptions::keep_free`] more).
    pub fn allocate(&mut self, param: usize, slots: usize, len: usize) -> Result<()> {
        let stride = (len * F32).div_ceil(PAGE) * PAGE;
        let bytes = (slots * stride) as u64;
        let path = self.root.join(format!("p{param:05}.bin"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(&path, "create"))?;
        reserve(&file, &path, bytes, &self.root, self.opts.keep_free)?;
        // An empty mapping is not allowed: map at least one page.
        let map = MmapOptions::new()
            .len((bytes as usize).max(PAGE))
            .map_raw(&file);
        let map = match map {
            Ok(m) => m,
            Err(_) if bytes == 0 => {
                file.set_len(PAGE as u64).map_err(io_err(&path, "size"))?;
                MmapOptions::new()
                    .len(PAGE)
                    .map_raw(&file)
                    .map_err(io_err(&path, "map"))?
            }
            Err(source) => {
                return Err(Error::Offload {
                    path,
                    action: "map",
                    source,
                });
            }
        };
        if self.params.len() <= param {
            self.params.resize_with(param + 1, || None);
        }
        self.params[param] = Some(ParamFile {
            path,
            file: Arc::new(file),
            map: Arc::new(map),
            slots,
            len,
            stride,
        });
        if let Some(s) = self.snapshot.get_mut(param) {
            *s = None;
        }
        self.order.clear();
        self.ahead.clear();
        self.ahead_bytes = 0;
        Ok(())
    }

    /// The buffers of `param`, writable.
    pub fn slots_mut(&mut self, param: usize) -> Result<Vec<&mut [f32]>> {
        self.check_failure()?;
        let p = self.param(param)?;
        let base = p.map.as_mut_ptr();
        let mut out = Vec::with_capacity(p.slots);
        for s in 0..p.slots {
            // SAFETY: the slots are disjoint regions inside the mapping (`stride` ≥ `len`
            // f32, page-aligned so f32-aligned), the mapping lives as long as `self`, and
            // `&mut self` keeps any other Rust reference into it from existing. The
            // background thread never reads or writes the bytes (it only advises the
            // kernel, which keeps contents).
            let sl = unsafe {
                std::slice::from_raw_parts_mut(base.add(s * p.stride).cast::<f32>(), p.len)
            };
            out.push(sl);
        }
        Ok(out)
    }

    /// One buffer, read-only.
    pub fn slot(&self, param: usize, slot: usize) -> Result<&[f32]> {
        self.check_failure()?;
        let p = self.param(param)?;
        if slot >= p.slots {
            return Err(Error::Invalid {
                what: "offload store",
                field: "slot",
                reason: format!(
                    "parameter {param} has {} slot(s), not {}",
                    p.slots,
                    slot + 1
                ),
            });
        }
        // SAFETY: as in `slots_mut`; `&self` only hands out shared references.
        Ok(unsafe {
            std::slice::from_raw_parts(p.map.as_ptr().add(slot * p.stride).cast::<f32>(), p.len)
        })
    }

    fn rebuild_order(&mut self) {
        let chunk = self.chunk_elems();
        self.order.clear();
        for (i, p) in self.params.iter().enumerate() {
            if let Some(p) = p {
                let chunks = p.len.div_ceil(chunk).max(1);
                self.order.extend((0..chunks).map(|c| (i, c)));
            }
        }
    }

    fn unit(&self, idx: usize) -> Option<(Unit, u64)> {
        let &(param, c) = self.order.get(idx)?;
        let p = self.params.get(param)?.as_ref()?;
        let chunk = self.chunk_elems();
        let a = c * chunk;
        let b = ((c + 1) * chunk).min(p.len);
        Some(self.unit_of(p, a..b))
    }

    fn unit_of(&self, p: &ParamFile, elems: Range<usize>) -> (Unit, u64) {
        let ranges: Vec<Range<usize>> = (0..p.slots)
            .map(|s| {
                let start = s * p.stride + elems.start * F32;
                // Up to the page end of the region (padding of the same slot).
                let end = if elems.end >= p.len {
                    (s + 1) * p.stride
                } else {
                    s * p.stride + elems.end * F32
                };
                start..end.max(start)
            })
            .collect();
        let bytes = ranges.iter().map(|r| r.len() as u64).sum();
        let unit = Unit {
            path: p.path.clone(),
            map: p.map.clone(),
            fd: p.file.clone(),
            ranges,
        };
        (unit, bytes)
    }

    fn send(&self, job: Job) -> Result<()> {
        self.worker.tx.send(job).map_err(|_| Error::Offload {
            path: self.root.clone(),
            action: "reach the offload thread for",
            source: std::io::Error::other("the offload thread stopped"),
        })
    }

    /// The update of `elems` of parameter `param` is done: write back and drop it, and
    /// prefetch what comes next in the update order (wrapping to the first parameter).
    pub fn release(&mut self, param: usize, elems: Range<usize>) -> Result<()> {
        self.check_failure()?;
        if self.order.is_empty() {
            self.rebuild_order();
        }
        let p = self.param(param)?;
        let elems = elems.start.min(p.len)..elems.end.min(p.len);
        let (unit, bytes) = self.unit_of(p, elems.clone());
        // Back-pressure: updated units waiting for write-back are still resident; do not let
        // them grow past the window (with Flush::Eager the disk sets the pace).
        let mut waited = 0u32;
        while self.worker.releasing.load(Ordering::Acquire) > self.opts.window {
            self.check_failure()?;
            if self
                .worker
                .handle
                .as_ref()
                .is_none_or(JoinHandle::is_finished)
            {
                return Err(Error::Offload {
                    path: self.root.clone(),
                    action: "write back",
                    source: std::io::Error::other("the offload thread stopped"),
                });
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
            waited += 1;
            if waited == 50_000 {
                tracing::warn!(dir = %self.root.display(), "offload write-back is 10 s behind the optimizer");
            }
        }
        self.worker.releasing.fetch_add(bytes, Ordering::AcqRel);
        self.send(Job::Release(unit, self.opts.flush, bytes))?;
        // Where are we in the order? The unit holding the range's last element.
        let chunk = self.chunk_elems();
        let c = elems.end.saturating_sub(1) / chunk;
        let Some(idx) = self.order.iter().position(|&u| u == (param, c)) else {
            return Ok(());
        };
        // Forget the units up to this one; out of order (another pass), start afresh.
        match self.ahead.iter().position(|&(u, _)| u == idx) {
            Some(pos) => {
                for (_, b) in self.ahead.drain(..=pos) {
                    self.ahead_bytes = self.ahead_bytes.saturating_sub(b);
                }
            }
            None => {
                self.ahead.clear();
                self.ahead_bytes = 0;
            }
        }
        let n = self.order.len();
        let mut next = self.ahead.back().map_or(idx + 1, |&(b, _)| b + 1) % n;
        while self.ahead.len() + 1 < n {
            if next == idx {
                break;
            }
            let Some((unit, bytes)) = self.unit(next) else {
                break;
            };
            if !self.ahead.is_empty() && self.ahead_bytes.saturating_add(bytes) > self.opts.window {
                break;
            }
            self.send(Job::Prefetch(unit))?;
            self.ahead.push_back((next, bytes));
            self.ahead_bytes = self.ahead_bytes.saturating_add(bytes);
            next = (next + 1) % n;
        }
        Ok(())
    }

    /// Waits until the background thread has done everything queued so far, and returns
    /// the first error it met.
    pub fn sync(&self) -> Result<()> {
        let (tx, rx) = channel();
        self.send(Job::Barrier(tx))?;
        rx.recv().map_err(|_| Error::Offload {
            path: self.root.clone(),
            action: "reach the offload thread for",
            source: std::io::Error::other("the offload thread stopped"),
        })?;
        self.check_failure()
    }

    /// Writes every file to disk (`msync`), e.g. before measuring or to hand the files to
    /// another process. Not needed for checkpoints (they read the state through the store).
    pub fn flush(&self) -> Result<()> {
        self.sync()?;
        for p in self.params.iter().flatten() {
            p.map
                .flush()
                .map_err(io_err(&p.path, "write back (msync)"))?;
        }
        Ok(())
    }

    /// Copies the whole state to `snapshot/` next to the files (in the kernel, without
    /// passing through this process's memory), for a rollback by
    /// [`DiskStore::restore_snapshot`].
    pub fn save_snapshot(&mut self) -> Result<()> {
        self.sync()?;
        let dir = self.root.join("snapshot");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir, "create directory"))?;
        if self.snapshot.len() < self.params.len() {
            self.snapshot.resize_with(self.params.len(), || None);
        }
        for (i, p) in self.params.iter().enumerate() {
            let Some(p) = p else { continue };
            let path = dir.join(format!("p{i:05}.bin"));
            // A checkpoint writer may still be reading the previous snapshot: give it the
            // old file (unlinked, still open) and write this one into a new file.
            if self.snapshot[i]
                .as_ref()
                .is_some_and(|f| Arc::strong_count(f) > 1)
            {
                std::fs::remove_file(&path).map_err(io_err(&path, "replace"))?;
                self.snapshot[i] = None;
            }
            if self.snapshot[i].is_none() {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(io_err(&path, "create"))?;
                reserve(&f, &path, p.bytes(), &dir, self.opts.keep_free)?;
                self.snapshot[i] = Some(Arc::new(f));
            }
            if let Some(dst) = &self.snapshot[i] {
                copy_file(&p.file, &p.path, dst, &path, p.bytes())?;
            }
        }
        Ok(())
    }

    /// Copies the state saved by [`DiskStore::save_snapshot`] back into the files.
    pub fn restore_snapshot(&mut self) -> Result<()> {
        self.sync()?;
        let dir = self.root.join("snapshot");
        for (i, p) in self.params.iter().enumerate() {
            let Some(p) = p else { continue };
            let path = dir.join(format!("p{i:05}.bin"));
            let Some(Some(src)) = self.snapshot.get(i) else {
                return Err(Error::Offload {
                    path,
                    action: "restore the snapshot from",
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            };
            let bytes = p.bytes();
            copy_file(src, &path, &p.file, &p.path, bytes)?;
        }
        Ok(())
    }

    /// A reader of the state saved by the last [`DiskStore::save_snapshot`], for writing a
    /// checkpoint without the whole state in RAM (it reads with `pread` in 4 MiB pieces).
    /// It stays valid until the next `save_snapshot` or `restore_snapshot`, also after the
    /// store is dropped (it holds the open files).
    pub fn snapshot_reader(&self) -> Result<SnapshotReader> {
        let mut params = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let Some(p) = p else {
                params.push(None);
                continue;
            };
            let Some(Some(f)) = self.snapshot.get(i) else {
                return Err(Error::Offload {
                    path: self.root.join("snapshot"),
                    action: "read the snapshot (none taken) in",
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            };
            params.push(Some(SnapshotFile {
                path: self.root.join("snapshot").join(format!("p{i:05}.bin")),
                file: f.clone(),
                slots: p.slots,
                len: p.len,
                stride: p.stride,
            }));
        }
        Ok(SnapshotReader { params })
    }

    /// Whether [`DiskStore::save_snapshot`] has run since the last allocation.
    pub fn has_snapshot(&self) -> bool {
        self.params
            .iter()
            .enumerate()
            .all(|(i, p)| p.is_none() || self.snapshot.get(i).is_some_and(Option::is_some))
    }
}

/// Copies `len` bytes from the start of `src` to the start of `dst` without truncating
/// `dst` (it is mapped), with `copy_file_range` under the hood.
#[derive(Debug)]
struct SnapshotFile {
    path: PathBuf,
    file: Arc<File>,
    slots: usize,
    len: usize,
    stride: usize,
}

/// Reads the buffers of a [`DiskStore`] snapshot from its files (see
/// [`DiskStore::snapshot_reader`]).
#[derive(Debug)]
pub struct SnapshotReader {
    params: Vec<Option<SnapshotFile>>,
}

impl SnapshotReader {
    /// Passes slot `slot` of parameter `param` to `sink` in pieces of up to 1 Mi values,
    /// in order.
    pub fn read(
        &self,
        param: usize,
        slot: usize,
        sink: &mut dyn FnMut(&[f32]) -> std::io::Result<()>,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let p = self
            .params
            .get(param)
            .and_then(Option::as_ref)
            .filter(|p| slot < p.slots)
            .ok_or(Error::Invalid {
                what: "offload snapshot",
                field: "param",
                reason: format!("no slot {slot} of parameter {param}"),
            })?;
        const PIECE: usize = 1 << 20;
        let mut bytes = vec![0u8; PIECE.min(p.len) * F32];
        let mut vals = vec![0f32; PIECE.min(p.len)];
        let mut done = 0;
        while done < p.len {
            let n = PIECE.min(p.len - done);
            let b = &mut bytes[..n * F32];
            p.file
                .read_exact_at(b, (slot * p.stride + done * F32) as u64)
                .map_err(io_err(&p.path, "read the snapshot"))?;
            for (v, c) in vals[..n].iter_mut().zip(b.chunks_exact(F32)) {
                *v = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
            sink(&vals[..n]).map_err(io_err(&p.path, "pass on the snapshot of"))?;
            done += n;
        }
        Ok(())
    }
}

fn copy_file(src: &File, src_path: &Path, dst: &File, dst_path: &Path, len: u64) -> Result<()> {
    let mut s = src;
    let mut d = dst;
    s.seek(SeekFrom::Start(0))
        .map_err(io_err(src_path, "seek"))?;
    d.seek(SeekFrom::Start(0))
        .map_err(io_err(dst_path, "seek"))?;
    let n = std::io::copy(&mut std::io::Read::take(s, len), &mut d)
        .map_err(io_err(dst_path, "copy state into"))?;
    if n != len {
        return Err(Error::Offload {
            path: src_path.to_path_buf(),
            action: "copy (file shorter than its state)",
            source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
        });
    }
    Ok(())
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        // Stop the thread first (it holds mappings), then unmap, then remove the files.
        let (tx, _rx) = channel();
        let _ = std::mem::replace(&mut self.worker.tx, tx);
        if let Some(h) = self.worker.handle.take() {
            let _ = h.join();
        }
        self.params.clear();
        self.snapshot.clear();
        if let Err(err) = std::fs::remove_dir_all(&self.root) {
            tracing::warn!(dir = %self.root.display(), %err, "cannot remove the optimizer-state offload files");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kb() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    }

    #[test]
    fn values_survive_release_prefetch_and_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DiskStoreOptions {
            chunk_elems: 1024,
            window: 16 << 10,
            ..DiskStoreOptions::default()
        };
        let mut s = DiskStore::create(dir.path(), opts).unwrap();
        s.allocate(0, 2, 5000).unwrap();
        s.allocate(1, 1, 3).unwrap();
        s.allocate(2, 2, 0).unwrap();
        for round in 0..3 {
            for p in 0..3 {
                let len = [5000, 3, 0][p];
                let chunk = s.chunk_elems();
                let mut a = 0;
                while a < len.max(1) {
                    let b = (a + chunk).min(len);
                    for (k, sl) in s.slots_mut(p).unwrap().into_iter().enumerate() {
                        for x in &mut sl[a..b] {
                            *x += (k + 1 + round) as f32;
                        }
                    }
                    s.release(p, a..b).unwrap();
                    a += chunk;
                }
            }
        }
        s.sync().unwrap();
        assert!(s.slot(0, 0).unwrap().iter().all(|&x| x == 1.0 + 2.0 + 3.0));
        assert!(s.slot(0, 1).unwrap().iter().all(|&x| x == 2.0 + 3.0 + 4.0));
        assert_eq!(s.slot(1, 0).unwrap(), &[6.0; 3]);
        s.save_snapshot().unwrap();
        let r = s.snapshot_reader().unwrap();
        let mut got = Vec::new();
        r.read(0, 1, &mut |v| {
            got.extend_from_slice(v);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, s.slot(0, 1).unwrap());
        // A new snapshot while the reader lives does not change what the reader reads.
        s.slots_mut(0).unwrap()[1][0] = 42.0;
        s.save_snapshot().unwrap();
        let mut again = Vec::new();
        r.read(0, 1, &mut |v| {
            again.extend_from_slice(v);
            Ok(())
        })
        .unwrap();
        assert_eq!(again, got);
        s.slots_mut(0).unwrap()[1][0] = got[0];
        s.save_snapshot().unwrap();
        s.slots_mut(0).unwrap()[1][4999] = -1.0;
        s.restore_snapshot().unwrap();
        assert_eq!(s.slot(0, 1).unwrap()[4999], 9.0);
        assert!(s.slot(0, 2).is_err());
    }

    #[test]
    fn release_drops_resident_pages() {
        let dir = tempfile::tempdir().unwrap();
        let opts = DiskStoreOptions {
            window: 4 << 20,
            ..DiskStoreOptions::default()
        };
        let mut s = DiskStore::create(dir.path(), opts).unwrap();
        let len = 16 << 20; // 64 MiB per slot, 16 units of 4 MiB
        s.allocate(0, 1, len).unwrap();
        let before = rss_kb();
        s.slots_mut(0).unwrap()[0].fill(1.5);
        let touched = rss_kb();
        s.release(0, 0..len).unwrap();
        s.sync().unwrap();
        let after = rss_kb();
        assert!(touched > before + 50_000, "{before} -> {touched}");
        assert!(after < touched - 50_000, "{touched} -> {after}");
        assert!(s.slot(0, 0).unwrap().iter().all(|&x| x == 1.5));
    }

    #[test]
    fn files_are_removed_on_drop_and_stale_ones_on_create() {
        let dir = tempfile::tempdir().unwrap();
        // A directory left by a crashed run (a pid that cannot exist).
        let stale = dir.path().join(format!("{DIR_PREFIX}2147483646"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("p00000.bin"), b"old").unwrap();
        let mut s = DiskStore::create(dir.path(), DiskStoreOptions::default()).unwrap();
        assert!(!stale.exists());
        s.allocate(0, 1, 10).unwrap();
        assert!(s.dir().join("p00000.bin").exists());
        let root = s.dir().to_path_buf();
        drop(s);
        assert!(!root.exists());
    }

    #[test]
    fn unwritable_dir_and_full_disk_are_typed_errors_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let e = DiskStore::create(&file.join("sub"), DiskStoreOptions::default()).unwrap_err();
        assert!(matches!(e, Error::Offload { .. }), "{e:?}");
        assert!(e.to_string().contains("not-a-dir"), "{e}");

        let opts = DiskStoreOptions {
            keep_free: u64::MAX / 4,
            ..DiskStoreOptions::default()
        };
        let mut s = DiskStore::create(dir.path(), opts).unwrap();
        let e = s.allocate(3, 2, 1000).unwrap_err();
        assert!(matches!(e, Error::OffloadNoSpace { .. }), "{e:?}");
        assert!(e.to_string().contains("p00003.bin"), "{e}");
    }

    #[test]
    fn host_offload_is_a_typed_error() {
        let e = host_offload_available().unwrap_err();
        assert!(matches!(
            e,
            Error::FeatureDisabled {
                feature: "cuda",
                ..
            } | Error::Unsupported { .. }
        ));
    }
}
