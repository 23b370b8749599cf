//! The call core. Every call, by name, typed, in a batch or the health probe, goes
//! through [`InFlight::execute`] in this order:
//!
//! 1. **prepare** (synchronous): shutting down? known tool? unique id? arguments
//!    within size and depth, and of the tool's input type?
//! 2. **admit**: policy, rate, one of the user's own slots;
//! 3. **announce**: `tool_executing` reaches the user's sink (or the tool never runs);
//! 4. the **shared slots** (per tool, global), then the **cache**;
//! 5. **run**: the body under the call's deadline and cancellation, panics contained;
//! 6. **finish**: the shared slots are released, the cache is filled, then
//!    `tool_completed` is delivered.
//!
//! A refused call ends in one place ([`InFlight::refuse`]). Every wait (policy, slot,
//! sink, cache follower, body) watches the call's deadline and cancellation. No shared
//! slot is held while a call waits on its user's sink: one user's stuck socket can only
//! hold that user's own slots. Whatever happens to the future, `Drop` completes the pair.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Inner;
use crate::cache::{Key, Lookup};
use crate::contain::{Contained, panic_message};
use crate::delivery::{Delivered, NotSent, Outbox, Role, Watch};
use crate::dispatcher::{Arguments, ToolCall, ToolOutput};
use crate::error::{CancelReason, DispatchError, LimitScope};
use crate::event::{Event, Status, Timestamp, ToolCompleted, ToolExecuting};
use crate::json::{self, NotJson, cut, drop_deep, exceeds_depth};
use crate::limits::{Permit, Scope};
use crate::policy::{Decision, PolicyError, PolicyRequest, ScopePolicy};
use crate::registry::{Entry, InputError};
use crate::state::WithUser;
use crate::tool::{CallScope, Tool, ToolContext, ToolError};
use crate::user::MAX_ID_LEN;

/// Longest unknown tool name repeated in events and errors.
const MAX_NAME_SHOWN: usize = 128;

/// How a call is admitted.
#[derive(Clone, Copy)]
pub(super) struct Admission {
    /// Whether the call counts in the metrics' totals.
    counted: bool,
    /// Whether it may wait for a slot (up to the engine's `max_wait`).
    may_wait: bool,
}

impl Admission {
    /// Every call made through a dispatcher.
    pub(super) const CALL: Admission = Admission {
        counted: true,
        may_wait: true,
    };
    /// The health probe: not counted, takes a slot now or reports busy.
    pub(super) const PROBE: Admission = Admission {
        counted: false,
        may_wait: false,
    };
}

/// How results travel: by name as JSON ([`Json`]), or typed ([`Typed`]).
pub(super) trait Codec {
    type Out: Send + 'static;
    /// The result as JSON, for its event and the cache.
    fn json(out: &Self::Out, max_depth: usize) -> Result<Value, NotJson>;
    /// Whether `json` comes back as the same kind of result (else it is not cached).
    fn round_trips(json: &Value) -> bool;
    /// A cached result in this codec's type; `None` when it does not fit.
    fn decode(cached: &Value) -> Option<Self::Out>;
}

pub(super) struct Json;

impl Codec for Json {
    type Out = Value;
    fn json(out: &Value, _: usize) -> Result<Value, NotJson> {
        Ok(out.clone()) // already bounded: made by `json::to_value`
    }
    fn round_trips(_: &Value) -> bool {
        true
    }
    fn decode(cached: &Value) -> Option<Value> {
        Some(cached.clone())
    }
}

pub(super) struct Typed<O>(PhantomData<fn() -> O>);

impl<O: Serialize + DeserializeOwned + Send + 'static> Codec for Typed<O> {
    type Out = O;
    fn json(out: &O, max_depth: usize) -> Result<Value, NotJson> {
        json::to_value(out, max_depth)
    }
    fn round_trips(json: &Value) -> bool {
        O::deserialize(json).is_ok()
    }
    fn decode(cached: &Value) -> Option<O> {
        O::deserialize(cached).ok()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Nothing sent yet.
    Fresh,
    /// `tool_executing` delivered.
    Announced,
    /// `tool_executing` queued in the backlog, not confirmed.
    HandedOff,
    /// Counted; its completion sent or handed off.
    Done,
}

