//! Our schema registry, as the `schema-registry` binary on a free loopback
//! port, driven by Confluent's own Python client
//! (`confluent_kafka.schema_registry.SchemaRegistryClient`, see
//! `registry_peer.py`): register, look up by id, check compatibility,
//! change the configuration, see an incompatible schema refused (409),
//! delete. Then the binary's own surface: health, auth for writes, size
//! limit, and state kept across a restart.
//!
//! Never skips: without `python3` and the client's packages
//! (`tests/interop/requirements.txt`) the test fails.

#[path = "../registry/server.rs"]
mod server;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/registry_peer.py");
const PEER_LIMIT: Duration = Duration::from_secs(60);

/// Runs the peer against `url`; its report lines.
fn run_peer(url: &str, subject: &str) -> anyhow::Result<(bool, Vec<Value>, String)> {
    let mut child = Command::new("python3")
        .args([PEER, url, server::TOKEN, subject])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting python3 (install it and tests/interop/requirements.txt)")?;
    let deadline = Instant::now() + PEER_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the Python registry peer ran longer than {PEER_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let lines = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok((status.success(), lines, format!("{stdout}\n{stderr}")))
}

#[tokio::test(flavor = "multi_thread")]
async fn confluent_python_client_against_the_binary() -> anyhow::Result<()> {
    let dir = server::scratch("registry_interop")?;
    let database = format!("sqlite:{}", dir.join("registry.db").display());
    let mut registry = server::process(&dir, &database)?;
    registry.start().await?;
    let base = format!("http://127.0.0.1:{}", registry.port());

    // The peer, in a blocking thread: it takes a few seconds.
    let url = base.clone();
    let (ok, steps, output) =
        tokio::task::spawn_blocking(move || run_peer(&url, "com.example.order.placed")).await??;
    let expected = [
        "register",
        "register again",
        "get by id",
        "latest",
        "lookup",
        "types",
        "compatible",
        "incompatible",
        "rejected",
        "register v2",
        "versions",
        "global config",
        "set config",
        "subject config",
        "register under NONE",
        "missing version",
        "missing subject",
        "avro refused",
        "delete version",
        "soft delete subject",
        "hard delete subject",
        "subjects",
    ];
    let done: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
    let failed: Vec<&Value> = steps.iter().filter(|s| s["ok"] != json!(true)).collect();
    ensure!(
        ok && failed.is_empty() && done == expected,
        "the Confluent client saw a difference: failed steps {failed:?}\nfull output:\n{output}"
    );
    let rejected = steps
        .iter()
        .find(|s| s["step"] == "rejected")
        .cloned()
        .unwrap_or_default();
    assert_eq!(rejected["http_status"], json!(409), "{rejected}");

    // The binary's own surface.
    let http = reqwest::Client::new();
    let health: Value = http
        .get(format!("{base}/health"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(health, json!({"status": "UP"}));
    let body = json!({"schema": "{\"type\": \"string\"}", "schemaType": "JSON"}).to_string();
    let anonymous = http
        .post(format!("{base}/subjects/kept/versions"))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(anonymous.status().as_u16(), 401);
    let wrong = http
        .post(format!("{base}/subjects/kept/versions"))
        .bearer_auth("not-the-token")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(wrong.status().as_u16(), 401);
    let kept = http
        .post(format!("{base}/subjects/kept/versions"))
        .bearer_auth(server::TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    assert_eq!(kept.status().as_u16(), 200);
    let kept: Value = kept.json().await?;
    let huge = json!({"schema": json!({"type": "string", "description": "x".repeat(70_000)}).to_string(), "schemaType": "JSON"});
    let refused = http
        .post(format!("{base}/subjects/huge/versions"))
        .bearer_auth(server::TOKEN)
        .header("content-type", "application/json")
        .body(huge.to_string())
        .send()
        .await?;
    assert_eq!(refused.status().as_u16(), 413);
    let refused: Value = refused.json().await?;
    assert_eq!(refused["error_code"], json!(42201), "{refused}");

    // State survives a restart: same id, same versions.
    registry.stop().await?;
    registry.start().await?;
    let again: Value = http
        .get(format!("{base}/subjects/kept/versions/latest"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(again["id"], kept["id"]);
    let subjects: Value = http
        .get(format!("{base}/subjects"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(subjects, json!(["kept"]));
    registry.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
