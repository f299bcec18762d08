//! `dead-letters to-test`: a record a rule failed on, made into a test case for that rule.
//!
//! Test files go to version control, so by default every identifier in the record is
//! replaced by a placeholder of the same shape (digits by digits, letters by letters of the
//! same case, length and punctuation kept): the same value by the same placeholder
//! everywhere (inside longer texts and map keys too), distinct values by distinct ones.
//! Every number is replaced (a PIN is four digits), its magnitude kept; map keys are when
//! they look like identifiers or hold a value replaced elsewhere, but the fields the rule
//! reads by name.
//! What the rule compares against stays: every text and number the rule itself spells (its
//! prefilter literals, the values of its opening checks, any other literal in it), or the
//! case would no longer reach the branch the record took. Since a placeholder may still
//! change the rule's path (a rule that tests a value's form, say), the case is run on both
//! records as `rules test` would, and refused when they part. The expectation is what the
//! rule does on the case, so the case passes, or fails the way the record did.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rhai::{ASTNode, Expr};
use serde_json::{json, Value};

use super::testing::{self, Outcome, SendCheck};
use super::trace::Place;
use super::{Decision, Rule, RuleError, RuleSet, Verdict};
use crate::decode::{self, Record, RecordJson};

/// A map key with a run of at least this many digits is taken for an identifier.
const ID_DIGITS: usize = 5;
/// A text of the rule (or a replaced value) at least this long is kept (or replaced the
/// same way) where a record's value contains it.
const KEPT_WITHIN: usize = 3;
/// Placeholders tried for one value before giving up (a value too short to have distinct
/// stand-ins enough).
const TRIES: u64 = 10_000;

/// Why a record cannot become a case.
#[derive(Debug, thiserror::Error)]
pub enum ToTestError {
    #[error(
        "no rule {0:?} in the rules (a rule that was removed or renamed has no tests to add to)"
    )]
    NoRule(String),
    #[error("the record is binary, not text: its identifiers cannot be told apart; use --keep-identifiers (and keep the case out of version control)")]
    Binary,
    #[error("with its identifiers replaced by placeholders, the record takes another path through rule {rule:?} (the record: {original}; with placeholders: {replaced}): the placeholders change the rule's path; use --keep-identifiers (and keep the test file private) or write the case by hand")]
    PathChanged {
        rule: String,
        original: String,
        replaced: String,
    },
    #[error("the record holds values too short to get distinct placeholders; use --keep-identifiers (and keep the test file private) or write the case by hand")]
    NoPlaceholder,
}

/// The path a record takes through a rule, as far as a case must keep it.
#[derive(Debug, PartialEq)]
enum Path {
    Undecodable(&'static str),
    /// The rule failed: the line (0 when there is none) and the kind of failure.
    Failed(usize, String),
    Decided,
    Nothing,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Undecodable(kind) => write!(f, "cannot be decoded ({kind})"),
            Path::Failed(0, kind) => write!(f, "the rule fails ({kind})"),
            Path::Failed(line, kind) => write!(f, "the rule fails at line {line} ({kind})"),
            Path::Decided => f.write_str("the rule decides"),
            Path::Nothing => f.write_str("the rule decides nothing"),
        }
    }
}

fn path(outcome: &Outcome) -> Path {
    match outcome {
        Outcome::Undecodable(kind) => Path::Undecodable(kind.as_str()),
        Outcome::Ran(Verdict::Failed(error)) => match error {
            RuleError::Runtime { location, kind, .. } => Path::Failed(location.line, kind.clone()),
            RuleError::Decision { .. } => Path::Failed(0, "invalid decision".into()),
            other => Path::Failed(0, other.log_summary()),
        },
        Outcome::Ran(Verdict::Decided(decisions)) if !decisions.is_empty() => Path::Decided,
        Outcome::Ran(_) => Path::Nothing,
    }
}

/// What a case must keep of a record's run through a rule: how it ends, which statements
/// and expressions ran (for each record the daemon decodes it into; `None` when the
/// prefilter keeps it out), and the form of its decisions. Two outcomes of the same kind
/// may still come by different branches: only the places run tell them apart.
#[derive(Debug, PartialEq)]
struct Run {
    path: Path,
    places: Vec<Option<BTreeSet<Place>>>,
    decisions: Vec<Shape>,
}

