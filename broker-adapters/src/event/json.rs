//! Decoding the CloudEvents JSON format (structured mode, outbox and SQL
//! broker rows) in one pass.
//!
//! The SDK's `Deserialize for Event` reads the whole document into a
//! `serde_json::Value`, copies it into a second map, then takes each
//! attribute and the data out of that map (the data copied once more).
//! For a 1 KiB event that was a quarter of the outbox relay's CPU.
//! [`from_json_slice`] reads the document once, straight into the
//! attributes, the data and the extensions, for the shape the SDK itself
//! writes and nearly every producer sends (a CloudEvents 1.0 object with
//! string attributes and no `data_base64`). Anything else, including every
//! malformed document, goes to the SDK's decoder, so the result and the
//! error are always the SDK's.

use std::borrow::Cow;
use std::fmt;

use cloudevents::event::{Data, EventBuilder as _, EventBuilderV10, ExtensionValue};
use cloudevents::{AttributesWriter as _, Event};
use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_json::Value;
use url::Url;

/// Decodes a CloudEvent in the JSON event format, exactly as
/// `serde_json::from_slice::<Event>` does, in one pass for the common shape.
///
/// # Errors
///
/// The SDK's error for a document that is not a valid CloudEvent.
pub fn from_json_slice(json: &[u8]) -> serde_json::Result<Event> {
    match fast(json) {
        Some(event) => Ok(event),
        None => serde_json::from_slice(json),
    }
}

/// The one-pass decode, or `None` for a document of another shape (or an
/// invalid one), which the SDK decodes instead.
fn fast(json: &[u8]) -> Option<Event> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let Ok(Parts(parts)) = Parts::deserialize(&mut de) else {
        return None;
    };
    de.end().ok()?;
    parts.and_then(Fields::into_event)
}

/// The top-level members, as read.
#[derive(Default)]
struct Fields {
    specversion: Option<String>,
    id: Option<String>,
    ty: Option<String>,
    source: Option<String>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    subject: Option<String>,
    time: Option<String>,
    data: Option<Value>,
    extensions: Vec<(String, ExtensionValue)>,
}

impl Fields {
    /// The event the SDK decodes from these members, or `None` where this
    /// path leaves the decision to the SDK.
    fn into_event(self) -> Option<Event> {
        if self.specversion.as_deref() != Some("1.0") {
            return None;
        }
        let source = self.source.filter(|s| !s.is_empty())?;
        let mut event = EventBuilderV10::new()
            .id(self.id?)
            .ty(self.ty?)
            .source(source)
            .build()
            .ok()?;
        let data = match self.data {
            None => None,
            Some(value) => {
                let content_type = self
                    .datacontenttype
                    .as_deref()
                    .unwrap_or("application/json");
                if is_json_content_type(content_type) {
                    Some(Data::Json(value))
                } else if let Value::String(text) = value {
                    Some(Data::String(text))
                } else {
                    return None;
                }
            }
        };
        let time = match self.time {
            None => None,
            Some(t) => Some(super::parse_rfc3339(&t).ok()?),
        };
        let dataschema = match self.dataschema {
            None => None,
            Some(s) => Some(Url::parse(&s).ok()?),
        };
        event.set_datacontenttype(self.datacontenttype);
        event.set_dataschema(dataschema);
        event.set_subject(self.subject);
        event.set_time(time);
        if let Some(data) = data {
            event.set_data_unchecked(data);
        }
        for (name, value) in self.extensions {
            event.set_extension(&name, value);
        }
        Some(event)
    }
}

/// The SDK's test for JSON data (`cloudevents::event::data`, private there).
fn is_json_content_type(ct: &str) -> bool {
    ct.starts_with("application/json") || ct.starts_with("text/json") || ct.ends_with("+json")
}

/// The members of the top-level object; `None` inside for a shape this path
/// does not decode.
struct Parts(Option<Fields>);

impl<'de> Deserialize<'de> for Parts {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(PartsVisitor)
    }
}

struct PartsVisitor;

