//! The result cache: hits skip the body and are marked, entries are per user unless
//! the tool is user-independent, expire at their TTL, are bounded, single-flight, and
//! a failing or abandoned leader does not poison its key.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tool_dispatch::event::ToolCompleted;
use tool_dispatch::event::{Event, Status};
use tool_dispatch::*;

mod common;
use common::{recorded, spawn, user};

fn no_rate(concurrency: usize) -> Limits {
    Limits::default().per_user(UserLimits {
        concurrency,
        rate: None,
    })
}

/// A cacheable tool whose result names the user who ran it; counts body runs.
fn lookup(
    name: &str,
    runs: &Arc<AtomicUsize>,
    settings: ToolSettings,
) -> impl tool_dispatch::IntoTool {
    let runs = Arc::clone(runs);
    tool_fn(
        name.to_owned(),
        "Looks something up.",
        move |q: Value, cx| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, SeqCst);
                Ok::<_, ToolError>(json!({ "q": q, "by": cx.user().user_id() }))
            }
        },
    )
    .settings(settings)
}

fn dispatcher(engine: &Engine, id: &str) -> (Dispatcher, RecordingSink) {
    recorded(engine, user(id))
}

/// A registry of the one tool `lookup`, with `settings`.
fn lookup_registry(runs: &Arc<AtomicUsize>, settings: ToolSettings) -> Registry {
    Registry::builder()
        .tool(lookup("lookup", runs, settings))
        .build()
        .unwrap()
}

/// Whether a successful call of `tool` with `input` was answered from the cache.
async fn is_cached(d: &Dispatcher, tool: &str, input: Value) -> bool {
    d.dispatch(ToolCall::new(tool, input)).await.unwrap().cached
}

/// Run beside a batch of identical calls: lets every call reach the cache, checks
/// the body has run exactly once, then lets that one body finish.
async fn release_after_one_run(runs: &AtomicUsize, gate: &Semaphore) {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(runs.load(SeqCst), 1);
    gate.add_permits(1);
}

