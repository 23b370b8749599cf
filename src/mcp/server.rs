//! The MCP server: an rmcp `ServerHandler` written over an [`Engine`].

use std::sync::{Arc, OnceLock};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CompleteRequestParams, CompleteResult,
    ContentBlock, CustomRequest, CustomResult, ErrorCode, ErrorData, GetPromptRequestParams,
    GetPromptResponse, Implementation, InitializeRequestParams, InitializeResult,
    ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult, ListToolsResult,
    PaginatedRequestParams, ProtocolVersion, ReadResourceRequestParams, ReadResourceResponse,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, ServerHandler};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::approve::{self, Asked, Parked, Phase};
use super::call_sink::{CallSink, Forward, PROGRESS_BUFFER};
use super::stats::{Counters, Elicitation, McpStats};
use crate::engine::Engine;
use crate::event::Event;
use crate::provider::mcp::{Blocks, Outcome, outcome, tool_schema};
use crate::sink::{EventSink, TrySendError};
use crate::user::UserContext;
use crate::{BoxFuture, DispatchError, ToolCall, ToolOutput};

/// Where the events of each user's MCP calls go: the integrator's choice per user
/// (their run log, the sink of their open WebSocket, …).
type Events = Arc<dyn Fn(&UserContext) -> Arc<dyn EventSink> + Send + Sync>;

/// Serves an [`Engine`]'s tools over MCP, every call through the engine's pipeline
/// (validation, policy, limits, approval, cache, timeout, cancellation, events) as
/// the user of the request.
///
/// - `tools/list`: the registry's tools in registration order, those whose scopes
///   the user holds, with their input schema (`$schema` and `$defs` kept), an
///   `outputSchema` when the tool set one
///   ([`ToolSettings::output_schema`](crate::ToolSettings::output_schema)), and
///   annotations (`idempotentHint` when cached, `readOnlyHint` / `destructiveHint`
///   when set).
/// - `tools/call`: an unknown tool is the JSON-RPC error `-32602`, as is a request
///   whose params do not fit `tools/call` (no `name`, a `name` that is not a
///   string, `arguments` that are not an object); a method the server does not
///   know is `-32601`. Every other ending (invalid input, tool error, denied, rate
///   limited with its retry hint, busy, timeout, panicked, rejected, …) is a result
///   with `isError: true` and the text a model may see, as
///   [`provider::mcp`](crate::provider::mcp) renders it. A result in the library's
///   [`Content`](crate::content::Content) form goes out as its content blocks. A
///   request with a `progressToken` gets `notifications/progress` for the tool's
///   progress (strictly increasing, none after the result).
/// - Cancellation: `notifications/cancelled` for the request drops the dispatch;
///   the call ends `cancelled` with its paired events. Over HTTP with sessions a
///   client that only closes its response stream has not cancelled (the
///   specification says so): the call runs on and its answer can be resumed.
/// - Approval: a call that needs it is asked of the client by elicitation when the
///   client declared that capability (`elicitation/create` up to 2025-11-25, an
///   `input_required` result in 2026-07-28); the first answer, the client's or the
///   user's page's, wins. A client without elicitation waits for the answer given
///   elsewhere.
/// - The user: fixed for stdio ([`McpServer::for_user`]); over HTTP, the
///   [`UserContext`] that [`router`](super::router) put into the request after
///   checking its bearer token ([`McpServer::per_request`]), never a default one. A
///   session (protocol revisions with sessions) belongs to the user who initialized
///   it.
/// - Events go where [`McpServer::events`] says, per user; by default nowhere
///   (counted as delivered), so set it to show MCP calls on the user's page.
#[derive(Clone)]
pub struct McpServer {
    engine: Engine,
    fixed: Option<UserContext>,
    events: Events,
    /// The run every call belongs to, if the integrator named one.
    run: Option<Arc<str>>,
    /// The user this session (one handler instance) belongs to, once it has one.
    bound: Arc<OnceLock<Arc<str>>>,
    counters: Arc<Counters>,
    parked: Arc<Parked>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer")
            .field("user", &self.fixed.as_ref().map(UserContext::user_id))
            .field("session_of", &self.bound.get())
            .finish_non_exhaustive()
    }
}

