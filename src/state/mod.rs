//! Durable state: shard checkpoints, the dedup ledger of requests already done, dead
//! letters, held requests, pauses, and the audit trail.
//!
//! Two stores behind one [`State`]: a single daemon's redb file ([`LocalState`], the
//! default), or a fleet's DynamoDB table shared by every worker ([`SharedState`],
//! `[coordination] kind = "dynamodb"`). Writes are gathered into [`Writes`] and committed
//! once per batch of records and right after each backend call, so a checkpoint never
//! lands before the outcomes of the records it covers. The state holds no identifier in
//! clear: the ledger and the audit trail keep keyed hashes, and what a dead letter must
//! keep to be retried is sealed (encrypted) by the caller.

mod local;
pub mod shared;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::decode::Record;
use crate::keys::KeyError;
use crate::requests::{Change, Milestone, Request, Status};
use crate::source::Checkpoint;
pub use local::{Access, LocalState};
pub use shared::{ClaimOutcome, SharedState};

/// Dead letters read at once by a sweep (the scheduled retries): memory stays flat
/// however many are pending.
pub const DEAD_LETTER_PAGE: usize = 64;

/// Errors of the state stage, naming the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path} is in use by another gdpr-consumer (only one daemon may own a state file)")]
    Locked { path: PathBuf },
    #[error("state file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("state file {path}: {context}")]
    Db {
        path: PathBuf,
        context: &'static str,
        source: Box<redb::Error>,
    },
    #[error("state file {path}: schema version {found} is newer than this build understands ({}); run the newer binary, or restore the backup taken before the upgrade", local::SCHEMA_VERSION)]
    Schema { path: PathBuf, found: u64 },
    #[error("state file {path}: corrupt {what} ({message}); restore it, with its key, from the last backup")]
    Corrupt {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("state file {path} is damaged ({reason}); it is never re-initialised: stop, and restore it (with its key) from the last backup")]
    Damaged { path: PathBuf, reason: String },
    #[error("state file {path} exists but its key ({keys}) is missing: restore the key that was backed up with the state file (a new key would forget every request done)")]
    KeyMissing { path: PathBuf, keys: String },
    #[error("state file {path} was written with key(s) {missing} that {keys} does not hold: restore the key file (or variable) that belongs to this state file")]
    KeyMismatch {
        path: PathBuf,
        keys: String,
        missing: String,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("state file {path} is closed after a write error, and could not be opened again")]
    Closed { path: PathBuf },
    #[error("state file {path} is open read-only here")]
    ReadOnly { path: PathBuf },
    #[error("state table {table}: {context}: {message}")]
    Shared {
        table: String,
        context: &'static str,
        message: String,
    },
    #[error("state table {table} does not exist: set `[coordination] create_tables = true`, or create it with `{create}` (see docs/operations.md for the IAM policy)")]
    SharedMissing { table: String, create: String },
    /// A lease table call failed (its message names the table).
    #[error("{0}")]
    Leases(String),
    #[error("lease of shard {shard_id} lost: another worker reads it now; the checkpoint was not written (its records are read again there, and found done)")]
    LeaseLost { shard_id: String },
    #[error("state file {path}: no dead letter {id}")]
    NoDeadLetter { path: PathBuf, id: u64 },
    #[error(
        "state file {path}: dead letter {id}: its sealed contents do not open with the state key"
    )]
    Unseal { path: PathBuf, id: u64 },
}

/// Why a record or a decision could not be settled, kept for an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// A rule failed on the record (or returned an invalid decision). Retrying re-runs that
    /// rule, as it is now, on the record.
    RuleFailed {
        /// Where and what kind, without values from the record.
        error: String,
        /// The record (payload, partition key) and the full error, sealed.
        sealed_record: String,
    },
    /// The record could not be decoded (a malformed KPL aggregate, a decompression bomb).
    DecodeFailed {
        error: String,
        /// The record as read (payload, partition key), sealed.
        sealed_record: String,
    },
    /// The backend refused the request or could not be reached.
    ActionFailed {
        action: String,
        /// The keyed hash of (action, key): the ledger's and the audit trail's id.
        request_id: String,
        /// The decision (key, params), sealed.
        sealed_decision: String,
        /// The first failure.
        error: String,
        http_status: Option<u16>,
        /// Attempts of the first sending.
        attempts: u32,
        /// A backend fault (retried on a schedule), or a refusal that waits for an operator.
        retryable: bool,
        regulation: String,
    },
}

