//! The NATS JetStream adapter against the shared conformance suite, on the
//! real nats-server the harness runs, plus NATS-specific tests: messages
//! that are not CloudEvents (dead-lettered, never stalling), messages whose
//! headers the client cannot read (found after the reconnection,
//! dead-lettered, disturbing no publish of the same broker), an oversized message (dead-lettered), a stored message
//! with a status line, de-duplication
//! by event id, per-key holding within a subscription, a batch failing
//! part-way storing a prefix of each key's events, and an unreachable
//! server.
//!
//! `source tests/harness/up.sh && cargo test -p e2e --test conformance_nats`
//!
//! Test streams are named `E2E_CE_*`, kept in memory, and hold messages for
//! ten minutes; the first test of a run deletes the test streams older than
//! that, so the server does not fill up across runs.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use async_trait::async_trait;
use broker_adapters::cloudevents::AttributesReader;
use broker_adapters::conformance::{Capabilities, Target};
use broker_adapters::nats::{
    DLQ_HEADERS_HEADER, DLQ_REASON_HEADER, DLQ_SEQUENCE_HEADER, DLQ_SUFFIX, NatsBroker, NatsConfig,
    Storage,
};
use broker_adapters::{
    CloudEventBuilder, Delivery, EventExt, Publisher, Result, SubscribeOptions, Subscriber,
    Subscription, Topic,
};
use e2e::Server;
use futures_util::{StreamExt, TryStreamExt};

/// The stream-name prefix of every stream these tests create.
const PREFIX: &str = "E2E_CE_";

/// How long test streams keep messages, and the age past which a later run
/// deletes them.
const TEST_STREAM_AGE: Duration = Duration::from_secs(600);

/// The wait for an expected delivery.
const RECEIVE: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Nats {
    publisher: NatsBroker,
}

fn config(url: &str) -> NatsConfig {
    NatsConfig::builder()
        .url(url)
        .stream_prefix(PREFIX)
        .storage(Storage::Memory)
        .max_age(TEST_STREAM_AGE)
}

/// Connects, failing (never skipping) with the harness hint when the server is missing.
async fn connect() -> (String, NatsBroker) {
    let url = e2e::require(Server::Nats).unwrap_or_else(|e| panic!("{e:#}"));
    let broker = NatsBroker::connect(config(&url))
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    (url, broker)
}

async fn target() -> Nats {
    let (url, publisher) = connect().await;
    sweep_old_test_streams(&url).await;
    Nats { publisher }
}

/// Deletes test streams older than [`TEST_STREAM_AGE`], once per test run.
async fn sweep_old_test_streams(url: &str) {
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if SWEPT.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(client) = async_nats::connect(url).await else {
        return;
    };
    let js = jetstream::new(client);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let cutoff = i64::try_from(now.saturating_sub(TEST_STREAM_AGE.as_secs())).unwrap_or(0);
    let old: Vec<String> = match js.streams().try_collect::<Vec<_>>().await {
        Ok(infos) => infos
            .into_iter()
            .filter(|info| {
                info.config.name.starts_with(PREFIX) && info.created.unix_timestamp() < cutoff
            })
            .map(|info| info.config.name)
            .collect(),
        Err(_) => return,
    };
    for name in old {
        // Best effort: another run may be deleting it too.
        let _ = js.delete_stream(&name).await;
    }
}

#[async_trait]
impl Target for Nats {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .ack_deadline(true)
            .max_event_bytes(self.publisher.max_event_bytes())
            .receive_timeout(RECEIVE)
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(self.publisher.clone()))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        // A connection of its own, so dropping it behaves like a crashed process.
        let url = e2e::nats_url();
        Ok(Arc::new(NatsBroker::connect(config(&url)).await?))
    }

    async fn topic(&self, name: &str) -> Result<Topic> {
        let topic = Topic::try_from(name)?;
        self.publisher.provision(&topic).await?;
        Ok(topic)
    }
}

broker_adapters::conformance_suite!(target());

async fn recv(sub: &mut Subscription, what: &str) -> Delivery {
    recv_within(RECEIVE, sub, what).await
}

