//! Storage: which filesystem and device hold a path, what kind of device it is, free space,
//! and (on request) measured sequential write/read bandwidth.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::mounts::{self, Mount};
use crate::root::{self, Missing, Notes, Root};

/// What kind of medium backs a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// NVMe solid-state drive.
    Nvme,
    /// Other solid-state drive (SATA/SAS, `rotational = 0`).
    Ssd,
    /// Spinning disk (`rotational = 1`).
    Hdd,
    /// Network filesystem (NFS, CIFS/SMB, Ceph, Lustre, 9p, GPFS, BeeGFS, sshfs...).
    Network,
    /// Memory-backed (tmpfs, ramfs): fast, but it counts against RAM.
    Tmpfs,
    /// A paravirtual disk (virtio `vd*`, Xen `xvd*`): the medium behind it is not visible and
    /// the kernel's `rotational` flag does not describe it.
    Virtual,
    /// Could not be determined (overlay filesystems, device-mapper without a clear medium...).
    Unknown,
}

impl std::fmt::Display for StorageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StorageKind::Nvme => "NVMe",
            StorageKind::Ssd => "SSD",
            StorageKind::Hdd => "HDD",
            StorageKind::Network => "network",
            StorageKind::Tmpfs => "tmpfs (RAM)",
            StorageKind::Virtual => "virtual disk",
            StorageKind::Unknown => "unknown",
        })
    }
}

/// Measured sequential bandwidth of a directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bandwidth {
    /// Bytes written (and read back).
    pub bytes: u64,
    /// Sequential write, MB/s (10^6 bytes), including the final `fsync`.
    pub write_mb_s: f64,
    /// Sequential read, MB/s, from the device (direct I/O or after dropping the page cache).
    pub read_mb_s: f64,
    /// Whether `O_DIRECT` was used (otherwise buffered I/O with `fsync` and
    /// `POSIX_FADV_DONTNEED`).
    pub direct_io: bool,
    /// Whether the read pass may have been served from memory: a memory-backed filesystem
    /// (tmpfs, even with `O_DIRECT`), or buffered I/O where dropping the cache failed.
    pub read_may_be_cached: bool,
}

/// The storage that holds one path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageReport {
    /// The path asked about.
    pub path: String,
    /// Mount point holding it.
    pub mount_point: Option<String>,
    /// Filesystem type (`ext4`, `xfs`, `nfs4`, `tmpfs`...).
    pub filesystem: Option<String>,
    /// Block device (`nvme0n1p2`), if the filesystem has one.
    pub device: Option<String>,
    /// The whole disk behind a partition (`nvme0n1`).
    pub disk: Option<String>,
    /// Disk model, when sysfs exposes it.
    pub model: Option<String>,
    /// Kind of medium.
    pub kind: StorageKind,
    /// Filesystem size in bytes (host root only).
    pub total_bytes: Option<u64>,
    /// Bytes available to unprivileged users (host root only).
    pub free_bytes: Option<u64>,
    /// Measured bandwidth, when probed.
    pub bandwidth: Option<Bandwidth>,
}

const NETWORK_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ceph",
    "glusterfs",
    "lustre",
    "9p",
    "gpfs",
    "beegfs",
    "fuse.sshfs",
    "fuse.s3fs",
    "fuse.gcsfuse",
    "afs",
    "virtiofs",
    "fuse.juicefs",
];

/// `(size, available)` in bytes for the filesystem holding `path`.
pub(crate) fn statvfs_bytes(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path; `st` is plain data filled by the call.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        let frsize = st.f_frsize;
        Some((
            (st.f_blocks as u64).checked_mul(frsize)?,
            (st.f_bavail as u64).checked_mul(frsize)?,
        ))
    }
}

/// Parses a sysfs `uevent` file into (DEVNAME, DEVTYPE).
fn uevent(text: &str) -> (Option<String>, Option<String>) {
    let mut name = None;
    let mut kind = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("DEVNAME=") {
            name = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("DEVTYPE=") {
            kind = Some(v.trim().to_owned());
        }
    }
    (name, kind)
}

