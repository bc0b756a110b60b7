//! `POST /api/analytics/impressions` (the seed's central endpoint) against
//! the real App and a fresh database; MQTT is off in these tests.

#[macro_use]
mod common;

use common::*;
use serde_json::{json, Value};
use sqlx::PgPool;

const ROWS: &str = "SELECT count(*) FROM sponsor_impressions";

/// The seed's example body (its README's curl test).
const SEED_BODY: &str = r#"{"impressions":[{"video_filename":"test.mp4","played_at":"2025-12-14T21:00:00Z","duration_played":10,"video_duration":30,"completed":false,"event_type":"other","period":"loop","trigger_type":"manual"}]}"#;

async fn http_app(pool: &PgPool) -> Running {
    let mut s = settings(pool, MOSQUITTO, &unique_topics(), &unique_client_id()).await;
    s.mqtt_enabled = false;
    s.http_body_limit_bytes = 64 * 1024;
    let app = ingestor::App::build(s).await.unwrap();
    let http = app.http_addr();
    let health = app.health();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(app.run(shutdown.clone()));
    let running = Running {
        shutdown,
        task,
        http,
        health,
    };
    let client = reqwest::Client::new();
    let url = format!("http://{http}/readyz");
    wait_until(|| {
        let c = client.clone();
        let u = url.clone();
        async move { c.get(&u).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    running
}

async fn post(app: &Running, site: Option<&str>, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://{}/api/analytics/impressions", app.http))
        .header("content-type", "application/json")
        .body(body);
    if let Some(s) = site {
        req = req.header("X-Site-Id", s);
    }
    let resp = req.send().await.unwrap();
    let code = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn seed_body_is_accepted_once_and_replays_are_duplicates(pool: PgPool) {
    let app = http_app(&pool).await;
    let (code, body) = post(&app, Some("club-42"), SEED_BODY).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (body["inserted"].as_u64(), body["duplicates"].as_u64()),
        (Some(1), Some(0))
    );
    // The legacy sync agent retries the same buffer: absorbed.
    let (code, body) = post(&app, Some("club-42"), SEED_BODY).await;
    assert_eq!(code, 200);
    assert_eq!(
        (body["inserted"].as_u64(), body["duplicates"].as_u64()),
        (Some(0), Some(1))
    );
    // Site from the body instead of the header.
    let with_site = SEED_BODY.replacen('{', r#"{"site_id":"club-7","#, 1);
    let (code, body) = post(&app, None, with_site).await;
    assert_eq!((code, body["inserted"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(count(&pool, ROWS).await, 2);
    assert_rollup_matches(&pool).await;
    let (site, period): (String, String) =
        sqlx::query_as("SELECT site_id, period FROM sponsor_impressions WHERE site_id = 'club-42'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((site.as_str(), period.as_str()), ("club-42", "loop"));
    app.stop().await;
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn bad_bodies_get_4xx_naming_the_field_and_partial_bodies_keep_good_records(pool: PgPool) {
    let app = http_app(&pool).await;
    // Not JSON.
    let (code, body) = post(&app, Some("club-1"), "{nope").await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("not valid JSON"), "{body}");
    // No impressions array.
    let (code, body) = post(&app, Some("club-1"), r#"{"impressions":"x"}"#).await;
    assert_eq!((code, body["field"].as_str()), (400, Some("impressions")), "{body}");
    // Header and body disagree on the site.
    let (code, body) = post(
        &app,
        Some("club-1"),
        SEED_BODY.replacen('{', r#"{"site_id":"club-2","#, 1),
    )
    .await;
    assert_eq!((code, body["field"].as_str()), (400, Some("site_id")), "{body}");
    // No site at all: each record is refused naming its site_id.
    let (code, body) = post(&app, None, SEED_BODY).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["rejected"][0]["errors"][0]["field"], "impressions[0].site_id");

    // Four records, index 3 has a bad period: 3 kept, index 3 reported and dead-lettered.
    let mut recs: Vec<Value> = (0..4)
        .map(|i| {
            json!({"video_filename": "sponsor_a.mp4", "played_at": format!("2025-12-14T21:0{i}:00Z"),
                   "duration_played": 30, "video_duration": 30, "completed": true,
                   "event_type": "match", "period": "halftime", "trigger_type": "auto", "audience_estimate": 100})
        })
        .collect();
    recs[3]["period"] = json!("half");
    let (code, body) = post(&app, Some("club-1"), json!({"impressions": recs}).to_string()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["inserted"], 3);
    assert_eq!(body["rejected"][0]["index"], 3);
    let field = body["rejected"][0]["errors"][0]["field"].as_str().unwrap();
    assert_eq!(field, "impressions[3].period");
    assert!(
        body["error"].as_str().unwrap().starts_with("impressions[3].period: "),
        "{body}"
    );
    let (src, code_, reason): (String, String, String) = sqlx::query_as(
        "SELECT source, reason_code, reason FROM impressions_rejected WHERE seq IS NULL AND reason LIKE '%[3]%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((src.as_str(), code_.as_str()), ("http", "invalid_impression"));
    assert!(reason.contains("impressions[3].period"), "{reason}");
    assert_eq!(count(&pool, ROWS).await, 3);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM impressions_rejected").await,
        2,
        "the 422 record and index 3"
    );

    // Above the body limit (64 KiB here): 413.
    let big = format!(r#"{{"impressions":[],"pad":"{}"}}"#, "x".repeat(100 * 1024));
    let (code, _) = post(&app, Some("club-1"), big).await;
    assert_eq!(code, 413);

    // Health and metrics.
    let m = reqwest::get(format!("http://{}/metrics", app.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("ingestor_impressions_inserted_total"), "{m}");
    let h = reqwest::get(format!("http://{}/healthz", app.http)).await.unwrap();
    assert_eq!(h.status(), 200);
    app.stop().await;
}
