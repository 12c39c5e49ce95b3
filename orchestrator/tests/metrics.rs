//! The relay's and inbox's metrics, on SQLite in memory with the in-memory
//! broker.

use std::sync::Arc;
use std::time::Duration;

use broker_adapters::prelude::*;
use futures_util::future::BoxFuture;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use orchestrator::{BoxError, Inbox, Outbox, OutboxConfig, Processed, RelayConfig, sqlite};

fn effect(_tx: &mut sqlx::SqliteConnection) -> BoxFuture<'_, Result<(), BoxError>> {
    Box::pin(async { Ok(()) })
}

#[test]
fn relay_and_inbox_report_their_work() -> Result<(), Box<dyn std::error::Error>> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let pool = sqlite::connect("sqlite::memory:").await?;
                sqlite::migrate(&pool).await?;
                let outbox = Outbox::sqlite(pool.clone(), OutboxConfig::new()).await?;
                let broker = Arc::new(MemoryBroker::new());
                let topic = Topic::from_static("orders");
                let mut tx = pool.begin().await?;
                let mut events = Vec::new();
                for n in 0..3 {
                    let event = CloudEventBuilder::new("t.metrics", "/test")
                        .partition_key("k")
                        .json_data(&n)
                        .build()?;
                    outbox.enqueue(&mut tx, &topic, &event).await?;
                    events.push(event);
                }
                tx.commit().await?;
                let relay = outbox
                    .relay(
                        broker.clone(),
                        RelayConfig::new().poll_interval(Duration::from_millis(20)),
                    )?
                    .spawn();
                while outbox.pending().await? > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let report = relay.shutdown().await?;
                assert_eq!(report.published, 3);

                let inbox = Inbox::sqlite(pool.clone());
                assert_eq!(
                    inbox.process("billing", &events[0], effect).await?,
                    Processed::Handled(())
                );
                assert!(
                    inbox
                        .process("billing", &events[0], effect)
                        .await?
                        .is_duplicate()
                );
                Ok::<_, Box<dyn std::error::Error>>(())
            })
    })?;

    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str| -> u64 {
        snapshot
            .iter()
            .filter(|(key, ..)| key.key().name() == name)
            .map(|(.., value)| match value {
                DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(counter("outbox_enqueued_total"), 3);
    assert_eq!(counter("outbox_published_total"), 3);
    assert!(counter("outbox_batches_total") >= 1);
    assert_eq!(counter("inbox_handled_total"), 1);
    assert_eq!(counter("inbox_duplicates_total"), 1);
    let lag = snapshot
        .iter()
        .any(|(key, ..)| key.key().name() == "outbox_relay_lag_seconds");
    assert!(lag, "the relay records its lag");
    Ok(())
}
