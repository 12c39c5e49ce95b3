//! Records copied out of librdkafka by the consumer's pump, to be decoded on
//! another task.
//!
//! The pump copies each record's headers, key and payload into one batch:
//! all bytes in one buffer, header names in one string, and the places of
//! each in two lists. A batch is reused once decoded, so in steady state
//! handing records over allocates nothing.

use std::ops::Range;

use rdkafka::Message;
use rdkafka::message::Headers as _;

/// Batches whose buffers grew past this are dropped rather than reused.
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
    payload: Range<usize>,
    headers: Range<usize>,
}

/// One header's name (in `names`) and value (in `bytes`).
#[derive(Debug)]
struct RawHeader {
    name: Range<usize>,
    value: Option<Range<usize>>,
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
    pub(super) fn push<M: Message>(&mut self, message: &M, epoch: u64) {
        let first = self.headers.len();
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                let start = self.names.len();
                self.names.push_str(header.key);
                let name = start..self.names.len();
                let value = header.value.map(|v| self.put(v));
                self.headers.push(RawHeader { name, value });
            }
        }
        let key = message.key().map(|k| self.put(k));
        let payload = self.put(message.payload().unwrap_or_default());
        self.records.push(RawRecord {
            partition: message.partition(),
            offset: message.offset(),
            epoch,
            key,
            payload,
            headers: first..self.headers.len(),
        });
    }

    fn put(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    /// The records, in arrival order.
    pub(super) fn records(&self) -> &[RawRecord] {
        &self.records
    }

    /// `record`'s key.
    pub(super) fn key(&self, record: &RawRecord) -> Option<&[u8]> {
        record.key.clone().map(|k| &self.bytes[k])
    }

    /// `record`'s payload (empty when it had none).
    pub(super) fn payload(&self, record: &RawRecord) -> &[u8] {
        &self.bytes[record.payload.clone()]
    }

    /// `record`'s headers, in their order on the record.
    pub(super) fn headers<'b>(
        &'b self,
        record: &RawRecord,
    ) -> impl Iterator<Item = (&'b str, Option<&'b [u8]>)> + 'b {
        self.headers[record.headers.clone()].iter().map(|h| {
            (
                &self.names[h.name.clone()],
                h.value.clone().map(|v| &self.bytes[v]),
            )
        })
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
        assert_eq!(batch.records().len(), 3);

        let [a, b, c] = batch.records() else {
            panic!("three records");
        };
        assert_eq!((a.partition, a.offset, a.epoch), (3, 7, 0));
        assert_eq!(batch.payload(a), b"{\"a\":1}");
        assert_eq!(batch.key(a), Some(&b"k1"[..]));
        assert_eq!(batch.headers(a).collect::<Vec<_>>(), first);

        assert_eq!((b.offset, b.epoch), (8, 2));
        assert_eq!(batch.payload(b), b"");
        assert_eq!(batch.key(b), None);
        assert_eq!(batch.headers(b).count(), 0);

        assert_eq!(batch.payload(c), b"x");
        assert_eq!(batch.key(c), Some(&b""[..]), "an empty key is not no key");
        assert_eq!(
            batch.headers(c).collect::<Vec<_>>(),
            [("h", Some(&b"v"[..]))]
        );
    }

    #[test]
    fn a_recycled_batch_is_empty_and_a_huge_one_is_dropped() {
        let mut batch = RawBatch::default();
        batch.push(&message(Some(b"p"), Some(b"k"), &[("h", Some(b"v"))], 1), 0);
        let batch = batch.recycle().expect("small batches are kept");
        assert!(batch.records().is_empty());
        assert!(batch.headers.is_empty() && batch.bytes.is_empty() && batch.names.is_empty());

        let mut huge = RawBatch::default();
        huge.push(&message(Some(&vec![0; KEEP_BYTES + 1]), None, &[], 1), 0);
        assert!(huge.recycle().is_none());
    }
}
