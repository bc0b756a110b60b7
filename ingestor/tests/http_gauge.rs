//! The gauge `ingestor_legacy_http_unauthenticated` says whether the legacy
//! endpoint accepts unauthenticated records. The metrics recorder is
//! process-wide, so this runs alone in its own test binary, one App after
//! the other.

#[macro_use]
mod common;

use common::*;
use sqlx::PgPool;

async fn gauge_with(pool: &PgPool, opt_in: bool) -> String {
    let mut s = settings(pool, MOSQUITTO, &unique_topics(), &unique_client_id()).await;
    s.mqtt_enabled = false;
    s.legacy_http_unauthenticated = opt_in;
    let app = ingestor::App::build(s).await.unwrap();
    let http = app.http_addr();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(app.run(shutdown.clone()));
    let url = format!("http://{http}/metrics");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let line = loop {
        let text = match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if let Some(l) = text
            .lines()
            .find(|l| l.starts_with("ingestor_legacy_http_unauthenticated "))
        {
            break l.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no gauge in /metrics within 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    shutdown.cancel();
    task.await.unwrap().unwrap();
    line
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn the_opt_in_is_visible_in_metrics(pool: PgPool) {
    assert_eq!(gauge_with(&pool, true).await, "ingestor_legacy_http_unauthenticated 1");
    assert_eq!(gauge_with(&pool, false).await, "ingestor_legacy_http_unauthenticated 0");
}
