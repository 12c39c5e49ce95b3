//! The outbox relay beside raw database writes, on PostgreSQL and SQLite.
//!
//! - `outbox.<db>.raw_batched_insert` / `raw_single_commit`: plain sqlx
//!   writes of rows of the outbox's shape (the baselines; `ratio` 1).
//! - `outbox.<db>.relay_to_<broker>`: committed outbox rows published
//!   through the broker adapter (acknowledged) and deleted, in events/s,
//!   beside the raw batched insert rate of the same database, measured in
//!   the same run (target ≥ 0.8).
//! - `outbox.<db>.raw_relay_to_<broker>`: the same drain by a relay written
//!   with the raw clients (`raw_relay.rs`), beside the raw batched insert
//!   rate: what relaying costs on this machine before any of ours; and
//!   `relay_to_<broker>_of_raw_relay`, ours beside it. The two relays take
//!   turns, first by round.
//! - `outbox.<db>.commit_to_ack_p50/p99_to_<broker>`: from the commit of
//!   the enqueueing transaction to the broker's acknowledgement of the
//!   relay's publish, with producers committing at half the measured relay
//!   rate (ms; baseline: the target, 25 ms).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
use broker_adapters::nats::{NatsBroker, NatsConfig, Storage};
use broker_adapters::prelude::*;
use orchestrator::{Outbox, OutboxConfig, RelayConfig};
use sqlx::{Postgres, Sqlite};

use crate::raw_relay;
use crate::raw_sql::{self, RawRates};
use crate::{Figure, best};

/// Events per transaction when filling the outbox.
const FILL_TX: usize = 500;
/// Relay batch size and partitions published at once.
const RELAY_BATCH: usize = 500;
const RELAY_CONCURRENCY: usize = 8;
/// Events per latency run.
const LATENCY_EVENTS: usize = 4000;
/// Events per producer transaction in the latency run.
const LATENCY_TX: usize = 10;

/// Counts the events the broker acknowledged and, when `times` is set,
/// records when it acknowledged each event id.
#[derive(Debug)]
struct Timed {
    inner: Arc<dyn Publisher>,
    times: bool,
    count: AtomicUsize,
    acked: Mutex<HashMap<String, Instant>>,
}

impl Timed {
    fn new(inner: Arc<dyn Publisher>, times: bool) -> Arc<Self> {
        Arc::new(Self {
            inner,
            times,
            count: AtomicUsize::new(0),
            acked: Mutex::new(HashMap::new()),
        })
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn record(&self, n: usize, ids: Option<Vec<String>>) {
        self.count.fetch_add(n, Ordering::Relaxed);
        let Some(ids) = ids else { return };
        let now = Instant::now();
        let mut acked = self.acked.lock().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            acked.entry(id).or_insert(now);
        }
    }

