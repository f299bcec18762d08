//! `dead-letters to-test`: a record a rule failed on, made into a test case for that rule.
//!
//! Test files go to version control, so by default every identifier in the record is
//! replaced by a placeholder of the same shape (digits by digits, letters by letters of the
//! same case, length and punctuation kept), the same value by the same placeholder
//! throughout. What the rule compares against stays: keys, and every text the rule itself
//! spells (its prefilter literals, the values of its opening checks, any other string in
//! it), or the case would no longer reach the branch the record took. The expectation is
//! what the rule does on the case now, so the case passes, or fails the way the record did.

use std::collections::{BTreeSet, HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rhai::{ASTNode, Expr};
use serde_json::{json, Value};

use super::{Decision, Rule, RuleSet, Verdict};
use crate::decode::{self, Record, RecordJson};

/// Numbers with at least this many digits are taken for identifiers.
const ID_DIGITS: usize = 5;
/// A text of the rule at least this long is kept where a record's value contains it.
const KEPT_WITHIN: usize = 3;

/// Why a record cannot become a case.
#[derive(Debug, thiserror::Error)]
pub enum ToTestError {
    #[error(
        "no rule {0:?} in the rules (a rule that was removed or renamed has no tests to add to)"
    )]
    NoRule(String),
    #[error("the record is binary, not text: its identifiers cannot be told apart; use --keep-identifiers (and keep the case out of version control)")]
    Binary,
}

/// The test case for rule `rule` on `record`, named `name`, as a `NAME.test.json` entry.
pub fn case(
    set: &RuleSet,
    rule: &str,
    record: &Record,
    keep_identifiers: bool,
    name: &str,
) -> Result<Case, ToTestError> {
    let index = set
        .rules()
        .iter()
        .position(|r| r.name == rule)
        .ok_or_else(|| ToTestError::NoRule(rule.to_owned()))?;
    let mut fields = record_fields(&set.rules()[index], record, keep_identifiers)?;
    let record_json: RecordJson =
        serde_json::from_value(Value::Object(fields.clone())).expect("the fields of a record");
    let (expect, fails) = match set.evaluate_rule(index, &record_json.into_record()) {
        Verdict::Skipped => (Value::Null, false),
        Verdict::Decided(decisions) => (expectation(&decisions), false),
        Verdict::Failed(_) => (Value::Null, true),
    };
    let name = match fails {
        false => name.to_owned(),
        true => format!(
            "{name}; the rule still fails on it: replace null by the decision it should make"
        ),
    };
    // Defaults a case need not spell out.
    fields.retain(|key, value| match key.as_str() {
        "stream" => value != "test",
        "sub_sequence_number" => value != 0,
        "partition_key" => value != "",
        _ => true,
    });
    let case = Case {
        name,
        record: fields,
        expect,
    };
    Ok(case)
}

/// A test case, its fields in the order people read them.
#[derive(Debug, serde::Serialize)]
pub struct Case {
    pub name: String,
    pub record: serde_json::Map<String, Value>,
    pub expect: Value,
}

fn expectation(decisions: &[Decision]) -> Value {
    match decisions {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    }
}

/// The case's `record`: the payload (as data, or text, or the exact bytes) and the
/// record's metadata.
fn record_fields(
    rule: &Rule,
    record: &Record,
    keep_identifiers: bool,
) -> Result<serde_json::Map<String, Value>, ToTestError> {
    let mut fields = serde_json::Map::new();
    let mut placeholders = Placeholders::new(rule_texts(rule));
    let mut partition_key = record.partition_key.to_string();
    if keep_identifiers {
        // The exact bytes, as the producer wrote them.
        match std::str::from_utf8(&record.bytes) {
            Ok(text) => fields.insert("data_text".into(), text.into()),
            Err(_) => fields.insert("data_hex".into(), hex::encode(&record.bytes).into()),
        };
    } else {
        let readable = decode::readable(&record.bytes).bytes;
        match serde_json::from_slice::<Value>(&readable) {
            Ok(data) => {
                fields.insert("data".into(), placeholders.value(&data));
            }
            Err(_) => match std::str::from_utf8(&readable) {
                Ok(text) => {
                    fields.insert("data_text".into(), placeholders.text(text).into());
                }
                Err(_) => return Err(ToTestError::Binary),
            },
        }
        partition_key = placeholders.text(&partition_key);
    }
    fields.insert("partition_key".into(), partition_key.into());
    fields.insert("shard_id".into(), record.shard_id.to_string().into());
    fields.insert(
        "sequence_number".into(),
        record.sequence_number.to_string().into(),
    );
    fields.insert(
        "sub_sequence_number".into(),
        record.sub_sequence_number.into(),
    );
    fields.insert(
        "arrival_time".into(),
        record.arrival_time.to_string().into(),
    );
    fields.insert("stream".into(), record.stream.to_string().into());
    Ok(fields)
}

