//! `POST /api/analytics/impressions` (the seed's central endpoint) against
//! the real App, a fresh database and a real accounts file; MQTT is off in
//! these tests. The seed's own bodies run under the opt-in
//! (`legacy_http_unauthenticated`), as its sync agents send them.

#[macro_use]
mod common;

use common::*;
use serde_json::{json, Value};
use sqlx::PgPool;

const ROWS: &str = "SELECT count(*) FROM sponsor_impressions";
const DEAD: &str = "SELECT count(*) FROM impressions_rejected";

/// The seed's example body (its README's curl test).
const SEED_BODY: &str = r#"{"impressions":[{"video_filename":"test.mp4","played_at":"2025-12-14T21:00:00Z","duration_played":10,"video_duration":30,"completed":false,"event_type":"other","period":"loop","trigger_type":"manual"}]}"#;

/// How a test's endpoint authenticates.
#[derive(Clone, Copy)]
enum Mode {
    /// `credentials` only.
    Credentials,
    /// `legacy_http_unauthenticated` only (the seed's sync agents).
    OptIn,
    /// Both.
    Both,
    /// Neither.
    Neither,
}

/// An accounts file in `dir`: sites `club-a` (`pw-a`) and `club-b`
/// (`pw-b`), and an observer `ops` (`pw-ops`).
fn accounts(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("credentials");
    let mut c = runtime::credentials::Credentials::default();
    c.set_password("club-a", "pw-a").unwrap();
    c.set_password("club-b", "pw-b").unwrap();
    c.set_password_with_role("ops", "pw-ops", runtime::credentials::Role::Observer)
        .unwrap();
    c.save(&path).unwrap();
    path
}

async fn http_app_with(
    pool: &PgPool,
    mode: Mode,
    dir: &std::path::Path,
    tune: impl FnOnce(&mut ingestor::Settings),
) -> Running {
    let mut s = settings(pool, MOSQUITTO, &unique_topics(), &unique_client_id()).await;
    s.mqtt_enabled = false;
    s.credentials_poll_secs = 1;
    if matches!(mode, Mode::Credentials | Mode::Both) {
        s.credentials = Some(accounts(dir));
    }
    s.legacy_http_unauthenticated = matches!(mode, Mode::OptIn | Mode::Both);
    tune(&mut s);
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

/// The seed's sync agents: no credentials, the opt-in, 64 KiB bodies.
async fn http_app(pool: &PgPool) -> Running {
    let dir = tempfile::tempdir().unwrap();
    http_app_with(pool, Mode::OptIn, dir.path(), |s| s.http_body_limit_bytes = 64 * 1024).await
}

/// A POST with optional `X-Site-Id` and HTTP Basic `(user, password)`:
/// (status, `WWW-Authenticate`, JSON body).
async fn post_as(
    app: &Running,
    site: Option<&str>,
    basic: Option<(&str, &str)>,
    body: impl Into<reqwest::Body>,
) -> (u16, Option<String>, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://{}/api/analytics/impressions", app.http))
        .header("content-type", "application/json")
        .body(body);
    if let Some(s) = site {
        req = req.header("X-Site-Id", s);
    }
    if let Some((u, p)) = basic {
        req = req.basic_auth(u, Some(p));
    }
    let resp = req.send().await.unwrap();
    let code = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    (
        code,
        challenge,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post(app: &Running, site: Option<&str>, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let (code, _, body) = post_as(app, site, None, body).await;
    (code, body)
}

/// `n` seed records played at distinct minutes, without `site_id`.
fn records(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"video_filename": "sponsor_a.mp4", "played_at": format!("2025-12-14T21:{:02}:00Z", i % 60),
                   "duration_played": 30, "video_duration": 30, "completed": true,
                   "event_type": "match", "period": "halftime", "trigger_type": "auto", "audience_estimate": 100})
        })
        .collect()
}

