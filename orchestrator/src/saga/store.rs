//! The saga tables on PostgreSQL and SQLite: one implementation written
//! once (`saga_store!`) over both backends.

use std::sync::Arc;

use async_trait::async_trait;
use broker_adapters::Topic;

use super::definition::{Definitions, SagaDefinition};
use super::machine::{Input, SagaState, Transition};
use crate::error::Result;

/// What the coordinator shares with its store.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) definitions: Arc<Definitions>,
    pub(crate) reply_topic: Topic,
    pub(crate) consumer: String,
}

/// What a transition did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// The state changed (the note is in the history).
    Applied(String),
    /// Nothing changed: stale, early, unknown or not due; the reason.
    Ignored(String),
    /// The event was handled before (inbox).
    Duplicate,
}

/// Decides the input from the saga's definition and state.
pub(crate) type InputFn<'a> =
    dyn Fn(&SagaDefinition, &SagaState) -> std::result::Result<Input, String> + Send + Sync + 'a;

/// One reply of [`SagaStore::transition_replies`].
pub(crate) struct ReplyItem<'a> {
    pub(crate) saga_id: &'a str,
    pub(crate) event_id: &'a str,
    pub(crate) input: &'a InputFn<'a>,
}

/// What a loaded saga row and an input make.
enum Decision<'d> {
    /// Nothing to write (the reply's inbox record stays).
    Done(Handled),
    /// Transition `t` to write as the saga's `seq`-th.
    Write {
        def: &'d SagaDefinition,
        t: Transition,
        seq: i64,
    },
}

/// Decides a transition from the saga row's `saga_type`, `version`, `state`
/// and `seq` and the input.
fn decide<'d>(
    ctx: &'d Ctx,
    saga_type: &str,
    version: i64,
    state: &str,
    seq: i64,
    input: &InputFn<'_>,
) -> Result<Decision<'d>> {
    use crate::error::{Error, ErrorKind};
    let version = u32::try_from(version).unwrap_or(0);
    let def = ctx.definitions.get(saga_type, version).ok_or_else(|| {
        Error::new(ErrorKind::UnknownSaga {
            saga_type: saga_type.to_owned(),
            version: Some(version),
        })
    })?;
    let state: SagaState = serde_json::from_str(state).map_err(|e| {
        Error::with_source(
            ErrorKind::Codec {
                operation: "decode a saga state",
            },
            e,
        )
    })?;
    let input = match input(def, &state) {
        Ok(i) => i,
        Err(why) => return Ok(Decision::Done(Handled::Ignored(why))),
    };
    let t = super::machine::apply(def, &state, input);
    if !t.applied {
        metrics::counter!("saga_ignored_total").increment(1);
        return Ok(Decision::Done(Handled::Ignored(t.note)));
    }
    Ok(Decision::Write {
        def,
        t,
        seq: seq + 1,
    })
}

/// A stored saga row.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) saga_type: String,
    pub(crate) version: u32,
    pub(crate) state: String,
    pub(crate) updated_ms: i64,
}

#[async_trait]
pub(crate) trait SagaStore: Send + Sync + std::fmt::Debug {
    async fn insert(
        &self,
        ctx: &Ctx,
        saga_id: &str,
        def: &SagaDefinition,
        t: &Transition,
    ) -> Result<()>;
    /// Starts sagas of one definition, their ids distinct; each outcome is
    /// what [`insert`](Self::insert) gives it. By default each runs in its
    /// own transaction, all at once.
    async fn insert_many(
        &self,
        ctx: &Ctx,
        def: &SagaDefinition,
        items: &[(&str, Transition)],
    ) -> Vec<Result<()>> {
        futures_util::future::join_all(
            items
                .iter()
                .map(|(saga_id, t)| self.insert(ctx, saga_id, def, t)),
        )
        .await
    }
    async fn transition(
        &self,
        ctx: &Ctx,
        saga_id: &str,
        dedupe: Option<&str>,
        due_only: bool,
        input: &InputFn<'_>,
    ) -> Result<Handled>;
    /// Applies replies of distinct sagas; each outcome is what
    /// [`transition`](Self::transition) gives it. By default each runs in
    /// its own transaction, all at once.
    async fn transition_replies(&self, ctx: &Ctx, items: &[ReplyItem<'_>]) -> Vec<Result<Handled>> {
        futures_util::future::join_all(
            items.iter().map(|item| {
                self.transition(ctx, item.saga_id, Some(item.event_id), false, item.input)
            }),
        )
        .await
    }
    async fn claim_due(&self, lease_ms: i64, limit: i64) -> Result<Vec<String>>;
    async fn load(&self, saga_id: &str) -> Result<Option<Row>>;
    async fn history(&self, saga_id: &str) -> Result<Vec<(i64, i64, String, String)>>;
    async fn counts(&self) -> Result<Vec<(String, i64)>>;
    /// Sagas by id after `after`, of `status` if given, at most `limit`.
    async fn list(&self, status: Option<&str>, after: &str, limit: i64) -> Result<Vec<ListedRow>>;
}

/// A row of [`SagaStore::list`]: id, type, version, status, updated_ms.
pub(crate) type ListedRow = (String, String, i64, String, i64);

/// What a transition writes besides its history: the saga state as JSON,
/// the timer in ms, and the outbox rows of its commands.
struct Written {
    state: String,
    timer: Option<i64>,
    rows: Vec<crate::outbox::NewRow>,
}

fn written<DB: sqlx::Database>(
    ctx: &Ctx,
    outbox: &crate::outbox::Outbox<DB>,
    saga_id: &str,
    def: &SagaDefinition,
    t: &Transition,
) -> Result<Written> {
    use crate::error::{Error, ErrorKind};
    let state = serde_json::to_string(&t.state).map_err(|e| {
        Error::with_source(
            ErrorKind::Codec {
                operation: "encode a saga state",
            },
            e,
        )
    })?;
    let timer = t
        .timer
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4));
    let rows = t
        .commands
        .iter()
        .map(|cmd| {
            let (topic, event) =
                super::protocol::command_event(def, saga_id, cmd, &ctx.reply_topic)?;
            outbox.row(&topic, &event)
        })
        .collect::<Result<_>>()?;
    Ok(Written { state, timer, rows })
}