/// A decision as far as its form goes: no value of the record in it.
#[derive(Debug, PartialEq)]
struct Shape {
    action: String,
    regulation: Option<String>,
    /// Each param and what it is (`a string`, `a map`...).
    params: BTreeMap<String, &'static str>,
    /// Whether the configured actions can send it (always, without a config).
    sendable: bool,
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a map",
    }
}

/// The outcome of rule `index` on `record` as `rules test` sees it, and its [`Run`].
fn run(
    set: &RuleSet,
    index: usize,
    record: &Record,
    sendable: Option<SendCheck>,
) -> (Outcome, Run) {
    let outcome = testing::outcome(set, index, record);
    let places = match (&outcome, super::decode_as_daemon(record)) {
        (Outcome::Ran(_), Ok(records)) => records
            .iter()
            .map(|sub| {
                set.statements_run(index, sub)
                    .map(|places| places.into_iter().collect())
            })
            .collect(),
        _ => Vec::new(),
    };
    let decisions = match &outcome {
        Outcome::Ran(Verdict::Decided(decisions)) => decisions
            .iter()
            .map(|d| Shape {
                action: d.action.clone(),
                regulation: d.regulation.clone(),
                params: d.params.iter().map(|(k, v)| (k.clone(), kind(v))).collect(),
                sendable: sendable.is_none_or(|check| check(d).is_ok()),
            })
            .collect(),
        _ => Vec::new(),
    };
    let run = Run {
        path: path(&outcome),
        places,
        decisions,
    };
    (outcome, run)
}

/// How two runs part, as (the record's, the placeholders'), told without a value.
fn parting(original: &Run, replaced: &Run) -> Option<(String, String)> {
    if original.path != replaced.path {
        return Some((original.path.to_string(), replaced.path.to_string()));
    }
    if original.places != replaced.places {
        let lines = |of: &Run, not_in: &Run| -> String {
            let others: BTreeSet<Place> =
                not_in.places.iter().flatten().flatten().copied().collect();
            let lines: BTreeSet<usize> = of
                .places
                .iter()
                .flatten()
                .flatten()
                .filter(|p| !others.contains(p))
                .map(|p| p.0)
                .collect();
            match lines.is_empty() {
                true => format!("{} by other statements", of.path),
                false => {
                    let lines: Vec<String> = lines.iter().map(usize::to_string).collect();
                    format!("{}, running line(s) {}", of.path, lines.join(", "))
                }
            }
        };
        return Some((lines(original, replaced), lines(replaced, original)));
    }
    // Actions, regulations and param names may come from the record: only told apart.
    let (ours, theirs) = (&original.decisions, &replaced.decisions);
    if ours.len() != theirs.len() {
        let count = |n: usize| format!("{n} decision(s)");
        return Some((count(ours.len()), count(theirs.len())));
    }
    let (n, a, b) = ours
        .iter()
        .zip(theirs)
        .enumerate()
        .find(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i + 1, a, b))?;
    let kinds = |shape: &Shape| {
        let mut kinds: Vec<&str> = shape.params.values().copied().collect();
        kinds.sort_unstable();
        kinds.join(", ")
    };
    let (ours, theirs) = if a.sendable != b.sendable {
        let said = |sendable: bool| match sendable {
            true => "can be sent",
            false => "cannot be sent",
        };
        (said(a.sendable).to_owned(), said(b.sendable).to_owned())
    } else if a.action != b.action {
        ("has one action".to_owned(), "has another".to_owned())
    } else if a.regulation != b.regulation {
        ("has one regulation".to_owned(), "has another".to_owned())
    } else if kinds(a) != kinds(b) {
        (
            format!("has params [{}]", kinds(a)),
            format!("has params [{}]", kinds(b)),
        )
    } else {
        (
            "has params of some names".to_owned(),
            "has params of other names".to_owned(),
        )
    };
    Some((
        format!("{}, and its decision {n} {ours}", original.path),
        format!("{}, and its decision {n} {theirs}", replaced.path),
    ))
}

