//! A privacy request as the law sees it: one person's request (its key), the actions it
//! fans out to (one per system), its legal clock (due date, one extension), a legal hold, a
//! reasoned denial, and its timeline.
//!
//! The record is changed only through [`apply`], by the state's commits (the pipeline's
//! outcomes) and by operators' commands, so both stores keep one meaning. It holds no
//! identifier in clear: it is stored under the keyed hash of the request's key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;

/// Why a request may be denied (the basis CCPA §7101 asks to keep).
pub const DENIAL_CODES: [&str; 5] = [
    "no_match",
    "insufficient_verification",
    "outside_jurisdiction",
    "legal_obligation",
    "other",
];

/// The regulations whose clocks are known; a decision names one (GDPR by default).
pub const REGULATIONS: [&str; 2] = ["GDPR", "CCPA"];

/// What every request handled here asks for (kept in the audit trail as its nature).
pub const NATURE: &str = "deletion";

/// The timeline keeps this many events; beyond, the oldest (after the first) are dropped.
const TIMELINE_LIMIT: usize = 500;

const DAY_MS: f64 = 86_400_000.0;

/// Where one action of a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    /// Decided, not settled yet (being sent).
    Pending,
    /// Accepted by the backend as a job that has not finished.
    Waiting,
    Done,
    /// Dead-lettered: a refusal, a fault past its retries, a failed or given-up job.
    Failed,
    /// Held by a paused action or a legal hold.
    Held,
    /// Not sent: the request was denied.
    Denied,
}

impl ActionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionStatus::Pending => "pending",
            ActionStatus::Waiting => "waiting",
            ActionStatus::Done => "done",
            ActionStatus::Failed => "failed",
            ActionStatus::Held => "held",
            ActionStatus::Denied => "denied",
        }
    }
}

/// One action of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub status: ActionStatus,
    /// Backend calls made for it, over every sending and retry.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// The backend's job id, sealed (see [`job_seal_context`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_at_ms: Option<u64>,
}

impl ActionRecord {
    /// Decided, nothing known of it yet.
    fn pending() -> Self {
        ActionRecord {
            status: ActionStatus::Pending,
            attempts: 0,
            http_status: None,
            sealed_job: None,
            dead_letter: None,
            error: None,
            done_at_ms: None,
        }
    }
}

/// What the seal of a request's job id is bound to.
pub fn job_seal_context(request: &str, action: &str) -> Vec<u8> {
    format!("job of {request} {action}").into_bytes()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extension {
    pub at_ms: u64,
    pub by: String,
    pub reason: String,
    pub due_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegalHold {
    pub since_ms: u64,
    pub by: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Denial {
    pub at_ms: u64,
    pub by: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One step of a request's life, for `requests show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time_ms: u64,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// A request: every action a rule decided for its key, and its legal clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// When the first record of the request reached the stream.
    pub arrival_ms: u64,
    pub rule: String,
    pub regulation: String,
    /// The due date the regulation sets, before any extension.
    pub due_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<Extension>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<LegalHold>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denial: Option<Denial>,
    pub actions: BTreeMap<String, ActionRecord>,
    /// When every action was done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at_ms: Option<u64>,
    pub timeline: Vec<Event>,
}

/// A request's overall status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Open,
    Waiting,
    Complete,
    Failed,
    Held,
    Denied,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Open,
        Status::Waiting,
        Status::Complete,
        Status::Failed,
        Status::Held,
        Status::Denied,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Waiting => "waiting",
            Status::Complete => "complete",
            Status::Failed => "failed",
            Status::Held => "held",
            Status::Denied => "denied",
        }
    }

    /// Still owed an answer: neither complete nor denied.
    pub fn is_open(self) -> bool {
        !matches!(self, Status::Complete | Status::Denied)
    }
}

impl Request {
    pub fn status(&self) -> Status {
        let any = |status| self.actions.values().any(|a| a.status == status);
        if self.denial.is_some() {
            Status::Denied
        } else if self.completed_at_ms.is_some() {
            Status::Complete
        } else if self.hold.is_some() || any(ActionStatus::Held) {
            Status::Held
        } else if any(ActionStatus::Failed) {
            Status::Failed
        } else if any(ActionStatus::Waiting) {
            Status::Waiting
        } else {
            Status::Open
        }
    }

