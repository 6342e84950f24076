//! Config loading as a user meets it: every shipped file parses, and each kind of mistake
//! is reported at its file, line, column and field.

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "MQBRIDGE_CLIENT_ID" => Some(format!("test-{name}")),
        "DATABASE_URL" => Some("postgres://mqbridge@db.test/iot".into()),
        _ => None,
    }
}

fn errors(text: &str) -> Vec<String> {
    match parse(text, "rules.yaml", env) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

/// `text` fails with exactly these errors, each given by how it starts.
fn expect_errors(text: &str, expect: &[&str]) {
    let errs = errors(text);
    for want in expect {
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in\n{}",
            errs.join("\n")
        );
    }
    assert_eq!(errs.len(), expect.len(), "{}", errs.join("\n"));
}

const GOOD: &str = r#"
broker:
  url: mqtt://user:p%40ss@localhost:1884
  client_id: c1
sinks:
  db: { type: sqlite, path: x.db, table: readings }
  dlq: { type: file, path: dl.jsonl }
rules:
  - name: r1
    from: ["sensors/{device}/telemetry", "other/#"]
    filter: '.payload.t > 1'
    transform: '{d: .vars.device}'
    to: [db]
dead_letter: { sink: dlq }
"#;

#[test]
fn every_shipped_config_parses() {
    let mut checked = 0;
    let mut dirs = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config"
    ))];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let text = std::fs::read_to_string(&path).unwrap();
                // A variable the config requires (`${NAME}`, no default) gets a dummy
                // value; ones with a default keep it. (tests/e2e/cli.rs runs `check` on
                // each file, which also checks files and secrets.)
                let required = |name: &str| text.contains(&format!("${{{name}}}"));
                let env =
                    |name: &str| env(name).or_else(|| required(name).then(|| "dummy".to_string()));
                if let Err(e) = parse(&text, &path.display().to_string(), env) {
                    panic!("{e}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 3, "found only {checked} config files");
}

#[test]
fn a_good_file_becomes_a_plan() {
    let plan = parse(GOOD, "rules.yaml", env).unwrap();
    let b = plan.broker.unwrap();
    assert_eq!(
        (
            b.connection.host.as_str(),
            b.connection.port,
            b.connection.tls
        ),
        ("localhost", 1884, false)
    );
    assert_eq!(b.connection.username.as_deref(), Some("user"));
    assert_eq!(b.connection.password.unwrap().0, "p@ss");
    assert_eq!(b.subscriptions, vec!["sensors/+/telemetry", "other/#"]);
    assert_eq!(plan.rules.len(), 1);
    assert_eq!(plan.sinks.len(), 2);
    assert_eq!(plan.dead_letter, Some(1));
}

/// `workers:` and `eval_threads:`: with a client of a broker (GOOD) both default to
/// half the cores (at least one); a count is taken as set, and 0 is an error at its line.
#[test]
fn thread_counts_are_set_or_half_the_cores() {
    let default = parse(GOOD, "rules.yaml", env).unwrap();
    let half = (std::thread::available_parallelism().unwrap().get() / 2).max(1);
    assert_eq!((default.workers, default.eval_threads), (half, half));
    let line = GOOD.lines().count() + 1;
    let n = half + 2;
    for (key, expected) in [("workers", (n, half)), ("eval_threads", (half, n))] {
        let set = parse(&format!("{GOOD}{key}: {n}\n"), "rules.yaml", env).unwrap();
        assert_eq!((set.workers, set.eval_threads), expected, "{key}");
        let errs = errors(&format!("{GOOD}{key}: 0\n"));
        let at = format!("rules.yaml:{line}:{}: {key}: ", key.len() + 3);
        assert!(errs[0].starts_with(&at), "{}", errs[0]);
    }
}

#[test]
fn secrets_are_not_printed() {
    let plan = parse(GOOD, "rules.yaml", env).unwrap();
    let debug = format!("{plan:?}");
    assert!(!debug.contains("p@ss"), "{debug}");
}

#[test]
fn unknown_key_is_reported_at_the_key() {
    let text = "sinks:\n  db:\n    type: sqlite\n    path: x.db\n    tabel: readings\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("rules.yaml:5:5: sinks.db"),
        "{}",
        errs[0]
    );
    assert!(errs[0].contains("unknown field `tabel`"), "{}", errs[0]);
}

