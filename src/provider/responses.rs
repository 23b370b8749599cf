//! OpenAI Responses: flat `{"type":"function",name,..}` definitions,
//! `function_call` output items in, `function_call_output` input items out.
//!
//! Like Chat Completions, `arguments` is JSON text that may be invalid; such a call
//! ends `invalid_input` in-band. A failed call's `output` is `"Error: <message>"`.
//!
//! One round trip:
//!
//! ```
//! use serde_json::json;
//! use tool_dispatch::{provider::responses, tool_fn, Engine, RecordingSink, Registry, ToolError, UserContext};
//!
//! #[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
//! struct AddIn { a: i64, b: i64 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let add = tool_fn("add", "Adds two integers.", |i: AddIn, _cx| async move { Ok::<_, ToolError>(i.a + i.b) });
//! let registry = Registry::builder().tool(add).build()?;
//! let tools = responses::definitions(&registry); // `tools` of the request
//! assert_eq!(tools[0]["name"], "add");
//!
//! let engine = Engine::builder(registry).build();
//! let user = UserContext::builder("alice").build()?;
//! let dispatcher = engine.dispatcher().sink(RecordingSink::new()).user(user);
//!
//! // The response's `output`:
//! let output = json!([
//!     {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "add",
//!      "arguments": "{\"a\":2,\"b\":3}", "status": "completed"}
//! ]);
//! let calls = responses::parse_calls(&output)?;
//! let results = dispatcher.dispatch_all(calls.clone()).await;
//! let items = responses::render_results(&calls, &results); // `input` of the next request
//! assert_eq!(items, json!([{"type": "function_call_output", "call_id": "call_1", "output": "5"}]));
//! # Ok(())
//! # }
//! ```

use serde_json::{Value, json};

use crate::content::{Block, Content};
use crate::provider::{ProviderError, Reader, content_of, function_definitions, prefixed_results};
use crate::{DispatchError, Registry, ToolCall, ToolOutput};

const R: Reader = Reader {
    format: "responses",
};

/// Tool definitions for the request's `tools`:
/// `{"type":"function","name","description","parameters","strict":false}`.
pub fn definitions(registry: &Registry) -> Vec<Value> {
    function_definitions(registry, false, tool)
}

/// Tool definitions with `"strict": true`, the schema rewritten by
/// [`strict_schema`](super::openai::strict_schema) (see
/// [`openai::definitions_strict`](super::openai::definitions_strict) for what that
/// means for optional fields).
pub fn definitions_strict(registry: &Registry) -> Vec<Value> {
    function_definitions(registry, true, tool)
}

fn tool(name: &str, description: &str, parameters: Value, strict: bool) -> Value {
    json!({
        "type": "function",
        "name": name,
        "description": description,
        "parameters": parameters,
        "strict": strict,
    })
}

/// Reads the `function_call` items of a response's `output` array, of a whole
/// response object (`{"object":"response","output":[..]}`), or one item.
///
/// Other items (`message`, `reasoning`, built-in tool calls run by OpenAI) are
/// skipped. A `function_call` needs `call_id` and `name`; its `arguments` text is
/// checked at dispatch.
pub fn parse_calls(payload: &Value) -> Result<Vec<ToolCall>, ProviderError> {
    R.bounded(payload)?;
    let (items, path) = match payload {
        Value::Object(o) if o.contains_key("output") => (R.field(o, "$", "output")?, "$.output"),
        Value::Object(o) if o.contains_key("type") => {
            return Ok(parse_item(payload, "$")?.into_iter().collect());
        }
        Value::Object(_) => {
            return Err(ProviderError::MissingField {
                format: R.format,
                path: "$".into(),
                field: "output",
            });
        }
        _ => (payload, "$"),
    };
    let mut calls = Vec::new();
    for (i, item) in R.array(items, path)?.iter().enumerate() {
        calls.extend(parse_item(item, &format!("{path}[{i}]"))?);
    }
    Ok(calls)
}

fn parse_item(item: &Value, path: &str) -> Result<Option<ToolCall>, ProviderError> {
    let o = R.object(item, path)?;
    let kind = R.string(o, path, "type")?;
    if kind != "function_call" {
        return Ok(None);
    }
    let call_id = R.nonempty(o, path, "call_id")?;
    let name = R.nonempty(o, path, "name")?;
    let call = match o.get("arguments") {
        Some(Value::String(text)) => ToolCall::from_text(name, text.as_str()),
        Some(other) => ToolCall::new(name, other.clone()),
        None => ToolCall::new(name, Value::Null),
    };
    Ok(Some(call.with_id(call_id)))
}

/// The input items answering a batch, one per call in call order:
/// `{"type":"function_call_output","call_id","output"}`. `output` is the result
/// (JSON text unless it is a string), or `"Error: <message>"` for a failed call. A
/// result in the [`Content`] form is a list instead: `input_text` for text,
/// `input_image` (a data URL) for PNG, JPEG, WebP and GIF images, `input_file` for a
/// PDF, and an `input_text` describing any other block.
pub fn render_results(calls: &[ToolCall], results: &[Result<ToolOutput, DispatchError>]) -> Value {
    prefixed_results(calls, results)
        .enumerate()
        .map(|(i, (call_id, text))| {
            let output = match content_of(results.get(i)) {
                Some(content) => Value::Array(items(&content)),
                None => Value::String(text),
            };
            json!({
                "type": "function_call_output",
                "call_id": call_id,
                "output": output,
            })
        })
        .collect()
}

/// Image types the Responses API takes as input.
const IMAGES: &[&str] = &["image/png", "image/jpeg", "image/webp", "image/gif"];

/// The `output` items of a content result.
fn items(content: &Content) -> Vec<Value> {
    content
        .blocks()
        .iter()
        .map(|block| match block {
            Block::Image { data, mime_type } if IMAGES.contains(&mime_type.as_str()) => json!({
                "type": "input_image",
                "image_url": format!("data:{mime_type};base64,{data}"),
            }),
            Block::Resource { resource: r }
                if r.mime_type.as_deref() == Some("application/pdf") && r.blob.is_some() =>
            {
                let name = r.uri.rsplit('/').next().unwrap_or("document.pdf");
                json!({
                    "type": "input_file",
                    "filename": name,
                    "file_data": format!("data:application/pdf;base64,{}", r.blob.as_deref().unwrap_or_default()),
                })
            }
            other => json!({"type": "input_text", "text": other.describe()}),
        })
        .collect()
}
