//! The SQLite stores: [`connect`], [`migrate`], `Outbox<Sqlite>`,
//! `Inbox<Sqlite>`.
//!
//! SQLite is the embedded, single-host case: [`connect`] opens the database
//! in WAL mode with a busy timeout, and every read-then-write transaction of
//! this crate starts with `BEGIN IMMEDIATE`, so concurrent writers queue
//! instead of failing with "database is locked". Relays are woken by an
//! in-process signal shared by an [`Outbox`] and its clones, with polling as
//! the fallback (and for relays in other processes). The database clock of
//! the leases is SQLite's `julianday('now')`, the clock of the host the file
//! lives on.
//!
//! SQLite has a single writer: a transaction that has written holds the
//! write lock until it ends, so a long open transaction makes every other
//! writer, the relays' marking of published rows included, wait (up to the
//! busy timeout; past it the relay backs off and publishes that batch again
//! later, at least once). Keep business transactions short.
//!
//! Within one process, writers take turns in a [`WriteQueue`] before they
//! touch the lock: a connection that finds the lock taken sleeps in SQLite's
//! busy handler (1, 2, 5, 10 … 100 ms) and looks again, so writers that
//! meet at the lock wait for those sleeps, not for each other. Every write
//! of this crate waits for its turn first; start your own transactions that
//! write (those that enqueue outbox rows, say) with [`begin_write`], which
//! waits for the turn and then begins with `BEGIN IMMEDIATE` (so a
//! transaction that reads before it writes cannot fail with "database is
//! locked"). Writers in other processes still meet at the lock, under the
//! busy timeout.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use broker_adapters::cloudevents::{AttributesReader, Event};
use broker_adapters::{Publisher, Topic};
use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Sqlite, SqliteConnection, Transaction};
use tokio::sync::{OwnedMutexGuard, watch};

use crate::error::{BoxError, Error, ErrorKind, Result};
use crate::inbox::{Inbox, Processed};
use crate::outbox::{NewRow, Outbox, OutboxConfig, encode};
use crate::relay::{Relay, RelayConfig, RelayStore, StoredRow, Wake, Wakeup};

/// How long a connection waits for another writer before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

macro_rules! now_ms {
    () => {
        "cast((julianday('now') - 2440587.5) * 86400000.0 as integer)"
    };
}

/// Connection options for `url` (`sqlite://path`, `sqlite:path` or
/// `sqlite::memory:`): created if missing, WAL journal, `synchronous=NORMAL`,
/// a [`BUSY_TIMEOUT`], foreign keys on, WAL checkpoints by SQLite at
/// [`AUTOCHECKPOINT_PAGES`].
///
/// # Errors
///
/// [`ErrorKind::Config`] when `url` is not a SQLite URL.
pub fn connect_options(url: &str) -> Result<SqliteConnectOptions> {
    let options = SqliteConnectOptions::from_str(url).map_err(|e| {
        Error::with_source(
            ErrorKind::Config {
                key: "database_url",
                reason: format!("`{url}` is not a SQLite URL"),
            },
            e,
        )
    })?;
    Ok(options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT)
        .pragma("wal_autocheckpoint", AUTOCHECKPOINT_PAGES.to_string())
        .foreign_keys(true))
}

/// Opens a pool on `url` with [`connect_options`]. An in-memory database
/// (`sqlite::memory:`) gets a single connection that is never closed, so
/// every user sees the same database.
///
/// Connections are not pinged when they are taken from the pool (`sqlx`
/// does by default): a SQLite connection lives in this process, and each
/// ping is one more round trip to its worker thread, about as costly as a
/// statement. Without the ping, a cancelled acquire also cannot drop the
/// one connection of an in-memory database, which would lose it.
///
/// # Errors
///
/// A bad URL, or the database cannot be opened.
pub async fn connect(url: &str) -> Result<SqlitePool> {
    let options = connect_options(url)?;
    let memory = url.contains(":memory:") || url.contains("mode=memory");
    let pool = SqlitePoolOptions::new().test_before_acquire(false);
    let pool = if memory {
        pool.max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
    } else {
        pool.max_connections(8)
    };
    pool.connect_with(options)
        .await
        .map_err(|e| Error::db("open the SQLite database", e))
}

/// This process's writers of one SQLite database, in line: one writes at a
/// time, the others wait for their turn in arrival order (see the [module
/// docs](self) for why).
///
/// Every pool of this process on the same database file gets the same
/// queue ([`of`](Self::of) keys it by the file name the pool was opened
/// with).
///
/// The queue also checkpoints the WAL in the background, in the writers'
/// quiet moments (or every few hundred turns under a steady stream), so
/// a writer's commit seldom runs SQLite's own checkpoint (a copy and two
/// syncs that every writer queued behind it waits for; see
/// [`AUTOCHECKPOINT_PAGES`]).
#[derive(Debug, Clone)]
pub struct WriteQueue {
    line: Arc<Line>,
}

