//! The sandboxed Rhai engine: the standard library minus everything that reaches outside
//! (no `eval`, `import`, `sleep` or printing), bounded in operations, depth and size.

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicBlobPackage, BasicFnPackage, BasicIteratorPackage,
    BasicMapPackage, BasicMathPackage, BasicStringPackage, BitFieldPackage, LogicPackage,
    MoreStringPackage, Package,
};
use rhai::{Engine, EvalAltResult};

/// Operations one `decide` call may run before it is stopped.
pub const MAX_OPERATIONS: u64 = 200_000;

pub fn sandboxed() -> Engine {
    // `new_raw` has no packages, no module resolver (so `import` fails) and prints nowhere.
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
    engine.set_max_operations(MAX_OPERATIONS);
    engine.set_max_call_levels(32);
    engine.set_max_expr_depths(64, 32);
    engine.set_max_string_size(2 * 1024 * 1024);
    engine.set_max_array_size(100_000);
    engine.set_max_map_size(100_000);
    engine
}

/// The kind of a runtime error, without any value it may quote (safe to log).
pub fn error_kind(err: &EvalAltResult) -> String {
    let kind = match err {
        EvalAltResult::ErrorRuntime(..) => "the rule threw an exception",
        EvalAltResult::ErrorTooManyOperations(..) => "too many operations",
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
