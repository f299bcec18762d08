//! `rules diff`: "what does my edit change?" Runs two rule sets over the same records and
//! shows the records whose decisions differ, rule by rule, with counts per rule.

use std::collections::BTreeMap;
use std::io::Write;

use serde_json::json;

use crate::decode::Record;
use crate::preview::OutputFormat;
use crate::rules::{Decision, RuleSet, Verdict};

/// What one rule made of one record; an error is compared as "an error", whatever its text
/// (texts name files, which differ between the two directories).
#[derive(Debug, Clone, PartialEq)]
enum Made {
    Decisions(Vec<Decision>),
    Error(String),
}

impl Made {
    fn matched(&self) -> bool {
        matches!(self, Made::Decisions(d) if !d.is_empty())
    }

    fn same_as(&self, other: &Made) -> bool {
        match (self, other) {
            (Made::Error(_), Made::Error(_)) => true,
            (a, b) => a == b,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            Made::Decisions(d) if d.is_empty() => serde_json::Value::Null,
            Made::Decisions(d) => json!(d),
            Made::Error(e) => json!({ "error": e }),
        }
    }
}

fn outcomes(set: &RuleSet, record: &Record) -> BTreeMap<String, Made> {
    set.evaluate(record)
        .into_iter()
        .map(|(rule, verdict)| {
            let made = match verdict {
                Verdict::Skipped => Made::Decisions(Vec::new()),
                Verdict::Decided(d) => Made::Decisions(d),
                Verdict::Failed(e) => Made::Error(e.to_string()),
            };
            (rule.name.clone(), made)
        })
        .collect()
}

#[derive(Debug, Default, serde::Serialize)]
pub struct RuleDiff {
    pub matches_before: u64,
    pub matches_after: u64,
    pub records_changed: u64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct DiffSummary {
    pub records: u64,
    pub differing: u64,
    pub rules: BTreeMap<String, RuleDiff>,
}

/// Compares `before` and `after` on every record and prints each record that differs.
/// `records` carry the input line they came from, if any.
pub fn diff(
    before: &RuleSet,
    after: &RuleSet,
    records: impl IntoIterator<Item = (Option<usize>, Record)>,
    format: OutputFormat,
    out: &mut impl Write,
) -> std::io::Result<DiffSummary> {
    let mut summary = DiffSummary::default();
    let none = Made::Decisions(Vec::new());
    for (line, record) in records {
        summary.records += 1;
        let old = outcomes(before, &record);
        let new = outcomes(after, &record);
        let mut names: Vec<&String> = old.keys().chain(new.keys()).collect();
        names.sort();
        names.dedup();
        let mut changed = BTreeMap::new();
        for name in names {
            let (a, b) = (
                old.get(name).unwrap_or(&none),
                new.get(name).unwrap_or(&none),
            );
            let counts = summary.rules.entry(name.clone()).or_default();
            counts.matches_before += u64::from(a.matched());
            counts.matches_after += u64::from(b.matched());
            if !a.same_as(b) {
                counts.records_changed += 1;
                changed.insert(name.clone(), (a.to_json(), b.to_json()));
            }
        }
        if changed.is_empty() {
            continue;
        }
        summary.differing += 1;
        match format {
            OutputFormat::Json => {
                let rules: serde_json::Map<_, _> = changed
                    .into_iter()
                    .map(|(name, (a, b))| (name, json!({"before": a, "after": b})))
                    .collect();
                let line_json = json!({
                    "type": "difference",
                    "line": line,
                    "shard_id": record.shard_id,
                    "sequence_number": record.sequence_number,
                    "sub_sequence_number": record.sub_sequence_number,
                    "rules": rules,
                });
                writeln!(out, "{line_json}")?;
            }
            OutputFormat::Human => {
                let at = line.map_or(String::new(), |l| format!(" (input line {l})"));
                writeln!(
                    out,
                    "record {} / {}{at}",
                    record.shard_id, record.sequence_number
                )?;
                for (name, (a, b)) in changed {
                    writeln!(out, "  rule {name}:\n    before: {a}\n    after:  {b}")?;
                }
            }
        }
    }
    match format {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            json!({"type": "summary", "records": summary.records, "differing": summary.differing, "rules": summary.rules})
        )?,
        OutputFormat::Human => {
            writeln!(
                out,
                "summary: {} records, {} with different decisions",
                summary.records, summary.differing
            )?;
            for (name, r) in &summary.rules {
                writeln!(
                    out,
                    "  rule {name}: {} matches before, {} after, {} records changed",
                    r.matches_before, r.matches_after, r.records_changed
                )?;
            }
        }
    }
    Ok(summary)
}
