//! The TV-facing HTTP API, unchanged from the seed's Express server on :3000.
//!
//! * `POST /api/sync/sponsor-impressions` `{"impressions":[…]}` answers
//!   `{"success":true,"received":N,"queued":M}` only after the accepted
//!   impressions are committed (fsync'd) in the outbox.
//!   - A partially invalid body: the valid records are stored and the answer is
//!     still **200** (so the TV's buffer does not re-send the good ones forever),
//!     with `"refused":[{"index","field","path","message"}]` naming each problem;
//!     the refused records are kept in the outbox file's `refused` table.
//!   - Nothing valid (or not JSON, no `impressions` array): **400** with the
//!     same `refused`/`error` details naming field and index.
//!   - Body above `max_body_bytes`: **413**. Outbox at its limit: **507**
//!     (nothing of the body stored; the TV keeps it and retries later).
//!     Storage failure: **503**.
//! * `GET /api/sync/sponsor-impressions/stats`: the seed's
//!   `{"count","oldestImpression","newestImpression"}` plus what an operator
//!   needs (unsent vs unconfirmed, oldest unconfirmed age, last receipt,
//!   broker connection, limits). Unauthenticated, like the seed's, so it
//!   says nothing that helps forge a receipt: no outbox id, no next seq
//!   (`neopro-edge status` on the box has them). [`outbox_stats`] builds
//!   the part it shares with `status`.
//! * `/healthz`, `/metrics` from `runtime::http::base_routes`.
//!
//! CORS: only the configured origins (`cors_origins`, by default the box's
//! own pages, `http://localhost:*` and `http://neopro.local:*`) get
//! `Access-Control-Allow-Origin`, so a page of another site opened in the
//! TV's browser cannot post plays or read the stats.

use crate::settings::OriginPattern;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use schema::{BodyShape, FieldError};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::outbox::{FileStats, Outbox, OutboxConfig, OutboxError, RefusedRecord};
use crate::publisher::{clock_synced, BrokerHealth};

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub outbox: Outbox,
    pub health: Arc<BrokerHealth>,
    pub mqtt_url: String,
}

/// The router (without a listener; `App` serves it). `cors_origins` as in
/// [`crate::Settings::cors_origins`] (checked by `Settings::validate`;
/// an entry that does not parse allows nothing).
pub fn router(state: HttpState, max_body_bytes: usize, cors_origins: &[String]) -> Router {
    Router::new()
        .route("/api/sync/sponsor-impressions", post(post_impressions))
        .route("/api/sync/sponsor-impressions/stats", get(stats))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(cors(cors_origins))
        .with_state(state)
        .merge(runtime::http::base_routes())
}

fn cors(origins: &[String]) -> CorsLayer {
    let patterns: Vec<OriginPattern> = origins.iter().filter_map(|o| OriginPattern::parse(o).ok()).collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| {
            origin.to_str().is_ok_and(|o| patterns.iter().any(|p| p.matches(o)))
        }))
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(Duration::from_secs(600))
}

fn ts(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

fn refused_json(errors: &[FieldError]) -> Vec<Value> {
    errors
        .iter()
        .map(|e| json!({"index": e.index, "field": e.field, "path": e.path(), "message": e.message}))
        .collect()
}

fn fail(status: StatusCode, error: impl Into<String>, extra: Value) -> Response {
    let mut body = json!({"success": false, "error": error.into()});
    if let (Value::Object(b), Value::Object(x)) = (&mut body, extra) {
        b.extend(x);
    }
    (status, Json(body)).into_response()
}

async fn post_impressions(State(st): State<HttpState>, body: Result<Bytes, BytesRejection>) -> Response {
    let bytes = match body {
        Ok(b) => b,
        Err(rej) => {
            let status = rej.status();
            metrics::counter!("edge_http_refused_total", "status" => status.as_u16().to_string()).increment(1);
            let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "body too large for one request; send fewer impressions per POST".to_owned()
            } else {
                rej.body_text()
            };
            return fail(status, msg, json!({}));
        }
    };
    let site = st.outbox.site_id().to_owned();
    let parsed = match schema::parse_body(&bytes, BodyShape::Object, Some(&site), Utc::now(), false) {
        Ok(p) => p,
        Err(e) => {
            metrics::counter!("edge_http_refused_total", "status" => "400").increment(1);
            return fail(
                StatusCode::BAD_REQUEST,
                e.to_string(),
                json!({"refused": refused_json(std::slice::from_ref(&e))}),
            );
        }
    };
    let received = parsed.received;
    if parsed.accepted.is_empty() && !parsed.refused.is_empty() {
        metrics::counter!("edge_http_refused_total", "status" => "400").increment(1);
        let first = parsed.refused.first().map(ToString::to_string).unwrap_or_default();
        return fail(
            StatusCode::BAD_REQUEST,
            format!(
                "no valid impression in the body ({} refused); first problem: {first}",
                received
            ),
            json!({"received": received, "refused": refused_json(&parsed.refused)}),
        );
    }
    let refused_idx = parsed.refused_indexes();
    let accepted: Vec<_> = parsed.accepted.into_iter().map(|(_, i)| i).collect();
    let n_accepted = accepted.len();
    match st.outbox.append(accepted).await {
        Ok(o) => {
            metrics::counter!("edge_http_impressions_accepted_total").increment(n_accepted as u64);
            let mut body = json!({
                "success": true,
                "received": received,
                "queued": o.queued,
                "stored": o.inserted,
                "duplicates": o.duplicates,
            });
            if !parsed.refused.is_empty() {
                metrics::counter!("edge_http_impressions_refused_total").increment(refused_idx.len() as u64);
                tracing::warn!(received, refused = refused_idx.len(), first = %parsed.refused[0], "refused part of a POST");
                body["refused"] = Value::Array(refused_json(&parsed.refused));
                keep_refused(&st.outbox, &bytes, &parsed.refused).await;
            }
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e @ OutboxError::Full { .. }) => {
            tracing::warn!(error = %e, "refusing impressions: outbox full");
            metrics::counter!("edge_http_refused_total", "status" => "507").increment(1);
            fail(
                StatusCode::INSUFFICIENT_STORAGE,
                e.to_string(),
                json!({"received": received, "queued": st.outbox.counts().unconfirmed}),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "storing impressions failed");
            metrics::counter!("edge_http_refused_total", "status" => "503").increment(1);
            fail(
                StatusCode::SERVICE_UNAVAILABLE,
                e.to_string(),
                json!({"received": received}),
            )
        }
    }
}

