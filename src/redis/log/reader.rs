//! The node's one blocking reader of the run logs: every run followed on the node,
//! read from Redis through one `XREAD BLOCK` on a connection of its own, handed to
//! the log's readers; and what it does when Redis cannot answer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use super::{Entry, Streams, frame};
use crate::runlog::WeakRunLog;

/// How long the reader blocks on the followed runs at a time.
const BLOCK: Duration = Duration::from_millis(500);
/// How often the node checks the shared epoch and marks the runs it follows; the
/// longest it waits to try again while Redis is away.
const REFRESH: Duration = Duration::from_secs(1);
/// The first wait before trying again once Redis failed.
const RETRY: Duration = Duration::from_millis(50);

impl Streams {
    /// A connection of the reader's own: a blocking read would hold up everyone
    /// else's commands on the shared one.
    async fn blocking_connection(&self) -> Result<MultiplexedConnection, String> {
        let config = ::redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout()))
            .set_response_timeout(None);
        let client = &self.redis.link.client;
        let connect = client.get_multiplexed_async_connection_with_config(&config);
        match tokio::time::timeout(self.timeout(), connect).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no connection within {:?}", self.timeout())),
        }
    }

    /// Ends the reader's current block early, so that it reads a run just followed.
    async fn wake(&self) {
        let mut conn = self.redis.conn();
        let mut pipe = ::redis::pipe();
        pipe.cmd("XADD")
            .arg(&self.wake_key)
            .arg("MAXLEN")
            .arg(1)
            .arg("*")
            .arg("w")
            .arg(1)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&self.wake_key)
            .arg(60_000)
            .ignore();
        let _ = self.redis.ask(pipe.query_async::<()>(&mut conn)).await;
    }
}

/// The node's one blocking reader: follows every run followed here from the `seq`
/// read last, hands the frames to the log, and refreshes the epoch and the runs'
/// marks, until the log is dropped. When Redis cannot answer it, every reader here
/// is told, and it tries again (at once for a run followed afresh, else after a wait
/// that doubles up to [`REFRESH`]).
pub(super) async fn read(streams: Arc<Streams>, weak: WeakRunLog) {
    let stop = streams.redis.link.stop.clone();
    let mut conn: Option<MultiplexedConnection> = None;
    let mut connected = false;
    let mut refreshed: Option<Instant> = None;
    // The runs marked as followed at the last refresh: a run followed since is marked
    // at once, so a node whose client left it learns quickly that it reconnected here.
    let mut marked: HashSet<(Arc<str>, Arc<str>)> = HashSet::new();
    let mut retry = RETRY;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let Some(log) = weak.upgrade() else { return };
        let followed = log.followed_runs();
        let unmarked = followed
            .iter()
            .any(|(u, r, _)| !marked.contains(&(Arc::clone(u), Arc::clone(r))));
        let due = refreshed.is_none_or(|t| t.elapsed() >= REFRESH);
        let mut away = false;
        if streams.down.load(Relaxed) || unmarked || due {
            away = !streams.refresh(&log, &followed).await;
            refreshed = Some(Instant::now());
            marked = followed
                .iter()
                .map(|(u, r, _)| (Arc::clone(u), Arc::clone(r)))
                .collect();
        }
        if !away && !followed.is_empty() && conn.is_none() {
            match streams.blocking_connection().await {
                Ok(c) => {
                    if std::mem::replace(&mut connected, true) {
                        streams.redis.link.counters.reconnected();
                    }
                    conn = Some(c);
                }
                Err(e) => {
                    streams.failed(e);
                    away = true;
                }
            }
        }
        if away {
            streams.cut_off(&log);
            conn = None;
            let wait = retry;
            retry = (retry * 2).min(REFRESH);
            tokio::select! {
                () = stop.cancelled() => return,
                () = log.newly_followed() => {}
                () = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        retry = RETRY;
        let Some(mut c) = conn.clone() else {
            // Nothing followed here.
            tokio::select! {
                () = stop.cancelled() => return,
                () = log.newly_followed() => {}
                () = tokio::time::sleep(REFRESH) => {}
            }
            continue;
        };
        let mut keys: HashMap<String, (Arc<str>, Arc<str>)> = HashMap::new();
        let mut cmd = ::redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64);
        cmd.arg("STREAMS");
        for (user, run, _) in &followed {
            let key = streams.keys().run(user, run);
            cmd.arg(&key);
            keys.insert(key, (Arc::clone(user), Arc::clone(run)));
        }
        cmd.arg(&streams.wake_key);
        for (_, _, last) in &followed {
            cmd.arg(format!("{last}-0"));
        }
        cmd.arg("$");
        type Reply = Option<Vec<(String, Vec<Entry>)>>;
        let limit = BLOCK + streams.timeout();
        let reading = streams
            .redis
            .ask_within(limit, cmd.query_async::<Reply>(&mut c));
        tokio::pin!(reading);
        let reply = loop {
            tokio::select! {
                biased;
                r = &mut reading => break r,
                () = log.newly_followed() => streams.wake().await,
                () = stop.cancelled() => return,
            }
        };
        match reply {
            Ok(read) => {
                for (key, entries) in read.unwrap_or_default() {
                    if let Some((user, run)) = keys.get(&key) {
                        log.deliver(user, run, entries.into_iter().filter_map(frame).collect());
                    }
                }
            }
            Err(e) => {
                // Its followers would wait in silence: told now.
                streams.failed(e);
                streams.cut_off(&log);
                conn = None;
            }
        }
    }
}
