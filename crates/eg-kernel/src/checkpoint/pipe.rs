//! The checkpoint writer's pipeline for the large files, one file at a time per calling
//! thread.
//!
//! The calling thread converts the values into a block, hashes the block and hands it to the
//! file's writer thread, which writes it at its offset while the next block is filled and
//! hashed: sha256 overlaps the disk instead of adding to it, and each byte is produced once.
//!
//! With `direct`, the file is opened with `O_DIRECT` and the blocks (aligned, whole 4 KiB
//! units, the last one padded and the file cut back to its length afterwards) go from this
//! process's memory to the device without a copy into the page cache. That copy is what
//! made buffered saves slow and erratic on virtual machines, where fresh page-cache pages
//! are first touched on the host; the page cache is also not filled with gigabytes that
//! count against a cgroup's memory limit. A filesystem that refuses `O_DIRECT` at `open`
//! or at a write (a device with blocks larger than 4 KiB, at the padded last block) gets
//! ordinary buffered writes from there on.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use eg_hardware::storage::{AlignedBuf, DIRECT_IO_ALIGN};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Alignment of `O_DIRECT` buffers, offsets and lengths.
const ALIGN: usize = DIRECT_IO_ALIGN;
/// Bytes per block (and per write).
const BLOCK: usize = 1 << 20;
/// Blocks per file: one filled and hashed while the others wait for or are in the write.
const BLOCKS: usize = 4;

/// A `BLOCK`-byte aligned buffer.
type Block = AlignedBuf;

fn new_block() -> Block {
    AlignedBuf::zeroed(BLOCK)
}

/// Where the producer puts a file's bytes: blocks, hashed as they fill, written by the
/// writer thread.
pub(super) struct Pipe {
    block: Option<Block>,
    fill: usize,
    bytes: u64,
    hash: Sha256,
    direct: bool,
    unallocated: usize,
    to_writer: Option<SyncSender<Msg>>,
    free: Receiver<Block>,
}

/// The writer thread stopped (its own error is reported instead).
fn writer_gone() -> io::Error {
    io::Error::other("the checkpoint writer thread stopped")
}

impl Pipe {
    /// Appends bytes.
    pub(super) fn push_bytes(&mut self, mut b: &[u8]) -> io::Result<()> {
        while !b.is_empty() {
            let fill = self.fill;
            let block = self.block()?;
            let n = (BLOCK - fill).min(b.len());
            block.as_mut_slice()[fill..fill + n].copy_from_slice(&b[..n]);
            self.fill += n;
            b = &b[n..];
            if self.fill == BLOCK {
                self.send()?;
            }
        }
        Ok(())
    }

    /// Appends `v` as little-endian f32 bytes (a copy of its memory on little-endian
    /// machines).
    #[cfg(target_endian = "little")]
    pub(super) fn push_f32(&mut self, v: &[f32]) -> io::Result<()> {
        self.push_bytes(bytemuck::cast_slice(v))
    }

    /// Appends `v` as little-endian f32 bytes.
    #[cfg(not(target_endian = "little"))]
    pub(super) fn push_f32(&mut self, v: &[f32]) -> io::Result<()> {
        for x in v {
            self.push_bytes(&x.to_le_bytes())?;
        }
        Ok(())
    }

    /// The block being filled: a new one while fewer than `BLOCKS` exist, else the next one
    /// the writer hands back.
    fn block(&mut self) -> io::Result<&mut Block> {
        if self.block.is_none() {
            let b = if self.unallocated > 0 {
                self.unallocated -= 1;
                new_block()
            } else {
                self.free.recv().map_err(|_| writer_gone())?
            };
            self.block = Some(b);
        }
        self.block.as_mut().ok_or_else(writer_gone)
    }

    /// Hashes the filled part of the block and passes it to the writer (with `O_DIRECT`,
    /// padded to whole `ALIGN` units).
    fn send(&mut self) -> io::Result<()> {
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        let fill = self.fill;
        self.hash.update(&block.as_slice()[..fill]);
        self.bytes += fill as u64;
        self.fill = 0;
        let len = if self.direct {
            fill.div_ceil(ALIGN) * ALIGN
        } else {
            fill
        };
        let mut block = block;
        block.as_mut_slice()[fill..len].fill(0);
        let tx = self.to_writer.as_ref().ok_or_else(writer_gone)?;
        tx.send(Msg::Block(block, len)).map_err(|_| writer_gone())
    }

    /// Sends the last block and the end: the file's length and sha256.
    fn finish(&mut self) -> io::Result<(u64, String)> {
        if self.fill > 0 {
            self.send()?;
        }
        let tx = self.to_writer.take().ok_or_else(writer_gone)?;
        tx.send(Msg::End(self.bytes)).map_err(|_| writer_gone())?;
        let hash = std::mem::take(&mut self.hash);
        Ok((self.bytes, hex::encode(hash.finalize())))
    }
}

