//! Kinesis source: shard discovery, lineage and per-shard readers (polling GetRecords).
//!
//! A child shard is read only after all its parents are read to their end, so records of one
//! partition key keep their order across a split or merge.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::types::ShardIteratorType;
use aws_sdk_kinesis::Client;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::shutdown::Shutdown;

/// Kinesis allows 5 GetRecords calls per second per shard.
const MIN_CALL_INTERVAL: Duration = Duration::from_millis(200);
pub(crate) const MAX_FAULT_BACKOFF: Duration = Duration::from_secs(10);

/// Errors of the source stage, naming the stream or shard.
/// Where a shard with no checkpoint starts reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPosition {
    TrimHorizon,
    Latest,
    /// Milliseconds since the Unix epoch (an RFC 3339 time in the config or `--from`).
    AtTimestamp(i64),
}

impl std::str::FromStr for StartPosition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "trim-horizon" | "trim_horizon" | "TRIM_HORIZON" => Ok(Self::TrimHorizon),
            "latest" | "LATEST" => Ok(Self::Latest),
            other => {
                let time = aws_smithy_types::DateTime::from_str(
                    other,
                    aws_smithy_types::date_time::Format::DateTime,
                )
                .map_err(|_| {
                    format!(
                        "invalid start position {other:?}: expected trim-horizon, latest or an RFC 3339 time"
                    )
                })?;
                time.to_millis()
                    .map(Self::AtTimestamp)
                    .map_err(|e| format!("invalid start time {other:?}: {e}"))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub name: String,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub start: StartPosition,
    pub poll_interval: Duration,
    /// Longest pause on an idle shard (the pause doubles from `poll_interval` up to it).
    pub idle_poll_interval: Duration,
    pub shard_sync_interval: Duration,
    pub retention_margin: Duration,
    pub list_shards_page_size: Option<i32>,
    pub records_per_call: i32,
    pub batches_in_flight: usize,
    /// Time limit of one Kinesis call attempt (three attempts at most per call).
    pub call_timeout: Duration,
    pub read: ReadMode,
    /// The enhanced fan-out consumer (fan-out mode): registered when missing, never removed
    /// by the daemon.
    pub consumer_name: String,
    /// A subscription is renewed after this long (Kinesis ends one after five minutes).
    pub subscription_renew: Duration,
}

/// How shards are read (`[stream] read`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// GetRecords, sharing each shard's 5 calls and 2 MB a second with every consumer.
    Polling,
    /// SubscribeToShard: a registered consumer's own 2 MB a second per shard, pushed.
    FanOut,
}

impl ReadMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadMode::Polling => "polling",
            ReadMode::FanOut => "fan-out",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("stream {stream}: cannot list shards: {message}")]
    ListShards { stream: String, message: String },
    #[error("stream {stream}: cannot describe the stream: {message}")]
    Describe { stream: String, message: String },
    #[error("stream {stream}, shard {shard_id}: cannot get a shard iterator: {message}")]
    Iterator {
        stream: String,
        shard_id: String,
        message: String,
    },
    #[error("stream {stream}, shard {shard_id}: GetRecords failed: {message}")]
    GetRecords {
        stream: String,
        shard_id: String,
        message: String,
    },
    #[error("stream {stream}, consumer {consumer}: {message}")]
    Consumer {
        stream: String,
        consumer: String,
        message: String,
    },
    #[error("stream {stream}, shard {shard_id}: SubscribeToShard failed: {message}")]
    Subscribe {
        stream: String,
        shard_id: String,
        message: String,
    },
}

/// A record as read from a shard, before decoding.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// Shared by the record's sub-records and the shard's checkpoint: made once.
    pub sequence_number: Arc<str>,
    pub partition_key: String,
    pub arrival_time_millis: i64,
    pub data: Vec<u8>,
}

/// A shard and its lineage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    pub parents: Vec<String>,
    /// A closed shard takes no new records; it ends after its last one.
    pub closed: bool,
    /// Its hash key range (decimal), for a fleet's lease item.
    pub hash_range: Option<(String, String)>,
}

