//! Publish and consume CloudEvents on the embedded in-memory broker: no
//! server, no set-up.
//!
//! Demonstrates: building typed events with a partition key, a batch publish,
//! and a consumer group of two members sharing the work through
//! [`Consumer`], each settling its deliveries, then a graceful shutdown.
//!
//! Run: `cargo run -p examples --example memory_pubsub`
//! Needs: nothing.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use broker_adapters::prelude::*;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// The data of a `com.example.order.placed` event.
#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    customer: String,
    total_cents: u64,
}

const ORDERS: usize = 12;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let broker = MemoryBroker::new();
    let topic = Topic::from_static("orders");

    // Two members of the `billing` group share the orders between them.
    let handled = Arc::new(AtomicUsize::new(0));
    let shutdown = CancellationToken::new();
    let mut members = Vec::new();
    for member in ["billing-1", "billing-2"] {
        let subscription = broker
            .subscribe(&topic, SubscribeOptions::new("billing")?)
            .await?;
        let handler = {
            let handled = Arc::clone(&handled);
            let shutdown = shutdown.clone();
            tower::service_fn(move |received: Received| {
                let handled = Arc::clone(&handled);
                let shutdown = shutdown.clone();
                async move {
                    let order: OrderPlaced =
                        received.event.data_as().map_err(HandlerError::permanent)?;
                    println!(
                        "{member} billed order {} for {} ({} cents, attempt {})",
                        order.order_id, order.customer, order.total_cents, received.info.attempt
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if handled.fetch_add(1, Ordering::SeqCst) + 1 == ORDERS {
                        shutdown.cancel();
                    }
                    Ok::<(), HandlerError>(())
                }
            })
        };
        let consumer = Consumer::new(subscription, handler)
            .concurrency(NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN));
        members.push(tokio::spawn(consumer.run(shutdown.clone())));
    }

    // Events for one customer share a partition key, so they stay in order.
    let events = (1..=ORDERS)
        .map(|n| {
            let customer = format!("customer-{}", n % 3);
            CloudEventBuilder::new("com.example.order.placed", "/examples/shop")
                .subject(format!("order-{n}"))
                .partition_key(customer.clone())
                .json_data(&OrderPlaced {
                    order_id: format!("order-{n}"),
                    customer,
                    total_cents: 1000 + n as u64,
                })
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    broker.publish_batch(&topic, events).await?;
    println!("published {ORDERS} events to `{topic}`");

    let mut acked = 0;
    for member in members {
        acked += member.await??.acked;
    }
    println!("done: {acked} of {ORDERS} events handled and acked");
    anyhow::ensure!(
        acked == ORDERS as u64,
        "expected every event to be acked once"
    );
    Ok(())
}
