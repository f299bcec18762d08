//! The in-process Kinesis replay endpoint the end-to-end and fleet benchmarks read
//! (Kinesis JSON 1.1 over pre-built GetRecords answers, and SubscribeToShard event
//! streams), the loopback servers and the recording backend they share.

#![allow(dead_code)] // each benchmark uses its own part

use std::collections::HashMap;
use std::ops::Range;
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

pub const STREAM: &str = "bench-events";
/// Records in one pre-built GetRecords answer: as many as the daemon asks for by default
/// (`[stream] records_per_call`), so answers are served as built.
pub const BATCH: usize = 2_500;
/// Shard `s` numbers its records from `s * SEQUENCE_STRIDE`: increasing in a shard, unique
/// in the stream.
pub const SEQUENCE_STRIDE: u64 = 1_000_000_000_000;
/// Pause between two events of an idle subscription (Kinesis sends one every few seconds;
/// kinesis-mock every second).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// MillisBehindLatest of a replayed answer that leaves records behind it.
pub const BACKLOG_MILLIS: u128 = 60_000;
pub const JSON_1_1: &str = "application/x-amz-json-1.1";
pub const RECORDS_OPEN: &[u8] = b"{\"Records\":[";

// ---------------------------------------------------------------------------------------
// The replay endpoint: Kinesis JSON 1.1 over pre-built answers.

/// One shard's records, as the JSON of GetRecords answers.
pub struct Shard {
    batches: Vec<Batch>,
    /// When each record becomes readable, counted from the stream's epoch (live mode).
    release: Vec<Duration>,
}

impl Shard {
    pub fn len(&self) -> usize {
        self.release.len()
    }
}

/// Up to [`BATCH`] consecutive records of a shard.
pub struct Batch {
    /// The whole answer to a reader at the batch's first record.
    answer: Bytes,
    /// Where each record's JSON object lies in `answer` (a shorter answer is cut from it).
    spans: Vec<Range<usize>>,
}

/// Builds a shard's answers record by record, so each generated payload can be dropped as
/// soon as it is encoded (1M events are about 1.3 GB).
pub struct ShardBuilder {
    shard: usize,
    batches: Vec<Batch>,
    answer: Vec<u8>,
    spans: Vec<Range<usize>>,
    release: Vec<Duration>,
}

impl ShardBuilder {
    pub fn new(shard: usize) -> Self {
        ShardBuilder {
            shard,
            batches: Vec::new(),
            answer: RECORDS_OPEN.to_vec(),
            spans: Vec::new(),
            release: Vec::new(),
        }
    }

