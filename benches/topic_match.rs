//! Matching one topic against 10,000 subscriptions: the embedded broker's subscription
//! index (a topic trie) against a scan with `topic::filter_matches`, which is what
//! routing did before the index (once per subscription of every session).
//!
//! ```text
//! cargo bench --bench topic_match     # cargo test only checks both find the same
//! ```
//!
//! The filters are a device fleet's: per device a command filter, a telemetry topic, a
//! filter with `+` and `#`, and a status topic; the topic is one device's telemetry,
//! which two of them match.

use criterion::Criterion;
use mqbridge::broker::auth::Receive;
use mqbridge::broker::index::Index;
use mqbridge::broker::session::Subscription;
use mqbridge::topic::filter_matches;

const FILTERS: usize = 10_000;
/// Device 1060's telemetry (its site is 1060 % 50).
const TOPIC: &str = "sensors/site10/d1060/telemetry";

/// Four filters per device, 2,500 devices.
fn filters() -> Vec<String> {
    (0..FILTERS)
        .map(|i| {
            let d = i / 4;
            match i % 4 {
                0 => format!("devices/d{d}/cmd/+"),
                1 => format!("sensors/site{}/d{d}/telemetry", d % 50),
                2 => format!("sensors/+/d{d}/#"),
                _ => format!("fleet/d{d}/status"),
            }
        })
        .collect()
}

/// The index of [`filters`], each a subscription of its own client.
fn index(filters: &[String]) -> Index {
    let mut index = Index::default();
    for (i, filter) in filters.iter().enumerate() {
        let sub = Subscription {
            filter: filter.clone(),
            share: None,
            qos: 1,
            no_local: false,
            retain_as_published: false,
            id: None,
            granted: false,
        };
        index.insert(&format!("c{i}"), filter, &sub, Receive::All);
    }
    index
}

fn scan(filters: &[String]) -> usize {
    filters.iter().filter(|f| filter_matches(f, TOPIC)).count()
}

fn main() {
    let filters = filters();
    let index = index(&filters);
    assert_eq!(
        index.matching(TOPIC).len(),
        scan(&filters),
        "both find the same"
    );
    assert_eq!(scan(&filters), 2);
    // Under `cargo test` (no `--bench`) the checks above are the smoke test: criterion's
    // own test mode would refuse the test filters `scripts/test.sh` passes on.
    if !std::env::args().any(|a| a == "--bench") {
        println!("topic_match: run with `cargo bench --bench topic_match`");
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("match one topic against 10k filters");
    group.bench_function("index", |b| {
        b.iter(|| index.matching(std::hint::black_box(TOPIC)).len())
    });
    group.bench_function("linear scan", |b| b.iter(|| scan(&filters)));
    group.finish();
    c.final_summary();
}
