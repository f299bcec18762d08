//! Configuration: the TOML file and the `run` flags, resolved into one [`Settings`].
//!
//! Paths in the file resolve against the file's directory; paths given as flags resolve
//! against the working directory (the caller passes them already absolute or relative to it).
//! Unknown keys are errors. Secrets never sit in the file: an action names the environment
//! variable that holds its token.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::actions::{
    check_header, is_backend_fault, ActionSpec, BodyTemplate, Completion, Secret, Signing,
    UrlTemplate,
};
pub use crate::source::{ReadMode, StartPosition, StreamSettings};
pub use crate::state::shared::SharedSettings;

const DEFAULT_STATE_PATH: &str = "gdpr-consumer.redb";

/// Errors found while reading or resolving the configuration (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The config file as written. Every key is optional.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub stream: StreamSection,
    #[serde(default)]
    pub state: StateSection,
    #[serde(default)]
    pub rules: RulesSection,
    #[serde(default)]
    pub actions: BTreeMap<String, ActionSection>,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub console: ConsoleSection,
    #[serde(default)]
    pub coordination: CoordinationSection,
}

/// `[coordination]`: one daemon with its state file (the default), or a fleet sharing the
/// stream through DynamoDB.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinationSection {
    /// `local` (default) or `dynamodb`.
    pub kind: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub lease_table: Option<String>,
    pub state_table: Option<String>,
    /// Create both tables (on-demand) when missing.
    pub create_tables: Option<bool>,
    /// Default: the host name and the process id.
    pub worker_id: Option<String>,
    pub lease_duration_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSection {
    /// Address of the compliance console (no console unless set).
    pub listen: Option<std::net::SocketAddr>,
    /// The environment variable holding its token (required with `listen`).
    pub token_env: Option<String>,
    /// A non-loopback `listen` is refused unless this is true (put TLS in front of it).
    #[serde(default)]
    pub allow_remote: bool,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the HTTP listener for /metrics, /status, /healthz and /readyz.
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSection {
    pub name: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub start: Option<String>,
    /// Pause between GetRecords calls on a shard that is caught up.
    pub poll_interval_ms: Option<u64>,
    /// Longest pause on a shard that keeps answering nothing: the pause doubles from
    /// `poll_interval_ms` up to this, so idle shards cost little.
    pub idle_poll_interval_ms: Option<u64>,
    /// How often the shard list is refreshed to find new shards (resharding).
    pub shard_sync_interval_ms: Option<u64>,
    /// Alarm when a shard's unread records come this close to the stream's retention.
    pub retention_margin_ms: Option<u64>,
    /// Shards per ListShards page (Kinesis allows 1 to 10,000; its default is 1,000).
    pub list_shards_page_size: Option<i32>,
    /// Records one GetRecords call asks for (Kinesis allows up to 10,000).
    pub records_per_call: Option<i32>,
    /// GetRecords answers held at once over all shards, read or being handled: bounds memory.
    pub batches_in_flight: Option<usize>,
    /// Time limit of one Kinesis call (an endpoint that accepts and never answers).
    pub call_timeout_ms: Option<u64>,
    /// How shards are read: `polling` (GetRecords) or `fan-out` (SubscribeToShard).
    pub read: Option<String>,
    /// The enhanced fan-out consumer registered on the stream (fan-out mode).
    pub consumer_name: Option<String>,
    /// A subscription is renewed after this long (Kinesis ends it after five minutes).
    pub subscription_renew_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    pub path: Option<PathBuf>,
    /// File holding the secret key for the keyed hashes in the state (generated when absent).
    pub key_file: Option<PathBuf>,
    /// Environment variable holding that key as hex; wins over `key_file`.
    pub key_env: Option<String>,
    /// How long the dedup ledger remembers a request (longer than the stream's retention).
    pub ledger_retention_days: Option<u64>,
    /// How often retryable dead letters (backend faults) are retried.
    pub dead_letter_retry_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RulesSection {
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSection {
    pub method: Option<String>,
    pub url: String,
    /// JSON body with `{param}` placeholders; default: the params as a JSON object.
    pub body: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub bearer_token_env: Option<String>,
    pub bearer_token_file: Option<PathBuf>,
    /// HMAC-SHA256 request signing: the secret's variable or file, and the header names.
    pub signing_secret_env: Option<String>,
    pub signing_secret_file: Option<PathBuf>,
    pub signature_header: Option<String>,
    pub timestamp_header: Option<String>,
    #[serde(default)]
    pub allow_insecure_http: bool,
    pub ca_file: Option<PathBuf>,
    pub timeout_ms: Option<u64>,
    /// Statuses besides 2xx that mean done (e.g. 404 or 410: "already gone").
    #[serde(default)]
    pub success_statuses: Vec<u16>,
    /// 4xx statuses to retry like backend faults (e.g. 409 for "still in flight").
    #[serde(default)]
    pub retry_statuses: Vec<u16>,
    pub max_attempts: Option<u32>,
    pub initial_backoff_ms: Option<u64>,
    pub max_backoff_ms: Option<u64>,
    /// Longest a decision may be retried before it becomes a dead letter.
    pub max_retry_duration_ms: Option<u64>,
    /// Requests of this action in flight at once.
    pub concurrency: Option<usize>,
    /// Requests of this action per second.
    pub rate_limit_per_second: Option<f64>,
    /// The backend answers "accepted, job N" and deletes later: poll the job until done.
    pub completion: Option<CompletionSection>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionSection {
    /// The job's status URL (GET): `{job_id}` and the decision's params as placeholders.
    pub url: String,
    /// JSON pointer to the job id in the answer to the request (e.g. `/job/id`).
    pub job_id_pointer: String,
    /// JSON pointer to the status in the answer to a poll (e.g. `/status`).
    pub status_pointer: String,
    pub done: Vec<String>,
    #[serde(default)]
    pub failed: Vec<String>,
    pub poll_interval_ms: Option<u64>,
    pub give_up_after_ms: Option<u64>,
}

/// Flags of `run` that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub stream: Option<String>,
    pub rules_dir: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub from: Option<StartPosition>,
}

/// Everything `run` needs, resolved and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub stream: StreamSettings,
    pub state_path: PathBuf,
    pub key_file: PathBuf,
    pub key_env: Option<String>,
    /// A fleet's tables, when `[coordination] kind = "dynamodb"`; a state file otherwise.
    pub fleet: Option<SharedSettings>,
    pub ledger_retention: Duration,
    pub dead_letter_retry_interval: Duration,
    pub rules_dir: PathBuf,
    pub actions: BTreeMap<String, ActionSpec>,
    /// No listener unless set.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// No console unless set.
    pub console: Option<ConsoleSettings>,
}

/// Where the console listens, and where its token comes from (read when `run` starts).
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    pub listen: std::net::SocketAddr,
    pub token_env: String,
    /// Whether it listens beyond loopback (then behind TLS, as the docs say).
    pub remote: bool,
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// Resolves a path from the config file against the file's directory.
fn resolve(base: Option<&Path>, path: PathBuf) -> PathBuf {
    match base {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path,
    }
}

/// What `rules check` and `rules test` take from a config file: the rules dir (if set) and
/// the names of the configured actions.
pub fn rules_context(config: &Path) -> Result<(Option<PathBuf>, BTreeSet<String>), ConfigError> {
    let file = FileConfig::load(config)?;
    let base = config.parent();
    let dir = file.rules.dir.clone().map(|d| resolve(base, d));
    let actions = resolve_actions(file.actions, base)?;
    Ok((dir, actions.into_keys().collect()))
}

/// Where the state and its key are, for inspection commands (no stream or actions needed).
pub struct StateSettings {
    pub state_path: PathBuf,
    pub key_file: PathBuf,
    pub key_env: Option<String>,
    /// A fleet's tables, when `[coordination] kind = "dynamodb"`.
    pub fleet: Option<SharedSettings>,
}

/// The state file and key: the flag, else the config's, else the defaults.
pub fn state_settings(
    config: Option<&Path>,
    flag: Option<PathBuf>,
) -> Result<StateSettings, ConfigError> {
    let file = match config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let base = config.and_then(Path::parent);
    let call_timeout = Duration::from_millis(file.stream.call_timeout_ms.unwrap_or(10_000));
    resolve_state(file.state, file.coordination, flag, base, call_timeout)
}

fn resolve_state(
    section: StateSection,
    coordination: CoordinationSection,
    flag: Option<PathBuf>,
    base: Option<&Path>,
    call_timeout: Duration,
) -> Result<StateSettings, ConfigError> {
    // An empty path would name the config's directory (or a stray `.key` file there), and
    // an empty variable name can never be set.
    let empty = |key: &str| {
        ConfigError::Invalid(format!(
            "{key} is empty: remove it for the default, or name a file"
        ))
    };
    if flag.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        return Err(empty("--state"));
    }
    if section
        .path
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return Err(empty("[state] path"));
    }
    if section
        .key_file
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return Err(empty("[state] key_file"));
    }
    if section.key_env.as_ref().is_some_and(|v| v.is_empty()) {
        return Err(ConfigError::Invalid(
            "[state] key_env is empty: remove it to use key_file, or name an environment variable"
                .into(),
        ));
    }
    let state_path = flag
        .or_else(|| section.path.map(|p| resolve(base, p)))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_PATH));
    let key_file = section
        .key_file
        .map(|p| resolve(base, p))
        .unwrap_or_else(|| {
            let mut name = state_path.clone().into_os_string();
            name.push(".key");
            PathBuf::from(name)
        });
    let fleet = resolve_coordination(coordination, section.key_env.as_deref(), call_timeout)?;
    Ok(StateSettings {
        state_path,
        key_file,
        key_env: section.key_env,
        fleet,
    })
}

