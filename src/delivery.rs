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
//! Bounds: the backlog holds at most `capacity` events, plus the completions of calls
//! whose `tool_executing` went out (at most one per call in flight, so a call that
//! opened its pair can always close it). Progress never queues: it is sent at once or
//! dropped and counted. A sink that panics is caught, counted, and treated as closed
//! from then on, so it is never called again, from a destructor or anywhere else. A
//! sink that let a `send` run out of delivery time is *stalled*: until it takes an
//! event again, an event that finds it full fails at once, so one stuck socket costs
//! its user one delivery timeout, not one per call.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::blocking::BlockingJobs;
use crate::contain::{Contained, Panic, panic_message};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::sink::{EventSink, SinkError, TrySendError};
use crate::time::deadline;

/// One sink with its ordered, bounded backlog.
pub(crate) struct Outbox {
    sink: Arc<dyn EventSink>,
    metrics: Arc<Metrics>,
    blocking: Arc<BlockingJobs>,
    timeout: Duration,
    capacity: usize,
    /// Events queued and not yet answered (the one being sent included). While it is
    /// above zero a new event queues behind them instead of overtaking them.
    queued: AtomicUsize,
    /// The sink panicked once; it is not called again.
    broken: AtomicBool,
    /// The last `send` ran out of delivery time and nothing has gone through since:
    /// until the sink takes an event again, one that finds it full fails at once
    /// instead of making its call wait another delivery timeout.
    stalled: AtomicBool,
    backlog: Mutex<Backlog>,
    room: Notify,
}

#[derive(Default)]
struct Backlog {
    items: VecDeque<Queued>,
    draining: bool,
}

struct Queued {
    event: Event,
    deadline: Instant,
    ack: Option<oneshot::Sender<Result<(), SinkError>>>,
}

/// Where an event stands in its call's pair; decides whether it may wait and how much
/// of the backlog it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `tool_executing`: queued only within the backlog's bound.
    Opens,
    /// The `tool_completed` of a call whose `tool_executing` went out or was queued:
    /// may always queue. `behind_opening` when that `tool_executing` is still queued
    /// (or unconfirmed): then the completion must queue behind it.
    Closes {
        /// The call's `tool_executing` was handed off rather than confirmed.
        behind_opening: bool,
    },
    /// Any other event that may wait (agent lifecycle events).
    Other,
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
    /// The sink refused it for good (closed, panicked); counted.
    Failed(SinkError),
}

enum Refused {
    Full(Event),
    Gone(SinkError),
}

