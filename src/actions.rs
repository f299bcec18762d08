//! Backend actions: turn a rule's decision into the exact HTTP request the config allows,
//! and send it with retries.
//!
//! Separation of duties: a rule only picks an action by name and supplies params; the config
//! alone fixes the method, the host and the credentials. `{name}` placeholders may stand in
//! the path and query only, and each value becomes one fully percent-encoded component.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Shutdown;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rand::Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::rules::Decision;
use crate::telemetry::Telemetry;

/// Most of a backend's answer read just to keep its connection open for the next call.
const MAX_DRAINED_BODY: usize = 64 << 10;

/// Characters kept as they are in a URL component: RFC 3986 unreserved.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Errors of the actions stage.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("invalid url template {template:?}: {reason}")]
    Template { template: String, reason: String },
    /// The decision cannot be turned into a request: the rule's fault, not the backend's.
    #[error("decision for action {action:?}: {reason}")]
    Decision { action: String, reason: String },
    #[error(
        "action {action:?}: environment variable {var} is not set (it holds the bearer token)"
    )]
    MissingToken { action: String, var: String },
    #[error("action {action:?}: the secret in {source_name} is empty")]
    EmptySecret { action: String, source_name: String },
    #[error("action {action:?}: cannot read the secret file {path}: {reason}")]
    SecretFile {
        action: String,
        path: PathBuf,
        reason: String,
    },
    #[error("action {action:?}: cannot use ca_file {path}: {reason}")]
    CaFile {
        action: String,
        path: PathBuf,
        reason: String,
    },
    #[error("action {action:?}: cannot build HTTP client")]
    Client {
        action: String,
        source: reqwest::Error,
    },
}

/// A URL with `{name}` placeholders after its authority.
#[derive(Debug, Clone)]
pub struct UrlTemplate {
    raw: String,
    parts: Vec<UrlPart>,
    /// `scheme://authority`, parsed once: placeholders stand only after it, so a rendered
    /// URL needs only its path and query parsed.
    origin: reqwest::Url,
    origin_len: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum UrlPart {
    Literal(String),
    Param(String),
}

impl UrlTemplate {
    pub fn parse(raw: &str) -> Result<Self, ActionError> {
        let err = |reason: &str| ActionError::Template {
            template: raw.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = raw
            .strip_prefix("https://")
            .or_else(|| raw.strip_prefix("http://"))
            .ok_or_else(|| err("must start with https:// (or http:// for local testing)"))?;
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if authority.is_empty() || authority.contains(['{', '}', '@']) {
            return Err(err(
                "the host must be written out in full: placeholders may stand only in the path and query",
            ));
        }
        let origin_len = raw.len() - rest.len() + authority_end;
        let origin = reqwest::Url::parse(&raw[..origin_len]).map_err(|e| err(&e.to_string()))?;
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            match c {
                '{' if literal_so_far_has_fragment(&parts, &literal) => {
                    return Err(err(
                        "placeholders may not stand in the fragment (after #): it is never sent",
                    ));
                }
                '{' => {
                    let mut closed = false;
                    let name: String = chars
                        .by_ref()
                        .take_while(|&c| {
                            closed = c == '}';
                            !closed
                        })
                        .collect();
                    if !closed {
                        return Err(err("unclosed { (placeholders look like {name})"));
                    }
                    let valid = !name.is_empty()
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !valid {
                        return Err(err("placeholders look like {name} (letters, digits, _)"));
                    }
                    parts.push(UrlPart::Literal(std::mem::take(&mut literal)));
                    parts.push(UrlPart::Param(name));
                }
                '}' => return Err(err("unmatched }")),
                c => literal.push(c),
            }
        }
        parts.push(UrlPart::Literal(literal));
        parts.retain(|p| p != &UrlPart::Literal(String::new()));
        let template = Self {
            raw: raw.to_owned(),
            parts,
            origin,
            origin_len,
        };
        reqwest::Url::parse(&template.render_with(|_| "x".into()))
            .map_err(|e| err(&e.to_string()))?;
        Ok(template)
    }

    pub fn is_insecure(&self) -> bool {
        self.raw.starts_with("http://")
    }