    /// The due date in force: extended, or as the regulation set it.
    pub fn due_in_force_ms(&self) -> u64 {
        self.extension.as_ref().map_or(self.due_ms, |e| e.due_ms)
    }

    pub fn is_overdue(&self, now_ms: u64) -> bool {
        self.status().is_open() && now_ms > self.due_in_force_ms()
    }

    /// Whether any action was done ("complied with in whole or in part").
    pub fn complied(&self) -> bool {
        self.denial.is_none()
            && self
                .actions
                .values()
                .any(|a| a.status == ActionStatus::Done)
    }

    fn event(&mut self, time_ms: u64, event: &str, action: Option<&str>, note: Option<String>) {
        self.timeline.push(Event {
            time_ms,
            event: event.to_owned(),
            action: action.map(str::to_owned),
            note,
            by: None,
        });
        if self.timeline.len() > TIMELINE_LIMIT {
            self.timeline.remove(1);
        }
    }

    /// The request as `requests show` prints it (JSON), narrowed to one action if asked.
    /// `job_id` opens an action's sealed job id.
    pub fn shown(
        &self,
        id: &str,
        only: Option<&str>,
        job_id: impl Fn(&str, &str) -> Option<String>,
    ) -> serde_json::Value {
        use serde_json::json;
        let time = |ms: u64| rfc3339(ms as i64);
        let actions: serde_json::Map<String, serde_json::Value> = self
            .actions
            .iter()
            .filter(|(name, _)| only.is_none_or(|only| only == name.as_str()))
            .map(|(name, a)| {
                let job = a
                    .sealed_job
                    .as_deref()
                    .and_then(|sealed| job_id(name, sealed));
                (
                    name.clone(),
                    json!({
                        "status": a.status.as_str(),
                        "attempts": a.attempts,
                        "http_status": a.http_status,
                        "job_id": job,
                        "dead_letter": a.dead_letter,
                        "error": a.error,
                        "done_at": a.done_at_ms.map(time),
                    }),
                )
            })
            .collect();
        let timeline: Vec<serde_json::Value> = self
            .timeline
            .iter()
            .filter(|e| {
                only.is_none_or(|only| e.action.as_deref().is_none_or(|action| action == only))
            })
            .map(|e| {
                json!({"time": time(e.time_ms), "event": e.event, "action": e.action, "note": e.note, "by": e.by})
            })
            .collect();
        json!({
            "request": id,
            "status": self.status().as_str(),
            "regulation": self.regulation,
            "rule": self.rule,
            "nature": NATURE,
            "arrival_time": time(self.arrival_ms),
            "arrival_ms": self.arrival_ms,
            "due_date": time(self.due_in_force_ms()),
            "original_due_date": time(self.due_ms),
            "overdue": self.is_overdue(crate::clock::now_ms()),
            "completed_at": self.completed_at_ms.map(time),
            "completed_at_ms": self.completed_at_ms,
            "extension": self.extension.as_ref().map(|e| json!({"at": time(e.at_ms), "by": e.by, "reason": e.reason, "due_date": time(e.due_ms)})),
            "hold": self.hold.as_ref().map(|h| json!({"since": time(h.since_ms), "by": h.by, "reason": h.reason})),
            "denial": self.denial.as_ref().map(|d| json!({"at": time(d.at_ms), "by": d.by, "code": d.code, "note": d.note})),
            "actions": actions,
            "timeline": timeline,
        })
    }
}

/// Where a request's first record came from, to start its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arrival {
    pub arrival_time: String,
    pub rule: String,
    pub regulation: String,
}

/// One change to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A rule decided `action` for the request (every decision of a record is registered
    /// before any is sent, so a request is complete only when all of them are done).
    Decided {
        arrival: Arrival,
        action: String,
    },
    /// What became of an action.
    Action {
        arrival: Arrival,
        action: String,
        status: ActionStatus,
        attempts: u32,
        http_status: Option<u16>,
        sealed_job: Option<String>,
        dead_letter: Option<u64>,
        error: Option<String>,
    },
    Extend {
        by: String,
        reason: String,
    },
    Hold {
        by: String,
        reason: String,
    },
    Release {
        by: String,
    },
    Deny {
        by: String,
        code: String,
        note: Option<String>,
    },
}

