//! The PostgreSQL stores: [`migrate`], `Outbox<Postgres>`, `Inbox<Postgres>`.
//!
//! `enqueue` runs `pg_notify` in the caller's transaction, so PostgreSQL
//! delivers the wake-up to the relays' `LISTEN` only when it commits (and not
//! at all when it rolls back). Relays fall back to polling when the listener
//! connection is lost.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_adapters::cloudevents::{AttributesReader, Event};
use broker_adapters::{Publisher, Topic};
use futures_util::future::BoxFuture;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{PgConnection, Postgres};
use tokio::sync::watch;
use tracing::warn;

use crate::error::{BoxError, Error, ErrorKind, Result};
use crate::inbox::{Inbox, Processed};
use crate::outbox::{NewRow, Outbox, OutboxConfig, encode};
use crate::relay::{Relay, RelayConfig, RelayStore, StoredRow, Wake, Wakeup};

/// The channel `enqueue` notifies and relays listen on; the payload is the
/// schema of the outbox table.
pub const NOTIFY_CHANNEL: &str = "orchestrator_outbox";

macro_rules! now_ms {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

/// A relay's mark of the published rows whose ids are the parameter
/// `$ids`: deleted, or stamped with the publish time when the parameter
/// `$keep` is true, by the function `orchestrator_outbox_mark` (see its
/// migration for why a function). It names `no_wait`, a `with` part that
/// has the statement commit without waiting for the WAL flush (a mark lost
/// in a database crash only publishes its rows again, with the same event
/// ids, as a relay killed before marking does). Its one column is the
/// number of rows marked.
macro_rules! pg_mark {
    ($ids:literal, $keep:literal) => {
        concat!(
            "select orchestrator_outbox_mark(",
            $ids,
            ", ",
            $keep,
            ") as marked from no_wait"
        )
    };
}

/// The `with` part [`pg_mark!`] names.
macro_rules! pg_no_wait {
    () => {
        "no_wait as (select set_config('synchronous_commit', 'off', true))"
    };
}

/// A relay's look: the oldest pending rows (at most `$3` per partition,
/// none with an id in `$4`) of the partitions whose lease `$1` holds,
/// except those in `$2`; after `$with`, and with the condition `$and`
/// (empty, or starting with ` and `) beside the lease's.
macro_rules! pg_look {
    ($with:expr, $and:expr) => {
        concat!(
            $with,
            "select o.part, o.id, o.topic, o.payload, ",
            now_ms!(),
            " - o.created_ms as age_ms from orchestrator_outbox_leases l cross join lateral ( \
             select p.part, p.id, p.topic, p.payload, p.created_ms from orchestrator_outbox p \
             where p.part = l.part and p.published_ms is null and p.failed_ms is null \
             and p.id <> all($4) order by p.id limit $3) o where l.owner = $1 and l.expires_ms > ",
            now_ms!(),
            " and l.part <> all($2)",
            $and,
            " order by o.part, o.id"
        )
    };
}

/// Begins a transaction, naming what it is for in its errors.
pub(crate) async fn begin_for(
    pool: &PgPool,
    operation: &'static str,
) -> Result<sqlx::Transaction<'static, Postgres>> {
    pool.begin().await.map_err(|e| Error::db(operation, e))
}

/// The PostgreSQL side of the saga layer's transactions, with the methods
/// of SQLite's `Trip` (which folds `BEGIN` and `COMMIT` into the first and
/// last statements): here `BEGIN` is sent when it starts, each statement
/// on its own.
pub(crate) struct Trip {
    tx: sqlx::Transaction<'static, Postgres>,
}

impl Trip {
    /// Begins the transaction.
    pub(crate) async fn start(pool: &PgPool, operation: &'static str) -> Result<Self> {
        Ok(Self {
            tx: begin_for(pool, operation).await?,
        })
    }

