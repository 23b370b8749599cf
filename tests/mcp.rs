//! The MCP server, driven by rmcp's own client: in process over a duplex pipe, and
//! over a real loopback HTTP port with bearer tokens. Every call goes through the
//! pipeline as the request's user: statuses, progress, cancellation, limits, scopes
//! and isolation between users hold as they do for any other caller.
#![cfg(feature = "mcp")]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rmcp::model::{
    CallToolRequestParams, ClientRequest, ErrorCode, ProgressNotificationParam, Request,
};
use rmcp::service::{PeerRequestOptions, RunningService, ServiceError};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tool_dispatch::event::{Event, Status};
use tool_dispatch::mcp::{McpServer, router};
use tool_dispatch::*;

const PATIENCE: Duration = Duration::from_secs(10);

#[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
struct AddIn {
    a: i64,
    b: i64,
}

#[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
struct StepsIn {
    steps: u32,
}

/// The tools: `add`, `weather` (an output schema, cached), `steps` (progress, then
/// waits for the test's gate, ignoring nothing: cancellation ends it), `admin_only`
/// (scope `admin`), `wipe` (destructive).
fn engine(gate: &Arc<Semaphore>) -> Engine {
    let add = tool_fn("add", "Adds two integers.", |i: AddIn, _cx| async move {
        Ok::<_, ToolError>(i.a + i.b)
    })
    .settings(ToolSettings::new().read_only(true));
    let weather = tool_fn("weather", "The weather.", |_: Value, _cx| async move {
        Ok::<_, ToolError>(json!({"temp_c": 21.5, "conditions": "clear"}))
    })
    .settings(
        ToolSettings::new()
            .cache(Duration::from_secs(60))
            .output_schema(json!({
                "type": "object",
                "properties": {"temp_c": {"type": "number"}, "conditions": {"type": "string"}},
                "required": ["temp_c", "conditions"]
            })),
    );
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
    let admin = tool_fn(
        "admin_only",
        "Administrators only.",
        |_: Value, _cx| async move { Ok::<_, ToolError>("secret") },
    )
    .settings(ToolSettings::new().scope("admin"));
    let wipe = tool_fn("wipe", "Deletes everything.", |_: Value, _cx| async move {
        Ok::<_, ToolError>("gone")
    })
    .settings(ToolSettings::new().destructive(true));
    let registry = Registry::builder()
        .tool(add)
        .tool(weather)
        .tool(steps)
        .tool(admin)
        .tool(wipe)
        .build()
        .unwrap();
    // "slowpoke" may make one call a minute; everyone else a thousand.
    let limits = Limits::default().per_user_with(|u| UserLimits {
        concurrency: 10,
        rate: Some(match u.user_id() {
            "slowpoke" => Rate::per_minute(1),
            _ => Rate::per_minute(1000),
        }),
    });
    Engine::builder(registry).limits(limits).build()
}

/// Each user's events, recorded.
#[derive(Clone, Default)]
struct Events(Arc<std::sync::Mutex<HashMap<String, RecordingSink>>>);

impl Events {
    fn of(&self, user: &str) -> RecordingSink {
        self.0
            .lock()
            .unwrap()
            .entry(user.to_owned())
            .or_default()
            .clone()
    }

    fn attach(&self, server: McpServer) -> McpServer {
        let events = self.clone();
        server.events(move |u| Arc::new(events.of(u.user_id())) as Arc<dyn EventSink>)
    }
}

/// A client that keeps the progress notifications it gets.
#[derive(Clone)]
struct Client(mpsc::UnboundedSender<ProgressNotificationParam>);

impl ClientHandler for Client {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _: rmcp::service::NotificationContext<RoleClient>,
    ) {
        let _ = self.0.send(params);
    }
}

type Connected = RunningService<RoleClient, Client>;

/// `server` and a client on the two ends of an in-memory pipe.
async fn in_process(
    server: McpServer,
) -> (
    Connected,
    mpsc::UnboundedReceiver<ProgressNotificationParam>,
) {
    let (server_io, client_io) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        if let Ok(running) = server.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let client = Client(tx).serve(client_io).await.expect("initialized");
    (client, rx)
}

