//! CloudEvents protocol bindings, without I/O: an [`Event`] to and from a
//! broker-neutral [`Message`] of headers, key and payload.
//!
//! Written once here and used by every adapter, following the CloudEvents
//! Kafka and NATS protocol bindings so that other CloudEvents SDKs read what
//! we write and we read what they write:
//!
//! | | binary mode | structured mode |
//! | --- | --- | --- |
//! | attributes | one header each, `ce_<name>` (Kafka) or `ce-<name>` (NATS) | in the JSON payload |
//! | `datacontenttype` | `content-type` header | in the JSON payload |
//! | data | the payload, as is | in the JSON payload (`data` or `data_base64`) |
//! | `content-type` header | the data's content type | `application/cloudevents+json` |
//! | message key | `partitionkey` | `partitionkey` |
//!
//! Header values are UTF-8. Kafka carries them as they are; NATS headers
//! cannot hold line breaks and trim surrounding spaces, so the NATS binding
//! percent-encodes values as the HTTP binding does, spaces included.
//! Extension values travel as strings in binary mode, as the specification
//! prescribes; [`EventExt`] accessors read both forms.
//!
//! ```
//! use broker_adapters::binding::{Binding, Mode};
//! use broker_adapters::CloudEventBuilder;
//!
//! let event = CloudEventBuilder::new("com.example.ping", "/doc")
//!     .partition_key("k1")
//!     .json_data(&1)
//!     .build()?;
//! let message = Binding::KAFKA.encode(&event, Mode::Binary)?;
//! assert_eq!(message.key.as_deref(), Some("k1"));
//! assert!(message.headers.iter().any(|(k, v)| k == "ce_type" && v == "com.example.ping"));
//!
//! let headers = message.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
//! let decoded = Binding::KAFKA.decode(headers, &message.payload)?;
//! assert_eq!(decoded.id(), event.id());
//! # use broker_adapters::cloudevents::AttributesReader;
//! # Ok::<(), broker_adapters::Error>(())
//! ```

use std::borrow::Cow;

use cloudevents::event::{EventBuilderError, SpecVersion};
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, Error as MessageError, MessageAttributeValue,
};
use cloudevents::{Data, Event, EventBuilder as _, EventBuilderV10};

use crate::error::{Error, ErrorKind, Result};
use crate::event::EventExt;

/// The `content-type` of an event in structured mode (JSON event format).
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// The header carrying `datacontenttype` in binary mode, and the event
/// format in structured mode.
pub const CONTENT_TYPE: &str = "content-type";

/// How an event is laid out in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// Attributes in headers, data as the payload: compact, and the payload is
    /// readable by consumers that know nothing of CloudEvents.
    #[default]
    Binary,
    /// The whole event as one JSON document in the payload.
    Structured,
}

/// A message as a broker carries it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// The message key (Kafka), taken from `partitionkey`.
    pub key: Option<String>,
    /// Headers, in a stable order.
    pub headers: Vec<(String, String)>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Message {
    /// The bytes the message occupies: key, header names and values, payload.
    pub fn encoded_len(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.key.as_ref().map_or(0, String::len) + headers + self.payload.len()
    }
}

/// One protocol binding: the header prefix and how values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    prefix: &'static str,
    percent_encode: bool,
}

impl Binding {
    /// The CloudEvents Kafka protocol binding: `ce_` headers, raw UTF-8 values.
    pub const KAFKA: Self = Self {
        prefix: "ce_",
        percent_encode: false,
    };

    /// The CloudEvents NATS protocol binding: `ce-` headers, percent-encoded
    /// values (needs NATS 2.2 or later for headers).
    pub const NATS: Self = Self {
        prefix: "ce-",
        percent_encode: true,
    };