#[test]
fn unknown_top_level_key() {
    let errs = errors("broker:\n  url: mqtt://h\n  client_id: x\nrulez: []\n");
    assert!(errs[0].starts_with("rules.yaml:4:1: "), "{}", errs[0]);
    assert!(errs[0].contains("rulez"), "{}", errs[0]);
}

#[test]
fn wrong_type_names_the_field_and_line() {
    let errs = errors("broker:\n  url: mqtt://h\n  client_id: x\n  qos: high\n");
    assert!(
        errs[0].starts_with("rules.yaml:4:8: broker.qos: "),
        "{}",
        errs[0]
    );
}

#[test]
fn every_validation_error_is_reported_with_its_location() {
    let text = r#"broker:
  url: mqtt://localhost
  client_id: ""
sinks:
  db: { type: sqlite, path: x.db, table: "bad name" }
rules:
  - name: r1
    from: ["a/#/b"]
    filter: '.payload.t >'
    to: [nope]
  - name: r1
    from: ["x"]
    transform: 'undefined_fn'
    to: [db]
dead_letter: { sink: missing }
"#;
    expect_errors(
        text,
        &[
            "rules.yaml:3:14: broker.client_id: must not be empty",
            "rules.yaml:5:42: sinks.db.table: invalid table name",
            "rules.yaml:8:12: rules[0].from[0]: \"a/#/b\"",
            "rules.yaml:9:13: rules[0].filter: jq: ",
            "rules.yaml:10:10: rules[0].to[0]: unknown sink \"nope\" (defined: db)",
            "rules.yaml:11:11: rules[1].name: duplicate rule name",
            "rules.yaml:13:16: rules[1].transform: jq: undefined",
            "rules.yaml:15:22: dead_letter.sink: unknown sink \"missing\"",
        ],
    );
}

#[test]
fn env_vars_expand_and_missing_ones_are_located() {
    let text = "broker:\n  url: mqtt://h:${NOT_SET_ANYWHERE}\n  client_id: ${MQBRIDGE_CLIENT_ID}\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("rules.yaml:2:17: "), "{}", errs[0]);
    assert!(errs[0].contains("NOT_SET_ANYWHERE"), "{}", errs[0]);

    let text = "broker:\n  url: mqtt://h:${PORT:-1999}\n  client_id: ${MQBRIDGE_CLIENT_ID}\n";
    let plan = parse(text, "rules.yaml", env).unwrap();
    let b = plan.broker.unwrap();
    assert_eq!(
        (b.connection.port, b.connection.client_id.as_str()),
        (1999, "test-MQBRIDGE_CLIENT_ID")
    );
}

#[test]
fn share_group_prefixes_subscriptions_and_overlaps_collapse() {
    let text = r#"broker: { url: "mqtt://h", client_id: c, share_group: g1 }
sinks: { f: { type: file, path: x } }
rules:
  - { name: a, from: "s/+/t", to: f }
  - { name: b, from: ["s/#"], to: f }
"#;
    let b = parse(text, "rules.yaml", env).unwrap().broker.unwrap();
    assert_eq!(b.subscriptions, vec!["$share/g1/s/#"]);
    let errs = errors(&text.replace("g1", "a/b"));
    assert!(errs[0].contains("broker.share_group"), "{}", errs[0]);
}

#[test]
fn republish_templates_are_compiled_at_load() {
    let text = r#"broker: { url: "mqtt://h", client_id: c }
sinks: { out: { type: republish, topic: "x/{{ topic " } }
"#;
    let errs = errors(text);
    assert!(
        errs[0].starts_with("rules.yaml:2:41: sinks.out.topic: template"),
        "{}",
        errs[0]
    );
}

#[test]
fn webhook_fields_are_checked_at_load_and_located() {
    let text = r#"sinks:
  hook:
    type: webhook
    url: "https://{{ vars.tenant }}.example.com/x"
    headers:
      Authorization: "Bearer {{ token "
    hmac: { secret_env: "not a name" }
"#;
    let errs = errors(text);
    let expect = [
        "rules.yaml:4:10: sinks.hook.url: the scheme, host and port must be written out",
        "rules.yaml:6:22: sinks.hook.headers.Authorization: template: syntax error",
        "rules.yaml:7:25: sinks.hook.hmac.secret_env: must be an environment variable name",
    ];
    assert_eq!(errs.len(), expect.len(), "{}", errs.join("\n"));
    for (got, want) in errs.iter().zip(expect) {
        assert!(got.starts_with(want), "{got}\nwanted {want}");
    }
}