fn user_with(id: &str, scopes: &[&str]) -> UserContext {
    UserContext::builder(id)
        .scopes(scopes.iter().copied())
        .build()
        .unwrap()
}

fn call(name: &str, args: Value) -> CallToolRequestParams {
    let params = CallToolRequestParams::new(name.to_owned());
    match args {
        Value::Object(map) => params.with_arguments(map),
        _ => params,
    }
}

/// A `steps` call of one step, once its progress came: the call is waiting on the
/// gate, in the pipeline.
async fn one_step_started(
    client: &Connected,
    progress: &mut mpsc::UnboundedReceiver<ProgressNotificationParam>,
) -> rmcp::service::RequestHandle<RoleClient> {
    let handle = client
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(call("steps", json!({"steps": 1})))),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, progress.recv())
        .await
        .unwrap()
        .unwrap();
    handle
}

/// Waits until `engine` has no call in flight, or fails saying `what`.
async fn until_idle(engine: &Engine, what: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while engine.active() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn without_progress(events: Vec<Event>) -> Vec<Event> {
    events
        .into_iter()
        .filter(|e| !matches!(e, Event::ToolProgress(_)))
        .collect()
}

fn text(result: &rmcp::model::CallToolResult) -> String {
    let v = serde_json::to_value(&result.content).unwrap();
    v[0]["text"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn list_is_the_registry_in_order_filtered_by_the_users_scopes_with_hints() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate);
    let (admin, _) = in_process(McpServer::for_user(
        e.clone(),
        user_with("root", &["admin"]),
    ))
    .await;
    let (plain, _) = in_process(McpServer::for_user(e, user("alice"))).await;
    let names = |tools: &[rmcp::model::Tool]| -> Vec<String> {
        tools.iter().map(|t| t.name.to_string()).collect()
    };
    let all = admin.list_all_tools().await.unwrap();
    assert_eq!(
        names(&all),
        ["add", "weather", "steps", "admin_only", "wipe"]
    );
    let mine = plain.list_all_tools().await.unwrap();
    assert_eq!(
        names(&mine),
        ["add", "weather", "steps", "wipe"],
        "no admin_only"
    );
    let tool = |n: &str| serde_json::to_value(all.iter().find(|t| t.name == n).unwrap()).unwrap();
    assert_eq!(tool("add")["inputSchema"]["required"], json!(["a", "b"]));
    assert_eq!(tool("add")["annotations"]["readOnlyHint"], true);
    assert_eq!(tool("weather")["annotations"]["idempotentHint"], true);
    assert_eq!(
        tool("weather")["outputSchema"]["required"],
        json!(["temp_c", "conditions"])
    );
    assert_eq!(tool("wipe")["annotations"]["destructiveHint"], true);
    assert!(tool("steps").get("annotations").is_none());
}

#[tokio::test]
async fn calls_end_as_the_pipeline_says_with_their_pairs() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate);
    let events = Events::default();
    let (c, _) = in_process(events.attach(McpServer::for_user(e.clone(), user("alice")))).await;

    let ok = c
        .call_tool(call("add", json!({"a": 2, "b": 3})))
        .await
        .unwrap();
    assert_eq!((ok.is_error, text(&ok)), (Some(false), "5".to_owned()));
    let structured = c.call_tool(call("weather", json!({}))).await.unwrap();
    assert_eq!(
        structured.structured_content.unwrap()["conditions"],
        "clear"
    );

    // Invalid input: a result with isError and the safe message, naming the field.
    let bad = c
        .call_tool(call("add", json!({"a": "two", "b": 3})))
        .await
        .unwrap();
    assert_eq!(bad.is_error, Some(true));
    assert!(text(&bad).contains("a"), "{}", text(&bad));
    // A denied call (a scope alice lacks) is a tool result too, with the denial.
    let denied = c.call_tool(call("admin_only", json!({}))).await.unwrap();
    assert_eq!(denied.is_error, Some(true));
    assert!(
        text(&denied).to_lowercase().contains("admin"),
        "{}",
        text(&denied)
    );
    // An unknown tool is a protocol error -32602.
    match c.call_tool(call("no_such_tool", json!({}))).await {
        Err(ServiceError::McpError(e)) => assert_eq!(e.code, ErrorCode::INVALID_PARAMS),
        other => panic!("{other:?}"),
    }
    let seen = events.of("alice").events();
    assert_paired(&seen);
    let statuses: Vec<Status> = seen
        .iter()
        .filter_map(|e| match e {
            Event::ToolCompleted(c) => Some(c.status),
            _ => None,
        })
        .collect();
    assert_eq!(
        statuses,
        [
            Status::Success,
            Status::Success,
            Status::InvalidInput,
            Status::Denied,
            Status::UnknownTool
        ]
    );
    let m = e.metrics();
    assert_eq!((m.total, m.active), (5, 0));
}

