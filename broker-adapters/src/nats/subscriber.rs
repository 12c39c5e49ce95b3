//! Subscribing: a durable pull consumer per consumer group, a pull loop per
//! subscription, per-key ordering through the [`Gate`], and dead-lettering
//! of messages that are not CloudEvents.
//!
//! Each subscription runs one background task, the pump. It asks JetStream
//! for at most `prefetch` messages at a time with its own pull requests (one
//! outstanding request, on an inbox it owns), decodes what arrives, puts
//! events into the gate, keeps held messages alive with progress acks, and
//! sends the nacks of deliveries dropped unsettled. The subscription's stream
//! takes deliverable events out of the gate.
//!
//! When the subscription is dropped or closed (or the broker closed), the
//! pump receives what the server already sent, unsubscribes its inbox and
//! makes the server drop its outstanding pull request, then nacks everything
//! fetched but not handed out, and the nacked messages whose redelivery had
//! not arrived, in stream order, so the group's other members get them at
//! once and in order (see [`Pump::shutdown`]).

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, FromConsumer, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, AckKind as NatsAck};
use async_nats::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use async_trait::async_trait;
use cloudevents::Event;
use futures_util::{FutureExt as _, StreamExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use super::error::{self, Class, SYSTEM};
use super::gate::{Gate, Popped, Settled};
use super::unreadable::Sweeper;
use super::{
    Connection, DLQ_GROUP_HEADER, DLQ_REASON_HEADER, DLQ_SEQUENCE_HEADER, DLQ_SUFFIX,
    DLQ_TOPIC_HEADER, Inner,
};
use crate::binding::Binding;
use crate::error::{Error, ErrorKind, Result};
use crate::event::EventExt;
use crate::subscriber::{
    AckKind, Acker, ConsumerGroup, Delivery, DeliveryInfo, StartFrom, SubscribeOptions,
    Subscription,
};
use crate::telemetry::{self, operation};
use crate::topic::Topic;

/// The JetStream API subject prefix.
const API_PREFIX: &str = "$JS.API";

/// How long one pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(30);

/// How often the server confirms that an idle pull request is still alive.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);

/// How many heartbeats may go missing before the pull request is presumed
/// lost (the server restarted, say) and replaced.
const MISSED_HEARTBEATS: u32 = 3;

/// How long nacks of dropped deliveries wait before they are sent, so that
/// when a whole subscription is dropped at once they go out with the rest,
/// after its pull request is gone (see [`Pump::shutdown`]).
const NAK_DEBOUNCE: Duration = Duration::from_millis(20);

/// The pause before pulling again after the server refused a pull request.
const PULL_BACKOFF: Duration = Duration::from_millis(250);

/// The pause before pulling again when JetStream did not answer at all.
const UNAVAILABLE_BACKOFF: Duration = Duration::from_secs(1);

/// When a message that could not be dead-lettered is tried again.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(5);

/// The longest dead-letter reason header, in bytes.
const MAX_REASON_LEN: usize = 1024;

/// How many messages already on the inbox the pump handles in one go.
const INBOX_BURST: usize = 64;

/// Joins `options.group` on `topic`.
pub(super) async fn subscribe(
    inner: &Arc<Inner>,
    topic: &Topic,
    options: SubscribeOptions,
) -> Result<Subscription> {
    inner.check_open()?;
    let stream = inner.ensure_stream(topic).await?;
    let ack_wait = ensure_consumer(inner, &stream, topic, &options).await?;
    let group = options.group().clone();

    // Pulls, deliveries and acks go over a connection of the subscription's
    // own, so whatever disturbs it (a message the client cannot read drops
    // the connection) leaves the broker's publishes and other
    // subscriptions alone.
    let name = match inner.config.client_name_value() {
        Some(client) => format!("{client}: subscription {topic} {group}"),
        None => format!("subscription {topic} {group}"),
    };
    let (conn, mut reconnects) = Connection::open(&inner.config, Some(name)).await?;
    let inbox = conn.client.new_inbox();
    let messages = conn
        .client
        .subscribe(format!("{inbox}.*"))
        .await
        .map_err(|e| error::classify("subscribe", Class::Connection, inner.timeout(), e))?;

    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            gate: Gate::new(ack_wait),
            naks: Vec::new(),
            nacked: HashMap::new(),
            ended: false,
            failure: None,
        }),
        ready: Notify::new(),
        wake_pump: Notify::new(),
        client: conn.client.clone(),
    });
    let cancel = inner.shutdown.child_token();
    let pump = Pump {
        inner: Arc::clone(inner),
        conn: conn.clone(),
        shared: Arc::clone(&shared),
        messages,
        inbox,
        next_subject: format!("{API_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{group}"),
        info_subject: format!("CONSUMER.INFO.{stream}.{group}"),
        topic: topic.clone(),
        group: group.clone(),
        prefetch: inner.config.prefetch_count(),
        cancel: cancel.clone(),
        pull: None,
        pulls: 0,
        next_pull_at: Instant::now(),
        naks_at: None,
    };
    let span = tracing::info_span!(
        "receive",
        { telemetry::OTEL_NAME } = %format_args!("receive {topic}"),
        { telemetry::MESSAGING_SYSTEM } = SYSTEM,
        { telemetry::MESSAGING_OPERATION_TYPE } = operation::RECEIVE,
        { telemetry::MESSAGING_DESTINATION_NAME } = %topic,
        { telemetry::MESSAGING_CONSUMER_GROUP_NAME } = %group,
    );
    // Only reconnections from now on call for a look.
    reconnects.mark_unchanged();
    let sweeper = Sweeper {
        inner: Arc::clone(inner),
        conn,
        stream,
        topic: topic.clone(),
        group: group.clone(),
        reconnects,
        cancel: cancel.clone(),
        done: BTreeSet::new(),
    };
    tokio::spawn(sweeper.run().instrument(span.clone()));
    let pump = tokio::spawn(pump.run().instrument(span));

    let member = Member {
        shared,
        topic: topic.clone(),
        group,
        timeout: inner.timeout(),
        _stop: cancel.clone().drop_guard(),
    };
    let deliveries = futures_util::stream::unfold(member, |member| async move {
        let next = member.next().await?;
        Some((next, member))
    });
    Ok(Subscription::new(Box::pin(deliveries)).with_close(move || {
        Box::pin(async move {
            cancel.cancel();
            pump.await.unwrap_or_else(|e| {
                Err(Error::with_source(
                    ErrorKind::Broker {
                        system: SYSTEM,
                        operation: "subscription shutdown",
                        retryable: false,
                    },
                    e,
                ))
            })
        })
    }))
}