    pub fn push(&mut self, record: RawRecord, release: Duration) {
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

    pub fn close(&mut self, millis_behind: u128) {
        let next = iterator(self.shard, self.release.len());
        self.answer
            .extend_from_slice(answer_tail(millis_behind, &next).as_bytes());
        self.batches.push(Batch {
            answer: std::mem::replace(&mut self.answer, RECORDS_OPEN.to_vec()).into(),
            spans: std::mem::take(&mut self.spans),
        });
    }

    pub fn finish(mut self) -> Shard {
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
pub fn write_record(out: &mut Vec<u8>, sequence_number: &str, record: &RawRecord) {
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

pub fn event_tail(millis_behind: u128, continuation: &str) -> String {
    format!(
        r#"],"ContinuationSequenceNumber":"{continuation}","MillisBehindLatest":{millis_behind}}}"#
    )
}

/// One message of an event stream, framed as Kinesis frames it.
pub fn event_message(event_type: &'static str, payload: Vec<u8>) -> Bytes {
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
pub struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

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

pub fn answer_tail(millis_behind: u128, next_iterator: &str) -> String {
    format!(r#"],"MillisBehindLatest":{millis_behind},"NextShardIterator":"{next_iterator}"}}"#)
}

pub fn shard_id(shard: usize) -> String {
    format!("shardId-{shard:012}")
}

/// Record `position` of `shard`. Numbers start at 1 in a shard, so that
/// [`continuation`] can name the point before the first record.
pub fn sequence_number(shard: usize, position: usize) -> String {
    format!(
        "{:056}",
        shard as u64 * SEQUENCE_STRIDE + position as u64 + 1
    )
}

/// A SubscribeToShard continuation: after it, `next` is the record to read.
pub fn continuation(shard: usize, next: usize) -> String {
    format!("{:056}", shard as u64 * SEQUENCE_STRIDE + next as u64)
}

/// An iterator names the shard and the position of the next record to read.
pub fn iterator(shard: usize, position: usize) -> String {
    format!("{shard}/{position}")
}

/// A Kinesis error answer: its `__type` and message.
pub struct ApiError {
    kind: &'static str,
    message: String,
}

pub fn invalid(message: impl Into<String>) -> ApiError {
    ApiError {
        kind: "InvalidArgumentException",
        message: message.into(),
    }
}

pub fn field<'a>(request: &'a Value, name: &str) -> Result<&'a str, ApiError> {
    request[name]
        .as_str()
        .ok_or_else(|| invalid(format!("{name} is missing")))
}

/// The stream the endpoint serves: every shard open, its records all there (replay) or
/// readable from their release time on (live).
pub struct Endpoint {
    shards: Vec<Shard>,
    live: bool,
    /// Live mode only: the instant releases count from; nothing is readable before it.
    pub epoch: OnceLock<Instant>,
    /// GetRecords calls answered.
    pub get_records_calls: AtomicU64,
    /// SubscribeToShard calls answered, and the events sent on them.
    pub subscriptions: AtomicU64,
    pub subscription_events: AtomicU64,
}

impl Endpoint {
    /// Every record readable at once.
    pub fn replay(records: Vec<RawRecord>, shards: usize) -> Self {
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
    pub fn live(records: Vec<RawRecord>, release: Vec<Duration>, shards: usize) -> Self {
        Endpoint {
            shards: build(records.into_iter().zip(release), shards),
            live: true,
            epoch: OnceLock::new(),
            get_records_calls: AtomicU64::new(0),
            subscriptions: AtomicU64::new(0),
            subscription_events: AtomicU64::new(0),
        }
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/", axum::routing::post(kinesis))
            .with_state(self)
    }

    /// Each shard's id and the sequence number of its last record.
    pub fn last_sequence_numbers(&self) -> HashMap<String, String> {
        (0..self.shards.len())
            .map(|s| {
                assert!(self.shards[s].len() > 0, "shard {s} is empty");
                (shard_id(s), sequence_number(s, self.shards[s].len() - 1))
            })
            .collect()
    }

    pub fn call(&self, operation: &str, request: &Value) -> Result<Bytes, ApiError> {
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
    pub fn list_shards(&self, request: &Value) -> Result<Bytes, ApiError> {
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

    pub fn describe_stream_summary(&self) -> Bytes {
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

    pub fn get_shard_iterator(&self, request: &Value) -> Result<Bytes, ApiError> {
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
    pub fn position_of(&self, shard: usize, request: &Value) -> Result<usize, ApiError> {
        let after = self.after(shard, field(request, "StartingSequenceNumber")?)?;
        after
            .checked_sub(1)
            .filter(|&p| p < self.shards[shard].len())
            .ok_or_else(|| invalid("StartingSequenceNumber is not a record of the shard"))
    }

    /// The position of the record after `number` (a record's, or a continuation).
    pub fn after(&self, shard: usize, number: &str) -> Result<usize, ApiError> {
        let number: u64 = number
            .parse()
            .map_err(|_| invalid("the sequence number is not a number"))?;
        let after = (number % SEQUENCE_STRIDE) as usize;
        if number / SEQUENCE_STRIDE != shard as u64 || after > self.shards[shard].len() {
            return Err(invalid("the sequence number is not in the shard"));
        }
        Ok(after)
    }

    pub fn shard_of(&self, request: &Value) -> Result<usize, ApiError> {
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
    pub fn describe_stream_consumer(&self) -> Bytes {
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
    pub fn subscribe(self: Arc<Self>, request: &Value) -> Result<Response, ApiError> {
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
    pub fn get_records(&self, request: &Value) -> Result<Bytes, ApiError> {
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
    pub fn readable(&self, shard: &Shard) -> usize {
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
    pub fn millis_behind(&self, shard: &Shard, end: usize, readable: usize) -> u128 {
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
pub fn build(records: impl Iterator<Item = (RawRecord, Duration)>, shards: usize) -> Vec<Shard> {
    let mut builders: Vec<ShardBuilder> = (0..shards).map(ShardBuilder::new).collect();
    for (n, (record, release)) in records.enumerate() {
        builders[n % shards].push(record, release);
    }
    builders.into_iter().map(ShardBuilder::finish).collect()
}

/// `POST /` with `X-Amz-Target: Kinesis_20131202.<Operation>`.
pub async fn kinesis(
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
pub struct Server {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start(app: Router) -> Self {
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
pub struct Calls(pub Arc<Mutex<Vec<(Instant, String)>>>);

impl Calls {
    /// The backend: answers 200 to every call and notes it.
    pub fn router(&self) -> Router {
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
    pub fn check(&self, requests: &[String]) -> HashMap<String, Instant> {
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