#[tokio::test]
async fn a_rate_limited_user_gets_an_error_result_with_the_retry_hint() {
    let gate = Arc::new(Semaphore::new(0));
    let (c, _) = in_process(McpServer::for_user(engine(&gate), user("slowpoke"))).await;
    assert_eq!(
        c.call_tool(call("add", json!({"a": 1, "b": 1})))
            .await
            .unwrap()
            .is_error,
        Some(false)
    );
    let limited = c
        .call_tool(call("add", json!({"a": 1, "b": 1})))
        .await
        .unwrap();
    assert_eq!(limited.is_error, Some(true));
    let t = text(&limited);
    assert!(t.contains("rate") && t.contains("s"), "{t}");
    assert!(t.chars().any(|c| c.is_ascii_digit()), "a retry hint: {t}");
}

#[tokio::test]
async fn progress_reaches_the_client_strictly_increasing_and_nothing_after_the_result() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate);
    let (c, mut progress) = in_process(McpServer::for_user(e, user("alice"))).await;
    let handle = c
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(call("steps", json!({"steps": 20})))),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    let token = handle.progress_token.clone();
    // All twenty steps reported before the gate opens.
    let mut values = Vec::new();
    while values.len() < 20 {
        let p = tokio::time::timeout(PATIENCE, progress.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.progress_token, token);
        values.push(p.progress);
    }
    gate.add_permits(1);
    let response = tokio::time::timeout(PATIENCE, handle.await_response())
        .await
        .unwrap()
        .unwrap();
    assert!(format!("{response:?}").contains("20"), "{response:?}");
    assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:?}");
    assert_eq!(values.last(), Some(&1.0));
    // Nothing after the result: another round trip, and no late notification.
    c.list_all_tools().await.unwrap();
    assert!(progress.try_recv().is_err());
}

#[tokio::test]
async fn a_cancelled_request_ends_the_call_cancelled_with_its_pair() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate);
    let events = Events::default();
    let (c, mut progress) =
        in_process(events.attach(McpServer::for_user(e.clone(), user("alice")))).await;
    let handle = one_step_started(&c, &mut progress).await;
    assert_eq!(e.active(), 1);
    handle
        .cancel(Some("the user pressed stop".into()))
        .await
        .unwrap();
    until_idle(&e, "the call never ended").await;
    let seen = without_progress(events.of("alice").events());
    assert_paired(&seen);
    assert_eq!(pair(&seen).status, Status::Cancelled);
    assert_eq!(e.metrics().by_status["cancelled"], 1);
}

// ------------------------------------------------------------------ over HTTP

fn tokens(token: &str) -> Option<UserContext> {
    match token {
        "alice-token" => Some(user("alice")),
        "bob-token" => Some(user("bob")),
        _ => None,
    }
}

async fn serve_http(server: McpServer) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(server, tokens);
    tokio::spawn(async move { ::axum::serve(listener, app).await });
    addr
}

async fn http_client(
    addr: SocketAddr,
    token: &str,
) -> (
    Connected,
    mpsc::UnboundedReceiver<ProgressNotificationParam>,
) {
    let config = StreamableHttpClientTransportConfig::with_uri(format!("http://{addr}/mcp"))
        .auth_header(token.to_owned());
    let transport = StreamableHttpClientTransport::from_config(config);
    let (tx, rx) = mpsc::unbounded_channel();
    let client = Client(tx)
        .serve(transport)
        .await
        .expect("initialized over HTTP");
    (client, rx)
}

