//! [`SqlConfig`]: which database, and how the SQL-table broker partitions,
//! leases and polls.

use std::fmt;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// The default number of partitions of a topic.
pub const DEFAULT_PARTITIONS: u32 = 8;

/// The default largest event accepted, in bytes (1 MiB).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// The suffix of the dead-letter topic of every topic: `<topic>.dlq`.
pub const DLQ_SUFFIX: &str = ".dlq";

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// PostgreSQL (`postgres://` or `postgresql://`).
    Postgres,
    /// SQLite (`sqlite:`), a file in WAL mode.
    Sqlite,
}

/// Settings of a [`SqlBroker`](super::SqlBroker).
///
/// Start from [`SqlConfig::builder`] or [`SqlConfig::from_env`] and chain
/// the setters. `Debug` hides the password of the URL.
///
/// | variable | setting | default |
/// | --- | --- | --- |
/// | `BROKER_SQL_URL` | [`url`](Self::url) | none: required |
/// | `BROKER_SQL_SCHEMA` | [`schema`](Self::schema) | the connection's `search_path` |
/// | `BROKER_SQL_PARTITIONS` | [`partitions`](Self::partitions) | 8 |
/// | `BROKER_SQL_MAX_EVENT_BYTES` | [`max_event_bytes`](Self::max_event_bytes) | 1 MiB |
/// | `BROKER_SQL_POLL_INTERVAL_MS` | [`poll_interval`](Self::poll_interval) | 500 |
/// | `BROKER_SQL_LEASE_MS` | [`lease`](Self::lease) | 10000 |
/// | `BROKER_SQL_MAX_CONNECTIONS` | [`max_connections`](Self::max_connections) | 5 |
#[derive(Clone)]
pub struct SqlConfig {
    pub(crate) url: String,
    pub(crate) schema: Option<String>,
    pub(crate) partitions: u32,
    pub(crate) max_event_bytes: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) lease: Duration,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) max_connections: u32,
    pub(crate) max_buffered: usize,
    pub(crate) fetch_batch: u32,
    pub(crate) commit_interval: Duration,
    pub(crate) busy_timeout: Duration,
    pub(crate) connect_timeout: Duration,
}

