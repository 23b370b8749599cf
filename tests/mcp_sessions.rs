//! A session is its user's own, over real loopback HTTP, against an attacker who holds
//! a valid token of his own and has learned the victim's session id: every MCP
//! method and HTTP verb he tries on it gets the answer an unknown session gets and
//! changes nothing, while the victim's call runs on and her answer reaches her
//! alone. And a request reusing an id still in flight on its session is refused,
//! the first keeping its answer; a user opening sessions without end holds at most
//! `MAX_SESSIONS_PER_USER`.
#![cfg(feature = "mcp")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::mcp::*;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tool_dispatch::event::{Event, Status};
use tool_dispatch::mcp::McpServer;

/// A session id nobody was ever given (rmcp's are UUIDs).
const NEVER: &str = "6f1c2a4e-0000-4000-8000-000000000000";

/// What bob tries: every method's request, a notification, a response, on POST.
fn bodies(alices_request: &Value) -> Vec<(&'static str, String)> {
    vec![
        ("tools/list", r#"{"jsonrpc":"2.0","id":101,"method":"tools/list"}"#.into()),
        (
            "tools/call",
            r#"{"jsonrpc":"2.0","id":102,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#.into(),
        ),
        ("ping", r#"{"jsonrpc":"2.0","id":103,"method":"ping"}"#.into()),
        ("initialize", initialize(104, "2025-11-25")),
        ("resources/list", r#"{"jsonrpc":"2.0","id":105,"method":"resources/list"}"#.into()),
        ("unknown method", r#"{"jsonrpc":"2.0","id":106,"method":"no/such"}"#.into()),
        (
            "notifications/cancelled",
            json!({"jsonrpc":"2.0","method":"notifications/cancelled",
                   "params":{"requestId": alices_request, "reason":"bob"}})
            .to_string(),
        ),
        (
            "notifications/initialized",
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.into(),
        ),
        (
            "a response",
            r#"{"jsonrpc":"2.0","id":0,"result":{"action":"accept"}}"#.into(),
        ),
        ("an error", r#"{"jsonrpc":"2.0","id":0,"error":{"code":-1,"message":"x"}}"#.into()),
    ]
}

#[tokio::test]
async fn another_users_requests_on_a_session_get_the_unknown_session_answer_and_change_nothing() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate, Duration::from_secs(60));
    let events = Events::default();
    let server = events.attach(McpServer::per_request(e.clone()));
    let addr = serve(server.clone()).await;
    let raw = Raw::new(addr);
    let session = raw.session("alice-token").await;

    // alice's call: in flight, its stream open, its first progress read.
    let call = json!({"jsonrpc":"2.0","id":"alice-1","method":"tools/call","params":{
        "name":"steps","arguments":{"steps":2},"_meta":{"progressToken":"p1"}}});
    let mut alices = raw
        .post("alice-token", Some(&session), &call.to_string())
        .stream()
        .await;
    let first = alices.next().await.expect("progress");
    assert_eq!(first["method"], "notifications/progress", "{first}");
    let resume_from = alices.last_event_id.clone().expect("an event id");
    until_active(&e, 1, "alice's call runs").await;

    let unknown = |body: &str| raw.post("bob-token", Some(NEVER), body).whole();
    for (what, body) in bodies(&json!("alice-1")) {
        let on_hers = raw.post("bob-token", Some(&session), &body).whole().await;
        let on_none = unknown(&body).await;
        assert_eq!(on_hers, on_none, "{what}: bob on alice's session");
        assert_ne!(on_hers.status / 100, 2, "{what}: {on_hers:?}");
    }
    // GET: the session's stream, and a resumption of alice's call's stream.
    let get = |session: &str, last: Option<&str>| {
        let mut r = raw
            .request(Method::GET, Some("bob-token"))
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", "2025-11-25");
        if let Some(l) = last {
            r = r.header("last-event-id", l);
        }
        r.whole()
    };
    for last in [None, Some(resume_from.as_str())] {
        let on_hers = get(&session, last).await;
        assert_eq!(on_hers, get(NEVER, last).await, "GET {last:?}");
        assert_eq!(on_hers.status, 404, "{on_hers:?}");
    }
    // DELETE: refused as for a session that does not exist.
    let delete = |session: &str| {
        raw.request(Method::DELETE, Some("bob-token"))
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", "2025-11-25")
            .whole()
    };
    let on_hers = delete(&session).await;
    assert_eq!(on_hers, delete(NEVER).await);
    assert_eq!(on_hers.status, 404);

    // Nothing changed: alice's call still runs, nothing of bob's ran, her session
    // serves her, and her answer reaches her own stream.
    assert_eq!(e.active(), 1, "bob's cancellation reached nothing");
    assert!(events.of("bob").events().is_empty());
    let list = raw
        .post(
            "alice-token",
            Some(&session),
            r#"{"jsonrpc":"2.0","id":"alice-2","method":"tools/list"}"#,
        )
        .stream()
        .await
        .answer_to(&json!("alice-2"))
        .await;
    assert!(list["result"]["tools"].is_array(), "{list}");
    gate.add_permits(1);
    let done = alices.answer_to(&json!("alice-1")).await;
    assert_eq!(done["result"]["content"][0]["text"], "2", "{done}");
    let seen: Vec<Event> = events.of("alice").events();
    assert!(seen.iter().all(|e| e.user_id() == "alice"));
    assert!(seen.iter().any(
        |e| matches!(e, Event::ToolCompleted(c) if c.status == Status::Success && &*c.tool_name == "steps")
    ));
    assert_eq!(e.metrics().total, 1, "only alice's call ran");
    let stats = server.stats();
    assert_eq!(stats.foreign_session_requests, 13, "{stats:?}");
    assert_eq!(stats.sessions_open, 1);
    // alice ends her own session: that works, and then it is gone for her too.
    let bye = raw
        .request(Method::DELETE, Some("alice-token"))
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .whole()
        .await;
    assert_eq!(bye.status, 204, "{bye:?}");
    let after = raw
        .post(
            "alice-token",
            Some(&session),
            r#"{"jsonrpc":"2.0","id":9,"method":"tools/list"}"#,
        )
        .whole()
        .await;
    assert_eq!(after.status, 404, "{after:?}");
}

#[tokio::test]
async fn a_session_only_initialized_is_its_initializers_and_cannot_be_taken() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate, Duration::from_secs(60));
    let addr = serve(McpServer::per_request(e.clone())).await;
    let raw = Raw::new(addr);
    // alice initializes and sends nothing else; bob tries first.
    let init = raw
        .post("alice-token", None, &initialize(1, "2025-11-25"))
        .whole()
        .await;
    let session = init.session.expect("a session");
    let call = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#;
    let bobs = raw.post("bob-token", Some(&session), call).whole().await;
    assert_eq!(bobs.status, 404, "{bobs:?}");
    // alice is not locked out of her session.
    let done = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    assert_eq!(
        raw.post("alice-token", Some(&session), done)
            .whole()
            .await
            .status,
        202
    );
    let hers = raw
        .post("alice-token", Some(&session), call)
        .stream()
        .await
        .answer_to(&json!(2))
        .await;
    assert_eq!(hers["result"]["content"][0]["text"], "3", "{hers}");
    assert_eq!(e.metrics().total, 1);
}

#[tokio::test]
async fn a_request_reusing_an_id_in_flight_is_refused_and_the_first_keeps_its_answer() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate, Duration::from_secs(60));
    let server = McpServer::per_request(e.clone());
    let addr = serve(server.clone()).await;
    let raw = Raw::new(addr);
    let session = raw.session("alice-token").await;
    let steps = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"steps","arguments":{"steps":1},"_meta":{"progressToken":"t"}}}"#;
    let mut first = raw
        .post("alice-token", Some(&session), steps)
        .stream()
        .await;
    first.next().await.expect("its progress");
    until_active(&e, 1, "the first call runs").await;

    // The same id again, for another method and for the same call: refused.
    for dup in [
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#,
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#,
        steps,
    ] {
        let refused = raw
            .post("alice-token", Some(&session), dup)
            .stream()
            .await
            .answer_to(&json!(7))
            .await;
        assert_eq!(refused["error"]["code"], -32600, "{refused}");
        assert!(
            refused["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("already in flight"),
            "{refused}"
        );
    }
    assert_eq!(e.active(), 1, "no duplicate ran");
    gate.add_permits(1);
    let answer = first.answer_to(&json!(7)).await;
    assert_eq!(answer["result"]["content"][0]["text"], "1", "{answer}");

    // Once answered, the id is free again.
    let again = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":20,"b":22}}}"#;
    let reply = raw
        .post("alice-token", Some(&session), again)
        .stream()
        .await
        .answer_to(&json!(7))
        .await;
    assert_eq!(reply["result"]["content"][0]["text"], "42", "{reply}");
    assert_eq!(
        e.metrics().total,
        2,
        "the first call and the last; no duplicate"
    );
    assert_eq!(server.stats().duplicate_request_ids, 3);
}