/// Where a shard reader starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// Right after a record already handled (the checkpoint).
    After(String),
    /// At a KPL aggregate handled part way: its sub-records up to the second field are
    /// settled and must be skipped.
    Within(String, u64),
    Start(StartPosition),
}

/// How far a shard has been handled: every record up to `sequence_number` is settled.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub sequence_number: Option<String>,
    /// Inside a KPL aggregate: the last sub-record settled of `sequence_number` (the rest of
    /// the aggregate is still to do). `None`: the whole record is settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_sequence_number: Option<u64>,
    /// The shard is closed and read to its end: its children may start.
    pub shard_end: bool,
}

impl Checkpoint {
    pub fn at(sequence_number: String) -> Self {
        Self {
            sequence_number: Some(sequence_number),
            sub_sequence_number: None,
            shard_end: false,
        }
    }

    /// Part way through an aggregate: sub-records up to `sub_sequence_number` are settled.
    pub fn within(sequence_number: String, sub_sequence_number: u64) -> Self {
        Self {
            sub_sequence_number: Some(sub_sequence_number),
            ..Self::at(sequence_number)
        }
    }

    pub fn end(sequence_number: Option<String>) -> Self {
        Self {
            sequence_number,
            sub_sequence_number: None,
            shard_end: true,
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::After(seq) => write!(f, "after {seq}"),
            Position::Within(seq, sub) => write!(f, "at {seq}, after sub-record {sub}"),
            Position::Start(StartPosition::TrimHorizon) => f.write_str("trim-horizon"),
            Position::Start(StartPosition::Latest) => f.write_str("latest"),
            Position::Start(StartPosition::AtTimestamp(ms)) => {
                write!(f, "at {}", crate::clock::rfc3339(*ms))
            }
        }
    }
}

/// What one GetRecords call brought.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<RawRecord>,
    pub millis_behind_latest: Option<i64>,
    /// The shard is closed and every record has been read.
    pub shard_end: bool,
    /// One of the stream's `batches_in_flight`, given back when the batch is dropped
    /// (handled).
    pub in_flight: Option<OwnedSemaphorePermit>,
    /// How it was read: a GetRecords answer, or a subscription's event.
    pub read_mode: Option<ReadMode>,
    /// Subscriptions started since the previous batch, by reason (fan-out): `initial`,
    /// `renewal`, `ended`, `error`.
    pub subscribed: Vec<&'static str>,
}

/// The Kinesis stream the daemon reads.
pub struct KinesisSource {
    pub(crate) client: Client,
    pub(crate) stream: String,
    page_size: Option<i32>,
    pub(crate) records_per_call: i32,
    /// Longest pause of an idle shard's reader (`[stream] idle_poll_interval_ms`).
    idle_poll_interval: Duration,
    /// Bounds the answers held at once over all shards (memory stays flat with the count).
    pub(crate) in_flight: Arc<Semaphore>,
    /// Calls failing now, by what failed (`ListShards`, or a shard id): what `/readyz`
    /// reports while the reader retries them.
    faults: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    /// Told of each call that failed and is retried (the daemon's telemetry logs and
    /// counts it).
    on_retry: Option<RetryHook>,
    pub(crate) read: ReadMode,
    pub(crate) consumer_name: String,
    pub(crate) subscription_renew: Duration,
    /// The registered consumer's ARN (fan-out), once [`KinesisSource::ensure_consumer`] ran.
    /// Replaced when the consumer is registered again (removed behind the daemon's back).
    pub(crate) consumer_arn: std::sync::RwLock<Option<String>>,
    /// Shards the last ListShards showed closed: a fan-out reader finishes such a shard
    /// by polling where the subscription does not end it (see `fanout`).
    closed: std::sync::Mutex<HashSet<String>>,
}

/// Called with what failed (`ListShards`, or a shard id) and why.
pub type RetryHook = Box<dyn Fn(&str, &str) + Send + Sync>;

