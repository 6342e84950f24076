//! How `embedded.auth` (a token, an HTTP service) and the local users and ACL compose:
//! each source in turn allows, denies, or leaves the request to the next, in a fixed
//! order.
//!
//! **Login** (CONNECT): the JWT authenticator (a password shaped like a token: valid
//! logs in, invalid refuses; no token: next), the HTTP authentication endpoint (`allow`,
//! `deny`, `ignore`: next; no answer: refused), then `users` and `password_file` (with
//! `allow_anonymous`), which refuse whom they do not know. A client certificate's name
//! (`tls.username_from`) logs in before all of these, as before.
//!
//! **Publish and subscribe**: a superuser (an HTTP authentication answer's
//! `is_superuser`) may do anything; then the ACL the login gave ([`ClientAcl`]: a token's
//! `acl` claim or the HTTP answer's `acl`), the HTTP authorization endpoint (`ignore`:
//! next; no answer: denied), then the local ACL (`acl` or `acl_file`), as without
//! `embedded.auth`. So with an HTTP authorizer that ignores what it does not know, the
//! local ACL still decides the rest: an empty `acl` allows it, as it always does.
//!
//! A SUBSCRIBE is decided once, when it is made. One that a source before the local ACL
//! allows is granted whole ([`Subscribed::Whole`]): it carries every message its filter
//! matches, as in EMQX, which checks a subscription only when it is made. One left to the
//! local ACL carries what that ACL lets it receive, per message, as before. Each PUBLISH
//! asks the HTTP authorizer through the connection's cache ([`Grants`]), so a client
//! publishing on a few topics costs a request per topic per `cache_ttl`.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::json;

use super::client_acl::{Action, ClientAcl};
use super::http::{self, Verdict};
use super::jwt::Token;
use super::{Auth, Identity, Login};

/// What a connection keeps of its login for authorization, when `embedded.auth` is
/// configured: whether it is a superuser, the ACL its login gave, where it connects
/// from (`peerhost`), and its cached HTTP answers.
#[derive(Debug)]
pub struct Grants {
    superuser: bool,
    acl: Option<ClientAcl>,
    peerhost: String,
    cache: http::Cache,
}

impl Grants {
    pub fn new(peer: IpAddr) -> Grants {
        Grants {
            superuser: false,
            acl: None,
            peerhost: peer.to_string(),
            cache: http::Cache::default(),
        }
    }
}

/// How a SUBSCRIBE is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    Refused,
    /// Allowed by a source before the local ACL: carries every message it matches.
    Whole,
    /// Allowed by the local ACL, which decides what it carries.
    Local,
}

impl Auth {
    /// Whether `embedded.auth` is configured: connections then keep [`Grants`], and
    /// subscriptions it granted whole stay so when the ACL is decided again.
    pub fn external(&self) -> bool {
        self.http.is_some() || self.jwt.is_some()
    }

    /// Logs a CONNECT in (see the module docs for the order); with `embedded.auth`, also
    /// what the connection keeps for authorization. `who` is the CONNECT's username and
    /// client id; `peer` where it comes from.
    pub async fn authenticate(
        self: &Arc<Self>,
        who: Identity<'_>,
        password: Option<&str>,
        peer: IpAddr,
    ) -> Result<(Login, Option<Box<Grants>>), tokio::task::JoinError> {
        let mut grants = self.external().then(|| Box::new(Grants::new(peer)));
        if let Some(jwt) = &self.jwt {
            match jwt.check(who, password) {
                Token::Absent => {}
                Token::Valid(acl) => {
                    if let Some(g) = &mut grants {
                        g.acl = acl;
                    }
                    return Ok((Login::Ok, grants));
                }
                Token::Invalid(why) => {
                    tracing::info!(client_id = who.client_id, username = ?who.username, %why, "embedded broker: token refused");
                    return Ok((Login::BadCredentials, grants));
                }
            }
        }
        if let Some(http) = self.http.as_ref().filter(|h| h.authenticates()) {
            let ctx = json!({
                "username": who.username.unwrap_or(""),
                "password": password.unwrap_or(""),
                "clientid": who.client_id,
                "peerhost": peer.to_string(),
            });
            // Boxed: a request's state is large, and only logins pay for it.
            let answer = Box::pin(http.authenticate(&ctx)).await;
            drop(ctx);
            if let Some(answer) = answer {
                match answer.verdict {
                    Verdict::Allow => {
                        let acl = answer.acl.map(|v| ClientAcl::parse(&v, who)).transpose();
                        let acl = match acl {
                            Ok(acl) => acl,
                            Err(why) => {
                                tracing::warn!(client_id = who.client_id, %why, "embedded broker: the HTTP authentication answer's acl is invalid; refused");
                                return Ok((Login::BadCredentials, grants));
                            }
                        };
                        if let Some(g) = &mut grants {
                            g.superuser = answer.superuser;
                            g.acl = acl;
                        }
                        return Ok((Login::Ok, grants));
                    }
                    Verdict::Deny => return Ok((Login::BadCredentials, grants)),
                    Verdict::Ignore => {}
                }
            }
        }
        if !self.login_hashes(who.username) {
            return Ok((self.login(who.username, password), grants));
        }
        // argon2 and PBKDF2 are slow by design: off the async threads. (Only then: a
        // blocking thread per CONNECT would start tens of threads, and their memory, for
        // a burst of anonymous clients.)
        let this = Arc::clone(self);
        let (user, pass) = (who.username.map(str::to_owned), password.map(str::to_owned));
        let login =
            tokio::task::spawn_blocking(move || this.login(user.as_deref(), pass.as_deref()))
                .await?;
        Ok((login, grants))
    }

