//! The compliance console: pages drawn by the server (no script, nothing from outside) for
//! compliance staff, over the running daemon. What it shows comes from the daemon's state and
//! status; every change it makes runs the command the CLI runs for it (through the control
//! channel's handler: same checks, same limits), audited with the console as its origin.
//! No identifier of a data subject is shown but the one an operator types into a lookup.

mod auth;
mod pages;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Form, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};

use serde_json::Value;

use crate::config::ConsoleSettings;
use crate::control::Handler;
use crate::pipeline::Pipeline;
use crate::shutdown::Shutdown;
use crate::telemetry::Served;
use auth::{Auth, Caller, Refusal};

/// The origin the audit trail gives to changes made from the console.
const ORIGIN: &str = "console";
/// The shortest token the console takes: guessing must be hopeless, the brake aside.
const MIN_TOKEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("[console] token_env names {env}, which is not set: export the console's token in it")]
    MissingToken { env: String },
    #[error("the console's token in {env} is empty: set a long random token")]
    EmptyToken { env: String },
    #[error("the console's token in {env} is shorter than {MIN_TOKEN} characters: use a long random one (openssl rand -hex 32)")]
    ShortToken { env: String },
    #[error("cannot listen on {listen} ([console] listen)")]
    Listen {
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl ConsoleError {
    /// Whether the user must fix the config or its environment (exit 2).
    pub fn is_usage(&self) -> bool {
        !matches!(self, ConsoleError::Listen { .. })
    }
}

/// The console's token, read from its environment variable when `run` starts.
pub fn token(settings: &ConsoleSettings) -> Result<String, ConsoleError> {
    let env = settings.token_env.clone();
    match std::env::var(&env) {
        Ok(token) if token.trim().is_empty() => Err(ConsoleError::EmptyToken { env }),
        Ok(token) if token.chars().count() < MIN_TOKEN => Err(ConsoleError::ShortToken { env }),
        Ok(token) => Ok(token),
        Err(_) => Err(ConsoleError::MissingToken { env }),
    }
}

struct Console {
    auth: Auth,
    served: Arc<Served>,
    pipeline: Arc<Pipeline>,
    handler: Handler,
    /// Commands it runs: the daemon waits for them before it lets go of its state.
    commands: tokio_util::task::TaskTracker,
    /// Cookies only over TLS: a console reached from other machines sits behind it.
    secure_cookie: bool,
}

type Shared = Arc<Console>;

/// Binds the console's address and serves it until shutdown. The commands it runs are
/// tracked by `commands`, for the daemon to wait for at its stop.
pub async fn serve(
    settings: &ConsoleSettings,
    token: String,
    served: Arc<Served>,
    pipeline: Arc<Pipeline>,
    (handler, commands): (Handler, tokio_util::task::TaskTracker),
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, ConsoleError> {
    let listen = settings.listen;
    let bind = |source| ConsoleError::Listen { listen, source };
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(bind)?;
    tracing::info!(address = %listener.local_addr().map_err(bind)?, "console listening");
    let console = Arc::new(Console {
        auth: Auth::new(&token),
        served,
        pipeline,
        handler,
        commands,
        secure_cookie: settings.remote,
    });
    let app = Router::new()
        .route("/", get(overview))
        .route("/requests", get(requests))
        .route("/requests/lookup", post(lookup))
        .route("/requests/extend", post(extend))
        .route("/requests/hold", post(hold))
        .route("/requests/release", post(release))
        .route("/requests/deny", post(deny))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/:id/retry", post(retry))
        .route("/dead-letters/:id/discard", post(discard))
        .route("/actions", get(actions))
        .route("/actions/:name/pause", post(pause))
        .route("/actions/:name/resume", post(resume))
        .route("/rules", get(playground))
        .route("/rules/explain", post(explain))
        .route("/audit", get(audit))
        .route("/audit/export", get(export))
        .route("/api/status", get(api_status))
        .route("/api/dead-letters", get(api_dead_letters))
        .route("/api/actions", get(api_actions))
        .route("/logout", post(logout))
        .layer(axum::middleware::from_fn_with_state(
            console.clone(),
            require_caller,
        ))
        .route("/login", get(login_page).post(login))
        .route("/console.css", get(stylesheet))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(console);
    Ok(tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.triggered().await })
        .await;
    }))
}

