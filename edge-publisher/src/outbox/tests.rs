//! The outbox through its handle, against a real file: what the module doc
//! promises (seqs, requeues, receipts within their batch, other writers,
//! limits, byte counts).

use super::*;
use chrono::TimeZone;
use rusqlite::Connection;
use schema::{EventType, Impression, Period, SeqRange, TriggerType};
use std::path::Path;

/// A play of `a.mp4` at `site`, `k` seconds after a fixed instant (shared
/// with the publisher's tests).
pub(crate) fn imp(site: &str, k: i64) -> Impression {
    let played_at = Utc.with_ymd_and_hms(2025, 12, 14, 21, 0, 0).unwrap() + chrono::Duration::seconds(k);
    Impression {
        impression_id: schema::derive_impression_id(site, "a.mp4", played_at),
        site_id: site.into(),
        seq: None,
        video_id: None,
        video_filename: "a.mp4".into(),
        played_at,
        duration_played: 30.0,
        video_duration: 30.0,
        completed: true,
        event_type: EventType::Match,
        period: Period::Loop,
        trigger_type: TriggerType::Auto,
        audience_estimate: None,
    }
}

#[tokio::test]
async fn seqs_are_contiguous_never_reused_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
    let id = ob.outbox_id();
    let o = ob.append((0..5).map(|k| imp("s1", k)).collect()).await.unwrap();
    assert_eq!((o.inserted, o.duplicates, o.queued), (5, 0, 5));
    let o = ob.append((3..8).map(|k| imp("s1", k)).collect()).await.unwrap();
    assert_eq!((o.inserted, o.duplicates, o.queued), (3, 2, 8));
    let b = Uuid::now_v7();
    let c = ob.claim(100, 1 << 20, b).await.unwrap();
    assert_eq!(c.seqs().to_vec(), (1..=8).collect::<Vec<_>>());
    // The joined bodies are the stored impressions, in seq order.
    let mut array = b"[".to_vec();
    array.extend_from_slice(c.joined_bodies());
    array.push(b']');
    let bodies: Vec<Impression> = serde_json::from_slice(&array).unwrap();
    assert_eq!(
        bodies.iter().map(|i| i.seq.unwrap()).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert_eq!(bodies[0].impression_id, imp("s1", 0).impression_id);
    assert_eq!(ob.counts().unsent, 0);
    // Settle everything: the table empties, the next seq is still 9.
    let s = ob.settle_batch(b, vec![SeqRange { first: 1, last: 8 }]).await.unwrap();
    assert_eq!((s.known_batch, s.settled, s.outside, s.remaining), (true, 8, false, 0));
    assert_eq!(ob.counts(), Counts::default());
    ob.append(vec![imp("s1", 100)]).await.unwrap();
    ob.close().await;
    let ob = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
    assert_eq!(ob.outbox_id(), id, "outbox id made once");
    let c = ob.claim(100, 1 << 20, Uuid::now_v7()).await.unwrap();
    assert_eq!(c.seqs().to_vec(), vec![9]);
    let st = ob.stats().await.unwrap();
    assert_eq!((st.unconfirmed, st.unsent, st.next_seq), (1, 0, 10));
    assert!(st.last_receipt_at.is_some());
    ob.close().await;
    assert!(matches!(
        ob.append(vec![imp("s1", 200)]).await,
        Err(OutboxError::Closed)
    ));
    // Another site's outbox is refused.
    assert!(Outbox::open(OutboxConfig::new(dir.path()), "s2").is_err());
}

#[tokio::test]
async fn published_rows_are_requeued_at_open_and_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
    ob.append((0..10).map(|k| imp("s1", k)).collect()).await.unwrap();
    let b1 = Uuid::now_v7();
    let c1 = ob.claim(4, 1 << 20, b1).await.unwrap();
    let c2 = ob.claim(4, 1 << 20, Uuid::now_v7()).await.unwrap();
    assert_eq!((c1.len(), c2.len(), ob.counts().unsent), (4, 4, 2));
    assert_eq!(ob.requeue(Some(b1)).await.unwrap(), 4);
    assert_eq!(ob.counts().unsent, 6);
    let b3 = Uuid::now_v7();
    let again = ob.claim(100, 1 << 20, b3).await.unwrap();
    assert_eq!(again.seqs().to_vec(), vec![1, 2, 3, 4, 9, 10]);
    // Only what a receipt names goes.
    assert_eq!(
        ob.settle_batch(b3, vec![SeqRange { first: 2, last: 3 }])
            .await
            .unwrap()
            .settled,
        2
    );
    ob.close().await;
    let ob = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
    assert_eq!(ob.counts().unconfirmed, 8);
    assert_eq!(
        ob.counts().unsent,
        8,
        "every published row is pending again after a restart"
    );
    ob.close().await;
}

