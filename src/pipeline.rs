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
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::actions::{ActionSet, Outcome, Poll, PreparedRequest};
use crate::decode::{self, DecodeError, Record, Undecodable, Unreadable};
use crate::dedup::{self, Claim, Claims};
use crate::keys::{KeyError, Keys};
use crate::preview::Preview;
use crate::requests::{ActionStatus, Arrival, Change, Request};
use crate::rules::reload::Rules;
use crate::rules::{Decision, Rule, RuleError, RuleSet, Verdict};
use crate::shutdown::Shutdown;
use crate::source::{Batch, Checkpoint, Position, RawRecord, ShardReader, SourceError};
use crate::state::{
    held_index_key, job_index_key, record_index_key, request_index_key, AuditEntry, ClaimOutcome,
    DeadLetter, DeadLetterReason, Held, Job, Origin, Pause, State, StateError, Writes,
    DEAD_LETTER_PAGE,
};

/// How often a fleet's worker asks again about a request another worker is sending.
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
use crate::supervisor::ShardExit;
use crate::telemetry::{ActionOutcome, Telemetry, UnreadableOutcome};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("shard {shard_id} at sequence number {sequence_number}")]
    State {
        shard_id: String,
        sequence_number: String,
        source: StateError,
    },
    #[error("held requests")]
    Held(#[source] StateError),
    #[error("jobs")]
    Jobs(#[source] StateError),
    #[error("dead letter {id}")]
    Unseal { id: u64, source: KeyError },
}

impl PipelineError {
    /// A fleet's worker lost the shard's lease: another worker reads it now.
    pub fn is_lease_lost(&self) -> bool {
        matches!(
            self,
            PipelineError::State {
                source: StateError::LeaseLost { .. },
                ..
            }
        )
    }
}

/// Where decisions go: the backend and the state, or the dry-run preview.
pub enum Sink {
    Live { state: Arc<State>, keys: Keys },
    Preview(Box<Preview>),
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
    /// Held requests are released by one caller at a time (a resume, the housekeeping
    /// round): two at once would each count the other's sends as duplicates.
    pub release_lock: tokio::sync::Mutex<()>,
    /// Dead letters being retried now: an operator's discard waits until the retry is over
    /// (else the trail could say both that a request was given up and that it was done).
    pub letters_in_retry: std::sync::Mutex<HashSet<u64>>,
}

/// Marks a dead letter as being retried while it lives.
struct InRetry<'a>(&'a std::sync::Mutex<HashSet<u64>>, u64);

impl<'a> InRetry<'a> {
    fn new(letters: &'a std::sync::Mutex<HashSet<u64>>, id: u64) -> Self {
        letters.lock().unwrap().insert(id);
        InRetry(letters, id)
    }
}

impl Drop for InRetry<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap().remove(&self.1);
    }
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
    /// The dead letter being retried. Whatever fails during its retry (a rule, a request,
    /// the record's reading) makes no new letter: the first error goes to `failed_again`,
    /// and the retried letter stays, with its id, contents and age.
    retrying: Option<u64>,
    failed_again: Option<String>,
    /// The held request being sent (its own hold is not a duplicate).
    releasing: Option<u64>,
    /// Who asked for what this batch does (an operator's retry), for its audit entries.
    by: Option<String>,
    /// The shard's own stop (a fleet's worker losing the lease stops retrying a call for
    /// it, as shutdown does); none outside a shard's worker.
    stop: Option<Shutdown>,
    /// The requests (by key) the record being settled decided on, as read once before its
    /// decisions are carried out: each is read once per record, not once per decision.
    requests_read: std::collections::HashMap<String, (String, Option<Request>)>,
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

/// What a waiting job keeps sealed: the decision (its params fill the status URL) and the
/// backend's job id.
#[derive(Serialize, Deserialize)]
struct SealedJob {
    key: String,
    params: serde_json::Map<String, serde_json::Value>,
    job_id: String,
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
    /// Every shard's checkpoint (in dry-run, those it keeps in memory).
    pub fn checkpoints(&self) -> Result<std::collections::HashMap<String, Checkpoint>, StateError> {
        match &self.sink {
            Sink::Live { state, .. } => Ok(state.checkpoints()?.into_iter().collect()),
            Sink::Preview(preview) => Ok(preview.checkpoints()),
        }
    }

