//! The [`Engine`]: built once, shared by every request, and home of the one pipeline
//! every tool call goes through.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures_util::FutureExt;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cache::{Cache, CacheConfig, Key, Lookup};
use crate::dispatcher::{Arguments, Dispatcher, ToolCall, ToolOutput};
use crate::error::{CancelReason, DispatchError, LimitScope};
use crate::event::{Event, Status, Timestamp, ToolCompleted, ToolExecuting};
use crate::health::{BlockingJobs, Health, HealthStatus};
use crate::limits::{Limits, UserLimitResolver, UserLimits, Users, acquire_until};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::policy::{Decision, Policy, PolicyError, PolicyRequest, ScopePolicy};
use crate::redact::Redaction;
use crate::registry::{Entry, Registry, to_json};
use crate::sink::{EventSink, RecordingSink, SinkError, TrySendError};
use crate::state::{NoSink, NoUser, WithUser};
use crate::tool::{Tool, ToolContext, ToolError, tool_fn};
use crate::user::UserContext;

/// Default tool timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on waiting for room in a full event queue.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on JSON-text arguments.
pub const DEFAULT_MAX_ARGUMENT_BYTES: usize = 1 << 20;

pub(crate) struct Config {
    pub(crate) default_timeout: Duration,
    pub(crate) delivery_timeout: Duration,
    pub(crate) max_argument_bytes: usize,
    pub(crate) redaction: Redaction,
    pub(crate) limits: Limits,
}

/// Everything an engine shares between requests.
pub(crate) struct Shared {
    pub(crate) registry: Registry,
    pub(crate) config: Config,
    policy: Option<Arc<dyn Policy>>,
    pub(crate) users: Users,
    global: Semaphore,
    cache: Cache,
    pub(crate) metrics: Metrics,
    pub(crate) blocking: BlockingJobs,
    root: CancellationToken,
    accepting: AtomicBool,
    idle: Notify,
    probe: Arc<Entry>,
    id_prefix: u32,
    next_id: AtomicU64,
}

/// The shared half: registry, policy, limits, cache, supervisor and metrics.
///
/// Cheap to clone (one `Arc`). Build it once at start-up, then take one
/// [`Dispatcher`] per request with [`dispatcher`](Engine::dispatcher).
#[derive(Clone)]
pub struct Engine {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("registry", &self.shared.registry)
            .field("active", &self.shared.metrics.active())
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

    /// Replaces the default [`ScopePolicy`].
    pub fn policy(mut self, policy: impl Policy) -> Self {
        self.policy = Some(Arc::new(policy));
        self
    }

    /// How event payloads are redacted and truncated.
    pub fn redaction(mut self, r: Redaction) -> Self {
        self.config.redaction = r;
        self
    }

    /// How long a call waits for room in a full event queue (default 5 s).
    pub fn delivery_timeout(mut self, d: Duration) -> Self {
        self.config.delivery_timeout = d;
        self
    }

    /// Largest JSON-text arguments accepted (default 1 MiB).
    pub fn max_argument_bytes(mut self, n: usize) -> Self {
        self.config.max_argument_bytes = n;
        self
    }

    /// Result cache bounds.
    pub fn cache(mut self, c: CacheConfig) -> Self {
        self.cache = c;
        self
    }

    /// Builds the engine.
    pub fn build(self) -> Engine {
        let epoch = Instant::now();
        let tools = self.registry.len();
        let hasher = std::hash::RandomState::new();
        Engine {
            shared: Arc::new(Shared {
                global: Semaphore::new(self.config.limits.global),
                users: Users::new(epoch),
                registry: self.registry,
                config: self.config,
                policy: self.policy,
                cache: Cache::new(self.cache),
                metrics: Metrics::new(tools),
                blocking: BlockingJobs::default(),
                root: CancellationToken::new(),
                accepting: AtomicBool::new(true),
                idle: Notify::new(),
                probe: probe_entry(),
                id_prefix: std::hash::BuildHasher::hash_one(&hasher, epoch) as u32,
                next_id: AtomicU64::new(1),
            }),
        }
    }
}

const PROBE: &str = "health_probe";

fn probe_entry() -> Arc<Entry> {
    let probe = tool_fn(PROBE, "Health probe.", |n: u64, _cx| async move {
        Ok::<_, ToolError>(n)
    });
    let registry = Registry::builder().tool(probe).build();
    let entry = registry
        .ok()
        .and_then(|r| r.entries().first().cloned())
        .and_then(|e| Arc::try_unwrap(e).ok());
    match entry {
        Some(mut e) => {
            e.index = crate::metrics::PROBE_INDEX; // not counted as a call
            Arc::new(e)
        }
        None => unreachable!("the probe tool is valid"),
    }
}

/// What [`Engine::shutdown`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Calls in flight when shutdown began.
    pub in_flight: usize,
    /// Of those, calls that ended by themselves within the grace period.
    pub completed: u64,
    /// Calls that ended cancelled.
    pub cancelled: u64,
    /// Users who had calls in flight.
    pub affected_users: Vec<String>,
    /// Per affected user.
    pub per_user: BTreeMap<String, UserShutdown>,
}

