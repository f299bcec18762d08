//! The console's pages, as HTML (maud escapes every value). Plain forms, no script: the
//! pages work in any browser, and the security policy lets nothing else run.

use std::collections::BTreeMap;

use maud::{html, Markup, DOCTYPE};
use serde_json::Value;

use super::{Frame, RequestsView};
use crate::rules::explain::RuleTrace;
use crate::state::{AuditEntry, DeadLetter, DeadLetterReason};

pub const STYLESHEET: &str = include_str!("console.css");

/// Days before its due date a request starts to stand out.
const DUE_SOON_DAYS: i64 = 7;

fn layout(title: &str, frame: Option<&Frame>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · gdpr-consumer" }
                link rel="stylesheet" href="/console.css";
            }
            body {
                header {
                    span.product { "gdpr-consumer" }
                    @if let Some(frame) = frame {
                        nav {
                            a href="/" { "Overview" }
                            a href="/requests" { "Requests" }
                            a href="/dead-letters" { "Dead letters" }
                            a href="/actions" { "Actions" }
                            a href="/rules" { "Rules" }
                            a href="/audit" { "Audit" }
                        }
                        form #logout method="post" action="/logout" {
                            (csrf(frame))
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    @if let Some(message) = frame.and_then(|f| f.message.as_deref()) {
                        p #message { (message) }
                    }
                    (body)
                }
            }
        }
    }
}

fn csrf(frame: &Frame) -> Markup {
    html! { input type="hidden" name="csrf" value=(frame.csrf); }
}

pub fn login(error: Option<&str>) -> Markup {
    layout(
        "Log in",
        None,
        html! {
            @if let Some(error) = error {
                p #error .error { (error) }
            }
            form #login method="post" action="/login" {
                label for="token" { "Console token" }
                input #token name="token" type="password" autocomplete="current-password" required autofocus;
                button #login-submit type="submit" { "Log in" }
            }
            p.hint { "The token is the one in the daemon's " code { "[console] token_env" } " variable." }
        },
    )
}

pub fn overview(frame: &Frame, status: &Value, rule_files: &[String]) -> Markup {
    let text = |v: &Value| match v {
        Value::Null => "–".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let empty = Vec::new();
    let list = |v: &Value| v.as_array().unwrap_or(&empty).clone();
    let rules = &status["rules"];
    layout(
        "Overview",
        Some(frame),
        html! {
            section #health {
                h2 { "Health" }
                @if status["ready"].as_bool() == Some(true) {
                    p.ok { "ready" }
                } @else {
                    p.bad { "not ready" }
                    ul { @for reason in list(&status["not_ready"]) { li { (text(&reason)) } } }
                }
                p { "Up for " (text(&status["uptime_s"])) " s. State writable: " (text(&status["state"]["writable"])) "." }
            }
            section {
                h2 { "Dead letters pending" }
                p #dead-letters-pending { (text(&status["dead_letters_pending"])) }
            }
            section #shards-section {
                h2 { "Shards" }
                table #shards {
                    thead { tr { th { "Shard" } th { "State" } th { "Checkpoint" } th { "Behind latest (ms)" } } }
                    tbody {
                        @for shard in list(&status["shards"]) {
                            tr {
                                td { (text(&shard["shard_id"])) }
                                td { (text(&shard["state"]))
                                    @if let Some(error) = shard["last_error"].as_str() { br; small.bad { (error) } } }
                                td.mono { (text(&shard["checkpoint"])) }
                                td.num { (text(&shard["millis_behind_latest"])) }
                            }
                        }
                    }
                }
            }
            section #rules {
                h2 { "Rules in force" }
                p { "Hash " code { (text(&rules["hash"])) } ", " (text(&rules["loaded"])) " rule(s): " (rule_files.join(", ")) }
                @if rules["stale"].as_bool() == Some(true) {
                    p #rules-stale .bad {
                        "Stale: the rules on disk were not loaded (the rules above still run). Last error: "
                        (text(&rules["last_error"]))
                    }
                }
            }
            section #paused {
                h2 { "Paused actions" }
                @let paused = list(&status["paused"]);
                @if status["paused"].is_null() { p.bad { "Unknown: the state cannot be read now." } }
                @else if paused.is_empty() { p { "None." } }
                ul {
                    @for pause in paused {
                        li { strong { (text(&pause["action"])) } " since " (text(&pause["since"])) ": " (text(&pause["reason"]))
                            " (" (status["requests_held"][pause["action"].as_str().unwrap_or_default()].as_u64().unwrap_or(0)) " held)" }
                    }
                }
            }
        },
    )
}

