//! Messages whose headers the NATS client cannot read.
//!
//! async-nats parses each message's headers in its connection reader. A
//! header block it refuses (bytes that are not UTF-8, a header name with a
//! space, a line without a colon) is an I/O error there: the client drops
//! the connection and connects again, and the message never reaches the
//! subscription. A client in another language may well have written it (a
//! Go `nats.Header` value is any bytes). Without more, JetStream would
//! redeliver it after every ack deadline and cut the connection each time,
//! for ever.
//!
//! So after each reconnection a subscription's [`Sweeper`] reads its
//! consumer's state and looks through the stream between the ack floor and
//! the last delivered sequence with `STREAM.MSG.GET`, whose JSON reply
//! carries a message's headers base64-encoded, out of the client parser's
//! way. A message whose headers [`refusal`] finds unreadable is copied to
//! the dead-letter subject (payload unchanged, the header block base64 in
//! [`DLQ_HEADERS_HEADER`](super::DLQ_HEADERS_HEADER)) and terminated for the
//! group with an acknowledgement sent to its ack subject, built from the
//! stream sequence (nats-server takes the delivery's own sequence from its
//! pending record).

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use base64::Engine as _;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::error::{self, Class};
use super::{Connection, DLQ_HEADERS_HEADER, Inner};
use crate::error::{Error, ErrorKind, Result};
use crate::subscriber::ConsumerGroup;
use crate::topic::Topic;

/// The most stream sequences one sweep reads.
const MAX_SWEEP: u64 = 10_000;

/// The pause before a failed sweep is tried again, doubled after each
/// failure up to [`SWEEP_RETRY_MAX`].
const SWEEP_RETRY: Duration = Duration::from_secs(2);

/// The longest pause between tries of a failing sweep.
const SWEEP_RETRY_MAX: Duration = Duration::from_secs(60);

/// Why async-nats 0.51 refuses `header` (a message's header block, from
/// `NATS/1.0` to the blank line), or `None` if it reads it.
///
/// The steps and their order are those of the client's connection reader
/// (`Connection::try_read_op`, `HMSG`); a test feeds every case to the real
/// client over a socket and checks the two agree.
pub(crate) fn refusal(header: &[u8]) -> Option<String> {
    let Ok(text) = std::str::from_utf8(header) else {
        return Some("the message's header block is not UTF-8".to_owned());
    };
    let mut lines = text.lines().peekable();
    let Some(version) = lines.next() else {
        return Some("the message's header block has no version line".to_owned());
    };
    let Some(suffix) = version.strip_prefix("NATS/1.0").map(str::trim) else {
        return Some("the message's header block does not begin with `NATS/1.0`".to_owned());
    };
    let status = suffix
        .split_once(' ')
        .map_or(suffix, |(status, _)| status.trim());
    if !status.is_empty() && status.parse::<StatusCode>().is_err() {
        return Some(format!(
            "the message's header status `{}` is not a status code",
            status.escape_debug()
        ));
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, _)) = line.split_once(':') else {
            return Some("a header line of the message has no `:`".to_owned());
        };
        if let Err(e) = HeaderName::from_str(name) {
            return Some(format!(
                "the message's header name `{}` is refused: {e}",
                name.escape_debug()
            ));
        }
        // Continuation lines belong to the value.
        while lines
            .next_if(|s| s.starts_with(char::is_whitespace))
            .is_some()
        {}
    }
    None
}

/// The part of a consumer-info reply a sweep reads.
#[derive(Debug, Deserialize)]
struct ConsumerState {
    #[serde(default)]
    error: Option<jetstream::Error>,
    #[serde(default)]
    delivered: Option<Sequences>,
    #[serde(default)]
    ack_floor: Option<Sequences>,
    #[serde(default)]
    num_ack_pending: u64,
}

#[derive(Debug, Deserialize)]
struct Sequences {
    stream_seq: u64,
}

/// A `STREAM.MSG.GET` reply.
#[derive(Debug, Deserialize)]
struct GetReply {
    #[serde(default)]
    error: Option<jetstream::Error>,
    #[serde(default)]
    message: Option<Stored>,
}

/// A stored message, headers and payload base64-encoded.
#[derive(Debug, Deserialize)]
struct Stored {
    seq: u64,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

/// Finds and removes, for one subscription's group, the messages the
/// client cannot read (see the [module docs](self)).
pub(super) struct Sweeper {
    pub(super) inner: Arc<Inner>,
    /// The subscription's own connection, whose reconnections `reconnects` counts.
    pub(super) conn: Connection,
    pub(super) stream: String,
    pub(super) topic: Topic,
    pub(super) group: ConsumerGroup,
    pub(super) reconnects: watch::Receiver<u64>,
    pub(super) cancel: CancellationToken,
    /// Sequences this subscription dead-lettered and terminated above the
    /// ack floor, so the next sweep does not copy them again.
    pub(super) done: BTreeSet<u64>,
}

impl Sweeper {
    /// Sweeps after each reconnection until the subscription stops.
    pub(super) async fn run(mut self) {
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                changed = self.reconnects.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            let mut pause = SWEEP_RETRY;
            loop {
                let cancel = self.cancel.clone();
                let swept = tokio::select! {
                    () = cancel.cancelled() => return,
                    swept = self.sweep() => swept,
                };
                match swept {
                    Ok(0) => break,
                    Ok(removed) => {
                        tracing::info!(removed, "removed messages the NATS client cannot read");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not look for messages the NATS client cannot read; trying again in {pause:?}");
                        tokio::select! {
                            () = self.cancel.cancelled() => return,
                            () = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(SWEEP_RETRY_MAX);
                    }
                }
            }
        }
    }

