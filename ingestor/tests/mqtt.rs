//! The MQTT pipeline against real PostgreSQL (one fresh database per test)
//! and the real Mosquitto on 127.0.0.1:1883 (unique topic prefix and client
//! ids per test).

#[macro_use]
mod common;

use common::*;
use schema::SeqRange;
use sqlx::PgPool;
use uuid::Uuid;

const ROWS: &str = "SELECT count(*) FROM sponsor_impressions";
const DEAD: &str = "SELECT count(*) FROM impressions_rejected";

on_both_brokers!(
    valid_batches_land_once_and_each_duplicate_publish_gets_a_receipt,
    bad_payloads_are_dead_lettered_while_valid_traffic_flows,
    postgres_connections_killed_mid_stream_every_impression_lands_once,
    shutdown_drains_the_open_batch,
);

async fn valid_batches_land_once_and_each_duplicate_publish_gets_a_receipt(pool: PgPool, broker: String) {
    let topics = unique_topics();
    let cid = unique_client_id();
    let app = start(settings(&pool, &broker, &topics, &cid).await).await;
    let mut edge = Edge::connect(&broker, &topics).await;
    let outbox = Uuid::now_v7();

    let a = envelope("club-1", outbox, 1, 50);
    let b = envelope("club-2", Uuid::now_v7(), 1, 30);
    edge.publish(&a).await;
    edge.publish(&b).await;
    let r = edge.receipts_for(&[a.batch_id, b.batch_id]).await;
    let ra = &r[&a.batch_id][0];
    assert_eq!(ra.committed, vec![SeqRange { first: 1, last: 50 }]);
    assert_eq!((ra.inserted, ra.duplicates), (50, 0));
    assert_eq!(ra.outbox_id, outbox, "outbox id echoed");
    assert_eq!(r[&b.batch_id][0].inserted, 30);
    assert_eq!(count(&pool, ROWS).await, 80);

    // The same batch three times: lands once, three receipts.
    let c = envelope("club-1", outbox, 51, 20);
    for _ in 0..3 {
        edge.publish(&c).await;
    }
    let got = edge.receipts(3).await;
    assert!(got.iter().all(|r| r.batch_id == c.batch_id));
    assert!(got
        .iter()
        .all(|r| r.committed == vec![SeqRange { first: 51, last: 70 }]));
    assert_eq!(
        got.iter().map(|r| r.inserted).sum::<u64>(),
        20,
        "inserted once in total"
    );
    assert_eq!(got.iter().map(|r| r.duplicates).sum::<u64>(), 40);
    assert_eq!(count(&pool, ROWS).await, 100);
    assert_rollup_matches(&pool).await;
    let seen = count(&pool, "SELECT count(*) FROM sites WHERE last_seen_at IS NOT NULL").await;
    assert_eq!(seen, 2, "sites' last_seen_at maintained");

    app.stop().await;
    forget_session(&broker, &cid).await;
}