/// A call that passed the synchronous checks: its tool, its arguments as the policy
/// and the events see them, and its body (not started).
struct Prepared<'a, F> {
    entry: &'a Entry,
    args: Value,
    body: F,
}

/// A call refused before it runs: the error, and the arguments its events show.
struct Refusal {
    error: DispatchError,
    shown: Value,
}

/// Why `tool_executing` did not go out as confirmed.
enum Unannounced {
    /// It is queued; the call stopped waiting (cancelled or out of time).
    HandedOff,
    /// The call was interrupted before it could even be queued.
    NotQueued,
    /// The sink refused it (counted).
    Failed(crate::sink::SinkError),
}

/// How a call ends, for its `tool_completed`.
enum Ending<'e> {
    Success {
        result: Value,
        source: Source,
        /// Why `result` is `null` although the call succeeded.
        note: Option<String>,
    },
    Failure(&'e DispatchError),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Ran,
    Cache,
}

enum Ran<O> {
    Fresh(O),
    Cached(O, Arc<Value>),
}

/// Arguments after the depth check (a value too deep is already torn down).
enum Args {
    Value(Value),
    Text(String),
    TooDeep,
}

/// What a call is started with.
struct Start<'a> {
    entry: Option<&'a Entry>,
    tool: Arc<str>,
    id: Option<String>,
    timeout: Option<Duration>,
    admission: Admission,
}

/// One call in flight. Whatever happens to the future that owns it, its `Drop`
/// completes the pair (as `cancelled`) if nothing else did.
pub(super) struct InFlight<'a> {
    inner: &'a Arc<Inner>,
    outbox: &'a Arc<Outbox>,
    user: &'a WithUser,
    id: Arc<str>,
    /// A caller-chosen id already used by a call in flight of this user.
    duplicate: Option<String>,
    claimed: bool,
    tool: Arc<str>,
    entry: Option<&'a Entry>,
    admission: Admission,
    token: Arc<CancellationToken>,
    start: Instant,
    timeout: Duration,
    deadline: Instant,
    wall: Timestamp,
    phase: Phase,
    /// `tool_executing` joined the outbox's backlog (so it will go out even if this
    /// call's future is dropped before the outbox answers).
    opening_queued: bool,
    scope: Option<Arc<CallScope>>,
    span: tracing::Span,
}

impl Inner {
    /// Dispatch by name with JSON arguments.
    pub(crate) async fn dispatch_json(
        self: &Arc<Self>,
        outbox: &Arc<Outbox>,
        user: &WithUser,
        call: ToolCall,
    ) -> Result<ToolOutput, DispatchError> {
        let entry = self.registry.get(&call.name).map(|e| &**e);
        self.run_json(outbox, user, entry, call, Admission::CALL)
            .await
    }

    /// A call by name of `entry` (a registered tool, `None` for an unknown name, or
    /// the health probe's).
    pub(super) async fn run_json(
        self: &Arc<Self>,
        outbox: &Arc<Outbox>,
        user: &WithUser,
        entry: Option<&Entry>,
        call: ToolCall,
        admission: Admission,
    ) -> Result<ToolOutput, DispatchError> {
        let ToolCall {
            id,
            name,
            arguments,
            timeout,
        } = call;
        let tool = match entry {
            Some(e) => Arc::clone(&e.name),
            None => Arc::from(name.chars().take(MAX_NAME_SHOWN).collect::<String>()),
        };
        let start = Start {
            entry,
            tool,
            id,
            timeout,
            admission,
        };
        let mut c = InFlight::new(self, outbox, user, start);
        let span = c.span.clone();
        async move {
            match c.prepare_json(arguments) {
                Ok(p) => c.execute::<Json, _>(p).await,
                Err(r) => Err(c.refuse(r).await),
            }
        }
        .instrument(span)
        .await
    }

    /// Typed dispatch: no JSON round trip for the input.
    pub(crate) async fn dispatch_typed<T: Tool>(
        self: &Arc<Self>,
        outbox: &Arc<Outbox>,
        user: &WithUser,
        input: T::Input,
        id: Option<String>,
        timeout: Option<Duration>,
    ) -> Result<ToolOutput<T::Output>, DispatchError> {
        let found = self.registry.typed::<T>();
        let start = Start {
            entry: found.map(|(e, _)| &**e),
            tool: found.map_or_else(|| Arc::from(T::NAME), |(e, _)| Arc::clone(&e.name)),
            id,
            timeout,
            admission: Admission::CALL,
        };
        let mut c = InFlight::new(self, outbox, user, start);
        let span = c.span.clone();
        async move {
            match c.prepare_typed(found.map(|(_, t)| t), input) {
                Ok(p) => c.execute::<Typed<T::Output>, _>(p).await,
                Err(r) => Err(c.refuse(r).await),
            }
        }
        .instrument(span)
        .await
    }

