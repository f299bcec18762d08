//! End to end: the daemon binary reads a 64-shard stream through aws-sdk-kinesis from an
//! in-process replay endpoint and calls a local backend.
//!
//! `cargo bench --bench end_to_end` replays 10k, 100k and 1M events and prints, per run, the
//! wall time, events/s, the daemon's CPU time per event and its peak RSS; then a latency run
//! releases events live at a steady rate and prints how long each deletion request took from
//! becoming readable to reaching the backend; then the daemon polls shards with nothing to
//! read, without and with the idle back-off, and the CPU time per idle shard-second and per
//! GetRecords call is printed. Every run fails loudly unless the backend got each request
//! exactly once and the daemon read each record once. Under `cargo test` the same runs on a
//! few hundred events and 4 shards.
//!
//! GetRecords answers are pre-built in memory, so what is measured is the SDK (HTTP client,
//! JSON, base64) and the daemon, not the endpoint. Each replay and the latency run go once
//! polling and once in fan-out mode (`[stream] read = "fan-out"`): the endpoint then also
//! answers DescribeStreamConsumer and serves SubscribeToShard event streams from the same
//! pre-built records (an event per pre-built batch, or per what became readable; a
//! heartbeat a second on an idle shard), and the idle run adds a fan-out daemon.

mod common;

use std::collections::HashMap;
use std::ops::Range;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header::CONTENT_TYPE, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use gdpr_consumer::actions::idempotency_key;
use gdpr_consumer::source::RawRecord;
use serde_json::{json, Value};

const STREAM: &str = "bench-events";
const SEED: u64 = 0x5eed;
/// Records in one pre-built GetRecords answer: as many as the daemon asks for by default
/// (`[stream] records_per_call`), so answers are served as built.
const BATCH: usize = 2_500;
/// Shard `s` numbers its records from `s * SEQUENCE_STRIDE`: increasing in a shard, unique
/// in the stream.
const SEQUENCE_STRIDE: u64 = 1_000_000_000_000;
/// Pause between two events of an idle subscription (Kinesis sends one every few seconds;
/// kinesis-mock every second).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// MillisBehindLatest of a replayed answer that leaves records behind it.
const BACKLOG_MILLIS: u128 = 60_000;
const JSON_1_1: &str = "application/x-amz-json-1.1";
const RECORDS_OPEN: &[u8] = b"{\"Records\":[";

/// What one invocation runs: in full under `cargo bench`, a smoke pass under `cargo test`.
struct Plan {
    shards: usize,
    sizes: Vec<usize>,
    /// Daemons run on each replay, the best reported (the machine is shared).
    repeats: usize,
    live_events_per_second: f64,
    live_seconds: f64,
    /// Idle run: time for the poll back-off to settle, then the time measured.
    idle_settle: Duration,
    idle_measure: Duration,
}

#[tokio::main]
async fn main() {
    let plan = match std::env::args().any(|a| a == "--bench") {
        true => Plan {
            shards: 64,
            // `BENCH_EVENTS=10000,1000000` (say) runs only these replays.
            sizes: std::env::var("BENCH_EVENTS").map_or(vec![10_000, 100_000, 1_000_000], |v| {
                v.split(',')
                    .filter(|n| !n.trim().is_empty())
                    .map(|n| n.trim().parse().expect("BENCH_EVENTS lists numbers"))
                    .collect()
            }),
            repeats: 3,
            live_events_per_second: 20_000.0,
            live_seconds: 5.0,
            idle_settle: Duration::from_secs(10),
            idle_measure: Duration::from_secs(30),
        },
        false => Plan {
            shards: 4,
            sizes: vec![400],
            repeats: 1,
            live_events_per_second: 400.0,
            live_seconds: 1.0,
            idle_settle: Duration::from_millis(700),
            idle_measure: Duration::from_secs(1),
        },
    };
    print_machine(plan.shards);
    println!(
        "mode       events  records requests   wall s   events/s  records/s CPU µs/event peak RSS MiB"
    );
    for &events in &plan.sizes {
        for mode in [Mode::Polling, Mode::FanOut] {
            throughput(events, plan.shards, plan.repeats, mode)
                .await
                .print(mode);
        }
    }
    for mode in [Mode::Polling, Mode::FanOut] {
        latency(&plan, mode).await;
    }
    idle_polling(&plan).await;
}

/// How the daemon reads the replay endpoint (`[stream] read`).
#[derive(Clone, Copy)]
enum Mode {
    Polling,
    FanOut,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Polling => "polling",
            Mode::FanOut => "fan-out",
        }
    }

    /// The `[stream]` lines of the mode (polling: its poll interval, and no idle back-off
    /// where `no_back_off`).
    fn config(self, no_back_off: bool) -> &'static str {
        match (self, no_back_off) {
            (Mode::Polling, false) => "poll_interval_ms = 200",
            (Mode::Polling, true) => "poll_interval_ms = 200\nidle_poll_interval_ms = 200",
            (Mode::FanOut, _) => "read = \"fan-out\"",
        }
    }
}

