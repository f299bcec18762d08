//! The single daemon's state: one redb file, locked by the daemon that opens it.
//!
//! Writes are gathered into [`Writes`] and committed in one transaction: once per batch of
//! records, and right after each backend call, so a checkpoint never lands before the
//! outcomes of the records it covers; writes of shards committing at the same moment share
//! one transaction and one disk sync ([`LocalState::commit_shared`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::*;
use crate::clock::now_ms;
use crate::keys::{KeyError, KeySource, Keys};
use crate::source::Checkpoint;

/// 2: the state records its keys' fingerprints, and dead letters are sealed bound to their
/// id and kind (a v1 file is migrated when a writer first opens it).
pub(super) const SCHEMA_VERSION: u64 = 2;

/// Pages of the state file kept in memory. redb's default (1 GiB) would let the daemon's
/// memory grow with its audit trail for months; the hot pages (recent ledger entries, the
/// checkpoints, the end of the audit table) fit in far less.
const CACHE_BYTES: usize = 32 << 20;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `key_fingerprints`: fingerprints of every key the state was written with, comma-separated.
const META_TEXT: TableDefinition<&str, &str> = TableDefinition::new("meta_text");
/// shard id → JSON [`Checkpoint`].
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
/// keyed hash of (action, key) → when it was done (ms since the epoch).
const DONE: TableDefinition<&[u8], u64> = TableDefinition::new("done");
/// id → JSON [`DeadLetter`].
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// [`DeadLetter::index_key`] → id of the pending letter: a record or request that already
/// waits in a letter (read again after a checkpoint reset, say) is not dead-lettered twice.
const LETTER_INDEX: TableDefinition<&str, u64> = TableDefinition::new("letter_index");
/// action → JSON [`Pause`]: actions an operator paused.
const PAUSES: TableDefinition<&str, &[u8]> = TableDefinition::new("pauses");
/// id (in arrival order) → JSON [`Held`]: requests of paused actions, held until resumed.
const HELD: TableDefinition<u64, &[u8]> = TableDefinition::new("held");
/// keyed hash of a request's key (hex) → JSON [`Request`]: the legal record of each
/// request, kept for good (CCPA §7101 asks for 24 months; nothing expires it).
const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("requests");
/// keyed hash (hex) → JSON [`OpenRequest`]: the requests still owed an answer.
const OPEN_REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("open_requests");
/// id → JSON [`Job`]: jobs the backend accepted and has not finished.
const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
/// id (in order of writing) → JSON [`AuditEntry`]. Append-only, never expired.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// The daemon's file, or a read-only view of one (inspection commands, a backup).
enum Db {
    Writable(Database),
    ReadOnly(redb::ReadOnlyDatabase),
    /// Closed to be opened again (after a write error), and not open yet.
    Closed,
}

pub struct LocalState {
    /// Swapped only to reopen the file after a write error (redb then wants it closed and
    /// opened again); transactions hold no borrow of it.
    db: std::sync::RwLock<Db>,
    path: PathBuf,
    group: Mutex<Group>,
    /// The next dead letter id: ids are given out before a letter is sealed (its seal is
    /// bound to its id) and never reused.
    next_dead_letter_id: AtomicU64,
    next_held_id: AtomicU64,
    next_job_id: AtomicU64,
    /// Set by an I/O error: the file must be closed and opened again before it is used.
    needs_reopen: AtomicBool,
}

/// Writers waiting for the next group commit, and whether a leader is committing.
#[derive(Default)]
struct Group {
    waiting: Vec<(Writes, Answer)>,
    leading: bool,
}

type Answer = tokio::sync::oneshot::Sender<Result<(), StateError>>;

/// How a state file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The daemon: creates the state (and its key) on a first start, locks the file.
    Run,
    /// A repair command: the file must exist; locks it.
    Write,
    /// An inspection command: the file must exist; read-only (a backup, a file the user
    /// may not write), falling back to a writer's open only to recover an unclean stop.
    Read,
    /// Dry-run: read-only, never a writer's open, whatever the file's condition.
    Peek,
}

