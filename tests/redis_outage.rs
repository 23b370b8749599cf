//! Redis failing under running calls, with the engine and the run log wired as a chat
//! server wires them (an engine on Redis, a `RunLog::redis`, a dispatcher writing to a
//! run, readers following it on two nodes): a `redis-server` killed (`SIGKILL`) or
//! frozen (`SIGSTOP`, like a server stuck in a long command or a partition). Nothing
//! may be silent: every follower is told to resync, a new call gets its answer, a
//! resume is refused, each within the bound `docs/several-nodes.md` states, and the
//! nodes recover by themselves.
#![cfg(feature = "redis")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::redis_server::{PATIENCE, RedisServer, Relay, eventually, resumed, take};
use common::*;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tool_dispatch::event::Status;
use tool_dispatch::redis::{OnUnreachable, Redis, RedisConfig};
use tool_dispatch::*;

/// The Redis timeout the nodes are configured with.
const TIMEOUT: Duration = Duration::from_millis(250);
/// How long the nodes' reader blocks on Redis at a time (`docs/several-nodes.md`).
const BLOCK: Duration = Duration::from_millis(500);
/// The stated bounds are met on an idle machine; this margin keeps a shared, loaded
/// one from failing them spuriously, while the silence these tests guard against
/// (seconds, or for ever) still fails.
const MARGIN: u32 = 3;

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `SIGKILL`: the sockets close, Redis comes back empty.
    Kill,
    /// `SIGSTOP`: the sockets stay open and nothing answers; Redis comes back as it was.
    Freeze,
}

/// One node: an engine whose users' rate and slots live in Redis, and a run log on it.
struct Node {
    redis: Redis,
    engine: Engine,
    log: RunLog,
    gate: Arc<Semaphore>,
    started: mpsc::UnboundedReceiver<String>,
    /// How many times `count` ran on this node.
    runs: Arc<AtomicUsize>,
}

async fn node(server: &RedisServer, prefix: &str, policy: OnUnreachable) -> Node {
    let config = RedisConfig::default()
        .prefix(prefix)
        .timeout(TIMEOUT)
        .on_unreachable(policy);
    let redis = Redis::connect(&server.url(), config).await.unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, started) = mpsc::unbounded_channel();
    let runs = Arc::new(AtomicUsize::new(0));
    let registry = Registry::builder()
        .tool(hold(&gate, started_tx, ToolSettings::new()))
        .tool(counting("count", &runs, ToolSettings::new()))
        .build()
        .unwrap();
    let limits = Limits::default().per_user(UserLimits {
        concurrency: 10,
        rate: Some(Rate::per_minute(10_000)),
    });
    let engine = Engine::builder(registry)
        .limits(limits)
        .redis(&redis)
        .build();
    let log = RunLog::redis(RunLogConfig::default(), &redis)
        .await
        .unwrap();
    Node {
        redis,
        engine,
        log,
        gate,
        started,
        runs,
    }
}

fn in_run(run: &str) -> UserContext {
    UserContext::builder("alice").run_id(run).build().unwrap()
}

/// A new turn as a session starts one: a writer for the run, a reader of what comes
/// next, a dispatcher writing to the run.
fn turn(node: &Node, run: &str) -> (RunReader, Dispatcher) {
    let writer = node.log.writer("alice", run);
    let reader = writer.subscribe();
    (
        reader,
        node.engine.dispatcher().sink(writer).user(in_run(run)),
    )
}

/// What `reader` says next, and how long it took to say it.
async fn told(reader: &mut RunReader) -> (Option<Result<Frame, Resync>>, Duration) {
    let t = Instant::now();
    let next = tokio::time::timeout(PATIENCE, reader.next())
        .await
        .expect("told within the hang guard, not silent");
    (next, t.elapsed())
}

