//! Concurrency limits (per user, global, per tool, per-user resolver), the per-user
//! rate limit, and forgetting the state of users who have gone away. Time is tokio's
//! paused clock: no real sleeps.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tool_dispatch::event::Status;
use tool_dispatch::*;

mod common;
use common::{Handle, completed, hold, no_rate, quick, recorded, settle, spawn, user};

/// A tool that reports when its body starts and then waits for a permit of `gate`.
/// Also `quick`, which returns at once.
fn registry(gate: &Arc<Semaphore>, started: mpsc::UnboundedSender<String>) -> Registry {
    let hold = hold(gate, started, ToolSettings::new());
    let g = Arc::clone(gate);
    let narrow = tool_fn("narrow", "One at a time.", move |_: (), _cx| {
        let g = Arc::clone(&g);
        async move {
            g.acquire().await.map_err(ToolError::from)?.forget();
            Ok::<_, ToolError>(())
        }
    })
    .settings(ToolSettings::new().max_concurrency(1));
    Registry::builder()
        .tool(hold)
        .tool(narrow)
        .tool(quick())
        .build()
        .expect("valid registry")
}

struct Fixture {
    engine: Engine,
    gate: Arc<Semaphore>,
    started: mpsc::UnboundedReceiver<String>,
}

fn fixture(limits: Limits) -> Fixture {
    let gate = Arc::new(Semaphore::new(0));
    let (tx, started) = mpsc::unbounded_channel();
    let engine = Engine::builder(registry(&gate, tx)).limits(limits).build();
    Fixture {
        engine,
        gate,
        started,
    }
}

impl Fixture {
    fn dispatcher(&self, ctx: UserContext) -> (Dispatcher, RecordingSink) {
        recorded(&self.engine, ctx)
    }

    /// Starts a `hold` call and waits until its body runs.
    async fn hold(&mut self, d: &Dispatcher, id: &str) -> Handle {
        let h = spawn(d, ToolCall::new("hold", json!(id)).with_id(id));
        assert_eq!(self.started.recv().await.as_deref(), Some(id));
        h
    }
}

#[tokio::test(start_paused = true)]
async fn per_user_limit_holds_exactly_and_other_users_run_at_once() {
    let max_wait = Duration::from_secs(2);
    let mut f = fixture(Limits::default().per_user(no_rate(3)).max_wait(max_wait));
    let (alice, alice_sink) = f.dispatcher(user("alice"));
    let (bob, bob_sink) = f.dispatcher(user("bob"));

    let mut held = Vec::new();
    for id in ["a1", "a2", "a3"] {
        held.push(f.hold(&alice, id).await);
    }
    // The fourth waits for a slot.
    let fourth = spawn(&alice, ToolCall::new("hold", json!("a4")).with_id("a4"));
    settle().await;
    assert!(!fourth.is_finished());
    assert_eq!(f.engine.active(), 4);
    assert!(f.started.try_recv().is_err(), "a4 must not have started");

    // Meanwhile bob is not held back at all: no time passes for his calls.
    let t0 = tokio::time::Instant::now();
    let out = bob
        .dispatch(ToolCall::new("quick", json!(5)).with_id("b1"))
        .await
        .unwrap();
    assert_eq!(out.value, json!(5));
    let b2 = f.hold(&bob, "b2").await;
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(completed(&bob_sink, "b1").status, Status::Success);

    // After max_wait the fourth ends busy, with its pair of events.
    let err = fourth.await.unwrap().unwrap_err();
    let DispatchError::Busy { scope, waited } = err else {
        panic!("expected Busy, got {err:?}")
    };
    assert_eq!(scope, LimitScope::User);
    assert!(
        waited >= max_wait && waited < max_wait + Duration::from_millis(5),
        "{waited:?}"
    );
    let done = completed(&alice_sink, "a4");
    assert_eq!(done.status, Status::Busy);
    assert_eq!(done.status.as_str(), "busy");
    assert!(done.error.is_some() && done.result.is_null());
    assert!(
        f.started.try_recv().is_err(),
        "a busy call never runs its body"
    );

    // A call that waits and gets a slot when one frees up succeeds.
    let fifth = spawn(&alice, ToolCall::new("quick", json!(9)).with_id("a5"));
    settle().await;
    assert!(!fifth.is_finished());
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!(!fifth.is_finished());
    f.gate.add_permits(1); // the semaphore is fair: a1, the oldest waiter, ends
    let out = fifth.await.unwrap().unwrap();
    assert_eq!(out.value, json!(9));
    assert_eq!(completed(&alice_sink, "a5").status, Status::Success);

    f.gate.add_permits(4);
    for h in held {
        h.await.unwrap().unwrap();
    }
    b2.await.unwrap().unwrap();
    let m = f.engine.metrics();
    assert_eq!(m.active, 0);
    assert_eq!(m.count(Status::Busy), 1);
    assert_eq!(m.count(Status::Success), 6); // a1..a3, a5, b1, b2
    assert_eq!(m.total, 7);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_call_is_admitted_in_the_freed_slot_only() {
    // Limit 1: with two calls queued behind the holder, freeing one slot admits one.
    let mut f = fixture(
        Limits::default()
            .per_user(no_rate(1))
            .max_wait(Duration::from_secs(1)),
    );
    let (alice, _sink) = f.dispatcher(user("alice"));
    let first = f.hold(&alice, "h1").await;
    let second = spawn(&alice, ToolCall::new("hold", json!("h2")).with_id("h2"));
    let third = spawn(&alice, ToolCall::new("hold", json!("h3")).with_id("h3"));
    settle().await;
    f.gate.add_permits(1);
    first.await.unwrap().unwrap();
    // Exactly one of the two waiting calls runs.
    let next = f.started.recv().await.unwrap();
    settle().await;
    assert!(f.started.try_recv().is_err());
    assert!(next == "h2" || next == "h3");
    // The other times out waiting (its wait counts from its own dispatch).
    tokio::time::advance(Duration::from_secs(1)).await;
    settle().await;
    let (waiting, running) = if next == "h2" {
        (third, second)
    } else {
        (second, third)
    };
    let e = waiting.await.unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            DispatchError::Busy {
                scope: LimitScope::User,
                ..
            }
        ),
        "{e:?}"
    );
    f.gate.add_permits(1);
    running.await.unwrap().unwrap();
    assert_eq!(f.engine.active(), 0);
}

