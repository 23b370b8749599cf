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
//!
//! The parts: a [`Store`] keeps the frames and gives each its `seq` (this process's
//! own, [`store::LocalStore`], or a shared one on Redis); the [`fanout`] hands the
//! frames of the runs followed here to their readers; [`RunWriter`] appends. This
//! facade ties them together and never asks which store it has.
//!
//! [`EventSink`]: crate::EventSink

mod fanout;
mod store;
mod writer;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

pub use fanout::RunReader;
pub(crate) use store::Store;
pub use writer::RunWriter;

use fanout::{Fanout, RunKey};
use store::LocalStore;

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
            .field("stats", &self.stats())
            .finish()
    }
}

/// What every handle of one log shares.
struct Shared {
    config: RunLogConfig,
    /// Keeps the frames and gives them their `seq`.
    store: Arc<dyn Store>,
    /// The runs followed here and their readers.
    fanout: Arc<Fanout>,
    /// Writers made, to sweep now and then.
    created: AtomicUsize,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A random epoch below 2^53, so a browser keeps it exactly as a JSON number.
pub(crate) fn fresh_epoch() -> u64 {
    std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), std::time::SystemTime::now())
        >> 11
}

/// `{"seq":N,` followed by the JSON object text after its `{`.
pub(crate) fn with_seq(seq: u64, text: &str) -> Arc<str> {
    let rest = text.strip_prefix('{').unwrap_or(text);
    let sep = if rest.starts_with('}') { "" } else { "," };
    Arc::from(format!("{{\"seq\":{seq}{sep}{rest}"))
}

fn key(user_id: &str, run_id: &str) -> RunKey {
    (Arc::from(user_id), Arc::from(run_id))
}

impl RunLog {
    /// An empty log with a fresh epoch.
    pub fn new(config: RunLogConfig) -> RunLog {
        let fanout = Arc::new(Fanout::new(config));
        let store = Arc::new(LocalStore::new(config, Arc::clone(&fanout)));
        RunLog::with(config, store, fanout)
    }

    fn with(config: RunLogConfig, store: Arc<dyn Store>, fanout: Arc<Fanout>) -> RunLog {
        RunLog {
            shared: Arc::new(Shared {
                config,
                store,
                fanout,
                created: AtomicUsize::new(0),
            }),
        }
    }

    /// This log's epoch: clients keep it with their `seq`, and a different one means
    /// the log's contents are gone. Below 2^53, so it survives a JavaScript number.
    /// Processes sharing a log share its epoch.
    pub fn epoch(&self) -> u64 {
        self.shared.store.epoch()
    }

    /// The writer of `user_id`'s run `run_id`, creating the run if it is new (which
    /// may evict the user's least recently written run past the per-user bound).
    pub fn writer(&self, user_id: &str, run_id: &str) -> RunWriter {
        let s = &self.shared;
        if s.created.fetch_add(1, Ordering::Relaxed) % 64 == 63 {
            self.sweep();
        }
        let key = key(user_id, run_id);
        let store = s.store.open(&key.0, &key.1);
        let store = store.unwrap_or_else(|| Arc::clone(&s.store));
        RunWriter::new(Arc::clone(s), store, key)
    }

    /// A reader of `user_id`'s run `run_id` from `after_seq` on: the kept frames with
    /// a higher `seq`, then the live ones. `epoch` is the one the client was given
    /// (`None` when it has none yet).
    ///
    /// A resume that fails keeps nothing: the run's readers here are as they were.
    pub async fn resume(
        &self,
        user_id: &str,
        run_id: &str,
        after_seq: u64,
        epoch: Option<u64>,
    ) -> Result<RunReader, Resync> {
        let s = &self.shared;
        // Follow first, then replay: whatever is appended meanwhile comes through the
        // live side, and the reader drops what it has had already.
        let following = s.fanout.follow(key(user_id, run_id), Some(after_seq));
        let replay = s.store.replay(user_id, run_id, after_seq, epoch).await?;
        Ok(following.replay(replay))
    }