/// One user's part of a [`ShutdownReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct UserShutdown {
    /// Calls that ended by themselves.
    pub completed: u64,
    /// Calls that were cancelled.
    pub cancelled: u64,
}

impl Engine {
    /// Starts an engine over `registry` with default limits (10 per user, 100 global,
    /// 100 calls per minute per user), a 30 s timeout and the [`ScopePolicy`].
    pub fn builder(registry: Registry) -> EngineBuilder {
        EngineBuilder {
            registry,
            config: Config {
                default_timeout: DEFAULT_TIMEOUT,
                delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
                max_argument_bytes: DEFAULT_MAX_ARGUMENT_BYTES,
                redaction: Redaction::default(),
                limits: Limits::default(),
            },
            policy: None,
            cache: CacheConfig::default(),
        }
    }

    /// A new dispatcher with neither sink nor user; set both before dispatching.
    pub fn dispatcher(&self) -> Dispatcher<NoSink, NoUser> {
        Dispatcher::new(Arc::clone(&self.shared))
    }

    /// The tools.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// Calls in flight.
    pub fn active(&self) -> usize {
        self.shared.metrics.active()
    }

    /// A copy of the counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        let s = &self.shared;
        let users = s.users.all();
        let mut m = s
            .metrics
            .snapshot(s.registry.names(), &users, s.users.len());
        m.cache_entries = s.cache.len();
        m
    }

    /// Forgets idle users (no dispatcher, no call in flight, rate bucket full) and
    /// returns how many are still tracked. This also happens by itself as users come
    /// and go.
    pub fn sweep_idle_users(&self) -> usize {
        self.shared.users.sweep()
    }

    /// Cancels every in-flight call of `user_id` (their events say `cancelled`) and
    /// returns how many there were. Other users are untouched; later calls of this
    /// user run normally.
    pub fn cancel_user(&self, user_id: &str) -> usize {
        let Some(state) = self.shared.users.get(user_id) else {
            return 0;
        };
        let n = state.active.load(Relaxed);
        state.cancel(self.shared.root.child_token());
        n
    }

    /// Stops accepting calls (new ones end with [`DispatchError::ShuttingDown`], with
    /// their paired events), waits up to `grace` for calls in flight, cancels the rest,
    /// and reports what happened.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let s = &self.shared;
        s.accepting.store(false, Relaxed);
        let in_flight = s.metrics.active();
        let users: Vec<_> = s
            .users
            .all()
            .into_iter()
            .filter(|u| u.active.load(Relaxed) > 0)
            .map(|u| {
                let before = (u.finished.load(Relaxed), u.cancelled.load(Relaxed));
                (u, before)
            })
            .collect();
        let deadline = crate::limits::deadline(Instant::now(), grace);
        if !self.wait_idle(Some(deadline)).await {
            s.root.cancel();
            // Cancelled calls end at their next await; a custom policy or a full sink
            // can hold one for at most the delivery timeout.
            let bound = Instant::now() + s.config.delivery_timeout + Duration::from_secs(1);
            self.wait_idle(Some(bound)).await;
        }
        let mut report = ShutdownReport {
            in_flight,
            completed: 0,
            cancelled: 0,
            affected_users: Vec::new(),
            per_user: BTreeMap::new(),
        };
        for (u, (finished, cancelled)) in users {
            let c = u.cancelled.load(Relaxed) - cancelled;
            let done = u.finished.load(Relaxed) - finished - c;
            report.completed += done;
            report.cancelled += c;
            report.affected_users.push(u.user_id.to_string());
            report.per_user.insert(
                u.user_id.to_string(),
                UserShutdown {
                    completed: done,
                    cancelled: c,
                },
            );
        }
        report.affected_users.sort();
        report
    }

    /// Waits until no call is in flight; `false` if `deadline` came first.
    async fn wait_idle(&self, deadline: Option<Instant>) -> bool {
        loop {
            let notified = self.shared.idle.notified();
            if self.shared.metrics.active() == 0 {
                return true;
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, notified).await.is_err() {
                        return self.shared.metrics.active() == 0;
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Runs a probe call through the whole pipeline (policy, limits, events, timeout)
    /// with a throwaway sink, and reports on the engine.
    pub async fn health(&self) -> Health {
        let s = &self.shared;
        let now = Instant::now();
        let active_calls = s.metrics.active();
        let stuck_calls = s.blocking.stuck(now);
        let global = s.config.limits.global;
        let in_use = global - s.global.available_permits().min(global);
        let global_saturation = in_use as f64 / global as f64;
        let mut issues = Vec::new();

        let recording = RecordingSink::with_capacity(4);
        let sink: Arc<dyn EventSink> = Arc::new(recording.clone());
        let probe_user = UserContext::builder("tool-dispatch-health-probe").build();
        let (mut processing_verified, mut probe_latency_ms) = (false, None);
        let mut probe_busy = false;
        match probe_user {
            Ok(ctx) if s.accepting.load(Relaxed) => {
                // The probe has its own slot limits and no rate limit, so frequent
                // probing cannot make a healthy engine look rate-limited.
                let unlimited: UserLimitResolver = Arc::new(|_| UserLimits {
                    concurrency: 4,
                    rate: None,
                });
                let ctx = Arc::new(ctx);
                let state = s.users.bind(&ctx, &unlimited, || s.root_child());
                let user = WithUser { ctx, state };
                let started = Instant::now();
                let r = s.run_probe(&sink, &user, now).await;
                match r {
                    Ok(out) => {
                        probe_latency_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                        let events = recording.events();
                        processing_verified = out.value == 7u64
                            && events.len() == 2
                            && events.iter().all(|e| e.call_id() == Some(&*out.call_id));
                        if !processing_verified {
                            issues.push("the probe's events were not delivered as a pair".into());
                        }
                    }
                    Err(e) => {
                        probe_busy = matches!(e, DispatchError::Busy { .. });
                        issues.push(format!("the probe call failed: {e}"));
                    }
                }
            }
            _ => issues.push("the engine is shutting down".into()),
        }
        if global_saturation >= 0.9 {
            issues.push(format!(
                "the global concurrency limit is {:.0}% used",
                global_saturation * 100.0
            ));
        }
        if !stuck_calls.is_empty() {
            issues.push(format!(
                "{} blocking call(s) running past twice their timeout",
                stuck_calls.len()
            ));
        }
        let status = if !processing_verified && !probe_busy {
            HealthStatus::Unhealthy
        } else if issues.is_empty() {
            HealthStatus::Healthy
        } else {
            HealthStatus::Degraded
        };
        Health {
            status,
            issues,
            active_calls,
            stuck_calls,
            global_saturation,
            probe_latency_ms,
            processing_verified,
        }
    }
}

// ---------------------------------------------------------------------------------
// The pipeline.
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing sent yet.
    Fresh,
    /// `tool_executing` delivered.
    Announced,
    /// Counted and completed (or given up on).
    Done,
}

/// One call in flight. Whatever happens to the future that owns it, its `Drop`
/// guarantees the pairing: a call that has not completed is completed as cancelled.
struct Call<'a> {
    shared: &'a Arc<Shared>,
    sink: &'a Arc<dyn EventSink>,
    user: &'a WithUser,
    id: Arc<str>,
    tool: Arc<str>,
    tool_index: Option<usize>,
    sensitive: &'a [String],
    token: Arc<CancellationToken>,
    start: Instant,
    wall: Timestamp,
    phase: Phase,
    /// Whether the call had to wait for a concurrency slot.
    waited: bool,
    span: tracing::Span,
}

