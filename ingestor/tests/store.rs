//! The write path on its own, against the real PostgreSQL: the binary COPY
//! stores every field as sent (NULLs, awkward text, microseconds), a second
//! write of the same rows is absorbed as duplicates (the optimistic COPY
//! falls back to ON CONFLICT), and the rollup counts each row once.

mod common;

use chrono::{Duration, Timelike};
use ingestor::store::{self, InsertMethod, Row, WriteSet};
use schema::{EventType, Impression, Period, TriggerType};
use sqlx::PgPool;
use uuid::Uuid;

fn awkward_rows() -> Vec<Row> {
    let base = common::now() - Duration::hours(5);
    let base = base.with_nanosecond(123_456_000).expect("valid");
    let names = [
        "plain.mp4",
        "tab\there.mp4",
        "back\\slash.mp4",
        "new\nline.mp4",
        "caf\u{e9} \u{1f3c9}.mp4",
    ];
    let batch = Uuid::now_v7();
    (0..20)
        .map(|k: i64| {
            let played_at = base + Duration::seconds(k * 31);
            let file = names[k as usize % names.len()];
            Row {
                imp: Impression {
                    impression_id: schema::derive_impression_id("club-a", file, played_at),
                    site_id: "club-a".into(),
                    seq: (k % 3 != 0).then_some(k + 1),
                    video_id: (k % 2 == 0).then(|| format!("vid-{k}")),
                    video_filename: file.into(),
                    played_at,
                    duration_played: 12.345 + k as f64,
                    video_duration: if k % 4 == 0 { 0.0 } else { 45.5 },
                    completed: k % 5 == 0,
                    event_type: [
                        EventType::Match,
                        EventType::Training,
                        EventType::Tournament,
                        EventType::Other,
                    ][k as usize % 4],
                    period: [Period::PreMatch, Period::Halftime, Period::PostMatch, Period::Loop][k as usize % 4],
                    trigger_type: if k % 2 == 0 {
                        TriggerType::Auto
                    } else {
                        TriggerType::Manual
                    },
                    audience_estimate: (k % 3 != 1).then_some(100 * k as i32),
                },
                batch_id: (k % 2 == 1).then_some(batch),
                origin: 0,
            }
        })
        .collect()
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Stored {
    impression_id: Uuid,
    site_id: String,
    seq: Option<i64>,
    video_id: Option<String>,
    video_filename: String,
    played_at: chrono::DateTime<chrono::Utc>,
    duration_played: f64,
    video_duration: f64,
    completed: bool,
    event_type: String,
    period: String,
    trigger_type: String,
    audience_estimate: Option<i32>,
    batch_id: Option<Uuid>,
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn binary_copy_stores_every_field_and_a_rewrite_is_all_duplicates(pool: PgPool) {
    let rows = awkward_rows();
    let set = WriteSet {
        rows: rows.clone(),
        dead: vec![],
        sites: vec!["club-a".into()],
    };
    let out = store::write(&pool, &set, InsertMethod::Copy).await.unwrap();
    assert_eq!(out.inserted(), rows.len());

    let stored: Vec<Stored> = sqlx::query_as(
        "SELECT impression_id, site_id, seq, video_id, video_filename, played_at, duration_played, video_duration,
                completed, event_type, period, trigger_type, audience_estimate, batch_id
         FROM sponsor_impressions ORDER BY played_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), rows.len());
    for (r, s) in rows.iter().zip(&stored) {
        let i = &r.imp;
        let expected = Stored {
            impression_id: i.impression_id,
            site_id: i.site_id.clone(),
            seq: i.seq,
            video_id: i.video_id.clone(),
            video_filename: i.video_filename.clone(),
            played_at: i.played_at,
            duration_played: i.duration_played,
            video_duration: i.video_duration,
            completed: i.completed,
            event_type: i.event_type.as_str().to_owned(),
            period: i.period.as_str().to_owned(),
            trigger_type: i.trigger_type.as_str().to_owned(),
            audience_estimate: i.audience_estimate,
            batch_id: r.batch_id,
        };
        assert_eq!(&expected, s);
    }

    // The same rows again (a redelivery): nothing new, rollup unchanged.
    let again = store::write(&pool, &set, InsertMethod::Copy).await.unwrap();
    assert_eq!(again.inserted(), 0);
    assert_eq!(again.new.len(), rows.len());
    sqlx::query("SELECT sponsor_rollups_fold()")
        .execute(&pool)
        .await
        .unwrap();
    let (n, rollup): (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM sponsor_impressions), (SELECT sum(impressions)::int8 FROM sponsor_daily_stats)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((n, rollup), (rows.len() as i64, Some(rows.len() as i64)));
    common::assert_rollup_matches(&pool).await;

    // Half old, half new: exactly the new half is inserted and counted.
    let mut mixed = rows[..10].to_vec();
    for mut r in rows[..10].iter().cloned() {
        r.imp.played_at += Duration::days(1);
        r.imp.impression_id = schema::derive_impression_id("club-a", &r.imp.video_filename, r.imp.played_at);
        mixed.push(r);
    }
    let set = WriteSet {
        rows: mixed,
        dead: vec![],
        sites: vec![],
    };
    let out = store::write(&pool, &set, InsertMethod::Copy).await.unwrap();
    assert_eq!(out.new, [vec![false; 10], vec![true; 10]].concat());
    common::assert_rollup_matches(&pool).await;
}

/// A row the database refuses for good (here a CHECK that validation would
/// have caught; the write path must hold even when it does not) is isolated
/// by bisection and dead-lettered with PostgreSQL's reason, and every other
/// row of the batch commits; nothing loops.
#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn a_permanent_database_error_dead_letters_only_the_offending_row(pool: PgPool) {
    let mut rows = awkward_rows();
    for (k, r) in rows.iter_mut().enumerate() {
        r.origin = k / 5; // four messages of five rows
    }
    let bad = 7;
    rows[bad].imp.duration_played = -1.0;
    let set = WriteSet {
        rows: rows.clone(),
        dead: vec![],
        sites: vec!["club-a".into()],
    };
    let out = store::write(&pool, &set, InsertMethod::Copy).await.unwrap();
    assert_eq!(out.inserted(), rows.len() - 1);
    assert_eq!(out.refused.len(), 1);
    assert_eq!(out.refused[0].0, bad);
    assert!(!out.new[bad]);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM sponsor_impressions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, rows.len() as i64 - 1);
    let (code, reason, id): (String, String, Option<Uuid>) =
        sqlx::query_as("SELECT reason_code, reason, impression_id FROM impressions_rejected")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(code, "db_error");
    assert!(reason.contains("check constraint"), "{reason}");
    assert_eq!(id, Some(rows[bad].imp.impression_id));
    common::assert_rollup_matches(&pool).await;
}
