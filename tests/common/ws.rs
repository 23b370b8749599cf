//! The session's test kit (`tests/ws_*.rs`): a server of the library on a loopback
//! port with a few tools, real WebSocket clients (tokio-tungstenite), and readers of
//! the frames they get.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tool_dispatch::ws::{WsEvent, WsServer, router};
use tool_dispatch::{Engine, Registry, ToolContext, ToolError, ToolSettings, UserContext, tool_fn};

/// A client's socket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct WeatherIn {
    city: String,
    #[serde(default)]
    api_key: Option<String>,
}

#[derive(Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SlowIn {
    steps: u32,
    #[serde(default)]
    step_ms: u64,
}

#[derive(Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct FirehoseIn {
    events: u32,
    #[serde(default)]
    bytes: u32,
}

#[derive(Deserialize, serde::Serialize, schemars::JsonSchema)]
struct EmailIn {
    to: String,
}

/// `get_weather` (scope `weather:read`, `api_key` redacted), `slow_task` (progress
/// per step, runs until cancelled when long), `list_users` (scope `admin`),
/// `firehose` (progress as fast as it can) and `send_email` (needs approval).
pub fn registry() -> Registry {
    let weather = tool_fn(
        "get_weather",
        "Weather.",
        |i: WeatherIn, cx: ToolContext| async move {
            cx.progress(0.5, format!("looking up {}", i.city));
            let _ = i.api_key;
            Ok::<_, ToolError>(json!({"city": i.city, "temp_c": 21.0}))
        },
    )
    .settings(
        ToolSettings::new()
            .scope("weather:read")
            .sensitive("api_key"),
    );
    let slow = tool_fn(
        "slow_task",
        "Steps.",
        |i: SlowIn, cx: ToolContext| async move {
            for n in 1..=i.steps {
                tokio::select! {
                    _ = cx.cancelled() => return Err(ToolError::new("cancelled")),
                    _ = tokio::time::sleep(Duration::from_millis(i.step_ms)) => {}
                }
                cx.progress(f64::from(n) / f64::from(i.steps), format!("step {n}"));
            }
            Ok::<_, ToolError>(json!({"steps": i.steps}))
        },
    )
    .settings(ToolSettings::new().timeout(Duration::from_secs(3600)));
    let users = tool_fn("list_users", "Admins only.", |_: Value, _cx| async move {
        Ok::<_, ToolError>(json!(["alice", "bob"]))
    })
    .settings(ToolSettings::new().scope("admin"));
    let firehose = tool_fn(
        "firehose",
        "Floods.",
        |i: FirehoseIn, cx: ToolContext| async move {
            let text = "x".repeat(i.bytes as usize);
            for n in 0..i.events {
                cx.progress(f64::from(n + 1) / f64::from(i.events), text.clone());
                tokio::task::yield_now().await;
            }
            Ok::<_, ToolError>(json!({"events": i.events}))
        },
    );
    let email = tool_fn("send_email", "Mails.", |i: EmailIn, _cx| async move {
        Ok::<_, ToolError>(json!({"sent": true, "to": i.to}))
    })
    .settings(ToolSettings::new().requires_approval("sends an email in your name"));
    Registry::builder()
        .tool(weather)
        .tool(email)
        .tool(slow)
        .tool(users)
        .tool(firehose)
        .build()
        .expect("valid tools")
}

/// The engine of [`registry`], with a 2 s delivery timeout.
pub fn engine() -> Engine {
    Engine::builder(registry())
        .delivery_timeout(Duration::from_secs(2))
        .build()
}

/// alice (scopes `weather:read`, `admin`) and bob (`weather:read`).
pub fn users() -> HashMap<String, UserContext> {
    let user = |id: &str, scopes: &[&str]| {
        UserContext::builder(id)
            .thread_id(format!("thread_{id}"))
            .scopes(scopes.iter().copied())
            .build()
            .unwrap()
    };
    HashMap::from([
        (
            "alice-token".to_owned(),
            user("alice", &["weather:read", "admin"]),
        ),
        ("bob-token".to_owned(), user("bob", &["weather:read"])),
    ])
}

/// The user of `token`.
pub fn user_of(token: &str) -> UserContext {
    users()[token].clone()
}

/// Serves `server` (its `/ws` route, tokens of [`users`]) on a free loopback port.
pub async fn serve(server: WsServer) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let users = users();
    let app = router(server, move |t: &str| users.get(t).cloned());
    tokio::spawn(tool_dispatch::http::serve(listener, app));
    addr
}