/// The writers of one database file in this process, and its background
/// WAL checkpoints.
///
/// SQLite checkpoints on the connection whose commit took the WAL past its
/// threshold: it copies the WAL into the database file and syncs both
/// (~10 ms here), and that writer, with every writer queued behind it,
/// waits. So this process checkpoints (`PASSIVE`) in the background, on a
/// connection of its own: once [`CHECKPOINT_EVERY`] turns have ended since
/// its last checkpoint, at the first moment no writer has taken or waited
/// for a turn for [`QUIET`], or after [`CHECKPOINT_ANYWAY`] turns without
/// one. The next writer after a quiet checkpoint starts the WAL over; under
/// a steady stream of writers the WAL grows (its frames already copied)
/// until SQLite's own checkpoint at [`AUTOCHECKPOINT_PAGES`], which then
/// has little left to copy, and comes ten times less often than at
/// SQLite's default of 1,000 pages.
#[derive(Debug)]
struct Line {
    turns: Arc<tokio::sync::Mutex<()>>,
    pool: SqlitePool,
    count: Arc<TurnCount>,
}

/// A writer's turn in a [`WriteQueue`]; the next writer's turn comes when
/// it is dropped.
#[derive(Debug)]
pub struct WriteTurn {
    _held: OwnedMutexGuard<()>,
    /// Kept alive while the turn is held, so the next writer of this
    /// process queues on the same line.
    line: Arc<Line>,
}

impl Drop for WriteTurn {
    fn drop(&mut self) {
        self.line.turn_ended();
    }
}

/// The writers of one database file: turns ended (in all, and at the last
/// background checkpoint), writers waiting for a turn, and whether a
/// checkpoint is under way. It outlives the [`Line`] (which lives only
/// while some writer holds or waits for a turn), so turns taken one at a
/// time add up too.
#[derive(Debug, Default)]
struct TurnCount {
    ended: AtomicU64,
    checkpointed: AtomicU64,
    waiting: AtomicUsize,
    running: AtomicBool,
}

impl TurnCount {
    /// Turns ended since the last background checkpoint.
    fn since_checkpoint(&self) -> u64 {
        let ended = self.ended.load(Ordering::Acquire);
        ended.saturating_sub(self.checkpointed.load(Ordering::Acquire))
    }
}

/// Counts a writer as waiting for its turn until it is dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::AcqRel);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Line {
    fn turn_ended(&self) {
        let count = &self.count;
        count.ended.fetch_add(1, Ordering::AcqRel);
        if count.since_checkpoint() < CHECKPOINT_EVERY {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if count.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, count) = (self.pool.clone(), Arc::clone(&self.count));
        // Waits for the first quiet moment, then checkpoints.
        runtime.spawn(async move {
            let mut ended = count.ended.load(Ordering::Acquire);
            while !pool.is_closed() {
                tokio::time::sleep(QUIET).await;
                let now = count.ended.load(Ordering::Acquire);
                let busy = now != ended || count.waiting.load(Ordering::Acquire) > 0;
                if busy && count.since_checkpoint() < CHECKPOINT_ANYWAY {
                    ended = now;
                    continue;
                }
                // Only an idle connection: an in-memory database's one
                // connection is never taken from its writers.
                let Some(mut conn) = pool.try_acquire() else {
                    continue;
                };
                count.checkpointed.store(now, Ordering::Release);
                if let Err(e) = sqlx::query("pragma wal_checkpoint(passive)")
                    .execute(&mut *conn)
                    .await
                {
                    tracing::debug!(error = %e, "background WAL checkpoint failed; SQLite's own remains");
                }
                break;
            }
            count.running.store(false, Ordering::Release);
        });
    }
}

/// Write turns between two background WAL checkpoints (see [`Line`]): a
/// few pages each, well below SQLite's 1,000.
const CHECKPOINT_EVERY: u64 = 64;

/// Write turns after which the background checkpoint runs without waiting
/// for a quiet moment.
const CHECKPOINT_ANYWAY: u64 = 256;

/// SQLite's own checkpoint threshold, in WAL pages (of 4 KiB), set by
/// [`connect_options`]: ten times SQLite's default, as this process
/// checkpoints in the background long before (see [`WriteQueue`]). Writers
/// that do not take turns (in other processes, or not through
/// [`begin_write`]) leave the WAL to this threshold.
pub const AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// How long no writer may take or wait for a turn before a background
/// checkpoint runs (see [`Line`]).
const QUIET: Duration = Duration::from_millis(5);

/// Per database file: its line while it lives, and its turn count.
type Lines = HashMap<PathBuf, (Weak<Line>, Arc<TurnCount>)>;

static LINES: LazyLock<Mutex<Lines>> = LazyLock::new(|| Mutex::new(HashMap::new()));

impl WriteQueue {
    /// The queue of the database `pool` writes to.
    pub fn of(pool: &SqlitePool) -> Self {
        let file = pool.connect_options().get_filename().to_path_buf();
        let mut lines = LINES.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = lines.entry(file).or_default();
        if let Some(line) = entry.0.upgrade() {
            return Self { line };
        }
        let line = Arc::new(Line {
            turns: Arc::new(tokio::sync::Mutex::new(())),
            pool: pool.clone(),
            count: Arc::clone(&entry.1),
        });
        entry.0 = Arc::downgrade(&line);
        Self { line }
    }

