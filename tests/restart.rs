//! The broker-restart scenario, for any adapter: the broker is stopped and
//! started again while events are published and consumed, and no event whose
//! publish returned `Ok` may be lost.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use broker_adapters::cloudevents::{AttributesReader, Event};
use broker_adapters::{CloudEventBuilder, Publisher, SubscribeOptions, Subscriber, Topic};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::process::ServerProcess;

/// What the scenario observed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestartReport {
    /// Events whose publish returned `Ok`.
    pub published: usize,
    /// Publishes refused while the broker was down (retried afterwards).
    pub refused_while_down: usize,
    /// Distinct events delivered.
    pub delivered: usize,
    /// Deliveries of an event already delivered (allowed: at least once).
    pub redelivered: usize,
    /// Times the consumer had to subscribe again.
    pub resubscribed: usize,
}

fn event(n: usize) -> anyhow::Result<Event> {
    Ok(
        CloudEventBuilder::new("dev.backbone.restart", "/e2e/restart")
            .partition_key(format!("k{}", n % 8))
            .subject(n.to_string())
            .json_data(&n)
            .build()?,
    )
}

/// Publishes until the broker acknowledges, retrying errors that say a retry
/// can help; a non-retryable error fails the scenario.
async fn publish_until_acked(
    publisher: &dyn Publisher,
    topic: &Topic,
    event: &Event,
    deadline: tokio::time::Instant,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match publisher.publish(topic, event.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => bail!("publishing {} failed for good: {e}", event.id()),
        }
    }
}

