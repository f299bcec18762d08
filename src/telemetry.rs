//! Telemetry: the metrics, the log events that go with them, and the HTTP listener
//! (`/healthz`, `/readyz`, `/metrics`, `/status`).
//!
//! Each method here both logs an event and counts it, so a log line and its metric share
//! one name and cannot drift apart. Nothing here ever sees a payload, a key or a param.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::clock::now_ms;
use crate::rules::reload::Rules;
use crate::shutdown::Shutdown;
use crate::source::{KinesisSource, ReadMode};
use crate::state::State;

/// An error and its causes, each once: `outer: cause: root cause`.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

type Labels = Vec<(&'static str, String)>;

/// How a decision ended: the `outcome` label of `actions_total` and the log event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionOutcome {
    Done,
    Duplicate,
    DeadLettered,
    /// A dead letter's retry failed: the letter stays (no new one).
    StillFailing,
    /// Its action is paused or its request is on legal hold: held, sent when released.
    Held,
    /// The backend took it as a job that finishes later: polled until it does.
    Accepted,
    /// Its request was denied: not sent.
    Denied,
    /// A job the backend accepted finished.
    JobDone,
    /// A job failed, or was given up: dead-lettered.
    JobFailed,
}

impl ActionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionOutcome::Done => "done",
            ActionOutcome::Duplicate => "duplicate",
            ActionOutcome::DeadLettered => "dead_lettered",
            ActionOutcome::StillFailing => "still_failing",
            ActionOutcome::Held => "held",
            ActionOutcome::Accepted => "accepted",
            ActionOutcome::Denied => "denied",
            ActionOutcome::JobDone => "job_done",
            ActionOutcome::JobFailed => "job_failed",
        }
    }
}

/// What became of a record that cannot be read as what it looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnreadableOutcome {
    DeadLettered,
    /// Rules read it as well as it could be read: repaired, or as text.
    ReadAnyway,
    /// No rule's prefilter let it through: only counted.
    Unseen,
}

impl UnreadableOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            UnreadableOutcome::DeadLettered => "dead_lettered",
            UnreadableOutcome::ReadAnyway => "read_anyway",
            UnreadableOutcome::Unseen => "unseen",
        }
    }
}

/// Where a shard stands, for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct ShardView {
    pub shard_id: String,
    /// `reading`, `waiting_for_parent`, `finished`, or `not_started`.
    pub state: &'static str,
    pub checkpoint: Option<String>,
    pub millis_behind_latest: Option<i64>,
    /// `polling` or `fan-out`.
    pub read_mode: &'static str,
    /// Why its worker last failed, while it waits to be restarted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

pub struct Telemetry {
    registry: Registry,
    records_read: Family<Labels, Counter>,
    get_records_calls: Family<Labels, Counter>,
    subscription_events: Family<Labels, Counter>,
    subscriptions_started: Family<Labels, Counter>,
    bytes_read: Family<Labels, Counter>,
    rule_records: Family<Labels, Counter>,
    rule_matches: Family<Labels, Counter>,
    rule_errors: Family<Labels, Counter>,
    undecodable_records: Family<Labels, Counter>,
    /// When a record read anyway was last logged as a warning, per reason.
    read_anyway_warned: Mutex<BTreeMap<&'static str, Instant>>,
    actions: Family<Labels, Counter>,
    action_seconds: Family<Labels, Histogram>,
    dead_letters_pending: Gauge,
    oldest_dead_letter_age_seconds: Gauge,
    requests_by_status: Family<Labels, Gauge>,
    requests_overdue: Gauge,
    oldest_open_request_overdue_seconds: Gauge,
    millis_behind_latest: Family<Labels, Gauge>,
    retention_risk: Family<Labels, Gauge>,
    /// Lag beyond which unread records risk expiring (retention minus the margin).
    risk_threshold: Mutex<Option<Duration>>,
    rules_reloads: Family<Labels, Counter>,
    rules_stale: Gauge,
    rules_watch_lost: Gauge,
    rules_info: Family<Labels, Gauge>,
    shards_owned: Gauge,
    checkpoint_commit_seconds: Histogram,
    shards: Mutex<BTreeMap<String, ShardView>>,
    shard_restarts: Family<Labels, Counter>,
    action_retries: Family<Labels, Counter>,
    kinesis_retries: Counter,
    /// Shards whose worker failed and waits to be restarted, with why.
    failing_shards: Mutex<BTreeMap<String, String>>,
    /// Why the state cannot be written, while it cannot: no backend call is made then.
    state_fault: Mutex<Option<String>>,
    state_write_errors: Counter,
    already_dead_lettered: Counter,
    held_unsendable: Counter,
    job_poll_errors: Family<Labels, Counter>,
    /// The actions of the config, for their pause gauges.
    configured_actions: Mutex<std::collections::BTreeSet<String>>,
    action_paused: Family<Labels, Gauge>,
    requests_held: Family<Labels, Gauge>,
    started: Instant,
    leases: LeaseMetrics,
}

