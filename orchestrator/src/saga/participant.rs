//! The participant helper: handle a saga command and reply, idempotently.
//!
//! [`Participant::handle`] runs in one transaction: the inbox record of the
//! command id, the handler's effects and the reply (through the outbox)
//! commit together, so a re-delivered command is skipped and a reply is
//! never lost. A compensation leaves a tombstone for its step: a forward
//! command of that step arriving late (reordered) is handed to the handler
//! with [`SagaCommand::compensated`] set, and must be answered with a
//! failure and no effect.
//!
//! On SQLite, whose one writer at a time makes every transaction wait its
//! turn, commands that one participant (or its clones) handles at the same
//! time share one transaction (by default up to [`MAX_SHARED`] commands,
//! joining for [`MAX_SHARED_FOR`] after it began; see
//! [`Participant::sharing`]): each runs its
//! statements and its handler in a savepoint of its own, in turn, and one
//! commit covers them all. A handler that fails rolls back its own savepoint
//! only; a command's result is returned once the shared commit is done.
//! Create a participant once and clone it per command: participants created
//! separately do not share transactions.

use std::fmt;

#[cfg(feature = "postgres")]
use broker_adapters::cloudevents::Event;
#[cfg(feature = "postgres")]
use futures_util::future::BoxFuture;

#[cfg(feature = "postgres")]
use super::machine::Phase;
use super::protocol::{SagaCommand, StepReply};
#[cfg(feature = "postgres")]
use crate::error::Result;
use crate::error::{BoxError, Error, ErrorKind};
use crate::inbox::Processed;
use crate::outbox::Outbox;

/// A saga participant named `name` (its inbox consumer name) on one database.
/// Clones share it (on SQLite, its shared transactions).
pub struct Participant<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
    outbox: Outbox<DB>,
    name: String,
    source: String,
    #[cfg(feature = "sqlite")]
    group: std::sync::Arc<lite::Group>,
}

impl<DB: sqlx::Database> Clone for Participant<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            outbox: self.outbox.clone(),
            name: self.name.clone(),
            source: self.source.clone(),
            #[cfg(feature = "sqlite")]
            group: std::sync::Arc::clone(&self.group),
        }
    }
}

impl<DB: sqlx::Database> fmt::Debug for Participant<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Participant")
            .field("name", &self.name)
            .field("backend", &DB::NAME)
            .finish_non_exhaustive()
    }
}

fn tombstone(cmd: &SagaCommand) -> String {
    format!("compensated/{}/{}", cmd.saga.saga_id, cmd.saga.step)
}

impl<DB: sqlx::Database> Participant<DB> {
    fn with(pool: sqlx::Pool<DB>, outbox: Outbox<DB>, name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            pool,
            outbox,
            source: format!("/participants/{name}"),
            name,
            #[cfg(feature = "sqlite")]
            group: std::sync::Arc::default(),
        }
    }

    fn handler_error(&self, cmd: &SagaCommand, e: BoxError) -> Error {
        Error::with_source(
            ErrorKind::Handler {
                consumer: self.name.clone(),
                event_id: cmd.command_id.clone(),
            },
            e,
        )
    }

    fn counted(&self, processed: Processed<StepReply>) -> Processed<StepReply> {
        let counter = match processed {
            Processed::Duplicate => "inbox_duplicates_total",
            Processed::Handled(_) => "inbox_handled_total",
        };
        metrics::counter!(counter, "consumer" => self.name.clone()).increment(1);
        processed
    }
}

/// A compensation leaves its step's tombstone (`$mark`); a forward command
/// whose step has one (`$tombstones` > 0) is marked compensated.
macro_rules! compensated {
    ($now:ident, $self:ident, $cmd:ident, $mark:ident, $tombstones:ident, $conn:expr, $err:ident) => {
        match $cmd.saga.phase {
            Phase::Compensate => {
                sqlx::query(concat!(
                    "insert into orchestrator_inbox (consumer, event_id, processed_ms) values ($1, $2, ",
                    $now!(),
                    ") on conflict do nothing"
                ))
                .bind(&$self.name)
                .bind(&$mark)
                .execute($conn)
                .await
                .map_err($err)?;
            }
            Phase::Forward => $cmd.compensated = $tombstones > 0,
        }
    };
}

