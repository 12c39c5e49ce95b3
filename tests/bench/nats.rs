//! The NATS JetStream adapter beside raw async-nats with the same ack mode:
//! publishes wait for the JetStream ack, consumer acks are confirmed by the
//! server (a request it answers), and both sides keep many acks in flight.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull};
use broker_adapters::binding::{Binding, Message, Mode};
use broker_adapters::nats::{NatsBroker, NatsConfig, Storage};
use broker_adapters::prelude::*;
use futures_util::stream::FuturesUnordered;
use futures_util::{StreamExt, TryStreamExt};

use crate::{Figure, best};

/// Acks and publish acks kept in flight by both sides.
const WINDOW: usize = 256;

/// Events of one key in flight in the second run of our publish
/// (`NatsConfig::max_in_flight_per_key`; the default is one).
pub(crate) const PER_KEY: usize = 8;

pub(crate) async fn run(n: usize, size: usize, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    e2e::require(e2e::Server::Nats)?;
    let config = || {
        NatsConfig::builder()
            .url(e2e::nats_url())
            .stream_prefix("BENCH_")
            .storage(Storage::File)
            .max_age(Duration::from_secs(600))
    };
    let broker = NatsBroker::connect(config()).await?;
    let per_key = NonZeroUsize::new(PER_KEY).unwrap_or(NonZeroUsize::MIN);
    let windowed = NatsBroker::connect(config().max_in_flight_per_key(per_key)).await?;
    let client = async_nats::connect(e2e::nats_url()).await?;
    let js = jetstream::new(client);

    let (mut pub_ours, mut pub_raw, mut con_ours, mut con_raw) = (vec![], vec![], vec![], vec![]);
    let mut pub_windowed = vec![];
    for round in 0..rounds {
        let topic = Topic::try_from(format!("bench.nats.r{round}.p{}", std::process::id()))?;
        let raw_subject = format!("{topic}.raw");
        let raw_topic = Topic::try_from(raw_subject.as_str())?;
        let stream = broker.provision(&topic).await?;
        let raw_stream = broker.provision(&raw_topic).await?;

        let ours_first = round % 2 == 0;
        let (ours, raw) = crate::in_turn(
            ours_first,
            Box::pin(crate::publish_timed(
                "nats publish (ours)",
                &broker,
                &topic,
                n,
                size,
            )),
            Box::pin(publish_raw(&js, &raw_subject, n, size)),
        )
        .await?;
        pub_ours.push(ours);
        pub_raw.push(raw);
        // The same events again, eight of a key in flight, to a topic of
        // their own: beside the raw figure of this round.
        let windowed_topic = Topic::try_from(format!("{topic}.per-key"))?;
        let windowed_stream = windowed.provision(&windowed_topic).await?;
        pub_windowed.push(
            crate::publish_timed(
                "nats publish (ours, 8 per key)",
                &windowed,
                &windowed_topic,
                n,
                size,
            )
            .await?,
        );
        let _ = js.delete_stream(&windowed_stream).await;
        let (ours, raw) = crate::in_turn(
            ours_first,
            Box::pin(consume_ours(&broker, &topic, round, n)),
            Box::pin(consume_raw(&js, &raw_stream, round, n)),
        )
        .await?;
        con_ours.push(ours);
        con_raw.push(raw);
        for s in [&stream, &raw_stream] {
            let _ = js.delete_stream(s).await;
        }
        eprintln!("nats round {round}: done");
    }
    Ok(vec![
        Figure::rate("nats.publish", n, best(pub_ours), best(pub_raw.clone())),
        Figure::rate(
            "nats.publish_8_per_key",
            n,
            best(pub_windowed),
            best(pub_raw),
        ),
        Figure::rate("nats.consume", n, best(con_ours), best(con_raw)),
    ])
}

