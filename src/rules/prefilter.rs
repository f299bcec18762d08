//! The literal prefilter: one Aho-Corasick pass over a record's bytes for every rule's
//! `PREFILTER` literals, telling which rules may care about the record.
//!
//! It may only skip work, never change a result: the match is case-sensitive on the decoded
//! bytes, and a record holding a JSON escape (`\u`) goes to every rule, because the escape
//! could spell a literal the byte search cannot see.

use aho_corasick::AhoCorasick;

pub struct Prefilter {
    /// All distinct literals of all rules (a shared literal appears once: with duplicates,
    /// a leftmost-first search would report only one of them and miss rules), then the
    /// JSON escape `\u`: one pass looks for both.
    automaton: Option<AhoCorasick>,
    /// For each distinct literal, the rules that listed it.
    rules_of_literal: Vec<Vec<usize>>,
    /// Per rule: whether it declared a prefilter at all.
    filtered: Vec<bool>,
    /// How many did (each of them waits for one of its literals).
    filtered_count: usize,
}

/// The pattern after the literals: a JSON escape.
const ESCAPE: &str = "\\u";

impl Prefilter {
    /// One entry per rule: its literals, or `None` for a rule that sees every record.
    pub fn new<'a>(rules: impl Iterator<Item = Option<&'a [String]>>) -> Self {
        let mut literals: Vec<&str> = Vec::new();
        let mut rules_of_literal: Vec<Vec<usize>> = Vec::new();
        let mut filtered = Vec::new();
        for (index, rule_literals) in rules.enumerate() {
            filtered.push(rule_literals.is_some());
            for literal in rule_literals.unwrap_or_default() {
                match literals.iter().position(|l| l == literal) {
                    Some(at) => rules_of_literal[at].push(index),
                    None => {
                        literals.push(literal);
                        rules_of_literal.push(vec![index]);
                    }
                }
            }
        }
        let automaton = (!literals.is_empty()).then(|| {
            literals.push(ESCAPE);
            AhoCorasick::new(&literals).expect("literals are plain strings")
        });
        Self {
            automaton,
            rules_of_literal,
            filtered_count: filtered.iter().filter(|f| **f).count(),
            filtered,
        }
    }

    /// Per rule: whether it must see a record with these bytes. `None` when no rule must:
    /// most records of a shared stream, answered without allocating.
    pub fn eligible(&self, bytes: &[u8]) -> Option<Vec<bool>> {
        let Some(automaton) = &self.automaton else {
            return Some(vec![true; self.filtered.len()]);
        };
        let unfiltered = || self.filtered.iter().map(|f| !f).collect::<Vec<bool>>();
        let mut eligible = (self.filtered_count < self.filtered.len()).then(unfiltered);
        let mut waiting = self.filtered_count;
        for found in automaton.find_overlapping_iter(bytes) {
            let Some(rules) = self.rules_of_literal.get(found.pattern().as_usize()) else {
                // An escape could spell a literal the byte search cannot see: everyone looks.
                return Some(vec![true; self.filtered.len()]);
            };
            let eligible = eligible.get_or_insert_with(unfiltered);
            for &rule in rules {
                if !eligible[rule] {
                    eligible[rule] = true;
                    waiting -= 1;
                }
            }
            if waiting == 0 {
                break;
            }
        }
        eligible
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn literals(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn shared_literals_reach_every_rule_that_lists_them() {
        let a = literals(&["Delete User"]);
        let b = literals(&["CCPA", "Delete User"]);
        let p = Prefilter::new([Some(a.as_slice()), None, Some(b.as_slice())].into_iter());
        let eligible = |bytes: &[u8]| p.eligible(bytes).unwrap();
        assert_eq!(eligible(br#"{"tags":["Delete User"]}"#), [true, true, true]);
        assert_eq!(eligible(br#"{"tags":["CCPA"]}"#), [false, true, true]);
        assert_eq!(eligible(br#"{"type":"page_view"}"#), [false, true, false]);
        // Case-sensitive: only the exact bytes count.
        assert_eq!(
            eligible(br#"{"tags":["delete user"]}"#),
            [false, true, false]
        );
        // An escape could spell a literal: everyone looks.
        assert_eq!(
            eligible(br#"{"tags":["Delete\u0020User"]}"#),
            [true, true, true]
        );
        // With every rule filtered, a record none cares about costs no allocation.
        let q = Prefilter::new([Some(a.as_slice()), Some(b.as_slice())].into_iter());
        assert_eq!(q.eligible(br#"{"type":"page_view"}"#), None);
        assert_eq!(q.eligible(br#"{"t":"\u0041"}"#), Some(vec![true, true]));
    }

    #[test]
    fn overlapping_literals_are_all_found() {
        let a = literals(&["Delete User"]);
        let b = literals(&["User"]);
        let p = Prefilter::new([Some(a.as_slice()), Some(b.as_slice())].into_iter());
        assert_eq!(p.eligible(b"Delete User"), Some(vec![true, true]));
    }
}
