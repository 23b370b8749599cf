//! Run logs on Redis Streams: one stream per (user, run), shared by every node, so a
//! client resumes its run on whichever node its reconnect lands. What it guarantees
//! is documented on [`RunLog::redis`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

mod reader;

use super::keys::Keys;
use super::{Redis, RedisError};
use crate::runlog::{
    AppendError, Frame, Resync, RunLog, RunLogConfig, Store, WeakRunLog, fresh_epoch,
};

/// Frames a node may have waiting for Redis.
const QUEUE: usize = 8192;
/// Frames replayed per request.
const PAGE: usize = 1000;
/// How long an awaited append waits for room in a full queue (Redis answering, but
/// slower than the frames come).
const ROOM_WAIT: Duration = Duration::from_secs(5);
/// Frames written in one round trip.
const BATCH: usize = 128;
/// How long a run stays marked as followed without a refresh.
const SEEN_MS: u64 = 5_000;

/// One frame waiting for Redis.
struct Job {
    user: Arc<str>,
    run: Arc<str>,
    /// The frame's JSON object text; the script puts `"seq"` after its `{`.
    text: String,
    done: Option<oneshot::Sender<Result<u64, AppendError>>>,
}

/// The run log's side of a node's link to Redis, shared by its store and its writer
/// and reader tasks.
struct Streams {
    redis: Redis,
    epoch: AtomicU64,
    /// Redis failed last time it was asked: appends are refused until it answers.
    down: AtomicBool,
    config: RunLogConfig,
    epoch_key: String,
    wake_key: String,
    /// The log whose readers are told when their frames cannot come.
    log: OnceLock<WeakRunLog>,
}

/// The [`Store`] on Redis.
struct RedisLog {
    streams: Arc<Streams>,
    jobs: mpsc::Sender<Job>,
}

impl RunLog {
    /// A run log kept in Redis Streams and shared by every process that opens one on
    /// the same Redis and prefix: a client resumes a run on any of them, with the same
    /// frames, `seq`s and epoch.
    ///
    /// - A frame gets its `seq` in Redis, in the same Lua script that appends it (the
    ///   stream entry's id is `<seq>-0`), so two nodes writing one run never collide.
    ///   A node queues its frames (the sink never waits) and writes them in batches,
    ///   one round trip per batch, in the order they were appended; `append` returns
    ///   once its frame, and every frame queued before it, is recorded.
    /// - `resume` replays the kept frames by range (`XRANGE`) and follows the live
    ///   ones through the node's one blocking reader (`XREAD BLOCK` over every run
    ///   followed on the node, on a connection of its own), woken through a per-node
    ///   stream when a run gains its first follower.
    /// - Each run keeps about `max_events_per_run` entries (`MAXLEN ~`, which trims
    ///   whole stream nodes) and expires `ttl` after its last append; each user keeps
    ///   at most `max_runs_per_user` runs (the least recently written goes first);
    ///   `max_bytes_per_run` bounds one frame. `max_bytes` does not apply: the Redis
    ///   server's `maxmemory` is the process-wide bound.
    /// - The epoch lives in Redis and is shared by every node: `epoch_changed` means
    ///   the stream's data is gone (Redis started afresh), not that a node restarted.
    ///   Followers of a run whose data went are told to resync.
    /// - While Redis cannot be reached, nothing waits on it longer than
    ///   [`RedisConfig::timeout`](crate::redis::RedisConfig::timeout) (`T`), and no reader
    ///   is left waiting in silence:
    ///   - the first batch of frames fails within `T`; the frames queued behind it,
    ///     and every append until Redis answers again, are refused at once
    ///     ([`AppendError::Unavailable`]; to a dispatcher, a closed sink). A call
    ///     whose `tool_executing` cannot be recorded does not run; a call already
    ///     running still gives its caller its result. Each frame not recorded is
    ///     counted in [`RedisStats::log_failures`](crate::redis::RedisStats) and its run's
    ///     readers on the node are told to resync;
    ///   - every reader following a run on the node is told to resync (its `next`
    ///     gives `Err(Resync::Truncated)`) within 0.5 s + `T` of Redis failing,
    ///     whether or not its run is written to; a run followed afresh meanwhile,
    ///     within `T`;
    ///   - `resume` answers [`Resync::Unavailable`] within `T`.
    ///
    ///   A run log does not fall back to the node's memory: a frame no other node
    ///   could see would break every resume after it. The node notices Redis is back
    ///   within a second and records again.
    /// - A resume that fails leaves nothing behind, on the node or in Redis: a run
    ///   is marked as followed in Redis only while its stream exists.
    /// - [`RunLog::is_followed`] also sees followers on other nodes (each node marks
    ///   the runs it follows every second), so a grace period that cancels abandoned
    ///   runs does not cancel one whose client reconnected elsewhere.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// use tool_dispatch::redis::{Redis, RedisConfig};
    /// use tool_dispatch::{RunLog, RunLogConfig};
    /// let redis = Redis::connect("redis://127.0.0.1:6379", RedisConfig::default()).await?;
    /// let log = RunLog::redis(RunLogConfig::default(), &redis).await?;
    /// # let _ = log; Ok(()) }
    /// ```
    pub async fn redis(config: RunLogConfig, redis: &Redis) -> Result<RunLog, RedisError> {
        let keys = &redis.link.keys;
        let streams = Arc::new(Streams {
            redis: redis.clone(),
            epoch: AtomicU64::new(0),
            down: AtomicBool::new(false),
            config,
            epoch_key: keys.epoch(),
            wake_key: keys.wake(&redis.link.node),
            log: OnceLock::new(),
        });
        let epoch = streams
            .shared_epoch()
            .await
            .map_err(RedisError::Unreachable)?;
        streams.epoch.store(epoch, Relaxed);
        let (jobs, queue) = mpsc::channel(QUEUE);
        let store = RedisLog {
            streams: Arc::clone(&streams),
            jobs,
        };
        let log = RunLog::shared(config, Arc::new(store));
        let _ = streams.log.set(log.downgrade());
        tokio::spawn(write(Arc::clone(&streams), queue));
        tokio::spawn(reader::read(streams, log.downgrade()));
        Ok(log)
    }
}