/// Lets in a request with the token or a session; else 401 for the API (and for a wrong
/// Bearer token), the login page for a browser, and no data either way.
async fn require_caller(
    State(console): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    let api = request.uri().path().starts_with("/api/")
        || request.headers().contains_key(header::AUTHORIZATION);
    match console.auth.caller(request.headers(), peer.ip()).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(Refusal::Locked { retry_after }) => too_many(retry_after),
        Err(_) if api => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(
                serde_json::json!({"error": "a valid Bearer token or console session is required"}),
            ),
        )
            .into_response(),
        Err(_) => Redirect::to("/login").into_response(),
    }
}

fn too_many(retry_after: Duration) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(
            header::RETRY_AFTER,
            retry_after.as_secs().max(1).to_string(),
        )],
        "too many wrong tokens from this address: wait, then try again",
    )
        .into_response()
}

/// On every answer: no script runs, no frame holds the console, nothing is sniffed, kept
/// in a cache or told to another site.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // Not `no-referrer`: with it a browser sends `Origin: null`, and the login's origin
        // check could not tell the console's own form.
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        pages::STYLESHEET,
    )
}

async fn login_page() -> Response {
    pages::login(None).into_response()
}

async fn login(
    State(console): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    // Another site's page posting wrong tokens here would lock everyone out of logging in.
    if !same_origin(&headers) {
        return (
            StatusCode::FORBIDDEN,
            "refused: a login from another site's page",
        )
            .into_response();
    }
    let token = form.get("token").map(String::as_str).unwrap_or_default();
    match console.auth.check_token(token, peer.ip()).await {
        Ok(()) => {
            let id = console.auth.start_session();
            (
                [(header::SET_COOKIE, auth::cookie(&id, console.secure_cookie))],
                Redirect::to("/"),
            )
                .into_response()
        }
        Err(Refusal::Locked { retry_after }) => too_many(retry_after),
        Err(_) => (
            StatusCode::UNAUTHORIZED,
            pages::login(Some("That token is not the console's.")),
        )
            .into_response(),
    }
}

/// Whether a browser's form came from the console's own pages: its `Origin` (browsers send
/// one with every POST) names the host it was sent to. No `Origin`: not a browser's form.
fn same_origin(headers: &axum::http::HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, host)| host);
    host.is_some() && origin_host == host
}

async fn logout(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = forged(&caller, &form) {
        return refused;
    }
    if let Caller::Session { id, .. } = &caller {
        console.auth.end_session(id);
    }
    (
        [(header::SET_COOKIE, auth::expired_cookie())],
        Redirect::to("/login"),
    )
        .into_response()
}

/// What a page needs besides its data: the session's CSRF token for its forms, and the
/// message the last change left.
pub struct Frame {
    pub csrf: String,
    pub message: Option<String>,
}

impl Console {
    fn frame(&self, caller: &Caller) -> Frame {
        match caller {
            Caller::Session { id, csrf } => Frame {
                csrf: csrf.clone(),
                message: self.auth.take_message(id),
            },
            Caller::Bearer => Frame {
                csrf: String::new(),
                message: None,
            },
        }
    }

    /// Runs a command as the CLI would, served by this daemon, with the console as origin.
    async fn command(&self, argv: Vec<String>) -> Ran {
        let (handler, pipeline) = (self.handler.clone(), self.pipeline.clone());
        let ran = self
            .commands
            .spawn_blocking(move || {
                let (mut out, mut error) = (Vec::new(), String::new());
                let code = handler(&argv, ORIGIN, &pipeline, &mut out, &mut error);
                Ran {
                    code,
                    out: String::from_utf8_lossy(&out).into_owned(),
                    error,
                }
            })
            .await;
        ran.unwrap_or_else(|e| Ran {
            code: 1,
            out: String::new(),
            error: format!("error: the command failed: {e}"),
        })
    }

    /// Answers a change: a browser goes back to `page`, which shows what happened; a
    /// script gets it as JSON.
    fn changed(&self, caller: &Caller, page: &str, ran: Ran) -> Response {
        match caller {
            Caller::Session { id, .. } => {
                self.auth.tell(id, ran.summary());
                Redirect::to(page).into_response()
            }
            Caller::Bearer => {
                let status = if ran.code == 0 {
                    StatusCode::OK
                } else {
                    StatusCode::CONFLICT
                };
                let body = serde_json::json!({"exit": ran.code, "output": ran.out, "error": ran.error_text()});
                (status, Json(body)).into_response()
            }
        }
    }
}

