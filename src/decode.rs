//! Decode: a Kinesis record's bytes into the logical records rules see.
//!
//! A KPL aggregate (magic bytes, protobuf, MD5) becomes its sub-records, each with its
//! sub-sequence number; sub-records whose explicit hash key falls outside the shard's range
//! are delivered all the same (dropping them loses requests). A gzip or zlib payload is
//! inflated, up to a hard limit. A malformed aggregate or a payload that inflates past the
//! limit is an error: the pipeline dead-letters the record, it is never dropped.
//!
//! `record.data` is built only when some rule needs it ([`rule_data`]): JSON payloads become
//! JSON values, UTF-8 text that is not JSON stays a string, anything else is a BLOB.

use std::io::Read;
use std::sync::Arc;

use md5::{Digest, Md5};
use prost::bytes::Bytes;
use prost::Message;
use rhai::Dynamic;
use serde_json::Value;

use crate::clock::rfc3339;
use crate::source::RawRecord;

/// The logical records of one Kinesis record: one, unless it is a KPL aggregate (kept
/// inline, so the common case allocates nothing for the list).
pub type Records = smallvec::SmallVec<[Record; 1]>;

/// One logical record.
///
/// What all records of a shard, or of one Kinesis record, have in common is shared, not
/// copied: the hot path makes no string per record.
#[derive(Debug, Clone)]
pub struct Record {
    pub stream: Arc<str>,
    pub shard_id: Arc<str>,
    pub sequence_number: Arc<str>,
    /// Position inside a KPL aggregate; 0 when the record was not aggregated.
    pub sub_sequence_number: u64,
    pub partition_key: Arc<str>,
    /// RFC 3339 UTC.
    pub arrival_time: Arc<str>,
    /// The decoded payload: what the prefilter searches and `record.data` is made from.
    pub bytes: Bytes,
}

/// A record written as JSON: test cases, captured records (`capture`) and `preview` input.
///
/// The payload is `data` (a JSON value; the bytes are its compact JSON), or `data_text`
/// (the payload's exact text, JSON or not), or `data_hex` (anything else). `data_base64`,
/// when present, holds the exact bytes and wins over the others: `capture` writes it beside
/// the readable view, so a preview on captured traffic searches and decodes the very bytes
/// the daemon saw (`"type": "x"` with a space, `\/`, `\u` escapes), not a re-serialization.
/// Left-out fields get the defaults of a test case.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordJson {
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "base64_bytes"
    )]
    pub data_base64: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_hex: Option<String>,
    #[serde(default)]
    pub partition_key: String,
    #[serde(default = "default_sequence_number")]
    pub sequence_number: String,
    #[serde(default)]
    pub sub_sequence_number: u64,
    #[serde(default = "default_shard_id")]
    pub shard_id: String,
    #[serde(default = "default_arrival_time")]
    pub arrival_time: String,
    #[serde(default = "default_stream")]
    pub stream: String,
}

fn default_sequence_number() -> String {
    "0".into()
}
fn default_shard_id() -> String {
    "shardId-000000000000".into()
}
fn default_arrival_time() -> String {
    rfc3339(0)
}
fn default_stream() -> String {
    "test".into()
}

impl Record {
    /// A Kinesis record taken as it came, without decoding it.
    pub fn undecoded(stream: &Arc<str>, shard_id: &Arc<str>, raw: RawRecord) -> Record {
        Record {
            stream: stream.clone(),
            shard_id: shard_id.clone(),
            arrival_time: rfc3339(raw.arrival_time_millis).into(),
            sequence_number: raw.sequence_number,
            sub_sequence_number: 0,
            partition_key: raw.partition_key.into(),
            bytes: raw.data.into(),
        }
    }
}

/// `data_base64`: standard base64 in the JSON, bytes in memory; bad base64 is an error of
/// the line that holds it.
mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(bytes) => s.serialize_str(&STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => STANDARD
                .decode(text)
                .map(Some)
                .map_err(|e| serde::de::Error::custom(format!("data_base64: {e}"))),
            None => Ok(None),
        }
    }
}

