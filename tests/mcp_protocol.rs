//! The streamable HTTP endpoint to the letter of both revisions it speaks
//! (2025-11-25 with sessions, the stateless 2026-07-28), checked with raw requests:
//! a foreign `Origin` is 403 before anything else, a malformed `tools/call` is
//! -32602, an unknown method -32601, an unknown tool -32602, and every
//! `inputSchema` keeps its `$schema` and `$defs`. The counters see it all.
#![cfg(feature = "mcp")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::mcp::*;
use reqwest::Method;
use rmcp::transport::StreamableHttpServerConfig;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tool_dispatch::mcp::{McpServer, router_with};

/// A 2026-07-28 request: the per-request metadata that revision requires.
fn modern(id: u64, method: &str, mut params: Value) -> String {
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {}
    });
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}

/// Sends `body` in the 2025-11-25 revision (on a session of alice's) and in the
/// 2026-07-28 one (stateless), and gives both JSON-RPC answers.
async fn both(raw: &Raw, session: &str, id: u64, method: &str, params: Value) -> [Value; 2] {
    let legacy = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    let old = raw
        .post("alice-token", Some(session), &legacy.to_string())
        .stream()
        .await
        .answer_to(&json!(id))
        .await;
    let mut request = raw
        .post("alice-token", None, &modern(id, method, params.clone()))
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method);
    if let Some(name) = params.get("name").and_then(Value::as_str) {
        request = request.header("mcp-name", name);
    }
    let new = request.whole().await;
    let new = new
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .chain(std::iter::once(new.body.as_str()))
        .find_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .unwrap_or_else(|| panic!("a JSON-RPC answer: {new:?}"));
    [old, new]
}

#[tokio::test]
async fn a_foreign_origin_is_403_before_the_token_is_looked_at() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate, Duration::from_secs(60));
    let addr = serve(McpServer::per_request(e.clone())).await;
    let raw = Raw::new(addr);
    let init = initialize(1, "2025-11-25");
    for token in ["alice-token", "not-a-token"] {
        for origin in [
            "http://evil.example.com",
            "http://localhost.evil.example.com",
            "null",
            "http://127.0.0.1.nip.io:3000",
        ] {
            let a = raw
                .post(token, None, &init)
                .header("origin", origin)
                .whole()
                .await;
            assert_eq!(a.status, 403, "{origin} with {token}: {a:?}");
        }
    }
    // GET and DELETE too.
    for method in [Method::GET, Method::DELETE] {
        let a = raw
            .request(method.clone(), Some("alice-token"))
            .header("origin", "https://evil.example.com")
            .whole()
            .await;
        assert_eq!(a.status, 403, "{method}");
    }
    // Loopback origins, the server's own, and no Origin at all (not a browser) pass.
    for origin in [
        Some("http://localhost:5173"),
        Some("http://127.0.0.1:8080"),
        Some("http://[::1]:3000"),
        Some(format!("http://{addr}").as_str()),
        None,
    ] {
        let mut r = raw.post("alice-token", None, &init);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        assert_eq!(r.whole().await.status, 200, "{origin:?}");
    }
    assert_eq!(e.metrics().total, 0);
}

#[tokio::test]
async fn allowed_origins_are_configurable() {
    let gate = Arc::new(Semaphore::new(0));
    let config =
        StreamableHttpServerConfig::default().with_allowed_origins(["https://app.example.com"]);
    let app = router_with(
        McpServer::per_request(engine(&gate, Duration::from_secs(60))),
        tokens,
        config,
    );
    let raw = Raw::new(serve_app(app).await);
    let init = initialize(1, "2025-11-25");
    let status = |origin: &'static str| {
        let r = raw
            .post("alice-token", None, &init)
            .header("origin", origin);
        async move { r.whole().await.status }
    };
    assert_eq!(status("https://app.example.com").await, 200);
    // The list replaces the default: only what it names.
    assert_eq!(status("http://localhost:5173").await, 403);
    assert_eq!(status("https://evil.example.com").await, 403);
}

