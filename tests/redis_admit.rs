//! The one-script admission through a real `redis-server`: the user's rate, one of
//! the user's slots and, with a cluster-wide limit, one of the cluster's, taken in one
//! round trip. Attacked with races across two nodes at the limit, refusals of each
//! kind, an answer lost while Redis is frozen, and calls that must wait after their
//! admission (a full sink, a busy tool slot) while holding a cluster slot.
#![cfg(feature = "redis")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::redis_server::{PATIENCE, RedisServer, eventually};
use common::*;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tool_dispatch::event::Status;
use tool_dispatch::redis::{OnUnreachable, Redis, RedisConfig};
use tool_dispatch::*;

async fn connect(server: &RedisServer, config: RedisConfig) -> Redis {
    Redis::connect(&server.url(), config.timeout(Duration::from_millis(200)))
        .await
        .expect("redis answers")
}

/// A tool that counts the calls running it (and the most at once), says it started,
/// and waits for a permit of its gate.
struct Work {
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    started: mpsc::UnboundedSender<()>,
}

impl Work {
    fn new() -> (Work, mpsc::UnboundedReceiver<()>) {
        let (started, rx) = mpsc::unbounded_channel();
        let work = Work {
            running: Arc::default(),
            peak: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            started,
        };
        (work, rx)
    }

    fn tool(&self, settings: ToolSettings) -> impl IntoTool + use<> {
        let (running, peak) = (Arc::clone(&self.running), Arc::clone(&self.peak));
        let (gate, started) = (Arc::clone(&self.gate), self.started.clone());
        tool_fn("work", "Holds a slot.", move |_: u64, _cx| {
            let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
            let (gate, started) = (Arc::clone(&gate), started.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let _ = started.send(());
                gate.acquire().await.map_err(ToolError::from)?.forget();
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, ToolError>(())
            }
        })
        .settings(settings)
    }
}

fn node(redis: &Redis, tool: impl IntoTool, limits: UserLimits, max_wait: Duration) -> Engine {
    let registry = Registry::builder().tool(tool).build().unwrap();
    let limits = Limits::default().per_user(limits).max_wait(max_wait);
    Engine::builder(registry)
        .limits(limits)
        .redis(redis)
        .build()
}

