//! The event model: CloudEvents 1.0 [`Event`]s built with the attributes the
//! system relies on, typed data in and out, and typed access to the
//! extensions used across the system.
//!
//! ```
//! use broker_adapters::event::{CloudEventBuilder, EventExt};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, PartialEq, Debug)]
//! struct OrderPlaced { order_id: String, total_cents: u64 }
//!
//! let placed = OrderPlaced { order_id: "o-1".into(), total_cents: 4200 };
//! let event = CloudEventBuilder::new("com.example.order.placed", "/orders")
//!     .subject("o-1")
//!     .partition_key("o-1")
//!     .json_data(&placed)
//!     .build()?;
//!
//! assert_eq!(event.partition_key(), Some("o-1"));
//! assert_eq!(event.data_as::<OrderPlaced>()?, placed);
//! # Ok::<(), broker_adapters::Error>(())
//! ```

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use cloudevents::event::{AttributeValue, ExtensionValue};
use cloudevents::{
    AttributesReader, AttributesWriter, Data, Event, EventBuilder as _, EventBuilderV10,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use url::Url;
use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};

mod json;
mod write;
pub use json::from_json_slice;

/// Names of the extension attributes used across the system.
///
/// All are lower-case letters and digits, as the CloudEvents spec requires.
pub mod ext {
    /// Ordering key (CloudEvents partitioning extension).
    pub const PARTITION_KEY: &str = "partitionkey";
    /// W3C trace context `traceparent` (CloudEvents distributed tracing extension).
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace context `tracestate`.
    pub const TRACESTATE: &str = "tracestate";
    /// The saga instance an event belongs to.
    pub const SAGA_ID: &str = "sagaid";
    /// The saga step a command or reply belongs to.
    pub const SAGA_STEP: &str = "sagastep";
    /// The attempt number of a saga step command, starting at 1.
    pub const SAGA_ATTEMPT: &str = "sagaattempt";
    /// The id shared by every event of one business transaction.
    pub const CORRELATION_ID: &str = "correlationid";
    /// The id of the event that caused this one.
    pub const CAUSATION_ID: &str = "causationid";
}

/// The `datacontenttype` of JSON data.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Builds an [`Event`] with every attribute the system relies on filled in.
///
/// `id` defaults to a fresh UUID v7 (time-ordered, unique), `time` to now,
/// `specversion` is 1.0. Errors from individual setters are kept and
/// returned by [`build`](Self::build), so calls chain without `?`.
#[derive(Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct CloudEventBuilder {
    inner: EventBuilderV10,
    dataschema: Option<Url>,
    error: Option<Error>,
}

impl CloudEventBuilder {
    /// Starts an event of CloudEvent `type` `ty` from `source` (a URI-reference
    /// naming the producer, e.g. `/orders` or `urn:service:orders`).
    pub fn new(ty: impl Into<String>, source: impl Into<String>) -> Self {
        let ty = ty.into();
        let source = source.into();
        let mut error = None;
        if ty.is_empty() {
            error = Some(Error::invalid_event("the `type` attribute is empty"));
        } else if source.is_empty() {
            error = Some(Error::invalid_event("the `source` attribute is empty"));
        }
        let inner = EventBuilderV10::new()
            .id(Uuid::now_v7().to_string())
            .ty(ty)
            .source(source)
            .time(Utc::now());
        Self {
            inner,
            dataschema: None,
            error,
        }
    }

    /// Starts an event caused by `cause`: it inherits the correlation id (or
    /// takes the cause's id as one), the saga id, the partition key and the
    /// trace context, and records the cause's id as its `causationid`.
    pub fn caused_by(cause: &Event, ty: impl Into<String>, source: impl Into<String>) -> Self {
        let mut this = Self::new(ty, source)
            .correlation_id(cause.correlation_id().unwrap_or(cause.id()))
            .causation_id(cause.id());
        for name in [
            ext::SAGA_ID,
            ext::PARTITION_KEY,
            ext::TRACEPARENT,
            ext::TRACESTATE,
        ] {
            if let Some(value) = cause.extension(name) {
                this.inner = this.inner.extension(name, value.clone());
            }
        }
        this
    }