/// What a command printed, and its exit code.
struct Ran {
    code: u8,
    out: String,
    error: String,
}

impl Ran {
    /// The command's error for people: without the "error: " prefixes and the pointer to
    /// `--help` that are for a terminal.
    fn error_text(&self) -> String {
        let mut error = self.error.trim();
        while let Some(rest) = error.strip_prefix("error: ") {
            error = rest;
        }
        error
            .lines()
            .filter(|line| !line.starts_with("For more information, try"))
            .collect::<Vec<_>>()
            .join("\n")
            .trim()
            .to_owned()
    }

    fn summary(&self) -> String {
        // A retry's JSON lines, told as sentences.
        let retried: Vec<String> = self
            .lines()
            .iter()
            .filter_map(|line| {
                let (id, outcome) = (line.get("id")?, line.get("outcome")?.as_str()?);
                Some(match line.get("error").and_then(Value::as_str) {
                    Some(error) => {
                        format!("dead letter {id}: {} ({error})", outcome.replace('_', " "))
                    }
                    None => format!("dead letter {id}: {outcome}"),
                })
            })
            .collect();
        let out = if retried.is_empty() {
            self.out.trim().to_owned()
        } else {
            retried.join("\n")
        };
        let error = self.error_text();
        let text = [out.as_str(), error.as_str()]
            .into_iter()
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        if text.is_empty() {
            format!("exit code {}", self.code)
        } else {
            text
        }
    }

    fn lines(&self) -> Vec<Value> {
        self.out
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

/// A change from a browser needs its CSRF token: 403 and nothing done without it.
fn forged(caller: &Caller, form: &HashMap<String, String>) -> Option<Response> {
    (!auth::form_allowed(caller, form.get("csrf").map(String::as_str))).then(|| {
        (
            StatusCode::FORBIDDEN,
            "refused: the form's CSRF token is missing or wrong; reload the page and try again",
        )
            .into_response()
    })
}

fn unavailable(error: impl std::fmt::Display) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the state cannot be read now: {error}"),
    )
        .into_response()
}

