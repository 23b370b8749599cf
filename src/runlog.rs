//! Run logs: the event stream of a run, kept so that it outlives its socket.
//!
//! Every event of a run (user, `run_id`) gets a `seq` (from 1, contiguous) and is
//! serialized once, into a [`Frame`]. A [`RunWriter`] is the run's [`EventSink`]: a
//! dispatcher writes to it through the ordinary `.sink(..)`. A [`RunReader`] replays
//! the frames after a given `seq`, then follows the live ones, with no gap and no
//! duplicate between the two. Appends never wait for readers: a reader that falls
//! behind its buffer is told to resync instead of slowing anyone.
//!
//! Bounded per run (events and bytes), per user (live runs), per process (bytes) and
//! in time (a run is forgotten a while after its last event). What was evicted leaves
//! a truncation mark, so a reader asking for it learns it is gone.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::event::Event;
use crate::sink::{EventSink, SinkError, TrySendError};

/// The bounds of a [`RunLog`].
///
/// ```
/// use std::time::Duration;
/// use tool_dispatch::RunLogConfig;
/// let c = RunLogConfig::default().max_events_per_run(4096).ttl(Duration::from_secs(1800));
/// # let _ = c;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLogConfig {
    pub(crate) max_events_per_run: usize,
    pub(crate) max_bytes_per_run: usize,
    pub(crate) max_runs_per_user: usize,
    pub(crate) max_bytes: usize,
    pub(crate) ttl: Duration,
    pub(crate) reader_buffer: usize,
}

impl Default for RunLogConfig {
    fn default() -> Self {
        RunLogConfig {
            max_events_per_run: 1024,
            max_bytes_per_run: 4 << 20,
            max_runs_per_user: 32,
            max_bytes: 256 << 20,
            ttl: Duration::from_secs(600),
            reader_buffer: 1024,
        }
    }
}

impl RunLogConfig {
    /// Events kept per run (default 1,024); older ones are evicted first.
    pub fn max_events_per_run(mut self, n: usize) -> Self {
        self.max_events_per_run = n.max(1);
        self
    }

    /// Bytes of serialized events kept per run (default 4 MiB).
    pub fn max_bytes_per_run(mut self, n: usize) -> Self {
        self.max_bytes_per_run = n;
        self
    }

    /// Runs kept per user (default 32); a new run evicts the user's least recently
    /// written one.
    pub fn max_runs_per_user(mut self, n: usize) -> Self {
        self.max_runs_per_user = n.max(1);
        self
    }

    /// Bytes of serialized events kept in the whole process (default 256 MiB). Past
    /// it, a run that appends evicts its own oldest events; an event that still does
    /// not fit is refused (and counts as undelivered).
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// How long a run is kept after its last event (default 10 minutes).
    pub fn ttl(mut self, d: Duration) -> Self {
        self.ttl = d;
        self
    }

    /// Frames a reader may fall behind by before it is told to resync (default 1,024).
    pub fn reader_buffer(mut self, n: usize) -> Self {
        self.reader_buffer = n.max(1);
        self
    }
}

/// One event of a run, serialized once: the event's JSON with its `"seq"` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The event's place in its run, from 1, contiguous.
    pub seq: u64,
    /// The JSON text sent to clients.
    pub json: Arc<str>,
}

/// Why a reader cannot continue from where it asked: it must fetch the run's state
/// again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Resync {
    /// Events after the requested `seq` were evicted (or the reader fell too far
    /// behind the live stream).
    #[error("the events after the requested seq are no longer kept")]
    Truncated,
    /// No such run for this user: it never existed, has expired, or belongs to
    /// someone else (indistinguishable on purpose).
    #[error("no such run")]
    UnknownRun,
    /// The log's contents are gone since the client's `seq` was issued (the process,
    /// or with a shared log its store, started afresh).
    #[error("the run log was restarted")]
    EpochChanged,
    /// A shared log's store cannot be reached now: ask again later.
    #[error("the run log cannot be reached now")]
    Unavailable,
}

impl Resync {
    /// The wire name (`truncated`, `unknown_run`, `epoch_changed`, `unavailable`).
    pub fn as_str(self) -> &'static str {
        match self {
            Resync::Truncated => "truncated",
            Resync::UnknownRun => "unknown_run",
            Resync::EpochChanged => "epoch_changed",
            Resync::Unavailable => "unavailable",
        }
    }
}

