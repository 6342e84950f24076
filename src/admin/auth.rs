//! The admin token: read once at start from where `admin:` says, kept only as its
//! SHA-256 digest, and checked on every request to a protected route in constant time.
//!
//! A request is let through when its `Authorization: Bearer <token>` header matches, or
//! when no token is configured (possible on a loopback address only: see
//! [`crate::config::AdminPlan`]). Anything else gets 401 with `WWW-Authenticate: Bearer`.
//! Neither the token nor what a client sent is ever logged.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::config::{SecretError, TokenSource};

/// The configured token, as its digest (comparing digests makes the comparison's time
/// independent of the token's length as well as of its bytes).
#[derive(Clone)]
pub struct Token([u8; 32]);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// Why the token could not be read at start; names the field, never the value.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin.{field}: {error}")]
    Read { field: String, error: SecretError },
    #[error("admin.{field}: the token is empty")]
    Empty { field: String },
}

impl Token {
    pub fn new(token: &str) -> Token {
        Token(Sha256::digest(token.as_bytes()).into())
    }

    /// Reads the token from its source (a file's trailing newline is ignored).
    pub fn resolve(source: &TokenSource) -> Result<Token, TokenError> {
        let field = source.field("token");
        let text = source.read().map_err(|error| TokenError::Read {
            field: field.clone(),
            error,
        })?;
        if text.trim().is_empty() {
            return Err(TokenError::Empty { field });
        }
        Ok(Token::new(&text))
    }

    /// Whether `presented` is the token, in time that depends on neither.
    pub fn matches(&self, presented: &str) -> bool {
        let theirs: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0
            .iter()
            .zip(theirs)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

/// Whether a request with these headers may use a protected route.
pub fn allowed(token: Option<&Token>, headers: &HeaderMap) -> bool {
    let Some(token) = token else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .is_some_and(|presented| token.matches(presented))
}

/// Middleware for the protected routes.
pub async fn require(
    State(token): State<Option<Arc<Token>>>,
    request: Request,
    next: Next,
) -> Response {
    if allowed(token.as_deref(), request.headers()) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"mqbridge\"")],
        axum::Json(serde_json::json!({
            "error": "unauthorized: send Authorization: Bearer <admin token>"
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::plan::Secret;
    use axum::http::HeaderValue;

    fn headers(authorization: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(authorization).unwrap(),
        );
        h
    }

    #[test]
    fn only_the_bearer_token_itself_is_let_through() {
        let token = Token::new("s3cret");
        let t = Some(&token);
        assert!(allowed(t, &headers("Bearer s3cret")));
        assert!(allowed(t, &headers("bearer  s3cret ")));
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Bearer ",
            "Basic s3cret",
            "s3cret",
            "",
        ] {
            assert!(!allowed(t, &headers(wrong)), "{wrong:?}");
        }
        assert!(!allowed(t, &HeaderMap::new()));
        // Without a token (loopback only) everything is let through.
        assert!(allowed(None, &HeaderMap::new()));
    }

    #[test]
    fn the_token_is_read_from_its_source_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let token = Token::resolve(&TokenSource::File(file.clone())).unwrap();
        assert!(token.matches("from-file"));
        assert_eq!(format!("{token:?}"), "Token(***)");
        std::fs::write(&file, "\n").unwrap();
        assert_eq!(
            Token::resolve(&TokenSource::File(file))
                .unwrap_err()
                .to_string(),
            "admin.token_file: the token is empty"
        );
        let missing = dir.path().join("missing");
        let err = Token::resolve(&TokenSource::File(missing)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("admin.token_file: cannot read ")
        );
        let err = Token::resolve(&TokenSource::Env("MQBRIDGE_TEST_UNSET_TOKEN".into()));
        assert_eq!(
            err.unwrap_err().to_string(),
            "admin.token_env: environment variable MQBRIDGE_TEST_UNSET_TOKEN is not set"
        );
        let inline = Token::resolve(&TokenSource::Inline(Secret("inline".into()))).unwrap();
        assert!(inline.matches("inline") && !inline.matches("Inline"));
    }
}