impl DeadLetterReason {
    pub fn kind(&self) -> &'static str {
        match self {
            DeadLetterReason::RuleFailed { .. } => "rule_failed",
            DeadLetterReason::DecodeFailed { .. } => "decode_failed",
            DeadLetterReason::ActionFailed { .. } => "action_failed",
        }
    }

    /// Why the letter was made (safe to show: no values from the record).
    pub fn error(&self) -> &str {
        match self {
            DeadLetterReason::RuleFailed { error, .. }
            | DeadLetterReason::DecodeFailed { error, .. }
            | DeadLetterReason::ActionFailed { error, .. } => error,
        }
    }

    /// What the letter keeps sealed.
    pub fn sealed(&self) -> &str {
        match self {
            DeadLetterReason::RuleFailed { sealed_record, .. }
            | DeadLetterReason::DecodeFailed { sealed_record, .. } => sealed_record,
            DeadLetterReason::ActionFailed {
                sealed_decision, ..
            } => sealed_decision,
        }
    }

    /// Where the sealed contents go (a new letter is sealed once its id is known).
    pub fn sealed_mut(&mut self) -> &mut String {
        match self {
            DeadLetterReason::RuleFailed { sealed_record, .. }
            | DeadLetterReason::DecodeFailed { sealed_record, .. } => sealed_record,
            DeadLetterReason::ActionFailed {
                sealed_decision, ..
            } => sealed_decision,
        }
    }
}

/// A dead letter keeps its id, its sealed contents and its first-failure time for life: a
/// retry that fails only counts itself and records its error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// When it first failed.
    pub created_at_ms: u64,
    pub stream: String,
    pub shard_id: String,
    pub sequence_number: String,
    pub sub_sequence_number: u64,
    pub arrival_time: String,
    /// The rule that failed or made the decision, its file, and the hash of its rule set.
    pub rule: String,
    pub rule_file: String,
    pub rules_hash: String,
    /// Retries made since (by the schedule or an operator).
    #[serde(default)]
    pub retries: u32,
    /// The error of the last retry, when one failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_retry_at_ms: Option<u64>,
    #[serde(flatten)]
    pub reason: DeadLetterReason,
}

impl DeadLetter {
    /// A new letter for what `origin` could not settle, first failing now.
    pub fn new(origin: &Origin, reason: DeadLetterReason) -> Self {
        let record = origin.record;
        DeadLetter {
            created_at_ms: now_ms(),
            stream: record.stream.to_string(),
            shard_id: record.shard_id.to_string(),
            sequence_number: record.sequence_number.to_string(),
            sub_sequence_number: record.sub_sequence_number,
            arrival_time: record.arrival_time.to_string(),
            rule: origin.rule.to_owned(),
            rule_file: origin.rule_file.display().to_string(),
            rules_hash: origin.rules_hash.to_owned(),
            retries: 0,
            last_error: None,
            last_retry_at_ms: None,
            reason,
        }
    }

    /// What its sealed contents are bound to: its id and kind.
    pub fn seal_context(id: u64, kind: &str) -> Vec<u8> {
        format!("dead letter {id} {kind}").into_bytes()
    }

    /// What the letter holds, as the letter index knows it: a request, or a record and the
    /// rule that failed on it (empty for a record that could not be decoded).
    pub fn index_key(&self) -> String {
        match &self.reason {
            DeadLetterReason::ActionFailed { request_id, .. } => request_index_key(request_id),
            _ => record_index_key(
                &self.shard_id,
                &self.sequence_number,
                self.sub_sequence_number,
                &self.rule,
            ),
        }
    }

    /// A retry that failed: the letter stays as it is, counting the retry and its error.
    pub fn retried(&mut self, error: String) {
        self.retries += 1;
        self.last_error = Some(error);
        self.last_retry_at_ms = Some(now_ms());
    }
}

/// The letter index's key of a request (its keyed hash, hex).
pub fn request_index_key(request_id: &str) -> String {
    format!("request {request_id}")
}

/// The letter index's key of a record and the rule that failed on it.
pub fn record_index_key(shard_id: &str, sequence_number: &str, sub: u64, rule: &str) -> String {
    format!("record {shard_id} {sequence_number} {sub} {rule}")
}