#[test]
fn protocol_versions() {
    let base = "broker: { url: \"mqtt://h\", client_id: c, protocol: P }\n";
    for (p, want) in [
        ("5", raw::Protocol::V5),
        ("3.1.1", raw::Protocol::V311),
        ("4", raw::Protocol::V311),
    ] {
        let plan = parse(&base.replace('P', p), "f", env).unwrap();
        assert_eq!(plan.broker.unwrap().connection.protocol, want);
    }
    assert!(errors(&base.replace('P', "6"))[0].contains("unknown MQTT protocol"));
}

#[test]
fn embedded_broker_settings_are_validated_with_locations() {
    let plan = parse(
        "embedded:\n  listen: [127.0.0.1:1884, \"[::1]:1884\"]\n  allow_anonymous: true\n  max_keepalive: 60s\n",
        "rules.yaml",
        env,
    )
    .unwrap();
    let e = plan.embedded.unwrap();
    assert_eq!(e.listen.len(), 2);
    assert_eq!(e.max_keepalive, 60);
    assert!(plan.broker.is_none());

    let default = parse("embedded: { allow_anonymous: true }\n", "rules.yaml", env).unwrap();
    assert_eq!(
        default.embedded.unwrap().listen,
        vec!["127.0.0.1:1883".parse().unwrap()],
        "loopback unless told otherwise"
    );

    let text = r#"broker:
  url: mqtt://localhost
  client_id: c1
embedded:
  listen: nowhere
  users:
    - { username: sensor, password_hash: plain }
  acl:
    - { username: sensor, action: allow, publish: ["a/#/b"] }
  max_inflight: 0
"#;
    expect_errors(
        text,
        &[
            "rules.yaml:5:3: embedded: configure either `broker:`",
            "rules.yaml:5:11: embedded.listen: \"nowhere\" is not an address",
            "rules.yaml:7:42: embedded.users[0].password_hash: not a PHC hash string",
            "rules.yaml:9:52: embedded.acl[0].publish[0]: \"a/#/b\"",
            "rules.yaml:10:17: embedded.max_inflight: must be between 1 and 65535",
        ],
    );

    assert!(
        parse(
            "embedded: { allow_anonymous: true }\nsinks:\n  up: { type: republish, topic: x }\n",
            "rules.yaml",
            env
        )
        .is_ok(),
        "republish publishes into the embedded broker"
    );
    let errs = errors("embedded: {}\n");
    assert!(errs[0].contains("no client could connect"), "{errs:?}");
}

#[test]
fn embedded_limits_out_of_range_name_their_line_and_field() {
    let text = r#"embedded:
  allow_anonymous: true
  connect_timeout: 10ms
  max_connecting: 0
  connection_rate_per_ip: -1
  max_subscriptions: 0
  max_topic_levels: 0
  max_topic_length: 70000
"#;
    expect_errors(
        text,
        &[
            "rules.yaml:3:20: embedded.connect_timeout: must be between 100ms and 5m",
            "rules.yaml:4:19: embedded.max_connecting: must be at least 1",
            "rules.yaml:5:27: embedded.connection_rate_per_ip: must be between 0",
            "rules.yaml:6:22: embedded.max_subscriptions: must be at least 1",
            "rules.yaml:7:21: embedded.max_topic_levels: must be at least 1",
            "rules.yaml:8:21: embedded.max_topic_length: must be between 1 byte and 65535",
        ],
    );
}

#[test]
fn the_variable_behind_the_listen_address_is_kept_for_hints() {
    let listen_var = |listen: &str| {
        let text = format!("embedded:\n  listen: {listen}\n  allow_anonymous: true\n");
        parse(&text, "rules.yaml", env)
            .unwrap()
            .embedded
            .unwrap()
            .listen_var
    };
    assert_eq!(
        listen_var("${MQBRIDGE_LISTEN:-127.0.0.1:1883}").as_deref(),
        Some("MQBRIDGE_LISTEN")
    );
    assert_eq!(listen_var("\"${L:-[::1]:1883}\"").as_deref(), Some("L"));
    assert_eq!(listen_var("127.0.0.1:1883"), None);
    assert_eq!(listen_var("127.0.0.1:${PORT:-1883}"), None);
    assert_eq!(listen_var("[\"${L:-127.0.0.1:1883}\"]"), None);
}

