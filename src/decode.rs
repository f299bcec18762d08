//! Decode: a Kinesis record's bytes into what a rule sees as `record.data`.
//!
//! JSON payloads become JSON values, UTF-8 text that is not JSON stays a string, anything
//! else is a BLOB. The decoded bytes are kept for the rules' literal prefilter.

use serde_json::Value;

use crate::clock::rfc3339;
use crate::source::RawRecord;

/// The decoded payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Json(Value),
    Text(String),
    Binary(Vec<u8>),
}

/// One logical record, as rules see it.
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
    /// The payload bytes the prefilter searches.
    pub bytes: Vec<u8>,
    pub data: Data,
}

impl Data {
    pub fn from_bytes(bytes: &[u8]) -> Data {
        if let Ok(value) = serde_json::from_slice::<Value>(bytes) {
            return Data::Json(value);
        }
        match std::str::from_utf8(bytes) {
            Ok(text) => Data::Text(text.to_owned()),
            Err(_) => Data::Binary(bytes.to_vec()),
        }
    }
}

/// Decodes one record read from a shard into the logical records it carries.
pub fn decode(stream: &str, shard_id: &str, raw: RawRecord) -> Vec<Record> {
    let data = Data::from_bytes(&raw.data);
    vec![Record {
        stream: stream.to_owned(),
        shard_id: shard_id.to_owned(),
        sequence_number: raw.sequence_number,
        sub_sequence_number: 0,
        partition_key: raw.partition_key,
        arrival_time: rfc3339(raw.arrival_time_millis),
        bytes: raw.data,
        data,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_text_and_binary() {
        assert_eq!(
            Data::from_bytes(br#"{"type":"x"}"#),
            Data::Json(serde_json::json!({"type": "x"}))
        );
        assert_eq!(
            Data::from_bytes(b"GET /index.html 200"),
            Data::Text("GET /index.html 200".into())
        );
        assert_eq!(
            Data::from_bytes(&[0xff, 0x00]),
            Data::Binary(vec![0xff, 0x00])
        );
    }
}
