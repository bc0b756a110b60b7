//! HTTP: `/healthz`, `/readyz`, `/metrics`, and the seed's central endpoint
//! `POST /api/analytics/impressions`, kept so that boxes still running the old
//! sync agent keep working during the migration.
//!
//! The endpoint goes through the same validation (`schema::parse_body`) and
//! the same write function as MQTT ([`crate::store::write`]): idempotent by
//! impression id, rollup in the same transaction, refused records
//! dead-lettered with `source = 'http'`.
//!
//! Responses:
//! * 200 `{"success":true,"received":n,"inserted":i,"duplicates":d,"rejected":[...]}`
//!   (`rejected` lists refused indexes with their field errors; a partly bad
//!   body still commits its good records);
//! * 400 `{"success":false,"error":"impressions: expected an array","field":"impressions"}`
//!   for a body refused whole, 422 when every record was refused;
//! * 413 above `http_body_limit_bytes`; 503 when the database is unavailable
//!   (retry later: nothing was committed).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::Utc;
use schema::BodyShape;
use serde_json::json;
use sqlx::PgPool;

use crate::store::{self, DeadLetter, Row, Source, WriteSet};
use crate::Health;

#[derive(Clone)]
struct Ctx {
    pool: PgPool,
    health: Arc<Health>,
    mqtt_enabled: bool,
    method: store::InsertMethod,
}

/// The service's router.
pub fn router(
    pool: PgPool,
    health: Arc<Health>,
    body_limit: usize,
    mqtt_enabled: bool,
    method: store::InsertMethod,
) -> Router {
    let ctx = Ctx {
        pool,
        health,
        mqtt_enabled,
        method,
    };
    Router::new()
        .route("/readyz", get(readyz))
        .route(
            "/api/analytics/impressions",
            post(impressions).layer(DefaultBodyLimit::max(body_limit)),
        )
        .with_state(ctx)
        .merge(runtime::http::base_routes())
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

async fn impressions(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    metrics::counter!("ingestor_http_requests_total").increment(1);
    let header_site = match headers.get("x-site-id").map(|v| v.to_str()) {
        None => None,
        Some(Ok(s)) => {
            if let Err(m) = schema::validate::site_id(s) {
                return bad(StatusCode::BAD_REQUEST, "X-Site-Id", format!("X-Site-Id: {m}"));
            }
            Some(s.to_owned())
        }
        Some(Err(_)) => return bad(StatusCode::BAD_REQUEST, "X-Site-Id", "X-Site-Id: not ASCII".into()),
    };
    let now = Utc::now();
    let parsed = match schema::parse_body(&body, BodyShape::Object, header_site.as_deref(), now, true) {
        Ok(p) => p,
        Err(e) => {
            metrics::counter!("ingestor_rejected_total", "reason" => "http_bad_body").increment(1);
            return bad(StatusCode::BAD_REQUEST, &e.path(), e.to_string());
        }
    };
    let raw: Option<serde_json::Value> = if parsed.refused.is_empty() {
        None
    } else {
        serde_json::from_slice(&body).ok()
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
            site_id: header_site.clone(),
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
