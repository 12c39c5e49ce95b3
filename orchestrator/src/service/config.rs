//! Configuration of the `saga-coordinator` binary: a TOML file, then
//! `SAGA_COORDINATOR_*` environment variables, then command-line flags.
//!
//! ```toml
//! listen = "127.0.0.1:8090"                  # SAGA_COORDINATOR_LISTEN
//! database_url = "sqlite:saga-coordinator.db" # SAGA_COORDINATOR_DATABASE_URL (or postgres://...)
//! definitions = "sagas"                      # SAGA_COORDINATOR_DEFINITIONS: a .yaml/.yml/.json file, or a directory of them
//! broker = "sql"                             # SAGA_COORDINATOR_BROKER: sql, kafka or nats
//! reply_topic = "saga.replies"               # SAGA_COORDINATOR_REPLY_TOPIC
//! consumer = "saga-coordinator"              # SAGA_COORDINATOR_CONSUMER: the reply consumer group
//! token = "secret"                           # SAGA_COORDINATOR_TOKEN: bearer token for writes (POST)
//! kafka_partitions = 6                       # SAGA_COORDINATOR_KAFKA_PARTITIONS: of the topics it creates on Kafka
//! ```
//!
//! On Kafka the service creates the reply topic and every command topic of
//! the definitions that does not exist yet, with `kafka_partitions`
//! partitions (the broker's default replication).
//!
//! The broker's own settings come from its adapter's variables:
//! `KAFKA_*` ([`KafkaConfig::from_env`](broker_adapters::kafka::KafkaConfig::from_env)),
//! `NATS_*` ([`NatsConfig::from_env`](broker_adapters::nats::NatsConfig::from_env)),
//! and for `sql` the service's own database unless `BROKER_SQL_URL` names
//! another ([`SqlConfig::from_env`](broker_adapters::sql::SqlConfig::from_env)).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};
use crate::saga::{Definitions, SagaDefinition};

/// Where the service listens when nothing else is configured: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8090";

/// The database when nothing else is configured: a SQLite file in the
/// working directory, created if missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite:saga-coordinator.db";

/// The topic replies are read from when nothing else is configured.
pub const DEFAULT_REPLY_TOPIC: &str = "saga.replies";

/// The reply consumer group when nothing else is configured.
pub const DEFAULT_CONSUMER: &str = "saga-coordinator";

/// The partitions of the Kafka topics the service creates when nothing else
/// is configured.
pub const DEFAULT_KAFKA_PARTITIONS: u16 = 6;

/// Which broker carries commands and replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// The SQL-table broker, by default on the service's own database: one
    /// process and a database, nothing else.
    Sql,
    /// Kafka (`KAFKA_*` settings).
    Kafka,
    /// NATS JetStream (`NATS_*` settings).
    Nats,
}

/// The settings of a coordinator service; every field is optional in a file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The address the HTTP API listens on.
    pub listen: Option<String>,
    /// `sqlite:path` or `postgres://...`.
    pub database_url: Option<String>,
    /// A definition file (`.yaml`, `.yml`, `.json`) or a directory of them.
    pub definitions: Option<PathBuf>,
    /// `sql`, `kafka` or `nats`.
    pub broker: Option<String>,
    /// The topic participants reply to.
    pub reply_topic: Option<String>,
    /// The consumer group the coordinators read replies in.
    pub consumer: Option<String>,
    /// The bearer token writes need; writes are open without one.
    pub token: Option<String>,
    /// The partitions of the Kafka topics the service creates.
    pub kafka_partitions: Option<u16>,
}

fn config_error(key: &'static str, reason: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config {
        key,
        reason: reason.into(),
    })
}

