//! Helpers shared by the integration tests: gates that hold tool bodies, readers of
//! the events a call streams (`cancel`, `shutdown`, `limits`, `blocking`, `cache`),
//! and the seeded generator of the randomised runs (`accounting`, `soak`).
//!
//! Included with `mod common;`; each test crate uses a subset, hence the
//! `dead_code` allowance.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tool_dispatch::event::ToolCompleted;
use tool_dispatch::registry::IntoTool;
use tool_dispatch::*;

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