    fn render_with(&self, mut value: impl FnMut(&str) -> String) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                UrlPart::Literal(s) => s.clone(),
                UrlPart::Param(name) => value(name),
            })
            .collect()
    }

    /// A URL [`UrlTemplate::render`] made, parsed: what `Url::parse` makes of it, without
    /// parsing the host again for every request.
    fn parse_rendered(&self, rendered: &str) -> Result<reqwest::Url, String> {
        let rest = &rendered[self.origin_len..];
        if rest.contains('#') {
            return reqwest::Url::parse(rendered).map_err(|e| e.to_string());
        }
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        let mut url = self.origin.clone();
        url.set_path(path);
        url.set_query(query);
        Ok(url)
    }

    /// Fills the placeholders from the decision's params, each fully percent-encoded.
    pub fn render(&self, params: &serde_json::Map<String, Value>) -> Result<String, String> {
        let mut problem = None;
        let url = self.render_with(|name| match component(name, params.get(name)) {
            Ok(v) => utf8_percent_encode(&v, COMPONENT).to_string(),
            Err(e) => {
                problem.get_or_insert(e);
                String::new()
            }
        });
        match problem {
            Some(e) => Err(e),
            None => Ok(url),
        }
    }
}

/// The text a param contributes to a URL, or why it cannot.
fn component(name: &str, value: Option<&Value>) -> Result<String, String> {
    let text = match value {
        None | Some(Value::Null) => {
            return Err(format!("param {name:?} is missing (the URL needs it)"))
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Array(_) | Value::Object(_)) => {
            return Err(format!(
                "param {name:?} is a map or an array; a URL needs a single value"
            ))
        }
    };
    if text.is_empty() || text == "." || text == ".." {
        return Err(format!(
            "param {name:?} is {text:?}, which cannot stand in a URL"
        ));
    }
    Ok(text)
}

/// Whether the template text read so far has reached the fragment (`#`).
fn literal_so_far_has_fragment(parts: &[UrlPart], literal: &str) -> bool {
    literal.contains('#')
        || parts
            .iter()
            .any(|p| matches!(p, UrlPart::Literal(l) if l.contains('#')))
}

/// An answer that means the backend could not do the request now (5xx, 408, 429): retried,
/// never "done".
pub fn is_backend_fault(status: u16) -> bool {
    (500..600).contains(&status) || status == 408 || status == 429
}

/// The first `{name}` placeholder in a text, if any.
fn placeholder_in(text: &str) -> Option<&str> {
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        if len > 0 && after[len..].starts_with('}') {
            return Some(&rest[start..start + len + 2]);
        }
        rest = after;
    }
    None
}

/// Where a secret comes from. Secrets never sit in the config file.
#[derive(Debug, Clone)]
pub enum Secret {
    Env(String),
    File(PathBuf),
}

impl Secret {
    fn read(&self, action: &str) -> Result<String, ActionError> {
        match self {
            Secret::Env(var) => {
                let value = std::env::var(var).map_err(|_| ActionError::MissingToken {
                    action: action.to_owned(),
                    var: var.clone(),
                })?;
                non_empty(value.trim(), action, || {
                    format!("environment variable {var}")
                })
            }
            Secret::File(path) => {
                let value = std::fs::read_to_string(path).map_err(|e| ActionError::SecretFile {
                    action: action.to_owned(),
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                non_empty(value.trim(), action, || format!("file {}", path.display()))
            }
        }
    }
}

/// A secret that is empty (or only whitespace) would send `Authorization: Bearer ` and
/// look like a backend refusal: refused at start instead.
fn non_empty(
    value: &str,
    action: &str,
    source: impl FnOnce() -> String,
) -> Result<String, ActionError> {
    if value.is_empty() {
        return Err(ActionError::EmptySecret {
            action: action.to_owned(),
            source_name: source(),
        });
    }
    Ok(value.to_owned())
}

/// HMAC-SHA256 request signing: `signature_header` carries the lowercase hex HMAC of
/// `timestamp \n METHOD \n path?query \n body`, `timestamp_header` the Unix time in seconds.
#[derive(Debug, Clone)]
pub struct Signing {
    pub secret: Secret,
    pub signature_header: String,
    pub timestamp_header: String,
}

/// Headers the daemon sets itself; the config cannot override them.
const RESERVED_HEADERS: [&str; 4] = ["authorization", "idempotency-key", "content-type", "host"];

/// Checks a header from the config: a valid name, and a value without CR, LF or other
/// control characters (no header injection).
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    reqwest::header::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("invalid header name {name:?}"))?;
    if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(format!("header {name} is set by gdpr-consumer itself"));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(format!(
            "header {name}: the value holds a control character (CR, LF, ...)"
        ));
    }
    if let Some(placeholder) = placeholder_in(value) {
        return Err(format!(
            "header {name}: the value holds {placeholder}, but headers are fixed; placeholders stand only in the URL and the body"
        ));
    }
    Ok(())
}

