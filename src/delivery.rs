//! Delivery: the one way an event reaches a user's sink.
//!
//! Every dispatcher wraps its sink in an [`Outbox`]. An event is sent at once when the
//! sink has room and nothing is queued before it. Otherwise it joins the outbox's
//! backlog, which one task per sink drains in order (each event within the delivery
//! timeout of being queued), and the call waits for that task's answer under its own
//! deadline and cancellation; a call that stops waiting leaves the event queued, so it
//! still goes out, once. Because the backlog task finishes every `send` it starts and
//! never repeats one, a sink whose `send` is not cancel-safe cannot see an event twice.
//!
//! **Pairs.** A call's `tool_executing` that waits in the backlog carries a [`Pair`]
//! ticket, and so does its `tool_completed` queued behind it: the drain records on the
//! ticket whether the opening went out, and a completion whose opening failed is never
//! sent alone (it is counted instead). The ticket belongs to the call, not to its id
//! text, so a later call reusing an ended call's id is never mistaken for it. A
//! completion whose opening is queued or sent is always accepted, even while the sink is
//! stalled, so a socket that recovers never shows an opening without its completion.
//!
//! **Bounds.** The backlog holds at most `capacity` events of running calls (their
//! `tool_executing` and approval requests wait for room), plus one `tool_completed` per
//! call whose `tool_executing` went out or is queued, plus the pairs of calls that ended
//! while they waited to be announced (a dropped future, a call cancelled before its
//! opening could queue), which cannot wait: those are kept, in order, up to
//! [`ENDED_PAIRS_PER_SLOT`] times `capacity` events, and counted as undelivered past
//! it. Progress never queues: it is sent at once or dropped and counted. A sink that
//! panics is caught, counted, and treated as closed from then on. A sink that let a
//! `send` run out of delivery time is *stalled*: until it takes an event again, an event
//! that would open something new and finds it full fails at once, so one stuck socket
//! costs its user one delivery timeout, not one per call.
//!
//! **Locks.** The backlog's lock guards only the queue and its counts: nothing is
//! spawned, sent, answered or dropped while it is held (a runtime that is shutting down
//! drops a spawned task at once, and that task's `Drop` takes this lock).

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::contain::{Contained, Panic, panic_message};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::sink::{EventSink, SinkError, TrySendError};
use crate::time::deadline;

/// How many events of ended calls' pairs a backlog keeps per event of its `capacity`.
pub(crate) const ENDED_PAIRS_PER_SLOT: usize = 64;

/// The ticket a queued `tool_executing` shares with its call and its `tool_completed`:
/// whether the opening went out. Set once, by the drain.
#[derive(Default, Debug)]
pub(crate) struct Pair(OnceLock<Result<(), SinkError>>);

impl Pair {
    /// The opening's fate: `None` while it waits.
    fn outcome(&self) -> Option<&Result<(), SinkError>> {
        self.0.get()
    }

    fn settle(&self, r: &Result<(), SinkError>) {
        let _ = self.0.set(r.clone());
    }
}

/// One sink with its ordered, bounded backlog.
pub(crate) struct Outbox {
    sink: Arc<dyn EventSink>,
    metrics: Arc<Metrics>,
    timeout: Duration,
    capacity: usize,
    /// Events queued and not yet answered (the one being sent included). While it is
    /// above zero a new event queues behind them instead of overtaking them.
    queued: AtomicUsize,
    /// The sink panicked once; it is not called again.
    broken: AtomicBool,
    /// The last `send` ran out of delivery time and nothing has gone through since.
    stalled: AtomicBool,
    backlog: Mutex<Backlog>,
    room: Notify,
}

#[derive(Default)]
struct Backlog {
    items: VecDeque<Queued>,
    draining: bool,
    /// Queued events of running calls (bounded by `capacity`).
    running: usize,
    /// Queued events of ended calls' pairs.
    ended: usize,
}

/// What an event is to the backlog's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// From a running call that may wait for room: within `capacity`.
    Running,
    /// The completion of a call whose opening went out or is queued: always accepted.
    Closing,
    /// Half of the pair of a call that ended before it was announced.
    Ended,
}

struct Queued {
    event: Event,
    class: Class,
    deadline: Instant,
    ack: Option<oneshot::Sender<Result<(), SinkError>>>,
    /// For an opening: the ticket it settles; for a completion: its opening's ticket.
    pair: Option<Arc<Pair>>,
}

