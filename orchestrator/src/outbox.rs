//! [`Outbox`]: events written in the caller's own database transaction.
//!
//! The business change and its events commit or roll back together; a
//! [`Relay`](crate::Relay) publishes the committed rows afterwards. The
//! backend-specific methods (`Outbox::postgres`, `Outbox::sqlite`,
//! `enqueue`, `relay`) live in the [`postgres`](crate::postgres) and
//! [`sqlite`](crate::sqlite) modules.

use std::fmt;
use std::sync::Arc;

use broker_adapters::cloudevents::{AttributesReader, Event};
use broker_adapters::{EventExt, Topic};
use tokio::sync::watch;

use crate::error::{Error, ErrorKind, Result};

/// The default number of outbox partitions.
pub const DEFAULT_PARTITIONS: u32 = 16;

/// The default largest encoded event the outbox accepts: 1 MiB, what NATS
/// and Kafka accept by default.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// The most partitions an outbox may have.
pub const MAX_PARTITIONS: u32 = 4096;

/// How an [`Outbox`] stores events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    partitions: u32,
    max_event_bytes: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            partitions: DEFAULT_PARTITIONS,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

impl OutboxConfig {
    /// The defaults: [`DEFAULT_PARTITIONS`] partitions and
    /// [`DEFAULT_MAX_EVENT_BYTES`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of partitions rows are spread over (hash of the partition
    /// key modulo this). It is a property of the database: the first outbox
    /// created on a database fixes it, and an outbox configured with another
    /// number is refused.
    #[must_use]
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// The largest encoded event (JSON, structured mode) accepted by
    /// `enqueue`; larger events fail before the transaction commits.
    #[must_use]
    pub fn max_event_bytes(mut self, limit: usize) -> Self {
        self.max_event_bytes = limit;
        self
    }

    /// The number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.partitions
    }

    /// The event size limit in bytes.
    pub fn event_limit(&self) -> usize {
        self.max_event_bytes
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return Err(Error::config(
                "partitions",
                format!("{} is not between 1 and {MAX_PARTITIONS}", self.partitions),
            ));
        }
        if self.max_event_bytes == 0 {
            return Err(Error::config("max_event_bytes", "must be positive"));
        }
        Ok(())
    }
}

/// Writes events into the outbox table inside the caller's transaction.
///
/// Cheap to clone; clones share the in-process wake-up signal, so relays
/// started from any clone are woken by every clone's `enqueue`.
pub struct Outbox<DB: sqlx::Database> {
    pub(crate) pool: sqlx::Pool<DB>,
    pub(crate) config: OutboxConfig,
    /// The in-process wake-up: how many `enqueue` calls so far; a
    /// `committed` call wakes the relays without changing it.
    pub(crate) signal: Arc<watch::Sender<u64>>,
}

impl<DB: sqlx::Database> Clone for Outbox<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            config: self.config.clone(),
            signal: Arc::clone(&self.signal),
        }
    }
}

impl<DB: sqlx::Database> fmt::Debug for Outbox<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("backend", &DB::NAME)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<DB: sqlx::Database> Outbox<DB> {
    /// The configuration.
    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// The pool the relays read from.
    pub fn pool(&self) -> &sqlx::Pool<DB> {
        &self.pool
    }

    /// Tells the relays of this process that rows were enqueued (SQLite's
    /// wake-up; PostgreSQL relays learn it from `NOTIFY`).
    #[cfg(feature = "sqlite")]
    pub(crate) fn signal(&self) {
        self.signal.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Tells the relays of this process that a transaction that enqueued
    /// rows has committed, so they look at once. Optional: without it a
    /// SQLite relay finds the rows by looking again shortly after `enqueue`
    /// and, at the latest, at its poll interval. PostgreSQL relays are told
    /// by the commit itself (`NOTIFY`), and ignore this.
    pub fn committed(&self) {
        // `send_modify` wakes the receivers even though nothing changed.
        self.signal.send_modify(|_| {});
    }

    /// `event` for `topic` as an outbox row, checked as `enqueue` checks
    /// it: what the saga layer's transactions insert with their last
    /// statements.
    pub(crate) fn row(&self, topic: &Topic, event: &Event) -> Result<NewRow> {
        encode(&self.config, topic, event)
    }

    /// The partition an event goes to: see [`partition_of`].
    pub fn partition_for(&self, event: &Event) -> u32 {
        partition_of(
            event.partition_key().unwrap_or_else(|| event.id()),
            self.config.partitions,
        )
    }
}

/// The partition of a partition key: FNV-1a (64 bit) of its UTF-8 bytes
/// modulo `partitions`. Stable across processes, versions and platforms.
/// Events without a partition key are placed by their id.
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    u32::try_from(hash % u64::from(partitions.max(1))).unwrap_or(0)
}

/// A row ready to insert: what `enqueue` writes.
#[derive(Debug)]
pub(crate) struct NewRow {
    pub(crate) event_id: String,
    pub(crate) topic: String,
    pub(crate) partition_key: Option<String>,
    pub(crate) part: i32,
    pub(crate) payload: String,
}

/// Validates and encodes `event` for the outbox.
pub(crate) fn encode(config: &OutboxConfig, topic: &Topic, event: &Event) -> Result<NewRow> {
    broker_adapters::event::validate_attributes(event).map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidEvent {
                reason: e.to_string(),
            },
            e,
        )
    })?;
    let codec = |e: Box<dyn std::error::Error + Send + Sync>| {
        Error::with_source(
            ErrorKind::Codec {
                operation: "encode the event as JSON",
            },
            e,
        )
    };
    let payload = broker_adapters::event::to_json_vec(event).map_err(|e| codec(e.into()))?;
    // The text of `&str`s and ASCII: always UTF-8.
    let payload = String::from_utf8(payload).map_err(|e| codec(e.into()))?;
    let size = payload.len().max(event.encoded_size());
    if size > config.max_event_bytes {
        return Err(Error::new(ErrorKind::EventTooLarge {
            event_id: event.id().to_owned(),
            size,
            limit: config.max_event_bytes,
        }));
    }
    let key = event.partition_key().map(str::to_owned);
    let part = partition_of(key.as_deref().unwrap_or(event.id()), config.partitions);
    Ok(NewRow {
        event_id: event.id().to_owned(),
        topic: topic.as_str().to_owned(),
        partition_key: key,
        part: i32::try_from(part).unwrap_or(0),
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition_of("order-1", 16), partition_of("order-1", 16));
        for n in 1..64 {
            assert!(partition_of(&format!("k{n}"), 7) < 7);
        }
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(partition_of("a", 1 << 31), 0x8601_ec8c % (1 << 31));
    }

    #[test]
    fn bad_config_is_refused_with_a_reason() {
        let err = OutboxConfig::new().partitions(0).validate();
        assert!(matches!(
            err.map_err(|e| e.kind().clone()),
            Err(ErrorKind::Config {
                key: "partitions",
                ..
            })
        ));
        assert!(OutboxConfig::new().max_event_bytes(0).validate().is_err());
        assert!(OutboxConfig::new().validate().is_ok());
    }
}
