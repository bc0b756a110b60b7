//! HTTP: `/healthz`, `/readyz`, `/metrics`, and the seed's central endpoint
//! `POST /api/analytics/impressions`, kept so that boxes still running the old
//! sync agent keep working during the migration.
//!
//! The endpoint goes through the same validation (`schema::parse_body`) and
//! the same write function as MQTT ([`crate::store::write`]): idempotent by
//! impression id, rollup in the same transaction, refused records
//! dead-lettered with `source = 'http'`.
//!
//! ## Who may post
//!
//! A site account is trusted for its own site only, so the endpoint is
//! authenticated like the broker, from the same accounts file
//! (`runtime::auth::Authenticator`, `--credentials`): HTTP Basic
//! `site:password` of a `site` account (its broker password), checked with
//! the username as client id, before the body is read.
//! * no or bad credentials: 401 with `WWW-Authenticate: Basic realm="neopro"`;
//!   another role (ingestor, observer): 403;
//! * the records get the authenticated site when they name none; a record
//!   (or the body, or `X-Site-Id`) naming another site refuses the whole
//!   request with a 403 naming the field
//!   (`impressions[3].site_id: 'club-b' is not the authenticated site 'club-a'`)
//!   and nothing of it is stored, not even a dead letter: it is not this
//!   sender's to record.
//!
//! `--legacy-http-unauthenticated` also accepts requests without an
//! `Authorization` header, as the seed's sync agents send them (site from
//! `X-Site-Id`, the body's `site_id` or each record's): an explicit opt-in
//! for the migration, logged at WARN and shown as the gauge
//! `ingestor_legacy_http_unauthenticated`. Credentials that are sent are
//! still checked (a wrong password is a 401, never a fallback). With neither
//! credentials nor the opt-in, every POST is a 401.
//!
//! Responses:
//! * 200 `{"success":true,"received":n,"inserted":i,"duplicates":d,"rejected":[...]}`
//!   (`rejected` lists refused indexes with their field errors; a partly bad
//!   body still commits its good records);
//! * 400 `{"success":false,"error":"impressions: expected an array","field":"impressions"}`
//!   for a body refused whole, 422 when every record was refused;
//! * 401 / 403 as above (`{"success":false,"error":…}`, and `"field"` for a
//!   foreign site);
//! * 413 above `http_body_limit_bytes` (1 MiB); 503 when the database is
//!   unavailable (retry later: nothing was committed).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use chrono::Utc;
use runtime::auth::Authenticator;
use runtime::credentials::Role;
use schema::{BodyShape, ParsedBody};
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::store::{self, DeadLetter, Row, Source, WriteSet};
use crate::Health;

/// Who may post to `POST /api/analytics/impressions`.
#[derive(Clone, Debug, Default)]
pub struct LegacyAuth {
    /// The accounts file in force (`--credentials`).
    pub accounts: Option<Arc<Authenticator>>,
    /// Also accept requests without credentials (`--legacy-http-unauthenticated`).
    pub unauthenticated: bool,
}

impl LegacyAuth {
    /// Logs at start what the endpoint accepts, and sets the gauge
    /// `ingestor_legacy_http_unauthenticated`.
    pub fn announce(&self) {
        metrics::gauge!("ingestor_legacy_http_unauthenticated").set(if self.unauthenticated { 1.0 } else { 0.0 });
        match (&self.accounts, self.unauthenticated) {
            (Some(a), false) => tracing::info!(
                credentials = %a.path().display(),
                accounts = a.len(),
                "POST /api/analytics/impressions requires HTTP Basic site credentials"
            ),
            (Some(a), true) => tracing::warn!(
                credentials = %a.path().display(),
                "--legacy-http-unauthenticated: POST /api/analytics/impressions also accepts records \
                 WITHOUT credentials, for any site (credentials that are sent are checked)"
            ),
            (None, true) => tracing::warn!(
                "--legacy-http-unauthenticated without --credentials: POST /api/analytics/impressions \
                 accepts records WITHOUT credentials, for any site"
            ),
            (None, false) => tracing::warn!(
                "POST /api/analytics/impressions answers 401 to every request: no --credentials file \
                 (NEOPRO_CREDENTIALS) and no --legacy-http-unauthenticated; the MQTT pipeline is unaffected"
            ),
        }
    }
}

/// Who sent a request that passed [`authenticate`].
#[derive(Clone, Debug)]
enum Sender {
    /// A site account: its records are of this site only.
    Site(String),
    /// No credentials, accepted by the opt-in.
    Unauthenticated,
}

#[derive(Clone)]
struct Ctx {
    pool: PgPool,
    health: Arc<Health>,
    mqtt_enabled: bool,
    method: store::InsertMethod,
    auth: LegacyAuth,
}

