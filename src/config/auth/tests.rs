//! `embedded.auth` as a user writes it: what a good one compiles to, and each mistake at
//! its line and field.

use crate::config::parse;

fn env(name: &str) -> Option<String> {
    (name == "AUTH_TOKEN").then(|| "s3cret-token".into())
}

fn errors(text: &str) -> Vec<String> {
    match parse(text, "rules.yaml", env) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

const EC_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEeCSQmhuOj1az5p3QDP0FgaiV1Bst
wEoL1Xt2aOHYFxoFe2DKwdFxgbboyeFgJxTN3ZkX6loPiZfH/XPNon7z5w==
-----END PUBLIC KEY-----
";
const RSA_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAvV5JuoY8CrSIPpHz+xEx
vaUiX/3FhqrX3svz/kbKNiMjjdpPCWsNO2DJQ/GQRWCMj7sOIAWVZzR59mHE3zc2
rjEROO1FZfO3G5p+gjTPGQLP+AOCyIAdvb1jTiPcSFnBJZHozdTEYbd/ryQJB86k
Xw3yzjd6hcI2iDjQoi8wjXw7PdTMkw/wvlQdh5sDCmv8+D4462VRSCUPibnjJWr6
wsL7h5KRmaYu3tiI56UoHy1zNhS2qnImqZqNVYDj1zEqw2mS3g4hos6Ht/vPeOUt
XRwG2PberjHPwy660bZh+7m2oCUoeK+Nqa0DU1SfP3Ne6sR6jW+euPJNstBp3wL6
qQIDAQAB
-----END PUBLIC KEY-----
";
const ED25519_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAreu64Gr7boo6qowrzYhgBffyxnAQyq0x2V8lq9xGXak=
-----END PUBLIC KEY-----
";

#[test]
fn http_and_jwt_compile() {
    let plan = parse(
        r#"
embedded:
  auth:
    http:
      authentication:
        url: http://auth.local:8080/mqtt/auth
        headers: { Authorization: "Bearer ${AUTH_TOKEN}" }
      authorization:
        url: "http://auth.local:8080/mqtt/acl?c={{ clientid | urlencode }}"
        method: get
        body: { t: "{{ topic }}", a: "{{ action }}" }
        cache_ttl: 30s
    jwt:
      secret: hush
      algorithms: [HS256]
      verify_claims: { sub: "{{ username }}" }
"#,
        "rules.yaml",
        env,
    )
    .unwrap();
    let auth = plan.embedded.unwrap().auth;
    let authn = auth.http_authentication.unwrap();
    let names: Vec<&str> = authn.body.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["clientid", "password", "peerhost", "username"],
        "the default body"
    );
    assert_eq!(authn.timeout, std::time::Duration::from_secs(5));
    assert!(
        !format!("{:?}", authn.headers).contains("s3cret"),
        "header values stay out of Debug"
    );
    let authz = auth.http_authorization.unwrap();
    assert_eq!(authz.cache_ttl, std::time::Duration::from_secs(30));
    assert_eq!(authz.cache_size, 32);
    assert_eq!(authz.request.body.len(), 2);
    let jwt = auth.jwt.unwrap();
    assert_eq!(jwt.keys.len(), 1);
    assert_eq!(jwt.keys[0].algorithms, [jsonwebtoken::Algorithm::HS256]);
    assert_eq!(jwt.acl_claim.as_deref(), Some("acl"));
}

#[test]
fn a_token_or_an_http_service_is_enough_to_let_clients_in() {
    // Without users, password_file or allow_anonymous, the broker is not closed to all.
    for auth in [
        "    jwt: { secret: hush }",
        "    http: { authentication: { url: http://a.local/auth } }",
    ] {
        let text = format!("embedded:\n  auth:\n{auth}\n");
        assert!(parse(&text, "rules.yaml", env).is_ok(), "{text}");
    }
    let only_authz =
        "embedded:\n  auth:\n    http: { authorization: { url: http://a.local/acl } }\n";
    let errs = errors(only_authz);
    assert!(errs[0].contains("no client could connect"), "{errs:?}");
}

#[test]
fn mistakes_name_their_line_and_field() {
    let errs = errors(
        r#"
embedded:
  allow_anonymous: true
  auth:
    http:
      authentication:
        url: "{{ topic }}/auth"
        body: { t: "{{ topic }}" }
        timeout: 0s
      authorization:
        url: http://a.local/acl
        headers: { Content-Length: "1" }
        cache_size: 0
    jwt:
      secret: hush
      public_key_file: /nonexistent/key.pem
      algorithms: [HS257]
      verify_claims: { sub: "{{ topic }}" }
"#,
    );
    let want = [
        "rules.yaml:7:14: embedded.auth.http.authentication.url: must start with http:// or https://",
        "rules.yaml:8:20: embedded.auth.http.authentication.body.t: template: undefined value",
        "rules.yaml:9:18: embedded.auth.http.authentication.timeout: must be more than 0",
        "rules.yaml:12:36: embedded.auth.http.authorization.headers.Content-Length: is set by the HTTP client",
        "rules.yaml:13:21: embedded.auth.http.authorization.cache_size: must be at least 1",
        "rules.yaml:16:24: embedded.auth.jwt.public_key_file: cannot read /nonexistent/key.pem",
        "rules.yaml:16:24: embedded.auth.jwt.public_key_file: set one of secret, secret_file, public_key_file or jwks_file",
        "rules.yaml:17:20: embedded.auth.jwt.algorithms[0]: unknown algorithm \"HS257\"",
        "rules.yaml:18:29: embedded.auth.jwt.verify_claims.sub: template: undefined value",
    ];
    for w in want {
        assert!(
            errs.iter().any(|e| e.starts_with(w)),
            "missing {w:?} in\n{}",
            errs.join("\n")
        );
    }
    assert_eq!(errs.len(), want.len(), "{}", errs.join("\n"));
}

