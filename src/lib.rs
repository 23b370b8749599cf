#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

// Module floors: a module uses only modules on floors below its own, so the crate reads
// bottom-up and has no import cycle. `tests/architecture.rs` checks this list against
// the sources; `docs/ARCHITECTURE.md` says what each floor is for.
//
// floor 1: call content event json time user contain blocking otel http
// floor 2: sink cache limits redact approval schema oauth trace
// floor 3: error metrics runlog
// floor 4: delivery
// floor 5: tool state health
// floor 6: registry
// floor 7: policy
// floor 8: engine
// floor 9: dispatcher
// floor 10: provider redis
// floor 11: mcp ws
// floor 12: prometheus

mod approval;
mod blocking;
mod cache;
mod call;
mod contain;
pub mod content;
mod delivery;
mod dispatcher;
mod engine;
mod error;
pub mod event;
mod health;
mod json;
mod limits;
mod metrics;
mod policy;
pub mod provider;
mod redact;
mod registry;
mod runlog;
mod schema;
mod sink;
mod state;
mod time;
mod tool;
mod trace;
mod user;

#[cfg(feature = "axum")]
pub mod http;
#[cfg(feature = "mcp")]
pub mod mcp;
#[cfg(feature = "oauth")]
pub mod oauth;
#[cfg(feature = "otel")]
pub mod otel;
#[cfg(feature = "prometheus")]
pub mod prometheus;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "axum")]
pub mod ws;

pub use approval::{ApprovalError, ApprovalWait, Verdict};
pub use blocking::StuckCall;
pub use cache::CacheConfig;
pub use call::{Arguments, ToolCall, ToolOutput};
pub use dispatcher::{Dispatcher, TypedCall};
pub use engine::{CancelReport, Engine, EngineBuilder, ShutdownReport, UserShutdown};
pub use error::{CancelReason, DispatchError, LimitScope};
pub use futures_util::future::BoxFuture;
pub use health::{Health, HealthStatus};
pub use limits::{Limits, Rate, UserLimits};
pub use metrics::{ApprovalStats, MAX_REPORTED_USERS, MetricsSnapshot, ToolStats, UserStats};
pub use policy::{Decision, Policy, PolicyError, PolicyRequest, ScopePolicy};
pub use redact::{REDACTED, Redaction};
pub use registry::{
    IntoTool, MAX_TOOL_NAME_LEN, Registry, RegistryBuilder, RegistryError, ToolDefinition,
};
pub use runlog::{
    AppendError, Frame, Resync, RunLog, RunLogConfig, RunLogStats, RunReader, RunWriter,
};
pub use sink::{EventSink, RecordingSink, SinkError, TrySendError};
pub use state::{HasSink, HasUser, NoSink, NoUser, SinkUnset, UserUnset, WithSink, WithUser};
pub use tool::{
    BlockingFnTool, FnTool, SchemaTool, Tool, ToolContext, ToolError, ToolSettings, blocking_fn,
    schema_tool, tool_fn,
};
pub use user::{MAX_ID_LEN, UserContext, UserContextBuilder, UserContextError};