/// How a due date stands against now: "overdue", "due-soon" (the rows' classes), or "".
fn urgency(due_ms: u64, now_ms: u64) -> &'static str {
    if now_ms > due_ms {
        "overdue"
    } else if due_ms - now_ms < DUE_SOON_DAYS as u64 * 24 * 3600 * 1000 {
        "due-soon"
    } else {
        ""
    }
}

/// A request looked up by its key, and what was just done to it.
pub struct Lookup {
    /// `requests show --format json`, or the command's error (no such request).
    pub request: Result<Value, String>,
    /// `audit lookup`'s lines, when an action was chosen.
    pub audit: Option<Vec<Value>>,
    /// A change just asked: whether it was done, and what the command said.
    pub change: Option<(bool, String)>,
}

pub fn requests(frame: &Frame, view: &RequestsView, lookup: Option<&Lookup>) -> Markup {
    let now = crate::clock::now_ms();
    let time = |ms: u64| crate::clock::rfc3339(ms as i64);
    layout(
        "Requests",
        Some(frame),
        html! {
            section {
                h2 { "Look up a request" }
                p.hint { "The key is hashed by the daemon; it is neither stored nor shown." }
                form #lookup method="post" action="/requests/lookup" {
                    (csrf(frame))
                    label for="lookup-key" { "Key (the rule's decision key)" }
                    (key_field("lookup-key"))
                    label for="lookup-action" { "Audit trail of" }
                    select #lookup-action name="action" {
                        option value="" { "(no action)" }
                        @for action in &view.actions { option value=(action) { (action) } }
                    }
                    button #lookup-submit type="submit" { "Look up" }
                }
                @if let Some(lookup) = lookup { (looked_up(frame, lookup)) }
            }
            section {
                h2 { "Requests by status" }
                table #request-counts {
                    thead { tr {
                        @for status in view.counts.by_status.keys() { th { (status) } }
                        th { "overdue" }
                    } }
                    tbody { tr {
                        @for n in view.counts.by_status.values() { td.num { (n) } }
                        td.num.overdue { (view.counts.overdue) }
                    } }
                }
            }
            section {
                h2 { "Open requests, by due date" }
                @if view.open.is_empty() { p { "None: every request is answered." } }
                @else {
                    table #open-requests {
                        thead { tr { th { "Due" } th { "Status" } th { "Request" } } }
                        tbody {
                            @for (id, request) in &view.open {
                                @let urgency = urgency(request.due_ms, now);
                                tr class=(urgency) {
                                    td { (time(request.due_ms)) @if urgency == "overdue" { " (overdue)" } }
                                    td.status { (request.status.as_str()) }
                                    td.mono { (short(id)) }
                                }
                            }
                        }
                    }
                    @if view.more > 0 { p.hint { (view.more) " more, due later, not listed." } }
                }
            }
            section {
                h2 { "Outcomes per day, last 30 days" }
                (chart(&view.per_day))
            }
        },
    )
}

/// The field an operator types a request's key into: never filled in by the console.
fn key_field(id: &str) -> Markup {
    html! { input id=(id) name="key" type="text" autocomplete="off" required; }
}

