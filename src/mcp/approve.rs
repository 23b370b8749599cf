//! Approvals asked of the MCP client, by elicitation.
//!
//! A call that needs its user's yes sends `tool_approval_required` to the user's
//! stream and waits in the engine's approval table, the one arbiter of the answer.
//! When the MCP client declared the elicitation capability (form mode), the server
//! asks it too:
//!
//! - revisions up to 2025-11-25: an `elicitation/create` request, sent while the
//!   `tools/call` is open. Accept approves, decline and cancel reject, through
//!   [`Engine::resolve_approval`]; when the call is decided first elsewhere (the
//!   user's page, the approval window, a cancellation: the call's
//!   `tool_approval_resolved`), the request is withdrawn with
//!   `notifications/cancelled`.
//! - 2026-07-28, which has no server requests: the `tools/call` is answered with an
//!   `input_required` result carrying the same `elicitation/create` under
//!   `inputRequests.approval` and a `requestState`, while the call goes on waiting
//!   here. The retry carries the answer (`inputResponses.approval`) and the state,
//!   and gets the call's result. The state is a random handle to the call kept
//!   here, valid only for the same user, tool and arguments, until the call's
//!   result was collected or [`KEEP`] after it ended; anything else is refused
//!   with `-32602`.
//!
//! A client without elicitation waits for the answer given elsewhere, as before.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rmcp::model::{
    ClientCapabilities, ClientResult, ElicitRequestParams, ElicitResult, ElicitationAction,
    InputRequest, InputRequests, InputRequiredResult, Request, ServerRequest,
};
use rmcp::service::{PeerRequestOptions, RequestHandle, ServiceError};
use rmcp::{Peer, RoleServer};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::stats::{Counters, Elicitation};
use crate::approval::Verdict;
use crate::engine::Engine;
use crate::event::Event;
use crate::{BoxFuture, DispatchError, ToolOutput};

/// The key of the approval question in `inputRequests` / `inputResponses`.
pub(super) const INPUT_KEY: &str = "approval";

/// How long a parked call's result waits for its retry after the call ended.
pub(super) const KEEP: Duration = Duration::from_secs(300);

/// Calls one user may have parked at once; beyond, a call waits in its request.
const PARKED_PER_USER: usize = 32;

/// What the server knows of a call's approval, from the call's own events.
#[derive(Debug, Clone, Default)]
pub(super) enum Phase {
    /// Not asked (yet).
    #[default]
    Idle,
    /// Waiting for a decision.
    Waiting(Question),
    /// The wait is over, whoever ended it.
    Decided,
}

/// A call's approval question.
#[derive(Debug, Clone)]
pub(super) struct Question {
    call_id: Arc<str>,
    tool: Arc<str>,
    reason: String,
}

impl Question {
    /// The `elicitation/create` parameters asking it: a form with no fields, whose
    /// accept is the yes.
    fn params(&self) -> Option<ElicitRequestParams> {
        let message = format!(
            "Approve the call of `{}`? {} (Accept runs it; decline or cancel refuses it.)",
            self.tool, self.reason
        );
        serde_json::from_value(json!({
            "mode": "form",
            "message": message,
            "requestedSchema": {"type": "object", "properties": {}},
        }))
        .ok()
    }
}

/// Follows a call's approval through its events.
pub(super) fn observe(phase: &watch::Sender<Phase>, event: &Event) {
    match event {
        Event::ToolApprovalRequired(e) => {
            phase.send_if_modified(|p| {
                if !matches!(p, Phase::Idle) {
                    return false;
                }
                *p = Phase::Waiting(Question {
                    call_id: Arc::clone(&e.call_id),
                    tool: Arc::clone(&e.tool_name),
                    reason: e.reason.clone(),
                });
                true
            });
        }
        // The wait ended, whoever ended it; or the call ended.
        Event::ToolApprovalResolved(_) | Event::ToolProgress(_) | Event::ToolCompleted(_) => {
            phase.send_if_modified(|p| match p {
                Phase::Waiting(_) => {
                    *p = Phase::Decided;
                    true
                }
                _ => false,
            });
        }
        _ => {}
    }
}

/// Whether a client can be asked: it declared elicitation in form mode.
pub(super) fn can_ask(capabilities: Option<&ClientCapabilities>) -> bool {
    capabilities
        .and_then(|c| c.elicitation.as_ref())
        .is_some_and(|e| e.form.is_some() || e.url.is_none())
}

/// The verdict a client's answer stands for.
fn verdict(result: &ElicitResult) -> Verdict {
    let message = match result.action {
        ElicitationAction::Accept => return Verdict::Approve,
        ElicitationAction::Decline => "declined in the MCP client",
        _ => "cancelled in the MCP client",
    };
    Verdict::Reject {
        message: Some(message.to_owned()),
    }
}

/// Gives the client's answer to the engine; the first answer wins.
pub(super) async fn decide(
    engine: &Engine,
    user: &str,
    question: &Question,
    result: &ElicitResult,
    counters: &Counters,
) {
    let taken = engine
        .resolve_approval(user, &question.call_id, verdict(result))
        .await;
    counters.elicitation(match taken {
        Ok(()) => Elicitation::Answered,
        Err(_) => Elicitation::Late,
    });
}

/// An `elicitation/create` asked of a client (revisions up to 2025-11-25).
#[derive(Debug)]
pub(super) struct Asked {
    handle: RequestHandle<RoleServer>,
    question: Question,
}

