//! The SQLite statements of the SQL-table broker.
//!
//! WAL mode, a busy timeout, and `BEGIN IMMEDIATE` for every write: one
//! writer at a time, so row id order is commit order. Times are Unix seconds
//! from the database clock. Publishers wake the subscriptions of the same
//! process on the same file through a shared [`Notify`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row as _;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::Notify;

use super::config::{SqlConfig, config_error, redact_url};
use super::{Claimed, DeadLetter, Membership, NewRow, Pos, Store, StoredRow, Wake, db_error};
use crate::error::Result;
use crate::subscriber::StartFrom;

const SYSTEM: &str = "sqlite";

const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "broker tables",
    include_str!("../../migrations/sqlite/0001_broker_tables.sql"),
)];

/// Rows per `INSERT` statement (5 parameters each).
const INSERT_CHUNK: usize = 1000;

#[derive(Debug)]
pub(super) struct SqliteStore {
    pool: SqlitePool,
    notify: Arc<Notify>,
}

fn err(operation: &'static str) -> impl FnOnce(sqlx::Error) -> crate::Error {
    move |e| db_error(SYSTEM, operation, e)
}

/// The wake-up signal of each database file open in this process.
fn signal_for(path: PathBuf) -> Arc<Notify> {
    static SIGNALS: OnceLock<Mutex<HashMap<PathBuf, Weak<Notify>>>> = OnceLock::new();
    let mut signals = SIGNALS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    signals.retain(|_, weak| weak.strong_count() > 0);
    if let Some(notify) = signals.get(&path).and_then(Weak::upgrade) {
        return notify;
    }
    let notify = Arc::new(Notify::new());
    signals.insert(path, Arc::downgrade(&notify));
    notify
}

impl SqliteStore {
    pub(super) async fn connect(config: &SqlConfig) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(&config.url).map_err(|e| {
            config_error(
                "url",
                format!("`{}` is not a SQLite URL: {e}", redact_url(&config.url)),
            )
        })?;
        let path = options.get_filename().to_path_buf();
        let name = path.to_string_lossy();
        let in_memory = name.is_empty()
            || name.contains(":memory:")
            || name.contains("sqlx-in-memory")
            || config.url.contains(":memory:")
            || config.url.contains("mode=memory");
        if in_memory {
            return Err(config_error(
                "url",
                "an in-memory SQLite database is not durable and not shared between connections; name a file",
            ));
        }
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(config.busy_timeout)
            .foreign_keys(true);
        // Switching a new file to WAL needs it to itself for a moment, and
        // that step does not wait for the busy timeout: retry briefly.
        let mut attempt = 0;
        let pool = loop {
            // No ping when a connection is taken: it lives in this
            // process, and a ping is one more round trip to its thread.
            let connected = SqlitePoolOptions::new()
                .test_before_acquire(false)
                .max_connections(config.max_connections)
                .min_connections(0)
                .acquire_timeout(config.connect_timeout)
                .connect_with(options.clone())
                .await
                .map_err(err("connect"));
            match connected {
                Ok(pool) => break pool,
                Err(e) if e.is_retryable() && attempt < 10 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "SQLite busy while connecting; retrying");
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        };
        // Processes opening a new file at once race to record the first
        // migration; the loser finds it applied on the next try.
        let migrator = super::migrator(MIGRATIONS);
        let mut attempt = 0;
        loop {
            match migrator.run(&pool).await {
                Ok(()) => break,
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "SQLite migration failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => {
                    return Err(crate::Error::with_source(
                        crate::ErrorKind::Broker {
                            system: SYSTEM,
                            operation: "migrate",
                            retryable: false,
                        },
                        e,
                    ));
                }
            }
        }
        let key = std::fs::canonicalize(&path).unwrap_or(path);
        Ok(Self {
            pool,
            notify: signal_for(key),
        })
    }

    async fn begin(
        &self,
        operation: &'static str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(err(operation))
    }
}

/// The database clock in Unix seconds.
const NOW: &str = "((julianday('now') - 2440587.5) * 86400.0)";

