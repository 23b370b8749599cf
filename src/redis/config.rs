//! How the engine uses Redis, and what it does when Redis cannot answer.

use std::time::Duration;

/// What the engine does when Redis cannot answer in time.
///
/// ```
/// use tool_dispatch::redis::OnUnreachable;
/// assert_eq!(OnUnreachable::default(), OnUnreachable::FailClosed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnUnreachable {
    /// The call ends `unavailable` (`DispatchError::LimitsUnavailable`) with its
    /// paired events and a `retry_after`: nobody exceeds a limit, nobody is served.
    #[default]
    FailClosed,
    /// This node's own limiter decides meanwhile: everyone is served, a user may get
    /// up to one quota per node.
    UseLocalLimits,
}

/// How the engine uses Redis.
///
/// ```
/// use std::time::Duration;
/// use tool_dispatch::redis::RedisConfig;
/// let c = RedisConfig::default().prefix("chat").timeout(Duration::from_millis(100));
/// # let _ = c;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub(super) prefix: String,
    pub(super) timeout: Duration,
    pub(super) on_unreachable: OnUnreachable,
    pub(super) local_precheck: bool,
    pub(super) lease: Duration,
    pub(super) cluster_concurrency: Option<usize>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            prefix: "tool-dispatch".into(),
            timeout: Duration::from_millis(250),
            on_unreachable: OnUnreachable::default(),
            local_precheck: true,
            lease: Duration::from_secs(10),
            cluster_concurrency: None,
        }
    }
}

impl RedisConfig {
    /// The first part of every key (default `tool-dispatch`), so several
    /// applications can share one Redis.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest any call to Redis may take, connecting included (default 250 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What to do when Redis cannot answer (default [`OnUnreachable::FailClosed`]).
    pub fn on_unreachable(mut self, policy: OnUnreachable) -> Self {
        self.on_unreachable = policy;
        self
    }

    /// How long a concurrency slot's lease lasts without renewal (default 10 s; at
    /// least 3 ms). A held slot is renewed every third of it; the slots of a node
    /// that dies are free again within this time.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Calls in flight across every node on this Redis and prefix (default: no such
    /// limit). Each slot is a lease like a user's; a call holds one of its node's own
    /// engine-wide slots ([`Limits::global`](crate::Limits::global)) too. Waiting
    /// for one is bounded by the same `max_wait`, then `busy` with the global scope.
    pub fn cluster_concurrency(mut self, limit: usize) -> Self {
        self.cluster_concurrency = Some(limit.max(1));
        self
    }

    /// Whether a call this node's own bucket already refuses is refused without
    /// asking Redis (default on): a user over the quota on one node is over it
    /// everywhere, so abuse is shed without a round trip.
    pub fn local_precheck(mut self, on: bool) -> Self {
        self.local_precheck = on;
        self
    }
}
