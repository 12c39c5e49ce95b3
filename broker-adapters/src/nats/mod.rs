//! The NATS JetStream adapter: [`NatsBroker`] is both the [`Publisher`] and
//! the [`Subscriber`], on [async-nats](https://docs.rs/async-nats).
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> broker_adapters::Result<()> {
//! use broker_adapters::nats::{NatsBroker, NatsConfig};
//! use broker_adapters::prelude::*;
//! use futures_util::StreamExt;
//!
//! // NATS_URL, NATS_CREDS, ... (see `NatsConfig`); defaults to nats://127.0.0.1:4222.
//! let broker = NatsBroker::connect(NatsConfig::from_env()?).await?;
//! let orders = Topic::from_static("orders.created");
//!
//! // Stream `CE_orders_created` and the durable consumer `billing` are
//! // created on first use.
//! let mut billing = broker.subscribe(&orders, SubscribeOptions::new("billing")?).await?;
//! broker.publish_json(&orders, "com.example.order.created", "/orders", &42).await?;
//!
//! let mut delivery = billing.next().await.expect("subscribed")?;
//! assert_eq!(delivery.event().data_as::<u32>()?, 42);
//! delivery.ack().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Topics and streams
//!
//! A topic is the NATS subject of the same name. Before the first publish or
//! subscription on a topic, the adapter looks for a stream that already
//! stores the subject (one an operator made, say `ORDERS` on `orders.>`) and
//! uses it; otherwise it creates one stream per topic, named after the topic
//! with `.` replaced by `_` and [`NatsConfig::stream_prefix`] in front: topic
//! `orders.created` is stream `CE_orders_created` on subject
//! `orders.created`. Creation is idempotent, so any number of processes may
//! race to do it. The stream settings come from [`NatsConfig`] (retention,
//! storage, replicas, max age). [`NatsBroker::provision`] does this ahead of
//! time.
//!
//! # Publishing
//!
//! Events are checked ([`ErrorKind::InvalidEvent`] for every event of a
//! batch before any is sent; [`ErrorKind::EventTooLarge`] against
//! [`NatsConfig::max_event_bytes`], which defaults to the server's
//! `max_payload`, as each is encoded), encoded with the
//! [CloudEvents NATS binding](crate::binding) (binary mode by default: `ce-`
//! headers and the data as the payload), and published with the event id as
//! `Nats-Msg-Id`, so JetStream stores an event published twice within its
//! duplicate window (2 minutes by default) once. `publish` returns after
//! JetStream's publish acknowledgement: the event is stored.
//!
//! While the connection is down, a publish waits for it to come back, up
//! to [`NatsConfig::request_timeout`], and then fails with a retryable
//! [`ErrorKind::Connection`]; nothing is handed to async-nats meanwhile.
//! (async-nats keeps what it is given while disconnected and sends it once
//! it reconnects, long after the publish failed and its caller sent it
//! again: memory held through an outage, and stale copies after it.)
//!
//! `publish_batch` pipelines: it sends events without waiting for each
//! acknowledgement, except that an event waits until the one before it with
//! the same `partitionkey` is stored. Events of one key are therefore stored
//! in batch order, and when the batch fails part-way (a server that crashed
//! with events already written to it, a stream leader change refusing one
//! event) what was stored of each key is a prefix of that key's events, so
//! publishing the batch again keeps every key's order: the events stored the
//! first time are de-duplicated by id. Events of different keys, and events
//! without a key, may be stored in any order relative to each other. A batch
//! whose events all share one key costs one round trip per event.
//! [`NatsConfig::max_in_flight_per_key`] lets more than one event of a key be
//! in flight: faster with few keys, but a failure can then store later
//! events of a key ahead of the failed one (its docs say when that matters).
//!
//! # Subscribing
//!
//! A consumer group is a durable JetStream pull consumer named after the
//! group, filtered on the topic's subject, with explicit acks, `ack_wait` from
//! [`SubscribeOptions::ack_deadline`], and `deliver_policy` `all`
//! ([`StartFrom::Earliest`]) or `new` ([`StartFrom::Latest`]) when it is
//! created. Every subscription of a group pulls from the same consumer, so
//! the members share the work; each fetches up to [`NatsConfig::prefetch`]
//! messages ahead. The ack deadline belongs to the consumer, so it is the
//! same for every member: a subscription with another ack deadline updates
//! the consumer's `ack_wait` for the whole group.
//!
//! Each subscription opens a connection of its own (with the broker's
//! settings), on which it pulls, receives and settles; it is closed once the
//! subscription has ended and its deliveries are gone. Whatever disturbs one
//! subscription's connection (a message the client cannot read drops it)
//! leaves the broker's publishes and the other subscriptions alone.
//!
//! Settling maps onto JetStream acks, each confirmed by the server before it
//! returns: [`ack`](crate::Delivery::ack) is `+ACK`,
//! [`term`](crate::Delivery::term) `+TERM`, [`nack`](crate::Delivery::nack)
//! `-NAK` with the delay, and [`in_progress`](crate::Delivery::in_progress)
//! `+WPI`, which resets the ack deadline. A delivery dropped unsettled is
//! nacked without delay. [`DeliveryInfo::attempt`](crate::DeliveryInfo::attempt) is
//! JetStream's delivery count. If a member crashes, what it held is
//! redelivered once its ack deadline passes; a subscription that is dropped
//! or [closed](crate::Subscription::close) nacks what it fetched and had not
//! handed out, so the group's other members get it at once (see [Leaving a
//! group](#leaving-a-group)).
//!
//! # Ordering
//!
//! JetStream hands the next messages of a consumer to whichever member asks,
//! and redelivers a nacked message while later ones flow on, so by itself it
//! keeps no per-key order once handlers run concurrently. Each subscription
//! therefore holds back what it fetched: it hands out at most one event per
//! `partitionkey` at a time, in stream order, and after a nack it holds the
//! key until the nacked event comes back (or, if another member got it, until
//! its nack delay plus the ack deadline have passed). A nacked event comes
//! back on the subscription's next pull request once its delay has passed,
//! so the subscription pulls for it even when the events held behind their
//! keys fill its prefetch window (which then grows by one per event due
//! back). Messages waiting behind their key are kept alive with progress
//! acks, so they are not redelivered elsewhere meanwhile. Events without a
//! key are not held back.
//!
//! **The guarantee is per subscription.** Within one member, events of a key
//! are handled in publish order, however many handlers run at once. Across
//! the members of a group, consecutive events of one key can go to different
//! members and be handled at the same time or out of order. To keep per-key
//! order across members, run one member per group, or set
//! [`NatsConfig::max_ack_pending`] to 1: JetStream then hands out one event
//! of the group at a time, in order, to whichever member (no concurrency).
//!
//! # Leaving a group
//!
//! When a subscription is dropped or closed, its background task stops
//! pulling, receives what the server already sent, unsubscribes its inbox and makes the server drop its
//! outstanding pull request, and only then nacks without delay, in stream
//! order: every event it fetched and had not handed out, the deliveries
//! dropped unsettled, and the events it had nacked (their delay passed) whose
//! redelivery it was still waiting for (the redelivery may have been on its
//! way to the inbox it gave up). A member that joins the group afterwards therefore gets a
//! key's released events before the later ones, and per-key order holds
//! across the hand-over. On a dropped subscription this happens in the
//! background, within a round trip or two to the server.
//!
//! What this cannot cover, and what then holds instead (at least once, with
//! the ack deadline as the bound):
//!
//! - A message the server sends to the outstanding pull request in the
//!   instant between the unsubscription and the server dropping the request
//!   (a new publish racing with the shutdown) reaches no one; it is
//!   redelivered after its ack deadline, and later events of its key may be
//!   handled by another member first.
//! - Events held behind a key that waits for a nack *with a delay* are
//!   nacked without delay, so they may come back before the delayed one.
//! - A member that crashes (its process, or its runtime, stops without
//!   running the shutdown) releases nothing: its events come back after
//!   their ack deadline.
//! - A delivery still handed out when the subscription ends can be settled
//!   as usual; dropped unsettled, it is nacked at once, but the later events
//!   of its key the subscription held were released before it and may be
//!   handled first by another member. Settle or drop deliveries before their
//!   subscription to keep the order.
//!
//! # Undecodable messages
//!
//! A message on the topic that is not a CloudEvent (published by a
//! non-CloudEvents client, say), or whose payload is larger than
//! [`NatsConfig::max_event_bytes`], never reaches handlers and never stalls
//! the subscription: it is logged at error level, copied unchanged
//! (payload and headers, except JetStream's own `Nats-*` headers) to the
//! dead-letter subject `<topic>.dlq` (stored in the stream for that
//! subject, created like any topic's), with the reason in
//! [`DLQ_REASON_HEADER`], and then terminated.
//! If the copy cannot be stored, the message is nacked and tried again after
//! a few seconds rather than dropped. With [`NatsConfig::dead_letter`] off it
//! is only logged and terminated; with limits retention it then stays in the
//! topic's stream until `max_age`.
//!
//! A message whose headers async-nats cannot read (a header block that is
//! not UTF-8, a header name with a space or a control character, a line
//! without a colon; a Go client can write such header values) never
//! reaches the subscription: the client drops the subscription's
//! connection on reading it and connects again. After each reconnection,
//! the subscription looks
//! through its group's unacknowledged range of the stream (from the ack
//! floor to the last delivered message, at most 10,000 messages per look)
//! with JetStream's message-get API, which returns headers base64-encoded.
//! Each such message is copied to `<topic>.dlq` with its payload unchanged,
//! the reason, and its header block base64-encoded in
//! [`DLQ_HEADERS_HEADER`] (none of its headers as headers), and then
//! terminated for the group. The events that arrived on the dropped
//! connection with it come back after their ack deadline, and acks in
//! flight on it may fail, as on any disconnection. The broker's publishes
//! and its other subscriptions are not disturbed: each subscription pulls
//! and settles on a connection of its own.
//!
//! # Server versions
//!
//! The adapter needs nats-server 2.9 or later (message headers, nack delays,
//! pull-request heartbeats) and is tested against 2.9.10. nats-server 2.9
//! drops a redelivery (nack or expired ack deadline) from its queue when it
//! comes due while the only pull requests waiting on the consumer belong to
//! members that are gone; the message then returns only after one more ack
//! deadline. A closing or dropped subscription makes the server forget its
//! own pull request before it nacks what it held, so this only happens after
//! a member crashed, for as long as its last pull request lives (30 s at
//! most).
//!
//! # Errors
//!
//! Connection losses and timeouts are retryable; rejected credentials
//! ([`ErrorKind::Config`]), invalid events and requests JetStream refuses as
//! invalid are not. The async-nats error is kept as the source.
//!
//! [`Publisher`]: crate::Publisher
//! [`Subscriber`]: crate::Subscriber
//! [`ErrorKind::InvalidEvent`]: crate::ErrorKind::InvalidEvent
//! [`ErrorKind::EventTooLarge`]: crate::ErrorKind::EventTooLarge
//! [`ErrorKind::Config`]: crate::ErrorKind::Config
//! [`SubscribeOptions::ack_deadline`]: crate::SubscribeOptions::ack_deadline
//! [`StartFrom::Earliest`]: crate::StartFrom::Earliest
//! [`StartFrom::Latest`]: crate::StartFrom::Latest

mod config;
mod error;
mod gate;
mod publisher;
mod subscriber;
mod unreadable;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use cloudevents::Event;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use self::config::{DEFAULT_STREAM_PREFIX, DEFAULT_URL, NatsConfig, Retention, Storage};
use self::error::Class;
use crate::error::{Error, ErrorKind, Result};
use crate::publisher::Publisher;
use crate::subscriber::{SubscribeOptions, Subscriber, Subscription};
use crate::topic::Topic;

/// The suffix of a topic's dead-letter subject: `orders.created.dlq`.
pub const DLQ_SUFFIX: &str = ".dlq";

/// The header of a dead-lettered message that says why it was dead-lettered.
pub const DLQ_REASON_HEADER: &str = "Backbone-Dlq-Reason";

/// The header of a dead-lettered message naming the topic it came from.
pub const DLQ_TOPIC_HEADER: &str = "Backbone-Dlq-Topic";

/// The header of a dead-lettered message naming the consumer group that found it.
pub const DLQ_GROUP_HEADER: &str = "Backbone-Dlq-Group";

/// The header of a dead-lettered message holding its sequence in the topic's stream.
pub const DLQ_SEQUENCE_HEADER: &str = "Backbone-Dlq-Stream-Sequence";

/// The header of a dead-lettered message whose headers the NATS client
/// cannot read: the original header block (from `NATS/1.0` to the blank
/// line), base64-encoded. Such a dead letter carries no other original header.
pub const DLQ_HEADERS_HEADER: &str = "Backbone-Dlq-Headers-Base64";

/// How many JetStream publish acknowledgements one connection awaits at most.
pub(crate) const MAX_PENDING_ACKS: usize = 4096;

/// The NATS JetStream broker: one connection for publishing, shared by
/// clones, and one more for each open subscription.
///
/// Implements [`Publisher`] and [`Subscriber`]; see the [module docs](self)
/// for how topics, consumer groups, ordering and dead letters map onto
/// JetStream.
#[derive(Clone)]
pub struct NatsBroker {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsConfig,
    max_event_bytes: usize,
    /// Topic → the stream that stores it, once provisioned.
    streams: Mutex<HashMap<Topic, String>>,
    /// Cancelled by `close`: every subscription's pull loop stops.
    shutdown: CancellationToken,
    closed: AtomicBool,
}

/// A client connection and the JetStream context on it. The broker
/// publishes on one; each subscription pulls and settles on one of its own
/// (see [Subscribing](self#subscribing)).
#[derive(Clone)]
struct Connection {
    client: async_nats::Client,
    js: jetstream::Context,
}

impl Connection {
    /// Connects to the server in `config`, with `name` as the connection's
    /// name on the server. The receiver counts the connection's
    /// reconnections (the first connection is not one).
    async fn open(
        config: &NatsConfig,
        name: Option<String>,
    ) -> Result<(Self, watch::Receiver<u64>)> {
        let connect_timeout = config.connect_timeout_value();
        let (reconnected, reconnects) = watch::channel(0_u64);
        let reconnected = Arc::new(reconnected);
        let disconnected = Arc::new(AtomicBool::new(false));
        let mut options = config.connect_options().await?;
        if let Some(name) = name {
            options = options.name(name);
        }
        let options = options.event_callback(move |event| {
            let reconnected = Arc::clone(&reconnected);
            let disconnected = Arc::clone(&disconnected);
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        disconnected.store(true, Ordering::Release);
                    }
                    // The first connection is not a reconnection.
                    async_nats::Event::Connected if disconnected.swap(false, Ordering::AcqRel) => {
                        reconnected.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    _ => {}
                }
            }
        });
        // The connect future is large: keep it off the stack.
        let client = Box::pin(options.connect(config.server_url()))
            .await
            .map_err(|e| error::connect(e, connect_timeout))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout_value())
            .max_ack_inflight(MAX_PENDING_ACKS)
            .backpressure_on_inflight(false)
            .build(client.clone());
        Ok((Self { client, js }, reconnects))
    }
}

