//! Enhanced fan-out (`[stream] read = "fan-out"`): a registered consumer, and per shard a
//! SubscribeToShard event stream whose events become the same [`Batch`]es polling makes,
//! so checkpoints, ordering, dedup and dead letters are the pipeline's as in polling mode.
//!
//! - A subscription starts from the reader's position: after the checkpoint
//!   (`AFTER_SEQUENCE_NUMBER`), at a KPL aggregate handled part way (`AT_SEQUENCE_NUMBER`,
//!   the pipeline skips the settled sub-records), or the start position.
//! - Each event moves the position to after its `ContinuationSequenceNumber`; a new
//!   subscription (renewal before Kinesis's five-minute end, after an error or a dropped
//!   connection) starts there, so nothing is skipped or read twice.
//! - Backpressure: the next event is read only when the previous batch is handled, and
//!   handed on only when one of `batches_in_flight` is free (taken once the event is here,
//!   so a quiet shard waiting for its next event holds no slot); meanwhile HTTP flow
//!   control holds the sender back. Each subscription may thus hold one received event
//!   beyond the bound.
//! - A shard ends with an event without a continuation sequence number (Kinesis sends its
//!   `ChildShards` then). Such an event naming no children, for a shard the shard list does
//!   not show closed, is taken as a fault (subscribe again), never as an end: finishing a
//!   shard wrongly would skip its records. Where an implementation never ends a closed shard's subscription
//!   (kinesis-mock), the shard list is the fallback: once ListShards shows the shard closed
//!   and its subscription delivers an event without records (nothing left to push), the
//!   reader drops the subscription and polls the shard's last records from its position
//!   until GetRecords says the shard ended (a closed shard's tail is finite: usually one
//!   call).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError;
use aws_sdk_kinesis::types::{
    ConsumerStatus, ShardIteratorType, StartingPosition, SubscribeToShardEventStream,
};

use crate::shutdown::Shutdown;
use crate::source::{
    describe, jitter, raw_record, Batch, KinesisSource, Position, RawRecord, ReadMode, SourceError,
    StartPosition, MAX_FAULT_BACKOFF,
};

/// Kinesis sends an event (a heartbeat when idle) every few seconds on a live
/// subscription: this long without one is a dead connection.
const SILENCE: Duration = Duration::from_secs(30);
/// Pause between DescribeStreamConsumer calls while the consumer is being created.
const CONSUMER_POLL: Duration = Duration::from_millis(250);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// After the daemon renews a subscription, Kinesis may count the old one as open for a few
/// seconds (ResourceInUse): expected then, not a fault.
const RENEWAL_GRACE: Duration = Duration::from_secs(15);

impl KinesisSource {
    async fn stream_arn(&self) -> Result<String, SourceError> {
        Ok(self
            .summary()
            .await?
            .stream_description_summary()
            .map(|s| s.stream_arn().to_owned())
            .unwrap_or_default())
    }

    fn consumer_error(&self, message: String) -> SourceError {
        SourceError::Consumer {
            stream: self.stream.clone(),
            consumer: self.consumer_name.clone(),
            message,
        }
    }

