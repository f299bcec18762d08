//! Which statements of a rule ran on a record, for `rules explain` and `rules test
//! --coverage`: an engine like the daemon's, with Rhai's debugger stepping through every
//! statement and expression. The daemon's own engine has no debugger registered, so its
//! calls only pay Rhai's check for one.
//!
//! Statements are read from the compiled rule (its functions' bodies, as Rhai will run
//! them), not from its text.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;

use rhai::debugger::{DebuggerCommand, DebuggerEvent};
use rhai::{ASTNode, Engine, Expr, Position, Stmt, AST};

/// A statement's place as the debugger reports it when the statement runs: (line, column).
pub type Place = (usize, usize);

/// One statement of a rule's functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statement {
    /// The line it starts on, in the rule file.
    pub line: usize,
    /// A `return` (not a `throw`).
    pub is_return: bool,
}

/// Every statement of the rule's functions (top-level statements such as `const
/// PREFILTER` run once at load, not per record), and every `switch` arm that is a plain
/// expression, by the place the debugger reports.
pub fn statements(ast: &AST) -> BTreeMap<Place, Statement> {
    let mut found = BTreeMap::new();
    ast.clone_functions_only().walk(&mut |path: &[ASTNode]| {
        let Some(ASTNode::Stmt(stmt)) = path.last() else {
            return true;
        };
        if matches!(stmt, Stmt::Noop(..) | Stmt::Block(..)) {
            return true;
        }
        // An expression statement is reported by its expression's position (an operator's,
        // say), not where it starts.
        let reported = match stmt {
            Stmt::Expr(expr) => expr.position(),
            other => other.position(),
        };
        if let (Some(place), Some(line)) = (place(reported), stmt.position().line()) {
            let is_return = matches!(stmt, Stmt::Return(_, flags, _) if flags.is_empty());
            found.insert(place, Statement { line, is_return });
        }
        // A `switch` arm that is a plain expression (`1 => "low"`) is a unit of its own to
        // run, like a statement; an arm that is a block has its statements counted.
        if let Stmt::Switch(switch, _) = stmt {
            for arm in &switch.1.expressions {
                if matches!(arm.rhs, Expr::Stmt(..)) {
                    continue;
                }
                let at = arm.rhs.position();
                if let (Some(place), Some(line)) = (place(at), at.line()) {
                    found.insert(
                        place,
                        Statement {
                            line,
                            is_return: false,
                        },
                    );
                }
            }
        }
        true
    });
    found
}

fn place(position: Position) -> Option<Place> {
    Some((position.line()?, position.position()?))
}

/// What ran during one traced call.
#[derive(Debug, Default)]
pub struct Ran {
    /// The places of every statement and expression evaluated.
    pub places: HashSet<Place>,
    /// The last statement evaluated in the called function itself (not in a function it
    /// called): where it returned, when it returned nothing.
    pub last: Option<Place>,
}

struct Recorder {
    statements: HashSet<Place>,
    /// The call level of the called function's own statements.
    level: Option<usize>,
    ran: Ran,
}

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

/// Runs `call` (one call on [`engine`]) and returns what ran in it, given the rule's
/// [`statements`].
pub fn record<T>(statements: &BTreeMap<Place, Statement>, call: impl FnOnce() -> T) -> (T, Ran) {
    RECORDER.with(|r| {
        *r.borrow_mut() = Some(Recorder {
            statements: statements.keys().copied().collect(),
            level: None,
            ran: Ran::default(),
        })
    });
    let result = call();
    let ran = RECORDER.with(|r| r.borrow_mut().take().map(|r| r.ran).unwrap_or_default());
    (result, ran)
}

/// The sandboxed engine with the debugger stepping into everything (built once).
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut engine = super::engine::sandboxed();
        // Rhai marks its debugging interface as volatile, not as going away.
        #[allow(deprecated)]
        engine.register_debugger(
            |_, debugger| debugger,
            |context, event, _node, _source, position| {
                if matches!(event, DebuggerEvent::Start | DebuggerEvent::Step) {
                    if let Some(at) = place(position) {
                        let level = context.call_level();
                        RECORDER.with(|r| {
                            if let Some(r) = r.borrow_mut().as_mut() {
                                let own = *r.level.get_or_insert(level);
                                r.ran.places.insert(at);
                                if level == own && r.statements.contains(&at) {
                                    r.ran.last = Some(at);
                                }
                            }
                        });
                    }
                }
                Ok(DebuggerCommand::StepInto)
            },
        );
        engine
    })
}
