//! What a [`Redis`](super::Redis) handle has seen: plain atomic counters, read as one
//! [`RedisStats`].

use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What the Redis limiter has seen.
///
/// ```no_run
/// # fn f(redis: &tool_dispatch::redis::Redis) {
/// let s = redis.stats();
/// println!("{} answers, {} failures, {} fallbacks", s.answers, s.failures, s.fallbacks);
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RedisStats {
    /// Requests Redis answered (rate checks, slot leases).
    pub answers: u64,
    /// Requests Redis did not answer in time (or answered with an error).
    pub failures: u64,
    /// Of those, the ones this node's own limiter decided instead.
    pub fallbacks: u64,
    /// Calls refused by the local pre-check without asking Redis.
    pub shed_locally: u64,
    /// Frames a shared run log recorded in Redis.
    pub log_appends: u64,
    /// Frames a shared run log could not record (Redis unreachable): the calls went
    /// on and their callers had their results; the runs' readers were told to resync.
    pub log_failures: u64,
    /// The last failure, if the last rate check failed.
    pub last_error: Option<String>,
}

/// The counters behind [`RedisStats`], shared by every part of one handle.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) answers: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) fallbacks: AtomicU64,
    pub(super) shed: AtomicU64,
    pub(super) log_appends: AtomicU64,
    pub(super) log_failures: AtomicU64,
    pub(super) last_error: Mutex<Option<String>>,
}

impl Counters {
    pub(super) fn snapshot(&self) -> RedisStats {
        RedisStats {
            answers: self.answers.load(Relaxed),
            failures: self.failures.load(Relaxed),
            fallbacks: self.fallbacks.load(Relaxed),
            shed_locally: self.shed.load(Relaxed),
            log_appends: self.log_appends.load(Relaxed),
            log_failures: self.log_failures.load(Relaxed),
            last_error: self.last_error().clone(),
        }
    }

    pub(super) fn last_error(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