/// The store over one backend. `$trip` is its transaction (SQLite's folds
/// `BEGIN` into the first statement, spelled `$first`, and `COMMIT` into
/// the last, written by `close`); `$load_fresh` records a reply in the
/// inbox and loads the saga row in one statement. A reply is first offered
/// to the store's `reply_unlocked` (PostgreSQL's two-statement form;
/// SQLite's declines with `None`). Each backend writes its own `insert`
/// (a start) in `$extra`.
macro_rules! saga_store {
    ($store:ident, $db:ty, $pool:ty, $trip:ty, $first:literal, $now:ident, $lock:literal, $skip:literal, $load_fresh:expr, { $($extra:tt)* }) => {
        #[derive(Debug)]
        pub(crate) struct $store {
            pub(crate) pool: $pool,
            pub(crate) outbox: crate::outbox::Outbox<$db>,
        }

        #[async_trait]
        impl SagaStore for $store {
            async fn transition(
                &self,
                ctx: &Ctx,
                saga_id: &str,
                dedupe: Option<&str>,
                due_only: bool,
                input: &InputFn<'_>,
            ) -> Result<Handled> {
                use sqlx::Row as _;
                use crate::error::Error;
                const OPERATION: &str = "run a saga transition";
                if let Some(event_id) = dedupe
                    && !due_only
                    && let Some(done) = self.reply_unlocked(ctx, saga_id, event_id, input).await
                {
                    return done;
                }
                let err = |e| Error::db(OPERATION, e);
                let mut trip = <$trip>::start(&self.pool, OPERATION).await?;
                // With a reply to record, one statement records it in the
                // inbox and loads (and locks) the saga row.
                let row = match dedupe {
                    Some(event_id) => sqlx::query($load_fresh)
                        .bind(saga_id)
                        .bind(&ctx.consumer)
                        .bind(event_id)
                        .fetch_optional(trip.open())
                        .await
                        .map_err(err)?,
                    None => sqlx::query(concat!(
                        $first,
                        "select saga_type, version, state, seq, case when wake_ms <= ", $now!(),
                        " then 1 else 0 end as due from orchestrator_sagas where saga_id = $1", $lock
                    ))
                    .bind(saga_id)
                    .fetch_optional(trip.open())
                    .await
                    .map_err(err)?,
                };
                if dedupe.is_some()
                    && let Some(row) = &row
                {
                    let fresh: i64 = row.try_get("fresh").map_err(err)?;
                    if fresh == 0 {
                        trip.rollback().await;
                        return Ok(Handled::Duplicate);
                    }
                }
                let Some(row) = row else {
                    trip.commit(OPERATION).await?;
                    return Ok(Handled::Ignored(format!("unknown saga `{saga_id}`")));
                };
                let saga_type: String = row.try_get("saga_type").map_err(err)?;
                let version: i64 = row.try_get("version").map_err(err)?;
                let state: String = row.try_get("state").map_err(err)?;
                let seq: i64 = row.try_get("seq").map_err(err)?;
                let due: i32 = row.try_get("due").map_err(err)?;
                if due_only && due == 0 {
                    trip.rollback().await;
                    return Ok(Handled::Ignored("no timer is due".into()));
                }
                let (def, t, seq) = match decide(ctx, &saga_type, version, &state, seq, input)? {
                    Decision::Done(handled) => {
                        trip.commit(OPERATION).await?;
                        return Ok(handled);
                    }
                    Decision::Write { def, t, seq } => (def, t, seq),
                };
                self.close(trip, ctx, saga_id, def, &t, seq, OPERATION).await?;
                Ok(Handled::Applied(t.note))
            }

            async fn claim_due(&self, lease_ms: i64, limit: i64) -> Result<Vec<String>> {
                sqlx::query_scalar(concat!(
                    "update orchestrator_sagas set claim_ms = ", $now!(), " + $1 where saga_id in (\
                     select saga_id from orchestrator_sagas where wake_ms <= ", $now!(),
                    " and claim_ms <= ", $now!(), " order by wake_ms limit $2", $skip, ") returning saga_id"
                ))
                .bind(lease_ms)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| crate::error::Error::db("claim due saga timers", e))
            }

            async fn load(&self, saga_id: &str) -> Result<Option<Row>> {
                use sqlx::Row as _;
                let err = |e| crate::error::Error::db("read a saga", e);
                let row = sqlx::query("select saga_type, version, state, updated_ms from orchestrator_sagas where saga_id = $1")
                    .bind(saga_id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(err)?;
                let Some(row) = row else { return Ok(None) };
                let version: i64 = row.try_get("version").map_err(err)?;
                Ok(Some(Row {
                    saga_type: row.try_get("saga_type").map_err(err)?,
                    version: u32::try_from(version).unwrap_or(0),
                    state: row.try_get("state").map_err(err)?,
                    updated_ms: row.try_get("updated_ms").map_err(err)?,
                }))
            }

            async fn history(&self, saga_id: &str) -> Result<Vec<(i64, i64, String, String)>> {
                sqlx::query_as(
                    "select cast(seq as bigint), at_ms, status, note from orchestrator_saga_history where saga_id = $1 order by seq",
                )
                .bind(saga_id)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| crate::error::Error::db("read a saga's history", e))
            }

            async fn counts(&self) -> Result<Vec<(String, i64)>> {
                sqlx::query_as("select status, count(*) from orchestrator_sagas group by status order by status")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| crate::error::Error::db("count sagas", e))
            }

            async fn list(&self, status: Option<&str>, after: &str, limit: i64) -> Result<Vec<ListedRow>> {
                sqlx::query_as(
                    "select saga_id, saga_type, version, status, updated_ms from orchestrator_sagas \
                     where saga_id > $1 and ($2 is null or status = $2) order by saga_id limit $3",
                )
                .bind(after)
                .bind(status)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| crate::error::Error::db("list sagas", e))
            }

            $($extra)*
        }
    };
}

