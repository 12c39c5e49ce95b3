//! Middleware around handlers and publishers.
//!
//! Handler middleware are [`tower`] layers over a
//! `Service<`[`Received`](crate::Received)`>`, composed with
//! [`tower::ServiceBuilder`] and run by a [`Consumer`](crate::Consumer);
//! each service's error is a [`HandlerError`](crate::HandlerError), so
//! whether a failure is retryable survives every layer.
//!
//! | layer | service | does |
//! | --- | --- | --- |
//! | [`TraceLayer`] | [`Trace`] | runs the handler in a `process` span with the OTel messaging fields and the event's trace context |
//! | [`MetricsLayer`] | [`Metrics`] | counts deliveries and outcomes, times the handler |
//! | [`DeadLetterLayer`] | [`DeadLetter`] | publishes events it gives up on, unchanged and with the reason, to a dead-letter topic |
//! | [`TimeoutLayer`] | [`Timeout`] | fails a handler that takes too long, retryably |
//! | [`RetryLayer`] | [`Retry`] | retries retryable failures in the handler with capped, jittered exponential backoff |
//!
//! Publisher middleware are wrappers implementing
//! [`Publisher`](crate::Publisher): [`TracingPublisher`] (trace context
//! injection and `publish` spans) and
//! [`Instrumented`](crate::metrics::Instrumented) (publish metrics).
//!
//! # The recommended stack
//!
//! Outermost first: tracing, so everything below is inside the span;
//! metrics, so they count what the consumer will do; dead-lettering, so it
//! sees the final verdict of the layers below it; timeout, here bounding all
//! in-handler attempts together; retry, closest to the handler.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> broker_adapters::Result<()> {
//! use std::num::NonZeroU32;
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use broker_adapters::middleware::dead_letter::DeadLetterInfo;
//! use broker_adapters::middleware::{
//!     DeadLetterLayer, MetricsLayer, RetryLayer, RetryPolicy, TimeoutLayer, TraceLayer,
//! };
//! use broker_adapters::prelude::*;
//! use futures_util::StreamExt;
//! use tokio_util::sync::CancellationToken;
//! use tower::ServiceBuilder;
//!
//! let broker = MemoryBroker::new();
//! let orders = Topic::from_static("orders");
//! let dlq = Topic::from_static("orders.dlq");
//! let subscription = broker.subscribe(&orders, SubscribeOptions::new("billing")?).await?;
//! let mut dead_letters = broker.subscribe(&dlq, SubscribeOptions::new("ops")?).await?;
//!
//! let handler = tower::service_fn(|received: Received| async move {
//!     let total: i64 = received.event.data_as().map_err(HandlerError::permanent)?;
//!     if total < 0 {
//!         return Err(HandlerError::permanent("the total is negative"));
//!     }
//!     Ok(())
//! });
//! let retry = RetryPolicy::new(3, Duration::from_millis(10), Duration::from_millis(100))?;
//! let max_deliveries = NonZeroU32::new(5).expect("not zero");
//! let stack = ServiceBuilder::new()
//!     .layer(TraceLayer::new("memory"))
//!     .layer(MetricsLayer::new("memory"))
//!     .layer(DeadLetterLayer::new(Arc::new(broker.clone()), dlq.clone(), max_deliveries))
//!     .layer(TimeoutLayer::new(Duration::from_secs(5)))
//!     .layer(RetryLayer::new(retry))
//!     .service(handler);
//!
//! let bad = broker.publish_json(&orders, "com.example.order.placed", "/doc", &-1).await?;
//! let shutdown = CancellationToken::new();
//! let consumer = tokio::spawn(Consumer::new(subscription, stack).run(shutdown.clone()));
//!
//! // The bad event is kept on the dead-letter topic, with the reason...
//! let mut dead = dead_letters.next().await.expect("open")?;
//! assert_eq!(dead.event().id(), bad);
//! let info = DeadLetterInfo::from_event(dead.event())?.expect("dead-lettered");
//! assert!(info.reason.contains("the total is negative"));
//! assert_eq!(info.topic, orders);
//! dead.ack().await?;
//!
//! // ...and acked on its own topic.
//! shutdown.cancel();
//! let report = consumer.await.expect("the consumer did not panic")?;
//! assert_eq!((report.acked, report.nacked, report.terminated), (1, 0, 0));
//! # Ok(())
//! # }
//! ```

pub mod dead_letter;
pub mod metrics;
pub mod retry;
pub mod timeout;
pub mod trace;
#[cfg(feature = "validation")]
#[cfg_attr(docsrs, doc(cfg(feature = "validation")))]
pub mod validation;

#[cfg(test)]
mod test_support;
#[cfg(all(test, feature = "memory"))]
mod tests;

pub use self::dead_letter::{DeadLetter, DeadLetterLayer};
pub use self::metrics::{Metrics, MetricsLayer};
pub use self::retry::{Retry, RetryLayer, RetryPolicy};
pub use self::timeout::{Timeout, TimeoutLayer};
pub use self::trace::{Trace, TraceLayer, TracingPublisher};
#[cfg(feature = "validation")]
pub use self::validation::{Validate, ValidateLayer, ValidatingPublisher};