fn print_machine(shards: usize) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown CPU", |m| m.trim_start_matches([' ', '\t', ':']));
    println!(
        "gdpr-consumer binary <- aws-sdk-kinesis <- replay endpoint ({shards} shards, in this process); \
         {cpus} CPUs ({model}); 10 rules with PREFILTER; state in {}",
        std::env::temp_dir().display()
    );
}

// ---------------------------------------------------------------------------------------
// The replay endpoint: Kinesis JSON 1.1 over pre-built answers.

/// One shard's records, as the JSON of GetRecords answers.
struct Shard {
    batches: Vec<Batch>,
    /// When each record becomes readable, counted from the stream's epoch (live mode).
    release: Vec<Duration>,
}

impl Shard {
    fn len(&self) -> usize {
        self.release.len()
    }
}

/// Up to [`BATCH`] consecutive records of a shard.
struct Batch {
    /// The whole answer to a reader at the batch's first record.
    answer: Bytes,
    /// Where each record's JSON object lies in `answer` (a shorter answer is cut from it).
    spans: Vec<Range<usize>>,
}

/// Builds a shard's answers record by record, so each generated payload can be dropped as
/// soon as it is encoded (1M events are about 1.3 GB).
struct ShardBuilder {
    shard: usize,
    batches: Vec<Batch>,
    answer: Vec<u8>,
    spans: Vec<Range<usize>>,
    release: Vec<Duration>,
}

impl ShardBuilder {
    fn new(shard: usize) -> Self {
        ShardBuilder {
            shard,
            batches: Vec::new(),
            answer: RECORDS_OPEN.to_vec(),
            spans: Vec::new(),
            release: Vec::new(),
        }
    }

    fn push(&mut self, record: RawRecord, release: Duration) {
        // A full batch is closed only once another record follows, so the last one knows
        // it is the last (MillisBehindLatest 0).
        if self.spans.len() == BATCH {
            self.close(BACKLOG_MILLIS);
        }
        if !self.spans.is_empty() {
            self.answer.push(b',');
        }
        let start = self.answer.len();
        let sequence_number = sequence_number(self.shard, self.release.len());
        write_record(&mut self.answer, &sequence_number, &record);
        self.spans.push(start..self.answer.len());
        self.release.push(release);
    }

    fn close(&mut self, millis_behind: u128) {
        let next = iterator(self.shard, self.release.len());
        self.answer
            .extend_from_slice(answer_tail(millis_behind, &next).as_bytes());
        self.batches.push(Batch {
            answer: std::mem::replace(&mut self.answer, RECORDS_OPEN.to_vec()).into(),
            spans: std::mem::take(&mut self.spans),
        });
    }

    fn finish(mut self) -> Shard {
        if !self.spans.is_empty() {
            self.close(0);
        }
        Shard {
            batches: self.batches,
            release: self.release,
        }
    }
}

/// One record as GetRecords returns it.
fn write_record(out: &mut Vec<u8>, sequence_number: &str, record: &RawRecord) {
    use base64::Engine;
    use std::io::Write;
    write!(
        out,
        r#"{{"SequenceNumber":"{sequence_number}","ApproximateArrivalTimestamp":{:.3},"PartitionKey":"#,
        record.arrival_time_millis as f64 / 1000.0
    )
    .unwrap();
    serde_json::to_writer(&mut *out, &record.partition_key).unwrap();
    out.extend_from_slice(br#","Data":""#);
    let at = out.len();
    out.resize(
        at + base64::encoded_len(record.data.len(), true).unwrap(),
        0,
    );
    base64::engine::general_purpose::STANDARD
        .encode_slice(&record.data, &mut out[at..])
        .unwrap();
    out.extend_from_slice(br#""}"#);
}

fn event_tail(millis_behind: u128, continuation: &str) -> String {
    format!(
        r#"],"ContinuationSequenceNumber":"{continuation}","MillisBehindLatest":{millis_behind}}}"#
    )
}

/// One message of an event stream, framed as Kinesis frames it.
fn event_message(event_type: &'static str, payload: Vec<u8>) -> Bytes {
    use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
    let message = Message::new(payload)
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String("event".into()),
        ))
        .add_header(Header::new(
            ":event-type",
            HeaderValue::String(event_type.into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String("application/json".into()),
        ));
    let mut frame = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&message, &mut frame).unwrap();
    frame.into()
}

/// A response body fed message by message.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(hyper::body::Frame::data(c))))
    }
}

