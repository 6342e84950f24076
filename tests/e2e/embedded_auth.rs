//! `embedded.auth` with real clients (rumqttc) against mqbridge in-process: an HTTP
//! authentication and authorization service on loopback (hyper) that answers allow, deny
//! or ignore and counts what it is asked; an endpoint that is down; and JSON Web Tokens
//! signed in the test with jsonwebtoken (RS256, keys made by openssl).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rumqttc::{ConnectReturnCode, Packet, QoS};
use serde_json::{Value, json};

use crate::embedded::{V4, config, start};
use crate::util::*;

/// The auth service: what it was asked, as (path, body).
#[derive(Clone, Default)]
struct AuthService {
    seen: Arc<Mutex<Vec<(String, Value)>>>,
}

impl AuthService {
    /// Listens on a free loopback port; returns its base URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let seen = Arc::clone(&self.seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                let service = hyper::service::service_fn(move |req| answer(Arc::clone(&seen), req));
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        format!("http://{addr}")
    }

    /// How many authorization requests were for `topic` and `action`.
    fn asked(&self, topic: &str, action: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(path, b)| path == "/acl" && b["topic"] == topic && b["action"] == action)
            .count()
    }
}

/// Logins: alice (password `good`) allowed, root a superuser, bob denied, anyone else
/// ignored. Topics: `allowed/…` allowed, `ok/…` allowed with a 204, `denied/…` denied,
/// anything else ignored.
async fn answer(
    seen: Arc<Mutex<Vec<(String, Value)>>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let body: Value = serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes())
        .unwrap_or(Value::Null);
    seen.lock().unwrap().push((path.clone(), body.clone()));
    let result = |r: &str| json!({"result": r});
    let (status, answer) = match path.as_str() {
        "/auth" => match (body["username"].as_str(), body["password"].as_str()) {
            (Some("alice"), Some("good")) => (200, result("allow")),
            (Some("root"), Some("good")) => (200, json!({"result": "allow", "is_superuser": true})),
            (Some("bob"), _) | (Some("alice"), _) => (200, result("deny")),
            _ => (200, result("ignore")),
        },
        _ => {
            let topic = body["topic"].as_str().unwrap_or("");
            if topic.starts_with("allowed/") {
                (200, result("allow"))
            } else if topic.starts_with("ok/") {
                (204, Value::Null)
            } else if topic.starts_with("denied/") {
                (200, result("deny"))
            } else {
                (200, result("ignore"))
            }
        }
    };
    let body = if status == 204 {
        Bytes::new()
    } else {
        Bytes::from(answer.to_string())
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap())
}

fn refused(r: Result<V4, ConnectReturnCode>) -> ConnectReturnCode {
    match r {
        Ok(_) => panic!("connected, expected a refusal"),
        Err(code) => code,
    }
}

/// SUBACK return codes of a subscription.
async fn subscribe(c: &mut V4, filter: &str) -> Vec<rumqttc::SubscribeReasonCode> {
    match c.subscribe_acked(filter, QoS::AtLeastOnce).await {
        Packet::SubAck(a) => a.return_codes,
        _ => unreachable!(),
    }
}

fn granted(codes: Vec<rumqttc::SubscribeReasonCode>) -> bool {
    matches!(codes[..], [rumqttc::SubscribeReasonCode::Success(_)])
}

/// Publishes at QoS 1 and waits for the PUBACK: the broker decided (and routed) it.
async fn publish_acked(c: &mut V4, topic: &str, payload: &str) {
    c.client
        .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
        .await
        .unwrap();
    c.expect(|p| matches!(p, Packet::PubAck(_))).await;
}

/// The topics of the messages that reached `c` before its probe on `probe` came back.
async fn received(c: &mut V4, probe: &str) -> Vec<String> {
    c.until_probe(probe)
        .await
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p.topic),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn an_http_service_authenticates_and_its_ignore_falls_through_to_the_users() {
    let service = AuthService::default();
    let url = service.start().await;
    let hash = mqbridge::broker::auth::hash_password("local-pw");
    let port = free_port();
    let yaml = config(
        port,
        &format!(
            "  users: [{{ username: carol, password_hash: \"{hash}\" }}]\n  auth:\n    http:\n      authentication: {{ url: \"{url}/auth\" }}"
        ),
        "",
    )
    .replace("allow_anonymous: true", "allow_anonymous: false");
    let _bridge = start(port, &yaml).await;
    let login = |id, user, pw| V4::try_connect_as(port, id, true, None, Some((user, pw)));

    login("a1", "alice", "good").await.expect("allowed");
    let bad = ConnectReturnCode::BadUserNamePassword;
    assert_eq!(refused(login("a2", "alice", "wrong").await), bad);
    assert_eq!(refused(login("b1", "bob", "good").await), bad, "denied");
    login("c1", "carol", "local-pw")
        .await
        .expect("ignored by the service, known to `users`");
    assert_eq!(
        refused(login("c2", "carol", "wrong").await),
        bad,
        "ignored, and `users` refuses the password"
    );
    assert_eq!(
        refused(login("d1", "dave", "x").await),
        bad,
        "ignored, and no one else knows dave"
    );
    let asked = service.seen.lock().unwrap().clone();
    let first = &asked[0].1;
    assert_eq!(
        (first["username"].as_str(), first["clientid"].as_str()),
        (Some("alice"), Some("a1"))
    );
    assert_eq!(first["peerhost"], "127.0.0.1");
}

