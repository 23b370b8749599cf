//! Isolation: many users on one engine, each with its own sink. Every event reaches
//! its own user's sink and no other; one user's stuck socket, cancellation or limits
//! never touch another user.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Barrier, Notify, mpsc};
use tokio::task::JoinHandle;
use tool_dispatch::event::{Event, Status};
use tool_dispatch::{
    CancelReason, DispatchError, Engine, LimitScope, Limits, RecordingSink, Registry, ToolCall,
    ToolError, UserContext, UserLimits, tool_fn,
};

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct WhoIn {
    n: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct WhoOut {
    user: String,
    call: String,
    n: u64,
}

/// `whoami` answers with the user and call it ran for, after yielding once so that
/// calls of different users interleave.
fn registry() -> Registry {
    let whoami = tool_fn("whoami", "Who am I?", |i: WhoIn, cx| async move {
        tokio::task::yield_now().await;
        Ok::<_, ToolError>(WhoOut {
            user: cx.user().user_id().to_owned(),
            call: cx.call_id().to_owned(),
            n: i.n,
        })
    });
    Registry::builder().tool(whoami).build().unwrap()
}

fn roomy_engine() -> Engine {
    let limits = Limits::default()
        .global(100_000)
        .per_user(UserLimits {
            concurrency: 10,
            rate: None,
        })
        .max_wait(Duration::from_secs(600));
    Engine::builder(registry()).limits(limits).build()
}

fn ctx(user: &str) -> UserContext {
    UserContext::builder(user)
        .thread_id(format!("thread_{user}"))
        .run_id(format!("run_{user}"))
        .build()
        .unwrap()
}

/// Where one user's events end up: a bounded mpsc drained by a task (the WebSocket
/// writer pattern), or a recording sink.
enum Collector {
    Mpsc(JoinHandle<Vec<Event>>),
    Recording(RecordingSink),
}

impl Collector {
    /// Builds the user's dispatcher on `engine` with a fresh sink of kind `i % 2`.
    fn bind(engine: &Engine, user: &str, i: usize) -> (tool_dispatch::Dispatcher, Collector) {
        let d = engine.dispatcher().user(ctx(user));
        if i.is_multiple_of(2) {
            // Small on purpose: the pipeline waits for room now and then.
            let (tx, mut rx) = mpsc::channel::<Event>(4);
            let drain = tokio::spawn(async move {
                let mut events = Vec::new();
                while let Some(e) = rx.recv().await {
                    events.push(e);
                }
                events
            });
            (d.sink(tx), Collector::Mpsc(drain))
        } else {
            let sink = RecordingSink::new();
            (d.sink(sink.clone()), Collector::Recording(sink))
        }
    }

    /// Every event, once the user's dispatcher is dropped.
    async fn events(self) -> Vec<Event> {
        match self {
            Collector::Mpsc(drain) => drain.await.unwrap(),
            Collector::Recording(sink) => sink.take(),
        }
    }
}

/// Checks one user's stream: exactly two events per call, executing before
/// completed, every event carrying this user's ids, and exactly `call_ids`.
#[track_caller]
fn check_stream(user: &str, events: &[Event], call_ids: &HashSet<String>) {
    assert_eq!(
        events.len(),
        2 * call_ids.len(),
        "{user}: two events per call"
    );
    let mut seen: HashMap<&str, Vec<&'static str>> = HashMap::new();
    for e in events {
        let json = serde_json::to_value(e).unwrap();
        assert_eq!(e.user_id(), user, "{user} got another user's event: {json}");
        assert_eq!(json["run_id"], json!(format!("run_{user}")), "{json}");
        assert_eq!(json["thread_id"], json!(format!("thread_{user}")), "{json}");
        let id = e.call_id().expect("tool events only");
        seen.entry(id).or_default().push(e.kind());
        if let Event::ToolCompleted(done) = e {
            assert_eq!(done.status, Status::Success, "{json}");
            assert_eq!(done.result["user"], json!(user), "{json}");
        }
    }
    let ids: HashSet<String> = seen.keys().map(|s| s.to_string()).collect();
    assert_eq!(&ids, call_ids, "{user}: the call ids are this user's own");
    for (id, kinds) in seen {
        assert_eq!(kinds, ["tool_executing", "tool_completed"], "{user} {id}");
    }
}

/// `users` users start together and each dispatches `calls` calls concurrently;
/// `ids` gives the model's call ids (or none, for generated ones). Returns every
/// call id seen, to check uniqueness across users.
async fn run_users(users: usize, calls: u64, ids: fn(&str, u64) -> Option<String>) -> Vec<String> {
    let engine = roomy_engine();
    let start = Arc::new(Barrier::new(users));
    let tasks: Vec<_> = (0..users)
        .map(|i| {
            let (engine, start) = (engine.clone(), Arc::clone(&start));
            tokio::spawn(async move {
                let user = format!("user_{i:04}");
                let (d, collector) = Collector::bind(&engine, &user, i);
                start.wait().await;
                let batch = (0..calls).map(|n| {
                    let call = ToolCall::new("whoami", json!({ "n": n }));
                    match ids(&user, n) {
                        Some(id) => call.with_id(id),
                        None => call,
                    }
                });
                let results = d.dispatch_all(batch).await;
                drop(d);
                let mut call_ids = HashSet::new();
                for (n, r) in results.into_iter().enumerate() {
                    let out = r.unwrap_or_else(|e| panic!("{user}: {e}"));
                    let value: WhoOut = serde_json::from_value(out.value).unwrap();
                    let expected = WhoOut {
                        user: user.clone(),
                        call: out.call_id.to_string(),
                        n: n as u64,
                    };
                    assert_eq!(value, expected, "the tool saw this user and call");
                    assert!(call_ids.insert(out.call_id.to_string()), "duplicate id");
                }
                let events = collector.events().await;
                check_stream(&user, &events, &call_ids);
                call_ids
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let m = engine.metrics();
    assert_eq!(m.total, users as u64 * calls);
    assert_eq!(m.count(Status::Success), m.total);
    assert_eq!((m.active, m.sink_failures), (0, 0));
    all
}

#[tokio::test]
async fn ten_users_each_get_exactly_their_own_events() {
    // Every user uses the same model call ids: they still never cross.
    let ids = run_users(10, 20, |_, n| Some(format!("call_{n}"))).await;
    assert_eq!(ids.len(), 200);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_users_times_ten_calls_each_get_exactly_their_own_events() {
    // Generated ids: unique across all 10,000 calls.
    let ids = run_users(1000, 10, |_, _| None).await;
    assert_eq!(ids.len(), 10_000);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_users_with_their_own_model_ids_on_a_multi_thread_runtime() {
    let ids = run_users(10, 50, |user, n| Some(format!("{user}:{n}"))).await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 500);
}

#[tokio::test(start_paused = true)]
async fn a_stuck_socket_of_one_user_never_delays_another() {
    let engine = roomy_engine();
    // Alice's writer task is stuck: her queue holds one event and is never read.
    let (alice_tx, alice_rx) = mpsc::channel::<Event>(1);
    let alice = engine.dispatcher().sink(alice_tx).user(ctx("alice"));
    let bob_sink = RecordingSink::new();
    let bob = engine.dispatcher().sink(bob_sink.clone()).user(ctx("bob"));

    let alice_call = tokio::spawn(async move {
        alice
            .dispatch(ToolCall::new("whoami", json!({"n": 1})))
            .await
    });
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    assert_eq!(alice_rx.len(), 1, "alice's tool_executing fills her queue");
    let t0 = tokio::time::Instant::now();
    for n in 0..5 {
        let out = bob
            .dispatch(ToolCall::new("whoami", json!({ "n": n })))
            .await
            .unwrap();
        assert_eq!(out.value["user"], "bob");
    }
    assert_eq!(t0.elapsed(), Duration::ZERO, "bob never waited");
    assert_eq!(bob_sink.len(), 10);
    assert!(
        !alice_call.is_finished(),
        "alice waits for room in her queue"
    );

    // Alice's result is not lost: she gets it once the delivery timeout passes.
    let out = alice_call.await.unwrap().unwrap();
    assert_eq!(out.value["user"], "alice");
    assert!(t0.elapsed() >= Duration::from_secs(5));
    let m = engine.metrics();
    assert_eq!((m.sink_failures, m.count(Status::Success)), (1, 6));
    drop(alice_rx);
}

/// Alice's socket is never read and she has three calls in flight; bob shares a tool
/// limit (`tool`) or the global limit (`global`) of 2 with her. Bob's calls finish at
/// once, while all of alice's still wait on her own sink: none of them holds a shared
/// slot while it waits.
async fn stuck_user_holds_no_shared_slot(tool_limit: Option<usize>, global: usize) {
    let mut settings = tool_dispatch::ToolSettings::new();
    if let Some(n) = tool_limit {
        settings = settings.max_concurrency(n);
    }
    let whoami = tool_fn("whoami", "Who am I?", |i: WhoIn, cx| async move {
        Ok::<_, ToolError>(WhoOut {
            user: cx.user().user_id().to_owned(),
            call: cx.call_id().to_owned(),
            n: i.n,
        })
    })
    .settings(settings);
    let reg = Registry::builder().tool(whoami).build().unwrap();
    let per_user = UserLimits {
        concurrency: 10,
        rate: None,
    };
    let engine = Engine::builder(reg)
        .limits(Limits::default().global(global).per_user(per_user))
        .build();
    let (alice_tx, alice_rx) = mpsc::channel::<Event>(1);
    let alice = engine.dispatcher().sink(alice_tx).user(ctx("alice"));
    let alice_calls: Vec<_> = (0..3)
        .map(|n| {
            let alice = alice.clone();
            tokio::spawn(async move {
                alice
                    .dispatch(ToolCall::new("whoami", json!({ "n": n })))
                    .await
            })
        })
        .collect();
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(
        alice_calls.iter().all(|c| !c.is_finished()),
        "alice's calls wait on her sink"
    );
    let bob_sink = RecordingSink::new();
    let bob = engine.dispatcher().sink(bob_sink.clone()).user(ctx("bob"));
    let t0 = tokio::time::Instant::now();
    for n in 0..10 {
        let out = bob
            .dispatch(ToolCall::new("whoami", json!({ "n": n })))
            .await
            .unwrap();
        assert_eq!(out.value["user"], "bob");
    }
    assert_eq!(t0.elapsed(), Duration::ZERO, "bob never waited for a slot");
    assert_eq!(bob_sink.len(), 20);
    assert!(alice_calls.iter().all(|c| !c.is_finished()));
    // Alice's calls end by her own delivery timeout, each with an answer.
    for c in alice_calls {
        let _ = c.await.unwrap();
    }
    let m = engine.metrics();
    assert_eq!(m.active, 0);
    assert_eq!(m.total, 13);
    drop(alice_rx);
}

#[tokio::test(start_paused = true)]
async fn a_stuck_socket_holds_no_per_tool_slot_another_user_needs() {
    stuck_user_holds_no_shared_slot(Some(2), 100).await;
}

#[tokio::test(start_paused = true)]
async fn a_stuck_socket_holds_no_global_slot_another_user_needs() {
    stuck_user_holds_no_shared_slot(None, 2).await;
}

#[tokio::test(start_paused = true)]
async fn cancelling_or_saturating_one_user_leaves_another_untouched() {
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let hold = {
        let (started, release) = (Arc::clone(&started), Arc::clone(&release));
        tool_fn("hold", "Waits to be released.", move |_: (), cx| {
            let (started, release) = (Arc::clone(&started), Arc::clone(&release));
            async move {
                started.notify_one();
                release.notified().await;
                Ok::<_, ToolError>(cx.user().user_id().to_owned())
            }
        })
    };
    let limits = Limits::default()
        .per_user(UserLimits {
            concurrency: 1,
            rate: None,
        })
        .max_wait(Duration::from_millis(50));
    let engine = Engine::builder(Registry::builder().tool(hold).build().unwrap())
        .limits(limits)
        .build();
    let (alice_sink, bob_sink) = (RecordingSink::new(), RecordingSink::new());
    let alice = engine
        .dispatcher()
        .sink(alice_sink.clone())
        .user(ctx("alice"));
    let bob = engine.dispatcher().sink(bob_sink.clone()).user(ctx("bob"));

    let alice_call = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.dispatch(ToolCall::new("hold", json!(null))).await })
    };
    started.notified().await;
    let bob_call = {
        let bob = bob.clone();
        tokio::spawn(async move { bob.dispatch(ToolCall::new("hold", json!(null))).await })
    };
    started.notified().await;
    assert_eq!(
        engine.active(),
        2,
        "bob got his own slot while alice holds hers"
    );

    // Alice's only slot is taken: her next call is busy; bob's limits are his own.
    let err = alice
        .dispatch(ToolCall::new("hold", json!(null)))
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

    // Cancelling alice ends her call only.
    assert_eq!(engine.cancel_user("alice").here, 1);
    let err = alice_call.await.unwrap().unwrap_err();
    assert_eq!(
        err,
        DispatchError::Cancelled {
            reason: CancelReason::User
        }
    );
    assert_eq!(engine.active(), 1);
    assert!(!bob_call.is_finished());
    release.notify_one();
    assert_eq!(bob_call.await.unwrap().unwrap().value, "bob");

    let statuses = |sink: &RecordingSink| -> Vec<Status> {
        sink.events()
            .iter()
            .filter_map(|e| match e {
                Event::ToolCompleted(c) => Some(c.status),
                _ => None,
            })
            .collect()
    };
    assert_eq!(statuses(&alice_sink), [Status::Busy, Status::Cancelled]);
    assert_eq!(statuses(&bob_sink), [Status::Success]);
    assert!(alice_sink.events().iter().all(|e| e.user_id() == "alice"));
    assert!(bob_sink.events().iter().all(|e| e.user_id() == "bob"));
    assert_eq!(engine.active(), 0);

    // Alice's later calls run normally.
    let again = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.dispatch(ToolCall::new("hold", json!(null))).await })
    };
    started.notified().await;
    release.notify_one();
    assert_eq!(again.await.unwrap().unwrap().value, "alice");
}