/// The statement that records a command in the inbox and tells whether its
/// step was compensated already (counts its tombstone, `$3`), after
/// `$prefix`.
macro_rules! record {
    ($prefix:literal, $now:ident) => {
        concat!(
            $prefix,
            "insert into orchestrator_inbox (consumer, event_id, processed_ms) values ($1, $2, ",
            $now!(),
            ") on conflict do nothing returning (select count(*) from orchestrator_inbox \
             where consumer = $1 and event_id = $3)"
        )
    };
}

#[cfg(feature = "postgres")]
impl Participant<sqlx::Postgres> {
    /// A participant called `name` whose replies go out through `outbox`.
    pub fn postgres(
        pool: sqlx::PgPool,
        outbox: Outbox<sqlx::Postgres>,
        name: impl Into<String>,
    ) -> Self {
        Self::with(pool, outbox, name)
    }

    /// Handles the command `event` once, in one transaction: records its
    /// id, runs `handler` on the transaction, sends its reply to the
    /// command's `sagareplyto` topic through the outbox, and commits.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Protocol`] for an event that is not a saga command
    /// (terminate it), [`ErrorKind::Handler`] when the handler failed
    /// (nothing committed; redeliver), or a database failure.
    pub async fn handle<F>(&self, event: &Event, handler: F) -> Result<Processed<StepReply>>
    where
        F: for<'c> FnOnce(
                &'c mut sqlx::PgConnection,
                &'c SagaCommand,
            ) -> BoxFuture<'c, std::result::Result<StepReply, BoxError>>
            + Send,
    {
        const OPERATION: &str = "handle a saga command";
        let mut cmd = SagaCommand::from_event(event)?;
        let err = |e| Error::db(OPERATION, e);
        let mut trip = crate::postgres::Trip::start(&self.pool, OPERATION).await?;
        let mark = tombstone(&cmd);
        let fresh: Option<i64> = sqlx::query_scalar(record!("", pg_now))
            .bind(&self.name)
            .bind(&cmd.command_id)
            .bind(&mark)
            .fetch_optional(trip.open())
            .await
            .map_err(err)?;
        let Some(tombstones) = fresh else {
            trip.rollback().await;
            return Ok(self.counted(Processed::Duplicate));
        };
        compensated!(pg_now, self, cmd, mark, tombstones, trip.conn(), err);
        let reply = handler(trip.conn(), &cmd)
            .await
            .map_err(|e| self.handler_error(&cmd, e))?;
        let event = cmd.reply_event(&reply, &self.source)?;
        let row = self.outbox.row(&cmd.reply_to, &event)?;
        self.outbox
            .commit_with(trip, std::slice::from_ref(&row), OPERATION)
            .await?;
        Ok(self.counted(Processed::Handled(reply)))
    }
}

#[cfg(feature = "sqlite")]
pub use self::lite::{MAX_SHARED, MAX_SHARED_FOR};

#[cfg(feature = "sqlite")]
mod lite {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
    use std::time::{Duration, Instant};

    use broker_adapters::cloudevents::Event;
    use futures_util::future::BoxFuture;
    use sqlx::{Sqlite, SqliteConnection, SqlitePool};
    use tokio::sync::oneshot;

    use super::{Participant, tombstone};
    use crate::error::{BoxError, Error, ErrorKind, Result};
    use crate::inbox::Processed;
    use crate::outbox::{NewRow, Outbox};
    use crate::saga::machine::Phase;
    use crate::saga::protocol::{SagaCommand, StepReply};
    use crate::sqlite::Trip;

    /// The most commands one shared SQLite transaction holds, by default.
    pub const MAX_SHARED: usize = 32;

    /// How long after a shared SQLite transaction began commands may still
    /// join it, by default: a command's result waits for the commit, so
    /// this bounds what slow handlers of other commands add to its latency.
    pub const MAX_SHARED_FOR: Duration = Duration::from_millis(5);

    const OPERATION: &str = "handle a saga command";

    /// One participant's (and its clones') shared transactions: whether
    /// one is held, and the commands waiting to join it.
    pub(super) struct Group {
        state: Mutex<GroupState>,
        max: usize,
        window: Duration,
    }

    impl Default for Group {
        fn default() -> Self {
            Self::new(MAX_SHARED, MAX_SHARED_FOR)
        }
    }

