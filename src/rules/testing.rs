//! `rules test`: each rule's cases from `NAME.test.json` beside `NAME.rhai`.
//!
//! A case gives `record` (its `data` plus any other field; defaults fill the rest) and
//! `expect`: a decision, a list of decisions, or null. The case's bytes (the compact JSON of
//! `data`, or `data_text` exactly as a producer writes it) take the daemon's own path,
//! prefilter and opening checks included, so a wrong literal shows up as a failing case.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::trace::{self, Place};
use super::{Decision, Location, RuleError, RuleSet, Verdict};
use crate::decode::{Record, RecordJson, Unreadable};

/// Whether the configured actions can turn a decision into a request (`Err` says why). The
/// caller builds it from its config: rules know nothing of actions (data flows one way).
pub type SendCheck<'a> = &'a dyn Fn(&Decision) -> Result<(), String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    record: RecordJson,
    expect: Expect,
}

/// One decision equals a list holding only it; null equals `[]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Expect {
    None(()),
    One(Decision),
    Many(Vec<Decision>),
}

impl Expect {
    fn into_list(self) -> Vec<Decision> {
        match self {
            Expect::None(()) => Vec::new(),
            Expect::One(d) => vec![d],
            Expect::Many(list) => list,
        }
    }
}

/// A case whose actual decisions differ from the expected ones.
#[derive(Debug)]
pub struct Failure {
    pub rule: String,
    pub case: String,
    /// The expected and actual decisions (or error), for the author at a terminal: they
    /// hold the case's keys, params and thrown messages, so never for a log.
    pub expected: String,
    pub actual: String,
    /// How it failed, safe for a log: counts, the fields that differ, where it threw.
    pub kind: String,
}

/// What the daemon does with a record, as far as one rule goes: it decodes it first
/// (inflates gzip or zlib, splits a KPL aggregate), and dead-letters as `decode_failed`
/// what it cannot decode, or JSON it cannot parse that some rule would see.
#[derive(Debug)]
pub enum Outcome {
    /// Dead-lettered as `decode_failed`, before the rule ran.
    Undecodable(Unreadable),
    /// The rule's verdict (decisions of every sub-record of an aggregate together).
    Ran(Verdict),
}

/// [`Outcome`] of rule `index` on `record`, taking the daemon's own path.
pub fn outcome(set: &RuleSet, index: usize, record: &Record) -> Outcome {
    let records = match super::decode_as_daemon(record) {
        Ok(records) => records,
        Err(error) => return Outcome::Undecodable(error.kind),
    };
    let mut decisions = Vec::new();
    for sub in records {
        if let Some(error) = &sub.unreadable {
            return Outcome::Undecodable(error.kind);
        }
        if let Some(fault) = set.dead_letter_fault(&sub) {
            return Outcome::Undecodable(fault);
        }
        match set.evaluate_rule(index, &sub) {
            Verdict::Decided(more) => decisions.extend(more),
            failed @ Verdict::Failed(_) => return Outcome::Ran(failed),
            Verdict::Skipped => {}
        }
    }
    Outcome::Ran(Verdict::Decided(decisions))
}

/// What a case got: its decisions, the rule's error, or a record the daemon cannot decode.
#[derive(Debug)]
enum Actual {
    Decided(Vec<Decision>),
    Failed(RuleError),
    Undecodable(Unreadable),
}

