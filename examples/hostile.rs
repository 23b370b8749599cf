//! Two attacks, measured side by side with their calm baseline in the same process.
//!
//! ```text
//! cargo run --release --example hostile
//! cargo run --release --example hostile -- --calls 2000 --drops 20000   # CI
//! ```
//!
//! 1. **A stuck neighbour.** Bob makes `--calls` calls of a tool limited to 2 at once
//!    (per tool) on an engine limited to 2 at once (global), measuring each call's
//!    latency; first alone, then while alice has 8 calls in flight against a socket
//!    nobody reads. Rounds alternate; p50 and p99 of each are reported and their ratio.
//!    Bob's latency must not depend on alice's socket (no shared slot is held while a
//!    call waits on its user's sink).
//! 2. **Dropped calls against a full queue.** `--drops` dispatches, each polled once
//!    (so it waits for room in a full channel) and dropped. Reported: tasks alive after
//!    them, growth of resident memory, events that reached the channel once it drains.
//!
//! 3. **A run log filled by many users, with readers that never read.** 10,000 runs
//!    of 100 users (the default per-user bound of 32 runs evicts the rest), 20 events
//!    each, every run with a reader that never reads; appends are timed beside the
//!    same appends to runs nobody reads. Reported: runs and bytes kept, resident
//!    memory growth, and the ratio of append times.
//!
//! The last line is `RESULT neighbour_p99_alone_ns=.. neighbour_p99_stuck_ns=..
//! neighbour_p99_ratio=.. drop_tasks=.. drop_rss_kib=.. runlog_rss_kib=..
//! runlog_append_ratio=.. invariants=ok|FAILED`.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;
use tool_dispatch::event::{AgentEvent, Event, Timestamp};
use tool_dispatch::{
    Dispatcher, Engine, Limits, RecordingSink, Registry, RunLog, RunLogConfig, ToolCall, ToolError,
    ToolSettings, UserContext, UserLimits, tool_fn,
};

/// Attack 3: 10,000 runs of 100 users, 20 events each; with `stuck_readers`, every
/// run has a reader that never reads. Returns (nanoseconds spent appending, runs
/// kept, bytes kept, readers kept alive).
fn fill_run_log(stuck_readers: bool) -> (u128, usize, usize, Vec<tool_dispatch::RunReader>) {
    let log = RunLog::new(RunLogConfig::default().reader_buffer(8));
    let mut readers = Vec::new();
    let mut spent = 0u128;
    for u in 0..100 {
        for r in 0..100 {
            let w = log.writer(&format!("user-{u}"), &format!("run-{r}"));
            if stuck_readers {
                readers.push(w.subscribe());
            }
            let t0 = Instant::now();
            for i in 0..20 {
                let frame = json!({"type": "tool_progress", "call_id": "c", "progress": i});
                // A process's own log answers at once: nothing to wait for.
                let appended = futures_util::FutureExt::now_or_never(w.append(frame));
                appended
                    .expect("answers at once")
                    .expect("within the bounds");
            }
            spent += t0.elapsed().as_nanos();
        }
    }
    let stats = log.stats();
    (spent, stats.runs, stats.bytes, readers)
}

