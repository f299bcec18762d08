//! The command line: parses flags, dispatches, and maps errors to exit codes
//! (0 success, 1 runtime failure, 2 usage or config error).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::actions::ActionSet;
use crate::config::{self, Overrides, Settings, StartPosition};
use crate::control;
use crate::daemon::{self, DryRun};
use crate::decode::{self, Record, RecordJson};
use crate::diff;
use crate::fleet::share::open_for_command;
use crate::keys::Keys;
use crate::keys::{KeyError, KeySource};
use crate::pipeline::Retried;
use crate::pipeline::{Pipeline, Sink};
use crate::preview::OutputFormat;
use crate::preview::Preview;
use crate::rules::{explain, testing, Decision, RuleSet};
use crate::state::{Access, AuditEntry, State, StateError, Writes};

#[derive(Parser)]
#[command(
    name = "gdpr-consumer",
    version,
    about = "Reads a Kinesis stream, runs compliance rules on every record, and calls the backend once per privacy request."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: human, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// Libraries that would log request URLs, headers or bodies (payloads, params) at their
/// debug and trace levels: capped whatever level is asked for.
const QUIET_LIBRARIES: &[&str] = &[
    // Off EC2, the credential chain's failed instance-metadata lookup prints a long
    // warning at every start (a chain that finds nothing fails the calls, which say so).
    "aws_config::imds=error",
    "aws_config::meta::credentials::chain=error",
    "aws_config",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http",
    "aws_smithy_http_client",
    "aws_smithy_types",
    "aws_sigv4",
    "aws_sdk_kinesis",
    "aws_runtime",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "rustls",
    "tower",
    "tower_http",
    "axum",
    "notify",
];

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (or, with --dry-run, preview what it would do).
    Run(RunArgs),
    /// Check and test the rule scripts.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Run the rules over captured records (JSON lines) and print what they would do.
    Preview(PreviewArgs),
    /// Save records from the stream as JSON lines (for preview, rules diff and test cases).
    Capture(CaptureArgs),
    /// Summarise the state file: schema version, key fingerprints, checkpoints, dedup ledger
    /// and dead letters (or rotate its key).
    State(StateCommand),
    /// Inspect or reset shard checkpoints.
    #[command(subcommand)]
    Checkpoints(CheckpointsCommand),
    /// Dead letters: records and requests that could not be settled.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// Pause and resume actions: a paused action's requests are held, not sent, until it
    /// is resumed.
    #[command(subcommand)]
    Actions(ActionsCommand),
    /// The audit trail: one entry per decision outcome.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Privacy requests and their legal clock: show one, extend its due date, put it on
    /// legal hold, release it, or deny it with a reason.
    #[command(subcommand)]
    Requests(RequestsCommand),
    /// The regulator's report for a year: per regulation, requests received, complied with
    /// (in whole or in part), denied (by reason), median and mean days to complete, open
    /// and overdue (CCPA §7102).
    Report {
        #[command(flatten)]
        state: StateArgs,
        /// The calendar year (UTC) the requests arrived in.
        #[arg(long, value_parser = clap::value_parser!(i16).range(1970..=9999))]
        year: i16,
        #[arg(long, value_enum, default_value = "human")]
        format: ReportFormat,
    },
    /// The enhanced fan-out consumer (`[stream] consumer_name`) that fan-out mode registers.
    #[command(subcommand)]
    Consumer(ConsumerCommand),
}

#[derive(Subcommand)]
enum ConsumerCommand {
    /// Remove the consumer from the stream (the daemon never does). A daemon still reading
    /// in fan-out mode loses its subscriptions: stop it first, or switch it to polling.
    Deregister(ConsumerArgs),
}

#[derive(Args)]
struct ConsumerArgs {
    /// Config file whose [stream] names the stream and the consumer.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Kinesis stream name (overrides [stream] name).
    #[arg(long)]
    stream: Option<String>,
}

#[derive(Args)]
struct RunArgs {
    /// Config file (TOML).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Kinesis stream name (overrides [stream] name).
    #[arg(long)]
    stream: Option<String>,
    /// Directory of *.rhai rules (overrides [rules] dir).
    #[arg(long)]
    rules_dir: Option<PathBuf>,
    /// State file (overrides [state] path).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Print what would be done; call no backend, write no state.
    #[arg(long)]
    dry_run: bool,
    /// Where shards without a checkpoint start: trim-horizon, latest or an RFC 3339 time.
    /// Dry-run defaults to trim-horizon.
    #[arg(long, value_parser = parse_start)]
    from: Option<StartPosition>,
    /// Dry-run output format.
    #[arg(long, value_enum, default_value = "human", requires = "dry_run")]
    output: OutputFormat,
    /// Dry-run: keep following the stream instead of exiting when caught up.
    #[arg(long, requires = "dry_run")]
    follow: bool,
}

fn parse_start(s: &str) -> Result<StartPosition, String> {
    s.parse()
}

#[derive(Args)]
struct RulesArgs {
    /// Directory of *.rhai rules (default: [rules] dir of --config, else ./rules).
    #[arg(long)]
    rules_dir: Option<PathBuf>,
    /// Config file: decisions must then name configured actions.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Compile every rule; report errors as file:line:col.
    Check(RulesArgs),
    /// Run every rule's test cases (NAME.test.json beside NAME.rhai).
    Test(TestArgs),
    /// Show the records whose decisions differ between two rule sets.
    Diff(DiffArgs),
    /// For each record and rule, why the rule decided what it did: kept out by its
    /// prefilter, turned away by an opening check, returned nothing, threw, or its
    /// decisions and their requests.
    Explain(ExplainArgs),
}

#[derive(Args)]
struct TestArgs {
    #[command(flatten)]
    rules: RulesArgs,
    /// Also write the results as JUnit XML to this file (for CI).
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Per rule, the share of its statements the cases ran and the lines never run.
    #[arg(long)]
    coverage: bool,
    /// Fail (exit 1) when a rule's cases run less than this percentage of its statements
    /// (implies --coverage).
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    min_coverage: Option<f64>,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100")),
    }
}

#[derive(Args)]
struct ExplainArgs {
    /// Directory of *.rhai rules.
    #[arg(long)]
    rules_dir: PathBuf,
    /// Records, one per line: as `capture` writes them, or plain JSON events (`-`: stdin).
    #[arg(long)]
    input: PathBuf,
    /// Config file: decisions must name its actions, and their requests are shown.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
}

#[derive(Args)]
struct PreviewArgs {
    /// Directory of *.rhai rules.
    #[arg(long)]
    rules_dir: PathBuf,
    /// Records as JSON lines (`capture` writes them): {"data": ..., "shard_id": ..., ...}.
    #[arg(long)]
    input: PathBuf,
    /// Config file: decisions must name its actions, and requests are shown in full.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
}

#[derive(Args)]
struct StreamArgs {
    /// Config file whose [stream] to read.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Kinesis stream name (overrides [stream] name).
    #[arg(long)]
    stream: Option<String>,
    /// Where to start: trim-horizon (default), latest or an RFC 3339 time.
    #[arg(long, value_parser = parse_start, default_value = "trim-horizon")]
    from: StartPosition,
    /// Stop after this many records.
    #[arg(long)]
    limit: Option<u64>,
}

#[derive(Args)]
struct CaptureArgs {
    #[command(flatten)]
    stream: StreamArgs,
}

#[derive(Args)]
struct DiffArgs {
    /// The new rules.
    #[arg(long)]
    rules_dir: PathBuf,
    /// The rules to compare against (e.g. the ones running now).
    #[arg(long)]
    against: PathBuf,
    /// Records as JSON lines; without it, records are read from the stream.
    #[arg(long, conflicts_with_all = ["stream", "from"])]
    input: Option<PathBuf>,
    #[command(flatten)]
    stream: StreamArgs,
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
}

