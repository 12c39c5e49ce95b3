//! [`Relay`]: publishes committed outbox rows, in order per partition key.
//!
//! # How relays share the work
//!
//! Every row carries a partition (hash of its partition key modulo the
//! outbox's fixed partition count). A relay publishes a partition only while
//! it holds the partition's lease, a row in `orchestrator_outbox_leases`
//! with an owner and an expiry computed from the **database clock**, so
//! relays on hosts with skewed clocks still agree. Each relay also keeps a
//! heartbeat row; on every lease tick (a third of the lease time) a relay
//! renews its leases, counts the live relays, and takes free or expired
//! partitions up to its fair share (`ceil(partitions / live relays)`),
//! releasing any above it. A relay that stops releases its leases at once; a
//! relay that dies loses them when they expire, and the others take them
//! over. Loading a batch re-checks the lease in the same statement, so a
//! relay that lost a lease does not publish that partition again.
//!
//! Within a partition rows go out in id order, one bounded batch at a time,
//! and a batch is marked published (deleted or archived, see [`Retention`])
//! only after the broker acknowledged it: delivery is at least once, with
//! the event id unchanged so brokers that de-duplicate by id store it once.
//! A failing partition backs off exponentially (bounded) without holding
//! its rows in memory; the other partitions keep flowing. A publish that
//! outlives [`RelayConfig::publish_timeout`] runs on (the publisher may
//! still deliver it), and its partition waits for it before it is tried
//! again, so a publisher is never given a second copy of a partition's
//! rows while it still holds the first.
//!
//! # Order
//!
//! Rows of one partition key go out in the order of their outbox ids. On
//! SQLite, ids follow commit order (one writer at a time). On PostgreSQL an
//! id is taken when the row is inserted, not when its transaction commits:
//! events of one key enqueued in one transaction, or in transactions that
//! serialize on the business row (as updates of one aggregate do), go out in
//! order; events of one key enqueued by two transactions that overlap without
//! touching a common row have no order between them, and go out in whichever
//! order the relay sees them committed. A long open transaction never holds
//! back the rows committed after it, in its partition or any other.
//!
//! # Wake-up
//!
//! PostgreSQL: `enqueue` calls `pg_notify` in the caller's transaction, so
//! the relays' `LISTEN` is told exactly when it commits. SQLite: `enqueue`
//! signals the relays of the same process (before the caller commits, so a
//! woken relay looks again a few times at short intervals), and a caller
//! that calls `Outbox::committed` after its commit has them look at once.
//! Both poll every [`RelayConfig::poll_interval`] as the fallback, which is
//! also how relays in other processes learn of SQLite rows.
//!
//! # A look
//!
//! Each look is one statement that loads the oldest pending rows (up to 32
//! per partition) of every partition the relay holds, so an idle partition
//! costs nothing and a light load costs one read per look. The look
//! publishes them, all its partitions at once, and the rows that went out
//! are marked by the next look, whose read leaves them out: on PostgreSQL
//! in the read's own statement (one round trip for both); on SQLite in a
//! statement of its own run beside the read, so a look does not wait for
//! the mark, which waits for the writer's turn. A partition that
//! fills its share of a look has a backlog: it is drained batch by batch
//! ([`RelayConfig::batch_size`]),
//! one batch in flight per partition, each loaded, published and marked on
//! its own, so that loading, publishing and marking overlap across
//! partitions.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_adapters::{Publisher, Topic};
use futures_util::StreamExt as _;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use crate::error::{Error, ErrorKind, Result};

/// What happens to a row once its event is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Retention {
    /// Delete the row in the statement that marks it published.
    Delete,
    /// Keep published rows (marked with the publish time) for this long, then
    /// purge them in bounded batches.
    Keep(Duration),
}

/// What a relay does with a row the broker refuses for good (a
/// non-retryable error: an event the broker finds invalid or too large, a
/// row that cannot be decoded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Poison {
    /// Keep retrying it (with the backoff, up to its maximum): its partition waits, so
    /// nothing is skipped and the order holds, until the cause is fixed.
    #[default]
    Block,
    /// Park it (marked failed with the error, kept in the table, counted in
    /// `outbox_parked_total`, logged at error level) and go on with the next
    /// rows of its partition. `Outbox::requeue_parked` puts parked rows back.
    Park,
}

/// How a [`Relay`] works. Validated by `Outbox::relay`.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub(crate) relay_id: Option<String>,
    pub(crate) batch_size: usize,
    pub(crate) concurrency: usize,
    pub(crate) lease_ttl: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) publish_timeout: Option<Duration>,
    pub(crate) shutdown_grace: Duration,
    pub(crate) retention: Retention,
    pub(crate) purge_batch: usize,
    pub(crate) purge_interval: Duration,
    pub(crate) poison: Poison,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            relay_id: None,
            batch_size: 100,
            concurrency: 4,
            lease_ttl: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            publish_timeout: None,
            shutdown_grace: Duration::from_secs(5),
            retention: Retention::Delete,
            purge_batch: 1000,
            purge_interval: Duration::from_secs(30),
            poison: Poison::Block,
        }
    }
}

