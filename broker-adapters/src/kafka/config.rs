//! [`KafkaConfig`]: how to reach the Kafka cluster and how to use it.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::time::Duration;

use crate::binding::Mode;
use crate::error::{Error, ErrorKind, Result};

/// librdkafka settings whose values are secrets: never printed.
const SENSITIVE_KEYS: [&str; 6] = [
    "sasl.password",
    "sasl.oauthbearer.client.secret",
    "ssl.key.password",
    "ssl.keystore.password",
    "ssl.key.pem",
    "sasl.oauthbearer.config",
];

/// Settings this adapter owns; passing them through
/// [`with_option`](KafkaConfig::with_option) would break its guarantees.
const RESERVED_KEYS: [&str; 7] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "acks",
    "enable.idempotence",
    "auto.offset.reset",
];

/// Configuration of the Kafka adapter.
///
/// | setting | default | environment variable |
/// | --- | --- | --- |
/// | bootstrap servers (`builder`) | — (required) | `KAFKA_BOOTSTRAP_SERVERS` |
/// | [`security_protocol`](Self::security_protocol) | required unless every server is on loopback | `KAFKA_SECURITY_PROTOCOL` |
/// | [`sasl`](Self::sasl) | none | `KAFKA_SASL_MECHANISM`, `KAFKA_SASL_USERNAME`, `KAFKA_SASL_PASSWORD` |
/// | [`mode`](Self::mode) | binary | `KAFKA_CLOUDEVENTS_MODE` (`binary` / `structured`) |
/// | [`session_timeout`](Self::session_timeout) | 45 s | `KAFKA_SESSION_TIMEOUT_MS` |
/// | [`delivery_timeout`](Self::delivery_timeout) | 30 s | `KAFKA_DELIVERY_TIMEOUT_MS` |
/// | [`max_event_bytes`](Self::max_event_bytes) | 1 MiB | `KAFKA_MAX_EVENT_BYTES` |
/// | [`idempotence`](Self::idempotence) | on | `KAFKA_IDEMPOTENCE` (`true` / `false`) |
/// | [`max_buffered`](Self::max_buffered) | 10,000 per subscription | — |
/// | [`commit_interval`](Self::commit_interval) | 100 ms | — |
/// | [`dead_letter_suffix`](Self::dead_letter_suffix) | `.dlq` | — |
/// | any other librdkafka setting | librdkafka's | `with_option` |
///
/// The producer always uses `acks=all`, and is idempotent unless
/// [`idempotence`](Self::idempotence) is turned off; consumers commit offsets
/// only for settled events (`enable.auto.commit=false`).
/// Plaintext is used only where configured: a cluster not on loopback needs an
/// explicit [`SecurityProtocol`].
#[derive(Clone)]
pub struct KafkaConfig {
    pub(crate) bootstrap_servers: Vec<String>,
    pub(crate) security_protocol: Option<SecurityProtocol>,
    pub(crate) sasl: Option<Sasl>,
    pub(crate) mode: Mode,
    pub(crate) session_timeout: Duration,
    pub(crate) delivery_timeout: Duration,
    pub(crate) max_event_bytes: NonZeroUsize,
    pub(crate) max_buffered: NonZeroUsize,
    pub(crate) commit_interval: Duration,
    pub(crate) dead_letter_suffix: String,
    pub(crate) idempotence: bool,
    pub(crate) options: BTreeMap<String, String>,
}

/// `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecurityProtocol {
    /// No encryption, no authentication. Only for trusted networks.
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL authentication without encryption.
    SaslPlaintext,
    /// SASL authentication over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        match value.to_ascii_lowercase().as_str() {
            "plaintext" => Some(Self::Plaintext),
            "ssl" => Some(Self::Ssl),
            "sasl_plaintext" => Some(Self::SaslPlaintext),
            "sasl_ssl" => Some(Self::SaslSsl),
            _ => None,
        }
    }
}

/// SASL credentials.
#[derive(Clone)]
pub struct Sasl {
    mechanism: String,
    username: String,
    password: String,
}

