//! The session's frames, protocol version 1: every message a client sends and every
//! message the server sends, as Rust types; [`schema`] is their JSON Schema
//! (published as `docs/ws-protocol.schema.json`).
//!
//! Version 1 is the wire protocol the `chat_server` example spoke before the session
//! moved into the library, frame for frame; later changes are additive (new frames,
//! new optional fields), and the `ready` frame says which version the server speaks.
//!
//! ```
//! use tool_dispatch::ws::protocol::{ClientFrame, Request, Resume, ServerFrame};
//! let resume = ClientFrame::Request(Request::Resume(Resume {
//!     run_id: "run_1".into(),
//!     after_seq: 41,
//!     epoch: Some(7),
//! }));
//! assert_eq!(
//!     serde_json::to_value(&resume).unwrap(),
//!     serde_json::json!({"type": "resume", "run_id": "run_1", "after_seq": 41, "epoch": 7})
//! );
//! let text = r#"{"type":"resumed","run_id":"run_1","after_seq":41}"#;
//! let ServerFrame::Resumed(r) = serde_json::from_str(text).unwrap() else { panic!() };
//! assert_eq!(r.after_seq, 41);
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::Event;
use crate::runlog::Resync;

/// The protocol version this library speaks (sent in the `ready` frame).
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest `seq` a client may name: the largest integer a JavaScript number holds
/// exactly.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

// ------------------------------------------------------------------------------------
// Client → server.
// ------------------------------------------------------------------------------------

/// A message from the client: a request of the session, or a model turn whose tool
/// calls the server runs.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
#[non_exhaustive]
pub enum ClientFrame {
    /// `resume`, `cancel` or `tool_approval_decision`.
    Request(Request),
    /// An OpenAI Chat Completions assistant message with `tool_calls`.
    OpenAiTurn(OpenAiTurn),
    /// A whole OpenAI Chat Completions response (its first choice's `tool_calls`).
    OpenAiCompletion(OpenAiCompletion),
    /// An Anthropic Messages assistant message with `tool_use` blocks.
    AnthropicTurn(AnthropicTurn),
}

/// The session's own requests, told apart by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// Follow a run again from after a `seq`.
    Resume(Resume),
    /// Cancel a run's calls in flight.
    Cancel(Cancel),
    /// Answer a call waiting for approval.
    ToolApprovalDecision(ApprovalDecision),
}

/// `{"type":"resume","run_id":R,"after_seq":N,"epoch":E}`: answered by `resumed` and
/// then every frame of `R` with `seq > N`, or by `resync_required`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Resume {
    /// The run (one of the user's own; another user's is an unknown run).
    #[schemars(length(min = 1, max = 256))]
    pub run_id: String,
    /// The last `seq` the client has (0 for none).
    #[schemars(range(max = 9_007_199_254_740_991u64))]
    pub after_seq: u64,
    /// The `epoch` of the `ready` frame the client got its `seq`s under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// `{"type":"cancel","run_id":R}`: answered by `run_cancelled`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Cancel {
    /// The run whose calls in flight are cancelled.
    #[schemars(length(min = 1, max = 256))]
    pub run_id: String,
}

/// `{"type":"tool_approval_decision","call_id":C,"decision":..,"message":..}`:
/// answered by `decision_recorded`, or by an `error` for an unknown, already decided
/// or another user's call (the same error for all three).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApprovalDecision {
    /// The call waiting (its `tool_approval_required` names it).
    #[schemars(length(min = 1, max = 256))]
    pub call_id: String,
    /// What the user decided.
    pub decision: Decision,
    /// Why (shown to the model with a rejection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A user's answer to an approval request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Run the call.
    Approve,
    /// Do not run it (the call ends `rejected`).
    Reject,
}

/// An OpenAI assistant message. Its calls run in `run_id` (default: the connection's
/// run); their events, then a `tool_results` frame, are recorded in that run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OpenAiTurn {
    /// `"assistant"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The message's text, if any (not used).
    #[serde(default)]
    pub content: Option<Value>,
    /// The calls (1 to the server's calls-per-message bound).
    pub tool_calls: Vec<OpenAiToolCall>,
    /// The run to work in (default: the connection's run from `ready`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub run_id: Option<String>,
}

/// One call of an [`OpenAiTurn`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OpenAiToolCall {
    /// The call's id (given one by the server when missing or empty).
    #[serde(default)]
    pub id: Option<String>,
    /// `"function"`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The tool and its arguments.
    pub function: OpenAiFunction,
}

/// The function of an [`OpenAiToolCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OpenAiFunction {
    /// The tool's name.
    pub name: String,
    /// The arguments: a JSON object *as a string*, as OpenAI sends them.
    pub arguments: String,
}

/// A whole OpenAI Chat Completions response; the first choice's message is the turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OpenAiCompletion {
    /// The response's choices.
    pub choices: Vec<Value>,
    /// The run to work in (default: the connection's run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub run_id: Option<String>,
}

