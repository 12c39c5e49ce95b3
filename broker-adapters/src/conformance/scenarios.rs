//! The scenarios. Each takes a [`Target`], uses a fresh topic and fresh
//! consumer groups, and panics with a message saying what broke the contract.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, AttributesWriter, Event};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

use super::Target;
use crate::error::ErrorKind;
use crate::event::{CloudEventBuilder, EventExt};
use crate::publisher::{Publisher, PublisherExt};
use crate::router::{Consumer, HandlerError};
use crate::subscriber::{AckKind, Delivery, Received, Settlement, Subscription};
use crate::topic::Topic;

const SOURCE: &str = "/conformance";
const TYPE: &str = "dev.backbone.conformance";

fn unique(prefix: &str) -> String {
    let id = Uuid::now_v7().simple().to_string();
    // The tail of a v7 id is random; the head is the clock.
    format!("{prefix}-{}", &id[id.len() - 12..])
}

async fn topic(target: &dyn Target, scenario: &str) -> Topic {
    let name = unique(&format!("conformance-{scenario}"));
    target
        .topic(&name)
        .await
        .unwrap_or_else(|e| panic!("the target could not create topic {name}: {e}"))
}

async fn subscribe(target: &dyn Target, topic: &Topic, group: &str) -> Subscription {
    subscribe_with(target, topic, group, Duration::from_secs(30)).await
}

async fn subscribe_with(
    target: &dyn Target,
    topic: &Topic,
    group: &str,
    ack_wait: Duration,
) -> Subscription {
    let options = target
        .subscribe_options(group)
        .expect("valid group name")
        .ack_wait(ack_wait);
    let subscriber = target.subscriber().await.expect("subscriber connects");
    subscriber
        .subscribe(topic, options)
        .await
        .unwrap_or_else(|e| panic!("could not subscribe to {topic}: {e}"))
}

async fn publisher(target: &dyn Target) -> Arc<dyn Publisher> {
    target.publisher().await.expect("publisher connects")
}

async fn recv(target: &dyn Target, sub: &mut Subscription, what: &str) -> Delivery {
    let wait = target.capabilities().receive_timeout;
    match timeout(wait, sub.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("subscription failed while waiting for {what}: {e}"),
        Ok(None) => panic!("subscription ended while waiting for {what}"),
        Err(_) => panic!("{what} was not delivered within {wait:?}"),
    }
}

async fn ack(delivery: &mut Delivery) {
    let settled = delivery.ack().await.expect("ack is recorded");
    assert_eq!(settled, Settlement::Settled);
}

fn keyed(key: &str, n: usize) -> Event {
    CloudEventBuilder::new(TYPE, SOURCE)
        .subject(n.to_string())
        .partition_key(key)
        .json_data(&n)
        .build()
        .expect("valid event")
}

fn seq(delivery: &Delivery) -> usize {
    delivery.event().data_as().expect("a sequence number")
}

fn ext_text(value: &ExtensionValue) -> String {
    value.to_string()
}

fn normalized_data(event: &Event) -> Option<serde_json::Value> {
    event.data_as::<serde_json::Value>().ok()
}

/// Every context attribute and every extension the system uses survives the
/// trip: id, source, type, specversion, time, subject, dataschema,
/// datacontenttype, data, and string, integer and boolean extensions.
pub async fn round_trip_every_attribute(target: &dyn Target) {
    let topic = topic(target, "attrs").await;
    let mut sub = subscribe(target, &topic, &unique("g")).await;
    let time: DateTime<Utc> = Utc::now().trunc_subsecs(6);
    let schema = Url::parse("http://127.0.0.1:8081/schemas/ids/7").expect("url");
    let sent = CloudEventBuilder::new("com.example.order.placed", "/orders/service-a")
        .subject("order-42")
        .time(time)
        .dataschema(schema)
        .partition_key("order-42")
        .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .tracestate("rojo=00f067aa0ba902b7")
        .saga("saga-1", "reserve-stock", 3)
        .correlation_id("corr-1")
        .causation_id("cause-1")
        .extension("customflag", true)
        .extension("customint", 42_i64)
        .extension("customtext", "héllo wörld")
        .json_data(&serde_json::json!({"order": "42", "lines": [1, 2, 3], "note": "ünïcode"}))
        .build()
        .expect("valid event");
    publisher(target)
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("published");
    let mut got = recv(target, &mut sub, "the event").await;
    let received = got.event().clone();
    ack(&mut got).await;

    assert_eq!(received.id(), sent.id(), "id");
    assert_eq!(received.source(), sent.source(), "source");
    assert_eq!(received.ty(), sent.ty(), "type");
    assert_eq!(received.specversion(), sent.specversion(), "specversion");
    assert_eq!(received.time(), sent.time(), "time");
    assert_eq!(received.subject(), sent.subject(), "subject");
    assert_eq!(received.dataschema(), sent.dataschema(), "dataschema");
    assert_eq!(
        received.datacontenttype(),
        sent.datacontenttype(),
        "datacontenttype"
    );
    assert_eq!(normalized_data(&received), normalized_data(&sent), "data");
    let sent_ext: BTreeMap<&str, String> = sent
        .iter_extensions()
        .map(|(k, v)| (k, ext_text(v)))
        .collect();
    let got_ext: BTreeMap<&str, String> = received
        .iter_extensions()
        .map(|(k, v)| (k, ext_text(v)))
        .collect();
    assert_eq!(got_ext, sent_ext, "extensions");
    assert_eq!(received.saga_attempt().expect("typed"), Some(3));
}

