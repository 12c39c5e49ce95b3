//! [`TracingPublisher`]: the producer side of trace propagation.

use async_trait::async_trait;
use cloudevents::{AttributesReader, Event};
use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::error::{Error, Result};
use crate::publisher::Publisher;
use crate::telemetry::{
    CLOUDEVENTS_EVENT_TYPE, ERROR_TYPE, MESSAGING_BATCH_MESSAGE_COUNT, MESSAGING_DESTINATION_NAME,
    MESSAGING_MESSAGE_ID, MESSAGING_OPERATION_TYPE, MESSAGING_SYSTEM, OTEL_KIND, OTEL_NAME,
    OTEL_STATUS_CODE, TRACE_ID, ensure_traceparent, operation,
};
use crate::topic::Topic;

/// A [`Publisher`] that makes sure every event carries a W3C `traceparent`
/// and publishes inside a `publish` span.
///
/// - An event with a valid `traceparent` keeps it (and its `tracestate`):
///   it continues the trace it belongs to, e.g. one copied from its cause by
///   [`CloudEventBuilder::caused_by`](crate::CloudEventBuilder::caused_by).
/// - An event without one, or with a malformed one, starts a new trace: a
///   freshly [generated](crate::telemetry::TraceParent::generate)
///   `traceparent` is written and any `tracestate` dropped.
///
/// The span has `otel.kind = producer`, `messaging.operation.type =
/// publish`, the system, the topic, the event id and type (for a batch, the
/// message count instead) and the `trace_id` written into the event.
/// `flush` and `close` are forwarded as they are.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> broker_adapters::Result<()> {
/// use broker_adapters::middleware::TracingPublisher;
/// use broker_adapters::prelude::*;
/// use futures_util::StreamExt;
///
/// let broker = MemoryBroker::new();
/// let topic = Topic::from_static("orders");
/// let mut sub = broker.subscribe(&topic, SubscribeOptions::new("g")?).await?;
/// let publisher = TracingPublisher::new(broker.clone(), "memory");
/// publisher.publish_json(&topic, "com.example.order.placed", "/doc", &1).await?;
/// let delivery = sub.next().await.expect("open")?;
/// assert!(delivery.event().traceparent().is_some());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TracingPublisher<P> {
    inner: P,
    system: &'static str,
}

impl<P> TracingPublisher<P> {
    /// Wraps `inner`, naming `system` (e.g. `kafka`) in its spans.
    pub fn new(inner: P, system: &'static str) -> Self {
        Self { inner, system }
    }

    /// The wrapped publisher.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Unwraps the publisher.
    pub fn into_inner(self) -> P {
        self.inner
    }
}

fn record_failure(span: &Span, result: &Result<()>) {
    if let Err(error) = result {
        span.record(OTEL_STATUS_CODE, "ERROR");
        span.record(ERROR_TYPE, error_type(error));
    }
}

