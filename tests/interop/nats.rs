//! Interop of our CloudEvents NATS protocol binding with another
//! implementation, the Python `cloudevents` SDK (`ce_peer.py`, on nats-py
//! and JetStream), on the nats-server the harness runs: the SDK reads every
//! attribute of what we publish, in binary and structured mode, and we read
//! every attribute of what it writes.
//!
//! The Python SDK has no NATS binding of its own. The NATS binding's binary
//! mode is the HTTP binding's header layout (`ce-<name>` headers,
//! percent-encoded values, `content-type` for `datacontenttype`), and its
//! structured mode the HTTP one (`content-type: application/cloudevents+json`
//! and the JSON event as the payload), so the peer encodes and decodes with
//! the SDK's `cloudevents.core.bindings.http` functions and carries the
//! resulting headers and body over NATS.
//!
//! `source tests/harness/up.sh && cargo test -p e2e --test interop_nats`
//!
//! Streams are named `E2E_CE_*`, kept in memory and hold messages for ten
//! minutes, like those of `conformance_nats`, which deletes old ones.

mod peer;

use std::time::Duration;

use broker_adapters::binding::Mode;
use broker_adapters::nats::{NatsBroker, NatsConfig, Storage};
use broker_adapters::prelude::*;
use e2e::Server;
use futures_util::StreamExt as _;
use serde_json::Value;

/// The stream-name prefix of the streams these tests create.
const PREFIX: &str = "E2E_CE_";

/// How long test streams keep messages.
const TEST_STREAM_AGE: Duration = Duration::from_secs(600);

/// How long our subscription may take to deliver what the peer wrote.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(15);

async fn connect(mode: Mode) -> anyhow::Result<(String, NatsBroker)> {
    let url = e2e::require(Server::Nats)?;
    let config = NatsConfig::builder()
        .url(&url)
        .stream_prefix(PREFIX)
        .storage(Storage::Memory)
        .max_age(TEST_STREAM_AGE)
        .publish_mode(mode);
    let broker = NatsBroker::connect(config)
        .await
        .map_err(|e| Server::Nats.unreachable(e))?;
    Ok((url, broker))
}

fn new_topic() -> anyhow::Result<Topic> {
    Ok(Topic::try_from(e2e::unique_name("interop_nats").as_str())?)
}

/// We publish in `mode`; the SDK's HTTP-binding `from_binary` /
/// `from_structured` decodes the NATS message's headers and payload.
async fn ours_to_python(mode: Mode) -> anyhow::Result<()> {
    let (url, broker) = connect(mode).await?;
    let topic = new_topic()?;
    let sent = peer::our_event(&peer::event_spec(peer::SUBJECT))?;
    // Publishing creates the topic's stream, from which the peer reads.
    broker.publish(&topic, sent.clone()).await?;

    let report = peer::run(
        "nats-read",
        &[
            ("--subject", topic.as_str()),
            ("--mode", peer::mode_name(mode)),
            ("--server", &url),
        ],
    )
    .await?;
    peer::assert_peer_read(&sent, &report, mode)?;
    if mode == Mode::Binary {
        // Our escaping is the HTTP binding's: what needs it arrives escaped.
        let subject = report["message"]["headers"]["ce-subject"]
            .as_str()
            .unwrap_or_default();
        anyhow::ensure!(
            subject.is_ascii() && subject.contains("%22") && subject.contains("%25"),
            "the ce-subject header is not percent-encoded: {subject:?}"
        );
    }
    Ok(())
}

/// The SDK encodes `spec` in `mode` and the peer publishes it to JetStream;
/// our durable consumer, subscribed first (which creates the stream), reads it.
async fn python_to_ours(mode: Mode, spec: &Value) -> anyhow::Result<()> {
    let (url, broker) = connect(Mode::Binary).await?;
    let topic = new_topic()?;
    let mut subscription = broker
        .subscribe(&topic, SubscribeOptions::new(&e2e::unique_name("interop"))?)
        .await?;

    let written = peer::run(
        "nats-write",
        &[
            ("--subject", topic.as_str()),
            ("--mode", peer::mode_name(mode)),
            ("--server", &url),
            ("--event", &spec.to_string()),
        ],
    )
    .await?;

    let mut delivery = tokio::time::timeout(RECEIVE_TIMEOUT, subscription.next())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{topic}: nothing delivered within {RECEIVE_TIMEOUT:?}; the SDK wrote {written}"
            )
        })?
        .ok_or_else(|| anyhow::anyhow!("{topic}: the subscription ended"))??;
    peer::assert_we_read(spec, delivery.event(), mode)?;
    delivery.ack().await?;
    subscription.close().await?;
    Ok(())
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
    python_to_ours(Mode::Binary, &peer::event_spec(peer::SUBJECT)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_read_python_sdk_structured_mode_events() -> anyhow::Result<()> {
    python_to_ours(Mode::Structured, &peer::event_spec(peer::SUBJECT)).await
}