/// Takes every event and keeps none: where MCP calls' events go unless
/// [`McpServer::events`] says otherwise.
struct Nowhere;

impl EventSink for Nowhere {
    fn try_send(&self, _: Event) -> Result<(), TrySendError> {
        Ok(())
    }
}

impl McpServer {
    /// A server whose every request is `user`'s: for stdio, where the process is
    /// started for one user.
    pub fn for_user(engine: Engine, user: UserContext) -> McpServer {
        McpServer::with(engine, Some(user))
    }

    /// A server whose requests carry their user: over HTTP behind
    /// [`router`](super::router), which authenticates each request. A request that
    /// carries none is refused.
    pub fn per_request(engine: Engine) -> McpServer {
        McpServer::with(engine, None)
    }

    fn with(engine: Engine, fixed: Option<UserContext>) -> McpServer {
        let nowhere: Arc<dyn EventSink> = Arc::new(Nowhere);
        McpServer {
            engine,
            fixed,
            events: Arc::new(move |_| Arc::clone(&nowhere)),
            run: None,
            bound: Arc::default(),
            counters: Arc::default(),
            parked: Arc::default(),
        }
    }

    /// Where each user's events go: `sink_for(user)` is asked at every call.
    ///
    /// ```no_run
    /// # fn f(engine: tool_dispatch::Engine, runs: tool_dispatch::RunLog) {
    /// use std::sync::Arc;
    /// use tool_dispatch::mcp::McpServer;
    /// // MCP calls show up in the user's "mcp" run, next to their web page's runs.
    /// let server = McpServer::per_request(engine)
    ///     .events(move |user| Arc::new(runs.writer(user.user_id(), "mcp")));
    /// # }
    /// ```
    pub fn events<F>(mut self, sink_for: F) -> McpServer
    where
        F: Fn(&UserContext) -> Arc<dyn EventSink> + Send + Sync + 'static,
    {
        self.events = Arc::new(sink_for);
        self
    }

    /// Every call made through this server belongs to the user's run `run_id`: its
    /// events carry it, and [`Engine::cancel_run`](crate::Engine::cancel_run) for it
    /// stops the user's MCP calls. With [`events`](Self::events) writing to the
    /// same run of a [`RunLog`](crate::RunLog), the user's page follows their MCP
    /// calls like any other run.
    pub fn in_run(mut self, run_id: impl Into<String>) -> McpServer {
        self.run = Some(Arc::from(run_id.into()));
        self
    }

    /// The same server for a new session: bound to no user yet (its counters and
    /// parked calls are shared).
    pub fn session(&self) -> McpServer {
        McpServer {
            bound: Arc::default(),
            ..self.clone()
        }
    }

    /// The server's counters (requests by method, errors by code, sessions,
    /// elicitations), shared by every session: plain atomics, cheap to read.
    pub fn stats(&self) -> McpStats {
        self.counters.snapshot()
    }