/// How much a [`RunLog`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunLogStats {
    /// Runs kept (with a shared log: the runs this process follows).
    pub runs: usize,
    /// Bytes of serialized events kept in this process (0 with a shared log, which
    /// keeps them in its store).
    pub bytes: usize,
}

/// Where the frames live when several processes share the runs (Redis Streams): the
/// seam between this module's fan-out to local readers and a shared store. The store
/// assigns each frame its `seq` and keeps it; it feeds the frames of the runs this
/// process follows back through [`RunLog::deliver`].
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
    /// [`RunLog::resume`] says.
    fn replay<'a>(
        &'a self,
        user: &'a str,
        run: &'a str,
        after_seq: u64,
        epoch: Option<u64>,
    ) -> BoxFuture<'a, Result<Vec<Frame>, Resync>>;
    /// Whether another process follows the run (marked within the last seconds).
    fn followed<'a>(&'a self, user: &'a str, run: &'a str) -> BoxFuture<'a, bool>;
}

/// The run logs of one process. Cheap to clone (one `Arc`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tool_dispatch::{RunLog, RunLogConfig};
/// let log = RunLog::new(RunLogConfig::default());
/// let writer = log.writer("alice", "run_1");
/// writer.append(serde_json::json!({"type": "tool_results", "results": []})).await.unwrap();
/// let mut reader = log.resume("alice", "run_1", 0, Some(log.epoch())).await.unwrap();
/// let frame = reader.next().await.unwrap().unwrap();
/// assert_eq!((frame.seq, &*frame.json), (1, r#"{"seq":1,"results":[],"type":"tool_results"}"#));
/// assert!(log.resume("bob", "run_1", 0, None).await.is_err()); // not bob's run
/// # }
/// ```
///
/// Several processes share their runs through Redis with `RunLog::redis` (feature
/// `redis`): a client resumes on any of them.
#[derive(Clone)]
pub struct RunLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RunLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunLog")
            .field("epoch", &self.epoch())
            .field("shared", &self.shared.store.is_some())
            .field("stats", &self.stats())
            .finish()
    }
}

type RunKey = (Arc<str>, Arc<str>);

struct Shared {
    config: RunLogConfig,
    epoch: u64,
    /// With a shared store, the runs here are only the fan-out to this process's
    /// readers: the frames and their `seq`s are the store's.
    store: Option<Arc<dyn Store>>,
    /// Told when a run gains its first reader here, for a store that follows runs.
    followed: Notify,
    runs: Mutex<HashMap<RunKey, Arc<Run>>>,
    bytes: AtomicUsize,
    created: AtomicUsize,
}

struct Run {
    state: Mutex<RunState>,
}

struct RunState {
    frames: VecDeque<Frame>,
    /// The seq the next frame gets (with a shared store: the next one to read).
    next_seq: u64,
    /// With a shared store: the highest seq this process appended to the run.
    appended: u64,
    bytes: usize,
    last_write: Instant,
    readers: Vec<Reader>,
    /// The run was evicted or expired: its frames are gone, its readers closed.
    gone: bool,
}

struct Reader {
    tx: mpsc::Sender<Frame>,
    lagged: Arc<std::sync::atomic::AtomicBool>,
}

impl RunState {
    fn new() -> RunState {
        RunState {
            frames: VecDeque::new(),
            next_seq: 1,
            appended: 0,
            bytes: 0,
            last_write: Instant::now(),
            readers: Vec::new(),
            gone: false,
        }
    }

