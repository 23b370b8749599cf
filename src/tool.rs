//! Tools: the [`Tool`] trait, closure tools ([`tool_fn`], [`blocking_fn`]), their
//! [`ToolSettings`], the [`ToolContext`] a running tool sees, and [`ToolError`].

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::approval::ApprovalWait;
use crate::blocking::BlockingJobs;
use crate::delivery::Outbox;
use crate::event::{Event, Timestamp, ToolProgress};
use crate::redact::cut_to;
use crate::user::UserContext;

/// A tool an LLM can call: typed input, typed output, one async body.
///
/// ```
/// use schemars::JsonSchema;
/// use serde::{Deserialize, Serialize};
/// use tool_dispatch::{Tool, ToolContext, ToolError, ToolSettings};
///
/// #[derive(Deserialize, Serialize, JsonSchema)]
/// #[serde(deny_unknown_fields)]
/// struct WeatherIn { city: String, api_key: String }
///
/// #[derive(Deserialize, Serialize)]
/// struct WeatherOut { temp_c: f64 }
///
/// struct GetWeather;
///
/// impl Tool for GetWeather {
///     const NAME: &'static str = "get_weather";
///     type Input = WeatherIn;
///     type Output = WeatherOut;
///     fn description(&self) -> &str { "Current temperature in a city." }
///     fn settings(&self) -> ToolSettings {
///         ToolSettings::new().scope("weather:read").sensitive("api_key")
///     }
///     async fn call(&self, input: WeatherIn, cx: ToolContext) -> Result<WeatherOut, ToolError> {
///         cx.progress(0.5, "fetching");
///         Ok(WeatherOut { temp_c: if input.city == "Paris" { 21.0 } else { 15.0 } })
///     }
/// }
/// ```
pub trait Tool: Send + Sync + 'static {
    /// The name the model calls the tool by. Unique within a registry.
    const NAME: &'static str;
    /// The arguments; their JSON Schema is what the model is shown.
    type Input: DeserializeOwned + Serialize + JsonSchema + Send + 'static;
    /// The result. `Deserialize` lets cached results come back typed.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// What the tool does, for the model.
    fn description(&self) -> &str;

    /// Timeout, required scopes, sensitive argument names, caching. Read once, when
    /// the tool is added to a registry.
    fn settings(&self) -> ToolSettings {
        ToolSettings::default()
    }

    /// Runs the tool. Dropping the returned future stops it (timeout, cancellation).
    fn call(
        &self,
        input: Self::Input,
        cx: ToolContext,
    ) -> impl Future<Output = Result<Self::Output, ToolError>> + Send;
}

/// Per-tool settings, read once when the tool is registered.
///
/// ```
/// use std::time::Duration;
/// use tool_dispatch::ToolSettings;
/// let s = ToolSettings::new()
///     .timeout(Duration::from_secs(5))
///     .scope("files:read")
///     .sensitive("password")
///     .cache(Duration::from_secs(60));
/// assert_eq!(s.call_timeout(), Some(Duration::from_secs(5)));
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ToolSettings {
    pub(crate) timeout: Option<Duration>,
    pub(crate) scopes: Vec<String>,
    pub(crate) sensitive: Vec<String>,
    pub(crate) cache_ttl: Option<Duration>,
    pub(crate) user_independent: bool,
    pub(crate) max_concurrency: Option<usize>,
    pub(crate) approval: Option<String>,
    pub(crate) approval_wait: Option<ApprovalWait>,
    pub(crate) read_only: Option<bool>,
    pub(crate) destructive: Option<bool>,
    pub(crate) output_schema: Option<serde_json::Value>,
}