/// Classifies a disk by name and its `rotational` flag.
pub(crate) fn classify(disk: &str, rotational: Option<u64>) -> StorageKind {
    if disk.starts_with("nvme") {
        StorageKind::Nvme
    } else if disk.starts_with("vd") || disk.starts_with("xvd") {
        StorageKind::Virtual
    } else if disk.starts_with("zram") || disk.starts_with("ram") {
        StorageKind::Tmpfs
    } else {
        match rotational {
            Some(0) => StorageKind::Ssd,
            Some(1) => StorageKind::Hdd,
            _ => StorageKind::Unknown,
        }
    }
}

/// Turns a user path into the absolute path to look up in the mount table.
fn absolute(root: &Root, path: &Path) -> String {
    if root.is_host() {
        // Canonicalize the nearest existing ancestor (the directory may not exist yet).
        let mut cur = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(path))
                .unwrap_or_else(|_| path.to_path_buf())
        };
        let mut tail = Vec::new();
        loop {
            if let Ok(c) = std::fs::canonicalize(&cur) {
                let mut out = c;
                for t in tail.iter().rev() {
                    out.push(t);
                }
                return out.to_string_lossy().into_owned();
            }
            match (cur.file_name().map(|f| f.to_owned()), cur.parent()) {
                (Some(name), Some(parent)) => {
                    tail.push(name);
                    cur = parent.to_path_buf();
                }
                _ => break,
            }
        }
        path.to_string_lossy().into_owned()
    } else {
        let s = path.to_string_lossy();
        if s.starts_with('/') {
            s.into_owned()
        } else {
            format!("/{s}")
        }
    }
}

/// Describes the storage holding `path` (interpreted inside `root`).
pub(crate) fn detect(
    root: &Root,
    mounts: &[Mount],
    path: &Path,
    notes: &mut Notes,
) -> StorageReport {
    let abs = absolute(root, path);
    let mut report = StorageReport {
        path: abs.clone(),
        mount_point: None,
        filesystem: None,
        device: None,
        disk: None,
        model: None,
        kind: StorageKind::Unknown,
        total_bytes: None,
        free_bytes: None,
        bandwidth: None,
    };
    if root.is_host()
        && let Some((t, a)) = statvfs_bytes(Path::new(&abs))
            .or_else(|| Path::new(&abs).ancestors().skip(1).find_map(statvfs_bytes))
    {
        report.total_bytes = Some(t);
        report.free_bytes = Some(a);
    }
    let Some(m) = mounts::containing(mounts, &abs) else {
        notes.warn(format!(
            "{abs}: no mount found in mountinfo: storage kind unknown"
        ));
        return report;
    };
    report.mount_point = Some(m.mount_point.clone());
    report.filesystem = Some(m.fs_type.clone());
    let fs = m.fs_type.as_str();
    if fs == "tmpfs" || fs == "ramfs" {
        report.kind = StorageKind::Tmpfs;
        return report;
    }
    if NETWORK_FS.contains(&fs) || fs.starts_with("nfs") {
        report.kind = StorageKind::Network;
        return report;
    }
    let (Some(major), Some(minor)) = (m.major, m.minor) else {
        return report;
    };
    let ue = root::read(
        root,
        &format!("/sys/dev/block/{major}:{minor}/uevent"),
        Missing::Quiet,
        notes,
    );
    let Some((Some(dev), devtype)) = ue.as_deref().map(uevent) else {
        if fs == "overlay" {
            notes.warn(format!(
                "{abs}: on an overlay filesystem; the device behind it is not visible: kind unknown"
            ));
        } else if major != 0 {
            notes.warn(format!(
                "{abs}: block device {major}:{minor} not found in sysfs: kind unknown"
            ));
        }
        return report;
    };
    report.device = Some(dev.clone());
    // Find the whole disk: the device itself, or the /sys/block entry holding it as a
    // partition.
    let disk = if devtype.as_deref() == Some("partition") {
        root::list_dir(root, "/sys/block", notes)
            .into_iter()
            .find(|d| root.join(format!("/sys/block/{d}/{dev}")).exists())
    } else {
        Some(dev.clone())
    };
    let Some(disk) = disk else {
        notes.warn(format!(
            "{abs}: disk holding partition {dev} not found: kind unknown"
        ));
        return report;
    };
    let rotational = root::read_u64(
        root,
        &format!("/sys/block/{disk}/queue/rotational"),
        Missing::Quiet,
        notes,
    );
    report.model = root::read_line(
        root,
        &format!("/sys/block/{disk}/device/model"),
        Missing::Quiet,
        notes,
    );
    report.kind = classify(&disk, rotational);
    if report.kind == StorageKind::Unknown {
        notes.warn(format!(
            "{abs}: disk {disk} exposes no rotational flag: kind unknown"
        ));
    }
    report.disk = Some(disk);
    report
}