    /// Waits for this writer's turn, at most [`BUSY_TIMEOUT`] (as long as
    /// SQLite would wait for the lock).
    ///
    /// # Errors
    ///
    /// A retryable [`ErrorKind::Database`] when the turn did not come in
    /// time (another writer of this process kept its transaction open).
    pub async fn turn(&self, operation: &'static str) -> Result<WriteTurn> {
        let waiting = Waiting::new(&self.line.count.waiting);
        let turn =
            tokio::time::timeout(BUSY_TIMEOUT, Arc::clone(&self.line.turns).lock_owned()).await;
        drop(waiting);
        match turn {
            Ok(held) => Ok(WriteTurn {
                _held: held,
                line: Arc::clone(&self.line),
            }),
            Err(_) => Err(Error::with_source(
                ErrorKind::Database {
                    operation,
                    retryable: true,
                },
                format!(
                    "database is locked: another writer of this process kept a transaction \
                     open for more than {BUSY_TIMEOUT:?}"
                ),
            )),
        }
    }
}

/// A write transaction begun in its turn (see [`begin_write`]). It derefs
/// to the connection, so `&mut *tx` runs statements in it, and it rolls
/// back when dropped without [`commit`](Self::commit). The next writer's
/// turn comes when it ends.
#[derive(Debug)]
pub struct WriteTx {
    // Dropped first: the rollback of an abandoned transaction is queued on
    // the connection before the next writer's turn comes.
    tx: Transaction<'static, Sqlite>,
    _turn: WriteTurn,
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

impl WriteTx {
    /// Commits, and hands the turn to the next writer.
    ///
    /// # Errors
    ///
    /// The commit failed (nothing was written).
    pub async fn commit(self) -> std::result::Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    /// Rolls back, and hands the turn to the next writer.
    ///
    /// # Errors
    ///
    /// The rollback failed; the connection is closed, which ends the
    /// transaction.
    pub async fn rollback(self) -> std::result::Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

/// Waits for this process's turn to write to the database of `pool` (its
/// [`WriteQueue`]), then begins a transaction with `BEGIN IMMEDIATE`. Use it
/// for transactions that enqueue outbox rows or write anything else: they
/// then never meet this crate's writers at SQLite's lock.
///
/// ```no_run
/// # async fn f(pool: sqlx::SqlitePool) -> Result<(), Box<dyn std::error::Error>> {
/// let mut tx = orchestrator::sqlite::begin_write(&pool).await?;
/// sqlx::query("insert into orders (id) values (1)")
///     .execute(&mut *tx)
///     .await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// The turn did not come within [`BUSY_TIMEOUT`], or the transaction could
/// not begin.
pub async fn begin_write(pool: &SqlitePool) -> Result<WriteTx> {
    begin_write_for(pool, "begin a write transaction").await
}

/// [`begin_write`], naming what the transaction is for in its errors.
pub(crate) async fn begin_write_for(pool: &SqlitePool, operation: &'static str) -> Result<WriteTx> {
    let turn = WriteQueue::of(pool).turn(operation).await?;
    let tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| Error::db(operation, e))?;
    Ok(WriteTx { tx, _turn: turn })
}

/// A write transaction of this crate's busiest paths (saga transitions,
/// saga participants, the inbox) sent in as few round trips to the
/// connection's worker thread as its logic allows.
///
/// `sqlx` runs each SQLite statement, `BEGIN` and `COMMIT` included, as one
/// round trip to the connection's own thread, and on a busy host one such
/// trip costs about as much as the statement itself. A `Trip` sends nothing
/// when it starts: its first statement carries the `BEGIN IMMEDIATE`
/// ([`lite_begin!`]), and its closing statements (the outbox rows, say)
/// carry the `COMMIT` ([`finish`](Self::finish)). It holds this process's
/// write turn throughout. Dropped while open (an error, or a cancelled
/// future), it rolls back before the next writer's turn comes.
pub(crate) struct Trip {
    // Taken by `drop` to roll back an open transaction on its own task.
    conn: Option<PoolConnection<Sqlite>>,
    turn: Option<WriteTurn>,
    open: bool,
}

/// The prefix of a [`Trip`]'s first statement (the saga layer's macros
/// spell it out as well).
macro_rules! lite_begin {
    () => {
        "begin immediate; "
    };
}

impl Trip {
    /// Waits for the write turn and takes a connection; sends nothing.
    pub(crate) async fn start(pool: &SqlitePool, operation: &'static str) -> Result<Self> {
        let turn = WriteQueue::of(pool).turn(operation).await?;
        let conn = pool.acquire().await.map_err(|e| Error::db(operation, e))?;
        Ok(Self {
            conn: Some(conn),
            turn: Some(turn),
            open: false,
        })
    }

    /// The connection for the first statement, which begins with
    /// [`lite_begin!`]: from here on the transaction counts as open.
    pub(crate) fn open(&mut self) -> &mut SqliteConnection {
        self.open = true;
        self.conn()
    }

