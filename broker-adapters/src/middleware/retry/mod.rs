//! In-handler retry with capped, jittered exponential backoff.
//!
//! [`Retry`] calls the handler again when it fails with a
//! [retryable](HandlerError::retryable) error, waiting the [`RetryPolicy`]'s
//! backoff in between, up to [`max_attempts`](RetryPolicy::max_attempts)
//! calls per delivery. A [permanent](HandlerError::permanent) failure is
//! returned at once.
//!
//! # Interplay with broker redelivery
//!
//! Retrying happens in two tiers, each bounded, and never in an adapter:
//!
//! 1. **In the handler** (this layer), for blips that clear within
//!    milliseconds: up to `max_attempts` calls within one delivery. The
//!    delivery stays unsettled meanwhile, so the total wait, at most
//!    `(max_attempts - 1) × max_backoff`, must stay well below the
//!    subscription's [ack wait](crate::SubscribeOptions::ack_wait), or the
//!    broker hands the event to another member while it is still being
//!    retried here.
//! 2. **By the broker**: when the in-handler attempts are exhausted, the last
//!    error is returned unchanged (it is retryable), the
//!    [`Consumer`](crate::Consumer) nacks the delivery, and the broker
//!    redelivers it later with [`DeliveryInfo::attempt`](crate::DeliveryInfo)
//!    one higher. Put a [`DeadLetterLayer`](super::DeadLetterLayer) outside
//!    this layer to bound that tier: it dead-letters the event once
//!    `attempt` reaches its own maximum, so a handler is called at most
//!    `retry max_attempts × dead-letter max_attempts` times for one event.
//!
//! A handler that asks for a specific delay with
//! [`HandlerError::retry_after`] gets at least that delay; if it exceeds the
//! policy's [`max_backoff`](RetryPolicy::max_backoff), holding the delivery
//! that long is not worth it: the error goes straight to the broker, whose
//! nack carries the requested delay.
//!
//! Where a [`TimeoutLayer`](super::TimeoutLayer) sits decides what it bounds:
//! outside this layer it is a deadline for all attempts together, inside it a
//! deadline for each attempt.

mod layer;
mod policy;

use std::task::{Context, Poll};

use cloudevents::AttributesReader;
use futures_util::future::BoxFuture;
use tower::{Service, ServiceExt};

pub use self::layer::RetryLayer;
pub use self::policy::RetryPolicy;
use crate::router::HandlerError;
use crate::subscriber::Received;

/// Retries a handler's retryable failures; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    policy: RetryPolicy,
}

impl<S> Retry<S> {
    /// Wraps `inner`, retrying according to `policy`.
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Self { inner, policy }
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

impl<S> Service<Received> for Retry<S>
where
    S: Service<Received, Response = ()> + Clone + Send + 'static,
    S::Error: Into<HandlerError>,
    S::Future: Send,
{
    type Response = ();
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<(), HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, received: Received) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(retry(inner, self.policy, received))
    }
}

async fn retry<S>(mut inner: S, policy: RetryPolicy, received: Received) -> Result<(), HandlerError>
where
    S: Service<Received, Response = ()>,
    S::Error: Into<HandlerError>,
{
    let max_attempts = policy.max_attempts().get();
    for attempt in 1..max_attempts {
        if attempt > 1 {
            inner.ready().await.map_err(Into::into)?;
        }
        let error = match inner.call(received.clone()).await.map_err(Into::into) {
            Ok(()) => return Ok(()),
            Err(error) if !error.is_retryable() => return Err(error),
            Err(error) => error,
        };
        let backoff = policy.backoff(attempt, received.event.id());
        let wait = match error.retry_delay() {
            Some(asked) if asked > policy.max_backoff() => {
                tracing::debug!(
                    event.id = %received.event.id(),
                    attempt,
                    ?asked,
                    error = %error,
                    "handler asked for a long delay; leaving the retry to the broker"
                );
                return Err(error);
            }
            Some(asked) => asked.max(backoff),
            None => backoff,
        };
        tracing::debug!(
            event.id = %received.event.id(),
            attempt,
            max_attempts,
            ?wait,
            error = %error,
            "handler failed; retrying"
        );
        tokio::time::sleep(wait).await;
    }
    if max_attempts > 1 {
        inner.ready().await.map_err(Into::into)?;
    }
    // The last attempt: its error, retryable or not, goes to the consumer.
    inner.call(received).await.map_err(Into::into)
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::middleware::test_support::{fails, received};

    const MS: Duration = Duration::from_millis(1);

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy::new(max_attempts, MS, 5 * MS).expect("valid")
    }

    #[tokio::test]
    async fn retries_retryable_failures_until_success() {
        let calls = Arc::new(AtomicU32::new(0));
        let handler = fails(Arc::clone(&calls), 2, HandlerError::retryable);
        RetryLayer::new(policy(3))
            .layer(handler)
            .oneshot(received(1))
            .await
            .expect("the third attempt succeeds");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn returns_the_last_retryable_error_when_exhausted() {
        let calls = Arc::new(AtomicU32::new(0));
        let handler = fails(Arc::clone(&calls), u32::MAX, HandlerError::retryable);
        let err = RetryLayer::new(policy(4))
            .layer(handler)
            .oneshot(received(1))
            .await
            .expect_err("every attempt fails");
        assert!(err.is_retryable(), "the broker redelivers it: {err}");
        assert!(err.to_string().contains("failure 4"), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn permanent_failures_are_not_retried() {
        let calls = Arc::new(AtomicU32::new(0));
        let handler = fails(Arc::clone(&calls), u32::MAX, HandlerError::permanent);
        let err = RetryLayer::new(policy(5))
            .layer(handler)
            .oneshot(received(1))
            .await
            .expect_err("permanent");
        assert!(!err.is_retryable());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn one_attempt_means_no_retry() {
        let calls = Arc::new(AtomicU32::new(0));
        let handler = fails(Arc::clone(&calls), u32::MAX, HandlerError::retryable);
        RetryLayer::new(policy(1))
            .layer(handler)
            .oneshot(received(1))
            .await
            .expect_err("fails");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_long_requested_delay_goes_to_the_broker() {
        let calls = Arc::new(AtomicU32::new(0));
        let handler = fails(Arc::clone(&calls), u32::MAX, |e| {
            HandlerError::retry_after(e, Duration::from_secs(60))
        });
        let err = RetryLayer::new(policy(5))
            .layer(handler)
            .oneshot(received(1))
            .await
            .expect_err("fails");
        assert_eq!(err.retry_delay(), Some(Duration::from_secs(60)));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "not held in the handler");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_the_backoff_between_attempts() {
        let calls = Arc::new(AtomicU32::new(0));
        let handler = fails(Arc::clone(&calls), 2, HandlerError::retryable);
        let policy =
            RetryPolicy::new(3, Duration::from_secs(10), Duration::from_secs(20)).expect("valid");
        let started = tokio::time::Instant::now();
        RetryLayer::new(policy)
            .layer(handler)
            .oneshot(received(1))
            .await
            .expect("succeeds");
        let waited = started.elapsed();
        // Retry 1 waits 5..=10 s, retry 2 waits 10..=20 s.
        assert!(
            waited >= Duration::from_secs(15) && waited <= Duration::from_secs(30),
            "{waited:?}"
        );
    }
}
