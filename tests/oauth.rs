//! The OAuth 2.1 resource server, attacked with tokens made in the test from keys
//! generated in the test: expired, not yet valid, for another audience, from
//! another issuer, `alg: none`, HS256 signed with the public key, a tampered
//! payload, an unknown key, a missing scope, each refused with the status and
//! `WWW-Authenticate` header RFC 6750 and RFC 9728 give; a valid token's subject is
//! the user (its per-user limits apply) over MCP; the protected-resource metadata
//! is served; the key set is fetched from a URL and replaced.
#![cfg(all(feature = "oauth", feature = "mcp"))]

mod common;

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use common::mcp::{AddIn, Events, PATIENCE, serve_app};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tool_dispatch::event::Event;
use tool_dispatch::mcp::{McpServer, oauth_router};
use tool_dispatch::oauth::{ResourceServer, TokenError};
use tool_dispatch::*;

const ISSUER: &str = "https://auth.example.com";
const RESOURCE: &str = "http://127.0.0.1/mcp";

/// 32 fresh bytes (not cryptographic: keys for a test).
fn random32() -> [u8; 32] {
    let s = RandomState::new();
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&s.hash_one((i, SystemTime::now())).to_le_bytes());
    }
    out
}

/// A signing key made in the test, and its public JWK.
struct Key {
    alg: Algorithm,
    kid: String,
    encoding: EncodingKey,
    jwk: Jwk,
}

impl Key {
    /// An Ed25519 key (PKCS#8 v1 of a random seed).
    fn ed25519(kid: &str) -> Key {
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&random32());
        Key::new(Algorithm::EdDSA, kid, EncodingKey::from_ed_der(&der))
    }

    /// A P-256 key (PKCS#8 of a random scalar below the group order).
    fn p256(kid: &str) -> Key {
        let mut der = vec![
            0x30, 0x41, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d,
            0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x27,
            0x30, 0x25, 0x02, 0x01, 0x01, 0x04, 0x20,
        ];
        let mut scalar = random32();
        scalar[0] &= 0x7f;
        scalar[31] |= 1;
        der.extend_from_slice(&scalar);
        Key::new(Algorithm::ES256, kid, EncodingKey::from_ec_der(&der))
    }

    fn new(alg: Algorithm, kid: &str, encoding: EncodingKey) -> Key {
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).expect("a public JWK");
        jwk.common.key_id = Some(kid.to_owned());
        Key {
            alg,
            kid: kid.to_owned(),
            encoding,
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.encoding).expect("signed")
    }
}

fn jwks(keys: &[&Key]) -> String {
    let set = JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    };
    serde_json::to_string(&set).expect("json")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