    fn take(&self) -> HashMap<String, Instant> {
        std::mem::take(&mut *self.acked.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[async_trait]
impl Publisher for Timed {
    async fn publish(&self, topic: &Topic, event: Event) -> broker_adapters::Result<()> {
        let id = self.times.then(|| vec![event.id().to_owned()]);
        self.inner.publish(topic, event).await?;
        self.record(1, id);
        Ok(())
    }

    async fn publish_batch(
        &self,
        topic: &Topic,
        events: Vec<Event>,
    ) -> broker_adapters::Result<()> {
        let n = events.len();
        let ids = self
            .times
            .then(|| events.iter().map(|e| e.id().to_owned()).collect());
        self.inner.publish_batch(topic, events).await?;
        self.record(n, ids);
        Ok(())
    }

    async fn flush(&self) -> broker_adapters::Result<()> {
        self.inner.flush().await
    }

    async fn close(&self) -> broker_adapters::Result<()> {
        self.inner.close().await
    }
}

/// The outbox of one database, whichever it is.
enum Db {
    Pg(Outbox<Postgres>),
    Lite(Outbox<Sqlite>),
}

impl Db {
    fn name(&self) -> &'static str {
        match self {
            Self::Pg(_) => "postgres",
            Self::Lite(_) => "sqlite",
        }
    }

    /// Commits `events` in one transaction; returns when it committed.
    async fn commit(&self, topic: &Topic, events: &[Event]) -> anyhow::Result<Instant> {
        match self {
            Self::Pg(outbox) => {
                let mut tx = outbox.pool().begin().await?;
                for e in events {
                    outbox.enqueue(&mut tx, topic, e).await?;
                }
                tx.commit().await?;
            }
            Self::Lite(outbox) => {
                // In turn with this process's other writers (the relay's).
                let mut tx = orchestrator::sqlite::begin_write(outbox.pool()).await?;
                for e in events {
                    outbox.enqueue(&mut tx, topic, e).await?;
                }
                tx.commit().await?;
                // Wakes this process's relays now that the rows are visible.
                outbox.committed();
            }
        }
        Ok(Instant::now())
    }

    async fn pending(&self) -> anyhow::Result<u64> {
        Ok(match self {
            Self::Pg(outbox) => outbox.pending().await?,
            Self::Lite(outbox) => outbox.pending().await?,
        })
    }

    /// The table of the raw relay, in the same database.
    fn raw_table(&self) -> raw_relay::Table {
        match self {
            Self::Pg(outbox) => raw_relay::Table::Pg(outbox.pool().clone()),
            Self::Lite(outbox) => raw_relay::Table::Lite(outbox.pool().clone()),
        }
    }

    fn relay(
        &self,
        publisher: Arc<dyn Publisher>,
        config: RelayConfig,
    ) -> anyhow::Result<orchestrator::Relay> {
        Ok(match self {
            Self::Pg(outbox) => outbox.relay(publisher, config)?,
            Self::Lite(outbox) => outbox.relay(publisher, config)?,
        })
    }
}

fn events(n: usize, size: usize, round: usize) -> anyhow::Result<Vec<Event>> {
    (0..n)
        .map(|i| {
            CloudEventBuilder::new("com.example.order.placed", "/bench")
                .partition_key(format!("r{round}-{}", crate::key(i)))
                .json_data(&crate::payload(size))
                .build()
                .map_err(Into::into)
        })
        .collect()
}

fn relay_config() -> RelayConfig {
    RelayConfig::new()
        .batch_size(RELAY_BATCH)
        .concurrency(RELAY_CONCURRENCY)
        .poll_interval(Duration::from_millis(200))
}

/// Fills the outbox with `n` committed events, then times one relay
/// publishing all of them (events/s).
async fn relay_rate(
    db: &Db,
    publisher: Arc<dyn Publisher>,
    topic: &Topic,
    n: usize,
    size: usize,
    round: usize,
) -> anyhow::Result<Duration> {
    let batch = events(n, size, round)?;
    for chunk in batch.chunks(FILL_TX) {
        db.commit(topic, chunk).await?;
    }
    let counted = Timed::new(publisher, false);
    let cpu = crate::cpu_time();
    let start = Instant::now();
    let relay = db.relay(counted.clone(), relay_config())?.spawn();
    let deadline = start + Duration::from_secs(300);
    // Watch the broker's acknowledgements, not the table: counting the
    // pending rows would load the database the relay is reading.
    while counted.count() < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay did not publish the outbox"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Then the last batches' rows are marked published.
    while db.pending().await? > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay did not drain the outbox"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = start.elapsed();
    crate::report_cpu("relay", cpu, n);
    relay.shutdown().await?;
    Ok(took)
}

/// Producers commit `LATENCY_TX` events at a time at `rate` events/s while a
/// relay publishes them; returns (p50, p99) of commit → broker ack, in ms.
async fn latency(
    db: &Db,
    publisher: Arc<dyn Publisher>,
    topic: &Topic,
    rate: f64,
    size: usize,
) -> anyhow::Result<(f64, f64)> {
    let timed = Timed::new(publisher, true);
    let relay = db
        .relay(timed.clone(), relay_config().batch_size(100))?
        .spawn();
    // One transaction of events through the new relay before the clock
    // starts, not counted: its start-up (leases taken, `LISTEN`, the first
    // looks past the rows the throughput runs left) is not latency at half
    // load. Without it the first few commits waited 20-60 ms, enough to
    // set p99 alone.
    db.commit(topic, &events(LATENCY_TX, size, 9998)?).await?;
    drained(db).await?;
    timed.take();
    let batch = events(LATENCY_EVENTS, size, 9999)?;
    let interval = Duration::from_secs_f64(LATENCY_TX as f64 / rate.max(1.0));
    let mut committed: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for chunk in batch.chunks(LATENCY_TX) {
        tick.tick().await;
        let at = db.commit(topic, chunk).await?;
        for e in chunk {
            committed.insert(e.id().to_owned(), at);
        }
    }
    drained(db).await?;
    relay.shutdown().await?;
    let acked = timed.take();
    let mut ms: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| acked.get(id).map(|a| a.saturating_duration_since(*at)))
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    anyhow::ensure!(
        ms.len() == committed.len(),
        "{} of {} events acknowledged",
        ms.len(),
        committed.len()
    );
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    Ok((at(0.50), at(0.99)))
}

/// Waits until a relay has published every committed row.
async fn drained(db: &Db) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.pending().await? > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay did not drain the outbox"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The brokers relayed to: the adapter, and the raw client of the raw relay.
/// NATS twice: with the default one event of a key in flight, and with
/// eight (`NatsConfig::max_in_flight_per_key`).
async fn brokers() -> anyhow::Result<Vec<(&'static str, Arc<dyn Publisher>, raw_relay::Sink)>> {
    e2e::require(e2e::Server::Nats)?;
    e2e::require(e2e::Server::Kafka)?;
    let nats = |per_key: usize| {
        NatsBroker::connect(
            NatsConfig::builder()
                .url(e2e::nats_url())
                .stream_prefix("BENCH_OUTBOX_")
                .storage(Storage::File)
                .max_age(Duration::from_secs(600))
                .max_in_flight_per_key(NonZeroUsize::new(per_key).unwrap_or(NonZeroUsize::MIN)),
        )
    };
    let kafka = KafkaBroker::connect(
        KafkaConfig::builder(e2e::kafka_bootstrap_servers().split(','))
            .session_timeout(Duration::from_secs(6)),
    )
    .await?;
    Ok(vec![
        (
            "nats",
            Arc::new(nats(1).await?),
            raw_relay::Sink::nats().await?,
        ),
        (
            "nats_8_per_key",
            Arc::new(nats(crate::nats::PER_KEY).await?),
            raw_relay::Sink::nats().await?,
        ),
        ("kafka", Arc::new(kafka), raw_relay::Sink::kafka()?),
    ])
}

async fn measure(
    db: &Db,
    raw: RawRates,
    n: usize,
    size: usize,
    rounds: usize,
) -> anyhow::Result<Vec<Figure>> {
    let name = db.name();
    let mut figures = vec![
        Figure::rates(
            format!("outbox.{name}.raw_batched_insert"),
            raw.batched,
            raw.batched,
        ),
        Figure::rates(
            format!("outbox.{name}.raw_single_commit"),
            raw.single,
            raw.single,
        ),
    ];
    let table = db.raw_table();
    for (broker, publisher, sink) in brokers().await? {
        let topic = Topic::try_from(
            format!("bench.outbox.{name}.{broker}.p{}", std::process::id()).replace('.', "-"),
        )?;
        let raw_topic = format!("{topic}-raw");
        let (mut took, mut took_raw) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let (ours, raw) = crate::in_turn(
                round % 2 == 0,
                Box::pin(relay_rate(db, publisher.clone(), &topic, n, size, round)),
                Box::pin(raw_relay::drain(&table, &sink, &raw_topic, n, size)),
            )
            .await?;
            took.push(ours);
            took_raw.push(raw);
            eprintln!("outbox {name} → {broker} round {round}: done");
        }
        let rate = n as f64 / best(took).as_secs_f64();
        let raw_rate = n as f64 / best(took_raw).as_secs_f64();
        figures.push(Figure::rates(
            format!("outbox.{name}.relay_to_{broker}"),
            rate,
            raw.batched,
        ));
        figures.push(Figure::rates(
            format!("outbox.{name}.raw_relay_to_{broker}"),
            raw_rate,
            raw.batched,
        ));
        figures.push(Figure::rates(
            format!("outbox.{name}.relay_to_{broker}_of_raw_relay"),
            rate,
            raw_rate,
        ));
        let (p50, p99) = latency(db, publisher.clone(), &topic, rate / 2.0, size).await?;
        figures.push(Figure::millis(
            format!("outbox.{name}.commit_to_ack_p50_to_{broker}"),
            p50,
            25.0,
        ));
        figures.push(Figure::millis(
            format!("outbox.{name}.commit_to_ack_p99_to_{broker}"),
            p99,
            25.0,
        ));
    }
    Ok(figures)
}

