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
    forged_ranges_are_never_receipted_beyond_what_was_carried,
);

/// The embedded broker refuses packets above `MAX_PACKET_BYTES` + 64 KiB;
/// the local Mosquitto (default configuration) takes a 2 MiB one.
mod messages_that_cannot_be_used_never_wedge_the_session {
    #[sqlx::test(migrator = "runtime::db::MIGRATOR")]
    async fn mosquitto(pool: sqlx::PgPool) {
        super::messages_that_cannot_be_used_never_wedge_the_session(pool, crate::common::MOSQUITTO.to_owned(), true)
            .await
    }
    #[sqlx::test(migrator = "runtime::db::MIGRATOR")]
    async fn embedded(pool: sqlx::PgPool) {
        super::messages_that_cannot_be_used_never_wedge_the_session(pool, crate::common::embedded_broker_url(), false)
            .await
    }
}

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
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let killed2 = killed.clone();
    let killer = tokio::spawn(async move {
        while !stop2.is_cancelled() {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(pg_terminate_backend(pid))::int8 FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'neopro' AND pid <> pg_backend_pid()",
            )
            .bind(&db)
            .fetch_one(&killer_pool)
            .await
            .unwrap_or(0);
            killed2.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
    });
    // After every 10 envelopes, the stream waits for the killer to end one
    // more of the ingestor's connections (its writers need one to commit
    // what was just published): ten kills at least, each mid-stream.
    let mut ids = Vec::new();
    for k in 0..100i64 {
        let env = envelope(&format!("club-{}", k % 7), Uuid::now_v7(), 1 + (k / 7) * 20, 20);
        ids.push(env.batch_id);
        edge.publish(&env).await;
        if k % 10 == 9 {
            let before = killed.load(std::sync::atomic::Ordering::Relaxed);
            wait_until(|| {
                let killed = killed.clone();
                async move { killed.load(std::sync::atomic::Ordering::Relaxed) > before }
            })
            .await;
        }
    }
    stop.cancel();
    killer.await.unwrap();
    assert!(
        killed.load(std::sync::atomic::Ordering::Relaxed) >= 10,
        "the test must actually kill connections"
    );

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
    // The marker, published after the restart, is delivered after anything
    // the session still held: once its receipt is in, the window is closed.
    let mut s = settings(&pool, &broker, &topics, &cid).await;
    s.batch_max_age_ms = 10;
    let again = resume(s).await;
    let marker = envelope("club-1", Uuid::now_v7(), 51, 1);
    edge.publish(&marker).await;
    let r = edge.receipts_for(&[marker.batch_id]).await;
    assert_eq!(r[&marker.batch_id][0].inserted, 1);
    assert_eq!(
        again.health.received.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the marker only: nothing redelivered"
    );
    again.stop().await;
    forget_session(&broker, &cid).await;
}

/// A publisher whose packets may be far larger than an envelope (the
/// edge's own client caps them at the MQTT packet limit).
async fn big_publisher(broker: &str) -> (rumqttc::AsyncClient, tokio::task::JoinHandle<()>) {
    let url: runtime::mqtt::MqttUrl = broker.parse().unwrap();
    let o = runtime::mqtt::ClientOptions::new(format!("big-{}", Uuid::new_v4().simple()));
    let mut opts = url.options(&o).unwrap();
    opts.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 100);
    let task = tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    });
    (client, task)
}

/// Publishes at QoS 1 and waits for the broker's PUBACK (or the connection
/// to fail): a message the broker took is on its way to the ingestor.
async fn publish_acked(broker: &str, topic: String, payload: Vec<u8>, retain: bool) -> bool {
    let url: runtime::mqtt::MqttUrl = broker.parse().unwrap();
    let o = runtime::mqtt::ClientOptions::new(format!("pub-{}", Uuid::new_v4().simple()));
    let mut opts = url.options(&o).unwrap();
    opts.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 10);
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
        .await
        .unwrap();
    let acked = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), el.poll()).await;
    acked
}

/// An envelope padded with an unknown field to exactly `size` bytes.
fn padded_envelope(site: &str, outbox: Uuid, first: i64, n: usize, size: usize) -> (schema::BatchEnvelope, Vec<u8>) {
    let env = envelope(site, outbox, first, n);
    let mut v = serde_json::to_value(&env).unwrap();
    v["pad"] = serde_json::json!("");
    let bare = serde_json::to_vec(&v).unwrap().len();
    assert!(bare < size);
    v["pad"] = serde_json::json!("x".repeat(size - bare));
    let bytes = serde_json::to_vec(&v).unwrap();
    assert_eq!(bytes.len(), size);
    (env, bytes)
}

