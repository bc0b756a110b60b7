//! `neopro-sim bench-edge`: the edge's figures, measured in one run against
//! the real `neopro-edge` binary (`--edge-exe`; by default the one built
//! beside this executable, or in `NEOPRO_BIN_DIR`), since its RSS and size
//! are what a TV box pays.
//!
//! 1. Starts that binary as a child `neopro-edge run` (own data dir, own
//!    port, broker unreachable so nothing drains) and reads its idle RSS.
//! 2. POSTs `--single` impressions one per request, then `--impressions` in
//!    requests of 50, from `--clients` concurrent HTTP clients over loopback;
//!    every 200 means "durable" (fsync'd). Reads the child's peak RSS (VmHWM).
//! 3. Kills the child with SIGKILL, starts a new one pointed at the broker
//!    (`--mqtt-url`, Mosquitto by default) with a [`ReceiptPeer`] answering
//!    receipts, and measures the drain rate until the outbox is empty
//!    (published, receipted, deleted), plus RSS during and after.
//! 4. Baseline in the same run: the seed's approach (the whole JSON buffer
//!    file rewritten and fsync'd per POST, under a lock), same clients, batch
//!    sizes 1 and 50, over `--baseline` impressions each (fewer, because it
//!    is quadratic; the small file favours the baseline).
//! 5. The size of the `neopro-edge` binary.

use anyhow::Context;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

use testkit::ReceiptPeer;

/// Options of `neopro-sim bench-edge`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Broker the drain phase publishes to: mqtt://[user[:password]@]host[:port]
    /// or mqtts://… [default: mqtt://127.0.0.1:1883].
    #[arg(long, env = "NEOPRO_MQTT_URL")]
    pub mqtt_url: Option<String>,
    /// The `neopro-edge` executable to measure [default: neopro-edge beside
    /// this executable, or in NEOPRO_BIN_DIR].
    #[arg(long)]
    pub edge_exe: Option<PathBuf>,
    /// Impressions posted in requests of 50.
    #[arg(long, default_value_t = 200_000)]
    pub impressions: usize,
    /// Impressions posted one per request.
    #[arg(long, default_value_t = 10_000)]
    pub single: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Impressions per batch size for the seed baseline.
    #[arg(long, default_value_t = 5_000)]
    pub baseline: usize,
    /// Keep the temporary directory (outbox files, child logs).
    #[arg(long)]
    pub keep: bool,
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// (VmRSS, VmHWM) of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

struct ChildEdge {
    child: Child,
    base: String,
}

impl Drop for ChildEdge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_edge(exe: &Path, dir: &Path, site: &str, prefix: &str, mqtt: &str, log: &str) -> anyhow::Result<ChildEdge> {
    let port = free_port()?;
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(log))?;
    let child = Command::new(exe)
        .args(["run", "--site-id", site, "--topic-prefix", prefix, "--mqtt-url", mqtt])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .context("starting the child edge")?;
    Ok(ChildEdge {
        child,
        base: format!("http://127.0.0.1:{port}"),
    })
}

async fn wait_ready(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("edge at {base} not ready after 30 s")
}