/// How a case failed, without a value: what the daemon may log when it refuses a reload.
fn failure_kind(expected: &[Decision], actual: &Actual) -> String {
    let plural = |n: usize| match n {
        1 => "1 decision".to_owned(),
        n => format!("{n} decisions"),
    };
    let actual = match actual {
        Actual::Failed(error) => return format!("the rule failed: {}", error.log_summary()),
        Actual::Undecodable(kind) => return undecodable(*kind),
        Actual::Decided(actual) => actual,
    };
    match actual {
        actual if expected.is_empty() => {
            format!("expected no decision, got {}", plural(actual.len()))
        }
        actual if actual.is_empty() => format!("expected {}, got none", plural(expected.len())),
        actual if actual.len() != expected.len() => {
            format!("expected {}, got {}", plural(expected.len()), actual.len())
        }
        actual => {
            let mut fields = Vec::new();
            let pairs = || expected.iter().zip(actual);
            if pairs().any(|(e, a)| e.action != a.action) {
                fields.push("action");
            }
            if pairs().any(|(e, a)| e.key != a.key) {
                fields.push("key");
            }
            if pairs().any(|(e, a)| e.params != a.params) {
                fields.push("params");
            }
            if pairs().any(|(e, a)| e.regulation != a.regulation) {
                fields.push("regulation");
            }
            format!("the decisions differ in: {}", fields.join(", "))
        }
    }
}

/// What a case's `actual` says of a record the daemon cannot decode.
fn undecodable(kind: Unreadable) -> String {
    format!(
        "the record cannot be decoded ({}): the daemon dead-letters it as decode_failed",
        kind.as_str()
    )
}

/// A case that expects a decision the configured actions cannot send: the rule would
/// dead-letter every such request live, so the set is refused.
#[derive(Debug)]
pub struct Unsendable {
    /// The test file.
    pub file: PathBuf,
    pub case: String,
    pub reason: String,
}

impl std::fmt::Display for Unsendable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: case {:?} expects a decision the configured actions cannot send: {}",
            self.file.display(),
            self.case,
            self.reason
        )
    }
}

/// One case and how it went, in the order run (for `--junit`).
#[derive(Debug)]
pub struct CaseResult {
    pub rule: String,
    /// The test file it is in.
    pub file: PathBuf,
    pub case: String,
    /// `None` when it passed; else expected and actual (or why it cannot be sent).
    pub failure: Option<CaseFailure>,
}

#[derive(Debug, Clone)]
pub enum CaseFailure {
    Differs { expected: String, actual: String },
    Unsendable(String),
}

#[derive(Debug, Default)]
pub struct Report {
    /// Every case run, in order.
    pub cases: Vec<CaseResult>,
    pub passed: usize,
    pub failures: Vec<Failure>,
    /// Cases (counted as failed) whose expected decisions cannot be sent.
    pub unsendable: Vec<Unsendable>,
    /// Rules that have no test file.
    pub untested: Vec<String>,
    /// Per rule, in order, the statements its cases ran (when asked for).
    pub coverage: Vec<Coverage>,
}

/// How much of a rule its test cases ran, counted on the compiled rule's statements.
#[derive(Debug, Clone, PartialEq)]
pub struct Coverage {
    pub rule: String,
    pub statements: usize,
    pub ran: usize,
    /// The lines of the statements no case ran.
    pub never_ran: Vec<usize>,
}

impl Coverage {
    /// Whether at least `percent` of the statements ran.
    pub fn reaches(&self, percent: f64) -> bool {
        self.statements == 0 || self.ran as f64 * 100.0 >= percent * self.statements as f64
    }
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Rounded down to a tenth, never up: 100% only when every statement ran, and never
        // a figure at or past a minimum the exact share misses ([`Self::reaches`]).
        let tenths = match self.statements {
            0 => 1000,
            n => self.ran * 1000 / n,
        };
        let percent = match tenths % 10 {
            0 => format!("{}", tenths / 10),
            tenth => format!("{}.{tenth}", tenths / 10),
        };
        write!(
            f,
            "{}: {percent}% of statements ({} of {})",
            self.rule, self.ran, self.statements
        )?;
        if !self.never_ran.is_empty() {
            let lines: Vec<String> = self.never_ran.iter().map(|l| l.to_string()).collect();
            write!(f, "; never ran: {}", lines.join(", "))?;
        }
        Ok(())
    }
}

/// The test file of a rule.
pub fn test_file(rule_path: &Path) -> PathBuf {
    rule_path.with_extension("test.json")
}

impl Report {
    /// Cases that failed, either way.
    pub fn failed(&self) -> usize {
        self.failures.len() + self.unsendable.len()
    }
}

