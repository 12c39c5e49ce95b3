//! Publishing: CloudEvents encoded with the NATS binding, sent to JetStream
//! with `Nats-Msg-Id` for de-duplication, acknowledged durably. A batch is
//! pipelined, except that by default an event is sent only once the event of
//! its `partitionkey` before it was acknowledged, so a failure leaves each
//! key's stored events a prefix of its events in the batch
//! ([`NatsConfig::max_in_flight_per_key`](super::NatsConfig::max_in_flight_per_key)
//! lets more of a key's events be in flight).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::str::FromStr;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::{HeaderMap, HeaderName, HeaderValue, Subject};
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use foldhash::HashMap;
use tokio::time::Instant;
use tracing::Instrument;

use super::error::{self, SYSTEM};
use super::{Inner, MAX_PENDING_ACKS};
use crate::binding::{Binding, Mode};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{EventExt, attributes_size, validate_attributes};
use crate::telemetry::{self, operation};
use crate::topic::Topic;

/// How often a publish looks whether a lost connection is back.
const RECONNECT_POLL: Duration = Duration::from_millis(10);

/// How many acknowledgements one batch awaits at most before sending more.
const BATCH_WINDOW: usize = 256;

/// One encoded event, ready to send.
struct Outgoing {
    headers: HeaderMap,
    payload: Bytes,
}

impl Outgoing {
    /// Payload and header bytes, roughly as they travel.
    fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, values)| {
                values
                    .iter()
                    .map(|v| AsRef::<str>::as_ref(name).len() + v.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum();
        self.payload.len() + headers
    }

    fn into_message(self) -> PublishMessage {
        PublishMessage::build()
            .payload(self.payload)
            .headers(self.headers)
    }
}

/// A batch on its way: its acknowledgements awaited, and the events held
/// behind the events of their key in flight.
struct Sending<'a> {
    events: &'a [Event],
    /// Each event's partition key, looked up once.
    keys: Vec<Option<&'a str>>,
    /// How many events of one key may be in flight.
    per_key: usize,
    /// The first event, in batch order, not looked at yet.
    next: usize,
    /// Events released by an acknowledgement of their key (counted in
    /// flight already): sent before new ones.
    ready: VecDeque<usize>,
    /// Key → its events in flight (or ready), and those held behind them.
    keyed: HashMap<&'a str, Key>,
    /// Acknowledgements awaited, oldest first: (ack, event, size).
    pending: VecDeque<(PublishAckFuture, usize, usize)>,
}

/// One key's part of a [`Sending`].
#[derive(Default)]
struct Key {
    /// Sent or ready, not yet acknowledged.
    in_flight: usize,
    /// Waiting for room, in batch order.
    held: VecDeque<usize>,
}

impl<'a> Sending<'a> {
    fn new(events: &'a [Event], per_key: usize) -> Self {
        Self {
            events,
            keys: events.iter().map(EventExt::partition_key).collect(),
            per_key: per_key.max(1),
            next: 0,
            ready: VecDeque::new(),
            keyed: HashMap::default(),
            pending: VecDeque::new(),
        }
    }

    /// The next event that may be sent now, if any: one released by its
    /// key's acknowledgement, else the next in batch order whose key has
    /// room in flight (events behind a full key are held, in order).
    fn take(&mut self) -> Option<usize> {
        if let Some(i) = self.ready.pop_front() {
            return Some(i);
        }
        while self.next < self.events.len() {
            let i = self.next;
            self.next += 1;
            let Some(key) = self.keys[i] else {
                return Some(i);
            };
            let key = self.keyed.entry(key).or_default();
            // Nothing is held while the key has room, so sending `i` now
            // keeps the key's order.
            if key.in_flight < self.per_key {
                key.in_flight += 1;
                return Some(i);
            }
            key.held.push_back(i);
        }
        None
    }

    /// Event `i` is stored: the next event of its key may go.
    fn stored(&mut self, i: usize) {
        let Some(key) = self.keys[i] else {
            return;
        };
        if let Entry::Occupied(mut entry) = self.keyed.entry(key) {
            let key = entry.get_mut();
            match key.held.pop_front() {
                Some(next) => self.ready.push_back(next),
                None => {
                    key.in_flight = key.in_flight.saturating_sub(1);
                    if key.in_flight == 0 {
                        entry.remove();
                    }
                }
            }
        }
    }
}

