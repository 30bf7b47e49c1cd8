//! A durable FIFO on disk for work that was accepted and must not be lost:
//! registrations taken while the registry is unreachable. One file per item
//! (`<sequence>.json`, written atomically) in a folder of its own, so a
//! crash loses nothing that [`DurableQueue::push`] returned for, and an
//! item is removed only after it was applied.
//!
//! Two processes may share a folder for a while (a proxy taking over from
//! its predecessor): an item is linked into place without ever replacing
//! another (a taken sequence number moves on to the next), and only the
//! process holding the folder's lock file drains, so items are applied in
//! order, once.

use std::{
    fs,
    future::Future,
    io,
    marker::PhantomData,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::Notify;

use crate::{backoff::Backoff, fs::write_atomic, shutdown::Shutdown};

/// A durable FIFO of `T`, stored as one JSON file per item in `dir`.
#[derive(Debug)]
pub struct DurableQueue<T> {
    dir: PathBuf,
    next: AtomicU64,
    // Serializes writers so sequence numbers hit the disk in order.
    write: Mutex<()>,
    notify: Notify,
    _item: PhantomData<fn() -> T>,
}

/// What applying a queued item came to.
#[derive(Debug)]
pub enum Apply {
    /// Applied: remove it.
    Done,
    /// Could not be applied now (the registry is unreachable): keep it, retry later.
    Retry(String),
    /// Can never be applied (the registry refused it): drop it, loudly.
    Reject(String),
}

impl<T: Serialize + DeserializeOwned> DurableQueue<T> {
    /// Opens (creating) the queue in `dir`. Items that do not parse are
    /// moved aside as `*.corrupt` with a log line, never applied.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        let mut last = 0;
        for seq in sequences(&dir)? {
            last = last.max(seq);
        }
        Ok(Self {
            dir,
            next: AtomicU64::new(last + 1),
            write: Mutex::new(()),
            notify: Notify::new(),
            _item: PhantomData,
        })
    }

    /// The folder holding the items.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `item` durably; returns once it is on disk.
    pub fn push(&self, item: &T) -> io::Result<u64> {
        let bytes = serde_json::to_vec(item).map_err(io::Error::other)?;
        let guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tmp = self.dir.join(format!(".push.{}.tmp", std::process::id()));
        write_atomic(&tmp, &bytes)?;
        let seq = loop {
            let seq = self.next.fetch_add(1, Ordering::SeqCst);
            // A hard link never replaces: a number another process took is
            // skipped, and its item kept.
            match fs::hard_link(&tmp, self.path(seq)) {
                Ok(()) => break seq,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
            }
        };
        fs::remove_file(&tmp)?;
        fs::File::open(&self.dir)?.sync_all()?;
        drop(guard);
        self.notify.notify_one();
        Ok(seq)
    }

    /// The oldest item, if any.
    pub fn front(&self) -> io::Result<Option<(u64, T)>> {
        for seq in sequences(&self.dir)? {
            let path = self.path(seq);
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            match serde_json::from_slice(&bytes) {
                Ok(item) => return Ok(Some((seq, item))),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "queued item does not parse; moved aside as .corrupt");
                    fs::rename(&path, path.with_extension("corrupt"))?;
                }
            }
        }
        Ok(None)
    }

    /// Removes item `seq` after it was applied.
    pub fn remove(&self, seq: u64) -> io::Result<()> {
        match fs::remove_file(self.path(seq)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Number of items waiting.
    pub fn len(&self) -> usize {
        sequences(&self.dir).map(|s| s.len()).unwrap_or(0)
    }

    /// Whether no item waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies items in order with `apply` until shutdown: an item that
    /// must be retried blocks the ones behind it (order matters: a
    /// deregistration must not overtake its registration), with jittered
    /// backoff between tries.
    pub async fn drain<F, Fut>(&self, mut apply: F, mut shutdown: Shutdown)
    where
        F: FnMut(T) -> Fut,
        Fut: Future<Output = Apply>,
    {
        let Some(_lock) = self.drain_lock(&mut shutdown).await else {
            return;
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let notified = self.notify.notified();
            let next = match self.front() {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(dir = %self.dir.display(), error = %e, "cannot read queue");
                    None
                }
            };
            let Some((seq, item)) = next else {
                tokio::select! {
                    _ = notified => continue,
                    _ = shutdown.requested() => return,
                }
            };
            match apply(item).await {
                Apply::Done => {
                    backoff.reset();
                    if let Err(e) = self.remove(seq) {
                        tracing::error!(seq, error = %e, "cannot remove applied item");
                    }
                    continue;
                }
                Apply::Reject(reason) => {
                    tracing::error!(seq, %reason, "queued item refused; dropped");
                    let _ = self.remove(seq);
                    continue;
                }
                Apply::Retry(reason) => {
                    tracing::debug!(seq, %reason, "queued item not applied yet");
                }
            }
            tokio::select! {
                _ = backoff.wait() => {}
                _ = shutdown.requested() => return,
            }
        }
    }

    /// Waits until this process holds the folder's drain lock (another
    /// process sharing the folder may hold it until it exits); `None` on
    /// shutdown. The lock is released when the returned guard drops.
    async fn drain_lock(&self, shutdown: &mut Shutdown) -> Option<Flock<fs::File>> {
        let mut logged = false;
        loop {
            match self.try_drain_lock() {
                Ok(Some(lock)) => return Some(lock),
                Ok(None) if !logged => {
                    tracing::info!(dir = %self.dir.display(), "another process drains this queue; waiting for it to finish");
                    logged = true;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(dir = %self.dir.display(), error = %e, "cannot lock queue")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.requested() => return None,
            }
        }
    }

    fn try_drain_lock(&self) -> io::Result<Option<Flock<fs::File>>> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".drain.lock"))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(errno.into()),
        }
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.json"))
    }
}

