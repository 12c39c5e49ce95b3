//! The consistency layer of the event backbone: the transactional outbox,
//! its relay, the inbox (idempotent consumer), and the [`saga`] engine
//! built on them, on PostgreSQL and SQLite.
//!
//! It builds only on the broker-agnostic [`Publisher`](broker_adapters::Publisher)
//! and [`Subscriber`](broker_adapters::Subscriber) contract of
//! `broker-adapters`, so nothing here knows which broker is configured.
//!
//! # The tour: outbox → relay → inbox
//!
//! 1. **[`Outbox`]**: a service writes its business change and the events
//!    it implies in **one database transaction**: `outbox.enqueue(&mut *tx,
//!    &topic, &event)`. They commit or roll back together; an oversized event
//!    fails before the commit.
//! 2. **[`Relay`]**: publishes committed rows through any
//!    `Arc<dyn Publisher>`, in order per partition key, in bounded batches,
//!    then deletes or archives them ([`Retention`]). It is woken by
//!    `LISTEN/NOTIFY` (PostgreSQL) or an in-process signal (SQLite), and
//!    polls as a fallback. Several relays share the work through partition
//!    leases on the database clock (see the [`relay`] module). Delivery is at
//!    least once, with the event id unchanged.
//! 3. **[`Inbox`]**: a consumer's effects and the record of the handled
//!    event id commit in one transaction, so a redelivered event is skipped.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//!
//! use broker_adapters::prelude::*;
//! use futures_util::StreamExt;
//! use futures_util::future::BoxFuture;
//! use orchestrator::{Inbox, Outbox, OutboxConfig, Processed, RelayConfig, sqlite};
//!
//! let pool = sqlite::connect("sqlite::memory:").await?;
//! sqlite::migrate(&pool).await?;
//! sqlx::query("create table orders (id text primary key)").execute(&pool).await?;
//! sqlx::query("create table invoices (order_id text)").execute(&pool).await?;
//!
//! let broker = Arc::new(MemoryBroker::new());
//! let orders = Topic::from_static("orders");
//! let mut billing = broker.subscribe(&orders, SubscribeOptions::new("billing")?).await?;
//!
//! // 1. The order and its event commit together.
//! let outbox = Outbox::sqlite(pool.clone(), OutboxConfig::new()).await?;
//! let mut tx = sqlite::begin_write(&pool).await?;
//! sqlx::query("insert into orders (id) values ('o-1')").execute(&mut *tx).await?;
//! let placed = CloudEventBuilder::new("com.example.order.placed", "/orders")
//!     .partition_key("o-1")
//!     .json_data(&"o-1")
//!     .build()?;
//! outbox.enqueue(&mut *tx, &orders, &placed).await?;
//! tx.commit().await?;
//! outbox.committed();
//!
//! // 2. A relay publishes it.
//! let relay = outbox.relay(broker.clone(), RelayConfig::new())?.spawn();
//!
//! // 3. Billing handles it once, however often it is delivered.
//! let inbox = Inbox::sqlite(pool.clone());
//! let mut delivery = billing.next().await.expect("subscribed")?;
//! fn bill(tx: &mut sqlx::SqliteConnection) -> BoxFuture<'_, Result<(), orchestrator::BoxError>> {
//!     Box::pin(async move {
//!         sqlx::query("insert into invoices (order_id) values ('o-1')")
//!             .execute(&mut *tx)
//!             .await?;
//!         Ok(())
//!     })
//! }
//! let outcome = inbox.process("billing", delivery.event(), bill).await;
//! orchestrator::inbox::settle(&mut delivery, &outcome).await?;
//! assert_eq!(outcome?, Processed::Handled(()));
//!
//! // The same event delivered again is skipped.
//! let again = inbox.process("billing", &placed, bill).await?;
//! assert_eq!(again, Processed::Duplicate);
//! let invoices: i64 = sqlx::query_scalar("select count(*) from invoices").fetch_one(&pool).await?;
//! assert_eq!(invoices, 1);
//!
//! let report = relay.shutdown().await?;
//! assert_eq!(report.published, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Sagas
//!
//! The [`saga`] module runs multi-step business transactions across
//! services: a [`saga::Coordinator`] applies each transition in one
//! database transaction (inbox record, saga state and history, next command
//! in the outbox), runs compensations in reverse order on failure, and keeps
//! its timers in the database; [`saga::Participant`] is the other side. See
//! the module docs and `schemas/contracts/saga/PROTOCOL.md`.
//!
//! # Features
//!
//! | feature | enables |
//! | --- | --- |
//! | `sqlite` (default) | the [`sqlite`] stores (WAL, in-process relay wake-up) |
//! | `postgres` | the [`postgres`] stores (`LISTEN/NOTIFY` relay wake-up) |
//! | `service` | the `saga-coordinator` binary and [`service`] (HTTP API; SQL broker, Kafka, NATS) |
//!
//! # Metrics
//!
//! `outbox_enqueued_total`, `outbox_published_total`, `outbox_batches_total`,
//! `outbox_relay_failures_total`, `outbox_purged_total`,
//! `outbox_parked_total` (counters),
//! `outbox_relay_lag_seconds` (histogram: age of the oldest row of each
//! batch), `outbox_relay_partitions` (gauge per relay),
//! `inbox_handled_total` and `inbox_duplicates_total` (per consumer),
//! `saga_started_total` (per saga type), `saga_transitions_total` (per
//! resulting status), `saga_ignored_total` (stale or unexpected inputs).
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod error;
pub mod inbox;
pub mod outbox;
pub mod relay;
pub mod saga;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "service")]
#[cfg_attr(docsrs, doc(cfg(feature = "service")))]
pub mod service;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod sqlite;

pub use sqlx;

pub use crate::error::{BoxError, Error, ErrorKind, Result};
pub use crate::inbox::{Inbox, Processed};
pub use crate::outbox::{Outbox, OutboxConfig, partition_of};
pub use crate::relay::{Poison, Relay, RelayConfig, RelayHandle, RelayReport, Retention};
