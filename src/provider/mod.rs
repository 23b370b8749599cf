//! LLM provider wire formats: tool definitions out, tool calls in, results back.
//!
//! One module per format:
//!
//! | module | tool definitions | calls in | results out |
//! |---|---|---|---|
//! | [`openai`] (Chat Completions) | `{"type":"function","function":{..}}` | `tool_calls` | `role: "tool"` messages |
//! | [`responses`] (OpenAI Responses) | flat `{"type":"function",name,..}` | `function_call` items | `function_call_output` items |
//! | [`anthropic`] (Messages) | `{name,description,input_schema}` | `tool_use` blocks | one `user` message of `tool_result` blocks |
//! | [`mcp`] (Model Context Protocol) | `tools/list` result | `tools/call` request | `CallToolResult` response |
//!
//! The rules are the same everywhere:
//!
//! * A payload that cannot be read (not an object, no `name`, `tool_calls` not an
//!   array, a `tool_use` without `id`, …) is a typed [`ProviderError`], never a panic.
//! * A call whose *arguments* are missing or wrong (including OpenAI's invalid JSON
//!   text) is **not** a `ProviderError`: it becomes a [`ToolCall`](crate::ToolCall)
//!   whose dispatch ends `invalid_input`, and the error goes back to the model in-band
//!   like any other failed call. An agent loop never crashes on a bad call.
//! * Every call gets exactly one result, in call order. A failed call's result is
//!   the [`DispatchError`]'s `Display` (its safe, model-facing message), marked as an
//!   error the way the format allows (`"Error: …"` text for OpenAI, `is_error` for
//!   Anthropic, `isError` for MCP).
//! * A result that is not a string is sent as its JSON text, except a result in the
//!   [`Content`] form, which each format gets in the nearest
//!   form it supports (see [`content`](crate::content)).
//!
//! Input schemas come from the registry (schemars). OpenAI and Anthropic get them
//! through [`input_schema`]: `$schema` and the root `title` are removed, `$defs` stay
//! at the root where every `$ref` (`#/$defs/…`) points. MCP keeps the dialect
//! (`$schema`) too ([`mcp::tool_schema`]). Providers want an object at the root (Anthropic
//! rejects `oneOf`/`anyOf`/`allOf` there); [`check_schemas`] finds tools whose input
//! type does not give one (a bare `String`, `()`, an enum), so a server can refuse to
//! start with them.

pub mod anthropic;
pub mod mcp;
pub mod openai;
pub mod responses;

use serde_json::{Map, Value};

use crate::call::ToolOutput;
use crate::content::{Block, Content};
use crate::error::DispatchError;
use crate::registry::{Registry, ToolDefinition};

/// Why a provider payload could not be read (or a tool cannot be offered to one).
///
/// `format` is `"openai"`, `"responses"`, `"anthropic"` or `"mcp"`; `path` is a JSON
/// path into the payload (`$.tool_calls[1].function`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// A value has the wrong JSON type.
    #[error("{format}: expected {expected} at `{path}`, found {found}")]
    WrongType {
        /// The provider format.
        format: &'static str,
        /// JSON path of the value.
        path: String,
        /// What was expected there.
        expected: &'static str,
        /// The JSON type found.
        found: &'static str,
    },
    /// A required field is missing (or `null`).
    #[error("{format}: missing `{field}` at `{path}`")]
    MissingField {
        /// The provider format.
        format: &'static str,
        /// JSON path of the object missing the field.
        path: String,
        /// The field.
        field: &'static str,
    },
    /// A field has a value this format does not allow.
    #[error("{format}: expected {expected} at `{path}`, found `{found}`")]
    UnexpectedValue {
        /// The provider format.
        format: &'static str,
        /// JSON path of the value.
        path: String,
        /// What was expected.
        expected: &'static str,
        /// What was found (cut to 64 characters).
        found: String,
    },
    /// The payload nests arrays and objects deeper than `limit` levels (the bound
    /// `serde_json` puts on text; a payload built in memory can exceed it). Checked
    /// before anything walks or copies it.
    #[error("{format}: the payload is nested more than {limit} levels deep")]
    NestedTooDeep {
        /// The provider format.
        format: &'static str,
        /// The deepest nesting accepted.
        limit: usize,
    },
    /// A tool's input schema is not an object schema, so providers reject it.
    #[error("tool `{tool}` cannot be offered to a provider: {reason}")]
    UnsupportedSchema {
        /// The tool.
        tool: String,
        /// What is wrong with its input schema.
        reason: &'static str,
    },
}

