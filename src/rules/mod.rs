//! Rules: Rhai scripts that compliance staff write, one per `*.rhai` file.
//!
//! A rule defines `fn decide(record)` and returns `()` (not mine), a decision map or an array
//! of them. A rule error is never "no match": the caller dead-letters the record.
//! A compiled [`RuleSet`] is immutable, so a reload can swap in a new one between records.

mod engine;
pub mod explain;
mod guard;
mod prefilter;
pub mod reload;
pub mod testing;
pub mod to_test;
mod trace;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{CallFnOptions, Dynamic, Engine, Scope, AST};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::decode::{self, Readable, Record, Unreadable};
use guard::{FieldValues, Guard, GuardFields};
use prefilter::Prefilter;

/// What a rule decided: call `action` for the request identified by `key`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    pub action: String,
    pub key: String,
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// `GDPR` (the default) or `CCPA`: sets the due date in the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regulation: Option<String>,
}

/// A place in a rule file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            // Limits (operations, deadline) stop a rule wherever it is: no line to give.
            0 => write!(f, "{}", self.file.display()),
            line => write!(f, "{}:{}:{}", self.file.display(), line, self.column),
        }
    }
}

/// Errors of the rules stage. Each names the rule file and, where known, the line.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuleError {
    #[error("{0}: cannot read rules: {1}")]
    Io(PathBuf, String),
    #[error("{location}: {message}")]
    Compile { location: Location, message: String },
    #[error("{dir}: no rules (*.rhai files) found")]
    Empty { dir: PathBuf },
    /// An entry of the rules directory that looks like a rule but cannot be one (a dangling
    /// symlink, an entry that cannot be read): refused like a compile error, since the rule
    /// it stood for would otherwise vanish without a word.
    #[error("{path}: {reason}", path = path.display())]
    Entry { path: PathBuf, reason: String },
    /// `decide` failed on a record (runtime error, limit, `throw`).
    #[error("{location}: rule {rule:?} failed: {message}")]
    Runtime {
        rule: String,
        location: Location,
        kind: String,
        message: String,
    },
    /// A decision the configured actions cannot turn into a request (a param the URL
    /// needs is missing, say). The reason names only what the config defines (the action,
    /// the param), never a value, so the log may carry it.
    #[error("{file}: rule {rule:?} made a decision that cannot be sent: {reason}", file = file.display())]
    Unsendable {
        rule: String,
        file: PathBuf,
        reason: String,
    },
    /// `decide` returned something that is not a valid decision.
    #[error("{file}: rule {rule:?} returned an invalid decision: {reason}", file = file.display())]
    Decision {
        rule: String,
        file: PathBuf,
        reason: String,
    },
}

impl RuleError {
    /// A description safe for logs: where and what kind, never values from the record.
    pub fn log_summary(&self) -> String {
        match self {
            RuleError::Runtime { location, kind, .. } => format!("{location}: {kind}"),
            RuleError::Decision { file, .. } => {
                format!("{}: invalid decision", file.display())
            }
            RuleError::Unsendable { file, reason, .. } => {
                format!("{}: decision cannot be sent: {reason}", file.display())
            }
            other => other.to_string(),
        }
    }
}

/// An entry of the rules directory that is not loaded as a rule although it looks like
/// one (`X.RHAI`, a directory named `x.rhai`): named in `rules check` and in the reload log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub path: PathBuf,
    pub reason: &'static str,
}

impl std::fmt::Display for Ignored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ignored: {}", self.path.display(), self.reason)
    }
}

/// One compiled rule.
pub struct Rule {
    pub name: String,
    pub path: PathBuf,
    ast: AST,
    /// Literals of `const PREFILTER`, or else one its guard requires: records whose bytes
    /// contain none are skipped.
    literals: Option<Vec<String>>,
    /// Whether `literals` come from the guard rather than `const PREFILTER`.
    literals_from_guard: bool,
    /// The checks `decide` opens with, run without a Rhai call.
    guard: Option<Guard>,
}

impl Rule {
    /// Whether only records holding one of its literals reach the rule: then a record that
    /// does and cannot be read may be a request.
    pub fn has_prefilter(&self) -> bool {
        self.literals.is_some()
    }

    /// What `rules check` says of the rule's prefilter.
    pub fn prefilter_summary(&self) -> String {
        match (&self.literals, self.literals_from_guard) {
            (Some(literals), false) => format!("prefilter {literals:?}"),
            (Some(literals), true) => format!("prefilter {literals:?}, from its opening checks"),
            (None, _) => "no prefilter: it runs on every event".into(),
        }
    }
}

/// What the rules made of one record ([`RuleSet::run`]).
#[derive(Debug)]
pub struct Run {
    /// (rule index, verdict) for each rule the prefilter let through, in order.
    pub verdicts: Vec<(usize, Verdict)>,
    /// What was wrong with the payload, if anything: for the pipeline to count, and to
    /// dead-letter JSON too deep to read that some rule would have seen.
    pub fault: Option<Unreadable>,
}

