//! Guards: the early returns a rule opens with, checked in Rust before running it.
//!
//! Most rules begin by ruling out records that are not theirs:
//!
//! ```rhai
//! fn decide(record) {
//!     let event = record.data;
//!     if type_of(event) != "map" { return; }
//!     if event.type != "privacy_request" { return; }
//!     ...
//! ```
//!
//! Those opening checks are read from the compiled rule. A record that fails one gets the
//! answer the rule itself would give (no decision) without a Rhai call, which is most of
//! the cost of a rule on a shared stream. Only the exact shapes above are recognised, in
//! order, and the first statement of any other shape ends the guard, so a guard never
//! turns away a record the rule would decide on, and never hides an error the rule would
//! raise (a field read before the map check ends the guard).

use std::borrow::Cow;

use rhai::{ASTNode, Dynamic, Expr, ImmutableString, Position, Stmt, AST};
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// The opening checks of one rule's `decide`.
#[derive(Debug, Clone)]
pub struct Guard {
    /// Fields of `record.data` that must hold these strings.
    fields: Vec<(ImmutableString, ImmutableString)>,
    /// Where the checks are in the rule file (for `rules explain`): the map check, then
    /// one per field, in order.
    map_check: Position,
    field_checks: Vec<Position>,
}

/// Two guards are equal when they check the same things, wherever they are written.
impl PartialEq for Guard {
    fn eq(&self, other: &Self) -> bool {
        self.fields == other.fields
    }
}

/// The opening check that turned a record away, and what it compared.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// `record.data` is not a map.
    NotAMap { at: Position },
    /// A field of `record.data` does not hold the check's literal: `found` is its string, or
    /// `None` when it is missing or not a string.
    Field {
        at: Position,
        field: ImmutableString,
        literal: ImmutableString,
        found: Option<String>,
    },
}

impl Guard {
    /// The guard of `decide`, if it opens with at least `type_of(data) != "map"`.
    pub fn of(ast: &AST) -> Option<Guard> {
        let decide = ast
            .iter_functions()
            .find(|f| f.name == "decide" && f.params.len() == 1)?;
        let param: ImmutableString = decide.params[0].into();
        let only_decide = ast
            .clone_functions_only_filtered(|_, _, _, name, params| name == "decide" && params == 1);
        let mut reader = Reader {
            param,
            alias: None,
            map_checked: None,
            fields: Vec::new(),
            field_checks: Vec::new(),
        };
        only_decide.walk(&mut |path: &[ASTNode]| match path {
            // The body's statements, in order (deeper nodes need no visit).
            [ASTNode::Stmt(stmt)] => reader.read(stmt),
            _ => true,
        });
        reader.map_checked.map(|map_check| Guard {
            fields: reader.fields,
            map_check,
            field_checks: reader.field_checks,
        })
    }

    /// A text the bytes of every record this guard admits contain: the rule's prefilter
    /// when it declares none. A JSON string equal to a literal holds it byte for byte
    /// unless it is written with escapes; a `\u` escape sends the record to every rule
    /// anyway (see the prefilter), and the other escapes spell `"`, `\`, `/` or control
    /// characters, so literals holding those are not used. Of the rest, the longest: the
    /// rarest, as a guess.
    pub fn prefilter_literal(&self) -> Option<&str> {
        let searchable = |literal: &&str| {
            !literal.is_empty()
                && !literal.contains(|c: char| matches!(c, '"' | '\\' | '/') || c.is_control())
        };
        self.fields
            .iter()
            .map(|(_, literal)| literal.as_str())
            .filter(searchable)
            .max_by_key(|literal| literal.len())
    }

    /// The first check that turns away a record whose guard fields hold `values`, if one
    /// does: what [`Guard::admits`] decides, with the reason (for `rules explain`).
    pub fn refusal(&self, names: &GuardFields, values: &FieldValues) -> Option<Refusal> {
        let Some(values) = values else {
            return Some(Refusal::NotAMap { at: self.map_check });
        };
        self.fields
            .iter()
            .zip(&self.field_checks)
            .find_map(|((field, literal), at)| {
                let found = names.index(field).and_then(|i| values[i].as_deref());
                (found != Some(literal.as_str())).then(|| Refusal::Field {
                    at: *at,
                    field: field.clone(),
                    literal: literal.clone(),
                    found: found.map(str::to_owned),
                })
            })
    }