/// Finds or creates the group's durable consumer and returns its ack wait.
async fn ensure_consumer(
    inner: &Inner,
    stream: &str,
    topic: &Topic,
    options: &SubscribeOptions,
) -> Result<Duration> {
    let group = options.group().as_str();
    let ack_wait = options.ack_deadline();
    let timeout = inner.timeout();
    let lookup = inner
        .js
        .get_consumer_from_stream::<pull::Config, _, _>(group, stream)
        .await;
    match lookup {
        Ok(existing) => {
            let config = &existing.cached_info().config;
            if !config.filter_subject.is_empty() && config.filter_subject != topic.as_str() {
                return Err(Error::new(ErrorKind::Config {
                    key: "group".into(),
                    reason: format!(
                        "consumer `{group}` of stream `{stream}` reads `{}`, not topic `{topic}`",
                        config.filter_subject
                    ),
                }));
            }
            if config.ack_wait == ack_wait {
                return Ok(ack_wait);
            }
            let mut updated = match pull::Config::try_from_consumer_config(config.clone()) {
                Ok(updated) => updated,
                Err(e) => {
                    return Err(error::classify(
                        "consumer lookup (not a pull consumer)",
                        Class::Permanent,
                        timeout,
                        e,
                    ));
                }
            };
            updated.ack_wait = ack_wait;
            match inner.js.create_consumer_on_stream(updated, stream).await {
                Ok(consumer) => Ok(consumer.cached_info().config.ack_wait),
                Err(e) => {
                    tracing::warn!(
                        consumer = group,
                        stream,
                        error = %e,
                        "could not change the consumer's ack wait; keeping {:?}",
                        config.ack_wait
                    );
                    Ok(config.ack_wait)
                }
            }
        }
        Err(e) if matches!(e.kind(), ConsumerErrorKind::JetStream(ref api) if error::is_not_found(api)) =>
        {
            let config = pull::Config {
                durable_name: Some(group.to_owned()),
                filter_subject: topic.to_string(),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                deliver_policy: match options.start() {
                    StartFrom::Earliest => DeliverPolicy::All,
                    StartFrom::Latest => DeliverPolicy::New,
                },
                max_ack_pending: i64::try_from(inner.config.ack_pending_limit())
                    .unwrap_or(i64::MAX),
                ..pull::Config::default()
            };
            let consumer = inner
                .js
                .create_consumer_on_stream(config, stream)
                .await
                .map_err(|e| error::consumer("consumer creation", e, timeout))?;
            tracing::info!(consumer = group, stream, "created JetStream consumer");
            Ok(consumer.cached_info().config.ack_wait)
        }
        Err(e) => Err(error::consumer("consumer lookup", e, timeout)),
    }
}

/// A fetched event waiting in the gate.
#[derive(Debug)]
struct Entry {
    /// The JetStream message, payload and headers dropped after decoding;
    /// kept to settle it.
    msg: jetstream::Message,
    event: Event,
    attempt: NonZeroU32,
}

/// The nack of a delivery dropped unsettled, queued for the pump.
#[derive(Debug)]
struct Nak {
    seq: u64,
    key: Option<Arc<str>>,
    msg: jetstream::Message,
}

/// What the pump, the subscription stream and the ackers share.
struct Shared {
    state: Mutex<State>,
    /// Woken when an event may have become deliverable or the pump ended.
    ready: Notify,
    /// Woken when the gate has room again or a nack is queued.
    wake_pump: Notify,
    /// The subscription's connection, which the ackers' requests go over.
    client: async_nats::Client,
}

struct State {
    gate: Gate<Entry>,
    /// Nacks of deliveries dropped unsettled, for the pump to send in order.
    naks: Vec<Nak>,
    /// Messages nacked and sent back to the group whose redelivery a key
    /// still waits for, by stream sequence. If the subscription ends before
    /// the redelivery arrives, it may have been on its way to this
    /// subscription's inbox and lost with it; they are nacked again then.
    nacked: HashMap<u64, (Arc<str>, jetstream::Message)>,
    /// The pump stopped: nothing more arrives.
    ended: bool,
    /// Why the pump stopped, if it failed; reported once by the stream.
    failure: Option<Error>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every method leaves the state consistent, so a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn settle(&self, key: Option<&Arc<str>>, seq: u64, token: u64, settled: Settled) {
        let released = self
            .lock()
            .gate
            .settle(key, seq, token, settled, Instant::now());
        if released {
            self.ready.notify_one();
        }
    }