fn answer_tail(millis_behind: u128, next_iterator: &str) -> String {
    format!(r#"],"MillisBehindLatest":{millis_behind},"NextShardIterator":"{next_iterator}"}}"#)
}

fn shard_id(shard: usize) -> String {
    format!("shardId-{shard:012}")
}

/// Record `position` of `shard`. Numbers start at 1 in a shard, so that
/// [`continuation`] can name the point before the first record.
fn sequence_number(shard: usize, position: usize) -> String {
    format!(
        "{:056}",
        shard as u64 * SEQUENCE_STRIDE + position as u64 + 1
    )
}

/// A SubscribeToShard continuation: after it, `next` is the record to read.
fn continuation(shard: usize, next: usize) -> String {
    format!("{:056}", shard as u64 * SEQUENCE_STRIDE + next as u64)
}

/// An iterator names the shard and the position of the next record to read.
fn iterator(shard: usize, position: usize) -> String {
    format!("{shard}/{position}")
}

/// A Kinesis error answer: its `__type` and message.
struct ApiError {
    kind: &'static str,
    message: String,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError {
        kind: "InvalidArgumentException",
        message: message.into(),
    }
}

fn field<'a>(request: &'a Value, name: &str) -> Result<&'a str, ApiError> {
    request[name]
        .as_str()
        .ok_or_else(|| invalid(format!("{name} is missing")))
}

/// The stream the endpoint serves: every shard open, its records all there (replay) or
/// readable from their release time on (live).
struct Endpoint {
    shards: Vec<Shard>,
    live: bool,
    /// Live mode only: the instant releases count from; nothing is readable before it.
    epoch: OnceLock<Instant>,
    /// GetRecords calls answered.
    get_records_calls: AtomicU64,
    /// SubscribeToShard calls answered, and the events sent on them.
    subscriptions: AtomicU64,
    subscription_events: AtomicU64,
}

impl Endpoint {
    /// Every record readable at once.
    fn replay(records: Vec<RawRecord>, shards: usize) -> Self {
        let records = records.into_iter().map(|r| (r, Duration::ZERO));
        Endpoint {
            shards: build(records, shards),
            live: false,
            epoch: OnceLock::new(),
            get_records_calls: AtomicU64::new(0),
            subscriptions: AtomicU64::new(0),
            subscription_events: AtomicU64::new(0),
        }
    }

    /// Each record readable from its release time after the epoch.
    fn live(records: Vec<RawRecord>, release: Vec<Duration>, shards: usize) -> Self {
        Endpoint {
            shards: build(records.into_iter().zip(release), shards),
            live: true,
            epoch: OnceLock::new(),
            get_records_calls: AtomicU64::new(0),
            subscriptions: AtomicU64::new(0),
            subscription_events: AtomicU64::new(0),
        }
    }

    fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/", axum::routing::post(kinesis))
            .with_state(self)
    }

    /// Each shard's id and the sequence number of its last record.
    fn last_sequence_numbers(&self) -> HashMap<String, String> {
        (0..self.shards.len())
            .map(|s| {
                assert!(self.shards[s].len() > 0, "shard {s} is empty");
                (shard_id(s), sequence_number(s, self.shards[s].len() - 1))
            })
            .collect()
    }

    fn call(&self, operation: &str, request: &Value) -> Result<Bytes, ApiError> {
        if request["StreamName"].as_str().is_some_and(|n| n != STREAM) {
            return Err(ApiError {
                kind: "ResourceNotFoundException",
                message: "no such stream".into(),
            });
        }
        match operation {
            "ListShards" => self.list_shards(request),
            "DescribeStreamSummary" => Ok(self.describe_stream_summary()),
            "GetShardIterator" => self.get_shard_iterator(request),
            "GetRecords" => self.get_records(request),
            "DescribeStreamConsumer" => Ok(self.describe_stream_consumer()),
            _ => Err(ApiError {
                kind: "UnknownOperationException",
                message: format!("{operation} is not served"),
            }),
        }
    }

    /// Pages of `MaxResults` shards (1000 by default), the next page's first shard as the
    /// NextToken.
    fn list_shards(&self, request: &Value) -> Result<Bytes, ApiError> {
        let from = match request["NextToken"].as_str() {
            Some(token) => token.parse().map_err(|_| invalid("bad NextToken"))?,
            None => 0,
        };
        let page = request["MaxResults"].as_u64().map_or(1000, |n| n as usize);
        let count = self.shards.len();
        let to = (from + page.clamp(1, 10_000)).min(count);
        let step = u128::MAX / count as u128;
        let shards: Vec<Value> = (from..to)
            .map(|s| {
                let low = step * s as u128;
                let high = if s + 1 == count { u128::MAX } else { low + step - 1 };
                json!({
                    "ShardId": shard_id(s),
                    "HashKeyRange": {"StartingHashKey": low.to_string(), "EndingHashKey": high.to_string()},
                    "SequenceNumberRange": {"StartingSequenceNumber": sequence_number(s, 0)},
                })
            })
            .collect();
        let mut answer = json!({ "Shards": shards });
        if to < count {
            answer["NextToken"] = json!(to.to_string());
        }
        Ok(answer.to_string().into())
    }

    fn describe_stream_summary(&self) -> Bytes {
        json!({"StreamDescriptionSummary": {
            "StreamName": STREAM,
            "StreamARN": format!("arn:aws:kinesis:us-east-1:000000000000:stream/{STREAM}"),
            "StreamStatus": "ACTIVE",
            "StreamModeDetails": {"StreamMode": "PROVISIONED"},
            "RetentionPeriodHours": 24,
            "StreamCreationTimestamp": 1_767_225_600.0,
            "EnhancedMonitoring": [{"ShardLevelMetrics": []}],
            "EncryptionType": "NONE",
            "OpenShardCount": self.shards.len(),
            "ConsumerCount": 0,
        }})
        .to_string()
        .into()
    }

    fn get_shard_iterator(&self, request: &Value) -> Result<Bytes, ApiError> {
        let shard = self.shard_of(request)?;
        let position = match field(request, "ShardIteratorType")? {
            "TRIM_HORIZON" => 0,
            "AT_SEQUENCE_NUMBER" => self.position_of(shard, request)?,
            "AFTER_SEQUENCE_NUMBER" => {
                self.after(shard, field(request, "StartingSequenceNumber")?)?
            }
            other => return Err(invalid(format!("ShardIteratorType {other} is not served"))),
        };
        Ok(json!({ "ShardIterator": iterator(shard, position) })
            .to_string()
            .into())
    }

    /// The position of the record `StartingSequenceNumber` names in `shard`.
    fn position_of(&self, shard: usize, request: &Value) -> Result<usize, ApiError> {
        let after = self.after(shard, field(request, "StartingSequenceNumber")?)?;
        after
            .checked_sub(1)
            .filter(|&p| p < self.shards[shard].len())
            .ok_or_else(|| invalid("StartingSequenceNumber is not a record of the shard"))
    }

    /// The position of the record after `number` (a record's, or a continuation).
    fn after(&self, shard: usize, number: &str) -> Result<usize, ApiError> {
        let number: u64 = number
            .parse()
            .map_err(|_| invalid("the sequence number is not a number"))?;
        let after = (number % SEQUENCE_STRIDE) as usize;
        if number / SEQUENCE_STRIDE != shard as u64 || after > self.shards[shard].len() {
            return Err(invalid("the sequence number is not in the shard"));
        }
        Ok(after)
    }

    fn shard_of(&self, request: &Value) -> Result<usize, ApiError> {
        field(request, "ShardId")?
            .strip_prefix("shardId-")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&s| s < self.shards.len())
            .ok_or_else(|| ApiError {
                kind: "ResourceNotFoundException",
                message: "no such shard".into(),
            })
    }

    /// The consumer, always ACTIVE (fan-out).
    fn describe_stream_consumer(&self) -> Bytes {
        json!({"ConsumerDescription": {
            "ConsumerName": "gdpr-consumer",
            "ConsumerARN": format!("arn:aws:kinesis:us-east-1:000000000000:stream/{STREAM}/consumer/gdpr-consumer:1767225600"),
            "ConsumerStatus": "ACTIVE",
            "ConsumerCreationTimestamp": 1_767_225_600.0,
            "StreamARN": format!("arn:aws:kinesis:us-east-1:000000000000:stream/{STREAM}"),
        }})
        .to_string()
        .into()
    }

    /// SubscribeToShard: an event stream of the shard's records from the starting
    /// position, each event up to the end of a pre-built batch (as a GetRecords answer
    /// would be), a heartbeat (no records) every [`HEARTBEAT`] while nothing is readable.
    /// The next event is built only when the daemon has taken the last one (HTTP flow
    /// control), as Kinesis pushes.
    fn subscribe(self: Arc<Self>, request: &Value) -> Result<Response, ApiError> {
        let shard = self.shard_of(request)?;
        let start = &request["StartingPosition"];
        let mut next = match field(start, "Type")? {
            "TRIM_HORIZON" => 0,
            "AT_SEQUENCE_NUMBER" => self.position_of(
                shard,
                &json!({"StartingSequenceNumber": field(start, "SequenceNumber")?}),
            )?,
            "AFTER_SEQUENCE_NUMBER" => self.after(shard, field(start, "SequenceNumber")?)?,
            other => return Err(invalid(format!("StartingPosition {other} is not served"))),
        };
        self.subscriptions.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(1);
        tokio::spawn(async move {
            if sender
                .send(event_message("initial-response", b"{}".to_vec()))
                .await
                .is_err()
            {
                return;
            }
            let mut last_event = Instant::now();
            loop {
                let readable = self.readable(&self.shards[shard]);
                let payload = if next < readable {
                    let batch = &self.shards[shard].batches[next / BATCH];
                    let batch_start = next - next % BATCH;
                    let end = readable.min(batch_start + batch.spans.len());
                    let spans = &batch.spans[next - batch_start..end - batch_start];
                    let mut payload = RECORDS_OPEN.to_vec();
                    payload.extend_from_slice(
                        &batch.answer[spans[0].start..spans[spans.len() - 1].end],
                    );
                    let millis_behind = self.millis_behind(&self.shards[shard], end, readable);
                    next = end;
                    payload.extend_from_slice(
                        event_tail(millis_behind, &continuation(shard, next)).as_bytes(),
                    );
                    payload
                } else if last_event.elapsed() >= HEARTBEAT {
                    let mut payload = RECORDS_OPEN.to_vec();
                    payload.extend_from_slice(event_tail(0, &continuation(shard, next)).as_bytes());
                    payload
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                self.subscription_events.fetch_add(1, Ordering::Relaxed);
                if sender
                    .send(event_message("SubscribeToShardEvent", payload))
                    .await
                    .is_err()
                {
                    return;
                }
                last_event = Instant::now();
            }
        });
        Ok(Response::builder()
            .header(CONTENT_TYPE, "application/vnd.amazon.eventstream")
            .body(axum::body::Body::new(ChannelBody(receiver)))
            .unwrap())
    }

    /// From the iterator's position to the end of its batch, the `Limit` or the last record
    /// readable now, whichever comes first; a whole replayed batch is served as pre-built.
    fn get_records(&self, request: &Value) -> Result<Bytes, ApiError> {
        self.get_records_calls.fetch_add(1, Ordering::Relaxed);
        let (shard, position) = field(request, "ShardIterator")?
            .split_once('/')
            .and_then(|(s, p)| Some((s.parse::<usize>().ok()?, p.parse::<usize>().ok()?)))
            .filter(|&(s, p)| s < self.shards.len() && p <= self.shards[s].len())
            .ok_or_else(|| invalid("bad ShardIterator"))?;
        let limit = request["Limit"]
            .as_u64()
            .map_or(BATCH, |l| l as usize)
            .clamp(1, BATCH);
        let readable = self.readable(&self.shards[shard]);
        if position >= readable {
            let mut answer = RECORDS_OPEN.to_vec();
            answer.extend_from_slice(answer_tail(0, &iterator(shard, position)).as_bytes());
            return Ok(answer.into());
        }
        let batch = &self.shards[shard].batches[position / BATCH];
        let batch_start = position - position % BATCH;
        let end = (position + limit)
            .min(readable)
            .min(batch_start + batch.spans.len());
        if !self.live && position == batch_start && end == batch_start + batch.spans.len() {
            return Ok(batch.answer.clone());
        }
        let spans = &batch.spans[position - batch_start..end - batch_start];
        let mut answer = RECORDS_OPEN.to_vec();
        answer.extend_from_slice(&batch.answer[spans[0].start..spans[spans.len() - 1].end]);
        let millis_behind = self.millis_behind(&self.shards[shard], end, readable);
        answer.extend_from_slice(answer_tail(millis_behind, &iterator(shard, end)).as_bytes());
        Ok(answer.into())
    }

    /// How many of the shard's records can be read now.
    fn readable(&self, shard: &Shard) -> usize {
        if !self.live {
            return shard.len();
        }
        match self.epoch.get() {
            Some(epoch) => {
                let since = epoch.elapsed();
                shard.release.partition_point(|&at| at <= since)
            }
            None => 0,
        }
    }

    /// 0 for an answer that ends at the tip (`end` is all that is readable); otherwise a
    /// fixed backlog (replay) or how long ago its last record became readable (live).
    fn millis_behind(&self, shard: &Shard, end: usize, readable: usize) -> u128 {
        if end == readable {
            return 0;
        }
        match self.epoch.get() {
            Some(epoch) => epoch
                .elapsed()
                .saturating_sub(shard.release[end - 1])
                .as_millis()
                .max(1),
            None => BACKLOG_MILLIS,
        }
    }
}

