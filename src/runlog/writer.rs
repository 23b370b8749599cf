//! [`RunWriter`]: appends to one run, and is that run's [`EventSink`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::future::BoxFuture;
use serde_json::Value;

use super::fanout::RunKey;
use super::{AppendError, RunReader, Shared, Store};
use crate::event::Event;
use crate::sink::{EventSink, SinkError, TrySendError};

/// Appends to one run; the run's [`EventSink`]. Appends never wait for readers.
#[derive(Clone)]
pub struct RunWriter {
    shared: Arc<Shared>,
    /// The log's store, or the part of it bound to this run.
    store: Arc<dyn Store>,
    key: RunKey,
    /// The highest `seq` [`append`](Self::append) was given back.
    appended: Arc<AtomicU64>,
}

impl std::fmt::Debug for RunWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunWriter").finish_non_exhaustive()
    }
}

impl RunWriter {
    pub(super) fn new(shared: Arc<Shared>, store: Arc<dyn Store>, key: RunKey) -> RunWriter {
        RunWriter {
            shared,
            store,
            key,
            appended: Arc::default(),
        }
    }

    /// Appends a frame of the server's own (a `tool_results` message, say); it gets
    /// the run's next `seq`, which is returned once the log has recorded it (at once
    /// in a process's own log; after a round trip in a shared one).
    pub async fn append(&self, frame: Value) -> Result<u64, AppendError> {
        if !frame.is_object() {
            return Err(AppendError::NotAnObject);
        }
        let text = self.fits(frame.to_string())?;
        let (user, run) = &self.key;
        let seq = self.store.record(user, run, text).await?;
        self.appended.fetch_max(seq, Ordering::Relaxed);
        Ok(seq)
    }

    /// `text` if it can fit in a run at all.
    fn fits(&self, text: String) -> Result<String, AppendError> {
        if text.len() > self.shared.config.max_bytes_per_run {
            return Err(AppendError::Full);
        }
        Ok(text)
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
        self.shared.fanout.follow(self.key.clone(), None).live()
    }

    /// The `seq` of the last frame appended (0 before the first); with a shared log,
    /// the highest this process has read or had returned by [`append`](Self::append).
    pub fn last_seq(&self) -> u64 {
        let s = &self.shared;
        self.store.last_seq(&self.key).unwrap_or_else(|| {
            let read = s.fanout.read_up_to(&self.key).unwrap_or(0);
            read.max(self.appended.load(Ordering::Relaxed))
        })
    }
}

impl EventSink for RunWriter {
    /// With a shared log, waits for room in the node's queue (the delivery timeout
    /// bounds the wait); a process's own log never waits.
    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let text = serde_json::to_string(&event).map_err(|_| SinkError::Closed)?;
            let text = self.fits(text).map_err(|_| SinkError::Full)?;
            let (user, run) = &self.key;
            match self.store.send(user, run, text).await {
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
        let (user, run) = &self.key;
        let appended = self
            .fits(text)
            .and_then(|text| self.store.append(user, run, text));
        match appended {
            Ok(()) => Ok(()),
            Err(AppendError::Gone | AppendError::Unavailable) => Err(TrySendError::Closed(event)),
            Err(_) => Err(TrySendError::Full(event)),
        }
    }
}
