//! Many users at once: every user has its own dispatcher and its own bounded sink,
//! drained by its own task; the tool awaits a short delay; all users run together on
//! a multi-thread runtime. Every invariant is checked at the end and the process exits
//! non-zero if one fails.
//!
//! ```text
//! cargo run --release --example load -- --users 10000 --calls 20
//! cargo run --release --example load -- --users 500 --calls 5 --idle 10000   # CI
//! ```
//!
//! Latencies are the dispatch overhead: end-to-end time of a call minus the delay the
//! tool itself measured around its `sleep`. `bytes_per_idle_dispatcher` is the growth
//! of resident memory (VmRSS) over creating `--idle` idle dispatchers (own user, own
//! sink handle, no call) at start-up, before anything else touched the heap; the cost
//! of each user's channel buffer (which belongs to the WebSocket, not the dispatcher)
//! is measured the same way and printed on its own line. A counting global allocator
//! would be more exact but needs `unsafe`, which this crate forbids.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tool_dispatch::event::{Event, Status};
use tool_dispatch::{
    Engine, EventSink, Limits, Rate, Registry, Tool, ToolContext, ToolError, TrySendError,
    UserContext, UserLimits,
};

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
struct WaitIn {
    micros: u64,
}

/// Sleeps, and returns how long the sleep really took (ns), so the caller can subtract
/// the tool's own time from the end-to-end time.
struct Wait;

impl Tool for Wait {
    const NAME: &'static str = "wait";
    type Input = WaitIn;
    type Output = u64;
    fn description(&self) -> &str {
        "Waits a little."
    }
    async fn call(&self, input: WaitIn, _cx: ToolContext) -> Result<u64, ToolError> {
        if input.micros == 0 {
            return Ok(0); // `--delay-us 0`: the library's own throughput
        }
        let t = Instant::now();
        tokio::time::sleep(Duration::from_micros(input.micros)).await;
        Ok(t.elapsed().as_nanos() as u64)
    }
}

/// A sink that stores nothing: the smallest possible per-dispatcher sink, used to
/// measure the dispatcher's own footprint.
struct NullSink;

impl EventSink for NullSink {
    fn try_send(&self, _event: Event) -> Result<(), TrySendError> {
        Ok(())
    }
}

struct Args {
    users: usize,
    calls: usize,
    delay_us: u64,
    idle: usize,
    workers: usize,
}

fn args() -> Args {
    let mut a = Args {
        users: 10_000,
        calls: 20,
        delay_us: 1_000,
        idle: 100_000,
        workers: 2,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).and_then(|s| s.parse::<u64>().ok());
        match (argv[i].as_str(), v) {
            ("--users", Some(v)) => a.users = v.max(1) as usize,
            ("--calls", Some(v)) => a.calls = v.max(1) as usize,
            ("--delay-us", Some(v)) => a.delay_us = v,
            ("--idle", Some(v)) => a.idle = v.max(1) as usize,
            ("--workers", Some(v)) => a.workers = v.max(1) as usize,
            (other, _) => {
                eprintln!(
                    "unknown or incomplete flag `{other}`; flags: --users N --calls N --delay-us N --idle N --workers N"
                );
                std::process::exit(2);
            }
        }
        i += 2;
    }
    a
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn engine(calls: usize) -> Engine {
    let reg = Registry::builder()
        .tool(Wait)
        .build()
        .expect("valid registry");
    // Per-user limits stay at their defaults (10 concurrent, 100 per minute), the rate
    // raised to let a user make `calls` at once (checked on every call, never binding);
    // the global limit is raised so that 10,000 users are not queued behind 100 slots.
    let calls = u32::try_from(calls).unwrap_or(u32::MAX).max(100);
    let rate = Rate::per_minute(calls).burst(calls);
    Engine::builder(reg)
        .limits(Limits::default().global(1 << 20).per_user(UserLimits {
            rate: Some(rate),
            ..UserLimits::default()
        }))
        .build()
}