impl<'de> Visitor<'de> for PartsVisitor {
    type Value = Parts;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudEvent object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parts, A::Error> {
        let mut fields = Fields::default();
        let mut other = false;
        let mut seen: Vec<Cow<'de, str>> = Vec::new();
        while let Some(Key(key)) = map.next_key()? {
            // A repeated member: the SDK keeps the last one; leave it to it.
            if seen.contains(&key) {
                other = true;
            }
            let slot = match key.as_ref() {
                "specversion" => Some(&mut fields.specversion),
                "id" => Some(&mut fields.id),
                "type" => Some(&mut fields.ty),
                "source" => Some(&mut fields.source),
                "datacontenttype" => Some(&mut fields.datacontenttype),
                "dataschema" => Some(&mut fields.dataschema),
                "subject" => Some(&mut fields.subject),
                "time" => Some(&mut fields.time),
                _ => None,
            };
            let value: Value = map.next_value()?;
            if let Some(slot) = slot {
                // Attributes are strings; a null or another type is the
                // SDK's to judge.
                match value {
                    Value::String(s) => *slot = Some(s),
                    _ => other = true,
                }
            } else {
                match (key.as_ref(), value) {
                    ("data", value) => fields.data = Some(value),
                    ("data_base64", _) => other = true,
                    (_, Value::Null) => {}
                    (name, Value::String(s)) => fields
                        .extensions
                        .push((name.to_owned(), ExtensionValue::String(s))),
                    (name, Value::Bool(b)) => fields
                        .extensions
                        .push((name.to_owned(), ExtensionValue::Boolean(b))),
                    (name, Value::Number(n)) => match n.as_i64() {
                        Some(i) => fields
                            .extensions
                            .push((name.to_owned(), ExtensionValue::Integer(i))),
                        None => other = true,
                    },
                    _ => other = true,
                }
            }
            seen.push(key);
        }
        Ok(Parts((!other).then_some(fields)))
    }
}

