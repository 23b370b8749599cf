//! Imports the tools of an MCP server started by a command and runs one call through
//! the pipeline, printing every event as a JSON line, then the result.
//!
//! ```text
//! cargo run --example mcp_import --features mcp -- [--call NAME] [--args JSON] -- <command…>
//! # e.g. this crate's own server, over stdio:
//! cargo run --example mcp_import --features mcp -- --call get_weather --args '{"city":"Paris"}' \
//!     -- target/debug/examples/mcp_server
//! ```
//!
//! Without `--call`, the first tool the server lists is called with `--args` (default
//! `{}`). The exit code is 0 when the call succeeded.

use serde_json::Value;
use tool_dispatch::event::Event;
use tool_dispatch::mcp::McpImport;
use tool_dispatch::{Engine, EventSink, Registry, ToolCall, TrySendError, UserContext};

/// Prints each event as a JSON line.
struct Stdout;

impl EventSink for Stdout {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        if let Ok(line) = serde_json::to_string(&event) {
            println!("{line}");
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: mcp_import [--call NAME] [--args JSON] [--] <command…>";
    let mut args = std::env::args().skip(1).peekable();
    let (mut call, mut arguments) = (None, Value::Object(Default::default()));
    while let Some(a) = args.peek() {
        match a.as_str() {
            "--call" => {
                args.next();
                call = Some(args.next().ok_or(usage)?);
            }
            "--args" => {
                args.next();
                arguments = serde_json::from_str(&args.next().ok_or(usage)?)?;
            }
            "--" => {
                args.next();
                break;
            }
            _ => break,
        }
    }
    let program = args.next().ok_or(usage)?;
    let mut command = tokio::process::Command::new(program);
    command.args(args);
    let remote = McpImport::spawn(command).await?;
    eprintln!("imported: {}", remote.names().join(", "));
    let name = match call {
        Some(n) => n,
        None => remote
            .names()
            .into_iter()
            .next()
            .ok_or("the server lists no tools")?,
    };
    let engine = Engine::builder(Registry::builder().mcp(&remote).build()?).build();
    let user = UserContext::builder("importer").build()?;
    let dispatcher = engine.dispatcher().sink(Stdout).user(user);
    match dispatcher.dispatch(ToolCall::new(name, arguments)).await {
        Ok(out) => {
            eprintln!("result: {}", out.value);
            Ok(())
        }
        Err(e) => {
            eprintln!("failed ({}): {e}", e.status().as_str());
            std::process::exit(1);
        }
    }
}
