//! A saga test bed: a database (a fresh PostgreSQL schema or SQLite file),
//! the in-memory broker, one relay for commands and replies, coordinators
//! and scripted participants.

// Shared by the `saga` and `saga_crash` targets; each uses a part.
#![allow(dead_code)]

#[path = "def.rs"]
pub(crate) mod def;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use broker_adapters::cloudevents::Event;
use broker_adapters::prelude::*;
use futures_util::future::BoxFuture;
use orchestrator::saga::ReplyError;
use orchestrator::saga::{
    Coordinator, CoordinatorConfig, CoordinatorHandle, Definitions, Participant, SagaCommand,
    SagaDefinition, StepReply,
};
use orchestrator::{Outbox, OutboxConfig, RelayConfig, RelayHandle};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Clone)]
pub(crate) enum Db {
    Pg {
        pool: PgPool,
        outbox: Outbox<sqlx::Postgres>,
        schema: String,
        url: String,
    },
    Lite {
        pool: SqlitePool,
        outbox: Outbox<sqlx::Sqlite>,
        url: String,
    },
}

pub(crate) const REPLIES: &str = "saga.replies";

pub(crate) async fn pg_pool(url: &str, schema: &str, max: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?.options([("search_path", schema)]);
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?)
}

impl Db {
    pub(crate) async fn open(backend: Backend) -> anyhow::Result<Self> {
        match backend {
            Backend::Postgres => {
                let url = e2e::require(e2e::Server::Postgres)?;
                let schema = e2e::unique_name("saga");
                let admin = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                    .map_err(|e| e2e::Server::Postgres.unreachable(e))?;
                sqlx::query(AssertSqlSafe(format!("create schema {schema}")))
                    .execute(&admin)
                    .await?;
                admin.close().await;
                let pool = pg_pool(&url, &schema, 16).await?;
                orchestrator::postgres::migrate(&pool).await?;
                sqlx::query(
                    "create table effects (id bigserial primary key, saga_id text not null, \
                     step text not null, phase text not null)",
                )
                .execute(&pool)
                .await?;
                let outbox = Outbox::postgres(pool.clone(), OutboxConfig::new()).await?;
                let sep = if url.contains('?') { '&' } else { '?' };
                let url = format!("{url}{sep}options=-c%20search_path%3D{schema}");
                Ok(Db::Pg {
                    pool,
                    outbox,
                    schema,
                    url,
                })
            }
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(e2e::unique_name("saga"));
                std::fs::create_dir_all(&dir)?;
                let url = format!("sqlite://{}", dir.join("db.sqlite").display());
                let pool = orchestrator::sqlite::connect(&url).await?;
                orchestrator::sqlite::migrate(&pool).await?;
                sqlx::query(
                    "create table effects (id integer primary key autoincrement, saga_id text not null, \
                     step text not null, phase text not null)",
                )
                .execute(&pool)
                .await?;
                let outbox = Outbox::sqlite(pool.clone(), OutboxConfig::new()).await?;
                Ok(Db::Lite { pool, outbox, url })
            }
        }
    }

    pub(crate) fn coordinator(&self, defs: Definitions, config: CoordinatorConfig) -> Coordinator {
        match self {
            Db::Pg { pool, outbox, .. } => {
                Coordinator::postgres(pool.clone(), outbox.clone(), defs, config)
            }
            Db::Lite { pool, outbox, .. } => {
                Coordinator::sqlite(pool.clone(), outbox.clone(), defs, config)
            }
        }
    }

    /// The URL another process opens the same database with.
    pub(crate) fn url(&self) -> &str {
        match self {
            Db::Pg { url, .. } | Db::Lite { url, .. } => url,
        }
    }

    pub(crate) fn relay(&self, broker: Arc<dyn Publisher>) -> anyhow::Result<RelayHandle> {
        let config = RelayConfig::new()
            .batch_size(256)
            .poll_interval(Duration::from_millis(20))
            .lease_ttl(Duration::from_millis(1500));
        Ok(match self {
            Db::Pg { outbox, .. } => outbox.relay(broker, config)?.spawn(),
            Db::Lite { outbox, .. } => outbox.relay(broker, config)?.spawn(),
        })
    }

    /// The effects the participants recorded: (saga, step, phase) in order.
    pub(crate) async fn effects(&self, saga_id: &str) -> anyhow::Result<Vec<(String, String)>> {
        Ok(match self {
            Db::Pg { pool, .. } => {
                sqlx::query_as("select step, phase from effects where saga_id = $1 order by id")
                    .bind(saga_id)
                    .fetch_all(pool)
                    .await?
            }
            Db::Lite { pool, .. } => {
                sqlx::query_as("select step, phase from effects where saga_id = $1 order by id")
                    .bind(saga_id)
                    .fetch_all(pool)
                    .await?
            }
        })
    }

    /// Every (saga, step, phase) effect recorded more than once.
    pub(crate) async fn double_effects(&self) -> anyhow::Result<i64> {
        let q = "select count(*) from (select saga_id, step, phase from effects \
                 group by saga_id, step, phase having count(*) > 1) d";
        Ok(match self {
            Db::Pg { pool, .. } => sqlx::query_scalar(q).fetch_one(pool).await?,
            Db::Lite { pool, .. } => sqlx::query_scalar(q).fetch_one(pool).await?,
        })
    }

    pub(crate) async fn close(self) {
        if let Db::Pg { pool, schema, .. } = self {
            let _ = sqlx::query(AssertSqlSafe(format!("drop schema {schema} cascade")))
                .execute(&pool)
                .await;
            pool.close().await;
        }
    }
}

