//! Kafka consumer-group subscriptions.
//!
//! One task (the pump) owns the rdkafka consumer: it receives records,
//! decodes them into the subscription's [`Dispatcher`], stops taking records when
//! the buffer is full, and commits settled offsets. Deliveries are pulled
//! from the dispatcher, so per-key order, nack delays and ack deadlines work
//! as on the other brokers. Rebalance callbacks commit what was settled on
//! the partitions being revoked and drop their buffered records, which the
//! partitions' next owner reads again from the committed offset.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cloudevents::Event;
use futures_util::{FutureExt as _, stream};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::{ClientConfig, ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::KafkaConfig;
use super::error::{SYSTEM, map};
use super::{acknowledged, enqueue_record};
use crate::binding::Binding;
use crate::dispatch::Dispatcher;
use crate::dispatch::buffered::{self, Buffered, Member};
use crate::error::{Error, ErrorKind, Result};
use crate::event::EventExt;
use crate::subscriber::{StartFrom, SubscribeOptions, Subscription};
use crate::topic::Topic;

/// How many already-fetched records the pump takes in one go.
const RECV_BATCH: usize = 512;

/// How many records are handed to the dispatcher per lock.
const HANDOFF_CHUNK: usize = 16;

/// A decoded record on its way to the dispatcher.
#[derive(Debug)]
struct Accepted {
    key: Option<Arc<str>>,
    record: Record,
}

/// A decoded record waiting in the dispatcher.
#[derive(Debug)]
struct Record {
    partition: i32,
    offset: i64,
    event: Arc<Event>,
}

#[derive(Debug, Default)]
struct Partition {
    /// Offsets received and not yet acked or terminated.
    pending: BTreeSet<i64>,
    /// One past the highest offset received.
    high: Option<i64>,
    /// The last offset committed (or being committed).
    committed: Option<i64>,
}

impl Partition {
    /// The offset to commit: the oldest unsettled one, or one past the last
    /// received when everything is settled.
    fn commit_point(&self) -> Option<i64> {
        self.pending.first().copied().or(self.high)
    }
}

#[derive(Debug, Default)]
struct State {
    dispatcher: Dispatcher<Record>,
    partitions: HashMap<i32, Partition>,
    assigned: bool,
    done: bool,
    failure: Option<Error>,
}

impl State {
    /// Offsets that moved since the last commit, marked as committed.
    fn take_commits(&mut self, topic: &str, only: Option<&HashSet<i32>>) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (partition, state) in &mut self.partitions {
            if only.is_some_and(|o| !o.contains(partition)) {
                continue;
            }
            let Some(point) = state.commit_point() else {
                continue;
            };
            if state.committed != Some(point)
                && list
                    .add_partition_offset(topic, *partition, Offset::Offset(point))
                    .is_ok()
            {
                state.committed = Some(point);
            }
        }
        list
    }
}

type Shared = buffered::Shared<State>;

impl Buffered for State {
    type Record = Record;
    const SYSTEM: &'static str = SYSTEM;
    const STALE_ACK: &'static str = "ack (the partition was reassigned or the ack deadline passed; the event will be delivered again)";
    const STALE_IN_PROGRESS: &'static str =
        "in-progress (the event was already redelivered or reassigned)";

    fn dispatcher(&mut self) -> &mut Dispatcher<Record> {
        &mut self.dispatcher
    }

    fn take_failure(&mut self) -> Option<Error> {
        self.failure.take()
    }

    fn done(&self) -> bool {
        self.done
    }

    fn event(record: &Record) -> &Arc<Event> {
        &record.event
    }

    fn settled(&mut self, record: Record) {
        if let Some(p) = self.partitions.get_mut(&record.partition) {
            p.pending.remove(&record.offset);
        }
    }
}

/// Receives rebalance callbacks on the pump's thread.
struct Context {
    shared: Arc<Shared>,
    topic: String,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let partitions: HashSet<i32> = revoked
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let commits = self
            .shared
            .lock()
            .take_commits(&self.topic, Some(&partitions));
        if commits.count() > 0
            && let Err(e) = consumer.commit(&commits, CommitMode::Sync)
        {
            tracing::warn!(error = %e, topic = %self.topic, "commit before revocation failed; settled events may be delivered again");
        }
        let mut state = self.shared.lock();
        for partition in &partitions {
            state.partitions.remove(partition);
        }
        state
            .dispatcher
            .retain(|r| !partitions.contains(&r.partition), Instant::now());
        drop(state);
        tracing::debug!(topic = %self.topic, ?partitions, "partitions revoked");
        self.shared.changed.notify_waiters();
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                let mut state = self.shared.lock();
                for element in assigned.elements_for_topic(&self.topic) {
                    state.partitions.entry(element.partition()).or_default();
                }
                state.assigned = true;
                drop(state);
                tracing::debug!(topic = %self.topic, partitions = assigned.count(), "partitions assigned");
                self.shared.changed.notify_waiters();
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, topic = %self.topic, "rebalance failed");
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            tracing::warn!(error = %e, topic = %self.topic, "offset commit failed; settled events may be delivered again");
        }
    }
}