/// What one rule made of one record.
#[derive(Debug)]
pub enum Verdict {
    /// The prefilter ruled the record out without running the rule.
    Skipped,
    Decided(Vec<Decision>),
    Failed(RuleError),
}

/// Every rule of a rules directory, compiled, in file-name order.
pub struct RuleSet {
    engine: Arc<Engine>,
    rules: Vec<Rule>,
    prefilter: Prefilter,
    guard_fields: GuardFields,
    /// Action names decisions may use; `None` accepts any (rules check without a config).
    actions: Option<BTreeSet<String>>,
    hash: String,
    ignored: Vec<Ignored>,
}

impl RuleSet {
    /// Compiles every `*.rhai` in `dir`. Returns every compile error, not just the first.
    pub fn load(dir: &Path, actions: Option<BTreeSet<String>>) -> Result<Self, Vec<RuleError>> {
        let engine = Arc::new(engine::sandboxed());
        let RuleFiles {
            files,
            ignored,
            mut errors,
        } = rule_files(dir).map_err(|e| vec![e])?;
        if files.is_empty() && errors.is_empty() {
            return Err(vec![RuleError::Empty {
                dir: dir.to_owned(),
            }]);
        }
        let mut rules = Vec::new();
        let mut hasher = Sha256::new();
        for path in files {
            match compile(&engine, &path) {
                Ok((rule, source)) => {
                    hasher.update(rule.name.as_bytes());
                    hasher.update([0]);
                    hasher.update(source.as_bytes());
                    hasher.update([0]);
                    rules.push(rule);
                }
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(RuleSet {
            engine,
            prefilter: Prefilter::new(rules.iter().map(|r| r.literals.as_deref())),
            guard_fields: GuardFields::new(rules.iter().filter_map(|r| r.guard.as_ref())),
            rules,
            actions,
            hash: hex::encode(&hasher.finalize()[..8]),
            ignored,
        })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Entries of the directory that look like rules but were not loaded, and why.
    pub fn ignored(&self) -> &[Ignored] {
        &self.ignored
    }

    /// A short hash of the rules' names and sources, to tell rule sets apart.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Runs every rule on a record, in order. The record is decoded for the rules only
    /// if some rule's prefilter lets it through, and then once for all of them.
    pub fn evaluate(&self, record: &Record) -> Vec<(&Rule, Verdict)> {
        let mut ran = self.run(record).verdicts.into_iter().peekable();
        self.rules
            .iter()
            .enumerate()
            .map(|(index, rule)| match ran.next_if(|(i, _)| *i == index) {
                Some((_, verdict)) => (rule, verdict),
                None => (rule, Verdict::Skipped),
            })
            .collect()
    }

    /// The rules a record's prefilters let through, run on it: (rule index, verdict) in
    /// order, and what was wrong with the payload. Empty, without allocating, for a record
    /// no rule cares about. The prefilter searches the payload as rules read it
    /// ([`readable`](crate::decode::readable)), so it sees what `record.data` holds. JSON too
    /// deep to parse is not handed to any rule: each rule it passes fails on it, and the
    /// pipeline dead-letters the record instead.
    pub fn run(&self, record: &Record) -> Run {
        let Readable { bytes, fault } = decode::readable(&record.bytes);
        let Some(eligible) = self.prefilter.eligible(&bytes) else {
            return Run {
                verdicts: Vec::new(),
                fault,
            };
        };
        // Past a prefilter literal, bytes that look like JSON but do not parse may be a
        // request cut short: said so even when an opening check (which reads fields
        // without parsing the whole) turns it away. Only for the few records a literal
        // lets through.
        let fault = fault.or_else(|| {
            let prefiltered = self
                .rules
                .iter()
                .zip(&eligible)
                .any(|(rule, eligible)| *eligible && rule.has_prefilter());
            (prefiltered && decode::is_broken_json(&bytes)).then_some(Unreadable::JsonInvalid)
        });
        let mut input = Input::new(record, &bytes);
        let verdicts = self
            .rules
            .iter()
            .enumerate()
            .zip(eligible)
            .filter(|(_, eligible)| *eligible)
            .map(|((index, rule), _)| (index, self.read_verdict(rule, &mut input, fault)))
            .collect();
        Run {
            verdicts,
            fault: fault.or(input.fault),
        }
    }

    /// Why the daemon dead-letters a decoded record as `decode_failed` before any rule
    /// runs, if it does: JSON too deep to parse that some rule would see, or JSON that does
    /// not parse and holds a rule's prefilter literal (as the pipeline decides on a
    /// [`Run`]'s fault).
    pub fn dead_letter_fault(&self, record: &Record) -> Option<Unreadable> {
        let Readable { bytes, fault } = decode::readable(&record.bytes);
        let eligible = self.prefilter.eligible(&bytes)?;
        let seen = eligible.iter().any(|e| *e);
        let prefiltered = self
            .rules
            .iter()
            .zip(&eligible)
            .any(|(rule, eligible)| *eligible && rule.has_prefilter());
        let fault = fault.or_else(|| {
            (prefiltered && decode::is_broken_json(&bytes)).then_some(Unreadable::JsonInvalid)
        });
        match fault {
            Some(Unreadable::JsonTooDeep) if seen => fault,
            Some(Unreadable::JsonInvalid) if prefiltered => fault,
            _ => None,
        }
    }

    /// Runs one rule on a record, prefilter and guard included (what `rules test` does per
    /// case).
    pub fn evaluate_rule(&self, index: usize, record: &Record) -> Verdict {
        let Readable { bytes, fault } = decode::readable(&record.bytes);
        let eligible = self.prefilter.eligible(&bytes).is_some_and(|e| e[index]);
        match eligible {
            true => self.read_verdict(&self.rules[index], &mut Input::new(record, &bytes), fault),
            false => Verdict::Skipped,
        }
    }

    /// [`Self::verdict`], unless the payload cannot be read at all: then the rule fails.
    fn read_verdict(&self, rule: &Rule, input: &mut Input, fault: Option<Unreadable>) -> Verdict {
        if fault != Some(Unreadable::JsonTooDeep) {
            return self.verdict(rule, input);
        }
        Verdict::Failed(RuleError::Runtime {
            rule: rule.name.clone(),
            location: Location {
                file: rule.path.clone(),
                line: 0,
                column: 0,
            },
            kind: "unreadable record".into(),
            message: "the record's JSON nests too deep to be parsed".into(),
        })
    }

    /// Runs one rule that its prefilter let through: its guard, then (if admitted) the rule.
    fn verdict(&self, rule: &Rule, input: &mut Input) -> Verdict {
        if let Some(guard) = &rule.guard {
            if !guard.admits(&self.guard_fields, input.guard_values(&self.guard_fields)) {
                return Verdict::Decided(Vec::new());
            }
        }
        self.call(rule, input.record())
    }

    fn call(&self, rule: &Rule, input: &Dynamic) -> Verdict {
        self.call_on(&self.engine, rule, input)
    }

    /// [`Self::call`] on a given engine (the tracing one, for `rules explain`).
    fn call_on(&self, engine: &Engine, rule: &Rule, input: &Dynamic) -> Verdict {
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        let result = engine::with_deadline(|| {
            engine.call_fn_with_options::<Dynamic>(
                options,
                &mut Scope::new(),
                &rule.ast,
                "decide",
                (input.clone(),),
            )
        });
        match result {
            Ok(value) => match decisions_from(value, self.actions.as_ref()) {
                Ok(decisions) => Verdict::Decided(decisions),
                Err(reason) => Verdict::Failed(RuleError::Decision {
                    rule: rule.name.clone(),
                    file: rule.path.clone(),
                    reason,
                }),
            },
            Err(mut err) => {
                let position = err.position();
                let kind = engine::error_kind(&err);
                err.clear_position();
                let message = match *err {
                    rhai::EvalAltResult::ErrorTerminated(..) => format!(
                        "took longer than {} ms and was stopped",
                        engine::MAX_DURATION.as_millis()
                    ),
                    _ => err.to_string(),
                };
                Verdict::Failed(RuleError::Runtime {
                    rule: rule.name.clone(),
                    location: Location {
                        file: rule.path.clone(),
                        line: position.line().unwrap_or(0),
                        column: position.position().unwrap_or(0),
                    },
                    kind,
                    message,
                })
            }
        }
    }
}

/// A record decoded as the daemon decodes what it reads (gzip or zlib inflated, a KPL
/// aggregate split into its sub-records, each of which may be unreadable on its own), for
/// the authoring tools: a test case, a captured record and a dead letter's record take the
/// daemon's path. `Err`: the daemon dead-letters the whole record as `decode_failed`.
pub fn decode_as_daemon(record: &Record) -> Result<Vec<Record>, Arc<decode::DecodeError>> {
    if let Some(error) = &record.unreadable {
        return Err(error.clone());
    }
    let raw = crate::source::RawRecord {
        sequence_number: record.sequence_number.clone(),
        partition_key: record.partition_key.to_string(),
        arrival_time_millis: 0,
        data: record.bytes.to_vec(),
    };
    let records = decode::decode(&record.stream, &record.shard_id, raw)
        .map_err(|undecodable| Arc::new(undecodable.error))?;
    let single = records.len() == 1;
    Ok(records
        .into_iter()
        .map(|mut sub| {
            sub.arrival_time = record.arrival_time.clone();
            if single {
                sub.sub_sequence_number = record.sub_sequence_number;
            }
            sub
        })
        .collect())
}

/// What a rules directory holds.
struct RuleFiles {
    /// The `*.rhai` files, sorted by file name.
    files: Vec<PathBuf>,
    /// Entries that look like rules and are not loaded, said out loud.
    ignored: Vec<Ignored>,
    /// Entries that stand for a rule that cannot be loaded: they refuse the set.
    errors: Vec<RuleError>,
}

/// Sorts the entries of a rules directory: rules, look-alikes to name, and entries that
/// must refuse the set. A rule never vanishes quietly: a `*.rhai` that turned into a
/// directory or has a case-changed extension is named; a dangling symlink or an entry that
/// cannot be read is an error, like a compile error.
fn rule_files(dir: &Path) -> Result<RuleFiles, RuleError> {
    let io = |e: std::io::Error| RuleError::Io(dir.to_owned(), e.to_string());
    let mut found = RuleFiles {
        files: Vec::new(),
        ignored: Vec::new(),
        errors: Vec::new(),
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                found.errors.push(RuleError::Entry {
                    path: dir.to_owned(),
                    reason: format!("cannot read an entry of the rules directory: {e}"),
                });
                continue;
            }
        };
        let path = entry.path();
        let Some(extension) = path.extension() else {
            continue;
        };
        let exact = extension == "rhai";
        if !exact && !extension.eq_ignore_ascii_case("rhai") {
            continue;
        }
        let mut ignore = |reason| {
            found.ignored.push(Ignored {
                path: path.clone(),
                reason,
            })
        };
        if entry.file_name().to_string_lossy().starts_with('.') {
            // Editors' lock files (`.#x.rhai`, often dangling links) and hidden copies.
            ignore("a hidden file (editors' lock and swap files are hidden)");
            continue;
        }
        if !exact {
            ignore("the extension must be `.rhai`, in lower case");
            continue;
        }
        // Follows a symlink to what it points to.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => found.files.push(path),
            Ok(meta) if meta.is_dir() => ignore("a directory, not a rule file"),
            Ok(_) => ignore("not a regular file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                found.errors.push(RuleError::Entry {
                    path,
                    reason: "a symbolic link to nothing (its target is missing)".into(),
                })
            }
            Err(e) => found.errors.push(RuleError::Entry {
                path,
                reason: format!("cannot read: {e}"),
            }),
        }
    }
    found.files.sort();
    found.ignored.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

