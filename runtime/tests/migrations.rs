//! The migrations against a real PostgreSQL: each test gets a fresh database
//! (`#[sqlx::test]`), migrated with the same embedded migrator production uses.
//! And the migration files themselves: the baseline is pinned, so a change of
//! the schema is a new migration added after it, never an edit of one applied.

use sqlx::{PgPool, Row};

/// The migration files, in order, with the SHA-384 of their SQL (the checksum
/// sqlx records when it applies one, and refuses to run against if the file
/// changed). A new migration adds a line here; a baseline line never changes.
const MIGRATIONS: [(&str, &str); 4] = [
    (
        "20261207000001_impressions.sql",
        "bd65f38fa841ae2c3306efdc52d2afbc3e88a1f7afab53a36518c99b3762eb43d416af9749ca547e771afafed5df9443",
    ),
    (
        "20261207000002_catalogue.sql",
        "51072a2843725e650d5f4fff56c20d75b9f96adedac4c56cb4703320081efc8b696e12e0cafe586dcb9324c80862cc12",
    ),
    (
        "20261207000003_daily_rollup.sql",
        "737f61233718bba7633a716964f618fef6460163076699d5435a1197c5b1dd5160bcf7bb699e8f2c1e8219e8fdb6b700",
    ),
    (
        "20261207000004_sponsor_rollups.sql",
        "af58aaf9ea13c9522e3c292895b7419a7274b68e49269d56c6cf6c37608badda5a270196a252a8bc455cfdfe7d17c4fc",
    ),
];

#[test]
fn the_migration_files_are_exactly_the_baseline() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/migrations");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    let expected: Vec<String> = MIGRATIONS.iter().map(|(name, _)| name.to_string()).collect();
    assert_eq!(on_disk, expected, "the files of {}", dir.display());

    let embedded: Vec<(String, String)> = runtime::db::MIGRATOR
        .iter()
        .map(|m| {
            let sum: String = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
            (format!("{}_{}.sql", m.version, m.description.replace(' ', "_")), sum)
        })
        .collect();
    let pinned: Vec<(String, String)> = MIGRATIONS
        .iter()
        .map(|(name, sum)| (name.to_string(), sum.to_string()))
        .collect();
    assert_eq!(
        embedded, pinned,
        "an applied migration is never edited: change the schema with a new file after these"
    );
}

const INSERT: &str = "INSERT INTO sponsor_impressions
    (impression_id, site_id, seq, video_id, video_filename, played_at, duration_played, video_duration,
     completed, event_type, period, trigger_type, audience_estimate)
    VALUES ($1, $2, $3, $4, $5, $6::timestamptz, $7, $8, $9, $10, $11, 'auto', $12)";

