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

use crate::call::ToolCall;
use crate::event::Event;
use crate::provider::{ProviderError, anthropic, openai};
use crate::runlog::Resync;
use crate::user::MAX_ID_LEN;

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

/// Every frame of the protocol, for the schema.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only its schema is used
enum AnyFrame {
    Client(ClientFrame),
    Server(ServerFrame),
    Run(RunFrame),
}

/// The JSON Schema (draft 2020-12) of every frame of protocol version 1: a frame is a
/// `ClientFrame`, a `ServerFrame` or a `RunFrame` (see `$defs`). The same document is
/// published as `docs/ws-protocol.schema.json`.
///
/// ```
/// let schema = tool_dispatch::ws::protocol::schema();
/// assert!(schema["$defs"]["Resume"].is_object());
/// ```
pub fn schema() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(AnyFrame)).unwrap_or_default();
    if let Some(root) = schema.as_object_mut() {
        root.insert(
            "title".into(),
            "tool-dispatch WebSocket session protocol, version 1".into(),
        );
        root.insert(
            "description".into(),
            "Every frame of the session: client to server (ClientFrame), server to one \
             connection (ServerFrame), and frames recorded in a run, each with its seq \
             (RunFrame). Generated from the Rust types of tool_dispatch::ws::protocol."
                .into(),
        );
        root.insert("x-protocol-version".into(), PROTOCOL_VERSION.into());
    }
    plain_descriptions(&mut schema);
    schema
}

/// The descriptions come from the Rust docs: keep their prose, drop their code
/// examples and turn intra-doc links into plain code spans.
fn plain_descriptions(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                match v {
                    Value::String(text) if k == "description" => *text = plain(text),
                    _ => plain_descriptions(v),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(plain_descriptions),
        _ => {}
    }
}

fn plain(doc: &str) -> String {
    let prose = doc.split("\n```").next().unwrap_or(doc).trim_end();
    let mut out = String::with_capacity(prose.len());
    let mut rest = prose;
    // `[`x`]` and `[`x`](path)` become `x` in backticks.
    while let Some(start) = rest.find("[`") {
        let Some(len) = rest[start..].find("`]") else {
            break;
        };
        out.push_str(&rest[..start]);
        out.push_str(&rest[start + 1..start + len + 1]);
        rest = &rest[start + len + 2..];
        if rest.starts_with('(')
            && let Some(close) = rest.find(')')
        {
            rest = &rest[close + 1..];
        }
    }
    out.push_str(rest);
    out.replace('\n', " ")
}

// ------------------------------------------------------------------------------------
// Reading a client's message.
// ------------------------------------------------------------------------------------

/// Why a client's message was refused. The `error` frame says
/// `malformed message: {this}`; nothing the client sent is quoted beyond a short
/// excerpt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Not JSON text.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("expected a JSON object")]
    NotAnObject,
    /// A `type` the session does not know, and no app hook took it.
    #[error(
        "unknown message type {0}; expected `resume`, `cancel`, `tool_approval_decision` or a model turn"
    )]
    UnknownType(String),
    /// An object that is neither a request nor a model turn, and no app hook took it.
    #[error(
        "expected an OpenAI assistant message with `tool_calls` or an Anthropic assistant message with `tool_use` content blocks"
    )]
    NotATurn,
    /// A required field is missing.
    #[error("a `{frame}` message needs a `{field}`")]
    Missing {
        /// The message's kind.
        frame: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A field has the wrong type or value.
    #[error("`{field}` must be {expected}, not {got}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
        /// An excerpt of what it was.
        got: String,
    },
    /// An identifier longer than [`MAX_ID_LEN`](crate::MAX_ID_LEN) bytes.
    #[error("`{field}` is {len} bytes long; at most {MAX_ID_LEN} are accepted")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The turn's calls could not be read.
    #[error("{0}")]
    Calls(String),
    /// The turn has no call.
    #[error("the message contains no tool call")]
    NoCalls,
    /// More calls than the server accepts in one message.
    #[error("{count} tool calls in one message; at most {max} are accepted")]
    TooManyCalls {
        /// Calls in the message.
        count: usize,
        /// The bound.
        max: usize,
    },
}

impl From<ProviderError> for FrameError {
    fn from(e: ProviderError) -> Self {
        FrameError::Calls(e.to_string())
    }
}

/// A client's message, read.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A model turn.
    Turn {
        format: TurnFormat,
        calls: Vec<ToolCall>,
        run_id: Option<String>,
    },
    /// A request of the session.
    Request(Request),
    /// A JSON object the session does not know: the app's hook may take it.
    Other(Value),
}

/// A short, printable excerpt of something the client sent.
pub(crate) fn excerpt(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// An identifier field: absent (or `null`), or a string of at most
/// [`MAX_ID_LEN`] bytes.
fn id_field(v: &Value, field: &'static str) -> Result<Option<String>, FrameError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() > MAX_ID_LEN => Err(FrameError::TooLong {
            field,
            len: s.len(),
        }),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(FrameError::Invalid {
            field,
            expected: "a string",
            got: excerpt(other),
        }),
    }
}

fn required_id(v: &Value, field: &'static str, frame: &'static str) -> Result<String, FrameError> {
    id_field(v, field)?.ok_or(FrameError::Missing { frame, field })
}

