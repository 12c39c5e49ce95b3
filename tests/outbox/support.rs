//! Shared by the outbox tests: one database per test on either backend,
//! a sink on the in-memory broker, a publisher that can be taken down, and
//! the checks every scenario makes (nothing lost, order per key, no
//! duplicate).

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use async_trait::async_trait;
use broker_adapters::cloudevents::{AttributesReader, Event};
use broker_adapters::{
    CloudEventBuilder, ErrorKind as BrokerErrorKind, EventExt, MemoryBroker, Publisher,
    SubscribeOptions, Subscriber, Topic,
};
use futures_util::StreamExt;
use orchestrator::sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use orchestrator::sqlx::sqlite::SqlitePool;
use orchestrator::sqlx::{self, AssertSqlSafe, Postgres, Sqlite, Transaction};
use orchestrator::{Inbox, Outbox, OutboxConfig, Processed, Relay, RelayConfig, partition_of};
use tokio::task::JoinHandle;

/// Which store a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Postgres,
    Sqlite,
}

/// A fresh database: a unique schema on the test PostgreSQL, or a new
/// SQLite file in a temporary directory.
pub(crate) enum Db {
    Pg {
        pool: PgPool,
        outbox: Outbox<Postgres>,
        inbox: Inbox<Postgres>,
        schema: String,
        url: String,
    },
    Lite {
        pool: SqlitePool,
        outbox: Outbox<Sqlite>,
        inbox: Inbox<Sqlite>,
        dir: PathBuf,
        url: String,
    },
}