    /// Commits the gathered writes (in dry-run, keeps the checkpoints in memory).
    async fn flush(&self, pending: &mut Pending, shard_id: &str) -> Result<(), PipelineError> {
        let mut writes = std::mem::take(&mut pending.writes);
        for entry in &mut writes.audit {
            entry.by = entry.by.take().or_else(|| pending.by.clone());
        }
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
                let wrote = !writes.is_empty();
                if let Err(source) = state.commit_shared(writes).await {
                    self.telemetry.state_write(Some(&source));
                    return Err(PipelineError::State {
                        shard_id: shard_id.to_owned(),
                        sequence_number,
                        source,
                    });
                }
                // Only a write says the state can be written again (nothing to commit
                // touches no file).
                if wrote {
                    self.telemetry.state_write(None);
                }
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
        stop: Shutdown,
    ) -> Result<ShardExit, PipelineError> {
        let mut progress = ShardProgress::new(&self.stream, shard_id, start);
        progress.pending.stop = Some(stop.clone());
        let mut caught_up = false;
        let mut first = true;
        loop {
            let Some(batch) = reader.next(&stop).await? else {
                return Ok(ShardExit::Stopped);
            };
            if first {
                // Read again after a failure: the shard works.
                self.telemetry.shard_recovered(shard_id);
                first = false;
            }
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
            .records_read(shard_id, batch.records.len(), bytes, batch.read_mode);
        for reason in &batch.subscribed {
            self.telemetry.subscription_started(shard_id, reason);
        }
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
        if let Some(error) = &record.unreadable {
            // One event of an aggregate that cannot be read: a letter of its own.
            self.telemetry.undecodable_record(
                &record.shard_id,
                &record.sequence_number,
                record.sub_sequence_number,
                error.kind.as_str(),
                UnreadableOutcome::DeadLettered,
            );
            self.dead_letter_unreadable(record, DecodeError::clone(error), pending);
            return None;
        }
        let rules = self.rules.load();
        if let Sink::Preview(preview) = &self.sink {
            preview.evaluate(&rules, Some(&self.actions), record);
            if preview.output_stopped() {
                self.shutdown.trigger();
            }
            return None;
        }
        let run = rules.run(record);
        if let Some(fault) = run.fault {
            // A record no rule would see is only counted; one a rule would see but that
            // cannot be read is never "not a request": JSON too deep for the parser, or
            // JSON that does not parse but holds a rule's prefilter literal (a truncated
            // request, say; text lines that merely start with `[` reach rules without a
            // prefilter as text).
            let seen = !run.verdicts.is_empty();
            let prefiltered = run
                .verdicts
                .iter()
                .any(|(index, _)| rules.rules()[*index].has_prefilter());
            let dead_letter = match fault {
                Unreadable::JsonTooDeep => seen,
                Unreadable::JsonInvalid => prefiltered,
                _ => false,
            };
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
                    reason: match fault {
                        Unreadable::JsonTooDeep => "its JSON nests too deep to be parsed",
                        _ => "it looks like JSON and holds a rule's prefilter literal, but does not parse",
                    }
                    .into(),
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
        pending.requests_read.clear();
        // Every action decided for a request is registered before any is sent: a request
        // is complete only when all of them are done.
        for (index, verdict) in &outcome.verdicts {
            let Verdict::Decided(decisions) = verdict else {
                continue;
            };
            let origin = origin(record, rules, &rules.rules()[*index]);
            for decision in decisions.iter() {
                let id = match pending.requests_read.get(&decision.key) {
                    Some((id, _)) => id.clone(),
                    None => {
                        let found = self.find_request(state, keys, &decision.key, record)?;
                        let id = found.0.clone();
                        pending.requests_read.insert(decision.key.clone(), found);
                        id
                    }
                };
                pending.writes.requests.push((
                    id,
                    Change::Decided {
                        arrival: arrival(&origin, decision),
                        action: decision.action.clone(),
                    },
                ));
            }
        }
        for (index, verdict) in outcome.verdicts {
            let rule = &rules.rules()[index];
            let origin = origin(record, rules, rule);
            let decisions = match verdict {
                Verdict::Skipped => continue,
                Verdict::Failed(error) => {
                    self.rule_failed(state, keys, &origin, error, pending);
                    continue;
                }
                Verdict::Decided(decisions) => decisions,
            };
            pending.count(rules, index, !decisions.is_empty(), &self.telemetry);
            for decision in decisions {
                let settled = self.act(state, keys, &origin, decision, pending).await?;
                if let Settled::No = settled {
                    return Ok(Settled::No);
                }
            }
        }
        pending.requests_read.clear();
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
        let Sink::Live { state, keys } = &self.sink else {
            return;
        };
        let sealed = SealedRecord {
            partition_key: record.partition_key.to_string(),
            payload_hex: hex::encode(&record.bytes),
            error: error.to_string(),
        };
        let rules = self.rules.load();
        let origin = Origin {
            record,
            rule: "",
            rule_file: Path::new(""),
            rules_hash: rules.hash(),
        };
        let reason = DeadLetterReason::DecodeFailed {
            error: error.reason.clone(),
            sealed_record: String::new(),
        };
        self.new_letter(state, keys, &origin, &sealed, reason, pending);
    }

    /// A rule failed on the record: never "no match". The record is dead-lettered, sealed.
    fn rule_failed(
        &self,
        state: &State,
        keys: &Keys,
        origin: &Origin,
        error: RuleError,
        pending: &mut Pending,
    ) {
        let record = origin.record;
        let summary = error.log_summary();
        self.telemetry.rule_failed(
            &record.shard_id,
            &record.sequence_number,
            origin.rule,
            &summary,
        );
        let sealed = SealedRecord {
            partition_key: record.partition_key.to_string(),
            payload_hex: hex::encode(&record.bytes),
            error: error.to_string(),
        };
        let reason = DeadLetterReason::RuleFailed {
            error: summary,
            sealed_record: String::new(),
        };
        self.new_letter(state, keys, origin, &sealed, reason, pending);
    }

    /// Adds a dead letter for a record to the pending writes, unless a pending letter holds
    /// the same record and rule already (a record read again after a checkpoint reset).
    fn new_letter(
        &self,
        state: &State,
        keys: &Keys,
        origin: &Origin,
        sealed: &SealedRecord,
        reason: DeadLetterReason,
        pending: &mut Pending,
    ) {
        // A retry that fails again makes no letter: the retried one stays (see
        // `Pending::retrying`).
        if pending.retrying.is_some() {
            pending
                .failed_again
                .get_or_insert_with(|| reason.error().to_owned());
            return;
        }
        let record = origin.record;
        let index_key = record_index_key(
            &record.shard_id,
            &record.sequence_number,
            record.sub_sequence_number,
            origin.rule,
        );
        match state.pending_letter(&index_key) {
            Ok(Some(id)) => {
                self.telemetry
                    .already_dead_lettered(&record.shard_id, &record.sequence_number, id);
                return;
            }
            Ok(None) => {}
            // Two letters for one record are better than none.
            Err(e) => {
                tracing::warn!(error = %crate::telemetry::chain(&e), "cannot read the dead letter index")
            }
        }
        let id = state.new_dead_letter_id();
        let mut letter = DeadLetter::new(origin, reason);
        let context = DeadLetter::seal_context(id, letter.reason.kind());
        *letter.reason.sealed_mut() =
            keys.seal(&serde_json::to_vec(sealed).expect("serializes"), &context);
        pending.writes.dead_letters.push((id, letter));
    }

    /// Carries out one decision of a record read from a shard: dedup, then the backend
    /// call, then the state. A decision that cannot become a request dead-letters the
    /// record (the rule's fault); a request the backend does not take becomes a letter.
    async fn act(
        &self,
        state: &State,
        keys: &Keys,
        origin: &Origin<'_>,
        decision: Decision,
        pending: &mut Pending,
    ) -> Result<Settled, PipelineError> {
        let record = origin.record;
        let (request_key, recorded) = match pending.requests_read.get(&decision.key) {
            Some(read) => read.clone(),
            None => self.find_request(state, keys, &decision.key, record)?,
        };
        let request = match self.actions.prepare(&decision) {
            Ok(request) => request,
            Err(e) => {
                // The rule's fault: its record is dead-lettered, and the request is not
                // complete while this action waits there.
                let letters = pending.writes.dead_letters.len();
                let error = RuleError::Unsendable {
                    rule: origin.rule.to_owned(),
                    file: origin.rule_file.to_owned(),
                    reason: e.to_string(),
                };
                self.rule_failed(state, keys, origin, error, pending);
                let mut change = action_change(origin, &decision, ActionStatus::Failed, 0, None);
                if let Change::Action {
                    dead_letter, error, ..
                } = &mut change
                {
                    *dead_letter = pending.writes.dead_letters.get(letters).map(|(id, _)| *id);
                    *error = Some(format!("the request cannot be built: {e}"));
                }
                pending.writes.requests.push((request_key, change));
                return Ok(Settled::Yes);
            }
        };
        let (carried, _claim) = self
            .carry_out(origin, &decision, &request, recorded.as_ref(), pending)
            .await?;
        let id = keys.request_id(&decision.action, &decision.key);
        let request_id = hex::encode(id);
        let regulation = regulation(&decision);
        let audit = |outcome: ActionOutcome| AuditEntry {
            request: Some(request_key.clone()),
            ..AuditEntry::new(
                origin,
                &decision.action,
                &request_id,
                outcome.as_str(),
                regulation,
            )
        };
        let change = |status, attempts, http_status| {
            action_change(origin, &decision, status, attempts, http_status)
        };
        let let_go = matches!(
            carried,
            Carried::Sent(Outcome::Failed { .. } | Outcome::Interrupted | Outcome::Accepted { .. })
        );
        match carried {
            Carried::Sent(Outcome::Interrupted) => {
                self.let_go(id, record).await?;
                return Ok(Settled::No);
            }
            Carried::Paused { pause, legal } => {
                // Held durably: settled for the checkpoint, sent when released.
                let held_id = state.new_held_id();
                let sealed = SealedDecision {
                    key: decision.key.clone(),
                    params: decision.params.clone(),
                };
                pending.writes.held.push((
                    held_id,
                    Held {
                        action: decision.action.clone(),
                        request_id: request_id.clone(),
                        sealed_decision: keys.seal(
                            &serde_json::to_vec(&sealed).expect("serializes"),
                            &Held::seal_context(held_id),
                        ),
                        regulation: regulation.to_owned(),
                        held_at_ms: crate::clock::now_ms(),
                        stream: record.stream.to_string(),
                        shard_id: record.shard_id.to_string(),
                        sequence_number: record.sequence_number.to_string(),
                        sub_sequence_number: record.sub_sequence_number,
                        arrival_time: record.arrival_time.to_string(),
                        rule: origin.rule.to_owned(),
                        rule_file: origin.rule_file.display().to_string(),
                        rules_hash: origin.rules_hash.to_owned(),
                        legal_hold: legal,
                    },
                ));
                self.report(ActionOutcome::Held, origin, &decision.action, 0, None);
                let note = match legal {
                    true => format!("request on legal hold: {}", pause.reason),
                    false => format!("action paused: {}", pause.reason),
                };
                pending.writes.audit.push(AuditEntry {
                    note: Some(note),
                    ..audit(ActionOutcome::Held)
                });
                pending
                    .writes
                    .requests
                    .push((request_key.clone(), change(ActionStatus::Held, 0, None)));
                return Ok(Settled::Yes);
            }
            Carried::Duplicate(holder) => {
                let letter = match holder {
                    Holder::Letter(letter) => Some(letter),
                    _ => None,
                };
                pending.writes.audit.push(AuditEntry {
                    dead_letter: letter,
                    ..audit(ActionOutcome::Duplicate)
                });
                let status = match holder {
                    Holder::Done => ActionStatus::Done,
                    Holder::Letter(_) => ActionStatus::Failed,
                    Holder::Held => ActionStatus::Held,
                    Holder::Job => ActionStatus::Waiting,
                };
                let mut change = change(status, 0, None);
                if let Change::Action { dead_letter, .. } = &mut change {
                    *dead_letter = letter;
                }
                pending.writes.requests.push((request_key.clone(), change));
                return Ok(Settled::Yes);
            }
            Carried::Denied(code) => {
                self.report(ActionOutcome::Denied, origin, &decision.action, 0, None);
                pending.writes.audit.push(AuditEntry {
                    note: Some("not sent: the request was denied".into()),
                    denial_code: Some(code),
                    ..audit(ActionOutcome::Denied)
                });
                pending
                    .writes
                    .requests
                    .push((request_key.clone(), change(ActionStatus::Denied, 0, None)));
                return Ok(Settled::Yes);
            }
            Carried::Sent(Outcome::Done { status, attempts }) => {
                pending.done.insert(id);
                pending.writes.done.push(id);
                pending.writes.audit.push(AuditEntry {
                    http_status: Some(status),
                    attempts,
                    ..audit(ActionOutcome::Done)
                });
                pending.writes.requests.push((
                    request_key.clone(),
                    change(ActionStatus::Done, attempts, Some(status)),
                ));
            }
            Carried::Sent(Outcome::Accepted {
                status,
                attempts,
                job_id,
            }) => {
                self.new_job(
                    state,
                    keys,
                    origin,
                    &decision,
                    &request_key,
                    (status, attempts, job_id),
                    pending,
                );
            }
            Carried::Sent(Outcome::Failed { error, status, .. }) if pending.retrying.is_some() => {
                let error = with_status(error, status);
                pending.failed_again.get_or_insert(error);
            }
            Carried::Sent(Outcome::Failed {
                error,
                status,
                attempts,
                retryable,
            }) => {
                let letter_id = self.new_action_letter(
                    state,
                    keys,
                    origin,
                    &decision,
                    (error.clone(), status, attempts, retryable),
                    pending,
                );
                pending.writes.audit.push(AuditEntry {
                    http_status: status,
                    attempts,
                    dead_letter: Some(letter_id),
                    ..audit(ActionOutcome::DeadLettered)
                });
                let mut change = change(ActionStatus::Failed, attempts, status);
                if let Change::Action {
                    dead_letter,
                    error: why,
                    ..
                } = &mut change
                {
                    *dead_letter = Some(letter_id);
                    *why = Some(with_status(error, status));
                }
                pending.writes.requests.push((request_key.clone(), change));
            }
        }
        // A backend call happened: make its outcome durable before anything else (and
        // before the claim is let go).
        self.flush(pending, &record.shard_id).await?;
        if let_go {
            self.let_go(id, record).await?;
        }
        Ok(Settled::Yes)
    }

    /// Counts and logs what became of a decision.
    fn report(
        &self,
        outcome: ActionOutcome,
        origin: &Origin<'_>,
        action: &str,
        attempts: u32,
        error: Option<&str>,
    ) {
        self.telemetry.action(
            outcome,
            &origin.record.shard_id,
            &origin.record.sequence_number,
            origin.rule,
            origin.rules_hash,
            action,
            attempts,
            None,
            error,
        );
    }

    /// A new `action_failed` dead letter for a decision the backend did not take (its
    /// decision sealed); returns its id.
    fn new_action_letter(
        &self,
        state: &State,
        keys: &Keys,
        origin: &Origin<'_>,
        decision: &Decision,
        (error, status, attempts, retryable): (String, Option<u16>, u32, bool),
        pending: &mut Pending,
    ) -> u64 {
        let letter_id = state.new_dead_letter_id();
        let sealed = SealedDecision {
            key: decision.key.clone(),
            params: decision.params.clone(),
        };
        let mut letter = DeadLetter::new(
            origin,
            DeadLetterReason::ActionFailed {
                action: decision.action.clone(),
                request_id: hex::encode(keys.request_id(&decision.action, &decision.key)),
                sealed_decision: String::new(),
                error,
                http_status: status,
                attempts,
                retryable,
                regulation: regulation(decision).to_owned(),
            },
        );
        let context = DeadLetter::seal_context(letter_id, letter.reason.kind());
        *letter.reason.sealed_mut() =
            keys.seal(&serde_json::to_vec(&sealed).expect("serializes"), &context);
        pending.writes.dead_letters.push((letter_id, letter));
        letter_id
    }

    /// The backend took a request as a job: it waits, durably, polled until it finishes
    /// (the shard moves on; the job holds the request as a dead letter would).
    #[allow(clippy::too_many_arguments)]
    fn new_job(
        &self,
        state: &State,
        keys: &Keys,
        origin: &Origin<'_>,
        decision: &Decision,
        request_key: &str,
        (status, attempts, job_id): (u16, u32, String),
        pending: &mut Pending,
    ) {
        let now = crate::clock::now_ms();
        let (poll, give_up) = self
            .actions
            .completion(&decision.action)
            .map(|c| (c.poll_interval, c.give_up_after))
            .unwrap_or_default();
        let id = state.new_job_id();
        let sealed = SealedJob {
            key: decision.key.clone(),
            params: decision.params.clone(),
            job_id: job_id.clone(),
        };
        let record = origin.record;
        let request_id = hex::encode(keys.request_id(&decision.action, &decision.key));
        pending.writes.jobs.push((
            id,
            Job {
                action: decision.action.clone(),
                request_id: request_id.clone(),
                request: request_key.to_owned(),
                sealed: keys.seal(
                    &serde_json::to_vec(&sealed).expect("serializes"),
                    &Job::seal_context(id),
                ),
                regulation: regulation(decision).to_owned(),
                submitted_at_ms: now,
                next_poll_ms: now + poll.as_millis() as u64,
                give_up_at_ms: now + give_up.as_millis() as u64,
                polls: 0,
                last_status: None,
                attempts,
                http_status: Some(status),
                stream: record.stream.to_string(),
                shard_id: record.shard_id.to_string(),
                sequence_number: record.sequence_number.to_string(),
                sub_sequence_number: record.sub_sequence_number,
                arrival_time: record.arrival_time.to_string(),
                rule: origin.rule.to_owned(),
                rule_file: origin.rule_file.display().to_string(),
                rules_hash: origin.rules_hash.to_owned(),
            },
        ));
        pending.writes.audit.push(AuditEntry {
            http_status: Some(status),
            attempts,
            request: Some(request_key.to_owned()),
            note: Some(format!("job {id} polled until it finishes")),
            ..AuditEntry::new(
                origin,
                &decision.action,
                &request_id,
                ActionOutcome::Accepted.as_str(),
                regulation(decision),
            )
        });
        let mut change = action_change(
            origin,
            decision,
            ActionStatus::Waiting,
            attempts,
            Some(status),
        );
        if let Change::Action { sealed_job, .. } = &mut change {
            *sealed_job = Some(keys.seal(
                job_id.as_bytes(),
                &crate::requests::job_seal_context(request_key, &decision.action),
            ));
        }
        pending
            .writes
            .requests
            .push((request_key.to_owned(), change));
    }

    /// The request recorded for `key` (if any), and the keyed hash it is recorded under:
    /// the one found under any key of the ring, or the current key's for a new request.
    fn find_request(
        &self,
        state: &State,
        keys: &Keys,
        key: &str,
        record: &Record,
    ) -> Result<(String, Option<Request>), PipelineError> {
        let ids: Vec<String> = keys.request_key_ids(key).iter().map(hex::encode).collect();
        match state.request(&ids).map_err(|s| state_error(record, s))? {
            Some((id, request)) => Ok((id, Some(request))),
            None => Ok((ids[0].clone(), None)),
        }
    }

    /// Sends a request unless it was done already or a pending dead letter holds it. The
    /// claim returned must be held until the outcome is committed.
    async fn carry_out(
        &self,
        origin: &Origin<'_>,
        decision: &Decision,
        request: &PreparedRequest,
        recorded: Option<&Request>,
        pending: &Pending,
    ) -> Result<(Carried, Claim<'_>), PipelineError> {
        let Sink::Live { state, keys } = &self.sink else {
            unreachable!("only a live sink carries out requests");
        };
        let record = origin.record;
        let id = keys.request_id(&decision.action, &decision.key);
        let report = |outcome, attempts, took, error: Option<&str>| {
            self.telemetry.action(
                outcome,
                &record.shard_id,
                &record.sequence_number,
                origin.rule,
                origin.rules_hash,
                &decision.action,
                attempts,
                took,
                error,
            )
        };
        let claim = self.claims.claim(id).await;
        let done = dedup::is_done(state, keys, &pending.done, &decision.action, &decision.key)
            .map_err(|source| state_error(record, source))?;
        if done {
            report(ActionOutcome::Duplicate, 0, None, None);
            return Ok((Carried::Duplicate(Holder::Done), claim));
        }
        // A pending letter holds the request (under any key of the ring): it is settled
        // there, by its own retries.
        let mut held = None;
        for id in keys.request_ids(&decision.action, &decision.key) {
            held = held.or(state
                .pending_letter(&request_index_key(&hex::encode(id)))
                .map_err(|source| state_error(record, source))?);
        }
        if let Some(letter) = held.filter(|held| Some(*held) != pending.retrying) {
            report(ActionOutcome::Duplicate, 0, None, None);
            return Ok((Carried::Duplicate(Holder::Letter(letter)), claim));
        }
        // Held already for a paused action (read again after a checkpoint reset, say).
        let mut on_hold = None;
        for id in keys.request_ids(&decision.action, &decision.key) {
            on_hold = on_hold.or(state
                .pending_letter(&held_index_key(&hex::encode(id)))
                .map_err(|source| state_error(record, source))?);
        }
        if on_hold.is_some_and(|held| Some(held) != pending.releasing) {
            report(ActionOutcome::Duplicate, 0, None, None);
            return Ok((Carried::Duplicate(Holder::Held), claim));
        }
        // Accepted already as a job that has not finished: polled, not sent again.
        for id in keys.request_ids(&decision.action, &decision.key) {
            if state
                .pending_letter(&job_index_key(&hex::encode(id)))
                .map_err(|source| state_error(record, source))?
                .is_some()
            {
                report(ActionOutcome::Duplicate, 0, None, None);
                return Ok((Carried::Duplicate(Holder::Job), claim));
            }
        }
        // An operator denied the request: nothing is sent.
        if let Some(denial) = recorded.and_then(|r| r.denial.as_ref()) {
            return Ok((Carried::Denied(denial.code.clone()), claim));
        }
        // Paused, or resuming with held requests still ahead of this one: held (queued).
        // A held request being released under a resume goes out.
        if let Some(pause) = state
            .pause(&decision.action)
            .map_err(|source| state_error(record, source))?
            .filter(|pause| pause.resuming_since_ms.is_none() || pending.releasing.is_none())
        {
            return Ok((
                Carried::Paused {
                    pause,
                    legal: false,
                },
                claim,
            ));
        }
        // On legal hold: held until an operator releases it.
        if let Some(hold) = recorded.and_then(|r| r.hold.as_ref()) {
            let pause = Pause {
                reason: hold.reason.clone(),
                since_ms: hold.since_ms,
                resuming_since_ms: None,
            };
            return Ok((Carried::Paused { pause, legal: true }, claim));
        }
        // Never call the backend for a request whose outcome could not be recorded: after
        // a failed commit, a write must succeed first.
        if self.telemetry.state_fault().is_some() {
            match state.probe_write() {
                Ok(()) => self.telemetry.state_write(None),
                Err(source) => {
                    self.telemetry.state_write(Some(&source));
                    return Err(state_error(record, source));
                }
            }
        }
        if state.is_shared() {
            if let Some(carried) = self.claim_in_fleet(origin, decision, pending).await? {
                return Ok((carried, claim));
            }
        }
        let started = Instant::now();
        let stop = pending.stop.as_ref().unwrap_or(&self.shutdown);
        let outcome = self.actions.send(request, stop).await;
        match &outcome {
            Outcome::Accepted { attempts, .. } => report(
                ActionOutcome::Accepted,
                *attempts,
                Some(started.elapsed()),
                None,
            ),
            Outcome::Done { attempts, .. } => report(
                ActionOutcome::Done,
                *attempts,
                Some(started.elapsed()),
                None,
            ),
            Outcome::Failed {
                error, attempts, ..
            } => report(
                match pending.retrying {
                    Some(_) => ActionOutcome::StillFailing,
                    None => ActionOutcome::DeadLettered,
                },
                *attempts,
                Some(started.elapsed()),
                Some(error),
            ),
            Outcome::Interrupted => {}
        }
        let carried = Carried::Sent(outcome);
        Ok((carried, claim))
    }

    /// A fleet's worker claims the request in the shared state before sending it: the same
    /// request read by two workers (under two partition keys, or a shard changing hands) is
    /// sent by one; the other waits for its outcome and finds it done, or held by the dead
    /// letter it became. `None`: claimed, send it. A worker that lost the shard's lease
    /// sends nothing more for it.
    async fn claim_in_fleet(
        &self,
        origin: &Origin<'_>,
        decision: &Decision,
        pending: &Pending,
    ) -> Result<Option<Carried>, PipelineError> {
        let Sink::Live { state, keys } = &self.sink else {
            unreachable!("only a live sink carries out requests");
        };
        let record = origin.record;
        let id = keys.request_id(&decision.action, &decision.key);
        let duplicate = |letter| {
            self.telemetry.action(
                ActionOutcome::Duplicate,
                &record.shard_id,
                &record.sequence_number,
                origin.rule,
                origin.rules_hash,
                &decision.action,
                0,
                None,
                None,
            );
            Ok(Some(Carried::Duplicate(match letter {
                Some(letter) => Holder::Letter(letter),
                None => Holder::Done,
            })))
        };
        // A record read from a shard is sent only while this worker holds the shard's lease;
        // a dead letter's retry or a held request's release is no shard's.
        let from_shard = pending.retrying.is_none() && pending.releasing.is_none();
        loop {
            if from_shard && !state.holds_lease(&record.shard_id) {
                return Ok(Some(Carried::Sent(Outcome::Interrupted)));
            }
            let claimed = state
                .claim(id, &record.shard_id)
                .await
                .map_err(|source| state_error(record, source))?;
            match claimed {
                ClaimOutcome::Claimed => break,
                ClaimOutcome::TakenOver { from } => {
                    self.telemetry.claim_taken_over(&from);
                    break;
                }
                ClaimOutcome::Done => return duplicate(None),
                ClaimOutcome::Busy { .. } => {
                    let stop = pending.stop.as_ref().unwrap_or(&self.shutdown);
                    tokio::select! {
                        _ = tokio::time::sleep(CLAIM_WAIT) => {}
                        _ = stop.triggered() => {
                            return Ok(Some(Carried::Sent(Outcome::Interrupted)));
                        }
                    }
                }
            }
        }
        // The worker that held it may have let go after its call failed: the dead letter it
        // wrote first holds the request now.
        for other in keys.request_ids(&decision.action, &decision.key) {
            let letter = state
                .pending_letter(&request_index_key(&hex::encode(other)))
                .map_err(|source| state_error(record, source))?
                .filter(|letter| Some(*letter) != pending.retrying);
            if letter.is_some() {
                self.let_go(id, record).await?;
                return duplicate(letter);
            }
            // Or the job it started holds it.
            let job = state
                .pending_letter(&job_index_key(&hex::encode(other)))
                .map_err(|source| state_error(record, source))?;
            if job.is_some() {
                self.let_go(id, record).await?;
                self.report(ActionOutcome::Duplicate, origin, &decision.action, 0, None);
                return Ok(Some(Carried::Duplicate(Holder::Job)));
            }
        }
        Ok(None)
    }

    /// Lets go of a fleet's claim whose call did not end done (its dead letter, written
    /// first, holds the request; or it was interrupted). Done replaces the claim itself.
    async fn let_go(&self, id: [u8; 32], record: &Record) -> Result<(), PipelineError> {
        let Sink::Live { state, .. } = &self.sink else {
            return Ok(());
        };
        state
            .release_claim(id)
            .await
            .map_err(|source| state_error(record, source))
    }

    /// Retries one dead letter: a failed action is sent again; a record a rule failed on
    /// goes through that rule, as it is now, again; a record that could not be decoded is
    /// decoded and goes through every rule. Settled, the letter is resolved (and audited);
    /// failing again, it keeps its id, sealed contents and first-failure time, and counts
    /// the retry and its error: a retry never replaces a letter with one that holds less.
    /// `by` names the operator who asked, for the audit trail (none for a scheduled retry).
    pub async fn retry_dead_letter(
        &self,
        id: u64,
        mut letter: DeadLetter,
        by: Option<&str>,
    ) -> Result<Retried, PipelineError> {
        let Sink::Live { state, keys } = &self.sink else {
            return Ok(Retried::Interrupted);
        };
        let _in_retry = InRetry::new(&self.letters_in_retry, id);
        let record = stored_record(
            &letter.stream,
            &letter.shard_id,
            &letter.sequence_number,
            letter.sub_sequence_number,
            &letter.arrival_time,
        );
        let context = DeadLetter::seal_context(id, letter.reason.kind());
        let mut pending = Pending {
            retrying: Some(id),
            by: by.map(str::to_owned),
            ..Pending::default()
        };
        let outcome = match &letter.reason {
            DeadLetterReason::ActionFailed {
                action,
                sealed_decision,
                regulation,
                ..
            } => {
                let sealed: SealedDecision = open(keys, id, sealed_decision, &context)?;
                let decision = Decision {
                    action: action.clone(),
                    key: sealed.key,
                    params: sealed.params,
                    regulation: Some(regulation.clone()),
                };
                let rule_file = PathBuf::from(&letter.rule_file);
                let origin = Origin {
                    record: &record,
                    rule: &letter.rule,
                    rule_file: &rule_file,
                    rules_hash: &letter.rules_hash,
                };
                return self
                    .retry_action(keys, id, &letter, &origin, decision, by)
                    .await;
            }
            DeadLetterReason::RuleFailed { sealed_record, .. } => {
                let sealed: SealedRecord = open(keys, id, sealed_record, &context)?;
                let record = Record {
                    partition_key: sealed.partition_key.into(),
                    bytes: hex::decode(sealed.payload_hex).unwrap_or_default().into(),
                    ..record
                };
                self.retry_rule(state, keys, &letter, &record, &mut pending)
                    .await?
            }
            DeadLetterReason::DecodeFailed { sealed_record, .. } => {
                let sealed: SealedRecord = open(keys, id, sealed_record, &context)?;
                let raw = RawRecord {
                    sequence_number: letter.sequence_number.as_str().into(),
                    partition_key: sealed.partition_key,
                    arrival_time_millis: 0,
                    data: hex::decode(sealed.payload_hex).unwrap_or_default(),
                };
                match decode::decode(&record.stream, &record.shard_id, raw) {
                    Ok(records) => {
                        let mut outcome = Ok(format!(
                            "decoded into {} record(s), each through every rule",
                            records.len()
                        ));
                        for sub in records {
                            // A letter for one sub-record of an aggregate holds that
                            // sub-record alone: it keeps its place in the aggregate.
                            let sub = Record {
                                arrival_time: record.arrival_time.clone(),
                                sub_sequence_number: sub
                                    .sub_sequence_number
                                    .max(letter.sub_sequence_number),
                                ..sub
                            };
                            if let Settled::No = self.handle(&sub, &mut pending).await? {
                                outcome = Err(Retried::Interrupted);
                                break;
                            }
                        }
                        outcome
                    }
                    Err(undecodable) => Err(Retried::StillFailing(undecodable.error.reason)),
                }
            }
        };
        let outcome = match (outcome, pending.failed_again.take()) {
            (Ok(_), Some(error)) => Err(Retried::StillFailing(error)),
            (outcome, _) => outcome,
        };
        let retried = match outcome {
            Ok(note) => {
                pending.writes.resolved_dead_letters.push(id);
                pending
                    .writes
                    .audit
                    .push(AuditEntry::of_letter(id, &letter, "resolved", note));
                Retried::Resolved
            }
            Err(Retried::StillFailing(error)) => {
                letter.retried(error.clone());
                pending
                    .writes
                    .retried_dead_letters
                    .push((id, letter.clone()));
                Retried::StillFailing(error)
            }
            Err(other) => other,
        };
        pending.report_rule_counts(&self.telemetry);
        self.flush(&mut pending, &letter.shard_id).await?;
        Ok(retried)
    }

    /// Sends the held requests of actions no longer paused, in arrival order, the usual way
    /// (dedup, the action's limits, dead letters for what the backend does not take).
    /// Returns how many were settled; stops at shutdown.
    pub async fn release_held(&self) -> Result<usize, PipelineError> {
        let Sink::Live { state, keys } = &self.sink else {
            return Ok(0);
        };
        let _one_at_a_time = self.release_lock.lock().await;
        let (mut after, mut settled) = (0, 0);
        loop {
            let page = state
                .held_after(after, DEAD_LETTER_PAGE)
                .map_err(PipelineError::Held)?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (id, mut held) in page {
                if self.shutdown.is_triggered() {
                    return Ok(settled);
                }
                let record = stored_record(
                    &held.stream,
                    &held.shard_id,
                    &held.sequence_number,
                    held.sub_sequence_number,
                    &held.arrival_time,
                );
                let sealed: SealedDecision =
                    open(keys, id, &held.sealed_decision, &Held::seal_context(id))?;
                let decision = Decision {
                    action: held.action.clone(),
                    key: sealed.key,
                    params: sealed.params,
                    regulation: Some(held.regulation.clone()),
                };
                // On legal hold: stays held until an operator releases it (or denies it),
                // marked so, so that a paused action's resume does not wait for it.
                let (_, recorded) = self.find_request(state, keys, &decision.key, &record)?;
                let legal = recorded.is_some_and(|r| r.hold.is_some() && r.denial.is_none());
                if legal != held.legal_hold {
                    held.legal_hold = legal;
                    state
                        .commit_shared(Writes {
                            held: vec![(id, held.clone())],
                            ..Writes::default()
                        })
                        .await
                        .map_err(PipelineError::Held)?;
                }
                if legal {
                    continue;
                }
                if state
                    .pause(&held.action)
                    .map_err(PipelineError::Held)?
                    .is_some_and(|pause| pause.resuming_since_ms.is_none())
                {
                    continue;
                }
                // A request the config can no longer build stays held (never lost): said
                // so, and tried again at the next round.
                if let Err(e) = self.actions.prepare(&decision) {
                    self.telemetry
                        .held_unsendable(&held.action, id, &e.to_string());
                    continue;
                }
                let rule_file = PathBuf::from(&held.rule_file);
                let origin = Origin {
                    record: &record,
                    rule: &held.rule,
                    rule_file: &rule_file,
                    rules_hash: &held.rules_hash,
                };
                let mut pending = Pending {
                    releasing: Some(id),
                    ..Pending::default()
                };
                if let Settled::No = self
                    .act(state, keys, &origin, decision, &mut pending)
                    .await?
                {
                    return Ok(settled);
                }
                pending.writes.released.push(id);
                self.flush(&mut pending, &held.shard_id).await?;
                settled += 1;
            }
        }
        self.end_resumed_pauses(state).await?;
        Ok(settled)
    }

    /// Starts a poll of each job that is due and not being polled already (`in_poll`),
    /// each in its own task on `polls`, without waiting for any: one slow status URL holds
    /// up no other job. A job whose status is done marks its request done; failed, or past
    /// its give-up time, it becomes an `action_failed` dead letter that says so (retrying
    /// it submits the request again, with the same Idempotency-Key). Each job's state is
    /// written back, so polling resumes where it was after a restart.
    pub fn start_due_polls(
        self: &Arc<Self>,
        polls: &mut tokio::task::JoinSet<(u64, Result<bool, PipelineError>)>,
        in_poll: &mut HashSet<u64>,
    ) -> Result<(), PipelineError> {
        let Sink::Live { state, .. } = &self.sink else {
            return Ok(());
        };
        let mut after = 0;
        loop {
            let page = state
                .jobs_after(after, DEAD_LETTER_PAGE)
                .map_err(PipelineError::Jobs)?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (id, job) in page {
                let now = crate::clock::now_ms();
                if job.next_poll_ms > now || in_poll.contains(&id) || self.shutdown.is_triggered() {
                    continue;
                }
                // In a fleet, the worker whose write lands polls it this time; the take
                // outlasts the longest poll (the action's timeout, and a wait for a slot),
                // so no other worker polls it meanwhile. Its answer sets the next poll.
                let taken_until = now + self.actions.poll_budget(&job.action).as_millis() as u64;
                if !state
                    .take_job_poll(id, &job, taken_until)
                    .map_err(PipelineError::Jobs)?
                {
                    continue;
                }
                in_poll.insert(id);
                let pipeline = self.clone();
                polls.spawn(async move { (id, pipeline.poll_job(id, job, taken_until).await) });
            }
        }
        Ok(())
    }

    /// Polls one job once and records what it said. `true`: it finished (done, or a dead
    /// letter). A request denied meanwhile ends its job: nothing more is asked.
    async fn poll_job(
        &self,
        id: u64,
        mut job: Job,
        taken_until: u64,
    ) -> Result<bool, PipelineError> {
        let Sink::Live { state, keys } = &self.sink else {
            return Ok(false);
        };
        let now = crate::clock::now_ms();
        let sealed: SealedJob = open(keys, id, &job.sealed, &Job::seal_context(id))?;
        let decision = Decision {
            action: job.action.clone(),
            key: sealed.key,
            params: sealed.params,
            regulation: Some(job.regulation.clone()),
        };
        let denied = state
            .request(std::slice::from_ref(&job.request))
            .map_err(PipelineError::Jobs)?
            .and_then(|(_, request)| request.denial)
            .map(|denial| denial.code);
        // A poll asks and changes nothing: cut short at shutdown, it is asked after the
        // restart.
        let poll = match &denied {
            Some(_) => None,
            None => {
                // Bounded, so that it ends before its take does (see `poll_budget`).
                let limit = self.actions.poll_budget(&job.action) - Duration::from_secs(5);
                let poll = self.actions.poll(&decision, &sealed.job_id, &self.shutdown);
                Some(tokio::select! {
                    poll = tokio::time::timeout(limit, poll) => poll.unwrap_or_else(|_| {
                        Poll::Fault(format!("no answer within {} s", limit.as_secs()))
                    }),
                    _ = self.shutdown.triggered() => Poll::Interrupted,
                })
            }
        };
        job.polls += 1;
        let interval = self
            .actions
            .completion(&job.action)
            .map_or(60_000, |c| c.poll_interval.as_millis() as u64);
        // Asked again after its interval, or when it is due to be given up if sooner.
        job.next_poll_ms = (crate::clock::now_ms() + interval).min(job.give_up_at_ms);
        let record = stored_record(
            &job.stream,
            &job.shard_id,
            &job.sequence_number,
            job.sub_sequence_number,
            &job.arrival_time,
        );
        let rule_file = PathBuf::from(&job.rule_file);
        let origin = Origin {
            record: &record,
            rule: &job.rule,
            rule_file: &rule_file,
            rules_hash: &job.rules_hash,
        };
        let mut pending = Pending::default();
        let audit = |outcome: ActionOutcome| AuditEntry {
            request: Some(job.request.clone()),
            note: Some(format!("job {id}, {} poll(s)", job.polls)),
            ..AuditEntry::new(
                &origin,
                &job.action,
                &job.request_id,
                outcome.as_str(),
                &job.regulation,
            )
        };
        let failure = match poll {
            None => {
                pending.writes.jobs_finished.push(id);
                pending.writes.audit.push(AuditEntry {
                    note: Some(format!(
                        "job {id} no longer followed: the request was denied"
                    )),
                    denial_code: denied.clone(),
                    ..audit(ActionOutcome::Denied)
                });
                pending.writes.requests.push((
                    job.request.clone(),
                    action_change(&origin, &decision, ActionStatus::Denied, 0, None),
                ));
                None
            }
            Some(Poll::Interrupted) => return Ok(false),
            Some(Poll::Done(_)) => {
                let done: [u8; 32] = hex::decode(&job.request_id)
                    .ok()
                    .and_then(|id| id.try_into().ok())
                    .unwrap_or_else(|| keys.request_id(&job.action, &decision.key));
                pending.writes.done.push(done);
                pending.writes.jobs_finished.push(id);
                pending.writes.audit.push(audit(ActionOutcome::JobDone));
                pending.writes.requests.push((
                    job.request.clone(),
                    action_change(&origin, &decision, ActionStatus::Done, 0, None),
                ));
                self.report(
                    ActionOutcome::JobDone,
                    &origin,
                    &job.action,
                    job.attempts,
                    None,
                );
                None
            }
            Some(Poll::Failed(status)) => Some(format!(
                "the backend's job failed (status {status:?} after {} poll(s)); retrying submits the request again with the same Idempotency-Key",
                job.polls
            )),
            Some(Poll::Pending(status) | Poll::Fault(status)) if now >= job.give_up_at_ms => {
                Some(format!(
                    "gave up on the backend's job after {} s (last status: {status}); retrying submits the request again with the same Idempotency-Key",
                    now.saturating_sub(job.submitted_at_ms) / 1000
                ))
            }
            Some(poll @ (Poll::Pending(_) | Poll::Fault(_))) => {
                if let Poll::Fault(error) = &poll {
                    // Asked again at the next poll; said so, as a slow job is not.
                    self.telemetry.job_poll_failed(&job.action, id, error);
                }
                let (Poll::Pending(status) | Poll::Fault(status)) = poll else {
                    unreachable!()
                };
                job.last_status = Some(status);
                pending.writes.polled_jobs.push((id, job.clone(), taken_until));
                None
            }
        };
        if let Some(error) = failure {
            self.report(
                ActionOutcome::JobFailed,
                &origin,
                &job.action,
                job.attempts,
                Some(&error),
            );
            let letter_id = self.new_action_letter(
                state,
                keys,
                &origin,
                &decision,
                (error.clone(), job.http_status, job.attempts, false),
                &mut pending,
            );
            pending.writes.jobs_finished.push(id);
            pending.writes.audit.push(AuditEntry {
                dead_letter: Some(letter_id),
                ..audit(ActionOutcome::JobFailed)
            });
            let mut change = action_change(&origin, &decision, ActionStatus::Failed, 0, None);
            if let Change::Action {
                dead_letter,
                error: why,
                ..
            } = &mut change
            {
                *dead_letter = Some(letter_id);
                *why = Some(error);
            }
            pending.writes.requests.push((job.request.clone(), change));
        }
        let finished = !pending.writes.jobs_finished.is_empty();
        self.flush(&mut pending, &job.shard_id).await?;
        Ok(finished)
    }

    /// How long to wait between rounds of [`Pipeline::start_due_polls`]: the shortest
    /// poll interval of any action, at most a second (so a restart resumes promptly);
    /// five seconds when no action has a completion (jobs of an action that lost it are
    /// still asked, said to fail, and given up in time: never forgotten).
    pub fn job_round(&self) -> Duration {
        self.actions
            .names()
            .filter_map(|name| self.actions.completion(name))
            .map(|c| c.poll_interval.min(Duration::from_secs(1)))
            .min()
            .unwrap_or(Duration::from_secs(5))
    }

    /// A resumed action whose held requests are all sent is no longer paused: its new
    /// requests go out as they come.
    async fn end_resumed_pauses(&self, state: &Arc<State>) -> Result<(), PipelineError> {
        let held = state.held_counts().map_err(PipelineError::Held)?;
        let ended: Vec<(String, Option<crate::state::Pause>)> = state
            .pauses()
            .map_err(PipelineError::Held)?
            .into_iter()
            .filter(|(action, pause)| {
                pause.resuming_since_ms.is_some() && held.get(action).copied().unwrap_or(0) == 0
            })
            .map(|(action, _)| (action, None))
            .collect();
        if ended.is_empty() {
            return Ok(());
        }
        state
            .commit_shared(Writes {
                pauses: ended,
                ..Writes::default()
            })
            .await
            .map_err(PipelineError::Held)
    }

    /// Sends a failed action's request again, as the letter keeps it.
    async fn retry_action(
        &self,
        keys: &Keys,
        id: u64,
        letter: &DeadLetter,
        origin: &Origin<'_>,
        decision: Decision,
        by: Option<&str>,
    ) -> Result<Retried, PipelineError> {
        let mut letter = letter.clone();
        let mut pending = Pending {
            retrying: Some(id),
            by: by.map(str::to_owned),
            ..Pending::default()
        };
        let request = match self.actions.prepare(&decision) {
            Ok(request) => request,
            Err(e) => {
                let error = format!("cannot build the request: {e}");
                letter.retried(error.clone());
                pending
                    .writes
                    .retried_dead_letters
                    .push((id, letter.clone()));
                self.flush(&mut pending, &letter.shard_id).await?;
                return Ok(Retried::StillFailing(error));
            }
        };
        let Sink::Live { state, .. } = &self.sink else {
            return Ok(Retried::Interrupted);
        };
        let (request_key, recorded) =
            self.find_request(state, keys, &decision.key, origin.record)?;
        let (carried, _claim) = self
            .carry_out(origin, &decision, &request, recorded.as_ref(), &pending)
            .await?;
        let id_now = keys.request_id(&decision.action, &decision.key);
        let request_id = hex::encode(id_now);
        let let_go = matches!(
            carried,
            Carried::Sent(Outcome::Failed { .. } | Outcome::Accepted { .. })
        );
        let resolved = |pending: &mut Pending, note: &str| {
            pending.writes.resolved_dead_letters.push(id);
            pending
                .writes
                .audit
                .push(AuditEntry::of_letter(id, &letter, "resolved", note.into()));
        };
        let retried = match carried {
            Carried::Sent(Outcome::Interrupted) => {
                self.let_go(id_now, origin.record).await?;
                return Ok(Retried::Interrupted);
            }
            // Not sent, not a failure: the letter waits as it was.
            Carried::Paused { pause, legal } => {
                let why = match (legal, pause.resuming_since_ms) {
                    (true, _) => format!(
                        "its request is on legal hold ({}): release it to retry",
                        pause.reason
                    ),
                    (false, Some(_)) => format!(
                        "action {:?} is being resumed: its held requests go first; retry when they are sent",
                        decision.action
                    ),
                    (false, None) => format!(
                        "action {:?} is paused ({}): resume it to retry",
                        decision.action, pause.reason
                    ),
                };
                return Ok(Retried::StillFailing(why));
            }
            Carried::Duplicate(holder) => {
                resolved(&mut pending, "the request was done meanwhile");
                if let Holder::Done = holder {
                    pending.writes.requests.push((
                        request_key,
                        action_change(origin, &decision, ActionStatus::Done, 0, None),
                    ));
                }
                Retried::Resolved
            }
            Carried::Denied(_) => {
                resolved(&mut pending, "not sent: the request was denied");
                pending.writes.requests.push((
                    request_key,
                    action_change(origin, &decision, ActionStatus::Denied, 0, None),
                ));
                Retried::Resolved
            }
            Carried::Sent(Outcome::Done { status, attempts }) => {
                pending
                    .writes
                    .done
                    .push(keys.request_id(&decision.action, &decision.key));
                pending.writes.resolved_dead_letters.push(id);
                pending.writes.audit.push(AuditEntry {
                    http_status: Some(status),
                    attempts,
                    dead_letter: Some(id),
                    request: Some(request_key.clone()),
                    ..AuditEntry::new(
                        origin,
                        &decision.action,
                        &request_id,
                        ActionOutcome::Done.as_str(),
                        regulation(&decision),
                    )
                });
                pending.writes.requests.push((
                    request_key,
                    action_change(
                        origin,
                        &decision,
                        ActionStatus::Done,
                        attempts,
                        Some(status),
                    ),
                ));
                Retried::Resolved
            }
            Carried::Sent(Outcome::Accepted {
                status,
                attempts,
                job_id,
            }) => {
                resolved(
                    &mut pending,
                    "submitted again: the backend accepted it as a job",
                );
                self.new_job(
                    state,
                    keys,
                    origin,
                    &decision,
                    &request_key,
                    (status, attempts, job_id),
                    &mut pending,
                );
                Retried::Resolved
            }
            Carried::Sent(Outcome::Failed {
                error,
                status,
                retryable,
                attempts,
            }) => {
                let error = with_status(error, status);
                letter.retried(error.clone());
                if let DeadLetterReason::ActionFailed {
                    retryable: was_retryable,
                    ..
                } = &mut letter.reason
                {
                    // A refusal now waits for an operator; a fault is retried on schedule.
                    *was_retryable = retryable;
                }
                pending
                    .writes
                    .retried_dead_letters
                    .push((id, letter.clone()));
                let mut change =
                    action_change(origin, &decision, ActionStatus::Failed, attempts, status);
                if let Change::Action {
                    dead_letter,
                    error: why,
                    ..
                } = &mut change
                {
                    *dead_letter = Some(id);
                    *why = Some(error.clone());
                }
                pending.writes.requests.push((request_key, change));
                Retried::StillFailing(error)
            }
        };
        self.flush(&mut pending, &letter.shard_id).await?;
        if let_go {
            self.let_go(id_now, origin.record).await?;
        }
        Ok(retried)
    }

    /// Runs the rule that failed on a record, as it is now, on the record again. `Ok`: the
    /// letter is settled (with a note for the audit trail); decisions are carried out as
    /// if the record were read now.
    async fn retry_rule(
        &self,
        state: &State,
        keys: &Keys,
        letter: &DeadLetter,
        record: &Record,
        pending: &mut Pending,
    ) -> Result<Result<String, Retried>, PipelineError> {
        let rules = arc_swap::Guard::into_inner(self.rules.load());
        let Some(index) = rules.rules().iter().position(|r| r.name == letter.rule) else {
            return Ok(Err(Retried::StillFailing(format!(
                "rule {:?} is no longer in the rules directory; discard the letter if that is right",
                letter.rule
            ))));
        };
        let rule = &rules.rules()[index];
        let origin = origin(record, &rules, rule);
        let decisions = match rules.evaluate_rule(index, record) {
            Verdict::Skipped => Vec::new(),
            Verdict::Decided(decisions) => decisions,
            Verdict::Failed(error) => {
                return Ok(Err(Retried::StillFailing(error.log_summary())));
            }
        };
        // Every decision must become a request before any is sent: a rule that now
        // decides what the config cannot carry out keeps its letter.
        for decision in &decisions {
            if let Err(e) = self.actions.prepare(decision) {
                return Ok(Err(Retried::StillFailing(format!(
                    "{}: rule {:?} returned an invalid decision: {e}",
                    rule.path.display(),
                    rule.name
                ))));
            }
        }
        let count = decisions.len();
        for decision in decisions {
            if let Settled::No = self.act(state, keys, &origin, decision, pending).await? {
                return Ok(Err(Retried::Interrupted));
            }
        }
        Ok(Ok(match count {
            0 => format!("rule {:?} now decides nothing for the record", rule.name),
            n => format!(
                "rule {:?} now decides {n} request(s), each audited",
                rule.name
            ),
        }))
    }
}

/// Where a decision of `rule` on `record` comes from.
fn origin<'a>(record: &'a Record, rules: &'a RuleSet, rule: &'a Rule) -> Origin<'a> {
    Origin {
        record,
        rule: &rule.name,
        rule_file: &rule.path,
        rules_hash: rules.hash(),
    }
}

