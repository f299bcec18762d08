//! The pipeline: a shard's records through decode → rules → dedup → actions → state, in
//! order, and the checkpoint rule.
//!
//! A shard's checkpoint moves past a record only once every decision of that record is
//! settled: done, skipped as a duplicate, or durably dead-lettered. State writes are gathered
//! per batch and committed once at its end, and right after each backend call, so a crash
//! repeats at most the calls in flight.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::actions::{ActionSet, Outcome};
use crate::clock::now_ms;
use crate::decode::{self, DecodeError, Record, Undecodable, Unreadable};
use crate::keys::{KeyError, Keys};
use crate::preview::Preview;
use crate::rules::reload::Rules;
use crate::rules::{Decision, RuleError, RuleSet, Verdict};
use crate::shutdown::Shutdown;
use crate::source::{Batch, Checkpoint, Position, RawRecord, ShardReader, SourceError};
use crate::state::{AuditEntry, DeadLetter, DeadLetterReason, State, StateError, Writes};
use crate::telemetry::{ActionOutcome, Telemetry, UnreadableOutcome};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("shard {shard_id} at sequence number {sequence_number}: {source}")]
    State {
        shard_id: String,
        sequence_number: String,
        source: StateError,
    },
    #[error("dead letter {id}: {source}")]
    Unseal { id: u64, source: KeyError },
}

/// How a shard's worker ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ShardExit {
    /// Read to its end and checkpointed as finished: its children may start.
    Finished,
    /// Caught up with the stream (dry-run ends a shard here unless it follows).
    CaughtUp,
    /// Shutdown: everything settled is checkpointed.
    Stopped,
}

/// Where decisions go: the backend and the state, or the dry-run preview.
pub enum Sink {
    Live { state: Arc<State>, keys: Keys },
    Preview(Box<Preview>),
}

/// Requests being carried out now, over all shards: the same request read from two shards
/// at once (a producer's retry) is sent by one and found done by the other.
#[derive(Default)]
pub struct Claims(
    std::sync::Mutex<std::collections::HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
);

impl Claims {
    async fn claim(&self, id: [u8; 32]) -> Claim<'_> {
        let lock = self.0.lock().unwrap().entry(id).or_default().clone();
        let guard = lock.clone().lock_owned().await;
        Claim {
            claims: self,
            id,
            lock,
            _guard: guard,
        }
    }
}

struct Claim<'a> {
    claims: &'a Claims,
    id: [u8; 32],
    lock: Arc<tokio::sync::Mutex<()>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut map = self.claims.0.lock().unwrap();
        // The map's copy, this one and the guard's: nobody else waits for it.
        if Arc::strong_count(&self.lock) <= 3 {
            map.remove(&self.id);
        }
    }
}

pub struct Pipeline {
    pub stream: Arc<str>,
    /// Swapped whole by a reload; each record sees one rule set.
    pub rules: Arc<Rules>,
    pub actions: ActionSet,
    pub sink: Sink,
    pub shutdown: Shutdown,
    pub telemetry: Arc<Telemetry>,
    pub claims: Claims,
}

/// Whether a record's decisions are all settled.
enum Settled {
    Yes,
    /// Shutdown interrupted an action: the record must be read again after a restart.
    No,
}

/// Writes gathered while handling records, not yet committed.
#[derive(Default)]
struct Pending {
    writes: Writes,
    /// Requests done in this batch (the ledger does not have them until the commit).
    done: HashSet<[u8; 32]>,
    /// Records each rule saw and decided on, counted per batch: one metrics update per
    /// rule and batch rather than per record.
    rule_counts: Option<(Arc<RuleSet>, Vec<RuleCount>)>,
}

/// Records a rule saw, and decided on.
type RuleCount = (u64, u64);

impl Pending {
    fn count(&mut self, rules: &Arc<RuleSet>, index: usize, matched: bool, telemetry: &Telemetry) {
        if !self
            .rule_counts
            .as_ref()
            .is_some_and(|(set, _)| Arc::ptr_eq(set, rules))
        {
            self.report_rule_counts(telemetry);
            self.rule_counts = Some((rules.clone(), vec![(0, 0); rules.rules().len()]));
        }
        let (_, counts) = self.rule_counts.as_mut().expect("set above");
        counts[index].0 += 1;
        counts[index].1 += u64::from(matched);
    }