#[derive(Args)]
struct StateArgs {
    /// Config file whose [state] path to use.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// State file (overrides the config).
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct StateCommand {
    #[command(flatten)]
    args: StateArgs,
    #[command(subcommand)]
    action: Option<StateAction>,
}

#[derive(Subcommand)]
enum StateAction {
    /// Put a new key in front of the key file's ring (the daemon stopped): new ledger
    /// entries and seals use it, lookups use every key, dead letters are sealed again.
    RotateKey(StateArgs),
}

#[derive(Subcommand)]
enum CheckpointsCommand {
    /// List every shard's checkpoint as JSON lines.
    List(StateArgs),
    /// Forget checkpoints so shards are read again from the start position.
    Reset {
        #[command(flatten)]
        state: StateArgs,
        /// Only this shard.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        shard: Option<String>,
        /// Every shard.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// List dead letters as JSON lines (what they hold sealed is not shown).
    List(StateArgs),
    /// Retry dead letters now with the current rules and config (served by the running
    /// daemon if there is one, which also retries backend faults on its own schedule; in a
    /// fleet, from any host).
    Retry {
        #[command(flatten)]
        config: ConfigArgs,
        /// Dead letter ids (from `list`): `--id 1 2` or `--id 1 --id 2`.
        #[arg(long = "id", required_unless_present = "all", conflicts_with = "all", num_args = 1..)]
        ids: Vec<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Turn the record of a rule_failed or decode_failed letter into a test case for the
    /// rule that failed on it, printed as JSON to add to NAME.test.json. Identifiers are
    /// replaced by placeholders of the same shape (the texts the rule compares against
    /// stay); the case expects what the rule does on it now.
    ToTest {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long)]
        id: u64,
        /// Keep the record as it is, identifiers included (keep such a case out of version
        /// control).
        #[arg(long)]
        keep_identifiers: bool,
        /// The rule the case is for: needed for a decode_failed letter (no rule failed on
        /// it); default, the rule that failed.
        #[arg(long)]
        rule: Option<String>,
        /// The rules to run the case with (default: the running daemon's rules in force,
        /// else the config's [rules] dir, else the directory of the rule file the letter
        /// names, else ./rules). Relative to where the command runs.
        #[arg(long)]
        rules_dir: Option<PathBuf>,
    },
    /// Give up on a dead letter, with a reason that goes into the audit trail.
    Discard {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long)]
        id: u64,
        /// Why it is given up (kept in the audit trail).
        #[arg(long, value_parser = parse_reason)]
        reason: String,
    },
}

#[derive(Args)]
struct ConfigArgs {
    /// Config file (its actions and rules carry out the retry).
    #[arg(long, short)]
    config: PathBuf,
    /// State file (overrides the config).
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ActionsCommand {
    /// Each action (of the config, or paused, or with requests held): paused or not, why
    /// and since when, and how many requests are held.
    List(StateArgs),
    /// Pause an action: its requests are held durably (not sent, not dead-lettered) and
    /// its shards read on; audited with the reason. The pause survives restarts.
    Pause {
        #[command(flatten)]
        state: StateArgs,
        /// The action, as named in the config.
        name: String,
        /// Why (kept in the audit trail and shown in /status).
        #[arg(long, value_parser = parse_reason)]
        reason: String,
    },
    /// Resume an action: its held requests are sent, in arrival order, within its limits
    /// (by the running daemon at once; else at its next start). Audited.
    Resume {
        #[command(flatten)]
        state: StateArgs,
        name: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Export the audit trail (JSON lines or CSV), optionally within a time window.
    Export {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: AuditFormat,
        /// Entries at or after this RFC 3339 time, or since the start of this day
        /// (YYYY-MM-DD, UTC).
        #[arg(long, value_parser = parse_since)]
        since: Option<i64>,
        /// Entries before this RFC 3339 time, or up to the end of this day (YYYY-MM-DD,
        /// UTC: the day is included).
        #[arg(long, value_parser = parse_until)]
        until: Option<i64>,
    },
    /// Find what happened to one request, by its action and plaintext key (hashed for the
    /// lookup; the trail holds no plaintext).
    Lookup {
        #[command(flatten)]
        config: StateArgs,
        #[arg(long)]
        action: String,
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        key: String,
    },
    /// Whether a request is done, by its keyed hashes (hex; one per key of the ring):
    /// what a dry-run asks the running daemon. Prints `true` or `false`.
    #[command(hide = true)]
    Done {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long, num_args = 1.., required = true)]
        ids: Vec<String>,
    },
}

#[derive(Subcommand)]
enum RequestsCommand {
    /// A request's timeline: arrival, rule, regulation, due date, each action's status,
    /// attempts and job, extension, hold, denial, and its overall status.
    Show {
        #[command(flatten)]
        state: StateArgs,
        /// The request's key, as the rules return it (hashed for the lookup).
        #[arg(long)]
        key: String,
        /// Only this action.
        #[arg(long)]
        action: Option<String>,
        #[arg(long, value_enum, default_value = "human")]
        format: ShowFormat,
    },
    /// Extend the due date, once: GDPR by two months (Art. 12(3)), CCPA by 45 days
    /// (§7021). Tell the person, with the reason.
    Extend {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long)]
        key: String,
        #[arg(long, value_parser = parse_reason)]
        reason: String,
    },
    /// Put a request on legal hold: its actions are not sent until it is released.
    Hold {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long)]
        key: String,
        #[arg(long, value_parser = parse_reason)]
        reason: String,
    },
    /// Release a legal hold: the held actions are sent (by the running daemon at once;
    /// else at its next start).
    Release {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long)]
        key: String,
    },
    /// Deny a request, with the basis of the denial: nothing more is sent for it.
    Deny {
        #[command(flatten)]
        state: StateArgs,
        #[arg(long)]
        key: String,
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::requests::DENIAL_CODES))]
        reason_code: String,
        /// What the person is told, in words.
        #[arg(long, value_parser = parse_reason)]
        note: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ShowFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReportFormat {
    Human,
    Json,
    Csv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AuditFormat {
    Jsonl,
    Csv,
}

/// The longest reason an operator may give (it is kept in every entry it explains).
const MAX_REASON: usize = 1000;

/// A reason for the audit trail: said in words, of a readable length, and without control
/// characters (it is shown on terminals and pages).
fn parse_reason(s: &str) -> Result<String, String> {
    let reason = s.trim();
    if reason.is_empty() {
        return Err("a reason is required".into());
    }
    if reason.chars().count() > MAX_REASON {
        return Err(format!("a reason is at most {MAX_REASON} characters"));
    }
    // Invisible characters could hide the reason, or reorder what is shown of it.
    let invisible = |c: char| {
        matches!(c, '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
    };
    if reason.chars().any(|c| c.is_control() || invisible(c)) {
        return Err("a reason cannot hold control or invisible characters".into());
    }
    Ok(reason.to_owned())
}

/// A day (YYYY-MM-DD, UTC) as the start of that day, or of the next one (`end`).
fn parse_day(s: &str, end: bool) -> Option<i64> {
    let day: jiff::civil::Date = s.parse().ok()?;
    let day = if end { day.tomorrow().ok()? } else { day };
    let start = day.to_zoned(jiff::tz::TimeZone::UTC).ok()?;
    Some(start.timestamp().as_millisecond())
}

fn parse_since(s: &str) -> Result<i64, String> {
    parse_day(s, false).map_or_else(|| parse_time(s), Ok)
}

fn parse_until(s: &str) -> Result<i64, String> {
    parse_day(s, true).map_or_else(|| parse_time(s), Ok)
}

fn parse_time(s: &str) -> Result<i64, String> {
    match s.parse::<StartPosition>() {
        Ok(StartPosition::AtTimestamp(ms)) => Ok(ms),
        _ => Err(format!("{s:?} is not an RFC 3339 time")),
    }
}

/// Writes a line to a writer, or returns the failure (see [`write_failure`]).
macro_rules! out {
    ($w:expr, $($arg:tt)*) => {
        writeln!($w, $($arg)*).map_err(write_failure)?
    };
}

/// A failure and the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    /// stdout went away (`| head`): not an error, nothing more to say.
    fn broken_pipe() -> Self {
        Self {
            code: 0,
            error: anyhow::anyhow!("broken pipe"),
        }
    }
    fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 2,
            error: error.into(),
        }
    }
    fn runtime(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 1,
            error: error.into(),
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Rules(RulesCommand::Check(args)) => rules_check(args),
        Command::Rules(RulesCommand::Test(args)) => rules_test(args),
        Command::Rules(RulesCommand::Diff(args)) => rules_diff(args),
        Command::Rules(RulesCommand::Explain(args)) => rules_explain(args),
        Command::Preview(args) => preview(args),
        Command::Capture(args) => capture(args),
        Command::Consumer(ConsumerCommand::Deregister(args)) => consumer_deregister(args),
        command => state_command(command),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) if failure.code == 0 => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