async fn overview(State(console): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    let status = console.served.telemetry.status_json(&console.served);
    let rules = console.pipeline.rules.load();
    let files: Vec<String> = rules
        .rules()
        .iter()
        .map(|r| {
            r.path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    pages::overview(&console.frame(&caller), &status, &files).into_response()
}

async fn requests(State(console): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    let frame = console.frame(&caller);
    match gather_requests(&console) {
        Ok(view) => pages::requests(&frame, &view, None).into_response(),
        Err(e) => unavailable(e),
    }
}

/// Open requests the page lists at most (soonest due first): the rest are counted.
const OPEN_SHOWN: usize = 200;

/// The requests page's data: the requests still owed an answer, the counts by status, and
/// the outcomes of the last 30 days.
pub struct RequestsView {
    /// Keyed hash of the request's key, and its status and due date in force.
    pub open: Vec<(String, crate::state::OpenRequest)>,
    /// Open requests beyond [`OPEN_SHOWN`].
    pub more: usize,
    pub counts: crate::state::RequestGauges,
    pub per_day: Vec<(String, std::collections::BTreeMap<String, u64>)>,
    pub actions: Vec<String>,
}

fn gather_requests(console: &Console) -> Result<RequestsView, crate::state::StateError> {
    // The daemon's state (the console runs only beside a live one).
    let state = &console.served.state;
    let now = crate::clock::now_ms();
    let mut open = state.open_requests()?;
    let more = open.len().saturating_sub(OPEN_SHOWN);
    open.truncate(OPEN_SHOWN);
    let counts = state.request_gauges(now)?;
    let days = 30;
    let since = now.saturating_sub(days * 24 * 3600 * 1000);
    let mut per_day: Vec<(String, std::collections::BTreeMap<String, u64>)> = (0..days)
        .rev()
        .map(|back| (day_of(now - back * 24 * 3600 * 1000), Default::default()))
        .collect();
    for entry in state.audit_latest(since, usize::MAX)? {
        let day = day_of(entry.time_ms);
        if let Some((_, counts)) = per_day.iter_mut().find(|(d, _)| *d == day) {
            *counts.entry(entry.outcome).or_default() += 1;
        }
    }
    Ok(RequestsView {
        open,
        more,
        counts,
        per_day,
        actions: console.pipeline.actions.names().cloned().collect(),
    })
}

fn day_of(ms: u64) -> String {
    crate::clock::rfc3339(ms as i64)[..10].to_owned()
}

/// The key as the operator typed it (spaces may be part of it, as the CLI takes it). It
/// travels in form bodies only: never in a URL, a log or a page.
fn key(form: &HashMap<String, String>) -> Result<String, &'static str> {
    match form.get("key") {
        Some(key) if !key.is_empty() => Ok(key.clone()),
        _ => Err("the request's key is required"),
    }
}

/// A lookup: the request as `requests show` gives it, and, for an action, its audit trail
/// as `audit lookup` gives it.
async fn lookup(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = forged(&caller, &form) {
        return refused;
    }
    let key = match key(&form) {
        Ok(key) => key,
        Err(missing) => return (StatusCode::BAD_REQUEST, missing).into_response(),
    };
    let action = form.get("action").cloned().unwrap_or_default();
    let audit = match action.is_empty() {
        true => None,
        false => Some(
            console
                .command(vec![
                    "audit".into(),
                    "lookup".into(),
                    format!("--action={action}"),
                    format!("--key={key}"),
                ])
                .await,
        ),
    };
    request_page(&console, &caller, &key, audit, None).await
}

/// The requests page with the request of `key` (after `change`, if one was asked), or, for
/// a script, the same as JSON.
async fn request_page(
    console: &Console,
    caller: &Caller,
    key: &str,
    audit: Option<Ran>,
    change: Option<Ran>,
) -> Response {
    let shown = console.command(show(key)).await;
    let request = match shown.code {
        0 => serde_json::from_str::<Value>(shown.out.trim()).map_err(|e| e.to_string()),
        _ => Err(shown.error_text()),
    };
    if let Caller::Bearer = caller {
        let (exit, lines, error) = match &audit {
            Some(ran) => (ran.code, ran.lines(), ran.error_text()),
            None => (shown.code, Vec::new(), shown.error_text()),
        };
        return Json(serde_json::json!({
            "exit": exit,
            "lines": lines,
            "error": error,
            "request": request.as_ref().ok(),
        }))
        .into_response();
    }
    let lookup = pages::Lookup {
        request,
        audit: audit.map(|ran| ran.lines()),
        change: change.map(|ran| (ran.code == 0, ran.summary())),
    };
    match gather_requests(console) {
        Ok(view) => pages::requests(&console.frame(caller), &view, Some(&lookup)).into_response(),
        Err(e) => unavailable(e),
    }
}

fn show(key: &str) -> Vec<String> {
    vec![
        "requests".into(),
        "show".into(),
        "--format=json".into(),
        format!("--key={key}"),
    ]
}

async fn extend(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let argv = reason(&form).map(|reason| vec!["extend".into(), format!("--reason={reason}")]);
    request_change(&console, &caller, &form, argv).await
}

async fn hold(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let argv = reason(&form).map(|reason| vec!["hold".into(), format!("--reason={reason}")]);
    request_change(&console, &caller, &form, argv).await
}

async fn release(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    request_change(&console, &caller, &form, Ok(vec!["release".into()])).await
}

async fn deny(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let code = form
        .get("reason_code")
        .map(String::as_str)
        .unwrap_or_default();
    let argv = match crate::requests::DENIAL_CODES.contains(&code) {
        false => Err("the basis of the denial (reason code) is required"),
        true => {
            let mut argv = vec!["deny".into(), format!("--reason-code={code}")];
            if let Some(note) = form.get("note").map(|n| n.trim()).filter(|n| !n.is_empty()) {
                argv.push(format!("--note={note}"));
            }
            Ok(argv)
        }
    };
    request_change(&console, &caller, &form, argv).await
}

/// A change to a request asked by a form (`requests <argv> --key K`): refused without its
/// CSRF token or when the form is incomplete; else the CLI's command, run by this daemon.
/// A browser sees the request as it is now, with what the command said (a refusal as an
/// error); a script gets the outcome as JSON.
async fn request_change(
    console: &Console,
    caller: &Caller,
    form: &HashMap<String, String>,
    argv: Result<Vec<String>, &'static str>,
) -> Response {
    if let Some(refused) = forged(caller, form) {
        return refused;
    }
    let (key, mut argv) = match key(form).and_then(|key| Ok((key, argv?))) {
        Ok(both) => both,
        Err(missing) => return (StatusCode::BAD_REQUEST, missing).into_response(),
    };
    argv.insert(0, "requests".into());
    argv.push(format!("--key={key}"));
    let ran = console.command(argv).await;
    match caller {
        Caller::Bearer => console.changed(caller, "/requests", ran),
        Caller::Session { .. } => request_page(console, caller, &key, None, Some(ran)).await,
    }
}

async fn dead_letters(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let letters = match console.served.state.dead_letters() {
        Ok(letters) => letters,
        Err(e) => return unavailable(e),
    };
    pages::dead_letters(&console.frame(&caller), &letters).into_response()
}

async fn retry(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<u64>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    // Served by this daemon: its own config, rules and action limits (the path is not read).
    let argv = Ok(vec![
        "dead-letters".into(),
        "retry".into(),
        "--config=-".into(),
        format!("--id={id}"),
    ]);
    change(&console, &caller, &form, "/dead-letters", argv).await
}

async fn discard(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<u64>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let argv = reason(&form).map(|reason| {
        vec![
            "dead-letters".into(),
            "discard".into(),
            format!("--id={id}"),
            format!("--reason={reason}"),
        ]
    });
    change(&console, &caller, &form, "/dead-letters", argv).await
}

async fn actions(State(console): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    let ran = console.command(vec!["actions".into(), "list".into()]).await;
    if ran.code != 0 {
        return unavailable(ran.summary());
    }
    pages::actions(&console.frame(&caller), &ran.lines()).into_response()
}

async fn pause(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let argv = reason(&form).map(|reason| {
        vec![
            "actions".into(),
            "pause".into(),
            format!("--reason={reason}"),
            "--".into(),
            name,
        ]
    });
    change(&console, &caller, &form, "/actions", argv).await
}

async fn resume(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let argv = Ok(vec!["actions".into(), "resume".into(), "--".into(), name]);
    change(&console, &caller, &form, "/actions", argv).await
}

/// The form's reason, required (the command checks the rest).
fn reason(form: &HashMap<String, String>) -> Result<String, &'static str> {
    match form.get("reason").map(|r| r.trim()) {
        Some(reason) if !reason.is_empty() => Ok(reason.to_owned()),
        _ => Err("a reason is required"),
    }
}