/// The saga row's update and its history row on PostgreSQL, parameters
/// `$1`..`$6`.
#[cfg(feature = "postgres")]
macro_rules! saga_write {
    (pg) => {
        concat!(
            "with saga as (update orchestrator_sagas set status = $2, state = $3, wake_ms = ",
            pg_now!(),
            " + $4, claim_ms = 0, seq = $5, updated_ms = ",
            pg_now!(),
            " where saga_id = $1) \
             insert into orchestrator_saga_history (saga_id, seq, at_ms, status, note) values ($1, $5, ",
            pg_now!(),
            ", $2, $6)"
        )
    };
}

#[cfg(feature = "postgres")]
saga_store!(
    PgSagaStore,
    sqlx::Postgres,
    sqlx::PgPool,
    crate::postgres::Trip,
    "",
    pg_now,
    " for update",
    " for update skip locked",
    concat!(
        "with fresh as (insert into orchestrator_inbox (consumer, event_id, processed_ms) values ($2, $3, ",
        pg_now!(),
        ") on conflict do nothing returning 1) \
         select (select count(*) from fresh) as fresh, saga_type, version, state, seq, \
         case when wake_ms <= ",
        pg_now!(),
        " then 1 else 0 end as due \
         from orchestrator_sagas where saga_id = $1 for update"
    ),
    {
        // A start: one statement (its own transaction).
        async fn insert(
            &self,
            ctx: &Ctx,
            saga_id: &str,
            def: &SagaDefinition,
            t: &Transition,
        ) -> Result<()> {
            self.start_in_one(ctx, saga_id, def, t).await
        }
    }
);

#[cfg(feature = "postgres")]
impl PgSagaStore {
    /// Writes transition `t` (saga row, history row, commands) and commits.
    #[allow(clippy::too_many_arguments)]
    async fn close(
        &self,
        mut trip: crate::postgres::Trip,
        ctx: &Ctx,
        saga_id: &str,
        def: &SagaDefinition,
        t: &Transition,
        seq: i64,
        operation: &'static str,
    ) -> Result<()> {
        let w = written(ctx, &self.outbox, saga_id, def, t)?;
        sqlx::query(saga_write!(pg))
            .bind(saga_id)
            .bind(t.state.status.name())
            .bind(&w.state)
            .bind(w.timer)
            .bind(seq)
            .bind(&t.note)
            .execute(trip.conn())
            .await
            .map_err(|e| crate::error::Error::db("update a saga and its history", e))?;
        self.outbox.commit_with(trip, &w.rows, operation).await?;
        metrics::counter!("saga_transitions_total", "status" => t.state.status.name()).increment(1);
        Ok(())
    }
}

/// The end of a one-statement transition on PostgreSQL: its commands
/// inserted into the outbox from the arrays `$1`..`$5` (event ids, topics,
/// partition keys, partitions, payloads; see
/// [`bind_outbox_arrays`](crate::postgres::bind_outbox_arrays)) when the
/// saga's write `done` returned a row, and the relays notified on `$6`.
/// The statement returns `applied`: whether `done` wrote.
#[cfg(feature = "postgres")]
macro_rules! pg_commands_and_notify {
    () => {
        concat!(
            "commands as (insert into orchestrator_outbox (event_id, topic, partition_key, part, payload, created_ms) \
             select r.e, r.t, r.k, r.p, r.b, ",
            pg_now!(),
            " from unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::text[]) with ordinality as r(e, t, k, p, b, n) \
             where exists (select 1 from done) order by r.n returning 1) \
             select (select count(*) from done) as applied, \
             (select count(*) from (select pg_notify($6, current_schema()) from (select 1 from commands limit 1) c) n) as notified"
        )
    };
}

/// Times a reply is tried without a lock before it takes the row lock:
/// each retry means another transition of the same saga committed between
/// the read and the write.
#[cfg(feature = "postgres")]
const UNLOCKED_TRIES: usize = 4;

