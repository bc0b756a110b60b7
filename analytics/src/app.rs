//! The service: an axum router over a PostgreSQL pool.
//!
//! `App::build(settings)` connects, migrates (optional), binds the listener
//! (port 0 allowed; read `App::addr`) and `App::run(shutdown)` serves until
//! the token is cancelled, finishing in-flight requests.
//!
//! Routes (all `/api/*` need `Authorization: Bearer <token>`):
//! * `GET|POST /api/sponsors`, `GET|PUT|DELETE /api/sponsors/:id`
//! * `GET|POST /api/sponsors/:id/videos`, `DELETE /api/sponsors/:id/videos/:rule_id`
//! * `POST /api/catalogue/import` (body CSV or TOML, by Content-Type)
//! * `GET /api/analytics/sponsors/:id/stats[.csv]`, `.../report.pdf`, `.../playouts.csv`
//! * open: `/healthz`, `/metrics`, `/sponsors/:id/analytics` (dashboard), `/assets/*`

use crate::auth::{require_token, Tokens};
use crate::catalogue::{self, CatalogueFormat, NewRule, Sponsor};
use crate::error::{ApiError, ApiResult};
use crate::settings::Settings;
use crate::stats::{self, StatsQuery};
use crate::{dashboard, export, pdf};
use anyhow::Context;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use sqlx::PgPool;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
}

pub struct App {
    listener: TcpListener,
    router: Router,
    pool: PgPool,
    addr: SocketAddr,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        runtime::tls::install_crypto_provider();
        if settings.api_tokens.is_empty() {
            anyhow::bail!(
                "no API token configured: set NEOPRO_API_TOKENS (comma-separated), --api-tokens, or api_tokens in the config file"
            );
        }
        let pool = runtime::db::connect(&settings.database_url, settings.db_max_connections).await?;
        if settings.migrate {
            runtime::db::migrate(&pool).await?;
        }
        Self::build_with_pool(settings, pool).await
    }

    /// Like [`App::build`] on an existing pool (tests, bench).
    pub async fn build_with_pool(settings: Settings, pool: PgPool) -> anyhow::Result<Self> {
        if settings.api_tokens.is_empty() {
            anyhow::bail!("no API token configured");
        }
        let router = router(AppState { pool: pool.clone() }, &settings);
        let listener = runtime::http::bind(settings.http_addr).await?;
        let addr = listener.local_addr().context("reading bound address")?;
        tracing::info!(%addr, "neopro-analytics listening");
        Ok(App {
            listener,
            router,
            pool,
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        runtime::http::serve(self.listener, self.router, shutdown).await?;
        self.pool.close().await;
        Ok(())
    }
}

pub fn router(state: AppState, settings: &Settings) -> Router {
    let tokens = Tokens::new(&settings.api_tokens);
    let timeout = Duration::from_secs(settings.request_timeout_secs.max(1));
    let bounded = Router::new()
        .route("/api/sponsors", get(list_sponsors).post(create_sponsor))
        .route(
            "/api/sponsors/{id}",
            get(get_sponsor).put(rename_sponsor).delete(delete_sponsor),
        )
        .route("/api/sponsors/{id}/videos", get(list_rules).post(add_rule))
        .route("/api/sponsors/{id}/videos/{rule_id}", delete(delete_rule))
        .route("/api/catalogue/import", axum::routing::post(import_catalogue))
        .route("/api/analytics/sponsors/{id}/stats", get(stats_json))
        .route("/api/analytics/sponsors/{id}/stats.csv", get(stats_csv))
        .route("/api/analytics/sponsors/{id}/report.pdf", get(report_pdf))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            timeout,
        ));
    let api = bounded
        .route("/api/analytics/sponsors/{id}/playouts.csv", get(playouts_csv))
        .layer(middleware::from_fn_with_state(tokens, require_token))
        .layer(DefaultBodyLimit::max(8 * 1024 * 1024));
    Router::new()
        .merge(api)
        .route("/sponsors/{id}/analytics", get(dashboard::page))
        .route("/assets/dashboard.js", get(dashboard::dashboard_js))
        .route("/assets/chart.umd.min.js", get(dashboard::chart_js))
        .with_state(state)
        .merge(runtime::http::base_routes())
        .layer(middleware::from_fn(track))
}

/// Request metrics: count and latency per route.
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("analytics_http_requests_total", "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!("analytics_http_request_seconds", "route" => route).record(started.elapsed().as_secs_f64());
    resp
}

fn today() -> chrono::NaiveDate {
    chrono::Utc::now().date_naive()
}

