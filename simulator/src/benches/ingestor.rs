//! `neopro-sim bench-ingestor`: the ingestor's end-to-end throughput against
//! a raw `COPY`. Every flag of `neopro-ingestor` applies (batching, writers,
//! insert method, config file, `NEOPRO_INGESTOR__*`): they configure the
//! ingestor under test.
//!
//! 1. (Re)creates a bench database and migrates it;
//! 2. starts the real [`ingestor::App`] in-process on a unique topic prefix;
//! 3. publishes N impressions as envelopes (round-robin over S sites, like a
//!    fleet of edges) through the broker at QoS 1, keeping at most `window`
//!    envelopes unconfirmed, as edges do (they wait for receipts; this also
//!    keeps Mosquitto's per-client queue, 1,000 messages by default, from
//!    overflowing);
//! 4. waits for every receipt and checks the row count in PostgreSQL;
//! 5. truncates the table and `COPY`s the same rows into it (text format, one
//!    stream), the baseline;
//! 6. prints `ingest_rows_per_s=<n> copy_rows_per_s=<n> ratio=<x> p50_ms=<n> p99_ms=<n>`
//!    as its last line. p50/p99 are the database commit latencies of the
//!    ingestor's batches (one transaction each); the line before also gives
//!    the publish-to-receipt latency per envelope (what an edge waits before
//!    it may delete; it includes queueing behind the publisher's window).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use ingestor::Settings;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, Incoming, QoS};
use schema::{
    derive_impression_id, BatchEnvelope, EventType, Impression, Period, Receipt, TopicKind, Topics, TriggerType,
};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Options of `neopro-sim bench-ingestor`: the benchmark's own, and the
/// ingestor's.
#[derive(Debug, Args)]
pub struct BenchIngestorArgs {
    #[command(flatten)]
    pub bench: BenchArgs,
    /// The flags of `neopro-ingestor`, for the ingestor under test.
    #[command(flatten)]
    pub ingestor: ingestor::settings::CommonArgs,
}

/// The benchmark's own options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Broker: `embedded` (rumqttd in-process, ephemeral port) or a URL.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// Impressions to publish.
    #[arg(long, short = 'n', default_value_t = 200_000)]
    pub impressions: usize,
    /// Sites (edges) they come from.
    #[arg(long, default_value_t = 100)]
    pub sites: usize,
    /// Impressions per envelope (MQTT message); the edge's default
    /// `batch_max_impressions`.
    #[arg(long, default_value_t = 500)]
    pub per_message: usize,
    /// Envelopes published but not yet confirmed by a receipt, at most.
    #[arg(long, default_value_t = 400)]
    pub window: usize,
    /// Draw event type and period per play (worst case for the rollup)
    /// instead of per stretch of plays, as venues do.
    #[arg(long)]
    pub random_context: bool,
    /// Name of the bench database (dropped and re-created).
    #[arg(long, default_value = "neopro_ingestor_bench")]
    pub bench_database: String,
}

fn videos() -> &'static [(&'static str, f64)] {
    &[
        ("sponsor_coca_cola_30s.mp4", 30.0),
        ("sponsor_decathlon_20s.mp4", 20.0),
        ("sponsor_credit_agricole_45s.mp4", 45.0),
        ("sponsor_intersport_15s.mp4", 15.0),
        ("sponsor_renault_30s.mp4", 30.0),
        ("sponsor_orange_60s.mp4", 60.0),
        ("sponsor_local_bakery_10s.mp4", 10.0),
        ("sponsor_super_u_30s.mp4", 30.0),
        ("club_promo_season_2025.mp4", 90.0),
        ("sponsor_nike_30s.mp4", 30.0),
    ]
}

/// Deterministic realistic impressions, per site, in seq order.
const EVENTS: [EventType; 4] = [
    EventType::Match,
    EventType::Training,
    EventType::Tournament,
    EventType::Other,
];
const PERIODS: [Period; 4] = [Period::PreMatch, Period::Halftime, Period::PostMatch, Period::Loop];

