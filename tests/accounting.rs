//! Accounting: 10,000 calls with random outcomes. Every call is counted once, in the
//! status it ended with; the counts match what the callers saw; nothing stays active;
//! and every call id appears exactly twice in its user's stream, executing first.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::json;
use tool_dispatch::event::{Event, Status};
use tool_dispatch::{
    Engine, Limits, RecordingSink, Registry, ToolCall, ToolError, ToolSettings, UserContext,
    UserLimits, tool_fn,
};

const USERS: usize = 20;
const CALLS_PER_USER: usize = 500;
const PLANNED_PANIC: &str = "planned panic";

use common::Rng;

/// What a call is set up to do, and the status it must end with.
const OUTCOMES: [Status; 8] = [
    Status::Success,
    Status::ToolFailed,
    Status::InvalidInput,
    Status::UnknownTool,
    Status::Denied,
    Status::Timeout,
    Status::Panicked,
    Status::Cancelled, // the caller drops the future while the tool runs
];

fn registry() -> Registry {
    let ok = tool_fn("ok", "Succeeds.", |n: u64, _cx| async move {
        tokio::task::yield_now().await;
        Ok::<_, ToolError>(n)
    });
    let fail = tool_fn("fail", "Fails.", |_: u64, _cx| async move {
        Err::<u64, _>(ToolError::new("it did not work"))
    });
    let admin = tool_fn(
        "admin",
        "Needs a scope nobody has.",
        |n: u64, _cx| async move { Ok::<_, ToolError>(n) },
    )
    .settings(ToolSettings::new().scope("admin"));
    let sleepy = tool_fn(
        "sleepy",
        "Sleeps past its timeout.",
        |_: u64, _cx| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, ToolError>(0u64)
        },
    )
    .settings(ToolSettings::new().timeout(Duration::from_millis(10)));
    let boom = tool_fn("boom", "Panics.", |_: u64, _cx| async move {
        if true {
            panic!("{PLANNED_PANIC}");
        }
        Ok::<_, ToolError>(0u64)
    });
    let hang = tool_fn("hang", "Runs until dropped.", |_: u64, _cx| async move {
        std::future::pending::<()>().await;
        Ok::<_, ToolError>(0u64)
    })
    .settings(ToolSettings::new().timeout(Duration::from_secs(3600)));
    Registry::builder()
        .tool(ok)
        .tool(fail)
        .tool(admin)
        .tool(sleepy)
        .tool(boom)
        .tool(hang)
        .build()
        .unwrap()
}

/// The call that ends with `status`.
fn call_for(status: Status, n: u64) -> ToolCall {
    match status {
        Status::Success => ToolCall::new("ok", json!(n)),
        Status::ToolFailed => ToolCall::new("fail", json!(n)),
        Status::InvalidInput => ToolCall::new("ok", json!({"not": "a number"})),
        Status::UnknownTool => ToolCall::new("no_such_tool", json!(n)),
        Status::Denied => ToolCall::new("admin", json!(n)),
        Status::Timeout => ToolCall::new("sleepy", json!(n)),
        Status::Panicked => ToolCall::new("boom", json!(n)),
        Status::Cancelled => ToolCall::new("hang", json!(n)),
        other => unreachable!("{other}"),
    }
}

/// Keeps the planned panics out of the test output; any other panic is reported.
fn quiet_planned_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let planned = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|s| s == PLANNED_PANIC);
        if !planned {
            default(info);
        }
    }));
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_random_calls_are_each_counted_once_in_their_status() {
    quiet_planned_panics();
    let limits = Limits::default().global(1000).per_user(UserLimits {
        concurrency: 10,
        rate: None,
    });
    let engine = Engine::builder(registry()).limits(limits).build();

    let tasks: Vec<_> = (0..USERS)
        .map(|u| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (u as u64 + 1));
                let user = UserContext::builder(format!("user_{u}")).build().unwrap();
                let sink = RecordingSink::new();
                let d = engine.dispatcher().sink(sink.clone()).user(user);
                let mut planned: HashMap<String, Status> = HashMap::new();
                let mut counted: BTreeMap<&'static str, u64> = BTreeMap::new();
                let mut i = 0;
                while i < CALLS_PER_USER {
                    // One to four calls at a time, concurrently, as a model's parallel
                    // tool calls would be.
                    let batch = (1 + rng.next() % 4).min((CALLS_PER_USER - i) as u64);
                    let mut runs = Vec::new();
                    for _ in 0..batch {
                        let status = OUTCOMES[(rng.next() % OUTCOMES.len() as u64) as usize];
                        let id = format!("u{u}-c{i}");
                        let call = call_for(status, i as u64).with_id(id.clone());
                        planned.insert(id.clone(), status);
                        let d = &d;
                        runs.push(async move {
                            let seen = if status == Status::Cancelled {
                                // Dropped by the caller once the tool is running.
                                let r = tokio::time::timeout(
                                    Duration::from_millis(1),
                                    d.dispatch(call),
                                );
                                assert!(r.await.is_err(), "{id}: `hang` ended");
                                Status::Cancelled
                            } else {
                                match d.dispatch(call).await {
                                    Ok(out) => {
                                        assert_eq!(out.value, json!(i), "{id}");
                                        Status::Success
                                    }
                                    Err(e) => e.status(),
                                }
                            };
                            assert_eq!(seen, status, "{id}");
                            seen
                        });
                        i += 1;
                    }
                    for seen in futures_util::future::join_all(runs).await {
                        *counted.entry(seen.as_str()).or_default() += 1;
                    }
                    let m = engine.metrics();
                    assert_eq!(m.total, m.by_status.values().sum::<u64>());
                }
                drop(d);
                (sink.take(), planned, counted)
            })
        })
        .collect();

    let mut counted: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut streams = Vec::new();
    for t in tasks {
        let (events, planned, c) = t.await.unwrap();
        for (k, v) in c {
            *counted.entry(k).or_default() += v;
        }
        streams.push((events, planned));
    }

    // The counters.
    let calls = (USERS * CALLS_PER_USER) as u64;
    let m = engine.metrics();
    assert_eq!(m.total, calls);
    assert_eq!(m.by_status.values().sum::<u64>(), m.total);
    assert_eq!(m.active, 0);
    for (status, n) in &m.by_status {
        let expected = counted.get(status).copied().unwrap_or(0);
        assert_eq!(*n, expected, "by_status[{status}]");
    }
    for s in OUTCOMES {
        assert!(counted[s.as_str()] > 0, "the run exercised {s}");
    }
    let per_tool: u64 = m.tools.iter().map(|t| t.calls).sum();
    assert_eq!(per_tool, m.total - m.count(Status::UnknownTool));
    assert_eq!(m.sink_failures, 0);
    assert!(m.active_users.is_empty());

    // The streams: each call id exactly twice, executing then completed, with the
    // status the call ended with.
    for (events, planned) in streams {
        assert_eq!(events.len(), 2 * planned.len());
        let mut seen: HashMap<&str, Vec<&Event>> = HashMap::new();
        for e in &events {
            seen.entry(e.call_id().unwrap()).or_default().push(e);
        }
        assert_eq!(seen.len(), planned.len());
        for (id, evs) in seen {
            let [Event::ToolExecuting(_), Event::ToolCompleted(done)] = evs.as_slice() else {
                panic!("{id}: {evs:?}");
            };
            assert_eq!(Some(&done.status), planned.get(id), "{id}");
        }
    }
}
