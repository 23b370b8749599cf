//! One connection: reads the client's messages until the socket ends; follows the
//! runs its turns work in and the runs it resumes, each through a forwarding task;
//! answers resume, cancel and approval decisions; ends with the close handshake.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::protocol::{
    ApprovalDecision, Decision, DecisionRecorded, ErrorFrame, FrameError, Incoming,
    PROTOCOL_VERSION, Ready, Request, Resume, Resumed, ResyncReason, ResyncRequired, RunCancelled,
    ServerFrame, TurnFormat, excerpt, parse, unknown,
};
use super::session::{Command, Session};
use super::socket::{Outbound, WsSink, split_socket};
use super::stats::inc;
use super::{WsEvent, WsServer, turn, unique};
use crate::approval::Verdict;
use crate::call::ToolCall;
use crate::runlog::RunReader;
use crate::sink::SinkError;
use crate::user::UserContext;

/// One connection: one user, the runs it follows, one socket.
struct Connection {
    server: WsServer,
    user: UserContext,
    sink: WsSink,
    /// The run named in `ready`.
    default_run: String,
    /// The runs this connection follows, each with its forwarding task.
    follows: HashMap<String, JoinHandle<()>>,
    permits: Arc<Semaphore>,
    /// Set when the server gave up on a client that stopped reading.
    let_go: Arc<AtomicBool>,
    commands: mpsc::Sender<Command>,
}

/// How the reading loop ended.
enum End {
    /// The client sent a close frame (its code, when it sent one).
    ClientClosed(Option<u16>),
    /// The socket is gone: reset, ended without a close frame, or let go.
    Gone,
    /// The client broke the protocol: the close frame to send (with an `error` frame
    /// first when `tell` is set).
    Refused {
        code: u16,
        reason: String,
        tell: bool,
    },
    /// Nothing came in for the idle timeout.
    Idle(Duration),
}

