//! The [`Coordinator`]: starts sagas, applies replies and due timers, each
//! in one database transaction.

use std::sync::Arc;
use std::time::Duration;

use broker_adapters::cloudevents::{AttributesReader, Event};
use broker_adapters::{Subscription, Topic};
use futures_util::{FutureExt as _, StreamExt};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::definition::Definitions;
use super::machine::{self, Input, SagaState};
use super::protocol;
use super::store::{Ctx, Handled, ReplyItem, SagaStore};
use crate::error::{Error, ErrorKind, Result};

/// At most this many waiting replies are applied together.
const MAX_BATCH: usize = 32;

/// How a [`Coordinator`] runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    reply_topic: Topic,
    consumer: String,
    poll_interval: Duration,
    claim_lease: Duration,
    timer_batch: usize,
    concurrency: usize,
}

impl CoordinatorConfig {
    /// Replies are expected on `reply_topic` (told to participants in the
    /// `sagareplyto` extension); timers polled every 50 ms, claimed for 10 s;
    /// up to 16 replies applied at once.
    pub fn new(reply_topic: Topic) -> Self {
        Self {
            reply_topic,
            consumer: "saga-coordinator".into(),
            poll_interval: Duration::from_millis(50),
            claim_lease: Duration::from_secs(10),
            timer_batch: 100,
            concurrency: 16,
        }
    }

    /// The inbox consumer name replies are de-duplicated under.
    #[must_use]
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = name.into();
        self
    }

    /// How often due timers are looked for.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long a coordinator owns the due timers it claimed (database
    /// clock); a coordinator that dies holding them loses them after this.
    #[must_use]
    pub fn claim_lease(mut self, lease: Duration) -> Self {
        self.claim_lease = lease;
        self
    }

    /// At most this many due timers claimed per poll.
    #[must_use]
    pub fn timer_batch(mut self, n: usize) -> Self {
        self.timer_batch = n.max(1);
        self
    }

    /// How many replies one running coordinator applies at once (at least
    /// 1; default 16). Replies of one saga still come one after the other
    /// (the reply events' partition key is the saga id, and a subscription
    /// hands out the next event of a key once the previous one is settled);
    /// replies of different sagas overlap, so one saga's transaction does
    /// not wait for another's acknowledgement and fetch.
    ///
    /// Replies already waiting when one arrives (up to 32) go with it: on
    /// SQLite, whose writers take turns anyway, they are applied in one
    /// transaction of two round trips (a database failure has them applied
    /// one by one instead); on PostgreSQL each has its own transaction, all
    /// at once.
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
}

/// A saga as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SagaRecord {
    /// The saga id.
    pub saga_id: String,
    /// The saga type.
    pub saga_type: String,
    /// The definition version it runs.
    pub version: u32,
    /// Its state.
    pub state: SagaState,
    /// The last change, ms since the epoch (database clock).
    pub updated_ms: i64,
}

/// One transition in a saga's history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HistoryEntry {
    /// 1 for the start, then one more per transition.
    pub seq: i64,
    /// When, ms since the epoch (database clock).
    pub at_ms: i64,
    /// The status after it.
    pub status: String,
    /// What happened.
    pub note: String,
}

/// A saga in a listing ([`Coordinator::list`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SagaSummary {
    /// The saga id.
    pub saga_id: String,
    /// The saga type.
    pub saga_type: String,
    /// The definition version it runs.
    pub version: u32,
    /// Its status name (see [`SagaStatus::name`](super::SagaStatus::name)).
    pub status: String,
    /// The last change, ms since the epoch (database clock).
    pub updated_ms: i64,
}

/// Starts sagas and drives them; cheap to clone. Several coordinators (in
/// one process or many) may share one database: every transition locks
/// its saga's row, and due timers are claimed under a lease.
#[derive(Debug, Clone)]
pub struct Coordinator {
    store: Arc<dyn SagaStore>,
    ctx: Arc<Ctx>,
    config: CoordinatorConfig,
}

