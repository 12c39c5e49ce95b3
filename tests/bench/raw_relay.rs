//! A relay written with the raw clients, the floor beside which the outbox
//! relay's rate is read: it reads committed rows of the outbox's shape in
//! id order, publishes them through raw rdkafka or raw async-nats with the
//! same acknowledgement settings as the adapters, and deletes them once
//! acknowledged.
//!
//! It does the least a relay can do and still lose nothing: one relay, so no
//! leases and no partitions; rows ordered by id alone (no commit-order
//! care); the stored bytes sent as they are (no CloudEvent decoded or
//! encoded); the next batch read while the current one is published, and
//! deletes (one range per batch) run beside the next batch.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures_util::future::try_join_all;
use futures_util::stream::FuturesUnordered;
use futures_util::{StreamExt as _, TryStreamExt as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{PgPool, SqlitePool};

/// Rows read per batch (the outbox relay's batch size in the benchmark).
const BATCH: i64 = 500;
/// JetStream publish acks kept in flight (as in the NATS benchmark).
const WINDOW: usize = 256;

/// The raw client a relay publishes through.
pub(crate) enum Sink {
    /// rdkafka with `acks=all` and idempotence.
    Kafka(FutureProducer),
    /// JetStream publishes, each acknowledged, `Nats-Msg-Id` set.
    Nats(Box<jetstream::Context>),
}

impl Sink {
    pub(crate) fn kafka() -> anyhow::Result<Self> {
        Ok(Self::Kafka(
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", e2e::kafka_bootstrap_servers())
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set("linger.ms", "2")
                .create()?,
        ))
    }

    pub(crate) async fn nats() -> anyhow::Result<Self> {
        let client = async_nats::connect(e2e::nats_url()).await?;
        Ok(Self::Nats(Box::new(jetstream::new(client))))
    }

    /// Makes sure `topic` can be published to: a file stream for NATS (as
    /// the adapter provisions), nothing for Kafka (created on first use, as
    /// the adapter's topic is).
    async fn prepare(&self, topic: &str) -> anyhow::Result<()> {
        if let Self::Nats(js) = self {
            js.get_or_create_stream(jetstream::stream::Config {
                name: format!("BENCH_RAWRELAY_{}", topic.replace(['.', '-'], "_")),
                subjects: vec![topic.to_owned()],
                storage: jetstream::stream::StorageType::File,
                max_age: Duration::from_secs(600),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("create the raw relay's stream: {e}"))?;
        }
        Ok(())
    }

    /// Publishes `rows` in order and waits for every acknowledgement.
    async fn publish(&self, topic: &str, rows: Vec<Row>) -> anyhow::Result<()> {
        match self {
            Self::Kafka(producer) => {
                let mut acks = Vec::with_capacity(rows.len());
                for (_, key, event) in &rows {
                    let mut record = FutureRecord::to(topic).key(key).payload(event);
                    loop {
                        match producer.send_result(record) {
                            Ok(ack) => break acks.push(ack),
                            Err((
                                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                                r,
                            )) => {
                                record = r;
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                            Err((e, _)) => return Err(e.into()),
                        }
                    }
                }
                for ack in try_join_all(acks).await? {
                    ack.map_err(|(e, _)| e)?;
                }
            }
            Self::Nats(js) => {
                let mut acks = FuturesUnordered::new();
                for (id, _, event) in rows {
                    if acks.len() >= WINDOW {
                        acks.try_next().await?;
                    }
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.to_string().as_str());
                    let ack = js
                        .publish_with_headers(topic.to_owned(), headers, event.into())
                        .await?;
                    acks.push(ack.into_future());
                }
                while acks.next().await.transpose()?.is_some() {}
            }
        }
        Ok(())
    }
}

/// A row: id, partition key, stored event bytes.
type Row = (i64, String, Vec<u8>);

/// The table the raw relay drains, on either database.
#[derive(Clone)]
pub(crate) enum Table {
    Pg(PgPool),
    Lite(SqlitePool),
}

impl Table {
    async fn create(&self) -> anyhow::Result<()> {
        match self {
            Self::Pg(pool) => {
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS bench_raw_relay (id bigserial PRIMARY KEY, \
                     topic text NOT NULL, key text NOT NULL, event bytea NOT NULL)",
                )
                .execute(pool)
                .await?;
            }
            Self::Lite(pool) => {
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS bench_raw_relay (id INTEGER PRIMARY KEY, \
                     topic TEXT NOT NULL, key TEXT NOT NULL, event BLOB NOT NULL)",
                )
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Commits `n` rows of `size` bytes, 500 per transaction.
    async fn fill(&self, n: usize, size: usize) -> anyhow::Result<()> {
        let data = serde_json::to_vec(&crate::payload(size))?;
        let mut done = 0;
        while done < n {
            let m = crate::raw_sql::BATCH.min(n - done);
            let keys: Vec<String> = (done..done + m).map(crate::key).collect();
            match self {
                Self::Pg(pool) => {
                    let events = vec![data.clone(); m];
                    sqlx::query(
                        "INSERT INTO bench_raw_relay (topic, key, event) SELECT 'bench', key, event \
                         FROM UNNEST($1::text[], $2::bytea[]) AS t(key, event)",
                    )
                    .bind(&keys)
                    .bind(&events)
                    .execute(pool)
                    .await?;
                }
                Self::Lite(pool) => {
                    let mut tx = pool.begin().await?;
                    for key in &keys {
                        sqlx::query(
                            "INSERT INTO bench_raw_relay (topic, key, event) VALUES ('bench', ?, ?)",
                        )
                        .bind(key)
                        .bind(&data)
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await?;
                }
            }
            done += m;
        }
        Ok(())
    }

    /// The next batch of rows after id `after`, in id order.
    async fn next(&self, after: i64) -> anyhow::Result<Vec<Row>> {
        Ok(match self {
            Self::Pg(pool) => {
                sqlx::query_as(
                    "SELECT id, key, event FROM bench_raw_relay WHERE id > $1 ORDER BY id LIMIT $2",
                )
                .bind(after)
                .bind(BATCH)
                .fetch_all(pool)
                .await?
            }
            Self::Lite(pool) => {
                sqlx::query_as(
                    "SELECT id, key, event FROM bench_raw_relay WHERE id > ? ORDER BY id LIMIT ?",
                )
                .bind(after)
                .bind(BATCH)
                .fetch_all(pool)
                .await?
            }
        })
    }

    /// Deletes the rows with ids in `from..=to`.
    async fn delete(self, from: i64, to: i64) -> anyhow::Result<()> {
        match self {
            Self::Pg(pool) => {
                sqlx::query("DELETE FROM bench_raw_relay WHERE id BETWEEN $1 AND $2")
                    .bind(from)
                    .bind(to)
                    .execute(&pool)
                    .await?;
            }
            Self::Lite(pool) => {
                sqlx::query("DELETE FROM bench_raw_relay WHERE id BETWEEN ? AND ?")
                    .bind(from)
                    .bind(to)
                    .execute(&pool)
                    .await?;
            }
        }
        Ok(())
    }

    async fn count(&self) -> anyhow::Result<i64> {
        Ok(match self {
            Self::Pg(pool) => {
                sqlx::query_scalar("SELECT count(*) FROM bench_raw_relay")
                    .fetch_one(pool)
                    .await?
            }
            Self::Lite(pool) => {
                sqlx::query_scalar("SELECT count(*) FROM bench_raw_relay")
                    .fetch_one(pool)
                    .await?
            }
        })
    }
}

/// Commits `n` rows, then times the raw relay publishing all of them to
/// `topic` through `sink` and deleting them.
pub(crate) async fn drain(
    table: &Table,
    sink: &Sink,
    topic: &str,
    n: usize,
    size: usize,
) -> anyhow::Result<Duration> {
    table.create().await?;
    sink.prepare(topic).await?;
    table.fill(n, size).await?;
    let cpu = crate::cpu_time();
    let start = Instant::now();
    let mut deletes = tokio::task::JoinSet::new();
    let mut published = 0;
    let mut rows = table.next(0).await?;
    while let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        let (first, last, count) = (first.0, last.0, rows.len());
        let (sent, next) = tokio::join!(sink.publish(topic, rows), table.next(last));
        sent?;
        published += count;
        deletes.spawn(table.clone().delete(first, last));
        rows = next?;
    }
    while let Some(done) = deletes.join_next().await {
        done??;
    }
    let took = start.elapsed();
    crate::report_cpu("raw relay", cpu, n);
    anyhow::ensure!(
        published == n,
        "the raw relay published {published} of {n} rows"
    );
    anyhow::ensure!(table.count().await? == 0, "the raw relay left rows behind");
    Ok(took)
}
