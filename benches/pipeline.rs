//! Criterion benches of the pipeline's per-call cost against a direct call of the
//! tool's function and a tower `ServiceBuilder` stack doing the same per-call work.
//!
//! `cargo bench --bench pipeline` (CI: `cargo bench --bench pipeline --no-run`).
//! The ratios are what matters: see `examples/overhead.rs` for the one-line summary.

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tool_dispatch::{
    Dispatcher, Engine, Event, Limits, Rate, Registry, Tool, ToolCall, ToolContext, ToolError,
    ToolSettings, UserContext, UserLimits,
};
use tower::{Service, ServiceBuilder, ServiceExt};

/// The no-op tool's input.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
struct NoopIn {
    n: u64,
}

/// The tool's own function: what a direct call runs.
async fn noop(input: NoopIn) -> Result<u64, ToolError> {
    Ok(input.n)
}

struct Noop;

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
fn open_limits() -> Limits {
    Limits::default().global(1 << 24).per_user(UserLimits {
        concurrency: 1 << 24,
        rate: Some(Rate::per_second(u32::MAX).burst(u32::MAX)),
    })
}

const SINK_CAPACITY: usize = 1024;

/// A dispatcher for `user` whose bounded sink is drained by its own task.
fn dispatcher(engine: &Engine, user: &str) -> Dispatcher {
    let (tx, mut rx) = mpsc::channel::<Event>(SINK_CAPACITY);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let ctx = UserContext::builder(user).build().expect("valid user");
    engine.dispatcher().sink(tx).user(ctx)
}

// ------------------------------------------------------------------------------
// The tower stack doing the same per-call work.
// ------------------------------------------------------------------------------

/// What the tower stack sends on its channel (two per call).
#[derive(Debug)]
#[allow(dead_code)] // the fields are what a consumer would read
enum TowerEvent {
    Executing { call_id: u64, tool: &'static str },
    Completed { call_id: u64, result: Value },
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Value, ToolError>> + Send>>;
type Handler = fn(&Value) -> Result<BoxFut, String>;

fn noop_handler(args: &Value) -> Result<BoxFut, String> {
    let input = NoopIn::deserialize(args).map_err(|e| e.to_string())?;
    Ok(Box::pin(async move {
        let out = noop(input).await?;
        serde_json::to_value(out).map_err(ToolError::from)
    }))
}

/// A request to the tower stack: tool name, JSON arguments, the user's event channel.
struct TowerReq {
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

type TowerError = tower::BoxError;

/// The shared tower stack: concurrency limit → timeout → service_fn (lookup, rate,
/// deserialize, events). Cloned into every task, as a server shares its service.
fn tower_stack()
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

fn tower_sink() -> mpsc::Sender<TowerEvent> {
    let (tx, mut rx) = mpsc::channel::<TowerEvent>(SINK_CAPACITY);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    tx
}

/// The no-op tool, cacheable: repeated identical calls are cache hits.
struct CachedNoop;

impl Tool for CachedNoop {
    const NAME: &'static str = "cached_noop";
    type Input = NoopIn;
    type Output = u64;
    fn description(&self) -> &str {
        "Returns its input, cached."
    }
    fn settings(&self) -> ToolSettings {
        ToolSettings::new().cache(Duration::from_secs(3600))
    }
    async fn call(&self, input: NoopIn, _cx: ToolContext) -> Result<u64, ToolError> {
        noop(input).await
    }
}

fn bench_engine() -> Engine {
    let reg = Registry::builder()
        .tool(Noop)
        .tool(CachedNoop)
        .build()
        .expect("valid registry");
    Engine::builder(reg).limits(open_limits()).build()
}

async fn pipeline_json(d: &Dispatcher, n: u64) {
    let out = d.dispatch(ToolCall::new("noop", json!({ "n": n }))).await;
    black_box(out.expect("noop succeeds"));
}

async fn pipeline_typed(d: &Dispatcher, n: u64) {
    black_box(d.call::<Noop>(NoopIn { n }).await.expect("noop succeeds"));
}

async fn tower_call<S>(svc: &mut S, sink: &mpsc::Sender<TowerEvent>, n: u64)
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

fn current_thread(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (engine, d, svc, sink) = rt.block_on(async {
        let engine = bench_engine();
        let d = dispatcher(&engine, "bench-user");
        (engine, d, tower_stack(), tower_sink())
    });
    let mut g = c.benchmark_group("current_thread");
    g.bench_function("direct", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(noop(black_box(NoopIn { n: 1 })).await.expect("ok")) })
    });
    g.bench_function("pipeline_json", |b| {
        b.to_async(&rt).iter(|| pipeline_json(&d, 1))
    });
    g.bench_function("pipeline_typed", |b| {
        b.to_async(&rt).iter(|| pipeline_typed(&d, 1))
    });
    g.bench_function("tower", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (mut svc, sink) = (svc.clone(), sink.clone());
            async move {
                let t = Instant::now();
                for n in 0..iters {
                    tower_call(&mut svc, &sink, n).await;
                }
                t.elapsed()
            }
        })
    });
    g.bench_function("cache_hit_typed", |b| {
        b.to_async(&rt).iter(|| async {
            let out = d.call::<CachedNoop>(NoopIn { n: 7 }).await.expect("ok");
            black_box(out);
        })
    });
    g.bench_function("dispatch_all_8", |b| {
        b.to_async(&rt).iter(|| async {
            let calls = (0..8).map(|n| ToolCall::new("noop", json!({ "n": n })));
            black_box(d.dispatch_all(calls).await);
        })
    });
    g.finish();
    let m = engine.metrics();
    assert_eq!(m.active, 0);
    assert!(m.cache_hits > 0, "the cache bench hit the cache");
}