/// How one decision's request ended.
enum Carried {
    /// Sent to the backend: how it ended.
    Sent(Outcome),
    /// Not sent again: something holds the request already.
    Duplicate(Holder),
    /// Its action is paused, or (`legal`) its request is on legal hold: held, not sent.
    Paused { pause: Pause, legal: bool },
    /// An operator denied its request (the reason code): not sent.
    Denied(String),
}

/// What holds a request that is not sent again.
#[derive(Debug, Clone, Copy)]
enum Holder {
    /// The ledger: done.
    Done,
    /// A pending dead letter (its id).
    Letter(u64),
    /// A held request (a paused action's, or under a legal hold).
    Held,
    /// A job the backend accepted and has not finished.
    Job,
}

/// A backend's error with its HTTP status, for a letter's `last_error`.
fn with_status(error: String, status: Option<u16>) -> String {
    match status {
        Some(status) if !error.contains(&status.to_string()) => format!("{error} (HTTP {status})"),
        _ => error,
    }
}

/// Opens what a dead letter keeps sealed.
/// The record a `rule_failed` or `decode_failed` letter holds, opened with the key ring
/// (`None` for a failed action: it holds a decision, not a record). For
/// `dead-letters to-test`.
pub fn letter_record(
    keys: &Keys,
    id: u64,
    letter: &DeadLetter,
) -> Result<Option<Record>, PipelineError> {
    let sealed = match &letter.reason {
        DeadLetterReason::RuleFailed { sealed_record, .. }
        | DeadLetterReason::DecodeFailed { sealed_record, .. } => sealed_record,
        DeadLetterReason::ActionFailed { .. } => return Ok(None),
    };
    let context = DeadLetter::seal_context(id, letter.reason.kind());
    let sealed: SealedRecord = open(keys, id, sealed, &context)?;
    Ok(Some(Record {
        stream: letter.stream.as_str().into(),
        shard_id: letter.shard_id.as_str().into(),
        sequence_number: letter.sequence_number.as_str().into(),
        sub_sequence_number: letter.sub_sequence_number,
        partition_key: sealed.partition_key.into(),
        arrival_time: letter.arrival_time.as_str().into(),
        bytes: hex::decode(sealed.payload_hex).unwrap_or_default().into(),
        unreadable: None,
    }))
}

