//! The JSON Schema of every frame, generated from the types of [`super`].

use schemars::JsonSchema;
use serde_json::Value;

use super::{ClientFrame, PROTOCOL_VERSION, RunFrame, ServerFrame};

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
