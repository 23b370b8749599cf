//! MCP over streamable HTTP: `Origin` first, then the bearer token, then the
//! session's owner, then rmcp.

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};

use super::McpServer;
use super::sessions::Sessions;
use crate::user::UserContext;

/// The header naming a request's session.
const SESSION: &str = "mcp-session-id";
/// What a request naming another user's session is passed on with: an id no session
/// ever has (rmcp's are UUIDs), so it gets exactly the answer an unknown one gets.
const NO_SESSION: &str = "none";

/// How a request's user is found: its user, or the response refusing it.
pub(super) type Check = Arc<dyn Fn(&HeaderMap) -> Result<UserContext, Box<Response>> + Send + Sync>;

/// An axum router serving `server` at `/mcp` over MCP's streamable HTTP transport,
/// each request as the user `authenticate` finds for its `Authorization: Bearer`
/// token. A request without a token, or with one `authenticate` does not know, gets
/// `401` before its body is read; there is no default user.
///
/// What is checked, in order:
///
/// - `Origin` (a browser's request): with rmcp's default configuration (an empty
///   list of allowed origins), only loopback origins (`http://localhost:*`,
///   `http://127.0.0.1:*`, `http://[::1]:*`, and `https` alike) and the server's own
///   origin (the same host and port as the `Host` header) are accepted; any other is
///   `403`. A request without `Origin` (not from a browser) passes.
///   [`router_with`] takes an explicit list instead
///   (`StreamableHttpServerConfig::with_allowed_origins`). `Host` must be a loopback
///   name unless the configuration lists public ones (rmcp's protection against DNS
///   rebinding).
/// - The bearer token: `401` with `WWW-Authenticate: Bearer` otherwise.
/// - The session (protocol revisions up to `2025-11-25`): it belongs to the user
///   who initialized it. Any request naming another user's session (`POST` of a
///   request, notification or response, `GET` with or without `Last-Event-ID`,
///   `DELETE`) gets the answer an unknown session gets (`404` for `GET` and `POST`
///   as rmcp answers, `404` for `DELETE`) and changes nothing. Its own user's
///   `DELETE` ends it: `204`. A request whose id
///   is still in flight on its session is refused with a JSON-RPC error; the first
///   keeps its answer.
///
/// Both protocol revisions rmcp serves work: `2025-11-25` and older with sessions,
/// and `2026-07-28` without (each request carries its user).
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
/// origins, keep-alive, body size). Sessions are never restored from a
/// `session_store` (their owner could not be proven): a client whose session is
/// not on this node starts a new one.
pub fn router_with<F>(
    server: McpServer,
    authenticate: F,
    config: StreamableHttpServerConfig,
) -> Router
where
    F: Fn(&str) -> Option<UserContext> + Send + Sync + 'static,
{
    let check: Check = Arc::new(move |headers: &HeaderMap| {
        bearer(headers).and_then(&authenticate).ok_or_else(|| {
            Box::new(
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    "a valid bearer token is required",
                )
                    .into_response(),
            )
        })
    });
    serve(server, check, config)
}

/// [`router`] as an OAuth 2.1 resource server (features `mcp` and `oauth`): each
/// request's bearer token is a JWT access token that `resource` checks (issuer,
/// audience, time, signature, scopes); its subject is the user and its scopes
/// the user's. A request without a valid token gets `401` with
/// `WWW-Authenticate: Bearer resource_metadata="…"` (and `error="invalid_token"` for
/// a bad one), or `403` with `error="insufficient_scope"`; the protected-resource
/// metadata (RFC 9728) is served at `/.well-known/oauth-protected-resource` and at
/// the same path followed by the resource's path, without a token.
#[cfg(feature = "oauth")]
pub fn oauth_router(server: McpServer, resource: crate::oauth::ResourceServer) -> Router {
    oauth_router_with(server, resource, StreamableHttpServerConfig::default())
}

/// [`oauth_router`] with rmcp's own configuration of the transport.
#[cfg(feature = "oauth")]
pub fn oauth_router_with(
    server: McpServer,
    resource: crate::oauth::ResourceServer,
    config: StreamableHttpServerConfig,
) -> Router {
    let metadata = resource.metadata_router();
    let check: Check = Arc::new(move |headers: &HeaderMap| resource.check(headers));
    serve(server, check, config).merge(metadata)
}