/// A DynamoDB table name: 3 to 255 letters, digits, `_`, `-` or `.`.
fn table_name(key: &str, name: Option<String>, default: &str) -> Result<String, ConfigError> {
    let name = name.unwrap_or_else(|| default.to_owned());
    let valid = (3..=255).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !valid {
        return Err(ConfigError::Invalid(format!(
            "[coordination] {key} = {name:?}: 3 to 255 letters, digits, '_', '-' or '.'"
        )));
    }
    Ok(name)
}

/// The host name and process id: unique among running workers, new at each start.
fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!("{host}-{}", std::process::id())
}

fn resolve_coordination(
    section: CoordinationSection,
    key_env: Option<&str>,
    call_timeout: Duration,
) -> Result<Option<SharedSettings>, ConfigError> {
    match section.kind.as_deref().unwrap_or("local") {
        "local" => {
            let set = section.region.is_some()
                || section.endpoint_url.is_some()
                || section.lease_table.is_some()
                || section.state_table.is_some()
                || section.create_tables.is_some()
                || section.worker_id.is_some()
                || section.lease_duration_ms.is_some();
            if set {
                return Err(ConfigError::Invalid(
                    "[coordination] settings are only read with kind = \"dynamodb\": set it, or remove them".into(),
                ));
            }
            return Ok(None);
        }
        "dynamodb" => {}
        other => {
            return Err(ConfigError::Invalid(format!(
                "[coordination] kind = {other:?}: expected \"local\" or \"dynamodb\""
            )))
        }
    }
    if key_env.is_none() {
        return Err(ConfigError::Invalid(
            "[coordination] kind = \"dynamodb\" needs [state] key_env: every worker must share the state's key (set the same variable on each host)".into(),
        ));
    }
    let lease_table = table_name("lease_table", section.lease_table, "gdpr-consumer")?;
    let state_table = table_name("state_table", section.state_table, "gdpr-consumer-state")?;
    if lease_table == state_table {
        return Err(ConfigError::Invalid(format!(
            "[coordination] lease_table and state_table are both {lease_table:?}: they must be two tables"
        )));
    }
    let worker_id = match section.worker_id {
        Some(id)
            if id.trim().is_empty()
                || id.len() > 128
                || id.chars().any(char::is_control)
                || id.starts_with(crate::state::shared::COMMAND_PREFIX) =>
        {
            return Err(ConfigError::Invalid(format!(
                "[coordination] worker_id = {id:?}: 1 to 128 printable characters, not starting with \"command-\" (the commands' own)"
            )))
        }
        Some(id) => id,
        None => default_worker_id(),
    };
    let lease_duration = match section.lease_duration_ms.unwrap_or(10_000) {
        ms if !(1_000..=600_000).contains(&ms) => {
            return Err(ConfigError::Invalid(format!(
                "[coordination] lease_duration_ms = {ms} is not between 1000 and 600000"
            )))
        }
        ms => Duration::from_millis(ms),
    };
    if section
        .endpoint_url
        .as_ref()
        .is_some_and(|u| u.trim().is_empty())
    {
        return Err(ConfigError::Invalid(
            "[coordination] endpoint_url is empty: remove it for the AWS default, or name a URL"
                .into(),
        ));
    }
    Ok(Some(SharedSettings {
        region: section.region,
        endpoint_url: section.endpoint_url,
        state_table,
        lease_table,
        create_tables: section.create_tables.unwrap_or(false),
        worker_id,
        lease_duration,
        call_timeout,
    }))
}

