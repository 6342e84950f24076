//! jq programs for `filter` and `transform`, run by jaq.
//!
//! Programs are compiled once when the config loads; a compile error is a config error.
//! The sandbox: `env` (which would expose secrets) and `input`/`inputs` are not available,
//! `halt` becomes an ordinary error instead of exiting the process, and a program may
//! emit at most [`MAX_OUTPUTS`] values per message. Wall-clock limits are the caller's job
//! (see [`crate::rule`]).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use jaq_core::data::JustLut;
use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars};
use jaq_json::Val;

/// Most values one program run may produce; more is an error (a runaway stream).
pub const MAX_OUTPUTS: usize = 10_000;

/// Native filters removed from the standard library, with why.
const FORBIDDEN: &[&str] = &[
    "env",    // exposes the process environment, i.e. secrets
    "input",  // reads further inputs: there are none
    "inputs", // idem
];

type Data = JustLut<Val>;

/// A compiled jq program.
pub struct JqProgram {
    filter: jaq_core::Filter<Data>,
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
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs())
            .filter(|(name, _, _)| !FORBIDDEN.contains(name));
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
        Ok(JqProgram { filter })
    }

    /// Runs the program on `input` and collects its outputs; the first error stops it.
    pub fn run(&self, input: Val) -> Result<Vec<Val>, String> {
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new([]));
        let mut out = Vec::new();
        for item in self.filter.id.run((ctx, input)) {
            match item {
                Ok(v) => out.push(v),
                Err(exn) => {
                    return Err(match exn.get_err() {
                        Ok(err) => err.to_string(),
                        Err(halt) => match halt.get_halt() {
                            Ok(code) => format!("halt({code}) is not allowed in a rule"),
                            Err(_) => "program error".to_string(),
                        },
                    });
                }
            }
            if out.len() > MAX_OUTPUTS {
                return Err(format!("program emitted more than {MAX_OUTPUTS} values"));
            }
        }
        Ok(out)
    }

    /// Runs the program as a filter: true when its first output is truthy
    /// (neither `false` nor `null`); no output counts as false.
    pub fn test(&self, input: Val) -> Result<bool, String> {
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new([]));
        match self.filter.id.run((ctx, input)).next() {
            None => Ok(false),
            Some(Ok(v)) => Ok(!matches!(v, Val::Null | Val::Bool(false))),
            Some(Err(exn)) => Err(exn
                .get_err()
                .map(|e| e.to_string())
                .unwrap_or_else(|_| "halt is not allowed in a rule".to_string())),
        }
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

    fn run(code: &str, input: serde_json::Value) -> Result<Vec<serde_json::Value>, String> {
        let p = JqProgram::compile(code)?;
        Ok(p.run(from_json(&input))?.iter().map(to_json).collect())
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
        let p = JqProgram::compile(".temp > 20").unwrap();
        assert!(p.test(from_json(&json!({"temp": 25}))).unwrap());
        assert!(!p.test(from_json(&json!({"temp": 5}))).unwrap());
        let p = JqProgram::compile(".missing").unwrap();
        assert!(!p.test(from_json(&json!({}))).unwrap());
        let p = JqProgram::compile("empty").unwrap();
        assert!(!p.test(Val::Null).unwrap());
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

    #[test]
    fn runaway_streams_are_bounded() {
        let err = run("repeat(1)", json!(null)).unwrap_err();
        assert!(err.contains("more than"), "{err}");
    }

    #[test]
    fn json_round_trip() {
        let v = json!({"a": [1, -2, 3.5, "s", null, true, {"b": {}}], "big": 12345678901234i64});
        assert_eq!(to_json(&from_json(&v)), v);
    }
}