async fn messages_that_cannot_be_used_never_wedge_the_session(pool: PgPool, broker: String, takes_2_mib: bool) {
    let topics = unique_topics();
    let cid = unique_client_id();
    // The ingestor's persistent session also holds a status subscription (as
    // a later build or an operator could leave), so a message of another
    // topic reaches it.
    let url: runtime::mqtt::MqttUrl = broker.parse().unwrap();
    {
        let mut o = runtime::mqtt::ClientOptions::new(cid.clone());
        o.clean_session = false;
        o.manual_acks = true;
        let (client, mut el) = rumqttc::AsyncClient::new(url.options(&o).unwrap(), 10);
        for kind in [schema::TopicKind::Impressions, schema::TopicKind::Status] {
            client
                .subscribe(topics.all_sites(kind), rumqttc::QoS::AtLeastOnce)
                .await
                .unwrap();
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut acks = 0;
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::SubAck(_))) => {
                        acks += 1;
                        if acks == 2 {
                            let _ = client.disconnect().await;
                        }
                    }
                    Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("session created");
    }
    // A retained envelope, published before the ingestor subscribes.
    let retained = envelope("club-1", Uuid::now_v7(), 900, 2);
    assert!(publish_acked(&broker, topics.impressions("club-1"), retained.encode(), true).await);

    let app = resume(settings(&pool, &broker, &topics, &cid).await).await;
    let mut edge = Edge::connect(&broker, &topics).await;
    let (big, _big_task) = big_publisher(&broker).await;
    let outbox = Uuid::now_v7();

    let first = envelope("club-1", outbox, 1, 5);
    edge.publish(&first).await;
    // 1,060,000 bytes: under the brokers' packet limit, above the envelope limit.
    let (oversized, bytes) = padded_envelope("club-1", outbox, 6, 3, 1_060_000);
    big.publish(topics.impressions("club-1"), rumqttc::QoS::AtLeastOnce, false, bytes)
        .await
        .unwrap();
    // 2 MiB: on a connection of its own, the embedded broker closes it.
    let (_, two_mib) = padded_envelope("club-1", outbox, 9, 1, 2 << 20);
    let took_2_mib = publish_acked(&broker, topics.impressions("club-1"), two_mib, false).await;
    assert_eq!(took_2_mib, takes_2_mib, "whether this broker takes a 2 MiB packet");
    // Garbage, a site that is not topic-safe, another topic.
    edge.publish_raw("club-1", b"\x00\xff garbage \xfe".to_vec()).await;
    edge.client
        .publish(
            format!("{}/sites/bad site/impressions", topics.prefix()),
            rumqttc::QoS::AtLeastOnce,
            false,
            first.encode(),
        )
        .await
        .unwrap();
    edge.client
        .publish(
            topics.status("club-1"),
            rumqttc::QoS::AtLeastOnce,
            false,
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    let next = envelope("club-1", outbox, 10, 5);
    edge.publish(&next).await;

    let r = edge
        .receipts_for(&[first.batch_id, oversized.batch_id, next.batch_id])
        .await;
    assert_eq!(r[&first.batch_id][0].inserted, 5);
    assert_eq!(r[&next.batch_id][0].inserted, 5, "the next good envelope is stored");
    assert_eq!(
        r[&oversized.batch_id][0].rejected_range,
        Some(oversized.seq),
        "an honest oversized envelope is settled by its range"
    );
    assert!(r[&oversized.batch_id][0].rejected[0].reason.starts_with("oversized"));

    let mut expected: Vec<(&str, i64)> = vec![("oversized", 1), ("malformed_json", 1), ("invalid_topic", 1)];
    if takes_2_mib {
        expected[0].1 = 2;
    }
    let total: i64 = expected.iter().map(|e| e.1).sum::<i64>();
    // The retained envelope was published while the session existed: its
    // live delivery (no retain flag) is stored once. Its replay on the
    // ingestor's SUBSCRIBE is flagged by Mosquitto and dead-lettered
    // (rumqttd delivers it unflagged: a duplicate, absorbed).
    const RETAINED: &str = "SELECT count(*) FROM impressions_rejected WHERE reason_code = 'retained'";
    assert_eq!(
        wait_count(&pool, "SELECT count(*) FROM sponsor_impressions WHERE seq >= 900", 2).await,
        2
    );
    if takes_2_mib {
        assert_eq!(wait_count(&pool, RETAINED, 1).await, 1, "the replay dead-lettered");
    }
    let retained_dead = count(&pool, RETAINED).await;
    assert_eq!(
        wait_count(&pool, DEAD, total + retained_dead).await,
        total + retained_dead
    );
    for (code, n) in &expected {
        let got: i64 = sqlx::query_scalar("SELECT count(*) FROM impressions_rejected WHERE reason_code = $1")
            .bind(code)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(got, *n, "{code}");
    }
    let sizes: Vec<i64> = sqlx::query_scalar(
        "SELECT octet_length(payload)::int8 FROM impressions_rejected WHERE reason_code = 'oversized' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(sizes[0], 1_060_000, "raw bytes kept");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM sponsor_impressions WHERE seq < 900").await,
        10,
        "the good envelopes only"
    );
    assert_eq!(
        count(&pool, ROWS).await,
        12,
        "and the retained envelope's live delivery, once"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM sponsor_impressions WHERE seq BETWEEN 6 AND 9"
        )
        .await,
        0
    );

    // Everything was acknowledged: the same session gets nothing redelivered
    // but the retained copy, which Mosquitto sends again on every SUBSCRIBE
    // (flagged, and dead-lettered again); rumqttd sends retained messages to
    // a new subscription only, and a resumed session's is not new.
    app.stop().await;
    let retained_before = count(&pool, RETAINED).await;
    let replays: i64 = if broker == MOSQUITTO { 1 } else { 0 };
    let again = resume(settings(&pool, &broker, &topics, &cid).await).await;
    // The replay follows the ingestor's SUBSCRIBE; once it is dead-lettered,
    // a marker published now is delivered after anything the session held.
    assert_eq!(
        wait_count(&pool, RETAINED, retained_before + replays).await,
        retained_before + replays,
        "the retained copy replayed on the SUBSCRIBE"
    );
    let marker = envelope("club-1", outbox, 20, 1);
    edge.publish(&marker).await;
    let r = edge.receipts_for(&[marker.batch_id]).await;
    assert_eq!(r[&marker.batch_id][0].inserted, 1);
    let redelivered = again.health.received.load(std::sync::atomic::Ordering::Relaxed) as i64 - 1;
    assert_eq!(
        redelivered, replays,
        "{redelivered} messages redelivered besides the marker"
    );
    assert_eq!(
        count(&pool, RETAINED).await,
        retained_before + replays,
        "whatever the new session received is the retained copy"
    );
    again.stop().await;
    // Clear the retained message from the shared broker.
    assert!(publish_acked(&broker, topics.impressions("club-1"), Vec::new(), true).await);
    forget_session(&broker, &cid).await;
}