fn resolve_actions(
    actions: BTreeMap<String, ActionSection>,
    base: Option<&Path>,
) -> Result<BTreeMap<String, ActionSpec>, ConfigError> {
    actions
        .into_iter()
        .map(|(name, raw)| {
            let spec = resolve_action(&name, raw, base)?;
            Ok((name, spec))
        })
        .collect()
}

fn resolve_action(
    name: &str,
    raw: ActionSection,
    base: Option<&Path>,
) -> Result<ActionSpec, ConfigError> {
    let invalid = |msg: String| ConfigError::Invalid(format!("[actions.{name}]: {msg}"));
    let method = raw.method.unwrap_or_else(|| "POST".into()).to_uppercase();
    let method = METHODS
        .into_iter()
        .find(|m| m.as_str() == method)
        .ok_or_else(|| {
            invalid(format!(
                "method {method:?} is not one of GET, POST, PUT, PATCH, DELETE"
            ))
        })?;
    let url = UrlTemplate::parse(&raw.url).map_err(|e| invalid(e.to_string()))?;
    if url.is_insecure() && !raw.allow_insecure_http {
        return Err(invalid(format!(
            "url {:?} is http://; set allow_insecure_http = true to allow it (local testing only)",
            raw.url
        )));
    }
    let max_attempts = raw.max_attempts.unwrap_or(5);
    if max_attempts == 0 {
        return Err(invalid("max_attempts must be at least 1".into()));
    }
    let body = raw
        .body
        .as_deref()
        .map(BodyTemplate::parse)
        .transpose()
        .map_err(|e| invalid(format!("body: {e}")))?;
    let headers = raw
        .headers
        .into_iter()
        .map(|(name, value)| check_header(&name, &value).map(|()| (name, value)))
        .collect::<Result<Vec<_>, String>>()
        .map_err(invalid)?;
    let secret = |env: Option<String>, file: Option<PathBuf>, what: &str| match (env, file) {
        (Some(_), Some(_)) => Err(invalid(format!("set {what}_env or {what}_file, not both"))),
        (Some(var), None) => Ok(Some(Secret::Env(var))),
        (None, Some(path)) => Ok(Some(Secret::File(resolve(base, path)))),
        (None, None) => Ok(None),
    };
    let bearer_token = secret(raw.bearer_token_env, raw.bearer_token_file, "bearer_token")?;
    let signing_secret = secret(
        raw.signing_secret_env,
        raw.signing_secret_file,
        "signing_secret",
    )?;
    let signature_header = raw.signature_header.unwrap_or_else(|| "X-Signature".into());
    let timestamp_header = raw
        .timestamp_header
        .unwrap_or_else(|| "X-Signature-Timestamp".into());
    check_header(&signature_header, "x").map_err(invalid)?;
    check_header(&timestamp_header, "x").map_err(invalid)?;
    if let Some(bad) = raw
        .success_statuses
        .iter()
        .find(|s| !(100..600).contains(*s))
    {
        return Err(invalid(format!(
            "success_statuses: {bad} is not an HTTP status"
        )));
    }
    if let Some(fault) = raw.success_statuses.iter().find(|s| is_backend_fault(**s)) {
        return Err(invalid(format!(
            "success_statuses: {fault} is a backend fault (5xx, 408, 429), retried: as a success, an outage would mark requests done"
        )));
    }
    if let Some(bad) = raw.retry_statuses.iter().find(|s| !(400..500).contains(*s)) {
        return Err(invalid(format!(
            "retry_statuses: {bad} is not a 4xx status (5xx are always retried)"
        )));
    }
    if let Some(both) = raw
        .retry_statuses
        .iter()
        .find(|s| raw.success_statuses.contains(s))
    {
        return Err(invalid(format!(
            "{both} is in both success_statuses and retry_statuses"
        )));
    }
    if let Some(bad) = raw
        .success_statuses
        .iter()
        .find(|s| (100..200).contains(*s) || (300..400).contains(*s))
    {
        return Err(invalid(format!(
            "success_statuses: {bad} cannot mean done (an informational or redirect answer carried nothing out); list 2xx or 4xx statuses"
        )));
    }
    if raw.timeout_ms == Some(0) {
        return Err(invalid("timeout_ms must be at least 1".into()));
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(10_000);
    let max_retry_duration_ms = raw.max_retry_duration_ms.unwrap_or(120_000);
    if timeout_ms > max_retry_duration_ms {
        return Err(invalid(format!(
            "timeout_ms = {timeout_ms} is longer than max_retry_duration_ms = {max_retry_duration_ms}: an attempt cannot outlast the retry budget"
        )));
    }
    let initial_backoff_ms = raw.initial_backoff_ms.unwrap_or(200);
    let max_backoff_ms = raw.max_backoff_ms.unwrap_or(30_000);
    if initial_backoff_ms == 0 {
        return Err(invalid("initial_backoff_ms must be at least 1".into()));
    }
    if max_backoff_ms == 0 {
        return Err(invalid("max_backoff_ms must be at least 1".into()));
    }
    if initial_backoff_ms > max_backoff_ms {
        return Err(invalid(format!(
            "initial_backoff_ms = {initial_backoff_ms} is above max_backoff_ms = {max_backoff_ms}"
        )));
    }
    if raw.concurrency == Some(0) {
        return Err(invalid("concurrency must be at least 1".into()));
    }
    if raw
        .rate_limit_per_second
        .is_some_and(|r| r.is_nan() || r <= 0.0)
    {
        return Err(invalid("rate_limit_per_second must be above 0".into()));
    }
    let completion = raw
        .completion
        .map(|c| resolve_completion(c, raw.allow_insecure_http))
        .transpose()
        .map_err(|e| invalid(format!("completion: {e}")))?;
    Ok(ActionSpec {
        method,
        url,
        body,
        headers,
        bearer_token,
        signing: signing_secret.map(|secret| Signing {
            secret,
            signature_header,
            timestamp_header,
        }),
        ca_file: raw.ca_file.map(|p| resolve(base, p)),
        timeout: Duration::from_millis(timeout_ms),
        success_statuses: raw.success_statuses,
        retry_statuses: raw.retry_statuses,
        max_attempts,
        initial_backoff: Duration::from_millis(initial_backoff_ms),
        max_backoff: Duration::from_millis(max_backoff_ms),
        max_retry_duration: Duration::from_millis(max_retry_duration_ms),
        concurrency: raw.concurrency.unwrap_or(8),
        rate_limit_per_second: raw.rate_limit_per_second,
        completion,
    })
}

fn resolve_completion(
    raw: CompletionSection,
    allow_insecure_http: bool,
) -> Result<Completion, String> {
    let url = UrlTemplate::parse(&raw.url).map_err(|e| e.to_string())?;
    if url.is_insecure() && !allow_insecure_http {
        return Err(format!(
            "url {:?} is plain http: a job's status would travel unencrypted (set allow_insecure_http = true in the action for local testing only)",
            raw.url
        ));
    }
    for (name, pointer) in [
        ("job_id_pointer", &raw.job_id_pointer),
        ("status_pointer", &raw.status_pointer),
    ] {
        if !pointer.starts_with('/') {
            return Err(format!(
                "{name} = {pointer:?} is not a JSON pointer (it starts with /, e.g. \"/job/id\")"
            ));
        }
    }
    if raw.done.is_empty() {
        return Err("done lists no status: a job could never finish".into());
    }
    if raw.done.iter().chain(&raw.failed).any(|s| s.is_empty()) {
        return Err("done and failed list statuses, and \"\" is none".into());
    }
    if let Some(both) = raw.done.iter().find(|s| raw.failed.contains(s)) {
        return Err(format!("{both:?} is in both done and failed"));
    }
    let poll_interval_ms = raw.poll_interval_ms.unwrap_or(60_000);
    if poll_interval_ms < 100 {
        return Err(format!(
            "poll_interval_ms = {poll_interval_ms} is below 100"
        ));
    }
    let give_up_after_ms = raw.give_up_after_ms.unwrap_or(7 * 24 * 3600 * 1000);
    if give_up_after_ms < 1000 {
        return Err(format!(
            "give_up_after_ms = {give_up_after_ms} is below 1000"
        ));
    }
    if give_up_after_ms < poll_interval_ms {
        return Err(format!(
            "give_up_after_ms = {give_up_after_ms} is below poll_interval_ms = {poll_interval_ms}: the job would be given up before its first poll"
        ));
    }
    Ok(Completion {
        url,
        job_id_pointer: raw.job_id_pointer,
        status_pointer: raw.status_pointer,
        done: raw.done,
        failed: raw.failed,
        poll_interval: Duration::from_millis(poll_interval_ms),
        give_up_after: Duration::from_millis(give_up_after_ms),
    })
}

/// The methods an action may use: a typo (`GETT`) would otherwise be sent as written.
const METHODS: [reqwest::Method; 5] = [
    reqwest::Method::GET,
    reqwest::Method::POST,
    reqwest::Method::PUT,
    reqwest::Method::PATCH,
    reqwest::Method::DELETE,
];

/// The actions of a config file (for `preview`, which needs no stream).
pub fn action_specs(config: &Path) -> Result<BTreeMap<String, ActionSpec>, ConfigError> {
    let file = FileConfig::load(config)?;
    resolve_actions(file.actions, config.parent())
}

/// Only the stream part of the config (for `capture` and `rules diff`, which need no actions).
pub fn stream_settings(
    config: Option<&Path>,
    stream: Option<String>,
    from: Option<StartPosition>,
) -> Result<StreamSettings, ConfigError> {
    let file = match config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    resolve_stream(file.stream, stream, from)
}

fn resolve_stream(
    section: StreamSection,
    name: Option<String>,
    from: Option<StartPosition>,
) -> Result<StreamSettings, ConfigError> {
    let name = name.or(section.name).ok_or_else(|| {
        ConfigError::Invalid("no stream name: set [stream] name or pass --stream".into())
    })?;
    let start = match from {
        Some(start) => start,
        None => match section.start {
            Some(s) => s
                .parse()
                .map_err(|e: String| ConfigError::Invalid(format!("[stream] start: {e}")))?,
            None => StartPosition::TrimHorizon,
        },
    };
    let poll_ms = match section.poll_interval_ms.unwrap_or(1_000) {
        ms if ms < MIN_POLL_INTERVAL_MS => {
            return Err(ConfigError::Invalid(format!(
                "[stream] poll_interval_ms = {ms} is below {MIN_POLL_INTERVAL_MS}: Kinesis serves 5 GetRecords calls a second per shard"
            )))
        }
        ms => ms,
    };
    Ok(StreamSettings {
        name,
        region: section.region,
        endpoint_url: section.endpoint_url,
        start,
        poll_interval: Duration::from_millis(poll_ms),
        idle_poll_interval: match section.idle_poll_interval_ms.unwrap_or(5_000.max(poll_ms)) {
            ms if ms < poll_ms => {
                return Err(ConfigError::Invalid(format!(
                    "[stream] idle_poll_interval_ms = {ms} is below poll_interval_ms = {poll_ms}"
                )))
            }
            // A shard iterator expires after 5 minutes unused.
            ms if ms > 240_000 => {
                return Err(ConfigError::Invalid(format!(
                    "[stream] idle_poll_interval_ms = {ms} is above 240000 (four minutes): Kinesis lets a shard iterator expire after five"
                )))
            }
            ms => Duration::from_millis(ms),
        },
        shard_sync_interval: at_least_a_second(
            "[stream] shard_sync_interval_ms",
            section.shard_sync_interval_ms.unwrap_or(30_000),
        )?,
        retention_margin: Duration::from_millis(
            section.retention_margin_ms.unwrap_or(6 * 3600 * 1000),
        ),
        list_shards_page_size: match section.list_shards_page_size {
            Some(size) if !(1..=10_000).contains(&size) => {
                return Err(ConfigError::Invalid(format!(
                    "[stream] list_shards_page_size: {size} is not between 1 and 10000"
                )))
            }
            size => size,
        },
        records_per_call: match section.records_per_call.unwrap_or(DEFAULT_RECORDS_PER_CALL) {
            size if !(1..=10_000).contains(&size) => {
                return Err(ConfigError::Invalid(format!(
                    "[stream] records_per_call: {size} is not between 1 and 10000"
                )))
            }
            size => size,
        },
        batches_in_flight: match section
            .batches_in_flight
            .unwrap_or(DEFAULT_BATCHES_IN_FLIGHT)
        {
            0 => {
                return Err(ConfigError::Invalid(
                    "[stream] batches_in_flight must be at least 1".into(),
                ))
            }
            n => n,
        },
        call_timeout: match section.call_timeout_ms.unwrap_or(10_000) {
            ms if ms < 100 => {
                return Err(ConfigError::Invalid(format!(
                    "[stream] call_timeout_ms = {ms} is below 100"
                )))
            }
            ms => Duration::from_millis(ms),
        },
        read: match section.read.as_deref() {
            None | Some("polling") => ReadMode::Polling,
            Some("fan-out") => ReadMode::FanOut,
            Some(other) => {
                return Err(ConfigError::Invalid(format!(
                    "[stream] read = {other:?}: expected \"polling\" or \"fan-out\""
                )))
            }
        },
        consumer_name: match section.consumer_name {
            None => "gdpr-consumer".to_owned(),
            // Kinesis's own rule for a consumer name.
            Some(name)
                if (1..=128).contains(&name.len())
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) =>
            {
                name
            }
            Some(name) => {
                return Err(ConfigError::Invalid(format!(
                    "[stream] consumer_name = {name:?}: 1 to 128 letters, digits, '_', '.' or '-'"
                )))
            }
        },
        subscription_renew: match section.subscription_renew_ms.unwrap_or(290_000) {
            ms if !(1_000..=300_000).contains(&ms) => {
                return Err(ConfigError::Invalid(format!(
                    "[stream] subscription_renew_ms = {ms} is not between 1000 and 300000 (Kinesis ends a subscription after five minutes)"
                )))
            }
            ms => Duration::from_millis(ms),
        },
    })
}

