//! The resource server over HTTP: protected-resource metadata (RFC 9728) and the
//! `WWW-Authenticate` challenges (RFC 6750, RFC 9728 §5.1).

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::{ResourceServer, TokenError};
use crate::user::UserContext;

/// The well-known path of protected-resource metadata.
const WELL_KNOWN: &str = "/.well-known/oauth-protected-resource";

/// `s` without what cannot stand in a quoted-string of a challenge.
fn quotable(s: &str) -> String {
    s.chars()
        .filter(|c| (' '..='~').contains(c) && *c != '"' && *c != '\\')
        .collect()
}

impl ResourceServer {
    /// The protected-resource metadata document (RFC 9728): `resource`,
    /// `authorization_servers`, `bearer_methods_supported`, and
    /// `scopes_supported` when any are set.
    pub fn metadata(&self) -> Value {
        let i = &self.inner;
        let mut doc = json!({
            "resource": i.resource,
            "authorization_servers": i.authorization_servers,
            "bearer_methods_supported": ["header"],
        });
        let mut scopes = i.scopes_supported.clone();
        for s in &i.required_scopes {
            if !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
        if !scopes.is_empty() {
            doc["scopes_supported"] = json!(scopes);
        }
        doc
    }

    /// Where the metadata is served: the well-known path with the resource's path
    /// appended (`https://host/.well-known/oauth-protected-resource/mcp` for
    /// `https://host/mcp`), as RFC 9728 §3.1 builds it.
    pub fn metadata_url(&self) -> String {
        let (origin, path) = split(&self.inner.resource);
        format!("{origin}{WELL_KNOWN}{path}")
    }

    /// An axum router serving the metadata at the well-known path, with and without
    /// the resource's path appended. It needs no token.
    pub fn metadata_router(&self) -> Router {
        let doc = self.metadata();
        let (_, path) = split(&self.inner.resource);
        let mut router = Router::new();
        let serve = move || {
            let doc = doc.clone();
            async move { axum::Json(doc) }
        };
        router = router.route(WELL_KNOWN, get(serve.clone()));
        if !path.is_empty() && path != "/" {
            router = router.route(&format!("{WELL_KNOWN}{path}"), get(serve));
        }
        router
    }

    /// The answer refusing a request: `401` with
    /// `WWW-Authenticate: Bearer resource_metadata="…"` (and `error="invalid_token"`
    /// for a token that was presented), or `403` with `error="insufficient_scope"`
    /// and the scopes needed.
    pub fn challenge(&self, error: &TokenError) -> Response {
        let mut params = Vec::new();
        match error {
            TokenError::Missing => {}
            TokenError::InsufficientScope { .. } => {
                params.push(r#"error="insufficient_scope""#.to_owned());
            }
            _ => params.push(r#"error="invalid_token""#.to_owned()),
        }
        if !matches!(error, TokenError::Missing) {
            params.push(format!(
                r#"error_description="{}""#,
                quotable(&error.to_string())
            ));
        }
        let needed = match error {
            TokenError::InsufficientScope { missing } => missing.join(" "),
            _ => self.inner.required_scopes.join(" "),
        };
        if !needed.is_empty() {
            params.push(format!(r#"scope="{}""#, quotable(&needed)));
        }
        params.push(format!(
            r#"resource_metadata="{}""#,
            quotable(&self.metadata_url())
        ));
        let value = format!("Bearer {}", params.join(", "));
        let status = match error.status() {
            403 => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        let mut response = (status, error.to_string()).into_response();
        if let Ok(v) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        response
    }

    /// The user of a request's `Authorization: Bearer` token, or the challenge
    /// refusing it.
    pub fn check(&self, headers: &HeaderMap) -> Result<UserContext, Box<Response>> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|t| !t.is_empty());
        let result = match token {
            None => Err(TokenError::Missing),
            Some(t) => self.validate(t),
        };
        result.map_err(|e| Box::new(self.challenge(&e)))
    }
}

/// A URL's origin (`https://host:port`) and path (`/mcp`, or empty).
fn split(url: &str) -> (&str, &str) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => {
            let (origin, path) = url.split_at(after_scheme + i);
            (origin, path.trim_end_matches('/'))
        }
        None => (url, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn the_metadata_path_follows_the_resource_path() {
        assert_eq!(
            split("https://h.example/mcp"),
            ("https://h.example", "/mcp")
        );
        assert_eq!(
            split("http://127.0.0.1:8080/a/b/"),
            ("http://127.0.0.1:8080", "/a/b")
        );
        assert_eq!(split("https://h.example"), ("https://h.example", ""));
    }
}