/// Claims that pass, for `sub`, with `scope`.
fn claims(sub: &str, scope: &str) -> Value {
    json!({"iss": ISSUER, "aud": RESOURCE, "sub": sub, "scope": scope,
           "iat": now(), "exp": now() + 600})
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn resource(keys: &[&Key]) -> ResourceServer {
    ResourceServer::builder(RESOURCE)
        .issuer(ISSUER)
        .jwks(&jwks(keys))
        .require_scope("mcp:tools")
        .build()
        .expect("a resource server")
}

#[test]
fn each_bad_token_is_refused_for_its_reason() {
    let key = Key::ed25519("k1");
    let ec = Key::p256("k2");
    let stranger = Key::ed25519("k1"); // same kid, another key
    let rs = resource(&[&key, &ec]);
    let good = claims("alice", "mcp:tools other");
    assert_eq!(
        rs.validate(&key.sign(&good)).expect("valid").user_id(),
        "alice"
    );
    assert_eq!(
        rs.validate(&ec.sign(&good)).expect("valid").user_id(),
        "alice"
    );

    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = good.clone();
        c.as_object_mut().expect("object").remove(k);
        c
    };
    let cases: Vec<(&str, String, TokenError)> = vec![
        (
            "expired",
            key.sign(&with("exp", json!(now() - 120))),
            TokenError::Expired,
        ),
        (
            "not yet valid",
            key.sign(&with("nbf", json!(now() + 120))),
            TokenError::NotYetValid,
        ),
        (
            "another audience",
            key.sign(&with("aud", json!("https://other.example.com/mcp"))),
            TokenError::WrongAudience,
        ),
        (
            "another issuer",
            key.sign(&with("iss", json!("https://evil.example.com"))),
            TokenError::WrongIssuer,
        ),
        (
            "no audience",
            key.sign(&without("aud")),
            TokenError::MissingClaim,
        ),
        (
            "no subject",
            key.sign(&without("sub")),
            TokenError::MissingClaim,
        ),
        (
            "no expiry",
            key.sign(&without("exp")),
            TokenError::MissingClaim,
        ),
        (
            "another key, same kid",
            stranger.sign(&good),
            TokenError::BadSignature,
        ),
        (
            "missing scope",
            key.sign(&with("scope", json!("other"))),
            TokenError::InsufficientScope {
                missing: vec!["mcp:tools".into()],
            },
        ),
        (
            "bad subject",
            key.sign(&with("sub", json!(""))),
            TokenError::InvalidSubject,
        ),
        ("not a JWT", "abc.def".into(), TokenError::Malformed),
        ("megabytes", "a".repeat(1 << 20), TokenError::Malformed),
    ];
    for (what, token, want) in cases {
        assert_eq!(rs.validate(&token).unwrap_err(), want, "{what}");
    }
    // Within the leeway (60 s) is still valid.
    assert!(
        rs.validate(&key.sign(&with("exp", json!(now() - 30))))
            .is_ok()
    );

    // alg: none, with and without a signature.
    let payload = b64(good.to_string().as_bytes());
    for none in ["none", "None", "NONE"] {
        let header = b64(json!({"alg": none, "kid": "k1"}).to_string().as_bytes());
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}.c2ln"),
        ] {
            assert_eq!(
                rs.validate(&token).unwrap_err(),
                TokenError::Malformed,
                "{none}"
            );
        }
    }
    // HS256 signed with the public key as the secret (algorithm confusion).
    let public = serde_json::to_vec(&key.jwk).expect("json");
    for secret in [public.clone(), key.jwk_x()] {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        let forged = jsonwebtoken::encode(
            &h,
            &good,
            &EncodingKey::from_secret(&secret).expect("a secret"),
        )
        .expect("signed");
        assert_eq!(
            rs.validate(&forged).unwrap_err(),
            TokenError::AlgorithmNotAllowed
        );
    }
    // A tampered payload (alice becomes root), the signature kept.
    let token = key.sign(&good);
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[1] = b64(with("sub", json!("root")).to_string().as_bytes());
    assert_eq!(
        rs.validate(&parts.join(".")).unwrap_err(),
        TokenError::BadSignature
    );
    // An EdDSA token claiming the EC key's kid: the key's family decides.
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some("k2".into());
    let crossed = jsonwebtoken::encode(&h, &good, &key.encoding).expect("signed");
    assert_eq!(
        rs.validate(&crossed).unwrap_err(),
        TokenError::AlgorithmNotAllowed
    );
    // A kid nobody has.
    let unknown = Key::ed25519("k9").sign(&good);
    assert_eq!(rs.validate(&unknown).unwrap_err(), TokenError::UnknownKey);
}

impl Key {
    /// The raw public key bytes (`x` of an OKP JWK).
    fn jwk_x(&self) -> Vec<u8> {
        use base64::Engine as _;
        let v = serde_json::to_value(&self.jwk).expect("json");
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(v["x"].as_str().unwrap_or_default())
            .unwrap_or_default()
    }
}

