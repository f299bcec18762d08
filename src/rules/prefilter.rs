//! The literal prefilter: one Aho-Corasick pass over a record's bytes for every rule's
//! `PREFILTER` literals, telling which rules may care about the record.
//!
//! It may only skip work, never change a result: the match is case-sensitive on the decoded
//! bytes, and a record holding a JSON escape (`\u`) goes to every rule, because the escape
//! could spell a literal the byte search cannot see.

use aho_corasick::AhoCorasick;

pub struct Prefilter {
    /// All distinct literals of all rules (a shared literal appears once: with duplicates,
    /// a leftmost-first search would report only one of them and miss rules).
    automaton: Option<AhoCorasick>,
    /// For each distinct literal, the rules that listed it.
    rules_of_literal: Vec<Vec<usize>>,
    /// Per rule: whether it declared a prefilter at all.
    filtered: Vec<bool>,
}

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
        let automaton = (!literals.is_empty())
            .then(|| AhoCorasick::new(&literals).expect("literals are plain strings"));
        Self {
            automaton,
            rules_of_literal,
            filtered,
        }
    }

    /// Per rule: whether it must see a record with these bytes.
    pub fn eligible(&self, bytes: &[u8]) -> Vec<bool> {
        let mut eligible: Vec<bool> = self.filtered.iter().map(|f| !f).collect();
        let Some(automaton) = &self.automaton else {
            return eligible;
        };
        if has_json_escape(bytes) {
            return vec![true; eligible.len()];
        }
        let mut waiting = self.filtered.iter().filter(|f| **f).count();
        for found in automaton.find_overlapping_iter(bytes) {
            for &rule in &self.rules_of_literal[found.pattern().as_usize()] {
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

fn has_json_escape(bytes: &[u8]) -> bool {
    memchr::memmem::find(bytes, b"\\u").is_some()
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
        assert_eq!(
            p.eligible(br#"{"tags":["Delete User"]}"#),
            [true, true, true]
        );
        assert_eq!(p.eligible(br#"{"tags":["CCPA"]}"#), [false, true, true]);
        assert_eq!(p.eligible(br#"{"type":"page_view"}"#), [false, true, false]);
        // Case-sensitive: only the exact bytes count.
        assert_eq!(
            p.eligible(br#"{"tags":["delete user"]}"#),
            [false, true, false]
        );
        // An escape could spell a literal: everyone looks.
        assert_eq!(
            p.eligible(br#"{"tags":["Delete\u0020User"]}"#),
            [true, true, true]
        );
    }

    #[test]
    fn overlapping_literals_are_all_found() {
        let a = literals(&["Delete User"]);
        let b = literals(&["User"]);
        let p = Prefilter::new([Some(a.as_slice()), Some(b.as_slice())].into_iter());
        assert_eq!(p.eligible(b"Delete User"), [true, true]);
    }
}
