//! The demo tools (shared with the chat server) served over MCP, every call through the pipeline as
//! the authenticated user.
//!
//! ```text
//! # stdio, as the user of TOOL_DISPATCH_TOKEN (default alice-token):
//! cargo run --example mcp_server --features mcp
//! # streamable HTTP at /mcp, each request as the user of its bearer token
//! # (alice-token, bob-token):
//! cargo run --example mcp_server --features mcp -- --http --port 8080
//! ```
//!
//! Over HTTP it prints `listening on http://127.0.0.1:N/mcp` once bound. Every event
//! of every call is written to stderr as a JSON line (stdout is the MCP channel on
//! stdio).

#[path = "common/demo.rs"]
mod demo;

use std::io::Write;
use std::sync::Arc;

use rmcp::ServiceExt;
use tool_dispatch::event::Event;
use tool_dispatch::mcp::{McpServer, router};
use tool_dispatch::{EventSink, TrySendError};

/// Writes each event to stderr as one JSON line.
struct Stderr;

impl EventSink for Stderr {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        if let Ok(line) = serde_json::to_string(&event) {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let users = demo::demo_users();
    let engine = demo::demo_engine();
    let stderr: Arc<dyn EventSink> = Arc::new(Stderr);
    if args.iter().any(|a| a == "--http") {
        let port: u16 = match args.iter().position(|a| a == "--port") {
            Some(i) => args.get(i + 1).ok_or("--port needs a value")?.parse()?,
            None => 0,
        };
        let server = McpServer::per_request(engine).events(move |_| Arc::clone(&stderr));
        let app = router(server, move |token| users.get(token).cloned());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        println!("listening on http://{}/mcp", listener.local_addr()?);
        tool_dispatch::http::serve(listener, app).await?;
        return Ok(());
    }
    let token = std::env::var("TOOL_DISPATCH_TOKEN").unwrap_or_else(|_| "alice-token".into());
    let Some(user) = users.get(&token).cloned() else {
        return Err(
            "TOOL_DISPATCH_TOKEN is not one of the demo tokens (alice-token, bob-token)".into(),
        );
    };
    let server = McpServer::for_user(engine, user).events(move |_| Arc::clone(&stderr));
    let running = server.serve(rmcp::transport::stdio()).await?;
    running.waiting().await?;
    Ok(())
}