#[cfg(feature = "postgres")]
impl PgSagaStore {
    /// Starts a saga in one statement (its own transaction): the saga row,
    /// its first history row and its commands, and the relays' wake-up.
    async fn start_in_one(
        &self,
        ctx: &Ctx,
        saga_id: &str,
        def: &SagaDefinition,
        t: &Transition,
    ) -> Result<()> {
        use crate::error::{Error, ErrorKind};
        let w = written(ctx, &self.outbox, saga_id, def, t)?;
        let query = sqlx::query_scalar(concat!(
            "with done as (insert into orchestrator_sagas (saga_id, saga_type, version, status, state, wake_ms, \
             claim_ms, seq, created_ms, updated_ms) values ($7, $8, $9, $10, $11, ",
            pg_now!(),
            " + $12, 0, 1, ",
            pg_now!(),
            ", ",
            pg_now!(),
            ") on conflict do nothing returning saga_id), \
             history as (insert into orchestrator_saga_history (saga_id, seq, at_ms, status, note) \
             select saga_id, 1, ",
            pg_now!(),
            ", $10, $13 from done), ",
            pg_commands_and_notify!()
        ));
        let applied: i64 = crate::postgres::bind_outbox_arrays(query, &w.rows)
            .bind(saga_id)
            .bind(&def.name)
            .bind(i64::from(def.version))
            .bind(t.state.status.name())
            .bind(&w.state)
            .bind(w.timer)
            .bind(&t.note)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| Error::db("start a saga", e))?;
        if applied == 0 {
            return Err(Error::new(ErrorKind::SagaExists {
                saga_id: saga_id.to_owned(),
            }));
        }
        metrics::counter!("outbox_enqueued_total").increment(w.rows.len() as u64);
        metrics::counter!("saga_started_total", "saga" => def.name.clone()).increment(1);
        metrics::counter!("saga_transitions_total", "status" => t.state.status.name()).increment(1);
        Ok(())
    }

    /// Applies a reply without locking the saga row: one statement reads
    /// the row and whether the reply was handled; one statement writes the
    /// transition (inbox record, saga row if its `seq` is still the one
    /// read, history, commands) and commits. When another transition of the
    /// saga came in between, nothing is written and the reply is tried
    /// again; after [`UNLOCKED_TRIES`] the locked transaction (`None`) takes
    /// over.
    async fn reply_unlocked(
        &self,
        ctx: &Ctx,
        saga_id: &str,
        event_id: &str,
        input: &InputFn<'_>,
    ) -> Option<Result<Handled>> {
        for _ in 0..UNLOCKED_TRIES {
            match self.reply_once(ctx, saga_id, event_id, input).await {
                Ok(Some(handled)) => return Some(Ok(handled)),
                Ok(None) => metrics::counter!("saga_reply_retries_total").increment(1),
                Err(e) => return Some(Err(e)),
            }
        }
        None
    }

    /// One try of [`reply_unlocked`](Self::reply_unlocked): `None` when the
    /// saga moved on between the read and the write.
    async fn reply_once(
        &self,
        ctx: &Ctx,
        saga_id: &str,
        event_id: &str,
        input: &InputFn<'_>,
    ) -> Result<Option<Handled>> {
        use crate::error::Error;
        use sqlx::Row as _;
        const OPERATION: &str = "run a saga transition";
        let err = |e| Error::db(OPERATION, e);
        let row = sqlx::query(
            "select exists (select 1 from orchestrator_inbox where consumer = $2 and event_id = $3) as seen, \
             s.saga_type, s.version, s.state, s.seq \
             from (select 1) one left join orchestrator_sagas s on s.saga_id = $1",
        )
        .bind(saga_id)
        .bind(&ctx.consumer)
        .bind(event_id)
        .fetch_one(&self.pool)
        .await
        .map_err(err)?;
        if row.try_get::<bool, _>("seen").map_err(err)? {
            return Ok(Some(Handled::Duplicate));
        }
        let saga_type: Option<String> = row.try_get("saga_type").map_err(err)?;
        let Some(saga_type) = saga_type else {
            // Recorded while the saga is still unknown.
            let recorded = self.record_reply(ctx, saga_id, event_id, None).await?;
            return Ok(recorded.then(|| Handled::Ignored(format!("unknown saga `{saga_id}`"))));
        };
        let version: i64 = row.try_get("version").map_err(err)?;
        let state: String = row.try_get("state").map_err(err)?;
        let seq: i64 = row.try_get("seq").map_err(err)?;
        match decide(ctx, &saga_type, version, &state, seq, input)? {
            Decision::Done(handled) => {
                // Recorded while the saga is still as read.
                let recorded = self.record_reply(ctx, saga_id, event_id, Some(seq)).await?;
                Ok(recorded.then_some(handled))
            }
            Decision::Write { def, t, seq } => {
                let w = written(ctx, &self.outbox, saga_id, def, &t)?;
                let query = sqlx::query_scalar(concat!(
                    "with done as (update orchestrator_sagas set status = $10, state = $11, wake_ms = ",
                    pg_now!(),
                    " + $12, claim_ms = 0, seq = $13, updated_ms = ",
                    pg_now!(),
                    " where saga_id = $7 and seq = $13 - 1 returning saga_id), \
                     inbox as (insert into orchestrator_inbox (consumer, event_id, processed_ms) \
                     select $8, $9, ",
                    pg_now!(),
                    " from done), \
                     history as (insert into orchestrator_saga_history (saga_id, seq, at_ms, status, note) \
                     select saga_id, $13, ",
                    pg_now!(),
                    ", $10, $14 from done), ",
                    pg_commands_and_notify!()
                ));
                let written: std::result::Result<i64, sqlx::Error> =
                    crate::postgres::bind_outbox_arrays(query, &w.rows)
                        .bind(saga_id)
                        .bind(&ctx.consumer)
                        .bind(event_id)
                        .bind(t.state.status.name())
                        .bind(&w.state)
                        .bind(w.timer)
                        .bind(seq)
                        .bind(&t.note)
                        .fetch_one(&self.pool)
                        .await;
                match written {
                    Ok(0) => Ok(None),
                    Ok(_) => {
                        metrics::counter!("outbox_enqueued_total").increment(w.rows.len() as u64);
                        metrics::counter!("saga_transitions_total", "status" => t.state.status.name())
                            .increment(1);
                        Ok(Some(Handled::Applied(t.note)))
                    }
                    // Recorded meanwhile by another delivery of the reply:
                    // nothing was written; the next read tells.
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(None),
                    Err(e) => Err(err(e)),
                }
            }
        }
    }

    /// Records a reply that changes nothing in the inbox if the saga is
    /// still as read: at `seq`, or (`None`) still unknown. Returns whether
    /// it did (if not, read again).
    async fn record_reply(
        &self,
        ctx: &Ctx,
        saga_id: &str,
        event_id: &str,
        seq: Option<i64>,
    ) -> Result<bool> {
        const AT_SEQ: &str = concat!(
            "insert into orchestrator_inbox (consumer, event_id, processed_ms) select $2, $3, ",
            pg_now!(),
            " where exists (select 1 from orchestrator_sagas where saga_id = $1 and seq = $4) \
             on conflict do nothing returning 1"
        );
        const UNKNOWN: &str = concat!(
            "insert into orchestrator_inbox (consumer, event_id, processed_ms) select $2, $3, ",
            pg_now!(),
            " where not exists (select 1 from orchestrator_sagas where saga_id = $1) \
             on conflict do nothing returning 1"
        );
        let query = sqlx::query_scalar(if seq.is_some() { AT_SEQ } else { UNKNOWN })
            .bind(saga_id)
            .bind(&ctx.consumer)
            .bind(event_id);
        let query = match seq {
            Some(seq) => query.bind(seq),
            None => query,
        };
        let recorded: Option<i32> = query
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| crate::error::Error::db("record a saga reply", e))?;
        Ok(recorded.is_some())
    }
}