/// RSS growth per idle dispatcher, and per user channel (mpsc, capacity 64).
fn idle_footprint(n: usize) -> (f64, f64) {
    let engine = engine(1);
    let users: Vec<UserContext> = (0..n)
        .map(|i| {
            UserContext::builder(format!("idle-user-{i}"))
                .build()
                .expect("valid user")
        })
        .collect();
    let before = status_kib("VmRSS:");
    let dispatchers: Vec<_> = users
        .iter()
        .map(|u| engine.dispatcher().sink(NullSink).user(u.clone()))
        .collect();
    let after = status_kib("VmRSS:");
    let per_dispatcher = (after.saturating_sub(before) * 1024) as f64 / n as f64;
    let before = status_kib("VmRSS:");
    let m = n.min(10_000); // channels are large; fewer suffice for the figure
    let channels: Vec<_> = (0..m).map(|_| mpsc::channel::<Event>(64)).collect();
    let after = status_kib("VmRSS:");
    let per_channel = (after.saturating_sub(before) * 1024) as f64 / m as f64;
    assert_eq!(engine.metrics().tracked_users, n);
    drop((dispatchers, channels));
    (per_dispatcher, per_channel)
}

/// What one user's drainer saw.
struct Seen {
    user: String,
    /// (call_id, is_executing, user_id on the event)
    events: Vec<(Arc<str>, bool, Arc<str>)>,
    other: usize,
}

