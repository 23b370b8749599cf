//! An OAuth 2.1 resource server (feature `oauth`): bearer tokens that are JWT access
//! tokens, checked against this server's resource URL, the authorization servers
//! that may issue them, and their signing keys (a JWKS fetched from a URL and
//! refreshed, or given); and the protected-resource metadata (RFC 9728) that tells a
//! client where to get one.
//!
//! [`ResourceServer::validate`] turns a token into the [`UserContext`] of its
//! subject, with the token's scopes as the user's scopes, so per-user limits,
//! policies and tool scopes apply as for any user. It is a plain function of the
//! token: [`ResourceServer::authenticate`] fits anything that takes
//! `Fn(&str) -> Option<UserContext>` (the WebSocket router's check, or
//! `mcp::router`); `mcp::oauth_router` (feature `mcp`)
//! adds the metadata and the `WWW-Authenticate` challenges RFC 6750 and RFC 9728
//! describe.
//!
//! A token is refused unless:
//!
//! - it is a JWS whose `alg` is asymmetric (RS*, PS*, ES256, ES384, EdDSA) and
//!   allowed: `none` and HS* are refused whatever the keys, so a public key can
//!   never be used as an HMAC secret;
//! - its `kid` names a key of the key set of the same family (a token without
//!   `kid` is tried against a set of exactly one key), and the signature verifies;
//! - `iss` is one of the issuers, `aud` names this server's resource URL, `exp`
//!   is in the future and `nbf` (if any) in the past, both within the leeway
//!   (default 60 s, for clocks that differ), `sub` is present and is a valid
//!   user id;
//! - it holds every scope the server requires (else `403 insufficient_scope`).
//!
//! ```no_run
//! # async fn f(engine: tool_dispatch::Engine) -> Result<(), Box<dyn std::error::Error>> {
//! use tool_dispatch::mcp::{McpServer, oauth_router};
//! use tool_dispatch::oauth::ResourceServer;
//! let resource = ResourceServer::builder("https://mcp.example.com/mcp")
//!     .issuer("https://auth.example.com")
//!     .jwks_url("https://auth.example.com/.well-known/jwks.json")
//!     .require_scope("mcp:tools")
//!     .build()?;
//! resource.refresh().await?; // the first key set, before serving
//! let app = oauth_router(McpServer::per_request(engine), resource);
//! # let _: axum::Router = app; Ok(()) }
//! ```

mod error;
mod http;
mod jwks;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

pub use error::{OAuthError, TokenError};
use jwks::Keys;

use crate::user::UserContext;

/// The longest token looked at (bytes); a longer one is malformed.
const MAX_TOKEN: usize = 16 * 1024;

/// The algorithms accepted unless [`ResourceServerBuilder::algorithms`] narrows
/// them: every asymmetric one `jsonwebtoken` verifies.
const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Checks JWT access tokens for one protected resource. Cheap to clone.
#[derive(Clone)]
pub struct ResourceServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ResourceServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceServer")
            .field("resource", &self.inner.resource)
            .field("issuers", &self.inner.issuers)
            .finish_non_exhaustive()
    }
}

struct Inner {
    resource: String,
    issuers: Vec<String>,
    authorization_servers: Vec<String>,
    required_scopes: Vec<String>,
    scopes_supported: Vec<String>,
    leeway: Duration,
    algorithms: Vec<Algorithm>,
    keys: Arc<Keys>,
}

/// Builds a [`ResourceServer`]; see [`ResourceServer::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct ResourceServerBuilder {
    resource: String,
    issuers: Vec<String>,
    authorization_servers: Vec<String>,
    required_scopes: Vec<String>,
    scopes_supported: Vec<String>,
    leeway: Duration,
    algorithms: Vec<Algorithm>,
    jwks: Option<jwks::Source>,
    refresh_every: Duration,
}

