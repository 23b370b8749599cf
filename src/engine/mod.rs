//! The [`Engine`]: built once, shared by every request; it owns the registry, policy,
//! limits, cache, supervisor and metrics, and runs every call through one pipeline.
//!
//! - `pipeline`: the call core, its steps in order (written once, there), each step in
//!   its own file (`prepare`, `admit`, `approve`, `announce`, `run`), all of them
//!   methods on the call's state in `in_flight`;
//! - `codec`: how a result travels (JSON by name, typed);
//! - `peers`: the seam a shared backend (Redis) plugs into;
//! - `shutdown`: `cancel_user`, `cancel_run` and `shutdown`;
//! - `health`: the probe call and the health report.

mod admit;
mod announce;
mod approve;
mod codec;
mod health;
mod in_flight;
mod peers;
mod pipeline;
mod prepare;
mod run;
mod shutdown;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::approval::{ApprovalError, ApprovalWait, Approvals, Verdict};
use crate::blocking::BlockingJobs;
use crate::cache::{Cache, CacheConfig};
use crate::delivery::Outbox;
use crate::json::{DEFAULT_MAX_DEPTH, MAX_DEPTH_LIMIT};
use crate::limits::{Limiter, Limits, LocalLimiter, UserLimits, UserState, Users};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::policy::Policy;
use crate::redact::Redaction;
use crate::registry::{Entry, Registry, entry_of};
use crate::sink::EventSink;
use crate::state::WithUser;
use crate::tool::{ToolError, tool_fn};
use crate::user::UserContext;

pub(crate) use in_flight::Occurrence;
pub(crate) use peers::{Claim, Peers, Shared, Signal};
pub use shutdown::{CancelReport, ShutdownReport, UserShutdown};

/// Default tool timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on waiting for room in a full event queue.
const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on JSON-text arguments.
const DEFAULT_MAX_ARGUMENT_BYTES: usize = 1 << 20;
/// Default bound on the events one sink holds back while it is full.
const DEFAULT_DELIVERY_BACKLOG: usize = 64;
/// Calls of one user that may wait for approval at once.
const DEFAULT_MAX_PENDING_APPROVALS: usize = 8;

pub(crate) struct Config {
    default_timeout: Duration,
    delivery_timeout: Duration,
    delivery_backlog: usize,
    max_argument_bytes: usize,
    max_depth: usize,
    redaction: Redaction,
    limits: Limits,
    approval_wait: ApprovalWait,
    max_pending_approvals: usize,
    /// Put arguments and results on the calls' spans.
    #[cfg(feature = "otel")]
    trace_content: bool,
}

/// The health probe: a tool outside the registry and a user outside the user table,
/// so probing neither shows in the totals nor shares anybody's limits.
struct Probe {
    entry: Entry,
    user: WithUser,
}

/// Everything an engine shares between requests. Its fields are private to the
/// engine's modules; the rest of the crate uses the few methods below.
pub(crate) struct Inner {
    registry: Registry,
    config: Config,
    policy: Option<Arc<dyn Policy>>,
    users: Users,
    limiter: Box<dyn Limiter>,
    cache: Cache,
    metrics: Arc<Metrics>,
    blocking: Arc<BlockingJobs>,
    root: CancellationToken,
    accepting: AtomicBool,
    idle: Notify,
    approvals: Approvals,
    peers: Option<Box<dyn Peers>>,
    probe: Probe,
    id_prefix: u32,
    next_id: AtomicU64,
}

impl Inner {
    /// The state of `ctx`'s user, bound for a dispatcher's life.
    pub(crate) fn bind(&self, ctx: Arc<UserContext>) -> WithUser {
        let state = self.users.bind(&ctx, &self.config.limits.resolver, || {
            self.root.child_token()
        });
        WithUser { ctx, state }
    }

    /// The outbox a dispatcher delivers to `sink` through.
    pub(crate) fn outbox(&self, sink: Arc<dyn EventSink>) -> Arc<Outbox> {
        Arc::new(Outbox::new(
            sink,
            Arc::clone(&self.metrics),
            self.config.delivery_timeout,
            self.config.delivery_backlog,
        ))
    }

