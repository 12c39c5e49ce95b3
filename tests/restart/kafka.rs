//! Kafka across a broker restart: the test runs its own Tansu on a free
//! loopback port, stops it mid-stream (SIGTERM) and starts it again; no
//! event whose publish returned `Ok` may be lost.
//!
//! Tansu keeps its data in S3 storage: the test also runs an S3-compatible
//! server of its own (`moto`'s, a Python package `tests/harness/up.sh`
//! installs with the interop packages) on another free port, which lives
//! across the broker's restart, as a bucket outlives the brokers of a Tansu
//! cluster. (The pip-packaged Tansu has no file storage, and its memory
//! storage ends with the process.)
//!
//! Tansu on S3 storage killed while a write to its storage hangs: with an
//! idempotent producer it can lose a batch it later counts as delivered
//! (README, known gaps), with `KafkaConfig::idempotence(false)` it loses
//! nothing.
//!
//! Also on a Tansu of its own: TLS with a private CA, through a TLS
//! terminator in front of Tansu (which serves no TLS itself); and a broker
//! frozen (SIGSTOP) or killed under a subscription, which must hold up
//! neither `close`, nor the runtime while it runs or shuts down.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use broker_adapters::Topic;
use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
use e2e::process::{ServerProcess, free_port, signal};
use e2e::restart::{
    a_frozen_broker_does_not_stall_a_running_subscription, acked_events_survive_a_broker_restart,
    shutdown_is_not_held_up_by_a_gone_broker,
};
use e2e::tansu::{self, S3Tansu};

const EVENTS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_events_survive_a_kafka_broker_restart() -> anyhow::Result<()> {
    let mut tansu = S3Tansu::start("e2e-kafka-restart").await?;
    let port = tansu.broker.port();

    let config = || {
        KafkaConfig::builder([format!("127.0.0.1:{port}")])
            .session_timeout(Duration::from_secs(6))
            .delivery_timeout(Duration::from_secs(5))
            .commit_interval(Duration::from_millis(20))
    };
    let publisher = KafkaBroker::connect(config()).await?;
    let subscriber = KafkaBroker::connect(config()).await?;
    let topic = Topic::try_from("restart-events")?;
    publisher.create_topic(&topic, 2).await?;

    let report = acked_events_survive_a_broker_restart(
        Arc::new(publisher),
        Arc::new(subscriber),
        &topic,
        "restart",
        &mut tansu.broker,
        EVENTS,
    )
    .await?;
    println!("{report:?}");
    assert_eq!(
        report.delivered, EVENTS,
        "every acknowledged event delivered"
    );

    tansu.stop().await
}

