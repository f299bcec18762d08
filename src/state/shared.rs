//! A fleet's state: one DynamoDB table (`[coordination] state_table`) shared by every
//! worker, holding what the state file holds for a single daemon — the ledger of requests
//! done, claims of requests being sent, dead letters, held requests, pauses, the audit
//! trail — plus each worker's heartbeat. Checkpoints live in the lease table, written
//! through a [`CheckpointStore`] (fenced by the lease when a worker writes them).
//!
//! Items: a hash key `pk` and a range key `sk`, both strings:
//! - `meta` / `keys`: fingerprints of every key the state was written with;
//!   `meta` / `counter#dead_letter`, `counter#held`: id counters; `meta` / `audit_first_day`.
//! - `request#<keyed hash>` / `ledger`: `state` = `claimed` (with `worker`, `shard`,
//!   `claimed_at`) or `done` (with `done_at`): a claim is taken with a conditional write
//!   before the backend call, and done is permanent.
//! - `letter` / `<id, 20 digits>`, `held` / `<id>`: JSON `body`, paged in id order.
//! - `index` / `<index key>`: the pending letter or held request that holds a request.
//! - `pause` / `<action>`; `worker` / `<worker id>`: heartbeat and rule-set hash.
//! - `audit#<UTC day>` / `<time ms, 13 digits>#<worker>#<n>`: the audit trail, read by
//!   day and time window (a Query per day, never a Scan).
//!
//! DynamoDB has no transaction across these items here (and dynalite none at all): the
//! writes of one commit go in an order that is safe to cut anywhere — outcomes (ledger,
//! letters, audit) first, the checkpoint last, so a checkpoint never covers an outcome not
//! yet written, and an outcome written twice is found done the second time.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, Select,
};
use aws_sdk_dynamodb::Client;

use super::*;
use crate::clock::now_ms;
use crate::keys::{KeySource, Keys};
use crate::source::Checkpoint;

/// A boxed future, for the object-safe [`CheckpointStore`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a fleet keeps its checkpoints: the lease table. A worker's writes are fenced by
/// its lease; a command's reset is not (it is the operator's decision).
pub trait CheckpointStore: Send + Sync + 'static {
    fn read(&self, shard_id: &str) -> BoxFuture<'_, Result<Option<Checkpoint>, StateError>>;
    fn read_all(&self) -> BoxFuture<'_, Result<Vec<(String, Checkpoint)>, StateError>>;
    /// Fails with [`StateError::LeaseLost`] when the writer no longer holds the lease.
    fn write(
        &self,
        shard_id: String,
        checkpoint: Checkpoint,
    ) -> BoxFuture<'_, Result<(), StateError>>;
    fn reset(&self, shard_id: Option<String>) -> BoxFuture<'_, Result<usize, StateError>>;
    /// Whether this worker holds the shard's lease now (asked before each backend call: a
    /// worker that lost it stops calling for that shard). Commands hold none and ask not.
    fn holds(&self, shard_id: &str) -> bool;
}

/// How to reach the fleet's tables.
#[derive(Debug, Clone)]
pub struct SharedSettings {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub state_table: String,
    pub lease_table: String,
    pub create_tables: bool,
    pub worker_id: String,
    pub lease_duration: Duration,
    pub call_timeout: Duration,
}

/// What became of a claim on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// Ours until released or done: send it.
    Claimed,
    /// Done already (by anyone): do not send.
    Done,
    /// Another worker holds it and was alive when last seen: wait for its outcome.
    Busy { worker: String },
    /// Ours now: the worker that held it stopped beating (its call may have been made).
    TakenOver { from: String },
}

/// A worker of the fleet, as its heartbeat item says.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerView {
    pub worker_id: String,
    pub rules_hash: String,
    pub leases: u64,
    /// When it last beat, by its own clock (ms since the epoch).
    pub seen_at_ms: u64,
    /// Whether its heartbeat moved within a lease duration, by this worker's clock.
    pub live: bool,
    pub stopped: bool,
}

/// What a command's claims are made under (`command-PID`): it beats while it sends.
pub const COMMAND_PREFIX: &str = "command-";

const PK: &str = "pk";
const SK: &str = "sk";

/// Builds a DynamoDB client from the standard AWS chain with the config's region and
/// endpoint on top; with an endpoint and no credentials, signs with placeholders (local
/// emulators), as the Kinesis client does.
pub async fn dynamodb_client(settings: &SharedSettings) -> Client {
    let chain = crate::aws::chain(
        settings.region.as_deref(),
        settings.endpoint_url.as_deref(),
        settings.call_timeout,
        "AWS_ENDPOINT_URL_DYNAMODB",
    )
    .await;
    let mut builder = aws_sdk_dynamodb::config::Builder::from(&chain.sdk);
    if let Some(region) = chain.region {
        builder = builder.region(region);
    }
    if let Some(credentials) = chain.credentials {
        builder = builder.credentials_provider(credentials);
    }
    Client::from_conf(builder.build())
}

/// The fleet's shared state. Its DynamoDB calls run on a runtime of its own, so the sync
/// methods (called from the pipeline's async code and from the commands alike) can wait
/// for them without blocking the caller's runtime's drivers.
pub struct SharedState {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
    /// What messages name: `dynamodb:TABLE`.
    name: PathBuf,
}

struct Inner {
    client: Client,
    table: String,
    worker: String,
    lease_duration: Duration,
    checkpoints: Arc<dyn CheckpointStore>,
    next_audit: AtomicU64,
    /// Each worker's heartbeat as last seen, and since when (by this clock): a claim's
    /// holder is dead when its heartbeat has not moved for a lease duration.
    heartbeats: Mutex<HashMap<String, (u64, Instant)>>,
    /// A day the table's first audit day is known not to be after: appends of later days
    /// need not ask again.
    audit_first_day: Mutex<Option<String>>,
}

