//! The command line as a user runs it: `check`, `try` and `schema`, and what `run` prints
//! when it cannot start.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

fn mqbridge(args: &[&str]) -> (i32, String, String) {
    mqbridge_with_env(args, &[])
}

fn mqbridge_with_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mqbridge"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn check_prints_the_plan_or_every_error_with_its_location() {
    let (code, out, _) = mqbridge(&[
        "check",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/mqbridge.yaml"),
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("embedded broker: listen 127.0.0.1:1883 (0 users, anonymous allowed"),
        "{out}"
    );
    assert!(
        out.contains("local: sqlite data/mqbridge.db table mqbridge_messages"),
        "{out}"
    );
    assert!(
        out.contains("everything: from [#] decode text -> [local]"),
        "{out}"
    );
    let (code, out, _) = mqbridge(&[
        "check",
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/examples/external-broker.yaml"
        ),
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("(MQTT 3.1.1, persistent session)"), "{out}");
    assert!(out.contains("subscribe # qos 1"), "{out}");
    assert!(
        out.contains("local: sqlite data/mqbridge.db table mqbridge_messages"),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "broker:\n  url: mqtt://h\n  client_id: c\nsinks:\n  f: { type: file, path: x }\nrules:\n  - name: r\n    from: [\"a/#/b\"]\n    filter: '.x >'\n    to: [f, g]\n",
    )
    .unwrap();
    let (code, out, err) = mqbridge(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    let lines: Vec<&str> = err.lines().collect();
    let file = bad.display().to_string();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].starts_with(&format!("{file}:8:12: rules[0].from[0]: ")),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!("{file}:9:13: rules[0].filter: jq: ")),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!("{file}:10:13: rules[0].to[1]: unknown sink \"g\"")),
        "{err}"
    );
}

#[test]
fn check_prints_settings_as_they_are_written_in_the_file() {
    let example = |name: &str| format!("{}/config/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let (code, out, err) = mqbridge(&["check", &example("postgres.yaml")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(MQTT 5, persistent session)"), "{out}");
    assert!(
        out.contains(
            "readings: from [sensors/{device}/telemetry] decode json transform -> [warehouse]"
        ),
        "{out}"
    );
    let (code, out, err) = mqbridge(&["check", &example("embedded.yaml")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("persistence: data/broker-state.db every 100ms"),
        "{out}"
    );
    assert!(out.contains("decode text"), "{out}");
}