/// A change asked by a form: refused without its CSRF token, or when the form is
/// incomplete; else the CLI's command, run by this daemon, and its outcome told.
async fn change(
    console: &Console,
    caller: &Caller,
    form: &HashMap<String, String>,
    page: &str,
    argv: Result<Vec<String>, &'static str>,
) -> Response {
    if let Some(refused) = forged(caller, form) {
        return refused;
    }
    match argv {
        Ok(argv) => {
            let ran = console.command(argv).await;
            console.changed(caller, page, ran)
        }
        Err(missing) => (StatusCode::BAD_REQUEST, missing).into_response(),
    }
}

async fn audit(State(console): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    let entries = match console.served.state.audit_latest(0, 50) {
        Ok(entries) => entries,
        Err(e) => return unavailable(e),
    };
    pages::audit(&console.frame(&caller), &entries).into_response()
}

/// Events a playground run explains at most (an aggregate counts each of its events): it
/// is for trying records, not for batches (`rules explain` takes files).
const PLAYGROUND_EVENTS: usize = 20;

async fn playground(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
) -> Response {
    pages::playground(&console.frame(&caller), "", &[], None).into_response()
}

/// The rule playground: each pasted record through the rules in force and the rules on
/// disk (what the next reload would run), with each rule's explanation. Read-only.
async fn explain(
    State(console): State<Shared>,
    Extension(caller): Extension<Caller>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = forged(&caller, &form) {
        return refused;
    }
    let text = form.get("records").cloned().unwrap_or_default();
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    let mut records = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        match crate::decode::event_line(line.as_bytes()) {
            Ok(record) => records.push(record),
            Err(e) => {
                return (StatusCode::BAD_REQUEST, format!("line {}: {e}", n + 1)).into_response()
            }
        }
    }
    let events: usize = records
        .iter()
        .map(|record| crate::rules::decode_as_daemon(record).map_or(1, |events| events.len()))
        .sum();
    if records.is_empty() || events > PLAYGROUND_EVENTS {
        return (
            StatusCode::BAD_REQUEST,
            format!("paste 1 to {PLAYGROUND_EVENTS} events, one per line (an aggregate counts each of its events)"),
        )
            .into_response();
    }
    let pipeline = console.pipeline.clone();
    let explained = tokio::task::spawn_blocking(move || {
        let in_force = Arc::clone(&pipeline.rules.load());
        let on_disk = pipeline.rules.on_disk();
        let render = |decision: &crate::rules::Decision| {
            pipeline
                .actions
                .prepare(decision)
                .map(|request| request.shown())
                .map_err(|e| e.to_string())
        };
        // Each line, and each event of a KPL aggregate in it, as the daemon decodes it.
        let mut runs = Vec::new();
        for (n, record) in records.iter().enumerate() {
            let mut disk = on_disk
                .as_ref()
                .ok()
                .map(|set| set.explain_all(record, Some(&render)).into_iter());
            let events = in_force.explain_all(record, Some(&render));
            let several = events.len() > 1;
            for (sub, (_, traces)) in events.into_iter().enumerate() {
                runs.push(pages::Explained {
                    title: match several {
                        true => format!("Record {}, event {}", n + 1, sub + 1),
                        false => format!("Record {}", n + 1),
                    },
                    in_force: traces,
                    on_disk: disk.as_mut().and_then(|d| d.next()).map(|(_, t)| t),
                });
            }
        }
        let on_disk = match on_disk {
            Ok(set) => pages::OnDisk::Loads {
                hash: set.hash().to_owned(),
                same: set.hash() == in_force.hash(),
            },
            Err(failure) => pages::OnDisk::Refused(failure.to_string()),
        };
        (runs, on_disk)
    })
    .await;
    match explained {
        Ok((runs, on_disk)) => {
            pages::playground(&console.frame(&caller), &text, &runs, Some(&on_disk)).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the explanation failed: {e}"),
        )
            .into_response(),
    }
}

