//! Criterion benches of the pipeline's per-call cost against a direct call of the
//! tool's function and a tower `ServiceBuilder` stack doing the same per-call work.
//!
//! `cargo bench --bench pipeline` (CI: `cargo bench --bench pipeline --no-run`).
//! The ratios are what matters: see `examples/overhead.rs` for the one-line summary.

use std::future::Future;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use tokio::runtime::Runtime;
use tool_dispatch::{
    Dispatcher, Engine, Registry, Tool, ToolCall, ToolContext, ToolError, ToolSettings,
};

#[path = "common/baseline.rs"]
mod baseline;

use baseline::{
    Noop, NoopIn, direct_call, dispatcher, noop, open_limits, pipeline_json, pipeline_typed,
    tower_call, tower_sink, tower_stack,
};

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
    g.bench_function("direct", |b| b.to_async(&rt).iter(|| direct_call(1)));
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
    // Only the first call of the cache bench may run the tool; every later one hits.
    assert!(
        m.cache_misses <= 1,
        "the cache bench missed the cache {} times",
        m.cache_misses
    );
}

/// `iters` calls spread over `TASKS` tasks on 2 workers; criterion's per-iteration
/// time is then wall time per call across both cores.
const TASKS: u64 = 4;

/// Spawns every task, awaits them all; returns the time from the first spawn to the
/// last task's end. The iterator is lazy: the tasks are made after the clock starts.
async fn timed_tasks<F>(tasks: impl IntoIterator<Item = F>) -> Duration
where
    F: Future<Output = ()> + Send + 'static,
{
    let t = Instant::now();
    let hs: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    for h in hs {
        h.await.expect("task");
    }
    t.elapsed()
}

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
            timed_tasks(ds.clone().into_iter().map(move |d| async move {
                for n in 0..iters.div_ceil(TASKS) {
                    pipeline_json(&d, n).await;
                }
            }))
        })
    });
    g.bench_function("pipeline_typed", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            timed_tasks(ds.clone().into_iter().map(move |d| async move {
                for n in 0..iters.div_ceil(TASKS) {
                    pipeline_typed(&d, n).await;
                }
            }))
        })
    });
    g.bench_function("tower", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let svc = svc.clone();
            timed_tasks(sinks.clone().into_iter().map(move |sink| {
                let mut svc = svc.clone();
                async move {
                    for n in 0..iters.div_ceil(TASKS) {
                        tower_call(&mut svc, &sink, n).await;
                    }
                }
            }))
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