    /// Hands `frame` to every live reader without waiting; one that is behind is cut
    /// off and will be told to resync once it has read what it has.
    fn fan_out(&mut self, frame: &Frame) {
        self.readers.retain(|r| match r.tx.try_send(frame.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                r.lagged.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// Cuts every reader off: each is told to resync once it has read what it has.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn cut_off(&mut self) {
        for r in self.readers.drain(..) {
            r.lagged.store(true, Ordering::Release);
        }
    }

    /// A new reader, with its first expected `seq` after `last` (`None`: whatever
    /// comes next).
    fn reader(&mut self, buffer: usize, last: Option<u64>) -> RunReader {
        let (tx, rx) = mpsc::channel(buffer);
        let lagged = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if !self.gone {
            self.readers.push(Reader {
                tx,
                lagged: Arc::clone(&lagged),
            });
        }
        RunReader {
            replay: VecDeque::new(),
            live: rx,
            lagged,
            last,
            done: false,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A random epoch below 2^53, so a browser keeps it exactly as a JSON number.
pub(crate) fn fresh_epoch() -> u64 {
    std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), std::time::SystemTime::now())
        >> 11
}

impl RunLog {
    /// An empty log with a fresh epoch.
    pub fn new(config: RunLogConfig) -> RunLog {
        RunLog::with(config, None)
    }

    fn with(config: RunLogConfig, store: Option<Arc<dyn Store>>) -> RunLog {
        RunLog {
            shared: Arc::new(Shared {
                config,
                epoch: fresh_epoch(),
                store,
                followed: Notify::new(),
                runs: Mutex::default(),
                bytes: AtomicUsize::new(0),
                created: AtomicUsize::new(0),
            }),
        }
    }

    /// This log's epoch: clients keep it with their `seq`, and a different one means
    /// the log's contents are gone. Below 2^53, so it survives a JavaScript number.
    /// Processes sharing a log share its epoch.
    pub fn epoch(&self) -> u64 {
        match &self.shared.store {
            Some(store) => store.epoch(),
            None => self.shared.epoch,
        }
    }

    /// The writer of `user_id`'s run `run_id`, creating the run if it is new (which
    /// may evict the user's least recently written run past the per-user bound).
    pub fn writer(&self, user_id: &str, run_id: &str) -> RunWriter {
        let s = &self.shared;
        if s.created.fetch_add(1, Ordering::Relaxed) % 64 == 63 {
            self.sweep();
        }
        let key: RunKey = (Arc::from(user_id), Arc::from(run_id));
        let mut runs = lock(&s.runs);
        if let Some(run) = runs.get(&key)
            && !lock(&run.state).gone
        {
            return RunWriter {
                shared: Arc::clone(s),
                run: Arc::clone(run),
                key,
            };
        }
        // Past the per-user bound, the user's least recently written run goes (a
        // shared store bounds its runs itself).
        let mine: Vec<(RunKey, Instant)> = match s.store {
            Some(_) => Vec::new(),
            None => runs
                .iter()
                .filter(|((u, _), _)| **u == *user_id)
                .map(|(k, r)| (k.clone(), lock(&r.state).last_write))
                .collect(),
        };
        if mine.len() >= s.config.max_runs_per_user
            && let Some((oldest, _)) = mine.iter().min_by_key(|(_, t)| *t)
            && let Some(run) = runs.remove(oldest)
        {
            s.forget(&run);
        }
        let run = Arc::new(Run {
            state: Mutex::new(RunState::new()),
        });
        runs.insert(key.clone(), Arc::clone(&run));
        RunWriter {
            shared: Arc::clone(s),
            run,
            key,
        }
    }

    /// A reader of `user_id`'s run `run_id` from `after_seq` on: the kept frames with
    /// a higher `seq`, then the live ones. `epoch` is the one the client was given
    /// (`None` when it has none yet).
    pub async fn resume(
        &self,
        user_id: &str,
        run_id: &str,
        after_seq: u64,
        epoch: Option<u64>,
    ) -> Result<RunReader, Resync> {
        let Some(store) = &self.shared.store else {
            return self.resume_here(user_id, run_id, after_seq, epoch);
        };
        // Follow first, then replay: whatever is appended meanwhile comes through the
        // live side, and the reader drops what it has had already.
        let (mut reader, moved) = self.follow(user_id, run_id, Some(after_seq));
        match store.replay(user_id, run_id, after_seq, epoch).await {
            Ok(replay) => {
                reader.replay = replay.into();
                Ok(reader)
            }
            Err(resync) => {
                drop(reader);
                self.unfollow(user_id, run_id, moved);
                Err(resync)
            }
        }
    }

    fn resume_here(
        &self,
        user_id: &str,
        run_id: &str,
        after_seq: u64,
        epoch: Option<u64>,
    ) -> Result<RunReader, Resync> {
        let s = &self.shared;
        if epoch.is_some_and(|e| e != s.epoch) {
            return Err(Resync::EpochChanged);
        }
        let run = {
            let key: RunKey = (Arc::from(user_id), Arc::from(run_id));
            let mut runs = lock(&s.runs);
            let run = runs.get(&key).cloned().ok_or(Resync::UnknownRun)?;
            if s.expired(&run, Instant::now()) {
                runs.remove(&key);
                s.forget(&run);
                return Err(Resync::UnknownRun);
            }
            run
        };
        let mut st = lock(&run.state);
        if st.gone {
            return Err(Resync::UnknownRun);
        }
        // Kept: `first..next_seq`. Asking from before `first` asks for evicted
        // frames; asking from past the last one means the client's run is not this
        // one (it was evicted and begun again): either way, resync.
        let first = st.frames.front().map_or(st.next_seq, |f| f.seq);
        let last = st.next_seq - 1;
        if after_seq.saturating_add(1) < first || after_seq > last {
            return Err(Resync::Truncated);
        }
        let replay: VecDeque<Frame> = st
            .frames
            .iter()
            .filter(|f| f.seq > after_seq)
            .cloned()
            .collect();
        let mut reader = st.reader(s.config.reader_buffer, Some(after_seq));
        reader.replay = replay;
        Ok(reader)
    }

    /// With a shared store: a live reader of the run from after `last`, the run
    /// followed from there if nobody here followed it yet (then also the read
    /// position it replaced).
    fn follow(&self, user_id: &str, run_id: &str, last: Option<u64>) -> (RunReader, Option<u64>) {
        let s = &self.shared;
        let key: RunKey = (Arc::from(user_id), Arc::from(run_id));
        let run = Arc::clone(lock(&s.runs).entry(key).or_insert_with(|| {
            Arc::new(Run {
                state: Mutex::new(RunState::new()),
            })
        }));
        let mut st = lock(&run.state);
        st.readers.retain(|r| !r.tx.is_closed());
        let first = st.readers.is_empty();
        let mut moved = None;
        if first && let Some(after) = last {
            moved = Some(std::mem::replace(&mut st.next_seq, after.saturating_add(1)));
        }
        st.gone = false;
        let reader = st.reader(s.config.reader_buffer, last);
        drop(st);
        if first {
            s.followed.notify_one();
        }
        (reader, moved)
    }

    /// Undoes the `follow` of a resume that failed, so that it leaves nothing behind:
    /// the read position it moved goes back (never forward: a frame read twice is
    /// skipped by readers, a frame skipped is lost), and the run is forgotten here if
    /// nothing else uses it.
    fn unfollow(&self, user_id: &str, run_id: &str, moved: Option<u64>) {
        let key: RunKey = (Arc::from(user_id), Arc::from(run_id));
        let mut runs = lock(&self.shared.runs);
        let Some(run) = runs.get(&key).cloned() else {
            return;
        };
        let mut st = lock(&run.state);
        st.readers.retain(|r| !r.tx.is_closed());
        if let Some(before) = moved {
            st.next_seq = st.next_seq.min(before);
        }
        // Held by the map and by `run` only: no reader, no writer.
        let unused = st.readers.is_empty() && Arc::strong_count(&run) == 2;
        drop(st);
        let removed = if unused { runs.remove(&key) } else { None };
        drop(runs); // the run itself goes outside the lock
        drop((run, removed));
    }

    /// Whether some connection, in this process or (with a shared log) another,
    /// follows the run.
    pub async fn is_followed(&self, user_id: &str, run_id: &str) -> bool {
        let key: RunKey = (Arc::from(user_id), Arc::from(run_id));
        let run = lock(&self.shared.runs).get(&key).cloned();
        if let Some(run) = run {
            let mut st = lock(&run.state);
            st.readers.retain(|r| !r.tx.is_closed());
            if !st.readers.is_empty() {
                return true;
            }
        }
        match &self.shared.store {
            Some(store) => store.followed(user_id, run_id).await,
            None => false,
        }
    }

    /// How many runs and bytes are kept.
    pub fn stats(&self) -> RunLogStats {
        RunLogStats {
            runs: lock(&self.shared.runs).len(),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
        }
    }

    /// Forgets the runs past their time to live; returns how many are kept.
    pub fn sweep(&self) -> usize {
        let s = &self.shared;
        let now = Instant::now();
        let mut runs = lock(&s.runs);
        runs.retain(|_, run| {
            let keep = !s.expired(run, now);
            if !keep {
                s.forget(run);
            }
            keep
        });
        runs.len()
    }
}

/// What a shared [`Store`] uses of the log (only the `redis` feature has one).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl RunLog {
    /// A log whose frames live in `store`, shared with other processes.
    pub(crate) fn shared(config: RunLogConfig, store: Arc<dyn Store>) -> RunLog {
        RunLog::with(config, Some(store))
    }

    /// A handle that does not keep the log alive, for a store's own tasks.
    pub(crate) fn downgrade(&self) -> WeakRunLog {
        WeakRunLog(Arc::downgrade(&self.shared))
    }

    /// The runs followed here, each with the `seq` read last: what a shared store
    /// reads on for this process.
    pub(crate) fn followed_runs(&self) -> Vec<(Arc<str>, Arc<str>, u64)> {
        let runs = lock(&self.shared.runs);
        runs.iter()
            .filter_map(|((user, run), r)| {
                let mut st = lock(&r.state);
                st.readers.retain(|r| !r.tx.is_closed());
                (!st.readers.is_empty())
                    .then(|| (Arc::clone(user), Arc::clone(run), st.next_seq - 1))
            })
            .collect()
    }

    /// Waits until a run gains its first reader here.
    pub(crate) async fn newly_followed(&self) {
        self.shared.followed.notified().await;
    }

    /// Frames a shared store read for a run followed here, in `seq` order.
    pub(crate) fn deliver(&self, user_id: &str, run_id: &str, frames: Vec<Frame>) {
        let key: RunKey = (Arc::from(user_id), Arc::from(run_id));
        let Some(run) = lock(&self.shared.runs).get(&key).cloned() else {
            return;
        };
        let mut st = lock(&run.state);
        for frame in frames {
            if frame.seq < st.next_seq {
                continue;
            }
            st.next_seq = frame.seq + 1;
            st.fan_out(&frame);
        }
        st.last_write = Instant::now();
    }

    /// Frames of the run were lost on their way to the store: its readers here are
    /// told to resync.
    pub(crate) fn lost(&self, user_id: &str, run_id: &str) {
        let key: RunKey = (Arc::from(user_id), Arc::from(run_id));
        if let Some(run) = lock(&self.shared.runs).get(&key).cloned() {
            lock(&run.state).cut_off();
        }
    }

    /// The shared store started afresh: every reader here is told to resync.
    pub(crate) fn restarted(&self) {
        for run in lock(&self.shared.runs).values() {
            let mut st = lock(&run.state);
            st.cut_off();
            st.next_seq = 1;
        }
    }
}

/// A [`RunLog`] that a store's task holds without keeping it alive.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct WeakRunLog(Weak<Shared>);

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl WeakRunLog {
    /// The log, while anyone else holds it.
    pub(crate) fn upgrade(&self) -> Option<RunLog> {
        self.0.upgrade().map(|shared| RunLog { shared })
    }
}

impl Shared {
    fn expired(&self, run: &Run, now: Instant) -> bool {
        let mut st = lock(&run.state);
        if self.store.is_some() {
            // Only a fan-out: kept while someone here reads it.
            st.readers.retain(|r| !r.tx.is_closed());
            return st.readers.is_empty()
                && now.saturating_duration_since(st.last_write) > self.config.ttl;
        }
        st.gone || now.saturating_duration_since(st.last_write) > self.config.ttl
    }

    /// Drops a run's frames and closes its readers (they see `unknown_run` on resume).
    fn forget(&self, run: &Run) {
        let mut st = lock(&run.state);
        st.gone = true;
        self.bytes.fetch_sub(st.bytes, Ordering::Relaxed);
        st.bytes = 0;
        st.frames.clear();
        st.readers.clear();
    }
}

/// Appends to one run; the run's [`EventSink`]. Appends never wait.
#[derive(Clone)]
pub struct RunWriter {
    shared: Arc<Shared>,
    run: Arc<Run>,
    key: RunKey,
}

impl std::fmt::Debug for RunWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunWriter").finish_non_exhaustive()
    }
}