/// Seed-like POST bodies: `total` distinct plays in requests of `batch`.
pub fn bodies(total: usize, batch: usize, salt: &str) -> Vec<Bytes> {
    let base = chrono::Utc::now() - chrono::Duration::days(1);
    let mut out = Vec::with_capacity(total.div_ceil(batch));
    let mut i = 0;
    while i < total {
        let n = batch.min(total - i);
        let recs: Vec<serde_json::Value> = (i..i + n)
            .map(|k| {
                serde_json::json!({
                    "video_filename": format!("sponsor_{salt}_{}.mp4", k % 97),
                    "played_at": (base + chrono::Duration::milliseconds(k as i64)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "duration_played": 30, "video_duration": 30, "completed": true,
                    "event_type": "match", "period": "halftime", "trigger_type": "auto", "audience_estimate": 150
                })
            })
            .collect();
        out.push(Bytes::from(
            serde_json::to_vec(&serde_json::json!({ "impressions": recs })).unwrap_or_default(),
        ));
        i += n;
    }
    out
}

/// POSTs every body with `clients` in flight; returns (seconds, impressions acknowledged).
async fn post_all(
    http: &reqwest::Client,
    url: &str,
    bodies: Vec<Bytes>,
    per: usize,
    clients: usize,
) -> anyhow::Result<(f64, u64)> {
    let started = Instant::now();
    let results: Vec<anyhow::Result<u64>> = futures::stream::iter(bodies.into_iter().map(|b| {
        let n = per;
        let req = http.post(url).header("content-type", "application/json").body(b);
        async move {
            let r = req.send().await?;
            let status = r.status();
            if !status.is_success() {
                anyhow::bail!("HTTP {status}: {}", r.text().await.unwrap_or_default());
            }
            Ok(n as u64)
        }
    }))
    .buffer_unordered(clients.max(1))
    .collect()
    .await;
    let secs = started.elapsed().as_secs_f64();
    let mut ok = 0;
    for r in results {
        ok += r?;
    }
    Ok((secs, ok))
}

/// The seed's local server: append to the JSON buffer file, rewrite it whole, fsync.
async fn baseline_server(dir: PathBuf) -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    #[derive(Clone)]
    struct B {
        path: Arc<PathBuf>,
        lock: Arc<Mutex<()>>,
    }
    async fn handler(State(b): State<B>, body: Bytes) -> axum::http::StatusCode {
        let _g = b.lock.lock().await;
        let path = b.path.clone();
        let r = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            use std::io::Write;
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            let new = v
                .get("impressions")
                .and_then(|x| x.as_array())
                .cloned()
                .unwrap_or_default();
            let mut buf: Vec<serde_json::Value> = match std::fs::read(&*path) {
                Ok(b) => serde_json::from_slice(&b)?,
                Err(_) => Vec::new(),
            };
            buf.extend(new);
            let mut f = std::fs::File::create(&*path)?;
            f.write_all(&serde_json::to_vec_pretty(&buf)?)?;
            f.sync_all()?;
            Ok(())
        })
        .await;
        match r {
            Ok(Ok(())) => axum::http::StatusCode::OK,
            _ => axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
    let state = B {
        path: Arc::new(dir.join("sponsor_impressions.json")),
        lock: Arc::new(Mutex::new(())),
    };
    let app = Router::new()
        .route("/api/sync/sponsor-impressions", post(handler))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(state);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let h = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    Ok((format!("http://{addr}/api/sync/sponsor-impressions"), h))
}

