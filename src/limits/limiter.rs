//! The limiter seam: what the pipeline asks of its limits ([`Limiter`]), and the
//! limiter that keeps them in this process ([`LocalLimiter`]).

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::{UserState, nanos_since};

/// Which concurrency slot a call asks for.
pub(crate) enum Scope<'a> {
    /// One of the user's own slots.
    User(&'a UserState),
    /// One of a tool's slots.
    Tool(&'a Semaphore),
    /// One of the engine-wide slots.
    Global,
}

/// A held slot; released when dropped.
pub(crate) enum Permit<'a> {
    /// One of this process's semaphores.
    Local(#[allow(dead_code)] SemaphorePermit<'a>),
    /// A lease in a store shared with other processes; its guard releases it.
    /// (Boxed twice: a thin pointer keeps `Permit` as small as a semaphore permit.)
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Shared(Box<Box<dyn Held<'a> + 'a>>),
}

impl<'a> Permit<'a> {
    /// An engine-wide slot taken together with this user's slot, if the limiter took
    /// one (a shared limiter's admission may, to save the global step its own round
    /// trip): the call uses it as its global slot, or drops it (giving it back)
    /// before anything that waits.
    pub(crate) fn reserved(&mut self) -> Option<Permit<'a>> {
        match self {
            Permit::Local(_) => None,
            Permit::Shared(held) => held.reserved(),
        }
    }
}

/// Whatever keeps a slot held until it is dropped (a lease's guard, or a node's own
/// slot together with the cluster's).
pub(crate) trait Held<'a>: Send + Sync {
    /// See [`Permit::reserved`].
    fn reserved(&mut self) -> Option<Permit<'a>> {
        None
    }
}

/// Why no slot was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoSlot {
    /// None became free in time.
    InTime,
    /// A shared limiter could not be asked, and its policy is to fail closed.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Unreachable {
        /// When asking again makes sense.
        retry_after: Duration,
    },
}

/// Why the rate check did not admit a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateRefusal {
    /// Over the user's rate: one call would be admitted after this long.
    Limited(Duration),
    /// A shared limiter could not be asked, and its policy is to fail closed.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Unreachable {
        /// When asking again makes sense.
        retry_after: Duration,
    },
}

/// The answer of a rate check: at once (limits kept here), or later (a limiter in
/// another process).
pub(crate) enum RateCheck<'a> {
    Now(Result<(), RateRefusal>),
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Later(BoxFuture<'a, Result<(), RateRefusal>>),
}

/// Why [`Limiter::admit`] did not admit a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotAdmitted {
    /// The rate refused it (it took no slot).
    Rate(RateRefusal),
    /// No slot of the user's was had (it spent no rate).
    Slot(NoSlot),
}

/// The answer of [`Limiter::admit`]: at once, or later (a shared limiter's answer,
/// or a wait for one of the user's slots).
pub(crate) enum Admit<'a> {
    Now(Result<Permit<'a>, NotAdmitted>),
    Later(BoxFuture<'a, Result<Permit<'a>, NotAdmitted>>),
}

/// What the pipeline asks of its limits. [`LocalLimiter`] keeps them in this process;
/// a limiter shared by several processes implements the same questions.
pub(crate) trait Limiter: Send + Sync + 'static {
    /// Admits one call of `user`: its rate at `now`, then one of the user's own
    /// slots, waiting until `until` at the most for one to come free. In one
    /// question, so that a shared limiter answers both in one round trip. A call the
    /// rate refuses takes no slot; a call that gets no slot spends no rate (its rate
    /// is spent when it gets its slot, and checked again then if it waited).
    fn admit<'a>(&'a self, user: &'a UserState, now: Instant, until: Instant) -> Admit<'a>;
    /// The rate alone, for a call that takes its slot later (after its user's
    /// approval): admits one call of `user` at `now`, or says when one would be.
    fn rate<'a>(&'a self, user: &'a UserState, now: Instant) -> RateCheck<'a>;
    /// A slot of `scope` if one is free now.
    fn try_slot<'a>(&'a self, scope: &Scope<'a>) -> Option<Permit<'a>>;
    /// A slot of `scope`, waiting until `until` at the most.
    fn slot<'a>(
        &'a self,
        scope: Scope<'a>,
        until: Instant,
    ) -> BoxFuture<'a, Result<Permit<'a>, NoSlot>>;
    /// Share of the engine-wide slots in use, `0.0..=1.0`.
    fn saturation(&self) -> f64;
    /// Checks what the limiter depends on (a shared store); why it cannot do its
    /// job right now, for `health()`.
    fn probe(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async { None })
    }
}

/// Builds the engine's limiter around the local one (a shared limiter keeps the
/// local one for what it does not share, and to fall back on).
pub(crate) type LimiterFactory = Box<dyn FnOnce(LocalLimiter) -> Box<dyn Limiter> + Send>;

/// Limits kept in this process: GCRA buckets and semaphores.
pub(crate) struct LocalLimiter {
    global: Semaphore,
    size: usize,
    epoch: Instant,
}

impl LocalLimiter {
    pub(crate) fn new(global: usize, epoch: Instant) -> Self {
        LocalLimiter {
            global: Semaphore::new(global),
            size: global,
            epoch,
        }
    }

    fn semaphore<'a>(&'a self, scope: &Scope<'a>) -> &'a Semaphore {
        match scope {
            Scope::User(u) => &u.slots,
            Scope::Tool(s) => s,
            Scope::Global => &self.global,
        }
    }
}

impl LocalLimiter {
    /// The rate check against this process's own buckets.
    pub(crate) fn rate_here(&self, user: &UserState, now: Instant) -> Result<(), RateRefusal> {
        match &user.rate {
            None => Ok(()),
            Some(g) => g
                .check(nanos_since(self.epoch, now))
                .map_err(RateRefusal::Limited),
        }
    }
}