/// A raw `POST /mcp` with `authorization`, for what no client would send.
async fn raw_post(addr: SocketAddr, authorization: Option<&str>, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // A server that refuses before reading the body may close while it is sent.
    let _ = s.write_all(body.as_bytes()).await;
    let mut head = vec![0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[tokio::test]
async fn over_http_no_token_or_an_unknown_one_is_401_before_anything_runs() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate);
    let addr = serve_http(McpServer::per_request(e.clone())).await;
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"x","version":"1"}}}"#;
    for auth in [
        None,
        Some("Bearer nope"),
        Some("Basic YWxpY2U6eA=="),
        Some("Bearer "),
        Some("alice-token"),
    ] {
        assert_eq!(raw_post(addr, auth, init).await, 401, "{auth:?}");
    }
    // A body of megabytes without a token is refused all the same, unread.
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(4 << 20));
    assert_eq!(raw_post(addr, None, &big).await, 401);
    assert_eq!(raw_post(addr, Some("Bearer alice-token"), init).await, 200);
    assert_eq!(e.metrics().total, 0);
}

#[tokio::test]
async fn over_http_each_token_is_its_user_and_sees_only_its_own_events_and_cache() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate);
    let events = Events::default();
    let addr = serve_http(events.attach(McpServer::per_request(e.clone()))).await;
    let (alice, _) = http_client(addr, "alice-token").await;
    let (bob, _) = http_client(addr, "bob-token").await;
    let a = alice
        .call_tool(call("weather", json!({"city": "Paris"})))
        .await
        .unwrap();
    let b = bob
        .call_tool(call("weather", json!({"city": "Paris"})))
        .await
        .unwrap();
    assert_eq!((a.is_error, b.is_error), (Some(false), Some(false)));
    alice
        .call_tool(call("add", json!({"a": 1, "b": 2})))
        .await
        .unwrap();
    let (a_ev, b_ev) = (events.of("alice").events(), events.of("bob").events());
    assert!(a_ev.iter().all(|e| e.user_id() == "alice"));
    assert!(b_ev.iter().all(|e| e.user_id() == "bob"));
    assert_eq!((a_ev.len(), b_ev.len()), (4, 2));
    // bob's identical call was not served from alice's cache entry.
    let cached = |ev: &[Event]| match ev.iter().find(|e| matches!(e, Event::ToolCompleted(_))) {
        Some(Event::ToolCompleted(c)) => c.cached,
        _ => panic!("no completion"),
    };
    assert!(!cached(&a_ev) && !cached(&b_ev));
    assert_paired(&a_ev);
    assert_paired(&b_ev);
}

#[tokio::test]
async fn over_http_ending_the_session_cancels_its_call() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate);
    let events = Events::default();
    let addr = serve_http(events.attach(McpServer::per_request(e.clone()))).await;
    let (alice, mut progress) = http_client(addr, "alice-token").await;
    let handle = one_step_started(&alice, &mut progress).await;
    assert_eq!(e.active(), 1);
    drop(handle);
    alice.cancel().await.unwrap(); // the client ends its session (DELETE) and goes away
    until_idle(&e, "the call outlived its client").await;
    let seen = without_progress(events.of("alice").events());
    assert_paired(&seen);
    assert_eq!(pair(&seen).status, Status::Cancelled);
}

// ------------------------------------------------------------------ import

/// The Python with the `mcp` SDK (`.ci/run` makes `target/e2e/venv`); `None` outside
/// CI when it is missing, with the command that makes it.
fn python_with_mcp() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("TOOL_DISPATCH_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e/venv/bin/python")
        });
    let has_sdk = std::process::Command::new(&path)
        .args(["-c", "import mcp.server.mcpserver"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_sdk {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} has no `mcp` SDK; .ci/run installs it",
            path.display()
        );
        eprintln!(
            "skipped: no Python with the mcp SDK (python3 -m venv target/e2e/venv && \
             target/e2e/venv/bin/pip install 'mcp>=2,<3')"
        );
        return None;
    }
    Some(path)
}