impl KinesisSource {
    /// Builds a client from the standard AWS chain, with the config's region and endpoint on
    /// top. With an endpoint and no credentials, signs with placeholders (local emulators):
    /// the endpoint may come from `[stream] endpoint_url` or, as the AWS chain has it, from
    /// `AWS_ENDPOINT_URL_KINESIS` / `AWS_ENDPOINT_URL` (or a profile's `endpoint_url`), and
    /// all of them are treated alike.
    pub async fn connect(settings: &StreamSettings) -> Self {
        let chain = crate::aws::chain(
            settings.region.as_deref(),
            settings.endpoint_url.as_deref(),
            settings.call_timeout,
            "AWS_ENDPOINT_URL_KINESIS",
        )
        .await;
        let mut builder = aws_sdk_kinesis::config::Builder::from(&chain.sdk);
        if let Some(region) = chain.region {
            builder = builder.region(region);
        }
        if let Some(credentials) = chain.credentials {
            builder = builder.credentials_provider(credentials);
        }
        KinesisSource {
            client: Client::from_conf(builder.build()),
            stream: settings.name.clone(),
            page_size: settings.list_shards_page_size,
            records_per_call: settings.records_per_call,
            idle_poll_interval: settings.idle_poll_interval.max(settings.poll_interval),
            in_flight: Arc::new(Semaphore::new(settings.batches_in_flight)),
            faults: Default::default(),
            on_retry: None,
            read: settings.read,
            consumer_name: settings.consumer_name.clone(),
            subscription_renew: settings.subscription_renew,
            consumer_arn: Default::default(),
            closed: Default::default(),
        }
    }

    /// How shards are read.
    pub fn read_mode(&self) -> ReadMode {
        self.read
    }

    /// Whether the last shard list showed `shard_id` closed.
    pub(crate) fn is_closed(&self, shard_id: &str) -> bool {
        self.closed.lock().unwrap().contains(shard_id)
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// What is failing now (retried meanwhile): the shard list, or a shard's reads.
    pub fn faults(&self) -> Vec<(String, String)> {
        let faults = self.faults.lock().unwrap();
        faults.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Reports each call that failed and is retried to `hook`.
    pub fn observed(self, hook: RetryHook) -> Self {
        Self {
            on_retry: Some(hook),
            ..self
        }
    }

    pub(crate) fn set_fault(&self, what: &str, fault: Option<String>) {
        let mut faults = self.faults.lock().unwrap();
        match fault {
            Some(message) => {
                if let Some(hook) = &self.on_retry {
                    hook(what, &message);
                }
                faults.insert(what.to_owned(), message);
            }
            None => {
                faults.remove(what);
            }
        }
    }

    /// Lists every shard the stream still has, open or closed, following NextToken.
    pub async fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        let err = |message: String| SourceError::ListShards {
            stream: self.stream.clone(),
            message,
        };
        let mut shards = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            // After the first page, AWS wants the token alone, without the stream name.
            let request = match &next_token {
                Some(token) => self.client.list_shards().next_token(token),
                None => self.client.list_shards().stream_name(&self.stream),
            }
            .set_max_results(self.page_size);
            let output = match request.send().await {
                Ok(output) => output,
                Err(e) => {
                    let message = describe(&e);
                    self.set_fault("ListShards", Some(message.clone()));
                    return Err(err(message));
                }
            };
            for shard in output.shards() {
                shards.push(ShardInfo {
                    id: shard.shard_id().to_owned(),
                    parents: shard
                        .parent_shard_id()
                        .into_iter()
                        .chain(shard.adjacent_parent_shard_id())
                        .map(str::to_owned)
                        .collect(),
                    closed: shard
                        .sequence_number_range()
                        .and_then(|r| r.ending_sequence_number())
                        .is_some(),
                    hash_range: shard.hash_key_range().map(|r| {
                        (
                            r.starting_hash_key().to_owned(),
                            r.ending_hash_key().to_owned(),
                        )
                    }),
                });
            }
            match output.next_token() {
                Some(token) if !token.is_empty() => next_token = Some(token.to_owned()),
                _ => {
                    self.set_fault("ListShards", None);
                    *self.closed.lock().unwrap() = shards
                        .iter()
                        .filter(|s| s.closed)
                        .map(|s| s.id.clone())
                        .collect();
                    return Ok(shards);
                }
            }
        }
    }