    /// Registers the fan-out consumer when the stream has none of that name and waits until
    /// it is ACTIVE; keeps its ARN for the subscriptions. `Ok(None)`: shutdown came first.
    pub async fn ensure_consumer(&self, shutdown: &Shutdown) -> Result<Option<()>, SourceError> {
        let stream_arn = self.stream_arn().await?;
        let mut said_waiting = false;
        loop {
            let described = self
                .client
                .describe_stream_consumer()
                .stream_arn(&stream_arn)
                .consumer_name(&self.consumer_name)
                .send()
                .await;
            match described {
                Ok(output) => {
                    let Some(consumer) = output.consumer_description() else {
                        return Err(self.consumer_error(
                            "DescribeStreamConsumer answered without a consumer".into(),
                        ));
                    };
                    if *consumer.consumer_status() == ConsumerStatus::Active {
                        tracing::info!(
                            consumer = %self.consumer_name,
                            "enhanced fan-out consumer active"
                        );
                        *self.consumer_arn.write().unwrap() =
                            Some(consumer.consumer_arn().to_owned());
                        return Ok(Some(()));
                    }
                    // CREATING, or DELETING (then registered again once gone).
                    if !said_waiting {
                        tracing::info!(consumer = %self.consumer_name, status = %consumer.consumer_status().as_str(), "waiting for the enhanced fan-out consumer to be active");
                        said_waiting = true;
                    }
                }
                Err(e) if e.code() == Some("ResourceNotFoundException") => {
                    let registered = self
                        .client
                        .register_stream_consumer()
                        .stream_arn(&stream_arn)
                        .consumer_name(&self.consumer_name)
                        .send()
                        .await;
                    match registered {
                        Ok(_) => tracing::info!(
                            consumer = %self.consumer_name,
                            "registered the enhanced fan-out consumer (remove it with `consumer deregister`)"
                        ),
                        // Registered meanwhile by another instance: wait for it.
                        Err(e)
                            if matches!(
                                e.code(),
                                Some("ResourceInUseException" | "LimitExceededException")
                            ) => {}
                        Err(e) => {
                            return Err(self.consumer_error(format!(
                                "RegisterStreamConsumer failed: {}",
                                describe(&e)
                            )))
                        }
                    }
                }
                Err(e) if e.code() == Some("LimitExceededException") => {}
                Err(e) => {
                    return Err(self.consumer_error(format!(
                        "DescribeStreamConsumer failed: {}",
                        describe(&e)
                    )))
                }
            }
            if shutdown.sleep(CONSUMER_POLL).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// Removes the fan-out consumer. `Ok(false)`: the stream has no consumer of that name.
    pub async fn deregister_consumer(&self) -> Result<bool, SourceError> {
        let stream_arn = self.stream_arn().await?;
        match self
            .client
            .deregister_stream_consumer()
            .stream_arn(&stream_arn)
            .consumer_name(&self.consumer_name)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(false),
            Err(e) => {
                Err(self
                    .consumer_error(format!("DeregisterStreamConsumer failed: {}", describe(&e))))
            }
        }
    }

    pub fn consumer_name(&self) -> &str {
        &self.consumer_name
    }
}

/// What the fan-out reader has next.
pub(crate) enum Step {
    Batch(Batch),
    Stopped,
    /// The shard is closed and its subscription has nothing more: poll from here to its end.
    PollTail(Position),
}

/// Whether retrying a subscription can help.
enum Fault {
    /// Another subscription still open (ResourceInUse), throttling, a dropped connection:
    /// back off and subscribe again.
    Transient,
    /// The consumer or stream is gone, access denied, a bad position.
    Fatal,
}

fn classify_code(code: Option<&str>) -> Fault {
    match code {
        Some(
            "ResourceNotFoundException" | "AccessDeniedException" | "InvalidArgumentException",
        ) => Fault::Fatal,
        _ => Fault::Transient,
    }
}

/// An error inside the event stream comes without a code: told apart by its variant.
fn classify_event_error(e: &SubscribeToShardEventStreamError) -> Fault {
    match e {
        SubscribeToShardEventStreamError::ResourceNotFoundException(_) => Fault::Fatal,
        SubscribeToShardEventStreamError::ResourceInUseException(_)
        | SubscribeToShardEventStreamError::InternalFailureException(_) => Fault::Transient,
        other => classify_code(other.code()),
    }
}

fn event_error_name(e: &SubscribeToShardEventStreamError) -> String {
    match e {
        SubscribeToShardEventStreamError::ResourceInUseException(_) => {
            "ResourceInUseException".into()
        }
        SubscribeToShardEventStreamError::ResourceNotFoundException(_) => {
            "ResourceNotFoundException".into()
        }
        SubscribeToShardEventStreamError::InternalFailureException(_) => {
            "InternalFailureException".into()
        }
        other => other.code().unwrap_or("unknown error").to_owned(),
    }
}

/// What an event says about its shard.
#[derive(Debug, PartialEq, Eq)]
enum Meaning {
    /// More to come.
    Continue,
    /// The shard is read to its end: no continuation sequence number, and Kinesis names
    /// its children (or the shard list shows it closed).
    ShardEnd,
    /// The shard is closed and the subscription has nothing more, yet has not ended it:
    /// its last records are polled.
    PollTail,
    /// No continuation for a shard neither named as ending nor listed as closed.
    Invalid,
}

fn meaning(continuation: &str, child_shards: bool, records: bool, closed: bool) -> Meaning {
    match (continuation.is_empty(), child_shards || closed) {
        (true, true) => Meaning::ShardEnd,
        (true, false) => Meaning::Invalid,
        (false, _) if closed && !records => Meaning::PollTail,
        (false, _) => Meaning::Continue,
    }
}

struct Subscription {
    events: aws_sdk_kinesis::primitives::event_stream::EventReceiver<
        SubscribeToShardEventStream,
        SubscribeToShardEventStreamError,
    >,
    since: Instant,
    /// Whether an event came: only then is it counted as started (Kinesis may refuse it
    /// inside the stream after the call succeeded).
    counted: bool,
}

/// Reads one shard from its subscriptions, one event per batch.
pub(crate) struct FanOutReader {
    source: Arc<KinesisSource>,
    shard_id: String,
    /// Where the next subscription starts.
    position: Position,
    subscription: Option<Subscription>,
    /// An event of the subscription received while gathering a batch, not yet handled.
    pending: Option<aws_sdk_kinesis::types::SubscribeToShardEvent>,
    /// Why the next subscription starts: `initial`, `renewal`, `ended`, `error`.
    reason: &'static str,
    backoff: Duration,
    /// Subscriptions started since the last batch, by reason (counted by the pipeline).
    subscribed: Vec<&'static str>,
    /// When the daemon last renewed the subscription itself.
    renewed: Option<Instant>,
}

impl FanOutReader {
    pub(crate) fn new(source: Arc<KinesisSource>, shard_id: String, position: Position) -> Self {
        Self {
            source,
            shard_id,
            position,
            subscription: None,
            pending: None,
            reason: "initial",
            backoff: FIRST_BACKOFF,
            subscribed: Vec::new(),
            renewed: None,
        }
    }