#[test]
fn try_shows_records_and_what_each_sink_would_do() {
    let cfg = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/examples/telemetry.yaml"
    );
    let (code, out, err) = mqbridge(&[
        "try",
        cfg,
        "--topic",
        "sensors/d9/telemetry",
        "--payload",
        r#"{"temp": 95.5}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rule readings matched (device=d9)"), "{out}");
    assert!(
        out.contains(r#""device":"d9""#) && out.contains(r#""temp":95.5"#),
        "{out}"
    );
    assert!(
        out.contains(r#"-> alerts: publish to "alerts/d9" qos 1"#),
        "{out}"
    );

    let (_, out, _) = mqbridge(&[
        "try",
        cfg,
        "--topic",
        "sensors/d9/telemetry",
        "--payload",
        "{broken",
    ]);
    assert!(
        out.contains("decode failed: payload is not valid JSON"),
        "{out}"
    );
    assert!(out.contains("-> dead letter to sink dead_letters"), "{out}");

    let (_, out, _) = mqbridge(&["try", cfg, "--topic", "elsewhere", "--payload", "x"]);
    assert!(out.contains("no rule matches topic \"elsewhere\""), "{out}");
}

/// `try` with a CBOR payload (README, "Binary payloads"), as hex digits and from a file.
#[test]
fn try_takes_binary_payloads_as_hex_or_from_a_file() {
    let cfg = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/examples/binary-sqlite.yaml"
    );
    // {"t": 21.5, "seq": 7, "at": 0("2026-12-02T16:45:28Z"), "fw": h'0102'}
    let digits =
        "a46174f94d606373657107626174c074323032362d31322d30325431363a34353a32385a626677420102";
    let try_with = |args: &[&str]| {
        let mut all = vec!["try", cfg, "--topic", "sensors/d1/cbor"];
        all.extend(args);
        mqbridge(&all)
    };
    let (code, out, err) = try_with(&["--payload-hex", digits]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rule cbor-readings matched (device=d1)"),
        "{out}"
    );
    assert!(
        out.contains(
            r#"record {"at":"2026-12-02T16:45:28Z","device":"d1","fw":"AQI=","seq":7,"temp":21.5}"#
        ),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("reading.cbor");
    std::fs::write(&file, hex::decode(digits).unwrap()).unwrap();
    let (code, from_file, err) = try_with(&["--payload-file", file.to_str().unwrap()]);
    assert_eq!((code, &from_file), (0, &out), "{err}");

    // Hex digits may be spaced; a broken payload is dead-lettered with the reason.
    let (code, out, _) = try_with(&["--payload-hex", "a2 61 74"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("decode failed: payload is not valid CBOR: truncated"),
        "{out}"
    );
    assert!(out.contains("-> dead letter to sink dead_letters"), "{out}");

    // Exactly one payload, hex that is hex, a file that exists.
    let (code, _, err) = try_with(&[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = try_with(&["--payload", "x", "--payload-hex", "00"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, _, err) = try_with(&["--payload-hex", "a4z"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--payload-hex") && err.contains("not hex digits"),
        "{err}"
    );
    let missing = dir.path().join("missing.cbor");
    let (code, _, err) = try_with(&["--payload-file", missing.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot read the payload file"), "{err}");
}

#[cfg(feature = "protobuf")]
#[test]
fn try_reads_protobuf_payloads_with_the_schema_beside_the_config() {
    // Run elsewhere: the config's sensors.proto is found beside the config.
    let dir = tempfile::tempdir().unwrap();
    let cfg = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/examples/binary-sqlite.yaml"
    );
    let try_with = |hex: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_mqbridge"))
            .args([
                "try",
                cfg,
                "--topic",
                "sensors/d1/protobuf",
                "--payload-hex",
                hex,
            ])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        (out.status.code(), text(out.stdout), text(out.stderr))
    };
    // sensors.Reading {t: 21.5, seq: 7, at: "2026-12-02T16:45:28Z", fw: 0x0102}
    let (code, out, err) =
        try_with("09000000000080354010071a14323032362d31322d30325431363a34353a32385a22020102");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("rule protobuf-readings matched (device=d1)")
            && out.contains(
                r#"record {"at":"2026-12-02T16:45:28Z","device":"d1","fw":"AQI=","seq":7,"temp":21.5}"#
            ),
        "{out}"
    );
    // `t` (a double) as a length-delimited field.
    let (code, out, _) = try_with("0a 01 00");
    assert_eq!(code, Some(0));
    assert!(
        out.contains(
            "decode failed: payload is not a valid Protobuf sensors.Reading: invalid wire type"
        ) && out.contains("-> dead letter to sink dead_letters"),
        "{out}"
    );
}

#[test]
fn check_and_try_describe_webhooks_without_their_secrets() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples/webhook.yaml");
    let (code, out, err) = mqbridge_with_env(&["check", cfg], &[("HOOK_SECRET", "k3y")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("events_hook: webhook POST http://127.0.0.1:8080/devices/{{ vars.device | urlencode }}/events timeout 5s, HMAC in X-Signature (key from $HOOK_SECRET)"),
        "{out}"
    );
    assert!(
        out.contains("archive_hook: webhook POST http://127.0.0.1:8080/archive (batch body)"),
        "{out}"
    );
    assert!(
        !out.contains("change-me"),
        "header values are not printed: {out}"
    );

    let (code, out, err) = mqbridge(&[
        "try",
        cfg,
        "--topic",
        "devices/pump 1/events",
        "--payload",
        r#"{"kind": "start"}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("-> events_hook: POST http://127.0.0.1:8080/devices/pump%201/events (one request per record)"),
        "{out}"
    );
    assert!(
        out.contains("headers Authorization, X-Device, HMAC in X-Signature"),
        "{out}"
    );
    assert!(
        out.contains("-> archive_hook: POST http://127.0.0.1:8080/archive (batch body: one request per batch)"),
        "{out}"
    );
    assert!(
        !out.contains("change-me"),
        "header values are not printed: {out}"
    );
}

#[test]
fn check_fails_on_what_run_would_miss_on_this_machine() {
    // The HMAC key of the shipped webhook example, unset (or empty): `run` would refuse
    // to start; `try` needs no key.
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples/webhook.yaml");
    let (code, out, err) = mqbridge_with_env(&["check", cfg], &[("HOOK_SECRET", "")]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert_eq!(
        err.trim_end(),
        format!(
            "{cfg}:26:25: sinks.events_hook.hmac.secret_env: environment variable HOOK_SECRET is not set or empty"
        )
    );
    let (code, _, err) = mqbridge_with_env(
        &[
            "try",
            cfg,
            "--topic",
            "devices/d1/events",
            "--payload",
            "{}",
        ],
        &[("HOOK_SECRET", "")],
    );
    assert_eq!(code, 0, "{err}");

    // A password file that is not there, with a mistake of the file itself: both.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let missing = dir.path().join("mqtt-password");
    std::fs::write(
        &bad,
        format!(
            "broker:\n  url: mqtt://h\n  client_id: c\n  password_file: {}\n  qos: 3\n",
            missing.display()
        ),
    )
    .unwrap();
    let (code, _, err) = mqbridge(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    let file = bad.display();
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [
            format!(
                "{file}:4:18: broker.password_file: cannot read {}: No such file or directory (os error 2)",
                missing.display()
            ),
            format!("{file}:5:8: broker.qos: must be 0, 1 or 2"),
        ]
    );
    std::fs::write(&missing, "s3cret\n").unwrap();
    let (code, _, err) = mqbridge(&["check", bad.to_str().unwrap()]);
    assert_eq!(
        (code, err.trim_end()),
        (
            1,
            format!("{file}:5:8: broker.qos: must be 0, 1 or 2").as_str()
        )
    );
}

/// Every config the repository ships (`config/*.yaml`, `config/examples/*.yaml`, found by
/// listing the directories) passes `mqbridge check`, given the variables and files it names.
#[test]
fn check_passes_on_every_shipped_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut configs: Vec<PathBuf> = ["config", "config/examples"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(root.join(dir)).unwrap())
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    configs.sort();
    assert!(
        configs.iter().any(|p| p.ends_with("config/mqbridge.yaml"))
            && configs
                .iter()
                .any(|p| p.starts_with(root.join("config/examples"))),
        "{configs:?}"
    );

    let mut failures = Vec::new();
    for cfg in &configs {
        // A directory of its own per config: the relative paths (data/...) point into it.
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(cfg).unwrap();
        let needs = what_check_needs(&text, dir.path());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqbridge"));
        cmd.arg("check").arg(cfg).current_dir(dir.path());
        for name in &needs.unset {
            cmd.env_remove(name);
        }
        cmd.envs(needs.set.iter().map(|(k, v)| (k, v)));
        let out = cmd.output().unwrap();
        let code = out.status.code().unwrap_or(-1);
        if code != 0 || !needs.problems.is_empty() {
            failures.push(format!(
                "{} (exit {code}, env {:?}):\n{}{}{}",
                cfg.display(),
                needs.set,
                needs
                    .problems
                    .iter()
                    .map(|p| p.clone() + "\n")
                    .collect::<String>(),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout),
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// What `mqbridge check` needs from the machine to pass on a shipped config, provided in
/// `dir` (its working directory) instead of on this machine: read from the file's text,
/// comment lines aside, as a user would read it.
#[derive(Default)]
struct CheckNeeds {
    /// Variables to set: each `${NAME}` without a default, and each `secret_env` and
    /// `token_env`, to a dummy value; each `${NAME_FILE...}` to a file made in `dir`.
    set: Vec<(String, String)>,
    /// Variables with a default (`${NAME:-default}`), unset so the default is what is checked.
    unset: Vec<String>,
    /// What the test cannot provide: a `*_file:` written as an absolute path (a shipped
    /// config makes it relative, or `${NAME_FILE:-/absolute/path}`).
    problems: Vec<String>,
}

fn what_check_needs(text: &str, dir: &Path) -> CheckNeeds {
    let mut needs = CheckNeeds::default();
    let dummy_file = |name: &str| {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "dummy\n").unwrap();
        path.display().to_string()
    };
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            let end = start + rest[start..].find('}').unwrap();
            let (name, default) = match rest[start + 2..end].split_once(":-") {
                Some((name, _)) => (name, true),
                None => (&rest[start + 2..end], false),
            };
            if name.ends_with("_FILE") {
                needs.set.push((name.into(), dummy_file(name)));
            } else if default {
                needs.unset.push(name.into());
            } else {
                needs.set.push((name.into(), "dummy".into()));
            }
            rest = &rest[end..];
        }
        // `key: value` pairs, in block (`key: value  # comment`) and flow (`{ k: v, k: v }`) style.
        let line = line.split(" #").next().unwrap();
        for (key, value) in line
            .split(['{', '}', ','])
            .filter_map(|p| p.split_once(':'))
        {
            let key = key.trim().trim_start_matches("- ");
            let value = value.trim().trim_matches('"');
            if key.ends_with("secret_env") || key.ends_with("token_env") {
                needs.set.push((value.into(), "dummy".into()));
            } else if key.ends_with("_file") && !value.starts_with('$') {
                if Path::new(value).is_absolute() {
                    needs.problems.push(format!(
                        "{key}: {value} is absolute: write it relative or as ${{NAME_FILE:-{value}}}"
                    ));
                } else {
                    dummy_file(value);
                }
            }
        }
    }
    needs
}

#[test]
fn schema_is_json_schema_of_the_rules_file() {
    let (code, out, _) = mqbridge(&["schema"]);
    assert_eq!(code, 0);
    let schema: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(schema["title"], "RawConfig");
    for key in ["broker", "sinks", "rules", "dead_letter"] {
        assert!(schema["properties"].get(key).is_some(), "{key} missing");
    }
    assert_eq!(schema["additionalProperties"], false);
}

/// A config whose `run` fails at once, and the listener that makes it fail (its embedded
/// broker's address is taken while the listener lives).
/// The address is written as in the default config: `${MQBRIDGE_LISTEN:-ADDRESS}`.
fn taken_address_config(dir: &Path) -> (TcpListener, PathBuf) {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = dir.join("taken.yaml");
    std::fs::write(
        &cfg,
        format!(
            "embedded:\n  listen: ${{MQBRIDGE_LISTEN:-{}}}\n  allow_anonymous: true\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    (taken, cfg)
}

#[test]
fn run_reports_a_taken_address_once_with_the_variable_that_moves_it() {
    let dir = tempfile::tempdir().unwrap();
    let (taken, cfg) = taken_address_config(dir.path());
    let addr = taken.local_addr().unwrap();
    let message = format!(
        "embedded broker: cannot listen on {addr}: Address already in use (os error 98) \
         (another broker running? set MQBRIDGE_LISTEN=127.0.0.1:{}, or stop it)",
        addr.port() + 1
    );
    // Also when RUST_LOG hides every other log line.
    for rust_log in ["info", "off"] {
        let out = Command::new(env!("CARGO_BIN_EXE_mqbridge"))
            .args(["run", "--config", cfg.to_str().unwrap()])
            .env("RUST_LOG", rust_log)
            .output()
            .unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.matches(&message).count(), 1, "{err}");
        assert_eq!(err.matches("cannot listen").count(), 1, "{err}");
    }
}

#[test]
fn run_logs_in_colour_only_on_a_terminal_without_no_color() {
    let dir = tempfile::tempdir().unwrap();
    let (_taken, cfg) = taken_address_config(dir.path());
    let bin = env!("CARGO_BIN_EXE_mqbridge");
    let cfg = cfg.to_str().unwrap();

    // stderr to a pipe: plain text.
    let out = Command::new(bin)
        .args(["run", "--config", cfg])
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("ERROR") && err.contains("cannot listen on"),
        "{err}"
    );
    assert!(!err.contains("\x1b["), "escape codes in a pipe: {err:?}");

    // stderr on a terminal (script(1) runs it on a pseudo-terminal and copies what it
    // prints to its stdout): colour, unless NO_COLOR is set and not empty.
    let on_terminal = |no_color: Option<&str>| {
        let mut cmd = Command::new("script");
        cmd.args([
            "-qec",
            &format!("'{bin}' run --config '{cfg}'"),
            "/dev/null",
        ])
        .env_remove("RUST_LOG");
        match no_color {
            Some(v) => cmd.env("NO_COLOR", v),
            None => cmd.env_remove("NO_COLOR"),
        };
        let out = cmd.output().expect("script (util-linux)");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("cannot listen on"), "{text}");
        text.contains("\x1b[")
    };
    assert!(on_terminal(None), "colour on a terminal");
    assert!(on_terminal(Some("")), "an empty NO_COLOR keeps colour");
    assert!(!on_terminal(Some("1")), "NO_COLOR=1 turns colour off");
}
