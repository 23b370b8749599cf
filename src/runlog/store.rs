//! Where a run's frames are kept and numbered: the [`Store`] seam, and
//! [`LocalStore`], the store of a process's own log (frames in memory, within the
//! bounds of [`RunLogConfig`]). A shared store (Redis Streams, feature `redis`)
//! implements the same trait.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::fanout::{Fanout, RunKey};
use super::{AppendError, Frame, Resync, RunLogConfig, RunLogStats, fresh_epoch, lock, with_seq};

/// Where the frames live: the seam between the log's fan-out to local readers and
/// what keeps the frames. The store assigns each frame its `seq` and keeps it; it
/// hands the frames of the runs this process follows to their readers (a shared
/// store through [`RunLog::deliver`](super::RunLog::deliver)).
pub(crate) trait Store: Send + Sync + 'static {
    /// The epoch shared by every process on the store, as last seen.
    fn epoch(&self) -> u64;
    /// Queues JSON object text for the run, without waiting.
    fn append(&self, user: &Arc<str>, run: &Arc<str>, text: String) -> Result<(), AppendError>;
    /// Queues JSON object text for the run, waiting for room (the caller bounds the
    /// wait).
    fn send<'a>(
        &'a self,
        user: &'a Arc<str>,
        run: &'a Arc<str>,
        text: String,
    ) -> BoxFuture<'a, Result<(), AppendError>>;
    /// Records JSON object text for the run after what was queued before it, waiting
    /// (boundedly) for room in the queue; its seq.
    fn record<'a>(
        &'a self,
        user: &'a Arc<str>,
        run: &'a Arc<str>,
        text: String,
    ) -> BoxFuture<'a, Result<u64, AppendError>>;
    /// The kept frames of the run after `after_seq`, checked as
    /// [`RunLog::resume`](super::RunLog::resume) says.
    fn replay<'a>(
        &'a self,
        user: &'a str,
        run: &'a str,
        after_seq: u64,
        epoch: Option<u64>,
    ) -> BoxFuture<'a, Result<Vec<Frame>, Resync>>;
    /// Whether another process follows the run (marked within the last seconds).
    fn followed<'a>(&'a self, user: &'a str, run: &'a str) -> BoxFuture<'a, bool>;

    /// A writer was made for the run. A store that creates runs on their first
    /// append does nothing.
    fn open(&self, _user: &Arc<str>, _run: &Arc<str>) {}
    /// The run's last `seq`, when the store knows it without asking anyone; `None`
    /// lets the log answer from what this process read and appended.
    fn last_seq(&self, _key: &RunKey) -> Option<u64> {
        None
    }
    /// What the store keeps in this process, when it keeps the frames here; `None`
    /// lets the log count the runs it follows.
    fn kept(&self) -> Option<RunLogStats> {
        None
    }
    /// Forgets what has outlived its time to live (a store that expires its runs by
    /// itself does nothing).
    fn sweep(&self) {}
}

/// The frames of a process's own runs.
pub(super) struct LocalStore {
    config: RunLogConfig,
    epoch: u64,
    runs: Mutex<HashMap<RunKey, Arc<Mutex<Kept>>>>,
    /// Bytes of frames kept, all runs together.
    bytes: AtomicUsize,
    /// Where each recorded frame goes at once.
    fanout: Arc<Fanout>,
}

/// One run's frames.
struct Kept {
    frames: VecDeque<Frame>,
    /// The seq the next frame gets.
    next_seq: u64,
    bytes: usize,
    last_write: Instant,
}

impl LocalStore {
    pub(super) fn new(config: RunLogConfig, fanout: Arc<Fanout>) -> LocalStore {
        LocalStore {
            config,
            epoch: fresh_epoch(),
            runs: Mutex::default(),
            bytes: AtomicUsize::new(0),
            fanout,
        }
    }

    fn expired(&self, kept: &Kept, now: Instant) -> bool {
        now.saturating_duration_since(kept.last_write) > self.config.ttl
    }

    /// Drops a run's frames; its readers end (they see `unknown_run` on resume).
    fn forget(&self, key: &RunKey, kept: &Mutex<Kept>) {
        let mut k = lock(kept);
        self.bytes.fetch_sub(k.bytes, Ordering::Relaxed);
        k.bytes = 0;
        k.frames.clear();
        drop(k);
        self.fanout.close(key);
    }