    fn starting_position(&self) -> StartingPosition {
        let (kind, sequence, timestamp) = match &self.position {
            Position::After(seq) => (ShardIteratorType::AfterSequenceNumber, Some(seq), None),
            Position::Within(seq, _) => (ShardIteratorType::AtSequenceNumber, Some(seq), None),
            Position::Start(StartPosition::TrimHorizon) => {
                (ShardIteratorType::TrimHorizon, None, None)
            }
            Position::Start(StartPosition::Latest) => (ShardIteratorType::Latest, None, None),
            Position::Start(StartPosition::AtTimestamp(ms)) => (
                ShardIteratorType::AtTimestamp,
                None,
                Some(aws_smithy_types::DateTime::from_millis(*ms)),
            ),
        };
        StartingPosition::builder()
            .r#type(kind)
            .set_sequence_number(sequence.cloned())
            .set_timestamp(timestamp)
            .build()
            .expect("the type is set")
    }

    /// A failed subscription: said (counted as a Kinesis retry), then a pause that doubles
    /// with jitter; or the error, when retrying cannot help.
    async fn fault(
        &mut self,
        fault: Fault,
        message: String,
        shutdown: &Shutdown,
    ) -> Result<bool, SourceError> {
        if self.reason == "renewal"
            && message.contains("ResourceInUseException")
            && self.renewed.is_some_and(|at| at.elapsed() < RENEWAL_GRACE)
        {
            // The subscription this daemon just dropped to renew it, still counted as open.
            tracing::debug!(shard_id = %self.shard_id, "the renewed subscription is not free yet");
            self.subscription = None;
            self.pending = None;
            return Ok(shutdown.sleep(jitter(FIRST_BACKOFF * 2)).await.is_ok());
        }
        self.end_subscription("error");
        if let Fault::Fatal = fault {
            return Err(SourceError::Subscribe {
                stream: self.source.stream.clone(),
                shard_id: self.shard_id.clone(),
                message,
            });
        }
        self.source
            .set_fault(&self.shard_id, Some(format!("SubscribeToShard: {message}")));
        let pause = jitter(self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_FAULT_BACKOFF);
        Ok(shutdown.sleep(pause).await.is_ok())
    }

