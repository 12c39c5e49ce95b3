//! The behavioural suite every adapter passes against its real server.
//!
//! An adapter's test file implements [`Target`] (how to get a publisher, a
//! subscriber and a fresh topic) and expands [`conformance_suite!`](crate::conformance_suite), which
//! generates one `#[tokio::test]` per scenario in [`scenarios`]:
//!
//! ```
//! use std::sync::Arc;
//! use broker_adapters::conformance::{Capabilities, Target};
//! use broker_adapters::{MemoryBroker, Publisher, Subscriber, Topic, Result};
//!
//! #[derive(Debug, Default)]
//! struct Memory(MemoryBroker);
//!
//! #[async_trait::async_trait]
//! impl Target for Memory {
//!     fn capabilities(&self) -> Capabilities { Capabilities::default() }
//!     async fn publisher(&self) -> Result<Arc<dyn Publisher>> { Ok(Arc::new(self.0.clone())) }
//!     async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> { Ok(Arc::new(self.0.clone())) }
//!     async fn topic(&self, name: &str) -> Result<Topic> { Topic::try_from(name) }
//! }
//!
//! // In a test file:
//! // broker_adapters::conformance_suite!(std::future::ready(Memory::default()));
//! ```
//!
//! Adapters declare what their broker cannot do in [`Capabilities`]; a
//! scenario a broker cannot support checks the documented substitute
//! behaviour instead, and the declaration is visible in the test file.
//! Nothing is skipped silently.

pub mod scenarios;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::publisher::Publisher;
use crate::subscriber::{SubscribeOptions, Subscriber};
use crate::topic::Topic;

/// What the broker behind a [`Target`] can do, and how long to wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Redelivers an unsettled delivery by itself once its ack deadline
    /// passes (JetStream `ack_wait`; not Kafka, which only redelivers after a
    /// rebalance or seek).
    pub ack_deadline: bool,
    /// The largest event the adapter accepts, checked before sending.
    pub max_event_bytes: usize,
    /// How long to wait for an expected delivery before failing (covers
    /// consumer-group joins).
    pub receive_timeout: Duration,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            ack_deadline: true,
            max_event_bytes: 1024 * 1024,
            receive_timeout: Duration::from_secs(10),
        }
    }
}

impl Capabilities {
    /// Sets [`ack_deadline`](Self::ack_deadline).
    #[must_use]
    pub fn ack_deadline(mut self, supported: bool) -> Self {
        self.ack_deadline = supported;
        self
    }

    /// Sets [`max_event_bytes`](Self::max_event_bytes).
    #[must_use]
    pub fn max_event_bytes(mut self, limit: usize) -> Self {
        self.max_event_bytes = limit;
        self
    }

    /// Sets [`receive_timeout`](Self::receive_timeout).
    #[must_use]
    pub fn receive_timeout(mut self, timeout: Duration) -> Self {
        self.receive_timeout = timeout;
        self
    }
}

/// An adapter under test, connected to its real server.
#[async_trait]
pub trait Target: Debug + Send + Sync {
    /// What the broker can do.
    fn capabilities(&self) -> Capabilities;

    /// A publisher. May be shared between calls.
    ///
    /// # Errors
    ///
    /// The server cannot be reached: the scenario fails naming it.
    async fn publisher(&self) -> Result<Arc<dyn Publisher>>;

    /// A subscriber with a connection of its own, so that dropping it and all
    /// its subscriptions simulates a crashed consumer process.
    ///
    /// # Errors
    ///
    /// The server cannot be reached.
    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>>;

    /// Creates (or provisions) the topic `name`, which is unique per scenario
    /// run, with at least two partitions where the broker has partitions.
    ///
    /// # Errors
    ///
    /// The server refused to create it.
    async fn topic(&self, name: &str) -> Result<Topic>;

    /// Subscription options for consumer group `group`; override to add
    /// broker-specific settings. The scenarios set ack deadlines themselves.
    ///
    /// # Errors
    ///
    /// As [`SubscribeOptions::new`].
    fn subscribe_options(&self, group: &str) -> Result<SubscribeOptions> {
        SubscribeOptions::new(group)
    }
}

/// Expands to one `#[tokio::test]` per conformance scenario.
///
/// The argument is an expression evaluating to a future of a
/// [`Target`], evaluated once per test. The calling crate needs `tokio` with
/// the `macros` and `rt-multi-thread` features as a dev-dependency.
#[macro_export]
macro_rules! conformance_suite {
    ($target:expr) => {
        $crate::conformance_suite!(@each $target;
            round_trip_every_attribute,
            round_trip_binary_data,
            round_trip_without_data,
            round_trip_typed_data,
            order_per_key,
            order_per_key_survives_nack,
            consumer_group_shares_work,
            every_group_gets_every_event,
            redelivery_after_nack_with_delay,
            redelivery_after_crashed_consumer,
            ack_only_after_success,
            acked_events_are_not_redelivered,
            terminated_events_are_not_redelivered,
            settling_twice_is_a_no_op,
            unsettled_delivery_is_redelivered_after_ack_deadline,
            batch_publish_delivers_all_in_order,
            graceful_shutdown_loses_nothing,
            invalid_events_are_rejected_and_nothing_is_delivered,
        );
    };
    (@each $target:expr; $($scenario:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let target = $target.await;
                $crate::conformance::scenarios::$scenario(&target).await;
            }
        )+
    };
}