async fn bad_payloads_are_dead_lettered_while_valid_traffic_flows(pool: PgPool, broker: String) {
    let topics = unique_topics();
    let cid = unique_client_id();
    let app = start(settings(&pool, &broker, &topics, &cid).await).await;
    let mut edge = Edge::connect(&broker, &topics).await;
    let outbox = Uuid::now_v7();

    let before = envelope("club-1", outbox, 1, 10);
    edge.publish(&before).await;

    // Malformed JSON.
    edge.publish_raw("club-1", b"{not json".to_vec()).await;
    // Wrong types: JSON that is not an object, and an envelope whose
    // `impressions` is not an array.
    edge.publish_raw("club-1", b"[1,2,3]".to_vec()).await;
    edge.publish_raw("club-1", br#"{"v":1,"site_id":"club-1","impressions":"nope"}"#.to_vec())
        .await;
    // Wrong site: the payload claims another site than its topic.
    let wrong_site = envelope("club-9", Uuid::now_v7(), 1, 5);
    edge.publish_raw("club-1", wrong_site.encode()).await;
    // Wrong version.
    let mut v2 = serde_json::to_value(envelope("club-1", outbox, 100, 3)).unwrap();
    v2["v"] = serde_json::json!(2);
    let v2_batch: Uuid = serde_json::from_value(v2["batch_id"].clone()).unwrap();
    edge.publish_raw("club-1", serde_json::to_vec(&v2).unwrap()).await;
    // Oversized (above the 256 KiB envelope limit, below the packet limit).
    let big = envelope("club-1", outbox, 200, 1200);
    let big_bytes = big.encode();
    assert!(big_bytes.len() > schema::mqtt::DEFAULT_MAX_ENVELOPE_BYTES);
    edge.publish_raw("club-1", big_bytes).await;
    // One invalid impression inside a good envelope: only it is refused.
    let mut partly = serde_json::to_value(envelope("club-1", outbox, 11, 5)).unwrap();
    partly["impressions"][2]["period"] = serde_json::json!("half");
    let partly_batch: Uuid = serde_json::from_value(partly["batch_id"].clone()).unwrap();
    edge.publish_raw("club-1", serde_json::to_vec(&partly).unwrap()).await;

    let after = envelope("club-1", outbox, 16, 10);
    edge.publish(&after).await;

    let r = edge
        .receipts_for(&[
            before.batch_id,
            after.batch_id,
            partly_batch,
            wrong_site.batch_id,
            v2_batch,
            big.batch_id,
        ])
        .await;
    assert_eq!(r[&before.batch_id][0].inserted, 10);
    assert_eq!(r[&after.batch_id][0].inserted, 10);
    let p = &r[&partly_batch][0];
    assert_eq!(p.committed, SeqRange::compress([11, 12, 14, 15]));
    assert_eq!(p.rejected.len(), 1);
    assert_eq!(p.rejected[0].seq, Some(13));
    assert!(
        p.rejected[0].reason.contains("impressions[2].period"),
        "{}",
        p.rejected[0].reason
    );
    assert_eq!(r[&v2_batch][0].rejected_range, Some(SeqRange { first: 100, last: 102 }));
    assert_eq!(
        r[&big.batch_id][0].rejected_range,
        Some(SeqRange { first: 200, last: 1399 })
    );
    assert!(r[&wrong_site.batch_id][0].rejected[0]
        .reason
        .starts_with("site_mismatch"));

    // 24 valid rows landed; 7 dead letters, each with its reason and raw bytes.
    assert_eq!(wait_count(&pool, DEAD, 7).await, 7);
    assert_eq!(count(&pool, ROWS).await, 24);
    let codes: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT reason_code, reason, octet_length(payload)::int8 FROM impressions_rejected ORDER BY reason_code",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let names: Vec<&str> = codes.iter().map(|c| c.0.as_str()).collect();
    for code in [
        "invalid_envelope",
        "invalid_impression",
        "malformed_json",
        "oversized",
        "site_mismatch",
        "unsupported_version",
    ] {
        assert!(names.contains(&code), "missing {code} in {names:?}");
    }
    assert!(
        codes.iter().all(|c| c.2 > 0 && !c.1.is_empty()),
        "raw bytes and reason kept"
    );
    let malformed: Vec<u8> =
        sqlx::query_scalar("SELECT payload FROM impressions_rejected WHERE reason_code = 'malformed_json'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(malformed, b"{not json");
    let (src, seq): (String, Option<i64>) =
        sqlx::query_as("SELECT source, seq FROM impressions_rejected WHERE reason_code = 'invalid_impression'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((src.as_str(), seq), ("mqtt", Some(13)));
    assert_rollup_matches(&pool).await;

    app.stop().await;
    forget_session(&broker, &cid).await;
}

async fn postgres_connections_killed_mid_stream_every_impression_lands_once(pool: PgPool, broker: String) {
    let topics = unique_topics();
    let cid = unique_client_id();
    let mut s = settings(&pool, &broker, &topics, &cid).await;
    s.writers = 2;
    let app = start(s).await;
    let mut edge = Edge::connect(&broker, &topics).await;
    let db: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&pool)
        .await
        .unwrap();

    // Kill the ingestor's backends every 30 ms while 100 envelopes flow.
    let killer_pool = pool.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let stop2 = stop.clone();
    let killer = tokio::spawn(async move {
        let mut killed = 0i64;
        while !stop2.is_cancelled() {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(pg_terminate_backend(pid))::int8 FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'neopro' AND pid <> pg_backend_pid()",
            )
            .bind(&db)
            .fetch_one(&killer_pool)
            .await
            .unwrap_or(0);
            killed += n;
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        killed
    });
    let mut ids = Vec::new();
    for k in 0..100i64 {
        let env = envelope(&format!("club-{}", k % 7), Uuid::now_v7(), 1 + (k / 7) * 20, 20);
        ids.push(env.batch_id);
        edge.publish(&env).await;
        if k % 10 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    stop.cancel();
    let killed = killer.await.unwrap();
    assert!(killed > 0, "the test must actually kill connections");

    let _ = edge.receipts_for(&ids).await;
    assert_eq!(wait_count(&pool, ROWS, 2000).await, 2000);
    assert_eq!(count(&pool, ROWS).await, 2000, "every impression exactly once");
    assert_rollup_matches(&pool).await;
    assert_eq!(count(&pool, DEAD).await, 0, "a transient error never dead-letters");

    app.stop().await;
    forget_session(&broker, &cid).await;
}

async fn shutdown_drains_the_open_batch(pool: PgPool, broker: String) {
    let topics = unique_topics();
    let cid = unique_client_id();
    let mut s = settings(&pool, &broker, &topics, &cid).await;
    // Batches would only seal after a minute: the drain has to commit them.
    s.batch_max_age_ms = 60_000;
    s.batch_max_messages = 1_000;
    s.seal_when_idle = false;
    let app = start(s).await;
    let mut edge = Edge::connect(&broker, &topics).await;
    let mut ids = Vec::new();
    for k in 0..5i64 {
        let env = envelope("club-1", Uuid::now_v7(), 1 + k * 10, 10);
        ids.push(env.batch_id);
        edge.publish(&env).await;
    }
    let h = app.health.clone();
    wait_until(|| {
        let h = h.clone();
        async move { h.received.load(std::sync::atomic::Ordering::Relaxed) >= 5 }
    })
    .await;
    assert_eq!(count(&pool, ROWS).await, 0, "nothing committed before the shutdown");
    app.stop().await;
    assert_eq!(count(&pool, ROWS).await, 50, "the drain committed the open batch");
    let r = edge.receipts_for(&ids).await;
    assert_eq!(r.len(), 5, "and published its receipts");
    assert_rollup_matches(&pool).await;

    // Acked: a new session under the same client id gets nothing redelivered.
    let mut s = settings(&pool, &broker, &topics, &cid).await;
    s.batch_max_age_ms = 10;
    let again = start(s).await;
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    assert_eq!(again.health.received.load(std::sync::atomic::Ordering::Relaxed), 0);
    again.stop().await;
    forget_session(&broker, &cid).await;
}