impl Change {
    /// Whether an operator asked for it (refused when it cannot apply; the pipeline's
    /// changes always apply).
    pub fn by(&self) -> Option<&str> {
        match self {
            Change::Decided { .. } | Change::Action { .. } => None,
            Change::Extend { by, .. }
            | Change::Hold { by, .. }
            | Change::Release { by }
            | Change::Deny { by, .. } => Some(by),
        }
    }
}

/// A request-level step worth an audit entry: `complete`, `extended`, `legal_hold`,
/// `hold_released`, `denied` (with its note and who asked).
#[derive(Debug, Clone, PartialEq)]
pub struct Milestone {
    pub outcome: &'static str,
    pub note: Option<String>,
    pub by: Option<String>,
    pub denial_code: Option<String>,
}

/// Applies `change` to the request (`None`: not recorded yet), at `now_ms`. Returns the
/// request as it is now and the milestone it reached, or why an operator's change is
/// refused.
pub fn apply(
    request: Option<Request>,
    change: &Change,
    now_ms: u64,
) -> Result<(Request, Option<Milestone>), String> {
    let mut request = match (request, change) {
        (Some(request), _) => request,
        (None, Change::Decided { arrival, .. } | Change::Action { arrival, .. }) => {
            new_request(arrival)
        }
        (None, _) => return Err("no request with this key has been seen".into()),
    };
    let was_complete = request.completed_at_ms.is_some();
    let mut milestone = None;
    match change {
        Change::Decided { action, .. } => {
            if !request.actions.contains_key(action) {
                request
                    .actions
                    .insert(action.clone(), ActionRecord::pending());
                request.event(now_ms, "decided", Some(action), None);
            }
        }
        Change::Action {
            action,
            status,
            attempts,
            http_status,
            sealed_job,
            dead_letter,
            error,
            ..
        } => {
            let entry = request
                .actions
                .entry(action.clone())
                .or_insert(ActionRecord::pending());
            let changed = entry.status != *status || *attempts > 0;
            // Done stays done: a duplicate seen later changes nothing.
            if entry.status != ActionStatus::Done {
                entry.status = *status;
            }
            entry.attempts += attempts;
            if http_status.is_some() {
                entry.http_status = *http_status;
            }
            if sealed_job.is_some() {
                entry.sealed_job = sealed_job.clone();
            }
            match status {
                ActionStatus::Failed => {
                    entry.dead_letter = dead_letter.or(entry.dead_letter);
                    entry.error = error.clone().or(entry.error.take());
                }
                // No dead letter holds it any more (a retry went on with it).
                _ => {
                    entry.dead_letter = None;
                    entry.error = None;
                    if *status == ActionStatus::Done {
                        entry.done_at_ms.get_or_insert(now_ms);
                    }
                }
            }
            if changed {
                let event = match status {
                    ActionStatus::Waiting => "accepted",
                    other => other.as_str(),
                };
                request.event(now_ms, event, Some(action), error.clone());
            }
        }
        Change::Extend { reason, .. } => {
            if let Some(extension) = &request.extension {
                return Err(format!(
                    "the request was extended already (on {}, to {}): a due date may be extended once",
                    rfc3339(extension.at_ms as i64),
                    rfc3339(extension.due_ms as i64)
                ));
            }
            if !request.status().is_open() {
                return Err(format!(
                    "the request is {} already",
                    request.status().as_str()
                ));
            }
            // The person must be told of an extension within the first period.
            if now_ms > request.due_ms {
                return Err(format!(
                    "the request is overdue since {}: a due date can only be extended before it passes (the person must be told within the first period)",
                    rfc3339(request.due_ms as i64)
                ));
            }
            let due_ms = extended_due_ms(request.due_ms, &request.regulation);
            request.extension = Some(Extension {
                at_ms: now_ms,
                by: change.by().unwrap_or_default().to_owned(),
                reason: reason.clone(),
                due_ms,
            });
            request.event(
                now_ms,
                "extended",
                None,
                Some(format!("due {}: {reason}", rfc3339(due_ms as i64))),
            );
            milestone = Some(("extended", Some(reason.clone()), None));
        }
        Change::Hold { reason, .. } => {
            if let Some(hold) = &request.hold {
                return Err(format!(
                    "the request is on hold already (since {}: {})",
                    rfc3339(hold.since_ms as i64),
                    hold.reason
                ));
            }
            if !request.status().is_open() {
                return Err(format!(
                    "the request is {} already",
                    request.status().as_str()
                ));
            }
            request.hold = Some(LegalHold {
                since_ms: now_ms,
                by: change.by().unwrap_or_default().to_owned(),
                reason: reason.clone(),
            });
            request.event(now_ms, "legal_hold", None, Some(reason.clone()));
            milestone = Some(("legal_hold", Some(reason.clone()), None));
        }
        Change::Release { .. } => {
            if request.denial.is_some() {
                return Err("the request was denied: nothing is held for it".into());
            }
            if request.hold.take().is_none() {
                return Err("the request is not on hold".into());
            }
            request.event(now_ms, "hold_released", None, None);
            milestone = Some(("hold_released", None, None));
        }
        Change::Deny { code, note, .. } => {
            if !DENIAL_CODES.contains(&code.as_str()) {
                return Err(format!(
                    "unknown reason code {code:?} (one of {})",
                    DENIAL_CODES.join(", ")
                ));
            }
            if let Some(denial) = &request.denial {
                return Err(format!(
                    "the request was denied already ({}, on {})",
                    denial.code,
                    rfc3339(denial.at_ms as i64)
                ));
            }
            if request.completed_at_ms.is_some() {
                return Err("the request is complete already: every action was done".into());
            }
            request.denial = Some(Denial {
                at_ms: now_ms,
                by: change.by().unwrap_or_default().to_owned(),
                code: code.clone(),
                note: note.clone(),
            });
            // A legal hold has nothing left to hold.
            request.hold = None;
            request.event(
                now_ms,
                "denied",
                None,
                Some(match note {
                    Some(note) => format!("{code}: {note}"),
                    None => code.clone(),
                }),
            );
            milestone = Some(("denied", note.clone(), Some(code.clone())));
        }
    }
    if let (Some(by), Some(last)) = (change.by(), request.timeline.last_mut()) {
        last.by = Some(by.to_owned());
    }
    let all_done = request
        .actions
        .values()
        .all(|a| a.status == ActionStatus::Done);
    if request.denial.is_none() && all_done && !was_complete {
        request.completed_at_ms = Some(now_ms);
        request.event(now_ms, "complete", None, None);
        milestone = Some(("complete", None, None));
    } else if was_complete && !all_done {
        // A later record decided another action for it: owed again.
        request.completed_at_ms = None;
        request.event(now_ms, "reopened", None, None);
    }
    let milestone = milestone.map(|(outcome, note, denial_code)| Milestone {
        outcome,
        note,
        by: change.by().map(str::to_owned),
        denial_code,
    });
    Ok((request, milestone))
}