impl Inner {
    /// Publishes `events` in order and waits until JetStream stored all of them.
    pub(super) async fn publish(&self, topic: &Topic, events: Vec<Event>) -> Result<()> {
        let span = tracing::info_span!(
            "publish",
            { telemetry::OTEL_NAME } = %format_args!("publish {topic}"),
            { telemetry::OTEL_KIND } = operation::KIND_PRODUCER,
            { telemetry::MESSAGING_SYSTEM } = SYSTEM,
            { telemetry::MESSAGING_OPERATION_TYPE } = operation::PUBLISH,
            { telemetry::MESSAGING_DESTINATION_NAME } = %topic,
            { telemetry::MESSAGING_BATCH_MESSAGE_COUNT } = events.len(),
            { telemetry::MESSAGING_MESSAGE_ID } =
                events.first().map(AttributesReader::id).unwrap_or_default(),
        );
        self.publish_in_span(topic, events).instrument(span).await
    }

    async fn publish_in_span(&self, topic: &Topic, events: Vec<Event>) -> Result<()> {
        self.check_open()?;
        // Nothing is sent unless every event's attributes are valid. An
        // event's size is known once it is encoded, just before it is sent
        // (one encoding each), so an oversized event fails the batch after
        // the events sent before it.
        for event in &events {
            validate_attributes(event)?;
        }
        self.ensure_stream(topic).await?;

        // Each event is encoded just before it is sent, so a large batch
        // does not hold a second, encoded copy of itself in memory.
        //
        // Events of different keys are pipelined, but an event waits until
        // the one of its key before it is stored (by default; the setting
        // `max_in_flight_per_key` lets more go). A connection lost mid-batch
        // can lose events already written while async-nats sends the ones it
        // still buffered after reconnecting, and a stream leader change can
        // refuse one event and store the next: had the later event of a key
        // been in flight, it could be stored before a retry of the earlier.
        let mut sending = Sending::new(&events, self.config.in_flight_per_key());
        let subject = Subject::from(topic.as_str());
        loop {
            if let Some(i) = sending.take() {
                let (ack, size) = self.send(topic, &subject, i, &mut sending).await?;
                sending.pending.push_back((ack, i, size));
                if sending.pending.len() >= BATCH_WINDOW {
                    self.confirm_oldest(topic, &mut sending).await?;
                }
            } else if !sending.pending.is_empty() {
                self.confirm_oldest(topic, &mut sending).await?;
            } else {
                // Nothing is held without an event of its key pending or
                // ready.
                return Ok(());
            }
        }
    }

    /// Encodes `event` in the configured mode, with `Nats-Msg-Id`, and
    /// checks its size.
    fn encode(&self, event: &Event) -> Result<Outgoing> {
        let mut headers = HeaderMap::new();
        // The limit applies to `EventExt::encoded_size`, whose data part is
        // the binary-mode payload: counted here without serializing again.
        let (payload, size) = match self.config.mode() {
            Mode::Binary => {
                let mut failed = None;
                Binding::NATS.binary_headers(event, |name, value| {
                    if failed.is_none()
                        && let Err(e) = add_header(&mut headers, name, value)
                    {
                        failed = Some(e);
                    }
                });
                if let Some(e) = failed {
                    return Err(e);
                }
                let payload = event.data_bytes().map(Cow::into_owned).unwrap_or_default();
                let size = attributes_size(event).saturating_add(payload.len());
                (payload, size)
            }
            mode => {
                let message = Binding::NATS.encode(event, mode)?;
                for (name, value) in &message.headers {
                    add_header(&mut headers, name, value)?;
                }
                (message.payload, event.encoded_size())
            }
        };
        let id = HeaderValue::from_str(&header_safe(event.id()))
            .map_err(|e| Error::with_source(ErrorKind::Encode, e))?;
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        let limit = self.max_event_bytes;
        if size > limit {
            return Err(Error::new(ErrorKind::EventTooLarge { size, limit }));
        }
        Ok(Outgoing {
            headers,
            payload: Bytes::from(payload),
        })
    }

