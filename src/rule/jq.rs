//! jq programs for `filter` and `transform`, run by jaq.
//!
//! Programs are compiled once when the config loads; a compile error is a config error.
//! The sandbox: `env` (which would expose secrets) and `input`/`inputs` are not available,
//! `halt` becomes an ordinary error instead of exiting the process, and a program may
//! emit at most [`MAX_OUTPUTS`] values per message.
//!
//! **Deadline.** jaq has no cancellation, so every run carries a [`Deadline`] that is
//! checked from inside the interpreter. The run's global data (jaq's [`DataT`]) is a
//! `Meter` whose `clone` counts a step, and jaq clones its context at every step a loop
//! takes: each call of a definition (which is how `repeat`, `recurse`, `while`, `until`
//! and every recursive `def` loop), each item a `reduce`/`foreach` folds, each value a
//! pipe or a comma passes on. The one native generator, `range`, is replaced by a copy
//! that counts a step per value, so `[range(1e12)]` and `last(range(1e12))` are caught
//! too. Every [`CLOCK_EVERY`] steps the clock is read; past the deadline the run unwinds
//! (with [`std::panic::resume_unwind`], which prints nothing) to [`JqProgram::run`],
//! which reports [`RunError::Deadline`]. Every few steps the run also measures how far
//! the stack grew since it started: recursion deeper than [`MAX_STACK`] is
//! [`RunError::TooDeep`] instead of a stack overflow, which would abort the process.
//! Nothing outlives the run: its state is its own, and the compiled program is never
//! mutated.
//!
//! What the deadline cannot stop is a single native operation on a huge value (`"x" *
//! 1000000000`, sorting a million-element array): it ends on its own, and the next step
//! stops the run.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use jaq_core::data::{DataT, HasLut};
use jaq_core::load::{Arena, File, Loader};
use jaq_core::native::v;
use jaq_core::{Compiler, Ctx, Cv, Exn, RunPtr, ValT as _, ValXs, Vars};
use jaq_json::Val;

// The deadline unwinds the stack; with `panic = "abort"` it would end the process.
#[cfg(panic = "abort")]
compile_error!("mqbridge needs panic = \"unwind\": the jq deadline unwinds a runaway program");

/// Most values one program run may produce; more is an error (a runaway stream).
pub const MAX_OUTPUTS: usize = 10_000;

/// Steps between two readings of the clock (a multiple of `STACK_EVERY`). A step costs a
/// counter increment; reading the clock costs tens of nanoseconds, more than a step, so
/// it is read rarely, while a runaway loop (millions of steps a second) still notices
/// its deadline within a millisecond.
pub const CLOCK_EVERY: u32 = 1024;

/// Native filters removed from the standard library, with why.
const FORBIDDEN: &[&str] = &[
    "env",    // exposes the process environment, i.e. secrets
    "input",  // reads further inputs: there are none
    "inputs", // idem
    "range",  // replaced by a metered copy (`range` below)
];

/// When a run must stop: `limit` after it started.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    limit: Duration,
}

impl Deadline {
    /// A deadline `limit` from now.
    pub fn after(limit: Duration) -> Self {
        Deadline {
            at: Instant::now() + limit,
            limit,
        }
    }
}

/// Why a run produced no result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    /// The program raised an error (`error(...)`, a type error, ...).
    #[error("{0}")]
    Program(String),
    #[error("halt({0}) is not allowed in a rule")]
    Halt(i32),
    #[error("program emitted more than {MAX_OUTPUTS} values")]
    TooManyOutputs,
    #[error("program ran longer than {0:?} and was stopped")]
    Deadline(Duration),
    #[error("program recursed too deep (more than {} KiB of stack)", MAX_STACK / 1024)]
    TooDeep,
}

/// jaq's data kind for our programs: values are [`Val`]s, and the global data is a
/// [`Meter`] (jaq clones it at every step).
struct Metered;

impl DataT for Metered {
    type V<'a> = Val;
    type Data<'a> = Meter<'a>;
}

/// The global data of one run: a reference to the run's [`Budget`], which holds the
/// program's look-up table. jaq clones it with its context at every step, and that clone
/// counts the step. (One pointer, as jaq's own `&Lut` is.)
struct Meter<'a> {
    budget: &'a Budget<'a>,
}