impl Drop for SharedState {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn get_s<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

fn get_n(item: &HashMap<String, AttributeValue>, name: &str) -> Option<u64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

fn padded(id: u64) -> String {
    format!("{id:020}")
}

fn day_of(ms: u64) -> String {
    crate::clock::rfc3339(ms as i64)[..10].to_owned()
}

const DAY_MS: u64 = 24 * 3600 * 1000;

impl SharedState {
    /// Opens the fleet's state table (creating it when asked), checking that the key ring
    /// holds every key the state was written with; the first worker records its key.
    /// `checkpoints` makes the checkpoint store from a client of the state's own runtime.
    pub fn open(
        settings: &SharedSettings,
        source: KeySource,
        checkpoints: impl FnOnce(Client) -> Arc<dyn CheckpointStore>,
    ) -> Result<(Self, Keys), StateError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("state-dynamodb")
            .enable_all()
            .build()
            .expect("a runtime for the state's calls");
        let name = PathBuf::from(format!("dynamodb:{}", settings.state_table));
        let keys = Keys::load(source)?.ok_or_else(|| StateError::KeyMissing {
            path: name.clone(),
            keys: source.to_string(),
        })?;
        let client = {
            let settings = settings.clone();
            block_on(&runtime, async move { dynamodb_client(&settings).await })
        };
        let checkpoints = checkpoints(client.clone());
        let inner = Arc::new(Inner {
            client,
            table: settings.state_table.clone(),
            worker: settings.worker_id.clone(),
            lease_duration: settings.lease_duration,
            checkpoints,
            next_audit: AtomicU64::new(0),
            heartbeats: Mutex::default(),
            audit_first_day: Mutex::default(),
        });
        let state = SharedState {
            inner,
            runtime: Some(runtime),
            name,
        };
        let create = settings.create_tables;
        state.run(move |inner| async move { inner.ensure_table(create).await })?;
        let fingerprints = keys.fingerprints();
        let key_names = source.to_string();
        state.run(move |inner| async move { inner.check_keys(fingerprints, key_names).await })?;
        Ok((state, keys))
    }

    /// Runs a call on the state's runtime and waits for it (from sync or async code).
    fn run<T, F>(&self, call: impl FnOnce(Arc<Inner>) -> F) -> T
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let runtime = self.runtime.as_ref().expect("open until dropped");
        let wait = || block_on(runtime, call(self.inner.clone()));
        // Called from the daemon's async code: its other tasks (a backend answer being
        // read, the metrics listener) move to another thread while this one waits, so a
        // slow table holds up only what needs it.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }

    /// Runs a call on the state's runtime, awaited by async code.
    async fn run_async<T, F>(&self, call: impl FnOnce(Arc<Inner>) -> F) -> T
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let handle = self.runtime.as_ref().expect("open until dropped");
        handle
            .spawn(call(self.inner.clone()))
            .await
            .expect("a state call does not panic")
    }

    pub fn path(&self) -> &Path {
        &self.name
    }

    pub fn holds_lease(&self, shard_id: &str) -> bool {
        self.inner.checkpoints.holds(shard_id)
    }

    pub fn worker_id(&self) -> &str {
        &self.inner.worker
    }

    /// A new dead letter id from the table's counter. Should the table not answer, an id
    /// from the clock (far above the counter's): the commit that would store the letter
    /// then most likely fails too, and the record is read again.
    pub fn new_dead_letter_id(&self) -> u64 {
        self.run(|inner| async move { inner.next_id("counter#dead_letter").await })
            .unwrap_or_else(|_| fallback_id())
    }

    pub fn new_held_id(&self) -> u64 {
        self.run(|inner| async move { inner.next_id("counter#held").await })
            .unwrap_or_else(|_| fallback_id())
    }

    pub fn commit(&self, writes: Writes) -> Result<(), StateError> {
        self.run(|inner| async move { inner.commit(writes).await })
    }

    pub fn request(&self, id: &str) -> Result<Option<Request>, StateError> {
        let id = id.to_owned();
        self.run(|inner| async move {
            inner
                .get("requests", &id)
                .await?
                .map(|item| inner.body(&item, "request"))
                .transpose()
        })
    }

    pub fn requests_after(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Request)>, StateError> {
        let after = after.to_owned();
        self.run(|inner| async move {
            let items = inner
                .query("requests", Some(after), None, limit, true)
                .await?;
            items
                .iter()
                .map(|item| {
                    let id = get_s(item, SK).unwrap_or_default().to_owned();
                    Ok((id, inner.body(item, "request")?))
                })
                .collect()
        })
    }

    pub fn change_request(
        &self,
        id: &str,
        change: Change,
    ) -> Result<Result<Request, String>, StateError> {
        let id = id.to_owned();
        self.run(|inner| async move {
            Ok(match inner.change_request(&id, &change).await? {
                Ok((request, entry)) => {
                    if let Some(entry) = entry {
                        inner.append_audit(&entry).await?;
                    }
                    Ok(request)
                }
                Err(refused) => Err(refused),
            })
        })
    }

    /// The open requests, and how many were completed and denied.
    pub fn request_counts(&self) -> Result<RequestCounts, StateError> {
        self.run(|inner| async move {
            let mut open = Vec::new();
            for item in inner.query("open", None, None, usize::MAX, true).await? {
                let id = get_s(&item, SK).unwrap_or_default().to_owned();
                open.push((id, inner.body(&item, "open request")?));
            }
            let counter = |item: Option<HashMap<String, AttributeValue>>| {
                item.and_then(|item| get_n(&item, "next_n")).unwrap_or(0)
            };
            let complete = counter(inner.get("meta", "counter#requests_complete").await?);
            let denied = counter(inner.get("meta", "counter#requests_denied").await?);
            Ok(RequestCounts {
                open,
                complete,
                denied,
            })
        })
    }

    pub fn new_job_id(&self) -> u64 {
        self.run(|inner| async move { inner.next_id("counter#job").await })
            .unwrap_or_else(|_| fallback_id())
    }

    pub fn jobs_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Job)>, StateError> {
        self.run(|inner| async move {
            let items = inner
                .query("job", Some(padded(after)), None, limit, true)
                .await?;
            items
                .iter()
                .map(|item| {
                    let id = get_s(item, SK).and_then(|sk| sk.parse().ok()).unwrap_or(0);
                    let mut job: Job = inner.body(item, "job")?;
                    // A poll taken by a worker that stopped before writing the job back.
                    job.next_poll_ms = get_n(item, "next_poll").unwrap_or(job.next_poll_ms);
                    Ok((id, job))
                })
                .collect()
        })
    }

    /// Moves a job's next poll from what was read to `next_poll_ms`, if no other worker
    /// did first: the one whose write lands polls.
    pub fn take_job_poll(&self, id: u64, job: &Job, next_poll_ms: u64) -> Result<bool, StateError> {
        let seen = job.next_poll_ms;
        self.run(move |inner| async move {
            let updated = inner
                .client
                .update_item()
                .table_name(&inner.table)
                .set_key(Some(inner.key("job", &padded(id))))
                .update_expression("SET next_poll = :next")
                .condition_expression("next_poll = :seen")
                .expression_attribute_values(":next", n(next_poll_ms))
                .expression_attribute_values(":seen", n(seen))
                .send()
                .await;
            match updated {
                Ok(_) => Ok(true),
                Err(e) if refused(&e) => Ok(false),
                Err(e) => Err(inner.err("cannot take a job's poll", e)),
            }
        })
    }

    pub async fn commit_shared(&self, writes: Writes) -> Result<(), StateError> {
        self.run_async(|inner| async move { inner.commit(writes).await })
            .await
    }

    pub fn probe_write(&self) -> Result<(), StateError> {
        self.run(|inner| async move {
            let key = inner.key("meta", "write_probe");
            inner
                .client
                .put_item()
                .table_name(&inner.table)
                .set_item(Some(with(key, [("probe_at", n(now_ms()))])))
                .send()
                .await
                .map_err(|e| inner.err("cannot write", e))
                .map(drop)
        })
    }

    pub fn checkpoint(&self, shard_id: &str) -> Result<Option<Checkpoint>, StateError> {
        let shard_id = shard_id.to_owned();
        self.run(|inner| async move { inner.checkpoints.read(&shard_id).await })
    }

    pub fn checkpoints(&self) -> Result<Vec<(String, Checkpoint)>, StateError> {
        self.run(|inner| async move { inner.checkpoints.read_all().await })
    }

    pub fn reset_checkpoints(&self, shard_id: Option<&str>) -> Result<usize, StateError> {
        let shard_id = shard_id.map(str::to_owned);
        self.run(|inner| async move { inner.checkpoints.reset(shard_id).await })
    }

    pub fn is_done_any<I: AsRef<[u8]>>(&self, ids: &[I]) -> Result<bool, StateError> {
        let ids: Vec<String> = ids.iter().map(|id| hex::encode(id.as_ref())).collect();
        self.run(|inner| async move {
            for id in ids {
                if let Some(item) = inner.get(&format!("request#{id}"), "ledger").await? {
                    if get_s(&item, "state") == Some("done") {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        })
    }

    pub fn done_set(&self) -> Result<HashSet<[u8; 32]>, StateError> {
        self.run(|inner| async move {
            let mut done = HashSet::new();
            for item in inner.scan_ledger().await? {
                let id = get_s(&item, PK)
                    .and_then(|pk| pk.strip_prefix("request#"))
                    .and_then(|id| hex::decode(id).ok())
                    .and_then(|id| <[u8; 32]>::try_from(id).ok());
                if let (Some(id), Some("done")) = (id, get_s(&item, "state")) {
                    done.insert(id);
                }
            }
            Ok(done)
        })
    }

    /// Forgets ledger entries done before `before_ms` (a scan of the ledger).
    pub fn expire_done(&self, before_ms: u64) -> Result<u64, StateError> {
        self.run(|inner| async move {
            let mut removed = 0;
            for item in inner.scan_ledger().await? {
                let old = get_s(&item, "state") == Some("done")
                    && get_n(&item, "done_at").is_some_and(|at| at < before_ms);
                if let (true, Some(pk)) = (old, get_s(&item, PK)) {
                    inner.delete(pk, "ledger", None::<Condition<0>>).await?;
                    removed += 1;
                }
            }
            Ok(removed)
        })
    }

    pub fn dead_letters_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, DeadLetter)>, StateError> {
        self.run(|inner| async move { inner.page("letter", after, limit, "dead letter").await })
    }

    pub fn dead_letter(&self, id: u64) -> Result<DeadLetter, StateError> {
        self.run(|inner| async move {
            match inner.get("letter", &padded(id)).await? {
                Some(item) => inner.body(&item, "dead letter"),
                None => Err(StateError::NoDeadLetter {
                    path: inner.name(),
                    id,
                }),
            }
        })
    }

    pub fn pending_letter(&self, index_key: &str) -> Result<Option<u64>, StateError> {
        let index_key = index_key.to_owned();
        self.run(|inner| async move {
            Ok(inner
                .get("index", &index_key)
                .await?
                .and_then(|item| get_n(&item, "letter_id")))
        })
    }

    pub fn pauses(&self) -> Result<Vec<(String, Pause)>, StateError> {
        self.run(|inner| async move {
            let mut out = Vec::new();
            for item in inner.query("pause", None, None, usize::MAX, true).await? {
                let action = get_s(&item, SK).unwrap_or_default().to_owned();
                out.push((action, inner.body(&item, "pause")?));
            }
            Ok(out)
        })
    }

    pub fn pause(&self, action: &str) -> Result<Option<Pause>, StateError> {
        let action = action.to_owned();
        self.run(|inner| async move {
            inner
                .get("pause", &action)
                .await?
                .map(|item| inner.body(&item, "pause"))
                .transpose()
        })
    }

    pub fn held_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Held)>, StateError> {
        self.run(|inner| async move { inner.page("held", after, limit, "held request").await })
    }

    pub fn dead_letter_stats(&self) -> Result<(u64, Option<u64>), StateError> {
        self.run(|inner| async move {
            let count = inner.count("letter").await?;
            let first = inner
                .page::<DeadLetter>("letter", 0, 1, "dead letter")
                .await?;
            Ok((count, first.first().map(|(_, l)| l.created_at_ms)))
        })
    }

    pub fn audit(&self, since_ms: u64, until_ms: u64) -> Result<Vec<AuditEntry>, StateError> {
        self.run(|inner| async move { inner.audit(since_ms, until_ms).await })
    }

    pub fn audit_latest(&self, since_ms: u64, limit: usize) -> Result<Vec<AuditEntry>, StateError> {
        self.run(|inner| async move { inner.audit_latest(since_ms, limit).await })
    }

    pub fn summary(&self) -> Result<serde_json::Value, StateError> {
        let (dead_letters, oldest) = self.dead_letter_stats()?;
        let checkpoints: Vec<serde_json::Value> = self
            .checkpoints()?
            .into_iter()
            .map(|(shard_id, c)| {
                serde_json::json!({"shard_id": shard_id, "sequence_number": c.sequence_number, "shard_end": c.shard_end})
            })
            .collect();
        let (done, fingerprints, workers) = self.run(|inner| async move {
            let done = inner
                .scan_ledger()
                .await?
                .iter()
                .filter(|item| get_s(item, "state") == Some("done"))
                .count();
            let keys = inner.get("meta", "keys").await?;
            let fingerprints = keys
                .as_ref()
                .and_then(|item| get_s(item, "key_fingerprints"))
                .map(|all| all.split(',').map(str::to_owned).collect::<Vec<_>>());
            let workers = inner.workers().await?;
            Ok::<_, StateError>((done, fingerprints, workers))
        })?;
        Ok(serde_json::json!({
            "path": self.name,
            "state_table": self.inner.table,
            "key_fingerprint": fingerprints.as_ref().and_then(|f| f.last().cloned()),
            "key_fingerprints": fingerprints,
            "checkpoints": checkpoints,
            "dedup_entries": done,
            "dead_letters_pending": dead_letters,
            "oldest_dead_letter": oldest.map(|ms| crate::clock::rfc3339(ms as i64)),
            "workers": workers,
        }))
    }

    /// Claims a request (its keyed hash under the current key) for this worker, before its
    /// backend call. A claim of a worker whose heartbeat stopped for a lease duration is
    /// taken over.
    pub async fn claim(&self, id: [u8; 32], shard_id: &str) -> Result<ClaimOutcome, StateError> {
        let shard_id = shard_id.to_owned();
        self.run_async(|inner| async move { inner.claim(id, shard_id).await })
            .await
    }

    /// Lets go of a claim without an outcome (the call failed into a dead letter that now
    /// holds the request, or was interrupted).
    pub async fn release_claim(&self, id: [u8; 32]) -> Result<(), StateError> {
        self.run_async(|inner| async move {
            let pk = format!("request#{}", hex::encode(id));
            let condition = (
                "#st = :claimed AND claimed_by = :me",
                [(":claimed", s("claimed")), (":me", s(inner.worker.clone()))],
            );
            // Not ours any more (done, or taken over): nothing to let go.
            inner.delete(&pk, "ledger", Some(condition)).await
        })
        .await
    }

    /// This worker's heartbeat: it is alive, reads `leases` shards, with these rules.
    pub async fn heartbeat(
        &self,
        rules_hash: String,
        leases: u64,
        stopped: bool,
    ) -> Result<(), StateError> {
        self.run_async(move |inner| async move {
            let key = inner.key("worker", &inner.worker);
            inner
                .client
                .update_item()
                .table_name(&inner.table)
                .set_key(Some(key))
                .update_expression(
                    "ADD heart_beats :one SET rules_hash = :h, lease_count = :l, seen_at = :t, is_stopped = :s, lease_ms = :d",
                )
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":h", s(rules_hash))
                .expression_attribute_values(":l", n(leases))
                .expression_attribute_values(":t", n(now_ms()))
                .expression_attribute_values(":s", AttributeValue::Bool(stopped))
                .expression_attribute_values(":d", n(inner.lease_duration.as_millis() as u64))
                .send()
                .await
                .map_err(|e| inner.err("cannot write the worker's heartbeat", e))
                .map(drop)
        })
        .await
    }

    /// Whether a worker under this worker's id beat within two lease durations (by its
    /// clock) without saying it stopped: another worker may run under the same id.
    pub fn id_in_use(&self) -> Result<bool, StateError> {
        self.run(|inner| async move {
            let Some(item) = inner.get("worker", &inner.worker).await? else {
                return Ok(false);
            };
            let stopped = item.get("is_stopped").and_then(|v| v.as_bool().ok()) == Some(&true);
            let seen_at = get_n(&item, "seen_at").unwrap_or(0);
            let window = 2 * inner.lease_duration.as_millis() as u64;
            Ok(!stopped && now_ms().saturating_sub(seen_at) < window)
        })
    }

    /// The fleet's workers, as their heartbeats say.
    pub fn workers(&self) -> Result<Vec<WorkerView>, StateError> {
        self.run(|inner| async move { inner.workers().await })
    }
}

