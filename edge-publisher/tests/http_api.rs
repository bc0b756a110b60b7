//! The TV-facing contract against a real edge (real outbox on disk, real
//! Mosquitto, a real receipt-answering MQTT peer).

mod common;
use common::*;
use testkit::ReceiptPeer;

#[tokio::test]
async fn seed_example_body_is_acknowledged_durable_then_delivered_with_its_fields() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let peer = ReceiptPeer::start(&MOSQUITTO.parse().unwrap(), &prefix, 0).unwrap();
    let mut s = settings(dir.path(), MOSQUITTO, &prefix);
    // Keep it in the outbox long enough to read the seed's stats first.
    s.batch_delay_ms = 1500;
    let edge = start(s).await;
    let http = reqwest::Client::new();

    let (status, v) = post(&http, &edge.base, SEED_BODY.to_owned()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["success"], true);
    assert_eq!(v["received"], 1);
    assert_eq!(v["queued"], 1);
    let st = stats(&http, &edge.base).await;
    assert_eq!(st["count"], 1, "{st}");
    assert_eq!(st["oldestImpression"], "2025-12-14T21:30:00.000Z");
    assert_eq!(st["newestImpression"], "2025-12-14T21:30:00.000Z");

    wait_until("the receipt empties the outbox", 60, || {
        let o = edge.outbox.clone();
        async move { o.counts().unconfirmed == 0 }
    })
    .await;
    let st = stats(&http, &edge.base).await;
    assert_eq!(st["count"], 0);
    assert!(st["lastReceiptAt"].is_string(), "{st}");
    assert_eq!(st["broker"]["connected"], true);
    {
        let p = peer.state.lock().unwrap();
        assert_eq!(p.committed.len(), 1);
        let imp = p.committed.values().next().unwrap();
        assert_eq!(imp.site_id, edge.site);
        assert_eq!(imp.seq, Some(1));
        assert_eq!(imp.video_filename, "sponsor_coca_cola_30s.mp4");
        assert_eq!(imp.played_at, schema::parse_timestamp("2025-12-14T21:30:00Z").unwrap());
        assert_eq!(
            (imp.duration_played, imp.video_duration, imp.completed),
            (30.0, 30.0, true)
        );
        assert_eq!(imp.event_type, schema::EventType::Match);
        assert_eq!(imp.period, schema::Period::Halftime);
        assert_eq!(imp.trigger_type, schema::TriggerType::Auto);
        assert_eq!(imp.audience_estimate, Some(150));
    }
    let metrics = http
        .get(format!("{}/metrics", edge.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("edge_impressions_stored_total"), "{metrics}");
    let health = http.get(format!("{}/healthz", edge.base)).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    edge.stop().await;
}

#[tokio::test]
async fn retried_post_stores_nothing_twice() {
    init();
    let dir = tempfile::tempdir().unwrap();
    // Broker unreachable: everything stays in the outbox.
    let edge = start(settings(dir.path(), "mqtt://127.0.0.1:9", &prefix())).await;
    let http = reqwest::Client::new();
    let recs = records("retry", 0, 5);
    let (s1, v1) = post(&http, &edge.base, body(&recs)).await;
    assert_eq!(
        (s1, v1["stored"].as_u64(), v1["queued"].as_u64()),
        (200, Some(5), Some(5)),
        "{v1}"
    );
    let (s2, v2) = post(&http, &edge.base, body(&recs)).await;
    assert_eq!(s2, 200);
    assert_eq!(v2["received"], 5);
    assert_eq!(v2["stored"], 0);
    assert_eq!(v2["duplicates"], 5);
    assert_eq!(v2["queued"], 5, "{v2}");
    // The seed's own body twice, too.
    post(&http, &edge.base, SEED_BODY.to_owned()).await;
    let (_, v3) = post(&http, &edge.base, SEED_BODY.to_owned()).await;
    assert_eq!(v3["queued"], 6);
    assert_eq!(edge.outbox.stats().await.unwrap().unconfirmed, 6);
    edge.stop().await;
}

#[tokio::test]
async fn bad_bodies_are_refused_naming_field_and_index_and_good_records_kept() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), "mqtt://127.0.0.1:9", &prefix());
    s.max_body_bytes = 64 * 1024;
    let edge = start(s).await;
    let http = reqwest::Client::new();

    // Partially invalid: 200, the good ones stored, the bad one named.
    let mut recs = records("partial", 0, 3);
    recs[1]["period"] = serde_json::json!("half");
    let (status, v) = post(&http, &edge.base, body(&recs)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((v["received"].as_u64(), v["stored"].as_u64()), (Some(3), Some(2)));
    assert_eq!(v["refused"][0]["index"], 1);
    assert_eq!(v["refused"][0]["field"], "period");
    assert_eq!(v["refused"][0]["path"], "impressions[1].period");
    let st = edge.outbox.stats().await.unwrap();
    assert_eq!((st.unconfirmed, st.refused_kept), (2, 1));

    // Nothing valid: 400 naming field and index.
    let mut bad = records("bad", 0, 2);
    bad[0]["event_type"] = serde_json::json!("party");
    bad[1].as_object_mut().unwrap().remove("played_at");
    let (status, v) = post(&http, &edge.base, body(&bad)).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["success"], false);
    let paths: Vec<&str> = v["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["impressions[0].event_type", "impressions[1].played_at"]);
    assert!(
        v["error"].as_str().unwrap().contains("impressions[0].event_type"),
        "{v}"
    );

    // Not JSON / wrong shape: 400 naming what is wrong.
    let (status, v) = post(&http, &edge.base, "{nope".into()).await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("not valid JSON"));
    let (status, v) = post(&http, &edge.base, r#"{"impressions": 3}"#.into()).await;
    assert_eq!((status, v["refused"][0]["field"].as_str()), (400, Some("impressions")));

    // Oversized: 413, nothing stored.
    let big = records("big", 0, 400);
    let (status, v) = post(&http, &edge.base, body(&big)).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(edge.outbox.counts().unconfirmed, 2);
    edge.stop().await;
}

