//! Durable state in one redb file: shard checkpoints, the dedup set of requests already
//! done, and dead letters.
//!
//! The file is locked by the daemon that opens it, so two daemons can never share it.
//! Every write commits durably before the caller moves on: a checkpoint is written only
//! after the decisions of the records it covers are settled here.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::source::Checkpoint;

const SCHEMA_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// shard id → JSON [`Checkpoint`].
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
/// keyed hash of (action, key) → when it was done (ms since the epoch).
const DONE: TableDefinition<&[u8], u64> = TableDefinition::new("done");
/// id → JSON [`DeadLetter`].
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

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
}

/// Why a record or a decision could not be settled, kept for an operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// A rule failed on the record (or returned an invalid decision).
    RuleFailed {
        error: String,
        /// The record's payload, hex, so the record can be re-run later.
        payload_hex: String,
    },
    /// The backend refused the request or could not be reached.
    ActionFailed {
        action: String,
        key: String,
        params: serde_json::Map<String, serde_json::Value>,
        error: String,
        attempts: u32,
        retryable: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub created_at_ms: u64,
    pub stream: String,
    pub shard_id: String,
    pub sequence_number: String,
    pub sub_sequence_number: u64,
    pub partition_key: String,
    pub arrival_time: String,
    /// The rule that failed or made the decision, its file, and the hash of its rule set.
    pub rule: String,
    pub rule_file: String,
    pub rules_hash: String,
    #[serde(flatten)]
    pub reason: DeadLetterReason,
}

pub struct State {
    db: Database,
    path: PathBuf,
}

impl State {
    /// Opens (creating if needed) and locks the state file.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let db = Database::create(path).map_err(|e| match e {
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
        }
        tx.commit().map_err(|e| err(e.into()))
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

    pub fn set_checkpoint(
        &self,
        shard_id: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), StateError> {
        let err = self.db_err("cannot write checkpoint");
        let bytes = serde_json::to_vec(checkpoint).expect("a checkpoint serializes");
        let tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut table = tx.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
            table
                .insert(shard_id, bytes.as_slice())
                .map_err(|e| err(e.into()))?;
        }
        tx.commit().map_err(|e| err(e.into()))
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

    pub fn mark_done(&self, id: &[u8]) -> Result<(), StateError> {
        let err = self.db_err("cannot write the dedup set");
        let tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut table = tx.open_table(DONE).map_err(|e| err(e.into()))?;
            table.insert(id, now_ms()).map_err(|e| err(e.into()))?;
        }
        tx.commit().map_err(|e| err(e.into()))
    }

    pub fn add_dead_letter(&self, letter: &DeadLetter) -> Result<u64, StateError> {
        let err = self.db_err("cannot write a dead letter");
        let bytes = serde_json::to_vec(letter).expect("a dead letter serializes");
        let tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        let id = {
            let mut table = tx.open_table(DEAD_LETTERS).map_err(|e| err(e.into()))?;
            let last = table
                .last()
                .map_err(|e| err(e.into()))?
                .map(|(k, _)| k.value());
            let id = last.map_or(1, |k| k + 1);
            table
                .insert(id, bytes.as_slice())
                .map_err(|e| err(e.into()))?;
            id
        };
        tx.commit().map_err(|e| err(e.into()))?;
        Ok(id)
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
        }))
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

    #[test]
    fn round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = State::open(&path).unwrap();
            s.set_checkpoint("shard-1", &Checkpoint::at("42".into()))
                .unwrap();
            s.mark_done(b"hash").unwrap();
            let letter = DeadLetter {
                created_at_ms: 1,
                stream: "s".into(),
                shard_id: "shard-1".into(),
                sequence_number: "43".into(),
                sub_sequence_number: 0,
                partition_key: "pk".into(),
                arrival_time: "1970-01-01T00:00:00Z".into(),
                rule: "r".into(),
                rule_file: "rules/r.rhai".into(),
                rules_hash: "abc".into(),
                reason: DeadLetterReason::RuleFailed {
                    error: "boom".into(),
                    payload_hex: "00".into(),
                },
            };
            assert_eq!(s.add_dead_letter(&letter).unwrap(), 1);
            assert_eq!(s.add_dead_letter(&letter).unwrap(), 2);
        }
        let s = State::open(&path).unwrap();
        assert_eq!(
            s.checkpoint("shard-1").unwrap(),
            Some(Checkpoint::at("42".into()))
        );
        assert!(s.is_done(b"hash").unwrap());
        assert!(!s.is_done(b"other").unwrap());
        assert_eq!(s.dead_letters().unwrap().len(), 2);
        assert_eq!(s.reset_checkpoints(None).unwrap(), 1);
        assert_eq!(s.checkpoint("shard-1").unwrap(), None);
    }

    #[test]
    fn the_done_set_reads_without_a_write_lock_and_leaves_the_file_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = State::open(&path).unwrap();
            s.mark_done(&[7u8; 32]).unwrap();
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
