//! Per-call overhead of the full pipeline, side by side with calling the tool's
//! function directly and with a tower `ServiceBuilder` stack doing the same per-call
//! work (name lookup, `T::deserialize(&Value)`, timeout, concurrency limit, rate
//! limit, two bounded channel sends).
//!
//! ```text
//! cargo run --release --example overhead                          # full run
//! cargo run --release --example overhead -- --quick      # CI: 3 rounds x 2000 calls
//! cargo run --release --example overhead --features prometheus,otel   # and their costs
//! ```
//!
//! With feature `prometheus`, a round also runs the pipeline on an engine whose series
//! are registered and whose calls are counted by a user label (`prom`); with `otel`,
//! the pipeline under a subscriber whose OpenTelemetry layer exports every call's span
//! through the SDK's batch processor to an exporter that drops them (`otel`). Their
//! ratios to the plain pipeline of the same rounds are on the `RESULT` line.
//!
//! Rounds are interleaved (pipeline, typed pipeline, direct, tower, then again) on a
//! current-thread runtime and the medians are reported; then a 2-worker multi-thread
//! runtime runs several tasks (one user, one sink, one drainer each) for throughput.
//! The last line is
//! `RESULT pipeline_ns=.. direct_ns=.. tower_ns=.. ratio_vs_tower=.. calls_per_s_2cores=..`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tool_dispatch::event::Event;
use tool_dispatch::{Dispatcher, Engine, Registry, ToolCall};
use tower::Service;

#[path = "../benches/common/baseline.rs"]
mod baseline;

use baseline::{
    Noop, NoopIn, TowerError, TowerEvent, TowerReq, direct_call, dispatcher, open_limits,
    pipeline_json, pipeline_typed, tower_call, tower_sink, tower_stack,
};

fn engine() -> Engine {
    let reg = Registry::builder()
        .tool(Noop)
        .build()
        .expect("valid registry");
    Engine::builder(reg).limits(open_limits()).build()
}

// ------------------------------------------------------------------------------
// Measurement.
// ------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Pipeline,
    Typed,
    Direct,
    Tower,
    /// The pipeline with Prometheus series registered and a user label counted.
    #[cfg(feature = "prometheus")]
    Prom,
    /// The pipeline with every call's span exported through OpenTelemetry.
    #[cfg(feature = "otel")]
    Otel,
}

const VARIANTS: &[Variant] = &[
    Variant::Pipeline,
    Variant::Typed,
    Variant::Direct,
    Variant::Tower,
    #[cfg(feature = "prometheus")]
    Variant::Prom,
    #[cfg(feature = "otel")]
    Variant::Otel,
];

/// What the variants run against.
struct Bench {
    /// The plain engine, and a dispatcher of it.
    engine: Engine,
    d: Dispatcher,
    /// A dispatcher of an engine with its series registered and a user label.
    #[cfg(feature = "prometheus")]
    prom: Option<(
        Dispatcher,
        tool_dispatch::prometheus::prometheus_client::registry::Registry,
    )>,
    /// A subscriber with an OpenTelemetry layer, and its provider.
    #[cfg(feature = "otel")]
    otel: Option<(
        tracing::Dispatch,
        tool_dispatch::otel::opentelemetry_sdk::trace::SdkTracerProvider,
    )>,
}

impl Bench {
    /// What `variants` need (an OpenTelemetry subscriber only if one of them exports:
    /// its mere existence makes tracing ask, at every span, whether anyone listens).
    fn new(user: &str, variants: &[Variant]) -> Bench {
        let plain = engine();
        let _ = variants;
        Bench {
            d: dispatcher(&plain, user),
            engine: plain,
            #[cfg(feature = "prometheus")]
            prom: variants.contains(&Variant::Prom).then(|| {
                let engine = engine();
                let mut registry = Default::default();
                engine.register_metrics(&mut registry);
                engine
                    .register_metrics_by_user(&mut registry, "user", |u| Some(u.user_id()))
                    .expect("a valid label");
                (dispatcher(&engine, user), registry)
            }),
            #[cfg(feature = "otel")]
            otel: variants.contains(&Variant::Otel).then(otel_subscriber),
        }
    }
}

/// An exporter that drops what it is given.
#[cfg(feature = "otel")]
#[derive(Debug)]
struct Dropping;

