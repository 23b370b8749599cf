//! Runs over real sockets: a disconnect does not cancel (the grace period, on tokio's
//! paused clock), `cancel` ends one run's calls, an approval is answered by its own
//! user once, a server-side agent loop's calls reach the connections following its
//! run (live and on resume), a client that stops reading slows nobody and is let go,
//! and a silent connection is closed after the idle timeout.
#![cfg(feature = "axum")]

mod common;

use std::time::Duration;

use common::ws::*;
use serde_json::{Value, json};
use tool_dispatch::ToolCall;
use tool_dispatch::ws::{WsEvent, WsServer};

/// A served server whose connections are never closed for silence (the paused
/// clock runs far past any idle timeout while tests hold connections they do not
/// read).
async fn start_with_grace(grace: Duration) -> (std::net::SocketAddr, WsServer) {
    let server = WsServer::new(engine()).grace(grace).idle_timeout(None);
    (serve(server.clone()).await, server)
}

fn abandoned(e: &WsEvent) -> bool {
    matches!(e, WsEvent::RunAbandoned { .. })
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn without_a_resume_the_run_is_cancelled_after_the_grace_period() {
    let (addr, server) = start_with_grace(Duration::from_secs(30)).await;
    let mut events = server.subscribe();
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
    let e = wait_event(&mut events, abandoned).await;
    let expected = WsEvent::RunAbandoned {
        user_id: "alice".into(),
        run_id: run.clone(),
        cancelled: 1,
    };
    assert_eq!(e, expected);
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
    let mut events = server.subscribe();
    let (mut tab, ready) = connect_ready(addr, "alice-token").await;
    let run = ready["run_id"].as_str().unwrap().to_owned();
    send(&mut tab, forever("call_kept")).await;
    until(&mut tab, |m| m["type"] == "tool_executing").await;
    drop(tab);
    wait_event(&mut events, |e| gone(e, "alice")).await;
    let mut tab = connect(addr, "alice-token").await;
    send(
        &mut tab,
        json!({"type": "resume", "run_id": run, "after_seq": 0}),
    )
    .await;
    assert_eq!(recv(&mut tab).await["type"], "resumed");
    // Far past the grace period: the run is followed, so nothing is cancelled.
    tokio::time::sleep(Duration::from_secs(120)).await;
    let m = server.engine().metrics();
    assert_eq!((m.by_status["cancelled"], m.active), (0, 1), "{m:?}");
    while let Ok(e) = events.try_recv() {
        assert!(!abandoned(&e), "{e:?}");
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

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn reconnecting_a_thousand_times_leaves_one_grace_timer_per_run() {
    let (addr, server) = start_with_grace(Duration::from_secs(30)).await;
    let mut events = server.subscribe();
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
    let mut after_ten = None;
    for i in 0..1_000 {
        let mut ws = connect(addr, "alice-token").await;
        send(
            &mut ws,
            json!({"type": "resume", "run_id": run, "after_seq": 0}),
        )
        .await;
        assert_eq!(recv(&mut ws).await["type"], "resumed");
        drop(ws);
        wait_event(&mut events, |e| gone(e, "alice")).await;
        if i == 9 {
            after_ten = Some(tasks());
        }
    }
    // Connections that never started a call leave no timer; the run leaves one.
    let after_ten = after_ten.unwrap();
    assert!(
        tasks() <= after_ten + 2,
        "{} tasks after 1,000 reconnects, {after_ten} after 10",
        tasks()
    );
    let e = wait_event(&mut events, abandoned).await;
    assert!(
        matches!(e, WsEvent::RunAbandoned { cancelled: 1, .. }),
        "{e:?}"
    );
}

#[tokio::test]
async fn cancel_ends_the_runs_calls_at_once_and_only_that_run() {
    let (addr, server) = start().await;
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
    let told =
        json!({"type": "run_cancelled", "run_id": run, "calls": 1, "other_nodes_told": false});
    assert!(msgs.contains(&told), "{msgs:?}");
    let done = completed(&msgs, "call_a");
    assert_eq!(done["status"], "cancelled");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("run was cancelled"),
        "{done}"
    );
    let m = server.engine().metrics();
    assert_eq!((m.by_status["cancelled"], m.active), (1, 1));
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
async fn approvals_over_the_socket_are_answered_by_their_user_only_and_once() {
    let (addr, server) = start().await;
    let mut alice = connect(addr, "alice-token").await;
    let mut bob = connect(addr, "bob-token").await;
    let two = openai(&[
        ("e1", "send_email", json!({"to": "ann@example.com"})),
        ("e2", "send_email", json!({"to": "boss@example.com"})),
    ]);
    send(&mut alice, two).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.extend(until(&mut alice, |m| m["type"] == "tool_approval_required").await);
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
    let head = |m: &Value| {
        m["error"]
            .as_str()
            .unwrap()
            .split(':')
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(head(&foreign), head(&unknown));
    assert_eq!(head(&foreign), "no such pending approval");
    send(&mut alice, decide("e1", "approve")).await;
    send(&mut alice, decide("e2", "reject")).await;
    send(&mut alice, decide("e1", "approve")).await; // a second answer
    let rest = until_results(&mut alice).await;
    let recorded =
        |id: &str, d: &str| json!({"type": "decision_recorded", "call_id": id, "decision": d});
    assert!(rest.contains(&recorded("e1", "approve")) && rest.contains(&recorded("e2", "reject")));
    let again = rest.iter().filter(|m| m["type"] == "error").count();
    assert_eq!(again, 1, "the second answer is refused: {rest:?}");
    let all: Vec<Value> = seen.into_iter().chain(rest).collect();
    assert_eq!(completed(&all, "e1")["approval"]["decision"], "approved");
    let e2 = completed(&all, "e2");
    assert_eq!(e2["status"], "rejected");
    assert!(
        e2["error"].as_str().unwrap().contains("not to my boss"),
        "{e2}"
    );
    let m = server.engine().metrics();
    assert_eq!((m.by_status["success"], m.by_status["rejected"]), (1, 1));
}

/// A server-side agent loop works in alice's run through `WsServer::dispatcher`: a
/// connection following the run sees its calls live, approves one of them over the
/// socket, and after a drop resumes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_side_loops_calls_reach_the_connections_following_its_run() {
    let (addr, server) = start().await;
    let alice = user_of("alice-token");
    let d = server.dispatcher(&alice, "run_loop").unwrap();
    let (mut ws, ready) = connect_ready(addr, "alice-token").await;
    let resume = json!({"type": "resume", "run_id": "run_loop", "after_seq": 0,
                        "epoch": ready["epoch"]});
    send(&mut ws, resume).await;
    assert_eq!(recv(&mut ws).await["type"], "resumed");

    let weather = ToolCall::new("get_weather", json!({"city": "Paris"})).with_id("loop_1");
    let out = d.dispatch(weather).await.unwrap();
    assert_eq!(out.value["temp_c"], 21.0);
    let live = until(&mut ws, |m| m["type"] == "tool_completed").await;
    assert_eq!(check_events(&live, "alice"), ["loop_1"]);
    assert!(live.iter().all(|m| m["run_id"] == "run_loop"));
    // A call of the loop waits for alice's approval, answered on her socket.
    let mail = ToolCall::new("send_email", json!({"to": "ann@example.com"})).with_id("loop_2");
    let d2 = d.clone();
    let pending = tokio::spawn(async move { d2.dispatch(mail).await });
    let asked = until(&mut ws, |m| m["type"] == "tool_approval_required").await;
    assert_eq!(asked.last().unwrap()["call_id"], "loop_2");
    let approve =
        json!({"type": "tool_approval_decision", "call_id": "loop_2", "decision": "approve"});
    send(&mut ws, approve).await;
    assert!(pending.await.unwrap().is_ok());
    let done = until(&mut ws, |m| m["type"] == "tool_completed").await;
    let last = done.last().unwrap()["seq"].as_u64().unwrap();
    // The page drops; the loop goes on; a resume shows what it missed, once.
    drop(ws);
    let slow = ToolCall::new("slow_task", json!({"steps": 2, "step_ms": 1})).with_id("loop_3");
    d.dispatch(slow).await.unwrap();
    let mut ws = connect(addr, "alice-token").await;
    send(
        &mut ws,
        json!({"type": "resume", "run_id": "run_loop", "after_seq": last}),
    )
    .await;
    let rest = until(&mut ws, |m| m["type"] == "tool_completed").await;
    assert_eq!(rest[0]["type"], "resumed");
    assert_eq!(check_events(&rest, "alice"), ["loop_3"]);
    assert_eq!(seqs(&rest).first(), Some(&(last + 1)));
    // bob sees none of it.
    let mut bob = connect(addr, "bob-token").await;
    send(
        &mut bob,
        json!({"type": "resume", "run_id": "run_loop", "after_seq": 0}),
    )
    .await;
    assert_eq!(recv(&mut bob).await["reason"], "unknown_run");
}

/// The app's hook turns a chat message into a server-side loop in the connection's
/// own run: the page sees the loop's calls and the app's own record, in one stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_hook_runs_a_loop_in_the_connections_run() {
    let server = WsServer::new(engine()).on_message(|session, msg: Value| async move {
        let d = session.dispatcher(session.run_id()).await?;
        let city = msg["text"].as_str().unwrap_or("Paris").to_owned();
        let out = d
            .dispatch(ToolCall::new("get_weather", json!({"city": city})))
            .await
            .map_err(|e| e.to_string())?;
        let user = session.user().user_id();
        let writer = session.server().runs().writer(user, session.run_id());
        let answer =
            json!({"type": "assistant_text", "text": format!("{}: {}", city, out.value["temp_c"])});
        writer.append(answer).await.map_err(|e| e.to_string())?;
        Ok(())
    });
    let addr = serve(server.clone()).await;
    let (mut ws, ready) = connect_ready(addr, "alice-token").await;
    send(&mut ws, json!({"type": "chat", "text": "Tokyo"})).await;
    let msgs = until(&mut ws, |m| m["type"] == "assistant_text").await;
    check_events(&msgs, "alice");
    assert_eq!(msgs.last().unwrap()["text"], "Tokyo: 21.0");
    assert!(
        msgs.iter()
            .all(|m| m["run_id"].is_null() || m["run_id"] == ready["run_id"])
    );
    assert_eq!(seqs(&msgs), [1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_slows_nobody_and_is_let_go() {
    let server = WsServer::new(engine()).result_timeout(Duration::from_millis(200));
    let addr = serve(server.clone()).await;
    let mut events = server.subscribe();
    let (mut stalled, ready) = connect_ready(addr, "alice-token").await;
    let mut bob = connect(addr, "bob-token").await;
    // 20,000 updates of 16 KiB (~320 MiB) towards a client that never reads.
    let flood = json!({"events": 20_000, "bytes": 16_384});
    send(&mut stalled, openai(&[("call_flood", "firehose", flood)])).await;
    // bob is served meanwhile.
    send(
        &mut bob,
        openai(&[("call_bob", "get_weather", json!({"city": "Paris"}))]),
    )
    .await;
    let b = until_results(&mut bob).await;
    check_events(&b, "bob");
    assert_eq!(completed(&b, "call_bob")["status"], "success");
    // The run never waited for the socket: every update and the results were
    // recorded, the log kept only its bound, and the stalled client was let go.
    let (mut recorded, mut let_go) = (None, None);
    while recorded.is_none() || let_go.is_none() {
        match events.recv().await.unwrap() {
            WsEvent::TurnDone {
                user_id,
                recorded: r,
                ..
            } if user_id == "alice" => recorded = Some(r),
            WsEvent::Disconnected { user_id, end, .. } if user_id == "alice" => let_go = Some(end),
            _ => {}
        }
    }
    assert_eq!(recorded, Some(true));
    assert!(let_go.unwrap().starts_with("let go"));
    assert_eq!(server.stats().let_go_not_reading, 1);
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

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_connection_that_sends_nothing_is_closed_after_the_idle_timeout() {
    let server = WsServer::new(engine())
        .ping_interval(Some(Duration::from_secs(10)))
        .idle_timeout(Some(Duration::from_secs(25)));
    let addr = serve(server.clone()).await;
    let mut ws = connect(addr, "alice-token").await;
    // The client's library answers pings only while it reads; this one reads, so it
    // stays as long as it likes.
    let reading = async {
        loop {
            match futures_util::StreamExt::next(&mut ws).await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => {}
                other => return other,
            }
        }
    };
    let kept = tokio::time::timeout(Duration::from_secs(300), reading).await;
    assert!(kept.is_err(), "a reading client is kept: {kept:?}");
    assert_eq!(server.stats().closed_idle, 0);
    drop(ws);
    // One that stops reading stops answering pings, and is closed with 1001.
    let silent = connect(addr, "bob-token").await;
    let since = tokio::time::Instant::now();
    let mut events = server.subscribe();
    let e = wait_event(&mut events, |e| gone(e, "bob")).await;
    let WsEvent::Disconnected { end, .. } = e else {
        unreachable!()
    };
    assert!(end.starts_with("closed with 1001"), "{end}");
    assert_eq!(since.elapsed(), Duration::from_secs(25));
    assert_eq!(server.stats().closed_idle, 1);
    drop(silent);
}
