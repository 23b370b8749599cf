//! The shared baseline of the overhead measurements: a no-op tool, limits that are
//! checked but never bind, a dispatcher whose sink is drained by its own task, and a
//! tower `ServiceBuilder` stack doing the same per-call work as the pipeline (name
//! lookup, `T::deserialize(&Value)`, timeout, concurrency limit, rate limit, two
//! bounded channel sends), with one call of each variant.
//!
//! Included by path, not a crate of its own, so both includers compile the very same
//! code: `benches/pipeline.rs` (`#[path = "common/baseline.rs"] mod baseline;`) and
//! `examples/overhead.rs` (`#[path = "../benches/common/baseline.rs"] mod baseline;`).
//! It lives in a subdirectory so cargo does not discover it as a bench of its own.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tool_dispatch::event::Event;
use tool_dispatch::{
    BoxFuture, Dispatcher, Engine, Limits, Rate, Tool, ToolCall, ToolContext, ToolError,
    UserContext, UserLimits,
};
use tower::{Service, ServiceBuilder, ServiceExt};

/// The no-op tool's input.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct NoopIn {
    /// Returned as is.
    pub n: u64,
}

/// The tool's own function: what a direct call runs.
pub async fn noop(input: NoopIn) -> Result<u64, ToolError> {
    Ok(input.n)
}

/// The no-op tool, as the pipeline runs it.
pub struct Noop;

impl Tool for Noop {
    const NAME: &'static str = "noop";
    type Input = NoopIn;
    type Output = u64;
    fn description(&self) -> &str {
        "Returns its input."
    }
    async fn call(&self, input: NoopIn, _cx: ToolContext) -> Result<u64, ToolError> {
        noop(input).await
    }
}

/// Limits far above what the run reaches: checked on every call, never binding.
pub fn open_limits() -> Limits {
    Limits::default().global(1 << 24).per_user(UserLimits {
        concurrency: 1 << 24,
        rate: Some(Rate::per_second(u32::MAX).burst(u32::MAX)),
    })
}

/// Capacity of every sink, the pipeline's and the tower stack's.
const SINK_CAPACITY: usize = 1024;

/// A dispatcher for `user` whose bounded sink is drained by its own task.
pub fn dispatcher(engine: &Engine, user: &str) -> Dispatcher {
    let (tx, mut rx) = mpsc::channel::<Event>(SINK_CAPACITY);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let ctx = UserContext::builder(user).build().expect("valid user");
    engine.dispatcher().sink(tx).user(ctx)
}

/// One direct call of the tool's function.
pub async fn direct_call(n: u64) {
    black_box(noop(black_box(NoopIn { n })).await.expect("noop succeeds"));
}

/// One pipeline call by name, with JSON arguments.
pub async fn pipeline_json(d: &Dispatcher, n: u64) {
    let out = d.dispatch(ToolCall::new("noop", json!({ "n": n }))).await;
    black_box(out.expect("noop succeeds"));
}

/// One typed pipeline call.
pub async fn pipeline_typed(d: &Dispatcher, n: u64) {
    black_box(d.call::<Noop>(NoopIn { n }).await.expect("noop succeeds"));
}

// ------------------------------------------------------------------------------
// The tower stack doing the same per-call work.
// ------------------------------------------------------------------------------

/// What the tower stack sends on its channel (two per call).
#[derive(Debug)]
#[allow(dead_code)] // the fields are what a consumer would read
pub enum TowerEvent {
    /// Sent before the tool runs.
    Executing {
        /// The call's id.
        call_id: u64,
        /// The tool's name.
        tool: &'static str,
    },
    /// Sent after the tool ran.
    Completed {
        /// The call's id.
        call_id: u64,
        /// The tool's output.
        result: Value,
    },
}

type Handler = fn(&Value) -> Result<BoxFuture<'static, Result<Value, ToolError>>, String>;

fn noop_handler(args: &Value) -> Result<BoxFuture<'static, Result<Value, ToolError>>, String> {
    let input = NoopIn::deserialize(args).map_err(|e| e.to_string())?;
    Ok(Box::pin(async move {
        let out = noop(input).await?;
        serde_json::to_value(out).map_err(ToolError::from)
    }))
}

/// A request to the tower stack: tool name, JSON arguments, the user's event channel.
pub struct TowerReq {
    name: String,
    args: Value,
    sink: mpsc::Sender<TowerEvent>,
}

/// Hand-rolled GCRA rate check on one atomic, as a tower stack would add it.
struct RateCheck {
    epoch: Instant,
    interval_ns: u64,
    tolerance_ns: u64,
    tat: AtomicU64,
}

impl RateCheck {
    fn check(&self) -> bool {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let mut tat = self.tat.load(Relaxed);
        loop {
            let t = tat.max(now);
            if t - now > self.tolerance_ns {
                return false;
            }
            match self
                .tat
                .compare_exchange_weak(tat, t + self.interval_ns, Relaxed, Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => tat = seen,
            }
        }
    }
}

async fn send_event(sink: &mpsc::Sender<TowerEvent>, ev: TowerEvent) {
    match sink.try_send(ev) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(ev)) => {
            let _ = sink.send(ev).await;
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

/// The tower stack's error.
pub type TowerError = tower::BoxError;

/// The shared tower stack: concurrency limit → timeout → service_fn (lookup, rate,
/// deserialize, events). Cloned into every task, as a server shares its service.
pub fn tower_stack()
-> impl Service<TowerReq, Response = Value, Error = TowerError, Future: Send> + Clone + Send {
    let mut tools: HashMap<String, Handler> = HashMap::new();
    tools.insert("noop".into(), noop_handler as Handler);
    let tools = Arc::new(tools);
    let rate = Arc::new(RateCheck {
        epoch: Instant::now(),
        interval_ns: 1,
        tolerance_ns: u64::from(u32::MAX),
        tat: AtomicU64::new(0),
    });
    let ids = Arc::new(AtomicU64::new(0));
    ServiceBuilder::new()
        .concurrency_limit(1 << 24)
        .timeout(Duration::from_secs(30))
        .service_fn(move |req: TowerReq| {
            let (tools, rate, ids) = (tools.clone(), rate.clone(), ids.clone());
            async move {
                let handler = *tools.get(req.name.as_str()).ok_or("unknown tool")?;
                if !rate.check() {
                    return Err("rate limited".into());
                }
                let fut = handler(&req.args)?;
                let call_id = ids.fetch_add(1, Relaxed);
                send_event(
                    &req.sink,
                    TowerEvent::Executing {
                        call_id,
                        tool: "noop",
                    },
                )
                .await;
                let result = fut.await.map_err(|e| e.message().to_owned())?;
                send_event(
                    &req.sink,
                    TowerEvent::Completed {
                        call_id,
                        result: result.clone(),
                    },
                )
                .await;
                Ok::<_, TowerError>(result)
            }
        })
}

/// The tower stack's per-user event channel, drained by its own task.
pub fn tower_sink() -> mpsc::Sender<TowerEvent> {
    let (tx, mut rx) = mpsc::channel::<TowerEvent>(SINK_CAPACITY);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    tx
}

/// One call through the tower stack.
pub async fn tower_call<S>(svc: &mut S, sink: &mpsc::Sender<TowerEvent>, n: u64)
where
    S: Service<TowerReq, Response = Value, Error = TowerError>,
{
    let req = TowerReq {
        name: "noop".to_owned(),
        args: json!({ "n": n }),
        sink: sink.clone(),
    };
    let s = svc.ready().await.expect("ready");
    black_box(s.call(req).await.expect("noop succeeds"));
}
