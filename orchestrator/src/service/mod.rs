//! The coordinator service: the saga engine as a process of its own, with
//! an HTTP API. The `saga-coordinator` binary is [`Engine::start`] plus
//! [`http::router`]; this module lets a program embed the same thing.
//!
//! One process holds a [`Coordinator`] (it applies replies and fires
//! timers), an outbox [`Relay`](crate::Relay) (it publishes the commands),
//! and the reply subscription, on SQLite or PostgreSQL, with commands and
//! replies on the SQL broker (by default on the same database: one process
//! and one file, nothing else to run), Kafka or NATS. On PostgreSQL, start
//! more instances to scale out: they divide the sagas as coordinators on
//! one database do (row locks, timer claims under leases), and the relays
//! divide the outbox partitions.
//!
//! See [`config`] for the settings and [`http`] for the API.

pub mod config;
pub mod http;

use std::sync::Arc;

use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
use broker_adapters::nats::{NatsBroker, NatsConfig};
use broker_adapters::sql::{SqlBroker, SqlConfig};
use broker_adapters::{Publisher, SubscribeOptions, Subscriber, Topic};
use tracing::{info, warn};

pub use self::config::{BrokerKind, Config};
use crate::error::{Error, ErrorKind, Result};
use crate::saga::{Coordinator, CoordinatorConfig, CoordinatorHandle, Definitions};
use crate::{Outbox, OutboxConfig, RelayConfig, RelayHandle};

/// A configuration error of `key`, with its cause.
fn invalid(
    key: &'static str,
    reason: String,
    source: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::with_source(ErrorKind::Config { key, reason }, source)
}

/// The service's database.
#[derive(Debug, Clone)]
pub enum Database {
    /// PostgreSQL.
    Postgres(sqlx::PgPool),
    /// SQLite.
    Sqlite(sqlx::SqlitePool),
}

impl Database {
    /// Opens `url` (`postgres://...` or `sqlite:...`) and applies the
    /// migrations.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a URL of another kind, a database failure,
    /// or a failed migration.
    pub async fn open(url: &str) -> Result<Self> {
        let scheme = url
            .split_once(':')
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default();
        match scheme.as_str() {
            "postgres" | "postgresql" => {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(16)
                    .connect(url)
                    .await
                    .map_err(|e| Error::db("connect to PostgreSQL", e))?;
                crate::postgres::migrate(&pool).await?;
                Ok(Self::Postgres(pool))
            }
            "sqlite" => {
                let pool = crate::sqlite::connect(url).await?;
                crate::sqlite::migrate(&pool).await?;
                Ok(Self::Sqlite(pool))
            }
            _ => Err(Error::new(ErrorKind::Config {
                key: "database_url",
                reason: "it is neither a postgres:// nor a sqlite: URL".into(),
            })),
        }
    }

    /// One round trip to the database (readiness).
    ///
    /// # Errors
    ///
    /// The database cannot be reached.
    pub async fn ping(&self) -> Result<()> {
        let err = |e| Error::db("answer a ping", e);
        match self {
            Self::Postgres(pool) => sqlx::query("select 1")
                .execute(pool)
                .await
                .map(|_| ())
                .map_err(err),
            Self::Sqlite(pool) => sqlx::query("select 1")
                .execute(pool)
                .await
                .map(|_| ())
                .map_err(err),
        }
    }

    async fn close(&self) {
        match self {
            Self::Postgres(pool) => pool.close().await,
            Self::Sqlite(pool) => pool.close().await,
        }
    }
}

