//! The stats API, exports and catalogue against a real PostgreSQL: figures
//! compared with an independent computation from the raw rows.

mod common;
use common::*;
use serde_json::json;
use sqlx::PgPool;

/// Three months of plays, 6 sites, rules by video_id and by filename.
async fn fixture(pool: &PgPool) -> (TestApp, Vec<Play>) {
    let app = TestApp::start(pool.clone()).await;
    seed_catalogue(&app).await;
    let plays = random_plays(11, 3000, day("2026-08-20"), 90, 6);
    insert_plays(pool, &plays).await;
    recompute_days(pool, &plays).await;
    (app, plays)
}

async fn check(app: &TestApp, plays: &[Play], sponsor: &str, f: &Filter<'_>, ctx: &str) -> serde_json::Value {
    let rules = rules(&app.pool).await;
    let s = app
        .json(&format!("/api/analytics/sponsors/{sponsor}/stats?{}", f.query()))
        .await;
    let e = expected(plays, &rules, sponsor, f);
    assert!(
        e.total.impressions > 0 || ctx.contains("empty"),
        "{ctx}: fixture has plays"
    );
    assert_stats(ctx, &s, &e, f);
    s
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn stats_equal_raw_rows_for_ranges_filters_late_plays_and_catalogue_changes(pool: PgPool) {
    let (app, mut plays) = fixture(&pool).await;
    let ranges = [
        ("2026-08-20", "2026-11-17"), // everything, whole months inside (monthly rollup + edges)
        ("2026-09-01", "2026-10-31"), // exactly two whole months
        ("2026-09-14", "2026-10-03"), // mid-month to mid-month
        ("2026-10-05", "2026-10-05"), // a single day
        ("2026-08-27", "2026-10-12"), // days + ISO weeks + a whole month + weeks + days
    ];
    for sponsor in ["coca-cola", "adidas"] {
        for (a, b) in ranges {
            let f = Filter {
                from: day(a),
                to: day(b),
                site_id: None,
                event_type: None,
                period: None,
            };
            check(&app, &plays, sponsor, &f, &format!("{sponsor} {a}..{b}")).await;
        }
        let (a, b) = ranges[0];
        for f in [
            Filter {
                from: day(a),
                to: day(b),
                site_id: Some("site-3"),
                event_type: None,
                period: None,
            },
            Filter {
                from: day(a),
                to: day(b),
                site_id: None,
                event_type: Some("match"),
                period: None,
            },
            Filter {
                from: day(a),
                to: day(b),
                site_id: None,
                event_type: None,
                period: Some("halftime"),
            },
            Filter {
                from: day("2026-09-10"),
                to: day("2026-10-20"),
                site_id: Some("site-1"),
                event_type: Some("training"),
                period: Some("loop"),
            },
        ] {
            let ctx = format!("{sponsor} filtered {}", f.query());
            check(&app, &plays, sponsor, &f, &ctx).await;
        }
    }

    // Plays attributed only by filename rule are counted.
    let s = app
        .json("/api/analytics/sponsors/coca-cola/stats?from=2026-08-20&to=2026-11-17")
        .await;
    let by_rule: i64 = s["top_videos"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["video_filename"].as_str().unwrap().starts_with("sponsor_coca_cola_"))
        .map(|v| v["impressions"].as_i64().unwrap())
        .sum();
    assert!(by_rule > 0, "filename-rule plays are attributed");

    // A box back after a week offline: late plays into past days, written
    // the ingestor's way (deltas queued for the daily rollup).
    let late = random_plays(99, 400, day("2026-10-01"), 7, 8);
    ingest_like_ingestor(&pool, &late).await;
    plays.extend(late);
    for (a, b) in [
        ("2026-08-20", "2026-11-17"),
        ("2026-10-01", "2026-10-07"),
        ("2026-09-14", "2026-10-03"),
    ] {
        let f = Filter {
            from: day(a),
            to: day(b),
            site_id: None,
            event_type: None,
            period: None,
        };
        check(&app, &plays, "coca-cola", &f, &format!("after late plays {a}..{b}")).await;
    }
    // A recompute of a day (repair) leaves the figures unchanged.
    sqlx::query("SELECT calculate_sponsor_daily_stats('2026-10-03')")
        .execute(&pool)
        .await
        .unwrap();
    let f = Filter {
        from: day("2026-08-20"),
        to: day("2026-11-17"),
        site_id: None,
        event_type: Some("other"),
        period: None,
    };
    check(&app, &plays, "adidas", &f, "after recompute").await;

    // Changing the catalogue re-attributes the past: a more specific rule
    // moves the coca-cola goal clip to adidas; deleting it moves it back.
    let r = app
        .post_json(
            "/api/sponsors/adidas/videos",
            json!({"filename_pattern": "sponsor_coca_cola_goal*"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let rule: serde_json::Value = r.json().await.unwrap();
    let f = Filter {
        from: day("2026-08-20"),
        to: day("2026-11-17"),
        site_id: None,
        event_type: None,
        period: None,
    };
    let moved = check(&app, &plays, "adidas", &f, "after moving a clip").await;
    assert!(moved["top_videos"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["video_filename"] == "sponsor_coca_cola_goal.mp4"));
    check(&app, &plays, "coca-cola", &f, "coca-cola after moving a clip").await;
    let r = app
        .client
        .delete(format!("{}/api/sponsors/adidas/videos/{}", app.base, rule["id"]))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    check(&app, &plays, "coca-cola", &f, "coca-cola after deleting the rule").await;

    // A video nobody owned (club_intro.mp4) becomes attributed when a
    // matching rule is added later: its past plays move to the sponsor.
    let r = app
        .post_json("/api/sponsors/adidas/videos", json!({"filename_pattern": "club_*"}))
        .await;
    assert_eq!(r.status(), 201);
    let s = check(
        &app,
        &plays,
        "adidas",
        &f,
        "adidas after a rule for an unattributed video",
    )
    .await;
    assert!(s["top_videos"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["video_filename"] == "club_intro.mp4"));

    // A catalogue change made directly in SQL (not through the API) is seen too:
    // the explicit cc-2 moves to adidas.
    sqlx::query("UPDATE videos SET sponsor_id = 'adidas' WHERE video_id = 'cc-2'")
        .execute(&pool)
        .await
        .unwrap();
    for sponsor in ["adidas", "coca-cola"] {
        check(&app, &plays, sponsor, &f, &format!("{sponsor} after a change in SQL")).await;
        let f2 = Filter {
            from: day("2026-09-14"),
            to: day("2026-10-03"),
            site_id: None,
            event_type: None,
            period: Some("loop"),
        };
        check(
            &app,
            &plays,
            sponsor,
            &f2,
            &format!("{sponsor} loop after a change in SQL"),
        )
        .await;
    }

    // ... and one made by the CSV import (moves the club_* rule to coca-cola).
    let r = app
        .post_csv(
            "/api/catalogue/import",
            "sponsor_id,sponsor_name,video_id,filename_pattern\ncoca-cola,Coca-Cola,,club_*\n",
        )
        .await;
    assert_eq!(r.status(), 200);
    for sponsor in ["adidas", "coca-cola"] {
        check(&app, &plays, sponsor, &f, &format!("{sponsor} after the CSV import")).await;
    }

    // A video first played after its rule exists is attributed on arrival,
    // including late plays into past days.
    let mut fresh = random_plays(123, 300, day("2026-09-25"), 12, 5);
    for (i, p) in fresh.iter_mut().enumerate() {
        p.video_id = None;
        p.video_filename = if i % 2 == 0 {
            "sponsor_adidas_new_spot.mp4".into()
        } else {
            "sponsor_coca_cola_new_spot.mp4".into()
        };
    }
    ingest_like_ingestor(&pool, &fresh).await;
    plays.extend(fresh);
    for sponsor in ["adidas", "coca-cola"] {
        check(&app, &plays, sponsor, &f, &format!("{sponsor} after new videos")).await;
        let f2 = Filter {
            from: day("2026-09-20"),
            to: day("2026-10-10"),
            site_id: None,
            event_type: Some("tournament"),
            period: None,
        };
        check(
            &app,
            &plays,
            sponsor,
            &f2,
            &format!("{sponsor} tournament after new videos"),
        )
        .await;
    }

    // Deleting a sponsor unattributes its plays (its rules cascade).
    sqlx::query("DELETE FROM sponsors WHERE id = 'adidas'")
        .execute(&pool)
        .await
        .unwrap();
    check(&app, &plays, "coca-cola", &f, "coca-cola after deleting adidas").await;
    let gone: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(impressions), 0)::int8 FROM sponsor_stats_daily WHERE sponsor_id = 'adidas'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(gone, 0);

    // The rollups and the map equal a recomputation from sponsor_daily_stats
    // with sponsor_of() (independent of video_attribution), and a rebuild
    // changes nothing.
    assert_rollups_exact(&pool).await;
    sqlx::query("SELECT sponsor_rollups_rebuild()")
        .execute(&pool)
        .await
        .unwrap();
    assert_rollups_exact(&pool).await;
    check(&app, &plays, "coca-cola", &f, "coca-cola after a rebuild").await;

    // The UPDATE trigger appends one delta per key (new - old, joined on the
    // key). No writer changes key columns today; if one did, the old keys must
    // leave the rollups and the new ones arrive. Then a counters-only UPDATE,
    // the ingestor's case. (sponsor_daily_stats no longer matches the raw
    // rows after this, so only the rollups are compared with it.)
    let moved = sqlx::query(
        "UPDATE sponsor_daily_stats SET day = day + 400, period = 'halftime'
         WHERE site_id = (SELECT min(site_id) FROM sponsor_daily_stats) AND period = 'loop'",
    )
    .execute(&pool)
    .await
    .unwrap()
    .rows_affected();
    assert!(moved > 0, "the fixture has loop rows to move");
    let bumped = sqlx::query(
        "UPDATE sponsor_daily_stats SET impressions = impressions + 2, completed_count = completed_count + 1,
                seconds_played = seconds_played + 12.5, audience_sum = audience_sum + 40
         WHERE event_type = 'match'",
    )
    .execute(&pool)
    .await
    .unwrap()
    .rows_affected();
    assert!(bumped > 0, "the fixture has match rows");
    assert_rollups_exact(&pool).await;
}

async fn assert_rollups_exact(pool: &PgPool) {
    // Readers fold the queue of deltas before they read; so does this check.
    sqlx::query("SELECT sponsor_rollups_fold()")
        .execute(pool)
        .await
        .unwrap();
    let att = "(SELECT video_filename, video_id, sponsor_of(nullif(video_id, ''), video_filename) AS sponsor_id
                FROM (SELECT DISTINCT video_filename, video_id FROM sponsor_daily_stats) v)";
    let map_diff: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM (
           (SELECT * FROM {att} a EXCEPT SELECT video_filename, video_id, sponsor_id FROM video_attribution)
           UNION ALL
           (SELECT video_filename, video_id, sponsor_id FROM video_attribution EXCEPT SELECT * FROM {att} a)) x"
    ))
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(map_diff, 0, "video_attribution");
    for (table, key, expr) in [
        (
            "sponsor_stats_daily",
            "day, period, event_type",
            "day, period, event_type",
        ),
        (
            "sponsor_video_daily",
            "day, video_filename, video_id, period, event_type",
            "day, s.video_filename, s.video_id, period, event_type",
        ),
        (
            "sponsor_site_monthly",
            "month, site_id",
            "date_trunc('month', day::timestamp)::date, site_id",
        ),
        (
            "sponsor_site_weekly",
            "week, site_id",
            "date_trunc('week', day::timestamp)::date, site_id",
        ),
        ("sponsor_site_daily", "day, site_id", "day, site_id"),
        (
            "sponsor_site_daily_detail",
            "period, event_type, day, site_id",
            "period, event_type, day, site_id",
        ),
    ] {
        let sql = format!(
            "WITH want AS (
               SELECT a.sponsor_id, {expr}, sum(impressions)::int8 AS n, sum(completed_count)::int8 AS c,
                      sum(audience_sum)::int8 AS au, round(sum(seconds_played)::numeric, 3) AS secs
               FROM sponsor_daily_stats s JOIN {att} a
                 ON a.video_filename = s.video_filename AND a.video_id = s.video_id
               WHERE a.sponsor_id IS NOT NULL GROUP BY 1, {expr}),
             got AS (
               SELECT sponsor_id, {key}, impressions, completed_count, audience_sum,
                      round(seconds_played::numeric, 3) FROM {table} WHERE impressions <> 0)
             SELECT (SELECT count(*) FROM (SELECT * FROM want EXCEPT SELECT * FROM got) x)
                  + (SELECT count(*) FROM (SELECT * FROM got EXCEPT SELECT * FROM want) y)"
        );
        let diff: i64 = sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap();
        assert_eq!(diff, 0, "{table} equals its recomputation");
        let zero_with_figures: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE impressions = 0 AND (completed_count <> 0 OR audience_sum <> 0)"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(zero_with_figures, 0, "{table}: emptied rows are all zero");
    }
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn csv_and_playout_exports_parse_back_to_the_same_figures(pool: PgPool) {
    let (app, plays) = fixture(&pool).await;
    let q = "from=2026-09-14&to=2026-10-20";
    let s = app.json(&format!("/api/analytics/sponsors/coca-cola/stats?{q}")).await;

    // stats.csv
    let r = app
        .get(&format!("/api/analytics/sponsors/coca-cola/stats.csv?{q}"))
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let text = r.text().await.unwrap();
    let mut rdr = csv::Reader::from_reader(text.as_bytes());
    assert_eq!(
        rdr.headers().unwrap().iter().collect::<Vec<_>>(),
        analytics::export::STATS_CSV_HEADER
    );
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    let total = rows.iter().find(|r| &r[0] == "total").unwrap();
    assert_eq!(total[1].to_string(), "coca-cola");
    assert_eq!(
        total[3].parse::<i64>().unwrap(),
        s["total_impressions"].as_i64().unwrap()
    );
    assert_eq!(
        total[4].parse::<f64>().unwrap(),
        s["screen_time_seconds"].as_f64().unwrap()
    );
    assert_eq!(total[5].parse::<i64>().unwrap(), s["completed"].as_i64().unwrap());
    assert_eq!(total[6].parse::<f64>().unwrap(), s["completion_rate"].as_f64().unwrap());
    assert_eq!(
        total[7].parse::<i64>().unwrap(),
        s["audience_reached"].as_i64().unwrap()
    );
    assert_eq!(total[8].parse::<i64>().unwrap(), s["sites_reached"].as_i64().unwrap());
    for (section, list, key) in [
        ("period", &s["by_period"], "key"),
        ("event_type", &s["by_event_type"], "key"),
        ("site", &s["by_site"], "site_id"),
        ("day", &s["daily"], "day"),
    ] {
        let list = list.as_array().unwrap();
        let csv_rows: Vec<_> = rows.iter().filter(|r| &r[0] == section).collect();
        assert_eq!(csv_rows.len(), list.len(), "{section} rows");
        for (row, item) in csv_rows.iter().zip(list) {
            assert_eq!(&row[1], item[key].as_str().unwrap());
            assert_eq!(row[3].parse::<i64>().unwrap(), item["impressions"].as_i64().unwrap());
            assert_eq!(row[5].parse::<i64>().unwrap(), item["completed"].as_i64().unwrap());
            assert_eq!(row[7].parse::<i64>().unwrap(), item["audience"].as_i64().unwrap());
        }
    }

    // playouts.csv: one row per raw play of the sponsor in range.
    let r = app
        .get(&format!("/api/analytics/sponsors/coca-cola/playouts.csv?{q}"))
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let mut rdr = csv::Reader::from_reader(text.as_bytes());
    assert_eq!(
        rdr.headers().unwrap().iter().collect::<Vec<_>>(),
        analytics::export::PLAYOUT_CSV_HEADER
    );
    let rules = rules(&pool).await;
    let f = Filter {
        from: day("2026-09-14"),
        to: day("2026-10-20"),
        site_id: None,
        event_type: None,
        period: None,
    };
    let e = expected(&plays, &rules, "coca-cola", &f);
    let mut ids = std::collections::HashSet::new();
    let (mut n, mut secs, mut completed, mut audience) = (0i64, 0f64, 0i64, 0i64);
    let mut sites = std::collections::BTreeSet::new();
    let mut prev_start = String::new();
    for rec in rdr.records() {
        let rec = rec.unwrap();
        n += 1;
        assert!(ids.insert(rec[0].to_string()), "playout_id unique");
        let start = chrono::DateTime::parse_from_rfc3339(&rec[3]).unwrap();
        let end = chrono::DateTime::parse_from_rfc3339(&rec[4]).unwrap();
        assert!(
            rec[3].ends_with("+00:00") && rec[4].ends_with("+00:00"),
            "explicit UTC offset: {}",
            &rec[3]
        );
        let dur: f64 = rec[5].parse().unwrap();
        assert!(((end - start).num_microseconds().unwrap() as f64 / 1e6 - dur).abs() < 1e-5);
        assert!(rec[3] >= *prev_start, "ordered by start");
        prev_start = rec[3].to_string();
        assert_eq!(&rec[9], "coca-cola");
        secs += dur;
        completed += (&rec[13] == "true") as i64;
        audience += rec[17].parse::<i64>().unwrap_or(0);
        sites.insert(rec[7].to_string());
        let d = start.date_naive();
        assert!(d >= f.from && d <= f.to);
    }
    assert_eq!(n, e.total.impressions);
    assert_eq!(n, s["total_impressions"].as_i64().unwrap());
    assert_eq!(completed, e.total.completed);
    assert_eq!(audience, e.total.audience);
    assert!((secs - e.total.seconds).abs() < 0.01);
    assert_eq!(sites.len() as i64, s["sites_reached"].as_i64().unwrap());
    let expected_ids: std::collections::HashSet<String> = plays
        .iter()
        .filter(|p| {
            let d = p.played_at.date_naive();
            d >= f.from && d <= f.to && attribute(&rules, p).as_deref() == Some("coca-cola")
        })
        .map(|p| p.impression_id.to_string())
        .collect();
    assert_eq!(
        ids, expected_ids,
        "playout ids are exactly the sponsor's impression ids"
    );

    // Filtered playouts agree with filtered stats.
    let r = app
        .get("/api/analytics/sponsors/adidas/playouts.csv?from=2026-08-20&to=2026-11-17&period=halftime&site_id=site-2")
        .await;
    let text = r.text().await.unwrap();
    let n = csv::Reader::from_reader(text.as_bytes()).records().count() as i64;
    let s = app
        .json("/api/analytics/sponsors/adidas/stats?from=2026-08-20&to=2026-11-17&period=halftime&site_id=site-2")
        .await;
    assert_eq!(n, s["total_impressions"].as_i64().unwrap());
    assert!(n > 0);
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn pdf_report_is_valid_and_contains_the_kpis(pool: PgPool) {
    let (app, _plays) = fixture(&pool).await;
    let q = "from=2026-09-01&to=2026-10-31";
    let s = app.json(&format!("/api/analytics/sponsors/coca-cola/stats?{q}")).await;
    let r = app
        .get(&format!("/api/analytics/sponsors/coca-cola/report.pdf?{q}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/pdf");
    let bytes = r.bytes().await.unwrap();
    assert!(bytes.starts_with(b"%PDF-"));
    let doc = lopdf::Document::load_mem(&bytes).expect("a parseable PDF");
    let pages: Vec<u32> = doc.get_pages().keys().copied().collect();
    assert_eq!(pages.len(), 2);
    let text = doc.extract_text(&pages).unwrap();
    let mut wanted = vec![
        "Coca-Cola".to_owned(),
        "2026-09-01".to_owned(),
        "2026-10-31".to_owned(),
        analytics::pdf::fmt_int(s["total_impressions"].as_i64().unwrap()),
        analytics::pdf::fmt_int(s["completed"].as_i64().unwrap()),
        analytics::pdf::fmt_rate(s["completion_rate"].as_f64().unwrap()),
        analytics::pdf::fmt_int(s["sites_reached"].as_i64().unwrap()),
        analytics::pdf::fmt_int(s["audience_reached"].as_i64().unwrap()),
        format!(
            "{} s",
            analytics::pdf::fmt_int(s["screen_time_seconds"].as_f64().unwrap().round() as i64)
        ),
        "Daily impressions".to_owned(),
        "By period".to_owned(),
        "halftime".to_owned(),
        "Top videos".to_owned(),
        "sponsor_coca_cola_goal.mp4".to_owned(),
    ];
    for w in &wanted {
        assert!(text.contains(w.as_str()), "PDF text lacks {w:?}:\n{text}");
    }
    // Cross-check with poppler when installed (.ci/extra-setup installs it).
    if std::path::Path::new("/usr/bin/pdftotext").exists() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r.pdf");
        std::fs::write(&f, &bytes).unwrap();
        let out = std::process::Command::new("/usr/bin/pdftotext")
            .arg(&f)
            .arg("-")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pdftotext: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let t = String::from_utf8_lossy(&out.stdout);
        wanted.truncate(9);
        for w in &wanted {
            assert!(t.contains(w.as_str()), "pdftotext output lacks {w:?}");
        }
    } else {
        eprintln!("pdftotext not installed: run .ci/extra-setup for the poppler cross-check");
    }
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn auth_and_error_cases(pool: PgPool) {
    let app = TestApp::start(pool.clone()).await;
    seed_catalogue(&app).await;
    let url = |p: &str| format!("{}{}", app.base, p);
    // 401 without or with a wrong token, on the API and every export.
    for p in [
        "/api/sponsors",
        "/api/analytics/sponsors/coca-cola/stats",
        "/api/analytics/sponsors/coca-cola/stats.csv",
        "/api/analytics/sponsors/coca-cola/report.pdf",
        "/api/analytics/sponsors/coca-cola/playouts.csv",
    ] {
        assert_eq!(app.client.get(url(p)).send().await.unwrap().status(), 401, "{p}");
        assert_eq!(
            app.client
                .get(url(p))
                .bearer_auth("nope")
                .send()
                .await
                .unwrap()
                .status(),
            401,
            "{p}"
        );
    }
    let r = app
        .client
        .post(url("/api/sponsors"))
        .json(&json!({"id": "x", "name": "X"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Open endpoints.
    assert_eq!(app.client.get(url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(app.client.get(url("/metrics")).send().await.unwrap().status(), 200);
    let page = app
        .client
        .get(url("/sponsors/coca-cola/analytics"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("kpi-total-impressions"));
    let js = app.client.get(url("/assets/chart.umd.min.js")).send().await.unwrap();
    assert!(js.text().await.unwrap().contains("Chart.js v4"));
    // 404 unknown sponsor, on stats and exports.
    for p in ["stats", "stats.csv", "report.pdf", "playouts.csv"] {
        let r = app
            .get(&format!(
                "/api/analytics/sponsors/pepsi/{p}?from=2026-01-01&to=2026-01-31"
            ))
            .await;
        assert_eq!(r.status(), 404, "{p}");
    }
    // 400 naming the parameter.
    for (q, param) in [
        ("from=2026-02-30&to=2026-03-01", "from"),
        ("from=2026-01-01&to=tomorrow", "to"),
        ("from=2026-03-01&to=2026-01-01", "from"),
        ("from=2026-01-01&to=2026-01-31&period=overtime", "period"),
        ("from=2026-01-01&to=2026-01-31&event_type=party", "event_type"),
        ("from=2026-01-01&to=2026-01-31&site_id=a%20b", "site_id"),
    ] {
        for p in ["stats", "playouts.csv"] {
            let r = app.get(&format!("/api/analytics/sponsors/coca-cola/{p}?{q}")).await;
            assert_eq!(r.status(), 400, "{p}?{q}");
            let b: serde_json::Value = r.json().await.unwrap();
            assert_eq!(b["parameter"], param, "{q}: {b}");
            assert!(b["error"].as_str().unwrap().contains(param));
        }
    }
    // An empty range is fine and all zeros.
    let s = app
        .json("/api/analytics/sponsors/coca-cola/stats?from=2020-01-01&to=2020-01-03")
        .await;
    assert_eq!(s["total_impressions"], 0);
    assert_eq!(s["completion_rate"], 0.0);
    assert_eq!(s["daily"].as_array().unwrap().len(), 3);
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn catalogue_endpoints_and_bulk_import(pool: PgPool) {
    let app = TestApp::start(pool.clone()).await;
    let r = app
        .post_json("/api/sponsors", json!({"id": "coca-cola", "name": "Coca-Cola"}))
        .await;
    assert_eq!(r.status(), 201);
    let r = app
        .post_json("/api/sponsors", json!({"id": "coca-cola", "name": "Again"}))
        .await;
    assert_eq!(r.status(), 409);
    let r = app
        .post_json("/api/sponsors", json!({"id": "bad id", "name": "X"}))
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["parameter"], "id");
    let r = app.post_json("/api/sponsors", json!({"id": "x"})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["parameter"], "name");
    let r = app
        .post_json(
            "/api/sponsors/coca-cola/videos",
            json!({"filename_pattern": "sponsor_coca_cola_*"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let r = app
        .post_json(
            "/api/sponsors/coca-cola/videos",
            json!({"filename_pattern": "sponsor_coca_cola_*"}),
        )
        .await;
    assert_eq!(r.status(), 409);
    let r = app
        .post_json(
            "/api/sponsors/coca-cola/videos",
            json!({"video_id": "a", "filename_pattern": "b"}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let r = app
        .post_json("/api/sponsors/nobody/videos", json!({"video_id": "a"}))
        .await;
    assert_eq!(r.status(), 404);
    let rules = app.json("/api/sponsors/coca-cola/videos").await;
    assert_eq!(rules.as_array().unwrap().len(), 1);
    // The glob's underscores are literal: sponsor_coca_cola_* does not match sponsorXcoca...
    let who: Option<String> = sqlx::query_scalar("SELECT sponsor_of(NULL, 'sponsorXcocaXcolaXgoal.mp4')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(who, None);

    // Bulk import over HTTP (CSV) ...
    let csv = "sponsor_id,sponsor_name,video_id,filename_pattern\n\
               adidas,Adidas,ad-1,\nadidas,Adidas,,sponsor_adidas_*\nnike,Nike,,\n";
    let r = app.post_csv("/api/catalogue/import", csv).await;
    assert_eq!(r.status(), 200);
    let rep: serde_json::Value = r.json().await.unwrap();
    assert_eq!((rep["sponsors"].as_i64(), rep["rules"].as_i64()), (Some(2), Some(2)));
    // ... a bad file is refused whole, naming the line ...
    let r = app
        .post_csv(
            "/api/catalogue/import",
            "sponsor_id,sponsor_name,video_id,filename_pattern\nok,Ok,v,\nbad id,X,,\n",
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(
        app.get("/api/sponsors/ok").await.status() == 404,
        "nothing of a refused file applied"
    );

    // ... and the CLI (TOML), which moves an existing rule to another sponsor.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("catalogue.toml");
    std::fs::write(
        &f,
        "[[sponsors]]\nid = \"nike\"\nname = \"Nike Inc\"\nvideo_ids = [\"ad-1\", \"nk-1\"]\nfilename_patterns = [\"sponsor_nike_*\"]\n",
    )
    .unwrap();
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_neopro-analytics"))
        .args(["import-catalogue", f.to_str().unwrap()])
        .env("DATABASE_URL", format!("postgres://postgres@127.0.0.1:5432/{db}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 rules"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let sponsors = app.json("/api/sponsors").await;
    let names: Vec<_> = sponsors
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["Adidas", "Coca-Cola", "Nike Inc"]);
    let who: Option<String> = sqlx::query_scalar("SELECT sponsor_of('ad-1', 'whatever.mp4')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(who.as_deref(), Some("nike"));
}

/// Catalogue changes racing with ingestion (concurrent writers queueing
/// their rollup deltas like the ingestor, the catalogue changed meanwhile
/// over HTTP and in SQL, the stats read meanwhile, so readers' folds race
/// with both): at the end the map and the rollups are exact and the stats
/// equal the raw rows under the final catalogue.
#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn catalogue_changes_racing_with_ingestion_stay_exact(pool: PgPool) {
    let app = TestApp::start(pool.clone()).await;
    seed_catalogue(&app).await;
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            let mut all = Vec::new();
            for b in 0..8u64 {
                let plays = random_plays(1000 + w * 100 + b, 60, day("2026-09-01"), 30, 6);
                let mut tx = pool.begin().await.unwrap();
                insert_plays_tx(&mut tx, &plays).await;
                queue_rollup_tx(&mut tx, &plays).await;
                tx.commit().await.unwrap();
                all.extend(plays);
            }
            all
        }));
    }
    for i in 0..6 {
        let r = app
            .post_json("/api/sponsors/adidas/videos", json!({"filename_pattern": "club_*"}))
            .await;
        assert_eq!(r.status(), 201);
        let rule: serde_json::Value = r.json().await.unwrap();
        let to = if i % 2 == 0 { "adidas" } else { "coca-cola" };
        sqlx::query("UPDATE videos SET sponsor_id = $1 WHERE video_id = 'cc-1'")
            .bind(to)
            .execute(&pool)
            .await
            .unwrap();
        let r = app
            .client
            .delete(format!("{}/api/sponsors/adidas/videos/{}", app.base, rule["id"]))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        // A reader meanwhile: its fold races with the writers and the changes.
        let r = app
            .get("/api/analytics/sponsors/coca-cola/stats?from=2026-09-01&to=2026-09-30")
            .await;
        assert_eq!(r.status(), 200);
    }
    let mut plays = Vec::new();
    for w in writers {
        plays.extend(w.await.unwrap());
    }
    assert_rollups_exact(&pool).await;
    let f = Filter {
        from: day("2026-09-01"),
        to: day("2026-09-30"),
        site_id: None,
        event_type: None,
        period: None,
    };
    for sponsor in ["adidas", "coca-cola"] {
        check(&app, &plays, sponsor, &f, &format!("{sponsor} after racing changes")).await;
    }
}
