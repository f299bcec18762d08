//! The in-process pipeline against its floors, on a seeded synthetic stream.
//!
//! `cargo bench --bench pipeline` runs it in full (200,000 records by default,
//! `BENCH_RECORDS` to change); under `cargo test` it runs a small smoke pass. It measures
//! decode → rules → dedup (an in-memory set standing in for the ledger), with 1 and 10
//! rules, with and without prefilters, beside two floors over the same bytes: a memmem scan
//! for one literal, and serde_json tokenizing (IgnoredAny). Each figure is records per
//! second on one core, and its ratio to the floor.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use gdpr_consumer::decode;
use gdpr_consumer::keys::Keys;
use gdpr_consumer::rules::{RuleSet, Verdict};
use gdpr_consumer::source::RawRecord;

/// A small deterministic generator (no dependency, same stream every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// `count` records of 0.5–2 KB: page views, orders, logins, log lines, and 1% deletion
/// requests for one of ten clients.
fn stream(count: usize) -> Vec<RawRecord> {
    let mut rng = Lcg(0x5eed);
    (0..count)
        .map(|i| {
            let pad = "x".repeat(300 + (rng.next() % 1400) as usize);
            let user = format!("u-{}", rng.next() % 100_000);
            let data = match rng.next() % 100 {
                0 => serde_json::json!({"type": "privacy_request", "tags": ["GDPR", "Delete User"],
                    "client": format!("client-{}", rng.next() % 10), "request_id": format!("r-{i}"), "user_id": user}).to_string(),
                1..=49 => serde_json::json!({"type": "page_view", "client": "acme", "user_id": user,
                    "path": format!("/products/{}", rng.next() % 500), "ua": pad}).to_string(),
                50..=79 => serde_json::json!({"type": "order", "client": "acme", "user_id": user,
                    "order_id": format!("o-{i}"), "total_cents": rng.next() % 100_000, "note": pad}).to_string(),
                80..=89 => serde_json::json!({"type": "login", "client": "globex", "user_id": user, "ok": true, "meta": pad}).to_string(),
                _ => format!("{i} INFO GET /api/items/{} 200 {pad}", rng.next() % 50),
            };
            RawRecord {
                sequence_number: format!("{:056}", i),
                partition_key: user,
                arrival_time_millis: 1_767_225_600_000 + i as i64,
                data: data.into_bytes(),
            }
        })
        .collect()
}

/// `n` rules, one per client, each the shape of the shipped GDPR rule.
fn write_rules(dir: &Path, n: usize, prefilter: bool) {
    for c in 0..n {
        let literal = if prefilter {
            "const PREFILTER = [\"Delete User\"];\n"
        } else {
            ""
        };
        let text = format!(
            r#"{literal}fn decide(record) {{
    let event = record.data;
    if type_of(event) != "map" {{ return; }}
    if event.type != "privacy_request" {{ return; }}
    if event.client != "client-{c}" {{ return; }}
    if type_of(event.tags) != "array" {{ return; }}
    if !event.tags.contains("GDPR") || !event.tags.contains("Delete User") {{ return; }}
    #{{ action: "anonymize_user", key: event.request_id, params: #{{ user_id: event.user_id }} }}
}}
"#
        );
        std::fs::write(dir.join(format!("client_{c}.rhai")), text).unwrap();
    }
}

fn rate(records: usize, started: Instant) -> f64 {
    records as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let count = match (full, std::env::var("BENCH_RECORDS")) {
        (true, Ok(n)) => n.parse().expect("BENCH_RECORDS is a number"),
        (true, Err(_)) => 200_000,
        (false, _) => 2_000,
    };
    let records = stream(count);
    let bytes: usize = records.iter().map(|r| r.data.len()).sum();
    println!(
        "{count} records, {:.0} bytes on average, 1% deletion requests",
        bytes as f64 / count as f64
    );

    // Floors over the same bytes.
    let started = Instant::now();
    let finder = memchr::memmem::Finder::new("Delete User");
    let hits = records
        .iter()
        .filter(|r| finder.find(&r.data).is_some())
        .count();
    let memmem = rate(count, started);
    let started = Instant::now();
    let tokenized = records
        .iter()
        .filter(|r| serde_json::from_slice::<serde::de::IgnoredAny>(&r.data).is_ok())
        .count();
    let tokenize = rate(count, started);
    println!("floor  memmem scan            {memmem:>12.0} records/s ({hits} hits)");
    println!("floor  serde_json tokenize    {tokenize:>12.0} records/s ({tokenized} JSON)");

    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::load_or_create(None, &dir.path().join("bench.key")).unwrap();
    for (rules, prefilter) in [(1, true), (1, false), (10, true), (10, false)] {
        let rules_dir = tempfile::tempdir().unwrap();
        write_rules(rules_dir.path(), rules, prefilter);
        let set = RuleSet::load(rules_dir.path(), None).unwrap();
        let input = records.clone();
        let mut done: HashSet<[u8; 32]> = HashSet::new();
        let mut decisions = 0;
        let started = Instant::now();
        for raw in input {
            for record in decode::decode("bench", "shardId-000000000000", raw).unwrap() {
                for (_, verdict) in set.evaluate(&record) {
                    if let Verdict::Decided(list) = verdict {
                        for d in list {
                            decisions +=
                                usize::from(done.insert(keys.request_id(&d.action, &d.key)));
                        }
                    }
                }
            }
        }
        let pipeline = rate(count, started);
        let (floor, name) = if prefilter {
            (memmem, "memmem")
        } else {
            (tokenize, "tokenize")
        };
        println!(
            "pipeline {rules:>2} rule(s), prefilter {:<3} {pipeline:>12.0} records/s = {:.2} x {name} ({decisions} decisions)",
            if prefilter { "on" } else { "off" },
            pipeline / floor
        );
        assert!(
            decisions > 0,
            "the rules matched nothing: the benchmark measures nothing"
        );
    }
}
