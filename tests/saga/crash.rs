//! The saga coordinator as a separate process (`saga-proc`), SIGKILLed at
//! random points and restarted while 1,000 sagas run, with participants in
//! this process over NATS JetStream. Every saga must end as its script
//! says (completed, or compensated in reverse order), none may be left
//! running, and no step may take effect twice.
//!
//! `source tests/harness/up.sh && cargo test -p e2e --test saga_crash`

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use broker_adapters::nats::{NatsBroker, NatsConfig};
use broker_adapters::{Publisher, Subscriber, Topic};
use orchestrator::saga::{CoordinatorConfig, Definitions};
use support::{Act, Backend, Db, participant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_coordinator_killed_at_random_loses_nothing() -> anyhow::Result<()> {
    killed_at_random(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_coordinator_killed_at_random_loses_nothing() -> anyhow::Result<()> {
    killed_at_random(Backend::Sqlite).await
}

const SAGAS: u32 = 1_000;
const WAIT: Duration = Duration::from_secs(300);
/// Kills every run makes at the least.
const MIN_KILLS: u32 = 5;

/// A `saga-proc` child; SIGKILLed when dropped.
struct SagaProc {
    child: Option<Child>,
    log: PathBuf,
}

impl SagaProc {
    fn start(db_url: &str, nats_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!("{}.log", e2e::unique_name("saga_proc")));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_saga-proc"))
            .args([
                "--database-url",
                db_url,
                "--nats-url",
                nats_url,
                "--prefix",
                prefix,
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting saga-proc")?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("saga-proc exited with {status}:\n{log}");
        }
        Ok(())
    }
}

impl Drop for SagaProc {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A small pseudo-random sequence (xorshift), seeded from the clock and
/// printed so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

async fn killed_at_random(backend: Backend) -> anyhow::Result<()> {
    let nats_url = e2e::require(e2e::Server::Nats)?;
    let db = Db::open(backend).await?;
    let prefix = format!("{}.", e2e::unique_name("sagacrash"));
    let broker = Arc::new(
        NatsBroker::connect(
            NatsConfig::builder()
                .url(&nats_url)
                .request_timeout(Duration::from_secs(2)),
        )
        .await?,
    );
    let relay = db.relay(broker.clone() as Arc<dyn Publisher>)?;
    let script: support::Script = Arc::new(|cmd| {
        let n: u32 = cmd
            .saga
            .saga_id
            .trim_start_matches("o-")
            .parse()
            .unwrap_or(0);
        if cmd.saga.step == "ship" && n.is_multiple_of(5) {
            Act::Fail { retryable: false }
        } else {
            Act::Succeed
        }
    });
    let up = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    for topic in ["inventory", "payment", "shipping"] {
        let topic = format!("{prefix}{topic}");
        tasks.push(
            participant(
                &db,
                broker.as_ref() as &dyn Subscriber,
                &topic,
                script.clone(),
                up.clone(),
            )
            .await?,
        );
    }
    // Starting sagas and reading them needs no running coordinator.
    let defs = Definitions::new().with(support::def::order_saga(
        &prefix,
        1,
        Duration::from_millis(10_000),
        30,
    )?)?;
    let replies = Topic::try_from(format!("{prefix}replies").as_str())?;
    let reader = db.coordinator(defs, CoordinatorConfig::new(replies));

    let seed = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64 | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let mut proc = SagaProc::start(db.url(), &nats_url, &prefix)?;
    let mut kills = 0;
    let started = tokio::time::Instant::now();
    let mut next = 0;
    let counts = loop {
        // Start the sagas in slices while the coordinator lives and dies.
        let open_now: i64 = reader
            .counts()
            .await?
            .iter()
            .filter(|(s, _)| s == "running" || s == "compensating")
            .map(|(_, n)| *n)
            .sum();
        let upto = if open_now < 200 {
            (next + 100).min(SAGAS)
        } else {
            next
        };
        for i in next..upto {
            reader
                .start(
                    "order",
                    &format!("o-{i}"),
                    serde_json::json!({ "sku": i, "amount": 1 }),
                )
                .await?;
        }
        next = upto;
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1700))).await;
        let counts: HashMap<String, i64> = reader.counts().await?.into_iter().collect();
        let open = counts.get("running").copied().unwrap_or(0)
            + counts.get("compensating").copied().unwrap_or(0);
        if next == SAGAS && open == 0 {
            break counts;
        }
        ensure!(
            started.elapsed() < WAIT,
            "not finished after {kills} kills: {counts:?}"
        );
        proc.check_alive()?;
        // The first MIN_KILLS chances always kill (each slice of at most
        // 100 starts gives one, so there are at least nine); later ones
        // kill at random.
        if kills < 40 && (kills < MIN_KILLS || rng.below(4) > 0) {
            proc.kill()?;
            kills += 1;
            proc = SagaProc::start(db.url(), &nats_url, &prefix)?;
        }
    };
    eprintln!("{kills} kills in {:?}: {counts:?}", started.elapsed());
    ensure!(kills >= MIN_KILLS, "only {kills} kills");
    ensure!(counts.get("completed") == Some(&800), "{counts:?}");
    ensure!(counts.get("compensated") == Some(&200), "{counts:?}");
    ensure!(db.double_effects().await? == 0, "a step took effect twice");
    // Every saga's effects: its forward steps, then (if compensated) the
    // compensations of those same steps in reverse order.
    for i in 0..SAGAS {
        let effects = db.effects(&format!("o-{i}")).await?;
        let effects: Vec<(&str, &str)> = effects
            .iter()
            .map(|(s, p)| (s.as_str(), p.as_str()))
            .collect();
        let expected: &[(&str, &str)] = if i % 5 == 0 {
            &[
                ("reserve", "forward"),
                ("charge", "forward"),
                ("charge", "compensate"),
                ("reserve", "compensate"),
            ]
        } else {
            &[
                ("reserve", "forward"),
                ("charge", "forward"),
                ("ship", "forward"),
            ]
        };
        ensure!(effects == expected, "o-{i}: {effects:?}");
    }
    drop(proc);
    for t in tasks {
        t.abort();
    }
    let _ = relay.shutdown().await;
    db.close().await;
    Ok(())
}