    /// The connection for the first statement.
    pub(crate) fn open(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// The connection.
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Commits.
    pub(crate) async fn commit(self, operation: &'static str) -> Result<()> {
        self.tx.commit().await.map_err(|e| Error::db(operation, e))
    }

    /// Rolls back.
    pub(crate) async fn rollback(self) {
        let _ = self.tx.rollback().await;
    }
}

/// Binds `rows` as the five arrays a statement inserts outbox rows from
/// with `unnest` (event ids, topics, partition keys, partitions,
/// payloads), the statement's parameters `$1`..`$5`, and the notify
/// channel as `$6`.
pub(crate) fn bind_outbox_arrays<'q, O>(
    query: sqlx::query::QueryScalar<'q, Postgres, O, sqlx::postgres::PgArguments>,
    rows: &'q [NewRow],
) -> sqlx::query::QueryScalar<'q, Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(rows.iter().map(|r| r.event_id.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.topic.as_str()).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.partition_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.part).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.payload.as_str()).collect::<Vec<_>>())
        .bind(NOTIFY_CHANNEL)
}

/// Applies the embedded migrations (outbox, leases, inbox tables) to the
/// schema first on the connections' `search_path`.
///
/// # Errors
///
/// [`ErrorKind::Migrate`] with the cause.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    sqlx::migrate!("./migrations/postgres")
        .run(pool)
        .await
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Migrate {
                    backend: "postgres",
                },
                e,
            )
        })
}

impl Outbox<Postgres> {
    /// An outbox on a migrated PostgreSQL database (see [`migrate`]).
    ///
    /// Creates the partition lease rows on first use.
    ///
    /// # Errors
    ///
    /// An invalid `config`, a partition count that differs from the one the
    /// database already has, or a database failure.
    pub async fn postgres(pool: PgPool, config: OutboxConfig) -> Result<Self> {
        config.validate()?;
        let existing: i64 = sqlx::query_scalar("select count(*) from orchestrator_outbox_leases")
            .fetch_one(&pool)
            .await
            .map_err(|e| Error::db("count the outbox partitions", e))?;
        let wanted = i64::from(config.partition_count());
        if existing != 0 && existing != wanted {
            return Err(Error::config(
                "partitions",
                format!(
                    "the database has {existing} outbox partitions, the configuration {wanted}"
                ),
            ));
        }
        if existing == 0 {
            sqlx::query(
                "insert into orchestrator_outbox_leases (part) \
                 select generate_series(0, $1 - 1) on conflict do nothing",
            )
            .bind(i32::try_from(wanted).unwrap_or(i32::MAX))
            .execute(&pool)
            .await
            .map_err(|e| Error::db("create the outbox partitions", e))?;
        }
        Ok(Self {
            pool,
            config,
            signal: Arc::new(watch::Sender::new(0)),
        })
    }

