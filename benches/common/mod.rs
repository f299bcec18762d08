//! The seeded synthetic stream both benchmarks read: the same bytes every run.
//!
//! Page views, orders, logins (JSON, 0.5–2 KB) and plain-text log lines; 1% of events are
//! GDPR deletion requests spread over ten clients. Some Kinesis records are KPL aggregates
//! of several events (1% of records, a tenth of the events), some gzip-compressed JSON (2%),
//! as producers on a shared stream write.

#![allow(dead_code)] // each benchmark uses its own part

use std::io::Write;
use std::path::Path;

use gdpr_consumer::decode;
use gdpr_consumer::source::RawRecord;

/// A small deterministic generator (no dependency, same stream every run).
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Clients the deletion requests are for; rule `n` of [`write_rules`] serves `client-n`.
pub const CLIENTS: u64 = 10;

/// One event's payload; `Some(request_id)` when it is a deletion request.
pub fn event(rng: &mut Lcg, i: usize) -> (String, Vec<u8>, Option<String>) {
    let pad = "x".repeat(300 + (rng.next() % 1400) as usize);
    let user = format!("u-{}", rng.next() % 100_000);
    let (data, request) = match rng.next() % 100 {
        0 => {
            let request_id = format!("r-{i}");
            let data = serde_json::json!({"type": "privacy_request", "tags": ["GDPR", "Delete User"],
                "client": format!("client-{}", rng.next() % CLIENTS), "request_id": request_id, "user_id": user});
            (data.to_string(), Some(request_id))
        }
        1..=49 => (serde_json::json!({"type": "page_view", "client": "acme", "user_id": user,
            "path": format!("/products/{}", rng.next() % 500), "ua": pad}).to_string(), None),
        50..=79 => (serde_json::json!({"type": "order", "client": "acme", "user_id": user,
            "order_id": format!("o-{i}"), "total_cents": rng.next() % 100_000, "note": pad}).to_string(), None),
        80..=89 => (serde_json::json!({"type": "login", "client": "globex", "user_id": user, "ok": true, "meta": pad}).to_string(), None),
        _ => (format!("{i} INFO GET /api/items/{} 200 {pad}", rng.next() % 50), None),
    };
    (user, data.into_bytes(), request)
}

/// A generated stream: Kinesis records and what they hold.
pub struct Stream {
    pub records: Vec<RawRecord>,
    /// Events inside them (an aggregate holds several).
    pub events: usize,
    /// Request ids of the deletion requests, each once.
    pub requests: Vec<String>,
}

/// At least `events` events (an aggregate may add a few), in Kinesis records: 1% KPL
/// aggregates of 2–20 events (about a tenth of the events), 2% gzip, the rest plain. Sequence numbers count from
/// `first_sequence`.
pub fn stream(seed: u64, events: usize, first_sequence: u64) -> Stream {
    let mut rng = Lcg::new(seed);
    let mut out = Stream {
        records: Vec::with_capacity(events),
        events: 0,
        requests: Vec::new(),
    };
    while out.events < events {
        let i = out.events;
        let shape = rng.next() % 100;
        let (partition_key, data) = if shape < 1 {
            let parts: Vec<_> = (0..2 + rng.next() % 19)
                .map(|n| event(&mut rng, i + n as usize))
                .collect();
            let subs: Vec<(&str, &[u8])> = parts
                .iter()
                .map(|(key, data, _)| (key.as_str(), data.as_slice()))
                .collect();
            out.events += parts.len();
            out.requests
                .extend(parts.iter().filter_map(|(_, _, r)| r.clone()));
            (parts[0].0.clone(), decode::aggregate(&subs))
        } else {
            let (key, data, request) = event(&mut rng, i);
            out.events += 1;
            out.requests.extend(request);
            if shape < 3 {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(&data).unwrap();
                (key, gz.finish().unwrap())
            } else {
                (key, data)
            }
        };
        let n = out.records.len() as u64;
        out.records.push(RawRecord {
            sequence_number: format!("{:056}", first_sequence + n).into(),
            partition_key,
            arrival_time_millis: 1_767_225_600_000 + n as i64,
            data,
        });
    }
    out
}

/// How the benchmark's rules are written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Shape {
    /// The shipped GDPR rule: `const PREFILTER`, then the opening checks.
    Prefilter,
    /// The same without `PREFILTER`: its opening checks give it one.
    NoPrefilter,
    /// The same test as one condition: no prefilter and no opening checks the daemon can
    /// read, so the rule runs on every event.
    Open,
}

/// `n` rules, one per client, each the shape of the shipped GDPR rule (or `shape`).
pub fn write_rules(dir: &Path, n: u64, shape: Shape) {
    for c in 0..n {
        let text = match shape {
            Shape::Open => format!(
                r#"fn decide(record) {{
    let event = record.data;
    if type_of(event) == "map" && event.type == "privacy_request" && event.client == "client-{c}"
        && type_of(event.tags) == "array" && event.tags.contains("GDPR") && event.tags.contains("Delete User") {{
        #{{ action: "anonymize_user", key: event.request_id, params: #{{ user_id: event.user_id }} }}
    }}
}}
"#
            ),
            _ => format!(
                r#"{literal}fn decide(record) {{
    let event = record.data;
    if type_of(event) != "map" {{ return; }}
    if event.type != "privacy_request" {{ return; }}
    if event.client != "client-{c}" {{ return; }}
    if type_of(event.tags) != "array" {{ return; }}
    if !event.tags.contains("GDPR") || !event.tags.contains("Delete User") {{ return; }}
    #{{ action: "anonymize_user", key: event.request_id, params: #{{ user_id: event.user_id }} }}
}}
"#,
                literal = if shape == Shape::Prefilter {
                    "const PREFILTER = [\"Delete User\"];\n"
                } else {
                    ""
                }
            ),
        };
        std::fs::write(dir.join(format!("client_{c}.rhai")), text).unwrap();
    }
}

/// CPU time of every thread of a process, from the scheduler's count (nanoseconds in
/// /proc/PID/task/*/schedstat): "per core" counts every thread.
pub fn cpu_time(pid: u32) -> std::time::Duration {
    let nanos: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    std::time::Duration::from_nanos(nanos)
}

/// A process's peak resident memory (VmHWM), KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

/// SIGTERM, then the clean exit (0) the daemon promises, within a minute; fails with the
/// log otherwise.
pub async fn stop(child: &mut std::process::Child, log: &Path, who: &str) {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{who} did not stop:\n{}",
            log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{who} exited {status}:\n{}", log());
}