    /// Records JSON object text, putting `"seq"` first, and hands it to the run's
    /// readers here, in `seq` order.
    fn append_here(&self, user: &Arc<str>, run: &Arc<str>, text: &str) -> Result<u64, AppendError> {
        let key: RunKey = (Arc::clone(user), Arc::clone(run));
        let kept = lock(&self.runs)
            .get(&key)
            .cloned()
            .ok_or(AppendError::Gone)?;
        let c = &self.config;
        let mut k = lock(&kept);
        let seq = k.next_seq;
        let json = with_seq(seq, text);
        let size = json.len();
        if size > c.max_bytes_per_run || size > c.max_bytes {
            return Err(AppendError::Full);
        }
        // Evict this run's oldest frames until the new one fits every bound.
        while k.frames.len() >= c.max_events_per_run
            || k.bytes + size > c.max_bytes_per_run
            || self.bytes.load(Ordering::Relaxed) + size > c.max_bytes
        {
            let Some(old) = k.frames.pop_front() else {
                return Err(AppendError::Full);
            };
            k.bytes -= old.json.len();
            self.bytes.fetch_sub(old.json.len(), Ordering::Relaxed);
        }
        k.next_seq += 1;
        k.bytes += size;
        self.bytes.fetch_add(size, Ordering::Relaxed);
        k.last_write = Instant::now();
        let frame = Frame { seq, json };
        // Under the run's lock, so readers get the frames in `seq` order.
        self.fanout.publish(&key, &frame);
        k.frames.push_back(frame);
        Ok(seq)
    }

    fn replay_here(
        &self,
        user: &str,
        run: &str,
        after_seq: u64,
        epoch: Option<u64>,
    ) -> Result<Vec<Frame>, Resync> {
        if epoch.is_some_and(|e| e != self.epoch) {
            return Err(Resync::EpochChanged);
        }
        let key: RunKey = (Arc::from(user), Arc::from(run));
        let kept = {
            let mut runs = lock(&self.runs);
            let kept = runs.get(&key).cloned().ok_or(Resync::UnknownRun)?;
            if self.expired(&lock(&kept), Instant::now()) {
                runs.remove(&key);
                self.forget(&key, &kept);
                return Err(Resync::UnknownRun);
            }
            kept
        };
        let k = lock(&kept);
        // Kept: `first..next_seq`. Asking from before `first` asks for evicted
        // frames; asking from past the last one means the client's run is not this
        // one (it was evicted and begun again): either way, resync.
        let first = k.frames.front().map_or(k.next_seq, |f| f.seq);
        let last = k.next_seq - 1;
        if after_seq.saturating_add(1) < first || after_seq > last {
            return Err(Resync::Truncated);
        }
        Ok(k.frames
            .iter()
            .filter(|f| f.seq > after_seq)
            .cloned()
            .collect())
    }
}

impl Store for LocalStore {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn append(&self, user: &Arc<str>, run: &Arc<str>, text: String) -> Result<(), AppendError> {
        self.append_here(user, run, &text).map(|_| ())
    }

    fn send<'a>(
        &'a self,
        user: &'a Arc<str>,
        run: &'a Arc<str>,
        text: String,
    ) -> BoxFuture<'a, Result<(), AppendError>> {
        Box::pin(std::future::ready(self.append(user, run, text)))
    }

    fn record<'a>(
        &'a self,
        user: &'a Arc<str>,
        run: &'a Arc<str>,
        text: String,
    ) -> BoxFuture<'a, Result<u64, AppendError>> {
        Box::pin(std::future::ready(self.append_here(user, run, &text)))
    }

    fn replay<'a>(
        &'a self,
        user: &'a str,
        run: &'a str,
        after_seq: u64,
        epoch: Option<u64>,
    ) -> BoxFuture<'a, Result<Vec<Frame>, Resync>> {
        Box::pin(std::future::ready(
            self.replay_here(user, run, after_seq, epoch),
        ))
    }

    /// No other process shares these runs.
    fn followed<'a>(&'a self, _user: &'a str, _run: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(std::future::ready(false))
    }

    /// Creates the run if it is new; past the per-user bound, the user's least
    /// recently written run goes.
    fn open(&self, user: &Arc<str>, run: &Arc<str>) {
        let key: RunKey = (Arc::clone(user), Arc::clone(run));
        let mut runs = lock(&self.runs);
        if runs.contains_key(&key) {
            return;
        }
        let mine: Vec<(&RunKey, Instant)> = runs
            .iter()
            .filter(|((u, _), _)| u == user)
            .map(|(k, kept)| (k, lock(kept).last_write))
            .collect();
        if mine.len() >= self.config.max_runs_per_user
            && let Some((oldest, _)) = mine.iter().min_by_key(|(_, t)| *t)
        {
            let oldest = (*oldest).clone();
            if let Some(kept) = runs.remove(&oldest) {
                self.forget(&oldest, &kept);
            }
        }
        let kept = Kept {
            frames: VecDeque::new(),
            next_seq: 1,
            bytes: 0,
            last_write: Instant::now(),
        };
        runs.insert(key, Arc::new(Mutex::new(kept)));
    }

    fn last_seq(&self, key: &RunKey) -> Option<u64> {
        let kept = lock(&self.runs).get(key).cloned()?;
        let seq = lock(&kept).next_seq - 1;
        Some(seq)
    }

    fn kept(&self) -> Option<RunLogStats> {
        Some(RunLogStats {
            runs: lock(&self.runs).len(),
            bytes: self.bytes.load(Ordering::Relaxed),
        })
    }

    fn sweep(&self) {
        let now = Instant::now();
        lock(&self.runs).retain(|key, kept| {
            let keep = !self.expired(&lock(kept), now);
            if !keep {
                self.forget(key, kept);
            }
            keep
        });
    }
}