/// An interval under a second would make the daemon call its backend or Kinesis in a
/// loop; refused.
fn resolve_console(section: ConsoleSection) -> Result<Option<ConsoleSettings>, ConfigError> {
    let Some(listen) = section.listen else {
        if section.token_env.is_some() || section.allow_remote {
            return Err(ConfigError::Invalid(
                "[console] has no listen address: set [console] listen to start the console, or remove the section".into(),
            ));
        }
        return Ok(None);
    };
    let Some(token_env) = section.token_env.filter(|name| !name.is_empty()) else {
        return Err(ConfigError::Invalid(
            "[console] token_env is required with [console] listen: name the environment variable that holds the console's token".into(),
        ));
    };
    if !listen.ip().is_loopback() && !section.allow_remote {
        return Err(ConfigError::Invalid(format!(
            "[console] listen = \"{listen}\" is not a loopback address: set [console] allow_remote = true to allow it, and put TLS in front of it (see docs/operations.md)"
        )));
    }
    Ok(Some(ConsoleSettings {
        listen,
        token_env,
        remote: !listen.ip().is_loopback(),
    }))
}

fn at_least_a_second(key: &str, ms: u64) -> Result<Duration, ConfigError> {
    if ms < 1_000 {
        return Err(ConfigError::Invalid(format!(
            "{key} = {ms} is below 1000 (one second)"
        )));
    }
    Ok(Duration::from_millis(ms))
}