    /// The consumer is gone (removed with `consumer deregister` or by hand while the daemon
    /// runs): it is registered again, as at start, or the stream's own error is returned.
    async fn register_again(
        &mut self,
        error: &str,
        shutdown: &Shutdown,
    ) -> Result<bool, SourceError> {
        self.end_subscription("error");
        tracing::warn!(shard_id = %self.shard_id, consumer = %self.source.consumer_name, error, "the enhanced fan-out consumer is gone: registering it again");
        Ok(self.source.ensure_consumer(shutdown).await?.is_some())
    }

    /// Drops the subscription (and an event it sent that is not handled yet: the next
    /// subscription sends it again from the position); the next one starts for `reason`.
    fn end_subscription(&mut self, reason: &'static str) {
        self.subscription = None;
        self.pending = None;
        self.reason = reason;
        if reason == "renewal" {
            self.renewed = Some(Instant::now());
        }
    }

    /// Moves the position past an event: after its last record, then after its
    /// continuation sequence number (past any gap), except while still inside the
    /// aggregate the reader started in.
    fn advance(&mut self, last_record: Option<&str>, continuation: &str) {
        if let Some(seq) = last_record {
            self.position = Position::After(seq.to_owned());
        }
        if !continuation.is_empty() && !matches!(self.position, Position::Within(..)) {
            self.position = Position::After(continuation.to_owned());
        }
    }