    fn call_id(&self, given: Option<String>) -> (Arc<str>, Option<Arc<str>>) {
        match given {
            Some(id) if !id.trim().is_empty() && id.len() <= MAX_ID_LEN => {
                let id: Arc<str> = Arc::from(id);
                (Arc::clone(&id), Some(id))
            }
            _ => (self.generated_id(), None),
        }
    }

    /// `call_{prefix:08x}{n:x}` without the formatting machinery (it is on every call).
    fn generated_id(&self) -> Arc<str> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let (prefix, n) = (self.id_prefix, self.next_id.fetch_add(1, Relaxed));
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
}

impl<'a> InFlight<'a> {
    fn new(
        inner: &'a Arc<Inner>,
        outbox: &'a Arc<Outbox>,
        user: &'a WithUser,
        start: Start<'a>,
    ) -> Self {
        inner.metrics.start();
        user.state.active.fetch_add(1, Relaxed);
        let (mut id, given) = inner.call_id(start.id);
        let (mut claimed, mut duplicate) = (false, None);
        if let Some(given) = given {
            if user.state.claim_id(&given) {
                claimed = true;
            } else {
                duplicate = Some(cut(&given, 64));
                id = inner.generated_id();
            }
        }
        let timeout = start
            .timeout
            .or(start.entry.and_then(|e| e.settings.timeout))
            .unwrap_or(inner.config.default_timeout);
        let now = Instant::now();
        let span = if start.admission.counted {
            tracing::info_span!(
                "execute_tool",
                gen_ai.operation.name = "execute_tool",
                gen_ai.tool.name = &*start.tool,
                gen_ai.tool.call.id = &*id,
                user_id = &*user.ctx.user_id,
                status = tracing::field::Empty,
                duration_ms = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        InFlight {
            inner,
            outbox,
            user,
            id,
            duplicate,
            claimed,
            tool: start.tool,
            entry: start.entry,
            admission: start.admission,
            token: user.state.token(),
            start: now,
            timeout,
            deadline: crate::time::deadline(now, timeout),
            wall: Timestamp::now(),
            phase: Phase::Fresh,
            opening_queued: false,
            scope: None,
            span,
        }
    }

    // ----------------------------------------------------------------- prepare

    /// Checks that come before anything waits; the same for every kind of call.
    fn refusal(&self, shown: impl FnOnce() -> Value) -> Option<Refusal> {
        let error = if !self.inner.accepting.load(Relaxed) {
            DispatchError::ShuttingDown
        } else if self.entry.is_none() {
            DispatchError::UnknownTool {
                name: self.tool.to_string(),
            }
        } else if let Some(id) = &self.duplicate {
            self.invalid(
                ".",
                format!("call id `{id}` is already used by a call in flight; ids must be unique"),
            )
        } else {
            return None;
        };
        Some(Refusal {
            error,
            shown: shown(),
        })
    }

    fn prepare_json(
        &mut self,
        arguments: Arguments,
    ) -> Result<Prepared<'a, crate::registry::BoxFut<'a, Result<Value, ToolError>>>, Refusal> {
        let max_depth = self.inner.config.max_depth;
        let args = match arguments {
            Arguments::Value(v) if exceeds_depth(&v, max_depth) => {
                drop_deep(v);
                Args::TooDeep
            }
            Arguments::Value(v) => Args::Value(v),
            Arguments::Text(t) => Args::Text(t),
        };
        let max_bytes = self.inner.config.max_argument_bytes;
        if let Some(r) = self.refusal(|| shown(&args, max_bytes)) {
            return Err(r);
        }
        let too_deep = || format!("arguments are nested more than {max_depth} levels deep");
        let args = match args {
            Args::Value(v) => v,
            Args::TooDeep => return Err(self.refuse_input(too_deep(), hidden("nested too deep"))),
            Args::Text(t) if t.len() > max_bytes => {
                let msg = format!(
                    "arguments are {} bytes; at most {max_bytes} are accepted",
                    t.len()
                );
                return Err(self.refuse_input(msg, hidden_text(&t)));
            }
            Args::Text(t) => match serde_json::from_str::<Value>(&t) {
                Ok(v) if exceeds_depth(&v, max_depth) => {
                    drop_deep(v);
                    return Err(self.refuse_input(too_deep(), hidden_text(&t)));
                }
                Ok(v) => v,
                Err(e) => {
                    let msg = format!("arguments are not valid JSON: {e}");
                    return Err(self.refuse_input(msg, hidden_text(&t)));
                }
            },
        };
        let Some(entry) = self.entry else {
            unreachable!("refusal() returned None, so the tool is known")
        };
        let cx = self.context(entry);
        match entry.invoker.invoke(&args, cx) {
            Ok(body) => Ok(Prepared { entry, args, body }),
            Err(e) => Err(Refusal {
                error: self.invalid_input(entry, &e),
                shown: args,
            }),
        }
    }

    fn prepare_typed<T: Tool>(
        &mut self,
        tool: Option<&'a T>,
        input: T::Input,
    ) -> Result<Prepared<'a, impl Future<Output = Result<T::Output, ToolError>> + Send + 'a>, Refusal>
    {
        // The events show the arguments: the one serialization a typed call pays for.
        let args = json::to_value(&input, self.inner.config.max_depth);
        let shown = || match &args {
            Ok(v) => v.clone(),
            Err(_) => hidden("not shown"),
        };
        if let Some(r) = self.refusal(shown) {
            drop_input(input);
            return Err(r);
        }
        let args = match args {
            Ok(v) => v,
            Err(e) => {
                drop_input(input);
                let msg = format!("the input cannot be shown as JSON: {}", e.0);
                return Err(self.refuse_input(msg, hidden("not shown")));
            }
        };
        let (Some(entry), Some(tool)) = (self.entry, tool) else {
            unreachable!("refusal() returned None, so the tool is known")
        };
        let cx = self.context(entry);
        // Called when first polled, so nothing of the tool runs before the policy,
        // the limits and `tool_executing`, or outside panic isolation.
        let body = async move { tool.call(input, cx).await };
        Ok(Prepared { entry, args, body })
    }

    fn invalid(&self, path: &str, message: String) -> DispatchError {
        DispatchError::InvalidInput {
            tool: self.tool.to_string(),
            path: path.to_owned(),
            message,
        }
    }

    fn refuse_input(&self, message: String, shown: Value) -> Refusal {
        Refusal {
            error: self.invalid(".", message),
            shown,
        }
    }

    /// An input error without the offending value when it sits under a sensitive key.
    fn invalid_input(&self, entry: &Entry, e: &InputError) -> DispatchError {
        let r = self.inner.redaction();
        let sensitive = e
            .keys
            .iter()
            .any(|k| r.is_sensitive(k, &entry.settings.sensitive));
        self.invalid(&cut(&e.path, MAX_NAME_SHOWN), e.safe_message(sensitive))
    }

    fn context(&mut self, entry: &Entry) -> ToolContext {
        let scope = Arc::new(CallScope {
            user: Arc::clone(&self.user.ctx),
            outbox: Arc::clone(self.outbox),
            call_id: Arc::clone(&self.id),
            tool_name: Arc::clone(&entry.name),
            cancel: Arc::clone(&self.token),
            timeout: self.timeout,
            blocking: Arc::clone(&self.inner.blocking),
            max_text: self.inner.max_text(),
            max_depth: self.inner.config.max_depth,
            ended: Default::default(),
        });
        self.scope = Some(Arc::clone(&scope));
        ToolContext { scope }
    }

    // ----------------------------------------------------------------- execute

    async fn execute<C, F>(
        &mut self,
        p: Prepared<'a, F>,
    ) -> Result<ToolOutput<C::Out>, DispatchError>
    where
        C: Codec,
        F: Future<Output = Result<C::Out, ToolError>> + Send,
    {
        let Prepared { entry, args, body } = p;
        let own_slot = match self.admit(entry, &args).await {
            Ok(p) => p,
            Err(error) => return Err(self.refuse(Refusal { error, shown: args }).await),
        };
        let key = entry.settings.cache_ttl.and_then(|ttl| {
            let user =
                (!entry.settings.user_independent).then(|| Arc::clone(&self.user.ctx.user_id));
            Key::new(user, entry.index, &args).map(|k| (k, ttl))
        });
        if let Err(u) = self.announce(args).await {
            let error = match u {
                Unannounced::Failed(e) => {
                    self.record(Status::Undelivered);
                    return Err(DispatchError::Sink(e));
                }
                _ => self.interruption(),
            };
            return Err(self.end_with(error, Err(u)).await);
        }
        let shared = match self.shared_slots(entry).await {
            Ok(s) => s,
            Err(e) => return Err(self.end_with(e, Ok(())).await),
        };
        let (ran, leader) = self.run_cached::<C, F>(entry, key, body).await;
        drop(shared); // released before the completion waits on the user's sink
        let out = self.finish::<C>(entry, ran, leader).await;
        drop(own_slot);
        out
    }

    /// Policy, rate, then one of the user's own slots.
    async fn admit(&mut self, entry: &'a Entry, args: &Value) -> Result<Permit<'a>, DispatchError> {
        let req = PolicyRequest {
            user: &self.user.ctx,
            tool: &entry.def,
            settings: &entry.settings,
            arguments: args,
        };
        let decision = match &self.inner.policy {
            None => Ok(ScopePolicy::decide(&req)),
            Some(p) => {
                let check = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.check(req)));
                let Ok(fut) = check else {
                    return Err(self.denied(entry, Err(PolicyError("the policy panicked".into()))));
                };
                let waited = tokio::select! {
                    biased;
                    () = self.token.cancelled() => None,
                    () = tokio::time::sleep_until(self.deadline) => None,
                    r = Contained::new(fut) => Some(r),
                };
                match waited {
                    None => return Err(self.interruption()),
                    Some(Ok(d)) => d,
                    Some(Err(_)) => Err(PolicyError("the policy panicked".into())),
                }
            }
        };
        if !matches!(decision, Ok(Decision::Allow)) {
            return Err(self.denied(entry, decision));
        }
        if let Err(retry_after) = self.inner.limiter.rate(&self.user.state, self.start) {
            return Err(DispatchError::RateLimited { retry_after });
        }
        let user: &'a WithUser = self.user;
        self.slot(Scope::User(&user.state), LimitScope::User).await
    }

    fn denied(&self, entry: &Entry, decision: Result<Decision, PolicyError>) -> DispatchError {
        let max = self.inner.max_text();
        let (missing_scopes, reason) = match decision {
            Ok(Decision::Deny {
                missing_scopes,
                reason,
            }) => (missing_scopes, reason.map(|r| cut(&r, max))),
            Ok(Decision::Allow) => (Vec::new(), None),
            Err(e) => {
                tracing::warn!(call_id = %self.id, error = %e, "policy error; call denied");
                (Vec::new(), Some("permission check failed".to_owned()))
            }
        };
        DispatchError::PermissionDenied {
            tool: entry.name.to_string(),
            missing_scopes,
            reason,
        }
    }

    /// A slot of `scope`: at once if free, else waited for up to the engine's
    /// `max_wait` (the probe does not wait), the call's deadline and cancellation.
    async fn slot(
        &mut self,
        scope: Scope<'a>,
        which: LimitScope,
    ) -> Result<Permit<'a>, DispatchError> {
        let inner: &'a Arc<Inner> = self.inner;
        let limiter = &*inner.limiter;
        if let Some(p) = limiter.try_slot(&scope) {
            return Ok(p);
        }
        let until = if self.admission.may_wait {
            let bound = crate::time::deadline(self.start, self.inner.config.limits.max_wait);
            bound.min(self.deadline)
        } else {
            Instant::now()
        };
        let got = tokio::select! {
            biased;
            () = self.token.cancelled() => return Err(self.interruption()),
            p = limiter.slot(scope, until) => p,
        };
        match got {
            Some(p) => Ok(p),
            None if self.admission.may_wait && Instant::now() >= self.deadline => {
                Err(self.interruption())
            }
            None => Err(DispatchError::Busy {
                scope: which,
                waited: self.start.elapsed(),
            }),
        }
    }