    /// Reads the counters without holding the server (its engine), for a metrics
    /// registry that outlives it.
    #[cfg(feature = "prometheus")]
    pub(crate) fn stats_reader(&self) -> impl Fn() -> McpStats + Send + Sync + 'static {
        let counters = Arc::clone(&self.counters);
        move || counters.snapshot()
    }

    pub(super) fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The user of a request, or why it has none. The first user binds the session.
    fn user(&self, extensions: &rmcp::model::Extensions) -> Result<UserContext, ErrorData> {
        let user = match &self.fixed {
            Some(u) => u.clone(),
            None => extensions
                .get::<axum::http::request::Parts>()
                .and_then(|p| p.extensions.get::<UserContext>())
                .cloned()
                .ok_or_else(|| {
                    ErrorData::new(ErrorCode::INVALID_REQUEST, "no authenticated user", None)
                })?,
        };
        let owner = self.bound.get_or_init(|| Arc::from(user.user_id()));
        if **owner != *user.user_id() {
            return Err(ErrorData::new(
                ErrorCode::INVALID_REQUEST,
                "this session belongs to another user; start a new one",
                None,
            ));
        }
        match &self.run {
            None => Ok(user),
            Some(run) => user.with_run_id(run).map_err(|e| {
                ErrorData::new(ErrorCode::INTERNAL_ERROR, format!("bad run id: {e}"), None)
            }),
        }
    }

    /// Counts an answer's error, if it is one.
    fn counted<T>(&self, answer: Result<T, ErrorData>) -> Result<T, ErrorData> {
        if let Err(e) = &answer {
            self.counters.error(e.code.0);
        }
        answer
    }

    /// The tools `user` may call, as MCP lists them.
    fn tools(&self, user: &UserContext) -> Vec<Tool> {
        let registry = self.engine.registry();
        registry
            .definitions()
            .filter_map(|def| {
                let settings = registry.settings(&def.name)?;
                if !settings.required_scopes().iter().all(|s| user.has_scope(s)) {
                    return None;
                }
                let mut tool = json!({
                    "name": def.name,
                    "description": def.description,
                    "inputSchema": tool_schema(def),
                });
                if let Some(schema) = settings.result_schema() {
                    tool["outputSchema"] = schema.clone();
                }
                let mut hints = serde_json::Map::new();
                if settings.cache_ttl().is_some() {
                    hints.insert("idempotentHint".into(), json!(true));
                }
                let (read_only, destructive) = settings.hints();
                if let Some(r) = read_only {
                    hints.insert("readOnlyHint".into(), json!(r));
                }
                if let Some(d) = destructive {
                    hints.insert("destructiveHint".into(), json!(d));
                }
                if !hints.is_empty() {
                    tool["annotations"] = Value::Object(hints);
                }
                serde_json::from_value(tool).ok()
            })
            .collect()
    }

    async fn call(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let user = self.user(&context.extensions)?;
        let modern = context
            .protocol_version()
            .is_some_and(|v| v.as_str() >= ProtocolVersion::V_2026_07_28.as_str());
        if modern && let Some(state) = &request.request_state {
            let digest = self
                .parked
                .digest(&request.name, request.arguments.as_ref());
            return self.resume(&user, &request, state, digest, &context).await;
        }
        // The session's capabilities are read in place; a 2026-07-28 request carries
        // its own.
        let asks = match modern {
            true => approve::can_ask(context.meta.client_capabilities().as_ref()),
            false => context
                .peer
                .peer_info()
                .is_some_and(|info| approve::can_ask(Some(&info.capabilities))),
        };
        // What binds a parked call to its retry: only a call that may be parked pays
        // for it.
        let digest = (modern && asks).then(|| {
            self.parked
                .digest(&request.name, request.arguments.as_ref())
        });
        let name = request.name.to_string();
        let arguments = request.arguments.map_or(json!({}), Value::Object);
        let call = ToolCall::new(name.clone(), arguments);
        let token = context.meta.get_progress_token();
        let (tx, mut rx) = mpsc::channel(PROGRESS_BUFFER);
        let (phase_tx, mut phase) = match asks {
            true => {
                let (tx, rx) = watch::channel(Phase::Idle);
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let sink = CallSink {
            events: (self.events)(&user),
            progress: token.is_some().then_some(tx),
            phase: phase_tx,
        };
        let mut forward = token.map(|token| Forward {
            peer: context.peer.clone(),
            token,
            last: f64::NEG_INFINITY,
        });
        let who: Option<Arc<str>> = asks.then(|| Arc::from(user.user_id()));
        let dispatcher = self.engine.dispatcher().sink(sink).user(user);
        let mut dispatch: BoxFuture<'static, Result<ToolOutput, DispatchError>> =
            Box::pin(async move { dispatcher.dispatch(call).await });
        let mut asked: Option<Asked> = None;
        // The call, its progress and its approval on one task; a cancelled request
        // drops the dispatch: the call ends `cancelled`, paired.
        let result = loop {
            tokio::select! {
                biased;
                r = &mut dispatch => break Some(r),
                () = context.ct.cancelled() => break None,
                Some(p) = rx.recv(), if forward.is_some() => {
                    if let Some(f) = forward.as_mut() {
                        f.send(p).await;
                    }
                }
                Some(now) = async { watched(phase.as_mut()?).await }, if phase.is_some() => {
                    match now {
                        Phase::Waiting(q) if let (Some(digest), Some(rx), Some(who)) = (digest, &phase, &who) => {
                            let parked = self.parked.park(
                                who, &name, digest, q.clone(), rx.clone(), dispatch,
                            );
                            match parked {
                                Ok(state) => {
                                    let Some(ask) = approve::input_required(&q, &state) else {
                                        return Err(internal("the approval question"));
                                    };
                                    self.counters.elicitation(Elicitation::Asked);
                                    self.counters.elicitation(Elicitation::InputRequired);
                                    return Ok(CallToolResponse::InputRequired(ask));
                                }
                                Err(call) => dispatch = call,
                            }
                        }
                        Phase::Waiting(q) => {
                            if asked.is_none() {
                                asked = Asked::send(&context.peer, q, &self.counters).await;
                            }
                        }
                        Phase::Decided => {
                            if let Some(a) = asked.take() {
                                a.withdraw(&self.counters).await;
                            }
                        }
                        Phase::Idle => {}
                    }
                }
                answer = async { asked.as_mut()?.answer().await }, if asked.is_some() => {
                    if let (Some(a), Some(r), Some(who)) = (asked.take(), answer, &who) {
                        approve::decide(&self.engine, who, a.question(), &r, &self.counters).await;
                    }
                }
            }
        };
        if let Some(a) = asked.take() {
            a.withdraw(&self.counters).await;
        }
        // What progress is left goes out before the result, and nothing after it.
        if let Some(f) = forward.as_mut() {
            while let Ok(p) = rx.try_recv() {
                f.send(p).await;
            }
        }
        match result {
            Some(r) => answer(&r),
            None => Err(ErrorData::new(
                ErrorCode::INTERNAL_ERROR,
                "the request was cancelled",
                None,
            )),
        }
    }

    /// The retry of a call parked by an `input_required` result (2026-07-28).
    async fn resume(
        &self,
        user: &UserContext,
        request: &CallToolRequestParams,
        state: &str,
        digest: u64,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let unknown = || {
            ErrorData::invalid_params(
                "requestState is unknown, expired, or not this call's; call the tool again \
                 without it",
                None,
            )
        };
        let Some(mut ticket) = self
            .parked
            .find(state, user.user_id(), &request.name, digest)
        else {
            return Err(unknown());
        };
        match approve::response(request.input_responses.as_ref()) {
            Err(()) => {
                return Err(ErrorData::invalid_params(
                    "inputResponses.approval is not an elicitation result",
                    None,
                ));
            }
            Ok(Some(r)) => {
                approve::decide(
                    &self.engine,
                    user.user_id(),
                    &ticket.question,
                    &r,
                    &self.counters,
                )
                .await;
            }
            Ok(None) => {
                let waiting = matches!(*ticket.phase.borrow(), Phase::Waiting(_));
                if waiting && ticket.result.borrow().is_none() {
                    // Asked again: the answer is still needed.
                    let ask = approve::input_required(&ticket.question, state)
                        .ok_or_else(|| internal("the approval question"))?;
                    self.counters.elicitation(Elicitation::InputRequired);
                    return Ok(CallToolResponse::InputRequired(ask));
                }
            }
        }
        let outcome = tokio::select! {
            r = ticket.result.wait_for(Option::is_some) => r.ok().and_then(|r| r.clone()),
            () = context.ct.cancelled() => None,
        };
        let Some(outcome) = outcome else {
            return Err(ErrorData::new(
                ErrorCode::INTERNAL_ERROR,
                "the request was cancelled",
                None,
            ));
        };
        self.parked.spent(state);
        answer(&outcome)
    }
}

/// The next phase of a call's approval; `None` once the call's sink is gone.
async fn watched(phase: &mut watch::Receiver<Phase>) -> Option<Phase> {
    phase.changed().await.ok()?;
    Some(phase.borrow_and_update().clone())
}

fn internal(what: &str) -> ErrorData {
    ErrorData::new(
        ErrorCode::INTERNAL_ERROR,
        format!("{what} cannot be made"),
        None,
    )
}

/// The MCP answer to a call's result.
fn answer(result: &Result<ToolOutput, DispatchError>) -> Result<CallToolResponse, ErrorData> {
    match outcome(result) {
        Outcome::Result {
            content,
            structured,
            is_error,
        } => {
            let content: Vec<ContentBlock> = match content {
                Blocks::Text(text) => vec![ContentBlock::text(text)],
                // MCP's own shapes: read as rmcp's blocks.
                Blocks::Json(blocks) => blocks
                    .iter()
                    .filter_map(|b| ContentBlock::deserialize(b).ok())
                    .collect(),
            };
            let mut answer = match is_error {
                true => CallToolResult::error(content),
                false => CallToolResult::success(content),
            };
            answer.structured_content = structured.cloned();
            Ok(answer.into())
        }
        Outcome::ProtocolError {
            code,
            message,
            data,
        } => Err(ErrorData::new(
            ErrorCode(i32::try_from(code).unwrap_or(-32602)),
            message,
            Some(data),
        )),
    }
}

/// The JSON-RPC error for a method the server does not serve.
fn not_served(method: &str) -> ErrorData {
    ErrorData::new(
        ErrorCode::METHOD_NOT_FOUND,
        format!("method not found: {method}"),
        None,
    )
}

/// Methods of the protocol: a request naming one that rmcp could not read had bad
/// params (`-32602`), not an unknown method.
const KNOWN_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "server/discover",
    "subscriptions/listen",
];