/// Opaque bytes, including invalid UTF-8, arrive byte for byte with their
/// content type.
pub async fn round_trip_binary_data(target: &dyn Target) {
    let topic = topic(target, "binary").await;
    let mut sub = subscribe(target, &topic, &unique("g")).await;
    let bytes: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, 0x00, 0xc3]).collect();
    let sent = CloudEventBuilder::new(TYPE, SOURCE)
        .binary_data("application/octet-stream", bytes.clone())
        .build()
        .expect("valid");
    publisher(target)
        .await
        .publish(&topic, sent)
        .await
        .expect("published");
    let mut got = recv(target, &mut sub, "the binary event").await;
    assert_eq!(
        got.event().datacontenttype(),
        Some("application/octet-stream")
    );
    assert_eq!(got.event().data_bytes().as_deref(), Some(bytes.as_slice()));
    ack(&mut got).await;
}

/// An event without data arrives without data.
pub async fn round_trip_without_data(target: &dyn Target) {
    let topic = topic(target, "nodata").await;
    let mut sub = subscribe(target, &topic, &unique("g")).await;
    let sent = CloudEventBuilder::new(TYPE, SOURCE)
        .subject("empty")
        .build()
        .expect("valid");
    publisher(target)
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("published");
    let mut got = recv(target, &mut sub, "the event without data").await;
    assert_eq!(got.event().id(), sent.id());
    assert!(
        got.event().data_bytes().is_none_or(|d| d.is_empty()),
        "no data was sent, got {:?}",
        got.event().data()
    );
    ack(&mut got).await;
}

/// `T: Serialize` in, the same `T` out.
pub async fn round_trip_typed_data(target: &dyn Target) {
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Shipment {
        id: u64,
        address: String,
        items: Vec<String>,
        express: bool,
    }
    let topic = topic(target, "typed").await;
    let mut sub = subscribe(target, &topic, &unique("g")).await;
    let sent = Shipment {
        id: u64::MAX,
        address: "1 Main St, Zürich".into(),
        items: vec!["a".into(), "b".into()],
        express: true,
    };
    let id = publisher(target)
        .await
        .publish_json(&topic, "com.example.shipment", SOURCE, &sent)
        .await
        .expect("published");
    let mut got = recv(target, &mut sub, "the typed event").await;
    assert_eq!(got.event().id(), id);
    assert_eq!(got.event().data_as::<Shipment>().expect("decodes"), sent);
    ack(&mut got).await;
}