impl Coordinator {
    fn new(store: Arc<dyn SagaStore>, definitions: Definitions, config: CoordinatorConfig) -> Self {
        Self {
            store,
            ctx: Arc::new(Ctx {
                definitions: Arc::new(definitions),
                reply_topic: config.reply_topic.clone(),
                consumer: config.consumer.clone(),
            }),
            config,
        }
    }

    /// A coordinator on a migrated PostgreSQL database; commands go out
    /// through `outbox` (run its relay to publish them).
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub fn postgres(
        pool: sqlx::PgPool,
        outbox: crate::Outbox<sqlx::Postgres>,
        definitions: Definitions,
        config: CoordinatorConfig,
    ) -> Self {
        Self::new(
            Arc::new(super::store::PgSagaStore { pool, outbox }),
            definitions,
            config,
        )
    }

    /// A coordinator on a migrated SQLite database; commands go out
    /// through `outbox` (run its relay to publish them).
    #[cfg(feature = "sqlite")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
    pub fn sqlite(
        pool: sqlx::SqlitePool,
        outbox: crate::Outbox<sqlx::Sqlite>,
        definitions: Definitions,
        config: CoordinatorConfig,
    ) -> Self {
        Self::new(
            Arc::new(super::store::SqliteSagaStore { pool, outbox }),
            definitions,
            config,
        )
    }

    /// The definitions this coordinator knows.
    pub fn definitions(&self) -> &Definitions {
        &self.ctx.definitions
    }

    /// Starts a saga of the newest version of `saga_type` with id
    /// `saga_id` and `data` (a JSON object): the saga row, its first history
    /// row and its first command commit together.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::UnknownSaga`], [`ErrorKind::SagaExists`],
    /// [`ErrorKind::InvalidEvent`] when `data` is not an object, or a
    /// database failure.
    pub async fn start(&self, saga_type: &str, saga_id: &str, data: Value) -> Result<()> {
        let def = self.ctx.definitions.latest(saga_type).ok_or_else(|| {
            Error::new(ErrorKind::UnknownSaga {
                saga_type: saga_type.to_owned(),
                version: None,
            })
        })?;
        check_start(saga_id, &data)?;
        let t = machine::start(def, data);
        self.store.insert(&self.ctx, saga_id, def, &t).await
    }

    /// Starts several sagas of the newest version of `saga_type`, each as
    /// [`start`](Self::start) would, in as few transactions as the store
    /// allows: on SQLite one per 128 sagas (a single writer commits them
    /// in one turn instead of one each), on PostgreSQL one per saga, all at
    /// once. Returns each saga's outcome, in the order given; one saga's
    /// failure (its id taken, or given earlier in the call; its data not an
    /// object) does not keep the others from starting.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::UnknownSaga`] for the whole call; per saga, the errors
    /// of [`start`](Self::start).
    pub async fn start_many<I, S>(&self, saga_type: &str, sagas: I) -> Result<Vec<Result<()>>>
    where
        I: IntoIterator<Item = (S, Value)>,
        S: AsRef<str>,
    {
        let def = self.ctx.definitions.latest(saga_type).ok_or_else(|| {
            Error::new(ErrorKind::UnknownSaga {
                saga_type: saga_type.to_owned(),
                version: None,
            })
        })?;
        let (ids, data): (Vec<S>, Vec<Value>) = sagas.into_iter().unzip();
        let mut outcomes: Vec<Result<()>> = Vec::with_capacity(ids.len());
        let (mut at, mut items) = (Vec::new(), Vec::new());
        let mut seen = std::collections::HashSet::new();
        for (i, (saga_id, data)) in ids.iter().zip(data).enumerate() {
            let saga_id = saga_id.as_ref();
            // Valid ones are filled in below; of one id, the first comes
            // first (the stores may start them all at once).
            outcomes.push(check_start(saga_id, &data).and_then(|()| {
                if seen.insert(saga_id) {
                    Ok(())
                } else {
                    Err(Error::new(ErrorKind::SagaExists {
                        saga_id: saga_id.to_owned(),
                    }))
                }
            }));
            if outcomes[i].is_ok() {
                at.push(i);
                items.push((saga_id, machine::start(def, data)));
            }
        }
        let done = self.store.insert_many(&self.ctx, def, &items).await;
        for (i, outcome) in at.into_iter().zip(done) {
            outcomes[i] = outcome;
        }
        Ok(outcomes)
    }