fn new_request(arrival: &Arrival) -> Request {
    let arrival_ms = arrival_ms(&arrival.arrival_time);
    let mut request = Request {
        arrival_ms,
        rule: arrival.rule.clone(),
        regulation: arrival.regulation.clone(),
        due_ms: due_ms(arrival_ms, &arrival.regulation),
        extension: None,
        hold: None,
        denial: None,
        actions: BTreeMap::new(),
        completed_at_ms: None,
        timeline: Vec::new(),
    };
    request.event(
        arrival_ms,
        "arrived",
        None,
        Some(format!(
            "{} request, rule {}",
            arrival.regulation, arrival.rule
        )),
    );
    request
}

/// A record's arrival time (RFC 3339) in ms; now when it cannot be read.
pub fn arrival_ms(arrival_time: &str) -> u64 {
    arrival_time
        .parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond().max(0) as u64)
        .unwrap_or_else(|_| crate::clock::now_ms())
}

/// `ms` plus a calendar span, in UTC (31 January + 1 month = 28 February).
fn plus(ms: u64, span: jiff::Span) -> u64 {
    let at = jiff::Timestamp::from_millisecond(ms as i64)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_zoned(jiff::tz::TimeZone::UTC);
    at.checked_add(span)
        .map_or(ms, |due| due.timestamp().as_millisecond().max(0) as u64)
}

