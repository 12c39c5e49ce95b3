//! Tracing: each handler call runs inside a `process` span carrying the
//! OpenTelemetry messaging fields of [`telemetry`](crate::telemetry) and the
//! trace context the producer put in the event; [`TracingPublisher`] puts it
//! there.
//!
//! The consumer span's fields:
//!
//! | field | value |
//! | --- | --- |
//! | [`otel.name`](crate::telemetry::OTEL_NAME) | `process <topic>` |
//! | [`otel.kind`](crate::telemetry::OTEL_KIND) | `consumer` |
//! | [`messaging.system`](crate::telemetry::MESSAGING_SYSTEM) | the layer's `system` |
//! | [`messaging.operation.type`](crate::telemetry::MESSAGING_OPERATION_TYPE) | `process` |
//! | [`messaging.destination.name`](crate::telemetry::MESSAGING_DESTINATION_NAME) | the topic |
//! | [`messaging.consumer.group.name`](crate::telemetry::MESSAGING_CONSUMER_GROUP_NAME) | the group |
//! | [`messaging.message.id`](crate::telemetry::MESSAGING_MESSAGE_ID) | the event `id` |
//! | [`cloudevents.event_type`](crate::telemetry::CLOUDEVENTS_EVENT_TYPE), [`cloudevents.event_source`](crate::telemetry::CLOUDEVENTS_EVENT_SOURCE) | the event `type`, `source` |
//! | [`delivery_attempt`](crate::telemetry::DELIVERY_ATTEMPT) | the delivery attempt |
//! | [`trace_id`](crate::telemetry::TRACE_ID), [`parent_span_id`](crate::telemetry::PARENT_SPAN_ID), [`trace_state`](crate::telemetry::TRACE_STATE) | from `traceparent`/`tracestate`, when valid |
//! | [`otel.status_code`](crate::telemetry::OTEL_STATUS_CODE), [`error.type`](crate::telemetry::ERROR_TYPE) | `ERROR` and `retryable`/`permanent` when the handler failed |
//!
//! The span is attached to the handler's future with
//! [`Instrument`], never entered across an `.await`.

mod layer;
mod publisher;

use std::task::{Context, Poll};

use cloudevents::AttributesReader;
use futures_util::future::BoxFuture;
use tower::Service;
use tracing::field::Empty;
use tracing::{Instrument, Span};

pub use self::layer::TraceLayer;
pub use self::publisher::TracingPublisher;
use crate::event::EventExt;
use crate::router::HandlerError;
use crate::subscriber::Received;
use crate::telemetry::{
    CLOUDEVENTS_EVENT_SOURCE, CLOUDEVENTS_EVENT_TYPE, DELIVERY_ATTEMPT, ERROR_TYPE,
    MESSAGING_CONSUMER_GROUP_NAME, MESSAGING_DESTINATION_NAME, MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_TYPE, MESSAGING_SYSTEM, OTEL_KIND, OTEL_NAME, OTEL_STATUS_CODE,
    PARENT_SPAN_ID, TRACE_ID, TRACE_STATE, TraceParent, operation,
};

/// Runs each handler call inside a `process` span; see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
    system: &'static str,
}

impl<S> Trace<S> {
    /// Wraps `inner`, naming `system` (e.g. `kafka`) in its spans.
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

impl<S> Service<Received> for Trace<S>
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
        let span = process_span(self.system, &received);
        let handled = span.in_scope(|| self.inner.call(received));
        let outer = span.clone();
        Box::pin(
            async move {
                let result = handled.await.map_err(Into::into);
                if let Err(error) = &result {
                    outer.record(OTEL_STATUS_CODE, "ERROR");
                    outer.record(ERROR_TYPE, error_type(error));
                }
                result
            }
            .instrument(span),
        )
    }
}

fn error_type(error: &HandlerError) -> &'static str {
    if error.is_retryable() {
        "retryable"
    } else {
        "permanent"
    }
}

