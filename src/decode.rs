//! Decode: a Kinesis record's bytes into the logical records rules see.
//!
//! `record.data` is built only when some rule needs it ([`rule_data`]): JSON payloads become
//! JSON values, UTF-8 text that is not JSON stays a string, anything else is a BLOB.

use rhai::Dynamic;
use serde_json::Value;

use crate::clock::rfc3339;
use crate::source::RawRecord;

/// One logical record.
#[derive(Debug, Clone)]
pub struct Record {
    pub stream: String,
    pub shard_id: String,
    pub sequence_number: String,
    /// Position inside a KPL aggregate; 0 when the record was not aggregated.
    pub sub_sequence_number: u64,
    pub partition_key: String,
    /// RFC 3339 UTC.
    pub arrival_time: String,
    /// The decoded payload: what the prefilter searches and `record.data` is made from.
    pub bytes: Vec<u8>,
}

/// A record written as JSON: test cases, captured records (`capture`) and `preview` input.
///
/// The payload is `data` (a JSON value; the bytes are its compact JSON), or `data_text`
/// (a payload that is text but not JSON), or `data_hex` (anything else). Left-out fields
/// get the defaults of a test case.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordJson {
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
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

impl RecordJson {
    pub fn into_record(self) -> Record {
        let bytes = match (self.data_text, self.data_hex) {
            (Some(text), _) => text.into_bytes(),
            (None, Some(hex)) => hex::decode(hex).unwrap_or_default(),
            (None, None) => serde_json::to_vec(&self.data).unwrap_or_default(),
        };
        Record {
            stream: self.stream,
            shard_id: self.shard_id,
            sequence_number: self.sequence_number,
            sub_sequence_number: self.sub_sequence_number,
            partition_key: self.partition_key,
            arrival_time: self.arrival_time,
            bytes,
        }
    }

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
            data_text,
            data_hex,
            partition_key: record.partition_key.clone(),
            sequence_number: record.sequence_number.clone(),
            sub_sequence_number: record.sub_sequence_number,
            shard_id: record.shard_id.clone(),
            arrival_time: record.arrival_time.clone(),
            stream: record.stream.clone(),
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

/// Decodes one record read from a shard into the logical records it carries.
pub fn decode(stream: &str, shard_id: &str, raw: RawRecord) -> Vec<Record> {
    vec![Record {
        stream: stream.to_owned(),
        shard_id: shard_id.to_owned(),
        sequence_number: raw.sequence_number,
        sub_sequence_number: 0,
        partition_key: raw.partition_key,
        arrival_time: rfc3339(raw.arrival_time_millis),
        bytes: raw.data,
    }]
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
                data_text: None,
                data_hex: Some(hex::encode(bytes)),
                ..serde_json::from_str("{}").unwrap()
            }
            .into_record();
            let back = RecordJson::from_record(&record).into_record();
            assert_eq!(back.bytes, bytes);
        }
    }
}