    /// May `who` publish on `topic` (see the module docs for the order)? `grants`: what
    /// its connection keeps, with `embedded.auth`.
    pub async fn may_publish(
        &self,
        grants: Option<&mut Grants>,
        who: Identity<'_>,
        topic: &str,
        qos: u8,
        retain: bool,
    ) -> bool {
        // Not even a superuser: `$SYS` is the broker's.
        if crate::broker::sys::is_sys(topic) {
            return false;
        }
        if let Some(g) = grants {
            if g.superuser {
                return true;
            }
            let action = Action::Publish { qos, retain };
            if let Some(allowed) = g.acl.as_ref().and_then(|a| a.decide(topic, action)) {
                return allowed;
            }
            match self.ask(g, who, topic, action).await {
                Some(Verdict::Allow) => return true,
                Some(Verdict::Deny) => return false,
                Some(Verdict::Ignore) | None => {}
            }
        }
        self.can_publish(who, topic)
    }

    /// How a SUBSCRIBE of `who` to `filter` at `qos` is decided (see the module docs).
    pub async fn may_subscribe(
        &self,
        grants: Option<&mut Grants>,
        who: Identity<'_>,
        filter: &str,
        qos: u8,
    ) -> Subscribed {
        if let Some(g) = grants {
            if g.superuser {
                return Subscribed::Whole;
            }
            let action = Action::Subscribe { qos };
            match g.acl.as_ref().and_then(|a| a.decide(filter, action)) {
                Some(true) => return Subscribed::Whole,
                Some(false) => return Subscribed::Refused,
                None => {}
            }
            match self.ask(g, who, filter, action).await {
                Some(Verdict::Allow) => return Subscribed::Whole,
                Some(Verdict::Deny) => return Subscribed::Refused,
                Some(Verdict::Ignore) | None => {}
            }
        }
        if self.can_subscribe(who, filter) {
            Subscribed::Local
        } else {
            Subscribed::Refused
        }
    }

    /// The HTTP authorizer's answer, from the connection's cache or asked now (a failed
    /// request denies, and is not cached). None: no HTTP authorizer.
    async fn ask(
        &self,
        g: &mut Grants,
        who: Identity<'_>,
        topic: &str,
        action: Action,
    ) -> Option<Verdict> {
        let http = self.http.as_ref()?;
        let plan = http.authorization()?;
        let (publish, qos, retain) = match action {
            Action::Publish { qos, retain } => (true, qos, retain),
            Action::Subscribe { qos } => (false, qos, false),
        };
        let key = http::key(publish, topic, qos, retain);
        if let Some(verdict) = g.cache.get(http, plan, &key) {
            return Some(verdict);
        }
        let ctx = json!({
            "username": who.username.unwrap_or(""),
            "clientid": who.client_id,
            "peerhost": g.peerhost,
            "topic": topic,
            "action": if publish { "publish" } else { "subscribe" },
            "qos": qos.to_string(),
            "retain": retain.to_string(),
        });
        // Boxed: only a cache miss pays for a request's state.
        match Box::pin(http.authorize(plan, &ctx)).await {
            Some(verdict) => {
                g.cache.put(plan, key, verdict);
                Some(verdict)
            }
            None => Some(Verdict::Deny),
        }
    }
}