async fn outbox_count(http: &reqwest::Client, base: &str) -> Option<u64> {
    let v: serde_json::Value = http
        .get(format!("{base}/api/sync/sponsor-impressions/stats"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["count"].as_u64()
}

/// The `neopro-edge` executable: `--edge-exe`, else the workspace's binary
/// directory (the one this executable runs from, or `NEOPRO_BIN_DIR`).
fn edge_exe(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let exe = given.unwrap_or_else(|| crate::faults::bin_dir().join("neopro-edge"));
    anyhow::ensure!(
        exe.is_file(),
        "{} not found: build it first (cargo build --release -p edge-publisher, the profile of this neopro-sim), or give --edge-exe",
        exe.display()
    );
    Ok(exe)
}

/// `debug` or `release` when the executable sits in cargo's profile
/// directory of that name.
fn profile_of(exe: &Path) -> &'static str {
    match exe.parent().and_then(Path::file_name).and_then(|n| n.to_str()) {
        Some("release") => "release",
        Some("debug") => "debug",
        _ => "unknown",
    }
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let exe = edge_exe(args.edge_exe.clone())?;
    let size = std::fs::metadata(&exe)?.len();
    let profile = profile_of(&exe);
    let mqtt = args.mqtt_url.clone().unwrap_or_else(|| "mqtt://127.0.0.1:1883".into());
    let url: runtime::mqtt::MqttUrl = mqtt.parse().map_err(anyhow::Error::msg)?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let site = format!("bench-{}", &tag[..12]);
    let prefix = format!("bench/{tag}");
    let dir = std::env::temp_dir().join(format!("neopro-edge-bench-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients * 2)
        .build()?;

    println!(
        "neopro-edge bench ({profile} build), {} clients over loopback, data in {}",
        args.clients,
        dir.display()
    );
    println!(
        "binary size: {:.2} MiB ({} bytes) {}",
        size as f64 / 1048576.0,
        size,
        exe.display()
    );

    // Phase 1: POST throughput with the broker unreachable (nothing drains).
    let edge = spawn_edge(&exe, &dir, &site, &prefix, "mqtt://127.0.0.1:9", "edge-post.log")?;
    wait_ready(&http, &edge.base).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = edge.child.id();
    let (idle_rss, _) = rss_kib(pid).unwrap_or_default();
    println!("edge idle RSS (fresh, empty outbox): {:.1} MiB", mib(idle_rss));
    let post_url = format!("{}/api/sync/sponsor-impressions", edge.base);

    let b1 = bodies(args.single, 1, &format!("{tag}a"));
    let (s1, n1) = post_all(&http, &post_url, b1, 1, args.clients).await?;
    let r1 = n1 as f64 / s1;
    println!("edge POST batch=1:  {n1} impressions acknowledged durable in {s1:.2} s = {r1:.0} impressions/s");
    let b50 = bodies(args.impressions, 50, &format!("{tag}b"));
    let (s50, n50) = post_all(&http, &post_url, b50, 50, args.clients).await?;
    let r50 = n50 as f64 / s50;
    println!("edge POST batch=50: {n50} impressions acknowledged durable in {s50:.2} s = {r50:.0} impressions/s");
    let (rss_after, hwm) = rss_kib(pid).unwrap_or_default();
    println!(
        "edge RSS under POST load: peak (VmHWM) {:.1} MiB, after {:.1} MiB",
        mib(hwm),
        mib(rss_after)
    );
    let queued = outbox_count(&http, &edge.base).await.unwrap_or(0);
    drop(edge); // SIGKILL: what was acknowledged must survive it
    let total = n1 + n50;
    println!("edge killed with SIGKILL holding {queued} impressions (acknowledged: {total})");

    // Phase 2: drain to the broker, a peer answering receipts.
    let peer = ReceiptPeer::start(&url, &prefix, 0)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let edge = spawn_edge(&exe, &dir, &site, &prefix, &mqtt, "edge-drain.log")?;
    wait_ready(&http, &edge.base).await?;
    let pid = edge.child.id();
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut left = queued;
    while Instant::now() < deadline {
        left = outbox_count(&http, &edge.base).await.unwrap_or(left);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain_s = started.elapsed().as_secs_f64();
    let (_, drain_hwm) = rss_kib(pid).unwrap_or_default();
    let (envelopes, committed, dups) = {
        let st = peer.state.lock().map_err(|_| anyhow::anyhow!("peer state poisoned"))?;
        (st.envelopes, st.committed.len() as u64, st.duplicates)
    };
    println!(
        "drain to {url}: {queued} impressions published + receipted + deleted in {drain_s:.2} s = {:.0} impressions/s ({envelopes} envelopes, {committed} distinct committed, {dups} duplicates, {left} left)",
        queued as f64 / drain_s
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_after, _) = rss_kib(pid).unwrap_or_default();
    println!(
        "edge RSS draining: peak (VmHWM) {:.1} MiB; idle after drain {:.1} MiB",
        mib(drain_hwm),
        mib(idle_after)
    );
    drop(edge);
    peer.stop();

    // Baseline: the seed's JSON file.
    let bdir = dir.join("baseline");
    std::fs::create_dir_all(&bdir)?;
    let (burl, h) = baseline_server(bdir.clone()).await?;
    let (bs1, bn1) = post_all(
        &http,
        &burl,
        bodies(args.baseline, 1, &format!("{tag}c")),
        1,
        args.clients,
    )
    .await?;
    let br1 = bn1 as f64 / bs1;
    println!("baseline (seed: JSON buffer file rewritten + fsync per POST) batch=1:  {bn1} impressions in {bs1:.2} s = {br1:.0} impressions/s");
    let _ = std::fs::remove_file(bdir.join("sponsor_impressions.json"));
    let (bs50, bn50) = post_all(
        &http,
        &burl,
        bodies(args.baseline, 50, &format!("{tag}d")),
        50,
        args.clients,
    )
    .await?;
    let br50 = bn50 as f64 / bs50;
    println!("baseline (seed: JSON buffer file rewritten + fsync per POST) batch=50: {bn50} impressions in {bs50:.2} s = {br50:.0} impressions/s");
    h.abort();
    println!(
        "ratio edge/baseline: batch=1 {:.1}x, batch=50 {:.1}x",
        r1 / br1,
        r50 / br50
    );
    let ok = |b: bool| if b { "met" } else { "NOT met" };
    println!(
        "targets: >= 20000 impressions/s at batch=50: {} ({r50:.0}); idle RSS <= 15 MiB: {} ({:.1}); binary <= 15 MiB: {} ({:.2})",
        ok(r50 >= 20_000.0),
        ok(mib(idle_rss) <= 15.0),
        mib(idle_rss),
        ok(size <= 15 << 20),
        size as f64 / 1048576.0
    );
    if args.keep {
        println!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