    /// Applies a reply event in one transaction (inbox record, state,
    /// history, next command).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Protocol`] for an event without the saga extensions
    /// (not retryable: terminate it), [`ErrorKind::UnknownSaga`] when the
    /// saga's definition version is not registered, or a database failure.
    pub async fn handle_reply(&self, event: &Event) -> Result<Handled> {
        let r = protocol::reply_ref(event)?;
        let input =
            |def: &super::SagaDefinition, _: &SagaState| protocol::reply_input(def, &r, event);
        let handled = self
            .store
            .transition(&self.ctx, &r.saga_id, Some(event.id()), false, &input)
            .await?;
        if let Handled::Ignored(why) = &handled {
            debug!(saga = %r.saga_id, event = %event.id(), ty = %event.ty(), reason = %why, "reply ignored");
        }
        Ok(handled)
    }

    /// Claims the due timers and applies them; returns how many changed a saga.
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn fire_due_timers(&self) -> Result<usize> {
        let lease = i64::try_from(self.config.claim_lease.as_millis()).unwrap_or(i64::MAX / 4);
        let limit = i64::try_from(self.config.timer_batch).unwrap_or(100);
        let ids = self.store.claim_due(lease, limit).await?;
        let mut fired = 0;
        let input = |_: &super::SagaDefinition, s: &SagaState| {
            s.timer()
                .map(|(phase, step, attempt)| Input::Timer {
                    phase,
                    step,
                    attempt,
                })
                .ok_or_else(|| "the saga is over".to_owned())
        };
        for id in ids {
            if let Handled::Applied(_) = self
                .store
                .transition(&self.ctx, &id, None, true, &input)
                .await?
            {
                fired += 1;
            }
        }
        Ok(fired)
    }

    /// The saga `saga_id`, if it exists.
    ///
    /// # Errors
    ///
    /// A database failure, or a stored state that does not decode.
    pub async fn saga(&self, saga_id: &str) -> Result<Option<SagaRecord>> {
        let Some(row) = self.store.load(saga_id).await? else {
            return Ok(None);
        };
        let state = serde_json::from_str(&row.state).map_err(|e| {
            Error::with_source(
                ErrorKind::Codec {
                    operation: "decode a saga state",
                },
                e,
            )
        })?;
        Ok(Some(SagaRecord {
            saga_id: saga_id.to_owned(),
            saga_type: row.saga_type,
            version: row.version,
            state,
            updated_ms: row.updated_ms,
        }))
    }

    /// The history of `saga_id`, oldest first.
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn history(&self, saga_id: &str) -> Result<Vec<HistoryEntry>> {
        Ok(self
            .store
            .history(saga_id)
            .await?
            .into_iter()
            .map(|(seq, at_ms, status, note)| HistoryEntry {
                seq,
                at_ms,
                status,
                note,
            })
            .collect())
    }

    /// Cancels the running saga `saga_id` (see
    /// [`Input::Cancel`]): in one
    /// transition, like a reply, it starts compensating what took effect
    /// and the step in flight. `Handled::Ignored` says why nothing changed
    /// (no such saga, already compensating, over).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::UnknownSaga`] when the saga's definition version is not
    /// registered, or a database failure.
    pub async fn cancel(&self, saga_id: &str, reason: &str) -> Result<Handled> {
        let input = Input::Cancel {
            reason: reason.to_owned(),
        };
        self.by_request(saga_id, input, "saga_cancelled_total")
            .await
    }