    /// DescribeStreamSummary.
    pub(crate) async fn summary(
        &self,
    ) -> Result<
        aws_sdk_kinesis::operation::describe_stream_summary::DescribeStreamSummaryOutput,
        SourceError,
    > {
        self.client
            .describe_stream_summary()
            .stream_name(&self.stream)
            .send()
            .await
            .map_err(|e| SourceError::Describe {
                stream: self.stream.clone(),
                message: describe(&e),
            })
    }

    /// How long the stream keeps records.
    pub async fn retention(&self) -> Result<Duration, SourceError> {
        let hours = self
            .summary()
            .await?
            .stream_description_summary()
            .map_or(24, |s| s.retention_period_hours());
        Ok(Duration::from_secs(hours.max(1) as u64 * 3600))
    }

    async fn iterator(&self, shard_id: &str, position: &Position) -> Result<String, SourceError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(shard_id);
        let request = match position {
            Position::After(seq) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
            Position::Within(seq, _) => request
                .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(seq),
            Position::Start(StartPosition::TrimHorizon) => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            Position::Start(StartPosition::Latest) => {
                request.shard_iterator_type(ShardIteratorType::Latest)
            }
            Position::Start(StartPosition::AtTimestamp(millis)) => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(aws_smithy_types::DateTime::from_millis(*millis)),
        };
        let output = request.send().await.map_err(|e| SourceError::Iterator {
            stream: self.stream.clone(),
            shard_id: shard_id.to_owned(),
            message: describe(&e),
        })?;
        output
            .shard_iterator()
            .map(str::to_owned)
            .ok_or_else(|| SourceError::Iterator {
                stream: self.stream.clone(),
                shard_id: shard_id.to_owned(),
                message: "no iterator returned".into(),
            })
    }
}

/// A record as the SDK gives it (GetRecords or an event), owned: payloads (up to 10 MiB
/// each) move on without a copy.
pub(crate) fn raw_record(r: aws_sdk_kinesis::types::Record) -> RawRecord {
    RawRecord {
        // Kinesis sends seconds with a fraction, parsed as a float: rounded to the
        // nearest millisecond (truncating would turn .616 into .615 now and then).
        arrival_time_millis: r.approximate_arrival_timestamp.map_or(0, |t| {
            t.secs() * 1000 + (i64::from(t.subsec_nanos()) + 500_000) / 1_000_000
        }),
        sequence_number: r.sequence_number.into(),
        partition_key: r.partition_key.unwrap_or_default(),
        data: r.data.into_inner(),
    }
}

