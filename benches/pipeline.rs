//! The pipeline in process against its floors, on the seeded synthetic stream.
//!
//! `cargo bench --bench pipeline` runs it in full (200,000 events by default,
//! `BENCH_RECORDS` to change); under `cargo test` it runs a small smoke pass. Everything runs
//! on one core. Floors over the same events: a memmem scan for one literal, serde_json
//! tokenizing (IgnoredAny), and decode-only (KPL, gzip and JSON to the values rules read).
//! Then the front half (decode → rules → dedup in memory) with 1 and 10 rules: with
//! `PREFILTER`, without it (their opening checks give them one), and written as one
//! condition (no prefilter at all, so the rule runs on every event); and the whole pipeline
//! (decode → rules → ledger → actions answered by a local server → checkpoints committed
//! per batch) on 64 shards. Each figure is events per second and its ratio to the floor
//! that bounds it.

mod common;

use common::Shape;
use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use gdpr_consumer::actions::ActionSet;
use gdpr_consumer::config::Settings;
use gdpr_consumer::config::StartPosition;
use gdpr_consumer::decode;
use gdpr_consumer::keys::{KeySource, Keys};
use gdpr_consumer::pipeline::{BatchEnd, Pipeline, ShardProgress, Sink};
use gdpr_consumer::rules::reload::Rules;
use gdpr_consumer::rules::{RuleSet, Verdict};
use gdpr_consumer::shutdown::Shutdown;
use gdpr_consumer::source::{Batch, Position, RawRecord};
use gdpr_consumer::state::{Access, LocalState, State};
use gdpr_consumer::telemetry::Telemetry;

/// The daemon's allocator (see src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shards of the whole-pipeline run.
const SHARDS: usize = 64;

/// `BENCH_ONLY="front 10 Prefilter"` or `"whole 10 Prefilter 1"` (say) runs only the runs
/// whose name starts with those whole words (`"front 1"` is not `"front 10"`; `"whole 10
/// Prefilter"` is both whole-pipeline Prefilter runs): for profiling, it then says on stderr
/// when the timed part starts and ends.
fn selected(run: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| {
        let (run, only): (Vec<&str>, Vec<&str>) = (
            run.split_whitespace().collect(),
            only.split_whitespace().collect(),
        );
        run.starts_with(&only)
    })
}

fn mark(what: &str) {
    if std::env::var("BENCH_ONLY").is_ok() {
        eprintln!("{what}");
    }
}

/// How a run's rules are written, as printed.
fn label(shape: Shape) -> &'static str {
    match shape {
        Shape::Prefilter => "PREFILTER",
        Shape::NoPrefilter => "no PREFILTER",
        Shape::Open => "open",
    }
}

fn rate(events: usize, started: Instant) -> f64 {
    events as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let wanted = match (full, std::env::var("BENCH_RECORDS")) {
        (true, Ok(n)) => n.parse().expect("BENCH_RECORDS is a number"),
        (true, Err(_)) => 200_000,
        (false, _) => 2_000,
    };
    inflate_peak_rss();
    let stream = common::stream(0x5eed, wanted, 0);
    let count = stream.events;
    let payloads: Vec<Vec<u8>> = stream
        .records
        .iter()
        .flat_map(|raw| decode::decode(&"bench".into(), &"shard".into(), raw.clone()).unwrap())
        .map(|record| record.bytes.to_vec())
        .collect();
    assert_eq!(payloads.len(), count);
    let bytes: usize = payloads.iter().map(Vec::len).sum();
    println!(
        "{count} events ({} Kinesis records, 1% KPL aggregates, 2% gzip), {:.0} bytes on average, {} deletion requests",
        stream.records.len(),
        bytes as f64 / count as f64,
        stream.requests.len()
    );
    let repeats = if full { 3 } else { 1 };
    let floors = Floors::measure(&stream.records, &payloads, repeats);
    front_half(&stream, &floors, repeats);
    whole_pipeline(&stream, &floors, repeats);
}