/// Events with the same partition key are handled in publish order, keys
/// interleaved, even by a consumer running eight handlers at once with
/// uneven handling times.
pub async fn order_per_key(target: &dyn Target) {
    let topic = topic(target, "order").await;
    let keys = ["k0", "k1", "k2", "k3"];
    let per_key = 25;
    let total = keys.len() * per_key;
    let events = (0..per_key)
        .flat_map(|n| keys.iter().map(move |k| keyed(k, n)))
        .collect();
    publisher(target)
        .await
        .publish_batch(&topic, events)
        .await
        .expect("published");
    let handled = Arc::new(Mutex::new(Vec::<(String, usize)>::new()));
    let shutdown = CancellationToken::new();
    let service = {
        let handled = Arc::clone(&handled);
        let shutdown = shutdown.clone();
        tower::service_fn(move |r: Received| {
            let handled = Arc::clone(&handled);
            let shutdown = shutdown.clone();
            async move {
                let n: usize = r.event.data_as()?;
                let key = r.event.partition_key().unwrap_or_default().to_owned();
                // Uneven work: a later event of a key could overtake an earlier one.
                let ms = [9, 1, 5, 0, 3][n % 5];
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let mut handled = handled.lock().unwrap_or_else(PoisonError::into_inner);
                handled.push((key, n));
                if handled.len() >= total {
                    shutdown.cancel();
                }
                Ok::<(), HandlerError>(())
            }
        })
    };
    let sub = subscribe(target, &topic, &unique("g")).await;
    let eight = NonZeroUsize::new(8).unwrap_or(NonZeroUsize::MIN);
    let wait = target.capabilities().receive_timeout * 3;
    timeout(
        wait,
        Consumer::new(sub, service).concurrency(eight).run(shutdown),
    )
    .await
    .expect("all events handled in time")
    .expect("consumer ran");
    let handled = handled
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(handled.len(), total);
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (key, n) in &handled {
        match last.insert(key.as_str(), *n) {
            Some(prev) => assert_eq!(*n, prev + 1, "key {key}: {n} handled after {prev}"),
            None => assert_eq!(*n, 0, "key {key} started at {n}"),
        }
    }
}

/// A nacked event is delivered again before any later event of its key.
pub async fn order_per_key_survives_nack(target: &dyn Target) {
    let topic = topic(target, "ordernack").await;
    let mut sub = subscribe(target, &topic, &unique("g")).await;
    let events = (0..3).map(|n| keyed("only", n)).collect();
    publisher(target)
        .await
        .publish_batch(&topic, events)
        .await
        .expect("published");
    let mut first = recv(target, &mut sub, "event 0").await;
    assert_eq!(seq(&first), 0);
    // While event 0 waits out its delay, events 1 and 2 must wait too.
    first
        .nack(Some(Duration::from_millis(300)))
        .await
        .expect("nack recorded");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let mut d = recv(target, &mut sub, "the keyed events after the nack").await;
        seen.push(seq(&d));
        ack(&mut d).await;
    }
    assert_eq!(seen, vec![0, 1, 2], "order after a nack");
}

/// Two members of one group share the events: each event reaches one of
/// them, and both get some.
pub async fn consumer_group_shares_work(target: &dyn Target) {
    let topic = topic(target, "share").await;
    let group = unique("g");
    let a = subscribe(target, &topic, &group).await;
    let b = subscribe(target, &topic, &group).await;
    // More than one member's prefetch (JetStream pulls up to 64 at a time),
    // so a member that asks first cannot take the whole batch.
    let total = 256;
    let events = (0..total).map(|n| keyed(&format!("key-{n}"), n)).collect();
    publisher(target)
        .await
        .publish_batch(&topic, events)
        .await
        .expect("published");

    let seen = Arc::new(Mutex::new(Vec::<(char, usize)>::new()));
    let done = CancellationToken::new();
    let drain = |name: char, mut sub: Subscription| {
        let seen = Arc::clone(&seen);
        let done = done.clone();
        let wait = target.capabilities().receive_timeout;
        async move {
            let deadline = Instant::now() + wait * 2;
            loop {
                tokio::select! {
                    () = done.cancelled() => break,
                    () = tokio::time::sleep_until(deadline) => break,
                    next = sub.next() => {
                        let Some(Ok(mut d)) = next else { break };
                        // Hold each event briefly so both members take part.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        let n = seq(&d);
                        ack(&mut d).await;
                        let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                        seen.push((name, n));
                        if seen.len() >= total {
                            done.cancel();
                        }
                    }
                }
            }
            sub
        }
    };
    let (a, b) = tokio::join!(drain('a', a), drain('b', b));
    drop((a, b));
    let seen = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let ids: HashSet<usize> = seen.iter().map(|(_, n)| *n).collect();
    assert_eq!(ids.len(), total, "every event delivered: {seen:?}");
    assert_eq!(seen.len(), total, "no event delivered twice");
    for member in ['a', 'b'] {
        assert!(
            seen.iter().any(|(m, _)| *m == member),
            "member {member} got no events: the group did not share the work"
        );
    }
}

