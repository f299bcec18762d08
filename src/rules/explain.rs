//! `rules explain`: why each rule decided what it did on a record, step by step as the
//! daemon runs it: its prefilter, its opening checks (run without Rhai), then the rule
//! itself under the debugger (see [`trace`](super::trace)), so a rule that returned nothing
//! says at which line.
//!
//! One typed [`RuleTrace`] per rule, serializable as JSON, is what the CLI prints (as text
//! or JSON) and what the console shows.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Serialize;

use super::guard::Refusal;
use super::trace::{self, Place};
use super::{Decision, Input, Rule, RuleError, RuleSet, Verdict};
use crate::decode::{self, Readable, Record, Unreadable};

/// Renders the exact request a decision makes (tokens redacted), or says why it cannot be
/// sent. The caller builds it from its config: rules know nothing of actions.
pub type RenderRequest<'a> = &'a dyn Fn(&Decision) -> Result<serde_json::Value, String>;

/// Why one rule decided what it did on one record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleTrace {
    pub rule: String,
    /// The rule file: the lines below are its own.
    pub file: PathBuf,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What a rule did with a record, and where.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// No rule runs: the daemon keeps the record as a `decode_failed` dead letter (damaged
    /// gzip or zlib, a malformed KPL aggregate, a payload past the inflate limit, JSON too
    /// deep to parse, or JSON that does not parse and holds a rule's prefilter literal).
    Undecodable {
        /// What is wrong (`damaged_compression`, `json_invalid`...).
        kind: String,
        reason: String,
    },
    /// Its prefilter kept the record out: the record's bytes hold none of these literals.
    Prefiltered { missing: Vec<String> },
    /// An opening check turned the record away (before any Rhai runs, as in the daemon).
    TurnedAway {
        line: usize,
        /// The field compared, as the rule reads it (`record.data.client`).
        field: String,
        /// What the check wants: the rule's literal, or `a map`.
        expected: String,
        /// What the record holds there: its string, or `None` when missing or not a string.
        found: Option<String>,
    },
    /// `decide` returned nothing: at a `return` on `line`, or by running off its end (then
    /// `line` is its closing brace and `after` the last statement that ran).
    ReturnedNothing {
        line: usize,
        by_return: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        after: Option<usize>,
    },
    /// It threw or hit a limit (a limit has no line: 0).
    Threw {
        line: usize,
        kind: String,
        message: String,
    },
    /// It returned something that is not a decision (`line`: the last statement that ran).
    InvalidDecision { line: Option<usize>, reason: String },
    /// Its decisions, each with the request it makes (when a config was given).
    Decided { decisions: Vec<Explained> },
}

/// A decision and the exact request it makes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explained {
    pub decision: Decision,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<serde_json::Value>,
    /// Why the configured actions cannot send it (the daemon dead-letters it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsendable: Option<String>,
}

impl RuleTrace {
    /// The trace as one or more lines of text for people (the first names the rule).
    pub fn human(&self) -> String {
        let file = self.file.display();
        let what = match &self.outcome {
            Outcome::Undecodable { kind, reason } => format!(
                "not run: the record cannot be decoded ({kind}: {reason}); the daemon keeps it as a decode_failed dead letter"
            ),
            Outcome::Prefiltered { missing } => format!(
                "kept out by its prefilter: the record holds none of {}",
                quoted(missing)
            ),
            Outcome::TurnedAway {
                line,
                field,
                expected,
                found,
            } => {
                let found = match (found, expected.as_str()) {
                    (_, "a map") => "is not a map".to_owned(),
                    (Some(value), _) => format!("is {value:?}, not {expected:?}"),
                    (None, _) => format!("is missing or not a string, not {expected:?}"),
                };
                format!("turned away by the opening check at {file}:{line}: {field} {found}")
            }
            Outcome::ReturnedNothing {
                line,
                by_return: true,
                ..
            } => format!("returned nothing at {file}:{line} (return)"),
            Outcome::ReturnedNothing { line, after, .. } => {
                let after = after.map_or(String::new(), |a| format!(", after line {a}"));
                format!("returned nothing at {file}:{line} (the end of decide{after})")
            }
            Outcome::Threw {
                line: 0, message, ..
            } => {
                format!("threw in {file} (a limit stops a rule wherever it is): {message}")
            }
            Outcome::Threw { line, message, .. } => format!("threw at {file}:{line}: {message}"),
            Outcome::InvalidDecision { line, reason } => {
                let at = line.map_or(file.to_string(), |line| format!("{file}:{line}"));
                format!("returned an invalid decision at {at}: {reason}")
            }
            Outcome::Decided { decisions } => {
                let mut text = format!("decided {} request(s)", decisions.len());
                for explained in decisions {
                    let d = &explained.decision;
                    text += &format!(
                        "\n    {} key {:?} params {}",
                        d.action,
                        d.key,
                        serde_json::Value::Object(d.params.clone())
                    );
                    if let Some(regulation) = &d.regulation {
                        text += &format!(" regulation {regulation}");
                    }
                    if let Some(request) = &explained.request {
                        text += &request_text(request);
                    }
                    if let Some(reason) = &explained.unsendable {
                        text += &format!("\n      cannot be sent: {reason}");
                    }
                }
                text
            }
        };
        format!("{}: {what}", self.rule)
    }
}