/// What a scripted participant does with a command.
#[derive(Debug, Clone)]
pub(crate) enum Act {
    /// Record the effect and reply success.
    Succeed,
    /// Reply failure (no effect).
    Fail { retryable: bool },
    /// Take the command and never answer (a lost reply).
    Ignore,
}

pub(crate) type Script = Arc<dyn Fn(&SagaCommand) -> Act + Send + Sync>;

fn reply_type(cmd: &SagaCommand, ok: bool) -> String {
    format!(
        "{}.{}",
        cmd.command_type,
        if ok { "done" } else { "failed" }
    )
}

/// Commands a test participant handles at once (on SQLite they share
/// transactions).
const PARTICIPANT_CONCURRENCY: std::num::NonZeroUsize =
    std::num::NonZeroUsize::new(8).expect("8 is not zero");

/// One participant, shared by the commands it handles.
#[derive(Clone)]
enum Part {
    Pg(Participant<sqlx::Postgres>),
    Lite(Participant<sqlx::Sqlite>),
}

/// A participant serving `topic` with `script` in the library's consumer
/// loop, up to [`PARTICIPANT_CONCURRENCY`] commands at once (one per saga
/// at a time: the subscription holds a key's next command until the last is
/// settled); a failed command is redelivered after 50 ms.
pub(crate) async fn participant(
    db: &Db,
    broker: &dyn Subscriber,
    topic: &str,
    script: Script,
    up: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let topic = Topic::try_from(topic)?;
    let group = topic.as_str().replace('.', "-");
    let options = SubscribeOptions::new(&group)?.ack_wait(Duration::from_secs(3));
    let sub = broker.subscribe(&topic, options).await?;
    let name = topic.as_str();
    let part = match db {
        Db::Pg { pool, outbox, .. } => {
            Part::Pg(Participant::postgres(pool.clone(), outbox.clone(), name))
        }
        Db::Lite { pool, outbox, .. } => {
            Part::Lite(Participant::sqlite(pool.clone(), outbox.clone(), name))
        }
    };
    let handler = tower::service_fn(move |received: Received| {
        let (part, script, up) = (part.clone(), script.clone(), Arc::clone(&up));
        async move {
            while !up.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            handle(&part, &received.event, script)
                .await
                .map_err(HandlerError::retryable)
        }
    });
    let consumer = Consumer::new(sub, handler)
        .concurrency(PARTICIPANT_CONCURRENCY)
        .retry_delay(Duration::from_millis(50));
    Ok(tokio::spawn(async move {
        let _ = consumer
            .run(tokio_util::sync::CancellationToken::new())
            .await;
    }))
}

async fn handle(part: &Part, event: &Event, script: Script) -> anyhow::Result<()> {
    let cmd = SagaCommand::from_event(event)?;
    let act = script(&cmd);
    if matches!(act, Act::Ignore) {
        return Ok(());
    }
    let phase = cmd.saga.phase.as_str().to_owned();
    match part {
        Part::Pg(p) => {
            let _handled = p.handle(event, move |tx, cmd| -> BoxFuture<'_, _> {
                Box::pin(async move {
                    let reply = decide(cmd, &act);
                    if matches!(reply, StepReply::Success { .. }) && !cmd.compensated {
                        // Idempotent per (saga, step, phase): a later attempt of a
                        // step that already took effect changes nothing.
                        sqlx::query(
                            "insert into effects (saga_id, step, phase) select $1, $2, $3 \
                             where not exists (select 1 from effects where saga_id = $1 and step = $2 and phase = $3)",
                        )
                            .bind(&cmd.saga.saga_id)
                            .bind(&cmd.saga.step)
                            .bind(&phase)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Ok(reply)
                })
            })
            .await?;
        }
        Part::Lite(p) => {
            let _handled = p.handle(event, move |tx, cmd| -> BoxFuture<'_, _> {
                Box::pin(async move {
                    let reply = decide(cmd, &act);
                    if matches!(reply, StepReply::Success { .. }) && !cmd.compensated {
                        // Idempotent per (saga, step, phase): a later attempt of a
                        // step that already took effect changes nothing.
                        sqlx::query(
                            "insert into effects (saga_id, step, phase) select $1, $2, $3 \
                             where not exists (select 1 from effects where saga_id = $1 and step = $2 and phase = $3)",
                        )
                            .bind(&cmd.saga.saga_id)
                            .bind(&cmd.saga.step)
                            .bind(&phase)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Ok(reply)
                })
            })
            .await?;
        }
    }
    Ok(())
}

