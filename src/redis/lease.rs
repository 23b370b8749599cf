//! Concurrency leases: held (renewed together, every third of a lease, while held),
//! given back when dropped (together, or with the next admission of the same user),
//! asked for (given back if the answer never comes), and kept to give back once Redis
//! answers again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{Link, Redis};
use crate::limits::{Held, Permit};

/// The most leases waiting to be given back (about 100 bytes each); past it a lease
/// is left to expire by itself.
const MAX_RELEASES: usize = 10_000;

/// The most releases an admission carries.
const CARRIED: usize = 64;

/// The most renewals in one request.
const RENEWALS_PER_REQUEST: usize = 1_000;

/// The leases of one node: those it holds, renewed by one task, and those it gives
/// back, sent in batches.
#[derive(Debug, Default)]
pub(super) struct Leases {
    /// Held leases by id: their key and name.
    held: Mutex<HashMap<u64, (String, String)>>,
    /// The next held lease's id.
    next: AtomicU64,
    /// The renewing task runs.
    renewing: AtomicBool,
    /// Leases to give back: key, name, and when it expires by itself at the latest.
    releases: Mutex<Vec<(String, String, Instant)>>,
    /// How many are queued, read without the lock on every answer of Redis.
    queued: AtomicUsize,
    /// A task is giving leases back.
    releasing: AtomicBool,
}

/// A held lease: renewed every third of its length while held (by the node's one
/// renewing task); given back (without waiting) when dropped. A process that dies
/// stops renewing: its leases expire.
pub(super) struct Lease {
    redis: Redis,
    id: u64,
}

