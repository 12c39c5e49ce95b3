//! NATS JetStream across a server restart: the test runs its own
//! nats-server (file storage, a free loopback port), stops it mid-stream
//! and starts it again; no event whose publish returned `Ok` may be lost.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_events_survive_a_nats_server_restart() -> anyhow::Result<()> {
    let program = find_program("nats-server", &["/usr/sbin/nats-server", "/usr/bin/nats-server"])
        .context(
            "nats-server is not installed: `source tests/harness/up.sh` installs it (Debian package nats-server)",
        )?;
    let port = free_port()?;
    let dir = std::env::temp_dir().join(e2e::unique_name("e2e-nats-restart"));
    std::fs::create_dir_all(&dir)?;
    let args = vec![
        "-a".to_owned(),
        "127.0.0.1".to_owned(),
        "-p".to_owned(),
        port.to_string(),
        "-js".to_owned(),
        "-sd".to_owned(),
        dir.join("store").display().to_string(),
    ];
    let mut server = ServerProcess::new("nats-server", program, args, port, dir.join("server.log"));
    server.start().await?;

    let config = || {
        NatsConfig::builder()
            .url(format!("nats://127.0.0.1:{port}"))
            .storage(Storage::File)
            .request_timeout(Duration::from_secs(2))
    };
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