/// Deals records round-robin over `shards` shards, in order, so each shard's part of the
/// stream is spread over the whole run (as the live run needs).
fn build(records: impl Iterator<Item = (RawRecord, Duration)>, shards: usize) -> Vec<Shard> {
    let mut builders: Vec<ShardBuilder> = (0..shards).map(ShardBuilder::new).collect();
    for (n, (record, release)) in records.enumerate() {
        builders[n % shards].push(record, release);
    }
    builders.into_iter().map(ShardBuilder::finish).collect()
}

/// `POST /` with `X-Amz-Target: Kinesis_20131202.<Operation>`.
async fn kinesis(
    State(endpoint): State<Arc<Endpoint>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let operation = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.strip_prefix("Kinesis_20131202."))
        .unwrap_or("");
    let request: Result<Value, ApiError> =
        serde_json::from_slice(&body).map_err(|e| invalid(format!("body is not JSON: {e}")));
    let answer = match operation {
        "SubscribeToShard" => request.and_then(|r| endpoint.subscribe(&r)),
        _ => request
            .and_then(|request| endpoint.call(operation, &request))
            .map(|bytes| ([(CONTENT_TYPE, JSON_1_1)], bytes).into_response()),
    };
    match answer {
        Ok(response) => response,
        Err(e) => (
            StatusCode::BAD_REQUEST,
            [(CONTENT_TYPE, JSON_1_1)],
            json!({"__type": e.kind, "message": e.message}).to_string(),
        )
            .into_response(),
    }
}