    /// Adds to `records` the events the subscription has already received (Kinesis pushes
    /// small events on a busy shard, and more arrive while a batch waits for its slot), up
    /// to `records_per_call` records: one batch and one checkpoint commit for them all, as
    /// a GetRecords answer would be. Never waits. An event that ends the shard or needs
    /// care is kept for the next call. Returns the last event's MillisBehindLatest.
    fn gather(&mut self, records: &mut Vec<RawRecord>, mut millis: Option<i64>) -> Option<i64> {
        let closed = self.source.is_closed(&self.shard_id);
        while records.len() < self.source.records_per_call.max(1) as usize {
            let Some(subscription) = self.subscription.as_mut() else {
                break;
            };
            // Only what is already here: polled once. Receiving is cancel-safe (a message
            // not complete yet stays in the receiver's buffer).
            let received = {
                let mut receiving = std::pin::pin!(subscription.events.recv());
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match std::future::Future::poll(receiving.as_mut(), &mut cx) {
                    std::task::Poll::Ready(received) => received,
                    std::task::Poll::Pending => break,
                }
            };
            let event = match received {
                Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event))) => event,
                Ok(Some(_)) => continue,
                // Ended or failed: the next call subscribes again from the position.
                Ok(None) => {
                    self.end_subscription("ended");
                    break;
                }
                Err(e) => {
                    let message = match e.as_service_error() {
                        Some(service) => event_error_name(service),
                        None => describe(&e),
                    };
                    self.source
                        .set_fault(&self.shard_id, Some(format!("SubscribeToShard: {message}")));
                    self.end_subscription("error");
                    break;
                }
            };
            let kind = meaning(
                &event.continuation_sequence_number,
                event.child_shards.as_ref().is_some_and(|c| !c.is_empty()),
                !event.records.is_empty(),
                closed,
            );
            if kind != Meaning::Continue {
                self.pending = Some(event);
                break;
            }
            millis = Some(event.millis_behind_latest);
            records.extend(event.records.into_iter().map(raw_record));
            self.advance(
                records.last().map(|r| &*r.sequence_number),
                &event.continuation_sequence_number,
            );
        }
        millis
    }

    pub(crate) async fn next(&mut self, shutdown: &Shutdown) -> Result<Step, SourceError> {
        loop {
            if shutdown.is_triggered() {
                return Ok(Step::Stopped);
            }
            let renew = self.source.subscription_renew;
            if self
                .subscription
                .as_ref()
                .is_some_and(|s| s.since.elapsed() >= renew)
            {
                self.end_subscription("renewal");
            }
            if self.subscription.is_none() {
                let arn = self
                    .source
                    .consumer_arn
                    .read()
                    .unwrap()
                    .clone()
                    .ok_or_else(|| SourceError::Subscribe {
                        stream: self.source.stream.clone(),
                        shard_id: self.shard_id.clone(),
                        message: "no fan-out consumer registered".into(),
                    })?;
                let request = self
                    .source
                    .client
                    .subscribe_to_shard()
                    .consumer_arn(&arn)
                    .shard_id(&self.shard_id)
                    .starting_position(self.starting_position());
                // The call returns with the stream's first message: a stop does not wait.
                let sent = tokio::select! {
                    sent = request.send() => sent,
                    _ = shutdown.triggered() => return Ok(Step::Stopped),
                };
                match sent {
                    Ok(output) => {
                        tracing::debug!(shard_id = %self.shard_id, position = %self.position, reason = self.reason, "subscribed");
                        self.subscription = Some(Subscription {
                            events: output.event_stream,
                            since: Instant::now(),
                            counted: false,
                        });
                    }
                    // The consumer was removed behind the daemon's back: registered again
                    // (as at start), then subscribed from the position.
                    Err(e) if e.code() == Some("ResourceNotFoundException") => {
                        if !self.register_again(&describe(&e), shutdown).await? {
                            return Ok(Step::Stopped);
                        }
                        continue;
                    }
                    Err(e) => {
                        let fault = classify_code(e.code());
                        if !self.fault(fault, describe(&e), shutdown).await? {
                            return Ok(Step::Stopped);
                        }
                        continue;
                    }
                }
            }
            let subscription = self.subscription.as_mut().expect("subscribed above");
            let left = renew.saturating_sub(subscription.since.elapsed());
            let received = match self.pending.take() {
                Some(event) => Ok(Ok(Some(
                    SubscribeToShardEventStream::SubscribeToShardEvent(event),
                ))),
                None => tokio::select! {
                    received = tokio::time::timeout(left.min(SILENCE), subscription.events.recv()) => received,
                    _ = shutdown.triggered() => return Ok(Step::Stopped),
                },
            };
            let event = match received {
                // Its time is up (renewed at the top), or the connection went silent.
                Err(_) if left <= SILENCE => continue,
                Err(_) => {
                    let message = format!("no event for {} s", SILENCE.as_secs());
                    if !self.fault(Fault::Transient, message, shutdown).await? {
                        return Ok(Step::Stopped);
                    }
                    continue;
                }
                // Kinesis ended it (its five minutes are up): go on from the position.
                Ok(Ok(None)) => {
                    self.end_subscription("ended");
                    continue;
                }
                Ok(Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event)))) => {
                    if let Some(subscription) = self.subscription.as_mut().filter(|s| !s.counted) {
                        subscription.counted = true;
                        self.subscribed.push(self.reason);
                    }
                    event
                }
                Ok(Ok(Some(_))) => continue,
                Ok(Err(e))
                    if matches!(
                        e.as_service_error(),
                        Some(SubscribeToShardEventStreamError::ResourceNotFoundException(
                            _
                        ))
                    ) =>
                {
                    if !self
                        .register_again("ResourceNotFoundException", shutdown)
                        .await?
                    {
                        return Ok(Step::Stopped);
                    }
                    continue;
                }
                Ok(Err(e)) => {
                    let (fault, message) = match e.as_service_error() {
                        Some(service) => (classify_event_error(service), event_error_name(service)),
                        None => (Fault::Transient, describe(&e)),
                    };
                    if !self.fault(fault, message, shutdown).await? {
                        return Ok(Step::Stopped);
                    }
                    continue;
                }
            };
            if self.backoff > FIRST_BACKOFF {
                self.source.set_fault(&self.shard_id, None);
                self.backoff = FIRST_BACKOFF;
            }
            let continuation = event.continuation_sequence_number;
            let millis_behind_latest = Some(event.millis_behind_latest);
            let meaning = meaning(
                &continuation,
                event.child_shards.as_ref().is_some_and(|c| !c.is_empty()),
                !event.records.is_empty(),
                self.source.is_closed(&self.shard_id),
            );
            if meaning == Meaning::Invalid {
                // Finishing the shard on it could skip records: subscribe again instead.
                let message = "an event without a continuation sequence number for a shard not known to be closed".to_owned();
                if !self.fault(Fault::Transient, message, shutdown).await? {
                    return Ok(Step::Stopped);
                }
                continue;
            }
            let records: Vec<_> = event.records.into_iter().map(raw_record).collect();
            self.advance(records.last().map(|r| &*r.sequence_number), &continuation);
            if meaning == Meaning::PollTail {
                self.end_subscription("initial");
                return Ok(Step::PollTail(self.position.clone()));
            }
            let shard_end = meaning == Meaning::ShardEnd;
            // Taken once the event is here, not while waiting for it: a subscription waits
            // seconds for an event on a quiet shard, and holding a slot meanwhile would
            // starve the busy shards. Meanwhile HTTP flow control holds Kinesis back.
            let permit = tokio::select! {
                permit = self.source.in_flight.clone().acquire_owned() => permit.expect("never closed"),
                _ = shutdown.triggered() => return Ok(Step::Stopped),
            };
            let mut records = records;
            let mut millis_behind_latest = millis_behind_latest;
            if meaning == Meaning::Continue {
                millis_behind_latest = self
                    .gather(&mut records, millis_behind_latest)
                    .or(millis_behind_latest);
            }
            return Ok(Step::Batch(Batch {
                records,
                millis_behind_latest,
                shard_end,
                in_flight: Some(permit),
                read_mode: Some(ReadMode::FanOut),
                subscribed: std::mem::take(&mut self.subscribed),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn reader(position: Position) -> FanOutReader {
        // Only the position logic is exercised: no call is made.
        let settings = crate::source::StreamSettings {
            name: "s".into(),
            region: Some("us-east-1".into()),
            endpoint_url: Some("http://127.0.0.1:9".into()),
            start: StartPosition::TrimHorizon,
            poll_interval: Duration::from_secs(1),
            idle_poll_interval: Duration::from_secs(1),
            shard_sync_interval: Duration::from_secs(1),
            retention_margin: Duration::from_secs(1),
            list_shards_page_size: None,
            records_per_call: 1,
            batches_in_flight: 1,
            call_timeout: Duration::from_secs(1),
            read: ReadMode::FanOut,
            consumer_name: "c".into(),
            subscription_renew: Duration::from_secs(1),
        };
        let source = KinesisSource::connect(&settings).await;
        FanOutReader::new(Arc::new(source), "shard".into(), position)
    }

    /// A shard ends only on an event without continuation that names children (or for a
    /// shard listed as closed); a closed shard whose subscription idles is polled to its end.
    #[test]
    fn what_an_event_means() {
        assert_eq!(meaning("5", false, true, false), Meaning::Continue);
        assert_eq!(meaning("5", false, false, false), Meaning::Continue);
        assert_eq!(meaning("", true, false, false), Meaning::ShardEnd);
        assert_eq!(meaning("", true, true, true), Meaning::ShardEnd);
        assert_eq!(meaning("", false, false, true), Meaning::ShardEnd);
        assert_eq!(meaning("", false, true, false), Meaning::Invalid);
        // Closed, but records still coming: read them from the subscription.
        assert_eq!(meaning("5", false, true, true), Meaning::Continue);
        assert_eq!(meaning("5", false, false, true), Meaning::PollTail);
    }

    /// A subscription renewed or restarted goes on after the last continuation; inside
    /// a KPL aggregate it stays at the aggregate until a record arrives.
    #[tokio::test]
    async fn the_position_follows_records_and_continuations() {
        let mut r = reader(Position::Start(StartPosition::Latest)).await;
        r.advance(None, "");
        assert_eq!(r.position, Position::Start(StartPosition::Latest));
        r.advance(None, "10");
        assert_eq!(r.position, Position::After("10".into()));
        r.advance(Some("12"), "15");
        assert_eq!(r.position, Position::After("15".into()));
        assert_eq!(
            *r.starting_position().r#type(),
            ShardIteratorType::AfterSequenceNumber
        );

        let mut r = reader(Position::Within("7".into(), 2)).await;
        assert_eq!(
            *r.starting_position().r#type(),
            ShardIteratorType::AtSequenceNumber
        );
        r.advance(None, "5");
        assert_eq!(r.position, Position::Within("7".into(), 2));
        r.advance(Some("7"), "9");
        assert_eq!(r.position, Position::After("9".into()));
    }
}