fn clone_value(v: &Value) -> Result<Value, ToolError> {
    Ok(v.clone())
}

fn from_json<O: serde::de::DeserializeOwned>(v: &Value) -> Result<O, ToolError> {
    O::deserialize(v).map_err(|e| ToolError::new(format!("cached result does not fit: {e}")))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// `call_{prefix:08x}{n:x}` without the formatting machinery (it is on every call).
fn generated_id(prefix: u32, n: u64) -> Arc<str> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 5 + 8 + 16];
    buf[..5].copy_from_slice(b"call_");
    for (i, b) in buf[5..13].iter_mut().enumerate() {
        *b = HEX[((prefix >> (28 - 4 * i)) & 0xf) as usize];
    }
    let digits = (64 - n.leading_zeros() as usize).div_ceil(4).max(1);
    for (i, b) in buf[13..13 + digits].iter_mut().enumerate() {
        *b = HEX[((n >> (4 * (digits - 1 - i))) & 0xf) as usize];
    }
    match std::str::from_utf8(&buf[..13 + digits]) {
        Ok(s) => Arc::from(s),
        Err(_) => Arc::from(format!("call_{prefix:08x}{n:x}")), // unreachable: ASCII
    }
}

/// JSON-text arguments as the events of a call rejected before parsing show them:
/// parsed, so that redaction applies, when they parse.
fn shown_text(t: &str, max_bytes: usize) -> Value {
    if t.len() <= max_bytes
        && let Ok(v) = serde_json::from_str::<Value>(t)
    {
        return v;
    }
    hidden_text(t)
}

/// Arguments that cannot be redacted (not JSON, or too large to parse) are not
/// shown in events: a secret in them could not be found.
fn hidden_text(t: &str) -> Value {
    Value::String(format!(
        "[{} bytes of unparsed arguments, not shown]",
        t.len()
    ))
}

