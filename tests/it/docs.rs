//! The operations guide cannot drift from the code: its config reference builds a config the
//! binary accepts, and its systemd unit is the shipped one and verifies.

use crate::support::*;

fn guide() -> String {
    std::fs::read_to_string(repo().join("docs/operations.md")).unwrap()
}

/// (section, key, example) from the reference table.
fn reference_rows() -> Vec<(String, String, String)> {
    let guide = guide();
    let table = guide
        .split("## Configuration reference")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    table
        .lines()
        .filter(|l| l.starts_with("| `["))
        .map(|line| {
            let cells: Vec<&str> = line.split(" | ").collect();
            let key = cells[0].trim_start_matches("| ").trim_matches('`');
            let (section, key) = key.split_once("] ").unwrap();
            let example = cells[2].trim_matches('`').to_owned();
            (
                section.trim_start_matches('[').to_owned(),
                key.to_owned(),
                example,
            )
        })
        .collect()
}

#[test]
fn every_documented_key_with_its_example_is_accepted() {
    let rows = reference_rows();
    assert!(rows.len() >= 20, "{rows:?}");
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    let url = rows.iter().find(|(_, k, _)| k == "url").unwrap().2.clone();
    for (section, key, example) in rows {
        // A secret comes from a variable or a file, not both: files go to a second action.
        let section = match (section.as_str(), key.ends_with("_file") && key != "ca_file") {
            ("actions.NAME", true) => "actions.example2".to_owned(),
            _ => section.replace("actions.NAME", "actions.example"),
        };
        if section == "actions.example2" && !sections.iter().any(|(s, _)| *s == section) {
            sections.push((section.clone(), vec![format!("url = {url}")]));
        }
        match sections.iter_mut().find(|(s, _)| *s == section) {
            Some((_, lines)) => lines.push(format!("{key} = {example}")),
            None => sections.push((section, vec![format!("{key} = {example}")])),
        }
    }
    let toml: String = sections
        .iter()
        .map(|(s, lines)| format!("[{s}]\n{}\n", lines.join("\n")))
        .collect();
    let ws = Workspace::new("http://127.0.0.1:9", "events", "https://b.example.com");
    // `rules check` resolves the config without reading the CA file.
    std::fs::write(ws.path("ca.pem"), "").unwrap();
    std::fs::write(ws.path("full.toml"), &toml).unwrap();
    let (code, out, err) = ws.run(&[
        "rules",
        "check",
        "--rules-dir",
        "rules",
        "--config",
        ws.path("full.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{toml}\n{out}{err}");
}

#[test]
fn the_systemd_unit_is_the_documented_one_and_verifies() {
    let unit = std::fs::read_to_string(repo().join("docs/gdpr-consumer.service")).unwrap();
    let documented = guide()
        .split("```ini\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(unit, documented);
    let mut section = String::new();
    for line in unit.lines().filter(|l| !l.trim().is_empty()) {
        if line.starts_with('[') {
            section = line.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        assert!(!key.is_empty() && !value.is_empty(), "{line}");
        if key == "ExecStart" {
            assert_eq!(section, "[Service]");
            let args: Vec<&str> = value.split_whitespace().collect();
            assert_eq!(&args[1..3], ["run", "--config"]);
        }
    }
    // systemd's own check: unknown keys or bad values are reported on stderr.
    let ws = Workspace::new("http://127.0.0.1:9", "events", "https://b.example.com");
    let copy = ws.path("gdpr-consumer.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/gdpr-consumer", bin().to_str().unwrap()),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output();
    match out {
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
        }
        Err(e) => eprintln!("systemd-analyze not available ({e}); checked the syntax only"),
    }
}
