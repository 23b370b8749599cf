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
    /// Polls `F` and drops it with panics caught. A panic while polling ends the
    /// future with `Err(payload)`; a panic while dropping is logged and swallowed.
    pub(crate) struct Contained<F> {
        #[pin]
        inner: Option<F>,
    }

    impl<F> PinnedDrop for Contained<F> {
        fn drop(this: Pin<&mut Self>) {
            let mut inner = this.project().inner;
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| inner.set(None))) {
                tracing::error!(panic = %panic_message(&*p), "a future panicked while being dropped");
            }
        }
    }
}

impl<F> Contained<F> {
    pub(crate) fn new(f: F) -> Self {
        Contained { inner: Some(f) }
    }
}

impl<F: Future> Future for Contained<F> {
    type Output = Result<F::Output, Panic>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut inner = self.project().inner;
        let Some(f) = inner.as_mut().as_pin_mut() else {
            return Poll::Pending; // polled after completion: never again ready
        };
        let r = match catch_unwind(AssertUnwindSafe(|| f.poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(v)) => Ok(v),
            Err(p) => Err(p),
        };
        // Drop the finished (or broken) future now, still inside the isolation.
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| inner.set(None))) {
            tracing::error!(panic = %panic_message(&*p), "a future panicked while being dropped");
        }
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