    /// One look through the group's unacknowledged range; returns how many
    /// messages it removed.
    pub(super) async fn sweep(&mut self) -> Result<usize> {
        let state: ConsumerState = self
            .request(
                format!("CONSUMER.INFO.{}.{}", self.stream, self.group),
                serde_json::json!({}),
            )
            .await?;
        if let Some(e) = state.error {
            return Err(api_error("consumer info", e, self.inner.timeout()));
        }
        let floor = state.ack_floor.map_or(0, |s| s.stream_seq);
        let delivered = state.delivered.map_or(0, |s| s.stream_seq);
        self.done = self.done.split_off(&floor.saturating_add(1));
        if state.num_ack_pending == 0 || delivered <= floor {
            return Ok(0);
        }
        let mut removed = 0;
        let mut next = floor + 1;
        let mut reads = 0;
        while next <= delivered {
            if reads == MAX_SWEEP {
                tracing::warn!(
                    from = next,
                    to = delivered,
                    "stopped looking for messages the NATS client cannot read after {MAX_SWEEP}; the next reconnection looks again"
                );
                break;
            }
            reads += 1;
            let reply: GetReply = self
                .request(
                    format!("STREAM.MSG.GET.{}", self.stream),
                    serde_json::json!({ "seq": next, "next_by_subj": self.topic.as_str() }),
                )
                .await?;
            let stored = match (reply.error, reply.message) {
                (None, Some(stored)) => stored,
                (Some(e), _) if e.code() == 404 => break,
                (Some(e), _) => {
                    return Err(api_error("stream message get", e, self.inner.timeout()));
                }
                (None, None) => break,
            };
            if stored.seq > delivered {
                break;
            }
            next = stored.seq + 1;
            if self.done.contains(&stored.seq) {
                continue;
            }
            if self.remove_if_unreadable(stored).await? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Dead-letters and terminates `stored` if the client cannot read its
    /// headers.
    async fn remove_if_unreadable(&mut self, stored: Stored) -> Result<bool> {
        let engine = base64::engine::general_purpose::STANDARD;
        let Some(encoded) = stored.hdrs.filter(|h| !h.is_empty()) else {
            return Ok(false);
        };
        let header = engine
            .decode(&encoded)
            .map_err(|e| self.malformed("stream message get (headers not base64)", e))?;
        let Some(why) = refusal(&header) else {
            return Ok(false);
        };
        let payload = match stored.data {
            Some(data) => engine
                .decode(data)
                .map_err(|e| self.malformed("stream message get (data not base64)", e))?,
            None => Vec::new(),
        };
        let seq = stored.seq;
        let reason = Error::new(ErrorKind::InvalidEvent {
            reason: format!(
                "{why}; the NATS client cannot read it, so the dead letter carries the header block base64-encoded"
            ),
        });
        tracing::error!(
            stream.sequence = seq,
            error = %reason,
            "a message on the topic cannot be read by the NATS client; it is dead-lettered and terminated"
        );
        if self.inner.config.dead_letter_enabled() {
            let stored = self
                .inner
                .dead_letter_parts(
                    &self.topic,
                    &self.group,
                    payload.into(),
                    HeaderMap::from_iter([(
                        HeaderName::from_static(DLQ_HEADERS_HEADER),
                        HeaderValue::from(encoded),
                    )]),
                    seq,
                    &reason,
                )
                .await;
            match stored {
                Ok(dlq) => {
                    tracing::info!(stream.sequence = seq, dead_letter.subject = %dlq, "dead-lettered");
                }
                // Not stored: the look fails and is tried again.
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => {
                    tracing::error!(
                        stream.sequence = seq,
                        error = %e,
                        "the message cannot be dead-lettered; it is terminated and stays in the topic's stream"
                    );
                }
            }
        }
        // `<delivery count>.<stream seq>.<delivery seq>.<time>.<pending>`;
        // the server uses the pending record's own delivery sequence.
        let subject = format!("$JS.ACK.{}.{}.1.{seq}.0.0.0", self.stream, self.group);
        self.conn
            .client
            .request(subject, "+TERM".into())
            .await
            .map_err(|e| {
                let class = match e.kind() {
                    async_nats::RequestErrorKind::TimedOut => Class::Timeout,
                    _ => Class::Connection,
                };
                error::classify("terminate", class, self.inner.timeout(), e)
            })?;
        self.done.insert(seq);
        Ok(true)
    }

    /// A reply the server should not have sent.
    fn malformed(&self, operation: &'static str, e: base64::DecodeError) -> Error {
        error::classify(operation, Class::Permanent, self.inner.timeout(), e)
    }

    async fn request<T: serde::de::DeserializeOwned>(
        &self,
        subject: String,
        body: serde_json::Value,
    ) -> Result<T> {
        self.conn.js.request(subject, &body).await.map_err(|e| {
            let class = match e.kind() {
                jetstream::context::RequestErrorKind::TimedOut => Class::Timeout,
                _ => Class::Connection,
            };
            error::classify("JetStream API request", class, self.inner.timeout(), e)
        })
    }
}

fn api_error(operation: &'static str, e: jetstream::Error, timeout: Duration) -> Error {
    let text = e.to_string();
    error::classify(operation, Class::Api(e), timeout, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::net::TcpListener;

    /// Header blocks the client reads, and blocks it refuses (the last
    /// field says which we expect; the real client decides the test).
    const CASES: &[(&[u8], bool)] = &[
        (b"NATS/1.0\r\nce-id: 1\r\n\r\n", true),
        (b"NATS/1.0\r\n\r\n", true),
        (b"NATS/1.0 408 Request Timeout\r\n\r\n", true),
        (b"NATS/1.0\r\nce-id: a\r\n  continued\r\n\r\n", true),
        (b"NATS/1.0\r\nX-Empty:\r\n\r\n", true),
        (b"NATS/1.0\r\nce-id: caf\xc3\xa9\r\n\r\n", true),
        (b"NATS/1.0\r\n: v\r\n\r\n", true),
        (b"NATS/1.0\r\nce-\xffid: v\r\n\r\n", false),
        (b"NATS/1.0\r\nce-id: \xff\r\n\r\n", false),
        (b"HTTP/1.0\r\n\r\n", false),
        (b"NATS/1.0 abc\r\n\r\n", false),
        (b"NATS/1.0\r\nno colon\r\n\r\n", false),
        (b"NATS/1.0\r\nbad name: v\r\n\r\n", false),
        (b"NATS/1.0\r\nA\x01B: v\r\n\r\n", false),
    ];

    /// Serves one client as a NATS server would, for as many connections
    /// as it makes (the client keeps the old one open while it connects
    /// again): on the first subscription it sends a message with `header`,
    /// then (on every connection) a plain message `end`.
    async fn serve(listener: TcpListener, header: &'static [u8]) {
        let sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(connection(socket, header, Arc::clone(&sent)));
        }
    }

    async fn connection(
        socket: tokio::net::TcpStream,
        header: &'static [u8],
        sent: Arc<std::sync::atomic::AtomicBool>,
    ) {
        let (read, mut write) = socket.into_split();
        let info = "INFO {\"server_id\":\"t\",\"server_name\":\"t\",\"version\":\"2.9.10\",\"proto\":1,\"headers\":true,\"max_payload\":1048576}\r\n";
        if write.write_all(info.as_bytes()).await.is_err() {
            return;
        }
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut out = Vec::new();
            if line.starts_with("PING") {
                out.extend_from_slice(b"PONG\r\n");
            } else if let Some(rest) = line.strip_prefix("SUB ") {
                let sid = rest.split_whitespace().last().unwrap_or("1").to_owned();
                if !sent.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    let payload = b"case";
                    out.extend_from_slice(
                        format!(
                            "HMSG t {sid} {} {}\r\n",
                            header.len(),
                            header.len() + payload.len()
                        )
                        .as_bytes(),
                    );
                    out.extend_from_slice(header);
                    out.extend_from_slice(payload);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(format!("MSG t {sid} 3\r\nend\r\n").as_bytes());
            }
            if !out.is_empty() && write.write_all(&out).await.is_err() {
                return;
            }
        }
    }

    /// Whether the real client hands over a message with `header`.
    async fn client_reads(header: &'static [u8]) -> bool {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(serve(listener, header));
        let client = async_nats::connect(address.to_string())
            .await
            .expect("the client connects to the test server");
        let mut sub = client.subscribe("t").await.expect("subscribed");
        let mut read = false;
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .expect("the end marker arrives")
                .expect("the subscription stays open");
            if message.payload.as_ref() == b"end" {
                break;
            }
            read = true;
        }
        server.abort();
        read
    }

    #[tokio::test]
    async fn refusal_agrees_with_the_client() {
        for &(header, readable) in CASES {
            let shown = String::from_utf8_lossy(header).escape_debug().to_string();
            let ours = refusal(header);
            assert_eq!(
                client_reads(header).await,
                ours.is_none(),
                "{shown}: refusal says {ours:?}"
            );
            assert_eq!(ours.is_none(), readable, "{shown}: {ours:?}");
        }
    }
}