    /// Whether the rule must run on a record whose guard fields hold `values`.
    pub fn admits(&self, names: &GuardFields, values: &FieldValues) -> bool {
        let Some(values) = values else {
            return false;
        };
        self.fields.iter().all(|(field, literal)| {
            names
                .index(field)
                .and_then(|i| values[i].as_deref())
                .is_some_and(|value| value == literal.as_str())
        })
    }
}

/// The fields the guards of a rule set read: a record's values for them are looked up
/// once for all rules.
#[derive(Debug, Default)]
pub struct GuardFields(Vec<ImmutableString>);

/// A record's values for the [`GuardFields`], in their order: `None` when `record.data` is
/// not a map; a field that is missing or holds something other than a string is `None`.
pub type FieldValues<'a> = Option<Vec<Option<Cow<'a, str>>>>;

impl GuardFields {
    pub fn new<'g>(guards: impl Iterator<Item = &'g Guard>) -> Self {
        let mut names: Vec<ImmutableString> = Vec::new();
        for (field, _) in guards.flat_map(|g| &g.fields) {
            if !names.contains(field) {
                names.push(field.clone());
            }
        }
        GuardFields(names)
    }

    fn index(&self, field: &ImmutableString) -> Option<usize> {
        self.0.iter().position(|name| name == field)
    }

    /// The values in a decoded `record.data`.
    pub fn of_data(&self, data: &Dynamic) -> FieldValues<'static> {
        let map = data.read_lock::<rhai::Map>()?;
        Some(
            self.0
                .iter()
                .map(|name| {
                    let value = map.get(name.as_str())?;
                    let text = value.read_lock::<ImmutableString>()?;
                    Some(Cow::Owned(text.to_string()))
                })
                .collect(),
        )
    }

    /// The values straight from a JSON payload, without decoding the rest of it: what
    /// [`GuardFields::of_data`] finds in [`rule_data`](crate::decode::rule_data) of the same
    /// bytes. Anything but a well-formed JSON object is not a map.
    pub fn of_json<'a>(&self, bytes: &'a [u8]) -> FieldValues<'a> {
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return None;
        }
        let mut json = serde_json::Deserializer::from_slice(bytes);
        let values = json.deserialize_map(TopLevel(self)).ok()?;
        json.end().ok()?;
        Some(values)
    }
}

/// Reads a JSON object, keeping the guard fields' strings (the last of duplicate keys
/// wins, as in the decoded map) and skipping everything else.
struct TopLevel<'n>(&'n GuardFields);

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = Vec<Option<Cow<'de, str>>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values = vec![None; self.0 .0.len()];
        while let Some(Text(key)) = map.next_key::<Text>()? {
            match key.and_then(|key| self.0 .0.iter().position(|name| name.as_str() == key)) {
                Some(index) => values[index] = map.next_value::<Text>()?.0,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(values)
    }
}

/// A JSON value: its text if it is a string (borrowed when it has no escapes), else
/// skipped.
struct Text<'de>(Option<Cow<'de, str>>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Text(Some(Cow::Borrowed(text))))
    }

    fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Text(Some(Cow::Owned(text.to_owned()))))
    }

    fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
        Ok(Text(Some(Cow::Owned(text))))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Text(None))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Text(None))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Text(None))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Text(None))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Text(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Text(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Text(None))
    }
}

/// Reads `decide`'s opening statements one by one while they have a guard's shape.
struct Reader {
    param: ImmutableString,
    /// A variable holding `record.data` (`let event = record.data;`).
    alias: Option<ImmutableString>,
    /// Where the map check is, once read.
    map_checked: Option<Position>,
    fields: Vec<(ImmutableString, ImmutableString)>,
    field_checks: Vec<Position>,
}

impl Reader {
    /// Takes in one statement; `false` ends the guard (and the walk).
    fn read(&mut self, stmt: &Stmt) -> bool {
        match stmt {
            Stmt::Var(var, ..) if self.alias.is_none() && self.is_data(&var.1) => {
                if var.0.name == self.param {
                    return false;
                }
                self.alias = Some(var.0.name.clone());
                true
            }
            Stmt::If(flow, at) if returns_nothing(&flow.body) && flow.branch.is_empty() => {
                self.read_condition(&flow.expr, *at)
            }
            _ => false,
        }
    }

