//! Reading a client's message: the typed result, or an exact error.

use serde_json::Value;

use super::{ApprovalDecision, Cancel, Decision, MAX_SEQ, Request, Resume, TurnFormat};
use crate::call::ToolCall;
use crate::provider::{ProviderError, anthropic, openai};
use crate::user::MAX_ID_LEN;

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
    use crate::ws::protocol::{ClientFrame, schema};

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