/// A server with the test engine and default settings, served.
pub async fn start() -> (SocketAddr, WsServer) {
    let server = WsServer::new(engine());
    (serve(server.clone()).await, server)
}

/// Connects with `token` and reads the `ready` frame.
pub async fn connect(addr: SocketAddr, token: &str) -> Ws {
    connect_ready(addr, token).await.0
}

/// Connects with `token`; the socket and its `ready` frame.
pub async fn connect_ready(addr: SocketAddr, token: &str) -> (Ws, Value) {
    let url = format!("ws://{addr}/ws?token={token}");
    let (mut ws, resp) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(resp.status(), 101);
    let ready = recv(&mut ws).await;
    assert_eq!(ready["type"], "ready", "{ready}");
    assert!(
        ready["run_id"].is_string() && ready["epoch"].is_u64(),
        "{ready}"
    );
    (ws, ready)
}

/// The next text message, as JSON.
pub async fn recv(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Every message up to and including the first for which `pred` holds.
pub async fn until(ws: &mut Ws, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
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

/// Every message up to and including the next `tool_results`.
pub async fn until_results(ws: &mut Ws) -> Vec<Value> {
    until(ws, |m| m["type"] == "tool_results").await
}

/// Sends `v` as a text message.
pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// An OpenAI assistant message with these calls (id, tool, arguments).
pub fn openai(calls: &[(&str, &str, Value)]) -> Value {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(id, name, args)| {
            json!({"id": id, "type": "function",
                   "function": {"name": name, "arguments": args.to_string()}})
        })
        .collect();
    json!({"role": "assistant", "content": null, "tool_calls": calls})
}

/// An Anthropic assistant message with these calls (id, tool, input).
pub fn anthropic(calls: &[(&str, &str, Value)]) -> Value {
    let mut content = vec![json!({"type": "text", "text": "let me check"})];
    content.extend(calls.iter().map(
        |(id, name, input)| json!({"type": "tool_use", "id": id, "name": name, "input": input}),
    ));
    json!({"role": "assistant", "content": content})
}

/// A call that cannot finish during a test: it runs until cancelled.
pub fn forever(id: &str) -> Value {
    openai(&[(
        id,
        "slow_task",
        json!({"steps": 1_000_000, "step_ms": 60_000}),
    )])
}

/// A `send_email` turn with one call `id`.
pub fn email(id: &str, to: &str) -> Value {
    openai(&[(id, "send_email", json!({"to": to}))])
}

/// The `seq`s of the run frames in `msgs`, checked to be contiguous and increasing;
/// every tool event and results frame must carry one.
pub fn seqs(msgs: &[Value]) -> Vec<u64> {
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

/// Checks the pairing and order of the tool events in `msgs`, all for `user`;
/// the ids of the calls seen, in order of their `tool_executing`.
pub fn check_events(msgs: &[Value], user: &str) -> Vec<String> {
    let mut order = Vec::new();
    let mut state: HashMap<String, String> = HashMap::new();
    for m in msgs {
        let kind = m["type"].as_str().unwrap();
        if !matches!(kind, "tool_executing" | "tool_progress" | "tool_completed") {
            continue;
        }
        assert_eq!(m["user_id"], user, "an event of another user arrived: {m}");
        let id = m["call_id"].as_str().unwrap().to_owned();
        let prev = state.get(&id).map(String::as_str);
        match kind {
            "tool_executing" => {
                assert_eq!(prev, None, "second tool_executing for {id}");
                order.push(id.clone());
            }
            _ => assert!(
                matches!(prev, Some("tool_executing" | "tool_progress")),
                "{kind} for {id} after {prev:?}"
            ),
        }
        state.insert(id, kind.to_owned());
    }
    for (id, last) in &state {
        assert_eq!(last, "tool_completed", "{id} did not complete");
    }
    order
}

/// The `tool_completed` of `id` in `msgs`.
pub fn completed<'a>(msgs: &'a [Value], id: &str) -> &'a Value {
    msgs.iter()
        .find(|m| m["type"] == "tool_completed" && m["call_id"] == id)
        .unwrap_or_else(|| panic!("no tool_completed for {id}"))
}

/// Waits for the server to report an event for which `pred` holds.
pub async fn wait_event(
    events: &mut broadcast::Receiver<WsEvent>,
    pred: impl Fn(&WsEvent) -> bool,
) -> WsEvent {
    loop {
        let e = events.recv().await.unwrap();
        if pred(&e) {
            return e;
        }
    }
}

/// Whether `e` is a disconnection of `user`.
pub fn gone(e: &WsEvent, user: &str) -> bool {
    matches!(e, WsEvent::Disconnected { user_id, .. } if user_id == user)
}
