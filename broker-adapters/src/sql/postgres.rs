//! The PostgreSQL statements of the SQL-table broker.
//!
//! Rows carry `pg_current_xact_id()`; readers take only rows of finished
//! transactions (`xid < pg_snapshot_xmin(pg_current_snapshot())`) in
//! `(xid, seq)` order. Leases use the database clock (`clock_timestamp()`).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Executor as _, QueryBuilder, Row as _};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::config::{SqlConfig, config_error, redact_url};
use super::{Claimed, DeadLetter, Membership, NewRow, Pos, Store, StoredRow, Wake, db_error};
use crate::error::Result;
use crate::subscriber::StartFrom;

const SYSTEM: &str = "postgres";

const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "broker tables",
    include_str!("../../migrations/postgres/0001_broker_tables.sql"),
)];

/// Rows per `INSERT` statement (6 parameters each, under the 65535 limit).
const INSERT_CHUNK: usize = 1000;

/// The expression of the inserting transaction's id.
const XID: &str = "pg_current_xact_id()::text::bigint";

#[derive(Debug)]
pub(super) struct PgStore {
    pool: PgPool,
    channel: String,
    hub: Arc<Hub>,
    /// The one `LISTEN` connection of this pool, started by the first
    /// subscription.
    listener: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(task) = self.listener.get_mut().take() {
            task.abort();
        }
    }
}

/// Routes notifications to the subscriptions of their topic.
#[derive(Debug, Default)]
struct Hub {
    topics: Mutex<HashMap<String, Vec<Weak<Notify>>>>,
}

