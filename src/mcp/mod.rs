//! MCP, the Model Context Protocol (feature `mcp`, on rmcp): this engine's tools
//! served to any MCP client (Claude Desktop, IDEs, other agents) through the same
//! pipeline, per user.
//!
//! [`McpServer`] is an rmcp `ServerHandler` written over an [`Engine`](crate::Engine)
//! (not rmcp's `ToolRouter`, which decodes arguments itself): every `tools/call`
//! runs as the request's authenticated user, with that user's limits, policy,
//! redaction, approvals, events and cancellation. Serve it over stdio for one user
//! with rmcp's `serve`, or over streamable HTTP with [`router`], which checks each
//! request's `Origin`, then its bearer token (a static token list for local use, or
//! with feature `oauth` JWT access tokens through `oauth_router`), then that the
//! session it names is its user's. A call that needs approval is asked of a client
//! that declared elicitation; results in the [`Content`](crate::content::Content)
//! form go out as content blocks; [`McpServer::stats`] counts what was served.
//!
//! ```no_run
//! # async fn f(engine: tool_dispatch::Engine, alice: tool_dispatch::UserContext) -> Result<(), Box<dyn std::error::Error>> {
//! use rmcp::ServiceExt;
//! use tool_dispatch::mcp::McpServer;
//! // stdio: the process serves one user.
//! let running = McpServer::for_user(engine, alice).serve(rmcp::transport::stdio()).await?;
//! running.waiting().await?;
//! # Ok(()) }
//! ```
//!
//! The other way, [`McpImport`] brings a remote MCP server's tools into a
//! [`Registry`](crate::Registry) (`Registry::builder().mcp(&remote)`), where they
//! run through the same pipeline as local tools.
//!
//! [`provider::mcp`](crate::provider::mcp) stays the rmcp-free JSON layer; this
//! module renders results through it, so both speak the same statuses.

mod approve;
mod call_sink;
mod http;
mod import;
mod server;
mod sessions;
mod stats;

#[cfg(feature = "oauth")]
pub use http::{oauth_router, oauth_router_with};
pub use http::{router, router_with};
pub use import::{ImportError, McpImport};
pub use server::McpServer;
pub use sessions::MAX_SESSIONS_PER_USER;
pub use stats::McpStats;