fn decide(cmd: &SagaCommand, act: &Act) -> StepReply {
    match act {
        Act::Succeed if !cmd.compensated => StepReply::Success {
            reply_type: reply_type(cmd, true),
            data: serde_json::json!({ "by": cmd.saga.step, "attempt": cmd.saga.attempt }),
        },
        Act::Fail { retryable } => StepReply::Failure {
            reply_type: reply_type(cmd, false),
            error: ReplyError {
                code: if *retryable { "busy" } else { "refused" }.into(),
                message: "scripted failure".into(),
                retryable: *retryable,
            },
        },
        _ => StepReply::Failure {
            reply_type: reply_type(cmd, false),
            error: ReplyError {
                code: "compensated".into(),
                message: "the step was already compensated".into(),
                retryable: false,
            },
        },
    }
}

/// The order saga on the topics `inventory`, `payment`, `shipping`.
pub(crate) fn order_saga(
    version: u32,
    timeout: Duration,
    attempts: u32,
) -> anyhow::Result<SagaDefinition> {
    def::order_saga("", version, timeout, attempts)
}

/// Everything for one scenario.
pub(crate) struct Bed {
    pub(crate) db: Db,
    pub(crate) broker: Arc<MemoryBroker>,
    pub(crate) relay: Option<RelayHandle>,
    pub(crate) tasks: Vec<JoinHandle<()>>,
    pub(crate) coordinators: Vec<CoordinatorHandle>,
}

impl Bed {
    pub(crate) async fn new(backend: Backend) -> anyhow::Result<Self> {
        let db = Db::open(backend).await?;
        let broker = Arc::new(MemoryBroker::new());
        let relay = Some(db.relay(broker.clone())?);
        Ok(Self {
            db,
            broker,
            relay,
            tasks: Vec::new(),
            coordinators: Vec::new(),
        })
    }

    pub(crate) fn config() -> CoordinatorConfig {
        CoordinatorConfig::new(Topic::from_static(REPLIES))
            .poll_interval(Duration::from_millis(20))
            .claim_lease(Duration::from_millis(1500))
    }

    /// A coordinator whose reply loop runs (in the shared consumer group).
    pub(crate) async fn coordinator(&mut self, defs: Definitions) -> anyhow::Result<Coordinator> {
        let c = self.db.coordinator(defs, Self::config());
        let sub = self
            .broker
            .subscribe(
                &Topic::from_static(REPLIES),
                SubscribeOptions::new("coordinators")?,
            )
            .await?;
        self.coordinators.push(c.clone().spawn(sub));
        Ok(c)
    }

    pub(crate) async fn participants(
        &mut self,
        script: Script,
        up: Arc<AtomicBool>,
    ) -> anyhow::Result<()> {
        for topic in ["inventory", "payment", "shipping"] {
            let t = participant(
                &self.db,
                self.broker.as_ref(),
                topic,
                script.clone(),
                up.clone(),
            )
            .await?;
            self.tasks.push(t);
        }
        Ok(())
    }

    pub(crate) async fn finish(mut self) {
        for c in self.coordinators.drain(..) {
            c.shutdown().await;
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(r) = self.relay.take() {
            let _ = r.shutdown().await;
        }
        self.db.close().await;
    }
}

/// Waits until `saga_id` reaches a terminal status; returns its name.
pub(crate) async fn settled(
    c: &Coordinator,
    saga_id: &str,
    within: Duration,
) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let s = c.saga(saga_id).await?.context("saga exists")?;
        if s.state.status.is_terminal() {
            return Ok(s.state.status.name().to_owned());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("saga {saga_id} did not finish: {:?}", s.state.status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no saga is running or compensating; returns the counts.
pub(crate) async fn all_settled(
    c: &Coordinator,
    within: Duration,
) -> anyhow::Result<Vec<(String, i64)>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let counts = c.counts().await?;
        if counts
            .iter()
            .all(|(s, _)| s != "running" && s != "compensating")
        {
            return Ok(counts);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("sagas did not finish: {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
