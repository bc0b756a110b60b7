//! HTTP errors: every failure a caller can fix is a 4xx whose JSON body names
//! the parameter or field (`{"error": "...", "parameter": "from"}`); anything
//! else is a 500 whose cause is logged, not sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { parameter: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn bad(parameter: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            parameter: parameter.to_owned(),
            message: message.into(),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::BadRequest { parameter, message } => (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("invalid parameter '{parameter}': {message}"), "parameter": parameter})),
            )
                .into_response(),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, Json(json!({"error": m}))).into_response(),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, Json(json!({"error": m}))).into_response(),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({"error": "missing or invalid bearer token"})),
            )
                .into_response(),
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "request failed");
                metrics::counter!("analytics_http_internal_errors_total").increment(1);
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({"error": "internal error"})),
                )
                    .into_response()
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
