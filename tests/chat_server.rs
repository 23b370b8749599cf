//! The chat server example, run in-process on an ephemeral port and driven by a real
//! WebSocket client (tokio-tungstenite).
#![cfg(feature = "axum")]

#[allow(dead_code)]
#[path = "../examples/chat_server.rs"]
mod chat_server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use chat_server::{MAX_MESSAGE_BYTES, Server, ServerLog};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tool_dispatch::Engine;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Starts the real server on 127.0.0.1:0 with `engine`.
async fn start_with(engine: Engine, result_timeout: Duration) -> (SocketAddr, Server) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(engine, chat_server::demo_users()).result_timeout(result_timeout);
    tokio::spawn(chat_server::serve(listener, server.clone()));
    (addr, server)
}

/// Starts the real server with the demo engine and a grace period of `grace`.
async fn start_with_grace(grace: Duration) -> (SocketAddr, Server) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(chat_server::demo_engine(), chat_server::demo_users()).grace(grace);
    tokio::spawn(chat_server::serve(listener, server.clone()));
    (addr, server)
}

async fn start() -> (SocketAddr, Server) {
    start_with(chat_server::demo_engine(), Duration::from_secs(5)).await
}

/// Connects with `token` and reads the `ready` message.
async fn connect(addr: SocketAddr, token: &str) -> Ws {
    connect_ready(addr, token).await.0
}

/// Connects with `token`; returns the socket and the `ready` message.
async fn connect_ready(addr: SocketAddr, token: &str) -> (Ws, Value) {
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let ready = recv(&mut ws).await;
    assert_eq!(ready["type"], "ready", "{ready}");
    assert!(
        ready["run_id"].is_string() && ready["epoch"].is_u64(),
        "{ready}"
    );
    (ws, ready)
}

/// Every message up to and including the first for which `pred` holds.
async fn until(ws: &mut Ws, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let m = recv(ws).await;
        let done = pred(&m);
        seen.push(m);
        if done {
            return seen;
        }
    }
}

/// The `seq`s of the run frames in `msgs` (those that carry one), checked to be
/// contiguous and increasing; every tool event and results frame must carry one.
fn seqs(msgs: &[Value]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for m in msgs {
        let kind = m["type"].as_str().unwrap_or_default();
        match m["seq"].as_u64() {
            Some(seq) => {
                if let Some(prev) = out.last() {
                    assert_eq!(seq, prev + 1, "a gap or a repeat before {m}");
                }
                out.push(seq);
            }
            None => assert!(!kind.starts_with("tool_"), "a run frame without seq: {m}"),
        }
    }
    out
}

/// The next text message, as JSON.
async fn recv(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Every message up to and including the next `tool_results`.
async fn until_results(ws: &mut Ws) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let m = recv(ws).await;
        let done = m["type"] == "tool_results";
        seen.push(m);
        if done {
            return seen;
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

fn openai(calls: &[(&str, &str, Value)]) -> Value {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(id, name, args)| {
            json!({"id": id, "type": "function",
                   "function": {"name": name, "arguments": args.to_string()}})
        })
        .collect();
    json!({"role": "assistant", "content": null, "tool_calls": calls})
}

fn anthropic(calls: &[(&str, &str, Value)]) -> Value {
    let mut content = vec![json!({"type": "text", "text": "let me check"})];
    content.extend(calls.iter().map(
        |(id, name, input)| json!({"type": "tool_use", "id": id, "name": name, "input": input}),
    ));
    json!({"role": "assistant", "content": content})
}

/// Checks the pairing and order of the tool events in `msgs`, all for `user`;
/// returns the ids of the calls seen, in order of their `tool_executing`.
fn check_events(msgs: &[Value], user: &str) -> Vec<String> {
    let mut order = Vec::new();
    let mut state: HashMap<String, &str> = HashMap::new(); // call id → last event kind
    for m in msgs {
        let kind = m["type"].as_str().unwrap();
        if !kind.starts_with("tool_") || kind == "tool_results" {
            continue;
        }
        assert_eq!(m["user_id"], user, "an event of another user arrived: {m}");
        let id = m["call_id"].as_str().unwrap().to_owned();
        let prev = state.get(&id).copied();
        match kind {
            "tool_executing" => {
                assert_eq!(prev, None, "second tool_executing for {id}");
                order.push(id.clone());
            }
            "tool_progress" => assert!(
                matches!(prev, Some("tool_executing" | "tool_progress")),
                "progress outside executing..completed for {id}: {prev:?}"
            ),
            "tool_completed" => assert!(
                matches!(prev, Some("tool_executing" | "tool_progress")),
                "tool_completed without tool_executing before it for {id}: {prev:?}"
            ),
            other => panic!("unexpected event {other}"),
        }
        state.insert(id, kind);
    }
    for (id, last) in &state {
        assert_eq!(*last, "tool_completed", "{id} did not complete");
    }
    order
}

fn completed<'a>(msgs: &'a [Value], id: &str) -> &'a Value {
    msgs.iter()
        .find(|m| m["type"] == "tool_completed" && m["call_id"] == id)
        .unwrap_or_else(|| panic!("no tool_completed for {id}"))
}

