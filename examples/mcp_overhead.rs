//! What serving a tool through this library's MCP server costs, side by side in one
//! run with rmcp's own `#[tool_router]` server doing the same tool: rmcp's client
//! calls `add` over an in-memory duplex pipe, in interleaved rounds so that drift
//! hits both alike.
//!
//! ```text
//! cargo run --release --example mcp_overhead --features mcp [-- --calls N]
//! ```
//!
//! The pipeline adds what rmcp's router does not do: the user's limits and policy,
//! redaction, the paired events (into a sink that keeps nothing here), metrics and
//! cancellation. The last line is `RESULT rmcp_p50_ns=.. rmcp_p99_ns=..
//! dispatch_p50_ns=.. dispatch_p99_ns=.. ratio_p50=.. invariants=ok|FAILED`.

use std::time::Instant;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolRequestParams, ServerCapabilities, ServerConfig};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use serde_json::json;
use tool_dispatch::mcp::McpServer;
use tool_dispatch::{Engine, Limits, Rate, Registry, ToolError, UserContext, UserLimits, tool_fn};

#[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
struct AddIn {
    a: i64,
    b: i64,
}

/// The same tool on rmcp's own router.
#[derive(Clone)]
struct Plain {
    tool_router: ToolRouter<Self>,
}

#[tool_router(router = tool_router)]
impl Plain {
    #[tool(description = "Adds two integers.")]
    async fn add(&self, Parameters(i): Parameters<AddIn>) -> String {
        (i.a + i.b).to_string()
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Plain {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

async fn connect<S: ServerHandler>(server: S) -> RunningService<RoleClient, ()> {
    let (server_io, client_io) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        if let Ok(running) = server.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    ().serve(client_io).await.expect("the handshake")
}

/// Latencies (ns) of `n` calls of `add`; counts the right answers.
async fn round(client: &RunningService<RoleClient, ()>, n: usize, right: &mut usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n as i64 {
        let args = json!({"a": i, "b": 1})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let params = CallToolRequestParams::new("add").with_arguments(args);
        let t = Instant::now();
        let r = client.call_tool(params).await;
        out.push(t.elapsed().as_nanos() as u64);
        let text = r.ok().and_then(|r| serde_json::to_value(&r.content).ok());
        let want = (i + 1).to_string();
        *right += usize::from(text.is_some_and(|t| t[0]["text"].as_str() == Some(want.as_str())));
    }
    out
}

fn quantile(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * q) as usize]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let argv: Vec<String> = std::env::args().collect();
    let calls: usize = match argv.iter().position(|a| a == "--calls") {
        Some(i) => argv.get(i + 1).ok_or("--calls needs a value")?.parse()?,
        None => 5_000,
    };
    let add = tool_fn("add", "Adds two integers.", |i: AddIn, _cx| async move {
        Ok::<_, ToolError>(i.a + i.b)
    });
    // The user's limits stay in the path (a rate check and a slot per call), set
    // high enough never to refuse one here.
    let limits = Limits::default().per_user(UserLimits {
        concurrency: 10,
        rate: Some(Rate::per_second(1_000_000_000)),
    });
    let engine = Engine::builder(Registry::builder().tool(add).build()?)
        .limits(limits)
        .build();
    let ours = connect(McpServer::for_user(
        engine.clone(),
        UserContext::builder("u").build()?,
    ))
    .await;
    let theirs = connect(Plain {
        tool_router: Plain::tool_router(),
    })
    .await;
    let (mut rmcp_lat, mut ours_lat) = (Vec::new(), Vec::new());
    let (mut right_rmcp, mut right_ours) = (0, 0);
    for r in 0..6 {
        let n = if r == 0 { 200 } else { calls / 5 };
        let a = round(&theirs, n, &mut right_rmcp).await;
        let b = round(&ours, n, &mut right_ours).await;
        if r > 0 {
            rmcp_lat.extend(a);
            ours_lat.extend(b);
        }
    }
    let (r50, r99) = (quantile(&mut rmcp_lat, 0.5), quantile(&mut rmcp_lat, 0.99));
    let (o50, o99) = (quantile(&mut ours_lat, 0.5), quantile(&mut ours_lat, 0.99));
    println!("rmcp #[tool_router]: p50 {r50:>8} ns  p99 {r99:>8} ns");
    println!("tool-dispatch:       p50 {o50:>8} ns  p99 {o99:>8} ns");
    let expected = calls / 5 * 5 + 200;
    let m = engine.metrics();
    let fine = right_rmcp == expected && right_ours == expected && m.total == expected as u64;
    let verdict = if fine { "ok" } else { "FAILED" };
    if !fine {
        eprintln!(
            "right answers: rmcp {right_rmcp}, ours {right_ours}, of {expected}; engine total {}",
            m.total
        );
    }
    println!(
        "RESULT rmcp_p50_ns={r50} rmcp_p99_ns={r99} dispatch_p50_ns={o50} dispatch_p99_ns={o99} ratio_p50={:.2} invariants={verdict}",
        o50 as f64 / r50 as f64
    );
    if !fine {
        std::process::exit(1);
    }
    Ok(())
}
