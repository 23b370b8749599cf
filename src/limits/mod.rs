//! Limits: per-user and global concurrency, per-user rate (GCRA), and the per-user
//! state that carries them; what the pipeline asks of them is the [`Limiter`] seam
//! (`limiter.rs`).
//!
//! The rate limiter is a hand-rolled GCRA on one `AtomicU64` per user rather than
//! `governor`: it lives in the same per-user entry as the concurrency slots and the
//! cancellation token (one lookup, at bind time, not per call), it reads tokio's clock
//! (so tests run on a paused clock, no real sleeps), and it tells exactly when an idle
//! user's state can be forgotten (its bucket is full again).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::contain::panic_message;
use crate::user::UserContext;

mod limiter;

#[cfg(feature = "redis")]
pub(crate) use limiter::Held;
pub(crate) use limiter::{
    Admit, Limiter, LimiterFactory, LocalLimiter, NoSlot, NotAdmitted, Permit, RateCheck,
    RateRefusal, Scope,
};

/// A sustained rate with a burst allowance.
///
/// ```
/// use std::time::Duration;
/// use tool_dispatch::Rate;
/// let r = Rate::per_minute(100).burst(10);
/// assert_eq!(r.interval(), Duration::from_millis(600));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    count: u32,
    per: Duration,
    burst: u32,
}

impl Rate {
    /// `count` calls per `per`, with a burst of `count`. A zero count or period is
    /// read as 1.
    pub fn new(count: u32, per: Duration) -> Self {
        let count = count.max(1);
        Rate {
            count,
            per: per.max(Duration::from_nanos(1)),
            burst: count,
        }
    }

    /// `count` calls per minute, burst `count`.
    pub fn per_minute(count: u32) -> Self {
        Self::new(count, Duration::from_secs(60))
    }

    /// `count` calls per second, burst `count`.
    pub fn per_second(count: u32) -> Self {
        Self::new(count, Duration::from_secs(1))
    }

    /// How many calls may arrive at once after a quiet period (at least 1).
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst.max(1);
        self
    }

    /// Time between two calls at the sustained rate.
    pub fn interval(&self) -> Duration {
        self.per / self.count
    }

    fn interval_ns(&self) -> u64 {
        u64::try_from(self.interval().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// The limits that apply to one user; what the resolver given to
/// [`Limits::per_user_with`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimits {
    /// Concurrent calls of this user (default 10).
    pub concurrency: usize,
    /// Rate of this user's calls (default 100 per minute), `None` for unlimited.
    pub rate: Option<Rate>,
}

impl Default for UserLimits {
    fn default() -> Self {
        UserLimits {
            concurrency: 10,
            rate: Some(Rate::per_minute(100)),
        }
    }
}

/// Maps a user to their limits (a plan tier, a role…). Called when a user's state is
/// created; an idle user's state is forgotten, so a changed tier applies from the next
/// time they come back.
pub(crate) type UserLimitResolver = Arc<dyn Fn(&UserContext) -> UserLimits + Send + Sync>;

/// Engine-wide limits.
///
/// ```
/// use std::time::Duration;
/// use tool_dispatch::{Limits, Rate, UserLimits};
/// let limits = Limits::default()
///     .global(200)
///     .per_user(UserLimits { concurrency: 4, rate: Some(Rate::per_minute(60).burst(5)) })
///     .max_wait(Duration::from_millis(250));
/// # let _ = limits;
/// ```
#[derive(Clone)]
pub struct Limits {
    pub(crate) global: usize,
    pub(crate) max_wait: Duration,
    pub(crate) resolver: UserLimitResolver,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("global", &self.global)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            global: 100,
            max_wait: Duration::from_secs(5),
            resolver: Arc::new(|_| UserLimits::default()),
        }
    }
}

impl Limits {
    /// Concurrent calls across all users (default 100; at least 1, at most
    /// [`Semaphore::MAX_PERMITS`]).
    pub fn global(mut self, n: usize) -> Self {
        self.global = n.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// The same limits for every user.
    pub fn per_user(mut self, limits: UserLimits) -> Self {
        self.resolver = Arc::new(move |_| limits);
        self
    }

    /// Limits chosen per user, from their context.
    pub fn per_user_with(
        mut self,
        resolver: impl Fn(&UserContext) -> UserLimits + Send + Sync + 'static,
    ) -> Self {
        self.resolver = Arc::new(resolver);
        self
    }

    /// How long a call waits for a free concurrency slot before it ends with
    /// [`DispatchError::Busy`](crate::DispatchError::Busy) (default 5 s).
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }
}

/// GCRA state: the theoretical arrival time, in ns since the engine's epoch.
#[derive(Debug)]
pub(crate) struct Gcra {
    interval_ns: u64,
    tolerance_ns: u64,
    tat: AtomicU64,
}

