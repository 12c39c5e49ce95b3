//! [`Consumer`]: runs a handler over a [`Subscription`], settles each delivery
//! from the handler's result, and shuts down without losing anything.
//!
//! The handler is a [`tower::Service`] taking a [`Received`] event, so retry,
//! timeout, rate-limit and similar layers compose around it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> broker_adapters::Result<()> {
//! use broker_adapters::prelude::*;
//! use tokio_util::sync::CancellationToken;
//!
//! let broker = MemoryBroker::new();
//! let topic = Topic::from_static("orders");
//! let subscription = broker.subscribe(&topic, SubscribeOptions::new("billing")?).await?;
//! broker.publish_json(&topic, "com.example.order.placed", "/doc", &42).await?;
//!
//! let shutdown = CancellationToken::new();
//! let stop = shutdown.clone();
//! let handler = tower::service_fn(move |received: Received| {
//!     let stop = stop.clone();
//!     async move {
//!         let total: u32 = received.event.data_as().map_err(HandlerError::permanent)?;
//!         assert_eq!(total, 42);
//!         stop.cancel(); // one event is enough for this example
//!         Ok::<(), HandlerError>(())
//!     }
//! });
//! let report = Consumer::new(subscription, handler).run(shutdown).await?;
//! assert_eq!(report.acked, 1);
//! # Ok(())
//! # }
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::num::NonZeroUsize;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use crate::error::Result;
use crate::subscriber::{AckHandle, AckKind, Received, Subscription};

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a handler did not handle an event, and whether trying again can help.
#[derive(Debug)]
pub struct HandlerError {
    retry: Option<Option<Duration>>,
    source: BoxError,
}

impl HandlerError {
    /// A transient failure: the event is delivered again, after the
    /// consumer's default delay.
    pub fn retryable(source: impl Into<BoxError>) -> Self {
        Self {
            retry: Some(None),
            source: source.into(),
        }
    }

    /// A transient failure: the event is delivered again after `delay`.
    pub fn retry_after(source: impl Into<BoxError>, delay: Duration) -> Self {
        Self {
            retry: Some(Some(delay)),
            source: source.into(),
        }
    }

    /// A failure that will not go away (malformed data, a rule violated): the
    /// event is not delivered again; it is terminated and logged (a
    /// dead-letter layer keeps it).
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            retry: None,
            source: source.into(),
        }
    }

    /// Whether the event should be delivered again.
    pub fn is_retryable(&self) -> bool {
        self.retry.is_some()
    }

    /// The requested redelivery delay, if any.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry.flatten()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_retryable() {
            "retryable"
        } else {
            "permanent"
        };
        write!(f, "handler failed ({kind}): {}", self.source)
    }
}

impl StdError for HandlerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

impl From<crate::Error> for HandlerError {
    /// Keeps the error's own retryability.
    fn from(error: crate::Error) -> Self {
        if error.is_retryable() {
            Self::retryable(error)
        } else {
            Self::permanent(error)
        }
    }
}

/// What a [`Consumer`] did before it stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerReport {
    /// Deliveries handled and acked.
    pub acked: u64,
    /// Deliveries nacked for redelivery.
    pub nacked: u64,
    /// Deliveries terminated after a permanent failure.
    pub terminated: u64,
    /// Settlements the broker failed to record (those events are redelivered).
    pub settle_errors: u64,
}

/// Runs a handler over a subscription.
///
/// - `Ok` → ack; [`HandlerError::retryable`] → nack (redelivered after the
///   delay); [`HandlerError::permanent`] → term, logged at error level.
/// - Up to [`concurrency`](Self::concurrency) deliveries are handled at once;
///   per-key order holds because the broker does not hand out the next event
///   of a key before the previous one is settled.
/// - When the shutdown token is cancelled the consumer stops taking
///   deliveries, lets the handlers in flight finish and settles them, then
///   [closes](Subscription::close) the subscription: nothing is lost and
///   nothing handled is delivered again.
#[derive(Debug)]
pub struct Consumer<S> {
    subscription: Subscription,
    service: S,
    concurrency: NonZeroUsize,
    retry_delay: Duration,
}

impl<S> Consumer<S>
where
    S: Service<Received, Response = ()> + Clone + Send + 'static,
    S::Error: Into<HandlerError>,
    S::Future: Send,
{
    /// A consumer handling one delivery at a time.
    pub fn new(subscription: Subscription, service: S) -> Self {
        Self {
            subscription,
            service,
            concurrency: NonZeroUsize::MIN,
            retry_delay: Duration::from_secs(1),
        }
    }

    /// How many deliveries to handle at once (default 1).
    #[must_use]
    pub fn concurrency(mut self, n: NonZeroUsize) -> Self {
        self.concurrency = n;
        self
    }

    /// The redelivery delay for retryable failures that name none (default 1 s).
    #[must_use]
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// Runs until `shutdown` is cancelled or the subscription ends, then
    /// drains and closes.
    ///
    /// # Errors
    ///
    /// The subscription failed, or closing it did; what was not settled is
    /// delivered again.
    pub async fn run(self, shutdown: CancellationToken) -> Result<ConsumerReport> {
        let Self {
            mut subscription,
            service,
            concurrency,
            retry_delay,
        } = self;
        let mut report = ConsumerReport::default();
        let mut in_flight = FuturesUnordered::new();
        let mut failure = None;
        loop {
            let room = in_flight.len() < concurrency.get();
            tokio::select! {
                biased;
                Some(outcome) = in_flight.next() => record(&mut report, outcome),
                () = shutdown.cancelled() => break,
                next = subscription.next(), if room => match next {
                    Some(Ok(delivery)) => {
                        let (received, handle) = delivery.into_parts();
                        in_flight.push(handle_one(service.clone(), received, handle, retry_delay));
                    }
                    Some(Err(e)) => {
                        failure = Some(e);
                        break;
                    }
                    None => break,
                },
            }
        }
        while let Some(outcome) = in_flight.next().await {
            record(&mut report, outcome);
        }
        let closed = subscription.close().await;
        match failure {
            Some(e) => Err(e),
            None => closed.map(|()| report),
        }
    }
}

type Outcome = (AckKind, Result<()>);

fn record(report: &mut ConsumerReport, (kind, settled): Outcome) {
    if settled.is_err() {
        report.settle_errors += 1;
        return;
    }
    match kind {
        AckKind::Ack => report.acked += 1,
        AckKind::Nack(_) => report.nacked += 1,
        _ => report.terminated += 1,
    }
}

async fn handle_one<S>(
    service: S,
    received: Received,
    mut handle: AckHandle,
    retry_delay: Duration,
) -> Outcome
where
    S: Service<Received, Response = ()>,
    S::Error: Into<HandlerError>,
{
    let id = cloudevents::AttributesReader::id(&*received.event).to_owned();
    let kind = match service.oneshot(received).await.map_err(Into::into) {
        Ok(()) => AckKind::Ack,
        Err(e) if e.is_retryable() => {
            tracing::warn!(event.id = %id, error = %e, "handler failed; the event will be delivered again");
            AckKind::Nack(Some(e.retry_delay().unwrap_or(retry_delay)))
        }
        Err(e) => {
            tracing::error!(event.id = %id, error = %e, "handler failed permanently; the event is terminated");
            AckKind::Term
        }
    };
    let settled = handle.settle(kind).await.map(|_| ());
    if let Err(e) = &settled {
        tracing::warn!(event.id = %id, error = %e, "could not settle; the event will be delivered again");
    }
    (kind, settled)
}