/// Why an append was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The frame is not a JSON object.
    #[error("a run frame must be a JSON object")]
    NotAnObject,
    /// The frame does not fit in the log's bounds even after evicting this run's
    /// older frames.
    #[error("the run log is full")]
    Full,
    /// The run was evicted or expired.
    #[error("the run is no longer kept")]
    Gone,
    /// A shared log's store cannot be reached: the frame is not recorded.
    #[error("the run log cannot be reached")]
    Unavailable,
}

impl RunWriter {
    /// Appends a frame of the server's own (a `tool_results` message, say); it gets
    /// the run's next `seq`, which is returned once the log has recorded it (at once
    /// in a process's own log; after a round trip in a shared one).
    pub async fn append(&self, frame: Value) -> Result<u64, AppendError> {
        if !frame.is_object() {
            return Err(AppendError::NotAnObject);
        }
        let text = frame.to_string();
        let Some(store) = &self.shared.store else {
            return self.append_here(&text);
        };
        if text.len() > self.shared.config.max_bytes_per_run {
            return Err(AppendError::Full);
        }
        let seq = store.record(&self.key.0, &self.key.1, text).await?;
        let mut st = lock(&self.run.state);
        st.appended = st.appended.max(seq);
        Ok(seq)
    }

    /// Queues JSON object text for a shared store.
    fn queue(&self, store: &Arc<dyn Store>, text: String) -> Result<(), AppendError> {
        if text.len() > self.shared.config.max_bytes_per_run {
            return Err(AppendError::Full);
        }
        store.append(&self.key.0, &self.key.1, text)
    }