#[async_trait]
impl Store for SqliteStore {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    async fn topic_partitions(&self, topic: &str, default: u32) -> Result<u32> {
        let mut tx = self.begin("create topic").await?;
        sqlx::query("INSERT OR IGNORE INTO broker_topics (topic, partitions) VALUES (?1, ?2)")
            .bind(topic)
            .bind(i64::from(default))
            .execute(&mut *tx)
            .await
            .map_err(err("create topic"))?;
        let n: i64 = sqlx::query_scalar("SELECT partitions FROM broker_topics WHERE topic = ?1")
            .bind(topic)
            .fetch_one(&mut *tx)
            .await
            .map_err(err("read topic"))?;
        tx.commit().await.map_err(err("create topic"))?;
        Ok(u32::try_from(n).unwrap_or(1).max(1))
    }

    async fn insert(&self, topic: &str, rows: &[NewRow]) -> Result<()> {
        let mut tx = self.begin("publish").await?;
        for chunk in rows.chunks(INSERT_CHUNK) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO broker_events (topic, partition, partition_key, event_id, payload) ",
            );
            insert.push_values(chunk, |mut values, row| {
                values
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
        tx.commit().await.map_err(err("publish commit"))?;
        self.notify.notify_waiters();
        Ok(())
    }

    async fn dead_letter(&self, letter: DeadLetter<'_>) -> Result<()> {
        let mut tx = self.begin("dead-letter").await?;
        sqlx::query(
            "INSERT OR IGNORE INTO broker_events \
             (topic, partition, partition_key, event_id, payload, dlq_reason, origin_topic, origin_seq) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
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
        tx.commit().await.map_err(err("dead-letter commit"))?;
        self.notify.notify_waiters();
        Ok(())
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
             WHERE topic = ?1 AND partition = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4",
        )
        .bind(topic)
        .bind(partition)
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
        let mut tx = self.begin("create consumer group").await?;
        for partition in 0..i64::from(partitions) {
            sqlx::query(
                "INSERT OR IGNORE INTO broker_partitions (grp, topic, partition, cursor_xid, cursor_seq) \
                 VALUES (?1, ?2, ?3, 0, \
                         CASE WHEN ?4 THEN (SELECT COALESCE(MAX(seq), 0) FROM broker_events) ELSE 0 END)",
            )
            .bind(group)
            .bind(topic)
            .bind(partition)
            .bind(matches!(start, StartFrom::Latest))
            .execute(&mut *tx)
            .await
            .map_err(err("create consumer group"))?;
        }
        tx.commit().await.map_err(err("create consumer group"))
    }

    async fn heartbeat(&self, who: Membership<'_>, lease: Duration) -> Result<Vec<String>> {
        let mut tx = self.begin("heartbeat").await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO broker_members (grp, topic, member, expires_at) \
             VALUES (?1, ?2, ?3, {NOW} + ?4) \
             ON CONFLICT (grp, topic, member) DO UPDATE SET expires_at = excluded.expires_at"
        )))
        .bind(who.group)
        .bind(who.topic)
        .bind(who.member)
        .bind(lease.as_secs_f64())
        .execute(&mut *tx)
        .await
        .map_err(err("heartbeat"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM broker_members WHERE grp = ?1 AND topic = ?2 AND expires_at < {NOW}"
        )))
        .bind(who.group)
        .bind(who.topic)
        .execute(&mut *tx)
        .await
        .map_err(err("heartbeat"))?;
        let members = sqlx::query_scalar(
            "SELECT member FROM broker_members WHERE grp = ?1 AND topic = ?2 ORDER BY member",
        )
        .bind(who.group)
        .bind(who.topic)
        .fetch_all(&mut *tx)
        .await
        .map_err(err("heartbeat"))?;
        tx.commit().await.map_err(err("heartbeat"))?;
        Ok(members)
    }

    async fn renew(&self, who: Membership<'_>, lease: Duration) -> Result<Vec<i32>> {
        let mut tx = self.begin("renew leases").await?;
        let owned = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "UPDATE broker_partitions SET lease_expires_at = {NOW} + ?4 \
             WHERE grp = ?1 AND topic = ?2 AND owner = ?3 RETURNING partition"
        )))
        .bind(who.group)
        .bind(who.topic)
        .bind(who.member)
        .bind(lease.as_secs_f64())
        .fetch_all(&mut *tx)
        .await
        .map_err(err("renew leases"))?;
        tx.commit().await.map_err(err("renew leases"))?;
        Ok(owned)
    }

    async fn claim(
        &self,
        who: Membership<'_>,
        partition: i32,
        lease: Duration,
    ) -> Result<Option<Claimed>> {
        let mut tx = self.begin("claim partition").await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE broker_partitions SET owner = ?4, lease_expires_at = {NOW} + ?5 \
             WHERE grp = ?1 AND topic = ?2 AND partition = ?3 \
               AND (owner IS NULL OR owner = ?4 OR lease_expires_at < {NOW}) \
             RETURNING cursor_xid, cursor_seq, settled"
        )))
        .bind(who.group)
        .bind(who.topic)
        .bind(partition)
        .bind(who.member)
        .bind(lease.as_secs_f64())
        .fetch_optional(&mut *tx)
        .await
        .map_err(err("claim partition"))?;
        let claimed = row
            .map(|row| {
                Ok(Claimed {
                    cursor: Pos {
                        xid: row.try_get("cursor_xid")?,
                        seq: row.try_get("cursor_seq")?,
                    },
                    settled: row.try_get("settled")?,
                })
            })
            .transpose()
            .map_err(err("claim partition"))?;
        tx.commit().await.map_err(err("claim partition"))?;
        Ok(claimed)
    }

    async fn commit(
        &self,
        who: Membership<'_>,
        partition: i32,
        cursor: Pos,
        settled: &str,
        release: bool,
    ) -> Result<bool> {
        let mut tx = self.begin("commit").await?;
        let done = sqlx::query(
            "UPDATE broker_partitions \
             SET cursor_xid = ?5, cursor_seq = ?6, settled = ?7, \
                 owner = CASE WHEN ?8 THEN NULL ELSE owner END, \
                 lease_expires_at = CASE WHEN ?8 THEN NULL ELSE lease_expires_at END \
             WHERE grp = ?1 AND topic = ?2 AND partition = ?3 AND owner = ?4",
        )
        .bind(who.group)
        .bind(who.topic)
        .bind(partition)
        .bind(who.member)
        .bind(cursor.xid)
        .bind(cursor.seq)
        .bind(settled)
        .bind(release)
        .execute(&mut *tx)
        .await
        .map_err(err("commit"))?;
        tx.commit().await.map_err(err("commit"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn leave(&self, who: Membership<'_>) -> Result<()> {
        let mut tx = self.begin("leave").await?;
        sqlx::query(
            "UPDATE broker_partitions SET owner = NULL, lease_expires_at = NULL \
             WHERE grp = ?1 AND topic = ?2 AND owner = ?3",
        )
        .bind(who.group)
        .bind(who.topic)
        .bind(who.member)
        .execute(&mut *tx)
        .await
        .map_err(err("leave"))?;
        sqlx::query("DELETE FROM broker_members WHERE grp = ?1 AND topic = ?2 AND member = ?3")
            .bind(who.group)
            .bind(who.topic)
            .bind(who.member)
            .execute(&mut *tx)
            .await
            .map_err(err("leave"))?;
        tx.commit().await.map_err(err("leave"))
    }

    async fn wake(&self, _topic: &str) -> Result<Wake> {
        Ok(Wake {
            notify: Arc::clone(&self.notify),
        })
    }

    async fn prune(&self, older_than: Duration) -> Result<u64> {
        let mut tx = self.begin("prune").await?;
        let deleted = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM broker_events AS e \
             WHERE e.published_at < {NOW} - ?1 \
               AND e.dlq_reason IS NULL \
               AND NOT EXISTS ( \
                   SELECT 1 FROM broker_partitions p \
                   WHERE p.topic = e.topic AND p.partition = e.partition \
                     AND (p.cursor_xid, p.cursor_seq) < (e.xid, e.seq))"
        )))
        .bind(older_than.as_secs_f64())
        .execute(&mut *tx)
        .await
        .map_err(err("prune"))?;
        tx.commit().await.map_err(err("prune"))?;
        Ok(deleted.rows_affected())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