impl Gcra {
    fn new(rate: Rate) -> Self {
        let interval_ns = rate.interval_ns();
        Gcra {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(rate.burst - 1)),
            tat: AtomicU64::new(0),
        }
    }

    /// Admits one call at `now_ns`, or says how long until one would be admitted.
    pub(crate) fn check(&self, now_ns: u64) -> Result<(), Duration> {
        let mut tat = self.tat.load(Relaxed);
        loop {
            let t = tat.max(now_ns);
            let ahead = t - now_ns;
            if ahead > self.tolerance_ns {
                return Err(Duration::from_nanos(ahead - self.tolerance_ns));
            }
            let next = t.saturating_add(self.interval_ns);
            match self.tat.compare_exchange_weak(tat, next, Relaxed, Relaxed) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Whether [`check`](Self::check) would admit one call at `now_ns`, without
    /// counting it.
    fn peek(&self, now_ns: u64) -> Result<(), Duration> {
        let ahead = self.tat.load(Relaxed).saturating_sub(now_ns);
        match ahead > self.tolerance_ns {
            true => Err(Duration::from_nanos(ahead - self.tolerance_ns)),
            false => Ok(()),
        }
    }

    /// The emission interval and the burst tolerance, in microseconds (what a
    /// shared limiter's script takes).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn micros(&self) -> (u64, u64) {
        (self.interval_ns / 1_000, self.tolerance_ns / 1_000)
    }

    /// Whether the bucket is full again (the state can be forgotten).
    fn is_idle(&self, now_ns: u64) -> bool {
        self.tat.load(Relaxed) <= now_ns
    }
}

/// A user's cancellation tokens: the user's own, replaced each time it is cancelled,
/// and one per run with calls in flight (a child of the user's).
struct Tokens {
    user: Arc<CancellationToken>,
    runs: HashMap<Arc<str>, std::sync::Weak<CancellationToken>>,
}

/// Everything the engine keeps for one user: slots, rate, cancellation, counters.
pub(crate) struct UserState {
    pub(crate) user_id: Arc<str>,
    /// The user's concurrent-call limit (what `slots` was made with).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) concurrency: usize,
    /// Limits kept in this process even when the engine shares them (the health
    /// probe's own user).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) local_only: bool,
    pub(crate) slots: Semaphore,
    pub(crate) rate: Option<Gcra>,
    /// Behind an `Arc` so a call takes it with one reference-count increment; cloning
    /// the token itself locks its tree node (twice per call, with the drop).
    cancel: Mutex<Tokens>,
    /// Ids of this user's calls in flight that the caller chose (generated ids are
    /// unique by construction): a second call may not reuse one while it runs.
    ids: Mutex<HashSet<Arc<str>>>,
    pub(crate) active: AtomicUsize,
    pub(crate) finished: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) cancelled: AtomicU64,
}

impl UserState {
    /// The token this user's calls watch; replaced each time it is cancelled.
    pub(crate) fn token(&self) -> Arc<CancellationToken> {
        Arc::clone(
            &self
                .cancel
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .user,
        )
    }

    /// The token a call of `run` watches (a child of the user's, so `cancel_user`
    /// reaches it too), and the user's token it descends from.
    pub(crate) fn run_tokens(
        &self,
        run: &Arc<str>,
    ) -> (Arc<CancellationToken>, Arc<CancellationToken>) {
        let mut t = self.cancel.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(token) = t.runs.get(run).and_then(std::sync::Weak::upgrade) {
            return (token, Arc::clone(&t.user));
        }
        if t.runs.len() >= 32 {
            t.runs.retain(|_, w| w.strong_count() > 0); // runs with no call in flight
        }
        let token = Arc::new(t.user.child_token());
        t.runs.insert(Arc::clone(run), Arc::downgrade(&token));
        (token, Arc::clone(&t.user))
    }

    /// Cancels the calls in flight of one run; returns how many there were.
    pub(crate) fn cancel_run(&self, run: &str) -> usize {
        let token = {
            let mut t = self.cancel.lock().unwrap_or_else(PoisonError::into_inner);
            t.runs.remove(run).and_then(|w| w.upgrade())
        };
        match token {
            // Each call in flight holds the token once.
            Some(token) => {
                token.cancel();
                Arc::strong_count(&token) - 1
            }
            None => 0,
        }
    }

    /// Claims `id` for a call in flight; `false` if a running call of this user has it.
    pub(crate) fn claim_id(&self, id: &Arc<str>) -> bool {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        ids.insert(Arc::clone(id))
    }

