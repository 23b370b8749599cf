//! OpenAI Chat Completions: `tools` definitions, `tool_calls` in, `role: "tool"`
//! messages out.
//!
//! `arguments` arrive as a JSON *string*, which a model can get wrong; such a call
//! is still read (as [`ToolCall::from_text`]) and its dispatch ends `invalid_input`,
//! so the error goes back to the model as that call's `tool` message. Chat
//! Completions has no error flag, so a failed call's `content` is
//! `"Error: <message>"`.
//!
//! One round trip:
//!
//! ```
//! use serde_json::json;
//! use tool_dispatch::{provider::openai, tool_fn, Engine, RecordingSink, Registry, ToolError, UserContext};
//!
//! #[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
//! struct AddIn { a: i64, b: i64 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let add = tool_fn("add", "Adds two integers.", |i: AddIn, _cx| async move { Ok::<_, ToolError>(i.a + i.b) });
//! let registry = Registry::builder().tool(add).build()?;
//! let tools = openai::definitions(&registry); // send as `tools` in the request
//! assert_eq!(tools[0]["function"]["name"], "add");
//!
//! let engine = Engine::builder(registry).build();
//! let user = UserContext::builder("alice").build()?;
//! let dispatcher = engine.dispatcher().sink(RecordingSink::new()).user(user);
//!
//! // `choices[0].message` of the model's response:
//! let message = json!({
//!     "role": "assistant",
//!     "content": null,
//!     "tool_calls": [
//!         {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\":2,\"b\":3}"}},
//!         {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": "{\"a\":2,"}}
//!     ]
//! });
//! let calls = openai::parse_calls(&message)?;
//! let results = dispatcher.dispatch_all(calls.clone()).await;
//! let reply = openai::render_results(&calls, &results); // append to `messages`
//! assert_eq!(reply[0], json!({"role": "tool", "tool_call_id": "call_1", "content": "5"}));
//! assert!(reply[1]["content"].as_str().unwrap().starts_with("Error: invalid arguments for `add`"));
//! # Ok(())
//! # }
//! ```

use serde_json::{Map, Value, json};

use crate::provider::{ProviderError, Reader, function_definitions, prefixed_results};
use crate::{DispatchError, Registry, ToolCall, ToolOutput};

const R: Reader = Reader { format: "openai" };

/// The marker that starts a failed call's `content`.
pub const ERROR_PREFIX: &str = "Error: ";

/// Tool definitions for the request's `tools`:
/// `{"type":"function","function":{"name","description","parameters","strict":false}}`,
/// with the schema as [`input_schema`](super::input_schema) gives it.
pub fn definitions(registry: &Registry) -> Vec<Value> {
    function_definitions(registry, false, tool)
}

/// Tool definitions with `"strict": true` (Structured Outputs), the schema rewritten
/// to OpenAI's strict subset by [`strict_schema`].
///
/// In strict mode the model sends every property, `null` for the ones it leaves out,
/// so give optional inputs the type `Option<T>`: a `#[serde(default)]` field that is
/// not an `Option` rejects that `null` as invalid input.
pub fn definitions_strict(registry: &Registry) -> Vec<Value> {
    function_definitions(registry, true, tool)
}

fn tool(name: &str, description: &str, parameters: Value, strict: bool) -> Value {
    json!({
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": parameters,
            "strict": strict,
        }
    })
}

/// Rewrites a JSON Schema to the subset OpenAI accepts with `strict: true`:
/// every object gets `additionalProperties: false` and lists all its properties in
/// `required`, properties that were optional become nullable, `oneOf` becomes
/// `anyOf`, a `$ref` with sibling keywords is wrapped in an `anyOf`, and keywords
/// strict mode does not support (`default`, number `format`s, `minItems`, …) are
/// dropped. Maps (`additionalProperties` with a schema) cannot be expressed and
/// become closed, empty objects.
pub fn strict_schema(schema: &Value) -> Value {
    let mut s = schema.clone();
    strict_in_place(&mut s);
    s
}

/// String formats strict mode supports.
const STRICT_FORMATS: &[&str] = &[
    "date-time",
    "time",
    "date",
    "duration",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "uuid",
];

/// Keywords strict mode rejects.
const STRICT_UNSUPPORTED: &[&str] = &[
    "default",
    "examples",
    "minLength",
    "maxLength",
    "minProperties",
    "maxProperties",
    "patternProperties",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
    "minItems",
    "maxItems",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "readOnly",
    "writeOnly",
    "deprecated",
];

fn strict_in_place(v: &mut Value) {
    let Value::Object(o) = v else { return };
    for k in STRICT_UNSUPPORTED {
        o.remove(*k);
    }
    let string_format = o.get("type") == Some(&Value::from("string"))
        && o.get("format")
            .and_then(Value::as_str)
            .is_some_and(|f| STRICT_FORMATS.contains(&f));
    if !string_format {
        o.remove("format");
    }
    if let Some(one_of) = o.remove("oneOf") {
        o.insert("anyOf".into(), one_of);
    }
    for key in ["anyOf", "allOf", "prefixItems"] {
        if let Some(Value::Array(items)) = o.get_mut(key) {
            items.iter_mut().for_each(strict_in_place);
        }
    }
    for key in ["$defs", "definitions"] {
        if let Some(Value::Object(defs)) = o.get_mut(key) {
            defs.values_mut().for_each(strict_in_place);
        }
    }
    if let Some(items) = o.get_mut("items") {
        strict_in_place(items);
    }
    let is_object = o.get("type") == Some(&Value::from("object")) || o.contains_key("properties");
    if is_object {
        let required: Vec<String> = o
            .get("required")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let mut props = match o.remove("properties") {
            Some(Value::Object(p)) => p,
            _ => Map::new(),
        };
        for (name, prop) in props.iter_mut() {
            strict_in_place(prop);
            if !required.contains(name) {
                make_nullable(prop);
            }
        }
        let all: Vec<Value> = props.keys().map(|k| Value::from(k.as_str())).collect();
        o.insert("properties".into(), Value::Object(props));
        o.insert("required".into(), Value::Array(all));
        o.insert("additionalProperties".into(), Value::Bool(false));
    }
    // `$ref` may not have sibling keywords: keep the description on a wrapper.
    if o.contains_key("$ref")
        && o.len() > 1
        && let Some(r) = o.remove("$ref")
    {
        o.insert("anyOf".into(), json!([{ "$ref": r }]));
    }
}