    /// Overrides the generated id, e.g. with a deterministic one so that a
    /// re-sent event is recognised as the same event.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        let id = id.into();
        if id.is_empty() {
            self.fail(Error::invalid_event("the `id` attribute is empty"));
        }
        self.inner = self.inner.id(id);
        self
    }

    /// Sets `subject`: what the event is about within the source.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.inner = self.inner.subject(subject);
        self
    }

    /// Overrides `time` (defaults to the moment the builder was created).
    pub fn time(mut self, time: DateTime<Utc>) -> Self {
        self.inner = self.inner.time(time);
        self
    }

    /// Sets `dataschema`: the URL of the schema the data conforms to.
    pub fn dataschema(mut self, url: Url) -> Self {
        self.dataschema = Some(url);
        self
    }

    /// Serializes `data` as JSON (`datacontenttype: application/json`).
    pub fn json_data<T: Serialize + ?Sized>(mut self, data: &T) -> Self {
        match serde_json::to_value(data) {
            Ok(value) => self.inner = self.inner.data(JSON_CONTENT_TYPE, Data::Json(value)),
            Err(e) => self.fail(Error::with_source(ErrorKind::Encode, e)),
        }
        self
    }

    /// Sets opaque data with its content type.
    pub fn binary_data(
        mut self,
        content_type: impl Into<String>,
        data: impl Into<Vec<u8>>,
    ) -> Self {
        self.inner = self.inner.data(content_type, Data::Binary(data.into()));
        self
    }

    /// Sets the ordering key: events with the same key are delivered in order.
    pub fn partition_key(self, key: impl Into<String>) -> Self {
        self.string_extension(ext::PARTITION_KEY, key.into())
    }

    /// Sets the correlation id shared by one business transaction's events.
    pub fn correlation_id(self, id: impl Into<String>) -> Self {
        self.string_extension(ext::CORRELATION_ID, id.into())
    }

    /// Sets the id of the event that caused this one.
    pub fn causation_id(self, id: impl Into<String>) -> Self {
        self.string_extension(ext::CAUSATION_ID, id.into())
    }

    /// Sets the W3C `traceparent`, checking its format
    /// (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`).
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        let value = traceparent.into();
        if let Err(reason) = check_traceparent(&value) {
            self.fail(Error::new(ErrorKind::InvalidExtension {
                name: ext::TRACEPARENT,
                reason: reason.into(),
            }));
        }
        self.inner = self.inner.extension(ext::TRACEPARENT, value);
        self
    }

    /// Sets the W3C `tracestate`.
    pub fn tracestate(self, tracestate: impl Into<String>) -> Self {
        self.string_extension(ext::TRACESTATE, tracestate.into())
    }

    /// Marks the event as belonging to step `step` (attempt `attempt`, from 1)
    /// of saga `saga_id`.
    pub fn saga(self, saga_id: impl Into<String>, step: impl Into<String>, attempt: u32) -> Self {
        let mut this = self
            .string_extension(ext::SAGA_ID, saga_id.into())
            .string_extension(ext::SAGA_STEP, step.into());
        if attempt == 0 {
            this.fail(Error::new(ErrorKind::InvalidExtension {
                name: ext::SAGA_ATTEMPT,
                reason: "attempts are counted from 1".into(),
            }));
        }
        this.inner = this.inner.extension(ext::SAGA_ATTEMPT, i64::from(attempt));
        this
    }

    /// Sets any other extension attribute.
    ///
    /// The name must be 1 to 20 lower-case ASCII letters or digits and must not
    /// shadow a core attribute, as the CloudEvents spec requires.
    pub fn extension(mut self, name: &str, value: impl Into<ExtensionValue>) -> Self {
        if let Err(reason) = check_extension_name(name) {
            self.fail(Error::invalid_event(format!(
                "extension name `{name}` is invalid: {reason}"
            )));
        }
        self.inner = self.inner.extension(name, value);
        self
    }

    /// Builds the event.
    ///
    /// # Errors
    ///
    /// The first error of any setter: [`ErrorKind::InvalidEvent`],
    /// [`ErrorKind::InvalidExtension`] or [`ErrorKind::Encode`].
    pub fn build(self) -> Result<Event> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let mut event = self.inner.build().map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidEvent {
                    reason: e.to_string(),
                },
                e,
            )
        })?;
        if let Some(url) = self.dataschema {
            event.set_dataschema(Some(url));
        }
        Ok(event)
    }

    fn string_extension(mut self, name: &'static str, value: String) -> Self {
        if value.is_empty() {
            self.fail(Error::new(ErrorKind::InvalidExtension {
                name,
                reason: "it is empty".into(),
            }));
        }
        self.inner = self.inner.extension(name, value);
        self
    }

    fn fail(&mut self, error: Error) {
        self.error.get_or_insert(error);
    }
}

