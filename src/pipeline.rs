//! The pipeline: a shard's records through decode → rules → dedup → actions → state, in
//! order, and the checkpoint rule.
//!
//! A shard's checkpoint moves past a record only once every decision of that record is
//! settled: done, skipped as a duplicate, or durably dead-lettered.

use std::sync::Arc;
use std::time::Instant;

use crate::actions::{ActionSet, Outcome};
use crate::clock::now_ms;
use crate::decode::{self, Record};
use crate::keys::Keys;
use crate::preview::Preview;
use crate::rules::reload::Rules;
use crate::rules::{Decision, Rule, RuleError, Verdict};
use crate::shutdown::Shutdown;
use crate::source::{Checkpoint, Position, ShardReader, SourceError};
use crate::state::{DeadLetter, DeadLetterReason, State, StateError};
use crate::telemetry::{ActionOutcome, Telemetry};

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

pub struct Pipeline {
    pub stream: String,
    /// Swapped whole by a reload; each record sees one rule set.
    pub rules: Arc<Rules>,
    pub actions: ActionSet,
    pub sink: Sink,
    pub shutdown: Shutdown,
    pub telemetry: Arc<Telemetry>,
}

/// Whether a record's decisions are all settled.
enum Settled {
    Yes,
    /// Shutdown interrupted an action: the record must be read again after a restart.
    No,
}

impl Pipeline {
    pub fn checkpoint(&self, shard_id: &str) -> Result<Option<Checkpoint>, StateError> {
        match &self.sink {
            Sink::Live { state, .. } => state.checkpoint(shard_id),
            Sink::Preview(preview) => Ok(preview.checkpoint(shard_id)),
        }
    }

