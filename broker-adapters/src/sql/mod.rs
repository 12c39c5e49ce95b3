//! The SQL-table broker: PostgreSQL or SQLite as a durable broker, so that one
//! binary with only a database can publish and consume events.
//!
//! ```no_run
//! # async fn demo() -> broker_adapters::Result<()> {
//! use broker_adapters::sql::{SqlBroker, SqlConfig};
//! use broker_adapters::{Publisher, PublisherExt, SubscribeOptions, Subscriber, Topic};
//!
//! let broker = SqlBroker::connect(SqlConfig::builder().url("sqlite:///var/lib/app/broker.db")).await?;
//! let orders = Topic::from_static("orders");
//! let subscription = broker.subscribe(&orders, SubscribeOptions::new("billing")?).await?;
//! broker.publish_json(&orders, "com.example.order.placed", "/orders", &42).await?;
//! # drop(subscription);
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//!
//! The same as every adapter (see [`Publisher`] and [`Subscriber`]):
//!
//! - `publish` and `publish_batch` validate every event first, insert the
//!   whole batch in one transaction and return after it committed: a
//!   returned event is durable, a failed batch left nothing behind.
//! - Delivery is at least once. Each (group, topic, partition) has a
//!   committed cursor that only moves up to the oldest unsettled event, plus
//!   the list of positions past it that were already settled, so a member
//!   that crashes or drops its subscription loses nothing and a graceful
//!   [`Subscription::close`](crate::Subscription::close) repeats nothing.
//! - Events with the same `partitionkey` land in one partition and are
//!   delivered in publish order; a nacked event holds back the later ones of
//!   its key. Nack delays and ack deadlines are applied by the subscription.
//! - Members of a group share a topic's partitions (a fixed count per topic,
//!   recorded when the topic is first used): partition `p` goes to the
//!   `p mod n`-th live member. Members hold partitions by leases timed with
//!   the database clock, renew them every heartbeat, and take over the
//!   partitions of a member whose lease expired.
//!   `subscribe` returns once the new member holds its share; when a member
//!   vanished without leaving, that waits for its leases to expire.
//! - [`DeliveryInfo::attempt`](crate::DeliveryInfo) counts the deliveries by
//!   the current member; a takeover starts again at 1.
//! - Rows that cannot be decoded are copied, unchanged and with the reason,
//!   to the topic `<topic>.dlq` in the same table (once, whichever groups
//!   meet them), and never stall the partition. Being undecodable, they are
//!   meant to be inspected with SQL, not consumed.
//!
//! # Commit order, not insert order
//!
//! A cursor is only correct if no row can later appear behind it. A
//! sequence number alone does not give that: two transactions take
//! sequence numbers 1 and 2, the second commits first, a reader passes 2,
//! and 1 becomes visible behind the cursor and is skipped forever.
//!
//! - **PostgreSQL**: every row also stores the inserting transaction's id
//!   (`pg_current_xact_id()`, 64-bit, never wrapping). Readers only read rows
//!   whose transaction id is below `pg_snapshot_xmin(pg_current_snapshot())`
//!   — every such transaction has finished — ordered by `(xid, seq)`, and
//!   keep their cursor as that pair. A transaction still running when a
//!   reader reads has an id at or above the snapshot's `xmin`, so its rows
//!   sort after the reader's cursor whenever it commits. The cost: a
//!   long-running transaction anywhere in the PostgreSQL cluster (one that
//!   has written something, so holds a transaction id) delays delivery of
//!   rows written after it started until it ends; rows are never lost or
//!   reordered by it. Publishers send `NOTIFY` in the inserting transaction, and
//!   subscriptions `LISTEN`, so delivery does not wait for the poll.
//! - **SQLite**: writers take the write lock up front (`BEGIN IMMEDIATE`),
//!   so one transaction writes at a time and row id order is commit order.
//!   The database runs in WAL mode with a busy timeout. Publishers in the same
//!   process wake subscriptions on the same database file directly; other
//!   processes are seen at the next poll.
//!
//! # Tables
//!
//! Created by embedded migrations (tracked in `broker_migrations`), all
//! prefixed `broker_` so they can live beside an application's tables:
//! [`EVENTS_TABLE`] (the log; dead letters carry `dlq_reason`,
//! `origin_topic` and `origin_seq`), `broker_topics`, `broker_members` and
//! `broker_partitions`. [`SqlBroker::prune`] deletes old events every group
//! has consumed; run it periodically.

mod config;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;
mod subscriber;

use std::collections::HashMap;
use std::fmt::{self, Debug};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use cloudevents::Event;
use tokio::sync::Notify;