impl Outbox {
    pub(crate) fn new(
        sink: Arc<dyn EventSink>,
        (metrics, blocking): (Arc<Metrics>, Arc<BlockingJobs>),
        timeout: Duration,
        capacity: usize,
    ) -> Self {
        Outbox {
            sink,
            metrics,
            blocking,
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

    /// The engine's list of blocking bodies, for the calls made through this outbox.
    pub(crate) fn blocking(&self) -> &Arc<BlockingJobs> {
        &self.blocking
    }

    fn lock(&self) -> MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `event` at once if the sink has room and nothing is queued before it
    /// (the path of almost every event); otherwise hands it back for
    /// [`deliver`](Self::deliver). A refusal is counted.
    #[inline]
    pub(crate) fn send_now(&self, event: Event, role: Role) -> Now {
        if matches!(
            role,
            Role::Closes {
                behind_opening: true
            }
        ) || self.queued.load(Ordering::Acquire) != 0
        {
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
    /// it back): waits for room, then for the backlog's answer, under `watch`.
    /// `queued` is set the moment the event joins the backlog, so a caller whose
    /// future is dropped while it waits knows the event will still go out.
    pub(crate) async fn deliver(
        self: &Arc<Self>,
        event: Event,
        role: Role,
        watch: Watch<'_>,
        queued: &mut bool,
    ) -> Result<Delivered, NotSent> {
        let (tx, rx) = oneshot::channel();
        let queued_by = self.enqueue(event, role, tx, watch).await?;
        *queued = true;
        tokio::select! {
            biased;
            r = rx => match r {
                Ok(Ok(())) => Ok(Delivered::Sent),
                Ok(Err(e)) => Err(NotSent::Sink(e)),
                Err(_) => Err(NotSent::Sink(SinkError::Closed)),
            },
            () = watch.interrupted() => Ok(Delivered::HandedOff),
            // The backlog answers within the delivery timeout; this only guards
            // against a runtime that stopped its task.
            () = tokio::time::sleep_until(queued_by) => Ok(Delivered::HandedOff),
        }
    }

    /// Queues `event`, waiting for room up to the delivery timeout; returns the
    /// instant by which the backlog will have answered.
    async fn enqueue(
        self: &Arc<Self>,
        event: Event,
        role: Role,
        ack: oneshot::Sender<Result<(), SinkError>>,
        watch: Watch<'_>,
    ) -> Result<Instant, NotSent> {
        let may_exceed = matches!(role, Role::Closes { .. });
        let give_up = deadline(Instant::now(), self.timeout);
        let mut item = Queued {
            event,
            deadline: give_up,
            ack: Some(ack),
        };
        loop {
            let mut room = pin!(self.room.notified());
            room.as_mut().enable();
            item.deadline = deadline(Instant::now(), self.timeout);
            let by = item.deadline + Duration::from_millis(1);
            match self.push(item, may_exceed) {
                Ok(()) => return Ok(by),
                Err((back, None)) => item = back,
                Err((_, Some(e))) => {
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

    /// Puts `item` at the back of the backlog and makes sure a task drains it.
    /// `Err((item, None))`: no room now; `Err((_, Some(e)))`: it can never be queued.
    #[allow(clippy::result_large_err)] // the item comes back so the caller can retry
    fn push(
        self: &Arc<Self>,
        item: Queued,
        may_exceed: bool,
    ) -> Result<(), (Queued, Option<SinkError>)> {
        if self.broken.load(Ordering::Acquire) {
            return Err((item, Some(SinkError::Panicked)));
        }
        if self.stalled.load(Ordering::Acquire) {
            return Err((item, Some(SinkError::TimedOut(self.timeout))));
        }
        let mut b = self.lock();
        if !may_exceed && b.items.len() >= self.capacity {
            return Err((item, None));
        }
        if !b.draining {
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                let e = SinkError::Failed("no async runtime to deliver on".into());
                return Err((item, Some(e)));
            };
            b.draining = true;
            let drain = Drain {
                outbox: Arc::clone(self),
                finished: false,
            };
            rt.spawn(drain.run());
        }
        b.items.push_back(item);
        self.queued.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// The events of a call that cannot wait (its future is being dropped, or it was
    /// interrupted before it could queue): sent now where the sink has room, else
    /// queued without waiting. `opening` is the call's `tool_executing` when it has not
    /// gone out yet; then both go, or neither.
    pub(crate) fn hand_off(self: &Arc<Self>, opening: Option<Event>, closing: Event, role: Role) {
        let behind = matches!(
            role,
            Role::Closes {
                behind_opening: true
            }
        );
        let (mut opening, mut closing) = (opening, Some(closing));
        if !behind && self.queued.load(Ordering::Acquire) == 0 {
            if let Some(ev) = opening.take() {
                match self.try_send(ev) {
                    Ok(()) => {}
                    Err(Refused::Full(ev)) => opening = Some(ev),
                    Err(Refused::Gone(e)) => return self.failed(Role::Opens, &e),
                }
            }
            if opening.is_none()
                && let Some(ev) = closing.take()
            {
                match self.try_send(ev) {
                    Ok(()) => return,
                    Err(Refused::Full(ev)) => closing = Some(ev),
                    Err(Refused::Gone(e)) => return self.failed(role, &e),
                }
            }
        }
        let queued = |event| Queued {
            event,
            deadline: deadline(Instant::now(), self.timeout),
            ack: None,
        };
        if let Some(ev) = opening {
            // Both must fit: the completion may exceed the bound once its opening is in.
            if let Err((_, e)) = self.push(queued(ev), false) {
                let e = e.unwrap_or(SinkError::Full);
                self.failed(Role::Opens, &e);
                return self.failed(role, &e); // its completion is not sent alone
            }
        }
        if let Some(ev) = closing
            && let Err((_, e)) = self.push(queued(ev), true)
        {
            self.failed(role, &e.unwrap_or(SinkError::Full));
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
    fn failed(&self, role: Role, e: &SinkError) {
        self.metrics.sink_failure();
        let what = match role {
            Role::Opens => "tool_executing",
            Role::Closes { .. } => "tool_completed",
            Role::Other => "an event",
        };
        tracing::warn!(error = %e, "{what} could not be delivered");
    }
}

/// The task that drains one outbox's backlog; while it runs, the outbox says so.
struct Drain {
    outbox: Arc<Outbox>,
    finished: bool,
}

impl Drain {
    async fn run(mut self) {
        let o = Arc::clone(&self.outbox);
        // Calls whose `tool_executing` failed here: their later events are not sent
        // alone (a completion without its opening would make no sense on the wire).
        let mut failed: VecDeque<(Arc<str>, SinkError)> = VecDeque::new();
        loop {
            let item = {
                let mut b = o.lock();
                match b.items.pop_front() {
                    Some(item) => item,
                    None => {
                        b.draining = false;
                        self.finished = true;
                        return;
                    }
                }
            };
            let Queued {
                event,
                deadline: by,
                ack,
            } = item;
            let role = match &event {
                Event::ToolExecuting(_) => Role::Opens,
                Event::ToolCompleted(_) => Role::Closes {
                    behind_opening: false,
                },
                _ => Role::Other,
            };
            let call = call_of(&event).cloned();
            let orphan = call
                .as_ref()
                .and_then(|id| failed.iter().find(|(f, _)| f == id));
            let r = match orphan {
                Some((_, e)) => Err(e.clone()),
                None => o.send_by(event, by).await,
            };
            o.queued.fetch_sub(1, Ordering::AcqRel);
            o.room.notify_waiters();
            if let Err(e) = &r {
                o.failed(role, e);
                if let (Role::Opens, Some(id)) = (role, call) {
                    if failed.len() >= o.capacity {
                        failed.pop_front();
                    }
                    failed.push_back((id, e.clone()));
                }
            }
            if let Some(ack) = ack {
                let _ = ack.send(r);
            }
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        // Only when the runtime dropped the task midway: the next event starts another.
        if !self.finished {
            self.outbox.lock().draining = false;
        }
    }
}

fn call_of(event: &Event) -> Option<&Arc<str>> {
    match event {
        Event::ToolExecuting(e) => Some(&e.call_id),
        Event::ToolCompleted(e) => Some(&e.call_id),
        Event::ToolProgress(e) => Some(&e.call_id),
        _ => None,
    }
}