/// The attack: a forged envelope on club-b's topic, with club-b's outbox id,
/// an unknown version and the whole seq space as its range. Club-b's edge
/// gets a receipt that settles only the seq the forgery carried, never its
/// in-flight plays.
async fn forged_ranges_are_never_receipted_beyond_what_was_carried(pool: PgPool, broker: String) {
    let topics = unique_topics();
    let cid = unique_client_id();
    let app = start(settings(&pool, &broker, &topics, &cid).await).await;
    let mut edge = Edge::connect(&broker, &topics).await;
    let victim_outbox = Uuid::now_v7();
    let victim = envelope("club-b", victim_outbox, 1, 50);

    let mut forged = serde_json::to_value(envelope("club-b", victim_outbox, 7, 1)).unwrap();
    forged["v"] = serde_json::json!(2);
    forged["seq"] = serde_json::json!({"first": i64::MIN, "last": i64::MAX});
    let forged_batch: Uuid = serde_json::from_value(forged["batch_id"].clone()).unwrap();
    edge.publish_raw("club-b", serde_json::to_vec(&forged).unwrap()).await;
    // The same forgery whose one impression has no seq: nothing to settle.
    let mut blind = forged.clone();
    let blind_batch = Uuid::now_v7();
    blind["batch_id"] = serde_json::json!(blind_batch);
    blind["impressions"][0].as_object_mut().unwrap().remove("seq");
    edge.publish_raw("club-b", serde_json::to_vec(&blind).unwrap()).await;
    edge.publish(&victim).await;

    let r = edge.receipts_for(&[forged_batch, victim.batch_id]).await;
    let f = &r[&forged_batch][0];
    assert_eq!(f.rejected_range, None);
    for seq in 1..=50 {
        assert_eq!(f.settles(seq), seq == 7, "seq {seq}");
    }
    assert!(!f.settles(i64::MIN) && !f.settles(i64::MAX));
    // The victim's plays: every one stored, id by id.
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT impression_id FROM sponsor_impressions WHERE site_id = 'club-b'")
        .fetch_all(&pool)
        .await
        .unwrap();
    for imp in &victim.impressions {
        assert!(ids.contains(&imp.impression_id), "{} stored", imp.impression_id);
    }
    assert_eq!(ids.len(), 50);
    // Both forgeries dead-lettered; the blind one got no receipt at all.
    assert_eq!(wait_count(&pool, DEAD, 2).await, 2);
    app.stop().await;
    let late: Vec<_> = std::iter::from_fn(|| edge.receipts.try_recv().ok()).collect();
    assert!(
        !r.contains_key(&blind_batch) && late.iter().all(|r| r.batch_id != blind_batch),
        "no receipt for the forgery without a readable seq"
    );
    forget_session(&broker, &cid).await;
}