/// Logs to stderr. `GDPR_CONSUMER_LOG` (or `RUST_LOG`) takes filters like `debug` or
/// `gdpr_consumer=trace`; libraries that could log payloads stay at warn.
fn init_logging(format: LogFormat) {
    let spec = std::env::var("GDPR_CONSUMER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    let mut filter = tracing_subscriber::EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("warning: ignoring log filter {spec:?}: {e}");
        tracing_subscriber::EnvFilter::new("info")
    });
    for library in QUIET_LIBRARIES {
        let directive = match library.contains('=') {
            true => library.to_string(),
            false => format!("{library}=warn"),
        };
        if let Ok(directive) = directive.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn run(args: RunArgs) -> Result<u8, Failure> {
    let dry_run = args.dry_run.then_some(DryRun {
        format: args.output,
        follow: args.follow,
    });
    let from = match (&args.from, args.dry_run) {
        (Some(from), _) => Some(from.clone()),
        // Dry-run previews everything the stream retains unless told otherwise.
        (None, true) => Some(StartPosition::TrimHorizon),
        (None, false) => None,
    };
    let overrides = Overrides {
        stream: args.stream,
        rules_dir: args.rules_dir,
        state: args.state,
        from,
    };
    let settings = Settings::resolve(args.config.as_deref(), overrides).map_err(Failure::usage)?;
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    let result = runtime.block_on(daemon::run(settings, dry_run, Some(daemon_handler())));
    // Blocking work still queued (a rules reload, say) does not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result.map_err(|e| Failure {
        code: e.exit_code(),
        error: e.into(),
    })?;
    Ok(0)
}

/// Rules dir and the known action names for `rules check` / `rules test`.
fn rules_setup(
    args: &RulesArgs,
) -> Result<(PathBuf, Option<std::collections::BTreeSet<String>>), Failure> {
    let (config_dir, actions) = match &args.config {
        Some(path) => {
            let (dir, actions) = config::rules_context(path).map_err(Failure::usage)?;
            (dir, Some(actions))
        }
        None => (None, None),
    };
    let dir = args
        .rules_dir
        .clone()
        .or(config_dir)
        .unwrap_or_else(|| PathBuf::from("rules"));
    Ok((dir, actions))
}

fn rules_check(args: RulesArgs) -> Result<u8, Failure> {
    let (dir, actions) = rules_setup(&args)?;
    let mut out = std::io::stdout().lock();
    match RuleSet::load(&dir, actions) {
        Ok(set) => {
            out!(out, "{} rules OK (hash {})", set.rules().len(), set.hash());
            for rule in set.rules() {
                out!(out, "  {}: {}", rule.name, rule.prefilter_summary());
            }
            for ignored in set.ignored() {
                out!(out, "warning: {ignored}");
            }
            Ok(0)
        }
        Err(errors) => {
            for e in &errors {
                out!(out, "{e}");
            }
            out!(out, "{} error(s)", errors.len());
            Ok(1)
        }
    }
}

fn rules_test(args: TestArgs) -> Result<u8, Failure> {
    let (dir, actions) = rules_setup(&args.rules)?;
    let mut out = std::io::stdout().lock();
    // What a terminal shows of a name or a message: no control characters.
    let shown = |text: &str| testing::escape_controls(text, false).into_owned();
    // Written after the count line: a file that cannot be written still leaves the count.
    let junit = |set: Option<&RuleSet>,
                 report: &testing::Report,
                 errors: &[String],
                 below: &[testing::BelowMinimum]| match &args.junit {
        Some(path) => std::fs::write(path, testing::junit(set, report, errors, below))
            .map_err(|e| Failure::runtime(anyhow::anyhow!("cannot write {}: {e}", path.display()))),
        None => Ok(()),
    };
    // Rules or test files that cannot be read: each counts as failed, as in the JUnit file.
    let mut refused = |set: Option<&RuleSet>, errors: Vec<crate::rules::RuleError>| {
        for e in &errors {
            out!(out, "{}", testing::escape_controls(&e.to_string(), true));
        }
        out!(out, "0 passed, {} failed", errors.len());
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        junit(set, &testing::Report::default(), &errors, &[])?;
        Ok(1)
    };
    let set = match RuleSet::load(&dir, actions) {
        Ok(set) => set,
        Err(errors) => return refused(None, errors),
    };
    // With a config, every expected decision must be one its actions can send.
    let actions = match &args.rules.config {
        Some(path) => {
            let specs = config::action_specs(path).map_err(Failure::usage)?;
            Some(ActionSet::new(&specs, false).map_err(Failure::usage)?)
        }
        None => None,
    };
    let sendable = |decision: &Decision| match &actions {
        Some(actions) => actions
            .prepare(decision)
            .map(drop)
            .map_err(|e| e.to_string()),
        None => Ok(()),
    };
    let coverage = args.coverage || args.min_coverage.is_some();
    let report = match testing::run_with(&set, Some(&sendable), coverage) {
        Ok(report) => report,
        Err(errors) => return refused(Some(&set), errors),
    };
    for f in &report.failures {
        out!(
            out,
            "FAIL {} / {}\n  expected: {}\n  actual:   {}",
            shown(&f.rule),
            shown(&f.case),
            shown(&f.expected),
            shown(&f.actual)
        );
    }
    for u in &report.unsendable {
        out!(out, "FAIL {}", shown(&u.to_string()));
    }
    for rule in &report.untested {
        let rule = shown(rule);
        out!(
            out,
            "warning: rule {rule} has no test cases ({rule}.test.json)"
        );
    }
    for rule in &report.coverage {
        out!(out, "coverage: {}", shown(&rule.to_string()));
    }
    let below: Vec<testing::BelowMinimum> = match args.min_coverage {
        Some(min) => report
            .coverage
            .iter()
            .filter(|c| !c.reaches(min))
            .map(|c| testing::BelowMinimum {
                rule: c.rule.clone(),
                message: format!("below the minimum coverage of {min}%: {c}"),
            })
            .collect(),
        None => Vec::new(),
    };
    if let (Some(min), false) = (args.min_coverage, below.is_empty()) {
        let rules: Vec<String> = below.iter().map(|b| shown(&b.rule)).collect();
        out!(out, "FAIL coverage below {min}%: {}", rules.join(", "));
    }
    // A rule below the minimum counts as one failed, as its `coverage` testcase in JUnit.
    let failed = report.failed() + below.len();
    out!(out, "{} passed, {failed} failed", report.passed);
    junit(Some(&set), &report, &[], &below)?;
    Ok(u8::from(failed > 0))
}

fn load_rules(
    dir: &std::path::Path,
    actions: Option<std::collections::BTreeSet<String>>,
) -> Result<RuleSet, Failure> {
    RuleSet::load(dir, actions).map_err(|errors| {
        let list: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        Failure::usage(anyhow::anyhow!(
            "the rules in {} cannot be used:\n{}",
            dir.display(),
            list.join("\n")
        ))
    })
}

fn preview(args: PreviewArgs) -> Result<u8, Failure> {
    let (names, actions) = match &args.config {
        Some(path) => {
            let specs = config::action_specs(path).map_err(Failure::usage)?;
            let actions = ActionSet::new(&specs, false).map_err(Failure::usage)?;
            (Some(specs.into_keys().collect()), Some(actions))
        }
        None => (None, None),
    };
    let rules = load_rules(&args.rules_dir, names)?;
    let records = decode::read_json_lines(&args.input).map_err(Failure::usage)?;
    let preview = Preview::new(
        args.output,
        false,
        None,
        rules.rules().iter().map(|r| r.name.clone()),
    );
    for (_, record) in &records {
        preview.evaluate(&rules, actions.as_ref(), record);
    }
    preview.finish().map_err(write_failure)?;
    Ok(0)
}

/// The records of an explain input (`-`: stdin), with their line numbers: lines as
/// `capture` writes them (`data`, `data_text`... with the record's metadata), or else plain
/// events, whose line is the payload exactly as written (bytes: Latin-1 lines too).
fn read_events(path: &std::path::Path) -> Result<Vec<(usize, Record)>, Failure> {
    let failure =
        |e: &dyn std::fmt::Display| Failure::usage(anyhow::anyhow!("{}: {e}", path.display()));
    let bytes = match path.as_os_str() == "-" {
        true => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes)
                .map_err(|e| failure(&e))?;
            bytes
        }
        false => std::fs::read(path).map_err(|e| failure(&e))?,
    };
    let mut records = Vec::new();
    for (index, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.trim_ascii().is_empty() {
            continue;
        }
        let record = decode::event_line(line).map_err(|e| {
            Failure::usage(anyhow::anyhow!("{}:{}: {e}", path.display(), index + 1))
        })?;
        records.push((index + 1, record));
    }
    if records.is_empty() {
        eprintln!("note: no records in {}", path.display());
    }
    Ok(records)
}