/// The remote test server, started over stdio; `log` receives what it saw.
async fn remote(python: &std::path::Path, log: &std::path::Path) -> tool_dispatch::mcp::McpImport {
    let mut command = tokio::process::Command::new(python);
    command
        .arg(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/clients/mcp_remote_server.py"),
        )
        .env("MCP_REMOTE_LOG", log);
    tool_dispatch::mcp::McpImport::spawn(command)
        .await
        .expect("the Python MCP server starts and lists its tools")
}

fn temp_log(name: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("tool-dispatch-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

async fn logged(path: &std::path::Path, line: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the remote never logged {line:?}: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_remote_servers_tools_run_through_the_pipeline_with_their_events() {
    let Some(python) = python_with_mcp() else {
        return;
    };
    let log = temp_log("import");
    let remote = remote(&python, &log).await;
    assert_eq!(remote.names(), ["add", "fail", "count", "sleep", "die"]);
    let registry = Registry::builder()
        .tool(echo())
        .mcp(&remote)
        .build()
        .unwrap();
    assert_eq!(
        registry.definition("add").unwrap().input_schema["required"],
        json!(["a", "b"])
    );
    let engine = Engine::builder(registry).build();
    let (d, sink) = recorded(&engine, user("alice"));

    let out = d
        .dispatch(ToolCall::new("add", json!({"a": 2, "b": 3})))
        .await
        .unwrap();
    // The remote's structuredContent, as it sent it (the SDK wraps a bare int).
    assert_eq!(out.value, json!({"result": 5}));
    // Checked against the remote's schema here, before the remote is asked.
    for bad in [json!({"a": "two", "b": 3}), json!({"a": 2}), json!([1, 2])] {
        let err = d
            .dispatch(ToolCall::new("add", bad.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.status(), Status::InvalidInput, "{bad}: {err}");
    }
    // The remote's isError is a tool error with its text.
    let err = d
        .dispatch(ToolCall::new("fail", json!({"reason": "no"})))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::ToolFailed);
    assert!(err.to_string().contains("it failed: no"), "{err}");
    // The remote's progress becomes tool_progress, in order.
    let counted = d
        .dispatch(ToolCall::new("count", json!({"steps": 5})))
        .await
        .unwrap();
    assert_eq!(counted.value, json!({"result": "counted to 5"}));
    let events = sink.events();
    let progress: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            Event::ToolProgress(p) => Some(p.progress),
            _ => None,
        })
        .collect();
    assert_eq!(progress, [0.2, 0.4, 0.6, 0.8, 1.0]);
    assert_paired(&without_progress(events));
    let m = engine.metrics();
    assert_eq!((m.total, m.active), (6, 0));
}

#[tokio::test]
async fn a_remote_name_like_a_local_one_is_a_build_error_unless_prefixed() {
    let Some(python) = python_with_mcp() else {
        return;
    };
    let remote = remote(&python, &temp_log("names")).await;
    let add = tool_fn("add", "The local add.", |i: AddIn, _cx| async move {
        Ok::<_, ToolError>(i.a + i.b)
    });
    let err = Registry::builder()
        .tool(add)
        .mcp(&remote)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("add"), "{err}");
    let add = tool_fn("add", "The local add.", |i: AddIn, _cx| async move {
        Ok::<_, ToolError>(i.a + i.b)
    });
    let registry = Registry::builder()
        .tool(add)
        .mcp(&remote.clone().prefix("py_"))
        .build()
        .unwrap();
    let names: Vec<&str> = registry.names().collect();
    assert_eq!(
        names,
        ["add", "py_add", "py_fail", "py_count", "py_sleep", "py_die"]
    );
    let engine = Engine::builder(registry).build();
    let (d, _) = recorded(&engine, user("alice"));
    let out = d
        .dispatch(ToolCall::new("py_add", json!({"a": 40, "b": 2})))
        .await
        .unwrap();
    assert_eq!(
        out.value,
        json!({"result": 42}),
        "the remote still gets its own name"
    );
}