fn cut(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

impl Shared {
    /// Delivers at once if there is room, else waits up to the delivery timeout.
    pub(crate) async fn deliver(
        &self,
        sink: &Arc<dyn EventSink>,
        event: Event,
    ) -> Result<(), SinkError> {
        match sink.try_send(event) {
            Ok(()) => Ok(()),
            Err(TrySendError::Closed(_)) => Err(SinkError::Closed),
            Err(TrySendError::Full(event)) => self.wait_send(sink, event).await,
        }
    }

    /// Waits for room, up to the delivery timeout.
    async fn wait_send(&self, sink: &Arc<dyn EventSink>, event: Event) -> Result<(), SinkError> {
        let d = self.config.delivery_timeout;
        tokio::time::timeout(d, sink.send(event))
            .await
            .unwrap_or(Err(SinkError::TimedOut(d)))
    }

    /// Events that cannot wait where they are (a dropped call, a full queue): a task
    /// delivers them in order within the delivery timeout. A hand-off that does not
    /// get through (no runtime, closed, still full) counts one sink failure.
    fn hand_off(self: &Arc<Self>, sink: &Arc<dyn EventSink>, events: Vec<Event>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.metrics.sink_failure();
            tracing::warn!("events dropped: no runtime to deliver them on");
            return;
        };
        let (sink, shared) = (Arc::clone(sink), Arc::clone(self));
        rt.spawn(async move {
            for ev in events {
                if shared.wait_send(&sink, ev).await.is_err() {
                    shared.metrics.sink_failure();
                    return;
                }
            }
        });
    }

    pub(crate) fn root_child(&self) -> CancellationToken {
        self.root.child_token()
    }

    fn call_id(&self, given: Option<String>) -> Arc<str> {
        match given {
            Some(id) if !id.trim().is_empty() && id.len() <= 256 => Arc::from(id),
            _ => {
                let n = self.next_id.fetch_add(1, Relaxed);
                generated_id(self.id_prefix, n)
            }
        }
    }

    fn span(&self, id: &str, tool: &str, user: &str) -> tracing::Span {
        tracing::info_span!(
            "execute_tool",
            gen_ai.operation.name = "execute_tool",
            gen_ai.tool.name = tool,
            gen_ai.tool.call.id = id,
            user_id = user,
            status = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        )
    }

    fn timeout_for(&self, entry: &Entry, given: Option<Duration>) -> Duration {
        given
            .or(entry.settings.timeout)
            .unwrap_or(self.config.default_timeout)
    }

    /// Dispatch by name with JSON arguments.
    pub(crate) async fn dispatch_json(
        self: &Arc<Self>,
        sink: &Arc<dyn EventSink>,
        user: &WithUser,
        call: ToolCall,
    ) -> Result<ToolOutput, DispatchError> {
        let ToolCall {
            id,
            name,
            arguments,
            timeout,
        } = call;
        let entry = self.registry.get(&name);
        let tool: Arc<str> = match entry {
            Some(e) => e.name.clone(),
            None => Arc::from(cut(&name, 128)),
        };
        let id = self.call_id(id);
        let span = self.span(&id, &tool, &user.ctx.user_id);
        let mut c = Call::new(self, sink, user, id, tool, span.clone());
        async move {
            // What the events show when the call is rejected before parsing; built
            // only on those paths, so a good call does not copy its arguments.
            let raw = |a: &Arguments| match a {
                Arguments::Value(v) => v.clone(),
                Arguments::Text(t) => shown_text(t, self.config.max_argument_bytes),
            };
            if !self.accepting.load(Relaxed) {
                return Err(c.reject(raw(&arguments), DispatchError::ShuttingDown).await);
            }
            let Some(entry) = entry else {
                let err = DispatchError::UnknownTool {
                    name: cut(&name, 128),
                };
                return Err(c.reject(raw(&arguments), err).await);
            };
            c.tool_index = Some(entry.index);
            c.sensitive = &entry.settings.sensitive;
            let invalid = |path: &str, message: String| DispatchError::InvalidInput {
                tool: entry.name.to_string(),
                path: path.to_owned(),
                message,
            };
            let args = match arguments {
                Arguments::Value(v) => v,
                Arguments::Text(t) if t.len() > self.config.max_argument_bytes => {
                    let msg = format!(
                        "arguments are {} bytes; at most {} are accepted",
                        t.len(),
                        self.config.max_argument_bytes
                    );
                    return Err(c.reject(hidden_text(&t), invalid(".", msg)).await);
                }
                Arguments::Text(t) => match serde_json::from_str::<Value>(&t) {
                    Ok(v) => v,
                    Err(e) => {
                        let msg = format!("arguments are not valid JSON: {e}");
                        return Err(c.reject(hidden_text(&t), invalid(".", msg)).await);
                    }
                },
            };
            let timeout = self.timeout_for(entry, timeout);
            let cx = c.context(entry, timeout);
            let fut = match entry.invoker.invoke(&args, cx) {
                Ok(f) => f,
                Err(e) => return Err(c.reject(args, invalid(&e.path, e.message)).await),
            };
            c.execute(entry, args, timeout, fut, clone_value, clone_value)
                .await
        }
        .instrument(span)
        .await
    }

    /// Typed dispatch: no JSON round trip for the input.
    pub(crate) async fn dispatch_typed<T: Tool>(
        self: &Arc<Self>,
        sink: &Arc<dyn EventSink>,
        user: &WithUser,
        input: T::Input,
        id: Option<String>,
        timeout: Option<Duration>,
    ) -> Result<ToolOutput<T::Output>, DispatchError> {
        let found = self.registry.typed::<T>();
        let tool: Arc<str> = match found {
            Some((e, _)) => e.name.clone(),
            None => Arc::from(T::NAME),
        };
        let id = self.call_id(id);
        let span = self.span(&id, &tool, &user.ctx.user_id);
        let mut c = Call::new(self, sink, user, id, tool, span.clone());
        async move {
            // The event shows the arguments; this is the one serialization a typed
            // call pays for.
            let args = serde_json::to_value(&input).unwrap_or(Value::Null);
            if !self.accepting.load(Relaxed) {
                return Err(c.reject(args, DispatchError::ShuttingDown).await);
            }
            let Some((entry, tool)) = found else {
                let name = T::NAME.to_owned();
                return Err(c.reject(args, DispatchError::UnknownTool { name }).await);
            };
            c.tool_index = Some(entry.index);
            c.sensitive = &entry.settings.sensitive;
            let timeout = self.timeout_for(entry, timeout);
            let cx = c.context(entry, timeout);
            // Called when first polled, so nothing of the tool runs before the policy,
            // the limits and `tool_executing`, or outside panic isolation.
            let fut = async move { tool.call(input, cx).await };
            c.execute(entry, args, timeout, fut, to_json, from_json)
                .await
        }
        .instrument(span)
        .await
    }

    async fn run_probe(
        self: &Arc<Self>,
        sink: &Arc<dyn EventSink>,
        user: &WithUser,
        now: Instant,
    ) -> Result<ToolOutput, DispatchError> {
        let entry = &self.probe;
        let id = self.call_id(None);
        let mut c = Call::new(
            self,
            sink,
            user,
            id,
            entry.name.clone(),
            tracing::Span::none(),
        );
        c.tool_index = Some(crate::metrics::PROBE_INDEX); // not counted in the totals
        let args = Value::from(7u64);
        let timeout = Duration::from_secs(5);
        let fut = match entry.invoker.invoke(&args, c.context(entry, timeout)) {
            Ok(f) => f,
            Err(e) => {
                return Err(DispatchError::ToolFailed {
                    tool: PROBE.into(),
                    message: e.message,
                    retryable: false,
                });
            }
        };
        // The probe must not queue behind real work: it takes a slot now or reports.
        c.execute_with_wait(entry, args, timeout, fut, clone_value, clone_value, now)
            .await
    }
}

