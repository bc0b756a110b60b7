//! The dashboard page and its static files, embedded in the binary (no CDN,
//! no npm at build time: `assets/chart.umd.min.js` is the committed build of
//! the chart.js version pinned in `web/package-lock.json`).
//!
//! The page is served without authentication: it holds no data. Its script
//! calls the API with a bearer token kept in the browser's localStorage.

use axum::extract::Path;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

pub const PAGE: &str = include_str!("../assets/dashboard.html");
pub const DASHBOARD_JS: &str = include_str!("../assets/dashboard.js");
pub const CHART_JS: &[u8] = include_bytes!("../assets/chart.umd.min.js");

pub async fn page(Path(_sponsor): Path<String>) -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(PAGE),
    )
        .into_response()
}

pub async fn dashboard_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD_JS,
    )
        .into_response()
}

pub async fn chart_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        CHART_JS,
    )
        .into_response()
}
