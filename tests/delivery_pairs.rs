//! Pairs under faults: whatever happens to a call, to its sink or to the runtime, the
//! wire shows its `tool_executing` and `tool_completed` together or neither, and the
//! caller hears the truth (`undelivered` is never reported as `timeout`).
//!
//! Each test is the repro of a fault that once broke this, and the class around it:
//! a runtime dropped under a call at every stage (which once deadlocked: the delivery
//! task was spawned under the backlog's lock); calls dropped by the thousand against a
//! slow reader; a stall, a cancellation and a recovery; more failed openings than the
//! backlog holds; a late runtime; a call id reused after its call ended.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::sync::mpsc;
use tool_dispatch::event::{AgentEvent, Event, Status, Timestamp};
use tool_dispatch::*;

fn filler(user: &str) -> Event {
    Event::AgentStarted(AgentEvent {
        run_id: None,
        thread_id: None,
        user_id: user.into(),
        message: None,
        result: None,
        timestamp: Timestamp::now(),
    })
}

/// A channel sink of one slot, already full: nothing goes through until it is read.
fn full_channel() -> (mpsc::Sender<Event>, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel::<Event>(1);
    tx.try_send(filler("alice")).expect("room for the filler");
    (tx, rx)
}

/// Tool events of a wire, the fillers left out.
fn tool_events(events: Vec<Event>) -> Vec<Event> {
    events
        .into_iter()
        .filter(|e| e.call_id().is_some())
        .collect()
}

// ------------------------------------------------------------ a runtime dropped under a call

/// Where a call stands when its runtime is dropped.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Its `tool_executing` waits for room in a full sink.
    WaitingForRoom,
    /// Its tool runs forever; the sink is full by then.
    Running,
    /// It waits for its user's approval.
    AwaitingApproval,
    /// It waits for a slot the user's other call holds.
    WaitingForSlot,
    /// It follows an identical cached call that runs forever.
    FollowingCache,
}

const STAGES: [Stage; 5] = [
    Stage::WaitingForRoom,
    Stage::Running,
    Stage::AwaitingApproval,
    Stage::WaitingForSlot,
    Stage::FollowingCache,
];

/// Builds an engine, puts two calls at `stage`, then drops the runtime (as the end of
/// a `#[tokio::main]` does). Returns once the runtime is dropped.
fn drop_runtime_at(stage: Stage, rt: tokio::runtime::Runtime) {
    let never = |name: &str, settings: ToolSettings| {
        tool_fn(name, "Never ends.", |_: u64, _cx| async {
            std::future::pending::<Result<u64, ToolError>>().await
        })
        .settings(settings)
    };
    let reg = Registry::builder()
        .tool(never("never", ToolSettings::new()))
        .tool(never(
            "gated",
            ToolSettings::new().requires_approval("asks first"),
        ))
        .tool(never(
            "cached",
            ToolSettings::new().cache(Duration::from_secs(60)),
        ))
        .build()
        .unwrap();
    let per_user = match stage {
        Stage::WaitingForSlot => 1,
        _ => 10,
    };
    let engine = Engine::builder(reg)
        .limits(Limits::default().per_user(no_rate(per_user)))
        .build();
    let (tx, rx) = mpsc::channel::<Event>(1);
    if matches!(stage, Stage::WaitingForRoom) {
        tx.try_send(filler("alice")).unwrap();
    }
    let d = engine.dispatcher().sink(tx).user(user("alice"));
    let tool = match stage {
        Stage::AwaitingApproval => "gated",
        Stage::FollowingCache => "cached",
        _ => "never",
    };
    rt.block_on(async {
        let _first = spawn(&d, ToolCall::new(tool, json!(1)));
        let _second = spawn(&d, ToolCall::new(tool, json!(1)));
        settle().await;
    });
    drop(rt); // the calls' futures are dropped here, their pairs handed off
    drop((d, rx, engine));
}

/// Runs `f` on its own thread; fails if it has not returned within a minute (it
/// deadlocked: nothing else can hold it that long).
fn returns(what: String, f: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = done.send(());
    });
    assert!(
        finished.recv_timeout(Duration::from_secs(60)).is_ok(),
        "{what}: the thread never returned (a deadlock)"
    );
}

#[test]
fn dropping_a_current_thread_runtime_under_calls_at_every_stage_returns() {
    for stage in STAGES {
        returns(format!("{stage:?}, current thread"), move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            drop_runtime_at(stage, rt);
        });
    }
}