/// Serves one socket as `user` until it ends.
pub(super) async fn serve(server: WsServer, user: UserContext, socket: WebSocket) {
    let config = Arc::clone(&server.config);
    let counters = &server.shared.counters;
    inc(&counters.sessions);
    let _open = Open::count(&server);
    let user_id = user.user_id().to_owned();
    let (sink, mut incoming, writer) = split_socket(socket, config.send_queue);
    let (commands, mut command_rx) = mpsc::channel(8);
    let mut conn = Connection {
        server: server.clone(),
        user,
        sink: sink.clone(),
        default_run: format!("run_{}", unique()),
        follows: HashMap::new(),
        permits: Arc::new(Semaphore::new(config.max_messages_in_flight)),
        let_go: Arc::default(),
        commands,
    };
    // The default run enters the log with its first message: a reconnecting client
    // that only resumes an older run adds nothing that could crowd it out.
    conn.ready().await;
    for run_id in &config.follow_on_connect {
        let reader = server.runs.writer(&user_id, run_id).subscribe();
        conn.follow(run_id, reader);
    }
    server.event(WsEvent::Connected {
        user_id: user_id.clone(),
        run_id: conn.default_run.clone(),
    });

    let mut ping = config.ping_interval.map(|every| {
        let mut t = tokio::time::interval_at(Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let idle = config.idle_timeout;
    let mut heard = Instant::now();
    let end = loop {
        let silent_until = idle.map(|d| heard + d);
        let msg = tokio::select! {
            msg = incoming.next() => msg,
            () = sink.closed() => break End::Gone,
            Some(cmd) = command_rx.recv() => {
                conn.command(cmd).await;
                continue;
            }
            _ = tick(&mut ping) => {
                let _ = sink.try_send_outbound(Outbound::Ping);
                continue;
            }
            () = sleep_until(silent_until) => break End::Idle(idle.unwrap_or_default()),
        };
        heard = Instant::now();
        match msg {
            None => break End::Gone,
            Some(Ok(Message::Close(frame))) => break End::ClientClosed(frame.map(|f| f.code)),
            Some(Ok(Message::Text(text))) => {
                inc(&counters.messages_in);
                conn.on_text(text.as_str()).await;
            }
            Some(Ok(Message::Binary(_))) => {
                inc(&counters.messages_in);
                conn.error("binary messages are not accepted; send JSON text")
                    .await;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {} // answered by the layer below
            Some(Err(e)) => break refusal(&e, config.max_message_bytes),
        }
    };
    let runs = conn.leave().await;
    let ended = match end {
        End::ClientClosed(code) => {
            // Answered with the client's own code (or 1002 for one it may not send):
            // the WebSocket layer queued that answer, and closing sends it.
            sink.answer_close();
            format!("closed by the client ({})", code.unwrap_or(1005))
        }
        End::Gone if conn.let_go.load(Ordering::Relaxed) => {
            inc(&counters.let_go_not_reading);
            sink.close();
            "let go: it stopped reading".to_owned()
        }
        End::Gone => {
            sink.close();
            "gone".to_owned()
        }
        End::Refused { code, reason, tell } => {
            inc(&counters.closed_protocol);
            if tell {
                // After what is queued: the error, then the close frame.
                conn.error(reason.clone()).await;
                let close = Outbound::Close {
                    code,
                    reason: reason.clone(),
                };
                if sink
                    .send_outbound(close, config.result_timeout)
                    .await
                    .is_err()
                {
                    sink.close();
                }
            } else {
                sink.close_with(code, reason.clone());
            }
            format!("closed with {code}: {reason}")
        }
        End::Idle(after) => {
            inc(&counters.closed_idle);
            let reason = format!("nothing received for {} s", after.as_secs());
            sink.close_with(1001, reason.clone());
            format!("closed with 1001: {reason}")
        }
    };
    // The writer ends after the close frame (or at once when closed); a client that
    // does not read cannot hold it longer than the result timeout.
    if tokio::time::timeout(config.result_timeout, writer)
        .await
        .is_err()
    {
        sink.close();
    }
    drop((conn, sink));
    server.event(WsEvent::Disconnected {
        user_id,
        runs,
        end: ended,
    });
}

/// A connection being served, counted in `sessions_open` until it ends (or its task
/// is dropped).
struct Open(WsServer);

impl Open {
    fn count(server: &WsServer) -> Open {
        inc(&server.shared.counters.sessions_open);
        Open(server.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let open = &self.0.shared.counters.sessions_open;
        open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The close frame for a message that cannot be read.
fn refusal(e: &axum::Error, max: usize) -> End {
    let text = e.to_string();
    let refused = |code: u16, reason: String, tell: bool| End::Refused { code, reason, tell };
    // The WebSocket layer (tungstenite) says what went wrong only in its message.
    if text.contains("Space limit exceeded") || text.contains("too long") {
        refused(
            1009,
            format!("message refused: larger than {max} bytes"),
            true,
        )
    } else if text.contains("UTF-8") || text.contains("utf-8") {
        refused(1007, "invalid UTF-8 in a text message".into(), false)
    } else if let Some(why) = text.strip_prefix("WebSocket protocol error: ") {
        refused(1002, format!("protocol error: {why}"), false)
    } else {
        End::Gone // a reset, an I/O error: the client is gone
    }
}

/// The next ping, or never.
async fn tick(ping: &mut Option<tokio::time::Interval>) {
    match ping {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// `deadline`, or never.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Connection {
    fn user_id(&self) -> &str {
        self.user.user_id()
    }

    /// Queues a frame for this connection, waiting at most the result timeout; a
    /// client that leaves no room for that long is let go.
    async fn send(&self, out: Outbound) {
        let wait = self.server.config.result_timeout;
        if let Err(SinkError::TimedOut(_)) = self.sink.send_outbound(out, wait).await {
            self.let_go.store(true, Ordering::Relaxed);
            self.sink.close();
        }
    }

    async fn reply(&self, frame: ServerFrame) {
        match serde_json::to_string(&frame) {
            Ok(text) => self.send(Outbound::Text(Arc::from(text))).await,
            Err(e) => tracing::warn!(error = %e, "a session frame could not be serialized"),
        }
    }

    async fn error(&self, text: impl Into<String>) {
        inc(&self.server.shared.counters.error_frames);
        let error = text.into();
        self.reply(ServerFrame::Error(ErrorFrame { error })).await;
    }

    async fn ready(&self) {
        let s = &self.server;
        let ready = Ready {
            user_id: self.user_id().to_owned(),
            run_id: self.default_run.clone(),
            epoch: s.runs.epoch(),
            tools: s.engine.registry().names().map(str::to_owned).collect(),
            node: s.config.node.clone(),
            protocol_version: PROTOCOL_VERSION,
        };
        self.reply(ServerFrame::Ready(ready)).await;
    }

    /// Follows `run_id` through `reader`, replacing an earlier reader of the same run
    /// (which must have stopped already: see [`stop_forwarding`](Self::stop_forwarding)).
    fn follow(&mut self, run_id: &str, reader: RunReader) {
        let task = tokio::spawn(forward(
            self.server.clone(),
            self.sink.clone(),
            Arc::clone(&self.let_go),
            run_id.to_owned(),
            reader,
        ));
        match self.follows.insert(run_id.to_owned(), task) {
            Some(old) => old.abort(),
            None => self.server.attach(self.user.user_id(), run_id),
        }
    }

    /// Stops the run's forwarding task and waits until it has: nothing of its reader
    /// reaches the socket after this.
    async fn stop_forwarding(&mut self, run_id: &str) {
        if let Some(task) = self.follows.get_mut(run_id) {
            task.abort();
            let _ = task.await;
        }
    }

    /// Whether one more run can be followed.
    fn room_for(&self, run_id: &str) -> Result<(), String> {
        let max = self.server.config.max_runs_per_connection;
        if self.follows.contains_key(run_id) || self.follows.len() < max {
            Ok(())
        } else {
            Err(format!(
                "this connection follows {max} runs already; open another connection"
            ))
        }
    }

    async fn on_text(&mut self, text: &str) {
        let max_calls = self.server.config.max_calls_per_message;
        let incoming = match parse(text, max_calls) {
            Ok(i) => i,
            Err(e) => return self.malformed(e).await,
        };
        match incoming {
            Incoming::Turn {
                format,
                calls,
                run_id,
            } => {
                let run_id = run_id.unwrap_or_else(|| self.default_run.clone());
                if let Err(e) = self.start(format, calls, &run_id) {
                    self.error(e).await;
                }
            }
            Incoming::Request(Request::Resume(r)) => self.resume(r).await,
            Incoming::Request(Request::ToolApprovalDecision(d)) => self.decide(d).await,
            Incoming::Request(Request::Cancel(c)) => {
                let report = self.server.engine.cancel_run(self.user_id(), &c.run_id);
                let frame = RunCancelled {
                    run_id: c.run_id,
                    calls: report.here,
                    other_nodes_told: report.peers_told,
                };
                self.reply(ServerFrame::RunCancelled(frame)).await;
            }
            Incoming::Other(v) => self.other(v).await,
        }
    }

    async fn malformed(&self, e: FrameError) {
        self.error(format!("malformed message: {e}")).await;
    }

    /// A message the session does not know: the app's hook takes it, or it gets an
    /// error.
    async fn other(&mut self, v: Value) {
        let Some(hook) = self.server.config.hook.clone() else {
            return self.malformed(unknown(&v)).await;
        };
        let Ok(permit) = self.permit() else {
            return self.error(self.busy()).await;
        };
        let session = Session {
            server: self.server.clone(),
            user: self.user.clone(),
            run_id: self.default_run.clone(),
            sink: self.sink.clone(),
            commands: self.commands.clone(),
            wait: self.server.config.result_timeout,
        };
        let sink = self.sink.clone();
        let server = self.server.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = hook(session, v).await {
                inc(&server.shared.counters.error_frames);
                let frame = ServerFrame::Error(ErrorFrame {
                    error: crate::json::cut(&error, 1024),
                });
                if let Ok(text) = serde_json::to_string(&frame) {
                    let wait = server.config.result_timeout;
                    let _ = sink.send_outbound(Outbound::Text(text.into()), wait).await;
                }
            }
        });
    }

    fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ()> {
        Arc::clone(&self.permits)
            .try_acquire_owned()
            .map_err(|_| ())
    }

    fn busy(&self) -> String {
        format!(
            "{} messages are in progress on this connection; wait for a `tool_results` frame",
            self.server.config.max_messages_in_flight
        )
    }

    /// Starts a turn's calls in `run_id`, following the run if this connection does
    /// not already.
    fn start(
        &mut self,
        format: TurnFormat,
        calls: Vec<ToolCall>,
        run_id: &str,
    ) -> Result<(), String> {
        let user = self
            .user
            .with_run_id(run_id)
            .map_err(|e| format!("bad run_id: {e}"))?;
        self.room_for(run_id)?;
        let permit = self.permit().map_err(|()| self.busy())?;
        let writer = self.server.runs.writer(self.user_id(), run_id);
        // Follow before the first event can be written, so none is missed.
        if !self.follows.contains_key(run_id) {
            self.follow(run_id, writer.subscribe());
        }
        self.server.worked(self.user.user_id(), run_id);
        let server = self.server.clone();
        tokio::spawn(turn::run(server, user, writer, format, calls, permit));
        Ok(())
    }

    async fn resume(&mut self, r: Resume) {
        if let Err(e) = self.room_for(&r.run_id) {
            return self.error(e).await;
        }
        let s = self.server.clone();
        let answer = s
            .runs
            .resume(self.user_id(), &r.run_id, r.after_seq, r.epoch)
            .await;
        match answer {
            Err(reason) => {
                let reason = ResyncReason::from(reason);
                s.shared.counters.resync(reason);
                let frame = ResyncRequired {
                    run_id: r.run_id,
                    reason,
                };
                self.reply(ServerFrame::ResyncRequired(frame)).await;
            }
            Ok(reader) => {
                inc(&s.shared.counters.resumes);
                // Stop the run's old reader first, so nothing of it follows `resumed`.
                self.stop_forwarding(&r.run_id).await;
                let frame = Resumed {
                    run_id: r.run_id.clone(),
                    after_seq: r.after_seq,
                };
                self.reply(ServerFrame::Resumed(frame)).await;
                self.follow(&r.run_id, reader);
            }
        }
    }

    async fn decide(&self, d: ApprovalDecision) {
        let verdict = match d.decision {
            Decision::Approve => Verdict::Approve,
            Decision::Reject => Verdict::Reject { message: d.message },
        };
        let answer = self
            .server
            .engine
            .resolve_approval(self.user_id(), &d.call_id, verdict)
            .await;
        match answer {
            Ok(()) => {
                let frame = DecisionRecorded {
                    call_id: d.call_id,
                    decision: d.decision,
                };
                self.reply(ServerFrame::DecisionRecorded(frame)).await;
            }
            // The same answer for an unknown, a decided and another user's call.
            Err(e) => {
                let call = excerpt(&Value::String(d.call_id));
                self.error(format!("{e}: `{call}`")).await;
            }
        }
    }

    /// What a [`Session`] asked for.
    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Follow { run_id, done } => {
                let answer = self.follow_run(&run_id);
                let _ = done.send(answer);
            }
        }
    }

    /// Follows the user's run `run_id` from now on (for the app's hook).
    fn follow_run(&mut self, run_id: &str) -> Result<(), String> {
        self.user
            .with_run_id(run_id)
            .map_err(|e| format!("bad run_id: {e}"))?;
        if self.follows.contains_key(run_id) {
            return Ok(());
        }
        self.room_for(run_id)?;
        let reader = self.server.runs.writer(self.user_id(), run_id).subscribe();
        self.follow(run_id, reader);
        Ok(())
    }

    /// The socket is gone: stop forwarding; each run followed starts its grace period.
    async fn leave(&mut self) -> Vec<String> {
        let mut runs = Vec::new();
        for (run_id, task) in self.follows.drain() {
            task.abort();
            let _ = task.await;
            self.server.detach(self.user.user_id(), &run_id);
            runs.push(run_id);
        }
        runs.sort();
        runs
    }
}

/// Sends a run's frames to the socket as they come; stops when the run is gone, the
/// reader fell behind (the client is told to resync), or the socket is.
async fn forward(
    server: WsServer,
    sink: WsSink,
    let_go: Arc<AtomicBool>,
    run_id: String,
    mut reader: RunReader,
) {
    let wait = server.config.result_timeout;
    let reason = loop {
        let frame = match reader.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(resync)) => break resync,
            None => break crate::runlog::Resync::UnknownRun,
        };
        match sink.send_outbound(Outbound::Text(frame.json), wait).await {
            Ok(()) => {}
            // The client stopped reading: let it go. It can reconnect and resume;
            // the run goes on meanwhile.
            Err(SinkError::TimedOut(_)) => {
                let_go.store(true, Ordering::Relaxed);
                return sink.close();
            }
            Err(_) => return,
        }
    };
    let reason = ResyncReason::from(reason);
    server.shared.counters.resync(reason);
    let frame = ServerFrame::ResyncRequired(ResyncRequired { run_id, reason });
    let Ok(text) = serde_json::to_string(&frame) else {
        return;
    };
    if let Err(SinkError::TimedOut(_)) = sink.send_outbound(Outbound::Text(text.into()), wait).await
    {
        let_go.store(true, Ordering::Relaxed);
        sink.close();
    }
}