fn quoted(literals: &[String]) -> String {
    let quoted: Vec<String> = literals.iter().map(|l| format!("{l:?}")).collect();
    quoted.join(", ")
}

/// A request as `preview` shows it: method and URL, headers, body.
fn request_text(request: &serde_json::Value) -> String {
    let field = |name: &str| request[name].as_str().unwrap_or_default().to_owned();
    let mut text = format!("\n      {} {}", field("method"), field("url"));
    if let Some(headers) = request["headers"].as_object() {
        for (name, value) in headers {
            text += &format!("\n      {name}: {}", value.as_str().unwrap_or_default());
        }
    }
    if !request["body"].is_null() {
        text += &format!("\n      {}", request["body"]);
    }
    text
}

impl RuleSet {
    /// Why each rule decided what it did on `record`, in rule order. With `request`, each
    /// decision also shows the request it makes.
    ///
    /// The record is decoded first, as the daemon decodes it; of a KPL aggregate, this
    /// explains the first sub-record ([`Self::explain_all`] explains each).
    pub fn explain(&self, record: &Record, request: Option<RenderRequest>) -> Vec<RuleTrace> {
        self.explain_all(record, request)
            .into_iter()
            .next()
            .map(|(_, traces)| traces)
            .unwrap_or_default()
    }

    /// [`Self::explain`] for each record the daemon decodes `record` into (one, unless it
    /// is a KPL aggregate), with that record; a record it cannot decode is explained as
    /// such, for every rule.
    pub fn explain_all(
        &self,
        record: &Record,
        request: Option<RenderRequest>,
    ) -> Vec<(Record, Vec<RuleTrace>)> {
        let records = match super::decode_as_daemon(record) {
            Ok(records) => records,
            Err(error) => {
                return vec![(
                    record.clone(),
                    self.undecodable(error.kind.as_str(), &error.reason),
                )]
            }
        };
        records
            .into_iter()
            .map(|sub| {
                let traces = match (&sub.unreadable, self.dead_letter_fault(&sub)) {
                    (Some(error), _) => self.undecodable(error.kind.as_str(), &error.reason),
                    (None, Some(Unreadable::JsonTooDeep)) => {
                        self.undecodable("json_too_deep", "its JSON nests too deep to be parsed")
                    }
                    (None, Some(fault)) => self.undecodable(
                        fault.as_str(),
                        "it looks like JSON and holds a rule's prefilter literal, but does not parse",
                    ),
                    (None, None) => self.explain_decoded(&sub, request),
                };
                (sub, traces)
            })
            .collect()
    }

    fn undecodable(&self, kind: &str, reason: &str) -> Vec<RuleTrace> {
        self.rules
            .iter()
            .map(|rule| RuleTrace {
                rule: rule.name.clone(),
                file: rule.path.clone(),
                outcome: Outcome::Undecodable {
                    kind: kind.to_owned(),
                    reason: reason.to_owned(),
                },
            })
            .collect()
    }