    /// Sends the failed compensation of the `compensation_failed` saga
    /// `saga_id` once more (see [`Input::Retry`]).
    /// `Handled::Ignored` says why nothing changed.
    ///
    /// # Errors
    ///
    /// As [`cancel`](Self::cancel).
    pub async fn retry(&self, saga_id: &str) -> Result<Handled> {
        self.by_request(saga_id, Input::Retry, "saga_retried_total")
            .await
    }

    /// Applies a person's `input` to `saga_id` in one transition, logging
    /// and counting (`counter`) it when it changed the saga.
    async fn by_request(
        &self,
        saga_id: &str,
        input: Input,
        counter: &'static str,
    ) -> Result<Handled> {
        let decide = |_: &super::SagaDefinition, _: &SagaState| Ok(input.clone());
        let handled = self
            .store
            .transition(&self.ctx, saga_id, None, false, &decide)
            .await?;
        if let Handled::Applied(note) = &handled {
            info!(saga = %saga_id, %note, "saga changed by request");
            metrics::counter!(counter).increment(1);
        }
        Ok(handled)
    }

    /// At most `limit` sagas (1..=1000) in id order after `after` (`""`
    /// for the first page), of status name `status` if given.
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn list(
        &self,
        status: Option<&str>,
        after: &str,
        limit: usize,
    ) -> Result<Vec<SagaSummary>> {
        let limit = i64::try_from(limit.clamp(1, 1000)).unwrap_or(1000);
        Ok(self
            .store
            .list(status, after, limit)
            .await?
            .into_iter()
            .map(
                |(saga_id, saga_type, version, status, updated_ms)| SagaSummary {
                    saga_id,
                    saga_type,
                    version: u32::try_from(version).unwrap_or(0),
                    status,
                    updated_ms,
                },
            )
            .collect())
    }

    /// The number of sagas per status name.
    ///
    /// # Errors
    ///
    /// A database failure.
    pub async fn counts(&self) -> Result<Vec<(String, i64)>> {
        self.store.counts().await
    }