pub(super) async fn subscribe(
    config: &KafkaConfig,
    mut client: ClientConfig,
    producers: Arc<super::ProducerSlot>,
    topic: &Topic,
    options: SubscribeOptions,
) -> Result<Subscription> {
    let shared = Arc::new(Shared::default());
    client
        .set("group.id", options.group().as_str())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "auto.offset.reset",
            match options.start() {
                StartFrom::Latest => "latest",
                _ => "earliest",
            },
        )
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        );
    let context = Context {
        shared: Arc::clone(&shared),
        topic: topic.to_string(),
    };
    let consumer: StreamConsumer<Context> = client
        .create_with_context(context)
        .map_err(|e| map(e, "create consumer"))?;
    consumer
        .subscribe(&[topic.as_str()])
        .map_err(|e| map(e, "subscribe"))?;

    let stop = CancellationToken::new();
    let pump = Pump {
        consumer,
        shared: Arc::clone(&shared),
        producers,
        topic: topic.clone(),
        dead_letter: format!("{}{}", topic, config.dead_letter_suffix),
        max_event_bytes: config.max_event_bytes.get(),
        max_buffered: config.max_buffered.get(),
        commit_interval: config.commit_interval,
        delivery_timeout: config.delivery_timeout,
    };
    let pump = tokio::spawn(pump.run(stop.clone()));

    // Return once the member owns its partitions, so events published from
    // now on are seen by the group.
    let join_wait = config.session_timeout * 2 + Duration::from_secs(10);
    let member_shared = Arc::clone(&shared);
    crate::dispatch::join_then_subscribe(
        &shared.changed,
        join_wait,
        || {
            let mut state = shared.lock();
            if let Some(e) = state.failure.take() {
                return Some(Err(e));
            }
            state.assigned.then_some(Ok(()))
        },
        stop,
        pump,
        "kafka consumer",
        |stop| {
            let member = Member::new(member_shared, topic.clone(), options, stop);
            stream::unfold(member, |member| async move {
                let next = member.next_delivery().await?;
                Some((next, member))
            })
        },
    )
    .await
}

/// Owns the consumer.
struct Pump {
    consumer: StreamConsumer<Context>,
    shared: Arc<Shared>,
    /// For dead letters.
    producers: Arc<super::ProducerSlot>,
    topic: Topic,
    dead_letter: String,
    max_event_bytes: usize,
    max_buffered: usize,
    commit_interval: Duration,
    delivery_timeout: Duration,
}