/// The process's peak resident set so far, in MiB (Linux).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Peak RSS while a KPL aggregate of 28 gzip sub-records, each inflating to 30 MiB (under
/// 1 MiB in all), is refused: the inflate limit holds for the whole Kinesis record, so
/// inflating stops at 32 MiB instead of holding about 840 MiB at once.
fn inflate_peak_rss() {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mib = vec![0u8; 1 << 20];
    for _ in 0..30 {
        gz.write_all(&mib).unwrap();
    }
    let member = gz.finish().unwrap();
    let aggregate = decode::aggregate(&vec![("k", member.as_slice()); 28]);
    let before = peak_rss_mib();
    let raw = RawRecord {
        sequence_number: "1".into(),
        partition_key: "k".into(),
        arrival_time_millis: 0,
        data: aggregate.clone(),
    };
    let refused = decode::decode(&"bench".into(), &"shard".into(), raw).is_err();
    println!(
        "memory 28 x 30 MiB gzip sub-records in a {} KiB aggregate: {}, peak RSS {:.0} MiB (before {:.0} MiB)",
        aggregate.len() >> 10,
        if refused { "refused" } else { "decoded" },
        peak_rss_mib(),
        before
    );
}

/// The best of `repeats` runs of a timed measurement (the machine is shared: the best run
/// is the one least disturbed), with what that run found.
fn best<T>(repeats: usize, mut run: impl FnMut() -> (f64, T)) -> (f64, T) {
    (0..repeats)
        .map(|_| run())
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .expect("at least one run")
}

/// What bounds the pipeline, measured over the same events in the same run.
struct Floors {
    memmem: f64,
    decode_only: f64,
}

impl Floors {
    fn measure(records: &[RawRecord], payloads: &[Vec<u8>], repeats: usize) -> Floors {
        let count = payloads.len();
        let finder = memchr::memmem::Finder::new("Delete User");
        let (memmem, hits) = best(repeats, || {
            let started = Instant::now();
            let hits = payloads.iter().filter(|p| finder.find(p).is_some()).count();
            (rate(count, started), hits)
        });
        let (tokenize, json) = best(repeats, || {
            let started = Instant::now();
            let json = payloads
                .iter()
                .filter(|p| serde_json::from_slice::<serde::de::IgnoredAny>(p).is_ok())
                .count();
            (rate(count, started), json)
        });
        let (stream, shard) = ("bench".into(), "shardId-000000000000".into());
        let (decode_only, maps) = best(repeats, || {
            let input = records.to_vec();
            let started = Instant::now();
            let mut maps = 0;
            for raw in input {
                for record in decode::decode(&stream, &shard, raw).unwrap() {
                    maps += usize::from(decode::rule_data(&record.bytes).is_map());
                }
            }
            (rate(count, started), maps)
        });
        // What `RuleSet::run` pays on every event before the prefilter: the check for JSON
        // that cannot be read as it is (BOM, invalid UTF-8, nesting past the parser's limit).
        let (readable, faults) = best(repeats, || {
            let started = Instant::now();
            let faults = payloads
                .iter()
                .filter(|p| decode::readable(p).fault.is_some())
                .count();
            (rate(count, started), faults)
        });
        println!("floor  memmem scan                  {memmem:>10.0} events/s ({hits} hits)");
        println!(
            "cost   readable check               {readable:>10.0} events/s ({faults} faults): {:.0} ns an event, {:.0} ns for memmem",
            1e9 / readable,
            1e9 / memmem
        );
        println!("floor  serde_json tokenize          {tokenize:>10.0} events/s ({json} JSON)");
        println!("floor  decode only                  {decode_only:>10.0} events/s ({maps} maps)");
        Floors {
            memmem,
            decode_only,
        }
    }

    /// The floor a run is measured against: memmem with declared prefilters, decode-only
    /// without.
    fn ratio(&self, events_per_second: f64, shape: Shape) -> String {
        match shape {
            Shape::Prefilter => format!("{:.2} x memmem", events_per_second / self.memmem),
            _ => format!("{:.2} x decode-only", events_per_second / self.decode_only),
        }
    }
}

