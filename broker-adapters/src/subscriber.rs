//! [`Subscriber`]: consumer-group subscriptions that yield [`Delivery`]s to be
//! acknowledged.

use std::fmt::{self, Debug};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use cloudevents::Event;
use futures_util::Stream;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::error::{Error, ErrorKind, Result};
use crate::topic::Topic;

/// Opens subscriptions on topics.
///
/// # Contract
///
/// - Every subscription belongs to a consumer group
///   ([`SubscribeOptions::group`]). Each event published to the topic is
///   delivered to one member of each group; members of one group share the
///   work, different groups each see every event.
/// - Delivery is at least once: an event is delivered again until a member
///   [acks](Delivery::ack) or [terminates](Delivery::term) it. A
///   [nack](Delivery::nack), a delivery dropped unsettled, an ack deadline
///   that passes, and a crashed member all lead to redelivery.
/// - Events with the same `partitionkey` are delivered in publish order: the
///   next one is held back until the previous one is settled, where the broker
///   can keep order (see the adapter's docs).
/// - Implementations are `Send + Sync`; [`close`](Self::close) is idempotent.
#[async_trait]
pub trait Subscriber: Debug + Send + Sync + 'static {
    /// Joins `options.group` on `topic` and returns the stream of deliveries.
    ///
    /// # Errors
    ///
    /// The broker cannot be reached or refuses the subscription, or the
    /// subscriber is closed.
    async fn subscribe(&self, topic: &Topic, options: SubscribeOptions) -> Result<Subscription>;

    /// Releases the connection. Open subscriptions end. Idempotent.
    ///
    /// # Errors
    ///
    /// The broker failed to release resources.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl<S: Subscriber + ?Sized> Subscriber for Arc<S> {
    async fn subscribe(&self, topic: &Topic, options: SubscribeOptions) -> Result<Subscription> {
        (**self).subscribe(topic, options).await
    }

    async fn close(&self) -> Result<()> {
        (**self).close().await
    }
}

/// A validated consumer-group name: 1 to 200 characters from `[A-Za-z0-9_-]`,
/// which is what Kafka group ids and JetStream durable names both accept.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerGroup(Arc<str>);

impl ConsumerGroup {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for ConsumerGroup {
    type Error = Error;

    fn try_from(name: &str) -> Result<Self> {
        let valid = !name.is_empty()
            && name.len() <= 200
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(Arc::from(name)))
        } else {
            Err(Error::new(ErrorKind::Config {
                key: "group".into(),
                reason: format!(
                    "`{}` is not 1 to 200 characters from [A-Za-z0-9_-]",
                    name.chars().take(201).collect::<String>()
                ),
            }))
        }
    }
}

impl fmt::Display for ConsumerGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Debug for ConsumerGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConsumerGroup({:?})", &*self.0)
    }
}

/// Where a consumer group that has never consumed a topic starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartFrom {
    /// The oldest event the broker still holds.
    #[default]
    Earliest,
    /// Only events published after the group is created.
    Latest,
}

/// How to subscribe.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    group: ConsumerGroup,
    start_from: StartFrom,
    ack_wait: Duration,
}

impl SubscribeOptions {
    /// The default time a delivery may stay unsettled before it is redelivered.
    pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

    /// Options for consumer group `group`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the group name is invalid.
    pub fn new(group: &str) -> Result<Self> {
        Ok(Self {
            group: ConsumerGroup::try_from(group)?,
            start_from: StartFrom::default(),
            ack_wait: Self::DEFAULT_ACK_WAIT,
        })
    }

    /// Where a new group starts (default [`StartFrom::Earliest`]).
    #[must_use]
    pub fn start_from(mut self, start_from: StartFrom) -> Self {
        self.start_from = start_from;
        self
    }

    /// How long a delivery may stay unsettled before the broker redelivers it
    /// (default 30 s). Call [`Delivery::in_progress`] to extend it.
    #[must_use]
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// The consumer group.
    pub fn group(&self) -> &ConsumerGroup {
        &self.group
    }

    /// Where a new group starts.
    pub fn start(&self) -> StartFrom {
        self.start_from
    }

    /// The ack deadline.
    pub fn ack_deadline(&self) -> Duration {
        self.ack_wait
    }
}

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AckKind {
    /// Handled: never deliver it again.
    Ack,
    /// Not handled: deliver it again, after the delay if one is given.
    Nack(Option<Duration>),
    /// Never deliver it again although it was not handled (poison message).
    Term,
}