    async fn shared_slots(
        &mut self,
        entry: &'a Entry,
    ) -> Result<(Option<Permit<'a>>, Permit<'a>), DispatchError> {
        let tool = match &entry.limiter {
            Some(sem) => Some(self.slot(Scope::Tool(sem), LimitScope::Tool).await?),
            None => None,
        };
        let global = self.slot(Scope::Global, LimitScope::Global).await?;
        Ok((tool, global))
    }

    /// Why a call that was waiting stops: cancelled, or out of time.
    fn interruption(&self) -> DispatchError {
        if self.token.is_cancelled() {
            let reason = if self.inner.root.is_cancelled() {
                CancelReason::Shutdown
            } else {
                CancelReason::User
            };
            DispatchError::Cancelled { reason }
        } else {
            DispatchError::Timeout {
                tool: self.tool.to_string(),
                after: self.timeout,
            }
        }
    }

    /// The body, or the cache: a hit, a follower of an identical running call, or
    /// the leader that will fill the entry.
    async fn run_cached<C, F>(
        &mut self,
        entry: &Entry,
        key: Option<(Key, Duration)>,
        body: F,
    ) -> (
        Result<Ran<C::Out>, DispatchError>,
        Option<(crate::cache::Leader<'a>, Duration)>,
    )
    where
        C: Codec,
        F: Future<Output = Result<C::Out, ToolError>> + Send,
    {
        let inner: &'a Arc<Inner> = self.inner;
        let cache = &inner.cache;
        let fresh = |body: F| async move { body.await.map(Ran::Fresh) };
        let Some((key, ttl)) = key else {
            return (self.run(entry, fresh(body)).await, None);
        };
        match cache.lookup(key, self.start) {
            Lookup::Hit(v) => match C::decode(&v) {
                Some(o) => (Ok(Ran::Cached(o, v)), None),
                None => (self.run(entry, fresh(body)).await, None),
            },
            Lookup::Lead(l) => (self.run(entry, fresh(body)).await, Some((l, ttl))),
            Lookup::Wait(rx, key) => {
                let (metrics, depth) = (&inner.metrics, inner.config.max_depth);
                let follow = async move {
                    match cache.follow(rx, key).await {
                        Ok(v) => match C::decode(&v) {
                            Some(o) => Ok(Ran::Cached(o, v)),
                            None => body.await.map(Ran::Fresh),
                        },
                        Err(leader) => {
                            let o = body.await?;
                            store::<C>(leader, ttl, C::json(&o, depth).ok(), metrics);
                            Ok(Ran::Fresh(o))
                        }
                    }
                };
                (self.run(entry, follow).await, None)
            }
        }
    }

    /// Runs the body under its timeout, with panic isolation and cancellation.
    async fn run<O>(
        &self,
        entry: &Entry,
        body: impl Future<Output = Result<Ran<O>, ToolError>>,
    ) -> Result<Ran<O>, DispatchError> {
        // The timeout counts from dispatch: a call that spent it waiting must not
        // start its body at all.
        if self.token.is_cancelled() || Instant::now() >= self.deadline {
            return Err(self.interruption());
        }
        // Cancellation is checked before every poll of the body, as a biased select
        // would; but its waiter is registered only when the body does not finish in
        // its first poll, which spares a ready tool two lock round trips.
        let body = tokio::time::timeout_at(self.deadline, Contained::new(body));
        let mut body = std::pin::pin!(body);
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(body.as_mut().poll(cx))).await;
        let r = match first {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => tokio::select! {
                biased;
                () = self.token.cancelled() => return Err(self.interruption()),
                r = &mut body => r,
            },
        };
        let max = self.inner.max_text();
        match r {
            Err(_) => Err(self.interruption()),
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
                message: cut(e.message(), max),
            }),
            Ok(Ok(Ok(ran))) => Ok(ran),
        }
    }

    /// Fills the cache, then delivers `tool_completed`; the caller gets its value
    /// whatever the event can show of it.
    async fn finish<C: Codec>(
        &mut self,
        entry: &Entry,
        ran: Result<Ran<C::Out>, DispatchError>,
        leader: Option<(crate::cache::Leader<'a>, Duration)>,
    ) -> Result<ToolOutput<C::Out>, DispatchError> {
        let metrics = &self.inner.metrics;
        let (value, source, json) = match ran {
            Err(e) => return Err(self.end_with(e, Ok(())).await),
            Ok(Ran::Fresh(o)) => {
                if entry.settings.cache_ttl.is_some() {
                    metrics.cache_miss();
                }
                let json = C::json(&o, self.inner.config.max_depth);
                if let Some((l, ttl)) = leader {
                    store::<C>(l, ttl, json.as_ref().ok().cloned(), metrics);
                }
                (o, Source::Ran, json)
            }
            Ok(Ran::Cached(o, v)) => {
                metrics.cache_hit();
                (o, Source::Cache, Ok(Value::clone(&v)))
            }
        };
        let (result, note) = match json {
            Ok(mut j) => {
                self.inner
                    .redaction()
                    .apply(&mut j, &entry.settings.sensitive);
                (j, None)
            }
            Err(e) => {
                metrics.unserializable_result();
                (
                    Value::Null,
                    Some(format!("the result cannot be shown: {}", e.0)),
                )
            }
        };
        self.complete(Ending::Success {
            result,
            source,
            note,
        })
        .await;
        Ok(ToolOutput {
            call_id: Arc::clone(&self.id),
            value,
            cached: source == Source::Cache,
        })
    }

    // ----------------------------------------------------------------- events

    /// Sends `tool_executing`. If it cannot be delivered the tool must not run.
    async fn announce(&mut self, parameters: Value) -> Result<(), Unannounced> {
        let ev = self.executing(parameters);
        let watch = Watch {
            cancel: Some(&self.token),
            deadline: Some(self.deadline),
        };
        let outbox = self.outbox;
        match outbox
            .deliver(ev, Role::Opens, watch, &mut self.opening_queued)
            .await
        {
            Ok(Delivered::Sent) => {
                self.phase = Phase::Announced;
                Ok(())
            }
            Ok(Delivered::HandedOff) => {
                self.phase = Phase::HandedOff;
                Err(Unannounced::HandedOff)
            }
            Err(NotSent::Interrupted) => Err(Unannounced::NotQueued),
            Err(NotSent::Sink(e)) => Err(Unannounced::Failed(e)),
        }
    }

    /// The one place a call is refused: its pair with the error's status.
    async fn refuse(&mut self, r: Refusal) -> DispatchError {
        let announced = self.announce(r.shown).await;
        self.end_with(r.error, announced).await
    }

    /// Ends the call with `err`, however far its `tool_executing` got. A refusal whose
    /// `tool_executing` could not be delivered keeps its own status.
    async fn end_with(
        &mut self,
        err: DispatchError,
        announced: Result<(), Unannounced>,
    ) -> DispatchError {
        match announced {
            Ok(()) | Err(Unannounced::HandedOff) => self.complete(Ending::Failure(&err)).await,
            Err(Unannounced::NotQueued) => self.end_detached(&err),
            Err(Unannounced::Failed(_)) => self.record(err.status()),
        }
        err
    }

    /// Sends `tool_completed` (counting first, so a slow sink cannot skew metrics).
    /// A call that stops waiting (cancelled) leaves it queued: it still goes out.
    async fn complete(&mut self, ending: Ending<'_>) {
        let behind_opening =
            self.phase == Phase::HandedOff || self.opening_queued && self.phase == Phase::Fresh;
        let took = self.start.elapsed();
        let ev = self.completed(&ending, took);
        self.record(ending.status());
        let watch = Watch {
            cancel: Some(&self.token),
            deadline: None,
        };
        let role = Role::Closes { behind_opening };
        let mut queued = false;
        let _ = self.outbox.deliver(ev, role, watch, &mut queued).await; // failures are counted there
    }

    /// Ends the call without waiting: its completion (and its `tool_executing`, if
    /// that never went out) handed to the outbox.
    fn end_detached(&mut self, err: &DispatchError) {
        let phase = match self.phase {
            Phase::Fresh if self.opening_queued => Phase::HandedOff,
            p => p,
        };
        let took = self.start.elapsed();
        let closing = self.completed(&Ending::Failure(err), took);
        self.record(err.status());
        let opening = (phase == Phase::Fresh).then(|| self.executing(Value::Null));
        let role = Role::Closes {
            behind_opening: phase == Phase::HandedOff,
        };
        self.outbox.hand_off(opening, closing, role);
    }

    /// Counts the ended call once, and closes it to progress.
    fn record(&mut self, status: Status) {
        if self.phase == Phase::Done {
            return;
        }
        self.phase = Phase::Done;
        let took = self.start.elapsed();
        if let Some(scope) = &self.scope {
            scope.end();
        }
        let s = &self.user.state;
        if self.claimed {
            s.release_id(&self.id);
        }
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
        let metrics = &self.inner.metrics;
        let left = if self.admission.counted {
            metrics.end(status, self.entry.map(|e| e.index), took)
        } else {
            metrics.end_uncounted()
        };
        if left == 0 && !self.inner.accepting.load(Relaxed) {
            self.inner.idle.notify_waiters();
        }
        if !self.span.is_disabled() {
            self.span.record("status", status.as_str());
            self.span.record("duration_ms", took.as_secs_f64() * 1e3);
        }
    }

    fn executing(&self, mut parameters: Value) -> Event {
        let sensitive = self.entry.map_or(&[][..], |e| &e.settings.sensitive);
        self.inner.redaction().apply(&mut parameters, sensitive);
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

    fn completed(&self, ending: &Ending<'_>, took: Duration) -> Event {
        let u = &self.user.ctx;
        let max = self.inner.max_text();
        let (result, error, cached) = match ending {
            Ending::Success {
                result,
                source,
                note,
            } => (result.clone(), note.clone(), *source == Source::Cache),
            Ending::Failure(e) => (Value::Null, Some(cut(&e.to_string(), max)), false),
        };
        Event::ToolCompleted(ToolCompleted {
            call_id: Arc::clone(&self.id),
            run_id: u.run_id.clone(),
            thread_id: u.thread_id.clone(),
            user_id: Arc::clone(&u.user_id),
            tool_name: Arc::clone(&self.tool),
            status: ending.status(),
            duration_ms: took.as_secs_f64() * 1e3,
            result,
            error,
            cached,
            timestamp: self.wall.after(took),
        })
    }
}

impl Ending<'_> {
    fn status(&self) -> Status {
        match self {
            Ending::Success { .. } => Status::Success,
            Ending::Failure(e) => e.status(),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.phase == Phase::Done {
            return;
        }
        // The caller dropped the future: complete the pair as cancelled, without
        // waiting (the outbox queues what the sink cannot take now).
        let err = DispatchError::Cancelled {
            reason: CancelReason::Dropped,
        };
        self.end_detached(&err);
    }
}

/// Stores a fresh result for the followers and later calls, if it survives a JSON
/// round trip; otherwise the followers run the tool themselves, and it is counted.
fn store<C: Codec>(
    leader: crate::cache::Leader<'_>,
    ttl: Duration,
    json: Option<Value>,
    metrics: &crate::metrics::Metrics,
) {
    match json {
        Some(j) if C::round_trips(&j) => leader.complete(j, ttl, Instant::now()),
        _ => metrics.cache_skipped(), // dropping the leader lets a follower run
    }
}

/// A typed input that is refused is dropped here; a `Value` input without recursion.
fn drop_input<I: 'static>(input: I) {
    let mut slot = Some(input);
    if let Some(v) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Value>>()
        && let Some(v) = v.take()
    {
        drop_deep(v);
    }
}

/// Arguments as the events of a refused call show them: parsed, so redaction applies,
/// when they are JSON text of a bounded size.
fn shown(args: &Args, max_bytes: usize) -> Value {
    match args {
        Args::Value(v) => v.clone(),
        Args::Text(t) if t.len() <= max_bytes => match serde_json::from_str::<Value>(t) {
            Ok(v) if !exceeds_depth(&v, json::DEFAULT_MAX_DEPTH) => v,
            Ok(v) => {
                drop_deep(v);
                hidden_text(t)
            }
            Err(_) => hidden_text(t),
        },
        Args::Text(t) => hidden_text(t),
        Args::TooDeep => hidden("nested too deep"),
    }
}

/// Arguments that cannot be redacted (not JSON, or too large to parse) are not
/// shown in events: a secret in them could not be found.
fn hidden_text(t: &str) -> Value {
    Value::String(format!(
        "[{} bytes of unparsed arguments, not shown]",
        t.len()
    ))
}

fn hidden(why: &str) -> Value {
    Value::String(format!("[arguments {why}]"))
}