/// Decode → rules → dedup (a set in memory standing in for the ledger).
fn front_half(stream: &common::Stream, floors: &Floors, repeats: usize) {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::generate(&dir.path().join("bench.key")).unwrap();
    for (rules, shape) in [
        (1, Shape::Prefilter),
        (1, Shape::NoPrefilter),
        (1, Shape::Open),
        (10, Shape::Prefilter),
        (10, Shape::NoPrefilter),
    ] {
        if !selected(&format!("front {rules} {shape:?}")) {
            continue;
        }
        let rules_dir = tempfile::tempdir().unwrap();
        common::write_rules(rules_dir.path(), rules, shape);
        let set = RuleSet::load(rules_dir.path(), None).unwrap();
        let (stream_name, shard) = ("bench".into(), "shardId-000000000000".into());
        let (events_per_second, decisions) = best(repeats, || {
            let input = stream.records.clone();
            let mut done: HashSet<[u8; 32]> = HashSet::new();
            let mut decisions = 0;
            mark("timing starts");
            let started = Instant::now();
            for raw in input {
                for record in decode::decode(&stream_name, &shard, raw).unwrap() {
                    for (_, verdict) in set.run(&record).verdicts {
                        if let Verdict::Decided(list) = verdict {
                            for d in list {
                                decisions +=
                                    usize::from(done.insert(keys.request_id(&d.action, &d.key)));
                            }
                        }
                    }
                }
            }
            (rate(stream.events, started), decisions)
        });
        println!(
            "front  {rules:>2} rule(s), {:<13}  {events_per_second:>10.0} events/s = {} ({decisions} decisions)",
            label(shape),
            floors.ratio(events_per_second, shape),
        );
        if rules == 10 {
            assert_eq!(
                decisions,
                stream.requests.len(),
                "every request decided once"
            );
        }
    }
}

/// The whole pipeline on one core: 64 shards, each handling its batches in order, with the
/// redb ledger, checkpoints and actions answered by a local server (on another thread).
fn whole_pipeline(stream: &common::Stream, floors: &Floors, repeats: usize) {
    let (backend, calls, backend_thread) = spawn_backend();
    // The third run reads the stream a second time on the same state: every request is
    // found in the ledger, so it measures the pipeline without the backend calls.
    for (name, shape, passes) in [
        (label(Shape::Prefilter), Shape::Prefilter, 1),
        (label(Shape::NoPrefilter), Shape::NoPrefilter, 1),
        ("requests done", Shape::Prefilter, 2),
    ] {
        if !selected(&format!("whole 10 {shape:?} {passes}")) {
            continue;
        }
        // Each repeat starts from an empty state.
        let (events_per_second, (cpu, sent)) = best(repeats, || {
            let dir = tempfile::tempdir().unwrap();
            let settings = whole_pipeline_settings(dir.path(), backend, shape);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let passes = (0..passes)
                .map(|_| shard_batches(&stream.records, settings.stream.records_per_call as usize))
                .collect();
            let before = calls.load(Ordering::SeqCst);
            let (rate, cpu) = runtime.block_on(run_pipeline(
                &settings,
                passes,
                stream.events,
                &backend_thread,
            ));
            (rate, (cpu, calls.load(Ordering::SeqCst) - before))
        });
        let per_cpu_second = |seconds: f64| stream.events as f64 / seconds;
        println!(
            "whole  10 rules, {name:<13}  {events_per_second:>10.0} events/s = {} ({sent} calls); per CPU-second: {:.0} events on the pipeline thread, {:.0} with its commits",
            floors.ratio(events_per_second, shape),
            per_cpu_second(cpu.thread),
            per_cpu_second(cpu.all),
        );
        assert_eq!(sent, stream.requests.len(), "every request sent once");
    }
}

/// A config in `dir`: 10 rules, the state, one action to the local backend.
fn whole_pipeline_settings(dir: &Path, backend: SocketAddr, shape: Shape) -> Settings {
    std::fs::create_dir(dir.join("rules")).unwrap();
    common::write_rules(&dir.join("rules"), 10, shape);
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"[stream]
name = "bench"
[state]
path = "state.redb"
[rules]
dir = "rules"
[actions.anonymize_user]
method = "POST"
url = "http://{backend}/v1/users/{{user_id}}/anonymize"
allow_insecure_http = true
"#
        ),
    )
    .unwrap();
    Settings::resolve(Some(&config), Default::default()).unwrap()
}

