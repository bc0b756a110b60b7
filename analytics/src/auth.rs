//! Bearer-token access control for `/api/*` and the exports (sponsor data is
//! confidential). Tokens come from configuration; comparison does not stop at
//! the first differing byte, so response timing does not leak a prefix.

use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

#[derive(Clone)]
pub struct Tokens(Arc<Vec<Vec<u8>>>);

impl Tokens {
    pub fn new(tokens: &[String]) -> Self {
        Tokens(Arc::new(tokens.iter().map(|t| t.as_bytes().to_vec()).collect()))
    }

    pub fn accepts(&self, presented: &[u8]) -> bool {
        let mut ok = false;
        for t in self.0.iter() {
            ok |= constant_time_eq(t, presented);
        }
        ok
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware: `Authorization: Bearer <token>` must match a configured token.
pub async fn require_token(State(tokens): State<Tokens>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|t| t.trim().as_bytes().to_vec());
    match presented {
        Some(t) if tokens.accepts(&t) => next.run(req).await,
        _ => {
            metrics::counter!("analytics_http_unauthorized_total").increment(1);
            ApiError::Unauthorized.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured() {
        let t = Tokens::new(&["abc".into(), "secret-2".into()]);
        assert!(t.accepts(b"abc"));
        assert!(t.accepts(b"secret-2"));
        assert!(!t.accepts(b"ab"));
        assert!(!t.accepts(b"abd"));
        assert!(!t.accepts(b""));
    }
}
