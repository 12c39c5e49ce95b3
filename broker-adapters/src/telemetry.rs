//! Telemetry conventions shared by every adapter and layer: `tracing` span
//! and field names, and the W3C trace context carried inside events.
//!
//! # Field names
//!
//! Span fields follow the OpenTelemetry messaging semantic conventions,
//! pinned to version [`SEMCONV_VERSION`], so that every adapter emits
//! identical names and an OpenTelemetry bridge in the service maps them
//! without configuration. The names are constants: use them with `tracing`'s
//! constant-field syntax, `{ MESSAGING_SYSTEM } = "kafka"`.
//!
//! ```
//! use broker_adapters::telemetry::{MESSAGING_DESTINATION_NAME, MESSAGING_SYSTEM};
//!
//! let span = tracing::info_span!(
//!     "publish",
//!     { MESSAGING_SYSTEM } = "kafka",
//!     { MESSAGING_DESTINATION_NAME } = "orders",
//! );
//! # drop(span);
//! ```
//!
//! # Trace context
//!
//! W3C trace context travels as the CloudEvents distributed-tracing
//! extensions [`traceparent`](crate::event::ext::TRACEPARENT) and
//! [`tracestate`](crate::event::ext::TRACESTATE). [`TraceParent`] parses,
//! generates and writes them;
//! [`TracingPublisher`](crate::middleware::TracingPublisher) injects one into
//! every published event that lacks one, and
//! [`TraceLayer`](crate::middleware::TraceLayer) extracts it into the
//! handler's span as [`TRACE_ID`] and [`PARENT_SPAN_ID`].
//!
//! This crate only emits `tracing` spans; it never installs a subscriber or an
//! exporter. The service that does can link a consumer span to its remote
//! parent from those two fields.

use std::fmt;
use std::str::FromStr;

use cloudevents::Event;
use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};
use crate::event::{EventExt, ext};

/// The version of the OpenTelemetry semantic conventions the names follow.
pub const SEMCONV_VERSION: &str = "1.27.0";

/// `messaging.system`: the messaging system, e.g. `kafka`, `nats`, `memory`.
pub const MESSAGING_SYSTEM: &str = "messaging.system";
/// `messaging.operation.type`: one of the [`operation`] values.
pub const MESSAGING_OPERATION_TYPE: &str = "messaging.operation.type";
/// `messaging.operation.name`: the system-specific operation name, e.g. `ack`.
pub const MESSAGING_OPERATION_NAME: &str = "messaging.operation.name";
/// `messaging.destination.name`: the topic or subject.
pub const MESSAGING_DESTINATION_NAME: &str = "messaging.destination.name";
/// `messaging.destination.partition.id`: the partition, where the broker has them.
pub const MESSAGING_DESTINATION_PARTITION_ID: &str = "messaging.destination.partition.id";
/// `messaging.consumer.group.name`: the consumer group.
pub const MESSAGING_CONSUMER_GROUP_NAME: &str = "messaging.consumer.group.name";
/// `messaging.message.id`: the message id; for CloudEvents, the event `id`.
pub const MESSAGING_MESSAGE_ID: &str = "messaging.message.id";
/// `messaging.batch.message_count`: the number of events in a batch operation.
pub const MESSAGING_BATCH_MESSAGE_COUNT: &str = "messaging.batch.message_count";
/// `cloudevents.event_type`: the CloudEvent `type`.
pub const CLOUDEVENTS_EVENT_TYPE: &str = "cloudevents.event_type";
/// `cloudevents.event_source`: the CloudEvent `source`.
pub const CLOUDEVENTS_EVENT_SOURCE: &str = "cloudevents.event_source";
/// `cloudevents.event_subject`: the CloudEvent `subject`.
pub const CLOUDEVENTS_EVENT_SUBJECT: &str = "cloudevents.event_subject";
/// `error.type`: the class of error an operation ended with (here
/// `retryable` or `permanent` for handlers, the error kind for publishing).
pub const ERROR_TYPE: &str = "error.type";

/// `otel.name`: the span name an OpenTelemetry bridge reports, e.g.
/// `process orders` (the `tracing` span name itself must be static).
pub const OTEL_NAME: &str = "otel.name";
/// `otel.kind`: the OpenTelemetry span kind (`producer`, `consumer`).
pub const OTEL_KIND: &str = "otel.kind";
/// `otel.status_code`: `ERROR` when the operation failed.
pub const OTEL_STATUS_CODE: &str = "otel.status_code";