/// A database the outbox benchmark runs on (`--outbox-on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum OutboxOn {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

pub(crate) async fn run(
    n: usize,
    size: usize,
    rounds: usize,
    only: &[OutboxOn],
) -> anyhow::Result<Vec<Figure>> {
    let on = |db: OutboxOn| only.is_empty() || only.contains(&db);
    let mut figures = Vec::new();
    if on(OutboxOn::Postgres) {
        figures.extend(postgres(n, size, rounds).await?);
    }
    if on(OutboxOn::Sqlite) {
        figures.extend(sqlite(n, size, rounds).await?);
    }
    Ok(figures)
}

async fn postgres(n: usize, size: usize, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    // A fresh schema for the raw rows and one for the outbox.
    let url = e2e::require(e2e::Server::Postgres)?;
    let raw_schema = e2e::unique_name("bench_raw");
    let pool = raw_sql::pg_pool(&url, &raw_schema).await?;
    let raw = raw_sql::postgres(&pool, n, 2000, size).await;
    pool.close().await;
    raw_sql::pg_drop(&url, &raw_schema).await?;
    let raw = raw?;
    let schema = e2e::unique_name("bench_outbox");
    let pool = raw_sql::pg_pool(&url, &schema).await?;
    orchestrator::postgres::migrate(&pool).await?;
    let db = Db::Pg(Outbox::postgres(pool.clone(), OutboxConfig::new()).await?);
    let pg = measure(&db, raw, n, size, rounds).await;
    pool.close().await;
    raw_sql::pg_drop(&url, &schema).await?;
    pg
}

async fn sqlite(n: usize, size: usize, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    // Files in a fresh directory.
    let dir = std::env::temp_dir().join(e2e::unique_name("bench-outbox-sqlite"));
    std::fs::create_dir_all(&dir)?;
    let result = async {
        let pool = raw_sql::sqlite_pool(&dir.join("raw.db")).await?;
        let raw = raw_sql::sqlite(&pool, n, 2000, size).await;
        pool.close().await;
        let raw = raw?;
        let url = format!("sqlite://{}", dir.join("outbox.db").display());
        let pool = orchestrator::sqlite::connect(&url).await?;
        orchestrator::sqlite::migrate(&pool).await?;
        let db = Db::Lite(Outbox::sqlite(pool.clone(), OutboxConfig::new()).await?);
        let figures = measure(&db, raw, n, size, rounds).await;
        pool.close().await;
        figures
    }
    .await
    .context("sqlite");
    let _ = std::fs::remove_dir_all(&dir);
    result
}