/// TLS to a Kafka broker with a certificate signed by a private CA the
/// test makes: with `security.protocol` `ssl` and the CA file passed
/// through, the broker publishes and a consumer group receives and acks;
/// without the CA file the server's certificate does not check out and
/// connecting fails, not retried. The pip-packaged Tansu serves no TLS
/// (its `--cert` is not wired to its listener), so the test puts a TLS
/// terminator in front of it and has Tansu advertise the terminator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() -> anyhow::Result<()> {
    use broker_adapters::cloudevents::AttributesReader;
    use broker_adapters::kafka::SecurityProtocol;
    use broker_adapters::{ErrorKind, PublisherExt, SubscribeOptions, Subscriber};
    use futures_util::StreamExt;

    let program = tansu::program()?;
    let dir = std::env::temp_dir().join(e2e::unique_name("e2e-kafka-tls"));
    std::fs::create_dir_all(&dir)?;
    let certs = e2e::tls::certificates(&dir)?;
    // Clients reach Tansu only through the terminator, whose port Tansu
    // advertises.
    let tansu_port = free_port()?;
    let terminator = TlsTerminator::start(&certs, tansu_port).await?;
    let port = terminator.port;
    let path = |p: &std::path::PathBuf| p.display().to_string();
    let args = vec![
        "broker".to_owned(),
        "--listener-url".to_owned(),
        format!("tcp://127.0.0.1:{tansu_port}"),
        "--advertised-listener-url".to_owned(),
        format!("tcp://127.0.0.1:{port}"),
        "--storage-engine".to_owned(),
        "memory://tansu/".to_owned(),
    ];
    let mut server = ServerProcess::new("tansu", program, args, tansu_port, dir.join("server.log"));
    server.start().await?;

    let config = || {
        KafkaConfig::builder([format!("127.0.0.1:{port}")])
            .security_protocol(SecurityProtocol::Ssl)
            .session_timeout(Duration::from_secs(6))
    };
    let broker = KafkaBroker::connect(config().with_option("ssl.ca.location", path(&certs.ca)))
        .await
        .context("connecting over TLS")?;
    let topic = Topic::try_from("tls-events")?;
    broker.create_topic(&topic, 1).await?;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::new("g")?)
        .await?;
    let id = broker
        .publish_json(&topic, "dev.backbone.test", "/kafka", &1)
        .await?;
    let mut delivery = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .context("no delivery over TLS")?
        .context("the subscription ended")??;
    assert_eq!(delivery.event().id(), id);
    delivery.ack().await?;
    sub.close().await?;
    Subscriber::close(&broker).await?;

    let started = std::time::Instant::now();
    let err = KafkaBroker::connect(config())
        .await
        .expect_err("the server's certificate is signed by a CA the client does not know");
    assert!(
        matches!(err.kind(), ErrorKind::Config { key, reason }
            if key == "security_protocol" && reason.contains("certificate verify failed")),
        "{err:?}"
    );
    assert!(!err.is_retryable(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a refused handshake ends the connection check at once, not after its {:?}",
        started.elapsed()
    );

    terminator.stop();
    server.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A TLS terminator: accepts TLS on a free loopback port with the server
/// certificate of `certs` and relays each connection, decrypted, to
/// `upstream` on loopback.
struct TlsTerminator {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl TlsTerminator {
    async fn start(certs: &e2e::tls::Certificates, upstream: u16) -> anyhow::Result<Self> {
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls::{ServerConfig, crypto};

        let chain = vec![CertificateDer::from_pem_file(&certs.server.0)?];
        let key = PrivateKeyDer::from_pem_file(&certs.server.1)?;
        let config =
            ServerConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that fails the handshake (the test's
                    // untrusting one) just goes away.
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut plain) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Ok(Self { port, task })
    }

    fn stop(self) {
        self.task.abort();
    }
}

/// A Kafka subscription whose broker is gone does not hold up the service
/// that closes or drops it. librdkafka's close waits for the group
/// coordinator, and rdkafka's `BaseConsumer::drop` polls on the dropping
/// thread until it is done: with a broker that keeps its connections open
/// but answers nothing (frozen with SIGSTOP, as behind a network
/// partition), a runtime dropped with a subscription in it did not finish
/// shutting down in 200 s, nor one whose subscription had been dropped
/// just before (the last commit ran on a worker, the group's leaving in
/// `spawn_blocking`, which a runtime's shutdown waits for). Now `close`
/// gives up after the session timeout, and the runtime's shutdown waits
/// for neither.
#[test]
fn a_subscription_whose_broker_is_gone_does_not_hold_up_shutdown() -> anyhow::Result<()> {
    let program = tansu::program()?;
    let dir = std::env::temp_dir().join(e2e::unique_name("e2e-kafka-gone"));
    std::fs::create_dir_all(&dir)?;
    let starter = tokio::runtime::Runtime::new()?;
    let start = || {
        let mut server = memory_tansu(&program, &dir)?;
        starter.block_on(server.start())?;
        Ok(server)
    };
    let report = shutdown_is_not_held_up_by_a_gone_broker(
        start,
        connect_uncommitted,
        SESSION + Duration::from_secs(3),
    )?;
    for case in report {
        println!("{case:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The session timeout of the subscriptions of the tests with a broker
/// that goes away.
const SESSION: Duration = Duration::from_secs(6);

/// A Tansu with memory storage on a free port, logging into `dir`; not
/// started.
fn memory_tansu(program: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<ServerProcess> {
    tansu::server(program, dir, "memory://tansu/")
}

/// Connects with the session timeout [`SESSION`], committing offsets only
/// every ten minutes (so an acked event's offset stays uncommitted), and
/// creates a topic of two partitions.
fn connect_uncommitted(
    port: u16,
) -> futures_util::future::BoxFuture<'static, anyhow::Result<e2e::restart::Connected>> {
    Box::pin(async move {
        let broker = Arc::new(
            KafkaBroker::connect(
                KafkaConfig::builder([format!("127.0.0.1:{port}")])
                    .session_timeout(SESSION)
                    .commit_interval(Duration::from_secs(600)),
            )
            .await?,
        );
        let topic = Topic::try_from("gone-events")?;
        broker.create_topic(&topic, 2).await?;
        anyhow::Ok((broker.clone() as _, broker as _, topic))
    })
}

/// A broker that stops answering for longer than the session timeout
/// (frozen with SIGSTOP) does not stall the subscription's runtime, and the
/// subscription goes on once the broker answers again. When the session
/// lapses librdkafka revokes the lost partitions through the rebalance
/// callback, which ran on the runtime's thread that polled; it committed
/// the settled offsets synchronously, and librdkafka's synchronous commit
/// waits for the coordinator without end: a current-thread runtime stood
/// still for as long as the broker was frozen (over 12 minutes, when the
/// test's own timer was what would have thawed it). The test runs on a
/// current-thread runtime and measures the longest gap of a 10 ms timer.
#[test]
fn a_broker_frozen_past_the_session_timeout_does_not_stall_the_runtime() -> anyhow::Result<()> {
    let program = tansu::program()?;
    let dir = std::env::temp_dir().join(e2e::unique_name("e2e-kafka-freeze"));
    std::fs::create_dir_all(&dir)?;
    let mut server = memory_tansu(&program, &dir)?;
    tokio::runtime::Runtime::new()?.block_on(server.start())?;
    a_frozen_broker_does_not_stall_a_running_subscription(
        &server,
        connect_uncommitted,
        SESSION * 2 + Duration::from_secs(3),
    )?;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Thaws a frozen process however the test ends.
struct Thaw(u32);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = signal(self.0, "-CONT");
    }
}

/// A batch that fails returns only once every event of it the producer
/// took has its outcome. The last event of the batch is too large and is
/// refused before it is sent, while the broker is frozen (SIGSTOP) with the
/// 100 events before it on their way: `publish_batch` returned the refusal
/// at once, with those 100 still queued, so a caller sending the batch
/// again (the outbox relay does) raced its own earlier copies, and one that
/// failed could be written after a later one of its key. Now it waits for
/// them (here until the broker is thawed, at most the delivery timeout),
/// and returns the refusal with all 100 written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_returns_once_the_events_it_sent_are_settled() -> anyhow::Result<()> {
    use broker_adapters::{CloudEventBuilder, ErrorKind, Publisher};

    let program = tansu::program()?;
    let dir = std::env::temp_dir().join(e2e::unique_name("e2e-kafka-settled"));
    std::fs::create_dir_all(&dir)?;
    let mut server = memory_tansu(&program, &dir)?;
    server.start().await?;
    let port = server.port();
    let pid = server.pid().context("the broker's pid")?;
    let publisher = KafkaBroker::connect(
        KafkaConfig::builder([format!("127.0.0.1:{port}")])
            .max_event_bytes(std::num::NonZeroUsize::new(4096).context("positive")?)
            .delivery_timeout(Duration::from_secs(60)),
    )
    .await?;
    let topic = Topic::try_from("settled-batch")?;
    publisher.create_topic(&topic, 1).await?;
    let event = |n: usize, bytes: usize| {
        CloudEventBuilder::new("t", "/s")
            .partition_key("k")
            .subject(n.to_string())
            .binary_data("application/octet-stream", vec![7u8; bytes])
            .build()
    };
    // The producer id and the topic's leader are known before the freeze.
    publisher.publish(&topic, event(0, 10)?).await?;

    let mut batch = (1..=100)
        .map(|n| event(n, 10))
        .collect::<Result<Vec<_>, _>>()?;
    batch.push(event(101, 8192)?);
    signal(pid, "-STOP")?;
    let thaw = Thaw(pid);
    let publishing = {
        let (publisher, topic) = (publisher.clone(), topic.clone());
        tokio::spawn(async move { publisher.publish_batch(&topic, batch).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let returned_while_frozen = publishing.is_finished();
    drop(thaw);
    let outcome = tokio::time::timeout(Duration::from_secs(60), publishing).await??;
    anyhow::ensure!(
        !returned_while_frozen,
        "publish_batch returned while the 100 events before the refused one were on their way"
    );
    let refused = outcome
        .err()
        .context("the oversized event fails the batch")?;
    anyhow::ensure!(
        matches!(refused.kind(), ErrorKind::EventTooLarge { .. }),
        "{refused}"
    );

    // What the partition holds: the 101 events, in order.
    let written = stored_subjects(format!("127.0.0.1:{port}"), &topic).await?;
    let sent: Vec<String> = (0..=100).map(|n| n.to_string()).collect();
    anyhow::ensure!(written == sent, "written: {written:?}");
    publisher.close().await?;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Tansu on S3 storage killed in the middle of a produce: the S3 server is
/// frozen (SIGSTOP) under a producer publishing one key's numbered events
/// in batches of 50, so Tansu hangs in one of its storage writes; Tansu is
/// killed, the S3 server thawed (it then serves the write it held) and
/// Tansu started again. Batches that fail are sent again, as the outbox
/// relay does. With idempotence off (one request in flight) every event
/// whose publish returned `Ok` is stored, the key's first copies in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_write_loses_no_acknowledged_event_without_idempotence()
-> anyhow::Result<()> {
    killed_mid_write(false).await
}

/// The same with the default, idempotent producer: Tansu 0.6 saves the
/// producer's sequence before the batch, so when the kill lands between
/// the two it answers the batch's retry as a duplicate, librdkafka counts
/// it as delivered, and it is gone (here in 8 of 8 runs: the batch in
/// flight at the freeze, events 1000-1049, whose publish returned `Ok`).
/// Not run by default: it tests Tansu, and shows why the README tells
/// Tansu users to turn idempotence off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Tansu 0.6 on S3 loses an idempotent batch it was killed in the middle of (README, known gaps); run with --ignored"]
async fn a_broker_killed_mid_write_loses_an_idempotent_batch() -> anyhow::Result<()> {
    killed_mid_write(true).await
}

async fn killed_mid_write(idempotent: bool) -> anyhow::Result<()> {
    use broker_adapters::{CloudEventBuilder, Publisher};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const BATCH: usize = 50;
    const TOTAL: usize = 4_000;
    let mut tansu = S3Tansu::start("e2e-kafka-mid-write").await?;
    let storage = tansu.storage_pid().context("the S3 server's pid")?;
    let publisher = KafkaBroker::connect(
        KafkaConfig::builder([tansu.bootstrap()])
            .idempotence(idempotent)
            // Nothing times out while the broker is away.
            .delivery_timeout(Duration::from_secs(60)),
    )
    .await?;
    let topic = Topic::try_from("mid-write")?;
    publisher.create_topic(&topic, 1).await?;

    let acknowledged = Arc::new(AtomicUsize::new(0));
    let publishing = {
        let (publisher, topic, acknowledged) =
            (publisher.clone(), topic.clone(), Arc::clone(&acknowledged));
        tokio::spawn(async move {
            let mut failures = 0;
            for start in (0..TOTAL).step_by(BATCH) {
                let batch = || {
                    (start..start + BATCH)
                        .map(|n| {
                            CloudEventBuilder::new("t", "/s")
                                .partition_key("k")
                                .subject(n.to_string())
                                .binary_data("application/octet-stream", vec![7u8; 100])
                                .build()
                        })
                        .collect::<Result<Vec<_>, _>>()
                };
                while let Err(e) = publisher.publish_batch(&topic, batch()?).await {
                    failures += 1;
                    anyhow::ensure!(failures < 100, "publishing keeps failing: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                acknowledged.store(start + BATCH, Ordering::SeqCst);
            }
            anyhow::Ok(())
        })
    };

    // Mid-stream: the storage frozen under a produce, the broker killed.
    while acknowledged.load(Ordering::SeqCst) < 1_000 {
        anyhow::ensure!(!publishing.is_finished(), "publishing ended early");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    signal(storage, "-STOP")?;
    let thaw = Thaw(storage);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tansu.broker.kill()?;
    drop(thaw);
    tokio::time::sleep(Duration::from_millis(500)).await;
    tansu.broker.start().await?;
    tokio::time::timeout(Duration::from_secs(120), publishing).await???;

    // Every acknowledged event stored, the first copies in order.
    let stored = stored_subjects(tansu.bootstrap(), &topic)
        .await?
        .iter()
        .map(|subject| subject.parse())
        .collect::<Result<Vec<usize>, _>>()?;
    let mut firsts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for n in &stored {
        if seen.insert(*n) {
            firsts.push(*n);
        }
    }
    let missing: Vec<usize> = (0..TOTAL).filter(|n| !seen.contains(n)).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{} acknowledged events not stored (first {:?}, last {:?}; idempotent: {idempotent})",
        missing.len(),
        missing.first(),
        missing.last()
    );
    anyhow::ensure!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "the key's events stored out of order"
    );
    println!(
        "stored {} records for {TOTAL} events ({} copies)",
        stored.len(),
        stored.len() - TOTAL
    );
    publisher.close().await?;
    tansu.stop().await
}

/// The subjects of partition 0 of `topic`, read from its start with a
/// plain consumer (no group, no commits) until none comes for 2 s (10 s
/// for the first).
async fn stored_subjects(bootstrap: String, topic: &Topic) -> anyhow::Result<Vec<String>> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};

    let name = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let reader: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", e2e::unique_name("reader"))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut partitions = rdkafka::TopicPartitionList::new();
        partitions.add_partition_offset(&name, 0, rdkafka::Offset::Beginning)?;
        reader.assign(&partitions)?;
        let mut subjects = Vec::new();
        let mut until = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < until {
            if let Some(message) = reader.poll(Duration::from_millis(200)) {
                subjects.push(e2e::kafka_header(&message?, "ce_subject").unwrap_or_default());
                until = std::time::Instant::now() + Duration::from_secs(2);
            }
        }
        Ok(subjects)
    })
    .await?
}