    fn report_rule_counts(&mut self, telemetry: &Telemetry) {
        if let Some((set, counts)) = self.rule_counts.take() {
            for (rule, (seen, matched)) in set.rules().iter().zip(counts) {
                telemetry.rule_evaluated(&rule.name, seen, matched);
            }
        }
    }
}

/// What the rules made of a record that has something to settle, by rule index.
struct RulesOutcome {
    rules: Arc<RuleSet>,
    verdicts: Vec<(usize, Verdict)>,
}

/// A shard's place in the pipeline between batches.
pub struct ShardProgress {
    /// The stream's name, the shard's own copy: records share it without every shard
    /// counting references on one shared counter from several threads.
    stream: Arc<str>,
    shard_id: Arc<str>,
    /// Sub-records of a resumed aggregate up to this one are settled already.
    skip: Option<(String, u64)>,
    /// The last checkpoint written.
    checkpointed: Option<Checkpoint>,
    pending: Pending,
}

impl ShardProgress {
    pub fn new(stream: &str, shard_id: &str, start: Position) -> Self {
        let (skip, checkpointed) = match start {
            Position::After(seq) => (None, Some(Checkpoint::at(seq))),
            Position::Within(seq, sub) => {
                (Some((seq.clone(), sub)), Some(Checkpoint::within(seq, sub)))
            }
            Position::Start(_) => (None, None),
        };
        Self {
            stream: stream.into(),
            shard_id: shard_id.into(),
            skip,
            checkpointed,
            pending: Pending::default(),
        }
    }
}

/// How a batch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum BatchEnd {
    Handled,
    /// Shutdown came first: everything settled is checkpointed, the rest is read again.
    Interrupted,
    /// The shard is closed and read to its end.
    ShardEnd,
}

/// What a dead letter keeps sealed for a failed action: the decision.
#[derive(Serialize, Deserialize)]
struct SealedDecision {
    key: String,
    params: serde_json::Map<String, serde_json::Value>,
}

/// What a dead letter keeps sealed for a failed rule: the record and the full error.
#[derive(Serialize, Deserialize)]
struct SealedRecord {
    partition_key: String,
    payload_hex: String,
    error: String,
}

/// What became of a dead letter that was retried.
#[derive(Debug, PartialEq, Eq)]
pub enum Retried {
    /// Settled: done, or found already done.
    Resolved,
    /// Failed again: it stays a dead letter.
    StillFailing(String),
    Interrupted,
}

impl Pipeline {
    pub fn checkpoint(&self, shard_id: &str) -> Result<Option<Checkpoint>, StateError> {
        match &self.sink {
            Sink::Live { state, .. } => state.checkpoint(shard_id),
            Sink::Preview(preview) => Ok(preview.checkpoint(shard_id)),
        }
    }

    /// Commits the gathered writes (in dry-run, keeps the checkpoints in memory).
    async fn flush(&self, pending: &mut Pending, shard_id: &str) -> Result<(), PipelineError> {
        let writes = std::mem::take(&mut pending.writes);
        pending.done.clear();
        match &self.sink {
            Sink::Preview(preview) => {
                for (shard, checkpoint) in writes.checkpoints {
                    preview.set_checkpoint(&shard, checkpoint);
                }
                Ok(())
            }
            Sink::Live { state, .. } => {
                let sequence_number = writes
                    .checkpoints
                    .last()
                    .and_then(|(_, c)| c.sequence_number.clone())
                    .unwrap_or_default();
                let started = Instant::now();
                let has_checkpoint = !writes.checkpoints.is_empty();
                state
                    .commit_shared(writes)
                    .await
                    .map_err(|source| PipelineError::State {
                        shard_id: shard_id.to_owned(),
                        sequence_number,
                        source,
                    })?;
                if has_checkpoint {
                    self.telemetry.checkpoint_committed(started.elapsed());
                }
                Ok(())
            }
        }
    }

