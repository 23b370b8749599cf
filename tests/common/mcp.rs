//! Helpers of the MCP tests (`tests/mcp_*.rs`): an engine of small tools, each
//! user's recorded events, the server on a loopback port, and a raw HTTP client that
//! sends what no SDK client would (another user's session, a reused request id, a
//! foreign `Origin`) and reads the answers as they come.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tool_dispatch::mcp::{McpServer, router};
use tool_dispatch::*;

/// How long anything may take before a test gives up.
pub const PATIENCE: Duration = Duration::from_secs(10);

#[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
pub struct AddIn {
    pub a: i64,
    pub b: i64,
}

#[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
pub struct StepsIn {
    pub steps: u32,
}

#[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
pub struct MailIn {
    pub to: String,
}

/// The tools: `add`; `steps` (reports its progress, then waits for a permit of
/// `gate`, or its cancellation); `send_email` (needs approval, `window` to answer).
pub fn engine(gate: &Arc<Semaphore>, window: Duration) -> Engine {
    let add = tool_fn("add", "Adds two integers.", |i: AddIn, _cx| async move {
        Ok::<_, ToolError>(i.a + i.b)
    });
    let g = Arc::clone(gate);
    let steps = tool_fn(
        "steps",
        "Reports progress, then waits.",
        move |i: StepsIn, cx: ToolContext| {
            let g = Arc::clone(&g);
            async move {
                for n in 1..=i.steps {
                    cx.progress(f64::from(n) / f64::from(i.steps), format!("step {n}"));
                    tokio::task::yield_now().await;
                }
                tokio::select! {
                    p = g.acquire() => p.map_err(ToolError::from)?.forget(),
                    () = cx.cancelled() => return Err(ToolError::new("cancelled")),
                }
                Ok::<_, ToolError>(i.steps)
            }
        },
    );
    let mail = tool_fn(
        "send_email",
        "Sends an email.",
        |i: MailIn, _cx| async move { Ok::<_, ToolError>(format!("sent to {}", i.to)) },
    )
    .settings(
        ToolSettings::new()
            .requires_approval("it sends an email in your name")
            .approval_wait(ApprovalWait::Within(window)),
    );
    let registry = Registry::builder()
        .tool(add)
        .tool(steps)
        .tool(mail)
        .build()
        .expect("the tools build");
    Engine::builder(registry).build()
}

/// Each user's events, recorded.
#[derive(Clone, Default)]
pub struct Events(Arc<std::sync::Mutex<HashMap<String, RecordingSink>>>);

impl Events {
    pub fn of(&self, user: &str) -> RecordingSink {
        self.0
            .lock()
            .expect("not poisoned")
            .entry(user.to_owned())
            .or_default()
            .clone()
    }

    pub fn attach(&self, server: McpServer) -> McpServer {
        let events = self.clone();
        server.events(move |u| Arc::new(events.of(u.user_id())) as Arc<dyn EventSink>)
    }
}

/// alice-token, bob-token.
pub fn tokens(token: &str) -> Option<UserContext> {
    match token {
        "alice-token" => UserContext::builder("alice").build().ok(),
        "bob-token" => UserContext::builder("bob").build().ok(),
        _ => None,
    }
}

/// Serves `app` on a loopback port.
pub async fn serve_app(app: ::axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move { ::axum::serve(listener, app).await });
    addr
}

/// `server` behind [`router`] with [`tokens`], on a loopback port.
pub async fn serve(server: McpServer) -> SocketAddr {
    serve_app(router(server, tokens)).await
}

/// The first JSON-RPC message of each kind an `initialize` needs.
pub fn initialize(id: u64, version: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
        "protocolVersion": version, "capabilities": {"elicitation": {}},
        "clientInfo": {"name": "raw", "version": "1"}}})
    .to_string()
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub session: Option<String>,
    pub content_type: Option<String>,
}

/// A raw HTTP client of one server's `/mcp`.
#[derive(Clone)]
pub struct Raw {
    url: String,
    client: reqwest::Client,
}