/// The engine of the HTTP tests: `add`, and "slowpoke" may make one call a minute.
fn engine() -> Engine {
    let add = tool_fn("add", "Adds two integers.", |i: AddIn, _cx| async move {
        Ok::<_, ToolError>(i.a + i.b)
    });
    let limits = Limits::default().per_user_with(|u| UserLimits {
        concurrency: 10,
        rate: Some(match u.user_id() {
            "slowpoke" => Rate::per_minute(1),
            _ => Rate::per_minute(1000),
        }),
    });
    Engine::builder(Registry::builder().tool(add).build().expect("built"))
        .limits(limits)
        .build()
}

async fn post(addr: std::net::SocketAddr, token: Option<&str>, body: &str) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("http://{addr}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body.to_owned());
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    tokio::time::timeout(PATIENCE, r.send())
        .await
        .expect("in time")
        .expect("an answer")
}

fn challenge(r: &reqwest::Response) -> String {
    r.headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn over_http_refusals_carry_the_challenge_and_the_metadata_is_served() {
    let key = Key::ed25519("k1");
    let addr = serve_app(oauth_router(
        McpServer::per_request(engine()),
        resource(&[&key]),
    ))
    .await;
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let metadata_url = "http://127.0.0.1/.well-known/oauth-protected-resource/mcp";

    // No token: 401, where to get one, no error code (RFC 6750 §3.1).
    let r = post(addr, None, init).await;
    assert_eq!(r.status(), 401);
    let c = challenge(&r);
    assert!(c.starts_with("Bearer "), "{c}");
    assert!(
        c.contains(&format!(r#"resource_metadata="{metadata_url}""#)),
        "{c}"
    );
    assert!(c.contains(r#"scope="mcp:tools""#), "{c}");
    assert!(!c.contains("error="), "{c}");

    // A bad token of each kind: 401 invalid_token; a missing scope: 403.
    let good = claims("alice", "mcp:tools");
    let mut expired = good.clone();
    expired["exp"] = json!(now() - 3600);
    let mut stranger = good.clone();
    stranger["aud"] = json!("https://elsewhere.example.com/mcp");
    let mut scopeless = good.clone();
    scopeless["scope"] = json!("profile");
    let mut foreign = good.clone();
    foreign["iss"] = json!("https://evil.example.com");
    let signed = key.sign(&good);
    let mut parts: Vec<&str> = signed.split('.').collect();
    let mut root = good.clone();
    root["sub"] = json!("root");
    let forged_payload = b64(root.to_string().as_bytes());
    parts[1] = &forged_payload;
    let tampered = parts.join(".");
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(good.to_string().as_bytes())
    );
    for (token, status, error) in [
        (key.sign(&expired), 401, "invalid_token"),
        (key.sign(&stranger), 401, "invalid_token"),
        (key.sign(&foreign), 401, "invalid_token"),
        (tampered, 401, "invalid_token"),
        (none, 401, "invalid_token"),
        (Key::ed25519("k1").sign(&good), 401, "invalid_token"),
        (key.sign(&scopeless), 403, "insufficient_scope"),
    ] {
        let r = post(addr, Some(&token), init).await;
        assert_eq!(r.status(), status, "{token}");
        let c = challenge(&r);
        assert!(c.contains(&format!(r#"error="{error}""#)), "{c}");
        assert!(c.contains("resource_metadata="), "{c}");
        assert!(!c.contains(&token), "the token is never echoed");
    }
    let r = post(addr, Some(&key.sign(&good)), init).await;
    assert_eq!(r.status(), 200);

    // RFC 9728 metadata, at the path-suffixed and the root well-known URIs, no token.
    for path in [
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
    ] {
        let doc: Value = reqwest::get(format!("http://{addr}{path}"))
            .await
            .expect("served")
            .json()
            .await
            .expect("JSON");
        assert_eq!(doc["resource"], RESOURCE, "{path}");
        assert_eq!(doc["authorization_servers"], json!([ISSUER]));
        assert_eq!(doc["bearer_methods_supported"], json!(["header"]));
        assert_eq!(doc["scopes_supported"], json!(["mcp:tools"]));
    }
}

#[tokio::test]
async fn a_valid_tokens_subject_is_the_user_and_its_limits_apply() {
    use rmcp::ServiceExt;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    let key = Key::p256("k1");
    let e = engine();
    let events = Events::default();
    let addr = serve_app(oauth_router(
        events.attach(McpServer::per_request(e.clone())),
        resource(&[&key]),
    ))
    .await;
    let token = key.sign(&claims("slowpoke", "mcp:tools"));
    let config = StreamableHttpClientTransportConfig::with_uri(format!("http://{addr}/mcp"))
        .auth_header(token);
    let client =
        ().serve(StreamableHttpClientTransport::from_config(config))
            .await
            .expect("initialized with the JWT");
    let args = json!({"a": 1, "b": 2});
    let Value::Object(args) = args else {
        unreachable!()
    };
    let call = rmcp::model::CallToolRequestParams::new("add").with_arguments(args);
    let first = client.call_tool(call.clone()).await.expect("a result");
    assert_eq!(first.is_error, Some(false));
    let second = client.call_tool(call).await.expect("a result");
    assert_eq!(second.is_error, Some(true), "one call a minute: {second:?}");
    let seen = events.of("slowpoke").events();
    assert!(!seen.is_empty() && seen.iter().all(|e| e.user_id() == "slowpoke"));
    assert!(seen.iter().any(|e| matches!(e, Event::ToolCompleted(c)
        if c.status == tool_dispatch::event::Status::RateLimited)));
}

#[tokio::test]
async fn the_key_set_is_fetched_from_its_url_and_replaced() {
    let old = Key::ed25519("old");
    let new = Key::ed25519("new");
    let served = Arc::new(std::sync::Mutex::new(jwks(&[&old])));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (s, f) = (Arc::clone(&served), Arc::clone(&fetches));
    let app = ::axum::Router::new().route(
        "/jwks.json",
        ::axum::routing::get(move || {
            let (s, f) = (Arc::clone(&s), Arc::clone(&f));
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                let body = s.lock().expect("not poisoned").clone();
                ([("content-type", "application/json")], body)
            }
        }),
    );
    let jwks_addr = serve_app(app).await;
    let rs = ResourceServer::builder(RESOURCE)
        .issuer(ISSUER)
        .jwks_url(format!("http://{jwks_addr}/jwks.json"))
        .build()
        .expect("built");
    assert_eq!(rs.refresh().await.expect("fetched"), 1);
    let good = claims("alice", "");
    assert!(rs.validate(&old.sign(&good)).is_ok());
    assert_eq!(
        rs.validate(&new.sign(&good)).unwrap_err(),
        TokenError::UnknownKey
    );
    // The issuer rotates its keys.
    *served.lock().expect("not poisoned") = jwks(&[&new]);
    rs.refresh().await.expect("fetched again");
    assert!(rs.validate(&new.sign(&good)).is_ok());
    assert_eq!(
        rs.validate(&old.sign(&good)).unwrap_err(),
        TokenError::UnknownKey
    );
    assert!(fetches.load(Ordering::SeqCst) >= 2);
    // A key set that is not one is refused, and the keys held stay.
    *served.lock().expect("not poisoned") = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.into();
    assert!(rs.refresh().await.is_err());
    assert!(rs.validate(&new.sign(&good)).is_ok());
}

#[test]
fn a_resource_server_needs_an_issuer_and_keys() {
    let key = Key::ed25519("k");
    assert!(
        ResourceServer::builder(RESOURCE)
            .jwks(&jwks(&[&key]))
            .build()
            .is_err()
    );
    assert!(
        ResourceServer::builder(RESOURCE)
            .issuer(ISSUER)
            .build()
            .is_err()
    );
    assert!(
        ResourceServer::builder(RESOURCE)
            .issuer(ISSUER)
            .jwks(r#"{"keys":[]}"#)
            .build()
            .is_err()
    );
    assert!(
        ResourceServer::builder("mcp")
            .issuer(ISSUER)
            .jwks(&jwks(&[&key]))
            .build()
            .is_err()
    );
}
