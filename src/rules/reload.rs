//! The running rule set and its hot reload.
//!
//! A reload (any change in the rules directory, debounced, or SIGHUP) compiles the whole set
//! and runs every test case; only if all pass does the new set replace the old one, whole,
//! between records. Otherwise the old set keeps running and the daemon says, until a good set
//! loads, that its rules are stale.
//!
//! Deploys replace the directory rather than edit it (`rm -rf rules; mkdir rules`, or a
//! symlink `rules -> release-2` swapped with `ln -sfn release-3 rules`), and a watch on the
//! directory itself dies with it. So the parent is watched for the directory's own entry,
//! and the directory is watched where it resolves to now, re-armed after every change and
//! SIGHUP. While it cannot be watched, the rules are reported stale, not silently frozen.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use notify::Watcher;

use super::testing::{self, Failure, SendCheck, Unsendable};
use super::{Decision, RuleError, RuleSet};
use crate::shutdown::Shutdown;

/// Quiet time after the last change before reloading (editors write, rename, delete).
const DEBOUNCE: Duration = Duration::from_millis(300);
/// How often a daemon running stale rules says so again.
const STALE_REMINDER: Duration = Duration::from_secs(60);
/// How often a lost watch is tried again (the directory may be back without an event the
/// parent watch sees, e.g. a symlink's target re-created elsewhere).
const REARM_RETRY: Duration = Duration::from_secs(2);

/// Why a rule set was refused. Its `Display` goes to the daemon's log, `/status` and the
/// console: it names the failing cases and how they failed, never their expected or actual
/// decisions (keys, params, thrown messages that may hold a record's values); `rules test`
/// shows those to the author.
#[derive(Debug)]
pub struct LoadFailure {
    pub errors: Vec<RuleError>,
    pub failures: Vec<Failure>,
    pub unsendable: Vec<Unsendable>,
    pub passed: usize,
}

impl std::fmt::Display for LoadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for e in &self.errors {
            match e {
                // A test file that does not parse: the parser's message may quote a value.
                RuleError::Compile { location, .. }
                    if location.file.to_string_lossy().ends_with(".test.json") =>
                {
                    writeln!(
                        f,
                        "  {location}: invalid test cases (`rules test` says why)"
                    )?
                }
                e => writeln!(f, "  {e}")?,
            }
        }
        for c in &self.failures {
            let case = testing::escape_controls(&c.case, false);
            writeln!(f, "  test failed: {} / {case}: {}", c.rule, c.kind)?;
        }
        for c in &self.unsendable {
            writeln!(f, "  test failed: {c}")?;
        }
        let failed = self.failures.len() + self.unsendable.len();
        if failed > 0 {
            write!(
                f,
                "  {} passed, {failed} failed (`rules test` shows expected and actual)",
                self.passed
            )?;
        }
        Ok(())
    }
}

/// Whether the configured actions can send a decision: owned by [`Rules`] for reloads.
pub type Sendable = Arc<dyn Fn(&Decision) -> Result<(), String> + Send + Sync>;

/// Compiles the rules in `dir` and runs their tests; the set is usable only if all pass,
/// and only if `sendable` accepts every decision the cases expect (a rule whose requests the
/// config cannot send would dead-letter each one live).
pub fn load_tested(
    dir: &Path,
    actions: &BTreeSet<String>,
    sendable: SendCheck,
) -> Result<RuleSet, LoadFailure> {
    let refuse = |errors| LoadFailure {
        errors,
        failures: Vec::new(),
        unsendable: Vec::new(),
        passed: 0,
    };
    let set = RuleSet::load(dir, Some(actions.clone())).map_err(refuse)?;
    for ignored in set.ignored() {
        tracing::warn!(path = %ignored.path.display(), reason = ignored.reason, "not loaded as a rule");
    }
    let report = testing::run(&set, Some(sendable)).map_err(refuse)?;
    for rule in &report.untested {
        tracing::warn!(rule, "rule has no test cases");
    }
    if report.failed() > 0 {
        return Err(LoadFailure {
            errors: Vec::new(),
            failures: report.failures,
            unsendable: report.unsendable,
            passed: report.passed,
        });
    }
    Ok(set)
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    DirectoryChanged,
    Sighup,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cause::DirectoryChanged => "rules directory changed",
            Cause::Sighup => "SIGHUP",
        })
    }
}

