//! Dry-run and `preview`: what the rules would do, printed to stdout, with no backend call
//! and no state written.
//!
//! Each would-be action is one block (human) or one JSON line, with the exact request it
//! would send (the bearer token redacted); a summary per rule ends the run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::json;

use crate::actions::{ActionSet, PreparedRequest};
use crate::decode::Record;
use crate::keys::Keys;
use crate::rules::{Decision, RuleError, RuleSet, Verdict};
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

/// The daemon's dedup ledger, to mark requests it has already done.
pub struct Ledger {
    pub keys: Keys,
    pub done: Done,
}

/// Where the ledger is read: a copy read once from the file, or the running daemon, asked
/// for each request (by its keyed hashes, never its key).
pub enum Done {
    Read(HashSet<[u8; 32]>),
    Ask(AskDaemon),
}

/// Whether the daemon has done a request with one of these keyed hashes; `None` when it
/// could not answer.
pub type AskDaemon = Box<dyn Fn(&[[u8; 32]]) -> Option<bool> + Send + Sync>;

impl Ledger {
    fn is_done(&self, action: &str, key: &str) -> Option<bool> {
        let ids = self.keys.request_ids(action, key);
        match &self.done {
            Done::Read(done) => Some(ids.iter().any(|id| done.contains(id))),
            Done::Ask(ask) => ask(&ids),
        }
    }
}

pub struct Preview {
    format: OutputFormat,
    follow: bool,
    ledger: Option<Ledger>,
    tally: Mutex<Tally>,
    /// Dry-run keeps its place in memory only.
    checkpoints: Mutex<HashMap<String, Checkpoint>>,
    records_read: AtomicU64,
    matches: AtomicU64,
    shards_caught_up: AtomicU64,
    /// Set once stdout fails: nothing more is written.
    output_stopped: AtomicBool,
    /// The first write error other than a broken pipe, which [`Preview::finish`] returns
    /// (a reader that went away, `| head`, is no failure).
    write_error: Mutex<Option<std::io::Error>>,
}

impl Preview {
    pub fn new(
        format: OutputFormat,
        follow: bool,
        ledger: Option<Ledger>,
        rule_names: impl IntoIterator<Item = String>,
    ) -> Self {
        let mut tally = Tally::default();
        for name in rule_names {
            tally.rules.insert(name, RuleSummary::default());
        }
        Self {
            format,
            follow,
            ledger,
            tally: Mutex::new(tally),
            checkpoints: Mutex::default(),
            records_read: AtomicU64::new(0),
            matches: AtomicU64::new(0),
            shards_caught_up: AtomicU64::new(0),
            output_stopped: AtomicBool::new(false),
            write_error: Mutex::default(),
        }
    }

    pub fn follow(&self) -> bool {
        self.follow
    }

    pub fn checkpoints(&self) -> std::collections::HashMap<String, Checkpoint> {
        self.checkpoints
            .lock()
            .unwrap()
            .iter()
            .map(|(shard, c)| (shard.clone(), c.clone()))
            .collect()
    }

    pub fn set_checkpoint(&self, shard_id: &str, checkpoint: Checkpoint) {
        self.checkpoints
            .lock()
            .unwrap()
            .insert(shard_id.to_owned(), checkpoint);
    }

    pub fn shard_caught_up(&self) {
        self.shards_caught_up.fetch_add(1, Ordering::Relaxed);
    }

    pub fn shards_caught_up(&self) -> u64 {
        self.shards_caught_up.load(Ordering::Relaxed)
    }

    /// Records read and would-be actions so far (for the progress display).
    pub fn progress(&self) -> (u64, u64) {
        (
            self.records_read.load(Ordering::Relaxed),
            self.matches.load(Ordering::Relaxed),
        )
    }

    /// Runs the rules on one record and prints what they would do. Without `actions`
    /// (offline preview with no config), decisions are shown without their requests.
    pub fn evaluate(&self, rules: &RuleSet, actions: Option<&ActionSet>, record: &Record) {
        self.records_read.fetch_add(1, Ordering::Relaxed);
        for (rule, verdict) in rules.evaluate(record) {
            let decisions = match verdict {
                Verdict::Skipped => {
                    self.count(&rule.name, |_| {});
                    continue;
                }
                Verdict::Failed(error) => {
                    self.count(&rule.name, |s| {
                        s.records_evaluated += 1;
                        s.note_error(&error);
                    });
                    continue;
                }
                Verdict::Decided(decisions) => decisions,
            };
            self.count(&rule.name, |s| {
                s.records_evaluated += 1;
                s.matches += u64::from(!decisions.is_empty());
            });
            for decision in decisions {
                let request = match actions.map(|a| a.prepare(&decision)).transpose() {
                    Ok(request) => request,
                    Err(e) => {
                        let error = RuleError::Unsendable {
                            rule: rule.name.clone(),
                            file: rule.path.clone(),
                            reason: e.to_string(),
                        };
                        self.tally
                            .lock()
                            .unwrap()
                            .rules
                            .entry(rule.name.clone())
                            .or_default()
                            .note_error(&error);
                        continue;
                    }
                };
                self.would_act(&rule.name, &decision, request.as_ref(), record);
            }
        }
    }

