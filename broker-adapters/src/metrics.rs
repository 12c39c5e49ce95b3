//! Metric names, their descriptions, and [`Instrumented`], the publisher
//! wrapper that records them.
//!
//! Metrics are recorded through the [`metrics`](https://docs.rs/metrics)
//! facade: this crate never installs a recorder or an exporter; the service
//! does (Prometheus, OpenTelemetry), and calls [`describe_metrics`] once so
//! the exporter knows each metric's unit and help text.
//!
//! Labels are [`LABEL_SYSTEM`], [`LABEL_TOPIC`] and, where it applies,
//! [`LABEL_OUTCOME`]; never event ids or other unbounded values.
//!
//! | metric | kind | labels | recorded by |
//! | --- | --- | --- | --- |
//! | [`PUBLISHED`] | counter | system, topic, outcome (`ok`/`error`) | [`Instrumented`] |
//! | [`PUBLISH_DURATION`] | histogram (s) | system, topic, outcome | [`Instrumented`] |
//! | [`DELIVERED`] | counter | system, topic | [`MetricsLayer`](crate::middleware::MetricsLayer) |
//! | [`PROCESS_DURATION`] | histogram (s) | system, topic, outcome (`ack`/`nack`/`term`) | [`MetricsLayer`](crate::middleware::MetricsLayer) |
//! | [`ACKED`], [`NACKED`], [`TERMINATED`] | counter | system, topic | [`MetricsLayer`](crate::middleware::MetricsLayer) |
//! | [`DEAD_LETTERED`] | counter | topic, outcome (`ok`/`error`) | [`DeadLetterLayer`](crate::middleware::DeadLetterLayer) |
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> broker_adapters::Result<()> {
//! use broker_adapters::metrics::{describe_metrics, Instrumented};
//! use broker_adapters::prelude::*;
//!
//! describe_metrics(); // once, after the service installed its recorder
//! let publisher = Instrumented::new(MemoryBroker::new(), "memory");
//! publisher.publish_json(&Topic::from_static("orders"), "com.example.order.placed", "/doc", &1).await?;
//! # Ok(())
//! # }
//! ```

use std::time::Instant;

use async_trait::async_trait;
use cloudevents::Event;
use metrics::{Label, Unit, describe_counter, describe_histogram};

use crate::error::Result;
use crate::publisher::Publisher;
use crate::topic::Topic;

/// Events published, by outcome (counter).
pub const PUBLISHED: &str = "messaging.client.published.messages";
/// How long a publish or batch publish took until the broker's ack, in
/// seconds (histogram).
pub const PUBLISH_DURATION: &str = "messaging.publish.duration";
/// Deliveries handed to a handler (counter).
pub const DELIVERED: &str = "messaging.client.consumed.messages";
/// How long a handler took, in seconds, by the settlement its result leads
/// to (histogram).
pub const PROCESS_DURATION: &str = "messaging.process.duration";
/// Deliveries whose handler succeeded: they are acked (counter).
pub const ACKED: &str = "messaging.consumer.acked";
/// Deliveries whose handler failed retryably: they are nacked and
/// delivered again (counter).
pub const NACKED: &str = "messaging.consumer.nacked";
/// Deliveries whose handler failed permanently: they are terminated
/// (counter).
pub const TERMINATED: &str = "messaging.consumer.terminated";
/// Events sent to a dead-letter topic, by whether that publish succeeded
/// (counter).
pub const DEAD_LETTERED: &str = "messaging.consumer.dead_lettered";

/// Label: the messaging system (`kafka`, `nats`, `memory`).
pub const LABEL_SYSTEM: &str = "system";
/// Label: the topic (for dead-lettering, the original topic).
pub const LABEL_TOPIC: &str = "topic";
/// Label: how the operation ended; one of the [`outcome`] values.
pub const LABEL_OUTCOME: &str = "outcome";

/// Values of [`LABEL_OUTCOME`].
pub mod outcome {
    /// The operation succeeded.
    pub const OK: &str = "ok";
    /// The operation failed.
    pub const ERROR: &str = "error";
    /// The handler succeeded; the delivery is acked.
    pub const ACK: &str = "ack";
    /// The handler failed retryably; the delivery is nacked.
    pub const NACK: &str = "nack";
    /// The handler failed permanently; the delivery is terminated.
    pub const TERM: &str = "term";
}

/// Describes every metric above (unit and help text) to the installed
/// recorder. Call it once at start-up, after installing the recorder.
pub fn describe_metrics() {
    describe_counter!(PUBLISHED, Unit::Count, "Events published, by outcome.");
    describe_histogram!(
        PUBLISH_DURATION,
        Unit::Seconds,
        "Time from publishing an event or batch to the broker's durable ack."
    );
    describe_counter!(DELIVERED, Unit::Count, "Deliveries handed to a handler.");
    describe_histogram!(
        PROCESS_DURATION,
        Unit::Seconds,
        "Time a handler took, by the settlement its result leads to."
    );
    describe_counter!(ACKED, Unit::Count, "Deliveries handled and acked.");
    describe_counter!(
        NACKED,
        Unit::Count,
        "Deliveries that failed retryably and are delivered again."
    );
    describe_counter!(
        TERMINATED,
        Unit::Count,
        "Deliveries that failed permanently and are terminated."
    );
    describe_counter!(
        DEAD_LETTERED,
        Unit::Count,
        "Events sent to a dead-letter topic, by whether that publish succeeded."
    );
}

pub(crate) fn labels(system: Option<&'static str>, topic: &Topic) -> Vec<Label> {
    let mut labels = Vec::with_capacity(3);
    if let Some(system) = system {
        labels.push(Label::new(LABEL_SYSTEM, system));
    }
    labels.push(Label::new(LABEL_TOPIC, topic.to_string()));
    labels
}

pub(crate) fn with_outcome(mut labels: Vec<Label>, outcome: &'static str) -> Vec<Label> {
    labels.push(Label::new(LABEL_OUTCOME, outcome));
    labels
}

/// A [`Publisher`] that records [`PUBLISHED`] and [`PUBLISH_DURATION`] for
/// every publish and batch publish, then forwards to the inner publisher.
///
/// `flush` and `close` are forwarded unrecorded.
#[derive(Debug, Clone)]
pub struct Instrumented<P> {
    inner: P,
    system: &'static str,
}

impl<P> Instrumented<P> {
    /// Wraps `inner`, labelling its metrics with `system` (e.g. `kafka`).
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

    fn record(&self, topic: &Topic, count: usize, started: Instant, result: &Result<()>) {
        let outcome = if result.is_ok() {
            outcome::OK
        } else {
            outcome::ERROR
        };
        let labels = with_outcome(labels(Some(self.system), topic), outcome);
        ::metrics::histogram!(PUBLISH_DURATION, labels.iter()).record(started.elapsed());
        ::metrics::counter!(PUBLISHED, labels).increment(u64::try_from(count).unwrap_or(u64::MAX));
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl<P: Publisher> Publisher for Instrumented<P> {
    async fn publish(&self, topic: &Topic, event: Event) -> Result<()> {
        let started = Instant::now();
        let result = self.inner.publish(topic, event).await;
        self.record(topic, 1, started, &result);
        result
    }

    async fn publish_batch(&self, topic: &Topic, events: Vec<Event>) -> Result<()> {
        let count = events.len();
        let started = Instant::now();
        let result = self.inner.publish_batch(topic, events).await;
        self.record(topic, count, started, &result);
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
pub(crate) mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

    use super::*;
    use crate::event::CloudEventBuilder;
    use crate::memory::MemoryBroker;

    /// A metric as a test sees it: name, sorted `key=value` labels, value.
    pub(crate) type Seen = (String, Vec<String>, DebugValue);

    pub(crate) fn seen(snapshotter: &Snapshotter) -> Vec<Seen> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let key = key.key();
                let mut labels: Vec<String> = key
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                labels.sort();
                (key.name().to_owned(), labels, value)
            })
            .collect()
    }

    pub(crate) fn counter(seen: &[Seen], name: &str, labels: &[&str]) -> u64 {
        seen.iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|want| l.iter().any(|h| h == want)))
            .map(|(_, _, v)| match v {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    }

    pub(crate) fn histogram_count(seen: &[Seen], name: &str, labels: &[&str]) -> usize {
        seen.iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|want| l.iter().any(|h| h == want)))
            .map(|(_, _, v)| match v {
                DebugValue::Histogram(samples) => samples.len(),
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .sum()
    }

    pub(crate) fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    }

    fn event() -> Event {
        CloudEventBuilder::new("com.example.t", "/test")
            .json_data(&1)
            .build()
            .expect("valid")
    }

    #[test]
    fn instrumented_counts_publishes_by_outcome() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let topic = Topic::from_static("orders");
        let broker = MemoryBroker::new();
        ::metrics::with_local_recorder(&recorder, || {
            describe_metrics();
            runtime().block_on(async {
                let publisher = Instrumented::new(broker, "memory");
                publisher.publish(&topic, event()).await.expect("room");
                publisher
                    .publish_batch(&topic, vec![event()])
                    .await
                    .expect("room");
                publisher.flush().await.expect("flush");
                publisher.close().await.expect("close");
                publisher
                    .publish(&topic, event())
                    .await
                    .expect_err("the broker is closed");
            });
        });
        let seen = seen(&snapshotter);
        let ok = ["system=memory", "topic=orders", "outcome=ok"];
        let err = ["system=memory", "topic=orders", "outcome=error"];
        assert_eq!(counter(&seen, PUBLISHED, &ok), 2);
        assert_eq!(counter(&seen, PUBLISHED, &err), 1);
        assert_eq!(histogram_count(&seen, PUBLISH_DURATION, &ok), 2);
        assert_eq!(histogram_count(&seen, PUBLISH_DURATION, &err), 1);
        for (name, labels, _) in &seen {
            assert!(
                labels.iter().all(|l| l.starts_with("system=")
                    || l.starts_with("topic=")
                    || l.starts_with("outcome=")),
                "{name} has a label outside system/topic/outcome: {labels:?}"
            );
        }
    }
}
