//! What running a config needs from this machine, checked without side effects: the
//! files it names exist and can be read (nothing is created), and the environment
//! variables read at start (a webhook's `hmac.secret_env`, `admin.token_env`) are set and not empty.
//! Anything that needs the network (a broker, a database) is left to `run`.
//!
//! `run` and `check` do these checks ([`super::Checks::ForRun`]); `try` does not, since
//! it only runs the rules, and [`super::parse`] stays pure.

use std::path::Path;

use super::raw::RawConfig;

/// Every problem as (field path, message), like [`super::plan::validate`].
pub fn check(raw: &RawConfig, lookup: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let mut files: Vec<(&str, &Path)> = Vec::new();
    if let Some(b) = &raw.broker {
        files.extend(
            b.password_file
                .as_deref()
                .map(|p| ("broker.password_file", p)),
        );
        files.extend(b.ca_file.as_deref().map(|p| ("broker.ca_file", p)));
    }
    if let Some(t) = raw.embedded.as_ref().and_then(|e| e.tls.as_ref()) {
        files.push(("embedded.tls.cert_file", &t.cert_file));
        files.push(("embedded.tls.key_file", &t.key_file));
    }
    if let Some(a) = &raw.admin {
        files.extend(a.token_file.as_deref().map(|p| ("admin.token_file", p)));
    }
    let mut errs: Vec<(String, String)> = files
        .into_iter()
        .filter_map(|(field, path)| readable(path).err().map(|e| (field.to_string(), e)))
        .collect();
    for (name, sink) in &raw.sinks {
        for (field, var) in sink.env_vars() {
            // An invalid name is already reported by validation.
            if super::env::is_valid_name(var) && lookup(var).is_none_or(|v| v.is_empty()) {
                errs.push((
                    format!("sinks.{name}.{field}"),
                    format!("environment variable {var} is not set or empty"),
                ));
            }
        }
    }
    if let Some(var) = raw.admin.as_ref().and_then(|a| a.token_env.as_deref())
        && super::env::is_valid_name(var)
        && lookup(var).is_none_or(|v| v.trim().is_empty())
    {
        errs.push((
            "admin.token_env".into(),
            format!("environment variable {var} is not set or empty"),
        ));
    }
    errs
}

/// Opens `path` for reading (and reads nothing).
fn readable(path: &Path) -> Result<(), String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match file.metadata() {
        Ok(m) if m.is_dir() => Err(format!("{} is a directory, not a file", path.display())),
        _ => Ok(()),
    }
}