    /// The connection, for the statements between the first and the last.
    pub(crate) fn conn(&mut self) -> &mut SqliteConnection {
        match self.conn.as_mut() {
            Some(conn) => conn,
            // Only `drop` takes it.
            None => unreachable!("a trip's connection is taken only when it is dropped"),
        }
    }

    /// Commits (one statement), and hands the turn on.
    pub(crate) async fn commit(mut self, operation: &'static str) -> Result<()> {
        if self.open {
            sqlx::query("commit")
                .execute(self.conn())
                .await
                .map_err(|e| Error::db(operation, e))?;
            self.open = false;
        }
        Ok(())
    }

    /// Rolls back (one statement), and hands the turn on.
    pub(crate) async fn rollback(mut self) {
        if self.open && sqlx::query("rollback").execute(self.conn()).await.is_ok() {
            self.open = false;
        }
    }

    /// Runs `query`, whose text ends with [`closing`]'s `commit`: the
    /// transaction's last statements and its commit in one round trip.
    pub(crate) async fn finish(
        mut self,
        query: sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments>,
        operation: &'static str,
    ) -> Result<()> {
        query
            .execute(self.conn())
            .await
            .map_err(|e| Error::db(operation, e))?;
        self.open = false;
        Ok(())
    }
}

impl Drop for Trip {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let (Some(mut conn), turn) = (self.conn.take(), self.turn.take()) else {
            return;
        };
        // The rollback runs before the turn is handed on. Without a runtime
        // the connection is closed instead, which rolls back too.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if sqlx::query("rollback").execute(&mut *conn).await.is_err() {
                        conn.close_on_drop();
                    }
                    drop(conn);
                    drop(turn);
                });
            }
            Err(_) => conn.close_on_drop(),
        }
    }
}

/// Appends to `sql` the insert of `rows` outbox rows, their parameters
/// numbered from `first` (five each, bound by [`bind_rows`]), and the
/// `commit`: the closing statements of a [`Trip`].
pub(crate) fn closing(sql: &mut String, first: usize, rows: usize) {
    outbox_inserts(sql, first, rows);
    sql.push_str("commit");
}

/// Appends to `sql` the insert of `rows` outbox rows, their parameters
/// numbered from `first` (five each, bound by [`bind_rows`]).
pub(crate) fn outbox_inserts(sql: &mut String, first: usize, rows: usize) {
    use std::fmt::Write as _;
    for i in 0..rows {
        let n = first + i * 5;
        // Writing to a String cannot fail.
        let _ = write!(
            sql,
            "insert into orchestrator_outbox \
             (event_id, topic, partition_key, part, payload, created_ms) \
             values (${}, ${}, ${}, ${}, ${}, {}); ",
            n,
            n + 1,
            n + 2,
            n + 3,
            n + 4,
            now_ms!()
        );
    }
}

/// Binds `rows` in the order [`closing`] numbered them.
pub(crate) fn bind_rows<'q>(
    mut query: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>,
    rows: &'q [NewRow],
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments> {
    for row in rows {
        query = query
            .bind(&row.event_id)
            .bind(&row.topic)
            .bind(&row.partition_key)
            .bind(row.part)
            .bind(&row.payload);
    }
    query
}

/// Applies the embedded migrations (outbox, leases, inbox tables).
///
/// # Errors
///
/// [`ErrorKind::Migrate`] with the cause.
pub async fn migrate(pool: &SqlitePool) -> Result<()> {
    sqlx::migrate!("./migrations/sqlite")
        .run(pool)
        .await
        .map_err(|e| Error::with_source(ErrorKind::Migrate { backend: "sqlite" }, e))
}

impl Outbox<Sqlite> {
    /// An outbox on a migrated SQLite database (see [`migrate`]).
    ///
    /// Creates the partition lease rows on first use.
    ///
    /// # Errors
    ///
    /// An invalid `config`, a partition count that differs from the one the
    /// database already has, or a database failure.
    pub async fn sqlite(pool: SqlitePool, config: OutboxConfig) -> Result<Self> {
        config.validate()?;
        let err = |e| Error::db("create the outbox partitions", e);
        let mut tx = begin_write_for(&pool, "create the outbox partitions").await?;
        let existing: i64 = sqlx::query_scalar("select count(*) from orchestrator_outbox_leases")
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        let wanted = i64::from(config.partition_count());
        if existing != 0 && existing != wanted {
            return Err(Error::config(
                "partitions",
                format!(
                    "the database has {existing} outbox partitions, the configuration {wanted}"
                ),
            ));
        }
        if existing == 0 {
            for part in 0..config.partition_count() {
                sqlx::query("insert or ignore into orchestrator_outbox_leases (part) values (?)")
                    .bind(i64::from(part))
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
            }
        }
        tx.commit().await.map_err(err)?;
        Ok(Self {
            pool,
            config,
            signal: Arc::new(watch::Sender::new(0)),
        })
    }