/// Different groups each get every event.
pub async fn every_group_gets_every_event(target: &dyn Target) {
    let topic = topic(target, "fanout").await;
    let mut a = subscribe(target, &topic, &unique("ga")).await;
    let mut b = subscribe(target, &topic, &unique("gb")).await;
    let events = (0..10).map(|n| keyed("k", n)).collect();
    publisher(target)
        .await
        .publish_batch(&topic, events)
        .await
        .expect("published");
    for sub in [&mut a, &mut b] {
        let mut got = Vec::new();
        for _ in 0..10 {
            let mut d = recv(target, sub, "each group's copy").await;
            got.push(seq(&d));
            ack(&mut d).await;
        }
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }
}

/// A nack with a delay brings the event back, no sooner than the delay, as
/// a later attempt.
pub async fn redelivery_after_nack_with_delay(target: &dyn Target) {
    let topic = topic(target, "nack").await;
    let mut sub = subscribe(target, &topic, &unique("g")).await;
    let sent = keyed("k", 1);
    publisher(target)
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("published");
    let mut first = recv(target, &mut sub, "the event").await;
    assert_eq!(first.info().attempt.get(), 1, "first attempt");
    let delay = Duration::from_millis(400);
    let nacked_at = Instant::now();
    first.nack(Some(delay)).await.expect("nack recorded");
    let mut again = recv(target, &mut sub, "the nacked event").await;
    let waited = nacked_at.elapsed();
    assert_eq!(again.event().id(), sent.id());
    assert!(
        waited + Duration::from_millis(50) >= delay,
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
    assert!(again.info().attempt.get() >= 2, "the attempt count grows");
    ack(&mut again).await;
}

/// Deliveries a consumer held when it crashed (its subscriptions and
/// connection dropped unsettled) go to the group's next member.
pub async fn redelivery_after_crashed_consumer(target: &dyn Target) {
    let topic = topic(target, "crash").await;
    let group = unique("g");
    let events: Vec<Event> = (0..3).map(|n| keyed("k", n)).collect();
    let ids: Vec<String> = events.iter().map(|e| e.id().to_owned()).collect();
    {
        let mut doomed = subscribe(target, &topic, &group).await;
        publisher(target)
            .await
            .publish_batch(&topic, events)
            .await
            .expect("published");
        let held = recv(target, &mut doomed, "the event the crashing consumer holds").await;
        assert_eq!(held.event().id(), ids[0]);
        // Crash: everything dropped without settling.
        drop(held);
        drop(doomed);
    }
    let mut survivor = subscribe(target, &topic, &group).await;
    let mut got = Vec::new();
    while got.len() < ids.len() {
        let mut d = recv(target, &mut survivor, "the crashed consumer's events").await;
        got.push(d.event().id().to_owned());
        ack(&mut d).await;
    }
    assert_eq!(got, ids, "all events, in order, after the crash");
}

/// Only successfully handled events are acked: a consumer that fails on an
/// event does not lose it.
pub async fn ack_only_after_success(target: &dyn Target) {
    let topic = topic(target, "success").await;
    let group = unique("g");
    let events: Vec<Event> = (0..6).map(|n| keyed(&format!("k{}", n % 2), n)).collect();
    publisher(target)
        .await
        .publish_batch(&topic, events)
        .await
        .expect("published");
    let handled = Arc::new(Mutex::new(Vec::<usize>::new()));
    let failed_once = Arc::new(Mutex::new(HashSet::<usize>::new()));
    let shutdown = CancellationToken::new();
    let service = {
        let handled = Arc::clone(&handled);
        let shutdown = shutdown.clone();
        tower::service_fn(move |r: Received| {
            let handled = Arc::clone(&handled);
            let failed_once = Arc::clone(&failed_once);
            let shutdown = shutdown.clone();
            async move {
                let n: usize = r.event.data_as()?;
                // Odd events fail on their first attempt.
                let first_try = failed_once
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(n);
                if n % 2 == 1 && first_try {
                    return Err(HandlerError::retry_after(
                        std::io::Error::other("transient"),
                        Duration::from_millis(50),
                    ));
                }
                let mut handled = handled.lock().unwrap_or_else(PoisonError::into_inner);
                handled.push(n);
                if handled.len() == 6 {
                    shutdown.cancel();
                }
                Ok(())
            }
        })
    };
    let sub = subscribe(target, &topic, &group).await;
    let wait = target.capabilities().receive_timeout * 2;
    let report = timeout(wait, Consumer::new(sub, service).run(shutdown))
        .await
        .expect("all events handled in time")
        .expect("consumer ran");
    assert_eq!(report.acked, 6);
    assert_eq!(report.nacked, 3);
    let mut handled = handled
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    handled.sort_unstable();
    assert_eq!(handled, (0..6).collect::<Vec<_>>());
}

/// Acked events are not delivered again to the group, even to a new
/// subscription.
pub async fn acked_events_are_not_redelivered(target: &dyn Target) {
    let topic = topic(target, "acked").await;
    let group = unique("g");
    let publisher = publisher(target).await;
    let events = (0..5).map(|n| keyed("k", n)).collect();
    publisher
        .publish_batch(&topic, events)
        .await
        .expect("published");
    let mut sub = subscribe(target, &topic, &group).await;
    for n in 0..5 {
        let mut d = recv(target, &mut sub, "the batch").await;
        assert_eq!(seq(&d), n);
        ack(&mut d).await;
    }
    sub.close().await.expect("closed gracefully");
    publisher
        .publish(&topic, keyed("k", 99))
        .await
        .expect("published marker");
    let mut again = subscribe(target, &topic, &group).await;
    let mut next = recv(target, &mut again, "the marker").await;
    assert_eq!(seq(&next), 99, "an acked event was delivered again");
    ack(&mut next).await;
}

/// A terminated event is not delivered again.
pub async fn terminated_events_are_not_redelivered(target: &dyn Target) {
    let topic = topic(target, "term").await;
    let mut sub = subscribe(target, &topic, &unique("g")).await;
    let events = vec![keyed("k", 0), keyed("k", 1)];
    publisher(target)
        .await
        .publish_batch(&topic, events)
        .await
        .expect("published");
    let mut poison = recv(target, &mut sub, "the poison event").await;
    assert_eq!(seq(&poison), 0);
    assert_eq!(poison.term().await.expect("term"), Settlement::Settled);
    let mut next = recv(target, &mut sub, "the event after it").await;
    assert_eq!(seq(&next), 1, "a terminated event came back");
    ack(&mut next).await;
}

/// Settling twice does nothing the second time and reports the first.
pub async fn settling_twice_is_a_no_op(target: &dyn Target) {
    let topic = topic(target, "twice").await;
    let mut sub = subscribe(target, &topic, &unique("g")).await;
    let events = vec![keyed("k", 0), keyed("k", 1)];
    publisher(target)
        .await
        .publish_batch(&topic, events)
        .await
        .expect("published");
    let mut d = recv(target, &mut sub, "the event").await;
    ack(&mut d).await;
    assert_eq!(
        d.nack(None).await.expect("no-op"),
        Settlement::AlreadySettled(AckKind::Ack)
    );
    let mut next = recv(target, &mut sub, "the next event").await;
    assert_eq!(seq(&next), 1, "the second settlement took effect");
    ack(&mut next).await;
}

/// A delivery left unsettled past the ack deadline is delivered again;
/// on brokers without ack deadlines ([`Capabilities::ack_deadline`] false) it
/// is delivered again once its consumer leaves the group.
///
/// [`Capabilities::ack_deadline`]: super::Capabilities::ack_deadline
pub async fn unsettled_delivery_is_redelivered_after_ack_deadline(target: &dyn Target) {
    let topic = topic(target, "deadline").await;
    let group = unique("g");
    let ack_wait = Duration::from_secs(1);
    let mut sub = subscribe_with(target, &topic, &group, ack_wait).await;
    let sent = keyed("k", 0);
    publisher(target)
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("published");
    let stuck = recv(target, &mut sub, "the event").await;
    if target.capabilities().ack_deadline {
        let mut again = recv(target, &mut sub, "the event after its ack deadline").await;
        assert_eq!(again.event().id(), sent.id());
        assert!(again.info().attempt.get() >= 2);
        ack(&mut again).await;
        drop(stuck);
    } else {
        drop(sub);
        std::mem::forget(stuck); // never settled, never nacked on drop
        let mut next = subscribe(target, &topic, &group).await;
        let mut again = recv(target, &mut next, "the event after its consumer left").await;
        assert_eq!(again.event().id(), sent.id());
        ack(&mut again).await;
    }
}

/// A published batch arrives whole and in order.
pub async fn batch_publish_delivers_all_in_order(target: &dyn Target) {
    let topic = topic(target, "batch").await;
    let mut sub = subscribe(target, &topic, &unique("g")).await;
    let n = 200;
    let events = (0..n).map(|i| keyed("batch", i)).collect();
    publisher(target)
        .await
        .publish_batch(&topic, events)
        .await
        .expect("published");
    for i in 0..n {
        let mut d = recv(target, &mut sub, "the batch").await;
        assert_eq!(seq(&d), i);
        ack(&mut d).await;
    }
}

/// Stopping a consumer mid-stream finishes and settles what is in flight and
/// loses nothing: a second consumer in the group handles exactly the rest.
pub async fn graceful_shutdown_loses_nothing(target: &dyn Target) {
    let topic = topic(target, "shutdown").await;
    let group = unique("g");
    let total = 40;
    let events = (0..total)
        .map(|n| keyed(&format!("k{}", n % 8), n))
        .collect();
    publisher(target)
        .await
        .publish_batch(&topic, events)
        .await
        .expect("published");
    let handled = Arc::new(Mutex::new(Vec::<usize>::new()));
    let first = run_until(target, &topic, &group, &handled, 12, total).await;
    assert!(
        first.acked >= 12,
        "the first consumer handled {}",
        first.acked
    );
    assert!(
        first.acked < total as u64,
        "the first consumer stopped early"
    );
    let second = run_until(target, &topic, &group, &handled, total, total).await;
    let mut all = handled
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(
        first.acked + second.acked,
        total as u64,
        "handled once each across the shutdown"
    );
    all.sort_unstable();
    assert_eq!(
        all,
        (0..total).collect::<Vec<_>>(),
        "nothing lost or repeated"
    );
}

/// Bad input gets a clear, non-retryable error at publish, and nothing of it
/// reaches subscribers.
pub async fn invalid_events_are_rejected_and_nothing_is_delivered(target: &dyn Target) {
    let topic = topic(target, "invalid").await;
    let mut sub = subscribe(target, &topic, &unique("g")).await;
    let publisher = publisher(target).await;
    let limit = target.capabilities().max_event_bytes;
    let oversized = CloudEventBuilder::new(TYPE, SOURCE)
        .partition_key("k")
        .binary_data("application/octet-stream", vec![7u8; limit + 1])
        .build()
        .expect("valid but large");
    let err = publisher
        .publish(&topic, oversized)
        .await
        .expect_err("an oversized event is refused");
    assert!(
        matches!(err.kind(), ErrorKind::EventTooLarge { .. }),
        "oversized: {err}"
    );
    assert!(!err.is_retryable());

    let mut no_id = keyed("k", 0);
    no_id.set_id("");
    let err = publisher
        .publish(&topic, no_id)
        .await
        .expect_err("an event without id is refused");
    assert!(
        matches!(err.kind(), ErrorKind::InvalidEvent { .. }),
        "empty id: {err}"
    );
    assert!(err.to_string().contains("`id`"), "{err}");

    publisher
        .publish(&topic, keyed("k", 1))
        .await
        .expect("a valid event still goes through");
    let mut d = recv(target, &mut sub, "the valid event").await;
    assert_eq!(seq(&d), 1, "only the valid event is delivered");
    ack(&mut d).await;
}

/// Runs a consumer (4 handlers at once, 20 ms each) until `handled` holds
/// `stop_after` events, then shuts it down gracefully.
async fn run_until(
    target: &dyn Target,
    topic: &Topic,
    group: &str,
    handled: &Arc<Mutex<Vec<usize>>>,
    stop_after: usize,
    total: usize,
) -> crate::router::ConsumerReport {
    let shutdown = CancellationToken::new();
    let service = {
        let handled = Arc::clone(handled);
        let shutdown = shutdown.clone();
        tower::service_fn(move |r: Received| {
            let handled = Arc::clone(&handled);
            let shutdown = shutdown.clone();
            async move {
                let n: usize = r.event.data_as()?;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let mut handled = handled.lock().unwrap_or_else(PoisonError::into_inner);
                handled.push(n);
                if handled.len() >= stop_after.min(total) {
                    shutdown.cancel();
                }
                Ok::<(), HandlerError>(())
            }
        })
    };
    let sub = subscribe(target, topic, group).await;
    let four = NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN);
    let consumer = Consumer::new(sub, service).concurrency(four);
    timeout(
        target.capabilities().receive_timeout * 3,
        consumer.run(shutdown),
    )
    .await
    .expect("consumer stopped in time")
    .expect("consumer ran")
}