#[test]
fn yaml_syntax_errors_give_the_place_and_the_path_being_read() {
    for (text, want) in [
        // An unclosed flow mapping (was reported under `sinks.local.?`).
        (
            "sinks:\n  local: { type: sqlite, path: x.db, table: t\nrules: []\n",
            "rules.yaml:3:6: sinks.local: did not find expected ',' or '}' \
             (while parsing a flow mapping that starts at 2:10)",
        ),
        // An unclosed quote.
        (
            "sinks:\n  local:\n    type: sqlite\n    path: \"data/x.db\n    table: t\nrules: []\n",
            "rules.yaml:7:1: sinks.local.path: found unexpected end of stream \
             (while scanning a quoted scalar that starts at 4:11)",
        ),
        // Bad indentation (was an unknown sink type "sqlite path").
        (
            "sinks:\n  local:\n    type: sqlite\n     path: x.db\n",
            "rules.yaml:4:10: sinks.local: mapping values are not allowed in this context",
        ),
        // A syntax error wins over a shape error above it.
        (
            "broker:\n  url: mqtt://h\n  client_id: x\n  qos: high\nrules:\n  - from: [a\n",
            "rules.yaml:7:1: rules[0].from: did not find expected ',' or ']' \
             (while parsing a flow sequence that starts at 6:11)",
        ),
        // A key that is not a string: the path stops before it.
        (
            "sinks: { [x]: 1 }\n",
            "rules.yaml:1:10: sinks: invalid type: sequence, expected a string",
        ),
        (
            "sinks:\n  a: { type: file, path: x }\n  a: { type: file, path: y }\n",
            "rules.yaml:2:3: sinks: duplicate entry with key \"a\"",
        ),
    ] {
        assert_eq!(errors(text), [want], "{text}");
    }
}

#[test]
fn for_run_the_files_and_variables_it_needs_are_checked_with_every_other_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let text = format!(
        r#"broker:
  url: mqtts://h
  client_id: c
  password_file: {missing}
  ca_file: {dir}
  qos: 7
sinks:
  unset: {{ type: webhook, url: "http://h/x", hmac: {{ secret_env: UNSET_SECRET }} }}
  empty: {{ type: webhook, url: "http://h/y", hmac: {{ secret_env: EMPTY_SECRET }} }}
  set: {{ type: webhook, url: "http://h/z", hmac: {{ secret_env: SET_SECRET }} }}
"#,
        missing = missing.display(),
        dir = dir.path().display()
    );
    let lookup = |name: &str| match name {
        "EMPTY_SECRET" => Some(String::new()),
        "SET_SECRET" => Some("k".into()),
        _ => env(name),
    };
    let errs: Vec<String> = parse_checked(&text, "rules.yaml", lookup, Checks::ForRun)
        .unwrap_err()
        .0
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        errs,
        [
            format!(
                "rules.yaml:4:18: broker.password_file: cannot read {}: No such file or directory (os error 2)",
                missing.display()
            ),
            format!(
                "rules.yaml:5:12: broker.ca_file: {} is a directory, not a file",
                dir.path().display()
            ),
            "rules.yaml:6:8: broker.qos: must be 0, 1 or 2".into(),
            "rules.yaml:8:66: sinks.unset.hmac.secret_env: environment variable UNSET_SECRET is not set or empty".into(),
            "rules.yaml:9:66: sinks.empty.hmac.secret_env: environment variable EMPTY_SECRET is not set or empty".into(),
        ]
    );
    // `try` and `parse` look at the file alone.
    assert_eq!(
        errors(&text),
        ["rules.yaml:6:8: broker.qos: must be 0, 1 or 2"]
    );
}

#[test]
fn for_run_the_embedded_certificate_and_key_must_be_readable() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("server.pem");
    std::fs::write(&cert, "not checked beyond being readable").unwrap();
    let text = format!(
        "embedded:\n  allow_anonymous: true\n  tls: {{ listen: 127.0.0.1:8883, cert_file: {}, key_file: {} }}\n",
        cert.display(),
        dir.path().join("server.key").display()
    );
    let errs = parse_checked(&text, "rules.yaml", env, Checks::ForRun).unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    assert_eq!(errs.0[0].path, "embedded.tls.key_file");
    assert!(errs.0[0].message.starts_with("cannot read "), "{errs}");
    std::fs::write(dir.path().join("server.key"), "").unwrap();
    assert!(parse_checked(&text, "rules.yaml", env, Checks::ForRun).is_ok());
}

