//! Typestate markers. Their paths are what compiler errors show, so they read as
//! sentences: `Dispatcher<NoSink, WithUser>`.
//!
//! Every trait here is sealed: only this crate implements them. Each carries a
//! `#[diagnostic::on_unimplemented]` message, and the bound sits on the method that
//! needs it, so the first line of the error says what is missing and what to call.

use std::sync::Arc;

use crate::delivery::Outbox;
use crate::limits::UserState;
use crate::user::UserContext;

#[allow(unreachable_pub, private_interfaces)] // sealed: public in a private module on purpose
mod sealed {
    use super::*;

    #[diagnostic::on_unimplemented(
        message = "`{Self}` is not a tool-dispatch state marker",
        note = "the typestate markers are sealed: only tool-dispatch implements them; dispatchers come from `engine.dispatcher().sink(..).user(..)`"
    )]
    pub trait Sealed {}

    #[diagnostic::on_unimplemented(
        message = "`{Self}` is not a tool-dispatch state marker",
        note = "the typestate markers are sealed; only `.sink(..)` makes a `WithSink`"
    )]
    pub trait SinkAccess {
        fn sink(&self) -> &Arc<Outbox>;
    }

    #[diagnostic::on_unimplemented(
        message = "`{Self}` is not a tool-dispatch state marker",
        note = "the typestate markers are sealed; only `.user(..)` makes a `WithUser`"
    )]
    pub trait UserAccess {
        fn user(&self) -> &WithUser;
    }
}
pub(crate) use sealed::{SinkAccess, UserAccess};

/// A dispatcher with no event sink yet. Set one with `.sink(..)`.
#[derive(Debug, Clone, Copy)]
pub struct NoSink;

/// A dispatcher bound to its user's event sink (type-erased).
#[derive(Clone)]
pub struct WithSink(pub(crate) Arc<Outbox>);

/// A dispatcher with no user yet. Set one with `.user(..)`.
#[derive(Debug, Clone, Copy)]
pub struct NoUser;

/// A dispatcher bound to one user.
#[derive(Clone)]
pub struct WithUser {
    pub(crate) ctx: Arc<UserContext>,
    pub(crate) state: Arc<UserState>,
}

impl std::fmt::Debug for WithSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WithSink")
    }
}

impl std::fmt::Debug for WithUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WithUser").field(&self.ctx.user_id).finish()
    }
}

impl sealed::Sealed for NoSink {}
impl sealed::Sealed for WithSink {}
impl sealed::Sealed for NoUser {}
impl sealed::Sealed for WithUser {}

#[allow(private_interfaces)] // sealed: the outbox never leaves the crate
impl SinkAccess for WithSink {
    fn sink(&self) -> &Arc<Outbox> {
        &self.0
    }
}

impl UserAccess for WithUser {
    fn user(&self) -> &WithUser {
        self
    }
}

/// Implemented by [`WithSink`] only: the dispatcher can deliver events.
#[diagnostic::on_unimplemented(
    message = "this dispatcher has no event sink: call `.sink(..)` before dispatching",
    label = "dispatching needs an event sink",
    note = "every call streams `tool_executing`/`tool_completed` to the user's WebSocket; pass its bounded `mpsc::Sender<Event>` with `.sink(tx)`"
)]
pub trait HasSink: sealed::Sealed + SinkAccess {}
impl HasSink for WithSink {}

/// Implemented by [`WithUser`] only: the dispatcher knows whom it acts for.
#[diagnostic::on_unimplemented(
    message = "this dispatcher has no user: call `.user(..)` before dispatching",
    label = "dispatching needs a user context",
    note = "a dispatcher acts for exactly one user; pass a `UserContext` with `.user(ctx)`"
)]
pub trait HasUser: sealed::Sealed + UserAccess {}
impl HasUser for WithUser {}

/// Implemented by [`NoSink`] only: a sink may still be set.
#[diagnostic::on_unimplemented(
    message = "this dispatcher already has an event sink: it is bound to one sink for life",
    label = "the sink was set before",
    note = "get a new dispatcher with `engine.dispatcher()` for another connection"
)]
pub trait SinkUnset: sealed::Sealed {}
impl SinkUnset for NoSink {}

/// Implemented by [`NoUser`] only: a user may still be set.
#[diagnostic::on_unimplemented(
    message = "this dispatcher already has a user: it is bound to one user for life",
    label = "the user was set before",
    note = "get a new dispatcher with `engine.dispatcher()` for another user"
)]
pub trait UserUnset: sealed::Sealed {}
impl UserUnset for NoUser {}