/// A stream entry as Redis sends it: its id and its fields and values.
type Entry = (String, Vec<String>);

/// The frame of a stream entry written by the append script; `None` for anything
/// else.
fn frame((id, fields): Entry) -> Option<Frame> {
    let seq = id.strip_suffix("-0")?.parse().ok()?;
    match fields.as_slice() {
        [f, json] if f == "f" && json.starts_with("{\"seq\":") => Some(Frame {
            seq,
            json: Arc::from(json.as_str()),
        }),
        _ => None,
    }
}

impl Streams {
    fn keys(&self) -> &Keys {
        &self.redis.link.keys
    }

    fn timeout(&self) -> Duration {
        self.redis.link.config.timeout
    }

    /// The cluster's epoch, set by whichever node asks first after Redis starts empty.
    async fn shared_epoch(&self) -> Result<u64, String> {
        let mut conn = self.redis.conn();
        let mut pipe = ::redis::pipe();
        pipe.cmd("SET")
            .arg(&self.epoch_key)
            .arg(fresh_epoch())
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&self.epoch_key);
        let (epoch,) = self
            .redis
            .ask(pipe.query_async::<(u64,)>(&mut conn))
            .await?;
        Ok(epoch)
    }

    /// The answer of a request for a reader, within the timeout; `Unavailable`
    /// otherwise.
    async fn answer<T>(
        &self,
        asked: impl Future<Output = Result<T, ::redis::RedisError>>,
    ) -> Result<T, Resync> {
        self.redis.ask(asked).await.map_err(|e| {
            self.failed(e);
            Resync::Unavailable
        })
    }

    /// Redis could not answer: appends are refused until it does.
    fn failed(&self, error: String) {
        self.down.store(true, Relaxed);
        tracing::warn!(error = %error, "the shared run log cannot reach Redis");
        self.redis.link.counters.failed(error);
    }

    /// Frames of `user`'s `run` were not recorded: its readers here are told.
    fn lost(&self, user: &str, run: &str) {
        if let Some(log) = self.log.get().and_then(WeakRunLog::upgrade) {
            log.lost(user, run);
        }
    }

    /// Redis is away: every reader here is told, rather than left waiting for
    /// frames that cannot come.
    fn cut_off(&self, log: &RunLog) {
        for (user, run, _) in log.followed_runs() {
            log.lost(&user, &run);
        }
    }

    /// Writes a batch in one round trip: the seqs, in order.
    async fn write(&self, batch: &[Job]) -> Result<Vec<u64>, String> {
        let keys = self.keys();
        let ttl_ms = u64::try_from(self.config.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let script = &self.redis.link.scripts.append;
        let mut pipe = ::redis::pipe();
        for job in batch {
            pipe.cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(2)
                .arg(keys.run(&job.user, &job.run))
                .arg(keys.runs(&job.user))
                .arg(&job.text)
                .arg(self.config.max_events_per_run)
                .arg(ttl_ms)
                .arg(self.config.max_runs_per_user)
                .arg(&*job.run)
                .arg(keys.runs_of(&job.user));
        }
        self.redis.ask(self.redis.scripted(script, &pipe)).await
    }

    /// Checks the shared epoch (telling the log when Redis started afresh) and marks
    /// the runs followed here, that exist, as followed; whether Redis answered.
    async fn refresh(&self, log: &RunLog, followed: &[(Arc<str>, Arc<str>, u64)]) -> bool {
        let epoch = match self.shared_epoch().await {
            Ok(e) => e,
            Err(e) => {
                self.failed(e);
                return false;
            }
        };
        self.down.store(false, Relaxed);
        if self.epoch.swap(epoch, Relaxed) != epoch {
            tracing::warn!("the shared run logs are gone (Redis started afresh)");
            log.restarted();
        }
        if followed.is_empty() {
            return true;
        }
        let script = &self.redis.link.scripts.mark;
        let mut pipe = ::redis::pipe();
        for (user, run, _) in followed {
            pipe.cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(2)
                .arg(self.keys().run(user, run))
                .arg(self.keys().seen(user, run))
                .arg(&self.redis.link.node)
                .arg(SEEN_MS)
                .ignore();
        }
        match self
            .redis
            .ask(self.redis.scripted::<()>(script, &pipe))
            .await
        {
            Ok(()) => true,
            Err(e) => {
                self.failed(e);
                false
            }
        }
    }
}

