//! [`NatsConfig`]: where the NATS server is, how to authenticate, and how
//! topics map to JetStream streams and consumers.

use std::fmt;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use crate::binding::Mode;
use crate::error::{Error, ErrorKind, Result};

/// The server used when neither [`NatsConfig::url`] nor `NATS_URL` says otherwise.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// The prefix of the stream names derived from topics.
pub const DEFAULT_STREAM_PREFIX: &str = "CE_";

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_ACK_PENDING: usize = 1000;
const DEFAULT_PREFETCH: usize = 64;

/// When a JetStream stream drops stored events (its retention policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Retention {
    /// Keep events until a limit ([`NatsConfig::max_age`]) removes them,
    /// whoever consumed them: consumer groups can replay, and new groups
    /// starting from [`Earliest`](crate::StartFrom::Earliest) see history.
    #[default]
    Limits,
    /// Drop an event once every consumer group that existed when it was
    /// stored has acknowledged it.
    Interest,
    /// Drop an event once one consumer acknowledged it. JetStream allows one
    /// consumer group per topic on such a stream.
    WorkQueue,
}

/// Where a JetStream stream stores events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Storage {
    /// On disk: events survive a server restart.
    #[default]
    File,
    /// In memory: faster, lost when the server restarts.
    Memory,
}

/// How the client authenticates. Secrets never reach `Debug`.
#[derive(Clone, PartialEq, Eq, Default)]
enum Auth {
    #[default]
    None,
    Token(String),
    UserPassword {
        user: String,
        password: String,
    },
    CredentialsFile(PathBuf),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Token(_) => f.write_str("Token(***)"),
            Self::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"***")
                .finish(),
            Self::CredentialsFile(path) => f.debug_tuple("CredentialsFile").field(path).finish(),
        }
    }
}

/// Settings of a [`NatsBroker`](super::NatsBroker).
///
/// Built with [`NatsConfig::builder`] and the setters below, or read from the
/// environment with [`NatsConfig::from_env`]:
///
/// | setting | default | environment variable |
/// | --- | --- | --- |
/// | [`url`](Self::url) | `nats://127.0.0.1:4222` | `NATS_URL` |
/// | [`credentials_file`](Self::credentials_file) | none | `NATS_CREDS` |
/// | [`user_and_password`](Self::user_and_password) | none | `NATS_USER`, `NATS_PASSWORD` |
/// | [`token`](Self::token) | none | `NATS_TOKEN` |
/// | [`stream_prefix`](Self::stream_prefix) | `CE_` | `NATS_STREAM_PREFIX` |
/// | [`publish_mode`](Self::publish_mode) | [`Mode::Binary`] | `NATS_PUBLISH_MODE` (`binary` or `structured`) |
/// | [`max_in_flight_per_key`](Self::max_in_flight_per_key) | 1 | `NATS_MAX_IN_FLIGHT_PER_KEY` |
/// | [`max_event_bytes`](Self::max_event_bytes) | the server's `max_payload` | `NATS_MAX_EVENT_BYTES` |
/// | [`retention`](Self::retention) | [`Retention::Limits`] | `NATS_STREAM_RETENTION` (`limits`, `interest` or `workqueue`) |
/// | [`storage`](Self::storage) | [`Storage::File`] | `NATS_STREAM_STORAGE` (`file` or `memory`) |
/// | [`replicas`](Self::replicas) | 1 | `NATS_STREAM_REPLICAS` |
/// | [`max_age`](Self::max_age) | unlimited | `NATS_STREAM_MAX_AGE` (whole seconds) |
/// | [`max_ack_pending`](Self::max_ack_pending) | 1000 | `NATS_MAX_ACK_PENDING` |
/// | [`prefetch`](Self::prefetch) | 64 | `NATS_PREFETCH` |
/// | [`dead_letter`](Self::dead_letter) | on | `NATS_DEAD_LETTER` (`true` or `false`) |
/// | [`tls_required`](Self::tls_required) | off (on with a CA file or client certificate, or a `tls://` URL) | `NATS_TLS` (`true` or `false`) |
/// | [`tls_ca_file`](Self::tls_ca_file) | the system's roots | `NATS_CA` |
/// | [`tls_client_certificate`](Self::tls_client_certificate) | none | `NATS_CERT` and `NATS_KEY` |
/// | [`client_name`](Self::client_name) | none | `NATS_CLIENT_NAME` |
/// | [`connect_timeout`](Self::connect_timeout) | 5 s | |
/// | [`request_timeout`](Self::request_timeout) | 10 s | |
///
/// At most one authentication method may be set; a later setter replaces an
/// earlier one. Credentials may also be part of the URL
/// (`nats://user:password@host:4222`). `Debug` shows neither passwords nor
/// tokens, wherever they were given.
///
/// TLS: the server's certificate is checked against the system's roots, or
/// against the CA file's certificates when one is set; a client certificate
/// is presented when the server asks for one (`verify` in its TLS block).
/// Setting either requires TLS, as does a `tls://` URL; a server that then
/// offers no TLS, or a certificate that does not check out, is an
/// [`ErrorKind::Config`] error, not retried. The files are read when the
/// broker connects: a missing or unreadable one is an [`ErrorKind::Config`]
/// error naming the setting.
///
/// The stream settings (retention, storage, replicas, max age) apply to the
/// streams the adapter creates; streams that already exist are used as they
/// are.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsConfig {
    url: String,
    auth: Auth,
    connect_timeout: Duration,
    request_timeout: Duration,
    stream_prefix: String,
    publish_mode: Mode,
    max_in_flight_per_key: NonZeroUsize,
    max_event_bytes: Option<NonZeroUsize>,
    retention: Retention,
    storage: Storage,
    replicas: NonZeroUsize,
    max_age: Option<Duration>,
    max_ack_pending: NonZeroUsize,
    prefetch: NonZeroUsize,
    dead_letter: bool,
    tls: Tls,
    client_name: Option<String>,
}