#[tokio::test(start_paused = true)]
async fn global_limit_holds_across_users() {
    let limits = Limits::default()
        .global(2)
        .per_user(no_rate(10))
        .max_wait(Duration::from_millis(300));
    let mut f = fixture(limits);
    let (alice, _) = f.dispatcher(user("alice"));
    let (bob, _) = f.dispatcher(user("bob"));
    let (carol, carol_sink) = f.dispatcher(user("carol"));
    let a = f.hold(&alice, "a1").await;
    let b = f.hold(&bob, "b1").await;

    // Carol has none of her own calls running, yet the engine is full.
    let err = carol
        .dispatch(ToolCall::new("quick", json!(1)).with_id("c1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DispatchError::Busy { scope: LimitScope::Global, waited } if waited >= Duration::from_millis(300)),
        "{err:?}"
    );
    assert_eq!(completed(&carol_sink, "c1").status, Status::Busy);
    // Alice too: her own limit is far away, the global one is not.
    let err = alice
        .dispatch(ToolCall::new("quick", json!(1)))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        DispatchError::Busy {
            scope: LimitScope::Global,
            ..
        }
    ));

    // Once a slot frees up, carol runs.
    f.gate.add_permits(1);
    let waiting = spawn(&carol, ToolCall::new("quick", json!(2)).with_id("c2"));
    assert_eq!(waiting.await.unwrap().unwrap().value, json!(2));
    f.gate.add_permits(1);
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let m = f.engine.metrics();
    assert_eq!(
        (m.active, m.count(Status::Busy), m.count(Status::Success)),
        (0, 2, 3)
    );
}

