//! Validation middleware: invalid data is refused on publish (nothing
//! sent) and dead-lettered on consume; valid data carries `dataschema`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use broker_adapters::ErrorKind;
use broker_adapters::middleware::DeadLetterLayer;
use broker_adapters::middleware::dead_letter::DeadLetterInfo;
use broker_adapters::middleware::validation::{ValidateLayer, ValidatingPublisher};
use broker_adapters::prelude::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

const TYPE: &str = "com.example.order.placed";
const CONTRACT: &str = r#"{"type": "object", "properties": {"total": {"type": "number", "minimum": 0}}, "required": ["total"]}"#;

fn setup(e: schemas::Error) -> broker_adapters::Error {
    broker_adapters::Error::new(ErrorKind::Config {
        key: "registry".into(),
        reason: e.to_string(),
    })
}

#[tokio::test]
async fn publish_refuses_invalid_data() -> broker_adapters::Result<()> {
    let registry = schemas::Registry::in_memory();
    registry.register(TYPE, CONTRACT).await.map_err(setup)?;
    let broker = MemoryBroker::new();
    let orders = Topic::from_static("orders");
    let mut sub = broker
        .subscribe(&orders, SubscribeOptions::new("g")?)
        .await?;
    let publisher = ValidatingPublisher::new(broker.clone(), Arc::new(registry));

    let error = publisher
        .publish_json(&orders, TYPE, "/shop", &json!({"total": -1}))
        .await
        .expect_err("invalid");
    assert!(matches!(error.kind(), ErrorKind::InvalidEvent { .. }));
    assert!(error.to_string().contains("/total"), "{error}");
    assert!(!error.is_retryable());
    let error = publisher
        .publish_json(&orders, "com.example.unknown", "/shop", &json!({}))
        .await
        .expect_err("no contract");
    assert!(
        matches!(
            error.kind(),
            ErrorKind::SchemaRegistry {
                retryable: false,
                ..
            }
        ),
        "{error:?}"
    );
    // A batch is all or nothing.
    let good = CloudEventBuilder::new(TYPE, "/shop")
        .json_data(&json!({"total": 1}))
        .build()?;
    let bad = CloudEventBuilder::new(TYPE, "/shop")
        .json_data(&json!({}))
        .build()?;
    assert!(
        publisher
            .publish_batch(&orders, vec![good.clone(), bad])
            .await
            .is_err()
    );

    publisher.publish(&orders, good.clone()).await?;
    let delivery = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("delivered")
        .expect("open")?;
    // Nothing invalid was sent: the first event on the topic is the good one.
    assert_eq!(delivery.event().id(), good.id());
    assert_eq!(
        delivery
            .event()
            .dataschema()
            .map(ToString::to_string)
            .as_deref(),
        Some("http://127.0.0.1:8081/schemas/ids/1")
    );
    Ok(())
}

#[tokio::test]
async fn consume_dead_letters_invalid_data() -> broker_adapters::Result<()> {
    let registry = schemas::Registry::in_memory();
    registry.register(TYPE, CONTRACT).await.map_err(setup)?;
    let broker = MemoryBroker::new();
    let orders = Topic::from_static("orders");
    let dlq = Topic::from_static("orders.dlq");
    let subscription = broker
        .subscribe(&orders, SubscribeOptions::new("billing")?)
        .await?;
    let mut dead_letters = broker
        .subscribe(&dlq, SubscribeOptions::new("ops")?)
        .await?;
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&handled);
    let handler = tower::service_fn(move |received: Received| {
        let seen = Arc::clone(&seen);
        async move {
            seen.lock()
                .map_err(|_| HandlerError::permanent("poisoned"))?
                .push(received.event.id().to_owned());
            Ok::<(), HandlerError>(())
        }
    });
    let stack = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(
            Arc::new(broker.clone()),
            dlq.clone(),
            NonZeroU32::MIN,
        ))
        .layer(ValidateLayer::new(Arc::new(registry)))
        .service(handler);
    // Published without validation, as a producer without the middleware would.
    let bad = broker
        .publish_json(&orders, TYPE, "/shop", &json!({"total": "lots"}))
        .await?;
    let good = broker
        .publish_json(&orders, TYPE, "/shop", &json!({"total": 3}))
        .await?;
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(Consumer::new(subscription, stack).run(shutdown.clone()));

    let mut dead = tokio::time::timeout(Duration::from_secs(5), dead_letters.next())
        .await
        .expect("dead-lettered")
        .expect("open")?;
    assert_eq!(dead.event().id(), bad);
    let info = DeadLetterInfo::from_event(dead.event())?.expect("dead-letter info");
    assert!(
        info.reason.contains("does not match its schema") && info.reason.contains("/total"),
        "{}",
        info.reason
    );
    dead.ack().await?;
    for _ in 0..100 {
        if handled.lock().map(|h| h.len()).unwrap_or(0) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let report = consumer.await.expect("no panic")?;
    assert_eq!(*handled.lock().expect("lock"), vec![good]);
    assert_eq!(report.acked, 2);
    Ok(())
}

