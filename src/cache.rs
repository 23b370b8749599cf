//! Result cache for idempotent tools: keyed by user (unless the tool is
//! user-independent), tool and canonical arguments; bounded in entries and bytes;
//! concurrent identical calls run the body once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

/// Size bounds of the result cache.
///
/// ```
/// use tool_dispatch::CacheConfig;
/// let c = CacheConfig::default().max_entries(1_000).max_bytes(8 << 20);
/// # let _ = c;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    pub(crate) max_entries: usize,
    pub(crate) max_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: 10_000,
            max_bytes: 64 << 20,
        }
    }
}

impl CacheConfig {
    /// Most entries kept (default 10,000); the oldest go first.
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self
    }

    /// Most bytes of serialized results kept (default 64 MiB); a larger single result
    /// is not cached.
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }
}

/// Arguments longer than this (serialized) are not cached: the key would cost more
/// than the call.
const MAX_KEY_BYTES: usize = 16 << 10;

#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    user: Option<Arc<str>>,
    tool: usize,
    args: String,
}

impl Key {
    pub(crate) fn new(user: Option<Arc<str>>, tool: usize, args: &Value) -> Option<Key> {
        // serde_json's map is ordered, so this text is canonical.
        let args = serde_json::to_string(args).ok()?;
        (args.len() <= MAX_KEY_BYTES).then_some(Key { user, tool, args })
    }
}

type Shared = Option<Arc<Value>>;

enum Slot {
    Ready {
        value: Arc<Value>,
        expires: Instant,
        size: usize,
        seq: u64,
    },
    Pending(watch::Receiver<Shared>),
}

#[derive(Default)]
struct Inner {
    map: HashMap<Key, Slot>,
    order: VecDeque<(Key, u64)>,
    bytes: usize,
    ready: usize,
    seq: u64,
}

pub(crate) struct Cache {
    config: CacheConfig,
    inner: Mutex<Inner>,
}

/// What a lookup found.
pub(crate) enum Lookup<'a> {
    Hit(Arc<Value>),
    /// Another identical call is running: wait for its result (see [`Cache::follow`]).
    Wait(watch::Receiver<Shared>, Key),
    /// Run the tool and hand the result to the guard.
    Lead(Leader<'a>),
}

/// The one call that runs the tool for a key. Dropped without `complete`, it clears
/// the pending slot so the waiting calls try again.
pub(crate) struct Leader<'a> {
    cache: &'a Cache,
    key: Option<Key>,
    tx: watch::Sender<Shared>,
}

impl Cache {
    pub(crate) fn new(config: CacheConfig) -> Self {
        Cache {
            config,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn lookup(&self, key: Key, now: Instant) -> Lookup<'_> {
        // Declared before the guard, so what is removed is dropped after the lock.
        let mut _expired = None;
        let mut inner = self.lock();
        match inner.map.get(&key) {
            Some(Slot::Ready { value, expires, .. }) if *expires > now => {
                return Lookup::Hit(Arc::clone(value));
            }
            Some(Slot::Pending(rx)) => return Lookup::Wait(rx.clone(), key),
            Some(Slot::Ready { size, .. }) => {
                let size = *size;
                inner.bytes -= size;
                inner.ready -= 1;
                _expired = inner.map.remove(&key);
            }
            None => {}
        }
        let (tx, rx) = watch::channel(None);
        inner.map.insert(key.clone(), Slot::Pending(rx));
        Lookup::Lead(Leader {
            cache: self,
            key: Some(key),
            tx,
        })
    }

    /// Waits for the leader of `key`. If it ends without a result (it failed, timed
    /// out, or its caller went away), looks again: the entry another call stored, a
    /// new leader to follow, or this call becomes the leader. So a failed leader is
    /// followed by one new run, not by one run per waiting call.
    pub(crate) async fn follow(
        &self,
        mut rx: watch::Receiver<Shared>,
        key: Key,
    ) -> Result<Arc<Value>, Leader<'_>> {
        loop {
            if let Some(v) = wait(rx).await {
                return Ok(v);
            }
            match self.lookup(key.clone(), Instant::now()) {
                Lookup::Hit(v) => return Ok(v),
                Lookup::Wait(next, _) => rx = next,
                Lookup::Lead(l) => return Err(l),
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().map.len()
    }
}

impl Leader<'_> {
    /// Stores `value` for `ttl` and wakes the waiting calls.
    pub(crate) fn complete(mut self, value: Value, ttl: Duration, now: Instant) {
        let Some(key) = self.key.take() else { return };
        let value = Arc::new(value);
        let size = serde_json::to_string(&*value).map_or(usize::MAX, |s| s.len());
        let _ = self.tx.send(Some(Arc::clone(&value)));
        let c = self.cache;
        // Declared before the guard, so what is removed is dropped after the lock.
        let mut removed = Vec::new();
        let mut inner = c.lock();
        removed.extend(inner.map.remove(&key));
        if size > c.config.max_bytes || c.config.max_entries == 0 {
            return;
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.bytes += size;
        inner.ready += 1;
        inner.order.push_back((key.clone(), seq));
        inner.map.insert(
            key,
            Slot::Ready {
                value,
                expires: crate::time::deadline(now, ttl),
                size,
                seq,
            },
        );
        // Evict oldest-first until within bounds; stale order entries are skipped.
        while inner.bytes > c.config.max_bytes || inner.ready > c.config.max_entries {
            let Some((k, s)) = inner.order.pop_front() else {
                break;
            };
            if let Some(Slot::Ready { seq, size, .. }) = inner.map.get(&k)
                && *seq == s
            {
                let size = *size;
                inner.bytes -= size;
                inner.ready -= 1;
                removed.extend(inner.map.remove(&k));
            }
        }
        // Keep the order queue from growing with stale entries.
        if inner.order.len() > 2 * c.config.max_entries.max(16) {
            let Inner { map, order, .. } = &mut *inner;
            order.retain(|(k, s)| matches!(map.get(k), Some(Slot::Ready { seq, .. }) if seq == s));
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut _removed = None;
            let mut inner = self.cache.lock();
            if matches!(inner.map.get(&key), Some(Slot::Pending(_))) {
                _removed = inner.map.remove(&key); // dropped after the lock
            }
        }
    }
}

/// Waits for the leader's result; `None` if it ended without one.
async fn wait(mut rx: watch::Receiver<Shared>) -> Option<Arc<Value>> {
    loop {
        if let Some(v) = rx.borrow_and_update().clone() {
            return Some(v);
        }
        rx.changed().await.ok()?;
    }
}
