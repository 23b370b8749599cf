//! A small server for the official MCP conformance suite
//! (`@modelcontextprotocol/conformance`): the suite's tool names, each an ordinary
//! tool of this library served by `mcp::router`, so the suite checks the library's
//! own MCP layer (lifecycle, tools, content blocks, errors, progress, schemas,
//! Origin and Host checks, SSE).
//!
//! ```text
//! cargo run --example mcp_conformance --features mcp -- --port 3001
//! npx @modelcontextprotocol/conformance server --url http://127.0.0.1:3001/mcp
//! ```
//!
//! The suite's client sends no token, so this harness (not the library) lends every
//! request the one user's token before the router checks it.

use std::time::Duration;

use axum::extract::Request;
use axum::http::HeaderValue;
use serde_json::{Value, json};
use tool_dispatch::content::{Content, ResourceLink};
use tool_dispatch::mcp::{McpServer, router};
use tool_dispatch::{
    Engine, Registry, ToolContext, ToolError, ToolSettings, UserContext, schema_tool,
};

/// A 1x1 red pixel, PNG.
const RED_PIXEL: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90, 0x77, 0x53,
    0xde, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x08, 0xd7, 0x63, 0xf8, 0xcf, 0xc0, 0x00,
    0x00, 0x03, 0x01, 0x01, 0x00, 0x18, 0xdd, 0x8d, 0xb0, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e,
    0x44, 0xae, 0x42, 0x60, 0x82,
];

/// A WAV header and no samples.
fn silent_wav() -> Vec<u8> {
    let mut w = Vec::with_capacity(44);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&36u32.to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // PCM
    w.extend_from_slice(&1u16.to_le_bytes()); // mono
    w.extend_from_slice(&8000u32.to_le_bytes());
    w.extend_from_slice(&8000u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&8u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&0u32.to_le_bytes());
    w
}

/// A tool without arguments.
fn no_args<F, Fut>(
    name: &str,
    description: &str,
    body: F,
) -> tool_dispatch::SchemaTool<impl Fn(Value, ToolContext) -> Fut + Send + Sync + 'static>
where
    F: Fn(ToolContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, ToolError>> + Send + 'static,
{
    schema_tool(
        name,
        description,
        json!({"type": "object", "properties": {}, "additionalProperties": false}),
        move |_args, cx| body(cx),
    )
}

fn content(c: Content) -> Result<Value, ToolError> {
    serde_json::to_value(c).map_err(|e| ToolError::new(e.to_string()))
}

fn engine() -> Result<Engine, Box<dyn std::error::Error>> {
    let registry = Registry::builder()
        .tool(no_args("test_simple_text", "Returns text.", |_| async {
            Ok(json!("This is a simple text response for testing."))
        }))
        .tool(no_args("test_image_content", "Returns an image.", |_| async {
            content(Content::new().image(RED_PIXEL, "image/png"))
        }))
        .tool(no_args("test_audio_content", "Returns audio.", |_| async {
            content(Content::new().audio(&silent_wav(), "audio/wav"))
        }))
        .tool(no_args(
            "test_embedded_resource",
            "Returns an embedded resource.",
            |_| async {
                content(Content::new().resource_text(
                    "test://embedded-resource",
                    "text/plain",
                    "This is an embedded resource content.",
                ))
            },
        ))
        .tool(no_args(
            "test_multiple_content_types",
            "Returns text, an image and a resource.",
            |_| async {
                content(
                    Content::new()
                        .text("Multiple content types test:")
                        .image(RED_PIXEL, "image/png")
                        .resource_text(
                            "test://mixed-content-resource",
                            "application/json",
                            r#"{"test":"data","value":123}"#,
                        ),
                )
            },
        ))
        .tool(no_args(
            "test_tool_with_progress",
            "Reports its progress.",
            |cx| async move {
                for (i, p) in [0.0, 0.5, 1.0].into_iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    cx.progress(p, format!("{}%", p * 100.0));
                }
                Ok(json!("Progress test completed"))
            },
        ))
        .tool(no_args(
            "test_error_handling",
            "Always fails.",
            |_| async {
                Err(ToolError::new(
                    "This tool intentionally returns an error for testing",
                ))
            },
        ))
        // Beyond the suite: a resource link, and a call that needs approval, for the
        // Python SDK's client in .ci/e2e-mcp.sh.
        .tool(no_args(
            "report_with_link",
            "Returns a chart and a link to its data.",
            |_| async {
                content(
                    Content::new()
                        .text("The chart, and its data:")
                        .image(RED_PIXEL, "image/png")
                        .link(
                            ResourceLink::new("https://example.com/data.csv", "data.csv")
                                .mime_type("text/csv"),
                        ),
                )
            },
        ))
        .tool(
            no_args("approval_required", "Runs once approved.", |_| async {
                Ok(json!("approved and done"))
            })
            .settings(ToolSettings::new().requires_approval("it is a test of approvals")),
        )
        .tool(schema_tool(
            "json_schema_2020_12_tool",
            "Tool with JSON Schema 2020-12 features",
            json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "$defs": {"address": {"$anchor": "addressDef", "type": "object",
                    "properties": {"street": {"type": "string"}, "city": {"type": "string"}}}},
                "properties": {
                    "name": {"type": "string"},
                    "address": {"$ref": "#/$defs/address"},
                    "contactMethod": {"type": "string", "enum": ["phone", "email"]},
                    "phone": {"type": "string"},
                    "email": {"type": "string"}
                },
                "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
                "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
                "then": {"required": ["phone"]},
                "else": {"required": ["email"]},
                "additionalProperties": false
            }),
            |args, _cx| async move { Ok::<_, ToolError>(args) },
        ))
        .build()?;
    Ok(Engine::builder(registry).build())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port: u16 = match args.iter().position(|a| a == "--port") {
        Some(i) => args.get(i + 1).ok_or("--port needs a value")?.parse()?,
        None => 0,
    };
    let user = UserContext::builder("conformance").build()?;
    let app = router(McpServer::per_request(engine()?), move |token| {
        (token == "conformance").then(|| user.clone())
    })
    .layer(axum::middleware::map_request(
        |mut request: Request| async move {
            request
                .headers_mut()
                .entry(axum::http::header::AUTHORIZATION)
                .or_insert(HeaderValue::from_static("Bearer conformance"));
            request
        },
    ));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}/mcp", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
