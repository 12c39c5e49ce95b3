//! Publishing: CloudEvents encoded with the NATS binding, sent to JetStream
//! with `Nats-Msg-Id` for de-duplication, acknowledged durably. A batch is
//! pipelined: sent whole, then its acknowledgements awaited in order.

use std::collections::VecDeque;
use std::str::FromStr;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use tokio::time::Instant;
use tracing::Instrument;

use super::error::{self, SYSTEM};
use super::{Inner, MAX_PENDING_ACKS};
use crate::binding::Binding;
use crate::error::{Error, ErrorKind, Result};
use crate::event::validate_for_publish;
use crate::telemetry::{self, operation};
use crate::topic::Topic;

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
        // Nothing is sent unless every event is valid.
        for event in &events {
            validate_for_publish(event, self.max_event_bytes)?;
        }
        self.ensure_stream(topic).await?;

        // Each event is encoded just before it is sent, so a large batch
        // does not hold a second, encoded copy of itself in memory.
        let mut pending: VecDeque<(PublishAckFuture, usize)> = VecDeque::new();
        for event in &events {
            let (ack, size) = self.send(topic, event, &mut pending).await?;
            pending.push_back((ack, size));
            if pending.len() >= BATCH_WINDOW {
                self.confirm_oldest(topic, &mut pending).await?;
            }
        }
        while !pending.is_empty() {
            self.confirm_oldest(topic, &mut pending).await?;
        }
        Ok(())
    }

    /// Encodes `event` in the configured mode, with `Nats-Msg-Id`.
    fn encode(&self, event: &Event) -> Result<Outgoing> {
        let message = Binding::NATS.encode(event, self.config.mode())?;
        let mut headers = HeaderMap::new();
        for (name, value) in &message.headers {
            let header = HeaderName::from_str(name).map_err(|e| {
                Error::with_source(
                    ErrorKind::InvalidEvent {
                        reason: format!(
                            "attribute header `{name}` is not a valid NATS header name"
                        ),
                    },
                    e,
                )
            })?;
            let value = HeaderValue::from_str(value).map_err(|e| {
                Error::with_source(
                    ErrorKind::InvalidEvent {
                        reason: format!("the value of `{name}` cannot be a NATS header"),
                    },
                    e,
                )
            })?;
            headers.append(header, value);
        }
        let id = HeaderValue::from_str(&header_safe(event.id()))
            .map_err(|e| Error::with_source(ErrorKind::Encode, e))?;
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        Ok(Outgoing {
            headers,
            payload: Bytes::from(message.payload),
        })
    }

    /// Encodes and sends one event; returns its acknowledgement and size.
    /// When too many acknowledgements are outstanding on the connection,
    /// first waits for the oldest of this batch, or briefly for other
    /// publishers' to clear, and encodes the event again (the refused send
    /// consumed the message; this is the rare path).
    async fn send(
        &self,
        topic: &Topic,
        event: &Event,
        pending: &mut VecDeque<(PublishAckFuture, usize)>,
    ) -> Result<(PublishAckFuture, usize)> {
        let give_up = Instant::now() + self.timeout();
        loop {
            let message = self.encode(event)?;
            let size = message.size();
            match self
                .js
                .send_publish(topic.to_string(), message.into_message())
                .await
            {
                Ok(ack) => return Ok((ack, size)),
                Err(e) if e.kind() == PublishErrorKind::MaxAckPending => {
                    if !pending.is_empty() {
                        self.confirm_oldest(topic, pending).await?;
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

    /// Awaits the oldest outstanding acknowledgement.
    async fn confirm_oldest(
        &self,
        topic: &Topic,
        pending: &mut VecDeque<(PublishAckFuture, usize)>,
    ) -> Result<()> {
        let Some((ack, size)) = pending.pop_front() else {
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

    #[test]
    fn message_ids_fit_in_a_header() {
        assert_eq!(header_safe("0193-abc"), "0193-abc");
        assert_eq!(header_safe("a\r\nb%"), "a%0D%0Ab%25");
        assert!(HeaderValue::from_str(&header_safe("x\ny")).is_ok());
    }
}