impl RelayConfig {
    /// The defaults: batches of 100, 10 s leases, a 1 s poll fallback,
    /// backoff from 100 ms to 10 s, rows deleted once published.
    pub fn new() -> Self {
        Self::default()
    }

    /// The relay's name in the lease table, logs and metrics (default: a
    /// fresh `relay-<uuid>`). Two live relays must not share a name.
    #[must_use]
    pub fn relay_id(mut self, id: impl Into<String>) -> Self {
        self.relay_id = Some(id.into());
        self
    }

    /// The most rows loaded and published at once per partition (1..=10000).
    #[must_use]
    pub fn batch_size(mut self, rows: usize) -> Self {
        self.batch_size = rows;
        self
    }

    /// How many partitions with a backlog a relay drains at once (1..=256;
    /// default 4). Each partition still goes out one batch at a time, in
    /// order; more partitions at once keep more events in flight to the
    /// broker, and use up to this many database connections at once (plus
    /// one). A look (at most 32 rows of each partition) publishes all its
    /// partitions at once.
    #[must_use]
    pub fn concurrency(mut self, partitions: usize) -> Self {
        self.concurrency = partitions;
        self
    }

    /// How long a partition lease lasts without renewal (at least 300 ms).
    /// Leases are renewed every third of it; a relay that dies hands its
    /// partitions over within about this time.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How often to look for rows when no wake-up arrives.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The bounds of the exponential backoff of a partition whose publish
    /// failed.
    #[must_use]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max;
        self
    }

    /// How long one batch publish may take before it counts as a retryable
    /// failure; must be below the lease time (default: half of it).
    ///
    /// A publish that outlives it is not dropped, as the publisher may still
    /// deliver it (a Kafka producer keeps queued records until its own
    /// `delivery_timeout`): it runs on, for up to ten times this, and its
    /// partition is not published again until it has ended. So a broker
    /// that is down holds at most one attempt of each partition, however
    /// the publisher's own timeout compares with this one.
    #[must_use]
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = Some(timeout);
        self
    }

    /// How long an in-flight batch may still take once shutdown is asked;
    /// past it the batch is abandoned (its rows stay and are published again).
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// What happens to published rows.
    #[must_use]
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// With [`Retention::Keep`]: how many expired rows one purge statement
    /// deletes, and how often the relay purges.
    #[must_use]
    pub fn purge(mut self, batch: usize, interval: Duration) -> Self {
        self.purge_batch = batch;
        self.purge_interval = interval;
        self
    }

    /// What to do with a row the broker refuses for good (default
    /// [`Poison::Block`]).
    #[must_use]
    pub fn poison(mut self, poison: Poison) -> Self {
        self.poison = poison;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err(Error::config(
                "batch_size",
                format!("{} is not between 1 and 10000", self.batch_size),
            ));
        }
        if self.concurrency == 0 || self.concurrency > 256 {
            return Err(Error::config(
                "concurrency",
                format!("{} is not between 1 and 256", self.concurrency),
            ));
        }
        if self.lease_ttl < Duration::from_millis(300) {
            return Err(Error::config(
                "lease_ttl",
                format!("{:?} is shorter than 300 ms", self.lease_ttl),
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::config("poll_interval", "must be positive"));
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return Err(Error::config(
                "backoff",
                format!(
                    "min {:?} must be positive and at most max {:?}",
                    self.backoff_min, self.backoff_max
                ),
            ));
        }
        if self.effective_publish_timeout().is_zero()
            || self.effective_publish_timeout() >= self.lease_ttl
        {
            return Err(Error::config(
                "publish_timeout",
                format!(
                    "{:?} must be positive and shorter than the lease time {:?}",
                    self.effective_publish_timeout(),
                    self.lease_ttl
                ),
            ));
        }
        if let Retention::Keep(_) = self.retention
            && (self.purge_batch == 0 || self.purge_interval.is_zero())
        {
            return Err(Error::config(
                "purge",
                "batch and interval must be positive",
            ));
        }
        if let Some(id) = &self.relay_id
            && id.trim().is_empty()
        {
            return Err(Error::config("relay_id", "must not be empty"));
        }
        Ok(())
    }

    fn effective_publish_timeout(&self) -> Duration {
        self.publish_timeout.unwrap_or(self.lease_ttl / 2)
    }

    fn renew_interval(&self) -> Duration {
        self.lease_ttl / 3
    }
}

/// How many publish timeouts a publish that outlived its timeout may run on
/// before it is given up (its partition waits for it meanwhile).
const LINGER_TIMEOUTS: u32 = 10;

