//! NATS JetStream: publish with a header to a unique stream, pull it back, ack.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};
use e2e::{Server, require, unique_name, within};
use futures_util::StreamExt as _;

use crate::STEP;

const NATS: Server = Server::Nats;

#[tokio::test]
async fn nats_jetstream_round_trip() -> anyhow::Result<()> {
    let url = require(NATS)?;
    let client = within(
        NATS,
        "connect",
        STEP,
        // The connect future is large: keep it off the stack.
        Box::pin(
            async_nats::ConnectOptions::new()
                .connection_timeout(STEP)
                .connect(url.as_str()),
        ),
    )
    .await?
    .map_err(|e| NATS.unreachable(e))?;
    let js = jetstream::new(client);

    let name = unique_name("E2E_SMOKE");
    let subject = format!("e2e.smoke.{name}");
    let stream = within(
        NATS,
        "create stream",
        STEP,
        js.get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::Memory,
            ..Default::default()
        }),
    )
    .await?
    .with_context(|| format!("NATS: create stream {name} (is JetStream enabled?)"))?;

    let result = round_trip(&js, &stream, &subject).await;

    // Clean up even when the round trip failed; report the first error.
    let deleted = within(NATS, "delete stream", STEP, js.delete_stream(&name))
        .await
        .and_then(|r| r.with_context(|| format!("NATS: delete stream {name}")));
    result?;
    deleted?;
    Ok(())
}

async fn round_trip(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> anyhow::Result<()> {
    let payload = format!("payload for {subject}");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("ce-id", subject);

    let ack_future = within(
        NATS,
        "publish",
        STEP,
        js.publish_with_headers(subject.to_owned(), headers, payload.clone().into()),
    )
    .await?
    .context("NATS: publish")?;
    let ack = within(NATS, "publish ack", STEP, ack_future)
        .await?
        .context("NATS: publish ack")?;
    assert_eq!(ack.stream, stream.cached_info().config.name);
    assert_eq!(ack.sequence, 1);

    let consumer: consumer::PullConsumer = within(
        NATS,
        "create consumer",
        STEP,
        stream.create_consumer(consumer::pull::Config {
            durable_name: Some("smoke".to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        }),
    )
    .await?
    .context("NATS: create pull consumer")?;

    let mut batch = within(
        NATS,
        "fetch",
        STEP,
        consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(10))
            .messages(),
    )
    .await?
    .context("NATS: fetch")?;
    let message = within(NATS, "the published message", STEP, batch.next())
        .await?
        .context("NATS: fetch ended without a message")?
        .map_err(|e| anyhow::anyhow!(e).context("NATS: fetch"))?;

    assert_eq!(message.subject.as_str(), subject);
    assert_eq!(message.payload.as_ref(), payload.as_bytes());
    let ce_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get("ce-id"))
        .map(|v| v.as_str().to_owned());
    assert_eq!(ce_id.as_deref(), Some(subject));

    within(NATS, "ack", STEP, message.ack())
        .await?
        .map_err(|e| anyhow::anyhow!(e).context("NATS: ack"))?;
    Ok(())
}