async fn recv_within(within: Duration, sub: &mut Subscription, what: &str) -> Delivery {
    match tokio::time::timeout(within, sub.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("the subscription failed while waiting for {what}: {e}"),
        Ok(None) => panic!("the subscription ended while waiting for {what}"),
        Err(_) => panic!("{what} was not delivered within {within:?}"),
    }
}

fn topic(prefix: &str) -> Topic {
    Topic::try_from(e2e::unique_name(prefix)).expect("a valid topic name")
}

/// A broker, a fresh topic with its stream, and a subscription of group
/// [`GROUP`] on it.
async fn subscribed(prefix: &str) -> (String, NatsBroker, Topic, String, Subscription) {
    let (url, broker) = connect().await;
    let topic = topic(prefix);
    let stream = broker.provision(&topic).await.expect("stream provisioned");
    let sub = broker
        .subscribe(&topic, SubscribeOptions::new(GROUP).expect("valid group"))
        .await
        .expect("subscribed");
    (url, broker, topic, stream, sub)
}

/// The group of [`subscribed`].
const GROUP: &str = "g";

/// A JetStream context on a connection of its own.
async fn raw_jetstream(url: &str) -> jetstream::Context {
    let raw = async_nats::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    jetstream::new(raw)
}

/// Messages on the topic that are not CloudEvents (no `ce-` headers and a
/// garbage payload, an unknown spec version, broken structured JSON) neither
/// panic nor stall the subscription: the next valid event is delivered, and
/// each bad message is copied unchanged to `<topic>.dlq`, with the reason,
/// and terminated, never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_are_not_cloudevents_are_dead_lettered_and_do_not_stall() {
    let (url, broker) = connect().await;
    let topic = topic("nats_garbage");
    let stream = broker.provision(&topic).await.expect("stream provisioned");
    let group = "g";
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::new(group).expect("valid group"))
        .await
        .expect("subscribed");

    let raw = async_nats::connect(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    let garbage: Vec<u8> = b"not a cloudevent \x00\xff\xfe".to_vec();
    raw.publish(topic.to_string(), garbage.clone().into())
        .await
        .expect("raw publish");
    let mut unknown_version = async_nats::HeaderMap::new();
    unknown_version.insert("ce-specversion", "9.9");
    unknown_version.insert("ce-id", "x");
    unknown_version.insert("X-Custom", "kept");
    raw.publish_with_headers(topic.to_string(), unknown_version, "{}".into())
        .await
        .expect("raw publish");
    let mut structured = async_nats::HeaderMap::new();
    structured.insert("content-type", "application/cloudevents+json");
    raw.publish_with_headers(topic.to_string(), structured, "{\"broken".into())
        .await
        .expect("raw publish");
    raw.flush().await.expect("flushed");

    gets_through(&broker, &topic, &mut sub, RECEIVE).await;
    let extra = tokio::time::timeout(Duration::from_secs(1), sub.next()).await;
    assert!(extra.is_err(), "nothing else is delivered: {extra:?}");

    // The bad messages were copied unchanged to the dead-letter subject.
    let js = jetstream::new(raw);
    let dlq = Topic::try_from(format!("{topic}{DLQ_SUFFIX}")).expect("valid");
    let dlq_stream = js
        .get_stream(broker.stream_name(&dlq))
        .await
        .expect("the dead-letter stream exists");
    let mut payloads = Vec::new();
    for seq in 1..=3 {
        let copy = dlq_stream
            .get_raw_message(seq)
            .await
            .unwrap_or_else(|e| panic!("dead letter {seq}: {e}"));
        assert_eq!(copy.subject.as_str(), dlq.as_str());
        let reason = copy
            .headers
            .get(DLQ_REASON_HEADER)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        assert!(reason.contains("could not decode"), "reason: {reason}");
        payloads.push(copy.payload.to_vec());
    }
    assert_eq!(
        payloads,
        vec![garbage, b"{}".to_vec(), b"{\"broken".to_vec()],
        "payloads unchanged, in order"
    );
    let second = dlq_stream.get_raw_message(2).await.expect("dead letter 2");
    assert_eq!(
        second.headers.get("X-Custom").map(|v| v.as_str()),
        Some("kept"),
        "headers are kept"
    );

    // The originals were terminated: nothing is pending for the group.
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(group, &stream)
        .await
        .expect("the group's consumer");
    let deadline = tokio::time::Instant::now() + RECEIVE;
    loop {
        let info = consumer.info().await.expect("consumer info");
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bad messages were not settled: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sub.close().await.expect("closed");
    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_stream(broker.stream_name(&dlq)).await;
}

/// Publishes messages with the given header blocks and payloads over a raw
/// connection, as no async-nats client could, and waits for the server to
/// have taken them.
async fn publish_raw(url: &str, subject: &str, messages: &[(&'static [u8], &'static [u8])]) {
    use std::io::{Read as _, Write as _};

    let address = url.trim_start_matches("nats://").to_owned();
    let subject = subject.to_owned();
    let messages = messages.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut conn = std::net::TcpStream::connect(address).expect("connect");
        conn.set_read_timeout(Some(RECEIVE)).expect("timeout");
        let mut buf = [0u8; 4096];
        let _info = conn.read(&mut buf).expect("the server's INFO");
        let mut wire = b"CONNECT {\"headers\":true,\"verbose\":false}\r\n".to_vec();
        for (headers, payload) in messages {
            wire.extend_from_slice(
                format!(
                    "HPUB {subject} {} {}\r\n",
                    headers.len(),
                    headers.len() + payload.len()
                )
                .as_bytes(),
            );
            wire.extend_from_slice(headers);
            wire.extend_from_slice(payload);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"PING\r\n");
        conn.write_all(&wire).expect("send");
        let n = conn.read(&mut buf).expect("the server's answer");
        assert_eq!(&buf[..n], b"PONG\r\n", "the server took the messages");
    })
    .await
    .expect("raw publish");
}

