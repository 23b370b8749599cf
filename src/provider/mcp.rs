//! Model Context Protocol: the `tools/list` result, `tools/call` requests in,
//! JSON-RPC responses carrying a `CallToolResult` out, and `notifications/progress`.
//!
//! Following the MCP specification's two kinds of errors:
//!
//! * a call that reached the pipeline and failed (invalid arguments, tool error,
//!   timeout, denied, rate limited, …) is a *tool execution error*: a normal result
//!   with `"isError": true` and the safe message as text, which the model sees;
//! * an unknown tool name is a *protocol error*: a JSON-RPC error `-32602`, as is a
//!   request that cannot be read ([`error_response`]).
//!
//! One round trip:
//!
//! ```
//! use serde_json::json;
//! use tool_dispatch::{provider::mcp, tool_fn, Engine, RecordingSink, Registry, ToolError, UserContext};
//!
//! #[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
//! struct AddIn { a: i64, b: i64 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let add = tool_fn("add", "Adds two integers.", |i: AddIn, _cx| async move { Ok::<_, ToolError>(i.a + i.b) });
//! let registry = Registry::builder().tool(add).build()?;
//! let list = mcp::list_tools(&registry); // the `result` of `tools/list`
//! assert_eq!(list["tools"][0]["inputSchema"]["type"], "object");
//!
//! let engine = Engine::builder(registry).build();
//! let user = UserContext::builder("alice").build()?;
//! let dispatcher = engine.dispatcher().sink(RecordingSink::new()).user(user);
//!
//! let request = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
//!                      "params": {"name": "add", "arguments": {"a": 2, "b": 3}}});
//! let (id, call) = mcp::parse_call(&request)?;
//! let result = dispatcher.dispatch(call).await;
//! let response = mcp::render_result(&id, &result);
//! assert_eq!(response, json!({"jsonrpc": "2.0", "id": 7, "result": {
//!     "content": [{"type": "text", "text": "5"}], "isError": false}}));
//! # Ok(())
//! # }
//! ```

use serde_json::{Value, json};

use crate::content::{CONTENT_KEY, Content};
use crate::event::ToolProgress;
use crate::provider::{ProviderError, Reader, output_text};
use crate::registry::ToolDefinition;
use crate::{DispatchError, Registry, ToolCall, ToolOutput};

const R: Reader = Reader { format: "mcp" };

/// JSON-RPC "Invalid Request".
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC "Method not found".
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC "Invalid params" (also MCP's code for an unknown tool).
pub const INVALID_PARAMS: i64 = -32602;

/// The JSON Schema dialect a tool's input schema names when it names none.
pub const DEFAULT_DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

/// The `result` of `tools/list`: `{"tools":[{"name","description","inputSchema"}]}`,
/// in registration order.
pub fn list_tools(registry: &Registry) -> Value {
    let tools: Vec<Value> = registry
        .definitions()
        .map(|d| {
            json!({
                "name": d.name,
                "description": d.description,
                "inputSchema": tool_schema(d),
            })
        })
        .collect();
    json!({ "tools": tools })
}

/// A tool's `inputSchema` as MCP lists it: the schema whole, its dialect (`$schema`)
/// and `$defs` kept, without the root `title` (the Rust type's name). A schema that
/// names no dialect gets MCP's default, JSON Schema 2020-12, written out; one that
/// names no type (a tool taking any JSON value) gets `"type": "object"`, which is
/// all MCP's `arguments` can be.
///
/// ```
/// # use tool_dispatch::{provider, tool_fn, Registry, ToolError};
/// # #[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
/// # struct In { city: String }
/// let registry = Registry::builder()
///     .tool(tool_fn("w", "Weather.", |i: In, _| async move { Ok::<_, ToolError>(i.city) }))
///     .build()?;
/// let schema = provider::mcp::tool_schema(registry.definition("w").unwrap());
/// assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
/// # Ok::<(), tool_dispatch::RegistryError>(())
/// ```
pub fn tool_schema(def: &ToolDefinition) -> Value {
    let mut schema = match &def.input_schema {
        // `true` (any value): MCP's arguments are an object all the same.
        Value::Bool(true) => json!({}),
        other => other.clone(),
    };
    if let Value::Object(root) = &mut schema {
        root.remove("title");
        if !root.contains_key("$schema") {
            root.insert("$schema".into(), Value::from(DEFAULT_DIALECT));
        }
        // A schema that says nothing of the type accepts an object, which is all
        // `arguments` can be; MCP wants that said.
        if !root.contains_key("type") {
            root.insert("type".into(), Value::from("object"));
        }
    }
    schema
}

/// Reads a JSON-RPC `tools/call` request into its id and the call.
///
/// Needs `"jsonrpc": "2.0"`, an `id` (string or number), `"method": "tools/call"`
/// and `params.name`; missing `params.arguments` means no arguments (`{}`), and
/// arguments that do not fit the tool end `invalid_input` at dispatch. The call gets
/// a fresh engine-made id (JSON-RPC ids repeat across sessions).
pub fn parse_call(request: &Value) -> Result<(Value, ToolCall), ProviderError> {
    R.bounded(request)?;
    let o = R.object(request, "$")?;
    let version = R.string(o, "$", "jsonrpc")?;
    if version != "2.0" {
        return Err(R.unexpected("$.jsonrpc", "\"2.0\"", version));
    }
    let id = R.field(o, "$", "id")?;
    if !(id.is_string() || id.is_number()) {
        return Err(R.wrong(id, "$.id", "a string or a number"));
    }
    let method = R.string(o, "$", "method")?;
    if method != "tools/call" {
        return Err(R.unexpected("$.method", "\"tools/call\"", method));
    }
    let params = R.object(R.field(o, "$", "params")?, "$.params")?;
    let name = R.nonempty(params, "$.params", "name")?;
    let arguments = match params.get("arguments") {
        None | Some(Value::Null) => json!({}),
        Some(a) => a.clone(),
    };
    Ok((id.clone(), ToolCall::new(name, arguments)))
}

/// The `progressToken` a `tools/call` request asked progress under
/// (`params._meta.progressToken`), if any.
pub fn progress_token(request: &Value) -> Option<&Value> {
    request
        .get("params")?
        .get("_meta")?
        .get("progressToken")
        .filter(|t| t.is_string() || t.is_number())
}

/// The JSON-RPC response to a `tools/call`.
///
/// Success: `{"content":[{"type":"text","text"}],"isError":false}`, the text being
/// the result (JSON text unless it is a string), plus `structuredContent` when the
/// result is a JSON object; a result in the [`Content`] form is its blocks, as they
/// are. A failed call: the same with the safe message and `"isError": true`, except
/// an unknown tool, which is a JSON-RPC error `-32602`.
pub fn render_result(id: &Value, result: &Result<ToolOutput, DispatchError>) -> Value {
    let result = match outcome(result) {
        Outcome::Result {
            content,
            structured,
            is_error,
        } => {
            let mut r = json!({
                "content": content.to_json(),
                "isError": is_error,
            });
            if let Some(s) = structured {
                r["structuredContent"] = s.clone();
            }
            r
        }
        Outcome::ProtocolError {
            code,
            message,
            data,
        } => return rpc_error(id, code, &message, Some(data)),
    };
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

/// How MCP answers a call, whatever carries the answer (this module's JSON, or the
/// rmcp server of the `mcp` feature): one mapping of statuses for both.
#[cfg_attr(not(feature = "mcp"), allow(dead_code))]
pub(crate) enum Outcome<'a> {
    /// A `CallToolResult`: its content, the structured result (a JSON object), and
    /// whether it is a tool execution error.
    Result {
        content: Blocks<'a>,
        structured: Option<&'a Value>,
        is_error: bool,
    },
    /// A JSON-RPC error (an unknown tool).
    ProtocolError {
        code: i64,
        message: String,
        data: Value,
    },
}

/// A result's content: one text block (most results), or the blocks of a result
/// in the [`Content`] form, as MCP JSON.
#[cfg_attr(not(feature = "mcp"), allow(dead_code))]
pub(crate) enum Blocks<'a> {
    Text(String),
    Json(&'a [Value]),
}

impl Blocks<'_> {
    /// The `content` array.
    fn to_json(&self) -> Value {
        match self {
            Blocks::Text(t) => json!([{ "type": "text", "text": t }]),
            Blocks::Json(blocks) => Value::Array(blocks.to_vec()),
        }
    }
}

