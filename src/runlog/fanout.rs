//! The runs followed in this process and their readers: each frame a store records
//! (or reads back) is handed to every reader of its run without waiting; a reader
//! that is behind is cut off and told to resync.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::{Frame, Resync, RunLogConfig, lock};

/// A run: (user, run id).
pub(crate) type RunKey = (Arc<str>, Arc<str>);

/// The runs followed here.
pub(super) struct Fanout {
    buffer: usize,
    ttl: Duration,
    runs: Mutex<HashMap<RunKey, Arc<Mutex<Followed>>>>,
    /// Told when a run gains its first reader here, for a store that follows runs.
    newly: Notify,
}

/// One run followed here.
pub(super) struct Followed {
    readers: Vec<Reader>,
    /// The `seq` after the last frame handed out: where a shared store reads on.
    next_seq: u64,
    last_write: Instant,
}

struct Reader {
    tx: mpsc::Sender<Frame>,
    lagged: Arc<AtomicBool>,
}

impl Followed {
    fn new() -> Followed {
        Followed {
            readers: Vec::new(),
            next_seq: 1,
            last_write: Instant::now(),
        }
    }

    /// Hands `frame` to every live reader without waiting; one that is behind is cut
    /// off and will be told to resync once it has read what it has.
    fn fan_out(&mut self, frame: &Frame) {
        self.readers.retain(|r| match r.tx.try_send(frame.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                r.lagged.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// Cuts every reader off: each is told to resync once it has read what it has.
    fn cut_off(&mut self) {
        for r in self.readers.drain(..) {
            r.lagged.store(true, Ordering::Release);
        }
    }

    /// Whether a reader still reads.
    fn followed(&mut self) -> bool {
        self.readers.retain(|r| !r.tx.is_closed());
        !self.readers.is_empty()
    }
}

impl Fanout {
    pub(super) fn new(config: RunLogConfig) -> Fanout {
        Fanout {
            buffer: config.reader_buffer,
            ttl: config.ttl,
            runs: Mutex::default(),
            newly: Notify::new(),
        }
    }

    /// A new reader of the run, expecting the frames after `last` (`None`: whatever
    /// comes next). When nobody here followed the run, it is followed from there on.
    /// Dropping the [`Following`] before it gets its replay leaves the run as it was.
    pub(super) fn follow(self: &Arc<Self>, key: RunKey, last: Option<u64>) -> Following {
        let (entry, created) = {
            let mut runs = lock(&self.runs);
            match runs.get(&key) {
                Some(e) => (Arc::clone(e), false),
                None => {
                    let e = Arc::new(Mutex::new(Followed::new()));
                    runs.insert(key.clone(), Arc::clone(&e));
                    (e, true)
                }
            }
        };
        let (tx, rx) = mpsc::channel(self.buffer);
        let lagged = Arc::new(AtomicBool::new(false));
        let mut f = lock(&entry);
        let first = !f.followed();
        let moved_from = match (first, last) {
            (true, Some(after)) => {
                let before = f.next_seq;
                f.next_seq = after.saturating_add(1);
                Some(before)
            }
            _ => None,
        };
        f.readers.push(Reader {
            tx,
            lagged: Arc::clone(&lagged),
        });
        drop(f);
        if first {
            self.newly.notify_one();
        }
        Following {
            fanout: Arc::clone(self),
            key,
            entry,
            created,
            moved_from,
            reader: Some(RunReader {
                replay: VecDeque::new(),
                live: rx,
                lagged,
                last,
                done: false,
            }),
        }
    }

    /// Whether a reader here follows the run.
    pub(super) fn is_followed(&self, key: &RunKey) -> bool {
        let entry = lock(&self.runs).get(key).cloned();
        entry.is_some_and(|e| lock(&e).followed())
    }

    /// Runs followed here (with or without readers now).
    pub(super) fn len(&self) -> usize {
        lock(&self.runs).len()
    }

    /// Forgets the runs nobody here has read for the time to live (a run a store
    /// holds on to is its to forget).
    pub(super) fn sweep(&self) {
        let now = Instant::now();
        lock(&self.runs).retain(|_, e| {
            if Arc::strong_count(e) > 1 {
                return true;
            }
            let mut f = lock(e);
            f.followed() || now.saturating_duration_since(f.last_write) <= self.ttl
        });
    }

    /// The run's entry, made if it is new: for a store that keeps the run here and
    /// hands its frames over with [`publish`](Self::publish). It stays until the
    /// store [`close`](Self::close)s it.
    pub(super) fn entry(&self, key: RunKey) -> Arc<Mutex<Followed>> {
        let mut runs = lock(&self.runs);
        Arc::clone(
            runs.entry(key)
                .or_insert_with(|| Arc::new(Mutex::new(Followed::new()))),
        )
    }

    /// A frame this process's own store just recorded for the run of `entry`, in
    /// `seq` order and once.
    pub(super) fn publish(entry: &Mutex<Followed>, frame: &Frame) {
        let mut f = lock(entry);
        f.next_seq = frame.seq + 1;
        f.last_write = Instant::now();
        f.fan_out(frame);
    }

    /// The store forgot the run: its readers here end (they see the run gone).
    pub(super) fn close(&self, key: &RunKey) {
        if let Some(entry) = lock(&self.runs).remove(key) {
            lock(&entry).readers.clear();
        }
    }

    /// The `seq` handed out last for the run, if it is followed here.
    pub(super) fn read_up_to(&self, key: &RunKey) -> Option<u64> {
        let entry = lock(&self.runs).get(key).cloned()?;
        let seq = lock(&entry).next_seq - 1;
        Some(seq)
    }

    /// See [`RunLog::followed_runs`](super::RunLog::followed_runs).
    pub(super) fn followed_runs(&self) -> Vec<(Arc<str>, Arc<str>, u64)> {
        let runs = lock(&self.runs);
        runs.iter()
            .filter_map(|((user, run), e)| {
                let mut f = lock(e);
                f.followed()
                    .then(|| (Arc::clone(user), Arc::clone(run), f.next_seq - 1))
            })
            .collect()
    }

    /// Waits until a run gains its first reader here.
    pub(super) async fn newly_followed(&self) {
        self.newly.notified().await;
    }

    /// Frames a shared store read for a run followed here, in `seq` order; it may
    /// hand over some twice, and they go out once.
    pub(super) fn deliver(&self, key: &RunKey, frames: Vec<Frame>) {
        let Some(entry) = lock(&self.runs).get(key).cloned() else {
            return;
        };
        let mut f = lock(&entry);
        for frame in frames {
            if frame.seq < f.next_seq {
                continue;
            }
            f.next_seq = frame.seq + 1;
            f.fan_out(&frame);
        }
        f.last_write = Instant::now();
    }

    /// Frames of the run were lost: its readers here are told to resync.
    pub(super) fn cut_off(&self, key: &RunKey) {
        if let Some(entry) = lock(&self.runs).get(key).cloned() {
            lock(&entry).cut_off();
        }
    }

    /// The shared store started afresh: every reader here is told to resync.
    pub(super) fn restarted(&self) {
        for entry in lock(&self.runs).values() {
            let mut f = lock(entry);
            f.cut_off();
            f.next_seq = 1;
        }
    }
}

/// A reader being set up by a resume: it gets its replay, or (dropped without one,
/// the resume having failed) it is removed and the run is left as the resume found
/// it, so a failed resume keeps nothing and moves nothing.
pub(super) struct Following {
    fanout: Arc<Fanout>,
    key: RunKey,
    entry: Arc<Mutex<Followed>>,
    /// The resume put the run in the map.
    created: bool,
    /// Where the run was read from before the resume moved it.
    moved_from: Option<u64>,
    reader: Option<RunReader>,
}

impl Following {
    /// The reader, with the kept frames it starts with.
    pub(super) fn replay(mut self, frames: Vec<Frame>) -> RunReader {
        // Always there: only this and `drop` take it, and this consumes `self`.
        let mut reader = self.reader.take().unwrap_or_else(RunReader::ended_now);
        reader.replay = frames.into();
        reader
    }

    /// The reader with nothing to replay (it follows from now on).
    pub(super) fn live(self) -> RunReader {
        self.replay(Vec::new())
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let Some(reader) = self.reader.take() else {
            return;
        };
        drop(reader);
        // Lock order as everywhere: the map, then the run.
        let mut runs = lock(&self.fanout.runs);
        let mut f = lock(&self.entry);
        if f.followed() {
            return; // someone else reads the run now: it is theirs as it is
        }
        if let Some(before) = self.moved_from {
            f.next_seq = before;
        }
        drop(f);
        // Only the map and this guard hold it: nobody began to use it meanwhile (a
        // store that opened the run since keeps it).
        let unused = Arc::strong_count(&self.entry) == 2;
        if self.created
            && unused
            && runs
                .get(&self.key)
                .is_some_and(|e| Arc::ptr_eq(e, &self.entry))
        {
            runs.remove(&self.key);
        }
    }
}

/// Reads one run from a given `seq`: the kept frames first, then the live ones, each
/// `seq` once and in order.
#[derive(Debug)]
pub struct RunReader {
    replay: VecDeque<Frame>,
    live: mpsc::Receiver<Frame>,
    lagged: Arc<AtomicBool>,
    /// The `seq` handed out last (or asked to resume after).
    last: Option<u64>,
    /// A resync was handed out: nothing follows.
    done: bool,
}

impl RunReader {
    /// A reader of nothing.
    fn ended_now() -> RunReader {
        let (_, live) = mpsc::channel(1);
        RunReader {
            replay: VecDeque::new(),
            live,
            lagged: Arc::default(),
            last: None,
            done: true,
        }
    }

    /// The next frame; `Some(Err(Resync::Truncated))` when this reader fell behind the
    /// live stream (or frames it should have had are gone), `None` when the run is
    /// gone (evicted, expired, or its log dropped).
    pub async fn next(&mut self) -> Option<Result<Frame, Resync>> {
        loop {
            if self.done {
                return None;
            }
            let frame = match self.replay.pop_front() {
                Some(f) => f,
                None => match self.live.recv().await {
                    Some(f) => f,
                    None => return self.ended(),
                },
            };
            if let Some(next) = self.take(frame) {
                return Some(next);
            }
        }
    }

    /// The next frame if one is ready now.
    pub fn try_next(&mut self) -> Option<Result<Frame, Resync>> {
        loop {
            if self.done {
                return None;
            }
            let frame = match self.replay.pop_front() {
                Some(f) => f,
                None => match self.live.try_recv() {
                    Ok(f) => f,
                    Err(mpsc::error::TryRecvError::Disconnected) => return self.ended(),
                    Err(mpsc::error::TryRecvError::Empty) => return None,
                },
            };
            if let Some(next) = self.take(frame) {
                return Some(next);
            }
        }
    }

    /// `frame` if it is the next one; nothing if it was handed out already; a resync
    /// if frames before it are missing.
    fn take(&mut self, frame: Frame) -> Option<Result<Frame, Resync>> {
        match self.last {
            Some(last) if frame.seq <= last => None,
            Some(last) if frame.seq > last + 1 => {
                self.done = true;
                Some(Err(Resync::Truncated))
            }
            _ => {
                self.last = Some(frame.seq);
                Some(Ok(frame))
            }
        }
    }

    /// The end of the stream: one resync if this reader fell behind, then nothing.
    fn ended(&mut self) -> Option<Result<Frame, Resync>> {
        self.done = true;
        self.lagged
            .swap(false, Ordering::AcqRel)
            .then_some(Err(Resync::Truncated))
    }
}