/// `trace_id`: the 32-hex-digit trace id from the event's `traceparent`.
///
/// Not an OpenTelemetry attribute: it carries the remote parent for the
/// service's subscriber to link the span to.
pub const TRACE_ID: &str = "trace_id";
/// `parent_span_id`: the 16-hex-digit parent span id from the event's
/// `traceparent` (the producer's span).
pub const PARENT_SPAN_ID: &str = "parent_span_id";
/// `trace_state`: the event's W3C `tracestate`, verbatim.
pub const TRACE_STATE: &str = "trace_state";
/// `delivery_attempt`: how many times the event was delivered to this group,
/// this time included ([`DeliveryInfo::attempt`](crate::DeliveryInfo::attempt)).
/// The semantic conventions have no system-neutral name for it.
pub const DELIVERY_ATTEMPT: &str = "delivery_attempt";

/// Values of [`MESSAGING_OPERATION_TYPE`], and of [`OTEL_KIND`].
pub mod operation {
    /// Sending events to a destination.
    pub const PUBLISH: &str = "publish";
    /// Pulling events from a destination.
    pub const RECEIVE: &str = "receive";
    /// Handling a received event.
    pub const PROCESS: &str = "process";
    /// Acking, nacking or terminating a delivery.
    pub const SETTLE: &str = "settle";

    /// [`OTEL_KIND`](super::OTEL_KIND) of publish spans.
    pub const KIND_PRODUCER: &str = "producer";
    /// [`OTEL_KIND`](super::OTEL_KIND) of process spans.
    pub const KIND_CONSUMER: &str = "consumer";
}

/// A parsed W3C `traceparent`: `<version>-<trace-id>-<parent-id>-<flags>`.
///
/// ```
/// use broker_adapters::telemetry::TraceParent;
///
/// let tp: TraceParent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse()?;
/// assert_eq!(tp.trace_id(), "0af7651916cd43dd8448eb211c80319c");
/// assert_eq!(tp.parent_id(), "b7ad6b7169203331");
/// assert!(tp.is_sampled());
///
/// let fresh = TraceParent::generate();
/// assert_eq!(fresh.to_string().parse::<TraceParent>()?, fresh);
/// # Ok::<(), broker_adapters::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

impl TraceParent {
    /// The `sampled` bit of the trace flags.
    pub const FLAG_SAMPLED: u8 = 0x01;

    /// Starts a new trace: a fresh trace id and span id, sampled.
    ///
    /// The trace id is a UUID v7 (unique, time-ordered, with random low
    /// bits); the span id is the tail of another. Neither is ever all zeros.
    pub fn generate() -> Self {
        Self {
            trace_id: Uuid::now_v7().into_bytes(),
            parent_id: span_id(),
            flags: Self::FLAG_SAMPLED,
        }
    }

    /// The same trace and flags with a fresh span id: the context to send on
    /// from a span that is a child of this one.
    #[must_use]
    pub fn child(&self) -> Self {
        Self {
            parent_id: span_id(),
            ..*self
        }
    }

    /// Reads the event's `traceparent` extension.
    ///
    /// Returns `None` when it is absent, and also when it is malformed: per the
    /// W3C spec a receiver then starts a new trace (and ignores `tracestate`).
    pub fn from_event(event: &Event) -> Option<Self> {
        event.traceparent().and_then(|value| value.parse().ok())
    }

    /// Writes this as the event's `traceparent` extension.
    pub fn inject(&self, event: &mut Event) {
        event.set_extension(ext::TRACEPARENT, self.to_string());
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// The parent (span) id as 16 lower-case hex digits.
    pub fn parent_id(&self) -> String {
        hex(&self.parent_id)
    }

    /// The trace flags byte.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the producer sampled the trace.
    pub fn is_sampled(&self) -> bool {
        self.flags & Self::FLAG_SAMPLED != 0
    }
}

fn span_id() -> [u8; 8] {
    let bytes = Uuid::now_v7().into_bytes();
    let mut id = [0; 8];
    id.copy_from_slice(&bytes[8..]);
    // The RFC 9562 variant bits make byte 0 non-zero.
    id
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing to a `String` cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != N * 2 {
        return None;
    }
    let nibble = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

impl FromStr for TraceParent {
    type Err = Error;

    /// Parses a `traceparent` as W3C Trace Context level 1 says: version `00`
    /// has exactly four fields; a later version may append fields, which are
    /// ignored; version `ff`, upper-case hex and all-zero ids are invalid.
    fn from_str(value: &str) -> Result<Self> {
        let invalid = |reason: &str| {
            Error::new(ErrorKind::InvalidExtension {
                name: ext::TRACEPARENT,
                reason: reason.into(),
            })
        };
        let mut parts = value.split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "expected `<version>-<trace id>-<parent id>-<flags>`",
            ));
        };
        let [version] = unhex::<1>(version).ok_or_else(|| invalid("bad version"))?;
        if version == 0xff {
            return Err(invalid("version ff is invalid"));
        }
        if version == 0 && parts.next().is_some() {
            return Err(invalid("version 00 has exactly four fields"));
        }
        let trace_id =
            unhex::<16>(trace).ok_or_else(|| invalid("the trace id is not 32 lower-case hex"))?;
        let parent_id =
            unhex::<8>(parent).ok_or_else(|| invalid("the parent id is not 16 lower-case hex"))?;
        let [flags] = unhex::<1>(flags).ok_or_else(|| invalid("bad trace flags"))?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return Err(invalid("trace id and parent id must not be all zeros"));
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }
}