#[tokio::test]
async fn a_cancelled_requests_id_stays_refused_so_its_late_answer_reaches_no_one_else() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate, Duration::from_secs(60));
    let events = Events::default();
    let addr = serve(events.attach(McpServer::per_request(e.clone()))).await;
    let raw = Raw::new(addr);
    let session = raw.session("alice-token").await;
    let steps = r#"{"jsonrpc":"2.0","id":"c","method":"tools/call","params":{"name":"steps","arguments":{"steps":1},"_meta":{"progressToken":"t"}}}"#;
    let mut first = raw
        .post("alice-token", Some(&session), steps)
        .stream()
        .await;
    first.next().await.expect("its progress");
    let cancel = r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"c","reason":"stop"}}"#;
    let ack = raw
        .post("alice-token", Some(&session), cancel)
        .whole()
        .await;
    assert_eq!(ack.status, 202);
    until_active(&e, 0, "the cancelled call ends").await;
    let seen = events.of("alice").events();
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::ToolCompleted(c) if c.status == Status::Cancelled))
    );
    let reuse = r#"{"jsonrpc":"2.0","id":"c","method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":1}}}"#;
    let refused = raw
        .post("alice-token", Some(&session), reuse)
        .stream()
        .await
        .answer_to(&json!("c"))
        .await;
    assert_eq!(refused["error"]["code"], -32600, "{refused}");
    assert_eq!(e.metrics().total, 1);
}