    /// The longest text an event carries.
    pub(crate) fn max_text(&self) -> usize {
        self.config.redaction.max_text()
    }

    pub(crate) fn redaction(&self) -> &Redaction {
        &self.config.redaction
    }

    /// The live counters (for the opt-in user label of feature `prometheus`).
    #[cfg(feature = "prometheus")]
    pub(crate) fn counters(&self) -> &Metrics {
        &self.metrics
    }
}

/// The shared half: registry, policy, limits, cache, supervisor and metrics.
///
/// Cheap to clone (one `Arc`). Build it once at start-up, then take one
/// [`Dispatcher`](crate::Dispatcher) per request with [`dispatcher`](Engine::dispatcher).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("registry", &self.inner.registry)
            .field("active", &self.inner.metrics.active())
            .finish_non_exhaustive()
    }
}

/// Builder for [`Engine`]; see [`Engine::builder`].
#[must_use = "a builder does nothing until `.build()` is called"]
pub struct EngineBuilder {
    registry: Registry,
    config: Config,
    policy: Option<Arc<dyn Policy>>,
    cache: CacheConfig,
    shared: Option<Shared>,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder").finish_non_exhaustive()
    }
}

impl EngineBuilder {
    /// Timeout for tools that set none (default 30 s).
    pub fn default_timeout(mut self, d: Duration) -> Self {
        self.config.default_timeout = d;
        self
    }

    /// Concurrency and rate limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.limits = limits;
        self
    }

    /// Replaces the default [`ScopePolicy`](crate::ScopePolicy).
    pub fn policy(mut self, policy: impl Policy) -> Self {
        self.policy = Some(Arc::new(policy));
        self
    }

    /// How event payloads are redacted and truncated.
    pub fn redaction(mut self, r: Redaction) -> Self {
        self.config.redaction = r;
        self
    }

    /// How long an event may wait for room in a full sink (default 5 s). Past it the
    /// event is not delivered: a `tool_executing` means the tool does not run.
    pub fn delivery_timeout(mut self, d: Duration) -> Self {
        self.config.delivery_timeout = d;
        self
    }

    /// How many events of running calls one sink holds back, in order, while it is
    /// full (default 64, at least 2); a call's `tool_executing` waits for room past
    /// it. A call whose `tool_executing` went out (or is queued) may always add its
    /// `tool_completed`, and the pairs of calls that ended while they waited to be
    /// announced (a dropped future, a cancellation) are kept up to 64 times this
    /// bound, then counted as undelivered. So a sink holds back at most this, plus one
    /// completion per call in flight, plus 64 times this.
    pub fn delivery_backlog(mut self, n: usize) -> Self {
        self.config.delivery_backlog = n.max(2);
        self
    }

    /// Largest JSON-text arguments accepted (default 1 MiB).
    pub fn max_argument_bytes(mut self, n: usize) -> Self {
        self.config.max_argument_bytes = n;
        self
    }

    /// Deepest nesting of arrays and objects accepted in arguments, typed inputs and
    /// results (default 128, as `serde_json` allows in text; at most 1024). Deeper
    /// input ends `invalid_input`; nothing recurses over it.
    pub fn max_depth(mut self, n: usize) -> Self {
        self.config.max_depth = n.clamp(1, MAX_DEPTH_LIMIT);
        self
    }

    /// How long a call that needs approval waits for its user (default five
    /// minutes); a tool's [`ToolSettings::approval_wait`](crate::ToolSettings::approval_wait)
    /// and a policy's decision take precedence. [`ApprovalWait::Forever`] is an
    /// explicit opt-in.
    pub fn approval_wait(mut self, wait: ApprovalWait) -> Self {
        self.config.approval_wait = wait;
        self
    }

    /// Calls of one user that may wait for approval at once (default 8); past it a
    /// call that needs approval ends `busy`.
    pub fn max_pending_approvals(mut self, n: usize) -> Self {
        self.config.max_pending_approvals = n;
        self
    }

    /// Puts each call's arguments and result on its `execute_tool` span, as
    /// `gen_ai.tool.call.arguments` and `gen_ai.tool.call.result` (JSON text),
    /// redacted and cut exactly as its events show them (feature `otel`). Off by
    /// default: spans leave the process, and the OpenTelemetry GenAI conventions make
    /// content opt-in.
    #[cfg(feature = "otel")]
    pub fn trace_content(mut self, on: bool) -> Self {
        self.config.trace_content = on;
        self
    }

    /// Result cache bounds.
    pub fn cache(mut self, c: CacheConfig) -> Self {
        self.cache = c;
        self
    }

    /// Shares limits and cancellation with other processes (see `EngineBuilder::redis`).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn shared(mut self, shared: Shared) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Builds the engine.
    pub fn build(self) -> Engine {
        let epoch = Instant::now();
        let tools = self.registry.len();
        let hasher = std::hash::RandomState::new();
        let root = CancellationToken::new();
        let local = LocalLimiter::new(self.config.limits.global, epoch);
        let (limiter, peers, on_build) = match self.shared {
            Some(s) => ((s.limiter)(local), Some(s.peers), Some(s.on_build)),
            None => (Box::new(local) as Box<dyn Limiter>, None, None),
        };
        let engine = Engine {
            inner: Arc::new(Inner {
                limiter,
                peers,
                users: Users::new(epoch),
                probe: probe(tools, root.child_token()),
                registry: self.registry,
                config: self.config,
                policy: self.policy,
                cache: Cache::new(self.cache),
                metrics: Arc::new(Metrics::new(tools)),
                blocking: Arc::default(),
                root,
                accepting: AtomicBool::new(true),
                idle: Notify::new(),
                approvals: Approvals::default(),
                id_prefix: std::hash::BuildHasher::hash_one(&hasher, epoch) as u32,
                next_id: AtomicU64::new(1),
            }),
        };
        if let Some(on_build) = on_build {
            on_build(&engine);
        }
        engine
    }
}

