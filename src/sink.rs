//! Where a user's events go: the [`EventSink`] trait, its implementation for a bounded
//! tokio channel (the WebSocket writer-task pattern) and a [`RecordingSink`] for tests.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use crate::event::Event;

/// The receiving end of one user's event stream.
///
/// Object safe; the dispatcher stores it as `Arc<dyn EventSink>`. Implementations must
/// be bounded: [`try_send`](EventSink::try_send) answers at once (`Full` when the
/// consumer is behind), and [`send`](EventSink::send) may wait for room. The pipeline
/// tries `try_send` first; when the sink is full, the event joins the dispatcher's
/// bounded, ordered backlog, whose one task calls `send` within the engine's delivery
/// timeout.
///
/// What the library promises a sink: `send` need not be cancel-safe (a started `send`
/// runs to its end or to the delivery timeout, and an event is never sent twice); a
/// panic in `try_send` or `send` never unwinds through the library: it is counted as
/// a failed delivery, and that dispatcher does not call the sink again.
///
/// ```
/// use tool_dispatch::{EventSink};
/// use tool_dispatch::event::{Event};
/// let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(64);
/// fn takes_sink(_: impl EventSink) {}
/// takes_sink(tx); // a bounded Sender<Event> is a sink
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an event sink",
    label = "this does not implement `EventSink`",
    note = "pass a `tokio::sync::mpsc::Sender<tool_dispatch::event::Event>` (drained by the WebSocket writer task) or implement `tool_dispatch::EventSink`; a sink must be `Send + Sync + 'static`"
)]
pub trait EventSink: Send + Sync + 'static {
    /// Delivers `event` without waiting, or hands it back.
    // The event comes back by value so the caller can wait and retry without an
    // allocation on the hot path.
    #[allow(clippy::result_large_err)]
    fn try_send(&self, event: Event) -> Result<(), TrySendError>;

    /// Delivers `event`, waiting for room if the queue is full. The default waits for
    /// nothing: it is `try_send`.
    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SinkError>> {
        let r = self.try_send(event).map_err(SinkError::from);
        Box::pin(std::future::ready(r))
    }
}

/// Why [`EventSink::try_send`] did not deliver; the event comes back.
#[derive(Debug)]
pub enum TrySendError {
    /// The consumer is behind and the queue is full.
    Full(Event),
    /// The consumer is gone (the socket closed).
    Closed(Event),
}

/// Why an event could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The consumer is gone (the socket closed).
    #[error("the event stream is closed")]
    Closed,
    /// The queue was full and stayed full for the delivery timeout.
    #[error("the event stream stayed full for {0:?}")]
    TimedOut(Duration),
    /// The queue was full and the event could not wait.
    #[error("the event stream is full")]
    Full,
    /// A custom sink failed.
    #[error("the event stream failed: {0}")]
    Failed(String),
    /// The sink panicked; it is treated as closed from then on.
    #[error("the event stream failed unexpectedly")]
    Panicked,
}

impl From<TrySendError> for SinkError {
    fn from(e: TrySendError) -> Self {
        match e {
            TrySendError::Full(_) => SinkError::Full,
            TrySendError::Closed(_) => SinkError::Closed,
        }
    }
}

impl EventSink for mpsc::Sender<Event> {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        mpsc::Sender::try_send(self, event).map_err(|e| match e {
            mpsc::error::TrySendError::Full(e) => TrySendError::Full(e),
            mpsc::error::TrySendError::Closed(e) => TrySendError::Closed(e),
        })
    }

    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            mpsc::Sender::send(self, event)
                .await
                .map_err(|_| SinkError::Closed)
        })
    }
}

impl<T: EventSink + ?Sized> EventSink for Arc<T> {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        (**self).try_send(event)
    }

    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SinkError>> {
        (**self).send(event)
    }
}

/// A sink that keeps events in memory, for tests and probes.
///
/// Bounded (default 100,000 events; past that it answers `Full`), cloneable (clones
/// share the same buffer) and closable, so a test can make delivery fail on purpose.
///
/// ```
/// use tool_dispatch::RecordingSink;
/// let sink = RecordingSink::new();
/// sink.close();
/// assert!(sink.is_closed() && sink.events().is_empty());
/// ```
#[derive(Debug, Clone)]
pub struct RecordingSink {
    inner: Arc<Mutex<Recording>>,
}

#[derive(Debug)]
struct Recording {
    events: Vec<Event>,
    capacity: usize,
    closed: bool,
}

impl Default for RecordingSink {
    fn default() -> Self {
        Self::with_capacity(100_000)
    }
}

impl RecordingSink {
    /// A sink that holds up to 100,000 events.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sink that holds up to `capacity` events.
    pub fn with_capacity(capacity: usize) -> Self {
        RecordingSink {
            inner: Arc::new(Mutex::new(Recording {
                events: Vec::new(),
                capacity,
                closed: false,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recording> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of every event received so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// Removes and returns every event received so far.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut self.lock().events)
    }

    /// How many events are held.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// Whether no event is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// From now on every delivery fails with `Closed`, as when a socket goes away.
    pub fn close(&self) {
        self.lock().closed = true;
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

impl EventSink for RecordingSink {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        let mut r = self.lock();
        if r.closed {
            Err(TrySendError::Closed(event))
        } else if r.events.len() >= r.capacity {
            Err(TrySendError::Full(event))
        } else {
            r.events.push(event);
            Ok(())
        }
    }
}