    /// Encodes and sends the batch's event `i`; returns its acknowledgement
    /// and size. When too many acknowledgements are outstanding on the
    /// connection, first waits for the oldest of this batch, or briefly for
    /// other publishers' to clear, and encodes the event again (the refused
    /// send consumed the message; this is the rare path).
    async fn send(
        &self,
        topic: &Topic,
        subject: &Subject,
        i: usize,
        sending: &mut Sending<'_>,
    ) -> Result<(PublishAckFuture, usize)> {
        let event = &sending.events[i];
        let give_up = Instant::now() + self.timeout();
        loop {
            self.connected(give_up).await?;
            let message = self.encode(event)?;
            let size = message.size();
            match self
                .js
                .send_publish(subject.clone(), message.into_message())
                .await
            {
                Ok(ack) => return Ok((ack, size)),
                Err(e) if e.kind() == PublishErrorKind::MaxAckPending => {
                    if !sending.pending.is_empty() {
                        self.confirm_oldest(topic, sending).await?;
                    } else if Instant::now() < give_up {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    } else {
                        return Err(Error::with_source(
                            ErrorKind::Backpressure {
                                topic: topic.to_string(),
                                limit: MAX_PENDING_ACKS,
                            },
                            e,
                        ));
                    }
                }
                Err(e) => return Err(self.publish_error(topic, e, size)),
            }
        }
    }

    /// Waits until the connection is up, at most until `give_up`. While it
    /// is down nothing is handed to async-nats, which would hold it (up to
    /// its command channel's capacity) and send it once it reconnects, long
    /// after this publish failed and its caller (an outbox relay, say) sent
    /// it again: memory held for an outage, and stale copies afterwards.
    async fn connected(&self, give_up: Instant) -> Result<()> {
        while self.client.connection_state() != async_nats::connection::State::Connected {
            if Instant::now() >= give_up {
                return Err(Error::with_source(
                    ErrorKind::Connection { system: SYSTEM },
                    "the connection to NATS is down; nothing more of the batch was sent",
                ));
            }
            tokio::time::sleep(RECONNECT_POLL).await;
        }
        Ok(())
    }

    /// Awaits the oldest outstanding acknowledgement, and releases the next
    /// event of its key.
    async fn confirm_oldest(&self, topic: &Topic, sending: &mut Sending<'_>) -> Result<()> {
        let Some((ack, i, size)) = sending.pending.pop_front() else {
            return Ok(());
        };
        match ack.await {
            Ok(ack) => {
                if ack.duplicate {
                    tracing::debug!(
                        stream = %ack.stream,
                        stream.sequence = ack.sequence,
                        "JetStream already had this event id; stored once"
                    );
                }
                sending.stored(i);
                Ok(())
            }
            Err(e) => Err(self.publish_error(topic, e, size)),
        }
    }

    fn publish_error(
        &self,
        topic: &Topic,
        e: async_nats::jetstream::context::PublishError,
        size: usize,
    ) -> Error {
        if e.kind() == PublishErrorKind::StreamNotFound {
            // Deleted behind our back: provision again next time.
            self.forget_stream(topic);
        }
        error::publish(
            e,
            topic.as_str(),
            self.max_event_bytes,
            size,
            self.timeout(),
        )
    }
}

/// Adds one CloudEvents header, or says which attribute cannot be one.
///
/// An event's headers have distinct names (one per attribute, and
/// `content-type`), so each is inserted, not appended: one hash each.
fn add_header(headers: &mut HeaderMap, name: &str, value: &str) -> Result<()> {
    let header = match known_header(name) {
        Some(header) => header,
        None => HeaderName::from_str(name).map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidEvent {
                    reason: format!("attribute header `{name}` is not a valid NATS header name"),
                },
                e,
            )
        })?,
    };
    let value = HeaderValue::from_str(value).map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidEvent {
                reason: format!("the value of `{name}` cannot be a NATS header"),
            },
            e,
        )
    })?;
    headers.insert(header, value);
    Ok(())
}

/// The header name of a CloudEvents attribute this crate writes, without
/// validating or copying it: the standard attributes, `content-type`, and
/// the crate's extensions. Other names are parsed.
fn known_header(name: &str) -> Option<HeaderName> {
    macro_rules! known {
        ($($name:literal),* $(,)?) => {
            match name {
                $($name => Some(HeaderName::from_static($name)),)*
                _ => None,
            }
        };
    }
    known!(
        "ce-specversion",
        "ce-id",
        "ce-source",
        "ce-type",
        "ce-subject",
        "ce-time",
        "ce-dataschema",
        "content-type",
        "ce-partitionkey",
        "ce-traceparent",
        "ce-tracestate",
        "ce-sagaid",
        "ce-sagastep",
        "ce-sagaattempt",
        "ce-correlationid",
        "ce-causationid",
    )
}