#[cfg(feature = "sqlite")]
saga_store!(
    SqliteSagaStore,
    sqlx::Sqlite,
    sqlx::SqlitePool,
    crate::sqlite::Trip,
    "begin immediate; ",
    lite_now,
    "",
    "",
    concat!(
        "begin immediate; insert into orchestrator_inbox (consumer, event_id, processed_ms) values ($2, $3, ",
        lite_now!(),
        ") on conflict do nothing; \
         select changes() as fresh, saga_type, version, state, seq, \
         case when wake_ms <= ",
        lite_now!(),
        " then 1 else 0 end as due \
         from orchestrator_sagas where saga_id = $1"
    ),
    {
        // A start: one transaction of two round trips.
        async fn insert(
            &self,
            ctx: &Ctx,
            saga_id: &str,
            def: &SagaDefinition,
            t: &Transition,
        ) -> Result<()> {
            use crate::error::{Error, ErrorKind};
            let err = |e| Error::db("start a saga", e);
            let mut trip = crate::sqlite::Trip::start(&self.pool, "start a saga").await?;
            let inserted: Option<i32> = sqlx::query_scalar(concat!(
                "begin immediate; insert into orchestrator_sagas (saga_id, saga_type, version, status, state, claim_ms, seq, created_ms, updated_ms) \
                 values ($1, $2, $3, 'running', '{}', 0, 0, ", lite_now!(), ", ", lite_now!(), ") on conflict do nothing returning 1"
            ))
            .bind(saga_id)
            .bind(&def.name)
            .bind(i64::from(def.version))
            .fetch_optional(trip.open())
            .await
            .map_err(err)?;
            if inserted.is_none() {
                trip.rollback().await;
                return Err(Error::new(ErrorKind::SagaExists {
                    saga_id: saga_id.to_owned(),
                }));
            }
            self.close(trip, ctx, saga_id, def, t, 1, "start a saga")
                .await?;
            metrics::counter!("saga_started_total", "saga" => def.name.clone()).increment(1);
            Ok(())
        }

        // Sagas started together: one transaction of two round trips per
        // STARTS_PER_TRANSACTION of them.
        async fn insert_many(
            &self,
            ctx: &Ctx,
            def: &SagaDefinition,
            items: &[(&str, Transition)],
        ) -> Vec<Result<()>> {
            let mut done = Vec::with_capacity(items.len());
            for chunk in items.chunks(STARTS_PER_TRANSACTION) {
                if chunk.len() > 1 {
                    match self.starts_in_one(ctx, def, chunk).await {
                        Ok(outcomes) => {
                            done.extend(outcomes);
                            continue;
                        }
                        Err(e) => tracing::warn!(
                            error = %e,
                            sagas = chunk.len(),
                            "sagas could not be started together; starting them one by one"
                        ),
                    }
                }
                for (saga_id, t) in chunk {
                    done.push(self.insert(ctx, saga_id, def, t).await);
                }
            }
            done
        }

        // Several replies in one transaction of two round trips.
        async fn transition_replies(
            &self,
            ctx: &Ctx,
            items: &[ReplyItem<'_>],
        ) -> Vec<Result<Handled>> {
            if items.len() > 1 {
                match self.replies_in_one(ctx, items).await {
                    Ok(done) => return done,
                    Err(e) => tracing::warn!(
                        error = %e,
                        replies = items.len(),
                        "saga replies could not be applied together; applying them one by one"
                    ),
                }
            }
            let mut done = Vec::with_capacity(items.len());
            for item in items {
                done.push(
                    self.transition(ctx, item.saga_id, Some(item.event_id), false, item.input)
                        .await,
                );
            }
            done
        }
    }
);

/// Appends a transition's statements on SQLite: the saga row's update, its
/// history row and the outbox rows of `w`, their parameters numbered from
/// `n` (bound in that order by [`lite_bind_write`]); returns the next free
/// number.
#[cfg(feature = "sqlite")]
fn lite_saga_write(sql: &mut String, n: usize, w: &Written) -> usize {
    use std::fmt::Write as _;
    let (id, status, state, timer, seq, note) = (n, n + 1, n + 2, n + 3, n + 4, n + 5);
    // Writing to a String cannot fail.
    let _ = write!(
        sql,
        "update orchestrator_sagas set status = ${status}, state = ${state}, wake_ms = {now} + ${timer}, \
         claim_ms = 0, seq = ${seq}, updated_ms = {now} where saga_id = ${id}; \
         insert into orchestrator_saga_history (saga_id, seq, at_ms, status, note) \
         values (${id}, ${seq}, {now}, ${status}, ${note}); ",
        now = lite_now!()
    );
    crate::sqlite::outbox_inserts(sql, n + 6, w.rows.len());
    n + 6 + 5 * w.rows.len()
}

/// Binds the parameters of [`lite_saga_write`] for transition `t`, the
/// saga's `seq`-th.
#[cfg(feature = "sqlite")]
fn lite_bind_write<'q>(
    query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    saga_id: &'q str,
    t: &'q Transition,
    seq: i64,
    w: &'q Written,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    let query = query
        .bind(saga_id)
        .bind(t.state.status.name())
        .bind(&w.state)
        .bind(w.timer)
        .bind(seq)
        .bind(&t.note);
    crate::sqlite::bind_rows(query, &w.rows)
}