/// A JSON body with `{param}` placeholders. A string that is exactly `"{name}"` takes the
/// param's JSON value; other strings get the params' text in place. Built as a JSON value,
/// so a param can never break out of its string.
#[derive(Debug, Clone)]
pub struct BodyTemplate(Value);

impl BodyTemplate {
    pub fn parse(text: &str) -> Result<Self, String> {
        /// A placeholder in an object key would be sent as written: refused.
        fn check_keys(v: &Value) -> Result<(), String> {
            match v {
                Value::Array(items) => items.iter().try_for_each(check_keys),
                Value::Object(map) => map.iter().try_for_each(|(key, value)| {
                    if let Some(placeholder) = placeholder_in(key) {
                        return Err(format!(
                            "the key {key:?} holds {placeholder}: placeholders stand in values only"
                        ));
                    }
                    check_keys(value)
                }),
                _ => Ok(()),
            }
        }
        let value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        check_keys(&value)?;
        Ok(BodyTemplate(value))
    }

    fn render(&self, params: &serde_json::Map<String, Value>) -> Result<Value, String> {
        fn walk(v: &Value, params: &serde_json::Map<String, Value>) -> Result<Value, String> {
            Ok(match v {
                Value::String(s) => {
                    if let Some(name) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                        if !name.contains(['{', '}']) {
                            return params.get(name).cloned().ok_or_else(|| {
                                format!("param {name:?} is missing (the body needs it)")
                            });
                        }
                    }
                    let mut out = String::new();
                    let mut rest = s.as_str();
                    while let Some(start) = rest.find('{') {
                        let Some(len) = rest[start..].find('}') else {
                            break;
                        };
                        let name = &rest[start + 1..start + len];
                        let value = params.get(name).ok_or_else(|| {
                            format!("param {name:?} is missing (the body needs it)")
                        })?;
                        out.push_str(&rest[..start]);
                        match value {
                            Value::String(text) => out.push_str(text),
                            other => out.push_str(&other.to_string()),
                        }
                        rest = &rest[start + len + 1..];
                    }
                    out.push_str(rest);
                    Value::String(out)
                }
                Value::Array(items) => Value::Array(
                    items
                        .iter()
                        .map(|i| walk(i, params))
                        .collect::<Result<_, _>>()?,
                ),
                Value::Object(map) => Value::Object(
                    map.iter()
                        .map(|(k, v)| walk(v, params).map(|v| (k.clone(), v)))
                        .collect::<Result<_, _>>()?,
                ),
                other => other.clone(),
            })
        }
        walk(&self.0, params)
    }
}

/// One configured backend action.
#[derive(Debug, Clone)]
pub struct ActionSpec {
    pub method: reqwest::Method,
    pub url: UrlTemplate,
    pub body: Option<BodyTemplate>,
    pub headers: Vec<(String, String)>,
    pub bearer_token: Option<Secret>,
    pub signing: Option<Signing>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub success_statuses: Vec<u16>,
    /// 4xx statuses that mean "try again later" for this backend (e.g. 409 for "the same
    /// Idempotency-Key is still in flight"), retried like 5xx.
    pub retry_statuses: Vec<u16>,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub max_retry_duration: Duration,
    pub concurrency: usize,
    pub rate_limit_per_second: Option<f64>,
    pub completion: Option<Completion>,
}

/// How to follow a job the backend accepts and finishes later (`[actions.NAME.completion]`).
#[derive(Debug, Clone)]
pub struct Completion {
    /// The job's status URL: `{job_id}` and the decision's params.
    pub url: UrlTemplate,
    pub job_id_pointer: String,
    pub status_pointer: String,
    pub done: Vec<String>,
    pub failed: Vec<String>,
    pub poll_interval: Duration,
    pub give_up_after: Duration,
}

