//! The subscription side of an adapter whose pump task buffers decoded
//! records in a [`Dispatcher`] (Kafka, the SQL-table broker): the stream of
//! deliveries pulled from the buffer, and the acker that settles them back
//! into it. The adapter says, through [`Buffered`], what its state holds
//! besides the dispatcher and what a settled record means for its offsets.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use cloudevents::Event;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::DropGuard;

use super::{Dispatcher, Settled};
use crate::error::{Error, ErrorKind, Result};
use crate::subscriber::{AckKind, Acker, Delivery, DeliveryInfo, SubscribeOptions};
use crate::topic::Topic;

/// A pump's state, shared with its subscription under one lock.
pub(crate) trait Buffered: Send + 'static {
    /// A decoded record in the buffer.
    type Record: Send + 'static;
    /// The broker, as errors name it.
    const SYSTEM: &'static str;
    /// Why an ack can find its delivery gone, in the broker's terms.
    const STALE_ACK: &'static str;
    /// Why an in-progress signal can find its delivery gone.
    const STALE_IN_PROGRESS: &'static str;

    /// The buffer.
    fn dispatcher(&mut self) -> &mut Dispatcher<Self::Record>;
    /// The pump's failure, handed to the subscription once.
    fn take_failure(&mut self) -> Option<Error>;
    /// The pump has stopped: the stream ends.
    fn done(&self) -> bool;
    /// The event a record carries, shared with its deliveries.
    fn event(record: &Self::Record) -> &Arc<Event>;
    /// `record` was acked or terminated: it no longer holds back its
    /// partition's commit point.
    fn settled(&mut self, record: Self::Record);
}

/// A pump's state and the signal of its changes (records buffered, settled,
/// partitions assigned or revoked, the pump stopped).
#[derive(Debug, Default)]
pub(crate) struct Shared<S> {
    state: Mutex<S>,
    /// Notified after every change to the state.
    pub(crate) changed: Notify,
}

impl<S> Shared<S> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, S> {
        // Every method leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One subscription's view of its pump's buffer.
pub(crate) struct Member<S> {
    shared: Arc<Shared<S>>,
    topic: Topic,
    options: SubscribeOptions,
    /// Stops the pump when the subscription is dropped.
    _stop: DropGuard,
}

/// What the subscription stream yields next: a delivery, an error, or its end.
type Next = Option<Result<Delivery>>;

impl<S: Buffered> Member<S> {
    pub(crate) fn new(
        shared: Arc<Shared<S>>,
        topic: Topic,
        options: SubscribeOptions,
        stop: DropGuard,
    ) -> Self {
        Self {
            shared,
            topic,
            options,
            _stop: stop,
        }
    }

    /// The next delivery, once one is due; `None` when the pump stopped.
    pub(crate) async fn next_delivery(&self) -> Next {
        super::next_when_ready(&self.shared.changed, || self.try_next()).await
    }

    /// The next delivery or the end of the stream (`Ok`), or when to look
    /// again (`Err`, `None` meaning after the next change).
    fn try_next(&self) -> std::result::Result<Next, Option<Instant>> {
        let mut state = self.shared.lock();
        if let Some(e) = state.take_failure() {
            return Ok(Some(Err(e)));
        }
        if state.done() {
            return Ok(None);
        }
        let pulled = state
            .dispatcher()
            .pull(Instant::now(), self.options.ack_deadline())?;
        let info = DeliveryInfo {
            topic: self.topic.clone(),
            group: self.options.group().clone(),
            attempt: NonZeroU32::new(pulled.attempt).unwrap_or(NonZeroU32::MIN),
        };
        // The buffer keeps the event for a redelivery: shared, not copied.
        let event = Arc::clone(S::event(pulled.msg));
        let acker = BufferAcker {
            shared: Arc::clone(&self.shared),
            seq: pulled.seq,
            token: pulled.token,
            ack_wait: self.options.ack_deadline(),
            settled: false,
        };
        Ok(Some(Ok(Delivery::new(event, info, Box::new(acker)))))
    }
}

/// Settles one delivery in the buffer; nacks it when dropped unsettled.
struct BufferAcker<S: Buffered> {
    shared: Arc<Shared<S>>,
    seq: u64,
    token: u64,
    ack_wait: Duration,
    settled: bool,
}

impl<S: Buffered> std::fmt::Debug for BufferAcker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferAcker")
            .field("seq", &self.seq)
            .field("token", &self.token)
            .field("settled", &self.settled)
            .finish_non_exhaustive()
    }
}

impl<S: Buffered> BufferAcker<S> {
    fn apply(&self, kind: AckKind) -> Result<()> {
        let mut state = self.shared.lock();
        let outcome = state
            .dispatcher()
            .settle(self.seq, self.token, kind, Instant::now());
        let result = match outcome {
            Settled::Done(record) => {
                state.settled(record);
                Ok(())
            }
            Settled::Requeued => Ok(()),
            Settled::Stale if matches!(kind, AckKind::Nack(_)) => Ok(()),
            Settled::Stale => Err(Error::new(ErrorKind::Broker {
                system: S::SYSTEM,
                operation: S::STALE_ACK,
                retryable: false,
            })),
        };
        drop(state);
        self.shared.changed.notify_waiters();
        result
    }
}

#[async_trait]
impl<S: Buffered> Acker for BufferAcker<S> {
    async fn settle(&mut self, kind: AckKind) -> Result<()> {
        self.settled = true;
        self.apply(kind)
    }

    async fn in_progress(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.ack_wait;
        if self
            .shared
            .lock()
            .dispatcher()
            .touch(self.seq, self.token, deadline)
        {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::Broker {
                system: S::SYSTEM,
                operation: S::STALE_IN_PROGRESS,
                retryable: false,
            }))
        }
    }
}

impl<S: Buffered> Drop for BufferAcker<S> {
    fn drop(&mut self) {
        if !self.settled {
            let _ = self.apply(AckKind::Nack(None));
        }
    }
}
