//! Send, Sync and Clone of every public state and every future a caller awaits, pinned
//! at compile time (tokio keeps these in `tests/async_send_sync.rs` too): a change
//! that makes a dispatch future `!Send` fails this file's build.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use static_assertions::assert_impl_all;
use tool_dispatch::event::{AgentUpdate, Event};
use tool_dispatch::*;

assert_impl_all!(Engine: Send, Sync, Clone);
assert_impl_all!(EngineBuilder: Send);
assert_impl_all!(Dispatcher: Send, Sync, Clone);
assert_impl_all!(Dispatcher<NoSink, NoUser>: Send, Sync);
assert_impl_all!(Dispatcher<WithSink, NoUser>: Send, Sync);
assert_impl_all!(Dispatcher<NoSink, WithUser>: Send, Sync);
assert_impl_all!(NoSink: Send, Sync, Clone, Copy);
assert_impl_all!(NoUser: Send, Sync, Clone, Copy);
assert_impl_all!(WithSink: Send, Sync, Clone);
assert_impl_all!(WithUser: Send, Sync, Clone);
assert_impl_all!(Registry: Send, Sync);
assert_impl_all!(RegistryBuilder: Send, Sync);
assert_impl_all!(UserContext: Send, Sync, Clone);
assert_impl_all!(ToolContext: Send, Sync, Clone);
assert_impl_all!(ToolCall: Send, Sync, Clone);
assert_impl_all!(ToolOutput: Send, Sync, Clone);
assert_impl_all!(Event: Send, Sync, Clone);
assert_impl_all!(DispatchError: Send, Sync, std::error::Error);
assert_impl_all!(MetricsSnapshot: Send, Sync);
assert_impl_all!(RecordingSink: EventSink);
assert_impl_all!(tokio::sync::mpsc::Sender<Event>: EventSink);
assert_impl_all!(Arc<dyn EventSink>: Send, Sync, EventSink);
assert_impl_all!(RunLog: Send, Sync, Clone);
assert_impl_all!(RunWriter: Send, Sync, Clone, EventSink);
assert_impl_all!(RunReader: Send);
#[cfg(feature = "redis")]
assert_impl_all!(tool_dispatch::redis::Redis: Send, Sync, Clone);
#[cfg(feature = "mcp")]
assert_impl_all!(tool_dispatch::mcp::McpServer: Send, Sync, Clone);
#[cfg(feature = "mcp")]
assert_impl_all!(tool_dispatch::mcp::McpImport: Send, Sync, Clone);
#[cfg(feature = "mcp")]
assert_impl_all!(tool_dispatch::mcp::ImportError: Send, Sync, std::error::Error);

/// A `schema_tool` is a tool like any other: registered, and its future is `Send`.
#[allow(dead_code)]
fn schema_tools_register() {
    let t = schema_tool("t", "d", serde_json::json!({}), |v, _cx| async move {
        Ok::<_, ToolError>(v)
    });
    let _ = Registry::builder().tool(t);
}

/// Every future a caller awaits is `Send`: it can be spawned on a multi-thread runtime.
#[allow(dead_code)]
fn futures_are_send<T: Tool>(d: &Dispatcher, e: &Engine, input: T::Input) {
    fn send<F: Send>(_: F) {}
    send(d.dispatch(ToolCall::new("x", serde_json::Value::Null)));
    send(d.dispatch_all(Vec::<ToolCall>::new()));
    send(d.notify(AgentUpdate::Thinking(String::new())));
    send(d.call::<T>(input).into_future());
    send(e.shutdown(Duration::ZERO));
    send(e.health());
}

/// And at run time: each kind of call, spawned on a multi-thread runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_call_runs_spawned_on_a_multi_thread_runtime() {
    let _ = futures_are_send::<NoopTool>;
    let reg = Registry::builder().tool(NoopTool).build().unwrap();
    let engine = Engine::builder(reg).build();
    let user = UserContext::builder("alice").build().unwrap();
    let d = engine.dispatcher().sink(RecordingSink::new()).user(user);
    let handles = [
        tokio::spawn({
            let d = d.clone();
            async move {
                d.dispatch(ToolCall::new("noop", serde_json::Value::Null))
                    .await
                    .is_ok()
            }
        }),
        tokio::spawn({
            let d = d.clone();
            async move { d.call::<NoopTool>(()).await.is_ok() }
        }),
        tokio::spawn({
            let d = d.clone();
            async move {
                d.dispatch_all(vec![ToolCall::new("noop", serde_json::Value::Null)])
                    .await[0]
                    .is_ok()
            }
        }),
        tokio::spawn({
            let d = d.clone();
            async move { d.notify(AgentUpdate::Thinking("hm".into())).await.is_ok() }
        }),
    ];
    for h in handles {
        assert!(h.await.unwrap());
    }
    assert_eq!(engine.metrics().total, 3);
}

struct NoopTool;

impl Tool for NoopTool {
    const NAME: &'static str = "noop";
    type Input = ();
    type Output = ();
    fn description(&self) -> &str {
        "Nothing."
    }
    async fn call(&self, _: (), _: ToolContext) -> Result<(), ToolError> {
        Ok(())
    }
}