    /// Reads and handles one shard until it ends, catches up (dry-run) or shutdown.
    pub async fn run_shard(
        &self,
        mut reader: ShardReader,
        shard_id: &str,
        start: Position,
    ) -> Result<ShardExit, PipelineError> {
        let mut progress = ShardProgress::new(&self.stream, shard_id, start);
        let mut caught_up = false;
        loop {
            let Some(batch) = reader.next(&self.shutdown).await? else {
                return Ok(ShardExit::Stopped);
            };
            let now_caught_up = batch.records.is_empty() && batch.millis_behind_latest == Some(0);
            match self.handle_batch(&mut progress, batch).await? {
                BatchEnd::Interrupted => return Ok(ShardExit::Stopped),
                BatchEnd::ShardEnd => {
                    tracing::info!(shard_id, "shard read to its end");
                    return Ok(ShardExit::Finished);
                }
                BatchEnd::Handled => {}
            }
            if now_caught_up && !caught_up {
                tracing::info!(shard_id, "shard caught up");
                if let Sink::Preview(preview) = &self.sink {
                    preview.shard_caught_up();
                    if !preview.follow() {
                        return Ok(ShardExit::CaughtUp);
                    }
                }
            }
            caught_up = now_caught_up;
        }
    }

    /// Handles one GetRecords batch of a shard, in order, and commits its writes with the
    /// checkpoint of the last settled record.
    pub async fn handle_batch(
        &self,
        progress: &mut ShardProgress,
        batch: Batch,
    ) -> Result<BatchEnd, PipelineError> {
        let shard_id = &progress.shard_id;
        // Where the shard stands: after the last whole record settled, or inside an
        // aggregate that shutdown cut short.
        let mut last_settled: Option<Arc<str>> = None;
        let mut within_aggregate: Option<Checkpoint> = None;
        let mut interrupted = false;
        self.telemetry
            .shard_lag(shard_id, batch.millis_behind_latest);
        let bytes = batch.records.iter().map(|r| r.data.len()).sum();
        self.telemetry
            .records_read(shard_id, batch.records.len(), bytes);
        let pending = &mut progress.pending;
        'records: for raw in batch.records {
            let sequence_number = raw.sequence_number.clone();
            let records = match decode::decode(&progress.stream, shard_id, raw) {
                Ok(records) => records,
                Err(undecodable) => {
                    self.decode_failed(*undecodable, shard_id, pending);
                    decode::Records::new()
                }
            };
            let aggregated = records.len() > 1;
            // The last sub-record of this aggregate that is settled.
            let mut within: Option<&Record> = None;
            for record in &records {
                if progress.skip.as_ref().is_some_and(|(seq, sub)| {
                    **seq == *record.sequence_number && record.sub_sequence_number <= *sub
                }) {
                    continue;
                }
                let outcome = match self.evaluate(record, pending) {
                    None => Settled::Yes,
                    Some(outcome) => self.settle(record, outcome, pending).await?,
                };
                let stop = match outcome {
                    Settled::No => true,
                    Settled::Yes => {
                        within = Some(record);
                        aggregated && self.shutdown.is_triggered()
                    }
                };
                if stop {
                    interrupted = true;
                    within_aggregate = within.filter(|_| aggregated).map(|last| {
                        Checkpoint::within(
                            last.sequence_number.to_string(),
                            last.sub_sequence_number,
                        )
                    });
                    break 'records;
                }
            }
            progress.skip = None;
            last_settled = Some(sequence_number);
            if self.shutdown.is_triggered() {
                interrupted = true;
                break;
            }
        }
        let settled = within_aggregate
            .or_else(|| last_settled.map(|seq| Checkpoint::at(seq.to_string())))
            .or_else(|| progress.checkpointed.clone());
        let finished = batch.shard_end && !interrupted;
        if settled != progress.checkpointed || finished {
            let checkpoint = match finished {
                true => Some(Checkpoint::end(
                    settled.as_ref().and_then(|c| c.sequence_number.clone()),
                )),
                false => settled.clone(),
            };
            if let Some(checkpoint) = checkpoint {
                pending
                    .writes
                    .checkpoints
                    .push((shard_id.to_string(), checkpoint));
            }
            progress.checkpointed = settled;
        }
        pending.report_rule_counts(&self.telemetry);
        self.flush(pending, shard_id).await?;
        Ok(match (interrupted, finished) {
            (true, _) => BatchEnd::Interrupted,
            (false, true) => BatchEnd::ShardEnd,
            (false, false) => BatchEnd::Handled,
        })
    }

    /// Runs the rules on one record and settles every decision.
    async fn handle(
        &self,
        record: &Record,
        pending: &mut Pending,
    ) -> Result<Settled, PipelineError> {
        match self.evaluate(record, pending) {
            Some(outcome) => self.settle(record, outcome, pending).await,
            None => Ok(Settled::Yes),
        }
    }

    /// Runs the rules on one record, without waiting for anything. `None` when no rule
    /// decided anything or failed: most records of a shared stream, which never enter the
    /// async path of [`Pipeline::settle`].
    fn evaluate(&self, record: &Record, pending: &mut Pending) -> Option<RulesOutcome> {
        let rules = self.rules.load();
        if let Sink::Preview(preview) = &self.sink {
            preview.evaluate(&rules, Some(&self.actions), record);
            return None;
        }
        let run = rules.run(record);
        if let Some(fault) = run.fault {
            // A record no rule would see is only counted; one a rule would see but that
            // cannot be read is never "not a request".
            let seen = !run.verdicts.is_empty();
            let dead_letter = fault == Unreadable::JsonTooDeep && seen;
            self.telemetry.undecodable_record(
                &record.shard_id,
                &record.sequence_number,
                record.sub_sequence_number,
                fault.as_str(),
                match (dead_letter, seen) {
                    (true, _) => UnreadableOutcome::DeadLettered,
                    (false, true) => UnreadableOutcome::ReadAnyway,
                    (false, false) => UnreadableOutcome::Unseen,
                },
            );
            if dead_letter {
                let error = DecodeError {
                    shard_id: record.shard_id.to_string(),
                    sequence_number: record.sequence_number.to_string(),
                    kind: fault,
                    reason: "its JSON nests too deep to be parsed".into(),
                };
                self.dead_letter_unreadable(record, error, pending);
                return None;
            }
        }
        let mut verdicts = Vec::new();
        for (index, verdict) in run.verdicts {
            match verdict {
                Verdict::Skipped => {}
                Verdict::Decided(decisions) if decisions.is_empty() => {
                    pending.count(&rules, index, false, &self.telemetry)
                }
                verdict => verdicts.push((index, verdict)),
            }
        }
        (!verdicts.is_empty()).then(|| RulesOutcome {
            rules: arc_swap::Guard::into_inner(rules),
            verdicts,
        })
    }

    /// Settles what the rules made of a record, rule by rule: failures dead-lettered,
    /// decisions carried out.
    async fn settle(
        &self,
        record: &Record,
        outcome: RulesOutcome,
        pending: &mut Pending,
    ) -> Result<Settled, PipelineError> {
        let Sink::Live { state, keys } = &self.sink else {
            return Ok(Settled::Yes);
        };
        let rules = &outcome.rules;
        for (index, verdict) in outcome.verdicts {
            let rule = &rules.rules()[index];
            let maker = Maker {
                rule: &rule.name,
                rule_file: &rule.path,
                rules_hash: rules.hash(),
            };
            let decisions = match verdict {
                Verdict::Skipped => continue,
                Verdict::Failed(error) => {
                    self.rule_failed(keys, record, &maker, error, pending);
                    continue;
                }
                Verdict::Decided(decisions) => decisions,
            };
            pending.count(rules, index, !decisions.is_empty(), &self.telemetry);
            for decision in decisions {
                let settled = self
                    .act(state, keys, record, &maker, decision, pending)
                    .await?;
                if let Settled::No = settled {
                    return Ok(Settled::No);
                }
            }
        }
        Ok(Settled::Yes)
    }

    /// A record that cannot be decoded (a malformed KPL aggregate, a decompression bomb) is
    /// dead-lettered as it came, sealed: never skipped.
    fn decode_failed(&self, undecodable: Undecodable, shard_id: &Arc<str>, pending: &mut Pending) {
        let Undecodable { error, raw } = undecodable;
        self.telemetry.undecodable_record(
            shard_id,
            &raw.sequence_number,
            0,
            error.kind.as_str(),
            UnreadableOutcome::DeadLettered,
        );
        let record = Record::undecoded(&self.stream, shard_id, raw);
        self.dead_letter_unreadable(&record, error, pending);
    }

    /// Dead-letters a record (or a sub-record) that cannot be read, sealed as it came:
    /// a retry decodes it again.
    fn dead_letter_unreadable(&self, record: &Record, error: DecodeError, pending: &mut Pending) {
        let Sink::Live { keys, .. } = &self.sink else {
            return;
        };
        let sealed = SealedRecord {
            partition_key: record.partition_key.to_string(),
            payload_hex: hex::encode(&record.bytes),
            error: error.to_string(),
        };
        let rules = self.rules.load();
        let maker = Maker {
            rule: "",
            rule_file: Path::new(""),
            rules_hash: rules.hash(),
        };
        pending.writes.dead_letters.push(dead_letter(
            record,
            &maker,
            DeadLetterReason::DecodeFailed {
                error: error.reason,
                sealed_record: keys.seal(&serde_json::to_vec(&sealed).expect("serializes")),
            },
        ));
    }

    /// A rule failed on the record: never "no match". The record is dead-lettered, sealed.
    fn rule_failed(
        &self,
        keys: &Keys,
        record: &Record,
        maker: &Maker,
        error: RuleError,
        pending: &mut Pending,
    ) {
        let summary = error.log_summary();
        self.telemetry.rule_failed(
            &record.shard_id,
            &record.sequence_number,
            maker.rule,
            &summary,
        );
        let sealed = SealedRecord {
            partition_key: record.partition_key.to_string(),
            payload_hex: hex::encode(&record.bytes),
            error: error.to_string(),
        };
        let sealed_record = keys.seal(&serde_json::to_vec(&sealed).expect("serializes"));
        pending.writes.dead_letters.push(dead_letter(
            record,
            maker,
            DeadLetterReason::RuleFailed {
                error: summary,
                sealed_record,
            },
        ));
    }

    /// Carries out one decision: dedup, then the backend call, then the state.
    async fn act(
        &self,
        state: &State,
        keys: &Keys,
        record: &Record,
        maker: &Maker<'_>,
        decision: Decision,
        pending: &mut Pending,
    ) -> Result<Settled, PipelineError> {
        let request = match self.actions.prepare(&decision) {
            Ok(request) => request,
            Err(e) => {
                let error = RuleError::Decision {
                    rule: maker.rule.to_owned(),
                    file: maker.rule_file.to_owned(),
                    reason: e.to_string(),
                };
                self.rule_failed(keys, record, maker, error, pending);
                return Ok(Settled::Yes);
            }
        };
        let id = keys.request_id(&decision.action, &decision.key);
        let audit = |outcome: ActionOutcome, status: Option<u16>, attempts: u32| {
            audit_entry(
                record,
                maker,
                &decision,
                &id,
                outcome.as_str(),
                status,
                attempts,
            )
        };
        let report = |outcome, attempts, took, error: Option<&str>| {
            self.telemetry.action(
                outcome,
                &record.shard_id,
                &record.sequence_number,
                maker.rule,
                maker.rules_hash,
                &decision.action,
                attempts,
                took,
                error,
            )
        };
        let _claim = self.claims.claim(id).await;
        let already_done = pending.done.contains(&id)
            || state
                .is_done(&id)
                .map_err(|source| state_error(record, source))?;
        if already_done {
            report(ActionOutcome::Duplicate, 0, None, None);
            pending
                .writes
                .audit
                .push(audit(ActionOutcome::Duplicate, None, 0));
            return Ok(Settled::Yes);
        }
        let started = Instant::now();
        match self.actions.send(&request, &self.shutdown).await {
            Outcome::Done { status, attempts } => {
                report(ActionOutcome::Done, attempts, Some(started.elapsed()), None);
                pending.done.insert(id);
                pending.writes.done.push(id);
                pending
                    .writes
                    .audit
                    .push(audit(ActionOutcome::Done, Some(status), attempts));
            }
            Outcome::Failed {
                error,
                status,
                attempts,
                retryable,
            } => {
                report(
                    ActionOutcome::DeadLettered,
                    attempts,
                    Some(started.elapsed()),
                    Some(&error),
                );
                pending
                    .writes
                    .audit
                    .push(audit(ActionOutcome::DeadLettered, status, attempts));
                let sealed = SealedDecision {
                    key: decision.key.clone(),
                    params: decision.params.clone(),
                };
                pending.writes.dead_letters.push(dead_letter(
                    record,
                    maker,
                    DeadLetterReason::ActionFailed {
                        action: decision.action.clone(),
                        request_id: hex::encode(id),
                        sealed_decision: keys
                            .seal(&serde_json::to_vec(&sealed).expect("serializes")),
                        error,
                        http_status: status,
                        attempts,
                        retryable,
                        regulation: regulation(&decision).to_owned(),
                    },
                ));
            }
            Outcome::Interrupted => return Ok(Settled::No),
        }
        // A backend call happened: make its outcome durable before anything else.
        self.flush(pending, &record.shard_id).await?;
        Ok(Settled::Yes)
    }

    /// Retries one dead letter: a failed action is sent again; a record a rule failed on
    /// goes through the current rules again. On success the dead letter is resolved.
    pub async fn retry_dead_letter(
        &self,
        id: u64,
        letter: DeadLetter,
    ) -> Result<Retried, PipelineError> {
        let Sink::Live { state, keys } = &self.sink else {
            return Ok(Retried::Interrupted);
        };
        let (stream, shard_id): (Arc<str>, Arc<str>) = (
            letter.stream.as_str().into(),
            letter.shard_id.as_str().into(),
        );
        let record = Record {
            stream: stream.clone(),
            shard_id: shard_id.clone(),
            sequence_number: letter.sequence_number.as_str().into(),
            sub_sequence_number: letter.sub_sequence_number,
            partition_key: "".into(),
            arrival_time: letter.arrival_time.as_str().into(),
            bytes: Default::default(),
        };
        let mut pending = Pending::default();
        let result = match &letter.reason {
            DeadLetterReason::ActionFailed {
                action,
                sealed_decision,
                regulation,
                ..
            } => {
                let sealed: SealedDecision = open(keys, id, sealed_decision)?;
                let decision = Decision {
                    action: action.clone(),
                    key: sealed.key,
                    params: sealed.params,
                    regulation: Some(regulation.clone()),
                };
                let rule_file = PathBuf::from(&letter.rule_file);
                let maker = Maker {
                    rule: &letter.rule,
                    rule_file: &rule_file,
                    rules_hash: &letter.rules_hash,
                };
                self.act(state, keys, &record, &maker, decision, &mut pending)
                    .await?
            }
            DeadLetterReason::RuleFailed { sealed_record, .. } => {
                let sealed: SealedRecord = open(keys, id, sealed_record)?;
                let record = Record {
                    partition_key: sealed.partition_key.into(),
                    bytes: hex::decode(sealed.payload_hex).unwrap_or_default().into(),
                    ..record
                };
                self.handle(&record, &mut pending).await?
            }
            DeadLetterReason::DecodeFailed { sealed_record, .. } => {
                let sealed: SealedRecord = open(keys, id, sealed_record)?;
                let raw = RawRecord {
                    sequence_number: letter.sequence_number.as_str().into(),
                    partition_key: sealed.partition_key,
                    arrival_time_millis: 0,
                    data: hex::decode(sealed.payload_hex).unwrap_or_default(),
                };
                match decode::decode(&stream, &shard_id, raw) {
                    Ok(records) => {
                        let mut settled = Settled::Yes;
                        for record in records {
                            let record = Record {
                                arrival_time: letter.arrival_time.as_str().into(),
                                ..record
                            };
                            if let Settled::No = self.handle(&record, &mut pending).await? {
                                settled = Settled::No;
                                break;
                            }
                        }
                        settled
                    }
                    Err(undecodable) => return Ok(Retried::StillFailing(undecodable.error.reason)),
                }
            }
        };
        if let Settled::No = result {
            return Ok(Retried::Interrupted);
        }
        // The retry failed again if it left a new dead letter: that one replaces this one.
        let failed_again = pending.writes.dead_letters.len();
        let outcome = match failed_again {
            0 => Retried::Resolved,
            _ => Retried::StillFailing(match &pending.writes.dead_letters[0].reason {
                DeadLetterReason::ActionFailed { error, .. } => error.clone(),
                DeadLetterReason::RuleFailed { error, .. }
                | DeadLetterReason::DecodeFailed { error, .. } => error.clone(),
            }),
        };
        // The replacement was already committed by `act` for action failures; resolve
        // the old letter (and commit a rule failure's replacement) now.
        pending.writes.resolved_dead_letters.push(id);
        pending.report_rule_counts(&self.telemetry);
        self.flush(&mut pending, &letter.shard_id).await?;
        Ok(outcome)
    }
}