impl<'a> Call<'a> {
    fn new(
        shared: &'a Arc<Shared>,
        sink: &'a Arc<dyn EventSink>,
        user: &'a WithUser,
        id: Arc<str>,
        tool: Arc<str>,
        span: tracing::Span,
    ) -> Self {
        shared.metrics.start();
        user.state.active.fetch_add(1, Relaxed);
        Call {
            shared,
            sink,
            user,
            id,
            tool,
            tool_index: None,
            sensitive: &[],
            token: user.state.token(),
            start: Instant::now(),
            wall: Timestamp::now(),
            phase: Phase::Fresh,
            waited: false,
            span,
        }
    }

    fn context(&self, entry: &Entry, timeout: Duration) -> ToolContext {
        ToolContext {
            user: Arc::clone(&self.user.ctx),
            sink: Arc::clone(self.sink),
            call_id: Arc::clone(&self.id),
            tool_name: Arc::clone(&entry.name),
            cancel: Arc::clone(&self.token),
            shared: Arc::clone(self.shared),
            timeout,
        }
    }

    fn executing(&self, mut parameters: Value) -> Event {
        self.shared
            .config
            .redaction
            .apply(&mut parameters, self.sensitive);
        let u = &self.user.ctx;
        Event::ToolExecuting(ToolExecuting {
            call_id: Arc::clone(&self.id),
            run_id: u.run_id.clone(),
            thread_id: u.thread_id.clone(),
            user_id: Arc::clone(&u.user_id),
            tool_name: Arc::clone(&self.tool),
            parameters,
            timestamp: self.wall,
        })
    }

    fn completed(
        &self,
        status: Status,
        result: Value,
        error: Option<String>,
        cached: bool,
        took: Duration,
    ) -> Event {
        let u = &self.user.ctx;
        Event::ToolCompleted(ToolCompleted {
            call_id: Arc::clone(&self.id),
            run_id: u.run_id.clone(),
            thread_id: u.thread_id.clone(),
            user_id: Arc::clone(&u.user_id),
            tool_name: Arc::clone(&self.tool),
            status,
            duration_ms: took.as_secs_f64() * 1e3,
            result,
            error,
            cached,
            timestamp: self.wall.after(took),
        })
    }