    /// The header prefix of attributes in binary mode.
    pub fn prefix(&self) -> &'static str {
        self.prefix
    }

    /// Encodes `event` in `mode`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Encode`] if structured JSON serialization fails.
    pub fn encode(&self, event: &Event, mode: Mode) -> Result<Message> {
        let key = event.partition_key().map(str::to_owned);
        match mode {
            Mode::Structured => {
                let payload = crate::event::to_json_vec(event)
                    .map_err(|e| Error::with_source(ErrorKind::Encode, e))?;
                Ok(Message {
                    key,
                    headers: vec![(CONTENT_TYPE.to_owned(), CLOUDEVENTS_JSON.to_owned())],
                    payload,
                })
            }
            Mode::Binary => {
                let mut headers = Vec::with_capacity(12);
                self.binary_headers(event, |name, value| {
                    headers.push((name.to_owned(), value.to_owned()));
                });
                let payload = event.data_bytes().map(Cow::into_owned).unwrap_or_default();
                Ok(Message {
                    key,
                    headers,
                    payload,
                })
            }
        }
    }

    /// Calls `header` with the name and value of each binary-mode header of
    /// `event`, in [`encode`](Self::encode)'s order, without collecting
    /// them: for adapters that copy headers straight into their client's own
    /// structure. The payload is [`EventExt::data_bytes`], the key
    /// [`EventExt::partition_key`].
    pub fn binary_headers(&self, event: &Event, mut header: impl FnMut(&str, &str)) {
        let mut name = String::with_capacity(32);
        let mut scratch = String::new();
        for (attribute, value) in event.iter() {
            let value = self.escape(crate::event::attribute_text(&value, &mut scratch));
            if attribute == "datacontenttype" {
                header(CONTENT_TYPE, &value);
            } else {
                name.clear();
                name.push_str(self.prefix);
                name.push_str(attribute);
                header(&name, &value);
            }
        }
    }

    /// Decodes a received message, detecting its mode from the
    /// `content-type` header. Headers that are not CloudEvents attributes
    /// are ignored; header names are matched case-insensitively.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`] with the reason as source: not a CloudEvent (no
    /// `specversion`), an unknown spec version, a header that is not UTF-8, a
    /// missing required attribute, a malformed `time` or `dataschema`, or
    /// structured JSON that is not a valid event.
    pub fn decode<'a, I>(&self, headers: I, payload: &[u8]) -> Result<Event>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        self.decode_payload(headers, Payload::Borrowed(payload))
    }

    /// Like [`decode`](Self::decode), but a binary-mode payload becomes the
    /// event's data without a copy: `payload` is left empty when the event
    /// took it, and untouched when decoding fails (to dead-letter it, say).
    ///
    /// # Errors
    ///
    /// As [`decode`](Self::decode).
    pub fn decode_owned<'a, I>(&self, headers: I, payload: &mut Vec<u8>) -> Result<Event>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        self.decode_payload(headers, Payload::Owned(payload))
    }

    fn decode_payload<'a, I>(&self, headers: I, payload: Payload<'_>) -> Result<Event>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        let mut spec_version = None;
        // Attribute names borrow the header names unless they need
        // lowercasing; each value is copied once, into the event.
        let mut attributes: Attributes<'a> = Vec::with_capacity(12);
        for (name, raw) in headers {
            let attr = if name.eq_ignore_ascii_case(CONTENT_TYPE) {
                Cow::Borrowed("datacontenttype")
            } else if let Some(attr) = strip_prefix_ignore_case(name, self.prefix) {
                if attr.bytes().any(|b| b.is_ascii_uppercase()) {
                    Cow::Owned(attr.to_ascii_lowercase())
                } else {
                    Cow::Borrowed(attr)
                }
            } else {
                continue;
            };
            let text = std::str::from_utf8(raw).map_err(|e| decode_error("a header value", e))?;
            if attr == "specversion" {
                if spec_version.is_none() {
                    spec_version = Some(self.unescape_borrowed(text)?);
                }
                continue;
            }
            let value = self.unescape(text)?;
            if !attributes.iter().any(|(n, _)| *n == attr) {
                attributes.push((attr, value));
            }
        }

        let content_type = attributes
            .iter()
            .find(|(n, _)| n == "datacontenttype")
            .map(|(_, v)| v.as_str());
        let structured = content_type.is_some_and(|ct| {
            ct.get(..CLOUDEVENTS_JSON.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(CLOUDEVENTS_JSON))
        });
        if structured {
            return crate::event::from_json_slice(payload.bytes())
                .map_err(|e| decode_error("a structured CloudEvent", e));
        }
        let Some(spec_version) = spec_version else {
            return Err(Error::with_source(
                ErrorKind::Decode {
                    what: "a CloudEvent",
                },
                format!(
                    "the message has neither a `{}specversion` header nor a `{CLOUDEVENTS_JSON}` content type",
                    self.prefix
                ),
            ));
        };
        let spec_version = SpecVersion::try_from(spec_version.as_ref())
            .map_err(|e| decode_error("the spec version", e))?;
        if spec_version == SpecVersion::V10 {
            match build_v10(attributes, payload.bytes()) {
                Ok(Ok(mut event)) => {
                    if event.data().is_some() {
                        // Valid: the payload goes in as the data.
                        event.set_data_unchecked(Data::Binary(payload.take()));
                    }
                    return Ok(event);
                }
                Ok(Err(e)) => return Err(decode_error("a binary-mode CloudEvent", e)),
                Err(back) => attributes = back,
            }
        }
        BinaryMessage {
            spec_version,
            attributes,
            payload: payload.bytes(),
        }
        .into_event()
        .map_err(|e| decode_error("a binary-mode CloudEvent", e))
    }

    fn escape<'v>(&self, value: &'v str) -> Cow<'v, str> {
        if !self.percent_encode || needs_no_escape(value.as_bytes()) {
            return Cow::Borrowed(value);
        }
        let mut out = String::with_capacity(value.len() + 8);
        for b in value.bytes() {
            if plain_byte(b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        Cow::Owned(out)
    }

    /// [`unescape`](Self::unescape), borrowing `value` when it has nothing
    /// to unescape.
    fn unescape_borrowed<'v>(&self, value: &'v str) -> Result<Cow<'v, str>> {
        if !self.percent_encode || !value.contains('%') {
            return Ok(Cow::Borrowed(value));
        }
        self.unescape(value).map(Cow::Owned)
    }

    fn unescape(&self, value: &str) -> Result<String> {
        if !self.percent_encode || !value.contains('%') {
            return Ok(value.to_owned());
        }
        let bytes = value.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => out.push(b),
                    None => {
                        return Err(decode_error(
                            "a header value",
                            format!("bad percent-encoding in `{value}`"),
                        ));
                    }
                }
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).map_err(|e| decode_error("a header value", e))
    }
}