fn compile(engine: &Engine, path: &Path) -> Result<(Rule, String), RuleError> {
    let mut source =
        std::fs::read_to_string(path).map_err(|e| RuleError::Io(path.to_owned(), e.to_string()))?;
    // Some Windows editors start UTF-8 files with a byte-order mark; Rhai would refuse it.
    if let Some(rest) = source.strip_prefix('\u{feff}') {
        source = rest.to_owned();
    }
    let at = |line: usize, column: usize, message: String| RuleError::Compile {
        location: Location {
            file: path.to_owned(),
            line,
            column,
        },
        message,
    };
    let ast = engine.compile(&source).map_err(|e| {
        at(
            e.1.line().unwrap_or(1),
            e.1.position().unwrap_or(1),
            e.0.to_string(),
        )
    })?;
    if !ast
        .iter_functions()
        .any(|f| f.name == "decide" && f.params.len() == 1)
    {
        return Err(at(1, 1, "the rule must define `fn decide(record)`".into()));
    }
    let literals = prefilter_literals(engine, &ast, &source)
        .map_err(|(line, message)| at(line, 1, message))?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let guard = Guard::of(&ast);
    let from_guard = guard.as_ref().and_then(Guard::prefilter_literal);
    let (literals, literals_from_guard) = match (literals, from_guard) {
        (Some(declared), _) => (Some(declared), false),
        (None, Some(literal)) => (Some(vec![literal.to_owned()]), true),
        (None, None) => (None, false),
    };
    Ok((
        Rule {
            name,
            path: path.to_owned(),
            guard,
            ast,
            literals,
            literals_from_guard,
        },
        source,
    ))
}

