//! Metrics stay consistent under a large mixed load (limits, cache hits,
//! cancellations, timeouts, errors), and each call gets one tracing span with the
//! OpenTelemetry GenAI field names.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::user;
use serde_json::{Value, json};
use tool_dispatch::event::{Event, Status};
use tool_dispatch::*;

/// The tests of this file run one at a time: tracing caches, per call site, whether
/// any subscriber is interested, and a call site first reached on another thread
/// while the capturing subscriber is being installed can miss it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const USERS: usize = 20;
const CALLS_PER_USER_PER_ROUND: usize = 10;
const ROUNDS: usize = 500;
const GLOBAL: usize = 70;
const TOTAL: usize = USERS * CALLS_PER_USER_PER_ROUND * ROUNDS;

fn mixed_engine() -> Engine {
    let ok = tool_fn("ok", "Returns its input.", |n: u64, _cx| async move {
        Ok::<_, ToolError>(n)
    });
    let fail = tool_fn("fail", "Always fails.", |_: u64, _cx| async move {
        Err::<u64, _>(ToolError::new("nope"))
    });
    let cached = tool_fn("cached", "Idempotent.", |n: u64, _cx| async move {
        Ok::<_, ToolError>(n * 2)
    })
    .settings(ToolSettings::new().cache(Duration::from_secs(3600)));
    let slow = tool_fn("slow", "Runs past its timeout.", |_: u64, _cx| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, ToolError>(0u64)
    })
    .settings(ToolSettings::new().timeout(Duration::from_millis(5)));
    let hold = tool_fn("hold", "Runs until cancelled.", |_: u64, _cx| async move {
        std::future::pending::<()>().await;
        Ok::<_, ToolError>(0u64)
    })
    .settings(ToolSettings::new().timeout(Duration::from_secs(3600)));
    let reg = Registry::builder()
        .tool(ok)
        .tool(fail)
        .tool(cached)
        .tool(slow)
        .tool(hold)
        .build()
        .unwrap();
    let limits = Limits::default()
        .global(GLOBAL)
        .max_wait(Duration::from_millis(1))
        .per_user_with(|ctx: &UserContext| UserLimits {
            concurrency: 4,
            rate: (ctx.metadata("tier") == Some("limited"))
                .then(|| Rate::per_second(1000).burst(5)),
        });
    Engine::builder(reg).limits(limits).build()
}

/// One user's calls for one round. The first five end at their first poll (an
/// error, a cache lookup, plain calls, bad input or an unknown tool); then three
/// calls hold a slot until cancelled, one runs past its timeout, and the last finds
/// the user's four slots taken and ends busy (or global busy, for the last users).
fn round_calls(round: usize, u: usize) -> Vec<ToolCall> {
    let n = (round * USERS + u) as u64;
    let mut calls = vec![
        ToolCall::new("fail", json!(n)),
        ToolCall::new("cached", json!(n % 7)),
        ToolCall::new("ok", json!(n)),
        match round % 3 {
            0 => ToolCall::new("ok", json!("not a number")),
            1 => ToolCall::new("no_such_tool", json!(n)),
            _ => ToolCall::new("cached", json!(n % 7)),
        },
        ToolCall::new("ok", json!(n + 1)),
    ];
    calls.extend((0..3).map(|_| ToolCall::new("hold", json!(n))));
    calls.push(ToolCall::new("slow", json!(n)));
    calls.push(ToolCall::new("hold", json!(n)));
    assert_eq!(calls.len(), CALLS_PER_USER_PER_ROUND);
    calls
}

#[derive(Default)]
struct Seen {
    by_status: BTreeMap<&'static str, u64>,
    tool_calls: HashMap<String, (u64, u64)>,
    hits: u64,
    cacheable_successes: u64,
    events_by_status: BTreeMap<&'static str, u64>,
}