/// Where an event stands in its call's pair; decides whether it may wait and how much
/// of the backlog it may use.
#[derive(Debug, Clone)]
pub(crate) enum Role {
    /// `tool_executing`: queued only within the backlog's bound.
    Opens,
    /// A `tool_completed`. `opening` is its `tool_executing`'s ticket when that one was
    /// queued rather than confirmed: then the completion goes after it, and only if it
    /// went out.
    Closes {
        /// The opening's ticket, if it was queued.
        opening: Option<Arc<Pair>>,
    },
    /// Any other event that may wait (an approval request, agent lifecycle events).
    Other,
}

impl Role {
    fn what(&self) -> &'static str {
        match self {
            Role::Opens => "tool_executing",
            Role::Closes { .. } => "tool_completed",
            Role::Other => "an event",
        }
    }
}

/// What a waiting delivery also watches: the call's cancellation and deadline.
#[derive(Clone, Copy, Default)]
pub(crate) struct Watch<'a> {
    pub(crate) cancel: Option<&'a CancellationToken>,
    pub(crate) deadline: Option<Instant>,
}

impl Watch<'_> {
    async fn interrupted(&self) {
        let cancelled = async {
            match self.cancel {
                Some(t) => t.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let expired = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancelled => {},
            () = expired => {},
        }
    }
}

/// A delivered event: sent (confirmed), or queued when the call stopped waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// The sink took it.
    Sent,
    /// The call's watch fired while the event waited in the backlog; it stays there
    /// and goes out in order (or is counted as a failure).
    HandedOff,
}

/// An event that was not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotSent {
    /// The sink refused it, or it could not be queued in time (counted).
    Sink(SinkError),
    /// The call's watch fired before the event could be queued; nothing was sent.
    Interrupted,
}

/// What [`Outbox::send_now`] did.
pub(crate) enum Now {
    /// The sink took it.
    Sent,
    /// It has to wait: pass it to [`Outbox::deliver`].
    Wait(Event),
    /// It will never go out (the sink is closed or panicked, or its opening failed);
    /// counted.
    Failed(SinkError),
}

enum Refused {
    Full(Event),
    Gone(SinkError),
}

/// Why a `push` did not queue its items.
enum NoRoom {
    /// Not now: the caller may wait for room.
    Wait,
    /// Never: counted by the caller.
    Never(SinkError),
}

impl Outbox {
    pub(crate) fn new(
        sink: Arc<dyn EventSink>,
        metrics: Arc<Metrics>,
        timeout: Duration,
        capacity: usize,
    ) -> Self {
        Outbox {
            sink,
            metrics,
            timeout,
            capacity: capacity.max(2),
            queued: AtomicUsize::new(0),
            broken: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            backlog: Mutex::default(),
            room: Notify::new(),
        }
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn lock(&self) -> MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `event` at once if the sink has room and nothing is queued before it
    /// (the path of almost every event); otherwise hands it back for
    /// [`deliver`](Self::deliver). A refusal is counted.
    #[inline]
    pub(crate) fn send_now(&self, event: Event, role: &Role) -> Now {
        if let Role::Closes {
            opening: Some(pair),
        } = role
        {
            match pair.outcome() {
                None => return Now::Wait(event),
                Some(Err(e)) => {
                    let e = e.clone();
                    self.failed(role, &e);
                    return Now::Failed(e);
                }
                Some(Ok(())) => {}
            }
        }
        if self.queued.load(Ordering::Acquire) != 0 {
            return Now::Wait(event);
        }
        match self.try_send(event) {
            Ok(()) => Now::Sent,
            Err(Refused::Full(ev)) => Now::Wait(ev),
            Err(Refused::Gone(e)) => {
                self.failed(role, &e);
                Now::Failed(e)
            }
        }
    }

    /// Delivers `event` through the backlog (after [`send_now`](Self::send_now) handed
    /// it back): waits for room, then for the backlog's answer, under `watch`. An
    /// opening's ticket is put in `ticket` the moment it joins the backlog, so a caller
    /// whose future is dropped while it waits knows the event will still go out, and
    /// its completion can follow it.
    pub(crate) async fn deliver(
        self: &Arc<Self>,
        event: Event,
        role: &Role,
        watch: Watch<'_>,
        ticket: &mut Option<Arc<Pair>>,
    ) -> Result<Delivered, NotSent> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(event, role, tx, watch, ticket).await?;
        // The backlog answers every event it holds: sent, refused, or failed when its
        // task is dropped (a runtime shutting down), so no timer is needed here.
        tokio::select! {
            biased;
            r = rx => match r {
                Ok(Ok(())) => Ok(Delivered::Sent),
                Ok(Err(e)) => Err(NotSent::Sink(e)),
                Err(_) => Err(NotSent::Sink(SinkError::Closed)),
            },
            () = watch.interrupted() => Ok(Delivered::HandedOff),
        }
    }

