//! Who follows which run, and the grace period: when the last connection following
//! a run leaves, the run's calls go on for the grace period, then are cancelled
//! unless a connection of the user follows the run again (here, or on another node
//! sharing the run log). One timer per run, however often it is left.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use super::{WsEvent, WsServer};

type RunKey = (String, String);

/// The runs followed, or waiting out their grace period, in this process.
#[derive(Default)]
pub(super) struct Followers(Mutex<HashMap<RunKey, Follow>>);

/// One run.
#[derive(Default)]
struct Follow {
    /// Connections following it here.
    connections: usize,
    /// Calls were started in it: there is something to cancel.
    worked: bool,
    /// When its last connection left.
    left_at: Option<Instant>,
    /// Its grace timer is counting.
    timer: bool,
}

impl Followers {
    fn lock(&self) -> MutexGuard<'_, HashMap<RunKey, Follow>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn key(user_id: &str, run_id: &str) -> RunKey {
    (user_id.to_owned(), run_id.to_owned())
}

impl WsServer {
    /// A connection starts following a run.
    pub(super) fn attach(&self, user_id: &str, run_id: &str) {
        let mut runs = self.shared.followers.lock();
        let f = runs.entry(key(user_id, run_id)).or_default();
        f.connections += 1;
        f.left_at = None;
    }

    /// Calls are being started in a run: it has something a grace timer may cancel.
    /// A run nobody follows (a server-side loop's, say) starts its grace period now.
    pub(super) fn worked(&self, user_id: &str, run_id: &str) {
        let key = key(user_id, run_id);
        let mut runs = self.shared.followers.lock();
        let f = runs.entry(key.clone()).or_default();
        f.worked = true;
        if f.connections == 0 && f.left_at.is_none() {
            f.left_at = Some(Instant::now());
            let start = !std::mem::replace(&mut f.timer, true);
            drop(runs);
            self.start_timer(start, key);
        }
    }

    /// A connection stops following a run.
    pub(super) fn detach(&self, user_id: &str, run_id: &str) {
        let key = key(user_id, run_id);
        let mut runs = self.shared.followers.lock();
        let Some(f) = runs.get_mut(&key) else {
            return;
        };
        f.connections = f.connections.saturating_sub(1);
        if f.connections > 0 {
            return;
        }
        if !f.worked {
            runs.remove(&key); // nothing ever ran there: nothing to cancel
            return;
        }
        f.left_at = Some(Instant::now());
        let start = !std::mem::replace(&mut f.timer, true);
        drop(runs);
        self.start_timer(start, key);
    }

    /// Starts the run's grace timer if it was not counting already (called with no
    /// lock held: a task is never spawned, nor dropped, under one).
    fn start_timer(&self, start: bool, key: RunKey) {
        if start {
            tokio::spawn(self.clone().grace_timer(key));
        }
    }

    /// Waits out the grace period from the run's last leave; cancels its calls if
    /// nobody follows it by then.
    async fn grace_timer(self, key: RunKey) {
        let grace = self.config.grace;
        loop {
            let until = {
                let mut runs = self.shared.followers.lock();
                let Some(f) = runs.get_mut(&key) else {
                    return;
                };
                match f.left_at {
                    Some(left) if f.connections == 0 => left + grace,
                    _ => {
                        f.timer = false; // followed again
                        return;
                    }
                }
            };
            if Instant::now() >= until {
                // A client that reconnected to another node follows it there.
                if self.runs.is_followed(&key.0, &key.1).await {
                    if let Some(f) = self.shared.followers.lock().get_mut(&key) {
                        f.left_at = Some(Instant::now());
                    }
                    continue;
                }
                let mut runs = self.shared.followers.lock();
                // Followed again while the check above waited: keep counting.
                if runs.get(&key).is_some_and(|f| f.connections > 0) {
                    continue;
                }
                runs.remove(&key);
                break;
            }
            tokio::time::sleep_until(until).await;
        }
        let (user_id, run_id) = key;
        let cancelled = self.engine.cancel_run(&user_id, &run_id).here;
        self.event(WsEvent::RunAbandoned {
            user_id,
            run_id,
            cancelled,
        });
    }
}
