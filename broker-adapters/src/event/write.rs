//! Writing JSON byte for byte as `serde_json` writes it: data
//! (`serde_json::Value`), and whole events in the CloudEvents JSON format
//! (the SDK's `Serialize for Event`), with strings scanned eight bytes at a
//! time.
//!
//! `serde_json` looks every byte of a string up in its escape table. For the
//! kilobyte of text a typical event carries, that loop was most of
//! serializing its data, and data is serialized for every binary-mode
//! message, every outbox row and every size check. Here a string is tested
//! a 64-bit word at a time for the bytes that need escaping (controls below
//! 0x20, `"` and `\`) and copied in runs; a word that holds one is escaped
//! byte by byte, with `serde_json`'s escapes. Numbers are written by
//! `serde_json` itself, so their format is its own under any of its features.

use cloudevents::event::{Data, ExtensionValue, SpecVersion};
use cloudevents::{AttributesReader as _, Event};
use serde_json::{Number, Value};

/// Appends `event` in the JSON event format, exactly as
/// `serde_json::to_vec(event)` writes it, and returns `true`; or writes
/// nothing and returns `false` for what is left to the SDK: an event of
/// spec version 0.3, or binary data (written as `data_base64`).
pub(super) fn write_event(out: &mut Vec<u8>, event: &Event) -> bool {
    if event.specversion() != SpecVersion::V10 || matches!(event.data(), Some(Data::Binary(_))) {
        return false;
    }
    // The SDK's order: the required attributes, the optional ones, the
    // data, then the extensions in the order of the event's map.
    out.extend_from_slice(br#"{"specversion":"1.0","id":"#);
    write_str(out, event.id());
    out.extend_from_slice(br#","type":"#);
    write_str(out, event.ty());
    out.extend_from_slice(br#","source":"#);
    write_str(out, event.source());
    let optional: [(&[u8], Option<&str>); 3] = [
        (br#","datacontenttype":"#, event.datacontenttype()),
        (
            br#","dataschema":"#,
            event.dataschema().map(url::Url::as_str),
        ),
        (br#","subject":"#, event.subject()),
    ];
    for (member, value) in optional {
        if let Some(value) = value {
            out.extend_from_slice(member);
            write_str(out, value);
        }
    }
    if let Some(time) = event.time() {
        let mut text = String::with_capacity(40);
        super::write_rfc3339(time, &mut text);
        out.extend_from_slice(br#","time":"#);
        // chrono's serde form: its RFC 3339 text, with `Z` for UTC.
        match text.strip_suffix("+00:00") {
            Some(head) => {
                out.push(b'"');
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(br#"Z""#);
            }
            None => write_str(out, &text),
        }
    }
    match event.data() {
        Some(Data::Json(value)) => {
            out.extend_from_slice(br#","data":"#);
            write_value(out, value);
        }
        Some(Data::String(text)) => {
            out.extend_from_slice(br#","data":"#);
            write_str(out, text);
        }
        Some(Data::Binary(_)) | None => {}
    }
    for (name, value) in event.iter_extensions() {
        out.push(b',');
        write_str(out, name);
        out.push(b':');
        match value {
            ExtensionValue::String(text) => write_str(out, text),
            ExtensionValue::Boolean(true) => out.extend_from_slice(b"true"),
            ExtensionValue::Boolean(false) => out.extend_from_slice(b"false"),
            ExtensionValue::Integer(n) => write_number(out, &Number::from(*n)),
        }
    }
    out.push(b'}');
    true
}

/// Appends `value` to `out` as compact JSON, exactly as `serde_json` writes it.
pub(super) fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, key);
                out.push(b':');
                write_value(out, item);
            }
            out.push(b'}');
        }
    }
}

/// The length of `value` as [`write_value`] writes it, without writing it.
pub(super) fn value_len(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(true) => 4,
        Value::Bool(false) => 5,
        Value::Number(n) => {
            let mut counter = super::ByteCounter(0);
            match serde_json::to_writer(&mut counter, n) {
                Ok(()) => counter.0,
                Err(_) => usize::MAX,
            }
        }
        Value::String(s) => str_len(s),
        // Brackets, and a comma between items.
        Value::Array(items) => items.iter().fold(items.len().max(1) + 1, |n, item| {
            n.saturating_add(value_len(item))
        }),
        // Braces, a comma between entries, and a colon in each.
        Value::Object(map) => map.iter().fold(map.len().max(1) + 1, |n, (key, item)| {
            n.saturating_add(str_len(key) + 1)
                .saturating_add(value_len(item))
        }),
    }
}

fn write_number(out: &mut Vec<u8>, n: &Number) {
    // Writing into a vector cannot fail.
    if serde_json::to_writer(&mut *out, n).is_err() {
        debug_assert!(false, "a number could not be written");
    }
}

/// Eight copies of `byte`, one per byte of a word.
const fn splat(byte: u8) -> u64 {
    0x0101_0101_0101_0101 * byte as u64
}

/// Whether any byte of `word` needs escaping: one below 0x20, `"` or `\`.
///
/// A byte is below `n` (here 0x20) when subtracting `n` borrows into its
/// top bit while its own top bit was clear; a byte equals `c` when the
/// word XOR `c` has a zero byte, found the same way with `n` = 1. A borrow
/// carried into a higher byte can only start at a byte that matched, so the
/// test is exact about whether any byte matches (not about which).
const fn needs_escape(word: u64) -> bool {
    const HIGH: u64 = splat(0x80);
    const fn below(word: u64, n: u8) -> u64 {
        word.wrapping_sub(splat(n)) & !word & HIGH
    }
    (below(word, 0x20) | below(word ^ splat(b'"'), 1) | below(word ^ splat(b'\\'), 1)) != 0
}

/// What `serde_json` writes in place of `byte`, if anything: a short escape
/// (`\n`), or `u` for `\u00XX`.
const fn escape(byte: u8) -> Option<u8> {
    Some(match byte {
        b'"' => b'"',
        b'\\' => b'\\',
        0x08 => b'b',
        0x09 => b't',
        0x0A => b'n',
        0x0C => b'f',
        0x0D => b'r',
        0x00..=0x1F => b'u',
        _ => return None,
    })
}

fn write_escape(out: &mut Vec<u8>, byte: u8, escape: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    if escape == b'u' {
        out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[usize::from(byte >> 4)],
            HEX[usize::from(byte & 0xF)],
        ]);
    } else {
        out.extend_from_slice(&[b'\\', escape]);
    }
}

/// Calls `found(index, byte, escape)` for each byte of `bytes` that needs
/// escaping, in order; blocks and words without one are skipped whole.
#[inline]
fn each_escape(bytes: &[u8], mut found: impl FnMut(usize, u8, u8)) {
    let mut scan = |from: usize, part: &[u8]| {
        for (i, &byte) in part.iter().enumerate() {
            if let Some(escape) = escape(byte) {
                found(from + i, byte, escape);
            }
        }
    };
    // A word at a time, then the bytes after the last whole word.
    let mut words = |from: usize, part: &[u8]| {
        let chunks = part.chunks_exact(8);
        let tail = chunks.remainder();
        for (w, chunk) in chunks.enumerate() {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            if needs_escape(u64::from_ne_bytes(word)) {
                scan(from + w * 8, chunk);
            }
        }
        scan(from + part.len() - tail.len(), tail);
    };
    // Blocks of 32 bytes are checked with a branch-free fold that the
    // compiler turns into vector compares; a block with something to
    // escape is looked at a word at a time.
    let blocks = bytes.chunks_exact(32);
    let rest = blocks.remainder();
    for (b, block) in blocks.enumerate() {
        let any = block.iter().fold(false, |any, &byte| {
            any | (byte < 0x20) | (byte == b'"') | (byte == b'\\')
        });
        if any {
            words(b * 32, block);
        }
    }
    words(bytes.len() - rest.len(), rest);
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run = 0;
    each_escape(bytes, |i, byte, escape| {
        out.extend_from_slice(&bytes[run..i]);
        write_escape(out, byte, escape);
        run = i + 1;
    });
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

fn str_len(s: &str) -> usize {
    let mut len = s.len() + 2;
    each_escape(s.as_bytes(), |_, _, escape| {
        len += if escape == b'u' { 5 } else { 1 };
    });
    len
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn written(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        write_value(&mut out, value);
        out
    }

    #[test]
    fn writes_what_serde_json_writes() {
        let value = json!({
            "order": "o-1",
            "quote\"back\\slash": "tab\there\nnew\rline\u{8}\u{c}\u{0}\u{1f}\u{7f}é€😀",
            "n": [0, -1, 1.5, 1e300, u64::MAX, i64::MIN, null, true, false],
            "empty": [{}, [], ""],
            "long": "x".repeat(1000) + "\"" + &"y".repeat(7),
        });
        let expected = serde_json::to_vec(&value).expect("json");
        assert_eq!(
            String::from_utf8_lossy(&written(&value)),
            String::from_utf8_lossy(&expected)
        );
        assert_eq!(value_len(&value), expected.len());
    }

    #[test]
    fn finds_an_escape_at_every_position_of_a_block_and_a_word() {
        // Two 32-byte blocks, one word and a tail of five.
        for special in ['"', '\\', '\n', '\u{0}', '\u{1f}'] {
            for at in 0..77 {
                let mut text: String = "a".repeat(77);
                text.replace_range(at..=at, &special.to_string());
                let value = Value::String(text);
                let expected = serde_json::to_vec(&value).expect("json");
                assert_eq!(written(&value), expected, "{special:?} at {at}");
                assert_eq!(value_len(&value), expected.len());
            }
        }
        // Bytes just outside the escaped ranges are copied as they are.
        for byte in [b' ', b'!', b'#', b'[', b']', 0x7F] {
            let value = Value::String(String::from_utf8(vec![byte; 70]).expect("ascii"));
            assert_eq!(written(&value), serde_json::to_vec(&value).expect("json"));
        }
    }

    fn any_value() -> impl Strategy<Value = Value> {
        // Strings rich in what needs escaping, beside ordinary text.
        let text = prop_oneof![
            any::<String>(),
            proptest::collection::vec(
                prop_oneof![
                    Just('"'),
                    Just('\\'),
                    (0u8..0x20).prop_map(char::from),
                    Just('\u{7f}'),
                    Just('é'),
                    Just('😀'),
                    proptest::char::range('a', 'z'),
                ],
                0..40
            )
            .prop_map(|chars| chars.into_iter().collect()),
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            text.clone().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec((text.clone(), inner), 0..8)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_value_is_written_and_counted_as_serde_json_writes_it(value in any_value()) {
            let expected = serde_json::to_vec(&value).expect("json");
            prop_assert_eq!(value_len(&value), expected.len());
            prop_assert_eq!(written(&value), expected);
        }
    }
}
