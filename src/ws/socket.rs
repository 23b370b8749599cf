//! One upgraded WebSocket as an ordered, bounded outbound queue with one writer task;
//! the layer the session is built on, and a user's event sink on its own.
//!
//! [`split_socket`] splits an upgraded [`WebSocket`] into
//!
//! - a [`WsSink`]: the user's [`EventSink`], cheap to clone, backed by a **bounded**
//!   queue; it also carries the other frames of the conversation (tool results, error
//!   messages) as [`Outbound::Json`], so everything reaches the client in one ordered
//!   stream;
//! - a [`WsReceiver`]: the incoming half, an ordinary `Stream` of messages;
//! - the writer task's [`JoinHandle`]: the only code that writes to the socket. It
//!   serializes each [`Event`] to one JSON text frame.
//!
//! A socket that is gone is a sink error ([`SinkError::Closed`]), never a silent drop:
//! the pipeline then refuses to run a tool whose `tool_executing` cannot be delivered,
//! and counts every undelivered event. A client that stops reading fills the queue
//! (at most `capacity` frames are held), after which the pipeline's delivery timeout
//! applies; the writer of one socket never waits on another.
//!
//! ```no_run
//! use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
//! use axum::response::Response;
//! use futures_util::StreamExt;
//! use tool_dispatch::ws::socket::split_socket;
//! use tool_dispatch::{Engine, ToolCall, UserContext};
//!
//! async fn ws(upgrade: WebSocketUpgrade, engine: Engine, user: UserContext) -> Response {
//!     upgrade.on_upgrade(move |socket: WebSocket| async move {
//!         let (sink, mut incoming, writer) = split_socket(socket, 64);
//!         let dispatcher = engine.dispatcher().sink(sink.clone()).user(user);
//!         while let Some(Ok(Message::Text(text))) = incoming.next().await {
//!             let call = ToolCall::from_text("echo", text.as_str());
//!             let _ = dispatcher.dispatch(call).await;
//!         }
//!         sink.close(); // the client left: later deliveries fail as `Closed`
//!         drop((dispatcher, sink));
//!         let _ = writer.await;
//!     })
//! }
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::Error as AxumError;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::event::Event;
use futures_util::future::BoxFuture;

use crate::sink::{EventSink, SinkError, TrySendError};

/// The incoming half of a split socket: a `Stream` of
/// `Result<Message, axum::Error>`.
///
/// ```no_run
/// # use futures_util::StreamExt;
/// # async fn f(mut incoming: tool_dispatch::ws::socket::WsReceiver) {
/// while let Some(Ok(msg)) = incoming.next().await {
///     println!("{msg:?}");
/// }
/// # }
/// ```
pub type WsReceiver = SplitStream<WebSocket>;

/// One frame for the writer task, in the order it must reach the client.
///
/// ```
/// use serde_json::json;
/// use tool_dispatch::ws::socket::Outbound;
/// let results = Outbound::Json(json!({"type": "results", "results": []}));
/// let bye = Outbound::Close { code: 1000, reason: "done".into() };
/// # let _ = (results, bye);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outbound {
    /// A pipeline event, sent as its `type`-tagged JSON.
    Event(Event),
    /// Any other JSON message (tool results, an error message), sent as text.
    Json(Value),
    /// JSON text serialized already, sent as is: a run log [`Frame`](crate::Frame)'s
    /// `json`, shared with every other reader of the run rather than copied.
    Text(Arc<str>),
    /// A ping (the client's WebSocket answers with a pong).
    Ping,
    /// A close frame; the writer stops after sending it.
    Close {
        /// The WebSocket close code (1000 normal, 1008 policy, 1009 too big, …).
        code: u16,
        /// A short reason (at most 123 bytes are sent).
        reason: String,
    },
}