    /// Delivers at once if there is room, else waits up to the delivery timeout.
    async fn deliver(&self, event: Event) -> Result<(), SinkError> {
        self.shared.deliver(self.sink, event).await
    }

    fn sink_failed(&self, what: &str, e: &SinkError) {
        self.shared.metrics.sink_failure();
        tracing::warn!(
            call_id = %self.id,
            user_id = %self.user.ctx.user_id,
            tool = %self.tool,
            error = %e,
            "{what} could not be delivered"
        );
    }

    /// Counts the ended call once.
    fn record(&mut self, status: Status, took: Duration) {
        if self.phase == Phase::Done {
            return;
        }
        self.phase = Phase::Done;
        let s = &self.user.state;
        if status != Status::Unavailable {
            s.finished.fetch_add(1, Relaxed);
        }
        if status != Status::Success {
            s.failed.fetch_add(1, Relaxed);
        }
        if status == Status::Cancelled {
            s.cancelled.fetch_add(1, Relaxed);
        }
        s.active.fetch_sub(1, Relaxed);
        let left = self.shared.metrics.end(status, self.tool_index, took);
        if left == 0 && !self.shared.accepting.load(Relaxed) {
            self.shared.idle.notify_waiters();
        }
        if !self.span.is_disabled() {
            self.span.record("status", status.as_str());
            self.span.record("duration_ms", took.as_secs_f64() * 1e3);
        }
    }

    /// Sends `tool_executing`. If it cannot be delivered the tool must not run.
    async fn announce(&mut self, parameters: Value) -> Result<(), SinkError> {
        let ev = self.executing(parameters);
        match self.deliver(ev).await {
            Ok(()) => {
                self.phase = Phase::Announced;
                Ok(())
            }
            Err(e) => {
                self.sink_failed("tool_executing", &e);
                Err(e)
            }
        }
    }

    /// Sends `tool_completed` (counting first, so a slow sink cannot skew metrics).
    async fn complete(
        &mut self,
        status: Status,
        result: Value,
        error: Option<String>,
        cached: bool,
    ) {
        let took = self.start.elapsed();
        self.record(status, took);
        let ev = self.completed(status, result, error, cached, took);
        let r = match self.sink.try_send(ev) {
            Ok(()) => Ok(()),
            Err(TrySendError::Closed(_)) => Err(SinkError::Closed),
            Err(TrySendError::Full(ev)) => {
                // The call is already counted, so `Drop` will not complete it: if the
                // caller drops this future while it waits for room, the guard hands
                // a copy of the event to a task, and the pair still completes.
                let mut unsent = Unsent {
                    sink: self.sink,
                    shared: self.shared,
                    event: Some(ev.clone()),
                };
                let r = self.shared.wait_send(self.sink, ev).await;
                unsent.event = None;
                r
            }
        };
        if let Err(e) = r {
            self.sink_failed("tool_completed", &e);
        }
    }

    /// Ends a call that will not run: both events, the error's status.
    async fn reject(&mut self, parameters: Value, err: DispatchError) -> DispatchError {
        if self.announce(parameters).await.is_err() {
            let took = self.start.elapsed();
            self.record(err.status(), took);
            return err;
        }
        self.complete(err.status(), Value::Null, Some(err.to_string()), false)
            .await;
        err
    }

