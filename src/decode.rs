//! Decode: a Kinesis record's bytes into the logical records rules see.
//!
//! A KPL aggregate (magic bytes, protobuf, MD5) becomes its sub-records, each with its
//! sub-sequence number; sub-records whose explicit hash key falls outside the shard's range
//! are delivered all the same (dropping them loses requests). A gzip or zlib payload is
//! inflated (every gzip member), up to a hard limit for the whole Kinesis record. A malformed
//! aggregate, damaged compression, or payloads that inflate past the limit are an error: the
//! pipeline dead-letters the record, it is never dropped, and never taken for "not a request".
//!
//! What rules read of a payload ([`readable`]) is cleaned once, before the prefilter looks, so
//! the prefilter and `record.data` always see the same bytes: a BOM before JSON is dropped,
//! JSON with invalid UTF-8 is repaired (U+FFFD), JSON too deep to parse is flagged.
//! `record.data` is built only when some rule needs it ([`rule_data`]): JSON payloads become
//! JSON values, UTF-8 text that is not JSON stays a string, anything else is a BLOB.

use std::borrow::Cow;
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
    /// Why this sub-record of an aggregate cannot be read (its compression is damaged):
    /// then `bytes` are its payload as written, and it is dead-lettered on its own while
    /// the aggregate's other events go on.
    pub unreadable: Option<Arc<DecodeError>>,
}

/// A record written as JSON: test cases, captured records (`capture`) and `preview` input.
///
/// The payload is `data` (a JSON value; the bytes are its compact JSON), or `data_text`
/// (the payload's exact text, JSON or not), or `data_hex` (anything else). `data_base64`,
/// when present, holds the exact bytes and wins over the others: `capture` writes it beside
/// the readable view, so a preview on captured traffic searches and decodes the very bytes
/// the daemon saw (`"type": "x"` with a space, `\/`, `\u` escapes), not a re-serialization.
/// Left-out fields get the defaults of a test case. Read from JSON, a record whose hex or
/// base64 does not decode, or that gives its payload twice (`data` and `data_text`...), is
/// an error of its line or case, never an empty event.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RecordFields")]
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

/// [`RecordJson`] as written, before it is checked.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFields {
    #[serde(default)]
    data: Value,
    #[serde(default, with = "base64_bytes")]
    data_base64: Option<Vec<u8>>,
    #[serde(default)]
    data_text: Option<String>,
    #[serde(default)]
    data_hex: Option<String>,
    #[serde(default)]
    partition_key: String,
    #[serde(default = "default_sequence_number")]
    sequence_number: String,
    #[serde(default)]
    sub_sequence_number: u64,
    #[serde(default = "default_shard_id")]
    shard_id: String,
    #[serde(default = "default_arrival_time")]
    arrival_time: String,
    #[serde(default = "default_stream")]
    stream: String,
}

impl TryFrom<RecordFields> for RecordJson {
    type Error = String;

    fn try_from(f: RecordFields) -> Result<Self, String> {
        // `data_base64` (the exact bytes) may come with one readable view of them, as
        // `capture` writes it; two views are two payloads.
        let views: Vec<&str> = [
            (!f.data.is_null(), "data"),
            (f.data_text.is_some(), "data_text"),
            (f.data_hex.is_some(), "data_hex"),
        ]
        .into_iter()
        .filter_map(|(given, name)| given.then_some(name))
        .collect();
        if views.len() > 1 {
            return Err(format!(
                "the payload is given twice ({}): which one is the record's is ambiguous; give one",
                views.join(" and ")
            ));
        }
        if let Some(hex) = &f.data_hex {
            hex::decode(hex).map_err(|e| format!("data_hex: {e}"))?;
        }
        Ok(RecordJson {
            data: f.data,
            data_base64: f.data_base64,
            data_text: f.data_text,
            data_hex: f.data_hex,
            partition_key: f.partition_key,
            sequence_number: f.sequence_number,
            sub_sequence_number: f.sub_sequence_number,
            shard_id: f.shard_id,
            arrival_time: f.arrival_time,
            stream: f.stream,
        })
    }
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
            unreadable: None,
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
            // Checked when read from JSON; built in code, it is hex the code encoded.
            (None, None, Some(hex)) => hex::decode(hex).expect("data_hex is checked when read"),
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
            unreadable: None,
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

/// Fields `capture` writes on every line that a plain event has no reason to hold: a line
/// with one of them is a captured record. A payload field (`data`...) does not tell: a
/// plain event may have a `data` field of its own.
const CAPTURE_FIELDS: [&str; 6] = [
    "data_base64",
    "shard_id",
    "sequence_number",
    "sub_sequence_number",
    "partition_key",
    "arrival_time",
];

/// The capture-only field a line holds, if it is a JSON object with one.
fn capture_field(text: &str) -> Option<&'static str> {
    let fields = serde_json::from_str::<serde_json::Map<String, Value>>(text).ok()?;
    CAPTURE_FIELDS
        .into_iter()
        .find(|name| fields.contains_key(*name))
}