const CHALLENGE: &str = "Basic realm=\"neopro\"";

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn requests_without_valid_site_credentials_are_refused(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let app = http_app_with(&pool, Mode::Credentials, dir.path(), |_| {}).await;
    let body = json!({"impressions": records(2)}).to_string();
    // No credentials at all, even with the seed's X-Site-Id.
    let (code, challenge, resp) = post_as(&app, Some("club-a"), None, body.clone()).await;
    assert_eq!((code, challenge.as_deref()), (401, Some(CHALLENGE)), "{resp}");
    assert_eq!(resp["success"], false);
    // A wrong password, an unknown account, a broken header.
    let (code, challenge, _) = post_as(&app, None, Some(("club-a", "pw-b")), body.clone()).await;
    assert_eq!((code, challenge.as_deref()), (401, Some(CHALLENGE)));
    let (code, _, _) = post_as(&app, None, Some(("club-z", "pw-a")), body.clone()).await;
    assert_eq!(code, 401);
    let resp = reqwest::Client::new()
        .post(format!("http://{}/api/analytics/impressions", app.http))
        .header("authorization", "Basic !!!")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    // A valid account that is not a site.
    let (code, challenge, resp) = post_as(&app, None, Some(("ops", "pw-ops")), body.clone()).await;
    assert_eq!((code, challenge), (403, None), "{resp}");
    assert_eq!(count(&pool, ROWS).await, 0);
    assert_eq!(count(&pool, DEAD).await, 0);
    // Unauthenticated bodies are never read: a huge one is a 401, not a 413.
    let (code, _, _) = post_as(&app, None, None, vec![b' '; 3 << 20]).await;
    assert_eq!(code, 401);
    app.stop().await;
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn a_site_stores_its_own_records_and_those_naming_no_site(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let app = http_app_with(&pool, Mode::Credentials, dir.path(), |_| {}).await;
    let mut recs = records(4);
    recs[0]["site_id"] = json!("club-a");
    recs[1]["site_id"] = json!("club-a");
    let (code, _, resp) = post_as(
        &app,
        None,
        Some(("club-a", "pw-a")),
        json!({"impressions": recs}).to_string(),
    )
    .await;
    assert_eq!(code, 200, "{resp}");
    assert_eq!(
        (resp["inserted"].as_u64(), resp["duplicates"].as_u64()),
        (Some(4), Some(0))
    );
    let sites: Vec<String> = sqlx::query_scalar("SELECT site_id FROM sponsor_impressions")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        sites,
        vec!["club-a"; 4],
        "records without site_id get the authenticated site"
    );
    // The seed's own headers agree: accepted; a replay is a duplicate.
    let (code, _, resp) = post_as(
        &app,
        Some("club-a"),
        Some(("club-a", "pw-a")),
        json!({"site_id": "club-a", "impressions": records(4)}).to_string(),
    )
    .await;
    assert_eq!((code, resp["duplicates"].as_u64()), (200, Some(4)), "{resp}");
    assert_eq!(count(&pool, ROWS).await, 4);
    assert_rollup_matches(&pool).await;
    app.stop().await;
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn one_record_of_another_site_refuses_the_whole_request(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let app = http_app_with(&pool, Mode::Credentials, dir.path(), |_| {}).await;
    // The attack: club-a writes a play for club-b among its own.
    let mut recs = records(5);
    recs[3]["site_id"] = json!("club-b");
    let (code, challenge, resp) = post_as(
        &app,
        None,
        Some(("club-a", "pw-a")),
        json!({"impressions": recs}).to_string(),
    )
    .await;
    assert_eq!((code, challenge), (403, None), "{resp}");
    assert_eq!(
        resp,
        json!({"success": false,
               "error": "impressions[3].site_id: 'club-b' is not the authenticated site 'club-a'",
               "field": "impressions[3].site_id"})
    );
    // The body's site and the header are held to the same rule.
    let (code, _, resp) = post_as(
        &app,
        None,
        Some(("club-a", "pw-a")),
        json!({"site_id": "club-b", "impressions": records(1)}).to_string(),
    )
    .await;
    assert_eq!((code, resp["field"].as_str()), (403, Some("site_id")), "{resp}");
    let (code, _, resp) = post_as(
        &app,
        Some("club-b"),
        Some(("club-a", "pw-a")),
        json!({"impressions": records(1)}).to_string(),
    )
    .await;
    assert_eq!((code, resp["field"].as_str()), (403, Some("X-Site-Id")), "{resp}");
    // Nothing of those requests is stored, for either site, not even a dead letter.
    assert_eq!(count(&pool, ROWS).await, 0);
    assert_eq!(count(&pool, DEAD).await, 0);
    // club-b's own credentials store club-b's play, and only it.
    let mut own = records(1);
    own[0]["site_id"] = json!("club-b");
    let (code, _, _) = post_as(
        &app,
        None,
        Some(("club-b", "pw-b")),
        json!({"impressions": own}).to_string(),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM sponsor_impressions WHERE site_id = 'club-b'"
        )
        .await,
        1
    );
    assert_eq!(count(&pool, ROWS).await, 1);
    app.stop().await;
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn bodies_above_one_mib_are_413(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let app = http_app_with(&pool, Mode::Credentials, dir.path(), |_| {}).await;
    let pad = |total: usize| {
        let bare = json!({"impressions": records(1), "pad": ""}).to_string().len();
        json!({"impressions": records(1), "pad": "x".repeat(total - bare)}).to_string()
    };
    let (code, _, _) = post_as(&app, None, Some(("club-a", "pw-a")), pad((1 << 20) + 1)).await;
    assert_eq!(code, 413);
    assert_eq!(count(&pool, ROWS).await, 0);
    let (code, _, resp) = post_as(&app, None, Some(("club-a", "pw-a")), pad(1 << 20)).await;
    assert_eq!(code, 200, "exactly 1 MiB is accepted: {resp}");
    assert_eq!(count(&pool, ROWS).await, 1);
    app.stop().await;
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn without_credentials_or_the_opt_in_every_post_is_401(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let app = http_app_with(&pool, Mode::Neither, dir.path(), |_| {}).await;
    let (code, challenge, resp) = post_as(&app, Some("club-1"), None, SEED_BODY).await;
    assert_eq!((code, challenge.as_deref()), (401, Some(CHALLENGE)), "{resp}");
    let (code, _, _) = post_as(&app, None, Some(("club-a", "pw-a")), SEED_BODY).await;
    assert_eq!(code, 401, "no accounts file: no password can be checked");
    assert_eq!(count(&pool, ROWS).await, 0);
    app.stop().await;
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn with_both_credentials_sent_are_checked_and_the_seed_agent_still_works(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let app = http_app_with(&pool, Mode::Both, dir.path(), |_| {}).await;
    let (code, challenge, _) = post_as(&app, None, Some(("club-a", "wrong")), SEED_BODY).await;
    assert_eq!(
        (code, challenge.as_deref()),
        (401, Some(CHALLENGE)),
        "a wrong password never falls back"
    );
    let (code, _, resp) = post_as(&app, Some("club-1"), None, SEED_BODY).await;
    assert_eq!((code, resp["inserted"].as_u64()), (200, Some(1)), "{resp}");
    let mut foreign = records(1);
    foreign[0]["site_id"] = json!("club-b");
    let (code, _, _) = post_as(
        &app,
        None,
        Some(("club-a", "pw-a")),
        json!({"impressions": foreign}).to_string(),
    )
    .await;
    assert_eq!(code, 403);
    assert_eq!(count(&pool, ROWS).await, 1);
    let m = reqwest::get(format!("http://{}/metrics", app.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("ingestor_legacy_http_unauthenticated"), "{m}");
    assert!(m.contains("ingestor_http_auth_failures_total"), "{m}");
    app.stop().await;
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn a_changed_accounts_file_is_reloaded(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let app = http_app_with(&pool, Mode::Credentials, dir.path(), |_| {}).await;
    let path = dir.path().join("credentials");
    let (code, _, _) = post_as(&app, None, Some(("club-a", "pw-a")), SEED_BODY).await;
    assert_eq!(code, 200);
    let mut c = runtime::credentials::Credentials::load(&path).unwrap();
    c.set_password("club-a", "pw-a-2").unwrap();
    c.save(&path).unwrap();
    // Polled every second: the new password works, the old one stops.
    wait_until(|| async { post_as(&app, None, Some(("club-a", "pw-a-2")), SEED_BODY).await.0 == 200 }).await;
    let (code, _, _) = post_as(&app, None, Some(("club-a", "pw-a")), SEED_BODY).await;
    assert_eq!(code, 401);
    app.stop().await;
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn opt_in_seed_body_is_accepted_once_without_credentials_and_replays_are_duplicates(pool: PgPool) {
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
async fn opt_in_bad_bodies_get_4xx_naming_the_field_and_partial_bodies_keep_good_records(pool: PgPool) {
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

/// Connects to `broker` as `user` (client id = username): whether the
/// broker answered the CONNECT with a CONNACK.
async fn mqtt_login(broker: &runtime::mqtt::MqttUrl, user: &str) -> bool {
    let o = runtime::mqtt::ClientOptions::new(user);
    let (client, mut el) = rumqttc::AsyncClient::new(broker.options(&o).unwrap(), 10);
    let ok = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    let _ = client.disconnect().await;
    ok
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn one_site_password_serves_the_broker_and_the_endpoint(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let app = http_app_with(&pool, Mode::Credentials, dir.path(), |_| {}).await;
    let path = dir.path().join("credentials");
    let broker = broker::EmbeddedBroker::start_for_tests_with_credentials(&path).unwrap();
    assert!(mqtt_login(&broker.mqtt_url(Some("club-a"), Some("pw-a")), "club-a").await);
    assert!(!mqtt_login(&broker.mqtt_url(Some("club-a"), Some("pw-b")), "club-a").await);
    let (code, _, resp) = post_as(&app, None, Some(("club-a", "pw-a")), SEED_BODY).await;
    assert_eq!(code, 200, "{resp}");
    let (code, _, _) = post_as(&app, None, Some(("club-a", "pw-b")), SEED_BODY).await;
    assert_eq!(code, 401);
    assert_eq!(count(&pool, ROWS).await, 1);
    app.stop().await;
}
