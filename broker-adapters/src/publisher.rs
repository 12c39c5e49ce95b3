//! [`Publisher`]: sends events to a broker and returns once they are durable.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use cloudevents::{AttributesReader, Event};
use serde::Serialize;

use crate::error::Result;
use crate::event::CloudEventBuilder;
use crate::topic::Topic;

/// Publishes CloudEvents to topics.
///
/// # Contract
///
/// - [`publish`](Self::publish) returns `Ok` only after the broker has
///   acknowledged the event durably (Kafka `acks=all`, a JetStream publish
///   ack, a committed row). An `Err` says, through
///   [`Error::is_retryable`](crate::Error::is_retryable), whether publishing
///   again can help; a retried event keeps its id, so brokers that
///   de-duplicate by id store it once.
/// - Events published one after another with the same `partitionkey` to the
///   same topic are delivered in that order.
/// - Implementations are `Send + Sync` and meant to be shared (`Arc<dyn Publisher>`).
/// - [`close`](Self::close) is idempotent; publishing after it fails with
///   [`ErrorKind::Closed`](crate::ErrorKind::Closed).
#[async_trait]
pub trait Publisher: Debug + Send + Sync + 'static {
    /// Publishes one event and waits for the broker's durable acknowledgement.
    ///
    /// # Errors
    ///
    /// Invalid or oversized events, a closed publisher, or the broker's
    /// failure to acknowledge.
    async fn publish(&self, topic: &Topic, event: Event) -> Result<()>;

    /// Publishes events in order and returns when all are acknowledged.
    ///
    /// Adapters override this to pipeline the batch; the default publishes one
    /// at a time.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish). On error a prefix of the batch may have
    /// been published; publishing the whole batch again is safe on brokers
    /// that de-duplicate by event id and otherwise gives at-least-once.
    async fn publish_batch(&self, topic: &Topic, events: Vec<Event>) -> Result<()> {
        for event in events {
            self.publish(topic, event).await?;
        }
        Ok(())
    }

    /// Waits until everything published so far is acknowledged.
    ///
    /// # Errors
    ///
    /// The broker's failure to acknowledge an outstanding event.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Flushes and releases the connection. Idempotent.
    ///
    /// # Errors
    ///
    /// As [`flush`](Self::flush).
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for Arc<P> {
    async fn publish(&self, topic: &Topic, event: Event) -> Result<()> {
        (**self).publish(topic, event).await
    }

    async fn publish_batch(&self, topic: &Topic, events: Vec<Event>) -> Result<()> {
        (**self).publish_batch(topic, events).await
    }

    async fn flush(&self) -> Result<()> {
        (**self).flush().await
    }

    async fn close(&self) -> Result<()> {
        (**self).close().await
    }
}

/// Conveniences for every [`Publisher`].
#[async_trait]
pub trait PublisherExt: Publisher {
    /// Builds an event of type `ty` from `source` with `data` as JSON and
    /// publishes it; returns the event's id.
    ///
    /// # Errors
    ///
    /// As [`CloudEventBuilder::build`] and [`Publisher::publish`].
    async fn publish_json<T: Serialize + Sync + ?Sized>(
        &self,
        topic: &Topic,
        ty: &str,
        source: &str,
        data: &T,
    ) -> Result<String> {
        let event = CloudEventBuilder::new(ty, source).json_data(data).build()?;
        let id = event.id().to_owned();
        self.publish(topic, event).await?;
        Ok(id)
    }
}

impl<P: Publisher + ?Sized> PublisherExt for P {}