impl fmt::Display for TraceParent {
    /// Always writes version `00`, the version this crate speaks.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

/// Makes sure `event` carries a valid `traceparent`: keeps a valid one, and
/// otherwise (absent or malformed) writes a freshly
/// [generated](TraceParent::generate) one and drops any `tracestate`, which
/// belongs to the trace being replaced. Returns the event's trace parent.
pub fn ensure_traceparent(event: &mut Event) -> TraceParent {
    if let Some(existing) = TraceParent::from_event(event) {
        return existing;
    }
    let fresh = TraceParent::generate();
    fresh.inject(event);
    event.remove_extension(ext::TRACESTATE);
    fresh
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::CloudEventBuilder;

    const SAMPLE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn parses_and_prints_the_w3c_example() {
        let tp: TraceParent = SAMPLE.parse().expect("valid");
        assert_eq!(tp.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(tp.parent_id(), "b7ad6b7169203331");
        assert_eq!(tp.flags(), 1);
        assert!(tp.is_sampled());
        assert_eq!(tp.to_string(), SAMPLE);
    }

    #[test]
    fn rejects_what_w3c_rejects() {
        for bad in [
            "",
            "00",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
            "0x-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            let err = bad.parse::<TraceParent>().expect_err(bad);
            assert!(
                matches!(err.kind(), ErrorKind::InvalidExtension { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn accepts_later_versions_with_more_fields() {
        let tp: TraceParent = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what"
            .parse()
            .expect("a later version may add fields");
        assert_eq!(tp.to_string(), SAMPLE, "written back as version 00");
    }

    #[test]
    fn generated_contexts_are_valid_and_distinct() {
        let a = TraceParent::generate();
        let b = TraceParent::generate();
        assert_ne!(a.trace_id(), b.trace_id());
        assert_ne!(a.parent_id(), b.parent_id());
        for tp in [a, b, a.child()] {
            assert_eq!(tp.to_string().parse::<TraceParent>().expect("valid"), tp);
            // The event builder's own check agrees.
            CloudEventBuilder::new("t", "/s")
                .traceparent(tp.to_string())
                .build()
                .expect("the builder accepts a generated traceparent");
        }
        let child = a.child();
        assert_eq!(child.trace_id(), a.trace_id());
        assert_ne!(child.parent_id(), a.parent_id());
    }

    #[test]
    fn ensure_keeps_a_valid_context_and_replaces_a_bad_one() {
        let mut kept = CloudEventBuilder::new("t", "/s")
            .traceparent(SAMPLE)
            .tracestate("rojo=1")
            .build()
            .expect("valid");
        assert_eq!(ensure_traceparent(&mut kept).to_string(), SAMPLE);
        assert_eq!(kept.traceparent(), Some(SAMPLE));
        assert_eq!(kept.tracestate(), Some("rojo=1"));

        let mut fresh = CloudEventBuilder::new("t", "/s").build().expect("valid");
        let tp = ensure_traceparent(&mut fresh);
        assert_eq!(fresh.traceparent(), Some(tp.to_string().as_str()));

        let mut bad = CloudEventBuilder::new("t", "/s").build().expect("valid");
        bad.set_extension(ext::TRACEPARENT, "garbage");
        bad.set_extension(ext::TRACESTATE, "rojo=1");
        let tp = ensure_traceparent(&mut bad);
        assert_eq!(bad.traceparent(), Some(tp.to_string().as_str()));
        assert_eq!(bad.tracestate(), None, "tracestate of a dropped trace");
    }
}