/// Spans the exporter was given.
#[cfg(feature = "otel")]
static EXPORTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(feature = "otel")]
impl tool_dispatch::otel::opentelemetry_sdk::trace::SpanExporter for Dropping {
    fn export(
        &self,
        batch: Vec<tool_dispatch::otel::opentelemetry_sdk::trace::SpanData>,
    ) -> impl Future<Output = tool_dispatch::otel::opentelemetry_sdk::error::OTelSdkResult> + Send
    {
        EXPORTED.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        drop(batch);
        std::future::ready(Ok(()))
    }
}

#[cfg(feature = "otel")]
fn otel_subscriber() -> (
    tracing::Dispatch,
    tool_dispatch::otel::opentelemetry_sdk::trace::SdkTracerProvider,
) {
    use tool_dispatch::otel::opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    let provider = tool_dispatch::otel::opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(Dropping)
        .build();
    let layer = tool_dispatch::otel::layer(provider.tracer("overhead"));
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
    (dispatch, provider)
}

/// Runs `calls` calls of `v`; returns the elapsed time.
async fn run<S>(
    v: Variant,
    calls: u64,
    b: &Bench,
    svc: &mut S,
    sink: &mpsc::Sender<TowerEvent>,
) -> Duration
where
    S: Service<TowerReq, Response = Value, Error = TowerError>,
{
    #[cfg(feature = "otel")]
    // The subscriber is this variant's only: tracing caches per call site whether
    // anyone listens, so the cache is rebuilt on the way in and out (untimed).
    #[cfg(feature = "otel")]
    let otel = match (v, &b.otel) {
        (Variant::Otel, Some((dispatch, _))) => {
            let guard = tracing::dispatcher::set_default(dispatch);
            tracing::callsite::rebuild_interest_cache();
            Some(guard)
        }
        _ => None,
    };
    let start = Instant::now();
    for n in 0..calls {
        match v {
            Variant::Pipeline => pipeline_json(&b.d, n).await,
            Variant::Typed => pipeline_typed(&b.d, n).await,
            Variant::Direct => direct_call(n).await,
            Variant::Tower => tower_call(svc, sink, n).await,
            #[cfg(feature = "prometheus")]
            Variant::Prom => pipeline_json(&b.prom.as_ref().expect("a prom engine").0, n).await,
            #[cfg(feature = "otel")]
            Variant::Otel => pipeline_json(&b.d, n).await,
        }
    }
    let took = start.elapsed();
    #[cfg(feature = "otel")]
    if let Some(guard) = otel {
        drop(guard);
        tracing::callsite::rebuild_interest_cache();
    }
    took
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Args {
    /// Only this variant, no multi-thread run (for profiling under callgrind).
    only: Option<String>,
    rounds: usize,
    calls: u64,
    workers: usize,
    tasks: usize,
    mt_calls: u64,
}

fn args() -> Args {
    let mut a = Args {
        only: None,
        rounds: 15,
        workers: 2,
        calls: 20_000,
        tasks: 8,
        mt_calls: 0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv.get(i + 1).and_then(|s| s.parse::<u64>().ok());
        if argv[i] == "--quick" {
            // The small configuration CI runs: a fraction of a second.
            (a.rounds, a.calls, a.mt_calls) = (3, 2_000, 20_000);
            i += 1;
            continue;
        }
        if argv[i] == "--only" {
            a.only = argv.get(i + 1).cloned();
            i += 2;
            continue;
        }
        match (argv[i].as_str(), val) {
            ("--rounds", Some(v)) => a.rounds = v.max(1) as usize,
            ("--calls", Some(v)) => a.calls = v.max(1),
            ("--tasks", Some(v)) => a.tasks = v.max(1) as usize,
            ("--workers", Some(v)) => a.workers = v.max(1) as usize,
            ("--mt-calls", Some(v)) => a.mt_calls = v.max(1),
            (other, _) => {
                eprintln!(
                    "unknown or incomplete flag `{other}`; flags: --quick --rounds N --calls N --tasks N --workers N --mt-calls N --only VARIANT"
                );
                std::process::exit(2);
            }
        }
        i += 2;
    }
    if a.mt_calls == 0 {
        a.mt_calls = a.calls * a.rounds as u64;
    }
    a
}

/// Throughput of `total` calls spread over `tasks` tasks on `workers` workers; returns the
/// elapsed time.
fn multi_thread(variant: Variant, workers: usize, tasks: usize, total: u64) -> Duration {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let svc = tower_stack();
        let per_task = total / tasks as u64;
        let barrier = Arc::new(tokio::sync::Barrier::new(tasks + 1));
        let mut handles = Vec::new();
        let engine = engine();
        for t in 0..tasks {
            let b = Bench {
                d: dispatcher(&engine, &format!("user-{t}")),
                engine: engine.clone(),
                #[cfg(feature = "prometheus")]
                prom: None,
                #[cfg(feature = "otel")]
                otel: None,
            };
            let sink = tower_sink();
            let mut svc = svc.clone();
            let barrier = barrier.clone();
            handles.push(tokio::spawn(async move {
                // Warm up, then start together.
                run(variant, 200, &b, &mut svc, &sink).await;
                barrier.wait().await;
                run(variant, per_task, &b, &mut svc, &sink).await;
            }));
        }
        barrier.wait().await;
        let start = Instant::now();
        for h in handles {
            h.await.expect("task");
        }
        let took = start.elapsed();
        let m = engine.metrics();
        assert_eq!(m.active, 0);
        took
    })
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut per_call: HashMap<&'static str, Vec<f64>> = HashMap::new();
    let name = |v: Variant| match v {
        Variant::Pipeline => "pipeline",
        Variant::Typed => "typed",
        Variant::Direct => "direct",
        Variant::Tower => "tower",
        #[cfg(feature = "prometheus")]
        Variant::Prom => "prom",
        #[cfg(feature = "otel")]
        Variant::Otel => "otel",
    };
    if let Some(only) = &a.only {
        let Some(v) = VARIANTS.iter().copied().find(|v| name(*v) == only) else {
            eprintln!(
                "--only takes pipeline, typed, direct, tower, prom (feature prometheus) or otel (feature otel)"
            );
            std::process::exit(2);
        };
        rt.block_on(async {
            let b = Bench::new("bench-user", &[v]);
            let mut svc = tower_stack();
            let sink = tower_sink();
            run(v, 1_000, &b, &mut svc, &sink).await;
            let took = run(v, a.calls, &b, &mut svc, &sink).await;
            println!(
                "{only}: {:.1} ns/call",
                took.as_nanos() as f64 / a.calls as f64
            );
        });
        return;
    }
    rt.block_on(async {
        let b = Bench::new("bench-user", VARIANTS);
        let d = &b.d;
        let mut svc = tower_stack();
        let sink = tower_sink();
        let fut = d.dispatch(ToolCall::new("noop", json!({ "n": 0 })));
        let typed = std::future::IntoFuture::into_future(d.call::<Noop>(NoopIn { n: 0 }));
        println!(
            "sizes: dispatch future {} B (boxed), typed call future {} B (boxed), Event {} B",
            std::mem::size_of_val(&*fut),
            std::mem::size_of_val(&*typed),
            std::mem::size_of::<Event>()
        );
        fut.await.expect("noop succeeds"); // a dropped dispatch is a cancelled call
        typed.await.expect("noop succeeds");
        // Warm-up round (allocator, caches, channel blocks).
        for &v in VARIANTS {
            run(v, a.calls.min(5_000), &b, &mut svc, &sink).await;
        }
        for _ in 0..a.rounds {
            for &v in VARIANTS {
                let took = run(v, a.calls, &b, &mut svc, &sink).await;
                per_call
                    .entry(name(v))
                    .or_default()
                    .push(took.as_nanos() as f64 / a.calls as f64);
            }
        }
        let m = b.engine.metrics();
        assert_eq!(
            m.total,
            m.count(tool_dispatch::event::Status::Success),
            "every call succeeded"
        );
        assert_eq!(m.active, 0, "no call left active");
        assert_eq!(m.sink_failures, 0, "every event was delivered");
        #[cfg(feature = "prometheus")]
        if let Some((_, registry)) = &b.prom {
            // Not on the call path: what one scrape of the engine's series costs.
            let scrapes = 200;
            let start = Instant::now();
            let mut bytes = 0;
            for _ in 0..scrapes {
                let e = tool_dispatch::prometheus::encode(registry, Some("application/openmetrics-text"))
                    .expect("the registry encodes");
                bytes = e.body.len();
            }
            let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(scrapes);
            println!("prometheus: one scrape {us:.1} µs ({bytes} bytes, one tool)");
        }
        #[cfg(feature = "otel")]
        if let Some((_, provider)) = &b.otel {
            let _ = provider.force_flush();
            let made = a.calls.min(5_000) + a.calls * a.rounds as u64;
            let got = EXPORTED.load(std::sync::atomic::Ordering::Relaxed);
            println!(
                "otel: {got} spans reached the exporter for {made} calls (the await_delivery spans of calls that found the sink full included)"
            );
        }
    });
    // Each feature's cost: its variant over the plain pipeline of the same round.
    let mut extra = String::new();
    let mut extra_lines = Vec::new();
    for k in ["prom", "otel"] {
        let (Some(f), Some(p)) = (per_call.get(k), per_call.get("pipeline")) else {
            continue;
        };
        let mut ratios: Vec<f64> = f.iter().zip(p).map(|(f, p)| f / p).collect();
        let mut ns = f.clone();
        let (ns, ratio) = (median(&mut ns), median(&mut ratios));
        extra.push_str(&format!(" {k}_ns={ns:.1} {k}_ratio={ratio:.3}"));
        extra_lines.push(format!(
            "  {:<30} {ns:>9.1}  ({ratio:.3}x the pipeline, median of per-round ratios)",
            match k {
                "prom" => "pipeline + prometheus (label)",
                _ => "pipeline + otel (spans out)",
            }
        ));
    }
    let features = [
        cfg!(feature = "prometheus").then_some("prometheus"),
        cfg!(feature = "otel").then_some("otel"),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(",");
    let features = if features.is_empty() {
        "none".to_owned()
    } else {
        features
    };
    let mut med = |k: &str| {
        median(
            per_call
                .get_mut(k)
                .map(Vec::as_mut_slice)
                .unwrap_or(&mut []),
        )
    };
    let (pipeline, typed, direct, tower) =
        (med("pipeline"), med("typed"), med("direct"), med("tower"));
    println!(
        "current-thread runtime, {} rounds x {} calls, median ns/call:",
        a.rounds, a.calls
    );
    println!("  pipeline (by name, JSON args)  {pipeline:>9.1}");
    println!("  pipeline (typed call)          {typed:>9.1}");
    println!("  direct call of the tool fn     {direct:>9.1}");
    println!("  tower ServiceBuilder stack     {tower:>9.1}");
    for line in &extra_lines {
        println!("{line}");
    }
    println!(
        "  ratios: pipeline/tower {:.2}  typed/tower {:.2}  pipeline-direct {:.1} ns",
        pipeline / tower,
        typed / tower,
        pipeline - direct
    );

    let total = a.mt_calls;
    let mt_pipe = multi_thread(Variant::Pipeline, a.workers, a.tasks, total);
    let mt_tower = multi_thread(Variant::Tower, a.workers, a.tasks, total);
    let done = (total / a.tasks as u64) * a.tasks as u64;
    let cps = done as f64 / mt_pipe.as_secs_f64();
    let tower_cps = done as f64 / mt_tower.as_secs_f64();
    // Worker time per call: every worker busy for the elapsed time.
    let w = a.workers as f64;
    let mt_ns = mt_pipe.as_nanos() as f64 * w / done as f64;
    let mt_tower_ns = mt_tower.as_nanos() as f64 * w / done as f64;
    println!(
        "multi-thread runtime, {} workers, {} tasks, {done} calls: pipeline {cps:.0} calls/s, tower {tower_cps:.0} calls/s",
        a.workers, a.tasks
    );
    println!(
        "MT per_call_ns pipeline={mt_ns:.1} tower={mt_tower_ns:.1} (worker time per call = workers x elapsed / calls)"
    );
    // Reached only if the accounting checks above held (they panic otherwise).
    println!("invariants=ok (every call succeeded and was delivered, none left active)");
    println!(
        "RESULT pipeline_ns={pipeline:.1} direct_ns={direct:.1} tower_ns={tower:.1} ratio_vs_tower={:.3} calls_per_s_2cores={cps:.0} features={features}{extra}",
        pipeline / tower
    );
}
