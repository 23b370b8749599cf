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
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::event::Event;
use crate::sink::{EventSink, TrySendError};

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
    max_events_per_run: usize,
    max_bytes_per_run: usize,
    max_runs_per_user: usize,
    max_bytes: usize,
    ttl: Duration,
    reader_buffer: usize,
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
    /// The log was restarted since the client's `seq` was issued.
    #[error("the run log was restarted")]
    EpochChanged,
}

impl Resync {
    /// The wire name (`truncated`, `unknown_run`, `epoch_changed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Resync::Truncated => "truncated",
            Resync::UnknownRun => "unknown_run",
            Resync::EpochChanged => "epoch_changed",
        }
    }
}

/// How much a [`RunLog`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunLogStats {
    /// Runs kept.
    pub runs: usize,
    /// Bytes of serialized events kept.
    pub bytes: usize,
}

/// The run logs of one process. Cheap to clone (one `Arc`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tool_dispatch::{RunLog, RunLogConfig};
/// let log = RunLog::new(RunLogConfig::default());
/// let writer = log.writer("alice", "run_1");
/// writer.append(serde_json::json!({"type": "tool_results", "results": []})).unwrap();
/// let mut reader = log.resume("alice", "run_1", 0, Some(log.epoch())).unwrap();
/// let frame = reader.next().await.unwrap().unwrap();
/// assert_eq!((frame.seq, &*frame.json), (1, r#"{"seq":1,"results":[],"type":"tool_results"}"#));
/// assert!(log.resume("bob", "run_1", 0, None).is_err()); // not bob's run
/// # }
/// ```
#[derive(Clone)]
pub struct RunLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RunLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunLog")
            .field("epoch", &self.shared.epoch)
            .field("stats", &self.stats())
            .finish()
    }
}

type RunKey = (Arc<str>, Arc<str>);

struct Shared {
    config: RunLogConfig,
    epoch: u64,
    runs: Mutex<HashMap<RunKey, Arc<Run>>>,
    bytes: AtomicUsize,
    created: AtomicUsize,
}

struct Run {
    state: Mutex<RunState>,
}

