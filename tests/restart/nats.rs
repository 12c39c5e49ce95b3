//! NATS JetStream on a nats-server of the test's own (file storage, a free
//! loopback port): stopped mid-stream and started again, no event whose
//! publish returned `Ok` may be lost; and, counted by the server's
//! monitoring endpoint, a subscription's connection is closed once the
//! subscription and its deliveries are gone.
//!
//! `source tests/harness/up.sh && cargo test -p e2e --test restart_nats`

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use broker_adapters::Topic;
use broker_adapters::nats::{NatsBroker, NatsConfig, Storage};
use e2e::process::{ServerProcess, find_program, free_port};
use e2e::restart::acked_events_survive_a_broker_restart;

const EVENTS: usize = 300;

/// A started nats-server of the test's own with JetStream, its client port,
/// and its directory; with `monitor`, its monitoring endpoint on that port.
async fn own_server(
    name: &str,
    monitor: Option<u16>,
) -> anyhow::Result<(ServerProcess, u16, std::path::PathBuf)> {
    let program = find_program("nats-server", &["/usr/sbin/nats-server", "/usr/bin/nats-server"])
        .context(
            "nats-server is not installed: `source tests/harness/up.sh` installs it (Debian package nats-server)",
        )?;
    let port = free_port()?;
    let dir = std::env::temp_dir().join(e2e::unique_name(name));
    std::fs::create_dir_all(&dir)?;
    let mut args = vec![
        "-a".to_owned(),
        "127.0.0.1".to_owned(),
        "-p".to_owned(),
        port.to_string(),
        "-js".to_owned(),
        "-sd".to_owned(),
        dir.join("store").display().to_string(),
    ];
    if let Some(monitor) = monitor {
        args.extend(["-m".to_owned(), monitor.to_string()]);
    }
    let mut server = ServerProcess::new("nats-server", program, args, port, dir.join("server.log"));
    server.start().await?;
    Ok((server, port, dir))
}

fn config(port: u16) -> NatsConfig {
    NatsConfig::builder()
        .url(format!("nats://127.0.0.1:{port}"))
        .storage(Storage::File)
        .request_timeout(Duration::from_secs(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_events_survive_a_nats_server_restart() -> anyhow::Result<()> {
    let (mut server, port, dir) = own_server("e2e-nats-restart", None).await?;
    let config = || config(port);
    let publisher = NatsBroker::connect(config()).await?;
    let subscriber = NatsBroker::connect(config()).await?;
    let topic = Topic::try_from("restart.events")?;
    publisher.provision(&topic).await?;

    let report = acked_events_survive_a_broker_restart(
        Arc::new(publisher),
        Arc::new(subscriber),
        &topic,
        "restart",
        &mut server,
        EVENTS,
    )
    .await?;
    println!("{report:?}");
    assert_eq!(
        report.delivered, EVENTS,
        "every acknowledged event delivered"
    );
    assert_eq!(report.refused_while_down, 1);

    server.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Each subscription has a connection of its own: it is open while the
/// subscription is, stays open while a delivery of it is unsettled (so the
/// delivery can still be acked), and is closed after that. Counted by the
/// server (`/connz`), so a leaked connection fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_closes_its_connection_when_it_is_done() -> anyhow::Result<()> {
    use broker_adapters::{PublisherExt, SubscribeOptions, Subscriber};
    use futures_util::StreamExt;

    let monitor = free_port()?;
    let (mut server, port, dir) = own_server("e2e-nats-connections", Some(monitor)).await?;
    let http = reqwest::Client::new();
    let connections = || {
        let http = http.clone();
        async move {
            let connz: serde_json::Value = http
                .get(format!("http://127.0.0.1:{monitor}/connz"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            connz["num_connections"]
                .as_u64()
                .with_context(|| format!("no num_connections in {connz}"))
        }
    };
    // The server counts a closed connection gone shortly after the client
    // closes it.
    let expect = |n: u64, when: &'static str| {
        let connections = &connections;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let now = connections().await?;
                if now == n {
                    return anyhow::Ok(());
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "{when}: {now} connections, expected {n}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    let broker = NatsBroker::connect(config(port)).await?;
    let topic = Topic::try_from("connections.events")?;
    broker.provision(&topic).await?;
    expect(1, "the broker alone").await?;
    let options = || SubscribeOptions::new("g");
    let mut first = broker.subscribe(&topic, options()?).await?;
    let second = broker.subscribe(&topic, options()?).await?;
    expect(3, "two subscriptions open").await?;

    broker
        .publish_json(&topic, "dev.backbone.test", "/nats", &1)
        .await?;
    let mut held = tokio::time::timeout(Duration::from_secs(10), first.next())
        .await
        .context("no delivery")?
        .context("the subscription ended")??;
    second.close().await?;
    expect(2, "one subscription closed").await?;
    first.close().await?;
    expect(2, "a closed subscription with an unsettled delivery").await?;
    held.ack().await?;
    drop(held);
    expect(1, "every subscription and delivery gone").await?;

    Subscriber::close(&broker).await?;
    server.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
