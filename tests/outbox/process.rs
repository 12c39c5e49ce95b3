//! The outbox relay as a separate process (`relay-proc`), relaying from
//! PostgreSQL or SQLite to NATS JetStream, while a consumer in this process
//! applies every delivery through the inbox:
//!
//! - the relay is killed with SIGKILL mid-stream and started again;
//! - two relay processes run at once;
//! - the broker (its own: a NATS server with file storage, stopped; or a
//!   Tansu on S3 storage, killed with SIGKILL: not run by default, see
//!   `kafka_crash`) is started again mid-stream;
//! - the broker (NATS, and Kafka: a Tansu on S3 storage) stays down while
//!   40 MB of rows pile up: the relay's resident memory does not grow with
//!   them, nor with its retries;
//! - deliveries are left unacknowledged on purpose and come again.
//!
//! Each checks that no event is lost, the order per partition key is kept,
//! and no event has a duplicate effect.
//!
//! `source tests/harness/up.sh && cargo test -p e2e --test outbox_process`

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use broker_adapters::cloudevents::{AttributesReader, Event};
use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
use broker_adapters::nats::{NatsBroker, NatsConfig, Storage};
use broker_adapters::{CloudEventBuilder, EventExt, SubscribeOptions, Subscriber, Topic};
use e2e::process::{ServerProcess, find_program, free_port};
use e2e::tansu::S3Tansu;
use futures_util::StreamExt;
use orchestrator::{OutboxConfig, Processed};
use support::{Backend, Db, check_order_ids, event};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

macro_rules! both {
    ($($scenario:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    super::$scenario(super::Backend::Postgres).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    super::$scenario(super::Backend::Sqlite).await
                }
            )*
        }
    };
}

both!(
    relay_killed_mid_batch_republishes_on_restart,
    two_relay_processes_lose_nothing_and_keep_order,
    nats_server_restart_loses_nothing,
    relay_memory_stays_flat_while_the_broker_is_down,
    relay_memory_stays_flat_while_kafka_is_down,
    duplicate_deliveries_have_no_duplicate_effect,
);

const WAIT: Duration = Duration::from_secs(120);
const CONSUMER: &str = "billing";

/// The broker the relay publishes to and the consumer reads from.
#[derive(Clone, Debug)]
enum Target {
    /// NATS JetStream at this URL.
    Nats(String),
    /// Kafka with these bootstrap servers; the relay's producer idempotent
    /// or not.
    Kafka { bootstrap: String, idempotent: bool },
}

impl Target {
    fn nats(url: &str) -> Self {
        Self::Nats(url.to_owned())
    }

    /// A subscriber for the consumer (Kafka: with a short session timeout,
    /// so a member's join and the group's recovery take seconds).
    async fn subscriber(&self) -> anyhow::Result<Arc<dyn Subscriber>> {
        Ok(match self {
            Self::Nats(url) => Arc::new(
                NatsBroker::connect(
                    NatsConfig::builder()
                        .url(url)
                        .request_timeout(Duration::from_secs(2)),
                )
                .await?,
            ),
            Self::Kafka { bootstrap, .. } => Arc::new(
                KafkaBroker::connect(
                    KafkaConfig::builder([bootstrap.as_str()])
                        .session_timeout(Duration::from_secs(6))
                        .commit_interval(Duration::from_millis(100)),
                )
                .await?,
            ),
        })
    }
}

/// A `relay-proc` child process; killed (SIGKILL) when dropped.
struct RelayProc {
    child: Option<Child>,
    log: PathBuf,
}