/// `name` without `prefix` (lowercase ASCII), compared case-insensitively.
fn strip_prefix_ignore_case<'n>(name: &'n str, prefix: &str) -> Option<&'n str> {
    let n = prefix.len();
    let head = name.as_bytes().get(..n)?;
    // A byte at a time: the prefixes are three bytes, too short for the
    // general comparison's set-up to pay.
    if head
        .iter()
        .zip(prefix.as_bytes())
        .all(|(&h, &p)| h.to_ascii_lowercase() == p)
    {
        name.get(n..)
    } else {
        None
    }
}

fn decode_error(
    what: &'static str,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> Error {
    Error::with_source(ErrorKind::Decode { what }, source)
}

/// Binary-mode attributes as received: lowercase names without the prefix,
/// unescaped values.
type Attributes<'n> = Vec<(Cow<'n, str>, String)>;

/// A payload being decoded: borrowed (its bytes are copied into the event)
/// or owned (moved into it, once the event is known to be valid).
enum Payload<'p> {
    Borrowed(&'p [u8]),
    Owned(&'p mut Vec<u8>),
}

impl Payload<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Borrowed(bytes) => bytes,
            Self::Owned(bytes) => bytes,
        }
    }

    /// The bytes as the event's data.
    fn take(self) -> Vec<u8> {
        match self {
            Self::Borrowed(bytes) => bytes.to_vec(),
            Self::Owned(bytes) => std::mem::take(bytes),
        }
    }
}

/// Whether a percent-encoding binding writes `b` as it is: printable
/// ASCII other than space, `%` and `"`.
fn plain_byte(b: u8) -> bool {
    (0x21..0x7f).contains(&b) && b != b'%' && b != b'"'
}