impl RecordJson {
    pub fn into_record(self) -> Record {
        let bytes = match (self.data_base64, self.data_text, self.data_hex) {
            (Some(bytes), _, _) => bytes,
            (None, Some(text), _) => text.into_bytes(),
            (None, None, Some(hex)) => hex::decode(hex).unwrap_or_default(),
            (None, None, None) => serde_json::to_vec(&self.data).unwrap_or_default(),
        };
        Record {
            stream: self.stream.into(),
            shard_id: self.shard_id.into(),
            sequence_number: self.sequence_number.into(),
            sub_sequence_number: self.sub_sequence_number,
            partition_key: self.partition_key.into(),
            arrival_time: self.arrival_time.into(),
            bytes: bytes.into(),
        }
    }

    /// The record as `capture` writes it: the exact bytes, and a view to read.
    pub fn from_record(record: &Record) -> Self {
        let (data, data_text, data_hex) = match serde_json::from_slice::<Value>(&record.bytes) {
            Ok(value) => (value, None, None),
            Err(_) => match std::str::from_utf8(&record.bytes) {
                Ok(text) => (Value::Null, Some(text.to_owned()), None),
                Err(_) => (Value::Null, None, Some(hex::encode(&record.bytes))),
            },
        };
        Self {
            data,
            data_base64: Some(record.bytes.to_vec()),
            data_text,
            data_hex,
            partition_key: record.partition_key.to_string(),
            sequence_number: record.sequence_number.to_string(),
            sub_sequence_number: record.sub_sequence_number,
            shard_id: record.shard_id.to_string(),
            arrival_time: record.arrival_time.to_string(),
            stream: record.stream.to_string(),
        }
    }
}

/// A file of records as JSON lines that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {message}", path = path.display())]
pub struct InputError {
    pub path: std::path::PathBuf,
    pub line: usize,
    pub message: String,
}

/// Reads records written as JSON lines (blank lines skipped), each with its line number.
pub fn read_json_lines(path: &std::path::Path) -> Result<Vec<(usize, Record)>, InputError> {
    let err = |line, message: String| InputError {
        path: path.to_owned(),
        line,
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(0, e.to_string()))?;
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: RecordJson =
            serde_json::from_str(line).map_err(|e| err(index + 1, format!("not a record: {e}")))?;
        records.push((index + 1, record.into_record()));
    }
    Ok(records)
}

const KPL_MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// The most bytes a compressed payload may inflate to.
pub const MAX_INFLATED: usize = 32 << 20;