/// Runs the scenario with `events` events: a third before the stop, one
/// attempt while the broker is down, the rest after it is back.
///
/// # Errors
///
/// The broker process could not be controlled, a publish failed for good,
/// or an acknowledged event was not delivered within two minutes.
pub async fn acked_events_survive_a_broker_restart(
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    topic: &Topic,
    group: &str,
    broker: &mut ServerProcess,
    events: usize,
) -> anyhow::Result<RestartReport> {
    let seen = Arc::new(Mutex::new((HashSet::<String>::new(), 0usize, 0usize)));
    let stop = CancellationToken::new();
    let consumer = {
        let (seen, stop, subscriber) = (Arc::clone(&seen), stop.clone(), Arc::clone(&subscriber));
        let (topic, group) = (topic.clone(), group.to_owned());
        tokio::spawn(async move {
            // A consumer as a service would run it: subscribe again whenever
            // the subscription fails or ends.
            while !stop.is_cancelled() {
                let options = SubscribeOptions::new(&group)?.ack_wait(Duration::from_secs(5));
                let mut sub = match subscriber.subscribe(&topic, options).await {
                    Ok(sub) => sub,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                loop {
                    let next = tokio::select! {
                        () = stop.cancelled() => return anyhow::Ok(()),
                        next = sub.next() => next,
                    };
                    let Some(Ok(mut delivery)) = next else { break };
                    let id = delivery.event().id().to_owned();
                    if delivery.ack().await.is_ok() {
                        let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                        if !seen.0.insert(id) {
                            seen.1 += 1;
                        }
                    }
                }
                seen.lock().unwrap_or_else(PoisonError::into_inner).2 += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            anyhow::Ok(())
        })
    };

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let all: Vec<Event> = (0..events).map(event).collect::<anyhow::Result<_>>()?;
    let mut report = RestartReport::default();
    let third = events / 3;
    for e in &all[..third] {
        publish_until_acked(&*publisher, topic, e, deadline).await?;
    }
    // Let the consumer get going, so the restart happens mid-stream.
    tokio::time::sleep(Duration::from_millis(500)).await;

    broker.stop().await?;
    // While the broker is down a publish must fail, and say a retry helps.
    let down = tokio::time::timeout(
        Duration::from_secs(60),
        publisher.publish(topic, all[third].clone()),
    )
    .await;
    match down {
        Ok(Err(e)) if e.is_retryable() => report.refused_while_down += 1,
        Ok(Err(e)) => {
            bail!("a publish while the broker is down failed without saying a retry helps: {e}")
        }
        Ok(Ok(())) => bail!("a publish while the broker was down returned Ok"),
        Err(_) => bail!("a publish while the broker was down hung for 60 s"),
    }
    broker.start().await?;

    for e in &all[third..] {
        publish_until_acked(&*publisher, topic, e, deadline).await?;
    }
    report.published = events;

    let expected: HashSet<String> = all.iter().map(|e| e.id().to_owned()).collect();
    loop {
        let missing = {
            let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
            expected.difference(&seen.0).count()
        };
        if missing == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            stop.cancel();
            bail!(
                "{missing} of {events} acknowledged events were never delivered after the restart (broker log: {})",
                broker.log().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    consumer.await.context("consumer task")??;
    let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
    report.delivered = seen.0.len();
    report.redelivered = seen.1;
    report.resubscribed = seen.2;
    Ok(report)
}

/// How the broker goes away under a subscription in
/// [`shutdown_is_not_held_up_by_a_gone_broker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    /// The process hangs (SIGSTOP): connections stay open and nothing
    /// answers, as behind a network partition.
    Frozen,
    /// The process ends (SIGKILL): connections are refused.
    Killed,
}

/// What the service does with its subscription before its runtime ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Closes it.
    Closed,
    /// Drops it.
    Dropped,
    /// Nothing: the runtime ends with the subscription still in use.
    Held,
}

/// One case of [`shutdown_is_not_held_up_by_a_gone_broker`] and what it
/// measured.
#[derive(Clone, Copy, Debug)]
pub struct GoneCase {
    /// How the broker went away.
    pub gone: Gone,
    /// What became of the subscription.
    pub end: End,
    /// How long the subscription's `close` took, and then the broker's
    /// (`Publisher::close`), if they were called.
    pub closed: Option<(Duration, Duration)>,
    /// How long the runtime took to shut down.
    pub shutdown: Duration,
}

/// A connected broker, as a publisher and a subscriber, and a topic ready
/// on it.
pub type Connected = (Arc<dyn Publisher>, Arc<dyn Subscriber>, Topic);

/// Connects to the broker listening on the given port.
pub type Connect = fn(u16) -> futures_util::future::BoxFuture<'static, anyhow::Result<Connected>>;

/// A subscription whose broker is gone does not hold up the service that
/// closes or drops it: for a frozen and a killed broker, and a subscription
/// closed, dropped, or left in use, the subscription's `close` and then
/// the broker's (`Publisher::close`) each return within `close_within`
/// (`Ok`, or an error saying the broker did not answer or could not be
/// reached), and the subscription's runtime
/// shuts down within 5 s. Each case runs on a broker of its own, from
/// `start` (a started server), and a runtime of its own on a thread of its
/// own, so a shutdown that hangs fails the scenario instead of hanging it.
///
/// Returns what each case measured.
///
/// # Errors
///
/// A case failed or took too long.
pub fn shutdown_is_not_held_up_by_a_gone_broker(
    mut start: impl FnMut() -> anyhow::Result<ServerProcess>,
    connect: Connect,
    close_within: Duration,
) -> anyhow::Result<Vec<GoneCase>> {
    let mut report = Vec::new();
    for gone in [Gone::Frozen, Gone::Killed] {
        for end in [End::Closed, End::Dropped, End::Held] {
            let server = start()?;
            let pid = server.pid().context("the broker runs")?;
            let port = server.port();
            let (send, outcome) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = send.send(end_with_broker_gone(connect, port, pid, gone, end));
            });
            let outcome = outcome.recv_timeout(Duration::from_secs(90));
            // Killing it also ends a frozen broker.
            drop(server);
            let (closed, shutdown) = outcome
                .map_err(|_| {
                    anyhow::anyhow!("{gone:?} broker, subscription {end:?}: not done in 90 s")
                })?
                .with_context(|| format!("{gone:?} broker, subscription {end:?}"))?;
            if let Some((closed, broker_closed)) = closed {
                anyhow::ensure!(
                    closed < close_within,
                    "{gone:?} broker: the subscription's close took {closed:?}"
                );
                anyhow::ensure!(
                    broker_closed < close_within,
                    "{gone:?} broker: the broker's close took {broker_closed:?}"
                );
            }
            anyhow::ensure!(
                shutdown < Duration::from_secs(5),
                "{gone:?} broker, subscription {end:?}: the runtime took {shutdown:?} to shut down"
            );
            report.push(GoneCase {
                gone,
                end,
                closed,
                shutdown,
            });
        }
    }
    Ok(report)
}

/// Whether `e` says the broker did not answer or could not be reached.
fn unreachable(e: &broker_adapters::Error) -> bool {
    matches!(
        e.kind(),
        broker_adapters::ErrorKind::Timeout { .. } | broker_adapters::ErrorKind::Connection { .. }
    )
}

/// Connects, subscribes as `group`, publishes one event and acks its
/// delivery: the publisher, the subscription, and the topic and event.
async fn subscribed(
    connect: Connect,
    port: u16,
    group: &str,
) -> anyhow::Result<(
    Arc<dyn Publisher>,
    broker_adapters::Subscription,
    (Topic, Event),
)> {
    let (publisher, subscriber, topic) = connect(port).await?;
    let mut sub = subscriber
        .subscribe(&topic, SubscribeOptions::new(group)?)
        .await?;
    let sent = event(1)?;
    publisher.publish(&topic, sent.clone()).await?;
    let mut delivery = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .context("no delivery")?
        .context("the subscription ended")??;
    anyhow::ensure!(
        delivery.event().id() == sent.id(),
        "another event delivered"
    );
    delivery.ack().await?;
    Ok((publisher, sub, (topic, sent)))
}

