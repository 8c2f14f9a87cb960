//! Prefetching batches on a background thread through a bounded queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError, sync_channel};
use std::thread::JoinHandle;

use crate::{Batch, Cursor, Error, Loader, Result};

type Item = Result<Option<(Batch, Cursor)>>;

/// Counters of a [`Prefetcher`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchStats {
    /// Batches handed to the trainer.
    pub batches: u64,
    /// Times [`Prefetcher::next_batch`] found the queue empty and had to wait.
    pub waits: u64,
}

/// Runs a [`Loader`] on a background thread, `depth` batches ahead.
///
/// [`Prefetcher::cursor`] is the cursor *after the last batch returned* (not after the last
/// one prepared), so saving it with a checkpoint resumes exactly after what was trained on.
/// Dropping the prefetcher stops and joins the thread.
#[derive(Debug)]
pub struct Prefetcher {
    rx: Option<Receiver<Item>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    cursor: Cursor,
    stats: PrefetchStats,
    finished: bool,
}

impl Prefetcher {
    /// Start prefetching from `loader`'s current position, keeping up to `depth` batches.
    pub fn spawn(mut loader: Loader, depth: usize) -> Result<Self> {
        let cursor = loader.cursor();
        let (tx, rx) = sync_channel::<Item>(depth.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("eg-data-prefetch".into())
            .spawn(move || {
                while !stop_thread.load(Ordering::Relaxed) {
                    let item = loader.next_batch().map(|b| b.map(|b| (b, loader.cursor())));
                    let last = !matches!(item, Ok(Some(_)));
                    if tx.send(item).is_err() || last {
                        break;
                    }
                }
            })
            .map_err(|e| Error::PrefetchStopped {
                reason: format!("cannot spawn thread: {e}"),
            })?;
        Ok(Self {
            rx: Some(rx),
            handle: Some(handle),
            stop,
            cursor,
            stats: PrefetchStats::default(),
            finished: false,
        })
    }

    /// The next batch; waits only when the queue is empty (counted in [`PrefetchStats::waits`]).
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.finished {
            return Ok(None);
        }
        let rx = self.rx.as_ref().ok_or_else(|| Error::PrefetchStopped {
            reason: "closed".into(),
        })?;
        let item = match rx.try_recv() {
            Ok(item) => item,
            Err(TryRecvError::Empty) => {
                self.stats.waits += 1;
                rx.recv().map_err(|_| Error::PrefetchStopped {
                    reason: "producer thread exited".into(),
                })?
            }
            Err(TryRecvError::Disconnected) => {
                return Err(Error::PrefetchStopped {
                    reason: "producer thread exited".into(),
                });
            }
        };
        match item {
            Ok(Some((batch, cursor))) => {
                self.cursor = cursor;
                self.stats.batches += 1;
                Ok(Some(batch))
            }
            Ok(None) => {
                self.finished = true;
                Ok(None)
            }
            Err(e) => {
                self.finished = true;
                Err(e)
            }
        }
    }

    /// The cursor after the last batch returned by [`Prefetcher::next_batch`].
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Counters.
    pub fn stats(&self) -> PrefetchStats {
        self.stats
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a producer waiting on a full queue.
        drop(self.rx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InMemoryDataset, LoaderOptions, Placement};

    fn loader() -> Loader {
        let data = Arc::new(InMemoryDataset::from_docs(
            (0..200u32).map(|i| vec![i; 1 + i as usize % 13]),
        ));
        let o = LoaderOptions {
            seq_len: 32,
            rows_per_step: 2,
            eos_id: Some(0),
            epochs: Some(2),
            ..Default::default()
        };
        Loader::new(data, o, Placement::SINGLE).unwrap()
    }

    #[test]
    fn prefetched_stream_equals_direct_stream_and_cursor_tracks_consumption() {
        let mut direct = loader();
        let mut pre = Prefetcher::spawn(loader(), 4).unwrap();
        let mut n = 0;
        loop {
            let a = direct.next_batch().unwrap();
            let b = pre.next_batch().unwrap();
            assert_eq!(a, b);
            assert_eq!(&direct.cursor(), pre.cursor());
            if a.is_none() {
                break;
            }
            n += 1;
        }
        assert!(n > 10);
        assert_eq!(pre.stats().batches, n);
        assert_eq!(pre.next_batch().unwrap(), None);
    }

    #[test]
    fn drop_while_producer_blocked_does_not_hang() {
        let mut pre = Prefetcher::spawn(loader(), 1).unwrap();
        let _ = pre.next_batch().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(pre);
    }
}
