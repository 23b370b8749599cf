//! Helpers shared by the integration tests: gates that hold tool bodies, readers of
//! the events a call streams (`cancel`, `shutdown`, `limits`, `blocking`, `cache`),
//! and the seeded generator of the randomised runs (`accounting`, `soak`).
//!
//! Included with `mod common;`; each test crate uses a subset, hence the
//! `dead_code` allowance.
#![allow(dead_code)]

#[cfg(feature = "mcp")]
pub mod mcp;
pub mod redis_server;
#[cfg(feature = "axum")]
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tool_dispatch::IntoTool;
use tool_dispatch::event::Event;
use tool_dispatch::event::ToolCompleted;
use tool_dispatch::*;
use tool_dispatch::{BoxFuture, TrySendError};

/// A spawned dispatch.
pub type Handle = JoinHandle<Result<ToolOutput, DispatchError>>;

/// A user context with only an id.
pub fn user(id: &str) -> UserContext {
    UserContext::builder(id).build().expect("valid user id")
}

/// A dispatcher for `ctx` on `engine`, and the sink recording its events.
pub fn recorded(engine: &Engine, ctx: UserContext) -> (Dispatcher, RecordingSink) {
    let sink = RecordingSink::new();
    (engine.dispatcher().sink(sink.clone()).user(ctx), sink)
}

/// Runs `d.dispatch(call)` on its own task.
pub fn spawn(d: &Dispatcher, call: ToolCall) -> Handle {
    let d = d.clone();
    tokio::spawn(async move { d.dispatch(call).await })
}

/// Lets every spawned task run until it waits on something.
pub async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// The one `tool_completed` of `call_id`, after checking the pair is complete and in
/// order.
pub fn completed(sink: &RecordingSink, call_id: &str) -> ToolCompleted {
    let evs: Vec<Event> = sink
        .events()
        .into_iter()
        .filter(|e| e.call_id() == Some(call_id))
        .collect();
    assert_eq!(evs.len(), 2, "{call_id}: {evs:?}");
    assert_eq!(evs[0].kind(), "tool_executing");
    match &evs[1] {
        Event::ToolCompleted(c) => c.clone(),
        other => panic!("{call_id}: expected tool_completed, got {other:?}"),
    }
}

/// The body of a `hold` tool: reports `tag` on `started`, then waits for a permit of
/// `gate` (ignoring cancellation on purpose), and returns `tag`.
pub async fn report_then_wait(
    started: mpsc::UnboundedSender<String>,
    gate: Arc<Semaphore>,
    tag: String,
) -> Result<String, ToolError> {
    let _ = started.send(tag.clone());
    gate.acquire().await.map_err(ToolError::from)?.forget();
    Ok(tag)
}

/// `hold`: takes a tag, reports it on `started` when its body starts, then waits for
/// a permit of `gate`; with `settings`.
pub fn hold(
    gate: &Arc<Semaphore>,
    started: mpsc::UnboundedSender<String>,
    settings: ToolSettings,
) -> impl IntoTool {
    let gate = Arc::clone(gate);
    tool_fn("hold", "Waits for the test.", move |tag: String, _cx| {
        report_then_wait(started.clone(), Arc::clone(&gate), tag)
    })
    .settings(settings)
}

/// `quick`: returns its number at once.
pub fn quick() -> impl IntoTool {
    tool_fn("quick", "Returns at once.", |n: u64, _cx| async move {
        Ok::<_, ToolError>(n)
    })
}

/// An engine with `hold` and [`quick`], `per_user` concurrent calls a user, no rate
/// limit, and a minute's wait for a slot.
pub fn hold_engine(hold: impl IntoTool, per_user: usize) -> Engine {
    let reg = Registry::builder()
        .tool(hold)
        .tool(quick())
        .build()
        .unwrap();
    let limits = Limits::default()
        .per_user(no_rate(per_user))
        .max_wait(Duration::from_secs(60));
    Engine::builder(reg).limits(limits).build()
}

/// Per-user limits of `concurrency` calls and no rate limit.
pub fn no_rate(concurrency: usize) -> UserLimits {
    UserLimits {
        concurrency,
        rate: None,
    }
}

/// xorshift64*: a small seeded generator, so a failing randomised run can be replayed.
pub struct Rng(pub u64);

impl Rng {
    /// The next pseudo-random number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

// ------------------------------------------------------------------ hostile code

/// Runs the test `name` of this test binary in a child process and checks that it
/// passed, so a stack overflow or an abort fails that test instead of killing the run.
/// Returns `true` in the child, where the caller runs the test's body.
pub fn in_child(name: &str) -> bool {
    if std::env::var("TOOL_DISPATCH_CHILD").as_deref() == Ok(name) {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads", "1"])
        .env("TOOL_DISPATCH_CHILD", name)
        .output()
        .expect("start the child test process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} failed in its child process ({}):\n{stdout}\n{stderr}",
        out.status
    );
    false
}

/// A sink whose `try_send` and `send` panic, counting how often they were called.
#[derive(Clone, Default)]
pub struct PanickingSink {
    pub calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl EventSink for PanickingSink {
    fn try_send(&self, _: Event) -> Result<(), TrySendError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        panic!("sink try_send exploded");
    }

    fn send(&self, _: Event) -> BoxFuture<'_, Result<(), SinkError>> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        panic!("sink send exploded");
    }
}

/// A sink that is always full and whose `send` never completes (a socket nobody reads).
#[derive(Clone, Default)]
pub struct StuckSink;

impl EventSink for StuckSink {
    fn try_send(&self, e: Event) -> Result<(), TrySendError> {
        Err(TrySendError::Full(e))
    }