impl ToolSettings {
    /// Default settings: engine timeout, no scopes, no caching.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long one call may run (default: the engine's, 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// A permission scope the user must hold.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scopes.push(scope.into());
        self
    }

    /// An argument name whose value is shown as `[REDACTED]` in events.
    pub fn sensitive(mut self, key: impl Into<String>) -> Self {
        self.sensitive.push(key.into());
        self
    }

    /// Declares the tool idempotent: results are cached per user, arguments and tool,
    /// for `ttl`.
    pub fn cache(mut self, ttl: Duration) -> Self {
        self.cache_ttl = Some(ttl);
        self
    }

    /// With [`cache`](Self::cache): the result does not depend on who asks, so cached
    /// entries are shared across users. Never the default.
    pub fn user_independent(mut self) -> Self {
        self.user_independent = true;
        self
    }

    /// At most `n` calls of this tool run at once, across all users.
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = Some(n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS));
        self
    }

    /// Tells clients the tool changes nothing (MCP's `readOnlyHint`; unset: not
    /// said). A hint for the client's user interface, never a permission.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = Some(read_only);
        self
    }

    /// Tells clients the tool may destroy or overwrite something (MCP's
    /// `destructiveHint`; unset: not said). A hint, never a permission.
    pub fn destructive(mut self, destructive: bool) -> Self {
        self.destructive = Some(destructive);
        self
    }

    /// The JSON Schema of the tool's result, published to MCP clients as its
    /// `outputSchema`; the result (a JSON object) then goes out as
    /// `structuredContent` too. Not checked here: the tool's own output type is the
    /// contract.
    pub fn output_schema(mut self, schema: serde_json::Value) -> Self {
        self.output_schema = Some(schema);
        self
    }

    // Getters: the setters above are builder methods of the same names, so each
    // getter names what it returns.

    /// The hints set by [`read_only`](Self::read_only) and
    /// [`destructive`](Self::destructive): `(read_only, destructive)`.
    pub fn hints(&self) -> (Option<bool>, Option<bool>) {
        (self.read_only, self.destructive)
    }

    /// The schema set by [`output_schema`](Self::output_schema), if any.
    pub fn result_schema(&self) -> Option<&serde_json::Value> {
        self.output_schema.as_ref()
    }

    /// The timeout set by [`timeout`](Self::timeout), if any.
    pub fn call_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The scopes added by [`scope`](Self::scope).
    pub fn required_scopes(&self) -> &[String] {
        &self.scopes
    }

    /// The argument names added by [`sensitive`](Self::sensitive).
    pub fn sensitive_keys(&self) -> &[String] {
        &self.sensitive
    }

    /// The time-to-live set by [`cache`](Self::cache), if the tool is cacheable.
    pub fn cache_ttl(&self) -> Option<Duration> {
        self.cache_ttl
    }

    /// Whether [`user_independent`](Self::user_independent) was set.
    pub fn is_user_independent(&self) -> bool {
        self.user_independent
    }

    /// The limit set by [`max_concurrency`](Self::max_concurrency), if any.
    pub fn concurrency_limit(&self) -> Option<usize> {
        self.max_concurrency
    }

    /// Every call of this tool runs only after its user approves it, with `reason`
    /// shown to them; no custom policy needed. A policy's own
    /// [`Decision::RequireApproval`](crate::Decision::RequireApproval) takes
    /// precedence (its reason is shown).
    ///
    /// ```
    /// use tool_dispatch::ToolSettings;
    /// let s = ToolSettings::new().requires_approval("sends an email in your name");
    /// assert_eq!(s.approval_reason(), Some("sends an email in your name"));
    /// ```
    pub fn requires_approval(mut self, reason: impl Into<String>) -> Self {
        self.approval = Some(reason.into());
        self
    }

    /// How long this tool's calls wait for approval (default: the engine's,
    /// five minutes).
    pub fn approval_wait(mut self, wait: ApprovalWait) -> Self {
        self.approval_wait = Some(wait);
        self
    }

    /// The reason set by [`requires_approval`](Self::requires_approval).
    pub fn approval_reason(&self) -> Option<&str> {
        self.approval.as_deref()
    }

    /// The window set by [`approval_wait`](Self::approval_wait).
    pub fn approval_window(&self) -> Option<ApprovalWait> {
        self.approval_wait
    }
}

/// What a running tool sees: the user (read-only), a cancellation signal and a
/// progress reporter bound to this call and this user's sink.
#[derive(Clone)]
pub struct ToolContext {
    pub(crate) scope: Arc<CallScope>,
}