impl Lease {
    /// Holds `member` of the sorted set `key`, which Redis just gave this node: it is
    /// renewed from now on, and given back when dropped.
    pub(super) fn hold(redis: &Redis, key: String, member: String) -> Lease {
        let leases = &redis.link.leases;
        let id = leases.next.fetch_add(1, Relaxed);
        lock(&leases.held).insert(id, (key, member));
        if !leases.renewing.swap(true, Relaxed) {
            let running = Renewing(Arc::downgrade(&redis.link));
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(renew(running));
            } // otherwise `running` is dropped here: the next lease tries again
        }
        Lease {
            redis: redis.clone(),
            id,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let held = lock(&self.redis.link.leases.held).remove(&self.id);
        if let Some((key, member)) = held {
            let expires = Instant::now() + self.redis.link.config.lease;
            self.redis.link.leases.keep(vec![(key, member, expires)]);
            release(&self.redis);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Clears the renewing flag when the renewing task ends, however it ends: made before
/// the task is spawned and moved into it, so that a task its runtime drops (shut
/// down, before or after it first ran) clears it too, and the next lease held
/// starts a new task.
struct Renewing(Weak<Link>);

impl Drop for Renewing {
    fn drop(&mut self) {
        if let Some(link) = self.0.upgrade() {
            link.leases.renewing.store(false, Relaxed);
        }
    }
}

/// The node's renewing task: every third of a lease, renews every held lease (a
/// pipeline of `RENEW`s, [`RENEWALS_PER_REQUEST`] a request); ends with the node's
/// handle.
async fn renew(running: Renewing) {
    let link = running.0.clone();
    loop {
        let every = match link.upgrade() {
            Some(link) => link.config.lease / 3,
            None => return,
        };
        tokio::time::sleep(every.max(Duration::from_millis(1))).await;
        let Some(link) = link.upgrade() else {
            return;
        };
        if link.stop.is_cancelled() {
            return;
        }
        let redis = Redis { link };
        let held: Vec<(u64, String, String)> = lock(&redis.link.leases.held)
            .iter()
            .map(|(id, (key, member))| (*id, key.clone(), member.clone()))
            .collect();
        let lease_ms = lease_ms(&redis);
        let script = &redis.link.scripts.renew;
        for batch in held.chunks(RENEWALS_PER_REQUEST) {
            let mut pipe = ::redis::pipe();
            for (_, key, member) in batch {
                pipe.cmd("EVALSHA")
                    .arg(script.get_hash())
                    .arg(1)
                    .arg(key)
                    .arg(lease_ms)
                    .arg(member);
            }
            match redis.ask(redis.scripted::<Vec<i64>>(script, &pipe)).await {
                Ok(renewed) => {
                    // A lease given back since this batch was made is not lost.
                    let still = lock(&redis.link.leases.held);
                    let lost = (batch.iter().zip(&renewed))
                        .filter(|((id, _, _), r)| **r != 1 && still.contains_key(id))
                        .count();
                    drop(still);
                    if lost > 0 {
                        tracing::warn!(lost, "concurrency leases had expired before renewal");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "concurrency leases could not be renewed"),
            }
        }
    }
}

/// The lease length in ms (at least 3).
pub(super) fn lease_ms(redis: &Redis) -> u64 {
    u64::try_from(redis.link.config.lease.as_millis())
        .unwrap_or(u64::MAX)
        .max(3)
}

/// Gives leases back (key, name) without waiting: queued, and sent by [`release`].
fn give_back<'k>(redis: &Redis, leases: impl IntoIterator<Item = (&'k str, &'k str)>) {
    let expires = Instant::now() + redis.link.config.lease;
    let leases = leases
        .into_iter()
        .map(|(key, member)| (key.to_owned(), member.to_owned(), expires));
    redis.link.leases.keep(leases.collect());
    release(redis);
}

impl Leases {
    /// Queues leases to give back, within [`MAX_RELEASES`] (the expired ones are
    /// forgotten first, then the newest left out).
    fn keep(&self, mut more: Vec<(String, String, Instant)>) {
        let mut queued = lock(&self.releases);
        if more.len() > MAX_RELEASES.saturating_sub(queued.len()) {
            let now = Instant::now();
            queued.retain(|(_, _, expires)| *expires > now);
            more.retain(|(_, _, expires)| *expires > now);
            let room = MAX_RELEASES.saturating_sub(queued.len());
            if more.len() > room {
                tracing::warn!(
                    left = more.len() - room,
                    "too many leases to give back; the rest expire by themselves"
                );
                more.truncate(room);
            }
        }
        queued.append(&mut more);
        self.queued.store(queued.len(), Relaxed);
    }

    /// Takes queued releases (at most [`CARRIED`] of each) of the user's leases
    /// (`user`) and, when the admission takes a cluster slot too, of the cluster's
    /// (`cluster`), for an admission to carry.
    pub(super) fn take(&self, user: &str, cluster: Option<&str>) -> Carried {
        let mut taken = Carried::default();
        if self.queued.load(Relaxed) == 0 {
            return taken;
        }
        let mut queued = lock(&self.releases);
        queued.retain_mut(|(key, member, _)| {
            let to = if key == user {
                &mut taken.user
            } else if cluster == Some(key.as_str()) {
                &mut taken.cluster
            } else {
                return true;
            };
            if to.len() == CARRIED {
                return true;
            }
            to.push(std::mem::take(member));
            false
        });
        self.queued.store(queued.len(), Relaxed);
        taken
    }

    /// Takes every queued release that has not expired.
    fn take_all(&self) -> Vec<(String, String, Instant)> {
        let now = Instant::now();
        let mut queued = lock(&self.releases);
        self.queued.store(0, Relaxed);
        let mut all = std::mem::take(&mut *queued);
        all.retain(|(_, _, expires)| *expires > now);
        all
    }
}

/// The releases an admission carries, given back by the admission script before it
/// decides anything: names of the user's leases, and of the cluster's.
#[derive(Debug, Default)]
pub(super) struct Carried {
    /// In the user's sorted set.
    pub(super) user: Vec<String>,
    /// In the cluster's.
    pub(super) cluster: Vec<String>,
}

/// Clears the releasing flag if the releasing task is dropped (its runtime shut
/// down, before or after it first ran); defused when the task clears it itself.
struct Releasing {
    redis: Redis,
    armed: bool,
}

impl Releasing {
    /// The task clears the flag itself.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Releasing {
    fn drop(&mut self) {
        if self.armed {
            self.redis.link.leases.releasing.store(false, Relaxed);
        }
    }
}

/// Sends the queued releases without waiting, on a task of its own (one at a time),
/// if there are: after the tasks ready now have run, so that the calls ending
/// together give their leases back in one request (and an admission of the same
/// user may carry them instead: [`Leases::take`]). A request Redis does not answer
/// leaves them queued, each until it would have expired by itself, and they are sent
/// again with the next answer Redis gives this node. Called when a lease is given
/// back and whenever Redis answers; outside a runtime, they wait for that answer.
pub(super) fn release(redis: &Redis) {
    let leases = &redis.link.leases;
    if leases.queued.load(Relaxed) == 0 || leases.releasing.swap(true, Relaxed) {
        return;
    }
    let mut running = Releasing {
        redis: redis.clone(),
        armed: true,
    };
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return; // `running` clears the flag
    };
    rt.spawn(async move {
        // The calls that end now give their leases back in the same request.
        tokio::task::yield_now().await;
        let redis = running.redis.clone();
        let leases = &redis.link.leases;
        loop {
            let batch = leases.take_all();
            let sent = batch.is_empty() || {
                let mut pipe = ::redis::pipe();
                for (key, member, _) in &batch {
                    pipe.cmd("ZREM").arg(key).arg(member).ignore();
                }
                redis.link.counters.released();
                let mut conn = redis.conn();
                redis.ask(pipe.query_async::<()>(&mut conn)).await.is_ok()
            };
            if !sent {
                leases.keep(batch); // sent again when Redis answers
            }
            running.disarm();
            leases.releasing.store(false, Relaxed);
            // More may have been queued meanwhile, by calls that saw this task busy.
            if !sent || leases.queued.load(Relaxed) == 0 || leases.releasing.swap(true, Relaxed) {
                return;
            }
            running.armed = true; // the flag is this task's again
        }
    });
}

impl<'a> Held<'a> for Lease {}

/// A cluster's slot: one of the node's own engine-wide slots and the cluster's lease.
impl<'a> Held<'a> for (Permit<'a>, Lease) {}

/// One of a user's slots, and the cluster's slot its admission took with it (until
/// the call's global step takes it out, or gives it back).
pub(super) struct UserSlot<'a> {
    #[allow(dead_code)] // held until dropped
    pub(super) lease: Lease,
    pub(super) cluster: Option<Permit<'a>>,
}

impl<'a> Held<'a> for UserSlot<'a> {
    fn reserved(&mut self) -> Option<Permit<'a>> {
        self.cluster.take()
    }
}