impl ResourceServer {
    /// A resource server for `resource`, this server's resource URL (what tokens
    /// must name in `aud`, e.g. `https://mcp.example.com/mcp`).
    pub fn builder(resource: impl Into<String>) -> ResourceServerBuilder {
        ResourceServerBuilder {
            resource: resource.into(),
            issuers: Vec::new(),
            authorization_servers: Vec::new(),
            required_scopes: Vec::new(),
            scopes_supported: Vec::new(),
            leeway: Duration::from_secs(60),
            algorithms: ASYMMETRIC.to_vec(),
            jwks: None,
            refresh_every: Duration::from_secs(600),
        }
    }

    /// The resource URL tokens are checked against.
    pub fn resource(&self) -> &str {
        &self.inner.resource
    }

    /// The user a token stands for, or why it stands for none. Uses the key set
    /// held now; a `kid` it does not know asks the refresher (if any) for a new
    /// set and is refused this time.
    pub fn validate(&self, token: &str) -> Result<UserContext, TokenError> {
        let i = &self.inner;
        if token.is_empty() || token.len() > MAX_TOKEN {
            return Err(TokenError::Malformed);
        }
        let header = decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !i.algorithms.contains(&header.alg) {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        let jwk = i
            .keys
            .find(header.kid.as_deref())
            .ok_or(TokenError::UnknownKey)?;
        if !fits(&jwk, header.alg) {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| TokenError::UnknownKey)?;
        let mut v = Validation::new(header.alg);
        v.leeway = i.leeway.as_secs();
        v.validate_nbf = true;
        v.set_issuer(&i.issuers);
        v.set_audience(&[&i.resource]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = decode::<Claims>(token, &key, &v)
            .map_err(|e| TokenError::from_jwt(e.kind()))?
            .claims;
        let scopes = claims.scopes();
        let missing: Vec<String> = i
            .required_scopes
            .iter()
            .filter(|s| !scopes.contains(*s))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(TokenError::InsufficientScope { missing });
        }
        let mut user = UserContext::builder(claims.sub).scopes(scopes);
        if let Some(client) = claims.client_id.or(claims.azp) {
            user = user.metadata("client_id", client);
        }
        user.build().map_err(|_| TokenError::InvalidSubject)
    }

    /// [`validate`](Self::validate), for checks that only take a user or nothing.
    ///
    /// ```no_run
    /// # fn f(resource: tool_dispatch::oauth::ResourceServer, engine: tool_dispatch::Engine) {
    /// use tool_dispatch::mcp::{McpServer, router};
    /// // Static-token style router, tokens checked as JWTs (no metadata route).
    /// let app = router(McpServer::per_request(engine), move |t| resource.authenticate(t));
    /// # }
    /// ```
    pub fn authenticate(&self, token: &str) -> Option<UserContext> {
        self.validate(token).ok()
    }

    /// Fetches the key set from its URL now (a static set has nothing to fetch).
    /// The background refresher does this every [`refresh_every`] and when a token
    /// names a key it does not know; call it at start to fail early.
    ///
    /// [`refresh_every`]: ResourceServerBuilder::refresh_every
    pub async fn refresh(&self) -> Result<usize, OAuthError> {
        self.inner.keys.refresh().await
    }
}

impl ResourceServerBuilder {
    /// An issuer whose tokens are accepted (`iss`); also listed as an
    /// authorization server in the metadata unless some are listed.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuers.push(issuer.into());
        self
    }

    /// An authorization server to list in the protected-resource metadata.
    pub fn authorization_server(mut self, url: impl Into<String>) -> Self {
        self.authorization_servers.push(url.into());
        self
    }

    /// The key set's URL (a JWKS document), fetched and kept fresh. `https` needs a
    /// TLS backend in reqwest (depend on reqwest with `rustls`).
    pub fn jwks_url(mut self, url: impl Into<String>) -> Self {
        self.jwks = Some(jwks::Source::Url(url.into()));
        self
    }

    /// The key set itself (a JWKS document), for issuers whose keys are known.
    pub fn jwks(mut self, jwks: &str) -> Self {
        self.jwks = Some(jwks::Source::Static(jwks.to_owned()));
        self
    }

    /// A scope every token must hold (else `403 insufficient_scope`).
    pub fn require_scope(mut self, scope: impl Into<String>) -> Self {
        self.required_scopes.push(scope.into());
        self
    }