/// The TLS settings: see [`NatsConfig`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Tls {
    required: bool,
    ca_file: Option<PathBuf>,
    /// Certificate and private key files, PEM.
    client: Option<(PathBuf, PathBuf)>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.to_owned(),
            auth: Auth::None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            stream_prefix: DEFAULT_STREAM_PREFIX.to_owned(),
            publish_mode: Mode::Binary,
            max_in_flight_per_key: NonZeroUsize::MIN,
            max_event_bytes: None,
            retention: Retention::Limits,
            storage: Storage::File,
            replicas: NonZeroUsize::MIN,
            max_age: None,
            max_ack_pending: NonZeroUsize::new(DEFAULT_MAX_ACK_PENDING)
                .unwrap_or(NonZeroUsize::MIN),
            prefetch: NonZeroUsize::new(DEFAULT_PREFETCH).unwrap_or(NonZeroUsize::MIN),
            dead_letter: true,
            tls: Tls::default(),
            client_name: None,
        }
    }
}

impl NatsConfig {
    /// The defaults in the table above.
    pub fn builder() -> Self {
        Self::default()
    }

    /// Reads the settings from the environment variables in the table above;
    /// unset or empty ones keep their defaults.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] naming the variable if a value is malformed, if
    /// `NATS_USER` and `NATS_PASSWORD` are not set together, or if more than
    /// one authentication method is set.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|key| match std::env::var(key) {
            Ok(value) => Ok(Some(value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(config_error(key, "it is not valid UTF-8"))
            }
        })
    }

    /// [`from_env`](Self::from_env) over any source of variables.
    fn from_lookup(lookup: impl Fn(&str) -> Result<Option<String>>) -> Result<Self> {
        let get = |key: &str| -> Result<Option<String>> {
            Ok(lookup(key)?
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty()))
        };
        let mut config = Self::default();
        if let Some(url) = get("NATS_URL")? {
            config.url = url;
        }

        let creds = get("NATS_CREDS")?;
        let user = get("NATS_USER")?;
        let password = get("NATS_PASSWORD")?;
        let token = get("NATS_TOKEN")?;
        let methods = [
            creds.is_some(),
            user.is_some() || password.is_some(),
            token.is_some(),
        ];
        if methods.iter().filter(|set| **set).count() > 1 {
            return Err(config_error(
                "NATS_CREDS",
                "set only one of NATS_CREDS, NATS_USER/NATS_PASSWORD and NATS_TOKEN",
            ));
        }
        config.auth = match (creds, user, password, token) {
            (Some(path), ..) => Auth::CredentialsFile(PathBuf::from(path)),
            (_, Some(user), Some(password), _) => Auth::UserPassword { user, password },
            (_, Some(_), None, _) => {
                return Err(config_error("NATS_PASSWORD", "NATS_USER is set without it"));
            }
            (_, None, Some(_), _) => {
                return Err(config_error("NATS_USER", "NATS_PASSWORD is set without it"));
            }
            (.., Some(token)) => Auth::Token(token),
            _ => Auth::None,
        };

        if let Some(prefix) = get("NATS_STREAM_PREFIX")? {
            config.stream_prefix = prefix;
        }
        if let Some(mode) = get("NATS_PUBLISH_MODE")? {
            config.publish_mode = match mode.to_ascii_lowercase().as_str() {
                "binary" => Mode::Binary,
                "structured" => Mode::Structured,
                _ => {
                    return Err(bad_value(
                        "NATS_PUBLISH_MODE",
                        &mode,
                        "`binary` or `structured`",
                    ));
                }
            };
        }
        if let Some(n) = get("NATS_MAX_IN_FLIGHT_PER_KEY")? {
            config.max_in_flight_per_key = parse_positive("NATS_MAX_IN_FLIGHT_PER_KEY", &n)?;
        }
        if let Some(n) = get("NATS_MAX_EVENT_BYTES")? {
            config.max_event_bytes = Some(parse_positive("NATS_MAX_EVENT_BYTES", &n)?);
        }
        if let Some(retention) = get("NATS_STREAM_RETENTION")? {
            config.retention = match retention.to_ascii_lowercase().as_str() {
                "limits" => Retention::Limits,
                "interest" => Retention::Interest,
                "workqueue" => Retention::WorkQueue,
                _ => {
                    return Err(bad_value(
                        "NATS_STREAM_RETENTION",
                        &retention,
                        "`limits`, `interest` or `workqueue`",
                    ));
                }
            };
        }
        if let Some(storage) = get("NATS_STREAM_STORAGE")? {
            config.storage = match storage.to_ascii_lowercase().as_str() {
                "file" => Storage::File,
                "memory" => Storage::Memory,
                _ => {
                    return Err(bad_value(
                        "NATS_STREAM_STORAGE",
                        &storage,
                        "`file` or `memory`",
                    ));
                }
            };
        }
        if let Some(n) = get("NATS_STREAM_REPLICAS")? {
            config.replicas = parse_positive("NATS_STREAM_REPLICAS", &n)?;
        }
        if let Some(secs) = get("NATS_STREAM_MAX_AGE")? {
            let secs = parse_positive("NATS_STREAM_MAX_AGE", &secs)?;
            config.max_age = Some(Duration::from_secs(
                u64::try_from(secs.get()).unwrap_or(u64::MAX),
            ));
        }
        if let Some(n) = get("NATS_MAX_ACK_PENDING")? {
            config.max_ack_pending = parse_positive("NATS_MAX_ACK_PENDING", &n)?;
        }
        if let Some(n) = get("NATS_PREFETCH")? {
            config.prefetch = parse_positive("NATS_PREFETCH", &n)?;
        }
        if let Some(flag) = get("NATS_DEAD_LETTER")? {
            config.dead_letter = parse_flag("NATS_DEAD_LETTER", &flag)?;
        }
        if let Some(flag) = get("NATS_TLS")? {
            config.tls.required = parse_flag("NATS_TLS", &flag)?;
        }
        if let Some(name) = get("NATS_CLIENT_NAME")? {
            config.client_name = Some(name);
        }
        if let Some(ca) = get("NATS_CA")? {
            config = config.tls_ca_file(ca);
        }
        match (get("NATS_CERT")?, get("NATS_KEY")?) {
            (Some(cert), Some(key)) => config = config.tls_client_certificate(cert, key),
            (Some(_), None) => {
                return Err(config_error("NATS_CERT", "NATS_KEY is not set with it"));
            }
            (None, Some(_)) => {
                return Err(config_error("NATS_KEY", "NATS_CERT is not set with it"));
            }
            (None, None) => {}
        }
        Ok(config)
    }

    /// The server to connect to: `nats://host:port`, or several,
    /// comma-separated, to fail over between cluster members.
    #[must_use]
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Authenticates with a token.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.auth = Auth::Token(token.into());
        self
    }

    /// Authenticates with a user name and password.
    #[must_use]
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.auth = Auth::UserPassword {
            user: user.into(),
            password: password.into(),
        };
        self
    }

    /// Authenticates with a NATS credentials file (JWT and NKey seed), as
    /// made by `nsc`. The file is read when connecting.
    #[must_use]
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.auth = Auth::CredentialsFile(path.into());
        self
    }

    /// How long connecting may take (default 5 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long JetStream requests, publish acknowledgements and ack
    /// confirmations may take (default 10 s).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The prefix of the stream names derived from topics (default `CE_`):
    /// topic `orders.created` is stored in stream `CE_orders_created`. Only
    /// ASCII letters, digits, `_` and `-` are allowed, which
    /// [`NatsBroker::connect`](super::NatsBroker::connect) checks.
    #[must_use]
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = prefix.into();
        self
    }

    /// How events are laid out in messages (default [`Mode::Binary`]:
    /// attributes in `ce-` headers, data as the payload). Subscribers read
    /// both modes whatever this says.
    #[must_use]
    pub fn publish_mode(mut self, mode: Mode) -> Self {
        self.publish_mode = mode;
        self
    }

    /// How many events of one `partitionkey` a publish may have sent and
    /// not yet acknowledged (default 1), like Kafka's
    /// `max.in.flight.requests.per.connection` without idempotence.
    ///
    /// With 1, an event is sent only once the event of its key before it
    /// is stored, so a failure (the connection lost mid-batch, a stream
    /// leader change, an event the stream refuses) leaves each key's
    /// stored events a prefix of its events, and sending the batch again
    /// keeps the key's order. With more, a key's events are pipelined
    /// (JetStream stores one connection's messages in the order sent), so
    /// a publish with few keys goes faster, but after such a failure up to
    /// `n - 1` later events of the key may be stored ahead of the failed
    /// one, and its consumers see them first: raise it only where
    /// consumers do not rely on per-key order after a failed publish.
    /// Events without a key are never held.
    #[must_use]
    pub fn max_in_flight_per_key(mut self, n: NonZeroUsize) -> Self {
        self.max_in_flight_per_key = n;
        self
    }

    /// The largest event accepted for publishing, as measured by
    /// [`EventExt::encoded_size`](crate::EventExt::encoded_size), and for
    /// delivery, as the size of the message's payload (default and upper
    /// bound: the server's `max_payload`, 1 MiB unless configured). Larger
    /// received messages are dead-lettered.
    #[must_use]
    pub fn max_event_bytes(mut self, limit: NonZeroUsize) -> Self {
        self.max_event_bytes = Some(limit);
        self
    }

    /// The retention policy of created streams (default [`Retention::Limits`]).
    #[must_use]
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// The storage of created streams (default [`Storage::File`]).
    #[must_use]
    pub fn storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// How many servers of a cluster hold each created stream (default 1;
    /// 3 or 5 in production clusters).
    #[must_use]
    pub fn replicas(mut self, replicas: NonZeroUsize) -> Self {
        self.replicas = replicas;
        self
    }

    /// How long created streams keep events (default: until another limit
    /// removes them).
    #[must_use]
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }

    /// How many deliveries a consumer group may have unsettled at once,
    /// across all its members (default 1000); JetStream stops delivering to
    /// the group beyond it. Applies when the adapter creates the group's
    /// consumer. Set it to 1 to keep the order of every key across the
    /// members of a group, at the price of handling one event at a time (see
    /// the [module docs](super#ordering)).
    #[must_use]
    pub fn max_ack_pending(mut self, limit: NonZeroUsize) -> Self {
        self.max_ack_pending = limit;
        self
    }

    /// How many messages a subscription fetches ahead of its handlers
    /// (default 64). Fetched messages that wait for an earlier event of their
    /// key are kept alive with progress acks, so they are not redelivered to
    /// another member; lower values share work more evenly between members.
    #[must_use]
    pub fn prefetch(mut self, prefetch: NonZeroUsize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Whether messages that are not CloudEvents are copied to the
    /// dead-letter subject `<topic>.dlq` before they are terminated (default
    /// on; see the [module docs](super#undecodable-messages)).
    #[must_use]
    pub fn dead_letter(mut self, enabled: bool) -> Self {
        self.dead_letter = enabled;
        self
    }

    /// The name the server shows for the broker's connection (in its
    /// monitoring endpoints and logs), say the service's name. Each
    /// subscription's own connection is named `<name>: subscription <topic>
    /// <group>`, or without a client name `subscription <topic> <group>`.
    #[must_use]
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = Some(name.into());
        self
    }

    /// Requires TLS to the server even without a CA file, a client
    /// certificate or a `tls://` URL (which each require it already).
    #[must_use]
    pub fn tls_required(mut self, required: bool) -> Self {
        self.tls.required = required;
        self
    }

    /// Checks the server's certificate against the certificates in this PEM
    /// file (a private CA) besides the system's roots, and requires TLS.
    #[must_use]
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca_file = Some(path.into());
        self
    }

    /// Presents this certificate, with its private key (both PEM files),
    /// when the server asks for a client certificate, and requires TLS.
    #[must_use]
    pub fn tls_client_certificate(
        mut self,
        certificate: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls.client = Some((certificate.into(), key.into()));
        self
    }

    pub(crate) fn client_name_value(&self) -> Option<&str> {
        self.client_name.as_deref()
    }

    pub(crate) fn server_url(&self) -> &str {
        &self.url
    }

    pub(crate) fn connect_timeout_value(&self) -> Duration {
        self.connect_timeout
    }

    pub(crate) fn request_timeout_value(&self) -> Duration {
        self.request_timeout
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.stream_prefix
    }

    pub(crate) fn mode(&self) -> Mode {
        self.publish_mode
    }

    pub(crate) fn in_flight_per_key(&self) -> usize {
        self.max_in_flight_per_key.get()
    }

    pub(crate) fn event_limit(&self) -> Option<usize> {
        self.max_event_bytes.map(NonZeroUsize::get)
    }

    pub(crate) fn stream_retention(&self) -> Retention {
        self.retention
    }

    pub(crate) fn stream_storage(&self) -> Storage {
        self.storage
    }

    pub(crate) fn stream_replicas(&self) -> usize {
        self.replicas.get()
    }

    pub(crate) fn stream_max_age(&self) -> Option<Duration> {
        self.max_age
    }

    pub(crate) fn ack_pending_limit(&self) -> usize {
        self.max_ack_pending.get()
    }

    pub(crate) fn prefetch_count(&self) -> usize {
        self.prefetch.get()
    }

    pub(crate) fn dead_letter_enabled(&self) -> bool {
        self.dead_letter
    }

    /// The async-nats connect options for the authentication method.
    pub(crate) async fn connect_options(&self) -> Result<async_nats::ConnectOptions> {
        let options = match &self.auth {
            Auth::None => async_nats::ConnectOptions::new(),
            Auth::Token(token) => async_nats::ConnectOptions::with_token(token.clone()),
            Auth::UserPassword { user, password } => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            Auth::CredentialsFile(path) => {
                async_nats::ConnectOptions::with_credentials_file(path.clone())
                    .await
                    .map_err(|e| {
                        Error::with_source(
                            ErrorKind::Config {
                                key: "credentials_file".into(),
                                reason: format!("cannot use `{}`", path.display()),
                            },
                            e,
                        )
                    })?
            }
        };
        let mut options = options
            .connection_timeout(self.connect_timeout)
            .request_timeout(Some(self.request_timeout));
        let Tls {
            required,
            ca_file,
            client,
        } = &self.tls;
        if let Some(ca) = ca_file {
            readable("tls_ca_file", ca)?;
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((certificate, key)) = client {
            readable("tls_client_certificate", certificate)?;
            readable("tls_client_certificate", key)?;
            options = options.add_client_certificate(certificate.clone(), key.clone());
        }
        let tls = *required || ca_file.is_some() || client.is_some();
        Ok(options.require_tls(tls))
    }

    /// Checks what the setters cannot.
    pub(crate) fn validate(&self) -> Result<()> {
        if !self
            .stream_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(config_error(
                "stream_prefix",
                "only ASCII letters, digits, '_' and '-' are allowed in stream names",
            ));
        }
        if self.url.trim().is_empty() {
            return Err(config_error("url", "it is empty"));
        }
        Ok(())
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url))
            .field("auth", &self.auth)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("stream_prefix", &self.stream_prefix)
            .field("publish_mode", &self.publish_mode)
            .field("max_in_flight_per_key", &self.max_in_flight_per_key)
            .field("max_event_bytes", &self.max_event_bytes)
            .field("retention", &self.retention)
            .field("storage", &self.storage)
            .field("replicas", &self.replicas)
            .field("max_age", &self.max_age)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("prefetch", &self.prefetch)
            .field("dead_letter", &self.dead_letter)
            .field("tls", &self.tls)
            .field("client_name", &self.client_name)
            .finish()
    }
}

