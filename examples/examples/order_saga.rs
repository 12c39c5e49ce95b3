//! The order saga of `examples/sagas/order.yaml` end to end, against a
//! running `saga-coordinator` on its embedded default (SQLite, commands and
//! replies on the SQL broker in the coordinator's database file).
//!
//! Demonstrates: participants written with the library's `Participant`
//! (each command handled once, its reply sent through the participant's
//! own outbox), a client starting sagas over the coordinator's HTTP API and
//! reading their outcome: orders over 1,000 are declined by payment, so
//! their reservation is released (compensated).
//!
//! Run, from the repository root:
//!
//! ```sh
//! cargo run -p orchestrator --features service --bin saga-coordinator -- --definitions examples/sagas
//! # in another terminal, in the same directory:
//! cargo run -p examples --example order_saga
//! ```
//!
//! Options: `--coordinator URL` (default `http://127.0.0.1:8090`),
//! `--broker-db PATH` (the coordinator's database file, default
//! `saga-coordinator.db`), `--sagas N` (default 3).
//! Needs: a running `saga-coordinator` with the example definitions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use broker_adapters::prelude::*;
use broker_adapters::sql::{SqlBroker, SqlConfig};
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use orchestrator::saga::{Participant, ReplyError, SagaCommand, StepReply};
use orchestrator::{Outbox, OutboxConfig, RelayConfig};
use serde_json::{Value, json};

/// What the three services do with a command.
fn handle(cmd: &SagaCommand) -> StepReply {
    let amount = cmd.data.get("amount").and_then(Value::as_u64).unwrap_or(0);
    let failure = |reply_type: &str, code: &str, message: String| StepReply::Failure {
        reply_type: reply_type.into(),
        error: ReplyError {
            code: code.into(),
            message,
            retryable: false,
        },
    };
    let done = match cmd.command_type.as_str() {
        "com.example.payment.charge" if amount > 1000 => {
            return failure(
                "com.example.payment.declined",
                "limit_exceeded",
                format!("{amount} is over the limit of 1000"),
            );
        }
        "com.example.inventory.reserve" => "com.example.inventory.reserved",
        "com.example.inventory.release" => "com.example.inventory.released",
        "com.example.payment.charge" => "com.example.payment.charged",
        "com.example.payment.refund" => "com.example.payment.refunded",
        "com.example.shipping.ship" => "com.example.shipping.shipped",
        other => {
            return failure(
                "com.example.shipping.refused",
                "unknown_command",
                format!("no service handles `{other}`"),
            );
        }
    };
    StepReply::Success {
        reply_type: done.into(),
        data: json!({ "handled_by": cmd.command_type }),
    }
}

struct Args {
    coordinator: String,
    broker_db: String,
    sagas: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        coordinator: "http://127.0.0.1:8090".into(),
        broker_db: "saga-coordinator.db".into(),
        sagas: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--coordinator" => args.coordinator = value,
            "--broker-db" => args.broker_db = value,
            "--sagas" => args.sagas = value.parse().context("--sagas: a number")?,
            other => bail!("unknown option {other}"),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    anyhow::ensure!(
        std::path::Path::new(&args.broker_db).exists(),
        "{} does not exist: start saga-coordinator first (see the top of this file)",
        args.broker_db
    );
    // The broker: the SQL broker in the coordinator's database.
    let broker = Arc::new(
        SqlBroker::connect(SqlConfig::builder().url(format!("sqlite://{}", args.broker_db)))
            .await?,
    );

    // The services' own database: inbox, outbox, and its relay.
    let dir = std::env::temp_dir().join(format!("order-services-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pool =
        orchestrator::sqlite::connect(&format!("sqlite://{}", dir.join("services.db").display()))
            .await?;
    orchestrator::sqlite::migrate(&pool).await?;
    let outbox = Outbox::sqlite(pool.clone(), OutboxConfig::new()).await?;
    let relay = outbox.relay(broker.clone(), RelayConfig::new())?.spawn();
    let participant = Participant::sqlite(pool.clone(), outbox, "order-services");

    let mut services = Vec::new();
    for (service, topic) in [
        ("inventory", "inventory.commands"),
        ("payment", "payment.commands"),
        ("shipping", "shipping.commands"),
    ] {
        let mut commands = broker
            .subscribe(&Topic::try_from(topic)?, SubscribeOptions::new(service)?)
            .await?;
        let participant = participant.clone();
        services.push(tokio::spawn(async move {
            while let Some(Ok(mut delivery)) = commands.next().await {
                let handled = participant
                    .handle(delivery.event(), |_tx, cmd| -> BoxFuture<'_, _> {
                        // A real service changes its own tables through
                        // `_tx`, in the transaction that records the
                        // command and queues the reply.
                        Box::pin(async move { Ok(handle(cmd)) })
                    })
                    .await;
                match handled {
                    Ok(_) => {
                        let _ = delivery.ack().await;
                    }
                    Err(e) => {
                        eprintln!("{service}: {e}; redelivered later");
                        let _ = delivery.nack(Some(Duration::from_millis(200))).await;
                    }
                }
            }
        }));
    }

    // A client starts orders through the HTTP API and waits for each.
    let http = reqwest::Client::new();
    let mut started = Vec::new();
    for n in 0..args.sagas {
        let amount = if n % 3 == 2 {
            1500
        } else {
            100 * (n as u64 + 1)
        };
        let answer: Value = http
            .post(format!("{}/sagas", args.coordinator))
            .json(&json!({ "type": "order", "data": { "sku": "sku-1", "quantity": 1, "amount": amount } }))
            .send()
            .await
            .context("reach saga-coordinator")?
            .error_for_status()?
            .json()
            .await?;
        let id = answer["saga_id"].as_str().context("saga_id")?.to_owned();
        println!("started order saga {id} for {amount}");
        started.push(id);
    }
    let (mut completed, mut compensated) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &started {
        let status = loop {
            let saga: Value = http
                .get(format!("{}/sagas/{id}", args.coordinator))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let status = saga["state"]["status"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if status != "running" && status != "compensating" {
                break status;
            }
            if Instant::now() > deadline {
                bail!("saga {id} did not end: {saga}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let history: Value = http
            .get(format!("{}/sagas/{id}/history", args.coordinator))
            .send()
            .await?
            .json()
            .await?;
        let steps: Vec<&str> = history["history"]
            .as_array()
            .map(|h| h.iter().filter_map(|e| e["note"].as_str()).collect())
            .unwrap_or_default();
        println!("{id}: {status} ({})", steps.join("; "));
        match status.as_str() {
            "completed" => completed += 1,
            "compensated" => compensated += 1,
            _ => {}
        }
    }

    for s in services {
        s.abort();
    }
    relay.shutdown().await?;
    Publisher::close(&*broker).await?;
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "done: {} sagas: {completed} completed, {compensated} compensated",
        started.len()
    );
    Ok(())
}