/// The records dealt to 64 shards, in GetRecords answers of `batch` records (the daemon's
/// `records_per_call`), order kept per shard.
fn shard_batches(records: &[RawRecord], batch: usize) -> Vec<Vec<Batch>> {
    let per_shard = records.len().div_ceil(SHARDS);
    records
        .chunks(per_shard)
        .map(|shard| {
            shard
                .chunks(batch)
                .map(|chunk| Batch {
                    records: chunk.to_vec(),
                    millis_behind_latest: Some(1_000),
                    shard_end: false,
                    in_flight: None,
                    ..Default::default()
                })
                .collect()
        })
        .collect()
}

/// Runs the pipeline over each pass of shards in turn, on one state, and times the last:
/// events/s, and the CPU time it took.
async fn run_pipeline(
    settings: &Settings,
    passes: Vec<Vec<Vec<Batch>>>,
    events: usize,
    backend_thread: &str,
) -> (f64, Cpu) {
    let actions: BTreeSet<String> = settings.actions.keys().cloned().collect();
    let set = RuleSet::load(&settings.rules_dir, Some(actions.clone())).unwrap();
    let (state, keys) = LocalState::open(
        &settings.state_path,
        KeySource {
            env: None,
            file: &settings.key_file,
        },
        Access::Run,
    )
    .unwrap();
    let pipeline = Arc::new(Pipeline {
        stream: "bench".into(),
        // No reload during a bench: nothing for the send check to hold cases to.
        rules: Arc::new(Rules::new(
            set,
            settings.rules_dir.clone(),
            actions,
            Arc::new(|_| Ok(())),
        )),
        actions: ActionSet::new(&settings.actions, true).unwrap(),
        sink: Sink::Live {
            state: Arc::new(State::local(state)),
            keys,
        },
        shutdown: Shutdown::new(),
        telemetry: Arc::new(Telemetry::new()),
        claims: Default::default(),
        release_lock: Default::default(),
        letters_in_retry: Default::default(),
    });
    let mut timed = (0.0, Cpu::default());
    for shards in passes {
        mark("timing starts");
        let (started, cpu_before) = (Instant::now(), Cpu::now(backend_thread));
        let tasks: Vec<_> = shards
            .into_iter()
            .enumerate()
            .map(|(n, batches)| {
                let pipeline = pipeline.clone();
                tokio::spawn(async move {
                    let shard_id = format!("shardId-{n:012}");
                    let mut progress = ShardProgress::new(
                        "bench",
                        &shard_id,
                        Position::Start(StartPosition::TrimHorizon),
                    );
                    for batch in batches {
                        let end = pipeline.handle_batch(&mut progress, batch).await.unwrap();
                        assert_eq!(end, BatchEnd::Handled);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        mark("timing ends");
        let cpu = Cpu::now(backend_thread);
        timed = (
            rate(events, started),
            Cpu {
                thread: cpu.thread - cpu_before.thread,
                all: cpu.all - cpu_before.all,
            },
        );
    }
    timed
}

/// CPU seconds, the scheduler's count (in nanoseconds, from /proc).
#[derive(Default)]
struct Cpu {
    /// The pipeline's thread (this one).
    thread: f64,
    /// Every thread of the process but the backend's: the pipeline's and the blocking
    /// threads its group commits run on.
    all: f64,
}

impl Cpu {
    fn now(backend_thread: &str) -> Cpu {
        let seconds = |task: &Path| {
            let stat = std::fs::read_to_string(task.join("schedstat")).unwrap_or_default();
            stat.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .map_or(0.0, |nanos| nanos as f64 / 1e9)
        };
        let all = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|task| task.file_name() != backend_thread)
            .map(|task| seconds(&task.path()))
            .sum();
        Cpu {
            thread: seconds(Path::new("/proc/thread-self")),
            all,
        }
    }
}

/// A backend that answers every call 200 and counts them, on a thread of its own (whose
/// id it gives, to leave its CPU time out).
fn spawn_backend() -> (SocketAddr, Arc<AtomicUsize>, String) {
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    let counter = calls.clone();
    let (thread_id, backend_thread) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let me = std::fs::read_link("/proc/thread-self").unwrap();
        let id = me.file_name().unwrap().to_string_lossy().into_owned();
        thread_id.send(id).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = axum::Router::new().fallback(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { "ok" }
            });
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (address, calls, backend_thread.recv().unwrap())
}