/// How many times a relay looks again after an in-process signal, at
/// doubling intervals from 1 ms.
const RECHECKS: u32 = 8;

/// The most rows of one partition a look loads (see `Relay::look_rows`).
const LOOK_ROWS: usize = 32;

/// A row loaded for publishing.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StoredRow {
    pub(crate) part: i32,
    pub(crate) id: i64,
    pub(crate) topic: String,
    pub(crate) payload: String,
    pub(crate) age_ms: i64,
}

/// The database side of a relay, one implementation per backend.
#[async_trait]
pub(crate) trait RelayStore: fmt::Debug + Send + Sync + 'static {
    /// Heartbeat, renew, rebalance; returns the partitions now owned, sorted.
    async fn tick_leases(&self, relay: &str, ttl_ms: i64) -> Result<Vec<i32>>;
    /// Gives up every lease and the heartbeat.
    async fn release(&self, relay: &str) -> Result<()>;
    /// The oldest pending rows, at most `limit` per partition, of the
    /// partitions whose lease `relay` holds, except those in `skip` and the
    /// rows in `exclude` (published, being marked); sorted by partition,
    /// then id. One statement, whatever the number of
    /// partitions, and an idle partition costs nothing.
    async fn load_pending(
        &self,
        relay: &str,
        skip: &[i32],
        exclude: &[i64],
        limit: i64,
    ) -> Result<Vec<StoredRow>>;
    /// Whether [`load_pending_finishing`](Self::load_pending_finishing)
    /// marks and loads in one statement (PostgreSQL). Where it does not
    /// (SQLite, whose mark waits for the writer's turn while a load does
    /// not), a relay marks beside its look instead.
    fn finishes_in_load(&self) -> bool {
        false
    }
    /// Marks the rows in `exclude` published, as [`finish`](Self::finish)
    /// does, and loads as [`load_pending`](Self::load_pending) does; in one
    /// statement where [`finishes_in_load`](Self::finishes_in_load).
    async fn load_pending_finishing(
        &self,
        relay: &str,
        skip: &[i32],
        exclude: &[i64],
        keep: bool,
        limit: i64,
    ) -> Result<Vec<StoredRow>> {
        self.finish(exclude, keep).await?;
        self.load_pending(relay, skip, exclude, limit).await
    }
    /// The oldest pending rows of `part`, if `relay` holds its lease.
    async fn load_batch(&self, relay: &str, part: i32, limit: i64) -> Result<Vec<StoredRow>>;
    /// Marks rows published: deletes them, or stamps them when `keep`.
    async fn finish(&self, ids: &[i64], keep: bool) -> Result<()>;
    /// Parks a row the broker refused for good.
    async fn park(&self, id: i64, error: &str) -> Result<()>;
    /// Deletes at most `limit` rows published more than `keep_ms` ago.
    async fn purge(&self, keep_ms: i64, limit: i64) -> Result<u64>;
}

/// Why a relay's wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The time was up.
    Timeout,
    /// A transaction that enqueued rows committed (PostgreSQL `NOTIFY`, or
    /// `Outbox::committed`).
    Committed,
    /// Rows were enqueued in a transaction that may not have committed yet
    /// (SQLite's in-process signal from `enqueue`).
    Enqueued,
}

/// How a relay learns that rows were enqueued.
#[async_trait]
pub(crate) trait Wakeup: fmt::Debug + Send + Sync + 'static {
    /// Waits at most `max`, and says why it returned.
    async fn wait(&mut self, max: Duration) -> Wake;
}

/// What a relay did, returned when it stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayReport {
    /// Events published (acknowledged by the broker and marked).
    pub published: u64,
    /// Batches published.
    pub batches: u64,
    /// Batch publishes that failed and were retried later.
    pub failures: u64,
    /// Rows parked ([`Poison::Park`]).
    pub parked: u64,
}

