//! The in-process broker beside a tokio channel.

use std::time::Instant;

use anyhow::Context as _;
use broker_adapters::prelude::*;
use futures_util::StreamExt;

use crate::{Figure, best};

pub(crate) async fn run(events: usize, size: usize, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    let mut ours = Vec::new();
    let mut baseline = Vec::new();
    for round in 0..rounds {
        let batch: Vec<Event> = (0..events)
            .map(|i| {
                CloudEventBuilder::new("com.example.order.placed", "/bench")
                    .partition_key(crate::key(i))
                    .json_data(&crate::payload(size))
                    .build()
            })
            .collect::<Result<_, _>>()?;

        let broker = MemoryBroker::new();
        let topic = Topic::try_from(format!("bench-memory-{round}"))?;
        let mut sub = broker
            .subscribe(&topic, SubscribeOptions::new("bench")?)
            .await?;
        let start = Instant::now();
        broker.publish_batch(&topic, batch.clone()).await?;
        for _ in 0..events {
            let mut d = sub.next().await.context("subscription ended")??;
            d.ack().await?;
        }
        ours.push(start.elapsed());

        // Baseline: an unbounded tokio channel carrying the same events.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let start = Instant::now();
        for event in batch {
            tx.send(event)?;
        }
        for _ in 0..events {
            std::hint::black_box(rx.recv().await.context("channel closed")?);
        }
        baseline.push(start.elapsed());
    }
    Ok(vec![Figure::rate(
        "memory.publish_consume",
        events,
        best(ours),
        best(baseline),
    )])
}
