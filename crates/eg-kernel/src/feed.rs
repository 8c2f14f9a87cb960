//! Batches for the loop, prepared ahead on a background thread (`data.prefetch`).
//!
//! [`Feed`] wraps any [`BatchSource`]. With a depth of 0 it is the source itself. With a depth
//! `d > 0` the source moves to a thread that keeps up to `d` batches ready in a bounded
//! queue, each with the cursor *after* it; [`BatchSource::cursor_json`] answers the cursor
//! after the last batch the loop **consumed**, so a checkpoint resumes exactly after what was
//! trained on, whatever the thread had prepared. [`BatchSource::restore_json`] (resume,
//! rollback) stops the thread, takes the source back and restores it; the next batch starts
//! a new thread from there. Batches are produced by the same deterministic source in the same
//! order either way, so a run is bitwise the same with and without prefetching.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError, sync_channel};
use std::thread::JoinHandle;

use eg_data::{Batch, BatchSource};

type Item = eg_data::Result<Option<(Batch, Vec<u8>)>>;

fn stopped(reason: &str) -> eg_data::Error {
    eg_data::Error::PrefetchStopped {
        reason: reason.into(),
    }
}

struct Ahead {
    rx: Receiver<Item>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Box<dyn BatchSource>>,
    /// Cursor after the last batch handed out.
    cursor: Vec<u8>,
    finished: bool,
}

impl Ahead {
    /// Stops the thread and returns the source (positioned after what it prepared).
    fn stop(self) -> eg_data::Result<Box<dyn BatchSource>> {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a producer waiting on a full queue.
        drop(self.rx);
        self.handle
            .join()
            .map_err(|_| stopped("the prefetch thread panicked"))
    }
}

/// A [`BatchSource`] that prefetches `depth` batches on a background thread (0: none).
pub(crate) struct Feed {
    source: Option<Box<dyn BatchSource>>,
    ahead: Option<Ahead>,
    depth: usize,
}

impl Feed {
    pub(crate) fn new(source: Box<dyn BatchSource>, depth: usize) -> Self {
        Self {
            source: Some(source),
            ahead: None,
            depth,
        }
    }

    fn start(&mut self) -> eg_data::Result<()> {
        let mut src = self
            .source
            .take()
            .ok_or_else(|| stopped("the data source was lost"))?;
        let cursor = match src.cursor_json() {
            Ok(c) => c,
            Err(e) => {
                self.source = Some(src);
                return Err(e);
            }
        };
        let (tx, rx) = sync_channel::<Item>(self.depth);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("eg-prefetch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    let item = match src.next_batch() {
                        Ok(Some(b)) => src.cursor_json().map(|c| Some((b, c))),
                        Ok(None) => Ok(None),
                        Err(e) => Err(e),
                    };
                    let last = !matches!(item, Ok(Some(_)));
                    if tx.send(item).is_err() || last {
                        break;
                    }
                }
                src
            })
            .map_err(|e| stopped(&format!("cannot start the prefetch thread: {e}")))?;
        self.ahead = Some(Ahead {
            rx,
            stop,
            handle,
            cursor,
            finished: false,
        });
        Ok(())
    }

    /// Stops prefetching and takes the source back, positioned after the last consumed batch.
    fn take_back(&mut self) -> eg_data::Result<&mut Box<dyn BatchSource>> {
        if let Some(a) = self.ahead.take() {
            let cursor = a.cursor.clone();
            let mut src = a.stop()?;
            src.restore_json(&cursor)?;
            self.source = Some(src);
        }
        self.source
            .as_mut()
            .ok_or_else(|| stopped("the data source was lost"))
    }
}

impl BatchSource for Feed {
    fn next_batch(&mut self) -> eg_data::Result<Option<Batch>> {
        if self.depth == 0 {
            return self.take_back()?.next_batch();
        }
        if self.ahead.is_none() {
            self.start()?;
        }
        let a = self
            .ahead
            .as_mut()
            .ok_or_else(|| stopped("the prefetch thread did not start"))?;
        if a.finished {
            return Ok(None);
        }
        let item = match a.rx.try_recv() {
            Ok(item) => item,
            Err(TryRecvError::Empty) => {
                a.rx.recv()
                    .map_err(|_| stopped("the prefetch thread exited"))?
            }
            Err(TryRecvError::Disconnected) => {
                return Err(stopped("the prefetch thread exited"));
            }
        };
        match item {
            Ok(Some((b, c))) => {
                a.cursor = c;
                Ok(Some(b))
            }
            Ok(None) => {
                a.finished = true;
                Ok(None)
            }
            Err(e) => {
                a.finished = true;
                Err(e)
            }
        }
    }

    fn cursor_json(&self) -> eg_data::Result<Vec<u8>> {
        match (&self.ahead, &self.source) {
            (Some(a), _) => Ok(a.cursor.clone()),
            (None, Some(s)) => s.cursor_json(),
            (None, None) => Err(stopped("the data source was lost")),
        }
    }

    fn restore_json(&mut self, bytes: &[u8]) -> eg_data::Result<()> {
        self.take_back()?.restore_json(bytes)
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        if let Some(a) = self.ahead.take() {
            let _ = a.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eg_data::{InMemoryDataset, Loader, LoaderOptions, Placement};

    fn loader() -> Loader {
        let data = Arc::new(InMemoryDataset::from_docs(
            (0..200u32).map(|i| vec![i; 1 + i as usize % 13]),
        ));
        let o = LoaderOptions {
            seq_len: 16,
            rows_per_step: 2,
            eos_id: Some(0),
            epochs: Some(1),
            ..Default::default()
        };
        Loader::new(data, o, Placement::SINGLE).unwrap()
    }

    fn drain(f: &mut Feed, n: usize) -> Vec<Batch> {
        (0..n).map_while(|_| f.next_batch().unwrap()).collect()
    }

    #[test]
    fn prefetched_equals_direct_and_the_cursor_follows_consumption() {
        let mut direct = Feed::new(Box::new(loader()), 0);
        let all = drain(&mut direct, 10_000);
        assert!(all.len() > 20);
        for depth in [1, 3] {
            let mut f = Feed::new(Box::new(loader()), depth);
            let mut plain = loader();
            for b in &all[..7] {
                assert_eq!(f.next_batch().unwrap().as_ref(), Some(b));
                plain.next_batch().unwrap();
            }
            // the thread has prepared more, the cursor is after the 7th batch
            std::thread::sleep(std::time::Duration::from_millis(20));
            let c = f.cursor_json().unwrap();
            assert_eq!(c, BatchSource::cursor_json(&plain).unwrap());
            // a resume from that cursor continues exactly after it
            let mut r = Feed::new(Box::new(loader()), depth);
            r.restore_json(&c).unwrap();
            assert_eq!(drain(&mut r, 10_000), all[7..].to_vec());
            // a rollback to an earlier cursor replays from there
            let mut early = loader();
            for _ in 0..3 {
                early.next_batch().unwrap();
            }
            f.restore_json(&BatchSource::cursor_json(&early).unwrap())
                .unwrap();
            assert_eq!(drain(&mut f, 10_000), all[3..].to_vec());
            assert_eq!(f.next_batch().unwrap(), None);
        }
    }
}