/// The sequence numbers present in `dir`, oldest first.
fn sequences(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            name.strip_suffix(".json")?.parse().ok()
        })
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex as StdMutex};

    use super::*;
    use crate::shutdown;

    #[test]
    fn survives_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let q = DurableQueue::<String>::open(dir.path()).unwrap();
        q.push(&"a".into()).unwrap();
        q.push(&"b".into()).unwrap();
        drop(q);
        let q = DurableQueue::<String>::open(dir.path()).unwrap();
        let (seq, first) = q.front().unwrap().unwrap();
        assert_eq!(first, "a");
        q.remove(seq).unwrap();
        q.push(&"c".into()).unwrap();
        assert_eq!(q.front().unwrap().unwrap().1, "b");
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn two_queues_on_one_folder_never_overwrite_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let old = DurableQueue::<String>::open(dir.path()).unwrap();
        let new = DurableQueue::<String>::open(dir.path()).unwrap();
        // Both start at the same next number: the second push moves on.
        let a = old.push(&"from old".into()).unwrap();
        let b = new.push(&"from new".into()).unwrap();
        assert_ne!(a, b);
        assert_eq!(old.len(), 2);
        let (seq, first) = new.front().unwrap().unwrap();
        assert_eq!(first, "from old");
        new.remove(seq).unwrap();
        assert_eq!(old.front().unwrap().unwrap().1, "from new");
    }

    #[tokio::test]
    async fn only_one_process_drains_a_folder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = DurableQueue::<u32>::open(dir.path()).unwrap();
        let held = first.try_drain_lock().unwrap().expect("free at first");
        // flock is per open file description: a second open, as another
        // process would make, is refused while the first holds it.
        assert!(first.try_drain_lock().unwrap().is_none());
        drop(held);
        assert!(first.try_drain_lock().unwrap().is_some());
    }

    #[test]
    fn corrupt_item_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(format!("{:020}.json", 1)), b"{not json").unwrap();
        let q = DurableQueue::<String>::open(dir.path()).unwrap();
        q.push(&"ok".into()).unwrap();
        assert_eq!(q.front().unwrap().unwrap().1, "ok");
        assert!(dir.path().join(format!("{:020}.corrupt", 1)).exists());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_retries_then_applies_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let q = Arc::new(DurableQueue::<u32>::open(dir.path()).unwrap());
        for i in 1..=3 {
            q.push(&i).unwrap();
        }
        let applied = Arc::new(StdMutex::new(Vec::new()));
        let (trigger, shutdown) = shutdown::channel();
        let task = {
            let (q, applied) = (q.clone(), applied.clone());
            let mut failures = 2;
            tokio::spawn(async move {
                q.drain(
                    move |i| {
                        let applied = applied.clone();
                        let retry = i == 2 && failures > 0;
                        if retry {
                            failures -= 1;
                        }
                        async move {
                            if retry {
                                return Apply::Retry("registry down".into());
                            }
                            applied.lock().unwrap().push(i);
                            Apply::Done
                        }
                    },
                    shutdown,
                )
                .await
            })
        };
        while applied.lock().unwrap().len() < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*applied.lock().unwrap(), vec![1, 2, 3]);
        assert!(q.is_empty());
        trigger.trigger();
        task.await.unwrap();
    }
}