fn open<T: serde::de::DeserializeOwned>(
    keys: &Keys,
    id: u64,
    sealed: &str,
    context: &[u8],
) -> Result<T, PipelineError> {
    let bytes = keys
        .unseal(sealed, context)
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

/// The record a dead letter, a held request or a job came from, as far as it keeps it
/// (no payload): where its outcomes are reported and audited.
fn stored_record(
    stream: &str,
    shard_id: &str,
    sequence_number: &str,
    sub_sequence_number: u64,
    arrival_time: &str,
) -> Record {
    Record {
        stream: stream.into(),
        shard_id: shard_id.into(),
        sequence_number: sequence_number.into(),
        sub_sequence_number,
        partition_key: "".into(),
        arrival_time: arrival_time.into(),
        bytes: Default::default(),
        unreadable: None,
    }
}

/// Where a request's record starts, from the decision that made it.
fn arrival(origin: &Origin<'_>, decision: &Decision) -> Arrival {
    Arrival {
        arrival_time: origin.record.arrival_time.to_string(),
        rule: origin.rule.to_owned(),
        regulation: regulation(decision).to_owned(),
    }
}

/// What became of a decision's action, for its request's record.
fn action_change(
    origin: &Origin<'_>,
    decision: &Decision,
    status: ActionStatus,
    attempts: u32,
    http_status: Option<u16>,
) -> Change {
    Change::Action {
        arrival: arrival(origin, decision),
        action: decision.action.clone(),
        status,
        attempts,
        http_status,
        sealed_job: None,
        dead_letter: None,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::keys::KeySource;
    use crate::state::Access;

    /// A backend on loopback that answers 200 to everything and counts the requests.
    async fn counting_backend() -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    if socket.read(&mut buf).await.unwrap_or(0) > 0 {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let _ = socket
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                    }
                });
            }
        });
        (url, count)
    }

    fn batch(keys: &[&str], first_sequence: u64) -> Batch {
        Batch {
            records: keys
                .iter()
                .enumerate()
                .map(|(i, key)| RawRecord {
                    sequence_number: (first_sequence + i as u64).to_string().into(),
                    partition_key: "pk".into(),
                    arrival_time_millis: 0,
                    data: format!(r#"{{"k":"{key}"}}"#).into_bytes(),
                })
                .collect(),
            millis_behind_latest: Some(0),
            shard_end: false,
            in_flight: None,
            ..Default::default()
        }
    }

    /// A state that cannot be written (here: opened read-only) makes the first commit
    /// fail; from then on no backend call is made until a write succeeds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_backend_call_while_the_state_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        std::fs::create_dir(&rules).unwrap();
        std::fs::write(
            rules.join("all.rhai"),
            "fn decide(record) { #{ action: \"a\", key: record.data.k } }\n",
        )
        .unwrap();
        let (url, calls) = counting_backend().await;
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            format!(
                "[actions.a]\nurl = \"{url}/x\"\nallow_insecure_http = true\nmax_attempts = 1\n"
            ),
        )
        .unwrap();
        let specs = crate::config::action_specs(&config).unwrap();
        let names: BTreeSet<String> = specs.keys().cloned().collect();
        let set = RuleSet::load(&rules, Some(names.clone())).unwrap();
        let (path, key) = (dir.path().join("s.redb"), dir.path().join("s.key"));
        let source = KeySource {
            env: None,
            file: &key,
        };
        drop(crate::state::LocalState::open(&path, source, Access::Run).unwrap());
        let (state, keys) = crate::state::LocalState::open(&path, source, Access::Read).unwrap();
        let state = State::local(state);
        let telemetry = Arc::new(Telemetry::new());
        let pipeline = Pipeline {
            stream: "s".into(),
            rules: Arc::new(Rules::new(
                set,
                rules,
                names,
                Arc::new(|_: &Decision| Ok(())),
            )),
            actions: ActionSet::new(&specs, true).unwrap(),
            sink: Sink::Live {
                state: Arc::new(state),
                keys,
            },
            shutdown: Shutdown::new(),
            telemetry: telemetry.clone(),
            claims: Default::default(),
            release_lock: Default::default(),
            letters_in_retry: Default::default(),
        };
        let mut progress = ShardProgress::new(
            "s",
            "shard-0",
            Position::Start(crate::source::StartPosition::TrimHorizon),
        );
        // The call happens, its outcome cannot be recorded: the batch fails.
        let first = pipeline
            .handle_batch(&mut progress, batch(&["r-1"], 1))
            .await;
        assert!(matches!(first, Err(PipelineError::State { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(telemetry.state_fault().is_some());
        // Read again (the worker restarted): no call while the state still cannot be
        // written, for that request or any other.
        let mut progress = ShardProgress::new(
            "s",
            "shard-0",
            Position::Start(crate::source::StartPosition::TrimHorizon),
        );
        let again = pipeline
            .handle_batch(&mut progress, batch(&["r-1", "r-2"], 1))
            .await;
        assert!(matches!(again, Err(PipelineError::State { .. })));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "called while the state was broken"
        );
    }
}