// ---------------------------------------------------------------------------------------
// The backend, the servers and the daemon.

/// An axum server on a free loopback port, stopped when dropped.
struct Server {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(app: Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Server { url, task }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What reached the backend: when each call came, and its Idempotency-Key.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<(Instant, String)>>>);

impl Calls {
    /// The backend: answers 200 to every call and notes it.
    fn router(&self) -> Router {
        let calls = self.clone();
        Router::new().fallback(move |headers: HeaderMap| {
            let calls = calls.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                calls.0.lock().unwrap().push((Instant::now(), key));
                StatusCode::OK
            }
        })
    }

    /// Asserts that each of `requests` reached the backend exactly once and nothing else
    /// did; returns when each arrived, by request id.
    fn check(&self, requests: &[String]) -> HashMap<String, Instant> {
        let by_key: HashMap<String, &String> = requests
            .iter()
            .map(|id| (idempotency_key("anonymize_user", id), id))
            .collect();
        let mut arrived: HashMap<String, Instant> = HashMap::new();
        let (mut repeated, mut unknown) = (0, 0);
        for (at, key) in self.0.lock().unwrap().iter() {
            match by_key.get(key) {
                Some(id) if arrived.insert((*id).clone(), *at).is_some() => repeated += 1,
                Some(_) => {}
                None => unknown += 1,
            }
        }
        let missing = requests.len() - arrived.len();
        assert!(
            missing == 0 && repeated == 0 && unknown == 0,
            "backend: {missing} requests missing, {repeated} sent again, {unknown} unknown, of {}",
            requests.len()
        );
        arrived
    }
}

/// What a daemon took to complete its work: wall time from its spawn, and what its process
/// used by then (from /proc).
struct Usage {
    wall: Duration,
    cpu: Duration,
    peak_rss_kib: u64,
}