/// Limits for the storage bandwidth probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BandwidthLimits {
    /// At most this many bytes are written (and read back). Between 1 MiB and 16 GiB.
    pub max_bytes: u64,
    /// Writing stops after this long (the read pass gets the same). At most 60 s.
    pub max_duration: Duration,
}

impl Default for BandwidthLimits {
    /// 256 MiB, 3 s per pass.
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            max_duration: Duration::from_secs(3),
        }
    }
}

/// Removes the probe file when dropped, so it goes away even on error.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(
                target: "eg_hardware",
                "could not remove probe file {}: {e}",
                self.0.display()
            );
        }
    }
}

const CHUNK: usize = 4 << 20;

/// Alignment of buffers, offsets and lengths for `O_DIRECT` I/O: 4096 bytes, the largest
/// logical block size in common use.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// A zero-filled byte buffer whose start is [`DIRECT_IO_ALIGN`]-aligned, for `O_DIRECT`
/// reads and writes (safe code: a slightly larger `Vec` viewed from its first aligned byte).
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    offset: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_IO_ALIGN];
        let offset = storage
            .as_ptr()
            .align_offset(DIRECT_IO_ALIGN)
            .min(DIRECT_IO_ALIGN);
        Self { storage, offset }
    }

    /// Fills the buffer with pseudo-random bytes (xorshift64 from `seed`), so that a
    /// compressing or deduplicating device cannot make a bandwidth measurement look faster.
    pub fn fill_pseudo_random(&mut self, seed: u64) {
        let mut x = seed | 1;
        for chunk in self.as_mut_slice().chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.storage.len() - DIRECT_IO_ALIGN
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        let len = self.len();
        &self.storage[self.offset..self.offset + len]
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len();
        &mut self.storage[self.offset..self.offset + len]
    }
}

/// A probe buffer: pseudo-random content so compressing or deduplicating devices cannot cheat.
fn probe_buf(len: usize) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    b.fill_pseudo_random(0x9E37_79B9_7F4A_7C15);
    b
}

fn open_write(path: &Path, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

fn open_read(path: &Path, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// Whether `path` is on a memory-backed filesystem (tmpfs, ramfs).
fn is_ram_fs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path; `st` is plain data filled by the call.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut st) != 0 {
            return false;
        }
        #[allow(clippy::unnecessary_cast)]
        let t = st.f_type as i64;
        t == TMPFS_MAGIC || t == RAMFS_MAGIC
    }
}

fn drop_cache(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; POSIX_FADV_DONTNEED only drops clean cached pages.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) == 0 }
}