    /// Writes `event` for `topic` into the outbox on `conn`, normally the
    /// caller's open transaction (`&mut *tx`): the row becomes visible when
    /// it commits and vanishes if it rolls back. Begin that transaction with
    /// [`begin_write`], so it takes its turn with the relays' writes, and
    /// call [`committed`](Outbox::committed) after the commit, so this
    /// process's relays look at once.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::EventTooLarge`] or [`ErrorKind::InvalidEvent`] before
    /// anything is written, or a database failure.
    pub async fn enqueue(
        &self,
        conn: &mut SqliteConnection,
        topic: &Topic,
        event: &Event,
    ) -> Result<()> {
        let row = encode(&self.config, topic, event)?;
        sqlx::query(concat!(
            "insert into orchestrator_outbox \
             (event_id, topic, partition_key, part, payload, created_ms) \
             values (?, ?, ?, ?, ?, ",
            now_ms!(),
            ")"
        ))
        .bind(&row.event_id)
        .bind(&row.topic)
        .bind(&row.partition_key)
        .bind(row.part)
        .bind(&row.payload)
        .execute(&mut *conn)
        .await
        .map_err(|e| Error::db("enqueue an outbox row", e))?;
        metrics::counter!("outbox_enqueued_total").increment(1);
        self.signal();
        Ok(())
    }

    /// Inserts `rows` and commits `trip`, in one round trip; then tells
    /// this process's relays.
    pub(crate) async fn commit_with(
        &self,
        trip: Trip,
        rows: &[NewRow],
        operation: &'static str,
    ) -> Result<()> {
        let mut sql = String::new();
        closing(&mut sql, 1, rows.len());
        trip.finish(bind_rows(sqlx::query(AssertSqlSafe(sql)), rows), operation)
            .await?;
        self.enqueued(rows.len());
        Ok(())
    }

    /// Counts `rows` enqueued by a committed [`Trip`] and wakes the relays.
    pub(crate) fn enqueued(&self, rows: usize) {
        if rows > 0 {
            metrics::counter!("outbox_enqueued_total").increment(rows as u64);
            self.committed();
        }
    }