    async fn slot<'s>(
        &mut self,
        sem: &'s Semaphore,
        scope: LimitScope,
        until: Instant,
    ) -> Result<SemaphorePermit<'s>, DispatchError> {
        if let Ok(p) = sem.try_acquire() {
            return Ok(p);
        }
        self.waited = true;
        tokio::select! {
            biased;
            _ = self.token.cancelled() => Err(self.cancelled()),
            p = acquire_until(sem, until) => p.ok_or_else(|| DispatchError::Busy {
                scope,
                waited: self.start.elapsed(),
            }),
        }
    }

    fn cancelled(&self) -> DispatchError {
        let reason = if self.shared.root.is_cancelled() {
            CancelReason::Shutdown
        } else {
            CancelReason::User
        };
        DispatchError::Cancelled { reason }
    }

    async fn execute<O, F>(
        &mut self,
        entry: &'a Entry,
        args: Value,
        timeout: Duration,
        fut: F,
        to_value: fn(&O) -> Result<Value, ToolError>,
        from_value: fn(&Value) -> Result<O, ToolError>,
    ) -> Result<ToolOutput<O>, DispatchError>
    where
        F: Future<Output = Result<O, ToolError>> + Send,
    {
        let until = crate::limits::deadline(self.start, self.shared.config.limits.max_wait);
        self.execute_with_wait(entry, args, timeout, fut, to_value, from_value, until)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute_with_wait<O, F>(
        &mut self,
        entry: &'a Entry,
        args: Value,
        timeout: Duration,
        fut: F,
        to_value: fn(&O) -> Result<Value, ToolError>,
        from_value: fn(&Value) -> Result<O, ToolError>,
        wait_until: Instant,
    ) -> Result<ToolOutput<O>, DispatchError>
    where
        F: Future<Output = Result<O, ToolError>> + Send,
    {
        let shared = self.shared;
        // Permission: fails closed.
        let req = PolicyRequest {
            user: &self.user.ctx,
            tool: &entry.def,
            settings: &entry.settings,
            arguments: &args,
        };
        let decision = match &shared.policy {
            None => Ok(ScopePolicy::decide(&req)),
            Some(p) => match std::panic::catch_unwind(AssertUnwindSafe(|| p.check(req))) {
                Ok(f) => AssertUnwindSafe(f)
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| Err(PolicyError("the policy panicked".into()))),
                Err(_) => Err(PolicyError("the policy panicked".into())),
            },
        };
        let denial = match decision {
            Ok(Decision::Allow) => None,
            Ok(Decision::Deny {
                missing_scopes,
                reason,
            }) => Some((missing_scopes, reason)),
            Err(e) => {
                tracing::warn!(call_id = %self.id, error = %e, "policy error; call denied");
                Some((Vec::new(), Some("permission check failed".to_owned())))
            }
        };
        if let Some((missing_scopes, reason)) = denial {
            let err = DispatchError::PermissionDenied {
                tool: entry.name.to_string(),
                missing_scopes,
                reason,
            };
            return Err(self.reject(args, err).await);
        }
        // Rate.
        if let Some(g) = &self.user.state.rate
            && let Err(retry_after) = g.check(shared.users.now_ns(self.start))
        {
            return Err(self
                .reject(args, DispatchError::RateLimited { retry_after })
                .await);
        }
        // Concurrency: the user's own slots first, so one user's burst never holds
        // global slots while it waits for its own.
        // A free slot is taken at once; the waiting future is built only when needed.
        let user: &'a WithUser = self.user;
        let _user_slot = match user.state.slots.try_acquire() {
            Ok(p) => p,
            Err(_) => match self
                .slot(&user.state.slots, LimitScope::User, wait_until)
                .await
            {
                Ok(p) => p,
                Err(e) => return Err(self.reject(args, e).await),
            },
        };
        let _tool_slot = match &entry.limiter {
            Some(sem) => match sem.try_acquire() {
                Ok(p) => Some(p),
                Err(_) => match self.slot(sem, LimitScope::Tool, wait_until).await {
                    Ok(p) => Some(p),
                    Err(e) => return Err(self.reject(args, e).await),
                },
            },
            None => None,
        };
        let _global_slot = match shared.global.try_acquire() {
            Ok(p) => p,
            Err(_) => match self
                .slot(&shared.global, LimitScope::Global, wait_until)
                .await
            {
                Ok(p) => p,
                Err(e) => return Err(self.reject(args, e).await),
            },
        };
        // Cache.
        let lookup = entry.settings.cache_ttl.and_then(|ttl| {
            let user =
                (!entry.settings.user_independent).then(|| Arc::clone(&self.user.ctx.user_id));
            Key::new(user, entry.index, &args).map(|k| (shared.cache.lookup(k, self.start), ttl))
        });
        if let Err(e) = self.announce(args).await {
            let took = self.start.elapsed();
            self.record(Status::Undelivered, took);
            return Err(DispatchError::Sink(e));
        }
        let (leader, outcome) = match lookup {
            Some((Lookup::Hit(v), _)) => (None, Ok(Ran::Cached(v))),
            Some((Lookup::Wait(rx, key), ttl)) => {
                // An identical call is running: share its result (single flight). If
                // it ends without one, one of the waiting calls takes over as leader.
                let cache = &shared.cache;
                let run = async move {
                    match cache.follow(rx, key).await {
                        Ok(v) => Ok(Ran::Cached(v)),
                        Err(l) => {
                            let o = fut.await?;
                            if let Ok(json) = to_value(&o) {
                                l.complete(json, ttl, Instant::now());
                            }
                            Ok(Ran::Fresh(o))
                        }
                    }
                };
                (None, self.run(entry, timeout, run).await)
            }
            Some((Lookup::Lead(l), ttl)) => {
                let r = self
                    .run(entry, timeout, async move { fut.await.map(Ran::Fresh) })
                    .await;
                (Some((l, ttl)), r)
            }
            None => {
                let r = self
                    .run(entry, timeout, async move { fut.await.map(Ran::Fresh) })
                    .await;
                (None, r)
            }
        };
        let redaction = &shared.config.redaction;
        match outcome {
            Ok(Ran::Fresh(o)) => {
                if entry.settings.cache_ttl.is_some() {
                    shared.metrics.cache(false);
                }
                let json = to_value(&o);
                if let (Some((l, ttl)), Ok(json)) = (leader, &json) {
                    l.complete(json.clone(), ttl, Instant::now());
                }
                let mut json = json.unwrap_or(Value::Null);
                redaction.apply(&mut json, &entry.settings.sensitive);
                self.complete(Status::Success, json, None, false).await;
                Ok(ToolOutput {
                    call_id: Arc::clone(&self.id),
                    value: o,
                    cached: false,
                })
            }
            Ok(Ran::Cached(v)) => {
                shared.metrics.cache(true);
                match from_value(&v) {
                    Ok(o) => {
                        let mut json = Value::clone(&v);
                        redaction.apply(&mut json, &entry.settings.sensitive);
                        self.complete(Status::Success, json, None, true).await;
                        Ok(ToolOutput {
                            call_id: Arc::clone(&self.id),
                            value: o,
                            cached: true,
                        })
                    }
                    Err(e) => {
                        let err = DispatchError::ToolFailed {
                            tool: entry.name.to_string(),
                            message: e.message().to_owned(),
                            retryable: false,
                        };
                        self.complete(err.status(), Value::Null, Some(err.to_string()), false)
                            .await;
                        Err(err)
                    }
                }
            }
            Err(err) => {
                self.complete(err.status(), Value::Null, Some(err.to_string()), false)
                    .await;
                Err(err)
            }
        }
    }

    /// Runs the body under its timeout, with panic isolation and cancellation.
    async fn run<O>(
        &self,
        entry: &Entry,
        timeout: Duration,
        body: impl Future<Output = Result<Ran<O>, ToolError>>,
    ) -> Result<Ran<O>, DispatchError> {
        let deadline = crate::limits::deadline(self.start, timeout);
        // The timeout counts from dispatch: a call that spent it waiting for a slot
        // must not start its body at all.
        if self.waited && Instant::now() >= deadline {
            return Err(DispatchError::Timeout {
                tool: entry.name.to_string(),
                after: timeout,
            });
        }
        // Cancellation is checked before the body starts, and before every later
        // poll of it, as a biased select would; but the cancellation waiter is only
        // registered when the body does not finish in its first poll, which spares
        // a ready tool two lock round trips.
        if self.token.is_cancelled() {
            return Err(self.cancelled());
        }
        let body = tokio::time::timeout_at(deadline, AssertUnwindSafe(body).catch_unwind());
        let mut body = std::pin::pin!(body);
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(body.as_mut().poll(cx))).await;
        let r = match first {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => tokio::select! {
                biased;
                _ = self.token.cancelled() => return Err(self.cancelled()),
                r = &mut body => r,
            },
        };
        match r {
            Err(_) => Err(DispatchError::Timeout {
                tool: entry.name.to_string(),
                after: timeout,
            }),
            Ok(Err(panic)) => {
                let detail = panic_message(&*panic);
                tracing::error!(call_id = %self.id, tool = %entry.name, panic = %detail, "tool panicked");
                Err(DispatchError::Panicked {
                    tool: entry.name.to_string(),
                    detail,
                })
            }
            Ok(Ok(Err(e))) => Err(DispatchError::ToolFailed {
                tool: entry.name.to_string(),
                retryable: e.is_retryable(),
                message: e.message().to_owned(),
            }),
            Ok(Ok(Ok(ran))) => Ok(ran),
        }
    }
}

