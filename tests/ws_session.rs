//! The session (`tool_dispatch::ws`) served over real sockets: who may connect (401
//! before the upgrade, 403 for a foreign page), each user's turns and events kept
//! apart, and hostile messages (malformed, unknown, binary, oversized, too many)
//! answered with an `error` frame or the documented close while others are served.
#![cfg(feature = "axum")]

mod common;

use common::ws::*;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};
use tool_dispatch::ws::{WsEvent, WsServer};

/// The status line of a `GET /ws` with these extra headers, sent by hand.
async fn raw_status(addr: std::net::SocketAddr, path: &str, headers: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    raw.lines().next().unwrap_or_default().to_owned()
}

/// A WebSocket handshake with `headers`: its HTTP status.
async fn handshake(url: String, headers: &[(&'static str, &str)]) -> u16 {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut()
            .insert(*k, tungstenite::http::HeaderValue::from_str(v).unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((_, resp)) => resp.status().as_u16(),
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn unknown_tokens_get_401_and_foreign_pages_403_before_any_upgrade() {
    let server = WsServer::new(engine()).allow_origin("https://app.example.com");
    let addr = serve(server.clone()).await;
    let mut events = server.subscribe();
    let ws = |q: &str| format!("ws://{addr}/ws{q}");
    assert_eq!(handshake(ws("?token=mallory-token"), &[]).await, 401);
    assert_eq!(handshake(ws(""), &[]).await, 401);
    assert_eq!(
        handshake(ws(""), &[("authorization", "Bearer nope")]).await,
        401
    );
    assert_eq!(handshake(ws("?token=%ZZ"), &[]).await, 401);
    assert_eq!(
        handshake(ws(""), &[("authorization", "Bearer bob-token")]).await,
        101
    );
    assert_eq!(handshake(ws("?token=alice-token"), &[]).await, 101);
    // Pages: the same origin, a listed one, and others (with a good token).
    let own = format!("http://{addr}");
    assert_eq!(
        handshake(ws("?token=alice-token"), &[("origin", &own)]).await,
        101
    );
    let listed = [("origin", "https://app.example.com")];
    assert_eq!(handshake(ws("?token=alice-token"), &listed).await, 101);
    for foreign in [
        "https://evil.example",
        "null",
        "http://127.0.0.1:1",
        "garbage",
    ] {
        let h = [("origin", foreign)];
        assert_eq!(
            handshake(ws("?token=alice-token"), &h).await,
            403,
            "{foreign}"
        );
    }
    // Without upgrade headers: still 401 (the token check comes first), not an
    // upgrade error; and 403 for a foreign page.
    assert!(
        raw_status(addr, "/ws", "")
            .await
            .starts_with("HTTP/1.1 401")
    );
    let foreign = "Origin: https://evil.example\r\n";
    assert!(
        raw_status(addr, "/ws?token=alice-token", foreign)
            .await
            .starts_with("HTTP/1.1 403")
    );
    // Four handshakes were accepted; only they became sessions.
    for _ in 0..4 {
        wait_event(&mut events, |e| matches!(e, WsEvent::Connected { .. })).await;
    }
    assert_eq!(server.stats().sessions, 4);
    assert_eq!(server.engine().metrics().total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_at_once_each_get_their_own_events_in_order() {
    let (addr, server) = start().await;
    let (mut alice, ready) = connect_ready(addr, "alice-token").await;
    assert_eq!(ready["protocol_version"], 1);
    let mut bob = connect(addr, "bob-token").await;
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
    assert_eq!((seqs(&a).first(), seqs(&b).first()), (Some(&1), Some(&1)));
    let (a_text, b_text) = (json!(a).to_string(), json!(b).to_string());
    assert!(
        !a_text.contains("toolu_b") && !b_text.contains("call_a"),
        "streams mixed"
    );
    assert!(!a_text.contains("sk-secret"), "the secret reached the wire");
    let progress = a
        .iter()
        .filter(|m| m["type"] == "tool_progress" && m["call_id"] == "call_a2");
    assert_eq!(progress.count(), 3);
    assert_eq!(completed(&a, "call_a1")["result"]["temp_c"], 21.0);
    let results = a.last().unwrap();
    assert_eq!(results["format"], "openai");
    assert_eq!(
        results["call_ids"],
        json!(["call_a1", "call_a2", "call_a3"])
    );
    let ids: Vec<&str> = results["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["tool_call_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["call_a1", "call_a2", "call_a3"]);
    // bob lacks the admin scope: denied in-band, with is_error.
    assert_eq!(completed(&b, "toolu_b2")["status"], "denied");
    let blocks = b.last().unwrap()["results"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        (
            blocks[1]["tool_use_id"].as_str(),
            blocks[1]["is_error"].as_bool()
        ),
        (Some("toolu_b2"), Some(true))
    );
    let m = server.engine().metrics();
    assert_eq!(
        (
            m.total,
            m.by_status["success"],
            m.by_status["denied"],
            m.active
        ),
        (5, 4, 1, 0)
    );
}

#[tokio::test]
async fn a_malformed_message_gets_an_error_and_the_connection_stays_usable() {
    let (addr, server) = start().await;
    let mut ws = connect(addr, "alice-token").await;
    let bad = [
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
        json!({"type": "resume", "run_id": "r".repeat(5_000), "after_seq": 1}).to_string(),
        json!({"type": "cancel"}).to_string(),
        json!({"type": "cancel", "run_id": null}).to_string(),
        json!({"type": "tool_approval_decision", "call_id": "e1", "decision": "maybe"}).to_string(),
        json!({"type": "tool_approval_decision", "decision": "approve"}).to_string(),
        json!({"role": "assistant", "run_id": "", "tool_calls": [{"id": "c", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}]})
        .to_string(),
        json!({"role": "assistant", "run_id": "r".repeat(5_000), "tool_calls": [{"id": "c",
            "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]})
        .to_string(),
        serde_json::to_string(&openai(&vec![
            ("c", "get_weather", json!({"city": "x"}));
            17
        ]))
        .unwrap(),
    ];
    for text in &bad {
        ws.send(Message::text(text.clone())).await.unwrap();
        let m = recv(&mut ws).await;
        assert_eq!(m["type"], "error", "{text} → {m}");
        let error = m["error"].as_str().unwrap();
        assert!(
            error.starts_with("malformed message") || error.starts_with("bad run_id"),
            "{m}"
        );
        assert!(
            error.len() < 400,
            "the error quotes too much: {} bytes",
            error.len()
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
    // Still usable.
    send(
        &mut ws,
        openai(&[("call_ok", "get_weather", json!({"city": "Paris"}))]),
    )
    .await;
    assert_eq!(
        completed(&until_results(&mut ws).await, "call_ok")["status"],
        "success"
    );
    let stats = server.stats();
    assert_eq!(stats.error_frames, bad.len() as u64 + 1);
    assert_eq!(stats.messages_in, bad.len() as u64 + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_with_an_error_and_close_1009() {
    let server = WsServer::new(engine()).max_message_bytes(16 * 1024);
    let addr = serve(server.clone()).await;
    let mut events = server.subscribe();
    let mut ws = connect(addr, "bob-token").await;
    let big = openai(&[("c", "get_weather", json!({"city": "x".repeat(16 * 1024)}))]);
    // The client may see its write fail once the server closes; that is fine.
    let _ = ws.send(Message::text(big.to_string())).await;
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "error");
    assert!(
        m["error"]
            .as_str()
            .unwrap()
            .contains("larger than 16384 bytes"),
        "{m}"
    );
    match futures_util::StreamExt::next(&mut ws).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected a close frame, got {other:?}"),
    }
    wait_event(&mut events, |e| gone(e, "bob")).await;
    assert_eq!(server.engine().metrics().total, 0, "nothing was dispatched");
    assert_eq!(server.stats().closed_protocol, 1);
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

#[tokio::test]
async fn messages_the_session_does_not_know_go_to_the_apps_hook() {
    let server = WsServer::new(engine()).on_message(|session, msg: Value| async move {
        match msg["type"].as_str() {
            Some("chat") => {
                let reply = json!({"type": "chat_reply", "to": session.user().user_id(),
                                   "run_id": session.run_id(), "echo": msg["text"]});
                session.send(reply).await.map_err(|e| e.to_string())
            }
            _ => Err(format!("this app does not know {}", msg["type"])),
        }
    });
    let addr = serve(server.clone()).await;
    let (mut ws, ready) = connect_ready(addr, "bob-token").await;
    send(&mut ws, json!({"type": "chat", "text": "hello"})).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "chat_reply", "to": "bob", "run_id": ready["run_id"], "echo": "hello"})
    );
    send(&mut ws, json!({"type": "other"})).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "error", "error": "this app does not know \"other\""})
    );
    // The session's own frames still are the session's.
    send(
        &mut ws,
        json!({"type": "resume", "run_id": "run_x", "after_seq": 0}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["reason"], "unknown_run");
}
