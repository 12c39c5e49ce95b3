//! The dead-letter event: the original event plus why, where and when it
//! was given up on.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use cloudevents::Event;
use cloudevents::event::ExtensionValue;

use crate::error::{Error, ErrorKind, Result};
use crate::subscriber::{ConsumerGroup, Received};
use crate::topic::Topic;

/// Extension: why the event was dead-lettered (the handler error's
/// `Display`, at most [`MAX_REASON_LEN`] bytes).
pub const DLQ_REASON: &str = "dlqreason";
/// Extension: the topic the event was consumed from.
pub const DLQ_TOPIC: &str = "dlqtopic";
/// Extension: the consumer group that gave up on it.
pub const DLQ_GROUP: &str = "dlqgroup";
/// Extension (integer): the delivery attempt on which it was given up on.
pub const DLQ_ATTEMPTS: &str = "dlqattempts";
/// Extension: when it was dead-lettered, RFC 3339 in UTC.
pub const DLQ_TIME: &str = "dlqtime";

/// The longest [`DLQ_REASON`] written, in bytes; longer reasons are cut at a
/// character boundary and end with `…`, so a long error chain cannot make the
/// dead-letter event too large to publish.
pub const MAX_REASON_LEN: usize = 1024;

/// Builds the dead-letter event for `received`: the original event unchanged
/// (same id, type, source, data, attributes and extensions) plus the
/// extensions [`DLQ_REASON`], [`DLQ_TOPIC`], [`DLQ_GROUP`], [`DLQ_ATTEMPTS`]
/// and [`DLQ_TIME`] (overwriting them if the event was dead-lettered before).
///
/// [`DeadLetter`](super::DeadLetter) uses it; adapters use it to dead-letter
/// a message they could not decode the same way, wrapping its raw bytes in an
/// event first.
///
/// ```
/// use std::num::NonZeroU32;
/// use broker_adapters::middleware::dead_letter::{dead_letter_event, DeadLetterInfo};
/// use broker_adapters::prelude::*;
/// use broker_adapters::{ConsumerGroup, DeliveryInfo};
///
/// let event = CloudEventBuilder::new("com.example.order.placed", "/orders").json_data(&1).build()?;
/// let received = Received {
///     event: event.clone().into(),
///     info: DeliveryInfo {
///         topic: Topic::from_static("orders"),
///         group: ConsumerGroup::try_from("billing")?,
///         attempt: NonZeroU32::MIN,
///     },
/// };
/// let dead = dead_letter_event(received, "the order has no lines");
/// assert_eq!(dead.id(), event.id());
/// let info = DeadLetterInfo::from_event(&dead)?.expect("dead-lettered");
/// assert_eq!(info.reason, "the order has no lines");
/// assert_eq!(info.topic.as_str(), "orders");
/// # Ok::<(), broker_adapters::Error>(())
/// ```
pub fn dead_letter_event(received: Received, reason: impl fmt::Display) -> Event {
    let Received { event, info } = received;
    let mut event = Arc::unwrap_or_clone(event);
    event.set_extension(DLQ_REASON, truncate(reason.to_string()));
    event.set_extension(DLQ_TOPIC, info.topic.as_str());
    event.set_extension(DLQ_GROUP, info.group.as_str());
    event.set_extension(DLQ_ATTEMPTS, i64::from(info.attempt.get()));
    event.set_extension(
        DLQ_TIME,
        Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
    );
    event
}

fn truncate(mut reason: String) -> String {
    if reason.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN - '…'.len_utf8();
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}

/// What the dead-letter extensions of an event say: read by tools that
/// inspect or replay a dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterInfo {
    /// Why the event was dead-lettered.
    pub reason: String,
    /// The topic it was consumed from (where to replay it).
    pub topic: Topic,
    /// The consumer group that gave up on it.
    pub group: ConsumerGroup,
    /// The delivery attempt on which it was given up on.
    pub attempts: NonZeroU32,
    /// When it was dead-lettered.
    pub time: DateTime<Utc>,
}