    /// Runs until `shutdown`: applies the replies of `replies` (acking
    /// each after its transaction committed, nacking on a transient
    /// failure, terminating events that break the protocol) and polls the
    /// due timers.
    pub async fn run(self, mut replies: Subscription, shutdown: CancellationToken) {
        let timers = {
            let me = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    match me.fire_due_timers().await {
                        Ok(n) if n > 0 => continue,
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "saga timers failed"),
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(me.config.poll_interval) => {}
                    }
                }
            })
        };
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        loop {
            let room = in_flight.len() < self.config.concurrency;
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                next = replies.next(), if room => match next {
                    None => break,
                    Some(Ok(delivery)) => {
                        // The replies already waiting go with it: a store
                        // that can (SQLite) applies them in one transaction.
                        let mut batch = vec![delivery];
                        let mut ended = false;
                        while batch.len() < MAX_BATCH {
                            match replies.next().now_or_never() {
                                Some(Some(Ok(delivery))) => batch.push(delivery),
                                Some(Some(Err(e))) => {
                                    warn!(error = %e, "reply subscription failed");
                                    break;
                                }
                                Some(None) => {
                                    ended = true;
                                    break;
                                }
                                None => break,
                            }
                        }
                        in_flight.push(self.apply_replies(batch));
                        if ended {
                            break;
                        }
                    }
                    Some(Err(e)) => warn!(error = %e, "reply subscription failed"),
                },
            }
        }
        // The replies being applied finish and are settled; then the
        // subscription commits what was settled and leaves the group.
        while in_flight.next().await.is_some() {}
        timers.abort();
        let _ = timers.await;
        if let Err(e) = replies.close().await {
            warn!(error = %e, "could not close the reply subscription; settled replies may come again (and are skipped by the inbox)");
        }
    }

    /// Applies replies of distinct sagas (one subscription hands out one
    /// reply per saga at a time) and settles each delivery.
    async fn apply_replies(&self, mut batch: Vec<broker_adapters::Delivery>) {
        if batch.len() == 1
            && let Some(delivery) = batch.pop()
        {
            let handled = self.handle_reply(delivery.event()).await;
            return Self::settle(delivery, handled).await;
        }
        let mut refs = Vec::with_capacity(batch.len());
        let mut valid = Vec::with_capacity(batch.len());
        for delivery in batch {
            match protocol::reply_ref(delivery.event()) {
                Ok(r) => {
                    refs.push(r);
                    valid.push(delivery);
                }
                Err(e) => Self::settle(delivery, Err(e)).await,
            }
        }
        let inputs: Vec<_> = refs
            .iter()
            .zip(&valid)
            .map(|(r, delivery)| {
                let event = delivery.event();
                move |def: &super::SagaDefinition, _: &SagaState| {
                    protocol::reply_input(def, r, event)
                }
            })
            .collect();
        let items: Vec<ReplyItem<'_>> = refs
            .iter()
            .zip(&valid)
            .zip(&inputs)
            .map(|((r, delivery), input)| ReplyItem {
                saga_id: &r.saga_id,
                event_id: delivery.event().id(),
                input,
            })
            .collect();
        let outcomes = self.store.transition_replies(&self.ctx, &items).await;
        drop(items);
        drop(inputs);
        for (delivery, handled) in valid.into_iter().zip(outcomes) {
            if let Ok(Handled::Ignored(why)) = &handled {
                let event = delivery.event();
                debug!(event = %event.id(), ty = %event.ty(), reason = %why, "reply ignored");
            }
            Self::settle(delivery, handled).await;
        }
    }

    /// Settles a reply's delivery: acked after its transaction committed,
    /// nacked on a transient failure, terminated when it breaks the
    /// protocol.
    async fn settle(mut delivery: broker_adapters::Delivery, handled: Result<Handled>) {
        let settled = match handled {
            Ok(_) => delivery.ack().await,
            Err(e) if e.is_retryable() => {
                warn!(error = %e, "saga reply failed; redelivering");
                delivery.nack(Some(Duration::from_millis(100))).await
            }
            Err(e) => {
                warn!(error = %e, event = %delivery.event().id(), "saga reply rejected");
                delivery.term().await
            }
        };
        if let Err(e) = settled {
            warn!(error = %e, "could not settle a saga reply");
        }
    }

    /// Runs [`run`](Self::run) on a task.
    pub fn spawn(self, replies: Subscription) -> CoordinatorHandle {
        let token = CancellationToken::new();
        let task = tokio::spawn(self.run(replies, token.clone()));
        CoordinatorHandle { token, task }
    }
}

/// A running coordinator; see [`Coordinator::spawn`].
#[derive(Debug)]
pub struct CoordinatorHandle {
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl CoordinatorHandle {
    /// Stops it after the reply in hand (its transaction either committed
    /// or rolled back).
    pub async fn shutdown(self) {
        self.token.cancel();
        let _ = self.task.await;
    }

    /// Aborts it at once (as a crash would).
    pub fn abort(self) {
        self.task.abort();
    }
}

/// What [`Coordinator::start`] requires of a saga's id and data.
fn check_start(saga_id: &str, data: &Value) -> Result<()> {
    if !data.is_object() {
        return Err(Error::new(ErrorKind::InvalidEvent {
            reason: "saga data must be a JSON object".into(),
        }));
    }
    if saga_id.is_empty() || saga_id.contains('/') {
        return Err(Error::new(ErrorKind::InvalidEvent {
            reason: format!("`{saga_id}` is not a valid saga id (non-empty, no `/`)"),
        }));
    }
    Ok(())
}
