//! Dead-lettering: events a handler gives up on are published, unchanged and
//! with the reason, to a dead-letter topic, and the original is acked.
//!
//! [`DeadLetter`] looks at each handler failure:
//!
//! - a [permanent](HandlerError::permanent) failure, or a
//!   [retryable](HandlerError::retryable) one on delivery
//!   [`attempt`](crate::DeliveryInfo::attempt) `≥ max_attempts`: the event is
//!   published to the dead-letter topic as built by [`dead_letter_event`]
//!   (the original id, type, source, data, attributes and extensions, plus
//!   [`DLQ_REASON`], [`DLQ_TOPIC`], [`DLQ_GROUP`], [`DLQ_ATTEMPTS`] and
//!   [`DLQ_TIME`]), and the service returns `Ok`, so the original is acked:
//!   kept, not lost, and no longer redelivered;
//! - a retryable failure on an earlier attempt: returned unchanged, so the
//!   event is nacked and delivered again;
//! - if publishing the dead-letter event fails, a retryable
//!   [`DeadLetterFailed`]: the original is nacked and tried again, never
//!   lost.
//!
//! Each dead-lettering is logged at `warn` and counted in
//! [`DEAD_LETTERED`].
//!
//! Dead-lettering is at least once, like every publish: if the process dies
//! between publishing the dead-letter event and acking the original, the
//! original is redelivered and may be dead-lettered twice, with the same id.
//!
//! Put this layer outside [`RetryLayer`](super::RetryLayer) and
//! [`TimeoutLayer`](super::TimeoutLayer) so it sees their final verdicts.

mod error;
mod event;
mod layer;

use std::sync::Arc;
use std::task::{Context, Poll};

use cloudevents::AttributesReader;
use futures_util::future::BoxFuture;
use tower::Service;

pub use self::error::DeadLetterFailed;
pub use self::event::{
    DLQ_ATTEMPTS, DLQ_GROUP, DLQ_REASON, DLQ_TIME, DLQ_TOPIC, DeadLetterInfo, MAX_REASON_LEN,
    dead_letter_event,
};
use self::layer::Config;
pub use self::layer::DeadLetterLayer;
use crate::metrics::{DEAD_LETTERED, labels, outcome, with_outcome};
use crate::router::HandlerError;
use crate::subscriber::Received;

/// Dead-letters the events a handler gives up on; see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct DeadLetter<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> DeadLetter<S> {
    /// The wrapped handler.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the handler.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<Received> for DeadLetter<S>
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
        // The handler consumes the event; keep a copy to dead-letter.
        let kept = received.clone();
        let handled = self.inner.call(received);
        let config = Arc::clone(&self.config);
        Box::pin(async move {
            let error: HandlerError = match handled.await {
                Ok(()) => return Ok(()),
                Err(error) => error.into(),
            };
            if error.is_retryable() && kept.info.attempt < config.max_attempts {
                return Err(error);
            }
            dead_letter(&config, kept, error).await
        })
    }
}

