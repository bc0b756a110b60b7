//! Attacks on the receipts topic. Anyone who can publish there (a buggy tool,
//! another site's account on a broker without topic ACLs, a misconfigured
//! bridge) can send anything, and the box's outbox id is in every envelope it
//! publishes. Each test performs one attack on a box holding acknowledged
//! plays, checks the box still holds them (read from its outbox file), then
//! lets a real ingestor deliver them and checks, play by play, that each is
//! in PostgreSQL exactly once and nothing else of the site is.

mod common;
use chrono::Utc;
use common::*;
use edge_publisher::publisher::Ignored;
use schema::{Receipt, ReceiptRejection, SeqRange, Topics, PAYLOAD_VERSION};
use sqlx::PgPool;
use std::collections::HashSet;
use uuid::Uuid;

const EVERYTHING: SeqRange = SeqRange {
    first: i64::MIN,
    last: i64::MAX,
};

/// A receipt claiming every seq there is, committed and refused.
fn forged_receipt(site: &str, outbox_id: Uuid, batch_id: Uuid) -> Vec<u8> {
    Receipt {
        v: PAYLOAD_VERSION,
        site_id: site.to_owned(),
        outbox_id,
        batch_id,
        committed: vec![EVERYTHING],
        inserted: 0,
        duplicates: 0,
        rejected: (1..=5)
            .map(|seq| ReceiptRejection {
                seq: Some(seq),
                impression_id: None,
                reason: "forged".into(),
            })
            .collect(),
        rejected_range: Some(EVERYTHING),
        committed_at: Utc::now(),
    }
    .encode()
}

/// Settings of the victim: small batches, a short receipt timeout (its
/// plays, published while no ingestor listens, go again soon).
fn victim(dir: &std::path::Path, mqtt: &str, prefix: &str) -> edge_publisher::Settings {
    let mut s = settings(dir, mqtt, prefix);
    s.batch_max_impressions = 10;
    s.receipt_timeout_ms = 2000;
    s
}

/// POSTs `n` new plays in POSTs of 10; returns the ids acknowledged as stored.
async fn post_plays(edge: &Running, tag: &str, n: usize) -> HashSet<Uuid> {
    let http = reqwest::Client::new();
    let recs = records(tag, 0, n);
    let mut acked = HashSet::new();
    for c in recs.chunks(10) {
        let (status, v) = post(&http, &edge.base, body(c)).await;
        assert_eq!((status, v["stored"].as_u64()), (200, Some(c.len() as u64)), "{v}");
        acked.extend(c.iter().map(|r| id_of(&edge.site, r)));
    }
    acked
}

async fn wait_ignored(edge: &Running, reason: Ignored, n: u64) {
    let what = format!("{n} receipt(s) ignored as {}", reason.as_str());
    wait_until(&what, 30, || {
        let h = edge.health.clone();
        async move { h.ignored(reason) >= n }
    })
    .await;
}

/// Lets the ingestor deliver everything and checks PostgreSQL id by id.
async fn delivered_exactly_once(pool: &PgPool, edge: &Running, data: &std::path::Path, acked: &HashSet<Uuid>) {
    wait_until("the outbox file empties", 90, || {
        let data = data.to_owned();
        async move { outbox_ids(&data).is_empty() }
    })
    .await;
    assert_stored_exactly_once(pool, &edge.site, acked).await;
    assert_eq!(edge.outbox.counts(), edge_publisher::Counts::default());
}

/// Forged receipts with the box's outbox id and made-up batch ids, naming
/// `i64::MIN..=i64::MAX`: published by the attacker directly, and obtained
/// from the genuine ingestor by publishing a forged envelope (invalid
/// impressions carrying the box's seqs) that it refuses seq by seq.
#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn forged_receipts_for_batches_not_in_flight_settle_nothing(pool: PgPool) {
    init();
    let dir = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let mut s = victim(dir.path(), MOSQUITTO, &prefix);
    // Long enough that the plays are still held when the ingestor's
    // receipt of the forged envelope arrives.
    s.receipt_timeout_ms = 5000;
    let (site, data) = (s.site_id.clone(), s.data_dir.clone());
    let topics = Topics::new(prefix.clone()).unwrap();
    let spy = RawClient::connect(MOSQUITTO, None, &[topics.impressions(&site)]).await;
    let edge = start(s).await;
    let acked = post_plays(&edge, "forged", 40).await;

    // The outbox id, as anyone subscribed to the impressions topic reads it.
    let env = spy.first_on(&topics.impressions(&site), 10).await;
    let env: serde_json::Value = serde_json::from_slice(&env.payload).unwrap();
    let outbox_id: Uuid = env["outbox_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(outbox_id, edge.outbox.outbox_id());

    spy.publish(
        &topics.receipts(&site),
        false,
        forged_receipt(&site, outbox_id, Uuid::now_v7()),
    )
    .await;
    wait_ignored(&edge, Ignored::UnknownBatch, 1).await;
    assert_eq!(outbox_ids(&data), acked, "the box still holds every acknowledged play");

    // The same through the genuine ingestor: a forged envelope naming the
    // box's seqs with impressions it refuses; its receipt names those seqs.
    let ing = Ingestor::start(&pool, MOSQUITTO, &prefix).await;
    let forged_env = serde_json::json!({
        "v": 1, "site_id": site, "outbox_id": outbox_id, "batch_id": Uuid::now_v7(),
        "seq": {"first": 1, "last": 40}, "sent_at": "2025-12-14T21:30:05.120Z",
        "impressions": (1..=40).map(|seq| serde_json::json!({"seq": seq, "site_id": site})).collect::<Vec<_>>(),
    });
    spy.publish(&topics.impressions(&site), false, forged_env.to_string().into_bytes())
        .await;
    wait_ignored(&edge, Ignored::UnknownBatch, 2).await;
    assert_eq!(
        outbox_ids(&data),
        acked,
        "the ingestor's receipt of a forged envelope settled nothing"
    );

    delivered_exactly_once(&pool, &edge, &data, &acked).await;
    edge.stop().await;
    ing.stop().await;
}