/// Where an outcome comes from: the record, and the rule (with its file and its rule set's
/// hash) that decided or failed on it. Kept with every audit entry and dead letter.
pub struct Origin<'a> {
    pub record: &'a Record,
    pub rule: &'a str,
    pub rule_file: &'a Path,
    pub rules_hash: &'a str,
}

impl AuditEntry {
    /// An entry for an outcome of `origin`, now.
    pub fn new(
        origin: &Origin,
        action: &str,
        request_id: &str,
        outcome: &str,
        regulation: &str,
    ) -> Self {
        AuditEntry {
            time_ms: now_ms(),
            rule: origin.rule.to_owned(),
            rules_hash: origin.rules_hash.to_owned(),
            action: action.to_owned(),
            request_id: request_id.to_owned(),
            outcome: outcome.to_owned(),
            http_status: None,
            attempts: 0,
            arrival_time: origin.record.arrival_time.to_string(),
            regulation: regulation.to_owned(),
            due_date: due_date(&origin.record.arrival_time, regulation),
            note: None,
            dead_letter: None,
            by: None,
            request: None,
            denial_code: None,
        }
    }

    /// An operator's decision about an action (a pause, a resume), now.
    pub fn of_operator(action: &str, outcome: &str, note: Option<String>) -> Self {
        AuditEntry {
            time_ms: now_ms(),
            rule: String::new(),
            rules_hash: String::new(),
            action: action.to_owned(),
            request_id: String::new(),
            outcome: outcome.to_owned(),
            http_status: None,
            attempts: 0,
            arrival_time: String::new(),
            regulation: String::new(),
            due_date: String::new(),
            note,
            dead_letter: None,
            by: None,
            request: None,
            denial_code: None,
        }
    }

    /// The same entry, asked for by `who` (see [`AuditEntry::by`]).
    pub fn by(self, who: &str) -> Self {
        AuditEntry {
            by: Some(who.to_owned()),
            ..self
        }
    }

    /// An entry about a dead letter (its resolution or discard), now.
    pub fn of_letter(id: u64, letter: &DeadLetter, outcome: &str, note: String) -> Self {
        let (action, request_id, regulation) = match &letter.reason {
            DeadLetterReason::ActionFailed {
                action,
                request_id,
                regulation,
                ..
            } => (action.as_str(), request_id.as_str(), regulation.as_str()),
            _ => ("", "", "GDPR"),
        };
        AuditEntry {
            time_ms: now_ms(),
            rule: letter.rule.clone(),
            rules_hash: letter.rules_hash.clone(),
            action: action.to_owned(),
            request_id: request_id.to_owned(),
            outcome: outcome.to_owned(),
            http_status: None,
            attempts: 0,
            arrival_time: letter.arrival_time.clone(),
            regulation: regulation.to_owned(),
            due_date: due_date(&letter.arrival_time, regulation),
            note: Some(note),
            dead_letter: Some(id),
            by: None,
            request: None,
            denial_code: None,
        }
    }
}

/// The due date a regulation sets, counted from the record's arrival: one calendar month
/// for GDPR (Art. 12(3): 31 January + 1 month = 28 February), 45 days for CCPA (§7021).
pub fn due_date(arrival_time: &str, regulation: &str) -> String {
    let arrival: jiff::Timestamp = arrival_time
        .parse()
        .unwrap_or_else(|_| jiff::Timestamp::now());
    let utc = arrival.to_zoned(jiff::tz::TimeZone::UTC);
    let span = if regulation == "CCPA" {
        jiff::Span::new().days(45)
    } else {
        jiff::Span::new().months(1)
    };
    let due = utc.checked_add(span).unwrap_or(utc);
    crate::clock::rfc3339(due.timestamp().as_millisecond())
}

/// One decision outcome, as the audit trail keeps it. No identifier in clear.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub time_ms: u64,
    pub rule: String,
    pub rules_hash: String,
    pub action: String,
    /// Keyed hash of (action, key), hex.
    pub request_id: String,
    /// `done`, `duplicate`, `dead_lettered`, `discarded`, `resolved`.
    pub outcome: String,
    pub http_status: Option<u16>,
    pub attempts: u32,
    pub arrival_time: String,
    pub regulation: String,
    /// When the regulation wants the request answered, counted from the record's arrival.
    pub due_date: String,
    /// The operator's reason for a discard; what a retry made of a dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The dead letter the entry settles or creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<u64>,
    /// Who asked for the change: `console`, or `cli:USER` (the OS user); none for what the
    /// daemon does by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The request (keyed hash of its key, hex): every action of one person's request
    /// shares it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// The basis of a denial (`denied` entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denial_code: Option<String>,
}

