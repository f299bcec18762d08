//! The running rule set and its hot reload.
//!
//! A reload (any change in the rules directory, debounced, or SIGHUP) compiles the whole set
//! and runs every test case; only if all pass does the new set replace the old one, whole,
//! between records. Otherwise the old set keeps running and the daemon says, until a good set
//! loads, that its rules are stale.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use notify::Watcher;

use super::testing::{self, Failure};
use super::{RuleError, RuleSet};
use crate::shutdown::Shutdown;

/// Quiet time after the last change before reloading (editors write, rename, delete).
const DEBOUNCE: Duration = Duration::from_millis(300);
/// How often a daemon running stale rules says so again.
const STALE_REMINDER: Duration = Duration::from_secs(60);

/// Why a rule set was refused.
#[derive(Debug)]
pub struct LoadFailure {
    pub errors: Vec<RuleError>,
    pub failures: Vec<Failure>,
    pub passed: usize,
}

impl std::fmt::Display for LoadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        for c in &self.failures {
            writeln!(
                f,
                "  test failed: {} / {}: expected {}, got {}",
                c.rule, c.case, c.expected, c.actual
            )?;
        }
        if !self.failures.is_empty() {
            write!(
                f,
                "  {} passed, {} failed",
                self.passed,
                self.failures.len()
            )?;
        }
        Ok(())
    }
}

/// Compiles the rules in `dir` and runs their tests; the set is usable only if all pass.
pub fn load_tested(dir: &Path, actions: &BTreeSet<String>) -> Result<RuleSet, LoadFailure> {
    let refuse = |errors| LoadFailure {
        errors,
        failures: Vec::new(),
        passed: 0,
    };
    let set = RuleSet::load(dir, Some(actions.clone())).map_err(refuse)?;
    for ignored in set.ignored() {
        tracing::warn!(path = %ignored.path.display(), reason = ignored.reason, "not loaded as a rule");
    }
    let report = testing::run(&set).map_err(refuse)?;
    for rule in &report.untested {
        tracing::warn!(rule, "rule has no test cases");
    }
    if !report.failures.is_empty() {
        return Err(LoadFailure {
            errors: Vec::new(),
            failures: report.failures,
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
}

/// The running rule set, swapped whole by a reload.
pub struct Rules {
    current: ArcSwap<RuleSet>,
    status: Mutex<RulesStatus>,
    dir: PathBuf,
    actions: BTreeSet<String>,
}

impl Rules {
    pub fn new(set: RuleSet, dir: PathBuf, actions: BTreeSet<String>) -> Self {
        let status = RulesStatus {
            hash: set.hash().to_owned(),
            stale: false,
            loaded: set.rules().len(),
            last_error: None,
            reloads_ok: 0,
            reloads_failed: 0,
        };
        Self {
            current: ArcSwap::from_pointee(set),
            status: Mutex::new(status),
            dir,
            actions,
        }
    }

    /// The set to use for one record.
    pub fn load(&self) -> Guard<Arc<RuleSet>> {
        self.current.load()
    }

    pub fn status(&self) -> RulesStatus {
        self.status.lock().unwrap().clone()
    }

    /// Compiles and tests the rules directory; installs the result only if all is well.
    pub fn reload(&self, cause: Cause) {
        let result = load_tested(&self.dir, &self.actions);
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
                    %cause,
                    running = %status.hash,
                    "rules reload refused; the previous rules keep running and are stale:\n{failure}"
                );
            }
        }
    }
}

/// Reloads on changes in the rules directory (debounced) and on SIGHUP, until shutdown.
pub async fn watch(rules: Arc<Rules>, shutdown: Shutdown) -> Result<(), notify::Error> {
    let (tx, mut changes) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&rules.dir, notify::RecursiveMode::NonRecursive)?;
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
            _ = reminder.tick() => {
                let status = rules.status();
                if status.stale {
                    tracing::warn!(running = %status.hash, "rules are stale: the last reload was refused:\n{}", status.last_error.unwrap_or_default());
                }
                continue;
            }
            _ = shutdown.triggered() => return Ok(()),
        };
        let rules = rules.clone();
        let _ = tokio::task::spawn_blocking(move || rules.reload(cause)).await;
    }
}
