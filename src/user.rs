//! The user a dispatcher acts for: [`UserContext`] and the errors its constructor raises.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

/// Longest accepted identifier, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Identifiers that name nobody. A dispatcher bound to one of these would mix the
/// events and limits of every caller that fell back to it, so they are refused.
const PLACEHOLDER_IDS: &[&str] = &[
    "default",
    "none",
    "null",
    "nil",
    "undefined",
    "placeholder",
    "registry",
    "unknown",
    "anonymous",
    "global",
    "n/a",
];

/// Why a [`UserContext`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UserContextError {
    /// The identifier was empty or only white space.
    #[error("{field} is empty")]
    Empty {
        /// Which identifier (`user_id`, `thread_id`, `run_id`, `request_id`).
        field: &'static str,
    },
    /// The identifier is a placeholder such as `default` or `null`.
    #[error("{field} `{value}` is a placeholder, not a real identifier")]
    Placeholder {
        /// Which identifier.
        field: &'static str,
        /// The rejected value.
        value: String,
    },
    /// The identifier is longer than [`MAX_ID_LEN`] bytes.
    #[error("{field} is {len} bytes long; at most {MAX_ID_LEN} are accepted")]
    TooLong {
        /// Which identifier.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The identifier contains control characters or surrounding white space.
    #[error("{field} contains control characters or leading/trailing white space")]
    Malformed {
        /// Which identifier.
        field: &'static str,
    },
}

fn check_id(field: &'static str, value: &str) -> Result<Arc<str>, UserContextError> {
    if value.trim().is_empty() {
        return Err(UserContextError::Empty { field });
    }
    if value.len() > MAX_ID_LEN {
        return Err(UserContextError::TooLong {
            field,
            len: value.len(),
        });
    }
    if value.trim() != value || value.chars().any(char::is_control) {
        return Err(UserContextError::Malformed { field });
    }
    if PLACEHOLDER_IDS
        .iter()
        .any(|p| p.eq_ignore_ascii_case(value))
    {
        return Err(UserContextError::Placeholder {
            field,
            value: value.to_owned(),
        });
    }
    Ok(Arc::from(value))
}

/// Who a dispatcher acts for, and within which conversation and run.
///
/// Built with [`UserContext::builder`]; every identifier is checked: empty,
/// placeholder (`default`, `null`, `registry`, …), over-long or malformed ids are a
/// [`UserContextError`].
///
/// ```
/// use tool_dispatch::UserContext;
/// let alice = UserContext::builder("alice")
///     .thread_id("t_1")
///     .run_id("run_1")
///     .scope("weather:read")
///     .build()?;
/// assert_eq!(alice.user_id(), "alice");
/// assert!(UserContext::builder("default").build().is_err());
/// # Ok::<(), tool_dispatch::UserContextError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct UserContext {
    pub(crate) user_id: Arc<str>,
    pub(crate) thread_id: Option<Arc<str>>,
    pub(crate) run_id: Option<Arc<str>>,
    pub(crate) request_id: Option<Arc<str>>,
    scopes: BTreeSet<String>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for UserContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Metadata may carry tier names or tokens; only its keys are shown.
        f.debug_struct("UserContext")
            .field("user_id", &self.user_id)
            .field("thread_id", &self.thread_id)
            .field("run_id", &self.run_id)
            .field("request_id", &self.request_id)
            .field("scopes", &self.scopes)
            .field("metadata_keys", &self.metadata.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl UserContext {
    /// Starts a context for `user_id`; nothing is checked until [`UserContextBuilder::build`].
    pub fn builder(user_id: impl Into<String>) -> UserContextBuilder {
        UserContextBuilder {
            user_id: user_id.into(),
            thread_id: None,
            run_id: None,
            request_id: None,
            scopes: BTreeSet::new(),
            metadata: BTreeMap::new(),
        }
    }

    /// The health probe's own user; it is never bound through the user table, so a
    /// real user with the same id shares nothing with it.
    pub(crate) fn probe() -> Self {
        UserContext {
            user_id: Arc::from("tool-dispatch-health-probe"),
            thread_id: None,
            run_id: None,
            request_id: None,
            scopes: BTreeSet::new(),
            metadata: BTreeMap::new(),
        }
    }

    /// The user's identifier.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The conversation thread, if any.
    pub fn thread_id(&self) -> Option<&str> {
        self.thread_id.as_deref()
    }

    /// The agent run, if any.
    pub fn run_id(&self) -> Option<&str> {
        self.run_id.as_deref()
    }

    /// The same user, scopes and metadata in run `run_id`: what a server uses when
    /// one connection works in several runs. The id is checked like the builder's.
    ///
    /// ```
    /// use tool_dispatch::UserContext;
    /// let alice = UserContext::builder("alice").scope("read").build()?;
    /// let in_run = alice.with_run_id("run_7")?;
    /// assert_eq!((in_run.run_id(), in_run.has_scope("read")), (Some("run_7"), true));
    /// assert!(alice.with_run_id("").is_err());
    /// # Ok::<(), tool_dispatch::UserContextError>(())
    /// ```
    pub fn with_run_id(&self, run_id: &str) -> Result<UserContext, UserContextError> {
        Ok(UserContext {
            run_id: Some(check_id("run_id", run_id)?),
            ..self.clone()
        })
    }

    /// The request that created this context, if any.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// Permission scopes granted to this user for this request.
    pub fn scopes(&self) -> &BTreeSet<String> {
        &self.scopes
    }

    /// Whether the user holds `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.contains(scope)
    }

    /// Free-form metadata (plan tier, locale, …) for policies and limit resolvers.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }
}