/// A looked-up request: what was just done to it, the request as `requests show` tells
/// it, the forms that change it, and the chosen action's audit trail.
fn looked_up(frame: &Frame, lookup: &Lookup) -> Markup {
    let text = |v: &Value| match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    html! {
        @match &lookup.change {
            Some((true, said)) => p #change-done .ok { (said) },
            Some((false, said)) => p #change-error .error { (said) },
            None => {},
        }
        @match &lookup.request {
            Err(error) => p #request-none { (error) },
            Ok(r) => {
                h3 { "The request" }
                table #request {
                    tbody {
                        tr { th { "Request" } td.mono #request-hash { (text(&r["request"])) } }
                        tr { th { "Status" } td #request-status { (text(&r["status"])) } }
                        tr { th { "Regulation" } td { (text(&r["regulation"])) } }
                        tr { th { "Rule" } td { (text(&r["rule"])) } }
                        tr { th { "Arrived" } td { (text(&r["arrival_time"])) } }
                        tr.overdue[r["overdue"] == true] {
                            th { "Due" }
                            td #request-due { (text(&r["due_date"])) @if r["overdue"] == true { " (overdue)" } }
                        }
                        @if r["due_date"] != r["original_due_date"] {
                            tr { th { "Due before extension" } td { (text(&r["original_due_date"])) } }
                        }
                        @if !r["completed_at"].is_null() {
                            tr { th { "Complete" } td { (text(&r["completed_at"])) } }
                        }
                        @let e = &r["extension"];
                        @if !e.is_null() {
                            tr #request-extension { th { "Extended" } td { (text(&e["at"])) " by " (text(&e["by"])) ": " (text(&e["reason"])) } }
                        }
                        @let h = &r["hold"];
                        @if !h.is_null() {
                            tr #request-hold { th { "Legal hold" } td { "since " (text(&h["since"])) " by " (text(&h["by"])) ": " (text(&h["reason"])) } }
                        }
                        @let d = &r["denial"];
                        @if !d.is_null() {
                            tr #request-denial { th { "Denied" } td { (text(&d["at"])) " by " (text(&d["by"])) ": " (text(&d["code"]))
                                @if !d["note"].is_null() { " (" (text(&d["note"])) ")" } } }
                        }
                    }
                }
                h3 { "Actions" }
                table #request-actions {
                    thead { tr { th { "Action" } th { "Status" } th { "Attempts" } th { "HTTP" } th { "Job" } th { "Dead letter" } th { "Done" } th { "Error" } } }
                    tbody {
                        @for (name, a) in r["actions"].as_object().into_iter().flatten() {
                            tr {
                                td { (name) }
                                td.status { (text(&a["status"])) }
                                td.num { (text(&a["attempts"])) }
                                td { (text(&a["http_status"])) }
                                td { (text(&a["job_id"])) }
                                td { @if let Some(id) = a["dead_letter"].as_u64() { a href=(format!("/dead-letters#letter-{id}")) { (id) } } }
                                td { (text(&a["done_at"])) }
                                td.error { (text(&a["error"])) }
                            }
                        }
                    }
                }
                h3 { "Timeline" }
                table #request-timeline {
                    thead { tr { th { "Time" } th { "Event" } th { "Action" } th { "Note" } th { "By" } } }
                    tbody {
                        @for e in r["timeline"].as_array().into_iter().flatten() {
                            tr {
                                td { (text(&e["time"])) }
                                td.event { (text(&e["event"])) }
                                td { (text(&e["action"])) }
                                td { (text(&e["note"])) }
                                td.by { (text(&e["by"])) }
                            }
                        }
                    }
                }
                @let status = r["status"].as_str().unwrap_or_default();
                @if !["complete", "denied"].contains(&status) { (change_forms(frame, !r["hold"].is_null())) }
            }
        }
        @if let Some(lines) = &lookup.audit { (lookup_result(lines)) }
    }
}

/// The changes an open request takes. Each form asks for the key again: the console never
/// writes it into a page.
fn change_forms(frame: &Frame, held: bool) -> Markup {
    html! {
        h3 { "Change this request" }
        p.hint { "Type the request's key again in the form you use." }
        div #request-changes {
            form #extend method="post" action="/requests/extend" {
                (csrf(frame))
                (key_field("extend-key"))
                input name="reason" type="text" placeholder="reason (required)" required;
                button type="submit" { "Extend the due date (once)" }
            }
            @if held {
                form #release method="post" action="/requests/release" {
                    (csrf(frame))
                    (key_field("release-key"))
                    button type="submit" { "Release the legal hold" }
                }
            } @else {
                form #hold method="post" action="/requests/hold" {
                    (csrf(frame))
                    (key_field("hold-key"))
                    input name="reason" type="text" placeholder="reason (required)" required;
                    button type="submit" { "Put on legal hold" }
                }
            }
            form #deny method="post" action="/requests/deny" {
                (csrf(frame))
                (key_field("deny-key"))
                select name="reason_code" required {
                    option value="" { "basis of the denial…" }
                    @for code in crate::requests::DENIAL_CODES { option value=(code) { (code.replace('_', " ")) } }
                }
                input name="note" type="text" placeholder="note to the person (optional)";
                button type="submit" { "Deny" }
            }
        }
    }
}

