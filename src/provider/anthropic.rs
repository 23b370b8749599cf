//! Anthropic Messages: `{name,description,input_schema}` definitions, `tool_use`
//! blocks in, one `user` message of `tool_result` blocks out.
//!
//! The API rejects a `tool_use` left without its `tool_result`, so
//! [`render_results`] always gives one per call, in call order, in a single message;
//! a failed call's block carries `"is_error": true` and the safe error message.
//!
//! One round trip:
//!
//! ```
//! use serde_json::json;
//! use tool_dispatch::{provider::anthropic, tool_fn, Engine, RecordingSink, Registry, ToolError, UserContext};
//!
//! #[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
//! struct AddIn { a: i64, b: i64 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let add = tool_fn("add", "Adds two integers.", |i: AddIn, _cx| async move { Ok::<_, ToolError>(i.a + i.b) });
//! let registry = Registry::builder().tool(add).build()?;
//! let tools = anthropic::definitions(&registry); // `tools` of the request
//! assert_eq!(tools[0]["input_schema"]["type"], "object");
//!
//! let engine = Engine::builder(registry).build();
//! let user = UserContext::builder("alice").build()?;
//! let dispatcher = engine.dispatcher().sink(RecordingSink::new()).user(user);
//!
//! // The model's response (`stop_reason: "tool_use"`):
//! let message = json!({
//!     "role": "assistant",
//!     "content": [
//!         {"type": "text", "text": "Adding, and trying a tool that does not exist."},
//!         {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 2, "b": 3}},
//!         {"type": "tool_use", "id": "toolu_2", "name": "subtract", "input": {"a": 2, "b": 3}}
//!     ]
//! });
//! let calls = anthropic::parse_calls(&message)?;
//! let results = dispatcher.dispatch_all(calls.clone()).await;
//! let reply = anthropic::render_results(&calls, &results); // the next `user` message
//! assert_eq!(reply, json!({"role": "user", "content": [
//!     {"type": "tool_result", "tool_use_id": "toolu_1", "content": "5"},
//!     {"type": "tool_result", "tool_use_id": "toolu_2", "content": "unknown tool `subtract`", "is_error": true}
//! ]}));
//! # Ok(())
//! # }
//! ```

use serde_json::{Map, Value, json};

use crate::content::{Block, Content};
use crate::provider::{ProviderError, Reader, content_of, input_schema, result_id, result_text};
use crate::{DispatchError, Registry, ToolCall, ToolOutput};

const R: Reader = Reader {
    format: "anthropic",
};

/// Tool definitions for the request's `tools`: `{"name","description","input_schema"}`.
pub fn definitions(registry: &Registry) -> Vec<Value> {
    registry
        .definitions()
        .map(|d| {
            json!({
                "name": d.name,
                "description": d.description,
                "input_schema": input_schema(d),
            })
        })
        .collect()
}

/// Reads the `tool_use` blocks of an assistant message (or a whole Messages API
/// response), or of its `content` array, in order.
///
/// Other blocks (`text`, `thinking`, `server_tool_use` run by Anthropic, …) are
/// skipped; a string `content` has no calls. A `tool_use` needs `id` and `name`;
/// its `input` is checked at dispatch (a missing one ends `invalid_input`).
pub fn parse_calls(payload: &Value) -> Result<Vec<ToolCall>, ProviderError> {
    R.bounded(payload)?;
    let (content, path) = match payload {
        Value::Object(o) => (R.field(o, "$", "content")?, "$.content"),
        _ => (payload, "$"),
    };
    if content.is_string() && path != "$" {
        return Ok(Vec::new());
    }
    let mut calls = Vec::new();
    for (i, block) in R.array(content, path)?.iter().enumerate() {
        let bpath = format!("{path}[{i}]");
        let b = R.object(block, &bpath)?;
        if R.string(b, &bpath, "type")? == "tool_use" {
            calls.push(parse_tool_use(b, &bpath)?);
        }
    }
    Ok(calls)
}

fn parse_tool_use(b: &Map<String, Value>, path: &str) -> Result<ToolCall, ProviderError> {
    let id = R.nonempty(b, path, "id")?;
    let name = R.nonempty(b, path, "name")?;
    let input = b.get("input").cloned().unwrap_or(Value::Null);
    Ok(ToolCall::new(name, input).with_id(id))
}

/// The `user` message answering a batch:
/// `{"role":"user","content":[{"type":"tool_result","tool_use_id","content"}, ..]}`,
/// exactly one block per call, in call order. `content` is the result (JSON text
/// unless it is a string); a failed call's block has the safe error message and
/// `"is_error": true` (also a call that has no entry in `results`). A result in the
/// [`Content`] form is a list of blocks instead: `text`, `image` (base64) for JPEG,
/// PNG, GIF and WebP images, `document` for a PDF, and a `text` describing any other
/// block.
pub fn render_results(calls: &[ToolCall], results: &[Result<ToolOutput, DispatchError>]) -> Value {
    let blocks: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            let result = results.get(i);
            let (text, is_error) = result_text(result);
            let content = match content_of(result) {
                Some(c) => Value::Array(blocks(&c)),
                None => Value::String(text),
            };
            let mut block = json!({
                "type": "tool_result",
                "tool_use_id": result_id(call, result),
                "content": content,
            });
            if is_error {
                block["is_error"] = Value::Bool(true);
            }
            block
        })
        .collect();
    json!({ "role": "user", "content": blocks })
}

/// Image types a `tool_result` takes.
const IMAGES: &[&str] = &["image/jpeg", "image/png", "image/gif", "image/webp"];

/// The `tool_result` content blocks of a content result.
fn blocks(content: &Content) -> Vec<Value> {
    content
        .blocks()
        .iter()
        .map(|block| match block {
            Block::Image { data, mime_type } if IMAGES.contains(&mime_type.as_str()) => json!({
                "type": "image",
                "source": {"type": "base64", "media_type": mime_type, "data": data},
            }),
            Block::Resource { resource: r }
                if r.mime_type.as_deref() == Some("application/pdf") && r.blob.is_some() =>
            {
                json!({
                    "type": "document",
                    "source": {
                        "type": "base64",
                        "media_type": "application/pdf",
                        "data": r.blob.as_deref().unwrap_or_default(),
                    },
                    "title": r.uri,
                })
            }
            other => json!({"type": "text", "text": other.describe()}),
        })
        .collect()
}