#[tokio::test]
async fn a_user_opening_sessions_without_end_holds_at_most_the_cap_and_others_keep_theirs() {
    use tool_dispatch::mcp::MAX_SESSIONS_PER_USER;
    let gate = Arc::new(Semaphore::new(0));
    let server = McpServer::per_request(engine(&gate, Duration::from_secs(60)));
    let raw = Raw::new(serve(server.clone()).await);
    let bobs = raw.session("bob-token").await;
    let mut alices = Vec::new();
    for _ in 0..MAX_SESSIONS_PER_USER * 3 {
        alices.push(raw.session("alice-token").await);
    }
    let stats = server.stats();
    assert_eq!(
        stats.sessions_opened as usize,
        MAX_SESSIONS_PER_USER * 3 + 1
    );
    assert_eq!(
        stats.sessions_open as usize,
        MAX_SESSIONS_PER_USER + 1,
        "alice's cap and bob's one: {stats:?}"
    );
    let list = |token: &'static str, session: String| {
        let raw = raw.clone();
        async move {
            raw.post(
                token,
                Some(&session),
                r#"{"jsonrpc":"2.0","id":"l","method":"tools/list"}"#,
            )
            .whole()
            .await
            .status
        }
    };
    // Her oldest are gone (404: the client starts a new session), her newest serve her.
    for old in &alices[..MAX_SESSIONS_PER_USER * 2] {
        assert_eq!(list("alice-token", old.clone()).await, 404);
    }
    for new in &alices[MAX_SESSIONS_PER_USER * 2..] {
        assert_eq!(list("alice-token", new.clone()).await, 200);
    }
    // Bob's session, opened before all of hers, is untouched.
    assert_eq!(list("bob-token", bobs).await, 200);
}
