//! Kafka consumer-group subscriptions.
//!
//! One task (the pump) owns the rdkafka consumer: it receives records,
//! copies them out of librdkafka in batches, stops taking records when the
//! buffer is full, and commits settled offsets. A second task (the decoder)
//! decodes each batch into the subscription's [`Dispatcher`], or
//! dead-letters what cannot be delivered, so receiving and decoding can run
//! on two threads at once. Deliveries are pulled from the dispatcher, so per-key order,
//! nack delays and ack deadlines work as on the other brokers. Rebalance
//! callbacks commit what was settled on the partitions being revoked and
//! drop their buffered records, which the partitions' next owner reads
//! again from the committed offset; records still on their way to the
//! decoder are dropped too (see [`Partition::since`]).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cloudevents::Event;
use foldhash::HashMap;
use futures_util::{FutureExt as _, stream};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::KafkaConfig;
use super::error::{SYSTEM, map};
use super::raw::{RawBatch, RawRecord, RawView};
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

/// How many received batches may wait for the decoder.
const DECODE_QUEUE: usize = 2;

/// A decoded record on its way to the dispatcher.
#[derive(Debug)]
struct Accepted {
    key: Option<Arc<str>>,
    /// The assignment epoch it was received in.
    epoch: u64,
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
    /// The assignment epoch in which the partition was assigned. A record
    /// received in an earlier epoch was fetched under a previous assignment
    /// of the partition, before a revocation dropped what was buffered: it
    /// is stale (the offsets committed since may be past it, or it may be
    /// read again), so the decoder drops it.
    since: u64,
}

impl Partition {
    /// Whether a record received at `epoch` belongs to this assignment.
    fn admits(&self, epoch: u64) -> bool {
        epoch >= self.since
    }

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
    /// Records handed to the decoder and not yet buffered (or dropped).
    decoding: usize,
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

    /// Takes `partitions` on, as assigned in epoch `since`.
    fn assign(&mut self, partitions: impl IntoIterator<Item = i32>, since: u64) {
        for partition in partitions {
            self.partitions
                .entry(partition)
                .or_insert_with(|| Partition {
                    since,
                    ..Partition::default()
                });
        }
        self.assigned = true;
    }