#[test]
fn dropping_a_multi_thread_runtime_under_calls_at_every_stage_returns() {
    for stage in STAGES {
        returns(format!("{stage:?}, multi thread"), move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            drop_runtime_at(stage, rt);
        });
    }
}

/// The end of a `#[tokio::main]` whose user has a stuck socket: the process exits.
#[test]
fn tokio_main_with_a_stuck_socket_exits_at_the_end_of_main() {
    #[tokio::main]
    async fn main_with_a_stuck_socket() {
        let never = tool_fn("never", "Never ends.", |_: u64, _cx| async {
            std::future::pending::<Result<u64, ToolError>>().await
        });
        let engine = Engine::builder(Registry::builder().tool(never).build().unwrap()).build();
        let (tx, rx) = mpsc::channel::<Event>(1);
        let d = engine.dispatcher().sink(tx).user(user("alice"));
        for i in 0..3 {
            drop(spawn(&d, ToolCall::new("never", json!(i))));
        }
        settle().await;
        std::mem::forget(rx); // the socket is never read again
    }
    returns("#[tokio::main]".into(), main_with_a_stuck_socket);
}

// ------------------------------------------------------------ thousands of drops, a slow reader

/// 1,800 calls cut short at random points (timeouts, aborted tasks, batches dropped
/// midway) on a multi-thread runtime, against a reader that is slow but always
/// catches up: every call shows its pair, and nothing is counted as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_dropped_at_random_points_against_a_slow_reader_all_keep_their_pairs() {
    let slow = tool_fn("slow", "Yields a few times.", |n: u64, _cx| async move {
        for _ in 0..(n % 5) {
            tokio::task::yield_now().await;
        }
        Ok::<_, ToolError>(n)
    });
    let engine = Engine::builder(Registry::builder().tool(slow).build().unwrap())
        .limits(Limits::default().per_user(no_rate(10)))
        .delivery_timeout(Duration::from_secs(3600))
        .build();
    let (tx, mut rx) = mpsc::channel::<Event>(1);
    let d = engine.dispatcher().sink(tx).user(user("alice"));
    let reader = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
            for _ in 0..3 {
                tokio::task::yield_now().await; // slower than the callers
            }
        }
        events
    });
    let mut rng = Rng(0x5eed_1800);
    let mut tasks = Vec::new();
    let mut ids = Vec::new();
    for round in 0..60u64 {
        // A batch of 10, cut short after a random number of polls.
        let batch: Vec<ToolCall> = (0..10)
            .map(|i| {
                let id = format!("b{round}_{i}");
                ids.push(id.clone());
                ToolCall::new("slow", json!(i)).with_id(id)
            })
            .collect();
        let polls = rng.next() % 8;
        let d2 = d.clone();
        tasks.push(tokio::spawn(async move {
            let mut fut = std::pin::pin!(d2.dispatch_all(batch));
            for _ in 0..polls {
                if poll_once(&mut fut).await.is_ready() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        }));
        // Ten single calls, each under a random timeout, and ten aborted tasks.
        for i in 0..10u64 {
            let id = format!("t{round}_{i}");
            ids.push(id.clone());
            let wait = Duration::from_micros(rng.next() % 2_000);
            let d2 = d.clone();
            tasks.push(tokio::spawn(async move {
                let call = ToolCall::new("slow", json!(i)).with_id(id);
                let _ = tokio::time::timeout(wait, d2.dispatch(call)).await;
            }));
            let id = format!("a{round}_{i}");
            ids.push(id.clone());
            let (d2, (started, dispatched)) = (d.clone(), tokio::sync::oneshot::channel());
            let handle = tokio::spawn(async move {
                let call = d2.dispatch(ToolCall::new("slow", json!(i)).with_id(id));
                let _ = started.send(()); // the call has started: it is a call now
                call.await
            });
            dispatched.await.unwrap();
            if rng.next().is_multiple_of(2) {
                tokio::task::yield_now().await;
            }
            handle.abort();
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    drop(d);
    let events = reader.await.unwrap();
    assert_eq!(ids.len(), 1_800);
    assert_paired(&events);
    for id in &ids {
        assert_eq!(
            kinds_of(&events, id).len(),
            2,
            "{id}: its pair reached the wire"
        );
    }
    let m = engine.metrics();
    assert_eq!(
        m.sink_failures, 0,
        "nothing was lost, so nothing is counted"
    );
    assert_eq!(m.total, 1_800);
}

// ------------------------------------------------------------ a stall, a cancel, a recovery

/// `x` and `a` wait to announce; `x`'s opening runs out of delivery time and the sink
/// is stalled; `cancel_user` ends `a`; the socket recovers. `a`'s opening goes out,
/// so its completion must follow it.
#[tokio::test(start_paused = true)]
async fn a_call_cancelled_while_its_sink_is_stalled_completes_its_pair_when_it_recovers() {
    let engine = Engine::builder(Registry::builder().tool(echo()).build().unwrap())
        .limits(Limits::default().per_user(no_rate(10)))
        .delivery_timeout(Duration::from_secs(5))
        .build();
    let (tx, rx) = full_channel();
    let d = engine.dispatcher().sink(tx).user(user("alice"));
    let x = spawn(&d, ToolCall::new("echo", json!("x")).with_id("x"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a = spawn(&d, ToolCall::new("echo", json!("a")).with_id("a"));
    tokio::time::sleep(Duration::from_millis(2_500)).await; // 5.5 s: x timed out
    let x = x.await.unwrap().unwrap_err();
    assert!(
        matches!(x, DispatchError::Undelivered(SinkError::TimedOut(_))),
        "{x:?}"
    );
    engine.cancel_user("alice");
    let a = a.await.unwrap().unwrap_err();
    assert_eq!(a.status(), Status::Cancelled);
    tokio::time::sleep(Duration::from_secs(1)).await; // 6.5 s: the socket recovers
    drop(d);
    let wire = tool_events(drain(rx).await);
    assert_paired(&wire);
    assert_eq!(kinds_of(&wire, "a"), ["tool_executing", "tool_completed"]);
    assert!(kinds_of(&wire, "x").is_empty());
}

// ------------------------------------------------------------ more failed openings than the backlog

/// Calls wait to announce (one opening in the drain's hands, the backlog full, one
/// more waiting for room); at 3 s they are cancelled, so their completions queue
/// behind their openings; at 5 s every opening runs out of delivery time; at 6 s the
/// socket recovers. No completion reaches the wire without its opening, however many
/// openings failed (a backlog of 2 with 3 calls, the default of 64 with 65).
#[tokio::test(start_paused = true)]
async fn more_failed_openings_than_the_backlog_holds_never_leave_a_completion_alone() {
    for (backlog, calls) in [(2usize, 3usize), (64, 65)] {
        let engine = Engine::builder(Registry::builder().tool(echo()).build().unwrap())
            .limits(Limits::default().per_user(no_rate(100)))
            .delivery_timeout(Duration::from_secs(5))
            .delivery_backlog(backlog)
            .build();
        let (tx, rx) = full_channel();
        let d = engine.dispatcher().sink(tx).user(user("alice"));
        let call = |i: usize| spawn(&d, ToolCall::new("echo", json!(i)).with_id(format!("c{i}")));
        // The first opening is in the delivery task's hands, the rest fill the backlog.
        let mut handles = vec![call(0)];
        settle().await;
        handles.extend((1..calls).map(call));
        settle().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        engine.cancel_user("alice");
        for h in handles {
            let _ = h.await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(3)).await; // 6 s: the openings failed
        drop(d);
        let wire = tool_events(drain(rx).await); // the socket recovers
        assert_paired(&wire);
        let m = engine.metrics();
        assert_eq!(m.total, calls as u64);
        assert_eq!(
            m.sink_failures as usize + wire.len(),
            2 * calls,
            "{calls} calls: every event is on the wire or counted"
        );
    }
}

// ------------------------------------------------------------ a late runtime

/// A sink that is always full and whose `send` blocks its thread for 100 ms (past the
/// delivery timeout of 20 ms), then answers: `Ok` for a `tool_executing` when
/// `openings_go` is set, an error otherwise.
#[derive(Clone)]
struct BlockingSink {
    openings_go: bool,
}

impl EventSink for BlockingSink {
    fn try_send(&self, e: Event) -> Result<(), TrySendError> {
        Err(TrySendError::Full(e))
    }

    fn send(&self, e: Event) -> BoxFuture<'_, Result<(), SinkError>> {
        std::thread::sleep(Duration::from_millis(100)); // hostile: blocks the thread
        let ok = self.openings_go && matches!(e, Event::ToolExecuting(_));
        Box::pin(async move {
            match ok {
                true => Ok(()),
                false => Err(SinkError::Failed("the socket broke".into())),
            }
        })
    }
}

/// The delivery task is held up past the delivery deadline (its sink blocks the
/// thread) while the caller, on the other worker, is free: the caller waits for the
/// truth. An opening that failed is `undelivered` (never `timeout`, and the tool never
/// ran); one that went out lets the tool run; a caller whose completion was lost
/// returns only once that loss is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_delivery_task_reports_undelivered_never_timeout_and_counts_before_returning() {
    let runs = Arc::new(AtomicUsize::new(0));
    let reg = Registry::builder()
        .tool(counting("count", &runs, ToolSettings::new()))
        .build()
        .unwrap();
    let engine = Engine::builder(reg)
        .limits(Limits::default().per_user(no_rate(100)))
        .delivery_timeout(Duration::from_millis(20))
        .build();

    let d = engine
        .dispatcher()
        .sink(BlockingSink { openings_go: false })
        .user(user("alice"));
    for i in 0..3 {
        let err = d
            .dispatch(ToolCall::new("count", json!(i)))
            .await
            .unwrap_err();
        assert!(matches!(err, DispatchError::Undelivered(_)), "{err:?}");
    }
    assert_eq!(runs.load(SeqCst), 0, "no tool ran unannounced");

    let d = engine
        .dispatcher()
        .sink(BlockingSink { openings_go: true })
        .user(user("bob"));
    for i in 0..3u64 {
        let before = engine.metrics().sink_failures;
        let out = d.dispatch(ToolCall::new("count", json!(i))).await;
        assert_eq!(out.unwrap().value, json!(i), "the opening went out: it ran");
        assert_eq!(
            engine.metrics().sink_failures,
            before + 1,
            "the lost completion is counted before the caller returns"
        );
    }
    assert_eq!(runs.load(SeqCst), 3);
}

// ------------------------------------------------------------ an ended call's id reused

/// `dup`'s opening runs out of time; while the same delivery task is still busy with
/// other calls' events, a new call reuses the id `dup`. It is tried, and it runs: a
/// call is matched by itself, never by the text of its id.
#[tokio::test(start_paused = true)]
async fn a_call_reusing_an_ended_calls_id_is_tried_not_failed_by_its_name() {
    let engine = Engine::builder(Registry::builder().tool(echo()).build().unwrap())
        .limits(Limits::default().per_user(no_rate(10)))
        .delivery_timeout(Duration::from_secs(5))
        .build();
    let (tx, mut rx) = full_channel();
    let d = engine.dispatcher().sink(tx).user(user("alice"));
    let first = spawn(&d, ToolCall::new("echo", json!(1)).with_id("dup"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let others = [
        spawn(&d, ToolCall::new("echo", json!(2)).with_id("o1")),
        spawn(&d, ToolCall::new("echo", json!(3)).with_id("o2")),
    ];
    tokio::time::sleep(Duration::from_millis(4_500)).await; // 5.5 s: `dup` failed
    let err = first.await.unwrap().unwrap_err();
    assert!(matches!(err, DispatchError::Undelivered(_)), "{err:?}");
    // The reader takes one event: `o1`'s opening goes out, `o2`'s waits: the same
    // delivery task is busy when `dup` comes again.
    assert!(matches!(rx.recv().await, Some(Event::AgentStarted(_))));
    let again = spawn(&d, ToolCall::new("echo", json!(4)).with_id("dup"));
    let mut wire = Vec::new();
    let read = async {
        while kinds_of(&wire, "dup").len() < 2 {
            wire.push(rx.recv().await.expect("events until dup's pair"));
        }
    };
    // Virtual time: a pair that never comes fails the test instead of hanging it.
    let came = tokio::time::timeout(Duration::from_secs(600), read).await;
    assert!(came.is_ok(), "dup's pair never reached the wire: {wire:?}");
    assert_eq!(again.await.unwrap().unwrap().value, json!(4));
    for o in others {
        assert!(o.await.unwrap().is_ok());
    }
    drop(d);
    wire.extend(drain(rx).await);
    assert_paired(&wire);
    for id in ["dup", "o1", "o2"] {
        assert_eq!(
            kinds_of(&wire, id),
            ["tool_executing", "tool_completed"],
            "{id}"
        );
    }
}