/// A forged receipt naming a batch really in flight (its id read from the
/// envelope) and every seq there is: only that batch's own seqs are
/// settled (the receipt says what the centre would say of them); every
/// other acknowledged play stays. The envelope the attacker saw is then
/// delivered to the ingestor, as the relay would, so those plays are in
/// PostgreSQL too. On our embedded broker.
#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn a_forged_receipt_for_a_live_batch_settles_that_batch_only(pool: PgPool) {
    init();
    let broker = broker::EmbeddedBroker::start_for_tests().unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let mut s = victim(dir.path(), &url, &prefix);
    s.max_inflight_batches = 1;
    s.receipt_timeout_ms = 3000;
    let (site, data) = (s.site_id.clone(), s.data_dir.clone());
    let topics = Topics::new(prefix.clone()).unwrap();
    let spy = RawClient::connect(&url, None, &[topics.impressions(&site)]).await;
    let edge = start(s).await;
    let acked = post_plays(&edge, "live-batch", 40).await;

    let env = spy.first_on(&topics.impressions(&site), 10).await;
    let decoded = schema::decode_envelope(&site, &env.payload, Utc::now()).unwrap();
    let in_batch: HashSet<Uuid> = decoded.valid.iter().map(|i| i.impression_id).collect();
    assert_eq!(in_batch.len(), 10);
    spy.publish(
        &topics.receipts(&site),
        false,
        forged_receipt(&site, decoded.outbox_id, decoded.batch_id),
    )
    .await;
    wait_ignored(&edge, Ignored::OutsideBatch, 1).await;
    let held = outbox_ids(&data);
    let others: HashSet<Uuid> = acked.difference(&in_batch).copied().collect();
    assert!(
        others.is_subset(&held),
        "{} plays outside the named batch were deleted",
        others.difference(&held).count()
    );

    let ing = Ingestor::start(&pool, &url, &prefix).await;
    spy.publish(&topics.impressions(&site), false, env.payload.to_vec())
        .await;
    delivered_exactly_once(&pool, &edge, &data, &acked).await;
    edge.stop().await;
    ing.stop().await;
}

/// A retained receipt (the ingestor never retains one) naming the box's
/// outbox and every seq, waiting on the broker when the box subscribes.
#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn a_retained_receipt_is_ignored(pool: PgPool) {
    init();
    let dir = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let s = victim(dir.path(), MOSQUITTO, &prefix);
    let (site, data) = (s.site_id.clone(), s.data_dir.clone());
    let topics = Topics::new(prefix.clone()).unwrap();

    // Plays stored before the service starts (as after a reboot).
    let plays = records("retained", 0, 20);
    let file = dir.path().join("legacy.json");
    std::fs::write(&file, serde_json::to_vec(&plays).unwrap()).unwrap();
    let rep = edge_publisher::commands::import(&s, &file, false).await.unwrap();
    assert_eq!(rep.imported, 20);
    let acked: HashSet<Uuid> = plays.iter().map(|r| id_of(&site, r)).collect();
    let outbox_id: Uuid = edge_publisher::commands::status(&s).unwrap()["outboxId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let attacker = RawClient::connect(MOSQUITTO, None, &[]).await;
    attacker
        .publish(
            &topics.receipts(&site),
            true,
            forged_receipt(&site, outbox_id, Uuid::now_v7()),
        )
        .await;
    // The broker holds it before the box subscribes: read it back.
    let reader = RawClient::connect(MOSQUITTO, None, &[topics.receipts(&site)]).await;
    assert!(reader.first_on(&topics.receipts(&site), 10).await.retain);

    let edge = start(s).await;
    wait_ignored(&edge, Ignored::Retained, 1).await;
    assert_eq!(outbox_ids(&data), acked);
    clear_retained(MOSQUITTO, &topics.receipts(&site)).await;

    let ing = Ingestor::start(&pool, MOSQUITTO, &prefix).await;
    delivered_exactly_once(&pool, &edge, &data, &acked).await;
    edge.stop().await;
    ing.stop().await;
}