    fn send(&self, _: Event) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(std::future::pending())
    }
}

/// A sink whose `send` is not cancel-safe, like `SinkExt::send` on a split WebSocket:
/// it puts the frame on the wire, then awaits a flush that `flush` permits one at a
/// time. `try_send` always answers `Full`, so every event goes through `send`.
#[derive(Clone)]
pub struct FlushingSink {
    pub wire: Arc<std::sync::Mutex<Vec<Event>>>,
    pub flush: Arc<Semaphore>,
}

impl FlushingSink {
    pub fn new() -> Self {
        FlushingSink {
            wire: Arc::default(),
            flush: Arc::new(Semaphore::new(0)),
        }
    }

    pub fn wire(&self) -> Vec<Event> {
        self.wire.lock().unwrap().clone()
    }
}

impl EventSink for FlushingSink {
    fn try_send(&self, e: Event) -> Result<(), TrySendError> {
        Err(TrySendError::Full(e))
    }

    fn send(&self, e: Event) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            self.wire.lock().unwrap().push(e); // on the wire before the await
            self.flush
                .acquire()
                .await
                .map_err(|_| SinkError::Closed)?
                .forget();
            Ok(())
        })
    }
}

/// Events of `call_id` in `events`, by kind, in order.
pub fn kinds_of(events: &[Event], call_id: &str) -> Vec<&'static str> {
    events
        .iter()
        .filter(|e| e.call_id() == Some(call_id))
        .map(Event::kind)
        .collect()
}

/// Checks every call in `events` has exactly `[tool_executing, (tool_approval_required,
/// tool_approval_resolved?), (progress…), tool_completed]`.
pub fn assert_paired(events: &[Event]) {
    let mut ids: Vec<&str> = events.iter().filter_map(Event::call_id).collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let mut k = kinds_of(events, id);
        if k.get(1) == Some(&"tool_approval_required") {
            k.remove(1);
            if k.get(1) == Some(&"tool_approval_resolved") {
                k.remove(1);
            }
        }
        assert!(
            k.len() >= 2
                && k[0] == "tool_executing"
                && k[k.len() - 1] == "tool_completed"
                && k[1..k.len() - 1].iter().all(|x| *x == "tool_progress"),
            "{id}: {k:?}"
        );
    }
}

/// Polls `f` once, from the calling task, and says whether it finished.
pub async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx))).await
}

// ------------------------------------------------------------------ shared fixtures

/// A user context with a thread (`t_1`) and a run (`run_<id>`).
pub fn user_in_run(id: &str) -> UserContext {
    UserContext::builder(id)
        .thread_id("t_1")
        .run_id(format!("run_{id}"))
        .build()
        .expect("valid user")
}

/// A dispatcher on `engine` for [`user_in_run`]`(id)`, streaming to `sink`.
pub fn dispatcher(engine: &Engine, sink: impl EventSink, id: &str) -> Dispatcher {
    engine.dispatcher().sink(sink).user(user_in_run(id))
}

/// An engine with default settings over `registry`.
pub fn plain_engine(registry: Registry) -> Engine {
    Engine::builder(registry).build()
}

/// Asserts `events` is exactly one `tool_executing` then one `tool_completed` with
/// the same call id, and returns the completion.
#[track_caller]
pub fn pair(events: &[Event]) -> ToolCompleted {
    assert_eq!(events.len(), 2, "expected one pair: {events:?}");
    let (Event::ToolExecuting(ex), Event::ToolCompleted(done)) = (&events[0], &events[1]) else {
        panic!("expected tool_executing then tool_completed: {events:?}");
    };
    assert_eq!(ex.call_id, done.call_id);
    assert_eq!(ex.tool_name, done.tool_name);
    done.clone()
}

/// Sets a flag when dropped: proves a tool body's future was dropped.
pub struct DropFlag(pub Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `echo`: returns its input, whatever it is.
pub fn echo() -> impl IntoTool {
    tool_fn(
        "echo",
        "Returns its input.",
        |v: serde_json::Value, _cx| async move { Ok::<_, ToolError>(v) },
    )
}

/// A tool named `name` that counts how many times its body ran.
pub fn counting(
    name: &str,
    runs: &Arc<std::sync::atomic::AtomicUsize>,
    settings: ToolSettings,
) -> impl IntoTool {
    let runs = Arc::clone(runs);
    tool_fn(
        name,
        "Counts its runs.",
        move |v: serde_json::Value, _cx| {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok::<_, ToolError>(v) }
        },
    )
    .settings(settings)
}

/// Every event of a channel until it closes, in order.
pub async fn drain(mut rx: mpsc::Receiver<Event>) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    events
}
