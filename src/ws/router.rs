//! `GET /ws`: the `Origin` check (403), the token check (401), both before the
//! upgrade, then the session.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{Origins, WsServer};
use crate::user::UserContext;

type Authenticate = dyn Fn(&str) -> Option<UserContext> + Send + Sync;

/// An axum router serving the session at `GET /ws`, each connection as the user
/// `authenticate` finds for its token: `Authorization: Bearer <token>`, or
/// `?token=<token>` (a browser cannot set headers on a WebSocket). A missing or
/// unknown token gets 401 before the upgrade; a page whose `Origin` is not allowed
/// ([`WsServer::allow_origin`]; same-origin by default) gets 403. Merge it with the
/// app's own routes; serve it with [`serve`](crate::http::serve) (or `axum::serve`).
///
/// ```
/// use tool_dispatch::UserContext;
/// use tool_dispatch::ws::{WsServer, router};
/// # fn f(engine: tool_dispatch::Engine) {
/// let app: axum::Router = router(WsServer::new(engine), |token: &str| match token {
///     "alice-token" => UserContext::builder("alice").build().ok(),
///     _ => None,
/// });
/// # let _ = app; }
/// ```
pub fn router<F>(server: WsServer, authenticate: F) -> Router
where
    F: Fn(&str) -> Option<UserContext> + Send + Sync + 'static,
{
    let authenticate: Arc<Authenticate> = Arc::new(authenticate);
    Router::new()
        .route("/ws", get(ws))
        .with_state((server, authenticate))
}

async fn ws(
    State((server, authenticate)): State<(WsServer, Arc<Authenticate>)>,
    request: Request,
) -> Response {
    let (mut parts, _body) = request.into_parts();
    let headers = &parts.headers;
    // Who may connect is settled before anything else, the upgrade included.
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let allowed = origin
            .to_str()
            .is_ok_and(|o| origin_allowed(o, host, &server.config.origins));
        if !allowed {
            return refuse(StatusCode::FORBIDDEN, "this page's origin may not connect");
        }
    }
    let query = Query::<HashMap<String, String>>::try_from_uri(&parts.uri).ok();
    let token = query
        .as_ref()
        .and_then(|q| q.get("token").map(String::as_str))
        .or_else(|| bearer(headers));
    let Some(user) = token.and_then(|t| authenticate(t)) else {
        let mut refused = refuse(StatusCode::UNAUTHORIZED, "unknown or missing token");
        refused.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return refused;
    };
    let upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection> =
        <WebSocketUpgrade as FromRequestParts<()>>::from_request_parts(&mut parts, &()).await;
    match upgrade {
        Ok(upgrade) => server.upgrade(upgrade, user),
        Err(rejection) => rejection.into_response(),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, axum::Json(serde_json::json!({"error": why}))).into_response()
}

/// Whether a page of `origin` may connect to `host`: listed, any allowed, or the
/// same origin (the `Origin`'s host and port are the `Host` the request was sent to).
fn origin_allowed(origin: &str, host: Option<&str>, origins: &Origins) -> bool {
    if origins.any
        || origins
            .allowed
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let (Some((scheme, authority)), Some(host)) = (origin.split_once("://"), host) else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let bare = |a: &str| -> String {
        let a = a.to_ascii_lowercase();
        a.strip_suffix(default_port).map(str::to_owned).unwrap_or(a)
    };
    !authority.contains('/') && bare(authority) == bare(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_means_the_host_the_request_was_sent_to() {
        let none = Origins::default();
        let yes = |o: &str, h: &str| origin_allowed(o, Some(h), &none);
        assert!(yes("http://127.0.0.1:3000", "127.0.0.1:3000"));
        assert!(yes("https://App.example.com", "app.example.com:443"));
        assert!(yes("http://example.com:80", "example.com"));
        assert!(!yes("http://127.0.0.1:3001", "127.0.0.1:3000"));
        assert!(!yes("https://evil.example", "app.example.com"));
        assert!(!yes("null", "app.example.com"));
        assert!(!yes("file://", "app.example.com"));
        assert!(!yes("http://app.example.com/x", "app.example.com"));
        assert!(!origin_allowed("http://a", None, &none));
        let listed = Origins {
            any: false,
            allowed: vec!["https://app.example.com".into()],
        };
        assert!(origin_allowed(
            "https://app.example.com",
            Some("api.example.com"),
            &listed
        ));
        assert!(!origin_allowed(
            "https://other.example.com",
            Some("api.example.com"),
            &listed
        ));
    }
}