fn lookup_result(lines: &[Value]) -> Markup {
    let entries: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("outcome").is_some())
        .collect();
    let summary = lines.iter().find(|l| l.get("found").is_some());
    html! {
        h3 { "Audit trail of the action" }
        @if entries.is_empty() {
            p #lookup-none { "No request with that action and key is in the audit trail." }
        } @else {
            p { "Request id " code { (summary.and_then(|s| s["request_id"].as_str()).unwrap_or_default()) }
                ", done: " (summary.map(|s| s["done"].to_string()).unwrap_or_default()) }
            table #lookup-result {
                thead { tr { th { "Time" } th { "Outcome" } th { "HTTP" } th { "Rule" } th { "Regulation" } th { "Due" } th { "Note" } th { "By" } } }
                tbody {
                    @for e in entries {
                        tr {
                            td { (e["time"].as_str().unwrap_or_default()) }
                            td.outcome { (e["outcome"].as_str().unwrap_or_default()) }
                            td { (e["http_status"].as_u64().map(|s| s.to_string()).unwrap_or_default()) }
                            td { (e["rule"].as_str().unwrap_or_default()) }
                            td { (e["regulation"].as_str().unwrap_or_default()) }
                            td { (e["due_date"].as_str().unwrap_or_default()) }
                            td { (e["note"].as_str().unwrap_or_default()) }
                            td { (e["by"].as_str().unwrap_or_default()) }
                        }
                    }
                }
            }
        }
    }
}

/// The outcome series of the chart, in stacking order, with their colours.
const SERIES: [(&str, &str); 6] = [
    ("done", "#2e7d32"),
    ("duplicate", "#81c784"),
    ("held", "#f9a825"),
    ("dead_lettered", "#c62828"),
    ("discarded", "#6d4c41"),
    ("other", "#90a4ae"),
];

/// Stacked bars drawn by the server: one per day, one colour per outcome.
fn chart(per_day: &[(String, BTreeMap<String, u64>)]) -> Markup {
    let (width, height, top, bottom) = (720.0, 220.0, 10.0, 30.0);
    let bucket = |outcome: &str| {
        SERIES
            .iter()
            .position(|(name, _)| *name == outcome)
            .unwrap_or(SERIES.len() - 1)
    };
    let stacks: Vec<[u64; SERIES.len()]> = per_day
        .iter()
        .map(|(_, counts)| {
            let mut stack = [0; SERIES.len()];
            for (outcome, n) in counts {
                stack[bucket(outcome)] += n;
            }
            stack
        })
        .collect();
    let max = stacks
        .iter()
        .map(|s| s.iter().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let slot = width / per_day.len().max(1) as f64;
    let scale = (height - top - bottom) / max as f64;
    // Each day's bars, bottom up: (x, y, height, colour, tooltip).
    let mut bars = Vec::new();
    for (i, ((day, _), stack)) in per_day.iter().zip(&stacks).enumerate() {
        let x = i as f64 * slot + 2.0;
        let mut y = height - bottom;
        for (k, n) in stack.iter().enumerate().filter(|(_, n)| **n > 0) {
            let h = *n as f64 * scale;
            y -= h;
            bars.push((x, y, h, SERIES[k].1, format!("{day}: {n} {}", SERIES[k].0)));
        }
    }
    html! {
        svg #outcomes-chart xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {width} {height}")) role="img" aria-label="Outcomes per day" {
            line x1="0" y1=(height - bottom) x2=(width) y2=(height - bottom) stroke="#555" {}
            text x="0" y=(top + 2.0) font-size="11" fill="#333" { (max) }
            @for (x, y, h, colour, tip) in &bars {
                rect x=(format!("{x:.1}")) y=(format!("{y:.1}")) width=(format!("{:.1}", slot - 4.0)) height=(format!("{h:.1}")) fill=(colour) {
                    title { (tip) }
                }
            }
            @for (i, (day, _)) in per_day.iter().enumerate() {
                // Every 7th day, counted back from today's.
                @if (per_day.len() - 1 - i).is_multiple_of(7) {
                    // Under its bar; today's ends at the chart's right edge.
                    @let (x, anchor) = if i + 1 == per_day.len() { (width - 2.0, "end") } else { ((i as f64 + 0.5) * slot, "middle") };
                    text x=(format!("{x:.1}")) y=(height - 12.0) font-size="10" fill="#333" text-anchor=(anchor) { (day.get(5..).unwrap_or(day)) }
                }
            }
        }
        p.legend {
            @for (name, colour) in SERIES {
                span.swatch { svg width="10" height="10" xmlns="http://www.w3.org/2000/svg" { rect width="10" height="10" fill=(colour) {} } " " (name) }
            }
        }
    }
}