async fn list_sponsors(State(s): State<AppState>) -> ApiResult<Json<Vec<Sponsor>>> {
    Ok(Json(catalogue::list_sponsors(&s.pool).await?))
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        // serde names the field in "missing field `name`" / "unknown field `x`".
        let field = msg.split('`').nth(1).unwrap_or("body").to_owned();
        ApiError::bad(&field, msg)
    })
}

async fn create_sponsor(State(s): State<AppState>, body: bytes::Bytes) -> ApiResult<Response> {
    let sp: Sponsor = json_body(&body)?;
    catalogue::create_sponsor(&s.pool, &sp).await?;
    Ok((StatusCode::CREATED, Json(sp)).into_response())
}

async fn get_sponsor(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    let sp = catalogue::get_sponsor(&s.pool, &id).await?;
    let rules = catalogue::list_rules(&s.pool, &id).await?;
    Ok(Json(serde_json::json!({"id": sp.id, "name": sp.name, "videos": rules})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rename {
    name: String,
}

async fn rename_sponsor(
    State(s): State<AppState>,
    Path(id): Path<String>,
    body: bytes::Bytes,
) -> ApiResult<Json<Sponsor>> {
    let r: Rename = json_body(&body)?;
    let sp = Sponsor { id, name: r.name };
    catalogue::rename_sponsor(&s.pool, &sp).await?;
    Ok(Json(sp))
}

async fn delete_sponsor(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    catalogue::delete_sponsor(&s.pool, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_rules(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Vec<catalogue::VideoRule>>> {
    Ok(Json(catalogue::list_rules(&s.pool, &id).await?))
}

async fn add_rule(State(s): State<AppState>, Path(id): Path<String>, body: bytes::Bytes) -> ApiResult<Response> {
    let rule: NewRule = json_body(&body)?;
    let r = catalogue::add_rule(&s.pool, &id, &rule).await?;
    Ok((StatusCode::CREATED, Json(r)).into_response())
}

async fn delete_rule(State(s): State<AppState>, Path((id, rule_id)): Path<(String, String)>) -> ApiResult<StatusCode> {
    let rule_id: i64 = rule_id
        .parse()
        .map_err(|_| ApiError::bad("rule_id", "must be an integer"))?;
    catalogue::delete_rule(&s.pool, &id, rule_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn import_catalogue(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> ApiResult<Json<catalogue::ImportReport>> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let format = if ct.contains("csv") {
        CatalogueFormat::Csv
    } else if ct.contains("toml") {
        CatalogueFormat::Toml
    } else {
        return Err(ApiError::bad("content-type", "use text/csv or application/toml"));
    };
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::bad("catalogue", "not UTF-8"))?;
    let cat = catalogue::parse_catalogue(text, format)?;
    Ok(Json(catalogue::import(&s.pool, &cat).await?))
}

async fn load_stats(s: &AppState, id: &str, params: &HashMap<String, String>) -> ApiResult<stats::Stats> {
    let q = StatsQuery::parse(params, today())?;
    stats::compute(&s.pool, id, &q).await
}

async fn stats_json(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<stats::Stats>> {
    Ok(Json(load_stats(&s, &id, &params).await?))
}

fn attachment(id: &str, q: &stats::Stats, suffix: &str) -> String {
    format!("attachment; filename=\"{}_{}_{}_{}\"", id, q.from, q.to, suffix)
}

async fn stats_csv(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let st = load_stats(&s, &id, &params).await?;
    let body = export::stats_csv(&st)?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CONTENT_DISPOSITION, attachment(&id, &st, "stats.csv")),
        ],
        body,
    )
        .into_response())
}

async fn report_pdf(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let st = load_stats(&s, &id, &params).await?;
    let bytes = tokio::task::spawn_blocking(move || pdf::render(&st, chrono::Utc::now()).map(|b| (b, st)))
        .await
        .map_err(|e| ApiError::Internal(e.into()))??;
    let (body, st) = bytes;
    Ok((
        [
            (header::CONTENT_TYPE, "application/pdf".to_owned()),
            (header::CONTENT_DISPOSITION, attachment(&id, &st, "report.pdf")),
        ],
        body,
    )
        .into_response())
}

async fn playouts_csv(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let q = StatsQuery::parse(&params, today())?;
    catalogue::get_sponsor(&s.pool, &id).await?;
    let att = stats::attributed_videos(&s.pool, &id).await?;
    let names: Vec<(String, String)> = sqlx::query_as("SELECT site_id, name FROM sites WHERE name IS NOT NULL")
        .fetch_all(&s.pool)
        .await?;
    let disposition = format!("attachment; filename=\"{}_{}_{}_playouts.csv\"", id, q.from, q.to);
    let stream = export::playouts_stream(s.pool.clone(), id, att, q, names.into_iter().collect());
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