/// SQLite's transactions already fold `BEGIN` into their first statement
/// and `COMMIT` into their last, under the one writer's lock: its replies
/// take the shared path.
#[cfg(feature = "sqlite")]
impl SqliteSagaStore {
    async fn reply_unlocked(
        &self,
        _: &Ctx,
        _: &str,
        _: &str,
        _: &InputFn<'_>,
    ) -> Option<Result<Handled>> {
        None
    }
}

#[cfg(feature = "sqlite")]
impl SqliteSagaStore {
    /// Writes transition `t` (saga row, history row, commands) and commits,
    /// in one round trip.
    #[allow(clippy::too_many_arguments)]
    async fn close(
        &self,
        trip: crate::sqlite::Trip,
        ctx: &Ctx,
        saga_id: &str,
        def: &SagaDefinition,
        t: &Transition,
        seq: i64,
        operation: &'static str,
    ) -> Result<()> {
        let w = written(ctx, &self.outbox, saga_id, def, t)?;
        let mut sql = String::new();
        lite_saga_write(&mut sql, 1, &w);
        sql.push_str("commit");
        let query = lite_bind_write(sqlx::query(sqlx::AssertSqlSafe(sql)), saga_id, t, seq, &w);
        trip.finish(query, operation).await?;
        self.outbox.enqueued(w.rows.len());
        metrics::counter!("saga_transitions_total", "status" => t.state.status.name()).increment(1);
        Ok(())
    }
}

/// The most sagas one SQLite transaction starts: their parameters stay far
/// below SQLite's limit of 32,766 while a first step has up to 50 commands.
#[cfg(feature = "sqlite")]
const STARTS_PER_TRANSACTION: usize = 128;

