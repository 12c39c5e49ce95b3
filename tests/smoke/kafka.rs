//! Kafka (Tansu): create a topic, produce idempotently with a key and a header,
//! consume it in a fresh group, commit, and delete the topic.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use e2e::{Server, require, unique_name, within};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use crate::STEP;

const KAFKA: Server = Server::Kafka;

/// Receiving includes joining the group, which on Tansu takes about half of
/// `session.timeout.ms`: allow more than one step.
const RECEIVE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn kafka_round_trip() -> anyhow::Result<()> {
    let bootstrap = require(KAFKA)?;
    let topic = unique_name("e2e-smoke");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("client.id", "e2e-smoke-admin")
        .create()
        .context("Kafka (Tansu): create admin client")?;
    let options = AdminOptions::new()
        .request_timeout(Some(STEP))
        .operation_timeout(Some(STEP));

    let created = within(
        KAFKA,
        "create topic",
        STEP,
        admin.create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &options,
        ),
    )
    .await?
    .map_err(|e| KAFKA.unreachable(format_args!("create topic {topic}: {e}")))?;
    for result in created {
        result.map_err(|(name, code)| {
            anyhow::anyhow!("Kafka (Tansu): create topic {name} failed: {code}")
        })?;
    }

    let result = round_trip(&bootstrap, &topic).await;

    // Delete the topic even when the round trip failed; report the first error.
    let deleted = within(
        KAFKA,
        "delete topic",
        STEP,
        admin.delete_topics(&[topic.as_str()], &options),
    )
    .await
    .and_then(|r| r.with_context(|| format!("Kafka (Tansu): delete topic {topic}")))
    .and_then(|results| {
        results.into_iter().try_for_each(|r| {
            r.map(drop).map_err(|(name, code)| {
                anyhow::anyhow!("Kafka (Tansu): delete topic {name} failed: {code}")
            })
        })
    });
    result?;
    deleted?;
    Ok(())
}

async fn round_trip(bootstrap: &str, topic: &str) -> anyhow::Result<()> {
    let key = format!("key-{topic}");
    let payload = format!("payload for {topic}");
    let ce_id = format!("id-{topic}");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", "e2e-smoke-producer")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .create()
        .context("Kafka (Tansu): create producer")?;
    let delivery = within(
        KAFKA,
        "delivery report",
        STEP,
        producer.send(
            FutureRecord::to(topic).key(&key).payload(&payload).headers(
                OwnedHeaders::new().insert(Header {
                    key: "ce_id",
                    value: Some(&ce_id),
                }),
            ),
            Timeout::After(STEP),
        ),
    )
    .await?
    .map_err(|(e, _message)| anyhow::anyhow!("Kafka (Tansu): produce to {topic}: {e}"))?;
    assert_eq!(delivery.partition, 0);

    let group = unique_name("e2e-smoke-group");
    let consumer: Arc<StreamConsumer> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("client.id", "e2e-smoke-consumer")
            .set("group.id", &group)
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .context("Kafka (Tansu): create consumer")?,
    );
    consumer
        .subscribe(&[topic])
        .with_context(|| format!("Kafka (Tansu): subscribe to {topic}"))?;

    let message = within(KAFKA, "the produced message", RECEIVE, consumer.recv())
        .await?
        .with_context(|| format!("Kafka (Tansu): consume from {topic}"))?
        .detach();
    assert_eq!(message.topic(), topic);
    assert_eq!(message.partition(), delivery.partition);
    assert_eq!(message.offset(), delivery.offset);
    assert_eq!(message.key(), Some(key.as_bytes()));
    assert_eq!(message.payload(), Some(payload.as_bytes()));
    let header = message
        .headers()
        .and_then(|headers| headers.iter().find(|h| h.key == "ce_id"))
        .and_then(|h| h.value);
    assert_eq!(header, Some(ce_id.as_bytes()));

    // Commit the next offset and read it back from the group coordinator. Both calls
    // block, so they run off the async runtime, bounded like every other step.
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(
            topic,
            message.partition(),
            Offset::Offset(message.offset() + 1),
        )
        .context("Kafka (Tansu): build commit offsets")?;
    let committer = Arc::clone(&consumer);
    let committed = within(
        KAFKA,
        "offset commit",
        STEP,
        tokio::task::spawn_blocking(move || {
            committer.commit(&offsets, CommitMode::Sync)?;
            committer.committed(Timeout::After(STEP))
        }),
    )
    .await?
    .context("Kafka (Tansu): commit task")?
    .with_context(|| format!("Kafka (Tansu): commit offsets for group {group}"))?;
    let committed = committed
        .find_partition(topic, message.partition())
        .map(|p| p.offset());
    assert_eq!(committed, Some(Offset::Offset(message.offset() + 1)));

    consumer.unsubscribe();
    Ok(())
}
