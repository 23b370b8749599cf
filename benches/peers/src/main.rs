//! tool-dispatch beside the tool layers a team would otherwise pick: rmcp's
//! `ToolRouter` (a map lookup, a deserialize, a call, the result wrapped for MCP) and
//! rig's `ToolSet` (the same, from and to JSON text), on the same tool (`add`) and the
//! same arguments, in one process, rounds interleaved so that drift hits all alike.
//!
//! ```text
//! cargo run --release --manifest-path benches/peers/Cargo.toml --target-dir target [-- --quick]
//! ```
//!
//! tool-dispatch runs every call through its whole pipeline: the user's rate check and
//! slot (limits set far above what the run reaches, so they are checked and never
//! bind), the timeout, panic containment, redaction, both events delivered to a
//! bounded sink that a task drains, metrics and the span. Each system takes the call in
//! the form it is made for: rmcp a name and a JSON object, rig a name and JSON text,
//! tool-dispatch a `ToolCall` with a JSON value (and, beside rig, with JSON text).
//!
//! Printed: nanoseconds and heap allocations per call on one thread, nanoseconds per
//! call with two worker threads (each system's calls spread over 8 tasks), and the
//! ratios the project's targets are stated in. The last line is `RESULT ..
//! invariants=ok|FAILED`: every call of every system answered right.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use rig_core::tool::{ErasedTool, Tool as RigTool, ToolContext as RigContext};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolRequestParams, CallToolResponse, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::sync::mpsc;
use tool_dispatch::event::Event;
use tool_dispatch::{
    Arguments, Dispatcher, Engine, Limits, Rate, Registry, ToolCall, ToolError, UserContext,
    UserLimits, tool_fn,
};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// The tool's input, the same type for every system.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
struct AddIn {
    a: i64,
    b: i64,
}

// ---------------------------------------------------------------------- rmcp

#[derive(Clone)]
struct Plain {
    tool_router: ToolRouter<Self>,
    captured: Arc<OnceLock<RequestContext<RoleServer>>>,
}

#[tool_router(router = tool_router)]
impl Plain {
    #[tool(description = "Adds two integers.")]
    async fn add(&self, Parameters(i): Parameters<AddIn>) -> String {
        (i.a + i.b).to_string()
    }