/// A user's event sink backed by a WebSocket: a bounded queue drained by the writer
/// task made by [`split_socket`].
///
/// Clones share the queue. Implements [`EventSink`]: `try_send` answers `Full` when
/// the client is behind and `Closed` once the socket is gone (or [`close`] was
/// called), so the pipeline's loud-failure rules apply.
///
/// [`close`]: WsSink::close
///
/// ```no_run
/// # use tool_dispatch::ws::socket::split_socket;
/// # async fn f(socket: axum::extract::ws::WebSocket, engine: tool_dispatch::Engine,
/// #            user: tool_dispatch::UserContext) {
/// let (sink, _incoming, _writer) = split_socket(socket, 64);
/// let dispatcher = engine.dispatcher().sink(sink.clone()).user(user);
/// # let _ = dispatcher;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct WsSink {
    tx: mpsc::Sender<Outbound>,
    closed: CancellationToken,
    /// A close frame that goes out before anything still queued.
    closing: Arc<Closing>,
}

/// A close asked for by [`WsSink::close_with`] or [`WsSink::answer_close`].
#[derive(Debug, Default)]
struct Closing {
    /// `Some(frame)`: send it; `None`: answer the client's close.
    frame: std::sync::Mutex<Option<Option<(u16, String)>>>,
    asked: CancellationToken,
}

/// How the writer task ended; the output of the [`JoinHandle`] from [`split_socket`].
///
/// ```no_run
/// # async fn f(writer: tokio::task::JoinHandle<tool_dispatch::ws::socket::WriterReport>) {
/// if let Ok(report) = writer.await {
///     println!("{} frames written, ended: {:?}", report.frames, report.end);
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriterReport {
    /// Frames written to the socket (events, JSON messages and the close frame).
    pub frames: u64,
    /// Why the writer stopped.
    pub end: WriterEnd,
}

/// Why the writer task stopped.
///
/// ```
/// use tool_dispatch::ws::socket::WriterEnd;
/// assert_ne!(WriterEnd::Finished, WriterEnd::Closed);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriterEnd {
    /// Every sink was dropped, or an [`Outbound::Close`] was sent: a close frame went
    /// out after everything queued before it.
    Finished,
    /// [`WsSink::close`] was called; frames still queued were discarded.
    Closed,
    /// Writing to the socket failed (the client went away).
    Socket(String),
}

/// Splits an upgraded socket into a bounded [`WsSink`], the incoming [`WsReceiver`]
/// and the writer task (already spawned on the current tokio runtime).
///
/// `capacity` (at least 1) bounds the frames waiting for the client; with a client
/// that stops reading, memory stays at `capacity` frames plus the socket's buffers.
/// The writer stops, and the sink reports `Closed`, when writing fails or
/// [`WsSink::close`] is called; it sends a close frame and stops when every
/// `WsSink` clone has been dropped.
///
/// # Panics
///
/// Outside a tokio runtime (it spawns the writer task).
///
/// ```no_run
/// use axum::extract::ws::WebSocketUpgrade;
/// use tool_dispatch::ws::socket::split_socket;
/// async fn ws(upgrade: WebSocketUpgrade) -> axum::response::Response {
///     upgrade
///         .max_message_size(64 * 1024)
///         .on_upgrade(|socket| async move {
///             let (sink, incoming, writer) = split_socket(socket, 64);
///             # let _ = (sink, incoming, writer);
///         })
/// }
/// ```
pub fn split_socket(
    socket: WebSocket,
    capacity: usize,
) -> (WsSink, WsReceiver, JoinHandle<WriterReport>) {
    let (ws_tx, ws_rx) = socket.split();
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let closed = CancellationToken::new();
    let closing = Arc::new(Closing::default());
    let writer = tokio::spawn(write_loop(ws_tx, rx, closed.clone(), Arc::clone(&closing)));
    let sink = WsSink {
        tx,
        closed,
        closing,
    };
    (sink, ws_rx, writer)
}