/// `value` with what a header value cannot hold (`\r`, `\n`, and `%` to keep
/// the mapping one-to-one) percent-encoded.
fn header_safe(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\r', '\n', '%']) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '\r' => out.push_str("%0D"),
            '\n' => out.push_str("%0A"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends of a batch, driven as `publish_in_span` drives them but with
    /// `steps` choosing between sending the next event and confirming the
    /// oldest: returns each send as (event, key's events then unconfirmed).
    fn drive(keys: &[Option<u8>], per_key: usize, steps: &[bool]) -> Vec<(usize, usize)> {
        let events: Vec<Event> = keys
            .iter()
            .enumerate()
            .map(|(n, key)| {
                let mut event = crate::CloudEventBuilder::new("t", "/s");
                if let Some(key) = key {
                    event = event.partition_key(format!("k{key}"));
                }
                event.json_data(&n).build().expect("valid")
            })
            .collect();
        let mut sending = Sending::new(&events, per_key);
        let mut unconfirmed: VecDeque<usize> = VecDeque::new();
        let mut sent = Vec::new();
        let mut steps = steps.iter().copied().cycle();
        loop {
            let confirm = !unconfirmed.is_empty() && steps.next().unwrap_or(false);
            if !confirm && let Some(i) = sending.take() {
                unconfirmed.push_back(i);
                let of_key = unconfirmed
                    .iter()
                    .filter(|&&j| keys[j].is_some() && keys[j] == keys[i])
                    .count();
                sent.push((i, of_key));
            } else if let Some(i) = unconfirmed.pop_front() {
                sending.stored(i);
            } else {
                assert!(sending.keyed.is_empty(), "a key left behind");
                return sent;
            }
        }
    }

    proptest::proptest! {
        /// Every event is sent once, each key's in batch order, with at
        /// most `per_key` of a key unconfirmed; events without a key are
        /// never held.
        #[test]
        fn a_key_has_at_most_its_window_in_flight_and_keeps_its_order(
            keys in proptest::collection::vec(proptest::option::of(0u8..4), 0..60),
            per_key in 1usize..5,
            steps in proptest::collection::vec(proptest::bool::ANY, 1..16),
        ) {
            let sent = drive(&keys, per_key, &steps);
            let mut order: Vec<usize> = sent.iter().map(|&(i, _)| i).collect();
            for key in 0u8..4 {
                let of_key: Vec<usize> =
                    order.iter().copied().filter(|&i| keys[i] == Some(key)).collect();
                proptest::prop_assert!(of_key.is_sorted(), "key {} out of order: {:?}", key, of_key);
            }
            for &(i, in_flight) in &sent {
                if keys[i].is_some() {
                    proptest::prop_assert!(in_flight <= per_key, "event {}: {} in flight", i, in_flight);
                }
            }
            order.sort_unstable();
            proptest::prop_assert_eq!(order, (0..keys.len()).collect::<Vec<_>>());
        }
    }

    /// With a window of `n`, the first `n` events of one key go out before
    /// any is confirmed; with the default 1, only the first.
    #[test]
    fn a_window_lets_a_keys_events_be_pipelined() {
        let keys = [Some(0); 6];
        // Send while anything can be sent; confirm only when nothing can.
        let never_confirm_early = [false];
        for per_key in 1..=4 {
            let sent = drive(&keys, per_key, &never_confirm_early);
            let widest = sent.iter().map(|&(_, n)| n).max();
            assert_eq!(widest, Some(per_key), "window {per_key}");
        }
    }

    #[test]
    fn known_header_names_are_the_parsed_ones() {
        let prefix = Binding::NATS.prefix();
        let attributes = [
            "specversion",
            "id",
            "source",
            "type",
            "subject",
            "time",
            "dataschema",
            crate::event::ext::PARTITION_KEY,
            crate::event::ext::TRACEPARENT,
            crate::event::ext::TRACESTATE,
            crate::event::ext::SAGA_ID,
            crate::event::ext::SAGA_STEP,
            crate::event::ext::SAGA_ATTEMPT,
            crate::event::ext::CORRELATION_ID,
            crate::event::ext::CAUSATION_ID,
        ];
        let names = attributes
            .iter()
            .map(|a| format!("{prefix}{a}"))
            .chain([crate::binding::CONTENT_TYPE.to_owned()]);
        for name in names {
            let known = known_header(&name).unwrap_or_else(|| panic!("{name} is not known"));
            let parsed = HeaderName::from_str(&name).expect("valid name");
            assert_eq!(known, parsed, "{name}");
        }
        assert!(known_header("ce-other").is_none());
    }

    #[test]
    fn message_ids_fit_in_a_header() {
        assert_eq!(header_safe("0193-abc"), "0193-abc");
        assert_eq!(header_safe("a\r\nb%"), "a%0D%0Ab%25");
        assert!(HeaderValue::from_str(&header_safe("x\ny")).is_ok());
    }
}