/// Reads `const PREFILTER = [...]` by running the rule's top level once.
fn prefilter_literals(
    engine: &Engine,
    ast: &AST,
    source: &str,
) -> Result<Option<Vec<String>>, (usize, String)> {
    let line = source
        .lines()
        .position(|l| l.contains("PREFILTER"))
        .map_or(1, |i| i + 1);
    let mut scope = Scope::new();
    engine
        .run_ast_with_scope(&mut scope, ast)
        .map_err(|e| (e.position().line().unwrap_or(1), e.to_string()))?;
    let Some(value) = scope.get("PREFILTER") else {
        return Ok(None);
    };
    let expected = || {
        (
            line,
            "PREFILTER must be an array of non-empty strings".to_owned(),
        )
    };
    let array = value.clone().into_array().map_err(|_| expected())?;
    let mut literals = Vec::new();
    for item in array {
        let text = item.into_string().map_err(|_| expected())?;
        if text.is_empty() {
            return Err(expected());
        }
        if let Some(why) = escapable(&text) {
            return Err((
                line,
                format!(
                    "PREFILTER literal {text:?} contains {why}, which producers may write \
                     differently (`\"type\": \"x\"` with a space, `\\/` for `/`, escapes): \
                     records written that way would never reach the rule. Use a part without \
                     it, such as a value alone"
                ),
            ));
        }
        literals.push(text);
    }
    if literals.is_empty() {
        return Err((
            line,
            "PREFILTER is empty: it would skip every record".into(),
        ));
    }
    Ok(Some(literals))
}

