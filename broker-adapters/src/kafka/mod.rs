//! The Kafka adapter, on rdkafka (librdkafka).
//!
//! [`KafkaBroker`] is both the [`Publisher`] and the [`Subscriber`]:
//!
//! - **Publishing** encodes events with the CloudEvents Kafka protocol binding
//!   ([`Binding::KAFKA`](crate::binding::Binding::KAFKA)): binary mode by
//!   default (`ce_` headers, `content-type`, the data as the value), or
//!   structured mode; the record key is the event's `partitionkey`, so one
//!   key stays on one partition. The producer is idempotent with `acks=all`
//!   (idempotence can be turned off for brokers that need it:
//!   [`KafkaConfig::idempotence`]), and `publish` returns once every in-sync
//!   replica has the record.
//!   [`publish_batch`](Publisher::publish_batch) enqueues the whole batch and
//!   then awaits the acknowledgements, in order. A producer that hits a
//!   fatal error, or whose producer id and epoch the broker no longer
//!   accepts (`ProducerFenced`, `UnknownProducerId`, …, as after a broker
//!   lost its producer state in a restart), can send nothing more: it is
//!   replaced by a new one and that publish fails as retryable, so sending
//!   again succeeds (at least once: the new producer id does not
//!   de-duplicate the old one's records). Subscriptions write dead letters
//!   through the same, shared producer.
//! - **Consuming** joins the Kafka consumer group named by
//!   [`SubscribeOptions::group`]; [`subscribe`](Subscriber::subscribe) returns
//!   once the member has its partitions. Offsets are committed only up to the
//!   oldest event not yet acked or terminated, every
//!   [`commit_interval`](KafkaConfig::commit_interval), before partitions are
//!   revoked, and on close. Kafka cannot nack one record, so the subscription
//!   does it itself: a nacked event is held in memory and delivered again
//!   after its delay, and so is one left unsettled past its ack deadline;
//!   later events of the same key wait for it while other keys go on.
//!   Dropping a subscription, or a crash, leaves the unsettled part
//!   uncommitted, so the group delivers it again.
//! - **Bad input**: a received record that is not a CloudEvent, or is larger
//!   than [`max_event_bytes`](KafkaConfig::max_event_bytes), is copied
//!   unchanged to the dead-letter topic (`<topic>.dlq`) with `dlq-reason`,
//!   `dlq-topic`, `dlq-partition` and `dlq-offset` headers before its offset
//!   is committed: never lost, never blocking the partition.
//!
//! ```no_run
//! # async fn demo() -> broker_adapters::Result<()> {
//! use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
//! use broker_adapters::prelude::*;
//!
//! let broker = KafkaBroker::connect(KafkaConfig::from_env()?).await?;
//! let orders = Topic::from_static("orders");
//! broker.create_topic(&orders, 6).await?;
//! broker.publish_json(&orders, "com.example.order.placed", "/orders", &"o-1").await?;
//! let subscription = broker.subscribe(&orders, SubscribeOptions::new("billing")?).await?;
//! # drop(subscription);
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod raw;
mod subscriber;

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use cloudevents::Event;
use futures_util::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

pub use self::config::{KafkaConfig, Sasl, SecurityProtocol};
use self::error::{SYSTEM, map};
use crate::binding::{Binding, Mode};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{EventExt, validate_attributes};
use crate::publisher::Publisher;
use crate::subscriber::{SubscribeOptions, Subscriber, Subscription};
use crate::topic::Topic;

/// The Kafka adapter. Cheap to clone; clones share one producer.
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<Inner>,
}

struct Inner {
    /// Shared with the subscriptions (dead letters); holds the configuration.
    producers: Arc<ProducerSlot>,
    closed: AtomicBool,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("config", self.config())
            .finish_non_exhaustive()
    }
}

impl KafkaBroker {
    /// Validates `config`, creates the producer and checks that the cluster
    /// answers.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for an invalid configuration, and when the
    /// cluster refuses the TLS handshake (a certificate that does not check
    /// out) or the SASL authentication (not retryable);
    /// [`ErrorKind::Connection`] if no broker answers within the delivery timeout.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let producer = new_producer(&config)?;
        probe(&config).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                producers: Arc::new(ProducerSlot {
                    config,
                    current: std::sync::RwLock::new(producer),
                }),
                closed: AtomicBool::new(false),
            }),
        })
    }
}