#[tokio::test]
async fn a_remote_call_past_its_timeout_or_cancelled_is_cancelled_on_the_remote() {
    let Some(python) = python_with_mcp() else {
        return;
    };
    let log = temp_log("cancel");
    let remote = remote(&python, &log)
        .await
        .settings(ToolSettings::new().timeout(Duration::from_millis(500)));
    let engine = Engine::builder(Registry::builder().mcp(&remote).build().unwrap()).build();
    let (d, sink) = recorded(&engine, user("alice"));
    let err = tokio::time::timeout(
        PATIENCE,
        d.dispatch(ToolCall::new("sleep", json!({"seconds": 60}))),
    )
    .await
    .expect("the timeout ends it")
    .unwrap_err();
    assert_eq!(err.status(), Status::Timeout);
    logged(&log, "cancelled sleep").await;
    assert_paired(&sink.events());

    // cancel_user while the remote works: cancelled here and there.
    let _ = std::fs::remove_file(&log);
    let call = spawn(&d, ToolCall::new("sleep", json!({"seconds": 0.4})));
    logged(&log, "started sleep").await;
    assert_eq!(engine.cancel_user("alice").here, 1);
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.status(), Status::Cancelled);
    logged(&log, "cancelled sleep").await;
    // The remote still serves the next call.
    assert_eq!(
        d.dispatch(ToolCall::new("add", json!({"a": 1, "b": 1})))
            .await
            .unwrap()
            .value,
        json!({"result": 2})
    );
}

#[tokio::test]
async fn a_remote_that_dies_mid_call_is_a_typed_error_not_a_hang() {
    let Some(python) = python_with_mcp() else {
        return;
    };
    let log = temp_log("die");
    let remote = remote(&python, &log).await;
    let engine = Engine::builder(Registry::builder().mcp(&remote).build().unwrap()).build();
    let (d, sink) = recorded(&engine, user("alice"));
    let err = tokio::time::timeout(PATIENCE, d.dispatch(ToolCall::new("die", json!({}))))
        .await
        .expect("no hang when the remote dies")
        .unwrap_err();
    assert_eq!(err.status(), Status::ToolFailed, "{err}");
    assert!(err.to_string().contains("MCP server"), "{err}");
    logged(&log, "started die").await;
    // Later calls fail at once, typed, with their pairs.
    let err = tokio::time::timeout(
        PATIENCE,
        d.dispatch(ToolCall::new("add", json!({"a": 1, "b": 1}))),
    )
    .await
    .expect("no hang after the remote died")
    .unwrap_err();
    assert_eq!(err.status(), Status::ToolFailed, "{err}");
    assert_paired(&sink.events());
    assert_eq!(engine.active(), 0);
}

#[tokio::test]
async fn tools_imported_over_http_run_on_the_remote_as_the_tokens_user() {
    // The remote is this library's own server: each side keeps its own pipeline.
    let gate = Arc::new(Semaphore::new(0));
    let remote_engine = engine(&gate);
    let remote_events = Events::default();
    let addr =
        serve_http(remote_events.attach(McpServer::per_request(remote_engine.clone()))).await;
    let url = format!("http://{addr}/mcp");
    let err = tool_dispatch::mcp::McpImport::http(&url, Some("not-a-token"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, tool_dispatch::mcp::ImportError::Handshake(_)),
        "{err}"
    );
    let remote = tool_dispatch::mcp::McpImport::http(&url, Some("bob-token"))
        .await
        .unwrap()
        .prefix("far_");
    // bob lacks `admin`: the remote did not list admin_only to him.
    assert_eq!(
        remote.names(),
        ["far_add", "far_weather", "far_steps", "far_wipe"]
    );
    let local = Engine::builder(Registry::builder().mcp(&remote).build().unwrap()).build();
    let (d, sink) = recorded(&local, user("carol"));
    let out = d
        .dispatch(ToolCall::new("far_add", json!({"a": 20, "b": 22})))
        .await
        .unwrap();
    assert_eq!(out.value, json!(42));
    // Progress from the remote pipeline reaches the local one.
    gate.add_permits(1);
    d.dispatch(ToolCall::new("far_steps", json!({"steps": 4})))
        .await
        .unwrap();
    let progress: Vec<f64> = sink
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::ToolProgress(p) => Some(p.progress),
            _ => None,
        })
        .collect();
    assert_eq!(progress, [0.25, 0.5, 0.75, 1.0]);
    // Locally carol's calls; remotely bob's, each with its pairs.
    assert!(sink.events().iter().all(|e| e.user_id() == "carol"));
    let far = without_progress(remote_events.of("bob").events());
    assert_paired(&far);
    assert_eq!(far.len(), 4);
}