fn accepts_null(o: &Map<String, Value>) -> bool {
    let null = Value::from("null");
    match o.get("type") {
        Some(Value::String(t)) if t == "null" => return true,
        Some(Value::Array(ts)) if ts.contains(&null) => return true,
        _ => {}
    }
    o.get("anyOf")
        .and_then(Value::as_array)
        .is_some_and(|bs| bs.iter().any(|b| b.as_object().is_some_and(accepts_null)))
}

fn make_nullable(v: &mut Value) {
    let Value::Object(o) = v else { return };
    if accepts_null(o) {
        return;
    }
    let null = json!({"type": "null"});
    if let Some(Value::Array(branches)) = o.get_mut("anyOf") {
        branches.push(null);
        return;
    }
    let constrained = o.contains_key("enum") || o.contains_key("const") || o.contains_key("$ref");
    match o.get_mut("type") {
        Some(Value::String(t)) if !constrained => {
            let t = std::mem::take(t);
            o.insert("type".into(), json!([t, "null"]));
        }
        Some(Value::Array(ts)) if !constrained => ts.push(Value::from("null")),
        _ => {
            let description = o.remove("description");
            let inner = std::mem::take(o);
            o.insert(
                "anyOf".into(),
                Value::Array(vec![Value::Object(inner), null]),
            );
            if let Some(d) = description {
                o.insert("description".into(), d);
            }
        }
    }
}

/// Reads the tool calls of an assistant message (`choices[0].message`), of a whole
/// chat completion (`{"choices":[{"message":..}]}`), or a bare `tool_calls` array.
///
/// An assistant message without `tool_calls` has none (an empty batch). Each call
/// needs an `id`, and a `function` with a `name`; its `arguments` are taken as they
/// come (text, or an object from OpenAI-compatible servers that send one) and checked
/// at dispatch.
pub fn parse_calls(payload: &Value) -> Result<Vec<ToolCall>, ProviderError> {
    R.bounded(payload)?;
    let (message, path) = match payload {
        Value::Array(_) => return parse_tool_calls(payload, "$"),
        Value::Object(o) if o.contains_key("choices") => {
            let choices = R.array(&o["choices"], "$.choices")?;
            let first = choices
                .first()
                .ok_or_else(|| R.unexpected("$.choices", "at least one choice", "[]"))?;
            let choice = R.object(first, "$.choices[0]")?;
            (
                R.field(choice, "$.choices[0]", "message")?,
                "$.choices[0].message",
            )
        }
        _ => (payload, "$"),
    };
    let m = R.object(message, path)?;
    match m.get("tool_calls") {
        Some(Value::Null) => Ok(Vec::new()),
        Some(calls) => parse_tool_calls(calls, &format!("{path}.tool_calls")),
        None if m.get("role").and_then(Value::as_str) == Some("assistant") => Ok(Vec::new()),
        None => Err(ProviderError::MissingField {
            format: R.format,
            path: path.to_owned(),
            field: "tool_calls",
        }),
    }
}

fn parse_tool_calls(calls: &Value, path: &str) -> Result<Vec<ToolCall>, ProviderError> {
    R.array(calls, path)?
        .iter()
        .enumerate()
        .map(|(i, c)| parse_one(c, &format!("{path}[{i}]")))
        .collect()
}

fn parse_one(c: &Value, path: &str) -> Result<ToolCall, ProviderError> {
    let o = R.object(c, path)?;
    if let Some(t) = o.get("type") {
        match t.as_str() {
            Some("function") => {}
            Some(other) => {
                return Err(R.unexpected(&format!("{path}.type"), "\"function\"", other));
            }
            None => return Err(R.wrong(t, &format!("{path}.type"), "a string")),
        }
    }
    let id = R.nonempty(o, path, "id")?;
    let fpath = format!("{path}.function");
    let f = R.object(R.field(o, path, "function")?, &fpath)?;
    let name = R.nonempty(f, &fpath, "name")?;
    let call = match f.get("arguments") {
        Some(Value::String(text)) => ToolCall::from_text(name, text.as_str()),
        Some(other) => ToolCall::new(name, other.clone()),
        None => ToolCall::new(name, Value::Null),
    };
    Ok(call.with_id(id))
}

/// The `role: "tool"` messages answering a batch, one per call in call order:
/// `{"role":"tool","tool_call_id","content"}`. `content` is the result (JSON text
/// unless it is a string), or `"Error: <message>"` for a failed call (also for a
/// call that has no entry in `results`). Chat Completions takes only text from a
/// tool, so a result in the [`Content`](crate::content::Content) form is its texts,
/// with each other block described in a line of its own (`[image/png, 4 bytes]`, a
/// link as `[name](uri)`).
pub fn render_results(calls: &[ToolCall], results: &[Result<ToolOutput, DispatchError>]) -> Value {
    prefixed_results(calls, results)
        .map(|(id, content)| {
            json!({
                "role": "tool",
                "tool_call_id": id,
                "content": content,
            })
        })
        .collect()
}
