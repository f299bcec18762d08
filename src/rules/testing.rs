//! `rules test`: each rule's cases from `NAME.test.json` beside `NAME.rhai`.
//!
//! A case gives `record` (its `data` plus any other field; defaults fill the rest) and
//! `expect`: a decision, a list of decisions, or null. The prefilter applies, to the compact
//! JSON of `data`, so a wrong literal shows up as a failing case.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Decision, Location, RuleError, RuleSet, Verdict};
use crate::decode::RecordJson;

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
    pub expected: String,
    pub actual: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub passed: usize,
    pub failures: Vec<Failure>,
    /// Rules that have no test file.
    pub untested: Vec<String>,
}

/// The test file of a rule.
pub fn test_file(rule_path: &Path) -> PathBuf {
    rule_path.with_extension("test.json")
}

/// Runs every rule's test cases. Unreadable test files are errors with file:line.
pub fn run(set: &RuleSet) -> Result<Report, Vec<RuleError>> {
    let mut report = Report::default();
    let mut errors = Vec::new();
    for (index, rule) in set.rules().iter().enumerate() {
        let path = test_file(&rule.path);
        if !path.exists() {
            report.untested.push(rule.name.clone());
            continue;
        }
        match load_cases(&path) {
            Ok(cases) => {
                for case in cases {
                    run_case(set, index, case, &mut report);
                }
            }
            Err(e) => errors.push(e),
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

fn run_case(set: &RuleSet, index: usize, case: Case, report: &mut Report) {
    let record = case.record.into_record();
    let expected = case.expect.into_list();
    let actual = match set.evaluate_rule(index, &record) {
        Verdict::Skipped => Ok(Vec::new()),
        Verdict::Decided(decisions) => Ok(decisions),
        Verdict::Failed(e) => Err(e.to_string()),
    };
    match actual {
        Ok(actual) if actual == expected => report.passed += 1,
        actual => report.failures.push(Failure {
            rule: set.rules()[index].name.clone(),
            case: case.name,
            expected: decisions_json(&expected),
            actual: match actual {
                Ok(decisions) => decisions_json(&decisions),
                Err(error) => format!("error: {error}"),
            },
        }),
    }
}

fn decisions_json(decisions: &[Decision]) -> String {
    match decisions {
        [] => "null (no decision)".into(),
        [one] => serde_json::to_string(one).unwrap_or_default(),
        many => serde_json::to_string(many).unwrap_or_default(),
    }
}
