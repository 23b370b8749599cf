//! Tools of a remote MCP server, run through this engine's pipeline.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientRequest, ProgressNotificationParam, ProgressToken,
    Request, ServerResult,
};
use rmcp::service::{NotificationContext, PeerRequestOptions, RequestHandle, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};

use crate::registry::RegistryBuilder;
use crate::tool::{ToolContext, ToolError, ToolSettings, schema_tool};

/// Progress notifications kept for a call whose route is not known yet (a fast
/// server can report before the request's handle is back).
const EARLY: usize = 256;

/// Why [`McpImport`] could not import a server's tools.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The server process could not be started.
    #[error("the MCP server could not be started: {0}")]
    Start(String),
    /// The server did not complete the MCP handshake.
    #[error("the MCP server did not complete the handshake: {0}")]
    Handshake(String),
    /// The server did not list its tools.
    #[error("the MCP server did not list its tools: {0}")]
    List(String),
}

/// The tools of a remote MCP server, ready to add to a registry with
/// [`RegistryBuilder::mcp`]: each is called like any local tool (validated against
/// the remote's JSON Schema, then policy, limits, timeout, cancellation, events,
/// metrics), and its call goes to the remote.
///
/// - The remote's `isError` results are tool errors (status `error`); a remote that
///   dies, answers with a protocol error or with something that is not a tool
///   result makes a typed tool error too, never a panic or a hang (a hung remote
///   meets the tool's timeout).
/// - A call that ends early (timeout, `cancel_user`, a dropped dispatch) sends
///   `notifications/cancelled` to the remote.
/// - The remote's `notifications/progress` become `tool_progress` (`progress /
///   total`, or `progress` itself when the remote sends no total and stays within
///   0..=1).
/// - A remote tool named like a local one makes [`RegistryBuilder::build`] fail with
///   a duplicate name; [`prefix`](Self::prefix) avoids that.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use tool_dispatch::Registry;
/// use tool_dispatch::mcp::McpImport;
/// let mut command = tokio::process::Command::new("python3");
/// command.arg("weather_server.py");
/// let remote = McpImport::spawn(command).await?.prefix("weather_");
/// let registry = Registry::builder().mcp(&remote).build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct McpImport {
    client: Arc<RunningService<RoleClient, Progress>>,
    tools: Vec<rmcp::model::Tool>,
    prefix: String,
    settings: ToolSettings,
}

impl std::fmt::Debug for McpImport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpImport")
            .field("tools", &self.names())
            .finish_non_exhaustive()
    }
}

impl McpImport {
    /// Starts `command` as an MCP server over stdio (killed when the last handle
    /// goes), completes the handshake and lists its tools.
    pub async fn spawn(command: tokio::process::Command) -> Result<McpImport, ImportError> {
        let transport =
            TokioChildProcess::new(command).map_err(|e| ImportError::Start(e.to_string()))?;
        McpImport::connect(transport).await
    }

    /// Connects to the MCP server at `url` over streamable HTTP, with `bearer` as its
    /// `Authorization: Bearer` token when given, and lists its tools. Plain `http`
    /// works as is; `https` needs a TLS backend in rmcp's reqwest (add `rmcp` with
    /// its `reqwest` feature to your own dependencies).
    pub async fn http(url: &str, bearer: Option<&str>) -> Result<McpImport, ImportError> {
        let mut config = StreamableHttpClientTransportConfig::with_uri(url);
        if let Some(token) = bearer {
            config = config.auth_header(token);
        }
        McpImport::connect(StreamableHttpClientTransport::from_config(config)).await
    }

    async fn connect<T, E, A>(transport: T) -> Result<McpImport, ImportError>
    where
        T: rmcp::transport::IntoTransport<RoleClient, E, A>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let client = Progress::default()
            .serve(transport)
            .await
            .map_err(|e| ImportError::Handshake(e.to_string()))?;
        let tools = client
            .list_all_tools()
            .await
            .map_err(|e| ImportError::List(e.to_string()))?;
        Ok(McpImport {
            client: Arc::new(client),
            tools,
            prefix: String::new(),
            settings: ToolSettings::new(),
        })
    }

    /// Adds `prefix` to every imported tool's name (the remote still gets its own).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The settings of every imported tool (timeout, scopes, limits, approval, …).
    pub fn settings(mut self, settings: ToolSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The names the tools get here, in the remote's order.
    pub fn names(&self) -> Vec<String> {
        self.tools
            .iter()
            .map(|t| format!("{}{}", self.prefix, t.name))
            .collect()
    }
}

impl RegistryBuilder {
    /// Adds the tools of a remote MCP server; see [`McpImport`].
    pub fn mcp(mut self, remote: &McpImport) -> Self {
        for tool in &remote.tools {
            let name = format!("{}{}", remote.prefix, tool.name);
            let description = tool.description.as_deref().unwrap_or_default().to_owned();
            let schema = Value::Object(tool.input_schema.as_ref().clone());
            let remote_name = tool.name.to_string();
            let client = Arc::clone(&remote.client);
            let body = move |args: Value, cx: ToolContext| {
                let client = Arc::clone(&client);
                let remote_name = remote_name.clone();
                async move { call(&client, remote_name, args, cx).await }
            };
            self = self.tool(
                schema_tool(name, description, schema, body).settings(remote.settings.clone()),
            );
        }
        self
    }
}