impl WsSink {
    /// Queues any [`Outbound`] frame without waiting.
    ///
    /// ```no_run
    /// # fn f(sink: &tool_dispatch::ws::socket::WsSink) {
    /// use tool_dispatch::ws::socket::Outbound;
    /// let _ = sink.try_send_outbound(Outbound::Close { code: 1000, reason: "bye".into() });
    /// # }
    /// ```
    pub fn try_send_outbound(&self, out: Outbound) -> Result<(), SinkError> {
        if self.ending() {
            return Err(SinkError::Closed);
        }
        self.tx.try_send(out).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SinkError::Full,
            mpsc::error::TrySendError::Closed(_) => SinkError::Closed,
        })
    }

    /// Queues any [`Outbound`] frame, waiting at most `wait` for room; fails at once
    /// with `Closed` when the socket goes away meanwhile.
    ///
    /// ```no_run
    /// # async fn f(sink: &tool_dispatch::ws::socket::WsSink) {
    /// use std::time::Duration;
    /// use tool_dispatch::ws::socket::Outbound;
    /// let bye = Outbound::Close { code: 1000, reason: "bye".into() };
    /// let _ = sink.send_outbound(bye, Duration::from_secs(1)).await;
    /// # }
    /// ```
    pub async fn send_outbound(&self, out: Outbound, wait: Duration) -> Result<(), SinkError> {
        if self.ending() {
            return Err(SinkError::Closed);
        }
        tokio::select! {
            biased;
            () = self.closed() => Err(SinkError::Closed),
            r = tokio::time::timeout(wait, self.tx.send(out)) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(SinkError::Closed),
                Err(_) => Err(SinkError::TimedOut(wait)),
            },
        }
    }

    /// Marks the socket gone: from now on every delivery fails with `Closed`, and the
    /// writer stops (discarding what is queued). Call it when the incoming half ends,
    /// so calls still in flight learn at once that nobody is listening.
    ///
    /// ```no_run
    /// # fn f(sink: tool_dispatch::ws::socket::WsSink) {
    /// sink.close();
    /// assert!(sink.is_closed());
    /// # }
    /// ```
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Ends the connection with a close frame (`code`, and a `reason` of at most 123
    /// bytes) sent ahead of anything still queued, which is dropped: for a connection
    /// that must end now (the client's own close to answer, a protocol violation).
    /// For a close frame after everything queued, send [`Outbound::Close`] instead.
    ///
    /// ```no_run
    /// # fn f(sink: tool_dispatch::ws::socket::WsSink) {
    /// sink.close_with(1002, "reserved bits set");
    /// # }
    /// ```
    pub fn close_with(&self, code: u16, reason: impl Into<String>) {
        self.ask_close(Some((code, reason.into())));
    }

    /// Ends the connection by answering the close frame the client sent (the
    /// WebSocket layer answers with the client's own code, or 1002 for a code a
    /// client may not send), ahead of anything still queued, which is dropped: after
    /// its close, a client takes no more messages.
    ///
    /// ```no_run
    /// # fn f(sink: tool_dispatch::ws::socket::WsSink) {
    /// sink.answer_close();
    /// # }
    /// ```
    pub fn answer_close(&self) {
        self.ask_close(None);
    }

    fn ask_close(&self, frame: Option<(u16, String)>) {
        let mut asked = self
            .closing
            .frame
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        asked.get_or_insert(frame);
        drop(asked);
        self.closing.asked.cancel();
    }

    /// Whether the socket is gone (writing failed, the writer stopped, or
    /// [`close`](Self::close) was called).
    ///
    /// ```no_run
    /// # fn f(sink: tool_dispatch::ws::socket::WsSink) {
    /// if sink.is_closed() { /* stop producing */ }
    /// # }
    /// ```
    pub fn is_closed(&self) -> bool {
        self.ending() || self.tx.is_closed()
    }

    /// [`close`](Self::close) or [`close_with`](Self::close_with) was called.
    fn ending(&self) -> bool {
        self.closed.is_cancelled() || self.closing.asked.is_cancelled()
    }

    /// Completes when the socket is gone.
    ///
    /// ```no_run
    /// # async fn f(sink: tool_dispatch::ws::socket::WsSink) {
    /// sink.closed().await;
    /// # }
    /// ```
    pub async fn closed(&self) {
        tokio::select! {
            _ = self.closed.cancelled() => {}
            _ = self.closing.asked.cancelled() => {}
        }
    }

    /// Frames that can be queued right now before the queue is full.
    ///
    /// ```no_run
    /// # fn f(sink: tool_dispatch::ws::socket::WsSink) {
    /// println!("room for {} frames", sink.room());
    /// # }
    /// ```
    pub fn room(&self) -> usize {
        self.tx.capacity()
    }
}