/// Garbage of every kind on the receipts subscription, and a message on a
/// topic the box's persistent session subscribed under another
/// configuration: each acknowledged and counted, the connection kept.
#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn garbage_is_acknowledged_counted_and_settles_nothing(pool: PgPool) {
    init();
    let dir = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let s = victim(dir.path(), MOSQUITTO, &prefix);
    let (site, data) = (s.site_id.clone(), s.data_dir.clone());
    let topics = Topics::new(prefix.clone()).unwrap();
    // The box's own persistent session, holding a subscription it no
    // longer makes (another prefix, an earlier configuration).
    let stale = format!("{prefix}/elsewhere");
    RawClient::connect(MOSQUITTO, Some(&site), std::slice::from_ref(&stale))
        .await
        .stop();

    let edge = start(s).await;
    wait_until("the box subscribed", 30, || {
        let h = edge.health.clone();
        async move { h.ready() }
    })
    .await;
    let acked = post_plays(&edge, "garbage", 20).await;
    let outbox_id = edge.outbox.outbox_id();
    let attacker = RawClient::connect(MOSQUITTO, None, &[]).await;
    let receipts = topics.receipts(&site);
    for junk in [
        b"not json at all".to_vec(),
        b"[1,2,3]".to_vec(),
        String::from_utf8(forged_receipt(&site, outbox_id, Uuid::now_v7()))
            .unwrap()
            .replacen("\"v\":1", "\"v\":2", 1)
            .into_bytes(),
    ] {
        attacker.publish(&receipts, false, junk).await;
    }
    attacker
        .publish(
            &receipts,
            false,
            forged_receipt("another-site", outbox_id, Uuid::now_v7()),
        )
        .await;
    attacker
        .publish(&receipts, false, forged_receipt(&site, Uuid::now_v7(), Uuid::now_v7()))
        .await;
    attacker
        .publish(&stale, false, forged_receipt(&site, outbox_id, Uuid::now_v7()))
        .await;
    wait_ignored(&edge, Ignored::Unreadable, 3).await;
    wait_ignored(&edge, Ignored::OtherSite, 1).await;
    wait_ignored(&edge, Ignored::OtherOutbox, 1).await;
    wait_ignored(&edge, Ignored::WrongTopic, 1).await;
    assert_eq!(outbox_ids(&data), acked);
    let snap = edge.health.snapshot(String::new());
    assert_eq!(snap.connects, 1, "no message broke the connection");
    assert_eq!(snap.receipts_ignored["unreadable"], 3, "{:?}", snap.receipts_ignored);

    let ing = Ingestor::start(&pool, MOSQUITTO, &prefix).await;
    delivered_exactly_once(&pool, &edge, &data, &acked).await;
    assert_eq!(edge.health.snapshot(String::new()).connects, 1);
    edge.stop().await;
    ing.stop().await;
}

/// Oversized messages on the receipts topic: `sizes` published while the
/// box holds acknowledged plays; each arrives (the client's limit is above
/// the broker's), is acknowledged unread, and the session keeps working.
async fn oversized_does_not_wedge(pool: PgPool, mqtt: &str, sizes: &[usize]) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let s = victim(dir.path(), mqtt, &prefix);
    let (site, data) = (s.site_id.clone(), s.data_dir.clone());
    let topics = Topics::new(prefix.clone()).unwrap();
    let edge = start(s).await;
    wait_until("the box subscribed", 30, || {
        let h = edge.health.clone();
        async move { h.ready() }
    })
    .await;
    let acked = post_plays(&edge, "oversized", 30).await;
    let attacker = RawClient::connect(mqtt, None, &[]).await;
    for &n in sizes {
        // Looks like the start of a receipt; far too big to be one.
        let mut junk =
            br#"{"v":1,"committed":[{"first":-9223372036854775808,"last":9223372036854775807}],"pad":""#.to_vec();
        junk.resize(n - 2, b'x');
        junk.extend_from_slice(b"\"}");
        attacker.publish(&topics.receipts(&site), false, junk).await;
    }
    wait_ignored(&edge, Ignored::Oversized, sizes.len() as u64).await;
    assert_eq!(outbox_ids(&data), acked);
    assert_eq!(edge.health.snapshot(String::new()).connects, 1, "no disconnect");

    let ing = Ingestor::start(&pool, mqtt, &prefix).await;
    delivered_exactly_once(&pool, &edge, &data, &acked).await;
    assert_eq!(edge.health.snapshot(String::new()).connects, 1);
    edge.stop().await;
    ing.stop().await;
}

/// 1,060,000 bytes: above what the clients accepted before (1 MiB + 1 KiB),
/// below what the embedded broker accepts (1 MiB + 64 KiB).
#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn an_oversized_receipt_on_the_embedded_broker_does_not_wedge_the_session(pool: PgPool) {
    init();
    let broker = broker::EmbeddedBroker::start_for_tests().unwrap();
    oversized_does_not_wedge(pool, &broker.url(), &[1_060_000]).await;
}

/// The shared Mosquitto accepts 2 MiB too.
#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn oversized_receipts_on_mosquitto_do_not_wedge_the_session(pool: PgPool) {
    init();
    oversized_does_not_wedge(pool, MOSQUITTO, &[1_060_000, 2 << 20]).await;
}