/// The probe's tool and user. The probe may run 4 at once and has no rate limit, so
/// frequent probing cannot make a healthy engine look rate-limited.
fn probe(index: usize, token: CancellationToken) -> Probe {
    let tool = tool_fn(health::PROBE, "Health probe.", |n: u64, _cx| async move {
        Ok::<_, ToolError>(n)
    });
    let limits = UserLimits {
        concurrency: 4,
        rate: None,
    };
    let ctx = Arc::new(UserContext::probe());
    let state = Arc::new(UserState::detached(ctx.user_id.clone(), limits, token).local_only());
    Probe {
        entry: entry_of(tool, index),
        user: WithUser { ctx, state },
    }
}

impl Engine {
    /// Starts an engine over `registry` with default limits (10 per user, 100 global,
    /// 100 calls per minute per user), a 30 s timeout and the
    /// [`ScopePolicy`](crate::ScopePolicy).
    pub fn builder(registry: Registry) -> EngineBuilder {
        EngineBuilder {
            registry,
            config: Config {
                default_timeout: DEFAULT_TIMEOUT,
                delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
                delivery_backlog: DEFAULT_DELIVERY_BACKLOG,
                max_argument_bytes: DEFAULT_MAX_ARGUMENT_BYTES,
                max_depth: DEFAULT_MAX_DEPTH,
                redaction: Redaction::default(),
                limits: Limits::default(),
                approval_wait: ApprovalWait::default(),
                max_pending_approvals: DEFAULT_MAX_PENDING_APPROVALS,
                #[cfg(feature = "otel")]
                trace_content: false,
            },
            policy: None,
            cache: CacheConfig::default(),
            shared: None,
        }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// A handle that does not keep the engine alive (for a backend's listener, a
    /// metrics collector).
    #[cfg_attr(not(any(feature = "redis", feature = "prometheus")), allow(dead_code))]
    pub(crate) fn downgrade(&self) -> std::sync::Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    /// The engine behind a [`downgrade`](Self::downgrade)d handle, if it still exists.
    #[cfg_attr(not(any(feature = "redis", feature = "prometheus")), allow(dead_code))]
    pub(crate) fn upgrade(weak: &std::sync::Weak<Inner>) -> Option<Engine> {
        weak.upgrade().map(|inner| Engine { inner })
    }

    /// The tools.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Calls in flight.
    pub fn active(&self) -> usize {
        self.inner.metrics.active()
    }

    /// A copy of the counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let s = &self.inner;
        let users = s.users.all();
        let mut m = s
            .metrics
            .snapshot(s.registry.names(), &users, s.users.len());
        m.cache_entries = s.cache.len();
        m.awaiting_approval = s.approvals.len();
        m
    }