/// The test case for rule `rule` on `record`, named `name`, as a `NAME.test.json` entry.
/// With `sendable`, a decision the configured actions cannot send is not expected: the
/// case is marked as still failing.
pub fn case(
    set: &RuleSet,
    rule: &str,
    record: &Record,
    keep_identifiers: bool,
    name: &str,
    sendable: Option<SendCheck>,
) -> Result<Case, ToTestError> {
    let index = set
        .rules()
        .iter()
        .position(|r| r.name == rule)
        .ok_or_else(|| ToTestError::NoRule(rule.to_owned()))?;
    let mut fields = record_fields(&set.rules()[index], record, keep_identifiers)?;
    let record_json: RecordJson =
        serde_json::from_value(Value::Object(fields.clone())).expect("the fields of a record");
    let (replaced, now) = run(set, index, &record_json.into_record(), sendable);
    if !keep_identifiers {
        let (_, original) = run(set, index, record, sendable);
        if let Some((original, replaced)) = parting(&original, &now) {
            return Err(ToTestError::PathChanged {
                rule: rule.to_owned(),
                original,
                replaced,
            });
        }
    }
    let unsendable = |decisions: &[Decision]| {
        sendable.and_then(|check| decisions.iter().find_map(|d| check(d).err()))
    };
    let (expect, fails) = match replaced {
        Outcome::Ran(Verdict::Decided(decisions)) => match unsendable(&decisions) {
            None => (expectation(&decisions), None),
            Some(reason) => (
                Value::Null,
                Some(format!(
                    "its decision cannot be sent ({reason}): fix the rule, then replace null by the decision it should make"
                )),
            ),
        },
        Outcome::Ran(Verdict::Skipped) => (Value::Null, None),
        Outcome::Ran(Verdict::Failed(_)) | Outcome::Undecodable(_) => (
            Value::Null,
            Some("replace null by the decision it should make".to_owned()),
        ),
    };
    let name = match fails {
        None => name.to_owned(),
        Some(what) => format!("{name}; the rule still fails on it: {what}"),
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
    let (texts, numbers) = rule_literals(rule);
    let mut placeholders = Placeholders::new(texts, numbers);
    placeholders.fields = rule_fields(rule);
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
                placeholders.prepare(&data, &partition_key);
                fields.insert("data".into(), placeholders.value(&data));
            }
            Err(_) => match std::str::from_utf8(&readable) {
                Ok(text) => {
                    placeholders.prepare(&Value::String(text.to_owned()), &partition_key);
                    fields.insert("data_text".into(), placeholders.text(text).into());
                }
                Err(_) => return Err(ToTestError::Binary),
            },
        }
        partition_key = placeholders.text(&partition_key);
        if placeholders.exhausted {
            return Err(ToTestError::NoPlaceholder);
        }
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

/// Every text the rule spells (its prefilter literals and the strings in its code), and
/// every number in its code, as JSON writes it.
fn rule_literals(rule: &Rule) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut texts: BTreeSet<String> = rule
        .literals
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut numbers = BTreeSet::new();
    rule.ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Expr(expr)) = path.last() {
            match expr {
                Expr::StringConstant(text, _) => {
                    texts.insert(text.to_string());
                }
                Expr::IntegerConstant(n, _) => {
                    numbers.insert(n.to_string());
                }
                Expr::FloatConstant(x, _) => {
                    numbers.extend(number_text(**x));
                }
                Expr::DynamicConstant(value, _) => {
                    collect_literals(value, &mut texts, &mut numbers)
                }
                _ => {}
            }
        }
        true
    });
    texts.retain(|t| t.chars().any(char::is_alphanumeric));
    (texts, numbers)
}

/// The fields the rule reads by name (`record.data.user_id`): a map key it names stays,
/// or the case would no longer reach the value the record holds there.
fn rule_fields(rule: &Rule) -> HashSet<String> {
    let mut fields = HashSet::new();
    rule.ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Expr(Expr::Property(property, _))) = path.last() {
            fields.insert(property.2.to_string());
        }
        true
    });
    fields
}

/// A float as JSON writes it (`2` for `2.0`, as a record's `2` reads).
fn number_text(x: f64) -> Option<String> {
    serde_json::Number::from_f64(x).map(|n| match x.fract() == 0.0 && x.abs() < 1e15 {
        true => (x as i64).to_string(),
        false => n.to_string(),
    })
}

/// Literals in a constant the optimizer folded (an array of literals, say).
fn collect_literals(
    value: &rhai::Dynamic,
    texts: &mut BTreeSet<String>,
    numbers: &mut BTreeSet<String>,
) {
    if let Some(text) = value.read_lock::<rhai::ImmutableString>() {
        texts.insert(text.to_string());
    } else if let Ok(n) = value.as_int() {
        numbers.insert(n.to_string());
    } else if let Ok(x) = value.as_float() {
        numbers.extend(number_text(x));
    } else if let Some(array) = value.read_lock::<rhai::Array>() {
        for item in array.iter() {
            collect_literals(item, texts, numbers);
        }
    } else if let Some(map) = value.read_lock::<rhai::Map>() {
        for item in map.values() {
            collect_literals(item, texts, numbers);
        }
    }
}