/// A tool's input schema as providers get it: `$schema` and the root `title` (the
/// Rust type's name) removed, everything else (including `$defs`) unchanged.
///
/// ```
/// # use tool_dispatch::{provider, tool_fn, Registry, ToolError};
/// # #[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
/// # struct In { city: String }
/// let registry = Registry::builder()
///     .tool(tool_fn("w", "Weather.", |i: In, _| async move { Ok::<_, ToolError>(i.city) }))
///     .build()?;
/// let schema = provider::input_schema(registry.definition("w").unwrap());
/// assert_eq!(schema["type"], "object");
/// assert!(schema.get("$schema").is_none());
/// # Ok::<(), tool_dispatch::RegistryError>(())
/// ```
pub fn input_schema(def: &ToolDefinition) -> Value {
    let mut schema = def.input_schema.clone();
    if let Value::Object(root) = &mut schema {
        root.remove("$schema");
        root.remove("title");
    }
    schema
}

/// Checks that every tool's input schema is one providers accept: `"type":
/// "object"` at the root and no `oneOf`/`anyOf`/`allOf` there. Returns the first
/// tool that does not fit.
///
/// Tools taking a bare `String`, `()` or an enum fail this check; wrap their input in
/// a struct to offer them to a model.
pub fn check_schemas(registry: &Registry) -> Result<(), ProviderError> {
    for def in registry.definitions() {
        let schema = input_schema(def);
        let reason = match &schema {
            Value::Object(o) if o.get("type") != Some(&Value::from("object")) => {
                Some("its input schema's root is not `\"type\": \"object\"`")
            }
            Value::Object(o)
                if ["oneOf", "anyOf", "allOf"]
                    .iter()
                    .any(|k| o.contains_key(*k)) =>
            {
                Some("its input schema has `oneOf`/`anyOf`/`allOf` at the root")
            }
            Value::Object(_) => None,
            _ => Some("its input schema is not a JSON object"),
        };
        if let Some(reason) = reason {
            return Err(ProviderError::UnsupportedSchema {
                tool: def.name.clone(),
                reason,
            });
        }
    }
    Ok(())
}

/// A successful result as text: a string as is, content blocks described one per
/// line, anything else as its JSON text.
pub(crate) fn output_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => match Content::from_json(other) {
            Some(c) => c
                .blocks()
                .iter()
                .map(Block::describe)
                .collect::<Vec<_>>()
                .join("\n"),
            None => other.to_string(),
        },
    }
}

/// The content blocks of a successful result, if it is in the content form.
pub(crate) fn content_of(result: Option<&Result<ToolOutput, DispatchError>>) -> Option<Content> {
    match result {
        Some(Ok(out)) => Content::from_json(&out.value),
        _ => None,
    }
}

/// The text of one result, and whether it is an error.
pub(crate) fn result_text(result: Option<&Result<ToolOutput, DispatchError>>) -> (String, bool) {
    match result {
        Some(Ok(out)) => (output_text(&out.value), false),
        Some(Err(e)) => (e.to_string(), true),
        None => (MISSING_RESULT.to_owned(), true),
    }
}

/// The error text for a call that `render_results` got no result for.
pub(crate) const MISSING_RESULT: &str = "no result was produced for this call";

/// The id a result is reported under: the call's own id, else the one the engine made.
pub(crate) fn result_id(
    call: &crate::ToolCall,
    result: Option<&Result<ToolOutput, DispatchError>>,
) -> String {
    match (&call.id, result) {
        (Some(id), _) => id.clone(),
        (None, Some(Ok(out))) => out.call_id.to_string(),
        (None, _) => String::new(),
    }
}

