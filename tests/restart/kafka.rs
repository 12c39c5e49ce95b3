//! Kafka across a broker restart: the test runs its own Tansu with SQLite
//! storage on a free loopback port, stops it mid-stream and starts it again;
//! no event whose publish returned `Ok` may be lost.
//!
//! A slow test, not run by `cargo test` (it needs a Tansu built with SQLite
//! storage, which takes about 20 minutes to build once):
//!
//! ```sh
//! export TANSU_SQLITE=$(bash tests/harness/install-tansu-sqlite.sh)
//! cargo test -p e2e --test restart_kafka
//! ```
//!
//! or `bash .ci/run --slow`.
//!
//! Status: Tansu 0.6's SQLite storage panics inside the broker under this
//! workload (`tansu-storage` `service.rs:337` "entered unreachable code" on a
//! group update, `lite.rs:503` "more or less than one row" on a produce), so
//! today this test fails on the broker's side, before and after the restart.
//! Point it at any persistent Kafka-protocol broker to run it meaningfully.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use broker_adapters::Topic;
use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
use e2e::process::{ServerProcess, free_port};
use e2e::restart::acked_events_survive_a_broker_restart;

const EVENTS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_events_survive_a_kafka_broker_restart() -> anyhow::Result<()> {
    let program = std::env::var_os("TANSU_SQLITE").context(
        "TANSU_SQLITE is not set: run `export TANSU_SQLITE=$(bash tests/harness/install-tansu-sqlite.sh)` \
         (the pip-packaged Tansu keeps data in memory only, so it cannot survive a restart)",
    )?;
    let port = free_port()?;
    let dir = std::env::temp_dir().join(e2e::unique_name("e2e-kafka-restart"));
    std::fs::create_dir_all(&dir)?;
    let listener = format!("tcp://127.0.0.1:{port}");
    let args = vec![
        "broker".to_owned(),
        "--listener-url".to_owned(),
        listener.clone(),
        "--advertised-listener-url".to_owned(),
        listener,
        "--storage-engine".to_owned(),
        // Tansu resolves the database path against its working directory.
        "sqlite://tansu.db".to_owned(),
    ];
    let mut server =
        ServerProcess::new("tansu", program, args, port, dir.join("server.log")).in_dir(&dir);
    server.start().await?;

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
        &mut server,
        EVENTS,
    )
    .await?;
    println!("{report:?}");
    assert_eq!(
        report.delivered, EVENTS,
        "every acknowledged event delivered"
    );

    server.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