async fn outage(fault: Fault, policy: OnUnreachable) {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let prefix = format!("outage-{fault:?}-{policy:?}");
    let mut a = node(&server, &prefix, policy).await;
    let b = node(&server, &prefix, policy).await;
    // alice's run on A: a call running, followed on A (the turn that started it) and
    // on B (a tab that resumed there).
    let (mut on_a, d) = turn(&a, "r");
    let running = spawn(&d, ToolCall::new("hold", json!("held")));
    a.started.recv().await.unwrap();
    assert_eq!(body_type(&take(&mut on_a, 1).await[0]), "tool_executing");
    let mut on_b = resumed(&b.log, "alice", "r", 0).await;
    assert_eq!(take(&mut on_b, 1).await[0].seq, 1);

    match fault {
        Fault::Kill => server.stop(),
        Fault::Freeze => server.pause(),
    }
    // Nothing is written to the run: both followers are told all the same.
    let bound = (BLOCK + TIMEOUT) * MARGIN;
    for (reader, on) in [(&mut on_a, "A"), (&mut on_b, "B")] {
        let (next, took) = told(reader).await;
        assert_eq!(next, Some(Err(Resync::Truncated)), "the follower on {on}");
        assert!(took <= bound, "the follower on {on} told after {took:?}");
    }

    // A new turn on B during the outage: its call is answered, its follower told.
    let (mut follower, db) = turn(&b, "r2");
    let t = Instant::now();
    let answer = tokio::time::timeout(PATIENCE, db.dispatch(ToolCall::new("count", json!(1))))
        .await
        .expect("the call is answered");
    let took = t.elapsed();
    let err = answer.expect_err("nothing can be recorded, so nothing runs");
    assert!(
        matches!(err.status(), Status::Unavailable | Status::Undelivered),
        "{err:?}"
    );
    assert!(took <= TIMEOUT * 2 * MARGIN, "answered after {took:?}");
    assert_eq!(b.runs.load(Ordering::SeqCst), 0, "the call never ran");
    let (next, took) = told(&mut follower).await;
    assert_eq!(
        next,
        Some(Err(Resync::Truncated)),
        "the new turn's follower"
    );
    assert!(took <= bound, "the new turn's follower told after {took:?}");
    // A reconnecting tab asks to resume: refused, within the timeout.
    let t = Instant::now();
    let resumed_now = tokio::time::timeout(PATIENCE, b.log.resume("alice", "r", 1, None))
        .await
        .expect("the resume is answered");
    assert_eq!(resumed_now.unwrap_err(), Resync::Unavailable);
    assert!(t.elapsed() <= TIMEOUT * MARGIN, "{:?}", t.elapsed());

    // The call that was running still gives its caller the result.
    a.gate.add_permits(1);
    let out = tokio::time::timeout(PATIENCE, running)
        .await
        .expect("the held call ends")
        .unwrap();
    assert_eq!(out.unwrap().value, json!("held"));
    for n in [&a, &b] {
        let s = n.redis.stats();
        let seen = match fault {
            Fault::Kill => s.errors,
            Fault::Freeze => s.timeouts,
        };
        assert!(seen > 0 && s.last_error.is_some(), "{fault:?}: {s:?}");
    }
    // B's new call: refused by Redis's silence (fail closed), or decided by B's own
    // limits, without asking Redis when B already knew it was away.
    let s = b.redis.stats();
    let limited = match policy {
        OnUnreachable::UseLocalLimits => s.fallbacks,
        _ => s.failures,
    };
    assert!(s.log_failures >= 1 && limited >= 1, "{s:?}");

    // Redis back: both nodes record and run again by themselves.
    let _server = match fault {
        Fault::Kill => Some(RedisServer::start_on(server.port)),
        Fault::Freeze => {
            server.unpause();
            None
        }
    };
    let attempt = AtomicUsize::new(0);
    for n in [&a, &b] {
        eventually("a new turn runs and is recorded", || async {
            let run = format!("after-{}", attempt.fetch_add(1, Ordering::Relaxed));
            let (mut reader, d) = turn(n, &run);
            if d.dispatch(ToolCall::new("count", json!(2))).await.is_err() {
                return false;
            }
            let frames = tokio::time::timeout(PATIENCE, async {
                let mut kinds = Vec::new();
                while kinds.len() < 2 {
                    match reader.next().await {
                        Some(Ok(f)) => kinds.push(body_type(&f)),
                        _ => return None,
                    }
                }
                Some(kinds)
            });
            frames.await.ok().flatten()
                == Some(vec!["tool_executing".into(), "tool_completed".into()])
        })
        .await;
    }
    assert!(b.runs.load(Ordering::SeqCst) >= 1);
    for n in [&a, &b] {
        let s = n.redis.stats();
        assert!(s.last_error.is_none(), "{s:?}");
        assert!(s.round_trips > s.errors + s.timeouts, "{s:?}");
    }
    // A's reader had read through its own connection before Redis failed: it made
    // a new one since.
    let s = a.redis.stats();
    assert!(s.reconnects >= 1, "{s:?}");
}