/// Half to all of `delay`, so shards throttled together do not retry together.
pub(crate) fn jitter(delay: Duration) -> Duration {
    use rand::Rng;
    delay.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

/// Renders an SDK error with its service code, without request details.
pub(crate) fn describe<E, R>(e: &aws_sdk_kinesis::error::SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match e.as_service_error() {
        Some(service) => format!(
            "{}: {}",
            service.code().unwrap_or("unknown error"),
            service.message().unwrap_or("")
        ),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}

/// How a failed GetRecords call should be handled.
enum Fault {
    /// The iterator is too old: get a new one from the last position.
    ExpiredIterator,
    /// Throttling or a passing fault: wait and try again.
    Transient,
    /// Retrying cannot help (stream deleted, access denied).
    Fatal,
}

fn classify<R>(
    e: &aws_sdk_kinesis::error::SdkError<
        aws_sdk_kinesis::operation::get_records::GetRecordsError,
        R,
    >,
) -> Fault {
    match e.as_service_error().and_then(|s| s.code()) {
        Some("ExpiredIteratorException") => Fault::ExpiredIterator,
        Some(
            "ResourceNotFoundException" | "AccessDeniedException" | "InvalidArgumentException",
        ) => Fault::Fatal,
        _ => Fault::Transient,
    }
}

/// The pause after an answer: none while a shard has records or a backlog; on an idle
/// shard, `poll` after its first empty answer, then doubling up to `idle` with each further
/// one, so a shard nobody writes to costs a call every `idle` (each call's CPU is mostly
/// the SDK's, the same whatever it carries).
fn idle_pause(
    previous: Option<Duration>,
    caught_up: bool,
    poll: Duration,
    idle: Duration,
) -> Option<Duration> {
    caught_up.then(|| match previous {
        None => poll,
        Some(pause) => (pause * 2).min(idle).max(poll),
    })
}

/// Reads one shard batch by batch, keeping its place so an expired iterator or a passing
/// fault never skips or repeats a record.
pub struct ShardReader {
    /// In fan-out mode, the subscription; `None` in polling mode, or once a closed shard's
    /// tail is polled (see `fanout`).
    fan_out: Option<crate::fanout::FanOutReader>,
    source: Arc<KinesisSource>,
    shard_id: String,
    position: Position,
    iterator: Option<String>,
    poll_interval: Duration,
    last_call: Option<Instant>,
    /// Pause before the next call: `None` while the shard has records or a backlog (read
    /// again at once), else the idle back-off.
    idle_pause: Option<Duration>,
}

impl ShardReader {
    pub fn new(
        source: Arc<KinesisSource>,
        shard_id: String,
        position: Position,
        poll_interval: Duration,
    ) -> Self {
        let fan_out = (source.read == ReadMode::FanOut).then(|| {
            crate::fanout::FanOutReader::new(source.clone(), shard_id.clone(), position.clone())
        });
        Self {
            fan_out,
            source,
            shard_id,
            position,
            iterator: None,
            poll_interval,
            last_call: None,
            idle_pause: None,
        }
    }

    /// The next batch, or `Ok(None)` when shutdown came first. Passing faults are retried
    /// with backoff; only faults that retrying cannot mend are returned.
    pub async fn next(&mut self, shutdown: &Shutdown) -> Result<Option<Batch>, SourceError> {
        if let Some(fan_out) = &mut self.fan_out {
            match fan_out.next(shutdown).await? {
                crate::fanout::Step::Batch(batch) => return Ok(Some(batch)),
                crate::fanout::Step::Stopped => return Ok(None),
                crate::fanout::Step::PollTail(position) => {
                    tracing::info!(shard_id = %self.shard_id, %position, "shard closed and its subscription idle: reading its last records by polling");
                    self.position = position;
                    self.iterator = None;
                    self.fan_out = None;
                }
            }
        }
        self.poll(shutdown).await
    }

    /// The next GetRecords answer.
    async fn poll(&mut self, shutdown: &Shutdown) -> Result<Option<Batch>, SourceError> {
        let mut fault_backoff = Duration::from_millis(100);
        loop {
            let pause = self.idle_pause.unwrap_or(MIN_CALL_INTERVAL);
            if let Some(last) = self.last_call {
                let wait = pause.saturating_sub(last.elapsed());
                if shutdown.sleep(wait).await.is_err() {
                    return Ok(None);
                }
            }
            if shutdown.is_triggered() {
                return Ok(None);
            }
            let iterator = match &self.iterator {
                Some(it) => it.clone(),
                None => match self.source.iterator(&self.shard_id, &self.position).await {
                    Ok(it) => it,
                    Err(e) => {
                        self.source.set_fault(&self.shard_id, Some(e.to_string()));
                        if shutdown.sleep(jitter(fault_backoff)).await.is_err() {
                            return Ok(None);
                        }
                        fault_backoff = (fault_backoff * 2).min(MAX_FAULT_BACKOFF);
                        continue;
                    }
                },
            };
            let permit = tokio::select! {
                permit = self.source.in_flight.clone().acquire_owned() => permit.expect("never closed"),
                _ = shutdown.triggered() => return Ok(None),
            };
            self.last_call = Some(Instant::now());
            let result = self
                .source
                .client
                .get_records()
                .shard_iterator(&iterator)
                .limit(self.source.records_per_call)
                .send()
                .await;
            let output = match result {
                Ok(output) => output,
                Err(e) => {
                    let message = describe(&e);
                    match classify(&e) {
                        Fault::ExpiredIterator => {
                            tracing::info!(shard_id = %self.shard_id, "shard iterator expired; resuming from the last record read");
                            self.iterator = None;
                        }
                        Fault::Transient => {
                            self.source
                                .set_fault(&self.shard_id, Some(format!("GetRecords: {message}")));
                            if shutdown.sleep(jitter(fault_backoff)).await.is_err() {
                                return Ok(None);
                            }
                            fault_backoff = (fault_backoff * 2).min(MAX_FAULT_BACKOFF);
                        }
                        Fault::Fatal => {
                            return Err(SourceError::GetRecords {
                                stream: self.source.stream.clone(),
                                shard_id: self.shard_id.clone(),
                                message,
                            })
                        }
                    }
                    continue;
                }
            };
            if fault_backoff > Duration::from_millis(100) {
                self.source.set_fault(&self.shard_id, None);
            }
            // Owned: payloads (up to 10 MiB each) move on without a copy.
            let records: Vec<RawRecord> = output.records.into_iter().map(raw_record).collect();
            if let Some(last) = records.last() {
                self.position = Position::After(last.sequence_number.to_string());
            }
            self.iterator = output.next_shard_iterator;
            // A shard with a backlog is read again at once (within 5 calls a second), even
            // after an empty answer.
            let caught_up = records.is_empty() && output.millis_behind_latest.unwrap_or(0) == 0;
            self.idle_pause = idle_pause(
                self.idle_pause,
                caught_up,
                self.poll_interval,
                self.source.idle_poll_interval,
            );
            return Ok(Some(Batch {
                records,
                millis_behind_latest: output.millis_behind_latest,
                shard_end: self.iterator.is_none(),
                in_flight: Some(permit),
                read_mode: Some(ReadMode::Polling),
                subscribed: Vec::new(),
            }));
        }
    }
}

/// The shards that may start now, with where each starts.
///
/// A shard is ready when it is not finished, not already started, and every parent the
/// stream still lists is finished. `checkpoint` gives a shard's stored progress. A shard
/// without a checkpoint starts at `start` if it was listed when the run began
/// (`at_start`); one that appeared since, or continues a lineage, starts at trim-horizon:
/// every record in it is new.
pub fn ready_shards(
    shards: &[ShardInfo],
    started: &HashSet<String>,
    at_start: &HashSet<String>,
    mut checkpoint: impl FnMut(&str) -> Option<Checkpoint>,
    start: &StartPosition,
) -> Vec<(ShardInfo, Position)> {
    let listed: HashSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
    let mut ready = Vec::new();
    for shard in shards {
        if started.contains(&shard.id) {
            continue;
        }
        let own = checkpoint(&shard.id);
        if own.as_ref().is_some_and(|c| c.shard_end) {
            continue;
        }
        // A parent the stream no longer lists has aged out of retention: nothing to wait for.
        let parents: Vec<_> = shard
            .parents
            .iter()
            .filter(|p| listed.contains(p.as_str()))
            .map(|p| checkpoint(p))
            .collect();
        if parents
            .iter()
            .any(|c| !c.as_ref().is_some_and(|c| c.shard_end))
        {
            continue;
        }
        let position = match own.and_then(|c| c.sequence_number.map(|s| (s, c.sub_sequence_number)))
        {
            Some((seq, Some(sub))) => Position::Within(seq, sub),
            Some((seq, None)) => Position::After(seq),
            None if parents.is_empty() && at_start.contains(&shard.id) => {
                Position::Start(start.clone())
            }
            None => Position::Start(StartPosition::TrimHorizon),
        };
        ready.push((shard.clone(), position));
    }
    ready
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The legal clock counts from the arrival time: a float of seconds from Kinesis is
    /// rounded to its millisecond, not truncated below it.
    #[test]
    fn an_arrival_time_keeps_its_millisecond() {
        for millis in [1_795_906_796_616_i64, 1_795_906_796_615, 1_700_000_000_001] {
            let record = aws_sdk_kinesis::types::Record::builder()
                .sequence_number("1")
                .partition_key("p")
                .data(aws_sdk_kinesis::primitives::Blob::new(b"x".to_vec()))
                .approximate_arrival_timestamp(aws_smithy_types::DateTime::from_secs_f64(
                    millis as f64 / 1000.0,
                ))
                .build()
                .unwrap();
            assert_eq!(raw_record(record).arrival_time_millis, millis);
        }
    }

    fn shard(id: &str, parents: &[&str], closed: bool) -> ShardInfo {
        ShardInfo {
            id: id.into(),
            parents: parents.iter().map(|s| s.to_string()).collect(),
            closed,
            hash_range: None,
        }
    }

    /// An idle shard's pause doubles from the poll interval to the idle one and stays
    /// there; a record, or a backlog behind an empty answer, ends it at once.
    #[test]
    fn idle_pause_backs_off_and_a_record_ends_it() {
        let (poll, idle) = (Duration::from_millis(200), Duration::from_millis(1_600));
        let mut pause = None;
        let mut pauses = Vec::new();
        for _ in 0..6 {
            pause = idle_pause(pause, true, poll, idle);
            pauses.push(pause.unwrap().as_millis());
        }
        assert_eq!(pauses, [200, 400, 800, 1_600, 1_600, 1_600]);
        assert_eq!(idle_pause(pause, false, poll, idle), None);
        assert_eq!(idle_pause(None, true, poll, idle), Some(poll));
        // Idle equal to poll: no back-off at all.
        assert_eq!(idle_pause(Some(poll), true, poll, poll), Some(poll));
    }

    fn ids(ready: &[(ShardInfo, Position)]) -> Vec<&str> {
        ready.iter().map(|(s, _)| s.id.as_str()).collect()
    }

    #[test]
    fn children_wait_for_every_parent() {
        let shards = vec![
            shard("a", &[], true),
            shard("b", &[], true),
            shard("merged", &["a", "b"], false),
            shard("c", &[], false),
        ];
        let mut cps: HashMap<&str, Checkpoint> = HashMap::new();
        let start = StartPosition::Latest;
        let get = |cps: &HashMap<&str, Checkpoint>, id: &str| cps.get(id).cloned();

        let at_start: HashSet<String> = ["a", "b", "merged", "c"].map(String::from).into();
        let ready = ready_shards(
            &shards,
            &HashSet::new(),
            &at_start,
            |id| get(&cps, id),
            &start,
        );
        assert_eq!(ids(&ready), ["a", "b", "c"]);

        cps.insert("a", Checkpoint::end(Some("5".into())));
        let ready = ready_shards(
            &shards,
            &HashSet::new(),
            &at_start,
            |id| get(&cps, id),
            &start,
        );
        assert_eq!(
            ids(&ready),
            ["b", "c"],
            "the adjacent parent is not finished"
        );

        cps.insert("b", Checkpoint::end(None));
        cps.insert("c", Checkpoint::at("7".into()));
        let ready = ready_shards(
            &shards,
            &HashSet::new(),
            &at_start,
            |id| get(&cps, id),
            &start,
        );
        assert_eq!(
            ready,
            vec![
                (
                    shards[2].clone(),
                    Position::Start(StartPosition::TrimHorizon)
                ),
                (shards[3].clone(), Position::After("7".into())),
            ]
        );
    }

    #[test]
    fn parents_gone_from_the_stream_do_not_block() {
        let shards = vec![shard("child", &["expired"], false)];
        let ready = ready_shards(
            &shards,
            &HashSet::new(),
            &HashSet::new(),
            |_| None,
            &StartPosition::Latest,
        );
        assert_eq!(ready[0].1, Position::Start(StartPosition::TrimHorizon));
    }

    #[test]
    fn a_shard_that_appears_mid_run_starts_at_trim_horizon() {
        let shards = vec![shard("old", &[], false), shard("new", &[], false)];
        let at_start: HashSet<String> = ["old".to_owned()].into();
        let ready = ready_shards(
            &shards,
            &HashSet::new(),
            &at_start,
            |_| None,
            &StartPosition::Latest,
        );
        assert_eq!(ready[0].1, Position::Start(StartPosition::Latest));
        assert_eq!(ready[1].1, Position::Start(StartPosition::TrimHorizon));
    }
}
