//! End to end: the recommended stack around a handler, run by a `Consumer`
//! over a `MemoryBroker`.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cloudevents::{AttributesReader, Event};
use futures_util::StreamExt;
use metrics_util::debugging::DebuggingRecorder;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceBuilder};

use super::dead_letter::DeadLetterInfo;
use super::*;
use crate::event::{CloudEventBuilder, EventExt};
use crate::memory::MemoryBroker;
use crate::metrics::tests::{counter, runtime, seen};
use crate::metrics::{ACKED, DEAD_LETTERED, DELIVERED, NACKED};
use crate::publisher::Publisher;
use crate::router::{Consumer, ConsumerReport, HandlerError};
use crate::subscriber::{Received, SubscribeOptions, Subscriber, Subscription};
use crate::topic::Topic;

const MS: Duration = Duration::from_millis(1);
const WAIT: Duration = Duration::from_secs(5);
/// Deliveries before a retryable failure is dead-lettered.
const MAX_DELIVERIES: u32 = 3;
/// The deadline of all in-handler attempts together.
const DEADLINE: Duration = Duration::from_millis(200);

struct Setup {
    broker: MemoryBroker,
    orders: Topic,
    dlq: Topic,
    subscription: Subscription,
    dead_letters: Subscription,
}

async fn setup() -> Setup {
    let broker = MemoryBroker::new();
    let orders = Topic::from_static("orders");
    let dlq = Topic::from_static("orders.dlq");
    let subscription = broker
        .subscribe(&orders, SubscribeOptions::new("billing").expect("valid"))
        .await
        .expect("subscribed");
    let dead_letters = broker
        .subscribe(&dlq, SubscribeOptions::new("ops").expect("valid"))
        .await
        .expect("subscribed");
    Setup {
        broker,
        orders,
        dlq,
        subscription,
        dead_letters,
    }
}

fn stack<H>(
    broker: &MemoryBroker,
    dlq: &Topic,
    handler: H,
) -> Trace<Metrics<DeadLetter<Timeout<Retry<H>>>>>
where
    H: Service<Received, Response = (), Error = HandlerError> + Clone + Send + 'static,
    H::Future: Send,
{
    let policy = RetryPolicy::new(3, MS, 5 * MS).expect("valid");
    ServiceBuilder::new()
        .layer(TraceLayer::new("memory"))
        .layer(MetricsLayer::new("memory"))
        .layer(DeadLetterLayer::new(
            Arc::new(broker.clone()),
            dlq.clone(),
            NonZeroU32::new(MAX_DELIVERIES).expect("positive"),
        ))
        .layer(TimeoutLayer::new(DEADLINE))
        .layer(RetryLayer::new(policy))
        .service(handler)
}

/// Runs `handler` in the stack until `check` returns, then shuts down and
/// returns the consumer's report and what `check` returned.
async fn run<H, F, T>(subscription: Subscription, service: H, check: F) -> (ConsumerReport, T)
where
    H: Service<Received, Response = (), Error = HandlerError> + Clone + Send + 'static,
    H::Future: Send,
    F: Future<Output = T>,
{
    let shutdown = CancellationToken::new();
    let consumer = Consumer::new(subscription, service)
        .retry_delay(5 * MS)
        .run(shutdown.clone());
    let check = async {
        let out = check.await;
        shutdown.cancel();
        out
    };
    let (report, out) = tokio::join!(consumer, check);
    (report.expect("the consumer stops cleanly"), out)
}

async fn next_dead_letter(dead_letters: &mut Subscription) -> Event {
    let mut delivery = timeout(WAIT, dead_letters.next())
        .await
        .expect("a dead letter in time")
        .expect("open")
        .expect("delivery");
    delivery.ack().await.expect("acked");
    delivery.event().clone()
}

async fn assert_no_dead_letter(dead_letters: &mut Subscription) {
    if let Ok(Some(delivery)) = timeout(50 * MS, dead_letters.next()).await {
        let event = delivery.expect("delivery").event().clone();
        panic!("unexpected dead letter: {event}");
    }
}

fn order(subject: &str, n: i64) -> Event {
    CloudEventBuilder::new("com.example.order.placed", "/orders")
        .subject(subject)
        .json_data(&serde_json::json!({ "n": n }))
        .build()
        .expect("valid")
}