fn body_type(frame: &Frame) -> String {
    let v: serde_json::Value = serde_json::from_str(&frame.json).unwrap();
    v["type"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn redis_killed_mid_call_fail_closed_nothing_is_silent() {
    outage(Fault::Kill, OnUnreachable::FailClosed).await;
}

#[tokio::test]
async fn redis_killed_mid_call_local_limits_nothing_is_silent() {
    outage(Fault::Kill, OnUnreachable::UseLocalLimits).await;
}

#[tokio::test]
async fn redis_frozen_mid_call_fail_closed_nothing_is_silent() {
    outage(Fault::Freeze, OnUnreachable::FailClosed).await;
}

#[tokio::test]
async fn redis_frozen_mid_call_local_limits_nothing_is_silent() {
    outage(Fault::Freeze, OnUnreachable::UseLocalLimits).await;
}

#[tokio::test]
async fn a_mute_signal_connection_is_noticed_and_cancellations_reach_the_other_node_again() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let connect = || {
        let config = RedisConfig::default().prefix("mute").timeout(TIMEOUT);
        Redis::connect(&url, config)
    };
    let (ra, rb) = (connect().await.unwrap(), connect().await.unwrap());
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let holding = |redis: &Redis, tx| {
        let registry = Registry::builder()
            .tool(hold(&gate, tx, ToolSettings::new()))
            .build()
            .unwrap();
        Engine::builder(registry)
            .limits(Limits::default().per_user(no_rate(10)))
            .redis(redis)
            .build()
    };
    let (a, b) = (holding(&ra, started_tx.clone()), holding(&rb, started_tx));
    // Frozen, its sockets open: nothing closes, nothing answers. A's listener asks
    // its connection, hears nothing, and subscribes anew once Redis thaws.
    server.pause();
    eventually("A's listener finds its connection mute", || async {
        ra.stats().timeouts >= 1
    })
    .await;
    server.unpause();
    eventually("A's listener subscribes anew", || async {
        ra.stats().reconnects >= 1
    })
    .await;
    let (d, _) = recorded(&a, user("alice"));
    let call = spawn(&d, ToolCall::new("hold", json!("x")));
    started.recv().await.unwrap();
    let report = b.cancel_user("alice");
    assert!(report.peers_told);
    let err = tokio::time::timeout(PATIENCE, call)
        .await
        .expect("the cancellation reached node A")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.status(), Status::Cancelled);
}

#[tokio::test]
async fn connecting_to_a_frozen_or_dead_redis_fails_within_the_bound() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let config = || RedisConfig::default().prefix("connect").timeout(TIMEOUT);
    let earlier = Redis::connect(&server.url(), config()).await.unwrap();
    for fault in [Fault::Freeze, Fault::Kill] {
        match fault {
            Fault::Freeze => server.pause(),
            Fault::Kill => server.stop(),
        }
        // The kernel still accepts connections for a frozen server: only the
        // handshake goes unanswered.
        let t = Instant::now();
        let err = tokio::time::timeout(PATIENCE, Redis::connect(&server.url(), config()))
            .await
            .expect("answered")
            .unwrap_err();
        assert!(matches!(err, redis::RedisError::Unreachable(_)), "{err}");
        assert!(
            t.elapsed() <= TIMEOUT * 4 * MARGIN,
            "{fault:?}: {:?}",
            t.elapsed()
        );
        let t = Instant::now();
        let log = tokio::time::timeout(PATIENCE, RunLog::redis(RunLogConfig::default(), &earlier))
            .await
            .expect("answered");
        assert!(log.is_err(), "{fault:?}");
        assert!(
            t.elapsed() <= TIMEOUT * MARGIN,
            "{fault:?}: {:?}",
            t.elapsed()
        );
    }
}

