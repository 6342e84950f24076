//! `embedded.auth`: authentication and authorization by an HTTP service, and JSON Web
//! Tokens, in the shape of EMQX 5's (see [`crate::broker::auth`] for what they mean and
//! how they compose with `users`, `password_file` and the ACL). As written (serde types,
//! which make the JSON schema), then validated into an [`AuthPlan`]: the request
//! templates compiled (the URL, headers and their secrets as the webhook sink's), each
//! placeholder checked against the ones its request has, and the JWT key parsed from the
//! file or setting that holds it.
//!
//! Placeholders are written `{{ username }}`, as everywhere in the rules file (EMQX
//! writes `${username}`, which the file reserves for environment variables).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::{Deserialize, Serialize};

use super::plan::Errors;
use super::sinks::webhook::{self, Header, Headers};
use super::units;
use crate::rule::template::Template;

/// `embedded.auth`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Ask an HTTP service who may connect (`authentication`) and what each client may
    /// publish and subscribe to (`authorization`), as EMQX's HTTP authenticator and
    /// authorizer do.
    #[serde(default)]
    pub http: Option<HttpAuthConfig>,
    /// Clients log in with a JSON Web Token (in the password, or the username), as with
    /// EMQX's JWT authenticator; its `acl` claim may restrict what the client does.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
}

/// `embedded.auth.http`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthConfig {
    /// Asked at each CONNECT (placeholders `username`, `password`, `clientid`,
    /// `peerhost`). It answers HTTP 200 with `{"result": "allow" | "deny" | "ignore",
    /// "is_superuser": bool, "acl": [...]}`, or 204 (allow). Not cached.
    #[serde(default)]
    pub authentication: Option<HttpAuthnConfig>,
    /// Asked for each SUBSCRIBE filter and each topic a client publishes to
    /// (placeholders `username`, `clientid`, `peerhost`, `topic`, `action`
    /// (`publish`/`subscribe`), `qos`, `retain`). It answers 200 with `{"result":
    /// "allow" | "deny" | "ignore"}`, or 204 (allow). Answers are cached per connection.
    #[serde(default)]
    pub authorization: Option<HttpAuthzConfig>,
}

/// `embedded.auth.http.authentication`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthnConfig {
    /// URL (scheme, host and port written out); placeholders may appear in the path and
    /// query, e.g. `http://auth.local:8080/mqtt/auth?clientid={{ clientid | urlencode }}`.
    pub url: String,
    /// `post` (default): `body` as a JSON object; `get`: `body` as the query string.
    #[serde(default)]
    pub method: HttpMethod,
    /// Extra headers: name → value template. Write secrets as `${ENV_VAR}` (expanded
    /// when the file is read), e.g. `Authorization: "Bearer ${AUTH_TOKEN}"`.
    #[serde(default)]
    pub headers: Headers,
    /// Request fields: name → value template. Default: `username`, `password`,
    /// `clientid` and `peerhost`.
    #[serde(default)]
    pub body: Option<BTreeMap<String, String>>,
    /// Longest wait for an answer; then the client is refused. Default 5s.
    #[serde(default = "default_timeout")]
    pub timeout: units::Duration,
}

/// `embedded.auth.http.authorization`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthzConfig {
    /// URL (scheme, host and port written out); placeholders may appear in the path and
    /// query.
    pub url: String,
    /// `post` (default): `body` as a JSON object; `get`: `body` as the query string.
    #[serde(default)]
    pub method: HttpMethod,
    /// Extra headers: name → value template; secrets as `${ENV_VAR}`.
    #[serde(default)]
    pub headers: Headers,
    /// Request fields: name → value template. Default: `username`, `clientid`,
    /// `peerhost`, `topic`, `action`, `qos` and `retain`.
    #[serde(default)]
    pub body: Option<BTreeMap<String, String>>,
    /// Longest wait for an answer; then the request is denied. Default 5s.
    #[serde(default = "default_timeout")]
    pub timeout: units::Duration,
    /// How long an answer is reused for the same client, topic (or filter), action, QoS
    /// and retain flag. `0s`: ask every time. Default 1m.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: units::Duration,
    /// Answers cached per connection (the oldest make room). Default 32.
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
}

