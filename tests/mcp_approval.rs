//! Approvals by elicitation, in both revisions: a call needing approval is asked of
//! an MCP client that declared elicitation (`elicitation/create` up to 2025-11-25,
//! an `input_required` result in 2026-07-28). Accept runs it, decline and cancel
//! end it `rejected`, no answer ends it `approval_timeout` at the window. With a
//! second answerer (the engine's `resolve_approval`, as the user's page answers),
//! the first answer wins, the question is withdrawn, and the MCP result and the
//! call's events agree. A client without elicitation waits for the page.
#![cfg(feature = "mcp")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::mcp::*;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientCapabilities, ClientConfig,
    ElicitRequestParams, ElicitResult, ElicitationAction, ErrorData, Implementation,
    ProtocolVersion,
};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt, RequestContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tool_dispatch::event::{ApprovalOutcome, Event, Status};
use tool_dispatch::mcp::McpServer;
use tool_dispatch::{ApprovalError, Engine, RecordingSink, UserContext, Verdict};

/// How the client answers a question.
#[derive(Clone, Copy, Debug)]
enum Says {
    Accept,
    Decline,
    Cancel,
    /// Waits to be told (`Asker::answer`), or to be withdrawn.
    Later,
}

/// What the client saw.
#[derive(Debug)]
enum Saw {
    Asked(String),
    Withdrawn,
}

/// A client that declares elicitation (or not) and answers as told.
#[derive(Clone)]
struct Asker {
    says: Says,
    elicitation: bool,
    saw: mpsc::UnboundedSender<Saw>,
    later: Arc<Mutex<mpsc::UnboundedReceiver<ElicitationAction>>>,
}