pub use self::config::{
    Backend, DEFAULT_MAX_EVENT_BYTES, DEFAULT_PARTITIONS, DLQ_SUFFIX, SqlConfig,
};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{EventExt, validate_for_publish};
use crate::publisher::Publisher;
use crate::subscriber::{StartFrom, SubscribeOptions, Subscriber, Subscription};
use crate::topic::Topic;

/// The table holding every topic's events, dead letters included.
pub const EVENTS_TABLE: &str = "broker_events";

/// The table recording the migrations of the broker's tables.
pub const MIGRATIONS_TABLE: &str = "broker_migrations";

/// A row's place in its partition: ordered by the writing transaction, then
/// by sequence number. On SQLite `xid` is always 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct Pos {
    pub(crate) xid: i64,
    pub(crate) seq: i64,
}

impl Pos {
    /// The greatest position before `self`: a cursor from which `self` is the
    /// next row.
    fn before(self) -> Self {
        Self {
            xid: self.xid,
            seq: self.seq.saturating_sub(1),
        }
    }
}

/// A row to insert.
#[derive(Debug)]
pub(crate) struct NewRow {
    pub(crate) partition: i32,
    pub(crate) key: Option<String>,
    pub(crate) event_id: String,
    pub(crate) payload: Vec<u8>,
}

/// A row read from a partition.
#[derive(Debug)]
pub(crate) struct StoredRow {
    pub(crate) pos: Pos,
    pub(crate) partition: i32,
    pub(crate) key: Option<String>,
    pub(crate) event_id: String,
    pub(crate) payload: Vec<u8>,
}

/// A dead letter: the original row, where it came from and why.
#[derive(Debug)]
pub(crate) struct DeadLetter<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) origin_topic: &'a str,
    pub(crate) reason: &'a str,
    pub(crate) row: &'a StoredRow,
}

/// A partition lease just taken: where to read from.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) cursor: Pos,
    pub(crate) settled: String,
}

/// Identifies one member's hold on a group's view of a topic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Membership<'a> {
    pub(crate) group: &'a str,
    pub(crate) topic: &'a str,
    pub(crate) member: &'a str,
}

/// Wakes a subscription when rows may have arrived.
#[derive(Debug)]
pub(crate) struct Wake {
    /// Signalled with `notify_one` (PostgreSQL, one per subscription) or
    /// `notify_waiters` (SQLite, one per database file).
    pub(crate) notify: Arc<Notify>,
}

