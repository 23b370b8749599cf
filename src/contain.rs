//! Code the library calls but did not write (tools, sinks, policies) runs inside
//! [`Contained`]: a panic while it is polled *or dropped* becomes a value, so it
//! costs that one call and never unwinds into the pipeline, another user, or a
//! destructor that is already unwinding (which would abort the process).

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A caught panic's payload.
pub(crate) type Panic = Box<dyn Any + Send>;

pin_project_lite::pin_project! {
    /// Holds `F` (a future, or any value of code we call) and drops it with panics
    /// caught and logged: a tool's input or unstarted body can be dropped anywhere
    /// (a refusal, a cache hit, a cancelled call) without unwinding into the
    /// pipeline. Polls `F` as is.
    pub(crate) struct DropSafe<F> {
        #[pin]
        inner: Option<F>,
    }

    impl<F> PinnedDrop for DropSafe<F> {
        fn drop(this: Pin<&mut Self>) {
            this.clear();
        }
    }
}

impl<F> DropSafe<F> {
    pub(crate) fn new(f: F) -> Self {
        DropSafe { inner: Some(f) }
    }

    /// Drops the value now, its panic caught and logged.
    fn clear(self: Pin<&mut Self>) {
        let mut inner = self.project().inner;
        contained(|| inner.set(None));
    }
}

impl<F: Future> Future for DropSafe<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project().inner.as_pin_mut() {
            Some(f) => f.poll(cx),
            None => Poll::Pending, // dropped already: never ready again
        }
    }
}

/// Runs `f` (a drop of code we call, typically) with its panic caught and logged.
pub(crate) fn contained(f: impl FnOnce()) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
        tracing::error!(panic = %panic_message(&*p), "code we call panicked while being dropped");
    }
}

pin_project_lite::pin_project! {
    /// Polls `F` and drops it with panics caught. A panic while polling ends the
    /// future with `Err(payload)`; a panic while dropping is logged and swallowed.
    pub(crate) struct Contained<F> {
        #[pin]
        inner: DropSafe<F>,
    }
}

impl<F> Contained<F> {
    pub(crate) fn new(f: F) -> Self {
        Contained {
            inner: DropSafe::new(f),
        }
    }
}

impl<F: Future> Future for Contained<F> {
    type Output = Result<F::Output, Panic>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut inner = self.project().inner;
        if inner.inner.is_none() {
            return Poll::Pending; // polled after completion: never again ready
        }
        let r = match catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(v)) => Ok(v),
            Err(p) => Err(p),
        };
        // Drop the finished (or broken) future now, still inside the isolation.
        inner.clear();
        Poll::Ready(r)
    }
}

/// A panic payload as text, for logs (never for the model).
pub(crate) fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct PanicOnDrop;

    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            panic!("boom in drop");
        }
    }

    #[tokio::test]
    async fn panics_in_poll_and_in_drop_stay_inside() {
        let r = Contained::new(async { panic!("boom") }).await;
        assert_eq!(panic_message(&*r.unwrap_err()), "boom");

        // Dropped while pending, with a guard that panics in its destructor.
        let pending = Contained::new(async {
            let _guard = PanicOnDrop;
            std::future::pending::<()>().await;
        });
        let mut pending = Box::pin(pending);
        assert!(futures_util::FutureExt::now_or_never(pending.as_mut()).is_none());
        drop(pending); // must not unwind
    }
}