impl LocalState {
    /// Opens the state file and its keys, checking that they belong together.
    ///
    /// A key is generated only when the state file does not exist yet ([`Access::Run`]); a
    /// missing or foreign key, or an empty, truncated or corrupt file, is an error that
    /// says what to restore — never a fresh start.
    pub fn open(
        path: &Path,
        source: KeySource,
        access: Access,
    ) -> Result<(Self, Keys), StateError> {
        let exists = path.exists();
        if !exists && access != Access::Run {
            return Err(StateError::Missing {
                path: path.to_owned(),
            });
        }
        let keys = match (Keys::load(source)?, exists) {
            (Some(keys), true) => keys,
            (Some(keys), false) => {
                tracing::warn!(
                    event = "new_state",
                    path = %path.display(),
                    "no state file: starting a new one with the existing key; it remembers no request, so every request still in the stream is sent again (restore the state file if this is not meant)"
                );
                keys
            }
            (None, false) => Keys::generate(source.file)?,
            (None, true) => {
                return Err(StateError::KeyMissing {
                    path: path.to_owned(),
                    keys: source.to_string(),
                })
            }
        };
        // A writer's open changes the file (redb's header) even when the keys turn out not
        // to be this state's: a foreign key or a newer schema is found read-only first.
        if exists && access != Access::Read && access != Access::Peek {
            // Anything else (an unclean stop to recover, say) is the writer's to handle.
            if let Err(
                e @ (StateError::KeyMismatch { .. }
                | StateError::Schema { .. }
                | StateError::Locked { .. }),
            ) = Self::open(path, source, Access::Peek)
            {
                return Err(e);
            }
        }
        if exists && std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) == 0 {
            return Err(StateError::Damaged {
                path: path.to_owned(),
                reason: "the file is empty".into(),
            });
        }
        if !exists {
            create_private(path).map_err(|e| StateError::Damaged {
                path: path.to_owned(),
                reason: format!("cannot create it: {e}"),
            })?;
        }
        let db = match access {
            Access::Read | Access::Peek => match guarded(path, || {
                redb::Builder::new()
                    .set_cache_size(CACHE_BYTES)
                    .open_read_only(path)
            })? {
                Ok(db) => Db::ReadOnly(db),
                // Not closed cleanly: only a writer can recover it.
                Err(redb::DatabaseError::RepairAborted) if access == Access::Read => {
                    Db::Writable(open_writable(path)?)
                }
                Err(e) => return Err(open_error(path, e)),
            },
            Access::Run | Access::Write => Db::Writable(open_writable(path)?),
        };
        let state = LocalState {
            db: std::sync::RwLock::new(db),
            path: path.to_owned(),
            group: Mutex::default(),
            next_dead_letter_id: AtomicU64::new(0),
            next_held_id: AtomicU64::new(0),
            next_job_id: AtomicU64::new(0),
            needs_reopen: AtomicBool::new(false),
        };
        state.init(&keys, &source.to_string())?;
        Ok((state, keys))
    }

    /// The whole dedup set (dry-run marks requests already done with it).
    pub fn done_set(&self) -> Result<HashSet<[u8; 32]>, StateError> {
        let err = self.db_err("cannot read the dedup set");
        let tx = self.read_tx(&err)?;
        let table = tx.open_table(DONE).map_err(|e| err(e.into()))?;
        let mut done = HashSet::new();
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (key, _) = entry.map_err(|e| err(e.into()))?;
            if let Ok(id) = <[u8; 32]>::try_from(key.value()) {
                done.insert(id);
            }
        }
        Ok(done)
    }

    fn db_err(&self, context: &'static str) -> impl Fn(redb::Error) -> StateError + '_ {
        move |e| {
            // After an I/O error redb refuses everything until the file is opened again:
            // the next transaction does that first.
            if matches!(e, redb::Error::PreviousIo | redb::Error::Io(_)) {
                self.needs_reopen.store(true, Ordering::SeqCst);
            }
            StateError::Db {
                path: self.path.clone(),
                context,
                source: Box::new(e),
            }
        }
    }

    /// Opens the file again if it is closed, or an I/O error said it must be.
    fn reopen_if_needed(&self) -> Result<(), StateError> {
        let closed = matches!(&*self.db.read().expect("state lock"), Db::Closed);
        if closed || self.needs_reopen.load(Ordering::SeqCst) {
            self.reopen()?;
        }
        Ok(())
    }

    fn read_tx(
        &self,
        err: &impl Fn(redb::Error) -> StateError,
    ) -> Result<redb::ReadTransaction, StateError> {
        self.reopen_if_needed()?;
        match &*self.db.read().expect("state lock") {
            Db::Writable(db) => db.begin_read().map_err(|e| err(e.into())),
            Db::ReadOnly(db) => db.begin_read().map_err(|e| err(e.into())),
            Db::Closed => Err(StateError::Closed {
                path: self.path.clone(),
            }),
        }
    }

    fn write_tx(
        &self,
        err: &impl Fn(redb::Error) -> StateError,
    ) -> Result<redb::WriteTransaction, StateError> {
        self.reopen_if_needed()?;
        match &*self.db.read().expect("state lock") {
            Db::Writable(db) => db.begin_write().map_err(|e| err(e.into())),
            Db::ReadOnly(_) => Err(StateError::ReadOnly {
                path: self.path.clone(),
            }),
            Db::Closed => Err(StateError::Closed {
                path: self.path.clone(),
            }),
        }
    }

    fn is_writable(&self) -> bool {
        !matches!(&*self.db.read().expect("state lock"), Db::ReadOnly(_))
    }

    /// Closes the file and opens it again: after a write error (a full disk, an I/O error)
    /// redb refuses every further write until then.
    fn reopen(&self) -> Result<(), StateError> {
        let mut db = self.db.write().expect("state lock");
        if matches!(&*db, Db::ReadOnly(_)) {
            return Err(StateError::ReadOnly {
                path: self.path.clone(),
            });
        }
        drop(std::mem::replace(&mut *db, Db::Closed));
        *db = Db::Writable(open_writable(&self.path)?);
        self.needs_reopen.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Checks the schema version and the keys; a writer also creates the tables, records
    /// a new current key and migrates a v1 file.
    fn init(&self, keys: &Keys, key_names: &str) -> Result<(), StateError> {
        let err = self.db_err("cannot initialise");
        let fingerprints = keys.fingerprints();
        if !self.is_writable() {
            let tx = self.read_tx(&err)?;
            let meta = tx.open_table(META).map_err(|e| err(e.into()))?;
            let version = meta
                .get("schema_version")
                .map_err(|e| err(e.into()))?
                .map(|v| v.value());
            self.check_version(version)?;
            let known = match tx.open_table(META_TEXT) {
                Ok(table) => table
                    .get("key_fingerprints")
                    .map_err(|e| err(e.into()))?
                    .map(|v| v.value().to_owned()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(err(e.into())),
            };
            return self.check_keys(known.as_deref(), &fingerprints, key_names);
        };
        let tx = self.write_tx(&err)?;
        let (migrate, rotated) = {
            let mut meta = tx.open_table(META).map_err(|e| err(e.into()))?;
            let version = meta
                .get("schema_version")
                .map_err(|e| err(e.into()))?
                .map(|v| v.value());
            self.check_version(version)?;
            meta.insert("schema_version", SCHEMA_VERSION)
                .map_err(|e| err(e.into()))?;
            let next_id = meta
                .get("dead_letter_ids")
                .map_err(|e| err(e.into()))?
                .map_or(0, |v| v.value())
                + 1;
            self.next_dead_letter_id.store(next_id, Ordering::SeqCst);
            let next_held = meta
                .get("held_ids")
                .map_err(|e| err(e.into()))?
                .map_or(0, |v| v.value())
                + 1;
            self.next_held_id.store(next_held, Ordering::SeqCst);
            let next_job = meta
                .get("job_ids")
                .map_err(|e| err(e.into()))?
                .map_or(0, |v| v.value())
                + 1;
            self.next_job_id.store(next_job, Ordering::SeqCst);
            let mut text = tx.open_table(META_TEXT).map_err(|e| err(e.into()))?;
            let read = |text: &redb::Table<&str, &str>, name| {
                text.get(name)
                    .map(|v| v.map(|v| v.value().to_owned()))
                    .map_err(|e| err(e.into()))
            };
            let known = read(&text, "key_fingerprints")?;
            let current = read(&text, "current_key")?;
            self.check_keys(known.as_deref(), &fingerprints, key_names)?;
            let mut all: Vec<&str> = known.as_deref().unwrap_or("").split(',').collect();
            all.retain(|f| !f.is_empty());
            if !all.contains(&fingerprints[0].as_str()) {
                all.push(&fingerprints[0]);
            }
            text.insert("key_fingerprints", all.join(",").as_str())
                .map_err(|e| err(e.into()))?;
            text.insert("current_key", fingerprints[0].as_str())
                .map_err(|e| err(e.into()))?;
            tx.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
            tx.open_table(DONE).map_err(|e| err(e.into()))?;
            tx.open_table(DEAD_LETTERS).map_err(|e| err(e.into()))?;
            tx.open_table(AUDIT).map_err(|e| err(e.into()))?;
            tx.open_table(LETTER_INDEX).map_err(|e| err(e.into()))?;
            tx.open_table(PAUSES).map_err(|e| err(e.into()))?;
            tx.open_table(HELD).map_err(|e| err(e.into()))?;
            let rotated = current.is_some_and(|c| c != fingerprints[0]);
            (version == Some(1), rotated)
        };
        if migrate || rotated {
            // A v1 letter was sealed without its id and kind as associated data.
            let n = self.reseal_in(&tx, keys, |keys, sealed, context| {
                keys.unseal(sealed, context).or_else(|e| {
                    if migrate {
                        keys.unseal(sealed, b"")
                    } else {
                        Err(e)
                    }
                })
            })?;
            tracing::info!(
                event = "state_resealed",
                path = %self.path.display(),
                dead_letters = n,
                schema_migrated = migrate,
                new_key = rotated,
                "dead letters sealed again (under the current key, bound to their id)"
            );
        }
        tx.commit().map_err(|e| err(e.into()))
    }

    fn check_version(&self, found: Option<u64>) -> Result<(), StateError> {
        match found {
            Some(v) if v > SCHEMA_VERSION => Err(StateError::Schema {
                path: self.path.clone(),
                found: v,
            }),
            _ => Ok(()),
        }
    }

    /// Every key the state was written with must be in the ring.
    fn check_keys(
        &self,
        known: Option<&str>,
        ring: &[String],
        key_names: &str,
    ) -> Result<(), StateError> {
        let missing: Vec<&str> = known
            .unwrap_or("")
            .split(',')
            .filter(|f| !f.is_empty() && !ring.iter().any(|r| r == f))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(StateError::KeyMismatch {
            path: self.path.clone(),
            keys: key_names.to_owned(),
            missing: missing
                .iter()
                .map(|f| format!("fingerprint {f}"))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    fn reseal_in(
        &self,
        tx: &redb::WriteTransaction,
        keys: &Keys,
        open: impl Fn(&Keys, &str, &[u8]) -> Result<Vec<u8>, KeyError>,
    ) -> Result<u64, StateError> {
        let err = self.db_err("cannot re-seal dead letters");
        let mut table = tx.open_table(DEAD_LETTERS).map_err(|e| err(e.into()))?;
        let mut letters = Vec::new();
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (k, v) = entry.map_err(|e| err(e.into()))?;
            letters.push((
                k.value(),
                self.parse::<DeadLetter>("dead letter", v.value())?,
            ));
        }
        let mut index = tx.open_table(LETTER_INDEX).map_err(|e| err(e.into()))?;
        for (id, mut letter) in letters.iter().cloned() {
            index
                .insert(letter.index_key().as_str(), id)
                .map_err(|e| err(e.into()))?;
            let context = DeadLetter::seal_context(id, letter.reason.kind());
            let plain =
                open(keys, letter.reason.sealed(), &context).map_err(|_| StateError::Unseal {
                    path: self.path.clone(),
                    id,
                })?;
            *letter.reason.sealed_mut() = keys.seal(&plain, &context);
            let bytes = serde_json::to_vec(&letter).expect("a dead letter serializes");
            table
                .insert(id, bytes.as_slice())
                .map_err(|e| err(e.into()))?;
        }
        Ok(letters.len() as u64)
    }

    /// Opens the file again, then writes and syncs a small marker: whether the state can be
    /// written now (after a failed commit, before any backend call).
    pub fn probe_write(&self) -> Result<(), StateError> {
        let err = self.db_err("cannot write");
        self.reopen()?;
        let tx = self.write_tx(&err)?;
        {
            let mut meta = tx.open_table(META).map_err(|e| err(e.into()))?;
            meta.insert("write_probe", now_ms())
                .map_err(|e| err(e.into()))?;
        }
        tx.commit().map_err(|e| err(e.into()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new dead letter id, never given out before.
    pub fn new_dead_letter_id(&self) -> u64 {
        self.next_dead_letter_id.fetch_add(1, Ordering::SeqCst)
    }

    /// Commits one set of writes in its own transaction.
    pub fn commit(&self, writes: Writes) -> Result<(), StateError> {
        if writes.is_empty() {
            return Ok(());
        }
        self.commit_group(std::slice::from_ref(&writes))
    }

    /// Commits `writes` together with whatever other shards are committing at the same
    /// moment: one transaction and one disk sync for all of them (group commit), done off
    /// the async threads. Returns when the writes are durable.
    pub async fn commit_shared(self: &Arc<Self>, writes: Writes) -> Result<(), StateError> {
        if writes.is_empty() {
            return Ok(());
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
                Ok(()) => {
                    for answer in answers {
                        let _ = answer.send(Ok(()));
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

    fn commit_group(&self, group: &[Writes]) -> Result<(), StateError> {
        let err = self.db_err("cannot commit");
        let tx = self.write_tx(&err)?;
        for writes in group {
            self.apply(&tx, writes)?;
        }
        tx.commit().map_err(|e| err(e.into()))
    }

    fn apply(&self, tx: &redb::WriteTransaction, writes: &Writes) -> Result<(), StateError> {
        let err = self.db_err("cannot commit");
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
            let mut index = tx.open_table(LETTER_INDEX).map_err(|e| err(e.into()))?;
            for id in &writes.resolved_dead_letters {
                let removed = letters.remove(id).map_err(|e| err(e.into()))?;
                if let Some(letter) = removed {
                    let letter: DeadLetter = self.parse("dead letter", letter.value())?;
                    let key = letter.index_key();
                    let points_here = index
                        .get(key.as_str())
                        .map_err(|e| err(e.into()))?
                        .is_some_and(|v| v.value() == *id);
                    if points_here {
                        index.remove(key.as_str()).map_err(|e| err(e.into()))?;
                    }
                }
            }
            let mut highest = 0;
            for (id, letter) in &writes.dead_letters {
                let bytes = serde_json::to_vec(letter).expect("a dead letter serializes");
                letters
                    .insert(id, bytes.as_slice())
                    .map_err(|e| err(e.into()))?;
                index
                    .insert(letter.index_key().as_str(), id)
                    .map_err(|e| err(e.into()))?;
                highest = highest.max(*id);
            }
            for (id, letter) in &writes.retried_dead_letters {
                if letters.get(id).map_err(|e| err(e.into()))?.is_some() {
                    let bytes = serde_json::to_vec(letter).expect("a dead letter serializes");
                    letters
                        .insert(id, bytes.as_slice())
                        .map_err(|e| err(e.into()))?;
                }
            }
            if highest > self.meta_counter(tx, "dead_letter_ids")? {
                self.set_meta_counter(tx, "dead_letter_ids", highest)?;
            }
            let mut pauses = tx.open_table(PAUSES).map_err(|e| err(e.into()))?;
            for (action, pause) in &writes.pauses {
                match pause {
                    Some(pause) => {
                        let bytes = serde_json::to_vec(pause).expect("a pause serializes");
                        pauses
                            .insert(action.as_str(), bytes.as_slice())
                            .map_err(|e| err(e.into()))?;
                    }
                    None => {
                        pauses.remove(action.as_str()).map_err(|e| err(e.into()))?;
                    }
                }
            }
            let mut held = tx.open_table(HELD).map_err(|e| err(e.into()))?;
            let mut highest = 0;
            for (id, request) in &writes.held {
                let bytes = serde_json::to_vec(request).expect("a held request serializes");
                held.insert(id, bytes.as_slice())
                    .map_err(|e| err(e.into()))?;
                index
                    .insert(held_index_key(&request.request_id).as_str(), id)
                    .map_err(|e| err(e.into()))?;
                highest = highest.max(*id);
            }
            for id in &writes.released {
                if let Some(request) = held.remove(id).map_err(|e| err(e.into()))? {
                    let request: Held = self.parse("held request", request.value())?;
                    index
                        .remove(held_index_key(&request.request_id).as_str())
                        .map_err(|e| err(e.into()))?;
                }
            }
            if highest > self.meta_counter(tx, "held_ids")? {
                self.set_meta_counter(tx, "held_ids", highest)?;
            }
            let mut jobs = tx.open_table(JOBS).map_err(|e| err(e.into()))?;
            let mut highest = 0;
            for (id, job) in &writes.jobs {
                let bytes = serde_json::to_vec(job).expect("a job serializes");
                jobs.insert(id, bytes.as_slice())
                    .map_err(|e| err(e.into()))?;
                index
                    .insert(job_index_key(&job.request_id).as_str(), id)
                    .map_err(|e| err(e.into()))?;
                highest = highest.max(*id);
            }
            for (id, job, _) in &writes.polled_jobs {
                // One poller at a time here: only a job finished meanwhile is not brought back.
                if jobs.get(id).map_err(|e| err(e.into()))?.is_some() {
                    let bytes = serde_json::to_vec(job).expect("a job serializes");
                    jobs.insert(id, bytes.as_slice())
                        .map_err(|e| err(e.into()))?;
                }
            }
            for id in &writes.jobs_finished {
                if let Some(job) = jobs.remove(id).map_err(|e| err(e.into()))? {
                    let job: Job = self.parse("job", job.value())?;
                    index
                        .remove(job_index_key(&job.request_id).as_str())
                        .map_err(|e| err(e.into()))?;
                }
            }
            if highest > self.meta_counter(tx, "job_ids")? {
                self.set_meta_counter(tx, "job_ids", highest)?;
            }
            let mut milestones = Vec::new();
            for (id, change) in &writes.requests {
                match self.change_in(tx, id, change)? {
                    Ok((_, entry)) => milestones.extend(entry),
                    Err(refused) => {
                        tracing::warn!(request = %id, %refused, "a request change does not apply")
                    }
                }
            }
            let mut audit = tx.open_table(AUDIT).map_err(|e| err(e.into()))?;
            for entry in writes.audit.iter().chain(&milestones) {
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
        Ok(())
    }

    /// Applies one change to a request inside `tx`, keeping the open index and the
    /// answered counts with it.
    fn change_in(
        &self,
        tx: &redb::WriteTransaction,
        id: &str,
        change: &Change,
    ) -> Result<Result<(Request, Option<AuditEntry>), String>, StateError> {
        let err = self.db_err("cannot record a request");
        let mut requests = tx.open_table(REQUESTS).map_err(|e| err(e.into()))?;
        let current: Option<Request> = match requests.get(id).map_err(|e| err(e.into()))? {
            Some(v) => Some(self.parse("request", v.value())?),
            None => None,
        };
        let was = current.as_ref().map(Request::status);
        let (request, entry) = match super::change(id, current, change) {
            Ok(changed) => changed,
            Err(refused) => return Ok(Err(refused)),
        };
        let bytes = serde_json::to_vec(&request).expect("a request serializes");
        requests
            .insert(id, bytes.as_slice())
            .map_err(|e| err(e.into()))?;
        let mut open = tx.open_table(OPEN_REQUESTS).map_err(|e| err(e.into()))?;
        match OpenRequest::of(&request) {
            Some(entry) => {
                let bytes = serde_json::to_vec(&entry).expect("serializes");
                open.insert(id, bytes.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            None => {
                open.remove(id).map_err(|e| err(e.into()))?;
            }
        }
        drop((requests, open));
        let now = request.status();
        if was != Some(now) {
            for (status, step) in [(was, -1i64), (Some(now), 1)] {
                if let Some(counter) = status.and_then(answered_counter) {
                    let value = self.meta_counter(tx, counter)?;
                    self.set_meta_counter(tx, counter, value.saturating_add_signed(step))?;
                }
            }
        }
        Ok(Ok((request, entry)))
    }

    pub fn request(&self, id: &str) -> Result<Option<Request>, StateError> {
        let err = self.db_err("cannot read the requests");
        let tx = self.read_tx(&err)?;
        let table = match tx.open_table(REQUESTS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(err(e.into())),
        };
        let value = table.get(id).map_err(|e| err(e.into()))?;
        value.map(|v| self.parse("request", v.value())).transpose()
    }

    pub fn requests_after(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Request)>, StateError> {
        let err = self.db_err("cannot read the requests");
        let tx = self.read_tx(&err)?;
        let table = match tx.open_table(REQUESTS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(e.into())),
        };
        let mut out = Vec::new();
        for entry in table.range(after..).map_err(|e| err(e.into()))? {
            let (k, v) = entry.map_err(|e| err(e.into()))?;
            if k.value() == after {
                continue;
            }
            out.push((k.value().to_owned(), self.parse("request", v.value())?));
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    pub fn change_request(
        &self,
        id: &str,
        change: Change,
    ) -> Result<Result<Request, String>, StateError> {
        let err = self.db_err("cannot record a request");
        let tx = self.write_tx(&err)?;
        let (request, entry) = match self.change_in(&tx, id, &change)? {
            Ok(changed) => changed,
            Err(refused) => return Ok(Err(refused)),
        };
        self.apply(
            &tx,
            &Writes {
                audit: entry.into_iter().collect(),
                ..Writes::default()
            },
        )?;
        tx.commit().map_err(|e| err(e.into()))?;
        Ok(Ok(request))
    }

    /// The open requests, and how many were completed and denied.
    pub fn request_counts(&self) -> Result<RequestCounts, StateError> {
        let err = self.db_err("cannot read the requests");
        let tx = self.read_tx(&err)?;
        let meta = tx.open_table(META).map_err(|e| err(e.into()))?;
        let counter = |name| -> Result<u64, StateError> {
            Ok(meta
                .get(name)
                .map_err(|e| err(e.into()))?
                .map_or(0, |v| v.value()))
        };
        let (complete, denied) = (counter("requests_complete")?, counter("requests_denied")?);
        let mut open = Vec::new();
        match tx.open_table(OPEN_REQUESTS) {
            Ok(table) => {
                for entry in table.iter().map_err(|e| err(e.into()))? {
                    let (k, v) = entry.map_err(|e| err(e.into()))?;
                    open.push((k.value().to_owned(), self.parse("open request", v.value())?));
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(err(e.into())),
        }
        Ok(RequestCounts {
            open,
            complete,
            denied,
        })
    }

    pub fn new_job_id(&self) -> u64 {
        self.next_job_id.fetch_add(1, Ordering::SeqCst)
    }

    pub fn jobs_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Job)>, StateError> {
        self.page(JOBS, after, limit, "job", "cannot read the jobs")
    }

    /// Up to `limit` items of a table keyed by id, with ids above `after`, in id order
    /// (none when the table was never written).
    fn page<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<u64, &[u8]>,
        after: u64,
        limit: usize,
        what: &'static str,
        context: &'static str,
    ) -> Result<Vec<(u64, T)>, StateError> {
        let err = self.db_err(context);
        let tx = self.read_tx(&err)?;
        let table = match tx.open_table(table) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(e.into())),
        };
        let mut out = Vec::new();
        for entry in table
            .range(after.saturating_add(1)..)
            .map_err(|e| err(e.into()))?
            .take(limit)
        {
            let (k, v) = entry.map_err(|e| err(e.into()))?;
            out.push((k.value(), self.parse(what, v.value())?));
        }
        Ok(out)
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
        let tx = self.read_tx(&err)?;
        let table = tx.open_table(CHECKPOINTS).map_err(|e| err(e.into()))?;
        let value = table.get(shard_id).map_err(|e| err(e.into()))?;
        value
            .map(|v| self.parse("checkpoint", v.value()))
            .transpose()
    }

    pub fn checkpoints(&self) -> Result<Vec<(String, Checkpoint)>, StateError> {
        let err = self.db_err("cannot read checkpoints");
        let tx = self.read_tx(&err)?;
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
        let tx = self.write_tx(&err)?;
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

    /// Whether the request was done under any of these keyed hashes (one per key of the
    /// ring: a request done before a key rotation is still found).
    pub fn is_done_any<I: AsRef<[u8]>>(&self, ids: &[I]) -> Result<bool, StateError> {
        let err = self.db_err("cannot read the dedup set");
        let tx = self.read_tx(&err)?;
        let table = tx.open_table(DONE).map_err(|e| err(e.into()))?;
        for id in ids {
            if table.get(id.as_ref()).map_err(|e| err(e.into()))?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Forgets ledger entries done before `before_ms` (they outlived the stream's
    /// retention, so their records can no longer be read again). Returns how many.
    pub fn expire_done(&self, before_ms: u64) -> Result<u64, StateError> {
        let err = self.db_err("cannot expire the dedup set");
        let tx = self.write_tx(&err)?;
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

    /// Up to `limit` dead letters with ids above `after`, by id: a sweep pages through
    /// them so memory stays flat however many are pending.
    pub fn dead_letters_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, DeadLetter)>, StateError> {
        self.page(
            DEAD_LETTERS,
            after,
            limit,
            "dead letter",
            "cannot read dead letters",
        )
    }

    pub fn dead_letter(&self, id: u64) -> Result<DeadLetter, StateError> {
        let err = self.db_err("cannot read dead letters");
        let tx = self.read_tx(&err)?;
        let table = tx.open_table(DEAD_LETTERS).map_err(|e| err(e.into()))?;
        let value = table.get(id).map_err(|e| err(e.into()))?;
        match value {
            Some(v) => self.parse("dead letter", v.value()),
            None => Err(StateError::NoDeadLetter {
                path: self.path.clone(),
                id,
            }),
        }
    }

    /// The pending letter that holds this request or record ([`DeadLetter::index_key`]).
    pub fn pending_letter(&self, index_key: &str) -> Result<Option<u64>, StateError> {
        let err = self.db_err("cannot read the dead letter index");
        let tx = self.read_tx(&err)?;
        let table = match tx.open_table(LETTER_INDEX) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(err(e.into())),
        };
        let value = table.get(index_key).map_err(|e| err(e.into()))?;
        Ok(value.map(|v| v.value()))
    }

    /// A new held request id, never given out before.
    pub fn new_held_id(&self) -> u64 {
        self.next_held_id.fetch_add(1, Ordering::SeqCst)
    }

    /// The paused actions.
    pub fn pauses(&self) -> Result<Vec<(String, Pause)>, StateError> {
        let err = self.db_err("cannot read the pauses");
        let tx = self.read_tx(&err)?;
        let table = match tx.open_table(PAUSES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(e.into())),
        };
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (k, v) = entry.map_err(|e| err(e.into()))?;
            out.push((k.value().to_owned(), self.parse("pause", v.value())?));
        }
        Ok(out)
    }

    /// Whether `action` is paused, and why (asked before each request is sent).
    pub fn pause(&self, action: &str) -> Result<Option<Pause>, StateError> {
        let err = self.db_err("cannot read the pauses");
        let tx = self.read_tx(&err)?;
        let table = match tx.open_table(PAUSES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(err(e.into())),
        };
        let value = table.get(action).map_err(|e| err(e.into()))?;
        value.map(|v| self.parse("pause", v.value())).transpose()
    }

    /// Up to `limit` held requests with ids above `after`, in arrival order.
    pub fn held_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Held)>, StateError> {
        self.page(
            HELD,
            after,
            limit,
            "held request",
            "cannot read the held requests",
        )
    }

    /// How many dead letters are pending, and when the oldest was stored (ms).
    pub fn dead_letter_stats(&self) -> Result<(u64, Option<u64>), StateError> {
        let err = self.db_err("cannot read dead letters");
        let tx = self.read_tx(&err)?;
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
        let tx = self.read_tx(&err)?;
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

    /// The latest audit entries, newest first: at most `limit`, none older than `since_ms`.
    /// Reads back from the end of the trail (it is kept in time order), not all of it.
    pub fn audit_latest(&self, since_ms: u64, limit: usize) -> Result<Vec<AuditEntry>, StateError> {
        let err = self.db_err("cannot read the audit trail");
        let tx = self.read_tx(&err)?;
        let table = tx.open_table(AUDIT).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| err(e.into()))?.rev() {
            let (_, v) = entry.map_err(|e| err(e.into()))?;
            let entry: AuditEntry = self.parse("audit entry", v.value())?;
            if entry.time_ms < since_ms || out.len() == limit {
                break;
            }
            out.push(entry);
        }
        Ok(out)
    }

    /// Sizes and version, for `gdpr-consumer state`.
    pub fn summary(&self) -> Result<serde_json::Value, StateError> {
        let err = self.db_err("cannot read");
        let tx = self.read_tx(&err)?;
        let meta = tx.open_table(META).map_err(|e| err(e.into()))?;
        let version = meta
            .get("schema_version")
            .map_err(|e| err(e.into()))?
            .map(|v| v.value());
        let done = tx.open_table(DONE).map_err(|e| err(e.into()))?;
        let done = done.len().map_err(|e| err(e.into()))?;
        let audit = tx.open_table(AUDIT).map_err(|e| err(e.into()))?;
        let audit = audit.len().map_err(|e| err(e.into()))?;
        let text = match tx.open_table(META_TEXT) {
            Ok(table) => Some(table),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(err(e.into())),
        };
        let fingerprint = |name| -> Result<Option<String>, StateError> {
            match &text {
                Some(table) => Ok(table
                    .get(name)
                    .map_err(|e| err(e.into()))?
                    .map(|v| v.value().to_owned())),
                None => Ok(None),
            }
        };
        let current_key = fingerprint("current_key")?;
        let all_keys = fingerprint("key_fingerprints")?;
        drop(text);
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
            "key_fingerprint": current_key,
            "key_fingerprints": all_keys.map(|all| all.split(',').map(str::to_owned).collect::<Vec<_>>()),
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

/// The meta counter of requests answered with `status` (complete, denied), if any.
fn answered_counter(status: Status) -> Option<&'static str> {
    match status {
        Status::Complete => Some("requests_complete"),
        Status::Denied => Some("requests_denied"),
        _ => None,
    }
}

/// Runs an open of the redb file, turning a panic inside redb (a corrupt file can cause
/// one) into an error that says what to do.
fn guarded<T>(path: &Path, open: impl FnOnce() -> T) -> Result<T, StateError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(open));
    std::panic::set_hook(hook);
    result.map_err(|panic| StateError::Damaged {
        path: path.to_owned(),
        reason: panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "the database cannot be read".into()),
    })
}

fn open_writable(path: &Path) -> Result<Database, StateError> {
    guarded(path, || {
        Database::builder().set_cache_size(CACHE_BYTES).create(path)
    })?
    .map_err(|e| open_error(path, e))
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StateError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StateError::Locked {
            path: path.to_owned(),
        },
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            StateError::Db {
                path: path.to_owned(),
                context: "cannot open",
                source: Box::new(redb::Error::Io(io)),
            }
        }
        redb::DatabaseError::Storage(storage) => StateError::Damaged {
            path: path.to_owned(),
            reason: storage.to_string(),
        },
        other => StateError::Db {
            path: path.to_owned(),
            context: "cannot open",
            source: Box::new(other.into()),
        },
    }
}

/// Creates an empty file readable by its owner only, for redb to initialise: the state
/// holds hashes of identifiers and sealed requests, nobody else's business.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(shard: &str) -> DeadLetter {
        DeadLetter {
            created_at_ms: 1,
            stream: "s".into(),
            shard_id: shard.into(),
            sequence_number: "43".into(),
            sub_sequence_number: 0,
            arrival_time: "1970-01-01T00:00:00Z".into(),
            rule: "r".into(),
            rule_file: "rules/r.rhai".into(),
            rules_hash: "abc".into(),
            retries: 0,
            last_error: None,
            last_retry_at_ms: None,
            reason: DeadLetterReason::RuleFailed {
                error: "boom".into(),
                sealed_record: "00".into(),
            },
        }
    }

    fn key_file(path: &Path) -> PathBuf {
        path.with_extension("key")
    }

    fn open(path: &Path, access: Access) -> Result<State, StateError> {
        let file = key_file(path);
        let source = KeySource {
            env: None,
            file: &file,
        };
        LocalState::open(path, source, access).map(|(state, _)| State::local(state))
    }

    /// Shards committing at once: each writer's writes are durable when it is answered,
    /// whichever group they were committed in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_commits_and_get_their_own_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let state = Arc::new(open(&path, Access::Run).unwrap());
        let writers = (0..32u8).map(|n| {
            let state = state.clone();
            tokio::spawn(async move {
                let id = state.new_dead_letter_id();
                state
                    .commit_shared(Writes {
                        checkpoints: vec![(format!("shard-{n}"), Checkpoint::at(n.to_string()))],
                        done: vec![[n; 32]],
                        dead_letters: vec![(id, letter(&format!("shard-{n}")))],
                        ..Writes::default()
                    })
                    .await
                    .unwrap();
                assert!(state.is_done(&[n; 32]).unwrap(), "durable when answered");
                assert_eq!(
                    state.dead_letter(id).unwrap().shard_id,
                    format!("shard-{n}")
                );
            })
        });
        for writer in writers.collect::<Vec<_>>() {
            writer.await.unwrap();
        }
        // The last leader lets go of the state once it finds nothing more waiting.
        while Arc::strong_count(&state) > 1 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop(state);
        let reopened = open(&path, Access::Run).unwrap();
        for n in 0..32u8 {
            assert_eq!(
                reopened.checkpoint(&format!("shard-{n}")).unwrap(),
                Some(Checkpoint::at(n.to_string()))
            );
        }
        assert_eq!(reopened.dead_letters().unwrap().len(), 32);
    }

    #[test]
    fn round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = open(&path, Access::Run).unwrap();
            let (a, b) = (s.new_dead_letter_id(), s.new_dead_letter_id());
            assert_eq!((a, b), (1, 2));
            s.commit(Writes {
                checkpoints: vec![("shard-1".into(), Checkpoint::at("42".into()))],
                done: vec![[1; 32]],
                dead_letters: vec![(a, letter("a")), (b, letter("b"))],
                ..Writes::default()
            })
            .unwrap();
            s.commit(Writes {
                resolved_dead_letters: vec![2],
                ..Writes::default()
            })
            .unwrap();
        }
        let s = open(&path, Access::Run).unwrap();
        // A resolved id is not given out again, across a restart too.
        assert_eq!(s.new_dead_letter_id(), 3);
        assert_eq!(
            s.checkpoint("shard-1").unwrap(),
            Some(Checkpoint::at("42".into()))
        );
        assert!(s.is_done(&[1; 32]).unwrap());
        assert!(!s.is_done(&[2; 32]).unwrap());
        assert!(s.is_done_any(&[[2; 32], [1; 32]]).unwrap());
        let ids: Vec<u64> = s
            .dead_letters()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, [1]);
        assert_eq!(s.reset_checkpoints(None).unwrap(), 1);
        assert_eq!(s.checkpoint("shard-1").unwrap(), None);
        assert_eq!(s.expire_done(u64::MAX).unwrap(), 1);
        assert!(!s.is_done(&[1; 32]).unwrap());
    }

    /// CCPA §7101 asks for every request's record for 24 months: expiring the ledger (by
    /// `ledger_retention_days`) leaves the audit trail and the request records whole.
    #[test]
    fn the_ledger_expires_the_audit_trail_and_the_requests_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir.path().join("s.redb"), Access::Run).unwrap();
        let arrival = crate::requests::Arrival {
            arrival_time: "2020-01-01T00:00:00Z".into(),
            rule: "r".into(),
            regulation: "CCPA".into(),
        };
        let done = crate::requests::Change::Action {
            arrival,
            action: "a".into(),
            status: crate::requests::ActionStatus::Done,
            attempts: 1,
            http_status: Some(200),
            sealed_job: None,
            dead_letter: None,
            error: None,
        };
        s.commit(Writes {
            done: vec![[1; 32]],
            requests: vec![("ab".into(), done)],
            ..Writes::default()
        })
        .unwrap();
        assert_eq!(s.expire_done(u64::MAX).unwrap(), 1);
        let (_, request) = s.request(&["ab".into()]).unwrap().unwrap();
        assert_eq!(request.status(), Status::Complete);
        let audit = s.audit(0, u64::MAX).unwrap();
        assert_eq!(audit.len(), 1, "{audit:?}");
        assert_eq!(audit[0].outcome, "complete");
        assert_eq!(audit[0].request.as_deref(), Some("ab"));
        let gauges = s.request_gauges(crate::clock::now_ms()).unwrap();
        assert_eq!(gauges.by_status["complete"], 1);
        assert_eq!(gauges.overdue, 0);
    }

    #[test]
    fn dead_letters_are_read_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir.path().join("s.redb"), Access::Run).unwrap();
        let letters = (0..5)
            .map(|n| (s.new_dead_letter_id(), letter(&n.to_string())))
            .collect();
        s.commit(Writes {
            dead_letters: letters,
            ..Writes::default()
        })
        .unwrap();
        let page = |after| -> Vec<u64> {
            let page = s.dead_letters_after(after, 2).unwrap();
            page.iter().map(|(id, _)| *id).collect()
        };
        assert_eq!(page(0), [1, 2]);
        assert_eq!(page(2), [3, 4]);
        assert_eq!(page(4), [5]);
    }

    #[test]
    fn the_done_set_reads_without_a_write_lock_and_leaves_the_file_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = open(&path, Access::Run).unwrap();
            s.commit(Writes {
                done: vec![[7; 32]],
                ..Writes::default()
            })
            .unwrap();
            // While a daemon owns the file, a reader is told so.
            assert!(matches!(
                open(&path, Access::Peek),
                Err(StateError::Locked { .. })
            ));
        }
        let before = std::fs::read(&path).unwrap();
        let done = open(&path, Access::Peek).unwrap().done_set().unwrap();
        assert!(done.contains(&[7u8; 32]));
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn a_second_owner_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let _first = open(&path, Access::Run).unwrap();
        let err = open(&path, Access::Write)
            .err()
            .expect("second open must fail");
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_new_state_file_is_private_and_a_reader_needs_no_write_permission() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(open(&path, Access::Run).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        let before = std::fs::read(&path).unwrap();
        let reader = open(&path, Access::Read).unwrap();
        assert!(reader.checkpoints().unwrap().is_empty());
        assert!(reader.reset_checkpoints(None).is_err(), "read-only");
        drop(reader);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    /// A lost or foreign key, and an empty, truncated or corrupt file: never a fresh start.
    #[test]
    fn damage_is_refused_never_reinitialised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = open(&path, Access::Run).unwrap();
            s.commit(Writes {
                done: vec![[9; 32]],
                ..Writes::default()
            })
            .unwrap();
        }
        let good = std::fs::read(&path).unwrap();
        let key = std::fs::read(key_file(&path)).unwrap();

        // The key file moved away: no new key is made.
        std::fs::remove_file(key_file(&path)).unwrap();
        for access in [Access::Run, Access::Write, Access::Read] {
            let err = open(&path, access).err().expect("no key");
            assert!(matches!(err, StateError::KeyMissing { .. }), "{err}");
        }
        assert!(!key_file(&path).exists(), "no key generated");

        // Another state's key.
        Keys::generate(&key_file(&path)).unwrap();
        let err = open(&path, Access::Run).err().expect("foreign key");
        assert!(matches!(err, StateError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("restore"), "{err}");
        std::fs::write(key_file(&path), &key).unwrap();

        // An empty file.
        std::fs::write(&path, b"").unwrap();
        let err = open(&path, Access::Run).err().expect("empty");
        assert!(matches!(err, StateError::Damaged { .. }), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "left as it was");

        // Truncated, and overwritten in the middle.
        for damaged in [
            good[..good.len() / 3].to_vec(),
            good.iter()
                .enumerate()
                .map(|(i, b)| if i % 7 == 3 { !b } else { *b })
                .collect::<Vec<u8>>(),
        ] {
            std::fs::write(&path, &damaged).unwrap();
            for access in [Access::Run, Access::Read] {
                match open(&path, access) {
                    Err(StateError::Damaged { .. } | StateError::Db { .. }) => {}
                    Err(other) => panic!("unexpected error: {other}"),
                    // redb may recover what it can; then the ledger must not be empty
                    // while claiming to be fine.
                    Ok(s) => assert!(s.is_done(&[9; 32]).unwrap_or(true)),
                }
            }
        }

        // Restored: all is well again.
        std::fs::write(&path, &good).unwrap();
        assert!(open(&path, Access::Run).unwrap().is_done(&[9; 32]).unwrap());
    }

    #[test]
    fn a_rotated_ring_is_accepted_and_recorded_a_ring_without_the_old_key_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let file = key_file(&path);
        let source = KeySource {
            env: None,
            file: &file,
        };
        let (s, keys) = LocalState::open(&path, source, Access::Run).unwrap();
        let id = s.new_dead_letter_id();
        let context = DeadLetter::seal_context(id, "rule_failed");
        let mut l = letter("a");
        l.reason = DeadLetterReason::RuleFailed {
            error: "e".into(),
            sealed_record: keys.seal(b"payload", &context),
        };
        s.commit(Writes {
            dead_letters: vec![(id, l)],
            ..Writes::default()
        })
        .unwrap();
        drop(s);
        let ring = keys.rotated();
        ring.write_ring(&file).unwrap();
        // The next open sees a new current key and seals every letter again under it.
        let (s, ring) = LocalState::open(&path, source, Access::Write).unwrap();
        assert_eq!(
            s.summary().unwrap()["key_fingerprint"],
            ring.fingerprints()[0]
        );
        let sealed = s.dead_letter(id).unwrap().reason.sealed().to_owned();
        drop(s);
        // Re-sealed under the new key alone.
        let new_key = ring.ring_text().lines().next().unwrap().to_owned();
        std::fs::write(&file, &new_key).unwrap();
        let only_new = Keys::load(source).unwrap().unwrap();
        assert_eq!(only_new.unseal(&sealed, &context).unwrap(), b"payload");
        // But a ring without the old key is refused (its ledger entries would be lost).
        let err = open(&path, Access::Run).err().expect("old key missing");
        assert!(matches!(err, StateError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn due_dates_follow_the_regulation_in_calendar_months() {
        assert_eq!(
            due_date("2026-01-01T00:00:00Z", "GDPR"),
            "2026-02-01T00:00:00Z"
        );
        // One month after 31 January is the last day of February, not 2 or 3 March.
        assert_eq!(
            due_date("2026-01-31T10:00:00Z", "GDPR"),
            "2026-02-28T10:00:00Z"
        );
        assert_eq!(
            due_date("2028-01-31T10:00:00Z", "GDPR"),
            "2028-02-29T10:00:00Z"
        );
        assert_eq!(
            due_date("2026-03-15T00:00:00Z", "GDPR"),
            "2026-04-15T00:00:00Z"
        );
        assert_eq!(
            due_date("2026-01-01T00:00:00Z", "CCPA"),
            "2026-02-15T00:00:00Z"
        );
    }

    /// A failed retry's update of a letter an operator discarded meanwhile does not bring
    /// it back.
    #[test]
    fn a_retry_does_not_bring_back_a_discarded_letter() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir.path().join("s.redb"), Access::Run).unwrap();
        let id = s.new_dead_letter_id();
        s.commit(Writes {
            dead_letters: vec![(id, letter("a"))],
            ..Writes::default()
        })
        .unwrap();
        let mut retried = s.dead_letter(id).unwrap();
        retried.retried("still failing".into());
        s.commit(Writes {
            retried_dead_letters: vec![(id, retried.clone())],
            ..Writes::default()
        })
        .unwrap();
        assert_eq!(s.dead_letter(id).unwrap().retries, 1);
        s.commit(Writes {
            resolved_dead_letters: vec![id],
            ..Writes::default()
        })
        .unwrap();
        s.commit(Writes {
            retried_dead_letters: vec![(id, retried)],
            ..Writes::default()
        })
        .unwrap();
        assert!(s.dead_letters().unwrap().is_empty());
    }
}