/// Every text the rule spells: its prefilter literals and the strings in its code.
fn rule_texts(rule: &Rule) -> BTreeSet<String> {
    let mut texts: BTreeSet<String> = rule
        .literals
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    rule.ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Expr(expr)) = path.last() {
            match expr {
                Expr::StringConstant(text, _) => {
                    texts.insert(text.to_string());
                }
                Expr::DynamicConstant(value, _) => collect_strings(value, &mut texts),
                _ => {}
            }
        }
        true
    });
    texts.retain(|t| t.chars().any(char::is_alphanumeric));
    texts
}

/// Strings in a constant the optimizer folded (an array of literals, say).
fn collect_strings(value: &rhai::Dynamic, texts: &mut BTreeSet<String>) {
    if let Some(text) = value.read_lock::<rhai::ImmutableString>() {
        texts.insert(text.to_string());
    } else if let Some(array) = value.read_lock::<rhai::Array>() {
        for item in array.iter() {
            collect_strings(item, texts);
        }
    } else if let Some(map) = value.read_lock::<rhai::Map>() {
        for item in map.values() {
            collect_strings(item, texts);
        }
    }
}

/// Replaces values by placeholders of the same shape, the same value by the same one.
struct Placeholders {
    /// The rule's texts, kept where they appear.
    kept: Vec<String>,
    /// The same, lower-cased and trimmed: a value equal to one of them is kept whole (a
    /// rule may compare `lower(x)` or `trimmed(x)`).
    kept_whole: HashSet<String>,
    given: HashMap<String, String>,
    used: HashSet<String>,
    /// Placeholders come from a generator seeded by their order of first use, never from
    /// the value: a placeholder tells nothing of the value it replaces.
    next: u64,
}

impl Placeholders {
    fn new(texts: BTreeSet<String>) -> Self {
        Placeholders {
            kept_whole: texts.iter().map(|t| t.trim().to_lowercase()).collect(),
            kept: texts
                .into_iter()
                .filter(|t| t.chars().count() >= KEPT_WITHIN)
                .collect(),
            given: HashMap::new(),
            used: HashSet::new(),
            next: 0,
        }
    }