/// Asks the cluster for its metadata with a client of `config`'s settings,
/// which also reports why the brokers could not be reached when librdkafka
/// says more than the request's own error: a failed TLS handshake or SASL
/// authentication reaches only the client's error callback, the request
/// failing as a mere transport failure.
async fn probe(config: &KafkaConfig) -> Result<()> {
    let client: rdkafka::producer::BaseProducer<ProbeContext> = client_config(config)
        .create_with_context(ProbeContext::default())
        .map_err(|e| map(e, "create the connection check's client"))?;
    let deadline = std::time::Instant::now() + config.delivery_timeout.min(Duration::from_secs(10));
    // The client is also dropped here: librdkafka's destroy may block.
    let (fetched, refused) = tokio::task::spawn_blocking(move || {
        // In short tries, so that a refusal ends the wait at once.
        let fetched = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let fetched = client
                .client()
                .fetch_metadata(None, left.min(Duration::from_millis(500)))
                .map(drop);
            if fetched.is_ok() || left.is_zero() || client.context().has_refused() {
                break fetched;
            }
            // Serves the error events queued meanwhile to the context.
            client.poll(Duration::ZERO);
            if client.context().has_refused() {
                break fetched;
            }
        };
        let refused = client
            .context()
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        (fetched, refused)
    })
    .await
    .map_err(|e| Error::with_source(ErrorKind::Connection { system: SYSTEM }, e))?;
    let Err(e) = fetched else { return Ok(()) };
    Err(match refused {
        Some((key, reason)) => Error::with_source(
            ErrorKind::Config {
                key: key.into(),
                reason,
            },
            e,
        ),
        None => Error::with_source(ErrorKind::Connection { system: SYSTEM }, e),
    })
}

/// Keeps the first TLS or authentication failure librdkafka reports: as a
/// client error, or (a failed TLS handshake, a refused SASL login) only as a
/// log line of the broker connection's failure.
#[derive(Default)]
struct ProbeContext {
    /// The setting to blame and what librdkafka said.
    refused: std::sync::Mutex<Option<(&'static str, String)>>,
}

impl ProbeContext {
    fn has_refused(&self) -> bool {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    fn keep(&self, key: &'static str, what: &str) {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert_with(|| {
                (
                    key,
                    format!("the Kafka cluster refused the connection: {what}"),
                )
            });
    }
}

impl rdkafka::ClientContext for ProbeContext {
    fn log(&self, _: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        if facility == "FAIL" {
            if message.contains("SSL handshake failed") {
                self.keep("security_protocol", message);
            } else if message.contains("SASL authentication error")
                || message.contains("Authentication failed")
            {
                self.keep("sasl", message);
            }
        }
        // What matters is returned by `connect`.
        tracing::debug!(facility, message, "librdkafka, checking the connection");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::SSL) => self.keep("security_protocol", reason),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
                self.keep("sasl", reason)
            }
            _ => tracing::debug!(%error, reason, "librdkafka error while checking the connection"),
        }
    }
}

/// The check sends nothing.
impl rdkafka::producer::ProducerContext for ProbeContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, (): ()) {}
}

/// The producer a broker and its subscriptions (for dead letters) share,
/// replaced by a new one when it can send nothing more.
pub(crate) struct ProducerSlot {
    config: KafkaConfig,
    current: std::sync::RwLock<FutureProducer>,
}