#[tokio::test]
async fn claims_stay_in_memory_requeues_are_recorded_and_a_full_receipt_empties_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig::new(dir.path());
    let path = cfg.path();
    let ob = Outbox::open(cfg, "s1").unwrap();
    ob.append((0..10).map(|k| imp("s1", k)).collect()).await.unwrap();
    let file = open_connection(&path, 64).unwrap();
    let untouched = |file: &Connection| -> i64 {
        file.query_row(
            "SELECT COUNT(*) FROM outbox WHERE state = 'pending' AND attempts = 0 AND published_at IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };

    let b1 = Uuid::now_v7();
    let c1 = ob.claim(4, 1 << 20, b1).await.unwrap();
    assert_eq!(c1.seqs().to_vec(), vec![1, 2, 3, 4]);
    assert_eq!(ob.counts().unsent, 6);
    assert_eq!(untouched(&file), 10, "a claim writes nothing to the file");

    // An unconfirmed publish is what the file records.
    assert_eq!(ob.requeue(Some(b1)).await.unwrap(), 4);
    assert_eq!(ob.counts().unsent, 10);
    let (attempts, batch): (i64, Vec<u8>) = file
        .query_row("SELECT attempts, batch_id FROM outbox WHERE seq = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((attempts, batch.as_slice()), (1, b1.as_bytes().as_slice()));
    assert_eq!(untouched(&file), 6);

    let b2 = Uuid::now_v7();
    let all = ob.claim(100, 1 << 20, b2).await.unwrap();
    assert_eq!(all.len(), 10);
    // A partial receipt leaves the rest of the run in flight: not claimed again.
    let s = ob.settle_batch(b2, vec![SeqRange { first: 3, last: 5 }]).await.unwrap();
    assert_eq!((s.settled, s.remaining), (3, 7));
    assert_eq!((ob.counts().unconfirmed, ob.counts().unsent), (7, 0));
    assert!(ob.claim(100, 1 << 20, Uuid::now_v7()).await.unwrap().is_empty());
    assert_eq!(
        ob.requeue(Some(b2)).await.unwrap(),
        7,
        "the run's remaining rows are still in flight"
    );
    let b3 = Uuid::now_v7();
    let again = ob.claim(100, 1 << 20, b3).await.unwrap();
    assert_eq!(again.seqs().to_vec(), vec![1, 2, 6, 7, 8, 9, 10]);

    // Rows never published are not the batch's: a receipt naming them
    // settles none of them.
    ob.append((10..12).map(|k| imp("s1", k)).collect()).await.unwrap();
    assert_eq!(ob.counts().unsent, 2);
    let s = ob
        .settle_batch(b3, vec![SeqRange { first: 11, last: 11 }])
        .await
        .unwrap();
    assert_eq!((s.known_batch, s.settled, s.outside), (true, 0, true));
    assert_eq!((ob.counts().unconfirmed, ob.counts().unsent), (9, 2));
    let b4 = Uuid::now_v7();
    assert_eq!(ob.claim(100, 1 << 20, b4).await.unwrap().seqs().to_vec(), vec![11, 12]);

    // A receipt settling its whole batch, when the batch holds every
    // stored row, empties the table (the bare DELETE); here b3 does not
    // hold 11 and 12, so it deletes its own rows only.
    let s = ob
        .settle_batch(
            b3,
            vec![SeqRange { first: 7, last: 20 }, SeqRange { first: 1, last: 6 }],
        )
        .await
        .unwrap();
    assert_eq!((s.settled, s.outside, s.remaining), (7, true, 0));
    assert_eq!(ob.counts().unconfirmed, 2);
    let s = ob
        .settle_batch(b4, vec![SeqRange { first: 11, last: 12 }])
        .await
        .unwrap();
    assert_eq!((s.settled, s.outside), (2, false));
    assert_eq!(ob.counts(), Counts::default());
    let left: i64 = file.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 0);
    let st = ob.stats().await.unwrap();
    assert_eq!((st.unconfirmed, st.unsent, st.next_seq), (0, 0, 13));
    // A settled batch is no longer in flight: its receipt again is ignored.
    let s = ob
        .settle_batch(b4, vec![SeqRange { first: 11, last: 12 }])
        .await
        .unwrap();
    assert_eq!(s, Settled::default());
    ob.close().await;
}

/// A forged receipt (any batch id, any ranges) can remove only rows in
/// flight in the batch it names; with a made-up batch, nothing.
#[tokio::test]
async fn a_receipt_settles_only_the_runs_of_its_own_batch() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig::new(dir.path());
    let path = cfg.path();
    let ob = Outbox::open(cfg, "s1").unwrap();
    ob.append((0..30).map(|k| imp("s1", k)).collect()).await.unwrap();
    let everything = vec![SeqRange {
        first: i64::MIN,
        last: i64::MAX,
    }];
    // No batch in flight at all.
    assert_eq!(
        ob.settle_batch(Uuid::now_v7(), everything.clone()).await.unwrap(),
        Settled::default()
    );
    let (b1, b2) = (Uuid::now_v7(), Uuid::now_v7());
    assert_eq!(
        ob.claim(10, 1 << 20, b1).await.unwrap().seqs(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        ob.claim(10, 1 << 20, b2).await.unwrap().seqs(),
        (11..=20).collect::<Vec<_>>()
    );
    // A made-up batch id with the whole seq space: nothing.
    let s = ob.settle_batch(Uuid::now_v7(), everything.clone()).await.unwrap();
    assert!(!s.known_batch);
    let stored = |path: &Path| -> i64 {
        let c = open_connection(path, 64).unwrap();
        c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)).unwrap()
    };
    assert_eq!(stored(&path), 30);
    // b1's id with the whole seq space: b1's rows only, the rest flagged.
    let s = ob.settle_batch(b1, everything.clone()).await.unwrap();
    assert_eq!((s.known_batch, s.settled, s.outside, s.remaining), (true, 10, true, 0));
    assert_eq!(stored(&path), 20);
    assert_eq!((ob.counts().unconfirmed, ob.counts().unsent), (20, 10));
    // b2 requeued (its receipt timed out): its late receipt settles nothing.
    assert_eq!(ob.requeue(Some(b2)).await.unwrap(), 10);
    assert!(!ob.settle_batch(b2, everything.clone()).await.unwrap().known_batch);
    assert_eq!(stored(&path), 20);
    // Degenerate ranges (last < first) settle nothing either.
    let b3 = Uuid::now_v7();
    ob.claim(100, 1 << 20, b3).await.unwrap();
    let s = ob
        .settle_batch(b3, vec![SeqRange { first: 25, last: 12 }])
        .await
        .unwrap();
    assert_eq!((s.settled, s.remaining), (0, 20));
    assert_eq!(stored(&path), 20);
    // The genuine receipt of the batch holding every row empties the file.
    let s = ob.settle_batch(b3, SeqRange::compress(11..=30)).await.unwrap();
    assert_eq!((s.settled, s.outside, s.remaining), (20, false, 0));
    assert_eq!(stored(&path), 0);
    assert_eq!(ob.counts(), Counts::default());
    ob.close().await;
}

