#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

mod blocking;
pub mod cache;
mod contain;
mod delivery;
pub mod dispatcher;
pub mod engine;
pub mod error;
pub mod event;
pub mod health;
mod json;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod provider;
pub mod redact;
pub mod registry;
pub mod sink;
pub mod state;
mod time;
pub mod tool;
pub mod user;

#[cfg(feature = "axum")]
pub mod axum;

pub use cache::CacheConfig;
pub use dispatcher::{Arguments, Dispatcher, ToolCall, ToolOutput, TypedCall};
pub use engine::{Engine, EngineBuilder, ShutdownReport, UserShutdown};
pub use error::{CancelReason, DispatchError, LimitScope};
pub use event::{AgentUpdate, Event, Status};
pub use health::{Health, HealthStatus};
pub use limits::{Limits, Rate, UserLimits};
pub use metrics::MetricsSnapshot;
pub use policy::{Decision, Policy, ScopePolicy};
pub use redact::Redaction;
pub use registry::{Registry, RegistryError, ToolDefinition};
pub use sink::{EventSink, RecordingSink, SinkError};
pub use state::{NoSink, NoUser, WithSink, WithUser};
pub use tool::{Tool, ToolContext, ToolError, ToolSettings, blocking_fn, tool_fn};
pub use user::{UserContext, UserContextError};

mod assertions {
    use super::*;
    use static_assertions::assert_impl_all;

    assert_impl_all!(Engine: Send, Sync, Clone);
    assert_impl_all!(Dispatcher: Send, Sync, Clone);
    assert_impl_all!(Dispatcher<NoSink, NoUser>: Send, Sync);
    assert_impl_all!(Dispatcher<WithSink, NoUser>: Send, Sync);
    assert_impl_all!(Dispatcher<NoSink, WithUser>: Send, Sync);
    assert_impl_all!(Registry: Send, Sync);
    assert_impl_all!(UserContext: Send, Sync, Clone);
    assert_impl_all!(ToolContext: Send, Sync, Clone);
    assert_impl_all!(Event: Send, Sync, Clone);
    assert_impl_all!(DispatchError: Send, Sync, std::error::Error);
    assert_impl_all!(MetricsSnapshot: Send, Sync);
    assert_impl_all!(RecordingSink: EventSink);
    assert_impl_all!(tokio::sync::mpsc::Sender<Event>: EventSink);
    assert_impl_all!(dispatcher::TypedCallFuture<'static, serde_json::Value>: Send);

    /// The by-name dispatch future is `Send`: it can be spawned on a multi-thread runtime.
    #[allow(dead_code)]
    fn dispatch_future_is_send(d: &Dispatcher, c: ToolCall) -> impl Send + '_ {
        d.dispatch(c)
    }

    #[allow(dead_code)]
    fn batch_future_is_send(d: &Dispatcher, c: Vec<ToolCall>) -> impl Send + '_ {
        d.dispatch_all(c)
    }

    // Every public typestate, in every combination a builder passes through.
    assert_impl_all!(NoSink: Send, Sync, Clone, Copy);
    assert_impl_all!(NoUser: Send, Sync, Clone, Copy);
    assert_impl_all!(WithSink: Send, Sync, Clone);
    assert_impl_all!(WithUser: Send, Sync, Clone);
    assert_impl_all!(state::Open: Send, Sync, Clone, Copy);
    assert_impl_all!(state::Frozen: Send, Sync, Clone, Copy);
    assert_impl_all!(Registry<state::Open>: Send, Sync);
    assert_impl_all!(EngineBuilder: Send);
    assert_impl_all!(ToolCall: Send, Sync, Clone);
    assert_impl_all!(ToolOutput: Send, Sync, Clone);
    assert_impl_all!(std::sync::Arc<dyn EventSink>: Send, Sync, EventSink);

    /// A typed call, before and after `.into_future()`, is `Send` for every tool.
    #[allow(dead_code)]
    fn typed_call_is_send<T: Tool>(d: &Dispatcher, input: T::Input) -> impl Send + '_ {
        d.call::<T>(input)
    }

    #[allow(dead_code)]
    fn typed_call_future_is_send<T: Tool>(d: &Dispatcher, input: T::Input) -> impl Send + '_ {
        std::future::IntoFuture::into_future(d.call::<T>(input))
    }

    #[allow(dead_code)]
    fn notify_future_is_send(d: &Dispatcher, u: AgentUpdate) -> impl Send + '_ {
        d.notify(u)
    }

    #[allow(dead_code)]
    fn shutdown_future_is_send(e: &Engine) -> impl Send + '_ {
        e.shutdown(std::time::Duration::ZERO)
    }
}