/// Why a declared prefilter literal cannot be trusted to match a record's bytes: JSON lets a
/// producer write `"` with spacing around it, `/` as `\/`, and `\` or a control character
/// only escaped, so a literal holding one misses records (and only `\u` escapes make the
/// prefilter step aside). The literals read from opening checks exclude them the same way.
fn escapable(literal: &str) -> Option<String> {
    let c = literal
        .chars()
        .find(|c| matches!(c, '"' | '\\' | '/') || c.is_control())?;
    Some(match c {
        '"' => "a quote (`\"`)".into(),
        '\\' => "a backslash".into(),
        '/' => "a slash (`/`)".into(),
        c => format!("a control character (U+{:04X})", c as u32),
    })
}

/// A record as rules see it, built once and only as far as the rules need: the guard
/// fields (read from the JSON without decoding the rest), or the whole `record` map for
/// a Rhai call. Both are read from the payload as [`decode::readable`] cleaned it.
struct Input<'a> {
    record: &'a Record,
    bytes: &'a [u8],
    guard_values: Option<FieldValues<'a>>,
    map: Option<Dynamic>,
    /// Set when `record.data` was built from JSON-looking bytes that are not JSON.
    fault: Option<Unreadable>,
}

impl<'a> Input<'a> {
    fn new(record: &'a Record, bytes: &'a [u8]) -> Self {
        Input {
            record,
            bytes,
            guard_values: None,
            map: None,
            fault: None,
        }
    }

    fn guard_values(&mut self, fields: &GuardFields) -> &FieldValues<'a> {
        let (bytes, map) = (self.bytes, &self.map);
        self.guard_values.get_or_insert_with(|| match map {
            Some(map) => {
                let map = map.read_lock::<rhai::Map>().expect("the record is a map");
                fields.of_data(map.get("data").unwrap_or(&Dynamic::UNIT))
            }
            None => fields.of_json(bytes),
        })
    }

    /// The read-only `record` map a rule receives.
    fn record(&mut self) -> &Dynamic {
        let (record, bytes, fault) = (self.record, self.bytes, &mut self.fault);
        self.map.get_or_insert_with(|| {
            let (data, data_fault) = decode::read_data(bytes);
            *fault = data_fault;
            let mut map = rhai::Map::new();
            map.insert("data".into(), data);
            map.insert("partition_key".into(), (&*record.partition_key).into());
            map.insert("sequence_number".into(), (&*record.sequence_number).into());
            map.insert(
                "sub_sequence_number".into(),
                Dynamic::from_int(record.sub_sequence_number as rhai::INT),
            );
            map.insert("shard_id".into(), (&*record.shard_id).into());
            map.insert("arrival_time".into(), (&*record.arrival_time).into());
            map.insert("stream".into(), (&*record.stream).into());
            // Shared: every rule gets the same map without a deep copy; read-only: no rule
            // can change what the next one sees.
            Dynamic::from_map(map).into_read_only().into_shared()
        })
    }
}

/// Validates what `decide` returned into typed decisions.
fn decisions_from(
    value: Dynamic,
    actions: Option<&BTreeSet<String>>,
) -> Result<Vec<Decision>, String> {
    if value.is_unit() {
        return Ok(Vec::new());
    }
    if value.is_map() {
        return Ok(vec![decision_from(value, actions)?]);
    }
    if value.is_array() {
        let items = value.into_array().map_err(|t| t.to_string())?;
        return items
            .into_iter()
            .enumerate()
            .map(|(i, item)| decision_from(item, actions).map_err(|e| format!("item {i}: {e}")))
            .collect();
    }
    Err(format!(
        "decide returned a {}; expected () for no match, a decision map or an array of them",
        value.type_name()
    ))
}