    /// Queues `event`, waiting for room up to the delivery timeout.
    async fn enqueue(
        self: &Arc<Self>,
        event: Event,
        role: &Role,
        ack: oneshot::Sender<Result<(), SinkError>>,
        watch: Watch<'_>,
        ticket: &mut Option<Arc<Pair>>,
    ) -> Result<(), NotSent> {
        let (class, pair) = match role {
            Role::Opens => (Class::Running, Some(Arc::new(Pair::default()))),
            Role::Closes { opening } => (Class::Closing, opening.clone()),
            Role::Other => (Class::Running, None),
        };
        let give_up = deadline(Instant::now(), self.timeout);
        let mut item = Queued {
            event,
            class,
            deadline: give_up,
            ack: Some(ack),
            pair,
        };
        loop {
            let mut room = pin!(self.room.notified());
            room.as_mut().enable();
            item.deadline = deadline(Instant::now(), self.timeout);
            let opening = match role {
                Role::Opens => item.pair.clone(),
                _ => None,
            };
            match self.push(vec![item]) {
                Ok(()) => {
                    if opening.is_some() {
                        *ticket = opening;
                    }
                    return Ok(());
                }
                Err((mut back, NoRoom::Wait)) => match back.pop() {
                    Some(b) => item = b,
                    None => return Err(NotSent::Interrupted), // unreachable: one item
                },
                Err((back, NoRoom::Never(e))) => {
                    drop(back);
                    self.failed(role, &e);
                    return Err(NotSent::Sink(e));
                }
            }
            tokio::select! {
                biased;
                () = &mut room => {}
                () = watch.interrupted() => return Err(NotSent::Interrupted),
                () = tokio::time::sleep_until(give_up) => {
                    let e = SinkError::TimedOut(self.timeout);
                    self.failed(role, &e);
                    return Err(NotSent::Sink(e));
                }
            }
        }
    }

    /// Puts `items` (one event, or an ended call's pair) at the back of the backlog,
    /// all or none, and makes sure a task drains it. The items come back when they do
    /// not fit, to be dropped outside the lock.
    #[allow(clippy::result_large_err)] // the items come back so the caller can retry
    fn push(self: &Arc<Self>, items: Vec<Queued>) -> Result<(), (Vec<Queued>, NoRoom)> {
        if self.broken.load(Ordering::Acquire) {
            return Err((items, NoRoom::Never(SinkError::Panicked)));
        }
        let opens_something = items.iter().any(|i| i.class != Class::Closing);
        if opens_something && self.stalled.load(Ordering::Acquire) {
            return Err((items, NoRoom::Never(SinkError::TimedOut(self.timeout))));
        }
        let start = {
            let mut b = self.lock();
            let running = items.iter().filter(|i| i.class == Class::Running).count();
            let ended = items.iter().filter(|i| i.class == Class::Ended).count();
            if running > 0 && b.running + running > self.capacity {
                return Err((items, NoRoom::Wait));
            }
            if ended > 0 && b.ended + ended > self.capacity * ENDED_PAIRS_PER_SLOT {
                return Err((items, NoRoom::Never(SinkError::Full)));
            }
            b.running += running;
            b.ended += ended;
            self.queued.fetch_add(items.len(), Ordering::AcqRel);
            b.items.extend(items);
            !std::mem::replace(&mut b.draining, true)
        };
        if start {
            self.start_drain();
        }
        Ok(())
    }

