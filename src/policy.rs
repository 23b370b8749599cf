//! Permission policy: may this user run this tool with these arguments?
//!
//! The default, [`ScopePolicy`], allows a call when the user holds every scope the tool
//! requires. A custom [`Policy`] replaces it and may be async. Whatever a policy does
//! wrong (returns an error, panics) denies the call: the pipeline fails closed.

use futures_util::future::BoxFuture;

use serde_json::Value;

use crate::approval::ApprovalWait;
use crate::registry::ToolDefinition;
use crate::tool::ToolSettings;
use crate::user::UserContext;

/// What a policy is asked about.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct PolicyRequest<'a> {
    /// Who asks.
    pub user: &'a UserContext,
    /// The tool.
    pub tool: &'a ToolDefinition,
    /// The tool's settings (required scopes among them).
    pub settings: &'a ToolSettings,
    /// The arguments, unredacted, already validated against the tool's input type.
    pub arguments: &'a Value,
}

/// A policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Run the call.
    Allow,
    /// Run it only once the user approves: the call sends `tool_approval_required`
    /// and waits (holding no slot) for [`Engine::resolve_approval`](crate::Engine::resolve_approval).
    RequireApproval {
        /// Why, shown to the person deciding.
        reason: String,
        /// How long to wait; `None`: the tool's setting, else the engine's.
        wait: Option<ApprovalWait>,
    },
    /// Refuse it.
    Deny {
        /// Scopes the user lacks, if that is the reason.
        missing_scopes: Vec<String>,
        /// A short reason, safe to show the model.
        reason: Option<String>,
    },
}

impl Decision {
    /// Requires the user's approval, for the tool's or the engine's window.
    pub fn require_approval(reason: impl Into<String>) -> Self {
        Decision::RequireApproval {
            reason: reason.into(),
            wait: None,
        }
    }

    /// A denial with a reason.
    pub fn deny(reason: impl Into<String>) -> Self {
        Decision::Deny {
            missing_scopes: Vec::new(),
            reason: Some(reason.into()),
        }
    }
}

/// A policy that could not decide; the call is denied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission check failed: {0}")]
pub struct PolicyError(pub String);

/// A permission policy; replaces [`ScopePolicy`] when set on the engine.
///
/// ```
/// use tool_dispatch::{BoxFuture, Decision, Policy, PolicyError, PolicyRequest, ScopePolicy};
/// struct NoDeletesOnFriday;
/// impl Policy for NoDeletesOnFriday {
///     fn check<'a>(&'a self, req: PolicyRequest<'a>) -> BoxFuture<'a, Result<Decision, PolicyError>> {
///         Box::pin(async move {
///             if req.tool.name.starts_with("delete") && req.user.metadata("weekday") == Some("fri") {
///                 return Ok(Decision::deny("no deletes on Friday"));
///             }
///             Ok(ScopePolicy::decide(&req)) // and still require the scopes
///         })
///     }
/// }
/// ```
pub trait Policy: Send + Sync + 'static {
    /// Decides one call.
    fn check<'a>(&'a self, req: PolicyRequest<'a>) -> BoxFuture<'a, Result<Decision, PolicyError>>;
}

/// The default policy: every scope the tool requires must be granted to the user.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScopePolicy;

impl ScopePolicy {
    /// The decision, synchronously.
    pub fn decide(req: &PolicyRequest<'_>) -> Decision {
        let missing: Vec<String> = req
            .settings
            .scopes
            .iter()
            .filter(|s| !req.user.has_scope(s))
            .cloned()
            .collect();
        if missing.is_empty() {
            Decision::Allow
        } else {
            Decision::Deny {
                missing_scopes: missing,
                reason: None,
            }
        }
    }
}

impl Policy for ScopePolicy {
    fn check<'a>(&'a self, req: PolicyRequest<'a>) -> BoxFuture<'a, Result<Decision, PolicyError>> {
        Box::pin(std::future::ready(Ok(Self::decide(&req))))
    }
}
