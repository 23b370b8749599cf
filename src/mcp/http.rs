//! MCP over streamable HTTP, behind a bearer-token check.

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};

use super::McpServer;
use crate::user::UserContext;

/// An axum router serving `server` at `/mcp` over MCP's streamable HTTP transport,
/// each request as the user `authenticate` finds for its `Authorization: Bearer`
/// token. A request without a token, or with one `authenticate` does not know, gets
/// `401` before its body is read; there is no default user.
///
/// Both protocol revisions rmcp serves work: `2025-11-25` and older with sessions
/// (each bound to its first user; another user's request on it is refused), and
/// `2026-07-28` without. Only loopback `Host` headers are accepted (rmcp's
/// protection against DNS rebinding); [`router_with`] takes rmcp's configuration to
/// list public host names.
///
/// ```no_run
/// # fn f(engine: tool_dispatch::Engine) {
/// use tool_dispatch::UserContext;
/// use tool_dispatch::mcp::{McpServer, router};
/// let app = router(McpServer::per_request(engine), |token| match token {
///     "alice-token" => UserContext::builder("alice").build().ok(),
///     _ => None,
/// });
/// # let _: axum::Router = app; }
/// ```
pub fn router<F>(server: McpServer, authenticate: F) -> Router
where
    F: Fn(&str) -> Option<UserContext> + Send + Sync + 'static,
{
    router_with(server, authenticate, StreamableHttpServerConfig::default())
}

/// [`router`] with rmcp's own configuration of the transport (allowed hosts and
/// origins, sessions, keep-alive, body size).
pub fn router_with<F>(
    server: McpServer,
    authenticate: F,
    config: StreamableHttpServerConfig,
) -> Router
where
    F: Fn(&str) -> Option<UserContext> + Send + Sync + 'static,
{
    let service = StreamableHttpService::new(
        move || Ok(server.session()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let authenticate = Arc::new(authenticate);
    Router::new()
        .nest_service("/mcp", service)
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            let authenticate = Arc::clone(&authenticate);
            async move { bearer(request, next, &*authenticate).await }
        }))
}

/// Puts the token's user into the request, or answers `401`.
async fn bearer(
    mut request: Request,
    next: Next,
    authenticate: &(dyn Fn(&str) -> Option<UserContext> + Send + Sync),
) -> Response {
    let user = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(authenticate);
    match user {
        Some(user) => {
            request.extensions_mut().insert(user);
            next.run(request).await
        }
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a valid bearer token is required",
        )
            .into_response(),
    }
}