/// One case of [`shutdown_is_not_held_up_by_a_gone_broker`]: subscribes on
/// a runtime of its own, acks one event, takes the broker away, ends the
/// subscription as `end` says, and returns how long `close` took (if
/// called) and dropping the runtime.
fn end_with_broker_gone(
    connect: Connect,
    port: u16,
    pid: u32,
    gone: Gone,
    end: End,
) -> anyhow::Result<(Option<(Duration, Duration)>, Duration)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (closed, held) = runtime.block_on(async {
        let (publisher, sub, _) = subscribed(connect, port, "gone").await?;
        let signal = match gone {
            Gone::Frozen => "-STOP",
            Gone::Killed => "-KILL",
        };
        crate::process::signal(pid, signal)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        match end {
            End::Closed => {
                let started = std::time::Instant::now();
                let closed = sub.close().await;
                let took = started.elapsed();
                if let Err(e) = closed {
                    anyhow::ensure!(unreachable(&e), "close failed with {e}");
                }
                let started = std::time::Instant::now();
                let broker_closed = publisher.close().await;
                let broker_took = started.elapsed();
                if let Err(e) = broker_closed {
                    anyhow::ensure!(unreachable(&e), "closing the broker failed with {e}");
                }
                anyhow::Ok((Some((took, broker_took)), None))
            }
            End::Dropped => {
                drop(sub);
                anyhow::Ok((None, None))
            }
            End::Held => anyhow::Ok((None, Some(sub))),
        }
    })?;
    let started = std::time::Instant::now();
    drop(runtime);
    let shutdown = started.elapsed();
    drop(held);
    Ok((closed, shutdown))
}

/// A broker that stops answering for `freeze` (SIGSTOP) under a running
/// subscription does not stall the subscription's runtime, and the
/// subscription goes on once the broker answers again. Runs on a
/// current-thread runtime of its own, where any blocking call stands the
/// whole runtime still, and measures the longest gap of a 10 ms timer,
/// which must stay under 1 s; a watchdog thread thaws the broker after two
/// minutes whatever happens. `server` is started and left running.
///
/// Prints the longest gap and how long the subscription took to receive a
/// new event once the broker was thawed.
///
/// # Errors
///
/// The runtime stood still, or the subscription did not go on within 60 s.
pub fn a_frozen_broker_does_not_stall_a_running_subscription(
    server: &ServerProcess,
    connect: Connect,
    freeze: Duration,
) -> anyhow::Result<()> {
    let pid = server.pid().context("the broker runs")?;
    let port = server.port();
    let signal = |signal: &str| crate::process::signal(pid, signal);
    let (finished, watchdog) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watchdog.recv_timeout(Duration::from_secs(120)).is_err() {
            let _ = crate::process::signal(pid, "-CONT");
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        let (publisher, mut sub, (topic, first)) = subscribed(connect, port, "frozen").await?;

        signal("-STOP")?;
        let frozen = std::time::Instant::now();
        let mut last = std::time::Instant::now();
        let mut longest = Duration::ZERO;
        while frozen.elapsed() < freeze {
            tokio::time::sleep(Duration::from_millis(10)).await;
            longest = longest.max(last.elapsed());
            last = std::time::Instant::now();
        }
        signal("-CONT")?;
        anyhow::ensure!(
            longest < Duration::from_secs(1),
            "the runtime stood still for {longest:?} while the broker was frozen"
        );

        // The first event may come again: its ack may not have reached the
        // broker's durable state (a Kafka offset not yet committed).
        let second = event(2)?;
        let thawed = std::time::Instant::now();
        publish_until_acked(
            &*publisher,
            &topic,
            &second,
            tokio::time::Instant::now() + Duration::from_secs(60),
        )
        .await?;
        loop {
            let mut delivery = tokio::time::timeout(Duration::from_secs(60), sub.next())
                .await
                .context("no delivery within 60 s after the broker thawed")?
                .context("the subscription ended")??;
            let id = delivery.event().id().to_owned();
            delivery.ack().await?;
            if id == second.id() {
                break;
            }
            anyhow::ensure!(id == first.id(), "an event never published: {id}");
        }
        let resumed = thawed.elapsed();
        sub.close().await?;
        publisher.close().await?;
        println!(
            "longest timer gap while frozen: {longest:?}; delivering again {resumed:?} after the thaw"
        );
        anyhow::Ok(())
    });
    let _ = finished.send(());
    let _ = watchdog.join();
    outcome
}