fn plain_event(bytes: &[u8]) -> Record {
    RecordJson {
        data_base64: Some(bytes.to_vec()),
        ..serde_json::from_str("{}").expect("every field of a record has a default")
    }
    .into_record()
}

/// One line an operator gives (`rules explain`, the console's playground): a record as
/// `capture` writes it (told by the fields only `capture` writes), or else the line itself
/// as the payload (a plain event, `data` field or not). A line that is not
/// UTF-8 (Latin-1, say) is a plain event whose payload is those bytes, as the daemon would
/// read them; a line that holds a field only `capture` writes (`shard_id`,
/// `data_base64`...) but is not a captured record is an error, not an event.
pub fn event_line(line: &[u8]) -> Result<Record, String> {
    let Ok(text) = std::str::from_utf8(line) else {
        return Ok(plain_event(line));
    };
    let Some(field) = capture_field(text) else {
        return Ok(plain_event(line));
    };
    serde_json::from_str::<RecordJson>(text)
        .map(RecordJson::into_record)
        .map_err(|e| format!("looks like a captured record (it has {field}) but is not one: {e}"))
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
#[derive(Debug, Clone, thiserror::Error)]
#[error("shard {shard_id}, sequence number {sequence_number}: {reason}")]
pub struct DecodeError {
    pub shard_id: String,
    pub sequence_number: String,
    pub kind: Unreadable,
    pub reason: String,
}

/// What is wrong with a record that cannot be read as it claims to be: the `reason` of
/// `undecodable_records_total` and of the log event that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// A KPL aggregate whose MD5 or protobuf is broken.
    MalformedAggregate,
    /// gzip or zlib data that does not inflate (truncated, corrupt, trailing garbage).
    DamagedCompression,
    /// Payloads that inflate past [`MAX_INFLATED`] (a Kinesis record's total).
    InflateLimit,
    /// JSON nested deeper than the parser allows.
    JsonTooDeep,
    /// JSON with bytes that are not UTF-8 (Latin-1, say): read with U+FFFD in their place.
    JsonInvalidUtf8,
    /// Looks like JSON (starts with `{` or `[`) and does not parse: rules get it as text.
    JsonInvalid,
}

