//! Sagas end to end: 3-step sagas with in-process participants (the
//! library's `Participant`, no-op effects) on SQLite and PostgreSQL with the
//! in-memory broker, and on PostgreSQL over NATS JetStream.
//!
//! - `saga steps/s`: forward steps applied per second with many sagas in
//!   flight (each step is a coordinator transaction, a participant
//!   transaction, and two relayed events), beside the raw single-row commit
//!   rate of the same database measured in the same run (one connection,
//!   `insert` + `commit` in a loop; the mean of a measurement before the
//!   sagas and one after).
//! - `saga sagas/s`: whole sagas per second, same run.
//! - `step latency p50/p99`: time from one transition to the next of a saga
//!   (command enqueued → reply applied), on the database clock in ms, with
//!   one saga in flight, with 8 (started as room frees, every 25 ms), and at
//!   half load: sagas started one by one on a fixed schedule at half the
//!   sagas/s just measured; the baseline column is the target.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use broker_adapters::nats::{NatsBroker, NatsConfig};
use broker_adapters::prelude::*;
use futures_util::future::BoxFuture;
use orchestrator::saga::{
    Action, Coordinator, CoordinatorConfig, CoordinatorHandle, Definitions, Participant,
    RetryPolicy, SagaDefinition, Step, StepReply,
};
use orchestrator::{Outbox, OutboxConfig, RelayConfig, RelayHandle};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};
use std::str::FromStr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Figure;