#[cfg(feature = "sqlite")]
impl SqliteSagaStore {
    /// Starts sagas of `def` in one transaction of two round trips: one
    /// statement inserts every saga row that does not exist yet and returns
    /// the ids it inserted; the other writes the first transition of each
    /// (saga row, history, commands) and commits. An id taken before is
    /// [`ErrorKind::SagaExists`](crate::ErrorKind) (ids within `items` are
    /// distinct); a database failure fails the whole batch, which then
    /// rolls back.
    async fn starts_in_one(
        &self,
        ctx: &Ctx,
        def: &SagaDefinition,
        items: &[(&str, Transition)],
    ) -> Result<Vec<Result<()>>> {
        use std::collections::HashSet;
        use std::fmt::Write as _;

        use crate::error::{Error, ErrorKind};
        const OPERATION: &str = "start sagas";
        let err = |e| Error::db(OPERATION, e);
        let exists = |saga_id: &str| {
            Err(Error::new(ErrorKind::SagaExists {
                saga_id: saga_id.to_owned(),
            }))
        };

        // What cannot be encoded fails alone.
        let mut outcomes: Vec<Result<()>> = Vec::with_capacity(items.len());
        let mut writes = Vec::new();
        for (i, (saga_id, t)) in items.iter().enumerate() {
            match written(ctx, &self.outbox, saga_id, def, t) {
                Ok(w) => {
                    // Filled in once the batch commits.
                    outcomes.push(Ok(()));
                    writes.push((i, w));
                }
                Err(e) => outcomes.push(Err(e)),
            }
        }
        if writes.is_empty() {
            return Ok(outcomes);
        }

        // Writing to a String cannot fail.
        let mut sql = String::from(
            "begin immediate; insert into orchestrator_sagas (saga_id, saga_type, version, status, state, \
             claim_ms, seq, created_ms, updated_ms) values ",
        );
        for k in 0..writes.len() {
            let sep = if k == 0 { "" } else { ", " };
            let _ = write!(
                sql,
                "{sep}(${}, $1, $2, 'running', '{{}}', 0, 0, {now}, {now})",
                k + 3,
                now = lite_now!()
            );
        }
        sql.push_str(" on conflict do nothing returning saga_id");
        let mut insert = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(&def.name)
            .bind(i64::from(def.version));
        for (i, _) in &writes {
            insert = insert.bind(items[*i].0);
        }
        let mut trip = crate::sqlite::Trip::start(&self.pool, OPERATION).await?;
        let inserted: HashSet<String> = insert
            .fetch_all(trip.open())
            .await
            .map_err(err)?
            .into_iter()
            .collect();
        writes.retain(|(i, _)| {
            let saga_id = items[*i].0;
            let fresh = inserted.contains(saga_id);
            if !fresh {
                outcomes[*i] = exists(saga_id);
            }
            fresh
        });
        if writes.is_empty() {
            trip.rollback().await;
            return Ok(outcomes);
        }

        let mut sql = String::new();
        let mut n = 1;
        for (_, w) in &writes {
            n = lite_saga_write(&mut sql, n, w);
        }
        sql.push_str("commit");
        let mut write = sqlx::query(sqlx::AssertSqlSafe(sql));
        let mut enqueued = 0;
        for (i, w) in &writes {
            let (saga_id, t) = &items[*i];
            write = lite_bind_write(write, saga_id, t, 1, w);
            enqueued += w.rows.len();
        }
        trip.finish(write, OPERATION).await?;
        self.outbox.enqueued(enqueued);
        metrics::counter!("saga_started_total", "saga" => def.name.clone())
            .increment(writes.len() as u64);
        for (i, _) in &writes {
            let status = items[*i].1.state.status.name();
            metrics::counter!("saga_transitions_total", "status" => status).increment(1);
        }
        Ok(outcomes)
    }