/// With `UseLocalLimits`, Redis away: the first call may wait for it (one timeout),
/// then Redis is skipped for a second at a time, one call asking it again after each
/// (`src/redis/circuit.rs`), so calls are decided here at local speed instead of
/// each paying the timeout; once Redis is back the calls ask it again.
async fn local_limits_pay_the_timeout_once_per_window(fault: Fault) {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let config = RedisConfig::default()
        .prefix(format!("circuit-{fault:?}"))
        .timeout(TIMEOUT)
        .on_unreachable(OnUnreachable::UseLocalLimits);
    let redis = Redis::connect(&server.url(), config).await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let registry = Registry::builder()
        .tool(counting("count", &runs, ToolSettings::new()))
        .build()
        .unwrap();
    let limits = Limits::default().per_user(UserLimits {
        concurrency: 10,
        rate: Some(Rate::per_minute(100_000)),
    });
    let engine = Engine::builder(registry)
        .limits(limits)
        .redis(&redis)
        .build();
    let (d, _) = recorded(&engine, user("alice"));
    assert!(d.dispatch(ToolCall::new("count", json!(0))).await.is_ok());
    match fault {
        Fault::Kill => server.stop(),
        Fault::Freeze => server.pause(),
    }
    let before = redis.stats();
    let start = Instant::now();
    let mut slow = 0;
    const CALLS: u32 = 100;
    for i in 0..CALLS {
        let t = Instant::now();
        let r = tokio::time::timeout(PATIENCE, d.dispatch(ToolCall::new("count", json!(i))))
            .await
            .expect("answered");
        assert!(r.is_ok(), "decided by the node's own limits: {r:?}");
        slow += u64::from(t.elapsed() >= TIMEOUT / 2);
        tokio::time::sleep(Duration::from_millis(20)).await; // calls spread over 2 s
    }
    let windows = start.elapsed().as_secs_f64() / 1.0; // the circuit's window is 1 s
    let s = redis.stats();
    let asked = s.failures - before.failures;
    assert_eq!(s.fallbacks - before.fallbacks, u64::from(CALLS), "{s:?}");
    // Redis asked at most once a window (and the first call), not once per call;
    // only the calls that asked waited.
    assert!(asked as f64 <= windows + 2.0, "asked {asked} times: {s:?}");
    assert!(slow <= asked, "{slow} slow calls, {asked} asked Redis");

    // Back: a call asks Redis again within a window, and from then on every call.
    let _server = match fault {
        Fault::Kill => Some(RedisServer::start_on(server.port)),
        Fault::Freeze => {
            server.unpause();
            None
        }
    };
    eventually("a call is admitted by Redis again", || async {
        let answers = redis.stats().answers;
        d.dispatch(ToolCall::new("count", json!(1))).await.is_ok()
            && redis.stats().answers > answers
    })
    .await;
    let (answers, fallbacks) = (redis.stats().answers, redis.stats().fallbacks);
    for i in 0..5 {
        assert!(d.dispatch(ToolCall::new("count", json!(i))).await.is_ok());
    }
    let s = redis.stats();
    assert_eq!(
        (s.answers - answers, s.fallbacks - fallbacks),
        (5, 0),
        "{s:?}"
    );
}

#[tokio::test]
async fn redis_frozen_local_limits_pay_the_timeout_once_per_window_not_once_per_call() {
    local_limits_pay_the_timeout_once_per_window(Fault::Freeze).await;
}

#[tokio::test]
async fn redis_killed_local_limits_pay_the_timeout_once_per_window_not_once_per_call() {
    local_limits_pay_the_timeout_once_per_window(Fault::Kill).await;
}

#[tokio::test]
async fn a_release_lost_to_a_partition_is_given_back_once_redis_answers_again() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let relay = Relay::start(server.port).await;
    let config = RedisConfig::default()
        .prefix("partition")
        .local_precheck(false)
        .timeout(TIMEOUT)
        .lease(Duration::from_secs(60));
    let redis = Redis::connect(&relay.url(), config)
        .await
        .expect("redis answers");
    let gate = Arc::new(Semaphore::new(0));
    let (started, mut started_rx) = mpsc::unbounded_channel();
    let g = gate.clone();
    let held = tool_fn("held", "Waits for its gate.", move |_: u64, _cx| {
        let (gate, started) = (g.clone(), started.clone());
        async move {
            let _ = started.send(());
            gate.acquire().await.map_err(ToolError::from)?.forget();
            Ok::<_, ToolError>(())
        }
    });
    let registry = Registry::builder()
        .tool(held)
        .tool(quick())
        .build()
        .unwrap();
    let engine = Engine::builder(registry)
        .limits(Limits::default().per_user(no_rate(5)))
        .redis(&redis)
        .build();
    let (alice, _) = recorded(&engine, user("alice"));
    let (bob, _) = recorded(&engine, user("bob"));
    let slots = "partition:u{alice}:slots";
    let call = spawn(&alice, ToolCall::new("held", json!(0)));
    tokio::time::timeout(PATIENCE, started_rx.recv())
        .await
        .expect("the call starts");
    assert_eq!(server.zcard(slots), 1);
    // The network between the node and Redis fails while the call runs: its end is
    // the node's own business, but its release cannot reach Redis.
    relay.cut();
    let before = redis.stats();
    gate.add_permits(1);
    let r = tokio::time::timeout(PATIENCE, call).await.expect("ended");
    assert!(r.unwrap().is_ok());
    eventually("the release is sent and lost", || async {
        let s = redis.stats();
        s.releases > before.releases && s.errors + s.timeouts > before.errors + before.timeouts
    })
    .await;
    assert_eq!(server.zcard(slots), 1, "the lease is still there (60 s)");
    // The network comes back: once Redis answers the node again (here, another
    // user's call, which carries nothing of alice's), the lease is given back, long
    // before it would have expired.
    relay.mend();
    eventually("Redis answers the node again", || async {
        bob.dispatch(ToolCall::new("quick", json!(1))).await.is_ok()
    })
    .await;
    eventually("the lost release is given back", || async {
        server.zcard(slots) == 0
    })
    .await;
    assert!(server.pttl(slots) == -2, "no key left");
}