/// Measures sequential write then read bandwidth of `dir` by writing a temporary file,
/// bounded by `limits`. The file is `fsync`'d before the write clock stops and is removed
/// afterwards, also on error. Direct I/O is used when the filesystem accepts it.
pub fn measure_bandwidth(dir: &Path, limits: BandwidthLimits) -> Result<Bandwidth> {
    if !(1 << 20..=16 << 30).contains(&limits.max_bytes) {
        return Err(Error::InvalidLimit {
            name: "max_bytes",
            value: limits.max_bytes.to_string(),
            allowed: "between 1 MiB and 16 GiB",
        });
    }
    if limits.max_duration.is_zero() || limits.max_duration > Duration::from_secs(60) {
        return Err(Error::InvalidLimit {
            name: "max_duration",
            value: format!("{:?}", limits.max_duration),
            allowed: "more than 0 and at most 60 s",
        });
    }
    if !dir.is_dir() {
        return Err(Error::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let path = dir.join(format!(
        ".eg-hw-bandwidth-{}-{}.tmp",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let (mut file, direct) = match open_write(&path, true) {
        Ok(f) => (f, true),
        Err(_) => (
            open_write(&path, false).map_err(|e| Error::io("create", &path, e))?,
            false,
        ),
    };
    let _cleanup = Cleanup(path.clone());
    let buf = probe_buf(CHUNK);

    // Write pass.
    let start = Instant::now();
    let mut written: u64 = 0;
    let mut direct_write = direct;
    while written < limits.max_bytes && start.elapsed() < limits.max_duration {
        match file.write_all(buf.as_slice()) {
            Ok(()) => written += CHUNK as u64,
            Err(e) if direct_write && written == 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                // The filesystem accepted O_DIRECT at open but not for writes: reopen buffered.
                drop(file);
                std::fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
                file = open_write(&path, false).map_err(|e| Error::io("create", &path, e))?;
                direct_write = false;
            }
            Err(e) => return Err(Error::io("write", &path, e)),
        }
    }
    file.sync_all().map_err(|e| Error::io("fsync", &path, e))?;
    let write_secs = start.elapsed().as_secs_f64();
    if written == 0 {
        return Err(Error::ProbeTooSlow {
            what: "storage write",
            budget_ms: limits.max_duration.as_millis(),
        });
    }
    let mut read_may_be_cached = false;
    if !direct_write && !drop_cache(&file) {
        read_may_be_cached = true;
    }
    drop(file);

    // Read pass.
    let mut rfile = match open_read(&path, direct_write) {
        Ok(f) => f,
        Err(e) => return Err(Error::io("open", &path, e)),
    };
    if !direct_write && !drop_cache(&rfile) {
        read_may_be_cached = true;
    }
    let mut rbuf = probe_buf(CHUNK);
    let start = Instant::now();
    let mut read: u64 = 0;
    while read < written && start.elapsed() < limits.max_duration {
        match rfile.read(rbuf.as_mut_slice()) {
            Ok(0) => break,
            Ok(n) => read += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", &path, e)),
        }
    }
    let read_secs = start.elapsed().as_secs_f64();
    // tmpfs and friends keep the data in memory whatever we ask.
    read_may_be_cached |= is_ram_fs(dir);
    Ok(Bandwidth {
        bytes: written,
        write_mb_s: written as f64 / write_secs.max(1e-9) / 1e6,
        read_mb_s: read as f64 / read_secs.max(1e-9) / 1e6,
        direct_io: direct_write,
        read_may_be_cached,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(classify("nvme0n1", Some(0)), StorageKind::Nvme);
        assert_eq!(classify("sda", Some(1)), StorageKind::Hdd);
        assert_eq!(classify("sdb", Some(0)), StorageKind::Ssd);
        assert_eq!(classify("vda", Some(1)), StorageKind::Virtual);
        assert_eq!(classify("sdc", None), StorageKind::Unknown);
    }

    #[test]
    fn uevents() {
        let (n, t) = uevent("MAJOR=8\nMINOR=1\nDEVNAME=sda1\nDEVTYPE=partition\n");
        assert_eq!(n.as_deref(), Some("sda1"));
        assert_eq!(t.as_deref(), Some("partition"));
    }

    #[test]
    fn limits_are_checked() {
        let d = std::env::temp_dir();
        let bad = BandwidthLimits {
            max_bytes: 10,
            max_duration: Duration::from_secs(1),
        };
        assert!(matches!(
            measure_bandwidth(&d, bad),
            Err(Error::InvalidLimit { .. })
        ));
        let bad = BandwidthLimits {
            max_bytes: 1 << 20,
            max_duration: Duration::ZERO,
        };
        assert!(matches!(
            measure_bandwidth(&d, bad),
            Err(Error::InvalidLimit { .. })
        ));
    }
}