fn rules_explain(args: ExplainArgs) -> Result<u8, Failure> {
    let (names, actions) = match &args.config {
        Some(path) => {
            let specs = config::action_specs(path).map_err(Failure::usage)?;
            let actions = ActionSet::new(&specs, false).map_err(Failure::usage)?;
            (Some(specs.into_keys().collect()), Some(actions))
        }
        None => (None, None),
    };
    let rules = load_rules(&args.rules_dir, names)?;
    let records = read_events(&args.input)?;
    let render = |decision: &Decision| -> Result<serde_json::Value, String> {
        let Some(actions) = &actions else {
            return Err("no config".into());
        };
        actions
            .prepare(decision)
            .map(|request| request.shown())
            .map_err(|e| e.to_string())
    };
    let render: Option<explain::RenderRequest> = actions.as_ref().map(|_| &render as _);
    let mut out = std::io::stdout().lock();
    for (line, given) in &records {
        // Decoded as the daemon decodes it: a KPL aggregate is explained sub-record by
        // sub-record.
        for (record, traces) in rules.explain_all(given, render) {
            match args.output {
                OutputFormat::Json => out!(
                    out,
                    "{}",
                    serde_json::json!({
                        "line": line,
                        "shard_id": record.shard_id,
                        "sequence_number": record.sequence_number,
                        "sub_sequence_number": record.sub_sequence_number,
                        "rules": traces,
                    })
                ),
                OutputFormat::Human => {
                    out!(
                        out,
                        "line {line} (shard {}, sequence number {}, sub-sequence number {}):",
                        record.shard_id,
                        record.sequence_number,
                        record.sub_sequence_number
                    );
                    for trace in &traces {
                        // A value or a thrown message may hold control characters.
                        let human = trace.human();
                        out!(out, "  {}", testing::escape_controls(&human, true));
                    }
                }
            }
        }
    }
    Ok(0)
}

/// Reads records from the stream on a cursor of its own (no state), for capture and diff.
fn read_stream<W: std::io::Write + Send + 'static>(
    args: &StreamArgs,
    out: W,
) -> Result<W, Failure> {
    let stream = config::stream_settings(
        args.config.as_deref(),
        args.stream.clone(),
        Some(args.from.clone()),
    )
    .map_err(Failure::usage)?;
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    runtime
        .block_on(daemon::capture(&stream, out, args.limit))
        .map_err(|e| Failure {
            code: e.exit_code(),
            error: e.into(),
        })
}

/// Removes the fan-out consumer: exit 1 when the stream has none of that name.
fn consumer_deregister(args: ConsumerArgs) -> Result<u8, Failure> {
    let stream = config::stream_settings(args.config.as_deref(), args.stream, None)
        .map_err(Failure::usage)?;
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    let removed = runtime.block_on(async {
        let source = crate::source::KinesisSource::connect(&stream).await;
        source.deregister_consumer().await
    });
    match removed.map_err(Failure::runtime)? {
        true => {
            println!(
                "consumer {} deregistered from stream {}",
                stream.consumer_name, stream.name
            );
            Ok(0)
        }
        false => Err(Failure::runtime(anyhow::anyhow!(
            "stream {} has no consumer named {}: nothing to deregister",
            stream.name,
            stream.consumer_name
        ))),
    }
}

fn capture(args: CaptureArgs) -> Result<u8, Failure> {
    let mut out = read_stream(&args.stream, std::io::BufWriter::new(std::io::stdout()))?;
    out.flush().map_err(Failure::runtime)?;
    Ok(0)
}

fn rules_diff(args: DiffArgs) -> Result<u8, Failure> {
    let after = load_rules(&args.rules_dir, None)?;
    let before = load_rules(&args.against, None)?;
    let records: Vec<(Option<usize>, Record)> = match &args.input {
        Some(path) => decode::read_json_lines(path)
            .map_err(Failure::usage)?
            .into_iter()
            .map(|(line, record)| (Some(line), record))
            .collect(),
        None => {
            let captured = read_stream(&args.stream, Vec::new())?;
            String::from_utf8_lossy(&captured)
                .lines()
                .filter_map(|line| serde_json::from_str::<RecordJson>(line).ok())
                .map(|r| (None, r.into_record()))
                .collect()
        }
    };
    let mut out = std::io::stdout().lock();
    diff::diff(&before, &after, records, args.output, &mut out).map_err(write_failure)?;
    Ok(0)
}

/// Opens the state file of `--state` or the config's `[state]`, with its keys (checked to
/// belong to it; never created).
fn open_state(args: &StateArgs, access: Access) -> Result<(State, Keys), Failure> {
    let settings = config::state_settings(args.config.as_deref(), args.state.clone())
        .map_err(Failure::usage)?;
    let source = KeySource {
        env: settings.key_env.as_deref(),
        file: &settings.key_file,
    };
    open_for_command(
        &settings.state_path,
        source,
        settings.fleet.as_ref(),
        access,
    )
    .map_err(|e| {
        let code = match &e {
            StateError::Key(KeyError::MissingEnv { .. } | KeyError::BadEnv { .. })
            | StateError::SharedMissing { .. } => 2,
            _ => 1,
        };
        Failure {
            code,
            error: e.into(),
        }
    })
}

/// Where a state command gets the state and writes its answer: this process (the file,
/// stdout), or the running daemon serving the command over its control channel.
struct Session<'a> {
    out: &'a mut dyn Write,
    daemon: Option<&'a Arc<Pipeline>>,
    /// Who runs the command, for the audit trail: `cli:USER`, or `console`.
    by: &'a str,
}

impl Session<'_> {
    fn open_state(&self, args: &StateArgs, access: Access) -> Result<(Arc<State>, Keys), Failure> {
        match self.daemon.map(|pipeline| &pipeline.sink) {
            Some(Sink::Live { state, keys }) => Ok((state.clone(), keys.clone())),
            _ => open_state(args, access).map(|(state, keys)| (Arc::new(state), keys)),
        }
    }

    /// What the running daemon does not do for a command: said so, nothing done.
    fn not_while_running(&self, what: &str, why: &str) -> Result<(), Failure> {
        match self.daemon {
            Some(_) => Err(Failure::runtime(anyhow::anyhow!(
                "{what} is refused while the daemon runs ({why}): stop it, then run the command again"
            ))),
            None => Ok(()),
        }
    }
}

fn state_summary(args: StateArgs, s: &mut Session) -> Result<u8, Failure> {
    let (state, _) = s.open_state(&args, Access::Read)?;
    let summary = state.summary().map_err(Failure::runtime)?;
    out!(
        s.out,
        "{}",
        serde_json::to_string_pretty(&summary).unwrap_or_default()
    );
    Ok(0)
}

/// Writes a ring with a new current key over the key file (atomically), then opens the
/// state, which records the new key and seals its dead letters again under it (an
/// interrupted rotation completes at the next open).
fn rotate_key(args: StateArgs, s: &mut Session) -> Result<u8, Failure> {
    s.not_while_running("state rotate-key", "its dead letters are in use")?;
    let settings = config::state_settings(args.config.as_deref(), args.state.clone())
        .map_err(Failure::usage)?;
    if let Some(var) = &settings.key_env {
        return Err(Failure::usage(anyhow::anyhow!(
            "the key ring is in environment variable {var}: put a new key in front of it (hex keys separated by commas, current first: NEW,OLD), then start the daemon: it records the new key and seals the dead letters again"
        )));
    }
    // Checks the key belongs to the state, and that no daemon holds it.
    let (state, keys) = open_state(&args, Access::Write)?;
    drop(state);
    let ring = keys.rotated();
    ring.write_ring(&settings.key_file)
        .map_err(Failure::runtime)?;
    let (state, ring) = open_state(&args, Access::Write)?;
    let letters = state.dead_letters().map_err(Failure::runtime)?.len();
    out!(
        s.out,
        "{}",
        serde_json::json!({
            "key_file": settings.key_file,
            "key_fingerprint": ring.fingerprints()[0],
            "key_fingerprints": ring.fingerprints(),
            "dead_letters_resealed": letters,
        })
    );
    Ok(0)
}