/// An Anthropic assistant message: its `tool_use` blocks are the calls, other blocks
/// are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AnthropicTurn {
    /// `"message"` (a whole Messages response), or absent.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `"assistant"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Content blocks; at least one `{"type":"tool_use","id":..,"name":..,"input":{..}}`.
    pub content: Vec<Value>,
    /// The run to work in (default: the connection's run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub run_id: Option<String>,
}

// ------------------------------------------------------------------------------------
// Server → client.
// ------------------------------------------------------------------------------------

/// A message from the server that belongs to one connection (not to a run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerFrame {
    /// The first frame of every connection.
    Ready(Ready),
    /// A `resume` was accepted; the run's frames after `after_seq` follow.
    Resumed(Resumed),
    /// The run cannot be followed from where the client asked (or a reader fell
    /// behind): the client fetches the run's state again.
    ResyncRequired(ResyncRequired),
    /// The answer to `cancel`.
    RunCancelled(RunCancelled),
    /// The answer to a `tool_approval_decision` that was applied.
    DecisionRecorded(DecisionRecorded),
    /// A message was refused; the connection goes on.
    Error(ErrorFrame),
}

/// `ready`: who the connection is, and its run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Ready {
    /// The authenticated user.
    pub user_id: String,
    /// The connection's run: model turns that name none work in it.
    pub run_id: String,
    /// The run log's epoch (below 2^53): keep it with every `seq`.
    pub epoch: u64,
    /// The tools this server runs, in registry order.
    pub tools: Vec<String>,
    /// The node's name, when the server has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The protocol version the server speaks (1).
    #[serde(default = "version_one")]
    pub protocol_version: u32,
}

fn version_one() -> u32 {
    1
}

/// `resumed`: the run's frames with `seq > after_seq` follow, then its live ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Resumed {
    /// The run.
    pub run_id: String,
    /// The `seq` the client asked to resume after.
    pub after_seq: u64,
}

/// `resync_required`: see [`ResyncReason`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ResyncRequired {
    /// The run.
    pub run_id: String,
    /// Why.
    pub reason: ResyncReason,
}

/// Why a run cannot be followed from where the client asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ResyncReason {
    /// Frames after the client's `seq` are no longer kept, the `seq` is past the
    /// run's end, or the connection fell behind the live stream.
    Truncated,
    /// No such run for this user (never existed, expired, or another user's).
    UnknownRun,
    /// The run log was restarted since the client's `epoch`.
    EpochChanged,
    /// A shared run log cannot be reached now; ask again.
    Unavailable,
}

impl From<Resync> for ResyncReason {
    fn from(r: Resync) -> Self {
        match r {
            Resync::Truncated => ResyncReason::Truncated,
            Resync::UnknownRun => ResyncReason::UnknownRun,
            Resync::EpochChanged => ResyncReason::EpochChanged,
            _ => ResyncReason::Unavailable,
        }
    }
}

/// `run_cancelled`: what a `cancel` reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RunCancelled {
    /// The run.
    pub run_id: String,
    /// Calls cancelled on this node.
    pub calls: usize,
    /// Whether the other nodes sharing the engine (through Redis) were told to cancel
    /// theirs.
    pub other_nodes_told: bool,
}

/// `decision_recorded`: the decision was applied to the waiting call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DecisionRecorded {
    /// The call.
    pub call_id: String,
    /// The decision.
    pub decision: Decision,
}

/// `error`: a message the server refused, and why (no secret, at most a short
/// excerpt of what was sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorFrame {
    /// A sentence for a person.
    pub error: String,
}

/// A frame recorded in a run: a pipeline event or a session record, with its `seq`
/// (from 1, contiguous in its run). It reaches every connection that follows the run,
/// and a `resume` replays it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunFrame {
    /// The frame's place in its run.
    pub seq: u64,
    /// The frame.
    #[serde(flatten)]
    pub record: RunRecord,
}

/// What a run frame carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
#[non_exhaustive]
pub enum RunRecord {
    /// `tool_executing`, `tool_progress`, `tool_completed`,
    /// `tool_approval_required`, … (see [`Event`]).
    Event(Event),
    /// A record the session writes itself.
    Session(SessionRecord),
}

/// Records the session writes into a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SessionRecord {
    /// A model turn's calls all ended: their results, rendered for the model.
    ToolResults(ToolResults),
}

/// `tool_results`: the results of one model turn, in call order, in the turn's own
/// provider format, ready to append to the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolResults {
    /// The run.
    pub run_id: String,
    /// The turn's format.
    pub format: TurnFormat,
    /// The calls' ids, in the turn's order.
    pub call_ids: Vec<String>,
    /// OpenAI: an array of `{"role":"tool","tool_call_id":..,"content":..}` messages;
    /// Anthropic: one `{"role":"user","content":[{"type":"tool_result",..}]}`
    /// message.
    pub results: Value,
}

/// The provider format of a model turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TurnFormat {
    /// OpenAI Chat Completions.
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
}

mod read;
mod schema;

pub use read::FrameError;
pub(crate) use read::{Incoming, excerpt, parse, unknown};
pub use schema::schema;