/// The daemon binary in a temporary directory (config, 10 rules, state), stdout dropped,
/// its log kept to show when something fails.
struct Daemon {
    child: Child,
    spawned: Instant,
    status_url: String,
    metrics_url: String,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// `polling` goes in the `[stream]` section as it is (poll and idle intervals).
    fn start(kinesis: &str, backend: &str, polling: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        std::fs::create_dir(&rules).unwrap();
        common::write_rules(&rules, 10, common::Shape::Prefilter);
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = format!(
            r#"[stream]
name = "{STREAM}"
endpoint_url = "{kinesis}"
region = "us-east-1"
start = "trim-horizon"
{polling}

[state]
path = "state.redb"

[rules]
dir = "rules"

[actions.anonymize_user]
method = "POST"
url = "{backend}/v1/users/{{user_id}}/anonymize"
bearer_token_env = "BACKEND_TOKEN"
allow_insecure_http = true

[metrics]
listen = "{metrics}"
"#
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let spawned = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_gdpr-consumer"))
            .current_dir(dir.path())
            .args(["run", "--config", "config.toml"])
            .env("BACKEND_TOKEN", "bench-token")
            .env("AWS_ACCESS_KEY_ID", "AKIDBENCH")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT_URL_KINESIS")
            .env("GDPR_CONSUMER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon {
            child,
            spawned,
            status_url: format!("http://{metrics}/status"),
            metrics_url: format!("http://{metrics}/metrics"),
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Polls `/status` every 20 ms until `done` holds for it; fails if the daemon exits or
    /// `timeout` passes first.
    async fn wait_for(&mut self, timeout: Duration, what: &str, done: impl Fn(&Value) -> bool) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the daemon exited ({status}) before {what}:\n{}",
                    self.log()
                );
            }
            if let Ok(response) = client.get(&self.status_url).send().await {
                if response.json::<Value>().await.is_ok_and(|s| done(&s)) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every shard of `last` has been polled and found nothing more to read.
    async fn wait_until_polling(&mut self, last: &HashMap<String, String>) {
        self.wait_for(Duration::from_secs(60), "every shard polled", |s| {
            all_caught_up(s, last)
        })
        .await;
    }

    /// Records read, over all shards (`records_read_total`).
    async fn records_read(&self) -> u64 {
        let text = reqwest::get(&self.metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with("gdpr_consumer_records_read_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Waits until every shard of `last` is checkpointed at its last record, stops the
    /// daemon, and checks it read each of the stream's `records` once.
    ///
    /// Wall and CPU time count from the moment `/status` answers: the rules are compiled
    /// and tested by then, and no shard is read yet, so process start-up is left out.
    async fn complete(mut self, last: &HashMap<String, String>, records: usize) -> Usage {
        self.wait_for(Duration::from_secs(60), "the status endpoint", |_| true)
            .await;
        let started = self.usage();
        let timeout = Duration::from_secs(60) + Duration::from_millis(records as u64);
        self.wait_for(
            timeout,
            "every shard checkpointed at its last record",
            |s| all_checkpointed(s, last),
        )
        .await;
        let end = self.usage();
        let usage = Usage {
            wall: end.wall - started.wall,
            cpu: end.cpu - started.cpu,
            peak_rss_kib: end.peak_rss_kib,
        };
        let read = self.records_read().await;
        self.stop().await;
        assert_eq!(read, records as u64, "records read by the daemon");
        usage
    }

    fn usage(&self) -> Usage {
        let wall = self.spawned.elapsed();
        let pid = self.child.id();
        // CPU time of every thread, in nanoseconds (the scheduler's count).
        let cpu_nanos: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
            .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let peak_rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap();
        Usage {
            wall,
            cpu: Duration::from_nanos(cpu_nanos),
            peak_rss_kib,
        }
    }

    /// SIGTERM, then the clean exit (0) the daemon promises.
    async fn stop(mut self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            status.success(),
            "the daemon exited {status}:\n{}",
            self.log()
        );
    }
}

impl Drop for Daemon {
    /// A run that failed leaves no daemon behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every shard of `last` has its checkpoint at its last record.
fn all_checkpointed(status: &Value, last: &HashMap<String, String>) -> bool {
    shards_where(status, last, |id, shard| {
        shard["checkpoint"] == last[id].as_str()
    })
}

/// Every shard of `last` has answered a GetRecords call with nothing left to read.
fn all_caught_up(status: &Value, last: &HashMap<String, String>) -> bool {
    shards_where(status, last, |_, shard| shard["millis_behind_latest"] == 0)
}

fn shards_where(
    status: &Value,
    last: &HashMap<String, String>,
    holds: impl Fn(&str, &Value) -> bool,
) -> bool {
    let shards = status["shards"].as_array().map_or(&[][..], Vec::as_slice);
    let matching = shards
        .iter()
        .filter_map(|s| Some((s["shard_id"].as_str()?, s)))
        .filter(|(id, s)| last.contains_key(*id) && holds(id, s))
        .count();
    matching == last.len()
}

// ---------------------------------------------------------------------------------------
// The runs.

/// One replay run's figures.
struct Row {
    events: usize,
    records: usize,
    requests: usize,
    usage: Usage,
}

impl Row {
    fn print(&self, mode: Mode) {
        let wall = self.usage.wall.as_secs_f64();
        println!(
            "{:<7} {:>9} {:>8} {:>8} {:>8.2} {:>10.0} {:>10.0} {:>12.1} {:>12.1}",
            mode.name(),
            self.events,
            self.records,
            self.requests,
            wall,
            self.events as f64 / wall,
            self.records as f64 / wall,
            self.usage.cpu.as_secs_f64() * 1e6 / self.events as f64,
            self.usage.peak_rss_kib as f64 / 1024.0,
        );
    }
}

/// Replays `events` events over `shards` shards to a daemon, from its start until every
/// shard is checkpointed at its last record; `repeats` times, each with a fresh daemon and
/// state. The fastest run is the one reported.
async fn throughput(events: usize, shards: usize, repeats: usize, mode: Mode) -> Row {
    let stream = common::stream(SEED, events, 0);
    let (records, events, requests) = (stream.records.len(), stream.events, stream.requests);
    let endpoint = Arc::new(Endpoint::replay(stream.records, shards));
    let last = endpoint.last_sequence_numbers();
    let kinesis = Server::start(endpoint.router()).await;
    let mut best: Option<Usage> = None;
    for _ in 0..repeats {
        let calls = Calls::default();
        let backend = Server::start(calls.router()).await;
        let daemon = Daemon::start(&kinesis.url, &backend.url, mode.config(false));
        let usage = daemon.complete(&last, records).await;
        calls.check(&requests);
        if best.as_ref().is_none_or(|b| usage.wall < b.wall) {
            best = Some(usage);
        }
    }
    Row {
        events,
        records,
        requests: requests.len(),
        usage: best.expect("at least one run"),
    }
}

/// Releases events live at a steady rate once every shard is being polled, and measures
/// each deletion request from its record becoming readable to its backend call.
async fn latency(plan: &Plan, mode: Mode) {
    let rate = plan.live_events_per_second;
    let stream = common::stream(SEED + 1, (rate * plan.live_seconds) as usize, 0);
    let duration = Duration::from_secs_f64(stream.events as f64 / rate);
    let (release, readable_at) = schedule(&stream.records, duration);
    let records = stream.records.len();
    let endpoint = Arc::new(Endpoint::live(stream.records, release, plan.shards));
    let last = endpoint.last_sequence_numbers();
    let kinesis = Server::start(endpoint.clone().router()).await;
    let calls = Calls::default();
    let backend = Server::start(calls.router()).await;

    // No idle back-off: events are released once every shard is polled, and the figure is
    // the poll interval's.
    let mut daemon = Daemon::start(&kinesis.url, &backend.url, mode.config(true));
    daemon.wait_until_polling(&last).await;
    let epoch = Instant::now();
    endpoint.epoch.set(epoch).unwrap();
    daemon.complete(&last, records).await;
    let mut latencies: Vec<Duration> = calls
        .check(&stream.requests)
        .iter()
        .map(|(id, at)| at.duration_since(epoch + readable_at[id]))
        .collect();
    latencies.sort();
    println!(
        "latency, {}, readable -> backend ({rate} events/s released over {} shards for {:.1} s{}): \
         {} requests, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        mode.name(),
        plan.shards,
        duration.as_secs_f64(),
        match mode {
            Mode::Polling => ", poll 200 ms",
            Mode::FanOut => ", events pushed as records become readable",
        },
        latencies.len(),
        percentile_ms(&latencies, 0.5),
        percentile_ms(&latencies, 0.99),
        percentile_ms(&latencies, 1.0),
    );
}

/// Nearest rank, in milliseconds.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank].as_secs_f64() * 1e3
}

/// When each record becomes readable: spread evenly over `duration`, in stream order; and,
/// by request id, when the record holding each deletion request does. The ids are found in
/// the record's bytes, gunzipped if need be (a KPL aggregate keeps its events' bytes as
/// they are).
fn schedule(
    records: &[RawRecord],
    duration: Duration,
) -> (Vec<Duration>, HashMap<String, Duration>) {
    let finder = memchr::memmem::Finder::new(br#""request_id":""#);
    let mut release = Vec::with_capacity(records.len());
    let mut readable_at = HashMap::new();
    for (n, raw) in records.iter().enumerate() {
        let at = duration.mul_f64(n as f64 / records.len() as f64);
        release.push(at);
        let bytes = gunzipped(&raw.data);
        for found in finder.find_iter(&bytes) {
            let id = &bytes[found + finder.needle().len()..];
            let id = &id[..memchr::memchr(b'"', id).expect("a JSON string ends")];
            readable_at.insert(String::from_utf8(id.to_vec()).unwrap(), at);
        }
    }
    (release, readable_at)
}

fn gunzipped(data: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::io::Read;
    if !data.starts_with(&[0x1f, 0x8b]) {
        return data.into();
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out.into()
}

/// The cost of following shards that have nothing new: a daemon polling every shard of a
/// stream where nothing is readable. Prints, for polling without back-off and with the
/// default back-off, the daemon's CPU time per idle shard-second and per GetRecords call
/// (the SDK's work, the HTTP exchange and the daemon's handling of an empty answer),
/// measured once the back-off has settled.
async fn idle_polling(plan: &Plan) {
    let fan_out = (
        "fan-out, a heartbeat event a second per shard",
        "read = \"fan-out\"",
    );
    let runs: [(&str, &str); 3] = match plan.shards {
        // Smoke pass: short intervals, to run in a few seconds.
        4 => [
            (
                "poll 200 ms, no back-off",
                "poll_interval_ms = 200\nidle_poll_interval_ms = 200",
            ),
            (
                "poll 200 ms, back-off to 400 ms",
                "poll_interval_ms = 200\nidle_poll_interval_ms = 400",
            ),
            fan_out,
        ],
        _ => [
            ("poll 1000 ms, no back-off", "idle_poll_interval_ms = 1000"),
            ("defaults: poll 1000 ms, back-off to 5000 ms", ""),
            fan_out,
        ],
    };
    for (name, polling) in runs {
        let stream = common::stream(SEED + 2, plan.shards * 10, 0);
        // Live, and never opened: nothing is readable, every shard is at its tip.
        let release = vec![Duration::ZERO; stream.records.len()];
        let endpoint = Arc::new(Endpoint::live(stream.records, release, plan.shards));
        let last = endpoint.last_sequence_numbers();
        let kinesis = Server::start(endpoint.clone().router()).await;
        let calls = Calls::default();
        let backend = Server::start(calls.router()).await;
        let mut daemon = Daemon::start(&kinesis.url, &backend.url, polling);
        daemon.wait_until_polling(&last).await;
        // Each shard's pause doubles after each empty answer: 1 + 2 + 4 s to reach 5 s.
        tokio::time::sleep(plan.idle_settle).await;
        // A GetRecords call, or a subscription's event.
        let calls = || {
            endpoint.get_records_calls.load(Ordering::Relaxed)
                + endpoint.subscription_events.load(Ordering::Relaxed)
        };
        let (before, polls_before) = (daemon.usage(), calls());
        tokio::time::sleep(plan.idle_measure).await;
        let (after, polls) = (daemon.usage(), calls());
        daemon.stop().await;
        let polls = polls - polls_before;
        assert!(polls > 0, "the daemon read its shards");
        let seconds = (after.wall - before.wall).as_secs_f64();
        let cpu_micros = (after.cpu - before.cpu).as_secs_f64() * 1e6;
        println!(
            "idle, {} shards, {name}: {polls} GetRecords calls or events in {seconds:.1} s, \
             {:.0} µs of CPU per idle shard-second, {:.0} µs per call or event",
            plan.shards,
            cpu_micros / (plan.shards as f64 * seconds),
            cpu_micros / polls as f64,
        );
    }
}