/// Runs every rule's test cases. Unreadable test files are errors with file:line. With
/// `sendable`, every expected decision must also be one the configured actions can send.
pub fn run(set: &RuleSet, sendable: Option<SendCheck>) -> Result<Report, Vec<RuleError>> {
    run_with(set, sendable, false)
}

/// [`run`], and with `coverage`, which statements of each rule its cases ran (each case is
/// run a second time, under the debugger).
pub fn run_with(
    set: &RuleSet,
    sendable: Option<SendCheck>,
    coverage: bool,
) -> Result<Report, Vec<RuleError>> {
    let mut report = Report::default();
    let mut errors = Vec::new();
    for (index, rule) in set.rules().iter().enumerate() {
        let mut ran: HashSet<Place> = HashSet::new();
        let path = test_file(&rule.path);
        if !path.exists() {
            report.untested.push(rule.name.clone());
        } else {
            match load_cases(&path) {
                Ok(cases) => {
                    for case in cases {
                        if coverage {
                            // Decoded as the case runs (a compressed payload inflated).
                            let record = case.record.clone().into_record();
                            for sub in super::decode_as_daemon(&record).unwrap_or_default() {
                                if sub.unreadable.is_none() && set.dead_letter_fault(&sub).is_none()
                                {
                                    ran.extend(set.statements_run(index, &sub).unwrap_or_default());
                                }
                            }
                        }
                        run_case(set, index, &path, case, sendable, &mut report);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        if coverage {
            let statements = trace::statements(&rule.ast);
            let mut never_ran: Vec<usize> = statements
                .iter()
                .filter(|(place, _)| !ran.contains(place))
                .map(|(_, statement)| statement.line)
                .collect();
            never_ran.sort_unstable();
            never_ran.dedup();
            report.coverage.push(Coverage {
                rule: rule.name.clone(),
                statements: statements.len(),
                ran: statements
                    .keys()
                    .filter(|place| ran.contains(place))
                    .count(),
                never_ran,
            });
        }
    }
    if errors.is_empty() {
        Ok(report)
    } else {
        Err(errors)
    }
}

fn load_cases(path: &Path) -> Result<Vec<Case>, RuleError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| RuleError::Io(path.to_owned(), e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| RuleError::Compile {
        location: Location {
            file: path.to_owned(),
            line: e.line(),
            column: e.column(),
        },
        message: format!("invalid test cases: {e}"),
    })
}

fn run_case(
    set: &RuleSet,
    index: usize,
    file: &Path,
    case: Case,
    sendable: Option<SendCheck>,
    report: &mut Report,
) {
    let record = case.record.into_record();
    let expected = case.expect.into_list();
    // Exactly what the daemon does with a record: decoded first; a rule the prefilter
    // leaves out decides nothing.
    let actual = match outcome(set, index, &record) {
        Outcome::Undecodable(kind) => Actual::Undecodable(kind),
        Outcome::Ran(Verdict::Skipped) => Actual::Decided(Vec::new()),
        Outcome::Ran(Verdict::Decided(decisions)) => Actual::Decided(decisions),
        Outcome::Ran(Verdict::Failed(e)) => Actual::Failed(e),
    };
    // A case the rule passes must also expect only decisions the config can send.
    let unsendable = || sendable.and_then(|check| expected.iter().find_map(|d| check(d).err()));
    let rule = set.rules()[index].name.clone();
    let failure = match actual {
        Actual::Decided(actual) if actual == expected => match unsendable() {
            None => {
                report.passed += 1;
                None
            }
            Some(reason) => {
                report.unsendable.push(Unsendable {
                    file: file.to_owned(),
                    case: case.name.clone(),
                    reason: reason.clone(),
                });
                Some(CaseFailure::Unsendable(reason))
            }
        },
        actual => {
            let failure = Failure {
                rule: rule.clone(),
                case: case.name.clone(),
                expected: decisions_json(&expected),
                kind: failure_kind(&expected, &actual),
                actual: match actual {
                    Actual::Decided(decisions) => decisions_json(&decisions),
                    Actual::Failed(error) => format!("error: {error}"),
                    Actual::Undecodable(kind) => format!("error: {}", undecodable(kind)),
                },
            };
            let differs = CaseFailure::Differs {
                expected: failure.expected.clone(),
                actual: failure.actual.clone(),
            };
            report.failures.push(failure);
            Some(differs)
        }
    };
    report.cases.push(CaseResult {
        rule,
        file: file.to_owned(),
        case: case.name,
        failure,
    });
}

/// `text` with the characters XML 1.0 cannot hold (control characters other than tab, CR
/// and LF, and U+FFFE, U+FFFF) written as escapes (`\u{1}`); with `lines: false`, tab, CR
/// and LF too (an attribute, a name on a terminal line). For JUnit files and the terminal
/// alike: a case name or a thrown message may hold anything.
pub fn escape_controls(text: &str, lines: bool) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| {
        (c.is_control() && !(lines && matches!(c, '\t' | '\n' | '\r')))
            || matches!(c, '\u{FFFE}' | '\u{FFFF}')
    };
    if !text.chars().any(escaped) {
        return text.into();
    }
    text.chars()
        .map(|c| match escaped(c) {
            true => format!("\\u{{{:x}}}", u32::from(c)),
            false => c.to_string(),
        })
        .collect::<String>()
        .into()
}

/// A rule whose cases ran less of it than `--min-coverage` asks: a failing testcase
/// `coverage` in its suite, so CI is red where the run is.
#[derive(Debug, Clone)]
pub struct BelowMinimum {
    pub rule: String,
    pub message: String,
}

/// The report as JUnit XML, which CI systems read: a testsuite per rule (rules without
/// cases included, with none), a testcase per case, a failure with expected and actual,
/// and a failing testcase `coverage` for each rule `below` the minimum coverage.
/// `errors` (rules or test files that cannot be read) become one suite of errors.
pub fn junit(
    set: Option<&RuleSet>,
    report: &Report,
    errors: &[String],
    below: &[BelowMinimum],
) -> String {
    use quick_xml::escape::partial_escape;
    use quick_xml::events::{BytesDecl, BytesText, Event};
    let mut xml = quick_xml::Writer::new_with_indent(Vec::new(), b' ', 2);
    let count = |n: usize| n.to_string();
    let attr = |text: &str| escape_controls(text, false).into_owned();
    let body = |text: &str| escape_controls(text, true).into_owned();
    let rules: Vec<&str> = match set {
        Some(set) => set.rules().iter().map(|r| r.name.as_str()).collect(),
        None => Vec::new(),
    };
    let written = (|| -> std::io::Result<()> {
        xml.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
        let tests = report.cases.len() + errors.len() + below.len();
        xml.create_element("testsuites")
            .with_attribute(("name", "rules test"))
            .with_attribute(("tests", count(tests).as_str()))
            .with_attribute(("failures", count(report.failed() + below.len()).as_str()))
            .with_attribute(("errors", count(errors.len()).as_str()))
            .write_inner_content(|xml| {
                for rule in &rules {
                    let cases: Vec<&CaseResult> =
                        report.cases.iter().filter(|c| c.rule == *rule).collect();
                    let coverage = below.iter().find(|b| b.rule == *rule);
                    let failures = cases.iter().filter(|c| c.failure.is_some()).count()
                        + usize::from(coverage.is_some());
                    let tests = cases.len() + usize::from(coverage.is_some());
                    let rule = attr(rule);
                    let mut suite = xml
                        .create_element("testsuite")
                        .with_attribute(("name", rule.as_str()))
                        .with_attribute(("tests", count(tests).as_str()))
                        .with_attribute(("failures", count(failures).as_str()))
                        .with_attribute(("errors", "0"));
                    let file = cases.first().map(|c| attr(&c.file.to_string_lossy()));
                    if let Some(file) = &file {
                        suite = suite.with_attribute(("file", file.as_str()));
                    }
                    suite.write_inner_content(|xml| {
                        for case in cases {
                            let name = attr(&case.case);
                            let element = xml
                                .create_element("testcase")
                                .with_attribute(("name", name.as_str()))
                                .with_attribute(("classname", rule.as_str()));
                            let (message, text) = match &case.failure {
                                None => {
                                    element.write_empty()?;
                                    continue;
                                }
                                Some(CaseFailure::Differs { expected, actual }) => (
                                    "the decisions differ from the expected ones".to_owned(),
                                    format!("expected: {expected}\nactual:   {actual}"),
                                ),
                                Some(CaseFailure::Unsendable(reason)) => (
                                    "expects a decision the configured actions cannot send"
                                        .to_owned(),
                                    reason.clone(),
                                ),
                            };
                            element.write_inner_content(|xml| {
                                xml.create_element("failure")
                                    .with_attribute(("message", attr(&message).as_str()))
                                    .write_text_content(BytesText::from_escaped(partial_escape(
                                        body(&text),
                                    )))?;
                                Ok(())
                            })?;
                        }
                        if let Some(coverage) = coverage {
                            xml.create_element("testcase")
                                .with_attribute(("name", "coverage"))
                                .with_attribute(("classname", rule.as_str()))
                                .write_inner_content(|xml| {
                                    xml.create_element("failure")
                                        .with_attribute((
                                            "message",
                                            attr(&coverage.message).as_str(),
                                        ))
                                        .write_text_content(BytesText::from_escaped(
                                            partial_escape(body(&coverage.message)),
                                        ))?;
                                    Ok(())
                                })?;
                        }
                        Ok(())
                    })?;
                }
                if !errors.is_empty() {
                    xml.create_element("testsuite")
                        .with_attribute(("name", "rules"))
                        .with_attribute(("tests", count(errors.len()).as_str()))
                        .with_attribute(("failures", "0"))
                        .with_attribute(("errors", count(errors.len()).as_str()))
                        .write_inner_content(|xml| {
                            for (n, error) in errors.iter().enumerate() {
                                xml.create_element("testcase")
                                    .with_attribute(("name", format!("error {}", n + 1).as_str()))
                                    .with_attribute(("classname", "rules"))
                                    .write_inner_content(|xml| {
                                        xml.create_element("error")
                                            .with_attribute(("message", attr(error).as_str()))
                                            .write_text_content(BytesText::from_escaped(
                                                partial_escape(body(error)),
                                            ))?;
                                        Ok(())
                                    })?;
                            }
                            Ok(())
                        })?;
                }
                Ok(())
            })?;
        Ok(())
    })();
    written.expect("writing to memory does not fail");
    let mut text = String::from_utf8(xml.into_inner()).expect("the XML is UTF-8");
    text.push('\n');
    text
}

fn decisions_json(decisions: &[Decision]) -> String {
    match decisions {
        [] => "null (no decision)".into(),
        [one] => serde_json::to_string(one).unwrap_or_default(),
        many => serde_json::to_string(many).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `data_text` gives a case the bytes a producer really writes; the case then passes or
    /// fails as the daemon would on those bytes.
    #[test]
    fn data_text_cases_see_the_producers_bytes() {
        let dir = tempfile::tempdir().unwrap();
        // The opening check gives the rule the prefilter `privacy_request`.
        std::fs::write(
            dir.path().join("r.rhai"),
            "fn decide(record) {\n    if record.data.type != \"privacy_request\" { return; }\n    #{ action: \"a\", key: record.data.id }\n}\n",
        )
        .unwrap();
        let decision = r#"{"action": "a", "key": "k-1"}"#;
        let cases = format!(
            r#"[
  {{"name": "python spacing", "record": {{"data_text": "{{\"type\": \"privacy_request\", \"id\": \"k-1\"}}"}}, "expect": {decision}}},
  {{"name": "an escape in the type", "record": {{"data_text": "{{\"type\": \"privacy\\u005frequest\", \"id\": \"k-1\"}}"}}, "expect": {decision}}},
  {{"name": "the literal in the wrong field only", "record": {{"data_text": "{{\"type\": \"x\", \"note\": \"privacy_request\"}}"}}, "expect": {decision}}}
]"#
        );
        std::fs::write(dir.path().join("r.test.json"), cases).unwrap();
        let set = RuleSet::load(dir.path(), None).unwrap();
        let report = run(&set, None).unwrap();
        assert_eq!(report.passed, 2, "{:?}", report.failures);
        assert_eq!(report.failures.len(), 1);
        assert_eq!(
            report.failures[0].case,
            "the literal in the wrong field only"
        );
        assert_eq!(report.failures[0].actual, "null (no decision)");
    }
}

#[cfg(test)]
mod sendable_tests {
    use super::*;

    #[test]
    fn a_case_expecting_an_unsendable_decision_fails_with_file_case_and_why() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("r.rhai"),
            "fn decide(record) { #{ action: \"a\", key: \"k\", params: record.data } }",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("r.test.json"),
            r#"[{"name": "with id", "record": {"data": {"user_id": "u"}}, "expect": {"action": "a", "key": "k", "params": {"user_id": "u"}}},
                {"name": "without", "record": {"data": {"name": "u"}}, "expect": {"action": "a", "key": "k", "params": {"name": "u"}}}]"#,
        )
        .unwrap();
        let set = RuleSet::load(dir.path(), None).unwrap();
        let needs_user_id = |d: &Decision| match d.params.contains_key("user_id") {
            true => Ok(()),
            false => Err("param \"user_id\" is missing (the URL needs it)".to_owned()),
        };
        let report = run(&set, Some(&needs_user_id)).unwrap();
        assert_eq!((report.passed, report.failed()), (1, 1));
        let message = report.unsendable[0].to_string();
        assert!(
            message.contains("r.test.json: case \"without\""),
            "{message}"
        );
        assert!(
            message.contains("param \"user_id\" is missing"),
            "{message}"
        );
        // Without a config, any decision goes.
        assert_eq!(run(&set, None).unwrap().failed(), 0);
    }
}