/// What is wrong with the params of a `tools/call` rmcp could not read, in words
/// that quote no value.
fn bad_call_params(params: Option<&Value>) -> &'static str {
    let Some(Value::Object(p)) = params else {
        return "tools/call needs params: an object with `name`";
    };
    match p.get("name") {
        None | Some(Value::Null) => return "tools/call params need `name`",
        Some(Value::String(_)) => {}
        Some(_) => return "tools/call `name` must be a string",
    }
    match p.get("arguments") {
        None | Some(Value::Null | Value::Object(_)) => "tools/call params do not fit the method",
        Some(_) => "tools/call `arguments` must be an object",
    }
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_server_info(
            Implementation::new("tool-dispatch", env!("CARGO_PKG_VERSION")),
        )
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        self.counters.request("initialize");
        // The session is its initializer's from the first message.
        self.counted(self.user(&context.extensions))?;
        context.peer.set_peer_info(request.clone());
        self.counted(self.negotiate_initialize(&request))
    }

    async fn ping(&self, _context: RequestContext<RoleServer>) -> Result<(), ErrorData> {
        self.counters.request("ping");
        Ok(())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        self.counters.request("tools/list");
        let user = self.counted(self.user(&context.extensions))?;
        Ok(ListToolsResult::with_all_items(self.tools(&user)))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        self.counters.request("tools/call");
        let answer = self.call(request, context).await;
        self.counted(answer)
    }

    async fn on_custom_request(
        &self,
        request: CustomRequest,
        _context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, ErrorData> {
        let method = request.method.as_str();
        self.counters.request(method);
        let error = match method {
            "tools/call" => {
                ErrorData::invalid_params(bad_call_params(request.params.as_ref()), None)
            }
            m if KNOWN_METHODS.contains(&m) => {
                ErrorData::invalid_params(format!("invalid params for {m}"), None)
            }
            m => not_served(m),
        };
        self.counted(Err(error))
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        self.counters.request("resources/list");
        self.counted(Err(not_served("resources/list")))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        self.counters.request("resources/templates/list");
        self.counted(Err(not_served("resources/templates/list")))
    }

    async fn read_resource(
        &self,
        _request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        self.counters.request("resources/read");
        self.counted(Err(not_served("resources/read")))
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        self.counters.request("prompts/list");
        self.counted(Err(not_served("prompts/list")))
    }

    async fn get_prompt(
        &self,
        _request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        self.counters.request("prompts/get");
        self.counted(Err(not_served("prompts/get")))
    }

    async fn complete(
        &self,
        _request: CompleteRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, ErrorData> {
        self.counters.request("completion/complete");
        self.counted(Err(not_served("completion/complete")))
    }
}