#[test]
fn client_certificate_settings_need_the_client_ca_file() {
    expect_errors(
        "embedded:\n  allow_anonymous: true\n  tls:\n    listen: 127.0.0.1:8883\n    cert_file: s.pem\n    key_file: s.key\n    require_client_cert: false\n    username_from: cn\n",
        &[
            "rules.yaml:7:26: embedded.tls.require_client_cert: needs `client_ca_file`",
            "rules.yaml:8:20: embedded.tls.username_from: needs `client_ca_file`",
        ],
    );
    expect_errors(
        "embedded:\n  allow_anonymous: true\n  tls: { listen: [], cert_file: s.pem, key_file: s.key, client_ca_file: ca.pem, username_from: dn }\n",
        &[
            "rules.yaml:3:96: embedded.tls.username_from: unknown variant `dn`, expected `cn` or `san`",
        ],
    );
    let tls = |settings: &str| {
        let text = format!(
            "embedded:\n  tls: {{ listen: 127.0.0.1:8883, cert_file: s.pem, key_file: s.key{settings} }}\n"
        );
        parse(&text, "rules.yaml", env).map(|p| p.embedded.unwrap().tls.unwrap().client_auth)
    };
    // Required unless said otherwise; no name taken unless `username_from` says which.
    let auth = tls(", client_ca_file: ca.pem, username_from: san")
        .unwrap()
        .unwrap();
    assert_eq!(
        (auth.ca_file.to_str(), auth.required, auth.username_from),
        (Some("ca.pem"), true, Some(raw::CertName::San))
    );
    // With `username_from`, certificates are a way in: no users needed.
    let auth = tls(", client_ca_file: ca.pem, require_client_cert: false, username_from: cn")
        .unwrap()
        .unwrap();
    assert_eq!(
        (auth.required, auth.username_from),
        (false, Some(raw::CertName::Cn))
    );
    let errs = tls(", client_ca_file: ca.pem").unwrap_err().to_string();
    assert!(errs.contains("no client could connect"), "{errs}");
    assert!(
        tls("")
            .unwrap_err()
            .to_string()
            .contains("no client could connect")
    );
}

#[test]
fn for_run_the_client_ca_file_must_hold_ca_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, ca) = (dir.path().join("s.pem"), dir.path().join("ca.pem"));
    std::fs::write(&cert, "").unwrap();
    let text = format!(
        "embedded:\n  allow_anonymous: true\n  tls:\n    listen: 127.0.0.1:8883\n    cert_file: {c}\n    key_file: {c}\n    client_ca_file: {ca}\n",
        c = cert.display(),
        ca = ca.display()
    );
    let error = || {
        let errs = parse_checked(&text, "rules.yaml", env, Checks::ForRun).unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        errs.0[0].to_string()
    };
    let at = "rules.yaml:7:21: embedded.tls.client_ca_file: ";
    assert_eq!(
        error(),
        format!(
            "{at}cannot read {}: No such file or directory (os error 2)",
            ca.display()
        )
    );
    std::fs::write(
        &ca,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    assert_eq!(
        error(),
        format!(
            "{at}no certificate (-----BEGIN CERTIFICATE-----) in {}",
            ca.display()
        )
    );
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = error();
    assert!(
        e.starts_with(&format!(
            "{at}{}: certificate 1 is not usable as a CA: ",
            ca.display()
        )),
        "{e}"
    );
    // One or more certificates, as PEM.
    let pem = crate::broker::client_cert::tests::CN_AND_SAN;
    std::fs::write(&ca, format!("{pem}\n{pem}\n")).unwrap();
    assert!(parse_checked(&text, "rules.yaml", env, Checks::ForRun).is_ok());
    // `try` and `parse` do not read it.
    std::fs::remove_file(&ca).unwrap();
    assert!(parse(&text, "rules.yaml", env).is_ok());
}