    /// `type_of(DATA) != "map"` or, after it, `DATA.field != "literal"`.
    fn read_condition(&mut self, condition: &Expr, at: Position) -> bool {
        let Expr::FnCall(call, _) = condition else {
            return false;
        };
        let (Some(rhai::Token::NotEqualsTo), [left, Expr::StringConstant(literal, _)]) =
            (&call.op_token, call.args.as_slice())
        else {
            return false;
        };
        match left {
            Expr::FnCall(type_of, _)
                if type_of.name == "type_of"
                    && type_of.namespace.is_empty()
                    && type_of.args.len() == 1
                    && self.is_data(&type_of.args[0])
                    && literal == "map" =>
            {
                self.map_checked = Some(at);
                true
            }
            _ if self.map_checked.is_some() => match self.data_field(left) {
                Some(field) => {
                    self.fields.push((field, literal.clone()));
                    self.field_checks.push(at);
                    true
                }
                None => false,
            },
            _ => false,
        }
    }

    /// `record.data`, or the variable holding it.
    fn is_data(&self, expr: &Expr) -> bool {
        match expr {
            Expr::Variable(var, ..) => Some(&var.1) == self.alias.as_ref() && var.2.is_empty(),
            Expr::Dot(dot, flags, _) => {
                flags.is_empty() && self.is_param(&dot.lhs) && is_property(&dot.rhs, "data")
            }
            _ => false,
        }
    }

    /// The field in `ALIAS.field` or `record.data.field`.
    fn data_field(&self, expr: &Expr) -> Option<ImmutableString> {
        let Expr::Dot(dot, flags, _) = expr else {
            return None;
        };
        if !flags.is_empty() {
            return None;
        }
        if let Expr::Variable(var, ..) = &dot.lhs {
            if Some(&var.1) == self.alias.as_ref() && var.2.is_empty() {
                return property(&dot.rhs);
            }
        }
        match &dot.rhs {
            Expr::Dot(inner, inner_flags, _)
                if inner_flags.is_empty()
                    && self.is_param(&dot.lhs)
                    && is_property(&inner.lhs, "data") =>
            {
                property(&inner.rhs)
            }
            _ => None,
        }
    }

    fn is_param(&self, expr: &Expr) -> bool {
        matches!(expr, Expr::Variable(var, ..) if var.1 == self.param && var.2.is_empty())
    }
}

/// `{ return; }`, and not `{ throw; }` (the same statement with the `BREAK` flag): a
/// record a rule throws on must reach the rule, to be dead-lettered.
fn returns_nothing(block: &rhai::StmtBlock) -> bool {
    matches!(block.statements(), [Stmt::Return(None, flags, _)] if flags.is_empty())
}

fn property(expr: &Expr) -> Option<ImmutableString> {
    match expr {
        Expr::Property(names, _) => Some(names.2.clone()),
        _ => None,
    }
}