/// `GET /metrics.json` over a plain HTTP/1.1 connection.
async fn metrics(addr: SocketAddr) -> Value {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics.json HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let body = &raw[raw.find("\r\n\r\n").unwrap() + 4..];
    let m: Value = serde_json::from_str(body).unwrap();
    let sum: u64 = m["by_status"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(m["total"].as_u64().unwrap(), sum, "accounting: {m}");
    m
}

/// Waits for the server to report `pred` on its connection log.
async fn wait_log(
    log: &mut broadcast::Receiver<ServerLog>,
    pred: impl Fn(&ServerLog) -> bool,
) -> ServerLog {
    loop {
        let entry = log.recv().await.unwrap();
        if pred(&entry) {
            return entry;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_at_once_each_get_their_own_events_in_order() {
    let (addr, _server) = start().await;
    let mut alice = connect(addr, "alice-token").await;
    let mut bob = connect(addr, "bob-token").await;

    // Both send before either reads: the calls run at the same time.
    send(
        &mut alice,
        openai(&[
            (
                "call_a1",
                "get_weather",
                json!({"city": "Paris", "api_key": "sk-secret"}),
            ),
            ("call_a2", "slow_task", json!({"steps": 3, "step_ms": 1})),
            ("call_a3", "list_users", json!({})),
        ]),
    )
    .await;
    send(
        &mut bob,
        anthropic(&[
            ("toolu_b1", "get_weather", json!({"city": "Tokyo"})),
            ("toolu_b2", "list_users", json!({})),
        ]),
    )
    .await;
    let (a, b) = tokio::join!(until_results(&mut alice), until_results(&mut bob));

    assert_eq!(check_events(&a, "alice").len(), 3);
    assert_eq!(check_events(&b, "bob").len(), 2);
    // Each is the first message of its connection's default run: seq from 1.
    assert_eq!(seqs(&a).first(), Some(&1));
    assert_eq!(seqs(&b).first(), Some(&1));
    let a_text = serde_json::to_string(&a).unwrap();
    let b_text = serde_json::to_string(&b).unwrap();
    assert!(
        !a_text.contains("toolu_b") && !b_text.contains("call_a"),
        "streams mixed"
    );

    // alice: redacted key, progress from the slow tool, admin tool allowed.
    let exec = a
        .iter()
        .find(|m| m["type"] == "tool_executing" && m["call_id"] == "call_a1")
        .unwrap();
    assert_eq!(exec["parameters"]["api_key"], "[REDACTED]");
    assert!(!a_text.contains("sk-secret"));
    assert_eq!(
        a.iter()
            .filter(|m| m["type"] == "tool_progress" && m["call_id"] == "call_a2")
            .count(),
        3
    );
    assert_eq!(completed(&a, "call_a1")["result"]["temp_c"], 21.0);
    assert_eq!(completed(&a, "call_a3")["status"], "success");

    // Results in the message's own format, in call order.
    let results = a.last().unwrap();
    assert_eq!(results["format"], "openai");
    assert_eq!(
        results["call_ids"],
        json!(["call_a1", "call_a2", "call_a3"])
    );
    let msgs = results["results"].as_array().unwrap();
    let ids: Vec<&str> = msgs
        .iter()
        .map(|m| m["tool_call_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["call_a1", "call_a2", "call_a3"]);
    assert!(msgs.iter().all(|m| m["role"] == "tool"));
    assert!(msgs[0]["content"].as_str().unwrap().contains("Paris"));

    // bob lacks the admin scope: denied in-band, with is_error.
    assert_eq!(completed(&b, "toolu_b2")["status"], "denied");
    let results = b.last().unwrap();
    assert_eq!(results["format"], "anthropic");
    assert_eq!(results["results"]["role"], "user");
    let blocks = results["results"]["content"].as_array().unwrap();
    assert_eq!(blocks[0]["tool_use_id"], "toolu_b1");
    assert_eq!(blocks[0].get("is_error"), None);
    assert_eq!(blocks[1]["tool_use_id"], "toolu_b2");
    assert_eq!(blocks[1]["is_error"], true);
    assert!(blocks[1]["content"].to_string().contains("admin"));

    let m = metrics(addr).await;
    assert_eq!(m["total"], 5);
    assert_eq!(m["by_status"]["success"], 4);
    assert_eq!(m["by_status"]["denied"], 1);
    assert_eq!(m["active"], 0);
}

/// A call that cannot finish during a test: it runs until cancelled.
fn forever(id: &str) -> Value {
    openai(&[(
        id,
        "slow_task",
        json!({"steps": 1_000_000, "step_ms": 60_000}),
    )])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_socket_resumes_after_its_last_seq_and_misses_nothing() {
    let (addr, server) = start().await;
    let mut log = server.subscribe();
    let (mut ws, ready) = connect_ready(addr, "alice-token").await;
    let (run, epoch) = (ready["run_id"].clone(), ready["epoch"].clone());
    send(
        &mut ws,
        openai(&[("call_slow", "slow_task", json!({"steps": 5, "step_ms": 40}))]),
    )
    .await;
    let first = until(&mut ws, |m| m["type"] == "tool_executing").await;
    let last = *seqs(&first).last().unwrap();
    drop(ws); // the network goes: no closing handshake
    wait_log(
        &mut log,
        |e| matches!(e, ServerLog::Disconnected { user_id, .. } if user_id == "alice"),
    )
    .await;

    let mut ws = connect(addr, "alice-token").await;
    send(
        &mut ws,
        json!({"type": "resume", "run_id": run, "after_seq": last, "epoch": epoch}),
    )
    .await;
    let resumed = recv(&mut ws).await;
    assert_eq!(
        resumed,
        json!({"type": "resumed", "run_id": run, "after_seq": last})
    );
    let rest = until_results(&mut ws).await;
    let rest_seqs = seqs(&rest);
    assert_eq!(
        rest_seqs.first(),
        Some(&(last + 1)),
        "the next seq, nothing twice"
    );
    let progress = rest.iter().filter(|m| m["type"] == "tool_progress").count();
    assert_eq!(
        progress, 5,
        "every progress update after the drop arrived once"
    );
    assert_eq!(completed(&rest, "call_slow")["status"], "success");
    assert_eq!(rest.last().unwrap()["run_id"], run);
    let all: Vec<Value> = first.into_iter().chain(rest).collect();
    check_events(&all, "alice");
    assert_eq!(seqs(&all), (1..=last + 7).collect::<Vec<u64>>());
    assert_eq!(metrics(addr).await["by_status"]["cancelled"], 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn without_a_resume_the_run_is_cancelled_after_the_grace_period() {
    let (addr, server) = start_with_grace(Duration::from_secs(30)).await;
    let mut log = server.subscribe();

    let (mut alice, ready) = connect_ready(addr, "alice-token").await;
    let run = ready["run_id"].as_str().unwrap().to_owned();
    send(&mut alice, forever("call_forever")).await;
    let seen = until(&mut alice, |m| m["type"] == "tool_executing").await;
    let last = *seqs(&seen).last().unwrap();
    let mut bob = connect(addr, "bob-token").await;
    send(&mut bob, forever("call_bob")).await;
    until(&mut bob, |m| m["type"] == "tool_executing").await;

    let left = tokio::time::Instant::now();
    drop(alice);
    let abandoned = wait_log(&mut log, |e| matches!(e, ServerLog::RunAbandoned { .. })).await;
    assert_eq!(
        abandoned,
        ServerLog::RunAbandoned {
            user_id: "alice".into(),
            run_id: run.clone(),
            cancelled: 1
        }
    );
    assert!(
        left.elapsed() >= Duration::from_secs(30),
        "not before the grace period"
    );
    let m = server.engine().metrics();
    assert_eq!(
        (m.by_status["cancelled"], m.active),
        (1, 1),
        "bob's call goes on"
    );

    // A late resume (within the log's lifetime) sees how the call ended.
    let mut alice = connect(addr, "alice-token").await;
    send(
        &mut alice,
        json!({"type": "resume", "run_id": run, "after_seq": last}),
    )
    .await;
    let rest = until_results(&mut alice).await;
    assert_eq!(rest[0]["type"], "resumed");
    assert_eq!(completed(&rest, "call_forever")["status"], "cancelled");
    assert_eq!(seqs(&rest).first(), Some(&(last + 1)));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_resume_within_the_grace_period_keeps_the_calls_running() {
    let (addr, server) = start_with_grace(Duration::from_secs(30)).await;
    let mut log = server.subscribe();

    let (mut tab, ready) = connect_ready(addr, "alice-token").await;
    let run = ready["run_id"].as_str().unwrap().to_owned();
    send(&mut tab, forever("call_kept")).await;
    until(&mut tab, |m| m["type"] == "tool_executing").await;
    drop(tab);
    wait_log(&mut log, |e| matches!(e, ServerLog::Disconnected { .. })).await;
    let mut tab = connect(addr, "alice-token").await;
    send(
        &mut tab,
        json!({"type": "resume", "run_id": run, "after_seq": 0}),
    )
    .await;
    assert_eq!(recv(&mut tab).await["type"], "resumed");
    // Far past the grace period: the run is followed, so nothing is cancelled. (The
    // default run of the first connection had no calls: abandoning it cancels none.)
    tokio::time::sleep(Duration::from_secs(120)).await;
    let m = server.engine().metrics();
    assert_eq!((m.by_status["cancelled"], m.active), (0, 1), "{m:?}");
    while let Ok(e) = log.try_recv() {
        if let ServerLog::RunAbandoned {
            run_id, cancelled, ..
        } = e
        {
            assert!(run_id != run && cancelled == 0, "{run_id} abandoned");
        }
    }
    // Two tabs: the second follows the run too; the first leaving changes nothing.
    let mut second = connect(addr, "alice-token").await;
    send(
        &mut second,
        json!({"type": "resume", "run_id": run, "after_seq": 0}),
    )
    .await;
    assert_eq!(recv(&mut second).await["type"], "resumed");
    drop(tab);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(server.engine().metrics().active, 1);
    send(&mut second, json!({"type": "cancel", "run_id": run})).await;
    let rest = until_results(&mut second).await;
    assert_eq!(completed(&rest, "call_kept")["status"], "cancelled");
}

#[tokio::test]
async fn cancel_ends_the_runs_calls_at_once_and_only_that_run() {
    let (addr, _server) = start().await;
    let (mut ws, ready) = connect_ready(addr, "alice-token").await;
    let run = ready["run_id"].clone();
    send(&mut ws, forever("call_a")).await;
    let mut other = forever("call_b");
    other["run_id"] = json!("run_other");
    send(&mut ws, other).await;
    let mut seen = until(&mut ws, |m| {
        m["type"] == "tool_executing" && m["call_id"] == "call_a"
    })
    .await;

    send(&mut ws, json!({"type": "cancel", "run_id": run})).await;
    let msgs = until_results(&mut ws).await;
    seen.extend(msgs.iter().cloned());
    assert!(
        msgs.contains(&json!({"type": "run_cancelled", "run_id": run, "calls": 1,
                              "other_nodes_told": false})),
        "{msgs:?}"
    );
    let done = completed(&msgs, "call_a");
    assert_eq!(done["status"], "cancelled");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("run was cancelled"),
        "{done}"
    );
    assert_eq!(msgs.last().unwrap()["run_id"], run);
    let m = metrics(addr).await;
    assert_eq!(
        (m["by_status"]["cancelled"].as_u64(), m["active"].as_u64()),
        (Some(1), Some(1))
    );

    // The other run's events carry their own run's seq, from 1.
    send(&mut ws, json!({"type": "cancel", "run_id": "run_other"})).await;
    seen.extend(until_results(&mut ws).await);
    let b: Vec<Value> = seen
        .into_iter()
        .filter(|m| m["run_id"] == "run_other")
        .collect();
    assert_eq!(completed(&b, "call_b")["status"], "cancelled");
    assert_eq!(b.iter().filter_map(|m| m["seq"].as_u64()).min(), Some(1));
}

#[tokio::test]
async fn another_users_run_is_unknown_and_stale_positions_must_resync() {
    let (addr, _server) = start().await;
    let (mut alice, ready) = connect_ready(addr, "alice-token").await;
    let (run, epoch) = (ready["run_id"].clone(), ready["epoch"].as_u64().unwrap());
    send(&mut alice, forever("call_mine")).await;
    until(&mut alice, |m| m["type"] == "tool_executing").await;

    let mut bob = connect(addr, "bob-token").await;
    let resync = |reason: &str| json!({"type": "resync_required", "run_id": run, "reason": reason});
    // bob names alice's run: it does not exist for him, exactly like a made-up one.
    send(
        &mut bob,
        json!({"type": "resume", "run_id": run, "after_seq": 0}),
    )
    .await;
    assert_eq!(recv(&mut bob).await, resync("unknown_run"));
    send(
        &mut bob,
        json!({"type": "resume", "run_id": "run_never", "after_seq": 0}),
    )
    .await;
    assert_eq!(recv(&mut bob).await["reason"], "unknown_run");
    send(&mut bob, json!({"type": "cancel", "run_id": run})).await;
    assert_eq!(recv(&mut bob).await["calls"], 0);

    // alice: a wrong epoch, and a seq past the run's end.
    send(
        &mut alice,
        json!({"type": "resume", "run_id": run, "after_seq": 0, "epoch": epoch ^ 1}),
    )
    .await;
    assert_eq!(recv(&mut alice).await, resync("epoch_changed"));
    send(
        &mut alice,
        json!({"type": "resume", "run_id": run, "after_seq": 1_000_000}),
    )
    .await;
    assert_eq!(recv(&mut alice).await, resync("truncated"));
    // Her call was never touched.
    let m = metrics(addr).await;
    assert_eq!(
        (m["active"].as_u64(), m["by_status"]["cancelled"].as_u64()),
        (Some(1), Some(0))
    );
}

fn email(id: &str, to: &str) -> (String, &'static str, Value) {
    (
        id.to_owned(),
        "send_email",
        json!({"to": to, "subject": "hello", "body": "see you"}),
    )
}

fn emails(calls: &[(String, &'static str, Value)]) -> Value {
    let calls: Vec<(&str, &str, Value)> = calls
        .iter()
        .map(|(id, name, args)| (id.as_str(), *name, args.clone()))
        .collect();
    openai(&calls)
}

#[tokio::test]
async fn approvals_over_the_socket_are_answered_by_their_user_only_and_once() {
    let (addr, _server) = start().await;
    let (mut alice, ready) = connect_ready(addr, "alice-token").await;
    assert!(
        ready["tools"]
            .as_array()
            .unwrap()
            .contains(&json!("send_email"))
    );
    let mut bob = connect(addr, "bob-token").await;
    send(
        &mut alice,
        emails(&[
            email("e1", "ann@example.com"),
            email("e2", "boss@example.com"),
        ]),
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.extend(until(&mut alice, |m| m["type"] == "tool_approval_required").await);
    }
    let requests: Vec<&Value> = seen
        .iter()
        .filter(|m| m["type"] == "tool_approval_required")
        .collect();
    for r in &requests {
        assert!(r["seq"].is_u64() && r["expires_at"].is_string(), "{r}");
        assert_eq!(r["reason"], "sends an email in your name");
        assert_eq!(r["parameters"]["subject"], "hello");
    }

    let decide = |call: &str, decision: &str| {
        json!({"type": "tool_approval_decision", "call_id": call, "decision": decision,
               "message": "not to my boss"})
    };
    // bob answering for alice's call, and alice answering a call that does not exist:
    // the same error, and nothing changes.
    send(&mut bob, decide("e1", "approve")).await;
    let foreign = recv(&mut bob).await;
    send(&mut alice, decide("e_never", "approve")).await;
    let unknown = recv(&mut alice).await;
    assert_eq!(foreign["type"], "error");
    let text = |m: &Value| {
        m["error"]
            .as_str()
            .unwrap()
            .split(':')
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(text(&foreign), text(&unknown));
    assert_eq!(text(&foreign), "no such pending approval");
    for bad in [
        json!({"type": "tool_approval_decision", "call_id": "e1", "decision": "maybe"}),
        json!({"type": "tool_approval_decision", "decision": "approve"}),
        json!({"type": "tool_approval_decision", "call_id": "e1", "decision": "reject", "message": 5}),
        json!({"type": "tool_approval_decision", "call_id": ["e1"], "decision": "approve"}),
    ] {
        send(&mut alice, bad.clone()).await;
        assert_eq!(recv(&mut alice).await["type"], "error", "{bad}");
    }

    send(&mut alice, decide("e1", "approve")).await;
    send(&mut alice, decide("e2", "reject")).await;
    send(&mut alice, decide("e1", "approve")).await; // a second answer
    let rest = until_results(&mut alice).await;
    assert!(
        rest.contains(
            &json!({"type": "decision_recorded", "call_id": "e1", "decision": "approve"})
        )
    );
    assert!(
        rest.contains(&json!({"type": "decision_recorded", "call_id": "e2", "decision": "reject"}))
    );
    let again: Vec<&Value> = rest.iter().filter(|m| m["type"] == "error").collect();
    assert_eq!(again.len(), 1, "the second answer is refused: {rest:?}");
    let all: Vec<Value> = seen.into_iter().chain(rest).collect();
    let e1 = completed(&all, "e1");
    assert_eq!(
        (e1["status"].as_str(), e1["approval"]["decision"].as_str()),
        (Some("success"), Some("approved"))
    );
    let e2 = completed(&all, "e2");
    assert_eq!(e2["status"], "rejected");
    assert!(
        e2["error"].as_str().unwrap().contains("not to my boss"),
        "{e2}"
    );
    let results = all.last().unwrap();
    assert!(
        results["results"][1]["content"]
            .as_str()
            .unwrap()
            .contains("not to my boss")
    );
    let m = metrics(addr).await;
    assert_eq!(
        (
            m["by_status"]["success"].as_u64(),
            m["by_status"]["rejected"].as_u64()
        ),
        (Some(1), Some(1))
    );
}

#[tokio::test]
async fn a_pending_approval_is_replayed_on_resume_and_answered_on_the_new_socket() {
    let (addr, _server) = start().await;
    let (mut ws, ready) = connect_ready(addr, "bob-token").await;
    let run = ready["run_id"].clone();
    send(&mut ws, emails(&[email("e3", "ann@example.com")])).await;
    let first = until(&mut ws, |m| m["type"] == "tool_executing").await;
    let last = *seqs(&first).last().unwrap();
    drop(ws);
    let mut ws = connect(addr, "bob-token").await;
    send(
        &mut ws,
        json!({"type": "resume", "run_id": run, "after_seq": last}),
    )
    .await;
    let replayed = until(&mut ws, |m| m["type"] == "tool_approval_required").await;
    assert_eq!(replayed[0]["type"], "resumed");
    assert_eq!(replayed[1]["seq"], last + 1);
    send(
        &mut ws,
        json!({"type": "tool_approval_decision", "call_id": "e3", "decision": "approve"}),
    )
    .await;
    let rest = until_results(&mut ws).await;
    assert_eq!(completed(&rest, "e3")["status"], "success");
    let all: Vec<Value> = first.into_iter().chain(replayed).chain(rest).collect();
    seqs(&all);
}

#[tokio::test]
async fn unknown_or_missing_token_is_refused_before_the_upgrade() {
    let (addr, _server) = start().await;
    for url in [
        format!("ws://{addr}/ws?token=mallory-token"),
        format!("ws://{addr}/ws"),
    ] {
        match tokio_tungstenite::connect_async(&url).await {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401, "{url}"),
            other => panic!("{url}: expected HTTP 401, got {other:?}"),
        }
    }
    // The bearer header works as well as the query parameter.
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}/ws"))
            .unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer bob-token".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(recv(&mut ws).await["user_id"], "bob");
    // Without upgrade headers and without a token: still 401, not an upgrade error,
    // so the token check comes first.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    assert_eq!(metrics(addr).await["total"], 0);
}

#[tokio::test]
async fn a_malformed_message_gets_an_error_and_the_connection_stays_usable() {
    let (addr, _server) = start().await;
    let mut ws = connect(addr, "alice-token").await;
    for bad in [
        "{ not json".to_owned(),
        json!({"role": "assistant", "content": "just text"}).to_string(),
        json!({"role": "assistant", "tool_calls": [{"id": "x", "type": "function"}]}).to_string(),
        json!({"role": "assistant", "tool_calls": []}).to_string(),
        "[1, 2]".to_owned(),
        "\"resume\"".to_owned(),
        json!({"type": "bogus"}).to_string(),
        json!({"type": {"nested": "x".repeat(10_000)}}).to_string(),
        json!({"type": "resume", "after_seq": 1}).to_string(),
        json!({"type": "resume", "run_id": 5, "after_seq": 1}).to_string(),
        json!({"type": "resume", "run_id": "r"}).to_string(),
        json!({"type": "resume", "run_id": "r", "after_seq": -1}).to_string(),
        json!({"type": "resume", "run_id": "r", "after_seq": 1.5}).to_string(),
        json!({"type": "resume", "run_id": "r", "after_seq": "7"}).to_string(),
        json!({"type": "resume", "run_id": "r", "after_seq": 1e30}).to_string(),
        json!({"type": "resume", "run_id": "r", "after_seq": u64::MAX}).to_string(),
        json!({"type": "resume", "run_id": "r", "after_seq": 1, "epoch": "x"}).to_string(),
        json!({"type": "cancel"}).to_string(),
        json!({"type": "cancel", "run_id": null}).to_string(),
        json!({"role": "assistant", "run_id": "", "tool_calls": [{"id": "c", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}]})
        .to_string(),
        json!({"role": "assistant", "run_id": "r".repeat(5_000), "tool_calls": [{"id": "c",
            "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]})
        .to_string(),
    ] {
        ws.send(Message::text(bad.clone())).await.unwrap();
        let m = recv(&mut ws).await;
        assert_eq!(m["type"], "error", "{bad} → {m}");
        let text = m["error"].as_str().unwrap();
        assert!(
            text.starts_with("malformed message") || text.starts_with("bad run_id"),
            "{m}"
        );
        assert!(
            text.len() < 400,
            "the error quotes too much: {} bytes",
            text.len()
        );
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(recv(&mut ws).await["type"], "error");

    // Arguments that are not valid JSON are a bad *call*, answered in-band.
    let bad_args = json!({"role": "assistant", "tool_calls": [{"id": "call_bad", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": "}}]});
    send(&mut ws, bad_args).await;
    let msgs = until_results(&mut ws).await;
    assert_eq!(completed(&msgs, "call_bad")["status"], "invalid_input");
    assert!(
        msgs.last().unwrap()["results"][0]["content"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );

    // Still usable.
    send(
        &mut ws,
        openai(&[("call_ok", "get_weather", json!({"city": "Paris"}))]),
    )
    .await;
    let msgs = until_results(&mut ws).await;
    assert_eq!(completed(&msgs, "call_ok")["status"], "success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_with_an_error_and_close_1009() {
    let (addr, server) = start().await;
    let mut log = server.subscribe();
    let mut ws = connect(addr, "bob-token").await;
    let big = json!({"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
        "function": {"name": "get_weather", "arguments": "x".repeat(MAX_MESSAGE_BYTES + 1)}}]});
    // The client may see its write fail once the server closes; that is fine.
    let _ = ws.send(Message::text(big.to_string())).await;
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "error");
    assert!(
        m["error"]
            .as_str()
            .unwrap()
            .contains("larger than 65536 bytes"),
        "{m}"
    );
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected a close frame, got {other:?}"),
    }
    wait_log(&mut log, |e| matches!(e, ServerLog::Disconnected { .. })).await;
    assert_eq!(metrics(addr).await["total"], 0, "nothing was dispatched");
    // Others can still connect and be served.
    let mut ws = connect(addr, "alice-token").await;
    send(
        &mut ws,
        openai(&[("call_after", "get_weather", json!({"city": "Paris"}))]),
    )
    .await;
    assert_eq!(
        completed(&until_results(&mut ws).await, "call_after")["status"],
        "success"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_slows_nobody_and_is_let_go() {
    let (addr, server) = start_with(chat_server::demo_engine(), Duration::from_millis(200)).await;
    let mut log = server.subscribe();
    let (mut stalled, ready) = connect_ready(addr, "alice-token").await;
    let mut bob = connect(addr, "bob-token").await;

    // 20,000 updates of 16 KiB (~320 MiB) towards a client that never reads: far more
    // than the socket buffers and the run log hold.
    send(
        &mut stalled,
        openai(&[(
            "call_flood",
            "firehose",
            json!({"events": 20_000, "bytes": 16_384}),
        )]),
    )
    .await;

    // bob is served meanwhile.
    send(
        &mut bob,
        openai(&[("call_bob", "get_weather", json!({"city": "Paris"}))]),
    )
    .await;
    let b = until_results(&mut bob).await;
    check_events(&b, "bob");
    assert_eq!(completed(&b, "call_bob")["status"], "success");

    // The run never waited for the socket: every update was recorded, and so were
    // the results; the log kept only its bound. And the server let the stalled
    // connection go rather than buffer for it (in either order).
    let (mut done, mut gone) = (None, false);
    while done.is_none() || !gone {
        match log.recv().await.unwrap() {
            e @ ServerLog::MessageDone { .. } if matches!(&e, ServerLog::MessageDone { user_id, .. } if user_id == "alice") => {
                done = Some(e)
            }
            ServerLog::Disconnected { user_id, .. } => gone |= user_id == "alice",
            _ => {}
        }
    }
    assert!(
        matches!(
            done,
            Some(ServerLog::MessageDone {
                delivered: true,
                ..
            })
        ),
        "{done:?}"
    );
    let m = server.engine().metrics();
    assert_eq!(
        (m.by_status["success"], m.progress_dropped, m.sink_failures),
        (2, 0, 0)
    );
    assert!(
        server.runs().stats().bytes <= 4 << 20,
        "{:?}",
        server.runs().stats()
    );
    // Resuming from the start now asks for evicted frames.
    let mut again = connect(addr, "alice-token").await;
    send(
        &mut again,
        json!({"type": "resume", "run_id": ready["run_id"], "after_seq": 0}),
    )
    .await;
    assert_eq!(recv(&mut again).await["reason"], "truncated");
    drop(stalled);
}

#[test]
fn options_come_from_the_flags_then_the_environment_then_the_defaults() {
    use chat_server::{DEFAULT_GRACE, Options, options_from};
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let opts = |port, grace| Options {
        port,
        grace,
        rate_per_minute: None,
        redis: None,
        node: None,
    };
    assert_eq!(
        options_from(args(&["--port", "0"]), Some("9".into()), None),
        Ok(opts(0, DEFAULT_GRACE))
    );
    assert_eq!(
        options_from(args(&["--port=4001", "--grace-secs", "5"]), None, None),
        Ok(opts(4001, Duration::from_secs(5)))
    );
    assert_eq!(
        options_from(args(&["--grace-secs=0"]), Some("8080".into()), None),
        Ok(opts(8080, Duration::ZERO))
    );
    assert_eq!(
        options_from(args(&[]), None, None),
        Ok(opts(3000, DEFAULT_GRACE))
    );
    let cluster = options_from(
        args(&["--rate-per-minute", "5", "--node", "a", "--port", "0"]),
        None,
        Some("redis://127.0.0.1:6379".into()),
    )
    .unwrap();
    assert_eq!(
        (
            cluster.rate_per_minute,
            cluster.redis.as_deref(),
            cluster.node.as_deref()
        ),
        (Some(5), Some("redis://127.0.0.1:6379"), Some("a"))
    );
    let flag_wins = options_from(
        args(&["--redis", "redis://x:1"]),
        None,
        Some("redis://y:2".into()),
    );
    assert_eq!(flag_wins.unwrap().redis.as_deref(), Some("redis://x:1"));
    for bad in [
        &["--port"][..],
        &["--verbose"],
        &["--grace-secs", "-1"],
        &["--grace-secs", "soon"],
        &["--grace-secs", "99999999999999999999999"],
        &["--rate-per-minute", "0"],
        &["--rate-per-minute", "-5"],
        &["--redis"],
        &["--node"],
    ] {
        assert!(options_from(args(bad), None, None).is_err(), "{bad:?}");
    }
    assert!(options_from(args(&[]), Some("http".into()), None).is_err());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn reconnecting_a_thousand_times_leaves_one_grace_timer_per_run() {
    let (addr, server) = start_with_grace(Duration::from_secs(30)).await;
    let mut log = server.subscribe();
    let (mut ws, ready) = connect_ready(addr, "alice-token").await;
    let run = ready["run_id"].clone();
    send(&mut ws, forever("call_long")).await;
    until(&mut ws, |m| m["type"] == "tool_executing").await;
    drop(ws);
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let mut after_first = None;
    for i in 0..1_000 {
        let mut ws = connect(addr, "alice-token").await;
        send(
            &mut ws,
            json!({"type": "resume", "run_id": run, "after_seq": 0}),
        )
        .await;
        assert_eq!(recv(&mut ws).await["type"], "resumed");
        drop(ws);
        wait_log(&mut log, |e| matches!(e, ServerLog::Disconnected { .. })).await;
        if i == 9 {
            after_first = Some(tasks());
        }
    }
    // Connections that never started a call leave no timer; the run leaves one.
    assert!(
        tasks() <= after_first.unwrap() + 2,
        "{} tasks after 1,000 reconnects, {after_first:?} after 10",
        tasks()
    );
    let abandoned = wait_log(&mut log, |e| matches!(e, ServerLog::RunAbandoned { .. })).await;
    assert!(
        matches!(abandoned, ServerLog::RunAbandoned { cancelled: 1, .. }),
        "{abandoned:?}"
    );
}

#[cfg(feature = "redis")]
#[allow(dead_code)] // shared with tests/redis.rs, which uses all of it
#[path = "common/redis_server.rs"]
mod redis_server;

/// Two chat servers ("nodes") sharing one Redis: runs, rate, cancellation and
/// approvals hold across them.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_redis_share_runs_rate_cancellation_and_approvals() {
    use tool_dispatch::redis::{Redis, RedisConfig};
    use tool_dispatch::{RunLog, RunLogConfig};
    let Some(redis_server) = redis_server::RedisServer::start() else {
        return;
    };
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let redis = Redis::connect(
            &redis_server.url(),
            RedisConfig::default().prefix("chat-test"),
        )
        .await
        .unwrap();
        let engine = chat_server::demo_engine_builder(Some(5))
            .redis(&redis)
            .build();
        let runs = RunLog::redis(RunLogConfig::default(), &redis)
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A short grace period: a run its client left on A and resumed on B must not
        // be cancelled by A.
        let server = Server::new(engine, chat_server::demo_users())
            .node(name)
            .run_log(runs)
            .grace(Duration::from_millis(300));
        tokio::spawn(chat_server::serve(listener, server.clone()));
        nodes.push(addr);
    }
    // alice's run on A, dropped after its first progress, resumed on B past A's
    // grace period (the call takes 900 ms, the grace 300 ms): every later frame once,
    // in order, and the call is not cancelled.
    let (mut first, ready) = connect_ready(nodes[0], "alice-token").await;
    let slow = json!({"steps": 6, "step_ms": 150});
    send(&mut first, openai(&[("call_moved", "slow_task", slow)])).await;
    let before = until(&mut first, |m| m["type"] == "tool_progress").await;
    let last = before.last().unwrap()["seq"].as_u64().unwrap();
    drop(first);
    let (mut moved, ready_moved) = connect_ready(nodes[1], "alice-token").await;
    assert_eq!(
        ready_moved["epoch"], ready["epoch"],
        "one epoch for the cluster"
    );
    send(
        &mut moved,
        json!({"type": "resume", "run_id": ready["run_id"], "after_seq": last,
               "epoch": ready["epoch"]}),
    )
    .await;
    assert_eq!(recv(&mut moved).await["type"], "resumed");
    let after = until_results(&mut moved).await;
    let seqs: Vec<u64> = after.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(
        seqs,
        (last + 1..last + 1 + seqs.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(completed(&after, "call_moved")["status"], "success");
    drop(moved);

    let (mut on_a, ready_a) = connect_ready(nodes[0], "alice-token").await;
    let (mut on_b, ready_b) = connect_ready(nodes[1], "alice-token").await;
    assert_eq!(
        (ready_a["node"].as_str(), ready_b["node"].as_str()),
        (Some("a"), Some("b"))
    );

    // Alternating nodes, quota 5 a minute, slow_task was the first: four more
    // succeed; the 6th is refused.
    let mut statuses = vec!["success".to_owned()];
    for i in 1..6 {
        let ws = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        let id = format!("call_q{i}");
        send(
            ws,
            openai(&[(&id, "get_weather", json!({"city": "Paris"}))]),
        )
        .await;
        let msgs = until_results(ws).await;
        statuses.push(completed(&msgs, &id)["status"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        statuses,
        [
            "success",
            "success",
            "success",
            "success",
            "success",
            "rate_limited"
        ]
    );

    // bob's call waits for approval on A; he answers on B; it runs on A.
    let (mut bob_a, _) = connect_ready(nodes[0], "bob-token").await;
    let (mut bob_b, _) = connect_ready(nodes[1], "bob-token").await;
    send(&mut bob_a, emails(&[email("e_cross", "ann@example.com")])).await;
    until(&mut bob_a, |m| m["type"] == "tool_approval_required").await;
    send(
        &mut bob_b,
        json!({"type": "tool_approval_decision", "call_id": "e_cross", "decision": "approve"}),
    )
    .await;
    assert_eq!(recv(&mut bob_b).await["type"], "decision_recorded");
    let rest = until_results(&mut bob_a).await;
    assert_eq!(completed(&rest, "e_cross")["status"], "success");

    // bob's long call on A; "stop" pressed on B reaches it.
    let (mut bob_a2, ready) = connect_ready(nodes[0], "bob-token").await;
    send(&mut bob_a2, forever("call_far")).await;
    until(&mut bob_a2, |m| m["type"] == "tool_executing").await;
    send(
        &mut bob_b,
        json!({"type": "cancel", "run_id": ready["run_id"]}),
    )
    .await;
    let told = recv(&mut bob_b).await;
    assert_eq!(
        (told["calls"].as_u64(), told["other_nodes_told"].as_bool()),
        (Some(0), Some(true))
    );
    let rest = until_results(&mut bob_a2).await;
    assert_eq!(completed(&rest, "call_far")["status"], "cancelled");
}

/// A call made by alice's MCP client (rmcp's, over `/mcp` with her bearer token)
/// shows up live on her WebSocket, in her run `mcp`, and nowhere on bob's; Stop on
/// that run from her page ends her MCP call.
#[cfg(feature = "mcp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_made_over_mcp_shows_up_in_its_users_run_stream() {
    use rmcp::ServiceExt;
    use rmcp::model::CallToolRequestParams;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    let (addr, server) = start().await;
    let (mut alice_ws, _) = connect_ready(addr, "alice-token").await;
    let (mut bob_ws, _) = connect_ready(addr, "bob-token").await;
    let config = StreamableHttpClientTransportConfig::with_uri(format!("http://{addr}/mcp"))
        .auth_header("alice-token".to_owned());
    let client =
        ().serve(StreamableHttpClientTransport::from_config(config))
            .await
            .expect("an MCP session over the chat server's /mcp");
    let args = json!({"city": "Paris"}).as_object().cloned().unwrap();
    let result = client
        .call_tool(CallToolRequestParams::new("get_weather").with_arguments(args))
        .await
        .unwrap();
    assert_eq!(result.is_error, Some(false));
    let frames = until(&mut alice_ws, |m| m["type"] == "tool_completed").await;
    let kinds: Vec<&str> = frames.iter().filter_map(|m| m["type"].as_str()).collect();
    assert_eq!(kinds, ["tool_executing", "tool_progress", "tool_completed"]);
    assert!(
        frames
            .iter()
            .all(|m| m["run_id"] == chat_server::MCP_RUN && m["seq"].is_u64())
    );
    assert_eq!(frames[2]["status"], "success");

    // A call that needs her approval waits for it on her own stream: the request
    // shows on her page, she approves there, the MCP client gets the result.
    let email = json!({"to": "ann@example.com", "subject": "hi", "body": "x"});
    let mail = CallToolRequestParams::new("send_email")
        .with_arguments(email.as_object().cloned().unwrap());
    let peer = client.peer().clone();
    let asked = tokio::spawn(async move { peer.call_tool(mail).await });
    let request = until(&mut alice_ws, |m| m["type"] == "tool_approval_required").await;
    let call_id = request.last().unwrap()["call_id"].clone();
    assert_eq!(request.last().unwrap()["run_id"], chat_server::MCP_RUN);
    send(
        &mut alice_ws,
        json!({"type": "tool_approval_decision", "call_id": call_id, "decision": "approve"}),
    )
    .await;
    let sent = tokio::time::timeout(Duration::from_secs(10), asked)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(sent.is_error, Some(false), "{sent:?}");
    assert_eq!(sent.structured_content.unwrap()["sent"], true);
    until(&mut alice_ws, |m| m["type"] == "tool_completed").await;

    // Stop pressed for the run `mcp` on her page ends her MCP call.
    let long = CallToolRequestParams::new("slow_task").with_arguments(
        json!({"steps": 1000, "step_ms": 60000})
            .as_object()
            .cloned()
            .unwrap(),
    );
    let pending = tokio::spawn(async move { client.call_tool(long).await });
    until(&mut alice_ws, |m| m["type"] == "tool_executing").await;
    send(
        &mut alice_ws,
        json!({"type": "cancel", "run_id": chat_server::MCP_RUN}),
    )
    .await;
    let rest = until(&mut alice_ws, |m| m["type"] == "tool_completed").await;
    assert_eq!(rest.last().unwrap()["status"], "cancelled");
    let outcome = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(outcome.is_error, Some(true), "{outcome:?}");
    // bob saw none of it: the first thing on his socket is the answer to his own
    // request, sent after all of alice's frames.
    send(
        &mut bob_ws,
        json!({"type": "resume", "run_id": chat_server::MCP_RUN, "after_seq": 999}),
    )
    .await;
    let first = recv(&mut bob_ws).await;
    assert_eq!(first["type"], "resync_required", "bob got {first}");
    assert_eq!(server.engine().active(), 0);
}
