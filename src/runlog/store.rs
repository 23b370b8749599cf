//! Where a run's frames are kept and numbered: the [`Store`] seam, and
//! [`LocalStore`], the store of a process's own log (frames in memory, within the
//! bounds of [`RunLogConfig`]). A shared store (Redis Streams, feature `redis`)
//! implements the same trait.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::fanout::{Fanout, Followed, RunKey};
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
    /// wait). By default [`append`](Store::append), for a store that never waits.
    fn send<'a>(
        &'a self,
        user: &'a Arc<str>,
        run: &'a Arc<str>,
        text: String,
    ) -> BoxFuture<'a, Result<(), AppendError>> {
        ready(self.append(user, run, text))
    }
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

    /// A writer is being made for the run: a store that keeps runs in this process
    /// creates it and hands back a store bound to it, which appends without looking
    /// the run up; `None` (a shared store, which creates runs on their first append)
    /// lets the writer use this store.
    fn open(&self, _user: &Arc<str>, _run: &Arc<str>) -> Option<Arc<dyn Store>> {
        None
    }
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

/// The frames of a process's own runs. Cheap to clone.
#[derive(Clone)]
pub(super) struct LocalStore(Arc<Local>);

struct Local {
    config: RunLogConfig,
    epoch: u64,
    runs: Mutex<HashMap<RunKey, Entry>>,
    /// Bytes of frames kept, all runs together.
    bytes: AtomicUsize,
    /// Where each recorded frame goes at once.
    fanout: Arc<Fanout>,
}

/// One run: its frames, and its readers in this process.
#[derive(Clone)]
struct Entry {
    kept: Arc<Mutex<Kept>>,
    readers: Arc<Mutex<Followed>>,
}

/// One run's frames.
struct Kept {
    frames: VecDeque<Frame>,
    /// The seq the next frame gets.
    next_seq: u64,
    bytes: usize,
    last_write: Instant,
    /// The run was evicted or expired: a writer still holding it is refused.
    gone: bool,
}

/// [`LocalStore`] bound to one run, for that run's writers: appends go straight to
/// the run and its readers, without a lookup.
struct LocalRun {
    store: LocalStore,
    entry: Entry,
}

impl LocalStore {
    pub(super) fn new(config: RunLogConfig, fanout: Arc<Fanout>) -> LocalStore {
        LocalStore(Arc::new(Local {
            config,
            epoch: fresh_epoch(),
            runs: Mutex::default(),
            bytes: AtomicUsize::new(0),
            fanout,
        }))
    }
}

impl Local {
    fn expired(&self, kept: &Kept, now: Instant) -> bool {
        kept.gone || now.saturating_duration_since(kept.last_write) > self.config.ttl
    }

    /// Drops a run's frames; its readers end (they see `unknown_run` on resume), and
    /// a writer still holding it is refused.
    fn forget(&self, key: &RunKey, entry: &Entry) {
        let mut k = lock(&entry.kept);
        self.bytes.fetch_sub(k.bytes, Ordering::Relaxed);
        k.bytes = 0;
        k.frames.clear();
        k.gone = true;
        drop(k);
        self.fanout.close(key);
    }

    /// Records JSON object text, putting `"seq"` first, and hands it to the run's
    /// readers here, in `seq` order.
    fn append(&self, entry: &Entry, text: &str) -> Result<u64, AppendError> {
        let c = &self.config;
        let mut k = lock(&entry.kept);
        if k.gone {
            return Err(AppendError::Gone);
        }
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
        Fanout::publish(&entry.readers, &frame);
        k.frames.push_back(frame);
        Ok(seq)
    }

    /// The run's entry, if it is kept.
    fn entry(&self, user: &Arc<str>, run: &Arc<str>) -> Result<Entry, AppendError> {
        let key: RunKey = (Arc::clone(user), Arc::clone(run));
        lock(&self.runs).get(&key).cloned().ok_or(AppendError::Gone)
    }