/// Whether every byte of `bytes` is [`plain_byte`], looking at eight bytes
/// at a time (header values are mostly plain).
fn needs_no_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Whether some byte of `x` is zero.
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH != 0;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let Ok(word) = <[u8; 8]>::try_from(chunk) else {
            return false;
        };
        let x = u64::from_le_bytes(word);
        // A byte under 0x21, or from 0x7f up (0x7f + 1 and any byte with
        // its high bit set show the high bit).
        let below = x.wrapping_sub(0x21 * ONES) & !x & HIGH;
        let above = (x.wrapping_add(ONES) | x) & HIGH;
        if below | above != 0
            || has_zero(x ^ (u64::from(b'%') * ONES))
            || has_zero(x ^ (u64::from(b'"') * ONES))
        {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| plain_byte(b))
}

/// Builds a CloudEvents 1.0 event from binary-mode attributes, moving each
/// value into it: the common case, without the SDK's generic path (which
/// formats every value into a new string). Hands the attributes back for
/// that path when the typed builder cannot say the same thing: data without
/// a content type, or a content type or schema without data. The data is
/// left empty, for the caller to move the payload in once the event is
/// valid.
fn build_v10<'n>(
    mut attributes: Attributes<'n>,
    payload: &[u8],
) -> std::result::Result<std::result::Result<Event, EventBuilderError>, Attributes<'n>> {
    let has = |name: &str| attributes.iter().any(|(n, _)| n == name);
    let (content_type, schema) = (has("datacontenttype"), has("dataschema"));
    if payload.is_empty() == content_type || (payload.is_empty() && schema) {
        return Err(attributes);
    }
    // The builder is taken and returned by value, a copy of the whole
    // builder each time: the values are sorted out first so that it is
    // built in one chain, and extensions go into the finished event.
    let (mut id, mut ty, mut source, mut subject, mut time) = (None, None, None, None, None);
    let (mut content_type, mut schema) = (None, None);
    // What is left in `attributes` are the extensions.
    attributes.retain_mut(|(name, value)| {
        let slot = match name.as_ref() {
            "id" => &mut id,
            "type" => &mut ty,
            "source" => &mut source,
            "subject" => &mut subject,
            "time" => &mut time,
            "datacontenttype" => &mut content_type,
            "dataschema" => &mut schema,
            _ => return true,
        };
        *slot = Some(std::mem::take(value));
        false
    });
    let mut builder = EventBuilderV10::new();
    match (id, ty, source) {
        // One chain: about 180 instructions a call fewer than three
        // conditional calls (callgrind, the codec benchmark).
        (Some(id), Some(ty), Some(source)) => builder = builder.id(id).ty(ty).source(source),
        // Not an event: the builder names what is missing.
        (id, ty, source) => {
            if let Some(id) = id {
                builder = builder.id(id);
            }
            if let Some(ty) = ty {
                builder = builder.ty(ty);
            }
            if let Some(source) = source {
                builder = builder.source(source);
            }
        }
    }
    if let Some(subject) = subject {
        builder = builder.subject(subject);
    }
    if let Some(time) = time {
        // The common UTC forms are read without chrono's general parser.
        builder = match crate::event::parse_rfc3339(&time) {
            Ok(time) => builder.time(time),
            Err(_) => builder.time(time),
        };
    }
    if let Some(content_type) = content_type {
        let data = Data::Binary(Vec::new());
        builder = match schema {
            Some(schema) => builder.data_with_schema(content_type, schema, data),
            None => builder.data(content_type, data),
        };
    }
    Ok(builder.build().map(|mut event| {
        for (name, value) in attributes {
            event.set_extension(&name, value);
        }
        event
    }))
}

/// A binary-mode message, fed to the SDK's event builder.
struct BinaryMessage<'a> {
    spec_version: SpecVersion,
    attributes: Attributes<'a>,
    payload: &'a [u8],
}

