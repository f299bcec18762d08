//! The lease table: one DynamoDB item per shard in the Kinesis Client Library 2.x format, so
//! KCL's tooling and dashboards can read it.
//!
//! Every write that changes who reads a shard, or where it stands, is conditional on the
//! `leaseCounter` the writer last saw and increments it: the counter is the fence. A failed
//! condition is not an error but an outcome ([`Fenced::Lost`]): someone else changed the
//! lease since it was read.
//!
//! Our checkpoints in the KCL fields (round-trips, see [`Lease::position`]):
//! - no checkpoint yet ⇔ a sentinel in `checkpoint` (`TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP`;
//!   our reader starts where `[stream]` says, whichever sentinel it is);
//! - the shard read to its end ⇔ `SHARD_END`; the last sequence number read, when known, is
//!   kept in `gcEndSequenceNumber` (KCL keeps none);
//! - a whole record settled ⇔ the sequence number and `checkpointSubSequenceNumber` 0 (KCL's
//!   meaning for a plain record);
//! - part way through a KPL aggregate, sub-records up to `n` settled ⇔ the sequence number,
//!   `checkpointSubSequenceNumber` n and `gcWithinAggregate` true (only then present), so
//!   "sub-record 0 settled" and "the whole record settled" stay apart.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ScalarAttributeType, TableStatus,
};
use aws_sdk_dynamodb::Client;

use crate::state::shared::refused;

use crate::source::Checkpoint;

pub const TRIM_HORIZON: &str = "TRIM_HORIZON";
pub const LATEST: &str = "LATEST";
pub const AT_TIMESTAMP: &str = "AT_TIMESTAMP";
pub const SHARD_END: &str = "SHARD_END";

const KEY: &str = "leaseKey";
const OWNER: &str = "leaseOwner";
const COUNTER: &str = "leaseCounter";
const CHECKPOINT: &str = "checkpoint";
const CHECKPOINT_SUB: &str = "checkpointSubSequenceNumber";
const OWNER_SWITCHES: &str = "ownerSwitchesSinceCheckpoint";
const PARENTS: &str = "parentShardId";
const CHILDREN: &str = "childShardIds";
const STARTING_HASH_KEY: &str = "startingHashKey";
const ENDING_HASH_KEY: &str = "endingHashKey";
/// Ours, not KCL's: `checkpointSubSequenceNumber` names a sub-record settled inside an
/// aggregate (not the whole record).
const WITHIN_AGGREGATE: &str = "gcWithinAggregate";
/// Ours, not KCL's: the last sequence number of a shard read to its end.
const END_SEQUENCE_NUMBER: &str = "gcEndSequenceNumber";

/// Is `checkpoint` a start sentinel (no record read yet)?
pub fn is_start_sentinel(checkpoint: &str) -> bool {
    matches!(checkpoint, TRIM_HORIZON | LATEST | AT_TIMESTAMP)
}

/// One shard's lease, as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// `leaseKey`, the table's only key.
    pub shard_id: String,
    /// `leaseOwner`: absent when the lease is free.
    pub owner: Option<String>,
    /// `leaseCounter`: incremented by every write; the fence.
    pub counter: u64,
    /// `checkpoint`: a sequence number or a sentinel.
    pub checkpoint: String,
    /// `checkpointSubSequenceNumber`.
    pub checkpoint_sub: u64,
    /// `gcWithinAggregate` (ours): `checkpoint_sub` is a sub-record settled inside an
    /// aggregate, not "the whole record".
    pub within_aggregate: bool,
    /// `gcEndSequenceNumber` (ours): with `SHARD_END`, the last record read.
    pub end_sequence_number: Option<String>,
    /// `ownerSwitchesSinceCheckpoint`.
    pub owner_switches: u64,
    /// `parentShardId` (a string set, omitted when empty: DynamoDB refuses empty sets).
    pub parents: Vec<String>,
    /// `childShardIds`.
    pub children: Vec<String>,
    /// `startingHashKey`, decimal.
    pub starting_hash_key: Option<String>,
    /// `endingHashKey`, decimal.
    pub ending_hash_key: Option<String>,
}