impl RedisLog {
    /// A frame for the queue, refused at once while Redis is known to be away (and
    /// its run's readers here told).
    fn job(
        &self,
        user: &Arc<str>,
        run: &Arc<str>,
        text: String,
        done: Option<oneshot::Sender<Result<u64, AppendError>>>,
    ) -> Result<Job, AppendError> {
        if self.streams.down.load(Relaxed) {
            let counters = &self.streams.redis.link.counters;
            counters.log_failures.fetch_add(1, Relaxed);
            self.streams.lost(user, run);
            return Err(AppendError::Unavailable);
        }
        if !text.starts_with('{') {
            return Err(AppendError::NotAnObject);
        }
        Ok(Job {
            user: Arc::clone(user),
            run: Arc::clone(run),
            text,
            done,
        })
    }
}

impl Store for RedisLog {
    fn epoch(&self) -> u64 {
        self.streams.epoch.load(Relaxed)
    }

    fn append(&self, user: &Arc<str>, run: &Arc<str>, text: String) -> Result<(), AppendError> {
        let job = self.job(user, run, text, None)?;
        // Full is backpressure (the sink's caller may try again), not a lost frame.
        self.jobs.try_send(job).map_err(|_| AppendError::Full)
    }

    fn send<'a>(
        &'a self,
        user: &'a Arc<str>,
        run: &'a Arc<str>,
        text: String,
    ) -> BoxFuture<'a, Result<(), AppendError>> {
        Box::pin(async move {
            let job = self.job(user, run, text, None)?;
            self.jobs
                .send(job)
                .await
                .map_err(|_| AppendError::Unavailable)
        })
    }

    fn record<'a>(
        &'a self,
        user: &'a Arc<str>,
        run: &'a Arc<str>,
        text: String,
    ) -> BoxFuture<'a, Result<u64, AppendError>> {
        Box::pin(async move {
            let (done, seq) = oneshot::channel();
            let job = self.job(user, run, text, Some(done))?;
            // Room in the queue comes as fast as Redis takes batches, and at once
            // when Redis fails (the queue is emptied); bounded anyway.
            match tokio::time::timeout(ROOM_WAIT, self.jobs.send(job)).await {
                Ok(Ok(())) => {}
                _ => return Err(AppendError::Full),
            }
            seq.await.unwrap_or(Err(AppendError::Unavailable))
        })
    }

    fn replay<'a>(
        &'a self,
        user: &'a str,
        run: &'a str,
        after_seq: u64,
        epoch: Option<u64>,
    ) -> BoxFuture<'a, Result<Vec<Frame>, Resync>> {
        Box::pin(async move {
            let streams = &self.streams;
            let key = streams.keys().run(user, run);
            let mut pipe = ::redis::pipe();
            pipe.cmd("SET")
                .arg(&streams.epoch_key)
                .arg(fresh_epoch())
                .arg("NX")
                .ignore()
                .cmd("GET")
                .arg(&streams.epoch_key)
                .cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .cmd("XRANGE")
                .arg(&key)
                .arg(format!("({after_seq}-0"))
                .arg("+")
                .arg("COUNT")
                .arg(PAGE);
            let mut conn = streams.redis.conn();
            let asked = pipe.query_async::<(u64, Vec<Entry>, Vec<Entry>)>(&mut conn);
            let (current, last, kept) = streams.answer(asked).await?;
            if epoch.is_some_and(|e| e != current) {
                return Err(Resync::EpochChanged);
            }
            let Some(last) = last.into_iter().next().and_then(frame) else {
                return Err(Resync::UnknownRun);
            };
            let full = kept.len() == PAGE;
            let mut frames: Vec<Frame> = kept.into_iter().filter_map(frame).collect();
            // Asking from past the last frame, or from before the first kept one:
            // either way the client's copy is not this run's.
            let from_start = frames.first().is_none_or(|f| f.seq == after_seq + 1);
            if after_seq > last.seq || (after_seq < last.seq && !from_start) {
                return Err(Resync::Truncated);
            }
            // The rest page by page, each within the timeout, up to the last frame
            // seen above (later ones come live).
            let mut more = full;
            while more && let Some(seen) = frames.last().map(|f| f.seq) {
                if seen >= last.seq {
                    break;
                }
                let mut cmd = ::redis::cmd("XRANGE");
                cmd.arg(&key)
                    .arg(format!("({seen}-0"))
                    .arg(format!("{}-0", last.seq))
                    .arg("COUNT")
                    .arg(PAGE);
                let page: Vec<Entry> = streams.answer(cmd.query_async(&mut conn)).await?;
                more = page.len() == PAGE;
                frames.extend(page.into_iter().filter_map(frame));
            }
            Ok(frames)
        })
    }

    fn followed<'a>(&'a self, user: &'a str, run: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let streams = &self.streams;
            let mut conn = streams.redis.conn();
            let mut cmd = ::redis::cmd("GET");
            cmd.arg(streams.keys().seen(user, run));
            let asked = cmd.query_async::<Option<String>>(&mut conn);
            // Marked by another node; this node's own mark may be stale, and the log
            // has asked its own readers already.
            match streams.redis.ask(asked).await {
                Ok(Some(node)) => node != streams.redis.link.node,
                _ => false,
            }
        })
    }
}

