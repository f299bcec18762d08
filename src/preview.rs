//! Dry-run: what the rules would do, printed to stdout, with no backend call and no state.
//!
//! Each would-be action is one block (human) or one JSON line, with the exact request it
//! would send (the bearer token redacted); a summary per rule ends the run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::sync::Mutex;

use serde_json::json;

use crate::actions::PreparedRequest;
use crate::decode::Record;
use crate::rules::{Decision, RuleError};
use crate::source::Checkpoint;

/// How many error messages the summary keeps per rule.
const FIRST_ERRORS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Debug, Default, serde::Serialize)]
struct RuleSummary {
    records_seen: u64,
    records_evaluated: u64,
    matches: u64,
    errors: u64,
    first_errors: Vec<String>,
}

#[derive(Default)]
struct Tally {
    rules: BTreeMap<String, RuleSummary>,
    actions: BTreeMap<String, u64>,
    /// (action, key) pairs already printed, to flag duplicates.
    seen: HashSet<(String, String)>,
}

pub struct Preview {
    format: OutputFormat,
    follow: bool,
    tally: Mutex<Tally>,
    /// Dry-run keeps its place in memory only.
    checkpoints: Mutex<HashMap<String, Checkpoint>>,
}

impl Preview {
    pub fn new(
        format: OutputFormat,
        follow: bool,
        rule_names: impl IntoIterator<Item = String>,
    ) -> Self {
        let mut tally = Tally::default();
        for name in rule_names {
            tally.rules.insert(name, RuleSummary::default());
        }
        Self {
            format,
            follow,
            tally: Mutex::new(tally),
            checkpoints: Mutex::default(),
        }
    }

    pub fn follow(&self) -> bool {
        self.follow
    }

    pub fn checkpoint(&self, shard_id: &str) -> Option<Checkpoint> {
        self.checkpoints.lock().unwrap().get(shard_id).cloned()
    }

    pub fn set_checkpoint(&self, shard_id: &str, checkpoint: Checkpoint) {
        self.checkpoints
            .lock()
            .unwrap()
            .insert(shard_id.to_owned(), checkpoint);
    }

    fn with_rule(&self, rule: &str, f: impl FnOnce(&mut RuleSummary)) {
        let mut tally = self.tally.lock().unwrap();
        let summary = tally.rules.entry(rule.to_owned()).or_default();
        summary.records_seen += 1;
        f(summary);
    }

    pub fn rule_skipped(&self, rule: &str) {
        self.with_rule(rule, |_| {});
    }

    pub fn rule_decided(&self, rule: &str, decisions: usize) {
        self.with_rule(rule, |s| {
            s.records_evaluated += 1;
            if decisions > 0 {
                s.matches += 1;
            }
        });
    }

    /// A rule failed on a record (`decided` when it returned a decision that the actions
    /// stage then rejected, already counted as evaluated).
    pub fn rule_failed(&self, rule: &str, error: &RuleError, decided: bool) {
        let mut tally = self.tally.lock().unwrap();
        let summary = tally.rules.entry(rule.to_owned()).or_default();
        if !decided {
            summary.records_seen += 1;
            summary.records_evaluated += 1;
        }
        summary.errors += 1;
        if summary.first_errors.len() < FIRST_ERRORS {
            summary.first_errors.push(error.to_string());
        }
    }

    /// Prints one would-be action.
    pub fn would_act(
        &self,
        rule: &str,
        decision: &Decision,
        request: &PreparedRequest,
        record: &Record,
    ) {
        let duplicate = {
            let mut tally = self.tally.lock().unwrap();
            *tally.actions.entry(decision.action.clone()).or_default() += 1;
            !tally
                .seen
                .insert((decision.action.clone(), decision.key.clone()))
        };
        let headers = request.redacted_headers();
        let text = match self.format {
            OutputFormat::Json => {
                let headers: serde_json::Map<_, _> = headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), json!(v)))
                    .collect();
                let line = json!({
                    "type": "action",
                    "rule": rule,
                    "action": decision.action,
                    "key": decision.key,
                    "duplicate": duplicate,
                    "shard_id": record.shard_id,
                    "sequence_number": record.sequence_number,
                    "arrival_time": record.arrival_time,
                    "request": {
                        "method": request.method.as_str(),
                        "url": request.url,
                        "headers": headers,
                        "body": serde_json::from_str::<serde_json::Value>(&request.body).unwrap_or_default(),
                    },
                });
                format!("{line}\n")
            }
            OutputFormat::Human => {
                let mut block =
                    format!(
                    "rule: {rule}\naction: {}\nkey: {}{}\nshard: {}\nsequence number: {}\n{} {}\n",
                    decision.action,
                    decision.key,
                    if duplicate { " (duplicate: already shown above)" } else { "" },
                    record.shard_id,
                    record.sequence_number,
                    request.method,
                    request.url,
                );
                for (name, value) in headers {
                    block.push_str(&format!("{name}: {value}\n"));
                }
                block.push_str(&format!("\n{}\n\n", request.body));
                block
            }
        };
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }

    /// Prints the summary that ends a dry-run.
    pub fn finish(&self) {
        let tally = self.tally.lock().unwrap();
        let text = match self.format {
            OutputFormat::Json => format!(
                "{}\n",
                json!({"type": "summary", "rules": tally.rules, "actions": tally.actions})
            ),
            OutputFormat::Human => {
                let mut text = String::from("summary\n");
                for (name, s) in &tally.rules {
                    text.push_str(&format!(
                        "  rule {name}: {} records seen, {} evaluated, {} matched, {} errors\n",
                        s.records_seen, s.records_evaluated, s.matches, s.errors
                    ));
                    for e in &s.first_errors {
                        text.push_str(&format!("    error: {e}\n"));
                    }
                }
                for (name, count) in &tally.actions {
                    text.push_str(&format!("  action {name}: {count} would be sent\n"));
                }
                text
            }
        };
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}