    #[tool(description = "Keeps the request context it is called with.")]
    async fn capture(&self, cx: RequestContext<RoleServer>) -> String {
        let _ = self.captured.set(cx);
        String::new()
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Plain {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

/// rmcp's router and a real request context for it: a session served over a duplex
/// pipe calls `capture` once, and the bench calls the router with that context.
async fn rmcp_router() -> (Plain, RequestContext<RoleServer>) {
    let plain = Plain {
        tool_router: Plain::tool_router(),
        captured: Arc::default(),
    };
    let (server_io, client_io) = tokio::io::duplex(1 << 16);
    let server = plain.clone();
    tokio::spawn(async move {
        if let Ok(running) = server.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    let client = ().serve(client_io).await.expect("the handshake");
    client
        .call_tool(CallToolRequestParams::new("capture"))
        .await
        .expect("capture");
    let cx = plain.captured.get().cloned().expect("captured");
    std::mem::forget(client); // the session stays open for the run
    (plain, cx)
}

async fn rmcp_call(plain: &Plain, cx: &RequestContext<RoleServer>, i: i64) -> bool {
    let args = match json!({"a": i, "b": 1}) {
        Value::Object(m) => m,
        _ => return false,
    };
    let params = CallToolRequestParams::new("add").with_arguments(args);
    let r = plain
        .tool_router
        .call(ToolCallContext::new(plain, params, cx.clone()))
        .await;
    let want = (i + 1).to_string();
    match r {
        Ok(CallToolResponse::Complete(r)) => serde_json::to_value(&r.content)
            .is_ok_and(|v| v[0]["text"].as_str() == Some(want.as_str())),
        _ => false,
    }
}

// ---------------------------------------------------------------------- rig

/// rig 0.44 runs a tool by name through its object-safe form, `ErasedTool::execute`
/// (raw JSON text in, a shaped result out), which its tool bus calls: here behind a
/// name map, the rest of the bus left out.
type RigTools = std::collections::HashMap<String, Box<dyn ErasedTool>>;

struct RigAdd;

#[derive(Debug)]
struct RigError;

impl std::fmt::Display for RigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}

impl std::error::Error for RigError {}

impl RigTool for RigAdd {
    const NAME: &'static str = "add";
    type Args = AddIn;
    type Output = i64;
    type Error = RigError;

    fn description(&self) -> String {
        "Adds two integers.".into()
    }

    fn parameters(&self) -> Value {
        serde_json::to_value(schemars::schema_for!(AddIn)).unwrap_or_default()
    }

    async fn call(&self, _cx: &mut RigContext, i: AddIn) -> Result<i64, RigError> {
        Ok(i.a + i.b)
    }
}

fn rig_tools() -> RigTools {
    let mut tools = RigTools::new();
    tools.insert("add".to_owned(), Box::new(RigAdd));
    tools
}

async fn rig_call(tools: &RigTools, i: i64) -> bool {
    let args = format!("{{\"a\":{i},\"b\":1}}");
    let Some(tool) = tools.get("add") else {
        return false;
    };
    let mut cx = RigContext::default();
    let r = tool.execute(args, &mut cx).await;
    r.is_success() && r.output().render() == (i + 1).to_string()
}

// ---------------------------------------------------------------------- tool-dispatch

fn engine() -> Engine {
    let add = tool_fn("add", "Adds two integers.", |i: AddIn, _cx| async move {
        Ok::<_, ToolError>(i.a + i.b)
    });
    let registry = Registry::builder().tool(add).build().expect("a registry");
    // Checked on every call, never binding.
    let limits = Limits::default().global(1 << 24).per_user(UserLimits {
        concurrency: 1 << 24,
        rate: Some(Rate::per_second(u32::MAX).burst(u32::MAX)),
    });
    Engine::builder(registry).limits(limits).build()
}

/// A dispatcher whose bounded sink a task of its own drains.
fn dispatcher(engine: &Engine, user: &str) -> Dispatcher {
    let (tx, mut rx) = mpsc::channel::<Event>(1024);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let ctx = UserContext::builder(user).build().expect("a user");
    engine.dispatcher().sink(tx).user(ctx)
}

async fn ours_call(d: &Dispatcher, i: i64) -> bool {
    let call = ToolCall::new(Cow::Borrowed("add"), json!({"a": i, "b": 1}));
    d.dispatch(call)
        .await
        .is_ok_and(|o| o.value == json!(i + 1))
}

async fn ours_text_call(d: &Dispatcher, i: i64) -> bool {
    let args = Arguments::Text(format!("{{\"a\":{i},\"b\":1}}"));
    let call = ToolCall::new(Cow::Borrowed("add"), args);
    d.dispatch(call)
        .await
        .is_ok_and(|o| o.value == json!(i + 1))
}

// ---------------------------------------------------------------------- measurement

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Rmcp,
    Rig,
    Ours,
    OursText,
}

const SYSTEMS: [System; 4] = [System::Rmcp, System::Rig, System::Ours, System::OursText];

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Rmcp => "rmcp ToolRouter (JSON object)",
            System::Rig => "rig ErasedTool (JSON text)",
            System::Ours => "tool-dispatch (JSON value)",
            System::OursText => "tool-dispatch (JSON text)",
        }
    }
}

struct Setup {
    plain: Plain,
    cx: RequestContext<RoleServer>,
    rig: RigTools,
    d: Dispatcher,
}