    /// Applies replies of distinct sagas in one transaction of two round
    /// trips: one query records every reply in the inbox and loads its
    /// saga row; the other writes every transition (saga row, history,
    /// commands), drops the inbox records of the replies that failed (so
    /// they are tried again, as alone), and commits. A database failure
    /// fails the whole batch, which then rolls back.
    async fn replies_in_one(
        &self,
        ctx: &Ctx,
        items: &[ReplyItem<'_>],
    ) -> Result<Vec<Result<Handled>>> {
        use std::fmt::Write as _;

        use sqlx::Row as _;

        use crate::error::Error;
        const OPERATION: &str = "apply saga replies";
        let err = |e| Error::db(OPERATION, e);

        // Writing to a String cannot fail.
        let mut sql = String::from("begin immediate; ");
        for i in 0..items.len() {
            let (saga, event) = (2 + 2 * i, 3 + 2 * i);
            let _ = write!(
                sql,
                "insert into orchestrator_inbox (consumer, event_id, processed_ms) \
                 values ($1, ${event}, {now}) on conflict do nothing; \
                 select {i} as item, changes() as fresh, saga_type, version, state, seq \
                 from orchestrator_sagas where saga_id = ${saga}; ",
                now = lite_now!()
            );
        }
        let mut load = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(&ctx.consumer);
        for item in items {
            load = load.bind(item.saga_id).bind(item.event_id);
        }
        let mut trip = crate::sqlite::Trip::start(&self.pool, OPERATION).await?;
        let mut loaded: Vec<Option<sqlx::sqlite::SqliteRow>> =
            std::iter::repeat_with(|| None).take(items.len()).collect();
        for row in load.fetch_all(trip.open()).await.map_err(err)? {
            let i: i64 = row.try_get("item").map_err(err)?;
            if let Some(slot) = usize::try_from(i).ok().and_then(|i| loaded.get_mut(i)) {
                *slot = Some(row);
            }
        }

        let mut outcomes: Vec<Result<Handled>> = Vec::with_capacity(items.len());
        let mut writes = Vec::new();
        let mut undo = Vec::new();
        for (i, (item, row)) in items.iter().zip(loaded).enumerate() {
            let Some(row) = row else {
                outcomes.push(Ok(Handled::Ignored(format!(
                    "unknown saga `{}`",
                    item.saga_id
                ))));
                continue;
            };
            let fresh: i64 = row.try_get("fresh").map_err(err)?;
            if fresh == 0 {
                outcomes.push(Ok(Handled::Duplicate));
                continue;
            }
            let saga_type: String = row.try_get("saga_type").map_err(err)?;
            let version: i64 = row.try_get("version").map_err(err)?;
            let state: String = row.try_get("state").map_err(err)?;
            let seq: i64 = row.try_get("seq").map_err(err)?;
            let decided =
                decide(ctx, &saga_type, version, &state, seq, item.input).and_then(|decision| {
                    match decision {
                        Decision::Done(handled) => Ok(Err(handled)),
                        Decision::Write { def, t, seq } => {
                            let w = written(ctx, &self.outbox, item.saga_id, def, &t)?;
                            Ok(Ok((t, seq, w)))
                        }
                    }
                });
            match decided {
                Ok(Err(handled)) => outcomes.push(Ok(handled)),
                Ok(Ok(write)) => {
                    // Filled in once the batch commits.
                    outcomes.push(Ok(Handled::Duplicate));
                    writes.push((i, write));
                }
                Err(e) => {
                    outcomes.push(Err(e));
                    undo.push(item);
                }
            }
        }

        let mut sql = String::new();
        let mut n = 1;
        for (_, (_, _, w)) in &writes {
            n = lite_saga_write(&mut sql, n, w);
        }
        for _ in &undo {
            let _ = write!(
                sql,
                "delete from orchestrator_inbox where consumer = ${} and event_id = ${}; ",
                n,
                n + 1
            );
            n += 2;
        }
        sql.push_str("commit");
        let mut write = sqlx::query(sqlx::AssertSqlSafe(sql));
        let mut enqueued = 0;
        for (i, (t, seq, w)) in &writes {
            write = lite_bind_write(write, items[*i].saga_id, t, *seq, w);
            enqueued += w.rows.len();
        }
        for item in &undo {
            write = write.bind(&ctx.consumer).bind(item.event_id);
        }
        trip.finish(write, OPERATION).await?;
        self.outbox.enqueued(enqueued);
        for (i, (t, _, _)) in writes {
            metrics::counter!("saga_transitions_total", "status" => t.state.status.name())
                .increment(1);
            outcomes[i] = Ok(Handled::Applied(t.note));
        }
        Ok(outcomes)
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use std::sync::Arc;

    use broker_adapters::Topic;

    use super::{Ctx, SagaStore as _, SqliteSagaStore};
    use crate::error::ErrorKind;
    use crate::saga::definition::{Action, Definitions, SagaDefinition, Step};
    use crate::saga::machine;

    /// Sagas started together on SQLite share one transaction: each comes
    /// out as it would alone (an id taken before is refused, the others
    /// start with their first command in the outbox), and every saga of the
    /// batch was written by the same statement.
    #[tokio::test]
    async fn sagas_started_together_come_out_as_alone() {
        let dir = crate::sqlite::test_dir("starts");
        let (pool, outbox) = crate::sqlite::test_store(&dir).await;
        let def = SagaDefinition::builder("s", 1)
            .step(Step::new(
                "a",
                Action::new("com.example.do", "things").on_success("com.example.done"),
            ))
            .build()
            .expect("a valid definition");
        let ctx = Ctx {
            definitions: Arc::new(Definitions::new().with(def.clone()).expect("definitions")),
            reply_topic: Topic::from_static("replies"),
            consumer: "coordinator".into(),
        };
        let store = SqliteSagaStore {
            pool: pool.clone(),
            outbox,
        };
        let start = || machine::start(&def, serde_json::json!({}));
        store
            .insert(&ctx, "taken", &def, &start())
            .await
            .expect("started alone");

        let ids = ["a", "taken", "b", "c"];
        let items: Vec<_> = ids.iter().map(|id| (*id, start())).collect();
        let outcomes = store
            .starts_in_one(&ctx, &def, &items)
            .await
            .expect("one transaction");
        let refused: Vec<bool> = outcomes
            .iter()
            .map(|o| {
                o.as_ref()
                    .err()
                    .is_some_and(|e| matches!(e.kind(), ErrorKind::SagaExists { .. }))
            })
            .collect();
        assert_eq!(refused, [false, true, false, false], "{outcomes:?}");
        assert!(outcomes[0].is_ok() && outcomes[2].is_ok() && outcomes[3].is_ok());

        let count = |sql: &'static str| {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(&pool)
                    .await
                    .expect("count")
            }
        };
        assert_eq!(count("select count(*) from orchestrator_sagas").await, 4);
        assert_eq!(
            count("select count(*) from orchestrator_sagas where seq = 1 and status = 'running'")
                .await,
            4
        );
        assert_eq!(
            count("select count(*) from orchestrator_saga_history").await,
            4
        );
        assert_eq!(count("select count(*) from orchestrator_outbox").await, 4);
        assert_eq!(
            count(
                "select count(distinct created_ms) from orchestrator_sagas \
                 where saga_id in ('a', 'b', 'c')"
            )
            .await,
            1,
            "one statement wrote the batch"
        );

        // A batch of ids all taken writes nothing.
        let again: Vec<_> = ["a", "b"].iter().map(|id| (*id, start())).collect();
        let outcomes = store
            .starts_in_one(&ctx, &def, &again)
            .await
            .expect("one transaction");
        assert!(outcomes.iter().all(Result::is_err), "{outcomes:?}");
        assert_eq!(
            count("select count(*) from orchestrator_saga_history").await,
            4
        );
        pool.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