/// Whether a map key is an identifier rather than a field name: an email, a number (a
/// phone), a UUID or long hex, or a name with a long run of digits (`acct_4417123`).
fn key_is_identifier(key: &str) -> bool {
    let digits = key.bytes().filter(u8::is_ascii_digit).count();
    let longest_run = key
        .split(|c: char| !c.is_ascii_digit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    let hex = key.chars().filter(char::is_ascii_hexdigit).count();
    key.contains('@')
        || (digits > 0
            && key
                .chars()
                .all(|c| c.is_ascii_digit() || "+-. ()".contains(c)))
        || longest_run >= ID_DIGITS
        || (hex >= 16 && digits > 0 && key.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
}

/// Replaces values by placeholders of the same shape: the same value by the same one,
/// distinct values by distinct ones.
struct Placeholders {
    /// The rule's texts, kept where they appear.
    kept: Vec<String>,
    /// The same, lower-cased and trimmed, and the rule's numbers: a value equal to one of
    /// them is kept whole (a rule may compare `lower(x)` or `trimmed(x)`).
    kept_whole: HashSet<String>,
    /// The fields the rule reads by name: map keys that stay.
    fields: HashSet<String>,
    given: HashMap<String, String>,
    /// Values replaced character for character, for their occurrences inside longer
    /// texts, longest first.
    shaped: Vec<(Vec<char>, Vec<char>)>,
    /// Every text in the record, and every placeholder given: a new placeholder is none of
    /// them, so no two values end up the same.
    taken: HashSet<String>,
    /// Placeholders come from a generator seeded by their order of first use, never from
    /// the value: a placeholder tells nothing of the value it replaces.
    next: u64,
    /// Some value found no free placeholder.
    exhausted: bool,
}

impl Placeholders {
    fn new(texts: BTreeSet<String>, numbers: BTreeSet<String>) -> Self {
        let mut kept_whole: HashSet<String> =
            texts.iter().map(|t| t.trim().to_lowercase()).collect();
        kept_whole.extend(numbers);
        Placeholders {
            kept_whole,
            kept: texts
                .into_iter()
                .filter(|t| t.chars().count() >= KEPT_WITHIN)
                .collect(),
            fields: HashSet::new(),
            given: HashMap::new(),
            shaped: Vec::new(),
            taken: HashSet::new(),
            next: 0,
            exhausted: false,
        }
    }

    /// Notes every text of the record, then gives the shorter ones their placeholders
    /// first, so a longer text that holds one replaces it the same way.
    fn prepare(&mut self, data: &Value, partition_key: &str) {
        let mut texts = vec![partition_key.to_owned()];
        collect_texts(data, &mut texts);
        self.taken.extend(texts.iter().cloned());
        texts.sort_by_key(|t| t.chars().count());
        texts.dedup();
        for text in texts {
            self.text(&text);
        }
    }

    fn value(&mut self, value: &Value) -> Value {
        match value {
            Value::String(text) => Value::String(self.text(text)),
            Value::Number(n) => {
                let written = n.to_string();
                if self.kept_whole.contains(&written) {
                    return value.clone();
                }
                // Any number may be an identifier (a PIN, an account): each is replaced but
                // those the rule spells, its digits before an exponent (the magnitude stays).
                let (mantissa, exponent) = number_digits(&written);
                let replaced = format!("{}{exponent}", self.text(mantissa));
                serde_json::from_str(&replaced).unwrap_or(Value::Null)
            }
            Value::Array(items) => Value::Array(items.iter().map(|v| self.value(v)).collect()),
            Value::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| {
                        // A key stays when the rule reads it by name; it is replaced as a
                        // value is when it looks like an identifier or equals a value
                        // replaced elsewhere (`consents: {"u-123": true}`), and a replaced
                        // value within it is replaced the same way.
                        let key = if self.fields.contains(k) {
                            k.clone()
                        } else if key_is_identifier(k) || self.given.contains_key(k) {
                            self.text(k)
                        } else {
                            self.within(k)
                        };
                        (key, self.value(v))
                    })
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// `text` with the values replaced so far replaced within it the same way, the rest
    /// as it is (a map key that holds an identifier: `consent_u-123`).
    fn within(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (from, to) in &self.shaped {
            let from: String = from.iter().collect();
            if !self.kept.contains(&from) && !self.kept_whole.contains(&from) {
                out = out.replace(&from, &to.iter().collect::<String>());
            }
        }
        out
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
            self.taken.insert(replaced.clone());
            return replaced;
        }
        let chars: Vec<char> = text.chars().collect();
        // Characters fixed already: the rule's texts (as they are), values replaced before
        // (as they were replaced).
        let mut fixed: Vec<Option<char>> = vec![None; chars.len()];
        for kept in &self.kept {
            let kept: Vec<char> = kept.chars().collect();
            for start in 0..chars.len().saturating_sub(kept.len() - 1) {
                if chars[start..start + kept.len()] == kept[..] {
                    for i in start..start + kept.len() {
                        fixed[i] = Some(chars[i]);
                    }
                }
            }
        }
        for (from, to) in &self.shaped {
            if from.len() >= chars.len() {
                continue;
            }
            let mut start = 0;
            while start + from.len() <= chars.len() {
                let end = start + from.len();
                if chars[start..end] == from[..] && fixed[start..end].iter().all(Option::is_none) {
                    for (i, c) in (start..end).zip(to) {
                        fixed[i] = Some(*c);
                    }
                    start = end;
                } else {
                    start += 1;
                }
            }
        }
        // Zeros that open a run of digits stay: a number keeps its magnitude (`0.05` stays
        // below 0.1), and they tell nothing of an identifier.
        for i in 0..chars.len() {
            let opens = (0..i)
                .rev()
                .take_while(|&j| chars[j].is_ascii_digit())
                .all(|j| chars[j] == '0');
            if chars[i] == '0' && opens && fixed[i].is_none() {
                fixed[i] = Some('0');
            }
        }
        let replaceable = chars
            .iter()
            .zip(&fixed)
            .any(|(c, fixed)| fixed.is_none() && c.is_alphanumeric());
        let placeholder = if replaceable {
            let mut found = None;
            for _ in 0..TRIES {
                self.next += 1;
                let candidate = shaped(&chars, &fixed, self.next);
                if !self.taken.contains(&candidate) {
                    found = Some(candidate);
                    break;
                }
            }
            found.unwrap_or_else(|| {
                self.exhausted = true;
                text.to_owned()
            })
        } else {
            let out: String = chars
                .iter()
                .zip(&fixed)
                .map(|(c, fixed)| fixed.unwrap_or(*c))
                .collect();
            if out != text && self.taken.contains(&out) {
                self.exhausted = true;
            }
            out
        };
        if placeholder != text {
            self.taken.insert(placeholder.clone());
            if chars.len() >= KEPT_WITHIN {
                let at = self
                    .shaped
                    .partition_point(|(from, _)| from.len() >= chars.len());
                self.shaped
                    .insert(at, (chars.clone(), placeholder.chars().collect()));
            }
        }
        self.given.insert(text.to_owned(), placeholder.clone());
        placeholder
    }
}

/// A number as JSON writes it, split before its exponent.
fn number_digits(written: &str) -> (&str, &str) {
    let at = written.find(['e', 'E']).unwrap_or(written.len());
    written.split_at(at)
}

/// Every string in a value (map keys that are identifiers included) and every number
/// written out.
fn collect_texts(value: &Value, texts: &mut Vec<String>) {
    match value {
        Value::String(text) => texts.push(text.clone()),
        Value::Number(n) => texts.push(number_digits(&n.to_string()).0.to_owned()),
        Value::Array(items) => items.iter().for_each(|v| collect_texts(v, texts)),
        Value::Object(fields) => {
            for (key, value) in fields {
                if key_is_identifier(key) {
                    texts.push(key.clone());
                }
                collect_texts(value, texts);
            }
        }
        _ => {}
    }
}

/// `chars` with every character not fixed replaced by one of its kind: a digit (not a
/// leading zero), a letter of the same case; the rest stays.
fn shaped(chars: &[char], fixed: &[Option<char>], seed: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut lower = || (b'a' + rng.gen_range(0..26)) as char;
    let mut out = String::with_capacity(chars.len());
    let mut digits = Vec::new();
    for (i, (&c, &fixed)) in chars.iter().zip(fixed).enumerate() {
        let replaced = match (c, fixed) {
            (_, Some(fixed)) => fixed,
            ('0'..='9', None) => {
                digits.push(i);
                '0'
            }
            (c, None) if c.is_uppercase() => lower().to_ascii_uppercase(),
            (c, None) if c.is_alphabetic() => lower(),
            (c, None) => c,
        };
        out.push(replaced);
    }
    // Digits drawn apart, so a number keeps its count of digits (no leading zero).
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut out: Vec<char> = out.chars().collect();
    for i in digits {
        // The first digit of a run but its opening zeros (kept): not a zero.
        let leading = (0..i)
            .rev()
            .take_while(|&j| chars[j].is_ascii_digit())
            .all(|j| chars[j] == '0');
        out[i] = char::from(b'0' + rng.gen_range(u8::from(leading)..10));
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placeholders(texts: &[&str]) -> Placeholders {
        Placeholders::new(
            texts.iter().map(|t| t.to_string()).collect(),
            BTreeSet::new(),
        )
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
        let count = out["count"].as_i64().unwrap();
        assert!(count != 3 && (1..10).contains(&count), "{count}");
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
            case(&set, "r", &binary, false, "n", None),
            Err(ToTestError::Binary)
        ));
        let kept = case(&set, "r", &binary, true, "n", None).unwrap();
        assert_eq!(kept.record["data_hex"], "f3899ac2ff00");
        assert_eq!(kept.record["partition_key"], "pk-1");
        assert!(matches!(
            case(&set, "gone", &binary, true, "n", None),
            Err(ToTestError::NoRule(_))
        ));
        // Text that is not JSON keeps its shape, and the case reads back as a record.
        let text = case(
            &set,
            "r",
            &record(b"user 4417 deleted", "pk-1"),
            false,
            "n",
            None,
        )
        .unwrap();
        let data_text = text.record["data_text"].as_str().unwrap();
        assert_eq!(data_text.len(), "user 4417 deleted".len());
        assert_ne!(data_text, "user 4417 deleted");
        assert_ne!(text.record["partition_key"], "pk-1");
        serde_json::from_value::<RecordJson>(Value::Object(text.record)).unwrap();
    }

    /// The same value is replaced the same way inside longer texts and keys; map keys that
    /// are identifiers, decimals and integers past 64 bits are replaced; numbers the rule
    /// spells stay.
    #[test]
    fn placeholders_reach_keys_numbers_and_longer_texts() {
        let mut p = Placeholders::new(
            ["privacy_request".to_owned()].into(),
            ["10001".to_owned()].into(),
        );
        let data: Value = serde_json::from_str(
            r#"{"type": "privacy_request", "user_id": "u-12345", "message": "deleted u-12345 today",
                "by_id": {"pii@example.org": 1, "4417123456": "x", "name": "n"},
                "amount": 4417123456.78, "big": 123456789012345678901234, "code": 10001,
                "small": 3}"#,
        )
        .unwrap();
        p.prepare(&data, "u-12345");
        let out = p.value(&data);
        let user = out["user_id"].as_str().unwrap();
        assert_ne!(user, "u-12345");
        let message = out["message"].as_str().unwrap();
        assert_eq!(&message[8..15], user, "{message}");
        assert_eq!(p.text("u-12345"), user, "the partition key too");
        let keys: Vec<&String> = out["by_id"].as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 3);
        assert!(keys.iter().any(|k| *k == "name"));
        let text = out.to_string();
        for original in ["pii", "example", "4417123456", "12345678901", "u-12345"] {
            assert!(!text.contains(original), "{original} in {text}");
        }
        assert!(out["amount"].is_f64() && out["big"].is_number(), "{out}");
        assert_eq!(out["code"], 10001);
        assert_ne!(out["small"], 3);
        assert!(!p.exhausted);
    }

    /// Map keys equal to a value replaced elsewhere get its stand-in, but keys the rule
    /// reads; every number is replaced but those the rule names, decimals keeping their
    /// magnitude; booleans stay.
    #[test]
    fn keys_and_short_numbers_do_not_leak() {
        let (_dir, set) = rule_set(
            "fn decide(record) {\n    let d = record.data;\n    if d.version != 2 { return; }\n    if d.ratio < 1.0 { return #{ action: \"a\", key: d.user_id }; }\n}\n",
        );
        let data = json!({
            "version": 2,
            "user_id": "u-123",
            "consents": {"u-123": true, "Jane Doe": 1, "mail_u-123": 2},
            "name": "Jane Doe",
            "pin": 4821,
            "pin_text": "4821",
            "ratio": 0.0523,
            "neg": -0.5,
            "zero": 0,
        });
        let made = case(
            &set,
            "r",
            &record(data.to_string().as_bytes(), ""),
            false,
            "n",
            None,
        )
        .unwrap();
        let out = &made.record["data"];
        let text = out.to_string();
        for original in ["u-123", "Jane", "4821"] {
            assert!(!text.contains(original), "{original} in {text}");
        }
        let user = out["user_id"].as_str().unwrap();
        let consents = out["consents"].as_object().unwrap();
        assert_eq!(consents[user], true, "{text}");
        assert!(
            consents.contains_key(out["name"].as_str().unwrap()),
            "{text}"
        );
        assert!(consents.contains_key(&format!("mail_{user}")), "{text}");
        assert_eq!(out["version"], 2, "a number the rule names stays");
        assert_eq!(out["pin"].to_string(), out["pin_text"].as_str().unwrap());
        assert_eq!(out["pin"].to_string().len(), 4);
        let ratio = out["ratio"].as_f64().unwrap();
        assert!(ratio != 0.0523 && (0.01..0.1).contains(&ratio), "{ratio}");
        let neg = out["neg"].as_f64().unwrap();
        assert!(neg != -0.5 && (-1.0..0.0).contains(&neg), "{neg}");
        assert_eq!(out["zero"], 0);
        assert_eq!(made.expect["key"], user);
    }

    /// Distinct values never share a placeholder, nor take another value's.
    #[test]
    fn placeholders_never_collide() {
        let values: Vec<String> = ('a'..='z')
            .flat_map(|a| ('a'..='j').map(move |b| format!("{a}{b}")))
            .collect();
        let data = Value::Array(values.iter().map(|v| json!(v)).collect());
        let mut p = placeholders(&[]);
        p.prepare(&data, "");
        let out = p.value(&data);
        let replaced: HashSet<&str> = out
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(replaced.len(), values.len());
        assert!(values.iter().all(|v| !replaced.contains(v.as_str())));
        // Too few stand-ins for one-letter values: refused, not merged.
        let letters: Vec<Value> = ('a'..='z').map(|c| json!(c.to_string())).collect();
        let mut p = placeholders(&[]);
        p.prepare(&Value::Array(letters.clone()), "");
        p.value(&Value::Array(letters));
        assert!(p.exhausted);
    }

    fn rule_set(rule: &str) -> (tempfile::TempDir, RuleSet) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.rhai"), rule).unwrap();
        let set = RuleSet::load(dir.path(), None).unwrap();
        (dir, set)
    }

    /// A record whose placeholders would take the rule elsewhere is refused, not printed.
    #[test]
    fn a_case_that_takes_another_path_is_refused() {
        let (_dir, set) = rule_set(
            "fn decide(record) {\n    let id = record.data.id;\n    if id[0] == 'x' {\n        throw \"x ids are refused\";\n    }\n    #{ action: \"a\", key: id }\n}\n",
        );
        let failing = record(br#"{"id": "x-991"}"#, "");
        let err = case(&set, "r", &failing, false, "n", None).unwrap_err();
        assert!(matches!(err, ToTestError::PathChanged { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("the rule fails at line 4") && message.contains("--keep-identifiers"),
            "{message}"
        );
        // Kept as it is, the case fails the way the record did.
        let kept = case(&set, "r", &failing, true, "n", None).unwrap();
        assert_eq!(kept.expect, Value::Null);
        assert!(kept.name.contains("still fails"), "{}", kept.name);
    }

    /// Two outcomes of the same kind by different branches are different paths: the
    /// statements run are compared, and the decisions' form, and whether they can be sent.
    #[test]
    fn the_same_outcome_by_another_branch_is_refused() {
        // The tester's rule: the record's id takes the first branch, a placeholder the second.
        let (_dir, set) = rule_set(
            "fn decide(record) {\n    let uid = record.data.uid;\n    if uid.sub_string(2, 1) == \"7\" {\n        return #{ action: \"a\", key: \"k-\" + uid, params: #{ user_id: #{ x: 1 } } };\n    }\n    #{ action: \"a\", key: \"k-\" + uid, params: #{ user_id: uid } }\n}\n",
        );
        let branching = record(br#"{"uid": "u-77777"}"#, "");
        let err = case(&set, "r", &branching, false, "n", None).unwrap_err();
        assert!(matches!(err, ToTestError::PathChanged { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("line(s) 4"), "{message}");
        assert!(!message.contains("77777"), "{message}");
        // Two "decides nothing" by different returns.
        let (_dir, set) = rule_set(
            "fn decide(record) {\n    if record.data.id.starts_with(\"u\") { return; }\n    return;\n}\n",
        );
        let err = case(
            &set,
            "r",
            &record(br#"{"id": "u-1"}"#, ""),
            false,
            "n",
            None,
        )
        .unwrap_err();
        assert!(matches!(err, ToTestError::PathChanged { .. }), "{err}");
        // The same statements, but a decision that can be sent only on the record.
        let (_dir, set) =
            rule_set("fn decide(record) { #{ action: \"a\", key: \"k\", params: #{ user_id: record.data.user } } }");
        let check = |d: &Decision| match d.params["user_id"] == "u-77" {
            true => Ok(()),
            false => Err("no".to_owned()),
        };
        let err = case(
            &set,
            "r",
            &record(br#"{"user": "u-77"}"#, ""),
            false,
            "n",
            Some(&check),
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot be sent"), "{err}");
        // What parts them is told without a value of the record (an action taken from it).
        let (_dir, set) =
            rule_set("fn decide(record) { #{ action: record.data.act, key: \"k\" } }");
        let leaky = record(br#"{"act": "Secret-u-1"}"#, "");
        let check = |d: &Decision| match d.action == "Secret-u-1" {
            true => Ok(()),
            false => Err("no such action".to_owned()),
        };
        for check in [None, Some(&check as SendCheck)] {
            let err = case(&set, "r", &leaky, false, "n", check).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, ToTestError::PathChanged { .. }) && !message.contains("Secret"),
                "{message}"
            );
        }
        // A path the placeholders keep is not refused.
        let (_dir, set) = rule_set(
            "fn decide(record) {\n    if record.data.id.len() > 3 { return #{ action: \"a\", key: record.data.id }; }\n}\n",
        );
        case(
            &set,
            "r",
            &record(br#"{"id": "u-12345"}"#, ""),
            false,
            "n",
            None,
        )
        .unwrap();
    }

    /// A decision the configured actions cannot send is not expected: the case still fails.
    #[test]
    fn an_unsendable_decision_is_not_expected() {
        let (_dir, set) =
            rule_set("fn decide(record) { #{ action: \"a\", key: \"k\", params: #{ user_id: record.data.user } } }");
        let check = |d: &Decision| match d.params["user_id"].is_string() {
            true => Ok(()),
            false => Err("param user_id is a map or an array".to_owned()),
        };
        let bad = record(br#"{"user": {"id": "u-77"}}"#, "");
        let made = case(&set, "r", &bad, false, "n", Some(&check)).unwrap();
        assert_eq!(made.expect, Value::Null);
        assert!(
            made.name.contains("still fails") && made.name.contains("cannot be sent"),
            "{}",
            made.name
        );
        let good = record(br#"{"user": "u-77"}"#, "");
        let made = case(&set, "r", &good, false, "n", Some(&check)).unwrap();
        assert_eq!(made.expect["key"], "k");
    }

    /// A decode_failed letter's record (damaged gzip): refused without the exact bytes;
    /// with them, the case expects null and says the rule still fails on it, as
    /// `rules test` then does (the record cannot be decoded).
    #[test]
    fn a_record_that_cannot_be_decoded_still_fails() {
        use std::io::Write;
        let (_dir, set) = rule_set("fn decide(record) { #{ action: \"a\", key: \"k\" } }");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(br#"{"user": "u-77"}"#).unwrap();
        let zipped = encoder.finish().unwrap();
        let damaged = record(&zipped[..zipped.len() - 6], "pk");
        assert!(matches!(
            case(&set, "r", &damaged, false, "n", None),
            Err(ToTestError::Binary)
        ));
        let kept = case(&set, "r", &damaged, true, "n", None).unwrap();
        assert_eq!(kept.expect, Value::Null);
        assert!(kept.name.contains("still fails"), "{}", kept.name);
    }
}