#[test]
fn the_admin_server_is_off_by_default_and_on_loopback_when_configured() {
    assert!(parse(GOOD, "rules.yaml", env).unwrap().admin.is_none());
    let plan = parse("admin: {}\n", "rules.yaml", env).unwrap();
    let admin = plan.admin.unwrap();
    assert_eq!(admin.listen.to_string(), "127.0.0.1:9883");
    assert_eq!(admin.token, None);
    let plan = parse(
        "admin: { listen: \"[::1]:9000\", token: s3cret-token }\n",
        "rules.yaml",
        env,
    )
    .unwrap();
    let debug = format!("{plan:?}");
    assert!(!debug.contains("s3cret-token"), "{debug}");
    let admin = plan.admin.unwrap();
    assert_eq!(
        admin.token,
        Some(TokenSource::Inline(plan::Secret("s3cret-token".into())))
    );
    assert_eq!(admin.token.unwrap().describe(), "token set in the file");
}

#[test]
fn the_admin_server_needs_a_token_beyond_loopback() {
    assert_eq!(
        errors("admin:\n  listen: 0.0.0.0:9883\n"),
        [
            "rules.yaml:2:11: admin.listen: 0.0.0.0:9883 is reachable from other machines: set a token (admin.token, token_file or token_env), or listen on 127.0.0.1"
        ]
    );
    for ok in [
        "admin: { listen: 0.0.0.0:9883, token: t }\n",
        "admin: { listen: 0.0.0.0:9883, token_file: /run/secrets/admin }\n",
        "admin: { listen: 0.0.0.0:9883, token_env: ADMIN_TOKEN }\n",
    ] {
        assert!(parse(ok, "rules.yaml", env).is_ok(), "{ok}");
    }
    assert_eq!(
        errors(
            "admin:\n  token: t\n  token_env: \"not a name\"\n  listen: nowhere\n  token_file: x\n"
        ),
        [
            "rules.yaml:3:14: admin.token_env: must be an environment variable name",
            "rules.yaml:3:14: admin.token_env: set one of token, token_file or token_env",
            "rules.yaml:4:11: admin.listen: \"nowhere\" is not an address like 127.0.0.1:1883 or [::]:1883",
            "rules.yaml:5:15: admin.token_file: set one of token, token_file or token_env",
        ]
    );
    assert_eq!(
        errors("admin: { token: \"\" }\n"),
        ["rules.yaml:1:17: admin.token: must not be empty (without a token, remove the key)"]
    );
}

#[test]
fn for_run_the_admin_token_file_and_variable_must_be_there() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("token");
    let text = format!(
        "admin:\n  listen: 0.0.0.0:9883\n  token_file: {}\n",
        missing.display()
    );
    let errs = parse_checked(&text, "rules.yaml", env, Checks::ForRun).unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    assert_eq!(errs.0[0].path, "admin.token_file");
    let text = "admin:\n  token_env: ADMIN_TOKEN\n";
    let errs = parse_checked(text, "rules.yaml", env, Checks::ForRun).unwrap_err();
    assert_eq!(
        errs.to_string(),
        "rules.yaml:2:14: admin.token_env: environment variable ADMIN_TOKEN is not set or empty"
    );
    let lookup = |name: &str| (name == "ADMIN_TOKEN").then(|| "t".to_string());
    assert!(parse_checked(text, "rules.yaml", lookup, Checks::ForRun).is_ok());
}

#[test]
fn mosquitto_files_join_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let aclfile = dir.path().join("aclfile");
    std::fs::write(&passwd, mosquitto::tests::PASSWD).unwrap();
    std::fs::write(&aclfile, "user alice\ntopic readwrite alice/#\n").unwrap();
    let hash = crate::broker::auth::hash_password("x");
    let text = format!(
        "embedded:\n  users: [{{ username: dave, password_hash: \"{hash}\" }}]\n  password_file: {}\n  acl_file: {}\n",
        passwd.display(),
        aclfile.display()
    );
    let embedded = parse(&text, "rules.yaml", env).unwrap().embedded.unwrap();
    let users: Vec<(&str, bool)> = embedded
        .users
        .iter()
        .map(|(name, c)| (name.as_str(), matches!(c, Credential::Mosquitto(_))))
        .collect();
    assert_eq!(
        users,
        [
            ("dave", false),
            ("alice", true),
            ("bob", true),
            ("carol smith", true)
        ]
    );
    assert!(matches!(&embedded.acl, Acl::Mosquitto(acl) if acl.users["alice"].len() == 1));
}