impl NatsBroker {
    /// Connects to the server in `config` and checks that JetStream is enabled.
    ///
    /// # Errors
    ///
    /// - [`ErrorKind::Config`]: an invalid setting, an unreadable credentials
    ///   or TLS file, credentials the server rejected, or a failed TLS
    ///   handshake (not retryable);
    /// - [`ErrorKind::Connection`] or [`ErrorKind::Timeout`]: the server
    ///   cannot be reached (retryable);
    /// - [`ErrorKind::Broker`]: JetStream is not enabled on the server.
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        config.validate()?;
        let request_timeout = config.request_timeout_value();
        let name = config.client_name_value().map(str::to_owned);
        let (Connection { client, js }, _) = Connection::open(&config, name).await?;
        check_jetstream(&js, request_timeout).await?;
        let server_max = client.server_info().max_payload;
        let max_event_bytes = match config.event_limit() {
            Some(limit) if server_max > 0 => limit.min(server_max),
            Some(limit) => limit,
            None => server_max,
        };
        tracing::debug!(
            server = %config::redact_url(config.server_url()),
            max_event_bytes,
            "connected to NATS"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                js,
                config,
                max_event_bytes,
                streams: Mutex::new(HashMap::new()),
                shutdown: CancellationToken::new(),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The largest event [`publish`](Publisher::publish) accepts, in bytes
    /// as measured by [`EventExt::encoded_size`](crate::EventExt::encoded_size):
    /// [`NatsConfig::max_event_bytes`], capped at the server's `max_payload`.
    pub fn max_event_bytes(&self) -> usize {
        self.inner.max_event_bytes
    }

    /// The name of the stream the adapter creates for `topic`:
    /// [`NatsConfig::stream_prefix`] and the topic with `.` replaced by `_`.
    pub fn stream_name(&self, topic: &Topic) -> String {
        stream_name(self.inner.config.prefix(), topic)
    }

    /// Makes sure a stream stores `topic` and returns its name: an existing
    /// stream on the topic's subject, or one created as the [module
    /// docs](self#topics-and-streams) describe. Publishing and subscribing do
    /// this on first use; call it to fail early or to create topics ahead of
    /// time.
    ///
    /// # Errors
    ///
    /// The broker is closed, JetStream refused to create the stream, or a
    /// stream with the derived name exists for other subjects
    /// ([`ErrorKind::Config`]).
    pub async fn provision(&self, topic: &Topic) -> Result<String> {
        self.inner.check_open()?;
        self.inner.ensure_stream(topic).await
    }
}

impl fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBroker")
            .field("config", &self.inner.config)
            .field("max_event_bytes", &self.inner.max_event_bytes)
            .field("closed", &self.inner.closed.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

/// Fails unless JetStream answers for the account.
async fn check_jetstream(js: &jetstream::Context, timeout: Duration) -> Result<()> {
    const OPERATION: &str = "JetStream account check (is JetStream enabled?)";
    let response: serde_json::Value =
        js.request("INFO", &serde_json::json!({}))
            .await
            .map_err(|e| {
                let class = match e.kind() {
                    jetstream::context::RequestErrorKind::TimedOut => Class::Timeout,
                    jetstream::context::RequestErrorKind::NoResponders => Class::Permanent,
                    _ => Class::Connection,
                };
                error::classify(OPERATION, class, timeout, e)
            })?;
    match response.get("error") {
        None => Ok(()),
        Some(api) => {
            let text = api.to_string();
            let class = match serde_json::from_value::<jetstream::Error>(api.clone()) {
                Ok(api) => Class::Api(api),
                Err(_) => Class::Permanent,
            };
            Err(error::classify(OPERATION, class, timeout, text))
        }
    }
}

/// The stream name derived from `topic`.
fn stream_name(prefix: &str, topic: &Topic) -> String {
    format!("{prefix}{}", topic.as_str().replace('.', "_"))
}

impl Inner {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed("NATS broker"))
        } else {
            Ok(())
        }
    }

    fn timeout(&self) -> Duration {
        self.config.request_timeout_value()
    }

    fn cached_stream(&self, topic: &Topic) -> Option<String> {
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
            .cloned()
    }

    /// Forgets the stream of `topic`, e.g. after it was deleted.
    fn forget_stream(&self, topic: &Topic) {
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(topic);
    }

    /// The stream storing `topic`, found or created once per broker.
    async fn ensure_stream(&self, topic: &Topic) -> Result<String> {
        if let Some(name) = self.cached_stream(topic) {
            return Ok(name);
        }
        let name = match self.js.stream_by_subject(topic.as_str()).await {
            Ok(existing) => existing,
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamByNameErrorKind::NotFound
                ) =>
            {
                self.create_stream(topic).await?
            }
            Err(e) => return Err(error::lookup_stream(e, self.timeout())),
        };
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(topic.clone(), name.clone());
        Ok(name)
    }

    async fn create_stream(&self, topic: &Topic) -> Result<String> {
        let name = stream_name(self.config.prefix(), topic);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![topic.to_string()],
            retention: match self.config.stream_retention() {
                Retention::Limits => stream::RetentionPolicy::Limits,
                Retention::Interest => stream::RetentionPolicy::Interest,
                Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
            },
            storage: match self.config.stream_storage() {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            num_replicas: self.config.stream_replicas(),
            max_age: self.config.stream_max_age().unwrap_or_default(),
            ..stream::Config::default()
        };
        let stream = self
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| error::create_stream(e, self.timeout()))?;
        let subjects = &stream.cached_info().config.subjects;
        if !subjects.iter().any(|s| s == topic.as_str()) {
            return Err(Error::new(ErrorKind::Config {
                key: "stream_prefix".into(),
                reason: format!(
                    "stream `{name}` exists for subjects {subjects:?}, not for topic `{topic}`; \
                     another topic maps to the same stream name"
                ),
            }));
        }
        tracing::info!(stream = %name, topic = %topic, "created JetStream stream");
        Ok(name)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.shutdown.cancel();
    }

    async fn flush(&self) -> Result<()> {
        flush_within(&self.client, self.timeout()).await
    }
}

