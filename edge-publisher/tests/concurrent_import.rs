//! `neopro-edge import` into the data directory of a running edge: two
//! processes append to one outbox file at the same time. Every play the
//! service acknowledged as stored and every imported play reaches
//! PostgreSQL exactly once (real edge, the real `neopro-edge` binary for the
//! import, real Mosquitto, real ingestor and PostgreSQL), no POST is
//! answered "duplicate" for a play it never saw, and the service publishes
//! the imported rows without a restart.

mod common;
use common::*;
use sqlx::PgPool;
use std::collections::HashSet;
use std::process::Command;

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn import_while_the_service_takes_posts_loses_nothing_and_invents_no_duplicate(pool: PgPool) {
    init();
    let prefix = prefix();
    let ing = Ingestor::start(&pool, MOSQUITTO, &prefix).await;
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), MOSQUITTO, &prefix);
    let (site, data) = (s.site_id.clone(), s.data_dir.clone());
    let edge = start(s).await;
    let http = reqwest::Client::new();

    // The service has stored (and cached whatever it caches) before the import.
    let warm = records("warm", 0, 5);
    let (status, v) = post(&http, &edge.base, body(&warm)).await;
    assert_eq!((status, v["stored"].as_u64()), (200, Some(5)), "{v}");

    let legacy = records("legacy", 0, 100);
    let file = dir.path().join("sponsor_impressions.json");
    std::fs::write(&file, serde_json::to_vec(&legacy).unwrap()).unwrap();
    let import = {
        let (site, data, file) = (site.clone(), data.clone(), file.clone());
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_neopro-edge"))
                .args(["import", "--json", "--site-id", &site])
                .arg(file)
                .arg("--data-dir")
                .arg(data)
                .env("RUST_LOG", "warn")
                .output()
                .unwrap()
        })
    };
    // Meanwhile the TV keeps posting new plays, 3 per POST, 3 POSTs at a
    // time, until the import has finished, and 10 POSTs more after it.
    let url = format!("{}/api/sync/sponsor-impressions", edge.base);
    let mut answers: Vec<(Vec<serde_json::Value>, u16, serde_json::Value)> = Vec::new();
    let mut next = 0;
    let mut after = None;
    while after.is_none_or(|n| n < 10) {
        let batch: Vec<Vec<serde_json::Value>> = (0..3).map(|k| records("live", next + 3 * k, 3)).collect();
        next += 9;
        let sent = futures::future::join_all(batch.into_iter().map(|c| {
            let req = http
                .post(&url)
                .header("content-type", "application/json")
                .body(body(&c));
            async move {
                let r = req.send().await.unwrap();
                let status = r.status().as_u16();
                (c, status, r.json::<serde_json::Value>().await.unwrap())
            }
        }))
        .await;
        answers.extend(sent);
        if import.is_finished() {
            after = Some(after.map_or(0, |n| n + 3));
        }
        assert!(next < 30_000, "the import never finished");
    }
    let out = import.await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["imported"].as_u64(), report["already_present"].as_u64()),
        (Some(100), Some(0)),
        "{report}"
    );

    let mut acknowledged: HashSet<uuid::Uuid> = warm.iter().map(|r| id_of(&site, r)).collect();
    for (c, status, v) in &answers {
        assert_eq!(status, &200, "{v}");
        assert_eq!(
            (v["stored"].as_u64(), v["duplicates"].as_u64()),
            (Some(c.len() as u64), Some(0)),
            "a POST of new plays was answered as duplicates: {v}"
        );
        acknowledged.extend(c.iter().map(|r| id_of(&site, r)));
    }
    acknowledged.extend(legacy.iter().map(|r| id_of(&site, r)));
    let total = 5 + next as i64 + 100;
    assert_eq!(acknowledged.len() as i64, total);

    // The running service publishes the imported rows without a restart.
    wait_until("the outbox file empties", 60, || {
        let data = data.clone();
        async move { outbox_ids(&data).is_empty() }
    })
    .await;
    wait_until("the service's counters follow", 10, || {
        let o = edge.outbox.clone();
        async move { o.counts() == edge_publisher::Counts::default() }
    })
    .await;
    assert_stored_exactly_once(&pool, &site, &acknowledged).await;
    // Seqs: one per play, never two plays on one seq.
    let (n, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT seq) FROM sponsor_impressions WHERE site_id = $1")
            .bind(&site)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((n, distinct), (total, total));
    edge.stop().await;
    ing.stop().await;
}

/// An idle service (no POST to wake it) publishes what an import appended
/// to its file, without a restart: it finds the other process's commit on
/// its own (`PRAGMA data_version`, polled at half its batch delay, at most once a second).
#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn an_idle_service_publishes_what_an_import_appended_without_a_restart(pool: PgPool) {
    init();
    let prefix = prefix();
    let ing = Ingestor::start(&pool, MOSQUITTO, &prefix).await;
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), MOSQUITTO, &prefix);
    let (site, data) = (s.site_id.clone(), s.data_dir.clone());
    let edge = start(s).await;
    wait_until("the box subscribed", 30, || {
        let h = edge.health.clone();
        async move { h.ready() }
    })
    .await;
    let legacy = records("idle", 0, 100);
    let file = dir.path().join("sponsor_impressions.json");
    std::fs::write(&file, serde_json::to_vec(&legacy).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_neopro-edge"))
        .args(["import", "--json", "--site-id", &site])
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let imported = std::time::Instant::now();
    wait_until("the imported rows are delivered", 30, || {
        let data = data.clone();
        async move { outbox_ids(&data).is_empty() }
    })
    .await;
    // The batch delay is 100 ms; delivery (publish, commit, receipt) is
    // quick on loopback: well under what a restart-free poll allows.
    assert!(imported.elapsed() < std::time::Duration::from_secs(10));
    let want: HashSet<uuid::Uuid> = legacy.iter().map(|r| id_of(&site, r)).collect();
    assert_stored_exactly_once(&pool, &site, &want).await;
    assert_eq!(edge.outbox.counts(), edge_publisher::Counts::default());
    edge.stop().await;
    ing.stop().await;
}