fn checkpoints(cmd: CheckpointsCommand, s: &mut Session) -> Result<u8, Failure> {
    match cmd {
        CheckpointsCommand::List(args) => {
            let (state, _) = s.open_state(&args, Access::Read)?;
            let out = &mut s.out;
            for (shard_id, cp) in state.checkpoints().map_err(Failure::runtime)? {
                let line = serde_json::json!({
                    "shard_id": shard_id,
                    "sequence_number": cp.sequence_number,
                    "sub_sequence_number": cp.sub_sequence_number,
                    "shard_end": cp.shard_end,
                });
                out!(out, "{line}");
            }
            Ok(0)
        }
        CheckpointsCommand::Reset { state, shard, all } => {
            s.not_while_running(
                "checkpoints reset",
                "its shards read on from the positions they hold",
            )?;
            let (state, _) = s.open_state(&state, Access::Write)?;
            let shard = if all { None } else { shard.as_deref() };
            let n = state.reset_checkpoints(shard).map_err(Failure::runtime)?;
            if let (Some(shard), 0) = (shard, n) {
                // A typo must not pass for a reset.
                let known: Vec<String> = state
                    .checkpoints()
                    .map_err(Failure::runtime)?
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect();
                return Err(Failure::runtime(anyhow::anyhow!(
                    "no checkpoint for shard {shard:?}; shards with one: {}",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )));
            }
            out!(s.out, "{n} checkpoint(s) reset");
            Ok(0)
        }
    }
}

fn dead_letters(cmd: DeadLettersCommand, s: &mut Session) -> Result<u8, Failure> {
    match cmd {
        DeadLettersCommand::List(args) => {
            let (state, _) = s.open_state(&args, Access::Read)?;
            let out = &mut s.out;
            for (id, letter) in state.dead_letters().map_err(Failure::runtime)? {
                let mut line = serde_json::to_value(&letter).unwrap_or_default();
                if let Some(fields) = line.as_object_mut() {
                    fields.remove("sealed_record");
                    fields.remove("sealed_decision");
                    fields.insert("id".into(), id.into());
                    fields.insert(
                        "created_at".into(),
                        crate::clock::rfc3339(letter.created_at_ms as i64).into(),
                    );
                }
                out!(out, "{line}");
            }
            Ok(0)
        }
        DeadLettersCommand::Retry { config, ids, all } => {
            let ids = (!all).then_some(ids);
            let failure = |e: daemon::RunError| Failure {
                code: e.exit_code(),
                error: e.into(),
            };
            let results = match s.daemon {
                // The daemon's own pipeline: its rules, actions and their limits.
                Some(pipeline) => tokio::runtime::Handle::current()
                    .block_on(daemon::retry_letters(pipeline, ids, s.by))
                    .map_err(failure)?,
                None => {
                    let settings = Settings::resolve(
                        Some(&config.config),
                        Overrides {
                            state: config.state,
                            ..Overrides::default()
                        },
                    )
                    .map_err(Failure::usage)?;
                    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
                    runtime
                        .block_on(daemon::retry_dead_letters(settings, ids, s.by))
                        .map_err(failure)?
                }
            };
            let mut failed = false;
            for (id, outcome) in results {
                let line = match outcome {
                    Retried::Resolved => serde_json::json!({"id": id, "outcome": "resolved"}),
                    Retried::StillFailing(error) => {
                        failed = true;
                        serde_json::json!({"id": id, "outcome": "still_failing", "error": error})
                    }
                    // Stopped before it settled: not a success either.
                    Retried::Interrupted => {
                        failed = true;
                        serde_json::json!({"id": id, "outcome": "interrupted"})
                    }
                };
                out!(s.out, "{line}");
            }
            Ok(u8::from(failed))
        }
        DeadLettersCommand::ToTest {
            state: args,
            id,
            keep_identifiers,
            rule,
            rules_dir,
        } => {
            let (state, keys) = s.open_state(&args, Access::Read)?;
            let letter = state.dead_letter(id).map_err(Failure::runtime)?;
            let record = crate::pipeline::letter_record(&keys, id, &letter)
                .map_err(Failure::runtime)?
                .ok_or_else(|| {
                    Failure::usage(anyhow::anyhow!(
                        "dead letter {id} is a failed action: it holds a request, not a record"
                    ))
                })?;
            let rule = match (rule, letter.rule.as_str()) {
                (Some(rule), _) => rule,
                (None, "") => {
                    return Err(Failure::usage(anyhow::anyhow!(
                        "dead letter {id} is a record that could not be decoded: no rule failed on it; name the rule whose test it is for with --rule"
                    )))
                }
                (None, rule) => rule.to_owned(),
            };
            let recorded = std::path::Path::new(&letter.rule_file).parent();
            let (rules, configured) = match (s.daemon, rules_dir) {
                (Some(pipeline), None) => {
                    (arc_swap::Guard::into_inner(pipeline.rules.load()), None)
                }
                // The command resolves it where it runs before sending it (see
                // `state_command`): a relative one here would be the daemon's.
                (Some(_), Some(dir)) if dir.is_relative() => {
                    return Err(Failure::usage(anyhow::anyhow!(
                        "the running daemon serves this command: give --rules-dir as an absolute path"
                    )))
                }
                (_, dir) => {
                    let (config_dir, names, actions) = match &args.config {
                        Some(path) => {
                            let (dir, names) =
                                config::rules_context(path).map_err(Failure::usage)?;
                            let specs = config::action_specs(path).map_err(Failure::usage)?;
                            let actions = ActionSet::new(&specs, false).map_err(Failure::usage)?;
                            (dir, Some(names), Some(actions))
                        }
                        None => (None, None, None),
                    };
                    // Else the directory the rule was in when it failed, if it is still there.
                    let dir = dir
                        .or(config_dir)
                        .or_else(|| recorded.filter(|d| d.is_dir()).map(PathBuf::from))
                        .unwrap_or_else(|| PathBuf::from("rules"));
                    (Arc::new(load_rules(&dir, names)?), actions)
                }
            };
            // The rule file by its name: the directory is the daemon's, not the test's.
            let directory = recorded
                .map(|d| format!("{}/", d.display()))
                .unwrap_or_default();
            let error = match directory.as_str() {
                "/" | "" => letter.reason.error().to_owned(),
                directory => letter.reason.error().replace(directory, ""),
            };
            let name = format!("dead letter {id}: {} ({error})", letter.reason.kind());
            let actions = configured
                .as_ref()
                .or(s.daemon.map(|pipeline| &pipeline.actions));
            let sendable = |decision: &Decision| match actions {
                Some(actions) => actions
                    .prepare(decision)
                    .map(drop)
                    .map_err(|e| e.to_string()),
                None => Ok(()),
            };
            let case = crate::rules::to_test::case(
                &rules,
                &rule,
                &record,
                keep_identifiers,
                &name,
                Some(&sendable),
            )
            .map_err(Failure::usage)?;
            out!(
                s.out,
                "{}",
                serde_json::to_string_pretty(&case).unwrap_or_default()
            );
            Ok(0)
        }
        DeadLettersCommand::Discard { state, id, reason } => {
            if let Some(pipeline) = s.daemon {
                if pipeline.letters_in_retry.lock().unwrap().contains(&id) {
                    return Err(Failure::runtime(anyhow::anyhow!(
                        "dead letter {id} is being retried now: discard it once the retry is over, if it is still pending"
                    )));
                }
            }
            let (state, _) = s.open_state(&state, Access::Write)?;
            let letter = state.dead_letter(id).map_err(Failure::runtime)?;
            state
                .commit(Writes {
                    resolved_dead_letters: vec![id],
                    audit: vec![AuditEntry::of_letter(id, &letter, "discarded", reason).by(s.by)],
                    ..Writes::default()
                })
                .map_err(Failure::runtime)?;
            out!(s.out, "dead letter {id} discarded (audited)");
            Ok(0)
        }
    }
}