    /// Frees an id claimed by [`claim_id`](Self::claim_id).
    pub(crate) fn release_id(&self, id: &str) {
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// A state for a user outside the table (the health probe's own).
    pub(crate) fn detached(
        user_id: Arc<str>,
        limits: UserLimits,
        token: CancellationToken,
    ) -> Self {
        let concurrency = limits.concurrency.clamp(1, Semaphore::MAX_PERMITS);
        UserState {
            user_id,
            concurrency,
            local_only: false,
            slots: Semaphore::new(concurrency),
            rate: limits.rate.map(Gcra::new),
            cancel: Mutex::new(Tokens {
                user: Arc::new(token),
                runs: HashMap::new(),
            }),
            ids: Mutex::default(),
            active: AtomicUsize::new(0),
            finished: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
        }
    }

    /// The same state, its limits kept in this process whatever the engine shares.
    pub(crate) fn local_only(mut self) -> Self {
        self.local_only = true;
        self
    }

    /// Cancels the user's in-flight calls; later calls get a fresh token.
    pub(crate) fn cancel(&self, fresh: CancellationToken) {
        let old = {
            let mut t = self.cancel.lock().unwrap_or_else(PoisonError::into_inner);
            t.runs.clear(); // every run token descends from the old user token
            std::mem::replace(&mut t.user, Arc::new(fresh))
        };
        old.cancel();
    }
}

const SHARDS: usize = 32;

type Shard = Mutex<HashMap<Arc<str>, Arc<UserState>>>;

/// The per-user states, sharded; idle users are swept away.
pub(crate) struct Users {
    shards: Box<[Shard]>,
    hasher: RandomState,
    binds: AtomicUsize,
    epoch: Instant,
}

impl Users {
    pub(crate) fn new(epoch: Instant) -> Self {
        Users {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            binds: AtomicUsize::new(0),
            epoch,
        }
    }

    pub(crate) fn now_ns(&self, now: Instant) -> u64 {
        nanos_since(self.epoch, now)
    }

    fn shard(&self, user_id: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(user_id) as usize % SHARDS]
    }

    /// The state of `ctx`'s user, created with `resolver`'s limits if new.
    pub(crate) fn bind(
        &self,
        ctx: &UserContext,
        resolver: &UserLimitResolver,
        token: impl FnOnce() -> CancellationToken,
    ) -> Arc<UserState> {
        let n = self.binds.fetch_add(1, Relaxed);
        if n % 64 == 63 {
            self.sweep_shard((n / 64) % SHARDS, Instant::now());
        }
        let shard = self.shard(&ctx.user_id);
        let lock = || shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = lock().get(&ctx.user_id) {
            return Arc::clone(s);
        }
        // The resolver is the application's code, so it runs outside the lock (it may
        // call back into the engine), and a panic in it gives this user the default
        // limits rather than unwinding into the request.
        let limits = catch_unwind(AssertUnwindSafe(|| resolver(ctx))).unwrap_or_else(|p| {
            tracing::error!(panic = %panic_message(&*p), "the user-limit resolver panicked; default limits apply");
            UserLimits::default()
        });
        let fresh = Arc::new(UserState::detached(ctx.user_id.clone(), limits, token()));
        // Another dispatcher of this user may have been bound meanwhile: its state wins.
        let bound = Arc::clone(
            lock()
                .entry(ctx.user_id.clone())
                .or_insert_with(|| Arc::clone(&fresh)),
        );
        drop(fresh); // outside the lock
        bound
    }

    /// Drops states nobody holds (no dispatcher, no call) whose rate bucket is full.
    fn sweep_shard(&self, i: usize, now: Instant) {
        let now_ns = self.now_ns(now);
        let mut shard = self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let gone: Vec<_> = shard
            .extract_if(|_, s| {
                Arc::strong_count(s) == 1 && s.rate.as_ref().is_none_or(|g| g.is_idle(now_ns))
            })
            .collect();
        drop(shard);
        drop(gone); // the states (and their tokens) are dropped outside the lock
    }

    /// Sweeps every shard; returns how many states remain.
    pub(crate) fn sweep(&self) -> usize {
        let now = Instant::now();
        (0..SHARDS)
            .map(|i| {
                self.sweep_shard(i, now);
                self.shards[i]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .len()
            })
            .sum()
    }

    pub(crate) fn get(&self, user_id: &str) -> Option<Arc<UserState>> {
        self.shard(user_id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(user_id)
            .cloned()
    }

    /// Every state (for metrics, cancellation at shutdown).
    pub(crate) fn all(&self) -> Vec<Arc<UserState>> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// Nanoseconds from `epoch` to `now`, the unit of the GCRA buckets.
fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_allows_burst_then_spaces_calls() {
        let g = Gcra::new(Rate::per_second(10).burst(3));
        let ms = 1_000_000;
        assert!(g.check(0).is_ok() && g.check(0).is_ok() && g.check(0).is_ok());
        assert_eq!(g.check(0), Err(Duration::from_millis(100)));
        assert_eq!(g.check(40 * ms), Err(Duration::from_millis(60)));
        assert!(g.check(100 * ms).is_ok());
        assert!(g.check(100 * ms).is_err());
        assert!(!g.is_idle(100 * ms) && g.is_idle(400 * ms));
    }

    #[test]
    fn gcra_peek_answers_like_check_and_counts_nothing() {
        let g = Gcra::new(Rate::per_second(10).burst(2));
        let ms = 1_000_000;
        for _ in 0..5 {
            assert_eq!(g.peek(0), Ok(()));
        }
        assert!(g.check(0).is_ok() && g.check(0).is_ok());
        assert_eq!(g.peek(0), Err(Duration::from_millis(100)));
        assert_eq!(g.peek(30 * ms), g.check(30 * ms));
        assert_eq!(g.peek(100 * ms), Ok(()));
        assert!(g.check(100 * ms).is_ok());
    }
}
