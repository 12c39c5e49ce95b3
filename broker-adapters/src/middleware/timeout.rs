//! A deadline for handlers: a handler that has not finished in time fails
//! with a retryable [`ErrorKind::Timeout`], so the event is delivered again
//! (or dead-lettered, by a [`DeadLetterLayer`](super::DeadLetterLayer) on
//! its last attempt).
//!
//! `tower::timeout` is not used because its error is an opaque `BoxError`,
//! which does not say whether retrying can help; this layer's error is a
//! [`HandlerError`] that does.
//!
//! The handler's future is dropped when the deadline passes, so a handler
//! must leave nothing half-done at its `.await` points (or make its effects
//! idempotent, as at-least-once delivery demands anyway).

use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tower::{Layer, Service};

use crate::error::{Error, ErrorKind};
use crate::router::HandlerError;
use crate::subscriber::Received;

/// Applies [`Timeout`] to a handler.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// Fails handlers that take longer than `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    /// The deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout::new(inner, self.timeout)
    }
}

/// Fails a handler call that takes longer than its deadline with a retryable
/// [`ErrorKind::Timeout`] (`operation: "handler"`); see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Timeout<S> {
    /// Wraps `inner` with a `timeout` deadline per call.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    /// The wrapped handler.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the handler.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<Received> for Timeout<S>
where
    S: Service<Received, Response = ()>,
    S::Error: Into<HandlerError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<(), HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, received: Received) -> Self::Future {
        let after = self.timeout;
        let handled = self.inner.call(received);
        Box::pin(async move {
            match tokio::time::timeout(after, handled).await {
                Ok(result) => result.map_err(Into::into),
                Err(_elapsed) => Err(HandlerError::retryable(Error::new(ErrorKind::Timeout {
                    operation: "handler",
                    after,
                }))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use tower::ServiceExt;

    use super::*;
    use crate::middleware::test_support::{fails, received};

    #[tokio::test(start_paused = true)]
    async fn a_slow_handler_fails_retryably() {
        let handler = tower::service_fn(|_: Received| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<(), HandlerError>(())
        });
        let err = TimeoutLayer::new(Duration::from_millis(50))
            .layer(handler)
            .oneshot(received(1))
            .await
            .expect_err("timed out");
        assert!(err.is_retryable());
        assert_eq!(
            err.to_string(),
            "handler failed (retryable): handler timed out after 50ms"
        );
        let cause = std::error::Error::source(&err)
            .and_then(|e| e.downcast_ref::<Error>())
            .expect("the crate's error");
        assert!(matches!(
            cause.kind(),
            ErrorKind::Timeout {
                operation: "handler",
                ..
            }
        ));
    }

    #[tokio::test]
    async fn fast_handlers_keep_their_result() {
        let calls = Arc::new(AtomicU32::new(0));
        let layer = TimeoutLayer::new(Duration::from_secs(5));
        layer
            .layer(fails(Arc::clone(&calls), 0, HandlerError::permanent))
            .oneshot(received(1))
            .await
            .expect("ok");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let err = layer
            .layer(fails(
                Arc::new(AtomicU32::new(0)),
                1,
                HandlerError::permanent,
            ))
            .oneshot(received(1))
            .await
            .expect_err("the handler's own error");
        assert!(!err.is_retryable());
    }
}
