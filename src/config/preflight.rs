//! What running a config needs from this machine, checked without side effects: the
//! files it names (`broker:`'s and each `mqtt` sink's password and CA files among them)
//! exist and can be read (nothing is created; `embedded.tls.client_ca_file` is read, and
//! must hold usable CA certificates), and the environment
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
    let mut errs = Vec::new();
    if let Some(t) = raw.embedded.as_ref().and_then(|e| e.tls.as_ref()) {
        files.push(("embedded.tls.cert_file", &t.cert_file));
        files.push(("embedded.tls.key_file", &t.key_file));
        if let Some(Err(e)) = t.client_ca_file.as_deref().map(client_cas) {
            errs.push(("embedded.tls.client_ca_file".to_string(), e));
        }
    }
    if let Some(a) = &raw.admin {
        files.extend(a.token_file.as_deref().map(|p| ("admin.token_file", p)));
    }
    errs.extend(
        files
            .into_iter()
            .filter_map(|(field, path)| readable(path).err().map(|e| (field.to_string(), e))),
    );
    for (name, sink) in &raw.sinks {
        for (field, path) in sink.files() {
            if let Err(e) = readable(path) {
                errs.push((format!("sinks.{name}.{field}"), e));
            }
        }
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

/// The CA certificates of `embedded.tls.client_ca_file` (PEM, one or more), as the
/// listener trusts them for client certificates; the error says what is wrong with the
/// file, naming it.
pub fn client_cas(path: &Path) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;

    readable(path)?;
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| format!("{}: not PEM: {e}", path.display()))?;
        roots.add(cert).map_err(|e| {
            format!(
                "{}: certificate {} is not usable as a CA: {e}",
                path.display(),
                i + 1
            )
        })?;
    }
    if roots.is_empty() {
        return Err(format!(
            "no certificate (-----BEGIN CERTIFICATE-----) in {}",
            path.display()
        ));
    }
    Ok(roots)
}