/// What each backend does in SQL; the broker logic is shared.
#[async_trait]
pub(crate) trait Store: Debug + Send + Sync + 'static {
    /// The system name in errors: `postgres` or `sqlite`.
    fn system(&self) -> &'static str;

    /// The topic's partition count, recording `default` if it is new.
    async fn topic_partitions(&self, topic: &str, default: u32) -> Result<u32>;

    /// Inserts all rows in one transaction and wakes subscribers.
    async fn insert(&self, topic: &str, rows: &[NewRow]) -> Result<()>;

    /// Stores a dead letter, once per original row.
    async fn dead_letter(&self, letter: DeadLetter<'_>) -> Result<()>;

    /// Up to `limit` committed rows of a partition after `after`, in commit order.
    async fn fetch(
        &self,
        topic: &str,
        partition: i32,
        after: Pos,
        limit: u32,
    ) -> Result<Vec<StoredRow>>;

    /// Creates the group's partition rows that are missing, with cursors
    /// where a new group starts.
    async fn init_partitions(
        &self,
        group: &str,
        topic: &str,
        partitions: u32,
        start: StartFrom,
    ) -> Result<()>;

    /// Renews the member's registration, drops expired members, and returns
    /// the live members in a stable order.
    async fn heartbeat(&self, who: Membership<'_>, lease: Duration) -> Result<Vec<String>>;

    /// Renews the member's partition leases; returns the partitions it still owns.
    async fn renew(&self, who: Membership<'_>, lease: Duration) -> Result<Vec<i32>>;

    /// Takes the partition if it is free, expired or already the member's.
    async fn claim(
        &self,
        who: Membership<'_>,
        partition: i32,
        lease: Duration,
    ) -> Result<Option<Claimed>>;

    /// Stores the cursor if the member still owns the partition, and gives
    /// the partition up if `release`. Returns whether it was still the owner.
    async fn commit(
        &self,
        who: Membership<'_>,
        partition: i32,
        cursor: Pos,
        settled: &str,
        release: bool,
    ) -> Result<bool>;

    /// Releases every partition of the member and removes it from the group.
    async fn leave(&self, who: Membership<'_>) -> Result<()>;

    /// What wakes a subscription on `topic`.
    async fn wake(&self, topic: &str) -> Result<Wake>;

    /// Deletes events published more than `older_than` ago that every
    /// consumer group of their topic has committed past.
    async fn prune(&self, older_than: Duration) -> Result<u64>;

    /// Closes the connections.
    async fn close(&self);
}

/// A durable broker on a PostgreSQL or SQLite database.
///
/// Cheap to clone: clones share the connection pool. It is both the
/// [`Publisher`] and the [`Subscriber`]; see the [module docs](self) for the
/// guarantees and the design.
#[derive(Clone)]
pub struct SqlBroker {
    inner: Arc<Inner>,
}

struct Inner {
    config: SqlConfig,
    store: Arc<dyn Store>,
    partitions: Mutex<HashMap<Topic, u32>>,
    keyless: AtomicU64,
    closed: AtomicBool,
}

impl Debug for SqlBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlBroker")
            .field("backend", &self.inner.store.system())
            .field("config", &self.inner.config)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SqlBroker {
    /// Connects to the database the config names and brings the broker's
    /// tables up to date.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for invalid settings, a URL that does not parse,
    /// or a backend whose Cargo feature is off
    /// ([`ErrorKind::FeatureNotEnabled`]); [`ErrorKind::Connection`] if the
    /// database cannot be reached; [`ErrorKind::Broker`] if a migration fails.
    pub async fn connect(config: SqlConfig) -> Result<Self> {
        config.validate()?;
        let store: Arc<dyn Store> = match config.backend()? {
            #[cfg(feature = "postgres")]
            Backend::Postgres => Arc::new(postgres::PgStore::connect(&config).await?),
            #[cfg(feature = "sqlite")]
            Backend::Sqlite => Arc::new(sqlite::SqliteStore::connect(&config).await?),
            #[allow(unreachable_patterns)]
            other => {
                return Err(Error::new(ErrorKind::FeatureNotEnabled {
                    feature: match other {
                        Backend::Postgres => "postgres",
                        _ => "sqlite",
                    },
                }));
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                store,
                partitions: Mutex::new(HashMap::new()),
                keyless: AtomicU64::new(0),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// [`connect`](Self::connect) with [`SqlConfig::from_env`].
    ///
    /// # Errors
    ///
    /// As [`SqlConfig::from_env`] and [`connect`](Self::connect).
    pub async fn from_env() -> Result<Self> {
        Self::connect(SqlConfig::from_env()?).await
    }

    /// The settings.
    pub fn config(&self) -> &SqlConfig {
        &self.inner.config
    }

    /// The largest event `publish` accepts.
    pub fn max_event_bytes(&self) -> usize {
        self.inner.config.max_event_bytes
    }

    /// The topic's partition count: recorded when the topic was first used,
    /// or the configured count, recorded now.
    ///
    /// # Errors
    ///
    /// The database failed.
    pub async fn partitions(&self, topic: &Topic) -> Result<u32> {
        if let Some(n) = self.lock_partitions().get(topic) {
            return Ok(*n);
        }
        let n = self
            .inner
            .store
            .topic_partitions(topic.as_str(), self.inner.config.partitions)
            .await?;
        self.lock_partitions().insert(topic.clone(), n);
        Ok(n)
    }

    /// Deletes events published more than `older_than` ago that every
    /// consumer group of their topic has committed past; returns how many.
    ///
    /// Run it periodically to bound the table. An event no group has
    /// subscribed to yet counts as consumed, so a group created later with
    /// [`StartFrom::Earliest`] starts at the oldest event still kept — the
    /// retention semantics of other brokers. Dead letters (rows with a
    /// `dlq_reason`) are never pruned: inspect and delete them by hand.
    ///
    /// # Errors
    ///
    /// The database failed, or the broker is closed.
    pub async fn prune(&self, older_than: Duration) -> Result<u64> {
        self.check_open()?;
        self.inner.store.prune(older_than).await
    }

    /// The dead-letter topic of `topic`: `<topic>.dlq`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidTopic`] if the name gets too long.
    pub fn dead_letter_topic(topic: &Topic) -> Result<Topic> {
        Topic::try_from(format!("{topic}{DLQ_SUFFIX}"))
    }

    fn lock_partitions(&self) -> std::sync::MutexGuard<'_, HashMap<Topic, u32>> {
        self.inner
            .partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("sql broker"))
        } else {
            Ok(())
        }
    }

    fn encode(&self, event: &Event, partitions: u32) -> Result<NewRow> {
        let key = event.partition_key().map(str::to_owned);
        let slot = match &key {
            Some(k) => u64::from(partition_of(k, partitions)),
            None => self.inner.keyless.fetch_add(1, Ordering::Relaxed) % u64::from(partitions),
        };
        let payload = crate::event::to_json_vec(event)
            .map_err(|e| Error::with_source(ErrorKind::Encode, e))?;
        Ok(NewRow {
            partition: i32::try_from(slot).unwrap_or(0),
            key,
            event_id: cloudevents::AttributesReader::id(event).to_owned(),
            payload,
        })
    }
}

/// The partition of a key: FNV-1a, stable across versions and platforms.
pub(crate) fn partition_of(key: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

#[async_trait]
impl Publisher for SqlBroker {
    async fn publish(&self, topic: &Topic, event: Event) -> Result<()> {
        self.publish_batch(topic, vec![event]).await
    }

    async fn publish_batch(&self, topic: &Topic, events: Vec<Event>) -> Result<()> {
        self.check_open()?;
        let limit = self.inner.config.max_event_bytes;
        for event in &events {
            validate_for_publish(event, limit)?;
        }
        if events.is_empty() {
            return Ok(());
        }
        let partitions = self.partitions(topic).await?;
        let rows = events
            .iter()
            .map(|e| self.encode(e, partitions))
            .collect::<Result<Vec<_>>>()?;
        self.inner.store.insert(topic.as_str(), &rows).await
    }

    async fn close(&self) -> Result<()> {
        Subscriber::close(self).await
    }
}

#[async_trait]
impl Subscriber for SqlBroker {
    async fn subscribe(&self, topic: &Topic, options: SubscribeOptions) -> Result<Subscription> {
        self.check_open()?;
        let partitions = self.partitions(topic).await?;
        // Not a `Topic`: a topic name of maximal length still has one.
        let dead_letter = format!("{topic}{DLQ_SUFFIX}");
        let dead_letter_partitions = self
            .inner
            .store
            .topic_partitions(&dead_letter, self.inner.config.partitions)
            .await?;
        subscriber::subscribe(
            Arc::clone(&self.inner.store),
            &self.inner.config,
            topic,
            partitions,
            dead_letter,
            dead_letter_partitions,
            options,
        )
        .await
    }

    async fn close(&self) -> Result<()> {
        if !self.inner.closed.swap(true, Ordering::AcqRel) {
            self.inner.store.close().await;
        }
        Ok(())
    }
}

/// Maps a database error to the crate's error.
pub(crate) fn db_error(system: &'static str, operation: &'static str, e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => {
            ErrorKind::Connection { system }
        }
        // No connection within the acquire timeout: unreachable or exhausted.
        sqlx::Error::PoolTimedOut => ErrorKind::Connection { system },
        sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => ErrorKind::Closed {
            what: "sql connection pool",
        },
        sqlx::Error::Configuration(_) => ErrorKind::Config {
            key: "url".into(),
            reason: e.to_string(),
        },
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            // Serialization failures, deadlocks, lock timeouts, admin
            // shutdowns, and SQLite's busy and locked.
            let retryable = matches!(
                code.as_str(),
                "40001"
                    | "40P01"
                    | "55P03"
                    | "57P01"
                    | "57P02"
                    | "57P03"
                    | "5"
                    | "6"
                    | "517"
                    | "261"
            ) || code.starts_with("08");
            ErrorKind::Broker {
                system,
                operation,
                retryable,
            }
        }
        _ => ErrorKind::Broker {
            system,
            operation,
            retryable: false,
        },
    };
    Error::with_source(kind, e)
}

/// The migration files of a backend as a migrator tracked in
/// [`MIGRATIONS_TABLE`].
pub(crate) fn migrator(files: &[(i64, &'static str, &'static str)]) -> sqlx::migrate::Migrator {
    use sqlx::SqlSafeStr as _;
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let migrations = files
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(
                *version,
                std::borrow::Cow::Borrowed(*description),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitioning_is_stable() {
        // FNV-1a of "a" is 0xe40c292c.
        assert_eq!(partition_of("a", u32::MAX), 0xe40c_292c);
        assert_eq!(partition_of("order-1", 8), partition_of("order-1", 8));
        let spread: std::collections::HashSet<u32> = (0..64)
            .map(|n| partition_of(&format!("key-{n}"), 8))
            .collect();
        assert_eq!(spread.len(), 8, "64 keys reach every partition");
    }

    #[test]
    fn the_position_before_a_row_precedes_it_and_nothing_else() {
        let p = Pos { xid: 10, seq: 5 };
        assert!(p.before() < p);
        assert!(Pos { xid: 10, seq: 4 } <= p.before());
        assert!(Pos { xid: 9, seq: 99 } < p.before());
    }
}
