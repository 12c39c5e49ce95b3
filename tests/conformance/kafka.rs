//! The Kafka adapter against the shared conformance suite, on the real
//! Kafka-protocol broker the harness runs (Tansu by default).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_adapters::conformance::{Capabilities, Target};
use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
use broker_adapters::{Publisher, Result, Subscriber, Topic};
use e2e::Server;

/// Consumer-group joins on Tansu wait about half the session timeout.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

#[derive(Debug)]
struct Kafka {
    publisher: KafkaBroker,
}

fn config() -> KafkaConfig {
    KafkaConfig::builder(e2e::kafka_bootstrap_servers().split(','))
        .session_timeout(SESSION_TIMEOUT)
        .commit_interval(Duration::from_millis(20))
}

async fn target() -> Kafka {
    if let Err(e) = e2e::require(Server::Kafka) {
        panic!("{e:#}");
    }
    let publisher = KafkaBroker::connect(config())
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Kafka.unreachable(e)));
    Kafka { publisher }
}

#[async_trait]
impl Target for Kafka {
    fn capabilities(&self) -> Capabilities {
        // Joins and rebalances take seconds on a real group coordinator.
        Capabilities::default().receive_timeout(Duration::from_secs(30))
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(self.publisher.clone()))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        // A client of its own, so dropping it behaves like a crashed process.
        Ok(Arc::new(KafkaBroker::connect(config()).await?))
    }

    async fn topic(&self, name: &str) -> Result<Topic> {
        let topic = Topic::try_from(name)?;
        self.publisher.create_topic(&topic, 2).await?;
        Ok(topic)
    }
}

broker_adapters::conformance_suite!(target());

mod kafka_specific {
    use std::time::Duration;

    use broker_adapters::binding::Mode;
    use broker_adapters::cloudevents::AttributesReader;
    use broker_adapters::kafka::KafkaBroker;
    use broker_adapters::prelude::*;
    use futures_util::StreamExt;
    use rdkafka::ClientConfig;
    use rdkafka::Message as _;
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    use super::{config, target};
    use broker_adapters::conformance::Target;

    const WAIT: Duration = Duration::from_secs(30);