/// The service's router.
pub fn router(
    pool: PgPool,
    health: Arc<Health>,
    body_limit: usize,
    mqtt_enabled: bool,
    method: store::InsertMethod,
    auth: LegacyAuth,
) -> Router {
    let ctx = Ctx {
        pool,
        health,
        mqtt_enabled,
        method,
        auth,
    };
    Router::new()
        .route("/readyz", get(readyz))
        .route(
            "/api/analytics/impressions",
            post(impressions)
                .layer(DefaultBodyLimit::max(body_limit))
                .layer(middleware::from_fn_with_state(ctx.clone(), authenticate)),
        )
        .with_state(ctx)
        .merge(runtime::http::base_routes())
}

/// `user:password` of an `Authorization: Basic …` header.
fn basic_credentials(h: &HeaderValue) -> Option<(String, String)> {
    let v = h.to_str().ok()?;
    let (scheme, b64) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn unauthorized(reason: &'static str, error: &str) -> Response {
    metrics::counter!("ingestor_http_auth_failures_total", "reason" => reason).increment(1);
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"neopro\"")],
        Json(json!({"success": false, "error": error})),
    )
        .into_response()
}

fn forbidden(reason: &'static str, field: Option<&str>, error: String) -> Response {
    metrics::counter!("ingestor_http_auth_failures_total", "reason" => reason).increment(1);
    let body = match field {
        Some(f) => json!({"success": false, "error": error, "field": f}),
        None => json!({"success": false, "error": error}),
    };
    (StatusCode::FORBIDDEN, Json(body)).into_response()
}

/// Decides who sent the request before its body is read (see the module doc).
async fn authenticate(State(ctx): State<Ctx>, mut req: Request, next: Next) -> Response {
    let presented = req.headers().get(header::AUTHORIZATION).cloned();
    let sender = match (&ctx.auth.accounts, presented) {
        (Some(accounts), Some(h)) => {
            let Some((user, password)) = basic_credentials(&h) else {
                return unauthorized("malformed_authorization", "Authorization: expected Basic site:password");
            };
            match Arc::clone(accounts).check(user.clone(), user.clone(), password).await {
                Ok(Role::Site) => Sender::Site(user),
                Ok(role) => {
                    return forbidden(
                        "not_a_site",
                        None,
                        format!("account '{user}' has the role {}, not site", role.as_str()),
                    )
                }
                Err(f) => {
                    tracing::warn!(username = %user, reason = f.as_str(), "HTTP credentials refused");
                    return unauthorized(f.as_str(), "invalid credentials");
                }
            }
        }
        _ if ctx.auth.unauthenticated => Sender::Unauthenticated,
        (Some(_), None) => return unauthorized("no_credentials", "authentication required: HTTP Basic site:password"),
        (None, _) => {
            return unauthorized(
                "disabled",
                "authentication required, and this ingestor has no accounts file (--credentials)",
            )
        }
    };
    req.extensions_mut().insert(sender);
    next.run(req).await
}

async fn readyz(State(ctx): State<Ctx>) -> Response {
    let db = ctx.health.db.load(Ordering::Relaxed);
    let broker = !ctx.mqtt_enabled || ctx.health.mqtt.load(Ordering::Relaxed);
    let code = if db && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({"ready": db && broker, "database": db, "broker": broker})),
    )
        .into_response()
}

fn bad(code: StatusCode, field: &str, error: String) -> Response {
    (code, Json(json!({"success": false, "error": error, "field": field}))).into_response()
}

/// The first place where `value` (a request body) names a site other than
/// `site`: (field, the site it names).
fn foreign_site(value: &Value, site: &str) -> Option<(String, String)> {
    let obj = value.as_object()?;
    if let Some(Value::String(s)) = obj.get("site_id") {
        if s != site {
            return Some(("site_id".to_owned(), s.clone()));
        }
    }
    let records = obj.get("impressions").and_then(Value::as_array)?;
    records.iter().enumerate().find_map(|(i, r)| match r.get("site_id") {
        Some(Value::String(s)) if s != site => Some((format!("impressions[{i}].site_id"), s.clone())),
        _ => None,
    })
}

fn bad_body(e: &schema::FieldError) -> Response {
    metrics::counter!("ingestor_rejected_total", "reason" => "http_bad_body").increment(1);
    bad(StatusCode::BAD_REQUEST, &e.path(), e.to_string())
}