#[test]
fn a_permanent_failure_is_dead_lettered_with_the_original_and_the_reason() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    ::metrics::with_local_recorder(&recorder, || {
        runtime().block_on(async {
            let Setup {
                broker,
                orders,
                dlq,
                subscription,
                mut dead_letters,
            } = setup().await;
            let handled = Arc::new(Mutex::new(Vec::<String>::new()));
            let seen_by_handler = Arc::clone(&handled);
            let handler = tower::service_fn(move |received: Received| {
                let handled = Arc::clone(&seen_by_handler);
                async move {
                    let subject = received.event.subject().unwrap_or_default().to_owned();
                    handled
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(subject.clone());
                    if subject == "poison" {
                        Err(HandlerError::permanent("order 2 has no lines"))
                    } else {
                        Ok(())
                    }
                }
            });
            let poison = order("poison", 2);
            let good = order("good", 1);
            broker
                .publish(&orders, poison.clone())
                .await
                .expect("published");
            broker.publish(&orders, good).await.expect("published");

            let service = stack(&broker, &dlq, handler);
            let (report, dead) = run(subscription, service, async {
                let dead = next_dead_letter(&mut dead_letters).await;
                while handled.lock().unwrap_or_else(PoisonError::into_inner).len() < 2 {
                    tokio::time::sleep(MS).await;
                }
                dead
            })
            .await;

            assert_eq!(dead.id(), poison.id(), "the original id");
            assert_eq!(dead.data(), poison.data(), "the original data");
            assert_eq!(dead.ty(), poison.ty());
            assert_eq!(dead.source(), poison.source());
            assert_eq!(dead.subject(), Some("poison"));
            assert!(dead.traceparent().is_none(), "nothing invented");
            let info = DeadLetterInfo::from_event(&dead)
                .expect("well-formed")
                .expect("dead-lettered");
            assert!(
                info.reason.contains("order 2 has no lines"),
                "{}",
                info.reason
            );
            assert_eq!(info.topic, orders);
            assert_eq!(info.group.as_str(), "billing");
            assert_eq!(info.attempts.get(), 1, "permanent: not redelivered first");

            assert_eq!(
                report.acked, 2,
                "both settled: one handled, one dead-lettered"
            );
            assert_eq!((report.nacked, report.terminated), (0, 0));
            assert_eq!(
                *handled.lock().unwrap_or_else(PoisonError::into_inner),
                ["poison", "good"],
                "a permanent failure is not retried"
            );
            assert_no_dead_letter(&mut dead_letters).await;
        });
    });
    let seen = seen(&snapshotter);
    let labels = ["system=memory", "topic=orders"];
    assert_eq!(counter(&seen, DELIVERED, &labels), 2);
    assert_eq!(counter(&seen, ACKED, &labels), 2);
    assert_eq!(counter(&seen, NACKED, &labels), 0);
    assert_eq!(
        counter(&seen, DEAD_LETTERED, &["topic=orders", "outcome=ok"]),
        1
    );
}

#[tokio::test]
async fn a_transient_failure_is_retried_in_the_handler_and_acked() {
    let Setup {
        broker,
        orders,
        dlq,
        subscription,
        mut dead_letters,
    } = setup().await;
    let calls = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&calls);
    let handler = tower::service_fn(move |_: Received| {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n <= 2 {
                Err(HandlerError::retryable(format!("blip {n}")))
            } else {
                Ok(())
            }
        }
    });
    broker
        .publish(&orders, order("flaky", 1))
        .await
        .expect("published");
    let service = stack(&broker, &dlq, handler);
    let (report, ()) = run(subscription, service, async {
        while calls.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(MS).await;
        }
    })
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "two failures, then success"
    );
    assert_eq!(report.acked, 1);
    assert_eq!(report.nacked, 0, "retried within the delivery");
    assert_no_dead_letter(&mut dead_letters).await;
}

#[tokio::test]
async fn a_hanging_handler_times_out_and_is_dead_lettered_after_max_deliveries() {
    let Setup {
        broker,
        orders,
        dlq,
        subscription,
        mut dead_letters,
    } = setup().await;
    let calls = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&calls);
    let handler = tower::service_fn(move |_: Received| {
        counted.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<Result<(), HandlerError>>()
    });
    let stuck = order("stuck", 3);
    broker
        .publish(&orders, stuck.clone())
        .await
        .expect("published");
    let service = stack(&broker, &dlq, handler);
    let (report, dead) = run(subscription, service, next_dead_letter(&mut dead_letters)).await;

    assert_eq!(dead.id(), stuck.id());
    let info = DeadLetterInfo::from_event(&dead)
        .expect("well-formed")
        .expect("dead-lettered");
    assert!(info.reason.contains("timed out"), "{}", info.reason);
    assert_eq!(info.attempts.get(), MAX_DELIVERIES);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        MAX_DELIVERIES,
        "one call per delivery: the hang is cut by the deadline, not retried"
    );
    assert_eq!(report.nacked, u64::from(MAX_DELIVERIES - 1), "redelivered");
    assert_eq!(report.acked, 1, "then dead-lettered and acked");
    assert_no_dead_letter(&mut dead_letters).await;
}