/// Reads one client message; `max_calls` bounds the calls of a turn.
pub(crate) fn parse(text: &str, max_calls: usize) -> Result<Incoming, FrameError> {
    let v: Value = serde_json::from_str(text).map_err(|e| FrameError::NotJson(e.to_string()))?;
    if !v.is_object() {
        return Err(FrameError::NotAnObject);
    }
    match v.get("type") {
        Some(Value::String(t)) if t == "resume" => {
            let run_id = required_id(&v, "run_id", "resume")?;
            let after_seq = match v.get("after_seq") {
                Some(n) => {
                    n.as_u64()
                        .filter(|n| *n <= MAX_SEQ)
                        .ok_or_else(|| FrameError::Invalid {
                            field: "after_seq",
                            expected: "a whole number from 0 to 9007199254740991",
                            got: excerpt(n),
                        })?
                }
                None => {
                    return Err(FrameError::Missing {
                        frame: "resume",
                        field: "after_seq",
                    });
                }
            };
            let epoch = match v.get("epoch") {
                None | Some(Value::Null) => None,
                Some(e) => Some(e.as_u64().ok_or_else(|| FrameError::Invalid {
                    field: "epoch",
                    expected: "the number from `ready`",
                    got: excerpt(e),
                })?),
            };
            let resume = Resume {
                run_id,
                after_seq,
                epoch,
            };
            Ok(Incoming::Request(Request::Resume(resume)))
        }
        Some(Value::String(t)) if t == "cancel" => {
            let run_id = required_id(&v, "run_id", "cancel")?;
            Ok(Incoming::Request(Request::Cancel(Cancel { run_id })))
        }
        Some(Value::String(t)) if t == "tool_approval_decision" => {
            let call_id = required_id(&v, "call_id", "tool_approval_decision")?;
            let message = match v.get("message") {
                None | Some(Value::Null) => None,
                Some(Value::String(m)) => Some(m.clone()),
                Some(other) => {
                    return Err(FrameError::Invalid {
                        field: "message",
                        expected: "a string",
                        got: excerpt(other),
                    });
                }
            };
            let decision = match v.get("decision").and_then(Value::as_str) {
                Some("approve") => Decision::Approve,
                Some("reject") => Decision::Reject,
                _ => {
                    return Err(FrameError::Invalid {
                        field: "decision",
                        expected: "\"approve\" or \"reject\"",
                        got: v.get("decision").map_or("nothing".into(), excerpt),
                    });
                }
            };
            let d = ApprovalDecision {
                call_id,
                decision,
                message,
            };
            Ok(Incoming::Request(Request::ToolApprovalDecision(d)))
        }
        // An Anthropic response object is `"type": "message"`: a model turn.
        None => turn(v, max_calls),
        Some(Value::String(t)) if t == "message" => turn(v, max_calls),
        Some(_) => Ok(Incoming::Other(v)),
    }
}

/// A model turn, or (an object with no calls in either format) another message.
fn turn(v: Value, max_calls: usize) -> Result<Incoming, FrameError> {
    let format = if v.get("tool_calls").is_some() || v.get("choices").is_some() {
        TurnFormat::OpenAi
    } else if v
        .get("content")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|b| b.get("type") == Some(&"tool_use".into())))
    {
        TurnFormat::Anthropic
    } else {
        return Ok(Incoming::Other(v));
    };
    let run_id = id_field(&v, "run_id")?;
    let calls = match format {
        TurnFormat::OpenAi => openai::parse_calls(&v)?,
        TurnFormat::Anthropic => anthropic::parse_calls(&v)?,
    };
    if calls.is_empty() {
        return Err(FrameError::NoCalls);
    }
    if calls.len() > max_calls {
        return Err(FrameError::TooManyCalls {
            count: calls.len(),
            max: max_calls,
        });
    }
    Ok(Incoming::Turn {
        format,
        calls,
        run_id,
    })
}

/// Why an unknown message got no hook: the error it gets.
pub(crate) fn unknown(v: &Value) -> FrameError {
    match v.get("type") {
        Some(t) => FrameError::UnknownType(excerpt(t)),
        None => FrameError::NotATurn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_their_types() {
        let frames = [
            r#"{"type":"resume","run_id":"r","after_seq":3}"#,
            r#"{"type":"resume","run_id":"r","after_seq":3,"epoch":9}"#,
            r#"{"type":"cancel","run_id":"r"}"#,
            r#"{"type":"tool_approval_decision","call_id":"c","decision":"reject","message":"no"}"#,
        ];
        for text in frames {
            let Ok(Incoming::Request(r)) = parse(text, 16) else {
                panic!("{text}")
            };
            let back = serde_json::to_value(ClientFrame::Request(r)).unwrap();
            assert_eq!(back, serde_json::from_str::<Value>(text).unwrap());
        }
    }

    #[test]
    fn errors_name_the_field_and_quote_little() {
        let long = format!(
            r#"{{"type":"resume","run_id":"{}","after_seq":1}}"#,
            "r".repeat(60_000)
        );
        assert_eq!(
            parse(&long, 16).unwrap_err(),
            FrameError::TooLong {
                field: "run_id",
                len: 60_000
            }
        );
        let e = parse(r#"{"type":"resume","run_id":"r","after_seq":"7"}"#, 16).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`after_seq` must be a whole number from 0 to 9007199254740991, not \"7\""
        );
        let e = parse(r#"{"type":"cancel","run_id":null}"#, 16).unwrap_err();
        assert_eq!(e.to_string(), "a `cancel` message needs a `run_id`");
        let big = format!(r#"{{"type":{{"x":"{}"}}}}"#, "y".repeat(10_000));
        let Ok(Incoming::Other(v)) = parse(&big, 16) else {
            panic!("an unknown type is for the hook")
        };
        assert!(unknown(&v).to_string().len() < 200);
    }

    #[test]
    fn the_schema_names_every_frame() {
        let s = schema();
        for name in [
            "ClientFrame",
            "ServerFrame",
            "RunFrame",
            "Resume",
            "Ready",
            "ToolResults",
            "Event",
        ] {
            assert!(s["$defs"][name].is_object(), "{name} missing");
        }
    }
}