#[tokio::test(start_paused = true)]
async fn metrics_stay_consistent_after_100k_mixed_calls() {
    let _serial = SERIAL.lock().await;
    let engine = mixed_engine();
    let mut seen = Seen::default();
    let sinks: Vec<RecordingSink> = (0..USERS).map(|_| RecordingSink::new()).collect();
    let dispatchers: Vec<Dispatcher> = (0..USERS)
        .map(|u| {
            let mut ctx = UserContext::builder(format!("user{u}"));
            if u % 5 == 0 {
                ctx = ctx.metadata("tier", "limited");
            }
            engine
                .dispatcher()
                .sink(sinks[u].clone())
                .user(ctx.build().unwrap())
        })
        .collect();

    for round in 0..ROUNDS {
        let mut tasks = Vec::with_capacity(USERS);
        for (u, d) in dispatchers.iter().enumerate() {
            let calls = round_calls(round, u);
            let names: Vec<String> = calls.iter().map(|c| c.name.clone()).collect();
            let d = d.clone();
            tasks.push(tokio::spawn(
                async move { (names, d.dispatch_all(calls).await) },
            ));
        }
        // Let every call start or queue, then let the timeouts and slot waits run out,
        // then cancel everyone's held calls.
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        for step in [2, 8] {
            // First the slot waits (1 ms) end busy, then the timeouts (5 ms) fire.
            tokio::time::advance(Duration::from_millis(step)).await;
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
        }
        let mut cancelled = 0;
        for u in 0..USERS {
            cancelled += engine.cancel_user(&format!("user{u}")).here;
        }
        // Only held calls are left, never more than the global limit allows.
        assert!(
            cancelled > 0 && cancelled <= GLOBAL,
            "{cancelled} in flight"
        );
        for t in tasks {
            let (names, results) = t.await.unwrap();
            for (name, r) in names.into_iter().zip(results) {
                let status = match &r {
                    Ok(_) => Status::Success,
                    Err(e) => e.status(),
                };
                *seen.by_status.entry(status.as_str()).or_default() += 1;
                if status != Status::UnknownTool {
                    let t = seen.tool_calls.entry(name.clone()).or_default();
                    t.0 += 1;
                    t.1 += u64::from(status != Status::Success);
                }
                if let Ok(out) = &r {
                    seen.hits += u64::from(out.cached);
                    seen.cacheable_successes += u64::from(name == "cached");
                }
            }
        }
        assert_eq!(engine.active(), 0, "round {round}");
        // Every call of the round has exactly one pair of events.
        for sink in &sinks {
            let events = sink.take();
            let mut open: HashMap<String, usize> = HashMap::new();
            for e in &events {
                match e {
                    Event::ToolExecuting(x) => {
                        assert!(
                            open.insert(x.call_id.to_string(), 1).is_none(),
                            "duplicate call id"
                        );
                    }
                    Event::ToolCompleted(c) => {
                        let n = open
                            .get_mut(&*c.call_id)
                            .expect("completed after executing");
                        assert_eq!(*n, 1, "completed twice");
                        *n = 2;
                        *seen.events_by_status.entry(c.status.as_str()).or_default() += 1;
                    }
                    other => panic!("unexpected event {other:?}"),
                }
            }
            assert!(open.values().all(|n| *n == 2));
            assert_eq!(open.len(), CALLS_PER_USER_PER_ROUND);
        }
    }

    let m = engine.metrics();
    assert_eq!(m.total as usize, TOTAL);
    assert_eq!(m.by_status.values().sum::<u64>(), m.total);
    assert_eq!(m.active, 0);
    assert!(m.active_users.is_empty());
    // The counters are exactly what the callers saw, and what the sinks saw.
    let counted: BTreeMap<&str, u64> = m
        .by_status
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (*k, *n))
        .collect();
    assert_eq!(counted, seen.by_status);
    assert_eq!(seen.events_by_status, seen.by_status);
    for status in [
        Status::Success,
        Status::ToolFailed,
        Status::InvalidInput,
        Status::UnknownTool,
        Status::RateLimited,
        Status::Busy,
        Status::Timeout,
        Status::Cancelled,
    ] {
        assert!(
            m.count(status) > 0,
            "{status} never happened: {:?}",
            m.by_status
        );
    }
    // Per tool: calls and errors add up.
    for t in &m.tools {
        let (calls, errors) = seen.tool_calls.get(&t.name).copied().unwrap_or_default();
        assert_eq!((t.calls, t.errors), (calls, errors), "{}", t.name);
        if calls > 0 {
            assert!(t.p50_ms.is_some() && t.p99_ms >= t.p50_ms);
        }
    }
    let per_tool: u64 = m.tools.iter().map(|t| t.calls).sum();
    assert_eq!(per_tool, m.total - m.count(Status::UnknownTool));
    // Cache: every successful call of the cacheable tool is a hit or a miss.
    assert_eq!(m.cache_hits, seen.hits);
    assert!(m.cache_hits > 0);
    assert_eq!(m.cache_hits + m.cache_misses, seen.cacheable_successes);
    assert_eq!(m.sink_failures, 0);
    assert_eq!(m.tracked_users, USERS);
    // The snapshot serializes.
    let json = serde_json::to_value(&m).unwrap();
    assert_eq!(json["total"], json!(TOTAL));
}

#[tokio::test(start_paused = true)]
async fn active_users_are_listed_while_their_calls_run() {
    let _serial = SERIAL.lock().await;
    let engine = mixed_engine();
    let d = engine
        .dispatcher()
        .sink(RecordingSink::new())
        .user(user("alice"));
    let d2 = d.clone();
    let h = tokio::spawn(async move { d2.dispatch(ToolCall::new("hold", json!(1))).await });
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    let m = engine.metrics();
    assert_eq!(m.active, 1);
    assert_eq!(m.active_users.len(), 1);
    assert_eq!(
        (m.active_users[0].user_id.as_str(), m.active_users[0].active),
        ("alice", 1)
    );
    engine.cancel_user("alice");
    assert!(h.await.unwrap().is_err());
    let m = engine.metrics();
    assert!(m.active_users.is_empty());
    assert_eq!((m.active, m.total, m.count(Status::Cancelled)), (0, 1, 1));
}