const CORE_ATTRIBUTES: [&str; 10] = [
    "id",
    "source",
    "specversion",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
];

fn check_extension_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() || name.len() > 20 {
        return Err("it must have 1 to 20 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err("only lower-case ASCII letters and digits are allowed");
    }
    if CORE_ATTRIBUTES.contains(&name) {
        return Err("it is a core attribute");
    }
    Ok(())
}

fn check_traceparent(value: &str) -> std::result::Result<(), &'static str> {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match parts.as_slice() {
        [version, trace, span, flags]
            if hex(version, 2) && hex(trace, 32) && hex(span, 16) && hex(flags, 2) =>
        {
            if *version == "ff" {
                Err("version ff is invalid")
            } else if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
                Err("trace id and span id must not be all zeros")
            } else {
                Ok(())
            }
        }
        _ => Err("expected `00-<32 hex>-<16 hex>-<2 hex>` in lower case"),
    }
}

/// Checks what every adapter checks before publishing: `id`, `type` and
/// `source` are not empty, and the event's
/// [`encoded_size`](EventExt::encoded_size) is at most `max_bytes`.
///
/// # Errors
///
/// [`ErrorKind::InvalidEvent`] naming the empty attribute, or
/// [`ErrorKind::EventTooLarge`].
pub fn validate_for_publish(event: &Event, max_bytes: usize) -> Result<()> {
    validate_attributes(event)?;
    let size = event.encoded_size();
    if size > max_bytes {
        return Err(Error::new(ErrorKind::EventTooLarge {
            size,
            limit: max_bytes,
        }));
    }
    Ok(())
}

/// Checks that `id`, `type` and `source` are not empty. Adapters that
/// measure the encoded message themselves call this instead of
/// [`validate_for_publish`].
///
/// # Errors
///
/// [`ErrorKind::InvalidEvent`] naming the empty attribute.
pub fn validate_attributes(event: &Event) -> Result<()> {
    for (name, value) in [
        ("id", event.id()),
        ("type", event.ty()),
        ("source", event.source().as_str()),
    ] {
        if value.is_empty() {
            return Err(Error::invalid_event(format!(
                "the `{name}` attribute is empty"
            )));
        }
    }
    Ok(())
}

/// Typed access to an [`Event`]'s data and to the system's extensions.
pub trait EventExt {
    /// The ordering key, if any.
    fn partition_key(&self) -> Option<&str>;
    /// The W3C `traceparent`, if any.
    fn traceparent(&self) -> Option<&str>;
    /// The W3C `tracestate`, if any.
    fn tracestate(&self) -> Option<&str>;
    /// The saga id, if any.
    fn saga_id(&self) -> Option<&str>;
    /// The saga step, if any.
    fn saga_step(&self) -> Option<&str>;
    /// The saga step attempt, if any.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidExtension`] if present but not a positive integer
    /// (bindings that carry attributes as strings are accepted).
    fn saga_attempt(&self) -> Result<Option<u32>>;
    /// The correlation id, if any.
    fn correlation_id(&self) -> Option<&str>;
    /// The causation id, if any.
    fn causation_id(&self) -> Option<&str>;
    /// The data as raw bytes, as a binary-mode protocol binding sends it.
    fn data_bytes(&self) -> Option<Cow<'_, [u8]>>;
    /// Deserializes JSON data into `T`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`] if the event has no data or it is not a `T`.
    fn data_as<T: DeserializeOwned>(&self) -> Result<T>;
    /// An estimate of the event's encoded size in bytes: its data plus every
    /// attribute's name and value, which is what a binary-mode binding sends.
    fn encoded_size(&self) -> usize;
}

fn string_ext<'a>(event: &'a Event, name: &str) -> Option<&'a str> {
    match event.extension(name)? {
        ExtensionValue::String(s) => Some(s),
        _ => None,
    }
}

impl EventExt for Event {
    fn partition_key(&self) -> Option<&str> {
        string_ext(self, ext::PARTITION_KEY)
    }

    fn traceparent(&self) -> Option<&str> {
        string_ext(self, ext::TRACEPARENT)
    }

    fn tracestate(&self) -> Option<&str> {
        string_ext(self, ext::TRACESTATE)
    }

    fn saga_id(&self) -> Option<&str> {
        string_ext(self, ext::SAGA_ID)
    }