/// Opens `path` for writing, with `O_DIRECT` when asked and the filesystem accepts it
/// (`EINVAL` or `EOPNOTSUPP` means it does not); whether it did.
fn open(path: &Path, direct: bool) -> io::Result<(File, bool)> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if direct {
        match o.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((o.open(path)?, false))
}

/// What the producer sends a file's writer thread.
enum Msg {
    /// A block and how many of its bytes to write.
    Block(Block, usize),
    /// The file is complete at this length.
    End(u64),
}

/// The writer thread of one file: writes each block at its offset and hands it back; at the
/// end cuts the padding of the last `O_DIRECT` block and syncs the file. A filesystem that
/// refuses an `O_DIRECT` write gets the file reopened for buffered writes. A producer
/// that stops without `End` (it failed) leaves the file unsynced.
fn writer(
    path: &Path,
    mut file: File,
    padded: bool,
    blocks: Receiver<Msg>,
    back: SyncSender<Block>,
) -> io::Result<()> {
    let mut offset = 0u64;
    let mut direct = padded;
    for msg in blocks {
        let (block, len) = match msg {
            Msg::Block(block, len) => (block, len),
            Msg::End(len) => {
                if padded {
                    file.set_len(len)?;
                }
                return file.sync_all();
            }
        };
        let data = &block.as_slice()[..len];
        match file.write_all_at(data, offset) {
            // `O_DIRECT` refused (not supported, or an alignment larger than `ALIGN`, which
            // shows at the padded last block): this block and the rest buffered. The blocks
            // before stay where they are, and the padding is still cut at the end.
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                file = OpenOptions::new().write(true).open(path)?;
                direct = false;
                file.write_all_at(data, offset)?;
            }
            r => r?,
        }
        offset += len as u64;
        // The producer may have finished and stopped taking blocks back.
        let _ = back.send(block);
    }
    Ok(())
}