/// Publishes committed outbox rows; created by `Outbox::relay`.
///
/// Run it with [`run`](Self::run) (until a [`CancellationToken`] is
/// cancelled) or [`spawn`](Self::spawn).
pub struct Relay {
    pub(crate) id: String,
    pub(crate) store: Arc<dyn RelayStore>,
    pub(crate) wakeup: Box<dyn Wakeup>,
    pub(crate) publisher: Arc<dyn Publisher>,
    pub(crate) config: RelayConfig,
    /// Publishes that outlived the publish timeout, by partition: they run
    /// on (the publisher may still deliver them) and their partition is not
    /// published again until they end.
    pub(crate) lingering: std::sync::Mutex<HashMap<i32, tokio::task::AbortHandle>>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("id", &self.id)
            .field("store", &self.store)
            .field("publisher", &self.publisher)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A relay running on a task: stop it with [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct RelayHandle {
    id: String,
    token: CancellationToken,
    task: JoinHandle<Result<RelayReport>>,
}

impl RelayHandle {
    /// The relay's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Asks the relay to stop, and waits until it did: the in-flight batch
    /// finishes (or is abandoned after the grace time) and the leases are
    /// released.
    ///
    /// # Errors
    ///
    /// The relay failed for good, or its task panicked.
    pub async fn shutdown(self) -> Result<RelayReport> {
        self.token.cancel();
        let relay = self.id;
        self.task
            .await
            .map_err(|e| Error::with_source(ErrorKind::RelayTask { relay }, e))?
    }

    /// Stops the relay's task at once, like a crash: no lease is released.
    pub fn abort(self) {
        self.task.abort();
    }
}

enum BatchError {
    Abandoned,
    Failed(Error),
}

impl From<Error> for BatchError {
    fn from(e: Error) -> Self {
        Self::Failed(e)
    }
}

/// What publishing one partition's rows of a look did.
#[derive(Default)]
struct PartOutcome {
    /// Rows loaded.
    rows: usize,
    /// Ids of the rows the broker acknowledged, to mark.
    published: Vec<i64>,
    /// Broker batches that went out.
    batches: usize,
    parked: usize,
    /// Why it stopped before the end.
    error: Option<BatchError>,
}

impl PartOutcome {
    fn sent(&mut self, rows: &[StoredRow]) {
        self.published.extend(rows.iter().map(|r| r.id));
        self.batches += 1;
    }
}

/// What one look left to do, over all its partitions.
#[derive(Default)]
struct Look {
    /// Partitions whose batch came back full: more rows may wait.
    full: Vec<i32>,
    /// Shutdown abandoned a publish.
    abandoned: bool,
    /// What went out, to mark.
    sent: Sent,
}

/// What a partition calls for once its rows were published.
enum Next {
    /// Nothing more now (drained, or backing off after a failure).
    Done,
    /// Its batch came back full: more rows may wait.
    Full,
    /// Shutdown abandoned a publish.
    Abandoned,
}

/// Rows published and acknowledged, not yet marked.
#[derive(Debug, Default)]
struct Sent {
    ids: Vec<i64>,
    batches: u64,
    parts: Vec<i32>,
}

/// What marking did.
enum Marked {
    Nothing,
    Done {
        rows: u64,
        batches: u64,
    },
    /// Not marked: the partitions to back off.
    Failed(Vec<i32>),
}

struct Backoff {
    attempts: u32,
    until: Instant,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Relay {
    /// The relay's id, as it appears in the lease table.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs the relay on a new task.
    pub fn spawn(self) -> RelayHandle {
        let token = CancellationToken::new();
        let id = self.id.clone();
        let task = tokio::spawn(self.run(token.clone()));
        RelayHandle { id, token, task }
    }

    /// Runs until `shutdown` is cancelled, then releases its leases.
    ///
    /// Database and broker failures are logged and retried with backoff;
    /// they never end the loop.
    ///
    /// # Errors
    ///
    /// None today; the `Result` leaves room for failures that retrying
    /// cannot fix.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<RelayReport> {
        let span = info_span!("outbox_relay", relay = %self.id);
        async move {
            let report = self.run_loop(&shutdown).await;
            if let Err(e) = self.store.release(&self.id).await {
                warn!(error = %e, "could not release the partition leases; they expire on their own");
            }
            for (_, attempt) in self.lingering_attempts().drain() {
                attempt.abort();
            }
            info!(?report, "relay stopped");
            Ok(report)
        }
        .instrument(span)
        .await
    }

    async fn run_loop(&mut self, shutdown: &CancellationToken) -> RelayReport {
        let mut report = RelayReport::default();
        let ttl_ms = millis(self.config.lease_ttl);
        let mut owned: Vec<i32> = Vec::new();
        let mut next_lease = Instant::now();
        let mut next_purge = Instant::now();
        let mut backoff: HashMap<i32, Backoff> = HashMap::new();
        let mut rechecks = 0u32;
        let look_limit = i64::try_from(self.look_rows()).unwrap_or(i64::MAX);
        // Published and acknowledged, not yet marked: marked while the next
        // look loads (which leaves them out).
        let mut sent = Sent::default();
        info!("relay started");
        while !shutdown.is_cancelled() {
            if Instant::now() >= next_lease {
                // Marked before the leases may move, so a partition handed
                // over carries no published row to its next owner.
                let marked = self.mark(&std::mem::take(&mut sent)).await;
                self.count_marked(marked, &mut report, &mut backoff);
                match self.store.tick_leases(&self.id, ttl_ms).await {
                    Ok(parts) => {
                        if parts != owned {
                            debug!(?parts, "partition leases changed");
                        }
                        owned = parts;
                        backoff.retain(|p, _| owned.contains(p));
                        metrics::gauge!("outbox_relay_partitions", "relay" => self.id.clone())
                            .set(owned.len() as f64);
                    }
                    Err(e) => warn!(error = %e, "could not renew the partition leases"),
                }
                next_lease = Instant::now() + self.config.renew_interval();
            }

            // One look loads the pending rows of every owned partition that
            // is not backing off (one statement) and publishes them; the
            // rows the last look published are marked in that statement
            // where the store can (PostgreSQL), else in one beside it
            // (SQLite, where the mark waits for the writer's turn and the
            // look does not wait for the mark).
            let marking = std::mem::take(&mut sent);
            let mut worked = !marking.ids.is_empty();
            let mut more = false;
            let now = Instant::now();
            let mut skip: Vec<i32> = backoff
                .iter()
                .filter(|(_, b)| b.until > now)
                .map(|(p, _)| *p)
                .collect();
            {
                let mut lingering = self.lingering_attempts();
                lingering.retain(|_, attempt| !attempt.is_finished());
                for part in lingering.keys() {
                    if !skip.contains(part) {
                        skip.push(*part);
                    }
                }
            }
            let keep = matches!(self.config.retention, Retention::Keep(_));
            let folded =
                self.store.finishes_in_load() && !owned.is_empty() && !marking.ids.is_empty();
            let look = async {
                if owned.is_empty() {
                    return (None, Ok(None));
                }
                let (marked, loaded) = if folded {
                    let loaded = self
                        .store
                        .load_pending_finishing(&self.id, &skip, &marking.ids, keep, look_limit)
                        .await;
                    (Some(self.marked(&marking, loaded.as_ref().err())), loaded)
                } else {
                    let loaded = self
                        .store
                        .load_pending(&self.id, &skip, &marking.ids, look_limit)
                        .await;
                    (None, loaded)
                };
                let looked: Result<Option<Look>> = match loaded {
                    Ok(rows) if rows.is_empty() => Ok(None),
                    Ok(rows) => Ok(Some(
                        self.relay_rows(rows, &mut report, &mut backoff, shutdown)
                            .await,
                    )),
                    Err(e) => Err(e),
                };
                (marked, looked)
            };
            let apart = async {
                if folded {
                    Marked::Nothing
                } else {
                    self.mark(&marking).await
                }
            };
            let (marked_apart, (marked_in_look, looked)) = tokio::join!(apart, look);
            self.count_marked(marked_apart, &mut report, &mut backoff);
            if let Some(marked) = marked_in_look {
                self.count_marked(marked, &mut report, &mut backoff);
            }
            match looked {
                Ok(Some(look)) => {
                    worked = true;
                    sent = look.sent;
                    if look.abandoned {
                        break;
                    }
                    if !look.full.is_empty() {
                        // A backlog: its partitions are drained one batch
                        // after another each, `concurrency` at a time, so
                        // loading, publishing and marking overlap across
                        // partitions. This look's rows are marked first.
                        let marked = self.mark(&std::mem::take(&mut sent)).await;
                        self.count_marked(marked, &mut report, &mut backoff);
                        let abandoned = self
                            .drain(look.full, next_lease, &mut report, &mut backoff, shutdown)
                            .await;
                        if abandoned {
                            break;
                        }
                        more = true;
                    }
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "could not load pending outbox rows"),
            }

            if let Retention::Keep(keep) = self.config.retention
                && Instant::now() >= next_purge
            {
                self.purge(keep).await;
                next_purge = Instant::now() + self.config.purge_interval;
            }

            // A partition came back full, or rows wait to be marked: look
            // again at once.
            if more || !sent.ids.is_empty() {
                continue;
            }
            // Sleep until a wake-up, the poll interval, the next lease tick or
            // the end of the earliest backoff.
            let mut until = Instant::now()
                + if rechecks > 0 {
                    // 1, 2, 4, … 128 ms after the signal: a commit that
                    // follows the signal closely is seen within about a
                    // millisecond, a slow one within a quarter second.
                    let delay = Duration::from_millis(1 << (RECHECKS - rechecks));
                    rechecks -= 1;
                    delay
                } else {
                    self.config.poll_interval
                };
            until = until.min(next_lease);
            // The partitions this look skipped for their backoff: a backoff
            // that had ended was looked at (or waits for a publish still
            // running, whose partition is looked at on a later wake-up).
            if let Some(b) = backoff.values().map(|b| b.until).filter(|u| *u > now).min() {
                until = until.min(b);
            }
            let max = until.saturating_duration_since(Instant::now());
            if worked || max.is_zero() {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                wake = self.wakeup.wait(max) => {
                    // An in-process signal may come before the enqueueing
                    // transaction committed: look again shortly a few times.
                    if wake == Wake::Enqueued {
                        rechecks = RECHECKS;
                    }
                }
            }
        }
        // What went out is marked before the leases are released.
        let marked = self.mark(&sent).await;
        self.count_marked(marked, &mut report, &mut backoff);
        report
    }

    /// Marks the rows in `done` (deleted or stamped, by the retention
    /// policy) in one statement; returns what it marked, or
    /// on failure the partitions to back off (their rows go out again, at
    /// least once, with the same event ids).
    async fn mark(&self, done: &Sent) -> Marked {
        if done.ids.is_empty() {
            return Marked::Nothing;
        }
        let keep = matches!(self.config.retention, Retention::Keep(_));
        let finished = self.store.finish(&done.ids, keep).await;
        self.marked(done, finished.as_ref().err())
    }

    /// What marking the rows in `done` came to, given how the statement
    /// that marked them failed, if it did.
    fn marked(&self, done: &Sent, failed: Option<&Error>) -> Marked {
        if done.ids.is_empty() {
            return Marked::Nothing;
        }
        match failed {
            None => {
                metrics::counter!("outbox_published_total").increment(done.ids.len() as u64);
                metrics::counter!("outbox_batches_total").increment(done.batches);
                Marked::Done {
                    rows: done.ids.len() as u64,
                    batches: done.batches,
                }
            }
            Some(e) => {
                warn!(error = %e, rows = done.ids.len(), "could not mark published rows; they will be published again");
                Marked::Failed(done.parts.clone())
            }
        }
    }

    fn count_marked(
        &self,
        marked: Marked,
        report: &mut RelayReport,
        backoff: &mut HashMap<i32, Backoff>,
    ) {
        match marked {
            Marked::Nothing => {}
            Marked::Done { rows, batches } => {
                report.published += rows;
                report.batches += batches;
            }
            Marked::Failed(parts) => {
                for part in parts {
                    self.fail(report, backoff, part, None);
                }
            }
        }
    }

    /// The most rows of one partition a look loads: a partition with more
    /// is drained batch by batch (see [`drain`](Self::drain)), so a look
    /// stays short and a backlog's loading, publishing and marking overlap.
    fn look_rows(&self) -> usize {
        self.config.batch_size.min(LOOK_ROWS)
    }

    /// Drains the partitions in `queue`: one batch in flight per partition
    /// (so its order holds), `concurrency` partitions at a time, each batch
    /// loaded, published and marked on its own; a partition whose batch
    /// came back full goes back in the queue. Stops when the queue is
    /// empty, at `until` (the lease tick) or at shutdown; returns whether a
    /// publish was abandoned.
    async fn drain(
        &self,
        queue: Vec<i32>,
        until: Instant,
        report: &mut RelayReport,
        backoff: &mut HashMap<i32, Backoff>,
        shutdown: &CancellationToken,
    ) -> bool {
        let limit = i64::try_from(self.config.batch_size).unwrap_or(i64::MAX);
        let mut queue: std::collections::VecDeque<i32> = queue.into();
        let batch = |part: i32| async move {
            let mut outcome = match self.store.load_batch(&self.id, part, limit).await {
                Ok(rows) => self.relay_part(part, rows, shutdown).await,
                Err(e) => PartOutcome {
                    error: Some(BatchError::Failed(e)),
                    ..PartOutcome::default()
                },
            };
            let sent = Sent {
                ids: std::mem::take(&mut outcome.published),
                batches: outcome.batches as u64,
                parts: vec![part],
            };
            (part, outcome, self.mark(&sent).await)
        };
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let mut abandoned = false;
        loop {
            while in_flight.len() < self.config.concurrency
                && !shutdown.is_cancelled()
                && Instant::now() < until
                && let Some(part) = queue.pop_front()
            {
                in_flight.push(batch(part));
            }
            let Some((part, outcome, marked)) = in_flight.next().await else {
                break;
            };
            let unmarked = matches!(marked, Marked::Failed(_));
            self.count_marked(marked, report, backoff);
            match self.settle_part(
                part,
                outcome,
                self.config.batch_size,
                unmarked,
                report,
                backoff,
            ) {
                Next::Done => {}
                Next::Full => queue.push_back(part),
                Next::Abandoned => abandoned = true,
            }
        }
        abandoned
    }

    /// Accounts for a partition whose rows were published: parked rows
    /// counted, its backoff cleared on success (unless its rows could not
    /// be marked, `unmarked`) or extended on failure. A batch of `full_at`
    /// rows means a backlog.
    fn settle_part(
        &self,
        part: i32,
        outcome: PartOutcome,
        full_at: usize,
        unmarked: bool,
        report: &mut RelayReport,
        backoff: &mut HashMap<i32, Backoff>,
    ) -> Next {
        report.parked += outcome.parked as u64;
        match outcome.error {
            None if unmarked => Next::Done,
            None => {
                backoff.remove(&part);
                if outcome.rows >= full_at {
                    Next::Full
                } else {
                    Next::Done
                }
            }
            Some(BatchError::Abandoned) => Next::Abandoned,
            Some(BatchError::Failed(e)) => {
                self.fail(report, backoff, part, Some(&e));
                Next::Done
            }
        }
    }

    /// Counts a failure of `part` (a publish, logged with `error`, or a
    /// mark, already logged) and backs the partition off.
    fn fail(
        &self,
        report: &mut RelayReport,
        backoff: &mut HashMap<i32, Backoff>,
        part: i32,
        error: Option<&Error>,
    ) {
        report.failures += 1;
        metrics::counter!("outbox_relay_failures_total").increment(1);
        let (attempts, delay) = self.back_off(backoff, part);
        if let Some(e) = error {
            warn!(partition = part, attempts, ?delay, retryable = e.is_retryable(), error = %e, "batch not published; retrying later");
        }
    }

    /// Backs `part` off once more: returns its failures in a row and the
    /// delay.
    fn back_off(&self, backoff: &mut HashMap<i32, Backoff>, part: i32) -> (u32, Duration) {
        let b = backoff.entry(part).or_insert(Backoff {
            attempts: 0,
            until: Instant::now(),
        });
        b.attempts = b.attempts.saturating_add(1);
        let delay = self
            .config
            .backoff_min
            .saturating_mul(1u32 << b.attempts.min(16).saturating_sub(1))
            .min(self.config.backoff_max);
        b.until = Instant::now() + delay;
        (b.attempts, delay)
    }

    /// Publishes the rows of one look, all its partitions at once, each in
    /// id order; what went out is returned for marking.
    async fn relay_rows(
        &self,
        rows: Vec<StoredRow>,
        report: &mut RelayReport,
        backoff: &mut HashMap<i32, Backoff>,
        shutdown: &CancellationToken,
    ) -> Look {
        let mut parts: Vec<(i32, Vec<StoredRow>)> = Vec::new();
        for row in rows {
            match parts.last_mut() {
                Some((part, rows)) if *part == row.part => rows.push(row),
                _ => parts.push((row.part, vec![row])),
            }
        }
        let mut look = Look::default();
        // Every partition of the look at once: a look holds at most
        // LOOK_ROWS rows of each, and publishing needs no database
        // connection, so one round of broker acknowledgements covers it.
        let mut outcomes: futures_util::stream::FuturesUnordered<_> = parts
            .into_iter()
            .map(|(part, rows)| async move { (part, self.relay_part(part, rows, shutdown).await) })
            .collect();
        while let Some((part, mut outcome)) = outcomes.next().await {
            if !outcome.published.is_empty() {
                look.sent.ids.append(&mut outcome.published);
                look.sent.batches += outcome.batches as u64;
                look.sent.parts.push(part);
            }
            match self.settle_part(part, outcome, self.look_rows(), false, report, backoff) {
                Next::Done => {}
                Next::Full => look.full.push(part),
                Next::Abandoned => look.abandoned = true,
            }
        }
        look
    }

    /// Publishes the rows of one partition, in id order: consecutive rows
    /// of one topic go out as one batch. Stops at the first failure; what
    /// went out before it is returned for marking.
    async fn relay_part(
        &self,
        part: i32,
        rows: Vec<StoredRow>,
        shutdown: &CancellationToken,
    ) -> PartOutcome {
        let mut outcome = PartOutcome {
            rows: rows.len(),
            ..PartOutcome::default()
        };
        let Some(first) = rows.first() else {
            return outcome;
        };
        metrics::histogram!("outbox_relay_lag_seconds").record(first.age_ms as f64 / 1000.0);
        let span = info_span!("outbox_batch", partition = part, rows = rows.len());
        async {
            let mut rest = &rows[..];
            while let Some(head) = rest.first() {
                let run = rest.iter().take_while(|r| r.topic == head.topic).count();
                let (chunk, tail) = rest.split_at(run);
                rest = tail;
                match self.publish_rows(chunk, shutdown).await {
                    Ok(()) => outcome.sent(chunk),
                    Err(BatchError::Failed(e)) if !e.is_retryable() => {
                        // Find the row the broker refuses: one at a time, so
                        // the rows before it go out.
                        for row in chunk {
                            let one = std::slice::from_ref(row);
                            match self.publish_rows(one, shutdown).await {
                                Ok(()) => outcome.sent(one),
                                Err(BatchError::Failed(e))
                                    if !e.is_retryable() && self.config.poison == Poison::Block =>
                                {
                                    outcome.error = Some(BatchError::Failed(e));
                                    return;
                                }
                                Err(BatchError::Failed(e)) if !e.is_retryable() => {
                                    let reason = format!("{e}");
                                    if let Err(e) = self.store.park(row.id, &reason).await {
                                        outcome.error = Some(BatchError::Failed(e));
                                        return;
                                    }
                                    outcome.parked += 1;
                                    metrics::counter!("outbox_parked_total").increment(1);
                                    error!(row = row.id, error = %reason, "outbox row refused for good; parked");
                                }
                                Err(other) => {
                                    outcome.error = Some(other);
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        outcome.error = Some(e);
                        return;
                    }
                }
            }
        }
        .instrument(span)
        .await;
        outcome
    }

    fn lingering_attempts(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<i32, tokio::task::AbortHandle>> {
        self.lingering
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes `rows` (one topic, one partition) as one batch.
    ///
    /// The publish runs on a task of its own. If it outlives the publish
    /// timeout it is not dropped: the publisher may still be delivering it
    /// (a Kafka producer keeps queued records until its own delivery
    /// timeout), and sending the rows again beside it would queue a second
    /// copy while the first is still held. It runs on (up to ten publish
    /// timeouts) and the partition waits until it ends before it is tried
    /// again, so a broker that is down holds at most one attempt per
    /// partition, whatever the publisher's own timeout.
    async fn publish_rows(
        &self,
        rows: &[StoredRow],
        shutdown: &CancellationToken,
    ) -> Result<(), BatchError> {
        let Some(head) = rows.first() else {
            return Ok(());
        };
        let topic = Topic::try_from(head.topic.as_str()).map_err(|e| {
            Error::with_source(
                ErrorKind::Codec {
                    operation: "read the topic of an outbox row",
                },
                e,
            )
        })?;
        let events = rows
            .iter()
            .map(|r| {
                broker_adapters::event::from_json_slice(r.payload.as_bytes()).map_err(|e| {
                    Error::with_source(
                        ErrorKind::Codec {
                            operation: "decode an outbox row",
                        },
                        e,
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let timeout = self.config.effective_publish_timeout();
        let mut attempt = {
            let (publisher, topic) = (Arc::clone(&self.publisher), topic.clone());
            tokio::spawn(
                async move {
                    tokio::time::timeout(
                        timeout.saturating_mul(LINGER_TIMEOUTS),
                        publisher.publish_batch(&topic, events),
                    )
                    .await
                }
                .in_current_span(),
            )
        };
        let grace = async {
            shutdown.cancelled().await;
            tokio::time::sleep(self.config.shutdown_grace).await;
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(timeout, &mut attempt) => outcome,
            () = grace => {
                attempt.abort();
                warn!("shutdown: in-flight batch abandoned; its rows will be published again");
                return Err(BatchError::Abandoned);
            }
        };
        let late = || {
            Error::new(ErrorKind::Broker {
                operation: "publish a batch in time",
                topic: topic.to_string(),
                retryable: true,
            })
        };
        match outcome {
            Ok(Ok(Ok(Ok(())))) => Ok(()),
            Ok(Ok(Ok(Err(e)))) => Err(Error::broker("publish a batch", topic.as_str(), e).into()),
            Ok(Ok(Err(_))) => Err(late().into()),
            Ok(Err(panicked)) => Err(Error::with_source(
                ErrorKind::Broker {
                    operation: "publish a batch (the publisher panicked)",
                    topic: topic.to_string(),
                    retryable: true,
                },
                panicked,
            )
            .into()),
            Err(_) => {
                // Runs on, detached; the partition waits for it.
                self.lingering_attempts()
                    .insert(head.part, attempt.abort_handle());
                Err(late().into())
            }
        }
    }

    async fn purge(&self, keep: Duration) {
        let limit = i64::try_from(self.config.purge_batch).unwrap_or(i64::MAX);
        // Bounded batches, each its own short statement.
        for _ in 0..100 {
            match self.store.purge(millis(keep), limit).await {
                Ok(n) => {
                    metrics::counter!("outbox_purged_total").increment(n);
                    if n < self.config.purge_batch as u64 {
                        return;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "could not purge published rows");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_config_is_refused_with_a_reason() {
        assert!(RelayConfig::new().validate().is_ok());
        for (config, key) in [
            (RelayConfig::new().batch_size(0), "batch_size"),
            (
                RelayConfig::new().lease_ttl(Duration::from_millis(10)),
                "lease_ttl",
            ),
            (
                RelayConfig::new().poll_interval(Duration::ZERO),
                "poll_interval",
            ),
            (
                RelayConfig::new().backoff(Duration::from_secs(2), Duration::from_secs(1)),
                "backoff",
            ),
            (
                RelayConfig::new().publish_timeout(Duration::from_secs(60)),
                "publish_timeout",
            ),
            (RelayConfig::new().relay_id(" "), "relay_id"),
        ] {
            let err = config.validate().expect_err(key);
            assert!(
                matches!(err.kind(), ErrorKind::Config { key: k, .. } if *k == key),
                "{key}: {err}"
            );
        }
    }
}