/// Builder for [`UserContext`]; see [`UserContext::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `.build()` is called"]
pub struct UserContextBuilder {
    user_id: String,
    thread_id: Option<String>,
    run_id: Option<String>,
    request_id: Option<String>,
    scopes: BTreeSet<String>,
    metadata: BTreeMap<String, String>,
}

impl UserContextBuilder {
    /// Sets the conversation thread id.
    pub fn thread_id(mut self, id: impl Into<String>) -> Self {
        self.thread_id = Some(id.into());
        self
    }

    /// Sets the agent run id.
    pub fn run_id(mut self, id: impl Into<String>) -> Self {
        self.run_id = Some(id.into());
        self
    }

    /// Sets the request id.
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    /// Grants one permission scope.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scopes.insert(scope.into());
        self
    }

    /// Grants several permission scopes.
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes.extend(scopes.into_iter().map(Into::into));
        self
    }

    /// Adds one metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Checks every identifier and builds the context.
    pub fn build(self) -> Result<UserContext, UserContextError> {
        let opt = |field, v: Option<String>| v.map(|v| check_id(field, &v)).transpose();
        Ok(UserContext {
            user_id: check_id("user_id", &self.user_id)?,
            thread_id: opt("thread_id", self.thread_id)?,
            run_id: opt("run_id", self.run_id)?,
            request_id: opt("request_id", self.request_id)?,
            scopes: self.scopes,
            metadata: self.metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_ids_with_typed_errors() {
        let err = |id: &str| UserContext::builder(id).build().unwrap_err();
        assert_eq!(err(""), UserContextError::Empty { field: "user_id" });
        assert_eq!(err("   "), UserContextError::Empty { field: "user_id" });
        assert!(matches!(err("NULL"), UserContextError::Placeholder { .. }));
        assert!(matches!(
            err("registry"),
            UserContextError::Placeholder { .. }
        ));
        assert!(matches!(
            err(&"x".repeat(300)),
            UserContextError::TooLong { len: 300, .. }
        ));
        assert!(matches!(err(" alice"), UserContextError::Malformed { .. }));
        assert!(matches!(err("al\nice"), UserContextError::Malformed { .. }));
        // Every id field is checked and named; real ids that merely contain a
        // placeholder word are fine.
        assert!(matches!(
            UserContext::builder("a").request_id("default").build(),
            Err(UserContextError::Placeholder {
                field: "request_id",
                ..
            })
        ));
        let ok = UserContext::builder("alice")
            .thread_id("default-thread-7")
            .run_id("run_null_1")
            .build()
            .unwrap();
        assert_eq!(ok.run_id(), Some("run_null_1"));
        let e = UserContext::builder("alice")
            .run_id("none")
            .build()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "run_id `none` is a placeholder, not a real identifier"
        );
    }

    #[test]
    fn keeps_what_it_was_given() {
        let c = UserContext::builder("alice")
            .thread_id("t")
            .run_id("r")
            .request_id("q")
            .scopes(["a", "b"])
            .metadata("tier", "pro")
            .build()
            .unwrap();
        assert_eq!(
            (c.user_id(), c.thread_id(), c.run_id(), c.request_id()),
            ("alice", Some("t"), Some("r"), Some("q"))
        );
        assert!(c.has_scope("a") && c.has_scope("b") && !c.has_scope("c"));
        assert_eq!(c.metadata("tier"), Some("pro"));
        assert!(!format!("{c:?}").contains("pro"));
    }
}
