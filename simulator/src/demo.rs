//! `neopro-sim demo`: the main job in one command.
//!
//! Starts the embedded broker, the ingestor and N simulated TV boxes (real
//! edge outboxes in a temporary directory), hands them the seeded plays over
//! a few seconds, shows live progress, waits until every play is committed
//! and every outbox is empty, then prints the per-sponsor summary read back
//! from PostgreSQL and the exactly-once check. Exit code 0 only when what was
//! played is exactly what is stored.

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::time::{Duration, Instant};

use crate::catalogue::Catalogue;
use crate::cli::DemoArgs;
use crate::fleet::{self, BrokerChoice, Edge, EdgeTuning, Ingestor};
use crate::pg;
use crate::plays::{generate, FleetSpec};

/// Chunk of plays per append: the TV frontend flushes its buffer in small
/// POSTs (the seed flushes at 50).
const FEED_CHUNK: usize = 25;

/// Runs the demo; `Ok(true)` when played == stored exactly once.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let started = Instant::now();
    let f = &args.fleet;
    let db_url = pg::with_database(&f.server_url(), &args.database)?;
    let spec = FleetSpec {
        sites: args.sites,
        plays_per_site: args.plays_per_site,
        seed: f.seed,
        end_day: f.end_day(),
        site_prefix: "club".into(),
    };
    println!(
        "neopro-sim demo: {} sites x {} plays (seed {}, plays before {}), database {}, broker {}",
        spec.sites,
        spec.plays_per_site,
        spec.seed,
        spec.end_day,
        pg::redact(&db_url),
        match &f.broker {
            BrokerChoice::Embedded => "embedded".to_owned(),
            BrokerChoice::Url(u) => u
                .parse::<runtime::mqtt::MqttUrl>()
                .map(|u| u.to_string())
                .unwrap_or_default(),
        }
    );
    fleet::raise_fd_limit();
    let catalogue = Catalogue::standard();
    let sites = generate(&spec, &catalogue);
    let total: u64 = sites.iter().map(|s| s.plays.len() as u64).sum();

    if f.keep_database {
        runtime::db::create_database_if_missing(&db_url).await?;
    } else {
        pg::recreate_database(&db_url).await?;
    }
    let pool = runtime::db::connect(&db_url, 4).await?;
    runtime::db::migrate(&pool).await?;
    pg::insert_catalogue(&pool, &catalogue, &sites).await?;
    let site_ids: Vec<String> = sites.iter().map(|s| s.site_id.clone()).collect();
    let before = pg::committed_count(&pool, &site_ids).await?;

    let (prefix, ingestor_id) = run_identity(&f.broker);
    let broker = fleet::start_broker(&f.broker, &prefix, |_| {})?;
    let ingestor = Ingestor::start(fleet::ingestor_settings(&db_url, &broker.url, &prefix, &ingestor_id)?).await?;

    let dir = tempfile::Builder::new()
        .prefix("neopro-demo-")
        .tempdir()
        .context("creating the boxes' temporary directory")?;
    let tuning = EdgeTuning {
        batch_delay_ms: args.batch_delay_ms,
        ..EdgeTuning::default()
    };
    let mut edges = Vec::with_capacity(sites.len());
    for s in &sites {
        let mut e = Edge::open(&s.site_id, dir.path().join(&s.site_id), &broker.url, &prefix, &tuning).await?;
        e.start().await?;
        edges.push(e);
    }

    let mp = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>28} [{bar:40}] {pos:>7}/{len} {per_sec}")
        .expect("static template")
        .progress_chars("=> ");
    let bar = |name: &str| {
        let b = mp.add(ProgressBar::new(total));
        b.set_style(style.clone());
        b.set_prefix(name.to_owned());
        b
    };
    let played_bar = bar("played (in box outboxes)");
    let committed_bar = bar("committed in PostgreSQL");
    let confirmed_bar = bar("confirmed (outboxes emptied)");

    // Feed: one chunk per box per round, rounds spread over feed_secs.
    let rounds = sites
        .iter()
        .map(|s| s.plays.len().div_ceil(FEED_CHUNK))
        .max()
        .unwrap_or(0);
    let pause = Duration::from_secs_f64(args.feed_secs.max(0.0) / rounds.max(1) as f64);
    let mut appended = 0u64;
    let mut last_poll = Instant::now();
    for r in 0..rounds {
        for (s, e) in sites.iter().zip(&edges) {
            let chunk: Vec<_> = s.plays.iter().skip(r * FEED_CHUNK).take(FEED_CHUNK).cloned().collect();
            if chunk.is_empty() {
                continue;
            }
            let n = chunk.len() as u64;
            let out = e.outbox.append(chunk).await.context("appending plays to a box")?;
            anyhow::ensure!(
                out.inserted == n,
                "box {} stored {} of {n} plays",
                s.site_id,
                out.inserted
            );
            appended += n;
        }
        played_bar.set_position(appended);
        if last_poll.elapsed() > Duration::from_millis(250) {
            last_poll = Instant::now();
            progress(
                &pool,
                &site_ids,
                before,
                appended,
                &edges,
                &committed_bar,
                &confirmed_bar,
            )
            .await;
        }
        tokio::time::sleep(pause).await;
    }
    played_bar.finish();

    let complete = fleet::wait_until(Duration::from_secs(args.timeout_secs), || async {
        let (committed, unconfirmed) = progress(
            &pool,
            &site_ids,
            before,
            appended,
            &edges,
            &committed_bar,
            &confirmed_bar,
        )
        .await;
        // Every receipt back (outboxes empty) is the pipeline's own proof;
        // the row count is checked too unless the database is reused.
        Ok(appended == total && unconfirmed == 0 && (f.keep_database || committed >= total))
    })
    .await?;
    committed_bar.finish();
    confirmed_bar.finish();
    let pipeline_secs = started.elapsed().as_secs_f64();

    for e in &mut edges {
        if let Err(e) = e.stop().await {
            tracing::warn!(error = format!("{e:#}"), "stopping a box");
        }
    }
    let unconfirmed_left = fleet::unconfirmed_total(&edges);
    if let Err(e) = ingestor.stop().await {
        tracing::warn!(error = format!("{e:#}"), "stopping the ingestor");
    }
    fleet::forget_sessions(
        &broker,
        std::iter::once(ingestor_id.clone()).chain(site_ids.iter().cloned()),
    )
    .await;

    let summary = pg::sponsor_summary(&pool, &site_ids).await?;
    println!("\nPer-sponsor summary (read back from PostgreSQL, attributed with sponsor_of()):\n");
    print!("{}", pg::format_summary(&summary));
    let rec = pg::reconcile(&pool, sites.iter().flat_map(|s| s.plays.iter())).await?;
    let exact = complete && rec.is_exact() && unconfirmed_left == 0;
    println!(
        "\nplayed={} stored={} duplicates={} missing={} unexpected={} mismatched={} rejected={} rollup={} outboxes_unconfirmed={} in {:.1}s",
        rec.played,
        rec.stored,
        rec.duplicate_rows(),
        rec.missing.len(),
        rec.unexpected.len(),
        rec.mismatched.len(),
        rec.rejected,
        rec.rollup_impressions,
        unconfirmed_left,
        pipeline_secs
    );
    if exact {
        println!("OK: every played impression is in PostgreSQL exactly once, every outbox is empty.");
    } else {
        if !complete {
            println!(
                "TIMEOUT after {} s waiting for the pipeline to settle.",
                args.timeout_secs
            );
        }
        println!("MISMATCH:\n{}", rec.diff(20));
    }
    pool.close().await;
    Ok(exact)
}

/// Topic prefix and ingestor client id for this run: production names on our
/// own embedded broker, unique ones on a shared broker (Mosquitto).
pub fn run_identity(broker: &BrokerChoice) -> (String, String) {
    match broker {
        BrokerChoice::Embedded => (schema::mqtt::DEFAULT_PREFIX.to_owned(), "ingestor".to_owned()),
        BrokerChoice::Url(_) => {
            let run = uuid::Uuid::new_v4().simple().to_string();
            let short = &run[..12];
            (format!("sim/{short}"), format!("ingestor-sim-{short}"))
        }
    }
}

async fn progress(
    pool: &sqlx::PgPool,
    sites: &[String],
    before: i64,
    appended: u64,
    edges: &[Edge],
    committed_bar: &ProgressBar,
    confirmed_bar: &ProgressBar,
) -> (u64, u64) {
    let committed = pg::committed_count(pool, sites).await.unwrap_or(before) - before;
    let unconfirmed = fleet::unconfirmed_total(edges);
    committed_bar.set_position(committed.max(0) as u64);
    confirmed_bar.set_position(appended.saturating_sub(unconfirmed));
    (committed.max(0) as u64, unconfirmed)
}