/// The result of settling a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settlement {
    /// This call settled the delivery.
    Settled,
    /// The delivery had already been settled this way; the call did nothing.
    AlreadySettled(AckKind),
}

/// The adapter's half of a delivery: tells the broker how it was settled.
///
/// Adapters implement it. If an acker is dropped without being settled, the
/// adapter must make the event available for redelivery (at least once).
#[async_trait]
pub trait Acker: Debug + Send + Sync {
    /// Settles the delivery. Called at most once per acker.
    ///
    /// # Errors
    ///
    /// The broker could not record the settlement; the event will then be
    /// delivered again.
    async fn settle(&mut self, kind: AckKind) -> Result<()>;

    /// Tells the broker the delivery is still being worked on, resetting its
    /// ack deadline.
    ///
    /// # Errors
    ///
    /// The broker could not record it.
    async fn in_progress(&mut self) -> Result<()>;
}

/// Where and how often an event was delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// The topic it came from.
    pub topic: Topic,
    /// The consumer group it was delivered to.
    pub group: ConsumerGroup,
    /// How many times it has been delivered to this group, this time included.
    pub attempt: NonZeroU32,
}

/// An event received from a subscription, without its acknowledgement handle:
/// what a handler sees.
#[derive(Debug, Clone)]
pub struct Received {
    /// The event. An adapter that keeps the event for a redelivery (the
    /// in-memory broker's log, the Kafka and SQL buffers) shares it with
    /// the delivery rather than copying it; `Arc::unwrap_or_clone` gives an
    /// owned [`Event`], copying only while it is still shared.
    pub event: Arc<Event>,
    /// Delivery metadata.
    pub info: DeliveryInfo,
}

/// Settles one delivery. A second settlement is a no-op that reports the first.
#[derive(Debug)]
pub struct AckHandle {
    acker: Box<dyn Acker>,
    settled: Option<AckKind>,
}

impl AckHandle {
    /// Wraps an adapter's acker.
    pub fn new(acker: Box<dyn Acker>) -> Self {
        Self {
            acker,
            settled: None,
        }
    }

    /// How the delivery was settled, if it was.
    pub fn settled(&self) -> Option<AckKind> {
        self.settled
    }

    /// Settles the delivery with `kind`.
    ///
    /// # Errors
    ///
    /// The broker could not record it; the event will be delivered again.
    pub async fn settle(&mut self, kind: AckKind) -> Result<Settlement> {
        if let Some(previous) = self.settled {
            return Ok(Settlement::AlreadySettled(previous));
        }
        self.acker.settle(kind).await?;
        self.settled = Some(kind);
        Ok(Settlement::Settled)
    }

    /// Acknowledges: the event was handled and is never delivered again.
    ///
    /// # Errors
    ///
    /// As [`settle`](Self::settle).
    pub async fn ack(&mut self) -> Result<Settlement> {
        self.settle(AckKind::Ack).await
    }

    /// Asks for redelivery, after `delay` if given.
    ///
    /// # Errors
    ///
    /// As [`settle`](Self::settle).
    pub async fn nack(&mut self, delay: Option<Duration>) -> Result<Settlement> {
        self.settle(AckKind::Nack(delay)).await
    }

    /// Terminates: the event is never delivered again although unhandled.
    ///
    /// # Errors
    ///
    /// As [`settle`](Self::settle).
    pub async fn term(&mut self) -> Result<Settlement> {
        self.settle(AckKind::Term).await
    }

    /// Resets the ack deadline while a long handler runs.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] if already settled, or the broker's failure.
    pub async fn in_progress(&mut self) -> Result<()> {
        if self.settled.is_some() {
            return Err(Error::closed("delivery"));
        }
        self.acker.in_progress().await
    }
}

/// An event delivered to a consumer group member, to be settled with
/// [`ack`](Self::ack), [`nack`](Self::nack) or [`term`](Self::term).
///
/// Dropping it unsettled leads to redelivery.
#[derive(Debug)]
pub struct Delivery {
    received: Received,
    handle: AckHandle,
}

impl Delivery {
    /// Assembles a delivery; used by adapters.
    pub fn new(event: impl Into<Arc<Event>>, info: DeliveryInfo, acker: Box<dyn Acker>) -> Self {
        Self {
            received: Received {
                event: event.into(),
                info,
            },
            handle: AckHandle::new(acker),
        }
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.received.event
    }