async fn dead_letter(
    config: &Config,
    kept: Received,
    error: HandlerError,
) -> Result<(), HandlerError> {
    let id = kept.event.id().to_owned();
    let topic = kept.info.topic.clone();
    let attempt = kept.info.attempt;
    let reason = error.to_string();
    let event = dead_letter_event(kept, &reason);
    let published = config.publisher.publish(&config.dlq_topic, event).await;
    let labels = labels(None, &topic);
    match published {
        Ok(()) => {
            ::metrics::counter!(DEAD_LETTERED, with_outcome(labels, outcome::OK)).increment(1);
            tracing::warn!(
                event.id = %id,
                topic = %topic,
                dlq = %config.dlq_topic,
                attempt,
                error = %error,
                "event dead-lettered"
            );
            Ok(())
        }
        Err(publish_error) => {
            ::metrics::counter!(DEAD_LETTERED, with_outcome(labels, outcome::ERROR)).increment(1);
            tracing::error!(
                event.id = %id,
                topic = %topic,
                dlq = %config.dlq_topic,
                error = %publish_error,
                "could not dead-letter the event; it will be delivered again"
            );
            Err(HandlerError::retryable(DeadLetterFailed::new(
                config.dlq_topic.clone(),
                reason,
                publish_error,
            )))
        }
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use std::num::NonZeroU32;
    use std::sync::atomic::{AtomicU32, Ordering};

    use cloudevents::AttributesReader;
    use futures_util::StreamExt;
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::memory::MemoryBroker;
    use crate::middleware::test_support::{fails, received};
    use crate::publisher::Publisher;
    use crate::subscriber::{SubscribeOptions, Subscriber, Subscription};
    use crate::topic::Topic;

    const DLQ: &str = "orders.dlq";

    async fn dlq(broker: &MemoryBroker) -> Subscription {
        broker
            .subscribe(
                &Topic::from_static(DLQ),
                SubscribeOptions::new("inspector").expect("valid"),
            )
            .await
            .expect("subscribed")
    }

    fn layer(broker: &MemoryBroker, max_attempts: u32) -> DeadLetterLayer {
        DeadLetterLayer::new(
            Arc::new(broker.clone()),
            Topic::from_static(DLQ),
            NonZeroU32::new(max_attempts).expect("positive"),
        )
    }

    #[tokio::test]
    async fn permanent_failures_are_dead_lettered_and_acked() {
        let broker = MemoryBroker::new();
        let mut dead = dlq(&broker).await;
        let calls = Arc::new(AtomicU32::new(0));
        let handler = fails(Arc::clone(&calls), u32::MAX, HandlerError::permanent);
        let original = received(1);
        layer(&broker, 5)
            .layer(handler)
            .oneshot(original.clone())
            .await
            .expect("dead-lettered, so handled");
        let mut delivery = dead.next().await.expect("open").expect("delivery");
        let event = delivery.event();
        assert_eq!(event.id(), original.event.id());
        assert_eq!(event.data(), original.event.data());
        let info = DeadLetterInfo::from_event(event)
            .expect("well-formed")
            .expect("dead-lettered");
        assert!(info.reason.contains("permanent"), "{}", info.reason);
        assert!(info.reason.contains("failure 1"), "{}", info.reason);
        assert_eq!(info.topic, original.info.topic);
        assert_eq!(info.group, original.info.group);
        assert_eq!(info.attempts.get(), 1);
        delivery.ack().await.expect("ack");
    }

    #[tokio::test]
    async fn retryable_failures_are_returned_until_the_last_attempt() {
        let broker = MemoryBroker::new();
        let mut dead = dlq(&broker).await;
        let calls = Arc::new(AtomicU32::new(0));
        let handler = fails(Arc::clone(&calls), u32::MAX, HandlerError::retryable);
        let service = layer(&broker, 3).layer(handler);
        for attempt in 1..3 {
            let err = service
                .clone()
                .oneshot(received(attempt))
                .await
                .expect_err("redelivered");
            assert!(err.is_retryable());
        }
        service
            .oneshot(received(3))
            .await
            .expect("dead-lettered on the last attempt");
        let delivery = dead.next().await.expect("open").expect("delivery");
        let info = DeadLetterInfo::from_event(delivery.event())
            .expect("well-formed")
            .expect("dead-lettered");
        assert_eq!(info.attempts.get(), 3);
        assert!(info.reason.contains("retryable"), "{}", info.reason);
    }

    #[tokio::test]
    async fn success_passes_through() {
        let broker = MemoryBroker::new();
        let calls = Arc::new(AtomicU32::new(0));
        let handler = fails(Arc::clone(&calls), 0, HandlerError::permanent);
        layer(&broker, 1)
            .layer(handler)
            .oneshot(received(1))
            .await
            .expect("handled");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_dead_letter_publish_is_retryable() {
        let broker = MemoryBroker::new();
        Publisher::close(&broker).await.expect("closed");
        let calls = Arc::new(AtomicU32::new(0));
        let handler = fails(Arc::clone(&calls), u32::MAX, HandlerError::permanent);
        let err = layer(&broker, 1)
            .layer(handler)
            .oneshot(received(1))
            .await
            .expect_err("the original must not be acked");
        assert!(err.is_retryable(), "{err}");
        let cause = std::error::Error::source(&err)
            .and_then(|e| e.downcast_ref::<DeadLetterFailed>())
            .expect("a DeadLetterFailed");
        assert_eq!(cause.dlq_topic().as_str(), DLQ);
        assert!(cause.reason().contains("failure 1"));
        assert!(err.to_string().contains("could not dead-letter"), "{err}");
    }
}