    fn explain_decoded(&self, record: &Record, request: Option<RenderRequest>) -> Vec<RuleTrace> {
        let Readable { bytes, fault } = decode::readable(&record.bytes);
        let eligible = self.prefilter.eligible(&bytes);
        let mut input = Input::new(record, &bytes);
        self.rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let outcome = match &eligible {
                    Some(eligible) if eligible[index] => {
                        self.explain_rule(rule, &mut input, fault, request)
                    }
                    _ => Outcome::Prefiltered {
                        missing: rule.literals.clone().unwrap_or_default(),
                    },
                };
                RuleTrace {
                    rule: rule.name.clone(),
                    file: rule.path.clone(),
                    outcome,
                }
            })
            .collect()
    }

    fn explain_rule(
        &self,
        rule: &Rule,
        input: &mut Input,
        fault: Option<Unreadable>,
        request: Option<RenderRequest>,
    ) -> Outcome {
        if fault == Some(Unreadable::JsonTooDeep) {
            return outcome_of_error(self.read_verdict(rule, input, fault));
        }
        if let Some(guard) = &rule.guard {
            let values = input.guard_values(&self.guard_fields);
            match guard.refusal(&self.guard_fields, values) {
                Some(Refusal::NotAMap { at }) => {
                    return Outcome::TurnedAway {
                        line: at.line().unwrap_or(0),
                        field: "record.data".into(),
                        expected: "a map".into(),
                        found: None,
                    }
                }
                Some(Refusal::Field {
                    at,
                    field,
                    literal,
                    found,
                }) => {
                    return Outcome::TurnedAway {
                        line: at.line().unwrap_or(0),
                        field: format!("record.data.{field}"),
                        expected: literal.to_string(),
                        found,
                    }
                }
                None => {}
            }
        }
        let statements = trace::statements(&rule.ast);
        let (verdict, ran) = trace::record(&statements, || {
            self.call_on(trace::engine(), rule, input.record())
        });
        let last = ran.last.and_then(|at| statements.get(&at));
        match verdict {
            Verdict::Decided(decisions) if decisions.is_empty() => match last {
                Some(statement) if statement.is_return => Outcome::ReturnedNothing {
                    line: statement.line,
                    by_return: true,
                    after: None,
                },
                _ => Outcome::ReturnedNothing {
                    line: end_of_decide(rule),
                    by_return: false,
                    after: last.map(|s| s.line),
                },
            },
            Verdict::Decided(decisions) => Outcome::Decided {
                decisions: decisions
                    .into_iter()
                    .map(|decision| {
                        let rendered = request.map(|render| render(&decision));
                        let (request, unsendable) = match rendered {
                            Some(Ok(request)) => (Some(request), None),
                            Some(Err(reason)) => (None, Some(reason)),
                            None => (None, None),
                        };
                        Explained {
                            decision,
                            request,
                            unsendable,
                        }
                    })
                    .collect(),
            },
            Verdict::Failed(RuleError::Decision { reason, .. }) => Outcome::InvalidDecision {
                line: last.map(|s| s.line),
                reason,
            },
            other => outcome_of_error(other),
        }
    }

    /// The places of the statements rule `index` runs on `record`, or `None` when its
    /// prefilter keeps the record out (for coverage). The opening checks are run in Rhai
    /// here: on a record they turn away, the rule returns nothing just the same.
    pub(super) fn statements_run(&self, index: usize, record: &Record) -> Option<HashSet<Place>> {
        let Readable { bytes, fault } = decode::readable(&record.bytes);
        let eligible = self.prefilter.eligible(&bytes).is_some_and(|e| e[index]);
        if !eligible || fault == Some(Unreadable::JsonTooDeep) {
            return None;
        }
        let rule = &self.rules[index];
        let mut input = Input::new(record, &bytes);
        let statements = trace::statements(&rule.ast);
        let (_, ran) = trace::record(&statements, || {
            self.call_on(trace::engine(), rule, input.record())
        });
        Some(ran.places)
    }
}

fn outcome_of_error(verdict: Verdict) -> Outcome {
    match verdict {
        Verdict::Failed(RuleError::Runtime {
            location,
            kind,
            message,
            ..
        }) => Outcome::Threw {
            line: location.line,
            kind,
            message,
        },
        Verdict::Failed(other) => Outcome::InvalidDecision {
            line: None,
            reason: other.to_string(),
        },
        Verdict::Decided(_) | Verdict::Skipped => Outcome::InvalidDecision {
            line: None,
            reason: "no error where one was expected".into(),
        },
    }
}

