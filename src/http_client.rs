//! What mqbridge's HTTP clients (the webhook sink, the embedded broker's HTTP
//! authenticator) share: how a URL is shown in messages and logs, and how an error reads.

use std::fmt::Write as _;

use reqwest::Url;

/// `url` without credentials, query or fragment (a query is shown as `?…`): what a
/// message may quote of it.
pub fn redact(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    let mut s = u.to_string();
    if query {
        s.push_str("?…");
    }
    s
}

/// An error and its causes, e.g. `error sending request: client error (Connect): tcp
/// connect error: Connection refused (os error 111)`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            let _ = write!(out, ": {text}");
        }
        source = s.source();
    }
    out
}