    /// Lets `partitions` go, with what is buffered of them.
    fn revoke(&mut self, partitions: &HashSet<i32>) {
        for partition in partitions {
            self.partitions.remove(partition);
        }
        self.dispatcher
            .retain(|r| !partitions.contains(&r.partition), Instant::now());
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

/// Receives rebalance callbacks on the pump's thread (librdkafka serves
/// them inside the pump's polls).
struct Context {
    shared: Arc<Shared>,
    topic: String,
    /// Counts revocations; each record is tagged with it when received.
    epoch: AtomicU64,
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
        // Records received from now on belong to a later assignment.
        self.epoch.fetch_add(1, Ordering::Relaxed);
        let commits = self
            .shared
            .lock()
            .take_commits(&self.topic, Some(&partitions));
        if consumer.assignment_lost() {
            // The session lapsed (a broker that stopped answering, say): the
            // group has given the partitions away, so the commit would be
            // refused, and librdkafka's synchronous commit waits for the
            // coordinator without end, on the runtime's thread that polls.
            if commits.count() > 0 {
                tracing::warn!(topic = %self.topic, ?partitions, "partitions lost with the session; events settled since the last commit are delivered again");
            }
        } else if commits.count() > 0
            && let Err(e) = consumer.commit(&commits, CommitMode::Sync)
        {
            tracing::warn!(error = %e, topic = %self.topic, "commit before revocation failed; settled events may be delivered again");
        }
        self.shared.lock().revoke(&partitions);
        tracing::debug!(topic = %self.topic, ?partitions, "partitions revoked");
        self.shared.changed.notify_waiters();
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                let partitions = assigned.elements_for_topic(&self.topic);
                self.shared.lock().assign(
                    partitions.iter().map(|e| e.partition()),
                    self.epoch.load(Ordering::Relaxed),
                );
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
        epoch: AtomicU64::new(0),
    };
    let consumer: StreamConsumer<Context> = client
        .create_with_context(context)
        .map_err(|e| map(e, "create consumer"))?;
    consumer
        .subscribe(&[topic.as_str()])
        .map_err(|e| map(e, "subscribe"))?;

    let stop = CancellationToken::new();
    let (received, to_decode) = mpsc::channel(DECODE_QUEUE);
    let (recycle, spare) = mpsc::unbounded_channel();
    let decoder = Decoder {
        shared: Arc::clone(&shared),
        producers,
        topic: topic.clone(),
        dead_letter: format!("{}{}", topic, config.dead_letter_suffix),
        max_event_bytes: config.max_event_bytes.get(),
        delivery_timeout: config.delivery_timeout,
        recycle,
    };
    let decoder_stop = stop.child_token();
    let decoder = tokio::spawn(decoder.run(to_decode, decoder_stop.clone()));
    let pump = Pump {
        consumer: Closing(Some(consumer)),
        shared: Arc::clone(&shared),
        topic: topic.clone(),
        max_buffered: config.max_buffered.get(),
        commit_interval: config.commit_interval,
        leave_wait: config.session_timeout,
        received,
        spare,
    };
    let pump = tokio::spawn(pump.run((decoder, decoder_stop), stop.clone()));

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

/// The consumer, left and destroyed on a thread of its own however it is
/// dropped. librdkafka's close waits for the group coordinator (rdkafka's
/// `BaseConsumer::drop` polls until it is done), and a broker that keeps
/// the connection open but does not answer (a network partition) makes it
/// wait without end. On a runtime's thread that would hold a worker, and
/// the runtime's shutdown (a pump dropped with its runtime, as when a
/// service's `main` returns); `spawn_blocking` would hold the shutdown too,
/// since a runtime waits for its blocking tasks.
struct Closing(Option<StreamConsumer<Context>>);

impl Closing {
    /// Runs `last` (with the consumer, before it leaves the group), leaves
    /// the group and destroys the consumer on a thread of its own; the
    /// receiver hears when all of it is done.
    fn close(
        mut self,
        last: impl FnOnce(&StreamConsumer<Context>) + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (done, finished) = tokio::sync::oneshot::channel();
        if let Some(consumer) = self.0.take() {
            on_own_thread(move || {
                last(&consumer);
                consumer.unsubscribe();
                drop(consumer);
                let _ = done.send(());
            });
        }
        finished
    }
}

impl std::ops::Deref for Closing {
    type Target = StreamConsumer<Context>;

    fn deref(&self) -> &Self::Target {
        // Taken only by `close` and `drop`, which consume it.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("the consumer is taken only when closing"))
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            on_own_thread(move || drop(consumer));
        }
    }
}

/// Runs `work` on a new thread. If none can be started, `work` is dropped
/// here, the consumer in it with it (blocking as rdkafka's drop does).
fn on_own_thread(work: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new()
        .name("kafka-consumer-close".to_owned())
        .spawn(work)
    {
        tracing::error!(error = %e, "no thread to close a Kafka consumer on; closing it here");
    }
}

/// Owns the consumer.
struct Pump {
    consumer: Closing,
    shared: Arc<Shared>,
    topic: Topic,
    max_buffered: usize,
    commit_interval: Duration,
    /// How long `close` waits for the consumer to leave its group: the
    /// session timeout, after which the group has dropped the member anyway.
    leave_wait: Duration,
    /// Batches on their way to the decoder.
    received: mpsc::Sender<RawBatch>,
    /// Batches the decoder is done with, for reuse.
    spare: mpsc::UnboundedReceiver<RawBatch>,
}

impl Pump {
    /// Runs until `stop`, or a fatal error; then stops the decoder (its
    /// task and token) and leaves the group.
    async fn run(
        mut self,
        (decoder, decoder_stop): (tokio::task::JoinHandle<()>, CancellationToken),
        stop: CancellationToken,
    ) -> Result<()> {
        let mut tick = tokio::time::interval(self.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut full = false;
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
                        let epoch = &self.consumer.context().epoch;
                        let mut batch = self.spare.try_recv().unwrap_or_default();
                        batch.push(&message, epoch.load(Ordering::Relaxed));
                        drop(message);
                        // Take what librdkafka already fetched without
                        // waiting (a rebalance served by one of these polls
                        // moves the epoch), and hand it over in one go.
                        for _ in 1..RECV_BATCH {
                            match self.consumer.recv().now_or_never() {
                                Some(Ok(message)) => {
                                    batch.push(&message, epoch.load(Ordering::Relaxed));
                                }
                                _ => break,
                            }
                        }
                        self.shared.lock().decoding += batch.len();
                        tokio::select! {
                            biased;
                            () = stop.cancelled() => break,
                            sent = self.received.send(batch) => if sent.is_err() {
                                // The decoder stops only when told to.
                                break;
                            },
                        }
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
        // The decoder ends with the channel (or is stopped mid-way, leaving
        // the rest uncommitted for the partitions' next reader); nothing
        // reaches the buffer after it.
        let Self {
            consumer,
            shared,
            topic,
            received,
            leave_wait,
            ..
        } = self;
        drop(received);
        decoder_stop.cancel();
        if let Err(e) = decoder.await {
            tracing::error!(error = %e, topic = %topic, "kafka decoder task failed");
        }
        // The last commit and leaving the group block until the broker
        // answers: off the runtime (see `Closing`).
        let theirs = Arc::clone(&shared);
        let topic_name = topic.to_string();
        let left = consumer.close(move |consumer| {
            commit(consumer, &theirs, &topic, CommitMode::Sync);
            end(&theirs);
        });
        let left = tokio::time::timeout(leave_wait, left).await;
        end(&shared);
        if left.is_ok() {
            return Ok(());
        }
        tracing::warn!(topic = %topic_name, after = ?leave_wait, "the broker did not answer while the consumer left its group; it goes on leaving on a thread of its own, and offsets not committed yet are delivered again");
        Err(Error::new(ErrorKind::Timeout {
            operation: "leaving the Kafka consumer group",
            after: leave_wait,
        }))
    }

    fn commit(&self, mode: CommitMode) {
        commit(&self.consumer, &self.shared, &self.topic, mode);
    }

    /// Whether to stop taking records: from `max_buffered` buffered events
    /// (those being decoded included) until the buffer has drained to half.
    fn is_full(&self, was_full: bool) -> bool {
        let state = self.shared.lock();
        let buffered = state.dispatcher.len() + state.decoding;
        drop(state);
        if was_full {
            buffered > self.max_buffered / 2
        } else {
            buffered >= self.max_buffered
        }
    }
}

/// Ends the subscription's deliveries.
fn end(shared: &Shared) {
    shared.lock().done = true;
    shared.changed.notify_waiters();
}

/// Commits the offsets that moved since the last commit.
fn commit(consumer: &StreamConsumer<Context>, shared: &Shared, topic: &Topic, mode: CommitMode) {
    let commits = shared.lock().take_commits(topic.as_str(), None);
    if commits.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&commits, mode) {
        tracing::warn!(error = %e, topic = %topic, "offset commit failed; settled events may be delivered again");
    }
}

/// Hands decoded records to the dispatcher, a few per lock, dropping those
/// received before their partition's current assignment.
fn hand_over(shared: &Shared, batch: &mut Vec<Accepted>) {
    let now = Instant::now();
    // Short critical sections, so the subscription can pull in between.
    let mut records = batch.drain(..).peekable();
    while records.peek().is_some() {
        let mut state = shared.lock();
        let State {
            dispatcher,
            partitions,
            ..
        } = &mut *state;
        for Accepted { key, epoch, record } in records.by_ref().take(HANDOFF_CHUNK) {
            let Some(p) = partitions
                .get_mut(&record.partition)
                .filter(|p| p.admits(epoch))
            else {
                // Revoked while this record was on its way: its next
                // owner reads it again.
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

/// Decodes received batches into the dispatcher, in arrival order.
struct Decoder {
    shared: Arc<Shared>,
    /// For dead letters.
    producers: Arc<super::ProducerSlot>,
    topic: Topic,
    dead_letter: String,
    max_event_bytes: usize,
    delivery_timeout: Duration,
    /// Hands emptied batches back to the pump.
    recycle: mpsc::UnboundedSender<RawBatch>,
}

impl Decoder {
    async fn run(self, mut received: mpsc::Receiver<RawBatch>, stop: CancellationToken) {
        let mut accepted = Vec::with_capacity(RECV_BATCH);
        loop {
            let mut batch = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                batch = received.recv() => match batch {
                    Some(batch) => batch,
                    None => return,
                },
            };
            let (records, view) = batch.split();
            let received = records.len();
            for record in records {
                if !self.accept(view, record, &mut accepted, &stop).await {
                    return;
                }
            }
            hand_over(&self.shared, &mut accepted);
            {
                let mut state = self.shared.lock();
                state.decoding = state.decoding.saturating_sub(received);
            }
            self.shared.changed.notify_waiters();
            if let Some(batch) = batch.recycle() {
                // The pump may be gone; the batch is then simply dropped.
                let _ = self.recycle.send(batch);
            }
        }
    }

    /// Decodes one record into `accepted`, or dead-letters it; `false` when
    /// stopped while dead-lettering.
    async fn accept(
        &self,
        view: RawView<'_>,
        record: &mut RawRecord,
        accepted: &mut Vec<Accepted>,
        stop: &CancellationToken,
    ) -> bool {
        let size = record.payload.len();
        let decoded = if record.headers_unreadable {
            Err(Error::with_source(
                ErrorKind::Decode {
                    what: "the record's headers",
                },
                "a header name is not UTF-8; the dead letter carries none of the headers",
            ))
        } else if size > self.max_event_bytes {
            Err(Error::new(ErrorKind::EventTooLarge {
                size,
                limit: self.max_event_bytes,
            }))
        } else {
            let headers = view
                .headers(record)
                .map(|(name, value)| (name, value.unwrap_or_default()));
            Binding::KAFKA.decode_owned(headers, &mut record.payload)
        };
        match decoded {
            Ok(event) => {
                let key = view
                    .key(record)
                    .map(|k| Arc::from(String::from_utf8_lossy(k).as_ref()))
                    .or_else(|| event.partition_key().map(Arc::from));
                accepted.push(Accepted {
                    key,
                    epoch: record.epoch,
                    record: Record {
                        partition: record.partition,
                        offset: record.offset,
                        event: Arc::new(event),
                    },
                });
                true
            }
            Err(reason) => {
                // Keep arrival order: what was decoded before goes first.
                hand_over(&self.shared, accepted);
                if !self.admitted(record) {
                    // Revoked since: its next owner reads it again.
                    return true;
                }
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return false,
                    () = self.dead_letter(view, record, &reason) => {}
                }
                // The bad record is kept on the dead-letter topic: settled.
                let mut state = self.shared.lock();
                if let Some(p) = state
                    .partitions
                    .get_mut(&record.partition)
                    .filter(|p| p.admits(record.epoch))
                {
                    p.high = Some(
                        p.high
                            .map_or(record.offset + 1, |h| h.max(record.offset + 1)),
                    );
                }
                true
            }
        }
    }

    /// Whether `record`'s partition is still assigned as when it was received.
    fn admitted(&self, record: &RawRecord) -> bool {
        self.shared
            .lock()
            .partitions
            .get(&record.partition)
            .is_some_and(|p| p.admits(record.epoch))
    }

    /// Copies a record that cannot be delivered to the dead-letter topic,
    /// retrying until the broker has it.
    async fn dead_letter(&self, view: RawView<'_>, record: &RawRecord, reason: &Error) {
        tracing::error!(
            topic = %self.topic,
            partition = record.partition,
            offset = record.offset,
            error = %reason,
            dead_letter_topic = %self.dead_letter,
            "undeliverable record moved to the dead-letter topic"
        );
        let reason = reason.to_string();
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let key = view
            .key(record)
            .map(|k| String::from_utf8_lossy(k).into_owned());
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut headers = OwnedHeaders::new();
            for (key, value) in view.headers(record) {
                headers = headers.insert(Header { key, value });
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
            let producer = self.producers.get();
            let sent = match enqueue_record(
                &producer,
                &self.dead_letter,
                key.as_deref(),
                headers,
                &record.payload,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::AttributesReader as _;

    use crate::event::CloudEventBuilder;

    fn accepted(partition: i32, offset: i64, epoch: u64) -> Accepted {
        let event = CloudEventBuilder::new("t", "/s")
            .id(format!("{partition}-{offset}-{epoch}"))
            .build()
            .expect("event");
        Accepted {
            key: Some(Arc::from(format!("{partition}-{offset}-{epoch}"))),
            epoch,
            record: Record {
                partition,
                offset,
                event: Arc::new(event),
            },
        }
    }

    fn buffered(shared: &Shared) -> Vec<String> {
        // Every record has a key of its own, so all are deliverable.
        let mut state = shared.lock();
        let mut ids = Vec::new();
        while let Ok(pulled) = state
            .dispatcher
            .pull(Instant::now(), Duration::from_secs(60))
        {
            ids.push(pulled.msg.event.id().to_owned());
        }
        ids
    }

    /// A record still on its way to the decoder when its partition was
    /// revoked and assigned again is not buffered: the partition's new
    /// assignment reads it again from the committed offset.
    #[test]
    fn records_from_before_a_reassignment_are_dropped() {
        let shared = Shared::default();
        shared.lock().assign([0, 1], 0);
        hand_over(&shared, &mut vec![accepted(0, 10, 0), accepted(1, 20, 0)]);
        assert_eq!(buffered(&shared), ["0-10-0", "1-20-0"]);

        // Both revoked (epoch 0 → 1), only partition 0 assigned again.
        shared.lock().revoke(&HashSet::from([0, 1]));
        shared.lock().assign([0], 1);
        let mut late = vec![
            accepted(0, 11, 0),
            accepted(1, 21, 0),
            accepted(0, 11, 1),
            accepted(2, 5, 1),
        ];
        hand_over(&shared, &mut late);
        assert!(late.is_empty());
        assert_eq!(
            buffered(&shared),
            ["0-11-1"],
            "only the current assignment's"
        );

        let mut state = shared.lock();
        let p = &state.partitions[&0];
        assert_eq!(p.pending, BTreeSet::from([11]));
        assert_eq!(p.high, Some(12));
        assert!(!state.partitions.contains_key(&1));
        let commits = state.take_commits("t", None);
        assert_eq!(
            commits.find_partition("t", 0).map(|e| e.offset()),
            Some(Offset::Offset(11)),
            "the unsettled record holds the commit point"
        );
    }

    /// Revoking drops what was buffered of the revoked partitions only.
    #[test]
    fn revoking_drops_only_the_revoked_partitions_records() {
        let shared = Shared::default();
        shared.lock().assign([0, 1], 0);
        hand_over(&shared, &mut vec![accepted(0, 1, 0), accepted(1, 1, 0)]);
        shared.lock().revoke(&HashSet::from([1]));
        assert_eq!(buffered(&shared), ["0-1-0"]);
        // Assigning a partition that is still held keeps its state.
        shared.lock().assign([0], 7);
        assert_eq!(shared.lock().partitions[&0].since, 0);
    }
}