    /// Delivery metadata.
    pub fn info(&self) -> &DeliveryInfo {
        &self.received.info
    }

    /// Splits into what a handler sees and the handle that settles it.
    pub fn into_parts(self) -> (Received, AckHandle) {
        (self.received, self.handle)
    }

    /// See [`AckHandle::ack`].
    ///
    /// # Errors
    ///
    /// As [`AckHandle::settle`].
    pub async fn ack(&mut self) -> Result<Settlement> {
        self.handle.ack().await
    }

    /// See [`AckHandle::nack`].
    ///
    /// # Errors
    ///
    /// As [`AckHandle::settle`].
    pub async fn nack(&mut self, delay: Option<Duration>) -> Result<Settlement> {
        self.handle.nack(delay).await
    }

    /// See [`AckHandle::term`].
    ///
    /// # Errors
    ///
    /// As [`AckHandle::settle`].
    pub async fn term(&mut self) -> Result<Settlement> {
        self.handle.term().await
    }

    /// See [`AckHandle::in_progress`].
    ///
    /// # Errors
    ///
    /// As [`AckHandle::in_progress`].
    pub async fn in_progress(&mut self) -> Result<()> {
        self.handle.in_progress().await
    }
}

type Closer = Box<dyn FnOnce() -> BoxFuture<'static, Result<()>> + Send>;

/// A stream of [`Delivery`]s for one consumer-group member.
///
/// Dropping it leaves the group at once; unsettled deliveries are delivered
/// again (to this group's other members or a later subscription).
/// [`close`](Self::close) leaves gracefully: settle in-flight deliveries
/// first, then close, and nothing is redelivered needlessly.
pub struct Subscription {
    stream: BoxStream<'static, Result<Delivery>>,
    closer: Option<Closer>,
}

impl Subscription {
    /// Wraps an adapter's stream.
    pub fn new(stream: BoxStream<'static, Result<Delivery>>) -> Self {
        Self {
            stream,
            closer: None,
        }
    }

    /// Sets what [`close`](Self::close) runs after the stream is dropped,
    /// e.g. committing stored offsets.
    #[must_use]
    pub fn with_close<F>(mut self, close: F) -> Self
    where
        F: FnOnce() -> BoxFuture<'static, Result<()>> + Send + 'static,
    {
        self.closer = Some(Box::new(close));
        self
    }

    /// Stops receiving and leaves the group, committing what was settled.
    ///
    /// # Errors
    ///
    /// The adapter could not commit; the unsettled part is redelivered.
    pub async fn close(mut self) -> Result<()> {
        let closer = self.closer.take();
        drop(self);
        match closer {
            Some(close) => close().await,
            None => Ok(()),
        }
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.stream.as_mut().poll_next(cx)
    }
}

impl Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_validated() {
        assert!(SubscribeOptions::new("orders-service_1").is_ok());
        for bad in ["", "has.dot", "sp ace", "x*"] {
            let err = SubscribeOptions::new(bad).expect_err(bad);
            assert!(matches!(err.kind(), ErrorKind::Config { .. }), "{err}");
        }
    }

    #[derive(Debug, Default)]
    struct CountingAcker {
        settles: Arc<std::sync::Mutex<Vec<AckKind>>>,
    }

    #[async_trait]
    impl Acker for CountingAcker {
        async fn settle(&mut self, kind: AckKind) -> Result<()> {
            self.settles.lock().expect("not poisoned").push(kind);
            Ok(())
        }

        async fn in_progress(&mut self) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn second_settlement_is_a_no_op_reporting_the_first() {
        let acker = CountingAcker::default();
        let settles = Arc::clone(&acker.settles);
        let mut handle = AckHandle::new(Box::new(acker));
        assert_eq!(handle.ack().await.expect("ok"), Settlement::Settled);
        assert_eq!(
            handle.nack(None).await.expect("ok"),
            Settlement::AlreadySettled(AckKind::Ack)
        );
        assert_eq!(
            handle.term().await.expect("ok"),
            Settlement::AlreadySettled(AckKind::Ack)
        );
        assert!(handle.in_progress().await.is_err());
        assert_eq!(*settles.lock().expect("not poisoned"), vec![AckKind::Ack]);
    }
}
