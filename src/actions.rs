//! Backend actions: turn a rule's decision into the exact HTTP request the config allows,
//! and send it with retries.
//!
//! Separation of duties: a rule only picks an action by name and supplies params; the config
//! alone fixes the method, the host and the credentials. `{name}` placeholders may stand in
//! the path and query only, and each value becomes one fully percent-encoded component.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::shutdown::Shutdown;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rand::Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::rules::Decision;

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
    #[error("action {action:?}: cannot use ca_file {path}: {reason}")]
    CaFile {
        action: String,
        path: PathBuf,
        reason: String,
    },
    #[error("action {action:?}: cannot build HTTP client: {source}")]
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
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if authority.is_empty() || authority.contains(['{', '}', '@']) {
            return Err(err(
                "the host must be written out in full: placeholders may stand only in the path and query",
            ));
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            match c {
                '{' => {
                    let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
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

/// One configured backend action.
#[derive(Debug, Clone)]
pub struct ActionSpec {
    pub name: String,
    pub method: reqwest::Method,
    pub url: UrlTemplate,
    pub bearer_token_env: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// The `Idempotency-Key` for a decision: lowercase hex SHA-256 of `action \n key`.
pub fn idempotency_key(action: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(action.as_bytes());
    h.update(b"\n");
    h.update(key.as_bytes());
    hex::encode(h.finalize())
}

/// The exact request a decision turns into. The token is held apart so the request can be
/// printed with it redacted.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    pub action: String,
    pub method: reqwest::Method,
    pub url: String,
    pub idempotency_key: String,
    pub has_token: bool,
    pub body: String,
}

impl PreparedRequest {
    /// Headers as they are sent, with the bearer token shown as `<redacted>`.
    pub fn redacted_headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if self.has_token {
            headers.push(("Authorization", "Bearer <redacted>".to_owned()));
        }
        headers.push(("Idempotency-Key", self.idempotency_key.clone()));
        headers.push(("Content-Type", "application/json".to_owned()));
        headers
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The backend accepted it (2xx).
    Done { status: u16, attempts: u32 },
    /// The backend refused it or could not be reached after every attempt.
    Failed {
        error: String,
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
    client: reqwest::Client,
}

/// All configured actions, ready to prepare and send requests.
pub struct ActionSet {
    actions: BTreeMap<String, Action>,
}

impl ActionSet {
    /// Builds the actions. With `read_tokens`, each action's token variable must be set
    /// (the daemon); without, requests are prepared with a redacted token (dry-run).
    pub fn new(
        specs: &BTreeMap<String, ActionSpec>,
        read_tokens: bool,
    ) -> Result<Self, ActionError> {
        let mut actions = BTreeMap::new();
        for (name, spec) in specs {
            let token = match (&spec.bearer_token_env, read_tokens) {
                (Some(var), true) => {
                    Some(std::env::var(var).map_err(|_| ActionError::MissingToken {
                        action: name.clone(),
                        var: var.clone(),
                    })?)
                }
                (Some(_), false) => Some(String::new()),
                (None, _) => None,
            };
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
                    client,
                },
            );
        }
        Ok(Self { actions })
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
        let url =
            action
                .spec
                .url
                .render(&decision.params)
                .map_err(|reason| ActionError::Decision {
                    action: decision.action.clone(),
                    reason,
                })?;
        Ok(PreparedRequest {
            action: decision.action.clone(),
            method: action.spec.method.clone(),
            url,
            idempotency_key: idempotency_key(&decision.action, &decision.key),
            has_token: action.token.is_some(),
            body: Value::Object(decision.params.clone()).to_string(),
        })
    }

    /// Sends a prepared request, retrying backend faults with exponential backoff and
    /// jitter. Non-retryable refusals (4xx other than 408/429) end at once.
    pub async fn send(&self, request: &PreparedRequest, shutdown: &Shutdown) -> Outcome {
        let Some(action) = self.actions.get(&request.action) else {
            return Outcome::Failed {
                error: format!("action {:?} is no longer configured", request.action),
                attempts: 0,
                retryable: false,
            };
        };
        let spec = &action.spec;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (error, retry_after) = match self.attempt(action, request).await {
                Ok(status) if status.is_success() => {
                    return Outcome::Done {
                        status: status.as_u16(),
                        attempts: attempt,
                    }
                }
                Ok(status) => {
                    let retryable = status.is_server_error()
                        || status == reqwest::StatusCode::REQUEST_TIMEOUT
                        || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                    let error = format!("backend answered {status}");
                    if !retryable {
                        return Outcome::Failed {
                            error,
                            attempts: attempt,
                            retryable: false,
                        };
                    }
                    (error, None::<Duration>)
                }
                Err(AttemptError { error, retry_after }) => (error, retry_after),
            };
            if attempt >= spec.max_attempts {
                return Outcome::Failed {
                    error,
                    attempts: attempt,
                    retryable: true,
                };
            }
            let delay = retry_after.unwrap_or_else(|| backoff(spec, attempt));
            tracing::warn!(action = %request.action, attempt, %error, delay_ms = delay.as_millis() as u64, "action failed, retrying");
            if shutdown.sleep(delay).await.is_err() {
                return Outcome::Interrupted;
            }
        }
    }

    async fn attempt(
        &self,
        action: &Action,
        request: &PreparedRequest,
    ) -> Result<reqwest::StatusCode, AttemptError> {
        let mut builder = action
            .client
            .request(request.method.clone(), &request.url)
            .header("Idempotency-Key", &request.idempotency_key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(request.body.clone());
        if let Some(token) = &action.token {
            builder = builder.bearer_auth(token);
        }
        match builder.send().await {
            Ok(response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s).min(action.spec.max_backoff));
                if status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                {
                    if let Some(retry_after) = retry_after {
                        return Err(AttemptError {
                            error: format!("backend answered {status}"),
                            retry_after: Some(retry_after),
                        });
                    }
                }
                Ok(status)
            }
            Err(e) => Err(AttemptError {
                error: transport_error(e),
                retry_after: None,
            }),
        }
    }
}

struct AttemptError {
    error: String,
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

    #[test]
    fn idempotency_key_is_sha256_of_action_newline_key() {
        assert_eq!(
            idempotency_key("anonymize_user", "r-456"),
            hex::encode(Sha256::digest(b"anonymize_user\nr-456"))
        );
    }
}
