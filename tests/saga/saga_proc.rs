//! `saga-proc`: a saga coordinator in its own process, for the crash test.
//! Applies the replies from NATS (`{prefix}replies`) and the due timers of
//! the order saga on PostgreSQL or SQLite, until it is killed. Commands go
//! to the outbox; a relay elsewhere publishes them.

use std::time::Duration;

use anyhow::Context as _;
use broker_adapters::nats::{NatsBroker, NatsConfig};
use broker_adapters::{SubscribeOptions, Subscriber, Topic};
use clap::Parser;
use orchestrator::saga::{Coordinator, CoordinatorConfig, Definitions};
use orchestrator::{Outbox, OutboxConfig};
use tokio_util::sync::CancellationToken;

#[path = "def.rs"]
mod def;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    database_url: String,
    #[arg(long)]
    nats_url: String,
    /// Topic prefix of this run.
    #[arg(long)]
    prefix: String,
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    #[arg(long, default_value_t = 30)]
    attempts: u32,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let definitions = Definitions::new().with(def::order_saga(
        &args.prefix,
        1,
        Duration::from_millis(args.timeout_ms),
        args.attempts,
    )?)?;
    let replies = Topic::try_from(format!("{}replies", args.prefix).as_str())?;
    let config = CoordinatorConfig::new(replies.clone())
        .poll_interval(Duration::from_millis(50))
        .claim_lease(Duration::from_millis(2000));
    let broker = NatsBroker::connect(
        NatsConfig::builder()
            .url(&args.nats_url)
            .request_timeout(Duration::from_millis(2000)),
    )
    .await
    .context("connecting to NATS")?;
    let coordinator = if args.database_url.starts_with("sqlite:") {
        let pool = orchestrator::sqlite::connect(&args.database_url).await?;
        let outbox = Outbox::sqlite(pool.clone(), OutboxConfig::new()).await?;
        Coordinator::sqlite(pool, outbox, definitions, config)
    } else {
        let pool = orchestrator::sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&args.database_url)
            .await
            .context("connecting to PostgreSQL")?;
        let outbox = Outbox::postgres(pool.clone(), OutboxConfig::new()).await?;
        Coordinator::postgres(pool, outbox, definitions, config)
    };
    let sub = broker
        .subscribe(
            &replies,
            SubscribeOptions::new("coordinators")?.ack_wait(Duration::from_secs(3)),
        )
        .await?;
    eprintln!("saga-proc started");
    coordinator.run(sub, CancellationToken::new()).await;
    Ok(())
}