/// `iters` calls spread over `TASKS` tasks on 2 workers; criterion's per-iteration
/// time is then wall time per call across both cores.
const TASKS: u64 = 4;

fn multi_thread(c: &mut Criterion) {
    let rt: Runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (engine, ds, svc, sinks) = rt.block_on(async {
        let engine = bench_engine();
        let ds: Vec<Dispatcher> = (0..TASKS)
            .map(|t| dispatcher(&engine, &format!("user-{t}")))
            .collect();
        let sinks: Vec<_> = (0..TASKS).map(|_| tower_sink()).collect();
        (engine, ds, tower_stack(), sinks)
    });
    let mut g = c.benchmark_group("multi_thread_2_workers");
    g.bench_function("pipeline_json", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let ds = ds.clone();
            async move {
                let t = Instant::now();
                let hs: Vec<_> = ds
                    .into_iter()
                    .map(|d| {
                        tokio::spawn(async move {
                            for n in 0..iters.div_ceil(TASKS) {
                                pipeline_json(&d, n).await;
                            }
                        })
                    })
                    .collect();
                for h in hs {
                    h.await.expect("task");
                }
                t.elapsed()
            }
        })
    });
    g.bench_function("pipeline_typed", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let ds = ds.clone();
            async move {
                let t = Instant::now();
                let hs: Vec<_> = ds
                    .into_iter()
                    .map(|d| {
                        tokio::spawn(async move {
                            for n in 0..iters.div_ceil(TASKS) {
                                pipeline_typed(&d, n).await;
                            }
                        })
                    })
                    .collect();
                for h in hs {
                    h.await.expect("task");
                }
                t.elapsed()
            }
        })
    });
    g.bench_function("tower", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (svc, sinks) = (svc.clone(), sinks.clone());
            async move {
                let t = Instant::now();
                let hs: Vec<_> = sinks
                    .into_iter()
                    .map(|sink| {
                        let mut svc = svc.clone();
                        tokio::spawn(async move {
                            for n in 0..iters.div_ceil(TASKS) {
                                tower_call(&mut svc, &sink, n).await;
                            }
                        })
                    })
                    .collect();
                for h in hs {
                    h.await.expect("task");
                }
                t.elapsed()
            }
        })
    });
    g.finish();
    assert_eq!(engine.metrics().active, 0);
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = current_thread, multi_thread
}
criterion_main!(benches);