impl ClientHandler for Asker {
    fn get_info(&self) -> ClientConfig {
        let caps = match self.elicitation {
            true => ClientCapabilities::builder().enable_elicitation().build(),
            false => ClientCapabilities::default(),
        };
        ClientConfig::new(caps, Implementation::new("asker", "1"))
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, ErrorData> {
        let message = match &request {
            ElicitRequestParams::FormElicitationParams { message, .. } => message.clone(),
            _ => String::new(),
        };
        let _ = self.saw.send(Saw::Asked(message));
        let action = match self.says {
            Says::Accept => ElicitationAction::Accept,
            Says::Decline => ElicitationAction::Decline,
            Says::Cancel => ElicitationAction::Cancel,
            Says::Later => {
                let mut later = self.later.lock().await;
                tokio::select! {
                    a = later.recv() => a.unwrap_or(ElicitationAction::Cancel),
                    () = context.ct.cancelled() => {
                        let _ = self.saw.send(Saw::Withdrawn);
                        return Err(ErrorData::internal_error("withdrawn", None));
                    }
                }
            }
        };
        Ok(ElicitResult::new(action))
    }
}

type Client = RunningService<RoleClient, Asker>;

struct Setup {
    engine: Engine,
    server: McpServer,
    events: Events,
    client: Client,
    saw: mpsc::UnboundedReceiver<Saw>,
    later: mpsc::UnboundedSender<ElicitationAction>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Rev {
    /// 2025-11-25: `initialize`, and `elicitation/create` from the server.
    Sessions,
    /// 2026-07-28: `server/discover`, per-request metadata, `input_required`.
    Stateless,
}

fn asker(
    says: Says,
    elicitation: bool,
) -> (
    Asker,
    mpsc::UnboundedReceiver<Saw>,
    mpsc::UnboundedSender<ElicitationAction>,
) {
    let (saw_tx, saw) = mpsc::unbounded_channel();
    let (later_tx, later_rx) = mpsc::unbounded_channel();
    let a = Asker {
        says,
        elicitation,
        saw: saw_tx,
        later: Arc::new(Mutex::new(later_rx)),
    };
    (a, saw, later_tx)
}

/// alice's server (stdio-like, over an in-memory pipe) and a client in `rev`.
async fn setup(rev: Rev, says: Says, elicitation: bool, window: Duration) -> Setup {
    let gate = Arc::new(Semaphore::new(0));
    let engine = engine(&gate, window);
    let events = Events::default();
    let alice = UserContext::builder("alice").build().expect("user");
    let server = events.attach(McpServer::for_user(engine.clone(), alice));
    let (server_io, client_io) = tokio::io::duplex(1 << 16);
    let s = server.clone();
    tokio::spawn(async move {
        if let Ok(running) = s.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    let (asker, saw, later) = asker(says, elicitation);
    let client = match rev {
        Rev::Sessions => asker.serve(client_io).await.expect("initialized"),
        Rev::Stateless => asker
            .serve_with_lifecycle(
                client_io,
                ClientLifecycleMode::Discover {
                    preferred_versions: vec![ProtocolVersion::V_2026_07_28],
                },
            )
            .await
            .expect("discovered"),
    };
    Setup {
        engine,
        server,
        events,
        client,
        saw,
        later,
    }
}

fn send_email(to: &str) -> CallToolRequestParams {
    let args = json!({"to": to});
    let Value::Object(map) = args else {
        unreachable!()
    };
    CallToolRequestParams::new("send_email").with_arguments(map)
}

fn text(r: &CallToolResult) -> String {
    serde_json::to_value(&r.content).expect("json")[0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The call's ending as its events tell it: status and approval decision.
fn ending(sink: &RecordingSink) -> (Status, Option<ApprovalOutcome>) {
    let events = sink.events();
    assert_paired(&events);
    let resolved: Vec<ApprovalOutcome> = events
        .iter()
        .filter_map(|e| match e {
            Event::ToolApprovalResolved(r) => Some(r.decision),
            _ => None,
        })
        .collect();
    match events
        .iter()
        .rev()
        .find(|e| matches!(e, Event::ToolCompleted(_)))
    {
        Some(Event::ToolCompleted(c)) => {
            let decision = c.approval.as_ref().map(|a| a.decision);
            // The page's view (one tool_approval_resolved) agrees with the ending.
            let once: Vec<ApprovalOutcome> = decision.into_iter().collect();
            assert_eq!(resolved, once, "{events:?}");
            (c.status, decision)
        }
        _ => panic!("no tool_completed: {events:?}"),
    }
}

/// The id of the call waiting for approval, once its event is out.
async fn waiting_call(sink: &RecordingSink) -> String {
    for _ in 0..10_000 {
        let found = sink.events().iter().find_map(|e| match e {
            Event::ToolApprovalRequired(r) => Some(r.call_id.to_string()),
            _ => None,
        });
        if let Some(id) = found {
            return id;
        }
        tokio::task::yield_now().await;
    }
    panic!("no tool_approval_required")
}

fn assert_paired(events: &[Event]) {
    let executing = events
        .iter()
        .filter(|e| matches!(e, Event::ToolExecuting(_)))
        .count();
    let completed = events
        .iter()
        .filter(|e| matches!(e, Event::ToolCompleted(_)))
        .count();
    assert_eq!(executing, completed, "{events:?}");
}

#[tokio::test]
async fn accept_runs_it_decline_and_cancel_end_it_rejected_in_both_revisions() {
    for rev in [Rev::Sessions, Rev::Stateless] {
        for (says, want) in [
            (Says::Accept, Status::Success),
            (Says::Decline, Status::Rejected),
            (Says::Cancel, Status::Rejected),
        ] {
            let mut s = setup(rev, says, true, Duration::from_secs(60)).await;
            let r =
                tokio::time::timeout(PATIENCE, s.client.call_tool(send_email("bob@example.com")))
                    .await
                    .expect("an answer")
                    .expect("a result");
            let what = format!("{rev:?} {says:?}");
            match want {
                Status::Success => {
                    assert_eq!(r.is_error, Some(false), "{what}: {r:?}");
                    assert_eq!(text(&r), "sent to bob@example.com", "{what}");
                }
                _ => {
                    assert_eq!(r.is_error, Some(true), "{what}: {r:?}");
                    assert!(
                        text(&r).contains("in the MCP client"),
                        "{what}: {}",
                        text(&r)
                    );
                }
            }
            let Some(Saw::Asked(message)) = s.saw.recv().await else {
                panic!("{what}: never asked")
            };
            assert!(
                message.contains("send_email") && message.contains("sends an email in your name"),
                "{what}: {message}"
            );
            let decision = match want {
                Status::Success => ApprovalOutcome::Approved,
                _ => ApprovalOutcome::Rejected,
            };
            assert_eq!(
                ending(&s.events.of("alice")),
                (want, Some(decision)),
                "{what}"
            );
            let stats = s.server.stats();
            assert_eq!(
                (stats.elicitations_asked, stats.elicitations_answered),
                (1, 1),
                "{what}: {stats:?}"
            );
            assert_eq!(
                stats.input_required_results,
                u64::from(rev == Rev::Stateless),
                "{what}"
            );
            assert_eq!(s.engine.active(), 0, "{what}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn no_answer_ends_it_at_the_window_and_the_question_is_withdrawn() {
    let window = Duration::from_secs(120);
    let mut s = setup(Rev::Sessions, Says::Later, true, window).await;
    let started = tokio::time::Instant::now();
    let r = s
        .client
        .call_tool(send_email("bob@example.com"))
        .await
        .expect("a result");
    assert_eq!(r.is_error, Some(true), "{r:?}");
    assert!(
        started.elapsed() >= window,
        "ended at the window, not before"
    );
    assert_eq!(
        ending(&s.events.of("alice")),
        (Status::ApprovalTimeout, Some(ApprovalOutcome::Expired))
    );
    assert!(matches!(s.saw.recv().await, Some(Saw::Asked(_))));
    assert!(
        matches!(s.saw.recv().await, Some(Saw::Withdrawn)),
        "withdrawn"
    );
    assert_eq!(s.server.stats().elicitations_withdrawn, 1);
}

#[tokio::test(start_paused = true)]
async fn no_answer_in_the_stateless_revision_ends_it_at_the_window_too() {
    let window = Duration::from_secs(120);
    let s = setup(Rev::Stateless, Says::Later, true, window).await;
    let params = send_email("bob@example.com");
    let first = s
        .client
        .peer()
        .call_tool_once(params.clone())
        .await
        .expect("an answer");
    let CallToolResponse::InputRequired(ask) = first else {
        panic!("{first:?}")
    };
    let state = ask.request_state.expect("a state");
    assert!(
        ask.input_requests
            .is_some_and(|r| r.contains_key("approval"))
    );
    // Nobody answers; the window passes (paused clock).
    tokio::time::sleep(window + Duration::from_secs(1)).await;
    let retry = params.with_request_state(state);
    let CallToolResponse::Complete(r) = s.client.peer().call_tool_once(retry).await.expect("ok")
    else {
        panic!("not complete")
    };
    assert_eq!(r.is_error, Some(true));
    assert_eq!(
        ending(&s.events.of("alice")),
        (Status::ApprovalTimeout, Some(ApprovalOutcome::Expired))
    );
}

#[tokio::test]
async fn the_first_answer_wins_the_page_first() {
    // The page approves while the client still thinks: the question is withdrawn,
    // the call runs, and the client's late answer changes nothing.
    let mut s = setup(Rev::Sessions, Says::Later, true, Duration::from_secs(60)).await;
    let client = s.client.peer().clone();
    let call = tokio::spawn(async move { client.call_tool(send_email("x@example.com")).await });
    assert!(matches!(s.saw.recv().await, Some(Saw::Asked(_))));
    let sink = s.events.of("alice");
    let id = waiting_call(&sink).await;
    s.engine
        .resolve_approval("alice", &id, Verdict::Approve)
        .await
        .expect("the page answers first");
    assert!(matches!(s.saw.recv().await, Some(Saw::Withdrawn)));
    let r = call.await.expect("joined").expect("a result");
    assert_eq!(
        (r.is_error, text(&r)),
        (Some(false), "sent to x@example.com".into())
    );
    assert_eq!(
        ending(&sink),
        (Status::Success, Some(ApprovalOutcome::Approved))
    );
    let _ = s.later.send(ElicitationAction::Decline); // too late: nobody listens
    assert_eq!(s.server.stats().elicitations_withdrawn, 1);

    // The client first: the page's answer comes too late, and both views agree.
    let mut s = setup(Rev::Sessions, Says::Later, true, Duration::from_secs(60)).await;
    let client = s.client.peer().clone();
    let call = tokio::spawn(async move { client.call_tool(send_email("y@example.com")).await });
    assert!(matches!(s.saw.recv().await, Some(Saw::Asked(_))));
    let sink = s.events.of("alice");
    let id = waiting_call(&sink).await;
    s.later
        .send(ElicitationAction::Decline)
        .expect("the client answers");
    let r = call.await.expect("joined").expect("a result");
    assert_eq!(r.is_error, Some(true));
    assert_eq!(
        s.engine
            .resolve_approval("alice", &id, Verdict::Approve)
            .await,
        Err(ApprovalError::NoSuchPendingApproval)
    );
    assert_eq!(
        ending(&sink),
        (Status::Rejected, Some(ApprovalOutcome::Rejected))
    );
}

#[tokio::test]
async fn the_first_answer_wins_in_the_stateless_revision() {
    let s = setup(Rev::Stateless, Says::Accept, true, Duration::from_secs(60)).await;
    let params = send_email("z@example.com");
    let CallToolResponse::InputRequired(ask) = s
        .client
        .peer()
        .call_tool_once(params.clone())
        .await
        .expect("an answer")
    else {
        panic!("not input_required")
    };
    let sink = s.events.of("alice");
    let id = waiting_call(&sink).await;
    // The page rejects first; the client's accept arrives with the retry.
    s.engine
        .resolve_approval("alice", &id, Verdict::Reject { message: None })
        .await
        .expect("the page answers first");
    let mut responses = rmcp::model::InputResponses::new();
    responses.insert("approval".into(), json!({"action": "accept"}));
    let retry = params
        .with_request_state(ask.request_state.expect("state"))
        .with_input_responses(responses);
    let CallToolResponse::Complete(r) = s.client.peer().call_tool_once(retry).await.expect("ok")
    else {
        panic!("not complete")
    };
    assert_eq!(r.is_error, Some(true), "the page's no stands: {r:?}");
    assert_eq!(
        ending(&sink),
        (Status::Rejected, Some(ApprovalOutcome::Rejected))
    );
    assert_eq!(s.server.stats().elicitations_late, 1);
}

#[tokio::test]
async fn a_request_state_is_its_users_call_and_is_spent_once() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate, Duration::from_secs(60));
    let events = Events::default();
    let addr = serve(events.attach(McpServer::per_request(e.clone()))).await;
    let raw = Raw::new(addr);
    let call = |token: &str, id: u64, to: &str, state: Option<&str>, answer: Option<&str>| {
        let mut params = json!({"name": "send_email", "arguments": {"to": to}, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {"elicitation": {"form": {}}}}});
        if let Some(s) = state {
            params["requestState"] = json!(s);
        }
        if let Some(a) = answer {
            params["inputResponses"] = json!({"approval": {"action": a}});
        }
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params});
        let req = raw
            .post(token, None, &body.to_string())
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "send_email");
        async move {
            let a = req.whole().await;
            a.body
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .chain(std::iter::once(a.body.as_str()))
                .find_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
                .unwrap_or_else(|| panic!("{a:?}"))
        }
    };
    let first = call("alice-token", 1, "a@example.com", None, None).await;
    assert_eq!(first["result"]["resultType"], "input_required", "{first}");
    let state = first["result"]["requestState"]
        .as_str()
        .expect("a state")
        .to_owned();
    assert_eq!(
        first["result"]["inputRequests"]["approval"]["method"],
        "elicitation/create"
    );
    // Another user, other arguments, a forged state: refused, and nothing decided.
    for (token, to, s) in [
        ("bob-token", "a@example.com", state.clone()),
        ("alice-token", "someone-else@example.com", state.clone()),
        ("alice-token", "a@example.com", format!("{state}0")),
        ("alice-token", "a@example.com", "00".repeat(16)),
    ] {
        let r = call(token, 2, to, Some(&s), Some("accept")).await;
        assert_eq!(r["error"]["code"], -32602, "{token} {to}: {r}");
    }
    assert_eq!(e.active(), 1, "still waiting");
    // Without the answer, the question is asked again under the same state.
    let again = call("alice-token", 3, "a@example.com", Some(&state), None).await;
    assert_eq!(again["result"]["requestState"], state.as_str(), "{again}");
    let done = call(
        "alice-token",
        4,
        "a@example.com",
        Some(&state),
        Some("accept"),
    )
    .await;
    assert_eq!(
        done["result"]["content"][0]["text"], "sent to a@example.com",
        "{done}"
    );
    let replay = call(
        "alice-token",
        5,
        "a@example.com",
        Some(&state),
        Some("accept"),
    )
    .await;
    assert_eq!(replay["error"]["code"], -32602, "spent: {replay}");
    assert_eq!(e.metrics().total, 1);
    assert!(events.of("bob").events().is_empty());
}

#[tokio::test]
async fn a_client_without_elicitation_waits_for_the_page() {
    for rev in [Rev::Sessions, Rev::Stateless] {
        let s = setup(rev, Says::Accept, false, Duration::from_secs(60)).await;
        let client = s.client.peer().clone();
        let call = tokio::spawn(async move { client.call_tool(send_email("p@example.com")).await });
        let sink = s.events.of("alice");
        let id = waiting_call(&sink).await;
        s.engine
            .resolve_approval("alice", &id, Verdict::Approve)
            .await
            .expect("the page answers");
        let r = call.await.expect("joined").expect("a result");
        assert_eq!(r.is_error, Some(false), "{rev:?}: {r:?}");
        assert_eq!(s.server.stats().elicitations_asked, 0, "{rev:?}");
    }
}

#[tokio::test]
async fn over_http_with_a_session_the_client_is_asked_on_its_call() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate, Duration::from_secs(60));
    let events = Events::default();
    let server = events.attach(McpServer::per_request(e.clone()));
    let addr = serve(server.clone()).await;
    let config = StreamableHttpClientTransportConfig::with_uri(format!("http://{addr}/mcp"))
        .auth_header("alice-token".to_owned());
    let (a, mut saw, _later) = asker(Says::Accept, true);
    let client = a
        .serve(StreamableHttpClientTransport::from_config(config))
        .await
        .expect("initialized over HTTP");
    let r = tokio::time::timeout(PATIENCE, client.call_tool(send_email("h@example.com")))
        .await
        .expect("in time")
        .expect("a result");
    assert_eq!(text(&r), "sent to h@example.com");
    assert!(matches!(saw.recv().await, Some(Saw::Asked(_))));
    assert_eq!(
        ending(&events.of("alice")),
        (Status::Success, Some(ApprovalOutcome::Approved))
    );
    assert_eq!(server.stats().elicitations_answered, 1);
}
