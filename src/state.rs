//! Durable state in one redb file: shard checkpoints, the dedup ledger of requests already
//! done, dead letters, and the audit trail.
//!
//! The file is locked by the daemon that opens it, so two daemons can never share it.
//! Writes are gathered into [`Writes`] and committed in one transaction: once per batch of
//! records, and right after each backend call, so a checkpoint never lands before the
//! outcomes of the records it covers; writes of shards committing at the same moment share
//! one transaction and one disk sync ([`State::commit_shared`]). The state holds no
//! identifier in clear: the ledger and the audit trail keep keyed hashes, and what a dead
//! letter must keep to be retried is sealed (encrypted) by the caller.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::source::Checkpoint;

const SCHEMA_VERSION: u64 = 1;

/// Pages of the state file kept in memory. redb's default (1 GiB) would let the daemon's
/// memory grow with its audit trail for months; the hot pages (recent ledger entries, the
/// checkpoints, the end of the audit table) fit in far less.
const CACHE_BYTES: usize = 32 << 20;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// shard id → JSON [`Checkpoint`].
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
/// keyed hash of (action, key) → when it was done (ms since the epoch).
const DONE: TableDefinition<&[u8], u64> = TableDefinition::new("done");
/// id → JSON [`DeadLetter`].
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// id (in order of writing) → JSON [`AuditEntry`]. Append-only.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// Errors of the state stage, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path} is in use by another gdpr-consumer (only one daemon may own a state file)")]
    Locked { path: PathBuf },
    #[error("state file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("state file {path}: {context}: {source}")]
    Db {
        path: PathBuf,
        context: &'static str,
        source: Box<redb::Error>,
    },
    #[error("state file {path}: schema version {found} is newer than this build understands ({SCHEMA_VERSION})")]
    Schema { path: PathBuf, found: u64 },
    #[error("state file {path}: corrupt {what}: {message}")]
    Corrupt {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("state file {path}: no dead letter {id}")]
    NoDeadLetter { path: PathBuf, id: u64 },
}

/// Why a record or a decision could not be settled, kept for an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// A rule failed on the record (or returned an invalid decision). Retrying re-runs the
    /// current rules on the record.
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
        error: String,
        http_status: Option<u16>,
        attempts: u32,
        /// A backend fault (retried on a schedule), or a refusal that waits for an operator.
        retryable: bool,
        regulation: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
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
    #[serde(flatten)]
    pub reason: DeadLetterReason,
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
    /// `done`, `duplicate`, `dead_lettered`, `discarded`.
    pub outcome: String,
    pub http_status: Option<u16>,
    pub attempts: u32,
    pub arrival_time: String,
    pub regulation: String,
    /// When the regulation wants the request answered, counted from the record's arrival.
    pub due_date: String,
    /// The operator's reason, for a discard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Writes committed together, in one transaction.
#[derive(Debug, Default)]
pub struct Writes {
    pub checkpoints: Vec<(String, Checkpoint)>,
    pub done: Vec<[u8; 32]>,
    pub dead_letters: Vec<DeadLetter>,
    pub resolved_dead_letters: Vec<u64>,
    pub audit: Vec<AuditEntry>,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self.checkpoints.is_empty()
            && self.done.is_empty()
            && self.dead_letters.is_empty()
            && self.resolved_dead_letters.is_empty()
            && self.audit.is_empty()
    }
}

pub struct State {
    db: Database,
    path: PathBuf,
    group: Mutex<Group>,
}

/// Writers waiting for the next group commit, and whether a leader is committing.
#[derive(Default)]
struct Group {
    waiting: Vec<(Writes, Answer)>,
    leading: bool,
}

type Answer = tokio::sync::oneshot::Sender<Result<Vec<u64>, StateError>>;

