//! Offline `preview` and `rules diff` on fixture files: staff iterate on rules without a
//! stream.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::Value;

use crate::support::*;

fn fixture(name: &str) -> String {
    repo()
        .join("tests/fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn preview_shows_the_decisions_for_captured_records() {
    let ws = Workspace::new(
        "http://127.0.0.1:9",
        "events",
        "https://backend.example.com",
    );
    let rules = repo().join("rules");
    let rules = rules.to_str().unwrap();
    // Without a config: decisions with their params.
    let (code, out, err) = ws.run(&[
        "preview",
        "--rules-dir",
        rules,
        "--input",
        &fixture("records.jsonl"),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines = json_lines(&out);
    let (summary, actions) = lines.split_last().unwrap();
    let keys: Vec<&str> = actions.iter().map(|a| a["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["r-100", "ccpa:ccpa-9", "support:T-7"]);
    assert_eq!(actions[0]["params"]["user_id"], "u-100");
    assert_eq!(actions[0]["shard_id"], "shardId-000000000001");
    assert_eq!(actions[0]["sequence_number"], "1001");
    assert!(actions[0].get("request").is_none());
    assert_eq!(summary["records"], 8);
    assert_eq!(summary["actions"]["anonymize_user"], 3);
    // The text line mentions "Delete User", so it passes the prefilter but does not match.
    assert_eq!(
        summary["rules"]["acme_gdpr_delete_user"]["records_evaluated"],
        3
    );
    assert_eq!(summary["rules"]["acme_gdpr_delete_user"]["matches"], 1);

    // With the config: the exact request, token redacted.
    let config = ws.config();
    let (code, out, err) = ws.run(&[
        "preview",
        "--rules-dir",
        rules,
        "--input",
        &fixture("records.jsonl"),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("POST https://backend.example.com/v1/users/u-100/anonymize\nAuthorization: Bearer <redacted>\n"), "{out}");
    assert!(out.contains("\n{\"user_id\":\"c-9\"}\n"), "{out}");
    assert!(!out.contains(TOKEN));
}

#[test]
fn preview_names_the_bad_input_line() {
    let ws = Workspace::new("http://127.0.0.1:9", "events", "https://b.example.com");
    std::fs::write(ws.path("bad.jsonl"), "{\"data\": {}}\n{\"data\": \n").unwrap();
    let input = ws.path("bad.jsonl");
    let (code, _, err) = ws.run(&[
        "preview",
        "--rules-dir",
        "rules",
        "--input",
        input.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("bad.jsonl:2:"), "{err}");
}

#[test]
fn rules_diff_shows_what_an_edit_changes() {
    let ws = Workspace::new("http://127.0.0.1:9", "events", "https://b.example.com");
    let shipped = repo().join("rules");
    let (code, out, err) = ws.run(&[
        "rules",
        "diff",
        "--rules-dir",
        &fixture("rules-edited"),
        "--against",
        shipped.to_str().unwrap(),
        "--input",
        &fixture("records.jsonl"),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines = json_lines(&out);
    let (summary, differences) = lines.split_last().unwrap();
    assert_eq!(differences.len(), 2, "{out}");
    // The edited rule now also takes acme-eu's requests...
    assert_eq!(differences[0]["line"], 2);
    let acme = &differences[0]["rules"]["acme_gdpr_delete_user"];
    assert_eq!(acme["before"], Value::Null);
    assert_eq!(acme["after"][0]["key"], "r-101");
    // ...and the CCPA rule is gone from the edited set.
    assert_eq!(differences[1]["line"], 5);
    let ccpa = &differences[1]["rules"]["ccpa_delete"];
    assert_eq!(ccpa["before"][0]["key"], "ccpa:ccpa-9");
    assert_eq!(ccpa["after"], Value::Null);

    assert_eq!(summary["records"], 8);
    assert_eq!(summary["differing"], 2);
    assert_eq!(
        summary["rules"]["acme_gdpr_delete_user"]["matches_before"],
        1
    );
    assert_eq!(
        summary["rules"]["acme_gdpr_delete_user"]["matches_after"],
        2
    );
    assert_eq!(summary["rules"]["ccpa_delete"]["records_changed"], 1);
    assert_eq!(
        summary["rules"]["support_erasure_verified_only"]["records_changed"],
        0
    );

    // The same against itself: no difference.
    let (_, out, _) = ws.run(&[
        "rules",
        "diff",
        "--rules-dir",
        shipped.to_str().unwrap(),
        "--against",
        shipped.to_str().unwrap(),
        "--input",
        &fixture("records.jsonl"),
    ]);
    assert!(
        out.starts_with("summary: 8 records, 0 with different decisions"),
        "{out}"
    );
}

/// Per rule: records past its prefilter and matches, from a summary line.
fn evaluated(summary: &Value) -> BTreeMap<String, (u64, u64)> {
    summary["rules"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, s)| {
            let n = |k: &str| s[k].as_u64().unwrap();
            (name.clone(), (n("records_evaluated"), n("matches")))
        })
        .collect()
}

/// Producers write JSON their own way (Python's spaces, escapes): `capture` keeps each
/// record's bytes, so a preview of the capture evaluates what the dry-run (the daemon's path)
/// evaluated, prefilter included, not a re-serialization of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_of_a_capture_sees_the_bytes_the_daemon_sees() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let records: Vec<(String, Vec<u8>)> = [
        // An escape: the prefilter steps aside for it in the daemon.
        r#"{"type": "page_view", "title": "Caf\u00e9 menu"}"#,
        r#"{"type": "privacy_request", "tags": ["GDPR", "Delete User"], "client": "acme", "request_id": "r-1", "user_id": "u-1"}"#,
        r#"{"type": "order", "note": "Delete User", "url": "https:\/\/shop.example\/o\/1"}"#,
    ]
    .iter()
    .map(|r| ("k".to_owned(), r.as_bytes().to_vec()))
    .collect();
    put(&client, "events", &records).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", "https://backend.example.com");
    let config = ws.config();
    let config = config.to_str().unwrap();

    let (code, dry, err) = tokio::task::block_in_place(|| {
        ws.run(&["run", "--config", config, "--dry-run", "--output", "json"])
    });
    assert_eq!(code, 0, "{err}");
    let (code, captured, err) =
        tokio::task::block_in_place(|| ws.run(&["capture", "--config", config]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(captured.lines().count(), 3, "{captured}");
    for (line, (_, bytes)) in json_lines(&captured).iter().zip(&records) {
        // The readable view, beside the bytes.
        assert!(line["data"].is_object(), "{line}");
        let kept = base64::engine::general_purpose::STANDARD
            .decode(line["data_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(&kept, bytes);
    }
    std::fs::write(ws.path("captured.jsonl"), &captured).unwrap();
    let input = ws.path("captured.jsonl");
    let (code, previewed, err) = ws.run(&[
        "preview",
        "--config",
        config,
        "--rules-dir",
        "rules",
        "--input",
        input.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");

    let dry = json_lines(&dry);
    let previewed = json_lines(&previewed);
    let dry_summary = evaluated(dry.last().unwrap());
    assert_eq!(dry_summary["acme_gdpr_delete_user"], (3, 1), "{dry:?}");
    assert_eq!(evaluated(previewed.last().unwrap()), dry_summary);
    let keys = |lines: &[Value]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l["type"] == "action")
            .map(|l| l["key"].to_string())
            .collect()
    };
    assert_eq!(keys(&previewed), keys(&dry));
}

/// Where a command's stdout goes, for the write-failure tests.
#[derive(Debug, Clone, Copy)]
pub enum Stdout {
    /// `/dev/full`: every write fails (a full disk).
    Full,
    /// A pipe whose reader is gone (`| head` that has exited).
    ClosedPipe,
}

impl Stdout {
    pub fn stdio(self) -> std::process::Stdio {
        match self {
            Stdout::Full => std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap()
                .into(),
            Stdout::ClosedPipe => {
                let (reader, writer) = std::io::pipe().unwrap();
                drop(reader);
                writer.into()
            }
        }
    }
}

/// Runs a command of the binary with stdout on `to`: (exit code, stderr).
pub fn run_to(ws: &Workspace, to: Stdout, args: &[&str]) -> (i32, String) {
    let out = command(&ws.config())
        .args(args)
        .stdout(to.stdio())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Output that cannot be written is a failure (exit 1), as for every other command: a
/// preview or diff lost on a full disk must not look complete. A reader that went away
/// (`| head`) is not: output stops quietly, exit 0.
#[test]
fn preview_and_diff_fail_when_their_output_cannot_be_written() {
    let ws = Workspace::new("http://127.0.0.1:9", "events", "https://b.example.com");
    let (shipped, records, edited) = (
        repo().join("rules").to_string_lossy().into_owned(),
        fixture("records.jsonl"),
        fixture("rules-edited"),
    );
    let config = ws.config().to_string_lossy().into_owned();
    let preview = ["preview", "--rules-dir", &shipped, "--input", &records];
    let with_config = [&preview[..], &["--config", &config]].concat();
    let diff = [
        "rules",
        "diff",
        "--rules-dir",
        &edited,
        "--against",
        &shipped,
        "--input",
        &records,
    ];
    let mut wrong = Vec::new();
    for command in [&preview[..], &with_config, &diff] {
        for output in ["human", "json"] {
            let args = [command, &["--output", output]].concat();
            let (code, err) = run_to(&ws, Stdout::Full, &args);
            if code != 1 || !err.contains("error: cannot write to stdout: No space left on device")
            {
                wrong.push(format!("{args:?} > /dev/full: exit {code}, {err}"));
            }
            let (code, err) = run_to(&ws, Stdout::ClosedPipe, &args);
            if code != 0 || err.contains("error") {
                wrong.push(format!("{args:?} | closed pipe: exit {code}, {err}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
