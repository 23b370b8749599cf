//! The [`Dispatcher`]: one per request, bound to one user and one event sink for
//! life; and the calls it takes (by name, typed, batches).

use std::future::IntoFuture;

use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

use crate::call::{ToolCall, ToolOutput};
use crate::delivery::{NotSent, Now, Outbox, Role, Watch};
use crate::engine::{Engine, Inner, Occurrence};
use crate::error::DispatchError;
use crate::event::{AgentEvent, AgentUpdate, Event, Timestamp};
use crate::json::cut;
use crate::redact::encoded_len;
use crate::sink::{EventSink, SinkError};
use crate::state::{HasSink, HasUser, NoSink, NoUser, SinkUnset, UserUnset, WithSink, WithUser};
use crate::tool::Tool;
use crate::user::UserContext;

/// Runs tool calls for one user, streaming every step to that user's sink.
///
/// Made by [`Engine::dispatcher`] as `Dispatcher<NoSink, NoUser>`; `.sink(..)` and
/// `.user(..)`, in either order, make it the ready `Dispatcher` (the default type
/// parameters). Dispatching before both are set does not compile:
///
/// ```compile_fail
/// # use tool_dispatch::{Engine, Registry, ToolCall, UserContext};
/// # async fn f(engine: Engine) {
/// let user = UserContext::builder("alice").build().unwrap();
/// let d = engine.dispatcher().user(user); // no .sink(..)
/// d.dispatch(ToolCall::new("echo", serde_json::json!("hi"))).await;
/// # }
/// ```
#[must_use = "a dispatcher does nothing until it dispatches"]
pub struct Dispatcher<S = WithSink, U = WithUser> {
    inner: Arc<Inner>,
    sink: S,
    user: U,
}

impl<S: Clone, U: Clone> Clone for Dispatcher<S, U> {
    fn clone(&self) -> Self {
        Dispatcher {
            inner: Arc::clone(&self.inner),
            sink: self.sink.clone(),
            user: self.user.clone(),
        }
    }
}

impl<S: std::fmt::Debug, U: std::fmt::Debug> std::fmt::Debug for Dispatcher<S, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("sink", &self.sink)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A new dispatcher with neither sink nor user; set both before dispatching.
    pub fn dispatcher(&self) -> Dispatcher<NoSink, NoUser> {
        Dispatcher {
            inner: Arc::clone(self.inner()),
            sink: NoSink,
            user: NoUser,
        }
    }
}

impl<S, U> Dispatcher<S, U> {
    /// Binds the user's event sink, for life. Any [`EventSink`]; a bounded
    /// `tokio::sync::mpsc::Sender<Event>` drained by the WebSocket writer is the usual.
    pub fn sink(self, sink: impl EventSink) -> Dispatcher<WithSink, U>
    where
        S: SinkUnset,
    {
        Dispatcher {
            sink: WithSink(self.inner.outbox(Arc::new(sink))),
            inner: self.inner,
            user: self.user,
        }
    }

    /// Binds the user, for life.
    pub fn user(self, user: impl Into<Arc<UserContext>>) -> Dispatcher<S, WithUser>
    where
        U: UserUnset,
    {
        Dispatcher {
            user: self.inner.bind(user.into()),
            inner: self.inner,
            sink: self.sink,
        }
    }

    /// The user this dispatcher acts for.
    pub fn user_context(&self) -> &UserContext
    where
        U: HasUser,
    {
        &self.user.user().ctx
    }

    /// Runs one call by name with JSON arguments.
    ///
    /// Emits exactly one `tool_executing` and one `tool_completed` for it, whatever
    /// happens; errors come back as a [`DispatchError`] whose status the completed
    /// event also carries. The call starts when this is called: a future dropped
    /// before it is polled is a cancelled call, with its pair.
    ///
    /// (The future is boxed so that its type names neither typestate parameter: a
    /// dispatcher missing its sink and its user gets exactly one error for each.)
    pub fn dispatch(&self, call: ToolCall) -> BoxFuture<'_, Result<ToolOutput, DispatchError>>
    where
        S: HasSink,
        U: HasUser,
    {
        let (outbox, user) = (self.sink.sink(), self.user.user());
        Box::pin(
            self.inner
                .dispatch_json(outbox, user, call, Occurrence::First),
        )
    }