/// One call as its tool sees it; shared by every clone of its [`ToolContext`].
pub(crate) struct CallScope {
    pub(crate) user: Arc<UserContext>,
    pub(crate) outbox: Arc<Outbox>,
    /// The engine's list of blocking bodies still running.
    pub(crate) blocking: Arc<BlockingJobs>,
    pub(crate) call_id: Arc<str>,
    pub(crate) tool_name: Arc<str>,
    pub(crate) cancel: Arc<CancellationToken>,
    /// For a call of a run, the user's token its run's token descends from (to tell
    /// `cancel_run` from `cancel_user`).
    pub(crate) user_cancel: Option<Arc<CancellationToken>>,
    pub(crate) timeout: Duration,
    /// Longest text an event carries.
    pub(crate) max_text: usize,
    /// Most bytes a progress message takes encoded (what its event has room for).
    pub(crate) max_message_bytes: usize,
    /// Deepest result accepted.
    pub(crate) max_depth: usize,
    /// Closed when the call's `tool_completed` is sent or handed off: nothing of
    /// this call is sent after it.
    pub(crate) gate: Gate,
}

/// Bit 0: the call has ended. The rest: progress reports being sent right now.
/// `end` waits for those (they never wait themselves), so none can follow it.
#[derive(Default)]
pub(crate) struct Gate(AtomicUsize);

const ENDED: usize = 1;
const SENDER: usize = 2;

impl Gate {
    /// Runs `send` unless the call has ended; `None` if it has.
    fn pass<R>(&self, send: impl FnOnce() -> R) -> Option<R> {
        let before = self.0.fetch_add(SENDER, Ordering::AcqRel);
        let r = (before & ENDED == 0).then(send);
        self.0.fetch_sub(SENDER, Ordering::AcqRel);
        r
    }

    /// Closes the gate, once every report already passing it is through.
    fn close(&self) {
        if self.0.fetch_or(ENDED, Ordering::AcqRel) >= SENDER {
            while self.0.load(Ordering::Acquire) >= SENDER {
                std::thread::yield_now(); // a report is inside `try_send`, which never waits
            }
        }
    }
}

impl CallScope {
    /// Closes the call to progress: after this returns, no `tool_progress` of it is
    /// sent, so its `tool_completed` is the last event of the call.
    pub(crate) fn end(&self) {
        self.gate.close();
    }
}

impl std::fmt::Debug for ToolContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolContext")
            .field("user_id", &self.scope.user.user_id)
            .field("call_id", &self.scope.call_id)
            .field("tool_name", &self.scope.tool_name)
            .finish_non_exhaustive()
    }
}

impl ToolContext {
    /// A context outside any engine, to unit-test a tool by calling its body
    /// directly: progress goes to `sink` (at once, or dropped when it is full), the
    /// call id is `standalone`, the timeout 30 s, and the call is never cancelled.
    ///
    /// ```
    /// # use tool_dispatch::{RecordingSink, ToolContext, UserContext};
    /// # use tool_dispatch::event::Event;
    /// let sink = RecordingSink::new();
    /// let user = UserContext::builder("alice").build()?;
    /// let cx = ToolContext::standalone("get_weather", user, sink.clone());
    /// assert!(cx.progress(0.5, "halfway"));
    /// assert!(matches!(&sink.events()[0], Event::ToolProgress(p) if p.progress == 0.5));
    /// # Ok::<(), tool_dispatch::UserContextError>(())
    /// ```
    pub fn standalone(
        tool_name: impl Into<String>,
        user: UserContext,
        sink: impl crate::sink::EventSink,
    ) -> ToolContext {
        let metrics = Arc::new(crate::metrics::Metrics::new(0));
        let outbox = Outbox::new(Arc::new(sink), metrics, Duration::from_secs(5), 64);
        let tool_name: String = tool_name.into();
        ToolContext {
            scope: Arc::new(CallScope {
                user: Arc::new(user),
                outbox: Arc::new(outbox),
                blocking: Arc::default(),
                call_id: Arc::from("standalone"),
                tool_name: Arc::from(tool_name),
                cancel: Arc::new(CancellationToken::new()),
                user_cancel: None,
                timeout: Duration::from_secs(30),
                max_text: 1024,
                max_message_bytes: 16 * 1024,
                max_depth: crate::json::DEFAULT_MAX_DEPTH,
                gate: Gate::default(),
            }),
        }
    }