/// The KPL's protobuf messages (proto2).
#[derive(Clone, PartialEq, Message)]
pub struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<SubRecord>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SubRecord {
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "bytes", required, tag = "3")]
    pub data: Bytes,
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Tag {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// Why a record could not be decoded, naming it.
#[derive(Debug, thiserror::Error)]
#[error("shard {shard_id}, sequence number {sequence_number}: {reason}")]
pub struct DecodeError {
    pub shard_id: String,
    pub sequence_number: String,
    pub reason: String,
}

/// Builds a KPL aggregate (what the Kinesis Producer Library writes): for tests and the demo.
pub fn aggregate(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut keys: Vec<String> = Vec::new();
    let mut subs = Vec::new();
    for (key, data) in records {
        let index = keys.iter().position(|k| k == key).unwrap_or_else(|| {
            keys.push((*key).to_owned());
            keys.len() - 1
        });
        subs.push(SubRecord {
            partition_key_index: index as u64,
            explicit_hash_key_index: None,
            data: data.to_vec().into(),
            tags: Vec::new(),
        });
    }
    let body = AggregatedRecord {
        partition_key_table: keys,
        explicit_hash_key_table: Vec::new(),
        records: subs,
    }
    .encode_to_vec();
    let mut out = KPL_MAGIC.to_vec();
    out.extend(&body);
    out.extend(Md5::digest(&body));
    out
}

/// A record that cannot be decoded, given back whole (it is dead-lettered as it came).
#[derive(Debug)]
pub struct Undecodable {
    pub error: DecodeError,
    pub raw: RawRecord,
}

/// Decodes one record read from a shard into the logical records it carries. Payloads move
/// on without a copy unless they are inflated.
pub fn decode(
    stream: &Arc<str>,
    shard_id: &Arc<str>,
    mut raw: RawRecord,
) -> Result<Records, Box<Undecodable>> {
    let fail = |raw: RawRecord, reason: String| {
        Box::new(Undecodable {
            error: DecodeError {
                shard_id: shard_id.to_string(),
                sequence_number: raw.sequence_number.to_string(),
                reason,
            },
            raw,
        })
    };
    // Made once per Kinesis record, shared by its sub-records.
    let arrival_time: Arc<str> = rfc3339(raw.arrival_time_millis).into();
    let sequence_number = raw.sequence_number.clone();
    let record = |sub_sequence_number: u64, partition_key: Arc<str>, bytes: Bytes| Record {
        stream: stream.clone(),
        shard_id: shard_id.clone(),
        sequence_number: sequence_number.clone(),
        sub_sequence_number,
        partition_key,
        arrival_time: arrival_time.clone(),
        bytes,
    };
    if !raw.data.starts_with(&KPL_MAGIC) {
        return match inflate(&raw.data) {
            Ok(inflated) => {
                let bytes = inflated.unwrap_or_else(|| std::mem::take(&mut raw.data));
                let key = std::mem::take(&mut raw.partition_key);
                Ok(smallvec::smallvec![record(0, key.into(), bytes.into())])
            }
            Err(reason) => Err(fail(raw, reason)),
        };
    }
    // Sub-records are slices of the aggregate's bytes, not copies.
    let data = Bytes::from(std::mem::take(&mut raw.data));
    let restore = |mut raw: RawRecord, data: &Bytes| {
        raw.data = data.to_vec();
        raw
    };
    let aggregate = match de_aggregate(data.slice(KPL_MAGIC.len()..)) {
        Ok(aggregate) => aggregate,
        Err(reason) => {
            let reason = format!("malformed KPL aggregate: {reason}");
            return Err(fail(restore(raw, &data), reason));
        }
    };
    let keys: Vec<Arc<str>> = aggregate
        .partition_key_table
        .into_iter()
        .map(Arc::from)
        .collect();
    let mut records = Records::with_capacity(aggregate.records.len());
    for (index, sub) in aggregate.records.into_iter().enumerate() {
        let Some(key) = keys.get(sub.partition_key_index as usize) else {
            let reason = format!(
                "malformed KPL aggregate: sub-record {index} names partition key {} of {}",
                sub.partition_key_index,
                keys.len()
            );
            return Err(fail(restore(raw, &data), reason));
        };
        let bytes = match inflate(&sub.data) {
            Ok(inflated) => inflated.map_or(sub.data, Bytes::from),
            Err(reason) => return Err(fail(restore(raw, &data), reason)),
        };
        records.push(record(index as u64, key.clone(), bytes));
    }
    Ok(records)
}

/// Checks an aggregate's MD5 and parses its protobuf.
fn de_aggregate(body: Bytes) -> Result<AggregatedRecord, String> {
    if body.len() < 16 {
        return Err("too short for its MD5".into());
    }
    let message = body.slice(..body.len() - 16);
    if Md5::digest(&message).as_slice() != &body[body.len() - 16..] {
        return Err("MD5 mismatch".into());
    }
    AggregatedRecord::decode(message).map_err(|e| e.to_string())
}

/// Inflates a gzip or zlib payload (told by its magic bytes), up to [`MAX_INFLATED`];
/// `None` when it is not compressed. A payload that only looks compressed (plain text
/// starting `x^`) is taken as not compressed.
fn inflate(data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let gzip = data.starts_with(&[0x1f, 0x8b]);
    let zlib = data.len() >= 2
        && data[0] & 0x0f == 8
        && data[0] >> 4 <= 7
        && (u16::from(data[0]) << 8 | u16::from(data[1])) % 31 == 0;
    if !gzip && !zlib {
        return Ok(None);
    }
    // `bufread` decoders read the slice in place (no 32 KiB buffer per record).
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::bufread::MultiGzDecoder::new(data))
    } else {
        Box::new(flate2::bufread::ZlibDecoder::new(data))
    };
    // A gzip member ends with its inflated size (modulo 4 GiB), so the output is allocated
    // once; believed only up to deflate's largest ratio (1032:1). A zlib stream does not
    // say: four times its size is a guess.
    let expected = match data {
        [.., a, b, c, d] if gzip && data.len() >= 18 => {
            (u32::from_le_bytes([*a, *b, *c, *d]) as usize).min(data.len() * 1032)
        }
        _ => data.len() * 4,
    };
    let mut out = Vec::with_capacity(expected.min(MAX_INFLATED));
    match reader.take(MAX_INFLATED as u64 + 1).read_to_end(&mut out) {
        Ok(_) if out.len() > MAX_INFLATED => Err(format!(
            "the {} payload inflates past {} MiB (a decompression bomb?)",
            if gzip { "gzip" } else { "zlib" },
            MAX_INFLATED >> 20
        )),
        Ok(_) => Ok(Some(out)),
        Err(_) => Ok(None),
    }
}

