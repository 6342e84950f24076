//! JWT authentication (`embedded.auth.jwt`), as EMQX's: the client puts a JSON Web Token
//! in its password (or username); it logs in when the token's signature checks with the
//! configured key, it has not expired (`exp`) and is already valid (`nbf`), with no
//! leeway, and each of `verify_claims` holds. Its `acl` claim, if any, is the client's
//! ACL ([`ClientAcl`]).
//!
//! A password that is not shaped like a token (three dot-separated parts) is not this
//! authenticator's to judge: the next one (the HTTP service, then `users`) is asked, so
//! token and password clients can share a broker (EMQX 6.2's `is_jwt(password)`
//! precondition). A token that fails any check refuses the login.

mod provider;

use jsonwebtoken::{Validation, decode, decode_header};
use serde_json::{Map, Value};

use super::Identity;
use super::client_acl::ClientAcl;
use crate::config::auth::{JwtKey, JwtPlan, TokenFrom};

pub use provider::install as install_provider;

/// The JWT authenticator of one config.
#[derive(Debug)]
pub struct Jwt {
    plan: JwtPlan,
}

/// What a CONNECT's token says.
#[derive(Debug)]
pub enum Token {
    /// No token where `from` says (no field, or not shaped like one): not ours to judge.
    Absent,
    /// Valid: the client logs in, with the ACL its claim gives, if any.
    Valid(Option<ClientAcl>),
    /// Refused, and why (for the log; never the token).
    Invalid(String),
}

impl Jwt {
    pub fn new(plan: JwtPlan) -> Jwt {
        provider::install();
        Jwt { plan }
    }

    /// Checks the token of a CONNECT from `who` (its username and client id as sent)
    /// with `password`.
    pub fn check(&self, who: Identity, password: Option<&str>) -> Token {
        let token = match self.plan.from {
            TokenFrom::Password => password,
            TokenFrom::Username => who.username,
        };
        let Some(token) = token.filter(|t| t.split('.').count() == 3) else {
            return Token::Absent;
        };
        let claims = match self.verify(token) {
            Ok(claims) => claims,
            Err(why) => return Token::Invalid(why),
        };
        let ctx = serde_json::json!({
            "username": who.username.unwrap_or(""),
            "clientid": who.client_id,
        });
        for (claim, want) in &self.plan.verify_claims {
            let Ok(want) = want.render(&ctx) else {
                return Token::Invalid(format!("claim {claim}: cannot render its value"));
            };
            let equal = match claims.get(claim) {
                Some(Value::String(s)) => *s == want,
                Some(Value::Number(n)) => n.to_string() == want,
                Some(Value::Bool(b)) => want == if *b { "true" } else { "false" },
                _ => false,
            };
            if !equal {
                return Token::Invalid(format!("claim {claim} does not match"));
            }
        }
        let acl = self
            .plan
            .acl_claim
            .as_ref()
            .and_then(|name| claims.get(name));
        match acl.map(|v| ClientAcl::parse(v, who)).transpose() {
            Ok(acl) => Token::Valid(acl),
            Err(e) => Token::Invalid(format!(
                "claim {}: {e}",
                self.plan.acl_claim.as_deref().unwrap_or("")
            )),
        }
    }