    #[derive(Default)]
    struct GroupState {
        held: bool,
        waiting: VecDeque<oneshot::Sender<Baton>>,
    }

    impl Group {
        fn new(max: usize, window: Duration) -> Self {
            Self {
                state: Mutex::default(),
                max: max.max(1),
                window,
            }
        }

        /// Commands waiting to join.
        #[cfg(test)]
        pub(super) fn waiting(&self) -> usize {
            self.lock().waiting.len()
        }

        fn lock(&self) -> MutexGuard<'_, GroupState> {
            self.state.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// The baton: the shared transaction from the command before, or,
        /// when none is held, an empty one that starts it.
        async fn join(self: &Arc<Self>) -> Baton {
            loop {
                let waiting = {
                    let mut state = self.lock();
                    if !state.held {
                        state.held = true;
                        return Baton::empty(Arc::clone(self));
                    }
                    let (tx, rx) = oneshot::channel();
                    state.waiting.push_back(tx);
                    rx
                };
                // A sender is dropped unsent only with its group; ask again.
                if let Ok(baton) = waiting.await {
                    return baton;
                }
            }
        }

        /// The shared transaction ended: the next waiting command starts
        /// another.
        fn release(self: &Arc<Self>) {
            let mut state = self.lock();
            let mut next = Baton::empty(Arc::clone(self));
            while let Some(waiter) = state.waiting.pop_front() {
                match waiter.send(next) {
                    Ok(()) => return,
                    // That command was cancelled while it waited.
                    Err(back) => next = back,
                }
            }
            state.held = false;
            // Dropped disarmed: nothing more to release.
            next.group = None;
        }

        /// A command waiting to join, if any.
        fn next_waiting(&self) -> Option<oneshot::Sender<Baton>> {
            self.lock().waiting.pop_front()
        }
    }

    /// The right to use the shared transaction, passed from command to
    /// command. Dropped without being committed (an error, a cancelled
    /// command), it rolls the transaction back (through its [`Trip`]), the
    /// commands in it fail with a retryable error, and the next waiting
    /// command starts a new one.
    struct Baton {
        trip: Option<Trip>,
        rows: Vec<NewRow>,
        /// Every command that ran in the transaction, told when it commits.
        members: Vec<oneshot::Sender<bool>>,
        joined: usize,
        began: Option<Instant>,
        group: Option<Arc<Group>>,
    }

    impl Baton {
        fn empty(group: Arc<Group>) -> Self {
            Self {
                trip: None,
                rows: Vec::new(),
                members: Vec::new(),
                joined: 0,
                began: None,
                group: Some(group),
            }
        }