fn default_timeout() -> units::Duration {
    units::Duration(Duration::from_secs(5))
}

fn default_cache_ttl() -> units::Duration {
    units::Duration(Duration::from_secs(60))
}

fn default_cache_size() -> usize {
    32
}

/// `method:` of an HTTP authenticator or authorizer.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum HttpMethod {
    #[default]
    #[serde(alias = "POST")]
    Post,
    #[serde(alias = "GET")]
    Get,
}

/// `embedded.auth.jwt`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// HMAC secret (HS256/384/512); prefer `${ENV_VAR}` or `secret_file`.
    #[serde(default)]
    pub secret: Option<String>,
    /// File holding the HMAC secret (a trailing newline is ignored), read at start and on
    /// each reload.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The secret is base64 (EMQX's `secret_base64_encoded`).
    #[serde(default)]
    pub secret_base64: bool,
    /// PEM file of the public key (`-----BEGIN PUBLIC KEY-----`: RSA, EC P-256/P-384 or
    /// Ed25519), read at start and on each reload.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// JSON Web Key Set file (`{"keys": [...]}`), read at start and on each reload. A
    /// token's `kid` picks its key; a token without one is tried against each key of its
    /// algorithm's family.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Algorithms accepted, e.g. `[RS256]`. Default: every one the key can check.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// Where the client puts its token: `password` (default) or `username`.
    #[serde(default)]
    pub from: TokenFrom,
    /// Claims that must equal these values (templates with `username` and `clientid`),
    /// e.g. `{sub: "{{ username }}"}`. `exp` and `nbf` are always checked when present.
    #[serde(default)]
    pub verify_claims: BTreeMap<String, String>,
    /// Claim holding the client's ACL (EMQX's formats: a list of `{permission, action,
    /// topic, qos, retain}` rules, or `{pub, sub, all}` lists of allowed filters). Default
    /// `acl`; `""`: none.
    #[serde(default = "default_acl_claim")]
    pub acl_claim: String,
}

fn default_acl_claim() -> String {
    "acl".into()
}

/// `embedded.auth.jwt.from`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TokenFrom {
    #[default]
    Password,
    Username,
}

/// `embedded.auth`, validated.
#[derive(Debug, Clone, Default)]
pub struct AuthPlan {
    pub http_authentication: Option<HttpRequestPlan>,
    pub http_authorization: Option<HttpAuthzPlan>,
    pub jwt: Option<JwtPlan>,
}

impl AuthPlan {
    /// Whether something beside `users` and `password_file` may let clients in.
    pub fn authenticates(&self) -> bool {
        self.http_authentication.is_some() || self.jwt.is_some()
    }
}

/// One HTTP request, compiled.
#[derive(Debug, Clone)]
pub struct HttpRequestPlan {
    pub url: Template,
    pub method: HttpMethod,
    /// Values not shown by `Debug`.
    pub headers: Vec<Header>,
    /// Field name → value template.
    pub body: Vec<(String, Template)>,
    pub timeout: Duration,
}

/// The HTTP authorizer's request and its cache.
#[derive(Debug, Clone)]
pub struct HttpAuthzPlan {
    pub request: HttpRequestPlan,
    /// Zero: no cache.
    pub cache_ttl: Duration,
    pub cache_size: usize,
}

/// `embedded.auth.jwt`, its key read and parsed.
#[derive(Debug, Clone)]
pub struct JwtPlan {
    /// One key (a secret or a public key), or those of a key set.
    pub keys: Vec<JwtKey>,
    pub from: TokenFrom,
    /// Claim name → the value it must have.
    pub verify_claims: Vec<(String, Template)>,
    /// None: no ACL from the token.
    pub acl_claim: Option<String>,
}

/// A key a token may be signed with.
#[derive(Debug, Clone)]
pub struct JwtKey {
    /// Its `kid` in a key set.
    pub kid: Option<String>,
    pub key: DecodingKey,
    /// The algorithms it checks (all of one family).
    pub algorithms: Vec<Algorithm>,
}