/// Writes the node's queued frames in order, a batch per round trip, until the log
/// is dropped. When a batch fails, the frames queued behind it are refused with it:
/// they would meet the same Redis, a timeout each.
async fn write(streams: Arc<Streams>, mut queue: mpsc::Receiver<Job>) {
    let counters = &streams.redis.link.counters;
    let mut batch = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let error = match streams.write(&batch).await {
            Ok(seqs) if seqs.len() == batch.len() => {
                streams.down.store(false, Relaxed);
                counters.log_appends.fetch_add(seqs.len() as u64, Relaxed);
                for (job, seq) in batch.drain(..).zip(seqs) {
                    if let Some(done) = job.done {
                        let _ = done.send(Ok(seq));
                    }
                }
                continue;
            }
            Ok(seqs) => format!("{} answers to {} appends", seqs.len(), batch.len()),
            Err(e) => e,
        };
        streams.failed(error);
        while let Ok(job) = queue.try_recv() {
            batch.push(job);
        }
        counters.log_failures.fetch_add(batch.len() as u64, Relaxed);
        for job in batch.drain(..) {
            streams.lost(&job.user, &job.run);
            if let Some(done) = job.done {
                let _ = done.send(Err(AppendError::Unavailable));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runlog::with_seq;

    #[test]
    fn only_entries_written_by_the_script_are_frames() {
        let ok = (
            "7-0".to_owned(),
            vec!["f".into(), r#"{"seq":7,"type":"x"}"#.into()],
        );
        assert_eq!(frame(ok).map(|f| f.seq), Some(7));
        for bad in [
            ("7-1".to_owned(), vec!["f".into(), r#"{"seq":7}"#.into()]),
            ("x-0".to_owned(), vec!["f".into(), r#"{"seq":7}"#.into()]),
            ("7-0".to_owned(), vec!["g".into(), r#"{"seq":7}"#.into()]),
            ("7-0".to_owned(), vec!["f".into(), "[]".into()]),
            ("7-0".to_owned(), vec![]),
        ] {
            assert_eq!(frame(bad), None);
        }
        assert_eq!(&*with_seq(3, "{}"), r#"{"seq":3}"#);
    }
}