/// The due date a regulation sets from a request's arrival: one calendar month for GDPR
/// (Art. 12(3)), 45 days for CCPA (§7021).
pub fn due_ms(arrival_ms: u64, regulation: &str) -> u64 {
    match regulation {
        "CCPA" => plus(arrival_ms, jiff::Span::new().days(45)),
        _ => plus(arrival_ms, jiff::Span::new().months(1)),
    }
}

/// The due date after the one extension the regulation allows: GDPR two more months
/// (Art. 12(3)), CCPA 45 more days (§7021).
pub fn extended_due_ms(due_ms: u64, regulation: &str) -> u64 {
    match regulation {
        "CCPA" => plus(due_ms, jiff::Span::new().days(45)),
        _ => plus(due_ms, jiff::Span::new().months(2)),
    }
}

/// The figures of one regulation for one year (CCPA §7102).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub received: u64,
    /// Complied with in whole or in part: at least one action done, not denied.
    pub complied: u64,
    pub denied: BTreeMap<String, u64>,
    pub median_days: Option<f64>,
    pub mean_days: Option<f64>,
    pub open: u64,
    pub overdue: u64,
    /// Days from arrival to completion of each complete request.
    days: Vec<f64>,
}

/// The regulator's report: figures per regulation for the requests that arrived in a year.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub year: i16,
    pub regulations: BTreeMap<String, Figures>,
}

impl Report {
    pub fn new(year: i16) -> Self {
        let regulations = REGULATIONS
            .iter()
            .map(|r| {
                let figures = Figures {
                    denied: DENIAL_CODES.iter().map(|c| (c.to_string(), 0)).collect(),
                    ..Figures::default()
                };
                (r.to_string(), figures)
            })
            .collect();
        Report { year, regulations }
    }