impl BinaryDeserializer for BinaryMessage<'_> {
    fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(
        self,
        mut visitor: V,
    ) -> Result<R, MessageError> {
        let known = self.spec_version.attribute_names();
        visitor = visitor.set_spec_version(self.spec_version)?;
        for (name, value) in self.attributes {
            let value = MessageAttributeValue::String(value);
            visitor = if known.contains(&name.as_ref()) {
                visitor.set_attribute(&name, value)?
            } else {
                visitor.set_extension(&name, value)?
            };
        }
        if self.payload.is_empty() {
            visitor.end()
        } else {
            visitor.end_with_data(self.payload.to_vec())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::CloudEventBuilder;
    use chrono::{TimeZone, Utc};
    use cloudevents::AttributesReader;
    use url::Url;

    fn full_event() -> Event {
        CloudEventBuilder::new("com.example.order.placed", "/orders")
            .id("0193f0c2-0000-7000-8000-000000000001")
            .time(
                Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
                    .single()
                    .expect("valid"),
            )
            .subject("order\n42 ü")
            .dataschema(Url::parse("http://127.0.0.1:8081/schemas/ids/3").expect("url"))
            .partition_key("order-42")
            .saga("s1", "pay", 2)
            .extension("flag", true)
            .json_data(&serde_json::json!({"a": 1}))
            .build()
            .expect("valid")
    }

    fn decode(binding: Binding, m: &Message) -> Result<Event> {
        binding.decode(
            m.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
            &m.payload,
        )
    }

    fn header<'m>(m: &'m Message, name: &str) -> Option<&'m str> {
        m.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn kafka_binary_layout_follows_the_spec() {
        let m = Binding::KAFKA
            .encode(&full_event(), Mode::Binary)
            .expect("encodes");
        assert_eq!(m.key.as_deref(), Some("order-42"));
        assert_eq!(header(&m, "ce_specversion"), Some("1.0"));
        assert_eq!(
            header(&m, "ce_id"),
            Some("0193f0c2-0000-7000-8000-000000000001")
        );
        assert_eq!(header(&m, "ce_type"), Some("com.example.order.placed"));
        assert_eq!(header(&m, "ce_source"), Some("/orders"));
        assert_eq!(header(&m, "ce_time"), Some("2026-01-02T03:04:05+00:00"));
        assert_eq!(header(&m, "ce_subject"), Some("order\n42 ü"));
        assert_eq!(header(&m, "ce_sagaattempt"), Some("2"));
        assert_eq!(header(&m, "ce_flag"), Some("true"));
        assert_eq!(header(&m, "content-type"), Some("application/json"));
        assert_eq!(header(&m, "ce_datacontenttype"), None);
        assert_eq!(m.payload, br#"{"a":1}"#);
    }

    #[test]
    fn nats_binary_percent_encodes_what_headers_cannot_hold() {
        let m = Binding::NATS
            .encode(&full_event(), Mode::Binary)
            .expect("encodes");
        assert_eq!(header(&m, "ce-subject"), Some("order%0A42%20%C3%BC"));
        assert!(m.headers.iter().all(|(_, v)| !v.contains('\n')));
        let back = decode(Binding::NATS, &m).expect("decodes");
        assert_eq!(back.subject(), Some("order\n42 ü"));
    }

    #[test]
    fn nats_keeps_leading_and_trailing_spaces_which_headers_would_trim() {
        let event = CloudEventBuilder::new("t", "/s")
            .subject("  padded  ")
            .correlation_id(" lead")
            .build()
            .expect("valid");
        let m = Binding::NATS.encode(&event, Mode::Binary).expect("encodes");
        assert_eq!(header(&m, "ce-subject"), Some("%20%20padded%20%20"));
        assert!(
            m.headers
                .iter()
                .all(|(_, v)| !v.starts_with(' ') && !v.ends_with(' '))
        );
        let back = decode(Binding::NATS, &m).expect("decodes");
        assert_eq!(back.subject(), Some("  padded  "));
        assert_eq!(back.correlation_id(), Some(" lead"));
    }

    #[test]
    fn every_mode_round_trips_every_attribute() {
        let sent = full_event();
        for binding in [Binding::KAFKA, Binding::NATS] {
            for mode in [Mode::Binary, Mode::Structured] {
                let m = binding.encode(&sent, mode).expect("encodes");
                let got = decode(binding, &m).expect("decodes");
                assert_eq!(got.id(), sent.id());
                assert_eq!(got.ty(), sent.ty());
                assert_eq!(got.source(), sent.source());
                assert_eq!(got.time(), sent.time());
                assert_eq!(got.subject(), sent.subject());
                assert_eq!(got.dataschema(), sent.dataschema());
                assert_eq!(got.datacontenttype(), sent.datacontenttype());
                assert_eq!(got.partition_key(), Some("order-42"));
                assert_eq!(got.saga_attempt().expect("typed"), Some(2));
                assert_eq!(
                    got.extension("flag").map(ToString::to_string).as_deref(),
                    Some("true")
                );
                assert_eq!(
                    got.data_as::<serde_json::Value>().expect("json"),
                    serde_json::json!({"a": 1}),
                    "{binding:?} {mode:?}"
                );
            }
        }
    }

    #[test]
    fn reads_what_another_sdk_writes() {
        // A Kafka record as the Python `cloudevents.kafka.to_binary` writes it.
        let headers: Vec<(&str, &[u8])> = vec![
            ("ce_specversion", b"1.0"),
            ("ce_id", b"abc"),
            ("ce_source", b"https://example.com/event-producer"),
            ("ce_type", b"com.example.sampletype1"),
            ("ce_time", b"2018-04-05T17:31:00Z"),
            ("ce_comexampleextension1", b"value"),
            ("content-type", b"application/json"),
            ("traceparent-not-ours", b"ignored"),
        ];
        let event = Binding::KAFKA
            .decode(headers, br#"{"k":"v"}"#)
            .expect("decodes");
        assert_eq!(event.id(), "abc");
        assert_eq!(
            event
                .extension("comexampleextension1")
                .map(ToString::to_string)
                .as_deref(),
            Some("value")
        );
        assert_eq!(
            event.data_as::<serde_json::Value>().expect("json")["k"],
            "v"
        );

        let structured =
            br#"{"specversion":"1.0","id":"s1","source":"/py","type":"t","data":{"x":1}}"#;
        let headers: Vec<(&str, &[u8])> = vec![(
            "Content-Type",
            b"application/cloudevents+json; charset=utf-8",
        )];
        let event = Binding::NATS
            .decode(headers, structured)
            .expect("decodes structured");
        assert_eq!(event.id(), "s1");
    }

    #[test]
    fn the_direct_builder_and_the_sdks_generic_path_agree() {
        let with_binary = CloudEventBuilder::new("t", "/s")
            .id("b1")
            .binary_data("application/octet-stream", vec![0_u8, 1, 2, 255])
            .build()
            .expect("valid");
        let no_data = CloudEventBuilder::new("t", "/s")
            .id("n1")
            .subject("s")
            .partition_key("k")
            .build()
            .expect("valid");
        for event in [full_event(), with_binary, no_data] {
            let m = Binding::KAFKA
                .encode(&event, Mode::Binary)
                .expect("encodes");
            // Upper-case header names, as some producers write them.
            let shouted: Vec<(String, &[u8])> = m
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_uppercase(), v.as_bytes()))
                .collect();
            let direct = Binding::KAFKA
                .decode(shouted.iter().map(|(k, v)| (k.as_str(), *v)), &m.payload)
                .expect("decodes");
            let attributes: Attributes<'_> = m
                .headers
                .iter()
                .filter(|(k, _)| k != "ce_specversion")
                .map(|(k, v)| {
                    let name = k.strip_prefix("ce_").unwrap_or("datacontenttype");
                    (Cow::Borrowed(name), v.clone())
                })
                .collect();
            let generic = BinaryMessage {
                spec_version: SpecVersion::V10,
                attributes,
                payload: &m.payload,
            }
            .into_event()
            .expect("decodes");
            assert_eq!(direct, generic);
            assert_eq!(direct.id(), event.id());

            let mut payload = m.payload.clone();
            let owned = Binding::KAFKA
                .decode_owned(
                    m.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
                    &mut payload,
                )
                .expect("decodes");
            assert_eq!(owned, generic);
            assert!(payload.is_empty(), "the data took the payload");
        }
    }

    /// A payload that does not become an event's data stays with the caller.
    #[test]
    fn decoding_an_owned_payload_leaves_it_on_failure() {
        type Headers<'a> = Vec<(&'a str, &'a [u8])>;
        let base: Headers<'_> = vec![
            ("ce_specversion", b"1.0"),
            ("ce_id", b"1"),
            ("ce_type", b"t"),
            ("content-type", b"application/json"),
        ];
        let bad_time = [&base[..], &[("ce_source", b"/s"), ("ce_time", b"soon")]].concat();
        let bad_schema = [&base[..], &[("ce_source", b"/s"), ("ce_dataschema", b"::")]].concat();
        for (headers, needle) in [
            (base, "source"),
            (bad_time, "time"),
            (bad_schema, "dataschema"),
        ] {
            let mut payload = br#"{"a":1}"#.to_vec();
            let err = Binding::KAFKA
                .decode_owned(headers, &mut payload)
                .expect_err(needle);
            assert!(err.to_string().contains(needle), "`{err}` lacks `{needle}`");
            assert_eq!(payload, br#"{"a":1}"#, "kept for a dead letter");
        }
    }

    #[test]
    fn malformed_messages_are_clear_errors() {
        type Headers<'a> = Vec<(&'a str, &'a [u8])>;
        let cases: Vec<(Headers<'_>, &[u8], &str)> = vec![
            (vec![], b"{}", "specversion"),
            (vec![("ce_specversion", b"9.9")], b"", "spec version"),
            (
                vec![
                    ("ce_specversion", b"1.0"),
                    ("ce_id", b"1"),
                    ("ce_type", b"t"),
                ],
                b"",
                "source",
            ),
            (
                vec![
                    ("ce_specversion", b"1.0"),
                    ("ce_type", b"t"),
                    ("ce_source", b"/s"),
                ],
                b"",
                "id",
            ),
            (
                vec![
                    ("ce_specversion", b"1.0"),
                    ("ce_id", b"1"),
                    ("ce_source", b"/s"),
                    ("ce_partitionkey", b"k"),
                ],
                b"",
                "type",
            ),
            (
                vec![
                    ("ce_specversion", b"1.0"),
                    ("ce_id", b"1"),
                    ("ce_type", b"t"),
                    ("ce_source", b"/s"),
                    ("ce_time", b"yesterday"),
                ],
                b"",
                "time",
            ),
            (vec![("ce_specversion", b"\xff")], b"", "header value"),
            (
                vec![("content-type", b"application/cloudevents+json")],
                b"{not json",
                "structured",
            ),
        ];
        for (headers, payload, needle) in cases {
            let err = Binding::KAFKA.decode(headers, payload).expect_err(needle);
            assert!(matches!(err.kind(), ErrorKind::Decode { .. }), "{err}");
            assert!(!err.is_retryable());
            assert!(err.to_string().contains(needle), "`{err}` lacks `{needle}`");
        }
        let bad_escape: Vec<(&str, &[u8])> = vec![("ce-specversion", b"1%Z0")];
        assert!(Binding::NATS.decode(bad_escape, b"").is_err());
    }

    proptest::proptest! {
        /// The eight-at-a-time check agrees with the byte-by-byte one, on
        /// bytes drawn around every edge (0x20/0x21, 0x7e/0x7f, 0x80, 0xff,
        /// `%`, `"`) at every position.
        #[test]
        fn needs_no_escape_is_plain_byte_for_every_byte(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    4 => 0x21_u8..0x7f,
                    1 => proptest::sample::select(vec![0_u8, 0x1f, 0x20, 0x21, 0x22, 0x25, 0x7e, 0x7f, 0x80, 0xc3, 0xfe, 0xff]),
                ],
                0..40,
            ),
        ) {
            proptest::prop_assert_eq!(
                needs_no_escape(&bytes),
                bytes.iter().all(|&b| plain_byte(b))
            );
        }
    }

    #[test]
    fn needs_no_escape_sees_each_byte_at_each_place() {
        for bad in 0_u8..=255 {
            for at in 0..17 {
                let mut bytes = vec![b'a'; 17];
                bytes[at] = bad;
                assert_eq!(
                    needs_no_escape(&bytes),
                    plain_byte(bad),
                    "byte {bad:#x} at {at}"
                );
            }
        }
    }
}