/// What the daemon reports about its rules.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RulesStatus {
    /// Hash of the running set.
    pub hash: String,
    /// The last reload failed: the running set is older than the rules directory.
    pub stale: bool,
    /// Rules in the running set.
    pub loaded: usize,
    pub last_error: Option<String>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Why the rules directory is not watched now (edits would go unseen), if it is not.
    pub watch_lost: Option<String>,
}

/// The running rule set, swapped whole by a reload.
pub struct Rules {
    current: ArcSwap<RuleSet>,
    status: Mutex<RulesStatus>,
    dir: PathBuf,
    actions: BTreeSet<String>,
    sendable: Sendable,
}

impl Rules {
    pub fn new(set: RuleSet, dir: PathBuf, actions: BTreeSet<String>, sendable: Sendable) -> Self {
        let status = RulesStatus {
            hash: set.hash().to_owned(),
            stale: false,
            loaded: set.rules().len(),
            last_error: None,
            reloads_ok: 0,
            reloads_failed: 0,
            watch_lost: None,
        };
        Self {
            current: ArcSwap::from_pointee(set),
            status: Mutex::new(status),
            dir,
            actions,
            sendable,
        }
    }

    /// The set to use for one record.
    pub fn load(&self) -> Guard<Arc<RuleSet>> {
        self.current.load()
    }

    /// What the next reload would run: the rules on disk, compiled and tested, or why it
    /// would be refused (the set in force would stay).
    pub fn on_disk(&self) -> Result<RuleSet, LoadFailure> {
        load_tested(&self.dir, &self.actions, &*self.sendable)
    }

    /// The status; rules whose directory is not watched are stale too: the directory may
    /// hold edits the daemon cannot see.
    pub fn status(&self) -> RulesStatus {
        let mut status = self.status.lock().unwrap().clone();
        if let Some(lost) = &status.watch_lost {
            status.stale = true;
            status.last_error.get_or_insert_with(|| lost.clone());
        }
        status
    }

    /// Records whether the directory is watched; logs only when that changes.
    fn set_watch_lost(&self, lost: Option<String>) {
        let mut status = self.status.lock().unwrap();
        match (&status.watch_lost, &lost) {
            (None, Some(why)) => tracing::error!(
                event = "rules_watch_lost",
                dir = %self.dir.display(),
                "rules_watch_lost: {why}; edits to the rules are not seen until it can be \
                 watched again (retried every {} s, and on SIGHUP); the rules are stale",
                REARM_RETRY.as_secs()
            ),
            (Some(_), None) => {
                tracing::info!(dir = %self.dir.display(), "watching the rules directory again")
            }
            _ => {}
        }
        status.watch_lost = lost;
    }

    /// Compiles and tests the rules directory; installs the result only if all is well.
    pub fn reload(&self, cause: Cause) {
        let result = load_tested(&self.dir, &self.actions, &*self.sendable);
        let mut status = self.status.lock().unwrap();
        match result {
            Ok(set) => {
                let changed = set.hash() != status.hash;
                let was_stale = status.stale;
                status.hash = set.hash().to_owned();
                status.loaded = set.rules().len();
                status.stale = false;
                status.last_error = None;
                status.reloads_ok += 1;
                self.current.store(Arc::new(set));
                // An operator's SIGHUP always gets an answer; an editor's temp file does not.
                if changed || was_stale || cause == Cause::Sighup {
                    tracing::info!(%cause, hash = %status.hash, rules = status.loaded, changed, "rules reloaded");
                } else {
                    tracing::debug!(%cause, "rules unchanged");
                }
            }
            Err(failure) => {
                status.stale = true;
                status.last_error = Some(failure.to_string());
                status.reloads_failed += 1;
                tracing::error!(
                    event = "rules_reload_refused",
                    %cause,
                    running = %status.hash,
                    "rules reload refused; the previous rules keep running and are stale:\n{failure}"
                );
            }
        }
    }
}

/// The watches on the rules directory: its parent (for the directory's own entry being
/// removed, re-created, renamed over or re-linked) and what the directory resolves to now.
struct DirWatch {
    watcher: notify::RecommendedWatcher,
    /// The directory as configured, absolute (it may be a symlink).
    dir: PathBuf,
    /// Where it resolved to when last armed; `None` while it cannot be watched.
    armed: Option<PathBuf>,
}

