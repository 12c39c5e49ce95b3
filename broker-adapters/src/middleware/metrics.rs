//! Handler metrics: each call counts a delivery, times the handler and
//! counts the settlement its result leads to, through the `metrics` facade
//! with the names of [`crate::metrics`].
//!
//! Recorded per call, labelled with system and topic:
//! [`DELIVERED`] before the handler runs; after it,
//! [`PROCESS_DURATION`] (with the outcome `ack`, `nack` or `term`) and one of
//! [`ACKED`], [`NACKED`] or [`TERMINATED`]. The outcome is what the
//! [`Consumer`](crate::Consumer) does with the result: `Ok` is acked, a
//! retryable error nacked, a permanent one terminated. Placed outside a
//! [`DeadLetterLayer`](super::DeadLetterLayer), a dead-lettered event counts
//! as acked (it is), and [`DEAD_LETTERED`](crate::metrics::DEAD_LETTERED)
//! counts it separately.

use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::BoxFuture;
use tower::{Layer, Service};

use crate::metrics::{
    ACKED, DELIVERED, NACKED, PROCESS_DURATION, TERMINATED, labels, outcome, with_outcome,
};
use crate::router::HandlerError;
use crate::subscriber::Received;

/// Applies [`Metrics`] to a handler.
#[derive(Debug, Clone, Copy)]
pub struct MetricsLayer {
    system: &'static str,
}

impl MetricsLayer {
    /// Records handler metrics labelled with `system` (e.g. `kafka`).
    pub fn new(system: &'static str) -> Self {
        Self { system }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics::new(inner, self.system)
    }
}

/// Records delivery, latency and outcome metrics for each handler call; see
/// the [module docs](self).
#[derive(Debug, Clone)]
pub struct Metrics<S> {
    inner: S,
    system: &'static str,
}

impl<S> Metrics<S> {
    /// Wraps `inner`, labelling its metrics with `system`.
    pub fn new(inner: S, system: &'static str) -> Self {
        Self { inner, system }
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

impl<S> Service<Received> for Metrics<S>
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
        let labels = labels(Some(self.system), &received.info.topic);
        ::metrics::counter!(DELIVERED, labels.iter()).increment(1);
        let started = Instant::now();
        let handled = self.inner.call(received);
        Box::pin(async move {
            let result = handled.await.map_err(Into::into);
            let (counter, outcome) = match &result {
                Ok(()) => (ACKED, outcome::ACK),
                Err(e) if e.is_retryable() => (NACKED, outcome::NACK),
                Err(_) => (TERMINATED, outcome::TERM),
            };
            ::metrics::counter!(counter, labels.iter()).increment(1);
            ::metrics::histogram!(PROCESS_DURATION, with_outcome(labels, outcome))
                .record(started.elapsed());
            result
        })
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    use metrics_util::debugging::DebuggingRecorder;
    use tower::ServiceExt;

    use super::*;
    use crate::metrics::tests::{counter, histogram_count, runtime, seen};
    use crate::middleware::test_support::{fails, received};

    #[test]
    fn records_delivery_latency_and_outcome() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, || {
            runtime().block_on(async {
                let layer = MetricsLayer::new("memory");
                let ok = fails(Arc::new(AtomicU32::new(0)), 0, HandlerError::retryable);
                layer.layer(ok).oneshot(received(1)).await.expect("ok");
                let retry = fails(Arc::new(AtomicU32::new(0)), 1, HandlerError::retryable);
                layer
                    .layer(retry)
                    .oneshot(received(1))
                    .await
                    .expect_err("nack");
                let fatal = fails(Arc::new(AtomicU32::new(0)), 1, HandlerError::permanent);
                let service = layer.layer(fatal);
                service
                    .clone()
                    .oneshot(received(1))
                    .await
                    .expect_err("term");
            });
        });
        let seen = seen(&snapshotter);
        let base = ["system=memory", "topic=orders"];
        assert_eq!(counter(&seen, DELIVERED, &base), 3);
        assert_eq!(counter(&seen, ACKED, &base), 1);
        assert_eq!(counter(&seen, NACKED, &base), 1);
        assert_eq!(counter(&seen, TERMINATED, &base), 1);
        for outcome in ["outcome=ack", "outcome=nack", "outcome=term"] {
            let labels = ["system=memory", "topic=orders", outcome];
            assert_eq!(
                histogram_count(&seen, PROCESS_DURATION, &labels),
                1,
                "{outcome}"
            );
        }
    }
}