pub fn dead_letters(frame: &Frame, letters: &[(u64, DeadLetter)]) -> Markup {
    let now = crate::clock::now_ms();
    layout(
        "Dead letters",
        Some(frame),
        html! {
            @if letters.is_empty() { p { "None pending." } }
            @else {
                table #dead-letters {
                    thead { tr { th { "Id" } th { "Kind" } th { "Rule" } th { "Action" } th { "Error" } th { "Age" } th { "Retries" } th { "Retry" } th { "Discard" } } }
                    tbody {
                        @for (id, letter) in letters {
                            tr id=(format!("letter-{id}")) {
                                td { (id) }
                                td.kind { (letter.reason.kind()) }
                                td { (letter.rule) }
                                td { (action_of(letter)) }
                                td.error { (letter.reason.error())
                                    @if let Some(last) = &letter.last_error { br; small { "last retry: " (last) } } }
                                td { (age(now.saturating_sub(letter.created_at_ms))) }
                                td.num { (letter.retries) }
                                td {
                                    form.retry method="post" action=(format!("/dead-letters/{id}/retry")) {
                                        (csrf(frame))
                                        button type="submit" { "Retry" }
                                    }
                                }
                                td {
                                    form.discard method="post" action=(format!("/dead-letters/{id}/discard")) {
                                        (csrf(frame))
                                        input name="reason" type="text" placeholder="reason (required)" required;
                                        button type="submit" { "Discard" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub fn actions(frame: &Frame, actions: &[Value]) -> Markup {
    layout(
        "Actions",
        Some(frame),
        html! {
            p.hint { "A paused action's requests are held, not sent and not lost; resuming sends them in arrival order." }
            table #actions {
                thead { tr { th { "Action" } th { "State" } th { "Reason" } th { "Since" } th { "Held" } th {} } }
                tbody {
                    @for action in actions {
                        @let name = action["action"].as_str().unwrap_or_default();
                        @let resuming = action["resuming"].as_bool() == Some(true);
                        @let paused = action["paused"].as_bool() == Some(true) && !resuming;
                        tr id=(format!("action-{name}")) {
                            td { (name) }
                            td.state { @if resuming { "resuming (sending its held requests)" } @else if paused { "paused" } @else { "running" } }
                            td { (action["reason"].as_str().unwrap_or_default()) }
                            td { (action["since"].as_str().unwrap_or_default()) }
                            td.held.num { (action["held"]) }
                            td {
                                @if paused {
                                    form.resume method="post" action=(format!("/actions/{}/resume", segment(name))) {
                                        (csrf(frame))
                                        button type="submit" { "Resume" }
                                    }
                                } @else {
                                    form.pause method="post" action=(format!("/actions/{}/pause", segment(name))) {
                                        (csrf(frame))
                                        input name="reason" type="text" placeholder="reason (required)" required;
                                        button type="submit" { "Pause" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// One pasted record, explained by the rules in force and by the rules on disk.
pub struct Explained {
    pub title: String,
    pub in_force: Vec<RuleTrace>,
    /// None when the rules on disk would not load.
    pub on_disk: Option<Vec<RuleTrace>>,
}

/// What the next reload would do with the rules on disk.
pub enum OnDisk {
    Loads { hash: String, same: bool },
    Refused(String),
}

pub fn playground(
    frame: &Frame,
    records: &str,
    runs: &[Explained],
    on_disk: Option<&OnDisk>,
) -> Markup {
    layout(
        "Rule playground",
        Some(frame),
        html! {
            p.hint { "Paste records (one per line: a line " code { "capture" } " wrote, or a JSON event) and see what each rule decides and why, with the rules in force and with the rules on disk (what the next reload would run). Nothing is sent, nothing is written; rules are still edited as files." }
            form #playground method="post" action="/rules/explain" {
                (csrf(frame))
                textarea #records name="records" rows="6" cols="100" placeholder=r#"{"type":"privacy_request","tags":["GDPR","Delete User"],"client":"acme","request_id":"r-1","user_id":"u-1"}"# required { (records) }
                button #explain-submit type="submit" { "Explain" }
            }
            @if let Some(on_disk) = on_disk {
                @match on_disk {
                    OnDisk::Loads { hash, same: true } => p #on-disk { "The rules on disk are the rules in force (" code { (hash) } ")." },
                    OnDisk::Loads { hash, same: false } => p #on-disk .bad { "The rules on disk (" code { (hash) } ") differ from the rules in force: the next reload would run them." },
                    OnDisk::Refused(error) => p #on-disk .bad { "The next reload would be refused (the rules in force would stay): " pre { (error) } },
                }
            }
            @for run in runs {
                h2 { (run.title) }
                table.explained {
                    thead { tr { th { "Rule" } th { "In force" } th { "On disk" } } }
                    tbody {
                        @for trace in &run.in_force {
                            @let disk = run.on_disk.as_ref().and_then(|traces| traces.iter().find(|t| t.rule == trace.rule));
                            tr.changed[disk.is_some_and(|d| d.outcome != trace.outcome)] {
                                td { (trace.rule) }
                                td { pre { (explanation(trace)) } }
                                td { @match disk { Some(d) => pre { (explanation(d)) }, None => "–" } }
                            }
                        }
                        @for trace in run.on_disk.iter().flatten().filter(|t| !run.in_force.iter().any(|f| f.rule == t.rule)) {
                            tr.changed {
                                td { (trace.rule) " (new)" }
                                td { "–" }
                                td { pre { (explanation(trace)) } }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// A trace as the CLI's `rules explain` says it, without the rule's name (its own column).
fn explanation(trace: &RuleTrace) -> String {
    let text = trace.human();
    text.strip_prefix(&format!("{}: ", trace.rule))
        .map(str::to_owned)
        .unwrap_or(text)
}

pub fn audit(frame: &Frame, latest: &[AuditEntry]) -> Markup {
    layout(
        "Audit",
        Some(frame),
        html! {
            section {
                h2 { "Export" }
                form #export method="get" action="/audit/export" {
                    label for="since" { "Since" }
                    input #since name="since" type="text" placeholder="2026-01-01 or RFC 3339";
                    label for="until" { "Until" }
                    input #until name="until" type="text" placeholder="(now)";
                    label for="format" { "Format" }
                    select #format name="format" {
                        option value="csv" { "CSV" }
                        option value="jsonl" { "JSON lines" }
                    }
                    button #export-submit type="submit" { "Download" }
                }
            }
            section {
                h2 { "Latest entries" }
                table #recent-audit {
                    thead { tr { th { "Time" } th { "Action" } th { "Outcome" } th { "Request id" } th { "Rule" } th { "Note" } th { "By" } } }
                    tbody {
                        @for e in latest {
                            tr {
                                td { (crate::clock::rfc3339(e.time_ms as i64)) }
                                td { (e.action) }
                                td.outcome { (e.outcome) }
                                td.mono { (short(&e.request_id)) }
                                td { (e.rule) }
                                td { (e.note.as_deref().unwrap_or_default()) }
                                td.by { (e.by.as_deref().unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// A name as one URL path segment (an action may be named `a/b?c`).
fn segment(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn action_of(letter: &DeadLetter) -> &str {
    match &letter.reason {
        DeadLetterReason::ActionFailed { action, .. } => action,
        _ => "",
    }
}

/// A request id's first 16 hex digits (the full one is in exports).
fn short(request_id: &str) -> Markup {
    html! { span title=(request_id) { (request_id.get(..16).unwrap_or(request_id)) } }
}

fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requests::Status;
    use crate::state::{OpenRequest, RequestGauges};

    const DAY_MS: u64 = 24 * 3600 * 1000;

    fn frame() -> Frame {
        Frame {
            csrf: "c".into(),
            message: None,
        }
    }

    fn view(open: Vec<(String, OpenRequest)>, more: usize) -> RequestsView {
        RequestsView {
            open,
            more,
            counts: RequestGauges::default(),
            per_day: Vec::new(),
            actions: vec!["purge_db".into()],
        }
    }

    fn open(id: &str, status: Status, due_ms: u64) -> (String, OpenRequest) {
        (id.repeat(64), OpenRequest { status, due_ms })
    }

    #[test]
    fn open_requests_past_due_are_marked_overdue_and_those_due_soon_stand_out() {
        let now = crate::clock::now_ms();
        let page = requests(
            &frame(),
            &view(
                vec![
                    open("a", Status::Failed, now - DAY_MS),
                    open("b", Status::Held, now + DAY_MS),
                    open("c", Status::Open, now + 20 * DAY_MS),
                ],
                3,
            ),
            None,
        )
        .into_string();
        let row = |id: &str| {
            let at = page.find(&id.repeat(16)).unwrap();
            let start = page[..at].rfind("<tr").unwrap();
            page[start..at + page[at..].find("</tr>").unwrap()].to_owned()
        };
        assert!(row("a").contains(r#"class="overdue""#), "{}", row("a"));
        assert!(row("a").contains("(overdue)") && row("a").contains("failed"));
        assert!(row("b").contains(r#"class="due-soon""#), "{}", row("b"));
        assert!(!row("c").contains("overdue") && !row("c").contains("due-soon"));
        assert!(page.contains("3 more"), "{page}");
    }

    fn shown(status: &str, hold: bool) -> Value {
        serde_json::json!({
            "request": "ab".repeat(32), "status": status, "regulation": "GDPR", "rule": "r",
            "arrival_time": "2026-01-01T00:00:00Z", "due_date": "2026-01-31T00:00:00Z",
            "original_due_date": "2026-01-31T00:00:00Z", "overdue": false, "completed_at": null,
            "extension": null, "denial": null,
            "hold": if hold { serde_json::json!({"since": "2026-01-02T00:00:00Z", "by": "console", "reason": "law"}) } else { Value::Null },
            "actions": {"purge_db": {"status": "held", "attempts": 0}}, "timeline": [],
        })
    }

    fn page_of(lookup: Lookup) -> String {
        requests(&frame(), &view(Vec::new(), 0), Some(&lookup)).into_string()
    }

    #[test]
    fn an_open_request_offers_its_changes_an_answered_one_none() {
        let held = page_of(Lookup {
            request: Ok(shown("held", true)),
            audit: None,
            change: None,
        });
        for form in [r#"id="extend""#, r#"id="release""#, r#"id="deny""#] {
            assert!(held.contains(form), "{form}");
        }
        assert!(!held.contains(r#"id="hold""#));
        let open = page_of(Lookup {
            request: Ok(shown("failed", false)),
            audit: None,
            change: None,
        });
        assert!(open.contains(r#"id="hold""#) && !open.contains(r#"id="release""#));
        for status in ["complete", "denied"] {
            let page = page_of(Lookup {
                request: Ok(shown(status, false)),
                audit: None,
                change: None,
            });
            assert!(!page.contains("request-changes"), "{status}");
        }
    }

    #[test]
    fn a_refused_change_shows_as_an_error_and_an_unknown_key_says_so() {
        let page = page_of(Lookup {
            request: Ok(shown("failed", false)),
            audit: None,
            change: Some((false, "the request was extended already".into())),
        });
        assert!(page.contains(r#"id="change-error""#) && !page.contains("change-done"));
        let page = page_of(Lookup {
            request: Err("no request with this key has been seen".into()),
            audit: None,
            change: None,
        });
        assert!(page.contains(r#"id="request-none""#) && !page.contains(r#"id="request""#));
    }
}