/// The consumer span for one handler call, with the event's trace context.
fn process_span(system: &'static str, received: &Received) -> Span {
    let Received { event, info } = received;
    let span = tracing::info_span!(
        "process",
        { OTEL_NAME } = %format_args!("{} {}", operation::PROCESS, info.topic),
        { OTEL_KIND } = operation::KIND_CONSUMER,
        { MESSAGING_SYSTEM } = system,
        { MESSAGING_OPERATION_TYPE } = operation::PROCESS,
        { MESSAGING_DESTINATION_NAME } = %info.topic,
        { MESSAGING_CONSUMER_GROUP_NAME } = %info.group,
        { MESSAGING_MESSAGE_ID } = %event.id(),
        { CLOUDEVENTS_EVENT_TYPE } = %event.ty(),
        { CLOUDEVENTS_EVENT_SOURCE } = %event.source(),
        { DELIVERY_ATTEMPT } = info.attempt.get(),
        { TRACE_ID } = Empty,
        { PARENT_SPAN_ID } = Empty,
        { TRACE_STATE } = Empty,
        { OTEL_STATUS_CODE } = Empty,
        { ERROR_TYPE } = Empty,
    );
    if let Some(parent) = TraceParent::from_event(event) {
        span.record(TRACE_ID, parent.trace_id().as_str());
        span.record(PARENT_SPAN_ID, parent.parent_id().as_str());
        // A tracestate without a valid traceparent is meaningless (W3C).
        if let Some(state) = event.tracestate() {
            span.record(TRACE_STATE, state);
        }
    }
    span
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    use tower::{Layer, ServiceExt};
    use tracing::instrument::WithSubscriber;

    use super::*;
    use crate::event::{CloudEventBuilder, ext};
    use crate::middleware::test_support::{Capture, fails, received_event};

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[tokio::test]
    async fn the_handler_runs_in_a_span_with_the_semantic_fields() {
        let capture = Capture::default();
        let event = CloudEventBuilder::new("com.example.order.placed", "/orders")
            .traceparent(TP)
            .tracestate("rojo=00f067aa0ba902b7")
            .build()
            .expect("valid");
        let id = event.id().to_owned();
        let handler = tower::service_fn(|_: Received| async {
            tracing::info!("handling");
            Ok::<(), HandlerError>(())
        });
        TraceLayer::new("memory")
            .layer(handler)
            .oneshot(received_event(event, 2))
            .with_subscriber(capture.clone())
            .await
            .expect("handled");

        let span = capture.span("process");
        for (field, value) in [
            (OTEL_NAME, "process orders"),
            (OTEL_KIND, "consumer"),
            (MESSAGING_SYSTEM, "memory"),
            (MESSAGING_OPERATION_TYPE, "process"),
            (MESSAGING_DESTINATION_NAME, "orders"),
            (MESSAGING_CONSUMER_GROUP_NAME, "billing"),
            (MESSAGING_MESSAGE_ID, id.as_str()),
            (CLOUDEVENTS_EVENT_TYPE, "com.example.order.placed"),
            (CLOUDEVENTS_EVENT_SOURCE, "/orders"),
            (DELIVERY_ATTEMPT, "2"),
            (TRACE_ID, "0af7651916cd43dd8448eb211c80319c"),
            (PARENT_SPAN_ID, "b7ad6b7169203331"),
            (TRACE_STATE, "rojo=00f067aa0ba902b7"),
        ] {
            assert_eq!(span.field(field), Some(value), "{field}");
        }
        assert_eq!(span.field(OTEL_STATUS_CODE), None, "not failed");
        assert_eq!(
            capture.event_span("handling").as_deref(),
            Some("process"),
            "the handler's events are inside the span"
        );
    }

    #[tokio::test]
    async fn failures_mark_the_span_and_bad_context_is_ignored() {
        let capture = Capture::default();
        let mut event = CloudEventBuilder::new("t", "/s").build().expect("valid");
        event.set_extension(ext::TRACEPARENT, "not-a-traceparent");
        event.set_extension(ext::TRACESTATE, "rojo=1");
        let handler = fails(Arc::new(AtomicU32::new(0)), 1, HandlerError::retryable);
        TraceLayer::new("memory")
            .layer(handler)
            .oneshot(received_event(event, 1))
            .with_subscriber(capture.clone())
            .await
            .expect_err("fails");
        let span = capture.span("process");
        assert_eq!(span.field(OTEL_STATUS_CODE), Some("ERROR"));
        assert_eq!(span.field(ERROR_TYPE), Some("retryable"));
        assert_eq!(span.field(TRACE_ID), None);
        assert_eq!(span.field(TRACE_STATE), None);
    }
}