impl ProducerSlot {
    /// The producer in use (a handle; clones share it).
    pub(crate) fn get(&self) -> FutureProducer {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// After a failed send through `used`: if that producer hit a fatal
    /// error, or the broker no longer accepts its producer id and epoch (an
    /// idempotent producer fenced, unknown or out of sequence, e.g. after a
    /// broker lost its producer state in a restart), it can send nothing
    /// more, so a new one takes its place and the failure becomes
    /// retryable: sending again goes through the new producer, at least
    /// once (the new producer id does not de-duplicate the old one's
    /// retries).
    pub(crate) fn replace_if_fatal(&self, used: &FutureProducer, error: Error) -> Error {
        let (code, reason) = match used.client().fatal_error() {
            Some(fatal) => fatal,
            None => match kafka_code(&error) {
                Some(
                    code @ (RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::InvalidProducerIdMapping),
                ) => (code, code.to_string()),
                _ => return error,
            },
        };
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Another failed send may have replaced it already.
        if current.client().native_ptr() == used.client().native_ptr() {
            match new_producer(&self.config) {
                Ok(fresh) => {
                    tracing::warn!(?code, %reason, "kafka producer can send no more; replaced by a new producer");
                    *current = fresh;
                }
                Err(e) => {
                    tracing::error!(error = %e, ?code, %reason, "kafka producer can send no more, and no new one could be created");
                    return error;
                }
            }
        }
        Error::with_source(
            ErrorKind::Broker {
                system: SYSTEM,
                operation: "publish (the producer was replaced: it could send no more)",
                retryable: true,
            },
            error,
        )
    }
}

/// The librdkafka error code behind `error`, if it came from librdkafka.
fn kafka_code(error: &Error) -> Option<RDKafkaErrorCode> {
    std::error::Error::source(error)?
        .downcast_ref::<KafkaError>()?
        .rdkafka_error_code()
}

/// A producer for `config`.
fn new_producer(config: &KafkaConfig) -> Result<FutureProducer> {
    producer_config(config)
        .create()
        .map_err(|e| map(e, "create producer"))
}

/// The librdkafka settings of a producer for `config`: `acks=all`,
/// idempotent unless configured otherwise (then one request in flight at a
/// time).
fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("acks", "all")
        .set("enable.idempotence", config.idempotence.to_string())
        .set(
            "delivery.timeout.ms",
            config.delivery_timeout.as_millis().to_string(),
        )
        .set(
            "message.max.bytes",
            (config.max_event_bytes.get() + 64 * 1024).to_string(),
        );
    if !config.options.contains_key("linger.ms") {
        client.set("linger.ms", "2");
    }
    if config.idempotence {
        // A failed record fails every record queued after it for its
        // partition (a fatal error; the slot replaces the producer), rather
        // than letting them be written past the gap, ahead of the failed
        // one's retry.
        if !config.options.contains_key("enable.gapless.guarantee") {
            client.set("enable.gapless.guarantee", "true");
        }
    } else {
        // No sequence numbers for the broker to order retries by: one
        // request at a time, so a retry goes before what follows it.
        client.set("max.in.flight.requests.per.connection", "1");
    }
    client
}

impl KafkaBroker {
    /// The configuration in use.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.producers.config
    }

    /// Creates `topic` with `partitions` partitions (replication factor: the
    /// broker's default) unless it exists already.
    ///
    /// # Errors
    ///
    /// The cluster refused to create it.
    pub async fn create_topic(&self, topic: &Topic, partitions: u16) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = client_config(self.config())
            .create()
            .map_err(|e| map(e, "create admin client"))?;
        let new = NewTopic::new(
            topic.as_str(),
            i32::from(partitions.max(1)),
            TopicReplication::Fixed(-1),
        );
        let results = admin
            .create_topics([&new], &AdminOptions::new())
            .await
            .map_err(|e| map(e, "create topic"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(map(KafkaError::AdminOp(code), "create topic")),
            }
        }
        Ok(())
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("kafka broker"))
        } else {
            Ok(())
        }
    }

    /// Validates and encodes `event` into a record; the size limit applies
    /// to the encoded record (key, header names and values, payload, as
    /// [`Message::encoded_len`](crate::binding::Message::encoded_len) counts
    /// them). In binary mode the headers go straight into librdkafka's
    /// structure and binary data is not copied.
    fn record<'e>(&self, event: &'e Event) -> Result<Record<'e>> {
        validate_attributes(event)?;
        let key = event.partition_key();
        let (headers, payload, size) = match self.config().mode {
            Mode::Binary => {
                let mut size = key.map_or(0, str::len);
                let mut headers = Some(OwnedHeaders::new_with_capacity(12));
                Binding::KAFKA.binary_headers(event, |name, value| {
                    size += name.len() + value.len();
                    headers = headers.take().map(|h| {
                        h.insert(Header {
                            key: name,
                            value: Some(value.as_bytes()),
                        })
                    });
                });
                let payload = event.data_bytes().unwrap_or_default();
                let size = size + payload.len();
                (headers.unwrap_or_default(), payload, size)
            }
            mode => {
                let message = Binding::KAFKA.encode(event, mode)?;
                let size = message.encoded_len();
                let headers = message.headers.iter().fold(
                    OwnedHeaders::new_with_capacity(message.headers.len()),
                    |headers, (key, value)| {
                        headers.insert(Header {
                            key,
                            value: Some(value.as_bytes()),
                        })
                    },
                );
                (headers, Cow::Owned(message.payload), size)
            }
        };
        let limit = self.config().max_event_bytes.get();
        if size > limit {
            return Err(Error::new(ErrorKind::EventTooLarge { size, limit }));
        }
        Ok(Record {
            key,
            headers,
            payload,
        })
    }

    /// Hands one record to `producer`, waiting while its queue is full.
    async fn enqueue(
        &self,
        producer: &FutureProducer,
        topic: &Topic,
        record: Record<'_>,
    ) -> Result<DeliveryFuture> {
        enqueue_record(
            producer,
            topic.as_str(),
            record.key,
            record.headers,
            &record.payload,
            self.config().delivery_timeout,
        )
        .await
    }
}

