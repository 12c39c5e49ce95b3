//! Runs the `schema-registry` binary as a child process for the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use e2e::process::{ServerProcess, free_port};

/// The bearer token the test registries are configured with.
pub(crate) const TOKEN: &str = "e2e-registry-token";

/// Builds the `schema-registry` binary (a no-op when it is up to date) and
/// returns its path.
pub(crate) fn binary() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "-p",
            "schemas",
            "--bin",
            "schema-registry",
            "--message-format=json",
        ])
        .output()
        .context("running cargo build for the schema-registry binary")?;
    if !output.status.success() {
        bail!(
            "cargo build -p schemas --bin schema-registry failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["target"]["name"] == "schema-registry"
            && let Some(exe) = message["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo build did not report the schema-registry executable")
}

/// A registry process on a free loopback port, its state in `dir`,
/// configured by a TOML file (token, size limit) and flags (listen, database).
pub(crate) fn process(dir: &Path, database_url: &str) -> anyhow::Result<ServerProcess> {
    let port = free_port()?;
    let config = dir.join("registry.toml");
    std::fs::write(
        &config,
        format!("token = \"{TOKEN}\"\nmax_schema_bytes = 65536\ncompatibility = \"BACKWARD\"\n"),
    )?;
    Ok(ServerProcess::new(
        "schema-registry",
        binary()?,
        vec![
            "--config".into(),
            config.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--database-url".into(),
            database_url.to_owned(),
        ],
        port,
        dir.join("registry.log"),
    ))
}

/// A fresh directory for one test's files.
pub(crate) fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(e2e::unique_name(name));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
