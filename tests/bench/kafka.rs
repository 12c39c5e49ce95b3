//! The Kafka adapter beside raw rdkafka with the same settings.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use broker_adapters::binding::{Binding, Message, Mode};
use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
use broker_adapters::prelude::*;
use futures_util::StreamExt;
use futures_util::future::try_join_all;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

use crate::{Figure, best};

const PARTITIONS: u16 = 4;

fn config() -> KafkaConfig {
    KafkaConfig::builder(e2e::kafka_bootstrap_servers().split(','))
        .session_timeout(Duration::from_secs(6))
}

fn raw_client() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", e2e::kafka_bootstrap_servers());
    c
}

pub(crate) async fn run(n: usize, size: usize, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    e2e::require(e2e::Server::Kafka)?;
    let broker = KafkaBroker::connect(config()).await?;
    let raw: FutureProducer = raw_client()
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .create()?;

    let (mut pub_ours, mut pub_raw, mut con_ours, mut con_raw) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let topic =
            Topic::try_from(e2e::unique_name(&format!("bench-kafka-{round}")).replace('_', "-"))?;
        broker.create_topic(&topic, PARTITIONS).await?;
        let raw_topic = format!("{topic}-raw");
        broker
            .create_topic(&Topic::try_from(raw_topic.as_str())?, PARTITIONS)
            .await?;

        let ours_first = round % 2 == 0;
        let (ours, raw) = crate::in_turn(
            ours_first,
            Box::pin(crate::publish_timed(
                "kafka publish (ours)",
                &broker,
                &topic,
                n,
                size,
            )),
            Box::pin(publish_raw(&raw, &raw_topic, n, size)),
        )
        .await?;
        pub_ours.push(ours);
        pub_raw.push(raw);
        let (ours, raw) = crate::in_turn(
            ours_first,
            Box::pin(consume_ours(&broker, &topic, round, n)),
            Box::pin(consume_raw(&topic, round, n)),
        )
        .await?;
        con_ours.push(ours);
        con_raw.push(raw);
        eprintln!("kafka round {round}: done");
    }
    Ok(vec![
        Figure::rate("kafka.publish", n, best(pub_ours), best(pub_raw)),
        Figure::rate("kafka.consume", n, best(con_ours), best(con_raw)),
    ])
}

/// Raw rdkafka sends byte-for-byte the same records (key, CloudEvents
/// headers, payload), encoded before the clock starts: the difference is
/// the adapter's own cost.
async fn publish_raw(
    raw: &FutureProducer,
    raw_topic: &str,
    n: usize,
    size: usize,
) -> anyhow::Result<Duration> {
    let records: Vec<Message> = crate::events(n, size)?
        .iter()
        .map(|e| Binding::KAFKA.encode(e, Mode::Binary))
        .collect::<Result<_, _>>()?;
    let cpu = crate::cpu_time();
    let start = Instant::now();
    let mut acks = Vec::with_capacity(n);
    for m in &records {
        let headers = m.headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        });
        let mut record = FutureRecord::to(raw_topic)
            .payload(&m.payload)
            .headers(headers);
        if let Some(key) = &m.key {
            record = record.key(key);
        }
        loop {
            match raw.send_result(record) {
                Ok(ack) => break acks.push(ack),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    for ack in try_join_all(acks).await? {
        ack.map_err(|(e, _)| e)?;
    }
    let took = start.elapsed();
    crate::report_cpu("kafka publish (raw)", cpu, n);
    Ok(took)
}

/// Consume what our publisher wrote: ours decodes and acks each event.
async fn consume_ours(
    broker: &KafkaBroker,
    topic: &Topic,
    round: usize,
    n: usize,
) -> anyhow::Result<Duration> {
    let mut sub = broker
        .subscribe(
            topic,
            SubscribeOptions::new(&format!("bench-ours-{round}"))?,
        )
        .await?;
    let mut first = sub.next().await.context("subscription ended")??;
    let cpu = crate::cpu_time();
    let start = Instant::now();
    first.ack().await?;
    for _ in 1..n {
        let mut d = sub.next().await.context("subscription ended")??;
        d.ack().await?;
    }
    let took = start.elapsed();
    crate::report_cpu("kafka consume (ours)", cpu, n);
    sub.close().await?;
    Ok(took)
}

/// Raw reads the same records and commits offsets as it goes.
async fn consume_raw(topic: &Topic, round: usize, n: usize) -> anyhow::Result<Duration> {
    let consumer: StreamConsumer = raw_client()
        .set(
            "group.id",
            format!("bench-raw-{round}-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[topic.as_str()])?;
    // Offsets to commit: one past the last record read, per partition.
    let mut positions: HashMap<i32, i64> = HashMap::new();
    let commit = |positions: &HashMap<i32, i64>, mode| -> anyhow::Result<()> {
        let mut list = TopicPartitionList::new();
        for (partition, offset) in positions {
            list.add_partition_offset(topic.as_str(), *partition, Offset::Offset(*offset))?;
        }
        consumer.commit(&list, mode)?;
        Ok(())
    };
    let mut last_commit = Instant::now();
    let first = consumer.recv().await?;
    let cpu = crate::cpu_time();
    let start = Instant::now();
    positions.insert(first.partition(), first.offset() + 1);
    drop(first);
    for _ in 1..n {
        let m = consumer.recv().await?;
        positions.insert(m.partition(), m.offset() + 1);
        if last_commit.elapsed() >= Duration::from_millis(100) {
            commit(&positions, CommitMode::Async)?;
            last_commit = Instant::now();
        }
    }
    commit(&positions, CommitMode::Sync)?;
    let took = start.elapsed();
    crate::report_cpu("kafka consume (raw)", cpu, n);
    Ok(took)
}