async fn one(s: &Setup, sys: System, i: i64) -> bool {
    match sys {
        System::Rmcp => rmcp_call(&s.plain, &s.cx, i).await,
        System::Rig => rig_call(&s.rig, i).await,
        System::Ours => ours_call(&s.d, i).await,
        System::OursText => ours_text_call(&s.d, i).await,
    }
}

/// `calls` calls of `sys`: nanoseconds per call and how many answered right.
async fn round(s: &Setup, sys: System, calls: u64) -> (f64, u64) {
    let t = Instant::now();
    let mut right = 0;
    for i in 0..calls as i64 {
        right += u64::from(one(s, sys, i).await);
    }
    (t.elapsed().as_nanos() as f64 / calls as f64, right)
}

/// Heap allocations per call of `sys`, counted over `calls` calls.
async fn allocations(s: &Setup, sys: System, calls: u64) -> f64 {
    let region = Region::new(GLOBAL);
    for i in 0..calls as i64 {
        one(s, sys, i).await;
    }
    region.change().allocations as f64 / calls as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Args {
    rounds: usize,
    calls: u64,
    /// Only this system, on one thread, no report (to profile it).
    only: Option<System>,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut a = Args {
        rounds: 7,
        calls: 20_000,
        only: None,
    };
    let mut i = 0;
    while i < argv.len() {
        let value: Option<u64> = argv.get(i + 1).and_then(|v| v.parse().ok());
        match (argv[i].as_str(), value) {
            ("--quick", _) => {
                (a.rounds, a.calls) = (3, 4_000);
                i += 1;
                continue;
            }
            ("--only", _) => {
                a.only = match argv.get(i + 1).map(String::as_str) {
                    Some("rmcp") => Some(System::Rmcp),
                    Some("rig") => Some(System::Rig),
                    Some("ours") => Some(System::Ours),
                    Some("ours-text") => Some(System::OursText),
                    _ => {
                        eprintln!("--only takes rmcp, rig, ours or ours-text");
                        std::process::exit(2);
                    }
                };
            }
            ("--rounds", Some(n)) => a.rounds = (n as usize).max(1),
            ("--calls", Some(n)) => a.calls = n.max(1),
            (other, _) => {
                eprintln!(
                    "unknown or incomplete flag `{other}`; flags: --quick --rounds N --calls N"
                );
                std::process::exit(2);
            }
        }
        i += 2;
    }
    a
}

/// One thread: interleaved rounds of every system; medians, allocations.
fn single_thread(a: &Args, right: &mut u64, expected: &mut u64) -> Vec<(System, f64, f64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let (plain, cx) = rmcp_router().await;
        let rig = rig_tools();
        let engine = engine();
        let s = Setup {
            plain,
            cx,
            rig,
            d: dispatcher(&engine, "alice"),
        };
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); SYSTEMS.len()];
        for sys in SYSTEMS {
            round(&s, sys, a.calls.min(2_000)).await; // warm-up
        }
        for _ in 0..a.rounds {
            for (k, sys) in SYSTEMS.into_iter().enumerate() {
                let (ns, ok) = round(&s, sys, a.calls).await;
                times[k].push(ns);
                *right += ok;
                *expected += a.calls;
            }
        }
        let mut out = Vec::new();
        for (k, sys) in SYSTEMS.into_iter().enumerate() {
            let allocs = allocations(&s, sys, 1_000).await;
            out.push((sys, median(&mut times[k]), allocs));
        }
        out
    })
}