/// What a poll of a job found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    Done(String),
    Failed(String),
    /// Not finished (its status): asked again at the next poll.
    Pending(String),
    /// The status could not be read now (why): asked again at the next poll.
    Fault(String),
    Interrupted,
}

/// The `Idempotency-Key` for a decision: lowercase hex SHA-256 of `action \n key`.
pub fn idempotency_key(action: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(action.as_bytes());
    h.update(b"\n");
    h.update(key.as_bytes());
    hex::encode(h.finalize())
}

/// The exact request a decision turns into. Secrets are held apart so the request can be
/// printed with them redacted.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    pub action: String,
    pub method: reqwest::Method,
    pub url: reqwest::Url,
    pub idempotency_key: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Every header as it is sent, secrets redacted (for dry-run and preview).
    shown_headers: Vec<(String, String)>,
}

impl PreparedRequest {
    /// Headers as they are sent, with secrets shown as `<redacted>`.
    pub fn redacted_headers(&self) -> &[(String, String)] {
        &self.shown_headers
    }

    /// The request as JSON for people (dry-run, preview, explain): method, URL, headers
    /// with secrets redacted, body.
    pub fn shown(&self) -> serde_json::Value {
        let headers: serde_json::Map<String, serde_json::Value> = self
            .shown_headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
        serde_json::json!({
            "method": self.method.as_str(),
            "url": self.url.as_str(),
            "headers": headers,
            "body": serde_json::from_str::<serde_json::Value>(&self.body)
                .unwrap_or_else(|_| self.body.clone().into()),
        })
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The backend accepted it (2xx, or a status the config declares success).
    Done { status: u16, attempts: u32 },
    /// The backend accepted it as a job it finishes later (the action has a `completion`).
    Accepted {
        status: u16,
        attempts: u32,
        job_id: String,
    },
    /// The backend refused it or could not be reached within the retry budget.
    Failed {
        error: String,
        status: Option<u16>,
        attempts: u32,
        /// Whether a later retry could succeed (backend faults) or needs an operator (4xx).
        retryable: bool,
    },
    /// Shutdown came while waiting to retry: nothing is settled.
    Interrupted,
}

struct Action {
    spec: ActionSpec,
    token: Option<String>,
    signing_secret: Option<String>,
    client: reqwest::Client,
    in_flight: tokio::sync::Semaphore,
    /// When the rate limit lets the next request go.
    next_slot: tokio::sync::Mutex<tokio::time::Instant>,
}

/// All configured actions, ready to prepare and send requests.
pub struct ActionSet {
    actions: BTreeMap<String, Action>,
    /// Where retries are reported (the daemon; not a dry-run or a preview).
    telemetry: Option<Arc<Telemetry>>,
}

impl ActionSet {
    /// Builds the actions. With `read_secrets`, every token and signing secret must be
    /// readable (the daemon); without, requests are prepared with secrets redacted (dry-run).
    pub fn new(
        specs: &BTreeMap<String, ActionSpec>,
        read_secrets: bool,
    ) -> Result<Self, ActionError> {
        let mut actions = BTreeMap::new();
        for (name, spec) in specs {
            let read = |secret: &Option<Secret>| -> Result<Option<String>, ActionError> {
                match secret {
                    Some(secret) if read_secrets => secret.read(name).map(Some),
                    _ => Ok(None),
                }
            };
            let token = read(&spec.bearer_token)?;
            let signing_secret = read(&spec.signing.as_ref().map(|s| s.secret.clone()))?;
            let mut builder = reqwest::Client::builder()
                .timeout(spec.timeout)
                .connect_timeout(spec.timeout.min(Duration::from_secs(10)))
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("gdpr-consumer/", env!("CARGO_PKG_VERSION")));
            if let Some(path) = &spec.ca_file {
                let ca_err = |reason: String| ActionError::CaFile {
                    action: name.clone(),
                    path: path.clone(),
                    reason,
                };
                let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
                let cert =
                    reqwest::Certificate::from_pem(&pem).map_err(|e| ca_err(e.to_string()))?;
                builder = builder.add_root_certificate(cert);
            }
            let client = builder.build().map_err(|source| ActionError::Client {
                action: name.clone(),
                source,
            })?;
            actions.insert(
                name.clone(),
                Action {
                    spec: spec.clone(),
                    token,
                    signing_secret,
                    client,
                    in_flight: tokio::sync::Semaphore::new(spec.concurrency),
                    next_slot: tokio::sync::Mutex::new(tokio::time::Instant::now()),
                },
            );
        }
        Ok(Self {
            actions,
            telemetry: None,
        })
    }