async fn impressions(
    State(ctx): State<Ctx>,
    Extension(sender): Extension<Sender>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    metrics::counter!("ingestor_http_requests_total").increment(1);
    let header_site = match headers.get("x-site-id").map(|v| v.to_str()) {
        None => None,
        Some(Ok(s)) => Some(s.to_owned()),
        Some(Err(_)) => return bad(StatusCode::BAD_REQUEST, "X-Site-Id", "X-Site-Id: not ASCII".into()),
    };
    let now = Utc::now();
    let (site, parsed) = match sender {
        Sender::Site(site) => {
            if let Some(h) = header_site.as_deref().filter(|h| *h != site) {
                return forbidden(
                    "foreign_site",
                    Some("X-Site-Id"),
                    format!(
                        "X-Site-Id: '{}' is not the authenticated site '{site}'",
                        schema::validate::truncate(h, 64)
                    ),
                );
            }
            let value: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return bad_body(&schema::FieldError::new("", format!("body is not valid JSON: {e}"))),
            };
            if let Some((field, theirs)) = foreign_site(&value, &site) {
                tracing::warn!(%site, %field, "HTTP records of another site refused; nothing stored");
                return forbidden(
                    "foreign_site",
                    Some(&field),
                    format!(
                        "{field}: '{}' is not the authenticated site '{site}'",
                        schema::validate::truncate(&theirs, 64)
                    ),
                );
            }
            match schema::parse_body_value(value, BodyShape::Object, Some(&site), now, true) {
                Ok(p) => (Some(site), p),
                Err(e) => return bad_body(&e),
            }
        }
        Sender::Unauthenticated => {
            if let Some(Err(m)) = header_site.as_deref().map(schema::validate::site_id) {
                return bad(StatusCode::BAD_REQUEST, "X-Site-Id", format!("X-Site-Id: {m}"));
            }
            match schema::parse_body(&body, BodyShape::Object, header_site.as_deref(), now, true) {
                Ok(p) => (header_site, p),
                Err(e) => return bad_body(&e),
            }
        }
    };
    store_parsed(&ctx, &body, site, parsed).await
}

/// Writes what a body's parse accepted (and dead-letters what it refused),
/// and answers.
async fn store_parsed(ctx: &Ctx, body: &[u8], site: Option<String>, parsed: ParsedBody) -> Response {
    let raw: Option<serde_json::Value> = if parsed.refused.is_empty() {
        None
    } else {
        serde_json::from_slice(body).ok()
    };
    let mut set = WriteSet::default();
    for (i, imp) in &parsed.accepted {
        set.sites.push(imp.site_id.clone());
        set.rows.push(Row {
            imp: imp.clone(),
            batch_id: None,
            origin: *i,
        });
    }
    let mut rejected = Vec::new();
    for idx in parsed.refused_indexes() {
        let errors: Vec<&schema::FieldError> = parsed.refused.iter().filter(|e| e.index == Some(idx)).collect();
        let reason = format!(
            "invalid_impression: {}",
            errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
        );
        let rec = raw.as_ref().and_then(|v| v.get("impressions")).and_then(|a| a.get(idx));
        set.dead.push(DeadLetter {
            source: Source::Http,
            topic: None,
            site_id: site.clone(),
            batch_id: None,
            impression_id: rec
                .and_then(|r| r.get("impression_id"))
                .and_then(|v| v.as_str())
                .and_then(|s| uuid::Uuid::parse_str(s).ok()),
            seq: rec.and_then(|r| r.get("seq")).and_then(|v| v.as_i64()),
            reason_code: "invalid_impression".into(),
            reason,
            payload: rec
                .map(|r| serde_json::to_vec(r).unwrap_or_default())
                .unwrap_or_default(),
            origin: idx,
        });
        rejected.push(json!({
            "index": idx,
            "errors": errors.iter().map(|e| json!({"field": e.path(), "message": e.message})).collect::<Vec<_>>(),
        }));
        metrics::counter!("ingestor_rejected_total", "reason" => "invalid_impression").increment(1);
    }
    set.sites.sort_unstable();
    set.sites.dedup();

    // A few quick retries for a blip; beyond that the caller retries later
    // (the legacy sync agent keeps its buffer until it gets a 2xx).
    let mut backoff = runtime::backoff(Duration::from_millis(100), Duration::from_secs(2));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        match store::write(&ctx.pool, &set, ctx.method).await {
            Ok(o) => {
                ctx.health.db.store(true, Ordering::Relaxed);
                break o;
            }
            Err(e) => {
                ctx.health.db.store(false, Ordering::Relaxed);
                let delay = backoff.next().unwrap_or(Duration::from_secs(1));
                if tokio::time::Instant::now() + delay > deadline {
                    tracing::warn!(error = %e, "HTTP insert failed; answering 503");
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [("retry-after", "5")],
                        Json(json!({"success": false, "error": "database unavailable, retry later"})),
                    )
                        .into_response();
                }
                tokio::time::sleep(delay).await;
            }
        }
    };
    for (i, reason) in &out.refused {
        rejected.push(json!({"index": set.rows[*i].origin, "errors": [{"field": format!("impressions[{}]", set.rows[*i].origin), "message": reason}]}));
    }
    let inserted = out.inserted();
    let duplicates = set.rows.len() - inserted - out.refused.len();
    metrics::counter!("ingestor_impressions_inserted_total").increment(inserted as u64);
    metrics::counter!("ingestor_impressions_duplicate_total").increment(duplicates as u64);
    let all_refused = parsed.received > 0 && inserted + duplicates == 0;
    let code = if all_refused {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    let first_error = parsed.refused.first().map(|e| e.to_string());
    (
        code,
        Json(json!({
            "success": !all_refused,
            "received": parsed.received,
            "inserted": inserted,
            "duplicates": duplicates,
            "rejected": rejected,
            "error": first_error,
        })),
    )
        .into_response()
}