/// The MCP answer to a call's result.
pub(crate) fn outcome(result: &Result<ToolOutput, DispatchError>) -> Outcome<'_> {
    match result {
        Ok(out) => match Content::from_json(&out.value) {
            Some(_) => Outcome::Result {
                content: match out.value.get(CONTENT_KEY) {
                    Some(Value::Array(blocks)) => Blocks::Json(blocks),
                    _ => Blocks::Json(&[]),
                },
                structured: None,
                is_error: false,
            },
            None => Outcome::Result {
                content: Blocks::Text(output_text(&out.value)),
                structured: out.value.is_object().then_some(&out.value),
                is_error: false,
            },
        },
        Err(e @ DispatchError::UnknownTool { .. }) => Outcome::ProtocolError {
            code: INVALID_PARAMS,
            message: e.to_string(),
            data: json!({"status": e.status()}),
        },
        Err(e) => Outcome::Result {
            content: Blocks::Text(e.to_string()),
            structured: None,
            is_error: true,
        },
    }
}

/// The JSON-RPC error response for a request [`parse_call`] refused: `-32601` when
/// the method is not `tools/call`, `-32602` for missing or bad `params`, `-32600`
/// otherwise.
/// Pass `Value::Null` as `id` when the request's id could not be read.
pub fn error_response(id: &Value, error: &ProviderError) -> Value {
    let path = match error {
        ProviderError::WrongType { path, .. }
        | ProviderError::MissingField { path, .. }
        | ProviderError::UnexpectedValue { path, .. } => path.as_str(),
        ProviderError::UnsupportedSchema { .. } | ProviderError::NestedTooDeep { .. } => "",
    };
    let missing_params = matches!(
        error,
        ProviderError::MissingField {
            field: "params",
            ..
        }
    );
    let code = if path == "$.method" {
        METHOD_NOT_FOUND
    } else if missing_params || path.starts_with("$.params") {
        INVALID_PARAMS
    } else {
        INVALID_REQUEST
    };
    rpc_error(id, code, &error.to_string(), None)
}

fn rpc_error(id: &Value, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut error = json!({ "code": code, "message": message });
    if let Some(d) = data {
        error["data"] = d;
    }
    json!({ "jsonrpc": "2.0", "id": id, "error": error })
}

/// A `notifications/progress` for a tool's progress event, under the request's
/// `progressToken`: `progress` is the fraction done, `total` is `1.0`.
pub fn progress_notification(event: &ToolProgress, progress_token: &Value) -> Value {
    let mut params = json!({
        "progressToken": progress_token,
        "progress": event.progress,
        "total": 1.0,
    });
    if let Some(m) = &event.message {
        params["message"] = Value::from(m.as_str());
    }
    json!({ "jsonrpc": "2.0", "method": "notifications/progress", "params": params })
}