impl Lease {
    /// A new, free lease of a shard nobody read yet; `initial` is the start sentinel shown
    /// to KCL's tooling.
    pub fn new(shard_id: impl Into<String>, parents: Vec<String>, initial: &str) -> Self {
        Lease {
            shard_id: shard_id.into(),
            owner: None,
            counter: 0,
            checkpoint: initial.to_owned(),
            checkpoint_sub: 0,
            within_aggregate: false,
            end_sequence_number: None,
            owner_switches: 0,
            parents,
            children: Vec::new(),
            starting_hash_key: None,
            ending_hash_key: None,
        }
    }

    /// The shard is read to its end: its children may start, and the lease is never taken.
    pub fn finished(&self) -> bool {
        self.checkpoint == SHARD_END
    }

    /// Our checkpoint, `None` while the lease holds a start sentinel.
    pub fn position(&self) -> Option<Checkpoint> {
        if self.finished() {
            return Some(Checkpoint::end(self.end_sequence_number.clone()));
        }
        if is_start_sentinel(&self.checkpoint) {
            return None;
        }
        Some(Checkpoint {
            sequence_number: Some(self.checkpoint.clone()),
            sub_sequence_number: self.within_aggregate.then_some(self.checkpoint_sub),
            shard_end: false,
        })
    }

    /// Sets the checkpoint fields from ours. `None` (or a checkpoint without a sequence
    /// number that is not the end) keeps the lease's start sentinel, or writes `initial`.
    pub fn set_position(&mut self, checkpoint: Option<&Checkpoint>, initial: &str) {
        let fields = CheckpointFields::of(checkpoint, &self.checkpoint, initial);
        self.checkpoint = fields.checkpoint;
        self.checkpoint_sub = fields.sub;
        self.within_aggregate = fields.within_aggregate;
        self.end_sequence_number = fields.end_sequence_number;
    }

    /// The item, as written by `create`.
    pub fn to_item(&self) -> HashMap<String, AttributeValue> {
        let mut item = HashMap::new();
        let mut s = |name: &str, value: &str| {
            item.insert(name.to_owned(), AttributeValue::S(value.to_owned()));
        };
        s(KEY, &self.shard_id);
        s(CHECKPOINT, &self.checkpoint);
        if let Some(owner) = &self.owner {
            s(OWNER, owner);
        }
        if let Some(seq) = &self.end_sequence_number {
            s(END_SEQUENCE_NUMBER, seq);
        }
        if let Some(key) = &self.starting_hash_key {
            s(STARTING_HASH_KEY, key);
        }
        if let Some(key) = &self.ending_hash_key {
            s(ENDING_HASH_KEY, key);
        }
        item.insert(COUNTER.to_owned(), n(self.counter));
        item.insert(CHECKPOINT_SUB.to_owned(), n(self.checkpoint_sub));
        item.insert(OWNER_SWITCHES.to_owned(), n(self.owner_switches));
        if self.within_aggregate {
            item.insert(WITHIN_AGGREGATE.to_owned(), AttributeValue::Bool(true));
        }
        if !self.parents.is_empty() {
            item.insert(PARENTS.to_owned(), AttributeValue::Ss(self.parents.clone()));
        }
        if !self.children.is_empty() {
            item.insert(
                CHILDREN.to_owned(),
                AttributeValue::Ss(self.children.clone()),
            );
        }
        item
    }

