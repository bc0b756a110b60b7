//! The dashboard in Debian's headless Chromium: the KPI tiles show the same
//! numbers as the API for the same range; a screenshot is kept as an
//! artifact under target/test-artifacts/.

mod common;
use common::*;
use sqlx::PgPool;
use std::path::{Path, PathBuf};

const CHROMIUM: &str = "/usr/bin/chromium";

fn chromium(args: &[String]) -> std::process::Output {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the dashboard test needs Debian's chromium. \
         Install it with `bash -c 'source .ci/extra-setup'` (or `apt-get update && apt-get install -y chromium`); CI does this."
    );
    let out = std::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=10000",
        ])
        .args(args)
        .output()
        .expect("running chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `data-value` of the element with this id in the dumped DOM.
fn kpi(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in DOM"));
    let tag_end = at + dom[at..].find('>').unwrap();
    let tag = &dom[..tag_end];
    let tag = &tag[tag.rfind('<').unwrap()..];
    let v = tag
        .find("data-value=\"")
        .unwrap_or_else(|| panic!("#{id} has no data-value: {tag}"));
    let rest = &tag[v + 12..];
    rest[..rest.find('"').unwrap()].to_owned()
}

fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[sqlx::test(migrator = "runtime::db::MIGRATOR")]
async fn dashboard_shows_the_api_figures_in_headless_chromium(pool: PgPool) {
    let app = TestApp::start(pool.clone()).await;
    seed_catalogue(&app).await;
    let plays = random_plays(5, 2000, day("2026-09-01"), 60, 5);
    insert_plays(&pool, &plays).await;
    recompute_days(&pool, &plays).await;
    sqlx::query("INSERT INTO sites (site_id, name) VALUES ('site-1', 'FC Test')")
        .execute(&pool)
        .await
        .unwrap();

    let (from, to) = ("2026-09-10", "2026-10-20");
    let api = app
        .json(&format!("/api/analytics/sponsors/coca-cola/stats?from={from}&to={to}"))
        .await;
    assert!(api["total_impressions"].as_i64().unwrap() > 0);

    let profile = tempfile::tempdir().unwrap();
    let url = format!(
        "{}/sponsors/coca-cola/analytics?from={from}&to={to}&token={TOKEN}",
        app.base
    );
    let user_data = format!("--user-data-dir={}", profile.path().display());
    let base_args = |extra: &[String]| {
        let mut v = vec![user_data.clone()];
        v.extend_from_slice(extra);
        v.push(url.clone());
        v
    };
    let dom_task = tokio::task::spawn_blocking({
        let args = base_args(&["--dump-dom".to_owned()]);
        move || chromium(&args)
    });
    let out = dom_task.await.unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains("data-state=\"ready\""),
        "dashboard did not finish loading:\n{dom}"
    );
    assert!(dom.contains("Coca-Cola"));

    for (id, key) in [
        ("kpi-total-impressions", "total_impressions"),
        ("kpi-completed", "completed"),
        ("kpi-sites-reached", "sites_reached"),
        ("kpi-audience-reached", "audience_reached"),
    ] {
        assert_eq!(kpi(&dom, id), api[key].as_i64().unwrap().to_string(), "{id}");
    }
    for (id, key) in [
        ("kpi-screen-time", "screen_time_seconds"),
        ("kpi-completion-rate", "completion_rate"),
    ] {
        let shown: f64 = kpi(&dom, id).parse().unwrap();
        assert_eq!(shown, api[key].as_f64().unwrap(), "{id}");
    }
    // The visible text too, as formatted for people.
    let total = api["total_impressions"].as_i64().unwrap();
    let formatted = analytics::pdf::fmt_int(total);
    assert!(dom.contains(&format!(">{formatted}<")), "visible total {formatted}");
    assert!(dom.contains("FC Test (site-1)"), "site table rendered");

    // Screenshot artifact (a second profile: chromium locks its profile dir).
    let shot = artifacts_dir().join("analytics-dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let profile2 = tempfile::tempdir().unwrap();
    let args = vec![
        format!("--user-data-dir={}", profile2.path().display()),
        format!("--screenshot={}", shot.display()),
        "--window-size=1280,1600".to_owned(),
        "--hide-scrollbars".to_owned(),
        url.clone(),
    ];
    tokio::task::spawn_blocking(move || chromium(&args)).await.unwrap();
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");
    eprintln!("dashboard screenshot: {}", shot.display());

    // Without a token the page asks for one and shows no figure.
    let profile3 = tempfile::tempdir().unwrap();
    let args = vec![
        format!("--user-data-dir={}", profile3.path().display()),
        "--dump-dom".to_owned(),
        format!("{}/sponsors/coca-cola/analytics", app.base),
    ];
    let out = tokio::task::spawn_blocking(move || chromium(&args)).await.unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("data-state=\"need-token\""), "{dom}");
}