impl AuditEntry {
    /// An entry for a step of a whole request (`complete`, `extended`, `denied`, ...), now.
    pub fn of_request(id: &str, request: &Request, milestone: &Milestone) -> Self {
        AuditEntry {
            time_ms: now_ms(),
            rule: request.rule.clone(),
            rules_hash: String::new(),
            action: String::new(),
            request_id: String::new(),
            outcome: milestone.outcome.to_owned(),
            http_status: None,
            attempts: 0,
            arrival_time: crate::clock::rfc3339(request.arrival_ms as i64),
            regulation: request.regulation.clone(),
            due_date: crate::clock::rfc3339(request.due_in_force_ms() as i64),
            note: milestone.note.clone(),
            dead_letter: None,
            by: milestone.by.clone(),
            request: Some(id.to_owned()),
            denial_code: milestone.denial_code.clone(),
        }
    }
}

/// An open request as the open index knows it: enough for the gauges (by status, overdue)
/// without reading every request ever made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenRequest {
    pub status: Status,
    pub due_ms: u64,
}

impl OpenRequest {
    /// `None` once the request is answered (complete or denied).
    pub fn of(request: &Request) -> Option<Self> {
        let status = request.status();
        status.is_open().then(|| OpenRequest {
            status,
            due_ms: request.due_in_force_ms(),
        })
    }
}

/// The open requests (keyed hash, what the open index keeps), and how many were answered.
pub struct RequestCounts {
    pub open: Vec<(String, OpenRequest)>,
    pub complete: u64,
    pub denied: u64,
}

/// Requests by status and how late the open ones are, for the metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestGauges {
    pub by_status: std::collections::BTreeMap<&'static str, u64>,
    pub overdue: u64,
    /// Now minus the due date of the open request due first (negative: time left).
    pub oldest_overdue_ms: i64,
}

/// An action's job the backend accepted and has not finished: polled durably until a
/// terminal status (it holds the request as a dead letter would: a record read again
/// finds it waiting).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub action: String,
    /// The keyed hash of (action, key), hex: the ledger's id once the job is done.
    pub request_id: String,
    /// The request (keyed hash of its key, hex).
    pub request: String,
    /// The decision (key, params) and the job id, sealed, bound to [`Job::seal_context`].
    pub sealed: String,
    pub regulation: String,
    pub submitted_at_ms: u64,
    pub next_poll_ms: u64,
    pub give_up_at_ms: u64,
    #[serde(default)]
    pub polls: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<String>,
    pub attempts: u32,
    pub http_status: Option<u16>,
    pub stream: String,
    pub shard_id: String,
    pub sequence_number: String,
    pub sub_sequence_number: u64,
    pub arrival_time: String,
    pub rule: String,
    pub rule_file: String,
    pub rules_hash: String,
}

impl Job {
    pub fn seal_context(id: u64) -> Vec<u8> {
        format!("job {id}").into_bytes()
    }
}

/// The letter index's key of a waiting job.
pub fn job_index_key(request_id: &str) -> String {
    format!("job {request_id}")
}

/// Applies request changes in a commit, one at a time; what an operator's change cannot
/// apply to is refused (`Err`), the pipeline's changes always apply. Returns the request
/// as it is now, with the audit entry of any step of the whole request it reached.
pub(crate) fn change(
    id: &str,
    current: Option<Request>,
    change: &Change,
) -> Result<(Request, Option<AuditEntry>), String> {
    let (request, milestone) = crate::requests::apply(current, change, now_ms())?;
    let entry = milestone.map(|m| AuditEntry::of_request(id, &request, &m));
    Ok((request, entry))
}

/// An action an operator paused: its requests are held, not sent, until it is resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pause {
    pub reason: String,
    pub since_ms: u64,
    /// Set by `actions resume`: the held requests are being sent, in order, and the
    /// action's new requests still queue behind them, so none overtakes a held one. The
    /// pause ends when none is left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resuming_since_ms: Option<u64>,
}