    /// Reads an item; attributes KCL may leave out (numbers, sets) default to zero or empty.
    pub fn from_item(item: &HashMap<String, AttributeValue>) -> Result<Self, String> {
        let s = |name: &str| -> Result<Option<String>, String> {
            match item.get(name) {
                None | Some(AttributeValue::Null(_)) => Ok(None),
                Some(AttributeValue::S(v)) => Ok(Some(v.clone())),
                Some(other) => Err(format!("{name} is not a string: {other:?}")),
            }
        };
        let num = |name: &str| -> Result<u64, String> {
            match item.get(name) {
                None | Some(AttributeValue::Null(_)) => Ok(0),
                Some(AttributeValue::N(v)) => v
                    .parse()
                    .map_err(|_| format!("{name} is not a whole number: {v}")),
                Some(other) => Err(format!("{name} is not a number: {other:?}")),
            }
        };
        let set = |name: &str| -> Result<Vec<String>, String> {
            match item.get(name) {
                None | Some(AttributeValue::Null(_)) => Ok(Vec::new()),
                Some(AttributeValue::Ss(v)) => {
                    let mut v = v.clone();
                    v.sort();
                    Ok(v)
                }
                // KCL 1.x wrote a single parent as a string.
                Some(AttributeValue::S(v)) => Ok(vec![v.clone()]),
                Some(other) => Err(format!("{name} is not a string set: {other:?}")),
            }
        };
        Ok(Lease {
            shard_id: s(KEY)?.ok_or("no leaseKey")?,
            owner: s(OWNER)?,
            counter: num(COUNTER)?,
            checkpoint: s(CHECKPOINT)?.unwrap_or_else(|| TRIM_HORIZON.to_owned()),
            checkpoint_sub: num(CHECKPOINT_SUB)?,
            within_aggregate: matches!(
                item.get(WITHIN_AGGREGATE),
                Some(AttributeValue::Bool(true))
            ),
            end_sequence_number: s(END_SEQUENCE_NUMBER)?,
            owner_switches: num(OWNER_SWITCHES)?,
            parents: set(PARENTS)?,
            children: set(CHILDREN)?,
            starting_hash_key: s(STARTING_HASH_KEY)?,
            ending_hash_key: s(ENDING_HASH_KEY)?,
        })
    }
}

/// The checkpoint attributes for one of our checkpoints.
struct CheckpointFields {
    checkpoint: String,
    sub: u64,
    within_aggregate: bool,
    end_sequence_number: Option<String>,
}

impl CheckpointFields {
    fn of(checkpoint: Option<&Checkpoint>, current: &str, initial: &str) -> Self {
        let sentinel = || {
            let keep = is_start_sentinel(current);
            CheckpointFields {
                checkpoint: if keep { current } else { initial }.to_owned(),
                sub: 0,
                within_aggregate: false,
                end_sequence_number: None,
            }
        };
        match checkpoint {
            Some(c) if c.shard_end => CheckpointFields {
                checkpoint: SHARD_END.to_owned(),
                sub: 0,
                within_aggregate: false,
                end_sequence_number: c.sequence_number.clone(),
            },
            Some(Checkpoint {
                sequence_number: Some(seq),
                sub_sequence_number,
                ..
            }) => CheckpointFields {
                checkpoint: seq.clone(),
                sub: sub_sequence_number.unwrap_or(0),
                within_aggregate: sub_sequence_number.is_some(),
                end_sequence_number: None,
            },
            _ => sentinel(),
        }
    }
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

/// What a conditional write came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fenced<T> {
    /// Written; the lease as it is now (its new counter).
    Won(T),
    /// The condition failed: the lease changed since it was read (another worker took it,
    /// or a checkpoint was reset), or it is gone.
    Lost,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease table {table}: {call}{}: {message}", .shard.as_deref().map(|s| format!(" of shard {s}")).unwrap_or_default())]
    Call {
        table: String,
        call: &'static str,
        shard: Option<String>,
        message: String,
    },
    #[error("lease table {table} does not exist: set `create_tables = true` in [coordination], or create it with `{}`", create_command(.table))]
    MissingTable { table: String },
    #[error("lease table {table}: the item of shard {shard} cannot be read: {reason}")]
    Malformed {
        table: String,
        shard: String,
        reason: String,
    },
    #[error("lease table {table}: table {status} did not become ACTIVE")]
    NotActive { table: String, status: String },
    #[error(
        "lease lost: shard {shard} is now read by another worker; the checkpoint was not written"
    )]
    Lost { shard: String },
}