/// Two worker threads: each system's calls spread over 8 tasks; ns per call.
fn two_workers(a: &Args, right: &mut u64, expected: &mut u64) -> Vec<(System, f64)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let (plain, cx) = rmcp_router().await;
        let engine = engine();
        let setups: Vec<Arc<Setup>> = (0..8)
            .map(|t| {
                Arc::new(Setup {
                    plain: plain.clone(),
                    cx: cx.clone(),
                    rig: rig_tools(),
                    d: dispatcher(&engine, &format!("user{t}")),
                })
            })
            .collect();
        let per_task = (a.calls / 8).max(100);
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); SYSTEMS.len()];
        for r in 0..=a.rounds {
            for (k, sys) in SYSTEMS.into_iter().enumerate() {
                let t = Instant::now();
                let tasks: Vec<_> = setups
                    .iter()
                    .map(|s| {
                        let s = Arc::clone(s);
                        tokio::spawn(async move { round(&s, sys, per_task).await.1 })
                    })
                    .collect();
                let mut ok = 0;
                for task in tasks {
                    ok += task.await.unwrap_or(0);
                }
                let ns = t.elapsed().as_nanos() as f64 / (per_task * 8) as f64;
                if r > 0 {
                    times[k].push(ns); // round 0 warms up
                }
                *right += ok;
                *expected += per_task * 8;
            }
        }
        SYSTEMS
            .into_iter()
            .enumerate()
            .map(|(k, sys)| (sys, median(&mut times[k])))
            .collect()
    })
}

fn main() {
    let a = args();
    if let Some(sys) = a.only {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let ok = rt.block_on(async {
            let (plain, cx) = rmcp_router().await;
            let engine = engine();
            let s = Setup {
                plain,
                cx,
                rig: rig_tools(),
                d: dispatcher(&engine, "alice"),
            };
            round(&s, sys, a.calls).await.1
        });
        println!("{} calls of {}: {ok} right", a.calls, sys.name());
        return;
    }
    let (mut right, mut expected) = (0, 0);
    let one_thread = single_thread(&a, &mut right, &mut expected);
    let two = two_workers(&a, &mut right, &mut expected);
    let ns = |sys| {
        one_thread
            .iter()
            .find(|(s, ..)| *s == sys)
            .map_or(f64::NAN, |x| x.1)
    };
    let ns2 = |sys| {
        two.iter()
            .find(|(s, _)| *s == sys)
            .map_or(f64::NAN, |x| x.1)
    };
    println!(
        "one thread, {} rounds x {} calls, median ns/call, allocations/call:",
        a.rounds, a.calls
    );
    for (sys, t, allocs) in &one_thread {
        println!("  {:<32} {t:>8.1} ns {allocs:>6.1} allocs", sys.name());
    }
    println!("two worker threads, 8 tasks, median ns/call:");
    for (sys, t) in &two {
        println!("  {:<32} {t:>8.1} ns", sys.name());
    }
    let vs_rmcp = ns(System::Ours) / ns(System::Rmcp);
    let vs_rig = ns(System::OursText) / ns(System::Rig);
    let vs_rmcp_2 = ns2(System::Ours) / ns2(System::Rmcp);
    println!(
        "ratios: vs rmcp {vs_rmcp:.2} (target <= 1.5), vs rig {vs_rig:.2} (target <= 0.6), vs rmcp on 2 workers {vs_rmcp_2:.2} (target <= 1.5)"
    );
    let fine = right == expected;
    if !fine {
        eprintln!("right answers: {right} of {expected}");
    }
    let allocs = |sys| {
        one_thread
            .iter()
            .find(|(s, ..)| *s == sys)
            .map_or(f64::NAN, |x| x.2)
    };
    println!(
        "RESULT ours_ns={:.1} rmcp_ns={:.1} rig_ns={:.1} ratio_vs_rmcp={vs_rmcp:.3} ratio_vs_rig={vs_rig:.3} ratio_vs_rmcp_2workers={vs_rmcp_2:.3} ours_allocs={:.1} rmcp_allocs={:.1} rig_allocs={:.1} invariants={}",
        ns(System::Ours),
        ns(System::Rmcp),
        ns(System::Rig),
        allocs(System::Ours),
        allocs(System::Rmcp),
        allocs(System::Rig),
        if fine { "ok" } else { "FAILED" }
    );
    if !fine {
        std::process::exit(1);
    }
}
