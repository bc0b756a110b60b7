//! End to end with the real ingestor into PostgreSQL (fresh database per test)
//! over the real Mosquitto: the seed's POST body and a legacy buffer import
//! end as rows with the right fields, exactly once, and the outbox empties.

mod common;
use common::*;
use sqlx::PgPool;

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn seed_body_and_legacy_import_land_in_postgresql_exactly_once(pool: PgPool) {
    init();
    let prefix = prefix();
    // Its session is made before it starts: nothing the edge publishes is lost to it.
    let ing = Ingestor::start(&pool, MOSQUITTO, &prefix).await;

    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), MOSQUITTO, &prefix);
    let site = s.site_id.clone();

    // A legacy buffer imported before the service starts (one bad record).
    let mut legacy = records("legacy-e2e", 0, 20);
    legacy[5]["period"] = serde_json::json!("half");
    let file = dir.path().join("sponsor_impressions.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&serde_json::json!({ "impressions": legacy })).unwrap(),
    )
    .unwrap();
    let rep = edge_publisher::commands::import(&s, &file, false).await.unwrap();
    assert_eq!((rep.imported, rep.already_present, rep.refused.len()), (19, 0, 1));

    let edge = start(s).await;
    let http = reqwest::Client::new();
    for _ in 0..2 {
        let (status, v) = post(&http, &edge.base, SEED_BODY.to_owned()).await;
        assert_eq!((status, v["success"].as_bool()), (200, Some(true)), "{v}");
    }
    wait_until("outbox empty", 60, || {
        let o = edge.outbox.clone();
        async move { o.counts().unconfirmed == 0 }
    })
    .await;

    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sponsor_impressions WHERE site_id = $1")
        .bind(&site)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 20, "19 imported + the seed's play once");
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT seq) FROM sponsor_impressions WHERE site_id = $1")
        .bind(&site)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(distinct, 20);
    let seed: serde_json::Value = serde_json::from_str(SEED_BODY).unwrap();
    let id = id_of(&site, &seed["impressions"][0]);
    type Row = (
        String,
        chrono::DateTime<chrono::Utc>,
        f64,
        f64,
        bool,
        String,
        String,
        String,
        Option<i32>,
    );
    let row: Row = sqlx::query_as(
        "SELECT video_filename, played_at, duration_played, video_duration, completed, event_type, period, trigger_type, audience_estimate
         FROM sponsor_impressions WHERE impression_id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "sponsor_coca_cola_30s.mp4".to_owned(),
            schema::parse_timestamp("2025-12-14T21:30:00Z").unwrap(),
            30.0,
            30.0,
            true,
            "match".to_owned(),
            "halftime".to_owned(),
            "auto".to_owned(),
            Some(150)
        )
    );
    let legacy_id = id_of(&site, &legacy[3]);
    let f: String = sqlx::query_scalar("SELECT video_filename FROM sponsor_impressions WHERE impression_id = $1")
        .bind(legacy_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(f, legacy[3]["video_filename"].as_str().unwrap());

    edge.stop().await;
    ing.stop().await;
}