/// Waits for `future` on `runtime`, from sync code or from async code on another runtime.
fn block_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    future: impl Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(future.await);
    });
    rx.recv().expect("a state call does not panic")
}

fn with<const N: usize>(
    mut item: HashMap<String, AttributeValue>,
    values: [(&str, AttributeValue); N],
) -> HashMap<String, AttributeValue> {
    for (name, value) in values {
        item.insert(name.to_owned(), value);
    }
    item
}

type Condition<const N: usize> = (&'static str, [(&'static str, AttributeValue); N]);

impl Inner {
    fn name(&self) -> PathBuf {
        PathBuf::from(format!("dynamodb:{}", self.table))
    }

    fn err<E, R>(&self, context: &'static str, e: SdkError<E, R>) -> StateError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        StateError::Shared {
            table: self.table.clone(),
            context,
            message: crate::source::describe(&e),
        }
    }

    fn key(&self, pk: &str, sk: &str) -> HashMap<String, AttributeValue> {
        HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(sk))])
    }

    fn body<T: serde::de::DeserializeOwned>(
        &self,
        item: &HashMap<String, AttributeValue>,
        what: &'static str,
    ) -> Result<T, StateError> {
        let body = get_s(item, "body").unwrap_or_default();
        serde_json::from_str(body).map_err(|e| StateError::Corrupt {
            path: self.name(),
            what,
            message: e.to_string(),
        })
    }

    async fn ensure_table(&self, create: bool) -> Result<(), StateError> {
        let described = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await;
        let exists = match described {
            Ok(out) => {
                let active = out
                    .table()
                    .and_then(|t| t.table_status())
                    .is_some_and(|s| s.as_str() == "ACTIVE");
                if active {
                    return Ok(());
                }
                // Being created (by another worker starting at the same moment).
                true
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                false
            }
            Err(e) => return Err(self.err("cannot describe the table", e)),
        };
        if exists {
            return self.wait_active().await;
        }
        if !create {
            return Err(StateError::SharedMissing {
                table: self.table.clone(),
                create: format!(
                    "aws dynamodb create-table --table-name {} --attribute-definitions AttributeName=pk,AttributeType=S AttributeName=sk,AttributeType=S --key-schema AttributeName=pk,KeyType=HASH AttributeName=sk,KeyType=RANGE --billing-mode PAY_PER_REQUEST",
                    self.table
                ),
            });
        }
        let attribute = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("complete")
        };
        let key = |name: &str, kind| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .expect("complete")
        };
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(attribute(PK))
            .attribute_definitions(attribute(SK))
            .key_schema(key(PK, KeyType::Hash))
            .key_schema(key(SK, KeyType::Range))
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match created {
            Ok(_) => {}
            // Another worker created it at the same moment.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) => {}
            Err(e) => return Err(self.err("cannot create the table", e)),
        }
        tracing::info!(table = %self.table, "state table created");
        self.wait_active().await
    }

    /// Waits (a minute at most) until the table is ACTIVE.
    async fn wait_active(&self) -> Result<(), StateError> {
        for _ in 0..300 {
            let described = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(|e| self.err("cannot describe the table", e))?;
            let active = described
                .table()
                .and_then(|t| t.table_status())
                .is_some_and(|s| s.as_str() == "ACTIVE");
            if active {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Every key the state was written with must be in the ring; the current one is added.
    /// Workers starting together on a new table race here: the list is written only over
    /// the one read (a conditional write), and read again when another worker wrote first,
    /// so a worker with another key is refused whichever wrote first.
    async fn check_keys(&self, ring: Vec<String>, key_names: String) -> Result<(), StateError> {
        loop {
            if self.check_keys_once(&ring, &key_names).await? {
                return Ok(());
            }
        }
    }

    /// `Ok(false)`: another worker recorded a key meanwhile; check again.
    async fn check_keys_once(&self, ring: &[String], key_names: &str) -> Result<bool, StateError> {
        let item = self.get("meta", "keys").await?;
        let recorded = item
            .as_ref()
            .and_then(|item| get_s(item, "key_fingerprints"))
            .map(str::to_owned);
        let known: Vec<String> = recorded
            .as_deref()
            .map(|all| {
                all.split(',')
                    .filter(|f| !f.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let missing: Vec<String> = known
            .iter()
            .filter(|f| !ring.contains(f))
            .map(|f| format!("fingerprint {f}"))
            .collect();
        if !missing.is_empty() {
            return Err(StateError::KeyMismatch {
                path: self.name(),
                keys: key_names.to_owned(),
                missing: missing.join(", "),
            });
        }
        if known.contains(&ring[0]) {
            return Ok(true);
        }
        let mut all = known;
        all.push(ring[0].clone());
        let item = with(
            self.key("meta", "keys"),
            [("key_fingerprints", s(all.join(",")))],
        );
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item));
        let put = match recorded {
            None => put.condition_expression("attribute_not_exists(pk)"),
            Some(before) => put
                .condition_expression("key_fingerprints = :before")
                .expression_attribute_values(":before", s(before)),
        };
        match put.send().await {
            Ok(_) => Ok(true),
            Err(e) if refused(&e) => Ok(false),
            Err(e) => Err(self.err("cannot record the key", e)),
        }
    }

    async fn get(
        &self,
        pk: &str,
        sk: &str,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StateError> {
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.err("cannot read", e))?;
        Ok(got.item)
    }

    async fn put(&self, pk: &str, sk: &str, body: String) -> Result<(), StateError> {
        let item = with(self.key(pk, sk), [("body", s(body))]);
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| self.err("cannot commit", e))
            .map(drop)
    }

    /// Deletes an item; with a condition that fails, nothing is deleted and that is no error.
    async fn delete<const N: usize>(
        &self,
        pk: &str,
        sk: &str,
        condition: Option<Condition<N>>,
    ) -> Result<(), StateError> {
        let mut call = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(self.key(pk, sk)));
        if let Some((expression, values)) = condition {
            call = call.condition_expression(expression);
            if expression.contains("#st") {
                call = call.expression_attribute_names("#st", "state");
            }
            for (name, value) in values {
                call = call.expression_attribute_values(name, value);
            }
        }
        match call.send().await {
            Ok(_) => Ok(()),
            Err(e) if refused(&e) => Ok(()),
            Err(e) => Err(self.err("cannot delete", e)),
        }
    }

    /// Items of one partition, in key order (or reversed), from `after` (exclusive) up to
    /// `before` (exclusive), at most `limit`.
    async fn query(
        &self,
        pk: &str,
        after: Option<String>,
        before: Option<String>,
        limit: usize,
        forward: bool,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, StateError> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let mut call = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .scan_index_forward(forward)
                .expression_attribute_values(":pk", s(pk))
                .set_exclusive_start_key(start.take());
            let mut condition = "pk = :pk".to_owned();
            match (&after, &before) {
                (Some(a), Some(b)) => {
                    condition.push_str(" AND sk BETWEEN :a AND :b");
                    call = call
                        .expression_attribute_values(":a", s(a.clone()))
                        .expression_attribute_values(":b", s(b.clone()));
                }
                (Some(a), None) => {
                    condition.push_str(" AND sk > :a");
                    call = call.expression_attribute_values(":a", s(a.clone()));
                }
                (None, Some(b)) => {
                    condition.push_str(" AND sk < :b");
                    call = call.expression_attribute_values(":b", s(b.clone()));
                }
                (None, None) => {}
            }
            if limit < usize::MAX {
                call = call.limit((limit - out.len()).min(1000) as i32);
            }
            let page = call
                .key_condition_expression(condition)
                .send()
                .await
                .map_err(|e| self.err("cannot read", e))?;
            for item in page.items.unwrap_or_default() {
                // BETWEEN is inclusive: the bounds themselves are not wanted.
                let sk = get_s(&item, SK).unwrap_or_default();
                if after.as_deref() == Some(sk) || before.as_deref() == Some(sk) {
                    continue;
                }
                out.push(item);
            }
            start = page.last_evaluated_key;
            if start.is_none() || out.len() >= limit {
                return Ok(out);
            }
        }
    }

    async fn count(&self, pk: &str) -> Result<u64, StateError> {
        let mut count = 0;
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(pk))
                .select(Select::Count)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.err("cannot count", e))?;
            count += page.count.max(0) as u64;
            start = page.last_evaluated_key;
            if start.is_none() {
                return Ok(count);
            }
        }
    }

    async fn page<T: serde::de::DeserializeOwned>(
        &self,
        pk: &str,
        after: u64,
        limit: usize,
        what: &'static str,
    ) -> Result<Vec<(u64, T)>, StateError> {
        let items = self
            .query(pk, Some(padded(after)), None, limit, true)
            .await?;
        items
            .iter()
            .map(|item| {
                let id = get_s(item, SK).and_then(|sk| sk.parse().ok()).unwrap_or(0);
                Ok((id, self.body(item, what)?))
            })
            .collect()
    }

    /// The ledger's items (a scan: inspection commands and expiry only).
    async fn scan_ledger(&self) -> Result<Vec<HashMap<String, AttributeValue>>, StateError> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .filter_expression("begins_with(pk, :p)")
                .expression_attribute_values(":p", s("request#"))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.err("cannot read the ledger", e))?;
            out.extend(page.items.unwrap_or_default());
            start = page.last_evaluated_key;
            if start.is_none() {
                return Ok(out);
            }
        }
    }

    async fn next_id(&self, counter: &str) -> Result<u64, StateError> {
        let updated = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.key("meta", counter)))
            .update_expression("ADD next_n :one")
            .expression_attribute_values(":one", n(1))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| self.err("cannot give out an id", e))?;
        Ok(updated
            .attributes
            .as_ref()
            .and_then(|a| get_n(a, "next_n"))
            .unwrap_or(1))
    }

    /// Writes one commit, outcomes first and the checkpoint last.
    async fn commit(&self, writes: Writes) -> Result<(), StateError> {
        let now = now_ms();
        for id in &writes.done {
            let item = with(
                self.key(&format!("request#{}", hex::encode(id)), "ledger"),
                [
                    ("state", s("done")),
                    ("done_at", n(now)),
                    ("done_by", s(self.worker.clone())),
                ],
            );
            self.client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .send()
                .await
                .map_err(|e| self.err("cannot commit", e))?;
        }
        for (id, letter) in &writes.dead_letters {
            let body = serde_json::to_string(letter).expect("a dead letter serializes");
            self.put("letter", &padded(*id), body).await?;
            self.put_index(&letter.index_key(), *id).await?;
        }
        for (id, letter) in &writes.retried_dead_letters {
            let body = serde_json::to_string(letter).expect("a dead letter serializes");
            let item = with(self.key("letter", &padded(*id)), [("body", s(body))]);
            let put = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression("attribute_exists(pk)")
                .send()
                .await;
            match put {
                Ok(_) => {}
                // Discarded meanwhile: stays discarded.
                Err(e) if refused(&e) => {}
                Err(e) => return Err(self.err("cannot commit", e)),
            }
        }
        for id in &writes.resolved_dead_letters {
            if let Some(item) = self.get("letter", &padded(*id)).await? {
                let letter: DeadLetter = self.body(&item, "dead letter")?;
                self.delete("letter", &padded(*id), None::<Condition<0>>)
                    .await?;
                self.delete_index(&letter.index_key(), *id).await?;
            }
        }
        for (action, pause) in &writes.pauses {
            match pause {
                Some(pause) => {
                    let body = serde_json::to_string(pause).expect("a pause serializes");
                    self.put("pause", action, body).await?;
                }
                None => self.delete("pause", action, None::<Condition<0>>).await?,
            }
        }
        for (id, request) in &writes.held {
            let body = serde_json::to_string(request).expect("a held request serializes");
            self.put("held", &padded(*id), body).await?;
            self.put_index(&held_index_key(&request.request_id), *id)
                .await?;
        }
        for id in &writes.released {
            if let Some(item) = self.get("held", &padded(*id)).await? {
                let request: Held = self.body(&item, "held request")?;
                self.delete("held", &padded(*id), None::<Condition<0>>)
                    .await?;
                self.delete_index(&held_index_key(&request.request_id), *id)
                    .await?;
            }
        }
        for (id, job) in &writes.jobs {
            let body = serde_json::to_string(job).expect("a job serializes");
            let item = with(
                self.key("job", &padded(*id)),
                [("body", s(body)), ("next_poll", n(job.next_poll_ms))],
            );
            self.client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .send()
                .await
                .map_err(|e| self.err("cannot commit", e))?;
            self.put_index(&job_index_key(&job.request_id), *id).await?;
        }
        for (id, job, taken_until) in &writes.polled_jobs {
            let body = serde_json::to_string(job).expect("a job serializes");
            let item = with(
                self.key("job", &padded(*id)),
                [("body", s(body)), ("next_poll", n(job.next_poll_ms))],
            );
            // Only by the worker whose take is still in force: a job finished or taken by
            // another worker meanwhile is not brought back.
            let put = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression("next_poll = :taken")
                .expression_attribute_values(":taken", n(*taken_until))
                .send()
                .await;
            match put {
                Ok(_) => {}
                Err(e) if refused(&e) => {}
                Err(e) => return Err(self.err("cannot commit", e)),
            }
        }
        for id in &writes.jobs_finished {
            if let Some(item) = self.get("job", &padded(*id)).await? {
                let job: Job = self.body(&item, "job")?;
                self.delete("job", &padded(*id), None::<Condition<0>>)
                    .await?;
                self.delete_index(&job_index_key(&job.request_id), *id)
                    .await?;
            }
        }
        for entry in &writes.audit {
            self.append_audit(entry).await?;
        }
        for (id, change) in &writes.requests {
            match self.change_request(id, change).await? {
                Ok((_, Some(entry))) => self.append_audit(&entry).await?,
                Ok((_, None)) => {}
                Err(refused) => {
                    tracing::warn!(request = %id, %refused, "a request change does not apply")
                }
            }
        }
        for (shard_id, checkpoint) in writes.checkpoints {
            self.checkpoints.write(shard_id, checkpoint).await?;
        }
        Ok(())
    }

    /// Applies one change to a request: read, change, and write back only if no other
    /// worker wrote it meanwhile (its version), else again. Keeps the open index and the
    /// answered counts with it.
    async fn change_request(
        &self,
        id: &str,
        change: &Change,
    ) -> Result<Result<(Request, Option<AuditEntry>), String>, StateError> {
        loop {
            let item = self.get("requests", id).await?;
            let version = item.as_ref().and_then(|item| get_n(item, "version"));
            let current: Option<Request> =
                item.map(|item| self.body(&item, "request")).transpose()?;
            let was = current.as_ref().map(Request::status);
            let (request, entry) = match super::change(id, current, change) {
                Ok(changed) => changed,
                Err(refused) => return Ok(Err(refused)),
            };
            let body = serde_json::to_string(&request).expect("a request serializes");
            let item = with(
                self.key("requests", id),
                [("body", s(body)), ("version", n(version.unwrap_or(0) + 1))],
            );
            let put = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item));
            let put = match version {
                Some(version) => put
                    .condition_expression("version = :v")
                    .expression_attribute_values(":v", n(version)),
                None => put.condition_expression("attribute_not_exists(pk)"),
            };
            match put.send().await {
                Ok(_) => {}
                Err(e) if refused(&e) => continue,
                Err(e) => return Err(self.err("cannot record a request", e)),
            }
            match OpenRequest::of(&request) {
                Some(open) => {
                    let body = serde_json::to_string(&open).expect("serializes");
                    self.put("open", id, body).await?;
                }
                None => self.delete("open", id, None::<Condition<0>>).await?,
            }
            let now = request.status();
            if was != Some(now) {
                for (status, step) in [(was, -1i64), (Some(now), 1)] {
                    let counter = match status {
                        Some(Status::Complete) => "counter#requests_complete",
                        Some(Status::Denied) => "counter#requests_denied",
                        _ => continue,
                    };
                    self.client
                        .update_item()
                        .table_name(&self.table)
                        .set_key(Some(self.key("meta", counter)))
                        .update_expression("ADD next_n :step")
                        .expression_attribute_values(":step", AttributeValue::N(step.to_string()))
                        .send()
                        .await
                        .map_err(|e| self.err("cannot count requests", e))?;
                }
            }
            return Ok(Ok((request, entry)));
        }
    }

    async fn put_index(&self, index_key: &str, id: u64) -> Result<(), StateError> {
        let item = with(self.key("index", index_key), [("letter_id", n(id))]);
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| self.err("cannot commit", e))
            .map(drop)
    }

    /// Removes an index entry if it still points at `id`.
    async fn delete_index(&self, index_key: &str, id: u64) -> Result<(), StateError> {
        let deleted = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(self.key("index", index_key)))
            .condition_expression("letter_id = :id")
            .expression_attribute_values(":id", n(id))
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(e) if refused(&e) => Ok(()),
            Err(e) => Err(self.err("cannot commit", e)),
        }
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StateError> {
        let day = day_of(entry.time_ms);
        let n_ = self.next_audit.fetch_add(1, Ordering::SeqCst);
        let sk = format!("{:013}#{}#{n_:08}", entry.time_ms, self.worker);
        let body = serde_json::to_string(entry).expect("an audit entry serializes");
        self.put(&format!("audit#{day}"), &sk, body).await?;
        let known = self.audit_first_day.lock().expect("first day lock").clone();
        if known.is_some_and(|known| known <= day) {
            return Ok(());
        }
        // The first day with entries bounds every read by window from below.
        let first = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.key("meta", "audit_first_day")))
            .update_expression("SET #d = :d")
            .condition_expression("attribute_not_exists(#d) OR #d > :d")
            .expression_attribute_names("#d", "day")
            .expression_attribute_values(":d", s(day.clone()))
            .send()
            .await;
        match first {
            Ok(_) => {}
            // Set to an earlier day already.
            Err(e) if refused(&e) => {}
            Err(e) => return Err(self.err("cannot commit", e)),
        }
        *self.audit_first_day.lock().expect("first day lock") = Some(day);
        Ok(())
    }

    async fn first_audit_day(&self) -> Result<Option<u64>, StateError> {
        let item = self.get("meta", "audit_first_day").await?;
        Ok(item
            .as_ref()
            .and_then(|item| get_s(item, "day"))
            .and_then(|day| day.parse::<jiff::civil::Date>().ok())
            .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC).ok())
            .map(|z| z.timestamp().as_millisecond().max(0) as u64))
    }

    /// Entries in `[since_ms, until_ms)`, oldest first: a Query per day of the window.
    async fn audit(&self, since_ms: u64, until_ms: u64) -> Result<Vec<AuditEntry>, StateError> {
        let Some(first) = self.first_audit_day().await? else {
            return Ok(Vec::new());
        };
        let until_ms = until_ms.min(now_ms() + DAY_MS);
        let mut day = since_ms.max(first) / DAY_MS * DAY_MS;
        let mut out = Vec::new();
        while day < until_ms {
            let items = self
                .query(
                    &format!("audit#{}", day_of(day)),
                    Some(format!("{:013}", since_ms.saturating_sub(1))),
                    Some(format!("{until_ms:013}")),
                    usize::MAX,
                    true,
                )
                .await?;
            for item in &items {
                let entry: AuditEntry = self.body(item, "audit entry")?;
                if entry.time_ms >= since_ms && entry.time_ms < until_ms {
                    out.push(entry);
                }
            }
            day += DAY_MS;
        }
        Ok(out)
    }

    /// The latest entries, newest first, day by day backwards.
    async fn audit_latest(
        &self,
        since_ms: u64,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StateError> {
        let Some(first) = self.first_audit_day().await? else {
            return Ok(Vec::new());
        };
        let floor = since_ms.max(first) / DAY_MS * DAY_MS;
        let mut day = (now_ms() + DAY_MS) / DAY_MS * DAY_MS;
        let mut out = Vec::new();
        while day >= floor && out.len() < limit {
            let items = self
                .query(
                    &format!("audit#{}", day_of(day)),
                    None,
                    None,
                    limit - out.len(),
                    false,
                )
                .await?;
            for item in &items {
                let entry: AuditEntry = self.body(item, "audit entry")?;
                if entry.time_ms < since_ms {
                    return Ok(out);
                }
                out.push(entry);
            }
            let Some(previous) = day.checked_sub(DAY_MS) else {
                break;
            };
            day = previous;
        }
        Ok(out)
    }

    async fn claim(&self, id: [u8; 32], shard_id: String) -> Result<ClaimOutcome, StateError> {
        let pk = format!("request#{}", hex::encode(id));
        loop {
            let claimed = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(self.key(&pk, "ledger")))
                .update_expression(
                    "SET #st = :claimed, claimed_by = :me, claim_shard = :shard, claimed_at = :t",
                )
                .condition_expression(
                    "attribute_not_exists(pk) OR (#st = :claimed AND claimed_by = :me)",
                )
                .expression_attribute_names("#st", "state")
                .expression_attribute_values(":claimed", s("claimed"))
                .expression_attribute_values(":me", s(self.worker.clone()))
                .expression_attribute_values(":shard", s(shard_id.clone()))
                .expression_attribute_values(":t", n(now_ms()))
                .send()
                .await;
            match claimed {
                Ok(_) => return Ok(ClaimOutcome::Claimed),
                Err(e) if refused(&e) => {}
                Err(e) => return Err(self.err("cannot claim a request", e)),
            }
            let Some(item) = self.get(&pk, "ledger").await? else {
                continue; // released meanwhile: claim again
            };
            if get_s(&item, "state") == Some("done") {
                return Ok(ClaimOutcome::Done);
            }
            let holder = get_s(&item, "claimed_by").unwrap_or_default().to_owned();
            let claimed_at = get_n(&item, "claimed_at").unwrap_or(0);
            if self.alive(&holder).await? {
                return Ok(ClaimOutcome::Busy { worker: holder });
            }
            // Its worker is gone: the claim expired with it. Taken over only if it is
            // still that claim.
            let taken = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(self.key(&pk, "ledger")))
                .update_expression("SET claimed_by = :me, claim_shard = :shard, claimed_at = :t")
                .condition_expression(
                    "#st = :claimed AND claimed_by = :holder AND claimed_at = :then",
                )
                .expression_attribute_names("#st", "state")
                .expression_attribute_values(":claimed", s("claimed"))
                .expression_attribute_values(":me", s(self.worker.clone()))
                .expression_attribute_values(":holder", s(holder.clone()))
                .expression_attribute_values(":then", n(claimed_at))
                .expression_attribute_values(":shard", s(shard_id.clone()))
                .expression_attribute_values(":t", n(now_ms()))
                .send()
                .await;
            match taken {
                Ok(_) => {
                    return Ok(ClaimOutcome::TakenOver { from: holder });
                }
                Err(e) if refused(&e) => continue,
                Err(e) => return Err(self.err("cannot claim a request", e)),
            }
        }
    }

    /// Whether `worker`'s heartbeat moved within a lease duration, as this worker saw it:
    /// no synchronised clocks needed. A worker seen for the first time counts as alive.
    async fn alive(&self, worker: &str) -> Result<bool, StateError> {
        if worker == self.worker {
            return Ok(true);
        }
        let item = self.get("worker", worker).await?;
        // No heartbeat yet (a worker claiming before its first beat): it has a lease
        // duration from now to show one.
        if item
            .as_ref()
            .and_then(|item| item.get("is_stopped"))
            .and_then(|v| v.as_bool().ok())
            == Some(&true)
        {
            return Ok(false);
        }
        let beat = item
            .as_ref()
            .and_then(|item| get_n(item, "heart_beats"))
            .unwrap_or(0);
        // It beats every third of its own lease duration (a rolling change of the setting
        // runs workers with two): judged by the longer of the two.
        let patience = item
            .as_ref()
            .and_then(|item| get_n(item, "lease_ms"))
            .map_or(self.lease_duration, Duration::from_millis)
            .max(self.lease_duration);
        let mut seen = self.heartbeats.lock().expect("heartbeats lock");
        let now = Instant::now();
        let entry = seen.entry(worker.to_owned()).or_insert((beat, now));
        if entry.0 != beat {
            *entry = (beat, now);
        }
        Ok(entry.1.elapsed() < patience)
    }

    async fn workers(&self) -> Result<Vec<WorkerView>, StateError> {
        let items = self.query("worker", None, None, usize::MAX, true).await?;
        let mut out = Vec::new();
        for item in items {
            let worker_id = get_s(&item, SK).unwrap_or_default().to_owned();
            // A command retrying dead letters beats while it sends: not a worker.
            if worker_id.starts_with(COMMAND_PREFIX) {
                continue;
            }
            let stopped = item.get("is_stopped").and_then(|v| v.as_bool().ok()) == Some(&true);
            // Seen beating by this process, and (for a command that looks once) a beat
            // recent by the worker's own clock, with room for some skew.
            let seen_at_ms = get_n(&item, "seen_at").unwrap_or(0);
            // A worker gone for a day (a restart under a new pid, say) is no longer listed.
            if now_ms().saturating_sub(seen_at_ms) > DAY_MS {
                continue;
            }
            let recent = now_ms().saturating_sub(seen_at_ms)
                < (3 * self.lease_duration.as_millis() as u64).max(60_000);
            let live = !stopped && recent && self.alive(&worker_id).await?;
            out.push(WorkerView {
                rules_hash: get_s(&item, "rules_hash").unwrap_or_default().to_owned(),
                leases: get_n(&item, "lease_count").unwrap_or(0),
                seen_at_ms: get_n(&item, "seen_at").unwrap_or(0),
                live,
                stopped,
                worker_id,
            });
        }
        Ok(out)
    }
}

/// Whether a conditional write was refused: its condition did not hold (the item changed,
/// or is there already), which the caller handles; not a fault.
pub(crate) fn refused<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.as_service_error().and_then(|e| e.code()) == Some("ConditionalCheckFailedException")
}

fn fallback_id() -> u64 {
    now_ms() * 1000 + rand::random::<u64>() % 1000
}