    /// Starts the task that drains the backlog (never under the lock: a runtime that
    /// is shutting down drops the task at once, and its `Drop` takes the lock).
    fn start_drain(self: &Arc<Self>) {
        let drain = Drain {
            outbox: Arc::clone(self),
            current: None,
            finished: false,
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(drain.run())),
            Err(_) => drop(drain), // fails what it would have sent: there is no runtime
        }
    }

    /// The events of a call that cannot wait (its future is being dropped, or it was
    /// interrupted before its opening could queue): sent now where the sink has room,
    /// else queued without waiting. `opening` is the call's `tool_executing` when it
    /// has not gone out yet: then both go, or neither.
    pub(crate) fn hand_off(self: &Arc<Self>, opening: Option<Event>, closing: Event, role: Role) {
        let Role::Closes { opening: ticket } = &role else {
            return; // only a completion is handed off
        };
        let (mut opening, mut closing) = (opening, Some(closing));
        let behind = ticket.as_ref().is_some_and(|t| t.outcome().is_none());
        if let Some(Err(e)) = ticket.as_ref().and_then(|t| t.outcome()) {
            let e = e.clone();
            return self.failed(&role, &e); // its opening failed: not sent alone
        }
        if !behind && self.queued.load(Ordering::Acquire) == 0 {
            if let Some(ev) = opening.take() {
                match self.try_send(ev) {
                    Ok(()) => {}
                    Err(Refused::Full(ev)) => opening = Some(ev),
                    Err(Refused::Gone(e)) => {
                        self.failed(&Role::Opens, &e);
                        return self.failed(&role, &e);
                    }
                }
            }
            if opening.is_none()
                && let Some(ev) = closing.take()
            {
                match self.try_send(ev) {
                    Ok(()) => return,
                    Err(Refused::Full(ev)) => closing = Some(ev),
                    Err(Refused::Gone(e)) => return self.failed(&role, &e),
                }
            }
        }
        let Some(closing) = closing else { return };
        let by = deadline(Instant::now(), self.timeout);
        let queued = |event, class, pair| Queued {
            event,
            class,
            deadline: by,
            ack: None,
            pair,
        };
        let items = match opening {
            // Both, or neither: the completion follows its opening's fate.
            Some(open) => {
                let pair = Some(Arc::new(Pair::default()));
                vec![
                    queued(open, Class::Ended, pair.clone()),
                    queued(closing, Class::Ended, pair),
                ]
            }
            None => vec![queued(closing, Class::Closing, ticket.clone())],
        };
        let pair = items.len() == 2;
        if let Err((items, no_room)) = self.push(items) {
            drop(items);
            let e = match no_room {
                NoRoom::Never(e) => e,
                NoRoom::Wait => SinkError::Full,
            };
            if pair {
                self.failed(&Role::Opens, &e);
            }
            self.failed(&role, &e);
        }
    }

    /// Sends a progress update if the sink takes it now and nothing is queued before
    /// it; otherwise drops and counts it. Never waits.
    pub(crate) fn offer(&self, event: Event) -> bool {
        let sent = self.queued.load(Ordering::Acquire) == 0 && self.try_send(event).is_ok();
        if !sent {
            self.metrics.progress_dropped();
        }
        sent
    }

    /// `try_send` with the sink's panics caught.
    #[allow(clippy::result_large_err)] // the event comes back so it can be queued
    #[inline]
    fn try_send(&self, event: Event) -> Result<(), Refused> {
        if self.broken.load(Ordering::Acquire) {
            return Err(Refused::Gone(SinkError::Panicked));
        }
        #[allow(clippy::result_large_err)]
        let attempt = || self.sink.try_send(event);
        match catch_unwind(AssertUnwindSafe(attempt)) {
            Ok(Ok(())) => {
                self.metrics.delivered();
                if self.stalled.load(Ordering::Relaxed) {
                    self.stalled.store(false, Ordering::Release);
                }
                Ok(())
            }
            Ok(Err(TrySendError::Full(ev))) => Err(Refused::Full(ev)),
            Ok(Err(TrySendError::Closed(_))) => Err(Refused::Gone(SinkError::Closed)),
            Err(p) => Err(Refused::Gone(self.poisoned(p))),
        }
    }

    /// Sends the backlog's head: now if there is room, else through the sink's own
    /// `send`, run to its end or to `by`, with panics caught. Never retried.
    async fn send_by(&self, event: Event, by: Instant) -> Result<(), SinkError> {
        let event = match self.try_send(event) {
            Ok(()) => return Ok(()),
            Err(Refused::Full(ev)) => ev,
            Err(Refused::Gone(e)) => return Err(e),
        };
        let send = match catch_unwind(AssertUnwindSafe(|| self.sink.send(event))) {
            Ok(f) => f,
            Err(p) => return Err(self.poisoned(p)),
        };
        match tokio::time::timeout_at(by, Contained::new(send)).await {
            Err(_) => {
                self.stalled.store(true, Ordering::Release);
                Err(SinkError::TimedOut(self.timeout))
            }
            Ok(Err(p)) => Err(self.poisoned(p)),
            Ok(Ok(r)) => {
                if r.is_ok() {
                    self.metrics.delivered();
                    self.stalled.store(false, Ordering::Release);
                }
                r
            }
        }
    }

    fn poisoned(&self, p: Panic) -> SinkError {
        if !self.broken.swap(true, Ordering::AcqRel) {
            tracing::error!(
                panic = %panic_message(&*p),
                "the event sink panicked; it is treated as closed from now on"
            );
        }
        SinkError::Panicked
    }

    /// Counts and logs an event that was not delivered.
    fn failed(&self, role: &Role, e: &SinkError) {
        self.metrics.sink_failure(e);
        tracing::warn!(error = %e, "{} could not be delivered", role.what());
    }

    /// The backlog's head, with its counts updated; `None` (and the drain marked
    /// stopped) when it is empty.
    fn next(&self) -> Option<Queued> {
        let mut b = self.lock();
        let item = b.items.pop_front();
        match &item {
            None => b.draining = false,
            Some(i) if i.class == Class::Running => b.running -= 1,
            Some(i) if i.class == Class::Ended => b.ended -= 1,
            Some(_) => {}
        }
        item
    }

    /// Answers one queued event: settles an opening's ticket, counts a failure, wakes
    /// the callers waiting for room and the one waiting for this answer.
    fn answer(&self, a: Answer, r: Result<(), SinkError>) {
        let Answer { role, pair, ack } = a;
        if let (Role::Opens, Some(p)) = (&role, &pair) {
            p.settle(&r);
        }
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.room.notify_waiters();
        if let Err(e) = &r {
            self.failed(&role, e);
        }
        if let Some(ack) = ack {
            let _ = ack.send(r);
        }
    }
}

