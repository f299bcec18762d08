//! Decode: a Kinesis record's bytes into the logical records rules see.
//!
//! `record.data` is built only when some rule needs it ([`rule_data`]): JSON payloads become
//! JSON values, UTF-8 text that is not JSON stays a string, anything else is a BLOB.

use rhai::Dynamic;

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
}