/// Why a fan-out subscription started (`subscriptions_started_total{reason}`).
pub const SUBSCRIPTION_REASONS: [&str; 4] = ["initial", "renewal", "ended", "error"];

fn label(name: &'static str, value: &str) -> Labels {
    vec![(name, value.to_owned())]
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        let histogram = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let mut t = Telemetry {
            registry: Registry::with_prefix("gdpr_consumer"),
            records_read: Family::default(),
            get_records_calls: Family::default(),
            subscription_events: Family::default(),
            subscriptions_started: Family::default(),
            bytes_read: Family::default(),
            rule_records: Family::default(),
            rule_matches: Family::default(),
            rule_errors: Family::default(),
            undecodable_records: Family::default(),
            read_anyway_warned: Mutex::default(),
            actions: Family::default(),
            action_seconds: Family::new_with_constructor(histogram),
            dead_letters_pending: Gauge::default(),
            oldest_dead_letter_age_seconds: Gauge::default(),
            requests_by_status: Family::default(),
            requests_overdue: Gauge::default(),
            oldest_open_request_overdue_seconds: Gauge::default(),
            millis_behind_latest: Family::default(),
            retention_risk: Family::default(),
            risk_threshold: Mutex::new(None),
            rules_reloads: Family::default(),
            rules_stale: Gauge::default(),
            rules_watch_lost: Gauge::default(),
            rules_info: Family::default(),
            shards_owned: Gauge::default(),
            checkpoint_commit_seconds: histogram(),
            shards: Mutex::default(),
            shard_restarts: Family::default(),
            action_retries: Family::default(),
            kinesis_retries: Counter::default(),
            failing_shards: Mutex::default(),
            state_fault: Mutex::default(),
            state_write_errors: Counter::default(),
            already_dead_lettered: Counter::default(),
            held_unsendable: Counter::default(),
            job_poll_errors: Family::default(),
            configured_actions: Mutex::default(),
            action_paused: Family::default(),
            requests_held: Family::default(),
            started: Instant::now(),
            leases: LeaseMetrics::default(),
        };
        // Counted from zero, so an alert on their rate works from the first one.
        for reason in SUBSCRIPTION_REASONS {
            drop(
                t.subscriptions_started
                    .get_or_create(&label("reason", reason)),
            );
        }
        for reason in crate::decode::Unreadable::ALL {
            drop(
                t.undecodable_records
                    .get_or_create(&label("reason", reason.as_str())),
            );
        }
        let r = &mut t.registry;
        r.register(
            "records_read",
            "Records read, per shard and read mode (polling or fan-out)",
            t.records_read.clone(),
        );
        r.register(
            "bytes_read",
            "Payload bytes read, per shard",
            t.bytes_read.clone(),
        );
        r.register(
            "get_records_calls",
            "GetRecords answers, per shard (an idle shard's polls back off to idle_poll_interval_ms)",
            t.get_records_calls.clone(),
        );
        r.register(
            "subscription_events",
            "SubscribeToShard events received, per shard (fan-out; heartbeats included)",
            t.subscription_events.clone(),
        );
        r.register(
            "subscriptions_started",
            "SubscribeToShard subscriptions started, by reason (initial, renewal, ended, error)",
            t.subscriptions_started.clone(),
        );
        r.register(
            "rule_records",
            "Records that reached a rule (past its prefilter)",
            t.rule_records.clone(),
        );
        r.register(
            "rule_matches",
            "Records a rule made a decision for",
            t.rule_matches.clone(),
        );
        r.register(
            "rule_errors",
            "Records a rule failed on (dead-lettered)",
            t.rule_errors.clone(),
        );
        r.register(
            "undecodable_records",
            "Records that cannot be read as what they look like, by reason",
            t.undecodable_records.clone(),
        );
        r.register(
            "actions",
            "Decisions by action and outcome",
            t.actions.clone(),
        );
        r.register(
            "action_duration_seconds",
            "Time to settle a backend call, retries included",
            t.action_seconds.clone(),
        );
        r.register(
            "dead_letters_pending",
            "Dead letters waiting for a retry or an operator",
            t.dead_letters_pending.clone(),
        );
        r.register(
            "oldest_dead_letter_age_seconds",
            "Age of the oldest pending dead letter",
            t.oldest_dead_letter_age_seconds.clone(),
        );
        r.register(
            "requests",
            "Privacy requests by status (open, waiting, failed, held: owed an answer; complete, denied: answered)",
            t.requests_by_status.clone(),
        );
        r.register(
            "requests_overdue",
            "Open requests past their due date (after any extension)",
            t.requests_overdue.clone(),
        );
        r.register(
            "oldest_open_request_overdue_seconds",
            "Now minus the due date of the open request due first (negative: time left; 0 when none is open)",
            t.oldest_open_request_overdue_seconds.clone(),
        );
        r.register(
            "millis_behind_latest",
            "How far a shard's reader is behind the stream's tip",
            t.millis_behind_latest.clone(),
        );
        r.register(
            "retention_risk",
            "1 when a shard's unread records are within the margin of the stream's retention",
            t.retention_risk.clone(),
        );
        r.register(
            "rules_reloads",
            "Rule reloads by result",
            t.rules_reloads.clone(),
        );
        r.register(
            "rules_stale",
            "1 when older rules run: the last reload was refused, or the directory is not watched",
            t.rules_stale.clone(),
        );
        r.register(
            "rules_watch_lost",
            "1 while the rules directory cannot be watched: edits go unseen (rules are stale)",
            t.rules_watch_lost.clone(),
        );
        r.register(
            "rules_info",
            "The running rule set, by hash",
            t.rules_info.clone(),
        );
        r.register(
            "shards_owned",
            "Shards being read now",
            t.shards_owned.clone(),
        );
        r.register(
            "shard_restarts",
            "Shard workers restarted after a failure",
            t.shard_restarts.clone(),
        );
        r.register(
            "action_retries",
            "Backend faults retried (transport errors, timeouts, 408, 429, 5xx, retry_statuses)",
            t.action_retries.clone(),
        );
        r.register(
            "kinesis_retries",
            "Kinesis calls that failed and were retried (ListShards, GetShardIterator, GetRecords, SubscribeToShard)",
            t.kinesis_retries.clone(),
        );
        r.register(
            "state_write_errors",
            "State commits that failed (no backend call is made until one succeeds)",
            t.state_write_errors.clone(),
        );
        r.register(
            "already_dead_lettered",
            "Records or requests read again while a pending dead letter holds them",
            t.already_dead_lettered.clone(),
        );
        r.register(
            "held_unsendable",
            "Held requests the config can no longer turn into a request (they stay held)",
            t.held_unsendable.clone(),
        );
        r.register(
            "job_poll_errors",
            "Polls of a job whose status could not be read, by action (asked again at the next poll)",
            t.job_poll_errors.clone(),
        );
        r.register(
            "action_paused",
            "1 while an action is paused",
            t.action_paused.clone(),
        );
        r.register(
            "requests_held",
            "Requests held for a paused action, by action",
            t.requests_held.clone(),
        );
        r.register(
            "checkpoint_commit_seconds",
            "Time to commit a checkpoint",
            t.checkpoint_commit_seconds.clone(),
        );
        t.leases.register(&mut t.registry);
        t
    }

    /// A batch of `records` records, `bytes` bytes of payload, read from a shard: one
    /// GetRecords answer (counted, to show what idle shards cost).
    pub fn records_read(
        &self,
        shard_id: &str,
        records: usize,
        bytes: usize,
        mode: Option<ReadMode>,
    ) {
        let shard = label("shard_id", shard_id);
        let mode = mode.unwrap_or(ReadMode::Polling);
        match mode {
            ReadMode::Polling => self.get_records_calls.get_or_create(&shard).inc(),
            ReadMode::FanOut => self.subscription_events.get_or_create(&shard).inc(),
        };
        let labels = vec![
            ("shard_id", shard_id.to_owned()),
            ("read_mode", mode.as_str().to_owned()),
        ];
        self.records_read
            .get_or_create(&labels)
            .inc_by(records as u64);
        self.bytes_read.get_or_create(&shard).inc_by(bytes as u64);
    }

    /// A shard's subscription started (`reason`: `initial`, `renewal` before Kinesis ends
    /// it, `ended` by Kinesis, `error` after a fault or a dropped connection).
    pub fn subscription_started(&self, shard_id: &str, reason: &'static str) {
        self.subscriptions_started
            .get_or_create(&label("reason", reason))
            .inc();
        tracing::debug!(
            event = "subscription_started",
            shard_id,
            reason,
            "subscribed to the shard"
        );
    }

    /// A rule saw `seen` records and decided on `matched` of them.
    pub fn rule_evaluated(&self, rule: &str, seen: u64, matched: u64) {
        if seen > 0 {
            self.rule_records
                .get_or_create(&label("rule", rule))
                .inc_by(seen);
        }
        if matched > 0 {
            self.rule_matches
                .get_or_create(&label("rule", rule))
                .inc_by(matched);
        }
    }

    /// A rule failed on a record. `error` must be safe to log (no values from the record).
    pub fn rule_failed(&self, shard_id: &str, sequence_number: &str, rule: &str, error: &str) {
        self.rule_records.get_or_create(&label("rule", rule)).inc();
        self.rule_errors.get_or_create(&label("rule", rule)).inc();
        tracing::warn!(
            event = "rule_error",
            shard_id,
            sequence_number,
            rule,
            error,
            "rule failed on a record; dead-lettering it"
        );
    }

    /// A record cannot be read as what it looks like (damaged compression, a malformed
    /// aggregate, broken JSON). Counted whatever became of it. Logged as a warning when it
    /// was dead-lettered; when rules read it anyway, a warning at most once a minute per
    /// reason; otherwise at debug level. So a producer writing Latin-1 JSON, or text lines
    /// that start with `[`, to the whole stream shows in the metric and once in the log,
    /// without flooding it. Never the payload: where, and the `reason` label.
    pub fn undecodable_record(
        &self,
        shard_id: &str,
        sequence_number: &str,
        sub_sequence_number: u64,
        reason: &'static str,
        outcome: UnreadableOutcome,
    ) {
        self.undecodable_records
            .get_or_create(&label("reason", reason))
            .inc();
        let warn = match outcome {
            UnreadableOutcome::DeadLettered => true,
            UnreadableOutcome::ReadAnyway => {
                let mut warned = self.read_anyway_warned.lock().unwrap();
                let now = Instant::now();
                let due = warned
                    .get(reason)
                    .is_none_or(|at| now.duration_since(*at) >= Duration::from_secs(60));
                if due {
                    warned.insert(reason, now);
                }
                due
            }
            UnreadableOutcome::Unseen => false,
        };
        let outcome = outcome.as_str();
        if warn {
            tracing::warn!(
                event = "undecodable_record",
                shard_id,
                sequence_number,
                sub_sequence_number,
                reason,
                outcome,
                "record cannot be read as what it looks like"
            );
        } else {
            tracing::debug!(
                event = "undecodable_record",
                shard_id,
                sequence_number,
                sub_sequence_number,
                reason,
                outcome,
                "record cannot be read as what it looks like"
            );
        }
    }

    /// A decision ended. `error` must be safe to log (no URL, key or params).
    #[allow(clippy::too_many_arguments)]
    pub fn action(
        &self,
        outcome: ActionOutcome,
        shard_id: &str,
        sequence_number: &str,
        rule: &str,
        rules_hash: &str,
        action: &str,
        attempts: u32,
        took: Option<Duration>,
        error: Option<&str>,
    ) {
        let labels = vec![
            ("action", action.to_owned()),
            ("outcome", outcome.as_str().to_owned()),
        ];
        self.actions.get_or_create(&labels).inc();
        if let Some(took) = took {
            self.action_seconds
                .get_or_create(&label("action", action))
                .observe(took.as_secs_f64());
        }
        let event = outcome.as_str();
        match outcome {
            ActionOutcome::Done => tracing::info!(
                event,
                shard_id,
                sequence_number,
                rule,
                rules_hash,
                action,
                attempts,
                "action done"
            ),
            ActionOutcome::Duplicate => tracing::debug!(
                event,
                shard_id,
                sequence_number,
                rule,
                action,
                "request already done; skipping duplicate"
            ),
            ActionOutcome::Held => tracing::info!(
                event,
                shard_id,
                sequence_number,
                rule,
                action,
                "request held (action paused, or request on legal hold) until released"
            ),
            ActionOutcome::Accepted => tracing::info!(
                event,
                shard_id,
                sequence_number,
                rule,
                rules_hash,
                action,
                attempts,
                "backend accepted the request as a job; polling it until it finishes"
            ),
            ActionOutcome::Denied => tracing::info!(
                event,
                shard_id,
                sequence_number,
                rule,
                action,
                "request denied by an operator; not sent"
            ),
            ActionOutcome::JobDone => tracing::info!(
                event,
                shard_id,
                sequence_number,
                rule,
                action,
                attempts,
                "job finished: action done"
            ),
            ActionOutcome::JobFailed => tracing::warn!(
                event,
                shard_id,
                sequence_number,
                rule,
                action,
                attempts,
                error = error.unwrap_or(""),
                "job failed or given up; dead-lettering it"
            ),
            ActionOutcome::StillFailing => tracing::warn!(
                event,
                shard_id,
                sequence_number,
                rule,
                action,
                attempts,
                error = error.unwrap_or(""),
                "a dead letter's retry failed; the letter stays"
            ),
            ActionOutcome::DeadLettered => tracing::warn!(
                event,
                shard_id,
                sequence_number,
                rule,
                rules_hash,
                action,
                attempts,
                error = error.unwrap_or(""),
                "action failed; dead-lettering it"
            ),
        }
    }

    /// The stream keeps records for `retention`; alarm when a shard lags within `margin`
    /// of it (half the retention if the margin is larger).
    pub fn set_retention(&self, retention: Duration, margin: Duration) {
        let margin = if margin >= retention {
            retention / 2
        } else {
            margin
        };
        *self.risk_threshold.lock().unwrap() = Some(retention - margin);
    }

    pub fn shard_lag(&self, shard_id: &str, millis_behind_latest: Option<i64>) {
        if let Some(ms) = millis_behind_latest {
            self.millis_behind_latest
                .get_or_create(&label("shard_id", shard_id))
                .set(ms);
            if let Some(threshold) = *self.risk_threshold.lock().unwrap() {
                let at_risk = ms.max(0) as u128 >= threshold.as_millis();
                let gauge = self
                    .retention_risk
                    .get_or_create(&label("shard_id", shard_id));
                if at_risk && gauge.get() == 0 {
                    tracing::error!(event = "retention_risk", shard_id, millis_behind_latest = ms, "unread records are close to the stream's retention: they could expire before they are handled");
                }
                gauge.set(i64::from(at_risk));
            }
        }
        if let Some(view) = self.shards.lock().unwrap().get_mut(shard_id) {
            view.millis_behind_latest = millis_behind_latest;
        }
    }

    pub fn checkpoint_committed(&self, took: Duration) {
        self.checkpoint_commit_seconds.observe(took.as_secs_f64());
    }

    /// A Kinesis call failed (`call`: `ListShards`, or the shard whose reads failed); it is
    /// tried again with backoff.
    pub fn kinesis_retry(&self, call: &str, error: &str) {
        self.kinesis_retries.inc();
        tracing::warn!(
            event = "kinesis_retry",
            call,
            error,
            "Kinesis call failed; retrying"
        );
    }

    /// A held request the config can no longer turn into a request: it stays held.
    pub fn held_unsendable(&self, action: &str, held: u64, error: &str) {
        self.held_unsendable.inc();
        tracing::warn!(
            event = "held_unsendable",
            action,
            held,
            error,
            "a held request cannot be built with the config; it stays held"
        );
    }

    /// A job's status could not be read (a fault, an answer without a status): asked
    /// again at the next poll, until the job is given up.
    pub fn job_poll_failed(&self, action: &str, job: u64, error: &str) {
        self.job_poll_errors
            .get_or_create(&label("action", action))
            .inc();
        tracing::warn!(
            event = "job_poll_failed",
            action,
            job,
            error,
            "cannot read a job's status; asked again at the next poll"
        );
    }

    /// An action the daemon may call: its retries are counted from zero.
    pub fn action_configured(&self, action: &str) {
        drop(self.action_retries.get_or_create(&label("action", action)));
        drop(self.job_poll_errors.get_or_create(&label("action", action)));
        self.configured_actions
            .lock()
            .unwrap()
            .insert(action.to_owned());
    }

    /// A backend fault; the request is sent again after `delay`. `error` is safe to log
    /// (no URL, key or params).
    pub fn action_retry(&self, action: &str, attempt: u32, error: &str, delay: Duration) {
        self.action_retries
            .get_or_create(&label("action", action))
            .inc();
        tracing::warn!(
            event = "action_retry",
            action,
            attempt,
            error,
            delay_ms = delay.as_millis() as u64,
            "action failed, retrying"
        );
    }

    /// A shard's worker failed; it starts again after `restart_in`.
    pub fn shard_failed(
        &self,
        shard_id: &str,
        error: &dyn std::error::Error,
        failures: u32,
        restart_in: Duration,
    ) {
        let error = chain(error);
        self.shard_restarts
            .get_or_create(&label("shard_id", shard_id))
            .inc();
        tracing::error!(
            event = "shard_failed",
            shard_id,
            failures,
            restart_in_ms = restart_in.as_millis() as u64,
            error = %error,
            "shard worker failed; restarting it after a pause"
        );
        self.failing_shards
            .lock()
            .unwrap()
            .insert(shard_id.to_owned(), error);
    }

    /// A shard's worker ended without an error.
    pub fn shard_recovered(&self, shard_id: &str) {
        self.failing_shards.lock().unwrap().remove(shard_id);
    }

    /// A state commit failed (`Some`) or succeeded again (`None`).
    pub fn state_write(&self, fault: Option<&dyn std::error::Error>) {
        let mut current = self.state_fault.lock().unwrap();
        match fault {
            Some(error) => {
                let error = chain(error);
                self.state_write_errors.inc();
                tracing::error!(event = "state_write_error", error = %error, "cannot write the state; no backend call until it can");
                *current = Some(error);
            }
            None if current.is_some() => {
                tracing::info!(
                    event = "state_write_recovered",
                    "the state can be written again"
                );
                *current = None;
            }
            None => {}
        }
    }

    /// Why the state cannot be written, while it cannot.
    pub fn state_fault(&self) -> Option<String> {
        self.state_fault.lock().unwrap().clone()
    }

    /// A record or request read again while a pending dead letter already holds it.
    pub fn already_dead_lettered(&self, shard_id: &str, sequence_number: &str, letter: u64) {
        self.already_dead_lettered.inc();
        tracing::info!(
            event = "already_dead_lettered",
            shard_id,
            sequence_number,
            dead_letter = letter,
            "already held by a pending dead letter; not dead-lettered again"
        );
    }

    /// The supervisor's view of every listed shard.
    pub fn set_shards(&self, views: Vec<ShardView>) {
        let mut shards = self.shards.lock().unwrap();
        let lags: BTreeMap<String, Option<i64>> = shards
            .iter()
            .map(|(id, v)| (id.clone(), v.millis_behind_latest))
            .collect();
        shards.clear();
        for mut view in views {
            // Counted from zero, so a rate over the first restart works (and the reads
            // of either mode show 0 in the other).
            let shard = label("shard_id", &view.shard_id);
            drop(self.shard_restarts.get_or_create(&shard));
            drop(self.get_records_calls.get_or_create(&shard));
            drop(self.subscription_events.get_or_create(&shard));
            view.millis_behind_latest = lags.get(&view.shard_id).copied().flatten();
            shards.insert(view.shard_id.clone(), view);
        }
        let reading = shards.values().filter(|v| v.state == "reading").count();
        self.shards_owned.set(reading as i64);
    }

    /// Why the daemon is not ready, if it is not: the stream unreachable or a shard's
    /// reads failing, a shard worker failed, the state not writable, no rules.
    fn not_ready(&self, served: &Served) -> Vec<String> {
        let mut reasons: Vec<String> = served
            .source
            .faults()
            .into_iter()
            .map(|(what, error)| format!("stream: {what}: {error}"))
            .collect();
        for (shard, error) in self.failing_shards.lock().unwrap().iter() {
            reasons.push(format!("shard {shard} failed, restarting: {error}"));
        }
        if let Some(error) = self.state_fault() {
            reasons.push(format!("state not writable: {error}"));
        }
        if served.rules.status().loaded == 0 {
            reasons.push("no rules loaded".into());
        }
        reasons
    }

    /// Brings the gauges computed from the state up to date: at each scrape for a state
    /// file; for a fleet's table, at each heartbeat instead, so a scrape never waits on
    /// DynamoDB (a slow table would cost the metrics just when they are needed).
    pub fn refresh_state(&self, state: &State) {
        if let (Ok(pauses), Ok(held)) = (state.pauses(), state.held_counts()) {
            let configured = self.configured_actions.lock().unwrap();
            let names = configured
                .iter()
                .chain(pauses.iter().map(|(name, _)| name))
                .chain(held.keys());
            for name in names {
                let paused = pauses.iter().any(|(paused, _)| paused == name);
                self.action_paused
                    .get_or_create(&label("action", name))
                    .set(i64::from(paused));
                self.requests_held
                    .get_or_create(&label("action", name))
                    .set(held.get(name).copied().unwrap_or(0) as i64);
            }
        }
        if let crate::state::State::Shared(shared) = state {
            if let Ok(workers) = shared.workers() {
                self.fleet(&workers);
            }
        }
        if let Ok((pending, oldest)) = state.dead_letter_stats() {
            self.dead_letters_pending.set(pending as i64);
            let age = oldest.map_or(0, |created| now_ms().saturating_sub(created) / 1000);
            self.oldest_dead_letter_age_seconds.set(age as i64);
        }
        if let Ok(gauges) = state.request_gauges(now_ms()) {
            for (status, count) in &gauges.by_status {
                self.requests_by_status
                    .get_or_create(&label("status", status))
                    .set(*count as i64);
            }
            self.requests_overdue.set(gauges.overdue as i64);
            self.oldest_open_request_overdue_seconds
                .set(gauges.oldest_overdue_ms / 1000);
        }
    }

    /// Brings the gauges computed from the rules up to date.
    fn refresh_rules(&self, rules: &Rules) {
        let status = rules.status();
        self.rules_stale.set(i64::from(status.stale));
        self.rules_watch_lost
            .set(i64::from(status.watch_lost.is_some()));
        self.rules_info.clear();
        self.rules_info
            .get_or_create(&label("hash", &status.hash))
            .set(1);
        self.rules_reloads
            .get_or_create(&label("result", "ok"))
            .inner()
            .store(status.reloads_ok, Ordering::Relaxed);
        self.rules_reloads
            .get_or_create(&label("result", "refused"))
            .inner()
            .store(status.reloads_failed, Ordering::Relaxed);
    }

    fn metrics_text(&self, served: &Served) -> String {
        self.refresh_rules(&served.rules);
        if !served.state.is_shared() {
            self.refresh_state(&served.state);
        }
        let mut text = String::new();
        let _ = encode(&mut text, &self.registry);
        text
    }

    /// What `/status` answers.
    pub fn status_json(&self, served: &Served) -> serde_json::Value {
        let (rules, state) = (&*served.rules, &*served.state);
        let failing = self.failing_shards.lock().unwrap().clone();
        let checkpoints: BTreeMap<String, crate::source::Checkpoint> = state
            .checkpoints()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let shards: Vec<ShardView> = self
            .shards
            .lock()
            .unwrap()
            .values()
            .cloned()
            .map(|mut v| {
                v.checkpoint = checkpoints
                    .get(&v.shard_id)
                    .and_then(|c| c.sequence_number.clone());
                if let Some(error) = failing.get(&v.shard_id) {
                    v.state = "restarting";
                    v.last_error = Some(error.clone());
                }
                v
            })
            .collect();
        // Unknown, not zero, when the state cannot be read.
        let pending = state.dead_letter_stats().ok().map(|(pending, _)| pending);
        let r = rules.status();
        let not_ready = self.not_ready(served);
        serde_json::json!({
            "uptime_s": self.started.elapsed().as_secs(),
            "ready": not_ready.is_empty(),
            "not_ready": not_ready,
            "rules": {"hash": r.hash, "stale": r.stale, "loaded": r.loaded, "last_error": r.last_error},
            "shards": shards,
            "dead_letters_pending": pending,
            // Unknown (null), not none, when the state cannot be read.
            "paused": state.pauses().ok().map(|pauses| pauses.into_iter().map(|(action, pause)| serde_json::json!({
                "action": action,
                "reason": pause.reason,
                "since": crate::clock::rfc3339(pause.since_ms as i64),
                "resuming": pause.resuming_since_ms.is_some(),
            })).collect::<Vec<_>>()),
            "requests_held": state.held_counts().ok(),
            // Privacy requests by status, and how many are past their due date.
            "requests": state.request_gauges(now_ms()).ok().map(|g| serde_json::json!({
                "by_status": g.by_status,
                "overdue": g.overdue,
                "oldest_open_request_overdue_s": g.oldest_overdue_ms / 1000,
            })),
            "fleet": self.fleet_json(state),
            "state": {"writable": self.state_fault().is_none(), "last_error": self.state_fault()},
        })
    }
}