/// Writes the files `paths` one after the other from what `produce(i, pipe)` pushes for file
/// `i`, each hashed while it is written and synced by its writer thread (so the sync of one
/// overlaps the production of the next): their lengths and hex sha256.
pub(super) fn write_files(
    paths: &[PathBuf],
    direct: bool,
    produce: &mut dyn FnMut(usize, &mut Pipe) -> Result<()>,
) -> Result<Vec<(u64, String)>> {
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut out = Vec::new();
        let mut failed = None;
        for (i, path) in paths.iter().enumerate() {
            let (file, padded) = match open(path, direct) {
                Ok(x) => x,
                Err(e) => {
                    failed = Some(Error::io(path)(e));
                    break;
                }
            };
            let (to_writer, blocks) = sync_channel(BLOCKS + 1);
            let (back, free) = sync_channel(BLOCKS);
            let handle = scope.spawn(move || writer(path, file, padded, blocks, back));
            handles.push((path, handle));
            let mut pipe = Pipe {
                block: None,
                fill: 0,
                bytes: 0,
                hash: Sha256::new(),
                direct: padded,
                unallocated: BLOCKS,
                to_writer: Some(to_writer),
                free,
            };
            match produce(i, &mut pipe).and_then(|()| pipe.finish().map_err(Error::io(path))) {
                Ok(x) => out.push(x),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Every writer joined (one left unjoined after a panic would make `scope` panic);
        // a writer's own error first: a producer error may only be its consequence.
        let mut writer_failed = None;
        for (path, h) in handles {
            let r = match h.join() {
                Ok(r) => r,
                Err(_) => Err(io::Error::other("the checkpoint writer thread panicked")),
            };
            if let Err(e) = r {
                writer_failed.get_or_insert(Error::io(path)(e));
            }
        }
        match writer_failed.or(failed) {
            Some(e) => Err(e),
            None => Ok(out),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// Files of lengths around the block and alignment sizes come out exactly, with the
    /// sha256 of their contents, whether written with `O_DIRECT` or not.
    #[test]
    fn files_are_written_whole_with_their_hash() {
        let dir = tempfile::tempdir().unwrap();
        let lens = [
            1,
            ALIGN - 1,
            ALIGN,
            BLOCK - 3,
            BLOCK,
            BLOCK + ALIGN + 5,
            3 * BLOCK + 1,
        ];
        for direct in [true, false] {
            let paths: Vec<PathBuf> = (0..lens.len())
                .map(|i| dir.path().join(format!("{direct}-{i}")))
                .collect();
            let out = write_files(&paths, direct, &mut |i, pipe| {
                let b = bytes(lens[i]);
                // in uneven pieces, and the f32 path for whole values
                let (a, rest) = b.split_at(b.len() / 3);
                pipe.push_bytes(a).map_err(Error::io("x"))?;
                pipe.push_bytes(rest).map_err(Error::io("x"))?;
                Ok(())
            })
            .unwrap();
            for ((p, (len, sha)), want) in paths.iter().zip(out).zip(lens) {
                let got = std::fs::read(p).unwrap();
                assert_eq!(got, bytes(want), "{}", p.display());
                assert_eq!(len as usize, want);
                assert_eq!(sha, hex::encode(Sha256::digest(&got)));
            }
        }
        let p = vec![dir.path().join("f32")];
        let v: Vec<f32> = (0..300_000).map(|i| i as f32 * 0.5 - 7.0).collect();
        write_files(&p, true, &mut |_, pipe| {
            pipe.push_f32(&v).map_err(Error::io("x"))
        })
        .unwrap();
        let back: Vec<f32> = std::fs::read(&p[0])
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back, v);
    }

    /// Sends `blocks` (bytes, length to write) and the end at `len` to a writer of a new
    /// `O_DIRECT` file and returns the file's contents.
    fn write_raw(blocks: &[(&[u8], usize)], len: u64) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let (file, padded) = open(&path, true).unwrap();
        assert!(
            padded,
            "this test needs a filesystem with O_DIRECT under the temp dir"
        );
        let (tx, rx) = sync_channel(BLOCKS + 1);
        let (back, _free) = sync_channel(BLOCKS);
        for &(data, n) in blocks {
            let mut b = new_block();
            b.as_mut_slice()[..data.len()].copy_from_slice(data);
            b.as_mut_slice()[data.len()..n].fill(0xEE); // padding, to be cut
            tx.send(Msg::Block(b, n)).unwrap();
        }
        tx.send(Msg::End(len)).unwrap();
        drop(tx);
        writer(&path, file, padded, rx, back).unwrap();
        std::fs::read(&path).unwrap()
    }

    /// A device refusing `O_DIRECT` for a misaligned write (as one with larger blocks than
    /// 4 KiB does at the padded last block), at the first or a later block: the file is
    /// finished with buffered writes and its padding cut.
    #[test]
    fn refused_direct_writes_fall_back_and_cut_the_padding() {
        let data = bytes(ALIGN + 100);
        let got = write_raw(&[(&data, data.len() + 7)], data.len() as u64);
        assert_eq!(got, data);
        let data = bytes(BLOCK + 100);
        let (a, b) = data.split_at(BLOCK);
        let got = write_raw(&[(a, BLOCK), (b, 100 + 9)], data.len() as u64);
        assert_eq!(got, data);
    }

    /// The second file's device is full, or its directory is missing: its error, no hang.
    #[test]
    fn a_later_file_failing_names_it() {
        let dir = tempfile::tempdir().unwrap();
        for direct in [true, false] {
            for bad in [PathBuf::from("/dev/full"), dir.path().join("no/such/dir/f")] {
                let paths = vec![dir.path().join(format!("a{direct}")), bad.clone()];
                let err = write_files(&paths, direct, &mut |_, pipe| {
                    pipe.push_bytes(&bytes(6 * BLOCK + 3))
                        .map_err(Error::io("x"))
                })
                .unwrap_err();
                match err {
                    Error::Io { path, .. } => assert_eq!(path, bad),
                    e => panic!("{e}"),
                }
            }
        }
    }

    /// A failing producer stops the files (no hang) and its error comes back.
    #[test]
    fn producer_errors_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let paths = vec![dir.path().join("a"), dir.path().join("b")];
        let err = write_files(&paths, true, &mut |i, pipe| {
            pipe.push_bytes(&bytes(3 * BLOCK)).map_err(Error::io("x"))?;
            if i == 1 {
                return Err(Error::NoData);
            }
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(err, Error::NoData), "{err}");
    }

    /// A device that refuses the writes (`/dev/full`: no space) fails with the device's error
    /// and path, not a hang or the producer's "writer stopped".
    #[test]
    fn write_errors_name_the_file() {
        let full = PathBuf::from("/dev/full");
        assert!(full.exists(), "/dev/full is needed for this test");
        for direct in [true, false] {
            let err = write_files(std::slice::from_ref(&full), direct, &mut |_, pipe| {
                pipe.push_bytes(&bytes(10 * BLOCK)).map_err(Error::io("x"))
            })
            .unwrap_err();
            match err {
                Error::Io { path, source } => {
                    assert_eq!(path, full);
                    assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{source}");
                }
                e => panic!("{e}"),
            }
        }
    }
}