    /// The nack of `seq`, which its key waits for, was sent: the pump may
    /// need to pull for its redelivery.
    fn nack_sent(
        &self,
        key: Option<&Arc<str>>,
        seq: u64,
        delay: Duration,
        msg: &jetstream::Message,
    ) {
        let Some(key) = key else { return };
        let now = Instant::now();
        let mut state = self.lock();
        let State { gate, nacked, .. } = &mut *state;
        gate.nack_sent(key, seq, delay, now);
        // Forget the ones that came back or were given up on.
        nacked.retain(|&seq, (key, _)| gate.awaits(key, seq, now).is_some());
        if gate.awaits(key, seq, now).is_some() {
            nacked.insert(seq, (Arc::clone(key), msg.clone()));
        }
        drop(state);
        self.wake_pump.notify_one();
    }

    /// A delivery dropped unsettled: its key waits for the redelivery, and
    /// the message is nacked (by the pump, in order with the rest).
    fn abandon(&self, key: Option<&Arc<str>>, seq: u64, token: u64, msg: jetstream::Message) {
        let redeliver = Settled::Redeliver {
            delay: Duration::ZERO,
        };
        let mut state = self.lock();
        if state
            .gate
            .settle(key, seq, token, redeliver, Instant::now())
        {
            self.ready.notify_one();
        }
        if state.ended {
            drop(state);
            nak_in_background(msg);
        } else {
            state.naks.push(Nak {
                seq,
                key: key.cloned(),
                msg,
            });
            drop(state);
            self.wake_pump.notify_one();
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Shared")
            .field("held", &state.gate.len())
            .field("ended", &state.ended)
            .finish_non_exhaustive()
    }
}

/// Nacks `msg` from a spawned task, if there is a runtime to spawn on.
fn nak_in_background(msg: jetstream::Message) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                if let Err(e) = msg.ack_with(NatsAck::Nak(None)).await {
                    tracing::debug!(error = %e, "could not nack a dropped delivery; it is redelivered after its ack deadline");
                }
            });
        }
        Err(_) => tracing::debug!(
            "a delivery was dropped outside a Tokio runtime; it is redelivered after its ack deadline"
        ),
    }
}

/// The subscription's side: takes deliverable events out of the gate.
struct Member {
    shared: Arc<Shared>,
    topic: Topic,
    group: ConsumerGroup,
    timeout: Duration,
    /// Stops the pump when the subscription is dropped.
    _stop: DropGuard,
}

impl Member {
    /// The next delivery; `None` once the pump stopped (after its failure, if any).
    async fn next(&self) -> Option<Result<Delivery>> {
        loop {
            let wake_at = {
                let mut state = self.shared.lock();
                if let Some(popped) = state.gate.pop(Instant::now()) {
                    drop(state);
                    // There may be room for another pull now.
                    self.shared.wake_pump.notify_one();
                    return Some(Ok(self.delivery(popped)));
                }
                if state.ended {
                    return state.failure.take().map(Err);
                }
                state.gate.wake_at()
            };
            // `notify_one` stores a permit when nobody waits, so a wake-up
            // between the look above and this wait is not lost.
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        () = self.shared.ready.notified() => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => self.shared.ready.notified().await,
            }
        }
    }

    fn delivery(&self, popped: Popped<Entry>) -> Delivery {
        let Popped {
            seq,
            token,
            key,
            item:
                Entry {
                    msg,
                    event,
                    attempt,
                },
        } = popped;
        let info = DeliveryInfo {
            topic: self.topic.clone(),
            group: self.group.clone(),
            attempt,
        };
        let acker = NatsAcker {
            shared: Arc::clone(&self.shared),
            msg,
            key,
            seq,
            token,
            timeout: self.timeout,
            settled: false,
        };
        Delivery::new(event, info, Box::new(acker))
    }
}

/// Settles one delivery with JetStream acks.
#[derive(Debug)]
struct NatsAcker {
    shared: Arc<Shared>,
    msg: jetstream::Message,
    key: Option<Arc<str>>,
    seq: u64,
    token: u64,
    timeout: Duration,
    settled: bool,
}

impl NatsAcker {
    /// Sends `kind` and waits for the server to confirm it.
    ///
    /// A request on the client's shared reply subscription, where
    /// async-nats' `double_ack_with` subscribes to a fresh inbox for each
    /// ack and unsubscribes after it: three protocol operations, and the
    /// server's work on its subscriptions, for every ack.
    async fn confirmed(&self, kind: NatsAck, operation: &'static str) -> Result<()> {
        let Some(reply) = self.msg.reply.clone() else {
            return Err(error::classify(
                operation,
                Class::Permanent,
                self.timeout,
                "the message has no reply subject to ack on",
            ));
        };
        let request = async_nats::Request::new()
            .payload(kind.into())
            .timeout(Some(self.timeout));
        match self.shared.client.send_request(reply, request).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let class = if e.kind() == RequestErrorKind::TimedOut {
                    Class::Timeout
                } else {
                    Class::Connection
                };
                Err(error::classify(operation, class, self.timeout, e))
            }
        }
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn settle(&mut self, kind: AckKind) -> Result<()> {
        let key = self.key.clone();
        match kind {
            AckKind::Ack | AckKind::Term => {
                let (nats, operation) = if kind == AckKind::Ack {
                    (NatsAck::Ack, "ack")
                } else {
                    (NatsAck::Term, "term")
                };
                self.confirmed(nats, operation).await?;
                self.settled = true;
                self.shared
                    .settle(key.as_ref(), self.seq, self.token, Settled::Done);
            }
            AckKind::Nack(delay) => {
                let delay = delay.filter(|d| !d.is_zero());
                // The key waits for the redelivery from now on, so a quick
                // redelivery is not taken for an expired ack deadline.
                self.shared.settle(
                    key.as_ref(),
                    self.seq,
                    self.token,
                    Settled::Redeliver {
                        delay: delay.unwrap_or_default(),
                    },
                );
                self.confirmed(NatsAck::Nak(delay), "nack").await?;
                self.settled = true;
                self.shared
                    .nack_sent(key.as_ref(), self.seq, delay.unwrap_or_default(), &self.msg);
            }
        }
        Ok(())
    }

    async fn in_progress(&mut self) -> Result<()> {
        self.confirmed(NatsAck::Progress, "in-progress ack").await
    }
}