/// What the listener serves from.
pub struct Served {
    pub telemetry: Arc<Telemetry>,
    pub rules: Arc<Rules>,
    pub state: Arc<State>,
    pub source: Arc<KinesisSource>,
}

/// Binds the listener (an error names the address) and serves until shutdown.
pub async fn serve(
    listen: SocketAddr,
    served: Arc<Served>,
    shutdown: Shutdown,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "metrics listener up");
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get({
                let s = served.clone();
                move || async move {
                    let reasons = s.telemetry.not_ready(&s);
                    if reasons.is_empty() {
                        (axum::http::StatusCode::OK, "ready".to_owned())
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            reasons.join("\n"),
                        )
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get({
                let s = served.clone();
                move || async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        s.telemetry.metrics_text(&s),
                    )
                }
            }),
        )
        .route(
            "/status",
            get({
                let s = served.clone();
                move || async move { axum::Json(s.telemetry.status_json(&s)) }
            }),
        );
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.triggered().await })
            .await;
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_risk_rises_within_the_margin() {
        let t = Telemetry::new();
        t.set_retention(
            Duration::from_secs(24 * 3600),
            Duration::from_secs(6 * 3600),
        );
        t.shard_lag("s", Some(17 * 3600 * 1000));
        assert_eq!(
            t.retention_risk
                .get_or_create(&label("shard_id", "s"))
                .get(),
            0
        );
        t.shard_lag("s", Some(18 * 3600 * 1000));
        assert_eq!(
            t.retention_risk
                .get_or_create(&label("shard_id", "s"))
                .get(),
            1
        );
        t.shard_lag("s", Some(0));
        assert_eq!(
            t.retention_risk
                .get_or_create(&label("shard_id", "s"))
                .get(),
            0
        );
        // A margin larger than the retention: half the retention.
        t.set_retention(Duration::from_secs(3600), Duration::from_secs(7200));
        t.shard_lag("s", Some(1_800_000));
        assert_eq!(
            t.retention_risk
                .get_or_create(&label("shard_id", "s"))
                .get(),
            1
        );
    }
}