impl RelayProc {
    fn start(db_url: &str, broker: &Target, id: &str, pause_ms: u64) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!("{}.log", e2e::unique_name("relay_proc")));
        let out = std::fs::File::create(&log)?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_relay-proc"));
        command.args(["--database-url", db_url, "--relay-id", id]);
        match broker {
            Target::Nats(url) => command.args(["--nats-url", url]),
            Target::Kafka {
                bootstrap,
                idempotent,
            } => command.args([
                "--kafka-bootstrap",
                bootstrap,
                "--kafka-idempotence",
                &idempotent.to_string(),
            ]),
        };
        let child = command
            .args(["--batch-size", "50", "--lease-ms", "3000"])
            .args(["--pause-ms", &pause_ms.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting relay-proc")?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    /// SIGKILL, and wait for the exit.
    fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The process's resident memory in KiB, from `/proc`.
    fn rss_kib(&self) -> anyhow::Result<u64> {
        let pid = self.child.as_ref().context("relay-proc was killed")?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
    }

    /// What it logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("relay-proc exited with {status}:\n{log}");
        }
        Ok(())
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[derive(Debug, Default)]
struct Stats {
    deliveries: AtomicU64,
    duplicates: AtomicU64,
    withheld: AtomicU64,
    /// Per partition key, the sequence number of each delivery in the order
    /// they came, duplicates included: what a failure shows.
    trail: Mutex<BTreeMap<String, Vec<String>>>,
    /// Subscriptions and their ends, each after how many deliveries.
    notes: Mutex<Vec<String>>,
}

impl Stats {
    fn record(&self, event: &Event) {
        self.trail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(event.partition_key().unwrap_or_default().to_owned())
            .or_default()
            .push(event.subject().unwrap_or("?").to_owned());
    }

    fn note(&self, what: &str) {
        let after = self.deliveries.load(Ordering::SeqCst);
        self.notes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(format!("after {after} deliveries: {what}"));
    }

    /// Each key's deliveries, in order, and the subscriptions' comings and
    /// goings.
    fn trail(&self) -> String {
        let trail = self.trail.lock().unwrap_or_else(PoisonError::into_inner);
        let notes = self.notes.lock().unwrap_or_else(PoisonError::into_inner);
        trail
            .iter()
            .map(|(key, seen)| format!("{key}: {}", seen.join(" ")))
            .chain(notes.iter().cloned())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Consumes `topic` as a service would: every delivery goes through the
/// inbox, then is acknowledged; with `withhold_every`, every n-th first
/// delivery is left unacknowledged after its effects committed and the
/// consumer subscribes again (a crash between commit and ack), so the broker
/// delivers it again.
struct Consumer {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    stats: Arc<Stats>,
}

impl Consumer {
    fn start(db: Arc<Db>, broker: Target, topic: Topic, withhold_every: Option<u64>) -> Self {
        let stop = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        let task = {
            let (stop, stats) = (stop.clone(), Arc::clone(&stats));
            tokio::spawn(async move {
                let broker = broker.subscriber().await?;
                let withheld = Mutex::new(HashSet::<String>::new());
                while !stop.is_cancelled() {
                    let options = SubscribeOptions::new(CONSUMER)?.ack_wait(Duration::from_secs(5));
                    let mut sub = match broker.subscribe(&topic, options).await {
                        Ok(sub) => {
                            stats.note("subscribed");
                            sub
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    };
                    loop {
                        let next = tokio::select! {
                            () = stop.cancelled() => return Ok(()),
                            next = sub.next() => next,
                        };
                        let mut delivery = match next {
                            Some(Ok(delivery)) => delivery,
                            Some(Err(e)) => {
                                stats.note(&format!("the subscription failed: {e:#}"));
                                break;
                            }
                            None => {
                                stats.note("the subscription ended");
                                break;
                            }
                        };
                        let n = stats.deliveries.fetch_add(1, Ordering::SeqCst) + 1;
                        stats.record(delivery.event());
                        let outcome = handle_with_retry(&db, delivery.event()).await?;
                        if outcome.is_duplicate() {
                            stats.duplicates.fetch_add(1, Ordering::SeqCst);
                        }
                        let withhold = withhold_every.is_some_and(|every| n % every == 0)
                            && withheld
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(delivery.event().id().to_owned());
                        if withhold {
                            // The ack is lost after the commit: the delivery
                            // is dropped unsettled, the consumer subscribes
                            // again, and the broker delivers the event again.
                            stats.withheld.fetch_add(1, Ordering::SeqCst);
                            drop(delivery);
                            // Closing (rather than dropping) waits until the
                            // unsettled messages are handed back in stream
                            // order, so the next subscription keeps per-key
                            // order.
                            let _ = sub.close().await;
                            break;
                        } else {
                            let _ = delivery.ack().await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(())
            })
        };
        Self { stop, task, stats }
    }

    async fn stop(self) -> anyhow::Result<Arc<Stats>> {
        self.stop.cancel();
        self.task.await??;
        Ok(self.stats)
    }
}

/// The inbox, retried in place on a transient database error so a later
/// event of the same key is never applied first.
async fn handle_with_retry(db: &Db, event: &Event) -> anyhow::Result<Processed<()>> {
    let mut attempts = 0;
    loop {
        match db.handle(CONSUMER, event, false).await {
            Ok(outcome) => return Ok(outcome),
            Err(e) if attempts < 50 => {
                attempts += 1;
                eprintln!("inbox attempt {attempts} for {} failed: {e:#}", event.id());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A unique topic on the NATS server at `url`, with its stream.
async fn provision(url: &str) -> anyhow::Result<Topic> {
    let topic = Topic::try_from(e2e::unique_name("outbox").replace('_', "-"))?;
    let broker = NatsBroker::connect(NatsConfig::builder().url(url).storage(Storage::File)).await?;
    broker.provision(&topic).await?;
    Ok(topic)
}

/// Reads how many messages the topic's JetStream stream holds.
struct StreamProbe {
    js: async_nats::jetstream::Context,
    name: String,
}

impl StreamProbe {
    async fn new(url: &str, topic: &Topic) -> anyhow::Result<Self> {
        let broker = NatsBroker::connect(NatsConfig::builder().url(url)).await?;
        let name = broker.stream_name(topic);
        let client = async_nats::connect(url).await?;
        Ok(Self {
            js: async_nats::jetstream::new(client),
            name,
        })
    }

    async fn messages(&self) -> anyhow::Result<u64> {
        let mut stream = self
            .js
            .get_stream(&self.name)
            .await
            .map_err(|e| anyhow::anyhow!("stream {}: {e}", self.name))?;
        let info = stream
            .info()
            .await
            .map_err(|e| anyhow::anyhow!("stream {} info: {e}", self.name))?;
        Ok(info.state.messages)
    }
}

fn events(from: usize, to: usize, keys: usize) -> anyhow::Result<Vec<Event>> {
    (from..to)
        .map(|n| event(&format!("k{}", n % keys), n))
        .collect()
}

async fn enqueue_in_transactions(db: &Db, topic: &Topic, events: &[Event]) -> anyhow::Result<()> {
    for chunk in events.chunks(50) {
        db.enqueue(topic, chunk, true).await?;
    }
    Ok(())
}

/// Waits until `n` effects committed, checking the relays are alive.
async fn wait_effects(db: &Db, n: i64, relays: &mut [&mut RelayProc]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = db.effects(CONSUMER).await?;
        if got >= n {
            return Ok(());
        }
        for relay in relays.iter_mut() {
            relay.check_alive()?;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{got} of {n} events applied within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// No event lost, order per key kept, no duplicate effect.
async fn check_effects(db: &Db, all: &[Event]) -> anyhow::Result<()> {
    let log = db.effect_log(CONSUMER).await?;
    let ids: Vec<(&str, Option<&str>)> = log
        .iter()
        .map(|(id, key, _)| (id.as_str(), key.as_deref()))
        .collect();
    check_order_ids(all, &ids, true)?;
    ensure!(
        log.len() == all.len(),
        "{} effects for {} events",
        log.len(),
        all.len()
    );
    // Every event has its effect; rows whose broker ack was lost (a broker
    // restart, a killed relay) are published once more before they are
    // marked: wait for that, bounded.
    db.wait_all_marked(WAIT).await
}

async fn relay_killed_mid_batch_republishes_on_restart(backend: Backend) -> anyhow::Result<()> {
    let nats = e2e::require(e2e::Server::Nats)?;
    let db = Arc::new(Db::open(backend, OutboxConfig::new()).await?);
    let topic = provision(&nats).await?;
    let all = events(0, 1200, 12)?;
    enqueue_in_transactions(&db, &topic, &all).await?;
    let consumer = Consumer::start(Arc::clone(&db), Target::nats(&nats), topic.clone(), None);

    // A pause after each acknowledged batch, before its rows are marked:
    // the relay is killed once the stream holds events whose rows are not
    // marked yet, i.e. between the broker's ack and the mark.
    let probe = StreamProbe::new(&nats, &topic).await?;
    let total = all.len() as u64;
    let mut attempts = 0;
    let (pending_at_kill, acked_unmarked) = loop {
        attempts += 1;
        let mut relay = RelayProc::start(db.url(), &Target::nats(&nats), "a", 150)?;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            relay.check_alive()?;
            let marked = total - db.pending().await?;
            if probe.messages().await? > marked && marked >= 100 * attempts {
                break;
            }
            ensure!(tokio::time::Instant::now() < deadline, "no batch in flight");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        relay.kill()?;
        let pending = db.pending().await?;
        let marked = total - pending;
        let in_stream = probe.messages().await?;
        ensure!(
            in_stream >= marked,
            "{marked} rows marked, {in_stream} in the stream"
        );
        // Rows the broker acknowledged but the dead relay never marked: the
        // restarted relay publishes them again (JetStream drops the copies by
        // event id; the inbox would skip them otherwise).
        if in_stream > marked {
            break (pending, in_stream - marked);
        }
        ensure!(attempts < 5, "the kill never landed between ack and mark");
    };
    ensure!(pending_at_kill > 0, "killed before the end of the stream");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut relay = RelayProc::start(db.url(), &Target::nats(&nats), "a", 0)?;
    wait_effects(&db, 1200, &mut [&mut relay]).await?;
    let stats = consumer.stop().await?;
    check_effects(&db, &all).await?;
    let in_stream = probe.messages().await?;
    ensure!(
        in_stream == 1200,
        "{in_stream} messages: republished copies de-duplicated by id"
    );
    println!(
        "{backend:?}: killed with {pending_at_kill} rows pending, {acked_unmarked} of them acknowledged but unmarked; deliveries {}, duplicates skipped {}",
        stats.deliveries.load(Ordering::SeqCst),
        stats.duplicates.load(Ordering::SeqCst)
    );
    relay.kill()?;
    db.close().await
}

async fn two_relay_processes_lose_nothing_and_keep_order(backend: Backend) -> anyhow::Result<()> {
    let nats = e2e::require(e2e::Server::Nats)?;
    let db = Arc::new(Db::open(backend, OutboxConfig::new()).await?);
    let topic = provision(&nats).await?;
    let mut all = events(0, 600, 20)?;
    enqueue_in_transactions(&db, &topic, &all).await?;
    let consumer = Consumer::start(Arc::clone(&db), Target::nats(&nats), topic.clone(), None);
    let mut a = RelayProc::start(db.url(), &Target::nats(&nats), "a", 5)?;
    let mut b = RelayProc::start(db.url(), &Target::nats(&nats), "b", 5)?;

    // Both take a share of the partitions.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while db.owned("a").await? == 0 || db.owned("b").await? == 0 {
        a.check_alive()?;
        b.check_alive()?;
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the two relays did not share the partitions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let more = events(600, 1200, 20)?;
    enqueue_in_transactions(&db, &topic, &more).await?;
    all.extend(more);
    wait_effects(&db, 1200, &mut [&mut a, &mut b]).await?;
    let stats = consumer.stop().await?;
    check_effects(&db, &all).await?;
    println!(
        "{backend:?}: two relays; deliveries {}, duplicates skipped {}",
        stats.deliveries.load(Ordering::SeqCst),
        stats.duplicates.load(Ordering::SeqCst)
    );
    a.kill()?;
    b.kill()?;
    db.close().await
}

/// A nats-server of the test's own (JetStream, file storage in a fresh
/// directory), started: the server, its URL and the directory.
async fn own_nats_server() -> anyhow::Result<(ServerProcess, String, PathBuf)> {
    let program = find_program("nats-server", &["/usr/sbin/nats-server", "/usr/bin/nats-server"])
        .context(
            "nats-server is not installed: `source tests/harness/up.sh` installs it (Debian package nats-server)",
        )?;
    let port = free_port()?;
    let dir = std::env::temp_dir().join(e2e::unique_name("outbox-nats"));
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
    Ok((server, format!("nats://127.0.0.1:{port}"), dir))
}

async fn nats_server_restart_loses_nothing(backend: Backend) -> anyhow::Result<()> {
    let mut broker = OwnBroker::nats().await?;
    restart_loses_nothing(backend, &mut broker).await?;
    broker.stop().await
}

/// The relay's producer without idempotence, one request in flight
/// ([`KafkaConfig::idempotence`]): what Tansu on S3 storage needs to lose
/// nothing across its own crash.
mod kafka_crash {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() -> anyhow::Result<()> {
        super::kafka_crash_and_restart_loses_nothing(super::Backend::Postgres, false).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() -> anyhow::Result<()> {
        super::kafka_crash_and_restart_loses_nothing(super::Backend::Sqlite, false).await
    }
}

/// Not run by default: with the default, idempotent producer, Tansu 0.6 on
/// S3 storage killed after saving a batch's sequence and before the batch
/// answers the batch's retry as a duplicate, and the batch is lost (seen in
/// 3 of 138 runs here, under CPU load; README, known gaps; `restart_kafka`
/// shows the loss directly). The relay sent it again only because its
/// publish had timed out while the broker was away, so the order of its key
/// broke instead.
mod kafka_crash_idempotent {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "Tansu 0.6 on S3 loses an idempotent batch it was killed in the middle of (README, known gaps); run with --ignored"]
    async fn postgres() -> anyhow::Result<()> {
        super::kafka_crash_and_restart_loses_nothing(super::Backend::Postgres, true).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "Tansu 0.6 on S3 loses an idempotent batch it was killed in the middle of (README, known gaps); run with --ignored"]
    async fn sqlite() -> anyhow::Result<()> {
        super::kafka_crash_and_restart_loses_nothing(super::Backend::Sqlite, true).await
    }
}

/// As [`nats_server_restart_loses_nothing`], with Kafka (a Tansu of the
/// test's own, on S3 storage), killed with SIGKILL rather than stopped; the
/// relay's producer `idempotent` or not. On failure it prints each key's
/// deliveries, the subscriptions' comings and goings, the relay's log, and
/// what the broker served a plain reader of the topic.
async fn kafka_crash_and_restart_loses_nothing(
    backend: Backend,
    idempotent: bool,
) -> anyhow::Result<()> {
    let mut broker = OwnBroker::kafka(idempotent).await?;
    restart_loses_nothing(backend, &mut broker).await?;
    broker.stop().await
}

async fn restart_loses_nothing(backend: Backend, broker: &mut OwnBroker) -> anyhow::Result<()> {
    let db = Arc::new(Db::open(backend, OutboxConfig::new()).await?);
    let topic = broker.topic().clone();
    let all = events(0, 900, 9)?;
    enqueue_in_transactions(&db, &topic, &all).await?;
    let consumer = Consumer::start(Arc::clone(&db), broker.target(), topic.clone(), None);
    let observer = match broker.target() {
        Target::Kafka { bootstrap, .. } => {
            Some(Observer::start(&bootstrap, &topic, KAFKA_PARTITIONS)?)
        }
        Target::Nats(_) => None,
    };
    // Paced, so the stop lands mid-stream: once the first hundred rows are
    // out, most of the rest are still pending.
    let mut relay = RelayProc::start(db.url(), &broker.target(), "a", 50)?;
    let started = tokio::time::Instant::now();
    while db.pending().await? > 800 {
        relay.check_alive()?;
        ensure!(started.elapsed() < WAIT, "the relay published nothing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    match broker {
        OwnBroker::Nats { server, .. } => server.stop().await?,
        // Tansu goes on serving for 5 s after SIGTERM, long enough for the
        // relay to finish: it crashes instead (its S3 storage keeps what it
        // acknowledged).
        OwnBroker::Kafka { tansu, .. } => tansu.broker.kill()?,
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pending_while_down = db.pending().await?;
    relay.check_alive()?;
    broker.server().start().await?;

    wait_effects(&db, 900, &mut [&mut relay]).await?;
    let stats = consumer.stop().await?;
    let served = match observer {
        Some(observer) => observer.stop()?,
        None => String::new(),
    };
    if let Err(e) = check_effects(&db, &all).await {
        bail!(
            "{e:#}\ndeliveries per key, in order:\n{}\nrelay-proc's log:\n{}\n{served}",
            stats.trail(),
            relay.log()
        );
    }
    ensure!(pending_while_down > 0, "the broker went down mid-stream");
    println!(
        "{backend:?}: {} back with {pending_while_down} rows pending; deliveries {}, duplicates skipped {}",
        broker.name(),
        stats.deliveries.load(Ordering::SeqCst),
        stats.duplicates.load(Ordering::SeqCst)
    );
    relay.kill()?;
    db.close().await
}

/// Reads every partition of a Kafka topic from its start as the broker
/// serves it, with a plain consumer of its own (no group, no commits), and
/// notes where the offsets it is served jump and which keys' events the
/// broker holds out of order: what tells a broker that stored or served a
/// partition out of order from a consumer that lost its place.
struct Observer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<Vec<Served>>>,
}

/// One record as the broker served it to the [`Observer`].
struct Served {
    partition: i32,
    offset: i64,
    key: String,
    /// The event's subject: its number in the test's sequence.
    subject: String,
}

impl Observer {
    fn start(bootstrap: &str, topic: &Topic, partitions: u16) -> anyhow::Result<Self> {
        use rdkafka::Message as _;
        use rdkafka::consumer::{BaseConsumer, Consumer as _};

        let reader: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", e2e::unique_name("observer"))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut assignment = rdkafka::TopicPartitionList::new();
        for partition in 0..i32::from(partitions) {
            assignment.add_partition_offset(
                topic.as_str(),
                partition,
                rdkafka::Offset::Beginning,
            )?;
        }
        reader.assign(&assignment)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut served = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    // Errors (the broker away) are librdkafka's to retry.
                    if let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) {
                        served.push(Served {
                            partition: m.partition(),
                            offset: m.offset(),
                            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                            subject: e2e::kafka_header(&m, "ce_subject").unwrap_or_default(),
                        });
                    }
                }
                Ok(served)
            })
        };
        Ok(Self { stop, thread })
    }

    /// Stops reading; what was served, partition by partition: each run of
    /// consecutive offsets as `first..=last (subjects first..last)`; then,
    /// for each key whose events the broker holds out of order (an event
    /// first stored after a later one of its key), every event of the key
    /// as `subject@offset`.
    fn stop(self) -> anyhow::Result<String> {
        self.stop.store(true, Ordering::SeqCst);
        let served = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the observer panicked"))??;
        let mut by_partition: BTreeMap<i32, Vec<&Served>> = BTreeMap::new();
        let mut by_key: BTreeMap<&str, Vec<&Served>> = BTreeMap::new();
        for record in &served {
            by_partition
                .entry(record.partition)
                .or_default()
                .push(record);
            by_key.entry(&record.key).or_default().push(record);
        }
        let mut out = String::from("served by the broker to a plain reader, per partition:\n");
        for (partition, records) in by_partition {
            let mut runs = Vec::new();
            let mut start = 0;
            for i in 1..=records.len() {
                if i == records.len() || records[i].offset != records[i - 1].offset + 1 {
                    let (first, last) = (records[start], records[i - 1]);
                    runs.push(format!(
                        "{}..={} (subjects {}..{})",
                        first.offset, last.offset, first.subject, last.subject
                    ));
                    start = i;
                }
            }
            out.push_str(&format!("  {partition}: {}\n", runs.join(", ")));
        }
        for (key, records) in by_key {
            // A key's events are numbered in enqueue order; a first copy
            // below the highest number stored before it is out of order.
            let mut seen = HashSet::new();
            let mut highest = None::<u64>;
            let mut disordered = false;
            for record in &records {
                let Ok(n) = record.subject.parse::<u64>() else {
                    continue;
                };
                if seen.insert(n) && highest.is_some_and(|h| n < h) {
                    disordered = true;
                }
                highest = highest.max(Some(n));
            }
            if disordered {
                let stored: Vec<String> = records
                    .iter()
                    .map(|r| format!("{}@{}", r.subject, r.offset))
                    .collect();
                out.push_str(&format!(
                    "  key {key} stored out of order (partition {}): {}\n",
                    records[0].partition,
                    stored.join(" ")
                ));
            }
        }
        Ok(out)
    }
}

/// Events of about 4 KB (`n` and padding), cycling through `keys` keys.
fn large_events(from: usize, to: usize, keys: usize) -> anyhow::Result<Vec<Event>> {
    let pad = "x".repeat(4_000);
    (from..to)
        .map(|n| {
            Ok(
                CloudEventBuilder::new("dev.backbone.outbox.test", "/e2e/outbox")
                    .partition_key(format!("k{}", n % keys))
                    .subject(n.to_string())
                    .json_data(&serde_json::json!({ "n": n, "pad": pad }))
                    .build()?,
            )
        })
        .collect()
}

/// Enqueues `rounds` batches of large events (added to `all`) while the
/// broker is down, then lets the relay retry for `retry_for`; the relay's
/// resident memory (KiB) sampled all the while.
async fn pile_up(
    db: &Db,
    topic: &Topic,
    relay: &mut RelayProc,
    all: &mut Vec<Event>,
    (rounds, retry_for): (usize, Duration),
) -> anyhow::Result<Vec<u64>> {
    const BATCH: usize = 500;
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let from = all.len();
        let batch = large_events(from, from + BATCH, 16)?;
        enqueue_in_transactions(db, topic, &batch).await?;
        all.extend(batch);
        samples.push(relay.rss_kib()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retrying = tokio::time::Instant::now();
    while retrying.elapsed() < retry_for {
        relay.check_alive()?;
        samples.push(relay.rss_kib()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(samples)
}

/// While the broker is down, rows pile up (10,000 of 4 KB, 40 MB) and the
/// relay keeps trying with its backoff. Its resident memory is measured
/// once 4,000 rows are pending (its caches, SQLite's page caches among them,
/// have grown to their working size by then), and again while 6,000 more
/// (24 MB) pile up and it retries: it does not grow with what is pending,
/// nor with the retries. Once the broker is back every event arrives, in
/// order per key, once.
async fn relay_memory_stays_flat_while_the_broker_is_down(backend: Backend) -> anyhow::Result<()> {
    let mut broker = OwnBroker::nats().await?;
    memory_flat(backend, &mut broker, Duration::from_secs(3)).await?;
    broker.stop().await
}

/// As [`relay_memory_stays_flat_while_the_broker_is_down`], with Kafka (a
/// Tansu of the test's own, on S3 storage, so its records outlive its
/// restart). librdkafka holds what it was given until its own delivery
/// timeout: before the relay waited for a publish that outlived its
/// timeout, each retry queued another copy: with librdkafka's default
/// delivery timeout (30 s) and the relay retrying for 20 s after the last
/// rows, that relay grew 16 MiB (PostgreSQL) and 20 MiB (SQLite) and fails
/// this test.
async fn relay_memory_stays_flat_while_kafka_is_down(backend: Backend) -> anyhow::Result<()> {
    let mut broker = OwnBroker::kafka(true).await?;
    memory_flat(backend, &mut broker, Duration::from_secs(20)).await?;
    broker.stop().await
}

/// A broker of the test's own that can be stopped and started again, and
/// a topic on it.
enum OwnBroker {
    Nats {
        server: ServerProcess,
        url: String,
        dir: PathBuf,
        topic: Topic,
    },
    Kafka {
        tansu: S3Tansu,
        topic: Topic,
        /// Whether the relay's producer is idempotent.
        idempotent: bool,
    },
}

/// Partitions of the topic on a test's own Kafka broker.
const KAFKA_PARTITIONS: u16 = 4;

impl OwnBroker {
    async fn nats() -> anyhow::Result<Self> {
        let (server, url, dir) = own_nats_server().await?;
        let topic = provision(&url).await?;
        Ok(Self::Nats {
            server,
            url,
            dir,
            topic,
        })
    }

    /// A Tansu on S3 storage, the relay's producer `idempotent` or not.
    async fn kafka(idempotent: bool) -> anyhow::Result<Self> {
        let tansu = S3Tansu::start("outbox-kafka").await?;
        let topic = Topic::try_from(e2e::unique_name("outbox").replace('_', "-"))?;
        KafkaBroker::connect(KafkaConfig::builder([tansu.bootstrap()]))
            .await?
            .create_topic(&topic, KAFKA_PARTITIONS)
            .await?;
        Ok(Self::Kafka {
            tansu,
            topic,
            idempotent,
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Nats { .. } => "NATS",
            Self::Kafka { .. } => "Kafka",
        }
    }

    fn target(&self) -> Target {
        match self {
            Self::Nats { url, .. } => Target::nats(url),
            Self::Kafka {
                tansu, idempotent, ..
            } => Target::Kafka {
                bootstrap: tansu.bootstrap(),
                idempotent: *idempotent,
            },
        }
    }

    fn topic(&self) -> &Topic {
        match self {
            Self::Nats { topic, .. } | Self::Kafka { topic, .. } => topic,
        }
    }

    fn server(&mut self) -> &mut ServerProcess {
        match self {
            Self::Nats { server, .. } => server,
            Self::Kafka { tansu, .. } => &mut tansu.broker,
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Self::Nats {
                mut server, dir, ..
            } => {
                server.stop().await?;
                let _ = std::fs::remove_dir_all(&dir);
                Ok(())
            }
            Self::Kafka { tansu, .. } => tansu.stop().await,
        }
    }
}

/// Held by each memory test while it runs: they run one at a time, so the
/// relay's share of the machine's two cores is alike from run to run (in
/// one run beside the Kafka tests, the SQLite relay grew 8.2 MiB where it
/// grows 0-4 alone).
static MEMORY_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The memory scenario on `broker`; `retry_for`: how long the relay retries
/// once the last rows piled up.
async fn memory_flat(
    backend: Backend,
    broker: &mut OwnBroker,
    retry_for: Duration,
) -> anyhow::Result<()> {
    let _alone = MEMORY_TESTS.lock().await;
    let db = Arc::new(Db::open(backend, OutboxConfig::new()).await?);
    let topic = broker.topic().clone();
    let consumer = Consumer::start(Arc::clone(&db), broker.target(), topic.clone(), None);
    let mut relay = RelayProc::start(db.url(), &broker.target(), "a", 0)?;

    // With the broker up, the relay works at its usual size.
    let mut all = large_events(0, 500, 16)?;
    enqueue_in_transactions(&db, &topic, &all).await?;
    wait_effects(&db, 500, &mut [&mut relay]).await?;

    broker.server().stop().await?;
    let first = pile_up(
        &db,
        &topic,
        &mut relay,
        &mut all,
        (8, Duration::from_secs(3)),
    )
    .await?;
    let base = relay.rss_kib()?;
    let then = pile_up(&db, &topic, &mut relay, &mut all, (12, retry_for)).await?;
    let pending = db.pending().await?;
    let peak = then.iter().copied().max().unwrap_or(base);
    println!(
        "{backend:?}: {} down; relay RSS {} MiB at most while 4,000 rows piled up, {} MiB with them pending, \
         {} MiB at most while 6,000 more (24 MB) piled up and it retried ({pending} rows pending)",
        broker.name(),
        first.iter().copied().max().unwrap_or(base) / 1024,
        base / 1024,
        peak / 1024,
    );
    ensure!(
        pending >= 10_000,
        "{pending} rows pending while the broker was down"
    );
    ensure!(
        peak.saturating_sub(base) <= 8 * 1024,
        "the relay grew from {base} KiB to {peak} KiB while 6,000 rows (24 MB) piled up"
    );

    broker.server().start().await?;
    wait_effects(&db, all.len() as i64, &mut [&mut relay]).await?;
    consumer.stop().await?;
    check_effects(&db, &all).await?;
    relay.kill()?;
    db.close().await
}

async fn duplicate_deliveries_have_no_duplicate_effect(backend: Backend) -> anyhow::Result<()> {
    let nats = e2e::require(e2e::Server::Nats)?;
    let db = Arc::new(Db::open(backend, OutboxConfig::new()).await?);
    let topic = provision(&nats).await?;
    let all = events(0, 300, 6)?;
    enqueue_in_transactions(&db, &topic, &all).await?;
    let consumer = Consumer::start(
        Arc::clone(&db),
        Target::nats(&nats),
        topic.clone(),
        Some(15),
    );
    let mut relay = RelayProc::start(db.url(), &Target::nats(&nats), "a", 0)?;
    wait_effects(&db, 300, &mut [&mut relay]).await?;
    // Let the withheld deliveries come back.
    let deadline = tokio::time::Instant::now() + WAIT;
    while consumer.stats.duplicates.load(Ordering::SeqCst)
        < consumer.stats.withheld.load(Ordering::SeqCst)
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "withheld deliveries never came again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = consumer.stop().await?;
    let withheld = stats.withheld.load(Ordering::SeqCst);
    ensure!(withheld >= 10, "{withheld} deliveries withheld");
    ensure!(stats.duplicates.load(Ordering::SeqCst) >= withheld);
    check_effects(&db, &all).await?;
    println!(
        "{backend:?}: {withheld} acks withheld; deliveries {}, duplicates skipped {}",
        stats.deliveries.load(Ordering::SeqCst),
        stats.duplicates.load(Ordering::SeqCst)
    );
    relay.kill()?;
    db.close().await
}
