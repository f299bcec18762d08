//! The operations guide cannot drift from the code: its config reference builds a config the
//! binary accepts, its systemd unit is the shipped one and verifies, its metrics are the ones
//! `/metrics` serves, its IAM policy is the Kinesis calls the code makes, and its list of log
//! events is the one the code logs.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::*;

fn guide() -> String {
    std::fs::read_to_string(repo().join("docs/operations.md")).unwrap()
}

/// The guide's section under `## title`, up to the next `## ` heading.
fn guide_section(title: &str) -> String {
    let guide = guide();
    let start = guide
        .find(&format!("\n## {title}\n"))
        .unwrap_or_else(|| panic!("docs/operations.md has no section \"## {title}\""));
    let rest = &guide[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    rest[..end].to_owned()
}

/// Every `.rs` file under `src/`, with its path relative to the repository.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let name = path.strip_prefix(repo()).unwrap().display().to_string();
                out.push((name, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo().join("src"), &mut out);
    out.sort();
    out
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

/// The body rows of the one Markdown table in `text`. A row after the table has ended is an
/// error: a blank line (or text) splits a table, and what follows renders as loose text.
fn table_rows<'a>(text: &'a str, what: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with('|'))
        .unwrap_or_else(|| panic!("{what}: no table"));
    let end = lines[start..]
        .iter()
        .position(|l| !l.starts_with('|'))
        .map_or(lines.len(), |n| start + n);
    assert!(
        end - start >= 2 && lines[start + 1].starts_with("|---"),
        "{what}: a table starts with a header row and a |---| row: {:?}",
        &lines[start..end]
    );
    if let Some(stray) = lines[end..].iter().find(|l| l.starts_with('|')) {
        panic!(
            "{what}: a row after the table has ended (a blank line or text splits it, so the \
             rest renders as loose text): {stray}"
        );
    }
    lines[start + 2..end].to_vec()
}

/// The text of the first cell of a table row, without its backquotes.
fn first_cell(row: &str) -> String {
    row[1..]
        .split('|')
        .next()
        .unwrap()
        .trim()
        .trim_matches('`')
        .to_owned()
}

/// Metric names (without `gdpr_consumer_`) in the first column of the guide's metrics table.
fn metrics_table() -> BTreeSet<String> {
    let section = guide_section("Metrics, status and alerts");
    table_rows(&section, "docs/operations.md, the metrics table")
        .into_iter()
        .map(first_cell)
        .collect()
}

/// Every `gdpr_consumer_*` name the operator docs mention (alerts, examples), unprefixed.
fn metrics_named_in_prose() -> BTreeSet<(String, &'static str)> {
    let name = regex::Regex::new(r"gdpr_consumer_([a-z_]+)").unwrap();
    let mut names = BTreeSet::new();
    for file in ["docs/operations.md", "README.md"] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        for m in name.captures_iter(&text) {
            // `gdpr_consumer_LOG` and the like are not metrics: the regex takes lowercase only,
            // and a name followed by a dot or a slash is a path.
            let end = m.get(0).unwrap().end();
            if matches!(text[end..].chars().next(), Some('.') | Some('/')) {
                continue;
            }
            names.insert((m[1].to_owned(), file));
        }
    }
    names
}

/// From OpenMetrics text: each family as exposed (a counter with its `_total`), and whether
/// it has at least one sample.
fn families(text: &str) -> Vec<(String, bool)> {
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            let name = name.strip_prefix("gdpr_consumer_").unwrap_or(name);
            let exposed = match kind {
                "counter" => format!("{name}_total"),
                _ => name.to_owned(),
            };
            let sampled = samples.iter().any(|s| {
                let s = s.strip_prefix("gdpr_consumer_").unwrap_or(s);
                s == exposed
                    || ["_bucket", "_count", "_sum", "_created"]
                        .iter()
                        .any(|suffix| s.strip_suffix(suffix) == Some(name))
            });
            (exposed, sampled)
        })
        .collect()
}