    fn replay(
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
        let entry = {
            let mut runs = lock(&self.runs);
            let entry = runs.get(&key).cloned().ok_or(Resync::UnknownRun)?;
            if self.expired(&lock(&entry.kept), Instant::now()) {
                runs.remove(&key);
                self.forget(&key, &entry);
                return Err(Resync::UnknownRun);
            }
            entry
        };
        let k = lock(&entry.kept);
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

    /// The run's entry, created if it is new; past the per-user bound, the user's
    /// least recently written run goes.
    fn open(&self, user: &Arc<str>, run: &Arc<str>) -> Entry {
        let key: RunKey = (Arc::clone(user), Arc::clone(run));
        let mut runs = lock(&self.runs);
        if let Some(entry) = runs.get(&key) {
            return entry.clone();
        }
        let mine: Vec<(&RunKey, Instant)> = runs
            .iter()
            .filter(|((u, _), _)| u == user)
            .map(|(k, e)| (k, lock(&e.kept).last_write))
            .collect();
        if mine.len() >= self.config.max_runs_per_user
            && let Some((oldest, _)) = mine.iter().min_by_key(|(_, t)| *t)
        {
            let oldest = (*oldest).clone();
            if let Some(entry) = runs.remove(&oldest) {
                self.forget(&oldest, &entry);
            }
        }
        let kept = Kept {
            frames: VecDeque::new(),
            next_seq: 1,
            bytes: 0,
            last_write: Instant::now(),
            gone: false,
        };
        let entry = Entry {
            kept: Arc::new(Mutex::new(kept)),
            readers: self.fanout.entry(key.clone()),
        };
        runs.insert(key, entry.clone());
        entry
    }
}

fn ready<'a, T: Send + 'a>(t: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(t))
}

impl Store for LocalStore {
    fn epoch(&self) -> u64 {
        self.0.epoch
    }

    fn append(&self, user: &Arc<str>, run: &Arc<str>, text: String) -> Result<(), AppendError> {
        let entry = self.0.entry(user, run)?;
        self.0.append(&entry, &text).map(|_| ())
    }

    fn record<'a>(
        &'a self,
        user: &'a Arc<str>,
        run: &'a Arc<str>,
        text: String,
    ) -> BoxFuture<'a, Result<u64, AppendError>> {
        ready(
            self.0
                .entry(user, run)
                .and_then(|entry| self.0.append(&entry, &text)),
        )
    }

    fn replay<'a>(
        &'a self,
        user: &'a str,
        run: &'a str,
        after_seq: u64,
        epoch: Option<u64>,
    ) -> BoxFuture<'a, Result<Vec<Frame>, Resync>> {
        ready(self.0.replay(user, run, after_seq, epoch))
    }

    /// No other process shares these runs.
    fn followed<'a>(&'a self, _user: &'a str, _run: &'a str) -> BoxFuture<'a, bool> {
        ready(false)
    }

    fn open(&self, user: &Arc<str>, run: &Arc<str>) -> Option<Arc<dyn Store>> {
        let entry = self.0.open(user, run);
        Some(Arc::new(LocalRun {
            store: self.clone(),
            entry,
        }))
    }

    fn last_seq(&self, key: &RunKey) -> Option<u64> {
        let entry = self.0.entry(&key.0, &key.1).ok()?;
        let seq = lock(&entry.kept).next_seq - 1;
        Some(seq)
    }

    fn kept(&self) -> Option<RunLogStats> {
        Some(RunLogStats {
            runs: lock(&self.0.runs).len(),
            bytes: self.0.bytes.load(Ordering::Relaxed),
        })
    }

    fn sweep(&self) {
        let s = &self.0;
        let now = Instant::now();
        lock(&s.runs).retain(|key, entry| {
            let keep = !s.expired(&lock(&entry.kept), now);
            if !keep {
                s.forget(key, entry);
            }
            keep
        });
    }
}

/// The store bound to one run: `user` and `run` name that run whatever they say
/// (only its writer calls it).
impl Store for LocalRun {
    fn epoch(&self) -> u64 {
        self.store.epoch()
    }

    fn append(&self, _: &Arc<str>, _: &Arc<str>, text: String) -> Result<(), AppendError> {
        self.store.0.append(&self.entry, &text).map(|_| ())
    }

    fn record<'a>(
        &'a self,
        _: &'a Arc<str>,
        _: &'a Arc<str>,
        text: String,
    ) -> BoxFuture<'a, Result<u64, AppendError>> {
        ready(self.store.0.append(&self.entry, &text))
    }

    fn replay<'a>(
        &'a self,
        user: &'a str,
        run: &'a str,
        after_seq: u64,
        epoch: Option<u64>,
    ) -> BoxFuture<'a, Result<Vec<Frame>, Resync>> {
        self.store.replay(user, run, after_seq, epoch)
    }

    fn followed<'a>(&'a self, user: &'a str, run: &'a str) -> BoxFuture<'a, bool> {
        self.store.followed(user, run)
    }

    fn last_seq(&self, _: &RunKey) -> Option<u64> {
        Some(lock(&self.entry.kept).next_seq - 1)
    }
}