    /// Appends JSON object text, putting `"seq"` first.
    fn append_here(&self, text: &str) -> Result<u64, AppendError> {
        let s = &self.shared;
        let mut st = lock(&self.run.state);
        if st.gone {
            return Err(AppendError::Gone);
        }
        let seq = st.next_seq;
        let json = with_seq(seq, text);
        let size = json.len();
        if size > s.config.max_bytes_per_run || size > s.config.max_bytes {
            return Err(AppendError::Full);
        }
        // Evict this run's oldest frames until the new one fits every bound.
        while st.frames.len() >= s.config.max_events_per_run
            || st.bytes + size > s.config.max_bytes_per_run
            || s.bytes.load(Ordering::Relaxed) + size > s.config.max_bytes
        {
            let Some(old) = st.frames.pop_front() else {
                return Err(AppendError::Full);
            };
            st.bytes -= old.json.len();
            s.bytes.fetch_sub(old.json.len(), Ordering::Relaxed);
        }
        st.next_seq += 1;
        st.bytes += size;
        s.bytes.fetch_add(size, Ordering::Relaxed);
        st.last_write = Instant::now();
        let frame = Frame { seq, json };
        st.fan_out(&frame);
        st.frames.push_back(frame);
        Ok(seq)
    }

    /// A reader of this run's frames appended from now on (none of the kept ones):
    /// for a connection that starts following a run it is about to write to. With a
    /// shared log, a run nobody here followed yet is read from its first kept frame.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use serde_json::json;
    /// use tool_dispatch::{RunLog, RunLogConfig};
    /// let log = RunLog::new(RunLogConfig::default());
    /// let writer = log.writer("alice", "run_1");
    /// writer.append(json!({"type": "note"})).await.unwrap();
    /// let mut reader = writer.subscribe();
    /// writer.append(json!({"type": "note"})).await.unwrap();
    /// assert_eq!(reader.next().await.unwrap().unwrap().seq, 2);
    /// # }
    /// ```
    pub fn subscribe(&self) -> RunReader {
        if self.shared.store.is_some() {
            let log = RunLog {
                shared: Arc::clone(&self.shared),
            };
            return log.follow(&self.key.0, &self.key.1, None).0;
        }
        lock(&self.run.state).reader(self.shared.config.reader_buffer, None)
    }