fn decision_from(value: Dynamic, actions: Option<&BTreeSet<String>>) -> Result<Decision, String> {
    let Some(map) = value.clone().try_cast::<rhai::Map>() else {
        return Err(format!(
            "expected a decision map, got a {}",
            value.type_name()
        ));
    };
    for field in map.keys() {
        if !["action", "key", "params", "regulation"].contains(&field.as_str()) {
            return Err(format!(
                "unknown field {field:?} (a decision has action, key, params and regulation)"
            ));
        }
    }
    let action = match map.get("action") {
        Some(v) if v.is_string() => v.clone().into_string().unwrap_or_default(),
        Some(v) if !v.is_unit() => {
            return Err(format!("action is a {}, not a string", v.type_name()))
        }
        _ => return Err("missing action".into()),
    };
    if let Some(known) = actions {
        if !known.contains(&action) {
            let names: Vec<&str> = known.iter().map(String::as_str).collect();
            return Err(format!(
                "unknown action {action:?} (configured: {})",
                names.join(", ")
            ));
        }
    }
    let key = match map.get("key") {
        Some(v) if v.is_string() => v.clone().into_string().unwrap_or_default(),
        Some(v) if v.is_int() => v.as_int().unwrap_or_default().to_string(),
        Some(v) if !v.is_unit() => return Err(format!("key is a {}, not a string", v.type_name())),
        _ => return Err("missing key (the request id used for dedup)".into()),
    };
    if key.is_empty() {
        return Err("key is empty".into());
    }
    let params = match map.get("params") {
        None => serde_json::Map::new(),
        Some(v) if v.is_unit() => serde_json::Map::new(),
        Some(v) if v.is_map() => match rhai::serde::from_dynamic::<serde_json::Value>(v) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) => return Err("params must be a map".into()),
            Err(e) => return Err(format!("params: {e}")),
        },
        Some(v) => return Err(format!("params is a {}, not a map", v.type_name())),
    };
    let regulation = match map.get("regulation") {
        None => None,
        Some(v) if v.is_unit() => None,
        Some(v) => match v.clone().into_string().map(|s| s.to_uppercase()) {
            Ok(r) if r == "GDPR" || r == "CCPA" => Some(r),
            _ => return Err("regulation must be \"GDPR\" or \"CCPA\"".into()),
        },
    };
    Ok(Decision {
        action,
        key,
        params,
        regulation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ruleset(
        files: &[(&str, &str)],
        actions: &[&str],
    ) -> Result<(tempfile::TempDir, RuleSet), Vec<RuleError>> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let actions = Some(actions.iter().map(|s| s.to_string()).collect());
        RuleSet::load(dir.path(), actions).map(|rs| (dir, rs))
    }

    fn record(json: &str) -> Record {
        Record {
            stream: "s".into(),
            shard_id: "shardId-000000000000".into(),
            sequence_number: "1".into(),
            sub_sequence_number: 0,
            partition_key: "pk".into(),
            arrival_time: crate::clock::rfc3339(0).into(),
            bytes: json.as_bytes().to_vec().into(),
            unreadable: None,
        }
    }

    const RULE: &str = r#"
const PREFILTER = ["Delete User"];
fn decide(record) {
    let d = record.data;
    if type_of(d) != "map" || d.type != "privacy_request" { return; }
    #{ action: "anonymize_user", key: d.request_id, params: #{ user_id: d.user_id } }
}
"#;

    #[test]
    fn decides_and_prefilters() {
        let (_d, rs) = ruleset(&[("gdpr.rhai", RULE)], &["anonymize_user"]).unwrap();
        let hit = record(
            r#"{"type":"privacy_request","tags":["Delete User"],"request_id":"r-1","user_id":"u-1"}"#,
        );
        let verdicts = rs.evaluate(&hit);
        match &verdicts[0].1 {
            Verdict::Decided(d) => {
                assert_eq!(d[0].key, "r-1");
                assert_eq!(d[0].params["user_id"], "u-1");
            }
            other => panic!("{other:?}"),
        }
        let miss = record(r#"{"type":"privacy_request","request_id":"r-1","user_id":"u-1"}"#);
        assert!(matches!(rs.evaluate(&miss)[0].1, Verdict::Skipped));
        // An escape defeats the literal search, so the rule runs.
        let escaped = record(
            r#"{"type":"privacy_request","tags":["Delete\u0020User"],"request_id":"r-2","user_id":"u-2"}"#,
        );
        assert!(matches!(rs.evaluate(&escaped)[0].1, Verdict::Decided(_)));
    }

    #[test]
    fn a_missing_key_or_unknown_action_is_an_error_not_a_miss() {
        let (_d, rs) = ruleset(&[("gdpr.rhai", RULE)], &["anonymize_user"]).unwrap();
        let r = record(r#"{"type":"privacy_request","tags":["Delete User"],"user_id":"u-1"}"#);
        assert!(
            matches!(&rs.evaluate(&r)[0].1, Verdict::Failed(RuleError::Decision { reason, .. }) if reason.contains("key"))
        );

        let (_d, rs) = ruleset(
            &[(
                "x.rhai",
                "fn decide(r) { #{ action: \"nuke\", key: \"k\" } }",
            )],
            &["anonymize_user"],
        )
        .unwrap();
        assert!(
            matches!(&rs.evaluate(&r)[0].1, Verdict::Failed(RuleError::Decision { reason, .. }) if reason.contains("nuke"))
        );
    }

    #[test]
    fn decisions_are_validated_strictly() {
        let bad = [
            ("#{ action: \"a\", key: \"\" }", "key is empty"),
            (
                "#{ action: \"a\", key: \"k\", extra: 1 }",
                "unknown field \"extra\"",
            ),
            ("#{ key: \"k\" }", "missing action"),
            (
                "#{ action: \"a\", key: \"k\", params: [1] }",
                "params is a array",
            ),
            ("[#{ action: \"a\", key: \"k\" }, 42]", "item 1"),
            ("\"yes\"", "decide returned a string"),
        ];
        for (value, expected) in bad {
            let text = format!("fn decide(r) {{ {value} }}");
            let (_d, rs) = ruleset(&[("v.rhai", &text)], &["a"]).unwrap();
            let verdicts = rs.evaluate(&record("{}"));
            let Verdict::Failed(err) = &verdicts[0].1 else {
                panic!("{value}: {:?}", verdicts[0].1)
            };
            let message = err.to_string();
            assert!(
                message.contains(expected) && message.contains("rule \"v\""),
                "{value}: {message}"
            );
        }
        let (_d, rs) = ruleset(&[("v.rhai", "fn decide(r) { [#{ action: \"a\", key: 7 }, #{ action: \"a\", key: \"k\", params: () }] }")], &["a"]).unwrap();
        let verdicts = rs.evaluate(&record("{}"));
        assert!(matches!(&verdicts[0].1, Verdict::Decided(d) if d.len() == 2 && d[0].key == "7"));
    }

    #[test]
    fn runtime_errors_carry_file_and_line() {
        let (_d, rs) = ruleset(
            &[("boom.rhai", "fn decide(r) {\n  throw \"secret u-1\";\n}")],
            &["a"],
        )
        .unwrap();
        let verdicts = rs.evaluate(&record("{}"));
        let Verdict::Failed(err) = &verdicts[0].1 else {
            panic!()
        };
        let RuleError::Runtime { location, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(location.line, 2);
        assert!(location.file.ends_with("boom.rhai"));
        assert!(!err.log_summary().contains("u-1"), "{}", err.log_summary());
    }

    #[test]
    fn compile_errors_are_all_reported_with_positions() {
        let errs = ruleset(
            &[
                ("a.rhai", "fn decide(r) {\n  let x = ;\n}"),
                ("b.rhai", "fn other() {}"),
                ("c.rhai", RULE),
            ],
            &["anonymize_user"],
        )
        .err()
        .unwrap();
        assert_eq!(errs.len(), 2);
        assert!(errs[0].to_string().contains("a.rhai:2:"), "{}", errs[0]);
        assert!(errs[1].to_string().contains("decide"), "{}", errs[1]);
    }

    #[test]
    fn the_sandbox_blocks_the_outside_and_bounds_work() {
        for text in [
            "fn decide(r) { eval(\"1\") }",
            "import \"x\" as y;\nfn decide(r) { () }",
        ] {
            let errs = ruleset(&[("x.rhai", text)], &["a"]);
            let failed = match errs {
                Err(_) => true,
                Ok((_d, rs)) => matches!(rs.evaluate(&record("{}"))[0].1, Verdict::Failed(_)),
            };
            assert!(failed, "{text}");
        }
        for text in [
            "fn decide(r) { sleep(1); }",
            "fn decide(r) { loop {} }",
            "fn decide(r) { let a = []; loop { a.push(1); } }",
            "fn f(x) { f(x) } fn decide(r) { f(1) }",
        ] {
            let (_d, rs) = ruleset(&[("x.rhai", text)], &["a"]).unwrap();
            assert!(
                matches!(rs.evaluate(&record("{}"))[0].1, Verdict::Failed(_)),
                "{text}"
            );
        }
    }

    #[test]
    fn hostile_rules_cost_at_most_their_limits() {
        let cases = [
            "fn decide(r) { let s = \"x\"; loop { s += s; } }",
            "fn decide(r) { let a = []; loop { a.push(\"xxxxxxxxxxxxxxxx\"); } }",
            "fn decide(r) { let m = #{}; let i = 0; loop { m[`k${i}`] = i; i += 1; } }",
        ];
        for text in cases {
            let (_d, rs) =
                ruleset(&[("x.rhai", text)], &["a"]).unwrap_or_else(|e| panic!("{text}: {e:?}"));
            let started = std::time::Instant::now();
            assert!(
                matches!(rs.evaluate(&record("{}"))[0].1, Verdict::Failed(_)),
                "{text}"
            );
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{text}"
            );
        }
    }

    #[test]
    fn a_rule_within_its_operations_but_past_the_deadline_is_stopped() {
        // Few operations (each a copy of a 512 KiB string), far under MAX_OPERATIONS, but
        // each one slow: only the wall-clock deadline can stop it.
        let text = "fn decide(r) {
    let s = \"x\";
    for i in 0..19 { s += s; }
    let n = 0;
    for i in 0..20000 { n += s.to_upper().len(); }
    n
}";
        let (_d, rs) = ruleset(&[("slow.rhai", text)], &["a"]).unwrap();
        let verdicts = rs.evaluate(&record("{}"));
        let Verdict::Failed(RuleError::Runtime { kind, message, .. }) = &verdicts[0].1 else {
            panic!("{:?}", verdicts[0].1)
        };
        assert_eq!(kind, "took too long");
        assert!(message.contains("took longer than 50 ms"), "{message}");
    }

    #[test]
    fn no_rule_vanishes_quietly() {
        let dir = tempfile::tempdir().unwrap();
        let rule = "fn decide(r) { () }";
        std::fs::write(dir.path().join("a.rhai"), rule).unwrap();
        std::fs::write(dir.path().join("SHOUT.RHAI"), rule).unwrap();
        std::fs::create_dir(dir.path().join("was_a_rule.rhai")).unwrap();
        // A byte-order mark is not a reason to refuse a rule.
        std::fs::write(dir.path().join("bom.rhai"), format!("\u{feff}{rule}")).unwrap();
        let set = RuleSet::load(dir.path(), None).unwrap();
        let names: Vec<&str> = set.rules().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "bom"]);
        let ignored: Vec<String> = set.ignored().iter().map(|i| i.to_string()).collect();
        assert_eq!(ignored.len(), 2, "{ignored:?}");
        assert!(
            ignored[0].contains("SHOUT.RHAI: ignored: the extension"),
            "{ignored:?}"
        );
        assert!(
            ignored[1].contains("was_a_rule.rhai: ignored: a directory"),
            "{ignored:?}"
        );

        // A dangling link refuses the set, as a compile error would.
        std::os::unix::fs::symlink(dir.path().join("gone.rhai"), dir.path().join("b.rhai"))
            .unwrap();
        let errors = RuleSet::load(dir.path(), None).err().unwrap();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let message = errors[0].to_string();
        assert!(
            message.contains("b.rhai: a symbolic link to nothing"),
            "{message}"
        );
    }

    #[test]
    fn declared_literals_a_producer_may_escape_are_refused_at_their_line() {
        for (literal, why) in [
            (r#"\"type\":\"privacy_request\""#, "a quote"),
            ("users/delete", "a slash"),
            (r"C:\\data", "a backslash"),
            (r"Delete\tUser", "a control character (U+0009)"),
        ] {
            let text = format!(
                "// {why}\nconst PREFILTER = [\"ok\", \"{literal}\"];\nfn decide(r) {{ () }}"
            );
            let errors = ruleset(&[("p.rhai", &text)], &["a"]).err().unwrap();
            let message = errors[0].to_string();
            assert!(message.contains("p.rhai:2:"), "{message}");
            assert!(message.contains(why), "{literal}: {message}");
        }
        // What may stay: spaces, punctuation other than those, any letters.
        assert!(ruleset(
            &[(
                "p.rhai",
                "const PREFILTER = [\"Delete User\", \"privacy_request\", \"Löschung: ja!\"];\nfn decide(r) { () }"
            )],
            &["a"]
        )
        .is_ok());
    }

    #[test]
    fn undefined_variables_are_compile_errors() {
        let errs = ruleset(&[("x.rhai", "fn decide(r) {\n  recrod.data\n}")], &["a"])
            .err()
            .unwrap();
        assert!(
            errs[0]
                .to_string()
                .contains("x.rhai:2:3: Undefined variable: recrod"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn helpers_work_and_tolerate_missing_fields() {
        let (_d, rs) = ruleset(
            &[(
                "h.rhai",
                r#"fn decide(r) {
    let d = r.data;
    if !regex_match(d.email, "^[^@]+@example\\.com$") { return; }
    if regex_match(d.missing, "x") || lower(d.missing) != () { throw "missing fields must read as ()"; }
    #{ action: "a", key: sha256_hex(lower(trimmed(d.email))), params: #{ ticket: regex_capture(d.note, "ticket (T-\\d+)") } }
}"#,
            )],
            &["a"],
        )
        .unwrap();
        let verdicts = rs.evaluate(&record(r#"{"email":"jo@elsewhere.com"}"#));
        assert!(
            matches!(&verdicts[0].1, Verdict::Decided(d) if d.is_empty()),
            "{:?}",
            verdicts[0].1
        );
        let verdicts = rs.evaluate(&record(
            r#"{"email":"jo@example.com","note":"see ticket T-42 please"}"#,
        ));
        let Verdict::Decided(d) = &verdicts[0].1 else {
            panic!("{:?}", verdicts[0].1)
        };
        assert_eq!(d[0].key, hex::encode(Sha256::digest("jo@example.com")));
        assert_eq!(d[0].params["ticket"], "T-42");
    }

    #[test]
    fn record_is_read_only_between_rules() {
        let (_d, rs) = ruleset(
            &[
                ("a.rhai", "fn decide(r) { r.data.type = \"changed\"; }"),
                (
                    "b.rhai",
                    "fn decide(r) { if r.data.type == \"orig\" { #{action: \"a\", key: \"k\"} } }",
                ),
            ],
            &["a"],
        )
        .unwrap();
        let verdicts = rs.evaluate(&record(r#"{"type":"orig"}"#));
        assert!(
            matches!(&verdicts[1].1, Verdict::Decided(d) if d.len() == 1),
            "{:?}",
            verdicts[1].1
        );
    }
}
