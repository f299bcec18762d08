//! The sandboxed Rhai engine: the standard library minus everything that reaches outside
//! (no `eval`, `import`, `sleep` or printing), strict variables, bounded in operations,
//! call depth, expression depth, data sizes and wall-clock time per call; plus a few pure
//! helpers compliance staff need.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicBlobPackage, BasicFnPackage, BasicIteratorPackage,
    BasicMapPackage, BasicMathPackage, BasicStringPackage, BitFieldPackage, LogicPackage,
    MoreStringPackage, Package,
};
use rhai::{Dynamic, Engine, EvalAltResult, Position};
use sha2::{Digest, Sha256};

/// Operations one `decide` call may run before it is stopped.
pub const MAX_OPERATIONS: u64 = 200_000;
/// Wall-clock time one `decide` call may take (collection growth can be slow per operation).
pub const MAX_DURATION: Duration = Duration::from_millis(50);
/// Largest string a rule may build (1 MiB).
pub const MAX_STRING: usize = 1 << 20;
/// Largest array or map a rule may build.
pub const MAX_COLLECTION: usize = 10_000;
/// Compiled regex patterns kept per thread.
const REGEX_CACHE: usize = 256;

thread_local! {
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    static REGEXES: RefCell<HashMap<String, regex::Regex>> = RefCell::new(HashMap::new());
}

/// Runs `f` (one rule call) under the wall-clock deadline.
pub fn with_deadline<T>(f: impl FnOnce() -> T) -> T {
    DEADLINE.with(|d| d.set(Some(Instant::now() + MAX_DURATION)));
    let result = f();
    DEADLINE.with(|d| d.set(None));
    result
}

pub fn sandboxed() -> Engine {
    // `new_raw` has no packages and no module resolver, so `import` fails.
    let mut engine = Engine::new_raw();
    // Not `LanguageCorePackage`: it holds `sleep`. Not the time package: rules are pure.
    engine.register_global_module(ArithmeticPackage::new().as_shared_module());
    engine.register_global_module(LogicPackage::new().as_shared_module());
    engine.register_global_module(BasicStringPackage::new().as_shared_module());
    engine.register_global_module(MoreStringPackage::new().as_shared_module());
    engine.register_global_module(BasicIteratorPackage::new().as_shared_module());
    engine.register_global_module(BasicFnPackage::new().as_shared_module());
    engine.register_global_module(BitFieldPackage::new().as_shared_module());
    engine.register_global_module(BasicMathPackage::new().as_shared_module());
    engine.register_global_module(BasicArrayPackage::new().as_shared_module());
    engine.register_global_module(BasicBlobPackage::new().as_shared_module());
    engine.register_global_module(BasicMapPackage::new().as_shared_module());
    engine.disable_symbol("eval");
    // `print` and `debug` go nowhere: never to stdout, never payloads into logs.
    engine.on_print(|_| {});
    engine.on_debug(|_, _, _| {});
    engine.set_strict_variables(true);
    engine.set_max_operations(MAX_OPERATIONS);
    engine.set_max_call_levels(32);
    engine.set_max_expr_depths(64, 32);
    engine.set_max_string_size(MAX_STRING);
    engine.set_max_array_size(MAX_COLLECTION);
    engine.set_max_map_size(MAX_COLLECTION);
    engine.on_progress(|operations| {
        if operations % 256 != 0 {
            return None;
        }
        DEADLINE.with(|d| match d.get() {
            Some(deadline) if Instant::now() >= deadline => Some(Dynamic::from("deadline")),
            _ => None,
        })
    });
    register_helpers(&mut engine);
    engine
}

/// Pure helpers Rhai lacks. Each accepts `()` (a missing field) for any argument and then
/// answers `()` or false, as the guide promises (a unit test holds every helper it lists to
/// that).
fn register_helpers(engine: &mut Engine) {
    engine.register_fn("regex_match", |text: &str, pattern: &str| {
        with_regex(pattern, |re| re.is_match(text))
    });
    engine.register_fn("regex_match", |_: (), _: &str| false);
    engine.register_fn("regex_match", |_: &str, _: ()| false);
    engine.register_fn("regex_match", |_: (), _: ()| false);
    engine.register_fn("regex_capture", |text: &str, pattern: &str| {
        with_regex(pattern, |re| match re.captures(text) {
            Some(caps) => caps
                .get(1)
                .or_else(|| caps.get(0))
                .map_or(Dynamic::UNIT, |m| m.as_str().into()),
            None => Dynamic::UNIT,
        })
    });
    engine.register_fn("regex_capture", |_: (), _: &str| ());
    engine.register_fn("regex_capture", |_: &str, _: ()| ());
    engine.register_fn("regex_capture", |_: (), _: ()| ());
    engine.register_fn("lower", |text: &str| text.to_lowercase());
    engine.register_fn("lower", |_: ()| ());
    engine.register_fn("trimmed", |text: &str| text.trim().to_owned());
    engine.register_fn("trimmed", |_: ()| ());
    engine.register_fn("sha256_hex", |text: &str| hex::encode(Sha256::digest(text)));
    engine.register_fn("sha256_hex", |_: ()| ());
    // JSON inside a string (a CloudWatch Logs event's `message`, say); `()` if it is not JSON.
    engine.register_fn("parse_json", |text: &str| {
        serde_json::from_str::<Dynamic>(text).unwrap_or(Dynamic::UNIT)
    });
    engine.register_fn("parse_json", |_: ()| ());
}