/// The token of an `Authorization: Bearer <token>` header.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty())
}

/// The router at `/mcp`, each request checked by `check`.
pub(super) fn serve(server: McpServer, check: Check, config: StreamableHttpServerConfig) -> Router {
    let sessions = Arc::new(Sessions::new(
        LocalSessionManager::default(),
        Arc::clone(server.counters()),
    ));
    let default_origins = config.allowed_origins.is_empty();
    let service =
        StreamableHttpService::new(move || Ok(server.session()), Arc::clone(&sessions), config);
    Router::new()
        .nest_service("/mcp", service)
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            let (check, sessions) = (Arc::clone(&check), Arc::clone(&sessions));
            async move { guard(request, next, &*check, &sessions, default_origins).await }
        }))
}

/// `Origin`, then the user, then the session's owner.
async fn guard(
    mut request: Request,
    next: Next,
    check: &(dyn Fn(&HeaderMap) -> Result<UserContext, Box<Response>> + Send + Sync),
    sessions: &Sessions,
    default_origins: bool,
) -> Response {
    if default_origins && !origin_allowed(request.headers()) {
        return (
            StatusCode::FORBIDDEN,
            "Forbidden: Origin header is not allowed",
        )
            .into_response();
    }
    let user = match check(request.headers()) {
        Ok(user) => user,
        Err(refused) => return *refused,
    };
    let session = request
        .headers()
        .get(SESSION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(id) = session {
        if sessions.is_foreign(&id, user.user_id()) {
            sessions.counters().foreign_session();
        }
        // Only a session the server knows as this user's reaches rmcp: another
        // user's, and one it no longer knows (which rmcp answers as unknown anyway),
        // are sent on as a session that never was.
        if !sessions.belongs_to(&id, user.user_id()) {
            if request.method() == Method::DELETE {
                return (StatusCode::NOT_FOUND, "Not Found: Session not found").into_response();
            }
            request
                .headers_mut()
                .insert(SESSION, HeaderValue::from_static(NO_SESSION));
        }
    }
    let ending = request.method() == Method::DELETE;
    request.extensions_mut().insert(user);
    let mut response = next.run(request).await;
    // A session ended: 204 No Content, which clients take for success (the Python
    // SDK reports rmcp's 202 as a failed termination).
    if ending && response.status() == StatusCode::ACCEPTED {
        *response.status_mut() = StatusCode::NO_CONTENT;
    }
    response
}

/// Whether a request's `Origin` is absent, a loopback origin, or the server's own.
fn origin_allowed(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(uri) = origin
        .to_str()
        .ok()
        .and_then(|o| o.parse::<axum::http::Uri>().ok())
    else {
        return false;
    };
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return false;
    };
    let port = &authority.as_str()[authority.host().len().min(authority.as_str().len())..];
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.parse::<u16>().is_ok());
    let plain =
        uri.path() == "/" && uri.query().is_none() && !authority.as_str().contains('@') && port_ok;
    if !plain || !matches!(scheme, "http" | "https") {
        return false;
    }
    let loopback = matches!(
        authority.host().to_ascii_lowercase().as_str(),
        "localhost" | "127.0.0.1" | "[::1]"
    );
    let same = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h.eq_ignore_ascii_case(authority.as_str()));
    loopback || same
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(origin: &str, host: &str) -> bool {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        origin_allowed(&h)
    }

    #[test]
    fn loopback_and_same_origin_pass_others_do_not() {
        for ok in [
            "http://localhost:3000",
            "http://127.0.0.1:5173",
            "https://localhost",
            "http://[::1]:8080",
            "http://LOCALHOST:1",
            "https://mcp.example.com",
        ] {
            assert!(allowed(ok, "mcp.example.com"), "{ok}");
        }
        for bad in [
            "http://evil.example.com",
            "http://localhost.evil.com",
            "http://127.0.0.1.nip.io",
            "null",
            "file://",
            "http://user@localhost",
            "http://localhost:abc",
            "ftp://localhost",
            "http://mcp.example.com:444",
            "",
        ] {
            assert!(!allowed(bad, "mcp.example.com"), "{bad}");
        }
        assert!(
            origin_allowed(&HeaderMap::new()),
            "no Origin: not a browser"
        );
    }
}