/// Raw sends the same messages with WINDOW acks in flight: the events are
/// encoded (header names and values, payload) before the clock starts, and
/// each message's `HeaderMap` is filled as it is sent, as the Kafka
/// baseline fills its `OwnedHeaders` (a raw async-nats user builds one per
/// message too; encoding the event is ours alone).
async fn publish_raw(
    js: &jetstream::Context,
    raw_subject: &str,
    n: usize,
    size: usize,
) -> anyhow::Result<Duration> {
    let messages: Vec<Message> = crate::events(n, size)?
        .iter()
        .map(|e| {
            let mut m = Binding::NATS.encode(e, Mode::Binary)?;
            m.headers
                .push(("Nats-Msg-Id".to_owned(), e.id().to_owned()));
            Ok(m)
        })
        .collect::<anyhow::Result<_>>()?;
    let cpu = crate::cpu_time();
    let start = Instant::now();
    let mut acks = FuturesUnordered::new();
    for Message {
        headers: encoded,
        payload,
        ..
    } in messages
    {
        if acks.len() >= WINDOW {
            acks.try_next().await?;
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &encoded {
            headers.insert(k.as_str(), v.as_str());
        }
        let ack = js
            .publish_with_headers(raw_subject.to_owned(), headers, payload.into())
            .await?;
        acks.push(ack.into_future());
    }
    while acks.try_next().await?.is_some() {}
    let took = start.elapsed();
    crate::report_cpu("nats publish (raw)", cpu, n);
    Ok(took)
}

/// Consume: a fresh durable consumer, every event acked and the ack
/// confirmed by the server. Acks run on their own tasks, so they progress
/// while the next delivery is awaited.
async fn consume_ours(
    broker: &NatsBroker,
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
    let mut pending = tokio::task::JoinSet::new();
    let first = sub.next().await.context("subscription ended")??;
    let cpu = crate::cpu_time();
    let start = Instant::now();
    pending.spawn(ack(first));
    for _ in 1..n {
        if pending.len() >= WINDOW {
            pending.join_next().await.context("ack task")???;
        }
        let d = sub.next().await.context("subscription ended")??;
        pending.spawn(ack(d));
    }
    while let Some(done) = pending.join_next().await {
        done??;
    }
    let took = start.elapsed();
    crate::report_cpu("nats consume (ours)", cpu, n);
    sub.close().await?;
    Ok(took)
}

/// The raw client's side of [`consume_ours`], on the raw stream.
async fn consume_raw(
    js: &jetstream::Context,
    raw_stream: &str,
    round: usize,
    n: usize,
) -> anyhow::Result<Duration> {
    let consumer = js
        .get_stream(raw_stream)
        .await?
        .create_consumer(pull::Config {
            durable_name: Some(format!("bench-raw-{round}")),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut pending = tokio::task::JoinSet::new();
    let first = next_raw(&mut messages).await?;
    let cpu = crate::cpu_time();
    let start = Instant::now();
    pending.spawn(raw_ack(first));
    for _ in 1..n {
        if pending.len() >= WINDOW {
            pending.join_next().await.context("ack task")???;
        }
        let m = next_raw(&mut messages).await?;
        pending.spawn(raw_ack(m));
    }
    while let Some(done) = pending.join_next().await {
        done??;
    }
    let took = start.elapsed();
    crate::report_cpu("nats consume (raw)", cpu, n);
    Ok(took)
}

/// The raw stream's next message. A missed idle heartbeat is reported as
/// an item but the stream goes on (it pulls again, as async-nats documents),
/// so the raw side skips it as a user of the client would, rather than
/// failing the run.
async fn next_raw(messages: &mut pull::Stream) -> anyhow::Result<jetstream::Message> {
    loop {
        match messages.next().await.context("raw stream ended")? {
            Ok(message) => return Ok(message),
            Err(e) if e.kind() == pull::MessagesErrorKind::MissingHeartbeat => {
                eprintln!("nats consume (raw): {e}; the stream goes on");
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn ack(mut delivery: Delivery) -> broker_adapters::Result<()> {
    delivery.ack().await.map(|_| ())
}

/// The raw client's confirmed ack, as ours sends it: a request on the
/// client's shared reply subscription. (async-nats' own `double_ack`
/// subscribes to a fresh inbox for each ack; the raw side measured with it
/// ran at 0.7–0.8 of this rate.)
async fn raw_ack(message: jetstream::Message) -> anyhow::Result<()> {
    let reply = message
        .reply
        .clone()
        .context("a JetStream message has a reply subject")?;
    message
        .context
        .client()
        .request(reply, "+ACK".into())
        .await
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{e}"))
}
