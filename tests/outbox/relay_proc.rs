//! `relay-proc`: an outbox relay as a process of its own, publishing the
//! rows of a PostgreSQL or SQLite outbox to NATS JetStream or Kafka. The
//! outbox process tests start it, kill it with SIGKILL and start it again.
//!
//! ```text
//! relay-proc --database-url <postgres://…|sqlite://…> \
//!            (--nats-url nats://127.0.0.1:4222 |
//!             --kafka-bootstrap 127.0.0.1:9092 [--kafka-idempotence false]) \
//!            --relay-id a [--batch-size 50] [--lease-ms 3000] [--pause-ms 0]
//! ```
//!
//! It runs until it is killed. With `--pause-ms`, it waits that long after
//! the broker acknowledged each batch, before the rows are marked published:
//! a kill then lands between the broker's acknowledgement and the mark.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use broker_adapters::cloudevents::Event;
use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
use broker_adapters::nats::{NatsBroker, NatsConfig};
use broker_adapters::{Publisher, Topic};
use clap::Parser;
use orchestrator::{Outbox, OutboxConfig, RelayConfig};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Args {
    /// The outbox database: `postgres://…` or `sqlite://…`.
    #[arg(long)]
    database_url: String,
    /// The NATS server.
    #[arg(
        long,
        required_unless_present = "kafka_bootstrap",
        conflicts_with = "kafka_bootstrap"
    )]
    nats_url: Option<String>,
    /// The Kafka cluster's bootstrap servers, instead of NATS.
    #[arg(long)]
    kafka_bootstrap: Option<String>,
    /// Whether the Kafka producer is idempotent (`KafkaConfig::idempotence`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    kafka_idempotence: bool,
    /// The relay's id in the lease table.
    #[arg(long)]
    relay_id: String,
    /// Rows per batch.
    #[arg(long, default_value_t = 50)]
    batch_size: usize,
    /// Lease time in milliseconds.
    #[arg(long, default_value_t = 3000)]
    lease_ms: u64,
    /// Partitions published at once (1: batches go out one at a time, so
    /// the pause paces the whole relay).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Pause after each acknowledged batch, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
}

/// A publisher that pauses after each acknowledged batch.
#[derive(Debug)]
struct Pausing {
    inner: Arc<dyn Publisher>,
    pause: Duration,
}

#[async_trait]
impl Publisher for Pausing {
    async fn publish(&self, topic: &Topic, event: Event) -> broker_adapters::Result<()> {
        self.inner.publish(topic, event).await
    }

    async fn publish_batch(
        &self,
        topic: &Topic,
        events: Vec<Event>,
    ) -> broker_adapters::Result<()> {
        self.inner.publish_batch(topic, events).await?;
        tokio::time::sleep(self.pause).await;
        Ok(())
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The relay's and the adapters' own words (`RUST_LOG`), on stderr: what
    // a failing test shows of this process.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let inner: Arc<dyn Publisher> = match (&args.nats_url, &args.kafka_bootstrap) {
        (Some(url), _) => Arc::new(
            NatsBroker::connect(
                NatsConfig::builder()
                    .url(url)
                    .request_timeout(Duration::from_millis(1000)),
            )
            .await
            .context("connecting to NATS")?,
        ),
        (None, Some(bootstrap)) => Arc::new(
            // librdkafka's default delivery timeout (30 s): it holds what
            // it was given that long, across the relay's retries.
            KafkaBroker::connect(
                KafkaConfig::builder(bootstrap.split(',').map(str::to_owned))
                    .idempotence(args.kafka_idempotence),
            )
            .await
            .context("connecting to Kafka")?,
        ),
        (None, None) => anyhow::bail!("--nats-url or --kafka-bootstrap is required"),
    };
    let publisher: Arc<dyn Publisher> = Arc::new(Pausing {
        inner,
        pause: Duration::from_millis(args.pause_ms),
    });
    let config = RelayConfig::new()
        .relay_id(&args.relay_id)
        .batch_size(args.batch_size)
        .concurrency(args.concurrency)
        .lease_ttl(Duration::from_millis(args.lease_ms))
        .poll_interval(Duration::from_millis(100))
        .backoff(Duration::from_millis(50), Duration::from_millis(1000));
    let relay = if args.database_url.starts_with("sqlite:") {
        let pool = orchestrator::sqlite::connect(&args.database_url).await?;
        Outbox::sqlite(pool, OutboxConfig::new())
            .await?
            .relay(publisher, config)?
    } else {
        let pool = orchestrator::sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&args.database_url)
            .await
            .context("connecting to PostgreSQL")?;
        Outbox::postgres(pool, OutboxConfig::new())
            .await?
            .relay(publisher, config)?
    };
    eprintln!("relay-proc {} started", args.relay_id);
    let report = relay.run(CancellationToken::new()).await?;
    eprintln!("relay-proc stopped: {report:?}");
    Ok(())
}