    fn count(&self, rule: &str, f: impl FnOnce(&mut RuleSummary)) {
        let mut tally = self.tally.lock().unwrap();
        let summary = tally.rules.entry(rule.to_owned()).or_default();
        summary.records_seen += 1;
        f(summary);
    }

    /// Prints one would-be action.
    fn would_act(
        &self,
        rule: &str,
        decision: &Decision,
        request: Option<&PreparedRequest>,
        record: &Record,
    ) {
        self.matches.fetch_add(1, Ordering::Relaxed);
        let already_done = self
            .ledger
            .as_ref()
            .and_then(|ledger| ledger.is_done(&decision.action, &decision.key));
        let duplicate = {
            let mut tally = self.tally.lock().unwrap();
            let first = tally
                .seen
                .insert((decision.action.clone(), decision.key.clone()));
            // Only a first sighting of a request not yet done would be sent.
            if first && already_done != Some(true) {
                *tally.actions.entry(decision.action.clone()).or_default() += 1;
            }
            !first
        };
        let text = match self.format {
            OutputFormat::Json => {
                let mut line = json!({
                    "type": "action",
                    "rule": rule,
                    "action": decision.action,
                    "key": decision.key,
                    "params": decision.params,
                    "duplicate": duplicate,
                    "already_done": already_done,
                    "shard_id": record.shard_id,
                    "sequence_number": record.sequence_number,
                    "sub_sequence_number": record.sub_sequence_number,
                    "arrival_time": record.arrival_time,
                });
                if let Some(request) = request {
                    line["request"] = request.shown();
                }
                format!("{line}\n")
            }
            OutputFormat::Human => {
                let mut notes = Vec::new();
                if duplicate {
                    notes.push("duplicate: already shown above");
                }
                if already_done == Some(true) {
                    notes.push("already done by the daemon: it would be skipped");
                }
                let notes = if notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", notes.join("; "))
                };
                let mut block = format!(
                    "rule: {rule}\naction: {}\nkey: {}{notes}\nshard: {}\nsequence number: {}\narrival time: {}\n",
                    decision.action,
                    decision.key,
                    record.shard_id,
                    record.sequence_number,
                    record.arrival_time,
                );
                match request {
                    Some(request) => {
                        block.push_str(&format!("{} {}\n", request.method, request.url));
                        for (name, value) in request.redacted_headers() {
                            block.push_str(&format!("{name}: {value}\n"));
                        }
                        block.push_str(&format!("\n{}\n\n", request.body));
                    }
                    None => block.push_str(&format!(
                        "params: {}\n\n",
                        serde_json::Value::Object(decision.params.clone())
                    )),
                }
                block
            }
        };
        self.emit(&text);
    }

    /// Whether stdout has failed (or its reader went away): the run may as well stop.
    pub fn output_stopped(&self) -> bool {
        self.output_stopped.load(Ordering::Relaxed)
    }

    /// Writes to stdout, or remembers why it cannot and writes nothing more.
    fn emit(&self, text: &str) {
        if self.output_stopped() {
            return;
        }
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            self.output_stopped.store(true, Ordering::Relaxed);
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                self.write_error.lock().unwrap().get_or_insert(e);
            }
        }
    }

    /// Prints the summary that ends a dry-run or preview. An error if stdout could not be
    /// written (a broken pipe excepted): output that was lost must not look complete.
    pub fn finish(&self) -> std::io::Result<()> {
        let tally = self.tally.lock().unwrap();
        let text = match self.format {
            OutputFormat::Json => format!(
                "{}\n",
                json!({"type": "summary", "records": self.records_read.load(Ordering::Relaxed), "rules": tally.rules, "actions": tally.actions})
            ),
            OutputFormat::Human => {
                let mut text = format!(
                    "summary: {} records\n",
                    self.records_read.load(Ordering::Relaxed)
                );
                for (name, s) in &tally.rules {
                    text.push_str(&format!(
                        "  rule {name}: {} records seen, {} evaluated (past the prefilter), {} matched, {} errors\n",
                        s.records_seen, s.records_evaluated, s.matches, s.errors
                    ));
                    for e in &s.first_errors {
                        text.push_str(&format!("    error: {e}\n"));
                    }
                }
                for (name, count) in &tally.actions {
                    text.push_str(&format!("  action {name}: {count} would be sent\n"));
                }
                if self.ledger.is_none() && !tally.actions.is_empty() {
                    // The log says why (no state yet, or the daemon holds it).
                    text.push_str(
                        "  (not compared with the daemon's ledger: some may be done already)\n",
                    );
                }
                text
            }
        };
        drop(tally);
        self.emit(&text);
        match self.write_error.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl RuleSummary {
    fn note_error(&mut self, error: &RuleError) {
        self.errors += 1;
        if self.first_errors.len() < FIRST_ERRORS {
            self.first_errors.push(error.to_string());
        }
    }
}