impl EventSink for WsSink {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        if self.ending() {
            return Err(TrySendError::Closed(event));
        }
        self.tx
            .try_send(Outbound::Event(event))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(Outbound::Event(e)) => TrySendError::Full(e),
                mpsc::error::TrySendError::Closed(Outbound::Event(e)) => TrySendError::Closed(e),
                // Only events were put in.
                _ => unreachable!("an event was sent"),
            })
    }

    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            if self.ending() {
                return Err(SinkError::Closed);
            }
            tokio::select! {
                biased;
                () = self.closed() => Err(SinkError::Closed),
                r = self.tx.send(Outbound::Event(event)) => r.map_err(|_| SinkError::Closed),
            }
        })
    }
}

/// Serializes one frame; a close request comes back as `Err((code, reason))`.
fn encode(out: Outbound) -> Result<Message, (u16, String)> {
    let text = match out {
        Outbound::Event(e) => serde_json::to_string(&e),
        Outbound::Json(v) => serde_json::to_string(&v),
        Outbound::Text(t) => Ok(String::from(&*t)),
        Outbound::Ping => return Ok(Message::Ping(Default::default())),
        Outbound::Close { code, reason } => return Err((code, reason)),
    };
    match text {
        Ok(t) => Ok(Message::Text(Utf8Bytes::from(t))),
        Err(e) => {
            // Serializing a `Value` or an `Event` cannot fail; keep the stream going.
            tracing::warn!(error = %e, "a WebSocket frame could not be serialized");
            Ok(Message::Text(Utf8Bytes::from_static(
                r#"{"type":"error","error":"a message could not be serialized"}"#,
            )))
        }
    }
}

fn close_frame(code: u16, reason: String) -> Message {
    let mut reason = reason;
    if reason.len() > 123 {
        let mut cut = 123;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    }))
}

/// Frames written between two flushes, at most.
const BATCH: usize = 64;

/// Writes `first` and whatever else is already queued (up to [`BATCH`] frames), then
/// flushes. `Ok(true)` when a close frame went out and the writer must stop.
async fn write_batch(
    ws: &mut SplitSink<WebSocket, Message>,
    rx: &mut mpsc::Receiver<Outbound>,
    first: Option<Outbound>,
    frames: &mut u64,
) -> Result<bool, AxumError> {
    let mut item = first;
    for written in 1.. {
        match item.map(encode) {
            None => {
                ws.send(Message::Close(None)).await?;
                *frames += 1;
                return Ok(true);
            }
            Some(Err((code, reason))) => {
                ws.send(close_frame(code, reason)).await?;
                *frames += 1;
                return Ok(true);
            }
            Some(Ok(msg)) => {
                ws.feed(msg).await?;
                *frames += 1;
            }
        }
        // Take the next frame only if it is written in this batch: a frame taken
        // from the queue and not written would be lost without a word.
        if written == BATCH {
            break;
        }
        match rx.try_recv() {
            Ok(more) => item = Some(more),
            Err(_) => break,
        }
    }
    ws.flush().await?;
    Ok(false)
}

