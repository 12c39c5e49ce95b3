//! The `saga-coordinator` binary as users run it: a process of its own,
//! driven over HTTP, with participants in this process reaching it through
//! the broker only. On the embedded default (SQLite, the SQL broker on the
//! same file) and in the production shape (PostgreSQL, NATS JetStream, two
//! instances). PostgreSQL and NATS come from `DATABASE_URL` and `NATS_URL`
//! (started by `tests/harness/up.sh`); a test fails, naming the server,
//! when one cannot be reached.

use std::io::{BufRead as _, BufReader};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
use broker_adapters::nats::{NatsBroker, NatsConfig};
use broker_adapters::prelude::*;
use broker_adapters::sql::{SqlBroker, SqlConfig};
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use orchestrator::saga::{Participant, ReplyError, StepReply};
use orchestrator::{Outbox, OutboxConfig, RelayConfig, RelayHandle};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);

/// The order saga of `examples/sagas/order.yaml`, on topics of this run, with
/// short timeouts.
fn definition(run: &str) -> String {
    let action = |ty: &str, topic: &str, extra: &str| {
        format!(
            "      type: com.example.{ty}\n      topic: {run}-{topic}\n      success: [com.example.{ty}.done]\n      failure: [com.example.{ty}.failed]\n      timeout_ms: 20000\n{extra}"
        )
    };
    let retry = "      retry: { max_attempts: 3, initial_backoff_ms: 50, max_backoff_ms: 500 }\n";
    format!(
        "name: order\nversion: 1\nsteps:\n  - name: reserve\n    command:\n{}    compensation:\n{}  - name: charge\n    command:\n{}    compensation:\n{}  - name: ship\n    command:\n{}",
        action(
            "inventory.reserve",
            "inventory",
            "      input: { sku: /sku }\n"
        ),
        action("inventory.release", "inventory", retry),
        action(
            "payment.charge",
            "payment",
            "      input: { amount: /amount }\n"
        ),
        action("payment.refund", "payment", retry),
        action("shipping.ship", "shipping", ""),
    )
}

/// Fails naming the server when nothing listens at `url`.
fn require(what: &str, url: &str, default_port: u16) -> anyhow::Result<()> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host_port = host_port.split(['/', '?']).next().unwrap_or(host_port);
    let addr = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    let reachable = addr.to_socket_addrs().ok().is_some_and(|mut addrs| {
        addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
    });
    ensure!(
        reachable,
        "{what} is not reachable at {url} (start it with `source tests/harness/up.sh`)"
    );
    Ok(())
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn run_id() -> String {
    format!("svc{}", uuid::Uuid::now_v7().simple())
}

/// A `saga-coordinator` process; killed when dropped.
struct Coordinator {
    child: Child,
    base: String,
}

impl Coordinator {
    fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_saga-coordinator"));
        cmd.current_dir(dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("start saga-coordinator")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(base) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("saga-coordinator did not start: {line:?}");
        };
        Ok(Self {
            base: base.to_owned(),
            child,
        })
    }

    /// SIGTERM, then the exit status within `within`.
    fn terminate(mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
        ensure!(sent.success(), "kill -TERM {pid}");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "saga-coordinator did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The participants' side: their own database (outbox, inbox, relay) and
/// the broker.
#[derive(Clone)]
enum Part {
    Lite(Participant<sqlx::Sqlite>),
    Pg(Participant<sqlx::Postgres>),
}

/// What a participant does with a command: reply, or keep it unanswered.
fn decide(cmd: &orchestrator::saga::SagaCommand) -> Option<StepReply> {
    let amount = cmd.data.get("amount").and_then(Value::as_i64).unwrap_or(0);
    if cmd.command_type == "com.example.payment.charge" && amount == 13 {
        return None; // never answered: the saga waits until cancelled
    }
    if cmd.command_type == "com.example.payment.charge" && amount > 1000 {
        return Some(StepReply::Failure {
            reply_type: "com.example.payment.charge.failed".into(),
            error: ReplyError {
                code: "declined".into(),
                message: "over the limit".into(),
                retryable: false,
            },
        });
    }
    Some(StepReply::Success {
        reply_type: format!("{}.done", cmd.command_type),
        data: json!({ "by": cmd.command_type }),
    })
}

async fn participate(
    part: &Part,
    event: &broker_adapters::cloudevents::Event,
) -> anyhow::Result<()> {
    let cmd = orchestrator::saga::SagaCommand::from_event(event)?;
    let Some(reply) = decide(&cmd) else {
        return Ok(());
    };
    match part {
        Part::Lite(p) => {
            let _handled = p
                .handle(event, move |_, _| -> BoxFuture<'_, _> {
                    Box::pin(async move { Ok(reply) })
                })
                .await?;
        }
        Part::Pg(p) => {
            let _handled = p
                .handle(event, move |_, _| -> BoxFuture<'_, _> {
                    Box::pin(async move { Ok(reply) })
                })
                .await?;
        }
    }
    Ok(())
}