#[cfg(test)]
mod coverage_tests {
    use super::*;

    /// Statements in helper functions, loops and `switch` arms count, each where it is.
    #[test]
    fn coverage_counts_every_function_and_branch() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("h.rhai"),
            "fn helper(x) {\n    if x == \"a\" {\n        return 1;\n    }\n    let n = 0;\n    for i in 0..3 { n += i; }\n    n * 1\n}\n\nfn decide(record) {\n    let d = record.data;\n    let h = helper(d.x);\n    if h == 1 { return; }\n    switch d.y {\n        1 => { return; }\n        _ => {}\n    }\n    #{ action: \"a\", key: `k${h}` }\n}\n",
        )
        .unwrap();
        let case = |name: &str, data: &str, expect: &str| {
            format!(r#"{{"name": "{name}", "record": {{"data": {data}}}, "expect": {expect}}}"#)
        };
        let first = case("a", r#"{"x": "a"}"#, "null");
        std::fs::write(dir.path().join("h.test.json"), format!("[{first}]")).unwrap();
        let set = RuleSet::load(dir.path(), None).unwrap();
        let report = run_with(&set, None, true).unwrap();
        assert_eq!(
            report.coverage[0].to_string(),
            "h: 42.8% of statements (6 of 14); never ran: 5, 6, 7, 14, 15, 16, 18"
        );
        assert!(!report.coverage[0].reaches(50.0));
        let all = [
            first,
            case("b", r#"{"x": "b", "y": 1}"#, "null"),
            case(
                "c",
                r#"{"x": "b", "y": 2}"#,
                r#"{"action": "a", "key": "k3"}"#,
            ),
        ];
        std::fs::write(
            dir.path().join("h.test.json"),
            format!("[{}]", all.join(",")),
        )
        .unwrap();
        let report = run_with(&set, None, true).unwrap();
        assert_eq!(report.passed, 3);
        assert_eq!(
            report.coverage[0].to_string(),
            "h: 100% of statements (14 of 14)"
        );
        // Without coverage asked for, none is counted.
        assert!(run(&set, None).unwrap().coverage.is_empty());
    }
}

#[cfg(test)]
mod switch_coverage_tests {
    use super::*;

    /// A `switch` whose arms are plain expressions: each arm counts, and an arm no case
    /// reaches is named by its line.
    #[test]
    fn switch_arms_that_are_expressions_count() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("s.rhai"),
            "fn decide(record) {\n    let key = switch record.data.kind {\n        \"a\" => \"k-a\",\n        \"b\" => \"k-b\",\n        _ => \"k-other\"\n    };\n    #{ action: \"x\", key: key }\n}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("s.test.json"),
            r#"[{"name": "a", "record": {"data": {"kind": "a"}}, "expect": {"action": "x", "key": "k-a"}}]"#,
        )
        .unwrap();
        let set = RuleSet::load(dir.path(), None).unwrap();
        let report = run_with(&set, None, true).unwrap();
        assert_eq!(report.passed, 1, "{:?}", report.failures);
        let coverage = &report.coverage[0];
        assert_eq!(coverage.never_ran, vec![4, 5], "{coverage}");
        assert_eq!(coverage.statements - coverage.ran, 2, "{coverage}");
    }
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    /// A case's bytes are decoded as the daemon decodes them: a gzip payload is inflated,
    /// a damaged one fails the way the daemon fails it (a decode_failed dead letter).
    #[test]
    fn cases_take_the_daemons_decoding() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("r.rhai"),
            "const PREFILTER = [\"erase\"];\nfn decide(record) { #{ action: \"a\", key: record.data.id } }\n",
        )
        .unwrap();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder
            .write_all(br#"{"type":"erase","id":"k-1"}"#)
            .unwrap();
        let zipped = encoder.finish().unwrap();
        let damaged = hex::encode(&zipped[..zipped.len() - 6]);
        let cases = format!(
            r#"[{{"name": "zipped", "record": {{"data_hex": "{}"}}, "expect": {{"action": "a", "key": "k-1"}}}},
               {{"name": "damaged", "record": {{"data_hex": "{damaged}"}}, "expect": null}},
               {{"name": "cut short", "record": {{"data_text": "{{\"type\":\"erase\",\"id\":"}}, "expect": null}}]"#,
            hex::encode(&zipped)
        );
        std::fs::write(dir.path().join("r.test.json"), cases).unwrap();
        let set = RuleSet::load(dir.path(), None).unwrap();
        let report = run(&set, None).unwrap();
        assert_eq!(report.passed, 1, "{:?}", report.failures);
        let failed: Vec<(&str, &str)> = report
            .failures
            .iter()
            .map(|f| (f.case.as_str(), f.kind.as_str()))
            .collect();
        assert_eq!(failed.len(), 2);
        assert!(
            failed[0]
                .1
                .contains("cannot be decoded (damaged_compression)"),
            "{failed:?}"
        );
        assert!(
            failed[1].1.contains("cannot be decoded (json_invalid)"),
            "{failed:?}"
        );
        // Coverage counts what the inflated case ran.
        let report = run_with(&set, None, true).unwrap();
        assert_eq!(report.coverage[0].ran, report.coverage[0].statements);
    }

    /// A case whose hex does not decode is an error of the test file, at its line, not a
    /// case run on an empty event.
    #[test]
    fn a_case_with_bad_hex_is_an_error_of_its_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.rhai"), "fn decide(record) { () }\n").unwrap();
        std::fs::write(
            dir.path().join("r.test.json"),
            "[\n{\"name\": \"odd\", \"record\": {\"data_hex\": \"abc\"}, \"expect\": null}\n]",
        )
        .unwrap();
        let set = RuleSet::load(dir.path(), None).unwrap();
        let errors = run(&set, None).unwrap_err();
        let error = errors[0].to_string();
        assert!(
            error.contains("r.test.json:2") && error.contains("data_hex"),
            "{error}"
        );
    }
}