/// The same middleware on a remote registry, through the HTTP client and its
/// cache: the consumer checks each event against the schema its
/// `dataschema` names, even after the subject has moved on.
#[tokio::test]
async fn remote_registry_through_the_client() -> broker_adapters::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| {
            broker_adapters::Error::with_source(ErrorKind::Closed { what: "listener" }, e)
        })?;
    let base = format!(
        "http://{}",
        listener
            .local_addr()
            .map_err(|e| broker_adapters::Error::with_source(
                ErrorKind::Closed { what: "listener" },
                e
            ))?
    );
    let registry = schemas::Registry::with_options(schemas::RegistryOptions {
        base_url: base.clone(),
        ..schemas::RegistryOptions::default()
    });
    let app = schemas::server::router(registry, schemas::server::ServerOptions::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(schemas::server::serve(listener, app, async move {
        let _ = stopped.await;
    }));
    let client = schemas::RegistryClient::new(&base).with_latest_ttl(Duration::ZERO);
    let contract: serde_json::Value = serde_json::from_str(CONTRACT)
        .map_err(|e| broker_adapters::Error::with_source(ErrorKind::Encode, e))?;
    let v1 = client.register(TYPE, &contract).await.map_err(setup)?;

    let broker = MemoryBroker::new();
    let orders = Topic::from_static("orders");
    let mut sub = broker
        .subscribe(&orders, SubscribeOptions::new("g")?)
        .await?;
    let source: Arc<dyn schemas::SchemaSource> = Arc::new(client.clone());
    let publisher = ValidatingPublisher::new(broker.clone(), Arc::clone(&source));
    publisher
        .publish_json(&orders, TYPE, "/shop", &json!({"total": 2}))
        .await?;
    let error = publisher
        .publish_json(&orders, TYPE, "/shop", &json!({"total": "two"}))
        .await
        .expect_err("invalid");
    assert!(matches!(error.kind(), ErrorKind::InvalidEvent { .. }));

    // v2 (compatible) makes the note a required-free string field; an
    // event written under v1 is still checked against v1.
    let mut v2_doc = contract.clone();
    v2_doc["properties"]["note"] = json!({"type": "string"});
    let v2 = client.register(TYPE, &v2_doc).await.map_err(setup)?;
    assert_ne!(v1, v2);
    let delivery = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("delivered")
        .expect("open")?;
    assert_eq!(
        delivery.event().dataschema().map(ToString::to_string),
        Some(format!("{base}/schemas/ids/{v1}"))
    );
    let schema = source.by_id(v1).await.map_err(setup)?;
    broker_adapters::middleware::validation::validate_event(delivery.event(), &schema)?;
    // Publishing now stamps v2.
    publisher
        .publish_json(&orders, TYPE, "/shop", &json!({"total": 3, "note": "gift"}))
        .await?;
    let delivery = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("delivered")
        .expect("open")?;
    assert_eq!(
        delivery.event().dataschema().map(ToString::to_string),
        Some(format!("{base}/schemas/ids/{v2}"))
    );
    let _ = stop.send(());
    let _ = server.await;
    Ok(())
}