/// `url` (possibly several, comma-separated) with every password or token
/// in the user-info part replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let (scheme, rest) = match one.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, one),
            };
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let redacted = match rest[..authority_end].rsplit_once('@') {
                Some((userinfo, host)) => {
                    let userinfo = match userinfo.split_once(':') {
                        Some((user, _password)) => format!("{user}:***"),
                        // A lone user-info part is a token.
                        None => "***".to_owned(),
                    };
                    format!("{userinfo}@{host}{}", &rest[authority_end..])
                }
                None => rest.to_owned(),
            };
            match scheme {
                Some(scheme) => format!("{scheme}://{redacted}"),
                None => redacted,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Fails with a [`ErrorKind::Config`] error naming `key` unless `path` can
/// be opened for reading (async-nats reads it only while connecting, where a
/// missing file would look like a failed connection).
fn readable(key: &str, path: &std::path::Path) -> Result<()> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        Error::with_source(
            ErrorKind::Config {
                key: key.into(),
                reason: format!("cannot read `{}`", path.display()),
            },
            e,
        )
    })
}

fn config_error(key: &str, reason: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config {
        key: key.into(),
        reason: reason.into(),
    })
}

fn bad_value(key: &str, value: &str, expected: &str) -> Error {
    config_error(key, format!("`{value}` is not one of {expected}"))
}