/// What answering a queued event needs once the event itself is gone.
struct Answer {
    role: Role,
    pair: Option<Arc<Pair>>,
    ack: Option<oneshot::Sender<Result<(), SinkError>>>,
}

impl Queued {
    fn split(self) -> (Event, Instant, Answer) {
        let role = role_of(&self.event, self.pair.as_ref());
        let answer = Answer {
            role,
            pair: self.pair,
            ack: self.ack,
        };
        (self.event, self.deadline, answer)
    }
}

/// An event's part in its pair, as the drain sees it.
fn role_of(event: &Event, pair: Option<&Arc<Pair>>) -> Role {
    match event {
        Event::ToolExecuting(_) => Role::Opens,
        Event::ToolCompleted(_) => Role::Closes {
            opening: pair.cloned(),
        },
        _ => Role::Other,
    }
}

/// The task that drains one outbox's backlog; while it runs, the outbox says so.
struct Drain {
    outbox: Arc<Outbox>,
    /// The event being sent, to answer if the task is dropped midway.
    current: Option<Answer>,
    finished: bool,
}

impl Drain {
    async fn run(mut self) {
        let o = Arc::clone(&self.outbox);
        while let Some(item) = o.next() {
            let (event, by, answer) = item.split();
            // A completion goes out only after its opening did. The drain sends in
            // order, so an opening not settled by now was abandoned midway.
            let orphan = match (&answer.role, &answer.pair) {
                (Role::Closes { .. }, Some(p)) => match p.outcome() {
                    Some(Ok(())) => None,
                    Some(Err(e)) => Some(e.clone()),
                    None => Some(SinkError::Closed),
                },
                _ => None,
            };
            if let Some(e) = orphan {
                drop(event);
                o.answer(answer, Err(e));
                continue;
            }
            self.current = Some(answer);
            let r = o.send_by(event, by).await;
            if let Some(answer) = self.current.take() {
                o.answer(answer, r);
            }
        }
        self.finished = true;
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The task was dropped midway, or never ran (a runtime shutting down, or none
        // at all): nothing will send the rest, so every event still queued is answered
        // as failed, outside the lock, and the next event starts another drain.
        let items = {
            let mut b = self.outbox.lock();
            b.draining = false;
            b.running = 0;
            b.ended = 0;
            std::mem::take(&mut b.items)
        };
        let gone = SinkError::Failed("the runtime delivering these events stopped".into());
        if let Some(answer) = self.current.take() {
            self.outbox.answer(answer, Err(gone.clone()));
        }
        for item in items {
            let (event, _, answer) = item.split();
            drop(event);
            self.outbox.answer(answer, Err(gone.clone()));
        }
    }
}