struct Participants {
    tasks: Vec<JoinHandle<()>>,
    relay: RelayHandle,
}

impl Participants {
    async fn start(
        run: &str,
        part: Part,
        relay: orchestrator::Relay,
        broker: Arc<dyn Subscriber>,
    ) -> anyhow::Result<Self> {
        let mut tasks = Vec::new();
        for service in ["inventory", "payment", "shipping"] {
            let topic = Topic::try_from(format!("{run}-{service}").as_str())?;
            let mut sub = broker
                .subscribe(&topic, SubscribeOptions::new(service)?)
                .await?;
            let part = part.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(Ok(mut delivery)) = sub.next().await {
                    match participate(&part, delivery.event()).await {
                        Ok(()) => {
                            let _ = delivery.ack().await;
                        }
                        Err(_) => {
                            let _ = delivery.nack(Some(Duration::from_millis(50))).await;
                        }
                    }
                }
            }));
        }
        Ok(Self {
            tasks,
            relay: relay.spawn(),
        })
    }

    async fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
        let _ = self.relay.shutdown().await;
    }
}

async fn status(http: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<(u16, Value)> {
    let r = http.get(format!("{base}/sagas/{id}")).send().await?;
    Ok((r.status().as_u16(), r.json().await?))
}

async fn settled(http: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, saga) = status(http, base, id).await?;
        ensure!(code == 200, "GET /sagas/{id}: {code} {saga}");
        let s = saga["state"]["status"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if !matches!(s.as_str(), "running" | "compensating") {
            return Ok(s);
        }
        ensure!(
            Instant::now() < deadline,
            "saga {id} did not settle: {saga}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get_json(http: &reqwest::Client, url: String) -> anyhow::Result<Value> {
    Ok(http.get(url).send().await?.json().await?)
}

async fn post(
    http: &reqwest::Client,
    url: String,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut r = http.post(url);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await?;
    Ok((r.status().as_u16(), r.json().await?))
}

/// Starts sagas over HTTP on the coordinators at `bases` (round robin) and
/// checks every outcome, cancel, retry, listing, bad requests, readiness
/// and metrics.
async fn drive(bases: &[String], token: Option<&str>) -> anyhow::Result<()> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse()?,
        );
        // Writes without the token are refused; reads stay open.
        let anonymous = reqwest::Client::new();
        let (code, body) = post(
            &anonymous,
            format!("{}/sagas", bases[0]),
            Some(json!({ "type": "order", "data": {} })),
        )
        .await?;
        ensure!(
            code == 401 && body["code"] == "unauthorized",
            "{code} {body}"
        );
        let listed = anonymous.get(format!("{}/sagas", bases[0])).send().await?;
        ensure!(listed.status() == 200);
    }
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()?;
    let base = &bases[0];
    let order = |amount: i64| json!({ "sku": "sku-1", "amount": amount });
    // Completed, and declined (compensated), spread over the instances.
    let mut ids = Vec::new();
    for i in 0..10 {
        let amount = if i % 3 == 2 { 5000 } else { 100 + i };
        let at = &bases[i as usize % bases.len()];
        let (code, body) = post(
            &http,
            format!("{at}/sagas"),
            Some(json!({ "type": "order", "id": format!("o-{i}"), "data": order(amount) })),
        )
        .await?;
        ensure!(code == 201, "start: {code} {body}");
        ensure!(body["version"] == 1, "{body}");
        ids.push((format!("o-{i}"), amount));
    }
    for (id, amount) in &ids {
        let want = if *amount > 1000 {
            "compensated"
        } else {
            "completed"
        };
        ensure!(settled(&http, base, id).await? == want, "{id}");
    }
    let (_, saga) = status(&http, base, "o-0").await?;
    ensure!(
        saga["state"]["data"]["results"]["charge"]["by"] == "com.example.payment.charge",
        "{saga}"
    );
    let h: Value = get_json(&http, format!("{base}/sagas/o-2/history")).await?;
    let notes: Vec<&str> = h["history"]
        .as_array()
        .context("history")?
        .iter()
        .filter_map(|e| e["note"].as_str())
        .collect();
    ensure!(
        notes
            .last()
            .is_some_and(|n| n.contains("step `reserve` compensated")),
        "{notes:?}"
    );

    // A saga whose charge is never answered, cancelled by a person.
    let (code, started) = post(
        &http,
        format!("{base}/sagas"),
        Some(json!({ "type": "order", "data": order(13) })),
    )
    .await?;
    ensure!(code == 201, "{started}");
    let id = started["saga_id"]
        .as_str()
        .context("generated id")?
        .to_owned();
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, saga) = status(&http, base, &id).await?;
        if saga["state"]["status"]["step"] == 1 {
            break;
        }
        ensure!(Instant::now() < deadline, "{saga}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = post(&http, format!("{base}/sagas/{id}/retry"), None).await?;
    ensure!(
        code == 409 && body["code"] == "not_applicable",
        "{code} {body}"
    );
    let (code, body) = post(
        &http,
        format!("{base}/sagas/{id}/cancel"),
        Some(json!({ "reason": "customer withdrew" })),
    )
    .await?;
    ensure!(code == 200, "{code} {body}");
    ensure!(settled(&http, base, &id).await? == "compensated");
    let (_, saga) = status(&http, base, &id).await?;
    ensure!(saga["state"]["failure"]["code"] == "cancelled", "{saga}");
    let (code, _) = post(&http, format!("{base}/sagas/{id}/cancel"), None).await?;
    ensure!(code == 409, "cancel after the end: {code}");

    // Listing, a page at a time, and by status.
    let page: Value = get_json(&http, format!("{base}/sagas?limit=4")).await?;
    ensure!(page["sagas"].as_array().map(Vec::len) == Some(4), "{page}");
    let next = page["next"].as_str().context("next")?;
    let rest: Value = get_json(&http, format!("{base}/sagas?limit=100&after={next}")).await?;
    ensure!(rest["sagas"].as_array().map(Vec::len) == Some(7), "{rest}");
    let compensated: Value = get_json(&http, format!("{base}/sagas?status=compensated")).await?;
    ensure!(
        compensated["sagas"].as_array().map(Vec::len) == Some(4),
        "{compensated}"
    );

    // Bad requests get a clear answer and change nothing.
    for (body, code, want) in [
        (
            json!({ "type": "nope", "data": {} }),
            422,
            "unknown_saga_type",
        ),
        (
            json!({ "type": "order", "id": "o-0", "data": order(1) }),
            409,
            "saga_exists",
        ),
        (json!({ "type": "order", "data": [1, 2] }), 422, "invalid"),
        (json!({ "kind": "order" }), 400, "bad_request"),
    ] {
        let (got, answer) = post(&http, format!("{base}/sagas"), Some(body)).await?;
        ensure!(got == code && answer["code"] == want, "{got} {answer}");
    }
    let garbage = http
        .post(format!("{base}/sagas"))
        .body("{not json")
        .send()
        .await?;
    ensure!(garbage.status().as_u16() == 400);
    let (code, _) = status(&http, base, "missing").await?;
    ensure!(code == 404);
    let (code, _) = post(&http, format!("{base}/sagas/missing/cancel"), None).await?;
    ensure!(code == 404);
    let all: Value = get_json(&http, format!("{base}/sagas")).await?;
    ensure!(all["sagas"].as_array().map(Vec::len) == Some(11), "{all}");

    // Operations.
    for b in bases {
        ensure!(http.get(format!("{b}/healthz")).send().await?.status() == 200);
        ensure!(http.get(format!("{b}/readyz")).send().await?.status() == 200);
    }
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(metrics.contains("saga_started_total"), "{metrics}");
    ensure!(metrics.contains("saga_cancelled_total 1"), "{metrics}");
    let defs: Value = get_json(&http, format!("{base}/definitions")).await?;
    ensure!(
        defs["definitions"][0]["steps"] == json!(["reserve", "charge", "ship"]),
        "{defs}"
    );
    Ok(())
}