/// Compiles a pattern once per thread (bounded in size, so a hostile pattern fails fast).
fn with_regex<T>(
    pattern: &str,
    f: impl FnOnce(&regex::Regex) -> T,
) -> Result<T, Box<EvalAltResult>> {
    REGEXES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if !cache.contains_key(pattern) {
            let re = regex::RegexBuilder::new(pattern)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| {
                    Box::new(EvalAltResult::ErrorRuntime(
                        format!("invalid regex: {e}").into(),
                        Position::NONE,
                    ))
                })?;
            if cache.len() >= REGEX_CACHE {
                cache.clear();
            }
            cache.insert(pattern.to_owned(), re);
        }
        Ok(f(&cache[pattern]))
    })
}

/// The kind of a runtime error, without any value it may quote (safe to log).
pub fn error_kind(err: &EvalAltResult) -> String {
    let kind = match err {
        EvalAltResult::ErrorRuntime(..) => "the rule threw an exception",
        EvalAltResult::ErrorTooManyOperations(..) => "too many operations",
        EvalAltResult::ErrorTerminated(..) => "took too long",
        EvalAltResult::ErrorStackOverflow(..) => "call stack overflow",
        EvalAltResult::ErrorDataTooLarge(..) => "data too large",
        EvalAltResult::ErrorFunctionNotFound(..) => "function not found",
        EvalAltResult::ErrorMismatchDataType(..) | EvalAltResult::ErrorMismatchOutputType(..) => {
            "wrong data type"
        }
        EvalAltResult::ErrorIndexNotFound(..)
        | EvalAltResult::ErrorArrayBounds(..)
        | EvalAltResult::ErrorStringBounds(..)
        | EvalAltResult::ErrorBitFieldBounds(..) => "index out of bounds",
        EvalAltResult::ErrorArithmetic(..) => "arithmetic error",
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _) => return error_kind(inner),
        EvalAltResult::ErrorAssignmentToConstant(..) => "assignment to a constant",
        EvalAltResult::ErrorVariableNotFound(..) => "variable not found",
        _ => "runtime error",
    };
    kind.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The helpers `docs/rules.md` lists, with their number of arguments: the test below
    /// follows the guide, so a helper added there is held to its promise too.
    fn documented_helpers() -> Vec<(String, usize)> {
        let guide = include_str!("../../docs/rules.md");
        let section = guide
            .split("| helper | result |")
            .nth(1)
            .expect("the guide has a helpers table");
        let helpers: Vec<(String, usize)> = section
            .lines()
            .skip(2)
            .take_while(|line| line.starts_with("| `"))
            .map(|line| {
                let call = line[3..].split('`').next().unwrap();
                let (name, args) = call.split_once('(').unwrap();
                (name.to_owned(), args.split(',').count())
            })
            .collect();
        assert!(helpers.len() >= 6, "{helpers:?}");
        helpers
    }

    #[test]
    fn every_documented_helper_accepts_unit_in_every_argument() {
        let engine = sandboxed();
        for (name, arity) in documented_helpers() {
            // `()` in each argument alone (the others given), then in all of them.
            let mut calls = Vec::new();
            for missing in 0..arity {
                let args: Vec<&str> = (0..arity)
                    .map(|i| if i == missing { "()" } else { "\"x\"" })
                    .collect();
                calls.push(format!("{name}({})", args.join(", ")));
            }
            calls.push(format!("{name}({})", vec!["()"; arity].join(", ")));
            for call in calls {
                let result = engine
                    .eval::<Dynamic>(&call)
                    .unwrap_or_else(|e| panic!("{call}: {e}"));
                assert!(
                    result.is_unit() || result.as_bool() == Ok(false),
                    "{call} gave {result:?}"
                );
            }
        }
    }
}