/// `true` or `false` (also `1`/`0`, `yes`/`no`, `on`/`off`), any case.
fn parse_flag(key: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(bad_value(key, value, "`true` or `false`")),
    }
}

fn parse_positive(key: &str, value: &str) -> Result<NonZeroUsize> {
    value.parse::<NonZeroUsize>().map_err(|e| {
        Error::with_source(
            ErrorKind::Config {
                key: key.into(),
                reason: format!("`{value}` is not a positive integer"),
            },
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<NatsConfig> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        NatsConfig::from_lookup(|key| Ok(vars.get(key).cloned()))
    }

    #[test]
    fn empty_environment_gives_the_defaults() {
        assert_eq!(from(&[]).expect("valid"), NatsConfig::default());
        assert_eq!(NatsConfig::default().server_url(), DEFAULT_URL);
    }

    #[test]
    fn every_variable_is_read() {
        let config = from(&[
            ("NATS_URL", "nats://n1:4222,nats://n2:4222"),
            ("NATS_TOKEN", "s3cret"),
            ("NATS_STREAM_PREFIX", "EV_"),
            ("NATS_PUBLISH_MODE", "Structured"),
            ("NATS_MAX_IN_FLIGHT_PER_KEY", "4"),
            ("NATS_MAX_EVENT_BYTES", "4096"),
            ("NATS_STREAM_RETENTION", "workqueue"),
            ("NATS_STREAM_STORAGE", "memory"),
            ("NATS_STREAM_REPLICAS", "3"),
            ("NATS_STREAM_MAX_AGE", "60"),
            ("NATS_MAX_ACK_PENDING", "1"),
            ("NATS_PREFETCH", "8"),
            ("NATS_DEAD_LETTER", "false"),
            ("NATS_TLS", "TRUE"),
            ("NATS_CA", "/etc/nats/ca.pem"),
            ("NATS_CERT", "/etc/nats/client.pem"),
            ("NATS_KEY", "/etc/nats/client-key.pem"),
            ("NATS_CLIENT_NAME", "billing"),
        ])
        .expect("valid");
        assert_eq!(config.server_url(), "nats://n1:4222,nats://n2:4222");
        assert_eq!(config.auth, Auth::Token("s3cret".into()));
        assert_eq!(config.prefix(), "EV_");
        assert_eq!(config.mode(), Mode::Structured);
        assert_eq!(config.in_flight_per_key(), 4);
        assert_eq!(config.event_limit(), Some(4096));
        assert_eq!(config.stream_retention(), Retention::WorkQueue);
        assert_eq!(config.stream_storage(), Storage::Memory);
        assert_eq!(config.stream_replicas(), 3);
        assert_eq!(config.stream_max_age(), Some(Duration::from_secs(60)));
        assert_eq!(config.ack_pending_limit(), 1);
        assert_eq!(config.prefetch_count(), 8);
        assert!(!config.dead_letter_enabled());
        assert_eq!(config.client_name_value(), Some("billing"));
        assert_eq!(
            config.tls,
            Tls {
                required: true,
                ca_file: Some("/etc/nats/ca.pem".into()),
                client: Some((
                    "/etc/nats/client.pem".into(),
                    "/etc/nats/client-key.pem".into()
                )),
            }
        );
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        for (key, value) in [("NATS_CERT", "/c.pem"), ("NATS_KEY", "/k.pem")] {
            let err = from(&[(key, value)]).expect_err(key);
            assert!(
                matches!(err.kind(), ErrorKind::Config { key: got, .. } if got == key),
                "{err}"
            );
        }
    }

    /// A TLS file that cannot be read is a configuration error naming the
    /// setting and the file, found before any connection is tried.
    #[tokio::test]
    async fn unreadable_tls_files_are_configuration_errors() {
        let missing = std::env::temp_dir().join("no-such-dir-for-nats-tls/ca.pem");
        let readable_file = std::env::current_exe().expect("the test binary");
        for (config, key) in [
            (NatsConfig::builder().tls_ca_file(&missing), "tls_ca_file"),
            (
                NatsConfig::builder().tls_client_certificate(&missing, &readable_file),
                "tls_client_certificate",
            ),
            (
                NatsConfig::builder().tls_client_certificate(&readable_file, &missing),
                "tls_client_certificate",
            ),
        ] {
            let err = config.connect_options().await.expect_err(key);
            match err.kind() {
                ErrorKind::Config { key: got, reason } => {
                    assert_eq!(got, key);
                    assert!(reason.contains("no-such-dir-for-nats-tls"), "{reason}");
                }
                other => panic!("{key}: {other:?}"),
            }
            assert!(!err.is_retryable());
        }
        assert!(
            NatsConfig::builder()
                .tls_ca_file(&readable_file)
                .connect_options()
                .await
                .is_ok()
        );
    }

    #[test]
    fn malformed_values_name_their_variable() {
        for (key, value) in [
            ("NATS_PUBLISH_MODE", "xml"),
            ("NATS_MAX_IN_FLIGHT_PER_KEY", "0"),
            ("NATS_MAX_EVENT_BYTES", "0"),
            ("NATS_STREAM_REPLICAS", "-1"),
            ("NATS_STREAM_MAX_AGE", "1h"),
            ("NATS_STREAM_RETENTION", "forever"),
            ("NATS_DEAD_LETTER", "maybe"),
            ("NATS_TLS", "sometimes"),
        ] {
            let err = from(&[(key, value)]).expect_err(key);
            match err.kind() {
                ErrorKind::Config { key: got, .. } => assert_eq!(got, key),
                other => panic!("{key}: {other:?}"),
            }
            assert!(!err.is_retryable());
        }
    }

    #[test]
    fn authentication_methods_are_exclusive_and_complete() {
        assert!(from(&[("NATS_TOKEN", "t"), ("NATS_CREDS", "/c")]).is_err());
        assert!(from(&[("NATS_USER", "u")]).is_err());
        assert!(from(&[("NATS_PASSWORD", "p")]).is_err());
        let config = from(&[("NATS_USER", "u"), ("NATS_PASSWORD", "p")]).expect("valid");
        assert_eq!(
            config.auth,
            Auth::UserPassword {
                user: "u".into(),
                password: "p".into()
            }
        );
        let config = from(&[("NATS_CREDS", "/etc/nats/app.creds")]).expect("valid");
        assert_eq!(
            config.auth,
            Auth::CredentialsFile("/etc/nats/app.creds".into())
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        for config in [
            NatsConfig::builder()
                .url("nats://alice:hunter2@host:4222")
                .user_and_password("bob", "hunter2"),
            NatsConfig::builder()
                .url("nats://hunter2@a:4222,tls://carol:hunter2@b:4222/x")
                .token("hunter2"),
        ] {
            let debug = format!("{config:?}");
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains("***"), "{debug}");
        }
        let debug = format!("{:?}", NatsConfig::builder().url("nats://alice:pw@h:1"));
        assert!(debug.contains("alice:***@h:1"), "{debug}");
    }

    #[test]
    fn stream_prefix_is_checked() {
        assert!(NatsConfig::default().validate().is_ok());
        assert!(NatsConfig::builder().stream_prefix("").validate().is_ok());
        for bad in ["CE.", "a b", "x*", "y>", "p/q"] {
            assert!(
                NatsConfig::builder().stream_prefix(bad).validate().is_err(),
                "{bad}"
            );
        }
    }
}