impl State {
    /// Opens (creating if needed) and locks the state file.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StateError::Locked {
                    path: path.to_owned(),
                },
                other => StateError::Db {
                    path: path.to_owned(),
                    context: "cannot open",
                    source: Box::new(other.into()),
                },
            })?;
        let state = State {
            db,
            path: path.to_owned(),
            group: Mutex::default(),
        };
        state.init()?;
        Ok(state)
    }

    /// Opens a state file that must already exist (inspection commands never create one).
    pub fn open_existing(path: &Path) -> Result<Self, StateError> {
        if !path.exists() {
            return Err(StateError::Missing {
                path: path.to_owned(),
            });
        }
        Self::open(path)
    }

    /// Reads the dedup set without locking the file for long and without writing to it
    /// (dry-run). Fails with [`StateError::Locked`] while a daemon owns the file.
    pub fn read_done_set(path: &Path) -> Result<HashSet<[u8; 32]>, StateError> {
        let err = |context: &'static str| {
            move |e: redb::Error| StateError::Db {
                path: path.to_owned(),
                context,
                source: Box::new(e),
            }
        };
        let db = redb::ReadOnlyDatabase::open(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StateError::Locked {
                path: path.to_owned(),
            },
            other => err("cannot open read-only")(other.into()),
        })?;
        let tx = db.begin_read().map_err(|e| err("cannot read")(e.into()))?;
        let table = tx
            .open_table(DONE)
            .map_err(|e| err("cannot read the dedup set")(e.into()))?;
        let mut done = HashSet::new();
        for entry in table
            .iter()
            .map_err(|e| err("cannot read the dedup set")(e.into()))?
        {
            let (key, _) = entry.map_err(|e| err("cannot read the dedup set")(e.into()))?;
            if let Ok(id) = <[u8; 32]>::try_from(key.value()) {
                done.insert(id);
            }
        }
        Ok(done)
    }

    fn db_err(&self, context: &'static str) -> impl Fn(redb::Error) -> StateError + '_ {
        move |e| StateError::Db {
            path: self.path.clone(),
            context,
            source: Box::new(e),
        }
    }

    /// Creates the tables and checks the schema version.
    fn init(&self) -> Result<(), StateError> {
        let err = self.db_err("cannot initialise");
        let tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| err(e.into()))?;
            let found = meta
                .get("schema_version")
                .map_err(|e| err(e.into()))?
                .map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StateError::Schema {
                        path: self.path.clone(),
                        found: v,
                    })
                }
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| err(e.into()))?;
                }
            }
            tx.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
            tx.open_table(DONE).map_err(|e| err(e.into()))?;
            tx.open_table(DEAD_LETTERS).map_err(|e| err(e.into()))?;
            tx.open_table(AUDIT).map_err(|e| err(e.into()))?;
        }
        tx.commit().map_err(|e| err(e.into()))
    }

    /// Commits one set of writes in its own transaction; returns the new dead letters' ids.
    pub fn commit(&self, writes: Writes) -> Result<Vec<u64>, StateError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = self.commit_group(std::slice::from_ref(&writes))?;
        Ok(ids.pop().expect("one set of ids per set of writes"))
    }

    /// Commits `writes` together with whatever other shards are committing at the same
    /// moment: one transaction and one disk sync for all of them (group commit), done off
    /// the async threads. Returns when the writes are durable.
    pub async fn commit_shared(self: &Arc<Self>, writes: Writes) -> Result<Vec<u64>, StateError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let (done, result) = tokio::sync::oneshot::channel();
        let lead = {
            let mut group = self.group.lock().expect("group commit lock");
            group.waiting.push((writes, done));
            !std::mem::replace(&mut group.leading, true)
        };
        if lead {
            let state = self.clone();
            tokio::task::spawn_blocking(move || state.commit_waiting());
        }
        result
            .await
            .expect("the group committer answers every writer")
    }

    /// The group leader: commits what is waiting, again and again, until nothing is.
    fn commit_waiting(&self) {
        loop {
            let waiting = {
                let mut group = self.group.lock().expect("group commit lock");
                if group.waiting.is_empty() {
                    group.leading = false;
                    return;
                }
                std::mem::take(&mut group.waiting)
            };
            let (writes, answers): (Vec<Writes>, Vec<_>) = waiting.into_iter().unzip();
            match self.commit_group(&writes) {
                Ok(ids) => {
                    for (answer, ids) in answers.into_iter().zip(ids) {
                        let _ = answer.send(Ok(ids));
                    }
                }
                // Rare: commit each alone, so each writer gets its own error.
                Err(_) => {
                    for (answer, writes) in answers.into_iter().zip(writes) {
                        let _ = answer.send(self.commit(writes));
                    }
                }
            }
        }
    }

    fn commit_group(&self, group: &[Writes]) -> Result<Vec<Vec<u64>>, StateError> {
        let err = self.db_err("cannot commit");
        let tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        let ids = group
            .iter()
            .map(|writes| self.apply(&tx, writes))
            .collect::<Result<_, _>>()?;
        tx.commit().map_err(|e| err(e.into()))?;
        Ok(ids)
    }

    fn apply(&self, tx: &redb::WriteTransaction, writes: &Writes) -> Result<Vec<u64>, StateError> {
        let err = self.db_err("cannot commit");
        let mut ids = Vec::new();
        {
            let mut table = tx.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
            for (shard_id, checkpoint) in &writes.checkpoints {
                let bytes = serde_json::to_vec(checkpoint).expect("a checkpoint serializes");
                table
                    .insert(shard_id.as_str(), bytes.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            let mut done = tx.open_table(DONE).map_err(|e| err(e.into()))?;
            for id in &writes.done {
                done.insert(id.as_slice(), now_ms())
                    .map_err(|e| err(e.into()))?;
            }
            let mut letters = tx.open_table(DEAD_LETTERS).map_err(|e| err(e.into()))?;
            for id in &writes.resolved_dead_letters {
                letters.remove(id).map_err(|e| err(e.into()))?;
            }
            for letter in &writes.dead_letters {
                let bytes = serde_json::to_vec(letter).expect("a dead letter serializes");
                let last = letters
                    .last()
                    .map_err(|e| err(e.into()))?
                    .map(|(k, _)| k.value());
                // Ids are never reused, even after the last one is resolved.
                let id = last
                    .unwrap_or(0)
                    .max(self.meta_counter(tx, "dead_letter_ids")?)
                    + 1;
                self.set_meta_counter(tx, "dead_letter_ids", id)?;
                letters
                    .insert(id, bytes.as_slice())
                    .map_err(|e| err(e.into()))?;
                ids.push(id);
            }
            let mut audit = tx.open_table(AUDIT).map_err(|e| err(e.into()))?;
            for entry in &writes.audit {
                let next = audit
                    .last()
                    .map_err(|e| err(e.into()))?
                    .map_or(1, |(k, _)| k.value() + 1);
                let bytes = serde_json::to_vec(entry).expect("an audit entry serializes");
                audit
                    .insert(next, bytes.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
        }
        Ok(ids)
    }

    fn meta_counter(&self, tx: &redb::WriteTransaction, name: &str) -> Result<u64, StateError> {
        let err = self.db_err("cannot read meta");
        let meta = tx.open_table(META).map_err(|e| err(e.into()))?;
        let value = meta
            .get(name)
            .map_err(|e| err(e.into()))?
            .map(|v| v.value());
        Ok(value.unwrap_or(0))
    }

    fn set_meta_counter(
        &self,
        tx: &redb::WriteTransaction,
        name: &str,
        value: u64,
    ) -> Result<(), StateError> {
        let err = self.db_err("cannot write meta");
        let mut meta = tx.open_table(META).map_err(|e| err(e.into()))?;
        meta.insert(name, value).map_err(|e| err(e.into()))?;
        Ok(())
    }

    pub fn checkpoint(&self, shard_id: &str) -> Result<Option<Checkpoint>, StateError> {
        let err = self.db_err("cannot read checkpoint");
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = tx.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
        let value = table.get(shard_id).map_err(|e| err(e.into()))?;
        value
            .map(|v| self.parse("checkpoint", v.value()))
            .transpose()
    }

    pub fn checkpoints(&self) -> Result<Vec<(String, Checkpoint)>, StateError> {
        let err = self.db_err("cannot read checkpoints");
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = tx.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (k, v) = entry.map_err(|e| err(e.into()))?;
            out.push((k.value().to_owned(), self.parse("checkpoint", v.value())?));
        }
        Ok(out)
    }

    /// Forgets a shard's checkpoint (or every one), so it is read again from the start.
    pub fn reset_checkpoints(&self, shard_id: Option<&str>) -> Result<usize, StateError> {
        let err = self.db_err("cannot reset checkpoints");
        let tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        let removed = {
            let mut table = tx.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
            match shard_id {
                Some(id) => usize::from(table.remove(id).map_err(|e| err(e.into()))?.is_some()),
                None => {
                    let n = table.len().map_err(|e| err(e.into()))? as usize;
                    table.retain(|_, _| false).map_err(|e| err(e.into()))?;
                    n
                }
            }
        };
        tx.commit().map_err(|e| err(e.into()))?;
        Ok(removed)
    }

    /// Whether the request with this keyed hash was already done.
    pub fn is_done(&self, id: &[u8]) -> Result<bool, StateError> {
        let err = self.db_err("cannot read the dedup set");
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = tx.open_table(DONE).map_err(|e| err(e.into()))?;
        Ok(table.get(id).map_err(|e| err(e.into()))?.is_some())
    }

    /// Forgets ledger entries done before `before_ms` (they outlived the stream's
    /// retention, so their records can no longer be read again). Returns how many.
    pub fn expire_done(&self, before_ms: u64) -> Result<u64, StateError> {
        let err = self.db_err("cannot expire the dedup set");
        let tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        let mut removed = 0;
        {
            let mut table = tx.open_table(DONE).map_err(|e| err(e.into()))?;
            table
                .retain(|_, done_at| {
                    let keep = done_at >= before_ms;
                    removed += u64::from(!keep);
                    keep
                })
                .map_err(|e| err(e.into()))?;
        }
        tx.commit().map_err(|e| err(e.into()))?;
        Ok(removed)
    }

    pub fn dead_letters(&self) -> Result<Vec<(u64, DeadLetter)>, StateError> {
        let err = self.db_err("cannot read dead letters");
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = tx.open_table(DEAD_LETTERS).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (k, v) = entry.map_err(|e| err(e.into()))?;
            out.push((k.value(), self.parse("dead letter", v.value())?));
        }
        Ok(out)
    }

    pub fn dead_letter(&self, id: u64) -> Result<DeadLetter, StateError> {
        self.dead_letters()?
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, letter)| letter)
            .ok_or(StateError::NoDeadLetter {
                path: self.path.clone(),
                id,
            })
    }

    /// How many dead letters are pending, and when the oldest was stored (ms).
    pub fn dead_letter_stats(&self) -> Result<(u64, Option<u64>), StateError> {
        let err = self.db_err("cannot read dead letters");
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = tx.open_table(DEAD_LETTERS).map_err(|e| err(e.into()))?;
        let count = table.len().map_err(|e| err(e.into()))?;
        let oldest = match table.first().map_err(|e| err(e.into()))? {
            Some((_, v)) => Some(
                self.parse::<DeadLetter>("dead letter", v.value())?
                    .created_at_ms,
            ),
            None => None,
        };
        Ok((count, oldest))
    }

    /// Audit entries whose time is in `[since_ms, until_ms)`, oldest first.
    pub fn audit(&self, since_ms: u64, until_ms: u64) -> Result<Vec<AuditEntry>, StateError> {
        let err = self.db_err("cannot read the audit trail");
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = tx.open_table(AUDIT).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (_, v) = entry.map_err(|e| err(e.into()))?;
            let entry: AuditEntry = self.parse("audit entry", v.value())?;
            if entry.time_ms >= since_ms && entry.time_ms < until_ms {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Sizes and version, for `gdpr-consumer state`.
    pub fn summary(&self) -> Result<serde_json::Value, StateError> {
        let err = self.db_err("cannot read");
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let meta = tx.open_table(META).map_err(|e| err(e.into()))?;
        let version = meta
            .get("schema_version")
            .map_err(|e| err(e.into()))?
            .map(|v| v.value());
        let done = tx.open_table(DONE).map_err(|e| err(e.into()))?;
        let done = done.len().map_err(|e| err(e.into()))?;
        let audit = tx.open_table(AUDIT).map_err(|e| err(e.into()))?;
        let audit = audit.len().map_err(|e| err(e.into()))?;
        drop(tx);
        let (dead_letters, oldest) = self.dead_letter_stats()?;
        let checkpoints: Vec<serde_json::Value> = self
            .checkpoints()?
            .into_iter()
            .map(|(shard_id, c)| {
                serde_json::json!({"shard_id": shard_id, "sequence_number": c.sequence_number, "shard_end": c.shard_end})
            })
            .collect();
        Ok(serde_json::json!({
            "path": self.path,
            "schema_version": version,
            "checkpoints": checkpoints,
            "dedup_entries": done,
            "dead_letters_pending": dead_letters,
            "oldest_dead_letter": oldest.map(|ms| crate::clock::rfc3339(ms as i64)),
            "audit_entries": audit,
        }))
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        bytes: &[u8],
    ) -> Result<T, StateError> {
        serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            what,
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter() -> DeadLetter {
        DeadLetter {
            created_at_ms: 1,
            stream: "s".into(),
            shard_id: "shard-1".into(),
            sequence_number: "43".into(),
            sub_sequence_number: 0,
            arrival_time: "1970-01-01T00:00:00Z".into(),
            rule: "r".into(),
            rule_file: "rules/r.rhai".into(),
            rules_hash: "abc".into(),
            reason: DeadLetterReason::RuleFailed {
                error: "boom".into(),
                sealed_record: "00".into(),
            },
        }
    }

    /// Shards committing at once: each writer's writes are durable when it is answered,
    /// with dead letter ids of its own, whichever group they were committed in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_commits_and_get_their_own_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let state = Arc::new(State::open(&path).unwrap());
        let writers = (0..32u8).map(|n| {
            let state = state.clone();
            tokio::spawn(async move {
                let ids = state
                    .commit_shared(Writes {
                        checkpoints: vec![(format!("shard-{n}"), Checkpoint::at(n.to_string()))],
                        done: vec![[n; 32]],
                        dead_letters: vec![letter()],
                        ..Writes::default()
                    })
                    .await
                    .unwrap();
                assert!(state.is_done(&[n; 32]).unwrap(), "durable when answered");
                ids
            })
        });
        let mut ids: Vec<u64> = Vec::new();
        for writer in writers.collect::<Vec<_>>() {
            ids.extend(writer.await.unwrap());
        }
        ids.sort();
        assert_eq!(ids, (1..=32).collect::<Vec<u64>>());
        // The last leader lets go of the state once it finds nothing more waiting.
        while Arc::strong_count(&state) > 1 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop(state);
        let reopened = State::open(&path).unwrap();
        for n in 0..32u8 {
            assert_eq!(
                reopened.checkpoint(&format!("shard-{n}")).unwrap(),
                Some(Checkpoint::at(n.to_string()))
            );
        }
    }

    #[test]
    fn round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = State::open(&path).unwrap();
            let ids = s
                .commit(Writes {
                    checkpoints: vec![("shard-1".into(), Checkpoint::at("42".into()))],
                    done: vec![[1; 32]],
                    dead_letters: vec![letter(), letter()],
                    ..Writes::default()
                })
                .unwrap();
            assert_eq!(ids, [1, 2]);
            // A resolved id is not given out again.
            s.commit(Writes {
                resolved_dead_letters: vec![2],
                ..Writes::default()
            })
            .unwrap();
            let ids = s
                .commit(Writes {
                    dead_letters: vec![letter()],
                    ..Writes::default()
                })
                .unwrap();
            assert_eq!(ids, [3]);
        }
        let s = State::open(&path).unwrap();
        assert_eq!(
            s.checkpoint("shard-1").unwrap(),
            Some(Checkpoint::at("42".into()))
        );
        assert!(s.is_done(&[1; 32]).unwrap());
        assert!(!s.is_done(&[2; 32]).unwrap());
        let ids: Vec<u64> = s
            .dead_letters()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, [1, 3]);
        assert_eq!(s.reset_checkpoints(None).unwrap(), 1);
        assert_eq!(s.checkpoint("shard-1").unwrap(), None);
        assert_eq!(s.expire_done(u64::MAX).unwrap(), 1);
        assert!(!s.is_done(&[1; 32]).unwrap());
    }

    #[test]
    fn the_done_set_reads_without_a_write_lock_and_leaves_the_file_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = State::open(&path).unwrap();
            s.commit(Writes {
                done: vec![[7; 32]],
                ..Writes::default()
            })
            .unwrap();
            // While a daemon owns the file, a reader is told so.
            assert!(matches!(
                State::read_done_set(&path),
                Err(StateError::Locked { .. })
            ));
        }
        let before = std::fs::read(&path).unwrap();
        let done = State::read_done_set(&path).unwrap();
        assert!(done.contains(&[7u8; 32]));
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn a_second_owner_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let _first = State::open(&path).unwrap();
        let err = State::open(&path).err().expect("second open must fail");
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
    }
}