fn write_definitions(dir: &Path, run: &str) -> anyhow::Result<PathBuf> {
    let defs = dir.join("sagas");
    std::fs::create_dir_all(&defs)?;
    std::fs::write(defs.join("order.yaml"), definition(run))?;
    Ok(defs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_sqlite_and_the_sql_broker() -> anyhow::Result<()> {
    let run = run_id();
    let dir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&dir)?;
    let defs = write_definitions(&dir, &run)?;
    // Nothing but the definitions: the database file and the broker's
    // tables in it are created in the working directory.
    let coordinator = Coordinator::spawn(
        &dir,
        &["--definitions", defs.to_str().context("path")?],
        &[("SAGA_COORDINATOR_TOKEN", "s3cret")],
    )?;
    let db = dir.join("saga-coordinator.db");
    ensure!(db.exists(), "the default database file");

    // The participants: their own database, the broker on the coordinator's.
    let broker: Arc<SqlBroker> = Arc::new(
        SqlBroker::connect(SqlConfig::builder().url(format!("sqlite://{}", db.display()))).await?,
    );
    let pool = orchestrator::sqlite::connect(&format!(
        "sqlite://{}",
        dir.join("participants.db").display()
    ))
    .await?;
    orchestrator::sqlite::migrate(&pool).await?;
    let outbox = Outbox::sqlite(pool.clone(), OutboxConfig::new()).await?;
    let relay = outbox.relay(broker.clone(), RelayConfig::new())?;
    let part = Part::Lite(Participant::sqlite(pool.clone(), outbox, "services"));
    let participants = Participants::start(&run, part, relay, broker.clone()).await?;

    let outcome = drive(std::slice::from_ref(&coordinator.base), Some("s3cret")).await;
    participants.stop().await;
    let exit = coordinator.terminate(Duration::from_secs(15))?;
    Publisher::close(&*broker).await?;
    pool.close().await;
    outcome?;
    ensure!(exit.success(), "graceful shutdown: {exit}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_nats_with_two_instances() -> anyhow::Result<()> {
    on_postgres(Transport::Nats, 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_kafka() -> anyhow::Result<()> {
    on_postgres(Transport::Kafka, 1).await
}

#[derive(Clone, Copy)]
enum Transport {
    Nats,
    Kafka,
}

fn kafka_servers() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The production shape: `instances` coordinators on one PostgreSQL
/// database, commands and replies over `transport`, the participants on a
/// database of their own.
async fn on_postgres(transport: Transport, instances: usize) -> anyhow::Result<()> {
    let url = database_url();
    require("PostgreSQL", &url, 5432)?;
    let (name, env) = match transport {
        Transport::Nats => {
            require("NATS", &nats_url(), 4222)?;
            ("nats", vec![("NATS_URL", nats_url())])
        }
        Transport::Kafka => {
            require("Kafka", &kafka_servers(), 9092)?;
            (
                "kafka",
                vec![
                    ("KAFKA_BOOTSTRAP_SERVERS", kafka_servers()),
                    // A consumer-group join takes about half of it on Tansu.
                    ("KAFKA_SESSION_TIMEOUT_MS", "6000".to_owned()),
                ],
            )
        }
    };
    let run = run_id();
    let dir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&dir)?;
    let defs = write_definitions(&dir, &run)?;

    // A database of its own for the coordinators, one for the participants.
    let admin = sqlx::PgPool::connect(&url).await?;
    let (base_url, _) = url.rsplit_once('/').context("database url")?;
    for db in [&run, &format!("{run}p")] {
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {db}")))
            .execute(&admin)
            .await?;
    }
    let outcome = async {
        let coordinator_db = format!("{base_url}/{run}");
        let reply_topic = format!("{run}-replies");
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let args = [
            "--definitions",
            defs.to_str().context("path")?,
            "--database-url",
            &coordinator_db,
            "--broker",
            name,
            "--reply-topic",
            &reply_topic,
        ];
        let coordinators = (0..instances)
            .map(|_| Coordinator::spawn(&dir, &args, &env))
            .collect::<anyhow::Result<Vec<_>>>()?;

        let broker: Arc<dyn Broker> = match transport {
            Transport::Nats => {
                Arc::new(NatsBroker::connect(NatsConfig::builder().url(nats_url())).await?)
            }
            Transport::Kafka => Arc::new(
                KafkaBroker::connect(
                    KafkaConfig::builder(kafka_servers().split(','))
                        .session_timeout(Duration::from_secs(6)),
                )
                .await?,
            ),
        };
        let pool = sqlx::PgPool::connect(&format!("{base_url}/{run}p")).await?;
        orchestrator::postgres::migrate(&pool).await?;
        let outbox = Outbox::postgres(pool.clone(), OutboxConfig::new()).await?;
        let relay = outbox.relay(broker.clone().publisher(), RelayConfig::new())?;
        let part = Part::Pg(Participant::postgres(pool.clone(), outbox, "services"));
        let participants =
            Participants::start(&run, part, relay, broker.clone().subscriber()).await?;

        let bases: Vec<String> = coordinators.iter().map(|c| c.base.clone()).collect();
        let outcome = drive(&bases, None).await;
        participants.stop().await;
        let exits = coordinators
            .into_iter()
            .map(|c| c.terminate(Duration::from_secs(15)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        broker.clone().publisher().close().await?;
        pool.close().await;
        outcome?;
        for exit in exits {
            ensure!(exit.success(), "graceful shutdown: {exit}");
        }
        anyhow::Ok(())
    }
    .await;
    for db in [&run, &format!("{run}p")] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists {db} with (force)"
        )))
        .execute(&admin)
        .await?;
    }
    admin.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// A broker as both halves.
trait Broker: Publisher + Subscriber {
    fn publisher(self: Arc<Self>) -> Arc<dyn Publisher>;
    fn subscriber(self: Arc<Self>) -> Arc<dyn Subscriber>;
}

impl<B: Publisher + Subscriber + 'static> Broker for B {
    fn publisher(self: Arc<Self>) -> Arc<dyn Publisher> {
        self
    }
    fn subscriber(self: Arc<Self>) -> Arc<dyn Subscriber> {
        self
    }
}

#[test]
fn bad_configuration_fails_at_once_naming_the_cause() -> anyhow::Result<()> {
    let run = run_id();
    let dir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&dir)?;
    let bad_def = dir.join("bad.yaml");
    std::fs::write(
        &bad_def,
        "name: order\nversion: 1\nsteps:\n  - name: reserve\n    command:\n      type: ''\n      topic: inventory\n      success: [ok]\n",
    )?;
    let bad_def = bad_def.to_str().context("path")?.to_owned();
    let good_def = dir.join("good.yaml");
    std::fs::write(&good_def, definition(&run))?;
    let good_def = good_def.to_str().context("path")?.to_owned();
    for (args, want) in [
        (vec![], "no saga definitions"),
        (
            vec!["--definitions", "/nonexistent/sagas.yaml"],
            "/nonexistent/sagas.yaml",
        ),
        (vec!["--definitions", bad_def.as_str()], "bad.yaml"),
        (
            vec!["--definitions", good_def.as_str(), "--broker", "pigeon"],
            "`pigeon` is not one of sql, kafka, nats",
        ),
        (vec!["--listen", "nowhere"], "`nowhere` is not ip:port"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_saga-coordinator"))
            .current_dir(&dir)
            .args(&args)
            .env("RUST_LOG", "off")
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{args:?} started");
        ensure!(stderr.contains(want), "{args:?}: {stderr}");
    }
    // An invalid definition is named down to the step and field.
    let out = Command::new(env!("CARGO_BIN_EXE_saga-coordinator"))
        .current_dir(&dir)
        .args(["--definitions", &bad_def])
        .env("RUST_LOG", "off")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("reserve") && stderr.contains("type"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