async fn next_start(started: &mut mpsc::UnboundedReceiver<()>) {
    tokio::time::timeout(PATIENCE, started.recv())
        .await
        .expect("a call starts")
        .expect("the tool is alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_race_of_calls_on_two_nodes_never_has_more_than_the_limit_in_flight_nor_the_rate() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let config = || RedisConfig::default().prefix("race");
    let (ra, rb) = (
        connect(&server, config()).await,
        connect(&server, config()).await,
    );
    // At most 3 of alice's calls at once, 25 in all (the quota refills in hours).
    let limits = UserLimits {
        concurrency: 3,
        rate: Some(Rate::new(25, Duration::from_secs(3600))),
    };
    let (work, mut started) = Work::new();
    let wait = Duration::from_secs(60);
    let a = node(&ra, work.tool(ToolSettings::new()), limits, wait);
    let b = node(&rb, work.tool(ToolSettings::new()), limits, wait);
    let (on_a, sink_a) = recorded(&a, user("alice"));
    let (on_b, sink_b) = recorded(&b, user("alice"));
    let calls: Vec<_> = (0..80)
        .map(|i| {
            spawn(
                if i % 2 == 0 { &on_a } else { &on_b },
                ToolCall::new("work", json!(i)),
            )
        })
        .collect();
    // Three run; each time one ends, one more may start, never a fourth at once.
    for _ in 0..3 {
        next_start(&mut started).await;
    }
    for _ in 3..25 {
        work.gate.add_permits(1);
        next_start(&mut started).await;
    }
    work.gate.add_permits(3);
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for call in calls {
        let r = tokio::time::timeout(PATIENCE, call)
            .await
            .expect("answered")
            .unwrap();
        let status = match r {
            Ok(_) => "success".to_owned(),
            Err(e) => {
                if let DispatchError::RateLimited { retry_after } = e {
                    assert!(retry_after > Duration::from_secs(60), "{retry_after:?}");
                }
                e.status().as_str().to_owned()
            }
        };
        *outcomes.entry(status).or_default() += 1;
    }
    assert_eq!(
        work.peak.load(Ordering::SeqCst),
        3,
        "the most in flight at once"
    );
    assert!(started.try_recv().is_err(), "a 26th call ran");
    // Exactly the quota ran; every other call was refused by the rate (no call that
    // waited for a slot spent any, so none ends busy for want of one).
    let want = [("rate_limited".to_owned(), 55), ("success".to_owned(), 25)];
    assert_eq!(outcomes, want.into_iter().collect(), "{:?}", ra.stats());
    for sink in [sink_a, sink_b] {
        assert_paired(&sink.events());
    }
    no_leases_left(&server, "race:u{alice}:slots").await;
}

#[tokio::test]
async fn a_refused_rate_takes_no_slot_and_a_refused_slot_spends_no_rate() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // The local pre-check off: every question goes to Redis.
    let config = || {
        RedisConfig::default()
            .prefix("refusals")
            .local_precheck(false)
    };
    let (ra, rb) = (
        connect(&server, config()).await,
        connect(&server, config()).await,
    );
    let limits = UserLimits {
        concurrency: 1,
        rate: Some(Rate::new(2, Duration::from_secs(3600))),
    };
    let (work, mut started) = Work::new();
    let a = node(&ra, work.tool(ToolSettings::new()), limits, Duration::ZERO);
    let b = node(&rb, work.tool(ToolSettings::new()), limits, Duration::ZERO);
    let (on_a, _) = recorded(&a, user("alice"));
    let (on_b, sink_b) = recorded(&b, user("alice"));
    let slots = "refusals:u{alice}:slots";

    let first = spawn(&on_a, ToolCall::new("work", json!(1)));
    next_start(&mut started).await;
    assert_eq!(server.zcard(slots), 1);
    // Her one slot is held on A: on B, five calls find none and end busy.
    for i in 0..5 {
        let err = on_b
            .dispatch(ToolCall::new("work", json!(i)).with_id(format!("busy{i}")))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                DispatchError::Busy {
                    scope: LimitScope::User,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(completed(&sink_b, &format!("busy{i}")).status, Status::Busy);
    }
    work.gate.add_permits(1);
    assert!(first.await.unwrap().is_ok());
    no_leases_left(&server, slots).await;
    // None of them spent the rate: the quota's second call is still there.
    let second = spawn(&on_b, ToolCall::new("work", json!(2)));
    next_start(&mut started).await;
    // Now the rate is spent and the slot held: the rate answers first.
    let err = on_a
        .dispatch(ToolCall::new("work", json!(3)))
        .await
        .unwrap_err();
    assert!(matches!(err, DispatchError::RateLimited { .. }), "{err:?}");
    work.gate.add_permits(1);
    assert!(second.await.unwrap().is_ok());
    no_leases_left(&server, slots).await;
    // Over the rate with a free slot: refused without taking it, not even for a
    // moment (nothing to give back, no lease in Redis).
    let before = (ra.stats().releases, rb.stats().releases);
    for node in [&on_a, &on_b] {
        let err = node
            .dispatch(ToolCall::new("work", json!(4)))
            .await
            .unwrap_err();
        assert!(matches!(err, DispatchError::RateLimited { .. }), "{err:?}");
        assert!(!server.exists(slots), "a refused call left a lease");
    }
    assert_eq!((ra.stats().releases, rb.stats().releases), before);
    assert_eq!(work.running.load(Ordering::SeqCst), 0);
}

/// A call asks for its admission while Redis is frozen; Redis gets the request, and
/// runs it only after the caller gave up on the answer (or was dropped): the lease it
/// took then must not outlive that moment (the lease is 60 s; the test allows 10).
async fn an_answer_lost(policy: OnUnreachable, drop_the_call: bool) {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let prefix = format!("lost-{policy:?}-{drop_the_call}");
    let config = RedisConfig::default()
        .prefix(&prefix)
        .on_unreachable(policy)
        .local_precheck(false)
        .lease(Duration::from_secs(60));
    let redis = connect(&server, config).await;
    // One call each 36 s: the bucket's time to live says how many were counted.
    let limits = UserLimits {
        concurrency: 5,
        rate: Some(Rate::new(100, Duration::from_secs(3600))),
    };
    let registry = Registry::builder().tool(quick()).build().unwrap();
    let engine = Engine::builder(registry)
        .limits(Limits::default().per_user(limits))
        .redis(&redis)
        .build();
    let (d, sink) = recorded(&engine, user("alice"));
    assert!(d.dispatch(ToolCall::new("quick", json!(0))).await.is_ok());
    let slots = format!("{prefix}:u{{alice}}:slots");
    let rate = format!("{prefix}:u{{alice}}:rate");
    no_leases_left(&server, &slots).await;
    let one_call = server.pttl(&rate);
    assert!((1..=36_001).contains(&one_call), "{one_call}");

    server.pause();
    let sent = redis.stats().round_trips;
    let call = spawn(&d, ToolCall::new("quick", json!(1)).with_id("lost"));
    if drop_the_call {
        eventually("the admission is sent", || async {
            redis.stats().round_trips > sent
        })
        .await;
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
    } else {
        let r = tokio::time::timeout(PATIENCE, call)
            .await
            .expect("answered")
            .unwrap();
        match policy {
            OnUnreachable::FailClosed => {
                assert_eq!(r.unwrap_err().status(), Status::Unavailable);
            }
            _ => assert!(r.is_ok(), "decided by the node's own limits: {r:?}"),
        }
    }
    assert_eq!(completed(&sink, "lost").call_id.as_ref(), "lost");
    server.unpause();
    // Redis runs the admission it held: the call is counted (an answer lost may
    // spend one call of the rate) and a lease taken, with nobody to hold it...
    eventually("Redis runs the admission it held", || async {
        server.pttl(&rate) > 40_000
    })
    .await;
    // ...which the node gives back.
    no_leases_left(&server, &slots).await;
    assert!(redis.stats().releases >= 2, "{:?}", redis.stats());
}

#[tokio::test]
async fn an_answer_lost_to_a_frozen_redis_leaves_no_lease_fail_closed() {
    an_answer_lost(OnUnreachable::FailClosed, false).await;
}

#[tokio::test]
async fn an_answer_lost_to_a_frozen_redis_leaves_no_lease_local_limits() {
    an_answer_lost(OnUnreachable::UseLocalLimits, false).await;
}

#[tokio::test]
async fn a_call_dropped_while_redis_holds_its_admission_leaves_no_lease() {
    an_answer_lost(OnUnreachable::FailClosed, true).await;
}

/// Waits until the sorted set `key` holds no lease: releases are sent without the
/// call waiting for them.
async fn no_leases_left(server: &RedisServer, key: &str) {
    eventually(&format!("every lease of {key} removed"), || async {
        server.zcard(key) == 0
    })
    .await;
}

#[tokio::test]
async fn with_a_cluster_limit_one_round_trip_admits_and_the_cluster_slot_is_not_held_while_waiting()
{
    let Some(server) = RedisServer::start() else {
        return;
    };
    let config = RedisConfig::default()
        .prefix("reserve")
        .cluster_concurrency(5);
    let redis = connect(&server, config).await;
    let (work, mut started) = Work::new();
    // `work` runs one call at a time on this node.
    let registry = Registry::builder()
        .tool(work.tool(ToolSettings::new().max_concurrency(1)))
        .build()
        .unwrap();
    let limits = Limits::default()
        .per_user(no_rate(5))
        .max_wait(Duration::from_secs(60));
    // A stuck socket holds a call for a minute (longer than the test waits).
    let engine = Engine::builder(registry)
        .limits(limits)
        .delivery_timeout(Duration::from_secs(60))
        .redis(&redis)
        .build();
    let cluster = "reserve:global:slots";

    // bob's call: the user's slot and the cluster's, from one answer of Redis.
    let answers = redis.stats().answers;
    let (bob, _) = recorded(&engine, user("bob"));
    let bobs = spawn(&bob, ToolCall::new("work", json!(1)));
    next_start(&mut started).await;
    assert_eq!(redis.stats().answers - answers, 1, "{:?}", redis.stats());
    assert_eq!(
        (server.zcard("reserve:u{bob}:slots"), server.zcard(cluster)),
        (1, 1)
    );

    // carol's: admitted with a cluster slot, but `work`'s one slot is bob's: she
    // gives the cluster slot back while she waits for it.
    let (carol, _) = recorded(&engine, user("carol"));
    let carols = spawn(&carol, ToolCall::new("work", json!(2)));
    eventually("carol is admitted", || async {
        server.zcard("reserve:u{carol}:slots") == 1
    })
    .await;
    eventually("carol holds no cluster slot while she waits", || async {
        server.zcard(cluster) == 1
    })
    .await;
    work.gate.add_permits(1);
    assert!(bobs.await.unwrap().is_ok());
    next_start(&mut started).await; // carol runs, with a cluster slot asked anew
    assert_eq!(server.zcard(cluster), 1);
    work.gate.add_permits(1);
    assert!(carols.await.unwrap().is_ok());
    no_leases_left(&server, cluster).await;

    // dave's socket is stuck: admitted, he waits on it without a cluster slot.
    let dave = engine.dispatcher().sink(StuckSink).user(user("dave"));
    let daves = spawn(&dave, ToolCall::new("work", json!(3)));
    eventually("dave is admitted", || async {
        server.zcard("reserve:u{dave}:slots") == 1
    })
    .await;
    no_leases_left(&server, cluster).await;
    assert_eq!(engine.cancel_user("dave").here, 1);
    let ended = tokio::time::timeout(PATIENCE, daves).await.expect("ended");
    assert!(ended.unwrap().is_err());
    no_leases_left(&server, "reserve:u{dave}:slots").await;
    assert_eq!(work.running.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_lease_redis_did_not_take_back_is_given_back_once_it_answers_again() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let config = RedisConfig::default()
        .prefix("unreleased")
        .lease(Duration::from_secs(60));
    let redis = connect(&server, config).await;
    let registry = Registry::builder().tool(quick()).build().unwrap();
    let engine = Engine::builder(registry)
        .limits(Limits::default().per_user(no_rate(5)))
        .redis(&redis)
        .build();
    let (d, _) = recorded(&engine, user("alice"));
    let slots = "unreleased:u{alice}:slots";
    // Redis refuses to give leases back (as if it could not be reached for that).
    assert_eq!(server.command("ACL SETUSER default -zrem"), "+OK");
    assert!(d.dispatch(ToolCall::new("quick", json!(1))).await.is_ok());
    eventually("the give-back is refused", || async {
        redis.stats().errors >= 1
    })
    .await;
    assert_eq!(server.zcard(slots), 1, "the lease is still there (60 s)");
    // Redis takes them back again: the next answer it gives (here to another
    // user's call) brings the kept lease back with it, long before it would expire.
    assert_eq!(server.command("ACL SETUSER default +zrem"), "+OK");
    let (bob, _) = recorded(&engine, user("bob"));
    assert!(bob.dispatch(ToolCall::new("quick", json!(2))).await.is_ok());
    no_leases_left(&server, slots).await;
    no_leases_left(&server, "unreleased:u{bob}:slots").await;
}

/// One user's calls back to back on one node, with a cluster-wide limit or not: each
/// call's releases ride on the next admission.
async fn carried(cluster: bool) {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let prefix = format!("carried-{cluster}");
    let mut config = RedisConfig::default().prefix(&prefix).local_precheck(false);
    if cluster {
        config = config.cluster_concurrency(10);
    }
    let redis = connect(&server, config).await;
    let registry = Registry::builder().tool(quick()).build().unwrap();
    let limits = UserLimits {
        concurrency: 1,
        rate: Some(Rate::new(3, Duration::from_secs(3600))),
    };
    let engine = Engine::builder(registry)
        .limits(Limits::default().per_user(limits))
        .redis(&redis)
        .build();
    let (d, _) = recorded(&engine, user("alice"));
    // Back to back on one task: each call's release rides on the next admission, so
    // a user with one slot never waits for their own last call's release.
    let before = redis.stats();
    for i in 0..3 {
        let r = d.dispatch(ToolCall::new("quick", json!(i))).await;
        assert!(r.is_ok(), "call {i}: {r:?}");
    }
    // Refused by the rate: its admission still gives the last call's leases back.
    let err = d
        .dispatch(ToolCall::new("quick", json!(3)))
        .await
        .unwrap_err();
    assert!(matches!(err, DispatchError::RateLimited { .. }), "{err:?}");
    for key in ["u{alice}:slots", "global:slots"] {
        assert!(!server.exists(&format!("{prefix}:{key}")), "{key} left");
    }
    let s = redis.stats();
    assert_eq!(
        (s.answers - before.answers, s.releases - before.releases),
        (4, 0),
        "four admissions, no release of their own: {s:?}"
    );
}

#[tokio::test]
async fn the_next_admission_of_the_same_user_carries_the_leases_just_given_back() {
    carried(false).await;
}

#[tokio::test]
async fn the_next_admission_carries_the_cluster_leases_just_given_back_too() {
    carried(true).await;
}

#[tokio::test]
async fn many_held_leases_are_renewed_together_and_given_back_together() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // A 600 ms lease, renewed every 200 ms: held three leases long, every one of
    // 1,200 leases (12 users × 100, more than one renewal request holds) must be
    // renewed in time, by a few requests a turn rather than one a lease.
    let config = || RedisConfig::default().prefix("many").local_precheck(false);
    let lease = Duration::from_millis(600);
    // Admitting 1,200 calls at once on a loaded machine takes longer than the other
    // tests' 200 ms bound on one request.
    let patient = || config().lease(lease).timeout(Duration::from_secs(2));
    let (ra, rb) = (
        Redis::connect(&server.url(), patient()).await.unwrap(),
        Redis::connect(&server.url(), patient()).await.unwrap(),
    );
    let (work, mut started) = Work::new();
    let limits = no_rate(100);
    let registry = Registry::builder()
        .tool(work.tool(ToolSettings::new()))
        .build()
        .unwrap();
    let a = Engine::builder(registry)
        .limits(Limits::default().per_user(limits).global(2_000))
        .redis(&ra)
        .build();
    let b = node(&rb, work.tool(ToolSettings::new()), limits, Duration::ZERO);
    let users: Vec<String> = (0..12).map(|u| format!("u{u}")).collect();
    let mut calls = Vec::new();
    for id in &users {
        let (d, _) = recorded(&a, user(id));
        calls.extend((0..100).map(|i| spawn(&d, ToolCall::new("work", json!(i)))));
    }
    for _ in 0..1_200 {
        next_start(&mut started).await;
    }
    let held = ra.stats();
    tokio::time::sleep(lease * 3).await;
    let renewing = ra.stats().round_trips - held.round_trips;
    assert!(
        renewing <= 60,
        "{renewing} requests to renew 1,200 leases 9 times"
    );
    for id in &users {
        assert_eq!(server.zcard(&format!("many:u{{{id}}}:slots")), 100, "{id}");
        // Still unexpired: another node finds none of the user's slots free.
        let (other, _) = recorded(&b, user(id));
        let err = other
            .dispatch(ToolCall::new("work", json!(0)))
            .await
            .unwrap_err();
        assert!(matches!(err, DispatchError::Busy { .. }), "{id}: {err:?}");
    }
    assert_eq!(work.running.load(Ordering::SeqCst), 1_200);
    // They all end at once: their leases go back in a few requests.
    work.gate.add_permits(1_200);
    for call in calls {
        let r = tokio::time::timeout(PATIENCE, call).await.expect("ended");
        assert!(r.unwrap().is_ok());
    }
    for id in &users {
        no_leases_left(&server, &format!("many:u{{{id}}}:slots")).await;
    }
    let releases = ra.stats().releases - held.releases;
    assert!(
        releases <= 120,
        "{releases} requests gave 1,200 leases back"
    );
}

/// The runtime a node's calls ran on is shut down while a call holds its lease (a
/// test harness, a runtime per request): the handle goes on in a new runtime, the
/// lease the dropped call held is given back, and the leases taken there are renewed
/// and given back too (the tasks that do it were dropped with the first runtime,
/// possibly before they first ran).
#[test]
fn a_dropped_runtime_leaves_no_lease_behind_and_the_next_one_renews_and_gives_back() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let lease = Duration::from_millis(600);
    let config = || {
        RedisConfig::default()
            .prefix("dropped")
            .local_precheck(false)
            .lease(lease)
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let (work, mut started) = Work::new();
    let slots = "dropped:u{alice}:slots";
    let first = runtime();
    let (redis, engine) = first.block_on(async {
        let redis = connect(&server, config()).await;
        let registry = Registry::builder()
            .tool(work.tool(ToolSettings::new()))
            .tool(quick())
            .build()
            .unwrap();
        let engine = Engine::builder(registry)
            .limits(Limits::default().per_user(no_rate(1)).max_wait(PATIENCE))
            .redis(&redis)
            .build();
        (redis, engine)
    });
    let (d, _) = recorded(&engine, user("alice"));
    first.block_on(async {
        let _held = spawn(&d, ToolCall::new("work", json!(0)));
        next_start(&mut started).await;
    });
    assert_eq!(server.zcard(slots), 1);
    drop(first); // the call, its lease and the renewing task go with it
    runtime().block_on(async {
        let other = connect(&server, config()).await;
        let b = node(
            &other,
            work.tool(ToolSettings::new()),
            no_rate(1),
            Duration::ZERO,
        );
        // The handle's connection died with the first runtime; it connects again.
        // The first call there carries the dropped call's release.
        eventually("the handle answers again", || async {
            d.dispatch(ToolCall::new("quick", json!(1))).await.is_ok()
        })
        .await;
        let held = spawn(&d, ToolCall::new("work", json!(2)));
        next_start(&mut started).await;
        tokio::time::sleep(lease * 3).await;
        let (alice_on_b, _) = recorded(&b, user("alice"));
        let err = alice_on_b
            .dispatch(ToolCall::new("work", json!(3)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, DispatchError::Busy { .. }),
            "renewed: {err:?}"
        );
        assert_eq!(server.zcard(slots), 1);
        let before = redis.stats().releases;
        work.gate.add_permits(1);
        let r = tokio::time::timeout(PATIENCE, held).await.expect("ended");
        assert!(r.unwrap().is_ok());
        // No admission of alice's follows to carry it: the node's releasing task
        // gives it back (not the lease's expiry).
        eventually("the release is sent", || async {
            redis.stats().releases > before
        })
        .await;
        no_leases_left(&server, slots).await;
    });
}