    /// The longest one poll of a job of `action` may take: its timeout, and a wait for
    /// one of its slots (bounded by a second timeout).
    pub fn poll_budget(&self, action: &str) -> Duration {
        let timeout = self
            .actions
            .get(action)
            .map_or(Duration::from_secs(10), |a| a.spec.timeout);
        timeout * 2 + Duration::from_secs(5)
    }

    /// How a job of `action` is followed, if its backend answers with jobs.
    pub fn completion(&self, action: &str) -> Option<&Completion> {
        self.actions.get(action)?.spec.completion.as_ref()
    }

    /// The configured actions' names.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.actions.keys()
    }

    /// Reports each retry of a backend fault to `telemetry` (event and counter).
    pub fn observed(self, telemetry: Arc<Telemetry>) -> Self {
        for name in self.actions.keys() {
            telemetry.action_configured(name);
        }
        Self {
            telemetry: Some(telemetry),
            ..self
        }
    }

    /// Turns a decision into the request the backend will receive.
    pub fn prepare(&self, decision: &Decision) -> Result<PreparedRequest, ActionError> {
        let action = self
            .actions
            .get(&decision.action)
            .ok_or_else(|| ActionError::Decision {
                action: decision.action.clone(),
                reason: "no such action in the config".into(),
            })?;
        let reject = |reason| ActionError::Decision {
            action: decision.action.clone(),
            reason,
        };
        let rendered = action.spec.url.render(&decision.params).map_err(reject)?;
        let url = action.spec.url.parse_rendered(&rendered).map_err(reject)?;
        // A job it starts must be followable: its status URL is built from the same params
        // (a param it lacks is the decision's fault now, not a silent poll failure later).
        if let Some(completion) = &action.spec.completion {
            let mut params = decision.params.clone();
            params.insert("job_id".into(), Value::String("job".into()));
            completion
                .url
                .render(&params)
                .map_err(|e| reject(format!("the completion URL: {e}")))?;
        }
        let body = match &action.spec.body {
            Some(template) => template.render(&decision.params).map_err(reject)?,
            None => Value::Object(decision.params.clone()),
        };
        let idempotency_key = idempotency_key(&decision.action, &decision.key);
        let mut shown_headers = Vec::new();
        if action.spec.bearer_token.is_some() {
            shown_headers.push(("Authorization".to_owned(), "Bearer <redacted>".to_owned()));
        }
        shown_headers.push(("Idempotency-Key".to_owned(), idempotency_key.clone()));
        shown_headers.push(("Content-Type".to_owned(), "application/json".to_owned()));
        shown_headers.extend(action.spec.headers.iter().cloned());
        if let Some(signing) = &action.spec.signing {
            shown_headers.push((
                signing.timestamp_header.clone(),
                "<time of sending>".to_owned(),
            ));
            shown_headers.push((signing.signature_header.clone(), "<redacted>".to_owned()));
        }
        Ok(PreparedRequest {
            action: decision.action.clone(),
            method: action.spec.method.clone(),
            url,
            idempotency_key,
            headers: action.spec.headers.clone(),
            body: body.to_string(),
            shown_headers,
        })
    }

    /// Sends a prepared request, retrying backend faults with exponential backoff and
    /// jitter within the action's retry budget. Refusals (other 4xx) end at once.
    pub async fn send(&self, request: &PreparedRequest, shutdown: &Shutdown) -> Outcome {
        let Some(action) = self.actions.get(&request.action) else {
            return Outcome::Failed {
                error: format!("action {:?} is no longer configured", request.action),
                status: None,
                attempts: 0,
                retryable: false,
            };
        };
        let spec = &action.spec;
        let started = tokio::time::Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (error, status, retry_after) = match self.attempt(action, request, shutdown).await {
                None => return Outcome::Interrupted,
                Some(Ok((status, body)))
                    if status.is_success() || spec.success_statuses.contains(&status.as_u16()) =>
                {
                    let (started_job, status, attempts) =
                        (status.is_success(), status.as_u16(), attempt);
                    // Only a 2xx starts a job; a status listed as success (404: already
                    // gone) is done at once.
                    let Some(completion) = spec.completion.as_ref().filter(|_| started_job) else {
                        return Outcome::Done { status, attempts };
                    };
                    return match read_pointer(&body, &completion.job_id_pointer) {
                        Ok(job_id) => Outcome::Accepted {
                            status,
                            attempts,
                            job_id,
                        },
                        Err(why) => Outcome::Failed {
                            error: format!(
                                "the backend answered {status}, but its answer {why}: no job id to follow (the request may be under way: retrying sends it again with the same Idempotency-Key)"
                            ),
                            status: Some(status),
                            attempts,
                            retryable: false,
                        },
                    };
                }
                Some(Ok((status, _))) => {
                    // A 409 is a refusal unless the config says the backend means "the
                    // same Idempotency-Key is still in flight" by it (retry_statuses).
                    let retryable = is_backend_fault(status.as_u16())
                        || spec.retry_statuses.contains(&status.as_u16());
                    let error = format!("backend answered {status}");
                    if !retryable {
                        return Outcome::Failed {
                            error,
                            status: Some(status.as_u16()),
                            attempts: attempt,
                            retryable: false,
                        };
                    }
                    (error, Some(status.as_u16()), None::<Duration>)
                }
                Some(Err(AttemptError {
                    error,
                    status,
                    retry_after,
                })) => (error, status, retry_after),
            };
            let delay = retry_after.unwrap_or_else(|| backoff(spec, attempt));
            if attempt >= spec.max_attempts || started.elapsed() + delay > spec.max_retry_duration {
                return Outcome::Failed {
                    error,
                    status,
                    attempts: attempt,
                    retryable: true,
                };
            }
            if let Some(telemetry) = &self.telemetry {
                telemetry.action_retry(&request.action, attempt, &error, delay);
            }
            if shutdown.sleep(delay).await.is_err() {
                return Outcome::Interrupted;
            }
        }
    }

    /// Asks the backend once how a job of `action` stands (GET of the completion URL, with
    /// the action's auth, limits and Idempotency-Key).
    pub async fn poll(&self, decision: &Decision, job_id: &str, shutdown: &Shutdown) -> Poll {
        let Some(action) = self.actions.get(&decision.action) else {
            return Poll::Fault(format!(
                "action {:?} is no longer configured",
                decision.action
            ));
        };
        let Some(completion) = &action.spec.completion else {
            return Poll::Fault(format!(
                "action {:?} no longer has a [completion] to poll",
                decision.action
            ));
        };
        let mut params = decision.params.clone();
        params.insert("job_id".into(), Value::String(job_id.to_owned()));
        let url = match completion
            .url
            .render(&params)
            .and_then(|rendered| completion.url.parse_rendered(&rendered))
        {
            Ok(url) => url,
            Err(e) => return Poll::Fault(format!("cannot build the status URL: {e}")),
        };
        let request = PreparedRequest {
            action: decision.action.clone(),
            method: reqwest::Method::GET,
            url,
            idempotency_key: idempotency_key(&decision.action, &decision.key),
            headers: action.spec.headers.clone(),
            body: String::new(),
            shown_headers: Vec::new(),
        };
        match self.attempt(action, &request, shutdown).await {
            None => Poll::Interrupted,
            Some(Ok((status, body))) if status.is_success() => {
                match read_pointer(&body, &completion.status_pointer) {
                    Ok(s) if completion.done.contains(&s) => Poll::Done(s),
                    Ok(s) if completion.failed.contains(&s) => Poll::Failed(s),
                    Ok(s) => Poll::Pending(s),
                    Err(why) => Poll::Fault(format!("the status answer {why}")),
                }
            }
            Some(Ok((status, _))) => Poll::Fault(format!("the status URL answered {status}")),
            Some(Err(e)) => Poll::Fault(e.error),
        }
    }

    /// One attempt, within the action's concurrency and rate limits. `None`: shutdown came
    /// while waiting for a slot.
    async fn attempt(
        &self,
        action: &Action,
        request: &PreparedRequest,
        shutdown: &Shutdown,
    ) -> Option<Result<(reqwest::StatusCode, Vec<u8>), AttemptError>> {
        let _permit = tokio::select! {
            permit = action.in_flight.acquire() => permit.ok()?,
            _ = shutdown.triggered() => return None,
        };
        if let Some(rate) = action.spec.rate_limit_per_second {
            let slot = {
                let mut next = action.next_slot.lock().await;
                let slot = (*next).max(tokio::time::Instant::now());
                *next = slot + Duration::from_secs_f64(1.0 / rate);
                slot
            };
            tokio::select! {
                _ = tokio::time::sleep_until(slot) => {}
                _ = shutdown.triggered() => return None,
            }
        }
        let mut builder = action
            .client
            .request(request.method.clone(), request.url.clone())
            .header("Idempotency-Key", &request.idempotency_key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(request.body.clone());
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        if let Some(token) = &action.token {
            builder = builder.bearer_auth(token);
        }
        if let (Some(signing), Some(secret)) = (&action.spec.signing, &action.signing_secret) {
            let timestamp = (crate::clock::now_ms() / 1000).to_string();
            let signature = sign(secret, &timestamp, request);
            builder = builder
                .header(&signing.timestamp_header, timestamp)
                .header(&signing.signature_header, signature);
        }
        Some(match builder.send().await {
            Ok(mut response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s).min(action.spec.max_backoff));
                // Read a short answer to its end (kept when a job id or status is to be
                // read from it), so the connection goes back to the pool instead of being
                // closed; a long one is cut off.
                let keep = action.spec.completion.is_some();
                let mut body = Vec::new();
                let mut left = MAX_DRAINED_BODY;
                while let Ok(Some(chunk)) = response.chunk().await {
                    left = match left.checked_sub(chunk.len()) {
                        Some(left) => left,
                        None => break,
                    };
                    if keep {
                        body.extend_from_slice(&chunk);
                    }
                }
                match retry_after {
                    Some(retry_after)
                        if status == reqwest::StatusCode::TOO_MANY_REQUESTS
                            || status == reqwest::StatusCode::SERVICE_UNAVAILABLE =>
                    {
                        Err(AttemptError {
                            error: format!("backend answered {status}"),
                            status: Some(status.as_u16()),
                            retry_after: Some(retry_after),
                        })
                    }
                    _ => Ok((status, body)),
                }
            }
            Err(e) => Err(AttemptError {
                error: transport_error(e),
                status: None,
                retry_after: None,
            }),
        })
    }
}