/// Where the documented metrics and the exposed ones differ, each named with where it is
/// missing.
fn metric_problems(table: &BTreeSet<String>, exposed: &[(String, bool)]) -> Vec<String> {
    let mut problems = Vec::new();
    for name in table {
        match exposed.iter().find(|(e, _)| e == name) {
            None => problems.push(format!(
                "`{name}`: in the metrics table of docs/operations.md, not on /metrics (never registered in src/telemetry.rs?)"
            )),
            Some((_, false)) => problems.push(format!(
                "`{name}`: in the metrics table of docs/operations.md and registered, but no sample on /metrics after the run (never set, or this test's scenario does not exercise it)"
            )),
            Some(_) => {}
        }
    }
    for (name, file) in metrics_named_in_prose() {
        if !exposed.iter().any(|(e, _)| *e == name) {
            problems.push(format!(
                "`gdpr_consumer_{name}`: named in {file}, not on /metrics"
            ));
        }
    }
    for (name, _) in exposed {
        if !table.contains(name) {
            problems.push(format!(
                "`{name}`: on /metrics, missing from the metrics table of docs/operations.md (## Metrics, status and alerts)"
            ));
        }
    }
    problems
}

/// `event` values the code logs: `event = "..."` literals, and the outcome names that
/// `telemetry::ActionOutcome::as_str` passes as `event`.
fn events_in_source() -> BTreeSet<(String, String)> {
    let literal = regex::Regex::new(r#"event\s*=\s*"([a-z0-9_]+)""#).unwrap();
    let outcome = regex::Regex::new(r#"ActionOutcome::\w+\s*=>\s*"([a-z0-9_]+)""#).unwrap();
    let mut events = BTreeSet::new();
    for (file, text) in sources() {
        for m in literal.captures_iter(&text) {
            events.insert((m[1].to_owned(), file.clone()));
        }
        if file == "src/telemetry.rs" {
            for m in outcome.captures_iter(&text) {
                events.insert((m[1].to_owned(), file.clone()));
            }
        }
    }
    events
}

/// The table under "### Log events": (event, level cell) for each row.
fn event_rows() -> Vec<(String, String)> {
    let logs = guide_section("Logs");
    let section = logs
        .split("### Log events")
        .nth(1)
        .expect("docs/operations.md, ## Logs, has no \"### Log events\" table");
    let section = section.split("\n### ").next().unwrap();
    table_rows(section, "docs/operations.md, ### Log events")
        .into_iter()
        .map(|row| {
            let level = row[1..].split('|').nth(1).unwrap_or("").trim().to_owned();
            (first_cell(row), level)
        })
        .collect()
}

/// `event` values listed in the guide: the first column of the table under "Log events".
fn events_documented() -> BTreeSet<String> {
    event_rows().into_iter().map(|(event, _)| event).collect()
}

#[test]
fn every_event_the_code_logs_is_listed_in_the_guide() {
    let documented = events_documented();
    let in_source = events_in_source();
    assert!(
        in_source.len() >= 5,
        "the scan found too few events: {in_source:?}"
    );
    let missing: Vec<String> = in_source
        .iter()
        .filter(|(event, _)| !documented.contains(event))
        .map(|(event, file)| format!("event \"{event}\" (logged in {file})"))
        .collect();
    assert!(
        missing.is_empty(),
        "not listed in docs/operations.md, ## Logs, ### Log events: {missing:#?}"
    );
    let stale: Vec<&String> = documented
        .iter()
        .filter(|event| !in_source.iter().any(|(e, _)| e == *event))
        .collect();
    assert!(
        stale.is_empty(),
        "listed in docs/operations.md, ### Log events, but logged nowhere in src/: {stale:?}"
    );
}

/// A sample log line of the guide: its format, level, message and `event` field.
#[derive(Debug)]
struct Sample {
    line: String,
    level: String,
    message: String,
    event: Option<String>,
}

/// The sample lines under "## Logs" (before "### Log events"): each line of a ```text block
/// (`TIME  LEVEL message key=value...`) and of a ```json block (one object per line).
fn log_samples() -> Vec<Sample> {
    let logs = guide_section("Logs");
    let logs = logs.split("### Log events").next().unwrap();
    let human =
        regex::Regex::new(r"^\S+Z\s+(TRACE|DEBUG|INFO|WARN|ERROR) (.*?)(?: [a-z_][a-z0-9_]*=.*)?$")
            .unwrap();
    let event = regex::Regex::new(r#" event="([a-z0-9_]+)""#).unwrap();
    let mut samples = Vec::new();
    for (fence, json) in [("```text\n", false), ("```json\n", true)] {
        for block in logs.split(fence).skip(1) {
            let block = block.split("```").next().unwrap();
            for line in block.lines().filter(|l| !l.trim().is_empty()) {
                let sample = if json {
                    let v: serde_json::Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                    let fields = &v["fields"];
                    Sample {
                        line: line.to_owned(),
                        level: v["level"].as_str().expect(line).to_owned(),
                        message: fields["message"].as_str().expect(line).to_owned(),
                        event: fields["event"].as_str().map(str::to_owned),
                    }
                } else {
                    let m = human
                        .captures(line)
                        .unwrap_or_else(|| panic!("not a log line `TIME  LEVEL message`: {line}"));
                    Sample {
                        line: line.to_owned(),
                        level: m[1].to_owned(),
                        message: m[2].to_owned(),
                        event: event.captures(line).map(|e| e[1].to_owned()),
                    }
                };
                samples.push(sample);
            }
        }
    }
    samples
}

/// The guide's sample log lines are the code's: each message is a string literal in `src/`,
/// and each `event` is in the "Log events" table at the level the sample shows.
#[test]
fn the_sample_log_lines_are_the_code_s_own() {
    let samples = log_samples();
    let sources = sources();
    let events = event_rows();
    assert!(samples.len() >= 10, "too few samples found: {samples:#?}");
    assert!(
        samples.iter().any(|s| s.line.starts_with('{'))
            && samples.iter().any(|s| s.event.is_some()),
        "{samples:#?}"
    );
    let mut problems = Vec::new();
    for sample in &samples {
        let literal = format!("\"{}\"", sample.message);
        if !sources.iter().any(|(_, text)| text.contains(&literal)) {
            problems.push(format!(
                "message {literal} is in no string literal in src/: {}",
                sample.line
            ));
        }
        if let Some(event) = &sample.event {
            match events.iter().find(|(e, _)| e == event) {
                None => problems.push(format!(
                    "event \"{event}\" is not in ### Log events: {}",
                    sample.line
                )),
                Some((_, level)) if !level.starts_with(&sample.level.to_lowercase()) => problems
                    .push(format!(
                        "event \"{event}\" is `{level}` in ### Log events, {} in the sample: {}",
                        sample.level, sample.line
                    )),
                Some(_) => {}
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/operations.md, ## Logs, sample lines that the code does not log: {problems:#?}"
    );
}

/// A short run that exercises every documented metric: matches, a duplicate, a refusal (a
/// dead letter), a rule error, lag, reloads. Then `/metrics` and the docs must agree both
/// ways, and every `event` in the run's JSON log must be one the guide lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_the_endpoint_are_the_documented_ones() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(200, 4, 1)).await;
    let backend = Backend::refusing("/del-user-3/", 400).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_metrics();
    ws.write_rule(
        "zz_fails_on_r2.rhai",
        r#"fn decide(record) {
    if type_of(record.data) == "map" && record.data.request_id == "r-2" { throw "boom"; }
}
"#,
    );
    let daemon = ws.start_daemon(&["--log-format", "json"]);
    // Every request reached the backend (the refused one included) and the shard is read.
    wait_until(Duration::from_secs(60), "the shard caught up", || {
        caught_up_count(&daemon.stderr()) >= 1 && backend.count() >= 4
    })
    .await;
    let address = daemon
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|l| {
            (l["fields"]["message"] == "metrics listener up")
                .then(|| l["fields"]["address"].as_str().unwrap().to_owned())
        })
        .expect("no \"metrics listener up\" line with an address");
    let table = metrics_table();
    assert!(table.len() >= 10, "{table:?}");
    // Outcomes settle after the reader has moved on: ask again until the two sides agree,
    // or report what still differs.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (problems, text) = loop {
        let text = reqwest::get(format!("http://{address}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let problems = metric_problems(&table, &families(&text));
        if problems.is_empty() || std::time::Instant::now() > deadline {
            break (problems, text);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log_path = daemon.log.clone();
    assert!(daemon.stop().success());
    assert!(problems.is_empty(), "{problems:#?}\n/metrics:\n{text}");
    // Read after the stop: in-flight outcomes are logged by then.
    let log = std::fs::read_to_string(&log_path).unwrap();

    // The run's log events are documented ones.
    let documented = events_documented();
    let logged: BTreeSet<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|l| l["fields"]["event"].as_str().map(str::to_owned))
        .collect();
    for expected in ["done", "dead_lettered", "rule_error"] {
        assert!(logged.contains(expected), "no {expected} event in:\n{log}");
    }
    let undocumented: Vec<&String> = logged.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "events logged in the run, missing from docs/operations.md ### Log events: {undocumented:?}"
    );
}

/// "`AWS_ENDPOINT_URL_KINESIS` and `AWS_ENDPOINT_URL` work too. With an endpoint and no
/// credentials found, placeholder credentials are used": a daemon whose environment holds no
/// AWS credentials at all (no variables, no credentials or config file, no instance
/// metadata), with the endpoint only in the environment, reaches the stream and handles a
/// request, for each of the two variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_from_the_environment_gets_placeholder_credentials_too() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let config = std::fs::read_to_string(ws.config()).unwrap();
    assert!(config.contains("endpoint_url ="));
    let config: String = config
        .lines()
        .filter(|l| !l.starts_with("endpoint_url"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(ws.config(), config).unwrap();
    std::fs::write(ws.path("empty"), "").unwrap();

    for (n, variable) in ["AWS_ENDPOINT_URL_KINESIS", "AWS_ENDPOINT_URL"]
        .into_iter()
        .enumerate()
    {
        let user = format!("env-user-{n}");
        let record = deletion(&format!("r-env-{n}"), &user).to_string();
        put(&client, "events", &[(user.clone(), record.into_bytes())]).await;
        let log = ws.path(&format!("{variable}.log"));
        let mut child = KillOnDrop(
            std::process::Command::new(bin())
                .current_dir(ws.dir.path())
                .args(["run", "--config"])
                .arg(ws.config())
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("HOME", ws.dir.path())
                .env("AWS_SHARED_CREDENTIALS_FILE", ws.path("empty"))
                .env("AWS_CONFIG_FILE", ws.path("empty"))
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env(variable, &kinesis.endpoint)
                .env("BACKEND_TOKEN", TOKEN)
                .env("GDPR_CONSUMER_LOG", "info")
                .stderr(std::fs::File::create(&log).unwrap())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let stderr = || std::fs::read_to_string(&log).unwrap_or_default();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !backend.received().iter().any(|r| r.path.contains(&user)) {
            if let Some(status) = child.0.try_wait().unwrap() {
                panic!(
                    "with only {variable} set, the daemon exited ({status}):\n{}",
                    stderr()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "with only {variable} set, no request reached the backend:\n{}",
                stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            stderr().contains("signing with placeholder credentials"),
            "{}",
            stderr()
        );
        // The first-run guide's reason for `AWS_EC2_METADATA_DISABLED=true`: with it, the SDK
        // never asks the instance metadata service, so it has nothing to warn about.
        assert!(
            !stderr().contains("Ec2InstanceMetadata") && !stderr().contains("IMDS"),
            "{}",
            stderr()
        );
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = child.0.wait().unwrap();
        assert!(status.success(), "{status}:\n{}", stderr());
    }
}

/// Each `## ` section of a file, as (heading, text).
fn sections(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            out.push((heading.to_owned(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// A reader who follows the README or the guide from a section's start has the binary it
/// runs: `target/release/gdpr-consumer` comes after `cargo build --release` in its section.
/// And the first run on a local stream, which has no AWS credentials, sets
/// `AWS_EC2_METADATA_DISABLED=true` before it starts the daemon.
#[test]
fn the_guides_build_the_binary_before_they_run_it() {
    let mut problems = Vec::new();
    let mut uses = 0;
    for file in ["README.md", "docs/operations.md"] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        for (heading, body) in sections(&text) {
            if let Some(first) = body.find("target/release/gdpr-consumer") {
                uses += 1;
                if !body[..first].contains("cargo build --release") {
                    problems.push(format!(
                        "{file}, ## {heading}: uses target/release/gdpr-consumer without \
                         `cargo build --release` before it"
                    ));
                }
            }
        }
    }
    assert!(uses >= 3, "too few uses of target/release found: {uses}");
    assert!(problems.is_empty(), "{problems:#?}");
    let first_run = guide_section("A first run on a local stream");
    let run = first_run
        .find("gdpr-consumer run")
        .expect("the first run starts no daemon");
    assert!(
        first_run[..run].contains("export AWS_EC2_METADATA_DISABLED=true"),
        "docs/operations.md, ## A first run on a local stream: no \
         `export AWS_EC2_METADATA_DISABLED=true` before the daemon starts"
    );
}

/// A child process killed if the test fails before it stops it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The IAM policy in the guide is exactly the Kinesis calls the code makes: every
/// `client.operation()` on the Kinesis client in `src/` needs `kinesis:Operation` (IAM
/// names each Kinesis action after its API operation), and the policy grants nothing else.
#[test]
fn the_iam_policy_grants_exactly_the_kinesis_calls_the_code_makes() {
    let call = regex::Regex::new(r"\bclient\s*\.\s*([a-z][a-z_]*)\(\)").unwrap();
    let mut needed: BTreeSet<(String, String)> = BTreeSet::new();
    for (file, text) in sources() {
        if !text.contains("aws_sdk_kinesis") {
            continue;
        }
        for m in call.captures_iter(&text) {
            let action: String = m[1]
                .split('_')
                .map(|w| w[..1].to_uppercase() + &w[1..])
                .collect();
            needed.insert((format!("kinesis:{action}"), file.clone()));
        }
    }
    assert!(
        needed.len() >= 3,
        "the scan found too few Kinesis calls: {needed:?}"
    );
    let credentials = guide_section("Credentials");
    let json = credentials
        .split("```json\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("no ```json policy in docs/operations.md, ## Credentials");
    let policy: serde_json::Value =
        serde_json::from_str(json).expect("the policy in docs/operations.md is not JSON");
    let granted: BTreeSet<String> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["Action"].as_array().unwrap().iter())
        .map(|a| a.as_str().unwrap().to_owned())
        .filter(|a| a.starts_with("kinesis:"))
        .collect();
    let missing: Vec<String> = needed
        .iter()
        .filter(|(action, _)| !granted.contains(action))
        .map(|(action, file)| format!("{action} (called in {file})"))
        .collect();
    let extra: Vec<&String> = granted
        .iter()
        .filter(|a| !needed.iter().any(|(n, _)| n == *a))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the IAM policy in docs/operations.md (## Credentials) lacks {missing:?} and grants \
         {extra:?}, which no code in src/ calls"
    );
}

/// The README's exit-code table: (command, code) → the cases it lists, for the codes whose
/// cell is not `—`.
fn exit_code_table() -> Vec<(String, i32)> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let table = readme
        .split("### Exit codes")
        .nth(1)
        .expect("README.md has no \"### Exit codes\" section");
    let mut rows = Vec::new();
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
        assert_eq!(cells.len(), 4, "not | command | 0 | 1 | 2 |: {line}");
        let command = cells[0].trim().trim_matches('`').to_owned();
        for (code, cell) in [0, 1, 2].into_iter().zip(&cells[1..]) {
            if cell.trim() != "—" {
                rows.push((command.clone(), code));
            }
        }
    }
    rows
}

/// Every code the README documents for a command, in at least one case per command, as the
/// binary really exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_exit_code_is_the_real_one() {
    let documented = exit_code_table();
    assert!(documented.len() >= 25, "{documented:?}");
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(50, 2, 0)).await;
    let backend = Backend::refusing("/del-user-1/", 400).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let config = ws.config().to_str().unwrap().to_owned();
    std::fs::write(ws.path("bad.toml"), "[stream]\nnmae = \"events\"\n").unwrap();
    std::fs::create_dir(ws.path("broken")).unwrap();
    std::fs::write(ws.path("broken/x.rhai"), "fn decide(record) { let = ; }\n").unwrap();
    std::fs::create_dir(ws.path("failing")).unwrap();
    std::fs::write(ws.path("failing/x.rhai"), "fn decide(record) { }\n").unwrap();
    std::fs::write(
        ws.path("failing/x.test.json"),
        r#"[{"name": "expects a decision", "record": {"data": {}},
            "expect": {"action": "anonymize_user", "key": "k", "params": {}}}]"#,
    )
    .unwrap();

    let mut seen: Vec<(String, i32)> = Vec::new();
    let mut check = |command: &str, code: i32, got: (i32, String, String)| {
        assert_eq!(
            got.0, code,
            "`{command}` should exit {code} (README.md, ### Exit codes):\n{}{}",
            got.1, got.2
        );
        seen.push((command.to_owned(), code));
    };

    // run: 0 on SIGTERM, 1 for a state file in use, 2 for a bad config.
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(60), "two requests handled", || {
        backend.count() >= 2 && caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    check("run", 1, ws.run(&["run", "--config", &config]));
    let stopped = daemon.stop();
    check(
        "run",
        0,
        (stopped.code().unwrap_or(-1), String::new(), String::new()),
    );
    check("run", 2, ws.run(&["run", "--config", "bad.toml"]));

    let dry = |extra: &[&str]| {
        let mut args = vec!["run", "--dry-run", "--config", &config];
        args.extend_from_slice(extra);
        ws.run(&args)
    };
    check("run --dry-run", 0, dry(&[]));
    check("run --dry-run", 1, dry(&["--stream", "no-such-stream"]));
    check("run --dry-run", 2, dry(&["--rules-dir", "broken"]));

    check(
        "rules check",
        0,
        ws.run(&["rules", "check", "--rules-dir", "rules"]),
    );
    check(
        "rules check",
        1,
        ws.run(&["rules", "check", "--rules-dir", "broken"]),
    );
    check(
        "rules check",
        2,
        ws.run(&["rules", "check", "--config", "bad.toml"]),
    );
    check(
        "rules test",
        0,
        ws.run(&["rules", "test", "--rules-dir", "rules"]),
    );
    check(
        "rules test",
        1,
        ws.run(&["rules", "test", "--rules-dir", "failing"]),
    );
    check(
        "rules test",
        2,
        ws.run(&["rules", "test", "--config", "bad.toml"]),
    );

    let captured = ws.run(&["capture", "--config", &config]);
    std::fs::write(ws.path("records.jsonl"), &captured.1).unwrap();
    assert_eq!(captured.1.lines().count(), 50);
    check("capture", 0, captured);
    check(
        "capture",
        1,
        ws.run(&["capture", "--config", &config, "--stream", "no-such-stream"]),
    );
    check("capture", 2, ws.run(&["capture", "--config", "bad.toml"]));

    let preview =
        |rules: &str, input: &str| ws.run(&["preview", "--rules-dir", rules, "--input", input]);
    check("preview", 0, preview("rules", "records.jsonl"));
    let to_full = command(&ws.config())
        .args([
            "preview",
            "--rules-dir",
            "rules",
            "--input",
            "records.jsonl",
        ])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    check(
        "preview",
        1,
        (
            to_full.status.code().unwrap_or(-1),
            String::new(),
            String::from_utf8_lossy(&to_full.stderr).into_owned(),
        ),
    );
    check("preview", 2, preview("rules", "no-such-file.jsonl"));

    let explain = |rules: &str, input: &str| {
        ws.run(&["rules", "explain", "--rules-dir", rules, "--input", input])
    };
    check("rules explain", 0, explain("rules", "records.jsonl"));
    let to_full = command(&ws.config())
        .args([
            "rules",
            "explain",
            "--rules-dir",
            "rules",
            "--input",
            "records.jsonl",
        ])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    check(
        "rules explain",
        1,
        (
            to_full.status.code().unwrap_or(-1),
            String::new(),
            String::from_utf8_lossy(&to_full.stderr).into_owned(),
        ),
    );
    check("rules explain", 2, explain("rules", "no-such-file.jsonl"));

    let diff = |rules: &str, tail: &[&str]| {
        let mut args = vec!["rules", "diff", "--rules-dir", rules, "--against", "rules"];
        args.extend_from_slice(tail);
        ws.run(&args)
    };
    check(
        "rules diff",
        0,
        diff("rules", &["--input", "records.jsonl"]),
    );
    check(
        "rules diff",
        1,
        diff(
            "rules",
            &["--config", &config, "--stream", "no-such-stream"],
        ),
    );
    check(
        "rules diff",
        2,
        diff("broken", &["--input", "records.jsonl"]),
    );

    // The inspection commands: 0 on the state the daemon left, 1 for a state file that does
    // not exist, 2 for a config file that cannot be used.
    let missing = ws.path("no-such-state.redb").to_str().unwrap().to_owned();
    let inspections: [(&str, &[&str]); 7] = [
        ("state", &["state"]),
        ("checkpoints", &["checkpoints", "list"]),
        ("dead-letters", &["dead-letters", "list"]),
        ("audit", &["audit", "export"]),
        ("actions", &["actions", "list"]),
        ("requests", &["requests", "show", "--key", "r-0"]),
        ("report", &["report", "--year", "2026"]),
    ];
    for (command, args) in inspections {
        let with = |flag: &str, value: &str| {
            let mut all = args.to_vec();
            all.extend_from_slice(&[flag, value]);
            ws.run(&all)
        };
        check(command, 0, with("--config", &config));
        check(command, 1, with("--state", &missing));
        check(command, 2, with("--config", "bad.toml"));
    }
    // The legal clock: an extension once (then 1), a reason code not in the list (2), a
    // year out of range (2).
    let extend = || {
        ws.run(&[
            "requests", "extend", "--config", &config, "--key", "r-1", "--reason", "complex",
        ])
    };
    check("requests", 0, extend());
    check("requests", 1, extend());
    check(
        "requests",
        2,
        ws.run(&[
            "requests",
            "deny",
            "--config",
            &config,
            "--key",
            "r-1",
            "--reason-code",
            "because",
        ]),
    );
    check(
        "report",
        2,
        ws.run(&["report", "--config", &config, "--year", "1969"]),
    );
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    check(
        "dead-letters",
        1,
        ws.run(&[
            "dead-letters",
            "discard",
            "--config",
            &config,
            "--id",
            "999",
            "--reason",
            "test",
        ]),
    );
    // `audit lookup` takes `--config F` or `--state F`, as the README's command table says.
    let state = ws.path("state.redb").to_str().unwrap().to_owned();
    let lookup = |flag: &str, value: &str, key: &str| {
        ws.run(&[
            "audit",
            "lookup",
            flag,
            value,
            "--action",
            "anonymize_user",
            "--key",
            key,
        ])
    };
    check("audit", 0, lookup("--state", &state, "r-0"));
    check("audit", 1, lookup("--config", &config, "r-no-such-request"));
    // A shard with no checkpoint: 1, and the message names the shards that have one.
    let reset = ws.run(&[
        "checkpoints",
        "reset",
        "--config",
        &config,
        "--shard",
        "shardId-no-such-shard",
    ]);
    assert!(reset.2.contains("shardId-000000000000"), "{}", reset.2);
    check("checkpoints", 1, reset);
    check(
        "checkpoints",
        0,
        ws.run(&["checkpoints", "reset", "--config", &config, "--all"]),
    );

    // consumer deregister, on kinesis-mock (kinesalite has no fan-out consumers).
    let mock = KinesisMock::start();
    let mock_client = mock.client();
    create_stream(&mock_client, "events", 1).await;
    let efo = Workspace::new(&mock.endpoint, "events", &backend.url);
    let efo_config = efo.config().to_str().unwrap().to_owned();
    let deregister = || efo.run(&["consumer", "deregister", "--config", &efo_config]);
    check("consumer deregister", 1, deregister());
    let arn = mock_client
        .describe_stream_summary()
        .stream_name("events")
        .send()
        .await
        .unwrap()
        .stream_description_summary()
        .unwrap()
        .stream_arn()
        .to_owned();
    mock_client
        .register_stream_consumer()
        .stream_arn(&arn)
        .consumer_name("gdpr-consumer")
        .send()
        .await
        .unwrap();
    // Refused (exit 1) while the consumer is still being created.
    let mut removed = deregister();
    for _ in 0..40 {
        if removed.0 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        removed = deregister();
    }
    assert!(
        removed.1.contains("consumer gdpr-consumer deregistered"),
        "{removed:?}"
    );
    check("consumer deregister", 0, removed);
    let bad = ws.path("bad.toml");
    check(
        "consumer deregister",
        2,
        efo.run(&["consumer", "deregister", "--config", bad.to_str().unwrap()]),
    );

    let untested: Vec<&(String, i32)> = documented
        .iter()
        .filter(|row| !seen.contains(row))
        .collect();
    assert!(
        untested.is_empty(),
        "documented in README.md (### Exit codes) but not checked here: {untested:?}"
    );
    let undocumented: Vec<&(String, i32)> = seen
        .iter()
        .filter(|row| !documented.contains(row))
        .collect();
    assert!(
        undocumented.is_empty(),
        "checked here, but README.md (### Exit codes) says `—` or lacks the command: {undocumented:?}"
    );
}