#[tokio::test(start_paused = true)]
async fn per_tool_limit_holds_across_users_and_leaves_other_tools_alone() {
    let f = fixture(
        Limits::default()
            .per_user(no_rate(10))
            .max_wait(Duration::from_millis(100)),
    );
    let (alice, _) = f.dispatcher(user("alice"));
    let (bob, bob_sink) = f.dispatcher(user("bob"));
    let held = spawn(&alice, ToolCall::new("narrow", json!(null)));
    settle().await;
    let err = bob
        .dispatch(ToolCall::new("narrow", json!(null)).with_id("n2"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DispatchError::Busy {
                scope: LimitScope::Tool,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(completed(&bob_sink, "n2").status, Status::Busy);
    // Other tools are not affected by `narrow`'s limit.
    assert_eq!(
        bob.dispatch(ToolCall::new("quick", json!(3)))
            .await
            .unwrap()
            .value,
        json!(3)
    );
    f.gate.add_permits(1);
    held.await.unwrap().unwrap();
    // And the slot is back.
    let again = spawn(&bob, ToolCall::new("narrow", json!(null)));
    settle().await;
    f.gate.add_permits(1);
    again.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn per_user_limits_come_from_the_resolver() {
    let limits = Limits::default()
        .per_user_with(|ctx: &UserContext| match ctx.metadata("tier") {
            Some("pro") => no_rate(4),
            _ => no_rate(2),
        })
        .max_wait(Duration::from_millis(50));
    let mut f = fixture(limits);
    let pro = UserContext::builder("paula")
        .metadata("tier", "pro")
        .build()
        .unwrap();
    let (pro, _) = f.dispatcher(pro);
    let (free, _) = f.dispatcher(user("fred"));

    // Each user fills exactly the slots of their tier; one more call is busy.
    let mut held = Vec::new();
    let tiers: [(&Dispatcher, &[&str]); 2] =
        [(&pro, &["p1", "p2", "p3", "p4"]), (&free, &["f1", "f2"])];
    for (d, ids) in tiers {
        for id in ids {
            held.push(f.hold(d, id).await);
        }
        let e = d
            .dispatch(ToolCall::new("quick", json!(0)))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                DispatchError::Busy {
                    scope: LimitScope::User,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    f.gate.add_permits(held.len());
    for h in held {
        h.await.unwrap().unwrap();
    }
    assert_eq!(f.engine.metrics().count(Status::Busy), 2);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_allows_the_burst_then_refills_at_the_configured_rate() {
    let rate = Rate::per_second(10).burst(3); // one call per 100 ms, 3 at once
    let f = fixture(Limits::default().per_user(UserLimits {
        concurrency: 10,
        rate: Some(rate),
    }));
    let (alice, sink) = f.dispatcher(user("alice"));
    let (bob, _) = f.dispatcher(user("bob"));
    let call = |id: &str| ToolCall::new("quick", json!(1)).with_id(id);

    for i in 0..3 {
        alice.dispatch(call(&format!("burst{i}"))).await.unwrap();
    }
    let e = alice.dispatch(call("over")).await.unwrap_err();
    assert_eq!(
        e,
        DispatchError::RateLimited {
            retry_after: Duration::from_millis(100)
        }
    );
    assert_eq!(e.retry_after(), Some(Duration::from_millis(100)));
    assert!(e.is_retryable());
    let done = completed(&sink, "over");
    assert_eq!(done.status, Status::RateLimited);
    assert_eq!(done.status.as_str(), "rate_limited");

    // Another user has a bucket of their own.
    bob.dispatch(call("bob")).await.unwrap();

    // Halfway to the next token, the retry_after halves.
    tokio::time::advance(Duration::from_millis(40)).await;
    let e = alice.dispatch(call("early")).await.unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_millis(60)));
    // At retry_after, exactly one call is admitted.
    tokio::time::advance(Duration::from_millis(60)).await;
    alice.dispatch(call("refilled")).await.unwrap();
    assert_eq!(
        alice
            .dispatch(call("again"))
            .await
            .unwrap_err()
            .retry_after(),
        Some(Duration::from_millis(100))
    );

    // Sustained: one call per 100 ms for a second, no more.
    let mut admitted = 0;
    for step in 0..10 {
        tokio::time::advance(Duration::from_millis(100)).await;
        for j in 0..3 {
            if alice.dispatch(call(&format!("s{step}_{j}"))).await.is_ok() {
                admitted += 1;
            }
        }
    }
    assert_eq!(admitted, 10);

    // After a quiet period the whole burst is back, and no more than it.
    tokio::time::advance(Duration::from_secs(5)).await;
    let mut ok = 0;
    for j in 0..10 {
        if alice.dispatch(call(&format!("b{j}"))).await.is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 3);
    let m = f.engine.metrics();
    assert_eq!(m.count(Status::Success), 3 + 1 + 1 + 10 + 3);
    assert_eq!(m.count(Status::RateLimited), 1 + 1 + 1 + 20 + 7);
    assert_eq!(m.total, m.by_status.values().sum::<u64>());
}

#[tokio::test(start_paused = true)]
async fn default_rate_is_100_per_minute() {
    let f = fixture(Limits::default());
    let (alice, _) = f.dispatcher(user("alice"));
    for i in 0..100 {
        alice
            .dispatch(ToolCall::new("quick", json!(i)))
            .await
            .unwrap();
    }
    let e = alice
        .dispatch(ToolCall::new("quick", json!(0)))
        .await
        .unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_millis(600)));
    tokio::time::advance(Duration::from_millis(600)).await;
    alice
        .dispatch(ToolCall::new("quick", json!(0)))
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn reconnecting_does_not_reset_a_rate_limit() {
    let f = fixture(Limits::default().per_user(UserLimits {
        concurrency: 10,
        rate: Some(Rate::per_minute(60).burst(2)),
    }));
    {
        let (alice, _) = f.dispatcher(user("alice"));
        alice
            .dispatch(ToolCall::new("quick", json!(1)))
            .await
            .unwrap();
        alice
            .dispatch(ToolCall::new("quick", json!(1)))
            .await
            .unwrap();
    }
    // Alice's dispatcher is gone, but her bucket is not full: she is still tracked.
    assert_eq!(f.engine.sweep_idle_users(), 1);
    let (alice, _) = f.dispatcher(user("alice"));
    let e = alice
        .dispatch(ToolCall::new("quick", json!(1)))
        .await
        .unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
    drop(alice);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(f.engine.sweep_idle_users(), 0);
}

#[tokio::test(start_paused = true)]
async fn users_who_went_away_are_forgotten() {
    let f = fixture(Limits::default());
    // One user stays connected the whole time.
    let (stays, _) = f.dispatcher(user("stays"));
    stays
        .dispatch(ToolCall::new("quick", json!(0)))
        .await
        .unwrap();

    let come_and_go = |prefix: &'static str, n: usize| {
        let engine = f.engine.clone();
        async move {
            for i in 0..n {
                let d = engine
                    .dispatcher()
                    .sink(RecordingSink::with_capacity(2))
                    .user(user(&format!("{prefix}{i}")));
                d.dispatch(ToolCall::new("quick", json!(i))).await.unwrap();
            }
        }
    };
    come_and_go("first", 5_000).await;
    // Their buckets are not full yet (one call each, 600 ms per token): all kept.
    assert_eq!(f.engine.metrics().tracked_users, 5_001);
    assert_eq!(f.engine.sweep_idle_users(), 5_001);

    // Once their buckets have refilled, an explicit sweep forgets all but the
    // connected user.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(f.engine.sweep_idle_users(), 1);
    assert_eq!(f.engine.metrics().tracked_users, 1);

    // The automatic sweep: 5,000 more come and go, time passes, then 2,048 new
    // binds visit every shard once and drop everyone idle, without an explicit sweep.
    come_and_go("second", 5_000).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(f.engine.metrics().tracked_users, 5_001);
    come_and_go("third", 2_048).await;
    let tracked = f.engine.metrics().tracked_users;
    assert_eq!(tracked, 2_048 + 1, "the second wave should be gone");
    // The connected user was never dropped: still the same state (its rate counter).
    assert!(
        stays
            .dispatch(ToolCall::new("quick", json!(0)))
            .await
            .is_ok()
    );
}

#[tokio::test(start_paused = true)]
async fn extreme_limit_values_are_clamped_not_panics() {
    // "Unlimited" written as the largest values must not panic anywhere.
    let limits = Limits::default()
        .global(usize::MAX)
        .per_user(UserLimits {
            concurrency: usize::MAX,
            rate: Some(Rate::new(u32::MAX, Duration::from_nanos(1)).burst(u32::MAX)),
        })
        .max_wait(Duration::MAX);
    let mut f = fixture(limits);
    let (alice, _) = f.dispatcher(user("alice"));
    for i in 0..50 {
        assert_eq!(
            alice
                .dispatch(ToolCall::new("quick", json!(i)))
                .await
                .unwrap()
                .value,
            json!(i)
        );
    }
    let h = f.hold(&alice, "x").await;
    let waiting = spawn(&alice, ToolCall::new("narrow", json!(null)));
    let waiting2 = spawn(&alice, ToolCall::new("narrow", json!(null)));
    settle().await;
    f.gate.add_permits(3);
    h.await.unwrap().unwrap();
    waiting.await.unwrap().unwrap();
    waiting2.await.unwrap().unwrap();
    let health = f.engine.health().await;
    assert_eq!(health.status, HealthStatus::Healthy, "{health:?}");
    assert!(f.engine.shutdown(Duration::MAX).await.in_flight == 0);
}

#[tokio::test(start_paused = true)]
async fn a_huge_call_timeout_means_no_timeout_not_a_panic() {
    let f = fixture(Limits::default());
    let (alice, _) = f.dispatcher(user("alice"));
    let call = ToolCall::new("quick", json!(1)).with_timeout(Duration::MAX);
    assert_eq!(alice.dispatch(call).await.unwrap().value, json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_under_contention_on_a_multi_thread_runtime() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    // Tracks how many bodies run at once, per user and overall.
    let now = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let peak = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let (n2, p2) = (Arc::clone(&now), Arc::clone(&peak));
    let busy = tool_fn("busy", "Yields a while.", move |who: usize, _cx| {
        let (now, peak) = (Arc::clone(&n2), Arc::clone(&p2));
        async move {
            for slot in [who, 2] {
                let c = now[slot].fetch_add(1, SeqCst) + 1;
                peak[slot].fetch_max(c, SeqCst);
            }
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            for slot in [who, 2] {
                now[slot].fetch_sub(1, SeqCst);
            }
            Ok::<_, ToolError>(())
        }
    });
    let reg = Registry::builder().tool(busy).build().unwrap();
    let limits = Limits::default()
        .global(7)
        .per_user(no_rate(4))
        .max_wait(Duration::from_secs(3600));
    let engine = Engine::builder(reg).limits(limits).build();
    let mut tasks = Vec::new();
    for who in 0..2 {
        let d = engine
            .dispatcher()
            .sink(RecordingSink::new())
            .user(user(&format!("user{who}")));
        for _ in 0..200 {
            let d = d.clone();
            tasks.push(tokio::spawn(async move {
                d.dispatch(ToolCall::new("busy", json!(who))).await
            }));
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert!(
        peak[0].load(SeqCst) <= 4 && peak[1].load(SeqCst) <= 4,
        "{peak:?}"
    );
    assert!(peak[2].load(SeqCst) <= 7, "{peak:?}");
    let m = engine.metrics();
    assert_eq!((m.total, m.count(Status::Success), m.active), (400, 400, 0));
}

/// A policy that allows everything, asked asynchronously.
struct AllowLater;

impl Policy for AllowLater {
    fn check<'a>(&'a self, _: PolicyRequest<'a>) -> BoxFuture<'a, Result<Decision, PolicyError>> {
        Box::pin(async {
            tokio::task::yield_now().await;
            Ok(Decision::Allow)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_custom_policy_does_not_make_a_call_count_twice_against_the_rate() {
    for policy in [true, false] {
        let reg = Registry::builder().tool(quick()).build().unwrap();
        let limits = Limits::default().per_user(UserLimits {
            concurrency: 10,
            rate: Some(Rate::per_minute(3)),
        });
        let builder = Engine::builder(reg).limits(limits);
        let engine = if policy {
            builder.policy(AllowLater)
        } else {
            builder
        }
        .build();
        let (alice, _) = recorded(&engine, user("alice"));
        for i in 0..3 {
            let r = alice.dispatch(ToolCall::new("quick", json!(i))).await;
            assert!(
                r.is_ok(),
                "call {i} of the quota of 3 (custom policy: {policy}): {r:?}"
            );
        }
        let err = alice
            .dispatch(ToolCall::new("quick", json!(3)))
            .await
            .unwrap_err();
        assert_eq!(err.status(), Status::RateLimited);
        assert_eq!(
            err.retry_after(),
            Some(Duration::from_secs(20)),
            "one call's interval"
        );
    }
}
