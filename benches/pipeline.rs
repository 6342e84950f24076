//! What one record costs on its way through mqbridge, stage by stage, through the
//! crate's own API: a rule's typical transform (decode, transform, back to JSON), once
//! picking paths only (which mqbridge runs without jaq) and once with arithmetic (jq),
//! the minijinja templates of the webhook and republish sinks (the context built from
//! the record, then rendered), and the postgres sink's row encoding (each value as the
//! text PostgreSQL casts to its column's type).
//!
//! ```text
//! cargo bench --bench pipeline          # cargo test only checks each stage's output
//! ```
//!
//! The message is a telemetry reading like those in config/examples: a 101-byte JSON
//! payload on `sensors/d0042/telemetry`, the rule capturing `device`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::Criterion;
use mqbridge::message::Message;
use mqbridge::record::Record;
use mqbridge::rule::jq::JqProgram;
use mqbridge::rule::template::Template;
use mqbridge::rule::{Decode, Evaluation, Rule};
use mqbridge::sink::Origin;
use mqbridge::sink::sql::{Class, Text, to_text};
use serde_json::Value;

const TOPIC: &str = "sensors/d0042/telemetry";
const PAYLOAD: &str = r#"{"seq":42,"temp":21.5,"humidity":48.2,"battery":87,"site":"north-01","ts":"2026-11-26T03:00:00.123Z"}"#;
/// Only picks paths: mqbridge runs it without jaq.
const TRANSFORM: &str =
    "{device: .vars.device, seq: .payload.seq, temp: .payload.temp, body: .payload}";
/// The same with arithmetic, which takes jq.
const COMPUTED: &str =
    "{device: .vars.device, seq: .payload.seq, temp_f: (.payload.temp * 1.8 + 32), body: .payload}";
/// The webhook's URL and body and the republish topic of config/examples.
const URL: &str = "https://hooks.example.com/devices/{{ vars.device | urlencode }}/events";
const BODY: &str =
    r#"{"device": "{{ vars.device }}", "seq": {{ record.seq }}, "temp": {{ record.temp }}}"#;
const REPUBLISH_TOPIC: &str = "alerts/{{ vars.device }}";
/// The record's columns in a typed table, as the postgres sink classes them:
/// `device text, seq bigint, temp float8, body jsonb, received_at timestamptz`.
const COLUMNS: [(&str, Class); 5] = [
    ("device", Class::Plain),
    ("seq", Class::Plain),
    ("temp", Class::Plain),
    ("body", Class::Json),
    ("received_at", Class::Timestamp),
];

fn rule(transform: &str) -> Rule {
    Rule {
        name: Arc::from("readings"),
        from: Vec::new(),
        decode: Decode::Json.into(),
        filter: None,
        transform: Some(JqProgram::compile(transform).unwrap()),
        to: Vec::new(),
        keeps_payload_text: true,
    }
}

/// The rule's records for the message.
fn transform(rule: &Rule, msg: &Message) -> Vec<Record> {
    match rule.evaluate(msg, &[("device", "d0042")], Duration::from_secs(2)) {
        Evaluation::Records(r) => r.into_vec(),
        other => panic!("{other:?}"),
    }
}

/// The templates rendered for one record, as the webhook sink does per request (URL and
/// body) and the republish sink per message (topic).
fn render(origin: &Origin, record: &Record, templates: &[Template]) -> usize {
    let ctx = origin.template_context(record);
    templates
        .iter()
        .map(|t| t.render(&ctx).unwrap().len())
        .sum()
}

/// The record's values as the postgres sink binds them (text, None for NULL).
fn encode(record: &Record) -> Vec<Option<Text<'_>>> {
    COLUMNS
        .iter()
        .map(|(name, class)| to_text(&record[*name], *class, None).unwrap())
        .collect()
}

fn main() {
    let msg = Message::detached(TOPIC, PAYLOAD, 1);
    let (rule, computed) = (rule(TRANSFORM), rule(COMPUTED));
    assert_eq!(transform(&computed, &msg)[0]["temp_f"], 70.7);
    let records = transform(&rule, &msg);
    assert_eq!(records.len(), 1);
    let mut record = records[0].clone().into_value();
    assert_eq!(record["seq"], 42);
    record["received_at"] = Value::from("2026-11-26T03:00:00.123Z");
    let record = Record::from(record);
    let origin = Origin::from_message(
        &msg,
        &rule.name,
        mqbridge::topic::Vars::new(&[("device", "d0042")]),
    );
    let webhook = [
        Template::compile(URL).unwrap(),
        Template::compile(BODY).unwrap(),
    ];
    let republish = [Template::compile(REPUBLISH_TOPIC).unwrap()];
    assert!(render(&origin, &record, &webhook) > 0);
    let row = encode(&record);
    assert_eq!(row[0].as_deref(), Some("d0042"));
    assert_eq!(row[1].as_deref(), Some("42"));
    // Under `cargo test` (no `--bench`) the checks above are the smoke test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("pipeline: run with `cargo bench --bench pipeline`");
        msg.ack.settle();
        return;
    }
    let mut c = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut group = c.benchmark_group("per record");
    group.bench_function("rule picking paths (decode, transform, to JSON)", |b| {
        b.iter(|| transform(&rule, black_box(&msg)))
    });
    group.bench_function("rule with arithmetic (decode, context, jq, to JSON)", |b| {
        b.iter(|| transform(&computed, black_box(&msg)))
    });
    group.bench_function("webhook templates (context, URL, body)", |b| {
        b.iter(|| render(&origin, black_box(&record), &webhook))
    });
    group.bench_function("republish topic template (context, topic)", |b| {
        b.iter(|| render(&origin, black_box(&record), &republish))
    });
    group.bench_function("postgres row encoding (5 columns to text)", |b| {
        b.iter(|| encode(black_box(&record)))
    });
    group.finish();
    c.final_summary();
    msg.ack.settle();
}