/// Opens what a dead letter keeps sealed.
fn open<T: serde::de::DeserializeOwned>(
    keys: &Keys,
    id: u64,
    sealed: &str,
) -> Result<T, PipelineError> {
    let bytes = keys
        .unseal(sealed)
        .map_err(|source| PipelineError::Unseal { id, source })?;
    serde_json::from_slice(&bytes).map_err(|_| PipelineError::Unseal {
        id,
        source: KeyError::Unseal,
    })
}

fn state_error(record: &Record, source: StateError) -> PipelineError {
    PipelineError::State {
        shard_id: record.shard_id.to_string(),
        sequence_number: record.sequence_number.to_string(),
        source,
    }
}

fn regulation(decision: &Decision) -> &str {
    decision.regulation.as_deref().unwrap_or("GDPR")
}

/// The due date a regulation sets, counted from the record's arrival: one month (30 days)
/// for GDPR (Art. 12(3)), 45 days for CCPA.
pub fn due_date(arrival_time: &str, regulation: &str) -> String {
    let days = if regulation == "CCPA" { 45 } else { 30 };
    let arrival = aws_smithy_types::DateTime::from_str(
        arrival_time,
        aws_smithy_types::date_time::Format::DateTime,
    )
    .ok()
    .and_then(|t| t.to_millis().ok())
    .unwrap_or_else(|| now_ms() as i64);
    crate::clock::rfc3339(arrival + days * 24 * 3600 * 1000)
}

