//! The authoring tools compliance staff use on their own: `rules explain`, `rules test
//! --coverage` and `--junit`, and `dead-letters to-test`.

use serde_json::Value;

use crate::support::*;

fn fixture(name: &str) -> String {
    repo()
        .join("tests/fixtures/authoring")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A workspace with the shipped rules and the fixture rule that throws.
fn workspace() -> Workspace {
    let ws = Workspace::new("http://127.0.0.1:9", "events", "http://127.0.0.1:9");
    ws.write_rule(
        "strict_erasure.rhai",
        &std::fs::read_to_string(fixture("strict_erasure.rhai")).unwrap(),
    );
    ws
}

fn trace<'a>(record: &'a Value, rule: &str) -> &'a Value {
    record["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["rule"] == rule)
        .unwrap_or_else(|| panic!("no trace of {rule} in {record}"))
}

#[test]
fn explain_says_why_each_rule_decided_what_it_did() {
    let ws = workspace();
    let config = ws.config();
    let rules = ws.path("rules");
    let args = |output: &'static str| {
        vec![
            "rules".to_owned(),
            "explain".into(),
            "--rules-dir".into(),
            rules.to_str().unwrap().into(),
            "--input".into(),
            fixture("explain.jsonl"),
            "--config".into(),
            config.to_str().unwrap().into(),
            "--output".into(),
            output.into(),
        ]
    };
    let run = |output| {
        let args = args(output);
        let (code, out, err) = ws.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(code, 0, "{err}");
        out
    };
    let records = json_lines(&run("json"));
    assert_eq!(records.len(), 5, "{records:?}");

    // A matching record: the decision and the exact request, token redacted.
    let matched = trace(&records[0], "acme_gdpr_delete_user");
    assert_eq!(matched["outcome"], "decided", "{matched}");
    let decided = &matched["decisions"][0];
    assert_eq!(decided["decision"]["key"], "r-456");
    assert_eq!(decided["request"]["method"], "POST");
    assert!(decided["request"]["url"]
        .as_str()
        .unwrap()
        .ends_with("/v1/users/u-123/anonymize"));
    assert!(!records[0].to_string().contains(TOKEN));
    assert_eq!(records[0]["sequence_number"], "1001");

    // Turned away by an opening check, at its line, with the field and value compared.
    let away = trace(&records[1], "acme_gdpr_delete_user");
    assert_eq!(away["outcome"], "turned_away", "{away}");
    assert_eq!(away["line"], 19);
    assert_eq!(away["field"], "record.data.client");
    assert_eq!(away["expected"], "acme");
    assert_eq!(away["found"], "globex");

    // Without the literal: kept out by the prefilter, which names it.
    for rule in ["acme_gdpr_delete_user", "ccpa_delete", "strict_erasure"] {
        assert_eq!(trace(&records[2], rule)["outcome"], "prefiltered");
    }
    assert_eq!(
        trace(&records[2], "acme_gdpr_delete_user")["missing"],
        serde_json::json!(["Delete User"])
    );

    // A record the rule throws on: where, and the message.
    let threw = trace(&records[3], "strict_erasure");
    assert_eq!(threw["outcome"], "threw", "{threw}");
    assert_eq!(threw["line"], 11);
    assert!(threw["message"]
        .as_str()
        .unwrap()
        .contains("strict_erasure without a user_id"));

    // Returned nothing, at the `return` that fired (not an opening check: an `||`).
    let nothing = trace(&records[4], "support_erasure_verified_only");
    assert_eq!(nothing["outcome"], "returned_nothing", "{nothing}");
    assert_eq!(nothing["line"], 19);
    assert_eq!(nothing["by_return"], true);

    // The text says the same, rule by rule.
    let human = run("human");
    let blocks: Vec<&str> = human
        .split("\nline ")
        .map(|b| b.trim_start_matches("line "))
        .collect();
    assert_eq!(blocks.len(), records.len(), "{human}");
    for (block, record) in blocks.iter().zip(&records) {
        assert!(
            block.starts_with(&format!("{} (shard ", record["line"])),
            "{block}"
        );
        for t in record["rules"].as_array().unwrap() {
            let file = t["file"].as_str().unwrap();
            let said = match t["outcome"].as_str().unwrap() {
                "prefiltered" => format!(
                    "kept out by its prefilter: the record holds none of {:?}",
                    t["missing"][0].as_str().unwrap()
                ),
                "turned_away" => format!(
                    "turned away by the opening check at {file}:{}: {} is {:?}, not {:?}",
                    t["line"],
                    t["field"].as_str().unwrap(),
                    t["found"].as_str().unwrap(),
                    t["expected"].as_str().unwrap()
                ),
                "returned_nothing" => format!("returned nothing at {file}:{} (return)", t["line"]),
                "threw" => format!(
                    "threw at {file}:{}: {}",
                    t["line"],
                    t["message"].as_str().unwrap()
                ),
                "decided" => format!(
                    "decided 1 request(s)\n    anonymize_user key {:?}",
                    t["decisions"][0]["decision"]["key"].as_str().unwrap()
                ),
                other => panic!("{other}"),
            };
            let expected = format!("  {}: {said}", t["rule"].as_str().unwrap());
            assert!(block.contains(&expected), "{expected}\nnot in\n{block}");
        }
    }
}