/// A request of a paused action, held durably (a settled state for its shard's checkpoint)
/// and sent, in arrival order, when the action is resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub action: String,
    /// The keyed hash of (action, key), hex.
    pub request_id: String,
    /// The decision (key, params), sealed, bound to [`Held::seal_context`].
    pub sealed_decision: String,
    pub regulation: String,
    pub held_at_ms: u64,
    pub stream: String,
    pub shard_id: String,
    pub sequence_number: String,
    pub sub_sequence_number: u64,
    pub arrival_time: String,
    pub rule: String,
    pub rule_file: String,
    pub rules_hash: String,
    /// Held for its request's legal hold (not, or no longer, for a pause): it does not
    /// keep a paused action from ending its resume.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub legal_hold: bool,
}

impl Held {
    pub fn seal_context(id: u64) -> Vec<u8> {
        format!("held request {id}").into_bytes()
    }
}

/// The letter index's key of a held request.
pub fn held_index_key(request_id: &str) -> String {
    format!("held {request_id}")
}

/// Writes committed together, in one transaction.
#[derive(Debug, Default)]
pub struct Writes {
    pub checkpoints: Vec<(String, Checkpoint)>,
    pub done: Vec<[u8; 32]>,
    /// New dead letters, by id ([`State::new_dead_letter_id`]).
    pub dead_letters: Vec<(u64, DeadLetter)>,
    /// Letters a failed retry updated: written only if the letter is still there (an
    /// operator may have discarded it meanwhile).
    pub retried_dead_letters: Vec<(u64, DeadLetter)>,
    pub resolved_dead_letters: Vec<u64>,
    pub audit: Vec<AuditEntry>,
    /// Pauses set (`Some`) or lifted (`None`), by action.
    pub pauses: Vec<(String, Option<Pause>)>,
    /// Requests held, by id ([`State::new_held_id`]), and held requests sent.
    pub held: Vec<(u64, Held)>,
    pub released: Vec<u64>,
    /// Changes to requests (by the keyed hash of their key, hex), applied in order.
    pub requests: Vec<(String, Change)>,
    /// Jobs accepted (written whole), and jobs finished.
    pub jobs: Vec<(u64, Job)>,
    pub jobs_finished: Vec<u64>,
    /// Jobs polled and not finished, with the next poll time their poll was taken until:
    /// written back only if no one else took or finished them meanwhile.
    pub polled_jobs: Vec<(u64, Job, u64)>,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self.checkpoints.is_empty()
            && self.done.is_empty()
            && self.dead_letters.is_empty()
            && self.retried_dead_letters.is_empty()
            && self.pauses.is_empty()
            && self.held.is_empty()
            && self.released.is_empty()
            && self.requests.is_empty()
            && self.jobs.is_empty()
            && self.jobs_finished.is_empty()
            && self.polled_jobs.is_empty()
            && self.resolved_dead_letters.is_empty()
            && self.audit.is_empty()
    }
}

/// The state, in whichever store the configuration names.
pub enum State {
    Local(Arc<LocalState>),
    Shared(SharedState),
}

/// Forwards a call to whichever store holds the state.
macro_rules! each {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            State::Local($s) => $call,
            State::Shared($s) => $call,
        }
    };
}

