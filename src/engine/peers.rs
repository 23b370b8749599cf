//! The seam a shared backend plugs into: the other nodes sharing this engine's users
//! ([`Peers`]: told of cancellations, and the store where a call waiting for approval
//! is recorded and claimed) and what the backend attaches to an engine ([`Shared`]).
//! The Redis module implements it; nothing in the pipeline knows which backend is in
//! use.

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::Engine;
use crate::approval::Verdict;
use crate::limits::LimiterFactory;

/// What one node tells the others sharing its users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Cancel the user's calls.
    CancelUser(String),
    /// Cancel the calls of the user's run.
    CancelRun(String, String),
}

/// Who holds a pending approval, as the shared store says (and, in saying it,
/// takes it: only one claim of a key ever succeeds).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) enum Claim {
    /// This node: decide here.
    Here,
    /// Another node, by name: the decision travels there.
    Elsewhere(String),
    /// Nobody: never pending, decided already, or no longer waiting.
    Nobody,
    /// The store cannot say now.
    Unreachable,
}

/// The other nodes sharing this engine's users (through Redis).
pub(crate) trait Peers: Send + Sync + 'static {
    /// Tells them, without waiting; `false` if they cannot be told now.
    fn tell(&self, signal: Signal) -> bool;
    /// Records that this node holds `user`'s call waiting for approval, for `ttl`.
    fn pending<'a>(&'a self, user: &'a str, call: &'a str, ttl: Duration) -> BoxFuture<'a, ()>;
    /// Takes the pending approval of `user`'s call: whoever gets it decides.
    fn claim<'a>(&'a self, user: &'a str, call: &'a str) -> BoxFuture<'a, Claim>;
    /// Sends a decision to the node that holds the call.
    fn deliver(&self, node: &str, user: &str, call: &str, verdict: Verdict) -> bool;
    /// Removes `user`'s call from the store, without waiting (it stopped waiting).
    fn forget(&self, user: &str, call: &str);
}

/// What a shared backend attaches to an engine: its limiter (built around the local
/// one), its peers, and what to do with the built engine (follow the peers' signals).
pub(crate) struct Shared {
    pub(crate) limiter: LimiterFactory,
    pub(crate) peers: Box<dyn Peers>,
    pub(crate) on_build: Box<dyn FnOnce(&Engine) + Send>,
}
