//! The in-process broker: the embedded default, and the reference every other
//! adapter is compared with in the conformance suite.
//!
//! One [`MemoryBroker`] is both the [`Publisher`] and the [`Subscriber`];
//! clones share the same topics. Events live in process memory: publishing
//! returns once the event is appended (nothing outlives the process; use the
//! SQL-table broker for a durable single binary). Consumer groups, per-key
//! ordering, ack deadlines, nack with delay and redelivery behave as on the
//! networked brokers.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> broker_adapters::Result<()> {
//! use broker_adapters::prelude::*;
//! use futures_util::StreamExt;
//!
//! let broker = MemoryBroker::new();
//! let topic = Topic::from_static("greetings");
//! let mut subscription = broker.subscribe(&topic, SubscribeOptions::new("greeter")?).await?;
//!
//! broker.publish_json(&topic, "com.example.greeting", "/doc", &"hello").await?;
//!
//! let mut delivery = subscription.next().await.expect("open")?;
//! assert_eq!(delivery.event().data_as::<String>()?, "hello");
//! delivery.ack().await?;
//! # Ok(())
//! # }
//! ```

mod config;
mod log;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use cloudevents::Event;
use futures_util::stream;
use tokio::sync::Notify;
use tokio::time::Instant;

pub use self::config::MemoryConfig;
use self::log::{Pulled, TopicLog};
use crate::error::{Error, ErrorKind, Result};
use crate::event::validate_for_publish;
use crate::publisher::Publisher;
use crate::subscriber::{
    AckKind, Acker, ConsumerGroup, Delivery, DeliveryInfo, SubscribeOptions, Subscriber,
    Subscription,
};
use crate::topic::Topic;

/// The in-process broker. Cheap to clone; clones share state.
#[derive(Debug, Clone, Default)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    config: MemoryConfig,
    topics: Mutex<HashMap<Topic, Arc<TopicState>>>,
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct TopicState {
    log: Mutex<TopicLog>,
    /// Woken on every append, settle and close.
    changed: Notify,
}

impl TopicState {
    fn lock(&self) -> MutexGuard<'_, TopicLog> {
        // The log is consistent after every method, so a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MemoryBroker {
    /// A broker with the default [`MemoryConfig`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A broker with the given limits.
    pub fn with_config(config: MemoryConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                ..Shared::default()
            }),
        }
    }

    fn topic(&self, topic: &Topic) -> Arc<TopicState> {
        let mut topics = self
            .shared
            .topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(topics.entry(topic.clone()).or_default())
    }

    fn check_open(&self) -> Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            Err(Error::closed("memory broker"))
        } else {
            Ok(())
        }
    }

    fn append(&self, topic: &Topic, events: Vec<Event>) -> Result<()> {
        self.check_open()?;
        let limit = self.shared.config.event_limit();
        for event in &events {
            validate_for_publish(event, limit)?;
        }
        let state = self.topic(topic);
        let appended = state
            .lock()
            .append(events, self.shared.config.topic_limit());
        appended.map_err(|_| {
            Error::new(ErrorKind::Backpressure {
                topic: topic.to_string(),
                limit: self.shared.config.topic_limit(),
            })
        })?;
        state.changed.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl Publisher for MemoryBroker {
    async fn publish(&self, topic: &Topic, event: Event) -> Result<()> {
        self.append(topic, vec![event])
    }

    /// Appends the whole batch atomically: every event or none.
    async fn publish_batch(&self, topic: &Topic, events: Vec<Event>) -> Result<()> {
        self.append(topic, events)
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Closes the broker for every clone: publishing fails and open
    /// subscriptions end.
    async fn close(&self) -> Result<()> {
        Subscriber::close(self).await
    }
}

#[async_trait]
impl Subscriber for MemoryBroker {
    async fn subscribe(&self, topic: &Topic, options: SubscribeOptions) -> Result<Subscription> {
        self.check_open()?;
        let state = self.topic(topic);
        state.lock().join(options.group(), options.start());
        let member = Member {
            broker: self.clone(),
            topic: topic.clone(),
            state,
            options,
        };
        let deliveries = stream::unfold(member, |member| async move {
            let delivery = member.next_delivery().await?;
            Some((Ok(delivery), member))
        });
        Ok(Subscription::new(Box::pin(deliveries)))
    }

    async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        let topics: Vec<Arc<TopicState>> = self
            .shared
            .topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for state in topics {
            state.changed.notify_waiters();
        }
        Ok(())
    }
}

/// One subscription's view of its group.
struct Member {
    broker: MemoryBroker,
    topic: Topic,
    state: Arc<TopicState>,
    options: SubscribeOptions,
}

impl Member {
    /// Waits for the next deliverable event; `None` once the broker is closed.
    async fn next_delivery(&self) -> Option<Delivery> {
        loop {
            let changed = self.state.changed.notified();
            tokio::pin!(changed);
            // Register before looking, so a change between the look and the
            // wait is not missed.
            changed.as_mut().enable();
            if self.broker.check_open().is_err() {
                return None;
            }
            let pulled = self.state.lock().pull(
                self.options.group(),
                Instant::now(),
                self.options.ack_deadline(),
            );
            match pulled {
                Ok(pulled) => return Some(self.delivery(pulled)),
                Err(Some(wake_at)) => {
                    tokio::select! {
                        () = &mut changed => {}
                        () = tokio::time::sleep_until(wake_at) => {}
                    }
                }
                Err(None) => changed.await,
            }
        }
    }

    fn delivery(&self, pulled: Pulled) -> Delivery {
        let Pulled {
            offset,
            token,
            attempt,
            event,
        } = pulled;
        let info = DeliveryInfo {
            topic: self.topic.clone(),
            group: self.options.group().clone(),
            attempt: NonZeroU32::new(attempt).unwrap_or(NonZeroU32::MIN),
        };
        let acker = MemoryAcker {
            state: Arc::clone(&self.state),
            group: self.options.group().clone(),
            ack_wait: self.options.ack_deadline(),
            offset,
            token,
            settled: false,
        };
        Delivery::new(event, info, Box::new(acker))
    }
}

#[derive(Debug)]
struct MemoryAcker {
    state: Arc<TopicState>,
    group: ConsumerGroup,
    ack_wait: Duration,
    offset: u64,
    token: u64,
    settled: bool,
}

impl MemoryAcker {
    fn apply(&self, kind: AckKind) {
        let changed =
            self.state
                .lock()
                .settle(&self.group, self.offset, self.token, kind, Instant::now());
        if changed {
            self.state.changed.notify_waiters();
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn settle(&mut self, kind: AckKind) -> Result<()> {
        self.settled = true;
        self.apply(kind);
        Ok(())
    }

    async fn in_progress(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.ack_wait;
        if self
            .state
            .lock()
            .touch(&self.group, self.offset, self.token, deadline)
        {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::Broker {
                system: "memory",
                operation: "in-progress (the ack deadline had passed and the event was redelivered)",
                retryable: false,
            }))
        }
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if !self.settled {
            self.apply(AckKind::Nack(None));
        }
    }
}