impl State {
    pub fn local(state: LocalState) -> Self {
        State::Local(Arc::new(state))
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, State::Shared(_))
    }

    /// What messages name: the state file, or `dynamodb:TABLE`.
    pub fn path(&self) -> &Path {
        each!(self, s => s.path())
    }

    pub fn done_set(&self) -> Result<HashSet<[u8; 32]>, StateError> {
        each!(self, s => s.done_set())
    }

    pub fn probe_write(&self) -> Result<(), StateError> {
        each!(self, s => s.probe_write())
    }

    pub fn new_dead_letter_id(&self) -> u64 {
        each!(self, s => s.new_dead_letter_id())
    }

    pub fn new_held_id(&self) -> u64 {
        each!(self, s => s.new_held_id())
    }

    pub fn commit(&self, writes: Writes) -> Result<(), StateError> {
        each!(self, s => s.commit(writes))
    }

    /// Commits `writes`, returning when they are durable (sharing one transaction with
    /// other shards' writes of the same moment, in a state file).
    pub async fn commit_shared(&self, writes: Writes) -> Result<(), StateError> {
        each!(self, s => s.commit_shared(writes).await)
    }

    pub fn checkpoint(&self, shard_id: &str) -> Result<Option<Checkpoint>, StateError> {
        each!(self, s => s.checkpoint(shard_id))
    }

    pub fn checkpoints(&self) -> Result<Vec<(String, Checkpoint)>, StateError> {
        each!(self, s => s.checkpoints())
    }

    /// Forgets a shard's checkpoint (or every one), so it is read again from the start.
    pub fn reset_checkpoints(&self, shard_id: Option<&str>) -> Result<usize, StateError> {
        each!(self, s => s.reset_checkpoints(shard_id))
    }

    /// Whether the request with this keyed hash was already done.
    pub fn is_done(&self, id: &[u8]) -> Result<bool, StateError> {
        self.is_done_any(std::slice::from_ref(&id))
    }

    /// Whether the request was done under any of these keyed hashes (one per key of the
    /// ring: a request done before a key rotation is still found).
    pub fn is_done_any<I: AsRef<[u8]>>(&self, ids: &[I]) -> Result<bool, StateError> {
        each!(self, s => s.is_done_any(ids))
    }

    /// Forgets ledger entries done before `before_ms` (they outlived the stream's
    /// retention, so their records can no longer be read again). Returns how many.
    pub fn expire_done(&self, before_ms: u64) -> Result<u64, StateError> {
        each!(self, s => s.expire_done(before_ms))
    }

    /// Every dead letter, by id (inspection commands).
    pub fn dead_letters(&self) -> Result<Vec<(u64, DeadLetter)>, StateError> {
        self.dead_letters_after(0, usize::MAX)
    }

    /// Up to `limit` dead letters with ids above `after`, by id: a sweep pages through
    /// them so memory stays flat however many are pending.
    pub fn dead_letters_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, DeadLetter)>, StateError> {
        each!(self, s => s.dead_letters_after(after, limit))
    }

    pub fn dead_letter(&self, id: u64) -> Result<DeadLetter, StateError> {
        each!(self, s => s.dead_letter(id))
    }

    /// The pending letter that holds this request or record ([`DeadLetter::index_key`]).
    pub fn pending_letter(&self, index_key: &str) -> Result<Option<u64>, StateError> {
        each!(self, s => s.pending_letter(index_key))
    }

    /// The paused actions.
    pub fn pauses(&self) -> Result<Vec<(String, Pause)>, StateError> {
        each!(self, s => s.pauses())
    }

    /// Whether `action` is paused, and why (asked before each request is sent).
    pub fn pause(&self, action: &str) -> Result<Option<Pause>, StateError> {
        each!(self, s => s.pause(action))
    }

    /// Up to `limit` held requests with ids above `after`, in arrival order.
    pub fn held_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Held)>, StateError> {
        each!(self, s => s.held_after(after, limit))
    }

    /// How many requests are held for a paused action, by action (those on legal hold
    /// aside: they wait for their release, not the action's resume).
    pub fn held_counts(&self) -> Result<std::collections::BTreeMap<String, u64>, StateError> {
        self.held_counts_by(false)
    }

    /// How many requests are held, by action: on legal hold (`legal`), or for a pause.
    pub fn held_counts_by(
        &self,
        legal: bool,
    ) -> Result<std::collections::BTreeMap<String, u64>, StateError> {
        let mut counts = std::collections::BTreeMap::new();
        let mut after = 0;
        loop {
            let page = self.held_after(after, 1024)?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (_, request) in page.into_iter().filter(|(_, r)| r.legal_hold == legal) {
                *counts.entry(request.action).or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// How many dead letters are pending, and when the oldest was stored (ms).
    pub fn dead_letter_stats(&self) -> Result<(u64, Option<u64>), StateError> {
        each!(self, s => s.dead_letter_stats())
    }

    /// Audit entries whose time is in `[since_ms, until_ms)`, oldest first.
    pub fn audit(&self, since_ms: u64, until_ms: u64) -> Result<Vec<AuditEntry>, StateError> {
        each!(self, s => s.audit(since_ms, until_ms))
    }

    /// The latest audit entries, newest first: at most `limit`, none older than `since_ms`.
    pub fn audit_latest(&self, since_ms: u64, limit: usize) -> Result<Vec<AuditEntry>, StateError> {
        each!(self, s => s.audit_latest(since_ms, limit))
    }

    /// Sizes and version, for `gdpr-consumer state`.
    pub fn summary(&self) -> Result<serde_json::Value, StateError> {
        each!(self, s => s.summary())
    }

    /// The request recorded under any of these keyed hashes of its key (one per key of the
    /// ring), with the hash it is recorded under.
    pub fn request(&self, ids: &[String]) -> Result<Option<(String, Request)>, StateError> {
        for id in ids {
            if let Some(request) = each!(self, s => s.request(id))? {
                return Ok(Some((id.clone(), request)));
            }
        }
        Ok(None)
    }

    /// Up to `limit` requests recorded under hashes above `after`, in hash order.
    pub fn requests_after(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Request)>, StateError> {
        each!(self, s => s.requests_after(after, limit))
    }

    /// Applies an operator's change to a request at once (with its audit entry); `Ok(Err)`:
    /// refused, and why.
    pub fn change_request(
        &self,
        id: &str,
        change: Change,
    ) -> Result<Result<Request, String>, StateError> {
        each!(self, s => s.change_request(id, change))
    }

    /// Requests by status, and how late the open ones are.
    pub fn request_gauges(&self, now_ms: u64) -> Result<RequestGauges, StateError> {
        let RequestCounts {
            open,
            complete,
            denied,
        } = each!(self, s => s.request_counts())?;
        let mut gauges = RequestGauges::default();
        for status in Status::ALL {
            gauges.by_status.insert(status.as_str(), 0);
        }
        gauges.by_status.insert(Status::Complete.as_str(), complete);
        gauges.by_status.insert(Status::Denied.as_str(), denied);
        let mut first_due = None::<u64>;
        for (_, request) in open {
            *gauges.by_status.entry(request.status.as_str()).or_default() += 1;
            if now_ms > request.due_ms {
                gauges.overdue += 1;
            }
            first_due = Some(first_due.map_or(request.due_ms, |d| d.min(request.due_ms)));
        }
        gauges.oldest_overdue_ms = first_due.map_or(0, |due| now_ms as i64 - due as i64);
        Ok(gauges)
    }

    /// The requests still owed an answer (keyed hash, status, due date), soonest due first.
    pub fn open_requests(&self) -> Result<Vec<(String, OpenRequest)>, StateError> {
        let mut open = each!(self, s => s.request_counts())?.open;
        open.sort_by_key(|(_, r)| r.due_ms);
        Ok(open)
    }

    pub fn new_job_id(&self) -> u64 {
        each!(self, s => s.new_job_id())
    }

    /// Up to `limit` waiting jobs with ids above `after`, by id.
    pub fn jobs_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Job)>, StateError> {
        each!(self, s => s.jobs_after(after, limit))
    }

    /// Takes the next poll of a job (as read): in a fleet, one worker polls it each time.
    pub fn take_job_poll(&self, id: u64, job: &Job, next_poll_ms: u64) -> Result<bool, StateError> {
        match self {
            State::Local(_) => Ok(true),
            State::Shared(s) => s.take_job_poll(id, job, next_poll_ms),
        }
    }

    /// Claims a request before its backend call. A single daemon's claims are in memory
    /// ([`crate::dedup::Claims`]): always ours here. A fleet's are in the shared table.
    pub async fn claim(&self, id: [u8; 32], shard_id: &str) -> Result<ClaimOutcome, StateError> {
        match self {
            State::Local(_) => Ok(ClaimOutcome::Claimed),
            State::Shared(s) => s.claim(id, shard_id).await,
        }
    }

    /// Whether this worker may call the backend for a record of `shard_id`: a fleet's
    /// worker must hold the shard's lease.
    pub fn holds_lease(&self, shard_id: &str) -> bool {
        match self {
            State::Local(_) => true,
            State::Shared(s) => s.holds_lease(shard_id),
        }
    }

    /// Lets go of a claim that ended without the request done.
    pub async fn release_claim(&self, id: [u8; 32]) -> Result<(), StateError> {
        match self {
            State::Local(_) => Ok(()),
            State::Shared(s) => s.release_claim(id).await,
        }
    }
}