    /// The `seq` of the last frame appended (0 before the first); with a shared log,
    /// the highest this process has read or had returned by [`append`](Self::append).
    pub fn last_seq(&self) -> u64 {
        match self.shared.store {
            Some(_) => {
                let read = lock(&self.shared.runs)
                    .get(&self.key)
                    .map_or(0, |r| lock(&r.state).next_seq - 1);
                read.max(lock(&self.run.state).appended)
            }
            None => lock(&self.run.state).next_seq - 1,
        }
    }
}

/// `{"seq":N,` followed by the JSON object text after its `{`.
pub(crate) fn with_seq(seq: u64, text: &str) -> Arc<str> {
    let rest = text.strip_prefix('{').unwrap_or(text);
    let sep = if rest.starts_with('}') { "" } else { "," };
    Arc::from(format!("{{\"seq\":{seq}{sep}{rest}"))
}

impl EventSink for RunWriter {
    /// With a shared log, waits for room in the node's queue (the delivery timeout
    /// bounds the wait); a process's own log never waits.
    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SinkError>> {
        let Some(store) = &self.shared.store else {
            let r = self.try_send(event).map_err(SinkError::from);
            return Box::pin(std::future::ready(r));
        };
        Box::pin(async move {
            let text = serde_json::to_string(&event).map_err(|_| SinkError::Closed)?;
            if text.len() > self.shared.config.max_bytes_per_run {
                return Err(SinkError::Full);
            }
            match store.send(&self.key.0, &self.key.1, text).await {
                Ok(()) => Ok(()),
                Err(AppendError::Gone | AppendError::Unavailable) => Err(SinkError::Closed),
                Err(_) => Err(SinkError::Full),
            }
        })
    }

    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        let text = match serde_json::to_string(&event) {
            Ok(t) => t,
            Err(_) => return Err(TrySendError::Closed(event)),
        };
        let appended = match &self.shared.store {
            Some(store) => self.queue(store, text),
            None => self.append_here(&text).map(|_| ()),
        };
        match appended {
            Ok(()) => Ok(()),
            Err(AppendError::Gone | AppendError::Unavailable) => Err(TrySendError::Closed(event)),
            Err(_) => Err(TrySendError::Full(event)),
        }
    }
}