#[tokio::test]
async fn errors_carry_the_codes_the_specification_gives_in_both_revisions() {
    let gate = Arc::new(Semaphore::new(0));
    let e = engine(&gate, Duration::from_secs(60));
    let server = McpServer::per_request(e.clone());
    let raw = Raw::new(serve(server.clone()).await);
    let session = raw.session("alice-token").await;
    let mut id = 10;
    let mut next = || {
        id += 1;
        id
    };
    // Malformed tools/call: -32602, never -32601, and no value quoted back.
    for params in [
        json!({}),
        json!({"name": 5}),
        json!({"name": "add", "arguments": [1]}),
        json!({"name": "add", "arguments": "s3cr3t"}),
        json!({"name": null}),
    ] {
        for answer in both(&raw, &session, next(), "tools/call", params.clone()).await {
            assert_eq!(answer["error"]["code"], -32602, "{params}: {answer}");
            assert!(!answer.to_string().contains("s3cr3t"), "{answer}");
        }
    }
    // An unknown method: -32601.
    for answer in both(&raw, &session, next(), "tools/frobnicate", json!({})).await {
        assert_eq!(answer["error"]["code"], -32601, "{answer}");
    }
    // An unknown tool: -32602, as the specification's example.
    for answer in both(
        &raw,
        &session,
        next(),
        "tools/call",
        json!({"name": "nope"}),
    )
    .await
    {
        assert_eq!(answer["error"]["code"], -32602, "{answer}");
        assert!(answer.to_string().contains("nope"), "{answer}");
    }
    // Invalid arguments of a known tool are a tool execution error, in-band.
    let bad = json!({"name": "add", "arguments": {"a": "two", "b": 1}});
    for answer in both(&raw, &session, next(), "tools/call", bad).await {
        assert_eq!(answer["result"]["isError"], true, "{answer}");
    }
    // Every inputSchema keeps its dialect and its definitions.
    for answer in both(&raw, &session, next(), "tools/list", json!({})).await {
        let tools = answer["result"]["tools"].as_array().expect("tools").clone();
        assert_eq!(tools.len(), 3, "{answer}");
        for t in &tools {
            assert_eq!(
                t["inputSchema"]["$schema"], "https://json-schema.org/draft/2020-12/schema",
                "{t}"
            );
            assert_eq!(t["inputSchema"]["type"], "object", "{t}");
        }
    }
    assert_eq!(
        e.metrics().total,
        4,
        "the unknown tool and invalid input, twice"
    );
    let stats = server.stats();
    assert_eq!(stats.requests("tools/call"), 14, "{stats:?}");
    assert_eq!(stats.requests("other"), 2);
    assert_eq!(stats.errors(-32602), 12, "{stats:?}");
    assert_eq!(stats.errors(-32601), 2, "{stats:?}");
}

#[tokio::test]
async fn schemas_keep_dollar_defs_where_their_refs_point() {
    #[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
    struct Inner {
        x: u8,
    }
    #[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
    struct Outer {
        one: Inner,
        two: Option<Inner>,
    }
    use tool_dispatch::*;
    let nested = tool_fn("nested", "Two of a kind.", |o: Outer, _cx| async move {
        Ok::<_, ToolError>(o.one.x + o.two.map_or(0, |i| i.x))
    });
    let e = Engine::builder(Registry::builder().tool(nested).build().expect("built")).build();
    let raw = Raw::new(serve(McpServer::per_request(e)).await);
    let session = raw.session("alice-token").await;
    for answer in both(&raw, &session, 3, "tools/list", json!({})).await {
        let schema = &answer["result"]["tools"][0]["inputSchema"];
        assert!(schema["$schema"].is_string(), "{schema}");
        assert!(schema["$defs"]["Inner"].is_object(), "{schema}");
        assert_eq!(schema["properties"]["one"]["$ref"], "#/$defs/Inner");
    }
}
