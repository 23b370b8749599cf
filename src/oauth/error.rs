//! Why a token or a resource server's setup is refused.

use jsonwebtoken::errors::ErrorKind;

/// Why a bearer token gives no user. The message names the reason, never the
/// token or a claim's value.
///
/// ```
/// use tool_dispatch::oauth::TokenError;
/// assert_eq!(TokenError::Expired.to_string(), "the token has expired");
/// assert_eq!(TokenError::Expired.status(), 401);
/// assert_eq!(TokenError::InsufficientScope { missing: vec!["mcp:tools".into()] }.status(), 403);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// No `Authorization: Bearer` token.
    #[error("a bearer token is required")]
    Missing,
    /// Not a JWT (or longer than 16 KiB); an `alg` of `none` is one of these.
    #[error("the token is not a signed JWT")]
    Malformed,
    /// Its `alg` is not accepted (symmetric, or not allowed, or not its key's).
    #[error("the token's signing algorithm is not accepted")]
    AlgorithmNotAllowed,
    /// Its `kid` names no key of the key set.
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    #[error("the token has expired")]
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iss` is not an accepted issuer.
    #[error("the token was issued by an issuer this server does not accept")]
    WrongIssuer,
    /// `aud` does not name this resource.
    #[error("the token is not meant for this resource")]
    WrongAudience,
    /// A claim it must have is missing or has the wrong type.
    #[error("the token lacks a required claim")]
    MissingClaim,
    /// `sub` is not a valid user id.
    #[error("the token's subject is not a valid user id")]
    InvalidSubject,
    /// It lacks scopes this resource requires.
    #[error("the token lacks the required scope: {}", missing.join(" "))]
    InsufficientScope {
        /// The scopes it lacks.
        missing: Vec<String>,
    },
}

impl TokenError {
    /// The HTTP status RFC 6750 gives it: 403 for a missing scope, 401 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            TokenError::InsufficientScope { .. } => 403,
            _ => 401,
        }
    }

    pub(super) fn from_jwt(kind: &ErrorKind) -> TokenError {
        match kind {
            ErrorKind::InvalidSignature => TokenError::BadSignature,
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
            ErrorKind::InvalidAudience => TokenError::WrongAudience,
            ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
                TokenError::AlgorithmNotAllowed
            }
            ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
                TokenError::MissingClaim
            }
            ErrorKind::Json(_) => TokenError::MissingClaim,
            _ => TokenError::Malformed,
        }
    }
}

/// Why a resource server cannot be set up, or its key set not fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OAuthError {
    /// The builder lacks something, or has something wrong.
    #[error("oauth: {0}")]
    Config(&'static str),
    /// The key set is not a JWKS document with at least one usable signing key.
    #[error("oauth: the key set is not usable: {0}")]
    BadKeySet(String),
    /// The key set's URL could not be fetched.
    #[error("oauth: the key set cannot be fetched: {0}")]
    Fetch(String),
}