impl Default for SqlConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            schema: None,
            partitions: DEFAULT_PARTITIONS,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            poll_interval: Duration::from_millis(500),
            lease: Duration::from_secs(10),
            heartbeat: None,
            max_connections: 5,
            max_buffered: 1000,
            fetch_batch: 256,
            commit_interval: Duration::from_millis(200),
            busy_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl SqlConfig {
    /// The defaults, without a URL: set one with [`url`](Self::url).
    #[must_use]
    pub fn builder() -> Self {
        Self::default()
    }

    /// Reads the settings from the variables in the table above; unset or
    /// empty ones keep their defaults.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] naming the variable if one is malformed or
    /// `BROKER_SQL_URL` is missing.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|key| match std::env::var(key) {
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(config_error(key, "it is not valid UTF-8"))
            }
        })
    }

    fn from_lookup(lookup: impl Fn(&str) -> Result<Option<String>>) -> Result<Self> {
        let get = |key: &str| -> Result<Option<String>> {
            Ok(lookup(key)?
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty()))
        };
        let number = |key: &str| -> Result<Option<u64>> {
            get(key)?
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| config_error(key, format!("`{v}` is not a whole number")))
                })
                .transpose()
        };
        let Some(url) = get("BROKER_SQL_URL")? else {
            return Err(config_error("BROKER_SQL_URL", "it is not set"));
        };
        let mut config = Self::builder().url(url);
        if let Some(schema) = get("BROKER_SQL_SCHEMA")? {
            config = config.schema(schema);
        }
        if let Some(n) = number("BROKER_SQL_PARTITIONS")? {
            let n = u32::try_from(n)
                .map_err(|_| config_error("BROKER_SQL_PARTITIONS", "it is too large"))?;
            config = config.partitions(n);
        }
        if let Some(n) = number("BROKER_SQL_MAX_EVENT_BYTES")? {
            config = config.max_event_bytes(usize::try_from(n).unwrap_or(usize::MAX));
        }
        if let Some(ms) = number("BROKER_SQL_POLL_INTERVAL_MS")? {
            config = config.poll_interval(Duration::from_millis(ms));
        }
        if let Some(ms) = number("BROKER_SQL_LEASE_MS")? {
            config = config.lease(Duration::from_millis(ms));
        }
        if let Some(n) = number("BROKER_SQL_MAX_CONNECTIONS")? {
            let n = u32::try_from(n)
                .map_err(|_| config_error("BROKER_SQL_MAX_CONNECTIONS", "it is too large"))?;
            config = config.max_connections(n);
        }
        config.validate()?;
        Ok(config)
    }

    /// The database: `postgres://user:password@host:5432/db` or
    /// `sqlite:///path/to/broker.db` (created if missing).
    #[must_use]
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// PostgreSQL only: the schema holding the broker's tables, created if
    /// missing and set as the connections' `search_path`.
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// How many partitions a topic gets when it is first used (default 8).
    /// The first client to use a topic records its count in the database;
    /// later clients use the recorded count whatever they are configured with.
    #[must_use]
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// The largest event accepted by `publish`, measured as
    /// [`EventExt::encoded_size`](crate::EventExt::encoded_size) (default 1 MiB).
    #[must_use]
    pub fn max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes;
        self
    }

    /// How often a subscription looks for new rows when no wake-up signal
    /// arrives (default 500 ms). PostgreSQL subscriptions are woken by
    /// `NOTIFY`, SQLite ones by publishers in the same process; the poll
    /// catches everything else (other processes on SQLite, lost notifications).
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long a member's partition leases last without renewal (default
    /// 10 s): the time after which the partitions of a member that vanished
    /// without leaving go to the other members.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often members renew their leases and rebalance (default a third
    /// of the [`lease`](Self::lease), at most one second).
    #[must_use]
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = Some(interval);
        self
    }

    /// The size of the connection pool (default 5). On PostgreSQL, one of
    /// them stays busy with `LISTEN` once the broker has a subscription.
    #[must_use]
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// How many read but unsettled events a subscription buffers before it
    /// stops reading (default 1000).
    #[must_use]
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.max_buffered = n;
        self
    }

    /// How many rows one read fetches per partition (default 256).
    #[must_use]
    pub fn fetch_batch(mut self, n: u32) -> Self {
        self.fetch_batch = n;
        self
    }

    /// How often settled positions are committed (default 200 ms).
    #[must_use]
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// SQLite only: how long a writer waits for the write lock (default 5 s).
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How long to wait for a database connection (default 10 s); past
    /// it, connecting fails with [`ErrorKind::Connection`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The database the URL names.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the URL is empty or names another database.
    pub fn backend(&self) -> Result<Backend> {
        let url = self.url.trim();
        if url.is_empty() {
            return Err(config_error("url", "it is empty"));
        }
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("postgres" | "postgresql") => Ok(Backend::Postgres),
            Some("sqlite") => Ok(Backend::Sqlite),
            _ => Err(config_error(
                "url",
                format!(
                    "`{}` is neither a postgres:// nor a sqlite: URL",
                    redact_url(url)
                ),
            )),
        }
    }

    pub(crate) fn heartbeat_interval(&self) -> Duration {
        self.heartbeat
            .unwrap_or_else(|| (self.lease / 3).min(Duration::from_secs(1)))
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] naming the first invalid setting.
    pub fn validate(&self) -> Result<()> {
        self.backend()?;
        if self.partitions == 0 || self.partitions > 1024 {
            return Err(config_error("partitions", "must be 1 to 1024"));
        }
        if self.max_event_bytes == 0 {
            return Err(config_error("max_event_bytes", "must be positive"));
        }
        if self.poll_interval.is_zero() {
            return Err(config_error("poll_interval", "must be positive"));
        }
        if self.lease < Duration::from_millis(100) {
            return Err(config_error("lease", "must be at least 100 ms"));
        }
        let heartbeat = self.heartbeat_interval();
        if heartbeat.is_zero() || heartbeat >= self.lease {
            return Err(config_error(
                "heartbeat",
                "must be positive and shorter than the lease",
            ));
        }
        if self.max_connections < 2 {
            return Err(config_error("max_connections", "must be at least 2"));
        }
        if self.max_buffered == 0 || self.fetch_batch == 0 {
            return Err(config_error(
                "max_buffered",
                "max_buffered and fetch_batch must be positive",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(config_error("connect_timeout", "must be positive"));
        }
        if self.commit_interval.is_zero() {
            return Err(config_error("commit_interval", "must be positive"));
        }
        if let Some(schema) = &self.schema {
            let valid = !schema.is_empty()
                && schema.len() <= 63
                && schema
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && !schema.as_bytes()[0].is_ascii_digit();
            if !valid {
                return Err(config_error(
                    "schema",
                    "must be 1 to 63 characters from [a-z0-9_], not starting with a digit",
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for SqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("partitions", &self.partitions)
            .field("max_event_bytes", &self.max_event_bytes)
            .field("poll_interval", &self.poll_interval)
            .field("lease", &self.lease)
            .field("heartbeat", &self.heartbeat_interval())
            .field("max_connections", &self.max_connections)
            .field("max_buffered", &self.max_buffered)
            .field("fetch_batch", &self.fetch_batch)
            .field("commit_interval", &self.commit_interval)
            .field("busy_timeout", &self.busy_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

pub(crate) fn config_error(key: &str, reason: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config {
        key: key.to_owned(),
        reason: reason.into(),
    })
}

/// `url` with any password replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, tail)) = rest.split_once('@')
    {
        let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
        return format!("{scheme}://{user}:***@{tail}");
    }
    url.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let config = SqlConfig::builder().url("postgres://app:s3cret@db:5432/x");
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("app:***@db"), "{shown}");
    }

    #[test]
    fn bad_settings_are_clear_errors() {
        let cases = [
            (SqlConfig::builder(), "url"),
            (SqlConfig::builder().url("mysql://x"), "url"),
            (
                SqlConfig::builder().url("sqlite:x.db").partitions(0),
                "partitions",
            ),
            (
                SqlConfig::builder()
                    .url("sqlite:x.db")
                    .lease(Duration::from_secs(1))
                    .heartbeat(Duration::from_secs(2)),
                "heartbeat",
            ),
            (
                SqlConfig::builder()
                    .url("postgres://h/db")
                    .schema("Bad-Name"),
                "schema",
            ),
        ];
        for (config, key) in cases {
            let err = config.validate().expect_err(key);
            assert!(
                matches!(err.kind(), ErrorKind::Config { key: k, .. } if k == key),
                "{err}"
            );
        }
        assert_eq!(
            SqlConfig::builder().url("postgresql://h/db").backend().ok(),
            Some(Backend::Postgres)
        );
    }

    #[test]
    fn from_env_reads_and_checks_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| -> Result<Option<String>> {
                Ok(pairs
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| (*v).to_owned()))
            }
        };
        let config = SqlConfig::from_lookup(vars(&[
            ("BROKER_SQL_URL", "sqlite:///tmp/b.db"),
            ("BROKER_SQL_PARTITIONS", "4"),
            ("BROKER_SQL_LEASE_MS", "3000"),
        ]))
        .expect("valid");
        assert_eq!(config.partitions, 4);
        assert_eq!(config.lease, Duration::from_secs(3));
        let err = SqlConfig::from_lookup(vars(&[])).expect_err("no url");
        assert!(err.to_string().contains("BROKER_SQL_URL"), "{err}");
        let err = SqlConfig::from_lookup(vars(&[
            ("BROKER_SQL_URL", "sqlite:///tmp/b.db"),
            ("BROKER_SQL_PARTITIONS", "many"),
        ]))
        .expect_err("not a number");
        assert!(err.to_string().contains("BROKER_SQL_PARTITIONS"), "{err}");
    }
}
