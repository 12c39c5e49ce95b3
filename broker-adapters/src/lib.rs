//! CloudEvents over any broker.
//!
//! Services publish and consume [CloudEvents 1.0](https://cloudevents.io)
//! through two small traits, [`Publisher`] and [`Subscriber`], with the same
//! guarantees whichever broker is configured:
//!
//! - publishing returns only after the broker's durable acknowledgement;
//! - delivery is at least once, each delivery being acked after the handler
//!   succeeded or nacked for redelivery;
//! - events with the same `partitionkey` are delivered in order;
//! - members of one consumer group share the work.
//!
//! The event type is the `cloudevents-sdk` [`Event`], re-exported as
//! [`cloudevents`]; [`CloudEventBuilder`] fills the attributes the system
//! relies on (UUID v7 `id`, `time`, `datacontenttype`) and [`EventExt`] gives
//! typed access to data and extensions.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> broker_adapters::Result<()> {
//! use broker_adapters::prelude::*;
//! use futures_util::StreamExt;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct OrderPlaced { order_id: String }
//!
//! let broker = MemoryBroker::new(); // the embedded default
//! let orders = Topic::from_static("orders");
//! let mut billing = broker.subscribe(&orders, SubscribeOptions::new("billing")?).await?;
//!
//! let event = CloudEventBuilder::new("com.example.order.placed", "/orders")
//!     .partition_key("o-1")
//!     .json_data(&OrderPlaced { order_id: "o-1".into() })
//!     .build()?;
//! broker.publish(&orders, event).await?;
//!
//! let mut delivery = billing.next().await.expect("subscribed")?;
//! let placed: OrderPlaced = delivery.event().data_as()?;
//! assert_eq!(placed.order_id, "o-1");
//! delivery.ack().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! | feature | enables |
//! | --- | --- |
//! | `memory` (default) | [`MemoryBroker`], the in-process broker |
//! | `kafka` | the Kafka adapter, on rdkafka (builds librdkafka from source) |
//! | `nats` | the NATS JetStream adapter, on async-nats |
//! | `postgres` | [`sql::SqlBroker`] on PostgreSQL: a durable broker with only a database |
//! | `sqlite` | [`sql::SqlBroker`] on SQLite (WAL): a durable broker in a single binary |
//! | `conformance` | [`conformance`], the behavioural suite every adapter runs against its real server |
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod binding;
#[cfg(any(feature = "kafka", feature = "postgres", feature = "sqlite"))]
mod dispatch;
pub mod error;
pub mod event;
pub mod metrics;
pub mod publisher;
pub mod router;
pub mod subscriber;
pub mod telemetry;
pub mod topic;

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub mod memory;

#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka;

#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;

#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
pub mod sql;

pub mod middleware;

#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;

pub use cloudevents;
pub use cloudevents::Event;

pub use crate::error::{Error, ErrorKind, Result};
pub use crate::event::{CloudEventBuilder, EventExt};
#[cfg(feature = "memory")]
pub use crate::memory::{MemoryBroker, MemoryConfig};
pub use crate::publisher::{Publisher, PublisherExt};
pub use crate::router::{Consumer, ConsumerReport, HandlerError};
pub use crate::subscriber::{
    AckHandle, AckKind, Acker, ConsumerGroup, Delivery, DeliveryInfo, Received, Settlement,
    StartFrom, SubscribeOptions, Subscriber, Subscription,
};
pub use crate::topic::Topic;

/// The names most programs need: `use broker_adapters::prelude::*;`.
pub mod prelude {
    pub use cloudevents::{AttributesReader, Event};

    pub use crate::event::{CloudEventBuilder, EventExt};
    #[cfg(feature = "memory")]
    pub use crate::memory::MemoryBroker;
    pub use crate::publisher::{Publisher, PublisherExt};
    pub use crate::router::{Consumer, HandlerError};
    pub use crate::subscriber::{Delivery, Received, SubscribeOptions, Subscriber, Subscription};
    pub use crate::topic::Topic;
}