/// The AWS CLI command that creates the lease table as `ensure(true)` does.
pub fn create_command(table: &str) -> String {
    format!(
        "aws dynamodb create-table --table-name {table} \
         --attribute-definitions AttributeName={KEY},AttributeType=S \
         --key-schema AttributeName={KEY},KeyType=HASH --billing-mode PAY_PER_REQUEST"
    )
}

/// The lease table of a fleet.
#[derive(Clone, Debug)]
pub struct LeaseTable {
    pub client: Client,
    pub name: String,
}

impl LeaseTable {
    pub fn new(client: Client, name: impl Into<String>) -> Self {
        LeaseTable {
            client,
            name: name.into(),
        }
    }

    fn call_error<E>(&self, call: &'static str, shard: Option<&str>, error: E) -> LeaseError
    where
        E: std::error::Error + 'static,
    {
        LeaseError::Call {
            table: self.name.clone(),
            call,
            shard: shard.map(str::to_owned),
            message: crate::telemetry::chain(&error),
        }
    }

    fn parse(&self, item: &HashMap<String, AttributeValue>) -> Result<Lease, LeaseError> {
        Lease::from_item(item).map_err(|reason| LeaseError::Malformed {
            table: self.name.clone(),
            shard: match item.get(KEY) {
                Some(AttributeValue::S(key)) => key.clone(),
                _ => "?".to_owned(),
            },
            reason,
        })
    }

    /// Checks the table exists; when missing, creates it (on demand, `leaseKey` hash key)
    /// if `create`, else an error naming it and how to create it. Waits until it is ACTIVE.
    pub async fn ensure(&self, create: bool) -> Result<(), LeaseError> {
        let mut created = false;
        for _ in 0..120 {
            let status = match self
                .client
                .describe_table()
                .table_name(&self.name)
                .send()
                .await
            {
                Ok(out) => out.table().and_then(|t| t.table_status().cloned()),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_resource_not_found_exception()) =>
                {
                    if !create {
                        return Err(LeaseError::MissingTable {
                            table: self.name.clone(),
                        });
                    }
                    if !created {
                        self.create_table().await?;
                        created = true;
                    }
                    None
                }
                Err(e) => return Err(self.call_error("DescribeTable", None, e)),
            };
            match status {
                Some(TableStatus::Active) => return Ok(()),
                Some(TableStatus::Creating | TableStatus::Updating) | None => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Some(other) => {
                    return Err(LeaseError::NotActive {
                        table: self.name.clone(),
                        status: other.as_str().to_owned(),
                    })
                }
            }
        }
        Err(LeaseError::NotActive {
            table: self.name.clone(),
            status: "CREATING for a minute".to_owned(),
        })
    }

