//! Soak with faults: many calls across many users, with tool errors, timeouts,
//! panics, denials, rate limits, invalid input, unknown tools, dropped futures,
//! `cancel_user`, sinks closed mid-run, sinks that panic mid-run and sinks whose
//! `send` never completes. Afterwards every invariant holds: the
//! pairing of every call id on sinks that stayed open (with the status the caller
//! saw), no event on another user's sink, accounting, no call left active, tracked
//! users bounded, and peak memory bounded.
//!
//! `cargo test --release --test soak -- --ignored --nocapture` runs 1,000,000 calls
//! across 1,000 users (`SOAK_CALLS`, `SOAK_USERS` override); the non-ignored
//! `soak_short` runs 20,000 calls in a normal `cargo test`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Once};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tool_dispatch::event::{Event, Status};
use tool_dispatch::{
    Engine, Limits, Rate, Registry, ToolCall, ToolError, ToolSettings, UserContext, UserLimits,
    tool_fn,
};

const PANIC_TEXT: &str = "soak: deliberate panic";

/// Swallows only the deliberate panics of the `work` tool; every other panic is
/// reported by the previous hook as usual.
fn quiet_deliberate_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let p = info.payload();
            let msg = p
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| p.downcast_ref::<String>().map(String::as_str));
            if msg != Some(PANIC_TEXT) {
                previous(info);
            }
        }));
    });
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Ok,
    Fail,
    Panic,
    /// Never finishes by itself: ends by timeout, cancellation or a dropped future.
    Hang,
    /// Yields once, then succeeds.
    Yield,
    /// Waits for cancellation (or its timeout).
    AwaitCancel,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, schemars::JsonSchema)]
struct Job {
    kind: Kind,
    n: u64,
}

fn engine() -> Engine {
    let work = tool_fn("work", "Does what it is told.", |job: Job, cx| async move {
        match job.kind {
            Kind::Ok => Ok(job.n),
            Kind::Fail => Err(ToolError::new("asked to fail")),
            Kind::Panic => std::panic::panic_any(PANIC_TEXT),
            Kind::Hang => std::future::pending().await,
            Kind::Yield => {
                tokio::task::yield_now().await;
                Ok(job.n)
            }
            Kind::AwaitCancel => {
                cx.cancelled().await;
                Err(ToolError::new("saw the cancellation"))
            }
        }
    });
    let secret = tool_fn(
        "secret",
        "Needs the admin scope.",
        |n: u64, _cx| async move { Ok::<_, ToolError>(n) },
    )
    .settings(ToolSettings::new().scope("admin"));
    let reg = Registry::builder()
        .tool(work)
        .tool(secret)
        .build()
        .expect("registry");
    // Every tenth user has a tight rate; the others are not rate limited, so that
    // their thousand calls are not all refused.
    let limits = Limits::default()
        .global(10_000)
        .per_user_with(|u| UserLimits {
            concurrency: 4,
            rate: (u.metadata("tier") == Some("tight")).then(|| Rate::per_second(2_000).burst(4)),
        });
    // A stuck sink costs its user one delivery timeout; then its events fail at once.
    Engine::builder(reg)
        .limits(limits)
        .delivery_timeout(Duration::from_secs(1))
        .build()
}

/// How a user's sink misbehaves after its first `after` events.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// `try_send` and `send` panic.
    Panics,
    /// Always full, and `send` never completes.
    Stuck,
}

/// A user's bounded channel that turns faulty after `after` events.
struct Faulty {
    tx: mpsc::Sender<Event>,
    fault: Fault,
    after: usize,
    seen: AtomicUsize,
}

impl Faulty {
    fn broken(&self) -> bool {
        self.seen.fetch_add(1, Relaxed) >= self.after
    }
}

impl tool_dispatch::EventSink for Faulty {
    fn try_send(&self, e: Event) -> Result<(), tool_dispatch::TrySendError> {
        use tool_dispatch::TrySendError;
        if self.broken() {
            match self.fault {
                Fault::Panics => std::panic::panic_any(PANIC_TEXT),
                Fault::Stuck => return Err(TrySendError::Full(e)),
            }
        }
        self.tx.try_send(e).map_err(|e| match e {
            mpsc::error::TrySendError::Full(e) => TrySendError::Full(e),
            mpsc::error::TrySendError::Closed(e) => TrySendError::Closed(e),
        })
    }

    fn send(&self, e: Event) -> tool_dispatch::BoxFuture<'_, Result<(), tool_dispatch::SinkError>> {
        if self.broken() {
            match self.fault {
                Fault::Panics => std::panic::panic_any(PANIC_TEXT),
                Fault::Stuck => return Box::pin(std::future::pending()),
            }
        }
        Box::pin(async move {
            self.tx
                .send(e)
                .await
                .map_err(|_| tool_dispatch::SinkError::Closed)
        })
    }
}

/// Marks a call whose future the caller dropped.
const DROPPED: u8 = u8::MAX;

fn status_index(s: Status) -> u8 {
    Status::ALL.iter().position(|x| *x == s).unwrap_or(254) as u8
}

use common::Rng;