fn audit(cmd: AuditCommand, s: &mut Session) -> Result<u8, Failure> {
    match cmd {
        AuditCommand::Export {
            state,
            format,
            since,
            until,
        } => {
            if let (Some(since), Some(until)) = (since, until) {
                if since >= until {
                    return Err(Failure::usage(anyhow::anyhow!(
                        "--since is not before --until: the window is empty"
                    )));
                }
            }
            let (state, _) = s.open_state(&state, Access::Read)?;
            let entries = state
                .audit(
                    since.map_or(0, |t| t.max(0) as u64),
                    until.map_or(u64::MAX, |t| t.max(0) as u64),
                )
                .map_err(Failure::runtime)?;
            let out = &mut s.out;
            match format {
                AuditFormat::Jsonl => {
                    for entry in entries {
                        let mut line = serde_json::to_value(&entry).unwrap_or_default();
                        line["time"] = crate::clock::rfc3339(entry.time_ms as i64).into();
                        if entry.request.is_some() {
                            line["nature"] = crate::requests::NATURE.into();
                        }
                        out!(out, "{line}");
                    }
                }
                AuditFormat::Csv => {
                    out!(out, "time,rule,rules_hash,action,request_id,outcome,http_status,attempts,arrival_time,regulation,due_date,note,by,request,nature,denial_code");
                    for e in entries {
                        let fields = [
                            crate::clock::rfc3339(e.time_ms as i64),
                            e.rule,
                            e.rules_hash,
                            e.action,
                            e.request_id,
                            e.outcome,
                            e.http_status.map(|s| s.to_string()).unwrap_or_default(),
                            e.attempts.to_string(),
                            e.arrival_time,
                            e.regulation,
                            e.due_date,
                            e.note.unwrap_or_default(),
                            e.by.unwrap_or_default(),
                            e.request.clone().unwrap_or_default(),
                            match e.request {
                                Some(_) => crate::requests::NATURE.to_owned(),
                                None => String::new(),
                            },
                            e.denial_code.unwrap_or_default(),
                        ];
                        let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                        out!(out, "{}", row.join(","));
                    }
                }
            }
            Ok(0)
        }
        AuditCommand::Done { state, ids } => {
            let (state, _) = s.open_state(&state, Access::Read)?;
            let ids = ids
                .iter()
                .map(|id| {
                    hex::decode(id)
                        .ok()
                        .filter(|id| id.len() == 32)
                        .ok_or_else(|| {
                            Failure::usage(anyhow::anyhow!("{id:?} is not a request id"))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let done = state.is_done_any(&ids).map_err(Failure::runtime)?;
            out!(s.out, "{done}");
            Ok(0)
        }
        AuditCommand::Lookup {
            config,
            action,
            key,
        } => {
            let (state, keys) = s.open_state(&config, Access::Read)?;
            let ids: Vec<String> = keys
                .request_ids(&action, &key)
                .iter()
                .map(hex::encode)
                .collect();
            let mut found: Option<String> = None;
            let out = &mut s.out;
            for entry in state.audit(0, u64::MAX).map_err(Failure::runtime)? {
                if ids.contains(&entry.request_id) {
                    found = Some(entry.request_id.clone());
                    let mut line = serde_json::to_value(&entry).unwrap_or_default();
                    line["time"] = crate::clock::rfc3339(entry.time_ms as i64).into();
                    out!(out, "{line}");
                }
            }
            let done = state
                .is_done_any(&keys.request_ids(&action, &key))
                .map_err(Failure::runtime)?;
            out!(
                out,
                "{}",
                // The id the trail knows it by (under the key it was written with).
                serde_json::json!({
                    "request_id": found.as_deref().unwrap_or(&ids[0]),
                    "done": done,
                    "found": found.is_some(),
                })
            );
            Ok(if found.is_some() { 0 } else { 1 })
        }
    }
}

/// The state commands: served by the daemon when one holds the state (same flags, output
/// and exit codes), run on the file otherwise.
fn state_command(command: Command) -> Result<u8, Failure> {
    if let Some(path) = state_path_of(&command) {
        if let Some(stream) = control::connect(&path) {
            let argv: Vec<String> = std::env::args().skip(1).collect();
            // The daemon runs elsewhere: a rules directory is the one here.
            let argv = match &command {
                Command::DeadLetters(DeadLettersCommand::ToTest { .. }) => absolute_rules_dir(argv),
                _ => argv,
            };
            let mut stdout = std::io::stdout().lock();
            return control::run_remote(stream, &path, argv, &mut stdout).map_err(|e| match e {
                control::RemoteError::Output(io) => write_failure(io),
                other => Failure::runtime(other),
            });
        }
    }
    let mut stdout = std::io::stdout().lock();
    let by = control::os_user();
    let mut session = Session {
        out: &mut stdout,
        daemon: None,
        by: &by,
    };
    reading_state(|| dispatch_state_command(command, &mut session))
}

/// `argv` with a `--rules-dir` made absolute against the working directory.
fn absolute_rules_dir(argv: Vec<String>) -> Vec<String> {
    let absolute = |dir: &str| match std::path::absolute(dir) {
        Ok(path) => path.display().to_string(),
        Err(_) => dir.to_owned(),
    };
    let mut out = Vec::with_capacity(argv.len());
    let mut value_next = false;
    for arg in argv {
        if value_next {
            out.push(absolute(&arg));
            value_next = false;
        } else if let Some(dir) = arg.strip_prefix("--rules-dir=") {
            out.push(format!("--rules-dir={}", absolute(dir)));
        } else {
            value_next = arg == "--rules-dir";
            out.push(arg);
        }
    }
    out
}

fn dispatch_state_command(command: Command, s: &mut Session) -> Result<u8, Failure> {
    match command {
        Command::Checkpoints(cmd) => checkpoints(cmd, s),
        Command::State(StateCommand { args, action: None }) => state_summary(args, s),
        Command::State(StateCommand {
            action: Some(StateAction::RotateKey(args)),
            ..
        }) => rotate_key(args, s),
        Command::DeadLetters(cmd) => dead_letters(cmd, s),
        Command::Audit(cmd) => audit(cmd, s),
        Command::Actions(cmd) => actions(cmd, s),
        Command::Requests(cmd) => requests(cmd, s),
        Command::Report {
            state,
            year,
            format,
        } => report(state, year, format, s),
        _ => Err(Failure::usage(anyhow::anyhow!(
            "not a command the daemon serves"
        ))),
    }
}

/// The state file a state command names (with `--config` or `--state`), if it can tell.
fn state_path_of(command: &Command) -> Option<PathBuf> {
    let (config, state) = match command {
        Command::State(StateCommand { args, action: None })
        | Command::State(StateCommand {
            action: Some(StateAction::RotateKey(args)),
            ..
        })
        | Command::Checkpoints(CheckpointsCommand::List(args))
        | Command::Checkpoints(CheckpointsCommand::Reset { state: args, .. })
        | Command::DeadLetters(DeadLettersCommand::List(args))
        | Command::DeadLetters(DeadLettersCommand::Discard { state: args, .. })
        | Command::DeadLetters(DeadLettersCommand::ToTest { state: args, .. })
        | Command::Audit(AuditCommand::Export { state: args, .. })
        | Command::Actions(ActionsCommand::List(args))
        | Command::Actions(ActionsCommand::Pause { state: args, .. })
        | Command::Actions(ActionsCommand::Resume { state: args, .. })
        | Command::Audit(AuditCommand::Done { state: args, .. })
        | Command::Requests(RequestsCommand::Show { state: args, .. })
        | Command::Requests(RequestsCommand::Extend { state: args, .. })
        | Command::Requests(RequestsCommand::Hold { state: args, .. })
        | Command::Requests(RequestsCommand::Release { state: args, .. })
        | Command::Requests(RequestsCommand::Deny { state: args, .. })
        | Command::Report { state: args, .. }
        | Command::Audit(AuditCommand::Lookup { config: args, .. }) => {
            (args.config.clone(), args.state.clone())
        }
        Command::DeadLetters(DeadLettersCommand::Retry { config, .. }) => {
            (Some(config.config.clone()), config.state.clone())
        }
        _ => return None,
    };
    // A fleet's workers serve no channel: its commands use the shared tables.
    config::state_settings(config.as_deref(), state)
        .ok()
        .filter(|settings| settings.fleet.is_none())
        .map(|settings| settings.state_path)
}

/// How the daemon serves a command sent over its control channel.
fn daemon_handler() -> control::Handler {
    Arc::new(|argv, by, pipeline, out, error| {
        let parsed = Cli::try_parse_from(
            std::iter::once("gdpr-consumer".to_owned()).chain(argv.iter().cloned()),
        );
        let result = match parsed {
            Ok(cli) => {
                let mut session = Session {
                    out,
                    daemon: Some(pipeline),
                    by,
                };
                dispatch_state_command(cli.command, &mut session)
            }
            Err(e) => Err(Failure::usage(anyhow::anyhow!("{e}"))),
        };
        match result {
            Ok(code) => code,
            Err(failure) if failure.code == 0 => 0,
            Err(failure) => {
                *error = format!("error: {:#}", failure.error);
                failure.code
            }
        }
    })
}

fn actions(cmd: ActionsCommand, s: &mut Session) -> Result<u8, Failure> {
    // The names the config gives, when it can tell (the daemon's own, or --config's).
    let configured = |args: &StateArgs, s: &Session| -> Result<Option<Vec<String>>, Failure> {
        Ok(match (s.daemon, &args.config) {
            (Some(pipeline), _) => Some(pipeline.actions.names().cloned().collect()),
            (None, Some(path)) => Some(
                config::action_specs(path)
                    .map_err(Failure::usage)?
                    .into_keys()
                    .collect(),
            ),
            (None, None) => None,
        })
    };
    let known = |name: &str, names: &Option<Vec<String>>| -> Result<(), Failure> {
        match names {
            Some(names) if !names.iter().any(|n| n == name) => {
                Err(Failure::usage(anyhow::anyhow!(
                    "no action {name:?} in the config (it has: {})",
                    names.join(", ")
                )))
            }
            _ => Ok(()),
        }
    };
    match cmd {
        ActionsCommand::List(args) => {
            let names = configured(&args, s)?;
            let (state, _) = s.open_state(&args, Access::Read)?;
            let pauses = state.pauses().map_err(Failure::runtime)?;
            let held = state.held_counts().map_err(Failure::runtime)?;
            let mut all: std::collections::BTreeSet<String> = names.into_iter().flatten().collect();
            all.extend(pauses.iter().map(|(name, _)| name.clone()));
            all.extend(held.keys().cloned());
            for name in all {
                let pause = pauses.iter().find(|(n, _)| *n == name).map(|(_, p)| p);
                let line = serde_json::json!({
                    "action": name,
                    "paused": pause.is_some(),
                    "resuming": pause.is_some_and(|p| p.resuming_since_ms.is_some()),
                    "reason": pause.map(|p| p.reason.clone()),
                    "since": pause.map(|p| crate::clock::rfc3339(p.since_ms as i64)),
                    "held": held.get(&name).copied().unwrap_or(0),
                });
                out!(s.out, "{line}");
            }
            Ok(0)
        }
        ActionsCommand::Pause {
            state: args,
            name,
            reason,
        } => {
            let names = configured(&args, s)?;
            known(&name, &names)?;
            let (state, _) = s.open_state(&args, Access::Write)?;
            // Paused again while being resumed: its requests queue up again.
            if let Some(pause) = state
                .pause(&name)
                .map_err(Failure::runtime)?
                .filter(|pause| pause.resuming_since_ms.is_none())
            {
                out!(
                    s.out,
                    "action {name} is already paused, since {} ({})",
                    crate::clock::rfc3339(pause.since_ms as i64),
                    pause.reason.escape_debug()
                );
                return Ok(0);
            }
            let pause = crate::state::Pause {
                reason: reason.clone(),
                since_ms: crate::clock::now_ms(),
                resuming_since_ms: None,
            };
            state
                .commit(Writes {
                    pauses: vec![(name.clone(), Some(pause))],
                    audit: vec![AuditEntry::of_operator(&name, "paused", Some(reason)).by(s.by)],
                    ..Writes::default()
                })
                .map_err(Failure::runtime)?;
            let unchecked = if names.is_none() {
                " (the name was not checked against a config: give --config for that)"
            } else {
                ""
            };
            out!(
                s.out,
                "action {name} paused: its requests are held until it is resumed{unchecked}"
            );
            Ok(0)
        }
        ActionsCommand::Resume { state: args, name } => {
            let (state, _) = s.open_state(&args, Access::Write)?;
            // A paused action can always be resumed, even one the config no longer has
            // (its held requests then wait, said so, until the config can send them).
            let Some(pause) = state.pause(&name).map_err(Failure::runtime)? else {
                known(&name, &configured(&args, s)?)?;
                return Err(Failure::runtime(anyhow::anyhow!(
                    "action {name} is not paused"
                )));
            };
            let held_of = |state: &State| -> Result<u64, Failure> {
                let held = state.held_counts().map_err(Failure::runtime)?;
                Ok(held.get(&name).copied().unwrap_or(0))
            };
            let held = held_of(&state)?;
            // Resumed once: a second resume adds no entry, it waits for the first.
            if pause.resuming_since_ms.is_none() {
                // Its held requests go first, in order; its new ones queue behind them
                // until none is left, then the pause ends.
                let resuming = (held > 0).then(|| crate::state::Pause {
                    resuming_since_ms: Some(crate::clock::now_ms()),
                    ..pause
                });
                state
                    .commit(Writes {
                        pauses: vec![(name.clone(), resuming)],
                        audit: vec![AuditEntry::of_operator(&name, "resumed", None).by(s.by)],
                        ..Writes::default()
                    })
                    .map_err(Failure::runtime)?;
            }
            match s.daemon {
                Some(pipeline) => {
                    let sent = tokio::runtime::Handle::current()
                        .block_on(pipeline.release_held())
                        .map_err(Failure::runtime)?;
                    // Stopped before the end (the daemon stopping, the action paused again,
                    // a request the config cannot build): not a whole resume.
                    let left = held_of(&state)?;
                    if left > 0 {
                        out!(
                            s.out,
                            "action {name} resumed: {sent} held request(s) settled, {left} still held"
                        );
                        return Err(Failure::runtime(anyhow::anyhow!(
                            "{left} request(s) of {name} are still held: the daemon is stopping, the action was paused again, or the config cannot build them (its log says which); they are sent when it can"
                        )));
                    }
                    out!(
                        s.out,
                        "action {name} resumed: {sent} held request(s) settled"
                    );
                }
                None if state.is_shared() => {
                    out!(
                        s.out,
                        "action {name} resumed: its {held} held request(s) are sent by the fleet's workers"
                    );
                }
                None => {
                    out!(
                        s.out,
                        "action {name} resumed: its {held} held request(s) are sent when the daemon starts"
                    );
                }
            }
            Ok(0)
        }
    }
}

fn requests(cmd: RequestsCommand, s: &mut Session) -> Result<u8, Failure> {
    use crate::requests::Change;
    let (args, key) = match &cmd {
        RequestsCommand::Show { state, key, .. }
        | RequestsCommand::Extend { state, key, .. }
        | RequestsCommand::Hold { state, key, .. }
        | RequestsCommand::Release { state, key }
        | RequestsCommand::Deny { state, key, .. } => (state, key.clone()),
    };
    let access = match cmd {
        RequestsCommand::Show { .. } => Access::Read,
        _ => Access::Write,
    };
    let (state, keys) = s.open_state(args, access)?;
    let ids: Vec<String> = keys.request_key_ids(&key).iter().map(hex::encode).collect();
    let Some((id, request)) = state.request(&ids).map_err(Failure::runtime)? else {
        return Err(Failure::runtime(anyhow::anyhow!(
            "no request with this key has been seen (keys are matched exactly, as the rules return them)"
        )));
    };
    let by = s.by.to_owned();
    let change = match cmd {
        RequestsCommand::Show { action, format, .. } => {
            if let Some(action) = action.as_deref() {
                if !request.actions.contains_key(action) {
                    return Err(Failure::runtime(anyhow::anyhow!(
                        "the request has no action {action:?} (it has: {})",
                        request
                            .actions
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
            let mut shown = request.shown(&id, action.as_deref(), |action, sealed| {
                let context = crate::requests::job_seal_context(&id, action);
                keys.unseal(sealed, &context)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
            });
            // A job still waiting: how often it was polled, what it said, when next.
            if let Some(actions) = shown["actions"].as_object_mut() {
                for (name, shown) in actions.iter_mut() {
                    shown["polls"] = 0.into();
                    for request_id in keys.request_ids(name, &key) {
                        let index = crate::state::job_index_key(&hex::encode(request_id));
                        let Some(job_id) =
                            state.pending_letter(&index).map_err(Failure::runtime)?
                        else {
                            continue;
                        };
                        let job = state
                            .jobs_after(job_id.saturating_sub(1), 1)
                            .map_err(Failure::runtime)?;
                        if let Some((_, job)) = job.into_iter().find(|(id, _)| *id == job_id) {
                            shown["polls"] = job.polls.into();
                            shown["last_status"] = job.last_status.into();
                            shown["next_poll"] =
                                crate::clock::rfc3339(job.next_poll_ms as i64).into();
                        }
                    }
                }
            }
            match format {
                ShowFormat::Json => out!(s.out, "{shown}"),
                ShowFormat::Human => out!(s.out, "{}", show_human(&shown)),
            }
            return Ok(0);
        }
        RequestsCommand::Extend { reason, .. } => Change::Extend { by, reason },
        RequestsCommand::Hold { reason, .. } => Change::Hold { by, reason },
        RequestsCommand::Release { .. } => Change::Release { by },
        RequestsCommand::Deny {
            reason_code, note, ..
        } => Change::Deny {
            by,
            code: reason_code,
            note,
        },
    };
    let changed = match state.change_request(&id, change.clone()) {
        Ok(Ok(changed)) => changed,
        Ok(Err(refused)) => return Err(Failure::runtime(anyhow::anyhow!("{refused}"))),
        Err(e) => return Err(Failure::runtime(e)),
    };
    let due = |ms: u64| crate::clock::rfc3339(ms as i64);
    match change {
        Change::Extend { .. } => out!(
            s.out,
            "request extended: due {} (was {}); tell the person, with the reason",
            due(changed.due_in_force_ms()),
            due(changed.due_ms)
        ),
        Change::Hold { .. } => out!(
            s.out,
            "request on legal hold: its actions are not sent until it is released"
        ),
        Change::Release { .. } | Change::Deny { .. } => {
            if let Change::Deny { .. } = change {
                settle_denied(&state, &keys, &key, &id, &changed, s)?;
            }
            let what = match change {
                Change::Release { .. } => "request released: its held actions are sent",
                _ => "request denied: nothing more is sent for it",
            };
            // Held actions settle now: sent once released, or recorded as denied.
            match s.daemon {
                Some(pipeline) => {
                    tokio::runtime::Handle::current()
                        .block_on(pipeline.release_held())
                        .map_err(Failure::runtime)?;
                    out!(s.out, "{what}");
                }
                None if state.is_shared() => out!(s.out, "{what} (by the fleet's workers)"),
                None => out!(s.out, "{what} (when the daemon starts)"),
            }
        }
        Change::Decided { .. } | Change::Action { .. } => {}
    }
    Ok(0)
}

/// A denied request's pending dead letters are settled as denied (audited): nothing more
/// is sent for it, and it waits for no retry. Its waiting jobs end at their next poll.
fn settle_denied(
    state: &State,
    keys: &Keys,
    key: &str,
    id: &str,
    request: &crate::requests::Request,
    s: &mut Session,
) -> Result<(), Failure> {
    use crate::requests::{ActionStatus, Arrival, Change};
    let mut writes = Writes::default();
    for action in request.actions.keys() {
        for request_id in keys.request_ids(action, key) {
            let index = crate::state::request_index_key(&hex::encode(request_id));
            let Some(letter_id) = state.pending_letter(&index).map_err(Failure::runtime)? else {
                continue;
            };
            if s.daemon
                .is_some_and(|p| p.letters_in_retry.lock().unwrap().contains(&letter_id))
            {
                continue; // Its retry ends on the denial by itself.
            }
            let letter = state.dead_letter(letter_id).map_err(Failure::runtime)?;
            writes.resolved_dead_letters.push(letter_id);
            writes.audit.push(
                AuditEntry::of_letter(
                    letter_id,
                    &letter,
                    "resolved",
                    "not sent: the request was denied".into(),
                )
                .by(s.by),
            );
            writes.requests.push((
                id.to_owned(),
                Change::Action {
                    arrival: Arrival {
                        arrival_time: crate::clock::rfc3339(request.arrival_ms as i64),
                        rule: request.rule.clone(),
                        regulation: request.regulation.clone(),
                    },
                    action: action.clone(),
                    status: ActionStatus::Denied,
                    attempts: 0,
                    http_status: None,
                    sealed_job: None,
                    dead_letter: None,
                    error: None,
                },
            ));
        }
    }
    if !writes.is_empty() {
        state.commit(writes).map_err(Failure::runtime)?;
    }
    Ok(())
}

/// `requests show` for people: the request, its actions, its timeline.
fn show_human(shown: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = format!(
        "request {}\n  status      {}\n  regulation  {}\n  rule        {}\n  arrived     {}\n  due         {}{}\n",
        text(&shown["request"]),
        text(&shown["status"]),
        text(&shown["regulation"]),
        text(&shown["rule"]),
        text(&shown["arrival_time"]),
        text(&shown["due_date"]),
        if shown["overdue"] == true { " (overdue)" } else { "" },
    );
    if !shown["completed_at"].is_null() {
        out += &format!("  complete    {}\n", text(&shown["completed_at"]));
    }
    for (what, field, detail) in [
        ("extended", "extension", "reason"),
        ("on hold", "hold", "reason"),
        ("denied", "denial", "code"),
    ] {
        let v = &shown[field];
        if !v.is_null() {
            out += &format!("  {what:<11} {} by {}\n", text(&v[detail]), text(&v["by"]));
        }
    }
    out += "actions\n";
    if let Some(actions) = shown["actions"].as_object() {
        for (name, a) in actions {
            out += &format!(
                "  {name}: {}, {} attempt(s){}{}{}\n",
                text(&a["status"]),
                a["attempts"],
                match &a["job_id"] {
                    serde_json::Value::Null => String::new(),
                    job if a["next_poll"].is_null() => format!(", job {}", text(job)),
                    job => format!(
                        ", job {} ({} poll(s), last: {}, next {})",
                        text(job),
                        a["polls"],
                        text(&a["last_status"]),
                        text(&a["next_poll"])
                    ),
                },
                match &a["dead_letter"] {
                    serde_json::Value::Null => String::new(),
                    id => format!(", dead letter {id}"),
                },
                match &a["error"] {
                    serde_json::Value::Null => String::new(),
                    e => format!(": {}", text(e)),
                },
            );
        }
    }
    out += "timeline";
    for e in shown["timeline"].as_array().into_iter().flatten() {
        out += &format!("\n  {}  {}", text(&e["time"]), text(&e["event"]));
        if !e["action"].is_null() {
            out += &format!(" {}", text(&e["action"]));
        }
        if !e["note"].is_null() {
            out += &format!(": {}", text(&e["note"]));
        }
        if !e["by"].is_null() {
            out += &format!(" (by {})", text(&e["by"]));
        }
    }
    out
}

/// `report`: the figures of every request that arrived in `year`, a page at a time.
fn report(
    args: StateArgs,
    year: i16,
    format: ReportFormat,
    s: &mut Session,
) -> Result<u8, Failure> {
    let (state, _) = s.open_state(&args, Access::Read)?;
    let now = crate::clock::now_ms();
    let mut report = crate::requests::Report::new(year);
    let mut after = String::new();
    loop {
        let page = state
            .requests_after(&after, 1000)
            .map_err(Failure::runtime)?;
        let Some((last, _)) = page.last() else { break };
        after = last.clone();
        for (_, request) in &page {
            report.add(request, now);
        }
    }
    let report = report.finish();
    match format {
        ReportFormat::Json => out!(s.out, "{}", report.to_json()),
        ReportFormat::Csv => out!(s.out, "{}", report.to_csv().trim_end()),
        ReportFormat::Human => out!(s.out, "{}", report.to_human().trim_end()),
    }
    Ok(0)
}

/// Runs a command that reads the state file. redb may panic on pages a damaged file holds
/// (its open is checked, not every page): that is exit 1 saying what to restore, not a
/// crash with an undocumented exit code.
fn reading_state(command: impl FnOnce() -> Result<u8, Failure>) -> Result<u8, Failure> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(command));
    std::panic::set_hook(hook);
    result.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Err(Failure::runtime(anyhow::anyhow!(
            "the state file cannot be read: it is damaged ({message}); restore it, with its key, from the last backup"
        )))
    })
}

/// Output that cannot be written is an error (exit 1), but for a reader that went away.
fn write_failure(e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Failure::broken_pipe()
    } else {
        Failure::runtime(anyhow::Error::new(e).context("cannot write to stdout"))
    }
}

/// A CSV field, quoted when it must be (RFC 4180). A field that a spreadsheet would run as a formula (`=`, `+`, `-`, `@` first) starts with
/// a `'`, so an exported note cannot run in the auditor's spreadsheet.
fn csv_field(field: &str) -> String {
    let field = if field.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{field}")
    } else {
        field.to_owned()
    };
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_fields_cannot_run_as_spreadsheet_formulas() {
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("-1"), "'-1");
        assert_eq!(csv_field("@sum"), "'@sum");
        assert_eq!(csv_field("plain note"), "plain note");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }

    #[test]
    fn a_day_is_a_whole_day_at_either_end_of_a_window() {
        let since = parse_since("2026-11-30").unwrap();
        let until = parse_until("2026-11-30").unwrap();
        assert_eq!(since, parse_time("2026-11-30T00:00:00Z").unwrap());
        assert_eq!(until, parse_time("2026-12-01T00:00:00Z").unwrap());
        assert!(parse_since("yesterday").is_err());
    }
}
