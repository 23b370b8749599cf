//! What a call is made of, with no behaviour: [`ToolCall`] (a call by name, as a
//! model emits it), its [`Arguments`], and the [`ToolOutput`] a successful call
//! returns.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// A tool call's arguments: a JSON value, or JSON text as a model sent it (which may
/// not be valid JSON; that is reported as invalid input, never a panic).
#[derive(Debug, Clone, PartialEq)]
pub enum Arguments {
    /// Parsed arguments.
    Value(Value),
    /// Arguments as JSON text.
    Text(String),
}

impl From<Value> for Arguments {
    fn from(v: Value) -> Self {
        Arguments::Value(v)
    }
}

/// A call by name, as a model emits it.
///
/// ```
/// use serde_json::json;
/// use tool_dispatch::ToolCall;
/// let call = ToolCall::new("get_weather", json!({"city": "Paris"})).with_id("call_abc");
/// let from_text = ToolCall::from_text("get_weather", r#"{"city": "Paris"}"#);
/// # let _ = (call, from_text);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The model's id for the call, used as the events' `call_id`. A fresh unique
    /// id is made when it is `None` (or empty, or over 256 bytes).
    pub id: Option<String>,
    /// The tool's name.
    pub name: String,
    /// The arguments.
    pub arguments: Arguments,
    /// A timeout for this call only, replacing the tool's.
    pub timeout: Option<Duration>,
}

impl ToolCall {
    /// A call with parsed arguments.
    pub fn new(name: impl Into<String>, arguments: impl Into<Arguments>) -> Self {
        ToolCall {
            id: None,
            name: name.into(),
            arguments: arguments.into(),
            timeout: None,
        }
    }

    /// A call whose arguments are JSON text (OpenAI sends them so).
    pub fn from_text(name: impl Into<String>, arguments: impl Into<String>) -> Self {
        Self::new(name, Arguments::Text(arguments.into()))
    }

    /// Sets the call id.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets a timeout for this call only.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A successful call's result.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput<T = Value> {
    /// The call's id (as in its events).
    pub call_id: Arc<str>,
    /// The tool's result, unaltered (never redacted or truncated).
    pub value: T,
    /// Whether it came from the result cache rather than a run of the tool.
    pub cached: bool,
}
