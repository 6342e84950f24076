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

/// Where a secret is read from, written as `NAME:`, `NAME_file:` or `NAME_env:`: the
/// admin token, and the `influxdb` sink's token and password. The file and the variable
/// are read at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `NAME:` (shown as `***`).
    Inline(Secret),
    /// `NAME_file:`.
    File(PathBuf),
    /// `NAME_env:`, the variable's name.
    Env(String),
}

/// Why a secret could not be read from its source; never quotes the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {path}: {error}")]
    File { path: String, error: std::io::Error },
    #[error("environment variable {0} is not set")]
    Unset(String),
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

    /// The field it was written as, for the secret `name` (`token`, `token_file`, ...).
    pub fn field(&self, name: &str) -> String {
        match self {
            TokenSource::Inline(_) => name.to_string(),
            TokenSource::File(_) => format!("{name}_file"),
            TokenSource::Env(_) => format!("{name}_env"),
        }
    }

    /// Reads the secret (a file's trailing newline is ignored).
    pub fn read(&self) -> Result<String, SecretError> {
        match self {
            TokenSource::Inline(secret) => Ok(secret.0.clone()),
            TokenSource::File(path) => std::fs::read_to_string(path)
                .map(|text| text.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|error| SecretError::File {
                    path: path.display().to_string(),
                    error,
                }),
            TokenSource::Env(var) => {
                std::env::var(var).map_err(|_| SecretError::Unset(var.clone()))
            }
        }
    }
}

/// The source of the secret `name`, written as `name`, `{name}_file` or `{name}_env`
/// (any of them None when that key is absent). Problems (an empty inline value, an
/// invalid variable name, more than one source) go to `problem` with the field.
pub(crate) fn secret_source(
    name: &str,
    inline: Option<&str>,
    file: Option<&std::path::Path>,
    env: Option<&str>,
    problem: &mut impl FnMut(String, String),
) -> Option<TokenSource> {
    let mut sources = Vec::new();
    if let Some(t) = inline {
        if t.trim().is_empty() {
            problem(
                name.to_string(),
                format!("must not be empty (without a {name}, remove the key)"),
            );
        }
        sources.push(TokenSource::Inline(Secret(t.to_string())));
    }
    if let Some(p) = file {
        sources.push(TokenSource::File(p.to_path_buf()));
    }
    if let Some(v) = env {
        if !super::env::is_valid_name(v) {
            problem(
                format!("{name}_env"),
                "must be an environment variable name".into(),
            );
        }
        sources.push(TokenSource::Env(v.to_string()));
    }
    for s in sources.iter().skip(1) {
        problem(
            s.field(name),
            format!("set one of {name}, {name}_file or {name}_env"),
        );
    }
    sources.into_iter().next()
}

pub(super) fn validate_admin(a: &AdminConfig, errs: &mut Errors) -> Option<AdminPlan> {
    let before = errs.len();
    let listen = addresses(&OneOrMany::One(a.listen.clone()), "admin.listen", errs).pop();
    let token = secret_source(
        "token",
        a.token.as_deref(),
        a.token_file.as_deref(),
        a.token_env.as_deref(),
        &mut |field, message| errs.push((format!("admin.{field}"), message)),
    );
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