impl Clone for Meter<'_> {
    #[inline]
    fn clone(&self) -> Self {
        self.budget.step();
        Meter {
            budget: self.budget,
        }
    }
}

impl<'a> HasLut<'a, Metered> for Meter<'a> {
    #[inline]
    fn lut(&self) -> &'a jaq_core::Lut<Metered> {
        self.budget.lut
    }
}

/// Most stack one run may use; deeper recursion is [`RunError::TooDeep`]. Enough for a
/// recursive `def` over a payload nested as deep as decoding allows, even in a debug
/// build (~25 KiB a level there, ~2 KiB in release: about 4,000 levels).
pub const MAX_STACK: usize = 8 << 20;

/// Stack size for threads that run programs: [`MAX_STACK`] for the program, the rest for
/// the caller's frames, the steps between two checks, and the unwinding.
pub const THREAD_STACK: usize = 2 * MAX_STACK;

thread_local! {
    /// Whether this thread was started with [`THREAD_STACK`] (see [`mark_program_stack`]).
    static PROGRAM_STACK: Cell<bool> = const { Cell::new(false) };
}

/// Notes that the calling thread was started with a stack of [`THREAD_STACK`], so that
/// programs may run on it: a thread that does not know its stack size must not run one
/// (a deep recursion, stopped only past [`MAX_STACK`], would overflow a smaller stack).
pub fn mark_program_stack() {
    PROGRAM_STACK.set(true);
}

/// Whether [`mark_program_stack`] was called on this thread.
pub fn has_program_stack() -> bool {
    PROGRAM_STACK.get()
}

/// Steps between two measurements of the stack: at most ~25 KiB a step (a debug build),
/// well within the [`THREAD_STACK`] left beyond [`MAX_STACK`].
const STACK_EVERY: u32 = 32;

/// A run's program, deadline, step counter and stack base.
struct Budget<'a> {
    lut: &'a jaq_core::Lut<Metered>,
    deadline: Deadline,
    steps: Cell<u32>,
    /// Address of a frame at the start of the run: how far the stack has grown since is
    /// the distance to a frame of the current step.
    base: usize,
}

/// Why a run was unwound (the unwind payload).
enum Stop {
    Deadline,
    Stack,
}

impl Budget<'_> {
    /// Counts a step. Every [`STACK_EVERY`] steps, unwinds the run if it went deeper than
    /// [`MAX_STACK`]; every [`CLOCK_EVERY`] steps, if it is past its deadline.
    #[inline]
    fn step(&self) {
        let n = self.steps.get().wrapping_add(1);
        self.steps.set(n);
        if n.is_multiple_of(STACK_EVERY) {
            self.check(n);
        }
    }

    #[cold]
    #[inline(never)]
    fn check(&self, n: u32) {
        let here = 0u8;
        if self.base.abs_diff(stack_address(&here)) > MAX_STACK {
            resume_unwind(Box::new(Stop::Stack));
        }
        if n.is_multiple_of(CLOCK_EVERY) && Instant::now() >= self.deadline.at {
            resume_unwind(Box::new(Stop::Deadline));
        }
    }
}

/// Where a local variable lives: a point in the current frame.
fn stack_address(local: &u8) -> usize {
    std::ptr::from_ref(local) as usize
}

/// `range($from; $to; $by)` as jaq-core implements it (`funs.rs`), counting a step per
/// value: jaq's own yields values in a native loop that no context clone passes through.
fn range<'a>(mut cv: Cv<'a, Metered>) -> ValXs<'a, <Metered as DataT>::V<'a>> {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let by = cv.0.pop_var();
    let to = cv.0.pop_var();
    let from = cv.0.pop_var();
    let budget = cv.0.data().budget;
    let cmp = by.partial_cmp(&Val::from(0isize)).unwrap_or(Equal);
    let mut next = Ok(from);
    Box::new(std::iter::from_fn(move || {
        budget.step();
        match next.clone() {
            Ok(x) => match cmp {
                Greater => x < to,
                Less => x > to,
                Equal => x != to,
            }
            .then(|| std::mem::replace(&mut next, (x + by.clone()).map_err(Exn::from))),
            e @ Err(_) => {
                // Nothing after an error.
                next = Ok(to.clone());
                Some(e)
            }
        }
    }))
}