impl Unreadable {
    /// Every reason, for counters that start at zero.
    pub const ALL: [Unreadable; 6] = [
        Unreadable::MalformedAggregate,
        Unreadable::DamagedCompression,
        Unreadable::InflateLimit,
        Unreadable::JsonTooDeep,
        Unreadable::JsonInvalidUtf8,
        Unreadable::JsonInvalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Unreadable::MalformedAggregate => "malformed_aggregate",
            Unreadable::DamagedCompression => "damaged_compression",
            Unreadable::InflateLimit => "inflate_limit",
            Unreadable::JsonTooDeep => "json_too_deep",
            Unreadable::JsonInvalidUtf8 => "json_invalid_utf8",
            Unreadable::JsonInvalid => "json_invalid",
        }
    }
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
    let fail = |raw: RawRecord, (kind, reason): (Unreadable, String)| {
        Box::new(Undecodable {
            error: DecodeError {
                shard_id: shard_id.to_string(),
                sequence_number: raw.sequence_number.to_string(),
                kind,
                reason,
            },
            raw,
        })
    };
    // What may still be inflated for this Kinesis record, all sub-records together.
    let mut budget = MAX_INFLATED;
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
        unreadable: None,
    };
    // An aggregate may come compressed too: it is split once inflated.
    let data = match raw.data.starts_with(&KPL_MAGIC) {
        true => Bytes::from(std::mem::take(&mut raw.data)),
        false => match inflate(&raw.data, &mut budget) {
            Ok(Some(inflated)) if inflated.starts_with(&KPL_MAGIC) => Bytes::from(inflated),
            Ok(inflated) => {
                let bytes = inflated.unwrap_or_else(|| std::mem::take(&mut raw.data));
                let key = std::mem::take(&mut raw.partition_key);
                return Ok(smallvec::smallvec![record(0, key.into(), bytes.into())]);
            }
            Err(reason) => return Err(fail(raw, reason)),
        },
    };
    // Sub-records are slices of the aggregate's bytes, not copies.
    let restore = |mut raw: RawRecord, data: &Bytes| {
        raw.data = data.to_vec();
        raw
    };
    let aggregate = match de_aggregate(data.slice(KPL_MAGIC.len()..)) {
        Ok(aggregate) => aggregate,
        Err(reason) => {
            let reason = format!("malformed KPL aggregate: {reason}");
            return Err(fail(
                restore(raw, &data),
                (Unreadable::MalformedAggregate, reason),
            ));
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
            return Err(fail(
                restore(raw, &data),
                (Unreadable::MalformedAggregate, reason),
            ));
        };
        let record = match inflate(&sub.data, &mut budget) {
            Ok(inflated) => record(
                index as u64,
                key.clone(),
                inflated.map_or(sub.data, Bytes::from),
            ),
            // Past the limit, the whole Kinesis record is refused: it is the bound on memory.
            Err((kind @ Unreadable::InflateLimit, reason)) => {
                let reason = format!("sub-record {index}: {reason}");
                return Err(fail(restore(raw, &data), (kind, reason)));
            }
            // One damaged event: a dead letter of its own, the others go on.
            Err((kind, reason)) => Record {
                unreadable: Some(Arc::new(DecodeError {
                    shard_id: shard_id.to_string(),
                    sequence_number: sequence_number.to_string(),
                    kind,
                    reason: format!("sub-record {index}: {reason}"),
                })),
                ..record(index as u64, key.clone(), sub.data)
            },
        };
        records.push(record);
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

/// Inflates a gzip or zlib payload (told by its magic bytes), taking what it inflates to
/// from `budget` (what the Kinesis record may still inflate to); `None` when it is not
/// compressed. Every gzip member is inflated; zero bytes or whitespace after the last one
/// are padding. Data that looks compressed and does not inflate is an error, unless it is
/// UTF-8 text (plain text may start `x^`, a valid zlib header): then it is not compressed.
fn inflate(data: &[u8], budget: &mut usize) -> Result<Option<Vec<u8>>, (Unreadable, String)> {
    let gzip = data.starts_with(&GZIP_MAGIC);
    let zlib = data.len() >= 2
        && data[0] & 0x0f == 8
        && data[0] >> 4 <= 7
        && (u16::from(data[0]) << 8 | u16::from(data[1])) % 31 == 0;
    if !gzip && !zlib {
        return Ok(None);
    }
    let format = if gzip { "gzip" } else { "zlib" };
    // A gzip member ends with its inflated size (modulo 4 GiB), so the output is allocated
    // once; believed only up to deflate's largest ratio (1032:1). A zlib stream does not
    // say: four times its size is a guess. Never more than the budget allows.
    let expected = match data {
        [.., a, b, c, d] if gzip && data.len() >= 18 => {
            (u32::from_le_bytes([*a, *b, *c, *d]) as usize).min(data.len() * 1032)
        }
        _ => data.len() * 4,
    };
    let mut out = Vec::with_capacity(expected.min(*budget + 1));
    let result = if gzip {
        inflate_gzip(data, &mut out, *budget)
    } else {
        // `bufread` decoders read the slice in place (no 32 KiB buffer per record).
        read_within(flate2::bufread::ZlibDecoder::new(data), &mut out, *budget)
    };
    match result {
        Ok(()) if out.len() > *budget => Err((
            Unreadable::InflateLimit,
            format!(
                "the {format} payload inflates past {} MiB for this record (a decompression bomb?)",
                MAX_INFLATED >> 20
            ),
        )),
        Ok(()) => {
            *budget -= out.len();
            Ok(Some(out))
        }
        Err(_) if std::str::from_utf8(data).is_ok() => Ok(None),
        Err(e) => Err((
            Unreadable::DamagedCompression,
            format!("the {format} payload does not inflate: {e}"),
        )),
    }
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Inflates every member of a gzip payload into `out`, stopping once it holds more than
/// `limit` bytes. What follows the last member must be padding (zero bytes, whitespace).
fn inflate_gzip(mut data: &[u8], out: &mut Vec<u8>, limit: usize) -> std::io::Result<()> {
    loop {
        let mut member = flate2::bufread::GzDecoder::new(data);
        read_within(&mut member, out, limit - out.len().min(limit))?;
        if out.len() > limit {
            return Ok(());
        }
        // A `bufread` decoder consumes exactly its member, trailer included.
        data = member.into_inner();
        if data.iter().all(|b| *b == 0 || b.is_ascii_whitespace()) {
            return Ok(());
        }
        if !data.starts_with(&GZIP_MAGIC) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "trailing bytes after the last gzip member",
            ));
        }
    }
}