fn audit_entry(
    record: &Record,
    maker: &Maker,
    decision: &Decision,
    id: &[u8; 32],
    outcome: &str,
    http_status: Option<u16>,
    attempts: u32,
) -> AuditEntry {
    let regulation = regulation(decision);
    AuditEntry {
        time_ms: now_ms(),
        rule: maker.rule.to_owned(),
        rules_hash: maker.rules_hash.to_owned(),
        action: decision.action.clone(),
        request_id: hex::encode(id),
        outcome: outcome.to_owned(),
        http_status,
        attempts,
        arrival_time: record.arrival_time.to_string(),
        regulation: regulation.to_owned(),
        due_date: due_date(&record.arrival_time, regulation),
        note: None,
    }
}

fn dead_letter(record: &Record, maker: &Maker, reason: DeadLetterReason) -> DeadLetter {
    DeadLetter {
        created_at_ms: now_ms(),
        stream: record.stream.to_string(),
        shard_id: record.shard_id.to_string(),
        sequence_number: record.sequence_number.to_string(),
        sub_sequence_number: record.sub_sequence_number,
        arrival_time: record.arrival_time.to_string(),
        rule: maker.rule.to_owned(),
        rule_file: maker.rule_file.display().to_string(),
        rules_hash: maker.rules_hash.to_owned(),
        reason,
    }
}

/// The rule behind a decision, its file, and the rule set it belonged to (kept with every
/// outcome).
struct Maker<'a> {
    rule: &'a str,
    rule_file: &'a Path,
    rules_hash: &'a str,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_claimed_request_waits_for_its_holder() {
        let claims = Arc::new(super::Claims::default());
        let first = claims.claim([1; 32]).await;
        let other = claims.claim([2; 32]).await; // another request is not held up
        drop(other);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let waiter = {
            let claims = claims.clone();
            tokio::spawn(async move {
                let _second = claims.claim([1; 32]).await;
                let _ = tx.send(());
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "the second claim must wait");
        drop(first);
        waiter.await.unwrap();
        assert!(
            claims.0.lock().unwrap().is_empty(),
            "released claims are forgotten"
        );
    }

    #[test]
    fn due_dates_follow_the_regulation() {
        assert_eq!(
            super::due_date("2026-01-01T00:00:00Z", "GDPR"),
            "2026-01-31T00:00:00Z"
        );
        assert_eq!(
            super::due_date("2026-01-01T00:00:00Z", "CCPA"),
            "2026-02-15T00:00:00Z"
        );
    }
}