fn arg(name: &str, default: usize) -> usize {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn user(id: &str) -> UserContext {
    UserContext::builder(id).build().expect("valid user")
}

fn engine() -> Engine {
    let quick = tool_fn("quick", "Answers at once.", |n: u64, _cx| async move {
        Ok::<_, ToolError>(n)
    })
    .settings(ToolSettings::new().max_concurrency(2));
    let reg = Registry::builder().tool(quick).build().expect("registry");
    let per_user = UserLimits {
        concurrency: 16,
        rate: None,
    };
    Engine::builder(reg)
        .limits(Limits::default().global(2).per_user(per_user))
        .delivery_timeout(Duration::from_secs(30))
        .build()
}

/// Bob's latencies (ns) over `calls` calls, and how many of them failed.
async fn bob_round(bob: &Dispatcher, calls: usize) -> (Vec<u64>, usize) {
    let (mut lat, mut failed) = (Vec::with_capacity(calls), 0);
    for i in 0..calls {
        let t = Instant::now();
        let r = bob.dispatch(ToolCall::new("quick", json!(i))).await;
        lat.push(t.elapsed().as_nanos() as u64);
        failed += usize::from(r.is_err());
    }
    (lat, failed)
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1]
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn filler() -> Event {
    Event::AgentStarted(AgentEvent {
        run_id: None,
        thread_id: None,
        user_id: "alice".into(),
        message: None,
        result: None,
        timestamp: Timestamp::now(),
    })
}

fn main() {
    let (calls, drops) = (arg("--calls", 20_000), arg("--drops", 50_000));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut failures = Vec::new();
    let (alone, stuck, bob_failed, drop_tasks, drop_rss, delivered) = rt.block_on(async {
        // 1. A stuck neighbour.
        let engine = engine();
        let bob = engine
            .dispatcher()
            .sink(RecordingSink::with_capacity(usize::MAX))
            .user(user("bob"));
        let (mut alone, mut stuck, mut bob_failed) = (Vec::new(), Vec::new(), 0);
        for _ in 0..3 {
            let (lat, failed) = bob_round(&bob, calls / 6).await;
            alone.extend(lat);
            bob_failed += failed;
            let (tx, rx) = mpsc::channel::<Event>(1); // alice's socket: never read
            let alice = engine.dispatcher().sink(tx).user(user("alice"));
            // Each of alice's 8 calls is polled once (so it waits on her socket, or
            // on a slot) before bob starts.
            let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
            let alice_calls: Vec<_> = (0..8)
                .map(|i| {
                    let (alice, started_tx) = (alice.clone(), started_tx.clone());
                    tokio::spawn(async move {
                        let mut fut = pin!(alice.dispatch(ToolCall::new("quick", json!(i))));
                        let first =
                            std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
                        let _ = started_tx.send(());
                        match first {
                            Poll::Ready(r) => r,
                            Poll::Pending => fut.await,
                        }
                    })
                })
                .collect();
            for _ in 0..8 {
                started.recv().await;
            }
            let (lat, failed) = bob_round(&bob, calls / 6).await;
            stuck.extend(lat);
            bob_failed += failed;
            engine.cancel_user("alice");
            for c in alice_calls {
                let _ = c.await;
            }
            drop(rx);
        }
        alone.sort_unstable();
        stuck.sort_unstable();

        // 2. Dropped calls against a full queue.
        let engine = self::engine();
        let (tx, mut rx) = mpsc::channel::<Event>(1);
        tx.try_send(filler()).expect("room for one");
        let d = engine.dispatcher().sink(tx).user(user("alice"));
        let tasks_before = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        let rss_before = rss_kib();
        for i in 0..drops {
            let mut fut = pin!(d.dispatch(ToolCall::new("quick", json!(i))));
            let polled = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
            assert!(polled.is_pending(), "the queue is full: the call waits");
        }
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
            .saturating_sub(tasks_before);
        let rss = rss_kib().saturating_sub(rss_before);
        drop(d);
        let mut delivered = 0usize;
        while rx.recv().await.is_some() {
            delivered += 1;
        }
        (alone, stuck, bob_failed, tasks, rss, delivered)
    });
    // 3. A run log under many users with readers that never read.
    let rss_before = rss_kib();
    let (stuck_ns, runs, bytes, readers) = fill_run_log(true);
    let log_rss = rss_kib().saturating_sub(rss_before);
    drop(readers);
    let (calm_ns, _, _, _) = fill_run_log(false);
    let append_ratio = stuck_ns as f64 / calm_ns.max(1) as f64;
    println!(
        "run log: 10,000 runs of 100 users written, {runs} kept, {bytes} bytes kept, RSS +{log_rss} KiB; appends with readers that never read take {append_ratio:.2}x the time of appends nobody reads"
    );
    if runs > 100 * 32 {
        failures.push(format!("{runs} runs kept past the per-user bound"));
    }

    let (a50, a99) = (quantile(&alone, 0.5), quantile(&alone, 0.99));
    let (s50, s99) = (quantile(&stuck, 0.5), quantile(&stuck, 0.99));
    let ratio = s99 as f64 / a99.max(1) as f64;
    println!(
        "stuck neighbour: bob alone p50 {a50} ns p99 {a99} ns; with alice's socket stuck p50 {s50} ns p99 {s99} ns"
    );
    println!(
        "dropped calls: {drops} dispatches polled once and dropped: {drop_tasks} task(s) alive, RSS +{drop_rss} KiB, {delivered} events delivered once the queue drained"
    );
    if s99 > 1_000_000_000 || bob_failed > 0 {
        failures.push(format!(
            "bob waited up to {s99} ns behind alice's socket; {bob_failed} of his calls failed"
        ));
    }
    if drop_tasks > 1 {
        failures.push(format!("{drop_tasks} tasks for one sink"));
    }
    for f in &failures {
        eprintln!("INVARIANT FAILED: {f}");
    }
    let verdict = if failures.is_empty() { "ok" } else { "FAILED" };
    println!(
        "RESULT neighbour_p99_alone_ns={a99} neighbour_p99_stuck_ns={s99} neighbour_p99_ratio={ratio:.2} drop_tasks={drop_tasks} drop_rss_kib={drop_rss} runlog_rss_kib={log_rss} runlog_append_ratio={append_ratio:.2} invariants={verdict}"
    );
    if !failures.is_empty() {
        std::process::exit(1);
    }
}