    /// The user this call runs for.
    pub fn user(&self) -> &UserContext {
        &self.scope.user
    }

    /// This call's id (the same as in its events).
    pub fn call_id(&self) -> &str {
        &self.scope.call_id
    }

    /// The tool's name.
    pub fn tool_name(&self) -> &str {
        &self.scope.tool_name
    }

    /// The timeout that applies to this call (counted from dispatch).
    pub fn timeout(&self) -> Duration {
        self.scope.timeout
    }

    /// Whether the call has been cancelled (by `cancel_user`, `cancel_run` or
    /// shutdown). Blocking tools should check this between steps.
    pub fn is_cancelled(&self) -> bool {
        self.scope.cancel.is_cancelled()
    }

    /// Completes when the call is cancelled.
    pub async fn cancelled(&self) {
        self.scope.cancel.cancelled().await
    }

    /// Reports progress as a `tool_progress` event to this user's sink (an empty
    /// message is sent as `null`; a long one is cut like every event text). Never
    /// blocks: when the sink is full or closed, or the call has already completed,
    /// the update is dropped, counted, and `false` is returned.
    pub fn progress(&self, fraction: f64, message: impl Into<String>) -> bool {
        let s = &*self.scope;
        let message: String = message.into();
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        let event = Event::ToolProgress(ToolProgress {
            call_id: s.call_id.clone(),
            run_id: s.user.run_id.clone(),
            thread_id: s.user.thread_id.clone(),
            user_id: s.user.user_id.clone(),
            tool_name: s.tool_name.clone(),
            progress: fraction,
            message: (!message.is_empty())
                .then(|| cut_to(&message, s.max_text, s.max_message_bytes)),
            timestamp: Timestamp::now(),
        });
        // Through the gate, so the call's completion cannot slip in before it.
        match s.gate.pass(|| s.outbox.offer(event)) {
            Some(sent) => sent,
            None => {
                s.outbox.metrics().progress_dropped();
                false
            }
        }
    }
}

/// The error a tool body returns. Any `std::error::Error` converts into it with `?`.
///
/// Its message is passed to the model, so keep secrets out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    message: String,
    retryable: bool,
}

impl ToolError {
    /// An error that a retry will not fix.
    pub fn new(message: impl Into<String>) -> Self {
        ToolError {
            message: message.into(),
            retryable: false,
        }
    }

    /// An error that may go away if the model tries again (a flaky upstream).
    pub fn retryable(message: impl Into<String>) -> Self {
        ToolError {
            message: message.into(),
            retryable: true,
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether a retry may help.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for ToolError {
    fn from(e: E) -> Self {
        ToolError::new(e.to_string())
    }
}

/// A tool made from an async closure; see [`tool_fn`].
#[must_use = "a tool does nothing until it is added to a registry"]
pub struct FnTool<F, I, O> {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) settings: ToolSettings,
    pub(crate) f: F,
    _types: PhantomData<fn(I) -> O>,
}

/// A blocking tool made from a synchronous closure; see [`blocking_fn`].
#[must_use = "a tool does nothing until it is added to a registry"]
pub struct BlockingFnTool<F, I, O> {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) settings: ToolSettings,
    pub(crate) f: Arc<F>,
    _types: PhantomData<fn(I) -> O>,
}

impl<F, I, O> std::fmt::Debug for FnTool<F, I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnTool")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<F, I, O> std::fmt::Debug for BlockingFnTool<F, I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingFnTool")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<F, I, O> FnTool<F, I, O> {
    /// Replaces the tool's settings.
    pub fn settings(mut self, settings: ToolSettings) -> Self {
        self.settings = settings;
        self
    }
}

impl<F, I, O> BlockingFnTool<F, I, O> {
    /// Replaces the tool's settings.
    pub fn settings(mut self, settings: ToolSettings) -> Self {
        self.settings = settings;
        self
    }
}