    fn raw_producer() -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", e2e::kafka_bootstrap_servers())
            .create()
            .expect("raw producer")
    }

    /// A reader of `<topic>.dlq` from its start, in a group of its own.
    fn dlq_reader(topic: &Topic) -> StreamConsumer {
        let dlq: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", e2e::kafka_bootstrap_servers())
            .set("group.id", e2e::unique_name("dlq-reader"))
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .create()
            .expect("dlq consumer");
        dlq.subscribe(&[&format!("{topic}.dlq")])
            .expect("subscribe dlq");
        dlq
    }

    async fn dead_letter(dlq: &StreamConsumer) -> OwnedMessage {
        tokio::time::timeout(WAIT, dlq.recv())
            .await
            .expect("dead letter in time")
            .expect("dead letter")
            .detach()
    }

    async fn next(sub: &mut Subscription) -> Delivery {
        tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("a delivery in time")
            .expect("subscription open")
            .expect("delivery")
    }

    /// With a buffer far smaller than what librdkafka fetches, the pump
    /// stops and starts again as deliveries are acked, many times over, and
    /// every event still arrives once, in order per key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_buffer_delivers_every_event_in_key_order() {
        const EVENTS: usize = 3_000;
        const KEYS: usize = 5;
        let t = target().await;
        let topic = t
            .topic(&e2e::unique_name("conformance-small-buffer"))
            .await
            .expect("topic");
        let events: Vec<_> = (0..EVENTS)
            .map(|i| {
                CloudEventBuilder::new("t", "/s")
                    .partition_key(format!("k{}", i % KEYS))
                    .json_data(&i)
                    .build()
                    .expect("event")
            })
            .collect();
        t.publisher
            .publish_batch(&topic, events)
            .await
            .expect("published");
        let broker = KafkaBroker::connect(
            config().max_buffered(std::num::NonZeroUsize::new(8).expect("positive")),
        )
        .await
        .expect("connect");
        let mut sub = broker
            .subscribe(
                &topic,
                SubscribeOptions::new("small-buffer").expect("group"),
            )
            .await
            .expect("subscribe");
        let mut last: Vec<Option<usize>> = vec![None; KEYS];
        for _ in 0..EVENTS {
            let mut d = next(&mut sub).await;
            let i: usize = d.event().data_as().expect("index");
            let key = i % KEYS;
            let expected = last[key].map_or(key, |before| before + KEYS);
            assert_eq!(i, expected, "key {key}: in order, none skipped or repeated");
            last[key] = Some(i);
            d.ack().await.expect("ack");
        }
        sub.close().await.expect("close");
    }

    /// Records that are not CloudEvents, or too large, go to `<topic>.dlq`
    /// unchanged with the reason; the partition keeps flowing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn undecodable_and_oversized_records_are_dead_lettered_not_lost() {
        let t = target().await;
        let topic = t
            .topic(&e2e::unique_name("conformance-dlq"))
            .await
            .expect("topic");
        let broker = KafkaBroker::connect(
            config().max_event_bytes(std::num::NonZeroUsize::new(4096).expect("positive")),
        )
        .await
        .expect("connect");
        let mut sub = broker
            .subscribe(&topic, SubscribeOptions::new("dlq-test").expect("group"))
            .await
            .expect("subscribe");

        let raw = raw_producer();
        let garbage: &[u8] = b"\xff\x00 definitely not a cloudevent";
        raw.send(
            FutureRecord::to(topic.as_str())
                .key("k")
                .payload(garbage)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "trace",
                    value: Some("keep-me"),
                })),
            WAIT,
        )
        .await
        .expect("garbage produced");
        let half_event = OwnedHeaders::new()
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            })
            .insert(Header {
                key: "ce_id",
                value: Some("x"),
            });
        raw.send(
            FutureRecord::to(topic.as_str())
                .key("k")
                .payload("{}")
                .headers(half_event),
            WAIT,
        )
        .await
        .expect("event without type/source produced");
        let oversized = CloudEventBuilder::new("t", "/s")
            .partition_key("k")
            .binary_data("application/octet-stream", vec![1u8; 8192])
            .build()
            .expect("event");
        t.publisher
            .publish(&topic, oversized)
            .await
            .expect("the publisher's limit is larger");
        let valid = CloudEventBuilder::new("t", "/s")
            .partition_key("k")
            .json_data(&1)
            .build()
            .expect("event");
        broker.publish(&topic, valid.clone()).await.expect("valid");

        let mut d = next(&mut sub).await;
        assert_eq!(
            d.event().id(),
            valid.id(),
            "bad records do not block the partition"
        );
        d.ack().await.expect("ack");

        let dlq = dlq_reader(&topic);
        let mut reasons = Vec::new();
        for expected_payload_len in [garbage.len(), 2, 0] {
            let m = dead_letter(&dlq).await;
            let header = |name: &str| e2e::kafka_header(&m, name);
            assert_eq!(header("dlq-topic").as_deref(), Some(topic.as_str()));
            assert!(header("dlq-offset").is_some());
            reasons.push(header("dlq-reason").expect("reason"));
            if expected_payload_len == garbage.len() {
                assert_eq!(m.payload(), Some(garbage), "kept unchanged");
                assert_eq!(header("trace").as_deref(), Some("keep-me"));
            }
            assert_eq!(m.key(), Some(&b"k"[..]));
        }
        assert!(reasons[0].contains("could not decode"), "{reasons:?}");
        assert!(
            reasons[1].contains("type") || reasons[1].contains("source"),
            "{reasons:?}"
        );
        assert!(reasons[2].contains("exceeds the limit"), "{reasons:?}");
    }

    /// Writes one record to `partition` of `topic` with a Produce request
    /// (v3) of our own: the Kafka clients here only write header names that
    /// are UTF-8, and this one is not.
    fn produce_with_header_name(
        topic: &str,
        partition: i32,
        header_name: &[u8],
        key: &[u8],
        payload: &[u8],
    ) {
        use std::io::{Read as _, Write as _};

        fn varint(out: &mut Vec<u8>, n: i64) {
            let mut z = ((n << 1) ^ (n >> 63)) as u64;
            while z >= 0x80 {
                out.push((z as u8) | 0x80);
                z >>= 7;
            }
            out.push(z as u8);
        }
        fn bytes(out: &mut Vec<u8>, b: &[u8]) {
            varint(out, b.len() as i64);
            out.extend_from_slice(b);
        }
        fn crc32c(data: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in data {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0x82F6_3B78
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }

        let mut record = vec![0u8]; // attributes
        varint(&mut record, 0); // timestamp delta
        varint(&mut record, 0); // offset delta
        bytes(&mut record, key);
        bytes(&mut record, payload);
        varint(&mut record, 1); // one header
        bytes(&mut record, header_name);
        bytes(&mut record, b"v");
        let mut records = Vec::new();
        varint(&mut records, record.len() as i64);
        records.extend_from_slice(&record);

        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_millis(),
        )
        .expect("millis");
        let mut checked = Vec::new(); // from attributes to the end
        checked.extend_from_slice(&0i16.to_be_bytes()); // attributes
        checked.extend_from_slice(&0i32.to_be_bytes()); // last offset delta
        checked.extend_from_slice(&now.to_be_bytes());
        checked.extend_from_slice(&now.to_be_bytes());
        checked.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
        checked.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
        checked.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
        checked.extend_from_slice(&1i32.to_be_bytes()); // records
        checked.extend_from_slice(&records);
        let mut batch = Vec::new();
        batch.extend_from_slice(&0i64.to_be_bytes()); // base offset
        let length = 4 + 1 + 4 + checked.len();
        batch.extend_from_slice(&i32::try_from(length).expect("small").to_be_bytes());
        batch.extend_from_slice(&(-1i32).to_be_bytes()); // leader epoch
        batch.push(2); // magic
        batch.extend_from_slice(&crc32c(&checked).to_be_bytes());
        batch.extend_from_slice(&checked);

        let mut request = Vec::new();
        request.extend_from_slice(&0i16.to_be_bytes()); // Produce
        request.extend_from_slice(&3i16.to_be_bytes()); // v3
        request.extend_from_slice(&7i32.to_be_bytes()); // correlation id
        request.extend_from_slice(&4i16.to_be_bytes());
        request.extend_from_slice(b"test");
        request.extend_from_slice(&(-1i16).to_be_bytes()); // no transactional id
        request.extend_from_slice(&(-1i16).to_be_bytes()); // acks = all
        request.extend_from_slice(&10_000i32.to_be_bytes());
        request.extend_from_slice(&1i32.to_be_bytes()); // one topic
        request.extend_from_slice(&i16::try_from(topic.len()).expect("short").to_be_bytes());
        request.extend_from_slice(topic.as_bytes());
        request.extend_from_slice(&1i32.to_be_bytes()); // one partition
        request.extend_from_slice(&partition.to_be_bytes());
        request.extend_from_slice(&i32::try_from(batch.len()).expect("small").to_be_bytes());
        request.extend_from_slice(&batch);

        let bootstrap = e2e::kafka_bootstrap_servers();
        let address = bootstrap.split(',').next().expect("a bootstrap server");
        let mut conn = std::net::TcpStream::connect(address).expect("connect to the broker");
        conn.set_read_timeout(Some(WAIT)).expect("timeout");
        conn.write_all(&i32::try_from(request.len()).expect("small").to_be_bytes())
            .expect("send");
        conn.write_all(&request).expect("send");
        let mut size = [0u8; 4];
        conn.read_exact(&mut size).expect("response size");
        let mut response = vec![0u8; usize::try_from(i32::from_be_bytes(size)).expect("size")];
        conn.read_exact(&mut response).expect("response");
        // correlation id, one topic (name), one partition: its error code.
        let at = 4 + 4 + 2 + topic.len() + 4 + 4;
        let code = i16::from_be_bytes([response[at], response[at + 1]]);
        assert_eq!(code, 0, "the broker took the record");
    }

    /// A record whose header name is not UTF-8 is dead-lettered (without
    /// its headers, which cannot be read) and the partition keeps flowing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_header_name_that_is_not_utf8_is_dead_lettered() {
        let t = target().await;
        let topic = t
            .topic(&e2e::unique_name("conformance-header-name"))
            .await
            .expect("topic");
        let mut sub = t
            .subscriber()
            .await
            .expect("subscriber")
            .subscribe(&topic, SubscribeOptions::new("header-name").expect("group"))
            .await
            .expect("subscribe");
        // On both partitions, so the valid event below comes after one.
        let name = topic.to_string();
        tokio::task::spawn_blocking(move || {
            for partition in [0, 1] {
                produce_with_header_name(&name, partition, b"ce_\xffid", b"k", b"bad-name");
            }
        })
        .await
        .expect("produced");
        let valid = CloudEventBuilder::new("t", "/s")
            .partition_key("k")
            .json_data(&1)
            .build()
            .expect("event");
        t.publisher
            .publish(&topic, valid.clone())
            .await
            .expect("valid");

        let mut d = next(&mut sub).await;
        assert_eq!(
            d.event().id(),
            valid.id(),
            "the bad record does not stop the partition"
        );
        d.ack().await.expect("ack");

        let dlq = dlq_reader(&topic);
        for _ in 0..2 {
            let m = dead_letter(&dlq).await;
            assert_eq!(m.payload(), Some(&b"bad-name"[..]), "kept unchanged");
            assert_eq!(m.key(), Some(&b"k"[..]));
            let reason = e2e::kafka_header(&m, "dlq-reason").expect("a reason");
            assert!(reason.contains("header name is not UTF-8"), "{reason}");
        }
    }

    /// Structured mode carries the whole event as JSON; both modes are read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn structured_mode_round_trips_and_both_modes_are_read() {
        let t = target().await;
        let topic = t
            .topic(&e2e::unique_name("conformance-structured"))
            .await
            .expect("topic");
        let structured = KafkaBroker::connect(config().mode(Mode::Structured))
            .await
            .expect("connect");
        let mut sub = structured
            .subscribe(&topic, SubscribeOptions::new("structured").expect("group"))
            .await
            .expect("subscribe");
        let a = CloudEventBuilder::new("t", "/s")
            .partition_key("k")
            .subject("structured")
            .json_data(&serde_json::json!({"n": 1}))
            .build()
            .expect("event");
        let b = CloudEventBuilder::new("t", "/s")
            .partition_key("k")
            .subject("binary")
            .json_data(&serde_json::json!({"n": 2}))
            .build()
            .expect("event");
        structured
            .publish(&topic, a.clone())
            .await
            .expect("structured");
        t.publisher
            .publish(&topic, b.clone())
            .await
            .expect("binary");
        for sent in [a, b] {
            let mut d = next(&mut sub).await;
            assert_eq!(d.event().id(), sent.id());
            assert_eq!(d.event().subject(), sent.subject());
            assert_eq!(
                d.event().data_as::<serde_json::Value>().expect("json"),
                sent.data_as::<serde_json::Value>().expect("json")
            );
            d.ack().await.expect("ack");
        }
    }
}