/// The broker of `config`: the publisher the relay sends commands with and
/// the subscriber replies come from.
async fn broker(
    config: &Config,
    definitions: &Definitions,
) -> Result<(Arc<dyn Publisher>, Arc<dyn Subscriber>)> {
    let err = |what: &'static str| {
        move |e: broker_adapters::Error| invalid("broker", format!("could not {what}"), e)
    };
    Ok(match config.broker_kind()? {
        BrokerKind::Sql => {
            let sql = if std::env::var_os("BROKER_SQL_URL").is_some() {
                SqlConfig::from_env().map_err(err("read the BROKER_SQL_* settings"))?
            } else {
                SqlConfig::builder().url(config.database_url())
            };
            let b = Arc::new(
                SqlBroker::connect(sql)
                    .await
                    .map_err(err("connect the SQL broker"))?,
            );
            (b.clone(), b)
        }
        BrokerKind::Kafka => {
            let kafka = KafkaConfig::from_env().map_err(err("read the KAFKA_* settings"))?;
            let b = Arc::new(
                KafkaBroker::connect(kafka)
                    .await
                    .map_err(err("connect to Kafka"))?,
            );
            // Commands and replies need their topics before the first
            // publish; those that exist are left as they are.
            let partitions = config.kafka_partitions()?;
            let mut topics = std::collections::BTreeSet::from([config.reply_topic().to_owned()]);
            for def in definitions.all() {
                for step in &def.steps {
                    topics.insert(step.command.topic.clone());
                    if let Some(c) = &step.compensation {
                        topics.insert(c.topic.clone());
                    }
                }
            }
            for name in topics {
                let topic = Topic::try_from(name.as_str()).map_err(|e| {
                    invalid("definitions", format!("`{name}` is not a valid topic"), e)
                })?;
                b.create_topic(&topic, partitions)
                    .await
                    .map_err(err("create the Kafka topics"))?;
            }
            (b.clone(), b)
        }
        BrokerKind::Nats => {
            let nats = NatsConfig::from_env().map_err(err("read the NATS_* settings"))?;
            let b = Arc::new(
                NatsBroker::connect(nats)
                    .await
                    .map_err(err("connect to NATS"))?,
            );
            (b.clone(), b)
        }
    })
}

/// The running engine of a coordinator service.
#[derive(Debug)]
pub struct Engine {
    coordinator: Coordinator,
    database: Database,
    publisher: Arc<dyn Publisher>,
    relay: RelayHandle,
    replies: CoordinatorHandle,
}

impl Engine {
    /// Loads the definitions, opens the database (migrating it), connects
    /// the broker, and starts the relay and the coordinator's reply loop.
    ///
    /// # Errors
    ///
    /// Bad configuration or definitions ([`ErrorKind::Config`],
    /// [`ErrorKind::InvalidDefinition`]), or a database or broker that
    /// cannot be reached; each message names what failed.
    pub async fn start(config: &Config) -> Result<Self> {
        let definitions = config.load_definitions()?;
        let reply_topic = Topic::try_from(config.reply_topic()).map_err(|e| {
            let reason = format!("`{}` is not a valid topic", config.reply_topic());
            invalid("reply_topic", reason, e)
        })?;
        let database = Database::open(config.database_url()).await?;
        let (publisher, subscriber) = broker(config, &definitions).await?;
        let coordinator_config =
            CoordinatorConfig::new(reply_topic.clone()).consumer(config.consumer());
        let relay_config = RelayConfig::new();
        let (coordinator, relay) = match &database {
            Database::Postgres(pool) => {
                let outbox = Outbox::postgres(pool.clone(), OutboxConfig::new()).await?;
                let relay = outbox.relay(publisher.clone(), relay_config)?;
                let c =
                    Coordinator::postgres(pool.clone(), outbox, definitions, coordinator_config);
                (c, relay)
            }
            Database::Sqlite(pool) => {
                let outbox = Outbox::sqlite(pool.clone(), OutboxConfig::new()).await?;
                let relay = outbox.relay(publisher.clone(), relay_config)?;
                let c = Coordinator::sqlite(pool.clone(), outbox, definitions, coordinator_config);
                (c, relay)
            }
        };
        let options = SubscribeOptions::new(config.consumer()).map_err(|e| {
            let reason = format!("`{}` is not a valid consumer group", config.consumer());
            invalid("consumer", reason, e)
        })?;
        let subscription = subscriber
            .subscribe(&reply_topic, options)
            .await
            .map_err(|e| Error::broker("subscribe to the replies", reply_topic.as_str(), e))?;
        let relay = relay.spawn();
        let replies = coordinator.clone().spawn(subscription);
        info!(
            definitions = coordinator.definitions().all().len(),
            replies = %reply_topic,
            broker = ?config.broker_kind()?,
            "coordinator started"
        );
        Ok(Self {
            coordinator,
            database,
            publisher,
            relay,
            replies,
        })
    }

    /// The coordinator (start, inspect, cancel, retry).
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// The database (readiness).
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// Stops the reply loop (finishing what is in flight), then the relay
    /// (publishing what is committed and marking it), then closes the
    /// broker and the database.
    pub async fn shutdown(self) {
        self.replies.shutdown().await;
        if let Err(e) = self.relay.shutdown().await {
            warn!(error = %e, "the relay did not stop cleanly");
        }
        if let Err(e) = self.publisher.close().await {
            warn!(error = %e, "the broker did not close cleanly");
        }
        self.database.close().await;
        info!("coordinator stopped");
    }
}