/// One call on the remote, under the call's cancellation.
async fn call(
    client: &RunningService<RoleClient, Progress>,
    name: String,
    args: Value,
    cx: ToolContext,
) -> Result<Value, ToolError> {
    let mut params = CallToolRequestParams::new(name);
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let request = ClientRequest::CallToolRequest(Request::new(params));
    let mut handle = client
        .send_cancellable_request(request, PeerRequestOptions::no_options())
        .await
        .map_err(|e| ToolError::new(format!("the MCP server cannot be reached: {e}")))?;
    let progress = client.service();
    let _route = progress.route(&handle.progress_token, &cx);
    let response = std::mem::replace(&mut handle.rx, tokio::sync::oneshot::channel().1);
    // Whatever ends this call early (its timeout, a cancellation, a dropped future)
    // tells the remote.
    let mut pending = CancelOnDrop(Some(handle));
    let answer = tokio::select! {
        a = response => a,
        () = cx.cancelled() => return Err(ToolError::new("cancelled")),
    };
    pending.0 = None; // answered: nothing to cancel
    match answer {
        Ok(Ok(ServerResult::CallToolResult(result))) => result_value(result),
        Ok(Ok(_)) => Err(ToolError::new(
            "the MCP server answered with something that is not a tool result",
        )),
        Ok(Err(e)) => Err(ToolError::new(format!(
            "the MCP server failed the call: {e}"
        ))),
        Err(_) => Err(ToolError::new("the MCP server went away during the call")),
    }
}

/// A remote result as this tool's result: its structured content, else its text
/// (as JSON when it is JSON); `isError` is a tool error with the remote's text.
fn result_value(result: CallToolResult) -> Result<Value, ToolError> {
    let text: String = result
        .content
        .iter()
        .filter_map(|c| serde_json::to_value(c).ok())
        .filter_map(|c| c.get("text").and_then(Value::as_str).map(str::to_owned))
        .collect::<Vec<_>>()
        .join("\n");
    if result.is_error == Some(true) {
        let message = if text.is_empty() {
            "the remote tool failed".to_owned()
        } else {
            text
        };
        return Err(ToolError::new(message));
    }
    if let Some(structured) = result.structured_content {
        return Ok(structured);
    }
    Ok(serde_json::from_str(&text).unwrap_or(json!(text)))
}

/// Sends `notifications/cancelled` for a request still pending when dropped.
struct CancelOnDrop(Option<RequestHandle<RoleClient>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(handle) = self.0.take() else { return };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = handle
                    .cancel(Some("the call ended before the answer".into()))
                    .await;
            });
        }
    }
}

/// The client side's handler: routes the remote's progress to the calls' contexts.
#[derive(Default)]
struct Progress {
    state: Mutex<Routes>,
}

#[derive(Default)]
struct Routes {
    calls: HashMap<String, ToolContext>,
    /// Notifications that came before their call's route.
    early: VecDeque<(String, ProgressNotificationParam)>,
}

fn key(token: &ProgressToken) -> String {
    serde_json::to_string(token).unwrap_or_default()
}

impl Progress {
    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Routes `token`'s notifications to `cx` until the guard goes.
    fn route<'a>(&'a self, token: &ProgressToken, cx: &ToolContext) -> Route<'a> {
        let key = key(token);
        let mut routes = self.lock();
        let early: Vec<ProgressNotificationParam> = {
            let (mine, rest): (Vec<_>, Vec<_>) =
                routes.early.drain(..).partition(|(k, _)| *k == key);
            routes.early = rest.into();
            mine.into_iter().map(|(_, p)| p).collect()
        };
        routes.calls.insert(key.clone(), cx.clone());
        drop(routes);
        for p in early {
            report(cx, &p);
        }
        Route {
            progress: self,
            key,
        }
    }
}

/// Removes a call's route when dropped.
struct Route<'a> {
    progress: &'a Progress,
    key: String,
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        self.progress.lock().calls.remove(&self.key);
    }
}

fn report(cx: &ToolContext, p: &ProgressNotificationParam) {
    let fraction = match p.total {
        Some(total) if total > 0.0 => p.progress / total,
        _ if (0.0..=1.0).contains(&p.progress) => p.progress,
        _ => return,
    };
    cx.progress(fraction, p.message.clone().unwrap_or_default());
}

impl ClientHandler for Progress {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        let key = key(&params.progress_token);
        let mut routes = self.lock();
        match routes.calls.get(&key).cloned() {
            Some(cx) => {
                drop(routes);
                report(&cx, &params);
            }
            None => {
                if routes.early.len() >= EARLY {
                    routes.early.pop_front();
                }
                routes.early.push_back((key, params));
            }
        }
    }
}