/// One request, built up.
pub struct Req {
    builder: reqwest::RequestBuilder,
}

impl Req {
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.builder = self.builder.header(name, value);
        self
    }

    /// Sends it and reads the whole answer.
    pub async fn whole(self) -> Answer {
        let response = self.open().await;
        let status = response.status().as_u16();
        let header = |n: &str| {
            response
                .headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (session, content_type) = (header("mcp-session-id"), header("content-type"));
        let body = tokio::time::timeout(PATIENCE, response.text())
            .await
            .expect("the whole answer in time")
            .unwrap_or_default();
        Answer {
            status,
            body,
            session,
            content_type,
        }
    }

    /// Sends it; the answer's body is read as it comes ([`Stream`]).
    pub async fn open(self) -> reqwest::Response {
        tokio::time::timeout(PATIENCE, self.builder.send())
            .await
            .expect("an answer in time")
            .expect("an HTTP answer")
    }

    pub async fn stream(self) -> Stream {
        Stream::new(self.open().await)
    }
}

impl Raw {
    pub fn new(addr: SocketAddr) -> Raw {
        Raw {
            url: format!("http://{addr}/mcp"),
            client: reqwest::Client::new(),
        }
    }

    /// A request with `token` (if any) and, for `POST`, the JSON and SSE `Accept`.
    pub fn request(&self, method: Method, token: Option<&str>) -> Req {
        let mut b = self.client.request(method.clone(), &self.url);
        if let Some(t) = token {
            b = b.bearer_auth(t);
        }
        b = match method {
            Method::POST => b
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream"),
            _ => b.header("accept", "text/event-stream"),
        };
        Req { builder: b }
    }

    /// A `POST` of `body` as `token`, on `session` (revision 2025-11-25) if any.
    pub fn post(&self, token: &str, session: Option<&str>, body: &str) -> Req {
        let mut r = self.request(Method::POST, Some(token));
        if let Some(s) = session {
            r = r
                .header("mcp-session-id", s)
                .header("mcp-protocol-version", "2025-11-25");
        }
        r.builder = r.builder.body(body.to_owned());
        r
    }

    /// Opens a session as `token` (initialize, then initialized): its id.
    pub async fn session(&self, token: &str) -> String {
        let init = self
            .post(token, None, &initialize(1, "2025-11-25"))
            .whole()
            .await;
        assert_eq!(init.status, 200, "{init:?}");
        let id = init.session.expect("a session id");
        let done = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
        let ack = self.post(token, Some(&id), done).whole().await;
        assert_eq!(ack.status, 202, "{ack:?}");
        id
    }
}

/// A server-sent-events answer, read message by message.
pub struct Stream {
    response: reqwest::Response,
    buffer: String,
    /// The id of the last event read.
    pub last_event_id: Option<String>,
}

impl Stream {
    fn new(response: reqwest::Response) -> Stream {
        Stream {
            response,
            buffer: String::new(),
            last_event_id: None,
        }
    }

    pub fn status(&self) -> u16 {
        self.response.status().as_u16()
    }

    /// The next JSON-RPC message (priming events skipped); `None` at the end.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                let mut data = String::new();
                for line in event.lines() {
                    if let Some(id) = line.strip_prefix("id:") {
                        self.last_event_id = Some(id.trim().to_owned());
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                }
                if let Ok(v) = serde_json::from_str(&data) {
                    return Some(v);
                }
                continue;
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .expect("the stream goes on in time")
                .ok()??;
            self.buffer
                .push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
        }
    }

    /// Reads until a message with `id` (a response or an error), returning it.
    pub async fn answer_to(&mut self, id: &Value) -> Value {
        loop {
            let m = self.next().await.expect("the answer before the end");
            if m.get("id") == Some(id) && m.get("method").is_none() {
                return m;
            }
        }
    }
}

/// Waits until `engine` has `n` calls in flight.
pub async fn until_active(engine: &Engine, n: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while engine.active() != n {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