/// An event encoded for librdkafka.
struct Record<'e> {
    key: Option<&'e str>,
    headers: OwnedHeaders,
    payload: Cow<'e, [u8]>,
}

/// Enqueues a record, retrying while librdkafka's queue is full, for at most
/// `patience`.
pub(crate) async fn enqueue_record(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&str>,
    headers: OwnedHeaders,
    payload: &[u8],
    patience: Duration,
) -> Result<DeliveryFuture> {
    let mut record = FutureRecord::to(topic).payload(payload).headers(headers);
    if let Some(key) = key {
        record = record.key(key);
    }
    let give_up = tokio::time::Instant::now() + patience;
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                if tokio::time::Instant::now() < give_up =>
            {
                record = back;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Err(map(e, "publish")),
        }
    }
}

/// Waits for the broker's acknowledgement of an enqueued record.
pub(crate) async fn acknowledged(delivery: DeliveryFuture) -> Result<()> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(map(e, "publish")),
        Err(canceled) => Err(Error::with_source(
            ErrorKind::Broker {
                system: SYSTEM,
                operation: "publish",
                retryable: true,
            },
            canceled,
        )),
    }
}

fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in config.client_options() {
        client.set(key, value);
    }
    client
}

#[async_trait]
impl Publisher for KafkaBroker {
    async fn publish(&self, topic: &Topic, event: Event) -> Result<()> {
        self.check_open()?;
        let record = self.record(&event)?;
        let producer = self.inner.producers.get();
        let sent = async {
            let delivery = self.enqueue(&producer, topic, record).await?;
            acknowledged(delivery).await
        };
        sent.await
            .map_err(|e| self.inner.producers.replace_if_fatal(&producer, e))
    }

    /// Enqueues the events in order, then awaits every acknowledgement: one
    /// round trip for the batch, not one per event.
    ///
    /// Every event's attributes are checked before any is sent. The size of
    /// each is known only once it is encoded, just before it is enqueued (one
    /// encoding, in memory the next event reuses), so an oversized event
    /// fails the batch after the events before it were sent.
    ///
    /// On error, returns only once every enqueued event of the batch has its
    /// outcome: none is still on its way when the caller sends the batch
    /// again, which could otherwise land after the retry's copies of the
    /// events before it. The producer's gap-less guarantee keeps the events
    /// after a failed one from being written (but see
    /// [`KafkaConfig::delivery_timeout`]).
    async fn publish_batch(&self, topic: &Topic, events: Vec<Event>) -> Result<()> {
        self.check_open()?;
        for event in &events {
            validate_attributes(event)?;
        }
        let producer = self.inner.producers.get();
        let sent = async {
            let mut deliveries = Vec::with_capacity(events.len());
            let mut refused = None;
            for event in &events {
                let enqueued = match self.record(event) {
                    Ok(record) => self.enqueue(&producer, topic, record).await,
                    Err(e) => Err(e),
                };
                match enqueued {
                    Ok(delivery) => deliveries.push(acknowledged(delivery)),
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                }
            }
            // The first failure in batch order: a delivery's, or else the
            // one that stopped the enqueueing.
            let first_failed = join_all(deliveries).await.into_iter().find_map(Result::err);
            first_failed.or(refused).map_or(Ok(()), Err)
        };
        sent.await
            .map_err(|e| self.inner.producers.replace_if_fatal(&producer, e))
    }