fn error_type(error: &Error) -> &'static str {
    if error.is_retryable() {
        "retryable"
    } else {
        "permanent"
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl<P: Publisher> Publisher for TracingPublisher<P> {
    async fn publish(&self, topic: &Topic, mut event: Event) -> Result<()> {
        let trace = ensure_traceparent(&mut event);
        let span = tracing::info_span!(
            "publish",
            { OTEL_NAME } = %format_args!("{} {topic}", operation::PUBLISH),
            { OTEL_KIND } = operation::KIND_PRODUCER,
            { MESSAGING_SYSTEM } = self.system,
            { MESSAGING_OPERATION_TYPE } = operation::PUBLISH,
            { MESSAGING_DESTINATION_NAME } = %topic,
            { MESSAGING_MESSAGE_ID } = %event.id(),
            { CLOUDEVENTS_EVENT_TYPE } = %event.ty(),
            { TRACE_ID } = %trace.trace_id(),
            { OTEL_STATUS_CODE } = Empty,
            { ERROR_TYPE } = Empty,
        );
        let result = self
            .inner
            .publish(topic, event)
            .instrument(span.clone())
            .await;
        record_failure(&span, &result);
        result
    }

    async fn publish_batch(&self, topic: &Topic, mut events: Vec<Event>) -> Result<()> {
        for event in &mut events {
            ensure_traceparent(event);
        }
        let span = tracing::info_span!(
            "publish",
            { OTEL_NAME } = %format_args!("{} {topic}", operation::PUBLISH),
            { OTEL_KIND } = operation::KIND_PRODUCER,
            { MESSAGING_SYSTEM } = self.system,
            { MESSAGING_OPERATION_TYPE } = operation::PUBLISH,
            { MESSAGING_DESTINATION_NAME } = %topic,
            { MESSAGING_BATCH_MESSAGE_COUNT } = events.len(),
            { OTEL_STATUS_CODE } = Empty,
            { ERROR_TYPE } = Empty,
        );
        let result = self
            .inner
            .publish_batch(topic, events)
            .instrument(span.clone())
            .await;
        record_failure(&span, &result);
        result
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use futures_util::StreamExt;
    use tracing::instrument::WithSubscriber;

    use super::*;
    use crate::event::{CloudEventBuilder, EventExt};
    use crate::memory::MemoryBroker;
    use crate::middleware::test_support::Capture;
    use crate::subscriber::{SubscribeOptions, Subscriber};
    use crate::telemetry::TraceParent;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn event() -> CloudEventBuilder {
        CloudEventBuilder::new("com.example.t", "/test")
    }

    #[tokio::test]
    async fn injects_a_traceparent_only_where_missing() {
        let broker = MemoryBroker::new();
        let topic = Topic::from_static("orders");
        let mut sub = broker
            .subscribe(&topic, SubscribeOptions::new("g").expect("valid"))
            .await
            .expect("subscribed");
        let capture = Capture::default();
        let publisher = TracingPublisher::new(broker.clone(), "memory");
        async {
            let kept = event()
                .traceparent(TP)
                .tracestate("rojo=1")
                .build()
                .expect("valid");
            publisher.publish(&topic, kept).await.expect("published");
            let fresh = event().build().expect("valid");
            publisher.publish(&topic, fresh).await.expect("published");
            publisher
                .publish_batch(
                    &topic,
                    vec![
                        event().build().expect("valid"),
                        event().build().expect("valid"),
                    ],
                )
                .await
                .expect("published");
            publisher.flush().await.expect("flushed");
        }
        .with_subscriber(capture.clone())
        .await;

        let mut received = Vec::new();
        for _ in 0..4 {
            let mut delivery = sub.next().await.expect("open").expect("delivery");
            received.push(delivery.event().clone());
            delivery.ack().await.expect("acked");
        }
        assert_eq!(received[0].traceparent(), Some(TP), "kept");
        assert_eq!(received[0].tracestate(), Some("rojo=1"), "kept");
        let mut trace_ids = std::collections::HashSet::new();
        for event in &received[1..] {
            let tp = TraceParent::from_event(event).expect("a valid traceparent was injected");
            assert!(tp.is_sampled());
            trace_ids.insert(tp.trace_id());
        }
        assert_eq!(trace_ids.len(), 3, "each new event starts its own trace");

        let spans = capture.spans("publish");
        assert_eq!(spans.len(), 3);
        assert_eq!(
            spans[0].field(TRACE_ID),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(spans[0].field(MESSAGING_SYSTEM), Some("memory"));
        assert_eq!(spans[0].field(OTEL_KIND), Some("producer"));
        assert_eq!(spans[0].field(OTEL_NAME), Some("publish orders"));
        assert_eq!(spans[0].field(MESSAGING_MESSAGE_ID), Some(received[0].id()));
        assert_eq!(spans[2].field(MESSAGING_BATCH_MESSAGE_COUNT), Some("2"));
    }

    #[tokio::test]
    async fn failures_mark_the_span() {
        let broker = MemoryBroker::new();
        let capture = Capture::default();
        let publisher = TracingPublisher::new(broker, "memory");
        async {
            publisher.close().await.expect("closed");
            publisher
                .publish(&Topic::from_static("t"), event().build().expect("valid"))
                .await
                .expect_err("closed");
        }
        .with_subscriber(capture.clone())
        .await;
        let span = capture.span("publish");
        assert_eq!(span.field(OTEL_STATUS_CODE), Some("ERROR"));
        assert_eq!(span.field(ERROR_TYPE), Some("permanent"));
    }
}