#[tokio::test]
async fn a_remote_that_answers_with_garbage_or_not_at_all_is_a_typed_error_not_a_hang() {
    let Some(python) = python_with_mcp() else {
        return;
    };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients/mcp_malformed_server.py");
    // Garbage is refused at once; a line that is not JSON, or nothing, meets the
    // tool's timeout.
    for (mode, want) in [
        ("garbage", Status::ToolFailed),
        ("not_json", Status::Timeout),
        ("silent", Status::Timeout),
    ] {
        let mut command = tokio::process::Command::new(&python);
        command.arg(&script).arg(mode);
        let remote = tool_dispatch::mcp::McpImport::spawn(command)
            .await
            .unwrap()
            .settings(ToolSettings::new().timeout(Duration::from_millis(500)));
        let engine = Engine::builder(Registry::builder().mcp(&remote).build().unwrap()).build();
        let (d, sink) = recorded(&engine, user("alice"));
        let err = tokio::time::timeout(PATIENCE, d.dispatch(ToolCall::new("odd", json!({}))))
            .await
            .unwrap_or_else(|_| panic!("{mode}: a hang"))
            .unwrap_err();
        assert_eq!(err.status(), want, "{mode}: {err}");
        assert_paired(&sink.events());
        assert_eq!(engine.active(), 0, "{mode}");
    }
}

/// A sink that panics on every event.
struct Panicking;

impl EventSink for Panicking {
    fn try_send(&self, _: Event) -> Result<(), TrySendError> {
        panic!("this sink panics");
    }
}

#[tokio::test]
async fn a_panicking_events_sink_costs_only_its_call_and_the_server_goes_on() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate);
    let server = McpServer::for_user(e.clone(), user("alice"))
        .events(|_| Arc::new(Panicking) as Arc<dyn EventSink>);
    let (c, _) = in_process(server).await;
    for _ in 0..3 {
        // tool_executing cannot be delivered: the tool does not run, the caller is told.
        let r = c
            .call_tool(call("add", json!({"a": 1, "b": 2})))
            .await
            .unwrap();
        assert_eq!(r.is_error, Some(true), "{r:?}");
    }
    assert_eq!(c.list_all_tools().await.unwrap().len(), 4);
    let m = e.metrics();
    assert_eq!((m.by_status["undelivered"], m.active), (3, 0));
}

#[tokio::test]
async fn megabytes_and_wrong_types_in_arguments_are_error_results_without_the_value() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate);
    let events = Events::default();
    let (c, _) = in_process(events.attach(McpServer::for_user(e.clone(), user("alice")))).await;
    let big = "s3cr3t".repeat(500_000); // 3 MB
    for args in [
        json!({"a": big, "b": 1}),
        json!({"a": [1, 2], "b": 1}),
        json!({"a": {"b": {"c": null}}, "b": 1}),
        json!({"a": 1.5, "b": 1}),
        json!({}),
    ] {
        let r = c.call_tool(call("add", args.clone())).await.unwrap();
        assert_eq!(r.is_error, Some(true));
        let t = text(&r);
        assert!(
            t.len() < 1024 && !t.contains("s3cr3t"),
            "{}",
            &t[..t.len().min(200)]
        );
    }
    // Megabytes where any value goes: the call runs, its event carries a cut copy.
    let ok = c
        .call_tool(call("weather", json!({"city": big})))
        .await
        .unwrap();
    assert_eq!(ok.is_error, Some(false));
    let seen = events.of("alice").events();
    let shown = seen
        .iter()
        .find_map(|e| match e {
            Event::ToolExecuting(x) if &*x.tool_name == "weather" => Some(x.parameters.to_string()),
            _ => None,
        })
        .unwrap();
    assert!(
        shown.len() < 64 * 1024,
        "{} bytes in the event",
        shown.len()
    );
    assert_eq!(e.metrics().by_status["invalid_input"], 5);
}