fn completions(sink: &RecordingSink) -> Vec<ToolCompleted> {
    sink.events()
        .into_iter()
        .filter_map(|e| match e {
            Event::ToolCompleted(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn assert_paired(sink: &RecordingSink) {
    let evs = sink.events();
    assert_eq!(evs.len() % 2, 0, "{evs:?}");
    for pair in evs.chunks(2) {
        assert_eq!(pair[0].kind(), "tool_executing");
        assert_eq!(pair[1].kind(), "tool_completed");
        assert_eq!(pair[0].call_id(), pair[1].call_id());
    }
}

#[tokio::test(start_paused = true)]
async fn a_hit_returns_the_same_value_without_running_the_body() {
    let runs = Arc::new(AtomicUsize::new(0));
    let ttl = ToolSettings::new().cache(Duration::from_secs(60));
    let reg = lookup_registry(&runs, ttl);
    let engine = Engine::builder(reg).build();
    let (d, sink) = dispatcher(&engine, "alice");

    let first = d
        .dispatch(ToolCall::new("lookup", json!({"city": "Paris"})))
        .await
        .unwrap();
    let second = d
        .dispatch(ToolCall::new("lookup", json!({"city": "Paris"})))
        .await
        .unwrap();
    assert_eq!(runs.load(SeqCst), 1);
    assert_eq!(first.value, second.value);
    assert_eq!(second.value, json!({"q": {"city": "Paris"}, "by": "alice"}));
    assert!(!first.cached && second.cached);
    assert_ne!(first.call_id, second.call_id);

    // Both calls have their pair of events; the hit's completion says so.
    assert_paired(&sink);
    let done = completions(&sink);
    assert_eq!(done.len(), 2);
    assert!(!done[0].cached && done[1].cached);
    assert_eq!(done[1].status, Status::Success);
    assert_eq!(done[1].result, second.value);
    let wire = serde_json::to_value(Event::ToolCompleted(done[1].clone())).unwrap();
    assert_eq!(wire["cached"], json!(true));

    // Other arguments are another entry; key order inside the arguments is not.
    d.dispatch(ToolCall::new("lookup", json!({"city": "Rome"})))
        .await
        .unwrap();
    assert_eq!(runs.load(SeqCst), 2);
    let a = d
        .dispatch(ToolCall::new("lookup", json!({"a": 1, "b": 2})))
        .await
        .unwrap();
    let b = d
        .dispatch(ToolCall::from_text("lookup", r#"{"b": 2, "a": 1}"#))
        .await
        .unwrap();
    assert!(!a.cached && b.cached);
    assert_eq!(runs.load(SeqCst), 3);

    let m = engine.metrics();
    assert_eq!((m.cache_hits, m.cache_misses), (2, 3));
    assert_eq!(m.count(Status::Success), 5);
    assert_eq!(m.tools[0].calls, 5);
    assert_eq!(m.cache_entries, 3);
}

#[tokio::test(start_paused = true)]
async fn entries_are_per_user_unless_the_tool_is_user_independent() {
    let runs = Arc::new(AtomicUsize::new(0));
    let shared_runs = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_secs(60);
    let reg = Registry::builder()
        .tool(lookup("mine", &runs, ToolSettings::new().cache(ttl)))
        .tool(lookup(
            "shared",
            &shared_runs,
            ToolSettings::new().cache(ttl).user_independent(),
        ))
        .build()
        .unwrap();
    let engine = Engine::builder(reg).build();
    let (alice, _) = dispatcher(&engine, "alice");
    let (bob, bob_sink) = dispatcher(&engine, "bob");

    let a = alice
        .dispatch(ToolCall::new("mine", json!("x")))
        .await
        .unwrap();
    let b = bob
        .dispatch(ToolCall::new("mine", json!("x")))
        .await
        .unwrap();
    assert_eq!(runs.load(SeqCst), 2, "bob must not get alice's entry");
    assert!(!b.cached);
    assert_eq!(a.value["by"], "alice");
    assert_eq!(b.value["by"], "bob");
    assert!(completions(&bob_sink).iter().all(|c| !c.cached));
    // Each user hits their own entry.
    let a2 = alice
        .dispatch(ToolCall::new("mine", json!("x")))
        .await
        .unwrap();
    let b2 = bob
        .dispatch(ToolCall::new("mine", json!("x")))
        .await
        .unwrap();
    assert!(a2.cached && b2.cached);
    assert_eq!(
        (a2.value["by"].as_str(), b2.value["by"].as_str()),
        (Some("alice"), Some("bob"))
    );
    assert_eq!(runs.load(SeqCst), 2);

    // A user-independent tool shares its entries.
    let a = alice
        .dispatch(ToolCall::new("shared", json!("x")))
        .await
        .unwrap();
    let b = bob
        .dispatch(ToolCall::new("shared", json!("x")))
        .await
        .unwrap();
    assert_eq!(shared_runs.load(SeqCst), 1);
    assert!(b.cached);
    assert_eq!(a.value, b.value);
}

#[tokio::test(start_paused = true)]
async fn entries_expire_at_their_ttl() {
    let runs = Arc::new(AtomicUsize::new(0));
    let settings = ToolSettings::new().cache(Duration::from_secs(10));
    let reg = lookup_registry(&runs, settings);
    let engine = Engine::builder(reg).build();
    let (d, _) = dispatcher(&engine, "alice");
    let call = || ToolCall::new("lookup", json!(1));

    assert!(!d.dispatch(call()).await.unwrap().cached);
    tokio::time::advance(Duration::from_millis(9_999)).await;
    assert!(d.dispatch(call()).await.unwrap().cached);
    assert_eq!(runs.load(SeqCst), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(
        !d.dispatch(call()).await.unwrap().cached,
        "expired at exactly the TTL"
    );
    assert_eq!(runs.load(SeqCst), 2);
    // The fresh result starts a new TTL.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(d.dispatch(call()).await.unwrap().cached);
    assert_eq!(runs.load(SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn fifty_concurrent_identical_calls_run_the_body_once() {
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let registry = || {
        let (r, g) = (Arc::clone(&runs), Arc::clone(&gate));
        let slow = tool_fn("slow", "Slow and idempotent.", move |q: u32, _cx| {
            let (runs, gate) = (Arc::clone(&r), Arc::clone(&g));
            async move {
                runs.fetch_add(1, SeqCst);
                gate.acquire().await.map_err(ToolError::from)?.forget();
                Ok::<_, ToolError>(q * 2)
            }
        })
        .settings(ToolSettings::new().cache(Duration::from_secs(60)));
        Registry::builder().tool(slow).build().unwrap()
    };
    // All 50 concurrent, then with the default per-user limit of 10 (40 queue for a
    // slot and then hit the stored entry).
    for limits in [no_rate(64), Limits::default()] {
        runs.store(0, SeqCst);
        let engine = Engine::builder(registry()).limits(limits).build();
        let (d, sink) = dispatcher(&engine, "alice");
        let calls = (0..50).map(|_| ToolCall::new("slow", json!(21)));
        let batch = d.dispatch_all(calls);
        let (results, ()) = tokio::join!(batch, release_after_one_run(&runs, &gate));
        assert_eq!(runs.load(SeqCst), 1, "the body ran once");
        assert_eq!(results.len(), 50);
        let outs: Vec<ToolOutput> = results.into_iter().map(Result::unwrap).collect();
        assert!(outs.iter().all(|o| o.value == json!(42)));
        assert_eq!(outs.iter().filter(|o| !o.cached).count(), 1);
        assert_paired_per_call(&sink, 50);
        let m = engine.metrics();
        assert_eq!((m.cache_hits, m.cache_misses), (49, 1));
        assert_eq!((m.total, m.active), (50, 0));
    }
}

fn assert_paired_per_call(sink: &RecordingSink, calls: usize) {
    let evs = sink.events();
    let mut ids: Vec<&str> = evs.iter().filter_map(Event::call_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), calls);
    for id in ids {
        let kinds: Vec<&str> = evs
            .iter()
            .filter(|e| e.call_id() == Some(id))
            .map(Event::kind)
            .collect();
        assert_eq!(kinds, ["tool_executing", "tool_completed"], "{id}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_cache_is_bounded_in_entries_and_bytes() {
    let runs = Arc::new(AtomicUsize::new(0));
    let settings = ToolSettings::new().cache(Duration::from_secs(600));
    let registry = || lookup_registry(&runs, settings.clone());
    let engine = Engine::builder(registry())
        .limits(no_rate(10))
        .cache(CacheConfig::default().max_entries(3))
        .build();
    let (d, _) = dispatcher(&engine, "alice");
    for i in 0..10 {
        d.dispatch(ToolCall::new("lookup", json!(i))).await.unwrap();
        assert!(engine.metrics().cache_entries <= 3);
    }
    assert_eq!(engine.metrics().cache_entries, 3);
    // The newest are kept, the oldest went first.
    assert!(is_cached(&d, "lookup", json!(9)).await);
    assert!(!is_cached(&d, "lookup", json!(0)).await);
    assert_eq!(runs.load(SeqCst), 11);

    // Bytes: each result is about 30 bytes of JSON; 70 bytes hold two of them.
    let one = serde_json::to_string(&json!({"q": 100, "by": "alice"}))
        .unwrap()
        .len();
    let engine = Engine::builder(registry())
        .limits(no_rate(10))
        .cache(CacheConfig::default().max_bytes(2 * one + 1))
        .build();
    let (d, _) = dispatcher(&engine, "alice");
    for i in 100..110 {
        d.dispatch(ToolCall::new("lookup", json!(i))).await.unwrap();
        assert!(engine.metrics().cache_entries <= 2);
    }
    assert!(is_cached(&d, "lookup", json!(109)).await);
    assert!(is_cached(&d, "lookup", json!(108)).await);
    assert!(!is_cached(&d, "lookup", json!(107)).await);
    // A result larger than the whole budget is returned but never stored.
    let big = json!("x".repeat(4 * one));
    assert!(!is_cached(&d, "lookup", big.clone()).await);
    assert!(!is_cached(&d, "lookup", big).await);
}

#[tokio::test(start_paused = true)]
async fn a_failing_leader_does_not_poison_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (r, g) = (Arc::clone(&runs), Arc::clone(&gate));
    // The first run fails after waiting on the gate; later runs succeed at once.
    let flaky = tool_fn("flaky", "Fails the first time.", move |q: u32, _cx| {
        let (runs, gate) = (Arc::clone(&r), Arc::clone(&g));
        async move {
            if runs.fetch_add(1, SeqCst) == 0 {
                gate.acquire().await.map_err(ToolError::from)?.forget();
                return Err(ToolError::retryable("upstream hiccup"));
            }
            Ok::<_, ToolError>(q + 1)
        }
    })
    .settings(ToolSettings::new().cache(Duration::from_secs(60)));
    let reg = Registry::builder().tool(flaky).build().unwrap();
    let engine = Engine::builder(reg).limits(no_rate(16)).build();
    let (d, sink) = dispatcher(&engine, "alice");

    // The leader fails while four identical calls wait on it: the error is neither
    // cached nor shared; one waiting call takes over and runs the body once more,
    // and the other three get its result.
    let batch = d.dispatch_all((0..5).map(|_| ToolCall::new("flaky", json!(1))));
    let (results, ()) = tokio::join!(batch, release_after_one_run(&runs, &gate));
    let err = results[0].as_ref().unwrap_err();
    assert_eq!(err.status(), Status::ToolFailed);
    assert!(err.is_retryable());
    for r in &results[1..] {
        assert_eq!(r.as_ref().unwrap().value, json!(2));
    }
    assert_eq!(runs.load(SeqCst), 2);
    let cached = results[1..]
        .iter()
        .filter(|r| r.as_ref().unwrap().cached)
        .count();
    assert_eq!(cached, 3);
    assert_paired_per_call(&sink, 5);
    let m = engine.metrics();
    assert_eq!((m.cache_hits, m.cache_misses), (3, 1));
    assert_eq!(
        (m.count(Status::ToolFailed), m.count(Status::Success)),
        (1, 4)
    );

    // Afterwards the key works normally: a hit.
    let before = runs.load(SeqCst);
    let out = d.dispatch(ToolCall::new("flaky", json!(1))).await.unwrap();
    assert!(out.cached);
    assert_eq!(runs.load(SeqCst), before);
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_or_timed_out_leader_does_not_poison_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (r, g) = (Arc::clone(&runs), Arc::clone(&gate));
    // The first two runs hang until the gate opens; later runs return at once.
    let hangs = tool_fn("hangs", "Hangs at first.", move |q: u32, _cx| {
        let (runs, gate) = (Arc::clone(&r), Arc::clone(&g));
        async move {
            if runs.fetch_add(1, SeqCst) < 2 {
                gate.acquire().await.map_err(ToolError::from)?.forget();
            }
            Ok::<_, ToolError>(q)
        }
    })
    .settings(
        ToolSettings::new()
            .cache(Duration::from_secs(60))
            .timeout(Duration::from_secs(1)),
    );
    let reg = Registry::builder().tool(hangs).build().unwrap();
    let engine = Engine::builder(reg).build();
    let (d, _) = dispatcher(&engine, "alice");

    // A leader whose caller goes away.
    let leader = spawn(&d, ToolCall::new("hangs", json!(7)));
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    assert_eq!(runs.load(SeqCst), 1);
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    // A leader that times out.
    let e = d
        .dispatch(ToolCall::new("hangs", json!(7)))
        .await
        .unwrap_err();
    assert!(matches!(e, DispatchError::Timeout { .. }), "{e:?}");
    assert_eq!(runs.load(SeqCst), 2);
    // Neither left the key stuck: the next call runs and fills it, then it hits.
    assert!(!is_cached(&d, "hangs", json!(7)).await);
    assert!(is_cached(&d, "hangs", json!(7)).await);
    assert_eq!(runs.load(SeqCst), 3);
    let m = engine.metrics();
    assert_eq!(m.count(Status::Cancelled) + m.count(Status::Timeout), 2);
    assert_eq!(m.active, 0);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
struct ForecastIn {
    city: String,
    days: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ForecastOut {
    city: String,
    temps: Vec<i32>,
}

struct Forecast(Arc<AtomicUsize>);

impl Tool for Forecast {
    const NAME: &'static str = "forecast";
    type Input = ForecastIn;
    type Output = ForecastOut;
    fn description(&self) -> &str {
        "Forecast for a city."
    }
    fn settings(&self) -> ToolSettings {
        ToolSettings::new().cache(Duration::from_secs(60))
    }
    async fn call(&self, input: ForecastIn, _cx: ToolContext) -> Result<ForecastOut, ToolError> {
        self.0.fetch_add(1, SeqCst);
        Ok(ForecastOut {
            city: input.city,
            temps: (0..i32::from(input.days)).collect(),
        })
    }
}

#[tokio::test(start_paused = true)]
async fn typed_calls_of_cacheable_tools_hit_and_come_back_typed() {
    let runs = Arc::new(AtomicUsize::new(0));
    let reg = Registry::builder()
        .tool(Forecast(Arc::clone(&runs)))
        .build()
        .unwrap();
    let engine = Engine::builder(reg).build();
    let (d, sink) = dispatcher(&engine, "alice");
    let input = || ForecastIn {
        city: "Oslo".into(),
        days: 3,
    };
    let first = d.call::<Forecast>(input()).await.unwrap();
    let second = d.call::<Forecast>(input()).await.unwrap();
    assert_eq!(runs.load(SeqCst), 1);
    assert!(!first.cached && second.cached);
    assert_eq!(first.value, second.value);
    assert_eq!(second.value.temps, vec![0, 1, 2]);
    // A by-name call with the same arguments shares the entry.
    let by_name = d
        .dispatch(ToolCall::new(
            "forecast",
            json!({"days": 3, "city": "Oslo"}),
        ))
        .await
        .unwrap();
    assert!(by_name.cached);
    assert_eq!(by_name.value, json!({"city": "Oslo", "temps": [0, 1, 2]}));
    assert_eq!(runs.load(SeqCst), 1);
    assert_paired(&sink);
    assert_eq!(completions(&sink).iter().filter(|c| c.cached).count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_huge_ttl_means_forever_not_a_panic() {
    let runs = Arc::new(AtomicUsize::new(0));
    let settings = ToolSettings::new()
        .cache(Duration::MAX)
        .max_concurrency(usize::MAX);
    let reg = lookup_registry(&runs, settings);
    let engine = Engine::builder(reg).build();
    let (d, _) = dispatcher(&engine, "alice");
    assert!(!is_cached(&d, "lookup", json!(1)).await);
    tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
    assert!(is_cached(&d, "lookup", json!(1)).await);
    assert_eq!(runs.load(SeqCst), 1);
}

/// A typed, cacheable tool whose output does not survive JSON: `NaN` becomes `null`,
/// and an asymmetric serde rename writes a field under a name it cannot read back.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Odd {
    #[serde(rename(serialize = "written", deserialize = "read"))]
    x: u8,
}

struct Lossy(Arc<AtomicUsize>);

impl Tool for Lossy {
    const NAME: &'static str = "lossy";
    type Input = u8;
    type Output = (f64, Option<Odd>);
    fn description(&self) -> &str {
        "Returns values JSON cannot carry back."
    }
    fn settings(&self) -> ToolSettings {
        ToolSettings::new().cache(Duration::from_secs(60))
    }
    async fn call(&self, kind: u8, _: ToolContext) -> Result<Self::Output, ToolError> {
        self.0.fetch_add(1, SeqCst);
        Ok(match kind {
            0 => (f64::NAN, None),
            1 => (f64::INFINITY, None),
            2 => (1.0, Some(Odd { x: 2 })),
            _ => (1.5, None),
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_result_that_does_not_round_trip_is_not_cached_and_never_fails_a_later_call() {
    let runs = Arc::new(AtomicUsize::new(0));
    let reg = Registry::builder()
        .tool(Lossy(Arc::clone(&runs)))
        .build()
        .unwrap();
    let engine = Engine::builder(reg).limits(no_rate(10)).build();
    let (d, sink) = dispatcher(&engine, "alice");
    for kind in [0u8, 1, 2] {
        for _ in 0..2 {
            let out = d.call::<Lossy>(kind).await.unwrap();
            assert!(!out.cached);
            match kind {
                0 => assert!(out.value.0.is_nan()),
                1 => assert!(out.value.0.is_infinite()),
                _ => assert_eq!(out.value.1, Some(Odd { x: 2 })),
            }
        }
    }
    assert_eq!(runs.load(SeqCst), 6, "each ran again rather than failing");
    // A value that does round-trip is cached as before.
    d.call::<Lossy>(3).await.unwrap();
    assert!(d.call::<Lossy>(3).await.unwrap().cached);
    let m = engine.metrics();
    assert_eq!(m.cache_skipped, 6);
    assert_eq!((m.count(Status::Success), m.cache_hits), (8, 1));
    assert_paired(&sink);
}

#[tokio::test(start_paused = true)]
async fn followers_of_a_leader_whose_result_cannot_be_cached_run_the_tool_themselves() {
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    struct Slow(Arc<AtomicUsize>, Arc<Semaphore>);
    impl Tool for Slow {
        const NAME: &'static str = "slow_nan";
        type Input = u8;
        type Output = f64;
        fn description(&self) -> &str {
            "NaN, slowly."
        }
        fn settings(&self) -> ToolSettings {
            ToolSettings::new().cache(Duration::from_secs(60))
        }
        async fn call(&self, _: u8, _: ToolContext) -> Result<f64, ToolError> {
            self.0.fetch_add(1, SeqCst);
            self.1.acquire().await.map_err(ToolError::from)?.forget();
            Ok(f64::NAN)
        }
    }
    let reg = Registry::builder()
        .tool(Slow(Arc::clone(&runs), Arc::clone(&gate)))
        .build()
        .unwrap();
    let engine = Engine::builder(reg).limits(no_rate(10)).build();
    let (d, _) = dispatcher(&engine, "alice");
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let d = d.clone();
            tokio::spawn(async move { d.call::<Slow>(1).await })
        })
        .collect();
    common::settle().await;
    assert_eq!(runs.load(SeqCst), 1, "one leader, two followers");
    gate.add_permits(3);
    for c in calls {
        assert!(c.await.unwrap().unwrap().value.is_nan());
    }
    assert!(
        runs.load(SeqCst) >= 2,
        "a follower took over instead of failing"
    );
    assert_eq!(engine.metrics().count(Status::Success), 3);
}