    /// Rows the relay parked because the broker refused them for good (see
    /// [`Poison::Park`](crate::relay::Poison::Park)).
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn parked(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from orchestrator_outbox where failed_ms is not null",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| Error::db("count parked outbox rows", e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Puts every parked row back in line (once the cause is fixed); returns
    /// how many. Each keeps its place: it goes out before the rows of its
    /// partition enqueued after it that are still pending.
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn requeue_parked(&self) -> Result<u64> {
        let _turn = WriteQueue::of(&self.pool)
            .turn("requeue parked outbox rows")
            .await?;
        let done = sqlx::query(
            "update orchestrator_outbox set failed_ms = null, last_error = null \
             where failed_ms is not null",
        )
        .execute(&self.pool)
        .await
        .map_err(|e| Error::db("requeue parked outbox rows", e))?;
        Ok(done.rows_affected())
    }

    /// Rows not yet published nor parked (for monitoring and tests).
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn pending(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from orchestrator_outbox where published_ms is null and failed_ms is null",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| Error::db("count pending outbox rows", e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// A relay publishing this outbox's rows through `publisher`, woken by
    /// this outbox's `enqueue` calls. Nothing runs until [`Relay::run`] or
    /// [`Relay::spawn`].
    ///
    /// # Errors
    ///
    /// An invalid `config`.
    pub fn relay(&self, publisher: Arc<dyn Publisher>, config: RelayConfig) -> Result<Relay> {
        config.validate()?;
        let id = config
            .relay_id
            .clone()
            .unwrap_or_else(|| format!("relay-{}", uuid::Uuid::now_v7()));
        Ok(Relay {
            id,
            store: Arc::new(SqliteRelayStore {
                pool: self.pool.clone(),
            }),
            wakeup: Box::new(SignalWakeup {
                seen: *self.signal.borrow(),
                signal: self.signal.subscribe(),
            }),
            publisher,
            config,
            lingering: std::sync::Mutex::default(),
        })
    }
}

#[derive(Debug)]
struct SignalWakeup {
    signal: watch::Receiver<u64>,
    /// The `enqueue` count at the last wake-up.
    seen: u64,
}

#[async_trait]
impl Wakeup for SignalWakeup {
    async fn wait(&mut self, max: Duration) -> Wake {
        match tokio::time::timeout(max, self.signal.changed()).await {
            Ok(Ok(())) => {
                let now = *self.signal.borrow_and_update();
                // Any `enqueue` since the last look may belong to a
                // transaction still open: the relay then looks again shortly.
                let wake = if now == self.seen {
                    Wake::Committed
                } else {
                    Wake::Enqueued
                };
                self.seen = now;
                wake
            }
            _ => Wake::Timeout,
        }
    }
}

#[derive(Debug)]
struct SqliteRelayStore {
    pool: SqlitePool,
}

#[async_trait]
impl RelayStore for SqliteRelayStore {
    async fn tick_leases(&self, relay: &str, ttl_ms: i64) -> Result<Vec<i32>> {
        let err = |e| Error::db("renew the partition leases", e);
        let mut tx = begin_write_for(&self.pool, "renew the partition leases").await?;
        let now: i64 = sqlx::query_scalar(concat!("select ", now_ms!()))
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        sqlx::query(
            "insert into orchestrator_outbox_relays (relay_id, expires_ms) values (?1, ?2) \
             on conflict (relay_id) do update set expires_ms = excluded.expires_ms",
        )
        .bind(relay)
        .bind(now + ttl_ms)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        sqlx::query("delete from orchestrator_outbox_relays where expires_ms < ?1")
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let live: i64 = sqlx::query_scalar("select count(*) from orchestrator_outbox_relays")
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        let total: i64 = sqlx::query_scalar("select count(*) from orchestrator_outbox_leases")
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        let target = (total + live.max(1) - 1) / live.max(1);
        let mut mine: Vec<i32> = sqlx::query_scalar(
            "update orchestrator_outbox_leases set expires_ms = ?2 \
             where owner = ?1 and expires_ms > ?3 returning part",
        )
        .bind(relay)
        .bind(now + ttl_ms)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
        mine.sort_unstable();
        let held = i64::try_from(mine.len()).unwrap_or(i64::MAX);
        if held > target {
            let keep = usize::try_from(target).unwrap_or(0);
            let extra = mine.split_off(keep);
            sqlx::query(
                "update orchestrator_outbox_leases set owner = null, expires_ms = 0 \
                 where owner = ?1 and part in (select value from json_each(?2))",
            )
            .bind(relay)
            .bind(json_list(&extra))
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        } else if held < target {
            let taken: Vec<i32> = sqlx::query_scalar(
                "update orchestrator_outbox_leases set owner = ?1, expires_ms = ?2 \
                 where part in (select part from orchestrator_outbox_leases \
                 where owner is null or expires_ms <= ?3 order by part limit ?4) returning part",
            )
            .bind(relay)
            .bind(now + ttl_ms)
            .bind(now)
            .bind(target - held)
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
            mine.extend(taken);
            mine.sort_unstable();
        }
        tx.commit().await.map_err(err)?;
        Ok(mine)
    }

    async fn release(&self, relay: &str) -> Result<()> {
        let err = |e| Error::db("release the partition leases", e);
        let mut tx = begin_write_for(&self.pool, "release the partition leases").await?;
        sqlx::query(
            "update orchestrator_outbox_leases set owner = null, expires_ms = 0 where owner = ?1",
        )
        .bind(relay)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        sqlx::query("delete from orchestrator_outbox_relays where relay_id = ?1")
            .bind(relay)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)
    }

    async fn load_pending(
        &self,
        relay: &str,
        skip: &[i32],
        exclude: &[i64],
        limit: i64,
    ) -> Result<Vec<StoredRow>> {
        sqlx::query_as(concat!(
            "select o.part, o.id, o.topic, o.payload, ",
            now_ms!(),
            " - o.created_ms as age_ms from orchestrator_outbox_leases l \
             join orchestrator_outbox o on o.id in ( \
             select p.id from orchestrator_outbox p \
             where p.part = l.part and p.published_ms is null and p.failed_ms is null \
             and p.id not in (select value from json_each(?4)) order by p.id limit ?3) where l.owner = ?1 and l.expires_ms > ",
            now_ms!(),
            " and l.part not in (select value from json_each(?2)) order by o.part, o.id"
        ))
        .bind(relay)
        .bind(json_list(skip))
        .bind(limit)
        .bind(json_list(exclude))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| Error::db("load pending outbox rows", e))
    }

    async fn load_batch(&self, relay: &str, part: i32, limit: i64) -> Result<Vec<StoredRow>> {
        sqlx::query_as(concat!(
            "select o.part, o.id, o.topic, o.payload, ",
            now_ms!(),
            " - o.created_ms as age_ms from orchestrator_outbox o \
             where o.part = ?1 and o.published_ms is null and o.failed_ms is null and exists ( \
             select 1 from orchestrator_outbox_leases l where l.part = ?1 and l.owner = ?2 \
             and l.expires_ms > ",
            now_ms!(),
            ") order by o.id limit ?3"
        ))
        .bind(part)
        .bind(relay)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| Error::db("load an outbox batch", e))
    }

    async fn finish(&self, ids: &[i64], keep: bool) -> Result<()> {
        let _turn = WriteQueue::of(&self.pool)
            .turn("mark outbox rows published")
            .await?;
        let query = if keep {
            sqlx::query(concat!(
                "update orchestrator_outbox set published_ms = ",
                now_ms!(),
                " where id in (select value from json_each(?1))"
            ))
        } else {
            sqlx::query(
                "delete from orchestrator_outbox where id in (select value from json_each(?1))",
            )
        };
        query
            .bind(json_list(ids))
            .execute(&self.pool)
            .await
            .map_err(|e| Error::db("mark outbox rows published", e))?;
        Ok(())
    }

    async fn park(&self, id: i64, error: &str) -> Result<()> {
        let _turn = WriteQueue::of(&self.pool)
            .turn("park an outbox row")
            .await?;
        sqlx::query(concat!(
            "update orchestrator_outbox set failed_ms = ",
            now_ms!(),
            ", last_error = ?2 where id = ?1"
        ))
        .bind(id)
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(|e| Error::db("park an outbox row", e))?;
        Ok(())
    }

    async fn purge(&self, keep_ms: i64, limit: i64) -> Result<u64> {
        let _turn = WriteQueue::of(&self.pool)
            .turn("purge published outbox rows")
            .await?;
        let done = sqlx::query(concat!(
            "delete from orchestrator_outbox where id in (select id from orchestrator_outbox \
             where published_ms is not null and published_ms < ",
            now_ms!(),
            " - ?1 order by published_ms limit ?2)"
        ))
        .bind(keep_ms)
        .bind(limit)
        .execute(&self.pool)
        .await
        .map_err(|e| Error::db("purge published outbox rows", e))?;
        Ok(done.rows_affected())
    }
}

