//! Helpers for the end-to-end tests of this workspace (`cargo test -p e2e`).
//!
//! The end-to-end tests talk to real servers on 127.0.0.1: PostgreSQL, NATS with
//! JetStream, and a Kafka-protocol broker (Tansu). `source tests/harness/up.sh`
//! (from the repository root) starts whichever of them is missing, waits until each
//! one really answers, and exports where they are:
//!
//! | server | variable | default |
//! | --- | --- | --- |
//! | PostgreSQL | `DATABASE_URL` | [`DEFAULT_DATABASE_URL`] |
//! | NATS (JetStream) | `NATS_URL` | [`DEFAULT_NATS_URL`] |
//! | Kafka (Tansu) | `KAFKA_BOOTSTRAP_SERVERS` | [`DEFAULT_KAFKA_BOOTSTRAP_SERVERS`] |
//!
//! These tests never skip: a test that cannot reach its server fails, with a message
//! that names the server and says how to start it (see [`require`]).

pub mod process;
pub mod restart;
pub mod tansu;
pub mod tls;

use std::fmt;
use std::future::IntoFuture;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `DATABASE_URL` when it is not set: the test database of the local PostgreSQL.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// `NATS_URL` when it is not set: the local NATS server (with JetStream).
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// `KAFKA_BOOTSTRAP_SERVERS` when it is not set: the local Tansu broker.
pub const DEFAULT_KAFKA_BOOTSTRAP_SERVERS: &str = "127.0.0.1:9092";

/// What to do when a server is missing; part of every "not reachable" message.
pub const HARNESS_HINT: &str = "start the servers with `source tests/harness/up.sh` \
     (from the repository root) and run the tests again in that shell";

/// How long [`require`] waits for a TCP connection to a server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A server that the end-to-end tests need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Server {
    /// PostgreSQL, at `DATABASE_URL`.
    Postgres,
    /// NATS with JetStream, at `NATS_URL`.
    Nats,
    /// A Kafka-protocol broker (Tansu in the harness), at `KAFKA_BOOTSTRAP_SERVERS`.
    Kafka,
}

impl Server {
    /// Every server, in the order the harness starts them.
    pub const ALL: [Server; 3] = [Server::Postgres, Server::Nats, Server::Kafka];

    /// The server's name as it appears in messages, e.g. `Kafka (Tansu)`.
    pub const fn name(self) -> &'static str {
        match self {
            Server::Postgres => "PostgreSQL",
            Server::Nats => "NATS (JetStream)",
            Server::Kafka => "Kafka (Tansu)",
        }
    }

    /// The environment variable that holds the server's address.
    pub const fn env_var(self) -> &'static str {
        match self {
            Server::Postgres => "DATABASE_URL",
            Server::Nats => "NATS_URL",
            Server::Kafka => "KAFKA_BOOTSTRAP_SERVERS",
        }
    }

    /// The address used when [`Server::env_var`] is unset or empty.
    pub const fn default_url(self) -> &'static str {
        match self {
            Server::Postgres => DEFAULT_DATABASE_URL,
            Server::Nats => DEFAULT_NATS_URL,
            Server::Kafka => DEFAULT_KAFKA_BOOTSTRAP_SERVERS,
        }
    }

    /// The port used when the address names none.
    pub const fn default_port(self) -> u16 {
        match self {
            Server::Postgres => 5432,
            Server::Nats => 4222,
            Server::Kafka => 9092,
        }
    }

    /// The server's address: the environment variable, else the default.
    pub fn url(self) -> String {
        match std::env::var(self.env_var()) {
            Ok(value) if !value.trim().is_empty() => value.trim().to_owned(),
            _ => self.default_url().to_owned(),
        }
    }

    /// The host and port of the first address in [`Server::url`].
    pub fn host_port(self) -> (String, u16) {
        host_port(&self.url(), self.default_port())
    }

    /// The error for a server that cannot be reached or used: it names the server,
    /// where it was looked for, what went wrong (`detail`), and how to start it.
    pub fn unreachable(self, detail: impl fmt::Display) -> anyhow::Error {
        let (host, port) = self.host_port();
        anyhow::anyhow!(
            "{name} is not reachable on {host}:{port} ({var}={url}): {detail}. \
             These tests never skip: {HARNESS_HINT}, or point {var} at a running server.",
            name = self.name(),
            var = self.env_var(),
            url = redact(&self.url()),
        )
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `DATABASE_URL`, or [`DEFAULT_DATABASE_URL`].
pub fn database_url() -> String {
    Server::Postgres.url()
}

/// `NATS_URL`, or [`DEFAULT_NATS_URL`].
pub fn nats_url() -> String {
    Server::Nats.url()
}

/// `KAFKA_BOOTSTRAP_SERVERS`, or [`DEFAULT_KAFKA_BOOTSTRAP_SERVERS`].
pub fn kafka_bootstrap_servers() -> String {
    Server::Kafka.url()
}

/// Returns the server's address once a TCP connection to it succeeds.
///
/// Never skips: when the server cannot be reached within [`CONNECT_TIMEOUT`], the
/// error names the server and tells to run `source tests/harness/up.sh`. Tests call
/// it first and propagate the error with `?`, so a missing server fails the test.
pub fn require(server: Server) -> anyhow::Result<String> {
    let url = server.url();
    let (host, port) = host_port(&url, server.default_port());
    let addrs = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| server.unreachable(format_args!("cannot resolve {host}: {e}")))?;
    let mut last_error = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(_) => return Ok(url),
            Err(e) => last_error = Some(format!("cannot connect to {addr}: {e}")),
        }
    }
    Err(server.unreachable(last_error.unwrap_or_else(|| format!("{host} has no address"))))
}