/// How a body produced its result.
enum Ran<O> {
    Fresh(O),
    Cached(Arc<Value>),
}

/// A `tool_completed` waiting for room in a full queue; delivered by a task if the
/// waiting future is dropped.
struct Unsent<'a> {
    sink: &'a Arc<dyn EventSink>,
    shared: &'a Arc<Shared>,
    event: Option<Event>,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if let Some(ev) = self.event.take() {
            self.shared.hand_off(self.sink, vec![ev]);
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if self.phase == Phase::Done {
            return;
        }
        // The caller dropped the future: complete the pair as cancelled, without
        // waiting (a full queue hands the events to a task that may wait).
        let announced = self.phase == Phase::Announced;
        let took = self.start.elapsed();
        self.record(Status::Cancelled, took);
        let err = DispatchError::Cancelled {
            reason: CancelReason::Dropped,
        };
        let mut events = Vec::with_capacity(2);
        if !announced {
            events.push(self.executing(Value::Null));
        }
        events.push(self.completed(
            Status::Cancelled,
            Value::Null,
            Some(err.to_string()),
            false,
            took,
        ));
        let mut pending = events.into_iter();
        while let Some(ev) = pending.next() {
            match self.sink.try_send(ev) {
                Ok(()) => {}
                Err(TrySendError::Closed(_)) => {
                    self.sink_failed("tool_completed", &SinkError::Closed);
                    return;
                }
                Err(TrySendError::Full(ev)) => {
                    let rest: Vec<Event> = std::iter::once(ev).chain(pending).collect();
                    self.shared.hand_off(self.sink, rest);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_ids_match_the_formatted_form() {
        let cases = [
            (0u32, 0u64),
            (0xdead_beef, 1),
            (1, 0xf),
            (0x10, 0x10),
            (u32::MAX, u64::MAX),
        ];
        for (p, n) in cases {
            assert_eq!(&*super::generated_id(p, n), format!("call_{p:08x}{n:x}"));
        }
    }
}