fn json_list<T: std::fmt::Display>(items: &[T]) -> String {
    let mut out = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item.to_string());
    }
    out.push(']');
    out
}

impl Inbox<Sqlite> {
    /// An inbox on a migrated SQLite database (see [`migrate`]).
    pub fn sqlite(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// Runs `handler` for `event` as consumer `consumer`, unless that
    /// consumer already handled the event: the handler's effects (made on
    /// the connection it is given, inside a `BEGIN IMMEDIATE` transaction)
    /// and the record of the event id commit together.
    ///
    /// The transaction begins with the statement that records the event
    /// id, so `sqlx` does not count it as one: inside the handler, nest with
    /// SQL savepoints (`savepoint s` … `release s`), not
    /// `Connection::begin`, which would fail.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Handler`] with the handler's error (nothing was
    /// committed), or a database failure.
    pub async fn process<T, F>(
        &self,
        consumer: &str,
        event: &Event,
        handler: F,
    ) -> Result<Processed<T>>
    where
        T: Send,
        F: for<'c> FnOnce(
                &'c mut SqliteConnection,
            ) -> BoxFuture<'c, std::result::Result<T, BoxError>>
            + Send,
    {
        // The `BEGIN IMMEDIATE` goes with the record of the event id.
        let mut trip = Trip::start(&self.pool, "begin an inbox transaction").await?;
        let inserted = sqlx::query(concat!(
            lite_begin!(),
            "insert into orchestrator_inbox (consumer, event_id, processed_ms) values (?1, ?2, ",
            now_ms!(),
            ") on conflict do nothing returning 1"
        ))
        .bind(consumer)
        .bind(event.id())
        .fetch_optional(trip.open())
        .await
        .map_err(|e| Error::db("record an inbox event", e))?;
        if inserted.is_none() {
            trip.rollback().await;
            metrics::counter!("inbox_duplicates_total", "consumer" => consumer.to_owned())
                .increment(1);
            return Ok(Processed::Duplicate);
        }
        let value = handler(trip.conn()).await.map_err(|e| {
            Error::with_source(
                ErrorKind::Handler {
                    consumer: consumer.to_owned(),
                    event_id: event.id().to_owned(),
                },
                e,
            )
        })?;
        trip.commit("commit an inbox transaction").await?;
        metrics::counter!("inbox_handled_total", "consumer" => consumer.to_owned()).increment(1);
        Ok(Processed::Handled(value))
    }

    /// Deletes at most `limit` records of events handled more than
    /// `older_than` ago (every consumer); returns how many. An event
    /// delivered again after its record is gone is handled again, so keep
    /// records longer than the broker can redeliver (its retention).
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn purge(&self, older_than: Duration, limit: u64) -> Result<u64> {
        let _turn = WriteQueue::of(&self.pool)
            .turn("purge inbox records")
            .await?;
        let done = sqlx::query(concat!(
            "delete from orchestrator_inbox where rowid in (select rowid from orchestrator_inbox \
             where processed_ms < ",
            now_ms!(),
            " - ?1 order by processed_ms limit ?2)"
        ))
        .bind(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(|e| Error::db("purge inbox records", e))?;
        Ok(done.rows_affected())
    }

    /// Whether `consumer` already handled the event `event_id`.
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn contains(&self, consumer: &str, event_id: &str) -> Result<bool> {
        let found: Option<i64> = sqlx::query_scalar(
            "select 1 from orchestrator_inbox where consumer = ?1 and event_id = ?2",
        )
        .bind(consumer)
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| Error::db("look up an inbox event", e))?;
        Ok(found.is_some())
    }
}

