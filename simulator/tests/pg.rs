//! The COPY baseline, the summary and the exactly-once check against a real
//! PostgreSQL (each test its own database).

use chrono::NaiveDate;
use simulator::catalogue::Catalogue;
use simulator::pg;
use simulator::plays::{generate, FleetSpec};
use sqlx::PgPool;

fn fleet() -> Vec<simulator::plays::SitePlays> {
    let spec = FleetSpec {
        sites: 4,
        plays_per_site: 300,
        seed: 11,
        end_day: NaiveDate::from_ymd_opt(2026, 11, 20).unwrap(),
        site_prefix: "pgtest".into(),
    };
    generate(&spec, &Catalogue::standard())
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn copy_baseline_then_reconcile_finds_every_difference(pool: PgPool) {
    let sites = fleet();
    let cat = Catalogue::standard();
    pg::insert_catalogue(&pool, &cat, &sites).await.unwrap();
    let rows: Vec<_> = sites.iter().flat_map(|s| s.plays.iter()).collect();
    // The server's CPU is only read when asked (a remote server's is not ours).
    let run = pg::copy_baseline(&pool, &rows, 500, false).await.unwrap();
    assert_eq!(run.rows, 1200);
    assert!(run.cpu.postgres_s.is_none());
    assert!(run.cpu.ours_s().is_some() && run.cpu.wall_s > 0.0);

    // COPY bypasses the rollup: the check says so.
    let rec = pg::reconcile(&pool, rows.iter().copied()).await.unwrap();
    assert_eq!((rec.played, rec.stored, rec.rollup_impressions), (1200, 1200, 0));
    assert!(!rec.is_exact());

    // Recompute the rollup from the raw rows: now exact, field by field.
    sqlx::query("SELECT calculate_sponsor_daily_stats(d::date) FROM (SELECT DISTINCT (played_at AT TIME ZONE 'UTC')::date AS d FROM sponsor_impressions) x")
        .execute(&pool)
        .await
        .unwrap();
    let rec = pg::reconcile(&pool, rows.iter().copied()).await.unwrap();
    assert!(rec.is_exact(), "{}", rec.diff(5));

    // Summary: every play attributed, the club video unattributed.
    let ids: Vec<String> = sites.iter().map(|s| s.site_id.clone()).collect();
    let summary = pg::sponsor_summary(&pool, &ids).await.unwrap();
    assert_eq!(summary.iter().map(|l| l.impressions).sum::<i64>(), 1200);
    assert_eq!(summary[0].sponsor_id, "coca_cola", "most popular first");
    assert!(summary.iter().any(|l| l.sponsor_id == "(none)"));
    let table = pg::format_summary(&summary);
    assert!(table.contains("Coca-Cola") && table.contains("TOTAL"), "{table}");

    // A lost row, an altered row and a duplicate (same id, other played_at) are all reported.
    let lost = rows[10];
    let altered = rows[20];
    let dup = rows[30];
    sqlx::query("DELETE FROM sponsor_impressions WHERE impression_id = $1")
        .bind(lost.impression_id)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE sponsor_impressions SET duration_played = duration_played + 1 WHERE impression_id = $1")
        .bind(altered.impression_id)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO sponsor_impressions SELECT impression_id, site_id, seq, video_id, video_filename, played_at + interval '1 second',
         duration_played, video_duration, completed, event_type, period, trigger_type, audience_estimate, batch_id, received_at
         FROM sponsor_impressions WHERE impression_id = $1",
    )
    .bind(dup.impression_id)
    .execute(&pool)
    .await
    .unwrap();
    let rec = pg::reconcile(&pool, rows.iter().copied()).await.unwrap();
    assert_eq!(rec.missing, vec![(lost.site_id.clone(), lost.impression_id)]);
    assert_eq!(rec.mismatched.len(), 1);
    assert_eq!(rec.mismatched[0].0, altered.impression_id);
    assert_eq!(rec.duplicates, vec![(dup.site_id.clone(), dup.impression_id, 2)]);
    assert_eq!(rec.duplicate_rows(), 1);
    assert!(rec.diff(5).contains("missing"));
}

#[test]
fn database_url_rewrite() {
    assert_eq!(
        pg::with_database("postgres://postgres@127.0.0.1:5432/postgres", "neopro_demo").unwrap(),
        "postgres://postgres@127.0.0.1:5432/neopro_demo"
    );
    assert_eq!(pg::redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
}