    fn saga_step(&self) -> Option<&str> {
        string_ext(self, ext::SAGA_STEP)
    }

    fn saga_attempt(&self) -> Result<Option<u32>> {
        let invalid = |reason: String| {
            Error::new(ErrorKind::InvalidExtension {
                name: ext::SAGA_ATTEMPT,
                reason,
            })
        };
        let n = match self.extension(ext::SAGA_ATTEMPT) {
            None => return Ok(None),
            Some(ExtensionValue::Integer(n)) => *n,
            Some(ExtensionValue::String(s)) => s
                .parse::<i64>()
                .map_err(|_| invalid(format!("`{s}` is not an integer")))?,
            Some(ExtensionValue::Boolean(_)) => return Err(invalid("it is a boolean".into())),
        };
        match u32::try_from(n) {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(invalid(format!("{n} is not a positive 32-bit integer"))),
        }
    }

    fn correlation_id(&self) -> Option<&str> {
        string_ext(self, ext::CORRELATION_ID)
    }

    fn causation_id(&self) -> Option<&str> {
        string_ext(self, ext::CAUSATION_ID)
    }

    fn data_bytes(&self) -> Option<Cow<'_, [u8]>> {
        Some(match self.data()? {
            Data::Binary(bytes) => Cow::Borrowed(bytes.as_slice()),
            Data::String(s) => Cow::Borrowed(s.as_bytes()),
            Data::Json(value) => Cow::Owned(json_vec(value)),
        })
    }

    fn data_as<T: DeserializeOwned>(&self) -> Result<T> {
        let decoded = match self.data() {
            None => {
                return Err(Error::new(ErrorKind::Decode {
                    what: "absent event data",
                }));
            }
            Some(Data::Json(value)) => T::deserialize(value),
            Some(Data::Binary(bytes)) => serde_json::from_slice(bytes),
            Some(Data::String(s)) => serde_json::from_str(s),
        };
        decoded.map_err(|e| Error::with_source(ErrorKind::Decode { what: "event data" }, e))
    }

    fn encoded_size(&self) -> usize {
        let attributes = attributes_size(self);
        let data = match self.data() {
            None => 0,
            Some(Data::Binary(bytes)) => bytes.len(),
            Some(Data::String(s)) => s.len(),
            // The serialized length, counted without writing it.
            Some(Data::Json(value)) => write::value_len(value),
        };
        attributes.saturating_add(data)
    }
}

/// Buffers kept by a thread for [`json_vec`] up to this size.
const JSON_SCRATCH_KEPT: usize = 1 << 20;

thread_local! {
    static JSON_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `value` serialized as JSON (as `serde_json` writes it), in a vector of
/// its exact size.
fn json_vec(value: &serde_json::Value) -> Vec<u8> {
    exact_vec(|out| {
        write::write_value(out, value);
        true
    })
    .unwrap_or_default()
}

/// What `write` writes, in a vector of its exact size, or `None` when it
/// declines (returns `false`). It is written first into a buffer the thread
/// keeps, then copied once: a new vector would grow four times for 1 KiB.
fn exact_vec(write: impl FnOnce(&mut Vec<u8>) -> bool) -> Option<Vec<u8>> {
    JSON_SCRATCH.with(|scratch| {
        let Ok(mut scratch) = scratch.try_borrow_mut() else {
            let mut bytes = Vec::new();
            return write(&mut bytes).then_some(bytes);
        };
        scratch.clear();
        let bytes = write(&mut scratch).then(|| scratch.to_vec());
        if scratch.capacity() > JSON_SCRATCH_KEPT {
            *scratch = Vec::new();
        }
        bytes
    })
}

/// Encodes `event` in the CloudEvents JSON format (structured mode, outbox
/// and SQL broker rows), byte for byte as `serde_json::to_vec(event)` does,
/// at a fraction of its cost for the common shape: strings are scanned for
/// escapes a word at a time, and the result is allocated once at its size.
/// Events of spec version 0.3 and binary data (`data_base64`) go through the
/// SDK's serializer.
///
/// # Errors
///
/// `serde_json`'s error, from the SDK's serializer only.
pub fn to_json_vec(event: &Event) -> serde_json::Result<Vec<u8>> {
    match exact_vec(|out| write::write_event(out, event)) {
        Some(bytes) => Ok(bytes),
        None => serde_json::to_vec(event),
    }
}

/// The attribute part of [`EventExt::encoded_size`]: every attribute's name
/// and value, without the data.
pub(crate) fn attributes_size(event: &Event) -> usize {
    event
        .iter()
        .map(|(name, value)| name.len() + attribute_len(&value))
        .sum()
}

/// A writer that only counts.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn attribute_len(value: &AttributeValue<'_>) -> usize {
    match value {
        AttributeValue::String(s) => s.len(),
        AttributeValue::URI(u) => u.as_str().len(),
        AttributeValue::URIRef(u) => u.len(),
        AttributeValue::Binary(b) => b.len().div_ceil(3) * 4,
        AttributeValue::SpecVersion(v) => v.as_str().len(),
        AttributeValue::Time(t) => rfc3339_len(t),
        other => other.to_string().len(),
    }
}