/// Two handles on one file (two processes: the service and `import`)
/// appending at once: distinct seqs, nothing lost, no play reported as
/// a duplicate it was not, and each side's counters follow the other's
/// commits.
#[tokio::test]
async fn two_outboxes_on_one_file_append_concurrently_without_colliding() {
    let dir = tempfile::tempdir().unwrap();
    let a = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
    let b = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
    assert_eq!(a.outbox_id(), b.outbox_id());
    let writers: Vec<_> = [(a.clone(), 0i64), (b.clone(), 1_000_000)]
        .into_iter()
        .flat_map(|(ob, base)| {
            (0..8).map(move |t| {
                let ob = ob.clone();
                tokio::spawn(async move {
                    let mut inserted = 0;
                    for round in 0..10 {
                        let k0 = base + t * 1000 + round * 10;
                        let o = ob.append((k0..k0 + 10).map(|k| imp("s1", k)).collect()).await.unwrap();
                        assert_eq!(o.duplicates, 0, "new plays answered as duplicates");
                        inserted += o.inserted;
                    }
                    inserted
                })
            })
        })
        .collect();
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    assert_eq!(total, 1600);
    // Each handle sees the other's rows once it looks (a second call,
    // if the first was answered by the writer's last group).
    for ob in [&a, &b] {
        ob.refresh().await.unwrap();
        ob.refresh().await.unwrap();
    }
    assert_eq!(a.counts().unconfirmed, 1600);
    assert_eq!(b.counts().unconfirmed, 1600);
    let batch = Uuid::now_v7();
    let c = a.claim(10_000, 1 << 30, batch).await.unwrap();
    assert_eq!(
        c.seqs().to_vec(),
        (1..=1600).collect::<Vec<_>>(),
        "one seq per play, none skipped"
    );
    let mut array = b"[".to_vec();
    array.extend_from_slice(c.joined_bodies());
    array.push(b']');
    let bodies: Vec<Impression> = serde_json::from_slice(&array).unwrap();
    let ids: std::collections::HashSet<Uuid> = bodies.iter().map(|i| i.impression_id).collect();
    assert_eq!(ids.len(), 1600);
    // A retry through the other handle is a duplicate by impression id.
    let o = b.append(vec![imp("s1", 0)]).await.unwrap();
    assert_eq!((o.inserted, o.duplicates), (0, 1));
    let s = a.settle_batch(batch, SeqRange::compress(1..=1600)).await.unwrap();
    assert_eq!(s.settled, 1600);
    b.append(vec![imp("s1", 5_000_000)]).await.unwrap();
    let first = a.refresh().await.unwrap();
    let second = a.refresh().await.unwrap();
    assert!(first || second, "b's commit found within two calls");
    assert!(!a.refresh().await.unwrap(), "nothing new since");
    assert_eq!((a.counts().unconfirmed, a.counts().unsent), (1, 1));
    assert_eq!(a.stats().await.unwrap().next_seq, 1602);
    a.close().await;
    b.close().await;
}