    async fn create_table(&self) -> Result<(), LeaseError> {
        let definition = AttributeDefinition::builder()
            .attribute_name(KEY)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("name and type are set");
        let key = KeySchemaElement::builder()
            .attribute_name(KEY)
            .key_type(KeyType::Hash)
            .build()
            .expect("name and type are set");
        match self
            .client
            .create_table()
            .table_name(&self.name)
            .attribute_definitions(definition)
            .key_schema(key)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(table = %self.name, "lease table created");
                Ok(())
            }
            // Another worker created it at the same time.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(self.call_error("CreateTable", None, e)),
        }
    }

    /// Every lease (a consistent scan, all pages).
    pub async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        let mut leases = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.name)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.call_error("Scan", None, e))?;
            for item in out.items() {
                leases.push(self.parse(item)?);
            }
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        leases.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
        Ok(leases)
    }

    /// One lease, read consistently.
    pub async fn get(&self, shard: &str) -> Result<Option<Lease>, LeaseError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.name)
            .key(KEY, s(shard))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.call_error("GetItem", Some(shard), e))?;
        out.item().map(|item| self.parse(item)).transpose()
    }

    /// Writes a new lease unless the shard has one: `true` when it was written.
    pub async fn create(&self, lease: &Lease) -> Result<bool, LeaseError> {
        match self
            .client
            .put_item()
            .table_name(&self.name)
            .set_item(Some(lease.to_item()))
            .condition_expression("attribute_not_exists(leaseKey)")
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if refused(&e) => Ok(false),
            Err(e) => Err(self.call_error("PutItem", Some(&lease.shard_id), e)),
        }
    }

    /// A conditional UpdateItem returning the lease as written.
    async fn update(
        &self,
        call: &'static str,
        shard: &str,
        update: &str,
        condition: &str,
        values: Vec<(&str, AttributeValue)>,
    ) -> Result<Fenced<Lease>, LeaseError> {
        let mut request = self
            .client
            .update_item()
            .table_name(&self.name)
            .key(KEY, s(shard))
            .update_expression(update)
            .condition_expression(condition)
            .return_values(ReturnValue::AllNew);
        for (name, value) in values {
            request = request.expression_attribute_values(name, value);
        }
        match request.send().await {
            Ok(out) => match out.attributes() {
                Some(item) => Ok(Fenced::Won(self.parse(item)?)),
                None => Err(LeaseError::Malformed {
                    table: self.name.clone(),
                    shard: shard.to_owned(),
                    reason: format!("{call} returned no item"),
                }),
            },
            Err(e) if refused(&e) => Ok(Fenced::Lost),
            Err(e) => Err(self.call_error(call, Some(shard), e)),
        }
    }

    /// Takes a lease (free, expired, or stolen) for `worker`, if it is still as `lease`
    /// saw it.
    pub async fn take(&self, lease: &Lease, worker: &str) -> Result<Fenced<Lease>, LeaseError> {
        self.update(
            "take",
            &lease.shard_id,
            "SET leaseOwner = :me, leaseCounter = leaseCounter + :one, \
             ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one",
            "leaseCounter = :seen",
            vec![
                (":me", s(worker)),
                (":one", n(1)),
                (":zero", n(0)),
                (":seen", n(lease.counter)),
            ],
        )
        .await
    }

    /// Renews a lease `worker` holds: the counter moves, so others see it alive.
    pub async fn renew(&self, lease: &Lease, worker: &str) -> Result<Fenced<Lease>, LeaseError> {
        self.update(
            "renew",
            &lease.shard_id,
            "SET leaseCounter = leaseCounter + :one",
            "leaseCounter = :seen AND leaseOwner = :me",
            vec![
                (":me", s(worker)),
                (":one", n(1)),
                (":seen", n(lease.counter)),
            ],
        )
        .await
    }

    /// Writes `worker`'s checkpoint, only if it still holds the lease as it saw it.
    pub async fn checkpoint(
        &self,
        lease: &Lease,
        worker: &str,
        checkpoint: &Checkpoint,
    ) -> Result<Fenced<Lease>, LeaseError> {
        let (set, remove, mut values) = checkpoint_update(Some(checkpoint), &lease.checkpoint);
        values.extend([(":me", s(worker)), (":seen", n(lease.counter))]);
        self.update(
            "checkpoint",
            &lease.shard_id,
            &format!(
                "SET {set}, ownerSwitchesSinceCheckpoint = :zero, leaseCounter = leaseCounter + :one{remove}"
            ),
            "leaseCounter = :seen AND leaseOwner = :me",
            values,
        )
        .await
    }

    /// Gives a lease up: it has no owner, so any worker takes it at once.
    pub async fn release(&self, lease: &Lease, worker: &str) -> Result<Fenced<Lease>, LeaseError> {
        self.update(
            "release",
            &lease.shard_id,
            "SET leaseCounter = leaseCounter + :one REMOVE leaseOwner",
            "leaseCounter = :seen AND leaseOwner = :me",
            vec![
                (":me", s(worker)),
                (":one", n(1)),
                (":seen", n(lease.counter)),
            ],
        )
        .await
    }

    /// Deletes a finished shard's lease: `false` when it is not finished (or gone).
    pub async fn delete(&self, shard: &str) -> Result<bool, LeaseError> {
        match self
            .client
            .delete_item()
            .table_name(&self.name)
            .key(KEY, s(shard))
            .condition_expression("checkpoint = :end")
            .expression_attribute_values(":end", s(SHARD_END))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if refused(&e) => Ok(false),
            Err(e) => Err(self.call_error("DeleteItem", Some(shard), e)),
        }
    }

    /// Sets a shard's checkpoint whoever holds it (`checkpoints reset`); `None`: read it
    /// from the start again (`initial` is the sentinel written). The counter still moves,
    /// so the holder loses the lease at its next write and the next holder reads from the
    /// new checkpoint. `Lost` when the shard has no lease.
    pub async fn reset_checkpoint(
        &self,
        shard: &str,
        checkpoint: Option<&Checkpoint>,
        initial: &str,
    ) -> Result<Fenced<Lease>, LeaseError> {
        let (set, remove, mut values) = checkpoint_update(checkpoint, initial);
        values.push((":key", s(shard)));
        self.update(
            "reset checkpoint",
            shard,
            &format!(
                "SET {set}, ownerSwitchesSinceCheckpoint = :zero, leaseCounter = leaseCounter + :one{remove}"
            ),
            "leaseKey = :key",
            values,
        )
        .await
    }

    /// Adds child shard ids to a lease (metadata for KCL's tooling; the counter does not
    /// move, so its holder keeps it).
    pub async fn add_children(&self, shard: &str, children: &[String]) -> Result<(), LeaseError> {
        if children.is_empty() {
            return Ok(());
        }
        match self
            .client
            .update_item()
            .table_name(&self.name)
            .key(KEY, s(shard))
            .update_expression("ADD childShardIds :children")
            .condition_expression("attribute_exists(leaseKey)")
            .expression_attribute_values(":children", AttributeValue::Ss(children.to_vec()))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if refused(&e) => Ok(()),
            Err(e) => Err(self.call_error("UpdateItem childShardIds", Some(shard), e)),
        }
    }
}