/// An attribute's value as text, as the SDK displays it (and so as the
/// bindings write it): borrowed from the event where it holds text; a time
/// or a number is written into `scratch`.
pub(crate) fn attribute_text<'a>(
    value: &'a AttributeValue<'_>,
    scratch: &'a mut String,
) -> &'a str {
    match value {
        AttributeValue::String(s) => s,
        AttributeValue::URI(u) => u.as_str(),
        AttributeValue::URIRef(u) => u.as_str(),
        AttributeValue::SpecVersion(v) => v.as_str(),
        AttributeValue::Time(t) => {
            scratch.clear();
            write_rfc3339(t, scratch);
            scratch
        }
        other => {
            use std::fmt::Write as _;
            scratch.clear();
            // Writing to a String cannot fail.
            let _ = write!(scratch, "{other}");
            scratch
        }
    }
}

/// Appends `time` as [`DateTime::to_rfc3339`] writes it (seconds, then
/// milli-, micro- or nanoseconds as needed, `+00:00`), without its
/// allocation; a year outside 0–9999 is left to chrono.
fn write_rfc3339(time: &DateTime<Utc>, out: &mut String) {
    use chrono::{Datelike as _, Timelike as _};
    // Read once: each of `DateTime`'s accessors converts to local time first.
    let naive = time.naive_utc();
    let (date, clock) = (naive.date(), naive.time());
    let Some(year) = u32::try_from(date.year()).ok().filter(|y| *y <= 9999) else {
        out.push_str(&time.to_rfc3339());
        return;
    };
    let (mut second, mut nano) = (clock.second(), clock.nanosecond());
    // A leap second, as chrono writes it.
    if nano >= 1_000_000_000 {
        second += 1;
        nano -= 1_000_000_000;
    }
    let mut text = *b"0000-00-00T00:00:00.000000000+00:00";
    put_digits(&mut text[0..4], year);
    put_digits(&mut text[5..7], date.month());
    put_digits(&mut text[8..10], date.day());
    put_digits(&mut text[11..13], clock.hour());
    put_digits(&mut text[14..16], clock.minute());
    put_digits(&mut text[17..19], second);
    let digits = fraction_digits(nano);
    let end = 20 + digits as usize;
    let end = if digits == 0 {
        19
    } else {
        put_digits(&mut text[20..end], nano / 10u32.pow(9 - digits));
        end
    };
    text.copy_within(29.., end);
    // Digits and ASCII punctuation only.
    out.push_str(std::str::from_utf8(&text[..end + 6]).unwrap_or_default());
}

