//! The webhook sink against a real HTTP server ([`HookServer`]): faults injected request
//! by request (500s, 429 with Retry-After, slow answers, resets), 4xx to the dead letter,
//! HMAC signatures, templated URLs and headers, JSON-array batches.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use mqbridge::message::message_id;

use crate::hook_server::{Fault, HookServer, Seen};
use crate::util::*;

fn topic(device: &str) -> String {
    format!("devices/{device}/events")
}

fn payload(seq: i64, bad: bool) -> String {
    if bad {
        format!(r#"{{"seq": {seq}, "bad": true}}"#)
    } else {
        format!(r#"{{"seq": {seq}}}"#)
    }
}

const RULE: &str = r#"
rules:
  - name: events
    from: ["devices/{device}/events"]
    transform: '{device: .vars.device, seq: .payload.seq, bad: (.payload.bad // false)}'
    to: [TO]
dead_letter: { sink: dlq }
"#;

fn bridge_config(
    broker: u16,
    client_id: &str,
    dlq: &std::path::Path,
    sinks: &str,
    to: &str,
) -> String {
    format!(
        "broker:\n  url: mqtt://127.0.0.1:{broker}\n  client_id: {client_id}\nsinks:\n{sinks}  dlq:\n    type: file\n    path: {}\n{}",
        dlq.display(),
        RULE.replace("TO", to)
    )
}

/// Publishes probe messages until the server saw one (the bridge has subscribed), then a
/// last one and waits for it: the records of one topic are sent in order, so no probe is
/// still in flight when the test injects its faults.
async fn wait_for_probes(publisher: &TestClient, hook: &HookServer) {
    let mut sent = 0;
    eventually(
        Duration::from_secs(20),
        "a probe to reach the webhook",
        async || {
            sent += 1;
            publisher
                .publish_all([(topic("probe"), payload(-sent, false))])
                .await;
            hook.seen()
                .iter()
                .any(|s| s.path.contains("probe"))
                .then_some(())
        },
    )
    .await;
    let (t, p) = (topic("probe"), payload(-1_000_000, false));
    let last = message_id(&t, p.as_bytes());
    publisher.publish_all([(t, p)]).await;
    eventually(Duration::from_secs(10), "the last probe", async || {
        hook.seen()
            .iter()
            .any(|s| s.key.as_deref() == Some(last.as_str()) && s.status == Some(200))
            .then_some(())
    })
    .await;
}

/// A bridge (in-process) from a fresh Mosquitto to `hook` through the webhook sink `sinks`
/// (YAML under `sinks:`, `URL` standing for the server's address), a publisher, and the
/// probes through: the bridge has subscribed and nothing is in flight.
struct HookBridge {
    _broker: Mosquitto,
    _dir: tempfile::TempDir,
    dlq: std::path::PathBuf,
    bridge: InProcess,
    publisher: TestClient,
}

impl HookBridge {
    async fn start(hook: &HookServer, sinks: &str, name: &str) -> HookBridge {
        let broker = Mosquitto::start().await;
        let dir = tempfile::tempdir().unwrap();
        let dlq = dir.path().join("dead.jsonl");
        let bridge = InProcess::start(&bridge_config(
            broker.port,
            &format!("bridge-hook-{name}"),
            &dlq,
            &sinks.replace("URL", &hook.url()),
            "hook",
        ));
        let publisher = TestClient::connect(broker.port, &format!("hook-publisher-{name}")).await;
        wait_for_probes(&publisher, hook).await;
        HookBridge {
            _broker: broker,
            _dir: dir,
            dlq,
            bridge,
            publisher,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_delivers_each_message_once_through_faults_and_dead_letters_4xx() {
    let hook = HookServer::start().await;
    let setup = HookBridge::start(
        &hook,
        r#"  hook:
    type: webhook
    url: "URL/ingest/{{ vars.device }}"
    headers: { X-Device: "{{ vars.device }}" }
    timeout: 500ms
    batch: { max_rows: 16, max_wait: 20ms }
    retry: { initial_delay: 50ms, max_delay: 2s }
"#,
        "1",
    )
    .await;

    let faults = [
        [Fault::Error500; 5].as_slice(),
        &[Fault::TooMany, Fault::Slow, Fault::Reset, Fault::Reset],
    ]
    .concat();
    hook.inject(faults.iter().copied());
    const N: i64 = 48;
    const BAD: [i64; 3] = [5, 22, 41];
    let messages: Vec<(String, String)> = (0..N)
        .map(|i| (topic(&format!("d{}", i % 4)), payload(i, BAD.contains(&i))))
        .collect();
    let good_ids: BTreeSet<String> = messages
        .iter()
        .enumerate()
        .filter(|(i, _)| !BAD.contains(&(*i as i64)))
        .map(|(_, (t, p))| message_id(t, p.as_bytes()))
        .collect();
    let bad_ids: BTreeSet<String> = BAD
        .iter()
        .map(|&i| {
            let (t, p) = &messages[i as usize];
            message_id(t, p.as_bytes())
        })
        .collect();
    let started = Instant::now();
    setup.publisher.publish_all(messages.clone()).await;

    let accepted = |seen: &[Seen]| -> Vec<Seen> {
        seen.iter()
            .filter(|s| !s.path.contains("probe") && s.status == Some(200))
            .cloned()
            .collect()
    };
    eventually(
        Duration::from_secs(15),
        "every good message delivered and 3 dead letters",
        async || {
            let keys: BTreeSet<String> = accepted(&hook.seen())
                .into_iter()
                .filter_map(|s| s.key)
                .collect();
            (keys.len() >= good_ids.len() && json_lines(&setup.dlq).len() >= 3).then_some(())
        },
    )
    .await;
    // Stopped, the bridge sends and writes nothing more: what the server saw is final.
    setup.bridge.stop().await.unwrap();
    let letters = json_lines(&setup.dlq);
    let seen: Vec<Seen> = hook
        .seen()
        .into_iter()
        .filter(|s| !s.path.contains("probe"))
        .collect();
    let ok = accepted(&seen);

    // Nothing lost, nothing extra: the receiver, deduplicating by Idempotency-Key, has
    // exactly the good messages.
    let keys: BTreeSet<String> = ok.iter().filter_map(|s| s.key.clone()).collect();
    assert_eq!(keys, good_ids, "delivered keys = the good messages' ids");
    // Duplicates only where the server accepted a request the sink had given up on
    // (the slow answer): requests that got a 2xx are not sent again when the batch is
    // retried or split.
    let mut per_key: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &ok {
        *per_key.entry(s.key.as_deref().unwrap()).or_default() += 1;
    }
    let slow_keys: BTreeSet<&str> = seen
        .iter()
        .filter(|s| s.fault == Some(Fault::Slow))
        .filter_map(|s| s.key.as_deref())
        .collect();
    for (key, n) in &per_key {
        assert!(
            *n == 1 || (*n == 2 && slow_keys.contains(key)),
            "{key} delivered {n} times"
        );
    }
    println!(
        "webhook: {} requests for {} messages ({} accepted, {} distinct keys) in {:?}",
        seen.len(),
        N,
        ok.len(),
        keys.len(),
        started.elapsed()
    );

    // Every fault was served, each request carried the key and the JSON content type.
    assert!(hook.state.lock().unwrap().faults.is_empty());
    for f in [Fault::Error500, Fault::TooMany, Fault::Slow, Fault::Reset] {
        let want = faults.iter().filter(|&&x| x == f).count();
        let got = seen.iter().filter(|s| s.fault == Some(f)).count();
        assert_eq!(got, want, "{f:?}");
    }
    for s in &seen {
        assert!(
            s.key
                .as_ref()
                .is_some_and(|k| good_ids.contains(k) || bad_ids.contains(k)),
            "{s:?}"
        );
        assert_eq!(s.content_type.as_deref(), Some("application/json"), "{s:?}");
    }

    // Retry-After: 1 was honoured: the throttled request came back at least 1 s later.
    let throttled = seen
        .iter()
        .find(|s| s.fault == Some(Fault::TooMany))
        .unwrap();
    let again = seen
        .iter()
        .find(|s| s.key == throttled.key && s.at > throttled.at)
        .expect("the throttled request is retried");
    assert!(
        again.at - throttled.at >= Duration::from_secs(1),
        "retried after {:?}",
        again.at - throttled.at
    );

    // Per topic, records arrive in order (first delivery of each key).
    let mut firsts: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut counted = BTreeSet::new();
    for s in &ok {
        if counted.insert(s.key.clone()) {
            let v = s.json();
            assert_eq!(s.path, format!("/ingest/{}", v["device"].as_str().unwrap()));
            assert_eq!(
                s.device.as_deref(),
                v["device"].as_str(),
                "templated header"
            );
            firsts
                .entry(v["device"].as_str().unwrap().to_owned())
                .or_default()
                .push(v["seq"].as_i64().unwrap());
        }
    }
    for (device, seqs) in &firsts {
        assert!(seqs.is_sorted(), "{device}: {seqs:?}");
    }

    // Each bad record was rejected once: splitting the batch did not send it again.
    let rejected: Vec<&Seen> = seen.iter().filter(|s| s.status == Some(400)).collect();
    assert_eq!(rejected.len(), 3, "{rejected:?}");

    // The bad records went to the dead letter on their first attempt, with the status.
    assert_eq!(letters.len(), 3, "{letters:?}");
    for l in &letters {
        assert!(bad_ids.contains(l["message_id"].as_str().unwrap()), "{l}");
        assert!(BAD.contains(&l["record"]["seq"].as_i64().unwrap()), "{l}");
        assert_eq!(l["sink"], "hook");
        assert_eq!(l["error_kind"], "permanent");
        assert_eq!(l["attempts"], 1, "{l}");
        let error = l["error"].as_str().unwrap();
        assert!(
            error.starts_with("HTTP 400 Bad Request from POST http://"),
            "{error}"
        );
        assert!(error.contains("bad payload"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_signs_bodies_with_hmac_from_env_and_batches_json_arrays() {
    const SECRET: &str = "e2e-webhook-secret";
    let broker = Mosquitto::start().await;
    let hook = HookServer::start().await;
    {
        let mut st = hook.state.lock().unwrap();
        st.secret = SECRET.as_bytes().to_vec();
        st.signed = vec![("/each", "x-signature"), ("/batch", "x-hub-signature-256")];
    }
    let dir = tempfile::tempdir().unwrap();
    let dlq = dir.path().join("dead.jsonl");
    let sinks = r#"  each:
    type: webhook
    url: URL/each
    method: PUT
    timeout: 2s
    hmac: { secret_env: HOOK_SECRET }
  batched:
    type: webhook
    url: URL/batch
    batch_body: true
    batch: { max_rows: 100, max_wait: 200ms }
    timeout: 2s
    hmac: { secret_env: HOOK_SECRET, header: X-Hub-Signature-256 }
"#
    .replace("URL", &hook.url());
    let cfg = dir.path().join("bridge.yaml");
    std::fs::write(
        &cfg,
        bridge_config(broker.port, "bridge-hook-2", &dlq, &sinks, "each, batched"),
    )
    .unwrap();
    let bridge = ChildBridge::start_with_env(&cfg, &[("HOOK_SECRET", SECRET)]);
    bridge
        .wait_for_log("subscribed", Duration::from_secs(20))
        .await;

    const N: i64 = 60;
    let messages: Vec<(String, String)> = (0..N)
        .map(|i| (topic(&format!("d{}", i % 3)), payload(i, false)))
        .collect();
    let ids: BTreeSet<String> = messages
        .iter()
        .map(|(t, p)| message_id(t, p.as_bytes()))
        .collect();
    let publisher = TestClient::connect(broker.port, "hook-publisher-2").await;
    publisher.publish_all(messages.clone()).await;

    eventually(
        Duration::from_secs(15),
        "both sinks to deliver everything",
        async || {
            let seen = hook.seen();
            let each: BTreeSet<String> = seen
                .iter()
                .filter(|s| s.path == "/each" && s.status == Some(200))
                .filter_map(|s| s.key.clone())
                .collect();
            let batched: BTreeSet<i64> = seen
                .iter()
                .filter(|s| s.path == "/batch" && s.status == Some(200))
                .flat_map(|s| s.json().as_array().cloned().unwrap_or_default())
                .map(|r| r["seq"].as_i64().unwrap())
                .collect();
            (each.len() >= ids.len() && batched.len() as i64 >= N).then_some(())
        },
    )
    .await;
    // Stopped, the bridge sends and logs nothing more: what the server saw and the log
    // are final.
    let log = std::sync::Arc::clone(&bridge.log);
    let (status, _) = bridge.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        !log.lock().unwrap().iter().any(|l| l.contains(SECRET)),
        "the secret is never logged"
    );
    let seen = hook.seen();

    assert!(
        seen.iter()
            .all(|s| s.signature_ok == Some(true) && s.status == Some(200)),
        "every signature verifies: {:?}",
        seen.iter().find(|s| s.signature_ok != Some(true))
    );
    let each: Vec<&Seen> = seen.iter().filter(|s| s.path == "/each").collect();
    let keys: BTreeSet<String> = each.iter().filter_map(|s| s.key.clone()).collect();
    assert_eq!(keys, ids, "one request per record, keyed by message id");
    assert_eq!(each.len() as i64, N, "no retries were needed");
    for s in &each {
        assert!(s.json().is_object(), "{s:?}");
    }

    let batches: Vec<&Seen> = seen.iter().filter(|s| s.path == "/batch").collect();
    assert!(
        batches.len() < N as usize,
        "records were batched: {} requests",
        batches.len()
    );
    let mut batched_seqs = Vec::new();
    for b in &batches {
        assert_eq!(b.content_type.as_deref(), Some("application/json"));
        let records = b.json().as_array().cloned().expect("a JSON array");
        let first = &records[0]["seq"].as_i64().unwrap();
        let (t, p) = &messages[*first as usize];
        let key = b.key.as_deref().unwrap();
        if records.len() == 1 {
            assert_eq!(key, message_id(t, p.as_bytes()));
        } else {
            assert!(
                key.starts_with(&format!("{}-", message_id(t, p.as_bytes()))),
                "{key}"
            );
        }
        batched_seqs.extend(records.iter().map(|r| r["seq"].as_i64().unwrap()));
    }
    batched_seqs.sort();
    assert_eq!(
        batched_seqs,
        (0..N).collect::<Vec<_>>(),
        "each record in one batch"
    );
    assert!(json_lines(&dlq).is_empty());
}

/// A batch given up after `max_attempts` dead-letters only its records that never got a
/// 2xx: the others were delivered by an earlier attempt, so they settle instead (neither
/// dead-lettered nor sent again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_dead_letters_only_the_undelivered_records() {
    let hook = HookServer::start().await;
    let setup = HookBridge::start(
        &hook,
        r#"  hook:
    type: webhook
    url: "URL/ingest/{{ vars.device }}"
    batch: { max_rows: 16, max_wait: 300ms }
    retry: { max_attempts: 3, initial_delay: 10ms, max_delay: 50ms }
"#,
        "giveup",
    )
    .await;

    // One burst, so one batch: 7 devices that answer 200 and one that is down for good.
    let messages: Vec<(String, String)> = (0..8)
        .map(|i| {
            let device = if i == 7 {
                "down".into()
            } else {
                format!("d{i}")
            };
            (topic(&device), payload(i, false))
        })
        .collect();
    setup.publisher.publish_all(messages.clone()).await;
    eventually(Duration::from_secs(15), "the dead letter", async || {
        (!json_lines(&setup.dlq).is_empty()).then_some(())
    })
    .await;
    setup.bridge.stop().await.unwrap(); // flushes everything still queued

    let letters = json_lines(&setup.dlq);
    let dead: Vec<i64> = letters
        .iter()
        .map(|l| l["record"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(dead, vec![7], "only the undelivered record: {letters:?}");
    let seen = hook.seen();
    for (i, (t, p)) in messages.iter().enumerate().take(7) {
        let id = message_id(t, p.as_bytes());
        let accepted = seen
            .iter()
            .filter(|s| s.key.as_deref() == Some(id.as_str()) && s.status == Some(200))
            .count();
        assert_eq!(accepted, 1, "record {i} delivered once");
    }
    assert_eq!(
        seen.iter().filter(|s| s.path.ends_with("/down")).count(),
        3,
        "the down endpoint got max_attempts requests"
    );
}

/// A message whose record cannot be delivered (the endpoint refuses connections and
/// retries are unlimited) is logged once it has been unsettled for `unsettled_warning`,
/// with its topic, while mqbridge keeps retrying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_unsettled_too_long_is_logged_with_its_topic() {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let down = HookServer::reserve();
    let config = dir.path().join("bridge.yaml");
    let sinks = format!("  hook:\n    type: webhook\n    url: {}/x\n", down.url());
    std::fs::write(
        &config,
        bridge_config(
            broker.port,
            "unsettled",
            &dir.path().join("dead.jsonl"),
            &sinks,
            "hook",
        ) + "unsettled_warning: 300ms\n",
    )
    .unwrap();
    let bridge = ChildBridge::start_subscribed(&config).await;
    let publisher = TestClient::connect(broker.port, "unsettled-pub").await;
    publisher
        .publish_all([(topic("stuck"), payload(1, false))])
        .await;
    bridge
        .wait_for_log("still not settled", Duration::from_secs(20))
        .await;
    let log = bridge.log.lock().unwrap().clone();
    let line = log
        .iter()
        .find(|l| l.contains("still not settled"))
        .unwrap();
    assert!(line.contains(&topic("stuck")), "{line}");
    assert!(
        log.iter().any(|l| l.contains("will retry")),
        "still being retried"
    );
}