    /// Counts a request if it arrived in the report's year (UTC).
    pub fn add(&mut self, request: &Request, now_ms: u64) {
        let year = jiff::Timestamp::from_millisecond(request.arrival_ms as i64)
            .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC).year())
            .unwrap_or(0);
        if year != self.year {
            return;
        }
        let figures = self
            .regulations
            .entry(request.regulation.clone())
            .or_default();
        figures.received += 1;
        if request.complied() {
            figures.complied += 1;
        }
        if let Some(denial) = &request.denial {
            *figures.denied.entry(denial.code.clone()).or_default() += 1;
        }
        if let Some(done) = request.completed_at_ms {
            figures
                .days
                .push(done.saturating_sub(request.arrival_ms) as f64 / DAY_MS);
        }
        if request.status().is_open() {
            figures.open += 1;
        }
        if request.is_overdue(now_ms) {
            figures.overdue += 1;
        }
    }

    /// Works out the medians and means once every request is counted.
    pub fn finish(mut self) -> Self {
        for figures in self.regulations.values_mut() {
            let days = &mut figures.days;
            if days.is_empty() {
                continue;
            }
            days.sort_by(f64::total_cmp);
            let n = days.len();
            figures.median_days = Some(match n % 2 {
                1 => days[n / 2],
                _ => (days[n / 2 - 1] + days[n / 2]) / 2.0,
            });
            figures.mean_days = Some(days.iter().sum::<f64>() / n as f64);
        }
        self
    }

    /// The regulations in the order reports list them: GDPR, CCPA, then any other.
    fn in_order(&self) -> impl Iterator<Item = (&String, &Figures)> {
        let rank = |name: &str| {
            REGULATIONS
                .iter()
                .position(|r| *r == name)
                .unwrap_or(usize::MAX)
        };
        let mut all: Vec<_> = self.regulations.iter().collect();
        all.sort_by_key(|(name, _)| rank(name));
        all.into_iter()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let regulations: serde_json::Map<String, serde_json::Value> = self
            .regulations
            .iter()
            .map(|(name, f)| {
                let total: u64 = f.denied.values().sum();
                let mut denied = serde_json::json!({"total": total});
                for (code, count) in &f.denied {
                    denied[code] = (*count).into();
                }
                (
                    name.clone(),
                    serde_json::json!({
                        "received": f.received,
                        "complied": f.complied,
                        "denied": denied,
                        "median_days": f.median_days,
                        "mean_days": f.mean_days,
                        "open": f.open,
                        "overdue": f.overdue,
                    }),
                )
            })
            .collect();
        serde_json::json!({"year": self.year, "regulations": regulations})
    }

    /// A header line and one line per regulation.
    pub fn to_csv(&self) -> String {
        let mut out = String::from("regulation,received,complied,denied");
        for code in DENIAL_CODES {
            out += &format!(",denied_{code}");
        }
        out += ",median_days,mean_days,open,overdue\n";
        let number = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        for (name, f) in self.in_order() {
            out += &format!(
                "{name},{},{},{}",
                f.received,
                f.complied,
                f.denied.values().sum::<u64>()
            );
            for code in DENIAL_CODES {
                out += &format!(",{}", f.denied.get(code).copied().unwrap_or(0));
            }
            out += &format!(
                ",{},{},{},{}\n",
                number(f.median_days),
                number(f.mean_days),
                f.open,
                f.overdue
            );
        }
        out
    }

    pub fn to_human(&self) -> String {
        let mut out = format!("Privacy requests received in {}\n", self.year);
        let days = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        for (name, f) in self.in_order() {
            let denied: u64 = f.denied.values().sum();
            out += &format!(
                "\n{name}\n  received   {}\n  complied   {} (in whole or in part)\n  denied     {denied}\n",
                f.received, f.complied
            );
            for (code, count) in f.denied.iter().filter(|(_, c)| **c > 0) {
                out += &format!("    {code:<27} {count}\n");
            }
            out += &format!(
                "  days to complete: median {}, mean {}\n  open       {}\n  overdue    {}\n",
                days(f.median_days),
                days(f.mean_days),
                f.open,
                f.overdue
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(time: &str, regulation: &str) -> Arrival {
        Arrival {
            arrival_time: time.into(),
            rule: "r".into(),
            regulation: regulation.into(),
        }
    }

    fn action(name: &str, status: ActionStatus) -> Change {
        Change::Action {
            arrival: arrival("2026-01-31T10:00:00Z", "GDPR"),
            action: name.into(),
            status,
            attempts: 1,
            http_status: Some(200),
            sealed_job: None,
            dead_letter: None,
            error: None,
        }
    }

    fn decided(name: &str) -> Change {
        Change::Decided {
            arrival: arrival("2026-01-31T10:00:00Z", "GDPR"),
            action: name.into(),
        }
    }

    #[test]
    fn a_request_is_complete_only_when_every_action_is_done() {
        let (r, _) = apply(None, &decided("db"), 1).unwrap();
        let (r, _) = apply(Some(r), &decided("mail"), 1).unwrap();
        let (r, m) = apply(Some(r), &action("db", ActionStatus::Done), 2).unwrap();
        assert_eq!(r.status(), Status::Open);
        assert_eq!(m, None);
        let (r, _) = apply(Some(r), &action("mail", ActionStatus::Waiting), 3).unwrap();
        assert_eq!(r.status(), Status::Waiting);
        let (r, m) = apply(Some(r), &action("mail", ActionStatus::Done), 4).unwrap();
        assert_eq!(r.status(), Status::Complete);
        assert_eq!(r.completed_at_ms, Some(4));
        assert_eq!(m.unwrap().outcome, "complete");
        // A duplicate seen later changes nothing.
        let (again, m) = apply(Some(r.clone()), &action("mail", ActionStatus::Held), 5).unwrap();
        assert_eq!(again.status(), Status::Complete);
        assert_eq!(m, None);
    }

    #[test]
    fn the_clock_counts_calendar_months_and_extends_once() {
        let (r, _) = apply(None, &decided("db"), 1).unwrap();
        assert_eq!(
            rfc3339(r.due_ms as i64),
            "2026-02-28T10:00:00Z",
            "31 January + 1 month"
        );
        let extend = Change::Extend {
            by: "cli:ann".into(),
            reason: "complex".into(),
        };
        let late = r.due_ms + 1;
        assert!(apply(Some(r.clone()), &extend, late)
            .unwrap_err()
            .contains("overdue"));
        let (r, m) = apply(Some(r), &extend, 2).unwrap();
        assert_eq!(rfc3339(r.due_in_force_ms() as i64), "2026-04-28T10:00:00Z");
        assert_eq!(m.unwrap().by.as_deref(), Some("cli:ann"));
        assert!(apply(Some(r), &extend, 3).unwrap_err().contains("once"));
        let ccpa = Change::Decided {
            arrival: arrival("2026-01-31T10:00:00Z", "CCPA"),
            action: "db".into(),
        };
        let (r, _) = apply(None, &ccpa, 1).unwrap();
        assert_eq!(rfc3339(r.due_ms as i64), "2026-03-17T10:00:00Z");
        let (r, _) = apply(Some(r), &extend, 2).unwrap();
        assert_eq!(rfc3339(r.due_in_force_ms() as i64), "2026-05-01T10:00:00Z");
    }

    #[test]
    fn holds_and_denials_are_refused_when_they_cannot_apply() {
        let hold = Change::Hold {
            by: "console".into(),
            reason: "litigation".into(),
        };
        let release = Change::Release {
            by: "console".into(),
        };
        assert!(apply(None, &hold, 1).is_err(), "an unknown request");
        let (r, _) = apply(None, &decided("db"), 1).unwrap();
        assert!(apply(Some(r.clone()), &release, 2).is_err());
        let (r, _) = apply(Some(r), &hold, 2).unwrap();
        assert_eq!(r.status(), Status::Held);
        assert!(apply(Some(r.clone()), &hold, 3).is_err());
        let deny = |code: &str| Change::Deny {
            by: "cli:bo".into(),
            code: code.into(),
            note: None,
        };
        assert!(apply(Some(r.clone()), &deny("because"), 3).is_err());
        let (r, m) = apply(Some(r), &deny("no_match"), 3).unwrap();
        assert_eq!(r.status(), Status::Denied);
        assert_eq!(r.hold, None);
        assert_eq!(m.unwrap().denial_code.as_deref(), Some("no_match"));
        let (done, _) = apply(None, &action("db", ActionStatus::Done), 1).unwrap();
        assert!(apply(Some(done), &deny("other"), 2).is_err());
    }

    #[test]
    fn the_report_counts_by_regulation_with_median_and_mean_days() {
        let mut report = Report::new(2026);
        let day = 86_400_000;
        let start = arrival_ms("2026-03-01T00:00:00Z");
        let mut add = |regulation: &str, done_after_days: Option<u64>, denied: Option<&str>| {
            let change = Change::Decided {
                arrival: arrival("2026-03-01T00:00:00Z", regulation),
                action: "db".into(),
            };
            let (mut r, _) = apply(None, &change, start).unwrap();
            if let Some(days) = done_after_days {
                let mut done = action("db", ActionStatus::Done);
                if let Change::Action { arrival: a, .. } = &mut done {
                    *a = arrival("2026-03-01T00:00:00Z", regulation);
                }
                r = apply(Some(r), &done, start + days * day).unwrap().0;
            }
            if let Some(code) = denied {
                let deny = Change::Deny {
                    by: "x".into(),
                    code: code.into(),
                    note: None,
                };
                r = apply(Some(r), &deny, start + day).unwrap().0;
            }
            report.add(&r, start + 40 * day);
        };
        add("GDPR", Some(1), None);
        add("GDPR", Some(2), None);
        add("GDPR", Some(6), None);
        add("GDPR", None, None);
        add("GDPR", None, Some("no_match"));
        add("CCPA", Some(10), None);
        add("CCPA", None, None);
        let report = report.finish();
        let gdpr = &report.regulations["GDPR"];
        assert_eq!((gdpr.received, gdpr.complied), (5, 3));
        assert_eq!(gdpr.denied["no_match"], 1);
        assert_eq!(gdpr.median_days, Some(2.0));
        assert_eq!(gdpr.mean_days, Some(3.0));
        assert_eq!(
            (gdpr.open, gdpr.overdue),
            (1, 1),
            "due 1 April, now 10 April"
        );
        let ccpa = &report.regulations["CCPA"];
        assert_eq!((ccpa.received, ccpa.open, ccpa.overdue), (2, 1, 0));
        let csv = report.to_csv();
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows[1], "GDPR,5,3,1,1,0,0,0,0,2,3,1,1", "{csv}");
        assert!(rows[2].starts_with("CCPA,2,1,0,"), "{csv}");
    }
}