impl Pump {
    async fn run(self, stop: CancellationToken) -> Result<()> {
        let mut tick = tokio::time::interval(self.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut full = false;
        let mut batch = Vec::with_capacity(RECV_BATCH);
        loop {
            let drained = self.shared.changed.notified();
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                _ = tick.tick() => {
                    self.commit(CommitMode::Async);
                    full = self.is_full(full);
                }
                // While the buffer is full, librdkafka's own bounded queue
                // holds what was fetched; settlements wake the pump.
                () = drained, if full => full = self.is_full(full),
                received = self.consumer.recv(), if !full => match received {
                    Ok(message) => {
                        self.accept(&message, &mut batch).await;
                        drop(message);
                        // Take what librdkafka already fetched without
                        // waiting; decode outside the lock, then hand the
                        // batch over and wake the subscription once.
                        for _ in 1..RECV_BATCH {
                            match self.consumer.recv().now_or_never() {
                                Some(Ok(message)) => self.accept(&message, &mut batch).await,
                                _ => break,
                            }
                        }
                        self.flush(&mut batch);
                        self.shared.changed.notify_waiters();
                        full = self.is_full(full);
                    }
                    Err(e) if e.rdkafka_error_code() == Some(rdkafka::error::RDKafkaErrorCode::Fatal) => {
                        tracing::error!(error = %e, topic = %self.topic, "fatal consumer error");
                        self.shared.lock().failure = Some(map(e, "consume"));
                        break;
                    }
                    Err(e) => {
                        if e.rdkafka_error_code().is_some_and(|c| !super::error::TRANSIENT_CODES.contains(&c)) {
                            tracing::warn!(error = %e, topic = %self.topic, "consumer error");
                        } else {
                            tracing::debug!(error = %e, topic = %self.topic, "transient consumer error");
                        }
                    }
                },
            }
        }
        self.commit(CommitMode::Sync);
        {
            let mut state = self.shared.lock();
            state.done = true;
        }
        self.shared.changed.notify_waiters();
        // Leaving the group blocks until the broker answers: off the runtime.
        let consumer = self.consumer;
        tokio::task::spawn_blocking(move || {
            consumer.unsubscribe();
            drop(consumer);
        })
        .await
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Closed {
                    what: "kafka consumer",
                },
                e,
            )
        })
    }

    /// Decodes one record into `batch`, or dead-letters it.
    async fn accept(&self, message: &BorrowedMessage<'_>, batch: &mut Vec<Accepted>) {
        let (partition, offset) = (message.partition(), message.offset());
        let payload = message.payload().unwrap_or_default();
        let decoded = if payload.len() > self.max_event_bytes {
            Err(Error::new(ErrorKind::EventTooLarge {
                size: payload.len(),
                limit: self.max_event_bytes,
            }))
        } else {
            let headers = message
                .headers()
                .into_iter()
                .flat_map(|headers| headers.iter().map(|h| (h.key, h.value.unwrap_or_default())));
            Binding::KAFKA.decode(headers, payload)
        };
        match decoded {
            Ok(event) => {
                let key = message
                    .key()
                    .map(|k| Arc::from(String::from_utf8_lossy(k).as_ref()))
                    .or_else(|| event.partition_key().map(Arc::from));
                batch.push(Accepted {
                    key,
                    record: Record {
                        partition,
                        offset,
                        event: Arc::new(event),
                    },
                });
            }
            Err(reason) => {
                // Keep arrival order: what was decoded before goes first.
                self.flush(batch);
                self.dead_letter(message, &reason).await;
                // The bad record is kept on the dead-letter topic: settled.
                let mut state = self.shared.lock();
                if let Some(p) = state.partitions.get_mut(&partition) {
                    p.high = Some(p.high.map_or(offset + 1, |h| h.max(offset + 1)));
                }
            }
        }
    }

    /// Hands decoded records to the dispatcher under one lock.
    fn flush(&self, batch: &mut Vec<Accepted>) {
        let now = Instant::now();
        // Short critical sections, so the subscription can pull in between.
        let mut records = batch.drain(..).peekable();
        while records.peek().is_some() {
            let mut state = self.shared.lock();
            let State {
                dispatcher,
                partitions,
                ..
            } = &mut *state;
            for Accepted { key, record } in records.by_ref().take(HANDOFF_CHUNK) {
                let Some(p) = partitions.get_mut(&record.partition) else {
                    // Revoked while this record was in the fetch queue: its
                    // next owner reads it again.
                    continue;
                };
                p.pending.insert(record.offset);
                p.high = Some(
                    p.high
                        .map_or(record.offset + 1, |h| h.max(record.offset + 1)),
                );
                dispatcher.push(key, record, now);
            }
        }
    }

    /// Copies a record that cannot be delivered to the dead-letter topic,
    /// retrying until the broker has it.
    async fn dead_letter(&self, message: &BorrowedMessage<'_>, reason: &Error) {
        tracing::error!(
            topic = %self.topic,
            partition = message.partition(),
            offset = message.offset(),
            error = %reason,
            dead_letter_topic = %self.dead_letter,
            "undeliverable record moved to the dead-letter topic"
        );
        let reason = reason.to_string();
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut headers = OwnedHeaders::new();
            if let Some(original) = message.headers() {
                for h in original.iter() {
                    headers = headers.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
            for (key, value) in [
                ("dlq-reason", reason.as_str()),
                ("dlq-topic", self.topic.as_str()),
                ("dlq-partition", partition.as_str()),
                ("dlq-offset", offset.as_str()),
            ] {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let key = message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned());
            let producer = self.producers.get();
            let sent = match enqueue_record(
                &producer,
                &self.dead_letter,
                key.as_deref(),
                headers,
                message.payload().unwrap_or_default(),
                self.delivery_timeout,
            )
            .await
            {
                Ok(delivery) => acknowledged(delivery).await,
                Err(e) => Err(e),
            }
            .map_err(|e| self.producers.replace_if_fatal(&producer, e));
            match sent {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, dead_letter_topic = %self.dead_letter, "dead-lettering failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn commit(&self, mode: CommitMode) {
        let commits = self.shared.lock().take_commits(self.topic.as_str(), None);
        if commits.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.commit(&commits, mode) {
            tracing::warn!(error = %e, topic = %self.topic, "offset commit failed; settled events may be delivered again");
        }
    }

    /// Whether to stop taking records: from `max_buffered` buffered events
    /// until the buffer has drained to half.
    fn is_full(&self, was_full: bool) -> bool {
        let buffered = self.shared.lock().dispatcher.len();
        if was_full {
            buffered > self.max_buffered / 2
        } else {
            buffered >= self.max_buffered
        }
    }
}