#[derive(Clone)]
enum Db {
    Pg(PgPool, Outbox<sqlx::Postgres>),
    Lite(SqlitePool, Outbox<sqlx::Sqlite>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Memory,
    Nats,
}

fn definition(prefix: &str) -> anyhow::Result<SagaDefinition> {
    let action = |ty: &str, topic: &str| {
        Action::new(ty, format!("{prefix}{topic}"))
            .on_success(format!("{ty}.done"))
            .on_failure(format!("{ty}.failed"))
            .timeout(Duration::from_secs(30))
            .retry(RetryPolicy::new(
                3,
                Duration::from_millis(50),
                Duration::from_secs(1),
            ))
    };
    Ok(SagaDefinition::builder("bench", 1)
        .step(
            Step::new("reserve", action("inventory.reserve", "inventory"))
                .compensation(action("inventory.release", "inventory")),
        )
        .step(
            Step::new("charge", action("payment.charge", "payment"))
                .compensation(action("payment.refund", "payment")),
        )
        .step(Step::new("ship", action("shipping.ship", "shipping")))
        .build()?)
}

async fn open_pg() -> anyhow::Result<(Db, String)> {
    let url = e2e::require(e2e::Server::Postgres)?;
    let schema = e2e::unique_name("bench_saga");
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await?;
    sqlx::query(AssertSqlSafe(format!("create schema {schema}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    let options = PgConnectOptions::from_str(&url)?.options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect_with(options)
        .await?;
    orchestrator::postgres::migrate(&pool).await?;
    sqlx::query("create table raw_commits (id bigserial primary key, note text)")
        .execute(&pool)
        .await?;
    let outbox = Outbox::postgres(pool.clone(), OutboxConfig::new()).await?;
    Ok((Db::Pg(pool, outbox), schema))
}

async fn open_sqlite() -> anyhow::Result<Db> {
    let dir = std::env::temp_dir().join(e2e::unique_name("bench_saga"));
    std::fs::create_dir_all(&dir)?;
    let url = format!("sqlite://{}", dir.join("db.sqlite").display());
    let pool = orchestrator::sqlite::connect(&url).await?;
    orchestrator::sqlite::migrate(&pool).await?;
    sqlx::query("create table raw_commits (id integer primary key autoincrement, note text)")
        .execute(&pool)
        .await?;
    let outbox = Outbox::sqlite(pool.clone(), OutboxConfig::new()).await?;
    Ok(Db::Lite(pool, outbox))
}

/// Single-row commits per second on one connection, for `window`.
async fn raw_commit_rate(db: &Db, window: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < window {
        match db {
            Db::Pg(pool, _) => {
                let mut tx = pool.begin().await?;
                sqlx::query("insert into raw_commits (note) values ('x')")
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Db::Lite(pool, _) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                sqlx::query("insert into raw_commits (note) values ('x')")
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
        }
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

struct Running {
    coordinator: Coordinator,
    handles: Vec<CoordinatorHandle>,
    relays: Vec<RelayHandle>,
    tasks: Vec<JoinHandle<()>>,
}

async fn setup(
    db: &Db,
    transport: Transport,
    prefix: &str,
    coordinators: usize,
) -> anyhow::Result<Running> {
    let (publisher, subscriber): (Arc<dyn Publisher>, Arc<dyn Subscriber>) = match transport {
        Transport::Memory => {
            let b = Arc::new(MemoryBroker::new());
            (b.clone(), b)
        }
        Transport::Nats => {
            e2e::require(e2e::Server::Nats)?;
            let b =
                Arc::new(NatsBroker::connect(NatsConfig::builder().url(e2e::nats_url())).await?);
            (b.clone(), b)
        }
    };
    let defs = Definitions::new().with(definition(prefix)?)?;
    let replies = Topic::try_from(format!("{prefix}replies").as_str())?;
    let config = CoordinatorConfig::new(replies.clone()).poll_interval(Duration::from_millis(100));
    let relay_config = |i: usize| {
        RelayConfig::new()
            .relay_id(format!("bench-{i}"))
            .batch_size(256)
            .poll_interval(Duration::from_millis(100))
    };
    let coordinator = match db {
        Db::Pg(pool, outbox) => Coordinator::postgres(pool.clone(), outbox.clone(), defs, config),
        Db::Lite(pool, outbox) => Coordinator::sqlite(pool.clone(), outbox.clone(), defs, config),
    };
    let relays = match db {
        Db::Pg(_, outbox) => vec![outbox.relay(publisher, relay_config(0))?.spawn()],
        Db::Lite(_, outbox) => vec![outbox.relay(publisher, relay_config(0))?.spawn()],
    };
    let mut handles = Vec::new();
    for _ in 0..coordinators {
        let sub = subscriber
            .subscribe(&replies, SubscribeOptions::new("coordinators")?)
            .await?;
        handles.push(coordinator.clone().spawn(sub));
    }
    let mut tasks = Vec::new();
    for name in ["inventory", "payment", "shipping"] {
        let topic = Topic::try_from(format!("{prefix}{name}").as_str())?;
        // One participant per service, cloned per command.
        let part = match &db {
            Db::Pg(pool, outbox) => {
                Part::Pg(Participant::postgres(pool.clone(), outbox.clone(), name))
            }
            Db::Lite(pool, outbox) => {
                Part::Lite(Participant::sqlite(pool.clone(), outbox.clone(), name))
            }
        };
        for _ in 0..coordinators {
            let sub = subscriber
                .subscribe(&topic, SubscribeOptions::new(name)?)
                .await?;
            let part = part.clone();
            // The library's consumer loop, up to PARTICIPANT_CONCURRENCY
            // commands at once, as the coordinator applies its replies; one
            // saga's commands still come one after the other (per-key
            // delivery).
            let handler =
                tower::service_fn(move |received: Received| participate(part.clone(), received));
            let consumer = Consumer::new(sub, handler)
                .concurrency(PARTICIPANT_CONCURRENCY)
                .retry_delay(Duration::ZERO);
            tasks.push(tokio::spawn(async move {
                let _ = consumer.run(CancellationToken::new()).await;
            }));
        }
    }
    Ok(Running {
        coordinator,
        handles,
        relays,
        tasks,
    })
}

impl Running {
    async fn stop(self) {
        for h in self.handles {
            h.shutdown().await;
        }
        for t in self.tasks {
            t.abort();
        }
        for r in self.relays {
            let _ = r.shutdown().await;
        }
    }
}

/// Commands one participant handles at once.
const PARTICIPANT_CONCURRENCY: NonZeroUsize = NonZeroUsize::new(16).expect("16 is not zero");

/// A service's participant on either store.
#[derive(Clone)]
enum Part {
    Pg(Participant<sqlx::Postgres>),
    Lite(Participant<sqlx::Sqlite>),
}

/// Handles one command with the library's `Participant` (no-op effect,
/// success reply); a failure is retried.
async fn participate(part: Part, received: Received) -> Result<(), HandlerError> {
    let ok = |cmd: &orchestrator::saga::SagaCommand| StepReply::Success {
        reply_type: format!("{}.done", cmd.command_type),
        data: serde_json::Value::Null,
    };
    let handled = match &part {
        Part::Pg(p) => p
            .handle(&received.event, |_, cmd| -> BoxFuture<'_, _> {
                Box::pin(async move { Ok(ok(cmd)) })
            })
            .await
            .map(|_| ()),
        Part::Lite(p) => p
            .handle(&received.event, |_, cmd| -> BoxFuture<'_, _> {
                Box::pin(async move { Ok(ok(cmd)) })
            })
            .await
            .map(|_| ()),
    };
    handled.map_err(HandlerError::retryable)
}

/// Runs `total` sagas with at most `in_flight` open; returns the elapsed time.
/// Sagas completed so far; fails if any ended otherwise.
async fn completed(c: &Coordinator) -> anyhow::Result<usize> {
    let counts = c.counts().await?;
    let other = counts
        .iter()
        .filter(|(s, _)| s != "completed" && s != "running")
        .map(|(_, n)| *n)
        .sum::<i64>();
    if other > 0 {
        bail!("sagas failed: {counts:?}");
    }
    let done = counts
        .iter()
        .find(|(s, _)| s == "completed")
        .map(|(_, n)| *n)
        .unwrap_or(0);
    Ok(usize::try_from(done).unwrap_or(0))
}

/// Starts `total` sagas at `per_second`, on a fixed schedule whatever
/// the sagas already started are doing (open loop, as independent clients
/// arrive), and waits until all have completed.
async fn drive_at_rate(
    c: &Coordinator,
    tag: &str,
    total: usize,
    per_second: f64,
) -> anyhow::Result<()> {
    let prior = completed(c).await?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second.max(1.0)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..total {
        tick.tick().await;
        c.start("bench", &format!("{tag}-{n}"), serde_json::json!({"n": n}))
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while completed(c).await?.saturating_sub(prior) < total {
        if Instant::now() > deadline {
            bail!("sagas did not finish: {:?}", c.counts().await?);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

async fn drive(
    c: &Coordinator,
    tag: &str,
    total: usize,
    in_flight: usize,
) -> anyhow::Result<Duration> {
    let prior = completed(c).await?;
    let start = Instant::now();
    let mut started = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = completed(c).await?.saturating_sub(prior);
        if done >= total && started >= total {
            return Ok(start.elapsed());
        }
        // The room freed since the last look, started in one call (one
        // transaction on SQLite), as a service starting many sagas would.
        let room = (total - started).min(in_flight.saturating_sub(started.saturating_sub(done)));
        if room > 0 {
            let batch = (started..started + room)
                .map(|n| (format!("{tag}-{n}"), serde_json::json!({"n": n})));
            for outcome in c.start_many("bench", batch).await? {
                outcome?;
            }
            started += room;
        }
        if Instant::now() > deadline {
            bail!("sagas did not finish: {:?}", c.counts().await?);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn step_latencies(db: &Db, tag: &str) -> anyhow::Result<Vec<i64>> {
    let q = "select h.at_ms - p.at_ms from orchestrator_saga_history h join orchestrator_saga_history p \
             on p.saga_id = h.saga_id and p.seq = h.seq - 1 where h.saga_id like $1 order by 1";
    let like = format!("{tag}-%");
    let mut v: Vec<i64> = match db {
        Db::Pg(pool, _) => sqlx::query_scalar(q).bind(like).fetch_all(pool).await?,
        Db::Lite(pool, _) => sqlx::query_scalar(q).bind(like).fetch_all(pool).await?,
    };
    v.sort_unstable();
    Ok(v)
}

fn pct(v: &[i64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)] as f64
}

/// A saga set-up of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SagaOn {
    /// SQLite, in-memory broker.
    Sqlite,
    /// PostgreSQL, in-memory broker.
    Postgres,
    /// PostgreSQL, NATS JetStream.
    PostgresNats,
}

pub(crate) async fn run(sagas: usize, only: &[SagaOn]) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let mut pg_schemas = Vec::new();
    for (on, label, transport, backend) in [
        (SagaOn::Sqlite, "sqlite", Transport::Memory, "sqlite"),
        (SagaOn::Postgres, "postgres", Transport::Memory, "postgres"),
        (
            SagaOn::PostgresNats,
            "postgres+nats",
            Transport::Nats,
            "postgres",
        ),
    ] {
        if !only.is_empty() && !only.contains(&on) {
            continue;
        }
        let db = if backend == "sqlite" {
            open_sqlite().await?
        } else {
            let (db, schema) = open_pg().await?;
            pg_schemas.push(schema);
            db
        };
        // The raw rate is measured before and after the sagas, and the mean
        // taken: this machine's speed drifts within a run.
        let raw_before = raw_commit_rate(&db, Duration::from_secs(2)).await?;
        let prefix = format!("{}.", e2e::unique_name("bench_saga"));
        let coordinators = if backend == "sqlite" { 1 } else { 4 };
        let running = setup(&db, transport, &prefix, coordinators).await?;
        // One saga at a time: the latency of the path alone.
        drive(&running.coordinator, "single", 100, 1)
            .await
            .context("one at a time")?;
        let single = step_latencies(&db, "single").await?;
        // Eight sagas at a time: a light load on SQLite, about three
        // quarters of PostgreSQL's throughput here.
        drive(&running.coordinator, "eight", 200, 8)
            .await
            .context("8 in flight")?;
        let eight = step_latencies(&db, "eight").await?;
        // Throughput with many sagas in flight.
        let elapsed = drive(&running.coordinator, "load", sagas, 256)
            .await
            .context("load")?;
        let sagas_s = sagas as f64 / elapsed.as_secs_f64();
        // Latency at half the throughput just measured, sagas arriving on a
        // fixed schedule (as the outbox's commit-to-ack latency is measured).
        let half = sagas_s / 2.0;
        let count = ((half * 3.0) as usize).clamp(200, 1500);
        drive_at_rate(&running.coordinator, "half", count, half)
            .await
            .context("half load")?;
        let lat = step_latencies(&db, "half").await?;
        eprintln!("saga {label}: {count} sagas at {half:.0}/s for the half-load latency");
        running.stop().await;
        let raw_after = raw_commit_rate(&db, Duration::from_secs(2)).await?;
        eprintln!("saga {label}: raw commits/s {raw_before:.0} before, {raw_after:.0} after");
        let raw = f64::midpoint(raw_before, raw_after);
        figures.push(Figure {
            bench: format!("saga {label} steps/s vs raw commits/s"),
            ours: sagas_s * 3.0,
            baseline: raw,
            unit: "steps/s",
        });
        figures.push(Figure {
            bench: format!("saga {label} sagas/s"),
            ours: sagas_s,
            baseline: raw / 3.0,
            unit: "sagas/s",
        });
        let target = if transport == Transport::Nats {
            15.0
        } else {
            10.0
        };
        for (load, lat) in [
            ("1 in flight", &single),
            ("8 in flight", &eight),
            ("half load", &lat),
        ] {
            for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
                figures.push(Figure {
                    bench: format!("saga {label} step {name} ms, {load}"),
                    ours: pct(lat, q),
                    baseline: target,
                    unit: "ms",
                });
            }
        }
    }
    if let Ok(url) = e2e::require(e2e::Server::Postgres) {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await?;
        for s in pg_schemas {
            let _ = sqlx::query(AssertSqlSafe(format!("drop schema {s} cascade")))
                .execute(&admin)
                .await;
        }
    }
    Ok(figures)
}