/// Sends what waits on `client`'s connection, waiting at most `timeout`:
/// while the connection is down async-nats keeps a flush waiting until it
/// is back, which may be never.
async fn flush_within(client: &async_nats::Client, timeout: Duration) -> Result<()> {
    match tokio::time::timeout(timeout, client.flush()).await {
        Ok(flushed) => flushed.map_err(|e| error::classify("flush", Class::Connection, timeout, e)),
        Err(elapsed) => Err(error::classify("flush", Class::Timeout, timeout, elapsed)),
    }
}

#[async_trait]
impl Publisher for NatsBroker {
    async fn publish(&self, topic: &Topic, event: Event) -> Result<()> {
        self.inner.publish(topic, vec![event]).await
    }

    /// Pipelines the events, each one sent only once the one before it with
    /// the same `partitionkey` is stored (see [Publishing](self#publishing)).
    /// Every event is validated before anything is sent.
    async fn publish_batch(&self, topic: &Topic, events: Vec<Event>) -> Result<()> {
        self.inner.publish(topic, events).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    /// Closes the broker for every clone: publishing and subscribing fail,
    /// open subscriptions end after nacking what they had fetched but not
    /// handed out, and outstanding messages are flushed. Deliveries already
    /// handed out can still be settled.
    async fn close(&self) -> Result<()> {
        Subscriber::close(self).await
    }
}

#[async_trait]
impl Subscriber for NatsBroker {
    async fn subscribe(&self, topic: &Topic, options: SubscribeOptions) -> Result<Subscription> {
        subscriber::subscribe(&self.inner, topic, options).await
    }

    /// As [`Publisher::close`].
    async fn close(&self) -> Result<()> {
        self.inner.close();
        self.inner.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_follow_the_topic() {
        let topic = Topic::from_static("orders.created");
        assert_eq!(stream_name("CE_", &topic), "CE_orders_created");
        assert_eq!(
            stream_name("", &Topic::from_static("a-b_c")),
            "a-b_c",
            "'-' and '_' are valid in stream names"
        );
    }
}