impl Drop for NatsAcker {
    fn drop(&mut self) {
        if !self.settled {
            self.shared
                .abandon(self.key.as_ref(), self.seq, self.token, self.msg.clone());
        }
    }
}

/// One outstanding pull request.
#[derive(Debug)]
struct Pull {
    /// The last token of its reply subject.
    id: u64,
    /// Messages it may still bring.
    remaining: usize,
    /// When the server last sent something for it.
    last_heard: Instant,
}

impl Pull {
    /// When it is presumed lost if the server stays silent.
    fn lost_at(&self) -> Instant {
        self.last_heard + PULL_HEARTBEAT * MISSED_HEARTBEATS
    }
}

/// What woke the pump.
enum Step {
    Stop,
    Wake,
    Message(Option<async_nats::Message>),
    Refresh,
    PullLost,
    PullDue,
    NaksDue,
}

/// The subscription's background task.
struct Pump {
    inner: Arc<Inner>,
    /// The subscription's own connection.
    conn: Connection,
    shared: Arc<Shared>,
    messages: async_nats::Subscriber,
    inbox: String,
    next_subject: String,
    /// The consumer-info API subject, without the API prefix.
    info_subject: String,
    topic: Topic,
    group: ConsumerGroup,
    prefetch: usize,
    cancel: CancellationToken,
    pull: Option<Pull>,
    pulls: u64,
    next_pull_at: Instant,
    /// When the queued nacks of dropped deliveries are due.
    naks_at: Option<Instant>,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Pump {
    async fn run(mut self) -> Result<()> {
        let failure = loop {
            self.pull_if_room().await;
            let refresh_at = self.shared.lock().gate.next_refresh();
            let lost_at = self.pull.as_ref().map(Pull::lost_at);
            let now = Instant::now();
            let pull_at = if self.pull.is_some() {
                None
            } else if self.next_pull_at > now {
                Some(self.next_pull_at)
            } else {
                // A delayed nack coming due needs a pull even when the gate is full.
                self.shared.lock().gate.next_redelivery_due(now)
            };
            let step = tokio::select! {
                biased;
                () = self.cancel.cancelled() => Step::Stop,
                () = self.shared.wake_pump.notified() => Step::Wake,
                message = self.messages.next() => Step::Message(message),
                () = sleep_until(refresh_at) => Step::Refresh,
                () = sleep_until(lost_at) => Step::PullLost,
                () = sleep_until(pull_at) => Step::PullDue,
                () = sleep_until(self.naks_at) => Step::NaksDue,
            };
            match step {
                Step::Stop => break None,
                Step::Wake => {
                    if self.naks_at.is_none() && !self.shared.lock().naks.is_empty() {
                        self.naks_at = Some(Instant::now() + NAK_DEBOUNCE);
                    }
                }
                Step::NaksDue => {
                    self.naks_at = None;
                    self.send_queued_naks().await;
                }
                Step::Message(Some(message)) => {
                    if let Err(fatal) = self.on_burst(message).await {
                        break Some(fatal);
                    }
                }
                Step::Message(None) => {
                    break Some(Error::with_source(
                        ErrorKind::Connection { system: SYSTEM },
                        "the NATS client closed the subscription's inbox",
                    ));
                }
                Step::Refresh => self.refresh().await,
                Step::PullLost => {
                    tracing::warn!("JetStream went silent on a pull request; pulling again");
                    self.pull = None;
                }
                Step::PullDue => {}
            }
        };
        if let Some(failure) = &failure {
            tracing::error!(error = %failure, "the subscription stopped");
        }
        self.shutdown(failure).await
    }

    /// Sends a pull request when none is outstanding and the gate has room
    /// for at least half of `prefetch` (or is empty), or for a nacked
    /// message its key waits for.
    ///
    /// JetStream sends due redeliveries before new messages, so a nacked
    /// message comes back on the next pull request; the window grows by one
    /// per redelivery due. Without that, keys waiting for redeliveries could
    /// hold the whole window, no pull request would go out, and nothing would
    /// come back until those keys give up, out of order.
    async fn pull_if_room(&mut self) {
        let now = Instant::now();
        if self.pull.is_some() || now < self.next_pull_at {
            return;
        }
        let (held, due) = {
            let state = self.shared.lock();
            (state.gate.len(), state.gate.redeliveries_due(now))
        };
        let room = (self.prefetch + due).saturating_sub(held);
        if room == 0 || (held > 0 && due == 0 && room < self.prefetch.div_ceil(2)) {
            return;
        }
        self.pulls += 1;
        let id = self.pulls;
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let request = serde_json::json!({
            "batch": room,
            "expires": nanos(PULL_EXPIRES),
            "idle_heartbeat": nanos(PULL_HEARTBEAT),
        });
        let sent = self
            .conn
            .client
            .publish_with_reply(
                self.next_subject.clone(),
                format!("{}.{id}", self.inbox),
                request.to_string().into(),
            )
            .await;
        match sent {
            Ok(()) => {
                self.pull = Some(Pull {
                    id,
                    remaining: room,
                    last_heard: now,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not send a pull request; trying again");
                self.next_pull_at = now + PULL_BACKOFF;
            }
        }
    }

    /// Handles `first` and the messages already waiting behind it on the
    /// inbox (up to [`INBOX_BURST`]), without going back to the wait for
    /// each: a pull request's messages arrive together. Stops early when
    /// the subscription is being closed. `Err` only for failures that end
    /// the subscription.
    async fn on_burst(&mut self, first: async_nats::Message) -> Result<()> {
        self.on_message(first).await?;
        for _ in 1..INBOX_BURST {
            if self.cancel.is_cancelled() {
                break;
            }
            match self.messages.next().now_or_never() {
                Some(Some(message)) => self.on_message(message).await?,
                // Nothing waiting, or the inbox closed (the wait sees it).
                _ => break,
            }
        }
        Ok(())
    }

    /// Handles one message on the inbox. `Err` only for failures that end
    /// the subscription.
    async fn on_message(&mut self, message: async_nats::Message) -> Result<()> {
        // A stored message may itself begin with a status line; it still
        // carries its ack subject, which the server's own statuses do not.
        let stored = message
            .reply
            .as_ref()
            .is_some_and(|reply| reply.starts_with("$JS.ACK."));
        let status = if stored { None } else { message.status };
        match status {
            None | Some(StatusCode::OK) => {
                self.on_event_message(message).await;
                Ok(())
            }
            Some(StatusCode::IDLE_HEARTBEAT) => {
                if let Some(pull) = &mut self.pull
                    && pull_id(&message) == Some(pull.id)
                {
                    pull.last_heard = Instant::now();
                }
                Ok(())
            }
            Some(status) => self.on_pull_status(&message, status),
        }
    }

    /// A status about a pull request: it ended, or the consumer is gone.
    fn on_pull_status(&mut self, message: &async_nats::Message, status: StatusCode) -> Result<()> {
        let id = pull_id(message);
        if id.is_none() || id != self.pull.as_ref().map(|p| p.id) {
            // About a request already given up on.
            return Ok(());
        }
        self.pull = None;
        let description = message.description.as_deref().unwrap_or_default();
        match status {
            // Expired, or nothing to deliver: ask again.
            StatusCode::TIMEOUT | StatusCode::NOT_FOUND => Ok(()),
            StatusCode::REQUEST_TERMINATED
                if description.eq_ignore_ascii_case("consumer deleted")
                    || description.eq_ignore_ascii_case("consumer is push based") =>
            {
                Err(Error::with_source(
                    ErrorKind::Broker {
                        system: SYSTEM,
                        operation: "pull",
                        retryable: false,
                    },
                    format!("the consumer group's JetStream consumer is unusable: {description}"),
                ))
            }
            StatusCode::NO_RESPONDERS => {
                tracing::warn!("JetStream did not answer a pull request; trying again");
                self.next_pull_at = Instant::now() + UNAVAILABLE_BACKOFF;
                Ok(())
            }
            _ => {
                tracing::warn!(%status, description, "JetStream ended a pull request; trying again");
                self.next_pull_at = Instant::now() + PULL_BACKOFF;
                Ok(())
            }
        }
    }

    /// A message of the topic: into the gate if it is a CloudEvent of at
    /// most `max_event_bytes`, else dead-lettered.
    async fn on_event_message(&mut self, message: async_nats::Message) {
        if let Some(pull) = &mut self.pull {
            pull.remaining = pull.remaining.saturating_sub(1);
            pull.last_heard = Instant::now();
            if pull.remaining == 0 {
                self.pull = None;
            }
        }
        let mut msg = jetstream::Message {
            message,
            context: self.conn.js.clone(),
        };
        let numbers = msg.message.reply.as_deref().and_then(delivery_numbers);
        let (seq, delivered) = match numbers.map_or_else(
            || {
                msg.info()
                    .map(|info| (info.stream_sequence, info.delivered))
            },
            Ok,
        ) {
            Ok(numbers) => numbers,
            Err(e) => {
                tracing::warn!(error = %e, subject = %msg.subject, "ignored a message that is not a JetStream delivery");
                return;
            }
        };
        let size = msg.message.payload.len();
        let limit = self.inner.max_event_bytes;
        let decoded = if size > limit {
            Err(Error::new(ErrorKind::EventTooLarge { size, limit }))
        } else {
            let headers =
                msg.message
                    .headers
                    .iter()
                    .flat_map(|h| h.iter())
                    .flat_map(|(name, values)| {
                        values
                            .iter()
                            .map(move |v| (AsRef::<str>::as_ref(name), v.as_str().as_bytes()))
                    });
            Binding::NATS.decode(headers, &msg.message.payload)
        };
        match decoded {
            Ok(event) => {
                let key = event.partition_key().map(Arc::from);
                let attempt = u32::try_from(delivered)
                    .ok()
                    .and_then(NonZeroU32::new)
                    .unwrap_or(NonZeroU32::MIN);
                // Only the reply subject is needed from here on.
                msg.message.payload = Default::default();
                msg.message.headers = None;
                let entry = Entry {
                    msg,
                    event,
                    attempt,
                };
                self.shared
                    .lock()
                    .gate
                    .insert(key, seq, entry, Instant::now());
                self.shared.ready.notify_one();
            }
            Err(reason) => self.dead_letter(msg, seq, reason).await,
        }
    }

    /// Takes a message that cannot be delivered (not a CloudEvent, or too
    /// large) out of the way without losing it: copied to the dead-letter
    /// subject, then terminated.
    async fn dead_letter(&self, msg: jetstream::Message, seq: u64, reason: Error) {
        tracing::error!(
            stream.sequence = seq,
            error = %reason,
            "a message on the topic cannot be delivered; it is dead-lettered and terminated"
        );
        if self.inner.config.dead_letter_enabled() {
            match self
                .inner
                .dead_letter(&self.topic, &self.group, &msg, seq, &reason)
                .await
            {
                Ok(dlq) => {
                    tracing::info!(stream.sequence = seq, dead_letter.subject = %dlq, "dead-lettered");
                }
                Err(e) if e.is_retryable() => {
                    tracing::error!(
                        stream.sequence = seq,
                        error = %e,
                        "could not dead-letter the message; it is tried again in {DEAD_LETTER_RETRY:?}"
                    );
                    if let Err(e) = msg.ack_with(NatsAck::Nak(Some(DEAD_LETTER_RETRY))).await {
                        tracing::warn!(error = %e, "could not nack the message; it comes back after its ack deadline");
                    }
                    return;
                }
                Err(e) => {
                    tracing::error!(
                        stream.sequence = seq,
                        error = %e,
                        "the message cannot be dead-lettered; it is terminated and stays in the topic's stream"
                    );
                }
            }
        }
        if let Err(e) = msg.ack_with(NatsAck::Term).await {
            tracing::warn!(error = %e, "could not terminate the message; it comes back after its ack deadline");
        }
    }

    /// Progress acks for held messages, so JetStream does not redeliver them
    /// elsewhere while they wait behind their key.
    async fn refresh(&self) {
        let mut due = Vec::new();
        self.shared
            .lock()
            .gate
            .refresh_due(Instant::now(), |entry| due.push(entry.msg.clone()));
        for msg in due {
            if let Err(e) = msg.ack_with(NatsAck::Progress).await {
                tracing::debug!(error = %e, "could not send a progress ack");
            }
        }
    }

    /// Nacks deliveries dropped unsettled, in stream order.
    async fn send_queued_naks(&self) {
        let mut naks = std::mem::take(&mut self.shared.lock().naks);
        naks.sort_by_key(|nak| nak.seq);
        for Nak { seq, key, msg } in naks {
            match msg.ack_with(NatsAck::Nak(None)).await {
                Ok(()) => self
                    .shared
                    .nack_sent(key.as_ref(), seq, Duration::ZERO, &msg),
                Err(e) => {
                    tracing::debug!(error = %e, "could not nack a dropped delivery; it is redelivered after its ack deadline");
                }
            }
        }
    }

    /// Stops pulling, receives what the server already sent, and nacks
    /// everything fetched but not handed out, in stream order, with the
    /// nacked messages whose redelivery had not arrived yet.
    ///
    /// A pull request of this subscription may still be waiting on the
    /// server, and nats-server 2.9 keeps sending messages to a waiting
    /// request whose inbox has no subscriber any more, until it notices the
    /// lost interest (a consumer-info request makes it look) or the request
    /// expires; such messages, and any on their way when the inbox is
    /// unsubscribed, are lost to the group until their ack deadline, while
    /// the next member gets the events after them. So:
    ///
    /// 1. a round trip first, while still subscribed, so that everything the
    ///    server already sent to the inbox has arrived;
    /// 2. then the unsubscription, and at once a consumer-info request, so
    ///    the server drops the request right after it; after its answer,
    ///    nothing more is sent to the inbox;
    /// 3. then nacks of everything fetched and not handed out (held in the
    ///    gate, queued nacks, what arrived meanwhile) and of the nacked
    ///    messages due back whose redelivery did not arrive (it may have
    ///    been the one on its way), in stream order.
    ///
    /// The nacks also go out only after the server dropped the request:
    /// nats-server 2.9 takes a nacked message off its redelivery queue when
    /// every request waiting on the consumer has lost interest, fails to
    /// deliver it and does not put it back.
    ///
    /// With the connection down none of this can reach the server (and
    /// async-nats would keep a flush or a drain waiting until it is back,
    /// which may be never): the fetched messages come back after their ack
    /// deadline, and the shutdown fails with a connection error at once.
    async fn shutdown(mut self, failure: Option<Error>) -> Result<()> {
        let mut leftovers = Vec::new();
        let connected =
            self.conn.client.connection_state() == async_nats::connection::State::Connected;
        if connected {
            if let Err(e) = self.flush().await {
                tracing::debug!(error = %e, "could not flush before leaving the group");
            }
            // Like a flush, a drain waits for the connection (see
            // `flush_within`).
            let drained =
                match tokio::time::timeout(self.inner.timeout(), self.messages.drain()).await {
                    Ok(drained) => drained.map_err(|e| e.to_string()),
                    Err(elapsed) => Err(elapsed.to_string()),
                };
            match drained {
                Ok(()) => {
                    self.forget_pull_request().await;
                    let deadline = Instant::now() + self.inner.timeout();
                    while let Ok(Some(message)) =
                        tokio::time::timeout_at(deadline, self.messages.next()).await
                    {
                        self.keep_leftover(message, &mut leftovers);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not drain the pull inbox");
                    self.forget_pull_request().await;
                }
            }
        }
        let (held, queued, renak) = {
            let now = Instant::now();
            let mut state = self.shared.lock();
            state.ended = true;
            state.failure = failure;
            let nacked = std::mem::take(&mut state.nacked);
            let renak: Vec<(u64, jetstream::Message)> = nacked
                .into_iter()
                .filter(|(seq, (key, _))| state.gate.awaits(key, *seq, now) == Some(true))
                .map(|(seq, (_, msg))| (seq, msg))
                .collect();
            (state.gate.drain(), std::mem::take(&mut state.naks), renak)
        };
        self.shared.ready.notify_one();
        if !connected {
            tracing::debug!(
                "the connection is down; what was fetched and not handed out comes back after its ack deadline"
            );
            return Err(Error::new(ErrorKind::Connection { system: SYSTEM }));
        }
        let mut naks: Vec<(u64, jetstream::Message)> = held
            .into_iter()
            .map(|(seq, entry)| (seq, entry.msg))
            .chain(queued.into_iter().map(|nak| (nak.seq, nak.msg)))
            .chain(leftovers)
            .collect();
        // A redelivery that did arrive is nacked with its own reply subject.
        let arrived: std::collections::HashSet<u64> = naks.iter().map(|(seq, _)| *seq).collect();
        naks.extend(renak.into_iter().filter(|(seq, _)| !arrived.contains(seq)));
        naks.sort_by_key(|(seq, _)| *seq);
        for (_, msg) in naks {
            if let Err(e) = msg.ack_with(NatsAck::Nak(None)).await {
                tracing::debug!(error = %e, "could not nack a fetched message; it is redelivered after its ack deadline");
            }
        }
        self.flush().await
    }

    /// Sends what waits on the subscription's connection, waiting at most
    /// the request timeout.
    async fn flush(&self) -> Result<()> {
        super::flush_within(&self.conn.client, self.inner.timeout()).await
    }

    /// Keeps a message that arrived during shutdown, to nack it.
    fn keep_leftover(
        &self,
        message: async_nats::Message,
        leftovers: &mut Vec<(u64, jetstream::Message)>,
    ) {
        if message.status.is_some_and(|s| s != StatusCode::OK) {
            return;
        }
        let msg = jetstream::Message {
            message,
            context: self.conn.js.clone(),
        };
        if let Ok(seq) = msg.info().map(|info| info.stream_sequence) {
            leftovers.push((seq, msg));
        }
    }

    /// Makes the server drop waiting pull requests that lost interest, this
    /// subscription's among them (see [`shutdown`](Self::shutdown)).
    async fn forget_pull_request(&self) {
        let empty = serde_json::json!({});
        let info = self
            .conn
            .js
            .request::<_, _, serde_json::Value>(self.info_subject.clone(), &empty)
            .await;
        if let Err(e) = info {
            tracing::debug!(error = %e, "could not refresh the consumer's waiting requests");
        }
    }
}

/// The stream sequence and delivery count of a JetStream delivery, read
/// from its ack subject where `Message::info` reads them (ADR-15: seven
/// tokens after `$JS.ACK.`, or nine or more with the domain and account
/// hash first), without parsing the other tokens (the publish time among
/// them). `None` when the subject is not of either form, for `info` to
/// say why.
fn delivery_numbers(reply: &str) -> Option<(u64, i64)> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    // The dots' places, by a plain byte loop: `str::split` with its general
    // searcher cost about a thousand instructions per subject.
    let mut dots = [0_usize; 6];
    let mut count = 0;
    for (at, &byte) in rest.as_bytes().iter().enumerate() {
        if byte == b'.' {
            if let Some(slot) = dots.get_mut(count) {
                *slot = at;
            }
            count += 1;
        }
    }
    // Token `i` (from 0) lies between dot `i - 1` and dot `i`.
    let token = |i: usize| rest.get(dots[i - 1] + 1..dots[i]);
    let (delivered, seq) = match count + 1 {
        7 => (token(2)?, token(3)?),
        n if n >= 9 => (token(4)?, token(5)?),
        _ => return None,
    };
    Some((seq.parse().ok()?, delivered.parse().ok()?))
}

/// The pull request a status message is about: the last token of its subject.
fn pull_id(message: &async_nats::Message) -> Option<u64> {
    message
        .subject
        .rsplit('.')
        .next()
        .and_then(|id| id.parse::<u64>().ok())
}

impl Inner {
    /// Copies `msg` to `<topic>.dlq` and returns that topic once stored.
    async fn dead_letter(
        &self,
        topic: &Topic,
        group: &ConsumerGroup,
        msg: &jetstream::Message,
        seq: u64,
        reason: &Error,
    ) -> Result<Topic> {
        let mut headers = HeaderMap::new();
        if let Some(original) = &msg.message.headers {
            for (name, values) in original.iter() {
                // JetStream acts on its own headers (de-duplication, expected
                // sequences); they must not act on the copy.
                let reserved = AsRef::<str>::as_ref(name)
                    .get(..5)
                    .is_some_and(|p| p.eq_ignore_ascii_case("nats-"));
                if !reserved {
                    for value in values {
                        headers.append(name.clone(), value.clone());
                    }
                }
            }
        }
        self.dead_letter_parts(
            topic,
            group,
            msg.message.payload.clone(),
            headers,
            seq,
            reason,
        )
        .await
    }

    /// Stores a dead letter of the message at `seq` on `<topic>.dlq`: its
    /// `payload`, the `headers` kept of it, and the dead-letter headers
    /// (reason, origin, `Nats-Msg-Id`). Returns that topic once stored.
    pub(super) async fn dead_letter_parts(
        &self,
        topic: &Topic,
        group: &ConsumerGroup,
        payload: bytes::Bytes,
        mut headers: HeaderMap,
        seq: u64,
        reason: &Error,
    ) -> Result<Topic> {
        let dlq = Topic::try_from(format!("{topic}{DLQ_SUFFIX}"))?;
        self.ensure_stream(&dlq).await?;
        let mut add = |name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        };
        add(DLQ_REASON_HEADER, &one_line(&reason.to_string()));
        add(DLQ_TOPIC_HEADER, topic.as_str());
        add(DLQ_GROUP_HEADER, group.as_str());
        add(DLQ_SEQUENCE_HEADER, &seq.to_string());
        // Every group dead-letters the same message; it is stored once.
        if let Ok(id) = HeaderValue::from_str(&format!("dlq:{topic}:{seq}")) {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        }
        let size = payload.len();
        let ack = self
            .js
            .send_publish(
                dlq.to_string(),
                PublishMessage::build().payload(payload).headers(headers),
            )
            .await
            .map_err(|e| {
                error::publish(e, dlq.as_str(), self.max_event_bytes, size, self.timeout())
            })?;
        ack.await.map_err(|e| {
            error::publish(e, dlq.as_str(), self.max_event_bytes, size, self.timeout())
        })?;
        Ok(dlq)
    }
}

/// `text` on one line, at most [`MAX_REASON_LEN`] bytes, fit for a header.
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_REASON_LEN));
    for c in text.chars() {
        if out.len() + c.len_utf8() > MAX_REASON_LEN {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_numbers_are_read_from_both_ack_subject_forms() {
        let v1 = "$JS.ACK.ORDERS.g.3.1234.99.1700000000000000000.5";
        assert_eq!(delivery_numbers(v1), Some((1234, 3)));
        let v2 = "$JS.ACK._.ACC.ORDERS.g.3.1234.99.1700000000000000000.5.token";
        assert_eq!(delivery_numbers(v2), Some((1234, 3)));
        let v2_short = "$JS.ACK.hub.ACC.ORDERS.g.7.42.41.1700000000000000000.0";
        assert_eq!(delivery_numbers(v2_short), Some((42, 7)));
        for bad in [
            "",
            "$JS.ACK.ORDERS.g.3.1234",
            "$JS.ACK.ORDERS.g.3.1234.99.1700000000000000000",
            "$JS.ACK.ORDERS.g.x.1234.99.1700000000000000000.5",
            "$JS.ACK.ORDERS.g.3.-1.99.1700000000000000000.5",
            "_INBOX.abc.1",
        ] {
            assert_eq!(delivery_numbers(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        /// Whatever the names and numbers, both forms give back the stream
        /// sequence and delivery count they carry.
        #[test]
        fn delivery_numbers_round_trip(
            stream in "[A-Za-z0-9_-]{1,12}",
            consumer in "[A-Za-z0-9_-]{1,12}",
            domain in proptest::option::of("[A-Za-z0-9_-]{1,8}"),
            delivered in 1_i64..i64::MAX,
            seq: u64,
            consumer_seq: u64,
            published in 0_i128..4_000_000_000_000_000_000,
            pending: u64,
        ) {
            let tail = format!("{stream}.{consumer}.{delivered}.{seq}.{consumer_seq}.{published}.{pending}");
            let subject = match domain {
                Some(domain) => format!("$JS.ACK.{domain}.HASH.{tail}.tok"),
                None => format!("$JS.ACK.{tail}"),
            };
            proptest::prop_assert_eq!(delivery_numbers(&subject), Some((seq, delivered)));
        }

        /// On any subject, the same answer as splitting it with `str::split`.
        #[test]
        fn delivery_numbers_agree_with_split(tail in "([0-9a-z+-]{0,3}\\.?){0,12}", ack: bool) {
            let subject = if ack { format!("$JS.ACK.{tail}") } else { tail };
            let by_split = subject.strip_prefix("$JS.ACK.").and_then(|rest| {
                let tokens: Vec<&str> = rest.split('.').collect();
                let (delivered, seq) = match tokens.len() {
                    7 => (tokens[2], tokens[3]),
                    n if n >= 9 => (tokens[4], tokens[5]),
                    _ => return None,
                };
                Some((seq.parse().ok()?, delivered.parse().ok()?))
            });
            proptest::prop_assert_eq!(delivery_numbers(&subject), by_split);
        }
    }

    #[test]
    fn reasons_fit_in_one_header_line() {
        let reason = one_line("bad\r\nheader\tvalue");
        assert_eq!(reason, "bad  header value");
        assert!(HeaderValue::from_str(&reason).is_ok());
        assert!(one_line(&"é".repeat(2000)).len() <= MAX_REASON_LEN);
    }
}