#[tokio::test]
async fn an_http_service_authorizes_and_is_asked_once_per_topic_within_the_ttl() {
    let service = AuthService::default();
    let url = service.start().await;
    let port = free_port();
    let acl = "  acl: [{ username: \"*\", action: deny, publish: [\"local/deny/#\"], subscribe: [\"local/deny/#\"] }]";
    let yaml = config(
        port,
        &format!(
            "{acl}\n  auth:\n    http:\n      authorization: {{ url: \"{url}/acl\", cache_ttl: 1h }}"
        ),
        "",
    );
    let _bridge = start(port, &yaml).await;
    let mut sub = V4::connect(port, "sub", true, None).await;
    assert!(granted(subscribe(&mut sub, "allowed/#").await));
    assert!(granted(subscribe(&mut sub, "ok/#").await), "204 allows");
    assert!(!granted(subscribe(&mut sub, "denied/#").await));
    assert!(
        granted(subscribe(&mut sub, "local/#").await),
        "ignored: the local ACL allows it"
    );
    assert!(
        !granted(subscribe(&mut sub, "local/deny/#").await),
        "ignored: the local ACL denies it"
    );

    let mut publisher = V4::connect(port, "pub", true, None).await;
    const N: usize = 20;
    for i in 0..N {
        publish_acked(&mut publisher, "allowed/t", &i.to_string()).await;
    }
    publish_acked(&mut publisher, "denied/t", "no").await;
    publish_acked(&mut publisher, "local/t", "yes").await;
    publish_acked(&mut publisher, "local/deny/t", "no").await;
    let got = received(&mut sub, "ok/probe").await;
    let allowed = got.iter().filter(|t| *t == "allowed/t").count();
    assert_eq!(allowed, N, "{got:?}");
    assert_eq!(got.iter().filter(|t| *t == "local/t").count(), 1, "{got:?}");
    assert!(
        !got.iter()
            .any(|t| t.starts_with("denied/") || t.starts_with("local/deny")),
        "{got:?}"
    );
    assert_eq!(
        service.asked("allowed/t", "publish"),
        1,
        "{N} publishes on one topic, one request within the TTL"
    );
    assert_eq!(service.asked("allowed/#", "subscribe"), 1);
    let seen = service.seen.lock().unwrap().clone();
    let first_publish = seen
        .iter()
        .find(|(_, b)| b["action"] == "publish")
        .map(|(_, b)| b.clone())
        .unwrap();
    assert_eq!(
        first_publish,
        json!({"username": "", "clientid": "pub", "peerhost": "127.0.0.1", "topic": "allowed/t",
               "action": "publish", "qos": "1", "retain": "false"}),
        "the default body"
    );
}

#[tokio::test]
async fn a_superuser_from_the_http_service_skips_authorization() {
    let service = AuthService::default();
    let url = service.start().await;
    let port = free_port();
    let yaml = config(
        port,
        &format!(
            "  auth:\n    http:\n      authentication: {{ url: \"{url}/auth\" }}\n      authorization: {{ url: \"{url}/acl\" }}"
        ),
        "",
    )
    .replace("allow_anonymous: true", "allow_anonymous: false");
    let _bridge = start(port, &yaml).await;
    let mut root = V4::try_connect_as(port, "r1", true, None, Some(("root", "good")))
        .await
        .expect("allowed");
    assert!(granted(subscribe(&mut root, "denied/#").await));
    assert_eq!(service.asked("denied/#", "subscribe"), 0);
}