/// What `secret_file`, `public_key_file` or `jwks_file` holds, as read.
pub type JwtKeyFile = Vec<u8>;

/// The placeholders of each request, with sample values to check templates against.
const AUTHENTICATION: &[&str] = &["username", "password", "clientid", "peerhost"];
const AUTHORIZATION: &[&str] = &[
    "username", "clientid", "peerhost", "topic", "action", "qos", "retain",
];
const CLAIMS: &[&str] = &["username", "clientid"];

/// A context with each of `names` set to a sample string.
fn sample(names: &[&str]) -> serde_json::Value {
    names
        .iter()
        .map(|n| (n.to_string(), serde_json::Value::from("x")))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Validates `embedded.auth`; `key_file` is what the JWT key's file holds, if it names
/// one and it could be read (None: the reader reported why).
pub(super) fn validate_auth(
    a: &AuthConfig,
    key_file: Option<JwtKeyFile>,
    errs: &mut Errors,
) -> Option<AuthPlan> {
    let before = errs.len();
    let http = a.http.as_ref();
    let http_authentication = http.and_then(|h| h.authentication.as_ref()).and_then(|c| {
        let at = "embedded.auth.http.authentication";
        let body = c.body.clone().unwrap_or_else(|| fields(AUTHENTICATION));
        request(
            at,
            &c.url,
            c.method,
            &c.headers,
            &body,
            c.timeout,
            AUTHENTICATION,
            errs,
        )
    });
    let http_authorization = http.and_then(|h| h.authorization.as_ref()).and_then(|c| {
        let at = "embedded.auth.http.authorization";
        let body = c.body.clone().unwrap_or_else(|| fields(AUTHORIZATION));
        if c.cache_ttl.0 > Duration::ZERO && c.cache_size == 0 {
            errs.push((
                format!("{at}.cache_size"),
                "must be at least 1 (or set cache_ttl: 0s for no cache)".into(),
            ));
        }
        let request = request(
            at,
            &c.url,
            c.method,
            &c.headers,
            &body,
            c.timeout,
            AUTHORIZATION,
            errs,
        )?;
        Some(HttpAuthzPlan {
            request,
            cache_ttl: c.cache_ttl.0,
            cache_size: c.cache_size,
        })
    });
    if let Some(h) = http
        && h.authentication.is_none()
        && h.authorization.is_none()
    {
        errs.push((
            "embedded.auth.http".into(),
            "set `authentication`, `authorization` or both".into(),
        ));
    }
    let jwt = a.jwt.as_ref().and_then(|j| validate_jwt(j, key_file, errs));
    (errs.len() == before).then_some(AuthPlan {
        http_authentication,
        http_authorization,
        jwt,
    })
}

/// The default body: each placeholder under its own name.
fn fields(names: &[&str]) -> BTreeMap<String, String> {
    names
        .iter()
        .map(|n| (n.to_string(), format!("{{{{ {n} }}}}")))
        .collect()
}

/// Compiles one request's URL, headers and body; each template is rendered once with
/// `placeholders` set, so that a placeholder the request does not have is an error here.
#[allow(clippy::too_many_arguments)]
fn request(
    at: &str,
    url: &str,
    method: HttpMethod,
    headers: &Headers,
    body: &BTreeMap<String, String>,
    timeout: units::Duration,
    placeholders: &[&str],
    errs: &mut Errors,
) -> Option<HttpRequestPlan> {
    let before = errs.len();
    let ctx = sample(placeholders);
    let mut problem = |field: &str, message: String| errs.push((format!("{at}.{field}"), message));
    let check = |field: &str, t: &Template, problem: &mut dyn FnMut(&str, String)| {
        if let Err(e) = t.render(&ctx) {
            problem(
                field,
                format!(
                    "template: {e} (placeholders here: {})",
                    placeholders.join(", ")
                ),
            );
        }
    };
    let url = match webhook::url(url) {
        Ok(t) => {
            check("url", &t, &mut problem);
            Some(t)
        }
        Err(e) => {
            problem("url", e);
            None
        }
    };
    let headers = webhook::headers(headers, &mut problem);
    for h in &headers {
        check(&format!("headers.{}", h.name), &h.value, &mut problem);
    }
    let mut fields = Vec::new();
    for (name, value) in body {
        let field = format!("body.{name}");
        match Template::compile(value) {
            Ok(t) => {
                check(&field, &t, &mut problem);
                fields.push((name.clone(), t));
            }
            Err(e) => problem(&field, format!("template: {e}")),
        }
    }
    if timeout.0.is_zero() {
        problem("timeout", "must be more than 0".into());
    }
    (errs.len() == before).then(|| HttpRequestPlan {
        url: url.expect("no problem"),
        method,
        headers,
        body: fields,
        timeout: timeout.0,
    })
}

fn validate_jwt(j: &JwtConfig, key_file: Option<JwtKeyFile>, errs: &mut Errors) -> Option<JwtPlan> {
    let before = errs.len();
    let at = |field: &str| format!("embedded.auth.jwt.{field}");
    let named: Vec<&str> = [
        ("secret", j.secret.is_some()),
        ("secret_file", j.secret_file.is_some()),
        ("public_key_file", j.public_key_file.is_some()),
        ("jwks_file", j.jwks_file.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    match named.as_slice() {
        [] => errs.push((
            "embedded.auth.jwt".into(),
            "needs a key: secret, secret_file, public_key_file or jwks_file".into(),
        )),
        [_] => {}
        [_, more @ ..] => {
            for field in more {
                errs.push((
                    at(field),
                    "set one of secret, secret_file, public_key_file or jwks_file".into(),
                ))
            }
        }
    }
    if j.secret_base64 && j.secret.is_none() && j.secret_file.is_none() {
        errs.push((
            at("secret_base64"),
            "applies to secret or secret_file".into(),
        ));
    }
    let mut allowed = Vec::new();
    for (i, name) in j.algorithms.iter().enumerate() {
        match name.parse::<Algorithm>() {
            Ok(alg) => allowed.push(alg),
            Err(_) => errs.push((
                format!("embedded.auth.jwt.algorithms[{i}]"),
                format!("unknown algorithm {name:?} (HS256, RS256, ES256, EdDSA, …)"),
            )),
        }
    }
    let keys = match (named.first().copied(), &j.secret) {
        (Some("secret"), Some(secret)) => secret_key(secret.as_bytes(), j.secret_base64)
            .map_err(|e| errs.push((at("secret"), e)))
            .ok()
            .map(|k| vec![(None, k)]),
        (Some(field), _) => key_file.and_then(|bytes| {
            let parsed = match field {
                "secret_file" => {
                    let text = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
                    let text = text.strip_suffix(b"\r").unwrap_or(text);
                    secret_key(text, j.secret_base64).map(|k| vec![(None, k)])
                }
                "public_key_file" => public_key(&bytes).map(|k| vec![(None, k)]),
                _ => key_set(&bytes),
            };
            parsed.map_err(|e| errs.push((at(field), e))).ok()
        }),
        (None, _) => None,
    };
    let mut verify_claims = Vec::new();
    let ctx = sample(CLAIMS);
    for (claim, value) in &j.verify_claims {
        let field = at(&format!("verify_claims.{claim}"));
        match Template::compile(value).and_then(|t| t.render(&ctx).map(|_| t)) {
            Ok(t) => verify_claims.push((claim.clone(), t)),
            Err(e) => errs.push((
                field,
                format!("template: {e} (placeholders here: username, clientid)"),
            )),
        }
    }
    let mut usable = Vec::new();
    for (kid, key) in keys.into_iter().flatten() {
        let algorithms: Vec<Algorithm> = family_algorithms(&key)
            .into_iter()
            .filter(|a| allowed.is_empty() || allowed.contains(a))
            .collect();
        if !algorithms.is_empty() {
            usable.push(JwtKey {
                kid,
                key,
                algorithms,
            });
        }
    }
    if errs.len() == before && usable.is_empty() {
        errs.push((
            at("algorithms"),
            "no key can check any of these algorithms".into(),
        ));
    }
    (errs.len() == before).then(|| JwtPlan {
        keys: usable,
        from: j.from,
        verify_claims,
        acl_claim: (!j.acl_claim.is_empty()).then(|| j.acl_claim.clone()),
    })
}

fn secret_key(secret: &[u8], base64: bool) -> Result<DecodingKey, String> {
    if secret.is_empty() {
        return Err("the secret is empty".into());
    }
    if base64 {
        let text = std::str::from_utf8(secret).map_err(|_| "not base64".to_string())?;
        DecodingKey::from_base64_secret(text.trim()).map_err(|e| format!("not base64: {e}"))
    } else {
        DecodingKey::from_secret(secret).map_err(|e| e.to_string())
    }
}

/// DER object identifiers (contents only) of the public key types.
const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// A PEM `PUBLIC KEY` (SubjectPublicKeyInfo): RSA, EC or Ed25519.
fn public_key(pem: &[u8]) -> Result<DecodingKey, String> {
    use rustls::pki_types::SubjectPublicKeyInfoDer;
    use rustls::pki_types::pem::PemObject as _;
    let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem)
        .map_err(|e| format!("no PEM public key (-----BEGIN PUBLIC KEY-----): {e}"))?;
    let malformed = || "malformed public key".to_string();
    let (0x30, info, _) = crate::der::element(&spki).ok_or_else(malformed)? else {
        return Err(malformed());
    };
    let (0x30, algorithm, rest) = crate::der::element(info).ok_or_else(malformed)? else {
        return Err(malformed());
    };
    let (0x03, bits, _) = crate::der::element(rest).ok_or_else(malformed)? else {
        return Err(malformed());
    };
    // A BIT STRING: the count of unused bits (0 for a key), then the key.
    let key = match bits.split_first() {
        Some((0, key)) => key,
        _ => return Err(malformed()),
    };
    let (0x06, oid, _) = crate::der::element(algorithm).ok_or_else(malformed)? else {
        return Err(malformed());
    };
    match oid {
        RSA_ENCRYPTION => Ok(DecodingKey::from_rsa_der(key)),
        EC_PUBLIC_KEY => Ok(DecodingKey::from_ec_der(key)),
        ED25519 => Ok(DecodingKey::from_ed_der(key)),
        _ => Err("not an RSA, EC or Ed25519 public key".into()),
    }
}

/// A JSON Web Key Set: its keys, each with its `kid`.
fn key_set(json: &[u8]) -> Result<Vec<(Option<String>, DecodingKey)>, String> {
    let set: JwkSet =
        serde_json::from_slice(json).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let supported = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(p) => {
                matches!(p.curve, EllipticCurve::P256 | EllipticCurve::P384)
            }
            AlgorithmParameters::OctetKeyPair(p) => p.curve == EllipticCurve::Ed25519,
            AlgorithmParameters::Other(_) => false,
            _ => true,
        };
        let key = supported
            .then(|| DecodingKey::from_jwk(jwk).ok())
            .flatten()
            .ok_or_else(|| format!("keys[{i}]: not a key mqbridge can use"))?;
        keys.push((jwk.common.key_id.clone(), key));
    }
    if keys.is_empty() {
        return Err("the key set holds no keys".into());
    }
    Ok(keys)
}

/// The algorithms a key can check: those of its family (an EC key's curve decides
/// between ES256 and ES384 when the signature is checked).
fn family_algorithms(key: &DecodingKey) -> Vec<Algorithm> {
    use Algorithm::*;
    match key.family() {
        AlgorithmFamily::Hmac => vec![HS256, HS384, HS512],
        AlgorithmFamily::Rsa => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmFamily::Ec => vec![ES256, ES384],
        AlgorithmFamily::Ed => vec![EdDSA],
    }
}

#[cfg(test)]
mod tests;