pub fn generate(n: usize, sites: usize, now: DateTime<Utc>, random_context: bool) -> Vec<Vec<Impression>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut out: Vec<Vec<Impression>> = (0..sites).map(|_| Vec::with_capacity(n / sites + 1)).collect();
    let start = now - chrono::Duration::days(3);
    for k in 0..n {
        let s = k % sites;
        let site = format!("bench-site-{s:03}");
        let seq = out[s].len() as i64 + 1;
        let (file, len) = videos()[rng.random_range(0..videos().len())];
        let played_at = start + chrono::Duration::seconds(seq * 3 + s as i64);
        let completed = rng.random_bool(0.85);
        let played = if completed {
            len
        } else {
            (len * rng.random_range(0.1..0.95) * 10.0).round() / 10.0
        };
        out[s].push(Impression {
            impression_id: derive_impression_id(&site, file, played_at),
            site_id: site,
            seq: Some(seq),
            video_id: None,
            video_filename: file.to_owned(),
            played_at,
            duration_played: played,
            video_duration: len,
            completed,
            // A venue's context changes by stretches (the operator sets the
            // event and the period), not per play; `random_context` draws
            // them per play instead (worst case for the rollup: 4x4 more keys).
            event_type: if random_context {
                EVENTS[rng.random_range(0..4)]
            } else {
                EVENTS[((seq / 400) as usize + s) % 4]
            },
            period: if random_context {
                PERIODS[rng.random_range(0..4)]
            } else {
                PERIODS[((seq / 50) as usize + s) % 4]
            },
            trigger_type: if rng.random_bool(0.9) {
                TriggerType::Auto
            } else {
                TriggerType::Manual
            },
            audience_estimate: Some(rng.random_range(20..2_000)),
        });
    }
    out
}

/// Runs the benchmark with the ingestor configured by its flags (file <
/// environment < flags, as `neopro-ingestor` loads them).
pub async fn run(args: BenchIngestorArgs) -> anyhow::Result<()> {
    let settings = args.ingestor.load()?;
    run_with(args.bench, settings).await
}