/// Keeps the raw refused records with their reasons (best effort: the TV
/// already got its answer naming them).
async fn keep_refused(outbox: &Outbox, bytes: &[u8], errors: &[FieldError]) {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    let records = v.get("impressions").and_then(Value::as_array);
    let mut by_index: std::collections::BTreeMap<usize, Vec<&FieldError>> = Default::default();
    for e in errors {
        if let Some(i) = e.index {
            by_index.entry(i).or_default().push(e);
        }
    }
    let recs: Vec<RefusedRecord> = by_index
        .into_iter()
        .map(|(i, errs)| RefusedRecord {
            raw: records.and_then(|r| r.get(i)).map(Value::to_string).unwrap_or_default(),
            reason: errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        })
        .collect();
    if let Err(e) = outbox.store_refused(recs).await {
        tracing::warn!(error = %e, "could not keep refused records");
    }
}

/// The outbox part of the stats, shared by the HTTP endpoint and
/// `neopro-edge status`: the seed's three keys first (`count` = impressions
/// not yet confirmed by the centre), then the operator's.
pub fn outbox_stats(fs: &FileStats, cfg: &OutboxConfig) -> serde_json::Map<String, Value> {
    let age = fs
        .oldest_unconfirmed_enqueued_at
        .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0);
    let fill = (fs.unconfirmed as f64 / cfg.max_rows.max(1) as f64).max(fs.bytes as f64 / cfg.max_bytes.max(1) as f64);
    let Value::Object(m) = json!({
        "count": fs.unconfirmed,
        "oldestImpression": ts(fs.oldest_played_at),
        "newestImpression": ts(fs.newest_played_at),
        "unconfirmed": fs.unconfirmed,
        "unsent": fs.unsent,
        "published": fs.published,
        "bytes": fs.bytes,
        "oldestUnconfirmedAgeSeconds": age,
        "oldestUnconfirmedEnqueuedAt": ts(fs.oldest_unconfirmed_enqueued_at),
        "lastReceiptAt": ts(fs.last_receipt_at),
        "limits": {"maxRows": cfg.max_rows, "maxBytes": cfg.max_bytes, "warnRatio": cfg.warn_ratio},
        "fillRatio": fill,
        "nearFull": fill >= cfg.warn_ratio,
        "refusedKept": fs.refused_kept,
        "siteId": fs.site_id,
    }) else {
        unreachable!("a JSON object literal")
    };
    m
}

async fn stats(State(st): State<HttpState>) -> Response {
    let fs = match st.outbox.stats().await {
        Ok(s) => s,
        Err(e) => return fail(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), json!({})),
    };
    let mut body = outbox_stats(&fs, st.outbox.config());
    let broker = st.health.snapshot(st.mqtt_url.clone());
    if let Some(t) = broker.last_receipt_at {
        body.insert("lastReceiptAt".into(), ts(Some(t)));
    }
    body.insert("broker".into(), json!(broker));
    body.insert("clockSynced".into(), json!(clock_synced()));
    body.insert("version".into(), json!(crate::VERSION));
    Json(Value::Object(body)).into_response()
}

#[cfg(test)]
mod tests {
    use crate::settings::OriginPattern;

    #[test]
    fn origin_patterns_match_exactly_or_any_port() {
        let any = OriginPattern::parse("http://neopro.local:*").unwrap();
        assert!(any.matches("http://neopro.local:4200"));
        assert!(any.matches("http://NEOPRO.local"));
        assert!(!any.matches("http://neopro.local.evil.example"));
        assert!(!any.matches("http://neopro.local:42x"));
        assert!(!any.matches("https://neopro.local:4200"));
        let exact = OriginPattern::parse("https://tv.example:8443/").unwrap();
        assert!(exact.matches("https://tv.example:8443"));
        assert!(!exact.matches("https://tv.example"));
        assert!(OriginPattern::parse("*").is_err());
        assert!(OriginPattern::parse("http://*.example").is_err());
        assert!(OriginPattern::parse("neopro.local").is_err());
    }
}
