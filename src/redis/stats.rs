//! What a [`Redis`](super::Redis) handle has seen: plain atomic counters, read
//! together as one [`RedisStats`] (cheap enough for a metrics exporter to read on
//! every scrape).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// What a [`Redis`](super::Redis) handle has seen since it connected: every counter
/// only grows.
///
/// ```no_run
/// # fn f(redis: &tool_dispatch::redis::Redis) {
/// let s = redis.stats();
/// println!(
///     "{} round trips: {} errors, {} timeouts, {} reconnects; {} fallbacks",
///     s.round_trips, s.errors, s.timeouts, s.reconnects, s.fallbacks
/// );
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RedisStats {
    /// Requests sent to Redis by every part (limits, approvals, cancellations, run
    /// logs): a command, a script or a pipeline each.
    pub round_trips: u64,
    /// Of those, the ones Redis answered with an error, or that were lost with their
    /// connection.
    pub errors: u64,
    /// Of those, the ones Redis did not answer within
    /// [`RedisConfig::timeout`](super::RedisConfig::timeout).
    pub timeouts: u64,
    /// Connections to Redis made again after one was lost: the shared connection
    /// answering after a connection error, the run logs' reader connecting anew, the
    /// cancellation listener subscribing anew.
    pub reconnects: u64,
    /// Of those, the ones that gave concurrency leases back, which no call waits
    /// for: a call that ends gives its slot back this way, and a call whose answer
    /// was lost gives back what Redis may have taken for it. The leases given back
    /// together (calls that end at once) go in one request, and a user's next
    /// admission on the node carries their own last releases instead, so an admitted
    /// call waits for one request (the admission) and makes at most one of these. A
    /// lease Redis could not take back is given back with the next answer Redis gives
    /// (at most 10,000 kept, each until it would have expired by itself).
    pub releases: u64,
    /// The limiter's requests (admissions, rate checks, slot leases) Redis answered.
    pub answers: u64,
    /// The limiter's requests that got no answer (an error or a timeout).
    pub failures: u64,
    /// Questions this node's own limiter answered instead of Redis, with
    /// [`OnUnreachable::UseLocalLimits`](super::OnUnreachable::UseLocalLimits): after
    /// a failure, or without asking Redis while it is known to be away (for a second
    /// after a failure, then one call asks it again).
    pub fallbacks: u64,
    /// Calls refused by the local pre-check without asking Redis.
    pub shed_locally: u64,
    /// Frames a shared run log recorded in Redis.
    pub log_appends: u64,
    /// Frames a shared run log could not record (Redis unreachable): the calls went
    /// on and their callers had their results; the runs' readers were told to resync.
    pub log_failures: u64,
    /// The last failure, while Redis has not answered since.
    pub last_error: Option<String>,
}

/// The counters behind [`RedisStats`], shared by every part of one handle.
#[derive(Debug, Default)]
pub(super) struct Counters {
    round_trips: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    reconnects: AtomicU64,
    releases: AtomicU64,
    pub(super) answers: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) fallbacks: AtomicU64,
    pub(super) shed: AtomicU64,
    pub(super) log_appends: AtomicU64,
    pub(super) log_failures: AtomicU64,
    /// A request failed since the last answer.
    failing: AtomicBool,
    /// A connection was lost since the last answer (the connection manager makes a
    /// new one).
    lost: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Counters {
    pub(super) fn snapshot(&self) -> RedisStats {
        RedisStats {
            round_trips: self.round_trips.load(Relaxed),
            errors: self.errors.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            releases: self.releases.load(Relaxed),
            answers: self.answers.load(Relaxed),
            failures: self.failures.load(Relaxed),
            fallbacks: self.fallbacks.load(Relaxed),
            shed_locally: self.shed.load(Relaxed),
            log_appends: self.log_appends.load(Relaxed),
            log_failures: self.log_failures.load(Relaxed),
            last_error: self.last_error().clone(),
        }
    }

    pub(super) fn sent(&self) {
        self.round_trips.fetch_add(1, Relaxed);
    }

    /// A request gives a lease back (counted in `round_trips` when it is sent).
    pub(super) fn released(&self) {
        self.releases.fetch_add(1, Relaxed);
    }

    /// Redis answered: the failures are over (and a lost connection was made again).
    pub(super) fn answered(&self) {
        if self.failing.load(Relaxed) && self.failing.swap(false, Relaxed) {
            if self.lost.swap(false, Relaxed) {
                self.reconnected();
            }
            *self.last_error() = None;
        }
    }

    /// Redis answered with an error, or the request was lost with its connection.
    pub(super) fn error(&self, e: &::redis::RedisError) -> String {
        if e.is_timeout() {
            // The connection's own response timeout, racing the caller's.
            self.timeouts.fetch_add(1, Relaxed);
        } else {
            self.errors.fetch_add(1, Relaxed);
        }
        if e.is_connection_dropped() || e.is_connection_refusal() || e.is_unrecoverable_error() {
            self.lost.store(true, Relaxed);
        }
        self.failed(e.to_string())
    }

    /// Redis did not answer within `limit`.
    pub(super) fn timed_out(&self, limit: Duration) -> String {
        self.timeouts.fetch_add(1, Relaxed);
        self.failed(format!("no answer within {limit:?}"))
    }

    /// A connection of its own (a blocking reader's, a subscriber's) was made again.
    pub(super) fn reconnected(&self) {
        self.reconnects.fetch_add(1, Relaxed);
    }

    /// Records a failure; its message.
    pub(super) fn failed(&self, error: String) -> String {
        self.failing.store(true, Relaxed);
        *self.last_error() = Some(error.clone());
        error
    }

    fn last_error(&self) -> MutexGuard<'_, Option<String>> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