#[tokio::test]
async fn full_outbox_refuses_with_507_and_keeps_what_it_has() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), "mqtt://127.0.0.1:9", &prefix());
    s.outbox_max_rows = 3;
    let edge = start(s).await;
    let http = reqwest::Client::new();
    let (status, _) = post(&http, &edge.base, body(&records("full", 0, 3))).await;
    assert_eq!(status, 200);
    let st = stats(&http, &edge.base).await;
    assert_eq!(st["nearFull"], true, "{st}");
    let (status, v) = post(&http, &edge.base, body(&records("full", 3, 2))).await;
    assert_eq!(status, 507, "{v}");
    assert_eq!(v["success"], false);
    assert_eq!(v["queued"], 3);
    // A retry of what is already stored still succeeds (nothing new to store).
    let (status, v) = post(&http, &edge.base, body(&records("full", 0, 3))).await;
    assert_eq!((status, v["duplicates"].as_u64()), (200, Some(3)), "{v}");
    assert_eq!(edge.outbox.stats().await.unwrap().unconfirmed, 3);
    edge.stop().await;
}

/// CORS: a page of a foreign origin gets no `Access-Control-Allow-Origin`
/// (its browser refuses it the answer and the preflight of its POST); the
/// box's own pages, or the configured origins, do.
#[tokio::test]
async fn cors_allows_only_the_configured_origins() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let edge = start(settings(dir.path(), "mqtt://127.0.0.1:9", &prefix())).await;
    let http = reqwest::Client::new();
    let stats_url = format!("{}/api/sync/sponsor-impressions/stats", edge.base);
    let post_url = format!("{}/api/sync/sponsor-impressions", edge.base);
    let allowed = |r: &reqwest::Response| {
        r.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let get_from = |origin: &'static str| http.get(&stats_url).header("origin", origin).send();
    let preflight_from = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, &post_url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    for origin in ["http://neopro.local:4200", "http://localhost:3000", "http://localhost"] {
        assert_eq!(allowed(&get_from(origin).await.unwrap()).as_deref(), Some(origin));
        assert_eq!(allowed(&preflight_from(origin).await.unwrap()).as_deref(), Some(origin));
    }
    for origin in [
        "http://evil.example",
        "https://neopro.local:4200",
        "http://neopro.local.evil.example",
        "null",
    ] {
        let r = get_from(origin).await.unwrap();
        assert_eq!(allowed(&r), None, "{origin}");
        assert_eq!(allowed(&preflight_from(origin).await.unwrap()), None, "{origin}");
    }
    edge.stop().await;

    // Configured origins replace the defaults.
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), "mqtt://127.0.0.1:9", &prefix());
    s.cors_origins = vec!["https://tv.club.example".into()];
    let edge = start(s).await;
    let stats_url = format!("{}/api/sync/sponsor-impressions/stats", edge.base);
    let from = |origin: &'static str| http.get(&stats_url).header("origin", origin).send();
    assert_eq!(
        allowed(&from("https://tv.club.example").await.unwrap()).as_deref(),
        Some("https://tv.club.example")
    );
    assert_eq!(allowed(&from("http://localhost:4200").await.unwrap()), None);
    edge.stop().await;
}

/// The unauthenticated stats keep the seed's keys and say nothing that
/// helps forge a receipt (no outbox id, no next seq); `neopro-edge status`
/// on the box has them.
#[tokio::test]
async fn stats_hide_the_outbox_id_and_next_seq() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), "mqtt://127.0.0.1:9", &prefix());
    let edge = start(s.clone()).await;
    let http = reqwest::Client::new();
    post(&http, &edge.base, SEED_BODY.to_owned()).await;
    let st = stats(&http, &edge.base).await;
    for key in ["count", "oldestImpression", "newestImpression"] {
        assert!(st.get(key).is_some(), "seed key {key} missing: {st}");
    }
    assert_eq!(st["count"], 1);
    let text = st.to_string();
    let outbox_id = edge.outbox.outbox_id().to_string();
    assert!(!text.contains(&outbox_id), "{st}");
    assert!(st.get("outboxId").is_none() && st.get("nextSeq").is_none(), "{st}");
    let status = edge_publisher::commands::status(&s).unwrap();
    assert_eq!(status["outboxId"], outbox_id);
    assert_eq!(status["nextSeq"], 2);
    assert_eq!(status["count"], st["count"]);
    edge.stop().await;
}