impl Hub {
    fn register(&self, topic: &str) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        self.lock()
            .entry(topic.to_owned())
            .or_default()
            .push(Arc::downgrade(&notify));
        notify
    }

    fn wake(&self, topic: Option<&str>) {
        let mut topics = self.lock();
        topics.retain(|name, waiters| {
            waiters.retain(|w| w.strong_count() > 0);
            if topic.is_none_or(|t| t == name) {
                for waiter in waiters.iter().filter_map(Weak::upgrade) {
                    waiter.notify_one();
                }
            }
            !waiters.is_empty()
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Weak<Notify>>>> {
        self.topics.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn err(operation: &'static str) -> impl FnOnce(sqlx::Error) -> crate::Error {
    move |e| db_error(SYSTEM, operation, e)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl PgStore {
    pub(super) async fn connect(config: &SqlConfig) -> Result<Self> {
        let mut options = PgConnectOptions::from_str(&config.url).map_err(|e| {
            config_error(
                "url",
                format!("`{}` is not a PostgreSQL URL: {e}", redact_url(&config.url)),
            )
        })?;
        if let Some(schema) = &config.schema {
            // Create the schema on a connection that does not need it yet.
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(config.connect_timeout)
                .connect_with(options.clone())
                .await
                .map_err(err("connect"))?;
            let created = pool
                .execute(sqlx::AssertSqlSafe(format!(
                    "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
                )))
                .await;
            pool.close().await;
            if let Err(e) = created {
                // Concurrent creators race on the catalog; the schema exists.
                if !matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505")) {
                    return Err(db_error(SYSTEM, "create schema", e));
                }
            }
            options = options.options([("search_path", schema.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(0)
            .acquire_timeout(config.connect_timeout)
            .connect_with(options)
            .await
            .map_err(err("connect"))?;
        super::migrator(MIGRATIONS).run(&pool).await.map_err(|e| {
            crate::Error::with_source(
                crate::ErrorKind::Broker {
                    system: SYSTEM,
                    operation: "migrate",
                    retryable: false,
                },
                e,
            )
        })?;
        let mut channel = format!(
            "broker_events_{}",
            config.schema.as_deref().unwrap_or("public")
        );
        channel.truncate(63);
        Ok(Self {
            pool,
            channel,
            hub: Arc::default(),
            listener: tokio::sync::Mutex::new(None),
        })
    }
}

#[async_trait]
impl Store for PgStore {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    async fn topic_partitions(&self, topic: &str, default: u32) -> Result<u32> {
        sqlx::query(
            "INSERT INTO broker_topics (topic, partitions) VALUES ($1, $2) \
             ON CONFLICT (topic) DO NOTHING",
        )
        .bind(topic)
        .bind(i32::try_from(default).unwrap_or(i32::MAX))
        .execute(&self.pool)
        .await
        .map_err(err("create topic"))?;
        let n: i32 = sqlx::query_scalar("SELECT partitions FROM broker_topics WHERE topic = $1")
            .bind(topic)
            .fetch_one(&self.pool)
            .await
            .map_err(err("read topic"))?;
        Ok(u32::try_from(n).unwrap_or(1).max(1))
    }

    async fn insert(&self, topic: &str, rows: &[NewRow]) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(err("publish"))?;
        for chunk in rows.chunks(INSERT_CHUNK) {
            let mut insert = QueryBuilder::new(
                "INSERT INTO broker_events (xid, topic, partition, partition_key, event_id, payload) ",
            );
            insert.push_values(chunk, |mut values, row| {
                values
                    .push(XID)
                    .push_bind(topic)
                    .push_bind(row.partition)
                    .push_bind(row.key.as_deref())
                    .push_bind(row.event_id.as_str())
                    .push_bind(row.payload.as_slice());
            });
            insert
                .build()
                .execute(&mut *tx)
                .await
                .map_err(err("publish"))?;
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.channel)
            .bind(topic)
            .execute(&mut *tx)
            .await
            .map_err(err("publish"))?;
        tx.commit().await.map_err(err("publish commit"))
    }

    async fn dead_letter(&self, letter: DeadLetter<'_>) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(err("dead-letter"))?;
        sqlx::query(
            "INSERT INTO broker_events \
             (xid, topic, partition, partition_key, event_id, payload, dlq_reason, origin_topic, origin_seq) \
             VALUES (pg_current_xact_id()::text::bigint, $1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT DO NOTHING",
        )
        .bind(letter.topic)
        .bind(letter.partition)
        .bind(letter.row.key.as_deref())
        .bind(letter.row.event_id.as_str())
        .bind(letter.row.payload.as_slice())
        .bind(letter.reason)
        .bind(letter.origin_topic)
        .bind(letter.row.pos.seq)
        .execute(&mut *tx)
        .await
        .map_err(err("dead-letter"))?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.channel)
            .bind(letter.topic)
            .execute(&mut *tx)
            .await
            .map_err(err("dead-letter"))?;
        tx.commit().await.map_err(err("dead-letter commit"))
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: i32,
        after: Pos,
        limit: u32,
    ) -> Result<Vec<StoredRow>> {
        let rows = sqlx::query(
            "SELECT xid, seq, partition, partition_key, event_id, payload FROM broker_events \
             WHERE topic = $1 AND partition = $2 AND (xid, seq) > ($3, $4) \
               AND xid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint \
             ORDER BY xid, seq LIMIT $5",
        )
        .bind(topic)
        .bind(partition)
        .bind(after.xid)
        .bind(after.seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(err("read events"))?;
        rows.into_iter()
            .map(|row| {
                Ok(StoredRow {
                    pos: Pos {
                        xid: row.try_get("xid")?,
                        seq: row.try_get("seq")?,
                    },
                    partition: row.try_get("partition")?,
                    key: row.try_get("partition_key")?,
                    event_id: row.try_get("event_id")?,
                    payload: row.try_get("payload")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(err("read events"))
    }

    async fn init_partitions(
        &self,
        group: &str,
        topic: &str,
        partitions: u32,
        start: StartFrom,
    ) -> Result<()> {
        // Latest: every transaction below the snapshot's xmin has finished,
        // so the cursor (xmin - 1, max) passes what they wrote. Rows of
        // younger transactions that have committed already (out of xid
        // order, while an older one is still open) are listed as settled,
        // so they are skipped too; rows of transactions still open are not
        // visible here, so they are delivered once they commit.
        sqlx::query(
            "INSERT INTO broker_partitions (grp, topic, partition, cursor_xid, cursor_seq, settled) \
             SELECT $1, $2, p, c.xid, c.seq, \
                    CASE WHEN $4 THEN coalesce((SELECT string_agg(e.xid || ':' || e.seq, ',' ORDER BY e.xid, e.seq) \
                        FROM (SELECT xid, seq FROM broker_events \
                              WHERE topic = $2 AND partition = p AND xid > c.xid \
                              ORDER BY xid, seq LIMIT $5) AS e), '') \
                    ELSE '' END \
             FROM generate_series(0, $3 - 1) AS p, \
                  (SELECT CASE WHEN $4 THEN pg_snapshot_xmin(pg_current_snapshot())::text::bigint - 1 ELSE 0 END AS xid, \
                          CASE WHEN $4 THEN 9223372036854775807 ELSE 0 END AS seq) AS c \
             ON CONFLICT DO NOTHING",
        )
        .bind(group)
        .bind(topic)
        .bind(i32::try_from(partitions).unwrap_or(i32::MAX))
        .bind(matches!(start, StartFrom::Latest))
        .bind(i64::try_from(super::subscriber::MAX_SETTLED_LIST).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(err("create consumer group"))?;
        Ok(())
    }

    async fn heartbeat(&self, who: Membership<'_>, lease: Duration) -> Result<Vec<String>> {
        sqlx::query(
            "INSERT INTO broker_members (grp, topic, member, expires_at) \
             VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4)) \
             ON CONFLICT (grp, topic, member) DO UPDATE SET expires_at = EXCLUDED.expires_at",
        )
        .bind(who.group)
        .bind(who.topic)
        .bind(who.member)
        .bind(secs(lease))
        .execute(&self.pool)
        .await
        .map_err(err("heartbeat"))?;
        sqlx::query(
            "DELETE FROM broker_members \
             WHERE grp = $1 AND topic = $2 AND expires_at < clock_timestamp()",
        )
        .bind(who.group)
        .bind(who.topic)
        .execute(&self.pool)
        .await
        .map_err(err("heartbeat"))?;
        sqlx::query_scalar(
            "SELECT member FROM broker_members WHERE grp = $1 AND topic = $2 ORDER BY member",
        )
        .bind(who.group)
        .bind(who.topic)
        .fetch_all(&self.pool)
        .await
        .map_err(err("heartbeat"))
    }

    async fn renew(&self, who: Membership<'_>, lease: Duration) -> Result<Vec<i32>> {
        sqlx::query_scalar(
            "UPDATE broker_partitions \
             SET lease_expires_at = clock_timestamp() + make_interval(secs => $4) \
             WHERE grp = $1 AND topic = $2 AND owner = $3 RETURNING partition",
        )
        .bind(who.group)
        .bind(who.topic)
        .bind(who.member)
        .bind(secs(lease))
        .fetch_all(&self.pool)
        .await
        .map_err(err("renew leases"))
    }

    async fn claim(
        &self,
        who: Membership<'_>,
        partition: i32,
        lease: Duration,
    ) -> Result<Option<Claimed>> {
        let row = sqlx::query(
            "UPDATE broker_partitions \
             SET owner = $4, lease_expires_at = clock_timestamp() + make_interval(secs => $5) \
             WHERE grp = $1 AND topic = $2 AND partition = $3 \
               AND (owner IS NULL OR owner = $4 OR lease_expires_at < clock_timestamp()) \
             RETURNING cursor_xid, cursor_seq, settled",
        )
        .bind(who.group)
        .bind(who.topic)
        .bind(partition)
        .bind(who.member)
        .bind(secs(lease))
        .fetch_optional(&self.pool)
        .await
        .map_err(err("claim partition"))?;
        row.map(|row| {
            Ok(Claimed {
                cursor: Pos {
                    xid: row.try_get("cursor_xid")?,
                    seq: row.try_get("cursor_seq")?,
                },
                settled: row.try_get("settled")?,
            })
        })
        .transpose()
        .map_err(err("claim partition"))
    }

    async fn commit(
        &self,
        who: Membership<'_>,
        partition: i32,
        cursor: Pos,
        settled: &str,
        release: bool,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE broker_partitions \
             SET cursor_xid = $5, cursor_seq = $6, settled = $7, \
                 owner = CASE WHEN $8 THEN NULL ELSE owner END, \
                 lease_expires_at = CASE WHEN $8 THEN NULL ELSE lease_expires_at END \
             WHERE grp = $1 AND topic = $2 AND partition = $3 AND owner = $4",
        )
        .bind(who.group)
        .bind(who.topic)
        .bind(partition)
        .bind(who.member)
        .bind(cursor.xid)
        .bind(cursor.seq)
        .bind(settled)
        .bind(release)
        .execute(&self.pool)
        .await
        .map_err(err("commit"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn leave(&self, who: Membership<'_>) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(err("leave"))?;
        sqlx::query(
            "UPDATE broker_partitions SET owner = NULL, lease_expires_at = NULL \
             WHERE grp = $1 AND topic = $2 AND owner = $3",
        )
        .bind(who.group)
        .bind(who.topic)
        .bind(who.member)
        .execute(&mut *tx)
        .await
        .map_err(err("leave"))?;
        sqlx::query("DELETE FROM broker_members WHERE grp = $1 AND topic = $2 AND member = $3")
            .bind(who.group)
            .bind(who.topic)
            .bind(who.member)
            .execute(&mut *tx)
            .await
            .map_err(err("leave"))?;
        tx.commit().await.map_err(err("leave"))
    }

    async fn wake(&self, topic: &str) -> Result<Wake> {
        let mut task = self.listener.lock().await;
        if task.as_ref().is_none_or(JoinHandle::is_finished) {
            let mut listener = PgListener::connect_with(&self.pool)
                .await
                .map_err(err("listen"))?;
            listener
                .listen(&self.channel)
                .await
                .map_err(err("listen"))?;
            let hub = Arc::clone(&self.hub);
            *task = Some(tokio::spawn(async move {
                loop {
                    match listener.recv().await {
                        Ok(n) => hub.wake(Some(n.payload())),
                        Err(sqlx::Error::PoolClosed) => break,
                        Err(e) => {
                            // The listener reconnects on the next call;
                            // polling covers what was missed meanwhile.
                            tracing::debug!(error = %e, "LISTEN connection lost; reconnecting");
                            hub.wake(None);
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }));
        }
        Ok(Wake {
            notify: self.hub.register(topic),
        })
    }

    async fn prune(&self, older_than: Duration) -> Result<u64> {
        let deleted = sqlx::query(
            "DELETE FROM broker_events e \
             WHERE e.published_at < now() - make_interval(secs => $1) \
               AND e.dlq_reason IS NULL \
               AND NOT EXISTS ( \
                   SELECT 1 FROM broker_partitions p \
                   WHERE p.topic = e.topic AND p.partition = e.partition \
                     AND (p.cursor_xid, p.cursor_seq) < (e.xid, e.seq))",
        )
        .bind(secs(older_than))
        .execute(&self.pool)
        .await
        .map_err(err("prune"))?;
        Ok(deleted.rows_affected())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