/// Parses an RFC 3339 time as [`DateTime::parse_from_rfc3339`] does, in
/// UTC: the common UTC forms (`2024-05-01T12:00:00.123Z`, `…+00:00`, as
/// [`write_rfc3339`] writes them) are read here, any other text goes to
/// chrono, so results and errors stay chrono's.
pub(crate) fn parse_rfc3339(text: &str) -> chrono::ParseResult<DateTime<Utc>> {
    match parse_rfc3339_utc(text.as_bytes()) {
        Some(time) => Ok(time),
        None => DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc)),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]` and `Z` or `+00:00`, with up to nine
/// fraction digits and no leap second; `None` for anything else.
fn parse_rfc3339_utc(text: &[u8]) -> Option<DateTime<Utc>> {
    const SCALE: [u32; 10] = [
        1_000_000_000,
        100_000_000,
        10_000_000,
        1_000_000,
        100_000,
        10_000,
        1_000,
        100,
        10,
        1,
    ];
    let digit = |i: usize| -> Option<u32> {
        let d = text.get(i)?.wrapping_sub(b'0');
        (d < 10).then_some(u32::from(d))
    };
    let two = |i: usize| Some(digit(i)? * 10 + digit(i + 1)?);
    if text.len() < 20
        || text[4] != b'-'
        || text[7] != b'-'
        || text[10] != b'T'
        || text[13] != b':'
        || text[16] != b':'
    {
        return None;
    }
    let year = two(0)? * 100 + two(2)?;
    let (month, day) = (two(5)?, two(8)?);
    let (hour, minute, second) = (two(11)?, two(14)?, two(17)?);
    let mut at = 19;
    let mut nano = 0;
    if text[at] == b'.' {
        at += 1;
        let start = at;
        while let Some(d) = digit(at) {
            if at - start == 9 {
                return None;
            }
            nano = nano * 10 + d;
            at += 1;
        }
        nano *= *SCALE.get(at - start).filter(|_| at > start)?;
    }
    let rest = &text[at..];
    if rest != b"Z" && rest != b"+00:00" {
        return None;
    }
    // A leap second (`:60`) is refused here and left to chrono.
    let date = chrono::NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?;
    Some(date.and_hms_nano_opt(hour, minute, second, nano)?.and_utc())
}

/// The length of [`write_rfc3339`]'s text for `time`.
fn rfc3339_len(time: &DateTime<Utc>) -> usize {
    use chrono::{Datelike as _, Timelike as _};
    if !(0..=9999).contains(&time.year()) {
        return time.to_rfc3339().len();
    }
    let digits = fraction_digits(time.nanosecond() % 1_000_000_000) as usize;
    "0000-00-00T00:00:00+00:00".len() + if digits > 0 { 1 + digits } else { 0 }
}

/// How many fraction digits chrono writes for `nano` (under 10⁹): none,
/// or milli-, micro- or nanoseconds, the fewest that are exact.
fn fraction_digits(nano: u32) -> u32 {
    if nano == 0 {
        0
    } else if nano.is_multiple_of(1_000_000) {
        3
    } else if nano.is_multiple_of(1_000) {
        6
    } else {
        9
    }
}

/// Writes the last `slot.len()` decimal digits of `value` into `slot`,
/// zero-padded.
fn put_digits(slot: &mut [u8], mut value: u32) {
    for byte in slot.iter_mut().rev() {
        // A digit: under 10.
        *byte = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::event::SpecVersion;

    fn sample() -> CloudEventBuilder {
        CloudEventBuilder::new("com.example.thing.happened", "/things")
    }

    #[test]
    fn fills_the_required_attributes_with_a_v7_id() {
        let event = sample().build().expect("valid");
        let id = Uuid::parse_str(event.id()).expect("the id is a UUID");
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(event.specversion(), SpecVersion::V10);
        assert_eq!(event.ty(), "com.example.thing.happened");
        assert_eq!(event.source(), "/things");
        assert!(event.time().is_some());
    }

    #[test]
    fn ids_are_time_ordered() {
        let ids: Vec<String> = (0..100)
            .map(|_| sample().build().expect("valid").id().to_owned())
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
    }

    #[test]
    fn typed_extensions_round_trip() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let event = sample()
            .partition_key("k")
            .correlation_id("c")
            .causation_id("x")
            .traceparent(tp)
            .tracestate("vendor=1")
            .saga("s-1", "reserve", 2)
            .build()
            .expect("valid");
        assert_eq!(event.partition_key(), Some("k"));
        assert_eq!(event.correlation_id(), Some("c"));
        assert_eq!(event.causation_id(), Some("x"));
        assert_eq!(event.traceparent(), Some(tp));
        assert_eq!(event.tracestate(), Some("vendor=1"));
        assert_eq!(event.saga_id(), Some("s-1"));
        assert_eq!(event.saga_step(), Some("reserve"));
        assert_eq!(event.saga_attempt().expect("valid"), Some(2));
    }

    #[test]
    fn saga_attempt_read_from_a_string_header() {
        let mut event = sample().build().expect("valid");
        event.set_extension(ext::SAGA_ATTEMPT, "3");
        assert_eq!(event.saga_attempt().expect("valid"), Some(3));
        event.set_extension(ext::SAGA_ATTEMPT, "three");
        let err = event.saga_attempt().expect_err("not a number");
        assert!(matches!(err.kind(), ErrorKind::InvalidExtension { .. }));
        event.set_extension(ext::SAGA_ATTEMPT, 0_i64);
        assert!(event.saga_attempt().is_err());
    }

    #[test]
    fn caused_by_carries_correlation_and_context() {
        let cause = sample()
            .partition_key("order-1")
            .saga("s", "pay", 1)
            .build()
            .expect("valid");
        let reply = CloudEventBuilder::caused_by(&cause, "com.example.paid", "/payments")
            .build()
            .expect("valid");
        assert_eq!(reply.causation_id(), Some(cause.id()));
        assert_eq!(reply.correlation_id(), Some(cause.id()));
        assert_eq!(reply.partition_key(), Some("order-1"));
        assert_eq!(reply.saga_id(), Some("s"));
        assert_ne!(reply.id(), cause.id());
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let cases = [
            (CloudEventBuilder::new("", "/x"), "type"),
            (CloudEventBuilder::new("t", ""), "source"),
            (sample().traceparent("not-a-traceparent"), "traceparent"),
            (sample().extension("Upper", "x"), "Upper"),
            (sample().extension("id", "x"), "core attribute"),
            (sample().saga("s", "step", 0), "attempts"),
            (sample().partition_key(""), "partitionkey"),
        ];
        for (builder, needle) in cases {
            let err = builder.build().expect_err(needle);
            assert!(err.to_string().contains(needle), "`{err}` lacks `{needle}`");
        }
    }

    #[test]
    fn typed_data_in_and_out() {
        #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Payload {
            n: u32,
        }
        let event = sample()
            .json_data(&Payload { n: 7 })
            .build()
            .expect("valid");
        assert_eq!(event.datacontenttype(), Some(JSON_CONTENT_TYPE));
        assert_eq!(
            event.data_as::<Payload>().expect("decodes"),
            Payload { n: 7 }
        );
        assert_eq!(event.data_bytes().as_deref(), Some(&b"{\"n\":7}"[..]));
        let err = event.data_as::<Vec<String>>().expect_err("wrong type");
        assert!(matches!(err.kind(), ErrorKind::Decode { .. }));
        let empty = sample().build().expect("valid");
        assert!(empty.data_as::<Payload>().is_err());
    }

    #[test]
    fn dataschema_survives_later_data() {
        let url = Url::parse("http://registry.local/schemas/ids/1").expect("url");
        let event = sample()
            .dataschema(url.clone())
            .json_data(&1)
            .build()
            .expect("valid");
        assert_eq!(event.dataschema(), Some(&url));
        assert_eq!(event.data_as::<i32>().expect("decodes"), 1);
    }

    #[test]
    fn encoded_size_counts_data_and_attributes() {
        let small = sample().build().expect("valid").encoded_size();
        let big = sample()
            .binary_data("application/octet-stream", vec![0u8; 1024])
            .build()
            .expect("valid")
            .encoded_size();
        assert!(big >= small + 1024);
    }

    proptest::proptest! {
        /// Times are written as chrono writes them, whatever their year and
        /// precision, leap seconds included.
        #[test]
        fn times_are_written_as_chrono_writes_them(
            secs in -70_000_000_000_i64..300_000_000_000,
            nanos in proptest::prop_oneof![
                Just(0_u32),
                (0_u32..1_000).prop_map(|ms| ms * 1_000_000),
                (0_u32..1_000_000).prop_map(|us| us * 1_000),
                0_u32..2_000_000_000,
            ],
        ) {
            // A leap second (nanoseconds past 10⁹) only where chrono allows it.
            let Some(time) = DateTime::<Utc>::from_timestamp(secs, nanos) else {
                return Ok(());
            };
            let mut text = String::from("kept ");
            write_rfc3339(&time, &mut text);
            proptest::prop_assert_eq!(&text[5..], time.to_rfc3339());
            proptest::prop_assert_eq!(rfc3339_len(&time), time.to_rfc3339().len());
            let value = AttributeValue::Time(&time);
            proptest::prop_assert_eq!(attribute_len(&value), value.to_string().len());
            let mut scratch = String::new();
            proptest::prop_assert_eq!(attribute_text(&value, &mut scratch), value.to_string());
        }
    }

    /// Times as producers write them: chrono's every precision, with `Z`
    /// or `+00:00`, and other offsets (left to chrono).
    fn time_texts(secs: i64, nanos: u32) -> Vec<String> {
        use chrono::SecondsFormat;
        let Some(time) = DateTime::<Utc>::from_timestamp(secs, nanos) else {
            return Vec::new();
        };
        let mut texts = vec![time.to_rfc3339()];
        for format in [
            SecondsFormat::Secs,
            SecondsFormat::Millis,
            SecondsFormat::Micros,
            SecondsFormat::Nanos,
            SecondsFormat::AutoSi,
        ] {
            for use_z in [false, true] {
                texts.push(time.to_rfc3339_opts(format, use_z));
            }
        }
        for seconds in [60, 3600, -3600, 5 * 3600 + 1800] {
            let offset = chrono::FixedOffset::east_opt(seconds).expect("valid offset");
            texts.push(time.with_timezone(&offset).to_rfc3339());
        }
        texts
    }

    fn parsed_as_chrono_does(text: &str) -> std::result::Result<(), TestCaseError> {
        let ours = parse_rfc3339(text);
        let chrono = DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc));
        proptest::prop_assert_eq!(ours.ok(), chrono.ok(), "{:?}", text);
        Ok(())
    }

    proptest::proptest! {
        /// Times are read as chrono reads them, whatever their precision
        /// and offset.
        #[test]
        fn times_are_read_as_chrono_reads_them(
            secs in -70_000_000_000_i64..300_000_000_000,
            nanos in proptest::prop_oneof![
                Just(0_u32),
                (0_u32..1_000).prop_map(|ms| ms * 1_000_000),
                0_u32..2_000_000_000,
            ],
        ) {
            for text in time_texts(secs, nanos) {
                parsed_as_chrono_does(&text)?;
            }
        }

        /// Texts that are almost times (a character changed, added or
        /// removed) are read, or refused, as chrono does.
        #[test]
        fn near_times_are_read_or_refused_as_chrono_does(
            secs in 0_i64..300_000_000_000,
            nanos in 0_u32..1_000_000_000,
            edits in proptest::collection::vec(
                (0_usize..40, 0_u8..3, proptest::sample::select(
                    "0123456789-:.TtZz+ ,x\u{e9}".chars().collect::<Vec<_>>()
                )),
                1..3,
            ),
        ) {
            for text in time_texts(secs, nanos) {
                let mut chars: Vec<char> = text.chars().collect();
                for &(at, kind, c) in &edits {
                    let at = at.min(chars.len());
                    match kind {
                        0 if at < chars.len() => chars[at] = c,
                        1 => chars.insert(at, c),
                        _ if at < chars.len() => {
                            chars.remove(at);
                        }
                        _ => chars.push(c),
                    }
                }
                parsed_as_chrono_does(&chars.into_iter().collect::<String>())?;
            }
        }
    }

    #[test]
    fn odd_times_are_read_or_refused_as_chrono_does() {
        for text in [
            "2024-02-29T23:59:59Z",
            "2023-02-29T00:00:00Z",
            "2016-12-31T23:59:60Z",
            "2024-01-01T24:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01t00:00:00z",
            "2024-01-01 00:00:00Z",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00.1234567891Z",
            "2024-01-01T00:00:00-00:00",
            "2024-01-01T00:00:00+00:00 ",
            "0000-01-01T00:00:00Z",
            "+2024-01-01T00:00:00Z",
            "",
        ] {
            parsed_as_chrono_does(text).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    use proptest::prelude::Just;
    use proptest::strategy::Strategy as _;
    use proptest::test_runner::TestCaseError;

    #[test]
    fn attribute_text_is_the_sdk_display() {
        let time = DateTime::<Utc>::from_timestamp(1_764_846_041, 123_000_000).expect("time");
        // 2016's leap second, half-way through.
        let leap = DateTime::<Utc>::from_timestamp(1_483_228_799, 1_500_000_000).expect("leap");
        let far = DateTime::<Utc>::from_timestamp(-70_000_000_000, 7).expect("far");
        let url = Url::parse("https://example.com/schema").expect("url");
        let reference = "/things".to_owned();
        let values = [
            AttributeValue::Boolean(&true),
            AttributeValue::Integer(&-42),
            AttributeValue::String("o-1"),
            AttributeValue::Binary(b"\x00\xffbytes"),
            AttributeValue::URI(&url),
            AttributeValue::URIRef(&reference),
            AttributeValue::Time(&time),
            AttributeValue::Time(&leap),
            AttributeValue::Time(&far),
            AttributeValue::SpecVersion(SpecVersion::V10),
            AttributeValue::SpecVersion(SpecVersion::V03),
        ];
        let mut scratch = String::new();
        for value in &values {
            assert_eq!(attribute_text(value, &mut scratch), value.to_string());
            assert_eq!(attribute_len(value), value.to_string().len(), "{value:?}");
        }
    }
}