/// The line of `decide`'s closing brace.
fn end_of_decide(rule: &Rule) -> usize {
    rule.ast
        .iter_fn_def()
        .find(|f| f.name == "decide" && f.params.len() == 1)
        .and_then(|f| f.body.end_position().line())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: &str = r#"const PREFILTER = ["privacy_request"];

fn decide(record) {
    let event = record.data;
    if type_of(event) != "map" { return; }
    if event.type != "privacy_request" { return; }
    if event.user_id == "boom" { throw "cannot handle " + event.user_id; }
    if event.user_id == "skip" { return; }
    if event.user_id != "end" {
        #{ action: "a", key: event.request_id }
    }
}
"#;

    fn explain(data: &str) -> Outcome {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.rhai"), RULE).unwrap();
        let set = RuleSet::load(dir.path(), None).unwrap();
        let record = crate::decode::RecordJson {
            data_text: Some(data.to_owned()),
            ..serde_json::from_str("{}").unwrap()
        }
        .into_record();
        let mut traces = set.explain(&record, None);
        assert_eq!(traces.len(), 1);
        traces.remove(0).outcome
    }

    #[test]
    fn each_step_says_where_the_rule_stopped() {
        assert_eq!(
            explain(r#"{"type":"other"}"#),
            Outcome::Prefiltered {
                missing: vec!["privacy_request".into()]
            }
        );
        assert_eq!(
            explain(r#"{"type":"x","note":"privacy_request"}"#),
            Outcome::TurnedAway {
                line: 6,
                field: "record.data.type".into(),
                expected: "privacy_request".into(),
                found: Some("x".into()),
            }
        );
        assert_eq!(
            explain(r#"["privacy_request"]"#),
            Outcome::TurnedAway {
                line: 5,
                field: "record.data".into(),
                expected: "a map".into(),
                found: None,
            }
        );
        assert!(
            matches!(explain(r#"{"type":"privacy_request","user_id":"boom"}"#),
                Outcome::Threw { line: 7, ref message, .. } if message.contains("cannot handle boom")),
        );
        assert_eq!(
            explain(r#"{"type":"privacy_request","user_id":"skip"}"#),
            Outcome::ReturnedNothing {
                line: 8,
                by_return: true,
                after: None
            }
        );
        assert_eq!(
            explain(r#"{"type":"privacy_request","user_id":"end"}"#),
            Outcome::ReturnedNothing {
                line: 12,
                by_return: false,
                after: Some(9)
            }
        );
        let Outcome::Decided { decisions } =
            explain(r#"{"type":"privacy_request","user_id":"u","request_id":"r-1"}"#)
        else {
            panic!()
        };
        assert_eq!(decisions[0].decision.key, "r-1");
    }

    fn explain_bytes(bytes: &[u8]) -> Vec<(Record, Vec<RuleTrace>)> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.rhai"), RULE).unwrap();
        let set = RuleSet::load(dir.path(), None).unwrap();
        let record = crate::decode::RecordJson {
            data_base64: Some(bytes.to_vec()),
            ..serde_json::from_str("{}").unwrap()
        }
        .into_record();
        set.explain_all(&record, None)
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// What the daemon cannot decode is said so (it becomes a decode_failed dead letter),
    /// not "kept out by its prefilter"; what it inflates or splits is explained decoded.
    #[test]
    fn records_the_daemon_cannot_decode_are_said_so() {
        let request = br#"{"type":"privacy_request","user_id":"u","request_id":"r-1"}"#;
        let undecodable = |bytes: &[u8]| -> String {
            let explained = explain_bytes(bytes);
            assert_eq!(explained.len(), 1);
            match &explained[0].1[0].outcome {
                Outcome::Undecodable { kind, .. } => {
                    assert!(explained[0].1[0]
                        .human()
                        .contains("decode_failed dead letter"));
                    kind.clone()
                }
                other => panic!("{other:?}"),
            }
        };
        let zipped = gzip(request);
        assert_eq!(
            undecodable(&zipped[..zipped.len() - 6]),
            "damaged_compression"
        );
        let mut aggregate = crate::decode::aggregate(&[("k", request)]);
        let last = aggregate.len() - 1;
        aggregate[last] ^= 0xff;
        assert_eq!(undecodable(&aggregate), "malformed_aggregate");
        assert_eq!(
            undecodable(br#"{"type":"privacy_request","user_id":"#),
            "json_invalid"
        );
        // Inflated, and split, as the daemon does.
        let explained = explain_bytes(&zipped);
        assert!(matches!(explained[0].1[0].outcome, Outcome::Decided { .. }));
        let explained = explain_bytes(&crate::decode::aggregate(&[("k", b"{}"), ("k", request)]));
        assert_eq!(explained.len(), 2);
        assert_eq!(explained[1].0.sub_sequence_number, 1);
        assert!(matches!(explained[1].1[0].outcome, Outcome::Decided { .. }));
    }
}