#[allow(clippy::too_many_arguments)]
async fn insert(
    pool: &PgPool,
    site: &str,
    seq: i64,
    file: &str,
    at: &str,
    played: f64,
    completed: bool,
    period: &str,
    audience: i32,
) -> Result<u64, sqlx::Error> {
    let t = schema::parse_timestamp(at).unwrap();
    let id = schema::derive_impression_id(site, file, t);
    sqlx::query(INSERT)
        .bind(id)
        .bind(site)
        .bind(seq)
        .bind(None::<String>)
        .bind(file)
        .bind(at)
        .bind(played)
        .bind(30.0f64)
        .bind(completed)
        .bind("match")
        .bind(period)
        .bind(audience)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn tables_partitions_functions_and_view_exist(pool: PgPool) {
    for rel in [
        "sites",
        "sponsors",
        "videos",
        "sponsor_impressions",
        "sponsor_impressions_default",
        "impressions_rejected",
        "sponsor_daily_stats",
        "sponsor_daily_pending",
        "sponsor_analytics_summary",
        "video_attribution",
        "sponsor_stats_daily",
        "sponsor_video_daily",
        "sponsor_site_monthly",
        "sponsor_site_weekly",
        "sponsor_site_daily",
        "sponsor_site_daily_detail",
        "sponsor_rollup_pending",
    ] {
        let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(rel)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(found.as_deref(), Some(rel));
    }
    for f in [
        "create_impression_partitions",
        "drop_impression_partitions_older_than",
        "calculate_sponsor_daily_stats",
        "sponsor_daily_fold",
        "sponsor_rollups_fold",
        "sponsor_rollups_fold_sponsors",
        "sponsor_rollups_rebuild",
        "sponsor_rollups_recompute",
        "sponsor_of",
        "lock_rollup_days_shared",
        "site_seq_gaps",
    ] {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_proc WHERE proname = $1")
            .bind(f)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 1, "{f}");
    }
    let parts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_inherits WHERE inhparent = 'sponsor_impressions'::regclass")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(parts >= 15, "14 monthly partitions and the default, got {parts}");
    let pk: String = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'sponsor_impressions_pkey'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(pk, "PRIMARY KEY (site_id, played_at, impression_id)");
    // The SQL generators the sponsor rollups' migration writes its functions
    // with are temporary: none is left in the database.
    let generators: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_proc WHERE proname LIKE 'sponsor\\_%\\_sql'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(generators, 0);
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn replays_are_absorbed_and_constraints_hold(pool: PgPool) {
    let at = "2026-11-20T10:00:00Z";
    assert_eq!(
        insert(&pool, "s1", 1, "a.mp4", at, 30.0, true, "loop", 10)
            .await
            .unwrap(),
        1
    );
    let dup = insert(&pool, "s1", 1, "a.mp4", at, 30.0, true, "loop", 10)
        .await
        .unwrap_err();
    assert_eq!(dup.as_database_error().unwrap().code().as_deref(), Some("23505"));
    let bad_period = insert(&pool, "s1", 2, "b.mp4", at, 30.0, true, "intermission", 10)
        .await
        .unwrap_err();
    assert_eq!(bad_period.as_database_error().unwrap().code().as_deref(), Some("23514"));
    let bad_audience = insert(&pool, "s1", 3, "c.mp4", at, 30.0, true, "loop", -1)
        .await
        .unwrap_err();
    assert_eq!(
        bad_audience.as_database_error().unwrap().code().as_deref(),
        Some("23514")
    );
    let bad_site = sqlx::query("INSERT INTO sites (site_id) VALUES ('a/b')")
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(bad_site.as_database_error().unwrap().code().as_deref(), Some("23514"));
    sqlx::query("INSERT INTO sponsors VALUES ('x', 'X')")
        .execute(&pool)
        .await
        .unwrap();
    let bad_rule = sqlx::query("INSERT INTO videos (sponsor_id) VALUES ('x')")
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(
        bad_rule.as_database_error().unwrap().code().as_deref(),
        Some("23514"),
        "a rule needs video_id or pattern"
    );
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn plays_from_any_date_land_and_partitions_move_them(pool: PgPool) {
    insert(
        &pool,
        "s1",
        1,
        "old.mp4",
        "2021-03-05T12:00:00Z",
        10.0,
        false,
        "loop",
        0,
    )
    .await
    .unwrap();
    let part: String = sqlx::query_scalar("SELECT tableoid::regclass::text FROM sponsor_impressions WHERE seq = 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(part, "sponsor_impressions_default");
    let created: i32 = sqlx::query_scalar("SELECT create_impression_partitions('2021-03-01', 2)")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(created, 2);
    let again: i32 = sqlx::query_scalar("SELECT create_impression_partitions('2021-03-01', 2)")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(again, 0, "idempotent");
    let part: String = sqlx::query_scalar("SELECT tableoid::regclass::text FROM sponsor_impressions WHERE seq = 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(part, "sponsor_impressions_y2021m03");
    let dropped: Vec<String> = sqlx::query_scalar("SELECT * FROM drop_impression_partitions_older_than('2 years')")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        dropped,
        vec![
            "sponsor_impressions_y2021m03".to_string(),
            "sponsor_impressions_y2021m04".to_string()
        ]
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sponsor_impressions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn rollup_recompute_and_view_follow_the_catalogue(pool: PgPool) {
    let day = "2026-11-20";
    insert(
        &pool,
        "s1",
        1,
        "sponsor_coca_cola_30s.mp4",
        "2026-11-20T10:00:00Z",
        30.0,
        true,
        "halftime",
        150,
    )
    .await
    .unwrap();
    insert(
        &pool,
        "s2",
        1,
        "sponsor_coca_cola_15s.mp4",
        "2026-11-20T23:59:59.999Z",
        12.5,
        false,
        "loop",
        50,
    )
    .await
    .unwrap();
    insert(
        &pool,
        "s1",
        2,
        "sponsorXcocaXcola.mp4",
        "2026-11-20T11:00:00Z",
        30.0,
        true,
        "loop",
        5,
    )
    .await
    .unwrap();
    insert(
        &pool,
        "s1",
        3,
        "sponsor_coca_cola_30s.mp4",
        "2026-11-21T00:00:00Z",
        30.0,
        true,
        "loop",
        7,
    )
    .await
    .unwrap();
    let rows: i32 = sqlx::query_scalar("SELECT calculate_sponsor_daily_stats($1::date)")
        .bind(day)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 3);
    let again: i32 = sqlx::query_scalar("SELECT calculate_sponsor_daily_stats($1::date)")
        .bind(day)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(again, 3, "recompute is idempotent");
    let total: (i64, f64, i64, i64) = sqlx::query_as(
        "SELECT sum(impressions)::bigint, sum(seconds_played), sum(completed_count)::bigint, sum(audience_sum)::bigint
         FROM sponsor_daily_stats WHERE day = $1::date",
    )
    .bind(day)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(total, (3, 72.5, 2, 205));

    sqlx::query("INSERT INTO sponsors VALUES ('coca-cola', 'Coca-Cola')")
        .execute(&pool)
        .await
        .unwrap();
    // Before any rule, nothing is attributed.
    let row = sqlx::query("SELECT total_impressions FROM sponsor_analytics_summary WHERE sponsor_id = 'coca-cola'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(row.get::<i64, _>(0), 0);
    // A filename rule attributes past plays; `_` in the glob is literal.
    sqlx::query("INSERT INTO videos (sponsor_id, filename_pattern) VALUES ('coca-cola', 'sponsor_coca_cola_*')")
        .execute(&pool)
        .await
        .unwrap();
    let (n, secs, rate, sites): (i64, f64, f64, i64) = sqlx::query_as(
        "SELECT total_impressions, screen_time_seconds, completion_rate, sites_reached
         FROM sponsor_analytics_summary WHERE sponsor_id = 'coca-cola'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((n, secs, sites), (2, 42.5, 2));
    assert!((rate - 0.5).abs() < 1e-9);
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn sequence_gaps_are_visible(pool: PgPool) {
    for seq in [1, 2, 5, 6, 9] {
        insert(
            &pool,
            "s1",
            seq,
            &format!("v{seq}.mp4"),
            "2026-11-20T10:00:00Z",
            1.0,
            false,
            "loop",
            0,
        )
        .await
        .unwrap();
    }
    // seq 7 was refused: it is accounted for in the dead-letter table.
    sqlx::query(
        "INSERT INTO impressions_rejected (source, site_id, seq, reason_code, reason, payload)
         VALUES ('mqtt', 's1', 7, 'invalid_impression', 'test', '\\x00')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let gaps: Vec<(i64, i64, i64)> = sqlx::query_as("SELECT * FROM site_seq_gaps('s1')")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(gaps, vec![(3, 4, 2), (8, 8, 1)]);
}

/// One play queued for the daily rollup the ingestor's way (one delta per
/// transaction and key), for a play `insert` stored.
async fn queue_play(pool: &PgPool, site: &str, at: &str, played: f64, completed: bool, audience: i32) {
    sqlx::query(
        "INSERT INTO sponsor_daily_pending
         SELECT ($1::timestamptz AT TIME ZONE 'UTC')::date, $2, 'sponsor_coca_cola_30s.mp4', '', 'loop', 'match',
                1, $3, $4::int8, $5",
    )
    .bind(at)
    .bind(site)
    .bind(played)
    .bind(i64::from(completed))
    .bind(audience)
    .execute(pool)
    .await
    .unwrap();
}

/// (rows, sum of impressions, sum of seconds) of a rollup table or its queue.
async fn totals(pool: &PgPool, table: &str) -> (i64, i64, f64) {
    sqlx::query_as(&format!(
        "SELECT count(*), coalesce(sum(impressions), 0)::int8, coalesce(sum(seconds_played), 0)::float8 FROM {table}"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn fold(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT sponsor_rollups_fold()")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn summary_impressions(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT total_impressions FROM sponsor_analytics_summary WHERE sponsor_id = 'coca-cola'")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The daily rollup's queue (`…_daily_rollup.sql`). At every commit the
/// rollup plus the queue equals the raw rows; a fold moves the queue into the
/// rollup (merging the deltas of one key); a recompute of a day drops that
/// day's queued rows (the raw rows already hold them) and leaves other days'
/// queued; the seed's view counts queued rows without a fold; TRUNCATE of the
/// rollup empties the queue.
#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn daily_queue_folds_exactly_and_a_recompute_drops_only_its_day(pool: PgPool) {
    const FILE: &str = "sponsor_coca_cola_30s.mp4";
    const ROLLUP: &str = "sponsor_daily_stats";
    const QUEUE: &str = "sponsor_daily_pending";
    let plays = [
        ("s1", 1, "2026-11-20T10:00:00Z", 30.0, true, 100),
        ("s1", 2, "2026-11-20T10:01:00Z", 20.0, false, 50),
        ("s2", 1, "2026-11-21T10:00:00Z", 30.0, true, 7),
    ];
    for (site, seq, at, played, completed, audience) in plays {
        insert(&pool, site, seq, FILE, at, played, completed, "loop", audience)
            .await
            .unwrap();
        queue_play(&pool, site, at, played, completed, audience).await;
    }
    assert_eq!(totals(&pool, ROLLUP).await, (0, 0, 0.0));
    assert_eq!(totals(&pool, QUEUE).await, (3, 3, 80.0));

    // The seed's view counts the queue without a fold.
    sqlx::query("INSERT INTO sponsors VALUES ('coca-cola', 'Coca-Cola')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO videos (sponsor_id, filename_pattern) VALUES ('coca-cola', 'sponsor_coca_cola_*')")
        .execute(&pool)
        .await
        .unwrap();
    // (A catalogue change folds first: the queue is empty again.)
    assert_eq!(totals(&pool, QUEUE).await, (0, 0, 0.0));
    assert_eq!(
        totals(&pool, ROLLUP).await,
        (2, 3, 80.0),
        "two keys: one per day, deltas merged"
    );
    let view: (i64, i64) = sqlx::query_as(
        "SELECT total_impressions, sites_reached FROM sponsor_analytics_summary WHERE sponsor_id = 'coca-cola'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(view, (3, 2));

    // Two more plays queued, one on each day; the view counts them at once.
    for (site, seq, at) in [("s1", 3, "2026-11-20T11:00:00Z"), ("s2", 2, "2026-11-21T11:00:00Z")] {
        insert(&pool, site, seq, FILE, at, 10.0, false, "loop", 0)
            .await
            .unwrap();
        queue_play(&pool, site, at, 10.0, false, 0).await;
    }
    assert_eq!(
        summary_impressions(&pool).await,
        5,
        "queued plays are in the view before any fold"
    );

    // A recompute of 2026-11-20 takes that day's queued row into the rollup
    // once (from the raw rows) and leaves 2026-11-21's queued.
    sqlx::query("SELECT calculate_sponsor_daily_stats('2026-11-20')")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(totals(&pool, QUEUE).await, (1, 1, 10.0));
    assert_eq!(totals(&pool, ROLLUP).await, (2, 4, 90.0));
    let folded = fold(&pool).await;
    assert!(folded >= 1, "the fold reports what it consumed, got {folded}");
    assert_eq!(totals(&pool, QUEUE).await, (0, 0, 0.0));
    assert_eq!(totals(&pool, ROLLUP).await, (2, 5, 100.0));
    let per_sponsor: i64 = sqlx::query_scalar("SELECT sum(impressions)::int8 FROM sponsor_stats_daily")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(per_sponsor, 5, "the per-sponsor rollups follow the folded daily rollup");
    assert_eq!(fold(&pool).await, 0, "nothing left to fold");

    // TRUNCATE of the rollup empties its queue too.
    queue_play(&pool, "s1", "2026-11-22T10:00:00Z", 1.0, false, 0).await;
    sqlx::query("TRUNCATE sponsor_daily_stats")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(totals(&pool, QUEUE).await, (0, 0, 0.0));
}