fn is_property(expr: &Expr, name: &str) -> bool {
    property(expr).is_some_and(|p| p == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn guard(body: &str) -> Option<Guard> {
        let engine = super::super::engine::sandboxed();
        Guard::of(
            &engine
                .compile(format!("fn decide(record) {{\n{body}\n}}"))
                .unwrap(),
        )
    }

    /// The rule's answer for a record whose `data` is `data`, run for real.
    fn decide(
        engine: &rhai::Engine,
        ast: &AST,
        data: Dynamic,
    ) -> Result<Dynamic, Box<rhai::EvalAltResult>> {
        let mut record = rhai::Map::new();
        record.insert("data".into(), data);
        engine.call_fn(
            &mut rhai::Scope::new(),
            ast,
            "decide",
            (Dynamic::from_map(record),),
        )
    }

    fn fields(pairs: &[(&str, &str)]) -> Option<Guard> {
        Some(Guard {
            fields: pairs
                .iter()
                .map(|(f, l)| ((*f).into(), (*l).into()))
                .collect(),
            map_check: Position::NONE,
            field_checks: vec![Position::NONE; pairs.len()],
        })
    }

    #[test]
    fn reads_the_opening_checks_and_stops_at_anything_else() {
        let opening = r#"let event = record.data;
            if type_of(event) != "map" { return; }
            if event.type != "privacy_request" { return; }
            if record.data.client != "acme" { return; }"#;
        assert_eq!(
            guard(opening),
            fields(&[("type", "privacy_request"), ("client", "acme")])
        );
        // Everything after the first other statement is the rule's own business.
        let then = format!("{opening}\nlet x = 1;\nif event.user != \"u\" {{ return; }}");
        assert_eq!(
            guard(&then),
            fields(&[("type", "privacy_request"), ("client", "acme")])
        );
        // A field read before the map check could raise an error: no guard.
        assert_eq!(
            guard("if record.data.type != \"x\" { return; }\nif type_of(record.data) != \"map\" { return; }"),
            None
        );
        // Not an early return (a value, a throw), or with an else: no guard.
        assert_eq!(guard("if type_of(record.data) != \"map\" { throw; }"), None);
        assert_eq!(
            guard("if type_of(record.data) != \"map\" { return; }\nif record.data.type != \"x\" { throw; }"),
            fields(&[])
        );
        assert_eq!(
            guard("if type_of(record.data) != \"map\" { return 1; }"),
            None
        );
        assert_eq!(
            guard("if type_of(record.data) != \"map\" { return; } else { return; }"),
            None
        );
        assert_eq!(
            guard("if type_of(record.data) == \"map\" { return; }"),
            None
        );
        assert_eq!(
            guard("if type_of(record.data) != \"map\" { return; }"),
            fields(&[])
        );
        // `==` does not make a guard, and `?.` is not `.`.
        assert_eq!(
            guard("if type_of(record.data) != \"map\" { return; }\nif record.data?.type != \"x\" { return; }"),
            fields(&[])
        );
    }

    /// The rule the guard comes from, run on values of every kind: whenever the guard turns
    /// a record away, the rule (run for real) returns no decision and raises no error.
    #[test]
    fn a_record_turned_away_is_one_the_rule_returns_nothing_for() {
        let engine = super::super::engine::sandboxed();
        let ast = engine
            .compile(
                r#"fn decide(record) {
                    let event = record.data;
                    if type_of(event) != "map" { return; }
                    if event.type != "privacy_request" { return; }
                    if record.data.client != "acme" { return; }
                    #{ action: "a", key: event.type + event.client }
                }"#,
            )
            .unwrap();
        let guard = Guard::of(&ast).unwrap();
        let names = GuardFields::new([&guard].into_iter());
        let value = prop_oneof![
            Just(Dynamic::UNIT),
            any::<i64>().prop_map(Dynamic::from_int),
            any::<bool>().prop_map(Dynamic::from_bool),
            prop_oneof![
                Just("privacy_request"),
                Just("acme"),
                Just("privacy_request "),
                Just("Acme"),
                Just("")
            ]
            .prop_map(Dynamic::from),
            Just(Dynamic::from_array(vec!["acme".into()])),
        ];
        let data = prop_oneof![
            value.clone(),
            (
                proptest::option::of(value.clone()),
                proptest::option::of(value)
            )
                .prop_map(|(kind, client)| {
                    let mut map = rhai::Map::new();
                    if let Some(kind) = kind {
                        map.insert("type".into(), kind);
                    }
                    if let Some(client) = client {
                        map.insert("client".into(), client);
                    }
                    Dynamic::from_map(map)
                }),
        ];
        proptest!(ProptestConfig::with_cases(500), |(data in data)| {
            let admitted = guard.admits(&names, &names.of_data(&data));
            let answer = decide(&engine, &ast, data)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(admitted, !answer.is_unit());
        });
    }

    #[test]
    fn the_prefilter_literal_is_the_longest_a_byte_search_can_find() {
        let literal = |pairs: &[(&str, &str)]| {
            fields(pairs)
                .unwrap()
                .prefilter_literal()
                .map(str::to_owned)
        };
        assert_eq!(
            literal(&[("client", "acme"), ("type", "privacy_request")]),
            Some("privacy_request".into())
        );
        // Escapes other than `\u` could spell these characters: not searched for.
        assert_eq!(
            literal(&[("path", "/v1/users/delete"), ("type", "erasure")]),
            Some("erasure".into())
        );
        for unsearchable in ["a/b", "say \"hi\"", "C:\\", "two\nlines", ""] {
            assert_eq!(literal(&[("f", unsearchable)]), None, "{unsearchable:?}");
        }
        assert_eq!(literal(&[]), None);
    }

    /// The literal a rule's guard gives it as a prefilter never keeps the rule from a
    /// record it decides on, however the JSON spells the value (escapes of every kind).
    #[test]
    fn the_guard_literal_lets_through_every_record_the_rule_decides_on() {
        let engine = super::super::engine::sandboxed();
        let ast = engine
            .compile(
                r#"fn decide(record) {
                    let event = record.data;
                    if type_of(event) != "map" { return; }
                    if event.type != "privacy_request" { return; }
                    if event.path != "x/privacy_request" { return; }
                    #{ action: "a", key: "k" }
                }"#,
            )
            .unwrap();
        let literal = Guard::of(&ast)
            .unwrap()
            .prefilter_literal()
            .unwrap()
            .to_owned();
        assert_eq!(literal, "privacy_request");
        let literals = [literal];
        let prefilter = super::super::prefilter::Prefilter::new([Some(&literals[..])].into_iter());
        let decides = |payload: &str| {
            let data = crate::decode::rule_data(payload.as_bytes());
            !decide(&engine, &ast, data).unwrap().is_unit()
        };
        let let_through = |payload: &str| prefilter.eligible(payload.as_bytes()).is_some();
        let escaped = r#"{"type": "privacy\u005frequest", "path": "x\/privacy_request"}"#;
        assert!(decides(escaped) && let_through(escaped));
        let key = prop_oneof![Just(r#""type""#), Just(r#""path""#), Just(r#""\u0074ype""#)];
        let value = prop_oneof![
            Just(r#""privacy_request""#),
            Just(r#""privacy\u005frequest""#),
            Just(r#""\u0070rivacy_request""#),
            Just(r#""privacy_reques""#),
            Just(r#""x/privacy_request""#),
            Just(r#""x\/privacy_request""#),
            Just(r#""x\u002fprivacy_request""#),
            Just(r#""x\nprivacy_request""#),
            Just("7"),
            Just(r#"["privacy_request"]"#),
        ];
        let payload = proptest::collection::vec((key, value), 0..4).prop_map(|pairs| {
            let body: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("{{{}}}", body.join(", "))
        });
        proptest!(ProptestConfig::with_cases(1000), |(payload in payload)| {
            prop_assert!(!decides(&payload) || let_through(&payload), "{}", payload);
        });
    }

    /// Guard fields read straight from a JSON payload are the ones the decoded
    /// `record.data` holds, whatever the payload: objects with escapes, duplicate keys,
    /// values of every kind, and things that are not objects or not JSON at all.
    #[test]
    fn fields_from_json_match_the_decoded_record_data() {
        let names = GuardFields(vec!["type".into(), "client".into()]);
        let key = prop_oneof![
            Just(r#""type""#),
            Just(r#""client""#),
            Just(r#""\u0074ype""#),
            Just(r#""other""#),
            Just(r#""typ""#),
        ];
        let value = prop_oneof![
            Just(r#""privacy_request""#),
            Just(r#""acme""#),
            Just(r#""ac\"me""#),
            Just(r#""\u0061cme""#),
            Just(r#""é""#),
            Just("42"),
            Just("-1.5e3"),
            Just("true"),
            Just("null"),
            Just(r#"["acme", {"type": "x"}]"#),
            Just(r#"{"client": "acme"}"#),
        ];
        let object = proptest::collection::vec((key, value), 0..5).prop_map(|pairs| {
            let body: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!(" {{{}}}", body.join(", "))
        });
        let payload = prop_oneof![
            object.clone(),
            object.clone().prop_map(|o| format!("{o} trailing")),
            object.prop_map(|o| {
                let cut = (0..=o.len() / 2).rev().find(|&i| o.is_char_boundary(i));
                o[..cut.unwrap_or(0)].to_owned()
            }),
            Just(r#"["type", "privacy_request"]"#.to_owned()),
            Just(r#""privacy_request""#.to_owned()),
            Just("GET /index.html 200".to_owned()),
            Just("null".to_owned()),
            Just(String::new()),
        ];
        proptest!(ProptestConfig::with_cases(1000), |(payload in payload)| {
            let decoded = names.of_data(&crate::decode::rule_data(payload.as_bytes()));
            prop_assert_eq!(names.of_json(payload.as_bytes()), decoded);
        });
    }
}