/// A tool whose input schema is data rather than a Rust type; see [`schema_tool`].
#[must_use = "a tool does nothing until it is added to a registry"]
pub struct SchemaTool<F> {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) settings: ToolSettings,
    pub(crate) input_schema: serde_json::Value,
    pub(crate) f: F,
}

impl<F> std::fmt::Debug for SchemaTool<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaTool")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<F> SchemaTool<F> {
    /// Replaces the tool's settings.
    pub fn settings(mut self, settings: ToolSettings) -> Self {
        self.settings = settings;
        self
    }
}

/// Makes a tool whose arguments are JSON checked against `input_schema` (a JSON
/// Schema from elsewhere: a remote MCP server, an OpenAPI document). Before the body
/// runs, the arguments must fit the schema's `type`, `required`, `properties`,
/// `additionalProperties: false`, `items` and `enum`, at every depth; otherwise the
/// call ends `invalid_input` with a message that names the place, never the value.
///
/// ```
/// use serde_json::json;
/// use tool_dispatch::{schema_tool, Registry, ToolError};
/// let greet = schema_tool(
///     "greet",
///     "Greets someone.",
///     json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}),
///     |args, _cx| async move { Ok::<_, ToolError>(json!(format!("hello {}", args["name"]))) },
/// );
/// let registry = Registry::builder().tool(greet).build()?;
/// assert_eq!(registry.definition("greet").unwrap().input_schema["required"][0], "name");
/// # Ok::<(), tool_dispatch::RegistryError>(())
/// ```
pub fn schema_tool<F, Fut>(
    name: impl Into<String>,
    description: impl Into<String>,
    input_schema: serde_json::Value,
    f: F,
) -> SchemaTool<F>
where
    F: Fn(serde_json::Value, ToolContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, ToolError>> + Send + 'static,
{
    SchemaTool {
        name: name.into(),
        description: description.into(),
        settings: ToolSettings::default(),
        input_schema,
        f,
    }
}

/// Makes a tool from an async closure, for small tools.
///
/// ```
/// use tool_dispatch::{tool_fn, Registry, ToolError};
/// let echo = tool_fn("echo", "Returns its input.", |s: String, _cx| async move {
///     Ok::<_, ToolError>(s)
/// });
/// let registry = Registry::builder().tool(echo).build()?;
/// assert_eq!(registry.len(), 1);
/// # Ok::<(), tool_dispatch::RegistryError>(())
/// ```
pub fn tool_fn<F, Fut, I, O>(
    name: impl Into<String>,
    description: impl Into<String>,
    f: F,
) -> FnTool<F, I, O>
where
    F: Fn(I, ToolContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, ToolError>> + Send + 'static,
    I: DeserializeOwned + Serialize + JsonSchema + Send + 'static,
    O: Serialize + Send + 'static,
{
    FnTool {
        name: name.into(),
        description: description.into(),
        settings: ToolSettings::default(),
        f,
        _types: PhantomData,
    }
}

/// Makes a tool from a synchronous, blocking closure. It runs on tokio's blocking
/// pool so it cannot stall the runtime; its timeout still ends the call for the
/// caller, and a body still running past twice its timeout is reported as stuck by
/// [`Engine::health`](crate::Engine::health).
///
/// ```
/// use tool_dispatch::{blocking_fn, ToolError};
/// let hash = blocking_fn("hash", "Hashes a file.", |path: String, cx| {
///     if cx.is_cancelled() { return Err(ToolError::new("cancelled")); }
///     Ok::<_, ToolError>(path.len() as u64)
/// });
/// # let _ = hash;
/// ```
pub fn blocking_fn<F, I, O>(
    name: impl Into<String>,
    description: impl Into<String>,
    f: F,
) -> BlockingFnTool<F, I, O>
where
    F: Fn(I, ToolContext) -> Result<O, ToolError> + Send + Sync + 'static,
    I: DeserializeOwned + Serialize + JsonSchema + Send + 'static,
    O: Serialize + Send + 'static,
{
    BlockingFnTool {
        name: name.into(),
        description: description.into(),
        settings: ToolSettings::default(),
        f: Arc::new(f),
        _types: PhantomData,
    }
}