/// `audit export` for a window, as a download.
async fn export(
    State(console): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let format = match query.get("format").map(String::as_str) {
        Some("jsonl") => "jsonl",
        Some("csv") | None => "csv",
        Some(_) => {
            return (StatusCode::BAD_REQUEST, "format is csv or jsonl").into_response();
        }
    };
    let mut argv = vec![
        "audit".to_owned(),
        "export".into(),
        "--format".into(),
        format.into(),
    ];
    for bound in ["since", "until"] {
        if let Some(value) = query.get(bound).map(|v| v.trim()).filter(|v| !v.is_empty()) {
            argv.push(format!("--{bound}={value}"));
        }
    }
    let ran = console.command(argv).await;
    if ran.code != 0 {
        return (StatusCode::BAD_REQUEST, ran.summary()).into_response();
    }
    let (kind, name) = match format {
        "jsonl" => ("application/x-ndjson", "jsonl"),
        _ => ("text/csv; charset=utf-8", "csv"),
    };
    let stamp = crate::clock::rfc3339(crate::clock::now_ms() as i64).replace(':', "");
    (
        [
            (header::CONTENT_TYPE, kind.to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"audit-{stamp}.{name}\""),
            ),
        ],
        ran.out,
    )
        .into_response()
}

async fn api_status(State(console): State<Shared>) -> Response {
    Json(console.served.telemetry.status_json(&console.served)).into_response()
}

async fn api_dead_letters(State(console): State<Shared>) -> Response {
    api_list(&console, &["dead-letters", "list"]).await
}

async fn api_actions(State(console): State<Shared>) -> Response {
    api_list(&console, &["actions", "list"]).await
}

/// A listing command's JSON lines as one array; a command that fails is an error, never
/// an empty list.
async fn api_list(console: &Console, argv: &[&str]) -> Response {
    let ran = console
        .command(argv.iter().map(|s| s.to_string()).collect())
        .await;
    if ran.code != 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": ran.summary()})),
        )
            .into_response();
    }
    Json(ran.lines()).into_response()
}