    async fn flush(&self) -> Result<()> {
        let producer = self.inner.producers.get();
        let timeout = self.config().delivery_timeout;
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)))
            .await
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Closed {
                        what: "kafka producer",
                    },
                    e,
                )
            })?
            .map_err(|e| map(e, "flush"))
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        Publisher::flush(self).await
    }
}

#[async_trait]
impl Subscriber for KafkaBroker {
    /// Also creates the topic's dead-letter topic (`<topic>.dlq`) if it does
    /// not exist, so undecodable records always have a place to go.
    async fn subscribe(&self, topic: &Topic, options: SubscribeOptions) -> Result<Subscription> {
        self.check_open()?;
        let dead_letter = Topic::try_from(format!("{topic}{}", self.config().dead_letter_suffix))?;
        self.create_topic(&dead_letter, 1).await?;
        subscriber::subscribe(
            self.config(),
            client_config(self.config()),
            Arc::clone(&self.inner.producers),
            topic,
            options,
        )
        .await
    }

    async fn close(&self) -> Result<()> {
        Publisher::close(self).await
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::ClientContext as _;
    use rdkafka::config::RDKafkaLogLevel;

    use super::*;

    #[test]
    fn a_producer_without_idempotence_has_one_request_in_flight() {
        let on = producer_config(&KafkaConfig::builder(["127.0.0.1:9092"]));
        assert_eq!(on.get("enable.idempotence"), Some("true"));
        assert_eq!(on.get("enable.gapless.guarantee"), Some("true"));
        assert_eq!(on.get("max.in.flight.requests.per.connection"), None);

        let off = producer_config(&KafkaConfig::builder(["127.0.0.1:9092"]).idempotence(false));
        assert_eq!(off.get("enable.idempotence"), Some("false"));
        assert_eq!(off.get("enable.gapless.guarantee"), None);
        assert_eq!(off.get("max.in.flight.requests.per.connection"), Some("1"));
        assert_eq!(off.get("acks"), Some("all"));
    }

    fn refused(context: &ProbeContext) -> Option<&'static str> {
        context
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(key, _)| *key)
    }

    /// librdkafka's own words for a refused handshake or login (2.12, as
    /// logged for a broker connection's failure) blame the right setting;
    /// other failures blame none, and the first refusal is kept.
    #[test]
    fn refusals_blame_their_setting() {
        let ssl = "[thrd:ssl://127.0.0.1:9093/bootstrap]: ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified (after 1ms in state SSL_HANDSHAKE)";
        let sasl = "[thrd:sasl_plaintext://127.0.0.1:19195/bootstrap]: sasl_plaintext://127.0.0.1:19195/bootstrap: SASL authentication error: SASL SCRAM authentication failed: broker responded with unknown-user (after 25ms in state AUTH_REQ)";
        let down = "[thrd:127.0.0.1:9092/bootstrap]: 127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 0ms in state CONNECT)";

        let context = ProbeContext::default();
        context.log(RDKafkaLogLevel::Error, "FAIL", down);
        assert_eq!(refused(&context), None);
        context.log(RDKafkaLogLevel::Error, "FAIL", ssl);
        assert_eq!(refused(&context), Some("security_protocol"));
        context.log(RDKafkaLogLevel::Error, "FAIL", sasl);
        assert_eq!(
            refused(&context),
            Some("security_protocol"),
            "the first is kept"
        );

        let context = ProbeContext::default();
        context.log(RDKafkaLogLevel::Error, "FAIL", sasl);
        assert_eq!(refused(&context), Some("sasl"));

        let context = ProbeContext::default();
        context.log(RDKafkaLogLevel::Debug, "BROKER", ssl);
        assert_eq!(
            refused(&context),
            None,
            "only a connection's failure counts"
        );
        context.error(
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert_eq!(refused(&context), None);
        context.error(
            KafkaError::Global(RDKafkaErrorCode::Authentication),
            "SASL authentication error",
        );
        assert_eq!(refused(&context), Some("sasl"));
        assert!(context.has_refused());
    }
}