/// `bytes` counts UTF-8 bytes everywhere (the limit is in bytes): an
/// append adds `body.len()`, so a settle and a reopen must take away and
/// recount bytes too, not characters (SQLite's `length()` of TEXT).
#[tokio::test]
async fn byte_counter_stays_in_bytes_for_non_ascii_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig::new(dir.path());
    let path = cfg.path();
    let ob = Outbox::open(cfg.clone(), "s1").unwrap();
    let plays: Vec<Impression> = (0..6)
        .map(|k| {
            let mut i = imp("s1", k);
            i.video_filename = "sponsor_café_été_ü.mp4".into();
            i.impression_id = schema::derive_impression_id("s1", &i.video_filename, i.played_at);
            i
        })
        .collect();
    ob.append(plays).await.unwrap();
    let file = open_connection(&path, 64).unwrap();
    let stored_bytes = |file: &Connection| -> u64 {
        let bodies: Vec<String> = file
            .prepare("SELECT body FROM outbox")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        bodies.iter().map(|b| b.len() as u64).sum()
    };
    assert!(file
        .query_row("SELECT body FROM outbox LIMIT 1", [], |r| r.get::<_, String>(0))
        .unwrap()
        .contains("café"));
    assert_eq!(ob.counts().bytes, stored_bytes(&file));
    let b = Uuid::now_v7();
    ob.claim(100, 1 << 20, b).await.unwrap();
    // A partial receipt takes its rows' bytes away.
    assert_eq!(
        ob.settle_batch(b, vec![SeqRange { first: 2, last: 3 }])
            .await
            .unwrap()
            .settled,
        2
    );
    assert_eq!(ob.counts().bytes, stored_bytes(&file));
    assert_eq!(ob.stats().await.unwrap().bytes, stored_bytes(&file));
    ob.close().await;
    // A reopen recounts bytes.
    let ob = Outbox::open(cfg, "s1").unwrap();
    assert_eq!(ob.counts().bytes, stored_bytes(&file));
    ob.close().await;
}

#[tokio::test]
async fn concurrent_appends_are_group_committed_with_distinct_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(OutboxConfig::new(dir.path()), "s1").unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|t| {
            let ob = ob.clone();
            tokio::spawn(async move { ob.append((0..20).map(|k| imp("s1", t * 1000 + k)).collect()).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().inserted, 20);
    }
    let c = ob.claim(10_000, 1 << 30, Uuid::now_v7()).await.unwrap();
    assert_eq!(c.seqs().to_vec(), (1..=1000).collect::<Vec<_>>());
    ob.close().await;
}

#[tokio::test]
async fn byte_limit_refuses_without_evicting() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = OutboxConfig::new(dir.path());
    cfg.max_bytes = 560; // two rows (~230 bytes each) fit, above the 80 % warning line
    let ob = Outbox::open(cfg, "s1").unwrap();
    ob.append(vec![imp("s1", 0), imp("s1", 1)]).await.unwrap();
    let e = ob.append((2..10).map(|k| imp("s1", k)).collect()).await.unwrap_err();
    assert!(matches!(e, OutboxError::Full { .. }), "{e}");
    assert_eq!(
        ob.counts().unconfirmed,
        2,
        "nothing of the refused append, nothing evicted"
    );
    assert!(ob.near_full());
    ob.close().await;
}