#[tokio::test]
async fn an_unreachable_authorization_endpoint_denies_within_its_timeout() {
    let port = free_port();
    let down = free_port();
    let yaml = config(
        port,
        &format!(
            "  auth:\n    http:\n      authorization: {{ url: \"http://127.0.0.1:{down}/acl\", timeout: 500ms }}"
        ),
        "",
    );
    let _bridge = start(port, &yaml).await;
    let mut c = V4::connect(port, "c", true, None).await;
    let started = std::time::Instant::now();
    assert!(!granted(subscribe(&mut c, "x/#").await), "fails closed");
    assert!(started.elapsed() < Duration::from_secs(5));

    // MQTT 5 says why a publish was refused.
    let mut opts = rumqttc::v5::MqttOptions::new("c5", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = rumqttc::v5::AsyncClient::new(opts, 10);
    client
        .publish("x/1", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "m")
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(a)) =
                events.poll().await.expect("connected")
            {
                return a.reason;
            }
        }
    })
    .await
    .expect("a PUBACK in time");
    assert_eq!(
        reason,
        rumqttc::v5::mqttbytes::v5::PubAckReason::NotAuthorized
    );
}

/// An RSA key pair made by openssl: (private key as PKCS#8 DER, public key PEM file).
fn rsa_key(dir: &std::path::Path, name: &str) -> (Vec<u8>, std::path::PathBuf) {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject as _;
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub.pem"));
    run_ok(
        Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&private),
    );
    run_ok(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public),
    );
    let der = PrivateKeyDer::from_pem_file(&private).unwrap();
    (der.secret_der().to_vec(), public)
}

fn rs256(key: &[u8], claims: Value) -> String {
    mqbridge::broker::auth::jwt::install_provider();
    let key = jsonwebtoken::EncodingKey::from_rsa_der(key);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .unwrap()
}

#[tokio::test]
async fn json_web_tokens_log_in_and_their_acl_claim_restricts_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = rsa_key(dir.path(), "issuer");
    let (other_key, _) = rsa_key(dir.path(), "other");
    let hash = mqbridge::broker::auth::hash_password("plain-pw");
    let port = free_port();
    let yaml = config(
        port,
        &format!(
            "  users: [{{ username: plain, password_hash: \"{hash}\" }}]\n  auth:\n    jwt:\n      public_key_file: {}\n      algorithms: [RS256]\n      verify_claims: {{ sub: \"{{{{ username }}}}\" }}",
            public.display()
        ),
        "",
    )
    .replace("allow_anonymous: true", "allow_anonymous: false");
    let _bridge = start(port, &yaml).await;
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    let login = |id: &'static str, user: &'static str, token: String| async move {
        V4::try_connect_as(port, id, true, None, Some((user, &token))).await
    };
    let bad = ConnectReturnCode::BadUserNamePassword;

    let expired = rs256(&key, json!({"sub": "dev1", "exp": exp - 1200}));
    assert_eq!(refused(login("e", "dev1", expired).await), bad, "expired");
    let forged = rs256(&other_key, json!({"sub": "dev1", "exp": exp}));
    assert_eq!(
        refused(login("f", "dev1", forged).await),
        bad,
        "another key"
    );
    let someone_else = rs256(&key, json!({"sub": "dev2", "exp": exp}));
    assert_eq!(
        refused(login("s", "dev1", someone_else).await),
        bad,
        "sub is not the username"
    );
    V4::try_connect_as(port, "p", true, None, Some(("plain", "plain-pw")))
        .await
        .expect("a password, not a token: `users` decides");

    // dev1 may publish under up/<its client id> and subscribe under down/<its client id>.
    let acl = json!({"pub": ["up/${clientid}/#"], "sub": ["down/${clientid}/#"]});
    let token = rs256(&key, json!({"sub": "dev1", "exp": exp, "acl": acl}));
    let mut dev = login("d1", "dev1", token).await.expect("a valid token");
    // A watcher whose token lets it subscribe to everything (and publish its probes).
    let all = json!([{"permission": "allow", "action": "all", "topic": "#"}]);
    let token = rs256(&key, json!({"sub": "watch", "exp": exp, "acl": all}));
    let mut watcher = login("w", "watch", token).await.expect("a valid token");
    assert!(granted(subscribe(&mut watcher, "#").await));

    assert!(granted(subscribe(&mut dev, "down/d1/#").await));
    assert!(
        !granted(subscribe(&mut dev, "down/#").await),
        "wider than its claim"
    );
    assert!(!granted(subscribe(&mut dev, "down/d2/#").await));
    publish_acked(&mut dev, "up/d1/temp", "21").await;
    publish_acked(&mut dev, "up/d2/temp", "forged").await;
    let got = received(&mut watcher, "probe/w").await;
    assert_eq!(got, ["up/d1/temp"], "only its own topic");
}