/// The fleet's lease metrics (`src/fleet`).
#[derive(Default)]
struct LeaseMetrics {
    owned: Gauge,
    taken: Counter,
    stolen: Counter,
    lost: Counter,
    released: Counter,
    deleted: Counter,
    table_errors: Counter,
    claims_taken_over: Counter,
    /// The fleet as the heartbeats say: live workers, and the distinct rule sets they run
    /// (each worker's own hash is its `rules_info`).
    workers: Gauge,
    rules_hashes: Gauge,
}

impl LeaseMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "leases_owned",
            "Shard leases this worker holds",
            self.owned.clone(),
        );
        r.register(
            "leases_taken",
            "Free or expired shard leases taken",
            self.taken.clone(),
        );
        r.register(
            "leases_stolen",
            "Shard leases taken from a live worker to even the share",
            self.stolen.clone(),
        );
        r.register(
            "leases_lost",
            "Shard leases lost (another worker took them, or they could not be renewed)",
            self.lost.clone(),
        );
        r.register(
            "leases_released",
            "Shard leases given up (shutdown, or the shard read to its end)",
            self.released.clone(),
        );
        r.register(
            "leases_deleted",
            "Leases of finished shards deleted (the shard is gone and its children finished)",
            self.deleted.clone(),
        );
        r.register(
            "lease_table_errors",
            "Lease table calls that failed (retried at the next round)",
            self.table_errors.clone(),
        );
        r.register(
            "claims_taken_over",
            "Claims on requests of a worker that stopped beating, taken over (its call may be repeated)",
            self.claims_taken_over.clone(),
        );
        r.register(
            "fleet_workers",
            "Live workers of the fleet (heartbeat within a lease duration)",
            self.workers.clone(),
        );
        r.register(
            "fleet_rules_hashes",
            "Distinct rule sets the fleet's live workers run (more than 1: workers disagree)",
            self.rules_hashes.clone(),
        );
    }
}