/// The `SET` clauses, the ` REMOVE` clause (may be empty) and the values that write a
/// checkpoint (`:one` and `:zero` included). `current` is the lease's `checkpoint`, kept when
/// it is a start sentinel and there is no checkpoint to write.
fn checkpoint_update(
    checkpoint: Option<&Checkpoint>,
    current: &str,
) -> (String, String, Vec<(&'static str, AttributeValue)>) {
    let fields = CheckpointFields::of(
        checkpoint,
        current,
        if is_start_sentinel(current) {
            current
        } else {
            TRIM_HORIZON
        },
    );
    let mut set = vec!["checkpoint = :cp", "checkpointSubSequenceNumber = :sub"];
    let mut remove = Vec::new();
    let mut values = vec![
        (":cp", s(&fields.checkpoint)),
        (":sub", n(fields.sub)),
        (":one", n(1)),
        (":zero", n(0)),
    ];
    if fields.within_aggregate {
        set.push("gcWithinAggregate = :within");
        values.push((":within", AttributeValue::Bool(true)));
    } else {
        remove.push(WITHIN_AGGREGATE);
    }
    match fields.end_sequence_number {
        Some(seq) => {
            set.push("gcEndSequenceNumber = :endseq");
            values.push((":endseq", s(&seq)));
        }
        None => remove.push(END_SEQUENCE_NUMBER),
    }
    let remove = if remove.is_empty() {
        String::new()
    } else {
        format!(" REMOVE {}", remove.join(", "))
    };
    (set.join(", "), remove, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            shard_id: "shardId-000000000003".into(),
            owner: Some("host-a".into()),
            counter: 42,
            checkpoint: "49590338271490256608559692538361571095921575989136588898".into(),
            checkpoint_sub: 0,
            within_aggregate: false,
            end_sequence_number: None,
            owner_switches: 2,
            parents: vec!["shardId-000000000000".into(), "shardId-000000000001".into()],
            children: vec!["shardId-000000000007".into()],
            starting_hash_key: Some("0".into()),
            ending_hash_key: Some("170141183460469231731687303715884105727".into()),
        }
    }

    #[test]
    fn an_item_round_trips() {
        let full = lease();
        assert_eq!(Lease::from_item(&full.to_item()).unwrap(), full);
        let bare = Lease::new("shardId-000000000000", Vec::new(), LATEST);
        let item = bare.to_item();
        // DynamoDB refuses empty sets; a free lease has no owner attribute.
        assert!(!item.contains_key(PARENTS) && !item.contains_key(CHILDREN));
        assert!(!item.contains_key(OWNER));
        assert_eq!(item[COUNTER], AttributeValue::N("0".into()));
        assert_eq!(Lease::from_item(&item).unwrap(), bare);
    }

    #[test]
    fn a_kcl_item_reads_with_defaults() {
        let mut item = HashMap::new();
        item.insert(KEY.to_owned(), s("shardId-000000000001"));
        item.insert(COUNTER.to_owned(), n(7));
        item.insert(CHECKPOINT.to_owned(), s("123"));
        item.insert(CHECKPOINT_SUB.to_owned(), n(0));
        let lease = Lease::from_item(&item).unwrap();
        assert_eq!(lease.counter, 7);
        assert_eq!(lease.owner, None);
        assert_eq!(lease.position(), Some(Checkpoint::at("123".into())));
        item.insert(COUNTER.to_owned(), s("7"));
        assert!(Lease::from_item(&item)
            .unwrap_err()
            .contains("leaseCounter"));
    }

    #[test]
    fn checkpoints_round_trip_through_the_kcl_fields() {
        let cases = [
            None,
            Some(Checkpoint::at("100".into())),
            // Sub-record 0 settled is not "the whole record settled".
            Some(Checkpoint::within("100".into(), 0)),
            Some(Checkpoint::within("100".into(), 5)),
            Some(Checkpoint::end(Some("200".into()))),
            Some(Checkpoint::end(None)),
        ];
        for case in cases {
            let mut lease = Lease::new("s", Vec::new(), TRIM_HORIZON);
            lease.set_position(case.as_ref(), TRIM_HORIZON);
            let back = Lease::from_item(&lease.to_item()).unwrap();
            assert_eq!(back.position(), case, "{case:?} as {lease:?}");
        }
        let mut lease = Lease::new("s", Vec::new(), LATEST);
        lease.set_position(Some(&Checkpoint::within("100".into(), 5)), LATEST);
        assert_eq!(
            (lease.checkpoint.as_str(), lease.checkpoint_sub),
            ("100", 5)
        );
        lease.set_position(Some(&Checkpoint::end(Some("200".into()))), LATEST);
        assert_eq!(lease.checkpoint, SHARD_END);
        assert!(lease.finished());
        // Back to no checkpoint: the start sentinel.
        lease.set_position(None, LATEST);
        assert_eq!(lease.checkpoint, LATEST);
        assert_eq!(lease.position(), None);
    }

    #[test]
    fn the_missing_table_error_says_how_to_create_it() {
        let e = LeaseError::MissingTable {
            table: "fleet-leases".into(),
        };
        let text = e.to_string();
        assert!(
            text.contains("lease table fleet-leases does not exist"),
            "{text}"
        );
        assert!(text.contains("create_tables = true"), "{text}");
        assert!(
            text.contains("aws dynamodb create-table --table-name fleet-leases"),
            "{text}"
        );
        let e = LeaseError::Call {
            table: "t".into(),
            call: "renew",
            shard: Some("shardId-1".into()),
            message: "boom".into(),
        };
        assert_eq!(
            e.to_string(),
            "lease table t: renew of shard shardId-1: boom"
        );
    }
}