impl DirWatch {
    /// Watches the directory where it resolves to now. Done after every change and SIGHUP:
    /// a watch on a directory that was removed or swapped out sees nothing more.
    fn rearm(&mut self) -> Result<(), String> {
        if let Some(old) = self.armed.take() {
            // Gone already if the directory was removed; that is fine.
            let _ = self.watcher.unwatch(&old);
        }
        let target = std::fs::canonicalize(&self.dir)
            .map_err(|e| format!("cannot watch {}: {e}", self.dir.display()))?;
        self.watcher
            .watch(&target, notify::RecursiveMode::NonRecursive)
            .map_err(|e| format!("cannot watch {}: {e}", target.display()))?;
        self.armed = Some(target);
        Ok(())
    }
}

/// Reloads on changes in the rules directory (debounced) and on SIGHUP, until shutdown.
pub async fn watch(rules: Arc<Rules>, shutdown: Shutdown) -> Result<(), notify::Error> {
    let dir = std::path::absolute(&rules.dir).unwrap_or_else(|_| rules.dir.clone());
    let parent = dir
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_owned);
    let (tx, mut changes) = tokio::sync::mpsc::channel::<()>(1);
    let (entry, parent_dir) = (dir.clone(), parent.clone());
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            // A lost or overflowing watch: re-arm and reload to be sure.
            Err(_) => true,
            Ok(e) if e.kind.is_access() => false,
            Ok(e) if e.paths.is_empty() => true,
            // In the parent, only the directory's own entry counts (the state file may sit
            // beside it and change all the time); anything else comes from the directory.
            Ok(e) => e
                .paths
                .iter()
                .any(|p| p == &entry || p.parent() != Some(parent_dir.as_path())),
        };
        if relevant {
            let _ = tx.try_send(());
        }
    });
    let lost = |e: &notify::Error| {
        rules.set_watch_lost(Some(format!(
            "cannot watch {}: {e}; hot reload is off",
            parent.display()
        )))
    };
    let mut watcher = watcher.inspect_err(lost)?;
    watcher
        .watch(&parent, notify::RecursiveMode::NonRecursive)
        .inspect_err(lost)?;
    let mut watch = DirWatch {
        watcher,
        dir,
        armed: None,
    };
    rules.set_watch_lost(watch.rearm().err());
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| notify::Error::generic(&format!("cannot listen for SIGHUP: {e}")))?;
    let mut reminder = tokio::time::interval(STALE_REMINDER);
    reminder.tick().await;
    loop {
        let cause = tokio::select! {
            Some(()) = changes.recv() => {
                // Wait until the directory is quiet.
                while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, changes.recv()).await {}
                Cause::DirectoryChanged
            }
            Some(()) = hangup.recv() => Cause::Sighup,
            _ = tokio::time::sleep(REARM_RETRY), if watch.armed.is_none() => {
                if watch.rearm().is_err() {
                    continue;
                }
                Cause::DirectoryChanged
            }
            _ = reminder.tick() => {
                let status = rules.status();
                if status.stale {
                    tracing::warn!(event = "rules_stale", running = %status.hash, "rules are stale: the last reload was refused or the directory is not watched:\n{}", status.last_error.unwrap_or_default());
                }
                continue;
            }
            _ = shutdown.triggered() => return Ok(()),
        };
        // Before the reload: an edit made while re-arming is read by the reload.
        rules.set_watch_lost(watch.rearm().err());
        let rules = rules.clone();
        let _ = tokio::task::spawn_blocking(move || rules.reload(cause)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the log and `/status` say of a failing case: its rule, its name (control
    /// characters escaped) and how it failed; never the expected or actual decisions.
    #[test]
    fn a_refusal_names_the_case_and_the_kind_only() {
        let failure = LoadFailure {
            errors: Vec::new(),
            failures: vec![Failure {
                rule: "r".into(),
                case: "bell \u{7}".into(),
                expected: r#"{"key":"PII-1"}"#.into(),
                actual: r#"{"key":"PII-2"}"#.into(),
                kind: "the decisions differ in: key".into(),
            }],
            unsendable: Vec::new(),
            passed: 2,
        };
        let text = failure.to_string();
        assert!(!text.contains("PII"), "{text}");
        assert!(
            text.contains("test failed: r / bell \\u{7}: the decisions differ in: key"),
            "{text}"
        );
        assert!(text.contains("2 passed, 1 failed"), "{text}");
    }
}