#[test]
fn mosquitto_files_name_the_file_line_and_field_of_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let aclfile = dir.path().join("aclfile");
    std::fs::write(&passwd, mosquitto::tests::PASSWD).unwrap();
    std::fs::write(&aclfile, "user alice\ntopic sometimes a/b\n").unwrap();
    let hash = crate::broker::auth::hash_password("x");
    let text = format!(
        r##"embedded:
  users: [{{ username: bob, password_hash: "{hash}" }}]
  password_file: {}
  acl_file: {}
  acl:
    - {{ username: "*", action: deny, publish: ["#"] }}
"##,
        passwd.display(),
        aclfile.display()
    );
    let (p, a) = (passwd.display(), aclfile.display());
    assert_eq!(
        errors(&text),
        [
            format!(
                "rules.yaml:2:23: embedded.users[0].username: duplicate user \"bob\": also in the password file {p} (line 2)"
            ),
            "rules.yaml:4:13: embedded.acl_file: set `acl` or `acl_file`, not both".into(),
            format!(
                "{a}:2:7: embedded.acl_file: unknown access \"sometimes\": use read, write, readwrite or deny"
            ),
        ]
    );
    std::fs::write(
        &passwd,
        format!("{}alice:secret\n", mosquitto::tests::PASSWD),
    )
    .unwrap();
    let malformed = format!(
        "{p}:4:7: embedded.password_file: user \"alice\": not a $6$ or $7$ hash (a plain-text password? `mosquitto_passwd -U FILE` hashes a whole file)"
    );
    assert!(errors(&text).contains(&malformed), "{:?}", errors(&text));

    // A file that cannot be read is located in the config; so is an empty password file
    // that leaves no one able to connect.
    let missing = dir.path().join("missing");
    std::fs::write(&passwd, "# nobody yet\n").unwrap();
    let text = format!(
        "embedded:\n  password_file: {}\n  acl_file: {}\n",
        passwd.display(),
        missing.display()
    );
    assert_eq!(
        errors(&text),
        [
            format!(
                "rules.yaml:2:18: embedded.password_file: no client could connect: {p} holds no users, `users:` is empty and allow_anonymous is false"
            ),
            format!(
                "rules.yaml:3:13: embedded.acl_file: cannot read {}: No such file or directory (os error 2)",
                missing.display()
            ),
        ]
    );
}

#[test]
fn a_max_packet_size_out_of_mqtts_range_names_its_field_for_the_broker_and_the_client() {
    let text = "broker: { url: \"mqtt://127.0.0.1:1883\", client_id: c, max_packet_size: 32 }\n\
                embedded: { allow_anonymous: true, max_packet_size: 512MiB }\n";
    let errs: Vec<String> = parse_checked(text, "rules.yaml", env, Checks::ForRun)
        .unwrap_err()
        .0
        .iter()
        .map(|e| e.to_string())
        .collect();
    let named = |field: &str| {
        errs.iter()
            .any(|e| e.contains(field) && e.contains("must be between 64 bytes and 256MiB"))
    };
    assert!(named("broker.max_packet_size"), "{errs:?}");
    assert!(named("embedded.max_packet_size"), "{errs:?}");
}

/// A rule keeps a JSON payload it takes whole as text only when every sink it writes to
/// is PostgreSQL's (the one sink that writes the text unparsed).
#[test]
fn only_rules_writing_to_postgres_alone_keep_the_payload_as_text() {
    let plan = parse(
        r#"
broker: { url: "mqtt://localhost:1883", client_id: c1 }
sinks:
  pg: { type: postgres, url: "${DATABASE_URL}", table: readings }
  pg2: { type: postgres, url: "${DATABASE_URL}", table: copies }
  db: { type: sqlite, path: x.db, table: readings }
rules:
  - { name: a, from: ["a/#"], transform: "{body: .payload}", to: [pg, pg2] }
  - { name: b, from: ["b/#"], transform: "{body: .payload}", to: [pg, db] }
  - { name: c, from: ["c/#"], transform: "{body: .payload}", to: [db] }
"#,
        "rules.yaml",
        env,
    )
    .unwrap();
    let keeps: Vec<bool> = plan.rules.iter().map(|r| r.keeps_payload_text).collect();
    assert_eq!(keeps, [true, false, false]);
}