/// Publishes a valid event on `topic` and checks that it is the next
/// delivery of `sub` (within `within`), and acks it.
async fn gets_through(
    broker: &NatsBroker,
    topic: &Topic,
    sub: &mut Subscription,
    within: Duration,
) {
    let valid = keyed("k", 1);
    broker
        .publish(topic, valid.clone())
        .await
        .expect("published");
    let mut delivery = recv_within(within, sub, "the valid event after the bad ones").await;
    assert_eq!(delivery.event().id(), valid.id(), "only the valid event");
    delivery.ack().await.expect("acked");
}

/// The wait for a delivery after the subscription's connection was made
/// again: the pull request normally outlives the reconnection; if the
/// server dropped it, the pump pulls again after three missed heartbeats
/// (15 s).
const AFTER_RECONNECTION: Duration = Duration::from_secs(30);

/// Waits until the dead-letter topic `dlq` holds `n` messages, and returns its stream.
async fn dead_letters(
    js: &jetstream::Context,
    broker: &NatsBroker,
    dlq: &Topic,
    n: u64,
) -> jetstream::stream::Stream {
    let deadline = tokio::time::Instant::now() + RECEIVE;
    loop {
        if let Ok(mut found) = js.get_stream(broker.stream_name(dlq)).await
            && found.info().await.expect("stream info").state.messages == n
        {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {n} dead letters on {dlq}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until nothing is pending for `group` and its ack floor is `floor`.
async fn settled_up_to(js: &jetstream::Context, stream: &str, group: &str, floor: u64) {
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(group, stream)
        .await
        .expect("the group's consumer");
    let deadline = tokio::time::Instant::now() + RECEIVE;
    loop {
        let info = consumer.info().await.expect("consumer info");
        if info.num_ack_pending == 0
            && info.num_pending == 0
            && info.ack_floor.stream_sequence == floor
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected everything up to {floor} settled: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Messages whose headers the NATS client cannot read: async-nats drops
/// its connection on reading one, so it never reaches the subscription (a
/// Go client may write header values that are not UTF-8; here a raw
/// connection writes them). After the reconnection the subscription finds
/// them in the stream, copies each to `<topic>.dlq` with its payload
/// unchanged and its header block base64-encoded, and terminates it; the
/// events after them are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_the_client_cannot_read_are_dead_lettered_and_do_not_stall() {
    use base64::Engine as _;

    let (url, broker, topic, stream, mut sub) = subscribed("nats_unreadable").await;
    let unreadable: [(&[u8], &[u8]); 2] = [
        (b"NATS/1.0\r\nce-\xffid: v\r\n\r\n", b"name not UTF-8"),
        (b"NATS/1.0\r\nce-id: caf\xe9\r\n\r\n", b"value not UTF-8"),
    ];
    publish_raw(&url, topic.as_str(), &unreadable).await;

    let js = raw_jetstream(&url).await;
    let dlq = Topic::try_from(format!("{topic}{DLQ_SUFFIX}")).expect("valid");
    let mut dlq_stream = dead_letters(&js, &broker, &dlq, 2).await;
    for (seq, (headers, payload)) in (1..).zip(unreadable) {
        let copy = dlq_stream
            .get_raw_message(seq)
            .await
            .unwrap_or_else(|e| panic!("dead letter {seq}: {e}"));
        assert_eq!(copy.payload.as_ref(), payload, "payload unchanged");
        let header = |name: &str| {
            copy.headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        assert!(
            header(DLQ_REASON_HEADER).contains("cannot read"),
            "reason: {}",
            header(DLQ_REASON_HEADER)
        );
        assert_eq!(header(DLQ_SEQUENCE_HEADER), seq.to_string());
        let block = base64::engine::general_purpose::STANDARD
            .decode(header(DLQ_HEADERS_HEADER))
            .expect("base64");
        assert_eq!(block, headers, "the original header block is kept");
    }
    assert_eq!(
        dlq_stream.info().await.expect("stream info").state.messages,
        2,
        "each is dead-lettered once"
    );

    // The subscription's connection was dropped and made again; the
    // broker's own connection publishes.
    gets_through(&broker, &topic, &mut sub, AFTER_RECONNECTION).await;

    settled_up_to(&js, &stream, GROUP, 3).await;
    sub.close().await.expect("closed");
    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_stream(broker.stream_name(&dlq)).await;
}

/// A message the client cannot read drops only its subscription's
/// connection: publishes through the same broker, kept going all the while,
/// none fails, and the subscription goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_client_cannot_read_disturbs_no_publish() {
    let (url, broker, topic, stream, mut sub) = subscribed("nats_unreadable_publish").await;
    let other = Topic::try_from(format!("{topic}.other")).expect("valid");
    let other_stream = broker.provision(&other).await.expect("stream provisioned");
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = tokio::spawn({
        let (broker, other, stop) = (broker.clone(), other.clone(), Arc::clone(&stop));
        async move {
            let (mut batches, mut failures) = (0_usize, Vec::new());
            while !stop.load(Ordering::Acquire) {
                let events = (0..500)
                    .map(|n| keyed(&format!("k{}", n % 64), n))
                    .collect();
                match broker.publish_batch(&other, events).await {
                    Ok(()) => batches += 1,
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (batches, failures)
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish_raw(
        &url,
        topic.as_str(),
        &[(b"NATS/1.0\r\nce-\xffid: v\r\n\r\n", b"name not UTF-8")],
    )
    .await;
    // Dead-lettered only after the subscription's connection was dropped
    // and made again.
    let js = raw_jetstream(&url).await;
    let dlq = Topic::try_from(format!("{topic}{DLQ_SUFFIX}")).expect("valid");
    dead_letters(&js, &broker, &dlq, 1).await;
    stop.store(true, Ordering::Release);
    let (batches, failures) = publishing.await.expect("the publishing task");
    assert!(
        failures.is_empty(),
        "publishes failed while the subscription's connection was dropped: {failures:?}"
    );
    assert!(batches > 0, "nothing was published meanwhile");

    gets_through(&broker, &topic, &mut sub, AFTER_RECONNECTION).await;
    sub.close().await.expect("closed");
    for name in [stream, other_stream, broker.stream_name(&dlq)] {
        let _ = js.delete_stream(&name).await;
    }
}

/// A message larger than the subscriber's `max_event_bytes` (published by
/// a broker configured with a higher limit) is dead-lettered unchanged
/// with the reason, never delivered, and does not stall the subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_dead_lettered() {
    let (url, publisher) = connect().await;
    let small = NatsBroker::connect(
        config(&url).max_event_bytes(NonZeroUsize::new(4096).expect("positive")),
    )
    .await
    .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    let topic = topic("nats_oversized");
    let stream = publisher
        .provision(&topic)
        .await
        .expect("stream provisioned");
    let group = "g";
    let mut sub = small
        .subscribe(&topic, SubscribeOptions::new(group).expect("valid group"))
        .await
        .expect("subscribed");
    let event = |bytes: usize| {
        CloudEventBuilder::new("dev.backbone.test", "/nats")
            .partition_key("k")
            .json_data(&"x".repeat(bytes))
            .build()
            .expect("valid")
    };
    let (big, fits) = (event(8192), event(10));
    publisher
        .publish_batch(&topic, vec![big.clone(), fits.clone()])
        .await
        .expect("published");

    let mut delivery = recv(&mut sub, "the event that fits").await;
    assert_eq!(delivery.event().id(), fits.id(), "only the event that fits");
    delivery.ack().await.expect("acked");

    let raw = async_nats::connect(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    let js = jetstream::new(raw);
    let dlq = Topic::try_from(format!("{topic}{DLQ_SUFFIX}")).expect("valid");
    let copy = js
        .get_stream(publisher.stream_name(&dlq))
        .await
        .expect("the dead-letter stream exists")
        .get_raw_message(1)
        .await
        .expect("the dead letter");
    let reason = copy
        .headers
        .get(DLQ_REASON_HEADER)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(
        reason.contains("exceeds the limit of 4096 bytes"),
        "reason: {reason}"
    );
    assert_eq!(
        copy.headers.get("ce-id").map(|v| v.as_str()),
        Some(big.id()),
        "the headers are kept"
    );
    assert!(copy.payload.len() > 8192, "the payload is kept");
    settled_up_to(&js, &stream, group, 2).await;
    sub.close().await.expect("closed");
    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_stream(publisher.stream_name(&dlq)).await;
}

/// A stored message whose header block begins with a status line (as the
/// server's own pull statuses do) is an event like any other, not a status
/// of the pull request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_with_a_status_line_is_delivered() {
    let (url, _broker, topic, stream, mut sub) = subscribed("nats_status_line").await;
    publish_raw(
        &url,
        topic.as_str(),
        &[(
            b"NATS/1.0 404 Not Found\r\nce-specversion: 1.0\r\nce-id: with-status\r\nce-source: /raw\r\nce-type: dev.backbone.test\r\n\r\n",
            b"",
        )],
    )
    .await;
    let mut delivery = recv(&mut sub, "the stored message with a status line").await;
    assert_eq!(delivery.event().id(), "with-status");
    delivery.ack().await.expect("acked");

    let js = raw_jetstream(&url).await;
    settled_up_to(&js, &stream, GROUP, 1).await;
    sub.close().await.expect("closed");
    let _ = js.delete_stream(&stream).await;
}

/// An event published twice (a retry after a lost acknowledgement, say) is
/// stored once, thanks to `Nats-Msg-Id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_twice_is_stored_once() {
    let (url, broker) = connect().await;
    let topic = topic("nats_dedup");
    let stream = broker.provision(&topic).await.expect("stream provisioned");
    let event = CloudEventBuilder::new("dev.backbone.test", "/nats")
        .json_data(&"once")
        .build()
        .expect("valid");
    broker
        .publish(&topic, event.clone())
        .await
        .expect("published");
    broker
        .publish_batch(&topic, vec![event.clone(), event.clone()])
        .await
        .expect("published again");

    let client = async_nats::connect(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    let js = jetstream::new(client);
    let mut info = js.get_stream(&stream).await.expect("stream");
    assert_eq!(info.info().await.expect("info").state.messages, 1);

    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::new("g").expect("valid"))
        .await
        .expect("subscribed");
    let mut d = recv(&mut sub, "the event").await;
    assert_eq!(d.event().id(), event.id());
    assert_eq!(d.event().data_as::<String>().expect("data"), "once");
    d.ack().await.expect("acked");
    sub.close().await.expect("closed");
    let _ = js.delete_stream(&stream).await;
}

/// A server that is not there is a retryable connection error, not a panic.
#[tokio::test]
async fn an_unreachable_server_is_a_retryable_error() {
    let err = NatsBroker::connect(
        NatsConfig::builder()
            .url("nats://127.0.0.1:1")
            .connect_timeout(Duration::from_secs(2)),
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(err.is_retryable(), "{err}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause is kept"
    );
}

/// Within a subscription, a later event of a key waits until the earlier one
/// is settled, while events of other keys flow past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_key_does_not_block_other_keys() {
    let (url, broker) = connect().await;
    let topic = topic("nats_keys");
    let stream = broker.provision(&topic).await.expect("stream provisioned");
    let events = ["a", "a", "b"]
        .iter()
        .enumerate()
        .map(|(n, key)| {
            CloudEventBuilder::new("dev.backbone.test", "/nats")
                .partition_key(*key)
                .json_data(&n)
                .build()
                .expect("valid")
        })
        .collect();
    broker
        .publish_batch(&topic, events)
        .await
        .expect("published");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::new("g").expect("valid"))
        .await
        .expect("subscribed");
    let mut a0 = recv(&mut sub, "a0").await;
    assert_eq!(a0.event().data_as::<usize>().expect("n"), 0);
    a0.in_progress()
        .await
        .expect("the server confirms a progress ack");
    let mut b2 = recv(&mut sub, "b2, while a1 waits for a0").await;
    assert_eq!(b2.event().partition_key(), Some("b"));
    b2.ack().await.expect("acked");
    let early = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(early.is_err(), "a1 must wait for a0: {early:?}");
    a0.ack().await.expect("acked");
    let mut a1 = recv(&mut sub, "a1").await;
    assert_eq!(a1.event().data_as::<usize>().expect("n"), 1);
    a1.ack().await.expect("acked");
    sub.close().await.expect("closed");

    let client = async_nats::connect(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    let _ = jetstream::new(client).delete_stream(&stream).await;
}

fn keyed(key: &str, n: usize) -> broker_adapters::cloudevents::Event {
    CloudEventBuilder::new("dev.backbone.test", "/nats")
        .partition_key(key)
        .json_data(&n)
        .build()
        .expect("valid")
}

/// Checks that `n` is the next event of `key` to be handled, and records it.
fn handled_in_order(last: &mut std::collections::HashMap<String, usize>, key: &str, n: usize) {
    let expected = last.get(key).map_or(0, |prev| prev + 1);
    assert_eq!(n, expected, "key {key}: event {n} handled out of order");
    last.insert(key.to_owned(), n);
}

/// Nacks without delay come back at once, even when every key of a full
/// prefetch window waits for one: a subscription that nacks every fourth
/// delivery of 300 keyed events (6 keys, one batch) and acks the rest handles
/// them all, in per-key order, with no delivery taking long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacks_without_delay_are_redelivered_at_once_and_in_key_order() {
    let (url, broker) = connect().await;
    let topic = topic("nats_nack_flood");
    let stream = broker.provision(&topic).await.expect("stream provisioned");
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5"];
    let per_key = 50;
    let total = keys.len() * per_key;
    let events = (0..per_key)
        .flat_map(|n| keys.iter().map(move |k| keyed(k, n)))
        .collect();
    broker
        .publish_batch(&topic, events)
        .await
        .expect("published");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::new("g").expect("valid group"))
        .await
        .expect("subscribed");

    let mut last = std::collections::HashMap::new();
    let mut handled = 0;
    let mut deliveries = 0_usize;
    while handled < total {
        // Much shorter than the ack deadline (30 s): a nacked event that only
        // comes back after the ack deadline, or a key given up on, fails here.
        let what = format!("delivery {deliveries} ({handled} of {total} handled)");
        let mut d = recv(&mut sub, &what).await;
        deliveries += 1;
        let key = d.event().partition_key().unwrap_or_default().to_owned();
        let n: usize = d.event().data_as().expect("a sequence number");
        if deliveries.is_multiple_of(4) {
            d.nack(None).await.expect("nacked");
        } else {
            handled_in_order(&mut last, &key, n);
            d.ack().await.expect("acked");
            handled += 1;
        }
    }
    sub.close().await.expect("closed");

    let client = async_nats::connect(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    let _ = jetstream::new(client).delete_stream(&stream).await;
}

/// A subscription dropped (not closed) shortly after dropping an unsettled
/// delivery gives back everything it fetched before its successor in the
/// group gets later events: the successor, subscribing 200 ms later, handles
/// every remaining event of each key in order, starting with the dropped one.
///
/// The first member has a pull request waiting (the events are published
/// while it consumes), so the nack of the dropped delivery brings it straight
/// back to that request; the rounds drop the subscription at different
/// moments around then, some while the redelivery is on its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscription_releases_its_events_before_its_successor_gets_later_ones() {
    let (url, broker) = connect().await;
    let small = NatsBroker::connect(config(&url).prefetch(NonZeroUsize::new(8).expect("8")))
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    let client = async_nats::connect(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    let js = jetstream::new(client);
    let keys = ["k0", "k1", "k2"];
    let per_key = 30;
    let total = keys.len() * per_key;
    for round in 0..24 {
        let topic = topic("nats_drop_order");
        let stream = broker.provision(&topic).await.expect("stream provisioned");
        let options = || SubscribeOptions::new("g").expect("valid group");
        let mut first = small
            .subscribe(&topic, options())
            .await
            .expect("subscribed");
        let publishing = {
            let broker = broker.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                for n in 0..per_key {
                    let events = keys.iter().map(|k| keyed(k, n)).collect();
                    broker
                        .publish_batch(&topic, events)
                        .await
                        .expect("published");
                }
            })
        };

        let mut last = std::collections::HashMap::new();
        let mut handled = 0;
        for _ in 0..3 {
            let mut d = recv(&mut first, "an event for the first member").await;
            let key = d.event().partition_key().unwrap_or_default().to_owned();
            handled_in_order(&mut last, &key, d.event().data_as().expect("n"));
            d.ack().await.expect("acked");
            handled += 1;
        }
        let unsettled = recv(&mut first, "the event the first member drops").await;
        drop(unsettled);
        // Its nack goes out after a short debounce and brings it back on the
        // waiting pull request: drop the subscription around then.
        tokio::time::sleep(Duration::from_micros(12_000 + 750 * round)).await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(200)).await;

        let mut second = broker
            .subscribe(&topic, options())
            .await
            .expect("subscribed");
        while handled < total {
            let what =
                format!("round {round}: an event for the successor ({handled} of {total} handled)");
            let mut d = recv(&mut second, &what).await;
            let key = d.event().partition_key().unwrap_or_default().to_owned();
            let n: usize = d.event().data_as().expect("n");
            let expected = last.get(&key).map_or(0, |prev| prev + 1);
            assert_eq!(
                n, expected,
                "round {round}, key {key}: event {n} handled out of order"
            );
            last.insert(key, n);
            d.ack().await.expect("acked");
            handled += 1;
        }
        second.close().await.expect("closed");
        publishing.await.expect("publisher task");
        let _ = js.delete_stream(&stream).await;
    }
}

/// A batch that fails part-way leaves each key's stored events a prefix of
/// that key's events: a stream whose `max_msg_size` refuses one event of key
/// `a` stores no later event of `a`, so publishing the batch again cannot
/// store them ahead of the refused one. Other keys are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_holds_back_the_later_events_of_its_key() {
    let stored = stored_after_a_refusal("nats_prefix", 1).await;
    assert_eq!(
        stored.get("a"),
        Some(&vec![0]),
        "only a0, the event of `a` before the refused a1, may be stored"
    );
}

/// With two events of a key in flight, as `max_in_flight_per_key` documents,
/// the event after a refused one may be stored ahead of it: a2 was sent
/// when a0's acknowledgement came, before a1 was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_window_an_event_after_a_refused_one_may_be_stored() {
    let stored = stored_after_a_refusal("nats_window", 2).await;
    assert_eq!(
        stored.get("a"),
        Some(&vec![0, 2]),
        "a0, and a2 that was in flight beside the refused a1"
    );
}

/// Publishes a batch of keys `a` and `b` (six events each, interleaved) with
/// `window` events of a key in flight, to a stream that refuses a1 as too
/// large; returns each key's stored event numbers, in stream order, having
/// checked that `b`'s are in order.
async fn stored_after_a_refusal(
    prefix: &str,
    window: usize,
) -> std::collections::HashMap<String, Vec<usize>> {
    const LIMIT: i32 = 2048;
    let url = e2e::require(Server::Nats).unwrap_or_else(|e| panic!("{e:#}"));
    let window = NonZeroUsize::new(window).expect("a window");
    let broker = NatsBroker::connect(config(&url).max_in_flight_per_key(window))
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    let topic = topic(prefix);
    let client = async_nats::connect(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    let js = jetstream::new(client);
    // An operator's stream on the topic, refusing messages above LIMIT bytes.
    let name = broker.stream_name(&topic);
    js.create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![topic.to_string()],
        storage: jetstream::stream::StorageType::Memory,
        max_age: TEST_STREAM_AGE,
        max_message_size: LIMIT,
        ..Default::default()
    })
    .await
    .expect("stream created");
    assert_eq!(broker.provision(&topic).await.expect("found"), name);

    let event = |key: &str, n: usize, pad: usize| {
        CloudEventBuilder::new("dev.backbone.test", "/nats")
            .partition_key(key)
            .json_data(&(key, n, "x".repeat(pad)))
            .build()
            .expect("valid")
    };
    let mut batch = Vec::new();
    for n in 0..6 {
        // a1 is too large for the stream; everything else fits.
        let pad = if n == 1 { 4 * LIMIT as usize } else { 10 };
        batch.push(event("a", n, pad));
        batch.push(event("b", n, 10));
    }
    broker
        .publish_batch(&topic, batch)
        .await
        .expect_err("the stream refuses a1");
    // A fence: JetStream stores one connection's messages in the order
    // sent, so once this is acknowledged, whatever the batch sent before
    // it is stored too.
    broker
        .publish(&topic, event("fence", 0, 10))
        .await
        .expect("the fence stored");

    let mut stream = js.get_stream(&name).await.expect("stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut stored: std::collections::HashMap<String, Vec<usize>> = Default::default();
    for seq in 1..=last {
        let message = stream.get_raw_message(seq).await.expect("stored message");
        let (key, n, _): (String, usize, String) =
            serde_json::from_slice(&message.payload).expect("the event's data");
        stored.entry(key).or_default().push(n);
    }
    let b = stored.get("b").cloned().unwrap_or_default();
    assert_eq!(
        b,
        (0..b.len()).collect::<Vec<_>>(),
        "`b` is stored in order"
    );
    let _ = js.delete_stream(&name).await;
    stored
}

/// With eight events of a key in flight, nothing fails on a healthy
/// connection, so a key's events are still stored and handled in publish
/// order: the suite's ordering scenarios, published through such a broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_window_a_healthy_connection_keeps_each_keys_order() {
    let url = e2e::require(Server::Nats).unwrap_or_else(|e| panic!("{e:#}"));
    let eight = NonZeroUsize::new(8).expect("eight");
    let publisher = NatsBroker::connect(config(&url).max_in_flight_per_key(eight))
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Nats.unreachable(e)));
    let target = Nats { publisher };
    broker_adapters::conformance::scenarios::order_per_key(&target).await;
    broker_adapters::conformance::scenarios::batch_publish_delivers_all_in_order(&target).await;
}