/// The tool definitions of both OpenAI formats, one per tool in registry order:
/// `tool(name, description, parameters, strict)` with the schema as [`input_schema`]
/// gives it, rewritten by [`openai::strict_schema`] when `strict`.
pub(crate) fn function_definitions(
    registry: &Registry,
    strict: bool,
    tool: fn(&str, &str, Value, bool) -> Value,
) -> Vec<Value> {
    registry
        .definitions()
        .map(|d| {
            let schema = input_schema(d);
            let parameters = if strict {
                openai::strict_schema(&schema)
            } else {
                schema
            };
            tool(&d.name, &d.description, parameters, strict)
        })
        .collect()
}

/// The results of a batch as both OpenAI formats send them, one per call in call
/// order: the id the result is reported under and its text, `"Error: <message>"`
/// ([`openai::ERROR_PREFIX`]) for a failed call or one with no entry in `results`.
pub(crate) fn prefixed_results<'a>(
    calls: &'a [crate::ToolCall],
    results: &'a [Result<ToolOutput, DispatchError>],
) -> impl Iterator<Item = (String, String)> + 'a {
    calls.iter().enumerate().map(|(i, call)| {
        let result = results.get(i);
        let (text, is_error) = result_text(result);
        let text = if is_error {
            format!("{}{text}", openai::ERROR_PREFIX)
        } else {
            text
        };
        (result_id(call, result), text)
    })
}

/// The name of a JSON value's type, for errors.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Field access with typed errors, for one format.
#[derive(Clone, Copy)]
pub(crate) struct Reader {
    pub(crate) format: &'static str,
}

impl Reader {
    /// Refuses a payload nested deeper than `serde_json` parses text, before any
    /// part of it is walked or copied.
    pub(crate) fn bounded(self, payload: &Value) -> Result<(), ProviderError> {
        let limit = crate::json::DEFAULT_MAX_DEPTH;
        if crate::json::exceeds_depth(payload, limit) {
            return Err(ProviderError::NestedTooDeep {
                format: self.format,
                limit,
            });
        }
        Ok(())
    }

    pub(crate) fn object<'a>(
        self,
        v: &'a Value,
        path: &str,
    ) -> Result<&'a Map<String, Value>, ProviderError> {
        v.as_object()
            .ok_or_else(|| self.wrong(v, path, "an object"))
    }

    pub(crate) fn array<'a>(self, v: &'a Value, path: &str) -> Result<&'a [Value], ProviderError> {
        v.as_array()
            .map(Vec::as_slice)
            .ok_or_else(|| self.wrong(v, path, "an array"))
    }

    pub(crate) fn wrong(self, v: &Value, path: &str, expected: &'static str) -> ProviderError {
        ProviderError::WrongType {
            format: self.format,
            path: path.to_owned(),
            expected,
            found: type_name(v),
        }
    }

    /// A field that must be present and not null.
    pub(crate) fn field<'a>(
        self,
        o: &'a Map<String, Value>,
        path: &str,
        field: &'static str,
    ) -> Result<&'a Value, ProviderError> {
        match o.get(field) {
            Some(Value::Null) | None => Err(ProviderError::MissingField {
                format: self.format,
                path: path.to_owned(),
                field,
            }),
            Some(v) => Ok(v),
        }
    }

    /// A required string field.
    pub(crate) fn string<'a>(
        self,
        o: &'a Map<String, Value>,
        path: &str,
        field: &'static str,
    ) -> Result<&'a str, ProviderError> {
        let v = self.field(o, path, field)?;
        v.as_str()
            .ok_or_else(|| self.wrong(v, &format!("{path}.{field}"), "a string"))
    }

    /// A required string field that must not be empty (ids, names).
    pub(crate) fn nonempty<'a>(
        self,
        o: &'a Map<String, Value>,
        path: &str,
        field: &'static str,
    ) -> Result<&'a str, ProviderError> {
        let s = self.string(o, path, field)?;
        if s.is_empty() {
            return Err(self.unexpected(&format!("{path}.{field}"), "a non-empty string", s));
        }
        Ok(s)
    }

    pub(crate) fn unexpected(
        self,
        path: &str,
        expected: &'static str,
        found: &str,
    ) -> ProviderError {
        ProviderError::UnexpectedValue {
            format: self.format,
            path: path.to_owned(),
            expected,
            found: found.chars().take(64).collect(),
        }
    }
}