    fn set_checkpoint(&self, shard_id: &str, checkpoint: Checkpoint) -> Result<(), PipelineError> {
        match &self.sink {
            Sink::Live { state, .. } => {
                let started = Instant::now();
                state
                    .set_checkpoint(shard_id, &checkpoint)
                    .map_err(|source| PipelineError::State {
                        shard_id: shard_id.to_owned(),
                        sequence_number: checkpoint.sequence_number.clone().unwrap_or_default(),
                        source,
                    })?;
                self.telemetry.checkpoint_committed(started.elapsed());
                Ok(())
            }
            Sink::Preview(preview) => {
                preview.set_checkpoint(shard_id, checkpoint);
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
        let mut checkpointed = match start {
            Position::After(seq) => Some(seq),
            Position::Start(_) => None,
        };
        let mut caught_up = false;
        loop {
            let Some(batch) = reader.next(&self.shutdown).await? else {
                return Ok(ShardExit::Stopped);
            };
            let empty = batch.records.is_empty();
            let mut settled = checkpointed.clone();
            let mut interrupted = false;
            self.telemetry
                .shard_lag(shard_id, batch.millis_behind_latest);
            for raw in batch.records {
                let sequence_number = raw.sequence_number.clone();
                self.telemetry.record_read(shard_id, raw.data.len());
                for record in decode::decode(&self.stream, shard_id, raw) {
                    if let Settled::No = self.handle(&record).await? {
                        interrupted = true;
                        break;
                    }
                }
                if interrupted {
                    break;
                }
                settled = Some(sequence_number);
                if self.shutdown.is_triggered() {
                    interrupted = true;
                    break;
                }
            }
            if settled != checkpointed {
                if let Some(seq) = &settled {
                    self.set_checkpoint(shard_id, Checkpoint::at(seq.clone()))?;
                }
                checkpointed = settled;
            }
            if interrupted {
                return Ok(ShardExit::Stopped);
            }
            if batch.shard_end {
                self.set_checkpoint(shard_id, Checkpoint::end(checkpointed))?;
                tracing::info!(shard_id, "shard read to its end");
                return Ok(ShardExit::Finished);
            }
            let now_caught_up = empty && batch.millis_behind_latest == Some(0);
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

    /// Runs the rules on one record and settles every decision.
    async fn handle(&self, record: &Record) -> Result<Settled, PipelineError> {
        let rules = self.rules.load();
        let (state, keys) = match &self.sink {
            Sink::Preview(preview) => {
                preview.evaluate(&rules, Some(&self.actions), record);
                return Ok(Settled::Yes);
            }
            Sink::Live { state, keys } => (state.as_ref(), keys),
        };
        for (rule, verdict) in rules.evaluate(record) {
            let maker = Maker {
                rule,
                rules_hash: rules.hash(),
            };
            let decisions = match verdict {
                Verdict::Skipped => continue,
                Verdict::Failed(error) => {
                    self.rule_failed(state, record, &maker, error)?;
                    continue;
                }
                Verdict::Decided(decisions) => decisions,
            };
            self.telemetry
                .rule_evaluated(&rule.name, !decisions.is_empty());
            for decision in decisions {
                if let Settled::No = self.act(state, keys, record, &maker, decision).await? {
                    return Ok(Settled::No);
                }
            }
        }
        Ok(Settled::Yes)
    }

    /// A rule failed on the record: never "no match". The record is dead-lettered.
    fn rule_failed(
        &self,
        state: &State,
        record: &Record,
        maker: &Maker,
        error: RuleError,
    ) -> Result<(), PipelineError> {
        self.telemetry.rule_failed(
            &record.shard_id,
            &record.sequence_number,
            &maker.rule.name,
            &error.log_summary(),
        );
        self.dead_letter(
            state,
            record,
            maker,
            DeadLetterReason::RuleFailed {
                error: error.to_string(),
                payload_hex: hex::encode(&record.bytes),
            },
        )
    }

    fn dead_letter(
        &self,
        state: &State,
        record: &Record,
        maker: &Maker,
        reason: DeadLetterReason,
    ) -> Result<(), PipelineError> {
        let letter = DeadLetter {
            created_at_ms: now_ms(),
            stream: record.stream.clone(),
            shard_id: record.shard_id.clone(),
            sequence_number: record.sequence_number.clone(),
            sub_sequence_number: record.sub_sequence_number,
            partition_key: record.partition_key.clone(),
            arrival_time: record.arrival_time.clone(),
            rule: maker.rule.name.clone(),
            rule_file: maker.rule.path.display().to_string(),
            rules_hash: maker.rules_hash.to_owned(),
            reason,
        };
        let id = state
            .add_dead_letter(&letter)
            .map_err(|source| self.state_error(record, source))?;
        tracing::warn!(shard_id = %record.shard_id, sequence_number = %record.sequence_number, dead_letter = id, "dead letter stored");
        Ok(())
    }

    fn state_error(&self, record: &Record, source: StateError) -> PipelineError {
        PipelineError::State {
            shard_id: record.shard_id.clone(),
            sequence_number: record.sequence_number.clone(),
            source,
        }
    }

    /// Carries out one decision: dedup, then the backend call, then the state.
    async fn act(
        &self,
        state: &State,
        keys: &Keys,
        record: &Record,
        maker: &Maker<'_>,
        decision: Decision,
    ) -> Result<Settled, PipelineError> {
        let request = match self.actions.prepare(&decision) {
            Ok(request) => request,
            Err(e) => {
                let error = RuleError::Decision {
                    rule: maker.rule.name.clone(),
                    file: maker.rule.path.clone(),
                    reason: e.to_string(),
                };
                self.rule_failed(state, record, maker, error)?;
                return Ok(Settled::Yes);
            }
        };
        let rule = maker.rule.name.as_str();
        let id = keys.request_id(&decision.action, &decision.key);
        let outcome = |outcome, attempts, took, error: Option<&str>| {
            self.telemetry.action(
                outcome,
                &record.shard_id,
                &record.sequence_number,
                rule,
                maker.rules_hash,
                &decision.action,
                attempts,
                took,
                error,
            )
        };
        if state
            .is_done(&id)
            .map_err(|e| self.state_error(record, e))?
        {
            outcome(ActionOutcome::Duplicate, 0, None, None);
            return Ok(Settled::Yes);
        }
        let started = Instant::now();
        match self.actions.send(&request, &self.shutdown).await {
            Outcome::Done { attempts, .. } => {
                state
                    .mark_done(&id)
                    .map_err(|e| self.state_error(record, e))?;
                outcome(ActionOutcome::Done, attempts, Some(started.elapsed()), None);
                Ok(Settled::Yes)
            }
            Outcome::Failed {
                error,
                attempts,
                retryable,
            } => {
                outcome(
                    ActionOutcome::DeadLettered,
                    attempts,
                    Some(started.elapsed()),
                    Some(&error),
                );
                self.dead_letter(
                    state,
                    record,
                    maker,
                    DeadLetterReason::ActionFailed {
                        action: decision.action,
                        key: decision.key,
                        params: decision.params,
                        error,
                        attempts,
                        retryable,
                    },
                )?;
                Ok(Settled::Yes)
            }
            Outcome::Interrupted => Ok(Settled::No),
        }
    }
}

/// The rule behind a decision, and the rule set it belonged to (kept with every outcome).
struct Maker<'a> {
    rule: &'a Rule,
    rules_hash: &'a str,
}