#[test]
fn public_keys_and_key_sets_are_read_from_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let jwt = |key: &str| {
        let text = format!("embedded:\n  auth:\n    jwt: {{ {key} }}\n");
        parse(&text, "rules.yaml", env).map(|p| p.embedded.unwrap().auth.jwt.unwrap())
    };
    let ec = jwt(&format!(
        "public_key_file: {}",
        file("ec.pem", EC_PUBLIC_KEY)
    ))
    .unwrap();
    use jsonwebtoken::Algorithm::{ES256, ES384, EdDSA, HS256, HS384, HS512};
    assert_eq!(ec.keys[0].algorithms, [ES256, ES384]);
    let ed = jwt(&format!(
        "public_key_file: {}",
        file("ed.pem", ED25519_PUBLIC_KEY)
    ))
    .unwrap();
    assert_eq!(ed.keys[0].algorithms, [EdDSA]);
    let secret = jwt(&format!("secret_file: {}", file("s", "aGVsbG8=\n"))).unwrap();
    assert_eq!(secret.keys[0].algorithms, [HS256, HS384, HS512]);

    let set = r#"{"keys": [
        {"kty": "oct", "kid": "h1", "k": "aGVsbG8"},
        {"kty": "OKP", "kid": "e1", "crv": "Ed25519", "x": "reu64Gr7boo6qowrzYhgBffyxnAQyq0x2V8lq9xGXak"}
    ]}"#;
    let jwks = jwt(&format!(
        "jwks_file: {}, algorithms: [EdDSA]",
        file("k.json", set)
    ))
    .unwrap();
    assert_eq!(
        jwks.keys.len(),
        1,
        "the HMAC key checks none of the algorithms"
    );
    assert_eq!(jwks.keys[0].kid.as_deref(), Some("e1"));

    for (key, message) in [
        (
            format!("public_key_file: {}", file("cert.pem", "not a key")),
            "no PEM public key",
        ),
        (
            format!("jwks_file: {}", file("empty.json", r#"{"keys": []}"#)),
            "the key set holds no keys",
        ),
        (
            format!("jwks_file: {}", file("bad.json", "[1, 2]")),
            "not a JSON Web Key Set",
        ),
        (
            format!("secret_file: {}, secret_base64: true", file("b", "%%%")),
            "not base64",
        ),
        (
            format!("jwks_file: {}, algorithms: [RS256]", file("k2.json", set)),
            "no key can check any of these algorithms",
        ),
    ] {
        let errs = jwt(&key).unwrap_err().to_string();
        assert!(errs.contains(message), "{key}: {errs}");
    }
}

/// The YAML block after `<!-- MARKER -->` in `doc`.
fn block<'a>(doc: &'a str, marker: &str) -> &'a str {
    let after = &doc[doc.find(marker).unwrap_or_else(|| panic!("{marker}"))..];
    let start = after.find("```yaml\n").unwrap() + "```yaml\n".len();
    let len = after[start..].find("```").unwrap();
    &after[start..start + len]
}

#[test]
fn the_readme_and_migration_examples_parse() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("issuer.pem");
    std::fs::write(&key, RSA_PUBLIC_KEY).unwrap();
    let readme = include_str!("../../../README.md");
    let migrate = include_str!("../../../docs/migrate.md");
    for (doc, marker) in [
        (readme, "<!-- auth-example: http -->"),
        (readme, "<!-- auth-example: jwt -->"),
        (readme, "<!-- sink-example: mqtt -->"),
        (readme, "<!-- sink-example: influxdb -->"),
        (readme, "<!-- sink-example: tables-on-demand -->"),
        (migrate, "<!-- emqx-example: mqbridge -->"),
    ]
    .into_iter()
    .chain(cfg!(feature = "nats").then_some((readme, "<!-- sink-example: nats -->")))
    .chain(cfg!(feature = "kafka").then_some((readme, "<!-- sink-example: kafka -->")))
    {
        let text =
            block(doc, marker).replace("/etc/mqbridge/jwt-issuer.pem", &key.display().to_string());
        if let Err(e) = parse(&text, "example.yaml", env) {
            panic!("{marker}: {e}");
        }
    }
}