    /// Writes `event` for `topic` into the outbox on `conn`, normally the
    /// caller's open transaction (`&mut *tx`): the row and the relays'
    /// wake-up become visible when it commits and vanish if it rolls back.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::EventTooLarge`] or [`ErrorKind::InvalidEvent`] before
    /// anything is written, or a database failure (the caller's transaction
    /// is then aborted and must be rolled back).
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        topic: &Topic,
        event: &Event,
    ) -> Result<()> {
        let row = encode(&self.config, topic, event)?;
        self.insert(conn, &row).await
    }

    /// Inserts `rows` in `trip` and commits it.
    pub(crate) async fn commit_with(
        &self,
        mut trip: Trip,
        rows: &[NewRow],
        operation: &'static str,
    ) -> Result<()> {
        for row in rows {
            self.insert(trip.conn(), row).await?;
        }
        trip.commit(operation).await
    }

    async fn insert(&self, conn: &mut PgConnection, row: &NewRow) -> Result<()> {
        sqlx::query(concat!(
            "with ins as (insert into orchestrator_outbox \
             (event_id, topic, partition_key, part, payload, created_ms) \
             values ($1, $2, $3, $4, $5, ",
            now_ms!(),
            ") returning id) select pg_notify($6, current_schema()) from ins"
        ))
        .bind(&row.event_id)
        .bind(&row.topic)
        .bind(&row.partition_key)
        .bind(row.part)
        .bind(&row.payload)
        .bind(NOTIFY_CHANNEL)
        .execute(&mut *conn)
        .await
        .map_err(|e| Error::db("enqueue an outbox row", e))?;
        metrics::counter!("outbox_enqueued_total").increment(1);
        Ok(())
    }

    /// Rows the relay parked because the broker refused them for good (see
    /// [`Poison::Park`](crate::relay::Poison::Park)).
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn parked(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from orchestrator_outbox where failed_ms is not null",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| Error::db("count parked outbox rows", e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Puts every parked row back in line (once the cause is fixed); returns
    /// how many. Each keeps its place: it goes out before the rows of its
    /// partition enqueued after it that are still pending.
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn requeue_parked(&self) -> Result<u64> {
        let done = sqlx::query(
            "update orchestrator_outbox set failed_ms = null, last_error = null \
             where failed_ms is not null",
        )
        .execute(&self.pool)
        .await
        .map_err(|e| Error::db("requeue parked outbox rows", e))?;
        Ok(done.rows_affected())
    }

    /// Rows not yet published nor parked (for monitoring and tests).
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn pending(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from orchestrator_outbox where published_ms is null and failed_ms is null",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| Error::db("count pending outbox rows", e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// A relay publishing this outbox's rows through `publisher`, woken by
    /// `LISTEN/NOTIFY`. Nothing runs until [`Relay::run`] or [`Relay::spawn`].
    ///
    /// # Errors
    ///
    /// An invalid `config`.
    pub fn relay(&self, publisher: Arc<dyn Publisher>, config: RelayConfig) -> Result<Relay> {
        config.validate()?;
        let id = config
            .relay_id
            .clone()
            .unwrap_or_else(|| format!("relay-{}", uuid::Uuid::now_v7()));
        Ok(Relay {
            id,
            store: Arc::new(PgRelayStore {
                pool: self.pool.clone(),
            }),
            wakeup: Box::new(PgWakeup {
                pool: self.pool.clone(),
                listener: None,
            }),
            publisher,
            config,
            lingering: std::sync::Mutex::default(),
        })
    }
}

#[derive(Debug)]
struct PgWakeup {
    pool: PgPool,
    listener: Option<PgListener>,
}

#[async_trait]
impl Wakeup for PgWakeup {
    async fn wait(&mut self, max: Duration) -> Wake {
        let started = tokio::time::Instant::now();
        if self.listener.is_none() {
            // Bounded by `max`, so a database that does not answer delays
            // no poll.
            let connect = async {
                let mut listener = PgListener::connect_with(&self.pool).await?;
                listener.listen(NOTIFY_CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            match tokio::time::timeout(max, connect).await {
                Ok(Ok(listener)) => self.listener = Some(listener),
                Ok(Err(e)) => warn!(error = %e, "no LISTEN connection; polling"),
                Err(_) => warn!("no LISTEN connection in time; polling"),
            }
        }
        let max = max.saturating_sub(started.elapsed());
        let Some(listener) = self.listener.as_mut() else {
            tokio::time::sleep(max).await;
            return Wake::Timeout;
        };
        match tokio::time::timeout(max, listener.recv()).await {
            Ok(Ok(_)) => {
                // One look at the tables serves every commit notified so far.
                while listener.next_buffered().is_some() {}
                Wake::Committed
            }
            Ok(Err(e)) => {
                warn!(error = %e, "LISTEN connection lost; reconnecting");
                self.listener = None;
                Wake::Timeout
            }
            Err(_) => Wake::Timeout,
        }
    }
}

#[derive(Debug)]
struct PgRelayStore {
    pool: PgPool,
}

impl PgRelayStore {
    /// Runs a look's statement ([`pg_look!`]) with its parameters.
    async fn look(
        &self,
        sql: &'static str,
        relay: &str,
        skip: &[i32],
        exclude: &[i64],
        limit: i64,
        operation: &'static str,
    ) -> Result<Vec<StoredRow>> {
        sqlx::query_as(sql)
            .bind(relay)
            .bind(skip)
            .bind(limit)
            .bind(exclude)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| Error::db(operation, e))
    }
}

#[async_trait]
impl RelayStore for PgRelayStore {
    async fn tick_leases(&self, relay: &str, ttl_ms: i64) -> Result<Vec<i32>> {
        let err = |e| Error::db("renew the partition leases", e);
        let mut tx = self.pool.begin().await.map_err(err)?;
        let now: i64 = sqlx::query_scalar(concat!("select ", now_ms!()))
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(
            "insert into orchestrator_outbox_relays (relay_id, expires_ms) values ($1, $2) \
             on conflict (relay_id) do update set expires_ms = excluded.expires_ms",
        )
        .bind(relay)
        .bind(now + ttl_ms)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        sqlx::query("delete from orchestrator_outbox_relays where expires_ms < $1")
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let live: i64 = sqlx::query_scalar("select count(*) from orchestrator_outbox_relays")
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        let total: i64 = sqlx::query_scalar("select count(*) from orchestrator_outbox_leases")
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        let target = (total + live.max(1) - 1) / live.max(1);
        let mut mine: Vec<i32> = sqlx::query_scalar(
            "update orchestrator_outbox_leases set expires_ms = $2 \
             where owner = $1 and expires_ms > $3 returning part",
        )
        .bind(relay)
        .bind(now + ttl_ms)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
        mine.sort_unstable();
        let held = i64::try_from(mine.len()).unwrap_or(i64::MAX);
        if held > target {
            let keep = usize::try_from(target).unwrap_or(0);
            let extra = mine.split_off(keep);
            sqlx::query(
                "update orchestrator_outbox_leases set owner = null, expires_ms = 0 \
                 where owner = $1 and part = any($2)",
            )
            .bind(relay)
            .bind(&extra)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        } else if held < target {
            let taken: Vec<i32> = sqlx::query_scalar(
                "update orchestrator_outbox_leases set owner = $1, expires_ms = $2 \
                 where part in (select part from orchestrator_outbox_leases \
                 where owner is null or expires_ms <= $3 order by part limit $4 \
                 for update skip locked) returning part",
            )
            .bind(relay)
            .bind(now + ttl_ms)
            .bind(now)
            .bind(target - held)
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
            mine.extend(taken);
            mine.sort_unstable();
        }
        tx.commit().await.map_err(err)?;
        Ok(mine)
    }

    async fn release(&self, relay: &str) -> Result<()> {
        let err = |e| Error::db("release the partition leases", e);
        let mut tx = self.pool.begin().await.map_err(err)?;
        sqlx::query(
            "update orchestrator_outbox_leases set owner = null, expires_ms = 0 where owner = $1",
        )
        .bind(relay)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        sqlx::query("delete from orchestrator_outbox_relays where relay_id = $1")
            .bind(relay)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)
    }

    async fn load_pending(
        &self,
        relay: &str,
        skip: &[i32],
        exclude: &[i64],
        limit: i64,
    ) -> Result<Vec<StoredRow>> {
        self.look(
            pg_look!("", ""),
            relay,
            skip,
            exclude,
            limit,
            "load pending outbox rows",
        )
        .await
    }

    fn finishes_in_load(&self) -> bool {
        true
    }

    async fn load_pending_finishing(
        &self,
        relay: &str,
        skip: &[i32],
        exclude: &[i64],
        keep: bool,
        limit: i64,
    ) -> Result<Vec<StoredRow>> {
        // The mark runs once, before the load, as the condition every row
        // of the look meets (a condition that names no row is checked
        // before the rows are read, whether or not there are any). It does
        // not change what the load sees (the statement's snapshot is taken
        // before it), which leaves the marked rows out by id.
        macro_rules! marking {
            ($keep:literal) => {
                pg_look!(
                    concat!(
                        "with ",
                        pg_no_wait!(),
                        ", marked as (",
                        pg_mark!("$4", $keep),
                        ") "
                    ),
                    " and (select marked from marked) is not null"
                )
            };
        }
        let sql = if keep {
            marking!("true")
        } else {
            marking!("false")
        };
        let operation = "mark outbox rows published and load pending ones";
        self.look(sql, relay, skip, exclude, limit, operation).await
    }

    async fn load_batch(&self, relay: &str, part: i32, limit: i64) -> Result<Vec<StoredRow>> {
        sqlx::query_as(concat!(
            "select o.part, o.id, o.topic, o.payload, ",
            now_ms!(),
            " - o.created_ms as age_ms from orchestrator_outbox o \
             where o.part = $1 and o.published_ms is null and o.failed_ms is null and exists ( \
             select 1 from orchestrator_outbox_leases l where l.part = $1 and l.owner = $2 \
             and l.expires_ms > ",
            now_ms!(),
            ") order by o.id limit $3"
        ))
        .bind(part)
        .bind(relay)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| Error::db("load an outbox batch", e))
    }

    async fn finish(&self, ids: &[i64], keep: bool) -> Result<()> {
        sqlx::query(concat!("with ", pg_no_wait!(), " ", pg_mark!("$1", "$2")))
            .bind(ids)
            .bind(keep)
            .execute(&self.pool)
            .await
            .map_err(|e| Error::db("mark outbox rows published", e))?;
        Ok(())
    }

    async fn park(&self, id: i64, error: &str) -> Result<()> {
        sqlx::query(concat!(
            "update orchestrator_outbox set failed_ms = ",
            now_ms!(),
            ", last_error = $2 where id = $1"
        ))
        .bind(id)
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(|e| Error::db("park an outbox row", e))?;
        Ok(())
    }

    async fn purge(&self, keep_ms: i64, limit: i64) -> Result<u64> {
        let done = sqlx::query(concat!(
            "delete from orchestrator_outbox where id in (select id from orchestrator_outbox \
             where published_ms is not null and published_ms < ",
            now_ms!(),
            " - $1 order by published_ms limit $2)"
        ))
        .bind(keep_ms)
        .bind(limit)
        .execute(&self.pool)
        .await
        .map_err(|e| Error::db("purge published outbox rows", e))?;
        Ok(done.rows_affected())
    }
}

