//! What the jq deadline costs on the normal path: the same programs run by jaq as it
//! comes (`JustLut`, its own `range`) and by [`JqProgram::run`] under a deadline (a step
//! counted at each context clone and each `range` value, a stack-depth check per step,
//! the clock read every `CLOCK_EVERY` steps and once per run, `catch_unwind` around the
//! run). The two sides alternate in slices of about `SLICE` (`SLICES` of each per run);
//! a run's figure for a side is its median slice, in ns per evaluation, which leaves out
//! the slices another process preempted (the machine is shared). The cost is the median
//! over `RUNS` runs of the ratio of the two.
//!
//! ```text
//! cargo bench --bench jq_deadline      # cargo test runs a small smoke pass
//! ```

use std::time::{Duration, Instant};

use jaq_core::data::JustLut;
use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars};
use jaq_json::Val;
use mqbridge::message::Message;
use mqbridge::rule::jq::{Deadline, JqProgram};
use mqbridge::rule::{Decode, context, decode};

const RUNS: usize = 7;
const SLICES: usize = 1000;
const SLICE: Duration = Duration::from_micros(300);
/// Under `cargo test --all-targets` (no `--bench` argument): one slice of this many
/// evaluations per side, as a smoke test of the code, not a measurement.
const SMOKE: usize = 20;

const PROGRAMS: &[(&str, &str)] = &[
    (
        "typical transform",
        "{device: .vars.device, ts: .received_at, temp: .payload.temp}",
    ),
    (
        "filter + transform of each array element",
        "[.payload.xs[] | select(. % 2 == 0) | {v: ., double: (. * 2)}] | length",
    ),
    (
        "loop: 1,000 reduce steps",
        "reduce range(1000) as $i (0; . + $i)",
    ),
];

/// The program compiled as jaq comes, with the same definitions and natives.
fn plain(code: &str) -> jaq_core::Filter<JustLut<Val>> {
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs());
    let funs = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs());
    let arena = Arena::default();
    let modules = Loader::new(defs)
        .load(&arena, File { code, path: () })
        .unwrap();
    Compiler::default()
        .with_funs(funs)
        .compile(modules)
        .unwrap()
}

/// The context a rule sees for a telemetry message like the ones in config/examples,
/// with a 20-number array for the second program.
fn input() -> Val {
    let payload = r#"{"device":"d0042","seq":42,"temp":21.5,"humidity":48.2,"battery":87,"ts":"2026-11-26T03:00:00.123Z","xs":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20]}"#;
    let msg = Message::detached("sensors/d0042/telemetry", payload, 1);
    let value = decode(Decode::Json, &msg.payload).unwrap();
    let ctx = context(&msg, &[("device", "d0042")], value);
    msg.ack.settle();
    ctx
}

fn time(n: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test` does not.
    let measure = std::env::args().any(|a| a == "--bench");
    let (runs, slices) = if measure { (RUNS, SLICES) } else { (1, 1) };
    let input = input();
    let limit = Duration::from_secs(2);
    println!(
        "| program | jaq as it comes (ns) | under the deadline (ns) | cost, per run | median |"
    );
    println!("|---|---|---|---|---|");
    for (name, code) in PROGRAMS {
        let jaq = plain(code);
        let ours = JqProgram::compile(code).unwrap();
        let run_plain = || {
            let ctx = Ctx::<JustLut<Val>>::new(&jaq.lut, Vars::new([]));
            let out: Result<Vec<Val>, _> = jaq.id.run((ctx, input.clone())).collect();
            assert!(out.is_ok());
        };
        let run_ours = || {
            let out = ours.run(input.clone(), Deadline::after(limit));
            assert!(out.is_ok());
        };
        // Both give the same outputs.
        let ctx = Ctx::<JustLut<Val>>::new(&jaq.lut, Vars::new([]));
        let expected: Result<Vec<Val>, _> = jaq.id.run((ctx, input.clone())).collect();
        assert_eq!(
            expected.ok(),
            ours.run(input.clone(), Deadline::after(limit)).ok()
        );
        let n = if measure {
            // As many evaluations as take about SLICE.
            (SLICE.as_nanos() as f64 / time(SMOKE, run_plain)).ceil() as usize
        } else {
            SMOKE
        };
        let (mut plain_ns, mut ours_ns, mut costs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for i in 0..slices {
                // Each side first in turn.
                if i % 2 == 0 {
                    a.push(time(n, run_plain));
                    b.push(time(n, run_ours));
                } else {
                    b.push(time(n, run_ours));
                    a.push(time(n, run_plain));
                }
            }
            let (a, b) = (median(a), median(b));
            plain_ns.push(a);
            ours_ns.push(b);
            costs.push(b / a - 1.0);
        }
        let runs: Vec<String> = costs
            .iter()
            .map(|c| format!("{:+.1}%", c * 100.0))
            .collect();
        println!(
            "| {name} | {:.0} | {:.0} | {} | **{:+.1}%** |",
            median(plain_ns),
            median(ours_ns),
            runs.join(" · "),
            median(costs) * 100.0,
        );
    }
}
