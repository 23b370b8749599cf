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

async fn start() -> (SocketAddr, Server) {
    start_with(chat_server::demo_engine(), Duration::from_secs(5)).await
}

/// Connects with `token` and reads the `ready` message.
async fn connect(addr: SocketAddr, token: &str) -> Ws {
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let ready = recv(&mut ws).await;
    assert_eq!(ready["type"], "ready", "{ready}");
    ws
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

/// `GET /metrics` over a plain HTTP/1.1 connection.
async fn metrics(addr: SocketAddr) -> Value {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnecting_mid_call_cancels_it_while_the_other_user_is_served() {
    let (addr, server) = start().await;
    let mut log = server.subscribe();
    let mut alice = connect(addr, "alice-token").await;
    let mut bob = connect(addr, "bob-token").await;

    // A call that cannot finish during the test: it runs until cancelled.
    send(
        &mut alice,
        openai(&[(
            "call_forever",
            "slow_task",
            json!({"steps": 1_000_000, "step_ms": 60_000}),
        )]),
    )
    .await;
    let exec = recv(&mut alice).await;
    assert_eq!(
        (exec["type"].as_str(), exec["call_id"].as_str()),
        (Some("tool_executing"), Some("call_forever"))
    );
    // bob also has a call in flight, which must survive alice leaving.
    send(
        &mut bob,
        anthropic(&[(
            "toolu_bob_slow",
            "slow_task",
            json!({"steps": 2, "step_ms": 1}),
        )]),
    )
    .await;
    assert_eq!(metrics(addr).await["by_status"]["cancelled"], 0);

    drop(alice); // the browser tab closes: no closing handshake
    let gone = wait_log(
        &mut log,
        |e| matches!(e, ServerLog::Disconnected { user_id, .. } if user_id == "alice"),
    )
    .await;
    assert_eq!(
        gone,
        ServerLog::Disconnected {
            user_id: "alice".into(),
            cancelled: 1
        }
    );

    let m = metrics(addr).await;
    assert_eq!(m["by_status"]["cancelled"], 1, "{m}");
    assert!(
        m["active_users"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["user_id"] != "alice"),
        "{m}"
    );

    // bob: his call completes normally, then a new one too.
    let b = until_results(&mut bob).await;
    check_events(&b, "bob");
    assert_eq!(completed(&b, "toolu_bob_slow")["status"], "success");
    send(
        &mut bob,
        openai(&[("call_bob_2", "get_weather", json!({"city": "London"}))]),
    )
    .await;
    let b = until_results(&mut bob).await;
    assert_eq!(completed(&b, "call_bob_2")["status"], "success");
    let m = metrics(addr).await;
    assert_eq!(
        (
            m["by_status"]["cancelled"].as_u64(),
            m["by_status"]["success"].as_u64()
        ),
        (Some(1), Some(2))
    );
    assert_eq!(m["active"], 0);
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
    ] {
        ws.send(Message::text(bad.clone())).await.unwrap();
        let m = recv(&mut ws).await;
        assert_eq!(m["type"], "error", "{bad} → {m}");
        assert!(
            m["error"]
                .as_str()
                .unwrap()
                .starts_with("malformed message"),
            "{m}"
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
async fn a_client_that_stops_reading_fills_only_its_own_bounded_queue() {
    // Short delivery bounds so the stalled call ends quickly; no assertion uses time.
    let engine = Engine::builder(chat_server::demo_registry())
        .delivery_timeout(Duration::from_millis(200))
        .build();
    let (addr, server) = start_with(engine, Duration::from_millis(200)).await;
    let mut log = server.subscribe();
    let mut stalled = connect(addr, "alice-token").await;
    let mut bob = connect(addr, "bob-token").await;

    // 20,000 updates of 16 KiB (~320 MiB) towards a client that never reads: far more
    // than the socket buffers hold, so the queue fills and stays full.
    send(
        &mut stalled,
        openai(&[(
            "call_flood",
            "firehose",
            json!({"events": 20_000, "bytes": 16_384}),
        )]),
    )
    .await;

    // bob is served while alice's queue is full.
    send(
        &mut bob,
        openai(&[("call_bob", "get_weather", json!({"city": "Paris"}))]),
    )
    .await;
    let b = until_results(&mut bob).await;
    check_events(&b, "bob");
    assert_eq!(completed(&b, "call_bob")["status"], "success");

    let done = wait_log(
        &mut log,
        |e| matches!(e, ServerLog::MessageDone { user_id, .. } if user_id == "alice"),
    )
    .await;
    assert_eq!(
        done,
        ServerLog::MessageDone {
            user_id: "alice".into(),
            call_ids: vec!["call_flood".into()],
            delivered: false
        }
    );
    let m = metrics(addr).await;
    // The call itself succeeded (the tool's result is not lost to the caller), but
    // what could not be delivered is counted, not buffered.
    assert_eq!(m["by_status"]["success"], 2, "{m}");
    assert!(m["progress_dropped"].as_u64().unwrap() > 0, "{m}");
    assert!(
        m["sink_failures"].as_u64().unwrap() >= 1,
        "tool_completed was undeliverable: {m}"
    );
    drop(stalled);
}

#[test]
fn the_port_comes_from_the_flag_then_the_environment_then_3000() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        chat_server::port_from(args(&["--port", "0"]), Some("9".into())),
        Ok(0)
    );
    assert_eq!(
        chat_server::port_from(args(&["--port=4001"]), None),
        Ok(4001)
    );
    assert_eq!(
        chat_server::port_from(args(&[]), Some("8080".into())),
        Ok(8080)
    );
    assert_eq!(chat_server::port_from(args(&[]), None), Ok(3000));
    assert!(chat_server::port_from(args(&["--port"]), None).is_err());
    assert!(chat_server::port_from(args(&["--verbose"]), None).is_err());
    assert!(chat_server::port_from(args(&[]), Some("http".into())).is_err());
}