impl Inbox<Postgres> {
    /// An inbox on a migrated PostgreSQL database (see [`migrate`]).
    pub fn postgres(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Runs `handler` for `event` as consumer `consumer`, unless that
    /// consumer already handled the event: the handler's effects (made on
    /// the connection it is given, inside the transaction) and the record of
    /// the event id commit together.
    ///
    /// A concurrent delivery of the same event waits for the first one's
    /// transaction and is then reported as a duplicate (or runs, if the first
    /// rolled back).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Handler`] with the handler's error (nothing was
    /// committed), or a database failure.
    pub async fn process<T, F>(
        &self,
        consumer: &str,
        event: &Event,
        handler: F,
    ) -> Result<Processed<T>>
    where
        T: Send,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, std::result::Result<T, BoxError>>
            + Send,
    {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| Error::db("begin an inbox transaction", e))?;
        let inserted = sqlx::query(concat!(
            "insert into orchestrator_inbox (consumer, event_id, processed_ms) values ($1, $2, ",
            now_ms!(),
            ")"
        ))
        .bind(consumer)
        .bind(event.id())
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                metrics::counter!("inbox_duplicates_total", "consumer" => consumer.to_owned())
                    .increment(1);
                return Ok(Processed::Duplicate);
            }
            Err(e) => return Err(Error::db("record an inbox event", e)),
        }
        let value = handler(&mut tx).await.map_err(|e| {
            Error::with_source(
                ErrorKind::Handler {
                    consumer: consumer.to_owned(),
                    event_id: event.id().to_owned(),
                },
                e,
            )
        })?;
        tx.commit()
            .await
            .map_err(|e| Error::db("commit an inbox transaction", e))?;
        metrics::counter!("inbox_handled_total", "consumer" => consumer.to_owned()).increment(1);
        Ok(Processed::Handled(value))
    }

    /// Deletes at most `limit` records of events handled more than
    /// `older_than` ago (every consumer); returns how many. An event
    /// delivered again after its record is gone is handled again, so keep
    /// records longer than the broker can redeliver (its retention).
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn purge(&self, older_than: Duration, limit: u64) -> Result<u64> {
        let done = sqlx::query(concat!(
            "delete from orchestrator_inbox where ctid in (select ctid from orchestrator_inbox \
             where processed_ms < ",
            now_ms!(),
            " - $1 order by processed_ms limit $2)"
        ))
        // Planned on each call, for the inbox as it is then: a plan cached
        // while the inbox was small would go on reading all of it.
        .persistent(false)
        .bind(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(|e| Error::db("purge inbox records", e))?;
        Ok(done.rows_affected())
    }

    /// Whether `consumer` already handled the event `event_id`.
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn contains(&self, consumer: &str, event_id: &str) -> Result<bool> {
        let found: Option<i32> = sqlx::query_scalar(
            "select 1 from orchestrator_inbox where consumer = $1 and event_id = $2",
        )
        .bind(consumer)
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| Error::db("look up an inbox event", e))?;
        Ok(found.is_some())
    }
}