/// Sends the close frame [`WsSink::close_with`] asked for, or the WebSocket layer's
/// answer to the client's close ([`WsSink::answer_close`]): closing the sink flushes
/// the answer the layer queued when it read the client's close.
async fn close_now(
    ws: &mut SplitSink<WebSocket, Message>,
    closing: &Closing,
    frames: &mut u64,
) -> WriterEnd {
    let asked = closing
        .frame
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
        .flatten();
    let sent = match asked {
        Some((code, reason)) => ws.send(close_frame(code, reason)).await,
        None => ws.close().await,
    };
    match sent {
        Ok(()) => {
            *frames += 1;
            WriterEnd::Finished
        }
        Err(e) => WriterEnd::Socket(e.to_string()),
    }
}

async fn write_loop(
    mut ws: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    closed: CancellationToken,
    closing: Arc<Closing>,
) -> WriterReport {
    let mut frames = 0u64;
    let end = loop {
        let next = tokio::select! {
            biased;
            _ = closed.cancelled() => break WriterEnd::Closed,
            _ = closing.asked.cancelled() => break close_now(&mut ws, &closing, &mut frames).await,
            next = rx.recv() => next,
        };
        let written = tokio::select! {
            biased;
            _ = closed.cancelled() => break WriterEnd::Closed,
            _ = closing.asked.cancelled() => break close_now(&mut ws, &closing, &mut frames).await,
            r = write_batch(&mut ws, &mut rx, next, &mut frames) => r,
        };
        match written {
            Ok(false) => {}
            Ok(true) => break WriterEnd::Finished,
            Err(e) => break WriterEnd::Socket(e.to_string()),
        }
    };
    // From here on every delivery fails as `Closed`.
    closed.cancel();
    closing.asked.cancel();
    rx.close();
    WriterReport { frames, end }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{AgentEvent, Timestamp};

    fn event() -> Event {
        Event::AgentThinking(AgentEvent {
            run_id: None,
            thread_id: None,
            user_id: "alice".into(),
            message: Some("hm".into()),
            result: None,
            timestamp: Timestamp::now(),
        })
    }

    fn sink(capacity: usize) -> (WsSink, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(capacity);
        let sink = WsSink {
            tx,
            closed: CancellationToken::new(),
            closing: Arc::default(),
        };
        (sink, rx)
    }

    #[tokio::test]
    async fn full_then_closed_are_reported_not_dropped() {
        let (s, mut rx) = sink(1);
        s.try_send(event()).unwrap();
        assert!(matches!(s.try_send(event()), Err(TrySendError::Full(_))));
        assert_eq!(
            s.try_send_outbound(Outbound::Json(Value::Null)),
            Err(SinkError::Full)
        );
        let wait = Duration::from_millis(1);
        assert_eq!(
            s.send_outbound(Outbound::Json(Value::Null), wait).await,
            Err(SinkError::TimedOut(wait))
        );
        assert!(matches!(rx.recv().await, Some(Outbound::Event(_))));
        s.close();
        assert!(s.is_closed());
        assert!(matches!(s.try_send(event()), Err(TrySendError::Closed(_))));
        assert_eq!(s.send(event()).await, Err(SinkError::Closed));
        assert_eq!(
            s.try_send_outbound(Outbound::Json(Value::Null)),
            Err(SinkError::Closed)
        );
    }

    #[tokio::test]
    async fn a_waiting_send_fails_as_soon_as_the_socket_closes() {
        let (s, _rx) = sink(1);
        s.try_send(event()).unwrap();
        let waiting = s.send(event());
        let closer = s.clone();
        let (r, ()) = tokio::join!(waiting, async move { closer.close() });
        assert_eq!(r, Err(SinkError::Closed));
    }

    #[test]
    fn close_reasons_are_cut_on_a_char_boundary() {
        let Message::Close(Some(f)) = close_frame(1009, "é".repeat(100)) else {
            panic!("not a close frame")
        };
        assert!(f.reason.as_str().len() <= 123);
        assert_eq!(f.code, 1009);
    }
}