struct RunState {
    frames: VecDeque<Frame>,
    /// The seq the next frame gets.
    next_seq: u64,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RunLog {
    /// An empty log with a fresh epoch.
    pub fn new(config: RunLogConfig) -> RunLog {
        // Below 2^53, so a browser keeps it exactly as a JSON number.
        let epoch = std::hash::BuildHasher::hash_one(
            &std::hash::RandomState::new(),
            std::time::SystemTime::now(),
        ) >> 11;
        RunLog {
            shared: Arc::new(Shared {
                config,
                epoch,
                runs: Mutex::default(),
                bytes: AtomicUsize::new(0),
                created: AtomicUsize::new(0),
            }),
        }
    }

    /// This log's epoch: clients keep it with their `seq`, and a different one means
    /// the log's contents are gone. Below 2^53, so it survives a JavaScript number.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
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
            };
        }
        // Past the per-user bound, the user's least recently written run goes.
        let mine: Vec<(RunKey, Instant)> = runs
            .iter()
            .filter(|((u, _), _)| **u == *user_id)
            .map(|(k, r)| (k.clone(), lock(&r.state).last_write))
            .collect();
        if mine.len() >= s.config.max_runs_per_user
            && let Some((oldest, _)) = mine.iter().min_by_key(|(_, t)| *t)
            && let Some(run) = runs.remove(oldest)
        {
            s.forget(&run);
        }
        let run = Arc::new(Run {
            state: Mutex::new(RunState {
                frames: VecDeque::new(),
                next_seq: 1,
                bytes: 0,
                last_write: Instant::now(),
                readers: Vec::new(),
                gone: false,
            }),
        });
        runs.insert(key, Arc::clone(&run));
        RunWriter {
            shared: Arc::clone(s),
            run,
        }
    }

    /// A reader of `user_id`'s run `run_id` from `after_seq` on: the kept frames with
    /// a higher `seq`, then the live ones. `epoch` is the one the client was given
    /// (`None` when it has none yet).
    pub fn resume(
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
        let (tx, rx) = mpsc::channel(s.config.reader_buffer);
        let lagged = Arc::new(std::sync::atomic::AtomicBool::new(false));
        st.readers.push(Reader {
            tx,
            lagged: Arc::clone(&lagged),
        });
        Ok(RunReader {
            replay,
            live: rx,
            lagged,
        })
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

impl Shared {
    fn expired(&self, run: &Run, now: Instant) -> bool {
        let st = lock(&run.state);
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
}

impl RunWriter {
    /// Appends a frame of the server's own (a `tool_results` message, say); it gets
    /// the run's next `seq`, which is returned.
    pub fn append(&self, frame: Value) -> Result<u64, AppendError> {
        if !frame.is_object() {
            return Err(AppendError::NotAnObject);
        }
        let text = frame.to_string();
        self.append_text(&text)
    }

    /// Appends JSON object text, putting `"seq"` first.
    fn append_text(&self, text: &str) -> Result<u64, AppendError> {
        let s = &self.shared;
        let mut st = lock(&self.run.state);
        if st.gone {
            return Err(AppendError::Gone);
        }
        let seq = st.next_seq;
        let rest = text.strip_prefix('{').unwrap_or(text);
        let sep = if rest.starts_with('}') { "" } else { "," };
        let json: Arc<str> = Arc::from(format!("{{\"seq\":{seq}{sep}{rest}"));
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
        // Live readers get it without waiting; one that is behind is cut off and will
        // be told to resync once it has read what it has.
        st.readers.retain(|r| match r.tx.try_send(frame.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                r.lagged.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        st.frames.push_back(frame);
        Ok(seq)
    }

    /// A reader of this run's frames appended from now on (none of the kept ones):
    /// for a connection that starts following a run it is about to write to.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use serde_json::json;
    /// use tool_dispatch::{RunLog, RunLogConfig};
    /// let log = RunLog::new(RunLogConfig::default());
    /// let writer = log.writer("alice", "run_1");
    /// writer.append(json!({"type": "note"})).unwrap();
    /// let mut reader = writer.subscribe();
    /// writer.append(json!({"type": "note"})).unwrap();
    /// assert_eq!(reader.next().await.unwrap().unwrap().seq, 2);
    /// # }
    /// ```
    pub fn subscribe(&self) -> RunReader {
        let mut st = lock(&self.run.state);
        let (tx, rx) = mpsc::channel(self.shared.config.reader_buffer);
        let lagged = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if !st.gone {
            st.readers.push(Reader {
                tx,
                lagged: Arc::clone(&lagged),
            });
        }
        RunReader {
            replay: VecDeque::new(),
            live: rx,
            lagged,
        }
    }

    /// The `seq` of the last frame appended (0 before the first).
    pub fn last_seq(&self) -> u64 {
        lock(&self.run.state).next_seq - 1
    }
}

impl EventSink for RunWriter {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        let text = match serde_json::to_string(&event) {
            Ok(t) => t,
            Err(_) => return Err(TrySendError::Closed(event)),
        };
        match self.append_text(&text) {
            Ok(_) => Ok(()),
            Err(AppendError::Gone) => Err(TrySendError::Closed(event)),
            Err(_) => Err(TrySendError::Full(event)),
        }
    }
}

/// Reads one run from a given `seq`: the kept frames first, then the live ones.
#[derive(Debug)]
pub struct RunReader {
    replay: VecDeque<Frame>,
    live: mpsc::Receiver<Frame>,
    lagged: Arc<std::sync::atomic::AtomicBool>,
}

impl RunReader {
    /// The next frame; `Some(Err(Resync::Truncated))` when this reader fell behind the
    /// live stream, `None` when the run is gone (evicted, expired, or its log dropped).
    pub async fn next(&mut self) -> Option<Result<Frame, Resync>> {
        if let Some(f) = self.replay.pop_front() {
            return Some(Ok(f));
        }
        match self.live.recv().await {
            Some(f) => Some(Ok(f)),
            None => self.ended(),
        }
    }

    /// The end of the stream: one resync if this reader fell behind, then nothing.
    fn ended(&mut self) -> Option<Result<Frame, Resync>> {
        self.lagged
            .swap(false, Ordering::AcqRel)
            .then_some(Err(Resync::Truncated))
    }

    /// The next frame if one is ready now.
    pub fn try_next(&mut self) -> Option<Result<Frame, Resync>> {
        if let Some(f) = self.replay.pop_front() {
            return Some(Ok(f));
        }
        match self.live.try_recv() {
            Ok(f) => Some(Ok(f)),
            Err(mpsc::error::TryRecvError::Disconnected) => self.ended(),
            Err(mpsc::error::TryRecvError::Empty) => None,
        }
    }
}