/// Reads `reader` to its end into `out`, but no more than `limit` bytes past what `out`
/// holds and one more (to tell "at the limit" from "past it").
fn read_within(reader: impl Read, out: &mut Vec<u8>, limit: usize) -> std::io::Result<()> {
    reader.take(limit as u64 + 1).read_to_end(out).map(drop)
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";
/// serde_json refuses JSON nested this deep (its recursion limit).
const JSON_DEPTH_LIMIT: usize = 128;

/// A payload as rules read it: the bytes the prefilter searches and `record.data` is made
/// from, and what was wrong with it, if anything.
#[derive(Debug)]
pub struct Readable<'a> {
    pub bytes: Cow<'a, [u8]>,
    pub fault: Option<Unreadable>,
}

/// Cleans a payload for the rules, cheaply: only a payload that looks like JSON (its first
/// byte past whitespace, or past a UTF-8 BOM, is `{` or `[`) is looked at further, with one
/// pass over its bytes for non-ASCII bytes and opening brackets. A BOM is dropped; invalid
/// UTF-8 is replaced with U+FFFD (only non-ASCII payloads are validated); nesting past the
/// parser's limit is flagged (only payloads with that many opening brackets are parsed to
/// tell). A BOM or a U+FFFD holds no prefilter literal of plain text, and repairing never
/// removes one, so the prefilter sees what the rules see.
pub fn readable(bytes: &[u8]) -> Readable<'_> {
    let text = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
    if !looks_like_json(text) {
        return Readable {
            bytes: Cow::Borrowed(bytes),
            fault: None,
        };
    }
    let (ascii, opening) = scan(text);
    let mut fault = None;
    let text = match ascii || std::str::from_utf8(text).is_ok() {
        true => Cow::Borrowed(text),
        false => {
            fault = Some(Unreadable::JsonInvalidUtf8);
            Cow::Owned(String::from_utf8_lossy(text).into_owned().into_bytes())
        }
    };
    if opening >= JSON_DEPTH_LIMIT && too_deep(&text) {
        fault = Some(Unreadable::JsonTooDeep);
    }
    Readable { bytes: text, fault }
}

/// Whether the bytes look like JSON (an object or an array) but do not parse.
pub fn is_broken_json(bytes: &[u8]) -> bool {
    looks_like_json(bytes) && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err()
}

/// Whether the first byte past JSON whitespace opens an object or an array.
fn looks_like_json(bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    matches!(start.map(|i| bytes[i]), Some(b'{' | b'['))
}

/// Whether all bytes are ASCII, and how many open an object or an array (strings
/// included: an upper bound of the nesting depth). One branch-free pass in fixed-size
/// blocks with byte counters, which the compiler turns into SIMD.
fn scan(bytes: &[u8]) -> (bool, usize) {
    fn block(bytes: &[u8]) -> (u8, u8) {
        let (mut high, mut count) = (0u8, 0u8);
        for &b in bytes {
            high |= b;
            count += u8::from(b == b'{') + u8::from(b == b'[');
        }
        (high, count)
    }
    let (mut high, mut opening) = (0u8, 0usize);
    // 128 bytes: a byte counter cannot overflow.
    let blocks = bytes.chunks_exact(128);
    let rest = blocks.remainder();
    for chunk in blocks {
        let (h, c) = block(chunk);
        high |= h;
        opening += usize::from(c);
    }
    let (h, c) = block(rest);
    (high | h < 0x80, opening + usize::from(c))
}