    /// Answers the approval `user_id`'s call `call_id` waits for: it runs, or ends
    /// `rejected` with the message passed to the model. Taken once: a second answer,
    /// an unknown call id, a call that stopped waiting and another user's call all
    /// get [`ApprovalError::NoSuchPendingApproval`], so nobody learns whether someone
    /// else's call exists. With Redis, the call may wait on any node: the answer is
    /// taken once across all of them and travels to that node.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tool_dispatch::event::Event;
    /// use tool_dispatch::*;
    /// let send = tool_fn("send", "Sends.", |_: (), _cx| async { Ok::<_, ToolError>("sent") })
    ///     .settings(ToolSettings::new().requires_approval("sends mail"));
    /// let engine = Engine::builder(Registry::builder().tool(send).build()?).build();
    /// let sink = RecordingSink::new();
    /// let alice = engine.dispatcher().sink(sink.clone()).user(UserContext::builder("alice").build()?);
    /// let call = alice.dispatch(ToolCall::new("send", serde_json::json!(null)).with_id("c1"));
    /// let answer = async {
    ///     while !sink.events().iter().any(|e| matches!(e, Event::ToolApprovalRequired(_))) {
    ///         tokio::task::yield_now().await;
    ///     }
    ///     assert!(engine.resolve_approval("bob", "c1", Verdict::Approve).await.is_err()); // not bob's
    ///     engine.resolve_approval("alice", "c1", Verdict::Approve).await
    /// };
    /// let (out, answered) = tokio::join!(call, answer);
    /// assert_eq!((out?.value, answered), (serde_json::json!("sent"), Ok(())));
    /// # Ok(()) }
    /// ```
    pub async fn resolve_approval(
        &self,
        user_id: &str,
        call_id: &str,
        verdict: Verdict,
    ) -> Result<(), ApprovalError> {
        let verdict = match verdict {
            Verdict::Reject { message } => Verdict::Reject {
                message: message.map(|m| crate::json::cut(&m, self.inner.max_text())),
            },
            v => v,
        };
        let Some(peers) = &self.inner.peers else {
            return self.inner.approvals.resolve(user_id, call_id, verdict);
        };
        match peers.claim(user_id, call_id).await {
            // Here, or the store cannot say (then only a call waiting here can be
            // answered).
            Claim::Here | Claim::Unreachable => {
                self.inner.approvals.resolve(user_id, call_id, verdict)
            }
            Claim::Elsewhere(node) => match peers.deliver(&node, user_id, call_id, verdict) {
                true => Ok(()),
                false => Err(ApprovalError::NoSuchPendingApproval),
            },
            Claim::Nobody => Err(ApprovalError::NoSuchPendingApproval),
        }
    }

    /// Applies a decision another node took for a call waiting here.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn resolve_here(&self, user_id: &str, call_id: &str, verdict: Verdict) -> bool {
        self.inner
            .approvals
            .resolve(user_id, call_id, verdict)
            .is_ok()
    }

    /// Forgets idle users (no dispatcher, no call in flight, rate bucket full) and
    /// returns how many are still tracked. This also happens by itself as users come
    /// and go.
    pub fn sweep_idle_users(&self) -> usize {
        self.inner.users.sweep()
    }
}