    /// Scopes to list in the metadata (`scopes_supported`).
    pub fn scope_supported(mut self, scope: impl Into<String>) -> Self {
        self.scopes_supported.push(scope.into());
        self
    }

    /// How far `exp` and `nbf` may be off (default 60 s), for clocks that differ.
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// The algorithms accepted, among the asymmetric ones (default: all of them).
    /// Symmetric ones (HS*) are never accepted.
    pub fn algorithms(mut self, algorithms: &[Algorithm]) -> Self {
        self.algorithms = algorithms
            .iter()
            .copied()
            .filter(|a| ASYMMETRIC.contains(a))
            .collect();
        self
    }

    /// How often a fetched key set is fetched again (default 10 minutes).
    pub fn refresh_every(mut self, every: Duration) -> Self {
        self.refresh_every = every;
        self
    }

    /// The resource server. A key set given by URL is fetched by a task on the
    /// current tokio runtime, at once and then every [`refresh_every`]; outside a
    /// runtime, call [`ResourceServer::refresh`].
    ///
    /// [`refresh_every`]: Self::refresh_every
    pub fn build(self) -> Result<ResourceServer, OAuthError> {
        if !self.resource.starts_with("https://") && !self.resource.starts_with("http://") {
            return Err(OAuthError::Config("the resource must be an http(s) URL"));
        }
        if self.issuers.is_empty() {
            return Err(OAuthError::Config("at least one issuer is needed"));
        }
        if self.algorithms.is_empty() {
            return Err(OAuthError::Config("no algorithm is allowed"));
        }
        let source = self
            .jwks
            .ok_or(OAuthError::Config("a key set (jwks_url or jwks) is needed"))?;
        let keys = Keys::new(source, self.refresh_every)?;
        let authorization_servers = match self.authorization_servers.is_empty() {
            true => self.issuers.clone(),
            false => self.authorization_servers,
        };
        Ok(ResourceServer {
            inner: Arc::new(Inner {
                resource: self.resource,
                issuers: self.issuers,
                authorization_servers,
                required_scopes: self.required_scopes,
                scopes_supported: self.scopes_supported,
                leeway: self.leeway,
                algorithms: self.algorithms,
                keys,
            }),
        })
    }
}

/// Whether `jwk` may verify a token signed with `alg`: the same family (and curve),
/// its own `alg` if it names one, and a signing key if it says what it is for.
fn fits(jwk: &Jwk, alg: Algorithm) -> bool {
    use jsonwebtoken::jwk::EllipticCurve;
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => matches!(
            alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        AlgorithmParameters::EllipticCurve(ec) => matches!(
            (&ec.curve, alg),
            (EllipticCurve::P256, Algorithm::ES256) | (EllipticCurve::P384, Algorithm::ES384)
        ),
        AlgorithmParameters::OctetKeyPair(_) => alg == Algorithm::EdDSA,
        _ => false,
    };
    let own = jwk
        .common
        .key_algorithm
        .is_none_or(|k| k == jsonwebtoken::jwk::KeyAlgorithm::from(alg));
    let signing = jwk
        .common
        .public_key_use
        .as_ref()
        .is_none_or(|u| *u == PublicKeyUse::Signature);
    family && own && signing
}

/// The claims read from a token (the time, issuer and audience claims are checked
/// by `jsonwebtoken`).
#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<ScopeList>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    azp: Option<String>,
}

/// `scp`, as some issuers write it: a list, or one space-separated string.
#[derive(Deserialize)]
#[serde(untagged)]
enum ScopeList {
    List(Vec<String>),
    Text(String),
}

impl Claims {
    /// `scope` (space-separated, RFC 8693) and `scp`, together.
    fn scopes(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .scope
            .iter()
            .flat_map(|s| s.split_whitespace())
            .map(str::to_owned)
            .collect();
        match &self.scp {
            Some(ScopeList::List(l)) => out.extend(l.iter().cloned()),
            Some(ScopeList::Text(t)) => out.extend(t.split_whitespace().map(str::to_owned)),
            None => {}
        }
        out
    }
}
