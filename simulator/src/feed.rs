//! `neopro-sim feed`: plays the part of a club's TV frontend against a running
//! `neopro-edge` (compose's simulated box), posting the seed's body
//! `{"impressions": [...]}` to `POST /api/sync/sponsor-impressions`.
//!
//! Why through HTTP: it exercises the seed contract the real frontend uses,
//! exactly as deployed. The plays come from the seeded generator (video,
//! durations, period, trigger, audience) and are stamped with the current
//! time, so the box derives fresh ids. A refused POST (box starting, outbox
//! full: 507) is retried with backoff, as the frontend keeps its buffer.

use anyhow::Context;
use chrono::{SecondsFormat, Utc};
use serde_json::json;
use std::time::Duration;

use crate::catalogue::Catalogue;
use crate::cli::FeedArgs;
use crate::plays::{generate_site, FleetSpec};

pub async fn run(args: FeedArgs) -> anyhow::Result<bool> {
    let spec = FleetSpec {
        sites: 1,
        plays_per_site: 5_000,
        seed: args.seed ^ seed_of(&args.site_id),
        end_day: Utc::now().date_naive(),
        site_prefix: "feed".into(),
    };
    let plays = generate_site(&spec, &Catalogue::standard(), 0).plays;
    let url = format!("{}/api/sync/sponsor-impressions", args.edge_url.trim_end_matches('/'));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let chunk = args.chunk.max(1);
    let pause = Duration::from_secs_f64(chunk as f64 / args.rate.max(0.001));
    let mut sent = 0u64;
    let mut i = 0usize;
    tracing::info!(%url, rate = args.rate, chunk, "feeding the box");
    loop {
        if args.plays > 0 && sent >= args.plays {
            println!("feed: {sent} plays accepted by {url}");
            return Ok(true);
        }
        let n = if args.plays > 0 {
            chunk.min((args.plays - sent) as usize)
        } else {
            chunk
        };
        let now = Utc::now();
        let body: Vec<_> = (0..n)
            .map(|k| {
                let p = &plays[(i + k) % plays.len()];
                let at = now + chrono::Duration::milliseconds(k as i64);
                json!({
                    "video_filename": p.video_filename,
                    "played_at": at.to_rfc3339_opts(SecondsFormat::Millis, true),
                    "duration_played": p.duration_played,
                    "video_duration": p.video_duration,
                    "completed": p.completed,
                    "event_type": p.event_type,
                    "period": p.period,
                    "trigger_type": p.trigger_type,
                    "audience_estimate": p.audience_estimate,
                })
            })
            .collect();
        let payload = json!({ "impressions": body });
        let mut backoff = runtime::backoff(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match http.post(&url).json(&payload).send().await {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    tracing::warn!(%status, body = %text, "the box refused the POST; retrying");
                }
                Err(e) => tracing::warn!(error = %e, "the box is unreachable; retrying"),
            }
            tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(5))).await;
        }
        sent += n as u64;
        i += n;
        if sent % 1000 < n as u64 {
            tracing::info!(sent, "plays accepted by the box");
        }
        tokio::time::sleep(pause).await;
    }
}

/// Stable per-site variation of the seed (FNV-1a of the site id).
fn seed_of(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