/// Reads one run from a given `seq`: the kept frames first, then the live ones, each
/// `seq` once and in order.
#[derive(Debug)]
pub struct RunReader {
    replay: VecDeque<Frame>,
    live: mpsc::Receiver<Frame>,
    lagged: Arc<std::sync::atomic::AtomicBool>,
    /// The `seq` handed out last (or asked to resume after).
    last: Option<u64>,
    /// A resync was handed out: nothing follows.
    done: bool,
}

impl RunReader {
    /// The next frame; `Some(Err(Resync::Truncated))` when this reader fell behind the
    /// live stream (or frames it should have had are gone), `None` when the run is
    /// gone (evicted, expired, or its log dropped).
    pub async fn next(&mut self) -> Option<Result<Frame, Resync>> {
        loop {
            if self.done {
                return None;
            }
            let frame = match self.replay.pop_front() {
                Some(f) => f,
                None => match self.live.recv().await {
                    Some(f) => f,
                    None => return self.ended(),
                },
            };
            if let Some(next) = self.take(frame) {
                return Some(next);
            }
        }
    }

    /// The next frame if one is ready now.
    pub fn try_next(&mut self) -> Option<Result<Frame, Resync>> {
        loop {
            if self.done {
                return None;
            }
            let frame = match self.replay.pop_front() {
                Some(f) => f,
                None => match self.live.try_recv() {
                    Ok(f) => f,
                    Err(mpsc::error::TryRecvError::Disconnected) => return self.ended(),
                    Err(mpsc::error::TryRecvError::Empty) => return None,
                },
            };
            if let Some(next) = self.take(frame) {
                return Some(next);
            }
        }
    }

    /// `frame` if it is the next one; nothing if it was handed out already; a resync
    /// if frames before it are missing.
    fn take(&mut self, frame: Frame) -> Option<Result<Frame, Resync>> {
        match self.last {
            Some(last) if frame.seq <= last => None,
            Some(last) if frame.seq > last + 1 => {
                self.done = true;
                Some(Err(Resync::Truncated))
            }
            _ => {
                self.last = Some(frame.seq);
                Some(Ok(frame))
            }
        }
    }

    /// The end of the stream: one resync if this reader fell behind, then nothing.
    fn ended(&mut self) -> Option<Result<Frame, Resync>> {
        self.done = true;
        self.lagged
            .swap(false, Ordering::AcqRel)
            .then_some(Err(Resync::Truncated))
    }
}
