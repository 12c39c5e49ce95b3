//! Raw database write rates, the baselines of the outbox benchmarks: rows of
//! the outbox's shape (id, topic, key, ~1 KiB event) written with plain sqlx,
//! in batches and one row per commit.

use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};
use uuid::Uuid;

/// Rows per batched INSERT, and per transaction.
pub(crate) const BATCH: usize = 500;

/// Raw rates measured on one database.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawRates {
    /// Rows per second inserted `BATCH` at a time, one transaction per batch.
    pub(crate) batched: f64,
    /// Rows per second inserted one per transaction, one connection.
    pub(crate) single: f64,
}

fn rate(rows: usize, took: Duration) -> f64 {
    rows as f64 / took.as_secs_f64().max(1e-9)
}

fn payload(size: usize) -> Vec<u8> {
    serde_json::to_vec(&crate::payload(size)).unwrap_or_default()
}

/// A pool on a fresh schema of the benchmark database.
pub(crate) async fn pg_pool(url: &str, schema: &str) -> anyhow::Result<PgPool> {
    let admin = PgPoolOptions::new().max_connections(1).connect(url).await?;
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    let options: PgConnectOptions = url.parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(16)
        .connect_with(options.options([("search_path", schema)]))
        .await?)
}

/// Drops a schema made by [`pg_pool`].
pub(crate) async fn pg_drop(url: &str, schema: &str) -> anyhow::Result<()> {
    let admin = PgPoolOptions::new().max_connections(1).connect(url).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&admin)
    .await?;
    admin.close().await;
    Ok(())
}

/// Postgres: `rows` batched, then `single` rows one commit each.
pub(crate) async fn postgres(
    pool: &PgPool,
    rows: usize,
    single: usize,
    size: usize,
) -> anyhow::Result<RawRates> {
    sqlx::query(
        "CREATE TABLE raw_rows (id uuid PRIMARY KEY, topic text NOT NULL, \
         key text, event bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(pool)
    .await?;
    let data = payload(size);
    let start = Instant::now();
    let mut done = 0;
    while done < rows {
        let n = BATCH.min(rows - done);
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
        let keys: Vec<String> = (done..done + n).map(crate::key).collect();
        let events: Vec<Vec<u8>> = vec![data.clone(); n];
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO raw_rows (id, topic, key, event) \
             SELECT id, 'bench', key, event FROM UNNEST($1::uuid[], $2::text[], $3::bytea[]) AS t(id, key, event)",
        )
        .bind(&ids)
        .bind(&keys)
        .bind(&events)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        done += n;
    }
    let batched = rate(rows, start.elapsed());

    let start = Instant::now();
    for i in 0..single {
        sqlx::query("INSERT INTO raw_rows (id, topic, key, event) VALUES ($1, 'bench', $2, $3)")
            .bind(Uuid::now_v7())
            .bind(crate::key(i))
            .bind(&data)
            .execute(pool)
            .await?;
    }
    let single = rate(single, start.elapsed());
    Ok(RawRates { batched, single })
}

/// A pool on a fresh SQLite file, with the settings the stores use: WAL,
/// `synchronous=NORMAL`, a busy timeout.
pub(crate) async fn sqlite_pool(path: &std::path::Path) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10));
    Ok(SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?)
}

/// SQLite: `rows` batched, then `single` rows one commit each.
pub(crate) async fn sqlite(
    pool: &SqlitePool,
    rows: usize,
    single: usize,
    size: usize,
) -> anyhow::Result<RawRates> {
    sqlx::query(
        "CREATE TABLE raw_rows (id BLOB PRIMARY KEY, topic TEXT NOT NULL, \
         key TEXT, event BLOB NOT NULL, created_at REAL NOT NULL DEFAULT (unixepoch('subsec')))",
    )
    .execute(pool)
    .await?;
    let data = payload(size);
    let start = Instant::now();
    let mut done = 0;
    while done < rows {
        let n = BATCH.min(rows - done);
        let mut tx = pool.begin().await?;
        // One statement per row inside the transaction: SQLite's prepared
        // statement is cached, and a batch commits once.
        for i in done..done + n {
            sqlx::query("INSERT INTO raw_rows (id, topic, key, event) VALUES (?, 'bench', ?, ?)")
                .bind(Uuid::now_v7())
                .bind(crate::key(i))
                .bind(&data)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        done += n;
    }
    let batched = rate(rows, start.elapsed());

    let start = Instant::now();
    for i in 0..single {
        sqlx::query("INSERT INTO raw_rows (id, topic, key, event) VALUES (?, 'bench', ?, ?)")
            .bind(Uuid::now_v7())
            .bind(crate::key(i))
            .bind(&data)
            .execute(pool)
            .await?;
    }
    let single = rate(single, start.elapsed());
    Ok(RawRates { batched, single })
}