    fn value(&mut self, value: &Value) -> Value {
        match value {
            Value::String(text) => Value::String(self.text(text)),
            Value::Number(n) if n.is_i64() || n.is_u64() => {
                let digits = n.to_string();
                if digits.trim_start_matches('-').len() < ID_DIGITS {
                    return value.clone();
                }
                let replaced = self.text(&digits);
                replaced.parse().map(Value::Number).unwrap_or(Value::Null)
            }
            Value::Array(items) => Value::Array(items.iter().map(|v| self.value(v)).collect()),
            Value::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), self.value(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    fn text(&mut self, text: &str) -> String {
        if self.kept_whole.contains(&text.trim().to_lowercase()) {
            return text.to_owned();
        }
        if let Some(given) = self.given.get(text) {
            return given.clone();
        }
        // JSON inside a string (a log line's message): its keys stay too.
        if let Ok(inner @ (Value::Object(_) | Value::Array(_))) = serde_json::from_str(text) {
            let replaced = self.value(&inner).to_string();
            self.given.insert(text.to_owned(), replaced.clone());
            return replaced;
        }
        let chars: Vec<char> = text.chars().collect();
        let mut keep = vec![false; chars.len()];
        for kept in &self.kept {
            let kept: Vec<char> = kept.chars().collect();
            for start in 0..chars.len().saturating_sub(kept.len() - 1) {
                if chars[start..start + kept.len()] == kept[..] {
                    keep[start..start + kept.len()].fill(true);
                }
            }
        }
        let replaceable = chars
            .iter()
            .zip(&keep)
            .any(|(c, kept)| !kept && c.is_alphanumeric());
        if !replaceable {
            return text.to_owned();
        }
        let mut placeholder = String::new();
        for _ in 0..64 {
            self.next += 1;
            placeholder = shaped(&chars, &keep, self.next);
            if placeholder != text && !self.used.contains(&placeholder) {
                break;
            }
        }
        self.used.insert(placeholder.clone());
        self.given.insert(text.to_owned(), placeholder.clone());
        placeholder
    }
}

/// `chars` with every character not kept replaced by one of its kind: a digit (not a
/// leading zero), a letter of the same case; the rest stays.
fn shaped(chars: &[char], keep: &[bool], seed: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut lower = || (b'a' + rng.gen_range(0..26)) as char;
    let mut out = String::with_capacity(chars.len());
    let mut digits = Vec::new();
    for (i, (&c, &kept)) in chars.iter().zip(keep).enumerate() {
        let replaced = match c {
            _ if kept => c,
            '0'..='9' => {
                digits.push(i);
                '0'
            }
            c if c.is_uppercase() => lower().to_ascii_uppercase(),
            c if c.is_alphabetic() => lower(),
            c => c,
        };
        out.push(replaced);
    }
    // Digits drawn apart, so a number keeps its count of digits (no leading zero).
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut out: Vec<char> = out.chars().collect();
    for (n, i) in digits.into_iter().enumerate() {
        let first = n == 0 && (i == 0 || !chars[i - 1].is_ascii_digit());
        out[i] = char::from(b'0' + rng.gen_range(u8::from(first)..10));
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placeholders(texts: &[&str]) -> Placeholders {
        Placeholders::new(texts.iter().map(|t| t.to_string()).collect())
    }

    #[test]
    fn placeholders_keep_the_shape_and_the_rules_texts() {
        let mut p = placeholders(&["Delete User", "acme", "privacy_request"]);
        let data = json!({
            "type": "privacy_request",
            "client": "ACME",
            "tags": ["GDPR Delete User"],
            "user_id": "u-123",
            "email": "Jo.Smith@example.com",
            "again": "u-123",
            "account": 9876543,
            "count": 3,
            "verified": true,
            "message": "{\"user\":\"u-123\",\"n\":1}"
        });
        let out = p.value(&data);
        assert_eq!(out["type"], "privacy_request");
        assert_eq!(out["client"], "ACME");
        let tag = out["tags"][0].as_str().unwrap();
        assert!(
            tag.ends_with(" Delete User") && !tag.starts_with("GDPR"),
            "{tag}"
        );
        let user = out["user_id"].as_str().unwrap();
        assert_ne!(user, "u-123");
        assert!(
            user.len() == 5
                && user.as_bytes()[0].is_ascii_lowercase()
                && &user[1..2] == "-"
                && user[2..].bytes().all(|b| b.is_ascii_digit()),
            "{user}"
        );
        assert_eq!(out["again"], out["user_id"]);
        let email = out["email"].as_str().unwrap();
        assert_eq!(email.len(), "Jo.Smith@example.com".len());
        assert!(email.as_bytes()[0].is_ascii_uppercase() && email.contains('@'));
        assert_ne!(email, "Jo.Smith@example.com");
        let account = out["account"].as_i64().unwrap();
        assert!(account != 9876543 && (1_000_000..10_000_000).contains(&account));
        assert_eq!(out["count"], 3);
        assert_eq!(out["verified"], true);
        let message: Value = serde_json::from_str(out["message"].as_str().unwrap()).unwrap();
        assert_eq!(message["user"], out["user_id"]);
        // Deterministic: the same record gives the same case.
        assert_eq!(
            placeholders(&["Delete User", "acme", "privacy_request"]).value(&data),
            out
        );
    }

    fn record(bytes: &[u8], partition_key: &str) -> Record {
        let mut record = serde_json::from_str::<RecordJson>("{}")
            .unwrap()
            .into_record();
        record.bytes = bytes.to_vec().into();
        record.partition_key = partition_key.into();
        record
    }

    /// A record that could not be decoded (a broken aggregate, say) is bytes, not text:
    /// only kept as it is, on request. A rule that is gone has no tests to add to.
    #[test]
    fn binary_records_and_missing_rules_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.rhai"), "fn decide(record) { () }").unwrap();
        let set = RuleSet::load(dir.path(), None).unwrap();
        let binary = record(&[0xF3, 0x89, 0x9A, 0xC2, 0xff, 0x00], "pk-1");
        assert!(matches!(
            case(&set, "r", &binary, false, "n"),
            Err(ToTestError::Binary)
        ));
        let kept = case(&set, "r", &binary, true, "n").unwrap();
        assert_eq!(kept.record["data_hex"], "f3899ac2ff00");
        assert_eq!(kept.record["partition_key"], "pk-1");
        assert!(matches!(
            case(&set, "gone", &binary, true, "n"),
            Err(ToTestError::NoRule(_))
        ));
        // Text that is not JSON keeps its shape, and the case reads back as a record.
        let text = case(&set, "r", &record(b"user 4417 deleted", "pk-1"), false, "n").unwrap();
        let data_text = text.record["data_text"].as_str().unwrap();
        assert_eq!(data_text.len(), "user 4417 deleted".len());
        assert_ne!(data_text, "user 4417 deleted");
        assert_ne!(text.record["partition_key"], "pk-1");
        serde_json::from_value::<RecordJson>(Value::Object(text.record)).unwrap();
    }
}