    /// The token's claims, once its signature, `exp` and `nbf` check with one of the keys
    /// (the one its `kid` names, else each whose algorithms include the token's).
    fn verify(&self, token: &str) -> Result<Map<String, Value>, String> {
        let header = decode_header(token).map_err(|e| format!("not a token: {e}"))?;
        let candidates: Vec<&JwtKey> = match &header.kid {
            Some(kid) if self.plan.keys.iter().any(|k| k.kid.is_some()) => self
                .plan
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            _ => self
                .plan
                .keys
                .iter()
                .filter(|k| k.algorithms.contains(&header.alg))
                .collect(),
        };
        let mut why = format!("no key for algorithm {:?}", header.alg);
        for key in candidates {
            let mut v = Validation::new(header.alg);
            v.algorithms = key.algorithms.clone();
            v.required_spec_claims.clear();
            v.leeway = 0;
            v.validate_exp = true;
            v.validate_nbf = true;
            v.validate_aud = false;
            match decode::<Map<String, Value>>(token, &key.key, &v) {
                Ok(data) => return Ok(data.claims),
                Err(e) => why = e.to_string(),
            }
        }
        Err(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::auth::client_acl::Action;
    use crate::config::auth::JwtKey;
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, encode};
    use ring::rand::SystemRandom;
    use ring::signature::{self as sig, KeyPair as _};
    use serde_json::json;

    const WHO: Identity = Identity {
        username: Some("dev1"),
        client_id: "c1",
    };

    fn jwt(keys: Vec<JwtKey>) -> Jwt {
        Jwt::new(JwtPlan {
            keys,
            from: TokenFrom::Password,
            verify_claims: vec![(
                "sub".into(),
                crate::rule::template::Template::compile("{{ username }}").unwrap(),
            )],
            acl_claim: Some("acl".into()),
        })
    }

    fn hmac(secret: &[u8]) -> JwtKey {
        JwtKey {
            kid: None,
            key: DecodingKey::from_secret(secret).unwrap(),
            algorithms: vec![Algorithm::HS256],
        }
    }

    fn token(alg: Algorithm, key: &EncodingKey, claims: serde_json::Value) -> String {
        install_provider();
        encode(&Header::new(alg), &claims, key).unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn a_token_logs_in_while_it_is_valid_and_its_claims_match() {
        let j = jwt(vec![hmac(b"right")]);
        let key = EncodingKey::from_secret(b"right").unwrap();
        let valid = token(
            Algorithm::HS256,
            &key,
            json!({"sub": "dev1", "exp": now() + 60}),
        );
        assert!(matches!(j.check(WHO, Some(&valid)), Token::Valid(None)));
        let expired = token(
            Algorithm::HS256,
            &key,
            json!({"sub": "dev1", "exp": now() - 1}),
        );
        assert!(matches!(j.check(WHO, Some(&expired)), Token::Invalid(_)));
        let early = token(
            Algorithm::HS256,
            &key,
            json!({"sub": "dev1", "nbf": now() + 60}),
        );
        assert!(matches!(j.check(WHO, Some(&early)), Token::Invalid(_)));
        let typed = token(
            Algorithm::HS256,
            &key,
            json!({"sub": "dev1", "exp": "never"}),
        );
        assert!(
            matches!(j.check(WHO, Some(&typed)), Token::Invalid(_)),
            "an exp that is not a number is not an absent exp"
        );
        let other = token(Algorithm::HS256, &key, json!({"sub": "dev2"}));
        assert!(matches!(j.check(WHO, Some(&other)), Token::Invalid(_)));
        let forged = token(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"wrong").unwrap(),
            json!({"sub": "dev1"}),
        );
        assert!(matches!(j.check(WHO, Some(&forged)), Token::Invalid(_)));
        let hs512 = token(Algorithm::HS512, &key, json!({"sub": "dev1"}));
        assert!(
            matches!(j.check(WHO, Some(&hs512)), Token::Invalid(_)),
            "not among the algorithms"
        );
        assert!(matches!(
            j.check(WHO, Some("plain password")),
            Token::Absent
        ));
        assert!(matches!(j.check(WHO, None), Token::Absent));
    }

    #[test]
    fn ecdsa_and_ed25519_signatures_check_with_ring() {
        let rng = SystemRandom::new();
        let p256 = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
        let ec = sig::EcdsaKeyPair::generate_pkcs8(p256, &rng).unwrap();
        let ec_public = sig::EcdsaKeyPair::from_pkcs8(p256, ec.as_ref(), &rng)
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec();
        let ed = sig::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed_public = sig::Ed25519KeyPair::from_pkcs8(ed.as_ref())
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec();
        let j = jwt(vec![
            JwtKey {
                kid: None,
                key: DecodingKey::from_ec_der(&ec_public),
                algorithms: vec![Algorithm::ES256, Algorithm::ES384],
            },
            JwtKey {
                kid: None,
                key: DecodingKey::from_ed_der(&ed_public),
                algorithms: vec![Algorithm::EdDSA],
            },
        ]);
        let claims = json!({"sub": "dev1", "acl": {"pub": ["up/${clientid}"]}});
        let es = token(
            Algorithm::ES256,
            &EncodingKey::from_ec_der(ec.as_ref()),
            claims.clone(),
        );
        let Token::Valid(Some(acl)) = j.check(WHO, Some(&es)) else {
            panic!("ES256 token refused");
        };
        let publish = Action::Publish {
            qos: 0,
            retain: false,
        };
        assert_eq!(acl.decide("up/c1", publish), Some(true));
        assert_eq!(acl.decide("up/c2", publish), Some(false));
        let eddsa = token(
            Algorithm::EdDSA,
            &EncodingKey::from_ed_der(ed.as_ref()),
            claims,
        );
        assert!(matches!(j.check(WHO, Some(&eddsa)), Token::Valid(Some(_))));
        // An ES256 token signed by another key.
        let other = sig::EcdsaKeyPair::generate_pkcs8(p256, &rng).unwrap();
        let forged = token(
            Algorithm::ES256,
            &EncodingKey::from_ec_der(other.as_ref()),
            json!({"sub": "dev1"}),
        );
        assert!(matches!(j.check(WHO, Some(&forged)), Token::Invalid(_)));
    }
}