        /// Hands the transaction to the next waiting command, or commits it
        /// when none waits or it is full.
        async fn hand_on(mut self, outbox: &Outbox<Sqlite>) {
            if let Some(group) = self.group.clone()
                && self.joined < group.max
                && self.began.is_some_and(|at| at.elapsed() < group.window)
            {
                while let Some(waiter) = group.next_waiting() {
                    match waiter.send(self) {
                        Ok(()) => return,
                        Err(back) => self = back,
                    }
                }
            }
            let committed = match self.trip.take() {
                Some(trip) => match outbox.commit_with(trip, &self.rows, OPERATION).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(
                            error = %e,
                            commands = self.joined,
                            "a transaction shared by saga commands did not commit"
                        );
                        false
                    }
                },
                None => false,
            };
            for member in self.members.drain(..) {
                // A command cancelled after its turn no longer listens; its
                // effects commit all the same.
                let _ = member.send(committed);
            }
        }
    }

    impl Drop for Baton {
        fn drop(&mut self) {
            // The trip (if still open) rolls back on its own; then the next
            // command may begin.
            drop(self.trip.take());
            if let Some(group) = self.group.take() {
                group.release();
            }
        }
    }

    /// A command handler, as [`Participant::handle`] takes it.
    type Handler<'h> = Box<
        dyn for<'c> FnOnce(
                &'c mut SqliteConnection,
                &'c SagaCommand,
            ) -> BoxFuture<'c, std::result::Result<StepReply, BoxError>>
            + Send
            + 'h,
    >;

    /// What a command's turn in the shared transaction came to.
    enum Turn {
        /// Recorded and handled (or found handled before): wait for the commit.
        Pending(oneshot::Receiver<bool>, Processed<StepReply>),
        /// The handler failed; its savepoint was rolled back.
        Failed(Error),
    }

    impl Participant<Sqlite> {
        /// A participant called `name` whose replies go out through `outbox`.
        pub fn sqlite(pool: SqlitePool, outbox: Outbox<Sqlite>, name: impl Into<String>) -> Self {
            Self::with(pool, outbox, name)
        }

        /// How many commands handled at the same time may share one
        /// transaction (default [`MAX_SHARED`]; 1 shares nothing), and for
        /// how long after it began commands may still join it (default
        /// [`MAX_SHARED_FOR`]). Applies to this participant and its clones
        /// made afterwards.
        #[must_use]
        pub fn sharing(mut self, max: usize, window: Duration) -> Self {
            self.group = Arc::new(Group::new(max, window));
            self
        }

        /// Handles the command `event` once: records its id, runs
        /// `handler` on the transaction, sends its reply to the command's
        /// `sagareplyto` topic through the outbox, and commits.
        ///
        /// Commands this participant and its clones handle at the same time
        /// share a transaction (see the [module docs](super)); `handler` runs
        /// in a savepoint of its own, so inside it nest with SQL savepoints,
        /// not `Connection::begin`, which would fail.
        ///
        /// # Errors
        ///
        /// [`ErrorKind::Protocol`] for an event that is not a saga
        /// command (terminate it), [`ErrorKind::Handler`] when the
        /// handler failed (nothing committed; redeliver), or a database
        /// failure, of this command's statements or of the shared
        /// transaction (nothing committed; redeliver).
        pub async fn handle<F>(&self, event: &Event, handler: F) -> Result<Processed<StepReply>>
        where
            F: for<'c> FnOnce(
                    &'c mut SqliteConnection,
                    &'c SagaCommand,
                )
                    -> BoxFuture<'c, std::result::Result<StepReply, BoxError>>
                + Send,
        {
            let cmd = SagaCommand::from_event(event)?;
            let mut baton = self.group.join().await;
            // On an error the shared transaction is in an unknown state:
            // dropping the baton rolls it back and fails every command in it.
            let turn = self.turn(&mut baton, cmd, Box::new(handler)).await?;
            baton.hand_on(&self.outbox).await;
            match turn {
                Turn::Failed(e) => Err(e),
                Turn::Pending(committed, processed) => match committed.await {
                    Ok(true) => Ok(self.counted(processed)),
                    _ => Err(Error::with_source(
                        ErrorKind::Database {
                            operation: OPERATION,
                            retryable: true,
                        },
                        "the transaction shared with other commands did not commit",
                    )),
                },
            }
        }

        /// This command's statements and handler, in a savepoint of the
        /// shared transaction (begun here if it is new).
        async fn turn(
            &self,
            baton: &mut Baton,
            mut cmd: SagaCommand,
            handler: Handler<'_>,
        ) -> Result<Turn> {
            let err = |e| Error::db(OPERATION, e);
            let trip = match &mut baton.trip {
                Some(trip) => trip,
                empty @ None => {
                    let trip = Trip::start(&self.pool, OPERATION).await?;
                    baton.began = Some(Instant::now());
                    empty.insert(trip)
                }
            };
            let first = baton.joined == 0;
            baton.joined += 1;
            let mark = tombstone(&cmd);
            // One statement opens this command's savepoint and records it.
            let (sql, conn) = if first {
                (
                    record!("begin immediate; savepoint participant; ", lite_now),
                    trip.open(),
                )
            } else {
                (record!("savepoint participant; ", lite_now), trip.conn())
            };
            let fresh: Option<i64> = sqlx::query_scalar(sql)
                .bind(&self.name)
                .bind(&cmd.command_id)
                .bind(&mark)
                .fetch_optional(conn)
                .await
                .map_err(err)?;
            let (tx, rx) = oneshot::channel();
            let Some(tombstones) = fresh else {
                baton.members.push(tx);
                return Ok(Turn::Pending(rx, Processed::Duplicate));
            };
            compensated!(lite_now, self, cmd, mark, tombstones, trip.conn(), err);
            let reply = match handler(trip.conn(), &cmd).await {
                Ok(reply) => Ok(reply),
                Err(e) => Err(self.handler_error(&cmd, e)),
            };
            let row = reply.and_then(|reply| {
                let event = cmd.reply_event(&reply, &self.source)?;
                Ok((self.outbox.row(&cmd.reply_to, &event)?, reply))
            });
            match row {
                Ok((row, reply)) => {
                    baton.rows.push(row);
                    baton.members.push(tx);
                    Ok(Turn::Pending(rx, Processed::Handled(reply)))
                }
                Err(e) => {
                    // Only this command's savepoint: the others go on.
                    sqlx::query("rollback to participant")
                        .execute(trip.conn())
                        .await
                        .map_err(err)?;
                    Ok(Turn::Failed(e))
                }
            }
        }
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use broker_adapters::CloudEventBuilder;
    use broker_adapters::cloudevents::Event;
    use futures_util::future::BoxFuture;
    use sqlx::SqlitePool;

    use super::Participant;
    use crate::error::{BoxError, ErrorKind};
    use crate::inbox::Processed;
    use crate::saga::protocol::{SAGA_PHASE, SAGA_REPLY_TO, SAGA_TYPE, SagaCommand, StepReply};

    async fn participant(
        name: &str,
    ) -> (Participant<sqlx::Sqlite>, SqlitePool, std::path::PathBuf) {
        let dir = crate::sqlite::test_dir("participant");
        let (pool, outbox) = crate::sqlite::test_store(&dir).await;
        sqlx::query("create table effects (saga text primary key)")
            .execute(&pool)
            .await
            .expect("effects table");
        (Participant::sqlite(pool.clone(), outbox, name), pool, dir)
    }

    fn command(saga: &str) -> Event {
        CloudEventBuilder::new("reserve", "/sagas/test")
            .id(format!("command-{saga}"))
            .partition_key(saga)
            .saga(saga, "reserve", 1)
            .extension(SAGA_PHASE, "forward")
            .extension(SAGA_REPLY_TO, "replies")
            .extension(SAGA_TYPE, "test@1")
            .json_data(&serde_json::json!({}))
            .build()
            .expect("a valid command")
    }

    async fn count(pool: &SqlitePool, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(pool)
            .await
            .expect("count")
    }

    fn done() -> StepReply {
        StepReply::Success {
            reply_type: "reserve.done".into(),
            data: serde_json::Value::Null,
        }
    }

    /// Records the saga's effect; fails for sagas named `fail-*`; counts
    /// the times it saw another command's uncommitted inbox record (the
    /// transaction is shared).
    fn effect<'c>(
        conn: &'c mut sqlx::SqliteConnection,
        cmd: &'c SagaCommand,
        pool: SqlitePool,
        shared: Arc<AtomicUsize>,
    ) -> BoxFuture<'c, Result<StepReply, BoxError>> {
        Box::pin(async move {
            sqlx::query("insert into effects (saga) values ($1)")
                .bind(&cmd.saga.saga_id)
                .execute(&mut *conn)
                .await?;
            let inside: i64 = sqlx::query_scalar("select count(*) from orchestrator_inbox")
                .fetch_one(&mut *conn)
                .await?;
            let outside: i64 = sqlx::query_scalar("select count(*) from orchestrator_inbox")
                .fetch_one(&pool)
                .await?;
            if inside - outside >= 2 {
                shared.fetch_add(1, Ordering::SeqCst);
            }
            if cmd.saga.saga_id.starts_with("fail-") {
                return Err("the handler failed".into());
            }
            Ok(done())
        })
    }

    /// Commands handled at once share transactions, and each comes out as
    /// it would alone: a failing handler loses only its own effects, a
    /// command handled twice at once is handled once, and the failed
    /// command is handled when it comes again. With a window of zero,
    /// nothing is shared, with the same outcome.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commands_handled_at_once_share_a_transaction_and_come_out_as_alone() {
        for (window, sharing) in [(Duration::from_secs(60), true), (Duration::ZERO, false)] {
            handled_at_once(window, sharing).await;
        }
    }

    async fn handled_at_once(window: Duration, sharing: bool) {
        let (p, pool, dir) = participant("inventory").await;
        let p = p.sharing(super::MAX_SHARED, window);
        let shared = Arc::new(AtomicUsize::new(0));
        let mut sagas: Vec<String> = (0..24).map(|i| format!("s-{i}")).collect();
        sagas.extend(["fail-1".into(), "fail-2".into(), "s-3".into(), "s-7".into()]);
        let tasks: Vec<_> = sagas
            .iter()
            .map(|saga| {
                let (p, pool, shared, event) =
                    (p.clone(), pool.clone(), Arc::clone(&shared), command(saga));
                tokio::spawn(async move {
                    p.handle(&event, |conn, cmd| effect(conn, cmd, pool, shared))
                        .await
                })
            })
            .collect();
        let (mut handled, mut duplicates, mut failed) = (0, 0, 0);
        for task in tasks {
            match task.await.expect("task") {
                Ok(Processed::Handled(_)) => handled += 1,
                Ok(Processed::Duplicate) => duplicates += 1,
                Err(e) if matches!(e.kind(), ErrorKind::Handler { .. }) => failed += 1,
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!((handled, duplicates, failed), (24, 2, 2));
        assert_eq!(
            shared.load(Ordering::SeqCst) > 0,
            sharing,
            "handlers that ran in a transaction shared with another command, window {window:?}"
        );
        assert_eq!(count(&pool, "select count(*) from effects").await, 24);
        assert_eq!(
            count(&pool, "select count(*) from orchestrator_inbox").await,
            24
        );
        assert_eq!(
            count(&pool, "select count(*) from orchestrator_outbox").await,
            24
        );
        assert_eq!(
            count(
                &pool,
                "select count(*) from effects where saga like 'fail-%'"
            )
            .await,
            0,
            "a failed handler's effects were rolled back"
        );

        // The failed command is not recorded: when it comes again, it is handled.
        let again = p
            .handle(&command("fail-1"), |conn, cmd| -> BoxFuture<'_, _> {
                Box::pin(async move {
                    sqlx::query("insert into effects (saga) values ($1)")
                        .bind(&cmd.saga.saga_id)
                        .execute(&mut *conn)
                        .await?;
                    Ok(done())
                })
            })
            .await
            .expect("handled");
        assert!(matches!(again, Processed::Handled(_)));
        assert_eq!(count(&pool, "select count(*) from effects").await, 25);
        pool.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A command cancelled while it holds the shared transaction rolls it
    /// back: the commands before it in that transaction fail with a
    /// retryable error and leave nothing, and the commands after it go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_cancelled_in_a_shared_transaction_rolls_it_back() {
        let (p, pool, dir) = participant("inventory").await;
        let p = p.sharing(super::MAX_SHARED, Duration::from_secs(60));
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
        let (a_runs_tx, a_runs_rx) = tokio::sync::oneshot::channel::<()>();
        // The first command's handler waits until the second waits to
        // join, so the two share the transaction.
        let first = tokio::spawn({
            let p = p.clone();
            async move {
                let group = Arc::clone(&p.group);
                p.handle(&command("a"), |conn, cmd| -> BoxFuture<'_, _> {
                    Box::pin(async move {
                        sqlx::query("insert into effects (saga) values ($1)")
                            .bind(&cmd.saga.saga_id)
                            .execute(&mut *conn)
                            .await?;
                        let _ = a_runs_tx.send(());
                        while group.waiting() == 0 {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Ok(done())
                    })
                })
                .await
            }
        });
        a_runs_rx.await.expect("a's handler runs");
        let hung = tokio::spawn({
            let p = p.clone();
            async move {
                p.handle(&command("b"), |_, _| -> BoxFuture<'_, _> {
                    Box::pin(async move {
                        let _ = entered_tx.send(());
                        std::future::pending::<()>().await;
                        Ok(done())
                    })
                })
                .await
            }
        });
        entered_rx.await.expect("b's handler runs");
        hung.abort();
        let err = first
            .await
            .expect("task")
            .expect_err("a's transaction was rolled back");
        assert!(err.is_retryable(), "{err}");
        assert_eq!(count(&pool, "select count(*) from effects").await, 0);
        assert_eq!(
            count(&pool, "select count(*) from orchestrator_inbox").await,
            0
        );

        // The next commands are not blocked, and `a` is handled when it comes again.
        for saga in ["a", "c"] {
            let handled = tokio::time::timeout(
                Duration::from_secs(5),
                p.handle(&command(saga), |_, _| -> BoxFuture<'_, _> {
                    Box::pin(async move { Ok(done()) })
                }),
            )
            .await
            .expect("not blocked")
            .expect("handled");
            assert!(matches!(handled, Processed::Handled(_)), "{saga}");
        }
        pool.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