fn main() {
    let a = args();
    // Measured first, on a fresh heap, so freed memory of the run cannot hide growth.
    let (per_dispatcher, per_channel) = idle_footprint(a.idle);
    println!(
        "idle: {} dispatchers, {per_dispatcher:.0} B each (user state, context, handles); an mpsc(64) user channel adds {per_channel:.0} B",
        a.idle
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.workers)
        .enable_all()
        .build()
        .expect("runtime");
    let (users, calls, delay_us) = (a.users, a.calls, a.delay_us);
    let mut failures: Vec<String> = Vec::new();
    let (took, overheads, seen, returned, engine) = rt.block_on(async move {
        let engine = engine(calls);
        let start_gate = Arc::new(tokio::sync::Barrier::new(users + 1));
        let mut user_tasks = Vec::with_capacity(users);
        let mut drainers = Vec::with_capacity(users);
        for u in 0..users {
            let name = format!("user-{u:05}");
            let (tx, mut rx) = mpsc::channel::<Event>(64);
            let who = name.clone();
            drainers.push(tokio::spawn(async move {
                let mut seen = Seen {
                    user: who,
                    events: Vec::with_capacity(calls * 2),
                    other: 0,
                };
                while let Some(ev) = rx.recv().await {
                    match ev {
                        Event::ToolExecuting(e) => seen.events.push((e.call_id, true, e.user_id)),
                        Event::ToolCompleted(e) => {
                            if e.status != Status::Success {
                                seen.other += 1;
                            }
                            seen.events.push((e.call_id, false, e.user_id))
                        }
                        _ => seen.other += 1,
                    }
                }
                seen
            }));
            let ctx = UserContext::builder(name).build().expect("valid user");
            let d = engine.dispatcher().sink(tx).user(ctx);
            let gate = start_gate.clone();
            user_tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(calls);
                let mut ids = Vec::with_capacity(calls);
                gate.wait().await;
                for _ in 0..calls {
                    let t = Instant::now();
                    let out = d.call::<Wait>(WaitIn { micros: delay_us }).await;
                    let e2e = t.elapsed().as_nanos() as u64;
                    match out {
                        Ok(o) => {
                            lat.push(e2e.saturating_sub(o.value));
                            ids.push(o.call_id);
                        }
                        Err(e) => return Err(format!("call failed: {e}")),
                    }
                }
                Ok((lat, ids))
            }));
        }
        start_gate.wait().await;
        let t0 = Instant::now();
        let mut overheads = Vec::with_capacity(users * calls);
        let mut returned: Vec<Vec<Arc<str>>> = Vec::with_capacity(users);
        let mut errors = Vec::new();
        for h in user_tasks {
            match h.await {
                Ok(Ok((lat, ids))) => {
                    overheads.extend(lat);
                    returned.push(ids);
                }
                Ok(Err(e)) => {
                    errors.push(e);
                    returned.push(Vec::new());
                }
                Err(e) => {
                    errors.push(format!("user task failed: {e}"));
                    returned.push(Vec::new());
                }
            }
        }
        let took = t0.elapsed();
        // Every dispatcher is gone with its task: the sinks close and drainers end.
        let mut seen = Vec::with_capacity(users);
        for h in drainers {
            seen.push(h.await.expect("drainer"));
        }
        for e in errors.into_iter().take(5) {
            eprintln!("{e}");
        }
        (took, overheads, seen, returned, engine)
    });

    // ---- invariants ----
    let expected = (users * calls) as u64;
    if overheads.len() as u64 != expected {
        failures.push(format!("{} of {expected} calls succeeded", overheads.len()));
    }
    let mut foreign = 0usize;
    let mut unpaired = 0usize;
    let mut not_returned = 0usize;
    for (seen, ids) in seen.iter().zip(&returned) {
        let mut by_id: HashMap<&str, Vec<bool>> = HashMap::new();
        for (id, executing, user) in &seen.events {
            if **user != *seen.user {
                foreign += 1;
            }
            by_id.entry(id).or_default().push(*executing);
        }
        unpaired += by_id
            .values()
            .filter(|v| v.as_slice() != [true, false])
            .count();
        not_returned += ids.iter().filter(|id| !by_id.contains_key(&***id)).count();
        if by_id.len() != ids.len() {
            unpaired += by_id.len().abs_diff(ids.len());
        }
        unpaired += seen.other;
    }
    if foreign > 0 {
        failures.push(format!("{foreign} events reached another user's sink"));
    }
    if unpaired > 0 || not_returned > 0 {
        failures.push(format!(
            "{unpaired} call ids without exactly executing-then-completed, {not_returned} returned ids without events"
        ));
    }
    let m = engine.metrics();
    let sum: u64 = m.by_status.values().sum();
    if m.total != sum || m.total != expected || m.count(Status::Success) != expected {
        failures.push(format!(
            "accounting: total {} sum {sum} success {} expected {expected}",
            m.total,
            m.count(Status::Success)
        ));
    }
    if m.active != 0 || engine.active() != 0 {
        failures.push(format!("{} calls still active", m.active));
    }

    let mut o = overheads;
    o.sort_unstable();
    let q = |p: f64| -> u64 {
        if o.is_empty() {
            return 0;
        }
        o[((o.len() as f64 * p).ceil() as usize).clamp(1, o.len()) - 1] / 1000
    };
    let (p50, p99, max) = (q(0.50), q(0.99), o.last().copied().unwrap_or(0) / 1000);
    let throughput = expected as f64 / took.as_secs_f64();
    let peak_mib = status_kib("VmHWM:") as f64 / 1024.0;
    println!(
        "{users} users x {calls} calls, tool delay {delay_us} us, {} workers: {:.2} s",
        a.workers,
        took.as_secs_f64()
    );
    for f in &failures {
        eprintln!("INVARIANT FAILED: {f}");
    }
    let verdict = if failures.is_empty() { "ok" } else { "FAILED" };
    println!(
        "RESULT users={users} calls={calls} throughput_per_s={throughput:.0} p50_us={p50} p99_us={p99} max_us={max} peak_rss_mib={peak_mib:.0} bytes_per_idle_dispatcher={per_dispatcher:.0} invariants={verdict}"
    );
    if !failures.is_empty() {
        std::process::exit(1);
    }
}
