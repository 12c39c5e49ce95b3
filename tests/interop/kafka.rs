//! Interop of our CloudEvents Kafka protocol binding with another
//! implementation, the Python `cloudevents` SDK (`ce_peer.py`, producing and
//! consuming with confluent-kafka), on the Kafka-protocol broker the harness
//! runs: the SDK reads every attribute of what we publish, in binary and
//! structured mode, and we read every attribute of what it writes.
//!
//! `source tests/harness/up.sh && cargo test -p e2e --test interop_kafka`

mod peer;

use std::time::Duration;

use broker_adapters::binding::Mode;
use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
use broker_adapters::prelude::*;
use e2e::Server;
use futures_util::StreamExt as _;
use serde_json::Value;

/// Consumer-group joins on Tansu wait about half the session timeout.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// How long our subscription may take to deliver what the peer wrote.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(20);

async fn connect(mode: Mode) -> anyhow::Result<KafkaBroker> {
    e2e::require(Server::Kafka)?;
    let config = KafkaConfig::builder(e2e::kafka_bootstrap_servers().split(','))
        .session_timeout(SESSION_TIMEOUT)
        .commit_interval(Duration::from_millis(20))
        .mode(mode);
    KafkaBroker::connect(config)
        .await
        .map_err(|e| Server::Kafka.unreachable(e))
}

/// A fresh single-partition topic.
async fn new_topic(broker: &KafkaBroker) -> anyhow::Result<Topic> {
    let topic = Topic::try_from(e2e::unique_name("interop_kafka").as_str())?;
    broker.create_topic(&topic, 1).await?;
    Ok(topic)
}

/// We publish in `mode`; the SDK's `from_binary`/`from_structured` reads it.
async fn ours_to_python(mode: Mode) -> anyhow::Result<()> {
    let broker = connect(mode).await?;
    let topic = new_topic(&broker).await?;
    let sent = peer::our_event(&peer::event_spec(peer::SUBJECT))?;
    broker.publish(&topic, sent.clone()).await?;

    let servers = e2e::kafka_bootstrap_servers();
    let report = peer::run(
        "kafka-read",
        &[
            ("--topic", topic.as_str()),
            ("--mode", peer::mode_name(mode)),
            ("--server", &servers),
        ],
    )
    .await?;
    peer::assert_peer_read(&sent, &report, mode)?;
    anyhow::ensure!(
        report["message"]["key"].as_str() == sent.partition_key(),
        "the record key is {}, the partitionkey {:?}",
        report["message"]["key"],
        sent.partition_key(),
    );
    Ok(())
}

/// The SDK writes `spec` in `mode` (`to_binary`/`to_structured`, key from
/// `partitionkey`); our subscription reads it.
async fn python_to_ours(mode: Mode, spec: &Value) -> anyhow::Result<Event> {
    let broker = connect(Mode::Binary).await?;
    let topic = new_topic(&broker).await?;
    let mut subscription = broker
        .subscribe(&topic, SubscribeOptions::new(&e2e::unique_name("interop"))?)
        .await?;

    let servers = e2e::kafka_bootstrap_servers();
    let written = peer::run(
        "kafka-write",
        &[
            ("--topic", topic.as_str()),
            ("--mode", peer::mode_name(mode)),
            ("--server", &servers),
            ("--event", &spec.to_string()),
        ],
    )
    .await?;
    anyhow::ensure!(
        written["key"] == spec["attributes"]["partitionkey"],
        "the SDK keyed the record {} for partitionkey {}",
        written["key"],
        spec["attributes"]["partitionkey"],
    );

    let mut delivery = tokio::time::timeout(RECEIVE_TIMEOUT, subscription.next())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{topic}: nothing delivered within {RECEIVE_TIMEOUT:?}; the SDK wrote {written}"
            )
        })?
        .ok_or_else(|| anyhow::anyhow!("{topic}: the subscription ended"))??;
    let received = delivery.event().clone();
    peer::assert_we_read(spec, &received, mode)?;
    delivery.ack().await?;
    subscription.close().await?;
    Ok(received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_reads_our_binary_mode_events() -> anyhow::Result<()> {
    ours_to_python(Mode::Binary).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_reads_our_structured_mode_events() -> anyhow::Result<()> {
    ours_to_python(Mode::Structured).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_read_python_sdk_binary_mode_events() -> anyhow::Result<()> {
    python_to_ours(Mode::Binary, &peer::event_spec(peer::SUBJECT)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_read_python_sdk_structured_mode_events() -> anyhow::Result<()> {
    python_to_ours(Mode::Structured, &peer::event_spec(peer::SUBJECT)).await?;
    Ok(())
}

/// Kafka headers carry UTF-8 as is: a subject in several scripts, with
/// 4-byte characters, a combining accent and a line break, arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_read_a_non_ascii_subject_the_python_sdk_writes() -> anyhow::Result<()> {
    let subject = "Zoë’s Bestellung 注文 🚀 — e\u{301} שלום\nZeile 2";
    let received = python_to_ours(Mode::Binary, &peer::event_spec(subject)).await?;
    anyhow::ensure!(received.subject() == Some(subject));
    Ok(())
}