/// A transaction left open on purpose.
pub(crate) enum OpenTx {
    Pg(Transaction<'static, Postgres>),
    Lite(Transaction<'static, Sqlite>),
}

impl OpenTx {
    pub(crate) async fn commit(self) -> anyhow::Result<()> {
        match self {
            OpenTx::Pg(tx) => tx.commit().await?,
            OpenTx::Lite(tx) => tx.commit().await?,
        }
        Ok(())
    }
}

pub(crate) async fn pg_pool(url: &str, schema: &str, max: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?.options([("search_path", schema)]);
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?)
}

impl Db {
    pub(crate) async fn open(backend: Backend, config: OutboxConfig) -> anyhow::Result<Self> {
        match backend {
            Backend::Postgres => {
                let url = e2e::require(e2e::Server::Postgres)?;
                let schema = e2e::unique_name("outbox");
                let admin = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                    .map_err(|e| e2e::Server::Postgres.unreachable(e))?;
                sqlx::query(AssertSqlSafe(format!("create schema {schema}")))
                    .execute(&admin)
                    .await?;
                admin.close().await;
                let pool = pg_pool(&url, &schema, 8).await?;
                orchestrator::postgres::migrate(&pool).await?;
                for ddl in [
                    "create table orders (id bigserial primary key, note text)",
                    "create table effects (id bigserial primary key, consumer text not null, \
                     event_id text not null, partition_key text, seq bigint)",
                ] {
                    sqlx::query(ddl).execute(&pool).await?;
                }
                let outbox = Outbox::postgres(pool.clone(), config).await?;
                let inbox = Inbox::postgres(pool.clone());
                let url = pg_url_with_schema(&url, &schema);
                Ok(Db::Pg {
                    pool,
                    outbox,
                    inbox,
                    schema,
                    url,
                })
            }
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(e2e::unique_name("outbox"));
                std::fs::create_dir_all(&dir)?;
                let url = format!("sqlite://{}", dir.join("db.sqlite").display());
                let pool = orchestrator::sqlite::connect(&url).await?;
                orchestrator::sqlite::migrate(&pool).await?;
                for ddl in [
                    "create table orders (id integer primary key autoincrement, note text)",
                    "create table effects (id integer primary key autoincrement, \
                     consumer text not null, event_id text not null, partition_key text, seq bigint)",
                ] {
                    sqlx::query(ddl).execute(&pool).await?;
                }
                let outbox = Outbox::sqlite(pool.clone(), config).await?;
                let inbox = Inbox::sqlite(pool.clone());
                Ok(Db::Lite {
                    pool,
                    outbox,
                    inbox,
                    dir,
                    url,
                })
            }
        }
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            Db::Pg { .. } => Backend::Postgres,
            Db::Lite { .. } => Backend::Sqlite,
        }
    }

    /// The URL another process uses to reach this database (for PostgreSQL
    /// with the schema as `search_path`).
    pub(crate) fn url(&self) -> &str {
        match self {
            Db::Pg { url, .. } | Db::Lite { url, .. } => url,
        }
    }

    pub(crate) async fn reopen(&self, config: OutboxConfig) -> anyhow::Result<()> {
        match self {
            Db::Pg { pool, .. } => {
                Outbox::postgres(pool.clone(), config).await?;
            }
            Db::Lite { pool, .. } => {
                Outbox::sqlite(pool.clone(), config).await?;
            }
        }
        Ok(())
    }

    /// Tells this process's relays that a transaction committed.
    pub(crate) fn committed(&self) {
        match self {
            Db::Pg { outbox, .. } => outbox.committed(),
            Db::Lite { outbox, .. } => outbox.committed(),
        }
    }

    pub(crate) fn relay(
        &self,
        publisher: Arc<dyn Publisher>,
        config: RelayConfig,
    ) -> anyhow::Result<Relay> {
        Ok(match self {
            Db::Pg { outbox, .. } => outbox.relay(publisher, config)?,
            Db::Lite { outbox, .. } => outbox.relay(publisher, config)?,
        })
    }

    /// Commits `txs` transactions of `per_tx` test [`event`]s each, numbered
    /// from 0 and cycling through the keys `k0` .. `k{keys - 1}`; returns
    /// them in order.
    pub(crate) async fn commit_numbered(
        &self,
        topic: &Topic,
        txs: usize,
        per_tx: usize,
        keys: usize,
    ) -> anyhow::Result<Vec<Event>> {
        let mut all = Vec::with_capacity(txs * per_tx);
        for tx in 0..txs {
            let events = (tx * per_tx..(tx + 1) * per_tx)
                .map(|n| event(&format!("k{}", n % keys), n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            self.enqueue(topic, &events, true).await?;
            all.extend(events);
        }
        Ok(all)
    }

    /// One business transaction: an `orders` row per event and the events,
    /// committed or rolled back.
    pub(crate) async fn enqueue(
        &self,
        topic: &Topic,
        events: &[Event],
        commit: bool,
    ) -> anyhow::Result<()> {
        match self {
            Db::Pg { pool, outbox, .. } => {
                let mut tx = pool.begin().await?;
                for e in events {
                    sqlx::query("insert into orders (note) values ($1)")
                        .bind(e.id())
                        .execute(&mut *tx)
                        .await?;
                    outbox.enqueue(&mut tx, topic, e).await?;
                }
                if commit {
                    tx.commit().await?;
                } else {
                    tx.rollback().await?;
                }
            }
            Db::Lite { pool, outbox, .. } => {
                let mut tx = orchestrator::sqlite::begin_write(pool).await?;
                for e in events {
                    sqlx::query("insert into orders (note) values (?)")
                        .bind(e.id())
                        .execute(&mut *tx)
                        .await?;
                    outbox.enqueue(&mut tx, topic, e).await?;
                }
                if commit {
                    tx.commit().await?;
                } else {
                    tx.rollback().await?;
                }
            }
        }
        Ok(())
    }

    /// Begins a transaction, writes `event` in it and leaves it open.
    pub(crate) async fn begin_open(&self, topic: &Topic, event: &Event) -> anyhow::Result<OpenTx> {
        Ok(match self {
            Db::Pg { pool, outbox, .. } => {
                let mut tx = pool.begin().await?;
                outbox.enqueue(&mut tx, topic, event).await?;
                OpenTx::Pg(tx)
            }
            Db::Lite { pool, outbox, .. } => {
                let mut tx = pool.begin().await?;
                outbox.enqueue(&mut tx, topic, event).await?;
                OpenTx::Lite(tx)
            }
        })
    }

    async fn count(&self, sql: &'static str) -> anyhow::Result<i64> {
        Ok(match self {
            Db::Pg { pool, .. } => sqlx::query_scalar(sql).fetch_one(pool).await?,
            Db::Lite { pool, .. } => sqlx::query_scalar(sql).fetch_one(pool).await?,
        })
    }

    /// Runs one statement of the test's own (a trigger, say).
    pub(crate) async fn execute(&self, sql: &'static str) -> anyhow::Result<()> {
        match self {
            Db::Pg { pool, .. } => sqlx::query(sql).execute(pool).await.map(drop)?,
            Db::Lite { pool, .. } => sqlx::query(sql).execute(pool).await.map(drop)?,
        }
        Ok(())
    }

    pub(crate) async fn pending(&self) -> anyhow::Result<u64> {
        Ok(match self {
            Db::Pg { outbox, .. } => outbox.pending().await?,
            Db::Lite { outbox, .. } => outbox.pending().await?,
        })
    }

    /// Waits until the relay has marked every row published: a sink sees
    /// an event before the relay marks its row.
    pub(crate) async fn wait_all_marked(&self, wait: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let pending = self.pending().await?;
            if pending == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{pending} rows still unmarked after {wait:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn parked(&self) -> anyhow::Result<u64> {
        Ok(match self {
            Db::Pg { outbox, .. } => outbox.parked().await?,
            Db::Lite { outbox, .. } => outbox.parked().await?,
        })
    }

    pub(crate) async fn requeue_parked(&self) -> anyhow::Result<u64> {
        Ok(match self {
            Db::Pg { outbox, .. } => outbox.requeue_parked().await?,
            Db::Lite { outbox, .. } => outbox.requeue_parked().await?,
        })
    }

    pub(crate) async fn total_rows(&self) -> anyhow::Result<i64> {
        self.count("select count(*) from orchestrator_outbox").await
    }

    /// Partitions whose unexpired lease `relay` holds.
    pub(crate) async fn owned(&self, relay: &str) -> anyhow::Result<i64> {
        Ok(match self {
            Db::Pg { pool, .. } => {
                sqlx::query_scalar(
                    "select count(*) from orchestrator_outbox_leases where owner = $1 \
                     and expires_ms > (extract(epoch from clock_timestamp()) * 1000)::bigint",
                )
                .bind(relay)
                .fetch_one(pool)
                .await?
            }
            Db::Lite { pool, .. } => {
                sqlx::query_scalar(
                    "select count(*) from orchestrator_outbox_leases where owner = ?1 \
                     and expires_ms > cast((julianday('now') - 2440587.5) * 86400000.0 as integer)",
                )
                .bind(relay)
                .fetch_one(pool)
                .await?
            }
        })
    }

    /// Handles `event` through the inbox as `consumer`: the effect is a row
    /// in `effects`. With `fail`, the handler writes its effect and fails.
    pub(crate) async fn handle(
        &self,
        consumer: &str,
        event: &Event,
        fail: bool,
    ) -> anyhow::Result<Processed<()>> {
        let c = consumer.to_owned();
        let id = event.id().to_owned();
        let key = event.partition_key().map(str::to_owned);
        let seq = seq_of(event).ok();
        Ok(match self {
            Db::Pg { inbox, .. } => {
                inbox
                    .process(consumer, event, move |tx| {
                        Box::pin(async move {
                            sqlx::query(
                                "insert into effects (consumer, event_id, partition_key, seq) \
                                 values ($1, $2, $3, $4)",
                            )
                            .bind(c)
                            .bind(id)
                            .bind(key)
                            .bind(seq)
                            .execute(&mut *tx)
                            .await?;
                            if fail {
                                return Err("the handler failed".into());
                            }
                            Ok(())
                        })
                    })
                    .await?
            }
            Db::Lite { inbox, .. } => {
                inbox
                    .process(consumer, event, move |tx| {
                        Box::pin(async move {
                            sqlx::query(
                                "insert into effects (consumer, event_id, partition_key, seq) \
                                 values (?, ?, ?, ?)",
                            )
                            .bind(c)
                            .bind(id)
                            .bind(key)
                            .bind(seq)
                            .execute(&mut *tx)
                            .await?;
                            if fail {
                                return Err("the handler failed".into());
                            }
                            Ok(())
                        })
                    })
                    .await?
            }
        })
    }

    pub(crate) async fn inbox_contains(&self, consumer: &str, id: &str) -> anyhow::Result<bool> {
        Ok(match self {
            Db::Pg { inbox, .. } => inbox.contains(consumer, id).await?,
            Db::Lite { inbox, .. } => inbox.contains(consumer, id).await?,
        })
    }

    pub(crate) async fn purge_inbox(&self) -> anyhow::Result<u64> {
        Ok(match self {
            Db::Pg { inbox, .. } => inbox.purge(Duration::ZERO, 2).await?,
            Db::Lite { inbox, .. } => inbox.purge(Duration::ZERO, 2).await?,
        })
    }

    pub(crate) async fn effects(&self, consumer: &str) -> anyhow::Result<i64> {
        Ok(match self {
            Db::Pg { pool, .. } => {
                sqlx::query_scalar("select count(*) from effects where consumer = $1")
                    .bind(consumer)
                    .fetch_one(pool)
                    .await?
            }
            Db::Lite { pool, .. } => {
                sqlx::query_scalar("select count(*) from effects where consumer = ?")
                    .bind(consumer)
                    .fetch_one(pool)
                    .await?
            }
        })
    }

    /// The effects of `consumer` in the order they committed: (event id,
    /// partition key, seq).
    pub(crate) async fn effect_log(
        &self,
        consumer: &str,
    ) -> anyhow::Result<Vec<(String, Option<String>, Option<i64>)>> {
        Ok(match self {
            Db::Pg { pool, .. } => sqlx::query_as(
                "select event_id, partition_key, seq from effects where consumer = $1 order by id",
            )
            .bind(consumer)
            .fetch_all(pool)
            .await?,
            Db::Lite { pool, .. } => sqlx::query_as(
                "select event_id, partition_key, seq from effects where consumer = ? order by id",
            )
            .bind(consumer)
            .fetch_all(pool)
            .await?,
        })
    }

    pub(crate) async fn close(&self) -> anyhow::Result<()> {
        match self {
            Db::Pg { pool, schema, .. } => {
                pool.close().await;
                let url = e2e::database_url();
                let admin = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await?;
                sqlx::query(AssertSqlSafe(format!("drop schema {schema} cascade")))
                    .execute(&admin)
                    .await?;
                admin.close().await;
            }
            Db::Lite { pool, dir, .. } => {
                pool.close().await;
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        Ok(())
    }
}

/// `url` with `options=-c search_path=<schema>`, for another process.
pub(crate) fn pg_url_with_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

/// A test event: key `key`, sequence number `n` (subject and data).
pub(crate) fn event(key: &str, n: usize) -> anyhow::Result<Event> {
    Ok(
        CloudEventBuilder::new("dev.backbone.outbox.test", "/e2e/outbox")
            .partition_key(key)
            .subject(n.to_string())
            .json_data(&n)
            .build()?,
    )
}

pub(crate) fn seq_of(event: &Event) -> anyhow::Result<i64> {
    event
        .subject()
        .context("a test event has a subject")?
        .parse()
        .context("the subject is a sequence number")
}

/// Checks `got` against `expected`: every expected event is there; within
/// each partition key the first deliveries come in the enqueue order; with
/// `exact`, no event was delivered twice.
pub(crate) fn check_order(expected: &[Event], got: &[Event], exact: bool) -> anyhow::Result<()> {
    let ids: Vec<(&str, Option<&str>)> = got.iter().map(|e| (e.id(), e.partition_key())).collect();
    check_order_ids(expected, &ids, exact)
}

pub(crate) fn check_order_ids(
    expected: &[Event],
    got: &[(&str, Option<&str>)],
    exact: bool,
) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    let mut duplicates = 0usize;
    let mut first_order: HashMap<String, Vec<String>> = HashMap::new();
    for (id, key) in got {
        if seen.insert(id.to_string()) {
            first_order
                .entry(key.unwrap_or_default().to_owned())
                .or_default()
                .push(id.to_string());
        } else {
            duplicates += 1;
        }
    }
    let missing = expected.iter().filter(|e| !seen.contains(e.id())).count();
    ensure!(missing == 0, "{missing} of {} events lost", expected.len());
    if exact {
        ensure!(duplicates == 0, "{duplicates} events delivered twice");
    }
    let mut want: HashMap<String, Vec<String>> = HashMap::new();
    for e in expected {
        want.entry(e.partition_key().unwrap_or_default().to_owned())
            .or_default()
            .push(e.id().to_owned());
    }
    for (key, ids) in &want {
        let got: Vec<&String> = first_order
            .get(key)
            .map(|v| v.iter().filter(|id| ids.contains(id)).collect())
            .unwrap_or_default();
        if got.iter().copied().ne(ids.iter()) {
            bail!("order of key {key} broken: expected {ids:?}, got {got:?}");
        }
    }
    Ok(())
}

/// Everything delivered on a topic of the in-memory broker, in order.
pub(crate) struct Sink {
    events: Arc<Mutex<Vec<Event>>>,
    task: JoinHandle<()>,
}

impl Sink {
    pub(crate) async fn start(broker: &MemoryBroker, topic: &Topic) -> anyhow::Result<Self> {
        let mut sub = broker
            .subscribe(topic, SubscribeOptions::new("sink")?)
            .await?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let events = Arc::clone(&events);
            tokio::spawn(async move {
                while let Some(Ok(mut d)) = sub.next().await {
                    events
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(d.event().clone());
                    let _ = d.ack().await;
                }
            })
        };
        Ok(Self { events, task })
    }

    pub(crate) fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) async fn wait_for(&self, n: usize, limit: Duration) -> anyhow::Result<Vec<Event>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let got = self.events();
            if got.len() >= n {
                return Ok(got);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{} of {n} events delivered within {limit:?}", got.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A publisher that, while `slow` is set, holds each batch for `delay` on
/// a task of its own (as a Kafka producer keeps queued records until its
/// delivery timeout, whether or not anyone still awaits them) and then
/// fails it; counts the batches held at once, and the most there were.
#[derive(Debug)]
pub(crate) struct SlowPublisher {
    inner: Arc<MemoryBroker>,
    delay: Duration,
    pub(crate) slow: AtomicBool,
    pub(crate) attempts: AtomicU64,
    held: Arc<AtomicU64>,
    pub(crate) most_held: AtomicU64,
}

impl SlowPublisher {
    pub(crate) fn new(inner: Arc<MemoryBroker>, delay: Duration) -> Self {
        Self {
            inner,
            delay,
            slow: AtomicBool::new(false),
            attempts: AtomicU64::new(0),
            held: Arc::default(),
            most_held: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl Publisher for SlowPublisher {
    async fn publish(&self, topic: &Topic, event: Event) -> broker_adapters::Result<()> {
        self.publish_batch(topic, vec![event]).await
    }

    async fn publish_batch(
        &self,
        topic: &Topic,
        events: Vec<Event>,
    ) -> broker_adapters::Result<()> {
        if !self.slow.load(Ordering::SeqCst) {
            return self.inner.publish_batch(topic, events).await;
        }
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let held = Arc::clone(&self.held);
        let now = held.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_held.fetch_max(now, Ordering::SeqCst);
        let delay = self.delay;
        // Dropping the handle (the caller gave up) leaves the task running.
        let _ = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            drop(events);
            held.fetch_sub(1, Ordering::SeqCst);
        })
        .await;
        Err(broker_adapters::Error::new(BrokerErrorKind::Connection {
            system: "memory",
        }))
    }
}

/// The in-memory broker, each batch held first for 0 to 3 ms, by its first
/// event's partition key (its outbox partition modulo 4), so that
/// partitions published at once finish in no particular order.
#[derive(Debug)]
pub(crate) struct UnevenPublisher {
    inner: Arc<MemoryBroker>,
}

impl UnevenPublisher {
    pub(crate) fn new(inner: Arc<MemoryBroker>) -> Self {
        Self { inner }
    }
}

#[async_trait]
impl Publisher for UnevenPublisher {
    async fn publish(&self, topic: &Topic, event: Event) -> broker_adapters::Result<()> {
        self.publish_batch(topic, vec![event]).await
    }

    async fn publish_batch(
        &self,
        topic: &Topic,
        events: Vec<Event>,
    ) -> broker_adapters::Result<()> {
        let key = events.first().and_then(|e| e.partition_key()).unwrap_or("");
        let ms = partition_of(key, 4);
        tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
        self.inner.publish_batch(topic, events).await
    }
}

/// The in-memory broker behind a switch: while `down`, every publish fails
/// with a retryable connection error.
#[derive(Debug)]
pub(crate) struct FlakyPublisher {
    inner: Arc<MemoryBroker>,
    pub(crate) down: AtomicBool,
    pub(crate) attempts: AtomicU64,
}

impl FlakyPublisher {
    pub(crate) fn new(inner: Arc<MemoryBroker>) -> Self {
        Self {
            inner,
            down: AtomicBool::new(false),
            attempts: AtomicU64::new(0),
        }
    }

    fn check(&self) -> broker_adapters::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            return Err(broker_adapters::Error::new(BrokerErrorKind::Connection {
                system: "memory",
            }));
        }
        Ok(())
    }
}

#[async_trait]
impl Publisher for FlakyPublisher {
    async fn publish(&self, topic: &Topic, event: Event) -> broker_adapters::Result<()> {
        self.check()?;
        self.inner.publish(topic, event).await
    }

    async fn publish_batch(
        &self,
        topic: &Topic,
        events: Vec<Event>,
    ) -> broker_adapters::Result<()> {
        self.check()?;
        self.inner.publish_batch(topic, events).await
    }
}

/// The in-memory broker with a pause before each batch is sent and after it
/// is acknowledged; `started` and `acked` are notified at those points.
#[derive(Debug)]
pub(crate) struct GatedPublisher {
    inner: Arc<MemoryBroker>,
    before: Duration,
    after: Duration,
    pub(crate) started: tokio::sync::Notify,
    pub(crate) acked: tokio::sync::Notify,
}

impl GatedPublisher {
    pub(crate) fn new(inner: Arc<MemoryBroker>, before: Duration, after: Duration) -> Self {
        Self {
            inner,
            before,
            after,
            started: tokio::sync::Notify::new(),
            acked: tokio::sync::Notify::new(),
        }
    }
}

#[async_trait]
impl Publisher for GatedPublisher {
    async fn publish(&self, topic: &Topic, event: Event) -> broker_adapters::Result<()> {
        self.publish_batch(topic, vec![event]).await
    }

    async fn publish_batch(
        &self,
        topic: &Topic,
        events: Vec<Event>,
    ) -> broker_adapters::Result<()> {
        self.started.notify_one();
        tokio::time::sleep(self.before).await;
        self.inner.publish_batch(topic, events).await?;
        self.acked.notify_one();
        tokio::time::sleep(self.after).await;
        Ok(())
    }
}

/// The in-memory broker refusing, for good, every batch that holds an event
/// of type `t.poison` while `refusing` is set.
#[derive(Debug)]
pub(crate) struct RefusingPublisher {
    inner: Arc<MemoryBroker>,
    pub(crate) refusing: AtomicBool,
}

impl RefusingPublisher {
    pub(crate) fn new(inner: Arc<MemoryBroker>) -> Self {
        Self {
            inner,
            refusing: AtomicBool::new(true),
        }
    }
}

#[async_trait]
impl Publisher for RefusingPublisher {
    async fn publish(&self, topic: &Topic, event: Event) -> broker_adapters::Result<()> {
        self.publish_batch(topic, vec![event]).await
    }

    async fn publish_batch(
        &self,
        topic: &Topic,
        events: Vec<Event>,
    ) -> broker_adapters::Result<()> {
        if self.refusing.load(Ordering::SeqCst) && events.iter().any(|e| e.ty() == "t.poison") {
            return Err(broker_adapters::Error::new(BrokerErrorKind::InvalidEvent {
                reason: "refused by the test broker".to_owned(),
            }));
        }
        self.inner.publish_batch(topic, events).await
    }
}