impl DeadLetterInfo {
    /// Reads the dead-letter extensions of `event`; `None` if it has no
    /// [`DLQ_REASON`] (it was not dead-lettered).
    ///
    /// Bindings that carry every attribute as a string are accepted.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidExtension`] naming the first extension that is
    /// missing or malformed.
    pub fn from_event(event: &Event) -> Result<Option<Self>> {
        let Some(reason) = event.extension(DLQ_REASON) else {
            return Ok(None);
        };
        let text = |name: &'static str| -> Result<String> {
            match event.extension(name) {
                Some(ExtensionValue::String(s)) => Ok(s.clone()),
                Some(other) => Ok(other.to_string()),
                None => Err(invalid(name, "it is missing".into())),
            }
        };
        let reason = reason.to_string();
        let topic =
            Topic::try_from(text(DLQ_TOPIC)?).map_err(|e| invalid(DLQ_TOPIC, e.to_string()))?;
        let group = ConsumerGroup::try_from(text(DLQ_GROUP)?.as_str())
            .map_err(|e| invalid(DLQ_GROUP, e.to_string()))?;
        let attempts = match event.extension(DLQ_ATTEMPTS) {
            Some(ExtensionValue::Integer(n)) => u32::try_from(*n).ok(),
            Some(ExtensionValue::String(s)) => s.parse::<u32>().ok(),
            _ => None,
        }
        .and_then(NonZeroU32::new)
        .ok_or_else(|| invalid(DLQ_ATTEMPTS, "it is not a positive integer".into()))?;
        let time = DateTime::parse_from_rfc3339(&text(DLQ_TIME)?)
            .map_err(|e| invalid(DLQ_TIME, format!("it is not RFC 3339: {e}")))?
            .with_timezone(&Utc);
        Ok(Some(Self {
            reason,
            topic,
            group,
            attempts,
            time,
        }))
    }
}

fn invalid(name: &'static str, reason: String) -> Error {
    Error::new(ErrorKind::InvalidExtension { name, reason })
}

#[cfg(test)]
mod tests {
    use cloudevents::AttributesReader;

    use super::*;
    use crate::event::CloudEventBuilder;
    use crate::subscriber::DeliveryInfo;

    fn received(event: Event, attempt: u32) -> Received {
        Received {
            event: event.into(),
            info: DeliveryInfo {
                topic: Topic::from_static("orders"),
                group: ConsumerGroup::try_from("billing").expect("valid"),
                attempt: NonZeroU32::new(attempt).expect("positive"),
            },
        }
    }

    #[test]
    fn keeps_the_original_and_adds_the_reason() {
        let original = CloudEventBuilder::new("com.example.t", "/src")
            .subject("s")
            .partition_key("k")
            .extension("custom", 7_i64)
            .json_data(&serde_json::json!({"n": 1}))
            .build()
            .expect("valid");
        let dead = dead_letter_event(received(original.clone(), 4), "boom");
        assert_eq!(dead.id(), original.id());
        assert_eq!(dead.ty(), original.ty());
        assert_eq!(dead.source(), original.source());
        assert_eq!(dead.subject(), original.subject());
        assert_eq!(dead.time(), original.time());
        assert_eq!(dead.data(), original.data());
        for (name, value) in original.iter_extensions() {
            assert_eq!(dead.extension(name), Some(value), "{name}");
        }
        assert_eq!(
            dead.extension(DLQ_ATTEMPTS),
            Some(&ExtensionValue::Integer(4))
        );
        let info = DeadLetterInfo::from_event(&dead)
            .expect("well-formed")
            .expect("dead-lettered");
        assert_eq!(info.reason, "boom");
        assert_eq!(info.topic.as_str(), "orders");
        assert_eq!(info.group.as_str(), "billing");
        assert_eq!(info.attempts.get(), 4);
        assert!((Utc::now() - info.time).num_seconds() < 60);
        // The builder's own naming rules accept every name.
        for name in [DLQ_REASON, DLQ_TOPIC, DLQ_GROUP, DLQ_ATTEMPTS, DLQ_TIME] {
            CloudEventBuilder::new("t", "/s")
                .extension(name, "x")
                .build()
                .expect(name);
        }
    }

    #[test]
    fn long_reasons_are_cut_at_a_character_boundary() {
        let event = CloudEventBuilder::new("t", "/s").build().expect("valid");
        let dead = dead_letter_event(received(event, 1), "é".repeat(MAX_REASON_LEN));
        let info = DeadLetterInfo::from_event(&dead)
            .expect("well-formed")
            .expect("dead-lettered");
        assert!(info.reason.len() <= MAX_REASON_LEN);
        assert!(info.reason.ends_with('…'));
    }

    #[test]
    fn reading_tolerates_string_bindings_and_reports_bad_ones() {
        let plain = CloudEventBuilder::new("t", "/s").build().expect("valid");
        assert!(DeadLetterInfo::from_event(&plain).expect("ok").is_none());

        let mut dead = dead_letter_event(received(plain, 2), "why");
        dead.set_extension(DLQ_ATTEMPTS, "2");
        let info = DeadLetterInfo::from_event(&dead)
            .expect("ok")
            .expect("some");
        assert_eq!(info.attempts.get(), 2);

        dead.set_extension(DLQ_ATTEMPTS, "two");
        let err = DeadLetterInfo::from_event(&dead).expect_err("bad attempts");
        assert!(err.to_string().contains(DLQ_ATTEMPTS), "{err}");

        dead.set_extension(DLQ_ATTEMPTS, 2_i64);
        dead.set_extension(DLQ_TIME, "yesterday");
        let err = DeadLetterInfo::from_event(&dead).expect_err("bad time");
        assert!(err.to_string().contains(DLQ_TIME), "{err}");
    }
}