/// The payload as a rule's `record.data`: JSON (null reads as `()`), else text, else a BLOB.
pub fn rule_data(bytes: &[u8]) -> Dynamic {
    if let Ok(value) = serde_json::from_slice::<Dynamic>(bytes) {
        return value;
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => text.into(),
        Err(_) => Dynamic::from_blob(bytes.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn raw(data: Vec<u8>) -> RawRecord {
        RawRecord {
            sequence_number: "7".into(),
            partition_key: "pk".into(),
            arrival_time_millis: 0,
            data,
        }
    }

    /// The aggregates the real KPL wrote, with the sub-records they must yield.
    #[test]
    fn kpl_fixtures_decode_to_their_sub_records() {
        use base64::Engine as _;
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/kpl_records.json"
        ))
        .unwrap();
        let fixtures: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = fixtures["cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let data = base64::engine::general_purpose::STANDARD
                .decode(case["data_base64"].as_str().unwrap())
                .unwrap();
            let raw = RawRecord {
                sequence_number: case["sequence_number"].as_str().unwrap().into(),
                partition_key: case["partition_key"].as_str().unwrap().into(),
                arrival_time_millis: 0,
                data,
            };
            let decoded = decode(
                &"s".into(),
                &case["shard_id"].as_str().unwrap().into(),
                raw.clone(),
            );
            let Some(expect) = case["expect"].as_array() else {
                // A damaged aggregate: an error (the pipeline dead-letters it), not silence.
                let err = decoded.unwrap_err().error;
                assert!(err.to_string().contains("MD5"), "{}: {err}", case["name"]);
                continue;
            };
            let records = decoded.unwrap();
            assert_eq!(records.len(), expect.len(), "{}", case["name"]);
            for (record, want) in records.iter().zip(expect) {
                assert_eq!(
                    record.sub_sequence_number,
                    want["sub_sequence_number"].as_u64().unwrap_or(0)
                );
                assert_eq!(
                    record.partition_key,
                    want["partition_key"].as_str().unwrap().into()
                );
                assert_eq!(
                    String::from_utf8_lossy(&record.bytes),
                    want["data"].as_str().unwrap()
                );
                assert_eq!(record.sequence_number, raw.sequence_number);
            }
        }
    }

    #[test]
    fn malformed_aggregates_are_errors_not_silence() {
        let mut good = aggregate(&[("a", b"one"), ("b", b"two")]);
        assert_eq!(
            decode(&"s".into(), &"sh".into(), raw(good.clone()))
                .unwrap()
                .len(),
            2
        );
        let last = good.len() - 1;
        good[last] ^= 1;
        let err = decode(&"s".into(), &"sh".into(), raw(good))
            .unwrap_err()
            .error;
        assert!(
            err.to_string().contains("MD5") && err.to_string().contains("sequence number 7"),
            "{err}"
        );
        // A sub-record pointing past the partition key table.
        let body = AggregatedRecord {
            partition_key_table: vec!["a".into()],
            explicit_hash_key_table: vec![],
            records: vec![SubRecord {
                partition_key_index: 3,
                explicit_hash_key_index: None,
                data: b"x".to_vec().into(),
                tags: vec![],
            }],
        }
        .encode_to_vec();
        let mut bad = KPL_MAGIC.to_vec();
        bad.extend(&body);
        bad.extend(Md5::digest(&body));
        assert!(decode(&"s".into(), &"sh".into(), raw(bad))
            .unwrap_err()
            .error
            .to_string()
            .contains("partition key 3"));
    }

    #[test]
    fn gzip_and_zlib_are_inflated_and_bombs_refused() {
        let json = br#"{"type":"privacy_request"}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(json).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(
            decode(&"s".into(), &"sh".into(), raw(gz)).unwrap()[0].bytes,
            &json[..]
        );
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(json).unwrap();
        assert_eq!(
            decode(&"s".into(), &"sh".into(), raw(z.finish().unwrap())).unwrap()[0].bytes,
            &json[..]
        );
        // Text that merely starts like a zlib header stays as it is.
        assert_eq!(
            decode(&"s".into(), &"sh".into(), raw(b"x^2 + y".to_vec())).unwrap()[0].bytes,
            &b"x^2 + y"[..]
        );
        // 64 MiB of zeros in a few dozen KiB.
        let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        for _ in 0..64 {
            bomb.write_all(&vec![0u8; 1 << 20]).unwrap();
        }
        let bomb = bomb.finish().unwrap();
        assert!(bomb.len() < 1 << 20);
        assert!(decode(&"s".into(), &"sh".into(), raw(bomb))
            .unwrap_err()
            .error
            .to_string()
            .contains("decompression bomb"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever the bytes, decoding answers (records or an error) and never panics.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), kpl in proptest::prelude::any::<bool>()) {
            let mut bytes = if kpl { KPL_MAGIC.to_vec() } else { Vec::new() };
            bytes.extend(data);
            let _ = decode(&"s".into(), &"sh".into(), raw(bytes));
        }

        /// Any list of sub-records survives aggregation and de-aggregation, in order.
        #[test]
        fn aggregates_round_trip(subs in proptest::collection::vec(("[a-z]{1,4}", proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)), 1..20)) {
            let input: Vec<(&str, &[u8])> = subs.iter().map(|(k, d)| (k.as_str(), d.as_slice())).collect();
            let records = decode(&"s".into(), &"sh".into(), raw(aggregate(&input))).unwrap();
            proptest::prop_assert_eq!(records.len(), subs.len());
            for (i, (record, (key, _))) in records.iter().zip(&subs).enumerate() {
                proptest::prop_assert_eq!(record.sub_sequence_number, i as u64);
                proptest::prop_assert_eq!(&*record.partition_key, key.as_str());
            }
        }
    }

    #[test]
    fn json_text_and_binary() {
        let json = rule_data(br#"{"type":"x","n":null,"big":18446744073709551615}"#);
        let map = json.cast::<rhai::Map>();
        assert_eq!(map["type"].clone().into_string().unwrap(), "x");
        assert!(map["n"].is_unit());
        assert!(map["big"].is_float());
        assert_eq!(
            rule_data(b"GET /index.html 200").into_string().unwrap(),
            "GET /index.html 200"
        );
        assert!(rule_data(&[0xff, 0x00]).is_blob());
        assert!(rule_data(b"null").is_unit());
    }

    #[test]
    fn records_round_trip_through_json() {
        for bytes in [
            &br#"{"a":[1,"x"]}"#[..],
            b"plain text line",
            &[0xff, 0x00, 0x01],
        ] {
            let record = RecordJson {
                data: Value::Null,
                data_base64: None,
                data_text: None,
                data_hex: Some(hex::encode(bytes)),
                ..serde_json::from_str("{}").unwrap()
            }
            .into_record();
            let back = RecordJson::from_record(&record).into_record();
            assert_eq!(back.bytes, bytes);
        }
    }

    #[test]
    fn captured_records_keep_their_exact_bytes() {
        // As Python and PHP write it: spaces, an escaped slash. Its parsed view re-serializes
        // differently, so only the kept bytes give back what the daemon saw.
        let bytes = br#"{"type": "privacy_request", "url": "https:\/\/x"}"#;
        let record = RecordJson {
            data_text: Some(String::from_utf8(bytes.to_vec()).unwrap()),
            ..serde_json::from_str("{}").unwrap()
        }
        .into_record();
        let line = serde_json::to_string(&RecordJson::from_record(&record)).unwrap();
        assert!(
            line.contains(r#""data":{"type":"privacy_request""#),
            "{line}"
        );
        let back: RecordJson = serde_json::from_str(&line).unwrap();
        assert_eq!(back.into_record().bytes, &bytes[..]);
        // A capture file from before the field still reads, from its parsed view.
        let old: RecordJson = serde_json::from_str(r#"{"data":{"type":"x"}}"#).unwrap();
        assert_eq!(old.into_record().bytes, &br#"{"type":"x"}"#[..]);
        let bad = serde_json::from_str::<RecordJson>(r#"{"data_base64":"***"}"#).unwrap_err();
        assert!(bad.to_string().contains("data_base64"), "{bad}");
    }
}