/// A directory of its own for a test's database files.
#[cfg(test)]
pub(crate) fn test_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A migrated database in `dir`, and its outbox.
#[cfg(test)]
pub(crate) async fn test_store(dir: &std::path::Path) -> (SqlitePool, Outbox<Sqlite>) {
    let pool = connect(&format!("sqlite://{}", dir.join("store.db").display()))
        .await
        .expect("open the database");
    migrate(&pool).await.expect("migrated");
    let outbox = Outbox::sqlite(pool.clone(), OutboxConfig::new())
        .await
        .expect("outbox");
    (pool, outbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pool(file: &std::path::Path) -> SqlitePool {
        connect(&format!("sqlite://{}", file.display()))
            .await
            .expect("open the database")
    }

    /// Frames in the WAL now (it checkpoints what it can, which is what
    /// every checkpoint before it left).
    async fn wal_frames(pool: &SqlitePool) -> i64 {
        let (_, log, _): (i64, i64, i64) = sqlx::query_as("pragma wal_checkpoint(passive)")
            .fetch_one(pool)
            .await
            .expect("checkpoint");
        log
    }

    /// After a burst of write turns and a quiet moment, this process has
    /// checkpointed the WAL in the background, so the next write starts the
    /// WAL over instead of growing it towards SQLite's own checkpoint on a
    /// writer's commit.
    #[tokio::test]
    async fn a_quiet_moment_after_writes_checkpoints_in_the_background() {
        let dir = test_dir("checkpoint");
        let db = pool(&dir.join("c.db")).await;
        sqlx::query("create table t (x blob)")
            .execute(&db)
            .await
            .expect("table");
        let write = || async {
            let mut tx = begin_write(&db).await.expect("turn");
            sqlx::query("insert into t (x) values (randomblob(3000))")
                .execute(&mut *tx)
                .await
                .expect("insert");
            tx.commit().await.expect("commit");
        };
        let burst = CHECKPOINT_EVERY * 2;
        for _ in 0..burst {
            write().await;
        }
        // Well below SQLite's own 1,000 pages: only ours can have run.
        tokio::time::sleep(QUIET * 20).await;
        write().await;
        let frames = wal_frames(&db).await;
        assert!(
            frames < 10,
            "the WAL holds {frames} frames after {burst} writes and a quiet moment"
        );
        db.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn writers_of_one_file_take_turns_across_pools() {
        let dir = test_dir("write-queue");
        let (a, b, other) = (
            pool(&dir.join("one.db")).await,
            pool(&dir.join("one.db")).await,
            pool(&dir.join("two.db")).await,
        );
        // A turn taken through one pool, no transaction open yet…
        let turn = WriteQueue::of(&a).turn("test").await.expect("first turn");
        // …makes a writer through another pool on the same file wait…
        let waiting = tokio::spawn({
            let b = b.clone();
            async move {
                let mut tx = begin_write(&b).await?;
                sqlx::query("create table t (x integer)")
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| Error::db("write", e))?;
                tx.commit().await.map_err(|e| Error::db("commit", e))
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "the second writer did not wait");
        // …while a writer of another file goes on.
        let mut elsewhere = begin_write(&other).await.expect("other file");
        sqlx::query("create table u (x integer)")
            .execute(&mut *elsewhere)
            .await
            .expect("write elsewhere");
        elsewhere.commit().await.expect("commit elsewhere");
        drop(turn);
        waiting
            .await
            .expect("task")
            .expect("the second writer's turn came once the first ended");
        for p in [a, b, other] {
            p.close().await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    async fn count(pool: &SqlitePool) -> i64 {
        sqlx::query_scalar("select count(*) from t")
            .fetch_one(pool)
            .await
            .expect("count")
    }

    /// A trip whose first statement inserted `x` into `t`.
    async fn opened(pool: &SqlitePool, x: i64) -> Trip {
        let mut trip = Trip::start(pool, "test").await.expect("turn");
        sqlx::query(concat!(lite_begin!(), "insert into t values ($1)"))
            .bind(x)
            .execute(trip.open())
            .await
            .expect("first statement");
        trip
    }

    /// A trip that ends in error or is cancelled after its first statement
    /// leaves nothing behind, and the next writer's turn comes after its
    /// rollback: on a file, and on the single connection of an in-memory
    /// database (which closing the connection would have emptied).
    #[tokio::test]
    async fn a_trip_dropped_open_rolls_back_before_the_next_writer() {
        let dir = test_dir("trip");
        let file = pool(&dir.join("one.db")).await;
        let memory = connect("sqlite::memory:")
            .await
            .expect("in-memory database");
        for pool in [file, memory] {
            sqlx::query("create table t (x integer)")
                .execute(&pool)
                .await
                .expect("create");
            // Dropped after its first statement, as an error or a timeout
            // would drop it.
            drop(opened(&pool, 1).await);
            // Cancelled while its first statement runs.
            let mut trip = Trip::start(&pool, "test").await.expect("start");
            // Polled once (the statement is sent; it may or may not have
            // finished), then dropped.
            let _ = futures_util::FutureExt::now_or_never(
                sqlx::query(concat!(lite_begin!(), "insert into t values (2)"))
                    .execute(trip.open()),
            );
            drop(trip);
            // The next writer finds neither row, and its own trip commits.
            let trip = opened(&pool, 3).await;
            let mut sql = String::new();
            closing(&mut sql, 1, 0);
            trip.finish(sqlx::query(AssertSqlSafe(sql)), "test")
                .await
                .expect("commit");
            assert_eq!(count(&pool).await, 1, "only the committed row stays");
            // A trip rolled back on purpose, and one that commits alone.
            opened(&pool, 4).await.rollback().await;
            opened(&pool, 5).await.commit("test").await.expect("commit");
            assert_eq!(count(&pool).await, 2);
            pool.close().await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
