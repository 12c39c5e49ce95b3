//! The participant helper: handle a saga command and reply, idempotently.
//!
//! [`Participant::handle`] runs in one transaction: the inbox record of the
//! command id, the handler's effects and the reply (through the outbox)
//! commit together, so a re-delivered command is skipped and a reply is
//! never lost. A compensation leaves a tombstone for its step: a forward
//! command of that step arriving late (reordered) is handed to the handler
//! with [`SagaCommand::compensated`] set, and must be answered with a
//! failure and no effect.

use std::fmt;

use broker_adapters::cloudevents::Event;
use futures_util::future::BoxFuture;

use super::machine::Phase;
use super::protocol::{SagaCommand, StepReply};
use crate::error::{BoxError, Error, ErrorKind, Result};
use crate::inbox::Processed;
use crate::outbox::Outbox;

/// A saga participant named `name` (its inbox consumer name) on one database.
pub struct Participant<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
    outbox: Outbox<DB>,
    name: String,
    source: String,
}

impl<DB: sqlx::Database> Clone for Participant<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            outbox: self.outbox.clone(),
            name: self.name.clone(),
            source: self.source.clone(),
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

macro_rules! participant_impl {
    ($db:ty, $pool:ty, $conn:ty, $trip:ty, $first:literal, $ctor:ident, $now:ident) => {
        impl Participant<$db> {
            /// A participant called `name` whose replies go out through `outbox`.
            pub fn $ctor(pool: $pool, outbox: Outbox<$db>, name: impl Into<String>) -> Self {
                let name = name.into();
                Self {
                    pool,
                    outbox,
                    source: format!("/participants/{name}"),
                    name,
                }
            }

            /// Handles the command `event` once: records its id, runs
            /// `handler` on the transaction, sends its reply to the
            /// command's `sagareplyto` topic through the outbox, and commits.
            ///
            /// On SQLite the transaction begins with the statement that
            /// records the command, so `sqlx` does not count it as one:
            /// inside the handler, nest with SQL savepoints, not
            /// `Connection::begin`, which would fail.
            ///
            /// # Errors
            ///
            /// [`ErrorKind::Protocol`] for an event that is not a saga
            /// command (terminate it), [`ErrorKind::Handler`] when the
            /// handler failed (nothing committed; redeliver), or a database
            /// failure.
            pub async fn handle<F>(&self, event: &Event, handler: F) -> Result<Processed<StepReply>>
            where
                F: for<'c> FnOnce(&'c mut $conn, &'c SagaCommand) -> BoxFuture<'c, std::result::Result<StepReply, BoxError>>
                    + Send,
            {
                let mut cmd = SagaCommand::from_event(event)?;
                const OPERATION: &str = "handle a saga command";
                let err = |e| Error::db(OPERATION, e);
                let mut trip = <$trip>::start(&self.pool, OPERATION).await?;
                let mark = tombstone(&cmd);
                // One statement records the command and tells whether its
                // step was compensated already (the tombstone).
                let fresh: Option<i64> = sqlx::query_scalar(concat!(
                    $first,
                    "insert into orchestrator_inbox (consumer, event_id, processed_ms) values ($1, $2, ",
                    $now!(), ") on conflict do nothing returning (select count(*) from orchestrator_inbox \
                     where consumer = $1 and event_id = $3)"
                ))
                .bind(&self.name)
                .bind(&cmd.command_id)
                .bind(&mark)
                .fetch_optional(trip.open())
                .await
                .map_err(err)?;
                let Some(tombstones) = fresh else {
                    trip.rollback().await;
                    metrics::counter!("inbox_duplicates_total", "consumer" => self.name.clone()).increment(1);
                    return Ok(Processed::Duplicate);
                };
                match cmd.saga.phase {
                    Phase::Compensate => {
                        sqlx::query(concat!(
                            "insert into orchestrator_inbox (consumer, event_id, processed_ms) values ($1, $2, ",
                            $now!(), ") on conflict do nothing"
                        ))
                        .bind(&self.name)
                        .bind(&mark)
                        .execute(trip.conn())
                        .await
                        .map_err(err)?;
                    }
                    Phase::Forward => cmd.compensated = tombstones > 0,
                }
                let reply = handler(trip.conn(), &cmd).await.map_err(|e| {
                    Error::with_source(
                        ErrorKind::Handler {
                            consumer: self.name.clone(),
                            event_id: cmd.command_id.clone(),
                        },
                        e,
                    )
                })?;
                let event = cmd.reply_event(&reply, &self.source)?;
                let row = self.outbox.row(&cmd.reply_to, &event)?;
                self.outbox.commit_with(trip, std::slice::from_ref(&row), OPERATION).await?;
                metrics::counter!("inbox_handled_total", "consumer" => self.name.clone()).increment(1);
                Ok(Processed::Handled(reply))
            }
        }
    };
}

#[cfg(feature = "postgres")]
participant_impl!(
    sqlx::Postgres,
    sqlx::PgPool,
    sqlx::PgConnection,
    crate::postgres::Trip,
    "",
    postgres,
    pg_now
);

#[cfg(feature = "sqlite")]
participant_impl!(
    sqlx::Sqlite,
    sqlx::SqlitePool,
    sqlx::SqliteConnection,
    crate::sqlite::Trip,
    "begin immediate; ",
    sqlite,
    lite_now
);