impl Asked {
    /// Asks `question` of the client behind `peer`; `None` when it cannot be sent.
    pub(super) async fn send(
        peer: &Peer<RoleServer>,
        question: Question,
        counters: &Counters,
    ) -> Option<Asked> {
        let params = question.params()?;
        let request = ServerRequest::ElicitRequest(Request::new(params));
        let handle = peer
            .send_cancellable_request(request, PeerRequestOptions::no_options())
            .await
            .ok()?;
        counters.elicitation(Elicitation::Asked);
        Some(Asked { handle, question })
    }

    /// The client's answer; `None` if it sent none (an error, or it went away).
    pub(super) async fn answer(&mut self) -> Option<ElicitResult> {
        match (&mut self.handle.rx).await {
            Ok(Ok(ClientResult::ElicitResult(r))) => Some(r),
            Ok(Ok(_) | Err(ServiceError::McpError(_)) | Err(_)) | Err(_) => None,
        }
    }

    pub(super) fn question(&self) -> &Question {
        &self.question
    }

    /// Takes the question back: the call was decided elsewhere.
    pub(super) async fn withdraw(self, counters: &Counters) {
        counters.elicitation(Elicitation::Withdrawn);
        let _ = self
            .handle
            .cancel(Some("the call was decided elsewhere".to_owned()))
            .await;
    }
}

/// The `input_required` result asking `question` (revision 2026-07-28).
pub(super) fn input_required(question: &Question, state: &str) -> Option<InputRequiredResult> {
    let params = question.params()?;
    let mut requests = InputRequests::new();
    requests.insert(
        INPUT_KEY.to_owned(),
        InputRequest::Elicitation(Request::new(params)),
    );
    Some(InputRequiredResult::new(
        Some(requests),
        Some(state.to_owned()),
    ))
}

/// The client's answer in a retry's `inputResponses`: `Ok(None)` when absent,
/// `Err` when it is not an elicitation result.
pub(super) fn response(
    responses: Option<&rmcp::model::InputResponses>,
) -> Result<Option<ElicitResult>, ()> {
    match responses.and_then(|r| r.get(INPUT_KEY)) {
        None => Ok(None),
        Some(v) => serde_json::from_value(Value::clone(v))
            .map(Some)
            .map_err(|_| ()),
    }
}

type Outcome = Result<ToolOutput, DispatchError>;

/// A call waiting for its retry (revision 2026-07-28).
#[derive(Debug)]
struct Entry {
    owner: Arc<str>,
    tool: Arc<str>,
    digest: u64,
    question: Question,
    phase: watch::Receiver<Phase>,
    result: watch::Receiver<Option<Outcome>>,
}

/// What a retry may see of its parked call.
#[derive(Debug)]
pub(super) struct Ticket {
    pub(super) question: Question,
    pub(super) phase: watch::Receiver<Phase>,
    pub(super) result: watch::Receiver<Option<Outcome>>,
}

/// The calls parked by `input_required` results, by their state handle.
#[derive(Debug, Default)]
pub(super) struct Parked {
    table: Mutex<HashMap<String, Entry>>,
    hasher: std::hash::RandomState,
}

fn lock(m: &Mutex<HashMap<String, Entry>>) -> MutexGuard<'_, HashMap<String, Entry>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fresh, unguessable state handle (128 random bits).
fn handle() -> Option<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Parked {
    /// What binds a state to its call: the tool and the arguments' text.
    pub(super) fn digest(
        &self,
        tool: &str,
        arguments: Option<&serde_json::Map<String, Value>>,
    ) -> u64 {
        let text = arguments.map_or_else(String::new, |a| Value::Object(a.clone()).to_string());
        self.hasher.hash_one((tool, text))
    }

    /// Runs the rest of `call` on its own task, under a new state handle; gives the
    /// call back if `owner` has too many parked, or no handle can be made.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn park(
        self: &Arc<Self>,
        owner: &str,
        tool: &str,
        digest: u64,
        question: Question,
        phase: watch::Receiver<Phase>,
        call: BoxFuture<'static, Outcome>,
    ) -> Result<String, BoxFuture<'static, Outcome>> {
        let Some(state) = handle() else {
            return Err(call);
        };
        let (tx, rx) = watch::channel(None);
        {
            let mut table = lock(&self.table);
            let mine = table.values().filter(|e| &*e.owner == owner).count();
            if mine >= PARKED_PER_USER {
                return Err(call);
            }
            table.insert(
                state.clone(),
                Entry {
                    owner: Arc::from(owner),
                    tool: Arc::from(tool),
                    digest,
                    question,
                    phase,
                    result: rx,
                },
            );
        }
        let (parked, key) = (Arc::clone(self), state.clone());
        tokio::spawn(async move {
            let outcome = call.await;
            let _ = tx.send(Some(outcome));
            tokio::time::sleep(KEEP).await;
            let gone = lock(&parked.table).remove(&key);
            drop(gone);
        });
        Ok(state)
    }

    /// The parked call `state` names, if it is `owner`'s call of `tool` with the
    /// same arguments.
    pub(super) fn find(&self, state: &str, owner: &str, tool: &str, digest: u64) -> Option<Ticket> {
        let table = lock(&self.table);
        let e = table.get(state)?;
        (&*e.owner == owner && &*e.tool == tool && e.digest == digest).then(|| Ticket {
            question: e.question.clone(),
            phase: e.phase.clone(),
            result: e.result.clone(),
        })
    }

    /// The call's result was delivered: its state is spent.
    pub(super) fn spent(&self, state: &str) {
        let gone = lock(&self.table).remove(state);
        drop(gone);
    }
}