impl Telemetry {
    /// How many shard leases this worker holds now.
    pub fn leases_owned(&self, count: usize) {
        self.leases.owned.set(count as i64);
    }

    /// A free or expired lease taken (`previous_owner`: the worker whose lease expired).
    pub fn lease_taken(&self, shard_id: &str, worker_id: &str, previous_owner: Option<&str>) {
        self.leases.taken.inc();
        tracing::info!(
            event = "lease_taken",
            shard_id,
            worker_id,
            previous_owner = previous_owner.unwrap_or(""),
            "shard lease taken"
        );
    }

    /// A lease taken from a live worker, toward an even share.
    pub fn lease_stolen(&self, shard_id: &str, worker_id: &str, from: &str) {
        self.leases.stolen.inc();
        tracing::info!(
            event = "lease_stolen",
            shard_id,
            worker_id,
            previous_owner = from,
            "shard lease stolen toward an even share"
        );
    }

    /// A lease this worker held is lost: its shard's worker stops before its next call.
    pub fn lease_lost(&self, shard_id: &str, worker_id: &str, reason: &'static str) {
        self.leases.lost.inc();
        tracing::warn!(
            event = "lease_lost",
            shard_id,
            worker_id,
            reason,
            "shard lease lost; its reader stops"
        );
    }

