//! The published JSON Schema of the session's frames (`docs/ws-protocol.schema.json`)
//! is the one the Rust types give: a change to a frame that is not published fails
//! here. `TOOL_DISPATCH_BLESS=1 cargo test --features axum --test ws_schema` writes
//! the file anew (never under `CI`).
#![cfg(feature = "axum")]

use std::path::Path;

use serde_json::Value;
use tool_dispatch::ws::protocol::schema;

fn published_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ws-protocol.schema.json")
}

fn generated() -> String {
    let mut text = serde_json::to_string_pretty(&schema()).expect("a schema is JSON");
    text.push('\n');
    text
}

#[test]
fn the_published_schema_is_the_one_the_types_give() {
    let path = published_path();
    let want = generated();
    let bless = std::env::var_os("TOOL_DISPATCH_BLESS").is_some();
    if bless {
        assert!(
            std::env::var_os("CI").is_none(),
            "the schema is never rewritten in CI"
        );
        std::fs::write(&path, &want).expect("write docs/ws-protocol.schema.json");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/ws-protocol.schema.json differs from the protocol's types; if the change \
         is meant (and additive), publish it: \
         TOOL_DISPATCH_BLESS=1 cargo test --features axum --test ws_schema"
    );
}

/// Every `type` a frame can have, from the schema.
fn frame_types(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![schema];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let Some(Value::Object(t)) = m.get("properties").and_then(|p| p.get("type")) {
                    if let Some(Value::String(c)) = t.get("const") {
                        out.push(c.clone());
                    }
                    if let Some(Value::Array(e)) = t.get("enum") {
                        out.extend(e.iter().filter_map(|s| s.as_str().map(str::to_owned)));
                    }
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn the_schema_names_every_frame_of_version_one() {
    let types = frame_types(&schema());
    for t in [
        "resume",
        "cancel",
        "tool_approval_decision",
        "ready",
        "resumed",
        "resync_required",
        "run_cancelled",
        "decision_recorded",
        "error",
        "tool_executing",
        "tool_progress",
        "tool_completed",
        "tool_approval_required",
        "tool_approval_resolved",
        "tool_results",
        "agent_started",
    ] {
        assert!(
            types.contains(&t.to_owned()),
            "{t} is not in the schema: {types:?}"
        );
    }
    assert_eq!(schema()["x-protocol-version"], 1);
}