/// Awaits `fut` for at most `limit`; past that, fails with an error naming `server`
/// and `what` was awaited, so a hung server fails the test instead of blocking it.
///
/// The future's own output (often a `Result`) is returned as is, for the caller to
/// check: `within(Server::Postgres, "begin", limit, pool.begin()).await??`.
pub async fn within<F: IntoFuture>(
    server: Server,
    what: &str,
    limit: Duration,
    fut: F,
) -> anyhow::Result<F::Output> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow::anyhow!("{server}: timed out after {limit:?} waiting for {what}"))
}

/// A name no other test run uses: `prefix`, the process id, the time and a counter,
/// joined by `_`. With a lowercase `prefix` it is a valid PostgreSQL identifier,
/// NATS stream or subject token, and Kafka topic or group id.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{}_{nanos}_{n}", std::process::id())
}

/// The value of a Kafka record's header `name`, as text (lossily), if it
/// has one.
pub fn kafka_header(message: &impl rdkafka::Message, name: &str) -> Option<String> {
    use rdkafka::message::Headers as _;
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The host and port of the first address in `url`, which may carry a scheme,
/// credentials, a path, a query, several comma-separated addresses, or an IPv6
/// host in brackets; `default_port` when it names no port.
pub fn host_port(url: &str, default_port: u16) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let first = rest.split(',').next().unwrap_or_default();
    let authority = first.split(['/', '?']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((host, port)) => (host, port.strip_prefix(':').unwrap_or_default()),
            None => (v6, ""),
        }
    } else {
        authority.rsplit_once(':').unwrap_or((authority, ""))
    };
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    (host.to_owned(), port.parse().unwrap_or(default_port))
}

/// `url` with any password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, tail)) = rest.split_once('@')
        && let Some((user, _password)) = userinfo.split_once(':')
    {
        return format!("{scheme}://{user}:***@{tail}");
    }
    url.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parses_the_usual_shapes() {
        assert_eq!(
            host_port(DEFAULT_DATABASE_URL, 1),
            ("127.0.0.1".into(), 5432)
        );
        assert_eq!(host_port(DEFAULT_NATS_URL, 1), ("127.0.0.1".into(), 4222));
        assert_eq!(
            host_port(DEFAULT_KAFKA_BOOTSTRAP_SERVERS, 1),
            ("127.0.0.1".into(), 9092)
        );
        assert_eq!(
            host_port("postgres://u:p@db.example:6543/x?sslmode=disable", 5432),
            ("db.example".into(), 6543)
        );
        assert_eq!(host_port("localhost/x", 5432), ("localhost".into(), 5432));
        assert_eq!(
            host_port("PLAINTEXT://k1:19092,k2:29092", 9092),
            ("k1".into(), 19092)
        );
        assert_eq!(host_port("nats://[::1]:4333", 4222), ("::1".into(), 4333));
        assert_eq!(host_port("[::1]", 4222), ("::1".into(), 4222));
    }

    #[test]
    fn redact_hides_passwords_only() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact(DEFAULT_DATABASE_URL), DEFAULT_DATABASE_URL);
        assert_eq!(redact("127.0.0.1:9092"), "127.0.0.1:9092");
    }

    #[test]
    fn unreachable_names_the_server_and_the_harness() {
        for server in Server::ALL {
            let message = server.unreachable("boom").to_string();
            assert!(message.starts_with(server.name()), "{message}");
            assert!(message.contains(server.env_var()), "{message}");
            assert!(message.contains("source tests/harness/up.sh"), "{message}");
        }
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique_name("t"), unique_name("t"));
    }
}