/// A request that may take leases, whose answer has not come: if it never comes (a
/// timeout, a lost connection, the call dropped while it asked), Redis may have run
/// it all the same, so what it asked for is given back, and so are the releases it
/// carried. Defused once the answer comes.
pub(super) struct Asking<'r> {
    redis: &'r Redis,
    /// The sorted set of the lease asked for (the user's).
    key: &'r str,
    /// Another sorted set the lease is asked for in (the cluster's).
    also: Option<&'r str>,
    member: &'r str,
    carried: &'r Carried,
    answered: bool,
}

impl<'r> Asking<'r> {
    /// `member` is asked for in `key` (and `also`), carrying the releases of
    /// `carried` (the user's in `key`, the cluster's in `also`).
    pub(super) fn new(
        redis: &'r Redis,
        key: &'r str,
        also: Option<&'r str>,
        member: &'r str,
        carried: &'r Carried,
    ) -> Self {
        Asking {
            redis,
            key,
            also,
            member,
            carried,
            answered: false,
        }
    }

    /// The answer came.
    pub(super) fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let mine = [Some(self.key), self.also].into_iter().flatten();
        let mine = mine.map(|key| (key, self.member));
        let user = self.carried.user.iter().map(|m| (self.key, m.as_str()));
        let cluster = (self.also.into_iter())
            .flat_map(|key| self.carried.cluster.iter().map(move |m| (key, m.as_str())));
        give_back(self.redis, mine.chain(user).chain(cluster));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_leases_to_give_back_are_bounded_and_forgotten_once_expired() {
        let leases = Leases::default();
        let lease = |i: usize, ms: u64| {
            let expires = Instant::now() + Duration::from_millis(ms);
            (format!("k{}", i % 2), format!("m{i}"), expires)
        };
        leases.keep((0..MAX_RELEASES - 1).map(|i| lease(i, 1_000)).collect());
        leases.keep((0..5).map(|i| lease(i, 5_000)).collect());
        assert_eq!(
            leases.queued.load(Relaxed),
            MAX_RELEASES,
            "one of the five fit"
        );
        let carried = leases.take("k1", Some("k0"));
        assert_eq!(
            (carried.user.len(), carried.cluster.len()),
            (CARRIED, CARRIED)
        );
        assert!(
            carried
                .user
                .iter()
                .all(|m| m[1..].parse::<usize>().unwrap() % 2 == 1)
        );
        while !leases.take("k1", None).user.is_empty() {}
        assert!(
            leases.take("k1", None).cluster.is_empty(),
            "no cluster key asked"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        leases.keep(vec![lease(7, 0)]); // expired already
        let left = leases.take_all();
        assert_eq!(left.len(), 1, "only the one of the five, of k0: {left:?}");
        assert_eq!(left[0].1, "m0");
        assert_eq!(leases.queued.load(Relaxed), 0);
    }
}