impl Sasl {
    /// Credentials for `mechanism` (`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`).
    pub fn new(
        mechanism: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            mechanism: mechanism.into(),
            username: username.into(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for Sasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl KafkaConfig {
    /// A configuration for the cluster at `bootstrap_servers` (`host:port`).
    pub fn builder<I, S>(bootstrap_servers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            bootstrap_servers: bootstrap_servers.into_iter().map(Into::into).collect(),
            security_protocol: None,
            sasl: None,
            mode: Mode::Binary,
            session_timeout: Duration::from_secs(45),
            delivery_timeout: Duration::from_secs(30),
            max_event_bytes: NonZeroUsize::new(1024 * 1024).unwrap_or(NonZeroUsize::MIN),
            max_buffered: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            commit_interval: Duration::from_millis(100),
            dead_letter_suffix: ".dlq".into(),
            idempotence: true,
            options: BTreeMap::new(),
        }
    }

    /// Reads the configuration from the environment variables in the table above.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] naming the variable that is missing or invalid.
    pub fn from_env() -> Result<Self> {
        let servers = env("KAFKA_BOOTSTRAP_SERVERS")?
            .ok_or_else(|| config_error("KAFKA_BOOTSTRAP_SERVERS", "it is not set".to_owned()))?;
        let mut config = Self::builder(servers.split(',').map(str::trim));
        if let Some(p) = env("KAFKA_SECURITY_PROTOCOL")? {
            let protocol = SecurityProtocol::parse(&p).ok_or_else(|| {
                config_error(
                    "KAFKA_SECURITY_PROTOCOL",
                    format!("`{p}` is not plaintext, ssl, sasl_plaintext or sasl_ssl"),
                )
            })?;
            config = config.security_protocol(protocol);
        }
        if let Some(mechanism) = env("KAFKA_SASL_MECHANISM")? {
            let username = env("KAFKA_SASL_USERNAME")?.unwrap_or_default();
            let password = env("KAFKA_SASL_PASSWORD")?.unwrap_or_default();
            config = config.sasl(Sasl::new(mechanism, username, password));
        }
        if let Some(mode) = env("KAFKA_CLOUDEVENTS_MODE")? {
            config = config.mode(match mode.to_ascii_lowercase().as_str() {
                "binary" => Mode::Binary,
                "structured" => Mode::Structured,
                _ => {
                    return Err(config_error(
                        "KAFKA_CLOUDEVENTS_MODE",
                        format!("`{mode}` is not binary or structured"),
                    ));
                }
            });
        }
        if let Some(ms) = env_u64("KAFKA_SESSION_TIMEOUT_MS")? {
            config = config.session_timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = env_u64("KAFKA_DELIVERY_TIMEOUT_MS")? {
            config = config.delivery_timeout(Duration::from_millis(ms));
        }
        if let Some(n) = env_u64("KAFKA_MAX_EVENT_BYTES")? {
            let n = usize::try_from(n)
                .ok()
                .and_then(NonZeroUsize::new)
                .ok_or_else(|| config_error("KAFKA_MAX_EVENT_BYTES", "must be positive".into()))?;
            config = config.max_event_bytes(n);
        }
        if let Some(on) = env("KAFKA_IDEMPOTENCE")? {
            config = config.idempotence(parse_bool("KAFKA_IDEMPOTENCE", &on)?);
        }
        Ok(config)
    }

    /// `security.protocol`; required unless every bootstrap server is on loopback.
    #[must_use]
    pub fn security_protocol(mut self, protocol: SecurityProtocol) -> Self {
        self.security_protocol = Some(protocol);
        self
    }

    /// SASL credentials.
    #[must_use]
    pub fn sasl(mut self, sasl: Sasl) -> Self {
        self.sasl = Some(sasl);
        self
    }

    /// The CloudEvents content mode for publishing (default binary). Both
    /// modes are read when consuming.
    #[must_use]
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// `session.timeout.ms`: how long the group waits for a silent member
    /// before giving its partitions to others (default 45 s).
    #[must_use]
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// How long a publish may wait for the broker's acknowledgement, retries
    /// included (`delivery.timeout.ms`, default 30 s).
    ///
    /// The producer keeps the events of a partition in order and, when one
    /// fails, fails those queued after it too (librdkafka's
    /// `enable.gapless.guarantee`, on unless set in the options; without
    /// [`idempotence`](Self::idempotence) there is no such guarantee: one
    /// request is in flight and librdkafka retries it before sending the
    /// next, but a record the broker refuses for good does not stop those
    /// after it), except when events time out: an event that outlives this
    /// timeout fails on its own, and one sent just after it may still be
    /// written. Set it well above how long a broker may be away if a
    /// retried event must never land after a later event of its key.
    #[must_use]
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// The largest event accepted for publishing and delivery (default 1 MiB).
    /// Larger received messages are dead-lettered.
    #[must_use]
    pub fn max_event_bytes(mut self, limit: NonZeroUsize) -> Self {
        self.max_event_bytes = limit;
        self
    }

    /// How many received events a subscription holds (being decoded,
    /// waiting behind an earlier event of their key, nacked, or in flight)
    /// before it stops taking more from librdkafka, whose own fetch queue is
    /// bounded by `queued.max.messages.kbytes` (default 10,000).
    #[must_use]
    pub fn max_buffered(mut self, limit: NonZeroUsize) -> Self {
        self.max_buffered = limit;
        self
    }

    /// How often settled offsets are committed (default 100 ms); they are
    /// also committed on close and before partitions are revoked.
    #[must_use]
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// The suffix of the topic that messages which cannot be decoded as
    /// CloudEvents, or are too large, are moved to (default `.dlq`).
    #[must_use]
    pub fn dead_letter_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.dead_letter_suffix = suffix.into();
        self
    }

    /// Whether the producer is idempotent (`enable.idempotence`, default
    /// on): the broker drops a retried batch it already has, so a retry
    /// after a lost acknowledgement writes nothing twice, and up to five
    /// requests per connection may be in flight with the order per key
    /// kept.
    ///
    /// Turn it off only for a broker that has no idempotent producers, or
    /// whose producer state does not survive its own crash: Tansu 0.6 on
    /// S3 storage saves a batch's sequence before the batch, so a crash
    /// between the two makes it answer the retry as a duplicate and the
    /// batch is lost (README, known gaps). Off, the producer sends one
    /// request per connection at a time
    /// (`max.in.flight.requests.per.connection=1`), so a retry cannot land
    /// after a later event of its key; a retry after a lost acknowledgement
    /// may write the batch twice (at least once: the inbox drops the copy).
    #[must_use]
    pub fn idempotence(mut self, on: bool) -> Self {
        self.idempotence = on;
        self
    }

    /// Passes any other librdkafka setting through (TLS files, SASL/OAUTH
    /// settings, `linger.ms`, `client.id`, …).
    #[must_use]
    pub fn with_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }

    /// Checks the configuration once, before connecting.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] naming the setting.
    pub fn validate(&self) -> Result<()> {
        if self.bootstrap_servers.is_empty() || self.bootstrap_servers.iter().any(String::is_empty)
        {
            return Err(config_error(
                "bootstrap.servers",
                "at least one host:port is needed".into(),
            ));
        }
        if let Some(key) = self
            .options
            .keys()
            .find(|k| RESERVED_KEYS.contains(&k.as_str()))
        {
            return Err(config_error(
                key,
                "it is set by the adapter to keep its guarantees".into(),
            ));
        }
        let all_loopback = self.bootstrap_servers.iter().all(|s| is_loopback(s));
        let protocol_set =
            self.security_protocol.is_some() || self.options.contains_key("security.protocol");
        if !all_loopback && !protocol_set {
            return Err(config_error(
                "security.protocol",
                "the cluster is not on loopback: choose plaintext, ssl, sasl_plaintext or sasl_ssl explicitly".into(),
            ));
        }
        if self.sasl.is_some()
            && matches!(
                self.security_protocol,
                Some(SecurityProtocol::Plaintext | SecurityProtocol::Ssl)
            )
        {
            return Err(config_error(
                "sasl",
                "SASL needs security.protocol sasl_plaintext or sasl_ssl".into(),
            ));
        }
        if !self.idempotence {
            // Without the broker's sequence checks only one request in
            // flight keeps a retry ahead of the events sent after it; the
            // gap-less guarantee needs an idempotent producer.
            const REORDERS: &str = "a retried event could be written after a later one of its key";
            const NEEDS_IT: &str = "librdkafka's gap-less guarantee needs an idempotent producer";
            for (key, allowed, why) in [
                ("max.in.flight.requests.per.connection", "1", REORDERS),
                ("max.in.flight", "1", REORDERS),
                ("enable.gapless.guarantee", "false", NEEDS_IT),
            ] {
                if self.options.get(key).is_some_and(|v| v.trim() != allowed) {
                    return Err(config_error(
                        key,
                        format!("with idempotence off it must be {allowed}: {why}"),
                    ));
                }
            }
        }
        if self.session_timeout < Duration::from_millis(1000) {
            return Err(config_error(
                "session.timeout.ms",
                "it must be at least 1000 ms".into(),
            ));
        }
        Ok(())
    }

    /// Settings shared by producers and consumers.
    pub(crate) fn client_options(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert("bootstrap.servers".into(), self.bootstrap_servers.join(","));
        if let Some(protocol) = self.security_protocol {
            out.insert("security.protocol".into(), protocol.as_str().into());
        }
        if let Some(sasl) = &self.sasl {
            out.insert("sasl.mechanism".into(), sasl.mechanism.clone());
            out.insert("sasl.username".into(), sasl.username.clone());
            out.insert("sasl.password".into(), sasl.password.clone());
        }
        for (k, v) in &self.options {
            out.insert(k.clone(), v.clone());
        }
        out
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options: BTreeMap<&str, &str> = self
            .options
            .iter()
            .map(|(k, v)| {
                let shown = if SENSITIVE_KEYS.contains(&k.as_str()) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("security_protocol", &self.security_protocol)
            .field("sasl", &self.sasl)
            .field("mode", &self.mode)
            .field("session_timeout", &self.session_timeout)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("max_event_bytes", &self.max_event_bytes)
            .field("max_buffered", &self.max_buffered)
            .field("commit_interval", &self.commit_interval)
            .field("dead_letter_suffix", &self.dead_letter_suffix)
            .field("idempotence", &self.idempotence)
            .field("options", &options)
            .finish()
    }
}

fn is_loopback(server: &str) -> bool {
    let host = match server.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => server,
    };
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

fn config_error(key: &str, reason: String) -> Error {
    Error::new(ErrorKind::Config {
        key: key.to_owned(),
        reason,
    })
}

fn env(key: &str) -> Result<Option<String>> {
    match std::env::var(key) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(config_error(key, "it is not valid UTF-8".into()))
        }
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(config_error(key, format!("`{value}` is not true or false"))),
    }
}

fn env_u64(key: &str) -> Result<Option<u64>> {
    env(key)?
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| config_error(key, format!("`{v}` is not a whole number")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_when_configured() {
        assert!(KafkaConfig::builder(["127.0.0.1:9092"]).validate().is_ok());
        let remote = KafkaConfig::builder(["kafka.internal:9092"]);
        let err = remote.validate().expect_err("needs a protocol");
        assert!(err.to_string().contains("security.protocol"), "{err}");
        assert!(
            remote
                .security_protocol(SecurityProtocol::Plaintext)
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn reserved_and_inconsistent_settings_are_rejected() {
        let err = KafkaConfig::builder(["127.0.0.1:9092"])
            .with_option("enable.auto.commit", "true")
            .validate()
            .expect_err("reserved");
        assert!(err.to_string().contains("enable.auto.commit"), "{err}");
        let err = KafkaConfig::builder(["127.0.0.1:9092"])
            .security_protocol(SecurityProtocol::Ssl)
            .sasl(Sasl::new("PLAIN", "u", "p"))
            .validate()
            .expect_err("sasl without sasl protocol");
        assert!(err.to_string().contains("SASL"), "{err}");
        assert!(
            KafkaConfig::builder(Vec::<String>::new())
                .validate()
                .is_err()
        );
    }

    #[test]
    fn without_idempotence_one_request_is_in_flight() {
        let off = KafkaConfig::builder(["127.0.0.1:9092"]).idempotence(false);
        assert!(off.validate().is_ok());
        for (key, value) in [
            ("max.in.flight.requests.per.connection", "5"),
            ("max.in.flight", "2"),
            ("enable.gapless.guarantee", "true"),
        ] {
            let err = off
                .clone()
                .with_option(key, value)
                .validate()
                .expect_err("would let a retry land late");
            assert!(err.to_string().contains(key), "{err}");
        }
        assert!(
            off.with_option("max.in.flight.requests.per.connection", "1")
                .validate()
                .is_ok()
        );
        // With idempotence on, librdkafka keeps order with up to five.
        assert!(
            KafkaConfig::builder(["127.0.0.1:9092"])
                .with_option("max.in.flight.requests.per.connection", "5")
                .validate()
                .is_ok()
        );
        assert!(!parse_bool("KAFKA_IDEMPOTENCE", " False").expect("a bool"));
        let err = parse_bool("KAFKA_IDEMPOTENCE", "off").expect_err("not a bool");
        assert!(err.to_string().contains("KAFKA_IDEMPOTENCE"), "{err}");
        let err = KafkaConfig::builder(["127.0.0.1:9092"])
            .with_option("enable.idempotence", "false")
            .validate()
            .expect_err("only through the typed setting");
        assert!(err.to_string().contains("enable.idempotence"), "{err}");
    }

    #[test]
    fn secrets_never_reach_debug() {
        let config = KafkaConfig::builder(["127.0.0.1:9092"])
            .security_protocol(SecurityProtocol::SaslSsl)
            .sasl(Sasl::new("SCRAM-SHA-512", "svc", "hunter2"))
            .with_option("ssl.key.password", "s3cret");
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(shown.contains("svc"));
        assert_eq!(
            config
                .client_options()
                .get("sasl.password")
                .map(String::as_str),
            Some("hunter2")
        );
    }
}