impl Limiter for LocalLimiter {
    fn admit<'a>(&'a self, user: &'a UserState, now: Instant, until: Instant) -> Admit<'a> {
        // The slot first, so that a call the rate refuses gives it straight back and
        // a call that must wait for one spends no rate until it has it.
        let Ok(slot) = user.slots.try_acquire() else {
            if let Some(g) = &user.rate
                && let Err(retry) = g.peek(nanos_since(self.epoch, now))
            {
                return Admit::Now(Err(NotAdmitted::Rate(RateRefusal::Limited(retry))));
            }
            return Admit::Later(Box::pin(async move {
                let Ok(Ok(slot)) = tokio::time::timeout_at(until, user.slots.acquire()).await
                else {
                    return Err(NotAdmitted::Slot(NoSlot::InTime));
                };
                self.rate_here(user, Instant::now())
                    .map(|()| Permit::Local(slot))
                    .map_err(NotAdmitted::Rate)
            }));
        };
        Admit::Now(
            self.rate_here(user, now)
                .map(|()| Permit::Local(slot))
                .map_err(NotAdmitted::Rate),
        )
    }

    fn rate<'a>(&'a self, user: &'a UserState, now: Instant) -> RateCheck<'a> {
        RateCheck::Now(self.rate_here(user, now))
    }

    fn try_slot<'a>(&'a self, scope: &Scope<'a>) -> Option<Permit<'a>> {
        self.semaphore(scope).try_acquire().ok().map(Permit::Local)
    }

    fn slot<'a>(
        &'a self,
        scope: Scope<'a>,
        until: Instant,
    ) -> BoxFuture<'a, Result<Permit<'a>, NoSlot>> {
        let sem = self.semaphore(&scope);
        Box::pin(async move {
            match tokio::time::timeout_at(until, sem.acquire()).await {
                Ok(Ok(p)) => Ok(Permit::Local(p)),
                _ => Err(NoSlot::InTime),
            }
        })
    }

    fn saturation(&self) -> f64 {
        let in_use = self.size - self.global.available_permits().min(self.size);
        in_use as f64 / self.size as f64
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::limits::{Rate, UserLimits};

    fn limiter_and_user(concurrency: usize, rate: Rate) -> (LocalLimiter, UserState) {
        let limits = UserLimits {
            concurrency,
            rate: Some(rate),
        };
        let user = UserState::detached("u".into(), limits, CancellationToken::new());
        (LocalLimiter::new(10, Instant::now()), user)
    }

    fn now<'a>(admit: Admit<'a>) -> Result<Permit<'a>, NotAdmitted> {
        match admit {
            Admit::Now(answer) => answer,
            Admit::Later(_) => panic!("answered later"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_rate_takes_no_slot_and_a_call_without_a_slot_spends_no_rate() {
        let (limiter, user) = limiter_and_user(1, Rate::per_second(10).burst(2));
        let (t, until) = (Instant::now(), Instant::now() + Duration::from_secs(1));
        let first = now(limiter.admit(&user, t, until)).expect("admitted");
        // No slot free: the call waits for one, having spent no rate.
        let waiting = match limiter.admit(&user, t, until) {
            Admit::Later(w) => w,
            Admit::Now(_) => panic!("no slot is free"),
        };
        drop(waiting); // it gave up
        drop(first);
        let second = now(limiter.admit(&user, t, until)).expect("the burst's second call");
        drop(second);
        // Over the rate, a free slot: refused, and the slot is still free.
        let refused = now(limiter.admit(&user, t, until)).err();
        let retry = Duration::from_millis(100);
        assert_eq!(
            refused,
            Some(NotAdmitted::Rate(RateRefusal::Limited(retry)))
        );
        assert_eq!(user.slots.available_permits(), 1);
        // Over the rate and no slot: refused at once, not after a wait.
        let held = user.slots.try_acquire().unwrap();
        let refused = now(limiter.admit(&user, t, until)).err();
        assert_eq!(
            refused,
            Some(NotAdmitted::Rate(RateRefusal::Limited(retry)))
        );
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_waited_for_its_slot_spends_the_rate_when_it_gets_it() {
        let (limiter, user) = limiter_and_user(1, Rate::per_second(10).burst(2));
        let t = Instant::now();
        let until = t + Duration::from_secs(5);
        let first = now(limiter.admit(&user, t, until)).expect("admitted");
        let Admit::Later(second) = limiter.admit(&user, t, until) else {
            panic!("no slot is free");
        };
        let Admit::Later(third) = limiter.admit(&user, t, until) else {
            panic!("no slot is free");
        };
        let free_first = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(first);
        };
        let second = async { second.await.map(drop) }; // its slot given back at once
        let (second, third, ()) = tokio::join!(second, third, free_first);
        assert_eq!(second, Ok(()), "the slot and the burst's second call");
        // The burst was spent by then: the third got the slot and gave it back.
        assert!(matches!(third.err(), Some(NotAdmitted::Rate(_))));
        assert_eq!(user.slots.available_permits(), 1);
        // Nobody frees a slot: out of time, and no rate spent.
        let held = user.slots.try_acquire().unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await; // refilled
        let Admit::Later(waiting) = limiter.admit(&user, Instant::now(), Instant::now()) else {
            panic!("no slot is free");
        };
        assert_eq!(waiting.await.err(), Some(NotAdmitted::Slot(NoSlot::InTime)));
        drop(held);
        let (g, t) = (
            user.rate.as_ref().unwrap(),
            nanos_since(limiter.epoch, Instant::now()),
        );
        assert!(
            g.check(t).is_ok() && g.check(t).is_ok(),
            "the whole burst is left"
        );
    }
}