/// Runs the benchmark and prints its figures.
pub async fn run_with(args: BenchArgs, mut settings: Settings) -> anyhow::Result<()> {
    runtime::tls::install_crypto_provider();
    anyhow::ensure!(
        args.per_message >= 1 && args.sites >= 1,
        "per_message and sites must be >= 1"
    );
    // The embedded broker lives until the process exits (rumqttd cannot stop).
    let mut _embedded = None;
    let broker: runtime::mqtt::MqttUrl = if args.broker == "embedded" {
        let b = broker::EmbeddedBroker::start_for_tests()?;
        let url = b.url().parse().map_err(anyhow::Error::msg)?;
        _embedded = Some(b);
        url
    } else {
        args.broker.parse().map_err(anyhow::Error::msg)?
    };
    let db_url = crate::pg::with_database(&settings.database_url, &args.bench_database)?;
    runtime::db::recreate_database(&db_url).await?;
    let now = Utc::now();
    let per_site = generate(args.impressions, args.sites, now, args.random_context);

    // Envelopes, round-robin over sites.
    let mut envelopes: Vec<(String, Uuid, Vec<u8>, usize)> = Vec::new();
    let topics = Topics::new(format!("bench/{}", Uuid::new_v4().simple())).map_err(anyhow::Error::msg)?;
    let chunks: Vec<Vec<&[Impression]>> = per_site.iter().map(|v| v.chunks(args.per_message).collect()).collect();
    let rounds = chunks.iter().map(Vec::len).max().unwrap_or(0);
    let outbox: Vec<Uuid> = (0..args.sites).map(|_| Uuid::now_v7()).collect();
    let mut bytes = 0usize;
    for r in 0..rounds {
        for (s, c) in chunks.iter().enumerate() {
            if let Some(chunk) = c.get(r) {
                let site = &chunk[0].site_id;
                let env = BatchEnvelope::new(site, outbox[s], chunk.to_vec(), now);
                let payload = env.encode();
                bytes += payload.len();
                envelopes.push((topics.impressions(site), env.batch_id, payload, chunk.len()));
            }
        }
    }
    eprintln!(
        "bench: {} impressions, {} sites, {} envelopes of <= {} ({} KiB avg), broker {broker}, writers {}",
        args.impressions,
        args.sites,
        envelopes.len(),
        args.per_message,
        bytes / envelopes.len().max(1) / 1024,
        settings.writers
    );

    // The ingestor, in-process.
    settings.database_url = db_url.clone();
    settings.mqtt_url = broker.clone();
    settings.http_addr = "127.0.0.1:0".parse()?;
    settings.topic_prefix = topics.prefix().to_owned();
    settings.client_id = format!("ingestor-bench-{}", Uuid::new_v4().simple());
    settings.migrate = true;
    let app = ingestor::App::build(settings).await?;
    let pool = app.pool().clone();
    let shutdown = CancellationToken::new();
    let app_task = tokio::spawn(app.run(shutdown.clone()));
    // Wait until migrated and subscribed (readiness).
    wait_ready(&pool).await?;
    // A catalogue, as in production: every sponsor video attributed by a
    // filename rule (the club's own promo is not), so the per-sponsor
    // analytics rollups maintained by triggers are part of what is measured.
    for (file, _) in videos() {
        // "sponsor_coca_cola_30s.mp4" -> sponsor "coca_cola", rule "sponsor_coca_cola_*".
        let Some((stem, _length)) = file.strip_prefix("sponsor_").and_then(|f| f.rsplit_once('_')) else {
            continue;
        };
        sqlx::query("INSERT INTO sponsors (id, name) VALUES ($1, $1) ON CONFLICT DO NOTHING")
            .bind(stem)
            .execute(&pool)
            .await?;
        sqlx::query("INSERT INTO videos (sponsor_id, filename_pattern) VALUES ($1, $2)")
            .bind(stem)
            .bind(format!("sponsor_{stem}_*"))
            .execute(&pool)
            .await?;
    }

    // The publisher, one connection standing in for the fleet.
    let mut copts = runtime::mqtt::ClientOptions::new(format!("bench-pub-{}", Uuid::new_v4().simple()));
    copts.clean_session = true;
    let (client, mut el) = AsyncClient::new(broker.options(&copts)?, 1000);
    client
        .subscribe(topics.all_sites(TopicKind::Receipts), QoS::AtLeastOnce)
        .await?;
    let (rtx, mut rrx) = tokio::sync::mpsc::unbounded_channel::<Receipt>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let el_task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    if let Ok(r) = Receipt::decode(&p.payload) {
                        let _ = rtx.send(r);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("bench publisher: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), ready_rx)
        .await
        .context("publisher subscription timed out")??;
    // Give the ingestor's subscription a moment to be active on the broker.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    if let Ok(mut h) = ingestor::pipeline::commit_latency().lock() {
        h.reset();
    }
    let mut outstanding: HashMap<Uuid, (Instant, usize)> = HashMap::new();
    let mut next = 0usize;
    let mut settled_rows = 0usize;
    let t0 = Instant::now();
    let mut last_progress = Instant::now();
    while settled_rows < args.impressions {
        while next < envelopes.len() && outstanding.len() < args.window {
            let (topic, id, payload, n) = &envelopes[next];
            client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                .await?;
            outstanding.insert(*id, (Instant::now(), *n));
            next += 1;
        }
        match tokio::time::timeout(Duration::from_secs(30), rrx.recv()).await {
            Ok(Some(r)) => {
                if let Some((sent, n)) = outstanding.remove(&r.batch_id) {
                    hist.record(sent.elapsed().as_micros().max(1) as u64)?;
                    settled_rows += n;
                    last_progress = Instant::now();
                }
            }
            Ok(None) => anyhow::bail!("publisher event loop ended"),
            Err(_) => {
                // Resend what is unconfirmed (as an edge would).
                eprintln!("bench: no receipt for 30 s; resending {} envelopes", outstanding.len());
                for (topic, id, payload, _) in envelopes[..next].iter() {
                    if outstanding.contains_key(id) {
                        client
                            .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                            .await?;
                    }
                }
                anyhow::ensure!(
                    last_progress.elapsed() < Duration::from_secs(300),
                    "no progress for 5 minutes"
                );
            }
        }
    }
    let ingest_s = t0.elapsed().as_secs_f64();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM sponsor_impressions")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        rows as usize == args.impressions,
        "expected {} rows, found {rows}",
        args.impressions
    );
    // The rollups, once their queues are folded (what every reader does),
    // hold exactly the stored plays; the per-sponsor ones the attributed plays.
    let fold_t = Instant::now();
    sqlx::query("SELECT sponsor_rollups_fold()").execute(&pool).await?;
    let fold_ms = fold_t.elapsed().as_secs_f64() * 1e3;
    let rollup: Option<i64> = sqlx::query_scalar("SELECT sum(impressions)::int8 FROM sponsor_daily_stats")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(rollup == Some(rows), "rollup {rollup:?} != rows {rows}");
    let (attributed, in_rollup): (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM sponsor_impressions WHERE sponsor_of(video_id, video_filename) IS NOT NULL),
                (SELECT sum(impressions)::int8 FROM sponsor_stats_daily)",
    )
    .fetch_one(&pool)
    .await?;
    anyhow::ensure!(
        in_rollup == Some(attributed),
        "per-sponsor rollup {in_rollup:?} != attributed plays {attributed}"
    );
    eprintln!(
        "bench: daily and per-sponsor rollups exact ({attributed} attributed plays); last fold after the run {fold_ms:.1} ms"
    );
    shutdown.cancel();
    let _ = app_task.await;
    el_task.abort();

    // Baseline: raw COPY of the same rows into the same (truncated) table.
    let mut conn = PgConnectOptions::from_str(&db_url)?.connect().await?;
    sqlx::query("TRUNCATE sponsor_impressions, sponsor_daily_stats")
        .execute(&mut conn)
        .await?;
    sqlx::query("CHECKPOINT").execute(&mut conn).await.ok();
    let batch = Uuid::now_v7();
    let t1 = Instant::now();
    let mut copy = conn
        .copy_in_raw(
            "COPY sponsor_impressions (impression_id, site_id, seq, video_id, video_filename, played_at, \
             duration_played, video_duration, completed, event_type, period, trigger_type, audience_estimate, batch_id) \
             FROM STDIN",
        )
        .await?;
    let mut buf = String::with_capacity(1 << 20);
    for r in 0..rounds {
        for c in &chunks {
            if let Some(chunk) = c.get(r) {
                for i in chunk.iter() {
                    let _ = writeln!(
                        buf,
                        "{}\t{}\t{}\t\\N\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{batch}",
                        i.impression_id,
                        i.site_id,
                        i.seq.unwrap_or(0),
                        i.video_filename,
                        i.played_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                        i.duration_played,
                        i.video_duration,
                        if i.completed { 't' } else { 'f' },
                        i.event_type.as_str(),
                        i.period.as_str(),
                        i.trigger_type.as_str(),
                        i.audience_estimate.unwrap_or(0),
                    );
                }
                if buf.len() > (1 << 20) - 4096 {
                    copy.send(buf.as_bytes()).await?;
                    buf.clear();
                }
            }
        }
    }
    if !buf.is_empty() {
        copy.send(buf.as_bytes()).await?;
    }
    let copied = copy.finish().await?;
    let text_s = t1.elapsed().as_secs_f64();
    anyhow::ensure!(copied as usize == args.impressions, "COPY wrote {copied} rows");

    // Same again in the binary format (what the ingestor itself sends);
    // the baseline is the faster of the two.
    sqlx::query("TRUNCATE sponsor_impressions, sponsor_daily_stats")
        .execute(&mut conn)
        .await?;
    sqlx::query("CHECKPOINT").execute(&mut conn).await.ok();
    let t2 = Instant::now();
    let mut copy = conn.copy_in_raw(&ingestor::copy::copy_statement()).await?;
    for r in 0..rounds {
        let mut buf = ingestor::copy::CopyBuffer::with_rows(args.per_message * chunks.len());
        for c in &chunks {
            if let Some(chunk) = c.get(r) {
                for i in chunk.iter() {
                    buf.push(i, Some(batch));
                }
            }
        }
        // One COPY stream: the header once, no trailer until the end.
        let bytes = buf.finish();
        let start = if r == 0 { 0 } else { ingestor::copy::HEADER_LEN };
        let body = &bytes[start..bytes.len() - ingestor::copy::TRAILER_LEN];
        copy.send(body).await?;
    }
    copy.send(&(-1i16).to_be_bytes()[..]).await?;
    let copied = copy.finish().await?;
    let binary_s = t2.elapsed().as_secs_f64();
    anyhow::ensure!(copied as usize == args.impressions, "binary COPY wrote {copied} rows");
    conn.close().await.ok();
    let copy_s = text_s.min(binary_s);
    println!(
        "bench: baseline COPY of the same {} rows, one stream: text {:.2} s ({:.0} rows/s), binary {:.2} s ({:.0} rows/s); the faster is the baseline",
        args.impressions,
        text_s,
        args.impressions as f64 / text_s,
        binary_s,
        args.impressions as f64 / binary_s
    );

    let ingest_rate = args.impressions as f64 / ingest_s;
    let copy_rate = args.impressions as f64 / copy_s;
    let commit = ingestor::pipeline::commit_latency()
        .lock()
        .map_err(|_| anyhow::anyhow!("latency histogram poisoned"))?
        .clone();
    println!(
        "bench: ingest {:.2} s ({} batches, {:.0} rows/batch), copy {:.2} s; publish-to-receipt latency p50 {:.1} ms p99 {:.1} ms (window {} envelopes)",
        ingest_s,
        commit.len(),
        args.impressions as f64 / commit.len().max(1) as f64,
        copy_s,
        hist.value_at_quantile(0.50) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        args.window,
    );
    println!(
        "ingest_rows_per_s={:.0} copy_rows_per_s={:.0} ratio={:.2} p50_ms={:.1} p99_ms={:.1}",
        ingest_rate,
        copy_rate,
        ingest_rate / copy_rate,
        commit.value_at_quantile(0.50) as f64 / 1000.0,
        commit.value_at_quantile(0.99) as f64 / 1000.0
    );
    Ok(())
}

async fn wait_ready(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok: Result<Option<String>, _> = sqlx::query_scalar("SELECT to_regclass('sponsor_impressions')::text")
            .fetch_one(pool)
            .await;
        if matches!(ok, Ok(Some(_))) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "bench database not ready after 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