    /// Whether some connection, in this process or (with a shared log) another,
    /// follows the run.
    pub async fn is_followed(&self, user_id: &str, run_id: &str) -> bool {
        self.shared.fanout.is_followed(&key(user_id, run_id))
            || self.shared.store.followed(user_id, run_id).await
    }

    /// How many runs and bytes are kept.
    pub fn stats(&self) -> RunLogStats {
        let s = &self.shared;
        s.store.kept().unwrap_or_else(|| RunLogStats {
            runs: s.fanout.len(),
            bytes: 0,
        })
    }

    /// Forgets the runs past their time to live; returns how many are kept.
    pub fn sweep(&self) -> usize {
        self.shared.store.sweep();
        self.shared.fanout.sweep();
        self.stats().runs
    }
}

/// What a shared [`Store`] uses of the log (only the `redis` feature has one).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl RunLog {
    /// A log whose frames live in `store`, shared with other processes.
    pub(crate) fn shared(config: RunLogConfig, store: Arc<dyn Store>) -> RunLog {
        RunLog::with(config, store, Arc::new(Fanout::new(config)))
    }

    /// A handle that does not keep the log alive, for a store's own tasks.
    pub(crate) fn downgrade(&self) -> WeakRunLog {
        WeakRunLog(Arc::downgrade(&self.shared))
    }

    /// The runs followed here, each with the `seq` read last: what a shared store
    /// reads on for this process.
    pub(crate) fn followed_runs(&self) -> Vec<(Arc<str>, Arc<str>, u64)> {
        self.shared.fanout.followed_runs()
    }

    /// Waits until a run gains its first reader here.
    pub(crate) async fn newly_followed(&self) {
        self.shared.fanout.newly_followed().await
    }

    /// Frames a shared store read for a run followed here, in `seq` order.
    pub(crate) fn deliver(&self, user_id: &str, run_id: &str, frames: Vec<Frame>) {
        self.shared.fanout.deliver(&key(user_id, run_id), frames)
    }

    /// Frames of the run were lost on their way to the store: its readers here are
    /// told to resync.
    pub(crate) fn lost(&self, user_id: &str, run_id: &str) {
        self.shared.fanout.cut_off(&key(user_id, run_id))
    }

    /// The shared store started afresh: every reader here is told to resync.
    pub(crate) fn restarted(&self) {
        self.shared.fanout.restarted()
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::BoxFuture;

    /// A shared store that keeps nothing: every replay fails as told (`Some`), or
    /// never answers (`None`).
    struct Refusing(Option<Resync>);

    impl Store for Refusing {
        fn epoch(&self) -> u64 {
            7
        }
        fn append(&self, _: &Arc<str>, _: &Arc<str>, _: String) -> Result<(), AppendError> {
            Ok(())
        }
        fn record<'a>(
            &'a self,
            _: &'a Arc<str>,
            _: &'a Arc<str>,
            _: String,
        ) -> BoxFuture<'a, Result<u64, AppendError>> {
            Box::pin(std::future::ready(Ok(1)))
        }
        fn replay<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: u64,
            _: Option<u64>,
        ) -> BoxFuture<'a, Result<Vec<Frame>, Resync>> {
            match self.0 {
                Some(resync) => Box::pin(std::future::ready(Err(resync))),
                None => Box::pin(std::future::pending()),
            }
        }
        fn followed<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, bool> {
            Box::pin(std::future::ready(false))
        }
    }

    fn frame(seq: u64) -> Frame {
        Frame {
            seq,
            json: with_seq(seq, r#"{"type":"note"}"#),
        }
    }

    #[tokio::test]
    async fn a_failed_resume_keeps_nothing_in_either_store() {
        let shared = RunLog::shared(
            RunLogConfig::default(),
            Arc::new(Refusing(Some(Resync::UnknownRun))),
        );
        let local = RunLog::new(RunLogConfig::default());
        for log in [shared, local] {
            for i in 0..1_000 {
                let run = format!("{i:0>60000}");
                let answer = log.resume("alice", &run, 5, None).await;
                assert!(answer.is_err());
            }
            assert_eq!(log.stats().runs, 0, "{log:?}");
            assert_eq!(log.shared.fanout.len(), 0, "nothing of the ids stays");
        }
    }

    #[tokio::test]
    async fn a_failed_resume_past_the_end_moves_nothing_the_next_reader_needs() {
        let log = RunLog::shared(
            RunLogConfig::default(),
            Arc::new(Refusing(Some(Resync::Truncated))),
        );
        // Nobody followed the run here yet; a resume past its end fails.
        assert_eq!(
            log.resume("alice", "run_1", 1_000_000, None).await.err(),
            Some(Resync::Truncated)
        );
        // The connection then works in the run: its frames from 1 must reach it.
        let mut reader = log.writer("alice", "run_1").subscribe();
        assert_eq!(log.followed_runs()[0].2, 0, "read from the start");
        log.deliver("alice", "run_1", vec![frame(1), frame(2)]);
        assert_eq!(reader.try_next().map(|r| r.map(|f| f.seq)), Some(Ok(1)));
        assert_eq!(reader.try_next().map(|r| r.map(|f| f.seq)), Some(Ok(2)));

        // A run that was followed before and left: a failed resume leaves its
        // position where it was.
        drop(reader);
        assert!(log.resume("alice", "run_1", 99, None).await.is_err());
        let mut reader = log.writer("alice", "run_1").subscribe();
        log.deliver("alice", "run_1", vec![frame(3)]);
        assert_eq!(reader.try_next().map(|r| r.map(|f| f.seq)), Some(Ok(3)));
    }

    #[tokio::test]
    async fn a_resume_dropped_while_it_waits_keeps_nothing() {
        let log = RunLog::shared(RunLogConfig::default(), Arc::new(Refusing(None)));
        let resume = log.resume("alice", "run_1", 3, None);
        let mut resume = Box::pin(resume);
        assert!(futures_util::poll!(&mut resume).is_pending());
        assert_eq!(log.followed_runs().len(), 1, "followed while it waits");
        drop(resume);
        assert_eq!(log.stats().runs, 0);
    }

    #[tokio::test]
    async fn a_run_opened_while_a_resume_of_it_fails_keeps_its_readers_fed() {
        let log = RunLog::new(RunLogConfig::default());
        // The resume has begun to follow a run the store does not have yet...
        let following = log.shared.fanout.follow(key("alice", "r"), Some(5));
        // ...a turn opens it meanwhile, then the resume fails.
        let writer = log.writer("alice", "r");
        drop(following);
        let mut reader = writer.subscribe();
        writer
            .append(serde_json::json!({"type": "note"}))
            .await
            .unwrap();
        assert_eq!(reader.try_next().map(|r| r.map(|f| f.seq)), Some(Ok(1)));
    }

    #[tokio::test]
    async fn a_writer_of_an_evicted_run_is_refused_not_merged_into_a_new_one() {
        let log = RunLog::new(RunLogConfig::default().max_runs_per_user(1));
        let old = log.writer("alice", "r1");
        old.append(serde_json::json!({"type": "note"}))
            .await
            .unwrap();
        let _new = log.writer("alice", "r2"); // evicts r1
        assert_eq!(
            old.append(serde_json::json!({"type": "note"})).await,
            Err(AppendError::Gone)
        );
        // A run begun again under the old name starts afresh; the old writer stays out.
        let again = log.writer("alice", "r1");
        assert_eq!(
            again.append(serde_json::json!({"type": "note"})).await,
            Ok(1)
        );
        assert_eq!(
            old.append(serde_json::json!({"type": "note"})).await,
            Err(AppendError::Gone)
        );
    }
}