impl Config {
    /// Parses a TOML document.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] when it is not valid TOML or has unknown keys.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| config_error("file", e.to_string()))
    }

    /// Reads a TOML file.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] when it cannot be read or parsed.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| config_error("file", format!("{}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// `SAGA_COORDINATOR_*` variables, through `get` (e.g. `std::env::var`).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] naming the variable when
    /// `SAGA_COORDINATOR_KAFKA_PARTITIONS` is not a number from 1 to 65535.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |name: &str| {
            get(&format!("SAGA_COORDINATOR_{name}"))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let kafka_partitions = var("KAFKA_PARTITIONS")
            .map(|v| {
                v.parse::<u16>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    config_error(
                        "SAGA_COORDINATOR_KAFKA_PARTITIONS",
                        format!("`{v}` is not a number from 1 to 65535"),
                    )
                })
            })
            .transpose()?;
        Ok(Self {
            listen: var("LISTEN"),
            database_url: var("DATABASE_URL"),
            definitions: var("DEFINITIONS").map(PathBuf::from),
            broker: var("BROKER"),
            reply_topic: var("REPLY_TOPIC"),
            consumer: var("CONSUMER"),
            token: var("TOKEN"),
            kafka_partitions,
        })
    }

    /// `self`, with every setting `over` has replacing it.
    #[must_use]
    pub fn overlay(self, over: Config) -> Config {
        Config {
            listen: over.listen.or(self.listen),
            database_url: over.database_url.or(self.database_url),
            definitions: over.definitions.or(self.definitions),
            broker: over.broker.or(self.broker),
            reply_topic: over.reply_topic.or(self.reply_topic),
            consumer: over.consumer.or(self.consumer),
            token: over.token.or(self.token),
            kafka_partitions: over.kafka_partitions.or(self.kafka_partitions),
        }
    }

    /// The address to listen on.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] when it is not `ip:port`.
    pub fn listen_addr(&self) -> Result<SocketAddr> {
        let listen = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        listen
            .parse()
            .map_err(|_| config_error("listen", format!("`{listen}` is not ip:port")))
    }

    /// The database URL.
    pub fn database_url(&self) -> &str {
        self.database_url.as_deref().unwrap_or(DEFAULT_DATABASE_URL)
    }

    /// The broker.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a name other than `sql`, `kafka`, `nats`.
    pub fn broker_kind(&self) -> Result<BrokerKind> {
        match self.broker.as_deref().unwrap_or("sql") {
            "sql" => Ok(BrokerKind::Sql),
            "kafka" => Ok(BrokerKind::Kafka),
            "nats" => Ok(BrokerKind::Nats),
            other => Err(config_error(
                "broker",
                format!("`{other}` is not one of sql, kafka, nats"),
            )),
        }
    }

    /// The reply topic.
    pub fn reply_topic(&self) -> &str {
        self.reply_topic.as_deref().unwrap_or(DEFAULT_REPLY_TOPIC)
    }

    /// The reply consumer group.
    pub fn consumer(&self) -> &str {
        self.consumer.as_deref().unwrap_or(DEFAULT_CONSUMER)
    }

    /// The partitions of the Kafka topics the service creates.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for 0.
    pub fn kafka_partitions(&self) -> Result<u16> {
        match self.kafka_partitions {
            Some(0) => Err(config_error("kafka_partitions", "must be at least 1")),
            Some(n) => Ok(n),
            None => Ok(DEFAULT_KAFKA_PARTITIONS),
        }
    }

    /// Loads the definitions: one file, or every `.yaml`, `.yml` and
    /// `.json` file of a directory (in name order).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] when none is configured or found, or a file
    /// cannot be read (naming it); [`ErrorKind::InvalidDefinition`] naming
    /// the file, the step and the field of an invalid one.
    pub fn load_definitions(&self) -> Result<Definitions> {
        let Some(path) = &self.definitions else {
            return Err(config_error(
                "definitions",
                "no saga definitions: set `definitions` to a file or a directory",
            ));
        };
        let files = if path.is_dir() {
            let entries = std::fs::read_dir(path)
                .map_err(|e| config_error("definitions", format!("{}: {e}", path.display())))?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && matches!(
                            p.extension().and_then(|e| e.to_str()),
                            Some("yaml" | "yml" | "json")
                        )
                })
                .collect();
            files.sort();
            files
        } else {
            vec![path.clone()]
        };
        let mut definitions = Definitions::new();
        for file in &files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| config_error("definitions", format!("{}: {e}", file.display())))?;
            let parsed = if file.extension().and_then(|e| e.to_str()) == Some("json") {
                SagaDefinition::from_json(&text)
            } else {
                SagaDefinition::from_yaml(&text)
            };
            parsed
                .and_then(|def| definitions.register(def).map(|_| ()))
                .map_err(|e| in_file(file, e))?;
        }
        if definitions.is_empty() {
            return Err(config_error(
                "definitions",
                format!("no .yaml, .yml or .json file in {}", path.display()),
            ));
        }
        Ok(definitions)
    }
}

/// `e`, saying which file it came from.
fn in_file(file: &Path, e: Error) -> Error {
    match e.kind() {
        ErrorKind::InvalidDefinition { .. } => {
            config_error("definitions", format!("{}: {e}", file.display()))
        }
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_then_flags() -> Result<()> {
        let file = Config::from_toml("listen = \"127.0.0.1:9000\"\nbroker = \"nats\"\n")?;
        let env = Config::from_env(|k| (k == "SAGA_COORDINATOR_BROKER").then(|| "kafka".into()))?;
        assert!(
            Config::from_env(|k| (k == "SAGA_COORDINATOR_KAFKA_PARTITIONS").then(|| "0".into()))
                .is_err()
        );
        assert_eq!(
            Config::default().kafka_partitions()?,
            DEFAULT_KAFKA_PARTITIONS
        );
        let config = file.overlay(env);
        assert_eq!(config.broker_kind()?, BrokerKind::Kafka);
        assert_eq!(config.listen_addr()?.port(), 9000);
        assert_eq!(config.database_url(), DEFAULT_DATABASE_URL);
        assert!(Config::from_toml("nope = 1").is_err());
        assert!(Config::default().listen_addr()?.ip().is_loopback());
        let bad = Config {
            broker: Some("carrier-pigeon".into()),
            listen: Some("nowhere".into()),
            ..Config::default()
        };
        assert!(bad.broker_kind().is_err());
        assert!(bad.listen_addr().is_err());
        let none = Config::default().load_definitions();
        assert!(
            matches!(&none, Err(e) if e.to_string().contains("no saga definitions")),
            "{none:?}"
        );
        Ok(())
    }
}