    /// A lease given up: others may take it at once.
    pub fn lease_released(&self, shard_id: &str, worker_id: &str) {
        self.leases.released.inc();
        tracing::info!(
            event = "lease_released",
            shard_id,
            worker_id,
            "shard lease released"
        );
    }

    /// The lease of a shard gone from the stream, finished with its children, deleted.
    pub fn lease_deleted(&self, shard_id: &str, worker_id: &str) {
        self.leases.deleted.inc();
        tracing::info!(
            event = "lease_deleted",
            shard_id,
            worker_id,
            "lease of a finished shard deleted"
        );
    }

    /// A lease table call failed; the coordinator tries again at its next round.
    pub fn lease_table_error(&self, worker_id: &str, error: &dyn std::error::Error) {
        self.leases.table_errors.inc();
        let error = chain(error);
        tracing::warn!(
            event = "lease_table_error",
            worker_id,
            error = %error,
            "lease table call failed; retrying at the next round"
        );
    }

    /// A claim of a worker that stopped beating was taken over: its call, if it was made,
    /// is made again (at most the calls in flight when it died).
    pub fn claim_taken_over(&self, from_worker: &str) {
        self.leases.claims_taken_over.inc();
        tracing::warn!(
            event = "claim_taken_over",
            from_worker,
            "a request claimed by a worker that stopped beating is taken over; its call may be repeated"
        );
    }