/// Whether JSON nests as deep as the parser's limit (brackets in strings not counted).
/// serde_json cannot tell: skipping a value ignores depth, and parsing it to find out costs
/// several times this one pass.
fn too_deep(bytes: &[u8]) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth >= JSON_DEPTH_LIMIT {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The payload as a rule's `record.data`: JSON (null reads as `()`), else text, else a BLOB.
pub fn rule_data(bytes: &[u8]) -> Dynamic {
    read_data(bytes).0
}

/// [`rule_data`] of a payload as [`readable`] cleans it, and what was wrong with it: JSON
/// with invalid UTF-8 or too deep, or JSON-looking bytes that are not JSON (which rules get
/// as text).
pub fn read_data(bytes: &[u8]) -> (Dynamic, Option<Unreadable>) {
    let Readable { bytes, fault } = readable(bytes);
    match serde_json::from_slice::<Dynamic>(&bytes) {
        Ok(value) => return (value, fault),
        Err(_) if fault.is_none() && looks_like_json(&bytes) => {
            return (text_or_blob(&bytes), Some(Unreadable::JsonInvalid))
        }
        Err(_) => {}
    }
    (text_or_blob(&bytes), fault)
}

fn text_or_blob(bytes: &[u8]) -> Dynamic {
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

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(data).unwrap();
        z.finish().unwrap()
    }

    fn decoded(data: Vec<u8>) -> Result<Records, Box<Undecodable>> {
        decode(&"s".into(), &"sh".into(), raw(data))
    }

    fn failure(data: Vec<u8>) -> DecodeError {
        decoded(data).expect_err("an undecodable record").error
    }

    /// A KPL aggregate around any protobuf body, with a valid MD5.
    fn with_md5(body: &[u8]) -> Vec<u8> {
        let mut out = KPL_MAGIC.to_vec();
        out.extend(body);
        out.extend(Md5::digest(body));
        out
    }

    #[test]
    fn damaged_compression_is_a_dead_letter_not_a_blob() {
        let json = br#"{"type":"privacy_request","tags":["Delete User"],"user_id":"u-1"}"#;
        let gz = gzip(json);
        let z = zlib(json);
        for (name, damaged) in [
            ("truncated gzip", gz[..gz.len() / 2].to_vec()),
            ("gzip without its trailer", gz[..gz.len() - 8].to_vec()),
            ("gzip header only", gz[..10].to_vec()),
            ("truncated zlib", z[..z.len() / 2].to_vec()),
            ("gzip with a bad CRC", {
                let mut bad = gz.clone();
                let at = bad.len() - 8;
                bad[at] ^= 1;
                bad
            }),
        ] {
            let err = failure(damaged);
            assert_eq!(err.kind, Unreadable::DamagedCompression, "{name}: {err}");
            assert!(
                err.to_string().contains("does not inflate"),
                "{name}: {err}"
            );
        }
        // Inside an aggregate: that event alone is unreadable (a letter of its own), the
        // others are read.
        let truncated = gz[..gz.len() - 3].to_vec();
        let records = decoded(aggregate(&[("a", b"fine"), ("b", &truncated), ("c", &gz)])).unwrap();
        assert_eq!(records.len(), 3);
        assert!(records[0].unreadable.is_none() && records[0].bytes == b"fine"[..]);
        let err = records[1].unreadable.as_ref().expect("the damaged event");
        assert_eq!(err.kind, Unreadable::DamagedCompression);
        assert!(err.reason.contains("sub-record 1"), "{err}");
        assert_eq!(records[1].sub_sequence_number, 1);
        assert!(records[2].unreadable.is_none() && records[2].bytes == json[..]);
        // An aggregate that comes compressed is inflated, then split.
        let records = decoded(zlib(&aggregate(&[("a", b"one"), ("b", json)]))).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].bytes, &json[..]);
        assert_eq!(records[1].sub_sequence_number, 1);
        // Text that merely starts like a zlib header stays text.
        assert_eq!(
            decoded(b"x^2 + y = z".to_vec()).unwrap()[0].bytes,
            &b"x^2 + y = z"[..]
        );
    }

    #[test]
    fn every_gzip_member_is_inflated_and_padding_ignored() {
        let (one, two) = (
            &br#"{"type":"privacy_request","#[..],
            &br#""user_id":"u-1"}"#[..],
        );
        let whole = [one, two].concat();
        let members = [gzip(one), gzip(two)].concat();
        assert_eq!(decoded(members.clone()).unwrap()[0].bytes, whole);
        for padding in [&b"\n"[..], b"\r\n", b"\0", b"\0\0\0\0 \t"] {
            let padded = [members.as_slice(), padding].concat();
            assert_eq!(decoded(padded).unwrap()[0].bytes, whole, "{padding:?}");
            let single = [gzip(&whole).as_slice(), padding].concat();
            assert_eq!(decoded(single).unwrap()[0].bytes, whole, "{padding:?}");
        }
        // Anything else after the last member is damage, not padding.
        for trailing in [&b"garbage"[..], b"\0\0x", &[0x1f, 0x8b, 8]] {
            let damaged = [members.as_slice(), trailing].concat();
            assert_eq!(
                failure(damaged).kind,
                Unreadable::DamagedCompression,
                "{trailing:?}"
            );
        }
    }

    #[test]
    fn the_inflate_limit_holds_for_a_whole_aggregate() {
        // Each sub-record inflates to 5 MiB, well under the limit on its own.
        let five_mib = gzip(&vec![b' '; 5 << 20]);
        let subs = |n: usize| -> Vec<(&str, &[u8])> { vec![("k", five_mib.as_slice()); n] };
        let records = decoded(aggregate(&subs(6))).unwrap();
        assert_eq!(
            records.iter().map(|r| r.bytes.len()).sum::<usize>(),
            30 << 20
        );
        // Seven of them pass 32 MiB together: the Kinesis record is refused.
        let err = failure(aggregate(&subs(7)));
        assert_eq!(err.kind, Unreadable::InflateLimit, "{err}");
        assert!(err.to_string().contains("decompression bomb"), "{err}");
        // The budget is per Kinesis record: the next one starts afresh.
        assert_eq!(decoded(aggregate(&subs(6))).unwrap().len(), 6);
    }

    #[test]
    fn readable_strips_a_bom_and_repairs_latin1_json() {
        let bom = b"\xEF\xBB\xBF{\"type\":\"privacy_request\"}";
        let read = readable(bom);
        assert_eq!(&*read.bytes, br#"{"type":"privacy_request"}"#);
        assert_eq!(read.fault, None);
        let map = rule_data(bom).cast::<rhai::Map>();
        assert_eq!(
            map["type"].clone().into_string().unwrap(),
            "privacy_request"
        );
        // Latin-1: "José" with é as one byte. Read with U+FFFD; the rule still matches.
        let latin1 = b"{\"tags\":[\"Delete User\"],\"name\":\"Jos\xE9\"}";
        let read = readable(latin1);
        assert_eq!(read.fault, Some(Unreadable::JsonInvalidUtf8));
        assert_eq!(
            &*read.bytes,
            "{\"tags\":[\"Delete User\"],\"name\":\"Jos\u{FFFD}\"}".as_bytes()
        );
        let (data, fault) = read_data(latin1);
        assert_eq!(fault, Some(Unreadable::JsonInvalidUtf8));
        let map = data.cast::<rhai::Map>();
        assert_eq!(map["name"].clone().into_string().unwrap(), "Jos\u{FFFD}");
        // Text and binary payloads are left as they are, without a fault.
        for payload in [&b"GET /x 200 \xE9"[..], b"\xEF\xBB\xBFplain", &[0xff, 0x00]] {
            let read = readable(payload);
            assert_eq!((&*read.bytes, read.fault), (payload, None));
        }
        // JSON-looking text that is not JSON reaches rules as text, flagged.
        let (data, fault) = read_data(b"[INFO] Delete User clicked");
        assert_eq!(data.into_string().unwrap(), "[INFO] Delete User clicked");
        assert_eq!(fault, Some(Unreadable::JsonInvalid));
        assert_eq!(read_data(b"{}").1, None);
    }

    #[test]
    fn json_too_deep_for_the_parser_is_flagged() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        // serde_json reads 127 levels and refuses 128.
        assert!(serde_json::from_str::<Value>(&nested(127)).is_ok());
        assert!(serde_json::from_str::<Value>(&nested(128)).is_err());
        assert_eq!(readable(nested(127).as_bytes()).fault, None);
        assert_eq!(
            readable(nested(128).as_bytes()).fault,
            Some(Unreadable::JsonTooDeep)
        );
        let deep = format!(r#"{{"tags":["Delete User"],"x":{}}}"#, nested(200));
        assert_eq!(
            readable(deep.as_bytes()).fault,
            Some(Unreadable::JsonTooDeep)
        );
        // Many brackets, shallow (or inside strings): not too deep.
        let wide = format!(
            r#"{{"a":[{}],"s":"{}"}}"#,
            vec!["[]"; 300].join(","),
            "[".repeat(300)
        );
        assert_eq!(readable(wide.as_bytes()).fault, None);
        // The parser's own verdict on the same documents, brackets in strings included.
        for doc in [nested(127), nested(128), deep, wide] {
            let refused = serde_json::from_str::<Value>(&doc)
                .is_err_and(|e| e.to_string().starts_with("recursion limit exceeded"));
            assert_eq!(refused, too_deep(doc.as_bytes()), "{doc}");
        }
    }

    /// The prefilter searches the bytes rules read: a literal with U+FFFD (written to catch
    /// Latin-1 records) finds the repaired record, and a rule sees every record it would
    /// see without a prefilter.
    #[test]
    fn the_prefilter_searches_what_rules_read() {
        let dir = tempfile::tempdir().unwrap();
        let rule = |name: &str, prefilter: &str| {
            std::fs::write(
                dir.path().join(name),
                format!(
                    "{prefilter}\nfn decide(record) {{ if type_of(record.data) == \"map\" && record.data.tags == [\"L\u{FFFD}schen\"] {{ #{{ action: \"a\", key: \"k\" }} }} }}"
                ),
            )
            .unwrap()
        };
        rule("a_filtered.rhai", "const PREFILTER = [\"L\u{FFFD}schen\"];");
        rule("b_open.rhai", "");
        let set = crate::rules::RuleSet::load(dir.path(), None).unwrap();
        let latin1 = b"\xEF\xBB\xBF{\"tags\":[\"L\xF6schen\"]}".to_vec();
        let record = decoded(latin1).unwrap().pop().unwrap();
        let run = set.run(&record);
        assert_eq!(run.fault, Some(Unreadable::JsonInvalidUtf8));
        let decided: Vec<bool> = run
            .verdicts
            .iter()
            .map(|(_, v)| matches!(v, crate::rules::Verdict::Decided(d) if d.len() == 1))
            .collect();
        assert_eq!(decided, [true, true], "{:?}", run.verdicts);
    }

    fn nested_message() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        // Arbitrary protobuf-ish bytes, or a real aggregate message.
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            (
                proptest::collection::vec("[a-z]{0,3}", 0..4),
                proptest::collection::vec(sub_record(), 0..6),
            )
                .prop_map(|(keys, records)| AggregatedRecord {
                    partition_key_table: keys,
                    explicit_hash_key_table: vec!["1".into()],
                    records,
                }
                .encode_to_vec()),
        ]
    }

    /// A sub-record whose payload is plain, gzip or zlib, whole or cut short, maybe with
    /// trailing bytes; its partition key index is sometimes out of range.
    fn sub_record() -> impl proptest::strategy::Strategy<Value = SubRecord> {
        use proptest::prelude::*;
        (
            0u64..5,
            proptest::option::of(0u64..2),
            proptest::collection::vec(any::<u8>(), 0..128),
            0u8..3,
            proptest::option::of(0usize..64),
            proptest::collection::vec(any::<u8>(), 0..3),
        )
            .prop_map(|(key, hash, payload, codec, cut, trailing)| {
                let mut data = match codec {
                    0 => payload,
                    1 => gzip(&payload),
                    _ => zlib(&payload),
                };
                if let Some(cut) = cut {
                    data.truncate(cut);
                }
                data.extend(trailing);
                SubRecord {
                    partition_key_index: key,
                    explicit_hash_key_index: hash,
                    data: data.into(),
                    tags: vec![],
                }
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever the bytes, decoding answers (records or an error) and never panics;
        /// the aggregates carry a valid MD5, so their protobuf and payloads are really read.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(body in nested_message(), kpl in proptest::prelude::any::<bool>()) {
            let bytes = if kpl { with_md5(&body) } else { body.clone() };
            match decode(&"s".into(), &"sh".into(), raw(bytes.clone())) {
                Ok(records) => {
                    let parsed = kpl.then(|| AggregatedRecord::decode(&body[..]).ok()).flatten();
                    let expected = parsed.map_or(1, |a| a.records.len());
                    proptest::prop_assert_eq!(records.len(), expected);
                    for record in &records {
                        proptest::prop_assert!(record.bytes.len() <= MAX_INFLATED);
                        let _ = readable(&record.bytes);
                        let _ = read_data(&record.bytes);
                    }
                }
                // A refused record is given back whole, as it came.
                Err(undecodable) => proptest::prop_assert_eq!(undecodable.raw.data, bytes),
            }
        }

        /// The block scan agrees with the obvious one, whatever the length.
        #[test]
        fn the_scan_counts_brackets_and_finds_non_ascii(bytes in proptest::collection::vec(proptest::prop_oneof![proptest::prelude::Just(b'{'), proptest::prelude::Just(b'['), proptest::prelude::Just(0x80u8), 0u8..0x80], 0..700)) {
            let opening = bytes.iter().filter(|b| **b == b'{' || **b == b'[').count();
            proptest::prop_assert_eq!(scan(&bytes), (bytes.is_ascii(), opening));
        }

        /// A well-formed aggregate of compressed sub-records yields every payload inflated.
        #[test]
        fn compressed_sub_records_are_inflated(payloads in proptest::collection::vec((proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128), 0u8..3), 1..8)) {
            let data: Vec<Vec<u8>> = payloads.iter().map(|(p, codec)| match codec {
                0 => gzip(p),
                1 => zlib(p),
                _ => [gzip(p), b"\n".to_vec()].concat(),
            }).collect();
            let input: Vec<(&str, &[u8])> = data.iter().map(|d| ("k", d.as_slice())).collect();
            let records = decode(&"s".into(), &"sh".into(), raw(aggregate(&input))).unwrap();
            proptest::prop_assert_eq!(records.len(), payloads.len());
            for (record, (payload, _)) in records.iter().zip(&payloads) {
                proptest::prop_assert_eq!(&record.bytes[..], &payload[..]);
            }
        }

        /// Any list of sub-records survives aggregation and de-aggregation, in order.
        #[test]
        fn aggregates_round_trip(subs in proptest::collection::vec(("[a-z]{1,4}", proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)), 1..20)) {
            // A first byte that starts neither gzip nor zlib: the payloads stay as they are.
            let subs: Vec<(String, Vec<u8>)> = subs.into_iter().map(|(k, d)| (k, [&b"p"[..], &d].concat())).collect();
            let input: Vec<(&str, &[u8])> = subs.iter().map(|(k, d)| (k.as_str(), d.as_slice())).collect();
            let records = decode(&"s".into(), &"sh".into(), raw(aggregate(&input))).unwrap();
            proptest::prop_assert_eq!(records.len(), subs.len());
            for (i, (record, (key, data))) in records.iter().zip(&subs).enumerate() {
                proptest::prop_assert_eq!(record.sub_sequence_number, i as u64);
                proptest::prop_assert_eq!(&*record.partition_key, key.as_str());
                proptest::prop_assert_eq!(&record.bytes[..], &data[..]);
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

    /// A plain event with a `data` field of its own is a plain event: only the fields
    /// `capture` alone writes make a line a captured record.
    #[test]
    fn plain_events_with_a_data_field_are_plain_events() {
        for line in [
            r#"{"data":{"type":"x","user_id":"u-1"}}"#,
            r#"{"type":"x","data":{"user_id":"u-1"}}"#,
            r#"{"data_text":"x","type":"y"}"#,
        ] {
            assert_eq!(event_line(line.as_bytes()).unwrap().bytes, line.as_bytes());
            assert_eq!(event_line(line.as_bytes()).unwrap().bytes, line.as_bytes());
        }
        let record = RecordJson {
            data_text: Some("payload".into()),
            partition_key: "pk".into(),
            sequence_number: "42".into(),
            ..serde_json::from_str("{}").unwrap()
        }
        .into_record();
        let line = serde_json::to_string(&RecordJson::from_record(&record)).unwrap();
        let read = event_line(line.as_bytes()).unwrap();
        assert_eq!(
            (&*read.bytes, &*read.sequence_number),
            (&b"payload"[..], "42")
        );
        assert_eq!(event_line(line.as_bytes()).unwrap().bytes, &b"payload"[..]);
        // Holds a field only capture writes, but is no record: an error, naming the field.
        let err = event_line(br#"{"shard_id":"s","type":"x"}"#).unwrap_err();
        assert!(err.contains("shard_id"), "{err}");
    }

    /// Hex that does not decode, or a payload given twice, is an error of the line that
    /// holds it, not an empty event.
    #[test]
    fn bad_hex_and_two_payloads_are_errors() {
        for (line, says) in [
            (r#"{"data_hex":"zz"}"#, "data_hex"),
            (r#"{"data_hex":"abc"}"#, "data_hex"),
            (r#"{"data":{"a":1},"data_text":"x"}"#, "data and data_text"),
            (
                r#"{"data_text":"x","data_hex":"00"}"#,
                "data_text and data_hex",
            ),
        ] {
            let bad = serde_json::from_str::<RecordJson>(line).unwrap_err();
            assert!(bad.to_string().contains(says), "{line}: {bad}");
        }
        // As capture writes it: the exact bytes and one view.
        let captured: RecordJson =
            serde_json::from_str(r#"{"data_base64":"AP8=","data_hex":"00ff"}"#).unwrap();
        assert_eq!(captured.into_record().bytes, &[0x00, 0xff][..]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, "{\"data\":{}}\n{\"data_hex\":\"0\"}\n").unwrap();
        let err = read_json_lines(&path).unwrap_err();
        assert_eq!(err.line, 2, "{err}");
    }
}