/// The longest job id or status kept (a backend's answer could hold anything).
const MAX_POINTED_TEXT: usize = 256;

/// The text at a JSON pointer of an answer (a string, or a number written out), or what
/// is wrong with it.
fn read_pointer(body: &[u8], pointer: &str) -> Result<String, String> {
    let value: Value = serde_json::from_slice(body).map_err(|_| "is not JSON".to_owned())?;
    match value.pointer(pointer) {
        None | Some(Value::Null) => Err(format!("holds nothing at {pointer}")),
        Some(Value::String(s)) if s.is_empty() => {
            Err(format!("holds an empty string at {pointer}"))
        }
        Some(Value::String(s)) if s.len() > MAX_POINTED_TEXT => Err(format!(
            "holds a string of {} bytes at {pointer} (at most {MAX_POINTED_TEXT})",
            s.len()
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(_) => Err(format!(
            "holds a map, an array or a boolean at {pointer}, not a string or a number"
        )),
    }
}

/// The request signature: hex HMAC-SHA256 of `timestamp \n METHOD \n path?query \n body`.
pub fn sign(secret: &str, timestamp: &str, request: &PreparedRequest) -> String {
    use hmac::{Hmac, Mac};
    let url = &request.url;
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{timestamp}\n{}\n{path}\n{}", request.method, request.body).as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

struct AttemptError {
    error: String,
    status: Option<u16>,
    retry_after: Option<Duration>,
}

fn transport_error(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "transport error"
    };
    // Without the URL: it carries the params.
    let e = e.without_url();
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Exponential backoff with full jitter, capped.
fn backoff(spec: &ActionSpec, attempt: u32) -> Duration {
    let base = spec
        .initial_backoff
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(spec.max_backoff);
    let millis = base.as_millis().max(1) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn placeholders_are_percent_encoded_components() {
        let t = UrlTemplate::parse("https://b.example.com/v1/users/{user_id}/anonymize?c={client}")
            .unwrap();
        assert_eq!(
            t.render(&params(json!({"user_id": "u-123", "client": "a b"})))
                .unwrap(),
            "https://b.example.com/v1/users/u-123/anonymize?c=a%20b"
        );
        assert_eq!(
            t.render(&params(json!({"user_id": "../admin?x=1#", "client": 7})))
                .unwrap(),
            "https://b.example.com/v1/users/..%2Fadmin%3Fx%3D1%23/anonymize?c=7"
        );
    }

    /// A rendered URL parsed from its path on (the host parsed once) is the URL a full
    /// parse makes, for templates of every shape and any param values.
    #[test]
    fn rendered_urls_parse_as_a_full_parse_would() {
        use proptest::prelude::*;
        let template = prop_oneof![
            Just("https://b.example.com/v1/users/{id}/anonymize"),
            Just("https://b.example.com:8443/v1/{id}?c={id}&x=1"),
            Just("http://127.0.0.1:9/{id}"),
            Just("https://B.Example.com/a/./b/../{id}/"),
            Just("https://b.example.com?u={id}"),
            Just("https://b.example.com/{id}#frag"),
            Just("http://[::1]:80/{id}/%7e?q"),
        ];
        // Empty, "." and ".." are refused by `render`.
        let value = prop_oneof![Just(String::from(".x.")), any::<String>()]
            .prop_filter("a value render takes", |v| {
                !["", ".", ".."].contains(&v.as_str())
            });
        proptest!(|(template in template, value in value)| {
            let t = UrlTemplate::parse(template).unwrap();
            let rendered = t.render(&params(json!({ "id": value }))).unwrap();
            let full = reqwest::Url::parse(&rendered).unwrap();
            prop_assert_eq!(t.parse_rendered(&rendered).unwrap(), full);
        });
    }

    #[test]
    fn bad_values_are_decision_errors() {
        let t = UrlTemplate::parse("https://h/u/{id}").unwrap();
        for bad in [
            json!({}),
            json!({"id": ""}),
            json!({"id": ".."}),
            json!({"id": "."}),
            json!({"id": [1]}),
            json!({"id": {"a": 1}}),
        ] {
            assert!(t.render(&params(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_host_cannot_be_a_placeholder() {
        assert!(UrlTemplate::parse("https://{host}/x").is_err());
        assert!(UrlTemplate::parse("https://h{x}.example.com/x").is_err());
        assert!(UrlTemplate::parse("https://user@h/x").is_err());
        assert!(UrlTemplate::parse("ftp://h/x").is_err());
        assert!(UrlTemplate::parse("https://h/x/{}").is_err());
    }

    /// Placeholders that would be sent as written, not filled, are refused at start.
    #[test]
    fn placeholders_that_would_not_be_filled_are_refused() {
        let err = UrlTemplate::parse("https://h/v1/users/{user_id").unwrap_err();
        assert!(err.to_string().contains("unclosed {"), "{err}");
        let err = BodyTemplate::parse(r#"{"a": [{"{user_id}": 1}]}"#).unwrap_err();
        assert!(
            err.contains("\"{user_id}\" holds {user_id}: placeholders stand in values only"),
            "{err}"
        );
        let err = check_header("X-User", "id={user_id}").unwrap_err();
        assert!(err.contains("headers are fixed"), "{err}");
        // Braces that are no placeholder stay allowed.
        BodyTemplate::parse(r#"{"{}": "{user_id}", "a{": 1}"#).unwrap();
        check_header("X-Json", "{\"a\": 1} {} { x }").unwrap();
    }

    #[test]
    fn idempotency_key_is_sha256_of_action_newline_key() {
        assert_eq!(
            idempotency_key("anonymize_user", "r-456"),
            hex::encode(Sha256::digest(b"anonymize_user\nr-456"))
        );
    }
}
