//! `admin:` validated: the address, and where the token comes from. Any address but a
//! loopback one needs a token, so the admin API is never open to the network by mistake;
//! the token itself (a file or an environment variable) is read by the admin server at
//! start, and is never printed (`Debug` shows `***`, `check` only where it comes from).

use std::path::PathBuf;

use super::plan::{Errors, Secret, addresses};
use super::raw::{AdminConfig, OneOrMany};

/// The admin HTTP server's address and token (`admin:`).
#[derive(Debug, Clone)]
pub struct AdminPlan {
    pub listen: std::net::SocketAddr,
    /// Where the token comes from; None only on a loopback address (validated).
    pub token: Option<TokenSource>,
}

/// Where the admin token is read from; the file and the variable are read at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `token:` (shown as `***`).
    Inline(Secret),
    /// `token_file:`.
    File(PathBuf),
    /// `token_env:`, the variable's name.
    Env(String),
}

impl TokenSource {
    /// Where the token comes from, as `check` prints it (never the token).
    pub fn describe(&self) -> String {
        match self {
            TokenSource::Inline(_) => "token set in the file".into(),
            TokenSource::File(p) => format!("token from {}", p.display()),
            TokenSource::Env(v) => format!("token from ${v}"),
        }
    }
}

pub(super) fn validate_admin(a: &AdminConfig, errs: &mut Errors) -> Option<AdminPlan> {
    let before = errs.len();
    let listen = addresses(&OneOrMany::One(a.listen.clone()), "admin.listen", errs).pop();
    let mut sources = Vec::new();
    if let Some(t) = &a.token {
        if t.trim().is_empty() {
            errs.push((
                "admin.token".into(),
                "must not be empty (without a token, remove the key)".into(),
            ));
        }
        sources.push(("admin.token", TokenSource::Inline(Secret(t.clone()))));
    }
    if let Some(p) = &a.token_file {
        sources.push(("admin.token_file", TokenSource::File(p.clone())));
    }
    if let Some(v) = &a.token_env {
        if !super::env::is_valid_name(v) {
            errs.push((
                "admin.token_env".into(),
                "must be an environment variable name".into(),
            ));
        }
        sources.push(("admin.token_env", TokenSource::Env(v.clone())));
    }
    for (field, _) in sources.iter().skip(1) {
        errs.push((
            field.to_string(),
            "set one of token, token_file or token_env".into(),
        ));
    }
    let token = sources.into_iter().next().map(|(_, s)| s);
    if let Some(addr) = listen
        && token.is_none()
        && !addr.ip().is_loopback()
    {
        errs.push((
            "admin.listen".into(),
            format!(
                "{addr} is reachable from other machines: set a token (admin.token, token_file or token_env), or listen on 127.0.0.1"
            ),
        ));
    }
    (errs.len() == before).then(|| AdminPlan {
        listen: listen.expect("validated"),
        token,
    })
}
