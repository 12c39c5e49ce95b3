//! Records copied out of librdkafka by the consumer's pump, to be decoded on
//! another task.
//!
//! The pump copies each record into a batch: its payload into a vector of
//! its own, which becomes the event's data without another copy; its
//! headers and key into buffers the batch's records share (header values
//! and keys in one, header names in one string), with the places of each in
//! two lists. A batch is reused once decoded.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};

use rdkafka::Message;
use rdkafka::message::Headers as _;

/// Batches whose shared buffer grew past this are dropped rather than reused.
const KEEP_BYTES: usize = 8 * 1024 * 1024;

/// One record's place in its batch.
#[derive(Debug)]
pub(super) struct RawRecord {
    pub(super) partition: i32,
    pub(super) offset: i64,
    /// The pump's assignment epoch when the record was received: a record
    /// from before its partition was last assigned is stale.
    pub(super) epoch: u64,
    key: Option<Range<usize>>,
    headers: Range<usize>,
    /// The record has headers that could not be read (a name that is not
    /// UTF-8); none of them were kept.
    pub(super) headers_unreadable: bool,
    /// Taken by the event it decodes into; left for a dead letter.
    pub(super) payload: Vec<u8>,
}

/// One header's name (in `names`) and value (in `bytes`).
#[derive(Debug)]
struct RawHeader {
    name: Range<usize>,
    value: Option<Range<usize>>,
}

/// The headers and keys of a batch's records.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawView<'b> {
    headers: &'b [RawHeader],
    bytes: &'b [u8],
    names: &'b str,
}

impl<'b> RawView<'b> {
    /// `record`'s key.
    pub(super) fn key(&self, record: &RawRecord) -> Option<&'b [u8]> {
        record.key.clone().map(|k| &self.bytes[k])
    }

    /// `record`'s headers, in their order on the record.
    pub(super) fn headers(
        &self,
        record: &RawRecord,
    ) -> impl Iterator<Item = (&'b str, Option<&'b [u8]>)> + use<'b> {
        let (names, bytes) = (self.names, self.bytes);
        self.headers[record.headers.clone()]
            .iter()
            .map(move |h| (&names[h.name.clone()], h.value.clone().map(|v| &bytes[v])))
    }
}

/// Records received in one go, in arrival order.
#[derive(Debug, Default)]
pub(super) struct RawBatch {
    records: Vec<RawRecord>,
    headers: Vec<RawHeader>,
    bytes: Vec<u8>,
    names: String,
}

impl RawBatch {
    /// Copies `message` in, received at assignment `epoch`.
    ///
    /// rdkafka panics on a header name that is not UTF-8 (its `Headers`
    /// accessors unwrap the name's conversion), so a record from a producer
    /// that writes one would take the consumer down. Such a record is kept
    /// without headers and marked, for the decoder to dead-letter; the
    /// panic's message still reaches the panic hook (stderr by default).
    pub(super) fn push<M: Message>(&mut self, message: &M, epoch: u64) {
        let first = self.headers.len();
        let (names, bytes) = (self.names.len(), self.bytes.len());
        let mut headers_unreadable = false;
        if let Some(headers) = message.headers() {
            let read = catch_unwind(AssertUnwindSafe(|| {
                for header in headers.iter() {
                    let start = self.names.len();
                    self.names.push_str(header.key);
                    let name = start..self.names.len();
                    let value = header.value.map(|v| self.put(v));
                    self.headers.push(RawHeader { name, value });
                }
            }));
            if read.is_err() {
                self.headers.truncate(first);
                self.names.truncate(names);
                self.bytes.truncate(bytes);
                headers_unreadable = true;
            }
        }
        let key = message.key().map(|k| self.put(k));
        self.records.push(RawRecord {
            partition: message.partition(),
            offset: message.offset(),
            epoch,
            key,
            headers: first..self.headers.len(),
            headers_unreadable,
            payload: message.payload().unwrap_or_default().to_vec(),
        });
    }

    fn put(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    /// How many records the batch holds.
    pub(super) fn len(&self) -> usize {
        self.records.len()
    }

    /// The records, in arrival order, beside what they share.
    pub(super) fn split(&mut self) -> (&mut [RawRecord], RawView<'_>) {
        let view = RawView {
            headers: &self.headers,
            bytes: &self.bytes,
            names: &self.names,
        };
        (&mut self.records, view)
    }

    /// Empties the batch for reuse; `None` when it grew too large to keep.
    pub(super) fn recycle(mut self) -> Option<Self> {
        if self.bytes.capacity() > KEEP_BYTES {
            return None;
        }
        self.records.clear();
        self.headers.clear();
        self.bytes.clear();
        self.names.clear();
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};

    use super::*;

    fn message(
        payload: Option<&[u8]>,
        key: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        offset: i64,
    ) -> OwnedMessage {
        let headers = (!headers.is_empty()).then(|| {
            headers
                .iter()
                .fold(OwnedHeaders::new(), |all, (key, value)| {
                    all.insert(Header { key, value: *value })
                })
        });
        OwnedMessage::new(
            payload.map(<[u8]>::to_vec),
            key.map(<[u8]>::to_vec),
            "t".into(),
            Timestamp::NotAvailable,
            3,
            offset,
            headers,
        )
    }

    #[test]
    fn each_record_reads_back_as_it_was_received() {
        let mut batch = RawBatch::default();
        let first: &[(&str, Option<&[u8]>)] = &[
            ("ce_id", Some(b"1")),
            ("empty", Some(b"")),
            ("null", None),
            ("ce_id", Some(b"dup")),
        ];
        batch.push(&message(Some(b"{\"a\":1}"), Some(b"k1"), first, 7), 0);
        batch.push(&message(None, None, &[], 8), 2);
        batch.push(&message(Some(b"x"), Some(b""), &[("h", Some(b"v"))], 9), 2);

        let (records, view) = batch.split();
        let [a, b, c] = records else {
            panic!("three records");
        };
        assert_eq!((a.partition, a.offset, a.epoch), (3, 7, 0));
        assert_eq!(a.payload, b"{\"a\":1}");
        assert_eq!(view.key(a), Some(&b"k1"[..]));
        assert_eq!(view.headers(a).collect::<Vec<_>>(), first);

        assert_eq!((b.offset, b.epoch), (8, 2));
        assert_eq!(b.payload, b"");
        assert_eq!(view.key(b), None);
        assert_eq!(view.headers(b).count(), 0);

        // A taken payload leaves the rest of the record readable.
        assert_eq!(std::mem::take(&mut c.payload), b"x");
        assert_eq!(view.key(c), Some(&b""[..]), "an empty key is not no key");
        assert_eq!(
            view.headers(c).collect::<Vec<_>>(),
            [("h", Some(&b"v"[..]))]
        );
    }

    #[test]
    fn a_recycled_batch_is_empty_and_a_huge_one_is_dropped() {
        let mut batch = RawBatch::default();
        batch.push(&message(Some(b"p"), Some(b"k"), &[("h", Some(b"v"))], 1), 0);
        let mut batch = batch.recycle().expect("small batches are kept");
        assert!(batch.split().0.is_empty());
        assert!(batch.headers.is_empty() && batch.bytes.is_empty() && batch.names.is_empty());

        let mut huge = RawBatch::default();
        huge.push(&message(None, Some(&vec![0; KEEP_BYTES + 1]), &[], 1), 0);
        assert!(huge.recycle().is_none());
    }
}