/// Kinesis serves 5 GetRecords calls a second per shard: polling faster only burns CPU
/// (at 0, 16% of a core per idle shard) on throttled calls.
const MIN_POLL_INTERVAL_MS: u64 = 200;

/// 2,500 records of up to 1.3 KB, 5 calls a second, read 16 MB/s from a shard: more than
/// the 2 MB/s Kinesis serves, in answers a quarter the size of the largest.
const DEFAULT_RECORDS_PER_CALL: i32 = 2_500;
/// Six answers of 2,500 records (about 40 MB with their decoded records) keep two cores
/// busy while the daemon's memory stays flat however many shards it reads.
const DEFAULT_BATCHES_IN_FLIGHT: usize = 6;

impl Settings {
    /// Reads the config file (if any) and applies the flags on top of it.
    pub fn resolve(config: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let file = match config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let base = config.and_then(Path::parent);

        let stream = resolve_stream(file.stream, overrides.stream, overrides.from)?;
        let ledger_retention_days = file.state.ledger_retention_days.unwrap_or(400);
        let dead_letter_retry_interval_ms =
            file.state.dead_letter_retry_interval_ms.unwrap_or(60_000);
        let StateSettings {
            state_path,
            key_file,
            key_env,
            fleet,
        } = resolve_state(
            file.state,
            file.coordination,
            overrides.state,
            base,
            stream.call_timeout,
        )?;
        let rules_dir = overrides
            .rules_dir
            .or_else(|| file.rules.dir.map(|p| resolve(base, p)))
            .unwrap_or_else(|| PathBuf::from("rules"));

        let actions = resolve_actions(file.actions, base)?;
        if actions.is_empty() {
            return Err(ConfigError::Invalid(
                "no actions configured: add an [actions.NAME] section".into(),
            ));
        }

        Ok(Settings {
            stream,
            state_path,
            key_file,
            key_env,
            fleet,
            ledger_retention: Duration::from_secs(ledger_retention_days * 24 * 3600),
            dead_letter_retry_interval: at_least_a_second(
                "[state] dead_letter_retry_interval_ms",
                dead_letter_retry_interval_ms,
            )?,
            rules_dir,
            actions,
            metrics_listen: file.metrics.listen,
            console: resolve_console(file.console)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST_USER_CONFIG: &str = r#"
[stream]
name = "client-events"
endpoint_url = "http://127.0.0.1:4567"   # optional; otherwise the standard AWS chain decides
region = "us-east-1"                     # optional; otherwise the standard AWS chain decides
start = "trim-horizon"                   # or "latest", or an RFC 3339 time

[state]
path = "gdpr-consumer.redb"

[rules]
dir = "rules"

[actions.anonymize_user]
method = "POST"
url = "https://backend.example.com/v1/users/{user_id}/anonymize"   # {name} = a decision param, percent-encoded
bearer_token_env = "BACKEND_TOKEN"        # the token is read from this environment variable
# allow_insecure_http = true              # needed for an http:// URL (local testing only)
"#;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn first_user_config_works_as_written() {
        let (dir, path) = write(FIRST_USER_CONFIG);
        let s = Settings::resolve(Some(&path), Overrides::default()).unwrap();
        assert_eq!(s.stream.name, "client-events");
        assert_eq!(s.stream.start, StartPosition::TrimHorizon);
        assert_eq!(s.state_path, dir.path().join("gdpr-consumer.redb"));
        assert_eq!(s.key_file, dir.path().join("gdpr-consumer.redb.key"));
        assert_eq!(s.rules_dir, dir.path().join("rules"));
        assert_eq!(s.actions["anonymize_user"].method, reqwest::Method::POST);
    }

    #[test]
    fn flags_override_the_file() {
        let (_dir, path) = write(FIRST_USER_CONFIG);
        let s = Settings::resolve(
            Some(&path),
            Overrides {
                stream: Some("other".into()),
                rules_dir: Some("r2".into()),
                state: Some("s2.redb".into()),
                from: Some(StartPosition::Latest),
            },
        )
        .unwrap();
        assert_eq!(s.stream.name, "other");
        assert_eq!(s.rules_dir, PathBuf::from("r2"));
        assert_eq!(s.state_path, PathBuf::from("s2.redb"));
        assert_eq!(s.stream.start, StartPosition::Latest);
    }

    #[test]
    fn unknown_keys_and_insecure_urls_are_errors() {
        let (_d, path) = write("[stream]\nname = \"s\"\nshards = 4\n");
        let err = Settings::resolve(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("shards"), "{err}");

        let (_d, path) = write("[stream]\nname = \"s\"\n[actions.a]\nurl = \"http://h/x/{id}\"\n");
        let err = Settings::resolve(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("allow_insecure_http"), "{err}");
    }

    #[test]
    fn read_sizes_have_defaults_and_bounds() {
        let (_d, path) = write(FIRST_USER_CONFIG);
        let s = Settings::resolve(Some(&path), Overrides::default()).unwrap();
        assert_eq!(s.stream.records_per_call, DEFAULT_RECORDS_PER_CALL);
        assert_eq!(s.stream.batches_in_flight, DEFAULT_BATCHES_IN_FLIGHT);
        for (line, wanted) in [
            (
                "records_per_call = 0",
                "records_per_call: 0 is not between 1 and 10000",
            ),
            ("records_per_call = 10001", "is not between 1 and 10000"),
            (
                "batches_in_flight = 0",
                "batches_in_flight must be at least 1",
            ),
            ("read = \"push\"", "[stream] read = \"push\": expected"),
            (
                "consumer_name = \"a b\"",
                "[stream] consumer_name = \"a b\"",
            ),
            (
                "subscription_renew_ms = 300001",
                "[stream] subscription_renew_ms = 300001 is not between",
            ),
        ] {
            let config =
                format!("[stream]\nname = \"s\"\n{line}\n[actions.a]\nurl = \"https://h/x\"\n");
            let (_d, path) = write(&config);
            let err = Settings::resolve(Some(&path), Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(wanted), "{line}: {err}");
        }
    }

    /// Settings that would lose requests, loop, or send what was not meant: refused at
    /// start, naming the key.
    #[test]
    fn settings_that_cannot_work_are_refused_naming_the_key() {
        for (stream, state, action, wanted) in [
            (
                "shard_sync_interval_ms = 999",
                "",
                "",
                "[stream] shard_sync_interval_ms = 999",
            ),
            (
                "",
                "dead_letter_retry_interval_ms = 10",
                "",
                "[state] dead_letter_retry_interval_ms = 10",
            ),
            (
                "",
                "",
                "timeout_ms = 0",
                "[actions.a]: timeout_ms must be at least 1",
            ),
            (
                "",
                "",
                "retry_statuses = [503]",
                "retry_statuses: 503 is not a 4xx",
            ),
            (
                "",
                "",
                "retry_statuses = [409]\nsuccess_statuses = [409]",
                "409 is in both",
            ),
            (
                "poll_interval_ms = 199",
                "",
                "",
                "[stream] poll_interval_ms = 199 is below 200",
            ),
            (
                "poll_interval_ms = 0",
                "",
                "",
                "[stream] poll_interval_ms = 0 is below 200",
            ),
            (
                "poll_interval_ms = 500\nidle_poll_interval_ms = 499",
                "",
                "",
                "[stream] idle_poll_interval_ms = 499 is below poll_interval_ms = 500",
            ),
            (
                "idle_poll_interval_ms = 999",
                "",
                "",
                "[stream] idle_poll_interval_ms = 999 is below poll_interval_ms = 1000",
            ),
            (
                "",
                "",
                "timeout_ms = 60001\nmax_retry_duration_ms = 60000",
                "[actions.a]: timeout_ms = 60001 is longer than max_retry_duration_ms = 60000",
            ),
            (
                "",
                "",
                "max_retry_duration_ms = 5000",
                "timeout_ms = 10000 is longer than max_retry_duration_ms = 5000",
            ),
            (
                "",
                "",
                "initial_backoff_ms = 0",
                "[actions.a]: initial_backoff_ms must be at least 1",
            ),
            (
                "",
                "",
                "max_backoff_ms = 0",
                "[actions.a]: max_backoff_ms must be at least 1",
            ),
            (
                "",
                "",
                "initial_backoff_ms = 501\nmax_backoff_ms = 500",
                "initial_backoff_ms = 501 is above max_backoff_ms = 500",
            ),
            (
                "",
                "",
                "success_statuses = [404, 503]",
                "success_statuses: 503 is a backend fault",
            ),
            (
                "",
                "",
                "success_statuses = [301]",
                "success_statuses: 301 cannot mean done",
            ),
            (
                "",
                "",
                "success_statuses = [408]",
                "success_statuses: 408 is a backend fault",
            ),
            (
                "",
                "",
                "success_statuses = [429]",
                "success_statuses: 429 is a backend fault",
            ),
            (
                "",
                "",
                "method = \"GETT\"",
                "method \"GETT\" is not one of GET, POST, PUT, PATCH, DELETE",
            ),
            (
                "",
                "",
                "method = \"CONNECT\"",
                "method \"CONNECT\" is not one of",
            ),
            (
                "",
                "",
                "body = '{\"{user_id}\":1}'",
                "[actions.a]: body: the key \"{user_id}\" holds {user_id}",
            ),
            (
                "",
                "",
                "headers = {\"X-User\"=\"{user_id}\"}",
                "[actions.a]: header X-User: the value holds {user_id}, but headers are fixed",
            ),
            ("", "path = \"\"", "", "[state] path is empty"),
            ("", "key_file = \"\"", "", "[state] key_file is empty"),
            ("", "key_env = \"\"", "", "[state] key_env is empty"),
        ] {
            let config = format!(
                "[stream]\nname = \"s\"\n{stream}\n[state]\n{state}\n[actions.a]\nurl = \"https://h/x\"\n{action}\n"
            );
            let (_d, path) = write(&config);
            let err = Settings::resolve(Some(&path), Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(wanted), "{wanted}: {err}");
        }
        let (_d, path) = write("[stream]\nname = \"s\"\n[actions.a]\nurl = \"https://h/x#{id}\"\n");
        let err = Settings::resolve(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("fragment"), "{err}");
        let (_d, path) = write("[stream]\nname = \"s\"\n[actions.a]\nurl = \"https://h/x?a={id}#top\"\nretry_statuses = [409]\n");
        Settings::resolve(Some(&path), Overrides::default()).unwrap();
        let (_d, path) =
            write("[stream]\nname = \"s\"\n[actions.a]\nurl = \"https://h/x/{user_id\"\n");
        let err = Settings::resolve(Some(&path), Overrides::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("[actions.a]: invalid url template \"https://h/x/{user_id\": unclosed {"),
            "{err}"
        );
        // The edges of each range are accepted; the method in any case, as before.
        let (_d, path) = write("[stream]\nname = \"s\"\npoll_interval_ms = 200\n[actions.a]\nurl = \"https://h/x\"\nmethod = \"patch\"\ntimeout_ms = 5000\nmax_retry_duration_ms = 5000\ninitial_backoff_ms = 7\nmax_backoff_ms = 7\nsuccess_statuses = [404, 410, 499]\n");
        let s = Settings::resolve(Some(&path), Overrides::default()).unwrap();
        assert_eq!(s.stream.poll_interval, Duration::from_millis(200));
        assert_eq!(s.stream.idle_poll_interval, Duration::from_millis(5_000));
        assert_eq!(s.stream.read, ReadMode::Polling);
        assert_eq!(s.stream.consumer_name, "gdpr-consumer");
        assert_eq!(s.stream.subscription_renew, Duration::from_millis(290_000));
        // A poll interval above the idle default raises the default with it.
        let (_d8, slow) = write(
            "[stream]\nname = \"s\"\npoll_interval_ms = 8000\n[actions.a]\nurl = \"https://h/x\"\n",
        );
        let slow = Settings::resolve(Some(&slow), Overrides::default()).unwrap();
        assert_eq!(slow.stream.idle_poll_interval, Duration::from_millis(8_000));
        assert_eq!(s.actions["a"].method, reqwest::Method::PATCH);
        let err = state_settings(Some(&path), Some(PathBuf::new()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("--state is empty"), "{err}");
    }

    #[test]
    fn a_fleet_config_that_cannot_work_is_refused_naming_the_key() {
        let base = "[stream]\nname = \"s\"\n[actions.a]\nurl = \"https://b.example.com/{id}\"\n";
        let resolve = |state: &str, coordination: &str| {
            let (_dir, path) = write(&format!(
                "{base}[state]\n{state}\n[coordination]\n{coordination}\n"
            ));
            Settings::resolve(Some(&path), Overrides::default())
        };
        let key = "key_env = \"K\"";
        for (state, coordination, wanted) in [
            ("", "kind = \"dynamodb\"", "needs [state] key_env"),
            (key, "kind = \"etcd\"", "kind = \"etcd\""),
            (
                "",
                "lease_table = \"t\"",
                "only read with kind = \"dynamodb\"",
            ),
            (
                key,
                "kind = \"dynamodb\"\nlease_duration_ms = 999",
                "lease_duration_ms = 999",
            ),
            (
                key,
                "kind = \"dynamodb\"\nlease_table = \"a b\"",
                "lease_table = \"a b\"",
            ),
            (
                key,
                "kind = \"dynamodb\"\nlease_table = \"same\"\nstate_table = \"same\"",
                "must be two tables",
            ),
            (key, "kind = \"dynamodb\"\nworker_id = \" \"", "worker_id"),
            (
                key,
                "kind = \"dynamodb\"\nendpoint_url = \"\"",
                "endpoint_url is empty",
            ),
        ] {
            let err = resolve(state, coordination).unwrap_err().to_string();
            assert!(err.contains(wanted), "{coordination}: {err}");
        }
        let fleet = resolve(key, "kind = \"dynamodb\"").unwrap().fleet.unwrap();
        assert_eq!(fleet.lease_table, "gdpr-consumer");
        assert_eq!(fleet.state_table, "gdpr-consumer-state");
        assert_eq!(fleet.lease_duration, Duration::from_secs(10));
        assert!(!fleet.create_tables);
        assert!(fleet
            .worker_id
            .ends_with(&format!("-{}", std::process::id())));
        assert!(resolve("", "").unwrap().fleet.is_none());
    }

    /// Every key the code accepts is in the operations guide's reference table (the other
    /// direction is an integration test: the table's examples make a valid config).
    #[test]
    fn every_key_is_documented() {
        // Struct literals without `..`: a new field fails to compile until it is listed here.
        let full = FileConfig {
            stream: StreamSection {
                name: Some("s".into()),
                region: Some("r".into()),
                endpoint_url: Some("u".into()),
                start: Some("latest".into()),
                poll_interval_ms: Some(1),
                idle_poll_interval_ms: Some(1),
                shard_sync_interval_ms: Some(1),
                retention_margin_ms: Some(1),
                list_shards_page_size: Some(1),
                records_per_call: Some(1),
                batches_in_flight: Some(1),
                call_timeout_ms: Some(1000),
                read: Some("fan-out".into()),
                consumer_name: Some("c".into()),
                subscription_renew_ms: Some(1000),
            },
            state: StateSection {
                path: Some("p".into()),
                key_file: Some("k".into()),
                key_env: Some("E".into()),
                ledger_retention_days: Some(1),
                dead_letter_retry_interval_ms: Some(1),
            },
            rules: RulesSection {
                dir: Some("d".into()),
            },
            actions: BTreeMap::from([(
                "NAME".to_owned(),
                ActionSection {
                    method: Some("POST".into()),
                    url: "https://h/x".into(),
                    body: Some("{}".into()),
                    headers: BTreeMap::from([("X-A".to_owned(), "b".to_owned())]),
                    bearer_token_env: Some("T".into()),
                    bearer_token_file: Some("t".into()),
                    signing_secret_env: Some("S".into()),
                    signing_secret_file: Some("s".into()),
                    signature_header: Some("X-S".into()),
                    timestamp_header: Some("X-T".into()),
                    allow_insecure_http: false,
                    ca_file: Some("c".into()),
                    timeout_ms: Some(1),
                    success_statuses: vec![410],
                    retry_statuses: vec![409],
                    max_attempts: Some(1),
                    initial_backoff_ms: Some(1),
                    max_backoff_ms: Some(1),
                    max_retry_duration_ms: Some(1),
                    concurrency: Some(1),
                    rate_limit_per_second: Some(1.0),
                    completion: Some(CompletionSection {
                        url: "https://h/jobs/{job_id}".into(),
                        job_id_pointer: "/id".into(),
                        status_pointer: "/status".into(),
                        done: vec!["done".into()],
                        failed: vec!["failed".into()],
                        poll_interval_ms: Some(1000),
                        give_up_after_ms: Some(1000),
                    }),
                },
            )]),
            metrics: MetricsSection {
                listen: Some("127.0.0.1:1".parse().unwrap()),
            },
            coordination: CoordinationSection {
                kind: Some("dynamodb".into()),
                region: Some("r".into()),
                endpoint_url: Some("u".into()),
                lease_table: Some("l".into()),
                state_table: Some("s".into()),
                create_tables: Some(true),
                worker_id: Some("w".into()),
                lease_duration_ms: Some(1000),
            },
            console: ConsoleSection {
                listen: Some("127.0.0.1:1".parse().unwrap()),
                token_env: Some("C".into()),
                allow_remote: true,
            },
        };
        let value = toml::Value::try_from(&full).unwrap();
        let mut keys = Vec::new();
        for (section, table) in value.as_table().unwrap() {
            for (key, inner) in table.as_table().unwrap() {
                match inner.as_table() {
                    Some(action) if section == "actions" => {
                        for (k, v) in action {
                            match v.as_table() {
                                Some(sub) if k == "completion" => keys
                                    .extend(sub.keys().map(|s| format!("[actions.{key}.{k}] {s}"))),
                                _ => keys.push(format!("[actions.{key}] {k}")),
                            }
                        }
                    }
                    _ => keys.push(format!("[{section}] {key}")),
                }
            }
        }
        let guide = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"),
        )
        .unwrap();
        for key in keys {
            assert!(
                guide.contains(&format!("| `{key}` |")),
                "{key} is not in docs/operations.md"
            );
        }
    }

    #[test]
    fn start_positions_parse() {
        assert_eq!("latest".parse(), Ok(StartPosition::Latest));
        assert_eq!(
            "2026-01-01T00:00:00Z".parse(),
            Ok(StartPosition::AtTimestamp(1_767_225_600_000))
        );
        assert!("yesterday".parse::<StartPosition>().is_err());
    }
}