/// What one user's drainer found.
#[derive(Default)]
struct Drained {
    /// Per call index: 0 nothing, 1 executing seen, 2 + status index completed.
    state: Vec<u8>,
    foreign: usize,
    out_of_order: usize,
    closed_early: bool,
    /// The sink turned faulty: events stop, pairing is not checked.
    faulty: bool,
}

#[derive(Default)]
struct Report {
    calls: u64,
    checked_users: usize,
    closed_users: usize,
    faulty_users: usize,
    cancel_hits: usize,
}

fn vm_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn soak(total: usize, users: usize) -> Report {
    quiet_deliberate_panics();
    let engine = engine();
    let per_user = total.div_ceil(users);
    let stop = Arc::new(AtomicBool::new(false));
    let cancel_hits = Arc::new(AtomicUsize::new(0));

    // Cancels random users' in-flight calls until the run ends.
    let canceller = {
        let (engine, stop, hits) = (engine.clone(), stop.clone(), cancel_hits.clone());
        tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            while !stop.load(Relaxed) {
                let u = rng.next() as usize % users;
                hits.fetch_add(engine.cancel_user(&format!("soak-{u}")).here, Relaxed);
                for _ in 0..8 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };

    let mut tasks = Vec::with_capacity(users);
    for u in 0..users {
        let mut rng = Rng(0x1234_5678_9abc_def1 ^ ((u as u64 + 1) * 0x9e37_79b9));
        let close_after = (u % 13 == 0).then(|| (rng.next() % (per_user as u64 * 2)) as usize);
        let fault = match u % 17 {
            5 => Some(Fault::Panics),
            11 => Some(Fault::Stuck),
            _ => None,
        };
        let fault_after = (rng.next() % (per_user as u64 * 2)) as usize;
        let (tx, mut rx) = mpsc::channel::<Event>(16);
        let me = format!("soak-{u}");
        let drainer = {
            let me = me.clone();
            tokio::spawn(async move {
                let mut d = Drained {
                    faulty: fault.is_some(),
                    state: vec![0; per_user],
                    ..Drained::default()
                };
                let mut received = 0usize;
                while let Some(ev) = rx.recv().await {
                    received += 1;
                    let (id, user, completed) = match &ev {
                        Event::ToolExecuting(e) => (&e.call_id, &e.user_id, None),
                        Event::ToolCompleted(e) => (&e.call_id, &e.user_id, Some(e.status)),
                        _ => continue,
                    };
                    if **user != *me {
                        d.foreign += 1;
                        continue;
                    }
                    let i = id
                        .rsplit('-')
                        .next()
                        .and_then(|i| i.parse::<usize>().ok())
                        .filter(|i| *i < per_user);
                    let Some(i) = i else {
                        d.out_of_order += 1;
                        continue;
                    };
                    match (d.state[i], completed) {
                        (0, None) => d.state[i] = 1,
                        (1, Some(s)) => d.state[i] = 2 + status_index(s),
                        _ => d.out_of_order += 1,
                    }
                    if close_after.is_some_and(|n| received >= n) {
                        d.closed_early = true;
                        break; // drops the receiver: the user's socket went away
                    }
                }
                d
            })
        };
        let mut ctx = UserContext::builder(me.clone());
        if u % 7 == 0 {
            ctx = ctx.scope("admin");
        }
        if u % 10 == 0 {
            ctx = ctx.metadata("tier", "tight");
        }
        let ctx = ctx.build().expect("valid user");
        let d = match fault {
            None => engine.dispatcher().sink(tx).user(ctx),
            Some(fault) => engine
                .dispatcher()
                .sink(Faulty {
                    tx,
                    fault,
                    after: fault_after,
                    seen: AtomicUsize::new(0),
                })
                .user(ctx),
        };
        tasks.push(tokio::spawn(async move {
            // What the caller saw, per call: 2 + status index.
            let mut expected = vec![0u8; per_user];
            for (i, slot) in expected.iter_mut().enumerate() {
                let id = format!("{me}-{i}");
                let r = rng.next() % 100;
                let job = |kind: Kind| json!({ "kind": kind, "n": i });
                let call = match r {
                    0..=49 => ToolCall::new("work", job(Kind::Ok)),
                    50..=57 => ToolCall::new("work", job(Kind::Fail)),
                    58..=60 => ToolCall::new("work", job(Kind::Panic)),
                    61..=64 => ToolCall::new("work", job(Kind::Hang))
                        .with_timeout(Duration::from_millis(1)),
                    65..=69 => ToolCall::new("work", job(Kind::Yield)),
                    70..=73 => ToolCall::new("work", job(Kind::AwaitCancel))
                        .with_timeout(Duration::from_millis(2)),
                    74..=79 => ToolCall::new("secret", json!(i)),
                    80..=83 => ToolCall::new("work", json!({ "kind": "nonsense" })),
                    84..=86 => ToolCall::from_text("work", "{not json"),
                    87..=89 => ToolCall::new("no_such_tool", json!({})),
                    _ => {
                        // Polled once, then dropped by the caller.
                        let fut = d.dispatch(ToolCall::new("work", job(Kind::Hang)).with_id(id));
                        tokio::select! {
                            biased;
                            r = fut => *slot = 2 + status_index(match &r {
                                Ok(_) => Status::Success,
                                Err(e) => e.status(),
                            }),
                            _ = std::future::ready(()) => *slot = DROPPED,
                        }
                        continue;
                    }
                };
                let r = d.dispatch(call.with_id(id)).await;
                *slot = 2 + status_index(match &r {
                    Ok(_) => Status::Success,
                    Err(e) => e.status(),
                });
            }
            drop(d); // closes this user's sink once in-flight deliveries are done
            Done::Caller(expected)
        }));
        tasks.push(drainer_marker(drainer));
    }

    let mut report = Report::default();
    let mut failures = Vec::new();
    let mut it = tasks.into_iter();
    let mut u = 0usize;
    while let (Some(caller), Some(drainer)) = (it.next(), it.next()) {
        let expected = caller.await.expect("user task").expected();
        let drained = drainer.await.expect("drainer").drained();
        report.calls += expected.len() as u64;
        if drained.foreign > 0 {
            failures.push(format!("user {u}: {} foreign events", drained.foreign));
        }
        if drained.faulty {
            report.faulty_users += 1;
        } else if drained.closed_early {
            report.closed_users += 1;
        } else {
            report.checked_users += 1;
            if drained.out_of_order > 0 {
                failures.push(format!(
                    "user {u}: {} events out of order",
                    drained.out_of_order
                ));
            }
            for (i, (want, got)) in expected.iter().zip(&drained.state).enumerate() {
                // A dropped call ends cancelled, or with the status it had already
                // reached (e.g. rate_limited while its completion waited for room).
                let ok = if *want == DROPPED {
                    *got >= 2
                } else {
                    want == got
                };
                if !ok {
                    failures.push(format!(
                        "user {u} call {i}: caller saw {want}, events say {got} (0 none, 1 executing only)"
                    ));
                }
            }
        }
        u += 1;
    }
    stop.store(true, Relaxed);
    canceller.await.expect("canceller");
    report.cancel_hits = cancel_hits.load(Relaxed);

    let m = engine.metrics();
    let sum: u64 = m.by_status.values().sum();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert_eq!(m.total, sum, "total is the sum of statuses");
    assert_eq!(m.total, report.calls, "every call counted once");
    assert_eq!(m.active, 0, "no call left active");
    assert_eq!(engine.active(), 0);
    let tracked = engine.sweep_idle_users();
    assert!(
        tracked <= users,
        "{tracked} users tracked after {users} went away"
    );
    // Every fault really happened (a soak that silently did nothing fails here).
    for s in [
        Status::Success,
        Status::ToolFailed,
        Status::Panicked,
        Status::Timeout,
        Status::Denied,
        Status::RateLimited,
        Status::InvalidInput,
        Status::UnknownTool,
        Status::Cancelled,
    ] {
        assert!(m.count(s) > 0, "no call ended {s}: {:?}", m.by_status);
    }
    assert!(report.closed_users > 0 && report.checked_users > 0 && report.faulty_users > 0);
    assert!(
        m.count(Status::Undelivered) > 0,
        "the faulty sinks refused events"
    );
    let hwm_mib = vm_kib("VmHWM:") / 1024;
    println!(
        "soak: {} calls, {users} users ({} with pairing checked, {} sinks closed mid-run, {} sinks panicking or stuck), cancel_user hit {} calls, tracked users after sweep {tracked}, peak RSS {hwm_mib} MiB",
        report.calls,
        report.checked_users,
        report.closed_users,
        report.faulty_users,
        report.cancel_hits
    );
    println!(
        "soak: by status {:?}, sink failures {}",
        m.by_status, m.sink_failures
    );
    assert!(hwm_mib < 1024, "peak RSS {hwm_mib} MiB");
    report
}

// The caller and drainer tasks are kept in one Vec, alternating; these two helpers
// give them one type.
enum Done {
    Caller(Vec<u8>),
    Drainer(Drained),
}

impl Done {
    fn expected(self) -> Vec<u8> {
        match self {
            Done::Caller(v) => v,
            Done::Drainer(_) => unreachable!("tasks alternate caller, drainer"),
        }
    }
    fn drained(self) -> Drained {
        match self {
            Done::Drainer(d) => d,
            Done::Caller(_) => unreachable!("tasks alternate caller, drainer"),
        }
    }
}

fn drainer_marker(h: tokio::task::JoinHandle<Drained>) -> tokio::task::JoinHandle<Done> {
    tokio::spawn(async move { Done::Drainer(h.await.expect("drainer")) })
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_short() {
    let r = soak(20_000, 200).await;
    assert_eq!(r.calls, 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 1,000,000 calls; run with --ignored (SOAK_CALLS, SOAK_USERS)"]
async fn soak_full() {
    let calls = env_usize("SOAK_CALLS", 1_000_000);
    let users = env_usize("SOAK_USERS", 1_000);
    let r = soak(calls, users).await;
    assert_eq!(r.calls as usize, calls.div_ceil(users) * users);
}