/// A member name, borrowed from the input where it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;
    use proptest::prelude::*;
    use serde_json::json;

    /// Both decoders agree: the same event, or both fail.
    fn agree(json: &str) {
        let sdk = serde_json::from_str::<Event>(json);
        let ours = from_json_slice(json.as_bytes());
        match (&sdk, &ours) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{json}"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{json}"),
            _ => panic!("{json}: the SDK gave {sdk:?}, ours {ours:?}"),
        }
    }

    #[test]
    fn the_common_shape_takes_the_one_pass_path() {
        let event = EventBuilderV10::new()
            .id("1")
            .ty("t")
            .source("/s")
            .subject("sub")
            .time("2024-01-02T03:04:05.123456Z")
            .extension("partitionkey", "k")
            .extension("n", 7_i64)
            .extension("flag", true)
            .data("application/json", json!({"a": [1, 2.5, null], "b": "é\n"}))
            .build()
            .expect("valid event");
        let text = serde_json::to_string(&event).expect("serialize");
        assert_eq!(fast(text.as_bytes()).as_ref(), Some(&event));
        agree(&text);
    }

    #[test]
    fn other_shapes_and_bad_documents_get_the_sdks_answer() {
        for json in [
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s"}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","data":{"x":1}}"#,
            r#"{"data":{"x":1},"specversion":"1.0","id":"1","type":"t","source":"/s","datacontenttype":"text/plain"}"#,
            r#"{"data":"hi","specversion":"1.0","id":"1","type":"t","source":"/s","datacontenttype":"text/plain"}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","datacontenttype":"application/cloudevents+json","data":[1]}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","data":null}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","data_base64":"aGk="}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","data_base64":"eyJhIjoxfQ=="}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","data":"x","data_base64":"aGk="}"#,
            r#"{"specversion":"0.3","id":"1","type":"t","source":"/s"}"#,
            r#"{"specversion":"2.0","id":"1","type":"t","source":"/s"}"#,
            r#"{"id":"1","type":"t","source":"/s"}"#,
            r#"{"specversion":"1.0","type":"t","source":"/s"}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":""}"#,
            r#"{"specversion":"1.0","id":1,"type":"t","source":"/s"}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","subject":null}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","time":"yesterday"}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","time":"2024-01-02T03:04:05+02:00"}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","dataschema":"not a url"}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","dataschema":"https://x/s.json"}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","ext":null}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","ext":1.5}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","ext":18446744073709551615}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","ext":-3}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","ext":{"a":1}}"#,
            r#"{"specversion":"1.0","id":"1","id":"2","type":"t","source":"/s"}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s","e\u0078t":"v"}"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s"} x"#,
            r#"{"specversion":"1.0","id":"1","type":"t","source":"/s""#,
            r#"[1,2]"#,
            "",
            "\u{0}",
        ] {
            agree(json);
        }
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        let text = "[a-zA-Z0-9 /:._\\-\"\\\\é\n]{0,12}";
        (
            (text, text, "[a-z/]{1,8}", proptest::option::of(text)),
            proptest::option::of(0_i64..4_000_000_000),
            proptest::collection::vec(
                (
                    // Not an attribute's or the data's member name: the SDK
                    // would write the member twice.
                    "[a-z]{1,6}".prop_filter("a member of its own", |name| {
                        ![
                            "specversion",
                            "id",
                            "type",
                            "source",
                            "subject",
                            "time",
                            "data",
                        ]
                        .contains(&name.as_str())
                    }),
                    prop_oneof![
                        text.prop_map(ExtensionValue::String),
                        any::<bool>().prop_map(ExtensionValue::Boolean),
                        any::<i64>().prop_map(ExtensionValue::Integer),
                    ],
                ),
                0..4,
            ),
            prop_oneof![
                Just(None),
                text.prop_map(|s| Some(("text/plain".to_owned(), Data::String(s)))),
                proptest::collection::vec(any::<u8>(), 0..16)
                    .prop_map(|b| Some(("application/octet-stream".to_owned(), Data::Binary(b)))),
                (text, any::<i32>(), -8_i32..8).prop_map(|(s, i, f)| Some((
                    "application/json".to_owned(),
                    Data::Json(
                        json!({ "s": s, "i": i, "f": f64::from(f) / 4.0, "l": [true, null] })
                    )
                ))),
            ],
        )
            .prop_map(|((id, ty, source, subject), time, exts, data)| {
                let mut b = EventBuilderV10::new().id(id).ty(ty).source(source);
                if let Some(s) = subject {
                    b = b.subject(s);
                }
                if let Some(t) = time.and_then(|t| DateTime::from_timestamp(t, 0)) {
                    b = b.time(t);
                }
                for (name, value) in exts {
                    b = b.extension(&name, value);
                }
                if let Some((ct, data)) = data {
                    b = b.data(ct, data);
                }
                b.build().expect("valid event")
            })
    }

    proptest! {
        #[test]
        fn events_round_trip_as_the_sdk_decodes_them(event in arb_event()) {
            let text = serde_json::to_string(&event).expect("serialize");
            // Binary data is written as `data_base64`, left to the SDK;
            // every other generated event takes the one-pass path.
            let binary = matches!(event.data(), Some(Data::Binary(_)));
            prop_assert_eq!(fast(text.as_bytes()).is_some(), !binary);
            let ours = from_json_slice(text.as_bytes()).expect("ours decodes");
            let sdk = serde_json::from_str::<Event>(&text).expect("the SDK decodes");
            prop_assert_eq!(&ours, &sdk);
            // Floats are exact quarters: serde_json's float parsing may
            // differ in the last bit from what it printed, for both.
            prop_assert_eq!(&ours, &event);
        }
    }

    /// `to_json_vec` against the SDK's serializer, byte for byte.
    fn written_as_the_sdk_writes(event: &Event) {
        let sdk = serde_json::to_vec(event).expect("the SDK serializes");
        let ours = crate::event::to_json_vec(event).expect("ours serializes");
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&sdk)
        );
    }

    #[test]
    fn events_are_written_as_the_sdk_writes_them() {
        use cloudevents::event::EventBuilderV03;
        let leap = DateTime::from_timestamp(1_483_228_799, 1_500_000_000).expect("leap second");
        let far = DateTime::from_timestamp(-70_000_000_000, 120_000).expect("a far year");
        let full = EventBuilderV10::new()
            .id("1\"\n")
            .ty("t")
            .source("/s")
            .subject("sub\u{1}")
            .time(leap)
            .extension("partitionkey", "k")
            .extension("n", -7_i64)
            .extension("flag", false)
            .data_with_schema(
                "application/json",
                Url::parse("https://example.com/s.json").expect("url"),
                json!({"a": [1, 2.5, null, true], "b": "é\n\"", "c": {}}),
            )
            .build()
            .expect("valid event");
        let mut far_text = full.clone();
        far_text.set_time(Some(far));
        far_text.set_data("text/plain", Data::String("x".repeat(100) + "\t"));
        // Left to the SDK: binary data and spec version 0.3.
        let binary = EventBuilderV10::new()
            .id("1")
            .ty("t")
            .source("/s")
            .data("application/octet-stream", Data::Binary(vec![0, 255]))
            .build()
            .expect("valid event");
        let old = EventBuilderV03::new()
            .id("1")
            .ty("t")
            .source("/s")
            .build()
            .expect("valid event");
        let bare = EventBuilderV10::new()
            .id("1")
            .ty("t")
            .source("/s")
            .build()
            .expect("valid event");
        for event in [full, far_text, binary, old, bare] {
            written_as_the_sdk_writes(&event);
        }
    }

    proptest! {
        #[test]
        fn any_event_is_written_as_the_sdk_writes_it(
            mut event in arb_event(),
            time in proptest::option::of((-70_000_000_000_i64..250_000_000_000, 0_u32..1_000_000_000)),
            schema in proptest::option::of("[a-z]{1,8}"),
        ) {
            if let Some((secs, nanos)) = time {
                // Whole seconds, milli-, micro- and nanoseconds.
                let nanos = [0, nanos / 1_000_000 * 1_000_000, nanos / 1000 * 1000, nanos][nanos as usize % 4];
                event.set_time(DateTime::from_timestamp(secs, nanos));
            }
            if let Some(path) = schema {
                let url = Url::parse(&format!("https://example.com/{path}.json")).expect("url");
                event.set_dataschema(Some(url));
            }
            written_as_the_sdk_writes(&event);
        }
    }
}