    /// Runs a batch of calls (a model's parallel tool calls) concurrently in the
    /// caller's task, and returns their results in call order.
    ///
    /// Call ids must be unique: a call whose id an earlier call of the batch has, or
    /// that a call of this user still in flight has, is not run; it ends
    /// `invalid_input` under a fresh id (its events are distinguishable on the wire),
    /// and its result still comes back in its place.
    pub fn dispatch_all(
        &self,
        calls: impl IntoIterator<Item = ToolCall>,
    ) -> BoxFuture<'_, Vec<Result<ToolOutput, DispatchError>>>
    where
        S: HasSink,
        U: HasUser,
    {
        let (outbox, user) = (self.sink.sink(), self.user.user());
        let mut seen = std::collections::HashSet::new();
        let calls = calls.into_iter().map(|c| {
            let repeat = c.id.as_ref().is_some_and(|id| !seen.insert(id.clone()));
            let occurrence = if repeat {
                Occurrence::Repeat
            } else {
                Occurrence::First
            };
            self.inner.dispatch_json(outbox, user, c, occurrence)
        });
        Box::pin(futures_util::future::join_all(calls.collect::<Vec<_>>()))
    }

    /// A typed call of tool `T`: no JSON round trip for the input, a typed output.
    /// Await it directly, or set `.id(..)` / `.timeout(..)` first.
    ///
    /// Passing the wrong input type is a compile error.
    pub fn call<T: Tool>(&self, input: T::Input) -> TypedCall<'_, T>
    where
        S: HasSink,
        U: HasUser,
    {
        TypedCall {
            inner: &self.inner,
            outbox: self.sink.sink(),
            user: self.user.user(),
            input,
            id: None,
            timeout: None,
        }
    }

    /// Pushes an agent lifecycle event (`agent_started`, `agent_thinking`,
    /// `agent_completed`, `agent_error`) into the same ordered stream as the tool
    /// events, under the same delivery rules: an error when it cannot be delivered.
    pub fn notify(&self, update: AgentUpdate) -> BoxFuture<'_, Result<(), SinkError>>
    where
        S: HasSink,
        U: HasUser,
    {
        let ctx = &self.user.user().ctx;
        let max = self.inner.max_text();
        let mut e = AgentEvent {
            run_id: ctx.run_id.clone(),
            thread_id: ctx.thread_id.clone(),
            user_id: Arc::clone(&ctx.user_id),
            message: None,
            result: None,
            timestamp: Timestamp::now(),
        };
        let event = match update {
            AgentUpdate::Started(m) => {
                e.message = m.map(|m| cut(&m, max));
                Event::AgentStarted(e)
            }
            AgentUpdate::Thinking(m) => {
                e.message = Some(cut(&m, max));
                Event::AgentThinking(e)
            }
            AgentUpdate::Completed(mut r) => {
                // What the front end sees of the agent's result: redacted and cut,
                // with nothing recursing over a value nested too deep.
                let ids = [ctx.run_id.as_deref(), ctx.thread_id.as_deref()];
                let others = 200 + encoded_len(&ctx.user_id);
                let others = others + ids.into_iter().flatten().map(encoded_len).sum::<usize>();
                self.inner.redaction().apply_beside(&mut r, &[], others);
                e.result = Some(r);
                Event::AgentCompleted(e)
            }
            AgentUpdate::Error(m) => {
                e.message = Some(cut(&m, max));
                Event::AgentError(e)
            }
        };
        let outbox = self.sink.sink();
        Box::pin(async move {
            let event = match outbox.send_now(event, &Role::Other) {
                Now::Sent => return Ok(()),
                Now::Failed(e) => return Err(e),
                Now::Wait(event) => event,
            };
            match outbox
                .deliver(event, &Role::Other, Watch::default(), &mut None)
                .await
            {
                Ok(_) | Err(NotSent::Interrupted) => Ok(()),
                Err(NotSent::Sink(e)) => Err(e),
            }
        })
    }
}

/// A typed call in preparation; `.await` it. See [`Dispatcher::call`].
#[must_use = "a call does nothing until it is awaited"]
pub struct TypedCall<'a, T: Tool> {
    inner: &'a Arc<Inner>,
    outbox: &'a Arc<Outbox>,
    user: &'a WithUser,
    input: T::Input,
    id: Option<String>,
    timeout: Option<Duration>,
}

impl<T: Tool> std::fmt::Debug for TypedCall<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedCall")
            .field("tool", &T::NAME)
            .field("id", &self.id)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<'a, T: Tool> TypedCall<'a, T> {
    /// Sets the call id (the model's tool-call id).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets a timeout for this call only.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

impl<'a, T: Tool> IntoFuture for TypedCall<'a, T> {
    type Output = Result<ToolOutput<T::Output>, DispatchError>;
    type IntoFuture = BoxFuture<'a, Result<ToolOutput<T::Output>, DispatchError>>;

    fn into_future(self) -> Self::IntoFuture {
        let TypedCall {
            inner,
            outbox,
            user,
            input,
            id,
            timeout,
        } = self;
        Box::pin(inner.dispatch_typed::<T>(outbox, user, input, id, timeout))
    }
}