// ---------------------------------------------------------------------------------
// Tracing.
// ---------------------------------------------------------------------------------

mod capture {
    use super::*;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing_subscriber::layer::{Context, Layer};

    /// A closed span: its name and every field recorded on it.
    #[derive(Debug, Clone)]
    pub(super) struct Closed {
        pub(super) name: &'static str,
        pub(super) fields: BTreeMap<String, Value>,
    }

    /// Captures every span's fields and hands them over when the span closes.
    #[derive(Default, Clone)]
    pub(super) struct Capture {
        open: Arc<Mutex<HashMap<Id, Closed>>>,
        pub(super) closed: Arc<Mutex<Vec<Closed>>>,
    }

    struct Fields<'a>(&'a mut BTreeMap<String, Value>);

    impl Visit for Fields<'_> {
        fn record_f64(&mut self, f: &Field, v: f64) {
            self.0.insert(f.name().into(), json!(v));
        }
        fn record_i64(&mut self, f: &Field, v: i64) {
            self.0.insert(f.name().into(), json!(v));
        }
        fn record_u64(&mut self, f: &Field, v: u64) {
            self.0.insert(f.name().into(), json!(v));
        }
        fn record_str(&mut self, f: &Field, v: &str) {
            self.0.insert(f.name().into(), json!(v));
        }
        fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
            self.0.insert(f.name().into(), json!(format!("{v:?}")));
        }
    }

    impl<S: tracing::Subscriber> Layer<S> for Capture {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
            let mut span = Closed {
                name: attrs.metadata().name(),
                fields: BTreeMap::new(),
            };
            attrs.record(&mut Fields(&mut span.fields));
            self.open.lock().unwrap().insert(id.clone(), span);
        }
        fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
            if let Some(span) = self.open.lock().unwrap().get_mut(id) {
                values.record(&mut Fields(&mut span.fields));
            }
        }
        fn on_close(&self, id: Id, _: Context<'_, S>) {
            if let Some(span) = self.open.lock().unwrap().remove(&id) {
                self.closed.lock().unwrap().push(span);
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn each_call_gets_one_span_with_genai_fields_status_and_duration() {
    let _serial = SERIAL.lock().await;
    use tracing_subscriber::layer::SubscriberExt;
    let capture = capture::Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let engine = mixed_engine();
    let d = engine
        .dispatcher()
        .sink(RecordingSink::new())
        .user(user("alice"));
    d.dispatch(ToolCall::new("ok", json!(1)).with_id("c_ok"))
        .await
        .unwrap();
    d.dispatch(ToolCall::new("fail", json!(1)).with_id("c_err"))
        .await
        .unwrap_err();
    d.dispatch(ToolCall::new("slow", json!(1)).with_id("c_slow"))
        .await
        .unwrap_err();
    d.dispatch(ToolCall::new("nope", json!(1)).with_id("c_unknown"))
        .await
        .unwrap_err();
    // A typed-free generated id is recorded too.
    let generated = d
        .dispatch(ToolCall::new("ok", json!(2)))
        .await
        .unwrap()
        .call_id;

    let closed = capture.closed.lock().unwrap().clone();
    let spans: Vec<&capture::Closed> = closed.iter().filter(|s| s.name == "execute_tool").collect();
    assert_eq!(spans.len(), 5, "one span per call: {closed:?}");
    let by_id: HashMap<&str, &capture::Closed> = spans
        .iter()
        .map(|s| (s.fields["gen_ai.tool.call.id"].as_str().unwrap(), *s))
        .collect();
    let expect = [
        ("c_ok", "ok", "success"),
        ("c_err", "fail", "error"),
        ("c_slow", "slow", "timeout"),
        ("c_unknown", "nope", "unknown_tool"),
        (&*generated, "ok", "success"),
    ];
    for (id, tool, status) in expect {
        let f = &by_id[id].fields;
        assert_eq!(f["gen_ai.tool.name"], json!(tool), "{id}: {f:?}");
        assert_eq!(f["gen_ai.operation.name"], json!("execute_tool"));
        assert_eq!(f["user_id"], json!("alice"));
        assert_eq!(f["status"], json!(status), "{id}");
        assert!(f["duration_ms"].as_f64().is_some(), "{id}: {f:?}");
    }
    let slow_ms = by_id["c_slow"].fields["duration_ms"].as_f64().unwrap();
    assert!(
        slow_ms >= 5.0,
        "the timeout's duration is recorded: {slow_ms}"
    );
}