/// A compiled jq program.
pub struct JqProgram {
    filter: jaq_core::Filter<Metered>,
    /// The program, when it only picks values out of its input (see [`super::picks`]).
    picks: Option<super::picks::Picks>,
}

impl std::fmt::Debug for JqProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JqProgram")
    }
}

impl JqProgram {
    /// Compiles `code`; the error names the character offset and what went wrong.
    pub fn compile(code: &str) -> Result<Self, String> {
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let metered_range: RunPtr<Metered> = |cv| range(cv);
        let metered_range = jaq_core::native::run::<Metered>(("range", v(3), metered_range));
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs())
            .filter(|(name, _, _)| !FORBIDDEN.contains(name))
            .chain([metered_range]);
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let program = File { code, path: () };
        let modules = loader.load(&arena, program).map_err(|errs| {
            let mut msgs = Vec::new();
            for (_, err) in errs {
                match err {
                    jaq_core::load::Error::Io(e) => {
                        msgs.extend(e.into_iter().map(|(_, m)| m));
                    }
                    jaq_core::load::Error::Lex(e) => msgs.extend(
                        e.into_iter()
                            .map(|(exp, at)| describe(code, at, exp.as_str())),
                    ),
                    jaq_core::load::Error::Parse(e) => msgs.extend(
                        e.into_iter()
                            .map(|(exp, at)| describe(code, at, exp.as_str())),
                    ),
                }
            }
            msgs.join("; ")
        })?;
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errs| {
                errs.into_iter()
                    .flat_map(|(_, e)| e)
                    .map(|(name, undef)| {
                        let offset = jaq_core::load::span(code, name).start;
                        format!("undefined {} `{name}` at offset {offset}", undef.as_str())
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
        Ok(JqProgram {
            filter,
            picks: super::picks::Picks::parse(code),
        })
    }

    /// The program as [`Picks`](super::picks::Picks), when it only picks values out of
    /// its input: a rule's transform then runs without jaq.
    pub fn picks(&self) -> Option<&super::picks::Picks> {
        self.picks.as_ref()
    }

    /// Runs the program on `input` and collects its outputs; the first error stops it.
    pub fn run(&self, input: Val, deadline: Deadline) -> Result<Vec<Val>, RunError> {
        self.metered(input, deadline, |outputs| {
            let mut out = Vec::new();
            for item in outputs {
                out.push(item.map_err(run_error)?);
                if out.len() > MAX_OUTPUTS {
                    return Err(RunError::TooManyOutputs);
                }
            }
            Ok(out)
        })
    }

    /// Runs the program as a filter: true when its first output is truthy
    /// (neither `false` nor `null`); no output counts as false.
    pub fn test(&self, input: Val, deadline: Deadline) -> Result<bool, RunError> {
        self.metered(input, deadline, |mut outputs| match outputs.next() {
            None => Ok(false),
            Some(v) => Ok(v.map_err(run_error)?.as_bool()),
        })
    }

    /// Runs the program on `input` under `deadline`, handing its outputs to `take`.
    fn metered<T>(
        &self,
        input: Val,
        deadline: Deadline,
        take: impl FnOnce(ValXs<'_, Val>) -> Result<T, RunError>,
    ) -> Result<T, RunError> {
        let here = 0u8;
        let budget = Budget {
            lut: &self.filter.lut,
            deadline,
            steps: Cell::new(0),
            base: stack_address(&here),
        };
        let meter = Meter { budget: &budget };
        let ctx = Ctx::<Metered>::new(meter, Vars::new([]));
        // Unwind safety: the run's state is dropped on the way out and the compiled
        // program is never mutated, so nothing half-updated is seen afterwards.
        catch_unwind(AssertUnwindSafe(|| take(self.filter.id.run((ctx, input))))).unwrap_or_else(
            |payload| match payload.downcast::<Stop>() {
                Ok(stop) => match *stop {
                    Stop::Deadline => Err(RunError::Deadline(deadline.limit)),
                    Stop::Stack => Err(RunError::TooDeep),
                },
                Err(other) => resume_unwind(other),
            },
        )
    }
}

/// The error a run stops with.
fn run_error(exn: Exn<'_, Val>) -> RunError {
    match exn.get_err() {
        Ok(err) => RunError::Program(err.to_string()),
        Err(exn) => match exn.get_halt() {
            Ok(code) => RunError::Halt(code),
            Err(_) => RunError::Program("program error".to_string()),
        },
    }
}

fn describe(code: &str, at: &str, expected: &str) -> String {
    let offset = jaq_core::load::span(code, at).start;
    if at.is_empty() {
        format!("expected {expected} at end of program")
    } else {
        let near: String = at.chars().take(12).collect();
        format!("expected {expected} at offset {offset} (near `{near}`)")
    }
}

/// Converts a jq value to JSON. Byte strings become base64 text; non-finite floats
/// become null; big integers and decimals keep their digits when JSON can hold them.
pub fn to_json(v: &Val) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Val::Null => J::Null,
        Val::Bool(b) => J::Bool(*b),
        Val::Num(n) => num_to_json(n),
        Val::TStr(b) => J::String(String::from_utf8_lossy(b).into_owned()),
        Val::BStr(b) => J::String(BASE64.encode(&***b)),
        Val::Arr(a) => J::Array(a.iter().map(to_json).collect()),
        Val::Obj(o) => J::Object(
            o.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(b).into_owned(),
                        other => other.to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
    }
}

fn num_to_json(n: &jaq_json::Num) -> serde_json::Value {
    use jaq_json::Num;
    match n {
        Num::Int(i) => serde_json::Value::from(*i as i64),
        Num::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        other => {
            let text = other.to_string();
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        }
    }
}

/// Converts JSON to a jq value.
pub fn from_json(v: &serde_json::Value) -> Val {
    use serde_json::Value as J;
    match v {
        J::Null => Val::Null,
        J::Bool(b) => Val::Bool(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64().and_then(|i| isize::try_from(i).ok()) {
                Val::from(i)
            } else if let Some(f) = n.as_f64() {
                Val::from(f)
            } else {
                Val::Num(jaq_json::Num::from_dec_str(&n.to_string()))
            }
        }
        J::String(s) => Val::from(s.clone()),
        J::Array(a) => a.iter().map(from_json).collect(),
        J::Object(o) => Val::obj(
            o.iter()
                .map(|(k, v)| (Val::from(k.clone()), from_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMIT: Duration = Duration::from_secs(2);

    fn run(code: &str, input: serde_json::Value) -> Result<Vec<serde_json::Value>, String> {
        let p = JqProgram::compile(code)?;
        let out = p
            .run(from_json(&input), Deadline::after(LIMIT))
            .map_err(|e| e.to_string())?;
        Ok(out.iter().map(to_json).collect())
    }

    #[test]
    fn transforms_and_streams() {
        assert_eq!(
            run("{t: .a.temp}", json!({"a": {"temp": 21.5}})).unwrap(),
            vec![json!({"t": 21.5})]
        );
        assert_eq!(
            run(".xs[] | {v: .}", json!({"xs": [1, 2, 3]})).unwrap(),
            vec![json!({"v": 1}), json!({"v": 2}), json!({"v": 3})]
        );
        assert_eq!(
            run("empty", json!(null)).unwrap(),
            Vec::<serde_json::Value>::new()
        );
    }

    #[test]
    fn filter_truthiness() {
        let test = |code: &str, input: serde_json::Value| {
            let p = JqProgram::compile(code).unwrap();
            p.test(from_json(&input), Deadline::after(LIMIT)).unwrap()
        };
        assert!(test(".temp > 20", json!({"temp": 25})));
        assert!(!test(".temp > 20", json!({"temp": 5})));
        assert!(!test(".missing", json!({})));
        assert!(!test("empty", json!(null)));
        assert!(test("0", json!(null)));
    }

    #[test]
    fn compile_errors_say_where() {
        let err = JqProgram::compile("{a: .b").unwrap_err();
        assert!(err.contains("expected"), "{err}");
        let err = JqProgram::compile("nosuchfn(1)").unwrap_err();
        assert!(
            err.contains("undefined") && err.contains("nosuchfn"),
            "{err}"
        );
    }

    #[test]
    fn env_and_input_are_removed() {
        for code in ["env", "input", "inputs", "env.HOME"] {
            let err = JqProgram::compile(code).unwrap_err();
            assert!(err.contains("undefined"), "{code}: {err}");
        }
    }

    #[test]
    fn runtime_errors_and_halt_are_errors() {
        let err = run(".a + 1", json!({"a": "x"})).unwrap_err();
        assert!(!err.is_empty());
        let err = run("halt", json!(null)).unwrap_err();
        assert!(err.contains("halt"), "{err}");
        let err = run("error(\"boom\")", json!(null)).unwrap_err();
        assert!(err.contains("boom"), "{err}");
    }

    const SHORT: Duration = Duration::from_millis(100);

    /// Runs `code` on `{"n": 1e12}` for at most `limit`, on a thread with the stack that
    /// evaluation threads have; returns the number of outputs and how long it took.
    fn run_bounded(code: &str, limit: Duration) -> (Result<usize, RunError>, Duration) {
        let p = JqProgram::compile(code).unwrap();
        std::thread::scope(|s| {
            let run = std::thread::Builder::new()
                .stack_size(THREAD_STACK)
                .spawn_scoped(s, || {
                    let started = Instant::now();
                    let input = from_json(&json!({"n": 1e12}));
                    let out = p.run(input, Deadline::after(limit));
                    (out.map(|v| v.len()), started.elapsed())
                })
                .unwrap();
            run.join().unwrap()
        })
    }

    #[test]
    fn runaway_loops_stop_at_their_deadline() {
        for code in [
            "reduce range(.n) as $i (0; . + 1)",
            "last(range(.n))",
            "[range(.n)] | length",
            "skip(.n; range(.n))",
            "range(0; 1; 0) | empty",
            "[limit(1e9; repeat(1))] | length",
            "def f: f; f",
            "until(false; .)",
            "[.n | recurse(. + 1)] | length",
            "[foreach range(.n) as $i (0; . + 1)] | length",
            "isempty(repeat(1) | select(false))",
            "label $out | repeat(1) | empty",
        ] {
            let (out, took) = run_bounded(code, SHORT);
            assert_eq!(out, Err(RunError::Deadline(SHORT)), "{code}");
            // The clock is read every CLOCK_EVERY steps: the run stops right after its
            // deadline (the margin is for a loaded machine).
            assert!(took < SHORT * 5, "{code} stopped after {took:?}");
        }
    }

    #[test]
    fn a_runaway_filter_stops_too() {
        let p = JqProgram::compile("reduce range(.n) as $i (0; . + 1) > 0").unwrap();
        let input = from_json(&json!({"n": 1e12}));
        assert_eq!(
            p.test(input, Deadline::after(SHORT)),
            Err(RunError::Deadline(SHORT))
        );
    }

    #[test]
    fn runaway_streams_and_deep_recursion_have_their_own_bounds() {
        for code in ["while(true; .)", "repeat(1)"] {
            assert_eq!(
                run_bounded(code, LIMIT).0,
                Err(RunError::TooManyOutputs),
                "{code}"
            );
        }
        for code in [
            "def f: [f]; f",
            "def f: 1 + f; f",
            "def f($n): if $n == 0 then 0 else 1 + f($n - 1) end; f(.n)",
        ] {
            assert_eq!(run_bounded(code, LIMIT).0, Err(RunError::TooDeep), "{code}");
        }
        // Recursion as deep as a payload may nest (128 levels) is fine.
        let deep = format!("{}{}", "[".repeat(127), "]".repeat(127));
        let code = format!(
            "{deep} | def f: if type == \"array\" then map(f) else . end; f | tojson | length"
        );
        assert_eq!(run_bounded(&code, LIMIT).0, Ok(1));
    }

    #[test]
    fn json_round_trip() {
        let v = json!({"a": [1, -2, 3.5, "s", null, true, {"b": {}}], "big": 12345678901234i64});
        assert_eq!(to_json(&from_json(&v)), v);
    }
}