    /// A fleet worker's view of the fleet for `/status` (none for a single daemon): its
    /// leases, and every worker with its rule-set hash, so workers running different rules
    /// show.
    fn fleet_json(&self, state: &State) -> Option<serde_json::Value> {
        let crate::state::State::Shared(shared) = state else {
            return None;
        };
        let workers = shared.workers().ok();
        let hashes: Option<std::collections::BTreeSet<&str>> = workers.as_ref().map(|workers| {
            workers
                .iter()
                .filter(|w| w.live)
                .map(|w| w.rules_hash.as_str())
                .collect()
        });
        let leases = &self.leases;
        Some(serde_json::json!({
            "worker_id": shared.worker_id(),
            "leases": {
                "owned": leases.owned.get(),
                "taken": leases.taken.get(),
                "stolen": leases.stolen.get(),
                "lost": leases.lost.get(),
                "released": leases.released.get(),
            },
            "workers": workers,
            "rules_agree": hashes.as_ref().map(|h| h.len() <= 1),
        }))
    }

    /// The fleet's workers, as their heartbeats say (on each scrape).
    fn fleet(&self, workers: &[crate::state::shared::WorkerView]) {
        let live: Vec<_> = workers.iter().filter(|w| w.live).collect();
        self.leases.workers.set(live.len() as i64);
        let hashes: std::collections::BTreeSet<&str> =
            live.iter().map(|w| w.rules_hash.as_str()).collect();
        self.leases.rules_hashes.set(hashes.len() as i64);
    }
}
